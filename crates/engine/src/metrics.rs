//! The engine's own counters and latency histograms, rendered in the Prometheus text
//! format by the admin API next to the gauges it reads from the store.
//!
//! - Counters count events since the process started (Prometheus handles restarts);
//!   gauges that must survive a restart (messages and deliveries by state, queue age)
//!   come from the store, not from here.
//! - Labels are listener, route and destination names from the configuration, and fixed
//!   words (ACK codes, outcomes): never anything read from a message.
//! - Recording is a few relaxed atomic adds; a family's series are created on first use
//!   under a write lock and then only read-locked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) for the ACK latency: journal flushes take 0.1 to 10 ms.
const ACK_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds (seconds) from the journal to the downstream's answer, retries included.
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3_600.0, 14_400.0,
];
/// Upper bounds (seconds) of one delivery attempt (an HTTP POST, an MLLP exchange).
const ATTEMPT_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the +Inf bucket; not cumulative (summed when rendered).
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// The ACK codes a listener can answer with (MSA-1).
pub const ACK_CODES: [&str; 6] = ["AA", "AE", "AR", "CA", "CE", "CR"];

/// Per listener.
#[derive(Debug)]
pub struct ListenerMetrics {
    /// Frames journaled (well-formed or not).
    pub received: AtomicU64,
    /// Frames that did not parse (answered with a NAK).
    pub rejected: AtomicU64,
    /// Messages no route wanted.
    pub unrouted: AtomicU64,
    /// Answers by MSA-1 code, in [`ACK_CODES`] order.
    acks: [AtomicU64; 6],
    /// From the frame's arrival in the handler to its answer.
    pub ack_latency: Histogram,
}

impl ListenerMetrics {
    fn new() -> Self {
        ListenerMetrics {
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            acks: Default::default(),
            ack_latency: Histogram::new(ACK_BUCKETS),
        }
    }

    /// Counts an answer by its MSA-1 code; other codes are not counted.
    pub fn ack(&self, code: &str) {
        if let Some(i) = ACK_CODES.iter().position(|c| *c == code) {
            self.acks[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per route.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    pub mapped: AtomicU64,
    pub mapping_failures: AtomicU64,
}

/// What became of a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Failed; it will be tried again.
    Retry,
    /// Failed for good: in the dead letter.
    Dead,
}

/// Per (route, destination) queue.
#[derive(Debug)]
pub struct QueueMetrics {
    /// Attempts by outcome: delivered, retry, dead.
    attempts: [AtomicU64; 3],
    /// From the journal to the delivering attempt's answer.
    pub delivery_latency: Histogram,
    pub attempt_duration: Histogram,
}

impl QueueMetrics {
    fn new() -> Self {
        QueueMetrics {
            attempts: Default::default(),
            delivery_latency: Histogram::new(DELIVERY_BUCKETS),
            attempt_duration: Histogram::new(ATTEMPT_BUCKETS),
        }
    }

    pub fn attempt(&self, outcome: AttemptOutcome) {
        let i = match outcome {
            AttemptOutcome::Delivered => 0,
            AttemptOutcome::Retry => 1,
            AttemptOutcome::Dead => 2,
        };
        self.attempts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A family of series keyed by their label values, created on first use.
#[derive(Debug)]
struct Family<K, V> {
    series: RwLock<BTreeMap<K, Arc<V>>>,
}

impl<K: Ord + Clone, V> Family<K, V> {
    fn new() -> Self {
        Family {
            series: RwLock::new(BTreeMap::new()),
        }
    }

    /// The series of `key`, created on first use. Looked up by a borrowed key (a `&str`
    /// for a `String`), so that a hit allocates nothing.
    fn get<Q>(&self, key: &Q, make: impl FnOnce() -> V) -> Arc<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(v) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Arc::clone(v);
        }
        let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            series
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(make())),
        )
    }

    fn snapshot(&self) -> Vec<(K, Arc<V>)> {
        self.series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }
}

/// Every counter and histogram of one engine.
#[derive(Debug)]
pub struct Metrics {
    /// 1 while the engine is over a queue or disk limit.
    pub backpressure: AtomicU64,
    /// Operators' corrected copies journaled through the admin API (`messages resubmit`).
    pub resubmitted: AtomicU64,
    listeners: Family<String, ListenerMetrics>,
    routes: Family<String, RouteMetrics>,
    /// Keyed by (route, destination).
    queues: Family<(String, String), QueueMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            backpressure: AtomicU64::new(0),
            resubmitted: AtomicU64::new(0),
            listeners: Family::new(),
            routes: Family::new(),
            queues: Family::new(),
        }
    }
}

/// The names [`Metrics::render`] writes (histograms without their `_bucket`, `_sum`,
/// `_count` suffixes).
pub const ENGINE_METRIC_NAMES: [&str; 12] = [
    "passerelle_backpressure",
    "passerelle_resubmitted_total",
    "passerelle_received_total",
    "passerelle_acks_total",
    "passerelle_rejected_total",
    "passerelle_unrouted_total",
    "passerelle_ack_latency_seconds",
    "passerelle_mapped_total",
    "passerelle_mapping_failures_total",
    "passerelle_delivery_attempts_total",
    "passerelle_delivery_latency_seconds",
    "passerelle_delivery_attempt_duration_seconds",
];

impl Metrics {
    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        self.listeners.get(name, ListenerMetrics::new)
    }

    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        self.routes.get(name, RouteMetrics::default)
    }

    pub fn queue(&self, route: &str, destination: &str) -> Arc<QueueMetrics> {
        self.queues.get(
            &(route.to_owned(), destination.to_owned()),
            QueueMetrics::new,
        )
    }

    /// Creates the series of known listeners, routes and queues, so that they read 0
    /// (rather than being absent) before their first event: rates and alerts need them.
    pub fn register<'a>(
        &self,
        listeners: impl IntoIterator<Item = &'a str>,
        queues: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        for l in listeners {
            self.listener(l);
        }
        for (route, destination) in queues {
            self.route(route);
            self.queue(route, destination);
        }
    }

    /// Appends every family in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP passerelle_backpressure 1 while the engine is over a queue or disk limit and holds back new messages.\n# TYPE passerelle_backpressure gauge\npasserelle_backpressure {}",
            self.backpressure.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP passerelle_resubmitted_total Operators' corrected copies of messages journaled through the admin API.\n# TYPE passerelle_resubmitted_total counter\npasserelle_resubmitted_total {}",
            self.resubmitted.load(Ordering::Relaxed)
        );
        let listeners = self.listeners.snapshot();
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        let histogram = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        };
        let per_listener: [Field<ListenerMetrics>; 3] = [
            (
                "passerelle_received_total",
                "Frames journaled, by listener.",
                |m| &m.received,
            ),
            (
                "passerelle_rejected_total",
                "Frames that did not parse, journaled as rejected and answered with a NAK.",
                |m| &m.rejected,
            ),
            (
                "passerelle_unrouted_total",
                "Messages no route wanted, journaled as unrouted.",
                |m| &m.unrouted,
            ),
        ];
        for (name, help, field) in per_listener {
            counter(out, name, help);
            for (l, m) in &listeners {
                let n = field(m).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{listener=\"{}\"}} {n}", label(l));
            }
        }
        counter(
            out,
            "passerelle_acks_total",
            "Answers sent, by listener and MSA-1 code.",
        );
        for (l, m) in &listeners {
            for (code, n) in ACK_CODES.iter().zip(&m.acks) {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "passerelle_acks_total{{listener=\"{}\",code=\"{code}\"}} {n}",
                    label(l)
                );
            }
        }
        histogram(
            out,
            "passerelle_ack_latency_seconds",
            "From a frame's arrival to its answer (journal flush included).",
        );
        for (l, m) in &listeners {
            m.ack_latency.render(
                out,
                "passerelle_ack_latency_seconds",
                &format!("listener=\"{}\"", label(l)),
            );
        }

        let routes = self.routes.snapshot();
        let per_route: [Field<RouteMetrics>; 2] = [
            (
                "passerelle_mapped_total",
                "Messages mapped to a bundle, by route.",
                |m| &m.mapped,
            ),
            (
                "passerelle_mapping_failures_total",
                "Messages the route's mapping pack could not map.",
                |m| &m.mapping_failures,
            ),
        ];
        for (name, help, field) in per_route {
            counter(out, name, help);
            for (r, m) in &routes {
                let n = field(m).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{route=\"{}\"}} {n}", label(r));
            }
        }

        let queues = self.queues.snapshot();
        counter(
            out,
            "passerelle_delivery_attempts_total",
            "Delivery attempts by route, destination and outcome (delivered, retry, dead).",
        );
        for ((r, d), m) in &queues {
            for (outcome, n) in ["delivered", "retry", "dead"].iter().zip(&m.attempts) {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "passerelle_delivery_attempts_total{{route=\"{}\",destination=\"{}\",outcome=\"{outcome}\"}} {n}",
                    label(r),
                    label(d)
                );
            }
        }
        for (name, help, field) in [
            (
                "passerelle_delivery_latency_seconds",
                "From the journal to the downstream's acceptance, retries included.",
                (|m| &m.delivery_latency) as fn(&QueueMetrics) -> &Histogram,
            ),
            (
                "passerelle_delivery_attempt_duration_seconds",
                "Duration of one delivery attempt.",
                |m| &m.attempt_duration,
            ),
        ] {
            histogram(out, name, help);
            for ((r, d), m) in &queues {
                field(m).render(
                    out,
                    name,
                    &format!("route=\"{}\",destination=\"{}\"", label(r), label(d)),
                );
            }
        }
    }
}

/// A counter family drawn from one field of a series: name, help, the field.
type Field<T> = (&'static str, &'static str, fn(&T) -> &AtomicU64);

/// A label value, escaped for the text format.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x", "l=\"a\"");
        assert!(out.contains("x_bucket{l=\"a\",le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{l=\"a\",le=\"0.1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{l=\"a\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count{l=\"a\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{l=\"a\"} 3.065\n"), "{out}");
    }

    #[test]
    fn registered_series_read_zero_and_events_count() {
        let m = Metrics::default();
        m.register(["mllp"], [("adt", "fhir")]);
        m.listener("mllp").ack("AA");
        m.listener("mllp").ack("ZZ");
        m.queue("adt", "fhir").attempt(AttemptOutcome::Retry);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("passerelle_received_total{listener=\"mllp\"} 0\n"));
        assert!(out.contains("passerelle_acks_total{listener=\"mllp\",code=\"AA\"} 1\n"));
        assert!(out.contains("passerelle_mapped_total{route=\"adt\"} 0\n"));
        assert!(out.contains(
            "passerelle_delivery_attempts_total{route=\"adt\",destination=\"fhir\",outcome=\"retry\"} 1\n"
        ));
        for name in ENGINE_METRIC_NAMES {
            assert!(out.contains(&format!("# TYPE {name} ")), "{name} rendered");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c d");
    }
}

//! The pipeline: listener → journal (ACK after flush) → route → map → outboxes →
//! delivery workers.
//!
//! - The MLLP handler parses the frame, chooses its route from the MSH alone, journals
//!   the frame and only then answers: AA (or CA) once the store says the frame is durable;
//!   the NAK for a frame that does not parse, which is journaled as `rejected` first; the
//!   configured answer for a message no route wants, journaled as `unrouted`; AE when the
//!   store cannot take the frame (the sender keeps it and sends it again).
//! - Mapping happens after the ACK, one message at a time on a thread of its own, in
//!   journal order: a message's bundle and its deliveries are recorded together. A resend
//!   of an earlier message is recorded as `duplicate` instead (see [`crate::duplicates`]).
//!   Messages journaled but not yet mapped when the engine stopped are mapped on start,
//!   before the listener opens, so that they keep their place in their ordering key's
//!   queue.
//! - An operator's resubmission (a corrected copy journaled by [`crate::ops::resubmit`])
//!   goes through the mapper's queue too ([`Pipeline::route_journaled`]), behind what the
//!   listeners journaled before it; it is routed as its original's listener, and the
//!   duplicate check does not take it for a resend of the message it corrects.
//! - One delivery worker per (route, destination) queue leases due deliveries (at most one
//!   per ordering key at a time, by the store's contract), delivers with
//!   `passerelle-delivery` (FHIR HTTP, MLLP forward, NDJSON), and reports the attempt; the
//!   store applies the route's retry policy. Destination settings are checked at start.
//!   An idle worker wakes when this node queues for it, when the store signals that
//!   another node did ([`Store::work_signal`]: PostgreSQL's NOTIFY), or at its poll (at
//!   most a second, sooner when a retry is due), which also covers a lost signal.
//!
//! Logs carry ids, control ids, message types, sizes and states, never field content.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use passerelle_delivery::{Destination as Target, Item};
use passerelle_hl7::ack::{self, AckError, AckOptions, Outcome as AckOutcome, Severity};
use passerelle_hl7::{ErrorCode, HeaderSummary, Message};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_mllp::{Handler, PeerInfo};
use passerelle_store::{
    AttemptReport, DeliveryState, Enqueue, JournalMeta, Lease, MessageId, MessageState, MshSummary,
    Outcome, Store, StoreError,
};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, info, warn};

use crate::duplicates::{Duplicates, corrected_chain, earlier_copy};
use crate::metrics::{AttemptOutcome, Metrics, QueueMetrics};
use crate::now_ms;
use crate::routes::{Destination, Route, RouteTable};

/// What to answer for a message no route wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnroutedAnswer {
    Accept,
    Error,
    Reject,
}

impl UnroutedAnswer {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "accept" => Some(UnroutedAnswer::Accept),
            "error" => Some(UnroutedAnswer::Error),
            "reject" => Some(UnroutedAnswer::Reject),
            _ => None,
        }
    }
}

/// What to do with a new frame while the engine is over one of its [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// Hold the frame's answer (and so the connection: MLLP senders wait for the ACK
    /// before sending the next message) until the engine is under its limits again.
    #[default]
    StopReading,
    /// Answer AE at once without journaling: the sender keeps the message and resends it.
    Error,
}

impl Backpressure {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "stop-reading" => Some(Backpressure::StopReading),
            "error" => Some(Backpressure::Error),
            _ => None,
        }
    }
}

/// When the engine stops taking new messages.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Unfinished (pending, in-flight, retry-wait) deliveries per destination queue;
    /// at this many, new frames get backpressure. `None`: no limit.
    pub max_queue_depth: Option<u64>,
    /// The store's size on disk; above it, new frames get backpressure. `None`: no limit.
    pub max_disk_bytes: Option<u64>,
    pub backpressure: Backpressure,
    /// How often the limits are checked.
    pub check_every: Option<Duration>,
}

/// Whether the engine is over a limit, updated by a sampling task.
#[derive(Debug, Default)]
struct Pressure {
    over: std::sync::atomic::AtomicBool,
    /// Signalled when the engine goes back under its limits.
    relieved: Notify,
}

/// How the engine finds messages left `received` while it runs: acknowledged, but whose
/// routing outcome was not recorded (a store error at that moment, or, with a shared
/// PostgreSQL store, a node that stopped after the ACK and has not come back). When the
/// mapper is idle, every `every`, those received more than `stuck_after` ago are mapped
/// again (through the mapper's queue, behind nothing). Start-up maps them too.
#[derive(Debug, Clone)]
pub struct Recheck {
    pub every: Duration,
    pub stuck_after: Duration,
}

impl Default for Recheck {
    fn default() -> Self {
        Recheck {
            every: Duration::from_secs(60),
            stuck_after: Duration::from_secs(60),
        }
    }
}

/// Everything the pipeline needs, loaded and checked beforehand.
#[derive(Debug)]
pub struct PipelineConfig {
    pub routes: RouteTable,
    /// Mapping packs by name.
    pub packs: HashMap<String, Pack>,
    pub map_options: MapOptions,
    pub unrouted: UnroutedAnswer,
    /// Relative destination paths (NDJSON folders) are resolved against this folder.
    pub base_dir: PathBuf,
    /// Where the pipeline counts what it does (the admin API renders it).
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub recheck: Recheck,
    /// How a sender's resend is told from a new message.
    pub duplicates: Duplicates,
}

/// Every (route, destination) pair of a route table, in route order.
fn queues_of(routes: &RouteTable) -> impl Iterator<Item = (&Route, &Destination)> {
    routes
        .routes
        .iter()
        .flat_map(|r| r.destinations.iter().map(move |d| (r, d)))
}

/// The queue of a route's destination in the store.
pub fn queue_name(route: &Route, destination: &Destination) -> String {
    format!("{}.{}", route.name, destination.name)
}

/// Frames up to this size go to the mapper with their id; larger ones are read back from
/// the store. The mapper's channel holds at most [`MAPPER_QUEUE`] jobs, so this bounds
/// the memory it takes (16 MiB).
const MAPPER_FRAME_MAX: usize = 16 * 1024;
/// Deliveries leased per store call (see [`Pipeline::lease_batch`]).
const LEASE_CHUNK: usize = 16;
/// Jobs waiting for the mapper; when it is full, ACKs wait (backpressure).
const MAPPER_QUEUE: usize = 1024;

/// Messages a recheck looks at, at most (the oldest received).
const RECHECK_BATCH: usize = 256;

/// A journaled message for the mapper: its id and, when small enough, its frame and its
/// listener, so that the mapper need not read back what the handler just wrote.
#[derive(Debug)]
struct MapJob {
    id: MessageId,
    journaled: Option<(Bytes, Arc<str>)>,
    /// Told once the job is done (an operator's resubmission waits for its outcome).
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What routing and mapping read, swapped whole by [`Pipeline::reload`].
#[derive(Debug)]
struct Routing {
    routes: RouteTable,
    packs: HashMap<String, Pack>,
}

struct Inner<S> {
    store: Arc<S>,
    /// The configuration the pipeline started with. Its routes fix the queues and their
    /// workers; which route a message takes and how it is mapped come from `routing`.
    config: PipelineConfig,
    /// The routes and packs in force (the configuration's packs moved here at start).
    routing: std::sync::RwLock<Arc<Routing>>,
    mapper: mpsc::Sender<MapJob>,
    /// The mapper holds a job (received, not finished): with an empty queue, it is idle.
    mapping: std::sync::atomic::AtomicBool,
    /// Wakes a queue's worker when something was queued for it.
    wake: HashMap<String, Arc<Notify>>,
    /// Where each queue delivers.
    targets: HashMap<String, Arc<Target>>,
    pressure: Pressure,
    /// Set by [`Pipeline::shutdown`]: workers finish their attempts and take no more.
    stopping: std::sync::atomic::AtomicBool,
    workers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The MLLP handler and the handle on the background tasks.
pub struct Pipeline<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Pipeline<S> {
    fn clone(&self) -> Self {
        Pipeline {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> std::fmt::Debug for Pipeline<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("routes", &self.inner.config.routes.routes.len())
            .finish()
    }
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("route {route}: destination {destination}: {error}")]
    Destination {
        route: String,
        destination: String,
        error: passerelle_delivery::SettingsError,
    },
    #[error("route {route}: mapping pack {pack} is not loaded")]
    MissingPack { route: String, pack: String },
    #[error("recovery of unmapped messages failed: {0}")]
    Recovery(#[from] StoreError),
    #[error("cannot start the mapper's thread: {0}")]
    MapperThread(std::io::Error),
}

/// The MSH fields the store keeps with a message.
pub(crate) fn msh_summary(h: &HeaderSummary) -> MshSummary {
    MshSummary {
        message_type: h.message_type.clone(),
        trigger_event: h.trigger_event.clone(),
        control_id: h.control_id.clone(),
        sending_application: h.sending_application.clone(),
        sending_facility: h.sending_facility.clone(),
        version: h.version.clone(),
    }
}

impl<S: Store> Pipeline<S> {
    /// Checks the destinations, maps what a previous run journaled but did not map, and
    /// starts the mapper and one delivery worker per queue.
    pub async fn start(
        store: Arc<S>,
        mut config: PipelineConfig,
    ) -> Result<Pipeline<S>, StartError> {
        let mut wake = HashMap::new();
        let mut targets = HashMap::new();
        for route in &config.routes.routes {
            if !config.packs.contains_key(&route.mapping) {
                return Err(StartError::MissingPack {
                    route: route.name.clone(),
                    pack: route.mapping.clone(),
                });
            }
            for d in &route.destinations {
                let target = Target::from_settings(&d.kind, &d.settings, &config.base_dir)
                    .map_err(|error| StartError::Destination {
                        route: route.name.clone(),
                        destination: d.name.clone(),
                        error,
                    })?;
                let queue = queue_name(route, d);
                targets.insert(queue.clone(), Arc::new(target));
                wake.insert(queue, Arc::new(Notify::new()));
            }
        }
        // Listeners are registered by whoever opens them (they are in the engine's
        // configuration, not in the routes).
        config.metrics.register(
            [],
            queues_of(&config.routes).map(|(r, d)| (r.name.as_str(), d.name.as_str())),
        );
        let (tx, rx) = mpsc::channel(MAPPER_QUEUE);
        let routing = Routing {
            routes: config.routes.clone(),
            packs: std::mem::take(&mut config.packs),
        };
        let pipeline = Pipeline {
            inner: Arc::new(Inner {
                store,
                config,
                routing: std::sync::RwLock::new(Arc::new(routing)),
                mapper: tx,
                mapping: std::sync::atomic::AtomicBool::new(false),
                wake,
                targets,
                pressure: Pressure::default(),
                stopping: std::sync::atomic::AtomicBool::new(false),
                workers: std::sync::Mutex::new(Vec::new()),
            }),
        };
        // Recovery first, in journal order, so that old messages keep their place. Each
        // message is tried once: one that stays `received` (its frame unreadable, the
        // store refusing its outcome) is logged by `map_one` and must not make this loop
        // fetch it again for ever.
        let mut recovered = 0;
        let mut tried = std::collections::HashSet::new();
        loop {
            let ids = pipeline.inner.store.unprocessed(1_000).await?;
            let fresh: Vec<MessageId> = ids.into_iter().filter(|id| tried.insert(*id)).collect();
            if fresh.is_empty() {
                break;
            }
            for id in fresh {
                pipeline
                    .map_one(MapJob {
                        id,
                        journaled: None,
                        done: None,
                    })
                    .await;
                recovered += 1;
            }
        }
        if recovered > 0 {
            info!(
                messages = recovered,
                "mapped messages journaled before the last stop"
            );
        }
        pipeline.clone().spawn_mapper(rx)?;
        tokio::spawn(pipeline.clone().run_recheck());
        let limits = &pipeline.inner.config.limits;
        if limits.max_queue_depth.is_some() || limits.max_disk_bytes.is_some() {
            pipeline.check_limits().await;
            tokio::spawn(pipeline.clone().watch_limits());
        }
        for route in &pipeline.inner.config.routes.routes {
            for d in &route.destinations {
                let worker = tokio::spawn(pipeline.clone().run_worker(route.clone(), d.clone()));
                pipeline
                    .inner
                    .workers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(worker);
            }
        }
        Ok(pipeline)
    }

    /// The store the pipeline journals into.
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    /// The duplicate check's setting.
    pub fn duplicates(&self) -> &Duplicates {
        &self.inner.config.duplicates
    }

    /// The pipeline's counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.config.metrics
    }

    /// The configured queues, as (queue name in the store, route, destination).
    pub fn queues(&self) -> impl Iterator<Item = (String, &str, &str)> {
        queues_of(&self.inner.config.routes)
            .map(|(r, d)| (queue_name(r, d), r.name.as_str(), d.name.as_str()))
    }

    /// Routes and maps a stored frame with the running configuration (for a replay
    /// with re-mapping).
    pub fn remap(&self, raw: &[u8], listener: &str) -> Result<Outcome, String> {
        let message = Message::parse(raw).map_err(|e| format!("does not parse: {e}"))?;
        let routing = self.routing();
        Ok(route_and_map(
            &routing.routes,
            &routing.packs,
            &self.inner.config.map_options,
            &message,
            listener,
        ))
    }

    /// The routes and packs in force.
    fn routing(&self) -> Arc<Routing> {
        let routing = self.inner.routing.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&routing)
    }

    /// Puts new routes and mapping packs in force (`passerelle serve` on SIGHUP): messages
    /// routed from now on follow them; a message being mapped finishes with the old ones.
    /// The queues must stay as they are (every route's destinations, by name and settings:
    /// their workers run with them), and every route's pack must be given; otherwise
    /// nothing changes and the error says why.
    pub fn reload(&self, routes: RouteTable, packs: HashMap<String, Pack>) -> Result<(), String> {
        if let Some(route) = routes
            .routes
            .iter()
            .find(|r| !packs.contains_key(&r.mapping))
        {
            return Err(format!(
                "route {}: mapping pack {} is not loaded",
                route.name, route.mapping
            ));
        }
        let queues = |table: &RouteTable| -> Vec<(String, Destination)> {
            let mut q: Vec<(String, Destination)> = queues_of(table)
                .map(|(r, d)| (queue_name(r, d), d.clone()))
                .collect();
            q.sort_by(|a, b| a.0.cmp(&b.0));
            q
        };
        let (running, new) = (queues(&self.inner.config.routes), queues(&routes));
        if running != new {
            let names = |q: &[(String, Destination)]| {
                q.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "the destinations changed (running: {}; new: {}; or a destination's settings): \
                 a restart applies that",
                names(&running),
                names(&new)
            ));
        }
        let routing = Arc::new(Routing { routes, packs });
        *self
            .inner
            .routing
            .write()
            .unwrap_or_else(|p| p.into_inner()) = routing;
        Ok(())
    }

    /// Stops the delivery workers: each finishes the attempts it has under way and records
    /// them (so that a delivered message is not delivered again after a restart), then
    /// takes no more. Attempts still running after `grace` are abandoned: their leases
    /// return to ready at the next start (at-least-once).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.store(true, Relaxed);
        for wake in self.inner.wake.values() {
            wake.notify_one();
        }
        let workers =
            std::mem::take(&mut *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + grace;
        for mut worker in workers {
            if tokio::time::timeout_at(deadline, &mut worker)
                .await
                .is_err()
            {
                warn!(
                    "a delivery worker did not finish in time; its leases return at the next start"
                );
                worker.abort();
            }
        }
    }

    /// Whether the engine is over one of its limits (new frames get backpressure).
    pub fn over_limits(&self) -> bool {
        self.inner.pressure.over.load(Relaxed)
    }

    async fn watch_limits(self) {
        let every = self
            .inner
            .config
            .limits
            .check_every
            .unwrap_or(Duration::from_millis(250));
        loop {
            tokio::time::sleep(every).await;
            self.check_limits().await;
        }
    }

    /// Samples the queue depths and the disk; logs and signals changes.
    async fn check_limits(&self) {
        let limits = &self.inner.config.limits;
        let store = &self.inner.store;
        let mut reason = None;
        if let Some(max) = limits.max_queue_depth {
            match store.counts().await {
                Ok(counts) => {
                    let mut depth: HashMap<&str, u64> = HashMap::new();
                    for ((queue, state), n) in &counts.deliveries {
                        let unfinished = DeliveryState::ALL
                            .iter()
                            .any(|s| !s.is_final() && s.name() == state);
                        if unfinished {
                            *depth.entry(queue.as_str()).or_default() += n;
                        }
                    }
                    if let Some((queue, n)) = depth.into_iter().find(|(_, n)| *n >= max) {
                        reason = Some(format!(
                            "queue {queue} holds {n} unfinished deliveries (limit {max})"
                        ));
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the queue depths"),
            }
        }
        if let (None, Some(max)) = (&reason, limits.max_disk_bytes) {
            match store.disk_bytes().await {
                Ok(bytes) if bytes > max => {
                    reason = Some(format!("the store takes {bytes} bytes (limit {max})"));
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read the store's size"),
            }
        }
        let pressure = &self.inner.pressure;
        let was = pressure.over.swap(reason.is_some(), Relaxed);
        self.inner
            .config
            .metrics
            .backpressure
            .store(u64::from(reason.is_some()), Relaxed);
        match (was, reason) {
            (false, Some(reason)) => warn!(
                mode = ?limits.backpressure,
                "over a limit: {reason}; new messages get backpressure"
            ),
            (true, None) => {
                info!("back under the limits; taking new messages");
                pressure.relieved.notify_waiters();
            }
            _ => {}
        }
    }

    /// Wakes a queue's worker: something was queued for it outside the mapper (a replay).
    pub fn wake(&self, queue: &str) {
        if let Some(n) = self.inner.wake.get(queue) {
            n.notify_one();
        }
    }

    /// Routes and maps a message journaled outside the listeners (an operator's
    /// resubmission), through the mapper's queue so that it keeps its place in journal
    /// order behind what the listeners journaled before it. Returns once its routing
    /// outcome is recorded, or after `wait`: then it stays `received`, and the engine's
    /// recheck (or the next start) routes it.
    pub async fn route_journaled(&self, id: MessageId, wait: Duration) -> bool {
        let (done, finished) = tokio::sync::oneshot::channel();
        let job = MapJob {
            id,
            journaled: None,
            done: Some(done),
        };
        let sent = tokio::time::timeout(wait, self.inner.mapper.send(job)).await;
        if !matches!(sent, Ok(Ok(()))) {
            warn!(
                id,
                "the mapper does not take the message now; the recheck routes it"
            );
            return false;
        }
        matches!(tokio::time::timeout(wait, finished).await, Ok(Ok(())))
    }

    /// Starts the mapper on a thread of its own, driven by the runtime's I/O and timers.
    ///
    /// Why not a task: mapping is CPU work and the store's calls block on its locks. As a
    /// task, the mapper had to yield after each message so that connections got their
    /// ACKs, and then waited behind every connection's task for its next turn; with the
    /// mapper's queue full, the ACK rate was the mapper's rate (measured: a quarter of a
    /// core used, 230 µs of wall time per message, 90 of them waiting for a turn). On its
    /// own thread it shares the CPU with the runtime through the kernel's scheduler.
    ///
    /// The thread ends when the runtime does (a task it keeps alive is dropped then), as a
    /// task would.
    fn spawn_mapper(self, rx: mpsc::Receiver<MapJob>) -> Result<(), StartError> {
        let runtime = tokio::runtime::Handle::current();
        let (alive, runtime_gone) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        });
        std::thread::Builder::new()
            .name("passerelle-mapper".into())
            .spawn(move || runtime.block_on(self.run_mapper(rx, runtime_gone)))
            .map(drop)
            .map_err(StartError::MapperThread)
    }

    async fn run_mapper(
        self,
        mut rx: mpsc::Receiver<MapJob>,
        mut runtime_gone: tokio::sync::oneshot::Receiver<()>,
    ) {
        loop {
            let job = tokio::select! {
                job = rx.recv() => job,
                _ = &mut runtime_gone => None,
            };
            let Some(job) = job else { return };
            self.inner.mapping.store(true, Relaxed);
            self.map_one(job).await;
            self.inner.mapping.store(false, Relaxed);
        }
    }

    /// Records a message's routing outcome; whether it was recorded.
    async fn record(&self, id: MessageId, outcome: Outcome) -> bool {
        match self.inner.store.record_outcome(id, outcome).await {
            Ok(()) => true,
            // Routed meanwhile: by another node sharing the store, or by an earlier pass.
            Err(StoreError::WrongState { state, .. }) => {
                debug!(id, state, "already routed; this outcome is dropped");
                false
            }
            // Left received: the next recheck (or start) maps it again.
            Err(e) => {
                error!(id, error = %e, "cannot record the routing outcome");
                false
            }
        }
    }

    /// Maps again, now and then, the messages left `received` (see [`Recheck`]).
    async fn run_recheck(self) {
        let recheck = self.inner.config.recheck.clone();
        let mut tick = tokio::time::interval(recheck.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: start-up has just done this
        loop {
            tick.tick().await;
            if self.inner.stopping.load(Relaxed) || self.inner.mapper.is_closed() {
                return;
            }
            let idle = self.inner.mapper.capacity() == self.inner.mapper.max_capacity()
                && !self.inner.mapping.load(Relaxed);
            if !idle {
                // What is queued may be these very messages: look again next time.
                continue;
            }
            let store = &self.inner.store;
            let ids = match store.unprocessed(RECHECK_BATCH).await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(error = %e, "cannot list the messages still received");
                    continue;
                }
            };
            let stuck_before = now_ms().saturating_sub(recheck.stuck_after.as_millis() as u64);
            let mut queued = 0;
            for id in ids {
                let stuck = matches!(
                    store.get(id).await,
                    Ok(Some(r)) if r.state == MessageState::Received && r.received_at_ms <= stuck_before
                );
                if stuck
                    && self
                        .inner
                        .mapper
                        .try_send(MapJob {
                            id,
                            journaled: None,
                            done: None,
                        })
                        .is_ok()
                {
                    queued += 1;
                }
            }
            if queued > 0 {
                warn!(
                    messages = queued,
                    "messages acknowledged but still not routed: mapping them again"
                );
            }
        }
    }

    /// Routes and maps one journaled message, queues its deliveries, and tells whoever
    /// waits for the job.
    async fn map_one(&self, mut job: MapJob) {
        let done = job.done.take();
        self.map_job(job).await;
        if let Some(done) = done {
            // The waiter may have given up: nothing to tell then.
            let _ = done.send(());
        }
    }

    async fn map_job(&self, job: MapJob) {
        let store = &self.inner.store;
        let id = job.id;
        let unreadable = |error: String| Outcome::MappingFailed {
            route: String::new(),
            error,
        };
        let (raw, listener) = match job.journaled {
            Some((frame, listener)) => (frame, Some(listener)),
            None => match store.raw(id).await {
                Ok(Some(raw)) => (Bytes::from(raw), None),
                // Kept as mapping_failed, with the reason, for an operator to see.
                Ok(None) => {
                    self.record(id, unreadable("the frame is missing from the store".into()))
                        .await;
                    return;
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    self.record(id, unreadable(format!("the frame cannot be read: {e}")))
                        .await;
                    return;
                }
                // Perhaps passing (the store unreachable): left received, tried again.
                Err(e) => {
                    error!(id, error = %e, "cannot read a journaled message");
                    return;
                }
            },
        };
        let outcome = match Message::parse(&raw) {
            // Journaled as received, so it parsed then; a failure now is a bug worth a record.
            Err(e) => Outcome::MappingFailed {
                route: String::new(),
                error: e.to_string(),
            },
            Ok(message) => {
                // Fresh from a listener: received just now. Otherwise (start-up, recheck,
                // an operator's resubmission) the record says when, on which listener it
                // is routed (a corrected copy: its original's), and what it corrects.
                let (listener, received_at_ms, corrects) = match listener {
                    Some(l) => (l, now_ms(), Vec::new()),
                    None => match store.get(id).await.ok().flatten() {
                        Some(r) => {
                            let corrects =
                                corrected_chain(store.as_ref(), r.links.resubmitted_from).await;
                            let listener = Arc::from(r.routing_listener());
                            (listener, r.received_at_ms, corrects)
                        }
                        None => (Arc::from(""), now_ms(), Vec::new()),
                    },
                };
                // Read once, for the duplicate check and for routing.
                let header = HeaderSummary::of(&message);
                let earlier = earlier_copy(
                    store.as_ref(),
                    &self.inner.config.duplicates,
                    id,
                    received_at_ms,
                    &header,
                    &raw,
                    &corrects,
                )
                .await
                .unwrap_or_else(|e| {
                    // Routing it is the safe side: at worst a resend is delivered twice.
                    warn!(id, error = %e, "cannot look for an earlier copy: routing it");
                    None
                });
                match earlier {
                    Some(of) => {
                        info!(
                            id,
                            of,
                            control_id = %header.control_id,
                            "the same message as an earlier one (a resend): kept, not routed"
                        );
                        Outcome::Duplicate { of }
                    }
                    None => {
                        let routing = self.routing();
                        route_and_map_with(
                            &routing.routes,
                            &routing.packs,
                            &self.inner.config.map_options,
                            &message,
                            &header,
                            &listener,
                        )
                    }
                }
            }
        };
        let queued: Vec<String> = match &outcome {
            Outcome::Mapped { deliveries, .. } => {
                deliveries.iter().map(|d| d.destination.clone()).collect()
            }
            _ => Vec::new(),
        };
        let metrics = &self.inner.config.metrics;
        let state = match &outcome {
            Outcome::Unrouted => "unrouted",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::MappingFailed { route, error } => {
                metrics.route(route).mapping_failures.fetch_add(1, Relaxed);
                // The sender had its AA: this line and the record are all an operator
                // gets. A mapping error names the segment, path and rule, never a value.
                warn!(id, route = %route, error = %error, "mapping failed: kept as mapping_failed");
                "mapping_failed"
            }
            Outcome::Mapped { route, .. } => {
                metrics.route(route).mapped.fetch_add(1, Relaxed);
                "mapped"
            }
        };
        if self.record(id, outcome).await {
            debug!(id, state, "routed");
        }
        for q in queued {
            if let Some(n) = self.inner.wake.get(&q) {
                n.notify_one();
            }
        }
    }

    async fn run_worker(self, route: Route, destination: Destination) {
        let queue = queue_name(&route, &destination);
        let wake = Arc::clone(&self.inner.wake[&queue]);
        let target = Arc::clone(&self.inner.targets[&queue]);
        let store = &self.inner.store;
        let metrics = self
            .inner
            .config
            .metrics
            .queue(&route.name, &destination.name);
        // Subscribed before the first lease, so that nothing another node readies after
        // a lease that found nothing is missed (a shared store's signal; sled's never fires).
        let mut elsewhere = store.work_signal(&queue);
        loop {
            if self.inner.stopping.load(Relaxed) {
                return;
            }
            if let Err(e) = store.requeue_expired().await {
                warn!(queue, error = %e, "cannot return expired leases");
            }
            let leases = match self.lease_batch(&queue, destination.concurrency).await {
                Ok(l) => l,
                Err(e) => {
                    error!(queue, error = %e, "cannot lease deliveries");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if leases.is_empty() {
                // Sleep until something is queued here or on another node, or the next
                // retry is due; the poll also covers a lost signal.
                let wait = match store.next_due_ms(&queue).await {
                    Ok(Some(due)) => {
                        Duration::from_millis(due.saturating_sub(now_ms()).clamp(1, 1_000))
                    }
                    _ => Duration::from_secs(1),
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                    _ = elsewhere.changed() => {}
                }
                continue;
            }
            // Leases hold distinct ordering keys: they may go out together.
            futures_util::future::join_all(
                leases
                    .into_iter()
                    .map(|lease| self.deliver_one(&queue, lease, &target, &destination, &metrics)),
            )
            .await;
        }
    }

    /// Leases up to `max` deliveries of `queue`, [`LEASE_CHUNK`] at a time. The store
    /// holds its write lock for a whole `lease` call, one batch write per delivery, and
    /// journaling a frame needs that lock: in small calls, with a yield in between, ACKs
    /// are not held up behind a large lease.
    async fn lease_batch(&self, queue: &str, max: usize) -> Result<Vec<Lease>, StoreError> {
        let mut leases: Vec<Lease> = Vec::new();
        while leases.len() < max {
            let want = (max - leases.len()).min(LEASE_CHUNK);
            let got = match self.inner.store.lease(queue, want).await {
                Ok(got) => got,
                // What was leased already goes out; its leases would only expire.
                Err(e) if !leases.is_empty() => {
                    warn!(queue, error = %e, "cannot lease more deliveries");
                    break;
                }
                Err(e) => return Err(e),
            };
            let last = got.len() < want;
            leases.extend(got);
            if last {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok(leases)
    }

    /// One attempt of one leased delivery, and its record.
    async fn deliver_one(
        &self,
        queue: &str,
        lease: Lease,
        target: &Target,
        destination: &Destination,
        metrics: &QueueMetrics,
    ) {
        let store = &self.inner.store;
        let record = store.get(lease.message_id).await;
        // Only an MLLP forward sends the frame itself; the others send the bundle.
        let raw = match target {
            Target::Mllp(_) => store.raw(lease.message_id).await,
            Target::Ndjson(_) | Target::Fhir(_) => Ok(Some(Vec::new())),
        };
        let mut received_at_ms = None;
        let report = match (record, raw) {
            (Ok(Some(record)), Ok(Some(raw))) => {
                let item = Item {
                    message_id: lease.message_id,
                    bundle: record.bundle.as_deref(),
                    raw: &raw,
                };
                received_at_ms = Some(record.received_at_ms);
                let started = Instant::now();
                let report = target.deliver(&item).await;
                metrics.attempt_duration.observe(started.elapsed());
                report
            }
            (Err(e), _) | (_, Err(e)) => {
                let mut r = AttemptReport::transient("store");
                r.detail = e.to_string();
                r
            }
            _ => AttemptReport::permanent("message_missing"),
        };
        let outcome = report.outcome;
        let (error_class, status) = (report.error_class.clone(), report.status);
        // A batch of attempts often finishes together (NDJSON answers a group at once):
        // let ACKs through between their records rather than after all of them.
        tokio::task::yield_now().await;
        match store.complete(&lease, report, &destination.retry).await {
            Ok(state) => {
                match state {
                    DeliveryState::Delivered => {
                        metrics.attempt(AttemptOutcome::Delivered);
                        if let Some(at) = received_at_ms {
                            metrics
                                .delivery_latency
                                .observe(Duration::from_millis(now_ms().saturating_sub(at)));
                        }
                    }
                    DeliveryState::Dead => {
                        metrics.attempt(AttemptOutcome::Dead);
                        warn!(
                            queue,
                            id = lease.message_id,
                            attempt = lease.attempt,
                            class = %error_class,
                            status,
                            "delivery failed for good: in the dead letter"
                        );
                    }
                    _ => {
                        metrics.attempt(AttemptOutcome::Retry);
                        info!(
                            queue,
                            id = lease.message_id,
                            attempt = lease.attempt,
                            class = %error_class,
                            status,
                            "delivery failed; will retry"
                        );
                    }
                }
                debug!(
                    queue,
                    id = lease.message_id,
                    attempt = lease.attempt,
                    state = state.name(),
                    ?outcome,
                    "delivery"
                )
            }
            Err(e) => {
                warn!(queue, id = lease.message_id, error = %e, "cannot record the delivery")
            }
        }
    }
}

/// Routes and maps a parsed message with the current routes and packs: what to record for
/// it. Used by the mapper, and by `passerelle messages replay` to re-map.
pub fn route_and_map(
    routes: &RouteTable,
    packs: &HashMap<String, Pack>,
    options: &MapOptions,
    message: &Message<'_>,
    listener: &str,
) -> Outcome {
    let header = HeaderSummary::of(message);
    route_and_map_with(routes, packs, options, message, &header, listener)
}

/// [`route_and_map`] for a message whose header was read already.
fn route_and_map_with(
    routes: &RouteTable,
    packs: &HashMap<String, Pack>,
    options: &MapOptions,
    message: &Message<'_>,
    header: &HeaderSummary,
    listener: &str,
) -> Outcome {
    let Some(route) = routes.select(header, listener) else {
        return Outcome::Unrouted;
    };
    let Some(pack) = packs.get(&route.mapping) else {
        return Outcome::MappingFailed {
            route: route.name.clone(),
            error: format!("mapping pack {} is not loaded", route.mapping),
        };
    };
    match pack.map(message, options) {
        Ok(bundle) => {
            let key = route.ordering_key(message);
            Outcome::Mapped {
                route: route.name.clone(),
                bundle: bundle.to_json(false),
                deliveries: route
                    .destinations
                    .iter()
                    .map(|d| Enqueue {
                        destination: queue_name(route, d),
                        ordering_key: key.clone(),
                    })
                    .collect(),
            }
        }
        Err(e) => Outcome::MappingFailed {
            route: route.name.clone(),
            error: e.to_string(),
        },
    }
}

impl<S: Store> Handler for Pipeline<S> {
    async fn handle(&self, frame: Bytes, peer: &PeerInfo) -> Option<Bytes> {
        let started = Instant::now();
        let metrics = self.inner.config.metrics.listener(&peer.listener);
        // None: the sender left while its frame was held back; nothing to answer.
        let answer = self.answer(frame, peer, &metrics).await?;
        metrics.ack_latency.observe(started.elapsed());
        metrics.ack(answer.code);
        Some(Bytes::from(answer.bytes))
    }
}

/// An ACK or NAK, and its MSA-1 code (for the metrics, without reading the bytes back).
struct Answer {
    bytes: Vec<u8>,
    code: &'static str,
}

/// Builds the answer to a message with this header (`None`: an unreadable header).
fn reply(header: Option<&HeaderSummary>, outcome: AckOutcome, errors: &[AckError]) -> Answer {
    Answer {
        bytes: ack::build(header, outcome, errors, &AckOptions::default()),
        code: outcome.code(header.is_some_and(HeaderSummary::is_enhanced_mode)),
    }
}

impl<S: Store> Pipeline<S> {
    /// Journals a frame and builds its answer (ACK or NAK).
    async fn answer(
        &self,
        frame: Bytes,
        peer: &PeerInfo,
        metrics: &crate::metrics::ListenerMetrics,
    ) -> Option<Answer> {
        let store = &self.inner.store;
        let meta = |msh: Option<MshSummary>, rejected: Option<String>| JournalMeta {
            listener: peer.listener.to_string(),
            peer: peer.addr.to_string(),
            msh,
            rejected,
        };
        let message = match Message::parse(&frame) {
            Ok(m) => m,
            Err(e) => {
                let salvaged = HeaderSummary::salvage(&frame);
                let journaled = store
                    .journal(
                        &frame,
                        meta(salvaged.as_ref().map(msh_summary), Some(e.to_string())),
                    )
                    .await;
                return Some(match journaled {
                    Ok(id) => {
                        metrics.received.fetch_add(1, Relaxed);
                        metrics.rejected.fetch_add(1, Relaxed);
                        info!(id, size = frame.len(), error = e.kind.name(), "rejected");
                        reply(
                            salvaged.as_ref(),
                            ack::parse_error_outcome(salvaged.as_ref(), &e),
                            &[AckError::from_parse_error(&frame, &e)],
                        )
                    }
                    Err(store_error) => storage_nak(salvaged.as_ref(), &store_error),
                });
            }
        };
        let header = HeaderSummary::of(&message);
        if self.over_limits() {
            match self.inner.config.limits.backpressure {
                Backpressure::Error => {
                    info!(kind = %header.kind(), control_id = %header.control_id, "over a limit: answered AE, not journaled");
                    let err = AckError {
                        code: ErrorCode::ApplicationInternalError,
                        severity: Severity::Error,
                        location: None,
                        text: "passerelle is over its queue or disk limit; send it again later"
                            .into(),
                    };
                    return Some(reply(Some(&header), AckOutcome::Error, &[err]));
                }
                Backpressure::StopReading => {
                    debug!(control_id = %header.control_id, "over a limit: holding the answer");
                    loop {
                        // Listen before looking, so that a clearing in between is seen.
                        let relieved = self.inner.pressure.relieved.notified();
                        tokio::pin!(relieved);
                        relieved.as_mut().enable();
                        if !self.over_limits() {
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::timeout(Duration::from_secs(1), relieved) => {}
                            // The sender gave up (or the engine stops): it got no ACK and
                            // will send the frame again, so keeping it would only make a
                            // second copy.
                            () = peer.abandoned.cancelled() => {
                                info!(
                                    kind = %header.kind(),
                                    control_id = %header.control_id,
                                    "the sender left while its answer was held: not journaled"
                                );
                                return None;
                            }
                        }
                    }
                }
            }
        }
        let routing = self.routing();
        let route = routing.routes.select(&header, &peer.listener);
        let id = match store
            .journal(&frame, meta(Some(msh_summary(&header)), None))
            .await
        {
            Ok(id) => id,
            Err(e) => return Some(storage_nak(Some(&header), &e)),
        };
        metrics.received.fetch_add(1, Relaxed);
        let answer = match route {
            Some(_) => {
                // Mapping happens after the ACK; a full queue holds the ACK back (backpressure).
                let journaled = (frame.len() <= MAPPER_FRAME_MAX).then(|| {
                    // A copy of its own, so that the job does not keep the connection's
                    // read buffer alive.
                    (Bytes::copy_from_slice(&frame), Arc::clone(&peer.listener))
                });
                if self
                    .inner
                    .mapper
                    .send(MapJob {
                        id,
                        journaled,
                        done: None,
                    })
                    .await
                    .is_err()
                {
                    warn!(
                        id,
                        "the mapper has stopped; the message stays received and is mapped on restart"
                    );
                }
                reply(Some(&header), AckOutcome::Accept, &[])
            }
            None => {
                metrics.unrouted.fetch_add(1, Relaxed);
                if let Err(e) = store.record_outcome(id, Outcome::Unrouted).await {
                    error!(id, error = %e, "cannot record unrouted");
                }
                info!(id, kind = %header.kind(), control_id = %header.control_id, "unrouted");
                let err = AckError {
                    code: ErrorCode::UnsupportedMessageType,
                    severity: Severity::Error,
                    location: None,
                    text: format!("no route for {} from this sender", header.kind()),
                };
                match self.inner.config.unrouted {
                    UnroutedAnswer::Accept => reply(Some(&header), AckOutcome::Accept, &[]),
                    UnroutedAnswer::Error => reply(Some(&header), AckOutcome::Error, &[err]),
                    UnroutedAnswer::Reject => reply(Some(&header), AckOutcome::Reject, &[err]),
                }
            }
        };
        debug!(id, kind = %header.kind(), control_id = %header.control_id, size = frame.len(), "acknowledged");
        Some(answer)
    }
}

/// The answer when the store cannot take a frame: AE, so that the sender keeps it.
fn storage_nak(header: Option<&HeaderSummary>, error: &StoreError) -> Answer {
    error!(error = %error, "cannot journal a frame; answering AE");
    let err = AckError {
        code: ErrorCode::ApplicationInternalError,
        severity: Severity::Error,
        location: None,
        text: "the message could not be stored; send it again later".into(),
    };
    reply(header, AckOutcome::Error, &[err])
}

//! The admin HTTP API: `/health`, `/ready`, `/metrics` (Prometheus text format) and
//! `/api/messages` (JSON). Bound to 127.0.0.1 by default.
//!
//! `/health` and `/ready` answer anyone (probes); `/metrics` and `/api/*` require
//! `Authorization: Bearer <token>` when the token variable named in `[admin] token_env`
//! is set. Labels carry listener, queue and state names only: no patient data.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query as UrlQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use passerelle_mllp::Stats;
use passerelle_store::{DeliveryState, MessageState, Query, Store};
use serde::Deserialize;

/// Reads the listeners' counters: (listener name, stats).
pub type ListenerStats = Arc<dyn Fn() -> Vec<(String, Stats)> + Send + Sync>;

/// What the API reads.
pub struct Admin<S> {
    pub store: Arc<S>,
    pub listeners: ListenerStats,
    /// Set once the pipeline runs and the listeners accept.
    pub ready: Arc<AtomicBool>,
    /// The bearer token, if one is required.
    pub token: Option<String>,
}

impl<S> std::fmt::Debug for Admin<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("ready", &self.ready.load(Ordering::SeqCst))
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl<S> Clone for Admin<S> {
    fn clone(&self) -> Self {
        Admin {
            store: Arc::clone(&self.store),
            listeners: Arc::clone(&self.listeners),
            ready: Arc::clone(&self.ready),
            token: self.token.clone(),
        }
    }
}

/// The metric names `/metrics` exports (dashboards and alert rules may use only these).
pub const METRIC_NAMES: [&str; 5] = [
    "passerelle_up",
    "passerelle_messages",
    "passerelle_deliveries",
    "passerelle_quarantined_records",
    "passerelle_listener_events_total",
];

/// The router, to serve with `axum::serve`.
pub fn router<S: Store>(admin: Admin<S>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/api/messages", get(messages::<S>))
        .with_state(admin)
}

async fn ready<S: Store>(State(admin): State<Admin<S>>) -> Response {
    if admin.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

fn authorised<S>(admin: &Admin<S>, headers: &HeaderMap) -> bool {
    let Some(token) = &admin.token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given.as_bytes() == token.as_bytes())
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

async fn metrics<S: Store>(State(admin): State<Admin<S>>, headers: HeaderMap) -> Response {
    if !authorised(&admin, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let counts = match admin.store.counts().await {
        Ok(c) => c,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response();
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP passerelle_up 1 while the engine runs.\n# TYPE passerelle_up gauge\npasserelle_up 1"
    );
    let _ = writeln!(
        out,
        "# HELP passerelle_messages Stored messages by state.\n# TYPE passerelle_messages gauge"
    );
    for state in MessageState::ALL {
        let n = counts.messages.get(state.name()).copied().unwrap_or(0);
        let _ = writeln!(out, "passerelle_messages{{state=\"{}\"}} {n}", state.name());
    }
    let _ = writeln!(
        out,
        "# HELP passerelle_deliveries Deliveries by queue (route.destination) and state.\n# TYPE passerelle_deliveries gauge"
    );
    for ((queue, state), n) in &counts.deliveries {
        if DeliveryState::ALL.iter().any(|s| s.name() == state) {
            let _ = writeln!(
                out,
                "passerelle_deliveries{{queue=\"{}\",state=\"{}\"}} {n}",
                label(queue),
                label(state)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP passerelle_quarantined_records Damaged records moved aside.\n# TYPE passerelle_quarantined_records gauge\npasserelle_quarantined_records {}",
        counts.quarantined
    );
    let _ = writeln!(
        out,
        "# HELP passerelle_listener_events_total Listener events by kind.\n# TYPE passerelle_listener_events_total counter"
    );
    for (name, s) in (admin.listeners)() {
        let events = [
            ("accepted", s.accepted),
            ("refused_address", s.refused_address),
            ("refused_limit", s.refused_limit),
            ("tls_failed", s.tls_failed),
            ("refused_identity", s.refused_identity),
            ("frames", s.frames),
            ("acks", s.acks),
            ("oversized", s.oversized),
            ("protocol_errors", s.protocol_errors),
            ("idle_timeouts", s.idle_timeouts),
            ("frame_timeouts", s.frame_timeouts),
        ];
        for (event, n) in events {
            let _ = writeln!(
                out,
                "passerelle_listener_events_total{{listener=\"{}\",event=\"{event}\"}} {n}",
                label(&name)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    state: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

async fn messages<S: Store>(
    State(admin): State<Admin<S>>,
    headers: HeaderMap,
    UrlQuery(q): UrlQuery<MessagesQuery>,
) -> Response {
    if !authorised(&admin, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut query = Query {
        after: q.after,
        limit: q.limit.unwrap_or(100).min(1_000),
        ..Query::default()
    };
    if let Some(state) = &q.state {
        if let Some(s) = MessageState::ALL.iter().find(|s| s.name() == state) {
            query.state = Some(*s);
        } else if let Some(s) = DeliveryState::ALL.iter().find(|s| s.name() == state) {
            query.delivery_state = Some(*s);
        } else {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown state {state:?}\n"),
            )
                .into_response();
        }
    }
    match admin.store.list(&query).await {
        Ok(page) => {
            let items: Vec<serde_json::Value> = page
                .items
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id,
                        "received_at_ms": r.received_at_ms,
                        "state": r.state.name(),
                        "message_type": r.msh.as_ref().map(|m| format!("{}^{}", m.message_type, m.trigger_event)),
                        "control_id": r.msh.as_ref().map(|m| m.control_id.clone()),
                        "route": r.route,
                        "size": r.size,
                    })
                })
                .collect();
            axum::Json(serde_json::json!({ "items": items, "next": page.next })).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

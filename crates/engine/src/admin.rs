//! The admin HTTP API, bound to 127.0.0.1 by default:
//!
//! | method and path                 | answer                                            |
//! |---------------------------------|---------------------------------------------------|
//! | `GET /health`                   | `ok` while the process runs (liveness)            |
//! | `GET /ready`                    | 200 once the pipeline runs and listeners accept   |
//! | `GET /metrics`                  | Prometheus text format ([`metric_names`])         |
//! | `GET /api/messages?filters`     | a page of records ([`ops::ListFilter`] fields)    |
//! | `POST /api/messages/query`      | the same page, the filters as a JSON object       |
//! | `GET /api/messages/{id}`        | one message in full: raw HL7, bundle, attempts    |
//! | `POST /api/messages/replay`     | `{"ids":[…]` or `"filter":{…}`, `"remap"`, `"dry_run"`, `"destination"`, `"delivery_state"`} |
//! | `POST /api/messages/purge`      | `{"ids":[…]}`                                     |
//! | `POST /api/messages/resubmit`   | `{"original":id,"frame":base64,"operator":login,"dry_run":bool}` |
//!
//! A resubmission (an operator's corrected copy of a message, [`ops::resubmit`]) carries
//! the frame in the body, base64 (HL7 bytes need not be UTF-8), never in the URL. It is
//! journaled, then routed and mapped through the mapper's queue before the answer, which
//! says where the copy stands: 200 with [`ops::ResubmitResult`]; 400 for a frame that is
//! empty, does not parse (the parser's located error) or is the original unchanged, with
//! nothing stored; 404 with `no message ID` for an original that does not exist.
//!
//! `/health` and `/ready` answer anyone (probes); everything else requires
//! `Authorization: Bearer <token>` when the token variable named in `[admin] token_env`
//! is set. Metric labels carry listener, route, destination and state names only: no
//! patient data. `GET /api/messages/{id}` is the one answer that carries message content,
//! because showing it is its purpose.
//!
//! Filters can identify a patient (an ordering key holds a patient identifier), and URLs
//! end up in proxies' and servers' access logs: `POST /api/messages/query` takes them in
//! the body, and `passerelle messages` uses it; the `GET` form stays for compatibility.
//! A request (body or query string) with a field the API does not know gets 400 and the
//! field's name, never a default answer: `{"idz":[3]}` must not replay nothing quietly,
//! nor `"filter":{"rout":"adt"}` select every route.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::extract::Request;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query as UrlQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use passerelle_mllp::Stats;
use passerelle_store::{DeliveryState, MessageState, Store};
use serde::Deserialize;

use crate::metrics::label;
use crate::now_ms;
use crate::ops::{self, ListFilter};
use crate::pipeline::Pipeline;

/// Reads the listeners' counters: (listener name, stats).
pub type ListenerStats = Arc<dyn Fn() -> Vec<(String, Stats)> + Send + Sync>;

/// What the API reads.
pub struct Admin<S> {
    /// The store, the counters and the queues it reads; for replays, re-mapping with the
    /// running configuration and waking the workers.
    pub pipeline: Pipeline<S>,
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
            pipeline: self.pipeline.clone(),
            listeners: Arc::clone(&self.listeners),
            ready: Arc::clone(&self.ready),
            token: self.token.clone(),
        }
    }
}

/// The gauges `/metrics` reads from the store and the listeners at each scrape; the
/// engine's counters and histograms are [`crate::metrics::ENGINE_METRIC_NAMES`].
pub const STORE_METRIC_NAMES: [&str; 8] = [
    "passerelle_up",
    "passerelle_ready",
    "passerelle_messages",
    "passerelle_deliveries",
    "passerelle_queue_oldest_age_seconds",
    "passerelle_quarantined_records",
    "passerelle_store_disk_bytes",
    "passerelle_listener_events_total",
];

/// Every metric name `/metrics` exports (dashboards and alert rules may use only these;
/// histograms also export `_bucket`, `_sum` and `_count`).
pub fn metric_names() -> impl Iterator<Item = &'static str> {
    STORE_METRIC_NAMES
        .into_iter()
        .chain(crate::metrics::ENGINE_METRIC_NAMES)
}

/// The router, to serve with `axum::serve`.
pub fn router<S: Store>(admin: Admin<S>) -> Router {
    // Everything but the two probes wants the token, checked by one layer: an endpoint
    // added here cannot forget it.
    let guarded = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/api/messages", get(messages::<S>))
        .route("/api/messages/query", post(query::<S>))
        .route("/api/messages/{id}", get(show::<S>))
        .route("/api/messages/replay", post(replay::<S>))
        .route("/api/messages/purge", post(purge::<S>))
        .route("/api/messages/resubmit", post(resubmit::<S>))
        .route_layer(middleware::from_fn_with_state(
            admin.clone(),
            require_token::<S>,
        ));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready::<S>))
        .merge(guarded)
        .with_state(admin)
}

/// 401 unless the request carries the admin token (`Authorization: Bearer …`), when one
/// is configured.
async fn require_token<S: Store>(
    State(admin): State<Admin<S>>,
    request: Request,
    next: Next,
) -> Response {
    if authorised(&admin, request.headers()) {
        next.run(request).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
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

async fn metrics<S: Store>(State(admin): State<Admin<S>>) -> Response {
    let counts = match admin.pipeline.store().counts().await {
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
        "# HELP passerelle_ready 1 once the pipeline runs and the listeners accept.\n# TYPE passerelle_ready gauge\npasserelle_ready {}",
        u8::from(admin.ready.load(Ordering::SeqCst))
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
        "# HELP passerelle_deliveries Deliveries by route, destination and state.\n# TYPE passerelle_deliveries gauge"
    );
    // The configured queues, every state (zeros included), then what the store still
    // holds for queues no longer configured (split at the first dot).
    let mut queues: Vec<(String, String, String)> = admin
        .pipeline
        .queues()
        .map(|(q, r, d)| (q, r.to_owned(), d.to_owned()))
        .collect();
    for (queue, _) in counts.deliveries.keys() {
        if !queues.iter().any(|(q, _, _)| q == queue) {
            let (r, d) = queue.split_once('.').unwrap_or((queue.as_str(), ""));
            queues.push((queue.clone(), r.to_owned(), d.to_owned()));
        }
    }
    for (queue, route, destination) in &queues {
        for state in DeliveryState::ALL {
            let n = counts
                .deliveries
                .get(&(queue.clone(), state.name().to_owned()))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "passerelle_deliveries{{route=\"{}\",destination=\"{}\",state=\"{}\"}} {n}",
                label(route),
                label(destination),
                state.name()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP passerelle_queue_oldest_age_seconds Age of the oldest delivery not yet delivered nor dead (0 when none).\n# TYPE passerelle_queue_oldest_age_seconds gauge"
    );
    let now = now_ms();
    for (queue, route, destination) in &queues {
        let age = match admin.pipeline.store().oldest_unfinished_ms(queue).await {
            Ok(Some(at)) => now.saturating_sub(at) as f64 / 1_000.0,
            Ok(None) => 0.0,
            Err(e) => {
                return (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response();
            }
        };
        let _ = writeln!(
            out,
            "passerelle_queue_oldest_age_seconds{{route=\"{}\",destination=\"{}\"}} {age}",
            label(route),
            label(destination)
        );
    }
    let _ = writeln!(
        out,
        "# HELP passerelle_quarantined_records Damaged records moved aside.\n# TYPE passerelle_quarantined_records gauge\npasserelle_quarantined_records {}",
        counts.quarantined
    );
    if let Ok(bytes) = admin.pipeline.store().disk_bytes().await {
        let _ = writeln!(
            out,
            "# HELP passerelle_store_disk_bytes Bytes the store takes on disk.\n# TYPE passerelle_store_disk_bytes gauge\npasserelle_store_disk_bytes {bytes}"
        );
    }
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
            ("unframed_data", s.unframed_data),
            ("idle_timeouts", s.idle_timeouts),
            ("frame_timeouts", s.frame_timeouts),
            ("truncated", s.truncated),
            ("write_timeouts", s.write_timeouts),
            ("missing_cr", s.missing_cr),
            ("abandoned_frames", s.abandoned_frames),
        ];
        for (event, n) in events {
            let _ = writeln!(
                out,
                "passerelle_listener_events_total{{listener=\"{}\",event=\"{event}\"}} {n}",
                label(&name)
            );
        }
    }
    admin.pipeline.metrics().render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A request's JSON body, or the answer to a body that does not fit: 400 with what is
/// wrong (axum's own answer would be 422 for an unknown field or a wrong type).
fn json_body<T>(body: Result<axum::Json<T>, JsonRejection>) -> Result<T, (StatusCode, String)> {
    body.map(|axum::Json(value)| value).map_err(|rejection| {
        let status = match &rejection {
            JsonRejection::JsonDataError(_) => StatusCode::BAD_REQUEST,
            _ => rejection.status(),
        };
        (status, format!("{}\n", rejection.body_text()))
    })
}

async fn messages<S: Store>(
    State(admin): State<Admin<S>>,
    filter: Result<UrlQuery<ListFilter>, QueryRejection>,
) -> Response {
    match filter {
        Ok(UrlQuery(filter)) => list(&admin, &filter).await,
        Err(rejection) => (
            StatusCode::BAD_REQUEST,
            format!("{}\n", rejection.body_text()),
        )
            .into_response(),
    }
}

/// `GET /api/messages` with the filters in the body, out of URLs and their logs.
async fn query<S: Store>(
    State(admin): State<Admin<S>>,
    filter: Result<axum::Json<ListFilter>, JsonRejection>,
) -> Response {
    match json_body(filter) {
        Ok(filter) => list(&admin, &filter).await,
        Err(refused) => refused.into_response(),
    }
}

async fn list<S: Store>(admin: &Admin<S>, filter: &ListFilter) -> Response {
    if let Err(e) = filter.query() {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    match ops::list(admin.pipeline.store().as_ref(), filter).await {
        Ok(doc) => axum::Json(doc).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

async fn show<S: Store>(State(admin): State<Admin<S>>, UrlPath(id): UrlPath<u64>) -> Response {
    match ops::show(admin.pipeline.store().as_ref(), id).await {
        Ok(Some(doc)) => axum::Json(doc).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no message {id}\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

/// A replay request: explicit ids, or a filter (at least one criterion). `destination`
/// and `delivery_state` narrow which deliveries of a mapped message are queued again;
/// with a filter, they default to the filter's `dest` and delivery `state`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<u64>,
    filter: Option<ListFilter>,
    #[serde(default)]
    remap: bool,
    #[serde(default)]
    dry_run: bool,
    destination: Option<String>,
    delivery_state: Option<String>,
}

async fn replay<S: Store>(
    State(admin): State<Admin<S>>,
    request: Result<axum::Json<ReplayRequest>, JsonRejection>,
) -> Response {
    let request = match json_body(request) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let mut ids = request.ids;
    let mut only = request
        .filter
        .as_ref()
        .map(ListFilter::replay_selection)
        .unwrap_or_default();
    if request.destination.is_some() {
        only.destination = request.destination.clone();
    }
    if let Some(state) = &request.delivery_state {
        match DeliveryState::ALL.into_iter().find(|s| s.name() == state) {
            Some(s) if s.is_final() => only.state = Some(s),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("delivery_state {state:?}: a replay takes \"delivered\" or \"dead\"\n"),
                )
                    .into_response();
            }
        }
    }
    if let Some(filter) = &request.filter {
        if filter.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                "a replay filter needs at least one criterion\n",
            )
                .into_response();
        }
        match ops::select_ids(admin.pipeline.store().as_ref(), filter).await {
            Ok(selected) => ids.extend(selected),
            Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        }
    }
    let pipeline = &admin.pipeline;
    let remap = |raw: &[u8], listener: &str| pipeline.remap(raw, listener);
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        let options = ops::ReplayOptions {
            remap: request.remap,
            dry_run: request.dry_run,
            only: only.clone(),
        };
        let result = ops::replay(admin.pipeline.store().as_ref(), &remap, id, &options).await;
        for queue in &result.queued {
            pipeline.wake(queue);
        }
        tracing::info!(
            id,
            ok = result.ok,
            dry_run = request.dry_run,
            "replay via the admin API"
        );
        results.push(result);
    }
    axum::Json(serde_json::json!({ "results": results })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    ids: Vec<u64>,
}

async fn purge<S: Store>(
    State(admin): State<Admin<S>>,
    request: Result<axum::Json<PurgeRequest>, JsonRejection>,
) -> Response {
    let request = match json_body(request) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let mut results = Vec::with_capacity(request.ids.len());
    for id in request.ids {
        let (ok, message) = match ops::purge(admin.pipeline.store().as_ref(), id).await {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        // A deletion leaves a trace: which message, and whether it went.
        tracing::info!(id, ok, outcome = %message, "purge via the admin API");
        results.push(serde_json::json!({ "id": id, "ok": ok, "message": message }));
    }
    axum::Json(serde_json::json!({ "results": results })).into_response()
}

/// A resubmission request (see the module doc).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResubmitRequest {
    original: u64,
    /// The corrected frame, base64 (standard alphabet, padded).
    frame: String,
    /// The operator's login, for the copy's record (`operator LOGIN`).
    operator: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// How long a resubmission's answer waits for the mapper (behind what the listeners
/// journaled before it); after that, the copy is left `received` for the recheck.
const RESUBMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn resubmit<S: Store>(
    State(admin): State<Admin<S>>,
    request: Result<axum::Json<ResubmitRequest>, JsonRejection>,
) -> Response {
    use base64::Engine as _;
    let request = match json_body(request) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let frame = match base64::engine::general_purpose::STANDARD.decode(request.frame.trim()) {
        Ok(frame) => frame,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("frame: not base64: {e}\n")).into_response();
        }
    };
    let resubmission = ops::Resubmission {
        original: request.original,
        frame,
        origin: ops::operator_origin(request.operator.as_deref()),
        dry_run: request.dry_run,
    };
    let pipeline = &admin.pipeline;
    let remap = |raw: &[u8], listener: &str| pipeline.remap(raw, listener);
    let store = pipeline.store().as_ref();
    let duplicates = pipeline.duplicates();
    let mut result = match ops::resubmit(store, Some(&remap), duplicates, &resubmission).await {
        Ok(result) => result,
        Err(refusal) => {
            let status = match &refusal {
                ops::ResubmitRefusal::NotFound(_) => StatusCode::NOT_FOUND,
                ops::ResubmitRefusal::BadFrame(_) => StatusCode::BAD_REQUEST,
                ops::ResubmitRefusal::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            tracing::info!(
                original = request.original,
                size = resubmission.frame.len(),
                status = status.as_u16(),
                "resubmission via the admin API refused"
            );
            return (status, format!("{refusal}\n")).into_response();
        }
    };
    if let Some(id) = result.id {
        pipeline
            .metrics()
            .resubmitted
            .fetch_add(1, Ordering::Relaxed);
        pipeline.route_journaled(id, RESUBMIT_WAIT).await;
        ops::resubmitted_outcome(store, &mut result).await;
        tracing::info!(
            original = request.original,
            id,
            state = result.state.as_deref().unwrap_or(""),
            "resubmission via the admin API"
        );
    }
    axum::Json(result).into_response()
}

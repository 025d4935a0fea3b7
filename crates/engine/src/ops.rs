//! Operations on stored messages: list, show, replay, purge. One implementation, used
//! by the admin API of a running engine and by `passerelle messages` when no engine runs,
//! so that both give the same answers in the same JSON shapes.
//!
//! - List and show return JSON documents; the CLI prints them or formats them as text.
//!   `show` is the only one that carries message content (the raw HL7 and the bundle):
//!   it is what an operator asks for, behind the admin token; lists carry ids, types,
//!   control ids, states and sizes only.
//! - Replay never changes a rejected message (the sender must fix it, or an operator
//!   resubmit a corrected copy), leaves a
//!   `received` one to the mapper, routes and maps unrouted and mapping-failed messages
//!   again, and queues the final deliveries of a mapped message again in their key's
//!   order, with a new bundle when asked to re-map. A message that stays unrouted, or
//!   whose mapping still fails, is left as it was and reported as not replayed
//!   ([`ReplayResult::replayed`]). `dry_run` says what would happen and changes nothing.
//! - Resubmit ([`resubmit`]) journals an operator's corrected copy of a message as a new
//!   message (listener [`RESUBMIT_LISTENER`], peer `operator LOGIN`), linked both ways with
//!   its original, and refuses, storing nothing, a frame that is empty, does not parse or
//!   is the original unchanged. The original is left as it was: its state, frame and
//!   deliveries stay (its dead deliveries are not replayed; `purge` stays the operator's
//!   tool), and `show`/`list` carry the link (`links` in the JSON).

use passerelle_hl7::Message;
use passerelle_hl7::types::DateTime;
use passerelle_store::{
    DeliveryState, JournalMeta, MessageId, MessageRecord, MessageState, Outcome, Query,
    ReplaySelection, Store,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::duplicates::{Duplicates, corrected_chain, earlier_copy};

/// Routes and maps a stored frame with the current configuration (raw bytes, listener).
pub type Remap<'a> = &'a (dyn Fn(&[u8], &str) -> Result<Outcome, String> + Sync);

/// The filters of a list, as text (from CLI flags, URL parameters or a JSON body). A
/// field it does not know is refused, so that a misspelt filter (`rout=adt`) is an error
/// rather than a selection of everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    /// A message state (received, rejected, unrouted, mapped, mapping_failed, duplicate) or a
    /// delivery state (pending, in_flight, retry_wait, delivered, dead).
    pub state: Option<String>,
    pub route: Option<String>,
    /// A destination queue (`route.destination`).
    pub dest: Option<String>,
    /// Received at or after this HL7 date/time (`20241122`, `202411221530+0100`).
    pub since: Option<String>,
    /// Received before this HL7 date/time.
    pub until: Option<String>,
    pub control_id: Option<String>,
    pub key: Option<String>,
    /// Page after this id (oldest first).
    pub after: Option<MessageId>,
    /// Page below this id (newest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<MessageId>,
    /// The last journaled first; the next page is `before` = the page's `next`. Left out
    /// when false, so that an older engine, which refuses fields it does not know, still
    /// takes the usual lists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub newest_first: bool,
    pub limit: Option<usize>,
}

/// The most a page holds.
pub const MAX_PAGE: usize = 1_000;

impl ListFilter {
    /// The store query, or what is wrong with a filter.
    pub fn query(&self) -> Result<Query, String> {
        let mut query = Query {
            route: self.route.clone(),
            destination: self.dest.clone(),
            control_id: self.control_id.clone(),
            ordering_key: self.key.clone(),
            after: self.after,
            before: self.before,
            newest_first: self.newest_first,
            limit: self.limit.unwrap_or(50).clamp(1, MAX_PAGE),
            ..Query::default()
        };
        if let Some(state) = &self.state {
            if let Some(s) = MessageState::ALL.iter().find(|s| s.name() == state) {
                query.state = Some(*s);
            } else if let Some(s) = DeliveryState::ALL.iter().find(|s| s.name() == state) {
                query.delivery_state = Some(*s);
            } else {
                let names = |states: &[&str]| states.join(", ");
                return Err(format!(
                    "unknown state {state:?}: a message state ({}) or a delivery state ({})",
                    names(&MessageState::ALL.map(|s| s.name())),
                    names(&DeliveryState::ALL.map(|s| s.name())),
                ));
            }
        }
        query.since_ms = self.since.as_deref().map(parse_time).transpose()?;
        query.until_ms = self.until.as_deref().map(parse_time).transpose()?;
        Ok(query)
    }

    /// Which deliveries of each message a replay by this filter queues again: only the
    /// filter's destination and delivery state when it names them (`--state dead --dest
    /// adt.fhir` replays that dead letter, not the message's other destinations).
    pub fn replay_selection(&self) -> ReplaySelection {
        ReplaySelection {
            destination: self.dest.clone(),
            state: self
                .state
                .as_deref()
                .and_then(|s| DeliveryState::ALL.into_iter().find(|d| d.name() == s)),
        }
    }

    /// Whether any filter is set (a replay by filter needs one).
    pub fn is_empty(&self) -> bool {
        let ListFilter {
            state,
            route,
            dest,
            since,
            until,
            control_id,
            key,
            after: _,
            before: _,
            newest_first: _,
            limit: _,
        } = self;
        [state, route, dest, since, until, control_id, key]
            .iter()
            .all(|f| f.is_none())
    }
}

fn parse_time(text: &str) -> Result<u64, String> {
    let t = DateTime::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    u64::try_from(t.to_unix_millis(None)).map_err(|_| format!("{text:?} is before 1970"))
}

/// A record as listed: no message content.
pub fn record_json(r: &MessageRecord) -> Value {
    json!({
        "id": r.id,
        "received_at_ms": r.received_at_ms,
        "state": r.state.name(),
        "listener": r.listener,
        "peer": r.peer,
        "size": r.size,
        "message_type": r.msh.as_ref().map(|m| format!("{}^{}", m.message_type, m.trigger_event)),
        "control_id": r.msh.as_ref().map(|m| m.control_id.clone()),
        "route": r.route,
        "error": r.error,
        "deliveries": r.deliveries.iter().map(|d| json!({"destination": d.destination, "seq": d.seq})).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({"at_ms": t.at_ms, "state": t.state, "detail": t.detail})).collect::<Vec<_>>(),
        "resubmitted_from": r.links.resubmitted_from,
        "resubmitted_as": r.links.resubmitted_as,
    })
}

/// One page: `{"items": [record…], "next": id or null}`. Each record of a mapped message
/// also says where its deliveries stand (`delivery_states`: destination and state): a
/// message stays `mapped` whether its deliveries went through or died, and an operator
/// listing dead letters must see which.
pub async fn list<S: Store>(store: &S, filter: &ListFilter) -> Result<Value, String> {
    let page = store
        .list(&filter.query()?)
        .await
        .map_err(|e| e.to_string())?;
    let mut items = Vec::with_capacity(page.items.len());
    for r in &page.items {
        let mut item = record_json(r);
        if !r.deliveries.is_empty() {
            let deliveries = store.deliveries(r.id).await.map_err(|e| e.to_string())?;
            item["delivery_states"] = deliveries
                .iter()
                .map(|d| json!({"destination": d.destination, "state": d.state.name()}))
                .collect();
        }
        items.push(item);
    }
    Ok(json!({
        "items": items,
        "next": page.next,
    }))
}

/// Every id a filter selects, oldest first (whatever the filter's order: a replay keeps
/// the journal's order), page by page.
pub async fn select_ids<S: Store>(
    store: &S,
    filter: &ListFilter,
) -> Result<Vec<MessageId>, String> {
    let mut query = filter.query()?;
    query.limit = MAX_PAGE;
    query.newest_first = false;
    let mut ids = Vec::new();
    loop {
        let page = store.list(&query).await.map_err(|e| e.to_string())?;
        ids.extend(page.items.iter().map(|r| r.id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok(ids),
        }
    }
}

/// One message in full: the record, `raw` (the HL7 text, decoded with its MSH-18
/// character set), `bundle` and `delivery_details` (each delivery's attempt history).
/// `None` when there is no such message.
pub async fn show<S: Store>(store: &S, id: MessageId) -> Result<Option<Value>, String> {
    let Some(record) = store.get(id).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let raw = store
        .raw(id)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let deliveries = store.deliveries(id).await.map_err(|e| e.to_string())?;
    let text = match Message::parse(&raw) {
        Ok(m) => m.charset().decode(&raw).into_owned(),
        Err(_) => String::from_utf8_lossy(&raw).into_owned(),
    };
    let mut doc = record_json(&record);
    doc["raw"] = json!(text);
    doc["bundle"] = record
        .bundle
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    doc["delivery_details"] = json!(
        deliveries
            .iter()
            .map(|d| json!({
                "destination": d.destination,
                "state": d.state.name(),
                "ordering_key": d.ordering_key,
                "attempts": d.attempts,
                "next_attempt_ms": d.next_attempt_ms,
                "dead_reason": d.dead_reason,
                "history": d.history.iter().map(|a| json!({
                    "at_ms": a.at_ms, "outcome": format!("{:?}", a.outcome).to_lowercase(),
                    "status": a.status, "error_class": a.error_class, "detail": a.detail,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    );
    Ok(Some(doc))
}

/// What a replay did (or would do) to one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayResult {
    pub id: MessageId,
    /// False when the message could not be replayed (`message` says why).
    pub ok: bool,
    pub message: String,
    /// The queues that got work (to wake their workers).
    #[serde(default)]
    pub queued: Vec<String>,
    /// False when the replay ran but left the message where it was, with nothing to move
    /// it on: no route takes it, or its mapping still fails (`ok` stays true: nothing went
    /// wrong in the replay itself). Replaying counts it as not replayed. Absent from the
    /// answers of engines older than this field, hence true by default.
    #[serde(default = "replayed_by_default")]
    pub replayed: bool,
}

fn replayed_by_default() -> bool {
    true
}

/// What `replay_inner` did: the text for the operator, the queues that got work, and
/// whether it moved the message on ([`ReplayResult::replayed`]).
struct Replayed {
    what: String,
    queued: Vec<String>,
    moved_on: bool,
}

impl Replayed {
    fn moved_on(what: String, queued: Vec<String>) -> Self {
        Replayed {
            what,
            queued,
            moved_on: true,
        }
    }
}

/// Replays one message. See the module doc for what each state gets.
pub async fn replay<S: Store>(
    store: &S,
    remap_with: Remap<'_>,
    id: MessageId,
    options: &ReplayOptions,
) -> ReplayResult {
    match replay_inner(store, remap_with, id, options).await {
        Ok(done) => ReplayResult {
            id,
            ok: true,
            message: done.what,
            queued: done.queued,
            replayed: done.moved_on,
        },
        Err(message) => ReplayResult {
            id,
            ok: false,
            message,
            queued: Vec::new(),
            replayed: false,
        },
    }
}

/// How a replay goes.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Map again with the current packs first.
    pub remap: bool,
    /// Say what would happen, change nothing.
    pub dry_run: bool,
    /// Which deliveries of a mapped message are queued again.
    pub only: ReplaySelection,
}

async fn replay_inner<S: Store>(
    store: &S,
    remap_with: Remap<'_>,
    id: MessageId,
    options: &ReplayOptions,
) -> Result<Replayed, String> {
    let ReplayOptions {
        remap,
        dry_run,
        only,
    } = options;
    let (remap, dry_run) = (*remap, *dry_run);
    let record = store
        .get(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no such message")?;
    let raw = || async {
        store
            .raw(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "raw bytes missing".to_owned())
    };
    let dry = if dry_run { " (dry run)" } else { "" };
    match record.state {
        MessageState::Rejected => Err(format!(
            "rejected (it does not parse): the sender must fix and resend it, or correct \
                 it with `passerelle messages resubmit {id} --edit`"
        )),
        MessageState::Received => Ok(Replayed::moved_on(
            "not yet routed; the engine routes it (at start if it is stopped)".into(),
            Vec::new(),
        )),
        // A duplicate is routed like a message no route took: the operator means it.
        MessageState::Unrouted | MessageState::MappingFailed | MessageState::Duplicate => {
            let outcome = remap_with(&raw().await?, record.routing_listener())?;
            let (what, queued) = match &outcome {
                Outcome::Unrouted | Outcome::Duplicate { .. } => {
                    ("still unrouted".to_owned(), Vec::new())
                }
                Outcome::MappingFailed { error, .. } => {
                    (format!("mapping still fails: {error}"), Vec::new())
                }
                Outcome::Mapped {
                    route, deliveries, ..
                } => (
                    format!("mapped by route {route}, queued for {}", deliveries.len()),
                    deliveries.iter().map(|d| d.destination.clone()).collect(),
                ),
            };
            let mapped = matches!(outcome, Outcome::Mapped { .. });
            if dry_run || !mapped {
                return Ok(Replayed {
                    what: format!("{what}{dry}"),
                    queued: Vec::new(),
                    moved_on: mapped,
                });
            }
            store
                .record_outcome(id, outcome)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Replayed::moved_on(what, queued))
        }
        MessageState::Mapped => {
            let bundle = if remap {
                match remap_with(&raw().await?, record.routing_listener())? {
                    Outcome::Mapped { bundle, .. } => Some(bundle),
                    Outcome::MappingFailed { error, .. } => {
                        return Err(format!("re-mapping fails: {error}"));
                    }
                    Outcome::Unrouted | Outcome::Duplicate { .. } => {
                        return Err("no route takes it any more".into());
                    }
                }
            } else {
                None
            };
            let selected: Vec<_> = store
                .deliveries(id)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|d| only.takes(&d.destination, d.state))
                .collect();
            // Later messages of the same key already there: this one, older, would arrive
            // after them (a patient's record moved back). Said, so the operator can choose.
            let mut overtaken = Vec::new();
            for d in &selected {
                let later = store
                    .list(&Query {
                        ordering_key: Some(d.ordering_key.clone()),
                        destination: Some(d.destination.clone()),
                        delivery_state: Some(DeliveryState::Delivered),
                        after: Some(id),
                        limit: 1,
                        ..Query::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                if !later.items.is_empty() {
                    overtaken.push(d.destination.clone());
                }
            }
            let warning = if overtaken.is_empty() {
                String::new()
            } else {
                format!(
                    "; careful: later messages of its ordering key were delivered to {} already, \
                     and this older one will arrive after them",
                    overtaken.join(", ")
                )
            };
            let finals: Vec<String> = selected.into_iter().map(|d| d.destination).collect();
            if finals.is_empty() {
                return Err(if *only == ReplaySelection::default() {
                    "none of its deliveries is finished (delivered or dead): nothing to replay"
                        .into()
                } else {
                    "none of its finished deliveries matches the destination and state asked".into()
                });
            }
            let remapped = if remap { ", re-mapped" } else { "" };
            if dry_run {
                return Ok(Replayed::moved_on(
                    format!(
                        "{} deliveries would be queued again{remapped}{dry}{warning}",
                        finals.len()
                    ),
                    Vec::new(),
                ));
            }
            let n = store
                .replay(id, bundle, only)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Replayed::moved_on(
                format!("{n} deliveries queued again{remapped}{warning}"),
                finals,
            ))
        }
    }
}

/// Deletes a message whose deliveries are all final.
pub async fn purge<S: Store>(store: &S, id: MessageId) -> Result<String, String> {
    match store.purge(id).await {
        Ok(true) => Ok("purged".to_owned()),
        Ok(false) => Err("no such message".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The listener name an operator's resubmission is journaled under (its record's
/// `listener`); it is routed as its original's listener ([`passerelle_store::Links`]).
pub const RESUBMIT_LISTENER: &str = "resubmit";

/// The record's `peer` for a resubmission by `login` (`$USER` of the operator's shell, when
/// set): who did it, never where from. A login is not patient data; anything but a short
/// plain name is left out.
pub fn operator_origin(login: Option<&str>) -> String {
    match login.map(str::trim) {
        Some(login)
            if !login.is_empty()
                && login.len() <= 64
                && login
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')) =>
        {
            format!("operator {login}")
        }
        _ => "operator".to_owned(),
    }
}

/// An operator's resubmission: a corrected copy of message `original`.
#[derive(Debug, Clone)]
pub struct Resubmission {
    pub original: MessageId,
    /// The corrected frame, segments separated by CR.
    pub frame: Vec<u8>,
    /// The record's `peer` ([`operator_origin`]).
    pub origin: String,
    /// Say what would happen, journal nothing.
    pub dry_run: bool,
}

/// What a resubmission did, or would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResubmitResult {
    pub original: MessageId,
    /// The new message; `None` for a dry run.
    pub id: Option<MessageId>,
    /// The new message's state when the answer was made (`received` when it is left for
    /// the engine to route).
    pub state: Option<String>,
    /// False when the copy did not get on its way (no route takes it, its mapping fails,
    /// it is a duplicate), or would not, for a dry run that could route and map it.
    pub ok: bool,
    pub message: String,
    /// What the operator should know besides: the original's dead deliveries, which stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Why a resubmission was refused: nothing was journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResubmitRefusal {
    /// No message `original`.
    NotFound(MessageId),
    /// The new frame is empty, does not parse, or is the original unchanged.
    BadFrame(String),
    /// The store failed.
    Store(String),
}

impl std::fmt::Display for ResubmitRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResubmitRefusal::NotFound(id) => write!(f, "no message {id}"),
            ResubmitRefusal::BadFrame(why) | ResubmitRefusal::Store(why) => f.write_str(why),
        }
    }
}

/// Checks a corrected frame and, unless it is a dry run, journals it as a copy of its
/// original, linked both ways ([`Store::resubmit`]). The copy is then `received`: the caller
/// routes it (a running engine, [`crate::pipeline::Pipeline::route_journaled`]) or leaves
/// it to the engine's next start. A dry run tells what the engine would do with it: a
/// duplicate of an earlier message (the engine's check, with `duplicates`, the engine's
/// setting, and the same exemption for the messages it corrects), or else its routing and
/// mapping with `remap_with` when given. Refused, with nothing stored: an empty frame, one
/// that does not parse (with the parser's located error), the original's own bytes (that
/// is a replay), an original that does not exist. Logs ids and sizes, never the frame.
pub async fn resubmit<S: Store>(
    store: &S,
    remap_with: Option<Remap<'_>>,
    duplicates: &Duplicates,
    request: &Resubmission,
) -> Result<ResubmitResult, ResubmitRefusal> {
    let Resubmission {
        original,
        frame,
        origin,
        dry_run,
    } = request;
    let original = *original;
    if frame.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ResubmitRefusal::BadFrame(
            "the new message is empty: nothing resubmitted".into(),
        ));
    }
    let message = Message::parse(frame).map_err(|e| {
        ResubmitRefusal::BadFrame(format!(
            "the new message does not parse, nothing was stored: {e}"
        ))
    })?;
    let header = passerelle_hl7::HeaderSummary::of(&message);
    let store_error = |e: passerelle_store::StoreError| ResubmitRefusal::Store(e.to_string());
    let before = store
        .get(original)
        .await
        .map_err(store_error)?
        .ok_or(ResubmitRefusal::NotFound(original))?;
    if store.raw(original).await.map_err(store_error)?.as_deref() == Some(frame.as_slice()) {
        return Err(ResubmitRefusal::BadFrame(format!(
            "the new message is message {original} unchanged: replay it instead \
             (passerelle messages replay {original} --remap)"
        )));
    }
    // The original's dead deliveries stay dead; one that holds its ordering key
    // (`dead_holds_key`) holds the copy too, which has the same key: said, not changed.
    let dead: Vec<String> = store
        .deliveries(original)
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|d| d.state == DeliveryState::Dead)
        .map(|d| d.destination)
        .collect();
    let warning = (!dead.is_empty()).then(|| {
        format!(
            "message {original}'s dead deliveries ({}) stay dead: where a destination holds \
             its key behind a dead delivery (dead_holds_key), the copy waits until message \
             {original} is purged",
            dead.join(", ")
        )
    });
    if *dry_run {
        // What the engine checks first, before routing: is the copy a sender's earlier
        // message (journaled before it, on its way), other than those it corrects?
        let corrects = corrected_chain(store, Some(original)).await;
        let earlier = earlier_copy(
            store,
            duplicates,
            MessageId::MAX,
            crate::now_ms(),
            &header,
            frame,
            &corrects,
        )
        .await
        .map_err(store_error)?;
        if let Some(of) = earlier {
            return Ok(ResubmitResult {
                original,
                id: None,
                state: None,
                ok: false,
                warning,
                message: format!(
                    "would be journaled as a new {} message, resubmitted from {original}, and \
                     kept as a duplicate of message {of} (the same message, already on its \
                     way), not routed (dry run)",
                    header.kind()
                ),
            });
        }
        let (ok, would) = match remap_with {
            None => (true, String::new()),
            Some(remap) => {
                let (ok, what) = match remap(frame, before.routing_listener())
                    .map_err(ResubmitRefusal::BadFrame)?
                {
                    Outcome::Mapped {
                        route, deliveries, ..
                    } => (
                        true,
                        format!(
                            "mapped by route {route}, queued for {}",
                            destinations(deliveries.iter().map(|d| d.destination.as_str()))
                        ),
                    ),
                    Outcome::MappingFailed { error, .. } => {
                        (false, format!("its mapping fails: {error}"))
                    }
                    Outcome::Unrouted | Outcome::Duplicate { .. } => {
                        (false, "no route takes it".to_owned())
                    }
                };
                (ok, format!("; with the current configuration: {what}"))
            }
        };
        return Ok(ResubmitResult {
            original,
            id: None,
            state: None,
            ok,
            warning,
            message: format!(
                "would be journaled as a new {} message, resubmitted from {original}{would} (dry run)",
                header.kind()
            ),
        });
    }
    let meta = JournalMeta {
        listener: RESUBMIT_LISTENER.to_owned(),
        peer: origin.clone(),
        msh: Some(crate::pipeline::msh_summary(&header)),
        rejected: None,
    };
    let id = store
        .resubmit(original, frame, meta)
        .await
        .map_err(|e| match e {
            passerelle_store::StoreError::NotFound(id) => ResubmitRefusal::NotFound(id),
            e => store_error(e),
        })?;
    tracing::info!(
        original,
        id,
        size = frame.len(),
        kind = %header.kind(),
        control_id = %header.control_id,
        "resubmitted by an operator"
    );
    Ok(ResubmitResult {
        original,
        id: Some(id),
        state: Some(MessageState::Received.name().to_owned()),
        ok: true,
        message: format!("journaled as message {id}, resubmitted from {original}"),
        warning,
    })
}

/// Completes a resubmission's answer with where its copy stands now (once a running
/// engine routed it, or not).
pub async fn resubmitted_outcome<S: Store>(store: &S, result: &mut ResubmitResult) {
    let Some(id) = result.id else {
        return;
    };
    let record = match store.get(id).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            result
                .message
                .push_str(&format!("; its state cannot be read: {e}"));
            return;
        }
    };
    result.state = Some(record.state.name().to_owned());
    let (ok, what) = match record.state {
        MessageState::Mapped => (
            true,
            format!(
                "mapped by route {}, queued for {}",
                record.route.as_deref().unwrap_or("?"),
                destinations(record.deliveries.iter().map(|d| d.destination.as_str()))
            ),
        ),
        MessageState::MappingFailed => (
            false,
            format!(
                "its mapping fails: {} (fix it and resubmit {id})",
                record.error.as_deref().unwrap_or("?")
            ),
        ),
        MessageState::Unrouted => (false, "no route takes it".to_owned()),
        MessageState::Duplicate => (
            false,
            record
                .history
                .last()
                .map(|t| t.detail.clone())
                .unwrap_or_else(|| "a duplicate".to_owned()),
        ),
        MessageState::Received => (
            true,
            "not routed yet: the engine routes it (at its next start if it is stopped)".to_owned(),
        ),
        MessageState::Rejected => (false, "rejected".to_owned()),
    };
    result.ok = ok;
    result.message.push_str(&format!("; {what}"));
}

fn destinations<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "no destination".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_is_named_by_a_plain_login_only() {
        assert_eq!(operator_origin(Some("alice")), "operator alice");
        assert_eq!(
            operator_origin(Some(" j.doe-2@chu ")),
            "operator j.doe-2@chu"
        );
        for odd in [
            None,
            Some(""),
            Some("  "),
            Some("a b"),
            Some("x\u{1b}[31m"),
            Some(&*"a".repeat(65)),
        ] {
            assert_eq!(operator_origin(odd), "operator", "{odd:?}");
        }
    }
}

//! The records the store keeps, and the questions it answers.

use serde::{Deserialize, Serialize};

/// A message's id: monotonic in journal order (not contiguous).
pub type MessageId = u64;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The MSH fields kept with each message, for routing and operations. No patient data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MshSummary {
    pub message_type: String,
    pub trigger_event: String,
    pub control_id: String,
    pub sending_application: String,
    pub sending_facility: String,
    pub version: String,
}

/// What the listener knows when it journals a frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalMeta {
    /// The listener's name.
    pub listener: String,
    /// The sender's address.
    pub peer: String,
    /// The MSH summary, when the header could be read.
    pub msh: Option<MshSummary>,
    /// The parse error, for a frame that is journaled as `rejected`.
    pub rejected: Option<String>,
}

/// Where a message stands before delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Journaled; not yet routed and mapped (redone on restart).
    Received,
    /// The frame did not parse; kept for inspection.
    Rejected,
    /// No route wanted it.
    Unrouted,
    /// Mapped; its deliveries are queued per destination.
    Mapped,
    /// Mapping failed; kept for inspection and replay with `--remap`.
    MappingFailed,
    /// The same message as an earlier one (a sender's resend after a lost or late ACK):
    /// kept, acknowledged, not routed; a replay routes it all the same.
    Duplicate,
}

impl MessageState {
    pub const ALL: [MessageState; 6] = [
        MessageState::Received,
        MessageState::Rejected,
        MessageState::Unrouted,
        MessageState::Mapped,
        MessageState::MappingFailed,
        MessageState::Duplicate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MessageState::Received => "received",
            MessageState::Rejected => "rejected",
            MessageState::Unrouted => "unrouted",
            MessageState::Mapped => "mapped",
            MessageState::MappingFailed => "mapping_failed",
            MessageState::Duplicate => "duplicate",
        }
    }
}

/// Where one delivery (a message to one destination) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Queued behind earlier messages with the same ordering key, or ready.
    Pending,
    /// Leased to a delivery worker until its lease expires.
    InFlight,
    /// Failed transiently; ready again at `next_attempt_ms`.
    RetryWait,
    Delivered,
    /// Gave up: a permanent failure, or retries exhausted. Kept with its history.
    Dead,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Pending,
        DeliveryState::InFlight,
        DeliveryState::RetryWait,
        DeliveryState::Delivered,
        DeliveryState::Dead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::InFlight => "in_flight",
            DeliveryState::RetryWait => "retry_wait",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// Delivered and dead deliveries are final: they no longer hold their key.
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryState::Delivered | DeliveryState::Dead)
    }
}

/// A state change of a message, with its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: Millis,
    pub state: String,
    /// Why, in words without patient data.
    pub detail: String,
}

/// The stored message (its raw bytes are kept beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub received_at_ms: Millis,
    pub listener: String,
    pub peer: String,
    pub size: u64,
    pub msh: Option<MshSummary>,
    pub route: Option<String>,
    pub state: MessageState,
    /// The parse or mapping error (no patient data).
    pub error: Option<String>,
    /// The FHIR bundle, once mapped.
    pub bundle: Option<String>,
    /// The ordering keys and destinations it was queued for.
    pub deliveries: Vec<DeliveryRef>,
    pub history: Vec<Transition>,
    /// Its links to other messages by an operator's resubmission (none for most messages;
    /// absent from records written before resubmission existed).
    #[serde(default, skip_serializing_if = "Links::is_empty")]
    pub links: Links,
}

/// How an operator's resubmission ([`crate::Store::resubmit`]) links two messages: the
/// original (kept as it was, in its state) and a corrected copy of it, journaled as a new
/// message. The link is both ways, so that either message leads to the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Links {
    /// This message is an operator's corrected copy of that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resubmitted_from: Option<MessageId>,
    /// The listener the first message of the chain arrived on: a corrected copy is routed
    /// as if it had arrived there (a route may take some listeners only), while its record's
    /// `listener` says where it came from (`resubmit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_listener: Option<String>,
    /// This message's corrected copies, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resubmitted_as: Vec<MessageId>,
}

impl Links {
    pub fn is_empty(&self) -> bool {
        self == &Links::default()
    }

    /// The listener a message is routed as: the original's for a corrected copy.
    pub fn routing_listener<'a>(&'a self, listener: &'a str) -> &'a str {
        self.original_listener.as_deref().unwrap_or(listener)
    }
}

impl MessageRecord {
    /// The listener this message is routed as, wherever it is routed (the pipeline, a
    /// replay, a dry run): where it arrived, or for an operator's corrected copy, where
    /// its original arrived ([`Links::routing_listener`]).
    pub fn routing_listener(&self) -> &str {
        self.links.routing_listener(&self.listener)
    }
}

/// Which queue entry carries a message to a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRef {
    pub destination: String,
    pub seq: u64,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    /// Network error, 5xx, 408, 429…: try again later.
    Transient,
    /// Another 4xx, a refused ACK…: trying again will not help.
    Permanent,
}

/// One delivery attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: Millis,
    pub outcome: AttemptOutcome,
    /// HTTP status or similar, when there was one.
    pub status: Option<u16>,
    /// A short class: `timeout`, `connect`, `http_5xx`, `operation_outcome`…
    pub error_class: String,
    /// A short excerpt (an OperationOutcome's diagnostics, say), with no patient data.
    pub detail: String,
}

/// The result a delivery worker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    pub outcome: AttemptOutcome,
    pub status: Option<u16>,
    pub error_class: String,
    pub detail: String,
    /// A server's Retry-After, which overrides the backoff when longer.
    pub retry_after_ms: Option<u64>,
}

impl AttemptReport {
    pub fn delivered() -> Self {
        AttemptReport {
            outcome: AttemptOutcome::Delivered,
            status: None,
            error_class: String::new(),
            detail: String::new(),
            retry_after_ms: None,
        }
    }

    pub fn transient(class: &str) -> Self {
        AttemptReport {
            outcome: AttemptOutcome::Transient,
            error_class: class.to_owned(),
            ..Self::delivered()
        }
    }

    pub fn permanent(class: &str) -> Self {
        AttemptReport {
            outcome: AttemptOutcome::Permanent,
            error_class: class.to_owned(),
            ..Self::delivered()
        }
    }
}

/// A queue entry: one message for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub destination: String,
    /// Position in the destination's queue (monotonic).
    pub seq: u64,
    pub message_id: MessageId,
    pub ordering_key: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub enqueued_at_ms: Millis,
    pub next_attempt_ms: Millis,
    pub lease_until_ms: Millis,
    pub dead_reason: Option<String>,
    pub history: Vec<Attempt>,
}

/// What a delivery worker holds while it delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub destination: String,
    pub seq: u64,
    pub message_id: MessageId,
    pub ordering_key: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub lease_until_ms: Millis,
}

/// Where a message should go once mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueue {
    pub destination: String,
    pub ordering_key: String,
}

/// The outcome of routing and mapping a journaled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unrouted,
    /// The same message as the earlier message `of`: not routed.
    Duplicate {
        of: MessageId,
    },
    MappingFailed {
        route: String,
        error: String,
    },
    Mapped {
        route: String,
        bundle: String,
        deliveries: Vec<Enqueue>,
    },
}

/// Exponential backoff with jitter, bounded by attempts and/or age.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// 0 = none; 0.2 = each delay drawn within ±20 %.
    pub jitter: f64,
    /// Attempts in all (the first included); `None` = no limit.
    pub max_attempts: Option<u32>,
    /// Give up this long after the message was queued; `None` = no limit.
    pub max_age_ms: Option<u64>,
    /// Once dead, the delivery keeps holding its ordering key: the key's later deliveries
    /// wait until it is replayed (it then goes first) or purged. Otherwise (the default,
    /// unless the store is opened with `dead_letter_releases_key` off) they go on.
    pub dead_holds_key: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff_ms: 1_000,
            max_backoff_ms: 5 * 60_000,
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: Some(20),
            max_age_ms: Some(24 * 3_600_000),
            dead_holds_key: false,
        }
    }
}

/// Which final deliveries of a message a replay queues again: by default every one,
/// delivered or dead. An operator replaying the dead letter of one destination must not
/// send the message again to the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySelection {
    /// Only this destination's delivery (`None`: every destination's).
    pub destination: Option<String>,
    /// Only deliveries in this state (`None`: delivered and dead).
    pub state: Option<DeliveryState>,
}

impl ReplaySelection {
    /// Whether a final delivery to `destination`, now in `state`, is replayed.
    pub fn takes(&self, destination: &str, state: DeliveryState) -> bool {
        state.is_final()
            && self.destination.as_deref().is_none_or(|d| d == destination)
            && self.state.is_none_or(|s| s == state)
    }
}

/// A filter for the operations queries. Every field narrows; `None` means any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub state: Option<MessageState>,
    pub delivery_state: Option<DeliveryState>,
    pub route: Option<String>,
    pub destination: Option<String>,
    pub since_ms: Option<Millis>,
    pub until_ms: Option<Millis>,
    pub control_id: Option<String>,
    pub ordering_key: Option<String>,
    /// Only ids above this one (exclusive). Pages go by increasing id: the next page is
    /// `after` = [`Page::next`].
    pub after: Option<MessageId>,
    /// Only ids below this one (exclusive): messages journaled before it.
    pub before: Option<MessageId>,
    /// Pages go by decreasing id, the last journaled first: the next page is `before` =
    /// [`Page::next`].
    pub newest_first: bool,
    pub limit: usize,
}

/// One page of results, and the cursor for the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<MessageRecord>,
    pub next: Option<MessageId>,
}

/// Counts kept as counters (reading them scans nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages per state.
    pub messages: std::collections::BTreeMap<String, u64>,
    /// Deliveries per (destination, state).
    pub deliveries: std::collections::BTreeMap<(String, String), u64>,
    /// Records found corrupted and moved to quarantine.
    pub quarantined: u64,
}

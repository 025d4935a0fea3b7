//! # passerelle-store: the durable journal and the per-destination queues
//!
//! This crate keeps passerelle's promise: **a message it acknowledged is never lost, and
//! never overtaken by a later message with the same ordering key.**
//!
//! ## Contract (the [`Store`] trait)
//!
//! - [`Store::journal`] returns only once the frame is durable. Concurrent callers share one
//!   flush (group commit, see [`GroupCommitConfig`]); ids are monotonic in journal order.
//!   The listener sends its ACK after `journal` returns, never before.
//! - Every frame ends in a state an operator can list: `received` (to be routed; the
//!   engine routes what [`Store::unprocessed`] lists at start and, while it runs, what
//!   stays there too long), `rejected`, `unrouted`, `mapping_failed`, or
//!   `mapped` with one delivery per destination: `pending`, `in_flight`, `retry_wait`,
//!   `delivered` or `dead`. Every transition is recorded with its time.
//! - **Order per key.** Within a destination, deliveries with the same ordering key are
//!   leased one at a time, oldest first; the next one becomes ready only when the previous
//!   one is final (delivered or dead). Different keys go in parallel.
//! - Leases expire ([`StoreConfig::visibility_timeout`]); on open, every in-flight lease
//!   returns to ready. Delivery is therefore at least once; the mapping's deterministic ids
//!   and conditional requests make a repeat harmless downstream.
//! - Transient failures wait with exponential backoff and jitter ([`RetryPolicy`]) until
//!   attempts or age run out; then, as for permanent failures, the delivery is dead, with
//!   its whole attempt history, until replayed.
//! - An operator's corrected copy of a message ([`Store::resubmit`]) is journaled like a
//!   frame, as a new message, and linked both ways with its original ([`Links`]) in the
//!   same change; the original keeps its state, frame and deliveries.
//! - Counts per state are counters updated in the same transaction as the state change:
//!   reading them scans nothing.
//!
//! Two backends keep this contract and pass the same contract tests: [`SledStore`],
//! embedded (one node, the default), and [`PgStore`], on a PostgreSQL database that several
//! nodes share (scale-out).
//!
//! ## The PostgreSQL backend ([`PgStore`])
//!
//! Tables `passerelle_messages`, `passerelle_frames`, `passerelle_deliveries` and
//! `passerelle_counters` (schema in `src/pg_schema.sql`, version 1, created on open). In
//! short (the `pg_store` module's documentation has the details and the reasons):
//!
//! - **durability** is a committed transaction: `journal` returns after `COMMIT`, durable
//!   when the server runs with `synchronous_commit` on (the default; checked at open);
//! - **several nodes** lease with `FOR UPDATE SKIP LOCKED` on the key heads, and serialise
//!   every change of a key's head under a transaction-level advisory lock per (destination,
//!   ordering key): no delivery is leased twice, no key has two deliveries in flight,
//!   whichever node leases;
//! - a node that is gone (its session ended) has its leases returned on the next open;
//!   otherwise leases expire after the visibility timeout, as with sled;
//! - **an unreachable database** makes every call fail within `op_timeout` (the listener
//!   then answers AE, and the sender keeps the message), never hang;
//! - counters are sharded rows updated in each transaction and summed on read;
//! - TLS to the server with rustls ([`PgTls`], libpq's `sslmode` names; `verify-full`
//!   checks the certificate and the host name);
//! - a delivery one node makes ready wakes the idle workers of every node at once
//!   (LISTEN/NOTIFY, [`Store::work_signal`]); their poll covers a lost notification.
//!
//! ## The sled backend ([`SledStore`])
//!
//! Layout: one sled tree, `data`, holds every record under a one-byte key prefix (a key
//! space); integers in keys are big-endian so that they sort. `meta` holds the schema
//! version and `quarantine` the damaged values.
//!
//! | space | key (after the prefix)                | value                        |
//! |-------|---------------------------------------|------------------------------|
//! | `m`   | id                                    | [`MessageRecord`] (JSON)     |
//! | `p`   | id                                    | the frame, then the bundle   |
//! | `r`   | id                                    | a frame alone (older stores) |
//! | `d`   | destination, 0, seq                   | [`Delivery`] (JSON)          |
//! | `k`   | destination, 0, key length, key, seq  | (empty): unfinished, by key  |
//! | `q`   | destination, 0, due time, seq         | (empty): heads ready to go   |
//! | `f`   | destination, 0, lease end, seq        | (empty): leases              |
//! | `c`   | counter name                          | u64                          |
//! | `i`   | `c` control id / `k` key, 0, id       | (empty): look-up indexes     |
//!
//! Every value ends with a CRC-32. A value that fails its check is moved to `quarantine`,
//! counted and reported; the rest of the store stays readable. A change that touches
//! several records (counters included) is committed whole into an in-memory overlay that
//! every read consults before sled; a background applier hands the overlay to sled every
//! 10 ms as one generation: written to the journal's log and synced first, then given to
//! sled key by key (a sled batch would stop every read of the tree while it is applied).
//! A crash in the middle leaves the log able to give the generation again whole, so the
//! store reopens with whole changes only (see the `space` module for why: one sled batch
//! per change cost 37 to 42 % of the engine's CPU, one per generation stalled every
//! reader). Writers hold a lock while they read and commit (a few in-memory B-tree
//! operations), never across a flush.
//!
//! **Durability, honestly.** `journal` appends the frame and its record to the journal's
//! write-ahead log (`journal-wal/` in the store's folder, see the `wal` module) and returns
//! after group commit has `fdatasync`ed it: an acknowledged frame survives a crash of
//! passerelle (`kill -9`, panic, OOM kill), of the kernel, and a power loss on a disk that
//! honours cache flushes. The rest of the store (routing outcomes, delivery states)
//! reaches the same log in generations, synced, about every 10 ms, and sled after that.
//! On Linux sled 0.34 writes its own log out with `sync_file_range`, not `fsync` (sled
//! issues #1351, #1452), so the journal's log is what recovery trusts: its segments are
//! deleted only at a checkpoint, once sled has been flushed and its file `fsync`ed. A
//! `kill -9` or a power loss can take back the changes of the last 10 ms or so, never
//! part of one: a message then routes again or a delivery goes out again (at least
//! once), but none is lost. On open, the log is applied again, in order, before anything
//! else.
//! The crash test in `tests/crash.rs` proves the `kill -9` claim and counts the records
//! the log gave back; a power loss cannot be proven from a test.
//!
//! **Memory, honestly.** Nothing here keeps a queue in memory (the overlay holds the
//! changes of the last 10 ms or so, about 1 MiB at most before it is applied early), and
//! sled keeps the pages it caches within [`StoreConfig::cache_capacity`]. But sled 0.34 also keeps, for every page
//! of its tree (a leaf holds at most 16 keys, about 9 when keys arrive in order), an entry
//! in its page table and its segment accounting, in memory whether the page is cached or
//! not. A pending message has six keys (record, frame, control-id index, delivery, key
//! queue entry, ordering-key index), so resident memory grows by about 200 bytes per
//! stored message: measured, about 190 MiB of live heap for 1 M pending messages after a
//! cold reopen (empty cache). It grows with the number of messages kept, not with their size.
//! A process that runs the store should use [`Allocator`]: with glibc's malloc, freed
//! memory kept in per-thread arenas was as large again as the live heap.

mod codec;
mod commit;
pub mod contract;
mod pg_listen;
mod pg_store;
mod pg_tls;
mod retry;
mod sled_store;
mod space;
mod types;
mod wal;

use std::future::Future;

pub use commit::GroupCommitConfig;
pub use pg_listen::LISTENER_APPLICATION;
pub use pg_store::{COUNTER_SHARDS, PgConfig, PgStore};
pub use pg_tls::{PgTls, PgTlsError, PgTlsMode};
pub use sled_store::{Clock, ManualClock, SledStore, StoreConfig, SystemClock};
/// The memory allocator for a process that runs a [`SledStore`]: jemalloc. Install it in the
/// binary with one line:
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: passerelle_store::Allocator = passerelle_store::Allocator;
/// # fn main() {
/// #     let v = vec![1u8; 64]; // allocated by jemalloc
/// #     assert_eq!(v.len(), 64);
/// # }
/// ```
///
/// The `passerelle` binary does (`crates/cli/src/main.rs`).
///
/// Why: sled clones a B-tree node at every update, so a busy store frees and reallocates
/// many small blocks from several threads. glibc's malloc keeps much of that freed memory
/// in its per-thread arenas: with 1 M pending messages the bench measured 239 MiB live
/// heap for 468 MiB resident; with jemalloc, 254 MiB for 311 MiB (`benches/RESULTS.md`).
pub use tikv_jemallocator::Jemalloc as Allocator;
pub use types::*;

/// Why a store operation failed. Messages name ids, trees and states, never content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error(
        "the store at {path} has schema version {found}; this passerelle reads version {expected}"
    )]
    Schema {
        path: String,
        found: String,
        expected: String,
    },
    #[error("record {key} in {tree} is corrupted; it was moved to quarantine")]
    Corrupt { tree: &'static str, key: String },
    /// The sled store is locked by another process: sled allows one at a time.
    #[error("another process has it open (a passerelle engine running on it?)")]
    InUse,
    #[error("message {0} not found")]
    NotFound(MessageId),
    #[error("message {id} is {state}; {action} needs {needed}")]
    WrongState {
        id: MessageId,
        state: &'static str,
        action: &'static str,
        needed: &'static str,
    },
    #[error("the lease on {destination}#{seq} was lost (expired and given to another worker)")]
    LeaseLost { destination: String, seq: u64 },
    #[error("invalid destination name {0:?}")]
    InvalidDestination(String),
    /// PostgreSQL failed or could not be reached (SQLSTATE and message, never row values).
    #[error("database error: {0}")]
    Database(String),
    /// The PostgreSQL store's TLS settings cannot be used (a bad mode, a CA file, client
    /// certificate or key that does not read).
    #[error("TLS to the database: {0}")]
    Tls(PgTlsError),
    /// A row the PostgreSQL store cannot read back (an unknown state, JSON that does not
    /// decode…). The row stays as it is, for an operator to look at.
    #[error("row {key} in {table} cannot be read: {problem}")]
    BadRow {
        table: &'static str,
        key: String,
        problem: String,
    },
}

/// A destination name as both backends keep it: not empty, without NUL (sled's key
/// separator; PostgreSQL's text cannot hold it) and without `/` (counter names use it).
pub(crate) fn validate_destination(destination: &str) -> Result<(), StoreError> {
    if destination.is_empty() || destination.contains('\0') || destination.contains('/') {
        return Err(StoreError::InvalidDestination(destination.to_owned()));
    }
    Ok(())
}

/// The first transition detail of an operator's corrected copy of message `original`,
/// with the parse error of a copy journaled as rejected (`detail`, empty otherwise).
pub(crate) fn resubmitted_from_detail(original: MessageId, detail: &str) -> String {
    if detail.is_empty() {
        format!("resubmitted from message {original}")
    } else {
        format!("resubmitted from message {original}; {detail}")
    }
}

/// The links of an operator's corrected copy of message `original`, which is routed as
/// `original_listener` (the original's own routing listener).
pub(crate) fn copy_links(original: MessageId, original_listener: &str) -> Links {
    Links {
        resubmitted_from: Some(original),
        original_listener: Some(original_listener.to_owned()),
        resubmitted_as: Vec::new(),
    }
}

/// The transition state and detail an original gets when its corrected copy `copy` is
/// journaled: the time and the new id, no content.
pub(crate) fn resubmitted_as_transition(at_ms: Millis, copy: MessageId) -> Transition {
    Transition {
        at_ms,
        state: "resubmitted".to_owned(),
        detail: format!("resubmitted as message {copy}"),
    }
}

/// The transition detail of a message recorded as a duplicate of `of`.
pub(crate) fn duplicate_detail(of: MessageId) -> String {
    format!("the same message as #{of}: not routed (replay it to route it)")
}

/// Whether a routing outcome may be recorded for a message in `state`: only while it is
/// not routed yet, or was left unrouted, unmapped or as a duplicate (to route it again).
pub(crate) fn check_routable(id: MessageId, state: MessageState) -> Result<(), StoreError> {
    match state {
        MessageState::Received
        | MessageState::Unrouted
        | MessageState::MappingFailed
        | MessageState::Duplicate => Ok(()),
        _ => Err(StoreError::WrongState {
            id,
            state: state.name(),
            action: "recording a routing outcome",
            needed: "received, unrouted, mapping_failed or duplicate",
        }),
    }
}

/// The deliveries of one routing outcome: valid destinations, each named once.
pub(crate) fn validate_deliveries(deliveries: &[Enqueue]) -> Result<(), StoreError> {
    for (i, e) in deliveries.iter().enumerate() {
        validate_destination(&e.destination)?;
        if deliveries[..i]
            .iter()
            .any(|o| o.destination == e.destination)
        {
            return Err(StoreError::InvalidDestination(format!(
                "{} (twice)",
                e.destination
            )));
        }
    }
    Ok(())
}

/// A subscription to one destination's "work may have become ready elsewhere" signal
/// ([`Store::work_signal`]). A signal raised while no one waits is kept for the next
/// [`changed`](WorkSignal::changed), so a worker that subscribes once, before its first
/// lease, misses none between a lease that found nothing and its wait.
#[derive(Debug)]
pub struct WorkSignal {
    rx: Option<tokio::sync::watch::Receiver<u64>>,
}

impl WorkSignal {
    /// A signal that never fires: for a store no other process writes to.
    pub fn never() -> WorkSignal {
        WorkSignal { rx: None }
    }

    pub(crate) fn from_watch(rx: tokio::sync::watch::Receiver<u64>) -> WorkSignal {
        WorkSignal { rx: Some(rx) }
    }

    /// Returns once a signal came since the last return (or since subscribing); never for
    /// [`WorkSignal::never`] or once the store is gone. Cancel-safe: use it in `select!`.
    pub async fn changed(&mut self) {
        match &mut self.rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// The store the engine uses. Both backends ([`SledStore`], [`PgStore`]) implement it and
/// pass the same contract tests ([`contract`]).
pub trait Store: Send + Sync + 'static {
    /// Stores a received frame and returns once it is durable.
    fn journal(
        &self,
        frame: &[u8],
        meta: JournalMeta,
    ) -> impl Future<Output = Result<MessageId, StoreError>> + Send;

    /// Journals `frame` as an operator's corrected copy of message `original`, and returns
    /// once the copy and the link are durable (as [`Store::journal`] does). The copy is a
    /// new message, `received` (or `rejected` when `meta` says so), with "resubmitted from
    /// message ORIGINAL" in its history and, in its [`Links`], the original's id and the
    /// listener the chain's first message arrived on. The original keeps its state, its
    /// frame and its deliveries; it gets a `resubmitted` transition ("resubmitted as
    /// message NEW") and the copy's id in its links. Both records change together (one
    /// transaction; for sled, one batch, and a copy recovered from the journal log gets
    /// its link back on the original). [`StoreError::NotFound`] when there is no message
    /// `original`: nothing is journaled then.
    fn resubmit(
        &self,
        original: MessageId,
        frame: &[u8],
        meta: JournalMeta,
    ) -> impl Future<Output = Result<MessageId, StoreError>> + Send;

    /// Records what routing and mapping made of a `received` (or `unrouted`,
    /// `mapping_failed`) message, queueing its deliveries. Durable at the next flush; a
    /// message still `received` after a crash is routed again ([`Store::unprocessed`]).
    fn record_outcome(
        &self,
        id: MessageId,
        outcome: Outcome,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Messages still `received`, oldest first: to route and map on start.
    fn unprocessed(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<MessageId>, StoreError>> + Send;

    /// Leases up to `max` ready deliveries of `destination`, at most one per ordering key.
    fn lease(
        &self,
        destination: &str,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Lease>, StoreError>> + Send;

    /// Records an attempt and moves the delivery on: delivered, retry-wait or dead.
    fn complete(
        &self,
        lease: &Lease,
        report: AttemptReport,
        policy: &RetryPolicy,
    ) -> impl Future<Output = Result<DeliveryState, StoreError>> + Send;

    /// Returns expired leases to ready. Returns how many.
    fn requeue_expired(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// When the next delivery of `destination` is due (`None`: nothing is waiting).
    fn next_due_ms(
        &self,
        destination: &str,
    ) -> impl Future<Output = Result<Option<Millis>, StoreError>> + Send;

    /// When the oldest unfinished (pending, in-flight or retry-wait) delivery of
    /// `destination` entered its queue (`None`: the queue is empty). For a queue-age
    /// metric and alert, so it must be cheap to call at every scrape.
    fn oldest_unfinished_ms(
        &self,
        destination: &str,
    ) -> impl Future<Output = Result<Option<Millis>, StoreError>> + Send;

    /// Bytes the store takes on disk (for a metric and a disk-full alert).
    fn disk_bytes(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Queues again the final (dead or delivered) deliveries of a message that `only`
    /// selects, in their original place in their key's order, with a new bundle when
    /// re-mapped. Returns how many deliveries were re-queued.
    fn replay(
        &self,
        id: MessageId,
        bundle: Option<String>,
        only: &ReplaySelection,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Deletes a message whose deliveries are all final. Returns whether it existed.
    fn purge(&self, id: MessageId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Retention: deletes messages received before `before_ms` whose deliveries are all
    /// delivered. Returns how many.
    fn prune_delivered(
        &self,
        before_ms: Millis,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    fn get(
        &self,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<MessageRecord>, StoreError>> + Send;
    fn raw(
        &self,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    fn deliveries(
        &self,
        id: MessageId,
    ) -> impl Future<Output = Result<Vec<Delivery>, StoreError>> + Send;
    /// A page of the messages a query selects. Their records may leave `bundle` out (a
    /// page is for listing; [`Store::get`] has the bundle).
    fn list(&self, query: &Query) -> impl Future<Output = Result<Page, StoreError>> + Send;
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;

    /// Makes every write so far durable.
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A signal that fires when another process sharing this store (another node) may
    /// have made deliveries of `destination` ready, so that an idle worker leases them
    /// without waiting for its next poll. A hint, never a promise: it may fire with
    /// nothing to lease, and a worker must still poll ([`Store::next_due_ms`]) because a
    /// signal can be lost. What this process queues itself, its own code knows of (the
    /// engine wakes its workers directly). The default never fires (the sled store has
    /// one process).
    fn work_signal(&self, destination: &str) -> WorkSignal {
        let _ = destination;
        WorkSignal::never()
    }
}

/// Runs retention in the background: every `every`, deletes the messages delivered
/// everywhere and received more than `keep` ago. Errors are logged and retried at the
/// next tick; the task ends when the returned handle is aborted or the runtime stops.
pub fn spawn_retention<S: Store>(
    store: std::sync::Arc<S>,
    clock: std::sync::Arc<dyn Clock>,
    keep: std::time::Duration,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let cutoff = clock.now_ms().saturating_sub(keep.as_millis() as u64);
            match store.prune_delivered(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "retention: delivered messages deleted"),
                Err(e) => tracing::warn!(error = %e, "retention failed; retrying at the next tick"),
            }
        }
    })
}

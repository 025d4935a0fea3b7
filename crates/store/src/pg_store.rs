//! The shared store, on PostgreSQL: several passerelle nodes (behind any TCP load
//! balancer for MLLP) journal into, and deliver from, one database. Same [`Store`]
//! contract as the sled backend; the contract tests (`tests/contract_pg.rs`) run against a
//! real PostgreSQL server.
//!
//! ## Layout (`pg_schema.sql`, schema version 1 in `passerelle_meta`)
//!
//! | table                   | one row per                                                  |
//! |-------------------------|--------------------------------------------------------------|
//! | `passerelle_messages`   | message: its record, MSH summary, history and resubmission links as `jsonb` |
//! | `passerelle_frames`     | message: the frame's bytes (apart, so state changes do not copy them) |
//! | `passerelle_deliveries` | delivery (destination, seq): state, attempts, history, and the queue columns below |
//! | `passerelle_counters`   | (counter, shard): counts per state                           |
//!
//! Ids come from the sequences `passerelle_message_id` and `passerelle_delivery_seq`:
//! monotonic and never reused (a rolled-back transaction leaves a gap). The schema is
//! created on open, under a transaction-level advisory lock so that nodes starting
//! together create it once; a database holding another schema version is refused. The
//! role in the connection string must be able to create tables (or own them).
//!
//! ## The queue, and why it is safe with several nodes
//!
//! Three columns of a delivery play the parts of the sled backend's key spaces:
//! `holds_key` (the delivery holds its ordering key: it is unfinished, or dead while dead
//! letters hold their key; the key's **head** is its holder with the lowest seq),
//! `ready_at_ms` (set only on a head that may be leased from that time: the ready queue)
//! and `lease_until_ms` with `state = 'in_flight'` (the leases).
//!
//! - **Leasing** takes due heads with `SELECT … FOR UPDATE SKIP LOCKED` and marks them in
//!   flight in the same statement: two nodes leasing at once lock disjoint rows, and a row
//!   another transaction just changed is checked again against its new version. Since only
//!   a head is ever ready, at most one delivery per key is leased at a time.
//! - **Every change to which delivery holds or heads a key** (queueing, completing,
//!   replaying, purging) first takes a transaction-level advisory lock on the (destination,
//!   ordering key) pair (`pg_advisory_xact_lock` on a 64-bit hash of both; a collision
//!   only serialises two keys, it never mixes them). Without it, two transactions could
//!   each miss the other's uncommitted row: two heads for one key, or a key that no one
//!   promotes. Locks are taken in one order everywhere (message row, key locks sorted,
//!   delivery rows, counters sorted by name), so these transactions do not deadlock.
//! - **Leases carry a token** (`lease_until_ms`, which only grows for a delivery, see
//!   `lease_token`): a worker whose lease expired and was given to another cannot
//!   complete it ([`StoreError::LeaseLost`]).
//! - **Expired leases** return to ready ([`Store::requeue_expired`], which every delivery
//!   worker calls). Lease expiry compares times from the nodes' clocks, which must agree
//!   (NTP) to well within the visibility timeout.
//! - **On open**, leases held by a node that is gone return to ready at once: each
//!   [`PgStore`] holds a session-level advisory lock on its own node number on a
//!   connection of its own for as long as it lives; the leases of a node number whose
//!   lock can be taken belong to a node whose session ended (crash, stop). A node that
//!   lost its liveness connection connects again and takes its lock again at its next
//!   [`Store::requeue_expired`]; until then it looks gone, and a store opened meanwhile
//!   gives its leases again and refuses its completions: a delivery may go out twice,
//!   never be lost.
//!
//! Time comes from the injected [`Clock`], never from the database's `now()`, so that
//! tests drive it and every node decides with the same rules as the sled backend.
//!
//! ## Counters
//!
//! Counts per state are rows of `passerelle_counters` changed in the same transaction as
//! the state change, never `count(*)`. A single row per counter would make every journal
//! write queue behind the previous one's commit; so each transaction adds its deltas to
//! one of [`COUNTER_SHARDS`] rows picked at random, and [`Store::counts`] sums the shards.
//!
//! ## Guarantees, honestly
//!
//! - **Durability** is PostgreSQL's committed transaction: [`Store::journal`] returns
//!   after `COMMIT`, which with `synchronous_commit` `on` (the default; `remote_write` or
//!   `remote_apply` add a standby) has flushed the write-ahead log to disk. With
//!   `synchronous_commit = off` (or `fsync = off`) a server crash may lose the last
//!   acknowledged messages: [`PgStore::open`] checks both and logs an error when either is
//!   off. It is the server's job to survive its disk (replication, backups).
//! - **At least once**, as with sled: a lease that expires, or a commit whose answer the
//!   network loses, sends a delivery again; the deterministic bundle makes it harmless.
//! - **Order per key across nodes**, by the head rule above: whichever node leases, a
//!   key's next delivery is not ready before the previous one is final.
//! - **When the database cannot be reached**, every operation fails within
//!   [`PgConfig::op_timeout`] (connecting counts) with [`StoreError::Database`]: `journal`
//!   fails, and the listener answers AE ("could not be stored; send it again later"), so
//!   that the sender keeps the message. Nothing hangs. A connection that timed out is
//!   dropped, not reused. Writes that were under way when the connection broke are rolled
//!   back by the server, or committed if the commit got there: the sender then resends a
//!   message that was kept (at least once).
//! - **Bad rows** (a state the code does not know, JSON that does not decode, a negative
//!   id) give [`StoreError::BadRow`], never a panic. PostgreSQL's `text` and `jsonb` cannot
//!   hold the NUL character: NULs in names and text fields are stored as U+FFFD.
//! - **Listing** pages by id; a message whose transaction commits after a page was read,
//!   with a lower id than that page's last (ids are taken before commit), is not on it.
//! - **TLS** (the `pg_tls` module): rustls, with libpq's `sslmode` names. Every
//!   connection of a store (the pool's and the liveness connection) is made with the same
//!   settings, checked (files read) before the first connection. Only `verify-full`
//!   authenticates the server; `require` and `prefer` encrypt against eavesdropping only,
//!   and `prefer` falls back to plaintext when the server offers no TLS. Unix sockets
//!   never use TLS.
//! - **Wake-up across nodes** (the `pg_listen` module): a transaction that makes
//!   deliveries ready (a routing outcome, a key's next delivery after its head finished,
//!   a replay, leases returned) also `NOTIFY`s their destinations' names, delivered by
//!   PostgreSQL only if it commits; each store `LISTEN`s on a connection of its own and
//!   fires [`Store::work_signal`], so an idle worker on any node leases within a round
//!   trip or so. It is a hint: a notification lost while the listening connection is
//!   down (it reconnects with backoff, and then fires every signal) or never sent (a retry
//!   becoming due is a matter of time) costs at most the workers' poll interval (a
//!   second in the engine). PostgreSQL commits transactions that notify one at a time
//!   (they queue on the notification queue's lock at commit), which bounds the routing
//!   outcomes the whole cluster records per second by the commit (WAL flush) latency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use crate::pg_listen::{self, Wakers};
use crate::pg_tls::{self, MakeRustls, PgTls, PgTlsError, PgTlsMode};

use crate::retry::{Jitter, settle};
use crate::types::*;
use crate::{Clock, Store, StoreError, SystemClock, WorkSignal};

const SCHEMA_VERSION: &str = "1";
const SCHEMA: &str = include_str!("pg_schema.sql");

/// Rows per counter (see the module doc).
pub const COUNTER_SHARDS: i16 = 16;

/// Advisory lock keys. The two-integer form (node liveness) and the one-bigint form
/// (migration, ordering keys) are separate lock spaces in PostgreSQL.
const LIVENESS_SPACE: i32 = 0x5041_5353; // "PASS"
const MIGRATION_LOCK: i64 = 0x5041_5353_0000_0001;

/// Settings of the PostgreSQL store.
#[derive(Clone)]
pub struct PgConfig {
    /// A connection string: `postgres://user:password@host:5432/db` or
    /// `host=/run/postgresql dbname=passerelle`. Without a password in it, `PGPASSWORD` is
    /// used when set. Never logged (only host, port and database name are).
    pub url: String,
    /// Connections in the pool (the liveness connection comes on top).
    pub pool_size: usize,
    /// How long connecting may take (unless the connection string says).
    pub connect_timeout: Duration,
    /// How long one operation may take in all (waiting for a connection included) before
    /// it fails with [`StoreError::Database`].
    pub op_timeout: Duration,
    /// How long a lease lasts before the delivery is given to another worker.
    pub visibility_timeout: Duration,
    /// Whether a dead delivery lets the next message with its ordering key go on (true),
    /// or holds the key until an operator replays or purges it (false).
    pub dead_letter_releases_key: bool,
    /// TLS to the server (see the `pg_tls` module): merged with the connection string's
    /// `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
    pub tls: PgTls,
    pub clock: Arc<dyn Clock>,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
            visibility_timeout: Duration::from_secs(120),
            dead_letter_releases_key: true,
            tls: PgTls::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl PgConfig {
    /// `host:port/database` of a connection string, for messages (no user, no password);
    /// `(unreadable connection string)` when it does not parse.
    pub fn describe_url(url: &str) -> String {
        pg_tls::split_tls_options(url)
            .ok()
            .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok())
            .map(|pg| describe_target(&pg))
            .unwrap_or_else(|| "(unreadable connection string)".into())
    }

    /// Whether `url` reads as a connection string; the error says what is wrong without
    /// repeating the string (which may hold a password).
    pub fn check_url(url: &str) -> Result<(), String> {
        if url.trim().is_empty() {
            return Err("no connection string".into());
        }
        let bad = |e: &dyn fmt::Display| format!("not a PostgreSQL connection string: {e}");
        let (rest, _) = pg_tls::split_tls_options(url).map_err(|e| bad(&e))?;
        rest.parse::<tokio_postgres::Config>()
            .map(|_| ())
            .map_err(|e| bad(&error_chain(&e)))
    }

    /// Whether the TLS settings (these and the connection string's) can be used: the
    /// mode is known, both sources agree, and every file they name reads as what it
    /// should be. [`PgStore::open`] checks the same, so a configuration check finds what
    /// start-up would refuse.
    pub fn check_tls(&self) -> Result<PgTlsMode, PgTlsError> {
        let (_, url_tls) = pg_tls::split_tls_options(&self.url).map_err(|message| PgTlsError {
            field: "url",
            message,
        })?;
        let resolved = pg_tls::resolve(&self.tls, &url_tls)?;
        pg_tls::connector(&resolved)?;
        Ok(resolved.mode)
    }

    /// The client library's settings and the TLS connector for this configuration.
    fn connection(&self) -> Result<(tokio_postgres::Config, MakeRustls), StoreError> {
        let (rest, url_tls) = pg_tls::split_tls_options(&self.url)
            .map_err(|e| StoreError::Database(format!("bad connection string: {e}")))?;
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| {
            StoreError::Database(format!("bad connection string: {}", error_chain(&e)))
        })?;
        let resolved = pg_tls::resolve(&self.tls, &url_tls).map_err(StoreError::Tls)?;
        let connector = pg_tls::connector(&resolved).map_err(StoreError::Tls)?;
        #[cfg(unix)]
        let local_only = pg
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
            && pg.get_hostaddrs().is_empty();
        #[cfg(not(unix))]
        let local_only = false;
        pg.ssl_mode(match resolved.mode {
            // PostgreSQL offers no TLS on a Unix socket; libpq ignores sslmode there.
            _ if local_only => tokio_postgres::config::SslMode::Disable,
            PgTlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            PgTlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            PgTlsMode::Require | PgTlsMode::VerifyCa | PgTlsMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok((pg, connector))
    }
}

/// An error and its causes, on one line: the client library's own messages leave the
/// cause out ("error performing TLS handshake"), and the cause is what an operator needs.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // A server error's own text can carry DETAIL, which may quote a row's values.
        if let Some(db) = c.downcast_ref::<tokio_postgres::error::DbError>() {
            text.push_str(&format!(
                ": {} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            ));
            break;
        }
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &"(hidden)")
            .field("pool_size", &self.pool_size)
            .field("op_timeout", &self.op_timeout)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    pool: Pool,
    config: PgConfig,
    /// `host:port/database`, for messages (no user, no password).
    target: String,
    /// This store's node number: the owner of its leases.
    node: i32,
    /// The connection that holds this node's liveness lock, for as long as the store lives
    /// (connected again, and the lock taken again, when it breaks: see `keep_liveness`).
    liveness: tokio::sync::Mutex<tokio_postgres::Client>,
    /// How to connect, for the liveness connection.
    pg: tokio_postgres::Config,
    tls: MakeRustls,
    jitter: Jitter,
    /// The destinations' wake-up signals, fired by the listening connection.
    wakers: Arc<Wakers>,
    /// The task that holds the listening connection (see the `pg_listen` module).
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("node", &self.node)
            .finish()
    }
}

/// A database error in words without patient data: the SQLSTATE and the server's message,
/// never its DETAIL (which can quote the values of a row).
fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error_chain(&e),
    })
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        db_error(e)
    }
}

/// PostgreSQL's `text` cannot hold NUL: stored as U+FFFD.
fn clean(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// A `u64` (id, time) as PostgreSQL's `bigint`.
fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The advisory lock of a (destination, ordering key) pair: FNV-1a over both.
fn key_lock(destination: &str, ordering_key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in destination
        .bytes()
        .chain(std::iter::once(0))
        .chain(ordering_key.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// A random number (std's hasher keys are random per process and per call).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn message_counter(state: MessageState) -> String {
    format!("m/{}", state.name())
}

fn delivery_counter(destination: &str, state: DeliveryState) -> String {
    format!("d/{destination}/{}", state.name())
}

/// Counter changes of one transaction, written last (sorted by name, see the module doc).
#[derive(Default)]
struct Deltas(BTreeMap<String, i64>);

impl Deltas {
    fn add(&mut self, name: String, by: i64) {
        *self.0.entry(name).or_insert(0) += by;
    }

    fn moved(&mut self, destination: &str, from: DeliveryState, to: DeliveryState) {
        self.add(delivery_counter(destination, from), -1);
        self.add(delivery_counter(destination, to), 1);
    }
}

fn parse_message_state(s: &str) -> Option<MessageState> {
    MessageState::ALL.into_iter().find(|m| m.name() == s)
}

fn parse_delivery_state(s: &str) -> Option<DeliveryState> {
    DeliveryState::ALL.into_iter().find(|d| d.name() == s)
}

/// Reads a row's columns, turning every surprise into [`StoreError::BadRow`].
struct RowReader<'a> {
    row: &'a Row,
    table: &'static str,
    key: String,
}

impl RowReader<'_> {
    fn bad(&self, column: &str, problem: impl fmt::Display) -> StoreError {
        StoreError::BadRow {
            table: self.table,
            key: self.key.clone(),
            problem: format!("{column}: {problem}"),
        }
    }

    fn get<'b, T: tokio_postgres::types::FromSql<'b>>(
        &'b self,
        column: &str,
    ) -> Result<T, StoreError> {
        self.row.try_get(column).map_err(|e| self.bad(column, e))
    }

    fn u64(&self, column: &str) -> Result<u64, StoreError> {
        let v: i64 = self.get(column)?;
        u64::try_from(v).map_err(|_| self.bad(column, format!("negative ({v})")))
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, StoreError> {
        let v: serde_json::Value = self.get(column)?;
        serde_json::from_value(v).map_err(|e| self.bad(column, e))
    }

    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>, StoreError> {
        let v: Option<serde_json::Value> = self.get(column)?;
        v.map(serde_json::from_value)
            .transpose()
            .map_err(|e| self.bad(column, e))
    }
}

const MESSAGE_COLUMNS: &str =
    "id, received_at_ms, listener, peer, size, msh, route, state, error, bundle, history, links";

fn message_from(row: &Row) -> Result<MessageRecord, StoreError> {
    let id: i64 = row.try_get("id").map_err(|e| StoreError::BadRow {
        table: "passerelle_messages",
        key: "?".into(),
        problem: format!("id: {e}"),
    })?;
    let r = RowReader {
        row,
        table: "passerelle_messages",
        key: id.to_string(),
    };
    let state: String = r.get("state")?;
    Ok(MessageRecord {
        id: r.u64("id")?,
        received_at_ms: r.u64("received_at_ms")?,
        listener: r.get("listener")?,
        peer: r.get("peer")?,
        size: r.u64("size")?,
        msh: r.opt_json("msh")?,
        route: r.get("route")?,
        state: parse_message_state(&state)
            .ok_or_else(|| r.bad("state", format!("unknown state {state:?}")))?,
        error: r.get("error")?,
        bundle: r.get("bundle")?,
        deliveries: Vec::new(),
        history: r.json("history")?,
        links: r.opt_json("links")?.unwrap_or_default(),
    })
}

const DELIVERY_COLUMNS: &str = "destination, seq, message_id, ordering_key, state, attempts, \
     enqueued_at_ms, next_attempt_ms, lease_until_ms, dead_reason, history";

fn delivery_from(row: &Row) -> Result<Delivery, StoreError> {
    let destination: String = row.try_get("destination").unwrap_or_default();
    let seq: i64 = row.try_get("seq").unwrap_or_default();
    let r = RowReader {
        row,
        table: "passerelle_deliveries",
        key: format!("{destination}#{seq}"),
    };
    let state: String = r.get("state")?;
    let attempts: i32 = r.get("attempts")?;
    Ok(Delivery {
        destination: r.get("destination")?,
        seq: r.u64("seq")?,
        message_id: r.u64("message_id")?,
        ordering_key: r.get("ordering_key")?,
        state: parse_delivery_state(&state)
            .ok_or_else(|| r.bad("state", format!("unknown state {state:?}")))?,
        attempts: u32::try_from(attempts).map_err(|_| r.bad("attempts", attempts))?,
        enqueued_at_ms: r.u64("enqueued_at_ms")?,
        next_attempt_ms: r.u64("next_attempt_ms")?,
        lease_until_ms: r.u64("lease_until_ms")?,
        dead_reason: r.get("dead_reason")?,
        history: r.json("history")?,
    })
}

/// Runs `$body` (a future using `$c`, a pooled connection) within the operation timeout;
/// a connection whose operation timed out is dropped rather than reused.
macro_rules! on_connection {
    ($store:expr, $what:literal, |$c:ident| $body:expr) => {{
        let started = tokio::time::Instant::now();
        let mut conn = $store.connection($what).await?;
        let left = $store.config.op_timeout.saturating_sub(started.elapsed());
        let outcome = {
            let $c = &mut conn;
            tokio::time::timeout(left, $body).await
        };
        $store.finish(conn, $what, outcome)
    }};
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

async fn query(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.query(&statement, params).await?)
}

async fn query_opt(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.query_opt(&statement, params).await?)
}

async fn execute(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.execute(&statement, params).await?)
}

/// Takes the advisory locks of these (destination, ordering key) pairs, in one order.
async fn lock_keys<'k>(
    tx: &Tx<'_>,
    keys: impl IntoIterator<Item = (&'k str, &'k str)>,
) -> Result<(), StoreError> {
    let locks: BTreeSet<i64> = keys.into_iter().map(|(d, k)| key_lock(d, k)).collect();
    for lock in locks {
        execute(tx, "SELECT pg_advisory_xact_lock($1)", &[&lock]).await?;
    }
    Ok(())
}

/// The delivery that heads a key: its holder with the lowest seq.
async fn head_of(
    tx: &Tx<'_>,
    destination: &str,
    ordering_key: &str,
) -> Result<Option<i64>, StoreError> {
    let row = query_opt(
        tx,
        "SELECT seq FROM passerelle_deliveries \
         WHERE destination = $1 AND ordering_key = $2 AND holds_key ORDER BY seq LIMIT 1",
        &[&destination, &ordering_key],
    )
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Makes the next holder of a key ready, once its head let go of it. Returns whether
/// one became ready.
async fn promote_successor(
    tx: &Tx<'_>,
    destination: &str,
    ordering_key: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let promoted = execute(
        tx,
        "UPDATE passerelle_deliveries SET ready_at_ms = $3 \
         WHERE destination = $1 AND seq = (SELECT seq FROM passerelle_deliveries \
             WHERE destination = $1 AND ordering_key = $2 AND holds_key ORDER BY seq LIMIT 1) \
           AND state = 'pending' AND ready_at_ms IS NULL",
        &[&destination, &ordering_key, &now],
    )
    .await?;
    Ok(promoted > 0)
}

/// Tells every node's idle workers (at commit, and only if it commits) that deliveries of
/// these destinations became ready (see the `pg_listen` module).
async fn notify_ready<'d>(
    tx: &Tx<'_>,
    destinations: impl IntoIterator<Item = &'d str>,
) -> Result<(), StoreError> {
    let destinations: BTreeSet<&str> = destinations.into_iter().collect();
    for destination in destinations {
        execute(
            tx,
            "SELECT pg_notify($1, $2)",
            &[&pg_listen::CHANNEL, &destination],
        )
        .await?;
    }
    Ok(())
}

/// The deliveries of a message, by seq.
async fn deliveries_of(tx: &Tx<'_>, id: i64, lock: bool) -> Result<Vec<Delivery>, StoreError> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM passerelle_deliveries WHERE message_id = $1 ORDER BY seq{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    query(tx, &sql, &[&id])
        .await?
        .iter()
        .map(delivery_from)
        .collect()
}

impl PgStore {
    /// Connects, creates or checks the schema, and returns to ready the leases of nodes
    /// that are gone. Fails with [`StoreError::Database`] when the database cannot be
    /// reached within the connect timeout, and [`StoreError::Schema`] when it holds
    /// another schema version.
    pub async fn open(config: PgConfig) -> Result<PgStore, StoreError> {
        let (mut pg, tls) = config.connection()?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(config.connect_timeout);
        }
        if pg.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            pg.password(password);
        }
        pg.application_name("passerelle");
        pg.keepalives_idle(Duration::from_secs(30));
        let target = describe_target(&pg);
        let manager = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.op_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.op_timeout))
            .build()
            .map_err(|e| StoreError::Database(format!("connection pool: {e}")))?;
        let unreachable = |e: &(dyn std::error::Error + 'static)| {
            StoreError::Database(format!(
                "cannot connect to PostgreSQL at {target}: {}",
                error_chain(e)
            ))
        };
        let mut conn = pool.get().await.map_err(|e| unreachable(&e))?;
        migrate(&mut conn, &target).await?;
        check_durability(&conn).await?;
        drop(conn);

        // The liveness connection and this node's number.
        let liveness = connect_liveness(&pg, &tls)
            .await
            .map_err(|e| unreachable(&e))?;
        let mut node = None;
        for _ in 0..16 {
            let candidate = (random_u64() >> 33) as i32;
            let row = liveness
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LIVENESS_SPACE, &candidate],
                )
                .await?;
            if row.get::<_, bool>(0) {
                node = Some(candidate);
                break;
            }
        }
        let node = node.ok_or_else(|| StoreError::Database("no free node number".into()))?;
        let seed = random_u64();
        let wakers = Arc::new(Wakers::default());
        let (listening, first_listen) = tokio::sync::oneshot::channel();
        let listener = pg_listen::spawn(
            pg.clone(),
            tls.clone(),
            Arc::clone(&wakers),
            config.op_timeout,
            seed.rotate_left(17),
            listening,
        );
        let store = PgStore {
            pool,
            config,
            target,
            node,
            liveness: tokio::sync::Mutex::new(liveness),
            pg,
            tls,
            jitter: Jitter::new(seed),
            wakers,
            listener,
        };
        // Open returns listening, so that a delivery another node readies from now on
        // wakes this one; if that takes too long, the poll covers meanwhile.
        let listening = tokio::time::timeout(store.config.op_timeout, first_listen).await;
        if !matches!(listening, Ok(Ok(()))) {
            tracing::warn!(
                "the wake-up connection is not listening yet; idle workers see other nodes' \
                 deliveries at their next poll until it is"
            );
        }
        let returned = store.release_orphaned_leases().await?;
        if returned > 0 {
            tracing::info!(
                leases = returned,
                "in-flight deliveries of nodes that are gone returned to ready"
            );
        }
        Ok(store)
    }

    /// This store's node number: the owner recorded with its leases.
    pub fn node(&self) -> i32 {
        self.node
    }

    /// Where the store is: `host:port/database`, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn now(&self) -> i64 {
        big(self.config.clock.now_ms())
    }

    fn shard(&self) -> i16 {
        (self.jitter.unit() * f64::from(COUNTER_SHARDS)) as i16 % COUNTER_SHARDS
    }

    async fn connection(&self, what: &str) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Database(format!(
                "{what}: no connection to PostgreSQL at {}: {}",
                self.target,
                error_chain(&e)
            ))
        })
    }

    fn finish<T>(
        &self,
        conn: Object,
        what: &str,
        outcome: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(result) => result,
            Err(_) => {
                // Whatever the connection was doing is abandoned: not back to the pool.
                drop(Object::take(conn));
                Err(StoreError::Database(format!(
                    "{what}: PostgreSQL at {} did not answer within {:?}",
                    self.target, self.config.op_timeout
                )))
            }
        }
    }

    /// Writes a transaction's counter changes (last, sorted by name).
    async fn apply(&self, tx: &Tx<'_>, deltas: Deltas) -> Result<(), StoreError> {
        let (names, values): (Vec<String>, Vec<i64>) =
            deltas.0.into_iter().filter(|(_, v)| *v != 0).unzip();
        if names.is_empty() {
            return Ok(());
        }
        let shard = self.shard();
        execute(
            tx,
            "INSERT INTO passerelle_counters (name, shard, value) \
             SELECT n, $2, v FROM unnest($1::text[], $3::bigint[]) AS t(n, v) ORDER BY n \
             ON CONFLICT (name, shard) DO UPDATE SET value = passerelle_counters.value + EXCLUDED.value",
            &[&names, &shard, &values],
        )
        .await?;
        Ok(())
    }

    /// Returns to ready the in-flight deliveries that match `condition` (`$1` is now, `$2`
    /// is `param`). Returns how many.
    async fn requeue_where(
        &self,
        condition: &'static str,
        param: &(dyn ToSql + Sync),
    ) -> Result<usize, StoreError> {
        let now = self.now();
        let sql = format!(
            "WITH gone AS (SELECT destination, seq FROM passerelle_deliveries \
                 WHERE state = 'in_flight' AND {condition} FOR UPDATE SKIP LOCKED) \
             UPDATE passerelle_deliveries d \
             SET state = 'pending', next_attempt_ms = $1, ready_at_ms = $1, lease_owner = NULL \
             FROM gone WHERE d.destination = gone.destination AND d.seq = gone.seq \
             RETURNING d.destination"
        );
        on_connection!(self, "requeue leases", |c| async {
            let tx = c.transaction().await?;
            let rows = query(&tx, &sql, &[&now, param]).await?;
            let mut deltas = Deltas::default();
            for row in &rows {
                let destination: String = row.try_get(0)?;
                deltas.moved(
                    &destination,
                    DeliveryState::InFlight,
                    DeliveryState::Pending,
                );
            }
            let mut returned = Vec::with_capacity(rows.len());
            for row in &rows {
                returned.push(row.try_get::<_, String>(0)?);
            }
            notify_ready(&tx, returned.iter().map(String::as_str)).await?;
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            Ok(rows.len())
        })
    }

    /// Returns to ready the leases of nodes whose liveness lock is free (their session
    /// ended).
    async fn release_orphaned_leases(&self) -> Result<usize, StoreError> {
        let owners: Vec<i32> = on_connection!(self, "find lease owners", |c| async {
            let rows = c
                .query(
                    "SELECT DISTINCT lease_owner FROM passerelle_deliveries \
                     WHERE state = 'in_flight' AND lease_owner IS NOT NULL",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
        })?;
        let mut returned = 0;
        let liveness = self.liveness.lock().await;
        for owner in owners {
            if owner == self.node {
                continue;
            }
            let gone = liveness
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LIVENESS_SPACE, &owner],
                )
                .await?
                .get::<_, bool>(0);
            if gone {
                let n = self.requeue_where("lease_owner = $2", &owner).await;
                liveness
                    .execute(
                        "SELECT pg_advisory_unlock($1, $2)",
                        &[&LIVENESS_SPACE, &owner],
                    )
                    .await?;
                returned += n?;
            }
        }
        Ok(returned)
    }

    /// Connects the liveness connection again and takes this node's lock again when the
    /// connection broke (the database restarted, the network failed), so that a store
    /// opened later does not take this live node for gone. Called by `requeue_expired`,
    /// which every delivery worker calls in its loop.
    async fn keep_liveness(&self) {
        let mut liveness = self.liveness.lock().await;
        if !liveness.is_closed() {
            return;
        }
        let again = async {
            let client = connect_liveness(&self.pg, &self.tls).await?;
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LIVENESS_SPACE, &self.node],
                )
                .await?
                .get(0);
            Ok::<_, tokio_postgres::Error>((client, locked))
        };
        match tokio::time::timeout(self.config.op_timeout, again).await {
            Ok(Ok((client, true))) => {
                *liveness = client;
                tracing::info!(node = self.node, "liveness connection re-established");
            }
            Ok(Ok((client, false))) => {
                *liveness = client;
                tracing::error!(
                    node = self.node,
                    "another store holds this node's number; its leases may be given again"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %db_error(e), "liveness connection: cannot reconnect yet")
            }
            Err(_) => tracing::warn!("liveness connection: reconnecting timed out"),
        }
    }

    /// The delivery refs of these messages, by message.
    async fn refs_of(
        &self,
        tx: &Tx<'_>,
        ids: &[i64],
    ) -> Result<BTreeMap<i64, Vec<DeliveryRef>>, StoreError> {
        let rows = query(
            tx,
            "SELECT message_id, destination, seq FROM passerelle_deliveries \
             WHERE message_id = ANY($1) ORDER BY message_id, seq",
            &[&ids],
        )
        .await?;
        let mut refs: BTreeMap<i64, Vec<DeliveryRef>> = BTreeMap::new();
        for row in &rows {
            let r = RowReader {
                row,
                table: "passerelle_deliveries",
                key: "refs".into(),
            };
            refs.entry(r.get("message_id")?)
                .or_default()
                .push(DeliveryRef {
                    destination: r.get("destination")?,
                    seq: r.u64("seq")?,
                });
        }
        Ok(refs)
    }

    async fn purge_in(&self, tx: &Tx<'_>, id: i64) -> Result<bool, StoreError> {
        let Some(row) = query_opt(
            tx,
            "SELECT state FROM passerelle_messages WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        else {
            return Ok(false);
        };
        let state: String = row.try_get(0)?;
        let state = parse_message_state(&state).ok_or_else(|| StoreError::BadRow {
            table: "passerelle_messages",
            key: id.to_string(),
            problem: format!("state: unknown state {state:?}"),
        })?;
        let deliveries = deliveries_of(tx, id, false).await?;
        if let Some(d) = deliveries.iter().find(|d| !d.state.is_final()) {
            return Err(StoreError::WrongState {
                id: id as u64,
                state: d.state.name(),
                action: "purge",
                needed: "every delivery delivered or dead",
            });
        }
        lock_keys(
            tx,
            deliveries
                .iter()
                .map(|d| (d.destination.as_str(), d.ordering_key.as_str())),
        )
        .await?;
        let mut deltas = Deltas::default();
        deltas.add(message_counter(state), -1);
        for d in &deliveries {
            deltas.add(delivery_counter(&d.destination, d.state), -1);
        }
        execute(
            tx,
            "DELETE FROM passerelle_deliveries WHERE message_id = $1",
            &[&id],
        )
        .await?;
        // A dead delivery that held its key lets the next one go. (One that did not hold
        // it has no waiting successor: the promotion only takes a pending delivery of the
        // key that was never made ready.)
        let now = self.now();
        let mut ready = Vec::new();
        for d in &deliveries {
            if d.state == DeliveryState::Dead
                && promote_successor(tx, &d.destination, &d.ordering_key, now).await?
            {
                ready.push(d.destination.as_str());
            }
        }
        notify_ready(tx, ready).await?;
        execute(tx, "DELETE FROM passerelle_frames WHERE id = $1", &[&id]).await?;
        execute(tx, "DELETE FROM passerelle_messages WHERE id = $1", &[&id]).await?;
        self.apply(tx, deltas).await?;
        Ok(true)
    }
}

/// A connection of its own (not from the pool), its driver on a task.
async fn connect_liveness(
    pg: &tokio_postgres::Config,
    tls: &MakeRustls,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(tls.clone()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %db_error(e), "the store's liveness connection ended");
        }
    });
    Ok(client)
}

/// `host:port/database`, for messages.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Creates the schema, or checks the one that is there.
async fn migrate(conn: &mut Object, target: &str) -> Result<(), StoreError> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('passerelle_meta') IS NOT NULL", &[])
        .await?
        .get(0);
    if exists {
        let found: Option<String> = tx
            .query_opt(
                "SELECT value FROM passerelle_meta WHERE key = 'schema_version'",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        if let Some(found) = found
            && found != SCHEMA_VERSION
        {
            return Err(StoreError::Schema {
                path: target.to_owned(),
                found,
                expected: SCHEMA_VERSION.to_owned(),
            });
        }
    }
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}

/// Logs an error when the server's settings void the durability claim (see the module doc).
async fn check_durability(conn: &Object) -> Result<(), StoreError> {
    for (setting, bad) in [("synchronous_commit", "off"), ("fsync", "off")] {
        let value: String = conn
            .query_one(&format!("SHOW {setting}"), &[])
            .await?
            .get(0);
        if value == bad {
            tracing::error!(
                setting,
                value,
                "PostgreSQL is set to acknowledge commits before they are on disk: a server \
                 crash can lose acknowledged messages; set it back to on"
            );
        }
    }
    Ok(())
}

impl PgStore {
    /// Journals a frame in one transaction; for an operator's corrected copy of
    /// `original` ([`Store::resubmit`]), links both records in the same transaction.
    async fn journal_linked(
        &self,
        frame: &[u8],
        meta: JournalMeta,
        original: Option<MessageId>,
    ) -> Result<MessageId, StoreError> {
        let now = self.now();
        let (state, mut detail) = match &meta.rejected {
            Some(error) => (MessageState::Rejected, clean(error)),
            None => (MessageState::Received, String::new()),
        };
        if let Some(original) = original {
            detail = crate::resubmitted_from_detail(original, &detail);
        }
        let original_sql = original
            .map(|o| i64::try_from(o).map_err(|_| StoreError::NotFound(o)))
            .transpose()?;
        let msh = meta.msh.map(|m| MshSummary {
            message_type: clean(&m.message_type),
            trigger_event: clean(&m.trigger_event),
            control_id: clean(&m.control_id),
            sending_application: clean(&m.sending_application),
            sending_facility: clean(&m.sending_facility),
            version: clean(&m.version),
        });
        let control_id = msh.as_ref().map(|m| m.control_id.clone());
        let history = [Transition {
            at_ms: now as u64,
            state: state.name().to_owned(),
            detail,
        }];
        let (listener, peer) = (clean(&meta.listener), clean(&meta.peer));
        let error = meta.rejected.as_deref().map(clean);
        let size = big(frame.len() as u64);
        let id: i64 = on_connection!(self, "journal", |c| async {
            let tx = c.transaction().await?;
            // The original, locked until the commit: its links are read and written whole.
            let before = match (original, original_sql) {
                (Some(original), Some(sql)) => {
                    let row = query_opt(
                        &tx,
                        "SELECT listener, links FROM passerelle_messages WHERE id = $1 FOR UPDATE",
                        &[&sql],
                    )
                    .await?
                    .ok_or(StoreError::NotFound(original))?;
                    let r = RowReader {
                        row: &row,
                        table: "passerelle_messages",
                        key: original.to_string(),
                    };
                    let listener: String = r.get("listener")?;
                    let links: Links = r.opt_json("links")?.unwrap_or_default();
                    Some((sql, listener, links))
                }
                _ => None,
            };
            let links = before.as_ref().map(|(sql, listener, links)| {
                crate::copy_links(*sql as u64, links.routing_listener(listener))
            });
            let row = query(
                &tx,
                "INSERT INTO passerelle_messages (id, received_at_ms, listener, peer, size, msh, \
                     control_id, state, error, history, links) \
                 VALUES (nextval('passerelle_message_id'), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 RETURNING id",
                &[
                    &now,
                    &listener,
                    &peer,
                    &size,
                    &msh.as_ref().map(Json),
                    &control_id,
                    &state.name(),
                    &error,
                    &Json(&history),
                    &links.as_ref().map(Json),
                ],
            )
            .await?;
            let id: i64 = row
                .first()
                .ok_or_else(|| StoreError::Database("INSERT returned no id".into()))?
                .try_get(0)?;
            execute(
                &tx,
                "INSERT INTO passerelle_frames (id, frame) VALUES ($1, $2)",
                &[&id, &frame],
            )
            .await?;
            if let Some((sql, _, mut links)) = before {
                links.resubmitted_as.push(id as u64);
                let transition = [crate::resubmitted_as_transition(now as u64, id as u64)];
                execute(
                    &tx,
                    "UPDATE passerelle_messages SET links = $2, history = history || $3::jsonb \
                     WHERE id = $1",
                    &[&sql, &Json(&links), &Json(&transition)],
                )
                .await?;
            }
            let mut deltas = Deltas::default();
            deltas.add(message_counter(state), 1);
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            Ok(id)
        })?;
        Ok(id as u64)
    }
}

impl Store for PgStore {
    async fn journal(&self, frame: &[u8], meta: JournalMeta) -> Result<MessageId, StoreError> {
        self.journal_linked(frame, meta, None).await
    }

    async fn resubmit(
        &self,
        original: MessageId,
        frame: &[u8],
        meta: JournalMeta,
    ) -> Result<MessageId, StoreError> {
        self.journal_linked(frame, meta, Some(original)).await
    }

    async fn record_outcome(&self, id: MessageId, outcome: Outcome) -> Result<(), StoreError> {
        let sql_id = i64::try_from(id).map_err(|_| StoreError::NotFound(id))?;
        if let Outcome::Mapped { deliveries, .. } = &outcome {
            crate::validate_deliveries(deliveries)?;
        }
        let now = self.now();
        on_connection!(self, "record outcome", |c| async {
            let tx = c.transaction().await?;
            let row = query_opt(
                &tx,
                "SELECT state, route, error, bundle FROM passerelle_messages WHERE id = $1 FOR UPDATE",
                &[&sql_id],
            )
            .await?
            .ok_or(StoreError::NotFound(id))?;
            let r = RowReader {
                row: &row,
                table: "passerelle_messages",
                key: id.to_string(),
            };
            let before: String = r.get("state")?;
            let before = parse_message_state(&before)
                .ok_or_else(|| r.bad("state", format!("unknown state {before:?}")))?;
            crate::check_routable(id, before)?;
            let mut route: Option<String> = r.get("route")?;
            let mut error: Option<String> = r.get("error")?;
            let mut bundle: Option<String> = r.get("bundle")?;
            let mut deltas = Deltas::default();
            let mut ready: Vec<String> = Vec::new();
            let (state, detail) = match &outcome {
                Outcome::Unrouted => (MessageState::Unrouted, "no route matched".to_owned()),
                Outcome::Duplicate { of } => {
                    (MessageState::Duplicate, crate::duplicate_detail(*of))
                }
                Outcome::MappingFailed {
                    route: rt,
                    error: err,
                } => {
                    route = Some(clean(rt));
                    error = Some(clean(err));
                    (MessageState::MappingFailed, clean(err))
                }
                Outcome::Mapped {
                    route: rt,
                    bundle: b,
                    deliveries,
                } => {
                    route = Some(clean(rt));
                    bundle = Some(clean(b));
                    error = None;
                    let keys: Vec<(String, String)> = deliveries
                        .iter()
                        .map(|e| (e.destination.clone(), clean(&e.ordering_key)))
                        .collect();
                    lock_keys(&tx, keys.iter().map(|(d, k)| (d.as_str(), k.as_str()))).await?;
                    for (destination, ordering_key) in &keys {
                        // Ready now if nothing of its key is unfinished before it.
                        let is_head = head_of(&tx, destination, ordering_key).await?.is_none();
                        let ready_at = is_head.then_some(now);
                        if is_head {
                            ready.push(destination.clone());
                        }
                        execute(
                            &tx,
                            "INSERT INTO passerelle_deliveries (destination, seq, message_id, \
                                 ordering_key, state, attempts, enqueued_at_ms, next_attempt_ms, \
                                 lease_until_ms, history, holds_key, ready_at_ms) \
                             VALUES ($1, nextval('passerelle_delivery_seq'), $2, $3, 'pending', 0, \
                                 $4, $4, 0, '[]', true, $5)",
                            &[destination, &sql_id, ordering_key, &now, &ready_at],
                        )
                        .await?;
                        deltas.add(delivery_counter(destination, DeliveryState::Pending), 1);
                    }
                    let names: Vec<&str> =
                        deliveries.iter().map(|e| e.destination.as_str()).collect();
                    (
                        MessageState::Mapped,
                        format!("route {}: queued for {}", clean(rt), names.join(", ")),
                    )
                }
            };
            let transition = [Transition {
                at_ms: now as u64,
                state: state.name().to_owned(),
                detail,
            }];
            execute(
                &tx,
                "UPDATE passerelle_messages SET state = $2, route = $3, error = $4, bundle = $5, \
                     history = history || $6::jsonb WHERE id = $1",
                &[
                    &sql_id,
                    &state.name(),
                    &route,
                    &error,
                    &bundle,
                    &Json(&transition),
                ],
            )
            .await?;
            deltas.add(message_counter(before), -1);
            deltas.add(message_counter(state), 1);
            notify_ready(&tx, ready.iter().map(String::as_str)).await?;
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn unprocessed(&self, limit: usize) -> Result<Vec<MessageId>, StoreError> {
        let limit = big(limit as u64);
        on_connection!(self, "unprocessed", |c| async {
            let rows = c
                .query(
                    "SELECT id FROM passerelle_messages WHERE state = 'received' ORDER BY id LIMIT $1",
                    &[&limit],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
        })
    }

    async fn lease(&self, destination: &str, max: usize) -> Result<Vec<Lease>, StoreError> {
        crate::validate_destination(destination)?;
        let now = self.now();
        let until = now.saturating_add(big(self.config.visibility_timeout.as_millis() as u64));
        let max = big(max as u64);
        let node = self.node;
        on_connection!(self, "lease", |c| async {
            let tx = c.transaction().await?;
            let rows = query(
                &tx,
                "WITH due AS (SELECT destination, seq, state, ready_at_ms FROM passerelle_deliveries \
                     WHERE destination = $1 AND ready_at_ms <= $2 \
                     ORDER BY ready_at_ms, seq LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE passerelle_deliveries d SET state = 'in_flight', ready_at_ms = NULL, \
                     lease_token = GREATEST($4, d.lease_token + 1), \
                     lease_until_ms = GREATEST($4, d.lease_token + 1), lease_owner = $5 \
                 FROM due WHERE d.destination = due.destination AND d.seq = due.seq \
                 RETURNING d.seq, d.message_id, d.ordering_key, d.attempts, d.lease_until_ms, \
                     due.state AS prior_state, due.ready_at_ms AS due_at",
                &[&destination, &now, &max, &until, &node],
            )
            .await?;
            let mut leased = Vec::with_capacity(rows.len());
            let mut deltas = Deltas::default();
            for row in &rows {
                let seq: i64 = row.try_get("seq")?;
                let r = RowReader {
                    row,
                    table: "passerelle_deliveries",
                    key: format!("{destination}#{seq}"),
                };
                let prior: String = r.get("prior_state")?;
                let prior = parse_delivery_state(&prior)
                    .ok_or_else(|| r.bad("state", format!("unknown state {prior:?}")))?;
                deltas.moved(destination, prior, DeliveryState::InFlight);
                let attempts: i32 = r.get("attempts")?;
                let due_at: i64 = r.get("due_at")?;
                leased.push((
                    (due_at, seq),
                    Lease {
                        destination: destination.to_owned(),
                        seq: r.u64("seq")?,
                        message_id: r.u64("message_id")?,
                        ordering_key: r.get("ordering_key")?,
                        attempt: u32::try_from(attempts).unwrap_or(0) + 1,
                        lease_until_ms: r.u64("lease_until_ms")?,
                    },
                ));
            }
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            // Oldest first, as they were queued.
            leased.sort_by_key(|(order, _)| *order);
            Ok(leased.into_iter().map(|(_, l)| l).collect())
        })
    }

    async fn complete(
        &self,
        lease: &Lease,
        report: AttemptReport,
        policy: &RetryPolicy,
    ) -> Result<DeliveryState, StoreError> {
        let destination = lease.destination.as_str();
        let lost = || StoreError::LeaseLost {
            destination: destination.to_owned(),
            seq: lease.seq,
        };
        let seq = i64::try_from(lease.seq).map_err(|_| lost())?;
        let report = AttemptReport {
            error_class: clean(&report.error_class),
            detail: clean(&report.detail),
            ..report
        };
        let now = self.now();
        on_connection!(self, "complete", |c| async {
            let tx = c.transaction().await?;
            // The key first (its name never changes), then the row: the lock order.
            let ordering_key: String = query_opt(
                &tx,
                "SELECT ordering_key FROM passerelle_deliveries WHERE destination = $1 AND seq = $2",
                &[&destination, &seq],
            )
            .await?
            .ok_or_else(lost)?
            .try_get(0)?;
            lock_keys(&tx, [(destination, ordering_key.as_str())]).await?;
            let row = query_opt(
                &tx,
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM passerelle_deliveries \
                     WHERE destination = $1 AND seq = $2 FOR UPDATE"
                ),
                &[&destination, &seq],
            )
            .await?
            .ok_or_else(lost)?;
            let mut d = delivery_from(&row)?;
            if d.state != DeliveryState::InFlight || d.lease_until_ms != lease.lease_until_ms {
                return Err(lost());
            }
            let next_state = settle(&mut d, &report, policy, now as u64, self.jitter.unit());
            let releases_key = next_state == DeliveryState::Delivered
                || next_state == DeliveryState::Dead
                    && self.config.dead_letter_releases_key
                    && !policy.dead_holds_key;
            let ready_at =
                (next_state == DeliveryState::RetryWait).then_some(big(d.next_attempt_ms));
            let attempts = i32::try_from(d.attempts).unwrap_or(i32::MAX);
            execute(
                &tx,
                "UPDATE passerelle_deliveries SET state = $3, attempts = $4, next_attempt_ms = $5, \
                     lease_until_ms = 0, lease_owner = NULL, dead_reason = $6, history = $7, \
                     holds_key = $8, ready_at_ms = $9 \
                 WHERE destination = $1 AND seq = $2",
                &[
                    &destination,
                    &seq,
                    &next_state.name(),
                    &attempts,
                    &big(d.next_attempt_ms),
                    &d.dead_reason,
                    &Json(&d.history),
                    &!releases_key,
                    &ready_at,
                ],
            )
            .await?;
            if releases_key && promote_successor(&tx, destination, &ordering_key, now).await? {
                notify_ready(&tx, [destination]).await?;
            }
            let mut deltas = Deltas::default();
            deltas.moved(destination, DeliveryState::InFlight, next_state);
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            Ok(next_state)
        })
    }

    async fn requeue_expired(&self) -> Result<usize, StoreError> {
        self.keep_liveness().await;
        let now = self.now();
        self.requeue_where("lease_until_ms <= $2", &now).await
    }

    async fn next_due_ms(&self, destination: &str) -> Result<Option<Millis>, StoreError> {
        on_connection!(self, "next due", |c| async {
            let row = c
                .query_one(
                    "SELECT min(ready_at_ms) FROM passerelle_deliveries \
                     WHERE destination = $1 AND ready_at_ms IS NOT NULL",
                    &[&destination],
                )
                .await?;
            Ok(row.try_get::<_, Option<i64>>(0)?.map(|t| t.max(0) as u64))
        })
    }

    async fn oldest_unfinished_ms(&self, destination: &str) -> Result<Option<Millis>, StoreError> {
        on_connection!(self, "oldest unfinished", |c| async {
            let row = c
                .query_one(
                    "SELECT min(enqueued_at_ms) FROM passerelle_deliveries \
                     WHERE destination = $1 AND state IN ('pending', 'in_flight', 'retry_wait')",
                    &[&destination],
                )
                .await?;
            Ok(row.try_get::<_, Option<i64>>(0)?.map(|t| t.max(0) as u64))
        })
    }

    async fn disk_bytes(&self) -> Result<u64, StoreError> {
        on_connection!(self, "disk bytes", |c| async {
            let row = c
                .query_one(
                    "SELECT (pg_total_relation_size('passerelle_messages') \
                         + pg_total_relation_size('passerelle_frames') \
                         + pg_total_relation_size('passerelle_deliveries') \
                         + pg_total_relation_size('passerelle_counters'))::bigint",
                    &[],
                )
                .await?;
            Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
        })
    }

    async fn replay(
        &self,
        id: MessageId,
        bundle: Option<String>,
        only: &ReplaySelection,
    ) -> Result<usize, StoreError> {
        let sql_id = i64::try_from(id).map_err(|_| StoreError::NotFound(id))?;
        let bundle = bundle.as_deref().map(clean);
        let now = self.now();
        on_connection!(self, "replay", |c| async {
            let tx = c.transaction().await?;
            let row = query_opt(
                &tx,
                "SELECT state FROM passerelle_messages WHERE id = $1 FOR UPDATE",
                &[&sql_id],
            )
            .await?
            .ok_or(StoreError::NotFound(id))?;
            let state: String = row.try_get(0)?;
            if state != MessageState::Mapped.name() {
                return Err(StoreError::WrongState {
                    id,
                    state: parse_message_state(&state).map_or("unknown", MessageState::name),
                    action: "replay",
                    needed: "mapped (re-route other states with record_outcome)",
                });
            }
            let finals: Vec<Delivery> = deliveries_of(&tx, sql_id, false)
                .await?
                .into_iter()
                .filter(|d| only.takes(&d.destination, d.state))
                .collect();
            lock_keys(
                &tx,
                finals
                    .iter()
                    .map(|d| (d.destination.as_str(), d.ordering_key.as_str())),
            )
            .await?;
            let mut deltas = Deltas::default();
            let mut ready = Vec::new();
            for d in &finals {
                let seq = big(d.seq);
                // Back in its original place in the key's order. Ready only if its key has
                // nothing unfinished (or it is itself the dead delivery holding the key);
                // otherwise it is promoted when the active head of its key finishes.
                let is_head = match head_of(&tx, &d.destination, &d.ordering_key).await? {
                    None => true,
                    Some(head) => head == seq,
                };
                let ready_at = is_head.then_some(now);
                if is_head {
                    ready.push(d.destination.as_str());
                }
                execute(
                    &tx,
                    "UPDATE passerelle_deliveries SET state = 'pending', attempts = 0, \
                         enqueued_at_ms = $3, next_attempt_ms = $3, dead_reason = NULL, \
                         holds_key = true, ready_at_ms = $4 \
                     WHERE destination = $1 AND seq = $2",
                    &[&d.destination, &seq, &now, &ready_at],
                )
                .await?;
                deltas.moved(&d.destination, d.state, DeliveryState::Pending);
            }
            let transition = [Transition {
                at_ms: now as u64,
                state: "replayed".to_owned(),
                detail: format!("{} deliveries queued again", finals.len()),
            }];
            execute(
                &tx,
                "UPDATE passerelle_messages SET bundle = COALESCE($2, bundle), \
                     history = history || $3::jsonb WHERE id = $1",
                &[&sql_id, &bundle, &Json(&transition)],
            )
            .await?;
            notify_ready(&tx, ready).await?;
            self.apply(&tx, deltas).await?;
            tx.commit().await?;
            Ok(finals.len())
        })
    }

    async fn purge(&self, id: MessageId) -> Result<bool, StoreError> {
        let Ok(sql_id) = i64::try_from(id) else {
            return Ok(false);
        };
        on_connection!(self, "purge", |c| async {
            let tx = c.transaction().await?;
            let purged = self.purge_in(&tx, sql_id).await?;
            tx.commit().await?;
            Ok(purged)
        })
    }

    async fn prune_delivered(&self, before_ms: Millis) -> Result<usize, StoreError> {
        const BATCH: i64 = 500;
        let before = big(before_ms);
        let mut pruned = 0;
        let mut after = 0i64;
        loop {
            let ids: Vec<i64> = on_connection!(self, "find delivered messages", |c| async {
                let rows = c
                    .query(
                        "SELECT m.id FROM passerelle_messages m \
                         WHERE m.state = 'mapped' AND m.received_at_ms < $1 AND m.id > $2 \
                           AND NOT EXISTS (SELECT 1 FROM passerelle_deliveries d \
                               WHERE d.message_id = m.id AND d.state <> 'delivered') \
                         ORDER BY m.id LIMIT $3",
                        &[&before, &after, &BATCH],
                    )
                    .await?;
                Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            })?;
            let Some(&last) = ids.last() else {
                return Ok(pruned);
            };
            after = last;
            for id in ids {
                // Delivered everywhere when looked at; a replay since then makes purge refuse.
                match self.purge(id as u64).await {
                    Ok(true) => pruned += 1,
                    Ok(false) | Err(StoreError::WrongState { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    async fn get(&self, id: MessageId) -> Result<Option<MessageRecord>, StoreError> {
        let Ok(sql_id) = i64::try_from(id) else {
            return Ok(None);
        };
        on_connection!(self, "get", |c| async {
            let tx = c.transaction().await?;
            let Some(row) = query_opt(
                &tx,
                &format!("SELECT {MESSAGE_COLUMNS} FROM passerelle_messages WHERE id = $1"),
                &[&sql_id],
            )
            .await?
            else {
                return Ok(None);
            };
            let mut record = message_from(&row)?;
            record.deliveries = self
                .refs_of(&tx, &[sql_id])
                .await?
                .remove(&sql_id)
                .unwrap_or_default();
            tx.commit().await?;
            Ok(Some(record))
        })
    }

    async fn raw(&self, id: MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        let Ok(sql_id) = i64::try_from(id) else {
            return Ok(None);
        };
        on_connection!(self, "raw", |c| async {
            let row = c
                .query_opt(
                    "SELECT frame FROM passerelle_frames WHERE id = $1",
                    &[&sql_id],
                )
                .await?;
            Ok(row.map(|r| r.try_get::<_, Vec<u8>>(0)).transpose()?)
        })
    }

    async fn deliveries(&self, id: MessageId) -> Result<Vec<Delivery>, StoreError> {
        let sql_id = i64::try_from(id).map_err(|_| StoreError::NotFound(id))?;
        on_connection!(self, "deliveries", |c| async {
            let tx = c.transaction().await?;
            if query_opt(
                &tx,
                "SELECT 1 FROM passerelle_messages WHERE id = $1",
                &[&sql_id],
            )
            .await?
            .is_none()
            {
                return Err(StoreError::NotFound(id));
            }
            let deliveries = deliveries_of(&tx, sql_id, false).await?;
            tx.commit().await?;
            Ok(deliveries)
        })
    }

    async fn list(&self, q: &Query) -> Result<Page, StoreError> {
        let limit = if q.limit == 0 { 100 } else { q.limit };
        let after = q.after.map_or(0, big);
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(after)];
        let mut conditions = vec!["m.id > $1".to_owned()];
        let mut bind = |value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            format!("${}", params.len())
        };
        if let Some(before) = q.before {
            conditions.push(format!("m.id < {}", bind(Box::new(big(before)))));
        }
        if let Some(s) = q.state {
            conditions.push(format!("m.state = {}", bind(Box::new(s.name()))));
        }
        if let Some(r) = &q.route {
            conditions.push(format!("m.route = {}", bind(Box::new(clean(r)))));
        }
        if let Some(t) = q.since_ms {
            conditions.push(format!("m.received_at_ms >= {}", bind(Box::new(big(t)))));
        }
        if let Some(t) = q.until_ms {
            conditions.push(format!("m.received_at_ms < {}", bind(Box::new(big(t)))));
        }
        if let Some(c) = &q.control_id {
            conditions.push(format!("m.control_id = {}", bind(Box::new(clean(c)))));
        }
        // One delivery must match every delivery filter, as with sled.
        let mut on_delivery = Vec::new();
        if let Some(d) = &q.destination {
            on_delivery.push(format!("d.destination = {}", bind(Box::new(d.clone()))));
        }
        if let Some(s) = q.delivery_state {
            on_delivery.push(format!("d.state = {}", bind(Box::new(s.name()))));
        }
        if let Some(k) = &q.ordering_key {
            on_delivery.push(format!("d.ordering_key = {}", bind(Box::new(clean(k)))));
        }
        if !on_delivery.is_empty() {
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM passerelle_deliveries d WHERE d.message_id = m.id AND {})",
                on_delivery.join(" AND ")
            ));
        }
        let fetch = bind(Box::new(big(limit as u64).saturating_add(1)));
        let sql = format!(
            "SELECT {} FROM passerelle_messages m WHERE {} ORDER BY m.id {} LIMIT {fetch}",
            MESSAGE_COLUMNS
                .split(", ")
                .map(|c| format!("m.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            conditions.join(" AND "),
            if q.newest_first { "DESC" } else { "ASC" }
        );
        on_connection!(self, "list", |c| async {
            let tx = c.transaction().await?;
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let rows = tx.query(&sql, &refs).await?;
            let more = rows.len() > limit;
            // A row that cannot be read is reported and left out, as sled leaves out a
            // quarantined record: one bad row must not hide the others.
            let mut items = Vec::with_capacity(limit);
            for row in rows.iter().take(limit) {
                match message_from(row) {
                    Ok(record) => items.push(record),
                    Err(e) => {
                        tracing::error!(error = %e, "a message row cannot be read; left out of the list")
                    }
                }
            }
            let ids: Vec<i64> = items.iter().map(|r| big(r.id)).collect();
            let mut refs = self.refs_of(&tx, &ids).await?;
            for record in &mut items {
                record.deliveries = refs.remove(&big(record.id)).unwrap_or_default();
            }
            tx.commit().await?;
            let next = if more {
                items.last().map(|r| r.id)
            } else {
                None
            };
            Ok(Page { items, next })
        })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        on_connection!(self, "counts", |c| async {
            let rows = c
                .query(
                    "SELECT name, sum(value)::bigint FROM passerelle_counters GROUP BY name",
                    &[],
                )
                .await?;
            let mut counts = Counts::default();
            for row in &rows {
                let name: String = row.try_get(0)?;
                let n = row.try_get::<_, i64>(1)?.max(0) as u64;
                if let Some(state) = name.strip_prefix("m/") {
                    counts.messages.insert(state.to_owned(), n);
                } else if let Some(rest) = name.strip_prefix("d/")
                    && let Some((dest, state)) = rest.rsplit_once('/')
                {
                    counts
                        .deliveries
                        .insert((dest.to_owned(), state.to_owned()), n);
                }
            }
            Ok(counts)
        })
    }

    /// Every `journal` and every other change returned after its transaction committed:
    /// there is nothing left to flush.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Fired by this node's listening connection when any node (this one included)
    /// commits deliveries of `destination` that are ready.
    fn work_signal(&self, destination: &str) -> WorkSignal {
        self.wakers.subscribe(destination)
    }
}

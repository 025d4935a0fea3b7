//! The embedded store, on sled 0.34.7. See the crate documentation for the layout and
//! the durability guarantee.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::{be, decode, encode, open, read_be, seal};
use crate::commit::{GroupCommit, GroupCommitConfig};
use crate::retry::{Jitter, settle};
use crate::space::{APPLY_EVERY, Layered, Space, Writes};
use crate::types::*;
use crate::wal::{Logged, Wal, WalRecord};
use crate::{Store, StoreError};

const SCHEMA_VERSION: &str = "1";

/// Where time comes from: the system clock, or a manual one in tests.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now_ms(&self) -> Millis;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: Millis) -> Self {
        ManualClock(AtomicU64::new(start_ms))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: Millis) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Settings of the sled store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// sled's page cache (sled's default of 1 GiB is too much for a small VM). It bounds
    /// the cached pages; sled's per-page bookkeeping comes on top and grows with the
    /// number of stored messages (see the crate documentation).
    pub cache_capacity: u64,
    /// Background flush interval for what is not journaled (outcomes, attempts).
    pub flush_every: Duration,
    pub group_commit: GroupCommitConfig,
    /// How long a lease lasts before the delivery is given to another worker.
    pub visibility_timeout: Duration,
    /// Whether a dead delivery lets the next message with its ordering key go on (true), or
    /// holds the key until an operator replays or purges it (false).
    pub dead_letter_releases_key: bool,
    pub clock: Arc<dyn Clock>,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            cache_capacity: 64 * 1024 * 1024,
            flush_every: Duration::from_millis(500),
            group_commit: GroupCommitConfig::default(),
            visibility_timeout: Duration::from_secs(120),
            dead_letter_releases_key: true,
            clock: Arc::new(SystemClock),
        }
    }
}

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    /// Every record, under one-byte prefixes (see [`Space`]), behind the overlay that
    /// hands changes to sled in atomic groups.
    data: Arc<Layered>,
    messages: Space,
    /// A message's frame, then its bundle once mapped (see [`payload`]). The bundle is not
    /// in the record: a record is decoded and encoded at every state change, and a bundle
    /// inside it was most of its bytes (escaped, as a string).
    payloads: Space,
    /// Frames alone, as stores written before `payloads` keep them (read, never written).
    legacy_raw: Space,
    deliveries: Space,
    keys: Space,
    ready: Space,
    inflight: Space,
    counts: Space,
    index: Space,
    quarantine: sled::Tree,
    /// Serialises changes: each reads (scans, counters) then commits one [`Writes`].
    queue_lock: Arc<Mutex<()>>,
    /// Held while a generation of the overlay is applied to sled: one at a time, in order.
    apply_lock: Arc<Mutex<()>>,
    /// Shared by a journal record's append and commit, taken alone by a checkpoint's
    /// switch to a new log segment (see the wal module).
    switch_lock: Arc<RwLock<()>>,
    /// The journal's write-ahead log (what group commit syncs).
    wal: Arc<Wal>,
    commit: Arc<GroupCommit>,
    /// Stops (and joins) the checkpoint thread when the store is dropped.
    _checkpointer: Checkpointer,
    /// Stops the applier when the store is dropped, after a last apply.
    _applier: Applier,
    /// Journal records the log gave back to sled on open.
    recovered: usize,
    config: StoreConfig,
    jitter: Jitter,
    /// Per destination, a sequence number below which every delivery is final, so that
    /// finding the oldest unfinished one scans only what finished since the last look.
    /// Only an optimisation: it lives in memory and restarts at 0. Replay lowers it
    /// (holding this lock) before it makes an old delivery unfinished again.
    low_water: Mutex<std::collections::HashMap<String, u64>>,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish()
    }
}

fn dest_prefix(destination: &str) -> Vec<u8> {
    let mut k = destination.as_bytes().to_vec();
    k.push(0);
    k
}

fn delivery_key(destination: &str, seq: u64) -> Vec<u8> {
    let mut k = dest_prefix(destination);
    k.extend_from_slice(&be(seq));
    k
}

fn key_prefix(destination: &str, ordering_key: &str) -> Vec<u8> {
    let mut k = dest_prefix(destination);
    k.extend_from_slice(&(ordering_key.len() as u32).to_be_bytes());
    k.extend_from_slice(ordering_key.as_bytes());
    k
}

fn key_entry(destination: &str, ordering_key: &str, seq: u64) -> Vec<u8> {
    let mut k = key_prefix(destination, ordering_key);
    k.extend_from_slice(&be(seq));
    k
}

fn timed_key(destination: &str, at_ms: u64, seq: u64) -> Vec<u8> {
    let mut k = dest_prefix(destination);
    k.extend_from_slice(&be(at_ms));
    k.extend_from_slice(&be(seq));
    k
}

fn index_key(kind: u8, value: &str, id: MessageId) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k.extend_from_slice(&be(id));
    k
}

/// The spaces a journal record touches: borrowed from the store, or during recovery from
/// the spaces the store is about to own.
struct JournalSpaces<'a> {
    messages: &'a Space,
    payloads: &'a Space,
    index: &'a Space,
    counts: &'a Space,
}

impl JournalSpaces<'_> {
    /// The batch that journals a message: its record (`value`, encoded), its frame
    /// (`payload`, sealed), its control-id index entry and its state's counter.
    fn writes(&self, record: &MessageRecord, value: &[u8], payload: &[u8]) -> Writes {
        let key = be(record.id);
        let mut w = Writes::default();
        w.insert(self.messages, key, value);
        w.insert(self.payloads, key, payload);
        if let Some(m) = &record.msh {
            w.insert(
                self.index,
                index_key(b'c', &m.control_id, record.id).as_slice(),
                &[][..],
            );
        }
        w.bump(self.counts, &message_counter(record.state), 1);
        w
    }

    /// Applies a record from the log again, unless the store already has its message
    /// (in sled, or in a generation replayed before it).
    fn recover(&self, data: &Layered, r: WalRecord) -> Result<(), StoreError> {
        if self.messages.get(be(r.id))?.is_some() {
            return Ok(());
        }
        let Some(record) = decode::<MessageRecord>(&r.record) else {
            // The frame is intact (the log record's CRC held); only what was noted about
            // it does not read. The message was acknowledged: it is kept, as received
            // now, so that the engine routes and maps it again from its frame.
            tracing::error!(
                id = r.id,
                "a journal log record's metadata does not decode; its message is kept as received, to be mapped again"
            );
            let record = unreadable_metadata_record(r.id, r.frame.len(), SystemClock.now_ms());
            self.writes(&record, &encode(&record), &payload(&r.frame, None))
                .commit(data)?;
            return Ok(());
        };
        let mut w = self.writes(&record, &r.record, &payload(&r.frame, None));
        // An operator's corrected copy whose original lost its side of the link (a crash
        // between the log's sync and sled's flush): linked again, at the copy's time.
        if let Some(original) = record.links.resubmitted_from
            && let Some(value) = self.messages.get(be(original))?
            && let Some(mut before) = decode::<MessageRecord>(&value)
            && !before.links.resubmitted_as.contains(&record.id)
        {
            before.links.resubmitted_as.push(record.id);
            before.history.push(crate::resubmitted_as_transition(
                record.received_at_ms,
                record.id,
            ));
            w.insert(self.messages, be(original), encode(&before).as_slice());
        }
        w.commit(data)?;
        Ok(())
    }
}

/// The record of a frame journaled now: `received`, or `rejected` with its parse error.
fn new_record(id: MessageId, now: Millis, frame: &[u8], meta: JournalMeta) -> MessageRecord {
    let (state, detail) = match &meta.rejected {
        Some(error) => (MessageState::Rejected, error.clone()),
        None => (MessageState::Received, String::new()),
    };
    MessageRecord {
        id,
        received_at_ms: now,
        listener: meta.listener,
        peer: meta.peer,
        size: frame.len() as u64,
        msh: meta.msh,
        route: None,
        state,
        error: meta.rejected,
        bundle: None,
        deliveries: Vec::new(),
        history: vec![Transition {
            at_ms: now,
            state: state.name().to_owned(),
            detail,
        }],
        links: Links::default(),
    }
}

/// The record of a message whose frame the journal log kept but whose record does not
/// read: received (to be routed and mapped again), its origin unknown.
fn unreadable_metadata_record(id: MessageId, size: usize, now: Millis) -> MessageRecord {
    let state = MessageState::Received;
    MessageRecord {
        id,
        received_at_ms: now,
        listener: String::new(),
        peer: String::new(),
        size: size as u64,
        msh: None,
        route: None,
        state,
        error: None,
        bundle: None,
        deliveries: Vec::new(),
        history: vec![Transition {
            at_ms: now,
            state: state.name().to_owned(),
            detail: "recovered from the journal log, whose record of it did not read: \
                     listener, peer and reception time unknown"
                .to_owned(),
        }],
        links: Links::default(),
    }
}

/// What checkpoints and the applier share with the store.
#[derive(Debug, Clone)]
struct Shared {
    db: sled::Db,
    /// The store's folder (sled's file is `db` in it).
    path: PathBuf,
    wal: Arc<Wal>,
    data: Arc<Layered>,
    queue_lock: Arc<Mutex<()>>,
    apply_lock: Arc<Mutex<()>>,
    switch_lock: Arc<RwLock<()>>,
}

/// Flushes sled so that what it holds survives a power loss, before the journal's log
/// lets go of it. sled writes its buffers out with `sync_file_range`, which neither
/// commits the file's size nor empties the disk's write cache: an `fsync` of its file
/// does both.
fn flush_durably(db: &sled::Db, path: &Path) -> Result<(), sled::Error> {
    db.flush()?;
    File::open(path.join("db")).and_then(|f| f.sync_all())?;
    Ok(())
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Hands the overlay to sled: one generation, logged and synced first.
    fn apply(&self) -> Result<(), sled::Error> {
        let _apply = lock(&self.apply_lock);
        self.data.apply(|record| self.wal.log_generation(record))
    }

    /// Starts a new log segment, hands sled every change made so far and flushes it (sled
    /// then holds every record of the older segments), and deletes the older segments.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let keep_from = {
            // The apply lock first: the generation sealed below is the only one in flight.
            let _apply = lock(&self.apply_lock);
            let keep_from = {
                // No journal record between its append and its commit meanwhile.
                let _appends = self.switch_lock.write().unwrap_or_else(|p| p.into_inner());
                self.wal.switch().map_err(sled::Error::Io)?
            };
            // Every change committed before the switch is in the overlay: to sled with it
            // (its generation record goes to the new segment, which stays).
            self.data.apply(|record| self.wal.log_generation(record))?;
            keep_from
        };
        flush_durably(&self.db, &self.path)?;
        self.wal.retire_before(keep_from).map_err(sled::Error::Io)?;
        Ok(())
    }
}

/// Checkpoints in the background: when the log passes [`CHECKPOINT_BYTES`], or holds
/// records older than [`CHECKPOINT_EVERY`], so that it stays small and a restart quick.
#[derive(Debug)]
struct Checkpointer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

impl Checkpointer {
    fn start(shared: Shared) -> io::Result<Checkpointer> {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("passerelle-checkpoint".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                loop {
                    let (lock, signal) = &*thread_stop;
                    let stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let (stopped, _) = signal
                        .wait_timeout(stopped, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner());
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    let pending = shared.wal.pending_bytes();
                    // A damaged segment takes no more records (every journal call fails)
                    // until a checkpoint starts a new one: at once, then.
                    let due = pending >= CHECKPOINT_BYTES
                        || (pending > 0 && last.elapsed() >= CHECKPOINT_EVERY)
                        || shared.wal.is_damaged();
                    if due {
                        if let Err(e) = shared.checkpoint() {
                            tracing::error!(error = %e, "journal checkpoint failed; retrying");
                        }
                        last = std::time::Instant::now();
                    }
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, signal) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        signal.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hands the overlay to sled every [`APPLY_EVERY`], or sooner when it has grown (see the
/// `space` module); on drop, once more, so that a store closed in order keeps every change.
#[derive(Debug)]
struct Applier {
    stop: Arc<std::sync::atomic::AtomicBool>,
    data: Arc<Layered>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Applier {
    fn start(shared: Shared) -> io::Result<Applier> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let data = Arc::clone(&shared.data);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("passerelle-apply".into())
            .spawn(move || {
                loop {
                    let stopping = thread_stop.load(Ordering::SeqCst);
                    match shared.apply() {
                        Ok(()) if stopping => return,
                        Ok(()) => shared.data.wait_for_growth(APPLY_EVERY),
                        Err(e) if stopping => {
                            // Closing: the journal log still has every acknowledged frame.
                            tracing::error!(error = %e, "applying the last changes to sled failed; they will be redone");
                            return;
                        }
                        Err(e) => {
                            // The generation stays in the overlay (readable) and is tried
                            // again, a second later: a full disk is not fixed in 10 ms.
                            tracing::error!(error = %e, "applying changes to sled failed; retrying in 1 s");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })?;
        Ok(Applier {
            stop,
            data,
            thread: Some(thread),
        })
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.data.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A message's payload, sealed: `[1 if a bundle follows, else 0][frame length u32]
/// [frame][bundle]`. One value for both, so that a message costs sled one key less (sled
/// keeps bookkeeping in memory for every page of keys: see the crate doc).
fn payload(frame: &[u8], bundle: Option<&[u8]>) -> Vec<u8> {
    let bundle_len = bundle.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(1 + 4 + frame.len() + bundle_len + 4);
    out.push(u8::from(bundle.is_some()));
    // Frames are bounded far below 4 GiB by the listener (`max_frame_bytes`).
    out.extend_from_slice(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(frame);
    if let Some(b) = bundle {
        out.extend_from_slice(b);
    }
    seal(out)
}

/// The frame and the bundle (if any) of an opened payload; `None` if it is malformed.
fn split_payload(payload: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (&flag, rest) = payload.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let frame = rest.get(4..4 + len)?;
    let bundle = &rest[4 + len..];
    match flag {
        0 if bundle.is_empty() => Some((frame, None)),
        1 => Some((frame, Some(bundle))),
        _ => None,
    }
}

fn message_counter(state: MessageState) -> Vec<u8> {
    format!("m/{}", state.name()).into_bytes()
}

fn delivery_counter(destination: &str, state: DeliveryState) -> Vec<u8> {
    format!("d/{destination}/{}", state.name()).into_bytes()
}

impl SledStore {
    /// Opens (or creates) the store. In-flight leases left by a previous run return to ready.
    pub fn open(config: StoreConfig) -> Result<SledStore, StoreError> {
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(Some(config.flush_every.as_millis().max(1) as u64));
        // sled releases its file lock when its background flusher lets go of the database,
        // which can be a moment after the last handle is dropped: a store closed and
        // reopened in the same process waits for it (briefly; another process holding the
        // store still gets the error).
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let db = loop {
            match sled_config.open() {
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::InUse);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION.as_bytes() => {}
            Some(v) => {
                return Err(StoreError::Schema {
                    path: config.path.display().to_string(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                    expected: SCHEMA_VERSION.to_owned(),
                });
            }
        }
        let data = Layered::new(db.open_tree("data")?);
        let messages = Space::new(&data, b'm');
        let payloads = Space::new(&data, b'p');
        let index = Space::new(&data, b'i');
        let counts = Space::new(&data, b'c');
        let spaces = JournalSpaces {
            messages: &messages,
            payloads: &payloads,
            index: &index,
            counts: &counts,
        };
        // Message ids come from sled's generator, which persists a high-water mark every
        // million ids and restarts two marks above the last one on disk. The first mark
        // after a restart is not waited for: two crashes in a row before sled writes it
        // out (nothing else forces sled's buffer out early now that generations reach it
        // without batches) would hand out the same ids again. Drawn now, the mark is
        // written out by the durable flush that ends the log's recovery below.
        db.generate_id()?;
        let (wal, recovered) = Wal::recover(
            &config.path,
            |r| match r {
                Logged::Journal(r) => spaces.recover(&data, r).map_err(io::Error::other),
                Logged::Generation(ops) => {
                    data.replay(ops);
                    Ok(())
                }
            },
            || {
                // The replayed records go to sled (recovery is single-threaded: no lock).
                // Not logged again: the old segments stay until sled is flushed.
                data.apply(|_| Ok(())).map_err(io::Error::other)?;
                flush_durably(&db, &config.path).map_err(io::Error::other)
            },
        )
        .map_err(sled::Error::Io)?;
        if recovered > 0 {
            tracing::info!(
                records = recovered,
                "journal log replayed: acknowledged frames sled had not flushed"
            );
        }
        let wal = Arc::new(wal);
        let commit = Arc::new(GroupCommit::start(
            {
                let wal = Arc::clone(&wal);
                move || wal.sync()
            },
            config.group_commit,
        ));
        let shared = Shared {
            db: db.clone(),
            path: config.path.clone(),
            wal: Arc::clone(&wal),
            data: Arc::clone(&data),
            queue_lock: Arc::new(Mutex::new(())),
            apply_lock: Arc::new(Mutex::new(())),
            switch_lock: Arc::new(RwLock::new(())),
        };
        let checkpointer = Checkpointer::start(shared.clone()).map_err(sled::Error::Io)?;
        let applier = Applier::start(shared.clone()).map_err(sled::Error::Io)?;
        let seed = config.clock.now_ms();
        let store = SledStore {
            messages,
            payloads,
            legacy_raw: Space::new(&data, b'r'),
            deliveries: Space::new(&data, b'd'),
            keys: Space::new(&data, b'k'),
            ready: Space::new(&data, b'q'),
            inflight: Space::new(&data, b'f'),
            counts,
            index,
            data,
            quarantine: db.open_tree("quarantine")?,
            path: config.path.clone(),
            db,
            queue_lock: shared.queue_lock,
            apply_lock: shared.apply_lock,
            switch_lock: shared.switch_lock,
            wal,
            commit,
            _checkpointer: checkpointer,
            _applier: applier,
            recovered,
            config,
            jitter: Jitter::new(seed),
            low_water: Mutex::new(std::collections::HashMap::new()),
        };
        let returned = store.release_all_leases()?;
        if returned > 0 {
            tracing::info!(
                leases = returned,
                "in-flight deliveries from the previous run returned to ready"
            );
        }
        Ok(store)
    }

    /// The store's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Journal records replayed from the log on open (acknowledged frames sled had not
    /// flushed before the previous run ended).
    pub fn recovered_on_open(&self) -> usize {
        self.recovered
    }

    /// Flushes done by group commit so far.
    pub fn flush_count(&self) -> u64 {
        self.commit.flush_count()
    }

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn now(&self) -> Millis {
        self.config.clock.now_ms()
    }

    fn journal_spaces(&self) -> JournalSpaces<'_> {
        JournalSpaces {
            messages: &self.messages,
            payloads: &self.payloads,
            index: &self.index,
            counts: &self.counts,
        }
    }

    /// Appends a journaled message (its encoded `record` and its `frame`) to the journal
    /// log and commits `w`, its batch, to the overlay; returns the group-commit ticket to
    /// wait for. The two happen with no switch of log segment in between (see the wal
    /// module). `w` reads nothing it writes back but its counters, which the overlay
    /// updates under its own lock: a journal call needs no queue lock.
    fn log_and_commit(
        &self,
        id: MessageId,
        record: &[u8],
        frame: &[u8],
        w: Writes,
    ) -> Result<u64, StoreError> {
        let _no_switch = self.switch_lock.read().unwrap_or_else(|p| p.into_inner());
        self.wal
            .append(id, record, frame)
            .map_err(sled::Error::Io)?;
        // The log syncs (on the blocking pool) while sled takes the same record.
        let ticket = self.commit.ticket_and_start();
        w.commit(&self.data)?;
        Ok(ticket)
    }

    fn low_water(&self) -> MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.low_water.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called before a final delivery becomes unfinished again.
    fn lower_low_water(&self, destination: &str, seq: u64) {
        if let Some(mark) = self.low_water().get_mut(destination) {
            *mark = (*mark).min(seq);
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.queue_lock)
    }

    fn shared(&self) -> Shared {
        Shared {
            db: self.db.clone(),
            path: self.path.clone(),
            wal: Arc::clone(&self.wal),
            data: Arc::clone(&self.data),
            queue_lock: Arc::clone(&self.queue_lock),
            apply_lock: Arc::clone(&self.apply_lock),
            switch_lock: Arc::clone(&self.switch_lock),
        }
    }

    /// Moves a damaged value out of the way and reports it.
    fn quarantine_value(&self, tree: &'static str, key: &[u8], value: &[u8]) -> StoreError {
        let mut qkey = tree.as_bytes().to_vec();
        qkey.push(0);
        qkey.extend_from_slice(key);
        let moved = (|| -> Result<(), sled::Error> {
            self.quarantine.insert(qkey, value)?;
            match tree {
                "messages" => self.messages.remove(key)?,
                "payloads" => self.payloads.remove(key)?,
                "raw" => self.legacy_raw.remove(key)?,
                "deliveries" => self.deliveries.remove(key)?,
                _ => {}
            }
            self.counts.add("quarantined", 1)?;
            Ok(())
        })();
        let key_text = read_be(key)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("{key:02x?}"));
        match moved {
            Ok(()) => tracing::error!(tree, key = %key_text, "corrupted record quarantined"),
            Err(e) => {
                tracing::error!(tree, key = %key_text, error = %e, "corrupted record; quarantine failed")
            }
        }
        StoreError::Corrupt {
            tree,
            key: key_text,
        }
    }

    fn read_message(&self, id: MessageId) -> Result<Option<MessageRecord>, StoreError> {
        let key = be(id);
        match self.messages.get(key)? {
            None => Ok(None),
            Some(v) => decode(&v)
                .map(Some)
                .ok_or_else(|| self.quarantine_value("messages", &key, &v)),
        }
    }

    /// A message's frame: from its payload, or alone in a store written before payloads.
    fn read_frame(&self, id: MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        let key = be(id);
        if let Some(v) = self.payloads.get(key)? {
            return match open(&v).and_then(split_payload) {
                Some((frame, _)) => Ok(Some(frame.to_vec())),
                None => Err(self.quarantine_value("payloads", &key, &v)),
            };
        }
        match self.legacy_raw.get(key)? {
            None => Ok(None),
            Some(v) => match open(&v) {
                Some(frame) => Ok(Some(frame.to_vec())),
                None => Err(self.quarantine_value("raw", &key, &v)),
            },
        }
    }

    fn read_delivery(&self, destination: &str, seq: u64) -> Result<Option<Delivery>, StoreError> {
        let key = delivery_key(destination, seq);
        match self.deliveries.get(&key)? {
            None => Ok(None),
            Some(v) => decode(&v)
                .map(Some)
                .ok_or_else(|| self.quarantine_value("deliveries", &key, &v)),
        }
    }

    /// The first unfinished delivery of a key, if any.
    fn head_of(&self, destination: &str, ordering_key: &str) -> Result<Option<u64>, StoreError> {
        let prefix = key_prefix(destination, ordering_key);
        Ok(match self.keys.scan_prefix(&prefix).next() {
            Some(entry) => read_be(&entry?.0[prefix.len()..]),
            None => None,
        })
    }

    /// The delivery that becomes the head of `key` once `seq` leaves it.
    fn successor(
        &self,
        destination: &str,
        ordering_key: &str,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let prefix = key_prefix(destination, ordering_key);
        for entry in self.keys.scan_prefix(&prefix) {
            let (k, _) = entry?;
            if let Some(next) = read_be(&k[prefix.len()..])
                && next != seq
            {
                return Ok(Some(next));
            }
        }
        Ok(None)
    }

    fn release_all_leases(&self) -> Result<usize, StoreError> {
        self.requeue_leases(u64::MAX)
    }

    /// Returns the leases that end at or before `until` to ready.
    fn requeue_leases(&self, until: Millis) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let now = self.now();
        let mut expired = Vec::new();
        for entry in self.inflight.iter() {
            let (k, _) = entry?;
            let Some(zero) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let destination = String::from_utf8_lossy(&k[..zero]).into_owned();
            let (Some(lease_end), Some(seq)) = (read_be(&k[zero + 1..]), read_be(&k[zero + 9..]))
            else {
                continue;
            };
            if lease_end <= until {
                expired.push((k.to_vec(), destination, seq));
            }
        }
        let mut count = 0;
        for (inflight_key, destination, seq) in expired {
            let Some(mut d) = self.read_delivery(&destination, seq)? else {
                self.inflight.remove(&inflight_key)?;
                continue;
            };
            d.state = DeliveryState::Pending;
            d.next_attempt_ms = now;
            let dkey = delivery_key(&destination, seq);
            let value = encode(&d);
            let mut w = Writes::default();

            w.remove(&self.inflight, inflight_key.as_slice());
            w.insert(&self.deliveries, dkey.as_slice(), value.as_slice());
            w.insert(&self.ready, timed_key(&destination, now, seq), &[][..]);
            w.bump(
                &self.counts,
                &delivery_counter(&destination, DeliveryState::InFlight),
                -1,
            );
            w.bump(
                &self.counts,
                &delivery_counter(&destination, DeliveryState::Pending),
                1,
            );

            w.commit(&self.data)?;
            count += 1;
        }
        Ok(count)
    }

    /// Test support: overwrite a stored value with raw bytes (to simulate damage).
    #[doc(hidden)]
    pub fn debug_overwrite_message(&self, id: MessageId, bytes: &[u8]) -> Result<(), StoreError> {
        self.messages.insert(be(id), bytes)?;
        Ok(())
    }

    /// Test support: overwrite a message's frame and bundle with raw bytes (to simulate
    /// damage).
    #[doc(hidden)]
    pub fn debug_overwrite_payload(&self, id: MessageId, bytes: &[u8]) -> Result<(), StoreError> {
        self.payloads.insert(be(id), bytes)?;
        Ok(())
    }

    /// Test support: disagreements between delivery records and the ready and lease
    /// indexes (a delivery ready or leased twice, an index entry whose delivery is in
    /// another state). Empty when the store is consistent.
    #[doc(hidden)]
    pub fn debug_check_indexes(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut seen: std::collections::HashMap<(String, u64), u8> = Default::default();
        for (space, name, wanted) in [
            (
                &self.ready,
                "ready",
                &[DeliveryState::Pending, DeliveryState::RetryWait][..],
            ),
            (&self.inflight, "leased", &[DeliveryState::InFlight][..]),
        ] {
            for entry in space.iter() {
                let (k, _) = entry?;
                let Some(zero) = k.iter().position(|&b| b == 0) else {
                    continue;
                };
                let destination = String::from_utf8_lossy(&k[..zero]).into_owned();
                let Some(seq) = k.get(zero + 9..).and_then(read_be) else {
                    continue;
                };
                *seen.entry((destination.clone(), seq)).or_default() += 1;
                match self.read_delivery(&destination, seq)? {
                    Some(d) if wanted.contains(&d.state) => {}
                    Some(d) => {
                        problems.push(format!("{destination}#{seq} {name} but {}", d.state.name()))
                    }
                    None => problems.push(format!("{destination}#{seq} {name} but missing")),
                }
            }
        }
        for ((destination, seq), n) in seen {
            if n > 1 {
                problems.push(format!("{destination}#{seq} indexed {n} times"));
            }
        }
        Ok(problems)
    }

    fn matches(&self, record: &MessageRecord, q: &Query) -> Result<bool, StoreError> {
        if q.state.is_some_and(|s| s != record.state)
            || q.route
                .as_ref()
                .is_some_and(|r| record.route.as_ref() != Some(r))
            || q.since_ms.is_some_and(|t| record.received_at_ms < t)
            || q.until_ms.is_some_and(|t| record.received_at_ms >= t)
            || q.control_id
                .as_ref()
                .is_some_and(|c| record.msh.as_ref().map(|m| &m.control_id) != Some(c))
        {
            return Ok(false);
        }
        if q.destination.is_none() && q.delivery_state.is_none() && q.ordering_key.is_none() {
            return Ok(true);
        }
        for r in &record.deliveries {
            if q.destination.as_ref().is_some_and(|d| *d != r.destination) {
                continue;
            }
            let Some(d) = self.read_delivery(&r.destination, r.seq)? else {
                continue;
            };
            if q.delivery_state.is_some_and(|s| s != d.state)
                || q.ordering_key
                    .as_ref()
                    .is_some_and(|k| *k != d.ordering_key)
            {
                continue;
            }
            return Ok(true);
        }
        Ok(false)
    }
}

impl Store for SledStore {
    async fn journal(&self, frame: &[u8], meta: JournalMeta) -> Result<MessageId, StoreError> {
        let id = self.db.generate_id()?;
        let record = new_record(id, self.now(), frame, meta);
        let value = encode(&record);
        let payload = payload(frame, None);
        let w = self.journal_spaces().writes(&record, &value, &payload);
        // Without the queue lock: a new message's records are new keys, and ACKs do not
        // wait behind routing outcomes and deliveries (measured: with 64 connections,
        // the mapper's outcomes waited 70 µs each for that lock).
        let ticket = self.log_and_commit(id, &value, frame, w)?;
        self.commit.wait(ticket).await?;
        Ok(id)
    }

    async fn resubmit(
        &self,
        original: MessageId,
        frame: &[u8],
        meta: JournalMeta,
    ) -> Result<MessageId, StoreError> {
        let id = self.db.generate_id()?;
        let ticket = {
            // The original is read, and both records written, under the lock: a change to
            // the original made meanwhile (its routing outcome) is not overwritten.
            let _guard = self.lock();
            let mut before = self
                .read_message(original)?
                .ok_or(StoreError::NotFound(original))?;
            let now = self.now();
            let mut record = new_record(id, now, frame, meta);
            record.history[0].detail =
                crate::resubmitted_from_detail(original, &record.history[0].detail);
            record.links = crate::copy_links(original, before.routing_listener());
            before.links.resubmitted_as.push(id);
            before
                .history
                .push(crate::resubmitted_as_transition(now, id));
            let value = encode(&record);
            let mut w = self
                .journal_spaces()
                .writes(&record, &value, &payload(frame, None));
            w.insert(&self.messages, be(original), encode(&before).as_slice());
            self.log_and_commit(id, &value, frame, w)?
        };
        self.commit.wait(ticket).await?;
        // Durable as a journaled frame is: the copy's log record carries the link, and a
        // crash before sled has the original's side of it links it again on open (see
        // `JournalSpaces::recover`), so no flush of sled is waited for here.
        Ok(id)
    }

    async fn record_outcome(&self, id: MessageId, outcome: Outcome) -> Result<(), StoreError> {
        // Built before the lock: a frame never changes once journaled, and copying it
        // with the bundle (a few KiB, and their CRC) need not hold up other changes.
        let new_payload = match &outcome {
            Outcome::Mapped { bundle, .. } => {
                let frame = self.read_frame(id)?.unwrap_or_default();
                Some(payload(&frame, Some(bundle.as_bytes())))
            }
            _ => None,
        };
        let _guard = self.lock();
        let mut record = self.read_message(id)?.ok_or(StoreError::NotFound(id))?;
        let before = record.state;
        crate::check_routable(id, before)?;
        let now = self.now();
        let mut new_deliveries = Vec::new();
        let (state, detail) = match outcome {
            Outcome::Unrouted => (MessageState::Unrouted, "no route matched".to_owned()),
            Outcome::Duplicate { of } => (MessageState::Duplicate, crate::duplicate_detail(of)),
            Outcome::MappingFailed { route, error } => {
                record.route = Some(route.clone());
                record.error = Some(error.clone());
                (MessageState::MappingFailed, error)
            }
            Outcome::Mapped {
                route,
                bundle: _,
                deliveries,
            } => {
                crate::validate_deliveries(&deliveries)?;
                record.route = Some(route.clone());
                record.bundle = None;
                record.error = None;
                for e in deliveries {
                    let seq = self.db.generate_id()?;
                    // Ready now if nothing of its key is unfinished before it.
                    let is_head = self.head_of(&e.destination, &e.ordering_key)?.is_none();
                    new_deliveries.push((e, seq, is_head));
                }
                let names: Vec<&str> = new_deliveries
                    .iter()
                    .map(|(e, _, _)| e.destination.as_str())
                    .collect();
                (
                    MessageState::Mapped,
                    format!("route {route}: queued for {}", names.join(", ")),
                )
            }
        };
        record.state = state;
        record
            .deliveries
            .extend(new_deliveries.iter().map(|(e, seq, _)| DeliveryRef {
                destination: e.destination.clone(),
                seq: *seq,
            }));
        record.history.push(Transition {
            at_ms: now,
            state: state.name().to_owned(),
            detail,
        });
        let value = encode(&record);
        let key = be(id);
        let mut w = Writes::default();

        w.insert(&self.messages, key, value.as_slice());
        if let Some(p) = new_payload {
            w.insert(&self.payloads, key, p);
        }
        w.bump(&self.counts, &message_counter(before), -1);
        w.bump(&self.counts, &message_counter(state), 1);
        for (e, seq, is_head) in &new_deliveries {
            let d = Delivery {
                destination: e.destination.clone(),
                seq: *seq,
                message_id: id,
                ordering_key: e.ordering_key.clone(),
                state: DeliveryState::Pending,
                attempts: 0,
                enqueued_at_ms: now,
                next_attempt_ms: now,
                lease_until_ms: 0,
                dead_reason: None,
                history: Vec::new(),
            };
            w.insert(
                &self.deliveries,
                delivery_key(&e.destination, *seq),
                encode(&d),
            );
            // New sequence numbers: sled cannot have these keys yet. Delivered before the
            // next apply, the delivery's entries never reach sled (see the space module).
            w.insert_new(
                &self.keys,
                key_entry(&e.destination, &e.ordering_key, *seq),
                &[][..],
            );
            if *is_head {
                w.insert_new(&self.ready, timed_key(&e.destination, now, *seq), &[][..]);
            }
            w.insert(&self.index, index_key(b'k', &e.ordering_key, id), &[][..]);
            w.bump(
                &self.counts,
                &delivery_counter(&e.destination, DeliveryState::Pending),
                1,
            );
        }

        w.commit(&self.data)?;
        Ok(())
    }

    async fn unprocessed(&self, limit: usize) -> Result<Vec<MessageId>, StoreError> {
        let mut out = Vec::new();
        for entry in self.messages.iter() {
            let (k, v) = entry?;
            match decode::<MessageRecord>(&v) {
                Some(r) if r.state == MessageState::Received => out.push(r.id),
                Some(_) => {}
                None => {
                    self.quarantine_value("messages", &k, &v);
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn lease(&self, destination: &str, max: usize) -> Result<Vec<Lease>, StoreError> {
        crate::validate_destination(destination)?;
        let _guard = self.lock();
        let now = self.now();
        let prefix = dest_prefix(destination);
        let mut due = Vec::new();
        for entry in self.ready.scan_prefix(&prefix) {
            let (k, _) = entry?;
            let (Some(at), Some(seq)) =
                (read_be(&k[prefix.len()..]), read_be(&k[prefix.len() + 8..]))
            else {
                continue;
            };
            if at > now || due.len() >= max {
                break;
            }
            due.push((k.to_vec(), seq));
        }
        let lease_until = now + self.config.visibility_timeout.as_millis() as u64;
        let mut leases = Vec::with_capacity(due.len());
        for (ready_key, seq) in due {
            let Some(mut d) = self.read_delivery(destination, seq)? else {
                self.ready.remove(&ready_key)?;
                continue;
            };
            let before = d.state;
            d.state = DeliveryState::InFlight;
            d.lease_until_ms = lease_until;
            let value = encode(&d);
            let dkey = delivery_key(destination, seq);
            let mut w = Writes::default();

            w.remove(&self.ready, ready_key.as_slice());
            w.insert(&self.deliveries, dkey.as_slice(), value.as_slice());
            // A delivery has one lease at a time, and this one starts now: a new key.
            w.insert_new(
                &self.inflight,
                timed_key(destination, lease_until, seq),
                &[][..],
            );
            w.bump(&self.counts, &delivery_counter(destination, before), -1);
            w.bump(
                &self.counts,
                &delivery_counter(destination, DeliveryState::InFlight),
                1,
            );

            w.commit(&self.data)?;
            leases.push(Lease {
                destination: destination.to_owned(),
                seq,
                message_id: d.message_id,
                ordering_key: d.ordering_key,
                attempt: d.attempts + 1,
                lease_until_ms: lease_until,
            });
        }
        Ok(leases)
    }

    async fn complete(
        &self,
        lease: &Lease,
        report: AttemptReport,
        policy: &RetryPolicy,
    ) -> Result<DeliveryState, StoreError> {
        let _guard = self.lock();
        let now = self.now();
        let destination = lease.destination.as_str();
        let lost = || StoreError::LeaseLost {
            destination: destination.to_owned(),
            seq: lease.seq,
        };
        let mut d = self
            .read_delivery(destination, lease.seq)?
            .ok_or_else(lost)?;
        if d.state != DeliveryState::InFlight || d.lease_until_ms != lease.lease_until_ms {
            return Err(lost());
        }
        let next_state = settle(&mut d, &report, policy, now, self.jitter.unit());
        let releases_key = next_state == DeliveryState::Delivered
            || next_state == DeliveryState::Dead
                && self.config.dead_letter_releases_key
                && !policy.dead_holds_key;
        let successor = if releases_key {
            self.successor(destination, &d.ordering_key, lease.seq)?
        } else {
            None
        };
        let value = encode(&d);
        let dkey = delivery_key(destination, lease.seq);
        let inflight_key = timed_key(destination, lease.lease_until_ms, lease.seq);
        let own_key = key_entry(destination, &d.ordering_key, lease.seq);
        let next_attempt = d.next_attempt_ms;
        let mut w = Writes::default();

        w.remove(&self.inflight, inflight_key.as_slice());
        w.insert(&self.deliveries, dkey.as_slice(), value.as_slice());
        w.bump(
            &self.counts,
            &delivery_counter(destination, DeliveryState::InFlight),
            -1,
        );
        w.bump(&self.counts, &delivery_counter(destination, next_state), 1);
        match next_state {
            DeliveryState::RetryWait => {
                w.insert(
                    &self.ready,
                    timed_key(destination, next_attempt, lease.seq),
                    &[][..],
                );
            }
            _ if releases_key => {
                w.remove(&self.keys, own_key.as_slice());
                if let Some(next) = successor {
                    w.insert(&self.ready, timed_key(destination, now, next), &[][..]);
                }
            }
            // A dead delivery that holds its key stays first in `keys`, not ready.
            _ => {}
        }

        w.commit(&self.data)?;
        Ok(next_state)
    }

    async fn requeue_expired(&self) -> Result<usize, StoreError> {
        self.requeue_leases(self.now())
    }

    async fn next_due_ms(&self, destination: &str) -> Result<Option<Millis>, StoreError> {
        let prefix = dest_prefix(destination);
        Ok(match self.ready.scan_prefix(&prefix).next() {
            Some(entry) => read_be(&entry?.0[prefix.len()..]),
            None => None,
        })
    }

    async fn oldest_unfinished_ms(&self, destination: &str) -> Result<Option<Millis>, StoreError> {
        // Held across the scan so that a concurrent replay's lowering is not overwritten.
        let mut marks = self.low_water();
        let start = marks.get(destination).copied().unwrap_or(0);
        let prefix = dest_prefix(destination);
        let mut next = start;
        let mut oldest = None;
        for entry in self.deliveries.range_from(delivery_key(destination, start)) {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Some(seq) = read_be(&key[prefix.len()..]) else {
                continue;
            };
            next = seq;
            match decode::<Delivery>(&value) {
                Some(d) if !d.state.is_final() => {
                    oldest = Some(d.enqueued_at_ms);
                    break;
                }
                Some(_) => next = seq + 1,
                None => {
                    // Reported and moved aside; the scan goes on.
                    let _ = self.quarantine_value("deliveries", &key, &value);
                    next = seq + 1;
                }
            }
        }
        marks.insert(destination.to_owned(), next);
        Ok(oldest)
    }

    async fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.size_on_disk()
    }

    async fn replay(
        &self,
        id: MessageId,
        bundle: Option<String>,
        only: &ReplaySelection,
    ) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let now = self.now();
        let mut record = self.read_message(id)?.ok_or(StoreError::NotFound(id))?;
        if record.state != MessageState::Mapped {
            return Err(StoreError::WrongState {
                id,
                state: record.state.name(),
                action: "replay",
                needed: "mapped (re-route other states with record_outcome)",
            });
        }
        let mut count = 0;
        for r in record.deliveries.clone() {
            let Some(mut d) = self.read_delivery(&r.destination, r.seq)? else {
                continue;
            };
            if !only.takes(&r.destination, d.state) {
                continue;
            }
            let before = d.state;
            // A dead delivery that held its key kept its entry in `keys` (see `complete`).
            let own_entry = key_entry(&r.destination, &d.ordering_key, r.seq);
            let held_key = before == DeliveryState::Dead && self.keys.get(&own_entry)?.is_some();
            // Back in its original place in the key's order. It is ready only if its key has
            // nothing unfinished (or it is itself the dead delivery holding the key);
            // otherwise it is promoted when the active head of its key finishes.
            let is_head = match self.head_of(&r.destination, &d.ordering_key)? {
                None => true,
                Some(head) => head == r.seq,
            };
            d.state = DeliveryState::Pending;
            d.attempts = 0;
            d.enqueued_at_ms = now;
            d.next_attempt_ms = now;
            d.dead_reason = None;
            let value = encode(&d);
            let dest = r.destination.clone();
            let okey = d.ordering_key.clone();
            let seq = r.seq;
            let mut w = Writes::default();

            self.lower_low_water(&dest, seq);
            w.insert(&self.deliveries, delivery_key(&dest, seq), value.as_slice());
            if !held_key {
                w.insert(&self.keys, key_entry(&dest, &okey, seq), &[][..]);
            }
            if is_head {
                w.insert(&self.ready, timed_key(&dest, now, seq), &[][..]);
            }
            w.bump(&self.counts, &delivery_counter(&dest, before), -1);
            w.bump(
                &self.counts,
                &delivery_counter(&dest, DeliveryState::Pending),
                1,
            );

            w.commit(&self.data)?;
            count += 1;
        }
        let mut w = Writes::default();
        if let Some(bundle) = bundle {
            record.bundle = None;
            let frame = self.read_frame(id)?.unwrap_or_default();
            w.insert(
                &self.payloads,
                be(id),
                payload(&frame, Some(bundle.as_bytes())),
            );
        }
        record.history.push(Transition {
            at_ms: now,
            state: "replayed".to_owned(),
            detail: format!("{count} deliveries queued again"),
        });
        w.insert(&self.messages, be(id), encode(&record));
        w.commit(&self.data)?;
        Ok(count)
    }

    async fn purge(&self, id: MessageId) -> Result<bool, StoreError> {
        let guard = self.lock();
        let Some(record) = self.read_message(id)? else {
            return Ok(false);
        };
        let mut deliveries = Vec::new();
        let mut promote = Vec::new();
        for r in &record.deliveries {
            if let Some(d) = self.read_delivery(&r.destination, r.seq)? {
                if !d.state.is_final() {
                    return Err(StoreError::WrongState {
                        id,
                        state: d.state.name(),
                        action: "purge",
                        needed: "every delivery delivered or dead",
                    });
                }
                // A dead delivery that holds its key (it kept its entry in `keys`) lets the
                // next one go when purged.
                if d.state == DeliveryState::Dead
                    && self
                        .keys
                        .get(key_entry(&d.destination, &d.ordering_key, d.seq))?
                        .is_some()
                    && let Some(next) = self.successor(&d.destination, &d.ordering_key, d.seq)?
                {
                    promote.push(timed_key(&d.destination, self.now(), next));
                }
                deliveries.push(d);
            }
        }
        let key = be(id);
        let mut w = Writes::default();

        w.remove(&self.messages, key);
        w.remove(&self.payloads, key);
        w.remove(&self.legacy_raw, key);
        for k in &promote {
            w.insert(&self.ready, k.as_slice(), &[][..]);
        }
        w.bump(&self.counts, &message_counter(record.state), -1);
        if let Some(m) = &record.msh {
            w.remove(&self.index, index_key(b'c', &m.control_id, id));
        }
        for d in &deliveries {
            w.remove(&self.deliveries, delivery_key(&d.destination, d.seq));
            // A dead delivery holding its key frees it.
            w.remove(
                &self.keys,
                key_entry(&d.destination, &d.ordering_key, d.seq),
            );
            w.remove(&self.index, index_key(b'k', &d.ordering_key, id));
            w.bump(&self.counts, &delivery_counter(&d.destination, d.state), -1);
        }

        w.commit(&self.data)?;
        drop(guard);
        // While the log still holds the journal record, a crash would bring the purged
        // message back: flush sled and retire the log first.
        if self.wal.oldest_id().is_some_and(|oldest| oldest <= id) {
            self.shared().checkpoint()?;
        }
        Ok(true)
    }

    async fn prune_delivered(&self, before_ms: Millis) -> Result<usize, StoreError> {
        let mut candidates = Vec::new();
        for entry in self.messages.iter() {
            let (k, v) = entry?;
            let Some(record) = decode::<MessageRecord>(&v) else {
                self.quarantine_value("messages", &k, &v);
                continue;
            };
            // Ids grow with time: stop at the first message that is too recent.
            if record.received_at_ms >= before_ms {
                break;
            }
            if record.state != MessageState::Mapped {
                continue;
            }
            let mut all_delivered = true;
            for r in &record.deliveries {
                if self
                    .read_delivery(&r.destination, r.seq)?
                    .is_none_or(|d| d.state != DeliveryState::Delivered)
                {
                    all_delivered = false;
                    break;
                }
            }
            if all_delivered {
                candidates.push(record.id);
            }
        }
        let mut pruned = 0;
        for id in candidates {
            if self.purge(id).await? {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    async fn get(&self, id: MessageId) -> Result<Option<MessageRecord>, StoreError> {
        let Some(mut record) = self.read_message(id)? else {
            return Ok(None);
        };
        // A record written before payloads existed keeps its bundle inside.
        if record.bundle.is_none() {
            let key = be(id);
            if let Some(v) = self.payloads.get(key)? {
                match open(&v).and_then(split_payload) {
                    Some((_, bundle)) => {
                        record.bundle = bundle.map(|b| String::from_utf8_lossy(b).into_owned());
                    }
                    None => return Err(self.quarantine_value("payloads", &key, &v)),
                }
            }
        }
        Ok(Some(record))
    }

    async fn raw(&self, id: MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_frame(id)
    }

    async fn deliveries(&self, id: MessageId) -> Result<Vec<Delivery>, StoreError> {
        let record = self.read_message(id)?.ok_or(StoreError::NotFound(id))?;
        let mut out = Vec::new();
        for r in &record.deliveries {
            if let Some(d) = self.read_delivery(&r.destination, r.seq)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    async fn list(&self, query: &Query) -> Result<Page, StoreError> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        let start = query.after.map_or(0, |a| a.saturating_add(1));
        let backward = query.newest_first;
        let id_of = |e: Result<(Vec<u8>, sled::IVec), sled::Error>| {
            e.map_err(StoreError::from)
                .and_then(|(k, _)| read_be(&k).ok_or(StoreError::NotFound(0)))
        };
        // Index look-ups narrow the scan when a control id or ordering key is given.
        let candidates: Box<dyn Iterator<Item = Result<MessageId, StoreError>>> =
            match (&query.control_id, &query.ordering_key) {
                (Some(c), _) => Box::new(self.index_ids(b'c', c, start, backward)),
                (None, Some(k)) => Box::new(self.index_ids(b'k', k, start, backward)),
                (None, None) if backward => {
                    let end = query.before.unwrap_or(MessageId::MAX);
                    Box::new(self.messages.range_backward(be(start), be(end)).map(id_of))
                }
                (None, None) => Box::new(self.messages.range_from(be(start)).map(id_of)),
            };
        let mut items = Vec::new();
        let mut next = None;
        for id in candidates {
            let id = id?;
            // Every candidate is at or above `start`. Going up, the first at or above
            // `before` ends the page; going down (an index's ids), those come first.
            if query.before.is_some_and(|before| id >= before) {
                if backward {
                    continue;
                }
                break;
            }
            let record = match self.read_message(id) {
                Ok(Some(r)) => r,
                Ok(None) | Err(StoreError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            };
            if !self.matches(&record, query)? {
                continue;
            }
            if items.len() == limit {
                next = items.last().map(|r: &MessageRecord| r.id);
                break;
            }
            items.push(record);
        }
        Ok(Page { items, next })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let mut counts = Counts::default();
        for entry in self.counts.iter() {
            let (k, v) = entry?;
            let n = read_be(&v).unwrap_or(0);
            let name = String::from_utf8_lossy(&k).into_owned();
            if let Some(state) = name.strip_prefix("m/") {
                counts.messages.insert(state.to_owned(), n);
            } else if let Some(rest) = name.strip_prefix("d/") {
                if let Some((dest, state)) = rest.rsplit_once('/') {
                    counts
                        .deliveries
                        .insert((dest.to_owned(), state.to_owned()), n);
                }
            } else if name == "quarantined" {
                counts.quarantined = n;
            }
        }
        Ok(counts)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.commit.wait_durable().await?;
        self.shared().checkpoint()?;
        Ok(())
    }
}

impl SledStore {
    /// The ids an index entry names, from `start` on, in id order (decreasing when
    /// `backward`).
    fn index_ids(
        &self,
        kind: u8,
        value: &str,
        start: MessageId,
        backward: bool,
    ) -> impl Iterator<Item = Result<MessageId, StoreError>> + '_ {
        let mut prefix = vec![kind];
        prefix.extend_from_slice(value.as_bytes());
        prefix.push(0);
        let len = prefix.len();
        let mut ids: Vec<Result<MessageId, StoreError>> = self
            .index
            .scan_prefix(&prefix)
            .map(move |e| {
                e.map_err(StoreError::from)
                    .map(|(k, _)| read_be(&k[len..]).unwrap_or(0))
            })
            .filter(move |r| r.as_ref().map_or(true, |&id| id >= start))
            .collect();
        // A message queued for several destinations with one key is indexed once per delivery.
        ids.dedup_by(|a, b| matches!((a, b), (Ok(x), Ok(y)) if x == y));
        if backward {
            ids.reverse();
        }
        ids.into_iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A crash after a resubmission's copy reached the journal log but before sled had
    /// the original's side of the link: replaying the log links the original again, once.
    #[tokio::test]
    async fn a_copy_recovered_from_the_log_links_its_original_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let original = store
            .journal(b"MSH|^~\\&|A\r", JournalMeta::default())
            .await
            .unwrap();
        let unlinked = store.read_message(original).unwrap().unwrap();
        let copy = store
            .resubmit(original, b"MSH|^~\\&|B\r", JournalMeta::default())
            .await
            .unwrap();
        let copy_record = store.read_message(copy).unwrap().unwrap();
        // What sled holds after such a crash: the original as it was, no copy.
        store
            .messages
            .insert(be(original), encode(&unlinked))
            .unwrap();
        store.messages.remove(be(copy)).unwrap();
        let replay = || WalRecord {
            id: copy,
            record: encode(&copy_record),
            frame: b"MSH|^~\\&|B\r".to_vec(),
        };
        store
            .journal_spaces()
            .recover(&store.data, replay())
            .unwrap();
        // Applied twice (a log replayed again after another crash): still one link.
        store
            .journal_spaces()
            .recover(&store.data, replay())
            .unwrap();
        let relinked = store.read_message(original).unwrap().unwrap();
        assert_eq!(relinked.links.resubmitted_as, [copy]);
        let last = relinked.history.last().unwrap();
        assert_eq!(last.state, "resubmitted");
        assert_eq!(last.detail, format!("resubmitted as message {copy}"));
        assert_eq!(relinked.history.len(), unlinked.history.len() + 1);
        assert_eq!(store.read_message(copy).unwrap().unwrap(), copy_record);
    }

    /// sled takes a generation key by key: a crash in the middle leaves it with part of
    /// one (here: the routing outcome's delivery and the message record lost, its other
    /// keys there). The journal's log has the whole generation, synced before sled got
    /// any of it, and the next open gives it again: the message mapped, its delivery
    /// queued, the indexes and counters as the running store had them.
    #[tokio::test]
    async fn a_generation_sled_took_in_part_is_given_again_whole_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let id = crate::contract::journal_mapped(&store, "C1", &[("files", "K")]).await;
        store.shared().apply().unwrap();
        let seq = store.read_message(id).unwrap().unwrap().deliveries[0].seq;
        // What sled may hold after a crash in the middle of that generation.
        let tree = store.db.open_tree("data").unwrap();
        tree.remove(store.messages.full_key(be(id))).unwrap();
        tree.remove(store.deliveries.full_key(delivery_key("files", seq)))
            .unwrap();
        store.db.flush().unwrap();
        drop(tree);
        drop(store);

        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        assert_eq!(store.recovered_on_open(), 1, "the journal record, replayed");
        let record = store.read_message(id).unwrap().unwrap();
        assert_eq!(record.state, MessageState::Mapped);
        assert_eq!(store.debug_check_indexes().unwrap(), Vec::<String>::new());
        let counts = store.counts().await.unwrap();
        assert_eq!(counts.messages.get("mapped"), Some(&1));
        assert_eq!(counts.messages.get("received").copied().unwrap_or(0), 0);
        let leases = store.lease("files", 10).await.unwrap();
        assert_eq!(
            leases.iter().map(|l| l.message_id).collect::<Vec<_>>(),
            [id]
        );
    }

    #[test]
    fn a_payload_gives_back_its_frame_and_bundle() {
        let frame = b"MSH|^~\\&|A\rPID|1\r";
        for bundle in [None, Some(&b""[..]), Some(&b"{\"entry\":[]}"[..])] {
            let sealed = payload(frame, bundle);
            let (f, b) = split_payload(open(&sealed).unwrap()).unwrap();
            assert_eq!(f, frame);
            assert_eq!(b, bundle);
        }
    }

    #[test]
    fn a_malformed_payload_is_refused() {
        let good = open(&payload(b"MSH|", Some(b"{}"))).unwrap().to_vec();
        let mut bad_flag = good.clone();
        bad_flag[0] = 7;
        let mut long_frame = good.clone();
        long_frame[1..5].copy_from_slice(&1000u32.to_be_bytes());
        let mut trailing = open(&payload(b"MSH|", None)).unwrap().to_vec();
        trailing.push(b'x');
        for bad in [&bad_flag[..], &long_frame, &trailing, &[], &[0, 0]] {
            assert_eq!(split_payload(bad), None, "{bad:?}");
        }
    }

    /// A journal log record whose frame is intact but whose record does not read (written
    /// by a version that encoded it otherwise) is kept, as received, to be mapped again:
    /// the message was acknowledged. Dropping it, as recovery once did, lost it.
    #[tokio::test]
    async fn a_logged_message_whose_record_does_not_read_is_kept_as_received() {
        let dir = tempfile::tempdir().unwrap();
        let frame = b"MSH|^~\\&|LAB|H|||20240101||ORU^R01|C1|P|2.5\rPID|1||42\r";
        let meta = || JournalMeta {
            listener: "main".into(),
            peer: "127.0.0.1:1".into(),
            msh: None,
            rejected: None,
        };
        let first = {
            let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
            let id = store.journal(frame, meta()).await.unwrap();
            store.flush().await.unwrap();
            id
        };
        // The next message was acknowledged (its log record synced), then the engine
        // stopped before sled had it; the record's encoding is not this version's.
        let lost = first + 1;
        {
            let (wal, applied) = Wal::recover(dir.path(), |_| Ok(()), || Ok(())).unwrap();
            assert_eq!(applied, 0, "a clean stop leaves no log records");
            wal.append(lost, b"{not a record of this version", frame)
                .unwrap();
            wal.sync().unwrap();
        }
        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let record = store.get(lost).await.unwrap().expect("the message is kept");
        assert_eq!(record.state, MessageState::Received);
        assert_eq!(record.size, frame.len() as u64);
        assert!(
            record.history[0].detail.contains("journal log"),
            "{record:?}"
        );
        assert_eq!(store.raw(lost).await.unwrap().as_deref(), Some(&frame[..]));
        assert_eq!(store.unprocessed(10).await.unwrap(), [first, lost]);
        let next = store.journal(frame, meta()).await.unwrap();
        assert!(next > lost, "ids go on after the recovered one: {next}");
    }

    /// The journal log refuses an append (a failing disk): that journal call fails, and
    /// the checkpointer starts a new segment at once, so that the next calls succeed,
    /// even when the refused record was the segment's first (nothing pending, no timer).
    #[tokio::test]
    async fn a_damaged_journal_log_heals_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let segment = crate::wal::tests_support::refuse_writes(&store.wal);
        assert!(
            store
                .journal(b"MSH|^~\\&|A\r", JournalMeta::default())
                .await
                .is_err()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let id = loop {
            match store
                .journal(b"MSH|^~\\&|B\r", JournalMeta::default())
                .await
            {
                Ok(id) => break id,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "still refused: {e}");
                    // Polls the checkpointer's work, which signals nothing.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert!(crate::wal::tests_support::segment_number(&store.wal) > segment);
        assert_eq!(store.raw(id).await.unwrap().unwrap(), b"MSH|^~\\&|B\r");
    }

    /// A store written before payloads existed: frame alone under `r`, bundle inside the
    /// record. Both are still read.
    #[tokio::test]
    async fn a_message_stored_the_older_way_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let id = 42;
        let record = MessageRecord {
            id,
            received_at_ms: 1,
            listener: "l".into(),
            peer: "p".into(),
            size: 4,
            msh: None,
            route: Some("r".into()),
            state: MessageState::Mapped,
            error: None,
            bundle: Some("{\"old\":true}".into()),
            deliveries: Vec::new(),
            history: Vec::new(),
            links: Links::default(),
        };
        store.messages.insert(be(id), encode(&record)).unwrap();
        store
            .legacy_raw
            .insert(be(id), seal(b"MSH|".to_vec()))
            .unwrap();
        assert_eq!(store.raw(id).await.unwrap().unwrap(), b"MSH|");
        let read = store.get(id).await.unwrap().unwrap();
        assert_eq!(read.bundle.as_deref(), Some("{\"old\":true}"));
        // A replay with a new bundle moves both into a payload.
        assert_eq!(
            store
                .replay(
                    id,
                    Some("{\"new\":true}".into()),
                    &ReplaySelection::default()
                )
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            store.get(id).await.unwrap().unwrap().bundle.as_deref(),
            Some("{\"new\":true}")
        );
        assert_eq!(store.raw(id).await.unwrap().unwrap(), b"MSH|");
        assert!(store.purge(id).await.unwrap());
        assert_eq!(store.raw(id).await.unwrap(), None);
    }
}

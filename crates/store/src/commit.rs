//! Group commit: many writers, one flush.
//!
//! A writer appends its record (to the journal's log), takes a ticket, and waits until a
//! flush that started after its append has finished. One committer thread runs the
//! flushes (a `sync` given at start: the log's `fdatasync`): it waits for a ticket, lingers
//! a little to let more writers join (up to `max_batch`), then flushes once for all of
//! them. A ticket is taken only *after* the append, and the committer reads the last
//! ticket *before* it flushes, so a flush covers every ticket it announces.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Group commit tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitConfig {
    /// Flush as soon as this many writers wait.
    pub max_batch: u64,
    /// How long the first waiting writer may wait for others to join.
    pub linger: Duration,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig {
            max_batch: 256,
            linger: Duration::ZERO,
        }
    }
}

#[derive(Debug)]
struct Shared {
    /// Last ticket handed out.
    issued: AtomicU64,
    /// Wakes the committer.
    wake: Mutex<()>,
    signal: Condvar,
    stop: AtomicBool,
    /// Flushes done, and flush errors (a failed flush fails its writers).
    flushes: AtomicU64,
}

/// The committer and the writers' side of it.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    /// The last ticket known durable; `u64::MAX` after a fatal flush error.
    durable: watch::Receiver<u64>,
    thread: Option<JoinHandle<()>>,
}

/// Marks a flush failure: no ticket will ever be durable.
const FAILED: u64 = u64::MAX;

impl GroupCommit {
    pub(crate) fn start(
        sync: impl Fn() -> std::io::Result<()> + Send + 'static,
        config: GroupCommitConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Mutex::new(()),
            signal: Condvar::new(),
            stop: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        });
        let (tx, rx) = watch::channel(0u64);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("passerelle-group-commit".into())
            .spawn(move || committer(&sync, &thread_shared, &tx, config))
            .expect("spawn the group-commit thread");
        GroupCommit {
            shared,
            durable: rx,
            thread: Some(thread),
        }
    }

    /// Waits until everything written before this call is durable.
    pub(crate) async fn wait_durable(&self) -> Result<(), sled::Error> {
        let ticket = self.shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let _guard = self.shared.wake.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.signal.notify_one();
        }
        let mut rx = self.durable.clone();
        let reached = rx
            .wait_for(|&durable| durable >= ticket)
            .await
            .map(|v| *v)
            .unwrap_or(FAILED);
        if reached == FAILED {
            return Err(sled::Error::ReportableBug(
                "a flush failed: writes since the last good flush are not durable".into(),
            ));
        }
        Ok(())
    }

    /// How many flushes ran (for tests and metrics).
    pub(crate) fn flush_count(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.wake.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.signal.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn committer(
    sync: &dyn Fn() -> std::io::Result<()>,
    shared: &Shared,
    durable: &watch::Sender<u64>,
    config: GroupCommitConfig,
) {
    let mut done = 0u64;
    let mut last_batch = 0u64;
    loop {
        // Wait for a ticket beyond what is durable.
        {
            let mut guard = shared.wake.lock().unwrap_or_else(|p| p.into_inner());
            while shared.issued.load(Ordering::SeqCst) == done
                && !shared.stop.load(Ordering::SeqCst)
            {
                guard = shared.signal.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
        }
        if shared.issued.load(Ordering::SeqCst) == done && shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Linger so that concurrent writers share this flush, when they are concurrent.
        if last_batch > 1 {
            let deadline = Instant::now() + config.linger;
            while shared.issued.load(Ordering::SeqCst) - done < config.max_batch
                && Instant::now() < deadline
            {
                std::thread::yield_now();
            }
        }
        let target = shared.issued.load(Ordering::SeqCst);
        last_batch = target - done;
        match sync() {
            Ok(_) => {
                done = target;
                shared.flushes.fetch_add(1, Ordering::Relaxed);
                let _ = durable.send(done);
            }
            Err(e) => {
                tracing::error!(error = %e, "store flush failed; refusing further acknowledgements");
                let _ = durable.send(FAILED);
                return;
            }
        }
    }
}

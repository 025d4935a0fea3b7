//! Group commit: many writers, one flush.
//!
//! A writer appends its record (to the journal's log), takes a ticket, and waits until a
//! flush that started after its append has finished. There is no flushing thread: the
//! first waiting writer that finds no flush running becomes the leader and flushes (the
//! `sync` given at start: the log's `fdatasync`) for everyone whose ticket was taken by
//! then; the others wait for its result, and those it did not cover elect the next
//! leader. A lone writer thus flushes in its own thread, with no hand-off, and under load
//! each flush covers every writer that arrived during the previous one.
//!
//! Invariants: a ticket is taken only *after* the append, and the leader reads the last
//! ticket *before* it flushes, so a flush covers every ticket it announces; the durable
//! mark only grows; after a failed flush it is [`FAILED`] for good (nothing written since
//! the last good flush can be acknowledged).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;

/// Group commit tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupCommitConfig {
    /// Before flushing, a leader yields this many times to let writers that are about
    /// to append join its flush (0: flush at once, the default: under load, writers
    /// that arrive during a flush share the next one anyway).
    pub gather_yields: u32,
}

/// Marks a flush failure: no ticket will ever be durable.
const FAILED: u64 = u64::MAX;

type Sync = Box<dyn Fn() -> std::io::Result<()> + Send + std::marker::Sync>;

/// The writers' side of group commit.
pub(crate) struct GroupCommit {
    sync: Sync,
    config: GroupCommitConfig,
    /// Last ticket handed out.
    issued: AtomicU64,
    /// Whether a leader is flushing.
    flushing: AtomicBool,
    /// The last ticket known durable ([`FAILED`] after a failed flush); every change
    /// wakes the waiting writers.
    durable: watch::Sender<u64>,
    flushes: AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("issued", &self.issued.load(Ordering::Relaxed))
            .field("durable", &*self.durable.borrow())
            .finish()
    }
}

impl GroupCommit {
    pub(crate) fn start(
        sync: impl Fn() -> std::io::Result<()> + Send + std::marker::Sync + 'static,
        config: GroupCommitConfig,
    ) -> Self {
        GroupCommit {
            sync: Box::new(sync),
            config,
            issued: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            durable: watch::Sender::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Waits until everything written before this call is durable. The leader flushes
    /// in the calling thread (a blocking `fdatasync`, well under a millisecond on a
    /// healthy disk).
    pub(crate) async fn wait_durable(&self) -> Result<(), sled::Error> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.durable.subscribe();
        loop {
            let durable = *rx.borrow_and_update();
            if durable == FAILED {
                return Err(sled::Error::ReportableBug(
                    "a flush failed: writes since the last good flush are not durable".into(),
                ));
            }
            if durable >= ticket {
                return Ok(());
            }
            if self
                .flushing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // On a multi-threaded runtime, the worker thread hands its other tasks over
                // while this one blocks in the flush.
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi_thread {
                    tokio::task::block_in_place(|| self.lead());
                } else {
                    self.lead();
                }
                continue;
            }
            // A leader is flushing: its result (or the next leader's) wakes us. A change
            // made since borrow_and_update above is not missed.
            if rx.changed().await.is_err() {
                return Err(sled::Error::ReportableBug("group commit stopped".into()));
            }
        }
    }

    /// One flush, as leader, for every ticket taken so far.
    fn lead(&self) {
        for _ in 0..self.config.gather_yields {
            std::thread::yield_now();
        }
        let target = self.issued.load(Ordering::SeqCst);
        let covered = *self.durable.borrow();
        if covered != FAILED && covered < target {
            let result = (self.sync)();
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.durable.send_modify(|durable| {
                *durable = match &result {
                    Ok(()) if *durable != FAILED => (*durable).max(target),
                    _ => FAILED,
                }
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "journal flush failed; refusing further acknowledgements");
            }
        }
        self.flushing.store(false, Ordering::Release);
        // Writers that found the flag set and have not been covered wait on `durable`:
        // wake them so that one of them leads next.
        self.durable.send_modify(|_| {});
    }

    /// How many flushes ran (for tests and metrics).
    pub(crate) fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_writer_returns_after_a_flush_and_writers_share_them() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&syncs);
        let commit = Arc::new(GroupCommit::start(
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(())
            },
            GroupCommitConfig::default(),
        ));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let commit = Arc::clone(&commit);
                tokio::spawn(async move {
                    for _ in 0..10 {
                        commit.wait_durable().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let syncs = syncs.load(Ordering::SeqCst);
        assert!((1..640).contains(&syncs), "{syncs} flushes for 640 waits");
        assert_eq!(commit.flush_count() as usize, syncs);
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_later_wait() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let commit = GroupCommit::start(
            move || {
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::other("disk gone"))
                }
            },
            GroupCommitConfig::default(),
        );
        commit.wait_durable().await.unwrap();
        assert!(commit.wait_durable().await.is_err());
        assert!(
            commit.wait_durable().await.is_err(),
            "no acknowledgement after a failed flush, even if the disk recovers"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

//! Wake-up across nodes: PostgreSQL's LISTEN/NOTIFY.
//!
//! A transaction that makes deliveries ready (a routing outcome that queues them, a key
//! whose head finished, a replay, leases returned to the queue) also runs
//! `pg_notify('passerelle_work', destination)`. PostgreSQL delivers a notification only
//! when its transaction commits, and only once per (channel, payload) per transaction.
//! The payload is the destination's name: configuration, never patient data.
//!
//! Every [`PgStore`](crate::PgStore) holds one connection of its own (not from the pool,
//! `application_name = passerelle-listen`) that `LISTEN`s on that channel and turns each
//! notification into its destination's [`WorkSignal`](crate::WorkSignal). When the
//! connection fails it is made again, after a backoff (0.1 s doubling to 10 s, with
//! jitter); once listening again, every signal fires, since notifications sent meanwhile
//! are lost. A retry that becomes due is a matter of time, not of a commit: workers poll
//! for those, and the poll also bounds what a lost notification costs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::AsyncMessage;

use crate::WorkSignal;
use crate::pg_store::error_chain;
use crate::pg_tls::MakeRustls;
use crate::retry::Jitter;

/// The channel of the notifications.
pub(crate) const CHANNEL: &str = "passerelle_work";
/// The `application_name` of the listening connection (to find it in `pg_stat_activity`).
pub const LISTENER_APPLICATION: &str = "passerelle-listen";

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Every destination's signal in this process.
#[derive(Debug, Default)]
pub(crate) struct Wakers(Mutex<HashMap<String, watch::Sender<u64>>>);

impl Wakers {
    fn senders(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn subscribe(&self, destination: &str) -> WorkSignal {
        let mut senders = self.senders();
        let sender = senders
            .entry(destination.to_owned())
            .or_insert_with(|| watch::channel(0).0);
        WorkSignal::from_watch(sender.subscribe())
    }

    /// Fires `destination`'s signal; an empty name fires them all.
    pub(crate) fn wake(&self, destination: &str) {
        if destination.is_empty() {
            return self.wake_all();
        }
        if let Some(sender) = self.senders().get(destination) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    pub(crate) fn wake_all(&self) {
        for sender in self.senders().values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Starts the listening task. It ends when the returned handle is aborted (the store is
/// dropped). `listening` is told once the first `LISTEN` is in place, or dropped when the
/// first attempt fails (the task goes on trying; the opener need not wait).
pub(crate) fn spawn(
    mut pg: tokio_postgres::Config,
    tls: MakeRustls,
    wakers: Arc<Wakers>,
    op_timeout: Duration,
    seed: u64,
    listening: oneshot::Sender<()>,
) -> tokio::task::JoinHandle<()> {
    pg.application_name(LISTENER_APPLICATION);
    tokio::spawn(async move {
        let jitter = Jitter::new(seed);
        let mut listening = Some(listening);
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut on_listening = || {
                backoff = BACKOFF_MIN;
                match listening.take() {
                    Some(first) => {
                        let _ = first.send(());
                    }
                    None => {
                        tracing::info!("wake-up connection listening again");
                        // What was notified while it was down is lost: look again.
                        wakers.wake_all();
                    }
                }
            };
            let ended = session(&pg, &tls, &wakers, op_timeout, &mut on_listening).await;
            // A first attempt that failed: the opener goes on without waiting.
            listening = None;
            tracing::warn!(
                problem = %ended,
                retry_in_ms = backoff.as_millis() as u64,
                "wake-up connection to PostgreSQL lost; idle workers poll meanwhile"
            );
            tokio::time::sleep(backoff.mul_f64(0.5 + jitter.unit() / 2.0)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    })
}

/// One listening connection, from connecting to its end; returns why it ended.
async fn session(
    pg: &tokio_postgres::Config,
    tls: &MakeRustls,
    wakers: &Arc<Wakers>,
    op_timeout: Duration,
    on_listening: &mut impl FnMut(),
) -> String {
    let (client, mut connection) =
        match tokio::time::timeout(op_timeout, pg.connect(tls.clone())).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return format!("cannot connect: {}", error_chain(&e)),
            Err(_) => return format!("cannot connect within {op_timeout:?}"),
        };
    // Notifications arrive only to whoever polls the connection itself.
    let to_wake = Arc::clone(wakers);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => to_wake.wake(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return error_chain(&e),
                None => return "the connection closed".to_owned(),
            }
        }
    });
    match tokio::time::timeout(
        op_timeout,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await
    {
        Ok(Ok(())) => on_listening(),
        Ok(Err(e)) => {
            driver.abort();
            return format!("LISTEN failed: {}", error_chain(&e));
        }
        Err(_) => {
            driver.abort();
            return format!("LISTEN did not answer within {op_timeout:?}");
        }
    }
    // The client stays here while the driver runs: dropping it would end the session.
    let ended = driver
        .await
        .unwrap_or_else(|e| format!("the listening task ended: {e}"));
    drop(client);
    ended
}

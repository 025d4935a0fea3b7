//! Wake-up across nodes (LISTEN/NOTIFY), with two PostgreSQL stores (nodes) on one real
//! database: every change that makes a delivery ready on node A wakes node B's idle
//! worker, which polls only every 30 s here, so a lease within 5 s can only come from
//! the signal. And B's listening connection, killed by the server, comes back and
//! wakes B again.
//!
//! Without PostgreSQL's binaries these tests fail, saying what to install.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

mod common;

use std::sync::Arc;
use std::time::Duration;

use passerelle_store::*;
use passerelle_testkit::postgres::PgServer;

/// The idle worker's poll in these tests: far longer than the bound on a wake-up.
const POLL: Duration = Duration::from_secs(30);
/// How soon B's worker must lease what A made ready.
const WAKE_BOUND: Duration = Duration::from_secs(5);
const VISIBILITY_MS: u64 = 60_000;

fn config(url: String, clock: Arc<dyn Clock>) -> PgConfig {
    let mut c = PgConfig::new(url);
    c.clock = clock;
    c.visibility_timeout = Duration::from_millis(VISIBILITY_MS);
    c.pool_size = 2;
    c
}

fn to_fhir(key: &str) -> Outcome {
    Outcome::Mapped {
        route: "r".into(),
        bundle: "{}".into(),
        deliveries: vec![Enqueue {
            destination: "fhir".into(),
            ordering_key: key.into(),
        }],
    }
}

/// Journals a message on `node` and queues it for `fhir` under `key`.
async fn queue(node: &PgStore, key: &str) -> MessageId {
    let id = node
        .journal(format!("MSH|{key}").as_bytes(), JournalMeta::default())
        .await
        .unwrap();
    node.record_outcome(id, to_fhir(key)).await.unwrap();
    id
}

/// An idle delivery worker on `node`, as the engine's: subscribed to the signal before
/// its first lease; when a lease finds nothing, it waits for the signal or its poll.
/// Returns once the worker is idle (its first lease found nothing) with the handle that
/// yields its lease.
async fn idle_worker(node: &Arc<PgStore>) -> tokio::task::JoinHandle<Lease> {
    let node = Arc::clone(node);
    let (idle_tx, idle_rx) = tokio::sync::oneshot::channel();
    let worker = tokio::spawn(async move {
        let mut signal = node.work_signal("fhir");
        let mut idle = Some(idle_tx);
        loop {
            if let Some(lease) = node.lease("fhir", 1).await.unwrap().pop() {
                return lease;
            }
            if let Some(idle) = idle.take() {
                idle.send(()).unwrap();
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = signal.changed() => {}
            }
        }
    });
    idle_rx
        .await
        .expect("the worker found nothing to lease at first");
    worker
}

/// Runs `readies` (something node A does, which returns the message it made ready)
/// while node B's worker is idle; B's worker must then lease that message within
/// [`WAKE_BOUND`].
async fn b_leases_after<F: std::future::Future<Output = MessageId>>(
    b: &Arc<PgStore>,
    what: &str,
    readies: F,
) -> Lease {
    let worker = idle_worker(b).await;
    let expected = readies.await;
    let lease = tokio::time::timeout(WAKE_BOUND, worker)
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: node B's idle worker was not woken within {WAKE_BOUND:?}")
        })
        .unwrap();
    assert_eq!(lease.message_id, expected, "{what}");
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_makes_ready_wakes_the_others_idle_worker() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("wake");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let a = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    let b = Arc::new(PgStore::open(config(url, clock.clone())).await.unwrap());
    let policy = RetryPolicy::default();

    // A routing outcome that queues a delivery.
    let lease = b_leases_after(&b, "a routing outcome on A", queue(&a, "K1")).await;
    b.complete(&lease, AttemptReport::delivered(), &policy)
        .await
        .unwrap();

    // A lease that expired on A and returns to the queue.
    let m2 = queue(&a, "K2").await;
    let on_a = a.lease("fhir", 1).await.unwrap().pop().unwrap();
    assert_eq!(on_a.message_id, m2);
    clock.advance(VISIBILITY_MS + 1);
    let lease = b_leases_after(&b, "an expired lease returned by A", async {
        assert_eq!(a.requeue_expired().await.unwrap(), 1);
        m2
    })
    .await;
    b.complete(&lease, AttemptReport::delivered(), &policy)
        .await
        .unwrap();

    // The next delivery of a key, ready once A finished the one before it.
    let m3 = queue(&a, "K3").await;
    let m4 = queue(&a, "K3").await;
    let head = a.lease("fhir", 1).await.unwrap().pop().unwrap();
    assert_eq!(head.message_id, m3);
    let lease = b_leases_after(&b, "a key's next delivery promoted on A", async {
        a.complete(&head, AttemptReport::delivered(), &policy)
            .await
            .unwrap();
        m4
    })
    .await;
    b.complete(&lease, AttemptReport::delivered(), &policy)
        .await
        .unwrap();

    // A replay on A.
    b_leases_after(&b, "a replay on A", async {
        assert_eq!(
            a.replay(m4, None, &ReplaySelection::default())
                .await
                .unwrap(),
            1
        );
        m4
    })
    .await;
}

/// The server processes of the database's listening connections.
async fn listener_pids(admin: &tokio_postgres::Client) -> Vec<i32> {
    let rows = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = 'relisten' \
             AND application_name = $1",
            &[&LISTENER_APPLICATION],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, i32>(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listening_connection_comes_back_after_the_server_ends_it() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("relisten");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let a = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    let b = Arc::new(PgStore::open(config(url.clone(), clock)).await.unwrap());
    let admin = common::client(&url).await;
    let before = listener_pids(&admin).await;
    assert_eq!(
        before.len(),
        2,
        "each node listens on a connection of its own"
    );

    // The server ends both listening sessions (as a restart or a network cut would).
    let mut signal = b.work_signal("fhir");
    let ended: i64 = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'relisten' AND application_name = $1",
            &[&LISTENER_APPLICATION],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 2);
    // Listening again, B fires every signal (what was notified meanwhile is lost).
    tokio::time::timeout(WAKE_BOUND, signal.changed())
        .await
        .expect("B listens again and wakes its workers");
    let after = listener_pids(&admin).await;
    assert!(
        after.iter().any(|pid| !before.contains(pid)),
        "a new listening session: before {before:?}, after {after:?}"
    );

    // And a later notification still reaches B.
    b_leases_after(
        &b,
        "a routing outcome on A after B reconnected",
        queue(&a, "K"),
    )
    .await;
}

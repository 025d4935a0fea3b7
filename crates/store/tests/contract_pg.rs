//! The store contract (src/contract.rs) on the PostgreSQL backend, against a real
//! PostgreSQL server started for the test (`passerelle_testkit::postgres`), plus what only
//! a shared database raises: two stores (nodes) leasing from one database at once, a node
//! that goes away with leases in flight, an unreachable database, a schema from another
//! version and a row that cannot be read.
//!
//! Without PostgreSQL's binaries these tests fail, saying what to install.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use passerelle_store::*;
use passerelle_testkit::postgres::PgServer;

fn config(url: String, clock: Arc<dyn Clock>) -> PgConfig {
    let mut c = PgConfig::new(url);
    c.clock = clock;
    c.visibility_timeout = Duration::from_millis(contract::VISIBILITY_MS);
    c.pool_size = 4;
    c
}

async fn server() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start).await.unwrap()
}

/// How many deliveries of the destination `fhir` the counters have in `state`.
fn fhir_deliveries(counts: &Counts, state: &str) -> u64 {
    counts
        .deliveries
        .get(&("fhir".to_owned(), state.to_owned()))
        .copied()
        .unwrap_or(0)
}

fn enqueue_to(dest: &str, key: &str) -> Outcome {
    Outcome::Mapped {
        route: "r".into(),
        bundle: "{}".into(),
        deliveries: vec![Enqueue {
            destination: dest.into(),
            ordering_key: key.into(),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_store_contract() {
    let server = server().await;
    let databases = AtomicUsize::new(0);
    contract::run_all(|clock| {
        let n = databases.fetch_add(1, Ordering::SeqCst);
        let url = server.create_database(&format!("contract_{n}"));
        async move { PgStore::open(config(url, clock)).await.unwrap() }
    })
    .await;
    assert_eq!(
        databases.load(Ordering::SeqCst),
        14,
        "every check ran on a store of its own"
    );
}

/// Two nodes on one database: each queues 120 messages over the same 12 keys while four
/// workers per node deliver. No key ever has two deliveries in flight, every key goes out
/// in queue order (each node's own messages in the order it queued them), and every
/// message is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_lease_concurrently_without_breaking_key_order() {
    const PER_NODE: usize = 120;
    const MESSAGES: usize = 2 * PER_NODE;
    const KEYS: usize = 12;
    let server = server().await;
    let url = server.create_database("two_nodes");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let nodes = [
        Arc::new(
            PgStore::open(config(url.clone(), clock.clone()))
                .await
                .unwrap(),
        ),
        Arc::new(PgStore::open(config(url, clock.clone())).await.unwrap()),
    ];
    assert_ne!(
        nodes[0].node(),
        nodes[1].node(),
        "each store is a node of its own"
    );

    // Both nodes queue at once, as a load balancer spreads senders.
    let producers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let node = Arc::clone(node);
            tokio::spawn(async move {
                let mut queued: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
                for i in 0..PER_NODE {
                    let key = format!("K{}", i % KEYS);
                    let id = node
                        .journal(format!("MSH|{n}-{i}").as_bytes(), JournalMeta::default())
                        .await
                        .unwrap();
                    node.record_outcome(id, enqueue_to("fhir", &key))
                        .await
                        .unwrap();
                    queued.entry(key).or_default().push(id);
                }
                queued
            })
        })
        .collect();

    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let delivered: Arc<Mutex<WentOut>> = Arc::default();
    let total = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&nodes[w % 2]);
        let (in_flight, delivered, total) = (in_flight.clone(), delivered.clone(), total.clone());
        workers.push(tokio::spawn(async move {
            let policy = RetryPolicy::default();
            let deadline = Instant::now() + Duration::from_secs(120);
            while total.load(Ordering::SeqCst) < MESSAGES {
                assert!(
                    Instant::now() < deadline,
                    "the workers did not drain the queue"
                );
                let leases = store.lease("fhir", 3).await.unwrap();
                for l in &leases {
                    assert!(
                        in_flight.lock().unwrap().insert(l.ordering_key.clone()),
                        "key {} leased twice at once",
                        l.ordering_key
                    );
                }
                tokio::task::yield_now().await;
                for l in leases {
                    delivered
                        .lock()
                        .unwrap()
                        .entry(l.ordering_key.clone())
                        .or_default()
                        .push((l.seq, l.message_id));
                    // Out of the set before the completion commits: from then on another
                    // worker may rightly lease the key's next delivery.
                    in_flight.lock().unwrap().remove(&l.ordering_key);
                    let state = store
                        .complete(&l, AttemptReport::delivered(), &policy)
                        .await
                        .unwrap();
                    assert_eq!(state, DeliveryState::Delivered);
                    total.fetch_add(1, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut queued_by_node = Vec::new();
    for p in producers {
        queued_by_node.push(p.await.unwrap());
    }
    for w in workers {
        w.await.unwrap();
    }
    let delivered = delivered.lock().unwrap().clone();
    let mut all: Vec<MessageId> = Vec::new();
    for (key, went) in &delivered {
        assert!(
            went.windows(2).all(|w| w[0].0 < w[1].0),
            "key {key} went out in queue order: {went:?}"
        );
        let ids: Vec<MessageId> = went.iter().map(|(_, id)| *id).collect();
        for queued in &queued_by_node {
            let own: Vec<MessageId> = ids
                .iter()
                .copied()
                .filter(|id| queued[key].contains(id))
                .collect();
            assert_eq!(
                own, queued[key],
                "key {key}: a node's messages in its order"
            );
        }
        all.extend(ids);
    }
    let delivered_count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        (delivered_count, all.len()),
        (MESSAGES, MESSAGES),
        "every message delivered exactly once"
    );
    let counts = nodes[0].counts().await.unwrap();
    let d = |state: &str| fhir_deliveries(&counts, state);
    assert_eq!(
        (d("delivered"), d("pending"), d("in_flight")),
        (MESSAGES as u64, 0, 0),
        "the sharded counters add up"
    );
    assert_eq!(
        counts.messages.get("mapped").copied(),
        Some(MESSAGES as u64)
    );
}

/// Per key, the (seq, message) of each delivery, in the order they went out.
type WentOut = BTreeMap<String, Vec<(u64, MessageId)>>;

/// Whether some session holds the liveness lock of `node`.
async fn node_alive(db: &tokio_postgres::Client, node: i32) -> bool {
    db.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid::bigint = 1346458451 AND objid::bigint = $1::integer AND objsubid = 2",
        &[&node],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        > 0
}

/// A node that goes away leaves its leases in flight; the next store opened on the
/// database gives them back at once, while the leases of a node still running stay its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_node_that_is_gone_return_on_open() {
    let server = server().await;
    let url = server.create_database("restart");
    let db = common::client(&url).await;
    let clock = Arc::new(ManualClock::new(5_000_000));
    let first = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    for (i, key) in ["X", "Y", "Z"].iter().enumerate() {
        let id = first
            .journal(format!("MSH|{i}").as_bytes(), JournalMeta::default())
            .await
            .unwrap();
        first
            .record_outcome(id, enqueue_to("fhir", key))
            .await
            .unwrap();
    }
    let held = first.lease("fhir", 2).await.unwrap();
    assert_eq!(held.len(), 2);

    // A second node opening now leaves the first one's leases alone.
    let second = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    assert!(node_alive(&db, first.node()).await);
    let third_key = second.lease("fhir", 5).await.unwrap();
    assert_eq!(third_key.len(), 1, "only the delivery no one holds");
    assert!(!held.iter().any(|l| l.seq == third_key[0].seq));

    // The first node goes away (its connections close); once the server has noticed, a
    // store opened on the database returns its leases to ready.
    let first_node = first.node();
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_alive(&db, first_node).await {
        assert!(
            Instant::now() < deadline,
            "the first node's session did not end"
        );
        tokio::task::yield_now().await;
    }
    let reopened = PgStore::open(config(url, clock.clone())).await.unwrap();
    let counts = reopened.counts().await.unwrap();
    let d = |state: &str| fhir_deliveries(&counts, state);
    assert_eq!(
        (d("in_flight"), d("pending")),
        (1, 2),
        "the gone node's two leases are ready again; the live node's one stays in flight"
    );
    let again = reopened.lease("fhir", 5).await.unwrap();
    let mut seqs: Vec<u64> = again.iter().map(|l| l.seq).collect();
    seqs.sort();
    let mut before: Vec<u64> = held.iter().map(|l| l.seq).collect();
    before.sort();
    assert_eq!(seqs, before, "the same deliveries, leased again");
    assert!(
        again.iter().all(|l| l.attempt == 1),
        "no attempt was recorded"
    );
    let stale = reopened
        .complete(
            &held[0],
            AttemptReport::delivered(),
            &RetryPolicy::default(),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::LeaseLost { .. })),
        "the gone node's lease cannot complete: {stale:?}"
    );
    // The live node still completes its own.
    assert_eq!(
        second
            .complete(
                &third_key[0],
                AttemptReport::delivered(),
                &RetryPolicy::default()
            )
            .await
            .unwrap(),
        DeliveryState::Delivered
    );
}

/// A node whose liveness connection breaks (here: the server ends that session) takes its
/// lock again at its next `requeue_expired`, so that it is not taken for gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_its_liveness_lock_again_after_losing_its_connection() {
    let server = server().await;
    let url = server.create_database("liveness");
    let db = common::client(&url).await;
    let store = PgStore::open(config(url, Arc::new(ManualClock::new(1))))
        .await
        .unwrap();
    assert!(node_alive(&db, store.node()).await);
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid::bigint = 1346458451 AND objid::bigint = $1::integer AND objsubid = 2",
        &[&store.node()],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_alive(&db, store.node()).await {
        assert!(Instant::now() < deadline, "the session did not end");
        tokio::task::yield_now().await;
    }
    while !node_alive(&db, store.node()).await {
        assert!(
            Instant::now() < deadline,
            "the node never took its lock again"
        );
        store.requeue_expired().await.unwrap();
    }
}

/// With the database gone, journal fails (so the listener answers AE) within the operation
/// timeout: no hang, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_journal_quickly() {
    let mut server = server().await;
    let url = server.create_database("unreachable");
    let mut c = config(url.clone(), Arc::new(ManualClock::new(1)));
    c.op_timeout = Duration::from_secs(3);
    c.connect_timeout = Duration::from_secs(2);
    let store = PgStore::open(c.clone()).await.unwrap();
    store
        .journal(b"MSH|1", JournalMeta::default())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    let started = Instant::now();
    let result = store.journal(b"MSH|2", JournalMeta::default()).await;
    assert!(
        matches!(result, Err(StoreError::Database(_))),
        "journal fails with a database error: {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "within the timeout: {:?}",
        started.elapsed()
    );
    let reopen = PgStore::open(c).await;
    let message = reopen.unwrap_err().to_string();
    assert!(
        message.contains("cannot connect to PostgreSQL at"),
        "opening says where it could not connect: {message}"
    );
    assert!(!message.contains("password"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_schema_version_is_refused_and_bad_rows_are_errors() {
    let server = server().await;
    let url = server.create_database("schema");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1));
    let store = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    let id = store
        .journal(b"MSH|1", JournalMeta::default())
        .await
        .unwrap();
    let other = store
        .journal(b"MSH|2", JournalMeta::default())
        .await
        .unwrap();
    let db = common::client(&url).await;

    // A history that is not a list of transitions: an error naming the row, not a panic.
    db.execute(
        "UPDATE passerelle_messages SET history = '{\"not\": \"a list\"}' WHERE id = $1",
        &[&(id as i64)],
    )
    .await
    .unwrap();
    let read = store.get(id).await;
    assert!(
        matches!(&read, Err(StoreError::BadRow { table: "passerelle_messages", key, .. }) if *key == id.to_string()),
        "{read:?}"
    );
    let listed = store.list(&Query::default()).await.unwrap();
    assert_eq!(
        listed.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [other],
        "the bad row is left out of lists, the others are listed"
    );

    db.execute(
        "UPDATE passerelle_meta SET value = '99' WHERE key = 'schema_version'",
        &[],
    )
    .await
    .unwrap();
    let refused = PgStore::open(config(url, clock)).await;
    assert!(
        matches!(&refused, Err(StoreError::Schema { found, .. }) if found == "99"),
        "{refused:?}"
    );
}

/// NUL characters, which PostgreSQL's text cannot hold, do not make a frame unstorable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_in_metadata_are_stored() {
    let server = server().await;
    let url = server.create_database("nul");
    let store = PgStore::open(config(url, Arc::new(ManualClock::new(1))))
        .await
        .unwrap();
    let frame = b"MSH|^~\\&|A\0B|F\0|||x||ADT^A01|C\0|P|2.5\r".to_vec();
    let id = store
        .journal(
            &frame,
            JournalMeta {
                listener: "main".into(),
                peer: "1.2.3.4:5".into(),
                msh: Some(MshSummary {
                    control_id: "C\0".into(),
                    ..MshSummary::default()
                }),
                rejected: Some("bad\0byte".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.raw(id).await.unwrap().unwrap(),
        frame,
        "bytes kept as they came"
    );
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.msh.unwrap().control_id, "C\u{FFFD}");
    assert_eq!(record.error.as_deref(), Some("bad\u{FFFD}byte"));
    let map: HashMap<_, _> = store.counts().await.unwrap().messages.into_iter().collect();
    assert_eq!(map.get("rejected"), Some(&1));
}

/// A database made before the `duplicate` state takes it after the next open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_the_duplicate_state_is_upgraded_on_open() {
    let server = server().await;
    let url = server.create_database("upgrade");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1));
    let store = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    let first = store
        .journal(b"MSH|1", JournalMeta::default())
        .await
        .unwrap();
    let resend = store
        .journal(b"MSH|1", JournalMeta::default())
        .await
        .unwrap();
    drop(store);
    // The check as the first schema wrote it.
    let db = common::client(&url).await;
    db.batch_execute(
        "ALTER TABLE passerelle_messages DROP CONSTRAINT passerelle_messages_state_check;
         ALTER TABLE passerelle_messages ADD CONSTRAINT passerelle_messages_state_check
             CHECK (state IN ('received', 'rejected', 'unrouted', 'mapped', 'mapping_failed'));",
    )
    .await
    .unwrap();
    let refused = db
        .execute(
            "UPDATE passerelle_messages SET state = 'duplicate' WHERE id = $1",
            &[&(resend as i64)],
        )
        .await;
    assert!(refused.is_err(), "the old check refuses the new state");

    let store = PgStore::open(config(url, clock)).await.unwrap();
    store
        .record_outcome(resend, Outcome::Duplicate { of: first })
        .await
        .unwrap();
    assert_eq!(
        store.get(resend).await.unwrap().unwrap().state,
        MessageState::Duplicate
    );
}

/// A database made before resubmissions (no `links` column) takes the column at the next
/// open; its messages read with no links, and can be resubmitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_resubmissions_is_upgraded_on_open() {
    let server = server().await;
    let url = server.create_database("links");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1));
    let store = PgStore::open(config(url.clone(), clock.clone()))
        .await
        .unwrap();
    let old = store
        .journal(b"MSH|^~\\&|old", JournalMeta::default())
        .await
        .unwrap();
    drop(store);
    let db = common::client(&url).await;
    db.batch_execute("ALTER TABLE passerelle_messages DROP COLUMN links;")
        .await
        .unwrap();

    let store = PgStore::open(config(url, clock)).await.unwrap();
    assert!(store.get(old).await.unwrap().unwrap().links.is_empty());
    let copy = store
        .resubmit(old, b"MSH|^~\\&|new", JournalMeta::default())
        .await
        .unwrap();
    assert_eq!(
        store.get(old).await.unwrap().unwrap().links.resubmitted_as,
        [copy]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_can_hold_a_key_behind_a_dead_delivery() {
    let server = server().await;
    let url = server.create_database("hold");
    let mut c = config(url, Arc::new(ManualClock::new(1)));
    c.dead_letter_releases_key = false;
    contract::a_dead_delivery_holds_its_key(
        PgStore::open(c).await.unwrap(),
        &RetryPolicy::default(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_holds_a_key_behind_a_dead_delivery_of_a_destination_that_asks() {
    let server = server().await;
    let url = server.create_database("hold_policy");
    let c = config(url, Arc::new(ManualClock::new(1)));
    let holding = RetryPolicy {
        dead_holds_key: true,
        ..RetryPolicy::default()
    };
    contract::a_dead_delivery_holds_its_key(PgStore::open(c).await.unwrap(), &holding).await;
}

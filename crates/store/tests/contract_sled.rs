//! The store contract (src/contract.rs) on the sled backend, plus sled-specific checks:
//! corruption quarantine, restart recovery, schema version, group commit.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::sync::Arc;
use std::time::Duration;

use passerelle_store::{
    Clock, JournalMeta, ManualClock, MessageState, Query, RetryPolicy, SledStore, Store,
    StoreConfig, StoreError, contract,
};

fn config(dir: &std::path::Path, clock: Arc<dyn Clock>) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.clock = clock;
    c.visibility_timeout = Duration::from_millis(contract::VISIBILITY_MS);
    c.cache_capacity = 8 * 1024 * 1024;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_passes_the_store_contract() {
    let dirs = std::cell::RefCell::new(Vec::new());
    contract::run_all(|clock| {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(config(dir.path(), clock)).unwrap();
        dirs.borrow_mut().push(dir);
        std::future::ready(store)
    })
    .await;
}

#[tokio::test]
async fn corrupted_record_is_quarantined_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(dir.path(), Arc::new(ManualClock::new(1)))).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            store
                .journal(format!("MSH|{i}").as_bytes(), JournalMeta::default())
                .await
                .unwrap(),
        );
    }
    store
        .debug_overwrite_message(ids[1], b"{\"not\": \"sealed\"}")
        .unwrap();
    assert!(matches!(
        store.get(ids[1]).await,
        Err(StoreError::Corrupt {
            tree: "messages",
            ..
        })
    ));
    let page = store.list(&Query::default()).await.unwrap();
    assert_eq!(
        page.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[0], ids[2]],
        "the others are listed"
    );
    assert_eq!(store.counts().await.unwrap().quarantined, 1);
    assert!(
        store.get(ids[1]).await.unwrap().is_none(),
        "moved out of the way"
    );
    assert!(store.raw(ids[2]).await.unwrap().is_some());
}

#[tokio::test]
async fn leases_return_to_ready_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let id = {
        let store = SledStore::open(config(dir.path(), clock.clone())).unwrap();
        let id = store
            .journal(b"MSH|x", JournalMeta::default())
            .await
            .unwrap();
        store
            .record_outcome(
                id,
                passerelle_store::Outcome::Mapped {
                    route: "r".into(),
                    bundle: "{}".into(),
                    deliveries: vec![passerelle_store::Enqueue {
                        destination: "fhir".into(),
                        ordering_key: "K".into(),
                    }],
                },
            )
            .await
            .unwrap();
        assert_eq!(store.lease("fhir", 1).await.unwrap().len(), 1);
        store.flush().await.unwrap();
        id
    };
    let store = SledStore::open(config(dir.path(), clock)).unwrap();
    let lease = store.lease("fhir", 1).await.unwrap();
    assert_eq!(
        lease.len(),
        1,
        "the lease of the previous run is ready again at once"
    );
    assert_eq!(lease[0].message_id, id);
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        MessageState::Mapped
    );
}

#[test]
fn refuses_an_unknown_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", "99")
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(StoreConfig::new(dir.path())).unwrap_err();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SledStore::open(config(dir.path(), Arc::new(ManualClock::new(1)))).unwrap());
    let before = store.flush_count();
    let writers = 64;
    let per_writer = 20;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                store
                    .journal(format!("MSH|{w}|{i}").as_bytes(), JournalMeta::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = store.flush_count() - before;
    let journaled = (writers * per_writer) as u64;
    assert_eq!(
        store
            .counts()
            .await
            .unwrap()
            .messages
            .get("received")
            .copied(),
        Some(journaled)
    );
    assert!(
        flushes < journaled,
        "{flushes} flushes for {journaled} journaled messages: no sharing"
    );
    println!("{journaled} messages, {flushes} flushes");
}

#[tokio::test]
async fn sled_can_hold_a_key_behind_a_dead_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), Arc::new(ManualClock::new(1)));
    c.dead_letter_releases_key = false;
    contract::a_dead_delivery_holds_its_key(SledStore::open(c).unwrap(), &RetryPolicy::default())
        .await;
}

#[tokio::test]
async fn sled_holds_a_key_behind_a_dead_delivery_of_a_destination_that_asks() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), Arc::new(ManualClock::new(1)));
    let holding = RetryPolicy {
        dead_holds_key: true,
        ..RetryPolicy::default()
    };
    contract::a_dead_delivery_holds_its_key(SledStore::open(c).unwrap(), &holding).await;
}

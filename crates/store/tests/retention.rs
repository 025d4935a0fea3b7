//! Retention keeps the disk bounded: rounds of journal → deliver → prune do not make the
//! store grow round after round.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::sync::Arc;
use std::time::Duration;

use passerelle_store::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_disk_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut config = StoreConfig::new(dir.path());
    config.clock = clock.clone();
    config.cache_capacity = 8 * 1024 * 1024;
    let store = Arc::new(SledStore::open(config).unwrap());
    let policy = RetryPolicy::default();
    let mut sizes = Vec::new();
    for round in 0..5u64 {
        for i in 0..800u64 {
            let mut frame =
                format!("MSH|^~\\&|A|B|||20240101||ADT^A08|{round}-{i}|P|2.5\r").into_bytes();
            frame.resize(1_024, b'X');
            let id = store.journal(&frame, JournalMeta::default()).await.unwrap();
            let deliveries = vec![Enqueue {
                destination: "fhir".into(),
                ordering_key: format!("P{}", i % 50),
            }];
            store
                .record_outcome(
                    id,
                    Outcome::Mapped {
                        route: "r".into(),
                        bundle: "{}".into(),
                        deliveries,
                    },
                )
                .await
                .unwrap();
        }
        loop {
            let leases = store.lease("fhir", 100).await.unwrap();
            if leases.is_empty() {
                break;
            }
            for lease in leases {
                store
                    .complete(&lease, AttemptReport::delivered(), &policy)
                    .await
                    .unwrap();
            }
        }
        clock.advance(3_600_000);
        let pruned = store.prune_delivered(clock.now_ms()).await.unwrap();
        assert_eq!(
            pruned, 800,
            "round {round}: every delivered message is pruned"
        );
        store.flush().await.unwrap();
        sizes.push(store.size_on_disk().unwrap());
    }
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.messages.get("mapped").copied(), Some(0));
    assert!(
        store
            .list(&Query::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    println!("size on disk after each round (bytes): {sizes:?}");
    let first = sizes[1];
    let last = *sizes.last().unwrap();
    assert!(
        last <= first * 2,
        "disk keeps growing although everything is pruned: {sizes:?}"
    );
}

#[tokio::test]
async fn the_background_task_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut config = StoreConfig::new(dir.path());
    config.clock = clock.clone();
    let store = Arc::new(SledStore::open(config).unwrap());
    let id = store
        .journal(b"MSH|^~\\&|x", JournalMeta::default())
        .await
        .unwrap();
    let deliveries = vec![Enqueue {
        destination: "fhir".into(),
        ordering_key: "K".into(),
    }];
    store
        .record_outcome(
            id,
            Outcome::Mapped {
                route: "r".into(),
                bundle: "{}".into(),
                deliveries,
            },
        )
        .await
        .unwrap();
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    store
        .complete(&lease, AttemptReport::delivered(), &RetryPolicy::default())
        .await
        .unwrap();
    clock.advance(2 * 86_400_000);
    let task = spawn_retention(
        store.clone(),
        clock.clone(),
        Duration::from_secs(86_400),
        Duration::from_millis(5),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(id).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never pruned the message"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polls the observable effect
    }
    task.abort();
}

//! The pipeline end to end, in process: an MLLP client sends fixtures to a listener whose
//! handler is the pipeline over a real sled store; routed messages are mapped with the
//! repository's v2-to-fhir pack and delivered as NDJSON files.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::sync::Arc;

use passerelle_engine::pipeline::UnroutedAnswer;
use passerelle_mllp::{Client, ClientConfig};
use passerelle_store::{DeliveryState, MessageState, Query, Store};
use passerelle_testkit::workspace_root;

mod common;
use common::{Harness, fixture, wait_delivered, wait_queue_delivered, wait_until};

/// ADT messages to NDJSON files under `out` (relative to the engine's folder).
const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_route_map_and_deliver_to_ndjson() {
    let engine = Harness::new(ROUTE);
    let (store, out) = (Arc::clone(&engine.store), engine.work.path().join("out"));
    let listener = engine.start(UnroutedAnswer::Error).await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();

    let adt = client.send(&fixture("adt_a01_admit.hl7")).await.unwrap();
    assert!(
        matches!(adt.code.as_str(), "AA" | "CA"),
        "a routed message is accepted once journaled: {}",
        adt.code
    );
    let oru = client
        .send(&fixture("oru_r01_chemistry.hl7"))
        .await
        .unwrap();
    assert!(
        matches!(oru.code.as_str(), "AE" | "CE"),
        "no route for ORU: answered as configured (error): {}",
        oru.code
    );
    assert!(
        oru.text.as_deref().unwrap_or_default().contains("no route"),
        "{:?}",
        oru.text
    );

    // A frame that does not parse is journaled as rejected and NAKed.
    let broken =
        std::fs::read(workspace_root().join("fixtures/malformed/segid_lowercase.hl7")).unwrap();
    let nak = client.send(&broken).await.unwrap();
    assert!(
        matches!(nak.code.as_str(), "AE" | "AR" | "CE" | "CR"),
        "{}",
        nak.code
    );

    wait_queue_delivered("the ADT to be delivered", &store, "adt.files", 1).await;
    let patients = std::fs::read_to_string(out.join("Patient.ndjson")).unwrap();
    let lines: Vec<&str> = patients.lines().collect();
    assert_eq!(lines.len(), 1, "one Patient line");
    let patient: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(patient["resourceType"], "Patient");
    assert!(out.join("Encounter.ndjson").exists(), "the visit too");

    let counts = store.counts().await.unwrap();
    let m = |s: &str| counts.messages.get(s).copied().unwrap_or(0);
    assert_eq!(
        (m("mapped"), m("unrouted"), m("rejected")),
        (1, 1, 1),
        "every frame is in a state an operator can list"
    );
    let unrouted = store
        .list(&Query {
            state: Some(MessageState::Unrouted),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(unrouted.items[0].msh.as_ref().unwrap().message_type, "ORU");
    let mapped = store
        .list(&Query {
            state: Some(MessageState::Mapped),
            ..Query::default()
        })
        .await
        .unwrap();
    let deliveries = store.deliveries(mapped.items[0].id).await.unwrap();
    assert_eq!(deliveries[0].state, DeliveryState::Delivered);
    assert!(!deliveries[0].ordering_key.is_empty());
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_but_unmapped_messages_are_mapped_on_start() {
    let engine = Harness::new(ROUTE);
    let (store, out) = (Arc::clone(&engine.store), engine.work.path().join("out"));
    // As if the engine stopped right after the ACK: journaled, not yet mapped.
    let id = store
        .journal(
            &fixture("adt_a08_update_nulls_v231.hl7"),
            passerelle_store::JournalMeta::default(),
        )
        .await
        .unwrap();
    let _listener = engine.start(UnroutedAnswer::Accept).await;
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        MessageState::Mapped,
        "mapped before start returns"
    );
    wait_delivered(&store, id).await;
    assert!(out.join("Patient.ndjson").exists());
}

/// A journaled message whose frame can no longer be read does not stop the start (it was
/// fetched again for ever): it is kept as mapping_failed with the reason, and the others
/// are mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_mapped_on_start_does_not_stop_the_start() {
    let engine = Harness::new(ROUTE);
    let store = Arc::clone(&engine.store);
    let meta = passerelle_store::JournalMeta::default;
    let damaged = store
        .journal(&fixture("adt_a01_admit.hl7"), meta())
        .await
        .unwrap();
    let healthy = store
        .journal(&fixture("adt_a08_update_nulls_v231.hl7"), meta())
        .await
        .unwrap();
    store
        .debug_overwrite_payload(damaged, b"not a payload")
        .unwrap();
    // On a thread and runtime of its own: a start that spun without yielding would hold
    // every worker of a shared runtime, and no timeout could fire.
    let (started, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let _listener = engine.start(UnroutedAnswer::Accept).await;
            started.send(()).unwrap();
        });
    });
    assert!(
        ended
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_ok(),
        "the start ended"
    );
    assert_eq!(
        store.get(healthy).await.unwrap().unwrap().state,
        MessageState::Mapped
    );
    let damaged = store.get(damaged).await.unwrap().unwrap();
    assert_eq!(
        damaged.state,
        MessageState::MappingFailed,
        "kept, for an operator"
    );
    assert!(
        damaged
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("the frame cannot be read")),
        "{:?}",
        damaged.error
    );
    assert_eq!(
        store.counts().await.unwrap().quarantined,
        1,
        "the damage is reported"
    );
}

/// A message acknowledged while the engine runs but never routed (as when a store error
/// kept its outcome out, or another node journaled it and stopped) is mapped by the
/// recheck, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_received_while_running_is_mapped_by_the_recheck() {
    let mut engine = Harness::new(ROUTE);
    engine.recheck = passerelle_engine::pipeline::Recheck {
        every: std::time::Duration::from_millis(50),
        stuck_after: std::time::Duration::from_millis(200),
    };
    let store = Arc::clone(&engine.store);
    let _listener = engine.start(UnroutedAnswer::Accept).await;
    // Journaled behind the engine's back: nothing queues it for the mapper.
    let journaled_at = std::time::Instant::now();
    let id = store
        .journal(
            &fixture("adt_a01_admit.hl7"),
            passerelle_store::JournalMeta::default(),
        )
        .await
        .unwrap();
    wait_until("the recheck to map it", || {
        let store = Arc::clone(&store);
        async move { store.get(id).await.unwrap().unwrap().state == MessageState::Mapped }
    })
    .await;
    // Not before it counts as stuck (200 ms; times in the store are whole milliseconds,
    // and a recheck runs every 50 ms, so a recheck ignoring the age would be far below).
    assert!(
        journaled_at.elapsed() >= std::time::Duration::from_millis(190),
        "mapped after {:?}",
        journaled_at.elapsed()
    );
    wait_delivered(&store, id).await;
}

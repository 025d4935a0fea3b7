//! The pipeline end to end, in process: an MLLP client sends fixtures to a listener whose
//! handler is the pipeline over a real sled store; routed messages are mapped with the
//! repository's v2-to-fhir pack and delivered as NDJSON files.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_engine::pipeline::{Pipeline, PipelineConfig, UnroutedAnswer};
use passerelle_engine::routes::RouteTable;
use passerelle_mapping::{MapOptions, Pack};
use passerelle_mllp::{Client, ClientConfig, Listener, ListenerConfig};
use passerelle_store::{DeliveryState, MessageState, Query, SledStore, Store, StoreConfig};
use passerelle_testkit::workspace_root;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("fixtures/hl7").join(name)).unwrap()
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polls an observable effect
    }
}

fn routes(dir: &Path, out: &Path) -> RouteTable {
    std::fs::write(
        dir.join("10-adt.toml"),
        format!(
            "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"{}\"\n",
            out.display()
        ),
    )
    .unwrap();
    RouteTable::load(dir, &["v2-to-fhir".to_owned()], &["mllp".to_owned()]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_route_map_and_deliver_to_ndjson() {
    let work = tempfile::tempdir().unwrap();
    let (routes_dir, out, store_dir) = (
        work.path().join("routes.d"),
        work.path().join("out"),
        work.path().join("store"),
    );
    std::fs::create_dir_all(&routes_dir).unwrap();
    let store = Arc::new(SledStore::open(StoreConfig::new(&store_dir)).unwrap());
    let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
    let config = PipelineConfig {
        routes: routes(&routes_dir, &out),
        packs: HashMap::from([("v2-to-fhir".to_owned(), pack)]),
        map_options: MapOptions::default(),
        unrouted: UnroutedAnswer::Error,
        base_dir: work.path().to_path_buf(),
    };
    let pipeline = Pipeline::start(Arc::clone(&store), config).await.unwrap();
    let listener = Listener::bind(ListenerConfig::new("127.0.0.1:0".parse().unwrap()), None)
        .await
        .unwrap()
        .spawn(pipeline);
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

    wait_until("the ADT to be delivered", || {
        let store = Arc::clone(&store);
        async move {
            store
                .counts()
                .await
                .unwrap()
                .deliveries
                .get(&("adt.files".to_owned(), "delivered".to_owned()))
                .copied()
                == Some(1)
        }
    })
    .await;
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
    let work = tempfile::tempdir().unwrap();
    let (routes_dir, out, store_dir) = (
        work.path().join("routes.d"),
        work.path().join("out"),
        work.path().join("store"),
    );
    std::fs::create_dir_all(&routes_dir).unwrap();
    let store = Arc::new(SledStore::open(StoreConfig::new(&store_dir)).unwrap());
    // As if the engine stopped right after the ACK: journaled, not yet mapped.
    let id = store
        .journal(
            &fixture("adt_a08_update_nulls_v231.hl7"),
            passerelle_store::JournalMeta::default(),
        )
        .await
        .unwrap();
    let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
    let config = PipelineConfig {
        routes: routes(&routes_dir, &out),
        packs: HashMap::from([("v2-to-fhir".to_owned(), pack)]),
        map_options: MapOptions::default(),
        unrouted: UnroutedAnswer::Accept,
        base_dir: work.path().to_path_buf(),
    };
    let _pipeline = Pipeline::start(Arc::clone(&store), config).await.unwrap();
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        MessageState::Mapped,
        "mapped before start returns"
    );
    wait_until("the recovered message to be delivered", || {
        let store = Arc::clone(&store);
        async move {
            store
                .deliveries(id)
                .await
                .unwrap()
                .first()
                .is_some_and(|d| d.state == DeliveryState::Delivered)
        }
    })
    .await;
    assert!(out.join("Patient.ndjson").exists());
}

//! The engine against a real FHIR server (`@medplum/fhir-router`, run as a node process):
//! the server is down (503) for the first attempts, the engine retries with backoff,
//! honouring Retry-After, then delivers; three updates of one patient arrive in the order
//! they were received, so the server ends with the last one; a repeat creates no duplicate.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_engine::pipeline::{Pipeline, PipelineConfig, UnroutedAnswer};
use passerelle_engine::routes::RouteTable;
use passerelle_hl7::{Message, OwnedMessage, Path as Hl7Path};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_mllp::{Client, ClientConfig, Listener, ListenerConfig};
use passerelle_store::{
    AttemptOutcome, DeliveryState, MessageState, Query, SledStore, Store, StoreConfig,
};
use passerelle_testkit::fhir_server::FhirServer;
use passerelle_testkit::workspace_root;

fn update(template: &OwnedMessage, control_id: &str, family: &str) -> Vec<u8> {
    let mut m = template.clone();
    m.set(&"MSH-10".parse::<Hl7Path>().unwrap(), control_id)
        .unwrap();
    m.set(&"PID-5.1".parse::<Hl7Path>().unwrap(), family)
        .unwrap();
    m.write().unwrap()
}

async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .get(url)
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_the_server_is_back_and_keeps_patient_order() {
    let server = tokio::task::spawn_blocking(FhirServer::start)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let routes_dir = work.path().join("routes.d");
    std::fs::create_dir_all(&routes_dir).unwrap();
    // The first two requests get 503 with Retry-After: 2 (the server is "down").
    std::fs::write(
        routes_dir.join("10-fhir.toml"),
        format!(
            "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"{}\"\n[destinations.retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\njitter = 0.0\nmax_attempts = 10\n",
            server.failing_base_url(503, 2)
        ),
    )
    .unwrap();
    let routes = RouteTable::load(
        &routes_dir,
        &["v2-to-fhir".to_owned()],
        &["mllp".to_owned()],
    )
    .unwrap();
    let store = Arc::new(SledStore::open(StoreConfig::new(work.path().join("store"))).unwrap());
    let config = PipelineConfig {
        routes,
        packs: HashMap::from([(
            "v2-to-fhir".to_owned(),
            Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap(),
        )]),
        map_options: MapOptions::default(),
        unrouted: UnroutedAnswer::Accept,
        base_dir: work.path().to_path_buf(),
    };
    let pipeline = Pipeline::start(Arc::clone(&store), config).await.unwrap();
    let listener = Listener::bind(ListenerConfig::new("127.0.0.1:0".parse().unwrap()), None)
        .await
        .unwrap()
        .spawn(pipeline);

    let template = std::fs::read(workspace_root().join("fixtures/hl7/adt_a01_admit.hl7")).unwrap();
    let template = OwnedMessage::from_message(&Message::parse(&template).unwrap());
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
    for (i, family) in ["FIRSTNAME", "SECONDNAME", "THIRDNAME"].iter().enumerate() {
        let ack = client
            .send(&update(&template, &format!("ORDER{i}"), family))
            .await
            .unwrap();
        assert!(matches!(ack.code.as_str(), "AA" | "CA"), "{}", ack.code);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = store.counts().await.unwrap();
        if counts
            .deliveries
            .get(&("adt.fhir".to_owned(), "delivered".to_owned()))
            .copied()
            == Some(3)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered: {:?}",
            counts.deliveries
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polls the store's counters
    }

    // The first message met the outage: transient attempts first, then delivered.
    let mapped = store
        .list(&Query {
            state: Some(MessageState::Mapped),
            ..Query::default()
        })
        .await
        .unwrap();
    let first = store
        .deliveries(mapped.items[0].id)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(first.state, DeliveryState::Delivered);
    let outcomes: Vec<AttemptOutcome> = first.history.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [
            AttemptOutcome::Transient,
            AttemptOutcome::Transient,
            AttemptOutcome::Delivered
        ]
    );
    assert_eq!(first.history[0].status, Some(503));
    let waited = first.history[1].at_ms - first.history[0].at_ms;
    assert!(waited >= 2_000, "Retry-After: 2 was honoured ({waited} ms)");

    // One Patient, holding the last update: order per patient held through the outage.
    let bundle: serde_json::Value =
        serde_json::from_str(mapped.items[2].bundle.as_deref().unwrap()).unwrap();
    let patient = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .unwrap();
    let identifier = &patient["resource"]["identifier"][0];
    let query = format!(
        "{}/Patient?identifier={}|{}",
        server.base_url(),
        identifier["system"].as_str().unwrap(),
        identifier["value"].as_str().unwrap()
    );
    let found = get_json(&query).await;
    assert_eq!(found["total"], 1, "one Patient for three messages: {found}");
    assert_eq!(
        found["entry"][0]["resource"]["name"][0]["family"], "THIRDNAME",
        "the last update wins"
    );
    listener.shutdown().await;
}

/// A 4xx from the server sends the message to the dead letter with the server's
/// OperationOutcome; once the cause is fixed, a replay (with a re-mapped bundle, as
/// `passerelle messages replay --remap` does) delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_goes_to_dead_letter_then_replay_delivers() {
    let server = tokio::task::spawn_blocking(FhirServer::start)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let routes_dir = work.path().join("routes.d");
    std::fs::create_dir_all(&routes_dir).unwrap();
    // The server refuses the first request with 422 (think: a code it does not accept).
    std::fs::write(
        routes_dir.join("10-fhir.toml"),
        format!(
            "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"{}\"\n",
            server.failing_base_url(422, 1)
        ),
    )
    .unwrap();
    let routes = RouteTable::load(
        &routes_dir,
        &["v2-to-fhir".to_owned()],
        &["mllp".to_owned()],
    )
    .unwrap();
    let store = Arc::new(SledStore::open(StoreConfig::new(work.path().join("store"))).unwrap());
    let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
    let packs = HashMap::from([("v2-to-fhir".to_owned(), pack)]);
    let config = PipelineConfig {
        routes: routes.clone(),
        packs: packs.clone(),
        map_options: MapOptions::default(),
        unrouted: UnroutedAnswer::Accept,
        base_dir: work.path().to_path_buf(),
    };
    let pipeline = Pipeline::start(Arc::clone(&store), config).await.unwrap();
    let listener = Listener::bind(ListenerConfig::new("127.0.0.1:0".parse().unwrap()), None)
        .await
        .unwrap()
        .spawn(pipeline);
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
    let bytes = std::fs::read(workspace_root().join("fixtures/hl7/adt_a04_v28.hl7")).unwrap();
    let ack = client.send(&bytes).await.unwrap();
    assert!(matches!(ack.code.as_str(), "AA" | "CA"), "{}", ack.code);

    let state_of = |store: Arc<SledStore>| async move {
        let page = store
            .list(&Query {
                state: Some(MessageState::Mapped),
                ..Query::default()
            })
            .await
            .unwrap();
        let id = page.items.first().map(|r| r.id)?;
        Some((id, store.deliveries(id).await.unwrap().remove(0)))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (id, dead) = loop {
        if let Some((id, d)) = state_of(Arc::clone(&store)).await
            && d.state == DeliveryState::Dead
        {
            break (id, d);
        }
        assert!(
            Instant::now() < deadline,
            "the 422 did not reach the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polls the store
    };
    assert_eq!(dead.history.len(), 1, "a permanent failure is not retried");
    assert_eq!(dead.history[0].status, Some(422));
    assert_eq!(dead.history[0].outcome, AttemptOutcome::Permanent);
    assert!(dead.dead_reason.as_deref().unwrap().contains("permanent"));
    assert!(
        !dead.history[0].detail.is_empty(),
        "the OperationOutcome excerpt is kept"
    );

    // The fix is in (here: the server accepts again); re-map and replay.
    let raw = store.raw(id).await.unwrap().unwrap();
    let message = Message::parse(&raw).unwrap();
    let remapped = passerelle_engine::pipeline::route_and_map(
        &routes,
        &packs,
        &MapOptions::default(),
        &message,
        "mllp",
    );
    let passerelle_store::Outcome::Mapped { bundle, .. } = remapped else {
        panic!("re-mapping failed")
    };
    assert_eq!(store.replay(id, Some(bundle)).await.unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, d) = state_of(Arc::clone(&store)).await.unwrap();
        if d.state == DeliveryState::Delivered {
            assert_eq!(d.history.len(), 2, "the history keeps the failed attempt");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay was not delivered: {:?}",
            d.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polls the store
    }
    listener.shutdown().await;
}

//! The engine against a real FHIR server (`@medplum/fhir-router`, run as a node process):
//! the server is down (503) for the first attempts, the engine retries with backoff,
//! honouring Retry-After, then delivers; three updates of one patient arrive in the order
//! they were received, so the server ends with the last one; a repeat creates no duplicate.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_engine::pipeline::UnroutedAnswer;
use passerelle_hl7::{Message, OwnedMessage, Path as Hl7Path};
use passerelle_mapping::MapOptions;
use passerelle_mllp::{Client, ClientConfig};
use passerelle_store::{
    AttemptOutcome, DeliveryState, MessageState, Query, ReplaySelection, SledStore, Store,
};
use passerelle_testkit::fhir_server::FhirServer;

mod common;
use common::{Harness, fixture};

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
    // The first two requests get 503 with Retry-After: 2 (the server is "down").
    let engine = Harness::new(&format!(
        "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"{}\"\n[destinations.retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\njitter = 0.0\nmax_attempts = 10\n",
        server.failing_base_url(503, 2)
    ));
    let store = Arc::clone(&engine.store);
    let listener = engine.start(UnroutedAnswer::Accept).await;

    let template = fixture("adt_a01_admit.hl7");
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
    let last = store.get(mapped.items[2].id).await.unwrap().unwrap();
    let bundle: serde_json::Value = serde_json::from_str(last.bundle.as_deref().unwrap()).unwrap();
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
    // The server refuses the first request with 422 (think: a code it does not accept).
    let engine = Harness::new(&format!(
        "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"{}\"\n",
        server.failing_base_url(422, 1)
    ));
    let store = Arc::clone(&engine.store);
    let listener = engine.start(UnroutedAnswer::Accept).await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
    let ack = client.send(&fixture("adt_a04_v28.hl7")).await.unwrap();
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
        &engine.routes,
        &engine.packs,
        &MapOptions::default(),
        &message,
        "mllp",
    );
    let passerelle_store::Outcome::Mapped { bundle, .. } = remapped else {
        panic!("re-mapping failed")
    };
    assert_eq!(
        store
            .replay(id, Some(bundle), &ReplaySelection::default())
            .await
            .unwrap(),
        1
    );
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

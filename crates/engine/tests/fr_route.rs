//! The French route end to end, in process: the repository's real `routes.d` and every
//! pack of `mappings/` are loaded; an MLLP client sends IHE PAM FR fixtures (Latin-9 and
//! UTF-8) and a non-French message; `routes.d/50-fr-pam.toml` must take the French feed
//! to the `fr` pack and its NDJSON files, in order, and leave the other message to the
//! default route.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use passerelle_engine::pipeline::UnroutedAnswer;
use passerelle_engine::routes::RouteTable;
use passerelle_hl7::HeaderSummary;
use passerelle_mapping::Pack;
use passerelle_mllp::{Client, ClientConfig};
use passerelle_store::{SledStore, StoreConfig};
use passerelle_testkit::workspace_root;

mod common;
use common::{Harness, fixture, wait_queue_delivered};

/// A harness over the repository's own routes and packs (not a test route).
fn repository_engine() -> Harness {
    let root = workspace_root();
    let packs_dir = root.join("mappings");
    let names = passerelle_engine::known_packs(&packs_dir);
    assert!(
        names.iter().any(|n| n == "fr"),
        "the fr pack is discovered: {names:?}"
    );
    let routes = RouteTable::load(&root.join("routes.d"), &names, &["main".to_owned()])
        .unwrap_or_else(|e| panic!("routes.d does not load: {e}"));
    let packs: HashMap<String, Pack> = names
        .iter()
        .map(|n| (n.clone(), Pack::load(packs_dir.join(n)).unwrap()))
        .collect();
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(StoreConfig::new(work.path().join("store"))).unwrap());
    Harness {
        work,
        store,
        routes,
        packs,
        recheck: Default::default(),
    }
}

fn french(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("fixtures/fr").join(name)).unwrap()
}

/// Sends a French fixture and checks that it is accepted (AA, or CA in enhanced mode).
async fn send_accepted(client: &mut Client, name: &str) {
    let ack = client.send(&french(name)).await.unwrap();
    assert!(
        matches!(ack.code.as_str(), "AA" | "CA"),
        "{name}: {}",
        ack.code
    );
}

fn route_of(routes: &RouteTable, bytes: &[u8]) -> String {
    let message = passerelle_hl7::Message::parse(bytes).unwrap();
    routes
        .select(&HeaderSummary::of(&message), "main")
        .map(|r| r.name.clone())
        .unwrap_or_default()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The resources of an NDJSON file that carry this identifier value.
fn with_identifier<'v>(
    resources: &'v [serde_json::Value],
    value: &str,
) -> Vec<&'v serde_json::Value> {
    resources
        .iter()
        .filter(|r| {
            r["identifier"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i["value"] == value))
        })
        .collect()
}

#[test]
fn the_french_route_takes_only_french_feeds() {
    let engine = repository_engine();
    for name in [
        "fr_12_a01_admit_8859-15.hl7",
        "fr_30_a04_outpatient_8859-1.hl7",
        "fr_01_a28_create_vali_utf8.hl7",
        "fr_50_oru_r01_cda.hl7",
        "fr_51_mdm_t02_cda_utf8.hl7",
    ] {
        assert_eq!(route_of(&engine.routes, &french(name)), "fr-pam", "{name}");
    }
    for name in [
        "adt_a01_admit.hl7",
        "oru_r01_chemistry.hl7",
        "latin1_oru_r01.hl7",
    ] {
        assert_eq!(
            route_of(&engine.routes, &fixture(name)),
            "default-ndjson",
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_french_feed_goes_through_the_fr_pack_to_ndjson() {
    let engine = repository_engine();
    let store = Arc::clone(&engine.store);
    let out = engine.work.path().join("out");
    let listener = engine.start(UnroutedAnswer::Error).await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();

    // A stay: admission (Latin-9), transfer, its cancellation, then a CDA report; and a
    // message from another feed.
    let feed = [
        "fr_12_a01_admit_8859-15.hl7",
        "fr_13_a02_transfer.hl7",
        "fr_14_a12_cancel_transfer.hl7",
        "fr_50_oru_r01_cda.hl7",
    ];
    for name in feed {
        send_accepted(&mut client, name).await;
    }
    let other = client.send(&fixture("adt_a01_admit.hl7")).await.unwrap();
    assert!(matches!(other.code.as_str(), "AA" | "CA"), "{}", other.code);

    wait_queue_delivered(
        "the French feed to be delivered",
        &store,
        "fr-pam.ndjson",
        feed.len(),
    )
    .await;
    wait_queue_delivered(
        "the other feed to be delivered",
        &store,
        "default-ndjson.ndjson",
        1,
    )
    .await;
    listener.shutdown().await;

    // Patients: fr-core profiles, the INS of a qualified identity, Latin-9 text as UTF-8.
    let fr = out.join("fr");
    let patients = lines(&fr.join("Patient.ndjson"));
    assert_eq!(patients.len(), 3, "one Patient per ADT message");
    for p in &patients {
        assert_eq!(
            p["meta"]["profile"][0],
            "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient"
        );
        assert_eq!(p["name"][0]["family"], "LEFÈVRE");
        assert_eq!(p["name"][1]["family"], "DUCŒUR");
        assert_eq!(p["identifier"][1]["system"], "urn:oid:1.2.250.1.213.1.4.8");
    }

    // The transferred movement, then the same movement cancelled, in that order.
    let encounters = lines(&fr.join("Encounter.ndjson"));
    let movement = with_identifier(&encounters, "MVT-250115-0031");
    let statuses: Vec<&str> = movement
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["in-progress", "entered-in-error"]);
    let visits = with_identifier(&encounters, "250001473");
    assert_eq!(
        visits.len(),
        3,
        "the visit is rewritten by each ADT message"
    );
    assert!(visits.iter().all(|v| v["status"] == "in-progress"));

    // The CDA report.
    let documents = lines(&fr.join("DocumentReference.ndjson"));
    assert_eq!(documents.len(), 1);
    assert_eq!(documents[0]["type"]["coding"][0]["code"], "11502-2");
    assert_eq!(
        documents[0]["content"][0]["attachment"]["contentType"],
        "text/xml"
    );
    let observations = lines(&fr.join("Observation.ndjson"));
    assert!(observations.iter().any(|o| {
        o["valueString"]
            .as_str()
            .is_some_and(|s| s.contains("45 € par nuit"))
    }));

    // The other feed went to the default route, not to the French files.
    let default_patients = lines(&out.join("Patient.ndjson"));
    assert_eq!(default_patients.len(), 1);
    assert_eq!(default_patients[0]["name"][0]["family"], "WHITFIELD");
    assert!(
        patients
            .iter()
            .all(|p| p["name"][0]["family"] != "WHITFIELD"),
        "nothing of the other feed in out/fr"
    );
}

/// PAM FR's optional pending and tracking events used to reach the `fr` route and fail
/// with "no message map"; they now map and are delivered, each cancellation rewriting
/// the planned movement its pending event wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_and_tracking_events_are_delivered() {
    let engine = repository_engine();
    let store = Arc::clone(&engine.store);
    let out = engine.work.path().join("out");
    let listener = engine.start(UnroutedAnswer::Error).await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();

    let feed = [
        "fr_60_a14_pending_admit.hl7",
        "fr_61_a27_cancel_pending_admit.hl7",
        "fr_62_a09_depart_imaging.hl7",
        "fr_65_a15_pending_transfer.hl7",
        "fr_66_a26_cancel_pending_transfer.hl7",
    ];
    for name in feed {
        assert_eq!(route_of(&engine.routes, &french(name)), "fr-pam", "{name}");
        send_accepted(&mut client, name).await;
    }
    wait_queue_delivered(
        "the pending events to be delivered",
        &store,
        "fr-pam.ndjson",
        feed.len(),
    )
    .await;
    listener.shutdown().await;

    let encounters = lines(&out.join("fr").join("Encounter.ndjson"));
    let statuses = |value: &str| -> Vec<String> {
        with_identifier(&encounters, value)
            .iter()
            .map(|e| e["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(statuses("MVT-250124-0140"), ["planned", "cancelled"]);
    assert_eq!(statuses("250004410"), ["planned", "cancelled"]);
    assert_eq!(statuses("MVT-250119-0085"), ["planned", "cancelled"]);
    assert_eq!(
        statuses("250001473"),
        ["in-progress", "in-progress", "in-progress"],
        "A09, A15 and A26 leave the stay in progress"
    );
}

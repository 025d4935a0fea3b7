//! The FHIR HTTP destination against a real FHIR server: `@medplum/fhir-router`'s
//! `FhirRouter` over a `MemoryRepository` behind node:http (passerelle-testkit installs it,
//! pinned). Bundles come from the repository's own mapping pack, so what is posted is what
//! the engine posts.

#![allow(clippy::unwrap_used)]

use std::path::Path;

mod common;

use passerelle_delivery::{AttemptOutcome, Destination, Item};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_testkit::fhir_server::FhirServer;
use passerelle_testkit::workspace_root;
use serde_json::Value;

fn bundle(fixture: &str) -> String {
    let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
    let bytes = std::fs::read(workspace_root().join("fixtures/hl7").join(fixture)).unwrap();
    let message = passerelle_hl7::Message::parse(&bytes).unwrap();
    pack.map(&message, &MapOptions::default())
        .unwrap()
        .to_json(false)
}

fn destination(url: &str) -> Destination {
    let settings: toml::Table = toml::from_str(&format!("url = {url:?}\ntimeout_s = 10")).unwrap();
    Destination::from_settings("fhir", &settings, Path::new("/")).unwrap()
}

fn item(bundle: &str) -> Item<'_> {
    Item {
        message_id: 1,
        bundle: Some(bundle),
        raw: b"MSH|...",
    }
}

/// The Patient of a bundle's first Patient entry: (system|value of its first identifier).
fn patient_identifier(bundle: &str) -> String {
    let v: Value = serde_json::from_str(bundle).unwrap();
    let patient = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Patient")
        .expect("the bundle has a Patient");
    let id = &patient["identifier"][0];
    format!(
        "{}|{}",
        id["system"].as_str().unwrap(),
        id["value"].as_str().unwrap()
    )
}

async fn search(base: &str, query: &str) -> Value {
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{base}/{query}"))
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One server (it takes a few seconds to start) for the scenarios that need one, run in
/// turn; it is killed at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_fhir_server() {
    let server = tokio::task::spawn_blocking(FhirServer::start)
        .await
        .unwrap();
    a_mapped_bundle_is_delivered_and_a_repeat_leaves_one_patient(&server).await;
    unavailable_is_transient_with_retry_after_then_delivered(&server).await;
    too_many_requests_is_transient_with_an_http_date(&server).await;
    a_refused_bundle_is_permanent_with_an_operation_outcome_excerpt(&server).await;
}

async fn a_mapped_bundle_is_delivered_and_a_repeat_leaves_one_patient(server: &FhirServer) {
    let bundle = bundle("adt_a01_admit.hl7");
    let dest = destination(&server.base_url());

    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(report.status, Some(200));

    let identifier = patient_identifier(&bundle);
    let query = format!("Patient?identifier={}", percent_encode(&identifier));
    let found = search(&server.base_url(), &query).await;
    assert_eq!(found["total"], 1, "{found}");
    let first_id = found["entry"][0]["resource"]["id"].clone();

    // At-least-once: the same bundle again (a replay, a retry after a lost answer) must
    // leave one Patient, thanks to the mapping's conditional update.
    let again = dest.deliver(&item(&bundle)).await;
    assert_eq!(again.outcome, AttemptOutcome::Delivered, "{again:?}");
    let found = search(&server.base_url(), &query).await;
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["entry"][0]["resource"]["id"], first_id);
}

async fn unavailable_is_transient_with_retry_after_then_delivered(server: &FhirServer) {
    let bundle = bundle("adt_a04_v28.hl7");
    let dest = destination(&server.failing_base_url(503, 1));
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "http_5xx");
    assert_eq!(report.status, Some(503));
    assert_eq!(report.retry_after_ms, Some(2000));
    assert!(report.detail.contains("transient"), "{report:?}");
    // The next attempt goes through.
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
}

async fn too_many_requests_is_transient_with_an_http_date(server: &FhirServer) {
    let bundle = bundle("adt_a04_v28.hl7");
    let dest = destination(&server.failing_base_url(429, 1));
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "http_429");
    let ms = report.retry_after_ms.expect("Retry-After as an HTTP date");
    // An HTTP date has one-second resolution: 2 s ahead reads as 1 to 2 s.
    assert!((0..=2000).contains(&ms), "{ms}");
}

async fn a_refused_bundle_is_permanent_with_an_operation_outcome_excerpt(server: &FhirServer) {
    let dest = destination(&server.base_url());
    // Not a Bundle: the real server refuses it with 400 and an OperationOutcome.
    let not_a_bundle = r#"{"resourceType":"Patient","name":[{"family":"SECRET"}]}"#;
    let report = dest.deliver(&item(not_a_bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "http_4xx");
    assert_eq!(report.status, Some(400));
    assert!(
        report.detail.starts_with("HTTP 400: error invalid"),
        "{report:?}"
    );
    assert!(!report.detail.contains("SECRET"), "never echo the bundle");

    // A 422 with an OperationOutcome (injected).
    let dest = destination(&server.failing_base_url(422, 1));
    let report = dest.deliver(&item(&bundle("adt_a04_v28.hl7"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.status, Some(422));
    assert_eq!(report.retry_after_ms, None);
    assert_eq!(
        report.detail,
        "HTTP 422: error transient: injected failure 1 of 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bundle_is_permanent() {
    let dest = destination("http://127.0.0.1:9/fhir/R4");
    let report = dest
        .deliver(&Item {
            message_id: 7,
            bundle: None,
            raw: b"MSH|",
        })
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent);
    assert_eq!(report.error_class, "no_bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_transient_connect() {
    // A port that was free a moment ago: bind, note, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dest = destination(&format!("http://127.0.0.1:{port}/fhir/R4"));
    let report = dest.deliver(&item(r#"{"resourceType":"Bundle"}"#)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "connect");
    assert_eq!(report.status, None);
    assert!(!report.detail.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_transient_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let settings: toml::Table = toml::from_str(&format!(
        "url = \"http://127.0.0.1:{port}/fhir/R4\"\ntimeout_s = 0.5"
    ))
    .unwrap();
    let dest = Destination::from_settings("fhir", &settings, Path::new("/")).unwrap();
    let report = dest.deliver(&item(r#"{"resourceType":"Bundle"}"#)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "timeout");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca() {
    let pki = common::pki();
    let (cert, key, ca) = (
        pki.file("server.pem"),
        pki.file("server.key"),
        pki.file("ca.pem"),
    );
    let server = tokio::task::spawn_blocking(move || FhirServer::start_tls(&cert, &key, &ca))
        .await
        .unwrap();
    assert!(server.base_url().starts_with("https://"));
    let bundle = bundle("adt_a01_admit.hl7");
    let build = |extra: &str| {
        let settings: toml::Table = toml::from_str(&format!(
            "url = {:?}\ntimeout_s = 10\n{extra}",
            server.base_url()
        ))
        .unwrap();
        // Relative file names resolve against the base dir.
        Destination::from_settings("fhir", &settings, pki.dir()).unwrap()
    };

    let good = build("ca = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"");
    let report = good.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(report.status, Some(200));

    // Without a client certificate the server refuses the handshake: transient (an
    // operator fixes the configuration, and the queue drains).
    let anonymous = build("ca = \"ca.pem\"");
    let report = anonymous.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");

    // Checked against the system's roots, the private CA's server is not trusted.
    let system_roots = build("client_cert = \"client.pem\"\nclient_key = \"client.key\"");
    let report = system_roots.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "connect", "{report:?}");
}

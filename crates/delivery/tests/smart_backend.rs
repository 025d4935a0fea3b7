//! SMART Backend Services against real peers: node-oidc-provider as the authorization
//! server (client_credentials, `private_key_jwt` checked against each client's registered
//! public key, jti replay detection) and the medplum FHIR server as its resource server
//! (it introspects the bearer token of every request and answers 401 unless it is
//! active). Keys are generated here; bundles come from the repository's mapping pack.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::Keys;
use passerelle_delivery::{AttemptOutcome, AttemptReport, Destination, Item};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_testkit::fhir_server::FhirServer;
use passerelle_testkit::smart_auth::{
    INTROSPECTOR_ID, INTROSPECTOR_SECRET, SmartAuthServer, SmartClient,
};
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

fn item(bundle: &str) -> Item<'_> {
    Item {
        message_id: 1,
        bundle: Some(bundle),
        raw: b"MSH|...",
    }
}

struct Peers {
    keys: Keys,
    auth: SmartAuthServer,
    fhir: FhirServer,
}

impl Peers {
    /// A FHIR destination at `url` authenticating as `client_id` with the key file `key`
    /// (relative to the keys' directory) and the extra auth settings `extra`.
    fn destination(&self, url: &str, client_id: &str, key: &str, extra: &str) -> Destination {
        let settings: toml::Table = toml::from_str(&format!(
            "url = {url:?}\ntimeout_s = 10\nauth = {{ type = \"smart_backend\", token_url = {:?}, client_id = {client_id:?}, private_key_file = {key:?}{extra} }}",
            self.auth.token_url()
        ))
        .unwrap();
        Destination::from_settings("fhir", &settings, self.keys.dir()).unwrap()
    }

    fn requests(&self, client_id: &str) -> u32 {
        self.auth.stats(client_id).requests
    }
}

fn client(id: &str, public_key_pem: String, ttl: u32) -> SmartClient {
    SmartClient {
        client_id: id.to_owned(),
        public_key_pem,
        kid: None,
        access_token_ttl_s: ttl,
    }
}

/// The peers are slow to start: one set for every scenario, run in turn. Each scenario
/// uses a client of its own, so the server's per-client counts are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_backend_services_against_real_peers() {
    let keys = Keys::new();
    let clients = vec![
        client("passerelle-rsa", keys.public_pem("rsa"), 300),
        SmartClient {
            kid: Some("ec-1".to_owned()),
            ..client("passerelle-ec", keys.public_pem("ec384"), 300)
        },
        client("passerelle-short", keys.public_pem("rsa"), 3),
        client("passerelle-revoked", keys.public_pem("ec384"), 300),
        client("passerelle-wrong-key", keys.public_pem("rsa"), 300),
    ];
    let auth = tokio::task::spawn_blocking(move || SmartAuthServer::start(&clients))
        .await
        .unwrap();
    let introspection = auth.introspection_url();
    let fhir = tokio::task::spawn_blocking(move || FhirServer::start_behind(&introspection))
        .await
        .unwrap();
    let peers = Peers { keys, auth, fhir };

    the_fhir_server_refuses_requests_without_a_token(&peers).await;
    rs384_delivers_and_reuses_one_token(&peers).await;
    es384_concurrent_deliveries_share_one_token_request(&peers).await;
    an_expired_token_is_replaced_before_the_server_refuses_it(&peers).await;
    a_revoked_token_is_refetched_once_and_the_post_retried(&peers).await;
    a_second_401_is_not_retried_again(&peers).await;
    a_wrong_key_is_a_permanent_auth_failure_without_secrets(&peers).await;
    an_unknown_client_is_refused(&peers).await;
}

async fn the_fhir_server_refuses_requests_without_a_token(peers: &Peers) {
    let settings: toml::Table =
        toml::from_str(&format!("url = {:?}", peers.fhir.base_url())).unwrap();
    let anonymous = Destination::from_settings("fhir", &settings, peers.keys.dir()).unwrap();
    let before = peers.fhir.unauthorized_count();
    let report = anonymous.deliver(&item(&bundle("adt_a04_v28.hl7"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.status, Some(401));
    assert_eq!(peers.fhir.unauthorized_count(), before + 1);
}

async fn rs384_delivers_and_reuses_one_token(peers: &Peers) {
    let dest = peers.destination(&peers.fhir.base_url(), "passerelle-rsa", "rsa.pem", "");
    let bundle = bundle("adt_a01_admit.hl7");
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(report.status, Some(200));
    let stats = peers.auth.stats("passerelle-rsa");
    assert_eq!((stats.requests, stats.issued), (1, 1), "{stats:?}");
    // The default scope was asked for and granted.
    assert_eq!(stats.scope, "system/*.write");

    // The bundle is on the server (read with a token of the resource server's own).
    let patient = patient_search(peers, &bundle).await;
    assert_eq!(patient["total"], 1, "{patient}");

    // Four more deliveries: the cached token serves them all.
    for _ in 0..4 {
        let report = dest.deliver(&item(&bundle)).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
    assert_eq!(peers.requests("passerelle-rsa"), 1);
}

async fn es384_concurrent_deliveries_share_one_token_request(peers: &Peers) {
    // A configured scope, an explicit algorithm and a kid.
    let dest = Arc::new(peers.destination(
        &peers.fhir.base_url(),
        "passerelle-ec",
        "ec384.pem",
        ", algorithm = \"ES384\", scope = \"system/Bundle.write\", kid = \"ec-1\"",
    ));
    let bundle = Arc::new(bundle("adt_a04_v28.hl7"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (dest, bundle) = (Arc::clone(&dest), Arc::clone(&bundle));
        tasks.spawn(async move { dest.deliver(&item(&bundle)).await });
    }
    let reports: Vec<AttemptReport> = tasks.join_all().await;
    for report in &reports {
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
    let stats = peers.auth.stats("passerelle-ec");
    assert_eq!((stats.requests, stats.issued), (1, 1), "{stats:?}");
    assert_eq!(stats.scope, "system/Bundle.write");
}

async fn an_expired_token_is_replaced_before_the_server_refuses_it(peers: &Peers) {
    // Tokens of this client live 3 s.
    let dest = peers.destination(&peers.fhir.base_url(), "passerelle-short", "rsa.pem", "");
    let bundle = bundle("adt_a04_v28.hl7");
    let refused_before = peers.fhir.unauthorized_count();
    for _ in 0..2 {
        let report = dest.deliver(&item(&bundle)).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
    assert_eq!(peers.requests("passerelle-short"), 1);
    // Let the token expire: time passing is what is under test, no event marks it.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(peers.requests("passerelle-short"), 2);
    // Renewed ahead of time: the FHIR server never saw the expired token.
    assert_eq!(peers.fhir.unauthorized_count(), refused_before);
}

async fn a_revoked_token_is_refetched_once_and_the_post_retried(peers: &Peers) {
    let dest = peers.destination(
        &peers.fhir.base_url(),
        "passerelle-revoked",
        "ec384.pem",
        "",
    );
    let bundle = bundle("adt_a01_admit.hl7");
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(peers.requests("passerelle-revoked"), 1);

    // The authorization server revokes it; the cached token is now refused.
    assert_eq!(peers.auth.revoke_tokens("passerelle-revoked"), 1);
    let refused_before = peers.fhir.unauthorized_count();
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(report.status, Some(200));
    assert_eq!(peers.fhir.unauthorized_count(), refused_before + 1);
    assert_eq!(peers.requests("passerelle-revoked"), 2);

    // The new token is cached in turn.
    let report = dest.deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    assert_eq!(peers.requests("passerelle-revoked"), 2);
}

async fn a_second_401_is_not_retried_again(peers: &Peers) {
    // Behind the token check, this base answers its first two requests with 401.
    let dest = peers.destination(
        &peers.fhir.failing_base_url(401, 2),
        "passerelle-revoked",
        "ec384.pem",
        "",
    );
    let before = peers.requests("passerelle-revoked");
    let report = dest.deliver(&item(&bundle("adt_a04_v28.hl7"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "http_4xx");
    assert_eq!(report.status, Some(401));
    // One token for the first POST, one fresh one for the single retry.
    assert_eq!(peers.requests("passerelle-revoked"), before + 2);
}

async fn a_wrong_key_is_a_permanent_auth_failure_without_secrets(peers: &Peers) {
    // The server knows this client by the public half of rsa.pem.
    let dest = Arc::new(peers.destination(
        &peers.fhir.base_url(),
        "passerelle-wrong-key",
        "rsa-other.pem",
        "",
    ));
    let refused_before = peers.fhir.unauthorized_count();
    // Four deliveries at once share the one refused token request (those that come
    // after the refusal, within seconds, are answered by it too).
    let bundle = Arc::new(bundle("adt_a04_v28.hl7"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (dest, bundle) = (Arc::clone(&dest), Arc::clone(&bundle));
        tasks.spawn(async move { dest.deliver(&item(&bundle)).await });
    }
    let reports: Vec<AttemptReport> = tasks.join_all().await;
    assert!(reports.iter().all(|r| r == &reports[0]), "{reports:?}");
    let report = &reports[0];
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "auth");
    assert_eq!(report.status, None);
    assert!(
        report
            .detail
            .starts_with("token endpoint: HTTP 401 invalid_client"),
        "{report:?}"
    );
    // No JWT (every JWS starts with base64url of `{"`), no key material.
    assert!(!report.detail.contains("eyJ"), "{report:?}");
    assert!(!report.detail.contains("PRIVATE KEY"), "{report:?}");
    let debug = format!("{dest:?}");
    assert!(
        !debug.contains("eyJ") && !debug.contains("PRIVATE"),
        "{debug}"
    );
    let stats = peers.auth.stats("passerelle-wrong-key");
    assert_eq!((stats.requests, stats.issued), (1, 0), "{stats:?}");
    assert_eq!(stats.error, "invalid_client");
    // A fifth delivery, after the refusal: answered from it, no new request.
    let fifth = dest.deliver(&item(&bundle)).await;
    assert_eq!(&fifth, report);
    assert_eq!(peers.auth.stats("passerelle-wrong-key").requests, 1);
    // Nothing reached the FHIR server.
    assert_eq!(peers.fhir.unauthorized_count(), refused_before);
}

async fn an_unknown_client_is_refused(peers: &Peers) {
    let dest = peers.destination(&peers.fhir.base_url(), "nobody", "rsa.pem", "");
    let report = dest.deliver(&item(&bundle("adt_a04_v28.hl7"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "auth");
    assert!(report.detail.contains("invalid_client"), "{report:?}");
}

/// Searches the FHIR server for the bundle's Patient, with a token the resource server's
/// own client gets from the authorization server (client_secret_basic).
async fn patient_search(peers: &Peers, bundle: &str) -> Value {
    let client = reqwest::Client::new();
    let answer: Value = serde_json::from_str(
        &client
            .post(peers.auth.token_url())
            .basic_auth(INTROSPECTOR_ID, Some(INTROSPECTOR_SECRET))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=system%2F*.read")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let token = answer["access_token"].as_str().expect("a reader token");
    let v: Value = serde_json::from_str(bundle).unwrap();
    let patient = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Patient")
        .unwrap();
    let id = &patient["identifier"][0];
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "identifier",
            &format!(
                "{}|{}",
                id["system"].as_str().unwrap(),
                id["value"].as_str().unwrap()
            ),
        )
        .finish();
    let response = client
        .get(format!("{}/Patient?{query}", peers.fhir.base_url()))
        .bearer_auth(token)
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_token_endpoint_is_transient() {
    let keys = Keys::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let settings: toml::Table = toml::from_str(&format!(
        "url = \"http://127.0.0.1:9/fhir/R4\"\nauth = {{ type = \"smart_backend\", token_url = \"http://127.0.0.1:{port}/token\", client_id = \"c\", private_key_file = \"rsa.pem\" }}"
    ))
    .unwrap();
    let dest = Destination::from_settings("fhir", &settings, keys.dir()).unwrap();
    let report = dest.deliver(&item(r#"{"resourceType":"Bundle"}"#)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "auth");
    assert!(report.detail.starts_with("token endpoint: "), "{report:?}");
}

/// The token endpoint behind a private CA of its own, the FHIR server elsewhere: `auth.ca`
/// decides which roots check the token endpoint, and without it the destination's `ca`
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_checked_against_its_own_ca() {
    let keys = Keys::new();
    let pki = common::pki();
    let clients = vec![client("passerelle-tls", keys.public_pem("rsa"), 300)];
    let (cert, key) = (pki.file("server.pem"), pki.file("server.key"));
    let auth =
        tokio::task::spawn_blocking(move || SmartAuthServer::start_tls(&clients, &cert, &key))
            .await
            .unwrap();
    assert!(auth.token_url().starts_with("https://"));
    let fhir = tokio::task::spawn_blocking(FhirServer::start)
        .await
        .unwrap();
    let ca = pki.file("ca.pem");
    let build = |destination_extra: &str, auth_extra: &str| {
        let settings: toml::Table = toml::from_str(&format!(
            "url = {:?}\ntimeout_s = 10\n{destination_extra}\nauth = {{ type = \"smart_backend\", token_url = {:?}, client_id = \"passerelle-tls\", private_key_file = \"rsa.pem\"{auth_extra} }}",
            fhir.base_url(),
            auth.token_url()
        ))
        .unwrap();
        Destination::from_settings("fhir", &settings, keys.dir()).unwrap()
    };
    let bundle = bundle("adt_a01_admit.hl7");

    // The system's roots do not know the private CA: no token, a transient auth failure.
    let report = build("", "").deliver(&item(&bundle)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "auth", "{report:?}");

    // Its own `ca`: a token, and the bundle delivered.
    let report = build("", &format!(", ca = {ca:?}"))
        .deliver(&item(&bundle))
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");

    // Without one, the destination's `ca` checks the token endpoint too.
    let report = build(&format!("ca = {ca:?}"), "")
        .deliver(&item(&bundle))
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");

    // `"system"` overrides the destination's `ca` for the token endpoint.
    let report = build(&format!("ca = {ca:?}"), ", ca = \"system\"")
        .deliver(&item(&bundle))
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "auth", "{report:?}");

    // A file that holds no certificate is refused when the destination is built.
    std::fs::write(keys.dir().join("empty.pem"), "").unwrap();
    let settings: toml::Table = toml::from_str(&format!(
        "url = {:?}\nauth = {{ type = \"smart_backend\", token_url = {:?}, client_id = \"x\", private_key_file = \"rsa.pem\", ca = \"empty.pem\" }}",
        fhir.base_url(),
        auth.token_url()
    ))
    .unwrap();
    let error = Destination::from_settings("fhir", &settings, keys.dir()).unwrap_err();
    assert!(error.to_string().contains("auth.ca"), "{error}");
}

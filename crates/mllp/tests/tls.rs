//! TLS and mutual TLS with certificates generated here (rcgen): accepted and refused
//! clients, the identity allow-list, plain TCP on a TLS port, TLS 1.2, and reloading.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use passerelle_mllp::{
    Client, ClientConfig, ClientError, ClientTlsConfig, Handler, ParseAckHandler, PeerInfo,
    RunningListener, ServerTls, ServerTlsConfig,
};
use passerelle_testkit::pki::Pki;
use rustls_pki_types::ServerName;

/// Answers from the parser and records the client certificate's common name.
#[derive(Default)]
struct Recording {
    names: Mutex<Vec<Option<String>>>,
}

impl Handler for Recording {
    async fn handle(&self, frame: Bytes, peer: &PeerInfo) -> Option<Bytes> {
        let cn = peer.tls.as_ref().and_then(|t| t.common_name.clone());
        self.names.lock().unwrap().push(cn);
        ParseAckHandler::default().handle(frame, peer).await
    }
}

struct Setup {
    pki: Pki,
    server: RunningListener,
    handler: Arc<Recording>,
}

async fn setup(name: &str, mutual: bool, allowed: &[&str]) -> Setup {
    let pki = Pki::new(name);
    let (cert, key) = pki.issue("server", "passerelle", &["localhost"], false);
    let tls = ServerTls::load(ServerTlsConfig {
        cert,
        key,
        client_ca: mutual.then(|| pki.ca()),
        allowed_peers: allowed.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap();
    let handler = Arc::new(Recording::default());
    let server = start(config(), Some(tls), handler.clone()).await;
    Setup {
        pki,
        server,
        handler,
    }
}

fn client(
    setup: &Setup,
    ca: Option<std::path::PathBuf>,
    cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Client {
    let mut cfg = ClientConfig::new(format!("localhost:{}", setup.server.local_addr().port()));
    cfg.connect_attempts = 1;
    cfg.ack_timeout = WAIT;
    cfg.tls = Some(ClientTlsConfig {
        ca: Some(ca.unwrap_or_else(|| setup.pki.ca())),
        cert: cert.as_ref().map(|c| c.0.clone()),
        key: cert.map(|c| c.1),
        server_name: None,
    });
    Client::new(cfg).unwrap()
}

#[tokio::test]
async fn tls_without_client_certificates() {
    let s = setup("plain-tls", false, &[]).await;
    let mut c = client(&s, None, None);
    for i in 0..3 {
        let ack = c.send(&message(&format!("T{i}"))).await.unwrap();
        assert_eq!(ack.code, "AA");
    }
    assert_eq!(c.connections(), 1);
    c.close().await;
    let stats = s.server.shutdown().await;
    assert_eq!(stats.acks, 3);
    assert_eq!(*s.handler.names.lock().unwrap(), vec![None, None, None]);
}

#[tokio::test]
async fn mutual_tls_accepts_a_good_client_and_refuses_others() {
    let s = setup("mtls", true, &[]).await;
    let good = s.pki.issue("good", "lab-sender", &["lab.example"], true);
    let mut c = client(&s, None, Some(good));
    assert_eq!(c.send(&message("M1")).await.unwrap().code, "AA");
    c.close().await;
    assert_eq!(
        *s.handler.names.lock().unwrap(),
        vec![Some("lab-sender".to_owned())]
    );

    // A certificate from another CA.
    let stranger_pki = Pki::new("mtls-stranger");
    let stranger = stranger_pki.issue("stranger", "lab-sender", &["lab.example"], true);
    let mut c = client(&s, None, Some(stranger));
    let err = c.send(&message("M2")).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Handshake { .. } | ClientError::Closed { .. } | ClientError::Io(_)
        ),
        "{err}"
    );

    // No certificate at all.
    let mut c = client(&s, None, None);
    assert!(c.send(&message("M3")).await.is_err());

    let stats = s.server.shutdown().await;
    assert_eq!(stats.frames, 1);
    assert_eq!(stats.tls_failed, 2);
}

#[tokio::test]
async fn identity_allow_list() {
    let s = setup("allow", true, &["CN=lab-sender", "DNS:ris.example"]).await;
    let lab = s.pki.issue("lab", "lab-sender", &["lab.example"], true);
    let ris = s.pki.issue("ris", "radiology", &["ris.example"], true);
    let other = s
        .pki
        .issue("other", "pharmacy", &["pharmacy.example"], true);

    let mut c = client(&s, None, Some(lab));
    assert_eq!(c.send(&message("L1")).await.unwrap().control_id, "L1");
    c.close().await;
    let mut c = client(&s, None, Some(ris));
    assert_eq!(c.send(&message("R1")).await.unwrap().control_id, "R1");
    c.close().await;
    let mut c = client(&s, None, Some(other));
    let err = c.send(&message("P1")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Closed { .. } | ClientError::Io(_)),
        "{err}"
    );

    let stats = s.server.shutdown().await;
    assert_eq!(stats.refused_identity, 1);
    assert_eq!(stats.frames, 2);
    assert_eq!(
        *s.handler.names.lock().unwrap(),
        vec![Some("lab-sender".to_owned()), Some("radiology".to_owned())]
    );
}

#[tokio::test]
async fn plain_tcp_to_a_tls_port_fails_cleanly() {
    let s = setup("plain-to-tls", false, &[]).await;
    let mut raw = Raw::connect(s.server.local_addr()).await;
    let _ = tokio::io::AsyncWriteExt::write_all(
        &mut raw.stream,
        &passerelle_mllp::codec::frame(&message("X")),
    )
    .await;
    // Whatever comes back (a TLS alert at most) is not an MLLP frame, and the server closes.
    assert!(raw.read_ack().await.is_none());
    // The listener is unaffected.
    let mut c = client(&s, None, None);
    assert_eq!(c.send(&message("Y")).await.unwrap().code, "AA");
    c.close().await;
    let stats = s.server.shutdown().await;
    assert_eq!(stats.tls_failed, 1);
    assert_eq!(stats.frames, 1);
}

#[tokio::test]
async fn tls_client_to_a_plain_port_fails_cleanly() {
    let server = start_parser(config()).await;
    let pki = Pki::new("tls-to-plain");
    let mut cfg = ClientConfig::new(format!("localhost:{}", server.local_addr().port()));
    cfg.connect_attempts = 1;
    cfg.connect_timeout = std::time::Duration::from_secs(1);
    cfg.tls = Some(ClientTlsConfig {
        ca: Some(pki.ca()),
        ..ClientTlsConfig::default()
    });
    let mut c = Client::new(cfg).unwrap();
    let err = c.send(&message("X")).await.unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    drop(c);
    // The listener counts the client's hello as data outside a frame.
    let stats = server.shutdown().await;
    assert_eq!(stats.unframed_data, 1, "{stats:?}");
    // Nothing in the handshake's bytes is taken for a message, even where they hold the
    // framing bytes by chance: the connection is closed.
    assert_eq!((stats.frames, stats.acks), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn tls_1_2_clients_are_served() {
    let s = setup("tls12", false, &[]).await;
    let roots = passerelle_mllp::tls::load_roots(&s.pki.ca()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(passerelle_mllp::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = connect(s.server.local_addr()).await;
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let mut raw = Raw::new(stream);
    raw.send(&message("V12")).await;
    assert_eq!(raw.read_ack().await.unwrap().control_id, "V12");
    drop(raw);
    s.server.shutdown().await;
}

#[tokio::test]
async fn certificates_reload_without_restart() {
    let s = setup("reload", false, &[]).await;
    let tls = s.server.tls().unwrap();
    let mut old_trust = client(&s, None, None);
    assert_eq!(old_trust.send(&message("B1")).await.unwrap().code, "AA");
    old_trust.close().await;
    assert!(!tls.reload_if_changed().unwrap(), "nothing changed yet");

    // A broken file: reload fails, the old certificate stays in force.
    std::fs::write(&tls.config().cert, "not a certificate").unwrap();
    assert!(tls.reload().is_err());
    let mut c = client(&s, None, None);
    assert_eq!(c.send(&message("B2")).await.unwrap().code, "AA");
    c.close().await;

    // The operator installs a certificate from a new CA, in place.
    let new_pki = Pki::new("reload-new");
    let (cert, key) = new_pki.issue("server", "passerelle", &["localhost"], false);
    std::fs::copy(&cert, &tls.config().cert).unwrap();
    std::fs::copy(&key, &tls.config().key).unwrap();
    assert!(tls.reload_if_changed().unwrap());

    let mut old = client(&s, None, None);
    let err = old.send(&message("B3")).await.unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    let mut new = client(&s, Some(new_pki.ca()), None);
    assert_eq!(new.send(&message("B4")).await.unwrap().control_id, "B4");
    new.close().await;
    s.server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_completes_the_handshake_is_dropped() {
    let pki = Pki::new("handshake-timeout");
    let (cert, key) = pki.issue("server", "passerelle", &["localhost"], false);
    let tls = ServerTls::load(ServerTlsConfig {
        cert,
        key,
        client_ca: None,
        allowed_peers: Vec::new(),
    })
    .unwrap();
    let mut c = config();
    c.handshake_timeout = std::time::Duration::from_millis(300);
    let server = start(c, Some(tls), ParseAckHandler::default()).await;
    let mut silent = Raw::connect(server.local_addr()).await;
    let t = std::time::Instant::now();
    assert!(silent.closed().await);
    assert!(t.elapsed() >= std::time::Duration::from_millis(250));
    let stats = server.shutdown().await;
    assert_eq!(stats.tls_failed, 1);
}

#[tokio::test]
async fn certificates_changed_on_disk_are_picked_up_by_the_listener() {
    let pki = Pki::new("reload-poll");
    let (cert, key) = pki.issue("server", "passerelle", &["localhost"], false);
    let tls = ServerTls::load(ServerTlsConfig {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
        allowed_peers: Vec::new(),
    })
    .unwrap();
    let mut c = config();
    c.tls_reload_interval = Some(std::time::Duration::from_millis(50));
    let server = start(c, Some(tls), ParseAckHandler::default()).await;
    let addr = format!("localhost:{}", server.local_addr().port());
    let new_pki = Pki::new("reload-poll-new");
    let (new_cert, new_key) = new_pki.issue("server", "passerelle", &["localhost"], false);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    // Wait (bounded) for the listener to present the new certificate.
    let mut cfg = ClientConfig::new(addr);
    cfg.connect_attempts = 1;
    cfg.tls = Some(ClientTlsConfig {
        ca: Some(new_pki.ca()),
        ..ClientTlsConfig::default()
    });
    let deadline = std::time::Instant::now() + WAIT;
    let mut attempt = 0;
    let ack = loop {
        attempt += 1;
        let mut client = Client::new(cfg.clone()).unwrap();
        match client.send(&message(&format!("NEW{attempt}"))).await {
            Ok(ack) => break ack,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "never reloaded: {e}");
                tokio::task::yield_now().await;
            }
        }
    };
    assert_eq!(ack.code, "AA");
    server.shutdown().await;
}

//! The MLLP forward destination against real MLLP servers (installed by
//! passerelle-testkit, pinned): txHL7 under twistd, and python `hl7`'s asyncio server
//! scripted to answer AE, AR or nothing by control id (`peers/hl7_nak_server.py`); and,
//! for mutual TLS, passerelle's own listener.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use passerelle_delivery::{AttemptOutcome, Destination, Item};
use passerelle_mllp::{Listener, ListenerConfig, ParseAckHandler, ServerTls, ServerTlsConfig};
use passerelle_testkit::mllp::{PeerProcess, port_in, script, venv_bin};

const START: Duration = Duration::from_secs(60);

fn message(id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5\rEVN|A01|20240101120000\rPID|1||123^^^HOSP^PI||DOE^JANE\r"
    )
    .into_bytes()
}

fn destination(port: u16, extra: &str) -> Destination {
    let settings: toml::Table = toml::from_str(&format!(
        "type = \"mllp\"\npeer = \"127.0.0.1:{port}\"\n{extra}"
    ))
    .unwrap();
    Destination::from_settings("mllp", &settings, Path::new("/")).unwrap()
}

fn item(raw: &[u8]) -> Item<'_> {
    Item {
        message_id: 1,
        bundle: None,
        raw,
    }
}

fn start_twistd() -> (PeerProcess, u16) {
    let twistd = venv_bin("twistd");
    let mut peer = PeerProcess::spawn(
        "txHL7 (twistd mllp)",
        Command::new(twistd).args([
            "-n",
            "--pidfile=",
            "mllp",
            "-e",
            "tcp:0:interface=127.0.0.1",
        ]),
    );
    let port = port_in(&peer.wait_for_line("MLLPFactory starting on", START));
    (peer, port)
}

fn start_nak_server() -> (PeerProcess, u16) {
    let python = passerelle_testkit::python();
    let mut peer = PeerProcess::spawn(
        "hl7_nak_server.py",
        Command::new(python).arg(script("hl7_nak_server.py")),
    );
    let port = port_in(&peer.wait_for_line("listening on", START));
    (peer, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txhl7_accepts_forwarded_messages_from_spawned_tasks() {
    let (_peer, port) = tokio::task::spawn_blocking(start_twistd).await.unwrap();
    let dest = Arc::new(destination(port, "ack_timeout_s = 20"));
    for i in 0..5 {
        let report = dest.deliver(&item(&message(&format!("TX{i}")))).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
    // Attempts from spawned tasks queue on the one connection.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let dest = dest.clone();
        tasks.push(tokio::spawn(async move {
            let raw = message(&format!("SPAWN{i}"));
            dest.deliver(&item(&raw)).await
        }));
    }
    for t in tasks {
        let report = t.await.unwrap();
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naks_are_permanent_and_silence_is_a_transient_timeout() {
    let (_peer, port) = tokio::task::spawn_blocking(start_nak_server).await.unwrap();
    let dest = destination(port, "ack_timeout_s = 1\nconnect_timeout_s = 5");

    let report = dest.deliver(&item(&message("OK1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");

    let report = dest.deliver(&item(&message("AE1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "nak_ae");
    assert!(report.detail.starts_with("AE for AE1"), "{report:?}");
    assert!(!report.detail.contains("DOE"), "never the message");

    let report = dest.deliver(&item(&message("AR1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "nak_ar");

    let report = dest.deliver(&item(&message("SLOW1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "timeout");

    // The timed-out connection was dropped; the next attempt reconnects.
    let report = dest.deliver(&item(&message("OK2"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
}

/// A receiver whose AE means a passing trouble of its own: with `application_errors =
/// "retry"` an AE is retried (transient), while an AR is still a refusal for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_errors_can_be_retried_while_rejects_stay_permanent() {
    let (_peer, port) = tokio::task::spawn_blocking(start_nak_server).await.unwrap();
    let dest = destination(port, "application_errors = \"retry\"");

    let report = dest.deliver(&item(&message("AE2"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "nak_ae");
    assert!(report.detail.starts_with("AE for AE2"), "{report:?}");

    let report = dest.deliver(&item(&message("AR2"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "nak_ar");

    let report = dest.deliver(&item(&message("OK3"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");

    let settings: toml::Table =
        toml::from_str("type = \"mllp\"\npeer = \"127.0.0.1:1\"\napplication_errors = \"later\"")
            .unwrap();
    let refused = Destination::from_settings("mllp", &settings, Path::new("/"))
        .expect_err("an unknown value is refused");
    assert!(
        refused.to_string().contains("application_errors"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_transient_connect() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dest = destination(port, "connect_timeout_s = 2");
    let report = dest.deliver(&item(&message("REFUSED1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "connect");
    assert!(report.detail.contains(&port.to_string()), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_matched_or_framed_is_permanent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dest = destination(port, "");
    let report = dest.deliver(&item(b"not hl7 at all")).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "no_control_id");
    let mut framed = message("FB1");
    framed.push(0x1c);
    let report = dest.deliver(&item(&framed)).await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent, "{report:?}");
    assert_eq!(report.error_class, "framing_byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_forward_to_a_tls_listener() {
    let pki = common::pki();
    let tls = ServerTls::load(ServerTlsConfig {
        cert: pki.file("server.pem"),
        key: pki.file("server.key"),
        client_ca: Some(pki.file("ca.pem")),
        allowed_peers: Vec::new(),
    })
    .unwrap();
    let listener = Listener::bind(
        ListenerConfig::new("127.0.0.1:0".parse().unwrap()),
        Some(tls),
    )
    .await
    .unwrap()
    .spawn(ParseAckHandler::default());
    let port = listener.local_addr().port();
    let build = |tls: &str| {
        let settings: toml::Table = toml::from_str(&format!(
            "peer = \"127.0.0.1:{port}\"\nack_timeout_s = 10\nconnect_timeout_s = 5\ntls = {tls}"
        ))
        .unwrap();
        // Relative file names resolve against the base dir.
        Destination::from_settings("mllp", &settings, pki.dir()).unwrap()
    };

    let good = build(
        "{ ca = \"ca.pem\", client_cert = \"client.pem\", client_key = \"client.key\", server_name = \"localhost\" }",
    );
    for i in 0..3 {
        let report = good.deliver(&item(&message(&format!("TLS{i}")))).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }

    // No client certificate: the listener refuses; transient.
    let anonymous = build("{ ca = \"ca.pem\" }");
    let report = anonymous.deliver(&item(&message("ANON1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");

    // The system's roots do not trust the private CA: a transient TLS failure.
    let untrusted = build("{ client_cert = \"client.pem\", client_key = \"client.key\" }");
    let report = untrusted.deliver(&item(&message("UNTRUSTED1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "tls", "{report:?}");

    drop((good, anonymous, untrusted));
    let stats = listener.shutdown().await;
    assert_eq!(stats.acks, 3);
}

/// An ISO-8859-15 (Latin-9) message, as French feeds send them: `é` and `œ` are one byte.
fn latin9_message(id: &str) -> Vec<u8> {
    let mut raw = format!(
        "MSH|^~\\&|DPI|CHU|RCV|FAC|20240101120000||ADT^A01^ADT_A01|{id}|P|2.5|||||FRA|8859/15\rPID|1||123^^^CHU^PI||"
    )
    .into_bytes();
    raw.extend_from_slice(b"C\xC9LESTE^L\xC9A^^^^^L\rNTE|1||c\xBDur\r"); // CÉLESTE^LÉA, cœur
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin9_is_re_encoded_to_utf8_for_a_receiver_that_only_reads_utf8() {
    let (_peer, port) = tokio::task::spawn_blocking(start_twistd).await.unwrap();
    // txHL7 decodes every frame as UTF-8 and drops the connection on anything else.
    let raw = destination(port, "ack_timeout_s = 5");
    let report = raw.deliver(&item(&latin9_message("RAW1"))).await;
    assert_eq!(
        report.outcome,
        AttemptOutcome::Transient,
        "the raw Latin-9 bytes are refused: {report:?}"
    );
    let utf8 = destination(port, "ack_timeout_s = 20\ncharset = \"UNICODE UTF-8\"");
    let report = utf8.deliver(&item(&latin9_message("UTF1"))).await;
    assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
}

#[test]
fn re_encoding_keeps_the_text_and_says_so_in_msh_18() {
    use passerelle_hl7::{Charset, Message};
    let source = latin9_message("X1");
    let bytes = passerelle_delivery::mllp::reencode(&source, Charset::Utf8).unwrap();
    let (before, after) = (
        Message::parse(&source).unwrap(),
        Message::parse(&bytes).unwrap(),
    );
    assert_eq!(after.charset(), Charset::Utf8);
    assert_eq!(
        after.text("MSH-18").unwrap().as_deref(),
        Some("UNICODE UTF-8")
    );
    for path in ["PID-5.1", "PID-5.2", "NTE-3", "MSH-10"] {
        assert_eq!(
            after.text(path).unwrap(),
            before.text(path).unwrap(),
            "{path}"
        );
    }
    assert_eq!(after.text("PID-5.1").unwrap().as_deref(), Some("CÉLESTE"));
    assert_eq!(after.text("NTE-3").unwrap().as_deref(), Some("cœur"));
    // Back to Latin-1, `œ` has no byte: a permanent error naming the place, not the text.
    let err = passerelle_delivery::mllp::reencode(&source, Charset::Latin1).unwrap_err();
    assert!(err.contains("segment") && !err.contains("cœur"), "{err}");
}

#[test]
fn an_unknown_charset_setting_is_refused() {
    let settings: toml::Table =
        toml::from_str("type = \"mllp\"\npeer = \"127.0.0.1:1\"\ncharset = \"EBCDIC\"").unwrap();
    let err = Destination::from_settings("mllp", &settings, Path::new("/")).unwrap_err();
    assert!(err.to_string().contains("charset"), "{err}");
}

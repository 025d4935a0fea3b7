//! Interop with real third-party MLLP peers, installed by passerelle-testkit (pinned):
//!
//! - clients sending to passerelle's listener: python `hl7`'s `mllp_send` and
//!   `@medplum/hl7`'s `Hl7Client`;
//! - passerelle's client sending to servers: `txHL7` under `twistd` (persistent
//!   connections, pipelining), python `hl7`'s asyncio server, and `hl7apy`'s server, which
//!   closes the connection after each reply (the reconnect path).
//!
//! Each peer runs on a loopback port chosen by the system, is awaited by a line it
//! prints, and is killed at the end of its test.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use passerelle_mllp::{Client, ClientConfig};
use passerelle_testkit::mllp::{PeerProcess, node_dir, port_in, script, venv_bin};
use passerelle_testkit::{fixture_files, python};

const START: Duration = Duration::from_secs(60);

/// The control ids of the messages in the well-formed fixtures, and their bytes, split
/// and with CR terminators, as a sender would send them.
fn fixture_messages() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for file in fixture_files("hl7") {
        let bytes = std::fs::read(&file).unwrap();
        let split = passerelle_hl7::batch::split(&bytes).unwrap();
        for m in split.messages {
            let mut message = Vec::new();
            for line in m.bytes.split(|b| *b == b'\r' || *b == b'\n') {
                if !line.is_empty() {
                    message.extend_from_slice(line);
                    message.push(b'\r');
                }
            }
            let id = passerelle_hl7::HeaderSummary::salvage(&message)
                .unwrap()
                .control_id;
            out.push((id, message));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_hl7_mllp_send_to_the_listener() {
    let mllp_send = tokio::task::spawn_blocking(|| venv_bin("mllp_send"))
        .await
        .unwrap();
    let server = start_parser(config()).await;
    let port = server.local_addr().port();
    // Several messages in one unframed file with CRLF terminators: mllp_send --loose
    // splits them on MSH and frames each.
    let dir = std::env::temp_dir().join(format!("passerelle-mllp-send-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("three.hl7");
    let mut text = String::new();
    for id in ["PY1", "PY2", "PY3"] {
        text.push_str(
            &String::from_utf8(message(id))
                .unwrap()
                .replace('\r', "\r\n"),
        );
    }
    std::fs::write(&file, text).unwrap();
    let crlf_fixture = passerelle_testkit::workspace_root().join("fixtures/hl7/crlf_oru_r01.hl7");
    let mut outputs = Vec::new();
    for f in [file.clone(), crlf_fixture] {
        let mllp_send = mllp_send.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(mllp_send)
                .args(["--loose", "-p", &port.to_string(), "-f"])
                .arg(f)
                .arg("127.0.0.1")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    for id in ["PY1", "PY2", "PY3"] {
        assert!(
            outputs[0].contains(&format!("MSA|AA|{id}\r")),
            "{:?}",
            outputs[0]
        );
    }
    assert!(
        outputs[1].contains("MSA|AA|RBGLAB20240328-001177"),
        "{:?}",
        outputs[1]
    );
    let stats = server.shutdown().await;
    assert_eq!(stats.frames, 4);
    assert_eq!(stats.acks, 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medplum_hl7_client_to_the_listener() {
    let dir = tokio::task::spawn_blocking(node_dir).await.unwrap();
    let server = start_parser(config()).await;
    let port = server.local_addr().port();
    let (ok, lines) = tokio::task::spawn_blocking(move || {
        let mut peer = PeerProcess::spawn(
            "medplum Hl7Client",
            Command::new("node")
                .arg(dir.join("medplum_send.mjs"))
                .args(["127.0.0.1", &port.to_string(), "10"])
                .current_dir(&dir),
        );
        peer.wait_exit(START)
    })
    .await
    .unwrap();
    assert!(ok, "{}", lines.join("\n"));
    let acks: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(acks.len(), 10, "{lines:?}");
    for (i, ack) in acks.iter().enumerate() {
        let n = i + 1;
        assert_eq!(ack["sent"], format!("MED{n}"));
        assert_eq!(ack["ack"], format!("MED{n}"), "MSA-2 names the message");
        let want = if n % 5 == 0 { "AR" } else { "AA" };
        assert_eq!(ack["code"], want, "{ack}");
    }
    let stats = server.shutdown().await;
    assert_eq!(stats.accepted, 1, "one persistent connection");
    assert_eq!(stats.acks, 10);
}

fn client(port: u16) -> Client {
    let mut cfg = ClientConfig::new(format!("127.0.0.1:{port}"));
    cfg.ack_timeout = WAIT;
    Client::new(cfg).unwrap()
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

fn start_script(name: &str) -> (PeerProcess, u16) {
    let python = python();
    let mut peer = PeerProcess::spawn(name, Command::new(python).arg(script(name)));
    let port = port_in(&peer.wait_for_line("listening on", START));
    (peer, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_to_txhl7_on_one_connection() {
    let (_peer, port) = tokio::task::spawn_blocking(start_twistd).await.unwrap();
    let mut c = client(port);
    // txHL7 decodes frames as UTF-8 and drops the connection on anything else (Latin-1
    // fixtures, a BOM); send it the rest.
    let (utf8, other): (Vec<_>, Vec<_>) = fixture_messages()
        .into_iter()
        .partition(|(_, m)| std::str::from_utf8(m).is_ok() && !m.starts_with(b"\xEF\xBB\xBF"));
    assert!(utf8.len() > 40);
    for (id, bytes) in &utf8 {
        let ack = c.send(bytes).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&ack.control_id, id);
        assert!(ack.is_accept(), "{id}: {ack:?}");
    }
    assert_eq!(c.connections(), 1, "txHL7 keeps the connection open");
    // When txHL7 drops the connection instead of answering, the client says so, and the
    // next message goes out on a new connection.
    let (id, latin1) = other
        .iter()
        .find(|(_, m)| std::str::from_utf8(m).is_err())
        .unwrap();
    let err = c.send(latin1).await.unwrap_err();
    assert!(
        matches!(err, passerelle_mllp::ClientError::Closed { .. }),
        "{id}: {err}"
    );
    // (The client sent it twice: a reused connection that closes before any answer may
    // have been closed by the server while idle, so the frame is sent once more on a new
    // connection, which txHL7 drops too.)
    assert_eq!(c.connections(), 2);
    let (id, bytes) = &utf8[0];
    assert_eq!(&c.send(bytes).await.unwrap().control_id, id);
    assert_eq!(c.connections(), 3);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_frames_to_reference_servers_come_back_in_order() {
    for server in ["txhl7", "hl7_asyncio_server.py"] {
        let (_peer, port) = tokio::task::spawn_blocking(move || {
            if server == "txhl7" {
                start_twistd()
            } else {
                start_script(server)
            }
        })
        .await
        .unwrap();
        let mut raw = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
        let mut burst = Vec::new();
        for i in 0..25 {
            burst.extend_from_slice(&passerelle_mllp::codec::frame(&message(&format!(
                "PIPE{i}"
            ))));
        }
        raw.write(&burst).await;
        for i in 0..25 {
            let ack = raw
                .read_ack()
                .await
                .unwrap_or_else(|| panic!("{server}: ACK {i}"));
            assert_eq!(ack.control_id, format!("PIPE{i}"), "{server}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_to_python_hl7_asyncio_server() {
    let (_peer, port) = tokio::task::spawn_blocking(|| start_script("hl7_asyncio_server.py"))
        .await
        .unwrap();
    let mut c = client(port);
    for (id, bytes) in fixture_messages().iter().take(20) {
        let ack = c.send(bytes).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&ack.control_id, id);
    }
    assert_eq!(c.connections(), 1);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_to_hl7apy_which_closes_after_each_reply() {
    let (_peer, port) = tokio::task::spawn_blocking(|| start_script("hl7apy_server.py"))
        .await
        .unwrap();
    let mut c = client(port);
    for i in 0..5 {
        let id = format!("APY{i}");
        let ack = c.send(&message(&id)).await.unwrap();
        assert_eq!(ack.control_id, id);
        assert_eq!(ack.code, "AA");
    }
    // Another message type: hl7apy has no handler for it and answers AR.
    let oru = String::from_utf8(message("APYORU"))
        .unwrap()
        .replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01");
    let ack = c.send(oru.as_bytes()).await.unwrap();
    assert_eq!(
        (ack.code.as_str(), ack.control_id.as_str()),
        ("AR", "APYORU")
    );
    assert_eq!(c.connections(), 6, "one connection per message");
    c.close().await;
}

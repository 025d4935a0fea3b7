//! `passerelle serve` and `passerelle send` as a user runs them: the real binary, on the
//! fixtures, over TCP and mutual TLS.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use passerelle_testkit::pki::Pki;
use passerelle_testkit::{fixture_files, workspace_root};

const WAIT: Duration = Duration::from_secs(30);

/// A running `passerelle serve`, killed on drop.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start(extra: &[&str]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_passerelle"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start passerelle serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(WAIT).expect("serve prints its address");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Serve { child, addr }
    }

    /// SIGTERM, then the exit status and stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = mpsc::channel();
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().unwrap(), // placeholder, reaped by Drop
        );
        std::thread::spawn(move || {
            let status = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let _ = tx.send((status, err));
        });
        let (status, err) = rx.recv_timeout(WAIT).expect("serve exits after SIGTERM");
        (status.unwrap(), err)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .arg("send")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run passerelle send")
}

fn paths(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|p| p.display().to_string()).collect()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn send_every_fixture_to_serve_and_get_acks() {
    let serve = Serve::start(&[]);
    let files = paths(&fixture_files("hl7"));
    let mut args: Vec<&str> = files.iter().map(String::as_str).collect();
    args.extend(["--to", &serve.addr, "--json"]);
    let out = send(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines = json_lines(&out);
    let (summary, messages) = lines.split_last().unwrap();
    assert!(messages.len() > files.len(), "batches add messages");
    for m in messages {
        let code = m["ack"].as_str().unwrap();
        assert!(code == "AA" || code == "CA", "{m}");
        assert!(!m["control_id"].as_str().unwrap().is_empty());
    }
    assert_eq!(summary["summary"]["sent"], messages.len());
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("shut down"), "{log}");
    assert!(log.contains("message accepted"));
}

#[test]
fn send_malformed_fixtures_reports_naks_and_fails() {
    let serve = Serve::start(&[]);
    let files: Vec<String> = ["missing_msh9.hl7", "segid_lowercase.hl7", "control_nul.hl7"]
        .iter()
        .map(|f| format!("fixtures/malformed/{f}"))
        .collect();
    let mut args: Vec<&str> = files.iter().map(String::as_str).collect();
    args.extend(["--to", &serve.addr]);
    let out = send(&args);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("sent 3 message(s)"), "{stdout}");
    assert!(
        stdout.contains("AR 1") && stdout.contains("AE 2"),
        "{stdout}"
    );
    assert!(
        stderr.contains("missing_msh9.hl7") && stderr.contains("MSH-9"),
        "{stderr}"
    );
    drop(serve);
}

#[test]
fn send_to_nobody_fails_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    let out = send(&[
        "fixtures/hl7/adt_a01_minimal.hl7",
        "fixtures/hl7/adt_a02_transfer.hl7",
        "--to",
        &to,
        "--connect-attempts",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["error"], "connect");
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["not_sent"], 1);
    assert_eq!(summary["sent"], 0);
}

#[test]
fn mutual_tls_between_serve_and_send() {
    let pki = Pki::new("cli");
    pki.issue("server", "passerelle", &["localhost"], false);
    pki.issue("lab", "lab-sender", &["localhost"], true);
    pki.issue("other", "other-sender", &["localhost"], true);
    let p = |f: &str| pki.file(f).display().to_string();
    let serve = Serve::start(&[
        "--tls-cert",
        &p("server.pem"),
        "--tls-key",
        &p("server.key"),
        "--client-ca",
        &p("ca.pem"),
        "--allow-client",
        "CN=lab-sender",
    ]);
    let to = serve.addr.replace("127.0.0.1", "localhost");
    let base = [
        "fixtures/hl7/adt_a01_minimal.hl7",
        "--to",
        &to,
        "--tls",
        "--ca",
    ];
    let ca_path = p("ca.pem");
    let ok = send(
        &[
            &base[..],
            &[&ca_path, "--cert", &p("lab.pem"), "--key", &p("lab.key")],
        ]
        .concat(),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("AA 1"));
    let refused = send(
        &[
            &base[..],
            &[
                &ca_path,
                "--cert",
                &p("other.pem"),
                "--key",
                &p("other.key"),
            ],
        ]
        .concat(),
    );
    assert_eq!(refused.status.code(), Some(1));
    let plain = send(&[
        "fixtures/hl7/adt_a01_minimal.hl7",
        "--to",
        &to,
        "--timeout",
        "5",
    ]);
    assert_eq!(plain.status.code(), Some(1));
    let (status, log) = serve.stop();
    assert!(status.success());
    assert!(log.contains("not in the allow-list"), "{log}");
    // The plain sender is told apart from a failed handshake.
    assert!(
        log.contains("TLS handshake failed: the peer did not start one (a sender without TLS?)"),
        "{log}"
    );
}

#[test]
fn serve_reloads_certificates_on_sighup() {
    let (old, new) = (Pki::new("old"), Pki::new("new"));
    let (cert, key) = old.issue("server", "passerelle", &["localhost"], false);
    let serve = Serve::start(&[
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
    ]);
    let to = serve.addr.replace("127.0.0.1", "localhost");
    let send_with = |pki: &Pki| {
        let ca = pki.ca().display().to_string();
        send(&[
            "fixtures/hl7/adt_a01_minimal.hl7",
            "--to",
            &to,
            "--tls",
            "--ca",
            &ca,
            "--connect-attempts",
            "1",
        ])
    };
    assert!(send_with(&old).status.success());
    let (new_cert, new_key) = new.issue("server", "passerelle", &["localhost"], false);
    std::fs::copy(new_cert, &cert).unwrap();
    std::fs::copy(new_key, &key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // The signal is handled asynchronously: retry (bounded) until the new certificate
    // is served.
    let deadline = std::time::Instant::now() + WAIT;
    while !send_with(&new).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
    }
    assert_eq!(send_with(&old).status.code(), Some(1));
    let (status, log) = serve.stop();
    assert!(status.success());
    assert!(log.contains("TLS certificates reloaded"), "{log}");
}

#[test]
fn send_of_unreadable_files_says_so_and_fails() {
    let missing = "fixtures/hl7/no_such_file.hl7";
    // Nothing to send: said plainly, and nobody is contacted (nothing listens there).
    let out = send(&[missing, "--to", "127.0.0.1:9", "--connect-attempts", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no_such_file.hl7: cannot read")
            && stderr.contains("nothing to send: 1 file(s) could not be read"),
        "{stderr}"
    );
    assert!(!stderr.contains("connect"), "{stderr}");
    assert!(out.stdout.is_empty(), "no empty summary");

    // Some sent, one unreadable: the summary counts it and the run fails.
    let serve = Serve::start(&[]);
    let out = send(&[
        "fixtures/hl7/adt_a01_minimal.hl7",
        missing,
        "--to",
        &serve.addr,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("sent 1 message(s) to {}: ", serve.addr))
            && stdout.contains("unreadable file(s) 1"),
        "{stdout}"
    );
    drop(serve);
}

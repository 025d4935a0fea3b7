//! Every command when its reader goes away early (`passerelle … | head -1`): no panic, no
//! backtrace, no error message; the work asked for is still done and decides the exit
//! status. (`messages` on a local store: see messages_cli.rs.)

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use passerelle_testkit::{fixture_files, workspace_root};

mod common;

const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

fn passerelle() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command.current_dir(workspace_root());
    command
}

/// The command exits with `code` and says nothing on stderr.
fn quiet_exit(command: &mut Command, code: i32) {
    let (status, stderr) = common::run_with_stdout_closed(command);
    assert_eq!(status, Some(code), "{command:?}: {stderr}");
    assert!(stderr.is_empty(), "{command:?} said: {stderr}");
}

#[test]
fn printing_commands_end_quietly() {
    quiet_exit(passerelle().arg("check"), 0);
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    quiet_exit(passerelle().args(["check", "--config"]).arg(&config), 0);
    let fixtures = fixture_files("hl7");
    quiet_exit(passerelle().arg("parse").args(&fixtures), 0);
    quiet_exit(passerelle().args(["parse", "--json"]).args(&fixtures), 0);
    let adt = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    quiet_exit(passerelle().arg("map").arg(&adt).arg(&adt), 0);
}

#[test]
fn failures_reported_before_the_reader_went_still_fail_the_command() {
    let bad = workspace_root().join("fixtures/malformed/control_nul.hl7");
    let good = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let (status, stderr) =
        common::run_with_stdout_closed(passerelle().arg("parse").arg(&bad).arg(&good));
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("control_nul.hl7"), "{stderr}");
    assert!(
        !stderr.contains("cannot write") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// `passerelle serve --config … | head -1` must not take the engine down with the pipe:
/// it keeps taking messages, and `send` with nobody reading still sends them all.
#[test]
fn the_engine_and_send_keep_working_when_nobody_reads_their_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let mllp_port = passerelle_testkit::free_port();
    let admin_port = common::fixed_admin(&config, "PASSERELLE_UNUSED_TOKEN");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[[listeners]]\nname = \"main\"\nbind = \"127.0.0.1:0\"",
        &format!("[[listeners]]\nname = \"main\"\nbind = \"127.0.0.1:{mllp_port}\""),
    );
    std::fs::write(&config, text).unwrap();

    let mut engine = Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("PASSERELLE_UNUSED_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(engine.stdout.take());
    // The engine logs on stderr; "engine started" comes after its address lines.
    let mut log = BufReader::new(engine.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = log.read_line(&mut line).unwrap();
        seen.push_str(&line);
        assert!(read > 0, "the engine ended before it started:\n{seen}");
        if line.contains("engine started") {
            break;
        }
    }
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut log, &mut rest);
        rest
    });

    let adt = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let (status, stderr) = common::run_with_stdout_closed(passerelle().args([
        "send",
        "--json",
        adt.to_str().unwrap(),
        adt.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{mllp_port}"),
    ]));
    assert_eq!(
        status,
        Some(0),
        "both messages accepted, the output unread: {stderr}"
    );
    let admin = format!("127.0.0.1:{admin_port}");
    let (code, list) = common::http_get(&admin, "/api/messages", None);
    assert_eq!(code, 200, "{list}");
    let doc: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(doc["items"].as_array().unwrap().len(), 2, "{list}");

    common::signal_pid(engine.id(), "-TERM");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(engine.wait());
    });
    let status = rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    let rest = drain.join().unwrap();
    assert!(
        status.success(),
        "the engine stops cleanly: {status}\n{seen}{rest}"
    );
    assert!(!rest.contains("panicked"), "{rest}");
}

/// `passerelle … 2>&1 | head -0`: problems that cannot be shown do not become a panic; the
/// exit status still says them.
#[test]
fn a_closed_stderr_changes_nothing_but_what_is_seen() {
    let missing = workspace_root().join("fixtures/hl7/no_such_file.hl7");
    for args in [
        vec!["parse".to_owned(), missing.display().to_string()],
        vec![
            "check".to_owned(),
            "--config".to_owned(),
            "no_such_config.toml".to_owned(),
        ],
        vec![
            "send".to_owned(),
            missing.display().to_string(),
            "--to".to_owned(),
            "127.0.0.1:9".to_owned(),
        ],
    ] {
        let mut child = passerelle()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {status}");
    }
}

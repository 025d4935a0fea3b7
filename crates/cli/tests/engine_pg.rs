//! The engine on the PostgreSQL store, as an operator runs it: `passerelle serve --config`
//! with `[store] backend = "postgres"` and the connection string from
//! `PASSERELLE__STORE__URL`, against a throwaway PostgreSQL server. A message sent over
//! MLLP is journaled, mapped and delivered as NDJSON; `passerelle messages --local` reads
//! the shared store while the engine runs; with the database gone, the sender gets an AE
//! at once (the message is not acknowledged, so the sender keeps it).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use passerelle_testkit::postgres::PgServer;
use passerelle_testkit::workspace_root;

mod common;

const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

fn passerelle(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn wait_for_line_in(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(path).map_or(0, |t| t.lines().count()) < 1 {
        assert!(
            Instant::now() < deadline,
            "{} was never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50)); // polls the observable output file
    }
}

/// `send --json`'s lines: one per message, then the summary.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[test]
fn serve_on_postgres_delivers_and_naks_when_the_database_is_gone() {
    let mut server = PgServer::start();
    let url = server.create_database("engine");
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let env = [
        ("PASSERELLE__STORE__BACKEND", "postgres"),
        ("PASSERELLE__STORE__URL", url.as_str()),
    ];
    let (engine, addr, _admin) = common::start_with_env(&config, &env);

    let adt = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let sent = passerelle(
        &["send", adt.to_str().unwrap(), "--to", &addr, "--json"],
        &[],
    );
    assert!(
        sent.status.success(),
        "accepted once committed: {}",
        String::from_utf8_lossy(&sent.stdout)
    );
    wait_for_line_in(&dir.path().join("out/Patient.ndjson"));

    // The store is shared: an operator reads it beside the running engine.
    let config_arg = config.to_str().unwrap();
    let list = passerelle(
        &[
            "messages", "--config", config_arg, "--local", "list", "--json",
        ],
        &env,
    );
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{doc}");
    assert_eq!(items[0]["state"], "mapped");
    let id = items[0]["id"].as_u64().unwrap().to_string();
    let delivered = || {
        let show = passerelle(
            &[
                "messages", "--config", config_arg, "--local", "show", &id, "--json",
            ],
            &env,
        );
        let doc: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        doc["delivery_details"][0]["state"] == "delivered"
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !delivered() {
        assert!(Instant::now() < deadline, "the delivery is never recorded");
        std::thread::sleep(Duration::from_millis(100)); // polls the recorded state
    }

    // The database goes away: the next message is answered AE, not acknowledged, and
    // not left hanging.
    server.stop();
    let started = Instant::now();
    let refused = passerelle(
        &[
            "send",
            adt.to_str().unwrap(),
            "--to",
            &addr,
            "--json",
            "--timeout",
            "30",
        ],
        &[],
    );
    assert!(!refused.status.success(), "a NAK makes send exit non-zero");
    let answer = &json_lines(&refused)[0];
    assert!(
        matches!(answer["ack"].as_str(), Some("AE" | "CE")),
        "answered AE (CE in enhanced mode): {answer}"
    );
    assert_eq!(
        answer["text"], "the message could not be stored; send it again later",
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered within the store's operation timeout: {:?}",
        started.elapsed()
    );
    common::stop(engine);
}

#[test]
fn check_reports_a_bad_backend_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[store]\n", "[store]\nbackend = \"oracle\"\n");
    std::fs::write(&config, text).unwrap();
    let mappings = workspace_root().join("mappings");
    let out = passerelle(
        &[
            "check",
            "--mappings",
            mappings.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        format!("{stdout}{stderr}").contains("passerelle.toml:2:11: store.backend"),
        "{stdout}{stderr}"
    );
}

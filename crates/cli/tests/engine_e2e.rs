//! The engine as an operator runs it: `passerelle serve --config` as a process, a real
//! third-party sender (python `hl7`'s `mllp_send`) and `passerelle send`, NDJSON output,
//! then `passerelle messages` on the stopped engine's store: list, show, replay.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use passerelle_testkit::mllp::venv_bin;
use passerelle_testkit::{python, workspace_root};

mod common;

const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

fn passerelle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn serve_send_list_show_replay() {
    python(); // the python hl7 peer, installed on first use
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "unrouted = \"error\"\n");
    let patients = dir.path().join("out/Patient.ndjson");
    let (engine, addr) = common::start(&config);
    let port = addr.rsplit(':').next().unwrap().to_owned();

    // A real third-party MLLP sender.
    let sent = Command::new(venv_bin("mllp_send"))
        .args(["--loose", "-p", &port, "-f"])
        .arg(workspace_root().join("fixtures/hl7/adt_a04_register_v23.hl7"))
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let ack = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success() && ack.contains("MSA|AA"),
        "mllp_send got: {ack}"
    );
    // And passerelle's own client, with a message no route takes.
    let oru = workspace_root().join("fixtures/hl7/oru_r01_v23.hl7");
    let out = passerelle(&["send", oru.to_str().unwrap(), "--to", &addr]);
    assert!(
        !out.status.success(),
        "an AE for the unrouted ORU makes send exit non-zero"
    );
    common::wait_for_lines(&patients, 1);
    common::stop(engine);

    let config_arg = config.to_str().unwrap();
    let list = passerelle(&[
        "messages", "--config", config_arg, "--local", "list", "--json",
    ]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    let states: Vec<&str> = items.iter().map(|i| i["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["mapped", "unrouted"]);
    let adt_id = items[0]["id"].as_u64().unwrap().to_string();
    let oru_id = items[1]["id"].as_u64().unwrap().to_string();

    let show = passerelle(&["messages", "--config", config_arg, "show", &adt_id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("\n  PID|")
            && text.contains("delivered")
            && text.contains("\"resourceType\": \"Bundle\""),
        "{text}"
    );

    let unrouted = passerelle(&[
        "messages", "--config", config_arg, "list", "--state", "unrouted",
    ]);
    assert!(String::from_utf8_lossy(&unrouted.stdout).contains(&oru_id));
    let dry = passerelle(&[
        "messages",
        "--config",
        config_arg,
        "replay",
        &oru_id,
        "--dry-run",
    ]);
    assert!(!dry.status.success(), "a replay that would change nothing");
    assert!(
        String::from_utf8_lossy(&dry.stderr).contains("not replayed: still unrouted (dry run)")
    );

    let replay = passerelle(&[
        "messages", "--config", config_arg, "replay", &adt_id, "--remap",
    ]);
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("1 deliveries queued again, re-mapped"),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let (engine, _) = common::start(&config);
    common::wait_for_lines(&patients, 2);
    common::stop(engine);
    let first_two: Vec<String> = std::fs::read_to_string(&patients)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        first_two[0], first_two[1],
        "the replayed (re-mapped) Patient is byte-identical: mapping is deterministic"
    );
}

/// Sends `bytes` with python `hl7`'s `mllp_send` (a real third-party sender); its answer.
fn mllp_send(port: &str, bytes: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let sent = Command::new(venv_bin("mllp_send"))
        .args(["--loose", "-p", port, "-f"])
        .arg(file.path())
        .arg("127.0.0.1")
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    String::from_utf8_lossy(&sent.stdout).into_owned()
}

#[test]
fn a_resend_is_acknowledged_kept_as_a_duplicate_and_replayable() {
    python();
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let patients = dir.path().join("out/Patient.ndjson");
    let (engine, addr) = common::start(&config);
    let port = addr.rsplit(':').next().unwrap().to_owned();

    let original =
        std::fs::read(workspace_root().join("fixtures/hl7/adt_a04_register_v23.hl7")).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    // The sender's resend after a lost ACK, stamped anew (MSH-7).
    let resend = text.replacen("20240402081533||ADT", "20240402081601||ADT", 1);
    assert_ne!(resend, text);
    // Another message under the same control id (a sender that reuses them).
    let reused = text.replacen("EVN|A04|20240402081533", "EVN|A04|20240402081534", 1);
    assert_ne!(reused, text);
    for bytes in [&original[..], resend.as_bytes(), reused.as_bytes()] {
        let ack = mllp_send(&port, bytes);
        assert!(ack.contains("MSA|AA"), "every copy is acknowledged: {ack}");
    }
    // The mapper takes messages in order: the third routed means the second was judged.
    common::wait_for_lines(&patients, 2);
    common::stop(engine);
    assert_eq!(
        common::lines_in(&patients),
        2,
        "the resend was not delivered"
    );

    let config_arg = config.to_str().unwrap();
    let list = passerelle(&[
        "messages", "--config", config_arg, "--local", "list", "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    let states: Vec<&str> = items.iter().map(|i| i["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["mapped", "duplicate", "mapped"]);
    let first = items[0]["id"].as_u64().unwrap().to_string();
    let duplicate = items[1]["id"].as_u64().unwrap().to_string();

    let listed = passerelle(&[
        "messages",
        "--config",
        config_arg,
        "list",
        "--state",
        "duplicate",
    ]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&duplicate));
    let show = passerelle(&["messages", "--config", config_arg, "show", &duplicate]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains(&format!("the same message as #{first}")),
        "{shown}"
    );

    // An operator who meant it replays it: it is routed and delivered.
    let replay = passerelle(&["messages", "--config", config_arg, "replay", &duplicate]);
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("mapped by route adt, queued for 1"),
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let (engine, _) = common::start(&config);
    common::wait_for_lines(&patients, 3);
    common::stop(engine);

    // With the check off, the same resend is routed like any message.
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "duplicate_window_s = 0\n");
    let patients = dir.path().join("out/Patient.ndjson");
    let (engine, addr) = common::start(&config);
    let port = addr.rsplit(':').next().unwrap().to_owned();
    for bytes in [&original[..], resend.as_bytes()] {
        assert!(mllp_send(&port, bytes).contains("MSA|AA"));
    }
    common::wait_for_lines(&patients, 2);
    common::stop(engine);
}

/// A replay that names a destination sends the message again there only, not to the
/// route's other destinations (which already have it), and warns that a later message of
/// the same patient was delivered there already.
#[test]
fn a_replay_by_destination_resends_there_only() {
    let dir = tempfile::tempdir().unwrap();
    let route = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n\
        [[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n\
        [[destinations]]\nname = \"copy\"\ntype = \"ndjson\"\ndir = \"copy\"\n";
    let config = common::setup(dir.path(), route, "");
    let (files, copy) = (
        dir.path().join("out/Patient.ndjson"),
        dir.path().join("copy/Patient.ndjson"),
    );
    let (engine, addr) = common::start(&config);
    // The admission, then the same patient's discharge.
    for name in ["adt_a01_admit.hl7", "adt_a03_discharge.hl7"] {
        let fixture = workspace_root().join("fixtures/hl7").join(name);
        let sent = passerelle(&["send", fixture.to_str().unwrap(), "--to", &addr]);
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
    }
    common::wait_for_lines(&files, 2);
    common::wait_for_lines(&copy, 2);
    common::stop(engine);

    let config_arg = config.to_str().unwrap();
    let list = passerelle(&[
        "messages", "--config", config_arg, "--local", "list", "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let admission = doc["items"][0]["id"].as_u64().unwrap().to_string();
    let control_id = doc["items"][0]["control_id"].as_str().unwrap();
    let replay = passerelle(&[
        "messages",
        "--config",
        config_arg,
        "--local",
        "replay",
        "--control-id",
        control_id,
        "--state",
        "delivered",
        "--dest",
        "adt.files",
    ]);
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success()
            && stdout.contains(&format!("{admission}: 1 deliveries queued again"))
            && stdout.contains("later messages of its ordering key were delivered to adt.files"),
        "{stdout}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let (engine, _) = common::start(&config);
    common::wait_for_lines(&files, 3);
    common::stop(engine);

    let show = passerelle(&[
        "messages", "--config", config_arg, "--local", "show", &admission, "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let attempts = |destination: &str| {
        doc["delivery_details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["destination"] == destination)
            .unwrap()["history"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(attempts("adt.files"), 2, "sent again where asked");
    assert_eq!(attempts("adt.copy"), 1, "not sent again elsewhere");
    assert_eq!(common::lines_in(&copy), 2);
}

#[test]
fn check_reports_configuration_routes_and_destinations() {
    let root = workspace_root();
    let good = passerelle(&[
        "check",
        "--mappings",
        root.join("mappings").to_str().unwrap(),
        "--config",
        root.join("passerelle.toml").to_str().unwrap(),
    ]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("2 route(s)"));
    // `--config` alone, run where there is no ./mappings (here, in an empty folder):
    // the packs come from the configuration's `[paths] mappings`.
    let elsewhere = tempfile::tempdir().unwrap();
    let alone = Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args([
            "check",
            "--config",
            root.join("passerelle.toml").to_str().unwrap(),
        ])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(
        alone.status.success(),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    assert!(String::from_utf8_lossy(&alone.stdout).contains("2 route(s)"));

    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(
        dir.path(),
        "name = \"r\"\nmapping = \"v2-to-fhir\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\ntimeout_s = 5\n",
        "unrouted = \"maybe\"\n",
    );
    let bad = passerelle(&[
        "check",
        "--mappings",
        root.join("mappings").to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("passerelle.toml:") && stderr.contains("defaults.unrouted"),
        "{stderr}"
    );
    // In the same run, the destination's missing url, located in its route file.
    assert!(
        stderr.contains("10-route.toml:3:3: destinations.url: missing setting `url`"),
        "{stderr}"
    );
}

/// An NDJSON destination whose folder cannot be written fails `check`, located at its
/// `dir`, instead of the first delivery failing at night; a folder not there yet but
/// makeable passes, and check leaves nothing behind.
#[test]
fn check_tries_that_ndjson_folders_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let route = |out: &str| {
        format!(
            "name = \"r\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = {out:?}\n"
        )
    };
    let config = common::setup(dir.path(), &route("/proc/passerelle-out"), "");
    let check = || passerelle(&["check", "--config", config.to_str().unwrap()]);
    let bad = check();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "10-route.toml:7:7: destinations.dir: invalid setting `dir`: cannot write in /proc"
        ),
        "{stderr}"
    );
    let makeable = dir.path().join("later/out");
    std::fs::write(
        dir.path().join("routes.d/10-route.toml"),
        route(makeable.to_str().unwrap()),
    )
    .unwrap();
    let good = check();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(!dir.path().join("later").exists(), "check makes nothing");
}

#[test]
fn admin_api_health_ready_metrics_with_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "[admin]\n",
            "[admin]\ntoken_env = \"PASSERELLE_TEST_TOKEN\"\n",
        ),
    )
    .unwrap();
    let (engine, mllp, admin) =
        common::start_with_env(&config, &[("PASSERELLE_TEST_TOKEN", "s3cret")]);

    assert_eq!(common::http_get(&admin, "/health", None).0, 200);
    assert_eq!(common::http_get(&admin, "/ready", None).0, 200);
    assert_eq!(
        common::http_get(&admin, "/metrics", None).0,
        401,
        "metrics need the token"
    );
    assert_eq!(common::http_get(&admin, "/metrics", Some("wrong")).0, 401);

    let adt = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let sent = passerelle(&["send", adt.to_str().unwrap(), "--to", &mllp]);
    assert!(sent.status.success());
    let (status, metrics) = common::http_get(&admin, "/metrics", Some("s3cret"));
    assert_eq!(status, 200);
    assert!(metrics.contains("passerelle_up 1"), "{metrics}");
    assert!(
        metrics.contains("passerelle_messages{state=\"mapped\"} 1")
            || metrics.contains("passerelle_messages{state=\"received\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("passerelle_listener_events_total{listener=\"main\",event=\"acks\"} 1"),
        "{metrics}"
    );
    for name in passerelle_engine::admin::metric_names() {
        assert!(metrics.contains(&format!("\n{name}")), "{name} exported");
    }
    for line in [
        "passerelle_received_total{listener=\"main\"} 1",
        // The fixture asks for enhanced mode (MSH-15 AL, MSH-16 NE): a commit ACK.
        "passerelle_acks_total{listener=\"main\",code=\"CA\"} 1",
        "passerelle_acks_total{listener=\"main\",code=\"AA\"} 0",
        "passerelle_acks_total{listener=\"main\",code=\"AR\"} 0",
        "passerelle_ack_latency_seconds_count{listener=\"main\"} 1",
        "passerelle_ack_latency_seconds_bucket{listener=\"main\",le=\"+Inf\"} 1",
        "passerelle_rejected_total{listener=\"main\"} 0",
        "passerelle_ready 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // The delivery to the NDJSON destination shows in the counters and histograms.
    let delivered = "passerelle_delivery_attempts_total{route=\"adt\",destination=\"files\",outcome=\"delivered\"} 1";
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (_, metrics) = common::http_get(&admin, "/metrics", Some("s3cret"));
        if metrics.contains(delivered) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "never delivered: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for line in [
        "passerelle_mapped_total{route=\"adt\"} 1",
        "passerelle_delivery_latency_seconds_count{route=\"adt\",destination=\"files\"} 1",
        "passerelle_delivery_attempt_duration_seconds_count{route=\"adt\",destination=\"files\"} 1",
        "passerelle_deliveries{route=\"adt\",destination=\"files\",state=\"delivered\"} 1",
        "passerelle_deliveries{route=\"adt\",destination=\"files\",state=\"dead\"} 0",
        "passerelle_queue_oldest_age_seconds{route=\"adt\",destination=\"files\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        !metrics.contains("passerelle_store_disk_bytes 0\n")
            && metrics.contains("\npasserelle_store_disk_bytes "),
        "{metrics}"
    );
    let (status, list) = common::http_get(&admin, "/api/messages", Some("s3cret"));
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(doc["items"].as_array().unwrap().len(), 1);
    assert!(!list.contains("PID"), "the list carries no message content");
    common::stop(engine);
}

#[test]
fn messages_commands_go_through_the_running_engine() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let admin_port = passerelle_testkit::free_port();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "[admin]\nbind = \"127.0.0.1:0\"\n",
            &format!(
                "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_env = \"PASSERELLE_OPS_TOKEN\"\n"
            ),
        ),
    )
    .unwrap();
    let patients = dir.path().join("out/Patient.ndjson");
    let (engine, mllp, _) = common::start_with_env(&config, &[("PASSERELLE_OPS_TOKEN", "t0ken")]);
    for fixture in ["adt_a01_admit.hl7", "oru_r01_v23.hl7"] {
        let path = workspace_root().join("fixtures/hl7").join(fixture);
        assert!(
            passerelle(&["send", path.to_str().unwrap(), "--to", &mllp])
                .status
                .success()
        );
    }
    common::wait_for_lines(&patients, 1);

    let config_arg = config.to_str().unwrap();
    let ops = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
        command
            .args(["messages", "--config", config_arg])
            .args(args);
        match token {
            Some(t) => command.env("PASSERELLE_OPS_TOKEN", t),
            None => command.env_remove("PASSERELLE_OPS_TOKEN"),
        };
        command.output().unwrap()
    };
    // The store is locked by the engine: an answer proves the API was used.
    let without = ops(&["list"], None);
    assert!(!without.status.success());
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
    let list = ops(&["list", "--json"], Some("t0ken"));
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    let states: Vec<&str> = items.iter().map(|i| i["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["mapped", "unrouted"]);
    let adt_id = items[0]["id"].as_u64().unwrap().to_string();
    let oru_id = items[1]["id"].as_u64().unwrap().to_string();

    let show = ops(&["show", &adt_id], Some("t0ken"));
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("\n  PID|")
            && text.contains("delivered")
            && text.contains("\"resourceType\": \"Bundle\""),
        "{text}"
    );
    let dry = ops(&["replay", &oru_id, "--dry-run"], Some("t0ken"));
    assert!(!dry.status.success(), "a replay that would change nothing");
    assert!(
        String::from_utf8_lossy(&dry.stderr).contains("not replayed: still unrouted (dry run)")
    );

    // A replay by filter, through the explicit --admin address: the running engine
    // delivers again at once, without a restart.
    let admin_url = format!("http://127.0.0.1:{admin_port}");
    let replay = ops(
        &[
            "--admin",
            &admin_url,
            "replay",
            "--state",
            "delivered",
            "--route",
            "adt",
        ],
        Some("t0ken"),
    );
    assert!(
        String::from_utf8_lossy(&replay.stdout)
            .contains(&format!("{adt_id}: 1 deliveries queued again")),
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    common::wait_for_lines(&patients, 2);
    let nothing = ops(
        &["replay", "--control-id", "no-such-control-id"],
        Some("t0ken"),
    );
    assert!(!nothing.status.success(), "an empty selection is an error");

    let purge = ops(&["purge", &oru_id, "999999"], Some("t0ken"));
    assert!(!purge.status.success(), "one of the two ids does not exist");
    assert!(String::from_utf8_lossy(&purge.stdout).contains(&format!("{oru_id}: purged")));
    assert!(String::from_utf8_lossy(&purge.stderr).contains("999999: no such message"));
    let list = ops(&["list", "--json"], Some("t0ken"));
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["items"].as_array().unwrap().len(), 1);
    common::stop(engine);
}

/// A sender that does not frame its messages (no 0x0B start block) has them dropped:
/// the operator sees it at once, as a warning naming the listener, the peer and the byte
/// count (never the bytes: they hold patient data), and as the listener event
/// `unframed_data`, not only as a tolerated quirk in an info line.
#[test]
fn unframed_bytes_are_a_warning_and_a_listener_event_without_their_content() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let (mut engine, mllp, admin) = common::start_with_env(&config, &[]);
    let message = std::fs::read_to_string(workspace_root().join("fixtures/hl7/adt_a01_admit.hl7"))
        .unwrap()
        .replace('\n', "\r");
    let mut sender = std::net::TcpStream::connect(&mllp).unwrap();
    sender.write_all(message.as_bytes()).unwrap();
    sender.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    sender.read_to_end(&mut answer).unwrap();
    assert!(answer.is_empty(), "nothing to acknowledge");

    let line = engine.wait_for_line("outside an MLLP frame", Duration::from_secs(10));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("listener=main"), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains(&format!("bytes={}", message.len())), "{line}");
    assert!(
        line.contains("looks_like=\"hl7\"") || line.contains("looks_like=hl7"),
        "{line}"
    );
    assert!(line.contains("HL7 sent without MLLP framing"), "{line}");
    for private in ["MSH|", "PID|", "RBGADT0000184467"] {
        assert!(!line.contains(private), "{line}");
    }
    let (status, metrics) = common::http_get(&admin, "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "passerelle_listener_events_total{listener=\"main\",event=\"unframed_data\"} 1"
        ),
        "{metrics}"
    );
    common::stop(engine);
}

/// A destination's settings that cannot work are a configuration mistake like any other:
/// `serve` refuses to start with exit status 2, the problem located, so that systemd
/// (RestartPreventExitStatus=2) does not restart it in a loop as it would on status 1.
#[test]
fn serve_refuses_a_destination_it_cannot_use_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(
        dir.path(),
        "name = \"r\"\nmapping = \"v2-to-fhir\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"not a url\"\n",
        "",
    );
    let mut engine = Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: an engine that starts instead is killed and the test fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = engine.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            engine.kill().unwrap();
            panic!("passerelle serve started with a destination it cannot use");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut engine.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("10-route.toml:6:7: destinations.url: invalid setting `url`"),
        "{stderr}"
    );
}

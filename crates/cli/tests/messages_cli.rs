//! `passerelle messages` and the admin API at their edges, as an operator meets them:
//! replays that change nothing, purges without ids, times typed as dates, unknown states
//! and request fields, tokens missing or wrong, a closed stdout, and filters that must
//! stay out of URLs. The real engine (`passerelle serve --config`) stores the messages.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use passerelle_hl7::types::DateTime;
use passerelle_testkit::workspace_root;

mod common;

const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";
const TOKEN_ENV: &str = "PASSERELLE_EDGES_TOKEN";

/// `passerelle messages --config CONFIG …`, with `token` in the token variable (or none).
fn messages(config: &Path, token: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command.args(["messages", "--config", config.to_str().unwrap()]);
    match token {
        Some(t) => command.env(TOKEN_ENV, t),
        None => command.env_remove(TOKEN_ENV),
    };
    command
}

/// A command's exit code, stdout and stderr.
type Outcome = (Option<i32>, String, String);

fn run(command: &mut Command) -> Outcome {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// An engine in `dir` with the admin API on a fixed port (token "t0k"), that has taken an
/// ADT (mapped, delivered to out/Patient.ndjson) and an ORU (no route: unrouted).
/// Returns it, the config, the admin address and the two ids.
fn engine_with_two_messages(
    dir: &Path,
) -> (
    passerelle_testkit::mllp::PeerProcess,
    PathBuf,
    String,
    String,
    String,
) {
    let config = common::setup(dir, ROUTE, "");
    let admin_port = common::fixed_admin(&config, TOKEN_ENV);
    let (engine, mllp, _) = common::start_with_env(&config, &[(TOKEN_ENV, "t0k")]);
    for fixture in ["adt_a01_admit.hl7", "oru_r01_v23.hl7"] {
        let path = workspace_root().join("fixtures/hl7").join(fixture);
        Command::new(env!("CARGO_BIN_EXE_passerelle"))
            .args(["send", path.to_str().unwrap(), "--to", &mllp])
            .output()
            .unwrap();
    }
    common::wait_for_lines(&dir.join("out/Patient.ndjson"), 1);
    let (code, stdout, stderr) = run(messages(&config, Some("t0k")).args(["list", "--json"]));
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    let states: Vec<&str> = items.iter().map(|i| i["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["mapped", "unrouted"]);
    let id = |i: usize| items[i]["id"].as_u64().unwrap().to_string();
    (
        engine,
        config,
        format!("127.0.0.1:{admin_port}"),
        id(0),
        id(1),
    )
}

/// A time as an operator at the site (UTC+01:00, the default `site_utc_offset_minutes`)
/// types it: `YYYY-MM-DDTHH:MM:SS`, without an offset.
fn site_time(unix_secs: u64) -> String {
    let t = DateTime::from_unix(unix_secs + 3_600);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[test]
fn on_a_stopped_engine_store() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, config, _, adt, oru) = engine_with_two_messages(dir.path());
    common::stop(engine);
    let local = |args: &[&str]| run(messages(&config, None).arg("--local").args(args));

    // A replay that leaves the message where it was is no success, and says so on stderr;
    // the other ids of the call still go ahead.
    let (code, stdout, stderr) = local(&["replay", &oru]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!("{oru}: not replayed: still unrouted")),
        "{stderr}"
    );
    let (code, stdout, stderr) = local(&["replay", &oru, &adt, "--dry-run"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "{adt}: 1 deliveries would be queued again (dry run)"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("{oru}: not replayed: still unrouted (dry run)")),
        "{stderr}"
    );

    // A purge needs ids.
    let (code, _, stderr) = local(&["purge"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("<IDS>") && stderr.contains("Usage"),
        "{stderr}"
    );

    // Unknown states name the valid ones.
    let (code, _, stderr) = local(&["list", "--state", "bogus"]);
    assert_eq!(code, Some(1));
    for state in ["received", "unrouted", "mapping_failed", "pending", "dead"] {
        assert!(stderr.contains(state), "{state} in {stderr}");
    }

    // Dates and times as typed, without an offset: the site's (UTC+01:00 here).
    let (_, stdout, _) = local(&["list", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let first_ms = doc["items"][0]["received_at_ms"].as_u64().unwrap();
    let listed = |args: &[&str]| {
        let (code, stdout, stderr) = local(&[&["list", "--json"][..], args].concat());
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        doc["items"].as_array().unwrap().len()
    };
    assert_eq!(listed(&["--since", "2000-01-01"]), 2);
    assert_eq!(listed(&["--until", "2000-01-01"]), 0);
    let at = site_time(first_ms / 1_000);
    assert_eq!(listed(&["--since", &at]), 2, "--since {at}");
    assert_eq!(listed(&["--until", &at]), 0, "--until {at}");
    let day = &at[..10];
    assert_eq!(listed(&["--since", day]), 2, "--since {day}");
    assert_eq!(listed(&["--until", day]), 0, "--until {day}");

    // The text list: a header; each message's deliveries as the store has them (the ADT's
    // one destination, `adt.files`, shown without its route; the unrouted ORU has none);
    // reception times at the site's offset, in a form --since and --until take back.
    let (code, stdout, stderr) = local(&["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header[..3], ["ID", "RECEIVED", "STATE"], "{stdout}");
    assert!(lines[0].contains("DELIVERIES"), "{stdout}");
    let (_, shown, _) = local(&["show", &adt, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let delivery_state = shown["delivery_details"][0]["state"].as_str().unwrap();
    let adt_cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(adt_cells[0], adt, "{stdout}");
    assert!(
        adt_cells.contains(&format!("files={delivery_state}").as_str()),
        "{stdout}"
    );
    let oru_cells: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(oru_cells[0], oru, "{stdout}");
    assert_eq!(oru_cells[2], "unrouted", "{stdout}");
    assert!(oru_cells.contains(&"-"), "{stdout}");
    let printed = adt_cells[1];
    assert_eq!(printed, format!("{at}+01:00"), "{stdout}");
    assert_eq!(listed(&["--since", printed]), 2, "--since {printed}");
    assert_eq!(listed(&["--until", printed]), 0, "--until {printed}");

    // Newest first, a page at a time: the next page is below the last id shown.
    newest_first_pages(&local);

    // Nobody reading: no panic, and the replay is done and flushed.
    for args in [vec!["list"], vec!["show", &adt]] {
        let (code, stderr) =
            common::run_with_stdout_closed(messages(&config, None).arg("--local").args(&args));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    let (code, stderr) =
        common::run_with_stdout_closed(messages(&config, None).args(["--local", "replay", &adt]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (_, stdout, _) = local(&["show", &adt, "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["delivery_details"][0]["state"], "pending", "{stdout}");

    // Delivered again: the count since the replay and the whole history, each named.
    let (engine, _) = common::start(&config);
    common::wait_for_lines(&dir.path().join("out/Patient.ndjson"), 2);
    common::stop(engine);
    let (_, stdout, _) = local(&["show", &adt]);
    assert!(
        stdout.contains("delivered, 1 attempt(s) since last queued, 2 in all"),
        "{stdout}"
    );
    let history = stdout
        .split("# delivery to")
        .nth(1)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" delivered "))
        .count();
    assert_eq!(history, 2, "{stdout}");
}

/// A TCP relay to `upstream` that keeps every byte clients send, as a proxy's access log
/// would keep the request lines. Returns its address and the bytes.
fn recording_relay(upstream: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let mut server = TcpStream::connect(&upstream).unwrap();
            let (mut client_r, mut server_w) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let record = Arc::clone(&record);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = client_r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if server_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = server_w.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

/// `list --newest-first` pages down from the newest of the two messages (the ORU, sent
/// last) with `--before`, and says how to get the next page.
fn newest_first_pages(list: &dyn Fn(&[&str]) -> Outcome) {
    let ids = |stdout: &str| -> Vec<u64> {
        let doc: serde_json::Value = serde_json::from_str(stdout).unwrap();
        doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    let (code, stdout, stderr) = list(&["list", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let oldest_first = ids(&stdout);
    assert_eq!(oldest_first.len(), 2, "{stdout}");
    let (newer, older) = (oldest_first[1], oldest_first[0]);
    let (code, stdout, stderr) = list(&["list", "--newest-first", "--limit", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[1].split_whitespace().next(),
        Some(newer.to_string().as_str()),
        "{stdout}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("… more: --newest-first --before {newer}").as_str()),
        "{stdout}"
    );
    let before = newer.to_string();
    let (code, stdout, stderr) = list(&["list", "--newest-first", "--before", &before, "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(ids(&stdout), [older], "{stdout}");
    // --before pages newest first only.
    let (code, _, stderr) = list(&["list", "--before", &before]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[test]
fn through_the_running_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, config, admin, adt, oru) = engine_with_two_messages(dir.path());

    // A missing token and a wrong one are told apart.
    let (code, _, stderr) = run(messages(&config, None).arg("list"));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("wants a token") && stderr.contains(TOKEN_ENV),
        "{stderr}"
    );
    let (code, _, stderr) = run(messages(&config, Some("wrong")).arg("list"));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("refused the token") && stderr.contains(TOKEN_ENV),
        "{stderr}"
    );
    // --local asks no engine: only the store's failure (locked by the engine) applies.
    let (code, _, stderr) = run(messages(&config, None).args(["--local", "list"]));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("the store at") && !stderr.contains("no engine answers"),
        "{stderr}"
    );
    // Said as what it is, not as sled's lock error.
    assert!(
        stderr.contains("another process has it open (a passerelle engine running on it?)")
            && !stderr.contains("WouldBlock"),
        "{stderr}"
    );

    // The same lists through the engine's API.
    newest_first_pages(&|args: &[&str]| run(messages(&config, Some("t0k")).args(args)));

    // Replays through the API count like local ones.
    let (code, stdout, stderr) = run(messages(&config, Some("t0k")).args(["replay", &oru]));
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("{oru}: not replayed: still unrouted")),
        "{stderr}"
    );
    // The API's answer keeps its fields and adds `replayed`.
    let body = format!("{{\"ids\":[{oru},{adt}],\"dry_run\":true}}");
    let (status, answer) = common::http_request(
        &admin,
        "POST",
        "/api/messages/replay",
        Some("t0k"),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");
    let doc: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results[0]["ok"], true);
    assert_eq!(results[0]["replayed"], false, "{answer}");
    assert!(results[0]["message"].as_str().unwrap().contains("unrouted"));
    assert_eq!(results[1]["replayed"], true, "{answer}");

    // Unknown fields are refused, by name, before anything happens.
    for (path, body, field) in [
        ("/api/messages/replay", "{\"idz\":[1]}", "idz"),
        (
            "/api/messages/replay",
            "{\"filter\":{\"rout\":\"adt\"}}",
            "rout",
        ),
        (
            "/api/messages/purge",
            "{\"ids\":[1],\"force\":true}",
            "force",
        ),
        ("/api/messages/query", "{\"sate\":\"dead\"}", "sate"),
    ] {
        let (status, answer) = common::http_request(&admin, "POST", path, Some("t0k"), Some(body));
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer.contains(field), "{path} {body}: {answer}");
    }
    let (status, answer) = common::http_get(&admin, "/api/messages?sate=dead", Some("t0k"));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("sate"), "{answer}");
    // …after the token is checked.
    let (status, _) = common::http_request(
        &admin,
        "POST",
        "/api/messages/replay",
        None,
        Some("{\"idz\":[1]}"),
    );
    assert_eq!(status, 401);
    // The GET list still works, as before.
    let (status, answer) = common::http_get(&admin, "/api/messages?state=unrouted", Some("t0k"));
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(&format!("\"id\":{oru}")), "{answer}");

    // A filter on the ordering key (it holds a patient identifier) stays out of URLs.
    let (_, stdout, _) = run(messages(&config, Some("t0k")).args(["show", &adt, "--json"]));
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let key = shown["delivery_details"][0]["ordering_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (relay, seen) = recording_relay(admin.clone());
    let (code, stdout, stderr) = run(messages(&config, Some("t0k")).args([
        "--admin",
        &format!("http://{relay}"),
        "list",
        "--key",
        &key,
        "--json",
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<String> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap().to_string())
        .collect();
    assert_eq!(ids, [adt.as_str()], "the key selects the ADT");
    let traffic = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let request_lines: Vec<&str> = traffic
        .lines()
        .filter(|l| l.starts_with("GET ") || l.starts_with("POST "))
        .collect();
    assert!(
        request_lines.contains(&"POST /api/messages/query HTTP/1.1"),
        "{request_lines:?}"
    );
    assert!(
        request_lines.iter().all(|l| !l.contains('?')),
        "no filter in a URL: {request_lines:?}"
    );
    assert!(traffic.contains("\"key\":"), "the key went in the body");
    common::stop(engine);
}

/// A route file being edited (with a mistake in it) must not keep the operator from the
/// messages: through the running engine, list, show and replay need only passerelle.toml
/// (the engine routes with what it loaded); on a stopped engine's store, list and show
/// need no routes either, while a replay, which routes, reports the route's problem.
#[test]
fn a_broken_route_file_does_not_lock_the_operator_out() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, config, _, adt, _) = engine_with_two_messages(dir.path());
    let broken = dir.path().join("routes.d/20-being-edited.toml");
    std::fs::write(&broken, "name = \"lab\nmapping = \"v2-to-fhir\"\n").unwrap();

    let (code, stdout, stderr) = run(messages(&config, Some("t0k")).arg("list"));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        3,
        "a header and two messages: {stdout}"
    );
    let (code, _, stderr) = run(messages(&config, Some("t0k")).args(["replay", &adt]));
    assert_eq!(code, Some(0), "{stderr}");

    common::stop(engine);
    let local = |args: &[&str]| run(messages(&config, None).arg("--local").args(args));
    let (code, stdout, stderr) = local(&["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        3,
        "a header and two messages: {stdout}"
    );
    let (code, stdout, stderr) = local(&["show", &adt]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ADT^A01"), "{stdout}");
    let (code, _, stderr) = local(&["replay", &adt]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("20-being-edited.toml:1:"), "{stderr}");
}

/// Deleting a message is traced in the engine's log (which id, whether it went), like a
/// replay: a hospital must be able to tell who removed what and when from its logs.
#[test]
fn a_purge_through_the_engine_is_in_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, config, _, _, oru) = engine_with_two_messages(dir.path());
    let (code, stdout, stderr) = run(messages(&config, Some("t0k")).args(["purge", &oru]));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let line = engine.wait_for_line(
        "purge via the admin API",
        std::time::Duration::from_secs(10),
    );
    assert!(line.contains(&format!("id={oru}")), "{line}");
    assert!(line.contains("ok=true"), "{line}");
    common::stop(engine);
}

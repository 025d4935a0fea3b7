//! `passerelle serve` reloads its routes and mappings on SIGHUP, as the real process: a
//! route widened to a new message type takes it at once, on the same connection-less
//! sends; a reload that would change the destinations, or a route file with an error,
//! is refused with the reason in the log, and the running routes stay.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

fn route(message_types: &str, extra_destination: bool) -> String {
    let mut route = format!(
        "name = \"lab\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = {message_types}\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n"
    );
    if extra_destination {
        route.push_str("[[destinations]]\nname = \"more\"\ntype = \"ndjson\"\ndir = \"more\"\n");
    }
    route
}

/// Sends a fixture with `passerelle send`; returns its summary line.
fn send(addr: &str, fixture: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(["send", "--to", addr])
        .arg(
            passerelle_testkit::workspace_root()
                .join("fixtures/hl7")
                .join(fixture),
        )
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `passerelle send`'s summary reports an accept (AA, or CA in enhanced mode).
fn accepted(summary: &str) -> bool {
    summary.contains(": AA ") || summary.contains(": CA ")
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50)); // polls the observable output file
    }
}

#[test]
fn sighup_reloads_routes_and_refuses_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(
        dir.path(),
        &route("\"ADT\"", false),
        "unrouted = \"error\"\n",
    );
    let route_file = dir.path().join("routes.d/10-route.toml");
    let (mut engine, addr) = common::start(&config);

    let before = send(&addr, "oru_r01_chemistry.hl7");
    assert!(
        before.contains(": AE ") || before.contains(": CE "),
        "no route for ORU yet: {before}"
    );

    // Widened to ORU: same destination, so the reload applies.
    std::fs::write(&route_file, route("[\"ADT\", \"ORU\"]", false)).unwrap();
    common::signal(&engine, "-HUP");
    engine.wait_for_line("routes and mappings reloaded", Duration::from_secs(30));
    let after = send(&addr, "oru_r01_chemistry.hl7");
    assert!(accepted(&after), "{after}");
    wait_for_file(&dir.path().join("out/Observation.ndjson"));

    // A new destination needs a worker: refused, and the widened route stays in force.
    std::fs::write(&route_file, route("\"ADT\"", true)).unwrap();
    common::signal(&engine, "-HUP");
    let refused = engine.wait_for_line("reload refused", Duration::from_secs(30));
    assert!(refused.contains("destinations changed"), "{refused}");
    let still = send(&addr, "oru_r01_chemistry.hl7");
    assert!(accepted(&still), "{still}");

    // A route file with an error: refused with its place in the file.
    std::fs::write(&route_file, "name = \"lab\"\nmapping = \n").unwrap();
    common::signal(&engine, "-HUP");
    let refused = engine.wait_for_line("reload refused", Duration::from_secs(30));
    assert!(refused.contains("10-route.toml:"), "{refused}");
    let still = send(&addr, "oru_r01_chemistry.hl7");
    assert!(accepted(&still), "{still}");

    common::stop(engine);
}

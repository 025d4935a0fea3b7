//! `passerelle messages resubmit` as an operator runs it at 3 a.m.: the real engine
//! (`passerelle serve --config`), a third-party sender (python `hl7`'s `mllp_send`) and
//! `passerelle send`, NDJSON output; corrected copies given as a file, or made in an
//! "editor" (a script run as `$EDITOR`), through the running engine's admin API or on the
//! stopped engine's store.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use passerelle_testkit::mllp::venv_bin;
use passerelle_testkit::{python, workspace_root};
use serde_json::Value;

mod common;

const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";
const TOKEN_ENV: &str = "PASSERELLE_RESUBMIT_TOKEN";
const TOKEN: &str = "n1ght";

/// `passerelle messages --config CONFIG …` as the operator `nightshift`, with the token,
/// temporary files under `tmp` and no editor set.
fn messages(config: &Path, tmp: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command
        .args(["messages", "--config", config.to_str().unwrap()])
        .env(TOKEN_ENV, TOKEN)
        .env("USER", "nightshift")
        .env("TMPDIR", tmp)
        .env_remove("VISUAL")
        .env_remove("EDITOR");
    command
}

fn run(command: &mut Command) -> (Option<i32>, String, String) {
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `messages … ARGS --json`, parsed.
fn json_of(config: &Path, tmp: &Path, args: &[&str]) -> Value {
    let (code, stdout, stderr) = run(messages(config, tmp).args(args).arg("--json"));
    assert_eq!(code, Some(0), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// Every stored message's (id, state), oldest first.
fn states(config: &Path, tmp: &Path) -> Vec<(u64, String)> {
    json_of(config, tmp, &["list"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits until the list has a message in `state`; returns its id. Polls the engine's API
/// (the observable effect), 30 s at most.
fn wait_for_state(config: &Path, tmp: &Path, state: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((id, _)) = states(config, tmp).into_iter().find(|(_, s)| s == state) {
            return id;
        }
        assert!(Instant::now() < deadline, "no message became {state}");
        std::thread::sleep(Duration::from_millis(100)); // polls the admin API
    }
}

/// The admission fixture with `from` replaced by `to` (it must be there).
fn admission_with(from: &str, to: &str) -> String {
    let text =
        std::fs::read_to_string(workspace_root().join("fixtures/hl7/adt_a01_admit.hl7")).unwrap();
    assert!(text.contains(from), "{from}");
    text.replace(from, to)
}

/// PV1-44 (admit date/time) with a month 13: the v2-to-fhir pack refuses it.
const GOOD_ADMIT: &str = "|RBGH|||||20240311083000-0500";
const BAD_ADMIT: &str = "|RBGH|||||20241399083000-0500";

/// An executable script in `dir` (an "editor": it gets the file to edit as `$1`).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut mode = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut mode, 0o755);
    std::fs::set_permissions(&path, mode).unwrap();
    path
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// (1) A message the mapping refuses, sent by a third-party sender, corrected in a file
/// and resubmitted through the running engine: the copy is delivered, and both histories
/// show the link.
/// An engine in a fresh folder, its admin API on a fixed port with the token set: the
/// folder, another for the operator's temporary files, the config, the engine and its
/// MLLP address.
fn started_engine() -> (
    tempfile::TempDir,
    tempfile::TempDir,
    PathBuf,
    passerelle_testkit::mllp::PeerProcess,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    common::fixed_admin(&config, TOKEN_ENV);
    let (engine, mllp, _) = common::start_with_env(&config, &[(TOKEN_ENV, TOKEN)]);
    (dir, tmp, config, engine, mllp)
}

/// `passerelle send FILE --to MLLP`.
fn send(file: &Path, mllp: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(["send", file.to_str().unwrap(), "--to", mllp])
        .output()
        .unwrap()
}

#[test]
fn a_mapping_failure_corrected_in_a_file_is_delivered_through_the_running_engine() {
    python(); // the python hl7 peer, installed on first use
    let (dir, tmp, config, engine, mllp) = started_engine();
    let (tmp, work) = (tmp.path(), dir.path());
    let patients = work.join("out/Patient.ndjson");

    let bad = work.join("bad.hl7");
    std::fs::write(&bad, admission_with(GOOD_ADMIT, BAD_ADMIT)).unwrap();
    let port = mllp.rsplit(':').next().unwrap();
    let sent = Command::new(venv_bin("mllp_send"))
        .args(["--loose", "-p", port, "-f"])
        .arg(&bad)
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let ack = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success() && (ack.contains("MSA|AA") || ack.contains("MSA|CA")),
        "the sender's message is accepted: {ack}"
    );
    let original = wait_for_state(&config, tmp, "mapping_failed");
    let shown = json_of(&config, tmp, &["show", &original.to_string()]);
    assert!(
        shown["error"].as_str().unwrap().contains("PV1-44"),
        "{shown}"
    );

    // The corrected file, as an operator saves it: LF line ends.
    let fixed = work.join("fixed.hl7");
    std::fs::write(
        &fixed,
        admission_with(GOOD_ADMIT, "|RBGH|||||20241113083000-0500").replace('\r', "\n"),
    )
    .unwrap();
    let (code, stdout, stderr) = run(messages(&config, tmp).args([
        "resubmit",
        &original.to_string(),
        "--file",
        fixed.to_str().unwrap(),
    ]));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let copy = stdout
        .split("journaled as message ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|id| id.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        stdout.trim(),
        format!(
            "{original}: journaled as message {copy}, resubmitted from {original}; \
             mapped by route adt, queued for adt.files"
        )
    );
    common::wait_for_lines(&patients, 1);
    let delivered = std::fs::read_to_string(&patients).unwrap();
    assert!(delivered.contains("WHITFIELD"), "the patient was delivered");

    // Both histories, and both records, show the link.
    let before = json_of(&config, tmp, &["show", &original.to_string()]);
    assert_eq!(
        before["state"], "mapping_failed",
        "the original keeps its state"
    );
    assert_eq!(before["resubmitted_as"], serde_json::json!([copy]));
    let last = before["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["state"], "resubmitted");
    assert_eq!(last["detail"], format!("resubmitted as message {copy}"));
    let after = json_of(&config, tmp, &["show", &copy.to_string()]);
    assert_eq!(after["state"], "mapped");
    assert_eq!(after["resubmitted_from"], original);
    assert_eq!(after["listener"], "resubmit");
    assert_eq!(after["peer"], "operator nightshift");
    assert_eq!(
        after["history"][0]["detail"],
        format!("resubmitted from message {original}")
    );
    assert_eq!(
        after["raw"]
            .as_str()
            .unwrap()
            .split('\r')
            .filter(|s| !s.is_empty())
            .count(),
        15,
        "LF line ends became CR segment separators: {}",
        after["raw"]
    );
    // In text, as an operator reads them.
    let (_, listed, _) = run(messages(&config, tmp).arg("list"));
    assert!(
        listed.contains(&format!("[resubmitted as {copy}]"))
            && listed.contains(&format!("[resubmitted from {original}]")),
        "{listed}"
    );
    let (_, shown, _) = run(messages(&config, tmp).args(["show", &original.to_string()]));
    assert!(
        shown.contains(&format!("resubmitted as message {copy}")),
        "{shown}"
    );
    common::stop(engine);
}

/// (2) and (3): a frame the engine rejected (a lowercase segment id), corrected in the
/// operator's editor. An edit that does not parse is refused, stores nothing and is kept
/// for the operator; an edit saved unchanged resubmits nothing; the right edit goes out.
#[test]
fn a_rejected_frame_corrected_in_the_editor() {
    let (dir, tmp, config, engine, mllp) = started_engine();
    let (tmp, work) = (tmp.path(), dir.path());
    let broken = workspace_root().join("fixtures/malformed/segid_lowercase.hl7");
    let sent = send(&broken, &mllp);
    assert!(!sent.status.success(), "the sender got a NAK");
    let original = wait_for_state(&config, tmp, "rejected");
    let id = original.to_string();
    let editors = tempfile::tempdir().unwrap();

    // (3) An edit that breaks the header: refused with the parser's located error.
    let breaking = script(editors.path(), "break.sh", "sed -i 's/^MSH|/MXH|/' \"$1\"");
    let (code, stdout, stderr) = run(messages(&config, tmp)
        .env("EDITOR", &breaking)
        .args(["resubmit", &id, "--edit"]));
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("does not parse, nothing was stored: byte 0"),
        "{stderr}"
    );
    let kept = files_in(tmp);
    assert_eq!(kept.len(), 1, "the edit is kept for the operator");
    assert!(
        stderr.contains(kept[0].to_str().unwrap()),
        "and named: {stderr}"
    );
    let text = std::fs::read_to_string(&kept[0]).unwrap();
    assert!(
        text.starts_with("MXH|") && text.contains("\npid|1||"),
        "{text}"
    );
    std::fs::remove_file(&kept[0]).unwrap();
    assert_eq!(states(&config, tmp).len(), 1, "nothing was journaled");
    let before = json_of(&config, tmp, &["show", &id]);
    assert!(before["resubmitted_as"].as_array().unwrap().is_empty());

    // Saved unchanged ($VISUAL wins over $EDITOR): nothing resubmitted, no file left.
    let (code, _, stderr) = run(messages(&config, tmp)
        .env("VISUAL", "true")
        .env("EDITOR", &breaking)
        .args(["resubmit", &id, "--edit"]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "message {id} was not changed: nothing resubmitted"
        )),
        "{stderr}"
    );
    assert!(files_in(tmp).is_empty());

    // (2) The right correction: the segment id in capitals.
    let fixing = script(editors.path(), "fix.sh", "sed -i 's/^pid|/PID|/' \"$1\"");
    let (code, stdout, stderr) = run(messages(&config, tmp)
        .env("EDITOR", &fixing)
        .args(["resubmit", &id, "--edit"]));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("resubmitted from {id}; mapped by route adt")),
        "{stdout}"
    );
    assert!(files_in(tmp).is_empty(), "the edit's file is deleted");
    common::wait_for_lines(&work.join("out/Patient.ndjson"), 1);
    let all = states(&config, tmp);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], (original, "rejected".to_owned()));
    assert_eq!(all[1].1, "mapped");
    let copy = json_of(&config, tmp, &["show", &all[1].0.to_string()]);
    let raw = copy["raw"].as_str().unwrap();
    assert!(
        raw.contains("\rPID|1||RB1002341") && !raw.contains("pid|") && raw.ends_with('\r'),
        "{raw:?}"
    );
    common::stop(engine);
}

/// (4) No engine running: the copy is journaled on the store as received, after a dry run
/// that routes and maps it with the configuration on disk; the engine's next start routes
/// and delivers it.
#[test]
fn on_a_stopped_engine_store_the_copy_waits_for_the_next_start() {
    let (dir, tmp, config, engine, mllp) = started_engine();
    let (tmp, work) = (tmp.path(), dir.path());
    let bad = work.join("bad.hl7");
    std::fs::write(&bad, admission_with(GOOD_ADMIT, BAD_ADMIT)).unwrap();
    let sent = send(&bad, &mllp);
    assert!(sent.status.success(), "accepted, then fails to map");
    let original = wait_for_state(&config, tmp, "mapping_failed").to_string();
    common::stop(engine);

    let fixed = work.join("fixed.hl7");
    std::fs::write(
        &fixed,
        admission_with(GOOD_ADMIT, "|RBGH|||||20241113083000-0500"),
    )
    .unwrap();
    let resubmit = |extra: &[&str]| {
        run(messages(&config, tmp)
            .arg("--local")
            .args(["resubmit", &original, "--file", fixed.to_str().unwrap()])
            .args(extra))
    };
    let (code, stdout, stderr) = resubmit(&["--dry-run"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        format!(
            "{original}: would be journaled as a new ADT^A01 message, resubmitted from \
             {original}; with the current configuration: mapped by route adt, queued for \
             adt.files (dry run)"
        )
    );
    assert_eq!(states(&config, tmp).len(), 1, "a dry run stores nothing");

    // A file that does not parse: refused before anything is stored.
    let garbage = work.join("garbage.hl7");
    std::fs::write(&garbage, "PID|1||42\r").unwrap();
    let (code, _, stderr) = run(messages(&config, tmp).arg("--local").args([
        "resubmit",
        &original,
        "--file",
        garbage.to_str().unwrap(),
    ]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("does not parse"), "{stderr}");
    assert_eq!(states(&config, tmp).len(), 1);

    let (code, stdout, stderr) = resubmit(&[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("resubmitted from {original}; not routed yet")),
        "{stdout}"
    );
    let all = states(&config, tmp);
    assert_eq!(all[1].1, "received");
    let copy = all[1].0.to_string();

    let (engine, _, _) = common::start_with_env(&config, &[(TOKEN_ENV, TOKEN)]);
    common::wait_for_lines(&work.join("out/Patient.ndjson"), 1);
    common::stop(engine);
    let after = json_of(&config, tmp, &["--local", "show", &copy]);
    assert_eq!(after["state"], "mapped", "{after}");
    assert_eq!(after["peer"], "operator nightshift");
    let before = json_of(&config, tmp, &["--local", "show", &original]);
    assert_eq!(before["state"], "mapping_failed");
    assert_eq!(
        before["resubmitted_as"][0].as_u64().unwrap().to_string(),
        copy
    );
}

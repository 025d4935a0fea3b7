//! The NDJSON destination: Bulk Data layout, one line per resource, rotation at the size
//! limit, classified failures.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use passerelle_delivery::{AttemptOutcome, Destination, Item};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_testkit::workspace_root;
use serde_json::Value;

fn destination(dir: &Path, extra: &str) -> Destination {
    let settings: toml::Table = toml::from_str(&format!(
        "type = \"ndjson\"\ndir = {:?}\n{extra}",
        dir.display()
    ))
    .unwrap();
    Destination::from_settings("ndjson", &settings, Path::new("/nowhere")).unwrap()
}

fn item(bundle: &str) -> Item<'_> {
    Item {
        message_id: 1,
        bundle: Some(bundle),
        raw: b"MSH|",
    }
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_mapped_bundle_gives_one_line_per_resource_in_files_per_type() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dest = destination(&out, "");
    let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
    let bytes = fs::read(workspace_root().join("fixtures/hl7/adt_a01_admit.hl7")).unwrap();
    let message = passerelle_hl7::Message::parse(&bytes).unwrap();
    let bundle = pack
        .map(&message, &MapOptions::default())
        .unwrap()
        .to_json(true);

    for _ in 0..2 {
        let report = dest.deliver(&item(&bundle)).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }

    let parsed: Value = serde_json::from_str(&bundle).unwrap();
    let mut want: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for entry in parsed["entry"].as_array().unwrap() {
        let r = entry["resource"].clone();
        want.entry(r["resourceType"].as_str().unwrap().to_owned())
            .or_default()
            .push(r);
    }
    assert!(want.contains_key("Patient") && want.len() > 1, "{want:?}");
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let expected: Vec<String> = want.keys().map(|k| format!("{k}.ndjson")).collect();
    assert_eq!(names, expected);
    for (kind, resources) in &want {
        let got = lines(&out.join(format!("{kind}.ndjson")));
        // Two deliveries: every resource twice, in bundle order.
        let twice: Vec<Value> = resources.iter().chain(resources).cloned().collect();
        assert_eq!(got, twice, "{kind}");
        // The pretty-printed bundle still gives one line per resource, members in order.
        let text = fs::read_to_string(out.join(format!("{kind}.ndjson"))).unwrap();
        assert!(text.lines().all(|l| l.starts_with("{\"resourceType\":")));
    }
}

#[tokio::test]
async fn files_rotate_before_they_would_pass_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = destination(tmp.path(), "max_file_bytes = 100");
    let bundle = |n: usize| {
        format!(
            r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"resource":{{"resourceType":"Observation","id":"o{n:03}","status":"final"}}}}]}}"#
        )
    };
    // Each line is 60 bytes: one fits under 100, a second would not.
    for n in 0..5 {
        let b = bundle(n);
        let report = dest.deliver(&item(&b)).await;
        assert_eq!(report.outcome, AttemptOutcome::Delivered, "{report:?}");
    }
    let ids = |name: &str| -> Vec<String> {
        lines(&tmp.path().join(name))
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids("Observation.1.ndjson"), ["o000"]);
    assert_eq!(ids("Observation.2.ndjson"), ["o001"]);
    assert_eq!(ids("Observation.3.ndjson"), ["o002"]);
    assert_eq!(ids("Observation.4.ndjson"), ["o003"]);
    assert_eq!(ids("Observation.ndjson"), ["o004"]);
    for name in ["Observation.1.ndjson", "Observation.ndjson"] {
        assert!(fs::metadata(tmp.path().join(name)).unwrap().len() <= 100);
    }

    // A message bigger than the limit goes whole into a fresh file.
    let big = format!(
        r#"{{"entry":[{{"resource":{{"resourceType":"Observation","id":"big","note":[{{"text":"{}"}}]}}}}]}}"#,
        "x".repeat(200)
    );
    assert_eq!(
        dest.deliver(&item(&big)).await.outcome,
        AttemptOutcome::Delivered
    );
    assert_eq!(ids("Observation.5.ndjson"), ["o004"]);
    assert_eq!(ids("Observation.ndjson"), ["big"]);
}

#[tokio::test]
async fn rotation_numbers_skip_files_already_there() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("Patient.1.ndjson"), "{}\n").unwrap();
    fs::write(tmp.path().join("Patient.ndjson"), "{\"old\":1}\n").unwrap();
    let dest = destination(tmp.path(), "max_file_bytes = 20");
    let b = r#"{"entry":[{"resource":{"resourceType":"Patient","id":"p"}}]}"#;
    assert_eq!(
        dest.deliver(&item(b)).await.outcome,
        AttemptOutcome::Delivered
    );
    assert_eq!(
        fs::read_to_string(tmp.path().join("Patient.2.ndjson")).unwrap(),
        "{\"old\":1}\n"
    );
    assert_eq!(
        fs::read_to_string(tmp.path().join("Patient.1.ndjson")).unwrap(),
        "{}\n"
    );
}

#[tokio::test]
async fn bad_input_is_permanent() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = destination(tmp.path(), "");
    let report = dest
        .deliver(&Item {
            message_id: 3,
            bundle: None,
            raw: b"MSH|",
        })
        .await;
    assert_eq!(report.outcome, AttemptOutcome::Permanent);
    assert_eq!(report.error_class, "no_bundle");
    for bad in [
        "not json",
        "[]",
        r#"{"entry":{"resource":{}}}"#,
        r#"{"entry":"DOE^JOHN"}"#,
        r#"{"entry":[{"resource":{"id":"no type"}}]}"#,
        r#"{"entry":[{"resource":{"resourceType":"../../etc/passwd"}}]}"#,
    ] {
        let report = dest.deliver(&item(bad)).await;
        assert_eq!(report.outcome, AttemptOutcome::Permanent, "{bad}");
        assert_eq!(report.error_class, "invalid_bundle", "{bad}");
        assert!(!report.detail.contains("passwd"), "{report:?}");
        assert!(!report.detail.contains("DOE"), "{report:?}");
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    // A bundle without entries has nothing to write.
    let empty = r#"{"resourceType":"Bundle","type":"transaction"}"#;
    assert_eq!(
        dest.deliver(&item(empty)).await.outcome,
        AttemptOutcome::Delivered
    );
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_disk_error_is_transient_io() {
    let tmp = tempfile::tempdir().unwrap();
    // `dir` is fine when configured, then replaced by a file: every write fails.
    let out = tmp.path().join("out");
    let dest = destination(&out, "");
    fs::write(&out, "a file, not a directory").unwrap();
    let b = r#"{"entry":[{"resource":{"resourceType":"Patient","id":"p"}}]}"#;
    let report = dest.deliver(&item(b)).await;
    assert_eq!(report.outcome, AttemptOutcome::Transient, "{report:?}");
    assert_eq!(report.error_class, "io");
    // Once the operator fixes it, the retry goes through.
    fs::remove_file(&out).unwrap();
    assert_eq!(
        dest.deliver(&item(b)).await.outcome,
        AttemptOutcome::Delivered
    );
}

#[tokio::test]
async fn relative_dirs_resolve_against_the_base_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let settings: toml::Table = toml::from_str("dir = \"out/ndjson\"").unwrap();
    let dest = Destination::from_settings("ndjson", &settings, tmp.path()).unwrap();
    let b = r#"{"entry":[{"resource":{"resourceType":"Patient","id":"p"}}]}"#;
    assert_eq!(
        dest.deliver(&item(b)).await.outcome,
        AttemptOutcome::Delivered
    );
    assert!(tmp.path().join("out/ndjson/Patient.ndjson").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attempts_never_interleave_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = std::sync::Arc::new(destination(tmp.path(), "max_file_bytes = 2000"));
    let mut tasks = Vec::new();
    for n in 0..40 {
        let dest = dest.clone();
        tasks.push(tokio::spawn(async move {
            let b = format!(
                r#"{{"entry":[{{"resource":{{"resourceType":"Patient","id":"p{n}"}}}},{{"resource":{{"resourceType":"Patient","id":"q{n}"}}}}]}}"#
            );
            dest.deliver(&item(&b)).await.outcome
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), AttemptOutcome::Delivered);
    }
    let mut ids = Vec::new();
    for entry in fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        assert!(fs::metadata(&path).unwrap().len() <= 2000);
        let got = lines(&path);
        // A message's lines stay together, in order.
        for pair in got.chunks(2) {
            let p = pair[0]["id"].as_str().unwrap();
            let q = pair[1]["id"].as_str().unwrap();
            assert_eq!(&p[1..], &q[1..]);
        }
        ids.extend(got.iter().map(|v| v["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(ids.len(), 80);
}

/// `probe` answers whether the first delivery could write, without writing anything that
/// stays: a folder there or makeable passes; one under a file, or on a file system that
/// refuses writes (even to root: /proc), fails, naming the folder.
#[test]
fn probe_says_whether_the_folder_can_be_written_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    destination(tmp.path(), "").probe().unwrap();
    let not_yet = tmp.path().join("a/b/out");
    destination(&not_yet, "").probe().unwrap();
    assert!(!tmp.path().join("a").exists(), "nothing made");
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no probe left"
    );

    fs::write(tmp.path().join("blocker"), b"").unwrap();
    let under_a_file = destination(&tmp.path().join("blocker/out"), "")
        .probe()
        .unwrap_err();
    assert_eq!(under_a_file.key(), "dir");
    assert!(
        under_a_file.to_string().contains("is not a directory"),
        "{under_a_file}"
    );

    let read_only = destination(Path::new("/proc/passerelle-out"), "")
        .probe()
        .unwrap_err();
    assert!(
        read_only.to_string().contains("cannot write in /proc"),
        "{read_only}"
    );
}

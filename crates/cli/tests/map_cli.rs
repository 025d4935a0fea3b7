//! `passerelle map` and `passerelle check` as a user runs them: the real binary, the
//! repository's pack and fixtures.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::fs;
use std::process::{Command, Output};

use passerelle_testkit::workspace_root;

fn passerelle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .current_dir(workspace_root())
        .args(args)
        .output()
        .expect("run passerelle")
}

#[test]
fn map_prints_one_bundle_per_message() {
    let out = passerelle(&[
        "map",
        "fixtures/hl7/adt_a01_admit.hl7",
        "fixtures/hl7/batch_bhs_only.hl7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "one bundle per message (1 + a batch of 2)");
    for line in lines {
        let bundle: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "transaction");
    }
    let pretty = passerelle(&["map", "--pretty", "fixtures/hl7/siu_s12.hl7"]);
    assert!(pretty.status.success());
    assert!(
        String::from_utf8(pretty.stdout)
            .unwrap()
            .contains("\n  \"type\": \"transaction\"")
    );
}

#[test]
fn map_site_offset_applies_to_times_without_one() {
    let out = passerelle(&[
        "map",
        "--site-offset",
        "-04:00",
        "fixtures/hl7/orm_o01_v24.hl7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("\"authoredOn\":\"2024-04-08T14:22:00-04:00\"")
    );
}

#[test]
fn map_reports_a_located_error_and_fails() {
    let dir = std::env::temp_dir().join(format!("passerelle-map-cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.hl7");
    fs::write(
        &file,
        b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||42^^^H^MR||SECRETNAME||19781399|M\r",
    )
    .unwrap();
    let out = passerelle(&[
        "map",
        file.to_str().unwrap(),
        "fixtures/hl7/adt_a01_admit.hl7",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("bad.hl7: PID (segment 2): PID-7:"),
        "{stderr}"
    );
    assert!(stderr.contains("patient.toml:"), "{stderr}");
    assert!(
        !stderr.contains("SECRETNAME") && !stderr.contains("19781399"),
        "{stderr}"
    );
    // The good file still mapped.
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_passes_on_the_repository_and_locates_problems() {
    let ok = passerelle(&["check"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8(ok.stdout).unwrap();
    let packs: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ok mappings/"))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(packs, ["fr", "v2-to-fhir"], "every pack checked: {stdout}");

    let dir = std::env::temp_dir().join(format!("passerelle-check-cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("pack.toml"),
        "[pack]\nname = \"x\"\nfhir_version = \"4.0.1\"\n",
    )
    .unwrap();
    fs::write(
        dir.join("pid.toml"),
        "[[segment]]\nname = \"PID\"\nsegment = \"PID\"\nresource = \"Patient\"\nrules = [\n  { from = \"PID-8\", vocab = \"sex\", to = \"gender\" },\n]\n",
    )
    .unwrap();
    let bad = passerelle(&["check", dir.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert!(
        stderr.contains(
            "pid.toml:6:29: segment map \"PID\", rules[0].vocab: no vocabulary named \"sex\""
        ),
        "{stderr}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

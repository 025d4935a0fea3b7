//! `passerelle parse` as a user runs it: the real binary, on every fixture.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::BTreeMap;
use std::process::{Command, Output};

use passerelle_testkit::{fixture_files, workspace_root};

fn passerelle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run passerelle")
}

fn manifest(folder: &str) -> BTreeMap<String, toml::Table> {
    let path = workspace_root()
        .join("fixtures")
        .join(folder)
        .join("expected.toml");
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Reads a value out of the JSON form by spec position (1-based), as a consumer would.
fn json_value(
    doc: &serde_json::Value,
    segment: &str,
    field: usize,
    rep: usize,
    comp: usize,
) -> Option<String> {
    let seg = doc["segments"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == segment)?;
    seg["fields"]
        .get(field - 1)?
        .get(rep - 1)?
        .get(comp - 1)?
        .get(0)?
        .as_str()
        .map(str::to_owned)
}

#[test]
fn json_form_of_every_well_formed_fixture() {
    let expected = manifest("hl7");
    let mut checked = 0;
    for file in fixture_files("hl7") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = passerelle(&["parse", "--json", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("JSON output is UTF-8");
        let docs: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let count = expected[&name]
            .get("messages")
            .map_or(1, |n| n.as_integer().unwrap() as usize);
        assert_eq!(docs.len(), count, "{name}: one JSON object per message");
        for (i, doc) in docs.iter().enumerate() {
            let key = if count > 1 {
                format!("{name}#{}", i + 1)
            } else {
                name.clone()
            };
            let values = &expected[&key];
            // Values read through the nested JSON agree with the independent oracle.
            for (path, (seg, field, rep, comp)) in [
                ("MSH-10", ("MSH", 10, 1, 1)),
                ("MSH-9.1", ("MSH", 9, 1, 1)),
                ("MSH-9.2", ("MSH", 9, 1, 2)),
                ("PID-5.1", ("PID", 5, 1, 1)),
            ] {
                if let Some(want) = values.get(path) {
                    assert_eq!(
                        json_value(doc, seg, field, rep, comp).as_deref(),
                        want.as_str(),
                        "{key}: {path}"
                    );
                    checked += 1;
                }
            }
            let fs = json_value(doc, "MSH", 1, 1, 1).unwrap();
            assert_eq!(fs.chars().count(), 1, "{key}: MSH-1 is the field separator");
            assert!(
                doc["control_id"].as_str().is_some_and(|c| !c.is_empty()),
                "{key}: control_id"
            );
        }
    }
    assert!(checked >= 80, "only {checked} values compared");
}

#[test]
fn located_error_for_every_malformed_fixture() {
    let expected = manifest("malformed");
    for file in fixture_files("malformed") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = passerelle(&["parse", "--json", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: must fail");
        assert!(
            out.stdout.is_empty(),
            "{name}: nothing printed for a broken message"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let kind = expected[&name]["kind"].as_str().unwrap();
        assert!(
            stderr.contains(&name),
            "{name}: error names the file: {stderr}"
        );
        assert!(
            stderr.contains("byte "),
            "{name}: error has an offset: {stderr}"
        );
        assert!(
            stderr.contains(&format!("[{kind}]")),
            "{name}: error names {kind}: {stderr}"
        );
        if let Some(segment) = expected[&name].get("segment") {
            assert!(
                stderr.contains(&format!("segment {}", segment.as_integer().unwrap())),
                "{name}: {stderr}"
            );
        }
    }
}

#[test]
fn path_option_prints_every_selected_value() {
    let file = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let out = passerelle(&["parse", "--path", "PID-3[*].1", file.to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 2, "several PID-3 repetitions: {lines:?}");
    let one = passerelle(&["parse", "--path", "PID-3[2].1", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8(one.stdout).unwrap().trim_end(), lines[1]);

    let bad = passerelle(&["parse", "--path", "PID-0", file.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("start at 1"));
}

#[test]
fn one_bad_file_among_good_ones_fails_the_run_but_reports_the_rest() {
    let good = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let bad = workspace_root().join("fixtures/malformed/control_nul.hl7");
    let out = passerelle(&[
        "parse",
        "--json",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "the good file is still printed"
    );
}

#[test]
fn text_form_shows_fields_as_received() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("escapes.hl7");
    // An apostrophe, an HL7 escape for the field separator, and a raw tab (a control
    // character some senders let through).
    std::fs::write(
        &file,
        b"MSH|^~\\&|APP|FAC|RCV|RF|20240101120000||ADT^A01|C1|P|2.5\rPID|1||123^^^H^MR||O'DONNELL^JOHN||19700101|M|||1 A\\F\\B ST\tX\r",
    )
    .unwrap();
    let out = passerelle(&["parse", file.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .map(|rest| rest.trim_start().to_owned())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    assert_eq!(field("MSH-2 "), "^~\\&", "{text}");
    assert_eq!(field("PID-5 "), "O'DONNELL^JOHN", "{text}");
    assert_eq!(
        field("PID-11 "),
        "1 A\\F\\B ST\\x09X",
        "the escape as sent, not a separator; the tab as \\x09: {text}"
    );
    // --path still gives the decoded value.
    let out = passerelle(&["parse", "--path", "PID-11", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "1 A|B ST\tX\n");
}

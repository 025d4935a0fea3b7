//! Every fixture against its expectations, written independently of the parser in
//! `fixtures/*/expected.toml`: the well-formed ones parse and give the expected decoded
//! values; the malformed ones fail with the expected kind and location.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::BTreeMap;
use std::path::Path as FsPath;

use passerelle_hl7::{Message, ParseOptions, Path, batch};
use passerelle_testkit::{fixture_files, workspace_root};

fn manifest(folder: &str) -> BTreeMap<String, toml::Table> {
    let path = workspace_root()
        .join("fixtures")
        .join(folder)
        .join("expected.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn file_name(path: &FsPath) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn well_formed_fixtures_parse_to_the_expected_values() {
    let expected = manifest("hl7");
    let files = fixture_files("hl7");
    assert!(
        files.len() >= 40,
        "at least 40 well-formed fixtures, found {}",
        files.len()
    );
    let mut checked_values = 0;
    for file in &files {
        let name = file_name(file);
        let bytes = std::fs::read(file).unwrap();
        let messages = batch::parse_all(&bytes, &ParseOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let entry = expected
            .get(&name)
            .unwrap_or_else(|| panic!("{name} has no entry in expected.toml"));
        if let Some(count) = entry.get("messages") {
            assert_eq!(
                messages.len() as i64,
                count.as_integer().unwrap(),
                "{name}: message count"
            );
        }
        for (i, parsed) in messages.iter().enumerate() {
            let message = parsed
                .as_ref()
                .unwrap_or_else(|e| panic!("{name} message {}: {e}", i + 1));
            let key = if messages.len() > 1 {
                format!("{name}#{}", i + 1)
            } else {
                name.clone()
            };
            let values = expected
                .get(&key)
                .unwrap_or_else(|| panic!("{key} has no entry in expected.toml"));
            for (path, want) in values {
                if path == "messages" {
                    continue;
                }
                let parsed_path: Path = path.parse().unwrap_or_else(|e| panic!("{key}: {e}"));
                let got = message.get(&parsed_path).map(|v| v.text().into_owned());
                assert_eq!(
                    got.as_deref(),
                    Some(want.as_str().unwrap()),
                    "{key}: {path}"
                );
                checked_values += 1;
            }
        }
    }
    assert!(
        checked_values >= 3 * files.len(),
        "only {checked_values} values checked"
    );
}

#[test]
fn every_manifest_entry_has_its_fixture() {
    for folder in ["hl7", "malformed"] {
        let files: Vec<String> = fixture_files(folder).iter().map(|f| file_name(f)).collect();
        for key in manifest(folder).keys() {
            let file = key.split('#').next().unwrap();
            assert!(
                files.iter().any(|f| f == file),
                "{folder}/expected.toml names {key}, which does not exist"
            );
        }
    }
}

#[test]
fn malformed_fixtures_fail_with_the_expected_located_error() {
    let expected = manifest("malformed");
    let files = fixture_files("malformed");
    assert!(
        files.len() >= 10,
        "at least 10 malformed fixtures, found {}",
        files.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        let name = file_name(file);
        let entry = expected
            .get(&name)
            .unwrap_or_else(|| panic!("{name} has no entry in expected.toml"));
        let bytes = std::fs::read(file).unwrap();
        let error = match batch::parse_all(&bytes, &ParseOptions::default()) {
            Err(e) => e,
            Ok(messages) => messages
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{name}: parsed without error")),
        };
        let want_kind = entry["kind"].as_str().unwrap();
        assert_eq!(error.kind.name(), want_kind, "{name}: {error}");
        if let Some(segment) = entry.get("segment") {
            assert_eq!(
                error.location.segment_index.map(i64::from),
                Some(segment.as_integer().unwrap()),
                "{name}: segment of {error}"
            );
        }
        if let Some(field) = entry.get("field") {
            assert_eq!(
                error.location.field.map(i64::from),
                Some(field.as_integer().unwrap()),
                "{name}: field of {error}"
            );
        }
        assert!(
            error.location.offset <= bytes.len(),
            "{name}: offset inside the input"
        );
        kinds.insert(want_kind.to_owned());
        // The error is reported without content: its text is made of our own words only.
        let text = error.to_string();
        assert!(text.starts_with("byte "), "{name}: {text}");
        // The NAK for it parses and names the problem.
        let nak = passerelle_hl7::ack::for_parse_error(&bytes, &error, &Default::default());
        let nak =
            Message::parse(&nak).unwrap_or_else(|e| panic!("{name}: NAK does not parse: {e}"));
        let code = nak.text("MSA-1").unwrap().unwrap();
        assert!(code == "AE" || code == "AR", "{name}: NAK code {code}");
        assert!(
            nak.is_valued(&"ERR-3".parse().unwrap()),
            "{name}: NAK has an ERR-3 code"
        );
    }
    for kind in [
        "empty",
        "not_hl7",
        "truncated_header",
        "bad_separators",
        "control_character",
        "invalid_segment_id",
        "missing_header_field",
        "unsupported_charset",
        "batch_count_mismatch",
        "batch_structure",
    ] {
        assert!(kinds.contains(kind), "no malformed fixture for {kind}");
    }
}

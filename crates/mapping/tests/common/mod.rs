#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]
//! Shared by the integration tests: the pack, the fixtures, mapping helpers.

use std::path::PathBuf;
use std::sync::OnceLock;

use passerelle_hl7::ParseOptions;
use passerelle_hl7::batch::parse_all;
use passerelle_mapping::{Bundle, MapOptions, Node, Pack};

pub fn pack_dir() -> PathBuf {
    passerelle_testkit::workspace_root()
        .join("mappings")
        .join("v2-to-fhir")
}

pub fn pack() -> &'static Pack {
    static PACK: OnceLock<Pack> = OnceLock::new();
    PACK.get_or_init(|| {
        Pack::load(pack_dir()).unwrap_or_else(|e| panic!("pack does not load:\n{e}"))
    })
}

/// Every message of every well-formed fixture: (name, bytes).
pub fn fixture_messages() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for file in passerelle_testkit::fixture_files("hl7") {
        let bytes = std::fs::read(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let batch = passerelle_hl7::batch::split(&bytes).unwrap();
        let many = batch.messages.len() > 1;
        for (i, m) in batch.messages.iter().enumerate() {
            let n = if many {
                format!("{name}#{}", i + 1)
            } else {
                name.clone()
            };
            out.push((n, m.bytes.to_vec()));
        }
    }
    out
}

/// Maps the single message of a fixture file.
pub fn map_fixture(name: &str) -> Bundle {
    let path = passerelle_testkit::workspace_root()
        .join("fixtures/hl7")
        .join(name);
    let bytes = std::fs::read(path).unwrap();
    let messages = parse_all(&bytes, &ParseOptions::default()).unwrap();
    let message = messages.into_iter().next().unwrap().unwrap();
    pack().map(&message, &MapOptions::default()).unwrap()
}

pub fn map_bytes(bytes: &[u8]) -> Result<Bundle, passerelle_mapping::MapError> {
    let message = passerelle_hl7::Message::parse(bytes).unwrap();
    pack().map(&message, &MapOptions::default())
}

/// Follows a dotted path with numeric indexes: `name.0.given.1`.
pub fn at<'n>(node: &'n Node, path: &str) -> Option<&'n Node> {
    path.split('.')
        .try_fold(node, |n, step| match step.parse::<usize>() {
            Ok(i) => n.items().get(i),
            Err(_) => n.get(step),
        })
}

/// The string at `path`; panics, showing the node, when there is none.
pub fn text<'n>(node: &'n Node, path: &str) -> &'n str {
    at(node, path)
        .and_then(Node::as_str)
        .unwrap_or_else(|| panic!("no string at {path} in {}", node.to_json(false)))
}

/// Runs both FHIR R4 validators over (name, bundle JSON) pairs and fails with every
/// error of every invalid bundle.
pub fn assert_all_valid(bundles: &[(String, String)]) {
    let reports = passerelle_testkit::fhir::validate(bundles);
    assert_eq!(reports.len(), bundles.len());
    let invalid: Vec<String> = reports
        .iter()
        .filter(|r| !r.errors.is_empty())
        .map(|r| format!("{}:\n  {}", r.name, r.errors.join("\n  ")))
        .collect();
    assert!(
        invalid.is_empty(),
        "{} invalid bundles:\n{}",
        invalid.len(),
        invalid.join("\n")
    );
}

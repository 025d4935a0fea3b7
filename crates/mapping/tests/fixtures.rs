#![allow(clippy::unwrap_used)]
//! Every well-formed fixture maps, every bundle passes both FHIR R4 validators with zero
//! errors, mapping is deterministic, and ids and conditional requests are stable.

mod common;

use passerelle_mapping::MapOptions;

#[test]
fn every_fixture_maps_and_validates() {
    let pack = common::pack();
    let mut bundles = Vec::new();
    let mut failures = Vec::new();
    for (name, bytes) in common::fixture_messages() {
        let message = passerelle_hl7::Message::parse(&bytes).unwrap();
        match pack.map(&message, &MapOptions::default()) {
            Ok(bundle) => bundles.push((name, bundle.to_json(false))),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "fixtures that do not map:\n{}",
        failures.join("\n")
    );
    assert!(bundles.len() >= 45, "only {} bundles", bundles.len());
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

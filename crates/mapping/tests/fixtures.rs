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
    common::assert_all_valid(&bundles);
}

/// The validators are not vacuous: a bundle broken in ways each of them catches is refused.
#[test]
fn the_validators_catch_what_they_should() {
    let good = common::map_fixture("adt_a01_admit.hl7").to_json(false);
    // A code outside a required value set: FHIR.js catches it (Medplum does not).
    let bad_gender = good.replacen(r#""gender":"male""#, r#""gender":"M""#, 1);
    // A malformed date and an unknown element: Medplum catches them.
    let bad_date = good.replacen(
        r#""birthDate":"1978-04-12""#,
        r#""birthDate":"19780412""#,
        1,
    );
    let unknown = good.replacen(r#""gender":"male""#, r#""sex":"male""#, 1);
    // A reference to a resource type the element does not allow.
    let practitioner_subject = {
        let b = common::map_fixture("adt_a01_admit.hl7");
        let json = b.to_json(false);
        let org = b
            .resources()
            .find(|r| r.get("resourceType").and_then(|t| t.as_str()) == Some("Organization"))
            .and_then(|r| r.get("id"))
            .and_then(|i| i.as_str())
            .unwrap()
            .to_owned();
        let patient_ref = json
            .split(r#""subject":{"reference":""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        json.replacen(
            &format!(r#""subject":{{"reference":"{patient_ref}"}}"#),
            &format!(r#""subject":{{"reference":"Organization/{org}"}}"#),
            1,
        )
    };
    for (name, json) in [
        ("gender", &bad_gender),
        ("date", &bad_date),
        ("unknown", &unknown),
        ("target", &practitioner_subject),
    ] {
        assert_ne!(json, &good, "{name}: the test did not break anything");
    }
    let inputs: Vec<(String, String)> = [
        ("good", good.clone()),
        ("gender", bad_gender),
        ("date", bad_date),
        ("unknown", unknown),
        ("target", practitioner_subject),
    ]
    .into_iter()
    .map(|(n, j)| (n.to_owned(), j))
    .collect();
    let reports = passerelle_testkit::fhir::validate(&inputs);
    assert!(reports[0].errors.is_empty(), "{:?}", reports[0]);
    let says = |i: usize, who: &str| reports[i].errors.iter().any(|e| e.contains(who));
    assert!(says(1, "fhir.js"), "{:?}", reports[1]);
    assert!(says(2, "medplum"), "{:?}", reports[2]);
    assert!(says(3, "medplum"), "{:?}", reports[3]);
    assert!(!reports[4].errors.is_empty(), "{:?}", reports[4]);
}

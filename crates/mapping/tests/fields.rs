#![allow(clippy::unwrap_used)]
//! Field-level checks of the v2-to-fhir pack against the guide's segment maps, one
//! fixture per segment family.

mod common;
use common::{at, text};

use passerelle_mapping::{Bundle, Node};

/// The resources of one type, in bundle order.
fn of_type<'b>(bundle: &'b Bundle, t: &str) -> Vec<&'b Node> {
    bundle
        .resources()
        .filter(|r| r.get("resourceType").and_then(Node::as_str) == Some(t))
        .collect()
}

fn json(node: &Node, path: &str) -> String {
    at(node, path)
        .map(|n| n.to_json(false))
        .unwrap_or_else(|| panic!("nothing at {path} in {}", node.to_json(false)))
}

/// The fullUrl of the single resource of type `t`.
fn url_of(bundle: &Bundle, t: &str) -> String {
    let entries = bundle.as_node().get("entry").unwrap().items();
    let found: Vec<&Node> = entries
        .iter()
        .filter(|e| text(e, "resource.resourceType") == t)
        .collect();
    assert_eq!(found.len(), 1, "expected one {t}");
    text(found[0], "fullUrl").to_owned()
}

#[test]
fn pid_to_patient() {
    let b = common::map_fixture("adt_a01_admit.hl7");
    let p = of_type(&b, "Patient")[0];
    assert_eq!(text(p, "identifier.0.value"), "RB1002341");
    assert_eq!(text(p, "identifier.0.system"), "urn:oid:2.999.1.10");
    assert_eq!(text(p, "identifier.0.type.coding.0.code"), "MR");
    assert_eq!(text(p, "identifier.1.system"), "urn:oid:2.999.1.11");
    assert_eq!(text(p, "name.0.family"), "WHITFIELD");
    assert_eq!(json(p, "name.0.given"), r#"["Marcus","Allen"]"#);
    assert_eq!(text(p, "name.0.use"), "official");
    assert_eq!(text(p, "name.0.suffix.0"), "Jr");
    assert_eq!(text(p, "name.1.use"), "nickname");
    assert_eq!(text(p, "gender"), "male");
    assert_eq!(text(p, "birthDate"), "1978-04-12");
    assert_eq!(
        json(p, "address.0.line"),
        r#"["1847 Larkspur Lane","Apt 3B"]"#
    );
    assert_eq!(text(p, "address.0.district"), "MONTGOMERY");
    assert_eq!(text(p, "address.0.use"), "home");
    assert_eq!(text(p, "telecom.0.system"), "phone");
    assert_eq!(text(p, "telecom.0.use"), "home");
    assert_eq!(text(p, "telecom.1.use"), "mobile");
    assert_eq!(text(p, "telecom.2.system"), "email");
    assert_eq!(text(p, "telecom.2.value"), "m.whitfield@example.com");
    assert_eq!(text(p, "maritalStatus.coding.0.code"), "M");
    assert_eq!(
        text(p, "maritalStatus.coding.0.system"),
        "http://terminology.hl7.org/CodeSystem/v2-0002"
    );
    // PD1-3 and PD1-4 merged into the same Patient as generalPractitioner references.
    assert_eq!(at(p, "generalPractitioner").unwrap().items().len(), 2);
    // Conditional update on the first identifier, no id in the body.
    assert!(p.get("id").is_none());
}

#[test]
fn explicit_nulls_are_left_out() {
    let b = common::map_fixture("adt_a08_update_nulls_v231.hl7");
    let p = of_type(&b, "Patient")[0];
    // PID-5[2], PID-13, PID-14, PID-16 and PID-19 are "": nothing is written for them.
    assert_eq!(at(p, "name").unwrap().items().len(), 1);
    assert!(p.get("telecom").is_none());
    assert!(p.get("maritalStatus").is_none());
    assert_eq!(at(p, "identifier").unwrap().items().len(), 1);
    assert!(!b.to_json(false).contains("\"\\\"\\\"\""));
}

#[test]
fn pv1_to_encounter_with_participants_and_location() {
    let b = common::map_fixture("adt_a01_admit.hl7");
    let e = of_type(&b, "Encounter")[0];
    assert_eq!(text(e, "status"), "in-progress");
    assert_eq!(text(e, "class.code"), "IMP");
    assert_eq!(
        text(e, "class.system"),
        "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    );
    assert_eq!(text(e, "identifier.0.value"), "V240311-0042");
    assert_eq!(text(e, "identifier.0.type.coding.0.code"), "VN");
    assert_eq!(text(e, "period.start"), "2024-03-11T08:30:00-05:00");
    assert_eq!(text(e, "subject.reference"), url_of(&b, "Patient"));
    let kinds: Vec<&str> = at(e, "participant")
        .unwrap()
        .items()
        .iter()
        .filter_map(|p| at(p, "type.0.coding.0.code").and_then(Node::as_str))
        .collect();
    assert_eq!(kinds, ["ATND", "REF", "ADM"]);
    // The attending doctor of PV1-7 and the ROL-4 person are one Practitioner.
    let practitioners = of_type(&b, "Practitioner");
    let abernathy: Vec<_> = practitioners
        .iter()
        .filter(|p| text(p, "name.0.family") == "ABERNATHY")
        .collect();
    assert_eq!(abernathy.len(), 1);
    assert_eq!(text(abernathy[0], "identifier.0.value"), "D30981");
    assert_eq!(text(e, "location.0.status"), "active");
    let loc = of_type(&b, "Location")[0];
    assert_eq!(text(loc, "name"), "4WEST 412 B");
    // PV2-3 merged into the Encounter.
    assert_eq!(text(e, "reasonCode.0.coding.0.code"), "R07.9");
    let conditional = b
        .to_json(false)
        .contains(r#""url":"Encounter?identifier=urn:oid:2.999.1.10.2|V240311-0042""#);
    assert!(conditional);
}

#[test]
fn pid_18_to_account_of_the_patient_and_the_visit() {
    let b = common::map_fixture("adt_a01_admit.hl7");
    let account = of_type(&b, "Account")[0];
    assert_eq!(text(account, "identifier.0.value"), "A240311-0042");
    assert_eq!(text(account, "identifier.0.system"), "urn:oid:2.999.1.10.3");
    assert_eq!(text(account, "identifier.0.type.coding.0.code"), "AN");
    assert_eq!(text(account, "status"), "active");
    assert_eq!(text(account, "subject.0.reference"), url_of(&b, "Patient"));
    let encounter = of_type(&b, "Encounter")[0];
    assert_eq!(
        text(encounter, "account.0.reference"),
        url_of(&b, "Account")
    );
    assert!(
        b.to_json(false)
            .contains(r#""url":"Account?identifier=urn:oid:2.999.1.10.3|A240311-0042""#),
        "every message of the stay updates one Account"
    );
    // No account number, no Account.
    let minimal = common::map_fixture("adt_a01_minimal.hl7");
    assert!(of_type(&minimal, "Account").is_empty());
    assert!(at(of_type(&minimal, "Encounter")[0], "account").is_none());
}

#[test]
fn discharge_and_cancel_set_the_encounter_status() {
    let discharged = common::map_fixture("adt_a03_discharge.hl7");
    let e = of_type(&discharged, "Encounter")[0];
    assert_eq!(text(e, "status"), "finished");
    assert!(at(e, "period.end").is_some());
    let cancelled = common::map_fixture("adt_a11_cancel_admit.hl7");
    assert_eq!(
        text(of_type(&cancelled, "Encounter")[0], "status"),
        "cancelled"
    );
}

#[test]
fn nk1_al1_dg1_pr1_in1() {
    let b = common::map_fixture("adt_a01_admit.hl7");
    let patient = url_of(&b, "Patient");
    let nk = of_type(&b, "RelatedPerson");
    assert_eq!(nk.len(), 2);
    assert_eq!(text(nk[0], "name.0.given.0"), "Denise");
    assert_eq!(text(nk[0], "relationship.0.coding.0.code"), "SPO");
    assert_eq!(text(nk[0], "relationship.1.coding.0.code"), "EC");
    assert_eq!(text(nk[0], "patient.reference"), patient);

    let al = of_type(&b, "AllergyIntolerance");
    assert_eq!(al.len(), 2);
    assert_eq!(text(al[0], "category.0"), "medication");
    assert_eq!(text(al[0], "criticality"), "high");
    assert_eq!(text(al[0], "code.coding.0.code"), "7980");
    assert_eq!(
        text(al[0], "code.coding.0.system"),
        "http://www.nlm.nih.gov/research/umls/rxnorm"
    );
    assert_eq!(text(al[0], "reaction.0.manifestation.1.text"), "Wheezing");
    assert_eq!(text(al[0], "reaction.0.severity"), "severe");
    assert_eq!(text(al[0], "onsetDateTime"), "2009-06-15");
    assert_eq!(text(al[1], "category.0"), "food");
    assert_eq!(
        text(al[1], "code.coding.0.system"),
        "http://snomed.info/sct"
    );

    let dg = of_type(&b, "Condition");
    assert_eq!(dg.len(), 2);
    assert_eq!(text(dg[0], "code.coding.0.code"), "R07.9");
    assert_eq!(
        text(dg[0], "code.coding.0.system"),
        "http://hl7.org/fhir/sid/icd-10"
    );
    assert_eq!(
        text(dg[0], "category.0.coding.0.code"),
        "encounter-diagnosis"
    );
    assert_eq!(
        text(dg[1], "verificationStatus.coding.0.code"),
        "provisional"
    );
    assert_eq!(text(dg[0], "encounter.reference"), url_of(&b, "Encounter"));

    let pr = of_type(&b, "Procedure")[0];
    assert_eq!(text(pr, "code.coding.0.code"), "93000");
    assert_eq!(text(pr, "performedDateTime"), "2024-03-11T08:40:00-05:00");
    assert_eq!(text(pr, "status"), "completed");

    let cov = of_type(&b, "Coverage")[0];
    assert_eq!(text(cov, "status"), "active");
    assert_eq!(text(cov, "beneficiary.reference"), patient);
    assert_eq!(text(cov, "relationship.coding.0.code"), "self");
    assert_eq!(text(cov, "class.0.value"), "BMH-PPO-G");
    assert_eq!(text(cov, "class.1.value"), "GRP-88213");
    assert_eq!(text(cov, "period.start"), "2024-01-01");
    let payor = text(cov, "payor.0.reference");
    let org = b
        .as_node()
        .get("entry")
        .unwrap()
        .items()
        .iter()
        .find(|e| text(e, "fullUrl") == payor)
        .unwrap();
    assert_eq!(text(org, "resource.name"), "Buckeye Mutual Health");
}

#[test]
fn msh_to_message_header() {
    let b = common::map_fixture("adt_a01_admit.hl7");
    let h = of_type(&b, "MessageHeader")[0];
    assert_eq!(text(h, "eventCoding.code"), "A01");
    assert_eq!(text(h, "source.name"), "RBG_ADT");
    assert_eq!(text(h, "focus.0.reference"), url_of(&b, "Patient"));
    assert_eq!(text(h, "focus.1.reference"), url_of(&b, "Encounter"));
}

#[test]
fn oru_groups_attach_each_obx_to_its_own_obr() {
    let b = common::map_fixture("oru_r01_chemistry.hl7");
    let reports = of_type(&b, "DiagnosticReport");
    let observations = of_type(&b, "Observation");
    assert_eq!(reports.len(), 3);
    assert_eq!(observations.len(), 11);
    let counts: Vec<usize> = reports
        .iter()
        .map(|r| at(r, "result").unwrap().items().len())
        .collect();
    assert_eq!(counts, [5, 3, 3]);
    let entries = b.as_node().get("entry").unwrap().items();
    let url_of_obs = |i: usize| {
        entries
            .iter()
            .filter(|e| text(e, "resource.resourceType") == "Observation")
            .nth(i)
            .map(|e| text(e, "fullUrl"))
            .unwrap()
    };
    assert_eq!(text(reports[1], "result.0.reference"), url_of_obs(5));
    // Each report points at its own specimen.
    let specimens = of_type(&b, "Specimen");
    assert_eq!(specimens.len(), 3);
    assert_eq!(text(specimens[1], "type.coding.0.code"), "122555007");
    assert_eq!(text(reports[0], "status"), "final");
    assert_eq!(text(reports[0], "code.coding.0.system"), "http://loinc.org");
    assert_eq!(text(reports[0], "category.0.coding.0.code"), "CH");
}

#[test]
fn obx_values_units_ranges_interpretation_notes() {
    let b = common::map_fixture("oru_r01_chemistry.hl7");
    let obs = of_type(&b, "Observation");
    let glucose = obs[0];
    assert_eq!(json(glucose, "valueQuantity.value"), "6.8");
    assert_eq!(text(glucose, "valueQuantity.code"), "mmol/L");
    assert_eq!(
        text(glucose, "valueQuantity.system"),
        "http://unitsofmeasure.org"
    );
    assert_eq!(json(glucose, "referenceRange.0.low.value"), "3.9");
    assert_eq!(json(glucose, "referenceRange.0.high.value"), "5.5");
    assert_eq!(text(glucose, "interpretation.0.coding.0.code"), "H");
    assert_eq!(text(glucose, "status"), "final");
    assert_eq!(
        text(glucose, "effectiveDateTime"),
        "2024-03-12T05:05:00-05:00"
    );
    assert!(text(glucose, "note.0.text").starts_with("Patient reported a meal"));
    // 4.0 keeps its trailing zero: FHIR decimals keep precision.
    assert_eq!(json(obs[5], "referenceRange.0.low.value"), "4.0");
    assert_eq!(
        text(obs[8], "valueCodeableConcept.coding.0.code"),
        "278149003"
    );
    assert!(text(obs[10], "valueString").starts_with("Specimen valid"));
    // The OBR-level NTE goes to the order, not to an observation.
    let sr = of_type(&b, "ServiceRequest")[0];
    assert!(text(sr, "note.0.text").contains("hemolyzed"));
    assert_eq!(text(sr, "intent"), "order");
}

#[test]
fn structured_numeric_values() {
    let b = common::map_fixture("oru_r01_microbiology.hl7");
    let obs = of_type(&b, "Observation");
    let count = obs[1];
    assert_eq!(text(count, "valueQuantity.comparator"), ">");
    assert_eq!(json(count, "valueQuantity.value"), "100000");
    assert_eq!(text(count, "valueQuantity.code"), "{CFU}/mL");
    assert_eq!(text(obs[3], "valueQuantity.comparator"), "<=");
}

#[test]
fn text_report_joins_repetitions() {
    let b = common::map_fixture("oru_r01_text_report.hl7");
    let obs = of_type(&b, "Observation");
    let joined = obs
        .iter()
        .filter_map(|o| at(o, "valueString").and_then(Node::as_str))
        .find(|s| s.contains('\n'));
    assert!(joined.is_some_and(|s| s.lines().count() == 4), "{obs:?}");
}

#[test]
fn orders_and_specimens() {
    let b = common::map_fixture("oml_o21.hl7");
    let sr = of_type(&b, "ServiceRequest");
    assert_eq!(sr.len(), 2);
    assert_eq!(text(sr[0], "status"), "active");
    assert_eq!(text(sr[0], "priority"), "routine");
    assert_eq!(text(sr[0], "identifier.0.type.coding.0.code"), "PLAC");
    assert_eq!(
        text(sr[0], "occurrenceDateTime"),
        "2024-04-09T10:00:00-04:00"
    );
    assert_eq!(at(sr[0], "specimen").unwrap().items().len(), 1);
    assert_eq!(at(sr[1], "specimen").unwrap().items().len(), 1);
    assert_ne!(json(sr[0], "specimen"), json(sr[1], "specimen"));
    assert_eq!(at(sr[0], "supportingInfo").unwrap().items().len(), 1);
    assert!(sr[1].get("supportingInfo").is_none());

    let orm = common::map_fixture("orm_o01_v24.hl7");
    let sr = of_type(&orm, "ServiceRequest")[0];
    assert_eq!(
        text(sr, "code.coding.0.system"),
        "http://www.ama-assn.org/go/cpt"
    );
    assert_eq!(text(sr, "reasonCode.0.coding.0.code"), "R51.9");
    assert_eq!(text(sr, "requester.reference").len(), 45);
    assert!(text(sr, "note.1.text").contains("claustrophobic"));
    // ORM v2.4 sends no UTC offset: the pack's site offset (+00:00) is used.
    assert_eq!(text(sr, "authoredOn"), "2024-04-08T14:22:00Z");
    assert_eq!(at(sr, "reasonReference").unwrap().items().len(), 1);
}

#[test]
fn rxa_to_immunization() {
    let b = common::map_fixture("vxu_v04.hl7");
    let imm = of_type(&b, "Immunization")[0];
    assert_eq!(text(imm, "status"), "completed");
    assert_eq!(text(imm, "vaccineCode.coding.0.code"), "150");
    assert_eq!(
        text(imm, "vaccineCode.coding.0.system"),
        "http://hl7.org/fhir/sid/cvx"
    );
    assert_eq!(text(imm, "occurrenceDateTime"), "2024-10-15T10:20:00-04:00");
    assert_eq!(json(imm, "doseQuantity.value"), "0.5");
    assert_eq!(text(imm, "lotNumber"), "U7742AB");
    assert_eq!(text(imm, "route.coding.0.code"), "C28161");
    assert_eq!(json(imm, "primarySource"), "true");
    assert_eq!(text(imm, "performer.0.function.coding.0.code"), "AP");
    let obs = of_type(&b, "Observation");
    assert_eq!(obs.len(), 4);
    assert_eq!(
        text(obs[0], "partOf.0.reference"),
        url_of(&b, "Immunization")
    );
}

#[test]
fn txa_and_ed_to_document_reference() {
    let b = common::map_fixture("mdm_t02_pdf.hl7");
    let d = of_type(&b, "DocumentReference")[0];
    assert_eq!(text(d, "status"), "current");
    assert_eq!(text(d, "docStatus"), "final");
    assert_eq!(text(d, "masterIdentifier.value"), "DOC-2024-031455");
    assert_eq!(
        text(d, "content.0.attachment.contentType"),
        "application/pdf"
    );
    assert!(text(d, "content.0.attachment.data").starts_with("JVBERi0xLjQK"));
    assert!(text(d, "content.0.attachment.data").ends_with("=="));
    assert_eq!(
        text(d, "content.0.attachment.title"),
        "DS_WHITFIELD_20240314.pdf"
    );
    assert_eq!(text(d, "subject.reference"), url_of(&b, "Patient"));
}

#[test]
fn sch_to_appointment() {
    let b = common::map_fixture("siu_s12.hl7");
    let a = of_type(&b, "Appointment")[0];
    assert_eq!(text(a, "status"), "booked");
    assert_eq!(text(a, "start"), "2024-04-02T09:30:00-05:00");
    assert_eq!(text(a, "end"), "2024-04-02T10:00:00-05:00");
    assert_eq!(json(a, "minutesDuration"), "30");
    assert!(text(a, "comment").starts_with("Bring current medication"));
    let participants = at(a, "participant").unwrap().items();
    // AIP (practitioner), AIL (location), AIG (type only), then the patient.
    assert_eq!(participants.len(), 4);
    assert!(participants.iter().all(|p| text(p, "status") == "accepted"));
    assert_eq!(
        text(&participants[3], "actor.reference"),
        url_of(&b, "Patient")
    );
}

#[test]
fn merge_links_both_records() {
    let b = common::map_fixture("adt_a40_merge.hl7");
    let patients = of_type(&b, "Patient");
    assert_eq!(patients.len(), 2);
    assert_eq!(text(patients[0], "link.0.type"), "replaces");
    assert_eq!(text(patients[1], "link.0.type"), "replaced-by");
    assert_eq!(json(patients[1], "active"), "false");
    assert_eq!(text(patients[1], "identifier.0.value"), "RB1009981");
    let json = b.to_json(false);
    assert!(json.contains(r#""url":"Patient?identifier=urn:oid:2.999.1.10|RB1009981""#));
}

#[test]
fn charsets_and_escapes_are_decoded() {
    let b = common::map_fixture("fr_pam_a28_utf8.hl7");
    let p = of_type(&b, "Patient")[0];
    assert_eq!(text(p, "name.0.family"), "GONÇALVES");
    assert_eq!(text(p, "name.0.given.1"), "João Miguel");
    assert!(
        at(p, "identifier")
            .unwrap()
            .items()
            .iter()
            .any(|i| text(i, "system") == "urn:oid:1.2.250.1.213.1.4.8")
    );
    let latin = common::map_fixture("latin1_oru_r01.hl7");
    let p = of_type(&latin, "Patient")[0];
    assert_eq!(text(p, "name.0.family"), "MÜLLER NÚÑEZ");
    assert_eq!(text(p, "name.0.given.0"), "Søren");
    let obs = of_type(&latin, "Observation");
    assert!(
        obs.iter()
            .any(|o| at(o, "valueString").and_then(Node::as_str)
                == Some("Remarque : café pris avant le prélèvement"))
    );
}

/// A result sent as a document (OBX-2 ED) lands in its own report's presentedForm (R4's
/// Observation has no attachment value), not in the other order's report.
#[test]
fn an_ed_result_becomes_its_reports_presented_form() {
    let b = common::map_fixture("oru_r01_pdf_report.hl7");
    let reports = of_type(&b, "DiagnosticReport");
    assert_eq!(reports.len(), 2);
    let (chemistry, imaging) = (reports[0], reports[1]);
    assert_eq!(text(chemistry, "code.coding.0.code"), "24321-2");
    assert!(at(chemistry, "presentedForm").is_none());
    assert_eq!(text(imaging, "code.coding.0.code"), "36643-5");
    assert_eq!(
        text(imaging, "presentedForm.0.contentType"),
        "application/pdf"
    );
    assert!(text(imaging, "presentedForm.0.data").starts_with("JVBERi0xLjQK"));
    assert!(at(imaging, "presentedForm.1").is_none());
}

#![allow(clippy::unwrap_used)]
//! The `fr` pack (IHE PAM FR 2.11 → fr-core) over the French fixtures: every message maps
//! and every bundle passes both FHIR R4 validators with zero errors; then field-level
//! checks of identifiers (INS only for a qualified identity), identity reliability,
//! names, movements and their cancellations, pending (planned) movements and tracking,
//! merges, documents and character sets.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{at, text};
use passerelle_mapping::{Bundle, MapOptions, Node, Pack};

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

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(
        passerelle_testkit::workspace_root()
            .join("fixtures/fr")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn map(name: &str) -> Bundle {
    map_bytes(name, &fixture_bytes(name))
}

fn map_bytes(name: &str, bytes: &[u8]) -> Bundle {
    let message = passerelle_hl7::Message::parse(bytes).unwrap();
    pack()
        .map(&message, &MapOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A fixture's bytes with every `from` replaced by `to` (ASCII edits keep the charset).
fn edited(name: &str, edits: &[(&str, &str)]) -> Vec<u8> {
    let mut text: Vec<u8> = fixture_bytes(name);
    for (from, to) in edits {
        let at = text
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("{name} has no {from}"));
        text.splice(at..at + from.len(), to.bytes());
    }
    text
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
    // The edited messages of the pending / tracking tests validate too.
    for (name, bytes) in [
        ("A16 with PV1-45", a16_with_pv1_45()),
        ("Z99 over A15", z99_over_a15()),
        ("A10 with a ZBE", a10_with_zbe()),
    ] {
        bundles.push((name.to_owned(), map_bytes(name, &bytes).to_json(false)));
    }
    common::assert_all_valid(&bundles);
}

/// The bundle entries whose resource has this type.
fn entries<'b>(bundle: &'b Bundle, resource_type: &str) -> Vec<&'b Node> {
    bundle
        .as_node()
        .get("entry")
        .unwrap()
        .items()
        .iter()
        .filter(|e| text(e, "resource.resourceType") == resource_type)
        .collect()
}

/// The one entry whose request URL is `url` (conditional updates name their identifier).
fn entry<'b>(bundle: &'b Bundle, url: &str) -> &'b Node {
    let all = bundle.as_node().get("entry").unwrap().items();
    let found: Vec<&Node> = all
        .iter()
        .filter(|e| text(e, "request.url") == url)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one entry {url} in {}",
        bundle.to_json(false)
    );
    found[0]
}

fn resource<'b>(bundle: &'b Bundle, url: &str) -> &'b Node {
    entry(bundle, url).get("resource").unwrap()
}

/// The resource a reference (`urn:uuid:…`) points to, inside the bundle.
fn follow<'b>(bundle: &'b Bundle, reference: &Node) -> &'b Node {
    let target = text(reference, "reference");
    bundle
        .as_node()
        .get("entry")
        .unwrap()
        .items()
        .iter()
        .find(|e| text(e, "fullUrl") == target)
        .and_then(|e| e.get("resource"))
        .unwrap_or_else(|| panic!("{target} is not in the bundle"))
}

const IPP: &str = "urn:oid:2.999.250.1.10";
const NDA: &str = "urn:oid:2.999.250.1.10.2";
const MVT: &str = "urn:oid:2.999.250.1.10.4";
const FR_V2_0203: &str = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203";
const PROFILE: &str = "https://hl7.fr/ig/fhir/core/StructureDefinition/";

fn patient_url(ipp: &str) -> String {
    format!("Patient?identifier={IPP}|{ipp}")
}

fn visit_url(number: &str) -> String {
    format!("Encounter?identifier={NDA}|{number}")
}

fn movement_url(id: &str) -> String {
    format!("Encounter?identifier={MVT}|{id}")
}

/// The identifiers of a resource whose type code is `code`.
fn identifiers_typed<'n>(resource: &'n Node, code: &str) -> Vec<&'n Node> {
    resource
        .get("identifier")
        .map(|i| i.items())
        .unwrap_or(&[])
        .iter()
        .filter(|i| at(i, "type.coding.0.code").and_then(Node::as_str) == Some(code))
        .collect()
}

fn profiles(resource: &Node) -> Vec<&str> {
    at(resource, "meta.profile")
        .map(|p| p.items().iter().filter_map(Node::as_str).collect())
        .unwrap_or_default()
}

/// The value of sub-extension `name` of the extension `url`, as JSON.
fn sub_extension(resource: &Node, url: &str, name: &str) -> Option<String> {
    let ext = resource
        .get("extension")?
        .items()
        .iter()
        .find(|e| e.get("url").and_then(Node::as_str) == Some(url))?;
    let sub = ext
        .get("extension")?
        .items()
        .iter()
        .find(|e| e.get("url").and_then(Node::as_str) == Some(name))?;
    match sub {
        Node::Obj(members) => members
            .iter()
            .find(|(k, _)| k.as_str().starts_with("value"))
            .map(|(_, v)| v.to_json(false)),
        _ => None,
    }
}

fn identity_status(patient: &Node) -> String {
    sub_extension(
        patient,
        &format!("{PROFILE}fr-core-identity-reliability"),
        "identityStatus",
    )
    .unwrap_or_else(|| panic!("no identityStatus in {}", patient.to_json(false)))
}

#[test]
fn ins_is_kept_only_for_a_qualified_identity() {
    // VALI: the INS-NIR is kept, official, typed INS-NIR; the identity is qualified.
    let b = map("fr_01_a28_create_vali_utf8.hl7");
    let p = resource(&b, &patient_url("0002847561"));
    let ins = identifiers_typed(p, "INS-NIR");
    assert_eq!(ins.len(), 1, "{}", p.to_json(false));
    assert_eq!(text(ins[0], "system"), "urn:oid:1.2.250.1.213.1.4.8");
    assert_eq!(text(ins[0], "use"), "official");
    assert_eq!(text(ins[0], "type.coding.0.system"), FR_V2_0203);
    assert_eq!(text(ins[0], "value"), "285039911234575");
    assert!(identity_status(p).contains(r#""code":"QUAL""#));
    assert!(
        profiles(p)
            .contains(&"https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins")
    );
    // The IPP comes first: the conditional update matches on it.
    assert_eq!(text(p, "identifier.0.type.coding.0.code"), "PI");
    assert_eq!(text(p, "identifier.0.use"), "usual");
    assert_eq!(text(p, "identifier.0.system"), IPP);

    // PROV: the INS sent is dropped, the billing NIR (NH) kept apart, never as an INS.
    let b = map("fr_03_a28_prov_ins_dropped.hl7");
    let p = resource(&b, &patient_url("0002911830"));
    let json = p.to_json(false);
    assert!(!json.contains("INS-NIR"), "{json}");
    let nh = identifiers_typed(p, "NH");
    assert_eq!(nh.len(), 1, "{json}");
    assert_eq!(text(nh[0], "use"), "secondary");
    assert_eq!(p.get("identifier").unwrap().items().len(), 2, "{json}");
    assert!(identity_status(p).contains(r#""code":"PROV""#));
    assert!(!profiles(p).iter().any(|x| x.ends_with("-ins")), "{json}");

    // INS-NIA: temporary, VALI in the second... or first repetition of PID-32 both count.
    let b = map("fr_04_a31_nia_temp.hl7");
    let p = resource(&b, &patient_url("0002930017"));
    let nia = identifiers_typed(p, "INS-NIA");
    assert_eq!(nia.len(), 1, "{}", p.to_json(false));
    assert_eq!(text(nia[0], "use"), "temp");
    assert_eq!(text(nia[0], "system"), "urn:oid:1.2.250.1.213.1.4.9");
    let tags: Vec<&str> = at(p, "meta.tag")
        .unwrap()
        .items()
        .iter()
        .map(|t| text(t, "code"))
        .collect();
    assert_eq!(tags, ["VALI", "DOUB"]);

    // Test and demonstration INS: their own OIDs and types.
    for (file, ipp, system, code) in [
        (
            "fr_05_a28_test_ins.hl7",
            "0002930025",
            "urn:oid:1.2.250.1.213.1.4.10",
            "INS-NIR-TEST",
        ),
        (
            "fr_06_a28_demo_ins.hl7",
            "0002930033",
            "urn:oid:1.2.250.1.213.1.4.11",
            "INS-NIR-DEMO",
        ),
    ] {
        let b = map(file);
        let p = resource(&b, &patient_url(ipp));
        let ins = identifiers_typed(p, code);
        assert_eq!(ins.len(), 1, "{file}: {}", p.to_json(false));
        assert_eq!(text(ins[0], "system"), system, "{file}");
    }

    // A47: the INS is removed (PID-3 sends "" with the INS OID, PID-32 PROV).
    let b = map("fr_08_a47_ins_removed.hl7");
    let p = resource(&b, &patient_url("0002930017"));
    let json = p.to_json(false);
    assert!(!json.contains("1.2.250.1.213.1.4.9"), "{json}");
    assert_eq!(p.get("identifier").unwrap().items().len(), 1, "{json}");
    assert!(identity_status(p).contains(r#""code":"PROV""#));
}

#[test]
fn identity_reliability_carries_the_insi_traceability() {
    let b = map("fr_12_a01_admit_8859-15.hl7");
    let p = resource(&b, &patient_url("0002847561"));
    let url = format!("{PROFILE}fr-core-identity-reliability");
    let method = sub_extension(p, &url, "methodCollection").unwrap();
    assert!(method.contains(r#""code":"INSI""#), "{method}");
    assert_eq!(
        sub_extension(p, &url, "dateInterrogationINSi").unwrap(),
        r#""2025-01-14T09:20:10+01:00""#
    );
    // ZFA (DMP) and ZFD (identity document) kept as extensions.
    let dmp = "urn:passerelle:fr:StructureDefinition:dmp";
    assert_eq!(sub_extension(p, dmp, "status").unwrap(), r#""ACTIF""#);
    assert_eq!(sub_extension(p, dmp, "readConsent").unwrap(), r#""IC""#);
    let more = "urn:passerelle:fr:StructureDefinition:identity-complement";
    assert_eq!(
        sub_extension(p, more, "identityDocument").unwrap(),
        r#""CN""#
    );
    assert_eq!(
        sub_extension(p, more, "identityDocumentExpiry").unwrap(),
        r#""2031-06-02""#
    );
    // ZFD-1 lunar birth date: day and month unknown.
    let b = map("fr_40_a01_historic.hl7");
    let p = resource(&b, &patient_url("0003200077"));
    let lunar = "urn:passerelle:fr:StructureDefinition:lunar-birth-date";
    assert_eq!(sub_extension(p, lunar, "year").unwrap(), "1948");
    assert_eq!(sub_extension(p, lunar, "day").unwrap(), "0");
}

#[test]
fn names_birth_used_and_cleared() {
    let b = map("fr_01_a28_create_vali_utf8.hl7");
    let p = resource(&b, &patient_url("0002847561"));
    assert_eq!(text(p, "name.0.use"), "official");
    assert_eq!(text(p, "name.0.family"), "LEFÈVRE");
    assert_eq!(text(p, "name.0.given.0"), "Hélène");
    assert_eq!(
        text(p, "name.0.extension.0.valueString"),
        "Hélène Françoise"
    );
    assert_eq!(text(p, "name.1.use"), "usual");
    assert_eq!(text(p, "name.1.family"), "DUCŒUR");
    // The birth place (XAD type BDL) is an extension, not an address.
    assert_eq!(p.get("address").unwrap().items().len(), 1);
    assert_eq!(text(p, "extension.1.valueAddress.district"), "25056");
    // A31 clears the used name with "": only the birth name is left.
    let b = map("fr_02_a31_clear_used_name.hl7");
    let p = resource(&b, &patient_url("0002847561"));
    let names = p.get("name").unwrap().items();
    assert_eq!(names.len(), 1, "{}", p.to_json(false));
    assert_eq!(text(&names[0], "use"), "official");
}

#[test]
fn professionals_and_the_declared_gp() {
    let b = map("fr_01_a28_create_vali_utf8.hl7");
    let p = resource(&b, &patient_url("0002847561"));
    let gp = follow(&b, at(p, "generalPractitioner.0").unwrap());
    assert_eq!(
        text(gp, "identifier.0.system"),
        "urn:oid:1.2.250.1.71.4.2.1"
    );
    assert_eq!(text(gp, "identifier.0.value"), "810099900025");
    assert_eq!(text(gp, "identifier.0.type.coding.0.code"), "IDNPS");
    assert_eq!(text(gp, "name.0.given.0"), "Françoise");
    assert!(
        profiles(gp)
            .contains(&"https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner")
    );
    // A legacy ADELI number is also a national id (IDNPS), kept as sent.
    let b = map("fr_22_a54_change_doctor.hl7");
    let adeli: Vec<&Node> = entries(&b, "Practitioner")
        .into_iter()
        .filter(|e| text(e, "resource.identifier.0.value") == "099990004")
        .collect();
    assert_eq!(adeli.len(), 1);
    assert_eq!(
        text(adeli[0], "resource.identifier.0.type.coding.0.code"),
        "IDNPS"
    );
    // PV1-7 and PV1-17 name the same doctor: one Practitioner.
    let b = map("fr_12_a01_admit_8859-15.hl7");
    let bernard = entries(&b, "Practitioner")
        .into_iter()
        .filter(|e| text(e, "resource.identifier.0.value") == "810099900017")
        .count();
    assert_eq!(bernard, 1);
}

/// Visit status, movement status and the movement's visit, for each file of the stay.
fn stay(file: &str, movement: &str) -> (String, String, String) {
    let b = map(file);
    let visit = entry(&b, &visit_url("250001473"));
    let mvt = resource(&b, &movement_url(movement));
    assert_eq!(
        text(mvt, "partOf.reference"),
        text(visit, "fullUrl"),
        "{file}: the movement is part of the visit"
    );
    assert_eq!(text(mvt, "identifier.0.type.coding.0.code"), "MN");
    assert_eq!(
        text(visit, "resource.identifier.0.type.coding.0.code"),
        "VN"
    );
    let visit_status = text(visit, "resource.status").to_owned();
    let class = text(mvt, "class.code").to_owned();
    (visit_status, text(mvt, "status").to_owned(), class)
}

#[test]
fn movements_chain_and_cancellations_act_on_their_original() {
    let s = |f: &str, m: &str| {
        let (v, m, _) = stay(f, m);
        (v, m)
    };
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        s("fr_12_a01_admit_8859-15.hl7", "MVT-250114-0007"),
        pair("in-progress", "in-progress")
    );
    // A02 then A12: the same movement (same conditional URL), now entered in error.
    assert_eq!(
        s("fr_13_a02_transfer.hl7", "MVT-250115-0031"),
        pair("in-progress", "in-progress")
    );
    assert_eq!(
        s("fr_14_a12_cancel_transfer.hl7", "MVT-250115-0031"),
        pair("in-progress", "entered-in-error")
    );
    // Z99 updates the movement of the second A02: same URL, new start, new care UF.
    let before = map("fr_15_a02_transfer_again.hl7");
    let after = map("fr_16_z99_update_movement.hl7");
    let url = movement_url("MVT-250116-0044");
    let (m1, m2) = (resource(&before, &url), resource(&after, &url));
    assert_eq!(text(m1, "period.start"), "2025-01-16T09:45:00+01:00");
    assert_eq!(text(m2, "period.start"), "2025-01-16T09:30:00+01:00");
    assert_eq!(text(m2, "status"), "in-progress");
    assert_eq!(
        text(m2, "type.0.coding.0.code"),
        "A02",
        "the original trigger"
    );
    let care_uf = |b: &Bundle, m: &Node| {
        let ext = m
            .get("extension")
            .unwrap()
            .items()
            .iter()
            .find(|e| text(e, "url").ends_with("care-responsibility-uf"))
            .unwrap();
        text(
            follow(b, ext.get("valueReference").unwrap()),
            "identifier.0.value",
        )
        .to_owned()
    };
    assert_eq!(care_uf(&before, m1), "3105");
    assert_eq!(care_uf(&after, m2), "4201");
    // Leave of absence, its cancellation, the return and its cancellation.
    assert_eq!(
        s("fr_17_a21_leave.hl7", "MVT-250117-0052"),
        pair("onleave", "onleave")
    );
    assert_eq!(
        s("fr_18_a52_cancel_leave.hl7", "MVT-250117-0052"),
        pair("in-progress", "entered-in-error")
    );
    assert_eq!(
        s("fr_20_a22_return.hl7", "MVT-250118-0071"),
        pair("in-progress", "in-progress")
    );
    assert_eq!(
        s("fr_21_a53_cancel_return.hl7", "MVT-250118-0071"),
        pair("onleave", "entered-in-error")
    );
    assert_eq!(
        s("fr_23_a55_cancel_change_doctor.hl7", "MVT-250119-0080"),
        pair("in-progress", "entered-in-error")
    );
    // Discharge, then its cancellation.
    assert_eq!(
        s("fr_24_a03_discharge.hl7", "MVT-250120-0093"),
        pair("finished", "finished")
    );
    assert_eq!(
        s("fr_25_a13_cancel_discharge.hl7", "MVT-250120-0093"),
        pair("in-progress", "entered-in-error")
    );
    let b = map("fr_24_a03_discharge.hl7");
    let v = resource(&b, &visit_url("250001473"));
    assert_eq!(text(v, "period.end"), "2025-01-20T11:00:00+01:00");
    let dest = follow(&b, at(v, "hospitalization.destination").unwrap());
    assert_eq!(
        text(dest, "identifier.0.system"),
        "https://finess.esante.gouv.fr"
    );
    assert_eq!(text(dest, "identifier.0.value"), "990000029");
    assert_eq!(
        text(v, "hospitalization.dischargeDisposition.coding.0.code"),
        "7"
    );
    let b = map("fr_25_a13_cancel_discharge.hl7");
    assert!(at(resource(&b, &visit_url("250001473")), "period.end").is_none());
}

#[test]
fn preadmission_cancelled_admission_and_historic_movement() {
    let b = map("fr_10_a05_preadmit.hl7");
    assert_eq!(
        text(resource(&b, &visit_url("250001400")), "status"),
        "planned"
    );
    // A planned visit's bed is a planned location, not one the patient occupies.
    assert_eq!(
        locations(&b, resource(&b, &visit_url("250001400"))),
        places(&[("312/1", "planned")])
    );
    assert_eq!(
        text(resource(&b, &movement_url("MVT-250106-0001")), "status"),
        "planned"
    );
    let b = map("fr_11_a38_cancel_preadmit.hl7");
    assert_eq!(
        text(resource(&b, &visit_url("250001400")), "status"),
        "cancelled"
    );
    assert_eq!(
        text(resource(&b, &movement_url("MVT-250106-0001")), "status"),
        "entered-in-error"
    );
    let b = map("fr_40_a01_historic.hl7");
    assert_eq!(
        text(resource(&b, &visit_url("250003301")), "status"),
        "in-progress"
    );
    assert_eq!(
        text(resource(&b, &movement_url("MVT-250122-0130")), "status"),
        "finished"
    );
    let b = map("fr_41_a11_cancel_admit.hl7");
    assert_eq!(
        text(resource(&b, &visit_url("250003301")), "status"),
        "entered-in-error"
    );
    assert_eq!(
        text(resource(&b, &movement_url("MVT-250122-0130")), "status"),
        "entered-in-error"
    );
}

#[test]
fn units_locations_and_class_changes() {
    let b = map("fr_13_a02_transfer.hl7");
    let m = resource(&b, &movement_url("MVT-250115-0031"));
    let uf = follow(&b, m.get("serviceProvider").unwrap());
    assert_eq!(text(uf, "identifier.0.value"), "4210");
    assert_eq!(text(uf, "identifier.0.system"), IPP);
    assert_eq!(text(uf, "name"), "Soins intensifs cardio");
    assert!(
        profiles(uf)
            .contains(&"https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-organization-uf")
    );
    // The bed, part of its room, managed by the hosting UF (the same Organization).
    let bed = follow(&b, at(m, "location.0.location").unwrap());
    assert_eq!(text(bed, "name"), "4");
    assert_eq!(text(bed, "physicalType.coding.0.code"), "bd");
    let room = follow(&b, bed.get("partOf").unwrap());
    assert_eq!(text(room, "name"), "018");
    assert_eq!(
        text(room, "managingOrganization.reference"),
        text(m, "serviceProvider.reference")
    );
    // The visit keeps the prior location as completed.
    let v = resource(&b, &visit_url("250001473"));
    assert_eq!(text(v, "location.1.status"), "completed");
    // A04 (outpatient) → A06 (inpatient) → A07 (outpatient): one visit, its class follows.
    let classes: Vec<(String, String)> = [
        ("fr_30_a04_outpatient_8859-1.hl7", "MVT-250121-0101"),
        ("fr_31_a06_out_to_in.hl7", "MVT-250121-0112"),
        ("fr_32_a07_in_to_out.hl7", "MVT-250122-0120"),
    ]
    .iter()
    .map(|(f, mvt)| {
        let b = map(f);
        let v = resource(&b, &visit_url("250002210"));
        let m = resource(&b, &movement_url(mvt));
        (
            text(v, "class.code").to_owned(),
            text(m, "class.code").to_owned(),
        )
    })
    .collect();
    let c = |a: &str| (a.to_owned(), a.to_owned());
    assert_eq!(classes, [c("AMB"), c("IMP"), c("AMB")]);
}

#[test]
fn merge_and_account_move() {
    let b = map("fr_07_a40_merge.hl7");
    let survivor = entry(&b, &patient_url("0002999000"));
    let merged = entry(&b, &patient_url("0002999001"));
    assert_eq!(text(survivor, "resource.link.0.type"), "replaces");
    assert_eq!(
        text(survivor, "resource.link.0.other.reference"),
        text(merged, "fullUrl")
    );
    assert_eq!(text(merged, "resource.link.0.type"), "replaced-by");
    assert_eq!(
        text(merged, "resource.link.0.other.reference"),
        text(survivor, "fullUrl")
    );
    assert_eq!(
        at(merged, "resource.active")
            .map(|n| n.to_json(false))
            .as_deref(),
        Some("false")
    );

    // A44: the account of the outpatient visit now belongs to patient 0002999000.
    let url = format!("Account?identifier={NDA}|250002210");
    let before = map("fr_30_a04_outpatient_8859-1.hl7");
    let owner = |b: &Bundle| {
        let account = resource(b, &url);
        let patient = follow(b, at(account, "subject.0").unwrap());
        text(patient, "identifier.0.value").to_owned()
    };
    assert_eq!(owner(&before), "0003100452");
    assert_eq!(owner(&map("fr_33_a44_move_account.hl7")), "0002999000");
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn cda_documents_become_document_references() {
    for (file, id, loinc) in [
        ("fr_50_oru_r01_cda.hl7", "DOC-250120-0004", "11502-2"),
        ("fr_51_mdm_t02_cda_utf8.hl7", "DOC-250120-0011", "11490-0"),
    ] {
        let b = map(file);
        let d = resource(
            &b,
            &format!("DocumentReference?identifier=urn:oid:2.999.250.1.10.9|{id}"),
        );
        assert_eq!(text(d, "masterIdentifier.value"), id, "{file}");
        assert_eq!(text(d, "status"), "current", "{file}");
        assert_eq!(
            text(d, "type.coding.0.system"),
            "http://loinc.org",
            "{file}"
        );
        assert_eq!(text(d, "type.coding.0.code"), loinc, "{file}");
        assert_eq!(
            text(d, "content.0.attachment.contentType"),
            "text/xml",
            "{file}"
        );
        let cda = String::from_utf8(base64_decode(text(d, "content.0.attachment.data"))).unwrap();
        assert!(cda.contains("<ClinicalDocument"), "{file}");
        assert!(cda.contains(&format!(r#"code="{loinc}""#)), "{file}");
        assert!(cda.contains("Hélène LEFÈVRE"), "{file}");
        // The patient and the visit by identifier: the document feed rewrites neither.
        assert_eq!(text(d, "subject.identifier.system"), IPP, "{file}");
        assert_eq!(text(d, "subject.identifier.value"), "0002847561", "{file}");
        assert_eq!(
            text(d, "context.encounter.0.identifier.value"),
            "250001473",
            "{file}"
        );
        assert!(entries(&b, "Patient").is_empty(), "{file}");
        assert!(entries(&b, "Encounter").is_empty(), "{file}");
        let author = follow(&b, at(d, "author.0").unwrap());
        assert_eq!(text(author, "identifier.0.value"), "810099900033", "{file}");
    }
}

#[test]
fn accented_text_round_trips_from_each_charset() {
    // Latin-9: È Œ € are single bytes (0xC8, 0xBC, 0xA4) in the file.
    let raw = std::fs::read(
        passerelle_testkit::workspace_root().join("fixtures/fr/fr_12_a01_admit_8859-15.hl7"),
    )
    .unwrap();
    for byte in [0xC8u8, 0xBC, 0xA4] {
        assert!(raw.contains(&byte), "{byte:#x} is in the Latin-9 file");
    }
    let b = map("fr_12_a01_admit_8859-15.hl7");
    let json = b.to_json(false);
    let p = resource(&b, &patient_url("0002847561"));
    assert_eq!(text(p, "name.0.family"), "LEFÈVRE");
    assert_eq!(text(p, "name.1.family"), "DUCŒUR");
    assert_eq!(text(p, "address.0.city"), "Besançon");
    assert!(json.contains("supplément 45 € par nuit"), "€ from 0xA4");
    assert!(
        !json.contains('¤'),
        "0xA4 is € in Latin-9, not the Latin-1 ¤"
    );
    let reparsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(reparsed.to_string().contains("DUCŒUR"));

    // Latin-1: é ç as single bytes.
    let b = map("fr_30_a04_outpatient_8859-1.hl7");
    let p = resource(&b, &patient_url("0003100452"));
    assert_eq!(text(p, "name.0.family"), "GARÇON");
    assert_eq!(text(p, "name.0.given.0"), "Gérard");
    assert_eq!(text(p, "address.0.line.0"), "5 chemin des Prés");

    // UTF-8.
    let b = map("fr_03_a28_prov_ins_dropped.hl7");
    assert_eq!(
        text(resource(&b, &patient_url("0002911830")), "name.0.family"),
        "BŒUF"
    );
    let b = map("fr_01_a28_create_vali_utf8.hl7");
    assert_eq!(
        text(resource(&b, &patient_url("0002847561")), "name.1.family"),
        "DUCŒUR"
    );
}

#[test]
fn every_adt_patient_is_a_conditional_update_on_its_ipp() {
    for file in fixture_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let b = map(&name);
        for e in entries(&b, "Patient") {
            let url = text(e, "request.url");
            assert!(
                url.starts_with(&format!("Patient?identifier={IPP}|")),
                "{name}: {url}"
            );
            assert!(
                profiles(e.get("resource").unwrap())
                    .contains(&"https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient")
            );
        }
        for e in entries(&b, "Encounter") {
            let url = text(e, "request.url");
            assert!(url.starts_with("Encounter?identifier="), "{name}: {url}");
        }
    }
}

#[test]
fn mapping_is_deterministic_and_ids_are_stable_across_messages() {
    for file in fixture_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            map(&name).to_json(false),
            map(&name).to_json(false),
            "{name}"
        );
    }
    // One visit, one fullUrl, whichever message of the stay carries it.
    let urls: Vec<String> = [
        "fr_12_a01_admit_8859-15.hl7",
        "fr_16_z99_update_movement.hl7",
        "fr_25_a13_cancel_discharge.hl7",
    ]
    .iter()
    .map(|f| text(entry(&map(f), &visit_url("250001473")), "fullUrl").to_owned())
    .collect();
    assert_eq!(urls[0], urls[1]);
    assert_eq!(urls[0], urls[2]);
}

/// An A16 that (wrongly) sends the expected discharge in PV1-45.
fn a16_with_pv1_45() -> Vec<u8> {
    edited(
        "fr_67_a16_pending_discharge.hl7",
        &[("|20250114091500\r", "|20250114091500|20250119180000\r")],
    )
}

/// A Z99 that moves the pending transfer of fr_65 to 16:00 (ZBE-4 UPDATE, ZBE-6 A15).
fn z99_over_a15() -> Vec<u8> {
    edited(
        "fr_65_a15_pending_transfer.hl7",
        &[
            ("ADT^A15^ADT_A15", "ADT^Z99^ADT_A01"),
            (
                "|20250119150000||INSERT|N|",
                "|20250119160000||UPDATE|N|A15",
            ),
        ],
    )
}

/// The A10 of fr_63 from a feed that sends a ZBE with tracking events.
fn a10_with_zbe() -> Vec<u8> {
    let mut bytes = fixture_bytes("fr_63_a10_arrive_imaging.hl7");
    bytes.extend_from_slice(
        b"ZBE|MVT-250117-0055^GAM_HEXAFLUX^2.999.250.1.10.4^ISO|20250117101000||INSERT|N\r",
    );
    bytes
}

/// Where an Encounter's locations are, as `room/bed` (or `room`), with their status.
fn locations(bundle: &Bundle, encounter: &Node) -> Vec<(String, String)> {
    let place = |reference: &Node| {
        let location = follow(bundle, reference);
        match location.get("partOf") {
            Some(room) => format!(
                "{}/{}",
                text(follow(bundle, room), "name"),
                text(location, "name")
            ),
            None => text(location, "name").to_owned(),
        }
    };
    encounter
        .get("location")
        .map(|l| l.items())
        .unwrap_or(&[])
        .iter()
        .map(|l| {
            (
                place(l.get("location").unwrap()),
                text(l, "status").to_owned(),
            )
        })
        .collect()
}

fn places(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, s)| ((*p).to_owned(), (*s).to_owned()))
        .collect()
}

#[test]
fn pending_admission_is_a_planned_movement_that_its_cancellation_cancels() {
    let visit = visit_url("250004410");
    let movement = movement_url("MVT-250124-0140");
    let expected = "2025-01-27T08:30:00+01:00";

    let planned = map("fr_60_a14_pending_admit.hl7");
    let v = entry(&planned, &visit);
    let m = entry(&planned, &movement);
    assert_eq!(text(m, "request.method"), "PUT");
    assert_eq!(text(m, "resource.status"), "planned");
    assert_eq!(text(m, "resource.period.start"), expected, "PV2-8");
    assert_eq!(text(m, "resource.type.0.coding.0.code"), "A14");
    assert_eq!(
        text(m, "resource.type.0.coding.0.display"),
        "Admission prévisionnelle"
    );
    assert_eq!(text(m, "resource.partOf.reference"), text(v, "fullUrl"));
    assert_eq!(
        locations(&planned, m.get("resource").unwrap()),
        places(&[("315/1", "planned")])
    );
    // The visit is planned, not in progress, and starts on the expected date (no PV1-44).
    assert_eq!(text(v, "resource.status"), "planned");
    assert_eq!(text(v, "resource.period.start"), expected);
    assert_eq!(
        locations(&planned, v.get("resource").unwrap()),
        places(&[("315/1", "planned")])
    );

    // A27: the same conditional update (same URL, same fullUrl), now cancelled; the
    // movement keeps its date and original trigger, the visit is cancelled.
    let cancelled = map("fr_61_a27_cancel_pending_admit.hl7");
    let m2 = entry(&cancelled, &movement);
    assert_eq!(text(m2, "fullUrl"), text(m, "fullUrl"));
    assert_eq!(text(m2, "request.method"), "PUT");
    assert_eq!(text(m2, "resource.status"), "cancelled");
    assert_eq!(text(m2, "resource.period.start"), expected);
    assert_eq!(text(m2, "resource.type.0.coding.0.code"), "A14");
    assert_eq!(
        text(entry(&cancelled, &visit), "resource.status"),
        "cancelled"
    );
}

#[test]
fn pending_transfer_and_discharge_leave_the_visit_in_progress() {
    // A15: a planned movement to the pending location (PV1-42), on the expected date.
    let (v, m, _) = stay("fr_65_a15_pending_transfer.hl7", "MVT-250119-0085");
    assert_eq!((v.as_str(), m.as_str()), ("in-progress", "planned"));
    let b = map("fr_65_a15_pending_transfer.hl7");
    let mvt = resource(&b, &movement_url("MVT-250119-0085"));
    assert_eq!(text(mvt, "period.start"), "2025-01-19T15:00:00+01:00");
    assert_eq!(text(mvt, "type.0.coding.0.code"), "A15");
    assert_eq!(locations(&b, mvt), places(&[("312/2", "planned")]));
    assert_eq!(
        text(
            follow(&b, mvt.get("serviceProvider").unwrap()),
            "identifier.0.value"
        ),
        "4201",
        "ZBE-7: the UF of the planned movement"
    );
    // The visit: still in bed 207-2, the destination planned.
    let visit = resource(&b, &visit_url("250001473"));
    assert_eq!(
        locations(&b, visit),
        places(&[("207/2", "active"), ("312/2", "planned")])
    );

    // A26: the same movement, cancelled, still pointing at the planned destination.
    let (v, m, _) = stay("fr_66_a26_cancel_pending_transfer.hl7", "MVT-250119-0085");
    assert_eq!((v.as_str(), m.as_str()), ("in-progress", "cancelled"));
    let b = map("fr_66_a26_cancel_pending_transfer.hl7");
    let mvt = resource(&b, &movement_url("MVT-250119-0085"));
    assert_eq!(locations(&b, mvt), places(&[("312/2", "planned")]));
    assert_eq!(
        locations(&b, resource(&b, &visit_url("250001473"))),
        places(&[("207/2", "active")])
    );

    // A16: planned discharge at the expected discharge date (PV2-9); the visit goes on.
    let (v, m, _) = stay("fr_67_a16_pending_discharge.hl7", "MVT-250119-0087");
    assert_eq!((v.as_str(), m.as_str()), ("in-progress", "planned"));
    let b = map("fr_67_a16_pending_discharge.hl7");
    let mvt = resource(&b, &movement_url("MVT-250119-0087"));
    assert_eq!(text(mvt, "period.start"), "2025-01-19T18:00:00+01:00");
    assert!(at(resource(&b, &visit_url("250001473")), "period.end").is_none());

    // A25: cancelled.
    let (v, m, _) = stay("fr_68_a25_cancel_pending_discharge.hl7", "MVT-250119-0087");
    assert_eq!((v.as_str(), m.as_str()), ("in-progress", "cancelled"));

    // A pending discharge that (wrongly) sends PV1-45 does not finish the visit.
    let b = map_bytes("A16 with PV1-45", &a16_with_pv1_45());
    let visit = resource(&b, &visit_url("250001473"));
    assert_eq!(text(visit, "status"), "in-progress");
    assert!(at(visit, "period.end").is_none());
}

#[test]
fn a_z99_over_a_pending_movement_keeps_it_planned() {
    let b = map_bytes("Z99 over A15", &z99_over_a15());
    let mvt = resource(&b, &movement_url("MVT-250119-0085"));
    assert_eq!(text(mvt, "status"), "planned");
    assert_eq!(text(mvt, "period.start"), "2025-01-19T16:00:00+01:00");
    assert_eq!(text(mvt, "type.0.coding.0.code"), "A15");
    assert_eq!(locations(&b, mvt), places(&[("312/2", "planned")]));
    assert_eq!(
        text(resource(&b, &visit_url("250001473")), "status"),
        "in-progress"
    );
}

#[test]
fn tracking_moves_the_patient_on_the_visit_without_a_movement() {
    let cases = [
        (
            "fr_62_a09_depart_imaging.hl7",
            [("207/2", "reserved"), ("SCAN2", "planned")],
        ),
        (
            "fr_63_a10_arrive_imaging.hl7",
            [("207/2", "reserved"), ("SCAN2", "active")],
        ),
        (
            "fr_64_a10_back_in_room.hl7",
            [("207/2", "active"), ("SCAN2", "completed")],
        ),
    ];
    for (file, expected) in cases {
        let b = map(file);
        let visit = resource(&b, &visit_url("250001473"));
        assert_eq!(text(visit, "status"), "in-progress", "{file}");
        assert_eq!(locations(&b, visit), places(&expected), "{file}");
        assert_eq!(entries(&b, "Encounter").len(), 1, "{file}: no movement");
        assert_eq!(entries(&b, "Patient").len(), 1, "{file}");
    }
    // The CT room is managed by its UF (PV1-11.1 = 7300).
    let b = map("fr_63_a10_arrive_imaging.hl7");
    let visit = resource(&b, &visit_url("250001473"));
    let room = follow(&b, at(visit, "location.1.location").unwrap());
    assert_eq!(text(room, "physicalType.coding.0.code"), "ro");
    assert_eq!(
        text(
            follow(&b, room.get("managingOrganization").unwrap()),
            "identifier.0.value"
        ),
        "7300"
    );

    // A feed that sends a ZBE with A10 gets a movement, in progress, at PV1-11.
    let b = map_bytes("A10 with a ZBE", &a10_with_zbe());
    let mvt = resource(&b, &movement_url("MVT-250117-0055"));
    assert_eq!(text(mvt, "status"), "in-progress");
    assert_eq!(text(mvt, "type.0.coding.0.code"), "A10");
    assert_eq!(locations(&b, mvt), places(&[("SCAN2", "active")]));
}

#![allow(clippy::unwrap_used)]
//! Determinism (same input → same bytes) and idempotency (the requests a replay sends
//! change nothing: stable ids, conditional updates on business identifiers, references
//! that resolve inside the bundle).

mod common;

use std::collections::HashSet;

use passerelle_mapping::{Bundle, MapOptions, Node, Pack};

fn s<'n>(node: &'n Node, key: &str) -> &'n str {
    node.get(key).and_then(Node::as_str).unwrap_or("")
}

fn entries(b: &Bundle) -> &[Node] {
    b.as_node().get("entry").unwrap().items()
}

fn map_all(pack: &Pack) -> Vec<(String, String)> {
    common::fixture_messages()
        .into_iter()
        .map(|(name, bytes)| {
            let message = passerelle_hl7::Message::parse(&bytes).unwrap();
            let bundle = pack.map(&message, &MapOptions::default()).unwrap();
            (name, bundle.to_json(false))
        })
        .collect()
}

#[test]
fn same_message_same_bytes_across_runs_and_pack_loads() {
    let first = map_all(common::pack());
    let second = map_all(common::pack());
    let reloaded = Pack::load(common::pack_dir()).unwrap();
    let third = map_all(&reloaded);
    assert_eq!(first, second);
    assert_eq!(first, third);
    // serde_json writes the same bytes as the built-in writer.
    let b = common::map_fixture("oru_r01_chemistry.hl7");
    assert_eq!(serde_json::to_string(&b).unwrap(), b.to_json(false));
}

/// Every reference in a subtree.
fn references<'n>(node: &'n Node, out: &mut Vec<&'n str>) {
    match node {
        Node::Obj(members) => {
            for (k, v) in members {
                if k == "reference"
                    && let Some(r) = v.as_str()
                {
                    out.push(r);
                }
                references(v, out);
            }
        }
        Node::Arr(items) => items.iter().for_each(|i| references(i, out)),
        _ => {}
    }
}

#[test]
fn every_entry_is_an_idempotent_put_and_references_resolve() {
    // The resources a stay's messages update again and again: written with a conditional
    // update on their business identifier (the account number for Account).
    let conditional_types = ["Patient", "Encounter", "Account"];
    for (name, bytes) in common::fixture_messages() {
        let bundle = common::map_bytes(&bytes).unwrap();
        assert_eq!(s(bundle.as_node(), "type"), "transaction", "{name}");
        let mut urls = HashSet::new();
        for e in entries(&bundle) {
            let resource = e.get("resource").unwrap();
            let rtype = s(resource, "resourceType");
            let full_url = s(e, "fullUrl");
            assert!(full_url.starts_with("urn:uuid:"), "{name}: {full_url}");
            assert!(
                urls.insert(full_url.to_owned()),
                "{name}: duplicate {full_url}"
            );
            let request = e.get("request").unwrap();
            assert_eq!(s(request, "method"), "PUT", "{name}");
            let url = s(request, "url");
            let first_identifier = resource.get("identifier").and_then(|ids| {
                ids.items()
                    .iter()
                    .find(|i| !s(i, "system").is_empty() && !s(i, "value").is_empty())
            });
            match first_identifier {
                Some(first) if conditional_types.contains(&rtype) => {
                    // Conditional update on the first identifier with a system and a value.
                    let expected = format!(
                        "{rtype}?identifier={}|{}",
                        s(first, "system"),
                        s(first, "value")
                    );
                    assert_eq!(url, expected, "{name}");
                    assert!(
                        resource.get("id").is_none(),
                        "{name}: conditional {rtype} has an id"
                    );
                }
                _ => {
                    // No business identifier: an update at the stable id.
                    let id = s(resource, "id");
                    assert_eq!(id.len(), 36, "{name}: {rtype} id");
                    assert_eq!(url, format!("{rtype}/{id}"), "{name}");
                    assert_eq!(full_url, format!("urn:uuid:{id}"), "{name}");
                }
            }
        }
        let mut refs = Vec::new();
        references(bundle.as_node(), &mut refs);
        for r in refs {
            assert!(
                urls.contains(r),
                "{name}: reference {r} resolves to no entry"
            );
        }
    }
}

fn find<'b>(b: &'b Bundle, rtype: &str) -> Vec<&'b Node> {
    entries(b)
        .iter()
        .filter(|e| s(e.get("resource").unwrap(), "resourceType") == rtype)
        .collect()
}

#[test]
fn one_patient_in_several_messages_gets_one_id_and_one_condition() {
    let admit = common::map_fixture("adt_a01_admit.hl7");
    let lab = common::map_fixture("oru_r01_chemistry.hl7");
    let doc = common::map_fixture("mdm_t02_pdf.hl7");
    let key = |b: &Bundle| {
        let e = find(b, "Patient")[0];
        (
            s(e, "fullUrl").to_owned(),
            s(e.get("request").unwrap(), "url").to_owned(),
        )
    };
    assert_eq!(key(&admit), key(&lab));
    assert_eq!(key(&admit), key(&doc));
    assert_eq!(
        key(&admit).1,
        "Patient?identifier=urn:oid:2.999.1.10|RB1002341"
    );
    // Ids are pinned: a change here re-keys every resource already sent downstream.
    assert_eq!(
        key(&admit).0,
        "urn:uuid:248ed4a8-a15a-5ec1-9c33-d4b797ef6c2b"
    );
    // The visit, too, whichever message names it.
    let visit = |b: &Bundle| s(find(b, "Encounter")[0].get("request").unwrap(), "url").to_owned();
    assert_eq!(visit(&admit), visit(&lab));
    // And the attending doctor.
    let doctor = |b: &Bundle| {
        find(b, "Practitioner")
            .into_iter()
            .find(|e| e.to_json(false).contains("ABERNATHY"))
            .map(|e| s(e, "fullUrl").to_owned())
            .unwrap()
    };
    assert_eq!(doctor(&admit), doctor(&lab));
}

#[test]
fn results_sharing_a_key_are_told_apart_not_merged() {
    let msg = b"MSH|^~\\&|LAB|H|||20240101120000+0100||ORU^R01^ORU_R01|1|P|2.5.1\r\
PID|1||42^^^H^MR||DOE^JANE\r\
OBR|1||F1^LAB|GLU^Glucose^L\r\
OBX|1|NM|GLU^Glucose^L||5.5|mmol/L\r\
OBX|1|NM|GLU^Glucose^L||5.6|mmol/L\r";
    let b = common::map_bytes(msg).unwrap();
    let obs = find(&b, "Observation");
    assert_eq!(obs.len(), 2);
    assert_ne!(s(obs[0], "fullUrl"), s(obs[1], "fullUrl"));
    let again = common::map_bytes(msg).unwrap();
    assert_eq!(b.to_json(false), again.to_json(false));
    // A corrected result (same keys, another value) updates the same resource.
    let corrected = b"MSH|^~\\&|LAB|H|||20240101130000+0100||ORU^R01^ORU_R01|2|P|2.5.1\r\
PID|1||42^^^H^MR||DOE^JANE\r\
OBR|1||F1^LAB|GLU^Glucose^L\r\
OBX|1|NM|GLU^Glucose^L||5.7|mmol/L||||||C\r";
    let c = common::map_bytes(corrected).unwrap();
    assert_eq!(
        s(find(&c, "Observation")[0], "fullUrl"),
        s(obs[0], "fullUrl")
    );
}

#[test]
fn visits_without_a_visit_number_are_never_merged_across_messages() {
    let msg = |control: &str| {
        format!(
            "MSH|^~\\&|ADT|H|||20240101120000+0100||ADT^A04^ADT_A01|{control}|P|2.5\r\
PID|1||42^^^H&1.2.3&ISO^MR||DOE^JANE\r\
PV1|1|O|CLINIC^1\r\
OBX|1|NM|8302-2^Body height^LN||170|cm^cm^UCUM|||||F\r"
        )
    };
    let url = |b: &Bundle, t: &str| s(find(b, t)[0], "fullUrl").to_owned();
    let first = common::map_bytes(msg("1").as_bytes()).unwrap();
    let replay = common::map_bytes(msg("1").as_bytes()).unwrap();
    let next = common::map_bytes(msg("2").as_bytes()).unwrap();
    assert_eq!(url(&first, "Encounter"), url(&replay, "Encounter"));
    assert_ne!(url(&first, "Encounter"), url(&next, "Encounter"));
    assert_ne!(url(&first, "Observation"), url(&next, "Observation"));
    // The patient is the same record in both.
    assert_eq!(url(&first, "Patient"), url(&next, "Patient"));
}

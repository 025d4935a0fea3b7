#![allow(clippy::unwrap_used)]
//! One test per kind of mapping-file error (each located at file:line:column, with the
//! field), and the errors raised while mapping (located, without message content).

mod common;

use passerelle_mapping::{LoadError, LoadErrorKind as K, MapErrorKind, MapOptions, Pack};

const PACK: &str = r#"[pack]
name = "t"
fhir_version = "4.0.1"
"#;

const BASE: &str = r#"[[structure]]
name = "S"
groups = [{ name = "ORDER", starts = ["OBR"], members = ["NTE"] }]

[[vocabulary]]
name = "sex"
map = { M = "male", F = "female" }

[[datatype]]
name = "XPN"
target = "HumanName"
rules = [{ from = "1", to = "family" }]

[[segment]]
name = "PID"
segment = "PID"
resource = "Patient"
rules = [
  { from = "PID-5", type = "XPN", to = "name[]" },
  { from = "PID-8", vocab = "sex", to = "gender" },
]

[[message]]
name = "M"
events = ["ADT^A01"]
structure = "S"
resources = [{ label = "Patient", for = "PID", map = "PID" }]
"#;

/// Loads the base pack with `old` replaced by `new` in the base file, and returns the
/// single error.
fn error_after(old: &str, new: &str) -> LoadError {
    assert!(BASE.contains(old), "{old}");
    let base = BASE.replacen(old, new, 1);
    let errors = Pack::from_texts(&[("pack.toml", PACK), ("base.toml", &base)])
        .err()
        .unwrap_or_else(|| panic!("{new:?} loads"));
    assert_eq!(errors.0.len(), 1, "{errors}");
    errors.0.into_iter().next().unwrap()
}

fn located(e: &LoadError, kind: K, line: usize, column: usize, field: &str) {
    assert_eq!(e.kind, kind, "{e}");
    assert_eq!(&*e.loc.file, "base.toml", "{e}");
    assert_eq!((e.loc.line, e.loc.column), (line, column), "{e}");
    assert!(e.field.contains(field), "{e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("base.toml:{line}:{column}: ")),
        "{shown}"
    );
}

#[test]
fn the_base_pack_loads() {
    let pack = Pack::from_texts(&[("pack.toml", PACK), ("base.toml", BASE)]).unwrap();
    assert_eq!(pack.events().collect::<Vec<_>>(), ["ADT^A01"]);
}

#[test]
fn syntax_and_unknown_keys() {
    let e = error_after(
        r#"name = "sex""#,
        r#"name = "sex"
colour = "blue""#,
    );
    located(&e, K::Syntax, 7, 1, "file");
    assert!(e.message.contains("colour"), "{e}");
    let e = error_after("[[message]]", "[[message]");
    assert_eq!(e.kind, K::Syntax);
    assert_eq!(e.loc.line, 23);
}

#[test]
fn bad_source_path() {
    let e = error_after(r#"from = "PID-8""#, r#"from = "PID-8[0]""#);
    // Column of the character where the path stops making sense: the 0 of [0].
    located(&e, K::Path, 20, 18, "rules[1].from");
    assert!(e.message.contains("start at 1"), "{e}");
}

#[test]
fn relative_path_outside_a_datatype_map() {
    let e = error_after(r#"from = "PID-8""#, r#"from = "8""#);
    located(&e, K::Path, 20, 13, "rules[1].from");
}

#[test]
fn bad_target() {
    let e = error_after(r#"to = "gender""#, r#"to = "gender[x]""#);
    located(&e, K::Target, 20, 49, "rules[1].to");
}

#[test]
fn bad_condition() {
    let e = error_after(
        r#"{ from = "PID-8", vocab"#,
        r#"{ when = 'valued(PID-8) xor valued(PID-5)', from = "PID-8", vocab"#,
    );
    located(&e, K::Condition, 20, 27, "rules[1].when");
    assert!(e.message.contains("unexpected text"), "{e}");
}

#[test]
fn unknown_function() {
    let e = error_after(r#"vocab = "sex""#, r#"fn = "uppercase""#);
    located(&e, K::UnknownFunction, 20, 26, "rules[1].fn");
    assert!(e.message.contains("datetime"), "lists the known ones: {e}");
}

#[test]
fn unknown_datatype() {
    let e = error_after(r#"type = "XPN""#, r#"type = "XPN2""#);
    located(&e, K::UnknownDatatype, 19, 28, "rules[0].type");
}

#[test]
fn missing_vocabulary() {
    let e = error_after(r#"vocab = "sex""#, r#"vocab = "HL70001""#);
    located(&e, K::UnknownVocabulary, 20, 29, "rules[1].vocab");
    assert!(e.message.contains("HL70001"));
}

#[test]
fn unknown_segment_map() {
    let e = error_after(r#"map = "PID" }"#, r#"map = "PV1" }"#);
    located(&e, K::UnknownSegmentMap, 27, 54, "resources[0].map");
}

#[test]
fn unknown_structure() {
    let e = error_after(r#"structure = "S""#, r#"structure = "T""#);
    located(&e, K::UnknownStructure, 26, 13, "structure");
}

#[test]
fn unknown_group() {
    let e = error_after(r#"for = "PID""#, r#"for = "PATIENT/PID""#);
    located(&e, K::UnknownGroup, 27, 41, "resources[0].for");
}

#[test]
fn unknown_label() {
    let e = error_after(
        r#"map = "PID" }]"#,
        r#"map = "PID", refs = [{ to = "subject", ref = "Encounter" }] }]"#,
    );
    located(&e, K::UnknownLabel, 27, 93, "refs[0].ref");
}

#[test]
fn duplicate_names() {
    let e = error_after(r#"name = "XPN""#, r#"name = "sex""#);
    // A datatype map and a vocabulary may share a name; two vocabularies may not.
    assert!(e.kind == K::UnknownDatatype, "{e}");
    let twice = format!("{BASE}\n[[vocabulary]]\nname = \"sex\"\nmap = {{}}\n");
    let errors = Pack::from_texts(&[("pack.toml", PACK), ("base.toml", &twice)])
        .err()
        .unwrap();
    assert_eq!(errors.0[0].kind, K::Duplicate);
    assert_eq!(errors.0[0].loc.line, 30);
}

#[test]
fn invalid_values() {
    let e = error_after("map = { M", "unknown = \"sometimes\"\nmap = { M");
    located(&e, K::Invalid, 7, 11, "unknown");
    let errors = Pack::from_texts(&[
        (
            "pack.toml",
            "[pack]\nname = \"t\"\nfhir_version = \"5.0.0\"\n",
        ),
        ("base.toml", BASE),
    ])
    .err()
    .unwrap();
    assert_eq!(errors.0[0].kind, K::Invalid);
    assert_eq!((errors.0[0].loc.line, errors.0[0].loc.column), (3, 16));
}

#[test]
fn not_an_r4_resource_type() {
    let e = error_after(r#"resource = "Patient""#, r#"resource = "Patiant""#);
    located(&e, K::Invalid, 17, 12, "resource");
    assert!(e.message.contains("not a FHIR R4 resource type"), "{e}");
}

#[test]
fn a_folder_of_packs_is_not_a_pack() {
    let root = passerelle_testkit::workspace_root();
    let errors = Pack::load(root.join("mappings")).err().unwrap();
    assert_eq!(errors.0.len(), 1, "{errors}");
    let e = &errors.0[0];
    assert_eq!(e.kind, K::Io);
    assert!(e.message.contains("give one of fr, v2-to-fhir"), "{e}");
}

/// A file whose values do not fit (a string where a list goes) is reported once; the
/// maps of other files that name its maps are not reported as naming unknown ones.
#[test]
fn a_file_that_cannot_be_read_is_one_error_not_a_cascade() {
    let (start, end) = (
        BASE.find("[[segment]]").unwrap(),
        BASE.find("[[message]]").unwrap(),
    );
    let segment = BASE[start..end].replacen("rules = [", "merge = \"yes\"\nrules = [", 1);
    let rest = format!("{}{}", &BASE[..start], &BASE[end..]);
    let errors = Pack::from_texts(&[
        ("pack.toml", PACK),
        ("rest.toml", &rest),
        ("segments.toml", &segment),
    ])
    .err()
    .unwrap();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].kind, K::Syntax, "{errors}");
    assert_eq!(&*errors.0[0].loc.file, "segments.toml", "{errors}");
}

#[test]
fn unreadable_folder() {
    let errors = Pack::load("/nonexistent/passerelle-pack").err().unwrap();
    assert_eq!(errors.0[0].kind, K::Io);
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let broken = BASE
        .replacen(r#"vocab = "sex""#, r#"vocab = "nope""#, 1)
        .replacen(r#"type = "XPN""#, r#"type = "nope""#, 1);
    let errors = Pack::from_texts(&[("pack.toml", PACK), ("base.toml", &broken)])
        .err()
        .unwrap();
    assert_eq!(errors.0.len(), 2, "{errors}");
}

// --- errors while mapping ---------------------------------------------------------------

#[test]
fn no_message_map_for_the_event() {
    let msg = b"MSH|^~\\&|A|B|||20240101||ZZZ^Z99|1|P|2.5\rPID|1||42\r";
    let e = common::map_bytes(msg).unwrap_err();
    assert_eq!(
        e.kind,
        MapErrorKind::NoMessageMap {
            event: "ZZZ^Z99".into()
        }
    );
}

#[test]
fn bad_value_is_located_without_its_content() {
    let msg = b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||42^^^H^MR||DOE||19781399|M\r";
    let e = common::map_bytes(msg).unwrap_err();
    assert!(matches!(e.kind, MapErrorKind::Conversion { .. }), "{e}");
    assert_eq!(e.segment.as_deref(), Some("PID (segment 2)"));
    assert_eq!(e.path.as_deref(), Some("PID-7"));
    let rule = e.rule.clone().unwrap();
    assert!(rule.file.ends_with("patient.toml"), "{rule}");
    let shown = e.to_string();
    assert!(
        !shown.contains("19781399") && !shown.contains("DOE"),
        "{shown}"
    );
    assert!(shown.contains("PID-7"), "{shown}");
}

fn small_pack(settings: &str, vocab_policy: &str) -> Pack {
    let pack = format!("[pack]\nname = \"t\"\nfhir_version = \"4.0.1\"\n{settings}");
    let base = BASE
        .replace(
            "map = { M = \"male\"",
            &format!("{vocab_policy}map = {{ M = \"male\""),
        )
        .replace(
            r#"{ from = "PID-8", vocab = "sex", to = "gender" },"#,
            r#"{ from = "PID-8", vocab = "sex", to = "gender" },
  { from = "PID-29", fn = "datetime", to = "deceasedDateTime" },"#,
        );
    Pack::from_texts(&[("pack.toml", &pack), ("base.toml", &base)]).unwrap()
}

const PATIENT: &[u8] =
    b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||42||DOE||19780101|X|||||||||||||||||||||202401011230\r";

#[test]
fn unknown_code_policies() {
    let m = passerelle_hl7::Message::parse(PATIENT).unwrap();
    let options = MapOptions {
        site_offset: Some(60),
    };
    let e = small_pack("", "").map(&m, &options).unwrap_err();
    assert_eq!(
        e.kind,
        MapErrorKind::UnknownCode {
            vocabulary: "sex".into()
        }
    );
    assert_eq!(e.path.as_deref(), Some("PID-8"));
    let omit = small_pack("", "unknown = \"omit\"\n")
        .map(&m, &options)
        .unwrap();
    assert!(!omit.to_json(false).contains("gender"));
    let pass = small_pack("", "unknown = \"pass\"\n")
        .map(&m, &options)
        .unwrap();
    assert!(pass.to_json(false).contains(r#""gender":"X""#));
    let default = small_pack("", "unknown = \"default\"\ndefault = \"unknown\"\n")
        .map(&m, &options)
        .unwrap();
    assert!(default.to_json(false).contains(r#""gender":"unknown""#));
}

#[test]
fn timestamps_without_offset_follow_the_policy() {
    let m = passerelle_hl7::Message::parse(PATIENT).unwrap();
    let lenient = "unknown = \"omit\"\n";
    let site = small_pack("site_offset = \"+01:00\"\n", lenient)
        .map(&m, &MapOptions::default())
        .unwrap();
    assert!(
        site.to_json(false)
            .contains(r#""deceasedDateTime":"2024-01-01T12:30:00+01:00""#)
    );
    let overridden = small_pack("site_offset = \"+01:00\"\n", lenient)
        .map(
            &m,
            &MapOptions {
                site_offset: Some(-300),
            },
        )
        .unwrap();
    assert!(
        overridden
            .to_json(false)
            .contains("2024-01-01T12:30:00-05:00")
    );
    let date_only = small_pack("naive_timestamps = \"date-only\"\n", lenient)
        .map(&m, &MapOptions::default())
        .unwrap();
    assert!(
        date_only
            .to_json(false)
            .contains(r#""deceasedDateTime":"2024-01-01""#)
    );
    let e = small_pack(
        "naive_timestamps = \"reject\"\nsite_offset = \"+01:00\"\n",
        lenient,
    )
    .map(&m, &MapOptions::default())
    .unwrap_err();
    assert_eq!(e.kind, MapErrorKind::NoOffset);
    assert_eq!(e.path.as_deref(), Some("PID-29"));
    // No site offset configured at all: refused, not guessed.
    let e = small_pack("", lenient)
        .map(&m, &MapOptions::default())
        .unwrap_err();
    assert_eq!(e.kind, MapErrorKind::NoOffset);
}

#[test]
fn the_site_offset_follows_summer_time() {
    let summer = String::from_utf8_lossy(PATIENT).replace("202401011230", "202407011230");
    let m = passerelle_hl7::Message::parse(summer.as_bytes()).unwrap();
    let lenient = "unknown = \"omit\"\n";
    let paris = small_pack(
        "site_offset = \"+01:00\"\nsite_summer_time = \"eu\"\n",
        lenient,
    );
    let json = paris
        .map(&m, &MapOptions::default())
        .unwrap()
        .to_json(false);
    assert!(
        json.contains(r#""deceasedDateTime":"2024-07-01T12:30:00+02:00""#),
        "{json}"
    );
    let winter = passerelle_hl7::Message::parse(PATIENT).unwrap();
    let json = paris
        .map(&winter, &MapOptions::default())
        .unwrap()
        .to_json(false);
    assert!(
        json.contains(r#""deceasedDateTime":"2024-01-01T12:30:00+01:00""#),
        "{json}"
    );
    let e = Pack::from_texts(&[
        (
            "pack.toml",
            "[pack]\nname = \"t\"\nfhir_version = \"4.0.1\"\nsite_summer_time = \"mars\"\n",
        ),
        ("base.toml", BASE),
    ])
    .err()
    .unwrap();
    assert_eq!(e.0[0].kind, K::Invalid);
    assert_eq!((e.0[0].loc.line, e.0[0].loc.column), (4, 20));
}

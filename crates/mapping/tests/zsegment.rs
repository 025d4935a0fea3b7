#![allow(clippy::unwrap_used)]
//! A site's Z-segment is a new file, not new code: copy the pack, add one file that
//! declares a segment map and extends the ADT message map, and the ZPI data comes out.

mod common;

use std::fs;
use std::path::Path;

use passerelle_mapping::{MapOptions, Pack};

const ZPI: &str = r#"# Site extension: ZPI (preferred name) → Patient.name, use = usual.
[[segment]]
name = "ZPI_Patient"
segment = "ZPI"
rules = [
  { from = "ZPI-2", to = "name[].given[]" },
]

[[extend]]
message = "ADT"
resources = [
  { into = "Patient", for = "ZPI", map = "ZPI_Patient" },
]
"#;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn a_z_segment_is_one_more_file() {
    let dir = std::env::temp_dir().join(format!("passerelle-zpi-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    copy_dir(&common::pack_dir(), &dir);
    fs::create_dir_all(dir.join("site")).unwrap();
    fs::write(dir.join("site").join("zpi.toml"), ZPI).unwrap();
    let pack = Pack::load(&dir).unwrap();
    let bytes =
        fs::read(passerelle_testkit::workspace_root().join("fixtures/hl7/zseg_adt_a01.hl7"))
            .unwrap();
    let message = passerelle_hl7::Message::parse(&bytes).unwrap();
    let with = pack
        .map(&message, &MapOptions::default())
        .unwrap()
        .to_json(false);
    let without = common::pack()
        .map(&message, &MapOptions::default())
        .unwrap()
        .to_json(false);
    assert!(with.contains(r#"{"given":["Sam"]}"#), "{with}");
    assert!(!without.contains(r#""Sam""#));

    // An extension of a map that does not exist is located.
    fs::write(
        dir.join("site").join("zpi.toml"),
        ZPI.replace(r#"message = "ADT""#, r#"message = "ADT_A99""#),
    )
    .unwrap();
    let errors = Pack::load(&dir).err().unwrap();
    let e = &errors.0[0];
    assert_eq!(e.kind, passerelle_mapping::LoadErrorKind::UnknownMessageMap);
    assert!(e.loc.file.ends_with("zpi.toml"));
    assert_eq!((e.loc.line, e.loc.column), (10, 11));
    fs::remove_dir_all(&dir).unwrap();
}

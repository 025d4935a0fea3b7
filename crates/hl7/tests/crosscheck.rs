//! Cross-checks against third-party parsers on every well-formed fixture: the python
//! `hl7` library (a real, separate implementation, run as a process) and the `hl7-2`
//! crate. Both must see the same segments, fields, repetitions, components and
//! subcomponents as passerelle.
//!
//! python `hl7` keeps escape sequences raw, so it is compared on raw values (in the
//! message's character set, decoded to Unicode). `hl7-2` is compared on raw values and,
//! where both decode the same sequences, on decoded ones: it keeps `\H\`, `\N\`, the
//! `\.br\` formatting commands and `\P\` literally, by design, where passerelle decodes them.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::process::Command;

use passerelle_hl7::{Charset, Level, Message, ParseOptions, Value, batch};
use passerelle_testkit::{fixture_files, peers_source_dir, python};

/// Segments as (id, fields → repetitions → components → subcomponents).
type Tree = Vec<(String, Vec<Vec<Vec<Vec<String>>>>)>;

fn trim<T>(v: &mut Vec<T>, empty: impl Fn(&T) -> bool) {
    while v.last().is_some_and(&empty) {
        v.pop();
    }
}

fn normalize(tree: &mut Tree) {
    for (_, fields) in tree.iter_mut() {
        for field in fields.iter_mut() {
            for rep in field.iter_mut() {
                for comp in rep.iter_mut() {
                    trim(comp, String::is_empty);
                }
                trim(rep, Vec::is_empty);
            }
            trim(field, Vec::is_empty);
        }
        trim(fields, Vec::is_empty);
    }
}

/// passerelle's view, with `leaf` choosing raw or decoded text.
fn our_tree(message: &Message<'_>, leaf: impl Fn(&Value<'_>) -> String) -> Tree {
    let mut tree: Tree = message
        .segments()
        .map(|seg| {
            let fields = seg
                .fields()
                .map(|f| {
                    if f.level() == Level::Literal {
                        return vec![vec![vec![f.text().into_owned()]]];
                    }
                    f.repetitions()
                        .map(|r| {
                            r.children()
                                .map(|c| c.children().map(|s| leaf(&s)).collect())
                                .collect()
                        })
                        .collect()
                })
                .collect();
            (seg.id().to_owned(), fields)
        })
        .collect();
    normalize(&mut tree);
    tree
}

fn raw_text(v: &Value<'_>) -> String {
    v.encoding().charset.decode(v.raw()).into_owned()
}

/// Every well-formed fixture message: (label, bytes, charset).
fn corpus() -> Vec<(String, Vec<u8>, Charset)> {
    let mut out = Vec::new();
    for file in fixture_files("hl7") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&file).unwrap();
        let split = batch::split(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, part) in split.messages.iter().enumerate() {
            let m = Message::parse_with(part.bytes, &ParseOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            out.push((
                format!("{name}#{}", i + 1),
                part.bytes.to_vec(),
                m.charset(),
            ));
        }
    }
    assert!(out.len() >= 40, "corpus too small: {}", out.len());
    out
}

fn python_codec(charset: Charset) -> &'static str {
    match charset {
        Charset::Ascii => "ascii",
        Charset::Latin1 => "latin-1",
        Charset::Latin9 => "iso8859-15",
        Charset::Utf8 => "utf-8",
    }
}

fn compare(label: &str, peer: &str, ours: &Tree, theirs: &Tree) {
    let ids = |t: &Tree| t.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(ours),
        ids(theirs),
        "{label}: segment ids differ from {peer}"
    );
    for (i, ((id, a), (_, b))) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(
            a.len(),
            b.len(),
            "{label}: segment {} ({id}) field count differs from {peer}",
            i + 1
        );
        for (f, (fa, fb)) in a.iter().zip(b).enumerate() {
            assert_eq!(
                fa,
                fb,
                "{label}: {id}-{} (segment {}) differs from {peer}",
                f + 1,
                i + 1
            );
        }
    }
}

#[test]
fn python_hl7_sees_the_same_fields() {
    let python = python();
    let dir = std::env::temp_dir().join(format!("passerelle-crosscheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = corpus();
    let mut compared = 0;
    for charset in [
        Charset::Ascii,
        Charset::Latin1,
        Charset::Latin9,
        Charset::Utf8,
    ] {
        let group: Vec<_> = corpus.iter().filter(|(_, _, c)| *c == charset).collect();
        if group.is_empty() {
            continue;
        }
        let mut files = Vec::new();
        for (i, (_, bytes, _)) in group.iter().enumerate() {
            // python `hl7` splits segments on CR only and does not skip a byte order mark:
            // give it CR terminators and no BOM.
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            let text = bytes.iter().copied().fold(Vec::new(), |mut acc, b| {
                match b {
                    b'\n' if acc.last() == Some(&b'\r') => {}
                    b'\n' => acc.push(b'\r'),
                    _ => acc.push(b),
                }
                acc
            });
            let path = dir.join(format!("{}-{i}.hl7", python_codec(charset)));
            std::fs::write(&path, text).unwrap();
            files.push(path);
        }
        let output = Command::new(&python)
            .arg(peers_source_dir().join("hl7_dump.py"))
            .arg(python_codec(charset))
            .args(&files)
            .output()
            .expect("run python hl7");
        assert!(
            output.status.success(),
            "python hl7 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), group.len(), "one JSON document per message");
        for ((label, bytes, _), line) in group.iter().zip(lines) {
            let doc: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut theirs: Tree = doc["segments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_owned(),
                        serde_json::from_value(s["fields"].clone()).unwrap(),
                    )
                })
                .collect();
            normalize(&mut theirs);
            let message = Message::parse(bytes).unwrap();
            compare(label, "python hl7", &our_tree(&message, raw_text), &theirs);
            compared += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(compared, corpus.len());
    println!("python hl7 agrees on {compared} messages");
}

/// Whether hl7-2 and passerelle decode every escape in `raw` the same way.
fn same_escape_semantics(raw: &str, charset: Charset) -> bool {
    let differing = [r"\H\", r"\N\", r"\.", r"\P\", r"\Z", r"\C", r"\M"];
    !differing.iter().any(|d| raw.contains(d))
        && (charset == Charset::Utf8 || charset == Charset::Ascii || !raw.contains(r"\X"))
}

#[test]
fn hl7_2_crate_sees_the_same_fields() {
    let corpus = corpus();
    let mut decoded_leaves = 0;
    for (label, bytes, charset) in &corpus {
        let message = Message::parse(bytes).unwrap();
        let text = charset.decode(bytes);
        let theirs = hl7_2::parse(&text).unwrap_or_else(|e| panic!("{label}: hl7-2 fails: {e}"));
        let raw = theirs.raw();
        let seps = &raw.separators;
        let tree_of = |decoded: bool| -> Tree {
            let mut tree: Tree = raw
                .segments
                .iter()
                .map(|s| {
                    let fields = s
                        .fields
                        .iter()
                        .map(|f| {
                            f.repetitions
                                .iter()
                                .map(|r| {
                                    r.components
                                        .iter()
                                        .map(|c| {
                                            c.subcomponents
                                                .iter()
                                                .map(|sub| {
                                                    if decoded {
                                                        sub.value(seps).into_owned()
                                                    } else {
                                                        sub.raw.clone()
                                                    }
                                                })
                                                .collect()
                                        })
                                        .collect()
                                })
                                .collect()
                        })
                        .collect();
                    (s.name.clone(), fields)
                })
                .collect();
            normalize(&mut tree);
            tree
        };
        compare(
            label,
            "hl7-2 (raw)",
            &our_tree(&message, raw_text),
            &tree_of(false),
        );

        // Decoded values, leaf by leaf, where the two libraries decode the same escapes.
        let separators = message.separators();
        for (id, fields) in our_tree(&message, raw_text) {
            for (f, field) in fields.iter().enumerate() {
                if id == "MSH" && f < 2 {
                    continue;
                }
                for leaf in field.iter().flatten().flatten() {
                    if !same_escape_semantics(leaf, *charset) {
                        continue;
                    }
                    let ours = passerelle_hl7::escape::unescape(leaf.as_bytes(), &separators);
                    let ours = String::from_utf8(ours.into_owned()).unwrap();
                    let theirs = hl7_2::er7::escape::unescape(leaf, seps);
                    assert_eq!(ours, theirs, "{label}: {id}-{} decoded", f + 1);
                    decoded_leaves += 1;
                }
            }
        }
    }
    println!(
        "hl7-2 agrees on {} messages, {decoded_leaves} decoded leaves",
        corpus.len()
    );
}

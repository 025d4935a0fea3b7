//! `passerelle messages resubmit --edit`: the operator corrects a stored message in their
//! editor.
//!
//! The message is written to a file of its own (mode 0600, in the temporary folder), one
//! segment per line as `messages show` prints it, decoded from its MSH-18 character set;
//! `$VISUAL`, else `$EDITOR`, else `vi` opens it; what is saved is read back: line ends
//! (LF, CRLF) become the CR that ends each HL7 segment, blank lines and the last newline
//! go, and the text is encoded again in the character set its MSH-18 now names. Refused,
//! with nothing sent: an editor that fails, a result that is empty or unchanged, text
//! that does not parse or has a character its character set cannot hold. The file is
//! deleted, except when the edit is refused for its content: then it is kept, and named,
//! so that the operator's work is not lost (`--file` takes it once corrected).

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use passerelle_hl7::{Charset, Message};

/// The segments of a message's text, without their terminators or blank lines.
fn segments(text: &str) -> Vec<&str> {
    text.split(['\r', '\n']).filter(|s| !s.is_empty()).collect()
}

/// Opens message `id` (its text, `raw`) in the operator's editor; returns the corrected
/// frame, or why nothing is to be resubmitted.
pub(crate) fn edit(id: u64, raw: &str) -> Result<Vec<u8>, String> {
    let before = segments(raw);
    if before.is_empty() {
        return Err(format!("message {id} has no text to edit"));
    }
    let path = std::env::temp_dir().join(format!(
        "passerelle-resubmit-{id}-{}.hl7",
        std::process::id()
    ));
    write_private(&path, &format!("{}\n", before.join("\n")))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    match corrected(id, &path, &before) {
        Ok(frame) => {
            let _ = std::fs::remove_file(&path);
            Ok(frame)
        }
        Err(Refused::Discard(why)) => {
            let _ = std::fs::remove_file(&path);
            Err(why)
        }
        Err(Refused::Keep(why)) => Err(format!(
            "{why}\nthe edit is kept in {p}: correct it, then `passerelle messages resubmit \
             {id} --file {p}` (and delete the file)",
            p = path.display()
        )),
    }
}

/// Runs the editor on `path` and reads the corrected frame back.
fn corrected(id: u64, path: &Path, before: &[&str]) -> Result<Vec<u8>, Refused> {
    run_editor(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Refused::Discard(format!(
            "cannot read the edit back from {}: {e}",
            path.display()
        ))
    })?;
    let after = segments(&text);
    if after.is_empty() {
        return Err(Refused::Discard(
            "the edited message is empty: nothing resubmitted".into(),
        ));
    }
    if after == before {
        return Err(Refused::Discard(format!(
            "message {id} was not changed: nothing resubmitted"
        )));
    }
    encode(&after).map_err(Refused::Keep)
}

/// Why an edit is not resubmitted, and whether its file is worth keeping.
enum Refused {
    /// Nothing of the operator's work in it (an editor that failed, nothing changed).
    Discard(String),
    /// A correction that is not right yet: kept for the operator.
    Keep(String),
}

/// Creates `path` readable by its owner only (it holds a patient's message) and writes
/// `text` to it.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// `$VISUAL`, else `$EDITOR`, else `vi`, run by the shell (an editor setting may carry
/// arguments: `code --wait`) on `path`.
fn run_editor(path: &Path) -> Result<(), Refused> {
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".to_owned());
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("passerelle-editor")
        .arg(path)
        .status()
        .map_err(|e| Refused::Discard(format!("cannot run the editor ({editor}): {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Refused::Discard(format!(
            "the editor ({editor}) failed ({status}): nothing resubmitted"
        )))
    }
}

/// The frame of the edited segments: CR after each, in the character set MSH-18 names.
fn encode(segments: &[&str]) -> Result<Vec<u8>, String> {
    let mut text = segments.join("\r");
    text.push('\r');
    let charset = Message::parse(text.as_bytes())
        .map_err(|e| {
            format!(
                "the edited message does not parse, nothing was stored: {e} (segment n is line n)"
            )
        })?
        .charset();
    if charset == Charset::Utf8 || text.is_ascii() {
        return Ok(text.into_bytes());
    }
    let mut frame = Vec::with_capacity(text.len());
    for (line, segment) in segments.iter().enumerate() {
        for c in segment.chars() {
            charset.encode_char(c, &mut frame).ok_or_else(|| {
                format!(
                    "line {}: {c:?} cannot be written in the message's character set ({}, \
                     MSH-18): nothing was stored",
                    line + 1,
                    charset.label()
                )
            })?;
        }
        frame.push(b'\r');
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edited_text_becomes_a_frame_in_its_character_set() {
        let latin9 = [
            "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5|||||FRA|8859/15",
            "PID|1||42||CŒUR^Zoé",
        ];
        let frame = encode(&latin9).unwrap();
        assert!(
            frame.ends_with(b"\rPID|1||42||C\xbcUR^Zo\xe9\r"),
            "{frame:?}"
        );
        assert_eq!(frame.iter().filter(|&&b| b == b'\r').count(), 2);
        // UTF-8 text stays as it is.
        let utf8 = [
            "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5|||||FRA|UNICODE UTF-8",
            "PID|1||42||Zoé",
        ];
        assert!(encode(&utf8).unwrap().ends_with("Zoé\r".as_bytes()));
        let e = encode(&[
            "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5|||||FRA|8859/15",
            "PID|1||42||Ωmega",
        ])
        .unwrap_err();
        assert!(e.contains("line 2") && e.contains("8859/15"), "{e}");
        let e = encode(&["PID|1||42"]).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
    }

    #[test]
    fn line_ends_and_blank_lines_are_not_segments() {
        assert_eq!(
            segments("MSH|a\r\nPID|1\n\nPV1|1\r\n"),
            ["MSH|a", "PID|1", "PV1|1"]
        );
        assert!(segments("\n\r\n").is_empty());
    }
}

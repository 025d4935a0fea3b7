//! `passerelle parse FILE... [--path PATH] [--json]`.
//!
//! The text form lists each valued field as it was received: HL7 escapes as sent (`\F\`,
//! `\S\`…), characters decoded from the message's character set, and control
//! characters (and bytes the character set cannot decode) as `\xNN`. Nothing else is
//! escaped, so `O'DONNELL` reads `O'DONNELL` and a `|` can only be a real separator.
//! `--path` prints decoded values, one a line; `--json` gives the decoded structure.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use passerelle_hl7::{Charset, HeaderSummary, Message, OwnedMessage, Path};
use serde_json::{Value as Json, json};

use crate::output::{Output, errln, outln};

#[derive(Debug, Args)]
pub(crate) struct ParseArgs {
    /// Files holding one message, several concatenated messages, or a batch (FHS/BHS).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print only the values at this path (e.g. `PID-5.1`, `PID-3[*].1`, `OBX[2]-5`),
    /// decoded, one a line.
    #[arg(long)]
    path: Option<String>,
    /// One JSON object per message: segments → fields → repetitions → components →
    /// subcomponents, decoded to UTF-8.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &ParseArgs) -> ExitCode {
    let path = match args.path.as_deref().map(str::parse::<Path>).transpose() {
        Ok(p) => p,
        Err(e) => {
            errln!("passerelle parse: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = Output::stdout();
    let failures = crate::input::for_each_message(&args.files, |label, message| {
        if args.json {
            print_json(&mut out, label, message, path.as_ref());
        } else {
            print_text(&mut out, label, message, path.as_ref());
        }
        // Nobody reads any more (`| head`): the rest would be parsed for nothing.
        if out.is_open() {
            ControlFlow::Continue(true)
        } else {
            ControlFlow::Break(())
        }
    });
    let status = if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    out.finish("parse", status)
}

fn print_json(
    out: &mut Output<std::io::Stdout>,
    label: &str,
    message: &Message<'_>,
    path: Option<&Path>,
) {
    let header = HeaderSummary::of(message);
    let mut doc = json!({
        "file": label,
        "type": header.kind(),
        "control_id": header.control_id,
        "version": header.version,
        "charset": message.charset().label(),
        "quirks": message.quirks().names(),
    });
    if let Some(path) = path {
        let values: Vec<Json> = message
            .iter(path)
            .map(|v| Json::String(v.text().into_owned()))
            .collect();
        doc["path"] = json!(path.to_string());
        doc["values"] = Json::Array(values);
    } else {
        let owned = OwnedMessage::from_message(message);
        let segments: Vec<Json> = owned
            .segments
            .iter()
            .map(|s| json!({ "id": s.id, "fields": s.fields }))
            .collect();
        doc["segments"] = Json::Array(segments);
    }
    outln!(out, "{doc}");
}

fn print_text(
    out: &mut Output<std::io::Stdout>,
    label: &str,
    message: &Message<'_>,
    path: Option<&Path>,
) {
    if let Some(path) = path {
        for value in message.iter(path) {
            outln!(out, "{}", value.text());
        }
        return;
    }
    let header = HeaderSummary::of(message);
    let quirks = message.quirks().names();
    let tolerated = if quirks.is_empty() {
        String::new()
    } else {
        format!(", tolerated: {}", quirks.join(", "))
    };
    outln!(
        out,
        "{label}: {} v{}, control id {}, {} segments, charset {}{tolerated}",
        header.kind(),
        header.version,
        header.control_id,
        message.segment_count(),
        message.charset().label()
    );
    for segment in message.segments() {
        for (n, field) in segment.fields().enumerate() {
            if !field.is_empty() {
                outln!(
                    out,
                    "  {}-{:<3} {}",
                    segment.id(),
                    n + 1,
                    as_received(field.raw(), message.charset())
                );
            }
        }
    }
}

/// A field's bytes as received, readable on one line: characters decoded from `charset`,
/// HL7 escapes left as they are, and control characters (and bytes `charset` cannot
/// decode) as `\xNN`.
fn as_received(raw: &[u8], charset: Charset) -> String {
    fn push_char(shown: &mut String, c: char) {
        if c.is_control() {
            shown.push_str(&format!("\\x{:02X}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    let mut shown = String::with_capacity(raw.len());
    match charset {
        Charset::Utf8 => {
            for chunk in raw.utf8_chunks() {
                for c in chunk.valid().chars() {
                    push_char(&mut shown, c);
                }
                for b in chunk.invalid() {
                    shown.push_str(&format!("\\x{b:02X}"));
                }
            }
        }
        Charset::Ascii => {
            for &b in raw {
                if b.is_ascii() {
                    push_char(&mut shown, char::from(b));
                } else {
                    shown.push_str(&format!("\\x{b:02X}"));
                }
            }
        }
        Charset::Latin1 | Charset::Latin9 => {
            for c in charset.decode(raw).chars() {
                push_char(&mut shown, c);
            }
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_as_received() {
        assert_eq!(
            as_received(b"O'DONNELL^JOHN", Charset::Ascii),
            "O'DONNELL^JOHN"
        );
        assert_eq!(as_received(b"A\\F\\B", Charset::Ascii), "A\\F\\B");
        assert_eq!(as_received(b"a\tb\x7f", Charset::Ascii), "a\\x09b\\x7F");
        assert_eq!(as_received(b"caf\xe9", Charset::Ascii), "caf\\xE9");
        assert_eq!(as_received(b"caf\xe9", Charset::Latin1), "café");
        assert_eq!(as_received("café".as_bytes(), Charset::Utf8), "café");
        assert_eq!(as_received(b"caf\xe9!", Charset::Utf8), "caf\\xE9!");
        assert_eq!(as_received("a\u{85}b".as_bytes(), Charset::Utf8), "a\\x85b");
    }
}

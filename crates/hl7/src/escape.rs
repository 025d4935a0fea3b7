//! Escape sequences (HL7 v2 chapter 2, "Use of escape sequences in text fields").
//!
//! Decoding works on bytes, before character-set decoding, because `\Xhh\` yields bytes in
//! the message's character set. Unknown sequences (`\Cxxyy\`, `\Mxxyyzz\`, `\Zxxx\`) and an
//! unterminated escape are kept verbatim, as the standard asks of a receiver that does not
//! support them: nothing is silently dropped.

use std::borrow::Cow;

use memchr::memchr;

use crate::value::find_byte;

use crate::Separators;

/// Decodes the escape sequences in `raw`. Borrows when there are none.
pub fn unescape<'a>(raw: &'a [u8], separators: &Separators) -> Cow<'a, [u8]> {
    let Some(esc) = separators.escape else {
        return Cow::Borrowed(raw);
    };
    let Some(first) = find_byte(esc, raw) else {
        return Cow::Borrowed(raw);
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..first]);
    let mut rest = &raw[first..];
    while let Some(pos) = memchr(esc, rest) {
        out.extend_from_slice(&rest[..pos]);
        let after = &rest[pos + 1..];
        let Some(close) = memchr(esc, after) else {
            // Unterminated: keep the rest as it is.
            out.extend_from_slice(&rest[pos..]);
            return Cow::Owned(out);
        };
        let body = &after[..close];
        if !decode_sequence(body, separators, &mut out) {
            out.push(esc);
            out.extend_from_slice(body);
            out.push(esc);
        }
        rest = &after[close + 1..];
    }
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// Appends what the escape sequence `body` (between the two escape characters) stands for.
/// Returns false for a sequence passerelle does not interpret.
fn decode_sequence(body: &[u8], s: &Separators, out: &mut Vec<u8>) -> bool {
    match body {
        b"F" => out.push(s.field),
        b"S" => out.push(s.component),
        b"T" => out.push(s.subcomponent),
        b"R" => out.push(s.repetition),
        b"E" => out.push(s.escape.unwrap_or(b'\\')),
        b"P" => match s.truncation {
            Some(t) => out.push(t),
            None => return false,
        },
        // Highlighting on/off: text has no highlighting, so the markers go.
        b"H" | b"N" => {}
        [b'X', hex @ ..] => {
            if hex.is_empty() || hex.len() % 2 != 0 {
                return false;
            }
            let start = out.len();
            for pair in hex.chunks_exact(2) {
                match (hex_digit(pair[0]), hex_digit(pair[1])) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => {
                        out.truncate(start);
                        return false;
                    }
                }
            }
        }
        [b'.', command @ ..] => return decode_formatting(command, out),
        _ => return false,
    }
    true
}

/// Formatted-text commands (FT data type). Line breaks become `\n`; the layout commands
/// that have no plain-text meaning (indent, centre, fill) are dropped.
fn decode_formatting(command: &[u8], out: &mut Vec<u8>) -> bool {
    let (name, arg) = command.split_at(command.len().min(2));
    let count = || -> Option<usize> {
        let arg = arg.trim_ascii();
        if arg.is_empty() {
            return Some(1);
        }
        let text = std::str::from_utf8(arg).ok()?;
        text.trim_start_matches('+')
            .parse::<usize>()
            .ok()
            .map(|n| n.min(100))
    };
    match name {
        b"br" if arg.is_empty() => out.push(b'\n'),
        b"sp" => out.extend(std::iter::repeat_n(b'\n', count().unwrap_or(1))),
        b"sk" => out.extend(std::iter::repeat_n(b' ', count().unwrap_or(1))),
        b"in" | b"ti" | b"ce" | b"fi" | b"nf" => {}
        _ => return false,
    }
    true
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `text`'s bytes (already in the target character set) with every delimiter,
/// CR and LF escaped. When the message declares no escape character nothing can be
/// escaped: the bytes are copied as they are, and the caller must refuse text holding a
/// delimiter or a control byte ([`OwnedMessage::write`](crate::OwnedMessage::write) does).
pub fn escape_into(bytes: &[u8], s: &Separators, out: &mut Vec<u8>) {
    let Some(esc) = s.escape else {
        out.extend_from_slice(bytes);
        return;
    };
    // `\.br\` would be cut in two if `.` is itself a delimiter: use the hex form then.
    let line_break: &[u8] = if s.is_delimiter(b'.') { b"X0A" } else { b".br" };
    for &b in bytes {
        let code: Option<&[u8]> = match b {
            _ if b == s.field => Some(b"F"),
            _ if b == s.component => Some(b"S"),
            _ if b == s.subcomponent => Some(b"T"),
            _ if b == s.repetition => Some(b"R"),
            _ if b == esc => Some(b"E"),
            _ if Some(b) == s.truncation => Some(b"P"),
            b'\n' => Some(line_break),
            _ => None,
        };
        if let Some(code) = code {
            out.push(esc);
            out.extend_from_slice(code);
            out.push(esc);
        } else if b < 0x20 && b != b'\t' {
            // Other control bytes (CR included) are forbidden in HL7 text: hex-escape them.
            out.extend_from_slice(&[
                esc,
                b'X',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
                esc,
            ]);
        } else {
            out.push(b);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Escapes `text` in the default way (UTF-8 bytes).
pub fn escape(text: &str, separators: &Separators) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    escape_into(text.as_bytes(), separators, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(raw: &str) -> String {
        String::from_utf8(unescape(raw.as_bytes(), &Separators::default()).into_owned()).unwrap()
    }

    #[test]
    fn decodes_every_standard_sequence() {
        assert_eq!(un(r"a\F\b\S\c\T\d\R\e\E\f"), "a|b^c&d~e\\f");
        assert_eq!(un(r"line1\.br\line2"), "line1\nline2");
        assert_eq!(un(r"\H\bold\N\ text"), "bold text");
        assert_eq!(un(r"\X0D0A\"), "\r\n");
        assert_eq!(un(r"\X41\\X4243\"), "ABC");
    }

    #[test]
    fn borrows_without_escapes() {
        assert!(matches!(
            unescape(b"plain", &Separators::default()),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn keeps_unknown_and_broken_sequences() {
        assert_eq!(un(r"\Zcustom\"), r"\Zcustom\");
        assert_eq!(un(r"\X4\"), r"\X4\");
        assert_eq!(un(r"\XZZ\"), r"\XZZ\");
        assert_eq!(un(r"tail\F"), r"tail\F");
        assert_eq!(un(r"\P\"), r"\P\");
        assert_eq!(un(r"\.sp2\x"), "\n\nx");
        assert_eq!(un(r"\.in+4\x"), "x");
    }

    #[test]
    fn truncation_character_escape() {
        let s = Separators {
            truncation: Some(b'#'),
            ..Separators::default()
        };
        assert_eq!(unescape(br"a\P\b", &s).as_ref(), b"a#b");
        assert_eq!(escape("a#b", &s), br"a\P\b");
    }

    #[test]
    fn escape_then_unescape_is_identity() {
        let s = Separators::default();
        let text = "a|b^c&d~e\\f\ng\rh";
        let escaped = escape(text, &s);
        assert_eq!(escaped, br"a\F\b\S\c\T\d\R\e\E\f\.br\g\X0D\h");
        assert_eq!(unescape(&escaped, &s).as_ref(), text.as_bytes());
    }
}

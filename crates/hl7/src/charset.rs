//! Character sets named by MSH-18, decoded to Unicode and encoded back.
//!
//! Background: HL7 v2 text is bytes; MSH-18 (table 0211) says how to read them, and an
//! empty MSH-18 means ASCII. French feeds use `8859/15` (Latin-9, which has `€` and `œ`),
//! older European feeds `8859/1`, newer ones `UNICODE UTF-8`. `8859/1` is decoded as true
//! ISO-8859-1 (byte = code point), **not** as windows-1252, which the WHATWG "ISO-8859-1"
//! label means in browsers and `encoding_rs`: bytes 0x80–0x9F differ.

use std::borrow::Cow;

/// A character set passerelle decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Charset {
    /// `ASCII` (or an empty MSH-18): 7-bit only.
    Ascii,
    /// `8859/1`: ISO-8859-1, Latin-1.
    Latin1,
    /// `8859/15`: ISO-8859-15, Latin-9 (Latin-1 with `€ Š š Ž ž Œ œ Ÿ`).
    Latin9,
    /// `UNICODE UTF-8`.
    Utf8,
}

/// How a label from MSH-18 was understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Label {
    /// A table 0211 value.
    Standard(Charset),
    /// A label outside table 0211 that plainly means one we know (`UTF-8`, `ISO-8859-1`…).
    Alias(Charset),
    Unknown,
}

/// The eight code points where ISO-8859-15 differs from ISO-8859-1.
const LATIN9_DIFF: [(u8, char); 8] = [
    (0xA4, '€'),
    (0xA6, 'Š'),
    (0xA8, 'š'),
    (0xB4, 'Ž'),
    (0xB8, 'ž'),
    (0xBC, 'Œ'),
    (0xBD, 'œ'),
    (0xBE, 'Ÿ'),
];

impl Charset {
    /// The table 0211 label, as written in MSH-18.
    pub fn label(self) -> &'static str {
        match self {
            Charset::Ascii => "ASCII",
            Charset::Latin1 => "8859/1",
            Charset::Latin9 => "8859/15",
            Charset::Utf8 => "UNICODE UTF-8",
        }
    }

    /// The character set a table 0211 label or a common alias names (`UNICODE UTF-8`,
    /// `UTF-8`, `8859/15`, `ISO-8859-15`…), for settings; `None` for any other text.
    pub fn from_name(name: &str) -> Option<Charset> {
        match Charset::from_label(name.as_bytes()) {
            Label::Standard(c) | Label::Alias(c) => Some(c),
            Label::Unknown => None,
        }
    }

    /// Understands an MSH-18 value (case and surrounding blanks ignored).
    pub(crate) fn from_label(raw: &[u8]) -> Label {
        let label = raw.trim_ascii();
        let is = |s: &str| label.eq_ignore_ascii_case(s.as_bytes());
        if is("ASCII") {
            Label::Standard(Charset::Ascii)
        } else if is("8859/1") {
            Label::Standard(Charset::Latin1)
        } else if is("8859/15") {
            Label::Standard(Charset::Latin9)
        } else if is("UNICODE UTF-8") {
            Label::Standard(Charset::Utf8)
        } else if is("UTF-8") || is("UTF8") || is("UNICODE UTF8") {
            Label::Alias(Charset::Utf8)
        } else if is("ISO-8859-1") || is("ISO8859-1") || is("ISO_8859-1") || is("LATIN1") {
            Label::Alias(Charset::Latin1)
        } else if is("ISO-8859-15") || is("ISO8859-15") || is("ISO_8859-15") || is("LATIN9") {
            Label::Alias(Charset::Latin9)
        } else if is("US-ASCII") {
            Label::Alias(Charset::Ascii)
        } else {
            Label::Unknown
        }
    }

    /// Whether every byte of `bytes` is valid in this character set.
    pub fn is_valid(self, bytes: &[u8]) -> bool {
        match self {
            Charset::Ascii => bytes.is_ascii(),
            Charset::Latin1 | Charset::Latin9 => true,
            Charset::Utf8 => std::str::from_utf8(bytes).is_ok(),
        }
    }

    /// Offset of the first byte that is invalid in this character set.
    pub fn first_invalid(self, bytes: &[u8]) -> Option<usize> {
        match self {
            Charset::Ascii => bytes.iter().position(|b| !b.is_ascii()),
            Charset::Latin1 | Charset::Latin9 => None,
            Charset::Utf8 => std::str::from_utf8(bytes).err().map(|e| e.valid_up_to()),
        }
    }

    /// Decodes bytes to text. Borrows when the bytes are already valid UTF-8 text
    /// (always true for ASCII). Invalid bytes become U+FFFD: the parser has already
    /// checked and reported them, so this never fails.
    pub fn decode(self, bytes: &[u8]) -> Cow<'_, str> {
        if bytes.is_ascii() {
            // ASCII is valid UTF-8: no copy, whatever the character set.
            return Cow::Borrowed(std::str::from_utf8(bytes).unwrap_or_default());
        }
        match self {
            Charset::Utf8 => String::from_utf8_lossy(bytes),
            Charset::Ascii => Cow::Owned(
                bytes
                    .iter()
                    .map(|&b| if b.is_ascii() { b as char } else { '\u{FFFD}' })
                    .collect(),
            ),
            Charset::Latin1 => Cow::Owned(bytes.iter().map(|&b| b as char).collect()),
            Charset::Latin9 => Cow::Owned(bytes.iter().map(|&b| latin9_char(b)).collect()),
        }
    }

    /// Decodes owned bytes without copying them again when they are UTF-8 already.
    pub fn decode_owned(self, bytes: Vec<u8>) -> String {
        match self.decode(&bytes) {
            Cow::Borrowed(_) => String::from_utf8(bytes).unwrap_or_default(),
            Cow::Owned(s) => s,
        }
    }

    /// Encodes one character, or `None` when this character set cannot represent it.
    pub fn encode_char(self, c: char, out: &mut Vec<u8>) -> Option<()> {
        match self {
            Charset::Utf8 => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            Charset::Ascii if c.is_ascii() => out.push(c as u8),
            Charset::Ascii => return None,
            Charset::Latin1 => out.push(u8::try_from(u32::from(c)).ok()?),
            Charset::Latin9 => {
                if let Some(&(b, _)) = LATIN9_DIFF.iter().find(|(_, d)| *d == c) {
                    out.push(b);
                } else {
                    let b = u8::try_from(u32::from(c)).ok()?;
                    // The eight Latin-1 characters Latin-9 replaced are not representable.
                    if LATIN9_DIFF.iter().any(|(d, _)| *d == b) {
                        return None;
                    }
                    out.push(b);
                }
            }
        }
        Some(())
    }
}

fn latin9_char(b: u8) -> char {
    match LATIN9_DIFF.iter().find(|(d, _)| *d == b) {
        Some(&(_, c)) => c,
        None => b as char,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_is_not_windows_1252() {
        // 0x80 is a C1 control in ISO-8859-1, but '€' in windows-1252.
        assert_eq!(Charset::Latin1.decode(&[0x80]), "\u{80}");
        assert_eq!(Charset::Latin1.decode(&[0xE9, 0xA4]), "é¤");
    }

    #[test]
    fn latin9_has_euro_and_oe() {
        assert_eq!(Charset::Latin9.decode(&[0xA4, 0xBD, 0xE7]), "€œç");
        let mut out = Vec::new();
        for c in "€œç".chars() {
            Charset::Latin9.encode_char(c, &mut out).unwrap();
        }
        assert_eq!(out, [0xA4, 0xBD, 0xE7]);
        assert!(Charset::Latin9.encode_char('¤', &mut out).is_none());
    }

    #[test]
    fn ascii_borrows() {
        assert!(matches!(
            Charset::Latin9.decode(b"DUPONT"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_panicking() {
        assert_eq!(Charset::Utf8.decode(&[b'a', 0xFF]), "a\u{FFFD}");
        assert_eq!(Charset::Utf8.first_invalid(&[b'a', 0xFF]), Some(1));
        assert_eq!(Charset::Ascii.first_invalid(b"ab\xE9"), Some(2));
    }

    #[test]
    fn labels() {
        assert_eq!(
            Charset::from_label(b"8859/15"),
            Label::Standard(Charset::Latin9)
        );
        assert_eq!(
            Charset::from_label(b"unicode utf-8 "),
            Label::Standard(Charset::Utf8)
        );
        assert_eq!(Charset::from_label(b"UTF-8"), Label::Alias(Charset::Utf8));
        assert_eq!(Charset::from_label(b"ISO IR87"), Label::Unknown);
    }
}

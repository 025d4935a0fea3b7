//! The delimiters a message declares in MSH-1 and MSH-2 (or FHS/BHS for batches).

use nom::IResult;
use nom::Parser;
use nom::branch::alt;
use nom::bytes::complete::{tag, take_till};
use nom::number::complete::u8 as any_byte;

use crate::error::{ErrorKind, ParseError};

/// The five (v2.7+: six) delimiters of a message.
///
/// Background: HL7 v2 lets every message pick its own delimiters. MSH-1 is the field
/// separator (the byte right after `MSH`); MSH-2 lists, in order, the component,
/// repetition, escape and subcomponent separators, and since v2.7 a fifth character, the
/// truncation character. Almost every feed uses `|^~\&`, but some do not, so nothing in
/// passerelle assumes the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Separators {
    pub field: u8,
    pub component: u8,
    pub repetition: u8,
    /// `None` when MSH-2 declares no escape character (then nothing is unescaped).
    pub escape: Option<u8>,
    pub subcomponent: u8,
    /// The v2.7 truncation character (MSH-2's fifth character), when declared.
    pub truncation: Option<u8>,
}

impl Default for Separators {
    fn default() -> Self {
        Separators {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: Some(b'\\'),
            subcomponent: b'&',
            truncation: None,
        }
    }
}

/// What the header told us, and how unusual it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) separators: Separators,
    /// Offset of the field separator that ends MSH-2 (or of the end of the segment).
    pub(crate) msh2_end: usize,
    /// MSH-2 had fewer than four characters.
    pub(crate) short_encoding_characters: bool,
}

impl Separators {
    /// The encoding characters as they appear in MSH-2.
    pub fn encoding_characters(&self) -> Vec<u8> {
        let mut out = vec![self.component, self.repetition];
        if let Some(escape) = self.escape {
            out.push(escape);
        }
        out.push(self.subcomponent);
        if let Some(truncation) = self.truncation {
            out.push(truncation);
        }
        out
    }

    /// Whether `b` is any of the delimiters (including CR, which ends segments).
    pub fn is_delimiter(&self, b: u8) -> bool {
        b == self.field
            || b == self.component
            || b == self.repetition
            || b == self.subcomponent
            || Some(b) == self.escape
            || Some(b) == self.truncation
            || b == b'\r'
    }

    /// Reads MSH-1 and MSH-2 at the start of `input`, which must begin with
    /// `MSH`, `FHS` or `BHS`.
    pub(crate) fn parse_header(input: &[u8]) -> Result<Header, ParseError> {
        fn segment_tag(i: &[u8]) -> IResult<&[u8], &[u8]> {
            alt((tag(&b"MSH"[..]), tag(&b"FHS"[..]), tag(&b"BHS"[..]))).parse(i)
        }
        let Ok((rest, _)) = segment_tag(input) else {
            return Err(ParseError::at(ErrorKind::NotHl7, 0));
        };
        let Ok((rest, field)) = any_byte::<_, nom::error::Error<&[u8]>>(rest) else {
            return Err(ParseError::at(ErrorKind::TruncatedHeader, input.len()).in_field(1));
        };
        if !is_valid_separator(field) {
            return Err(ParseError::at(ErrorKind::BadSeparators, 3).in_field(1));
        }
        // MSH-2 runs up to the next field separator or the end of the segment.
        let (after, encoding) =
            take_till::<_, _, nom::error::Error<&[u8]>>(|b| b == field || b == b'\r' || b == b'\n')
                .parse(rest)
                .map_err(|_| ParseError::at(ErrorKind::TruncatedHeader, input.len()))?;
        let msh2_end = 4 + encoding.len();
        // A message header must go on past MSH-2 (a message has at least MSH-9..12);
        // batch headers (FHS, BHS) may stop there.
        let ends_segment = after.first().is_none_or(|&b| b == b'\r' || b == b'\n');
        if ends_segment && input.starts_with(b"MSH") {
            return Err(ParseError::at(ErrorKind::TruncatedHeader, msh2_end).in_field(2));
        }
        let bad = |at: usize| ParseError::at(ErrorKind::BadSeparators, 4 + at).in_field(2);
        let (separators, short) = match *encoding {
            [c, r, e, s, t] => (sep(field, c, r, Some(e), s, Some(t)), false),
            [c, r, e, s] => (sep(field, c, r, Some(e), s, None), false),
            // Background: some senders drop the escape character and send `^~&`.
            [c, r, b'&'] => (sep(field, c, r, None, b'&', None), true),
            [c, r, e] => (sep(field, c, r, Some(e), b'&', None), true),
            [c, r] => (sep(field, c, r, None, b'&', None), true),
            [] | [_] => {
                return Err(ParseError::at(ErrorKind::TruncatedHeader, msh2_end).in_field(2));
            }
            _ => return Err(bad(5)),
        };
        // Every delimiter must be punctuation and distinct from the others.
        for (i, &b) in encoding.iter().enumerate() {
            if !is_valid_separator(b) || b == field || encoding[..i].contains(&b) {
                return Err(bad(i));
            }
        }
        // A short MSH-2 leaves the subcomponent separator at its default `&`, which must
        // not collide with a declared delimiter.
        let sub = separators.subcomponent;
        if sub == field
            || short
                && (sub == separators.component
                    || sub == separators.repetition
                    || Some(sub) == separators.escape)
        {
            return Err(bad(encoding.len()));
        }
        Ok(Header {
            separators,
            msh2_end,
            short_encoding_characters: short,
        })
    }
}

fn sep(field: u8, c: u8, r: u8, e: Option<u8>, s: u8, t: Option<u8>) -> Separators {
    Separators {
        field,
        component: c,
        repetition: r,
        escape: e,
        subcomponent: s,
        truncation: t,
    }
}

/// A delimiter must be printable ASCII punctuation: not a letter, digit, blank or control.
fn is_valid_separator(b: u8) -> bool {
    b.is_ascii_punctuation()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_default_separators() {
        let h = Separators::parse_header(b"MSH|^~\\&|APP").unwrap();
        assert_eq!(h.separators, Separators::default());
        assert_eq!(h.msh2_end, 8);
        assert!(!h.short_encoding_characters);
    }

    #[test]
    fn reads_truncation_character() {
        let h = Separators::parse_header(b"MSH|^~\\&#|APP").unwrap();
        assert_eq!(h.separators.truncation, Some(b'#'));
    }

    #[test]
    fn reads_unusual_separators() {
        let h = Separators::parse_header(b"MSH!@%\\*!APP").unwrap();
        let s = h.separators;
        assert_eq!((s.field, s.component, s.repetition), (b'!', b'@', b'%'));
        assert_eq!((s.escape, s.subcomponent), (Some(b'\\'), b'*'));
    }

    #[test]
    fn tolerates_missing_escape_character() {
        let h = Separators::parse_header(b"MSH|^~&|APP").unwrap();
        assert_eq!(h.separators.escape, None);
        assert!(h.short_encoding_characters);
    }

    #[test]
    fn rejects_bad_headers() {
        let kind = |b: &[u8]| Separators::parse_header(b).unwrap_err().kind;
        assert_eq!(kind(b"PID|1"), ErrorKind::NotHl7);
        assert_eq!(kind(b"MSH"), ErrorKind::TruncatedHeader);
        assert_eq!(kind(b"MSH|^~"), ErrorKind::TruncatedHeader);
        assert_eq!(kind(b"MSH|^~\\&"), ErrorKind::TruncatedHeader);
        assert_eq!(kind(b"MSH|^^\\&|"), ErrorKind::BadSeparators);
        assert_eq!(kind(b"MSHA^~\\&A"), ErrorKind::BadSeparators);
        assert_eq!(kind(b"MSH|^~\\&X|"), ErrorKind::BadSeparators);
        assert_eq!(kind(b"MSH|^~\\&#$|"), ErrorKind::BadSeparators);
    }
}

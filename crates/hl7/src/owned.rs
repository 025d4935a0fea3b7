//! An owned, decoded message that can be built, modified and written back.
//!
//! Values are held decoded (Unicode, escapes resolved); [`OwnedMessage::write`] escapes
//! them and encodes them in the message's character set. Writing then parsing gives the
//! same message back (`parse(write(m)) == m`, up to trailing empty values, which HL7 does
//! not distinguish from absent ones). The explicit null is the two-character text `""`.

use crate::escape::escape_into;
use crate::message::{Message, is_header_segment};
use crate::path::{Path, Selector};
use crate::value::Level;
use crate::{Charset, Separators};

/// Subcomponents of a component.
pub type Component = Vec<String>;
/// Components of a repetition.
pub type Repetition = Vec<Component>;
/// Repetitions of a field.
pub type Field = Vec<Repetition>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSegment {
    pub id: String,
    /// `fields[0]` is field 1. For MSH/FHS/BHS, fields 1 and 2 are the delimiters; the
    /// writer always writes the message's [`Separators`] there.
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMessage {
    pub separators: Separators,
    pub charset: Charset,
    pub segments: Vec<OwnedSegment>,
}

/// Why a message could not be written or modified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("segment {segment} field {field}: a character is not representable in {charset:?}")]
    Unrepresentable {
        segment: usize,
        field: usize,
        charset: Charset,
    },
    #[error(
        "segment {segment} field {field}: a value needs escaping but MSH-2 declares no escape character"
    )]
    NoEscapeCharacter { segment: usize, field: usize },
    #[error("segment {segment}: {id:?} is not a valid segment id")]
    SegmentId { segment: usize, id: String },
    #[error("path {0} selects several values; setting needs one")]
    Wildcard(String),
    #[error("path {0} addresses the delimiters (MSH-1/MSH-2); change `separators` instead")]
    Delimiters(String),
}

impl OwnedMessage {
    /// A message with just an MSH segment declaring `separators` and, in MSH-18, `charset`
    /// (left empty for ASCII).
    pub fn new(separators: Separators, charset: Charset) -> OwnedMessage {
        let mut m = OwnedMessage {
            separators,
            charset,
            segments: vec![OwnedSegment {
                id: "MSH".to_owned(),
                fields: Vec::new(),
            }],
        };
        m.sync_delimiter_fields(0);
        if charset != Charset::Ascii {
            let msh18 = &mut m.segments[0].fields;
            msh18.resize(18, Vec::new());
            msh18[17] = vec![vec![vec![charset.label().to_owned()]]];
        }
        m
    }

    /// Decodes a parsed message.
    pub fn from_message(message: &Message<'_>) -> OwnedMessage {
        let segments = message
            .segments()
            .map(|seg| OwnedSegment {
                id: seg.id().to_owned(),
                fields: seg
                    .fields()
                    .map(|field| {
                        if field.level() == Level::Literal {
                            return vec![vec![vec![field.text().into_owned()]]];
                        }
                        field
                            .repetitions()
                            .map(|rep| {
                                rep.children()
                                    .map(|comp| {
                                        comp.children().map(|sub| sub.text().into_owned()).collect()
                                    })
                                    .collect()
                            })
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        let mut m = OwnedMessage {
            separators: message.separators(),
            charset: message.charset(),
            segments,
        };
        // MSH-1/MSH-2 always state `separators`, as the writer writes them (a short MSH-2
        // such as `^~\` reads with the default subcomponent separator, written out).
        for i in 0..m.segments.len() {
            m.sync_delimiter_fields(i);
        }
        m.normalize();
        m
    }

    /// Drops trailing empty subcomponents, components, repetitions and fields, which HL7
    /// treats as absent, so that equal messages compare equal.
    pub fn normalize(&mut self) {
        fn trim<T>(v: &mut Vec<T>, empty: impl Fn(&T) -> bool) {
            while v.last().is_some_and(&empty) {
                v.pop();
            }
        }
        for seg in &mut self.segments {
            for field in &mut seg.fields {
                for rep in field.iter_mut() {
                    for comp in rep.iter_mut() {
                        trim(comp, String::is_empty);
                    }
                    trim(rep, Vec::is_empty);
                }
                trim(field, Vec::is_empty);
            }
            trim(&mut seg.fields, Vec::is_empty);
        }
    }

    fn sync_delimiter_fields(&mut self, segment: usize) {
        let seps = self.separators;
        let seg = &mut self.segments[segment];
        if !is_header_segment(seg.id.as_bytes()) {
            return;
        }
        if seg.fields.len() < 2 {
            seg.fields.resize(2, Vec::new());
        }
        seg.fields[0] = vec![vec![vec![(seps.field as char).to_string()]]];
        seg.fields[1] = vec![vec![vec![
            String::from_utf8_lossy(&seps.encoding_characters()).into_owned(),
        ]]];
    }

    /// Sets the value at `path` (no `*`), creating the segment (appended at the end), the
    /// field, repetition, component and subcomponent as needed.
    pub fn set(&mut self, path: &Path, text: &str) -> Result<(), EncodeError> {
        let nth = |s: Selector| match s {
            Selector::Nth(n) => Ok(n as usize),
            Selector::All => Err(EncodeError::Wildcard(path.to_string())),
        };
        let occurrence = nth(path.occurrence())?;
        let id = path.segment_id().to_owned();
        let mut seen = 0;
        let mut index = None;
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.id == id {
                seen += 1;
                if seen == occurrence {
                    index = Some(i);
                    break;
                }
            }
        }
        let index = match index {
            Some(i) => i,
            None => {
                for _ in seen..occurrence {
                    self.segments.push(OwnedSegment {
                        id: id.clone(),
                        fields: Vec::new(),
                    });
                    let last = self.segments.len() - 1;
                    self.sync_delimiter_fields(last);
                }
                self.segments.len() - 1
            }
        };
        let Some(field_no) = path.field() else {
            return Ok(());
        };
        if field_no <= 2 && is_header_segment(id.as_bytes()) {
            return Err(EncodeError::Delimiters(path.to_string()));
        }
        let fields = &mut self.segments[index].fields;
        let field = grow(fields, field_no as usize);
        let rep = grow(field, nth(path.repetition())?);
        // Setting a whole repetition (or component) replaces its parts.
        if path.component().is_none() {
            rep.truncate(1);
        }
        let comp = grow(rep, path.component().unwrap_or(1) as usize);
        if path.subcomponent().is_none() {
            comp.truncate(1);
        }
        *grow(comp, path.subcomponent().unwrap_or(1) as usize) = text.to_owned();
        Ok(())
    }

    /// Writes the message: CR after each segment, values escaped and encoded in
    /// [`charset`](Self::charset).
    pub fn write(&self) -> Result<Vec<u8>, EncodeError> {
        let s = self.separators;
        let mut out = Vec::with_capacity(1024);
        let mut scratch = Vec::new();
        for (si, seg) in self.segments.iter().enumerate() {
            let valid_id = matches!(seg.id.as_bytes(), [a, b, c] if a.is_ascii_uppercase()
                && (b.is_ascii_uppercase() || b.is_ascii_digit())
                && (c.is_ascii_uppercase() || c.is_ascii_digit()));
            if !valid_id {
                return Err(EncodeError::SegmentId {
                    segment: si + 1,
                    id: seg.id.clone(),
                });
            }
            out.extend_from_slice(seg.id.as_bytes());
            let header = is_header_segment(seg.id.as_bytes());
            let skip = if header {
                out.push(s.field);
                out.extend_from_slice(&s.encoding_characters());
                2
            } else {
                0
            };
            let last = seg
                .fields
                .iter()
                .rposition(|f| !f.is_empty())
                .map_or(0, |p| p + 1);
            for (fi, field) in seg.fields.iter().enumerate().take(last).skip(skip) {
                out.push(s.field);
                for (ri, rep) in field.iter().enumerate() {
                    if ri > 0 {
                        out.push(s.repetition);
                    }
                    for (ci, comp) in rep.iter().enumerate() {
                        if ci > 0 {
                            out.push(s.component);
                        }
                        for (ki, sub) in comp.iter().enumerate() {
                            if ki > 0 {
                                out.push(s.subcomponent);
                            }
                            self.write_leaf(sub, &mut scratch, &mut out)
                                .map_err(|e| e.at(si + 1, fi + 1, self.charset))?;
                        }
                    }
                }
            }
            out.push(b'\r');
        }
        Ok(out)
    }

    fn write_leaf(
        &self,
        text: &str,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), LeafError> {
        let bytes: &[u8] = if self.charset == Charset::Utf8 || text.is_ascii() {
            text.as_bytes()
        } else {
            scratch.clear();
            for c in text.chars() {
                self.charset
                    .encode_char(c, scratch)
                    .ok_or(LeafError::Unrepresentable)?;
            }
            scratch
        };
        if self.separators.escape.is_none()
            && bytes
                .iter()
                .any(|&b| self.separators.is_delimiter(b) || b < 0x20)
        {
            return Err(LeafError::NoEscape);
        }
        escape_into(bytes, &self.separators, out);
        Ok(())
    }
}

enum LeafError {
    Unrepresentable,
    NoEscape,
}

impl LeafError {
    fn at(self, segment: usize, field: usize, charset: Charset) -> EncodeError {
        match self {
            LeafError::Unrepresentable => EncodeError::Unrepresentable {
                segment,
                field,
                charset,
            },
            LeafError::NoEscape => EncodeError::NoEscapeCharacter { segment, field },
        }
    }
}

fn grow<T: Default>(v: &mut Vec<T>, n: usize) -> &mut T {
    if v.len() < n {
        v.resize_with(n, T::default);
    }
    &mut v[n - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Path {
        s.parse().unwrap()
    }

    #[test]
    fn builds_and_round_trips() {
        let mut m = OwnedMessage::new(Separators::default(), Charset::Latin9);
        m.set(&p("MSH-9.1"), "ADT").unwrap();
        m.set(&p("MSH-9.2"), "A01").unwrap();
        m.set(&p("MSH-10"), "X1").unwrap();
        m.set(&p("MSH-12"), "2.5").unwrap();
        m.set(&p("PID-5.1"), "Œuvre|€ & co^").unwrap();
        m.set(&p("PID-3[2].4.2"), "1.2.250").unwrap();
        m.set(&p("OBX[2]-5"), "line1\nline2").unwrap();
        let bytes = m.write().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(r"uvre\F\"), "{text}");
        assert!(text.contains(r" \T\ co\S\"), "{text}");
        assert!(
            bytes.windows(2).any(|w| w == [0xBC, b'u']),
            "Œ encoded as Latin-9 0xBC"
        );
        let parsed = Message::parse(&bytes).unwrap();
        assert_eq!(parsed.charset(), Charset::Latin9);
        assert_eq!(parsed.text("PID-5.1").unwrap().unwrap(), "Œuvre|€ & co^");
        assert_eq!(parsed.text("PID-3[2].4.2").unwrap().unwrap(), "1.2.250");
        assert_eq!(parsed.count(&p("OBX[*]")), 2);
        assert_eq!(parsed.text("OBX[2]-5").unwrap().unwrap(), "line1\nline2");
        let mut expected = m.clone();
        expected.normalize();
        assert_eq!(OwnedMessage::from_message(&parsed), expected);
    }

    #[test]
    fn short_encoding_characters_round_trip() {
        // Found by fuzzing: MSH-2 `^~\` (no subcomponent separator) came back as `^~\&`.
        let bytes = b"MSH|^~\\|A&B|F|||20240101||ADT^A01|1|P|2.5\r";
        let m = Message::parse(bytes).unwrap();
        let owned = OwnedMessage::from_message(&m);
        let written = owned.write().unwrap();
        let again = OwnedMessage::from_message(&Message::parse(&written).unwrap());
        assert_eq!(again, owned);
        assert_eq!(
            again.segments[0].fields[1],
            vec![vec![vec!["^~\\&".to_owned()]]]
        );
        assert_eq!(
            again.segments[0].fields[2],
            vec![vec![vec!["A".to_owned(), "B".to_owned()]]]
        );
    }

    #[test]
    fn no_escape_character_means_backslashes_are_text() {
        // Found by fuzzing: with MSH-2 `^~&` a backslash is plain text and must stay so.
        let bytes = b"MSH|^~&|APP|F|||20240101||ADT^A01|1|P|2.5\rNTE|1||a\\X41\\b\r";
        let m = Message::parse(bytes).unwrap();
        assert_eq!(m.text("NTE-3").unwrap().as_deref(), Some("a\\X41\\b"));
        let owned = OwnedMessage::from_message(&m);
        let written = owned.write().unwrap();
        assert_eq!(
            OwnedMessage::from_message(&Message::parse(&written).unwrap()),
            owned
        );
        let mut with_delimiter = owned.clone();
        with_delimiter.set(&p("NTE-3"), "a|b").unwrap();
        assert!(matches!(
            with_delimiter.write(),
            Err(EncodeError::NoEscapeCharacter { .. })
        ));
    }

    #[test]
    fn refuses_what_it_cannot_write() {
        let mut m = OwnedMessage::new(Separators::default(), Charset::Latin1);
        m.set(&p("PID-5"), "€").unwrap();
        assert!(matches!(
            m.write(),
            Err(EncodeError::Unrepresentable {
                segment: 2,
                field: 5,
                ..
            })
        ));
        assert!(matches!(
            m.set(&p("PID-3[*]"), "x"),
            Err(EncodeError::Wildcard(_))
        ));
        assert!(matches!(
            m.set(&p("MSH-2"), "x"),
            Err(EncodeError::Delimiters(_))
        ));
    }
}

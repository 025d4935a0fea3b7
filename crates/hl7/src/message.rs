//! The parsed message: the input bytes plus an index of segments and fields.

use std::fmt;

use memchr::memchr3_iter;

use crate::charset::Label;
use crate::error::{ErrorKind, Location, ParseError};
use crate::value::{Encoding, Level, Value};
use crate::{Charset, Separators};

/// Leniencies. Each one is a deviation from the standard that real senders commit; each is
/// on by default where refusing it would only hurt the hospital, and each occurrence is
/// counted in [`Quirks`] so that operators can see which senders need fixing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptions {
    /// Accept LF and CRLF as segment terminators.
    ///
    /// Background: the standard terminator is CR alone (v2.5 §2.5.1). Messages that went
    /// through a file, a text editor or a Windows tool often end segments with LF or CRLF,
    /// and naive receivers then see one giant MSH segment and lose MSH-18.
    pub allow_lf_terminators: bool,
    /// Accept empty lines between segments (and before MSH).
    ///
    /// Background: produced by CRLF conversions and by senders that append a newline.
    pub allow_blank_lines: bool,
    /// Accept MSH-2 with fewer than four encoding characters.
    ///
    /// Background: some senders omit the escape character and send `^~&`; the standard
    /// requires all four (five since v2.7).
    pub allow_short_encoding_characters: bool,
    /// Skip a UTF-8 byte order mark (EF BB BF) before MSH.
    ///
    /// Background: HL7 v2 has no byte order mark, but files saved by Windows editors and
    /// some .NET senders start with one; read as text it hides the `MSH` that every
    /// message must start with.
    pub allow_byte_order_mark: bool,
    /// Require MSH-9 (message type), MSH-10 (control id) and MSH-12 (version), without
    /// which a message can be neither routed nor acknowledged properly.
    pub require_header_fields: bool,
    /// The character set to read the bytes in when MSH-18 is empty and the bytes are neither
    /// ASCII nor valid UTF-8, or when the bytes are invalid in the declared character set.
    /// `None` makes such messages an [`ErrorKind::InvalidBytes`] error.
    ///
    /// Background: an empty MSH-18 means ASCII, yet many feeds send Latin-1 or windows-1252
    /// accents without declaring them, or declare UTF-8 and send Latin-1. ISO-8859-1 can
    /// decode any byte, so it is the default fallback: the text stays readable and the
    /// mismatch is reported rather than the message refused.
    pub fallback_charset: Option<Charset>,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            allow_lf_terminators: true,
            allow_blank_lines: true,
            allow_short_encoding_characters: true,
            allow_byte_order_mark: true,
            require_header_fields: true,
            fallback_charset: Some(Charset::Latin1),
        }
    }
}

impl ParseOptions {
    /// The standard, without leniencies: every deviation is an error.
    pub fn strict() -> Self {
        ParseOptions {
            allow_lf_terminators: false,
            allow_blank_lines: false,
            allow_short_encoding_characters: false,
            allow_byte_order_mark: false,
            require_header_fields: true,
            fallback_charset: None,
        }
    }
}

/// The deviations from the standard that parsing tolerated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quirks {
    /// Segments terminated by LF alone.
    pub lf_terminators: u32,
    /// Segments terminated by CRLF.
    pub crlf_terminators: u32,
    /// Empty lines skipped.
    pub blank_lines: u32,
    /// The last segment has no terminator. Common and harmless; counted for completeness.
    pub missing_final_terminator: bool,
    /// MSH-2 had fewer than four encoding characters.
    pub short_encoding_characters: bool,
    /// A UTF-8 byte order mark preceded MSH.
    pub byte_order_mark: bool,
    /// MSH-18 used a label outside table 0211 (`UTF-8` for `UNICODE UTF-8`…).
    pub nonstandard_charset_label: bool,
    /// MSH-18 was empty but the bytes were not ASCII; the character set was guessed.
    pub undeclared_charset: bool,
    /// Byte offset of the first byte invalid in the declared character set; the fallback
    /// character set was used instead.
    pub mislabelled_charset_at: Option<u32>,
}

impl Quirks {
    /// Names of the quirks present, for counting and display.
    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut add = |on: bool, name| {
            if on {
                out.push(name);
            }
        };
        add(self.lf_terminators > 0, "lf_terminators");
        add(self.crlf_terminators > 0, "crlf_terminators");
        add(self.blank_lines > 0, "blank_lines");
        add(self.missing_final_terminator, "missing_final_terminator");
        add(self.short_encoding_characters, "short_encoding_characters");
        add(self.byte_order_mark, "byte_order_mark");
        add(self.nonstandard_charset_label, "nonstandard_charset_label");
        add(self.undeclared_charset, "undeclared_charset");
        add(self.mislabelled_charset_at.is_some(), "mislabelled_charset");
        out
    }

    pub fn is_empty(&self) -> bool {
        *self == Quirks::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

#[derive(Debug, Clone, Copy)]
struct SegmentEntry {
    id: [u8; 3],
    start: u32,
    end: u32,
    first_field: u32,
    field_count: u32,
}

/// A parsed HL7 v2 message. It borrows the input and holds an index: one entry per
/// segment and one per field, in two vectors. Repetitions, components and subcomponents
/// are found on access by scanning the field, so parsing allocates nothing per field.
#[derive(Clone)]
pub struct Message<'a> {
    bytes: &'a [u8],
    encoding: Encoding,
    segments: Vec<SegmentEntry>,
    fields: Vec<Span>,
    quirks: Quirks,
}

impl fmt::Debug for Message<'_> {
    // No content in Debug output: messages carry patient data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("len", &self.bytes.len())
            .field("segments", &self.segments.len())
            .field("encoding", &self.encoding)
            .field("quirks", &self.quirks)
            .finish()
    }
}

/// A segment of a message.
#[derive(Clone, Copy)]
pub struct Segment<'m, 'a> {
    message: &'m Message<'a>,
    index: usize,
}

impl fmt::Debug for Segment<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id())
            .field("index", &self.index)
            .field("fields", &self.field_count())
            .finish()
    }
}

impl<'a> Message<'a> {
    /// Parses one message with the default (lenient, counted) options.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        Self::parse_with(bytes, &ParseOptions::default())
    }

    /// Parses one message. Checks, in order: emptiness, the MSH header and its separators,
    /// forbidden control bytes, segment ids and terminators, the required MSH fields, and
    /// the character set; the first failure is returned.
    pub fn parse_with(bytes: &'a [u8], options: &ParseOptions) -> Result<Self, ParseError> {
        if u32::try_from(bytes.len()).is_err() {
            return Err(ParseError::at(ErrorKind::TooLarge, 0));
        }
        let mut quirks = Quirks::default();
        let bom = if options.allow_byte_order_mark {
            byte_order_mark_len(bytes)
        } else {
            0
        };
        quirks.byte_order_mark = bom > 0;
        let start = bom
            + bytes[bom..]
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
                .ok_or(ParseError::at(ErrorKind::Empty, 0))?;
        if start > bom {
            let lines = count_lines(&bytes[bom..start]);
            if lines > 0 && !options.allow_blank_lines || bytes[bom..start].contains(&b' ') {
                return Err(ParseError::at(ErrorKind::NotHl7, bom));
            }
            quirks.blank_lines += lines;
        }
        if !bytes[start..].starts_with(b"MSH") {
            return Err(ParseError::at(ErrorKind::NotHl7, start).in_segment(1, None));
        }
        let header = Separators::parse_header(&bytes[start..]).map_err(|mut e| {
            e.location.offset += start;
            e.in_segment(1, Some(*b"MSH"))
        })?;
        if header.short_encoding_characters {
            if !options.allow_short_encoding_characters {
                return Err(ParseError::at(ErrorKind::BadSeparators, start + 4)
                    .in_segment(1, Some(*b"MSH"))
                    .in_field(2));
            }
            quirks.short_encoding_characters = true;
        }
        let separators = header.separators;
        if let Some(offset) = first_forbidden_control(bytes) {
            return Err(locate(
                bytes,
                start,
                separators.field,
                ErrorKind::ControlCharacter,
                offset,
            ));
        }

        let mut message = Message {
            bytes,
            encoding: Encoding {
                separators,
                charset: Charset::Ascii,
            },
            segments: Vec::with_capacity(bytes.len() / 48 + 1),
            fields: Vec::with_capacity(bytes.len() / 8 + 4),
            quirks,
        };
        message.index_segments(start, options)?;
        if options.require_header_fields {
            message.check_header_fields()?;
        }
        message.encoding.charset = message.resolve_charset(options)?;
        Ok(message)
    }

    /// Builds the segment and field index in one pass over the delimiters.
    fn index_segments(&mut self, start: usize, options: &ParseOptions) -> Result<(), ParseError> {
        let bytes = self.bytes;
        let fs = self.encoding.separators.field;
        let mut seg_start = start;
        let mut field_start: Option<usize> = None;
        let mut skip_lf_at = usize::MAX;
        for pos in memchr3_iter(fs, b'\r', b'\n', &bytes[start..]) {
            let p = start + pos;
            if p == skip_lf_at {
                continue;
            }
            let b = bytes[p];
            match field_start {
                None if b != fs && p == seg_start => {
                    // A blank line.
                    if !options.allow_blank_lines {
                        return Err(ParseError::at(ErrorKind::BlankLine, p)
                            .in_segment(self.segments.len() as u32 + 1, None));
                    }
                    self.quirks.blank_lines += 1;
                    seg_start = self.after_terminator(p, &mut skip_lf_at, options)?;
                    continue;
                }
                None => {
                    self.open_segment(seg_start, p)?;
                    if b == fs {
                        if is_header_segment(&bytes[seg_start..p]) {
                            // MSH-1 is the field separator itself.
                            self.push_field(p, p + 1);
                        }
                        field_start = Some(p + 1);
                        continue;
                    }
                }
                Some(from) => {
                    self.push_field(from, p);
                    if b == fs {
                        field_start = Some(p + 1);
                        continue;
                    }
                }
            }
            // A terminator closes the segment.
            self.close_segment(p);
            field_start = None;
            seg_start = self.after_terminator(p, &mut skip_lf_at, options)?;
        }
        if seg_start < bytes.len() {
            match field_start {
                None => self.open_segment(seg_start, bytes.len())?,
                Some(from) => self.push_field(from, bytes.len()),
            }
            self.close_segment(bytes.len());
            self.quirks.missing_final_terminator = true;
        }
        Ok(())
    }

    fn open_segment(&mut self, start: usize, id_end: usize) -> Result<(), ParseError> {
        let id = &self.bytes[start..id_end];
        let index = self.segments.len() as u32 + 1;
        let valid = matches!(id, [a, b, c] if a.is_ascii_uppercase()
            && (b.is_ascii_uppercase() || b.is_ascii_digit())
            && (c.is_ascii_uppercase() || c.is_ascii_digit()));
        if !valid {
            return Err(ParseError::at(ErrorKind::InvalidSegmentId, start).in_segment(index, None));
        }
        if index > 1 && matches!(id, b"MSH" | b"FHS" | b"BHS" | b"BTS" | b"FTS") {
            let id = [id[0], id[1], id[2]];
            return Err(
                ParseError::at(ErrorKind::UnexpectedHeader, start).in_segment(index, Some(id))
            );
        }
        self.segments.push(SegmentEntry {
            id: [id[0], id[1], id[2]],
            start: start as u32,
            end: id_end as u32,
            first_field: self.fields.len() as u32,
            field_count: 0,
        });
        Ok(())
    }

    fn push_field(&mut self, start: usize, end: usize) {
        self.fields.push(Span {
            start: start as u32,
            end: end as u32,
        });
    }

    fn close_segment(&mut self, end: usize) {
        let count = self.fields.len() as u32;
        if let Some(segment) = self.segments.last_mut() {
            segment.end = end as u32;
            segment.field_count = count - segment.first_field;
        }
    }

    /// Where the next segment starts after the terminator at `p`, counting LF and CRLF.
    fn after_terminator(
        &mut self,
        p: usize,
        skip_lf_at: &mut usize,
        options: &ParseOptions,
    ) -> Result<usize, ParseError> {
        let bytes = self.bytes;
        if bytes[p] == b'\r' {
            if bytes.get(p + 1) == Some(&b'\n') {
                if !options.allow_lf_terminators {
                    return Err(self.lf_error(p + 1));
                }
                self.quirks.crlf_terminators += 1;
                *skip_lf_at = p + 1;
                return Ok(p + 2);
            }
        } else {
            if !options.allow_lf_terminators {
                return Err(self.lf_error(p));
            }
            self.quirks.lf_terminators += 1;
        }
        Ok(p + 1)
    }

    fn lf_error(&self, offset: usize) -> ParseError {
        let (index, id) = match self.segments.last() {
            Some(s) => (self.segments.len() as u32, Some(s.id)),
            None => (1, None),
        };
        ParseError::at(ErrorKind::LfTerminator, offset).in_segment(index, id)
    }

    fn check_header_fields(&self) -> Result<(), ParseError> {
        let msh = self.segment(0).expect("parse guarantees an MSH segment");
        for n in [9, 10, 12] {
            // The first component must carry some text once decoded: `^A01` has no message
            // type, and delimiters (`^`, `&`) or markup (`\H\`) alone are no value.
            if msh
                .field(n)
                .and_then(|f| f.component(1))
                .is_none_or(|c| c.children().all(|sub| sub.text().trim().is_empty()))
            {
                return Err(
                    ParseError::at(ErrorKind::MissingHeaderField, msh.field_offset(n))
                        .in_segment(1, Some(*b"MSH"))
                        .in_field(n as u32),
                );
            }
        }
        Ok(())
    }

    fn resolve_charset(&mut self, options: &ParseOptions) -> Result<Charset, ParseError> {
        let msh = self.segment(0).expect("parse guarantees an MSH segment");
        let first = msh.field(18).and_then(|f| f.repetitions().next());
        let label = first
            .map(|v| crate::escape::unescape(v.raw(), &self.encoding.separators))
            .unwrap_or_default();
        let label = label.as_ref();
        let declared = if label.trim_ascii().is_empty() {
            None
        } else {
            match Charset::from_label(label) {
                Label::Standard(c) => Some(c),
                Label::Alias(c) => {
                    self.quirks.nonstandard_charset_label = true;
                    Some(c)
                }
                Label::Unknown => {
                    return Err(ParseError::at(
                        ErrorKind::UnsupportedCharset,
                        msh.field_offset(18),
                    )
                    .in_segment(1, Some(*b"MSH"))
                    .in_field(18));
                }
            }
        };
        let bytes = self.bytes;
        match declared {
            Some(charset) => match charset.first_invalid(bytes) {
                None => Ok(charset),
                Some(offset) => match options.fallback_charset {
                    Some(fallback) if fallback.is_valid(bytes) => {
                        self.quirks.mislabelled_charset_at = Some(offset as u32);
                        Ok(fallback)
                    }
                    _ => Err(self.invalid_bytes(offset)),
                },
            },
            None if bytes.is_ascii() => Ok(Charset::Ascii),
            None => {
                self.quirks.undeclared_charset = true;
                if Charset::Utf8.is_valid(bytes) {
                    Ok(Charset::Utf8)
                } else {
                    match options.fallback_charset {
                        Some(fallback) if fallback.is_valid(bytes) => Ok(fallback),
                        _ => {
                            Err(self.invalid_bytes(Charset::Utf8.first_invalid(bytes).unwrap_or(0)))
                        }
                    }
                }
            }
        }
    }

    fn invalid_bytes(&self, offset: usize) -> ParseError {
        locate(
            self.bytes,
            0,
            self.encoding.separators.field,
            ErrorKind::InvalidBytes,
            offset,
        )
    }

    /// The input bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn separators(&self) -> Separators {
        self.encoding.separators
    }

    /// The character set the text is decoded with (declared, or the fallback; see [`Quirks`]).
    pub fn charset(&self) -> Charset {
        self.encoding.charset
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// What parsing tolerated.
    pub fn quirks(&self) -> &Quirks {
        &self.quirks
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The segment at 0-based position `index`.
    #[inline]
    pub fn segment(&self, index: usize) -> Option<Segment<'_, 'a>> {
        (index < self.segments.len()).then_some(Segment {
            message: self,
            index,
        })
    }

    /// All segments in order.
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = Segment<'_, 'a>> + '_ {
        (0..self.segments.len()).map(move |index| Segment {
            message: self,
            index,
        })
    }

    /// The segments with id `id`, in order.
    pub fn segments_named<'s>(&'s self, id: &'s str) -> impl Iterator<Item = Segment<'s, 'a>> + 's {
        self.segments()
            .filter(move |s| s.id_bytes() == id.as_bytes())
    }

    /// The MSH segment.
    pub fn msh(&self) -> Segment<'_, 'a> {
        Segment {
            message: self,
            index: 0,
        }
    }
}

impl<'m, 'a> Segment<'m, 'a> {
    #[inline]
    fn entry(&self) -> &'m SegmentEntry {
        &self.message.segments[self.index]
    }

    /// The three-character segment id.
    pub fn id(&self) -> &'m str {
        // Validated as ASCII upper-case letters and digits when parsed.
        std::str::from_utf8(&self.entry().id).unwrap_or("???")
    }

    #[inline]
    pub fn id_bytes(&self) -> &'m [u8; 3] {
        &self.entry().id
    }

    /// The separators and character set of the message this segment belongs to.
    pub fn encoding(&self) -> Encoding {
        self.message.encoding
    }

    /// 0-based position in the message.
    #[inline]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The number of fields present (trailing empty fields sent with separators count).
    pub fn field_count(&self) -> usize {
        self.entry().field_count as usize
    }

    /// Byte offset of the segment in the input.
    pub fn offset(&self) -> usize {
        self.entry().start as usize
    }

    /// The segment's bytes, without its terminator.
    pub fn raw(&self) -> &'a [u8] {
        let e = self.entry();
        &self.message.bytes[e.start as usize..e.end as usize]
    }

    /// Field `n` (1-based, as in the spec), or `None` if the segment has fewer fields.
    /// MSH-1 and MSH-2 are returned literally.
    #[inline]
    pub fn field(&self, n: usize) -> Option<Value<'a>> {
        let e = self.entry();
        if n == 0 || n > e.field_count as usize {
            return None;
        }
        let span = self.message.fields[e.first_field as usize + n - 1];
        let level = if n <= 2 && is_header_segment(&e.id) {
            Level::Literal
        } else {
            Level::Field
        };
        Some(Value::new(
            &self.message.bytes[span.start as usize..span.end as usize],
            level,
            self.message.encoding,
        ))
    }

    /// All fields, from field 1.
    pub fn fields(&self) -> impl Iterator<Item = Value<'a>> + 'm {
        let this = *self;
        (1..=self.field_count()).filter_map(move |n| this.field(n))
    }

    /// Byte offset of field `n`, or of the segment's end when the field is absent.
    pub fn field_offset(&self, n: usize) -> usize {
        let e = self.entry();
        if n >= 1 && n <= e.field_count as usize {
            self.message.fields[e.first_field as usize + n - 1].start as usize
        } else {
            e.end as usize
        }
    }
}

/// The length of a UTF-8 byte order mark at the start of `bytes` (3), or 0.
pub(crate) fn byte_order_mark_len(bytes: &[u8]) -> usize {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    }
}

/// MSH, FHS and BHS number their fields from the field separator itself.
pub(crate) fn is_header_segment(id: &[u8]) -> bool {
    matches!(id, b"MSH" | b"FHS" | b"BHS")
}

fn count_lines(bytes: &[u8]) -> u32 {
    let mut lines = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                lines += 1;
                i += 1;
            }
            b'\r' | b'\n' => lines += 1,
            _ => {}
        }
        i += 1;
    }
    lines
}

/// Finds the first byte HL7 v2 never allows: C0 controls other than TAB, LF and CR.
/// Written to vectorise: a branch-free OR over fixed-size chunks, then a search in the
/// one chunk that has a hit.
pub(crate) fn first_forbidden_control(bytes: &[u8]) -> Option<usize> {
    #[inline(always)]
    fn forbidden(b: u8) -> bool {
        b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r'
    }
    const CHUNK: usize = 64;
    let mut chunks = bytes.chunks_exact(CHUNK);
    let mut offset = 0;
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |acc, &b| acc | forbidden(b)) {
            return chunk.iter().position(|&b| forbidden(b)).map(|p| offset + p);
        }
        offset += CHUNK;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| forbidden(b))
        .map(|p| offset + p)
}

/// Builds an error at `offset` with the segment index, id and field number around it.
/// Only used on the error path, so it rescans the bytes.
fn locate(bytes: &[u8], start: usize, fs: u8, kind: ErrorKind, offset: usize) -> ParseError {
    let end = offset.min(bytes.len());
    let mut index = 1u32;
    let mut seg_start = start;
    for (i, &b) in bytes.iter().enumerate().take(end).skip(start) {
        if matches!(b, b'\r' | b'\n') {
            // A terminator after a non-empty line starts the next segment.
            index += u32::from(i > seg_start);
            seg_start = i + 1;
        }
    }
    let line = &bytes[seg_start..end];
    let id = match bytes.get(seg_start..seg_start + 3) {
        Some(&[a, b, c]) if [a, b, c].iter().all(|x| x.is_ascii_alphanumeric()) => Some([a, b, c]),
        _ => None,
    };
    let separators_before = line.iter().filter(|&&b| b == fs).count() as u32;
    let field = match id {
        Some(id) if is_header_segment(&id) => Some(separators_before + 1),
        _ if separators_before > 0 => Some(separators_before),
        _ => None,
    };
    ParseError {
        kind,
        location: Location {
            offset,
            segment_index: Some(index),
            segment_id: id,
            field,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &[u8] =
        b"MSH|^~\\&|SEND|FAC|RECV|RFAC|20240101120000||ADT^A01^ADT_A01|MSG0001|P|2.5\r\
EVN|A01|20240101120000\r\
PID|1||123^^^HOSP^PI~456^^^NAT^NH||DOE^JOHN^^^^^L||19800101|M\r\
PV1|1|I|WARD^101^1\r";

    #[test]
    fn indexes_segments_and_fields() {
        let m = Message::parse(ADT).unwrap();
        assert_eq!(m.segment_count(), 4);
        let msh = m.msh();
        assert_eq!(msh.field(1).unwrap().text(), "|");
        assert_eq!(msh.field(2).unwrap().text(), "^~\\&");
        assert_eq!(msh.field(3).unwrap().text(), "SEND");
        assert_eq!(msh.field(10).unwrap().text(), "MSG0001");
        assert_eq!(msh.field(12).unwrap().text(), "2.5");
        assert!(msh.field(13).is_none());
        let pid = m.segment(2).unwrap();
        assert_eq!(pid.id(), "PID");
        assert_eq!(pid.field(1).unwrap().text(), "1");
        assert!(pid.field(2).unwrap().is_empty());
        assert_eq!(pid.field(5).unwrap().component(1).unwrap().text(), "DOE");
        assert!(m.quirks().is_empty());
        assert_eq!(m.charset(), Charset::Ascii);
    }

    #[test]
    fn tolerates_and_counts_lf_and_crlf() {
        let lf: Vec<u8> = ADT
            .iter()
            .map(|&b| if b == b'\r' { b'\n' } else { b })
            .collect();
        let m = Message::parse(&lf).unwrap();
        assert_eq!(m.segment_count(), 4);
        assert_eq!(m.quirks().lf_terminators, 4);
        let crlf = String::from_utf8(ADT.to_vec())
            .unwrap()
            .replace('\r', "\r\n");
        let m = Message::parse(crlf.as_bytes()).unwrap();
        assert_eq!(m.segment_count(), 4);
        assert_eq!(m.quirks().crlf_terminators, 4);
        assert_eq!(m.segment(3).unwrap().field(3).unwrap().text(), "WARD^101^1");
        let err = Message::parse_with(&lf, &ParseOptions::strict()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::LfTerminator);
        assert_eq!(err.location.segment_index, Some(1));
    }

    #[test]
    fn missing_final_terminator_is_counted() {
        let m = Message::parse(&ADT[..ADT.len() - 1]).unwrap();
        assert_eq!(m.segment_count(), 4);
        assert!(m.quirks().missing_final_terminator);
        assert_eq!(m.segment(3).unwrap().field(3).unwrap().text(), "WARD^101^1");
    }

    #[test]
    fn errors_are_located() {
        let mut bad = ADT.to_vec();
        let pos = bad.windows(3).position(|w| w == b"PV1").unwrap();
        bad[pos] = b'p';
        let err = Message::parse(&bad).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSegmentId);
        assert_eq!(err.location.offset, pos);
        assert_eq!(err.location.segment_index, Some(4));

        let mut bad = ADT.to_vec();
        let pid = bad.windows(3).position(|w| w == b"DOE").unwrap();
        bad[pid + 1] = 0x1C;
        let err = Message::parse(&bad).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ControlCharacter);
        assert_eq!(err.location.offset, pid + 1);
        assert_eq!(err.location.segment_index, Some(3));
        assert_eq!(err.location.segment_id, Some(*b"PID"));
        assert_eq!(err.location.field, Some(5));
        let text = err.to_string();
        assert!(text.contains("byte") && text.contains("PID-5"), "{text}");
        assert!(!text.contains("DOE"));
    }

    #[test]
    fn header_field_checks() {
        let bad = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01||P|2.5\r";
        let err = Message::parse(bad).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MissingHeaderField);
        assert_eq!(err.location.field, Some(10));
        // Found by fuzzing: delimiters only, or an empty first component, is no value.
        let cases: [(&[u8], u32); 4] = [
            (b"MSH|^~\\&|A|B|C|D|20240101||^A01|1|P|2.5\r", 9),
            (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|^\r", 12),
            (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|&~2.5\r", 12),
            (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|\\H\\\r", 12),
        ];
        for (bad, field) in cases {
            let err = Message::parse(bad).unwrap_err();
            assert_eq!(
                (err.kind, err.location.field),
                (ErrorKind::MissingHeaderField, Some(field))
            );
        }
    }

    #[test]
    fn charsets_are_resolved() {
        let latin9 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5|||||FRA|8859/15\rPID|1||1||\xC9LO\xBDSE\r";
        let m = Message::parse(latin9).unwrap();
        assert_eq!(m.charset(), Charset::Latin9);
        assert_eq!(m.segment(1).unwrap().field(5).unwrap().text(), "ÉLOœSE");

        let undeclared = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1||1||H\xE9l\xE8ne\r";
        let m = Message::parse(undeclared).unwrap();
        assert_eq!(m.charset(), Charset::Latin1);
        assert!(m.quirks().undeclared_charset);
        assert_eq!(m.segment(1).unwrap().field(5).unwrap().text(), "Hélène");

        let mislabelled = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5|||||FRA|UNICODE UTF-8\rPID|1||1||H\xE9l\xE8ne\r";
        let m = Message::parse(mislabelled).unwrap();
        assert_eq!(m.charset(), Charset::Latin1);
        let first_latin1 = mislabelled.iter().position(|&b| b == 0xE9).unwrap() as u32;
        assert_eq!(m.quirks().mislabelled_charset_at, Some(first_latin1));
        let err = Message::parse_with(mislabelled, &ParseOptions::strict()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidBytes);
        assert_eq!(err.location.segment_id, Some(*b"PID"));

        let unknown = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5|||||JPN|ISO IR87\r";
        let err = Message::parse(unknown).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnsupportedCharset);
        assert_eq!(err.location.field, Some(18));
    }

    #[test]
    fn byte_order_mark_is_tolerated_and_counted() {
        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(ADT);
        let m = Message::parse(&with_bom).unwrap();
        assert!(m.quirks().byte_order_mark);
        assert_eq!(m.msh().offset(), 3);
        assert_eq!(m.text("PID-5.1").unwrap().as_deref(), Some("DOE"));
        let err = Message::parse_with(&with_bom, &ParseOptions::strict()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotHl7);
    }

    #[test]
    fn several_messages_in_one_are_refused() {
        let mut two = ADT.to_vec();
        two.extend_from_slice(ADT);
        let err = Message::parse(&two).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnexpectedHeader);
        assert_eq!(err.location.segment_index, Some(5));
        assert_eq!(err.location.offset, ADT.len());
    }

    #[test]
    fn empty_and_not_hl7() {
        assert_eq!(Message::parse(b"").unwrap_err().kind, ErrorKind::Empty);
        assert_eq!(
            Message::parse(b"\r\n\r").unwrap_err().kind,
            ErrorKind::Empty
        );
        assert_eq!(
            Message::parse(b"PID|1").unwrap_err().kind,
            ErrorKind::NotHl7
        );
        assert_eq!(
            Message::parse(b"\x00\x01\x02").unwrap_err().kind,
            ErrorKind::NotHl7
        );
    }

    #[test]
    fn forbidden_control_scan_matches_naive() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            for bad_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut v = vec![b'A'; len];
                v.iter_mut().step_by(7).for_each(|b| *b = b'\r');
                if let Some(at) = bad_at.filter(|_| len > 0) {
                    v[at] = 0x1C;
                }
                let naive = v
                    .iter()
                    .position(|&b| b < 0x20 && !matches!(b, 9 | 10 | 13));
                assert_eq!(first_forbidden_control(&v), naive);
            }
        }
    }
}

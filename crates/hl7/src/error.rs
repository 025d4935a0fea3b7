//! Parse errors. An error says *where* (byte offset, segment, field) and *what kind*;
//! it never quotes message content, so it can be logged and sent back in an ERR segment
//! without leaking patient data.

use std::fmt;

/// What went wrong. Each kind maps to an HL7 table 0357 error code and to the
/// acknowledgement code a receiver should answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No bytes, or only blank lines.
    Empty,
    /// The input does not start with `MSH` (or `FHS`/`BHS` for a batch).
    NotHl7,
    /// The header ends before the encoding characters (MSH-2) are complete.
    TruncatedHeader,
    /// A separator is a letter, digit, space or terminator, or two separators are the same byte.
    BadSeparators,
    /// A byte in 0x00–0x08, 0x0B, 0x0C or 0x0E–0x1F: never valid in HL7 v2 text
    /// (0x0B and 0x1C are MLLP framing bytes).
    ControlCharacter,
    /// A segment id that is not three upper-case letters or digits starting with a letter.
    InvalidSegmentId,
    /// A second MSH, or a batch header or trailer (FHS, BHS, BTS, FTS), inside one message:
    /// several messages were sent as one. Split them with [`batch::split`](crate::batch::split).
    UnexpectedHeader,
    /// A segment terminated by LF while [`ParseOptions::allow_lf_terminators`](crate::ParseOptions) is off.
    LfTerminator,
    /// A blank line between segments while blank lines are not allowed.
    BlankLine,
    /// MSH-9, MSH-10 or MSH-12 is empty: the message cannot be routed or acknowledged.
    MissingHeaderField,
    /// MSH-18 names a character set passerelle does not decode.
    UnsupportedCharset,
    /// The bytes are not valid in the declared character set and no fallback is configured.
    InvalidBytes,
    /// The input is larger than 4 GiB (offsets are 32-bit).
    TooLarge,
    /// A batch trailer (BTS-1, FTS-1) count disagrees with what the batch holds.
    BatchCountMismatch,
    /// Batch header and trailer segments out of order or unbalanced.
    BatchStructure,
}

impl ErrorKind {
    /// A stable snake_case name, used in fixtures, JSON output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Empty => "empty",
            ErrorKind::NotHl7 => "not_hl7",
            ErrorKind::TruncatedHeader => "truncated_header",
            ErrorKind::BadSeparators => "bad_separators",
            ErrorKind::ControlCharacter => "control_character",
            ErrorKind::InvalidSegmentId => "invalid_segment_id",
            ErrorKind::UnexpectedHeader => "unexpected_header",
            ErrorKind::LfTerminator => "lf_terminator",
            ErrorKind::BlankLine => "blank_line",
            ErrorKind::MissingHeaderField => "missing_header_field",
            ErrorKind::UnsupportedCharset => "unsupported_charset",
            ErrorKind::InvalidBytes => "invalid_bytes",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::BatchCountMismatch => "batch_count_mismatch",
            ErrorKind::BatchStructure => "batch_structure",
        }
    }

    /// A one-line explanation for people (no message content).
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::Empty => "the input is empty",
            ErrorKind::NotHl7 => "the input does not start with an MSH segment",
            ErrorKind::TruncatedHeader => "the MSH segment ends before its encoding characters",
            ErrorKind::BadSeparators => {
                "the separators in MSH-1/MSH-2 are invalid (letters, digits, blanks or duplicates)"
            }
            ErrorKind::ControlCharacter => "a control character that HL7 v2 forbids",
            ErrorKind::InvalidSegmentId => {
                "a segment id is not 3 upper-case letters or digits starting with a letter"
            }
            ErrorKind::UnexpectedHeader => {
                "a message or batch header inside a message (several messages sent as one)"
            }
            ErrorKind::LfTerminator => "a segment ends with LF instead of CR",
            ErrorKind::BlankLine => "a blank line between segments",
            ErrorKind::MissingHeaderField => "a required MSH field is empty",
            ErrorKind::UnsupportedCharset => "MSH-18 names an unsupported character set",
            ErrorKind::InvalidBytes => "bytes that are invalid in the declared character set",
            ErrorKind::TooLarge => "the input is larger than 4 GiB",
            ErrorKind::BatchCountMismatch => "a batch trailer count does not match its content",
            ErrorKind::BatchStructure => "batch header and trailer segments are out of order",
        }
    }

    /// The HL7 table 0357 ("Message error condition codes") code for this kind.
    pub fn hl7_error_code(self) -> ErrorCode {
        match self {
            ErrorKind::Empty
            | ErrorKind::NotHl7
            | ErrorKind::TruncatedHeader
            | ErrorKind::BadSeparators
            | ErrorKind::InvalidSegmentId
            | ErrorKind::UnexpectedHeader
            | ErrorKind::LfTerminator
            | ErrorKind::BlankLine
            | ErrorKind::BatchCountMismatch
            | ErrorKind::BatchStructure => ErrorCode::SegmentSequenceError,
            ErrorKind::MissingHeaderField => ErrorCode::RequiredFieldMissing,
            ErrorKind::ControlCharacter
            | ErrorKind::UnsupportedCharset
            | ErrorKind::InvalidBytes => ErrorCode::DataTypeError,
            ErrorKind::TooLarge => ErrorCode::ApplicationInternalError,
        }
    }

    /// Whether a message with this error should be rejected (AR/CR: the receiver
    /// cannot even interpret it) rather than errored (AE/CE: understood but bad content).
    pub fn is_reject(self) -> bool {
        !matches!(
            self,
            ErrorKind::ControlCharacter
                | ErrorKind::InvalidSegmentId
                | ErrorKind::LfTerminator
                | ErrorKind::BlankLine
                | ErrorKind::InvalidBytes
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// HL7 table 0357, message error condition codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    MessageAccepted,
    SegmentSequenceError,
    RequiredFieldMissing,
    DataTypeError,
    TableValueNotFound,
    UnsupportedMessageType,
    UnsupportedEventCode,
    UnsupportedProcessingId,
    UnsupportedVersionId,
    UnknownKeyIdentifier,
    DuplicateKeyIdentifier,
    ApplicationRecordLocked,
    ApplicationInternalError,
}

impl ErrorCode {
    /// The numeric code of table 0357.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::MessageAccepted => 0,
            ErrorCode::SegmentSequenceError => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataTypeError => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationRecordLocked => 206,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The display text of table 0357.
    pub fn text(self) -> &'static str {
        match self {
            ErrorCode::MessageAccepted => "Message accepted",
            ErrorCode::SegmentSequenceError => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataTypeError => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationRecordLocked => "Application record locked",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }
}

/// Where an error was found. Segment indexes are 1-based positions in the message
/// (MSH = 1); field numbers follow the spec (MSH-1 is the field separator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    /// Byte offset in the input.
    pub offset: usize,
    /// 1-based index of the segment in the message, when known.
    pub segment_index: Option<u32>,
    /// The segment id, when it is a valid one.
    pub segment_id: Option<[u8; 3]>,
    /// The field number, when the error is inside a field.
    pub field: Option<u32>,
}

/// A parse error: a kind and a location, never message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub kind: ErrorKind,
    pub location: Location,
}

impl ParseError {
    pub(crate) fn at(kind: ErrorKind, offset: usize) -> Self {
        ParseError {
            kind,
            location: Location {
                offset,
                ..Location::default()
            },
        }
    }

    pub(crate) fn in_segment(mut self, index: u32, id: Option<[u8; 3]>) -> Self {
        self.location.segment_index = Some(index);
        self.location.segment_id = id;
        self
    }

    pub(crate) fn in_field(mut self, field: u32) -> Self {
        self.location.field = Some(field);
        self
    }

    /// The segment id as text, when known.
    pub fn segment_id(&self) -> Option<&str> {
        self.location
            .segment_id
            .as_ref()
            .and_then(|id| std::str::from_utf8(id).ok())
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {}", self.location.offset)?;
        if let Some(index) = self.location.segment_index {
            write!(f, ", segment {index}")?;
            if let Some(id) = self.segment_id() {
                write!(f, " ({id})")?;
            }
        }
        if let Some(field) = self.location.field {
            match self.segment_id() {
                Some(id) => write!(f, ", field {id}-{field}")?,
                None => write!(f, ", field {field}")?,
            }
        }
        write!(f, ": {} [{}]", self.kind.describe(), self.kind.name())
    }
}

//! Batches: `[FHS] {BHS {MSH…} BTS} [FTS]`, and plain files of concatenated messages.
//!
//! Splitting is by segment starts, so each message comes out as its own byte slice, ready
//! for [`Message::parse`](crate::Message::parse). Trailer counts are checked: BTS-1 must
//! equal the messages in its batch and FTS-1 the batches in the file, when they are sent.

use memchr::memchr2;

use crate::error::{ErrorKind, ParseError};
use crate::message::{Message, ParseOptions};
use crate::separators::Separators;

/// One message inside a batch file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMessage<'a> {
    /// The message bytes, from `MSH` to just before the next header or trailer.
    pub bytes: &'a [u8],
    /// Byte offset of the message in the file.
    pub offset: usize,
    /// 1-based batch number (0 when the file has no BHS).
    pub batch: u32,
}

/// A split batch file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    /// The FHS segment, if any.
    pub file_header: Option<&'a [u8]>,
    /// The number of BHS…BTS batches.
    pub batch_count: u32,
    pub messages: Vec<BatchMessage<'a>>,
}

/// Whether `bytes` is a batch file (starts with FHS or BHS).
pub fn is_batch(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    matches!(bytes.get(start..start + 3), Some(b"FHS" | b"BHS"))
}

/// Splits a batch file, or a file of one or more concatenated messages.
pub fn split(bytes: &[u8]) -> Result<Batch<'_>, ParseError> {
    let mut batch = Batch {
        file_header: None,
        batch_count: 0,
        messages: Vec::new(),
    };
    let mut state = State::default();
    let mut segment_index = 0u32;
    // A byte order mark is tolerated (and counted) by Message::parse: let it through.
    let mut pos = crate::message::byte_order_mark_len(bytes);
    let mut field_sep = b'|';
    while pos < bytes.len() {
        let end = memchr2(b'\r', b'\n', &bytes[pos..]).map_or(bytes.len(), |e| pos + e);
        let line = &bytes[pos..end];
        // Lines of blanks only are blank lines (Message::parse counts them).
        if !line.trim_ascii().is_empty() {
            segment_index += 1;
            let id: &[u8] = line.get(..3).unwrap_or(line);
            let printable_id = <[u8; 3]>::try_from(id)
                .ok()
                .filter(|id| id.iter().all(u8::is_ascii_alphanumeric));
            let err = |kind| ParseError::at(kind, pos).in_segment(segment_index, printable_id);
            match id {
                b"FHS" => {
                    if segment_index != 1 {
                        return Err(err(ErrorKind::BatchStructure));
                    }
                    field_sep = Separators::parse_header(line)
                        .map_err(|e| e.in_segment(segment_index, Some(*b"FHS")))?
                        .separators
                        .field;
                    batch.file_header = Some(line);
                    state.in_file = true;
                }
                b"BHS" => {
                    if state.in_batch || state.file_closed || state.saw_loose_message {
                        return Err(err(ErrorKind::BatchStructure));
                    }
                    field_sep = Separators::parse_header(line)
                        .map_err(|e| e.in_segment(segment_index, Some(*b"BHS")))?
                        .separators
                        .field;
                    state.close_message(pos);
                    state.in_batch = true;
                    state.batch_messages = 0;
                    batch.batch_count += 1;
                }
                b"BTS" => {
                    if !state.in_batch {
                        return Err(err(ErrorKind::BatchStructure));
                    }
                    state.close_message(pos);
                    if count_field(line, field_sep).is_some_and(|n| n != state.batch_messages) {
                        return Err(err(ErrorKind::BatchCountMismatch).in_field(1));
                    }
                    state.in_batch = false;
                }
                b"FTS" => {
                    if !state.in_file || state.in_batch || state.file_closed {
                        return Err(err(ErrorKind::BatchStructure));
                    }
                    state.close_message(pos);
                    if count_field(line, field_sep).is_some_and(|n| n != batch.batch_count) {
                        return Err(err(ErrorKind::BatchCountMismatch).in_field(1));
                    }
                    state.file_closed = true;
                }
                b"MSH" => {
                    if state.file_closed || (batch.batch_count > 0 && !state.in_batch) {
                        return Err(err(ErrorKind::BatchStructure));
                    }
                    if !state.in_batch {
                        state.saw_loose_message = true;
                    }
                    state.close_message(pos);
                    // The first message keeps a leading byte order mark, for Message::parse.
                    let start = if state.spans.is_empty() && segment_index == 1 {
                        0
                    } else {
                        pos
                    };
                    state.current = Some((start, batch.batch_count));
                    state.batch_messages += 1;
                }
                _ => {
                    if state.current.is_none() {
                        let kind = if segment_index == 1 {
                            ErrorKind::NotHl7
                        } else {
                            ErrorKind::BatchStructure
                        };
                        return Err(err(kind));
                    }
                }
            }
        }
        pos = end + 1;
    }
    state.close_message(bytes.len());
    if state.in_batch || (state.in_file && !state.file_closed) {
        return Err(ParseError::at(ErrorKind::BatchStructure, bytes.len()));
    }
    if state.spans.is_empty() && batch.file_header.is_none() && batch.batch_count == 0 {
        return Err(ParseError::at(ErrorKind::Empty, 0));
    }
    batch.messages = state
        .spans
        .iter()
        .map(|&(start, end, number)| BatchMessage {
            bytes: &bytes[start..end],
            offset: start,
            batch: number,
        })
        .collect();
    Ok(batch)
}

#[derive(Default)]
struct State {
    in_file: bool,
    in_batch: bool,
    file_closed: bool,
    saw_loose_message: bool,
    batch_messages: u32,
    /// Start offset and batch number of the message being read.
    current: Option<(usize, u32)>,
    /// (start, end, batch number) of each message read.
    spans: Vec<(usize, usize, u32)>,
}

impl State {
    fn close_message(&mut self, end: usize) {
        if let Some((start, number)) = self.current.take() {
            self.spans.push((start, end, number));
        }
    }
}

/// Splits `bytes` (one message, concatenated messages or a batch file) and parses each
/// message. The outer error is a batch-level problem; each inner result is one message's,
/// with error offsets made relative to the whole input.
pub fn parse_all<'a>(
    bytes: &'a [u8],
    options: &ParseOptions,
) -> Result<Vec<Result<Message<'a>, ParseError>>, ParseError> {
    let batch = split(bytes)?;
    Ok(batch
        .messages
        .iter()
        .map(|part| {
            Message::parse_with(part.bytes, options).map_err(|mut e| {
                e.location.offset += part.offset;
                e
            })
        })
        .collect())
}

/// Reads a trailer count (BTS-1 / FTS-1); `None` when not sent.
fn count_field(line: &[u8], field_sep: u8) -> Option<u32> {
    let field = line.split(|&b| b == field_sep).nth(1)?;
    let text = std::str::from_utf8(field).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    Some(text.parse().unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1\r";

    fn file(parts: &[&str]) -> Vec<u8> {
        parts.concat().into_bytes()
    }

    #[test]
    fn splits_a_full_batch_file() {
        let bytes = file(&[
            "FHS|^~\\&|A\r",
            "BHS|^~\\&|A\r",
            MSG,
            MSG,
            "BTS|2\r",
            "BHS|^~\\&|A\r",
            MSG,
            "BTS|1\r",
            "FTS|2\r",
        ]);
        assert!(is_batch(&bytes));
        let b = split(&bytes).unwrap();
        assert_eq!(b.batch_count, 2);
        assert_eq!(b.messages.len(), 3);
        assert_eq!(b.messages[0].bytes, MSG.as_bytes());
        assert_eq!(
            b.messages.iter().map(|m| m.batch).collect::<Vec<_>>(),
            [1, 1, 2]
        );
        assert!(b.file_header.is_some());
        for m in &b.messages {
            crate::Message::parse(m.bytes).unwrap();
        }
    }

    #[test]
    fn splits_concatenated_messages() {
        let bytes = file(&[MSG, MSG, MSG]);
        assert!(!is_batch(&bytes));
        let b = split(&bytes).unwrap();
        assert_eq!(b.messages.len(), 3);
        assert_eq!(b.messages[2].offset, 2 * MSG.len());
    }

    #[test]
    fn checks_counts_and_structure() {
        let kind = |parts: &[&str]| split(&file(parts)).unwrap_err().kind;
        assert_eq!(
            kind(&["BHS|^~\\&\r", MSG, "BTS|2\r"]),
            ErrorKind::BatchCountMismatch
        );
        assert_eq!(
            kind(&["FHS|^~\\&\r", "BHS|^~\\&\r", MSG, "BTS|1\r", "FTS|3\r"]),
            ErrorKind::BatchCountMismatch
        );
        assert_eq!(kind(&["BHS|^~\\&\r", MSG]), ErrorKind::BatchStructure);
        assert_eq!(kind(&[MSG, "BTS|1\r"]), ErrorKind::BatchStructure);
        assert_eq!(
            kind(&["FHS|^~\\&\r", "BHS|^~\\&\r", MSG, "BTS|1\r"]),
            ErrorKind::BatchStructure
        );
        assert_eq!(
            kind(&["BHS|^~\\&\r", MSG, "BTS|1\r", MSG]),
            ErrorKind::BatchStructure
        );
        assert_eq!(kind(&["PID|1\r"]), ErrorKind::NotHl7);
        assert_eq!(kind(&["\r\n"]), ErrorKind::Empty);
        let e = split(&file(&["BHS|^~\\&\r", MSG, "BTS|5\r"])).unwrap_err();
        assert_eq!(e.location.segment_index, Some(4));
        assert_eq!(e.location.field, Some(1));
    }
}

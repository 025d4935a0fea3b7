//! # passerelle-hl7: a zero-copy HL7 v2 parser
//!
//! This crate reads HL7 v2 messages as real feeds send them and writes them back.
//!
//! **Focus: correctness on real feeds, then speed, and safety throughout.**
//!
//! - [`Message::parse`] borrows the input. It makes one pass over the delimiters (memchr)
//!   and builds an index of segments and fields in two vectors; nothing is allocated per
//!   field. Repetitions, components and subcomponents are found on access. The header
//!   grammar and the path grammar are written with nom.
//! - Delimiters come from MSH-1/MSH-2, whatever they are (4 or 5 encoding characters).
//! - Text is decoded on access ([`Value::text`]): escape sequences first (they can produce
//!   bytes), then the character set from MSH-18 (`ASCII`, `8859/1`, `8859/15`,
//!   `UNICODE UTF-8`). It borrows from the input whenever nothing needs decoding.
//! - Every leniency is a named [`ParseOptions`] field with its background, and every
//!   deviation tolerated is counted in [`Quirks`].
//! - Errors ([`ParseError`]) carry a byte offset, the segment and the field, and never
//!   quote message content: they can be logged and returned in an ERR segment without
//!   leaking patient data. No input makes the parser panic; the fuzz targets in `fuzz/`
//!   check that.
//! - There is no `unsafe` code in this crate (`#![forbid(unsafe_code)]`).
//!
//! Paths follow the spec and are 1-based: `PID-3`, `PID-3[2]`, `PID-3[*].1`, `PID-5.1.1`,
//! `OBX[3]-5` (see [`Path`]). An explicit null `""` is a value ([`Value::is_null`]); an
//! empty field is not.
//!
//! ```
//! use passerelle_hl7::{Message, Path};
//! let bytes = b"MSH|^~\\&|LAB|HOSP|||20240101||ORU^R01|42|P|2.5\rPID|1||123^^^HOSP^PI||DOE^JANE\r";
//! let message = Message::parse(bytes)?;
//! let family: Path = "PID-5.1".parse()?;
//! assert_eq!(message.get(&family).unwrap().text(), "DOE");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Also here: batches ([`batch`]), typed values ([`types`]: TS/DTM, NM), an owned message
//! that can be built, modified and written back with escaping ([`OwnedMessage`]), and the
//! ACK/NAK builder ([`ack`]).

#![forbid(unsafe_code)]

pub mod ack;
pub mod batch;
mod charset;
mod error;
pub mod escape;
mod header;
mod message;
mod owned;
mod path;
mod separators;
pub mod types;
mod value;

pub use charset::Charset;
pub use error::{ErrorCode, ErrorKind, Location, ParseError};
pub use header::HeaderSummary;
pub use message::{Message, ParseOptions, Quirks, Segment};
pub use owned::{Component, EncodeError, Field, OwnedMessage, OwnedSegment, Repetition};
pub use path::{Path, PathError, Selector};
pub use separators::Separators;
pub use value::{ChildIndex, Children, Encoding, Level, Value};

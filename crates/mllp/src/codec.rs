//! MLLP framing as a [`tokio_util::codec`] `Decoder`/`Encoder` pair.
//!
//! A frame is `0x0B payload 0x1C 0x0D` (HL7 v2.5.1 appendix C, MLLP release 1). The
//! decoder finds frame boundaries with memchr, never copies a payload (each frame is split
//! off the read buffer as [`Bytes`]), and never looks at the payload: HL7 is the handler's
//! business. It remembers how far it has scanned, so a large frame arriving in many reads
//! is searched once.
//!
//! Limits are explicit: [`CodecOptions::max_frame_size`] bounds a payload and
//! [`CodecOptions::max_discard`] bounds the bytes skipped between frames. Every tolerated
//! deviation is a named option with its background, and is counted in [`Tolerated`].
//!
//! Filler between frames (NUL, CR, LF, blanks) is a harmless quirk. Any other byte outside
//! a frame is not: it is data the peer meant for someone and that nobody will read (a
//! sender that does not frame its messages at all, a frame whose start block was lost).
//! Each such run of bytes is handed out once by [`MllpCodec::take_unframed`], so that the
//! listener can warn and count it as a protocol error.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use memchr::{memchr, memchr2};
use tokio_util::codec::{Decoder, Encoder};

/// Start block, `<VT>`.
pub const START_BLOCK: u8 = 0x0B;
/// End block, `<FS>`.
pub const END_BLOCK: u8 = 0x1C;
/// Carriage return, which follows the end block.
pub const CARRIAGE_RETURN: u8 = 0x0D;
/// MLLP release 2 commit acknowledgement payload, `<ACK>`.
pub const COMMIT_ACK: u8 = 0x06;
/// MLLP release 2 negative commit acknowledgement payload, `<NAK>`.
pub const COMMIT_NAK: u8 = 0x15;

/// How much of a refused frame's start is kept, so that a NAK can still name the message.
const HEAD_KEPT: usize = 1024;

/// Decoder limits and leniencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecOptions {
    /// The largest payload accepted, in bytes. Default 16 MiB.
    ///
    /// Background: results (ORU) can carry whole PDF reports as base64 in OBX-5, so frames
    /// of several megabytes are normal; without a bound a peer could make the listener
    /// buffer without end. A larger frame fails with [`FrameError::TooLarge`].
    pub max_frame_size: usize,
    /// The most bytes skipped between two frames (or before the first) before the decoder
    /// gives up with [`FrameError::NoStartBlock`]. Default 64 KiB.
    ///
    /// Background: senders emit NULs, CR/LF or stray bytes between frames (Mirth
    /// connect#249), and a port scanner or an HTTP client may send anything at all. The
    /// skipped bytes are counted, never kept; the bound stops a peer that never frames.
    pub max_discard: usize,
    /// Accept an end block `0x1C` that is not followed by `0x0D`. Default on.
    ///
    /// Background: the standard ends a frame with `0x1C 0x0D`; several senders stop at
    /// `0x1C`. When the end block is the last byte received, the frame is delivered at
    /// once (the sender may be waiting for the ACK) and a `0x0D` arriving next is skipped.
    /// Off: a missing CR is a [`FrameError::MissingCarriageReturn`].
    pub allow_missing_cr: bool,
    /// A start block inside a frame abandons the unfinished frame and starts a new one.
    /// Default on.
    ///
    /// Background: HL7 text never contains `0x0B`; a sender that restarts a transmission
    /// (after its own timeout, or after a crash of its framing layer) sends a new start
    /// block before ending the previous frame. Off: the `0x0B` is kept in the payload.
    pub restart_on_start_block: bool,
    /// Recognise MLLP release 2 commit acknowledgement blocks (`0x0B 0x06 0x1C 0x0D` and
    /// `0x0B 0x15 0x1C 0x0D`) as [`Frame::CommitAck`] / [`Frame::CommitNak`]. Default on.
    ///
    /// Background: MLLP release 2 (reliable transport) adds them; a one-byte payload is
    /// never an HL7 message, so recognising them costs nothing for release 1 peers.
    pub commit_blocks: bool,
}

impl Default for CodecOptions {
    fn default() -> Self {
        CodecOptions {
            max_frame_size: 16 * 1024 * 1024,
            max_discard: 64 * 1024,
            allow_missing_cr: true,
            restart_on_start_block: true,
            commit_blocks: true,
        }
    }
}

/// Deviations tolerated so far, and frames decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tolerated {
    /// Frames decoded (messages and commit blocks).
    pub frames: u64,
    /// NUL, CR, LF, space and tab bytes skipped between frames.
    pub filler_bytes: u64,
    /// Other bytes skipped before a start block (see [`MllpCodec::take_unframed`]).
    pub discarded_bytes: u64,
    /// End blocks without the CR after them.
    pub missing_cr: u64,
    /// Unfinished frames abandoned because a new start block came.
    pub abandoned_frames: u64,
}

impl Tolerated {
    /// Names and counts of the deviations seen (zero counts omitted), for logs.
    pub fn deviations(&self) -> Vec<(&'static str, u64)> {
        [
            ("filler_bytes", self.filler_bytes),
            ("discarded_bytes", self.discarded_bytes),
            ("missing_cr", self.missing_cr),
            ("abandoned_frames", self.abandoned_frames),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// What a run of unframed data looks like, told from its first bytes so that a log can
/// say what is wrong without showing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnframedKind {
    /// `MSH`, `BHS` or `FHS`: HL7 sent without MLLP framing (a sender set up for raw TCP).
    Hl7,
    /// A TLS handshake record: the sender uses TLS, the listener does not.
    Tls,
    /// An HTTP request line: a web client, or a load balancer's HTTP probe.
    Http,
    /// Anything else.
    Other,
}

impl UnframedKind {
    fn of(first: &[u8]) -> UnframedKind {
        const HTTP: [&[u8]; 7] = [
            b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PRI ",
        ];
        if [b"MSH", b"BHS", b"FHS"]
            .iter()
            .any(|h| first.starts_with(*h))
        {
            UnframedKind::Hl7
        } else if first.starts_with(&[0x16, 0x03]) {
            UnframedKind::Tls
        } else if HTTP.iter().any(|m| first.starts_with(m)) {
            UnframedKind::Http
        } else {
            UnframedKind::Other
        }
    }

    /// A short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            UnframedKind::Hl7 => "hl7",
            UnframedKind::Tls => "tls",
            UnframedKind::Http => "http",
            UnframedKind::Other => "other",
        }
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            UnframedKind::Hl7 => {
                "HL7 sent without MLLP framing: set the sender up for MLLP (0x0B … 0x1C 0x0D), not raw TCP"
            }
            UnframedKind::Tls => {
                "a TLS handshake: the sender uses TLS and this listener does not (connection closed)"
            }
            UnframedKind::Http => "an HTTP request: a web client or an HTTP probe on the MLLP port",
            UnframedKind::Other => {
                "does the sender frame its messages with MLLP (0x0B … 0x1C 0x0D)?"
            }
        }
    }
}

/// A run of bytes received outside a frame, not all filler: dropped data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unframed {
    /// Its size, filler inside it included.
    pub bytes: usize,
    /// What its first bytes look like.
    pub kind: UnframedKind,
}

/// NUL, CR, LF, space and tab: what senders put between frames, harmlessly.
fn is_filler(b: u8) -> bool {
    matches!(b, 0 | b'\r' | b'\n' | b' ' | b'\t')
}

/// One decoded frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// An HL7 message (or anything else a peer framed): the payload, without the framing.
    Message(Bytes),
    /// MLLP release 2 commit acknowledgement.
    CommitAck,
    /// MLLP release 2 negative commit acknowledgement.
    CommitNak,
}

impl fmt::Debug for Frame {
    // Never prints the payload: it is patient data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Message(b) => write!(f, "Message({} bytes)", b.len()),
            Frame::CommitAck => f.write_str("CommitAck"),
            Frame::CommitNak => f.write_str("CommitNak"),
        }
    }
}

/// Why a stream cannot be decoded further. After any of these the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A payload exceeded [`CodecOptions::max_frame_size`]. `head` holds the frame's first
    /// bytes (at most 1 KiB), enough to salvage the MSH segment for a NAK.
    #[error("frame exceeds the maximum size of {max} bytes")]
    TooLarge {
        /// The configured maximum.
        max: usize,
        /// The start of the refused payload.
        head: Bytes,
    },
    /// More than [`CodecOptions::max_discard`] bytes arrived without a start block.
    #[error("{skipped} bytes received without an MLLP start block (0x0B)")]
    NoStartBlock {
        /// Bytes skipped since the last frame.
        skipped: usize,
    },
    /// An end block not followed by CR, with [`CodecOptions::allow_missing_cr`] off.
    #[error("MLLP end block (0x1C) not followed by 0x0D")]
    MissingCarriageReturn,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame after {received} bytes")]
    Truncated {
        /// Payload bytes received.
        received: usize,
    },
    /// The underlying transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for a start block.
    Between,
    /// Inside a frame: the buffer starts at the payload; `scanned` bytes of it hold no
    /// end block (nor start block, when restarting on one).
    InFrame { scanned: usize },
}

/// The MLLP codec. Decodes [`Frame`]s; encodes payloads (`&[u8]`, [`Bytes`]) and
/// [`Frame`]s.
#[derive(Debug, Clone)]
pub struct MllpCodec {
    options: CodecOptions,
    state: State,
    /// The previous frame ended with a `0x1C` that was the last byte received: skip one CR.
    pending_cr: bool,
    /// Bytes skipped since the last frame (bounded by `max_discard`).
    skipped: usize,
    /// Some of `skipped` is not filler: the run is unframed data, of this kind.
    skipped_data: Option<UnframedKind>,
    /// Runs of unframed data that a start block ended, not taken yet (summed; the first
    /// one's kind).
    unframed_ended: Option<Unframed>,
    tolerated: Tolerated,
}

impl Default for MllpCodec {
    fn default() -> Self {
        Self::new(CodecOptions::default())
    }
}

impl MllpCodec {
    /// A codec with these options.
    pub fn new(options: CodecOptions) -> Self {
        MllpCodec {
            options,
            state: State::Between,
            pending_cr: false,
            skipped: 0,
            skipped_data: None,
            unframed_ended: None,
            tolerated: Tolerated::default(),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &CodecOptions {
        &self.options
    }

    /// Whether a start block has been seen and its frame is not complete yet.
    pub fn in_frame(&self) -> bool {
        matches!(self.state, State::InFrame { .. })
    }

    /// Deviations tolerated and frames decoded so far.
    pub fn tolerated(&self) -> Tolerated {
        self.tolerated
    }

    /// The size of each run of unframed data (bytes outside a frame, not all filler),
    /// once: a run a start block ended, and with `at_end` (the connection is over) the
    /// run under way. `None` when there is none. The bytes themselves are never kept.
    pub fn take_unframed(&mut self, at_end: bool) -> Option<Unframed> {
        if at_end {
            self.end_unframed_run();
        }
        self.unframed_ended.take()
    }

    /// The run under way, if it holds data, joins those ended.
    fn end_unframed_run(&mut self) {
        if let Some(kind) = self.skipped_data.take() {
            let bytes = std::mem::take(&mut self.skipped);
            let ended = self
                .unframed_ended
                .get_or_insert(Unframed { bytes: 0, kind });
            ended.bytes += bytes;
        }
    }

    fn skip(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let filler = bytes.iter().filter(|b| is_filler(**b)).count();
        if self.skipped_data.is_none()
            && let Some(first) = bytes.iter().position(|b| !is_filler(*b))
        {
            let head = &bytes[first..];
            self.skipped_data = Some(UnframedKind::of(&head[..head.len().min(4)]));
        }
        self.tolerated.filler_bytes += filler as u64;
        self.tolerated.discarded_bytes += (bytes.len() - filler) as u64;
        self.skipped = self.skipped.saturating_add(bytes.len());
        if self.skipped > self.options.max_discard {
            return Err(FrameError::NoStartBlock {
                skipped: self.skipped,
            });
        }
        Ok(())
    }

    fn too_large(&self, payload: &[u8]) -> FrameError {
        FrameError::TooLarge {
            max: self.options.max_frame_size,
            head: Bytes::copy_from_slice(&payload[..payload.len().min(HEAD_KEPT)]),
        }
    }

    fn frame(&self, payload: Bytes) -> Frame {
        if self.options.commit_blocks && payload.len() == 1 {
            match payload[0] {
                COMMIT_ACK => return Frame::CommitAck,
                COMMIT_NAK => return Frame::CommitNak,
                _ => {}
            }
        }
        Frame::Message(payload)
    }
}

impl Decoder for MllpCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.pending_cr && !buf.is_empty() {
                self.pending_cr = false;
                if buf[0] == CARRIAGE_RETURN {
                    buf.advance(1);
                } else {
                    self.tolerated.missing_cr += 1;
                }
            }
            match self.state {
                State::Between => match memchr(START_BLOCK, buf) {
                    None => {
                        let all = buf.split();
                        self.skip(&all)?;
                        return Ok(None);
                    }
                    Some(start) => {
                        if start > 0 {
                            let before = buf.split_to(start);
                            self.skip(&before)?;
                        }
                        buf.advance(1);
                        self.end_unframed_run();
                        self.skipped = 0;
                        self.state = State::InFrame { scanned: 0 };
                    }
                },
                State::InFrame { scanned } => {
                    let rest = &buf[scanned..];
                    let found = if self.options.restart_on_start_block {
                        memchr2(END_BLOCK, START_BLOCK, rest)
                    } else {
                        memchr(END_BLOCK, rest)
                    };
                    let Some(at) = found.map(|i| scanned + i) else {
                        if buf.len() > self.options.max_frame_size {
                            return Err(self.too_large(buf));
                        }
                        self.state = State::InFrame { scanned: buf.len() };
                        return Ok(None);
                    };
                    if at > self.options.max_frame_size {
                        return Err(self.too_large(buf));
                    }
                    if buf[at] == START_BLOCK {
                        // A new frame starts: drop the unfinished one.
                        buf.advance(at + 1);
                        self.tolerated.abandoned_frames += 1;
                        self.state = State::InFrame { scanned: 0 };
                        continue;
                    }
                    let consumed = match buf.get(at + 1) {
                        Some(&CARRIAGE_RETURN) => 2,
                        Some(_) if self.options.allow_missing_cr => {
                            self.tolerated.missing_cr += 1;
                            1
                        }
                        Some(_) => return Err(FrameError::MissingCarriageReturn),
                        None if self.options.allow_missing_cr => {
                            self.pending_cr = true;
                            1
                        }
                        None => {
                            // Wait for the CR.
                            self.state = State::InFrame { scanned: at };
                            return Ok(None);
                        }
                    };
                    let payload = buf.split_to(at).freeze();
                    buf.advance(consumed);
                    self.state = State::Between;
                    self.tolerated.frames += 1;
                    return Ok(Some(self.frame(payload)));
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        match self.state {
            State::InFrame { .. } => {
                let received = buf.len();
                buf.clear();
                self.state = State::Between;
                Err(FrameError::Truncated { received })
            }
            State::Between => Ok(None),
        }
    }
}

fn put_frame(payload: &[u8], dst: &mut BytesMut) {
    dst.reserve(payload.len() + 3);
    dst.put_u8(START_BLOCK);
    dst.put_slice(payload);
    dst.put_u8(END_BLOCK);
    dst.put_u8(CARRIAGE_RETURN);
}

impl Encoder<&[u8]> for MllpCodec {
    type Error = std::io::Error;

    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), std::io::Error> {
        put_frame(payload, dst);
        Ok(())
    }
}

impl Encoder<Bytes> for MllpCodec {
    type Error = std::io::Error;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        put_frame(&payload, dst);
        Ok(())
    }
}

impl Encoder<Frame> for MllpCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        match frame {
            Frame::Message(payload) => put_frame(&payload, dst),
            Frame::CommitAck => put_frame(&[COMMIT_ACK], dst),
            Frame::CommitNak => put_frame(&[COMMIT_NAK], dst),
        }
        Ok(())
    }
}

/// `payload` framed: `0x0B payload 0x1C 0x0D`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(payload);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(codec: &mut MllpCodec, input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf)? {
            out.push(f);
        }
        if let Some(f) = codec.decode_eof(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn msg(s: &[u8]) -> Frame {
        Frame::Message(Bytes::copy_from_slice(s))
    }

    #[test]
    fn one_frame() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"\x0bMSH|a\r\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"MSH|a\r")]);
        assert_eq!(c.tolerated().deviations(), vec![]);
    }

    #[test]
    fn several_frames_per_read_with_nuls_between() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"\x0bA\x1c\r\0\0\r\n\x0bB\x1c\r\x0bC\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"A"), msg(b"B"), msg(b"C")]);
        assert_eq!(c.tolerated().filler_bytes, 4);
        assert_eq!(c.tolerated().frames, 3);
    }

    #[test]
    fn garbage_before_start_is_counted() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"GET / HTTP\x0bA\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"A")]);
        assert_eq!(c.tolerated().discarded_bytes, 8);
        assert_eq!(c.tolerated().filler_bytes, 2);
    }

    #[test]
    fn each_run_of_unframed_data_is_handed_out_once_with_its_size() {
        let mut c = MllpCodec::default();
        // Filler alone between frames is no run of data.
        decode_all(&mut c, b"\0\r\n\x0bA\x1c\r").unwrap();
        assert_eq!(c.take_unframed(true), None);
        // A run a start block ends: its size counts filler inside it too.
        let mut buf = BytesMut::from(&b"GET / HTTP\x0bA\x1c\r"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"A")));
        let unframed = |bytes, kind| Some(Unframed { bytes, kind });
        assert_eq!(c.take_unframed(false), unframed(10, UnframedKind::Http));
        assert_eq!(c.take_unframed(true), None, "once");
        // A run the connection ends, in two reads: only at the end.
        let mut buf = BytesMut::from(&b"MSH|^~\\&|"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"\rPID|1\r");
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert_eq!(c.take_unframed(false), None, "still under way");
        assert_eq!(c.take_unframed(true), unframed(16, UnframedKind::Hl7));
        assert_eq!(c.take_unframed(true), None);
        // A TLS client on a plain listener, after filler.
        let mut buf = BytesMut::from(&b"\r\n\x16\x03\x01\x02\x00"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert_eq!(c.take_unframed(true), unframed(7, UnframedKind::Tls));
    }

    #[test]
    fn garbage_is_bounded() {
        let mut c = MllpCodec::new(CodecOptions {
            max_discard: 10,
            ..CodecOptions::default()
        });
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        let mut buf = BytesMut::from(&b"x"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::NoStartBlock { skipped: 11 })
        ));
    }

    #[test]
    fn discard_bound_resets_after_each_frame() {
        let mut c = MllpCodec::new(CodecOptions {
            max_discard: 4,
            ..CodecOptions::default()
        });
        let frames = decode_all(&mut c, b"xxxx\x0bA\x1c\rxxxx\x0bB\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"A"), msg(b"B")]);
    }

    #[test]
    fn missing_cr_tolerated_between_frames() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"\x0bA\x1c\x0bB\x1c").unwrap();
        assert_eq!(frames, vec![msg(b"A"), msg(b"B")]);
        assert_eq!(c.tolerated().missing_cr, 1);
    }

    #[test]
    fn end_block_last_byte_delivers_at_once_and_skips_late_cr() {
        let mut c = MllpCodec::default();
        let mut buf = BytesMut::from(&b"\x0bA\x1c"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"A")));
        buf.extend_from_slice(b"\r\x0bB\x1c\r");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"B")));
        assert_eq!(c.tolerated().missing_cr, 0);
        assert_eq!(c.tolerated().filler_bytes, 0);
    }

    #[test]
    fn strict_cr() {
        let mut c = MllpCodec::new(CodecOptions {
            allow_missing_cr: false,
            ..CodecOptions::default()
        });
        let mut buf = BytesMut::from(&b"\x0bA\x1c"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"\r");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(msg(b"A")));
        let mut buf = BytesMut::from(&b"\x0bA\x1cX"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::MissingCarriageReturn)
        ));
    }

    #[test]
    fn too_large_keeps_head() {
        let mut c = MllpCodec::new(CodecOptions {
            max_frame_size: 8,
            ..CodecOptions::default()
        });
        let mut buf = BytesMut::from(&b"\x0bMSH|12345"[..]);
        match c.decode(&mut buf) {
            Err(FrameError::TooLarge { max: 8, head }) => assert_eq!(&head[..], b"MSH|12345"),
            other => panic!("{other:?}"),
        }
        // Exactly the maximum is fine.
        let mut c = MllpCodec::new(CodecOptions {
            max_frame_size: 3,
            ..CodecOptions::default()
        });
        assert_eq!(
            decode_all(&mut c, b"\x0bABC\x1c\r").unwrap(),
            vec![msg(b"ABC")]
        );
        let mut c = MllpCodec::new(CodecOptions {
            max_frame_size: 3,
            ..CodecOptions::default()
        });
        assert!(matches!(
            decode_all(&mut c, b"\x0bABCD\x1c\r"),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn restart_on_start_block() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"\x0bPART\x0bFULL\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"FULL")]);
        assert_eq!(c.tolerated().abandoned_frames, 1);
        let mut c = MllpCodec::new(CodecOptions {
            restart_on_start_block: false,
            ..CodecOptions::default()
        });
        let frames = decode_all(&mut c, b"\x0bPART\x0bFULL\x1c\r").unwrap();
        assert_eq!(frames, vec![msg(b"PART\x0bFULL")]);
    }

    #[test]
    fn commit_blocks() {
        let mut c = MllpCodec::default();
        let frames = decode_all(&mut c, b"\x0b\x06\x1c\r\x0b\x15\x1c\r").unwrap();
        assert_eq!(frames, vec![Frame::CommitAck, Frame::CommitNak]);
        let mut out = BytesMut::new();
        c.encode(Frame::CommitAck, &mut out).unwrap();
        assert_eq!(&out[..], b"\x0b\x06\x1c\r");
    }

    #[test]
    fn truncated_at_eof() {
        let mut c = MllpCodec::default();
        assert!(matches!(
            decode_all(&mut c, b"\x0bMSH|partial"),
            Err(FrameError::Truncated { received: 11 })
        ));
    }

    #[test]
    fn encode_roundtrip() {
        let mut c = MllpCodec::default();
        let mut out = BytesMut::new();
        c.encode(&b"MSH|x\r"[..], &mut out).unwrap();
        assert_eq!(&out[..], &frame(b"MSH|x\r")[..]);
        assert_eq!(decode_all(&mut c, &out).unwrap(), vec![msg(b"MSH|x\r")]);
    }

    proptest! {
        /// However the stream is cut into reads, the same frames come out.
        #[test]
        fn chunking_does_not_matter(
            payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>().prop_filter("no framing bytes", |b| *b != START_BLOCK && *b != END_BLOCK), 0..50),
                1..6),
            cuts in proptest::collection::vec(1usize..20, 0..30),
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend_from_slice(&frame(p));
                stream.push(0);
            }
            let mut c = MllpCodec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(f) = c.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            let want: Vec<Frame> = payloads.iter().map(|p| c.frame(Bytes::copy_from_slice(p))).collect();
            prop_assert_eq!(got, want);
        }

        /// On any input (framing bytes made frequent), with any options, the frames and
        /// the error-ness are the same whether the stream comes at once or in pieces.
        #[test]
        fn reads_do_not_change_framing(
            data in proptest::collection::vec(prop_oneof![Just(START_BLOCK), Just(END_BLOCK), Just(CARRIAGE_RETURN), Just(COMMIT_ACK), Just(0u8), any::<u8>()], 0..200),
            control in any::<u8>(),
            piece in 1usize..17,
        ) {
            let options = CodecOptions {
                max_frame_size: 1 + usize::from(control & 0x3f) * 8,
                max_discard: 1 + usize::from(control >> 6) * 64,
                allow_missing_cr: control & 1 == 0,
                restart_on_start_block: control & 2 == 0,
                commit_blocks: control & 4 == 0,
            };
            let run = |chunks: Vec<&[u8]>| {
                let mut c = MllpCodec::new(options.clone());
                let mut buf = BytesMut::new();
                let mut frames = Vec::new();
                for chunk in chunks {
                    buf.extend_from_slice(chunk);
                    loop {
                        match c.decode(&mut buf) {
                            Ok(Some(f)) => frames.push(f),
                            Ok(None) => break,
                            Err(_) => return (frames, true),
                        }
                    }
                }
                loop {
                    match c.decode_eof(&mut buf) {
                        Ok(Some(f)) => frames.push(f),
                        Ok(None) => return (frames, false),
                        Err(_) => return (frames, true),
                    }
                }
            };
            let whole = run(vec![&data[..]]);
            let pieces = run(data.chunks(piece).collect());
            prop_assert_eq!(&whole, &pieces);
            for f in &whole.0 {
                if let Frame::Message(p) = f {
                    prop_assert!(p.len() <= options.max_frame_size);
                    prop_assert!(!p.contains(&END_BLOCK));
                }
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
            let mut c = MllpCodec::new(CodecOptions { max_frame_size: 64, max_discard: 64, ..CodecOptions::default() });
            let cut = cut.min(input.len());
            let mut buf = BytesMut::from(&input[..cut]);
            let mut ok = true;
            while ok {
                match c.decode(&mut buf) { Ok(Some(_)) => {}, Ok(None) => break, Err(_) => ok = false }
            }
            if ok {
                buf.extend_from_slice(&input[cut..]);
                while let Ok(Some(_)) = c.decode_eof(&mut buf) {}
            }
        }
    }
}

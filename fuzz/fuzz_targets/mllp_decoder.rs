//! Decodes arbitrary bytes with the MLLP codec, all at once and cut into reads of sizes
//! taken from the input, with strict and lenient options and small limits. Any panic is a
//! bug, and so is any difference between the two ways of reading: framing must not depend
//! on how TCP cuts the stream. Every decoded payload must re-encode and decode to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use passerelle_mllp::codec::{END_BLOCK, START_BLOCK};
use passerelle_mllp::{CodecOptions, Frame, FrameError, MllpCodec};
use tokio_util::codec::{Decoder, Encoder};

/// Frames decoded until the end or the first error, and whether an error ended it.
fn decode(options: &CodecOptions, chunks: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut codec = MllpCodec::new(options.clone());
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, false),
            Err(FrameError::Truncated { .. }) | Err(_) => return (frames, true),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let options = CodecOptions {
        max_frame_size: 1 + usize::from(control & 0x3f) * 8,
        max_discard: 1 + usize::from(control >> 6) * 64,
        allow_missing_cr: control & 1 == 0,
        restart_on_start_block: control & 2 == 0,
        commit_blocks: control & 4 == 0,
    };
    // Read sizes come from the data itself, 1 to 16 bytes.
    let mut chunks = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(data[i % data.len()] & 0x0f) + 1).min(rest.len());
        chunks.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    let (whole, whole_failed) = decode(&options, &[data]);
    let (pieces, pieces_failed) = decode(&options, &chunks);
    assert_eq!(whole, pieces, "framing depends on read sizes");
    assert_eq!(whole_failed, pieces_failed, "errors depend on read sizes");

    let mut codec = MllpCodec::new(options.clone());
    for frame in whole {
        if let Frame::Message(payload) = &frame {
            assert!(payload.len() <= options.max_frame_size);
            assert!(!payload.contains(&END_BLOCK));
            if options.restart_on_start_block {
                assert!(!payload.contains(&START_BLOCK));
            }
        }
        let mut out = BytesMut::new();
        codec.encode(frame.clone(), &mut out).expect("encode");
        let again = codec.decode(&mut out).expect("re-decode").expect("a frame");
        assert_eq!(again, frame, "encode/decode round trip");
    }
});

//! Parses arbitrary bytes as a message and as a batch, then walks everything the parser
//! exposes: every segment, field, repetition, component and subcomponent, decoded; the
//! header summary; the ACK or NAK; and the owned form written back and parsed again.
//! Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_hl7::{HeaderSummary, Message, OwnedMessage, ack, batch};

fuzz_target!(|data: &[u8]| {
    let _ = batch::split(data);
    let _ = HeaderSummary::salvage(data);
    match Message::parse(data) {
        Err(error) => {
            let nak = ack::for_parse_error(data, &error, &ack::AckOptions::default());
            assert!(Message::parse(&nak).is_ok(), "a NAK must itself parse");
        }
        Ok(message) => {
            for segment in message.segments() {
                for field in segment.fields() {
                    let _ = field.text();
                    for rep in field.repetitions() {
                        for comp in rep.components() {
                            for sub in comp.children() {
                                let _ = sub.text();
                            }
                        }
                    }
                }
            }
            let header = HeaderSummary::of(&message);
            let ack = ack::build(Some(&header), ack::Outcome::Accept, &[], &ack::AckOptions::default());
            assert!(Message::parse(&ack).is_ok(), "an ACK must itself parse");
            let owned = OwnedMessage::from_message(&message);
            // An undeclared or mislabelled charset is a guess; writing it back without a
            // label can be guessed differently, so only declared charsets must round-trip.
            let declared = !message.quirks().undeclared_charset
                && message.quirks().mislabelled_charset_at.is_none();
            if let (true, Ok(bytes)) = (declared, owned.write()) {
                let again = Message::parse(&bytes).expect("written message parses");
                assert_eq!(OwnedMessage::from_message(&again), owned, "write/parse round trip");
            }
        }
    }
});

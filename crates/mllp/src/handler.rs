//! [`ParseAckHandler`]: answers each frame from the parser alone, with no storage. It is
//! what `passerelle serve` runs until the durable store sits behind the listener.

use bytes::Bytes;
use passerelle_hl7::ack::{self, AckOptions, Outcome};
use passerelle_hl7::{HeaderSummary, Message};
use tracing::{info, warn};

use crate::listener::{Handler, PeerInfo};

/// AA (CA) for a well-formed message; AE/AR with an ERR segment for a malformed one; AR
/// with an empty MSA-2 for a frame that is not HL7 at all. Enhanced-mode senders get an
/// accept ACK only when their MSH-15 asks for one.
#[derive(Debug, Clone, Default)]
pub struct ParseAckHandler {
    /// MSH-3/MSH-4 of the ACKs when the message has no MSH-5/MSH-6.
    pub options: AckOptions,
}

impl ParseAckHandler {
    /// The ACK for one frame, and whether it accepts it.
    pub fn answer(&self, frame: &[u8]) -> (Outcome, Option<Vec<u8>>) {
        match Message::parse(frame) {
            Ok(message) => {
                let header = HeaderSummary::of(&message);
                let quirks = message.quirks().names();
                info!(control_id = %header.control_id, kind = %header.kind(), size = frame.len(), tolerated = ?quirks, "message accepted");
                let ack = ack::wants_accept_ack(&header, Outcome::Accept)
                    .then(|| ack::build(Some(&header), Outcome::Accept, &[], &self.options));
                (Outcome::Accept, ack)
            }
            Err(error) => {
                let header = HeaderSummary::salvage(frame);
                let outcome = if error.kind.is_reject() || header.is_none() {
                    Outcome::Reject
                } else {
                    Outcome::Error
                };
                warn!(
                    control_id = header.as_ref().map(|h| h.control_id.as_str()).unwrap_or(""),
                    size = frame.len(),
                    error = %error,
                    "message refused"
                );
                let wanted = header
                    .as_ref()
                    .is_none_or(|h| ack::wants_accept_ack(h, outcome));
                let nak = wanted.then(|| ack::for_parse_error(frame, &error, &self.options));
                (outcome, nak)
            }
        }
    }
}

impl Handler for ParseAckHandler {
    async fn handle(&self, frame: Bytes, _peer: &PeerInfo) -> Option<Bytes> {
        self.answer(&frame).1.map(Bytes::from)
    }
}

//! [`ParseAckHandler`]: answers each frame from the parser alone, with no storage. It is
//! what `passerelle serve` runs until the durable store sits behind the listener.

use bytes::Bytes;
use passerelle_hl7::ack::{self, AckOptions, Outcome};
use passerelle_hl7::{HeaderSummary, Message};
use tracing::{info, warn};

use crate::listener::{Handler, PeerInfo};

/// AA (CA) for a well-formed message; AE/AR with an ERR segment for a malformed one; AR
/// with an empty MSA-2 for a frame that is not HL7 at all.
#[derive(Debug, Clone, Default)]
pub struct ParseAckHandler {
    /// MSH-3/MSH-4 of the ACKs when the message has no MSH-5/MSH-6.
    pub options: AckOptions,
    /// Follow MSH-15 (accept acknowledgement type) in enhanced mode: no answer for `NE`,
    /// for `ER` on success, for `SU` on error. Default off: every frame is answered.
    ///
    /// Background: HL7 v2 enhanced mode lets a sender ask for no accept acknowledgement,
    /// but an MLLP sender still blocks on its connection, and many fill MSH-15 from a
    /// template without acting on it. An answer it did not ask for is read and dropped;
    /// a missing one stalls it until its timeout and makes it send the message again
    /// (the duplicate floods of Mirth connect#1314). Turn this on for senders known to
    /// honour MSH-15 and never read unrequested ACKs.
    pub honor_accept_ack_type: bool,
}

impl ParseAckHandler {
    /// The ACK for one frame, and whether it accepts it.
    pub fn answer(&self, frame: &[u8]) -> (Outcome, Option<Vec<u8>>) {
        match Message::parse(frame) {
            Ok(message) => {
                let header = HeaderSummary::of(&message);
                let quirks = message.quirks().names();
                info!(control_id = %header.control_id, kind = %header.kind(), size = frame.len(), tolerated = ?quirks, "message accepted");
                let wanted =
                    !self.honor_accept_ack_type || ack::wants_accept_ack(&header, Outcome::Accept);
                let ack =
                    wanted.then(|| ack::build(Some(&header), Outcome::Accept, &[], &self.options));
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
                let wanted = !self.honor_accept_ack_type
                    || header
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

#[cfg(test)]
mod tests {
    use super::*;

    const NE: &[u8] = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|NE1|P|2.5|||NE|NE\rPID|1\r";

    #[test]
    fn answers_every_frame_by_default() {
        let (outcome, ack) = ParseAckHandler::default().answer(NE);
        assert_eq!(outcome, Outcome::Accept);
        let ack = String::from_utf8(ack.expect("an ACK")).unwrap();
        assert!(ack.contains("\rMSA|CA|NE1"), "{ack}");
    }

    #[test]
    fn can_follow_msh_15() {
        let handler = ParseAckHandler {
            honor_accept_ack_type: true,
            ..ParseAckHandler::default()
        };
        assert_eq!(handler.answer(NE), (Outcome::Accept, None));
        let (_, ack) = handler.answer(b"not hl7");
        let ack = String::from_utf8(ack.expect("a NAK for an unreadable frame")).unwrap();
        assert!(ack.contains("\rMSA|AR\r"), "{ack}");
    }
}

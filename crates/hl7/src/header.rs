//! A small owned summary of the MSH segment: what routing, storage and acknowledgement
//! need, readable even from a message that failed to parse further down.

use memchr::memchr2;

use crate::message::Message;
use crate::separators::Separators;

/// The MSH fields an engine needs. Values are the raw field text (still escaped, as
/// lossy UTF-8): they are identifiers and codes, and an ACK mirrors them verbatim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSummary {
    pub separators: Separators,
    /// MSH-3.
    pub sending_application: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_application: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-9.1, e.g. `ADT`.
    pub message_type: String,
    /// MSH-9.2, e.g. `A01`.
    pub trigger_event: String,
    /// MSH-9.3, e.g. `ADT_A01`.
    pub message_structure: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11.1: P, T or D.
    pub processing_id: String,
    /// MSH-12.1, e.g. `2.5.1`.
    pub version: String,
    /// MSH-12.2, the internationalization code, e.g. `FRA` in PAM FR's `2.5^FRA^2.11`.
    pub version_internationalization: String,
    /// MSH-15: AL, NE, ER, SU (empty in original acknowledgement mode).
    pub accept_ack_type: String,
    /// MSH-16: AL, NE, ER, SU.
    pub application_ack_type: String,
    /// MSH-17.
    pub country: String,
    /// MSH-18, all repetitions, as sent.
    pub charset_label: String,
    /// MSH-21 (message profile identifiers), all repetitions, as sent.
    pub profiles: String,
}

impl HeaderSummary {
    /// The summary of a parsed message.
    pub fn of(message: &Message<'_>) -> HeaderSummary {
        Self::from_msh_line(message.msh().raw(), message.separators())
    }

    /// Reads the MSH segment at the start of `bytes` even when the rest of the message is
    /// broken, so that a NAK can still name the control id. `None` when the header itself
    /// is unreadable (then a NAK goes out with an empty MSA-2).
    pub fn salvage(bytes: &[u8]) -> Option<HeaderSummary> {
        let bytes = &bytes[crate::message::byte_order_mark_len(bytes)..];
        let start = bytes.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
        let bytes = &bytes[start..];
        if !bytes.starts_with(b"MSH") {
            return None;
        }
        let header = Separators::parse_header(bytes).ok()?;
        let end = memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len());
        Some(Self::from_msh_line(&bytes[..end], header.separators))
    }

    fn from_msh_line(line: &[u8], separators: Separators) -> HeaderSummary {
        // fields[0] is "MSH"; fields[n] is MSH-(n+1) because MSH-1 is the separator.
        let fields: Vec<&[u8]> = line.split(|&b| b == separators.field).collect();
        let field = |n: usize| -> &[u8] { fields.get(n - 1).copied().unwrap_or_default() };
        // Control bytes (which make a message unparseable) are dropped, so that whatever
        // is mirrored into an ACK or a log line is itself well-formed.
        let text = |b: &[u8]| {
            let clean: Vec<u8> = b
                .iter()
                .copied()
                .filter(|&c| c >= 0x20 || c == b'\t')
                .collect();
            String::from_utf8_lossy(&clean).trim().to_owned()
        };
        let component = |n: usize, c: usize| -> String {
            let first_rep = field(n)
                .split(|&b| b == separators.repetition)
                .next()
                .unwrap_or_default();
            text(
                first_rep
                    .split(|&b| b == separators.component)
                    .nth(c - 1)
                    .unwrap_or_default(),
            )
        };
        HeaderSummary {
            separators,
            sending_application: text(field(3)),
            sending_facility: text(field(4)),
            receiving_application: text(field(5)),
            receiving_facility: text(field(6)),
            message_type: component(9, 1),
            trigger_event: component(9, 2),
            message_structure: component(9, 3),
            control_id: text(field(10)),
            processing_id: component(11, 1),
            version: component(12, 1),
            version_internationalization: component(12, 2),
            accept_ack_type: text(field(15)),
            application_ack_type: text(field(16)),
            country: text(field(17)),
            charset_label: text(field(18)),
            profiles: text(field(21)),
        }
    }

    /// `ADT^A01`-style type and trigger, for logs and metrics.
    pub fn kind(&self) -> String {
        if self.trigger_event.is_empty() {
            self.message_type.clone()
        } else {
            format!("{}^{}", self.message_type, self.trigger_event)
        }
    }

    /// Enhanced acknowledgement mode: MSH-15 or MSH-16 is valued.
    pub fn is_enhanced_mode(&self) -> bool {
        !self.accept_ack_type.is_empty() || !self.application_ack_type.is_empty()
    }

    /// The version as (major, minor, patch) numbers, `(2, 5, 1)` for `2.5.1`; missing parts are 0.
    pub fn version_number(&self) -> (u32, u32, u32) {
        let mut parts = self
            .version
            .split('.')
            .map(|p| p.trim().parse::<u32>().unwrap_or(0));
        (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_and_salvages() {
        let bytes = b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101||ADT^A01^ADT_A01|C42|P|2.5.1|||AL|NE|FRA|8859/15\rpid|broken";
        assert!(Message::parse(bytes).is_err());
        let h = HeaderSummary::salvage(bytes).unwrap();
        assert_eq!(h.sending_application, "APP");
        assert_eq!(h.receiving_facility, "RFAC");
        assert_eq!(h.kind(), "ADT^A01");
        assert_eq!(h.message_structure, "ADT_A01");
        assert_eq!(h.control_id, "C42");
        assert_eq!(h.version_number(), (2, 5, 1));
        assert_eq!(h.charset_label, "8859/15");
        assert!(h.is_enhanced_mode());
        assert!(HeaderSummary::salvage(b"garbage").is_none());
    }
}

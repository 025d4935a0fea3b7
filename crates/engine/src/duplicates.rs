//! Telling a sender's resend from a new message.
//!
//! A sender whose ACK is lost or late (a network cut, a timeout shorter than a slow
//! moment) sends the same message again. Routing it again would deliver it twice: a
//! duplicate line in NDJSON, a second message to an MLLP peer, and, worse, an older state
//! of the patient after a newer one if the resend is delivered late.
//!
//! ## The rule
//!
//! A message is a **duplicate** of an earlier one when, within the window
//! (`[defaults] duplicate_window_s`, 10 minutes unless set, 0 turns the check off):
//! - both have the same sending application and facility (MSH-3, MSH-4), control id
//!   (MSH-10), message type and trigger (MSH-9);
//! - and the same bytes, apart from MSH-7 (senders often stamp a resend anew);
//! - and the earlier copy is on its way: `mapped` (its deliveries queued), `received`
//!   (not routed yet) or itself a `duplicate`. A copy left `unrouted` or `mapping_failed`
//!   was delivered nowhere (and an unrouted one may have been answered AE, which asks for
//!   the resend): the new copy is routed as any message.
//!
//! One exemption: an operator's corrected copy (`passerelle messages resubmit`) is never
//! a duplicate **of the message it corrects**, nor of an earlier copy of that message
//! (the chain of resubmissions it comes from): resubmitting is an explicit
//! decision, and an original still `mapped` (its deliveries dead at a server that refused
//! its content, say) must not swallow its correction. The copy is still checked against
//! every other message: if the sender also sent the same corrected message, one of the two
//! is a duplicate of the other.
//!
//! "Earlier" is by store id: the journal's order. The rule needs nothing but what the
//! store keeps, so a duplicate is found the same way after a restart, by the recheck, or
//! by another node of a shared store. Two copies journaled at the very same moment on two
//! nodes may both be routed: at least once, as ever.
//!
//! ## What happens to a duplicate
//!
//! It is acknowledged (AA) like any message, since the sender must stop resending; it is
//! kept, in the state `duplicate`, with the id of the earlier copy in its history; it is
//! not routed. Nothing is dropped: `passerelle messages replay ID` routes it, for an
//! operator who did mean to send it again. A sender that reuses control ids for
//! different messages is not affected: different bytes are a different message.

use std::time::Duration;

use passerelle_hl7::HeaderSummary;
use passerelle_store::{MessageId, MessageState, Millis, Query, Store, StoreError};

/// The duplicate check's setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicates {
    /// How far back an earlier copy is looked for; zero turns the check off.
    pub window: Duration,
}

impl Duplicates {
    /// The setting in a configuration (`[defaults] duplicate_window_s`).
    pub fn of(config: &crate::config::EngineConfig) -> Duplicates {
        Duplicates {
            window: Duration::from_secs(config.defaults.duplicate_window_s),
        }
    }
}

impl Default for Duplicates {
    fn default() -> Self {
        Duplicates {
            window: Duration::from_secs(600),
        }
    }
}

/// Earlier messages with the same control id looked at, at most. A sender that reuses
/// one control id for everything only makes its own check weaker, not the engine slower.
const CANDIDATES: usize = 16;

/// The earlier copy of message `id` (received at `received_at_ms`, with this header and
/// these bytes), if there is one within the window. `corrects`: the chain of messages an
/// operator's resubmission `id` corrects (see the module doc), never taken as its earlier
/// copy.
pub(crate) async fn earlier_copy<S: Store>(
    store: &S,
    settings: &Duplicates,
    id: MessageId,
    received_at_ms: Millis,
    msh: &HeaderSummary,
    frame: &[u8],
    corrects: &[MessageId],
) -> Result<Option<MessageId>, StoreError> {
    if settings.window.is_zero() || msh.control_id.is_empty() {
        return Ok(None);
    }
    let window_ms = u64::try_from(settings.window.as_millis()).unwrap_or(u64::MAX);
    let page = store
        .list(&Query {
            control_id: Some(msh.control_id.clone()),
            since_ms: Some(received_at_ms.saturating_sub(window_ms)),
            // Only earlier copies: the message itself, found by its own control id, is
            // not read (most control ids are unique: most checks then read nothing).
            before: Some(id),
            limit: CANDIDATES,
            ..Query::default()
        })
        .await?;
    for earlier in page.items {
        let same_header = earlier.msh.as_ref().is_some_and(|m| {
            m.sending_application == msh.sending_application
                && m.sending_facility == msh.sending_facility
                && m.message_type == msh.message_type
                && m.trigger_event == msh.trigger_event
        });
        let on_its_way = matches!(
            earlier.state,
            MessageState::Mapped | MessageState::Received | MessageState::Duplicate
        );
        if earlier.id >= id || !on_its_way || !same_header || corrects.contains(&earlier.id) {
            continue;
        }
        if let Some(bytes) = store.raw(earlier.id).await?
            && same_message(&bytes, frame)
        {
            return Ok(Some(earlier.id));
        }
    }
    Ok(None)
}

/// Resubmissions followed back from a corrected copy, at most, for its duplicate check.
const CHAIN_MAX: usize = 32;

/// The messages an operator's corrected copy of `from` corrects: `from`, its original,
/// and so on (at most [`CHAIN_MAX`], against a loop in damaged records). A purged or
/// unreadable link ends the chain.
pub(crate) async fn corrected_chain<S: Store>(
    store: &S,
    mut from: Option<MessageId>,
) -> Vec<MessageId> {
    let mut chain = Vec::new();
    while let Some(id) = from {
        if chain.len() >= CHAIN_MAX || chain.contains(&id) {
            break;
        }
        chain.push(id);
        from = match store.get(id).await {
            Ok(Some(r)) => r.links.resubmitted_from,
            _ => None,
        };
    }
    chain
}

/// Whether two frames are the same message: the same bytes, MSH-7 aside.
pub(crate) fn same_message(a: &[u8], b: &[u8]) -> bool {
    match (around_msh7(a), around_msh7(b)) {
        (Some((a_head, a_tail)), Some((b_head, b_tail))) => a_head == b_head && a_tail == b_tail,
        // Not an MSH first: only identical bytes are the same message.
        _ => a == b,
    }
}

/// The frame before MSH-7's value and from its end on, when the frame starts with MSH.
fn around_msh7(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    if frame.len() < 4 || &frame[..3] != b"MSH" {
        return None;
    }
    let separator = frame[3];
    // MSH-1 is the separator itself, so MSH-7 starts after the sixth one and ends at the
    // seventh (or at the end of the segment).
    let mut seen = 0;
    let mut start = None;
    for (i, &byte) in frame.iter().enumerate().skip(3) {
        if byte == b'\r' || byte == b'\n' {
            return start.map(|s| (&frame[..s], &frame[i..]));
        }
        if byte == separator {
            seen += 1;
            if seen == 6 {
                start = Some(i + 1);
            } else if seen == 7 {
                let s = start?;
                return Some((&frame[..s], &frame[i..]));
            }
        }
    }
    start.map(|s| (&frame[..s], &frame[frame.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120000||ORU^R01|42|P|2.5\rPID|1||123\r";

    #[test]
    fn a_new_timestamp_is_the_same_message() {
        let b = b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120510+0100||ORU^R01|42|P|2.5\rPID|1||123\r";
        assert!(same_message(A, b));
        assert!(same_message(A, A));
    }

    #[test]
    fn any_other_difference_is_another_message() {
        for other in [
            &b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120000||ORU^R01|42|P|2.5\rPID|1||124\r"[..],
            b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120000||ORU^R01|43|P|2.5\rPID|1||123\r",
            b"MSH|^~\\&|LAB|CHU|FHIR|CHX|20250101120000||ORU^R01|42|P|2.5\rPID|1||123\r",
            b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120000||ORU^R01|42|P|2.5\rPID|1||123\rNTE|1\r",
            b"MSH|^~\\&|LAB|CHU|FHIR|CHU|20250101120000||ORU^R01|42|P|2.5\rPID|1||123",
        ] {
            assert!(
                !same_message(A, other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn other_separators_and_short_headers() {
        let a = b"MSH#^~\\&#A#B#C#D#20250101#";
        let b = b"MSH#^~\\&#A#B#C#D#20250102#";
        assert!(same_message(a, b));
        // MSH-7 at the end of the segment, without a separator after it.
        assert!(same_message(
            b"MSH|^~\\&|A|B|C|D|1\rPID|",
            b"MSH|^~\\&|A|B|C|D|2\rPID|"
        ));
        assert!(!same_message(
            b"MSH|^~\\&|A|B|C|D|1\rPID|",
            b"MSH|^~\\&|A|B|C|E|1\rPID|"
        ));
        // Too short to have an MSH-7: only equal bytes are the same.
        assert!(same_message(b"MSH|^~\\&|A", b"MSH|^~\\&|A"));
        assert!(!same_message(b"MSH|^~\\&|A", b"MSH|^~\\&|B"));
        assert!(!same_message(b"BHS|^~\\&|A", b"MSH|^~\\&|A"));
    }
}

//! Acknowledgements: ACK messages for accepted, errored and rejected messages.
//!
//! - **Mode.** Original mode answers AA/AE/AR. Enhanced mode (MSH-15 or MSH-16 valued)
//!   answers the commit codes CA/CE/CR; [`wants_accept_ack`] tells whether MSH-15 asks
//!   for one at all.
//! - **Matching.** MSA-2 is always the original MSH-10, so a sender can match the answer
//!   to its message; a frame with no readable header gets an empty MSA-2.
//! - **Mirroring.** Sender and receiver are swapped (MSH-3/4 ↔ MSH-5/6); the delimiters,
//!   processing id, version and character set (MSH-18) are the original's.
//! - **ERR.** v2.5 and later: ERR-2 (location), ERR-3 (table 0357 code), ERR-4
//!   (severity), ERR-8 (text). Before v2.5: ERR-1 (segment^sequence^field^code&text&table),
//!   and the text in MSA-3. Texts say what is wrong, never quote the message.

use crate::error::{ErrorCode, ParseError};
use crate::header::HeaderSummary;
use crate::separators::Separators;
use crate::types::DateTime;

/// The outcome to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted (AA / CA).
    Accept,
    /// Understood but with errors (AE / CE).
    Error,
    /// Refused (AR / CR).
    Reject,
}

impl Outcome {
    /// MSA-1 for this outcome in the given mode.
    pub fn code(self, enhanced: bool) -> &'static str {
        match (self, enhanced) {
            (Outcome::Accept, false) => "AA",
            (Outcome::Error, false) => "AE",
            (Outcome::Reject, false) => "AR",
            (Outcome::Accept, true) => "CA",
            (Outcome::Error, true) => "CE",
            (Outcome::Reject, true) => "CR",
        }
    }
}

/// ERR-4 severity (table 0516).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Information,
}

impl Severity {
    fn code(self) -> &'static str {
        match self {
            Severity::Error => "E",
            Severity::Warning => "W",
            Severity::Information => "I",
        }
    }
}

/// Where in the original message an error lies (ERR-2, ERL data type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorLocation {
    /// The segment id, e.g. `PID`.
    pub segment_id: String,
    /// Which occurrence of that segment (1-based).
    pub sequence: u32,
    pub field: Option<u32>,
    pub repetition: Option<u32>,
    pub component: Option<u32>,
}

/// One ERR segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    pub code: ErrorCode,
    pub severity: Severity,
    pub location: Option<ErrorLocation>,
    /// Diagnostic text: what is wrong, with no message content.
    pub text: String,
}

impl AckError {
    /// The ERR for a parse error, with the segment's occurrence counted in `bytes`.
    pub fn from_parse_error(bytes: &[u8], error: &ParseError) -> AckError {
        let location = error.location.segment_id.map(|id| ErrorLocation {
            segment_id: String::from_utf8_lossy(&id).into_owned(),
            sequence: occurrence(bytes, &id, error.location.offset),
            field: error.location.field,
            repetition: None,
            component: None,
        });
        AckError {
            code: error.kind.hl7_error_code(),
            severity: Severity::Error,
            location,
            text: error.to_string(),
        }
    }
}

/// Counts the segments with id `id` that start before `offset` (the one at `offset` included).
fn occurrence(bytes: &[u8], id: &[u8; 3], offset: usize) -> u32 {
    let mut count = 0;
    let mut line_start = 0;
    for (i, &b) in bytes.iter().enumerate().take(offset.saturating_add(1)) {
        if i == line_start && bytes.get(i..i + 3) == Some(&id[..]) {
            count += 1;
        }
        if b == b'\r' || b == b'\n' {
            line_start = i + 1;
        }
    }
    count.max(1)
}

/// What the ACK's own MSH says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckOptions {
    /// MSH-10 of the ACK. Default: `A` + the original control id (or, when there is
    /// none, the time and a sequence number).
    pub control_id: Option<String>,
    /// MSH-7 of the ACK. Default: now, UTC.
    pub timestamp: Option<DateTime>,
    /// Used as MSH-3/MSH-4 of the ACK when the original has no MSH-5/MSH-6.
    pub application: Option<String>,
    pub facility: Option<String>,
}

/// Whether, in enhanced mode, MSH-15 asks for an accept acknowledgement for this outcome
/// (AL always, NE never, ER only on error, SU only on success). Original mode: always.
pub fn wants_accept_ack(header: &HeaderSummary, outcome: Outcome) -> bool {
    match header.accept_ack_type.as_str() {
        "NE" => false,
        "ER" => outcome != Outcome::Accept,
        "SU" => outcome == Outcome::Accept,
        _ => true,
    }
}

/// Builds an ACK for `header`'s message. `None` builds the answer to a frame whose header
/// could not be read: default delimiters, v2.5, empty MSA-2.
pub fn build(
    header: Option<&HeaderSummary>,
    outcome: Outcome,
    errors: &[AckError],
    options: &AckOptions,
) -> Vec<u8> {
    let fallback = HeaderSummary {
        version: "2.5".to_owned(),
        ..HeaderSummary::default()
    };
    let h = header.unwrap_or(&fallback);
    let s = h.separators;
    let enhanced = h.is_enhanced_mode();
    let timestamp = options
        .timestamp
        .unwrap_or_else(DateTime::now_utc)
        .to_string();
    let control_id = options.control_id.clone().unwrap_or_else(|| {
        if h.control_id.is_empty() {
            // No control id to echo (an unreadable header): the time to the second and a
            // sequence number, so that two such NAKs within a second differ (20
            // characters, MSH-10's length in v2.5).
            static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100_000;
            let seconds: String = timestamp
                .chars()
                .filter(char::is_ascii_digit)
                .take(14)
                .collect();
            format!("A{seconds}{n:05}")
        } else {
            format!("A{}", h.control_id)
        }
    });
    let or = |value: &str, default: &Option<String>| -> String {
        if value.is_empty() {
            default.clone().unwrap_or_default()
        } else {
            value.to_owned()
        }
    };
    let version = h.version_number();
    let modern_err = version >= (2, 5, 0) || version.0 == 0;
    let message_type = match (h.trigger_event.is_empty(), version >= (2, 3, 1)) {
        (true, _) => "ACK".to_owned(),
        (false, true) => format!(
            "ACK{c}{t}{c}ACK",
            c = s.component as char,
            t = h.trigger_event
        ),
        (false, false) => format!("ACK{c}{t}", c = s.component as char, t = h.trigger_event),
    };
    let msh_fields: Vec<String> = vec![
        or(&h.receiving_application, &options.application),
        or(&h.receiving_facility, &options.facility),
        h.sending_application.clone(),
        h.sending_facility.clone(),
        timestamp,
        String::new(),
        message_type,
        control_id,
        if h.processing_id.is_empty() {
            "P".to_owned()
        } else {
            h.processing_id.clone()
        },
        // A version must be sent; answer a message that had none (or only delimiters) in v2.5.
        if crate::escape::unescape(h.version.as_bytes(), &s)
            .iter()
            .any(u8::is_ascii_alphanumeric)
        {
            h.version.clone()
        } else {
            "2.5".to_owned()
        },
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        h.country.clone(),
        mirrored_charset(&h.charset_label, &s),
    ];
    let fs = s.field as char;
    let mut out = String::with_capacity(256);
    out.push_str("MSH");
    out.push(fs);
    out.push_str(&String::from_utf8_lossy(&s.encoding_characters()));
    for f in trim_trailing(&msh_fields) {
        out.push(fs);
        out.push_str(f);
    }
    out.push('\r');

    let first_text = errors.first().map(|e| e.text.as_str()).unwrap_or_default();
    let mut msa = vec![outcome.code(enhanced).to_owned(), h.control_id.clone()];
    if !modern_err && !first_text.is_empty() {
        msa.push(sanitize(first_text, &s));
    }
    push_segment(&mut out, "MSA", &msa, fs);
    for e in errors {
        let err = if modern_err {
            err_v25(e, &s)
        } else {
            err_v2x(e, &s)
        };
        push_segment(&mut out, "ERR", &err, fs);
    }
    out.into_bytes()
}

/// The NAK for a frame that failed to parse: AE or AR by the error's kind, with an ERR
/// locating the problem. The header is salvaged when it is readable so that MSA-2 still
/// names the message.
pub fn for_parse_error(bytes: &[u8], error: &ParseError, options: &AckOptions) -> Vec<u8> {
    let header = HeaderSummary::salvage(bytes);
    build(
        header.as_ref(),
        parse_error_outcome(header.as_ref(), error),
        &[AckError::from_parse_error(bytes, error)],
        options,
    )
}

/// How a frame that failed to parse is answered: AR when the error is one of rejection or
/// no header could be salvaged (the sender cannot fix it by resending), AE otherwise.
pub fn parse_error_outcome(salvaged: Option<&HeaderSummary>, error: &ParseError) -> Outcome {
    if error.kind.is_reject() || salvaged.is_none() {
        Outcome::Reject
    } else {
        Outcome::Error
    }
}

/// MSH-18 of the ACK: the original's, when passerelle knows it. The ACK's own text is
/// ASCII, which every supported character set encodes alike; a label passerelle does not
/// know (say EBCDIC) would tell the sender to read the ASCII ACK wrongly, so it is dropped.
fn mirrored_charset(label: &str, separators: &Separators) -> String {
    // Only the first repetition names the message's character set (the parser reads no other).
    let first = label
        .split(separators.repetition as char)
        .next()
        .unwrap_or_default();
    match crate::charset::Charset::from_label(first.as_bytes()) {
        crate::charset::Label::Unknown => String::new(),
        _ => label.to_owned(),
    }
}

fn err_v25(e: &AckError, s: &Separators) -> Vec<String> {
    let c = s.component as char;
    let location = e.location.as_ref().map(|l| {
        let parts = [
            l.segment_id.clone(),
            l.sequence.to_string(),
            l.field.map(|v| v.to_string()).unwrap_or_default(),
            l.repetition.map(|v| v.to_string()).unwrap_or_default(),
            l.component.map(|v| v.to_string()).unwrap_or_default(),
        ];
        trim_trailing(&parts).join(&c.to_string())
    });
    let code = format!("{}{c}{}{c}HL70357", e.code.code(), e.code.text());
    let fields = vec![
        String::new(),
        location.unwrap_or_default(),
        code,
        e.severity.code().to_owned(),
        String::new(),
        String::new(),
        String::new(),
        sanitize(&e.text, s),
    ];
    fields
}

fn err_v2x(e: &AckError, s: &Separators) -> Vec<String> {
    let c = s.component as char;
    let sc = s.subcomponent as char;
    let l = e.location.as_ref();
    let parts = [
        l.map(|l| l.segment_id.clone()).unwrap_or_default(),
        l.map(|l| l.sequence.to_string()).unwrap_or_default(),
        l.and_then(|l| l.field)
            .map(|v| v.to_string())
            .unwrap_or_default(),
        format!("{}{sc}{}{sc}HL70357", e.code.code(), e.code.text()),
    ];
    vec![parts.join(&c.to_string())]
}

/// Diagnostic text goes into a field: drop delimiters rather than escape them, so that a
/// naive receiver that does not unescape still reads it.
fn sanitize(text: &str, s: &Separators) -> String {
    text.chars()
        .map(|ch| {
            let delimiter =
                u8::try_from(u32::from(ch)).is_ok_and(|b| s.is_delimiter(b) || b == b'\n');
            if delimiter || ch.is_control() {
                ' '
            } else {
                ch
            }
        })
        .collect()
}

fn trim_trailing(fields: &[String]) -> &[String] {
    let end = fields
        .iter()
        .rposition(|f| !f.is_empty())
        .map_or(0, |p| p + 1);
    &fields[..end]
}

fn push_segment(out: &mut String, id: &str, fields: &[String], fs: char) {
    out.push_str(id);
    for f in trim_trailing(fields) {
        out.push(fs);
        out.push_str(f);
    }
    out.push('\r');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Message, Path};

    #[test]
    fn naks_without_a_control_id_to_echo_differ_within_one_second() {
        let options = AckOptions {
            timestamp: Some(DateTime::parse("20240101120000+0000").unwrap()),
            ..AckOptions::default()
        };
        let control_id = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes).into_owned();
            text.split('\r')
                .next()
                .unwrap()
                .split('|')
                .nth(9)
                .unwrap()
                .to_owned()
        };
        let a = control_id(&build(None, Outcome::Reject, &[], &options));
        let b = control_id(&build(None, Outcome::Reject, &[], &options));
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(id.starts_with("A20240101120000"), "{id}");
            assert_eq!(id.len(), 20, "{id}");
        }
    }

    fn fixed() -> AckOptions {
        AckOptions {
            control_id: Some("ACK1".into()),
            timestamp: Some(DateTime::parse("20240101120000+0000").unwrap()),
            ..AckOptions::default()
        }
    }

    fn get(ack: &[u8], path: &str) -> String {
        let m = Message::parse(ack).unwrap();
        m.get(&path.parse::<Path>().unwrap())
            .map(|v| v.text().into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn original_mode_accept() {
        let msg = b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101||ADT^A01^ADT_A01|C42|P|2.5.1||||||8859/15\rPID|1\r";
        let m = Message::parse(msg).unwrap();
        let ack = build(Some(&HeaderSummary::of(&m)), Outcome::Accept, &[], &fixed());
        assert_eq!(
            String::from_utf8(ack.clone()).unwrap(),
            "MSH|^~\\&|RAPP|RFAC|APP|FAC|20240101120000+0000||ACK^A01^ACK|ACK1|P|2.5.1||||||8859/15\rMSA|AA|C42\r"
        );
        assert_eq!(get(&ack, "MSA-2"), "C42");
    }

    #[test]
    fn enhanced_mode_and_custom_separators() {
        let msg = b"MSH#@%\\*#APP#FAC#RAPP#RFAC#20240101##ORU@R01#C7#T#2.5#1##ER#NE\r";
        let m = Message::parse(msg).unwrap();
        let h = HeaderSummary::of(&m);
        let ack = build(Some(&h), Outcome::Error, &[], &fixed());
        let text = String::from_utf8(ack.clone()).unwrap();
        assert!(text.starts_with("MSH#@%\\*#RAPP#RFAC#APP#FAC#"), "{text}");
        assert_eq!(get(&ack, "MSA-1"), "CE");
        assert_eq!(get(&ack, "MSH-9.1"), "ACK");
        assert_eq!(get(&ack, "MSH-11"), "T");
        assert!(wants_accept_ack(&h, Outcome::Error));
        assert!(!wants_accept_ack(&h, Outcome::Accept));
    }

    #[test]
    fn nak_for_a_parse_error_locates_it() {
        let msg = b"MSH|^~\\&|APP|FAC|||20240101||ADT^A01|C9|P|2.5\rPID|1\rPID|2||X\x1cY\r";
        let err = Message::parse(msg).unwrap_err();
        let ack = for_parse_error(msg, &err, &fixed());
        assert_eq!(get(&ack, "MSA-1"), "AE");
        assert_eq!(get(&ack, "MSA-2"), "C9");
        assert_eq!(get(&ack, "ERR-2"), "PID^2^3");
        assert_eq!(get(&ack, "ERR-3.1"), "102");
        assert_eq!(get(&ack, "ERR-3.3"), "HL70357");
        assert_eq!(get(&ack, "ERR-4"), "E");
        assert!(get(&ack, "ERR-8").contains("control character"));
    }

    #[test]
    fn nak_for_garbage_has_empty_msa2() {
        let garbage = b"\x00\x01binary";
        let err = Message::parse(garbage).unwrap_err();
        let ack = for_parse_error(garbage, &err, &fixed());
        let m = Message::parse(&ack).unwrap();
        assert_eq!(m.text("MSA-1").unwrap().as_deref(), Some("AR"));
        assert_eq!(m.text("MSA-2").unwrap(), None);
        assert_eq!(m.text("ERR-3.1").unwrap().as_deref(), Some("100"));
    }

    #[test]
    fn nak_for_a_header_with_control_bytes_still_parses() {
        // Found by fuzzing: a control byte inside MSH-11 was mirrored into the NAK.
        let msg = b"MSH|^~\\&|A|B|||20240101||ADT^A01|C1|P\x032.5\rPID|1\r";
        let err = Message::parse(msg).unwrap_err();
        let nak = for_parse_error(msg, &err, &fixed());
        let parsed = Message::parse(&nak).unwrap();
        assert_eq!(parsed.text("MSA-2").unwrap().as_deref(), Some("C1"));
    }

    #[test]
    fn nak_does_not_mirror_an_unknown_charset() {
        // Found by fuzzing: a label that only starts like a known one was mirrored.
        let msg = b"MSH|^~\\&|A|B|||20240101||ADT^A01|C1|P|2.5|||||FRA|8859/15\xA4FR\rPID|1\r";
        let err = Message::parse(msg).unwrap_err();
        let nak = for_parse_error(msg, &err, &fixed());
        let parsed = Message::parse(&nak).unwrap();
        assert_eq!(parsed.text("MSH-18").unwrap(), None);
        let ok = b"MSH|^~\\&|A|B|||20240101||ADT^A01|C1|P|2.5|||||FRA|8859/15~ISO IR87\rPID|1\r";
        let m = Message::parse(ok).unwrap();
        let ack = build(Some(&HeaderSummary::of(&m)), Outcome::Accept, &[], &fixed());
        assert_eq!(get(&ack, "MSH-18[2]"), "ISO IR87");
    }

    #[test]
    fn nak_for_a_version_of_delimiters_only_still_parses() {
        // Found by fuzzing: MSH-12 `&` was mirrored and the NAK had no version.
        for msg in [
            &b"MSH|^~\\&|A|B|||20240101||ORU^R01|C1|P|&|||\x05\rPID|1\r"[..],
            b"MSH|^~\\&|A|B|||20240101||ORU^R01|C1|P|\\H\\\rPID|1\r",
        ] {
            let err = Message::parse(msg).unwrap_err();
            let nak = for_parse_error(msg, &err, &fixed());
            let parsed = Message::parse(&nak).unwrap();
            assert_eq!(parsed.text("MSH-12").unwrap().as_deref(), Some("2.5"));
        }
    }

    #[test]
    fn old_versions_use_err1_and_msa3() {
        let msg = b"MSH|^~\\&|APP|FAC|||20240101||ADT^A01|C1|P|2.3\rPID|1\r";
        let m = Message::parse(msg).unwrap();
        let e = AckError {
            code: ErrorCode::RequiredFieldMissing,
            severity: Severity::Error,
            location: Some(ErrorLocation {
                segment_id: "PID".into(),
                sequence: 1,
                field: Some(3),
                repetition: None,
                component: None,
            }),
            text: "PID-3 missing".into(),
        };
        let ack = build(Some(&HeaderSummary::of(&m)), Outcome::Error, &[e], &fixed());
        assert_eq!(get(&ack, "MSH-9"), "ACK^A01");
        assert_eq!(get(&ack, "MSA-3"), "PID-3 missing");
        assert_eq!(
            get(&ack, "ERR-1"),
            "PID^1^3^101&Required field missing&HL70357"
        );
    }
}

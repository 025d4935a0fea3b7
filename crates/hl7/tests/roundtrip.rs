//! Property tests: escape→unescape is the identity, and parse(write(m)) == m for
//! arbitrary messages, delimiters and character sets.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use passerelle_hl7::{Charset, Message, OwnedMessage, OwnedSegment, Separators, escape};
use proptest::prelude::*;

fn separators() -> impl Strategy<Value = Separators> {
    // `"` is excluded: `""` is the explicit null and must stay recognisable.
    let punctuation: Vec<u8> = (b'!'..=b'~')
        .filter(|b| b.is_ascii_punctuation() && *b != b'"')
        .collect();
    (Just(punctuation).prop_shuffle(), any::<bool>()).prop_map(|(s, truncation)| Separators {
        field: s[0],
        component: s[1],
        repetition: s[2],
        escape: Some(s[3]),
        subcomponent: s[4],
        truncation: truncation.then_some(s[5]),
    })
}

/// Text for a leaf: any character representable in `charset`, delimiters and line
/// breaks included, since the writer must escape them.
fn leaf(charset: Charset) -> BoxedStrategy<String> {
    let chars = match charset {
        Charset::Ascii => proptest::char::range(' ', '~').boxed(),
        Charset::Latin1 => prop_oneof![
            proptest::char::range(' ', '~'),
            proptest::char::range('\u{A0}', 'ÿ')
        ]
        .boxed(),
        Charset::Latin9 => prop_oneof![
            proptest::char::range(' ', '~'),
            Just('€'),
            Just('œ'),
            Just('Œ'),
            Just('é'),
            Just('ç')
        ]
        .boxed(),
        Charset::Utf8 => any::<char>()
            .prop_filter("no C0/C1 controls", |c| !c.is_control())
            .boxed(),
    };
    let chars = prop_oneof![8 => chars, 1 => Just('\n'), 1 => Just('\r'), 1 => Just('\t')];
    proptest::collection::vec(chars, 0..12)
        .prop_map(|v| v.into_iter().collect())
        .boxed()
}

fn segment(charset: Charset) -> impl Strategy<Value = OwnedSegment> {
    // Not a message or batch header, nor a batch trailer: the parser refuses those
    // inside a message (UnexpectedHeader).
    let id = "[A-Z][A-Z0-9]{2}".prop_filter("not a header or trailer", |id| {
        !matches!(id.as_str(), "MSH" | "FHS" | "BHS" | "FTS" | "BTS")
    });
    let field = proptest::collection::vec(
        proptest::collection::vec(proptest::collection::vec(leaf(charset), 0..3), 0..4),
        0..3,
    );
    (id, proptest::collection::vec(field, 0..8))
        .prop_map(|(id, fields)| OwnedSegment { id, fields })
}

fn message() -> impl Strategy<Value = OwnedMessage> {
    (
        separators(),
        prop_oneof![
            Just(Charset::Ascii),
            Just(Charset::Latin1),
            Just(Charset::Latin9),
            Just(Charset::Utf8)
        ],
    )
        .prop_flat_map(|(seps, charset)| {
            (
                Just(seps),
                Just(charset),
                proptest::collection::vec(segment(charset), 0..6),
                leaf(charset),
            )
        })
        .prop_map(|(seps, charset, segments, app)| {
            let mut m = OwnedMessage::new(seps, charset);
            for (path, value) in [
                ("MSH-3", app.as_str()),
                ("MSH-9.1", "ADT"),
                ("MSH-9.2", "A01"),
                ("MSH-10", "1"),
                ("MSH-12", "2.5"),
            ] {
                m.set(&path.parse().unwrap(), value).unwrap();
            }
            m.segments.extend(segments);
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn escape_then_unescape_is_identity(bytes in proptest::collection::vec(any::<u8>(), 0..64), seps in separators()) {
        let mut escaped = Vec::new();
        escape::escape_into(&bytes, &seps, &mut escaped);
        prop_assert!(!escaped.iter().any(|&b| b == seps.field || b == seps.component || b == seps.repetition
            || b == seps.subcomponent || b == b'\r' || b == b'\n' || Some(b) == seps.truncation));
        let decoded = escape::unescape(&escaped, &seps);
        prop_assert_eq!(decoded.as_ref(), &bytes[..]);
    }

    #[test]
    fn parse_of_write_is_identity(m in message()) {
        let bytes = m.write().expect("every generated value is representable");
        let parsed = Message::parse(&bytes).expect("written messages parse");
        prop_assert_eq!(parsed.charset(), m.charset);
        prop_assert!(parsed.quirks().is_empty(), "{:?}", parsed.quirks());
        let mut expected = m.clone();
        expected.normalize();
        prop_assert_eq!(OwnedMessage::from_message(&parsed), expected);
    }
}

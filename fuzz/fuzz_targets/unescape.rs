//! Escape decoding on arbitrary bytes with arbitrary separators must not panic, and
//! escaping then unescaping must give the input back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_hl7::{Separators, escape};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let separators = if selector & 1 == 0 {
        Separators::default()
    } else {
        Separators { truncation: Some(b'#'), ..Separators::default() }
    };
    let _ = escape::unescape(text, &separators);
    let mut escaped = Vec::new();
    escape::escape_into(text, &separators, &mut escaped);
    assert_eq!(escape::unescape(&escaped, &separators).as_ref(), text);
});

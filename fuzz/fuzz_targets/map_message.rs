//! Maps arbitrary messages with both of the repository's packs (the V2-to-FHIR one and
//! the French one). Any panic is a bug. A message that maps gives JSON that serde_json
//! reads back, and the same bytes when mapped again (the ids are deterministic).
//! Seed the corpus with the fixtures (`fixtures/hl7`, `fixtures/fr`): random bytes
//! rarely make a header that a pack has a message map for.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use passerelle_hl7::Message;
use passerelle_mapping::{MapOptions, Pack};

static PACKS: LazyLock<Vec<Pack>> = LazyLock::new(|| {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["mappings/v2-to-fhir", "mappings/fr"]
        .iter()
        .map(|dir| Pack::load(root.join(dir)).expect("the repository's packs load"))
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::parse(data) else {
        return;
    };
    let options = MapOptions::default();
    for pack in PACKS.iter() {
        let Ok(bundle) = pack.map(&message, &options) else {
            continue;
        };
        let json = bundle.to_json(false);
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&json) {
            panic!("a bundle is not JSON: {e}");
        }
        let again = pack
            .map(&message, &options)
            .expect("a message that mapped once maps again");
        assert_eq!(json, again.to_json(false), "mapping is deterministic");
    }
});

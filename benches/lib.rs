//! # passerelle-benches: shared support for the benchmarks
//!
//! Its job: load the same inputs for every contender, so that a benchmark compares
//! like with like. Figures and the commands that produce them are in `RESULTS.md`.

use std::path::PathBuf;

use passerelle_hl7::{Message, batch};

/// One message of the corpus: its bytes, and its text decoded to UTF-8 for parsers that
/// only take `&str`.
#[derive(Debug, Clone)]
pub struct CorpusMessage {
    pub name: String,
    pub bytes: Vec<u8>,
    pub text: String,
}

/// Every well-formed fixture message (batches split), in file-name order.
pub fn fixture_corpus() -> Vec<CorpusMessage> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hl7");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "hl7"))
        .collect();
    files.sort();
    let mut corpus = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let split = batch::split(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (i, part) in split.messages.iter().enumerate() {
            let message =
                Message::parse(part.bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // The &str parsers get the text without a byte order mark (hl7-parser refuses one).
            let text = message
                .charset()
                .decode(part.bytes)
                .trim_start_matches('\u{feff}')
                .to_owned();
            corpus.push(CorpusMessage {
                name: format!(
                    "{}#{}",
                    file.file_name().unwrap_or_default().to_string_lossy(),
                    i + 1
                ),
                bytes: part.bytes.to_vec(),
                text,
            });
        }
    }
    corpus
}

/// The floor: touch every byte once, counting field separators and segment terminators.
pub fn memchr_floor(bytes: &[u8]) -> usize {
    memchr::memchr2_iter(b'|', b'\r', bytes).count()
}

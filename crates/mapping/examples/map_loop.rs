//! Runs one stage of the mapping bench N times, for instruction counts that a loaded
//! machine does not skew: `perf stat -e instructions:u target/release/examples/map_loop
//! oru_r01_chemistry.hl7 map 10000` (stages: `serialize`, `serialize_tree`, `to_json`, `map`, `both`).

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

/// The `passerelle` binary's allocator, as in the bench.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use passerelle_hl7::Message;
use passerelle_mapping::{MapOptions, Pack};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (file, stage, n) = (&args[1], &args[2], args[3].parse::<usize>().unwrap());
    let root = passerelle_testkit::workspace_root();
    let pack = Pack::load(root.join("mappings/v2-to-fhir")).unwrap();
    let bytes = std::fs::read(root.join("fixtures/hl7").join(file)).unwrap();
    let message = Message::parse(&bytes).unwrap();
    let options = MapOptions::default();
    let bundle = pack.map(&message, &options).unwrap();
    for _ in 0..n {
        match stage.as_str() {
            "serialize" => {
                black_box(serde_json::to_vec(black_box(&bundle)).unwrap());
            }
            // The same JSON from the owned tree (`Bundle::as_node`), a conventional
            // `Vec`-backed tree: the other baseline.
            "serialize_tree" => {
                black_box(serde_json::to_vec(black_box(bundle.as_node())).unwrap());
            }
            // The writer the engine uses (`Bundle::to_json`).
            "to_json" => {
                black_box(black_box(&bundle).to_json(false));
            }
            "map" => {
                black_box(pack.map(black_box(&message), &options).unwrap());
            }
            _ => {
                let b = pack.map(black_box(&message), &options).unwrap();
                black_box(serde_json::to_vec(&b).unwrap());
            }
        }
    }
}

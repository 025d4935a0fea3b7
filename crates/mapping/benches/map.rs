//! Mapping throughput (messages per second) for ADT^A01 and ORU^R01, in the same run as
//! serde_json serialization of the same output bundle. Goal: map + serialize at most 3×
//! serialize alone.
//!
//! `cargo bench -p passerelle-mapping --bench map`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

/// The allocator the `passerelle` binary runs with (`passerelle_store::Allocator`), so
/// that both sides of the comparison allocate as they do in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use passerelle_hl7::Message;
use passerelle_mapping::{MapOptions, Pack};

fn bench(c: &mut Criterion) {
    let root = passerelle_testkit::workspace_root();
    let pack = Pack::load(root.join("mappings/v2-to-fhir")).unwrap();
    let options = MapOptions::default();
    for (name, file) in [
        ("adt_a01", "adt_a01_admit.hl7"),
        ("oru_r01", "oru_r01_chemistry.hl7"),
    ] {
        let bytes = std::fs::read(root.join("fixtures/hl7").join(file)).unwrap();
        let message = Message::parse(&bytes).unwrap();
        let bundle = pack.map(&message, &options).unwrap();
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(1));
        group.bench_function("serialize (serde_json)", |b| {
            b.iter(|| serde_json::to_vec(black_box(&bundle)).unwrap())
        });
        // The same JSON from the owned tree the bundle builds for inspection: the
        // executor's document is a linked structure, this a plain `Vec`-backed tree, so
        // the comparison can be made against either.
        let tree = bundle.as_node().clone();
        group.bench_function("serialize tree (serde_json)", |b| {
            b.iter(|| serde_json::to_vec(black_box(&tree)).unwrap())
        });
        group.bench_function("map", |b| {
            b.iter(|| pack.map(black_box(&message), &options).unwrap())
        });
        group.bench_function("map + serialize", |b| {
            b.iter(|| {
                let bundle = pack.map(black_box(&message), &options).unwrap();
                serde_json::to_vec(&bundle).unwrap()
            })
        });
        group.bench_function("parse + map + serialize", |b| {
            b.iter(|| {
                let message = Message::parse(black_box(&bytes)).unwrap();
                let bundle = pack.map(&message, &options).unwrap();
                serde_json::to_vec(&bundle).unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

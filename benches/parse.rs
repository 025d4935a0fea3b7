//! Parse throughput on the fixture corpus, against a memchr scan (the floor) and two
//! other Rust HL7 v2 parsers, in the same run. See RESULTS.md for figures.
//!
//! Run: `cargo bench -p passerelle-benches --bench parse`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use passerelle_benches::{fixture_corpus, memchr_floor};
use passerelle_hl7::Message;

fn corpus(c: &mut Criterion) {
    let corpus = fixture_corpus();
    let total: usize = corpus.iter().map(|m| m.bytes.len()).sum();
    // Every contender must parse every message, or the comparison is not like for like.
    for m in &corpus {
        assert!(Message::parse(&m.bytes).is_ok(), "passerelle: {}", m.name);
        assert!(hl7_2::parse(&m.text).is_ok(), "hl7-2: {}", m.name);
        assert!(
            hl7_parser::Message::parse_with_lenient_newlines(&m.text, true).is_ok(),
            "hl7-parser: {}",
            m.name
        );
    }
    let mut group = c.benchmark_group(format!("corpus ({} messages, {total} bytes)", corpus.len()));
    group.throughput(Throughput::Bytes(total as u64));

    group.bench_function("memchr floor (count | and CR)", |b| {
        b.iter(|| {
            corpus
                .iter()
                .map(|m| memchr_floor(black_box(&m.bytes)))
                .sum::<usize>()
        })
    });
    group.bench_function("passerelle parse", |b| {
        b.iter(|| {
            corpus
                .iter()
                .map(|m| {
                    Message::parse(black_box(&m.bytes))
                        .map(|p| p.segment_count())
                        .unwrap_or(0)
                })
                .sum::<usize>()
        })
    });
    group.bench_function("passerelle parse + decode every leaf", |b| {
        b.iter(|| {
            let mut chars = 0;
            for m in &corpus {
                let Ok(p) = Message::parse(black_box(&m.bytes)) else {
                    continue;
                };
                for segment in p.segments() {
                    for field in segment.fields() {
                        for rep in field.repetitions() {
                            for comp in rep.components() {
                                for sub in comp.children() {
                                    chars += sub.text().len();
                                }
                            }
                        }
                    }
                }
            }
            chars
        })
    });
    group.bench_function("hl7-2 0.2 parse", |b| {
        b.iter(|| {
            corpus
                .iter()
                .map(|m| {
                    hl7_2::parse(black_box(&m.text))
                        .map(|p| p.segments().count())
                        .unwrap_or(0)
                })
                .sum::<usize>()
        })
    });
    group.bench_function("hl7-parser 0.3 parse", |b| {
        b.iter(|| {
            corpus
                .iter()
                .map(|m| {
                    hl7_parser::Message::parse_with_lenient_newlines(black_box(&m.text), true)
                        .map(|p| p.segments().count())
                        .unwrap_or(0)
                })
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, corpus);
criterion_main!(benches);

//! Store benchmarks (issue 4): journal throughput with durability on, against raw sled
//! insert + flush in the same run; and resident memory as the number of pending messages
//! grows past the page cache.
//!
//! Run: `cargo bench -p passerelle-benches --bench store` (add `-- --quick` for a short run).

#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly

use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_store::{Enqueue, JournalMeta, MshSummary, Outcome, SledStore, Store, StoreConfig};

const CACHE: u64 = 64 * 1024 * 1024;

fn frame(i: u64, size: usize) -> Vec<u8> {
    let mut f = format!("MSH|^~\\&|BENCH|FAC|||20240101||ADT^A08|{i}|P|2.5\rPID|1||{i}^^^H^PI||")
        .into_bytes();
    f.resize(size, b'X');
    f.push(b'\r');
    f
}

fn meta(i: u64) -> JournalMeta {
    JournalMeta {
        listener: "bench".into(),
        peer: "127.0.0.1:1".into(),
        msh: Some(MshSummary {
            message_type: "ADT".into(),
            trigger_event: "A08".into(),
            control_id: i.to_string(),
            ..MshSummary::default()
        }),
        rejected: None,
    }
}

fn open_store(dir: &std::path::Path) -> SledStore {
    let mut c = StoreConfig::new(dir);
    c.cache_capacity = CACHE;
    SledStore::open(c).unwrap()
}

/// passerelle's journal: `writers` tasks, `total` messages, each call returning when durable.
fn journal_rate(rt: &tokio::runtime::Runtime, writers: u64, total: u64) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_store(dir.path()));
    let per = total / writers;
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0..per {
                        let n = w * per + i;
                        store.journal(&frame(n, 1024), meta(n)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rate = (per * writers) as f64 / start.elapsed().as_secs_f64();
    (rate, store.flush_count())
}

/// Raw sled: the same 1 KiB values, `insert` then `flush` per message from `writers`
/// threads; concurrent flushes share sled's own make-stable step.
fn raw_sled_rate(writers: u64, total: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(CACHE)
        .open()
        .unwrap();
    let tree = db.open_tree("raw").unwrap();
    let per = total / writers;
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let (db, tree) = (&db, &tree);
            s.spawn(move || {
                for i in 0..per {
                    let n = w * per + i;
                    tree.insert(n.to_be_bytes(), frame(n, 1024)).unwrap();
                    db.flush().unwrap();
                }
            });
        }
    });
    (per * writers) as f64 / start.elapsed().as_secs_f64()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Journals and queues `marks.last()` messages (none delivered), reporting RSS at each mark.
fn rss_with_pending(rt: &tokio::runtime::Runtime, marks: &[u64]) -> Vec<(u64, u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_store(dir.path()));
    let writers = 64u64;
    let mut done = 0u64;
    let mut out = Vec::new();
    for &mark in marks {
        let todo = mark - done;
        let per = todo / writers;
        rt.block_on(async {
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        for i in 0..per {
                            let n = done + w * per + i;
                            let id = store.journal(&frame(n, 256), meta(n)).await.unwrap();
                            let deliveries = vec![Enqueue {
                                destination: "fhir".into(),
                                ordering_key: format!("P{}", n % 5_000),
                            }];
                            store
                                .record_outcome(
                                    id,
                                    Outcome::Mapped {
                                        route: "r".into(),
                                        bundle: "{}".into(),
                                        deliveries,
                                    },
                                )
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        done += per * writers;
        std::thread::sleep(Duration::from_secs(1));
        out.push((done, rss_kib(), store.size_on_disk().unwrap() / 1024));
    }
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("## journal throughput, 1 KiB frames, durable before return");
    println!(
        "| writers | passerelle journal (msgs/s) | flushes | raw sled insert+flush (msgs/s) | ratio |"
    );
    println!("|---|---|---|---|---|");
    for (writers, total) in [
        (1u64, if quick { 500 } else { 3_000 }),
        (64, if quick { 4_000 } else { 40_000 }),
    ] {
        let raw = raw_sled_rate(writers, total);
        let (ours, flushes) = journal_rate(&rt, writers, total);
        println!(
            "| {writers} | {ours:.0} | {flushes} | {raw:.0} | {:.0} % |",
            100.0 * ours / raw
        );
    }
    println!();
    println!(
        "## resident memory with pending messages (256-byte frames, sled cache {} MiB)",
        CACHE >> 20
    );
    println!("| pending | RSS (MiB) | on disk (MiB) |");
    println!("|---|---|---|");
    let marks: &[u64] = if quick {
        &[10_000, 50_000]
    } else {
        &[10_000, 100_000, 300_000, 1_000_000]
    };
    for (pending, rss, disk) in rss_with_pending(&rt, marks) {
        println!(
            "| {pending} | {:.1} | {:.1} |",
            rss as f64 / 1024.0,
            disk as f64 / 1024.0
        );
    }
}

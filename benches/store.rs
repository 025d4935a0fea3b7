//! Store benchmarks (issue 4): journal throughput with durability on, against raw sled
//! insert + flush and a bare write+fdatasync loop in the same run; and resident memory
//! (RSS, live heap, allocator) as the number of pending messages grows past the page
//! cache, in a child process so that the throughput half leaves nothing behind in it.
//!
//! Run: `cargo bench -p passerelle-benches --bench store` (add `-- --quick` for a short run;
//! `-- --throughput` or `-- --memory` for one half; `PASSERELLE_BENCH_PENDING=10000,50000`
//! sets the pending counts of the memory half).

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

/// The floor for one writer: a 1.2 KiB `write` then `fdatasync` per message into a file
/// preallocated with zeros, as the journal's log does, with nothing else.
fn write_sync_rate(total: u64) -> f64 {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("log")).unwrap();
    let record = vec![b'x'; 1_200];
    file.write_all_at(&vec![0; record.len() * total as usize], 0)
        .unwrap();
    file.sync_all().unwrap();
    let start = Instant::now();
    for i in 0..total {
        file.write_all_at(&record, i * record.len() as u64).unwrap();
        file.sync_data().unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
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

// The allocator passerelle's binary uses, so that resident memory is measured as it runs.
#[global_allocator]
static ALLOCATOR: passerelle_store::Allocator = passerelle_store::Allocator;

/// Bytes the program holds (`allocated`) and the allocator holds in RAM (`resident`,
/// which includes freed memory not yet returned), in KiB.
fn heap_kib() -> (u64, u64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().unwrap();
    (
        (stats::allocated::read().unwrap() / 1024) as u64,
        (stats::resident::read().unwrap() / 1024) as u64,
    )
}

fn live_heap_kib() -> u64 {
    heap_kib().0
}

/// A `kB` field of a `/proc/self` file (`VmRSS` in `status`, `Anonymous` in `smaps_rollup`).
fn proc_kib(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/self/{file}")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    proc_kib("status", "VmRSS:")
}

/// One row of the memory table.
struct MemRow {
    pending: u64,
    rss: u64,
    live: u64,
    allocator: u64,
    rss_flushed: u64,
    disk: u64,
}

/// Journals and queues `marks.last()` messages (none delivered), measuring memory at each
/// mark: as it is, then after a checkpoint (sled flushed, its dirty pages written).
fn rss_with_pending(rt: &tokio::runtime::Runtime, marks: &[u64]) -> Vec<MemRow> {
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
        let rss = rss_kib();
        let (live, allocator) = heap_kib();
        rt.block_on(store.flush()).unwrap();
        out.push(MemRow {
            pending: done,
            rss,
            live,
            allocator,
            rss_flushed: rss_kib(),
            disk: store.size_on_disk().unwrap() / 1024,
        });
        eprintln!(
            "  {done} pending: rss {} MiB, live heap {} MiB",
            rss >> 10,
            live >> 10
        );
    }
    drop(store);
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "  store closed: rss {} MiB, live heap {} MiB",
        rss_kib() >> 10,
        live_heap_kib() >> 10
    );
    let reopened = open_store(dir.path());
    eprintln!(
        "  reopened ({} pending, cache cold): rss {} MiB, live heap {} MiB",
        out.last().map_or(0, |r| r.pending),
        rss_kib() >> 10,
        live_heap_kib() >> 10
    );
    drop(reopened);
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The memory half, in a process of its own so that the throughput runs before it leave
/// nothing behind in the allocator.
fn memory_table(quick: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let marks: Vec<u64> = match std::env::var("PASSERELLE_BENCH_PENDING") {
        Ok(list) => list.split(',').map(|m| m.trim().parse().unwrap()).collect(),
        Err(_) if quick => vec![10_000, 50_000],
        Err(_) => vec![10_000, 100_000, 300_000, 1_000_000],
    };
    println!(
        "## resident memory with pending messages (256-byte frames, sled cache {} MiB)",
        CACHE >> 20
    );
    println!(
        "| pending | RSS (MiB) | live heap (MiB) | allocator resident (MiB) | RSS after a checkpoint (MiB) | on disk (MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rss_with_pending(&rt, &marks) {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.pending,
            mib(r.rss),
            mib(r.live),
            mib(r.allocator),
            mib(r.rss_flushed),
            mib(r.disk)
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--memory") {
        memory_table(quick);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("## journal throughput, 1 KiB frames, durable before return");
    println!(
        "| writers | passerelle journal (msgs/s) | flushes | raw sled insert+flush (msgs/s) | ratio | write+fdatasync alone (msgs/s) |"
    );
    println!("|---|---|---|---|---|---|");
    // The VM's disk latency drifts by several times within a minute: the three
    // measurements take turns, in rounds, so that drift hits them alike.
    const ROUNDS: u64 = 3;
    for (writers, total) in [
        (1u64, if quick { 600 } else { 3_000 }),
        (64, if quick { 3_840 } else { 38_400 }),
    ] {
        let n = total / ROUNDS;
        let (mut raw_s, mut ours_s, mut floor_s, mut flushes) = (0.0, 0.0, 0.0, 0);
        for _ in 0..ROUNDS {
            raw_s += n as f64 / raw_sled_rate(writers, n);
            let (rate, syncs) = journal_rate(&rt, writers, n);
            ours_s += n as f64 / rate;
            flushes += syncs;
            // The sync floor only means something for a lone writer.
            if writers == 1 {
                floor_s += n as f64 / write_sync_rate(n);
            }
        }
        let (raw, ours) = (total as f64 / raw_s, total as f64 / ours_s);
        let floor = if writers == 1 {
            format!("{:.0}", total as f64 / floor_s)
        } else {
            "n/a".to_owned()
        };
        println!(
            "| {writers} | {ours:.0} | {flushes} | {raw:.0} | {:.0} % | {floor} |",
            100.0 * ours / raw
        );
    }
    if std::env::args().any(|a| a == "--throughput") {
        return;
    }
    println!();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.arg("--memory");
    if quick {
        child.arg("--quick");
    }
    let status = child.status().unwrap();
    assert!(status.success(), "the memory run failed: {status}");
}

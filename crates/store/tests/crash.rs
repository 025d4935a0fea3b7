//! Crash safety, proven by killing the real process.
//!
//! The test starts this test binary again as a child process (the ignored `crash_child`
//! test, selected by name) that journals messages from several writers, prints `ACK id key`
//! once `journal` has returned, and delivers them, printing `DLV id key` before reporting
//! each attempt. The parent kills the child with SIGKILL at random moments, cycle after
//! cycle, and after each kill checks that every acknowledged message is in the store. A
//! last run drains the queue; then every acknowledged message must have been delivered at
//! least once, and for each ordering key the first deliveries must follow journal order.
//! The child also checks, on every open, that the ready and lease indexes agree with the
//! delivery records, and stops at once if a lease it holds is lost (a delivery leased
//! twice); either makes the parent fail.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use passerelle_store::*;

const DIR_ENV: &str = "PASSERELLE_CRASH_DIR";
const MODE_ENV: &str = "PASSERELLE_CRASH_MODE";
const RUN_ENV: &str = "PASSERELLE_CRASH_RUN";
const WRITERS: usize = 4;
const DEST: &str = "downstream";
const CYCLES: usize = 24;

fn config(dir: &str) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.visibility_timeout = Duration::from_secs(30);
    c.cache_capacity = 16 * 1024 * 1024;
    c
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff_ms: 2,
        max_backoff_ms: 10,
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: None,
        max_age_ms: None,
        dead_holds_key: false,
    }
}

fn key_of(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split("KEY=")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("?")
        .to_owned()
}

/// The child: journal + deliver until killed (`run`), or deliver until the queue is empty (`drain`).
#[test]
#[ignore = "entry point of the child process that crash_safety_under_sigkill starts and kills"]
fn crash_child() {
    let dir = std::env::var(DIR_ENV).expect("started by the crash test");
    let mode = std::env::var(MODE_ENV).unwrap();
    let run: u64 = std::env::var(RUN_ENV).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SledStore::open(config(&dir)).unwrap());
        for problem in store.debug_check_indexes().unwrap() {
            println!("INCONSISTENT {problem}");
        }
        // Recovery, as the engine does it: route what was journaled but not yet queued,
        // oldest first, before taking new messages.
        for id in store.unprocessed(usize::MAX).await.unwrap() {
            let raw = store.raw(id).await.unwrap().unwrap();
            let deliveries = vec![Enqueue { destination: DEST.into(), ordering_key: key_of(&raw) }];
            store.record_outcome(id, Outcome::Mapped { route: "r".into(), bundle: "{}".into(), deliveries }).await.unwrap();
        }
        println!("READY");
        let consumer = {
            let store = Arc::clone(&store);
            let drain = mode == "drain";
            tokio::spawn(async move {
                let mut n: u64 = run;
                loop {
                    let leases = store.lease(DEST, 8).await.unwrap();
                    if leases.is_empty() {
                        if drain {
                            let counts = store.counts().await.unwrap();
                            let open: u64 = ["pending", "in_flight", "retry_wait"]
                                .iter()
                                .map(|s| counts.deliveries.get(&(DEST.to_owned(), (*s).to_owned())).copied().unwrap_or(0))
                                .sum();
                            if open == 0 {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    for lease in leases {
                        println!("DLV {} {}", lease.message_id, lease.ordering_key);
                        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let report = if n >> 60 == 0 { AttemptReport::transient("http_503") } else { AttemptReport::delivered() };
                        if let Err(e) = store.complete(&lease, report, &policy()).await {
                            // A panic would end this task only: tell the parent.
                            println!("FAILED completing {}: {e}", lease.seq);
                            std::process::exit(3);
                        }
                    }
                }
            })
        };
        if mode == "drain" {
            consumer.await.unwrap();
            store.flush().await.unwrap();
            println!("DRAINED");
            return;
        }
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = Arc::clone(&store);
            writers.push(tokio::spawn(async move {
                let key = format!("PATIENT-{w}");
                for i in 0u64.. {
                    let frame = format!("MSH|^~\\&|CRASH|TEST|||20240101||ADT^A08|{run}-{w}-{i}|P|2.5\rZZZ|KEY={key};\r");
                    let id = store.journal(frame.as_bytes(), JournalMeta::default()).await.unwrap();
                    println!("ACK {id} {key}");
                    let deliveries = vec![Enqueue { destination: DEST.into(), ordering_key: key.clone() }];
                    store.record_outcome(id, Outcome::Mapped { route: "r".into(), bundle: "{}".into(), deliveries }).await.unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
    });
}

/// Runs the child, returning its stdout lines; kills it `kill_after` after READY, if given.
fn run_child(dir: &str, mode: &str, run: u64, kill_after: Option<Duration>) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir)
        .env(MODE_ENV, mode)
        .env(RUN_ENV, run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test crash_child ... " on the same line before the test runs.
            if line.ends_with("READY") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("child became ready");
    match kill_after {
        Some(after) => {
            std::thread::sleep(after); // the random moment of the kill, not a synchronisation
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        None => {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "drain run failed: {status}");
                    break;
                }
                assert!(Instant::now() < deadline, "drain run did not finish");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    reader.join().unwrap()
}

#[test]
fn crash_safety_under_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = seed;
    let mut acked: BTreeMap<MessageId, String> = BTreeMap::new();
    let mut delivered: Vec<(MessageId, String)> = Vec::new();
    let mut replayed_in_all = 0;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for cycle in 0..CYCLES {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(20 + rng % 300);
        let lines = run_child(&path, "run", cycle as u64 + 1, Some(kill_after));
        let mut acked_this_cycle = 0;
        for line in &lines {
            assert!(
                !line.starts_with("FAILED") && !line.starts_with("INCONSISTENT"),
                "cycle {cycle}: {line}"
            );
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ACK", id, key] => {
                    let previous = acked.insert(id.parse().unwrap(), (*key).to_owned());
                    assert!(previous.is_none(), "id {id} acknowledged twice");
                    acked_this_cycle += 1;
                }
                ["DLV", id, key] => delivered.push((id.parse().unwrap(), (*key).to_owned())),
                _ => {}
            }
        }
        // Every message acknowledged so far survived the kill.
        let store = SledStore::open(config(&path)).unwrap();
        runtime.block_on(async {
            for (&id, key) in &acked {
                let raw = store
                    .raw(id)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged message {id} lost"));
                assert_eq!(&key_of(&raw), key, "message {id} is the one acknowledged");
            }
        });
        let replayed = store.recovered_on_open();
        replayed_in_all += replayed;
        drop(store);
        println!(
            "cycle {cycle}: killed after {kill_after:?}, {acked_this_cycle} acknowledged, {replayed} replayed from the journal log, {} in all",
            acked.len()
        );
    }
    let lines = run_child(&path, "drain", 1_000, None);
    assert!(
        lines.iter().any(|l| l.ends_with("DRAINED")),
        "drain run completed"
    );
    for line in &lines {
        assert!(
            !line.starts_with("FAILED") && !line.starts_with("INCONSISTENT"),
            "drain: {line}"
        );
        if let ["DLV", id, key] = line.split(' ').collect::<Vec<_>>().as_slice() {
            delivered.push((id.parse().unwrap(), (*key).to_owned()));
        }
    }

    // Exactly-once in the journal: the store holds each acknowledged id once, and nothing
    // beyond what was journaled.
    let store = SledStore::open(config(&path)).unwrap();
    let stored: Vec<MessageId> = runtime.block_on(async {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list(&Query {
                    after,
                    limit: 1_000,
                    ..Query::default()
                })
                .await
                .unwrap();
            ids.extend(page.items.iter().map(|r| r.id));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        ids
    });
    let stored_set: BTreeSet<MessageId> = stored.iter().copied().collect();
    assert_eq!(stored_set.len(), stored.len(), "no id listed twice");
    for id in acked.keys() {
        assert!(stored_set.contains(id), "acknowledged {id} is stored");
    }

    // At least once: every acknowledged message was delivered.
    let delivered_ids: BTreeSet<MessageId> = delivered.iter().map(|(id, _)| *id).collect();
    let missing: Vec<_> = acked
        .keys()
        .filter(|id| !delivered_ids.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?}"
    );

    // Order per key: first deliveries follow journal (id) order.
    let mut first_seen: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut seen = BTreeSet::new();
    for (id, key) in &delivered {
        if seen.insert(*id) {
            first_seen.entry(key.clone()).or_default().push(*id);
        }
    }
    for (key, ids) in &first_seen {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {key}: delivered out of order: {ids:?}"
        );
    }
    let redelivered = delivered.len() - seen.len();
    println!(
        "crash test: {CYCLES} SIGKILL cycles, {} acknowledged, {replayed_in_all} replayed from the journal log, {} stored, {} delivered ({redelivered} repeats after crashes or retries)",
        acked.len(),
        stored.len(),
        seen.len()
    );
    assert!(acked.len() > CYCLES, "the writers made progress");
}

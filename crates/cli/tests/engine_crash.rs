//! `kill -9` of `passerelle serve` under load loses no acknowledged message: a sender
//! streams messages while the engine is killed at random moments; after each restart the
//! sender goes on; at the end every acknowledged message is stored and delivered.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use passerelle_hl7::{Message, OwnedMessage, Path as Hl7Path};
use passerelle_mapping::{MapOptions, Pack};
use passerelle_mllp::{Client, ClientConfig};
use passerelle_testkit::workspace_root;

mod common;

const CYCLES: usize = 4;
const ROUTE: &str = "name = \"all\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

/// The id of the MessageHeader the v2-to-fhir pack makes for a message.
fn header_id(pack: &Pack, bytes: &[u8]) -> String {
    let bundle = pack
        .map(&Message::parse(bytes).unwrap(), &MapOptions::default())
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&bundle.to_json(false)).unwrap();
    json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "MessageHeader")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .unwrap()
}

/// The fixture with a new control id.
fn message(template: &OwnedMessage, control_id: &str) -> Vec<u8> {
    let mut m = template.clone();
    m.set(&"MSH-10".parse::<Hl7Path>().unwrap(), control_id)
        .unwrap();
    m.write().unwrap()
}

#[test]
fn no_acknowledged_message_is_lost_when_serve_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), ROUTE, "");
    let template =
        std::fs::read(workspace_root().join("fixtures/hl7/adt_a08_update_nulls_v231.hl7")).unwrap();
    let template = OwnedMessage::from_message(&Message::parse(&template).unwrap());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    for cycle in 0..=CYCLES {
        let (engine, addr) = common::start(&config);
        // The sender streams messages on its own task until the connection breaks (or,
        // in the last cycle, until it has sent a few more).
        let sender = {
            let (acked, sent, template, addr) = (
                Arc::clone(&acked),
                Arc::clone(&sent),
                template.clone(),
                addr.clone(),
            );
            let last = cycle == CYCLES;
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut cfg = ClientConfig::new(addr);
                    cfg.ack_timeout = Duration::from_secs(10);
                    cfg.connect_attempts = 1;
                    let mut client = Client::new(cfg).unwrap();
                    loop {
                        let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
                        let id = format!("CRASH{n:06}");
                        match client.send(&message(&template, &id)).await {
                            Ok(ack) if matches!(ack.code.as_str(), "AA" | "CA") => {
                                acked.lock().unwrap().insert(id);
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                        if last && n % 40 == 0 {
                            return;
                        }
                    }
                })
            })
        };
        if cycle < CYCLES {
            // SIGKILL while the sender is in full flow: no chance to flush or close anything.
            std::thread::sleep(Duration::from_millis(150 + (seed >> (cycle * 7)) % 400)); // the random moment of the kill
            common::signal(&engine, "-KILL");
            drop(engine);
            sender.join().unwrap();
        } else {
            sender.join().unwrap();
            // Let the workers deliver everything, then stop cleanly. The oracle: each
            // acknowledged message's MessageHeader id, computed by mapping it here (mapping
            // is deterministic), must show up in the NDJSON output.
            let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
            let expected: BTreeSet<String> = acked
                .lock()
                .unwrap()
                .iter()
                .map(|id| header_id(&pack, &message(&template, id)))
                .collect();
            assert_eq!(
                expected.len(),
                acked.lock().unwrap().len(),
                "one MessageHeader id per message"
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            let headers = dir.path().join("out/MessageHeader.ndjson");
            loop {
                let seen: BTreeSet<String> = std::fs::read_to_string(&headers)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| v["id"].as_str().map(str::to_owned))
                    .collect();
                if expected.is_subset(&seen) {
                    break;
                }
                let missing = expected.difference(&seen).count();
                assert!(
                    Instant::now() < deadline,
                    "deliveries did not catch up: {missing} missing"
                );
                std::thread::sleep(Duration::from_millis(50)); // polls the observable output
            }
            common::stop(engine);
        }
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.load(Ordering::SeqCst);
    // Every acknowledged message is stored and delivered (at least once).
    let out = Command::new(env!("CARGO_BIN_EXE_passerelle"))
        .args([
            "messages",
            "--config",
            config.to_str().unwrap(),
            "list",
            "--state",
            "delivered",
            "--limit",
            "1000000",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let delivered: BTreeSet<String> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["control_id"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but not delivered: {lost:?}");
    println!(
        "{CYCLES} kills: {sent} sent, {} acknowledged, {} delivered",
        acked.len(),
        delivered.len()
    );
    assert!(acked.len() > CYCLES * 5, "the sender made progress");
}

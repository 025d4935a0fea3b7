//! An operator's resubmission in process: the pipeline over a real sled store, the
//! repository's v2-to-fhir pack, NDJSON files, and the admin API served on a loopback
//! port (`POST /api/messages/resubmit`), asked over HTTP.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::sync::Arc;

use base64::Engine as _;
use passerelle_engine::pipeline::UnroutedAnswer;
use passerelle_mllp::{Client, ClientConfig, RunningListener};
use passerelle_store::{
    DeliveryState, JournalMeta, MessageId, MessageState, Query, SledStore, Store,
};
use serde_json::{Value, json};

mod common;
use common::{Harness, fixture, serve_admin, wait_delivered, wait_until};

/// ADT messages from the `mllp` listener only, to NDJSON files under `out`: a corrected
/// copy (journaled under the listener `resubmit`) is taken only if it is routed as its
/// original's listener.
const ROUTE: &str = "name = \"adt\"\nmapping = \"v2-to-fhir\"\nlisteners = [\"mllp\"]\n[match]\nmessage_type = \"ADT\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

const TOKEN: &str = "s3cret";

/// An engine on [`ROUTE`] with its admin API served, and a sender connected to it.
struct Running {
    /// The engine's files (the NDJSON output under `out`).
    engine: Harness,
    store: Arc<SledStore>,
    /// Kept: dropping it closes the listener.
    _listener: RunningListener,
    /// The admin API's base URL.
    base: String,
    client: Client,
}

impl Running {
    async fn start() -> Running {
        let engine = Harness::new(ROUTE);
        let store = Arc::clone(&engine.store);
        let (listener, pipeline) = engine
            .start_with(UnroutedAnswer::Accept, Default::default())
            .await;
        let base = serve_admin(pipeline, TOKEN).await;
        let client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
        Running {
            engine,
            store,
            _listener: listener,
            base,
            client,
        }
    }
}

/// `POST /api/messages/resubmit` with `body`; the status and the answer's text.
async fn post(base: &str, token: Option<&str>, body: &Value) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/api/messages/resubmit"))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// A resubmission the admin API takes (200): its JSON answer.
async fn accepted_resubmission(
    base: &str,
    original: MessageId,
    frame: &[u8],
    dry_run: bool,
) -> Value {
    let (status, text) = post(base, Some(TOKEN), &resubmission(original, frame, dry_run)).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn resubmission(original: MessageId, frame: &[u8], dry_run: bool) -> Value {
    json!({
        "original": original,
        "frame": base64::engine::general_purpose::STANDARD.encode(frame),
        "operator": "alice",
        "dry_run": dry_run,
    })
}

/// The admission fixture with its birth date (PID-7) replaced: `19781399` is no date, and
/// the pack refuses it.
fn with_birth_date(date: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture("adt_a01_admit.hl7")).unwrap();
    assert!(text.contains("|19780412|"));
    text.replace("|19780412|", &format!("|{date}|"))
        .into_bytes()
}

/// The same message with another MSH-7 (as a sender stamps a resend).
fn restamped(frame: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(frame.to_vec()).unwrap();
    assert!(text.contains("|20240311084512-0500|"));
    text.replace("|20240311084512-0500|", "|20240311090000-0500|")
        .into_bytes()
}

/// Every message (a page of them).
fn all() -> Query {
    Query {
        limit: 100,
        ..Query::default()
    }
}

async fn total_messages(store: &SledStore) -> u64 {
    store.counts().await.unwrap().messages.values().sum()
}

async fn state_of(store: &SledStore, id: MessageId) -> MessageState {
    store.get(id).await.unwrap().unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_copy_is_routed_as_its_original_and_delivered() {
    let Running {
        engine,
        store,
        base,
        mut client,
        ..
    } = Running::start().await;
    let patients = engine.work.path().join("out/Patient.ndjson");

    let ack = client.send(&with_birth_date("19781399")).await.unwrap();
    assert!(
        accepted(&ack.code),
        "the sender's message is accepted, then fails to map: {}",
        ack.code
    );
    let original = store.list(&all()).await.unwrap().items[0].id;
    wait_until("the original to fail its mapping", || {
        let store = Arc::clone(&store);
        async move { state_of(&store, original).await == MessageState::MappingFailed }
    })
    .await;

    // Without the token: refused, nothing journaled.
    let fixed = with_birth_date("19780413");
    let (status, _) = post(&base, None, &resubmission(original, &fixed, false)).await;
    assert_eq!(status, 401);

    // A dry run says what would happen, with the running configuration, and stores nothing.
    let answer = accepted_resubmission(&base, original, &fixed, true).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(answer["id"].is_null(), "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("mapped by route adt, queued for adt.files")
            && message.contains("dry run"),
        "{message}"
    );
    assert_eq!(total_messages(&store).await, 1);

    let answer = accepted_resubmission(&base, original, &fixed, false).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        answer["state"], "mapped",
        "routed before the answer: {answer}"
    );
    let copy = answer["id"].as_u64().unwrap();
    assert!(
        answer["message"].as_str().unwrap().starts_with(&format!(
            "journaled as message {copy}, resubmitted from {original}; mapped by route adt"
        )),
        "{answer}"
    );
    // Counted once: the refused request and the dry run journaled nothing.
    let metrics = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\npasserelle_resubmitted_total 1\n"),
        "{metrics}"
    );
    wait_delivered(&store, copy).await;
    assert_eq!(
        common_lines(&patients),
        1,
        "the corrected copy reached the files"
    );

    let record = store.get(copy).await.unwrap().unwrap();
    assert_eq!(record.listener, "resubmit");
    assert_eq!(record.peer, "operator alice");
    assert_eq!(record.links.resubmitted_from, Some(original));
    assert_eq!(record.links.original_listener.as_deref(), Some("mllp"));
    let before = store.get(original).await.unwrap().unwrap();
    assert_eq!(
        before.state,
        MessageState::MappingFailed,
        "the original keeps its state"
    );
    assert_eq!(before.links.resubmitted_as, [copy]);

    // The same answer in show and list (the operations' JSON).
    let shown = passerelle_engine::ops::show(store.as_ref(), original)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown["resubmitted_as"], json!([copy]));
    let listed = passerelle_engine::ops::list(store.as_ref(), &Default::default())
        .await
        .unwrap();
    assert_eq!(listed["items"][1]["resubmitted_from"], json!(original));
}

/// A corrected copy is routed as its original's listener wherever it is routed again: a
/// replay of a copy whose mapping still fails reaches the route (which takes the `mllp`
/// listener only) and its mapping, rather than finding no route for `resubmit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_copy_is_routed_as_its_original() {
    let engine = Harness::new(ROUTE);
    let store = Arc::clone(&engine.store);
    let (listener, pipeline) = engine
        .start_with(UnroutedAnswer::Accept, Default::default())
        .await;
    let base = serve_admin(pipeline.clone(), TOKEN).await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
    let ack = client.send(&with_birth_date("19781399")).await.unwrap();
    assert!(accepted(&ack.code), "{}", ack.code);
    let original = store.list(&all()).await.unwrap().items[0].id;
    wait_until("the original to fail its mapping", || {
        let store = Arc::clone(&store);
        async move { state_of(&store, original).await == MessageState::MappingFailed }
    })
    .await;

    // Corrected, but wrongly again (month 13): the copy fails its mapping too.
    let still_wrong = with_birth_date("19781332");
    let answer = accepted_resubmission(&base, original, &still_wrong, false).await;
    assert_eq!(answer["state"], "mapping_failed", "{answer}");
    let copy = answer["id"].as_u64().unwrap();

    let remap = |raw: &[u8], listener: &str| pipeline.remap(raw, listener);
    let replayed = passerelle_engine::ops::replay(
        store.as_ref(),
        &remap,
        copy,
        &passerelle_engine::ops::ReplayOptions::default(),
    )
    .await;
    assert!(!replayed.replayed, "{replayed:?}");
    assert!(
        replayed.message.starts_with("mapping still fails: "),
        "routed by the route of its original's listener: {replayed:?}"
    );
}

/// AA, or CA for the fixture, which asks for enhanced acknowledgements (MSH-15 `AL`).
fn accepted(code: &str) -> bool {
    matches!(code, "AA" | "CA")
}

fn common_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resubmissions_are_refused_and_store_nothing() {
    let engine = Harness::new(ROUTE);
    let store = Arc::clone(&engine.store);
    let (_listener, pipeline) = engine
        .start_with(UnroutedAnswer::Accept, Default::default())
        .await;
    let base = serve_admin(pipeline, TOKEN).await;
    let original = store
        .journal(
            b"MSH|^~\\&|A|B\rPID|1\r",
            JournalMeta {
                listener: "mllp".into(),
                rejected: Some("byte 9: no MSH-9".into()),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();

    // A frame that does not parse: the parser's located error, nothing stored.
    let (status, text) = post(
        &base,
        Some(TOKEN),
        &resubmission(
            original,
            b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rpid|1\r",
            false,
        ),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("does not parse") && text.contains("segment 2"),
        "located: {text}"
    );
    // Empty, unchanged, or for a message that does not exist.
    let (status, text) = post(&base, Some(TOKEN), &resubmission(original, b"\r\n", false)).await;
    assert_eq!(
        (status, text.trim()),
        (400, "the new message is empty: nothing resubmitted")
    );
    let valid = with_birth_date("19780413");
    let (status, text) = post(
        &base,
        Some(TOKEN),
        &resubmission(original + 1_000, &valid, false),
    )
    .await;
    assert_eq!(
        (status, text.trim()),
        (404, format!("no message {}", original + 1_000).as_str())
    );
    // Not base64, or a field the API does not know.
    let mut body = resubmission(original, &valid, false);
    body["frame"] = json!("not base64!");
    let (status, text) = post(&base, Some(TOKEN), &body).await;
    assert_eq!(status, 400, "{text}");
    let mut body = resubmission(original, &valid, false);
    body["orignal"] = json!(original);
    let (status, text) = post(&base, Some(TOKEN), &body).await;
    assert!(status == 400 && text.contains("orignal"), "{status} {text}");
    assert_eq!(total_messages(&store).await, 1, "nothing was journaled");
    assert!(store.get(original).await.unwrap().unwrap().links.is_empty());

    // The same bytes as the original: a replay's job, refused.
    let sent = store
        .journal(
            &valid,
            JournalMeta {
                listener: "mllp".into(),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();
    let (status, text) = post(&base, Some(TOKEN), &resubmission(sent, &valid, false)).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("unchanged") && text.contains("replay"),
        "{text}"
    );
}

/// The duplicate check does not take a corrected copy for a resend of the message it
/// corrects, even when the copy differs from it only in MSH-7 and the original is on its
/// way; a sender's resend of the copy is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_not_a_duplicate_of_its_original_but_a_resend_still_is() {
    let Running {
        store,
        base,
        mut client,
        ..
    } = Running::start().await;

    let frame = fixture("adt_a01_admit.hl7");
    assert!(accepted(&client.send(&frame).await.unwrap().code));
    let original = store.list(&all()).await.unwrap().items[0].id;
    wait_delivered(&store, original).await;

    let copy_frame = restamped(&frame);
    let answer = accepted_resubmission(&base, original, &copy_frame, false).await;
    let copy = answer["id"].as_u64().unwrap();
    assert_eq!(answer["state"], "mapped", "{answer}");
    assert_eq!(state_of(&store, copy).await, MessageState::Mapped);

    // The sender pushes the same message again: a duplicate, as ever.
    assert!(accepted(&client.send(&copy_frame).await.unwrap().code));
    let resend = store
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .last()
        .unwrap()
        .id;
    assert!(resend > copy);
    wait_until("the resend to be routed", || {
        let store = Arc::clone(&store);
        async move { state_of(&store, resend).await != MessageState::Received }
    })
    .await;
    assert_eq!(state_of(&store, resend).await, MessageState::Duplicate);
}

/// A correction that is, apart from MSH-7, a message the sender already sent (and the
/// engine routed) is a duplicate of it: the dry run says so, as the engine then records it,
/// instead of promising a delivery that will not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_tells_a_copy_that_the_sender_already_sent() {
    let Running {
        store,
        base,
        mut client,
        ..
    } = Running::start().await;

    // The sender's message fails its mapping; the sender then sends it fixed itself.
    assert!(accepted(
        &client
            .send(&with_birth_date("19781399"))
            .await
            .unwrap()
            .code
    ));
    let original = store.list(&all()).await.unwrap().items[0].id;
    let fixed_by_sender = fixture("adt_a01_admit.hl7");
    assert!(accepted(&client.send(&fixed_by_sender).await.unwrap().code));
    let sent_again = store.list(&all()).await.unwrap().items[1].id;
    wait_delivered(&store, sent_again).await;
    assert_eq!(
        state_of(&store, original).await,
        MessageState::MappingFailed
    );

    // The operator, unaware, resubmits the same correction (stamped anew).
    let correction = restamped(&fixed_by_sender);
    let answer = accepted_resubmission(&base, original, &correction, true).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(
        answer["message"],
        format!(
            "would be journaled as a new ADT^A01 message, resubmitted from {original}, and \
             kept as a duplicate of message {sent_again} (the same message, already on its \
             way), not routed (dry run)"
        ),
        "{answer}"
    );
    assert_eq!(
        total_messages(&store).await,
        2,
        "a dry run journals nothing"
    );

    // Done for real, the engine records what the dry run said.
    let answer = accepted_resubmission(&base, original, &correction, false).await;
    let copy = answer["id"].as_u64().unwrap();
    wait_until("the copy to be routed", || {
        let store = Arc::clone(&store);
        async move { state_of(&store, copy).await != MessageState::Received }
    })
    .await;
    assert_eq!(state_of(&store, copy).await, MessageState::Duplicate);
}

/// Resubmitted on the store while no engine runs (`passerelle messages resubmit` without a
/// server): the copy waits as received, and the engine's start routes it, as its
/// original's listener, and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_journaled_while_the_engine_is_stopped_is_routed_at_start() {
    let engine = Harness::new(ROUTE);
    let store = Arc::clone(&engine.store);
    let original = store
        .journal(
            &with_birth_date("19781399"),
            JournalMeta {
                listener: "mllp".into(),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();
    let copy = store
        .resubmit(
            original,
            &with_birth_date("19780413"),
            JournalMeta {
                listener: "resubmit".into(),
                peer: "operator".into(),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(state_of(&store, copy).await, MessageState::Received);

    let _listener = engine.start(UnroutedAnswer::Accept).await;
    assert_eq!(
        state_of(&store, original).await,
        MessageState::MappingFailed
    );
    assert_eq!(
        state_of(&store, copy).await,
        MessageState::Mapped,
        "routed as mllp"
    );
    wait_delivered(&store, copy).await;
    assert_eq!(
        common_lines(&engine.work.path().join("out/Patient.ndjson")),
        1
    );
}

/// An original whose delivery is dead (a server refused its bundle): the copy goes on its
/// own; the original's dead delivery stays dead, and the answer says so, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_deliveries_of_the_original_stay_dead_and_are_named() {
    use passerelle_engine::ops::{self, Resubmission};
    use passerelle_store::{AttemptReport, Enqueue, Outcome, RetryPolicy};

    let engine = Harness::new(ROUTE);
    let store = Arc::clone(&engine.store);
    let original = store
        .journal(
            &fixture("adt_a01_admit.hl7"),
            JournalMeta {
                listener: "mllp".into(),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();
    let queued = Outcome::Mapped {
        route: "adt".into(),
        bundle: "{}".into(),
        deliveries: vec![Enqueue {
            destination: "adt.files".into(),
            ordering_key: "k".into(),
        }],
    };
    store.record_outcome(original, queued).await.unwrap();
    let lease = store.lease("adt.files", 1).await.unwrap().remove(0);
    let refused = AttemptReport::permanent("operation_outcome");
    let state = store
        .complete(&lease, refused, &RetryPolicy::default())
        .await
        .unwrap();
    assert_eq!(state, DeliveryState::Dead);

    let request = Resubmission {
        original,
        frame: with_birth_date("19780413"),
        origin: "operator".into(),
        dry_run: false,
    };
    let result = ops::resubmit(store.as_ref(), None, &Default::default(), &request)
        .await
        .unwrap();
    let warning = result.warning.unwrap();
    assert!(
        warning.contains(&format!(
            "message {original}'s dead deliveries (adt.files) stay dead"
        )),
        "{warning}"
    );
    let copy = result.id.unwrap();
    let deliveries = store.deliveries(original).await.unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].state, DeliveryState::Dead, "not replayed");

    // The engine's start routes the copy (the original's delivery released its key: the
    // default), and delivers it.
    let _listener = engine.start(UnroutedAnswer::Accept).await;
    wait_delivered(&store, copy).await;
    assert_eq!(
        store.deliveries(original).await.unwrap()[0].state,
        DeliveryState::Dead
    );
}

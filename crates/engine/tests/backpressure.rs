//! Backpressure: with a destination down, its queue reaches `max_queue_depth`; new
//! frames are then answered AE without being kept (`error`) or held unanswered until the
//! queue drains (`stop-reading`). The downstream is python `hl7`'s MLLP server, started
//! on the destination's port once the limit is reached.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use passerelle_engine::pipeline::{Backpressure, Limits, UnroutedAnswer};
use passerelle_mllp::{Client, ClientConfig};
use passerelle_store::{DeliveryState, Query, Store};
use passerelle_testkit::mllp::{PeerProcess, script};
use passerelle_testkit::python;

mod common;
use common::{Harness, fixture, wait_until};

/// ADT messages forwarded over MLLP to `port`, retried every 50 to 200 ms.
fn route(port: u16) -> String {
    format!(
        "name = \"adt\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ADT\"\n\
         [[destinations]]\nname = \"peer\"\ntype = \"mllp\"\npeer = \"127.0.0.1:{port}\"\n\
         connect_timeout_s = 1\n[destinations.retry]\ninitial_backoff_ms = 50\n\
         max_backoff_ms = 200\njitter = 0.0\n"
    )
}

fn limits(backpressure: Backpressure) -> Limits {
    Limits {
        max_queue_depth: Some(1),
        max_disk_bytes: None,
        backpressure,
        check_every: Some(Duration::from_millis(20)),
    }
}

async fn start_downstream(port: u16) -> PeerProcess {
    tokio::task::spawn_blocking(move || {
        let mut peer = PeerProcess::spawn(
            "hl7 asyncio server",
            Command::new(python())
                .arg(script("hl7_asyncio_server.py"))
                .arg(port.to_string()),
        );
        peer.wait_for_line("listening on", Duration::from_secs(30));
        peer
    })
    .await
    .unwrap()
}

/// How many messages the store lists: all of them, or those with a delivery in `state`.
async fn count(store: &impl Store, state: Option<DeliveryState>) -> usize {
    store
        .list(&Query {
            delivery_state: state,
            limit: 100,
            ..Query::default()
        })
        .await
        .unwrap()
        .items
        .len()
}

/// An engine whose only destination (an MLLP peer not started yet, on `port`) has one
/// message queued: at `max_queue_depth` 1, it is over its limit.
struct OverTheLimit {
    port: u16,
    store: Arc<passerelle_store::SledStore>,
    listener: passerelle_mllp::RunningListener,
    pipeline: passerelle_engine::pipeline::Pipeline<passerelle_store::SledStore>,
    client: Client,
    _engine: Harness,
}

async fn over_the_limit(backpressure: Backpressure) -> OverTheLimit {
    python(); // the downstream peer, installed on first use
    let port = passerelle_testkit::free_port();
    let engine = Harness::new(&route(port));
    let store = Arc::clone(&engine.store);
    let (listener, pipeline) = engine
        .start_with(UnroutedAnswer::Error, limits(backpressure))
        .await;
    let mut client = Client::new(ClientConfig::new(listener.local_addr().to_string())).unwrap();
    let first = client.send(&fixture("adt_a01_admit.hl7")).await.unwrap();
    assert!(first.is_accept(), "{first:?}");
    wait_until("the queue to reach its limit", || {
        let over = pipeline.over_limits();
        async move { over }
    })
    .await;
    OverTheLimit {
        port,
        store,
        listener,
        pipeline,
        client,
        _engine: engine,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_mode_answers_ae_and_keeps_nothing_until_the_queue_drains() {
    let OverTheLimit {
        port,
        store,
        pipeline,
        mut client,
        _engine, // its folder holds the store: kept to the end
        ..
    } = over_the_limit(Backpressure::Error).await;
    let second = client
        .send(&fixture("adt_a03_discharge.hl7"))
        .await
        .unwrap();
    assert!(
        matches!(second.code.as_str(), "AE" | "CE"),
        "over the limit: {second:?}"
    );
    assert!(
        second.text.as_deref().unwrap_or_default().contains("limit"),
        "{second:?}"
    );
    assert_eq!(
        count(store.as_ref(), None).await,
        1,
        "the refused frame is not kept"
    );

    let _downstream = start_downstream(port).await;
    wait_until("the queue to drain", || {
        let over = pipeline.over_limits();
        async move { !over }
    })
    .await;
    let again = client
        .send(&fixture("adt_a03_discharge.hl7"))
        .await
        .unwrap();
    assert!(again.is_accept(), "under the limit again: {again:?}");
    wait_until("both to be delivered", || {
        let store = Arc::clone(&store);
        async move { count(store.as_ref(), Some(DeliveryState::Delivered)).await == 2 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reading_mode_holds_the_answer_until_the_queue_drains() {
    let OverTheLimit {
        port,
        store,
        listener,
        _engine, // its folder holds the store: kept to the end
        ..
    } = over_the_limit(Backpressure::StopReading).await;
    let addr = listener.local_addr().to_string();

    // The client is not Send: it runs on a runtime of its own.
    let mut held = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut client = Client::new(ClientConfig::new(addr)).unwrap();
                client
                    .send(&fixture("adt_a03_discharge.hl7"))
                    .await
                    .unwrap()
            })
    });
    // Nothing can signal an answer that must not come: give it a generous moment.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut held)
            .await
            .is_err(),
        "no answer while over the limit"
    );
    assert_eq!(
        count(store.as_ref(), None).await,
        1,
        "and the frame is not journaled yet"
    );

    let _downstream = start_downstream(port).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("answered once the queue drains")
        .unwrap();
    assert!(answer.is_accept(), "{answer:?}");
    wait_until("both to be delivered, in order", || {
        let store = Arc::clone(&store);
        async move { count(store.as_ref(), Some(DeliveryState::Delivered)).await == 2 }
    })
    .await;
}

/// A sender that gives up while its frame is held (it closes the connection) leaves
/// nothing behind: the frame is not journaled (it got no ACK and will send it again) and
/// the connection is closed at once, not kept until the queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reading_forgets_a_held_frame_whose_sender_left() {
    use tokio::io::AsyncWriteExt;
    // The client of the first message stays connected.
    let OverTheLimit {
        port,
        store,
        listener,
        pipeline,
        client: _connected,
        _engine, // its folder holds the store: kept to the end
        ..
    } = over_the_limit(Backpressure::StopReading).await;
    let addr = listener.local_addr();

    let open_before = listener.stats().open;
    let frames_before = listener.stats().frames;
    let mut sender = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut framed = vec![0x0b];
    framed.extend(fixture("adt_a03_discharge.hl7"));
    framed.extend([0x1c, 0x0d]);
    sender.write_all(&framed).await.unwrap();
    wait_until("the frame to be held", || {
        let frames = listener.stats().frames;
        async move { frames > frames_before }
    })
    .await;
    assert_eq!(listener.stats().open, open_before + 1);
    drop(sender); // the sender gives up
    wait_until("the held connection to be closed", || {
        let open = listener.stats().open;
        async move { open == open_before }
    })
    .await;

    let _downstream = start_downstream(port).await;
    wait_until("the first message to be delivered", || {
        let store = Arc::clone(&store);
        async move { count(store.as_ref(), Some(DeliveryState::Delivered)).await == 1 }
    })
    .await;
    // The limit is looked at again every 20 ms: wait for the engine to see the relief.
    wait_until("the pressure to lift", || {
        let over = pipeline.over_limits();
        async move { !over }
    })
    .await;
    assert_eq!(
        count(store.as_ref(), None).await,
        1,
        "the abandoned frame was not journaled"
    );
}

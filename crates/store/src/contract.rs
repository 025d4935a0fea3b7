//! Contract tests for any [`Store`]: the behaviour the engine relies on, written against
//! the trait only, so that a second backend runs them unchanged. Each check panics with
//! a message naming what broke.
//!
//! A backend's test suite calls [`run_all`] with a factory that opens a fresh, empty store
//! using the given clock and with `dead_letter_releases_key` on and a 60 s visibility timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed contract check is a panic by design

use std::future::Future;
use std::sync::Arc;

use crate::types::*;
use crate::{ManualClock, Store, StoreError};

const T0: Millis = 1_700_000_000_000;
/// The visibility timeout the factory must configure.
pub const VISIBILITY_MS: u64 = 60_000;

fn frame(control_id: &str) -> Vec<u8> {
    format!("MSH|^~\\&|APP|FAC|||20240101||ADT^A01|{control_id}|P|2.5\rPID|1\r").into_bytes()
}

fn meta(control_id: &str) -> JournalMeta {
    JournalMeta {
        listener: "test".into(),
        peer: "127.0.0.1:1".into(),
        msh: Some(MshSummary {
            message_type: "ADT".into(),
            trigger_event: "A01".into(),
            control_id: control_id.into(),
            ..MshSummary::default()
        }),
        rejected: None,
    }
}

fn mapped(dests: &[(&str, &str)]) -> Outcome {
    Outcome::Mapped {
        route: "r1".into(),
        bundle: "{}".into(),
        deliveries: dests
            .iter()
            .map(|(d, k)| Enqueue {
                destination: (*d).into(),
                ordering_key: (*k).into(),
            })
            .collect(),
    }
}

fn no_retry_limit() -> RetryPolicy {
    RetryPolicy {
        initial_backoff_ms: 1_000,
        max_backoff_ms: 10_000,
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: Some(3),
        max_age_ms: None,
        dead_holds_key: false,
    }
}

/// Journals a message with control id `control_id` and maps it, queued for `dests`
/// (destination, ordering key).
pub(crate) async fn journal_mapped<S: Store>(
    store: &S,
    control_id: &str,
    dests: &[(&str, &str)],
) -> MessageId {
    let id = store
        .journal(&frame(control_id), meta(control_id))
        .await
        .unwrap();
    store.record_outcome(id, mapped(dests)).await.unwrap();
    id
}

/// Runs every contract check, each on a fresh store. `make` opens the store; it is async
/// so that a backend which opens over the network (PostgreSQL) runs the checks unchanged.
pub async fn run_all<S: Store, F: Future<Output = S>>(mut make: impl FnMut(Arc<ManualClock>) -> F) {
    journal_keeps_frames_and_orders_ids(make(clock()).await).await;
    fifo_per_key_and_parallel_keys(make(clock()).await).await;
    retry_waits_for_its_backoff(make_with(&mut make).await).await;
    exhausted_retries_go_dead_and_release_the_key(make(clock()).await).await;
    dead_letter_replays_with_a_new_bundle(make(clock()).await).await;
    a_replay_takes_only_the_deliveries_selected(make(clock()).await).await;
    expired_leases_return_and_stale_completions_are_refused(make_with(&mut make).await).await;
    counts_follow_states(make(clock()).await).await;
    list_filters_and_pages(make(clock()).await).await;
    list_newest_first_pages_down(make(clock()).await).await;
    unprocessed_and_outcomes(make(clock()).await).await;
    purge_and_retention(make_with(&mut make).await).await;
    oldest_unfinished_follows_the_queue(make_with(&mut make).await).await;
    resubmission_links_the_copy_and_its_original(make_with(&mut make).await).await;
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}

async fn make_with<S: Store, F: Future<Output = S>>(
    make: &mut impl FnMut(Arc<ManualClock>) -> F,
) -> (S, Arc<ManualClock>) {
    let c = clock();
    (make(Arc::clone(&c)).await, c)
}

pub async fn journal_keeps_frames_and_orders_ids<S: Store>(store: S) {
    let a = store.journal(&frame("A"), meta("A")).await.unwrap();
    let b = store.journal(&frame("B"), meta("B")).await.unwrap();
    assert!(b > a, "ids are monotonic");
    assert_eq!(
        store.raw(a).await.unwrap().unwrap(),
        frame("A"),
        "raw bytes kept"
    );
    let record = store.get(b).await.unwrap().unwrap();
    assert_eq!(record.state, MessageState::Received);
    assert_eq!(record.msh.unwrap().control_id, "B");
    assert_eq!(record.size, frame("B").len() as u64);
    let rejected = store
        .journal(
            b"garbage",
            JournalMeta {
                rejected: Some("byte 0: not HL7".into()),
                ..JournalMeta::default()
            },
        )
        .await
        .unwrap();
    let r = store.get(rejected).await.unwrap().unwrap();
    assert_eq!(r.state, MessageState::Rejected);
    assert_eq!(r.error.as_deref(), Some("byte 0: not HL7"));
    assert!(store.get(rejected + 1_000_000).await.unwrap().is_none());
}

pub async fn fifo_per_key_and_parallel_keys<S: Store>(store: S) {
    let a1 = journal_mapped(&store, "a1", &[("fhir", "A")]).await;
    let a2 = journal_mapped(&store, "a2", &[("fhir", "A")]).await;
    let b1 = journal_mapped(&store, "b1", &[("fhir", "B")]).await;
    let leases = store.lease("fhir", 10).await.unwrap();
    let ids: Vec<_> = leases.iter().map(|l| l.message_id).collect();
    assert_eq!(
        ids,
        [a1, b1],
        "one lease per key, oldest first; a2 waits behind a1"
    );
    assert!(
        store.lease("fhir", 10).await.unwrap().is_empty(),
        "nothing else is ready"
    );
    assert!(
        store.lease("other", 10).await.unwrap().is_empty(),
        "queues are per destination"
    );
    let policy = no_retry_limit();
    let a1_lease = leases.iter().find(|l| l.message_id == a1).unwrap();
    assert_eq!(
        store
            .complete(a1_lease, AttemptReport::delivered(), &policy)
            .await
            .unwrap(),
        DeliveryState::Delivered
    );
    let next = store.lease("fhir", 10).await.unwrap();
    assert_eq!(
        next.iter().map(|l| l.message_id).collect::<Vec<_>>(),
        [a2],
        "a2 is released by a1's delivery"
    );
    assert_eq!(next[0].attempt, 1);
}

pub async fn retry_waits_for_its_backoff<S: Store>((store, clock): (S, Arc<ManualClock>)) {
    let id = journal_mapped(&store, "r", &[("fhir", "K")]).await;
    let behind = journal_mapped(&store, "r2", &[("fhir", "K")]).await;
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    let mut report = AttemptReport::transient("http_503");
    report.status = Some(503);
    let state = store
        .complete(&lease, report, &no_retry_limit())
        .await
        .unwrap();
    assert_eq!(state, DeliveryState::RetryWait);
    assert_eq!(
        store.next_due_ms("fhir").await.unwrap(),
        Some(T0 + 1_000),
        "first backoff is 1 s"
    );
    clock.advance(999);
    assert!(
        store.lease("fhir", 5).await.unwrap().is_empty(),
        "not before its backoff, and its key stays held"
    );
    clock.advance(1);
    let again = store.lease("fhir", 5).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].message_id, again[0].attempt), (id, 2));
    assert_ne!(again[0].message_id, behind);
    let d = &store.deliveries(id).await.unwrap()[0];
    assert_eq!(d.history.len(), 1);
    assert_eq!(d.history[0].status, Some(503));
    assert_eq!(d.history[0].error_class, "http_503");
    // Retry-After longer than the backoff wins.
    let mut report = AttemptReport::transient("http_429");
    report.retry_after_ms = Some(30_000);
    store
        .complete(&again[0], report, &no_retry_limit())
        .await
        .unwrap();
    assert_eq!(
        store.next_due_ms("fhir").await.unwrap(),
        Some(T0 + 1_000 + 30_000)
    );
}

pub async fn exhausted_retries_go_dead_and_release_the_key<S: Store>(store: S) {
    let first = journal_mapped(&store, "x1", &[("fhir", "K")]).await;
    let second = journal_mapped(&store, "x2", &[("fhir", "K")]).await;
    let policy = RetryPolicy {
        max_attempts: Some(1),
        ..no_retry_limit()
    };
    let lease = store.lease("fhir", 5).await.unwrap().pop().unwrap();
    assert_eq!(lease.message_id, first);
    let state = store
        .complete(&lease, AttemptReport::transient("timeout"), &policy)
        .await
        .unwrap();
    assert_eq!(state, DeliveryState::Dead, "one attempt allowed");
    let d = &store.deliveries(first).await.unwrap()[0];
    assert!(
        d.dead_reason
            .as_deref()
            .unwrap()
            .contains("retries exhausted")
    );
    let next = store.lease("fhir", 5).await.unwrap();
    assert_eq!(
        next.iter().map(|l| l.message_id).collect::<Vec<_>>(),
        [second],
        "the dead one releases its key"
    );
}

/// For a store opened with `dead_letter_releases_key` off, or deliveries completed under a
/// `policy` with `dead_holds_key`: a dead delivery holds its ordering key (later messages
/// of the key wait) until it is replayed and delivered, or purged; other keys go on.
pub async fn a_dead_delivery_holds_its_key<S: Store>(store: S, policy: &RetryPolicy) {
    let first = journal_mapped(&store, "h1", &[("fhir", "K")]).await;
    let second = journal_mapped(&store, "h2", &[("fhir", "K")]).await;
    let other = journal_mapped(&store, "h3", &[("fhir", "L")]).await;
    let leases = store.lease("fhir", 10).await.unwrap();
    let mut ids: Vec<MessageId> = leases.iter().map(|l| l.message_id).collect();
    ids.sort();
    assert_eq!(ids, [first, other]);
    for lease in &leases {
        let report = if lease.message_id == first {
            AttemptReport::permanent("http_4xx")
        } else {
            AttemptReport::delivered()
        };
        store.complete(lease, report, policy).await.unwrap();
    }
    assert!(
        store.lease("fhir", 10).await.unwrap().is_empty(),
        "the dead first message holds K: the second waits"
    );

    // Replayed, the dead one goes first, then the one behind it.
    let dead = ReplaySelection {
        destination: None,
        state: Some(DeliveryState::Dead),
    };
    assert_eq!(store.replay(first, None, &dead).await.unwrap(), 1);
    for (expected, report) in [
        (first, AttemptReport::delivered()),
        (second, AttemptReport::permanent("http_4xx")),
    ] {
        let lease = store.lease("fhir", 10).await.unwrap();
        assert_eq!(
            lease.iter().map(|l| l.message_id).collect::<Vec<_>>(),
            [expected]
        );
        store.complete(&lease[0], report, policy).await.unwrap();
    }

    // Purged, a dead one lets the next go.
    let third = journal_mapped(&store, "h4", &[("fhir", "K")]).await;
    assert!(store.lease("fhir", 10).await.unwrap().is_empty());
    assert!(store.purge(second).await.unwrap());
    let lease = store.lease("fhir", 10).await.unwrap();
    assert_eq!(
        lease.iter().map(|l| l.message_id).collect::<Vec<_>>(),
        [third]
    );
}

/// Each delivery of message `id`: (destination, state), by destination.
async fn delivery_states<S: Store>(store: &S, id: MessageId) -> Vec<(String, DeliveryState)> {
    let mut states: Vec<(String, DeliveryState)> = store
        .deliveries(id)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.destination, d.state))
        .collect();
    states.sort();
    states
}

/// One message to two destinations, delivered to one and dead at the other: a replay of
/// the dead letter queues that delivery alone.
pub async fn a_replay_takes_only_the_deliveries_selected<S: Store>(store: S) {
    let id = journal_mapped(&store, "sel", &[("files", "K"), ("fhir", "K")]).await;
    let lease = store.lease("files", 1).await.unwrap().pop().unwrap();
    store
        .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
        .await
        .unwrap();
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    store
        .complete(
            &lease,
            AttemptReport::permanent("http_4xx"),
            &no_retry_limit(),
        )
        .await
        .unwrap();
    // Nothing is delivered to `files` in the state asked, or at a destination asked.
    for only in [
        ReplaySelection {
            destination: Some("files".into()),
            state: Some(DeliveryState::Dead),
        },
        ReplaySelection {
            destination: Some("nowhere".into()),
            state: None,
        },
    ] {
        assert_eq!(store.replay(id, None, &only).await.unwrap(), 0, "{only:?}");
    }
    let dead_only = ReplaySelection {
        destination: None,
        state: Some(DeliveryState::Dead),
    };
    assert_eq!(store.replay(id, None, &dead_only).await.unwrap(), 1);
    assert_eq!(
        delivery_states(&store, id).await,
        [
            ("fhir".to_owned(), DeliveryState::Pending),
            ("files".to_owned(), DeliveryState::Delivered),
        ],
        "the delivered copy stays delivered"
    );
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    store
        .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
        .await
        .unwrap();
    assert!(store.lease("files", 1).await.unwrap().is_empty());

    // By destination: that one only.
    let files_only = ReplaySelection {
        destination: Some("files".into()),
        state: None,
    };
    assert_eq!(store.replay(id, None, &files_only).await.unwrap(), 1);
    assert_eq!(
        delivery_states(&store, id).await,
        [
            ("fhir".to_owned(), DeliveryState::Delivered),
            ("files".to_owned(), DeliveryState::Pending),
        ]
    );
}

pub async fn dead_letter_replays_with_a_new_bundle<S: Store>(store: S) {
    let id = journal_mapped(&store, "p", &[("fhir", "K")]).await;
    assert_eq!(
        store.get(id).await.unwrap().unwrap().bundle.as_deref(),
        Some("{}"),
        "the mapped bundle is kept"
    );
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    let mut report = AttemptReport::permanent("http_422");
    report.status = Some(422);
    report.detail = "OperationOutcome: invalid code".into();
    assert_eq!(
        store
            .complete(&lease, report, &no_retry_limit())
            .await
            .unwrap(),
        DeliveryState::Dead
    );
    let dead = store
        .list(&Query {
            delivery_state: Some(DeliveryState::Dead),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(
        dead.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [id],
        "listed as dead"
    );
    assert_eq!(
        store
            .replay(
                id,
                Some("{\"fixed\":true}".into()),
                &ReplaySelection::default(),
            )
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.get(id).await.unwrap().unwrap().bundle.as_deref(),
        Some("{\"fixed\":true}")
    );
    let lease = store
        .lease("fhir", 1)
        .await
        .unwrap()
        .pop()
        .expect("replayed delivery is ready");
    assert_eq!((lease.message_id, lease.attempt), (id, 1));
    assert_eq!(
        store
            .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
            .await
            .unwrap(),
        DeliveryState::Delivered
    );
    let d = &store.deliveries(id).await.unwrap()[0];
    assert_eq!(
        d.history.len(),
        2,
        "the attempt history survives the replay"
    );
    assert_eq!(
        store
            .replay(id, None, &ReplaySelection::default())
            .await
            .unwrap(),
        1,
        "a delivered message can be sent again"
    );
}

pub async fn expired_leases_return_and_stale_completions_are_refused<S: Store>(
    (store, clock): (S, Arc<ManualClock>),
) {
    let id = journal_mapped(&store, "l", &[("fhir", "K")]).await;
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    clock.advance(VISIBILITY_MS - 1);
    assert_eq!(store.requeue_expired().await.unwrap(), 0, "not yet expired");
    clock.advance(1);
    assert_eq!(store.requeue_expired().await.unwrap(), 1);
    let again = store
        .lease("fhir", 1)
        .await
        .unwrap()
        .pop()
        .expect("lease returned to ready");
    assert_eq!(again.message_id, id);
    let stale = store
        .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
        .await;
    assert!(
        matches!(stale, Err(StoreError::LeaseLost { .. })),
        "the expired lease is no longer valid"
    );
    assert_eq!(
        store
            .complete(&again, AttemptReport::delivered(), &no_retry_limit())
            .await
            .unwrap(),
        DeliveryState::Delivered
    );
}

pub async fn counts_follow_states<S: Store>(store: S) {
    journal_mapped(&store, "c1", &[("fhir", "A"), ("files", "A")]).await;
    journal_mapped(&store, "c2", &[("fhir", "B")]).await;
    store.journal(&frame("c3"), meta("c3")).await.unwrap();
    let lease = store.lease("fhir", 1).await.unwrap().pop().unwrap();
    store
        .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
        .await
        .unwrap();
    let counts = store.counts().await.unwrap();
    let m = |s: &str| counts.messages.get(s).copied().unwrap_or(0);
    let d = |dest: &str, s: &str| {
        counts
            .deliveries
            .get(&(dest.to_owned(), s.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!((m("mapped"), m("received")), (2, 1));
    assert_eq!(
        (
            d("fhir", "delivered"),
            d("fhir", "pending"),
            d("files", "pending")
        ),
        (1, 1, 1)
    );
    assert_eq!(d("fhir", "in_flight"), 0);
}

pub async fn list_filters_and_pages<S: Store>(store: S) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let key = if i % 2 == 0 { "EVEN" } else { "ODD" };
        ids.push(journal_mapped(&store, &format!("L{i}"), &[("fhir", key)]).await);
    }
    let page1 = store
        .list(&Query {
            limit: 2,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page1.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids[..2]
    );
    let page2 = store
        .list(&Query {
            limit: 2,
            after: page1.next,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page2.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids[2..4]
    );
    let by_control = store
        .list(&Query {
            control_id: Some("L3".into()),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_control.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[3]]
    );
    let below = |before: MessageId, control_id: Option<&str>| {
        let query = Query {
            before: Some(before),
            control_id: control_id.map(str::to_owned),
            ..Query::default()
        };
        let store = &store;
        async move {
            let page = store.list(&query).await.unwrap();
            page.items.iter().map(|r| r.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(below(ids[3], None).await, ids[..3], "only ids below");
    assert!(
        below(ids[3], Some("L3")).await.is_empty(),
        "not the id itself"
    );
    assert_eq!(below(ids[4], Some("L3")).await, [ids[3]]);
    let by_key = store
        .list(&Query {
            ordering_key: Some("ODD".into()),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_key.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[1], ids[3]]
    );
    let by_route = store
        .list(&Query {
            route: Some("nope".into()),
            ..Query::default()
        })
        .await
        .unwrap();
    assert!(by_route.items.is_empty());
    let by_dest = store
        .list(&Query {
            destination: Some("fhir".into()),
            delivery_state: Some(DeliveryState::Pending),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(by_dest.items.len(), 5);
}

/// Newest first: pages go down from the last id, `before` = the previous page's `next`;
/// the index look-ups (control id, ordering key) and the `after` bound hold too.
pub async fn list_newest_first_pages_down<S: Store>(store: S) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let key = if i % 2 == 0 { "EVEN" } else { "ODD" };
        ids.push(journal_mapped(&store, &format!("N{i}"), &[("fhir", key)]).await);
    }
    let newest = |before: Option<MessageId>, after: Option<MessageId>, limit: usize| Query {
        newest_first: true,
        before,
        after,
        limit,
        ..Query::default()
    };
    let ids_of = |page: &Page| page.items.iter().map(|r| r.id).collect::<Vec<_>>();
    let page1 = store.list(&newest(None, None, 2)).await.unwrap();
    assert_eq!(ids_of(&page1), [ids[4], ids[3]]);
    assert_eq!(page1.next, Some(ids[3]));
    let page2 = store.list(&newest(page1.next, None, 2)).await.unwrap();
    assert_eq!(ids_of(&page2), [ids[2], ids[1]]);
    let page3 = store.list(&newest(page2.next, None, 2)).await.unwrap();
    assert_eq!(ids_of(&page3), [ids[0]]);
    assert_eq!(page3.next, None);
    let above = store.list(&newest(None, Some(ids[1]), 10)).await.unwrap();
    assert_eq!(ids_of(&above), [ids[4], ids[3], ids[2]]);
    let by_key = store
        .list(&Query {
            ordering_key: Some("ODD".into()),
            ..newest(None, None, 10)
        })
        .await
        .unwrap();
    assert_eq!(ids_of(&by_key), [ids[3], ids[1]]);
    let by_key_below = store
        .list(&Query {
            ordering_key: Some("EVEN".into()),
            ..newest(Some(ids[4]), None, 10)
        })
        .await
        .unwrap();
    assert_eq!(ids_of(&by_key_below), [ids[2], ids[0]]);
    let by_control = store
        .list(&Query {
            control_id: Some("N3".into()),
            ..newest(None, None, 10)
        })
        .await
        .unwrap();
    assert_eq!(ids_of(&by_control), [ids[3]]);
}

pub async fn unprocessed_and_outcomes<S: Store>(store: S) {
    let a = store.journal(&frame("u1"), meta("u1")).await.unwrap();
    let b = store.journal(&frame("u2"), meta("u2")).await.unwrap();
    assert_eq!(store.unprocessed(10).await.unwrap(), [a, b]);
    store.record_outcome(a, Outcome::Unrouted).await.unwrap();
    store
        .record_outcome(
            b,
            Outcome::MappingFailed {
                route: "r1".into(),
                error: "mappings/x.toml: no rule for ZXX".into(),
            },
        )
        .await
        .unwrap();
    assert!(store.unprocessed(10).await.unwrap().is_empty());
    assert_eq!(
        store.get(a).await.unwrap().unwrap().state,
        MessageState::Unrouted
    );
    // A failed mapping can be re-mapped.
    store
        .record_outcome(b, mapped(&[("fhir", "K")]))
        .await
        .unwrap();
    let again = store.record_outcome(b, Outcome::Unrouted).await;
    assert!(
        matches!(again, Err(StoreError::WrongState { .. })),
        "a mapped message is replayed, not re-routed"
    );
    let history: Vec<String> = store
        .get(b)
        .await
        .unwrap()
        .unwrap()
        .history
        .into_iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(history, ["received", "mapping_failed", "mapped"]);

    // A duplicate keeps the id of its earlier copy in its history, counts as such, and
    // can still be routed (an operator's replay).
    let c = store.journal(&frame("u3"), meta("u3")).await.unwrap();
    store
        .record_outcome(c, Outcome::Duplicate { of: a })
        .await
        .unwrap();
    let record = store.get(c).await.unwrap().unwrap();
    assert_eq!(record.state, MessageState::Duplicate);
    let last = record.history.last().unwrap();
    assert_eq!(last.state, "duplicate");
    assert!(last.detail.contains(&format!("#{a}")), "{}", last.detail);
    assert_eq!(store.counts().await.unwrap().messages["duplicate"], 1);
    store
        .record_outcome(c, mapped(&[("fhir", "K3")]))
        .await
        .unwrap();
    assert_eq!(
        store.get(c).await.unwrap().unwrap().state,
        MessageState::Mapped
    );
}

/// An operator's corrected copy: a new message, `received` (to be routed), linked both
/// ways with its original, which keeps its state, error and frame.
pub async fn resubmission_links_the_copy_and_its_original<S: Store>(
    (store, clock): (S, Arc<ManualClock>),
) {
    let original = store.journal(&frame("bad"), meta("bad")).await.unwrap();
    let failure = Outcome::MappingFailed {
        route: "r1".into(),
        error: "PID-7: not a date".into(),
    };
    store.record_outcome(original, failure).await.unwrap();
    clock.advance(1_000);
    let operator = || JournalMeta {
        listener: "resubmit".into(),
        peer: "operator alice".into(),
        ..meta("fixed")
    };
    let copy = store
        .resubmit(original, &frame("fixed"), operator())
        .await
        .unwrap();
    assert!(copy > original, "the copy is a new, later message");

    let record = store.get(copy).await.unwrap().unwrap();
    assert_eq!(record.state, MessageState::Received);
    assert_eq!(
        (record.listener.as_str(), record.peer.as_str()),
        ("resubmit", "operator alice")
    );
    assert_eq!(record.received_at_ms, T0 + 1_000);
    assert_eq!(
        record.links,
        Links {
            resubmitted_from: Some(original),
            original_listener: Some("test".into()),
            resubmitted_as: Vec::new(),
        }
    );
    assert_eq!(record.routing_listener(), "test");
    assert_eq!(record.history.len(), 1);
    assert_eq!(record.history[0].state, "received");
    assert_eq!(
        record.history[0].detail,
        format!("resubmitted from message {original}")
    );
    assert_eq!(store.raw(copy).await.unwrap().unwrap(), frame("fixed"));
    assert_eq!(
        store.unprocessed(10).await.unwrap(),
        [copy],
        "the copy is routed and mapped as a received message is"
    );

    let before = store.get(original).await.unwrap().unwrap();
    assert_eq!(before.state, MessageState::MappingFailed, "keeps its state");
    assert_eq!(before.error.as_deref(), Some("PID-7: not a date"));
    assert_eq!(before.links.resubmitted_as, [copy]);
    assert_eq!(before.links.resubmitted_from, None);
    let last = before.history.last().unwrap();
    assert_eq!(
        (last.at_ms, last.state.as_str(), last.detail.clone()),
        (
            T0 + 1_000,
            "resubmitted",
            format!("resubmitted as message {copy}")
        )
    );
    assert_eq!(store.raw(original).await.unwrap().unwrap(), frame("bad"));
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.messages.get("received").copied(), Some(1));
    assert_eq!(counts.messages.get("mapping_failed").copied(), Some(1));

    // A list shows the links too (an operator sees them without opening each message).
    let page = store
        .list(&Query {
            limit: 10,
            ..Query::default()
        })
        .await
        .unwrap();
    let listed: Vec<(MessageId, Links)> = page.items.into_iter().map(|r| (r.id, r.links)).collect();
    assert_eq!(
        listed,
        [
            (original, before.links.clone()),
            (copy, record.links.clone())
        ]
    );

    // The copy is routed like any message; a copy of the copy routes as the first original.
    store
        .record_outcome(copy, mapped(&[("fhir", "K")]))
        .await
        .unwrap();
    let second = store
        .resubmit(copy, &frame("fixed2"), operator())
        .await
        .unwrap();
    let record = store.get(second).await.unwrap().unwrap();
    assert_eq!(record.links.resubmitted_from, Some(copy));
    assert_eq!(record.links.original_listener.as_deref(), Some("test"));
    let middle = store.get(copy).await.unwrap().unwrap();
    assert_eq!(middle.state, MessageState::Mapped);
    assert_eq!(middle.links.resubmitted_from, Some(original));
    assert_eq!(middle.links.resubmitted_as, [second]);

    // No original: refused, nothing journaled.
    let missing = second + 1_000_000;
    assert!(matches!(
        store.resubmit(missing, &frame("x"), operator()).await,
        Err(StoreError::NotFound(id)) if id == missing
    ));
    let counts = store.counts().await.unwrap();
    let total: u64 = counts.messages.values().sum();
    assert_eq!(total, 3, "nothing journaled for a missing original");

    // Purging the original leaves the copy whole, pointing at an id that is gone.
    assert!(store.purge(original).await.unwrap());
    let record = store.get(copy).await.unwrap().unwrap();
    assert_eq!(record.links.resubmitted_from, Some(original));
}

pub async fn purge_and_retention<S: Store>((store, clock): (S, Arc<ManualClock>)) {
    let old = journal_mapped(&store, "old", &[("fhir", "A")]).await;
    let stuck = journal_mapped(&store, "stuck", &[("fhir", "B")]).await;
    for lease in store.lease("fhir", 10).await.unwrap() {
        if lease.message_id == old {
            store
                .complete(&lease, AttemptReport::delivered(), &no_retry_limit())
                .await
                .unwrap();
        }
    }
    clock.advance(10_000);
    let recent = journal_mapped(&store, "recent", &[("fhir", "C")]).await;
    let pruned = store.prune_delivered(T0 + 5_000).await.unwrap();
    assert_eq!(pruned, 1, "only the old, delivered message goes");
    assert!(store.get(old).await.unwrap().is_none());
    assert!(store.raw(old).await.unwrap().is_none(), "its raw bytes too");
    assert!(store.get(stuck).await.unwrap().is_some());
    assert!(store.get(recent).await.unwrap().is_some());
    assert!(
        matches!(store.purge(stuck).await, Err(StoreError::WrongState { .. })),
        "an unfinished message is not purged"
    );
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.messages.get("mapped").copied(), Some(2));
    assert_eq!(
        counts
            .deliveries
            .get(&("fhir".into(), "delivered".into()))
            .copied(),
        Some(0)
    );
}

pub async fn oldest_unfinished_follows_the_queue<S: Store>((store, clock): (S, Arc<ManualClock>)) {
    assert_eq!(store.oldest_unfinished_ms("fhir").await.unwrap(), None);
    let first = journal_mapped(&store, "o1", &[("fhir", "A"), ("ndjson", "A")]).await;
    clock.advance(10);
    let second = journal_mapped(&store, "o2", &[("fhir", "B")]).await;
    assert_eq!(
        store.oldest_unfinished_ms("fhir").await.unwrap(),
        Some(T0),
        "the first message waits"
    );
    let leases = store.lease("fhir", 5).await.unwrap();
    assert_eq!(leases.len(), 2, "two keys go in parallel");
    assert_eq!(
        store.oldest_unfinished_ms("fhir").await.unwrap(),
        Some(T0),
        "in flight is unfinished"
    );
    let lease_of = |id| leases.iter().find(|l| l.message_id == id).unwrap();
    store
        .complete(
            lease_of(first),
            AttemptReport::delivered(),
            &no_retry_limit(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.oldest_unfinished_ms("fhir").await.unwrap(),
        Some(T0 + 10),
        "the second is now the oldest"
    );
    assert_eq!(
        store.oldest_unfinished_ms("ndjson").await.unwrap(),
        Some(T0),
        "queues are independent"
    );
    store
        .complete(
            lease_of(second),
            AttemptReport::permanent("http_400"),
            &no_retry_limit(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.oldest_unfinished_ms("fhir").await.unwrap(),
        None,
        "dead is final: the dead letter has its own count"
    );
    clock.advance(1_000);
    assert_eq!(
        store
            .replay(first, None, &ReplaySelection::default())
            .await
            .unwrap(),
        1,
        "only the final (fhir) delivery is queued again"
    );
    assert_eq!(
        store.oldest_unfinished_ms("fhir").await.unwrap(),
        Some(T0 + 1_010),
        "a replayed delivery is unfinished again, queued at the replay"
    );
    assert!(store.disk_bytes().await.unwrap() > 0);
}

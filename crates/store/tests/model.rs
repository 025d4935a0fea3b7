//! Model-based test of the queue: random sequences of enqueue, lease, complete (delivered,
//! transient, permanent), clock moves, lease expiry and restarts, run against a simple
//! in-memory model of the contract and against each backend: the sled store, and the
//! PostgreSQL store on a real server (one server for the test binary's PostgreSQL test, a
//! fresh database per case). After every step the leases handed out, the outcome of each
//! completion and every state counter must match.
//!
//! Each runs twice: with dead deliveries releasing their ordering key (the default), and
//! holding it (the destination's `RetryPolicy::dead_holds_key`), where the sequences also
//! replay and purge dead messages: the key's later deliveries must wait behind a dead one
//! until then.
//!
//! Without PostgreSQL's binaries the PostgreSQL test fails, saying what to install.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

mod common;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use passerelle_store::*;
use passerelle_testkit::postgres::PgServer;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

const KEYS: [&str; 3] = ["A", "B", "C"];
const DEST: &str = "fhir";
const VISIBILITY: u64 = 5_000;
const START: u64 = 1_000_000;

/// The destination's policy; `hold`: its dead deliveries hold their key.
fn policy(hold: bool) -> RetryPolicy {
    RetryPolicy {
        initial_backoff_ms: 1_000,
        max_backoff_ms: 4_000,
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: Some(3),
        max_age_ms: None,
        dead_holds_key: hold,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    Delivered,
    Transient,
    Permanent,
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    Lease(usize),
    Complete(usize, Report),
    Advance(u64),
    Reap,
    Restart,
    /// Replays the dead delivery chosen by the slot (modulo the dead ones).
    Replay(usize),
    /// Purges the message of the dead delivery chosen by the slot.
    Purge(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Item {
    key: usize,
    state: DeliveryState,
    attempts: u32,
    due: u64,
    lease_until: u64,
    /// The highest `lease_until` this item was ever leased with (see `Backend::lease_until`).
    lease_token: u64,
    /// Purged: no longer in the store.
    gone: bool,
}

/// The model: items in enqueue order, the leases the worker holds, and what the last step
/// should have answered.
#[derive(Debug, Clone, Default)]
struct Model {
    /// Whether a dead delivery holds its key.
    hold: bool,
    now: u64,
    items: Vec<Item>,
    /// (item index, lease_until) held by the worker.
    held: Vec<(usize, u64)>,
    last_leased: Vec<usize>,
    last_complete: Option<Result<DeliveryState, ()>>,
    /// The item the last replay or purge chose.
    last_chosen: Option<usize>,
}

impl Model {
    /// Whether an item holds its key: unfinished, or dead when dead deliveries hold it.
    fn holds_key(&self, it: &Item) -> bool {
        !it.gone && (!it.state.is_final() || self.hold && it.state == DeliveryState::Dead)
    }

    fn is_head(&self, i: usize) -> bool {
        let key = self.items[i].key;
        !self.items[..i]
            .iter()
            .any(|it| it.key == key && self.holds_key(it))
    }

    /// The dead items still in the store, in order.
    fn dead(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| !self.items[i].gone && self.items[i].state == DeliveryState::Dead)
            .collect()
    }

    /// Makes the next unfinished item of `key` after `i` due now (it becomes the head).
    fn promote_after(&mut self, i: usize) {
        let key = self.items[i].key;
        let now = self.now;
        if let Some(next) = self
            .items
            .iter_mut()
            .skip(i + 1)
            .find(|it| it.key == key && !it.gone && !it.state.is_final())
        {
            next.due = now;
        }
    }

    fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut c = BTreeMap::new();
        for it in self.items.iter().filter(|it| !it.gone) {
            *c.entry(it.state.name()).or_insert(0) += 1;
        }
        c
    }
}

/// The model, for the store of backend `B` (which differ only in `Backend::lease_until`).
struct QueueModel<B>(PhantomData<B>);

impl<B: Backend> ReferenceStateMachine for QueueModel<B> {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            hold: B::HOLD,
            now: START,
            ..Model::default()
        })
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let report = prop_oneof![3 => Just(Report::Delivered), 2 => Just(Report::Transient), 1 => Just(Report::Permanent)];
        let complete = (0..8usize, report).prop_map(|(slot, r)| Op::Complete(slot, r));
        if state.hold && !state.dead().is_empty() {
            // An operator at work on the dead letter, among the rest.
            let operator = prop_oneof![
                3 => (0..8usize).prop_map(Op::Replay),
                1 => (0..8usize).prop_map(Op::Purge),
            ];
            return prop_oneof![
                4 => (0..KEYS.len()).prop_map(Op::Enqueue),
                3 => (1..4usize).prop_map(Op::Lease),
                if state.held.is_empty() { 0 } else { 5 } => complete,
                2 => prop_oneof![Just(500u64), Just(1_000), Just(2_000), Just(6_000)].prop_map(Op::Advance),
                1 => Just(Op::Reap),
                1 => Just(Op::Restart),
                3 => operator,
            ]
            .boxed();
        }
        if state.held.is_empty() {
            prop_oneof![
                4 => (0..KEYS.len()).prop_map(Op::Enqueue),
                3 => (1..4usize).prop_map(Op::Lease),
                2 => prop_oneof![Just(500u64), Just(1_000), Just(2_000), Just(6_000)].prop_map(Op::Advance),
                1 => Just(Op::Reap),
                1 => Just(Op::Restart),
            ]
            .boxed()
        } else {
            prop_oneof![
                4 => (0..KEYS.len()).prop_map(Op::Enqueue),
                3 => (1..4usize).prop_map(Op::Lease),
                5 => complete,
                2 => prop_oneof![Just(500u64), Just(1_000), Just(2_000), Just(6_000)].prop_map(Op::Advance),
                1 => Just(Op::Reap),
                1 => Just(Op::Restart),
            ]
            .boxed()
        }
    }

    fn preconditions(state: &Model, op: &Op) -> bool {
        match op {
            Op::Complete(..) => !state.held.is_empty(),
            Op::Replay(_) | Op::Purge(_) => state.hold && !state.dead().is_empty(),
            _ => true,
        }
    }

    fn apply(mut m: Model, op: &Op) -> Model {
        m.last_leased.clear();
        m.last_complete = None;
        m.last_chosen = None;
        match *op {
            Op::Enqueue(key) => {
                let due = m.now;
                m.items.push(Item {
                    key,
                    state: DeliveryState::Pending,
                    attempts: 0,
                    due,
                    lease_until: 0,
                    lease_token: 0,
                    gone: false,
                });
            }
            Op::Lease(max) => {
                let mut ready: Vec<usize> = (0..m.items.len())
                    .filter(|&i| {
                        let it = m.items[i];
                        matches!(it.state, DeliveryState::Pending | DeliveryState::RetryWait)
                            && it.due <= m.now
                            && m.is_head(i)
                    })
                    .collect();
                ready.sort_by_key(|&i| (m.items[i].due, i));
                ready.truncate(max);
                for &i in &ready {
                    let until = B::lease_until(m.now + VISIBILITY, m.items[i].lease_token);
                    let item = &mut m.items[i];
                    item.state = DeliveryState::InFlight;
                    item.lease_until = until;
                    item.lease_token = until;
                    m.held.push((i, until));
                }
                m.last_leased = ready;
            }
            Op::Complete(slot, report) => {
                let (i, until) = m.held.remove(slot % m.held.len());
                let it = m.items[i];
                if it.state != DeliveryState::InFlight || it.lease_until != until {
                    m.last_complete = Some(Err(()));
                    return m;
                }
                let attempts = it.attempts + 1;
                let p = policy(m.hold);
                let next = match report {
                    Report::Delivered => DeliveryState::Delivered,
                    Report::Permanent => DeliveryState::Dead,
                    Report::Transient if p.allows(attempts, 0, 0) => DeliveryState::RetryWait,
                    Report::Transient => DeliveryState::Dead,
                };
                let item = &mut m.items[i];
                item.attempts = attempts;
                item.state = next;
                item.lease_until = 0;
                if next == DeliveryState::RetryWait {
                    item.due = m.now + p.backoff_ms(attempts, 0.5);
                } else if next == DeliveryState::Delivered || !m.hold {
                    m.promote_after(i);
                }
                m.last_complete = Some(Ok(next));
            }
            Op::Advance(ms) => m.now += ms,
            Op::Replay(slot) => {
                // Holding its key, a dead item is its key's head: ready again at once.
                let dead = m.dead();
                let i = dead[slot % dead.len()];
                m.last_chosen = Some(i);
                let now = m.now;
                let item = &mut m.items[i];
                item.state = DeliveryState::Pending;
                item.attempts = 0;
                item.due = now;
            }
            Op::Purge(slot) => {
                let dead = m.dead();
                let i = dead[slot % dead.len()];
                m.last_chosen = Some(i);
                m.items[i].gone = true;
                m.promote_after(i);
            }
            Op::Reap | Op::Restart => {
                let limit = if matches!(op, Op::Restart) {
                    u64::MAX
                } else {
                    m.now
                };
                let now = m.now;
                for it in &mut m.items {
                    if it.state == DeliveryState::InFlight && it.lease_until <= limit {
                        it.state = DeliveryState::Pending;
                        it.due = now;
                    }
                }
            }
        }
        m
    }
}

/// What the system under test needs from a backend: a place for one case's store that
/// outlives restarts, opening a store there with the test's clock, and a restart.
trait Backend: Sized + 'static {
    /// Whether the destination's policy has dead deliveries hold their key.
    const HOLD: bool;
    type Store: Store;
    /// One case's folder or database, kept across restarts.
    type Place;

    async fn place() -> Self::Place;
    async fn open(place: &Self::Place, clock: &Arc<ManualClock>) -> Self::Store;
    /// Stops `store` as a process that goes away would, and opens the store again: leases
    /// in flight return to ready (the model's expectation).
    async fn restart(
        place: &Self::Place,
        store: Self::Store,
        clock: &Arc<ManualClock>,
    ) -> Self::Store;
    async fn teardown(place: Self::Place, store: Self::Store);

    /// The `lease_until_ms` (the lease's token) a lease taken at `now` gets, for a
    /// delivery whose highest token so far is `token`. The contract only asks that a
    /// lease cannot complete once its delivery was leased again; the backends honour it
    /// differently in one corner, which the model follows rather than hides.
    fn lease_until(now_plus_visibility: u64, token: u64) -> u64;
}

/// The embedded store, in a temporary folder; a restart flushes, closes and opens it.
struct Sled<const HOLD: bool>;

impl<const HOLD: bool> Backend for Sled<HOLD> {
    const HOLD: bool = HOLD;
    type Store = SledStore;
    type Place = tempfile::TempDir;

    async fn place() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    async fn open(dir: &tempfile::TempDir, clock: &Arc<ManualClock>) -> SledStore {
        let mut config = StoreConfig::new(dir.path());
        config.clock = clock.clone();
        config.visibility_timeout = Duration::from_millis(VISIBILITY);
        config.cache_capacity = 4 * 1024 * 1024;
        SledStore::open(config).unwrap()
    }

    async fn restart(
        dir: &tempfile::TempDir,
        store: SledStore,
        clock: &Arc<ManualClock>,
    ) -> SledStore {
        store.flush().await.unwrap();
        drop(store);
        Self::open(dir, clock).await
    }

    async fn teardown(_: tempfile::TempDir, _: SledStore) {}

    /// The token is the expiry time itself: after a restart (which frees every lease at
    /// once, whatever its expiry), a delivery leased again in the same millisecond gets the
    /// token of its lease from before the restart, which then still completes it. No worker
    /// outlives a sled restart to show that old lease, so the contract holds in practice.
    fn lease_until(now_plus_visibility: u64, _: u64) -> u64 {
        now_plus_visibility
    }
}

/// The connection string of the PostgreSQL server's `postgres` database, set by
/// `queue_on_postgres_matches_its_model` (which owns the server) before any case runs.
static PG_ADMIN_URL: OnceLock<String> = OnceLock::new();

/// One case's database on the shared server, and a connection to the server's `postgres`
/// database to create it, look at its sessions and drop it.
struct PgCase {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

/// The shared store: a fresh database per case; a restart is a node that goes away and a
/// node that opens the database after it.
struct Postgres<const HOLD: bool>;

impl<const HOLD: bool> Postgres<HOLD> {
    /// Ends the session holding `node`'s liveness lock in database `name` (if it has not
    /// ended already) and waits until it has, then checks the lock is free.
    async fn end_node(admin: &tokio_postgres::Client, name: &str, node: i32) {
        const HOLDER: &str = "FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE d.datname = $1 AND l.locktype = 'advisory' \
             AND l.classid::bigint = 1346458451 AND l.objid::bigint = $2::integer \
             AND l.objsubid = 2 AND l.granted";
        // pg_terminate_backend with a timeout (PostgreSQL 14 and later) returns once the
        // session has exited, its locks released, or false after the timeout: a wait on
        // the server's own signal, not a sleep.
        admin
            .query(
                &format!("SELECT pg_terminate_backend(l.pid, 30000) {HOLDER}"),
                &[&name, &node],
            )
            .await
            .unwrap();
        let holders: i64 = admin
            .query_one(&format!("SELECT count(*) {HOLDER}"), &[&name, &node])
            .await
            .unwrap()
            .get(0);
        assert_eq!(holders, 0, "the stopped node's session ended");
    }
}

impl<const HOLD: bool> Backend for Postgres<HOLD> {
    const HOLD: bool = HOLD;
    type Store = PgStore;
    type Place = PgCase;

    async fn place() -> PgCase {
        static CASES: AtomicUsize = AtomicUsize::new(0);
        let admin_url = PG_ADMIN_URL
            .get()
            .expect("the PostgreSQL server is started by queue_on_postgres_matches_its_model");
        let admin = common::client(admin_url).await;
        let name = format!("case_{}", CASES.fetch_add(1, Ordering::SeqCst));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        // In a key=value connection string the last value of a key wins.
        let url = format!("{admin_url} dbname={name}");
        PgCase { admin, name, url }
    }

    async fn open(case: &PgCase, clock: &Arc<ManualClock>) -> PgStore {
        let mut config = PgConfig::new(case.url.clone());
        config.clock = clock.clone();
        config.visibility_timeout = Duration::from_millis(VISIBILITY);
        config.pool_size = 2;
        PgStore::open(config).await.unwrap()
    }

    /// The store is dropped (its connections close) and its node's session is ended and
    /// waited for, as after a crash; the store opened next finds the node's liveness lock
    /// free and returns its leases to ready, as the model expects of a restart.
    async fn restart(case: &PgCase, store: PgStore, clock: &Arc<ManualClock>) -> PgStore {
        let node = store.node();
        drop(store);
        Self::end_node(&case.admin, &case.name, node).await;
        let reopened = Self::open(case, clock).await;
        assert_ne!(reopened.node(), node, "a new node number");
        reopened
    }

    async fn teardown(case: PgCase, store: PgStore) {
        drop(store);
        case.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", case.name))
            .await
            .unwrap();
    }

    /// The token only grows (`GREATEST(now + visibility, previous token + 1)`), so a
    /// delivery leased again in the millisecond of its lease from before a restart gets a
    /// lease 1 ms longer, and that old lease is refused. This is stricter than sled, and
    /// needed: the node that held the old lease may still be running (it only looked gone,
    /// see the pg_store module doc) and must not complete the new one.
    fn lease_until(now_plus_visibility: u64, token: u64) -> u64 {
        now_plus_visibility.max(token + 1)
    }
}

struct Sut<B: Backend> {
    runtime: tokio::runtime::Runtime,
    place: B::Place,
    clock: Arc<ManualClock>,
    store: Option<B::Store>,
    /// Message id of each enqueued item, by index.
    ids: Vec<MessageId>,
    /// Leases held, parallel to the model's `held`.
    held: Vec<Lease>,
}

impl<B: Backend> Sut<B> {
    fn store(&self) -> &B::Store {
        self.store.as_ref().unwrap()
    }
}

impl<B: Backend> StateMachineTest for Sut<B> {
    type SystemUnderTest = Sut<B>;
    type Reference = QueueModel<B>;

    fn init_test(_: &Model) -> Sut<B> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let clock = Arc::new(ManualClock::new(START));
        let (place, store) = runtime.block_on(async {
            let place = B::place().await;
            let store = B::open(&place, &clock).await;
            (place, store)
        });
        Sut {
            runtime,
            place,
            clock,
            store: Some(store),
            ids: Vec::new(),
            held: Vec::new(),
        }
    }

    fn apply(mut sut: Sut<B>, model: &Model, op: Op) -> Sut<B> {
        match op {
            Op::Enqueue(key) => {
                let id = sut.runtime.block_on(async {
                    let store = sut.store();
                    let id = store
                        .journal(b"MSH|^~\\&|model", JournalMeta::default())
                        .await
                        .unwrap();
                    let deliveries = vec![Enqueue {
                        destination: DEST.into(),
                        ordering_key: KEYS[key].into(),
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
                    id
                });
                sut.ids.push(id);
            }
            Op::Lease(max) => {
                let leases = sut.runtime.block_on(sut.store().lease(DEST, max)).unwrap();
                let got: Vec<MessageId> = leases.iter().map(|l| l.message_id).collect();
                let want: Vec<MessageId> = model.last_leased.iter().map(|&i| sut.ids[i]).collect();
                assert_eq!(got, want, "leases at t={}", model.now);
                for (lease, &i) in leases.iter().zip(&model.last_leased) {
                    assert_eq!(lease.attempt, model.items[i].attempts + 1, "attempt number");
                    assert_eq!(lease.ordering_key, KEYS[model.items[i].key]);
                    assert_eq!(
                        lease.lease_until_ms, model.items[i].lease_until,
                        "lease expiry"
                    );
                }
                sut.held.extend(leases);
            }
            Op::Complete(slot, report) => {
                let lease = sut.held.remove(slot % sut.held.len());
                let report = match report {
                    Report::Delivered => AttemptReport::delivered(),
                    Report::Transient => AttemptReport::transient("http_503"),
                    Report::Permanent => AttemptReport::permanent("http_400"),
                };
                let result =
                    sut.runtime
                        .block_on(sut.store().complete(&lease, report, &policy(B::HOLD)));
                match (result, model.last_complete) {
                    (Ok(state), Some(Ok(want))) => assert_eq!(state, want),
                    (Err(StoreError::LeaseLost { .. }), Some(Err(()))) => {}
                    (got, want) => panic!("complete: store said {got:?}, model {want:?}"),
                }
            }
            Op::Advance(ms) => sut.clock.advance(ms),
            Op::Replay(_) | Op::Purge(_) => {
                let id = sut.ids[model.last_chosen.expect("the model's choice")];
                let store = sut.store();
                if matches!(op, Op::Replay(_)) {
                    let dead = ReplaySelection {
                        destination: None,
                        state: Some(DeliveryState::Dead),
                    };
                    let n = sut.runtime.block_on(store.replay(id, None, &dead)).unwrap();
                    assert_eq!(n, 1, "replayed");
                } else {
                    assert!(sut.runtime.block_on(store.purge(id)).unwrap(), "purged");
                }
            }
            Op::Reap => {
                sut.runtime.block_on(sut.store().requeue_expired()).unwrap();
            }
            Op::Restart => {
                let store = sut.store.take().unwrap();
                let store = sut
                    .runtime
                    .block_on(B::restart(&sut.place, store, &sut.clock));
                sut.store = Some(store);
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut<B>, model: &Model) {
        let counts = sut.runtime.block_on(sut.store().counts()).unwrap();
        for state in DeliveryState::ALL {
            let got = counts
                .deliveries
                .get(&(DEST.to_owned(), state.name().to_owned()))
                .copied()
                .unwrap_or(0);
            let want = model.counts().get(state.name()).copied().unwrap_or(0);
            assert_eq!(got, want, "count of {} deliveries", state.name());
        }
        let due = sut.runtime.block_on(sut.store().next_due_ms(DEST)).unwrap();
        let model_due = (0..model.items.len())
            .filter(|&i| {
                matches!(
                    model.items[i].state,
                    DeliveryState::Pending | DeliveryState::RetryWait
                ) && model.is_head(i)
            })
            .map(|i| model.items[i].due)
            .min();
        assert_eq!(due, model_due, "next due time");
    }

    fn teardown(mut sut: Sut<B>, _: Model) {
        let store = sut.store.take().unwrap();
        sut.runtime.block_on(B::teardown(sut.place, store));
    }
}

/// The macro takes a plain type name.
type SledReleasing = Sled<false>;
type SledHolding = Sled<true>;

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn queue_matches_its_model(sequential 1..40 => Sut<SledReleasing>);
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn queue_holding_dead_keys_matches_its_model(sequential 1..40 => Sut<SledHolding>);
}

fn run_on_postgres<B: Backend>(config: &ProptestConfig)
where
    Sut<B>: StateMachineTest<Reference = QueueModel<B>, SystemUnderTest = Sut<B>>,
{
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(
        &QueueModel::<B>::sequential_strategy(1..40),
        |(initial, transitions, seen)| {
            Sut::<B>::test_sequential(config.clone(), initial, transitions, seen);
            Ok(())
        },
    );
    if let Err(failure) = result {
        panic!("hold = {}: {failure}\n{runner}", B::HOLD);
    }
}

/// The same model on PostgreSQL. The server is started here, not lazily in a static: a
/// static is never dropped, which would leave the server running and its folder behind
/// when the test binary exits; owned here, it is stopped when the test ends, passed or
/// failed. The cases find it through `PG_ADMIN_URL`. Fewer cases than on sled: every step
/// is a few round trips and commits to a real server.
#[test]
fn queue_on_postgres_matches_its_model() {
    let server = PgServer::start();
    PG_ADMIN_URL.set(server.url()).unwrap();
    let config = ProptestConfig {
        cases: 32,
        // Failing cases are recorded next to this file, as the macro does for sled.
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    run_on_postgres::<Postgres<false>>(&config);
    run_on_postgres::<Postgres<true>>(&config);
    drop(server);
}

//! An in-process engine for tests: one route file, a sled store and the repository's
//! v2-to-fhir pack in a temporary folder; the pipeline behind an MLLP listener.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of it

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_engine::pipeline::{Limits, Pipeline, PipelineConfig, Recheck, UnroutedAnswer};
use passerelle_engine::routes::RouteTable;
use passerelle_mapping::{MapOptions, Pack};
use passerelle_mllp::{Listener, ListenerConfig, RunningListener};
use passerelle_store::{DeliveryState, MessageId, SledStore, Store, StoreConfig};
use passerelle_testkit::workspace_root;

pub(crate) struct Harness {
    pub(crate) work: tempfile::TempDir,
    pub(crate) store: Arc<SledStore>,
    pub(crate) routes: RouteTable,
    pub(crate) packs: HashMap<String, Pack>,
    /// How the pipeline rechecks messages left received (the engine's default unless a
    /// test sets it).
    pub(crate) recheck: Recheck,
}

impl Harness {
    /// Writes `route` as the only route file, opens the store and loads the pack.
    pub(crate) fn new(route: &str) -> Harness {
        let work = tempfile::tempdir().unwrap();
        let routes_dir = work.path().join("routes.d");
        std::fs::create_dir_all(&routes_dir).unwrap();
        std::fs::write(routes_dir.join("10-route.toml"), route).unwrap();
        let routes = RouteTable::load(
            &routes_dir,
            &["v2-to-fhir".to_owned()],
            &["mllp".to_owned()],
        )
        .unwrap();
        let store = Arc::new(SledStore::open(StoreConfig::new(work.path().join("store"))).unwrap());
        let pack = Pack::load(workspace_root().join("mappings/v2-to-fhir")).unwrap();
        Harness {
            work,
            store,
            routes,
            packs: HashMap::from([("v2-to-fhir".to_owned(), pack)]),
            recheck: Recheck::default(),
        }
    }

    /// Starts the pipeline (recovery included) and an MLLP listener on a free port.
    pub(crate) async fn start(&self, unrouted: UnroutedAnswer) -> RunningListener {
        self.start_with(unrouted, Limits::default()).await.0
    }

    /// Same, with limits; also returns the pipeline, to observe it.
    pub(crate) async fn start_with(
        &self,
        unrouted: UnroutedAnswer,
        limits: Limits,
    ) -> (RunningListener, Pipeline<SledStore>) {
        let config = PipelineConfig {
            routes: self.routes.clone(),
            packs: self.packs.clone(),
            map_options: MapOptions::default(),
            unrouted,
            base_dir: self.work.path().to_path_buf(),
            metrics: Default::default(),
            limits,
            recheck: self.recheck.clone(),
            duplicates: Default::default(),
        };
        let pipeline = Pipeline::start(Arc::clone(&self.store), config)
            .await
            .unwrap();
        let listener = Listener::bind(ListenerConfig::new("127.0.0.1:0".parse().unwrap()), None)
            .await
            .unwrap()
            .spawn(pipeline.clone());
        (listener, pipeline)
    }
}

/// A fixture message's bytes.
pub(crate) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("fixtures/hl7").join(name)).unwrap()
}

/// Polls an observable effect until it holds; panics after 30 s.
pub(crate) async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polls an observable effect
    }
}

/// Waits until the store counts `n` deliveries of `queue` (`route.destination`) delivered.
pub(crate) async fn wait_queue_delivered<S: Store>(
    what: &str,
    store: &Arc<S>,
    queue: &str,
    n: usize,
) {
    wait_until(what, || {
        let store = Arc::clone(store);
        let key = (queue.to_owned(), "delivered".to_owned());
        async move { store.counts().await.unwrap().deliveries.get(&key).copied() == Some(n as u64) }
    })
    .await;
}

/// Waits until the first delivery of message `id` is delivered.
pub(crate) async fn wait_delivered<S: Store>(store: &Arc<S>, id: MessageId) {
    wait_until(&format!("message {id} to be delivered"), || {
        let store = Arc::clone(store);
        async move {
            store
                .deliveries(id)
                .await
                .unwrap()
                .first()
                .is_some_and(|d| d.state == DeliveryState::Delivered)
        }
    })
    .await;
}

/// The admin API of `pipeline` on a free loopback port, wanting `token`; its base URL.
pub(crate) async fn serve_admin(pipeline: Pipeline<SledStore>, token: &str) -> String {
    let admin = passerelle_engine::admin::Admin {
        pipeline,
        listeners: Arc::new(Vec::new),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        token: Some(token.to_owned()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = passerelle_engine::admin::router(admin);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

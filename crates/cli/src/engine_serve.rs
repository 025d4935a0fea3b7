//! `passerelle serve --config passerelle.toml`: the engine. Listeners from the file, every
//! frame journaled in the store (`[store] backend`: sled, or PostgreSQL shared by several
//! nodes) before it is acknowledged, routed by `routes.d/`,
//! mapped with the routes' packs, and delivered by the pipeline's workers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use passerelle_engine::config::ListenerSection;
use passerelle_engine::duplicates::Duplicates;
use passerelle_engine::metrics::Metrics;
use passerelle_engine::pipeline::{
    Backpressure, Limits, Pipeline, PipelineConfig, Recheck, UnroutedAnswer,
};
use passerelle_engine::{Loaded, StoreBackend};
use passerelle_mapping::MapOptions;
use passerelle_mllp::{Cidr, Listener, ListenerConfig, ServerTls, ServerTlsConfig};
use passerelle_store::{Store, StoreError, SystemClock, spawn_retention};
use tracing::{error, info};

use crate::output::{Output, errln, outln};

/// How long delivery attempts under way at shutdown may take to finish (within the 45 s
/// stop timeout of deploy/: 30 s listener drain, this, the final flush).
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

fn fail(code: u8, lines: impl IntoIterator<Item = String>) -> ExitCode {
    for line in lines {
        errln!("passerelle serve: {line}");
    }
    ExitCode::from(code)
}

fn listener_config(l: &ListenerSection) -> Result<ListenerConfig, String> {
    let bind: SocketAddr = l
        .bind
        .parse()
        .map_err(|_| format!("listener {}: bad bind {:?}", l.name, l.bind))?;
    let mut config = ListenerConfig::new(bind);
    config.name = l.name.clone();
    config.allow = l
        .allow
        .iter()
        .map(|c| {
            c.parse::<Cidr>()
                .map_err(|e| format!("listener {}: allow {c:?}: {e}", l.name))
        })
        .collect::<Result<_, _>>()?;
    config.max_connections = l.max_connections;
    config.max_connections_per_ip = l.max_connections_per_ip;
    config.idle_timeout = Duration::from_secs(l.idle_timeout_s);
    config.codec.max_frame_size = l.max_frame_bytes;
    Ok(config)
}

/// On SIGHUP, reads the configuration again and puts its routes and mapping packs in
/// force ([`Pipeline::reload`]): a new route match, an edited mapping or a new mapping
/// file, without dropping a connection. A configuration with errors, or one that changes
/// the destinations, is refused with the reason in the log, and the running routes stay.
/// Listeners, the store and the admin API are read at start only.
#[cfg(unix)]
async fn reload_on_hangup<S: Store>(
    path: std::path::PathBuf,
    pipeline: Pipeline<S>,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        info!("SIGHUP received; reloading routes and mappings");
        match Loaded::load(&path) {
            Err(lines) => {
                for line in lines {
                    error!(problem = %line, "reload refused; the running routes stay");
                }
            }
            Ok(loaded) => {
                let routes = loaded.routes.routes.len();
                match pipeline.reload(loaded.routes, loaded.packs) {
                    Ok(()) => info!(routes, "routes and mappings reloaded"),
                    Err(reason) => {
                        error!(%reason, "reload refused; the running routes stay");
                    }
                }
            }
        }
    }
}

pub(crate) async fn run(path: &Path, shutdown: impl std::future::Future<Output = ()>) -> ExitCode {
    let loaded = match Loaded::load(path) {
        Ok(l) => l,
        Err(lines) => return fail(2, lines),
    };
    let cannot_open = |loaded: &Loaded, e: StoreError| {
        let where_ = loaded.config.store_location();
        fail(1, [format!("cannot open the store at {where_}: {e}")])
    };
    match loaded.config.store_backend() {
        StoreBackend::Sled => match loaded.config.open_store() {
            Ok(store) => serve(path, loaded, Arc::new(store), shutdown).await,
            Err(e) => cannot_open(&loaded, e),
        },
        StoreBackend::Postgres => match loaded.config.open_pg_store().await {
            Ok(store) => serve(path, loaded, Arc::new(store), shutdown).await,
            Err(e) => cannot_open(&loaded, e),
        },
    }
}

/// The engine on an open store, whichever backend.
async fn serve<S: Store>(
    path: &Path,
    loaded: Loaded,
    store: Arc<S>,
    shutdown: impl std::future::Future<Output = ()>,
) -> ExitCode {
    let location = loaded.config.store_location();
    let Loaded {
        config,
        routes,
        packs,
    } = loaded;
    let unrouted =
        UnroutedAnswer::parse(&config.defaults.unrouted).unwrap_or(UnroutedAnswer::Accept);
    let metrics = Arc::new(Metrics::default());
    metrics.register(config.listeners.iter().map(|l| l.name.as_str()), []);
    let pipeline_config = PipelineConfig {
        routes,
        packs,
        map_options: MapOptions {
            site_offset: Some(config.defaults.site_utc_offset_minutes),
        },
        unrouted,
        base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        metrics,
        limits: Limits {
            max_queue_depth: Some(config.store.max_queue_depth).filter(|&n| n > 0),
            max_disk_bytes: Some(config.store.max_disk_mb.saturating_mul(1 << 20))
                .filter(|&n| n > 0),
            backpressure: Backpressure::parse(&config.defaults.backpressure).unwrap_or_default(),
            check_every: None,
        },
        recheck: Recheck::default(),
        duplicates: Duplicates::of(&config),
    };
    let pipeline = match Pipeline::start(Arc::clone(&store), pipeline_config).await {
        Ok(p) => p,
        Err(e) => return fail(1, [e.to_string()]),
    };
    let retention = spawn_retention(
        Arc::clone(&store),
        Arc::new(SystemClock),
        Duration::from_secs(config.store.retention_days * 86_400),
        Duration::from_secs(3_600),
    );
    let mut out = Output::stdout();
    let mut running = Vec::new();
    for l in &config.listeners {
        let listener_config = match listener_config(l) {
            Ok(c) => c,
            Err(e) => return fail(2, [e]),
        };
        let tls = match &l.tls {
            None => None,
            Some(t) => match ServerTls::load(ServerTlsConfig {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: t.client_ca.clone(),
                allowed_peers: t.allowed_subjects.clone(),
            }) {
                Ok(tls) => Some(tls),
                Err(e) => return fail(2, [format!("listener {}: {e}", l.name)]),
            },
        };
        let scheme = if tls.is_some() { "mllp+tls" } else { "mllp" };
        let listener = match Listener::bind(listener_config, tls).await {
            Ok(listener) => listener,
            Err(e) => {
                return fail(
                    1,
                    [format!(
                        "listener {}: cannot listen on {}: {e}",
                        l.name, l.bind
                    )],
                );
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| l.bind.clone());
        running.push(listener.spawn(pipeline.clone()));
        // Announced for whoever reads it; a reader that has gone must not stop the engine.
        outln!(out, "listening on {addr} ({scheme}, listener {})", l.name);
    }
    // The admin API: probes, metrics and the message list. It reads the listeners'
    // counters through the mutex; shutdown takes the listeners out of it, so that an
    // admin connection still open then (a scrape on a kept-alive connection) cannot keep
    // them from draining.
    let running = Arc::new(std::sync::Mutex::new(running));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats_of = {
        let running = Arc::clone(&running);
        let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        Arc::new(move || {
            let running = running.lock().unwrap_or_else(|p| p.into_inner());
            names
                .iter()
                .cloned()
                .zip(running.iter().map(|r| r.stats()))
                .collect::<Vec<_>>()
        })
    };
    let admin = passerelle_engine::admin::Admin {
        pipeline: pipeline.clone(),
        listeners: stats_of,
        ready: Arc::clone(&ready),
        token: std::env::var(&config.admin.token_env)
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let admin_listener = match tokio::net::TcpListener::bind(&config.admin.bind).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                1,
                [format!(
                    "admin API: cannot listen on {}: {e}",
                    config.admin.bind
                )],
            );
        }
    };
    let admin_addr = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.admin.bind.clone());
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin_listener, passerelle_engine::admin::router(admin)).await;
    });
    // SIGHUP handled before the engine says it is up: until then, its default action
    // would end the process.
    #[cfg(unix)]
    let reloader = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => Some(tokio::spawn(reload_on_hangup(
            path.to_path_buf(),
            pipeline.clone(),
            hangups,
        ))),
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP: reloading routes needs a restart");
            None
        }
    };
    // Ready before it is announced: whoever reads the line may probe /ready at once.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    outln!(out, "admin API on http://{admin_addr}");
    out.flush();
    info!(store = %location, "engine started");
    shutdown.await;
    #[cfg(unix)]
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    ready.store(false, std::sync::atomic::Ordering::SeqCst);
    admin_task.abort();
    let _ = admin_task.await;
    let running = std::mem::take(&mut *running.lock().unwrap_or_else(|p| p.into_inner()));
    // All listeners drain at once, so the stop takes one drain timeout, not one each;
    // meanwhile the delivery workers finish and record the attempts they have under way.
    let drains: Vec<_> = running
        .into_iter()
        .map(|listener| tokio::spawn(listener.shutdown()))
        .collect();
    let workers = pipeline.shutdown(DELIVERY_GRACE);
    let listeners = async {
        for drain in drains {
            if let Ok(stats) = drain.await {
                info!(frames = stats.frames, acks = stats.acks, "listener stopped");
            }
        }
    };
    tokio::join!(workers, listeners);
    retention.abort();
    if let Err(e) = store.flush().await {
        error!(error = %e, "final flush failed");
        return ExitCode::FAILURE;
    }
    info!("stopped");
    ExitCode::SUCCESS
}

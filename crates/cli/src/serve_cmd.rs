//! `passerelle serve [--listen ADDR] [--tls-cert F --tls-key F [--client-ca F]
//! [--allow-client ID]...] [--allow-ip CIDR]...`: the MLLP listener.
//!
//! With `--config passerelle.toml`, it runs the engine (see `engine_serve`). Without,
//! every frame is answered from the parser alone, and nothing is stored: AA
//! for a well-formed message, AE/AR with ERR for a malformed one, AR with an empty MSA-2
//! for a frame that is not HL7. Prints `listening on ADDR` on stdout once bound; logs go
//! to stderr (`RUST_LOG` filters them, default `info`). SIGINT/SIGTERM shut down
//! gracefully; SIGHUP reloads the TLS certificates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use passerelle_mllp::{
    Cidr, Listener, ListenerConfig, ParseAckHandler, ServerTls, ServerTlsConfig,
};
use tracing::{info, warn};

use crate::output::{Output, errln, outln};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Run the engine as `passerelle.toml` describes it: listeners, the durable store,
    /// routes and delivery. Without it, serve answers from the parser alone and stores
    /// nothing (the listener options below apply only then).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:2575")]
    listen: SocketAddr,
    /// PEM certificate chain: serve TLS (1.2 and 1.3) instead of plain TCP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates issued by them (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Only let in client certificates with this identity: `CN=name`, the full subject,
    /// or a SAN as `DNS:host`, `IP:addr`, `URI:…`, `email:…`. Repeatable.
    #[arg(long = "allow-client", requires = "client_ca")]
    allow_client: Vec<String>,
    /// Only accept connections from these networks (`10.1.0.0/16`, `192.0.2.7`).
    /// Repeatable; default: any.
    #[arg(long = "allow-ip")]
    allow_ip: Vec<Cidr>,
    /// Most connections open at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most connections open at once from one address.
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Largest message accepted, in bytes; a larger one gets AR and its connection closes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_frame_size: usize,
    /// Seconds a connection may stay silent between messages.
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Seconds a message may take to arrive once its start block is received.
    #[arg(long, default_value_t = 60)]
    frame_timeout: u64,
    /// Refuse an end block (0x1C) without its CR instead of tolerating it.
    #[arg(long)]
    strict_framing: bool,
    /// MLLP release 2: send a commit acknowledgement block before each ACK.
    #[arg(long)]
    commit_acks: bool,
    /// Follow MSH-15 in enhanced mode (no ACK for NE…). Default: answer every message,
    /// since MLLP senders wait for an answer whatever MSH-15 says.
    #[arg(long)]
    honor_accept_ack_type: bool,
}

pub(crate) fn run(args: &ServeArgs) -> ExitCode {
    init_logging(args.config.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("passerelle serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args))
}

/// Logs to stderr. `RUST_LOG` wins; otherwise the engine's `[logging]` (level, `text` or
/// `json`) when `--config` is given, else `info` as text.
fn init_logging(config: Option<&std::path::Path>) {
    let logging = config
        .and_then(|p| passerelle_engine::config::EngineConfig::load(Some(p)).ok())
        .map(|c| c.logging)
        .unwrap_or_default();
    // The loaded configuration's level was checked; `info` stands in for one that is not.
    let directives = logging
        .filter()
        .unwrap_or_else(|| "warn,passerelle=info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if logging.format == "json" {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

async fn serve(args: &ServeArgs) -> ExitCode {
    if let Some(path) = &args.config {
        return crate::engine_serve::run(path, shutdown_signal()).await;
    }
    let mut config = ListenerConfig::new(args.listen);
    config.allow = args.allow_ip.clone();
    config.max_connections = args.max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.codec.max_frame_size = args.max_frame_size;
    config.codec.allow_missing_cr = !args.strict_framing;
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.frame_timeout = Duration::from_secs(args.frame_timeout);
    config.commit_acks = args.commit_acks;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let settings = ServerTlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.client_ca.clone(),
                allowed_peers: args.allow_client.clone(),
            };
            match ServerTls::load(settings) {
                Ok(t) => Some(t),
                Err(e) => {
                    errln!("passerelle serve: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    let listener = match Listener::bind(config, tls).await {
        Ok(l) => l,
        Err(e) => {
            errln!("passerelle serve: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    let scheme = if listener.tls().is_some() {
        "mllp+tls"
    } else {
        "mllp"
    };
    // Signal handlers go in before the address is announced: whoever reads that line may
    // signal at once.
    let shutdown = shutdown_signal();
    if let Some(tls) = listener.tls() {
        spawn_reload_on_hangup(tls);
    }
    // Announced for whoever reads it; a reader that has gone must not stop the server.
    let mut out = Output::stdout();
    outln!(out, "listening on {addr} ({scheme})");
    out.flush();

    let stats = listener
        .serve(
            ParseAckHandler {
                honor_accept_ack_type: args.honor_accept_ack_type,
                ..ParseAckHandler::default()
            },
            shutdown,
        )
        .await;
    info!(
        frames = stats.frames,
        acks = stats.acks,
        refused = stats.refused_address + stats.refused_limit + stats.refused_identity,
        "shut down"
    );
    ExitCode::SUCCESS
}

/// Completes on SIGINT or SIGTERM. The handlers are registered when this is called, not
/// when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let (Some(mut term), Some(mut int)) = (term, int) else {
                let _ = tokio::signal::ctrl_c().await;
                return;
            };
            tokio::select! {
                _ = int.recv() => info!("SIGINT received; shutting down"),
                _ = term.recv() => info!("SIGTERM received; shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(unix)]
fn spawn_reload_on_hangup(tls: std::sync::Arc<ServerTls>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificates reloaded"),
                Err(e) => {
                    warn!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates")
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_hangup(_tls: std::sync::Arc<ServerTls>) {}

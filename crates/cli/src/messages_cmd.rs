//! `passerelle messages list|show|replay|purge`: operations on stored messages.
//!
//! The same operations ([`passerelle_engine::ops`]) run in one of two places:
//! - **through a running engine**: its admin API (the address in `[admin] bind`, or
//!   `--admin URL`; the token from the variable named in `[admin] token_env`). A replay
//!   then wakes the engine's delivery workers at once;
//! - **on the store itself** when no engine answers there: sled allows one process at a
//!   time, so this needs the engine stopped (the engine delivers what was queued when it
//!   starts); a PostgreSQL store is shared, so this works beside running nodes (which
//!   see a replay at their workers' next poll).
//!
//! Output is a text table or, with `--json`, the API's JSON documents, whichever the
//! place. Replays and purges print one line per message and exit non-zero if any failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use passerelle_engine::ops::{self, ListFilter, ReplayOptions, ReplayResult};
use passerelle_engine::{Loaded, StoreBackend, pipeline};
use passerelle_hl7::Message;
use passerelle_hl7::types::DateTime;
use passerelle_mapping::MapOptions;
use passerelle_store::{MessageId, Outcome, SledStore, Store, StoreError};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub(crate) struct MessagesArgs {
    /// The engine's configuration (store path, admin address, routes, mapping packs).
    #[arg(long, default_value = "passerelle.toml", global = true)]
    config: PathBuf,
    /// The running engine's admin API (default: from `[admin] bind`; when nothing
    /// answers there, the store is opened directly).
    #[arg(long, global = true, conflicts_with = "local")]
    admin: Option<String>,
    /// Open the store itself, never a running engine's API (for a stopped engine's or a
    /// backup's store).
    #[arg(long, global = true)]
    local: bool,
    #[command(subcommand)]
    command: MessagesCommand,
}

#[derive(Debug, Subcommand)]
enum MessagesCommand {
    /// List messages, oldest first, filtered.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Page after this id.
        #[arg(long)]
        after: Option<MessageId>,
        #[arg(long)]
        json: bool,
    },
    /// Show one message: its record, the raw HL7 (one segment per line), the bundle and
    /// each delivery's attempt history.
    Show {
        id: MessageId,
        #[arg(long)]
        json: bool,
    },
    /// Queue messages again: dead or delivered deliveries of mapped messages go back to
    /// their place in their key's order; unrouted, mapping-failed and duplicate messages
    /// are routed and mapped again. Give ids, or filters (`--state dead --dest adt.fhir`…);
    /// `--dest` and a delivery `--state` also limit which deliveries are sent again.
    Replay {
        ids: Vec<MessageId>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Map again with the current mapping packs before queueing (after a fix).
        #[arg(long)]
        remap: bool,
        /// Say what would happen, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete messages whose deliveries are all finished (delivered or dead).
    Purge { ids: Vec<MessageId> },
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// A message state (received, rejected, unrouted, mapped, mapping_failed, duplicate) or a
    /// delivery state (pending, in_flight, retry_wait, delivered, dead).
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    route: Option<String>,
    /// A destination queue (`route.destination`).
    #[arg(long)]
    dest: Option<String>,
    /// Received at or after this HL7 date/time (`20241122`, `202411221530+0100`).
    #[arg(long)]
    since: Option<String>,
    /// Received before this HL7 date/time.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    control_id: Option<String>,
    /// An ordering key (as shown by `show`).
    #[arg(long)]
    key: Option<String>,
}

impl FilterArgs {
    fn to_filter(&self) -> ListFilter {
        ListFilter {
            state: self.state.clone(),
            route: self.route.clone(),
            dest: self.dest.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            control_id: self.control_id.clone(),
            key: self.key.clone(),
            after: None,
            limit: None,
        }
    }
}

/// Ids per replay request to a running engine: small enough to show progress.
const REPLAY_BATCH: usize = 100;

/// Where the operations run: a running engine's API, or a store opened here (either
/// backend, hence the type parameter; unused for `Remote`).
enum Backend<S> {
    Local { store: Box<S>, loaded: Box<Loaded> },
    Remote(Remote),
}

struct Remote {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

pub(crate) fn run(args: &MessagesArgs) -> ExitCode {
    let loaded = match Loaded::load(&args.config) {
        Ok(l) => l,
        Err(lines) => return fail(2, &lines.join("\n")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let remote = match remote_if_running(args, &loaded).await {
            Ok(r) => r,
            Err(e) => return fail(1, &e),
        };
        let remote = match remote {
            Ok(remote) => return finish(Backend::<SledStore>::Remote(remote), args).await,
            Err(remote) => remote,
        };
        let cannot_open = |loaded: &Loaded, e: StoreError| {
            fail(
                1,
                &format!(
                    "no engine answers at {} and the store at {} cannot be opened ({e})",
                    remote.base,
                    loaded.store_location()
                ),
            )
        };
        match loaded.store_backend() {
            StoreBackend::Sled => match loaded.open_store() {
                Ok(store) => local(store, loaded, args).await,
                Err(e) => cannot_open(&loaded, e),
            },
            StoreBackend::Postgres => match loaded.open_pg_store().await {
                Ok(store) => local(store, loaded, args).await,
                Err(e) => cannot_open(&loaded, e),
            },
        }
    })
}

async fn local<S: Store>(store: S, loaded: Loaded, args: &MessagesArgs) -> ExitCode {
    let backend = Backend::Local {
        store: Box::new(store),
        loaded: Box::new(loaded),
    };
    finish(backend, args).await
}

/// Runs the command, then makes the store's writes durable.
async fn finish<S: Store>(backend: Backend<S>, args: &MessagesArgs) -> ExitCode {
    let result = execute(&backend, &args.command).await;
    let flushed = match &backend {
        Backend::Local { store, .. } => store.flush().await.map_err(|e| e.to_string()),
        Backend::Remote(_) => Ok(()),
    };
    match (result, flushed) {
        (Ok(code), Ok(())) => code,
        (Err(e), _) => fail(1, &e),
        (Ok(_), Err(e)) => fail(1, &format!("cannot flush the store: {e}")),
    }
}

/// The running engine's API if it answers (`Ok(Ok(remote))`); otherwise the client that
/// did not get an answer (`Ok(Err(remote))`), and the store is to be opened here. An error
/// when `--admin` named an API that does not answer.
async fn remote_if_running(
    args: &MessagesArgs,
    loaded: &Loaded,
) -> Result<Result<Remote, Remote>, String> {
    let token = std::env::var(&loaded.config.admin.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let base = match &args.admin {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", loopback_for(&loaded.config.admin.bind)),
    };
    let remote = Remote {
        client,
        base,
        token,
    };
    if !args.local {
        match remote.health().await {
            Ok(()) => return Ok(Ok(remote)),
            Err(e) if args.admin.is_some() => {
                return Err(format!(
                    "the admin API at {} does not answer: {e}",
                    remote.base
                ));
            }
            Err(_) => {}
        }
    }
    Ok(Err(remote))
}

/// Where to reach a server bound to `bind`: a wildcard address means this host.
fn loopback_for(bind: &str) -> String {
    if let Some(port) = bind.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = bind.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        bind.to_owned()
    }
}

impl Remote {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn health(&self) -> Result<(), String> {
        let response = self
            .client
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("/health answered {}", response.status()))
        }
    }

    /// Sends a request and reads a JSON answer; `Ok(None)` for a 404.
    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Option<Value>, String> {
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(
                "the admin API wants a token: set the variable named in [admin] token_env".into(),
            );
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("the admin API answered {status}: {}", body.trim()));
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| format!("the admin API's answer is not JSON: {e}"))
    }
}

impl<S: Store> Backend<S> {
    async fn list(&self, filter: &ListFilter) -> Result<Value, String> {
        match self {
            Backend::Local { store, .. } => ops::list(store.as_ref(), filter).await,
            Backend::Remote(r) => r
                .json(
                    r.request(reqwest::Method::GET, "/api/messages")
                        .query(filter),
                )
                .await?
                .ok_or_else(|| "the admin API has no /api/messages".to_owned()),
        }
    }

    async fn show(&self, id: MessageId) -> Result<Option<Value>, String> {
        match self {
            Backend::Local { store, .. } => ops::show(store.as_ref(), id).await,
            Backend::Remote(r) => {
                r.json(r.request(reqwest::Method::GET, &format!("/api/messages/{id}")))
                    .await
            }
        }
    }

    /// Every id the filter selects, page by page.
    async fn select_ids(&self, filter: &ListFilter) -> Result<Vec<MessageId>, String> {
        match self {
            Backend::Local { store, .. } => ops::select_ids(store.as_ref(), filter).await,
            Backend::Remote(_) => {
                let mut filter = filter.clone();
                filter.limit = Some(ops::MAX_PAGE);
                let mut ids = Vec::new();
                loop {
                    let page = self.list(&filter).await?;
                    ids.extend(
                        page["items"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| r["id"].as_u64()),
                    );
                    match page["next"].as_u64() {
                        Some(next) => filter.after = Some(next),
                        None => return Ok(ids),
                    }
                }
            }
        }
    }

    async fn replay(
        &self,
        ids: &[MessageId],
        options: &ReplayOptions,
    ) -> Result<Vec<ReplayResult>, String> {
        match self {
            Backend::Local { store, loaded } => {
                let remap_with = |raw: &[u8], listener: &str| route_and_map(loaded, raw, listener);
                let mut results = Vec::with_capacity(ids.len());
                for &id in ids {
                    results.push(ops::replay(store.as_ref(), &remap_with, id, options).await);
                }
                Ok(results)
            }
            Backend::Remote(r) => {
                let body = json!({
                    "ids": ids,
                    "remap": options.remap,
                    "dry_run": options.dry_run,
                    "destination": options.only.destination,
                    "delivery_state": options.only.state.map(|s| s.name()),
                });
                let doc = r
                    .json(
                        r.request(reqwest::Method::POST, "/api/messages/replay")
                            .json(&body),
                    )
                    .await?
                    .ok_or_else(|| "the admin API has no replay endpoint".to_owned())?;
                serde_json::from_value(doc["results"].clone())
                    .map_err(|e| format!("unexpected replay answer: {e}"))
            }
        }
    }

    async fn purge(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<(MessageId, Result<String, String>)>, String> {
        match self {
            Backend::Local { store, .. } => {
                let mut results = Vec::with_capacity(ids.len());
                for &id in ids {
                    results.push((id, ops::purge(store.as_ref(), id).await));
                }
                Ok(results)
            }
            Backend::Remote(r) => {
                let doc = r
                    .json(
                        r.request(reqwest::Method::POST, "/api/messages/purge")
                            .json(&json!({ "ids": ids })),
                    )
                    .await?
                    .ok_or_else(|| "the admin API has no purge endpoint".to_owned())?;
                Ok(doc["results"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        let id = r["id"].as_u64().unwrap_or_default();
                        let message = r["message"].as_str().unwrap_or_default().to_owned();
                        if r["ok"].as_bool() == Some(true) {
                            (id, Ok(message))
                        } else {
                            (id, Err(message))
                        }
                    })
                    .collect())
            }
        }
    }
}

async fn execute<S: Store>(
    backend: &Backend<S>,
    command: &MessagesCommand,
) -> Result<ExitCode, String> {
    match command {
        MessagesCommand::List {
            filter,
            limit,
            after,
            json,
        } => {
            let mut filter = filter.to_filter();
            filter.limit = Some(*limit);
            filter.after = *after;
            filter.query()?;
            let page = backend.list(&filter).await?;
            if *json {
                println!("{page}");
            } else {
                for r in page["items"].as_array().into_iter().flatten() {
                    println!("{}", summary_line(r));
                }
                if let Some(next) = page["next"].as_u64() {
                    println!("… more: --after {next}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Show { id, json } => {
            let doc = backend
                .show(*id)
                .await?
                .ok_or_else(|| format!("no message {id}"))?;
            if *json {
                println!("{doc}");
            } else {
                print_message(&doc);
            }
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Replay {
            ids,
            filter,
            remap,
            dry_run,
        } => {
            let filter = filter.to_filter();
            // Only the deliveries the filter names (its destination, its delivery state):
            // replaying one dead letter must not resend to the message's other destinations.
            let options = ReplayOptions {
                remap: *remap,
                dry_run: *dry_run,
                only: filter.replay_selection(),
            };
            let mut ids = ids.clone();
            if !filter.is_empty() {
                filter.query()?;
                ids.extend(backend.select_ids(&filter).await?);
            }
            if ids.is_empty() {
                return Err("nothing to replay: give ids or filters that select messages".into());
            }
            // An id given and also selected by the filters is replayed once.
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(*id));
            let progress = ProgressBar::new(ids.len() as u64);
            progress.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({eta} left)")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let mut results = Vec::with_capacity(ids.len());
            for batch in ids.chunks(REPLAY_BATCH) {
                let done = backend.replay(batch, &options).await?;
                progress.inc(done.len() as u64);
                results.extend(done);
            }
            progress.finish_and_clear();
            Ok(report(
                results
                    .into_iter()
                    .map(|r| (r.id, if r.ok { Ok(r.message) } else { Err(r.message) }))
                    .collect(),
            ))
        }
        MessagesCommand::Purge { ids } => Ok(report(backend.purge(ids).await?)),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("passerelle messages: {message}");
    ExitCode::from(code)
}

fn time_of(ms: &Value) -> String {
    DateTime::from_unix(ms.as_u64().unwrap_or_default() / 1_000).to_string()
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn summary_line(r: &Value) -> String {
    format!(
        "{:>20}  {}  {:<14} {:<8} {:<20} {:<12} {}",
        r["id"].as_u64().unwrap_or_default(),
        time_of(&r["received_at_ms"]),
        text(r, "state"),
        text(r, "message_type"),
        text(r, "control_id"),
        r["route"].as_str().unwrap_or("-"),
        text(r, "error"),
    )
}

fn print_message(doc: &Value) {
    println!("{}", summary_line(doc));
    println!("\n# history");
    for t in doc["history"].as_array().into_iter().flatten() {
        println!(
            "  {}  {:<16} {}",
            time_of(&t["at_ms"]),
            text(t, "state"),
            text(t, "detail")
        );
    }
    println!(
        "\n# message ({} bytes, from {} on {})",
        doc["size"].as_u64().unwrap_or_default(),
        text(doc, "peer"),
        text(doc, "listener")
    );
    for segment in text(doc, "raw")
        .split(['\r', '\n'])
        .filter(|s| !s.is_empty())
    {
        println!("  {segment}");
    }
    for d in doc["delivery_details"].as_array().into_iter().flatten() {
        println!(
            "\n# delivery to {} (key {}): {}, {} attempt(s)",
            text(d, "destination"),
            text(d, "ordering_key"),
            text(d, "state"),
            d["attempts"].as_u64().unwrap_or_default()
        );
        if let Some(reason) = d["dead_reason"].as_str() {
            println!("  dead: {reason}");
        }
        for a in d["history"].as_array().into_iter().flatten() {
            let status = a["status"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_default();
            println!(
                "  {}  {} {} {} {}",
                time_of(&a["at_ms"]),
                text(a, "outcome"),
                status,
                text(a, "error_class"),
                text(a, "detail")
            );
        }
    }
    if !doc["bundle"].is_null() {
        println!("\n# bundle");
        println!(
            "{}",
            serde_json::to_string_pretty(&doc["bundle"]).unwrap_or_default()
        );
    }
}

/// Prints one line per message, successes on stdout and failures on stderr.
fn report(results: Vec<(MessageId, Result<String, String>)>) -> ExitCode {
    let mut failed = false;
    for (id, result) in results {
        match result {
            Ok(what) => println!("{id}: {what}"),
            Err(e) => {
                eprintln!("{id}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Routes and maps a stored message with the configuration on disk.
fn route_and_map(loaded: &Loaded, raw: &[u8], listener: &str) -> Result<Outcome, String> {
    let message = Message::parse(raw).map_err(|e| format!("does not parse: {e}"))?;
    let options = MapOptions {
        site_offset: Some(loaded.config.defaults.site_utc_offset_minutes),
    };
    Ok(pipeline::route_and_map(
        &loaded.routes,
        &loaded.packs,
        &options,
        &message,
        listener,
    ))
}

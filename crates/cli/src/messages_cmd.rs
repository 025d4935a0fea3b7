//! `passerelle messages list|show|replay|resubmit|purge`: operations on stored messages.
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
//! `resubmit` checks the corrected message here first (it must parse: the parser's located
//! error otherwise, and nothing is sent), then journals it where the operations run: a
//! running engine routes it at once and says where it stands; on the store, it waits as
//! `received` for the engine's start. `--edit` is in [`crate::resubmit_edit`].
//!
//! Output is a text table or, with `--json`, the API's JSON documents, whichever the
//! place. Replays and purges print one line per message, successes on stdout and the
//! rest on stderr, and exit non-zero if any failed (a replay that leaves a message
//! unrouted, or with a mapping that still fails, counts as failed). Filters go to the
//! engine in a request body, never in a URL (an ordering key holds a patient
//! identifier). Only passerelle.toml is needed: a route file with a mistake does not lock
//! the operator out; a replay on the store loads the routes, since it routes and maps.
//! Times without a UTC offset are read in the site's offset. Whatever
//! happens to stdout (`| head`), a store opened here is flushed before the command ends.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use passerelle_engine::config::EngineConfig;
use passerelle_engine::ops::{self, ListFilter, ReplayOptions, ReplayResult};
use passerelle_engine::{Loaded, StoreBackend, pipeline};
use passerelle_hl7::Message;
use passerelle_hl7::types::DateTime;
use passerelle_mapping::MapOptions;
use passerelle_store::{MessageId, Outcome, SledStore, Store, StoreError};
use serde_json::{Value, json};

use crate::output::{Output, outln};

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
    /// List messages, oldest first (or newest first), filtered.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Page after this id (oldest first).
        #[arg(long, conflicts_with = "newest_first")]
        after: Option<MessageId>,
        /// The last journaled first: what just failed, at the top.
        #[arg(long)]
        newest_first: bool,
        /// Page below this id (with --newest-first).
        #[arg(long, requires = "newest_first")]
        before: Option<MessageId>,
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
    /// Journal a corrected copy of a message that failed on its content (a date the
    /// mapping refuses, a frame that does not parse, a bundle a server refused) as a new
    /// message, linked to the original, and route it as the original's listener would.
    /// Give the corrected message with --file, or correct it in an editor with --edit.
    /// The original keeps its state, frame and deliveries (its dead deliveries are not
    /// replayed; purge it when done); `show` names its copy, and the copy its original.
    /// With a running engine the copy is routed and mapped at once and the answer says
    /// where it stands; on a stopped engine's store it is left received, and the engine
    /// routes it when it starts. Refused, with nothing stored: a message that is empty, does
    /// not parse (the parser's error says where), or is the original unchanged. Exits 1
    /// when the copy does not get on its way (its mapping fails, no route takes it).
    Resubmit {
        /// The message to correct (its id as `list` shows it).
        id: MessageId,
        /// The corrected message: an HL7 file, segments ending with CR, LF or CRLF, in the
        /// character set its MSH-18 names.
        #[arg(
            long,
            value_name = "FIXED.hl7",
            required_unless_present = "edit",
            conflicts_with = "edit"
        )]
        file: Option<PathBuf>,
        /// Correct the message in $VISUAL or $EDITOR (vi when neither is set): it opens one
        /// segment per line, as `show` prints it; saved unchanged or empty, nothing is
        /// resubmitted. An edit that does not parse is kept in its file, for --file.
        #[arg(long)]
        edit: bool,
        /// Check the corrected message and say what would happen (routed and mapped with
        /// the running engine's configuration, or the one on disk); store nothing.
        #[arg(long)]
        dry_run: bool,
        /// The answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete messages whose deliveries are all finished (delivered or dead).
    Purge {
        /// The messages to delete (ids as `list` shows them).
        #[arg(required = true)]
        ids: Vec<MessageId>,
    },
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
    /// Received at or after this time: a date (`2026-11-22`: the start of that day), a
    /// date and time (`2026-11-22T15:30`, `2026-11-22 15:30:45`), or HL7
    /// (`20261122`, `202611221530`); with a UTC offset (`Z`, `+01:00`, `+0100`) or
    /// without, then in the site's offset: `[defaults] site_utc_offset_minutes` of
    /// --config (60 when the file sets none).
    #[arg(long)]
    since: Option<String>,
    /// Received before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    control_id: Option<String>,
    /// An ordering key (as shown by `show`); sent to the engine in a request body, out of
    /// URLs and access logs.
    #[arg(long)]
    key: Option<String>,
}

impl FilterArgs {
    /// The filter, times in HL7 form with an explicit offset (`site_offset` minutes when
    /// the user gave none), so that the engine and the store read them alike.
    fn to_filter(&self, site_offset: i16) -> Result<ListFilter, String> {
        let when = |flag: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| explicit_time(t, site_offset).map_err(|e| format!("--{flag} {e}")))
                .transpose()
        };
        Ok(ListFilter {
            state: self.state.clone(),
            route: self.route.clone(),
            dest: self.dest.clone(),
            since: when("since", &self.since)?,
            until: when("until", &self.until)?,
            control_id: self.control_id.clone(),
            key: self.key.clone(),
            after: None,
            before: None,
            newest_first: false,
            limit: None,
        })
    }
}

/// A time as an operator types it (ISO 8601 with or without time and offset, or HL7
/// DTM), as an HL7 DTM with an explicit UTC offset: `site_offset` minutes when none was
/// given. A plain date is the start of that day.
fn explicit_time(text: &str, site_offset: i16) -> Result<String, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?}: not a date or time (2026-11-22, 2026-11-22T15:30, \
             2026-11-22T15:30+01:00, or HL7 202611221530)"
        )
    };
    let dtm = if text.as_bytes().get(4) == Some(&b'-') {
        iso_to_dtm(text).ok_or_else(bad)?
    } else {
        text.to_owned()
    };
    let mut time = DateTime::parse(&dtm).map_err(|e| format!("{text:?}: {e}"))?;
    time.offset_minutes.get_or_insert(site_offset);
    Ok(time.to_string())
}

/// `YYYY-MM-DD[(T| )HH:MM[:SS[.fff]]][Z|±HH:MM|±HHMM]` as the same HL7 DTM
/// (`YYYYMMDD[HHMM[SS[.fff]]][±HHMM]`), or `None` when it has another shape. The parts'
/// values are checked by [`DateTime::parse`].
fn iso_to_dtm(text: &str) -> Option<String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let date = text.get(..10)?;
    let (year, month, day) = (date.get(..4)?, date.get(5..7)?, date.get(8..10)?);
    if !(digits(year) && digits(month) && digits(day)) || &date[7..8] != "-" {
        return None;
    }
    let mut dtm = format!("{year}{month}{day}");
    let rest = &text[10..];
    let (time, offset) = match rest.find(['Z', 'z', '+', '-']) {
        Some(at) => (&rest[..at], Some(&rest[at..])),
        None => (rest, None),
    };
    if !time.is_empty() {
        let time = time.strip_prefix(['T', 't', ' '])?;
        let (clock, fraction) = match time.split_once('.') {
            Some((c, f)) => (c, Some(f)),
            None => (time, None),
        };
        let parts: Vec<&str> = clock.split(':').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2 || !digits(p)) {
            return None;
        }
        dtm.extend(parts.iter().copied());
        if let Some(fraction) = fraction {
            if parts.len() != 3 || !digits(fraction) {
                return None;
            }
            dtm.push('.');
            dtm.push_str(fraction);
        }
    }
    match offset {
        None => {}
        Some("Z" | "z") => dtm.push_str("+0000"),
        Some(offset) => {
            let (sign, hhmm) = offset.split_at(1);
            let hhmm = hhmm.replacen(':', "", 1);
            if hhmm.len() != 4 || !digits(&hhmm) {
                return None;
            }
            dtm.push_str(sign);
            dtm.push_str(&hhmm);
        }
    }
    Some(dtm)
}

/// Ids per replay request to a running engine: small enough to show progress.
const REPLAY_BATCH: usize = 100;

/// Where the operations run: a running engine's API, or a store opened here (either
/// backend, hence the type parameter; unused for `Remote`).
enum Backend<S> {
    /// `routing`: the routes and packs, loaded only for a replay (which routes and maps);
    /// listing, showing and purging need only the store.
    Local {
        store: Box<S>,
        config: Box<EngineConfig>,
        routing: Option<Box<Loaded>>,
    },
    Remote(Remote),
}

struct Remote {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The variable the token comes from (`[admin] token_env`), to name in errors.
    token_env: String,
    /// The site's UTC offset in minutes (`[defaults]`), for times given without one.
    site_offset: i16,
}

pub(crate) fn run(args: &MessagesArgs) -> ExitCode {
    // Only passerelle.toml: a route file being edited must not lock the operator out of
    // the messages. The running engine routes with what it loaded; here, only a replay on
    // the store routes, and it loads the routes then.
    let config = match EngineConfig::load(Some(&args.config)) {
        Ok(c) => c,
        Err(errors) => return fail(2, &errors.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let remote = match remote_if_running(args, &config).await {
            Ok(r) => r,
            Err(e) => return fail(1, &e),
        };
        let remote = match remote {
            Ok(remote) => return finish(Backend::<SledStore>::Remote(remote), args).await,
            Err(remote) => remote,
        };
        // Only what routes and maps here needs the routes: a replay, a resubmission's dry run.
        let routes_here = matches!(
            args.command,
            MessagesCommand::Replay { .. } | MessagesCommand::Resubmit { dry_run: true, .. }
        );
        let routing = if routes_here {
            match Loaded::load(&args.config) {
                Ok(loaded) => Some(Box::new(loaded)),
                Err(lines) => return fail(2, &lines.join("\n")),
            }
        } else {
            None
        };
        // With --local, no engine was asked: only the store's failure applies.
        let cannot_open = |config: &EngineConfig, e: StoreError| {
            let store = format!(
                "the store at {} cannot be opened ({e})",
                config.store_location()
            );
            if args.local {
                fail(1, &store)
            } else {
                fail(
                    1,
                    &format!("no engine answers at {} and {store}", remote.base),
                )
            }
        };
        match config.store_backend() {
            StoreBackend::Sled => match config.open_store() {
                Ok(store) => local(store, config, routing, args).await,
                Err(e) => cannot_open(&config, e),
            },
            StoreBackend::Postgres => match config.open_pg_store().await {
                Ok(store) => local(store, config, routing, args).await,
                Err(e) => cannot_open(&config, e),
            },
        }
    })
}

async fn local<S: Store>(
    store: S,
    config: EngineConfig,
    routing: Option<Box<Loaded>>,
    args: &MessagesArgs,
) -> ExitCode {
    let backend = Backend::Local {
        store: Box::new(store),
        config: Box::new(config),
        routing,
    };
    finish(backend, args).await
}

/// Runs the command, then makes the store's writes durable, whatever became of the output
/// (printing never panics: see [`crate::output`]).
async fn finish<S: Store>(backend: Backend<S>, args: &MessagesArgs) -> ExitCode {
    let mut out = Output::stdout();
    let site_offset = match &backend {
        Backend::Local { config, .. } => config.defaults.site_utc_offset_minutes,
        Backend::Remote(r) => r.site_offset,
    };
    let result = execute(&backend, &args.command, site_offset, &mut out).await;
    let flushed = match &backend {
        Backend::Local { store, .. } => store.flush().await.map_err(|e| e.to_string()),
        Backend::Remote(_) => Ok(()),
    };
    let status = match (result, flushed) {
        (Ok(code), Ok(())) => code,
        (Err(e), _) => fail(1, &e),
        (Ok(_), Err(e)) => fail(1, &format!("cannot flush the store: {e}")),
    };
    out.finish("messages", status)
}

/// The running engine's API if it answers (`Ok(Ok(remote))`); otherwise the client that
/// did not get an answer (`Ok(Err(remote))`), and the store is to be opened here. An error
/// when `--admin` named an API that does not answer.
async fn remote_if_running(
    args: &MessagesArgs,
    config: &EngineConfig,
) -> Result<Result<Remote, Remote>, String> {
    let token = std::env::var(&config.admin.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let base = match &args.admin {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", loopback_for(&config.admin.bind)),
    };
    let remote = Remote {
        client,
        base,
        token,
        token_env: config.admin.token_env.clone(),
        site_offset: config.defaults.site_utc_offset_minutes,
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

    /// What to say when the admin API answers 401.
    fn token_refused(&self) -> String {
        let env = &self.token_env;
        match self.token {
            Some(_) => {
                format!("the admin API refused the token in ${env}: set it to the engine's token")
            }
            None => format!(
                "the admin API wants a token: set ${env} (the variable [admin] token_env names)"
            ),
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

    /// Sends a request and reads a JSON answer; `Ok(None)` for a 404 (or a 405: an older
    /// engine that has the path for another method only).
    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Option<Value>, String> {
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND
            || status == reqwest::StatusCode::METHOD_NOT_ALLOWED
        {
            return Ok(None);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(self.token_refused());
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
            // In the body: the filters may identify a patient, and URLs get logged.
            Backend::Remote(r) => r
                .json(
                    r.request(reqwest::Method::POST, "/api/messages/query")
                        .json(filter),
                )
                .await?
                .ok_or_else(|| {
                    format!(
                        "the engine at {} has no POST /api/messages/query (an older \
                         version?): upgrade it, or stop it and use --local",
                        r.base
                    )
                }),
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
                filter.newest_first = false;
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
            Backend::Local { store, routing, .. } => {
                let Some(loaded) = routing else {
                    return Err("the routes were not loaded for this replay".to_owned());
                };
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

    /// Journals (or, for a dry run, checks) a corrected copy of a message.
    async fn resubmit(&self, request: &ops::Resubmission) -> Result<ops::ResubmitResult, String> {
        match self {
            Backend::Local {
                store,
                config,
                routing,
            } => {
                let remap_with = |raw: &[u8], listener: &str| match routing {
                    Some(loaded) => route_and_map(loaded, raw, listener),
                    None => Err("the routes were not loaded".to_owned()),
                };
                let remap: Option<ops::Remap<'_>> = match routing {
                    Some(_) => Some(&remap_with),
                    None => None,
                };
                // The engine's duplicate check, as `serve` sets it from the same file.
                let duplicates = passerelle_engine::duplicates::Duplicates::of(config);
                let mut result = ops::resubmit(store.as_ref(), remap, &duplicates, request)
                    .await
                    .map_err(|refusal| refusal.to_string())?;
                // Left received: the engine routes it at its start (a running node of a
                // shared PostgreSQL store, at its recheck).
                ops::resubmitted_outcome(store.as_ref(), &mut result).await;
                Ok(result)
            }
            Backend::Remote(r) => {
                use base64::Engine as _;
                let body = json!({
                    "original": request.original,
                    "frame": base64::engine::general_purpose::STANDARD.encode(&request.frame),
                    "operator": operator_login(),
                    "dry_run": request.dry_run,
                });
                let response = r
                    .request(reqwest::Method::POST, "/api/messages/resubmit")
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    return Err(r.token_refused());
                }
                if status.is_success() {
                    return response
                        .json()
                        .await
                        .map_err(|e| format!("unexpected resubmit answer: {e}"));
                }
                let text = response.text().await.unwrap_or_default();
                let text = text.trim();
                Err(match status {
                    // An engine without the endpoint answers 404 or 405 with no text.
                    reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::METHOD_NOT_ALLOWED
                        if text.is_empty() =>
                    {
                        format!(
                            "the engine at {} has no POST /api/messages/resubmit (an older \
                             version?): upgrade it, or stop it and use --local",
                            r.base
                        )
                    }
                    reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::BAD_REQUEST => {
                        text.to_owned()
                    }
                    _ => format!("the admin API answered {status}: {text}"),
                })
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
    site_offset: i16,
    out: &mut Output<std::io::Stdout>,
) -> Result<ExitCode, String> {
    match command {
        MessagesCommand::List {
            filter,
            limit,
            after,
            newest_first,
            before,
            json,
        } => {
            let mut filter = filter.to_filter(site_offset)?;
            filter.limit = Some(*limit);
            filter.after = *after;
            filter.newest_first = *newest_first;
            filter.before = *before;
            filter.query()?;
            let page = backend.list(&filter).await?;
            if *json {
                outln!(out, "{page}");
            } else {
                let items = page["items"].as_array().map_or(&[][..], Vec::as_slice);
                if !items.is_empty() {
                    outln!(out, "{}", list_header());
                }
                for r in items {
                    outln!(out, "{}", summary_line(r, site_offset));
                }
                if let Some(next) = page["next"].as_u64() {
                    if *newest_first {
                        outln!(out, "… more: --newest-first --before {next}");
                    } else {
                        outln!(out, "… more: --after {next}");
                    }
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
                outln!(out, "{doc}");
            } else {
                print_message(out, &doc, site_offset);
            }
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Replay {
            ids,
            filter,
            remap,
            dry_run,
        } => {
            let filter = filter.to_filter(site_offset)?;
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
                out,
                results
                    .into_iter()
                    .map(|r| {
                        let result = if r.ok && r.replayed {
                            Ok(r.message)
                        } else if r.ok {
                            Err(format!("not replayed: {}", r.message))
                        } else {
                            Err(r.message)
                        };
                        (r.id, result)
                    })
                    .collect(),
            ))
        }
        MessagesCommand::Purge { ids } => Ok(report(out, backend.purge(ids).await?)),
        MessagesCommand::Resubmit {
            id,
            file,
            edit,
            dry_run,
            json,
        } => {
            let frame = match (file, edit) {
                (Some(path), _) => {
                    let bytes = std::fs::read(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    crate::send_cmd::with_cr_terminators(&bytes)
                }
                (None, true) => {
                    let doc = backend
                        .show(*id)
                        .await?
                        .ok_or_else(|| format!("no message {id}"))?;
                    crate::resubmit_edit::edit(*id, text(&doc, "raw"))?
                }
                (None, false) => return Err("give --file FIXED.hl7 or --edit".into()),
            };
            // Checked here before anything is sent: the engine would refuse it the same way.
            if let Err(e) = Message::parse(&frame) {
                return Err(format!(
                    "the new message does not parse, nothing was stored: {e}"
                ));
            }
            let request = ops::Resubmission {
                original: *id,
                frame,
                origin: ops::operator_origin(operator_login().as_deref()),
                dry_run: *dry_run,
            };
            let result = backend.resubmit(&request).await?;
            if *json {
                outln!(out, "{}", json!(result));
                return Ok(if result.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let message = match &result.warning {
                Some(warning) => format!("{} (careful: {warning})", result.message),
                None => result.message,
            };
            let line = if result.ok { Ok(message) } else { Err(message) };
            Ok(report(out, vec![(*id, line)]))
        }
    }
}

/// Says what went wrong on stderr (never panicking, even if stderr is closed).
fn fail(code: u8, message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "passerelle messages: {message}");
    ExitCode::from(code)
}

/// A stored time (milliseconds since 1970) at the site's offset, in the form `--since` and
/// `--until` accept back: `2026-11-23T01:48:17+01:00`.
fn time_of(ms: &Value, site_offset: i16) -> String {
    let secs = ms.as_u64().unwrap_or_default() / 1_000;
    let local = secs.saturating_add_signed(i64::from(site_offset) * 60);
    DateTime::from_unix(local).to_fhir_datetime_at(site_offset)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// The columns of `list`, as [`summary_line`] fills them.
fn list_header() -> String {
    columns([
        "ID",
        "RECEIVED",
        "STATE",
        "TYPE",
        "CONTROL ID",
        "ROUTE",
        "DELIVERIES",
        "ERROR",
    ])
}

/// One line of `list`: id, received, state, type, control id, route, deliveries, error.
fn columns(cells: [&str; 8]) -> String {
    let [
        id,
        received,
        state,
        message_type,
        control_id,
        route,
        deliveries,
        error,
    ] = cells;
    let line = format!(
        "{id:>10}  {received:<25}  {state:<14} {message_type:<8} {control_id:<20} {route:<16} {deliveries:<24} {error}"
    );
    line.trim_end().to_owned()
}

/// Where a message's deliveries stand, destination by destination (`files=delivered`):
/// from a listed record (`delivery_states`) or a shown one (`delivery_details`). A
/// destination's name is `route.destination`; the route is in its own column.
fn deliveries_text(r: &Value) -> String {
    let route = text(r, "route");
    let list = r["delivery_states"]
        .as_array()
        .or_else(|| r["delivery_details"].as_array());
    let states: Vec<String> = list
        .into_iter()
        .flatten()
        .map(|d| {
            let destination = text(d, "destination");
            let short = destination
                .strip_prefix(route)
                .and_then(|rest| rest.strip_prefix('.'))
                .unwrap_or(destination);
            format!("{short}={}", text(d, "state"))
        })
        .collect();
    if states.is_empty() {
        "-".to_owned()
    } else {
        states.join(",")
    }
}

fn summary_line(r: &Value, site_offset: i16) -> String {
    let line = columns([
        &r["id"].as_u64().unwrap_or_default().to_string(),
        &time_of(&r["received_at_ms"], site_offset),
        text(r, "state"),
        text(r, "message_type"),
        text(r, "control_id"),
        r["route"].as_str().unwrap_or("-"),
        &deliveries_text(r),
        text(r, "error"),
    ]);
    match links_text(r) {
        Some(links) => format!("{line}  [{links}]"),
        None => line,
    }
}

/// "resubmitted from 12", "resubmitted as 15, 17": a record's resubmission links, if any.
fn links_text(r: &Value) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(from) = r["resubmitted_from"].as_u64() {
        parts.push(format!("resubmitted from {from}"));
    }
    let copies: Vec<String> = r["resubmitted_as"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .map(|id| id.to_string())
        .collect();
    if !copies.is_empty() {
        parts.push(format!("resubmitted as {}", copies.join(", ")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn print_message(out: &mut Output<std::io::Stdout>, doc: &Value, site_offset: i16) {
    outln!(out, "{}", summary_line(doc, site_offset));
    outln!(out, "\n# history");
    for t in doc["history"].as_array().into_iter().flatten() {
        outln!(
            out,
            "  {}  {:<16} {}",
            time_of(&t["at_ms"], site_offset),
            text(t, "state"),
            text(t, "detail")
        );
    }
    outln!(
        out,
        "\n# message ({} bytes, from {} on {})",
        doc["size"].as_u64().unwrap_or_default(),
        text(doc, "peer"),
        text(doc, "listener")
    );
    for segment in text(doc, "raw")
        .split(['\r', '\n'])
        .filter(|s| !s.is_empty())
    {
        outln!(out, "  {segment}");
    }
    for d in doc["delivery_details"].as_array().into_iter().flatten() {
        // `attempts` counts since the delivery was last queued (a replay starts it
        // again); the history keeps every attempt ever made.
        let history = d["history"].as_array().map_or(&[][..], Vec::as_slice);
        outln!(
            out,
            "\n# delivery to {} (key {}): {}, {} attempt(s) since last queued, {} in all",
            text(d, "destination"),
            text(d, "ordering_key"),
            text(d, "state"),
            d["attempts"].as_u64().unwrap_or_default(),
            history.len()
        );
        if let Some(reason) = d["dead_reason"].as_str() {
            outln!(out, "  dead: {reason}");
        }
        for a in history {
            let status = a["status"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_default();
            outln!(
                out,
                "  {}  {} {} {} {}",
                time_of(&a["at_ms"], site_offset),
                text(a, "outcome"),
                status,
                text(a, "error_class"),
                text(a, "detail")
            );
        }
    }
    if !doc["bundle"].is_null() {
        outln!(out, "\n# bundle");
        outln!(
            out,
            "{}",
            serde_json::to_string_pretty(&doc["bundle"]).unwrap_or_default()
        );
    }
}

/// Prints one line per message, successes on stdout and failures on stderr; non-zero
/// when any failed. A closed stdout stops the successes' lines, not the failures'.
fn report(
    out: &mut Output<std::io::Stdout>,
    results: Vec<(MessageId, Result<String, String>)>,
) -> ExitCode {
    let mut errors = Output::stderr();
    let mut failed = false;
    for (id, result) in results {
        match result {
            Ok(what) => outln!(out, "{id}: {what}"),
            Err(e) => {
                outln!(errors, "{id}: {e}");
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

/// The operator's login (`$USER`), for the copy's record of a resubmission.
fn operator_login() -> Option<String> {
    std::env::var("USER").ok().filter(|u| !u.trim().is_empty())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_without_offset_are_read_in_the_site_offset() {
        // A plain date: the start of that day, at the site.
        assert_eq!(explicit_time("2026-11-22", 60).unwrap(), "20261122+0100");
        assert_eq!(
            explicit_time("2026-11-22T15:30", 60).unwrap(),
            "202611221530+0100"
        );
        assert_eq!(
            explicit_time("2026-11-22 15:30:45.25", -300).unwrap(),
            "20261122153045.25-0500"
        );
        assert_eq!(explicit_time("20261122", 0).unwrap(), "20261122+0000");
        // An offset given wins, in every spelling.
        assert_eq!(
            explicit_time("2026-11-22T15:30Z", 60).unwrap(),
            "202611221530+0000"
        );
        assert_eq!(
            explicit_time("2026-11-22T15:30:00+02:00", 60).unwrap(),
            "20261122153000+0200"
        );
        assert_eq!(
            explicit_time("2026-11-22T15:30-0330", 60).unwrap(),
            "202611221530-0330"
        );
        assert_eq!(
            explicit_time("202611221530+0000", 60).unwrap(),
            "202611221530+0000"
        );
    }

    #[test]
    fn the_instant_is_the_one_the_operator_meant() {
        let at = |text: &str| {
            DateTime::parse(&explicit_time(text, 60).unwrap())
                .unwrap()
                .to_unix_millis(None)
        };
        // Midnight at +01:00 is 23:00 UTC the day before.
        assert_eq!(at("2026-11-22"), at("2026-11-21T23:00Z"));
        assert_eq!(at("2026-11-22T01:00"), at("2026-11-22T00:00Z"));
    }

    #[test]
    fn malformed_times_are_refused_with_the_accepted_forms() {
        for bad in [
            "2026-11",
            "2026-11-22T",
            "2026-11-22T1530",
            "2026-11-22T15:3",
            "2026-11-22T15:30+1",
            "2026-11-22X15:30",
            "2026-1-22",
            "22/11/2026",
        ] {
            let e = explicit_time(bad, 60).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let e = explicit_time("2026-02-30", 60).unwrap_err();
        assert!(e.contains("day"), "{e}");
        let e = explicit_time("2026-11", 60).unwrap_err();
        assert!(e.contains("2026-11-22T15:30"), "lists the forms: {e}");
    }
}

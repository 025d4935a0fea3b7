//! `passerelle messages list|show|replay|purge`: operations on the store.
//!
//! These commands open the store directly, so the engine must be stopped (sled allows
//! one process at a time; a running engine makes them fail with a clear message). The
//! admin API, for a running engine, is to come.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use passerelle_engine::Loaded;
use passerelle_engine::pipeline;
use passerelle_hl7::Message;
use passerelle_hl7::types::DateTime;
use passerelle_mapping::MapOptions;
use passerelle_store::{
    DeliveryState, MessageId, MessageRecord, MessageState, Outcome, Query, SledStore, Store,
};
use serde_json::json;

#[derive(Debug, Args)]
pub(crate) struct MessagesArgs {
    /// The engine's configuration (for the store's path, routes and mapping packs).
    #[arg(long, default_value = "passerelle.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: MessagesCommand,
}

#[derive(Debug, Subcommand)]
enum MessagesCommand {
    /// List messages, oldest first, filtered.
    List(ListArgs),
    /// Show one message: its record, the raw HL7 (one segment per line), the bundle and
    /// each delivery's attempt history.
    Show {
        id: MessageId,
        #[arg(long)]
        json: bool,
    },
    /// Queue messages again: dead or delivered deliveries of mapped messages go back to
    /// their place in their key's order; unrouted and mapping-failed messages are routed
    /// and mapped again.
    Replay {
        ids: Vec<MessageId>,
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
struct ListArgs {
    /// A message state (received, rejected, unrouted, mapped, mapping_failed) or a
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
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Page after this id.
    #[arg(long)]
    after: Option<MessageId>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &MessagesArgs) -> ExitCode {
    let loaded = match Loaded::load(&args.config) {
        Ok(l) => l,
        Err(lines) => return fail(2, &lines.join("\n")),
    };
    let store = match loaded.open_store() {
        Ok(s) => s,
        Err(e) => {
            return fail(
                1,
                &format!(
                    "cannot open the store at {} ({e}); if the engine is running, stop it first",
                    loaded.config.store.path.display()
                ),
            );
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let result = match &args.command {
            MessagesCommand::List(list) => list_messages(&store, list).await,
            MessagesCommand::Show { id, json } => show(&store, *id, *json).await,
            MessagesCommand::Replay {
                ids,
                remap,
                dry_run,
            } => replay(&store, &loaded, ids, *remap, *dry_run).await,
            MessagesCommand::Purge { ids } => purge(&store, ids).await,
        };
        let flushed = store.flush().await;
        match (result, flushed) {
            (Ok(code), Ok(())) => code,
            (Err(e), _) => fail(1, &e),
            (Ok(_), Err(e)) => fail(1, &format!("cannot flush the store: {e}")),
        }
    })
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("passerelle messages: {message}");
    ExitCode::from(code)
}

fn parse_time(text: &str) -> Result<u64, String> {
    let t = DateTime::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    u64::try_from(t.to_unix_millis(None)).map_err(|_| format!("{text:?} is before 1970"))
}

fn summary_line(r: &MessageRecord) -> String {
    let msh = r.msh.clone().unwrap_or_default();
    format!(
        "{:>20}  {}  {:<14} {:<8} {:<20} {:<12} {}",
        r.id,
        DateTime::from_unix(r.received_at_ms / 1_000),
        r.state.name(),
        format!("{}^{}", msh.message_type, msh.trigger_event),
        msh.control_id,
        r.route.as_deref().unwrap_or("-"),
        r.error.as_deref().unwrap_or(""),
    )
}

fn record_json(r: &MessageRecord) -> serde_json::Value {
    json!({
        "id": r.id,
        "received_at_ms": r.received_at_ms,
        "state": r.state.name(),
        "listener": r.listener,
        "peer": r.peer,
        "size": r.size,
        "message_type": r.msh.as_ref().map(|m| format!("{}^{}", m.message_type, m.trigger_event)),
        "control_id": r.msh.as_ref().map(|m| m.control_id.clone()),
        "route": r.route,
        "error": r.error,
        "deliveries": r.deliveries.iter().map(|d| json!({"destination": d.destination, "seq": d.seq})).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({"at_ms": t.at_ms, "state": t.state, "detail": t.detail})).collect::<Vec<_>>(),
    })
}

async fn list_messages(store: &SledStore, args: &ListArgs) -> Result<ExitCode, String> {
    let mut query = Query {
        route: args.route.clone(),
        destination: args.dest.clone(),
        control_id: args.control_id.clone(),
        ordering_key: args.key.clone(),
        after: args.after,
        limit: args.limit,
        ..Query::default()
    };
    if let Some(state) = &args.state {
        if let Some(s) = MessageState::ALL.iter().find(|s| s.name() == state) {
            query.state = Some(*s);
        } else if let Some(s) = DeliveryState::ALL.iter().find(|s| s.name() == state) {
            query.delivery_state = Some(*s);
        } else {
            return Err(format!("unknown state {state:?}"));
        }
    }
    query.since_ms = args.since.as_deref().map(parse_time).transpose()?;
    query.until_ms = args.until.as_deref().map(parse_time).transpose()?;
    let page = store.list(&query).await.map_err(|e| e.to_string())?;
    if args.json {
        let doc = json!({
            "items": page.items.iter().map(record_json).collect::<Vec<_>>(),
            "next": page.next,
        });
        println!("{doc}");
    } else {
        for r in &page.items {
            println!("{}", summary_line(r));
        }
        if let Some(next) = page.next {
            println!("… more: --after {next}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(store: &SledStore, id: MessageId, as_json: bool) -> Result<ExitCode, String> {
    let record = store
        .get(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or(format!("no message {id}"))?;
    let raw = store
        .raw(id)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let deliveries = store.deliveries(id).await.map_err(|e| e.to_string())?;
    let text = match Message::parse(&raw) {
        Ok(m) => m.charset().decode(&raw).into_owned(),
        Err(_) => String::from_utf8_lossy(&raw).into_owned(),
    };
    if as_json {
        let mut doc = record_json(&record);
        doc["raw"] = json!(text);
        doc["bundle"] = record
            .bundle
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        doc["delivery_details"] = json!(
            deliveries
                .iter()
                .map(|d| json!({
                    "destination": d.destination,
                    "state": d.state.name(),
                    "ordering_key": d.ordering_key,
                    "attempts": d.attempts,
                    "next_attempt_ms": d.next_attempt_ms,
                    "dead_reason": d.dead_reason,
                    "history": d.history.iter().map(|a| json!({
                        "at_ms": a.at_ms, "outcome": format!("{:?}", a.outcome).to_lowercase(),
                        "status": a.status, "error_class": a.error_class, "detail": a.detail,
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()
        );
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", summary_line(&record));
    println!("\n# history");
    for t in &record.history {
        println!(
            "  {}  {:<16} {}",
            DateTime::from_unix(t.at_ms / 1_000),
            t.state,
            t.detail
        );
    }
    println!(
        "\n# message ({} bytes, from {} on {})",
        record.size, record.peer, record.listener
    );
    for segment in text.split(['\r', '\n']).filter(|s| !s.is_empty()) {
        println!("  {segment}");
    }
    for d in &deliveries {
        println!(
            "\n# delivery to {} (key {}): {}, {} attempt(s)",
            d.destination,
            d.ordering_key,
            d.state.name(),
            d.attempts
        );
        if let Some(reason) = &d.dead_reason {
            println!("  dead: {reason}");
        }
        for a in &d.history {
            let status = a.status.map(|s| s.to_string()).unwrap_or_default();
            println!(
                "  {}  {:?} {} {} {}",
                DateTime::from_unix(a.at_ms / 1_000),
                a.outcome,
                status,
                a.error_class,
                a.detail
            );
        }
    }
    if let Some(bundle) = record
        .bundle
        .as_deref()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
    {
        println!("\n# bundle");
        println!(
            "{}",
            serde_json::to_string_pretty(&bundle).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    store: &SledStore,
    loaded: &Loaded,
    ids: &[MessageId],
    remap: bool,
    dry_run: bool,
) -> Result<ExitCode, String> {
    let mut results = Vec::new();
    for &id in ids {
        results.push((id, replay_one(store, loaded, id, remap, dry_run).await));
    }
    Ok(report(results))
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

/// Routes and maps a stored message with the current configuration.
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

async fn replay_one(
    store: &SledStore,
    loaded: &Loaded,
    id: MessageId,
    remap: bool,
    dry_run: bool,
) -> Result<String, String> {
    let record = store
        .get(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no such message")?;
    let raw = || async {
        store
            .raw(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "raw bytes missing".to_owned())
    };
    match record.state {
        MessageState::Rejected => {
            Err("rejected (it does not parse): the sender must fix and resend it".into())
        }
        MessageState::Received => Ok("not yet routed; the engine routes it when it starts".into()),
        MessageState::Unrouted | MessageState::MappingFailed => {
            let outcome = route_and_map(loaded, &raw().await?, &record.listener)?;
            let what = match &outcome {
                Outcome::Unrouted => "still unrouted".to_owned(),
                Outcome::MappingFailed { error, .. } => format!("mapping still fails: {error}"),
                Outcome::Mapped {
                    route, deliveries, ..
                } => format!("mapped by route {route}, queued for {}", deliveries.len()),
            };
            if dry_run || !matches!(outcome, Outcome::Mapped { .. }) {
                return Ok(format!("{what}{}", if dry_run { " (dry run)" } else { "" }));
            }
            store
                .record_outcome(id, outcome)
                .await
                .map_err(|e| e.to_string())?;
            Ok(what)
        }
        MessageState::Mapped => {
            let bundle = if remap {
                match route_and_map(loaded, &raw().await?, &record.listener)? {
                    Outcome::Mapped { bundle, .. } => Some(bundle),
                    Outcome::MappingFailed { error, .. } => {
                        return Err(format!("re-mapping fails: {error}"));
                    }
                    Outcome::Unrouted => return Err("no route takes it any more".into()),
                }
            } else {
                None
            };
            let finals = store
                .deliveries(id)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .filter(|d| d.state.is_final())
                .count();
            if dry_run {
                return Ok(format!(
                    "{finals} deliveries would be queued again{}",
                    if remap { ", re-mapped" } else { "" }
                ));
            }
            let n = store.replay(id, bundle).await.map_err(|e| e.to_string())?;
            Ok(format!(
                "{n} deliveries queued again{}",
                if remap { ", re-mapped" } else { "" }
            ))
        }
    }
}

async fn purge(store: &SledStore, ids: &[MessageId]) -> Result<ExitCode, String> {
    let mut results = Vec::new();
    for &id in ids {
        let result = match store.purge(id).await {
            Ok(true) => Ok("purged".to_owned()),
            Ok(false) => Err("no such message".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        results.push((id, result));
    }
    Ok(report(results))
}

//! `passerelle parse FILE... [--path PATH] [--json]`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use passerelle_hl7::{HeaderSummary, Message, OwnedMessage, Path};
use serde_json::{Value as Json, json};

#[derive(Debug, Args)]
pub(crate) struct ParseArgs {
    /// Files holding one message, several concatenated messages, or a batch (FHS/BHS).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print only the values at this path (e.g. `PID-5.1`, `PID-3[*].1`, `OBX[2]-5`).
    #[arg(long)]
    path: Option<String>,
    /// One JSON object per message: segments → fields → repetitions → components →
    /// subcomponents, decoded to UTF-8.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &ParseArgs) -> ExitCode {
    let path = match args.path.as_deref().map(str::parse::<Path>).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("passerelle parse: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = crate::input::for_each_message(&args.files, |label, message| {
        if args.json {
            print_json(&mut out, label, message, path.as_ref())?;
        } else {
            print_text(&mut out, label, message, path.as_ref())?;
        }
        Ok(true)
    });
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("passerelle parse: cannot write output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(
    out: &mut impl Write,
    label: &str,
    message: &Message<'_>,
    path: Option<&Path>,
) -> io::Result<()> {
    let header = HeaderSummary::of(message);
    let mut doc = json!({
        "file": label,
        "type": header.kind(),
        "control_id": header.control_id,
        "version": header.version,
        "charset": message.charset().label(),
        "quirks": message.quirks().names(),
    });
    if let Some(path) = path {
        let values: Vec<Json> = message
            .iter(path)
            .map(|v| Json::String(v.text().into_owned()))
            .collect();
        doc["path"] = json!(path.to_string());
        doc["values"] = Json::Array(values);
    } else {
        let owned = OwnedMessage::from_message(message);
        let segments: Vec<Json> = owned
            .segments
            .iter()
            .map(|s| json!({ "id": s.id, "fields": s.fields }))
            .collect();
        doc["segments"] = Json::Array(segments);
    }
    serde_json::to_writer(&mut *out, &doc)?;
    writeln!(out)
}

fn print_text(
    out: &mut impl Write,
    label: &str,
    message: &Message<'_>,
    path: Option<&Path>,
) -> io::Result<()> {
    if let Some(path) = path {
        for value in message.iter(path) {
            writeln!(out, "{}", value.text())?;
        }
        return Ok(());
    }
    let header = HeaderSummary::of(message);
    write!(
        out,
        "{label}: {} v{}, control id {}, {} segments, charset {}",
        header.kind(),
        header.version,
        header.control_id,
        message.segment_count(),
        message.charset().label()
    )?;
    let quirks = message.quirks().names();
    if !quirks.is_empty() {
        write!(out, ", tolerated: {}", quirks.join(", "))?;
    }
    writeln!(out)?;
    for segment in message.segments() {
        for (n, field) in segment.fields().enumerate() {
            if !field.is_empty() {
                writeln!(
                    out,
                    "  {}-{:<3} {}",
                    segment.id(),
                    n + 1,
                    field.text().escape_debug()
                )?;
            }
        }
    }
    Ok(())
}

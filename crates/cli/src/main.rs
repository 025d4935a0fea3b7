//! `passerelle`: the command-line tool of the passerelle HL7 v2 → FHIR engine.
//!
//! The binary is thin: each subcommand parses its arguments and calls the crates that do
//! the work. Subcommands print results on stdout and problems on stderr, and exit non-zero
//! when anything failed, so that they compose in scripts; a reader that stops reading
//! early (`| head`) ends the output quietly ([`output`]).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check_cmd;
mod engine_serve;
mod input;
mod map_cmd;
mod messages_cmd;
mod output;
mod parse_cmd;
mod resubmit_edit;
mod send_cmd;
mod serve_cmd;

/// jemalloc: the store's B-tree frees and reallocates many small blocks from several
/// threads, and glibc's malloc would keep much of that memory (see `passerelle_store`).
#[global_allocator]
static ALLOCATOR: passerelle_store::Allocator = passerelle_store::Allocator;

#[derive(Debug, Parser)]
#[command(
    name = "passerelle",
    version,
    about = "HL7 v2 / MLLP → FHIR R4 integration engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse HL7 v2 files (single messages, concatenated messages or batches) and show them.
    Parse(parse_cmd::ParseArgs),
    /// Send HL7 v2 files to an MLLP receiver and check every ACK.
    Send(send_cmd::SendArgs),
    /// Run the engine (--config passerelle.toml), or an MLLP listener answering from the parser.
    Serve(serve_cmd::ServeArgs),
    /// Map HL7 v2 files to FHIR R4 transaction bundles with a mapping pack.
    Map(map_cmd::MapArgs),
    /// Load every mapping pack and report each problem (file:line:column and field).
    Check(check_cmd::CheckArgs),
    /// List, show, replay and purge stored messages (through the running engine, or on the store).
    Messages(messages_cmd::MessagesArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Parse(args) => parse_cmd::run(&args),
        Command::Send(args) => send_cmd::run(&args),
        Command::Serve(args) => serve_cmd::run(&args),
        Command::Map(args) => map_cmd::run(&args),
        Command::Check(args) => check_cmd::run(&args),
        Command::Messages(args) => messages_cmd::run(&args),
    }
}

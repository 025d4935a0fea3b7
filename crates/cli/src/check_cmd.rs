//! `passerelle check [PACK_DIR...] [--mappings DIR] [--config passerelle.toml]`: loads
//! every mapping pack and reports each problem with its file, line, column and field; with
//! `--config`, also the engine's configuration, its routes and its destinations' settings.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use passerelle_mapping::Pack;

use crate::output::{Output, errln, outln};

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Pack folders to check; by default every folder of `--mappings` holding a pack.toml.
    packs: Vec<PathBuf>,
    /// The folder holding the mapping packs [default: mappings, or with `--config` alone
    /// only the packs the configuration's routes use].
    #[arg(long)]
    mappings: Option<PathBuf>,
    /// Also check this engine configuration: passerelle.toml, routes.d and every route's
    /// mapping pack and destination settings.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Checks the engine configuration (its routes, their destinations and packs, and that
/// NDJSON folders can be written); prints what is wrong. Returns whether it is sound.
fn check_config(out: &mut Output<std::io::Stdout>, path: &std::path::Path) -> bool {
    let loaded = match passerelle_engine::Loaded::check(path) {
        Ok(l) => l,
        Err(lines) => {
            for line in &lines {
                errln!("{line}");
            }
            errln!("FAILED {}: {} problem(s)", path.display(), lines.len());
            return false;
        }
    };
    outln!(
        out,
        "ok {}: {} listener(s), {} route(s), {} pack(s)",
        path.display(),
        loaded.config.listeners.len(),
        loaded.routes.routes.len(),
        loaded.packs.len()
    );
    true
}

pub(crate) fn run(args: &CheckArgs) -> ExitCode {
    let mut out = Output::stdout();
    let status = check(args, &mut out);
    out.finish("check", status)
}

/// Every check runs whatever becomes of the output: the exit status is the verdict.
fn check(args: &CheckArgs, out: &mut Output<std::io::Stdout>) -> ExitCode {
    let config_ok = args
        .config
        .as_deref()
        .is_none_or(|path| check_config(out, path));
    // `--config` alone checks what the engine would load: the configuration loads the
    // packs its routes use from its own `[paths] mappings`, wherever the command runs.
    if args.config.is_some() && args.packs.is_empty() && args.mappings.is_none() {
        return if config_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mappings = args
        .mappings
        .clone()
        .unwrap_or_else(|| PathBuf::from("mappings"));
    let packs = if args.packs.is_empty() {
        let mut found: Vec<PathBuf> = match std::fs::read_dir(&mappings) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("pack.toml").is_file())
                .collect(),
            Err(e) => {
                errln!("passerelle check: cannot read {}: {e}", mappings.display());
                return ExitCode::from(2);
            }
        };
        found.sort();
        if found.is_empty() {
            errln!(
                "passerelle check: no pack (a folder with pack.toml) in {}",
                mappings.display()
            );
            return ExitCode::from(2);
        }
        found
    } else {
        args.packs.clone()
    };
    let mut failed = 0usize;
    for dir in &packs {
        match Pack::load(dir) {
            Ok(pack) => outln!(out, "ok {}: {}", dir.display(), pack.summary()),
            Err(errors) => {
                errln!("{errors}");
                errln!("FAILED {}: {} problem(s)", dir.display(), errors.0.len());
                failed += 1;
            }
        }
    }
    if failed > 0 || !config_ok {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

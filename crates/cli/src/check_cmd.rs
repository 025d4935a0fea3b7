//! `passerelle check [PACK_DIR...] [--mappings DIR]`: loads every mapping pack and
//! reports each problem with its file, line, column and field.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use passerelle_mapping::Pack;

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Pack folders to check; by default every folder of `--mappings` holding a pack.toml.
    packs: Vec<PathBuf>,
    /// The folder holding the mapping packs.
    #[arg(long, default_value = "mappings")]
    mappings: PathBuf,
}

pub(crate) fn run(args: &CheckArgs) -> ExitCode {
    let packs = if args.packs.is_empty() {
        let mut found: Vec<PathBuf> = match std::fs::read_dir(&args.mappings) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("pack.toml").is_file())
                .collect(),
            Err(e) => {
                eprintln!(
                    "passerelle check: cannot read {}: {e}",
                    args.mappings.display()
                );
                return ExitCode::from(2);
            }
        };
        found.sort();
        if found.is_empty() {
            eprintln!(
                "passerelle check: no pack (a folder with pack.toml) in {}",
                args.mappings.display()
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
            Ok(pack) => println!("ok {}: {}", dir.display(), pack.summary()),
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("FAILED {}: {} problem(s)", dir.display(), errors.0.len());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

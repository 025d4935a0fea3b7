//! `passerelle map FILE... [--pack DIR] [--pretty] [--site-offset ±HH:MM]`.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use passerelle_mapping::{MapOptions, Pack};

use crate::output::{Output, errln, outln};

#[derive(Debug, Args)]
pub(crate) struct MapArgs {
    /// Files holding one message, several concatenated messages, or a batch (FHS/BHS).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The mapping pack folder.
    #[arg(long, default_value = "mappings/v2-to-fhir")]
    pack: PathBuf,
    /// Indent the JSON (otherwise one bundle per line).
    #[arg(long)]
    pretty: bool,
    /// The site's UTC offset for times sent without one, e.g. `+01:00` (overrides the pack's).
    #[arg(long, value_parser = parse_offset, allow_hyphen_values = true)]
    site_offset: Option<i16>,
}

fn parse_offset(s: &str) -> Result<i16, String> {
    let b = s.as_bytes();
    let bad = || format!("{s:?} is not ±HH:MM");
    if b.len() != 6 || b[3] != b':' || !matches!(b[0], b'+' | b'-') {
        return Err(bad());
    }
    let h: i16 = s[1..3].parse().map_err(|_| bad())?;
    let m: i16 = s[4..6].parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(if b[0] == b'-' {
        -(h * 60 + m)
    } else {
        h * 60 + m
    })
}

pub(crate) fn run(args: &MapArgs) -> ExitCode {
    let pack = match Pack::load(&args.pack) {
        Ok(p) => p,
        Err(errors) => {
            errln!("{errors}");
            errln!(
                "passerelle map: the pack {} does not load ({} problems)",
                args.pack.display(),
                errors.0.len()
            );
            return ExitCode::from(2);
        }
    };
    let options = MapOptions {
        site_offset: args.site_offset,
    };
    let mut out = Output::stdout();
    let failures = crate::input::for_each_message(&args.files, |label, message| {
        let mapped = match pack.map(message, &options) {
            Ok(bundle) => {
                outln!(out, "{}", bundle.to_json(args.pretty));
                true
            }
            Err(e) => {
                errln!("{label}: {e}");
                false
            }
        };
        // Nobody reads any more (`| head`): the rest would be mapped for nothing.
        if out.is_open() {
            ControlFlow::Continue(mapped)
        } else {
            ControlFlow::Break(())
        }
    });
    let status = if failures > 0 {
        errln!("passerelle map: {failures} message(s) or file(s) could not be mapped");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    out.finish("map", status)
}

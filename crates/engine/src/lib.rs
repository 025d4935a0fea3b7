//! # passerelle-engine: configuration, routes and (to come) the pipeline
//!
//! Its job: turn the operator's files into a checked, typed description of what the
//! engine runs, and, from a message's MSH, decide which route takes it.
//!
//! - [`config`]: `passerelle.toml`, read with the `config` crate (the file, then
//!   environment overrides `PASSERELLE__SECTION__KEY`), validated.
//! - [`routes`]: `routes.d/*.toml`, one route per file, read in file-name order; the first
//!   route that matches a message wins; a route marked `default = true` takes what no
//!   other route wants (and there may be only one).
//!
//! Invariant: every problem in these files is reported with the file, the line and column
//! and the field, all of them at once, never just the first; nothing is half-loaded.

pub mod config;
mod location;
pub mod pipeline;
pub mod routes;

pub use location::{ConfigError, ConfigErrors};

/// The mapping packs in `mappings_dir`: its folders that hold a `pack.toml`, by name.
pub fn known_packs(mappings_dir: &std::path::Path) -> Vec<String> {
    let mut packs: Vec<String> = std::fs::read_dir(mappings_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("pack.toml").is_file())
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    packs.sort();
    packs
}

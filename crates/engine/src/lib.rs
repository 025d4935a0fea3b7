//! # passerelle-engine: configuration, routes, the pipeline and its operation
//!
//! Its job: turn the operator's files into a checked, typed description of what the
//! engine runs, and run it: from the listener's frame to the destinations, with the admin
//! API and the operations an operator needs.
//!
//! - [`config`]: `passerelle.toml`, read with the `config` crate (the file, then
//!   environment overrides `PASSERELLE__SECTION__KEY`), validated.
//! - [`routes`]: `routes.d/*.toml`, one route per file, read in file-name order; the first
//!   route that matches a message wins; a route marked `default = true` takes what no
//!   other route wants (and there may be only one).
//! - [`pipeline`]: journal (ACK after flush) → route → map → outboxes → delivery workers;
//!   [`duplicates`]: a sender's resend is kept but not routed.
//! - [`ops`] (list, show, replay, resubmit, purge, over the store or the admin API), [`admin`] (the
//!   HTTP API) and [`metrics`] (Prometheus, no patient data in labels).
//!
//! Invariant: every problem in the operator's files is reported with the file, the line
//! and column and the field, all of them at once, never just the first; nothing is
//! half-loaded.

pub mod admin;
pub mod config;
pub use config::StoreBackend;
pub mod duplicates;
mod location;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod routes;

pub use location::{ConfigError, ConfigErrors};

/// The wall clock in milliseconds since the Unix epoch, as the store records times.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The mapping packs in `mappings_dir`: its folders that hold a `pack.toml`, by name.
pub fn known_packs(mappings_dir: &std::path::Path) -> Vec<String> {
    passerelle_mapping::packs_in(mappings_dir)
}

/// Everything `passerelle.toml` points to, loaded and checked.
#[derive(Debug)]
pub struct Loaded {
    pub config: config::EngineConfig,
    pub routes: routes::RouteTable,
    /// The mapping packs the routes use, by name.
    pub packs: std::collections::HashMap<String, passerelle_mapping::Pack>,
}

impl Loaded {
    /// Loads the configuration, the routes and their mapping packs, and checks each
    /// destination's settings. The error lists every problem, one per line
    /// (`file:line:column: field: problem`): those of passerelle.toml, of every route
    /// file and of every pack the sound routes use, all in one run.
    pub fn load(path: &std::path::Path) -> Result<Loaded, Vec<String>> {
        Self::load_checking(path, false)
    }

    /// As [`load`](Self::load), and also tries on this machine what destinations will
    /// need ([`passerelle_delivery::Destination::probe`]: an NDJSON folder can be
    /// written): `passerelle check`.
    pub fn check(path: &std::path::Path) -> Result<Loaded, Vec<String>> {
        Self::load_checking(path, true)
    }

    fn load_checking(path: &std::path::Path, probe: bool) -> Result<Loaded, Vec<String>> {
        let (config, config_errors) = config::EngineConfig::load_lenient(Some(path), None);
        let mut problems: Vec<String> = config_errors.iter().map(ToString::to_string).collect();
        let Some(config) = config else {
            return Err(problems);
        };
        // With `[paths]` wrong, the folders read would not be the ones meant.
        let paths_wrong = config_errors
            .iter()
            .any(|e| e.field.as_deref().is_some_and(|f| f.starts_with("paths.")));
        if paths_wrong {
            return Err(problems);
        }
        let available = known_packs(&config.paths.mappings);
        let listeners = config.listener_names();
        let context = routes::RouteContext {
            known_packs: &available,
            known_listeners: &listeners,
            base_dir: Some(path.parent().unwrap_or(std::path::Path::new(""))),
            probe,
        };
        let (routes, route_errors) =
            routes::RouteTable::load_partial(&config.paths.routes, &context);
        problems.extend(route_errors.iter().map(ToString::to_string));
        let mut packs = std::collections::HashMap::new();
        for route in &routes {
            if !packs.contains_key(&route.mapping) {
                match passerelle_mapping::Pack::load(config.paths.mappings.join(&route.mapping)) {
                    Ok(pack) => {
                        packs.insert(route.mapping.clone(), pack);
                    }
                    Err(errors) => problems.extend(errors.to_string().lines().map(str::to_owned)),
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Loaded {
            config,
            routes: routes::RouteTable { routes },
            packs,
        })
    }
}

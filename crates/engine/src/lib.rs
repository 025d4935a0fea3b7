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

pub mod admin;
pub mod config;
mod location;
pub mod metrics;
pub mod ops;
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

/// Everything `passerelle.toml` points to, loaded and checked.
#[derive(Debug)]
pub struct Loaded {
    pub config: config::EngineConfig,
    pub routes: routes::RouteTable,
    /// The mapping packs the routes use, by name.
    pub packs: std::collections::HashMap<String, passerelle_mapping::Pack>,
}

impl Loaded {
    /// Loads the configuration, the routes and their mapping packs. The error lists every
    /// problem, one per line (`file:line:column: field: problem`).
    pub fn load(path: &std::path::Path) -> Result<Loaded, Vec<String>> {
        let config = config::EngineConfig::load(Some(path))
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let available = known_packs(&config.paths.mappings);
        let routes =
            routes::RouteTable::load(&config.paths.routes, &available, &config.listener_names())
                .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let mut packs = std::collections::HashMap::new();
        for route in &routes.routes {
            if !packs.contains_key(&route.mapping) {
                let pack =
                    passerelle_mapping::Pack::load(config.paths.mappings.join(&route.mapping))
                        .map_err(|errors| vec![errors.to_string()])?;
                packs.insert(route.mapping.clone(), pack);
            }
        }
        Ok(Loaded {
            config,
            routes,
            packs,
        })
    }

    /// Opens the store the configuration names.
    pub fn open_store(&self) -> Result<passerelle_store::SledStore, passerelle_store::StoreError> {
        let s = &self.config.store;
        let mut store_config = passerelle_store::StoreConfig::new(&s.path);
        store_config.cache_capacity = s.cache_capacity_mb * 1024 * 1024;
        store_config.flush_every = std::time::Duration::from_millis(s.flush_every_ms);
        store_config.visibility_timeout = std::time::Duration::from_secs(s.visibility_timeout_s);
        passerelle_store::SledStore::open(store_config)
    }
}

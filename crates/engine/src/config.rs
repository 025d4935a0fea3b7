//! `passerelle.toml`: the engine's own settings.
//!
//! Read with the `config` crate: the file first, then environment variables
//! `PASSERELLE__SECTION__KEY` (for example `PASSERELLE__STORE__PATH=/var/lib/passerelle`,
//! `PASSERELLE__ADMIN__BIND=0.0.0.0:8025`), so that containers need no file edits. Every
//! section is optional: with no file at all, the defaults start one listener on
//! 127.0.0.1:2575, a store in `./data` and the admin API on 127.0.0.1:8025.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::location::{ConfigError, ConfigErrors, SourceFile, Step};

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `sled` (embedded, one node: the default) or `postgres` (a database several nodes
    /// share).
    pub backend: String,
    /// The sled store's folder.
    pub path: PathBuf,
    /// The PostgreSQL connection string (`postgres://user@host:5432/db`, or
    /// `host=/run/postgresql dbname=passerelle`), for `backend = "postgres"`. Better given
    /// by `PASSERELLE__STORE__URL` than written in the file when it holds a password
    /// (`PGPASSWORD` is also read).
    pub url: String,
    /// PostgreSQL connections per node.
    pub pool_size: usize,
    /// How long a PostgreSQL store operation may take, connecting included, before it
    /// fails (and a frame being journaled gets AE): the bound on a sender's wait when the
    /// database cannot be reached.
    pub op_timeout_s: u64,
    /// TLS to PostgreSQL, as libpq's `sslmode`: `disable`, `prefer`, `require`,
    /// `verify-ca` or `verify-full` (empty: the connection string's `sslmode`, else
    /// `prefer`). Only `verify-full` proves the server is the one named.
    pub tls: String,
    /// PEM CA certificates that sign the server's certificate (`sslrootcert`); without
    /// it, the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that authenticate passerelle by certificate.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// sled's page cache, which bounds memory.
    pub cache_capacity_mb: u64,
    pub flush_every_ms: u64,
    /// How long a delivery lease lasts before another worker may take it.
    pub visibility_timeout_s: u64,
    /// Delivered messages are deleted after this many days.
    pub retention_days: u64,
    /// Backpressure (`[defaults] backpressure`) once a destination queue holds this many
    /// unfinished deliveries (0: no limit).
    pub max_queue_depth: u64,
    /// Backpressure once the store takes more than this on disk (0: no limit).
    pub max_disk_mb: u64,
}

/// By hand, so that a connection string's password never reaches a log.
impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &if self.url.is_empty() { "" } else { "(hidden)" })
            .field("pool_size", &self.pool_size)
            .field("op_timeout_s", &self.op_timeout_s)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("cache_capacity_mb", &self.cache_capacity_mb)
            .field("flush_every_ms", &self.flush_every_ms)
            .field("visibility_timeout_s", &self.visibility_timeout_s)
            .field("retention_days", &self.retention_days)
            .field("max_queue_depth", &self.max_queue_depth)
            .field("max_disk_mb", &self.max_disk_mb)
            .finish()
    }
}

impl StoreSection {
    /// The PostgreSQL store's settings from this section (`backend = "postgres"`).
    pub fn pg_config(&self) -> passerelle_store::PgConfig {
        let mut c = passerelle_store::PgConfig::new(self.url.clone());
        c.pool_size = self.pool_size;
        c.op_timeout = std::time::Duration::from_secs(self.op_timeout_s);
        c.visibility_timeout = std::time::Duration::from_secs(self.visibility_timeout_s);
        c.tls = passerelle_store::PgTls {
            mode: passerelle_store::PgTlsMode::parse(&self.tls),
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        };
        c
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            backend: "sled".into(),
            path: PathBuf::from("./data"),
            url: String::new(),
            pool_size: 16,
            op_timeout_s: 10,
            tls: String::new(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            cache_capacity_mb: 64,
            flush_every_ms: 500,
            visibility_timeout_s: 120,
            retention_days: 30,
            max_queue_depth: 1_000_000,
            max_disk_mb: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client CA: when set, clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Accepted client certificate subjects or SANs (empty: any the CA signed).
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: String,
    pub bind: String,
    /// Source addresses allowed to connect, as CIDR blocks (empty: everyone).
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    #[serde(default = "defaults::idle_timeout_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
    pub tls: Option<TlsSection>,
}

mod defaults {
    pub(super) fn max_connections() -> usize {
        1_000
    }
    pub(super) fn max_connections_per_ip() -> usize {
        100
    }
    pub(super) fn idle_timeout_s() -> u64 {
        600
    }
    pub(super) fn max_frame_bytes() -> usize {
        16 * 1024 * 1024
    }
    pub(super) fn listeners() -> Vec<super::ListenerSection> {
        vec![super::ListenerSection {
            name: "main".into(),
            bind: "127.0.0.1:2575".into(),
            allow: Vec::new(),
            max_connections: max_connections(),
            max_connections_per_ip: max_connections_per_ip(),
            idle_timeout_s: idle_timeout_s(),
            max_frame_bytes: max_frame_bytes(),
            tls: None,
        }]
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub bind: String,
    /// The environment variable holding the API token (never the token itself in a file).
    pub token_env: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            bind: "127.0.0.1:8025".into(),
            token_env: "PASSERELLE_ADMIN_TOKEN".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// `text` or `json`.
    pub format: String,
    /// `trace`, `debug`, `info`, `warn`, `error` or `off`: passerelle's own level, other
    /// libraries staying at `warn` (their debug output would drown it); or a filter of
    /// `target=level` and `level` items separated by commas, taken as written
    /// (`info,passerelle_store=debug`).
    pub level: String,
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl LoggingSection {
    /// The tracing filter `level` stands for; `None` when it is not one (see `level`).
    pub fn filter(&self) -> Option<String> {
        let level = self.level.trim();
        if LEVELS.contains(&level) {
            return Some(match level {
                "trace" | "debug" | "info" => format!("warn,passerelle={level}"),
                quieter => quieter.to_owned(),
            });
        }
        let item_ok = |item: &str| match item.split_once('=') {
            Some((target, level)) => {
                !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && LEVELS.contains(&level)
            }
            None => LEVELS.contains(&item),
        };
        (level.contains('=') && level.split(',').map(str::trim).all(item_ok))
            .then(|| level.to_owned())
    }
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsSection {
    pub routes: PathBuf,
    pub mappings: PathBuf,
}

impl Default for PathsSection {
    fn default() -> Self {
        PathsSection {
            routes: PathBuf::from("routes.d"),
            mappings: PathBuf::from("mappings"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsSection {
    /// The site's UTC offset in minutes, for timestamps sent without one.
    pub site_utc_offset_minutes: i16,
    /// How to answer a message no route wants: `accept` (AA, kept as unrouted), `error`
    /// (AE) or `reject` (AR). It is journaled as unrouted in every case.
    pub unrouted: String,
    /// When the store or a queue is full: `stop-reading` (TCP backpressure) or `error` (AE).
    pub backpressure: String,
    /// How far back a resend is recognised as the same message (see
    /// [`crate::duplicates`]), in seconds; 0 turns the check off.
    pub duplicate_window_s: u64,
}

impl Default for DefaultsSection {
    fn default() -> Self {
        DefaultsSection {
            site_utc_offset_minutes: 60,
            unrouted: "accept".into(),
            backpressure: "stop-reading".into(),
            duplicate_window_s: 600,
        }
    }
}

/// The whole of `passerelle.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default = "defaults::listeners")]
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub paths: PathsSection,
    #[serde(default)]
    pub defaults: DefaultsSection,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            store: StoreSection::default(),
            listeners: defaults::listeners(),
            admin: AdminSection::default(),
            logging: LoggingSection::default(),
            paths: PathsSection::default(),
            defaults: DefaultsSection::default(),
        }
    }
}

impl EngineConfig {
    /// Loads `path` (absent: the defaults) with environment overrides, and checks it.
    /// Relative paths in the file are resolved against the file's folder.
    pub fn load(path: Option<&Path>) -> Result<EngineConfig, ConfigErrors> {
        Self::load_with_env(path, None)
    }

    /// As [`load`](Self::load), with `env` in place of the process environment (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<EngineConfig, ConfigErrors> {
        match Self::load_lenient(path, env) {
            (Some(config), errors) if errors.is_empty() => Ok(config),
            (_, errors) => Err(ConfigErrors(errors)),
        }
    }

    /// Loads as [`load_with_env`](Self::load_with_env), but goes as far as it can: the
    /// configuration read with every value of the wrong type left at its default (`None`
    /// when the file cannot be read even so), and every problem found, type errors and
    /// checks alike, in file order. With it, the routes can be checked too in the same run.
    pub(crate) fn load_lenient(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> (Option<EngineConfig>, Vec<ConfigError>) {
        let source = match path {
            Some(p) => match SourceFile::read(p) {
                Ok(source) => Some(source),
                Err(e) => return (None, vec![e]),
            },
            None => None,
        };
        // Syntax and types first, from the file alone, so that errors have a line.
        let mut errors = Vec::new();
        let mut text = None;
        if let Some(src) = &source {
            let lenient = src.parse_lenient::<EngineConfig>();
            errors = lenient.errors;
            if lenient.value.is_none() {
                return (None, errors);
            }
            text = Some(lenient.text);
        }
        let mut builder = config::Config::builder();
        if let Some(text) = &text {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        // The variables that override the file, so that a problem in their value is
        // reported as theirs and not at the line of the file they override.
        let overridden: std::collections::HashSet<String> = match &env {
            Some(m) => m.keys().cloned().collect(),
            None => std::env::vars().map(|(k, _)| k).collect(),
        };
        builder = builder.add_source(
            config::Environment::with_prefix("PASSERELLE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(env.map(|m| m.into_iter().collect())),
        );
        let merged = builder
            .build()
            .and_then(config::Config::try_deserialize::<EngineConfig>);
        let mut config = match merged {
            Ok(config) => config,
            Err(e) => {
                errors.push(ConfigError {
                    file: PathBuf::from("environment"),
                    line: 0,
                    column: 0,
                    field: None,
                    message: e.to_string(),
                });
                return (None, errors);
            }
        };
        if let Some(dir) = path.and_then(Path::parent) {
            for p in [
                &mut config.store.path,
                &mut config.paths.routes,
                &mut config.paths.mappings,
            ]
            .into_iter()
            .chain(
                [
                    &mut config.store.tls_ca_file,
                    &mut config.store.tls_cert_file,
                    &mut config.store.tls_key_file,
                ]
                .into_iter()
                .flatten(),
            ) {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        if let Err(ConfigErrors(mut more)) = config.check(source.as_ref(), &overridden) {
            errors.append(&mut more);
        }
        // One list in file order, whichever pass found each problem.
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        (Some(config), errors)
    }

    /// `overridden`: the environment variables set, `PASSERELLE__SECTION__KEY` among them.
    fn check(
        &self,
        src: Option<&SourceFile>,
        overridden: &std::collections::HashSet<String>,
    ) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut report = |path: &[Step<'_>], field: &str, message: String| {
            let variable = format!("PASSERELLE__{}", field.to_uppercase().replace('.', "__"));
            if overridden.contains(&variable) {
                errors.push(ConfigError {
                    file: PathBuf::from(variable),
                    line: 0,
                    column: 0,
                    field: Some(field.to_owned()),
                    message,
                });
                return;
            }
            errors.push(match src {
                Some(s) => s.error_at(s.locate(path), Some(field), message),
                None => ConfigError {
                    file: PathBuf::from("(defaults and environment)"),
                    line: 1,
                    column: 1,
                    field: Some(field.to_owned()),
                    message,
                },
            });
        };
        if self.listeners.is_empty() {
            report(
                &[Step::Key("listeners")],
                "listeners",
                "at least one listener is needed".into(),
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |k: &'static str| [Step::Key("listeners"), Step::Index(i), Step::Key(k)];
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                report(
                    &at("name"),
                    "listeners.name",
                    format!("listener {:?} is defined twice", l.name),
                );
            }
            if l.name == crate::ops::RESUBMIT_LISTENER {
                report(
                    &at("name"),
                    "listeners.name",
                    format!(
                        "the listener name {:?} is reserved: operators' resubmissions are \
                         recorded under it",
                        l.name
                    ),
                );
            }
            if l.bind.parse::<SocketAddr>().is_err() {
                report(
                    &at("bind"),
                    "listeners.bind",
                    format!("{:?} is not an address:port", l.bind),
                );
            }
            for (j, block) in l.allow.iter().enumerate() {
                if block.parse::<passerelle_mllp::Cidr>().is_err() {
                    report(
                        &[
                            Step::Key("listeners"),
                            Step::Index(i),
                            Step::Key("allow"),
                            Step::Index(j),
                        ],
                        "listeners.allow",
                        format!("{block:?} is not an address or CIDR block"),
                    );
                }
            }
            if l.max_connections == 0 || l.max_connections_per_ip == 0 {
                report(
                    &at("max_connections"),
                    "listeners.max_connections",
                    "connection limits must be at least 1".into(),
                );
            }
            if l.idle_timeout_s == 0 {
                report(
                    &at("idle_timeout_s"),
                    "listeners.idle_timeout_s",
                    "0 would close every connection after each ACK: at least 1 second".into(),
                );
            }
            if l.max_frame_bytes < 1024 {
                report(
                    &at("max_frame_bytes"),
                    "listeners.max_frame_bytes",
                    "below 1 KiB no HL7 message fits".into(),
                );
            }
        }
        if self.admin.bind.parse::<SocketAddr>().is_err() {
            report(
                &[Step::Key("admin"), Step::Key("bind")],
                "admin.bind",
                format!("{:?} is not an address:port", self.admin.bind),
            );
        }
        if self.logging.filter().is_none() {
            report(
                &[Step::Key("logging"), Step::Key("level")],
                "logging.level",
                format!(
                    "{:?}: expected one of {} (passerelle's level), or target=level items \
                     separated by commas",
                    self.logging.level,
                    LEVELS.join(", ")
                ),
            );
        }
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            report(
                &[Step::Key("logging"), Step::Key("format")],
                "logging.format",
                "must be \"text\" or \"json\"".into(),
            );
        }
        if !matches!(
            self.defaults.unrouted.as_str(),
            "accept" | "error" | "reject"
        ) {
            report(
                &[Step::Key("defaults"), Step::Key("unrouted")],
                "defaults.unrouted",
                "must be \"accept\", \"error\" or \"reject\"".into(),
            );
        }
        if !matches!(
            self.defaults.backpressure.as_str(),
            "stop-reading" | "error"
        ) {
            report(
                &[Step::Key("defaults"), Step::Key("backpressure")],
                "defaults.backpressure",
                "must be \"stop-reading\" or \"error\"".into(),
            );
        }
        if self.defaults.site_utc_offset_minutes.unsigned_abs() > 14 * 60 {
            report(
                &[Step::Key("defaults"), Step::Key("site_utc_offset_minutes")],
                "defaults.site_utc_offset_minutes",
                "must be within ±840 minutes".into(),
            );
        }
        match self.store.backend.as_str() {
            "sled" => {}
            "postgres" => {
                if let Err(e) = passerelle_store::PgConfig::check_url(&self.store.url) {
                    report(
                        &[Step::Key("store"), Step::Key("url")],
                        "store.url",
                        format!(
                            "{e} (set it, or PASSERELLE__STORE__URL, for the postgres backend)"
                        ),
                    );
                }
                if self.store.pool_size == 0 {
                    report(
                        &[Step::Key("store"), Step::Key("pool_size")],
                        "store.pool_size",
                        "must be at least 1".into(),
                    );
                }
                if self.store.op_timeout_s == 0 {
                    report(
                        &[Step::Key("store"), Step::Key("op_timeout_s")],
                        "store.op_timeout_s",
                        "must be at least 1".into(),
                    );
                }
                let known_mode = self.store.tls.is_empty()
                    || passerelle_store::PgTlsMode::parse(&self.store.tls).is_some();
                if !known_mode {
                    report(
                        &[Step::Key("store"), Step::Key("tls")],
                        "store.tls",
                        format!(
                            "{:?} is not a TLS mode: \"disable\", \"prefer\", \"require\", \
                             \"verify-ca\" or \"verify-full\"",
                            self.store.tls
                        ),
                    );
                } else if passerelle_store::PgConfig::check_url(&self.store.url).is_ok() {
                    // Reads the CA, certificate and key files, as start-up will.
                    if let Err(e) = self.store.pg_config().check_tls() {
                        let field = e.field;
                        report(
                            &[Step::Key("store"), Step::Key(field)],
                            &format!("store.{field}"),
                            e.message,
                        );
                    }
                }
            }
            other => report(
                &[Step::Key("store"), Step::Key("backend")],
                "store.backend",
                format!("{other:?} is not a store backend: \"sled\" or \"postgres\""),
            ),
        }
        if self.store.cache_capacity_mb == 0 {
            report(
                &[Step::Key("store"), Step::Key("cache_capacity_mb")],
                "store.cache_capacity_mb",
                "must be at least 1".into(),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The names of the listeners, for route checks.
    pub fn listener_names(&self) -> Vec<String> {
        self.listeners.iter().map(|l| l.name.clone()).collect()
    }
}

/// The store backends `[store] backend` names. The engine is generic over
/// [`passerelle_store::Store`]; the binary opens the one named and runs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    /// The embedded sled store (one node).
    Sled,
    /// A PostgreSQL database that several nodes share.
    Postgres,
}

/// The store alone needs only `passerelle.toml`: operations on stored messages work while
/// a route file is being edited (see `passerelle messages`).
impl EngineConfig {
    /// Which store the configuration names (`[store] backend`, checked on load).
    pub fn store_backend(&self) -> StoreBackend {
        match self.store.backend.as_str() {
            "postgres" => StoreBackend::Postgres,
            _ => StoreBackend::Sled,
        }
    }

    /// Where the store is, for messages: the sled folder, or the PostgreSQL server and
    /// database (never the user or password).
    pub fn store_location(&self) -> String {
        match self.store_backend() {
            StoreBackend::Sled => self.store.path.display().to_string(),
            StoreBackend::Postgres => {
                format!(
                    "PostgreSQL ({})",
                    passerelle_store::PgConfig::describe_url(&self.store.url)
                )
            }
        }
    }

    /// Opens the PostgreSQL store the configuration names (`backend = "postgres"`).
    pub async fn open_pg_store(
        &self,
    ) -> Result<passerelle_store::PgStore, passerelle_store::StoreError> {
        passerelle_store::PgStore::open(self.store.pg_config()).await
    }

    /// Opens the sled store the configuration names (`backend = "sled"`, the default).
    pub fn open_store(&self) -> Result<passerelle_store::SledStore, passerelle_store::StoreError> {
        let s = &self.store;
        let mut store_config = passerelle_store::StoreConfig::new(&s.path);
        store_config.cache_capacity = s.cache_capacity_mb * 1024 * 1024;
        store_config.flush_every = std::time::Duration::from_millis(s.flush_every_ms);
        store_config.visibility_timeout = std::time::Duration::from_secs(s.visibility_timeout_s);
        passerelle_store::SledStore::open(store_config)
    }
}

//! Routes: which messages go where, and how.
//!
//! One route per file in `routes.d/`, read in file-name order (name them `10-adt.toml`,
//! `20-lab.toml`… to order them). A message takes the first route whose `[match]` it
//! satisfies; a route with `default = true` takes what no other route wants.
//!
//! ```toml
//! name = "adt"
//! mapping = "v2-to-fhir"                      # a pack in mappings/
//! listeners = ["main"]                        # optional: all listeners
//! ordering_key = ["MSH-4.1", "PID-3[1].1", "PID-3[1].4.1"]   # optional: the default
//! # A part can also name the patient identifier of one type, wherever it is among the
//! # repetitions (PAM FR: the IPP, whether or not the INS comes first):
//! # ordering_key = ["MSH-4.1", { identifier = "PID-3", type = "PI" }]
//!
//! [match]                                     # each: a value, a glob (* ?), or a list
//! message_type = "ADT"
//! trigger_event = ["A01", "A04", "A08"]
//! sending_facility = "CHU_*"
//! version = "2.5*"                            # MSH-12.1
//! internationalization_code = "FRA"           # MSH-12.2 (PAM FR sends 2.5^FRA^2.11)
//! profile = "*IHE_FRANCE-2.11-PAM*"           # MSH-21, any repetition, whole
//!
//! [[destinations]]
//! name = "fhir"
//! type = "fhir"                               # fhir | mllp | ndjson
//! url = "https://fhir.example/r4"
//! concurrency = 16                            # optional: deliveries at once, distinct keys
//!                                             # (default 16; 128 for ndjson, 1 for mllp)
//! [destinations.retry]                        # optional: the defaults below
//! initial_backoff_ms = 1000
//! max_backoff_ms = 300000
//! multiplier = 2.0
//! jitter = 0.2
//! max_attempts = 20
//! max_age_hours = 24
//! dead_holds_key = false                      # true: once dead, a delivery stops its key's
//!                                             # later ones until replayed or purged
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use passerelle_hl7::{HeaderSummary, Message, Path as Hl7Path, Selector};
use passerelle_store::RetryPolicy;
use serde::Deserialize;

use crate::location::{ConfigError, ConfigErrors, SourceFile, Step};

/// The fields a route can match on.
pub const MATCH_FIELDS: [&str; 9] = [
    "sending_application",
    "sending_facility",
    "receiving_application",
    "receiving_facility",
    "message_type",
    "trigger_event",
    "version",
    "internationalization_code",
    "profile",
];

/// The default ordering key: the sending facility and the first patient identifier
/// (its value and its assigning authority), so that one patient's messages from one
/// facility stay in order.
pub const DEFAULT_ORDERING_KEY: [&str; 3] = ["MSH-4.1", "PID-3[1].1", "PID-3[1].4.1"];

/// The kinds of destination.
pub const DESTINATION_TYPES: [&str; 3] = ["fhir", "mllp", "ndjson"];

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    max_attempts: Option<u32>,
    max_age_hours: Option<u64>,
    dead_holds_key: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DestinationFile {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    retry: Option<RetryFile>,
    concurrency: Option<i64>,
    #[serde(flatten)]
    settings: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: String,
    mapping: String,
    #[serde(default)]
    listeners: Vec<String>,
    ordering_key: Option<Vec<KeyPartFile>>,
    #[serde(default)]
    default: bool,
    #[serde(default, rename = "match")]
    matches: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    destinations: Vec<DestinationFile>,
}

/// One part of an ordering key as written: a path, or an identifier of one type.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeyPartFile {
    Path(String),
    Identifier(IdentifierOfTypeFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifierOfTypeFile {
    identifier: String,
    #[serde(rename = "type")]
    kind: String,
}

/// One part of a message's ordering key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyPart {
    /// The text of the value a path selects.
    Path(Hl7Path),
    /// The first repetition of a CX field whose identifier type (CX-5) is `kind`, as its
    /// value and assigning authority (`CX-1^CX-4.1`); empty when no repetition has that
    /// type. A sender may list a patient's identifiers in any order (a PAM FR feed puts
    /// the INS first once the identity is qualified): a part by type keeps one key for
    /// one patient where `PID-3[1]` would change with the order.
    IdentifierOfType { field: Hl7Path, kind: String },
}

impl KeyPart {
    fn text(&self, message: &Message<'_>) -> String {
        match self {
            KeyPart::Path(p) => message
                .get(p)
                .map(|v| v.text().into_owned())
                .unwrap_or_default(),
            KeyPart::IdentifierOfType { field, kind } => message
                .iter(field)
                .find(|cx| cx.component(5).is_some_and(|t| t.text().trim() == kind))
                .map(|cx| {
                    let part = |n: usize| {
                        cx.component(n)
                            .map(|c| c.first_leaf().text().into_owned())
                            .unwrap_or_default()
                    };
                    format!("{}^{}", part(1), part(4))
                })
                .unwrap_or_default(),
        }
    }
}

/// A glob over one MSH field: `*` any run, `?` any one character; case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn matches(&self, text: &str) -> bool {
        fn go(p: &[char], t: &[char]) -> bool {
            match (p.first(), t.first()) {
                (None, None) => true,
                (Some('*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
                (Some('?'), Some(_)) => go(&p[1..], &t[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
                _ => false,
            }
        }
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        go(&p, &t)
    }
}

/// Deliveries under way at once per FHIR destination, unless a route says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Deliveries under way at once per NDJSON destination, unless a route says otherwise.
/// Attempts under way together share one write and one sync per file, so more of them at
/// once cost fewer syncs per message: measured with 64 senders on 2 cores, 16 delivered
/// about a fifth of what was acknowledged, 128 about nine tenths.
pub const DEFAULT_NDJSON_CONCURRENCY: usize = 128;

/// Where a route sends its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub name: String,
    pub kind: String,
    pub retry: RetryPolicy,
    /// How many deliveries (of distinct ordering keys) may be under way at once.
    pub concurrency: usize,
    /// The type-specific settings (`url`, `dir`, `peer`…), checked by the delivery side.
    pub settings: toml::Table,
}

/// A checked route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub file: PathBuf,
    pub mapping: String,
    /// Empty: every listener.
    pub listeners: Vec<String>,
    pub ordering_key: Vec<KeyPart>,
    pub is_default: bool,
    /// Field name → accepted globs (any of them).
    pub matches: BTreeMap<String, Vec<Glob>>,
    pub destinations: Vec<Destination>,
}

fn field_of<'a>(header: &'a HeaderSummary, field: &str) -> &'a str {
    match field {
        "sending_application" => &header.sending_application,
        "sending_facility" => &header.sending_facility,
        "receiving_application" => &header.receiving_application,
        "receiving_facility" => &header.receiving_facility,
        "message_type" => &header.message_type,
        "trigger_event" => &header.trigger_event,
        "internationalization_code" => &header.version_internationalization,
        _ => &header.version,
    }
}

/// The values a route's globs for `field` are tried against: each repetition of MSH-21,
/// whole (`2.11^IHE_FRANCE-2.11-PAM`); for every other field, its first component.
fn candidates(header: &HeaderSummary, field: &str) -> Vec<String> {
    if field == "profile" {
        header
            .profiles
            .split(header.separators.repetition as char)
            .map(str::to_owned)
            .collect()
    } else {
        vec![first_component(field_of(header, field), &header.separators)]
    }
}

/// HD fields (MSH-3..6) match on their first component, the namespace id.
fn first_component(value: &str, separators: &passerelle_hl7::Separators) -> String {
    value
        .split(separators.component as char)
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Route {
    /// Whether this route takes a message with this header, arriving on `listener`.
    pub fn accepts(&self, header: &HeaderSummary, listener: &str) -> bool {
        if !self.listeners.is_empty() && !self.listeners.iter().any(|l| l == listener) {
            return false;
        }
        self.matches.iter().all(|(field, globs)| {
            candidates(header, field)
                .iter()
                .any(|value| globs.iter().any(|g| g.matches(value)))
        })
    }

    /// The ordering key of a message: the key paths' values joined with `|`.
    pub fn ordering_key(&self, message: &Message<'_>) -> String {
        let parts: Vec<String> = self.ordering_key.iter().map(|p| p.text(message)).collect();
        parts.join("|")
    }
}

/// All routes, in file-name order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    pub routes: Vec<Route>,
}

impl RouteTable {
    /// The route for a message: the first that matches, else the default one.
    pub fn select(&self, header: &HeaderSummary, listener: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| !r.is_default && r.accepts(header, listener))
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.is_default && r.accepts(header, listener))
            })
    }

    /// Loads every `*.toml` of `dir`. `known_packs` and `known_listeners` are the names a
    /// route may refer to. Reports every problem of every file. Destination settings are
    /// left to the delivery side (see [`load_in`](Self::load_in) to check them here).
    pub fn load(
        dir: &Path,
        known_packs: &[String],
        known_listeners: &[String],
    ) -> Result<RouteTable, ConfigErrors> {
        Self::load_in(
            dir,
            &RouteContext {
                known_packs,
                known_listeners,
                base_dir: None,
                probe: false,
            },
        )
    }

    /// Loads every `*.toml` of `dir` in `context`, reporting every problem of every file.
    pub fn load_in(dir: &Path, context: &RouteContext<'_>) -> Result<RouteTable, ConfigErrors> {
        let (routes, errors) = Self::load_partial(dir, context);
        if errors.is_empty() {
            Ok(RouteTable { routes })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The routes of `dir` that have no problem, and every problem found (those of the
    /// other routes, and those across files): what is sound can still be checked further
    /// (its mapping pack) in the same run.
    pub(crate) fn load_partial(
        dir: &Path,
        context: &RouteContext<'_>,
    ) -> (Vec<Route>, Vec<ConfigError>) {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect(),
            Err(e) => {
                let error = ConfigError {
                    file: dir.to_path_buf(),
                    line: 1,
                    column: 1,
                    field: None,
                    message: format!("cannot read the routes folder: {e}"),
                };
                return (Vec::new(), vec![error]);
            }
        };
        files.sort();
        let mut errors = Vec::new();
        let mut routes = Vec::new();
        for path in &files {
            match load_route(path, context) {
                Ok(route) => routes.push(route),
                Err(mut e) => errors.append(&mut e),
            }
        }
        // Across files: unique names, at most one default.
        let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
        for r in &routes {
            if let Some(first) = seen.insert(&r.name, &r.file) {
                errors.push(ConfigError {
                    file: r.file.clone(),
                    line: 1,
                    column: 1,
                    field: Some("name".into()),
                    message: format!("route {:?} is also defined in {}", r.name, first.display()),
                });
            }
        }
        let defaults: Vec<&Route> = routes.iter().filter(|r| r.is_default).collect();
        if defaults.len() > 1 {
            for r in &defaults[1..] {
                errors.push(ConfigError {
                    file: r.file.clone(),
                    line: 1,
                    column: 1,
                    field: Some("default".into()),
                    message: format!(
                        "a second default route (the first is {:?})",
                        defaults[0].name
                    ),
                });
            }
        }
        if routes.is_empty() && errors.is_empty() {
            errors.push(ConfigError {
                file: dir.to_path_buf(),
                line: 1,
                column: 1,
                field: None,
                message: "no route: every message would be unrouted".into(),
            });
        }
        (routes, errors)
    }
}

/// What routes are checked against, beyond their own files.
#[derive(Debug, Clone, Copy)]
pub struct RouteContext<'a> {
    /// The mapping packs a route may name.
    pub known_packs: &'a [String],
    /// The listeners a route may name.
    pub known_listeners: &'a [String],
    /// The folder destinations' relative paths start from (passerelle.toml's): each
    /// destination's settings are then checked as the delivery side reads them, each
    /// problem located at its key. `None`: settings are not checked here.
    pub base_dir: Option<&'a Path>,
    /// Also try, on this machine, what a destination will need at its first delivery
    /// (an NDJSON folder that can be written): `passerelle check`. Needs `base_dir`.
    pub probe: bool,
}

/// What a route or destination name may hold. The two name a queue together,
/// `route.destination` (in the store, the metrics and `--dest`), so neither may hold the
/// dot: `a.b` + `c` and `a` + `b.c` would be one queue.
const NAME_RULE: &str = "{what} needs a name, without '.', '/' or spaces";

fn is_queue_part(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c == '.' || c == '/' || c.is_whitespace() || c.is_control())
}

fn load_route(path: &Path, context: &RouteContext<'_>) -> Result<Route, Vec<ConfigError>> {
    let known_packs = context.known_packs;
    let known_listeners = context.known_listeners;
    let src = SourceFile::read(path).map_err(|e| vec![e])?;
    // A value of the wrong type does not hide the file's other mistakes: they are checked
    // on what could be read, the wrong value left at its default.
    let lenient = src.parse_lenient::<RouteFile>();
    let mut errors = lenient.errors;
    let Some(file) = lenient.value else {
        return Err(errors);
    };
    let at = |path: &[Step<'_>], field: &str, message: String| {
        src.error_at(src.locate(path), Some(field), message)
    };

    if !is_queue_part(&file.name) {
        errors.push(at(
            &[Step::Key("name")],
            "name",
            NAME_RULE.replace("{what}", "a route"),
        ));
    }
    if !known_packs.contains(&file.mapping) {
        errors.push(at(
            &[Step::Key("mapping")],
            "mapping",
            format!(
                "no mapping pack {:?} (known: {})",
                file.mapping,
                known_packs.join(", ")
            ),
        ));
    }
    for (i, l) in file.listeners.iter().enumerate() {
        if !known_listeners.iter().any(|k| k == l) {
            errors.push(at(
                &[Step::Key("listeners"), Step::Index(i)],
                "listeners",
                format!(
                    "no listener {l:?} in passerelle.toml (known: {})",
                    known_listeners.join(", ")
                ),
            ));
        }
    }
    let key_parts = file.ordering_key.unwrap_or_else(|| {
        DEFAULT_ORDERING_KEY
            .iter()
            .map(|s| KeyPartFile::Path((*s).to_owned()))
            .collect()
    });
    let mut ordering_key = Vec::new();
    for (i, part) in key_parts.into_iter().enumerate() {
        let place = [Step::Key("ordering_key"), Step::Index(i)];
        match part {
            KeyPartFile::Path(text) => match text.parse::<Hl7Path>() {
                Ok(p) if p.is_multiple() => errors.push(at(
                    &place,
                    "ordering_key",
                    format!(
                        "{text:?} selects several values; an ordering key part must select one"
                    ),
                )),
                Ok(p) => ordering_key.push(KeyPart::Path(p)),
                Err(e) => errors.push(at(&place, "ordering_key", e.to_string())),
            },
            KeyPartFile::Identifier(IdentifierOfTypeFile { identifier, kind }) => {
                match identifier.parse::<Hl7Path>() {
                    Ok(p) if p.field().is_some() && p.component().is_none() && !kind.is_empty() => {
                        // Every repetition of the field is looked at.
                        ordering_key.push(KeyPart::IdentifierOfType {
                            field: p.with_repetition(Selector::All),
                            kind,
                        })
                    }
                    Ok(_) => errors.push(at(
                        &place,
                        "ordering_key",
                        format!(
                            "{{ identifier = {identifier:?}, type = {kind:?} }}: the identifier \
                             must name a whole field (such as \"PID-3\") and the type a code \
                             (such as \"PI\")"
                        ),
                    )),
                    Err(e) => errors.push(at(&place, "ordering_key", e.to_string())),
                }
            }
        }
    }
    let mut matches = BTreeMap::new();
    for (field, value) in file.matches {
        if !MATCH_FIELDS.contains(&field.as_str()) {
            errors.push(at(
                &[Step::Key("match"), Step::Key(&field)],
                &format!("match.{field}"),
                format!(
                    "unknown field; a route matches on {}",
                    MATCH_FIELDS.join(", ")
                ),
            ));
            continue;
        }
        let empty = match &value {
            OneOrMany::One(s) => s.is_empty(),
            OneOrMany::Many(v) => v.iter().any(String::is_empty),
        };
        if empty {
            errors.push(at(
                &[Step::Key("match"), Step::Key(&field)],
                &format!("match.{field}"),
                "an empty pattern matches only an empty field: leave the field out to match \
                 anything"
                    .into(),
            ));
            continue;
        }
        let globs = match value {
            OneOrMany::One(s) => vec![Glob(s)],
            OneOrMany::Many(v) if v.is_empty() => {
                errors.push(at(
                    &[Step::Key("match"), Step::Key(&field)],
                    &format!("match.{field}"),
                    "an empty list matches nothing".into(),
                ));
                continue;
            }
            OneOrMany::Many(v) => v.into_iter().map(Glob).collect(),
        };
        matches.insert(field, globs);
    }
    if file.destinations.is_empty() {
        errors.push(src.error_at(
            0,
            Some("destinations"),
            "a route needs at least one [[destinations]]",
        ));
    }
    let mut destinations = Vec::new();
    for (i, d) in file.destinations.into_iter().enumerate() {
        let here = |key: &'static str| [Step::Key("destinations"), Step::Index(i), Step::Key(key)];
        if !is_queue_part(&d.name) {
            errors.push(at(
                &here("name"),
                "destinations.name",
                NAME_RULE.replace("{what}", "a destination"),
            ));
        }
        if destinations.iter().any(|o: &Destination| o.name == d.name) {
            errors.push(at(
                &here("name"),
                "destinations.name",
                format!("destination {:?} appears twice", d.name),
            ));
        }
        if !DESTINATION_TYPES.contains(&d.kind.as_str()) {
            errors.push(at(
                &here("type"),
                "destinations.type",
                format!(
                    "unknown type {:?}; one of {}",
                    d.kind,
                    DESTINATION_TYPES.join(", ")
                ),
            ));
        }
        let mut retry = RetryPolicy::default();
        if let Some(r) = d.retry {
            let retry_at = |key: &'static str| {
                [
                    Step::Key("destinations"),
                    Step::Index(i),
                    Step::Key("retry"),
                    Step::Key(key),
                ]
            };
            retry.initial_backoff_ms = r.initial_backoff_ms.unwrap_or(retry.initial_backoff_ms);
            retry.max_backoff_ms = r.max_backoff_ms.unwrap_or(retry.max_backoff_ms);
            retry.multiplier = r.multiplier.unwrap_or(retry.multiplier);
            retry.jitter = r.jitter.unwrap_or(retry.jitter);
            retry.max_attempts = r.max_attempts.or(retry.max_attempts);
            retry.max_age_ms = r.max_age_hours.map(|h| h * 3_600_000).or(retry.max_age_ms);
            retry.dead_holds_key = r.dead_holds_key.unwrap_or(retry.dead_holds_key);
            if retry.multiplier.is_nan() || retry.multiplier < 1.0 {
                errors.push(at(
                    &retry_at("multiplier"),
                    "destinations.retry.multiplier",
                    "must be at least 1".into(),
                ));
            }
            if !(0.0..=1.0).contains(&retry.jitter) {
                errors.push(at(
                    &retry_at("jitter"),
                    "destinations.retry.jitter",
                    "must be between 0 and 1".into(),
                ));
            }
            if retry.max_backoff_ms < retry.initial_backoff_ms {
                errors.push(at(
                    &retry_at("max_backoff_ms"),
                    "destinations.retry.max_backoff_ms",
                    "is below initial_backoff_ms".into(),
                ));
            }
            if retry.max_attempts == Some(0) {
                errors.push(at(
                    &retry_at("max_attempts"),
                    "destinations.retry.max_attempts",
                    "must be at least 1".into(),
                ));
            }
        }
        // An MLLP peer takes one message at a time on its one connection: deliveries
        // beyond the first would only wait (their leases running out) behind it.
        let default_concurrency = match d.kind.as_str() {
            "mllp" => 1,
            "ndjson" => DEFAULT_NDJSON_CONCURRENCY,
            _ => DEFAULT_CONCURRENCY,
        };
        let concurrency = match d.concurrency {
            None => default_concurrency,
            Some(n @ 1..=256) => n as usize,
            Some(n) => {
                errors.push(at(
                    &here("concurrency"),
                    "destinations.concurrency",
                    format!("{n} is not between 1 and 256"),
                ));
                default_concurrency
            }
        };
        if let (true, Some(base_dir)) = (
            DESTINATION_TYPES.contains(&d.kind.as_str()),
            context.base_dir,
        ) {
            let checked =
                passerelle_delivery::Destination::from_settings(&d.kind, &d.settings, base_dir)
                    .and_then(|target| match context.probe {
                        true => target.probe(),
                        false => Ok(()),
                    });
            if let Err(e) = checked {
                let mut steps = vec![Step::Key("destinations"), Step::Index(i)];
                steps.extend(e.key().split('.').map(Step::Key));
                errors.push(at(
                    &steps,
                    &format!("destinations.{}", e.key()),
                    e.to_string(),
                ));
            }
        }
        destinations.push(Destination {
            name: d.name,
            kind: d.kind,
            retry,
            concurrency,
            settings: d.settings,
        });
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line, e.column));
        return Err(errors);
    }
    Ok(Route {
        name: file.name,
        file: path.to_path_buf(),
        mapping: file.mapping,
        listeners: file.listeners,
        ordering_key,
        is_default: file.default,
        matches,
        destinations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = |p: &str, t: &str| Glob(p.into()).matches(t);
        assert!(g("ADT", "ADT"));
        assert!(!g("ADT", "ADTX"));
        assert!(g("A0*", "A08"));
        assert!(g("2.5*", "2.5.1"));
        assert!(g("?01", "A01"));
        assert!(!g("?01", "01"));
        assert!(g("*", ""));
        assert!(g("CHU_*_LAB", "CHU_NORD_LAB"));
        assert!(!g("adt", "ADT"), "case-sensitive");
    }
}

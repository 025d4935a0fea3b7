//! # passerelle-mapping: declarative HL7 v2 → FHIR R4 mapping
//!
//! Its job: turn one parsed HL7 v2 message ([`passerelle_hl7::Message`]) into one FHIR R4
//! (4.0.1) transaction [`Bundle`], following a **mapping pack**: a folder of TOML files
//! that is data, not code. Adding a message type or a site's Z-segment is a new file.
//!
//! ## Layers (as in the HL7 V2-to-FHIR implementation guide)
//!
//! - **structures**: a message's segment groups (ORDER, OBSERVATION, SPECIMEN…) declared
//!   as `starts`/`members`/`parent`, so that an OBX attaches to its own OBR
//!   (see `structure.rs` for the placement rule);
//! - **message maps**: for each `TYPE^TRIGGER`, which segment of which group becomes which
//!   resource (`label`) or a fragment of one (`into`), and the references between them
//!   (`refs`, resolved to the nearest instance, within a group, or anywhere);
//! - **segment maps**: rows `from` (a spec path such as `PID-3[*]`, alternatives with
//!   `|`) → `to` (a FHIR element path such as `identifier[]`), with a condition (`when`),
//!   a datatype map (`type`), a vocabulary (`vocab`), a conversion (`fn`) or a constant;
//! - **datatype maps**: the same rows over components (`1`, `4.2`); a datatype map can
//!   create a resource (XCN → Practitioner) and yield a reference to it;
//! - **vocabularies**: v2 codes → FHIR codes, with a default and an unknown-code policy.
//!
//! `[[extend]]` adds rows to a message map from another file: a site's Z-segment is one
//! more file. `mappings/v2-to-fhir/README.md` describes the format with examples.
//!
//! Conditions are a closed language: `valued(P)`, `equals(P, "x")`, `in(P, ["x", "y"])`,
//! `any(P, ["x", "y"])` (some repetition has one of the codes), `count(P) >= n`, `and`,
//! `or`, `not`, parentheses. There is no scripting.
//!
//! ## Load once, apply many times
//!
//! [`Pack::load`] parses every file, resolves every name and parses every path and
//! condition once; it reports all problems, each with `file:line:column` and the field
//! ([`LoadError`]). [`Pack::map`] then walks the message with borrowed values.
//!
//! ```
//! use passerelle_mapping::{MapOptions, Pack};
//! let pack = Pack::from_texts(&[("pack.toml", r#"
//! [pack]
//! name = "tiny"
//! fhir_version = "4.0.1"
//!
//! [[structure]]
//! name = "FLAT"
//!
//! [[segment]]
//! name = "PID"
//! segment = "PID"
//! resource = "Patient"
//! id = ["PID-3.1"]
//! rules = [{ from = "PID-5.1", to = "name[].family" }]
//!
//! [[message]]
//! name = "ADT"
//! events = ["ADT^A01"]
//! structure = "FLAT"
//! resources = [{ label = "Patient", for = "PID", map = "PID" }]
//! "#)])?;
//! let bytes = b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||42||DOE^JANE\r";
//! let message = passerelle_hl7::Message::parse(bytes)?;
//! let bundle = pack.map(&message, &MapOptions::default())?;
//! assert!(bundle.to_json(false).contains(r#""name":[{"family":"DOE"}]"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Invariants
//!
//! - **Deterministic.** No clock, no randomness, no hash-map iteration in the output:
//!   objects keep the order in which rules write them, so the same message and pack always
//!   give byte-identical JSON.
//! - **Stable ids.** A resource id is a UUID made from the SHA-256 of its type and its
//!   declared key fields (`id = ["PID-3[1]"]`); with no key valued, of its content. Two
//!   resources of one type with one id are merged when the map says `merge = true`
//!   (shared entities: a Practitioner named in PV1-7 and ROL-4), and told apart by their
//!   ordinal otherwise (two results that happen to share a key are never merged).
//! - **Idempotent replays.** Every entry is a `PUT`. Resources with a business
//!   identifier and `conditional = true` (Patient, Encounter…) are written with a
//!   conditional update, `PUT Patient?identifier=system|value`, and carry no id: the
//!   server matches the record it already has, whatever id it gave it, so a replayed or
//!   repeated feed updates in place and never creates a duplicate; a `POST` with
//!   `ifNoneExist` would avoid duplicates too but would drop the updates an A08 carries.
//!   The others are `PUT Type/id` with the stable id: a replay rewrites the same resource.
//!   `fullUrl` is always `urn:uuid:<id>` and references inside the bundle use it, so the
//!   server resolves them in the transaction.
//! - **Clean output.** Fragments of one resource (PID + PD1 → Patient) are merged; empty
//!   values and the explicit null `""` are left out (a `PUT` replaces the whole resource,
//!   so a field the sender nulls disappears downstream).
//! - **Time zones.** A time of day sent without an offset gets the site's offset at that
//!   date: its standard offset (`site_offset` in `pack.toml`, or
//!   [`MapOptions::site_offset`]) plus an hour in summer where `site_summer_time` says so
//!   (`"eu"`, `"us"`; see [`SummerTime`]). The pack can instead keep only the date or
//!   refuse the message (`naive_timestamps`).
//! - **No patient data in errors.** A [`MapError`] names the segment, the path and the
//!   rule, never a value.

mod doc;
mod error;
mod exec;
mod expr;
mod json;
mod load;
mod model;
mod r4;
mod sha256;
mod structure;
mod tz;

use std::path::Path;

pub use error::{LoadError, LoadErrorKind, LoadErrors, MapError, MapErrorKind};
pub use json::{Node, Text};
pub use model::{Loc, NaiveTimestamps, Pack};
pub use tz::SummerTime;

use passerelle_hl7::Message;

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct MapOptions {
    /// The site's standard UTC offset in minutes, overriding the pack's `site_offset`
    /// (the pack's `site_summer_time` rule still applies).
    pub site_offset: Option<i16>,
}

/// A FHIR R4 transaction Bundle.
///
/// It holds the document the mapping built (flat buffers of nodes and text, see
/// `doc.rs`), which [`Bundle::to_json`] and serde write directly. The owned [`Node`]
/// tree that [`Bundle::as_node`] and [`Bundle::resources`] return is built on first
/// use only, for inspection.
#[derive(Debug, Clone)]
pub struct Bundle {
    doc: doc::Doc,
    root: doc::Id,
    tree: std::sync::OnceLock<Node>,
}

impl Bundle {
    pub(crate) fn new(doc: doc::Doc, root: doc::Id) -> Bundle {
        Bundle {
            doc,
            root,
            tree: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn overflowed(&self) -> bool {
        self.doc.overflowed()
    }

    /// Compact JSON (or indented with `pretty`); keys in a fixed order.
    pub fn to_json(&self, pretty: bool) -> String {
        let mut out = String::with_capacity(self.doc.json_len_hint());
        self.doc.write(self.root, &mut out, pretty, 0);
        out
    }

    /// The bundle as a tree, for inspection.
    pub fn as_node(&self) -> &Node {
        self.tree.get_or_init(|| self.doc.to_node(self.root))
    }

    /// The entries' resources.
    pub fn resources(&self) -> impl Iterator<Item = &Node> {
        self.as_node()
            .get("entry")
            .map(|e| e.items())
            .unwrap_or(&[])
            .iter()
            .filter_map(|e| e.get("resource"))
    }
}

/// Two bundles are equal when they write the same JSON.
impl PartialEq for Bundle {
    fn eq(&self, other: &Bundle) -> bool {
        self.to_json(false) == other.to_json(false)
    }
}

impl serde::Serialize for Bundle {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.doc.view(self.root).serialize(serializer)
    }
}

/// The packs in a folder of packs (`mappings/`): its folders that hold a `pack.toml`, by
/// name, sorted; none when it cannot be read.
pub fn packs_in(dir: &Path) -> Vec<String> {
    let mut packs: Vec<String> = std::fs::read_dir(dir)
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

impl Pack {
    /// Loads and compiles every `*.toml` file under `dir` (which holds `pack.toml`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Pack, LoadErrors> {
        load::load_dir(dir.as_ref())
    }

    /// Compiles a pack from `(file name, TOML text)` pairs.
    pub fn from_texts(files: &[(&str, &str)]) -> Result<Pack, LoadErrors> {
        load::load_texts(files)
    }

    /// Maps one message to a transaction Bundle.
    pub fn map(&self, message: &Message<'_>, options: &MapOptions) -> Result<Bundle, MapError> {
        exec::map(self, message, options)
    }
}

//! The compiled pack: what the loader builds once and the executor reads for every
//! message. Names are resolved to indexes and every path and condition is parsed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::expr::{Cond, Source, SrcPath, Target};
use crate::json::Node;

/// A word-at-a-time multiplicative hash (the scheme of rustc's `FxHasher`): a few
/// instructions per 8 bytes, where FNV-1a took a multiplication per byte. It does not
/// resist hash flooding, so it only keys what a sender cannot choose: vocabularies (fixed
/// when the pack loads; a sender's code is only looked up in them) and resources by the
/// SHA-256 digest of their id.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WordHash(u64);

impl WordHash {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl std::hash::Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

pub(crate) type FastHash = std::hash::BuildHasherDefault<WordHash>;

/// A place in a mapping file, for errors: `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<str>,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// What a primitive value is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    /// The decoded text of the first leaf, trimmed.
    Text,
    /// The decoded text of the whole value, separators included.
    Raw,
    /// FHIR `date` from a DTM.
    Date,
    /// FHIR `dateTime` from a DTM, with the pack's policy for a missing offset.
    DateTime,
    /// FHIR `instant`: a dateTime with a time of day (values without one are skipped).
    Instant,
    /// FHIR `decimal` from an NM.
    Decimal,
    /// FHIR `integer`.
    Integer,
    /// FHIR `positiveInt`.
    PositiveInt,
    /// Y/N → true/false.
    Boolean,
    /// An identifier system: OIDs become `urn:oid:…`, URIs are kept, other names are put
    /// under the pack's `local_system_base`.
    SystemUri,
    /// base64 text, blanks removed.
    Base64,
    /// The low / high bound of a reference range such as `3.5-5.1`, `<5`, `>=10`.
    RangeLow,
    RangeHigh,
}

impl Func {
    pub(crate) const NAMES: &[(&str, Func)] = &[
        ("text", Func::Text),
        ("raw", Func::Raw),
        ("date", Func::Date),
        ("datetime", Func::DateTime),
        ("instant", Func::Instant),
        ("decimal", Func::Decimal),
        ("integer", Func::Integer),
        ("positive_int", Func::PositiveInt),
        ("boolean", Func::Boolean),
        ("system_uri", Func::SystemUri),
        ("base64", Func::Base64),
        ("range_low", Func::RangeLow),
        ("range_high", Func::RangeHigh),
    ];
}

/// How a rule turns what it read into a FHIR value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Convert {
    Primitive(Func),
    /// Apply datatype map `n`.
    Datatype(usize),
    /// Look the code up in vocabulary `n`.
    Vocab(usize),
}

/// One row of a segment or datatype map.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) from: Option<Source>,
    pub(crate) value: Option<Node>,
    pub(crate) to: Target,
    pub(crate) when: Option<Cond>,
    pub(crate) convert: Convert,
    pub(crate) join: Option<String>,
    pub(crate) loc: Loc,
}

/// How a resource gets its id and its request.
#[derive(Debug, Clone)]
pub(crate) struct ResourceSpec {
    pub(crate) resource_type: String,
    /// Key fields, hashed with the type into the id.
    pub(crate) id: Vec<Source>,
    /// Same id twice in one message: merge the two (shared entities such as a
    /// Practitioner), or tell them apart by their ordinal (results).
    pub(crate) merge: bool,
    /// `PUT Type?identifier=system|value` on the first identifier with both parts.
    pub(crate) conditional: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct SegmentMap {
    pub(crate) segment: String,
    pub(crate) spec: Option<ResourceSpec>,
    pub(crate) rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub(crate) struct DatatypeMap {
    /// Reads only its own value (relative paths, no nested datatype maps): the same
    /// input bytes always give the same output, so a resource it creates is built once
    /// per message however often it is named.
    pub(crate) pure: bool,
    /// Present when applying the map creates a resource and yields a reference to it.
    pub(crate) resource: Option<ResourceSpec>,
    pub(crate) rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// A code missing from the map is a mapping error.
    Error,
    /// Use the vocabulary's default.
    Default,
    /// Leave the element out.
    Omit,
    /// Keep the code as sent.
    Pass,
}

#[derive(Debug, Clone)]
pub(crate) struct Vocabulary {
    pub(crate) name: String,
    pub(crate) map: HashMap<String, String, FastHash>,
    pub(crate) default: Option<String>,
    pub(crate) unknown: Unknown,
}

#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) name: String,
    /// `None`: a child of the message itself.
    pub(crate) parent: Option<usize>,
    pub(crate) starts: Vec<String>,
    pub(crate) members: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Structure {
    pub(crate) name: String,
    pub(crate) groups: Vec<Group>,
}

#[derive(Debug, Clone)]
pub(crate) enum Within {
    /// The nearest instance: in the same group instance, then the enclosing ones.
    Nearest,
    /// Everything under the nearest enclosing instance of this group.
    Group(usize),
    /// Anywhere in the message.
    All,
}

#[derive(Debug, Clone)]
pub(crate) struct Ref {
    pub(crate) to: Target,
    pub(crate) label: String,
    /// The row that declares `label` (labels are unique within a message map), set once
    /// the map's rows are all loaded: resources are matched by this number, not by text.
    pub(crate) row: usize,
    pub(crate) within: Within,
    pub(crate) at: Option<crate::json::Key>,
    pub(crate) with: Vec<(crate::json::Key, Node)>,
}

/// One row of a message map: each `segment` of each instance of `group` becomes a
/// resource (`label`) or a fragment of one (`into`).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) label: Option<String>,
    pub(crate) into: Option<String>,
    /// The row that declares `into`'s label (see [`Ref::row`]).
    pub(crate) into_row: Option<usize>,
    pub(crate) group: Option<usize>,
    pub(crate) segment: String,
    pub(crate) map: usize,
    pub(crate) when: Option<Cond>,
    pub(crate) refs: Vec<Ref>,
}

#[derive(Debug, Clone)]
pub(crate) struct MessageMap {
    pub(crate) name: String,
    pub(crate) events: Vec<String>,
    pub(crate) structure: usize,
    pub(crate) rows: Vec<Row>,
}

impl MessageMap {
    /// Resolves every `into` and reference label to the row that declares it, once the
    /// rows (extensions included) are all loaded and checked.
    pub(crate) fn link_labels(&mut self) {
        let declared: Vec<Option<String>> = self.rows.iter().map(|r| r.label.clone()).collect();
        let row_of = |label: &str| {
            declared
                .iter()
                .position(|l| l.as_deref() == Some(label))
                .unwrap_or(usize::MAX)
        };
        for row in &mut self.rows {
            row.into_row = row.into.as_deref().map(row_of);
            for r in &mut row.refs {
                r.row = row_of(&r.label);
            }
        }
    }
}

/// What to do with a time of day sent without a UTC offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaiveTimestamps {
    /// Use the site's offset (`site_offset` in `pack.toml`, or [`crate::MapOptions`]).
    SiteOffset,
    /// Keep only the date.
    DateOnly,
    /// Refuse to map the message.
    Reject,
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) naive_timestamps: NaiveTimestamps,
    pub(crate) site_offset: Option<i16>,
    pub(crate) summer_time: crate::tz::SummerTime,
    pub(crate) local_system_base: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: String::new(),
            naive_timestamps: NaiveTimestamps::SiteOffset,
            site_offset: None,
            summer_time: crate::tz::SummerTime::None,
            local_system_base: "urn:passerelle:system:".to_owned(),
        }
    }
}

/// A loaded and compiled mapping pack. Cheap to share (`Arc`) between threads.
#[derive(Debug, Clone)]
pub struct Pack {
    pub(crate) settings: Settings,
    pub(crate) messages: Vec<MessageMap>,
    pub(crate) structures: Vec<Structure>,
    pub(crate) segments: Vec<SegmentMap>,
    pub(crate) datatypes: Vec<DatatypeMap>,
    pub(crate) vocabularies: Vec<Vocabulary>,
    /// `TYPE^TRIGGER` → message map.
    pub(crate) by_event: BTreeMap<String, usize>,
}

impl Pack {
    /// The pack's name (`[pack] name`).
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The `TYPE^TRIGGER` events the pack maps, sorted.
    pub fn events(&self) -> impl Iterator<Item = &str> {
        self.by_event.keys().map(String::as_str)
    }

    /// The message maps: name and the events each one maps.
    pub fn message_maps(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.messages
            .iter()
            .map(|m| (m.name.as_str(), m.events.as_slice()))
    }

    /// Counts of each kind of map, for `passerelle check`.
    pub fn summary(&self) -> String {
        format!(
            "{} message maps ({} events), {} structures, {} segment maps, {} datatype maps, {} vocabularies",
            self.messages.len(),
            self.by_event.len(),
            self.structures.len(),
            self.segments.len(),
            self.datatypes.len(),
            self.vocabularies.len()
        )
    }
}

pub(crate) fn relative_paths(source: &Source) -> bool {
    source.0.iter().any(|p| matches!(p, SrcPath::Relative(_)))
}

//! Errors. Loading errors point into the mapping files (`file:line:column` and the
//! field); mapping errors name segments, fields and rules, never message content, so
//! they can be logged.

use std::fmt;

use crate::model::Loc;

/// What is wrong in a mapping file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadErrorKind {
    /// The file could not be read.
    Io,
    /// Not TOML, or a key the format does not know, or a value of the wrong type.
    Syntax,
    /// A source path that does not parse, or that cannot be read where it is used.
    Path,
    /// A target (FHIR element) path that does not parse.
    Target,
    /// A condition that does not parse.
    Condition,
    /// A `fn` that is not a built-in conversion.
    UnknownFunction,
    /// A `type` naming no datatype map.
    UnknownDatatype,
    /// A `vocab` naming no vocabulary.
    UnknownVocabulary,
    /// A `map` naming no segment map, or one for another segment.
    UnknownSegmentMap,
    /// An `[[extend]]` naming no message map.
    UnknownMessageMap,
    /// A `structure` naming no structure.
    UnknownStructure,
    /// A group (in `for`, `within` or `parent`) the structure does not declare, or a
    /// segment the group does not hold.
    UnknownGroup,
    /// A label (in `into` or `ref`) no earlier row declares.
    UnknownLabel,
    /// Two maps with one name, or two message maps for one event.
    Duplicate,
    /// A value out of its range (an offset, a policy name…) or a missing part.
    Invalid,
}

/// One problem in a mapping pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub kind: LoadErrorKind,
    pub loc: Loc,
    /// The map and field concerned: `segment map "PID", rules[3].from`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.loc, self.field, self.message)
    }
}

impl std::error::Error for LoadError {}

/// Every problem found while loading a pack (the loader does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// Why a message could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapErrorKind {
    /// No message map for this `TYPE^TRIGGER`.
    NoMessageMap { event: String },
    /// A value could not be converted (`what` says to what: date/time, number…).
    Conversion { what: String },
    /// A time of day without a UTC offset, and the policy is `reject` or no site offset is set.
    NoOffset,
    /// A code missing from a vocabulary whose policy is `error`.
    UnknownCode { vocabulary: String },
    /// The bundle would hold more than 4 GiB of text or 4 billion nodes.
    TooLarge,
}

/// A mapping error: where in the message (segment, field) and which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    pub kind: MapErrorKind,
    /// Segment id and 1-based position in the message, `PID (segment 3)`.
    pub segment: Option<String>,
    /// The path the rule read, `PID-7`.
    pub path: Option<String>,
    /// The rule, `segments/PID.toml:12:3`.
    pub rule: Option<Loc>,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.segment {
            write!(f, "{s}: ")?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        match &self.kind {
            MapErrorKind::NoMessageMap { event } => {
                write!(f, "no message map for {event} in this pack")?
            }
            MapErrorKind::Conversion { what } => write!(f, "value is not a valid {what}")?,
            MapErrorKind::NoOffset => write!(
                f,
                "time of day without a UTC offset (set site_offset or naive_timestamps in pack.toml)"
            )?,
            MapErrorKind::UnknownCode { vocabulary } => write!(
                f,
                "code not in vocabulary {vocabulary:?}, whose policy is unknown = \"error\""
            )?,
            MapErrorKind::TooLarge => write!(f, "the bundle would pass 4 GiB")?,
        }
        if let Some(r) = &self.rule {
            write!(f, " (rule at {r})")?;
        }
        Ok(())
    }
}

impl std::error::Error for MapError {}

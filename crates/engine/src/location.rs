//! Errors that point into a configuration file.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file, at a line and column (1-based), about one field. A problem
/// with no place in a file (an environment variable's) has line 0, and `file` names where
/// it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The field concerned, as a dotted path (`match.message_type`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Turns byte offsets of one file's text into line and column.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl SourceFile {
    pub(crate) fn read(path: &Path) -> Result<SourceFile, ConfigError> {
        std::fs::read_to_string(path)
            .map(|text| SourceFile {
                path: path.to_path_buf(),
                text,
            })
            .map_err(|e| ConfigError {
                file: path.to_path_buf(),
                line: 1,
                column: 1,
                field: None,
                message: format!("cannot read: {e}"),
            })
    }

    pub(crate) fn error_at(
        &self,
        offset: usize,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        ConfigError {
            file: self.path.clone(),
            line,
            column,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }

    /// A TOML syntax or type error, located by its span.
    pub(crate) fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        self.error_at(offset, None, e.message().trim().to_owned())
    }

    /// Reads the file as a `T`, reporting every syntax and type error rather than the
    /// first: after each, the `key = value` line it points at is blanked (with as many
    /// spaces, so that positions stay the file's) and the text read again. An error on
    /// anything else (a table header, a value spread over lines) ends the search: what
    /// would follow is its consequences, not other mistakes. So does a key the blanking
    /// left missing (`missing field`): that is the same mistake again.
    ///
    /// The value comes back whenever the blanked text reads, errors or not: the keys in
    /// error then hold their defaults, and the caller can still check the rest of the file,
    /// so that one run reports every mistake (see [`Lenient`]).
    pub(crate) fn parse_lenient<T: serde::de::DeserializeOwned>(&self) -> Lenient<T> {
        const MAX: usize = 50;
        let mut text = self.text.clone();
        let mut errors = Vec::new();
        let mut blanked: Vec<String> = Vec::new();
        loop {
            let e = match toml::from_str::<T>(&text) {
                Ok(value) => {
                    return Lenient {
                        value: Some(value),
                        text,
                        errors,
                    };
                }
                Err(e) => e,
            };
            let stop = |errors| Lenient {
                value: None,
                text: String::new(),
                errors,
            };
            let consequence = blanked
                .iter()
                .any(|key| e.message().trim() == format!("missing field `{key}`"));
            if consequence {
                return stop(errors);
            }
            let Some(span) = e.span() else {
                errors.push(self.toml_error(&e));
                return stop(errors);
            };
            let at = span.start.min(text.len());
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            let line = text[start..end].trim();
            let key_line = !line.starts_with('[') && line.contains('=');
            let field = key_line.then(|| field_of(&text, start, line)).flatten();
            errors.push(self.error_at(at, field.as_deref(), e.message().trim().to_owned()));
            if !key_line || errors.len() >= MAX {
                return stop(errors);
            }
            if let Some(key) = line.split('=').next() {
                blanked.push(key.trim().trim_matches('"').to_owned());
            }
            text.replace_range(start..end, &" ".repeat(end - start));
        }
    }
}

/// A file read leniently: the errors of syntax and type, and the value read with the lines
/// in error blanked (`None` when even that does not read).
#[derive(Debug)]
pub(crate) struct Lenient<T> {
    pub(crate) value: Option<T>,
    /// The text the value was read from: the file's, with the lines in error blanked.
    pub(crate) text: String,
    pub(crate) errors: Vec<ConfigError>,
}

/// The dotted name of the key on `line` (which starts at `start` in `text`): the key, after
/// the name of the table it is in (`listeners.max_connections`).
fn field_of(text: &str, start: usize, line: &str) -> Option<String> {
    let key = line.split('=').next()?.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned()
        });
    Some(match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key.to_owned(),
    })
}

/// One step of a path into a TOML document: a key, or an index into an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl SourceFile {
    /// The byte offset of the value at `path`, or of the deepest part of it that exists.
    pub(crate) fn locate(&self, path: &[Step<'_>]) -> usize {
        use toml::de::{DeTable, DeValue};
        let Ok(root) = DeTable::parse(&self.text) else {
            return 0;
        };
        let mut offset = 0;
        let mut table = root.get_ref();
        let mut array: Option<&toml::de::DeArray<'_>> = None;
        for step in path {
            let value = match (*step, array) {
                (Step::Index(i), Some(items)) => match items.get(i) {
                    Some(v) => v,
                    None => return offset,
                },
                (Step::Key(k), _) => {
                    match table.iter().find(|(key, _)| key.get_ref().as_ref() == k) {
                        Some((key, v)) => {
                            offset = key.span().start;
                            v
                        }
                        None => return offset,
                    }
                }
                _ => return offset,
            };
            offset = value.span().start.max(offset);
            match value.get_ref() {
                DeValue::Table(t) => {
                    table = t;
                    array = None;
                }
                DeValue::Array(items) => array = Some(items),
                _ => array = None,
            }
        }
        offset
    }
}

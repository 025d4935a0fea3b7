//! Reading a destination's settings table: every key known, typed and checked; every error
//! names the key (dotted for nested tables: `auth.token_env`).

use std::path::{Path, PathBuf};

/// A destination's settings are wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// `type` names no destination kind.
    #[error("unknown destination type {kind:?} (expected \"fhir\", \"mllp\" or \"ndjson\")")]
    UnknownType {
        /// The `type` given.
        kind: String,
    },
    /// A required key is absent.
    #[error("missing setting `{key}`")]
    Missing {
        /// The key.
        key: String,
    },
    /// A key this kind of destination does not know (a typo, or a setting of another kind).
    #[error("unknown setting `{key}`")]
    Unknown {
        /// The key.
        key: String,
    },
    /// A key has a wrong type or value.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong, and what is expected.
        reason: String,
    },
}

impl SettingsError {
    /// The key the error is about (`type` for an unknown type).
    pub fn key(&self) -> &str {
        match self {
            SettingsError::UnknownType { .. } => "type",
            SettingsError::Missing { key }
            | SettingsError::Unknown { key }
            | SettingsError::Invalid { key, .. } => key,
        }
    }
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A settings table being read: `prefix` is the dotted path of the table (`""` at the
/// top), `known` the keys it may hold.
pub(crate) struct Reader<'a> {
    table: &'a toml::Table,
    prefix: &'a str,
}

impl<'a> Reader<'a> {
    /// Checks that the table holds only `known` keys (and `type` at the top level).
    pub(crate) fn new(
        table: &'a toml::Table,
        prefix: &'a str,
        known: &[&str],
    ) -> Result<Reader<'a>, SettingsError> {
        let reader = Reader { table, prefix };
        for key in table.keys() {
            let allowed = known.contains(&key.as_str()) || (prefix.is_empty() && key == "type");
            if !allowed {
                return Err(SettingsError::Unknown {
                    key: reader.path(key),
                });
            }
        }
        Ok(reader)
    }

    pub(crate) fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>, SettingsError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if s.trim().is_empty() => {
                Err(invalid(&self.path(key), "must not be empty"))
            }
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(
                &self.path(key),
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    pub(crate) fn required_string(&self, key: &str) -> Result<&'a str, SettingsError> {
        self.string(key)?.ok_or_else(|| SettingsError::Missing {
            key: self.path(key),
        })
    }

    /// A positive integer.
    pub(crate) fn positive(&self, key: &str) -> Result<Option<u64>, SettingsError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n > 0 => Ok(Some(*n as u64)),
            Some(toml::Value::Integer(n)) => Err(invalid(
                &self.path(key),
                format!("must be a positive integer, found {n}"),
            )),
            Some(other) => Err(invalid(
                &self.path(key),
                format!("expected a positive integer, found {}", other.type_str()),
            )),
        }
    }

    /// A duration in seconds: a positive integer or float, at most a day.
    pub(crate) fn seconds(&self, key: &str) -> Result<Option<std::time::Duration>, SettingsError> {
        let secs = match self.table.get(key) {
            None => return Ok(None),
            Some(toml::Value::Integer(n)) => *n as f64,
            Some(toml::Value::Float(f)) => *f,
            Some(other) => {
                return Err(invalid(
                    &self.path(key),
                    format!("expected a number of seconds, found {}", other.type_str()),
                ));
            }
        };
        if !(secs > 0.0 && secs <= 86_400.0) {
            return Err(invalid(
                &self.path(key),
                format!("must be between 0 and 86400 seconds, found {secs}"),
            ));
        }
        Ok(Some(std::time::Duration::from_secs_f64(secs)))
    }

    pub(crate) fn table(&self, key: &str) -> Result<Option<&'a toml::Table>, SettingsError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(invalid(
                &self.path(key),
                format!("expected a table, found {}", other.type_str()),
            )),
        }
    }

    /// A path, resolved against `base_dir` when relative.
    pub(crate) fn path_setting(
        &self,
        key: &str,
        base_dir: &Path,
    ) -> Result<Option<PathBuf>, SettingsError> {
        Ok(self.string(key)?.map(|s| base_dir.join(s)))
    }

    /// The value of the environment variable named by `key` (which must be set and not
    /// empty). The value is never put in an error.
    pub(crate) fn secret_from_env(&self, key: &str) -> Result<String, SettingsError> {
        let name = self.required_string(key)?;
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) => Err(invalid(
                &self.path(key),
                format!("the environment variable {name} is empty"),
            )),
            Err(std::env::VarError::NotPresent) => Err(invalid(
                &self.path(key),
                format!("the environment variable {name} is not set"),
            )),
            Err(std::env::VarError::NotUnicode(_)) => Err(invalid(
                &self.path(key),
                format!("the environment variable {name} is not valid UTF-8"),
            )),
        }
    }
}

/// Reads a file named by setting `key`, for an error naming the key.
pub(crate) fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

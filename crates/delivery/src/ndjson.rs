//! NDJSON files in the FHIR Bulk Data layout: one file per resource type,
//! `<dir>/<resourceType>.ndjson`, one resource per line.
//!
//! An attempt parses the bundle, appends every `entry[].resource` (compact JSON, one line
//! each) to its type's file, and `fdatasync`s each file it wrote (and the directory when a
//! file was created or renamed) before reporting `Delivered`. One writer per destination
//! does the blocking file work (in `spawn_blocking`), so concurrent attempts never
//! interleave bytes or race a rotation.
//!
//! **Group write.** Concurrent attempts share the syncs: each queues its lines and waits
//! for its answer without holding a thread. The attempt that finds no writer at work
//! starts one, which writes everything queued so far (each message's lines together, in
//! queue order), syncs each file once for all of them, answers them, and goes on while
//! lines keep arriving. An attempt reports `Delivered` only after a sync that covers its
//! lines; if the writer dies (a panic, the runtime shutting down), every attempt still
//! waiting gets a transient failure, and the next attempt starts a new writer.
//!
//! **Rotation.** When appending a message's lines would grow a non-empty file past
//! `max_file_bytes`, the file is first renamed to `<resourceType>.<n>.ndjson`, `n` being
//! the next free number from 1, and a fresh file is started. A single message larger than
//! the limit still goes whole into one (fresh) file: lines are never split.
//!
//! **Failures.** No bundle: permanent `no_bundle`. A bundle that is not a JSON object,
//! whose `entry` is not an array, or with a resource without a plain `resourceType` name:
//! permanent `invalid_bundle`. A bundle without entries writes nothing and is delivered. Any I/O error: transient `io`. An attempt that fails half way (one
//! type written, the next not) may leave that message's first lines written; the retry
//! writes them again: at-least-once, like every destination.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use passerelle_store::AttemptReport;

use crate::settings::{Reader, invalid};
use crate::{Item, SettingsError, with_detail};

/// Default `max_file_bytes`: 256 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Appends bundles' resources to NDJSON files.
#[derive(Debug)]
pub struct NdjsonDestination {
    dir: PathBuf,
    max_file_bytes: u64,
    shared: Arc<Shared>,
}

/// Lines waiting to be written, and whether a writer is at work on them.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<WriterState>,
}

#[derive(Debug, Default)]
struct WriterState {
    queued: Vec<Queued>,
    /// A writer is running; it takes whatever is queued before it stops.
    writing: bool,
}

/// One attempt's lines and where to say how the write went.
#[derive(Debug)]
struct Queued {
    lines: BTreeMap<String, String>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The writer's hold on [`WriterState::writing`]. A writer that ends any other way than by
/// finding the queue empty (a panic, or a runtime that drops it unrun) lets go here:
/// the attempts still queued are answered with a failure (their senders are dropped)
/// and the next attempt starts a new writer.
struct WriterTurn {
    shared: Arc<Shared>,
    finished: bool,
}

impl WriterTurn {
    /// The writer stopped because the queue is empty (with `writing` cleared under the
    /// lock): nothing to undo.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for WriterTurn {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = lock(&self.shared.state);
            state.writing = false;
            state.queued.clear();
        }
    }
}

impl NdjsonDestination {
    /// A destination writing into `dir`, rotating files at `max_file_bytes`.
    pub fn new(dir: impl Into<PathBuf>, max_file_bytes: u64) -> NdjsonDestination {
        NdjsonDestination {
            dir: dir.into(),
            max_file_bytes: max_file_bytes.max(1),
            shared: Arc::new(Shared::default()),
        }
    }

    /// From settings: `dir` (required), `max_file_bytes` (optional).
    pub fn from_settings(
        settings: &toml::Table,
        base_dir: &Path,
    ) -> Result<NdjsonDestination, SettingsError> {
        let r = Reader::new(settings, "", &["dir", "max_file_bytes"])?;
        let dir = r
            .path_setting("dir", base_dir)?
            .ok_or_else(|| SettingsError::Missing {
                key: "dir".to_owned(),
            })?;
        if dir.exists() && !dir.is_dir() {
            return Err(invalid(
                "dir",
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        let max = r
            .positive("max_file_bytes")?
            .unwrap_or(DEFAULT_MAX_FILE_BYTES);
        Ok(NdjsonDestination::new(dir, max))
    }

    /// Whether this machine lets the destination write: `dir` is a folder a file can be
    /// created in, or, not there yet, can be made (as the first delivery makes it) in
    /// the nearest folder above it that exists. Tried by creating a probe file there and
    /// removing it at once; nothing else is created. Permissions alone do not answer
    /// it (a read-only mount, an ACL, or root, who passes every permission check).
    pub fn probe(&self) -> Result<(), SettingsError> {
        let mut existing = self.dir.as_path();
        loop {
            match fs::metadata(existing) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(invalid(
                        "dir",
                        format!(
                            "{} cannot be made: {} is not a directory",
                            self.dir.display(),
                            existing.display()
                        ),
                    ));
                }
                // Not there, or a file on the way (`NotADirectory`): the walk up finds it.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    match existing.parent() {
                        Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
                        _ => {
                            existing = Path::new(".");
                            break;
                        }
                    }
                }
                Err(e) => {
                    return Err(invalid(
                        "dir",
                        format!("cannot look at {}: {e}", existing.display()),
                    ));
                }
            }
        }
        let probe = existing.join(format!(".passerelle-probe-{}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&probe) {
            Ok(file) => {
                drop(file);
                let _ = fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => {
                let target = if existing == self.dir {
                    String::new()
                } else {
                    format!(" (where {} would be made)", self.dir.display())
                };
                Err(invalid(
                    "dir",
                    format!("cannot write in {}{target}: {e}", existing.display()),
                ))
            }
        }
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One attempt: see the module doc.
    pub async fn deliver(&self, item: &Item<'_>) -> AttemptReport {
        let Some(bundle) = item.bundle else {
            return with_detail(
                AttemptReport::permanent("no_bundle"),
                "the message has no FHIR bundle (its route maps nothing) for an NDJSON destination",
            );
        };
        let lines = match lines_by_type(bundle) {
            Ok(lines) => lines,
            Err(why) => return with_detail(AttemptReport::permanent("invalid_bundle"), why),
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut state = lock(&self.shared.state);
            state.queued.push(Queued { lines, done });
            !std::mem::replace(&mut state.writing, true)
        };
        if start_writer {
            self.start_writer();
        }
        match outcome.await {
            Ok(Ok(())) => AttemptReport::delivered(),
            Ok(Err(e)) => with_detail(AttemptReport::transient("io"), e),
            Err(_) => with_detail(
                AttemptReport::transient("io"),
                "the NDJSON writer stopped before writing these lines",
            ),
        }
    }

    /// Runs a writer on the blocking pool until the queue is empty.
    fn start_writer(&self) {
        let dir = self.dir.clone();
        let max = self.max_file_bytes;
        let turn = WriterTurn {
            shared: Arc::clone(&self.shared),
            finished: false,
        };
        // Not awaited: the attempts wait on their own answers, and `turn` covers a writer
        // that never runs or dies.
        drop(tokio::task::spawn_blocking(move || {
            let shared = Arc::clone(&turn.shared);
            loop {
                let batch = {
                    let mut state = lock(&shared.state);
                    if state.queued.is_empty() {
                        state.writing = false;
                        turn.finish();
                        return;
                    }
                    std::mem::take(&mut state.queued)
                };
                write_batch(&dir, max, batch);
            }
        }));
    }
}

/// The parts of a bundle an NDJSON destination reads; resources stay raw text, so their
/// members keep their order.
#[derive(serde::Deserialize)]
struct RawBundle<'a> {
    #[serde(borrow)]
    entry: Option<Vec<RawEntry<'a>>>,
}

#[derive(serde::Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    resource: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct ResourceType<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<std::borrow::Cow<'a, str>>,
}

/// The bundle's resources as NDJSON text, grouped by resource type (each value ends with
/// a newline).
fn lines_by_type(bundle: &str) -> Result<BTreeMap<String, String>, String> {
    let parsed: RawBundle<'_> = serde_json::from_str(bundle)
        // The error's position only: serde's message can quote the offending value.
        .map_err(|e| {
            format!(
                "the bundle is not a JSON object with an entry array (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
    // A bundle without entries (a message that maps to nothing) writes nothing.
    let entries = parsed.entry.unwrap_or_default();
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(resource) = entry.resource else {
            continue;
        };
        let text = resource.get();
        let kind = match leading_resource_type(text) {
            Some(kind) => std::borrow::Cow::Borrowed(kind),
            None => {
                let kind: ResourceType<'_> = serde_json::from_str(text)
                    .map_err(|_| format!("entry {i}: the resource is not a JSON object"))?;
                kind.resource_type.unwrap_or_default()
            }
        };
        if !valid_type_name(&kind) {
            return Err(format!("entry {i}: the resource has no valid resourceType"));
        }
        let line = match out.get_mut(kind.as_ref()) {
            Some(line) => line,
            None => out.entry(kind.into_owned()).or_default(),
        };
        // Compact JSON (what the mapper writes) has no raw line breaks: copied as is.
        if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_some() {
            compact_into(text, line);
        } else {
            line.push_str(text);
        }
        line.push('\n');
    }
    Ok(out)
}

/// The resource type when `resourceType` is the object's first member, written without
/// blanks or escapes (as the mapper writes it): found without parsing the resource.
fn leading_resource_type(resource: &str) -> Option<&str> {
    let rest = resource.strip_prefix("{\"resourceType\":\"")?;
    let end = rest.find('"')?;
    // A backslash would be an escape to decode: the full parse handles that.
    let kind = &rest[..end];
    (!kind.contains('\\')).then_some(kind)
}

/// A resource type name as FHIR spells them, and safe as a file name.
fn valid_type_name(kind: &str) -> bool {
    !kind.is_empty() && kind.len() <= 64 && kind.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Appends valid JSON text without the blanks between its tokens (a pretty-printed
/// resource becomes one line; strings, where a raw newline cannot occur, are kept as is).
fn compact_into(json: &str, out: &mut String) {
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes the queued attempts' lines together and answers each of them.
fn write_batch(dir: &Path, max: u64, batch: Vec<Queued>) {
    let messages: Vec<&BTreeMap<String, String>> = batch.iter().map(|q| &q.lines).collect();
    let result = write_all(dir, max, &messages).map_err(|e| e.to_string());
    for q in batch {
        let _ = q.done.send(result.clone());
    }
}

/// An NDJSON file open for appending: its length (the lines not yet written included),
/// and the lines the batch has for it, written with one call when the file is synced or
/// rotated (one `write` per file and batch, not one per message and file).
struct Appending {
    file: File,
    len: u64,
    pending: Vec<u8>,
}

impl Appending {
    fn open(path: &Path, len: u64) -> io::Result<Appending> {
        Ok(Appending {
            file: OpenOptions::new().create(true).append(true).open(path)?,
            len,
            pending: Vec::new(),
        })
    }

    /// Writes the pending lines and syncs the file.
    fn write_and_sync(&mut self) -> io::Result<()> {
        self.file.write_all(&self.pending)?;
        self.pending.clear();
        self.file.sync_data()
    }
}

fn file_path(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("{kind}.ndjson"))
}

/// Appends each message's lines in order, rotating a file before a message's lines would
/// take it past `max`; then syncs every file written once (a rotated file before its
/// rename) and the directory if a file was created or renamed.
fn write_all(dir: &Path, max: u64, messages: &[&BTreeMap<String, String>]) -> io::Result<()> {
    if messages.iter().all(|m| m.is_empty()) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let mut files: BTreeMap<&str, Appending> = BTreeMap::new();
    let mut dir_changed = false;
    for lines in messages {
        for (kind, text) in *lines {
            let appending = match files.entry(kind.as_str()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let path = file_path(dir, kind);
                    let len = match fs::metadata(&path) {
                        Ok(m) => m.len(),
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {
                            dir_changed = true;
                            0
                        }
                        Err(err) => return Err(err),
                    };
                    e.insert(Appending::open(&path, len)?)
                }
            };
            if appending.len > 0 && appending.len + text.len() as u64 > max {
                // The lines already taken belong to the file being rotated.
                appending.write_and_sync()?;
                let path = file_path(dir, kind);
                fs::rename(&path, rotated_path(dir, kind)?)?;
                dir_changed = true;
                *appending = Appending::open(&path, 0)?;
            }
            appending.pending.extend_from_slice(text.as_bytes());
            appending.len += text.len() as u64;
        }
    }
    for appending in files.values_mut() {
        appending.write_and_sync()?;
    }
    if dir_changed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `<kind>.<n>.ndjson` for the first `n` from 1 that is free.
fn rotated_path(dir: &Path, kind: &str) -> io::Result<PathBuf> {
    for n in 1..u32::MAX {
        let candidate = dir.join(format!("{kind}.{n}.ndjson"));
        if !candidate.try_exists()? {
            return Ok(candidate);
        }
    }
    Err(io::Error::other(format!(
        "no free rotation number for {kind}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_lines_by_type() {
        let lines = lines_by_type(
            r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"a"}},{"request":{}},{"resource":{"resourceType":"Encounter","id":"b"}},{"resource":{"resourceType":"Patient","id":"c"}}]}"#,
        )
        .expect("valid");
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines["Patient"],
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Patient\",\"id\":\"c\"}\n"
        );
        let pretty = "{\"entry\": [ {\"resource\": {\n  \"resourceType\": \"Patient\",\n  \"name\": [{\"text\": \"a \\\" b\\\\\"}]\n}} ]}";
        assert_eq!(
            lines_by_type(pretty).expect("valid")["Patient"],
            "{\"resourceType\":\"Patient\",\"name\":[{\"text\":\"a \\\" b\\\\\"}]}\n"
        );
        assert!(lines_by_type("nope").is_err());
        assert!(
            lines_by_type(r#"{"resourceType":"Bundle"}"#)
                .unwrap()
                .is_empty()
        );
        assert!(lines_by_type(r#"{"entry":{}}"#).is_err());
        assert!(
            lines_by_type(r#"{"entry":[{"resource":{"resourceType":"../etc"}}]}"#).is_err(),
            "a resourceType is a file name: only letters and digits"
        );
    }

    #[test]
    fn resource_type_found_without_parsing_only_when_written_plainly() {
        assert_eq!(
            leading_resource_type(r#"{"resourceType":"Patient","id":"a"}"#),
            Some("Patient")
        );
        // Not first, escaped, or with blanks: left to the full parse, which still works.
        for resource in [
            r#"{"id":"a","resourceType":"Patient"}"#,
            r#"{"resourceType":"Pat\u0069ent"}"#,
            r#"{ "resourceType": "Patient"}"#,
        ] {
            assert_eq!(leading_resource_type(resource), None, "{resource}");
            let bundle = format!(r#"{{"entry":[{{"resource":{resource}}}]}}"#);
            let lines = lines_by_type(&bundle).expect("valid");
            assert_eq!(lines.keys().collect::<Vec<_>>(), ["Patient"], "{resource}");
            assert_eq!(lines["Patient"], format!("{resource}\n"));
        }
    }
}

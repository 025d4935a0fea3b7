//! The loader: reads every `*.toml` file of a pack folder (recursively, in name order),
//! checks it against the format, and compiles it into a [`Pack`]. All problems are
//! collected, each with its `file:line:column` and field.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{LoadError, LoadErrorKind as K, LoadErrors};
use crate::expr::{self, ExprError, Source, SrcPath};
use crate::json::Node;
use crate::model::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pack: Option<Spanned<RawPack>>,
    #[serde(default)]
    message: Vec<Spanned<RawMessage>>,
    #[serde(default)]
    structure: Vec<Spanned<RawStructure>>,
    #[serde(default)]
    segment: Vec<Spanned<RawSegment>>,
    #[serde(default)]
    datatype: Vec<Spanned<RawDatatype>>,
    #[serde(default)]
    vocabulary: Vec<Spanned<RawVocab>>,
    #[serde(default)]
    extend: Vec<Spanned<RawExtend>>,
}

/// Rows added to a message map declared elsewhere (a site's Z-segments, local resources).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtend {
    message: S,
    resources: Vec<Spanned<RawRow>>,
}

type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    name: S,
    fhir_version: S,
    naive_timestamps: Option<S>,
    site_offset: Option<S>,
    site_summer_time: Option<S>,
    local_system_base: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Option<S>,
    to: S,
    value: Option<Spanned<toml::Value>>,
    when: Option<S>,
    #[serde(rename = "type")]
    datatype: Option<S>,
    vocab: Option<S>,
    #[serde(rename = "fn")]
    func: Option<S>,
    join: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    name: S,
    segment: S,
    /// The resource the map builds; absent for maps that only add to one (`into`).
    resource: Option<S>,
    #[serde(default)]
    id: Vec<S>,
    #[serde(default)]
    merge: bool,
    #[serde(default)]
    conditional: bool,
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatatype {
    name: S,
    /// The FHIR datatype produced (documentation and checks by the validators).
    target: Option<S>,
    /// Set instead of `target` when the map creates a resource.
    resource: Option<S>,
    #[serde(default)]
    id: Vec<S>,
    #[serde(default)]
    merge: bool,
    #[serde(default)]
    conditional: bool,
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVocab {
    name: S,
    /// The v2 table or code system the codes come from (documentation).
    #[allow(dead_code)]
    source: Option<S>,
    /// The FHIR code system or value set the codes go to (documentation).
    #[allow(dead_code)]
    target: Option<S>,
    default: Option<S>,
    unknown: Option<S>,
    map: Spanned<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStructure {
    name: S,
    #[serde(default)]
    groups: Vec<Spanned<RawGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: S,
    parent: Option<S>,
    starts: Vec<S>,
    #[serde(default)]
    members: Vec<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    name: S,
    events: Vec<S>,
    structure: S,
    resources: Vec<Spanned<RawRow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    label: Option<S>,
    into: Option<S>,
    #[serde(rename = "for")]
    for_: S,
    map: S,
    when: Option<S>,
    #[serde(default)]
    refs: Vec<Spanned<RawRef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRef {
    to: S,
    #[serde(rename = "ref")]
    label: S,
    within: Option<S>,
    /// With `to` ending in `[]`: the member of the new element that holds the reference.
    at: Option<S>,
    /// Constant members added to that element.
    #[serde(default, rename = "with")]
    with_: BTreeMap<String, String>,
}

/// One file's text and name, to turn byte offsets into lines and columns.
struct FileText {
    name: Arc<str>,
    text: String,
}

impl FileText {
    fn loc(&self, offset: usize) -> Loc {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Loc {
            file: self.name.clone(),
            line,
            column,
        }
    }

    /// The location of character `position` inside a quoted string value whose span is `span`.
    fn loc_in(&self, span: Range<usize>, position: usize) -> Loc {
        let quote = usize::from(
            self.text
                .get(span.start..span.start + 1)
                .is_some_and(|q| q == "\"" || q == "'"),
        );
        self.loc(span.start + quote + position)
    }
}

struct Loader {
    errors: Vec<LoadError>,
}

impl Loader {
    fn error(&mut self, kind: K, loc: Loc, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(LoadError {
            kind,
            loc,
            field: field.into(),
            message: message.into(),
        });
    }

    fn expr_error(&mut self, kind: K, f: &FileText, s: &S, field: &str, e: ExprError) {
        let loc = f.loc_in(s.span(), e.position);
        self.error(kind, loc, field, e.message);
    }
}

/// The `name` of every map a pack file declares, when it is TOML at least (its values
/// may still be wrong): `[[datatype]]`, `[[vocabulary]]`, `[[segment]]`, `[[structure]]`.
fn declared_names(text: &str) -> Vec<String> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    ["datatype", "vocabulary", "segment", "structure"]
        .iter()
        .filter_map(|kind| table.get(*kind).and_then(toml::Value::as_array))
        .flatten()
        .filter_map(|entry| entry.get("name").and_then(toml::Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// Reads and compiles every `*.toml` file under `dir`.
pub(crate) fn load_dir(dir: &FsPath) -> Result<Pack, LoadErrors> {
    let folder_error = |message: String| {
        LoadErrors(vec![LoadError {
            kind: K::Io,
            loc: Loc {
                file: dir.display().to_string().into(),
                line: 0,
                column: 0,
            },
            field: "pack folder".into(),
            message,
        }])
    };
    // Every file under the folder belongs to the pack: a folder of packs (`mappings/`)
    // would mix two packs' names and give errors that make no sense.
    if dir.is_dir() && !dir.join("pack.toml").is_file() {
        let packs = crate::packs_in(dir);
        return Err(folder_error(if packs.is_empty() {
            "not a mapping pack: no pack.toml in this folder".to_owned()
        } else {
            format!(
                "not a mapping pack (no pack.toml) but a folder of packs: give one of {}",
                packs.join(", ")
            )
        }));
    }
    let mut files = Vec::new();
    let mut loader = Loader { errors: Vec::new() };
    collect(dir, &mut files).map_err(|e| folder_error(e.to_string()))?;
    files.sort();
    let mut sources = Vec::new();
    for path in files {
        let name: Arc<str> = path.display().to_string().into();
        match fs::read_to_string(&path) {
            Ok(text) => sources.push(FileText { name, text }),
            Err(e) => loader.error(
                K::Io,
                Loc {
                    file: name,
                    line: 0,
                    column: 0,
                },
                "file",
                e.to_string(),
            ),
        }
    }
    compile(&mut loader, &sources)
}

/// Compiles a pack from in-memory files `(name, text)`: for tests and embedding.
pub(crate) fn load_texts(files: &[(&str, &str)]) -> Result<Pack, LoadErrors> {
    let sources: Vec<FileText> = files
        .iter()
        .map(|(n, t)| FileText {
            name: (*n).into(),
            text: (*t).to_owned(),
        })
        .collect();
    let mut loader = Loader { errors: Vec::new() };
    compile(&mut loader, &sources)
}

fn collect(dir: &FsPath, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    Ok(())
}

struct Parsed<'f> {
    file: &'f FileText,
    raw: RawFile,
}

fn compile(loader: &mut Loader, sources: &[FileText]) -> Result<Pack, LoadErrors> {
    let mut parsed = Vec::new();
    // The names a file that could not be read declares: the maps that refer to them are
    // not wrong, and saying so for each would bury the one real error.
    let mut unreadable_names: Vec<String> = Vec::new();
    for file in sources {
        match toml::from_str::<RawFile>(&file.text) {
            Ok(raw) => parsed.push(Parsed { file, raw }),
            Err(e) => {
                let loc = file.loc(e.span().map_or(0, |s| s.start));
                loader.error(K::Syntax, loc, "file", e.message().trim().to_owned());
                unreadable_names.extend(declared_names(&file.text));
            }
        }
    }

    // Names first, so that maps can refer to each other in any order and across files.
    let mut datatype_names: HashMap<String, usize> = HashMap::new();
    let mut vocab_names: HashMap<String, usize> = HashMap::new();
    let mut segment_names: HashMap<String, usize> = HashMap::new();
    let mut structure_names: HashMap<String, usize> = HashMap::new();
    let register =
        |loader: &mut Loader, names: &mut HashMap<String, usize>, f: &FileText, n: &S, what| {
            let next = names.len();
            if names.insert(n.get_ref().clone(), next).is_some() {
                loader.error(
                    K::Duplicate,
                    f.loc(n.span().start),
                    format!("{what} {:?}", n.get_ref()),
                    "a map of this kind with this name is already declared",
                );
            }
        };
    for p in &parsed {
        for d in &p.raw.datatype {
            register(
                loader,
                &mut datatype_names,
                p.file,
                &d.get_ref().name,
                "datatype map",
            );
        }
        for v in &p.raw.vocabulary {
            register(
                loader,
                &mut vocab_names,
                p.file,
                &v.get_ref().name,
                "vocabulary",
            );
        }
        for s in &p.raw.segment {
            register(
                loader,
                &mut segment_names,
                p.file,
                &s.get_ref().name,
                "segment map",
            );
        }
        for s in &p.raw.structure {
            register(
                loader,
                &mut structure_names,
                p.file,
                &s.get_ref().name,
                "structure",
            );
        }
    }
    let names = Names {
        datatypes: &datatype_names,
        vocabularies: &vocab_names,
    };

    let mut settings = Settings::default();
    let mut seen_pack = false;
    let mut vocabularies = Vec::new();
    let mut datatypes = Vec::new();
    let mut segments = Vec::new();
    let mut structures = Vec::new();
    for p in &parsed {
        let f = p.file;
        if let Some(pack) = &p.raw.pack {
            if seen_pack {
                loader.error(
                    K::Duplicate,
                    f.loc(pack.span().start),
                    "[pack]",
                    "declared twice",
                );
            }
            seen_pack = true;
            compile_settings(loader, f, pack.get_ref(), &mut settings);
        }
        for v in &p.raw.vocabulary {
            vocabularies.push(compile_vocab(loader, f, v.get_ref()));
        }
        for d in &p.raw.datatype {
            let d = d.get_ref();
            let context = format!("datatype map {:?}", d.name.get_ref());
            let resource = match (&d.resource, &d.target) {
                (Some(r), None) => Some(compile_spec(
                    loader,
                    f,
                    &context,
                    r,
                    &d.id,
                    d.merge,
                    d.conditional,
                    true,
                )),
                (None, Some(_)) => None,
                _ => {
                    loader.error(
                        K::Invalid,
                        f.loc(d.name.span().start),
                        &context,
                        "give exactly one of `target` (a FHIR datatype) or `resource` (a resource type to create)",
                    );
                    None
                }
            };
            let rules = compile_rules(loader, f, &context, &d.rules, &names, true);
            let relative = |src: &Source| src.0.iter().all(|p| matches!(p, SrcPath::Relative(_)));
            let pure = rules.iter().all(|r| {
                r.from.as_ref().is_none_or(relative)
                    && !matches!(r.convert, Convert::Datatype(_))
                    && r.when.as_ref().is_none_or(|c| {
                        let mut paths = Vec::new();
                        c.paths(&mut paths);
                        paths.iter().all(|p| matches!(p, SrcPath::Relative(_)))
                    })
            }) && resource
                .as_ref()
                .is_none_or(|spec| spec.merge && spec.id.iter().all(relative));
            datatypes.push(DatatypeMap {
                pure,
                resource,
                rules,
            });
        }
        for s in &p.raw.segment {
            let s = s.get_ref();
            let context = format!("segment map {:?}", s.name.get_ref());
            if expr::parse_src_path(s.segment.get_ref(), 0)
                .ok()
                .is_none_or(|p| !matches!(&p, SrcPath::Segment(path, _) if path.field().is_none()))
            {
                loader.error(
                    K::Path,
                    f.loc(s.segment.span().start),
                    format!("{context}, segment"),
                    "expected a segment id such as PID or ZPI",
                );
            }
            let spec = s.resource.as_ref().map(|r| {
                compile_spec(loader, f, &context, r, &s.id, s.merge, s.conditional, false)
            });
            let rules = compile_rules(loader, f, &context, &s.rules, &names, false);
            segments.push(SegmentMap {
                segment: s.segment.get_ref().clone(),
                spec,
                rules,
            });
        }
        for s in &p.raw.structure {
            structures.push(compile_structure(loader, f, s.get_ref()));
        }
    }
    if !seen_pack && loader.errors.is_empty() {
        loader.error(
            K::Invalid,
            Loc {
                file: "pack.toml".into(),
                line: 0,
                column: 0,
            },
            "[pack]",
            "no file declares [pack] (name, fhir_version)",
        );
    }

    let mut messages = Vec::new();
    let mut by_event = BTreeMap::new();
    for p in &parsed {
        let f = p.file;
        for m in &p.raw.message {
            let m = m.get_ref();
            let context = format!("message map {:?}", m.name.get_ref());
            let Some(&structure) = structure_names.get(m.structure.get_ref()) else {
                loader.error(
                    K::UnknownStructure,
                    f.loc(m.structure.span().start),
                    format!("{context}, structure"),
                    format!("no structure named {:?}", m.structure.get_ref()),
                );
                continue;
            };
            for e in &m.events {
                let valid = e
                    .get_ref()
                    .split_once('^')
                    .is_some_and(|(t, r)| !t.is_empty() && !r.is_empty() && !r.contains('^'));
                if !valid {
                    loader.error(
                        K::Invalid,
                        f.loc(e.span().start),
                        format!("{context}, events"),
                        "an event is TYPE^TRIGGER, e.g. ADT^A01",
                    );
                } else if by_event
                    .insert(e.get_ref().clone(), messages.len())
                    .is_some()
                {
                    loader.error(
                        K::Duplicate,
                        f.loc(e.span().start),
                        format!("{context}, events"),
                        format!("{} is already mapped by another message map", e.get_ref()),
                    );
                }
            }
            let rows = compile_rows(
                loader,
                f,
                &context,
                &m.resources,
                &structures[structure],
                &segments,
                &segment_names,
                Vec::new(),
            );
            messages.push(MessageMap {
                name: m.name.get_ref().clone(),
                events: m.events.iter().map(|e| e.get_ref().clone()).collect(),
                structure,
                rows,
            });
        }
    }

    for p in &parsed {
        let f = p.file;
        for x in &p.raw.extend {
            let x = x.get_ref();
            let context = format!("extension of message map {:?}", x.message.get_ref());
            let Some(index) = messages
                .iter()
                .position(|m: &MessageMap| &m.name == x.message.get_ref())
            else {
                loader.error(
                    K::UnknownMessageMap,
                    f.loc(x.message.span().start),
                    format!("{context}, message"),
                    format!("no message map named {:?}", x.message.get_ref()),
                );
                continue;
            };
            let existing = std::mem::take(&mut messages[index].rows);
            let structure = &structures[messages[index].structure];
            let rows = compile_rows(
                loader,
                f,
                &context,
                &x.resources,
                structure,
                &segments,
                &segment_names,
                existing,
            );
            messages[index].rows = rows;
        }
    }

    loader.errors.retain(|e| {
        let refers_to_unreadable = matches!(
            e.kind,
            K::UnknownDatatype | K::UnknownVocabulary | K::UnknownSegmentMap | K::UnknownStructure
        ) && unreadable_names
            .iter()
            .any(|name| e.message.contains(&format!("{name:?}")));
        !refers_to_unreadable
    });
    if loader.errors.is_empty() {
        for m in &mut messages {
            m.link_labels();
        }
        Ok(Pack {
            settings,
            messages,
            structures,
            segments,
            datatypes,
            vocabularies,
            by_event,
        })
    } else {
        Err(LoadErrors(std::mem::take(&mut loader.errors)))
    }
}

struct Names<'n> {
    datatypes: &'n HashMap<String, usize>,
    vocabularies: &'n HashMap<String, usize>,
}

fn parse_offset(s: &str) -> Option<i16> {
    let b = s.as_bytes();
    if b.len() != 6 || b[3] != b':' || !matches!(b[0], b'+' | b'-') {
        return None;
    }
    let h: i16 = s[1..3].parse().ok()?;
    let m: i16 = s[4..6].parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    let total = h * 60 + m;
    Some(if b[0] == b'-' { -total } else { total })
}

fn compile_settings(loader: &mut Loader, f: &FileText, p: &RawPack, settings: &mut Settings) {
    settings.name = p.name.get_ref().clone();
    if p.fhir_version.get_ref() != "4.0.1" {
        loader.error(
            K::Invalid,
            f.loc(p.fhir_version.span().start),
            "[pack] fhir_version",
            "only FHIR R4 \"4.0.1\" is supported",
        );
    }
    if let Some(n) = &p.naive_timestamps {
        settings.naive_timestamps = match n.get_ref().as_str() {
            "site-offset" => NaiveTimestamps::SiteOffset,
            "date-only" => NaiveTimestamps::DateOnly,
            "reject" => NaiveTimestamps::Reject,
            _ => {
                loader.error(
                    K::Invalid,
                    f.loc(n.span().start),
                    "[pack] naive_timestamps",
                    "expected \"site-offset\", \"date-only\" or \"reject\"",
                );
                NaiveTimestamps::SiteOffset
            }
        };
    }
    if let Some(o) = &p.site_offset {
        settings.site_offset = parse_offset(o.get_ref());
        if settings.site_offset.is_none() {
            loader.error(
                K::Invalid,
                f.loc(o.span().start),
                "[pack] site_offset",
                "expected +HH:MM or -HH:MM within ±14:00",
            );
        }
    }
    if let Some(r) = &p.site_summer_time {
        settings.summer_time = match r.get_ref().as_str() {
            "none" => crate::tz::SummerTime::None,
            "eu" => crate::tz::SummerTime::Eu,
            "us" => crate::tz::SummerTime::Us,
            _ => {
                loader.error(
                    K::Invalid,
                    f.loc(r.span().start),
                    "[pack] site_summer_time",
                    "expected \"none\", \"eu\" or \"us\"",
                );
                crate::tz::SummerTime::None
            }
        };
    }
    if let Some(b) = &p.local_system_base {
        if !b.get_ref().contains(':') {
            loader.error(
                K::Invalid,
                f.loc(b.span().start),
                "[pack] local_system_base",
                "expected a URI prefix such as \"urn:example:system:\"",
            );
        }
        settings.local_system_base = b.get_ref().clone();
    }
}

fn compile_vocab(loader: &mut Loader, f: &FileText, v: &RawVocab) -> Vocabulary {
    let context = format!("vocabulary {:?}", v.name.get_ref());
    let unknown = match v.unknown.as_ref().map(|u| u.get_ref().as_str()) {
        None | Some("error") => Unknown::Error,
        Some("default") => Unknown::Default,
        Some("omit") => Unknown::Omit,
        Some("pass") => Unknown::Pass,
        Some(_) => {
            let u = v.unknown.as_ref().map_or(0, |u| u.span().start);
            loader.error(
                K::Invalid,
                f.loc(u),
                format!("{context}, unknown"),
                "expected \"error\", \"default\", \"omit\" or \"pass\"",
            );
            Unknown::Error
        }
    };
    if unknown == Unknown::Default && v.default.is_none() {
        loader.error(
            K::Invalid,
            f.loc(v.name.span().start),
            format!("{context}, default"),
            "unknown = \"default\" needs a `default` code",
        );
    }
    Vocabulary {
        name: v.name.get_ref().clone(),
        map: v
            .map
            .get_ref()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        default: v.default.as_ref().map(|d| d.get_ref().clone()),
        unknown,
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_spec(
    loader: &mut Loader,
    f: &FileText,
    context: &str,
    resource: &S,
    id: &[S],
    merge: bool,
    conditional: bool,
    relative: bool,
) -> ResourceSpec {
    let rt = resource.get_ref();
    if !crate::r4::is_resource_type(rt) {
        loader.error(
            K::Invalid,
            f.loc(resource.span().start),
            format!("{context}, resource"),
            format!("{rt:?} is not a FHIR R4 resource type (Patient, Encounter, Observation…)"),
        );
    }
    let mut keys = Vec::new();
    for (i, k) in id.iter().enumerate() {
        let field = format!("{context}, id[{i}]");
        match expr::parse_source(k.get_ref()) {
            Ok(src) => {
                check_relative(loader, f, k, &field, &src, relative);
                keys.push(src);
            }
            Err(e) => loader.expr_error(K::Path, f, k, &field, e),
        }
    }
    ResourceSpec {
        resource_type: rt.clone(),
        id: keys,
        merge,
        conditional,
    }
}

fn check_relative(
    loader: &mut Loader,
    f: &FileText,
    s: &S,
    field: &str,
    src: &Source,
    allowed: bool,
) {
    if !allowed && relative_paths(src) {
        loader.error(K::Path, f.loc_in(s.span(), 0), field, "a relative path (component numbers) can only be read inside a datatype map; write SEG-field");
    }
}

fn compile_rules(
    loader: &mut Loader,
    f: &FileText,
    context: &str,
    rules: &[Spanned<RawRule>],
    names: &Names<'_>,
    relative: bool,
) -> Vec<Rule> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let loc = f.loc(r.span().start);
        let r = r.get_ref();
        let field = |name: &str| format!("{context}, rules[{i}].{name}");
        let from = r
            .from
            .as_ref()
            .and_then(|s| match expr::parse_source(s.get_ref()) {
                Ok(src) => {
                    check_relative(loader, f, s, &field("from"), &src, relative);
                    Some(src)
                }
                Err(e) => {
                    loader.expr_error(K::Path, f, s, &field("from"), e);
                    None
                }
            });
        let to = match expr::parse_target(r.to.get_ref()) {
            Ok(t) => t,
            Err(e) => {
                loader.expr_error(K::Target, f, &r.to, &field("to"), e);
                continue;
            }
        };
        let when = r.when.as_ref().and_then(|s| match expr::parse_cond(s.get_ref()) {
            Ok(c) => {
                let mut paths = Vec::new();
                c.paths(&mut paths);
                if !relative && paths.iter().any(|p| matches!(p, SrcPath::Relative(_))) {
                    loader.error(K::Path, f.loc_in(s.span(), 0), field("when"), "a relative path (component numbers) can only be read inside a datatype map");
                }
                Some(c)
            }
            Err(e) => {
                loader.expr_error(K::Condition, f, s, &field("when"), e);
                None
            }
        });
        let value = r.value.as_ref().and_then(|v| match v.get_ref() {
            toml::Value::String(s) => Some(Node::Str(s.as_str().into())),
            toml::Value::Boolean(b) => Some(Node::Bool(*b)),
            toml::Value::Integer(n) => Some(Node::Num(n.to_string().into())),
            _ => {
                loader.error(
                    K::Invalid,
                    f.loc(v.span().start),
                    field("value"),
                    "a constant is a string, a boolean or an integer",
                );
                None
            }
        });
        if from.is_none() && value.is_none() && r.from.is_none() && r.value.is_none() {
            loader.error(
                K::Invalid,
                loc.clone(),
                field("from"),
                "a rule needs `from` (a path) or `value` (a constant)",
            );
        }
        let kinds = [r.datatype.is_some(), r.vocab.is_some(), r.func.is_some()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            loader.error(
                K::Invalid,
                loc.clone(),
                field("type"),
                "give at most one of `type`, `vocab` and `fn`",
            );
        }
        let convert = if let Some(t) = &r.datatype {
            match names.datatypes.get(t.get_ref()) {
                Some(&n) => Convert::Datatype(n),
                None => {
                    loader.error(
                        K::UnknownDatatype,
                        f.loc(t.span().start),
                        field("type"),
                        format!("no datatype map named {:?}", t.get_ref()),
                    );
                    continue;
                }
            }
        } else if let Some(v) = &r.vocab {
            match names.vocabularies.get(v.get_ref()) {
                Some(&n) => Convert::Vocab(n),
                None => {
                    loader.error(
                        K::UnknownVocabulary,
                        f.loc(v.span().start),
                        field("vocab"),
                        format!("no vocabulary named {:?}", v.get_ref()),
                    );
                    continue;
                }
            }
        } else if let Some(func) = &r.func {
            match Func::NAMES.iter().find(|(n, _)| n == func.get_ref()) {
                Some((_, func)) => Convert::Primitive(*func),
                None => {
                    let known: Vec<&str> = Func::NAMES.iter().map(|(n, _)| *n).collect();
                    loader.error(
                        K::UnknownFunction,
                        f.loc(func.span().start),
                        field("fn"),
                        format!(
                            "no conversion named {:?}; known: {}",
                            func.get_ref(),
                            known.join(", ")
                        ),
                    );
                    continue;
                }
            }
        } else {
            Convert::Primitive(Func::Text)
        };
        out.push(Rule {
            from,
            value,
            to,
            when,
            convert,
            join: r.join.as_ref().map(|j| j.get_ref().clone()),
            loc,
        });
    }
    out
}

fn compile_structure(loader: &mut Loader, f: &FileText, s: &RawStructure) -> Structure {
    let context = format!("structure {:?}", s.name.get_ref());
    let mut groups: Vec<Group> = Vec::new();
    for (i, g) in s.groups.iter().enumerate() {
        let g = g.get_ref();
        let parent = g.parent.as_ref().and_then(|p| {
            let found = groups.iter().position(|x| &x.name == p.get_ref());
            if found.is_none() {
                loader.error(
                    K::UnknownGroup,
                    f.loc(p.span().start),
                    format!("{context}, groups[{i}].parent"),
                    format!("no earlier group named {:?}", p.get_ref()),
                );
            }
            found
        });
        if groups.iter().any(|x| &x.name == g.name.get_ref()) {
            loader.error(
                K::Duplicate,
                f.loc(g.name.span().start),
                format!("{context}, groups[{i}].name"),
                "group names are unique within a structure",
            );
        }
        if g.starts.is_empty() {
            loader.error(
                K::Invalid,
                f.loc(g.name.span().start),
                format!("{context}, groups[{i}].starts"),
                "a group needs at least one segment that starts it",
            );
        }
        for seg in g.starts.iter().chain(&g.members) {
            if !is_segment_id(seg.get_ref()) {
                loader.error(
                    K::Path,
                    f.loc(seg.span().start),
                    format!("{context}, groups[{i}]"),
                    "expected a segment id such as OBX",
                );
            }
        }
        let starts: Vec<String> = g.starts.iter().map(|x| x.get_ref().clone()).collect();
        let mut members = starts.clone();
        members.extend(g.members.iter().map(|x| x.get_ref().clone()));
        groups.push(Group {
            name: g.name.get_ref().clone(),
            parent,
            starts,
            members,
        });
    }
    Structure {
        name: s.name.get_ref().clone(),
        groups,
    }
}

fn is_segment_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 3
        && b[0].is_ascii_uppercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

#[allow(clippy::too_many_arguments)]
fn compile_rows(
    loader: &mut Loader,
    f: &FileText,
    context: &str,
    rows: &[Spanned<RawRow>],
    structure: &Structure,
    segments: &[SegmentMap],
    segment_names: &HashMap<String, usize>,
    existing: Vec<Row>,
) -> Vec<Row> {
    let mut out: Vec<Row> = existing;
    let group_named = |name: &str| structure.groups.iter().position(|g| g.name == name);
    for (i, r) in rows.iter().enumerate() {
        let loc = f.loc(r.span().start);
        let r = r.get_ref();
        let field = |name: &str| format!("{context}, resources[{i}].{name}");
        let text = r.for_.get_ref();
        let (group, segment) = match text.rsplit_once('/') {
            Some((g, s)) => (Some(g), s),
            None => (None, text.as_str()),
        };
        if !is_segment_id(segment) {
            loader.error(
                K::Path,
                f.loc(r.for_.span().start),
                field("for"),
                "expected SEGMENT or GROUP/SEGMENT, e.g. OBSERVATION/OBX",
            );
            continue;
        }
        let group = match group {
            None => None,
            Some(g) => match group_named(g) {
                Some(n) => {
                    if !structure.groups[n].members.iter().any(|m| m == segment) {
                        loader.error(
                            K::UnknownGroup,
                            f.loc(r.for_.span().start),
                            field("for"),
                            format!(
                                "group {g} of structure {} holds no {segment} segment",
                                structure.name
                            ),
                        );
                    }
                    Some(n)
                }
                None => {
                    loader.error(
                        K::UnknownGroup,
                        f.loc(r.for_.span().start),
                        field("for"),
                        format!("structure {} has no group {g:?}", structure.name),
                    );
                    continue;
                }
            },
        };
        let Some(&map) = segment_names.get(r.map.get_ref()) else {
            loader.error(
                K::UnknownSegmentMap,
                f.loc(r.map.span().start),
                field("map"),
                format!("no segment map named {:?}", r.map.get_ref()),
            );
            continue;
        };
        if r.label.is_some() && segments[map].spec.is_none() {
            loader.error(
                K::Invalid,
                f.loc(r.map.span().start),
                field("map"),
                format!(
                    "segment map {:?} declares no `resource`, so it can only add to one (`into`)",
                    r.map.get_ref()
                ),
            );
        }
        if segments[map].segment != segment {
            loader.error(
                K::UnknownSegmentMap,
                f.loc(r.map.span().start),
                field("map"),
                format!(
                    "segment map {:?} reads {} segments, not {segment}",
                    r.map.get_ref(),
                    segments[map].segment
                ),
            );
        }
        let when = r
            .when
            .as_ref()
            .and_then(|s| match expr::parse_cond(s.get_ref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    loader.expr_error(K::Condition, f, s, &field("when"), e);
                    None
                }
            });
        let known_label = |l: &str, out: &[Row]| out.iter().any(|x| x.label.as_deref() == Some(l));
        match (&r.label, &r.into) {
            (Some(l), None) => {
                if known_label(l.get_ref(), &out) {
                    loader.error(
                        K::Duplicate,
                        f.loc(l.span().start),
                        field("label"),
                        "labels are unique within a message map",
                    );
                }
            }
            (None, Some(into)) => {
                if !known_label(into.get_ref(), &out) {
                    loader.error(
                        K::UnknownLabel,
                        f.loc(into.span().start),
                        field("into"),
                        format!("no earlier row declares label {:?}", into.get_ref()),
                    );
                }
            }
            _ => loader.error(
                K::Invalid,
                loc.clone(),
                field("label"),
                "give exactly one of `label` (a new resource) or `into` (a fragment of one)",
            ),
        }
        let mut refs = Vec::new();
        for (j, x) in r.refs.iter().enumerate() {
            let x = x.get_ref();
            let rfield = |name: &str| format!("{context}, resources[{i}].refs[{j}].{name}");
            let to = match expr::parse_target(x.to.get_ref()) {
                Ok(t) => t,
                Err(e) => {
                    loader.expr_error(K::Target, f, &x.to, &rfield("to"), e);
                    continue;
                }
            };
            let label = x.label.get_ref();
            let declared = known_label(label, &out)
                || rows.iter().any(|y| {
                    y.get_ref()
                        .label
                        .as_ref()
                        .is_some_and(|l| l.get_ref() == label)
                });
            if !declared {
                loader.error(
                    K::UnknownLabel,
                    f.loc(x.label.span().start),
                    rfield("ref"),
                    format!("no row of this message map declares label {label:?}"),
                );
                continue;
            }
            let within = match &x.within {
                None => Within::Nearest,
                Some(w) if w.get_ref() == "*" => Within::All,
                Some(w) => {
                    match group_named(w.get_ref()) {
                        Some(n) => Within::Group(n),
                        None => {
                            loader.error(K::UnknownGroup, f.loc(w.span().start), rfield("within"), format!("structure {} has no group {:?} (use \"*\" for the whole message)", structure.name, w.get_ref()));
                            continue;
                        }
                    }
                }
            };
            if (x.at.is_some() || !x.with_.is_empty()) && !to.appends() {
                loader.error(
                    K::Target,
                    f.loc(x.to.span().start),
                    rfield("to"),
                    "`at` and `with` need a `to` ending in [] (a new element per reference)",
                );
            }
            refs.push(Ref {
                to,
                label: label.clone(),
                row: usize::MAX,
                within,
                at: x.at.as_ref().map(|a| a.get_ref().clone().into()),
                with: x
                    .with_
                    .iter()
                    .map(|(k, v)| (k.clone().into(), Node::Str(v.as_str().into())))
                    .collect(),
            });
        }
        out.push(Row {
            label: r.label.as_ref().map(|l| l.get_ref().clone()),
            into: r.into.as_ref().map(|l| l.get_ref().clone()),
            into_row: None,
            group,
            segment: segment.to_owned(),
            map,
            when,
            refs,
        });
    }
    out
}

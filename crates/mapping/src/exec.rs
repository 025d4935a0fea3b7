//! The executor: applies a compiled message map to one parsed message and assembles the
//! transaction Bundle. It reads the message through borrowed [`Value`]s and writes the
//! output into one [`Doc`] (flat buffers of nodes and text).

use std::borrow::Cow;
use std::collections::HashMap;

use passerelle_hl7::types::{DateTime, Number};
use passerelle_hl7::{ChildIndex, Message, Segment, Selector, Value};

use crate::doc::{Doc, Id};
use crate::error::{MapError, MapErrorKind};
use crate::expr::{Cmp, Cond, Index, Source, SrcPath, Target};
use crate::json::names;
use crate::model::FastHash;
use crate::model::*;
use crate::sha256;
use crate::structure::Tree;
use crate::{Bundle, MapOptions};

/// Where a rule reads: a segment, and inside a datatype map the value being mapped,
/// split into its children once (a datatype map reads most of them, one rule each).
#[derive(Clone, Copy)]
struct Here<'h, 'm, 'a> {
    seg: Segment<'m, 'a>,
    value: Option<&'h ChildIndex<'a>>,
}

struct Res<'p> {
    resource_type: &'p str,
    id: String,
    body: Id,
    conditional: bool,
    /// Group instance of the segment the resource comes from.
    instance: usize,
    /// The message map row that labels it (see [`Ref::row`]), if any.
    row: Option<usize>,
}

struct Exec<'p, 'm, 'a> {
    pack: &'p Pack,
    msg: &'m Message<'a>,
    tree: Tree,
    /// The output: every resource and, at the end, the bundle around them.
    doc: Doc,
    /// Reused for the text a resource's content id is hashed from.
    scratch: String,
    offset: Option<i16>,
    resources: Vec<Res<'p>>,
    /// Resources by the digest their id is written from.
    by_id: HashMap<[u8; 16], usize, FastHash>,
    /// Resources made by pure datatype maps, by (map, input bytes). Keyed by what the
    /// sender wrote, so hashed with std's keyed hasher: a message crafted for collisions
    /// must not make the mapper's one thread quadratic.
    built: HashMap<(usize, &'a [u8]), usize>,
    /// Emptied value lists, reused by appending rules (rules nest through datatype maps,
    /// so one list per level) instead of allocating one per rule.
    spare_lists: Vec<Vec<Value<'a>>>,
    /// Whether some write may have left an empty member (see [`set`]); until one does,
    /// nothing needs pruning.
    left_empty: bool,
    text: TextReader<'a>,
}

pub(crate) fn map(
    pack: &Pack,
    msg: &Message<'_>,
    options: &MapOptions,
) -> Result<Bundle, MapError> {
    let msh = msg.msh();
    let field = |n: usize| {
        msh.field(9)
            .and_then(|f| f.component(n))
            .map(|v| v.text().trim().to_owned())
            .unwrap_or_default()
    };
    let event = format!("{}^{}", field(1), field(2));
    let Some(&index) = pack.by_event.get(&event) else {
        return Err(MapError {
            kind: MapErrorKind::NoMessageMap { event },
            segment: Some("MSH (segment 1)".into()),
            path: Some("MSH-9".into()),
            rule: None,
        });
    };
    let mm = &pack.messages[index];
    let tree = Tree::build(&pack.structures[mm.structure], msg);
    let mut exec = Exec {
        pack,
        msg,
        tree,
        doc: Doc::for_message(msg.bytes().len()),
        scratch: String::new(),
        offset: options.site_offset.or(pack.settings.site_offset),
        resources: Vec::new(),
        by_id: HashMap::with_capacity_and_hasher(32, FastHash::default()),
        built: HashMap::with_capacity(16),
        spare_lists: Vec::new(),
        left_empty: false,
        text: TextReader::new(msg),
    };
    let bundle = exec.run(mm)?;
    if bundle.overflowed() {
        return Err(MapError {
            kind: MapErrorKind::TooLarge,
            segment: None,
            path: None,
            rule: None,
        });
    }
    Ok(bundle)
}

fn seg_name(seg: Segment<'_, '_>) -> String {
    format!("{} (segment {})", seg.id(), seg.index() + 1)
}

/// Whether a value holds something besides separators, and is not the explicit null.
fn has_content(v: &Value<'_>) -> bool {
    if v.is_null() || v.is_empty() {
        return false;
    }
    let s = v.encoding().separators;
    v.raw()
        .iter()
        .any(|&b| b != s.component && b != s.subcomponent && b != s.repetition && b != b' ')
}

/// Reads the text of leaves. Most messages are ASCII, and most of their fields hold no
/// escape sequence: there, a leaf's text is a slice of the message taken as one `str`,
/// found in constant time (no unescaping, no character-set decoding, no UTF-8 check per
/// leaf). Other leaves are unescaped and decoded.
struct TextReader<'a> {
    /// The whole message as text when it is ASCII (its text in every character set), or "".
    plain: &'a str,
    /// Where the message's bytes start in memory, to find a leaf's offset in them.
    base: usize,
    /// Leaves that end before this offset contain no escape character: the first one after
    /// MSH-2 (which holds the escape character itself, read literally).
    plain_until: usize,
}

impl<'a> TextReader<'a> {
    fn new(msg: &Message<'a>) -> TextReader<'a> {
        let bytes = msg.bytes();
        let plain = std::str::from_utf8(bytes)
            .ok()
            .filter(|text| text.is_ascii())
            .unwrap_or_default();
        let after_msh2 = msg.msh().field_offset(3).min(bytes.len());
        let plain_until = match msg.separators().escape {
            Some(escape) => {
                memchr::memchr(escape, &bytes[after_msh2..]).map_or(bytes.len(), |p| after_msh2 + p)
            }
            None => bytes.len(),
        };
        TextReader {
            plain,
            base: bytes.as_ptr() as usize,
            plain_until,
        }
    }

    /// The trimmed text of a value's first leaf.
    fn leaf_text(&self, v: Value<'a>) -> Cow<'a, str> {
        let l = v.first_leaf();
        if l.is_null() {
            return Cow::Borrowed("");
        }
        self.trimmed_text(l)
    }

    /// The text of a value when it is a slice of the plain message.
    fn plain_text(&self, v: Value<'a>) -> Option<&'a str> {
        let raw = v.raw();
        let start = (raw.as_ptr() as usize).wrapping_sub(self.base);
        let end = start.wrapping_add(raw.len());
        if end <= self.plain_until {
            self.plain.get(start..end)
        } else {
            None
        }
    }

    /// The text of a value, as [`Value::text`] gives it.
    fn text(&self, v: Value<'a>) -> Cow<'a, str> {
        match self.plain_text(v) {
            Some(text) => Cow::Borrowed(text),
            None => v.text(),
        }
    }

    /// The text of a value without surrounding white space (as `str::trim` removes it).
    fn trimmed_text(&self, v: Value<'a>) -> Cow<'a, str> {
        if let Some(text) = self.plain_text(v) {
            // ASCII: the characters `char::is_whitespace` knows are tab to carriage return
            // and space, so trimming bytes trims the text.
            let blank = |b: &u8| matches!(b, b'\t'..=b'\r' | b' ');
            let bytes = text.as_bytes();
            let from = bytes.iter().position(|b| !blank(b)).unwrap_or(bytes.len());
            let to = bytes
                .iter()
                .rposition(|b| !blank(b))
                .map_or(from, |e| e + 1);
            return Cow::Borrowed(text.get(from..to).unwrap_or_default());
        }
        match v.text() {
            Cow::Borrowed(text) => Cow::Borrowed(text.trim()),
            Cow::Owned(text) => Cow::Owned(text.trim().to_owned()),
        }
    }
}

/// An empty resource of this type.
fn resource_body(doc: &mut Doc, resource_type: &str) -> Id {
    let body = doc.obj();
    let t = doc.str(resource_type);
    doc.push_member(body, names().resource_type, t);
    body
}

/// `{"reference": "urn:uuid:<id>"}`.
fn reference(doc: &mut Doc, id: &str) -> Id {
    let r = doc.obj();
    let urn = doc.str_of(&["urn:uuid:", id]);
    doc.push_member(r, names().reference, urn);
    r
}

impl<'p, 'm, 'a> Exec<'p, 'm, 'a> {
    fn run(&mut self, mm: &'p MessageMap) -> Result<Bundle, MapError> {
        let msg = self.msg;
        // (resource, row) pairs whose references are resolved once everything exists.
        let mut pending: Vec<(usize, &Row)> = Vec::new();
        for (row_index, row) in mm.rows.iter().enumerate() {
            let map = &self.pack.segments[row.map];
            for seg in msg.segments() {
                if seg.id_bytes().as_slice() != row.segment.as_bytes() {
                    continue;
                }
                let inst = self.tree.of_segment[seg.index()];
                if self.tree.instances[inst].group != row.group {
                    continue;
                }
                let here = Here { seg, value: None };
                if let Some(c) = &row.when
                    && !self.cond(c, here)
                {
                    continue;
                }
                let body = match &map.spec {
                    Some(spec) => resource_body(&mut self.doc, &spec.resource_type),
                    None => self.doc.obj(),
                };
                self.apply(&map.rules, here, body)?;
                if let (Some(_), Some(spec)) = (&row.label, &map.spec) {
                    let idx = self.create(spec, body, here, inst, Some(row_index))?;
                    pending.push((idx, row));
                } else if let Some(into) = row.into_row
                    && let Some(target) = self.nearest(into, inst)
                {
                    self.doc.remove(body, "resourceType");
                    self.doc.merge(self.resources[target].body, body);
                }
            }
        }
        let mut targets = Vec::new();
        for (idx, row) in pending {
            let inst = self.resources[idx].instance;
            for r in &row.refs {
                self.resolve(r.row, &r.within, inst, idx, &mut targets);
                let take = if r.to.appends() { targets.len() } else { 1 };
                for &t in targets.iter().take(take) {
                    let mut node = reference(&mut self.doc, &self.resources[t].id);
                    if let Some(at) = &r.at {
                        let wrapper = self.doc.obj();
                        self.doc.push_member(wrapper, *at, node);
                        node = wrapper;
                    }
                    for (k, v) in &r.with {
                        let value = self.doc.import(v);
                        self.doc.insert(node, *k, value);
                    }
                    self.left_empty |= set(&mut self.doc, self.resources[idx].body, &r.to, node);
                }
            }
        }
        Ok(self.assemble())
    }

    fn assemble(&mut self) -> Bundle {
        let names = names();
        let doc = &mut self.doc;
        let entries = doc.arr();
        let mut url = std::mem::take(&mut self.scratch);
        for res in self.resources.drain(..) {
            let body = res.body;
            if self.left_empty {
                doc.prune(body);
            }
            // `Type?identifier=system|value` for a conditional update, else `Type/id`.
            url.clear();
            url.push_str(res.resource_type);
            let identifier = if res.conditional {
                doc.get(body, "identifier")
                    .filter(|&ids| doc.is_arr(ids))
                    .and_then(|ids| {
                        doc.children(ids).find_map(|i| {
                            let system = doc.as_str(doc.get(i, "system")?)?;
                            let value = doc.as_str(doc.get(i, "value")?)?;
                            url.push_str("?identifier=");
                            url_encode_into(&mut url, system);
                            url.push('|');
                            url_encode_into(&mut url, value);
                            Some(())
                        })
                    })
            } else {
                None
            };
            match identifier {
                Some(()) => doc.remove(body, "id"),
                None => {
                    url.push('/');
                    url.push_str(&res.id);
                }
            }
            let entry = doc.obj();
            let full_url = doc.str_of(&["urn:uuid:", &res.id]);
            doc.push_member(entry, names.full_url, full_url);
            doc.push_member(entry, names.resource, body);
            let request = doc.obj();
            let method = doc.str("PUT");
            doc.push_member(request, names.method, method);
            let target = doc.str(&url);
            doc.push_member(request, names.url, target);
            doc.push_member(entry, names.request, request);
            doc.push_item(entries, entry);
        }
        self.scratch = url;
        let root = doc.obj();
        let bundle_type = doc.str("Bundle");
        doc.push_member(root, names.resource_type, bundle_type);
        let kind = doc.str("transaction");
        doc.push_member(root, names.kind, kind);
        doc.push_member(root, names.entry, entries);
        Bundle::new(std::mem::take(doc), root)
    }

    /// Adds a resource, or merges it into the one with the same type and id.
    fn create(
        &mut self,
        spec: &'p ResourceSpec,
        body: Id,
        here: Here<'_, 'm, 'a>,
        instance: usize,
        row: Option<usize>,
    ) -> Result<usize, MapError> {
        // The id hashes "type␟key1␟key2…" (or "type␟…␞content" when no key is sent),
        // fed piece by piece.
        let mut key = sha256::KeyHasher::default();
        key.update(spec.resource_type.as_bytes());
        let mut any = false;
        for src in &spec.id {
            key.update(b"\x1f");
            if let Some((v, _)) = self.first(src, here) {
                any = true;
                key.update(self.text.text(v).as_bytes());
            }
        }
        if !any {
            // No key sent: the content itself identifies the resource.
            key.update(b"\x1e");
            self.scratch.clear();
            self.doc.write(body, &mut self.scratch, false, 0);
            key.update(self.scratch.as_bytes());
        }
        let mut digest = key.clone().digest();
        if let Some(&existing) = self.by_id.get(&digest) {
            if spec.merge {
                self.doc.remove(body, "resourceType");
                self.doc.merge(self.resources[existing].body, body);
                if self.resources[existing].row.is_none() {
                    self.resources[existing].row = row;
                }
                return Ok(existing);
            }
            let mut n = 2;
            while self.by_id.contains_key(&digest) {
                let mut numbered = key.clone();
                numbered.update(format!("#{n}").as_bytes());
                digest = numbered.digest();
                n += 1;
            }
        }
        let id = sha256::uuid_text(&digest);
        let id_node = self.doc.str(&id);
        self.doc.insert_second(body, names().id, id_node);
        self.by_id.insert(digest, self.resources.len());
        self.resources.push(Res {
            resource_type: &spec.resource_type,
            id,
            body,
            conditional: spec.conditional,
            instance,
            row,
        });
        Ok(self.resources.len() - 1)
    }

    /// The first resource labelled by `row` in `inst` or the nearest enclosing instance.
    fn nearest(&self, row: usize, inst: usize) -> Option<usize> {
        let mut cur = Some(inst);
        while let Some(i) = cur {
            if let Some(r) = self
                .resources
                .iter()
                .position(|r| r.instance == i && r.row == Some(row))
            {
                return Some(r);
            }
            cur = self.tree.instances[i].parent;
        }
        None
    }

    /// The resources a reference to the label of `row` points to from resource `me` (of
    /// group instance `inst`), into `out`.
    fn resolve(&self, row: usize, within: &Within, inst: usize, me: usize, out: &mut Vec<usize>) {
        out.clear();
        let labelled =
            (0..self.resources.len()).filter(|&r| r != me && self.resources[r].row == Some(row));
        match within {
            Within::Nearest => {
                let mut cur = Some(inst);
                while let Some(i) = cur {
                    out.extend(
                        labelled
                            .clone()
                            .filter(|&r| self.resources[r].instance == i),
                    );
                    if !out.is_empty() {
                        return;
                    }
                    cur = self.tree.instances[i].parent;
                }
            }
            Within::Group(g) => {
                let mut cur = Some(inst);
                while let Some(i) = cur {
                    if self.tree.instances[i].group == Some(*g) {
                        out.extend(
                            labelled
                                .filter(|&r| self.tree.is_within(self.resources[r].instance, i)),
                        );
                        return;
                    }
                    cur = self.tree.instances[i].parent;
                }
            }
            Within::All => out.extend(labelled),
        }
    }

    fn error(
        &self,
        kind: MapErrorKind,
        here: Here<'_, '_, '_>,
        path: Option<String>,
        rule: &Rule,
    ) -> MapError {
        MapError {
            kind,
            segment: Some(seg_name(here.seg)),
            path,
            rule: Some(rule.loc.clone()),
        }
    }

    fn apply(&mut self, rules: &[Rule], here: Here<'_, 'm, 'a>, out: Id) -> Result<(), MapError> {
        for rule in rules {
            if let Some(c) = &rule.when
                && !self.cond(c, here)
            {
                continue;
            }
            let Some(src) = &rule.from else {
                if let Some(v) = &rule.value {
                    let node = self.doc.import(v);
                    self.left_empty |= set(&mut self.doc, out, &rule.to, node);
                }
                continue;
            };
            if let Some(sep) = &rule.join {
                // Every path is read and every value's text joined.
                let mut text = String::new();
                for p in &src.0 {
                    self.each(p, here, &mut |v| {
                        if has_content(&v) {
                            let t = self.text.leaf_text(v);
                            if !t.is_empty() {
                                if !text.is_empty() {
                                    text.push_str(sep);
                                }
                                text.push_str(&t);
                            }
                        }
                        true
                    });
                }
                if !text.is_empty() {
                    let node = self.doc.str(&text);
                    self.left_empty |= set(&mut self.doc, out, &rule.to, node);
                }
                continue;
            }
            if !rule.to.appends() {
                let Some((v, i)) = self.first(src, here) else {
                    continue;
                };
                let node = match &rule.value {
                    // `from` + `value`: the constant, when the path is valued.
                    Some(constant) => Some(self.doc.import(constant)),
                    None => self.convert(rule, v, here, &src.0[i])?,
                };
                if let Some(node) = node {
                    self.left_empty |= set(&mut self.doc, out, &rule.to, node);
                }
                continue;
            }
            let mut values = self.spare_lists.pop().unwrap_or_default();
            let i = self.all(src, here, &mut values);
            let result = self.append_all(rule, &values, here, &src.0[i], out);
            values.clear();
            self.spare_lists.push(values);
            result?;
        }
        Ok(())
    }

    /// Writes every value of an appending rule (`to = "x[]"`).
    fn append_all(
        &mut self,
        rule: &Rule,
        values: &[Value<'a>],
        here: Here<'_, 'm, 'a>,
        path: &SrcPath,
        out: Id,
    ) -> Result<(), MapError> {
        if values.is_empty() {
            return Ok(());
        }
        if let Some(constant) = &rule.value {
            let node = self.doc.import(constant);
            self.left_empty |= set(&mut self.doc, out, &rule.to, node);
            return Ok(());
        }
        for &v in values {
            if let Some(node) = self.convert(rule, v, here, path)? {
                self.left_empty |= set(&mut self.doc, out, &rule.to, node);
            }
        }
        Ok(())
    }

    fn convert(
        &mut self,
        rule: &Rule,
        v: Value<'a>,
        here: Here<'_, 'm, 'a>,
        path: &SrcPath,
    ) -> Result<Option<Id>, MapError> {
        match &rule.convert {
            Convert::Primitive(f) => self
                .primitive(*f, v)
                .map_err(|kind| self.error(kind, here, Some(path_name(path, here)), rule)),
            Convert::Vocab(n) => {
                let vocab = &self.pack.vocabularies[*n];
                let code = self.text.leaf_text(v);
                if code.is_empty() {
                    return Ok(None);
                }
                match vocab.map.get(&*code) {
                    Some(c) => Ok(Some(self.doc.str(c))),
                    None => match vocab.unknown {
                        Unknown::Default => Ok(vocab.default.as_deref().map(|d| self.doc.str(d))),
                        Unknown::Omit => Ok(None),
                        Unknown::Pass => Ok(Some(self.doc.str(&code))),
                        Unknown::Error => Err(self.error(
                            MapErrorKind::UnknownCode {
                                vocabulary: vocab.name.clone(),
                            },
                            here,
                            Some(path_name(path, here)),
                            rule,
                        )),
                    },
                }
            }
            Convert::Datatype(n) => {
                let pack = self.pack;
                let dt = &pack.datatypes[*n];
                if dt.pure
                    && dt.resource.is_some()
                    && let Some(&idx) = self.built.get(&(*n, v.raw()))
                {
                    return Ok(Some(reference(&mut self.doc, &self.resources[idx].id)));
                }
                let index = v.index_children();
                let inner = Here {
                    seg: here.seg,
                    value: Some(&index),
                };
                let node = match &dt.resource {
                    Some(spec) => resource_body(&mut self.doc, &spec.resource_type),
                    None => self.doc.obj(),
                };
                self.apply(&dt.rules, inner, node)?;
                if self.left_empty {
                    self.doc.prune(node);
                }
                match &dt.resource {
                    Some(spec) if self.doc.get(node, "resourceType").is_some() => {
                        if self.doc.len(node) == 1 {
                            return Ok(None);
                        }
                        let inst = self.tree.of_segment[here.seg.index()];
                        let idx = self.create(spec, node, inner, inst, None)?;
                        if dt.pure {
                            self.built.insert((*n, v.raw()), idx);
                        }
                        Ok(Some(reference(&mut self.doc, &self.resources[idx].id)))
                    }
                    _ => Ok(Some(node)),
                }
            }
        }
    }

    fn primitive(&mut self, f: Func, v: Value<'a>) -> Result<Option<Id>, MapErrorKind> {
        let conversion = |what: &str| MapErrorKind::Conversion { what: what.into() };
        if f == Func::Raw {
            let text = self.text.text(v);
            let t = text.trim();
            return Ok((!t.is_empty()).then(|| self.doc.str(t)));
        }
        let text = self.text.leaf_text(v);
        if text.is_empty() {
            return Ok(None);
        }
        let doc = &mut self.doc;
        Ok(Some(match f {
            Func::Text | Func::Raw => doc.str(&text),
            Func::Date => {
                let dt = DateTime::parse(&text).map_err(|_| conversion("date (DTM)"))?;
                doc.str_written(|out| dt.write_fhir_date(out))
            }
            Func::DateTime | Func::Instant => {
                let dt = DateTime::parse(&text).map_err(|_| conversion("date/time (DTM)"))?;
                if f == Func::Instant && !dt.has_time() {
                    return Ok(None);
                }
                if dt.has_time() && dt.offset_minutes.is_none() {
                    match self.pack.settings.naive_timestamps {
                        NaiveTimestamps::Reject => return Err(MapErrorKind::NoOffset),
                        NaiveTimestamps::DateOnly if f == Func::DateTime => {
                            return Ok(Some(doc.str_written(|out| dt.write_fhir_date(out))));
                        }
                        _ => {}
                    }
                }
                if !dt.has_time() {
                    doc.str_written(|out| dt.write_fhir_date(out))
                } else {
                    let offset = match dt.offset_minutes {
                        Some(o) => o,
                        None => {
                            let standard = self.offset.ok_or(MapErrorKind::NoOffset)?;
                            crate::tz::offset_at(&dt, standard, self.pack.settings.summer_time)
                        }
                    };
                    doc.str_written(|out| dt.write_fhir_datetime_at(offset, out))
                }
            }
            Func::Decimal => doc.num(
                Number::parse(&text)
                    .map_err(|_| conversion("number (NM)"))?
                    .as_str(),
            ),
            Func::Integer => doc.num(
                &text
                    .parse::<i64>()
                    .map_err(|_| conversion("integer"))?
                    .to_string(),
            ),
            Func::PositiveInt => match text.parse::<u64>() {
                Ok(n) if n > 0 => doc.num(&n.to_string()),
                _ => return Err(conversion("positive integer")),
            },
            Func::Boolean => match &*text {
                "Y" | "y" | "true" | "1" => doc.bool(true),
                "N" | "n" | "false" | "0" => doc.bool(false),
                _ => return Err(conversion("boolean (Y/N)")),
            },
            Func::SystemUri => doc.str(&system_uri(&text, &self.pack.settings.local_system_base)),
            Func::Base64 => {
                let b: String = text.chars().filter(|c| !c.is_whitespace()).collect();
                if !b
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=')
                {
                    return Err(conversion("base64 text"));
                }
                doc.str(&b)
            }
            Func::RangeLow | Func::RangeHigh => {
                let (low, high) = range(&text);
                let bound = if f == Func::RangeLow { low } else { high };
                match bound.and_then(|b| Number::parse(b).ok()) {
                    Some(n) => doc.num(n.as_str()),
                    None => return Ok(None),
                }
            }
        }))
    }

    /// The first value with content, from the first alternative that has one, and the
    /// index of that alternative.
    fn first(&self, src: &Source, here: Here<'_, 'm, 'a>) -> Option<(Value<'a>, usize)> {
        for (i, p) in src.0.iter().enumerate() {
            let mut found = None;
            self.each(p, here, &mut |v| {
                if has_content(&v) {
                    found = Some(v);
                    false
                } else {
                    true
                }
            });
            if let Some(v) = found {
                return Some((v, i));
            }
        }
        None
    }

    /// Every value with content of the first alternative that has one.
    fn all(&self, src: &Source, here: Here<'_, 'm, 'a>, out: &mut Vec<Value<'a>>) -> usize {
        for (i, p) in src.0.iter().enumerate() {
            self.each(p, here, &mut |v| {
                if has_content(&v) {
                    out.push(v);
                }
                true
            });
            if !out.is_empty() {
                return i;
            }
        }
        0
    }

    /// Calls `f` with each value the path selects, until it returns false.
    fn each(&self, p: &SrcPath, here: Here<'_, 'm, 'a>, f: &mut dyn FnMut(Value<'a>) -> bool) {
        match p {
            SrcPath::Relative(parts) => {
                let Some(index) = here.value else {
                    return;
                };
                let mut v = match parts.split_first() {
                    Some((&n, _)) => match index.child(n) {
                        Some(c) => c,
                        None => return,
                    },
                    None => index.value(),
                };
                for &n in parts.iter().skip(1) {
                    match v.child(n) {
                        Some(c) => v = c,
                        None => return,
                    }
                }
                f(v);
            }
            SrcPath::Segment(path, id) => {
                let seg = if here.seg.id_bytes() == id {
                    Some(here.seg)
                } else if path.occurrence() != Selector::Nth(1) {
                    for v in self.msg.iter(path) {
                        if !f(v) {
                            return;
                        }
                    }
                    return;
                } else {
                    self.find_segment(id, here.seg)
                };
                if let Some(seg) = seg {
                    // Most paths name one repetition: read it straight.
                    if let Some(single) = path.single_value_in(seg) {
                        if let Some(v) = single {
                            f(v);
                        }
                        return;
                    }
                    for v in path.values_in(seg) {
                        if !f(v) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The nearest segment with this id: in the same group instance, then the enclosing ones.
    fn find_segment(&self, id: &[u8; 3], from: Segment<'m, 'a>) -> Option<Segment<'m, 'a>> {
        let mut cur = Some(self.tree.of_segment[from.index()]);
        while let Some(i) = cur {
            let inst = &self.tree.instances[i];
            for &s in &inst.segments {
                if let Some(seg) = self.msg.segment(s)
                    && seg.id_bytes() == id
                {
                    return Some(seg);
                }
            }
            cur = inst.parent;
        }
        None
    }

    fn cond(&self, c: &Cond, here: Here<'_, 'm, 'a>) -> bool {
        let first_is = |p: &SrcPath, test: &dyn Fn(&str) -> bool| {
            let mut result = false;
            self.each(p, here, &mut |v| {
                if has_content(&v) {
                    let l = v.first_leaf();
                    result = !l.is_null() && test(&self.text.trimmed_text(l));
                    false
                } else {
                    true
                }
            });
            result
        };
        let count = |p: &SrcPath, stop_at: usize| {
            let mut n = 0;
            self.each(p, here, &mut |v| {
                if has_content(&v) {
                    n += 1;
                }
                n < stop_at
            });
            n
        };
        match c {
            Cond::Valued(p) => count(p, 1) > 0,
            Cond::Equals(p, s) => first_is(p, &|t| t == s),
            Cond::In(p, items) => first_is(p, &|t| items.iter().any(|i| i == t)),
            Cond::Any(p, items) => {
                let mut found = false;
                self.each(p, here, &mut |v| {
                    if has_content(&v) {
                        let l = v.first_leaf();
                        found =
                            !l.is_null() && items.iter().any(|i| *i == *self.text.trimmed_text(l));
                    }
                    !found
                });
                found
            }
            Cond::Count(p, op, n) => {
                let count = count(p, usize::MAX);
                match op {
                    Cmp::Eq => count == *n,
                    Cmp::Ne => count != *n,
                    Cmp::Lt => count < *n,
                    Cmp::Le => count <= *n,
                    Cmp::Gt => count > *n,
                    Cmp::Ge => count >= *n,
                }
            }
            Cond::And(a, b) => self.cond(a, here) && self.cond(b, here),
            Cond::Or(a, b) => self.cond(a, here) || self.cond(b, here),
            Cond::Not(a) => !self.cond(a, here),
        }
    }
}

fn path_name(p: &SrcPath, here: Here<'_, '_, '_>) -> String {
    match p {
        SrcPath::Segment(path, _) => path.to_string(),
        SrcPath::Relative(parts) => {
            let rel: Vec<String> = parts.iter().map(|n| n.to_string()).collect();
            format!("{} (component {})", here.seg.id(), rel.join("."))
        }
    }
}

/// Writes `node` at `target`: plain members are set once (the first rule to write wins,
/// objects merge), `[]` appends, `[n]` addresses an element. An empty node writes nothing.
///
/// Returns whether the write may have left an empty member behind (an element `[2]`
/// written before `[1]`, or a path that met a member of another shape): the executor
/// prunes empties only then, so a bundle that never had any is not walked for them.
#[must_use]
pub(crate) fn set(doc: &mut Doc, out: Id, target: &Target, node: Id) -> bool {
    if doc.is_empty(node) {
        return false;
    }
    let steps = &target.0;
    let mut cur = out;
    let mut left_empty = false;
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        match step.index {
            Index::None => {
                if last {
                    // Not an object (another rule wrote a value here): nothing to add to.
                    if doc.is_obj(cur) {
                        match doc.member(cur, step.key) {
                            Some(existing) => doc.merge(existing, node),
                            None => doc.push_member(cur, step.key, node),
                        }
                    }
                    return left_empty;
                }
                cur = doc.entry(cur, step.key, Doc::obj);
            }
            Index::Append => {
                let arr = doc.entry(cur, step.key, Doc::arr);
                if !doc.is_arr(arr) {
                    return true;
                }
                if last {
                    doc.push_item(arr, node);
                    return left_empty;
                }
                let element = doc.obj();
                doc.push_item(arr, element);
                cur = element;
            }
            Index::At(n) => {
                let arr = doc.entry(cur, step.key, Doc::arr);
                if !doc.is_arr(arr) {
                    return true;
                }
                let mut len = doc.len(arr);
                left_empty |= len < n;
                while len <= n {
                    let element = doc.obj();
                    doc.push_item(arr, element);
                    len += 1;
                }
                let Some(element) = doc.nth(arr, n) else {
                    return left_empty;
                };
                if last {
                    if doc.is_empty(element) {
                        doc.replace(element, node);
                    } else {
                        doc.merge(element, node);
                    }
                    return left_empty;
                }
                cur = element;
            }
        }
    }
    left_empty
}

fn system_uri(text: &str, base: &str) -> String {
    let is_oid = text.contains('.')
        && text.starts_with(|c: char| c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_digit() || c == '.');
    if is_oid {
        let mut uri = String::with_capacity(8 + text.len());
        uri.push_str("urn:oid:");
        uri.push_str(text);
        uri
    } else if text.contains(':') && !text.contains(' ') {
        text.to_owned()
    } else {
        let mut uri = String::with_capacity(base.len() + text.len());
        uri.push_str(base);
        url_encode_into(&mut uri, text);
        uri
    }
}

/// Percent-encodes `s` onto `out`, leaving unreserved characters and `:` `/` as they are.
fn url_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Splits a reference range: `3.5-5.1`, `<5`, `<=5`, `>10`, `>=10`, `-1-1`.
fn range(text: &str) -> (Option<&str>, Option<&str>) {
    let t = text.trim();
    if let Some(r) = t.strip_prefix("<=").or_else(|| t.strip_prefix('<')) {
        return (None, Some(r.trim()));
    }
    if let Some(r) = t.strip_prefix(">=").or_else(|| t.strip_prefix('>')) {
        return (Some(r.trim()), None);
    }
    match t.char_indices().skip(1).find(|&(_, c)| c == '-') {
        Some((p, _)) => (Some(t[..p].trim()), Some(t[p + 1..].trim())),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack with one message map, `event` → Patient from PID, whose rows are `rules`
    /// (TOML inline tables, trailing commas included).
    fn patient_pack(event: &str, rules: &[&str]) -> crate::Pack {
        let text = format!(
            r#"
[pack]
name = "t"
fhir_version = "4.0.1"

[[structure]]
name = "FLAT"

[[segment]]
name = "PID"
segment = "PID"
resource = "Patient"
id = ["PID-3.1"]
rules = [
{}
]

[[message]]
name = "ADT"
events = ["{event}"]
structure = "FLAT"
resources = [{{ label = "Patient", for = "PID", map = "PID" }}]
"#,
            rules.join("\n")
        );
        crate::Pack::from_texts(&[("p.toml", &text)]).unwrap()
    }

    /// `any` reads every repetition; `in` only the first.
    #[test]
    fn any_matches_a_later_repetition() {
        let pack = patient_pack(
            "ADT^A28",
            &[
                r#"{ value = "any", to = "meta.tag[].code", when = 'any(PID-32[*], ["VALI", "QUAL"])' },"#,
                r#"{ value = "in", to = "meta.tag[].code", when = 'in(PID-32[*], ["VALI"])' },"#,
                r#"{ value = "none", to = "meta.tag[].code", when = 'not any(PID-32[*], ["VALI"])' },"#,
            ],
        );
        let tags = |pid32: &str| {
            // PID-3 = 42, then fields 4 to 31 empty, then PID-32.
            let text = format!(
                "MSH|^~\\&|A|B|||20240101||ADT^A28|1|P|2.5\rPID|1||42{}|{pid32}\r",
                "|".repeat(28)
            );
            let message = passerelle_hl7::Message::parse(text.as_bytes()).unwrap();
            let json = crate::exec::map(&pack, &message, &crate::MapOptions::default())
                .unwrap()
                .to_json(false);
            ["any", "in", "none"]
                .into_iter()
                .filter(|t| json.contains(&format!(r#""code":"{t}""#)))
                .collect::<Vec<_>>()
        };
        assert_eq!(tags("PROV~VALI"), ["any"]);
        assert_eq!(tags("VALI~DOUB"), ["any", "in"]);
        assert_eq!(tags("PROV"), ["none"]);
        assert_eq!(tags("\"\"~DOUB~QUAL"), ["any", "none"]);
    }

    /// Empties are pruned only after a write that may leave one; when one does, none stays.
    #[test]
    fn gaps_left_by_indexed_writes_are_pruned() {
        let pack = patient_pack(
            "ADT^A01",
            &[
                r#"{ from = "PID-5.1", to = "name[2].family" },"#,
                r#"{ from = "PID-5.2", to = "name[2].given[]" },"#,
                r#"{ from = "PID-6.1", to = "name[0].family" },"#,
                r#"{ value = "", to = "gender" },"#,
            ],
        );
        let json = |pid: &str| {
            let text = format!("MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||42||{pid}\r");
            let message = passerelle_hl7::Message::parse(text.as_bytes()).unwrap();
            let bundle = crate::exec::map(&pack, &message, &crate::MapOptions::default()).unwrap();
            let patient = bundle.resources().next().unwrap().to_json(false);
            patient[patient.find("\"name\"").unwrap()..].to_owned()
        };
        // name[0] and name[1] were never written: pruned, so the name moves to the front.
        assert_eq!(
            json("DOE^JANE"),
            r#""name":[{"family":"DOE","given":["JANE"]}]}"#
        );
        assert_eq!(
            json("DOE^JANE|ROE"),
            r#""name":[{"family":"ROE"},{"family":"DOE","given":["JANE"]}]}"#
        );
    }

    /// The one-pass reading of plain leaves gives what unescaping, decoding and trimming give.
    #[test]
    fn trimmed_text_is_the_trimmed_decoded_text() {
        for (charset, field) in [
            ("UNICODE UTF-8", " Jos\u{e9} "),
            ("8859/1", " a\\X41\\b "),
            ("8859/1", " \\X09\\x\\X0B\\ "),
            ("", "\\T\\ "),
            ("", "   "),
            ("", "plain"),
            ("", " a ^ b | c\\T\\d ^e| f &g~ h"),
        ] {
            let text = format!(
                "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5|||||{charset}\rPID|1||{field}\r"
            );
            let message = passerelle_hl7::Message::parse(text.as_bytes()).unwrap();
            let reader = TextReader::new(&message);
            let pid = message.segments().nth(1).unwrap();
            let mut values: Vec<Value<'_>> = pid.fields().chain(message.msh().fields()).collect();
            for _ in 0..3 {
                let children: Vec<Value<'_>> = values.iter().flat_map(|v| v.children()).collect();
                values.extend(children);
            }
            for value in values {
                let text = value.text();
                assert_eq!(reader.text(value), text, "{field:?}");
                assert_eq!(reader.trimmed_text(value), text.trim(), "{field:?}");
            }
        }
    }

    #[test]
    fn ranges_and_systems() {
        assert_eq!(range("3.5-5.1"), (Some("3.5"), Some("5.1")));
        assert_eq!(range("<5"), (None, Some("5")));
        assert_eq!(range(">=10"), (Some("10"), None));
        assert_eq!(range("-1-1"), (Some("-1"), Some("1")));
        assert_eq!(range("negative"), (None, None));
        assert_eq!(
            system_uri("2.16.840.1.113883.4.1", "x:"),
            "urn:oid:2.16.840.1.113883.4.1"
        );
        assert_eq!(system_uri("http://loinc.org", "x:"), "http://loinc.org");
        assert_eq!(system_uri("RB GH", "urn:s:"), "urn:s:RB%20GH");
    }
}

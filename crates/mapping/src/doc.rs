//! The document the executor builds: a JSON tree held in two flat buffers, one of
//! nodes and one of text, so that mapping a message allocates a few growing buffers
//! instead of one block per object, array and long string, and dropping a bundle frees
//! two blocks instead of walking the tree.
//!
//! Nodes are linked by index: an object or array knows its first and last child, every
//! child its next sibling (and, in an object, its member name). A node is built detached
//! and linked into its parent once complete; nodes that end up unlinked (a fragment
//! merged away, a value that turned out empty) stay in the buffer as garbage and are never
//! written, since writing walks from the root.
//!
//! Invariants:
//! - links never form a cycle: a node is linked into at most one parent, and only a
//!   detached node (or a child of a detached fragment being merged) is linked;
//! - objects keep their members in the order they were first written, so the JSON is
//!   byte-identical for the same rules and message (see the crate's invariants);
//! - indexes are `u32`. A document whose text or node count would pass `u32::MAX` stops
//!   linking and reports [`Doc::overflowed`], and the executor refuses the message.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::json::{Key, Node};

/// A node: its index in the document.
pub(crate) type Id = u32;

/// "No node": the end of a sibling list, or an empty object's first child.
const NIL: Id = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Num,
    True,
    False,
    Obj,
    Arr,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The member name, for a member of an object.
    key: Option<Key>,
    kind: Kind,
    /// A string or number: where its text starts in `Doc::text`. An object or array:
    /// its first child.
    a: u32,
    /// A string or number: where its text ends. An object or array: its last child.
    b: u32,
    /// The next member or element of the parent.
    next: Id,
}

/// A JSON document under construction (see the module documentation).
#[derive(Clone, Default)]
pub(crate) struct Doc {
    slots: Vec<Slot>,
    text: String,
    /// Set when an index would not fit in `u32`: nothing is linked from then on.
    overflow: bool,
}

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Doc")
            .field("nodes", &self.slots.len())
            .field("text_bytes", &self.text.len())
            .finish()
    }
}

impl Doc {
    /// A document with room for the bundle of a message of `len` bytes. The fixtures'
    /// bundles hold about 0.3 nodes and up to 4.5 bytes of text (system URIs, urn:uuid
    /// references…) per message byte; a large message is mostly one long value (a base64
    /// document), so beyond a few kilobytes only the text grows with it.
    pub(crate) fn for_message(len: usize) -> Doc {
        Doc {
            slots: Vec::with_capacity(64 + (len / 2).min(8192)),
            text: String::with_capacity(1024 + len + (4 * len).min(64 * 1024)),
            overflow: false,
        }
    }

    /// A generous estimate of the JSON's length, to write it without regrowing.
    pub(crate) fn json_len_hint(&self) -> usize {
        self.text.len() + 16 * self.slots.len()
    }

    /// Whether the document grew past what `u32` indexes address (see the module doc).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow
    }

    fn slot(&self, id: Id) -> &Slot {
        &self.slots[id as usize]
    }

    fn slot_mut(&mut self, id: Id) -> &mut Slot {
        &mut self.slots[id as usize]
    }

    fn push(&mut self, kind: Kind, a: u32, b: u32) -> Id {
        let id = match u32::try_from(self.slots.len()) {
            Ok(id) if id != NIL => id,
            _ => {
                self.overflow = true;
                return 0;
            }
        };
        self.slots.push(Slot {
            key: None,
            kind,
            a,
            b,
            next: NIL,
        });
        id
    }

    /// A string or number node whose text `write` appends to the text buffer.
    fn text_node(&mut self, kind: Kind, write: impl FnOnce(&mut String)) -> Id {
        let start = self.text.len();
        write(&mut self.text);
        match (u32::try_from(start), u32::try_from(self.text.len())) {
            (Ok(a), Ok(b)) => self.push(kind, a, b),
            _ => {
                self.overflow = true;
                self.text.truncate(start);
                0
            }
        }
    }

    pub(crate) fn str(&mut self, text: &str) -> Id {
        self.text_node(Kind::Str, |t| t.push_str(text))
    }

    /// A string made of several pieces, written once into the text buffer.
    pub(crate) fn str_of(&mut self, pieces: &[&str]) -> Id {
        self.text_node(Kind::Str, |t| pieces.iter().for_each(|p| t.push_str(p)))
    }

    /// A string that `write` appends to the text buffer itself (a date formatted in
    /// place, without a string of its own).
    pub(crate) fn str_written(&mut self, write: impl FnOnce(&mut String)) -> Id {
        self.text_node(Kind::Str, write)
    }

    /// A number, from its canonical decimal text.
    pub(crate) fn num(&mut self, text: &str) -> Id {
        self.text_node(Kind::Num, |t| t.push_str(text))
    }

    pub(crate) fn bool(&mut self, value: bool) -> Id {
        self.push(if value { Kind::True } else { Kind::False }, 0, 0)
    }

    pub(crate) fn obj(&mut self) -> Id {
        self.push(Kind::Obj, NIL, NIL)
    }

    pub(crate) fn arr(&mut self) -> Id {
        self.push(Kind::Arr, NIL, NIL)
    }

    /// A copy of a constant from the pack.
    pub(crate) fn import(&mut self, node: &Node) -> Id {
        match node {
            Node::Str(s) => self.str(s),
            Node::Num(n) => self.num(n),
            Node::Bool(b) => self.bool(*b),
            Node::Obj(members) => {
                let id = self.obj();
                for (k, v) in members {
                    let child = self.import(v);
                    self.push_member(id, *k, child);
                }
                id
            }
            Node::Arr(items) => {
                let id = self.arr();
                for v in items {
                    let child = self.import(v);
                    self.push_item(id, child);
                }
                id
            }
        }
    }

    pub(crate) fn is_obj(&self, id: Id) -> bool {
        self.slot(id).kind == Kind::Obj
    }

    pub(crate) fn is_arr(&self, id: Id) -> bool {
        self.slot(id).kind == Kind::Arr
    }

    /// Empty strings, objects and arrays carry nothing (children are not looked into:
    /// [`Doc::prune`] removes empty children first where that matters).
    pub(crate) fn is_empty(&self, id: Id) -> bool {
        let s = self.slot(id);
        match s.kind {
            Kind::Str => s.a == s.b,
            Kind::Num | Kind::True | Kind::False => false,
            Kind::Obj | Kind::Arr => s.a == NIL,
        }
    }

    /// The text of a string node.
    pub(crate) fn as_str(&self, id: Id) -> Option<&str> {
        let s = self.slot(id);
        (s.kind == Kind::Str).then(|| self.text_of(s))
    }

    fn text_of(&self, s: &Slot) -> &str {
        &self.text[s.a as usize..s.b as usize]
    }

    /// The children of an object or array, in order.
    pub(crate) fn children(&self, id: Id) -> Children<'_> {
        let s = self.slot(id);
        let first = match s.kind {
            Kind::Obj | Kind::Arr => s.a,
            _ => NIL,
        };
        Children {
            doc: self,
            next: first,
        }
    }

    /// How many children an object or array has.
    pub(crate) fn len(&self, id: Id) -> usize {
        self.children(id).count()
    }

    /// Links a detached node as the last child of `parent`.
    fn link_last(&mut self, parent: Id, child: Id) {
        if self.overflow {
            return;
        }
        self.slot_mut(child).next = NIL;
        let last = self.slot(parent).b;
        if last == NIL {
            self.slot_mut(parent).a = child;
        } else {
            self.slot_mut(last).next = child;
        }
        self.slot_mut(parent).b = child;
    }

    /// Adds a member at the end of an object (the caller knows `key` is not there yet).
    pub(crate) fn push_member(&mut self, obj: Id, key: Key, child: Id) {
        self.slot_mut(child).key = Some(key);
        self.link_last(obj, child);
    }

    /// Adds an element at the end of an array.
    pub(crate) fn push_item(&mut self, arr: Id, child: Id) {
        self.slot_mut(child).key = None;
        self.link_last(arr, child);
    }

    /// The member `key` of an object (names compare by address: they are interned).
    pub(crate) fn member(&self, obj: Id, key: Key) -> Option<Id> {
        self.children(obj).find(|&c| self.slot(c).key == Some(key))
    }

    /// The member named `key`, compared by text.
    pub(crate) fn get(&self, obj: Id, key: &str) -> Option<Id> {
        if !self.is_obj(obj) {
            return None;
        }
        self.children(obj)
            .find(|&c| self.slot(c).key.is_some_and(|k| k.as_str() == key))
    }

    /// The member `key` of `obj`, created with `make` when absent. A scalar met on the way
    /// becomes an empty object first (only objects are walked into).
    pub(crate) fn entry(&mut self, obj: Id, key: Key, make: fn(&mut Doc) -> Id) -> Id {
        if !self.is_obj(obj) {
            let s = self.slot_mut(obj);
            s.kind = Kind::Obj;
            s.a = NIL;
            s.b = NIL;
        }
        match self.member(obj, key) {
            Some(existing) => existing,
            None => {
                let child = make(self);
                self.push_member(obj, key, child);
                child
            }
        }
    }

    /// The `n`th element (0-based) of an array.
    pub(crate) fn nth(&self, arr: Id, n: usize) -> Option<Id> {
        self.children(arr).nth(n)
    }

    /// Puts the detached node `with` in the place of `id`: same key, same position.
    pub(crate) fn replace(&mut self, id: Id, with: Id) {
        if self.overflow {
            return;
        }
        let new = *self.slot(with);
        let old = self.slot_mut(id);
        *old = Slot {
            key: old.key,
            next: old.next,
            ..new
        };
    }

    /// Sets `key` on an object: replaces the member when present, else adds it at the end.
    pub(crate) fn insert(&mut self, obj: Id, key: Key, child: Id) {
        match self.member(obj, key) {
            Some(existing) => self.replace(existing, child),
            None => self.push_member(obj, key, child),
        }
    }

    /// Inserts a member right after the first one (`id` after `resourceType`), or first
    /// in an empty object.
    pub(crate) fn insert_second(&mut self, obj: Id, key: Key, child: Id) {
        if self.overflow {
            return;
        }
        self.slot_mut(child).key = Some(key);
        let first = self.slot(obj).a;
        if first == NIL {
            self.link_last(obj, child);
            return;
        }
        let after = self.slot(first).next;
        self.slot_mut(child).next = after;
        self.slot_mut(first).next = child;
        if after == NIL {
            self.slot_mut(obj).b = child;
        }
    }

    /// Unlinks the member named `key`; the node stays as garbage.
    pub(crate) fn remove(&mut self, obj: Id, key: &str) {
        let Some(target) = self.get(obj, key) else {
            return;
        };
        self.unlink(obj, target);
    }

    fn unlink(&mut self, parent: Id, target: Id) {
        let mut prev = NIL;
        let mut cur = self.slot(parent).a;
        while cur != NIL && cur != target {
            prev = cur;
            cur = self.slot(cur).next;
        }
        if cur == NIL {
            return;
        }
        let next = self.slot(target).next;
        if prev == NIL {
            self.slot_mut(parent).a = next;
        } else {
            self.slot_mut(prev).next = next;
        }
        if self.slot(parent).b == target {
            self.slot_mut(parent).b = prev;
        }
        self.slot_mut(target).next = NIL;
    }

    /// Merges the detached fragment `theirs` into `mine`: members `mine` lacks are added,
    /// objects are merged member by member, array elements not already present are
    /// appended; scalars already set are kept.
    pub(crate) fn merge(&mut self, mine: Id, theirs: Id) {
        match (self.slot(mine).kind, self.slot(theirs).kind) {
            (Kind::Obj, Kind::Obj) => {
                let mut cur = self.slot(theirs).a;
                while cur != NIL {
                    let next = self.slot(cur).next;
                    let key = self.slot(cur).key;
                    match key.and_then(|k| self.member(mine, k)) {
                        Some(existing) => self.merge(existing, cur),
                        None => self.link_last(mine, cur),
                    }
                    cur = next;
                }
            }
            (Kind::Arr, Kind::Arr) => {
                let mut cur = self.slot(theirs).a;
                while cur != NIL {
                    let next = self.slot(cur).next;
                    if !self.children(mine).any(|m| self.same(m, cur)) {
                        self.link_last(mine, cur);
                    }
                    cur = next;
                }
            }
            _ => {}
        }
    }

    /// Deep equality: same kind, same text, same members (names and order) or elements.
    fn same(&self, x: Id, y: Id) -> bool {
        let (a, b) = (self.slot(x), self.slot(y));
        if a.kind != b.kind {
            return false;
        }
        match a.kind {
            Kind::Str | Kind::Num => self.text_of(a) == self.text_of(b),
            Kind::True | Kind::False => true,
            Kind::Obj | Kind::Arr => {
                let mut xs = self.children(x);
                let mut ys = self.children(y);
                loop {
                    match (xs.next(), ys.next()) {
                        (None, None) => return true,
                        (Some(p), Some(q)) => {
                            if self.slot(p).key != self.slot(q).key || !self.same(p, q) {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
        }
    }

    /// Removes empty strings, objects and arrays under `id`, depth first.
    pub(crate) fn prune(&mut self, id: Id) {
        if !matches!(self.slot(id).kind, Kind::Obj | Kind::Arr) {
            return;
        }
        let mut cur = self.slot(id).a;
        let (mut first, mut last) = (NIL, NIL);
        while cur != NIL {
            let next = self.slot(cur).next;
            self.prune(cur);
            if !self.is_empty(cur) {
                self.slot_mut(cur).next = NIL;
                if last == NIL {
                    first = cur;
                } else {
                    self.slot_mut(last).next = cur;
                }
                last = cur;
            }
            cur = next;
        }
        let s = self.slot_mut(id);
        s.a = first;
        s.b = last;
    }

    /// Compact or indented JSON of the node `id`, appended to `out`.
    pub(crate) fn write(&self, id: Id, out: &mut String, pretty: bool, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if pretty {
                out.push('\n');
                for _ in 0..depth {
                    out.push_str("  ");
                }
            }
        };
        let s = self.slot(id);
        match s.kind {
            Kind::Str => write_str(out, self.text_of(s)),
            Kind::Num => out.push_str(self.text_of(s)),
            Kind::True => out.push_str("true"),
            Kind::False => out.push_str("false"),
            Kind::Obj | Kind::Arr => {
                let obj = s.kind == Kind::Obj;
                out.push(if obj { '{' } else { '[' });
                let mut any = false;
                for c in self.children(id) {
                    if any {
                        out.push(',');
                    }
                    any = true;
                    newline(out, depth + 1);
                    if obj {
                        write_str(out, self.slot(c).key.map_or("", |k| k.as_str()));
                        out.push(':');
                        if pretty {
                            out.push(' ');
                        }
                    }
                    self.write(c, out, pretty, depth + 1);
                }
                if any {
                    newline(out, depth);
                }
                out.push(if obj { '}' } else { ']' });
            }
        }
    }

    /// The node as an owned tree, for inspection.
    pub(crate) fn to_node(&self, id: Id) -> Node {
        let s = self.slot(id);
        match s.kind {
            Kind::Str => Node::Str(self.text_of(s).into()),
            Kind::Num => Node::Num(self.text_of(s).into()),
            Kind::True => Node::Bool(true),
            Kind::False => Node::Bool(false),
            Kind::Obj => Node::Obj(
                self.children(id)
                    .map(|c| {
                        let key = self.slot(c).key.unwrap_or_else(|| Key::from(""));
                        (key, self.to_node(c))
                    })
                    .collect(),
            ),
            Kind::Arr => Node::Arr(self.children(id).map(|c| self.to_node(c)).collect()),
        }
    }

    /// The node `id`, for serde.
    pub(crate) fn view(&self, id: Id) -> View<'_> {
        View { doc: self, id }
    }
}

/// A JSON string, escaped as serde_json escapes it. Runs of characters that need no
/// escape are copied whole (a character is never split: every byte escaped is ASCII).
fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// The bytes that need an escape: controls, `"` and `\\`.
    const NEEDS_ESCAPE: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 0x20 {
            table[b] = true;
            b += 1;
        }
        table[b'"' as usize] = true;
        table[b'\\' as usize] = true;
        table
    };
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The children of a node, in order.
#[derive(Debug, Clone)]
pub(crate) struct Children<'d> {
    doc: &'d Doc,
    next: Id,
}

impl Iterator for Children<'_> {
    type Item = Id;

    fn next(&mut self) -> Option<Id> {
        if self.next == NIL {
            return None;
        }
        let id = self.next;
        self.next = self.doc.slot(id).next;
        Some(id)
    }
}

/// A node of a document, serializable with serde.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'d> {
    doc: &'d Doc,
    id: Id,
}

impl Serialize for View<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let doc = self.doc;
        let s = doc.slot(self.id);
        match s.kind {
            Kind::Str => serializer.serialize_str(doc.text_of(s)),
            Kind::Num => {
                let n = doc.text_of(s);
                match serde_json::value::RawValue::from_string(n.to_owned()) {
                    Ok(raw) => raw.serialize(serializer),
                    Err(_) => serializer.serialize_str(n),
                }
            }
            Kind::True => serializer.serialize_bool(true),
            Kind::False => serializer.serialize_bool(false),
            Kind::Obj => {
                let mut map = serializer.serialize_map(None)?;
                for c in doc.children(self.id) {
                    map.serialize_entry(doc.slot(c).key.map_or("", |k| k.as_str()), &doc.view(c))?;
                }
                map.end()
            }
            Kind::Arr => {
                let mut seq = serializer.serialize_seq(None)?;
                for c in doc.children(self.id) {
                    seq.serialize_element(&doc.view(c))?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(doc: &Doc, id: Id) -> String {
        let mut out = String::new();
        doc.write(id, &mut out, false, 0);
        out
    }

    #[test]
    fn writes_like_serde_json_and_like_the_owned_tree() {
        let mut d = Doc::default();
        let root = d.obj();
        let b = d.str("x\"\n\u{1}\u{8}\u{c}\u{1f}é\\\t\r");
        d.push_member(root, "b".into(), b);
        let a = d.num("1.50");
        d.push_member(root, "a".into(), a);
        let c = d.arr();
        let t = d.bool(true);
        d.push_item(c, t);
        let empty = d.obj();
        d.push_item(c, empty);
        d.push_member(root, "c".into(), c);
        let mine = json(&d, root);
        assert_eq!(
            mine,
            r#"{"b":"x\"\n\u0001\b\f\u001fé\\\t\r","a":1.50,"c":[true,{}]}"#
        );
        assert_eq!(
            serde_json::to_string(&d.view(root)).ok(),
            Some(mine.clone())
        );
        assert_eq!(d.to_node(root).to_json(false), mine);
        let mut pretty = String::new();
        d.write(root, &mut pretty, true, 0);
        assert_eq!(
            serde_json::to_string_pretty(&d.view(root)).ok(),
            Some(pretty)
        );
        d.prune(root);
        assert_eq!(
            json(&d, root),
            r#"{"b":"x\"\n\u0001\b\f\u001fé\\\t\r","a":1.50,"c":[true]}"#
        );
    }

    #[test]
    fn merges_fragments() {
        let mut d = Doc::default();
        let mine = d.import(&Node::Obj(vec![
            ("x".into(), Node::Str("1".into())),
            ("l".into(), Node::Arr(vec![Node::Str("p".into())])),
        ]));
        let theirs = d.import(&Node::Obj(vec![
            ("x".into(), Node::Str("2".into())),
            ("y".into(), Node::Str("3".into())),
            (
                "l".into(),
                Node::Arr(vec![Node::Str("p".into()), Node::Str("q".into())]),
            ),
        ]));
        d.merge(mine, theirs);
        assert_eq!(json(&d, mine), r#"{"x":"1","l":["p","q"],"y":"3"}"#);
    }

    /// Removing, inserting and replacing members keep the first and last links right:
    /// a member added afterwards lands at the end.
    #[test]
    fn edits_keep_the_member_list_whole() {
        let mut d = Doc::default();
        let o = d.obj();
        let id = d.str("i");
        d.insert_second(o, "id".into(), id);
        let rt = d.str("Patient");
        d.push_member(o, "resourceType".into(), rt);
        let x = d.str("x");
        d.push_member(o, "x".into(), x);
        d.remove(o, "x");
        let y = d.str("y");
        d.push_member(o, "y".into(), y);
        assert_eq!(
            json(&d, o),
            r#"{"id":"i","resourceType":"Patient","y":"y"}"#
        );
        d.remove(o, "id");
        let id2 = d.str("j");
        d.insert_second(o, "id".into(), id2);
        let z = d.num("2");
        d.insert(o, "y".into(), z);
        let w = d.bool(false);
        d.push_member(o, "w".into(), w);
        assert_eq!(
            json(&d, o),
            r#"{"resourceType":"Patient","id":"j","y":2,"w":false}"#
        );
        assert_eq!(d.len(o), 4);
        assert_eq!(d.get(o, "id").and_then(|i| d.as_str(i)), Some("j"));
    }
}

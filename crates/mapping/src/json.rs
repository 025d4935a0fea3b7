//! An owned, ordered JSON tree ([`Node`]): the constants of a pack, and a bundle's
//! content when a caller inspects it ([`crate::Bundle::as_node`]). Objects keep the order
//! in which their members were written and decimals keep the digits the sender sent, as
//! in the document the executor builds (`doc.rs`), which also writes a `Node`'s JSON.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::doc::Doc;

/// Text in the output tree. Short values (codes, names, dates, most identifiers) are
/// stored inline, so that most leaves of a bundle cost no allocation of their own.
pub type Text = compact_str::CompactString;

/// An object member's name. Names come from the compiled pack and the FHIR element
/// names the executor writes; they are interned once per process, so building and
/// dropping a resource never copies or counts a key, and two keys are the same name
/// exactly when they are the same interned text (compared by address, not by content).
#[derive(Clone, Copy)]
pub struct Key(&'static str);

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Key {}

/// The member names the executor writes itself, interned once.
pub(crate) struct Names {
    pub(crate) resource_type: Key,
    pub(crate) id: Key,
    pub(crate) reference: Key,
    pub(crate) full_url: Key,
    pub(crate) resource: Key,
    pub(crate) request: Key,
    pub(crate) method: Key,
    pub(crate) url: Key,
    pub(crate) kind: Key,
    pub(crate) entry: Key,
}

pub(crate) fn names() -> &'static Names {
    use std::sync::OnceLock;
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| Names {
        resource_type: "resourceType".into(),
        id: "id".into(),
        reference: "reference".into(),
        full_url: "fullUrl".into(),
        resource: "resource".into(),
        request: "request".into(),
        method: "method".into(),
        url: "url".into(),
        kind: "type".into(),
        entry: "entry".into(),
    })
}

impl Key {
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

/// The process-wide set of member names. It only grows with names no pack used before,
/// so it is bounded by the distinct element names of the packs a process loads (a few
/// hundred), however often they are reloaded.
fn intern(name: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&'static str> for Key {
    fn from(s: &'static str) -> Key {
        Key(intern(s))
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key(intern(&s))
    }
}

impl PartialEq<str> for Key {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A JSON value whose objects keep insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Str(Text),
    /// A number as canonical decimal text (`-1.50`): FHIR decimals keep their precision.
    Num(Text),
    Bool(bool),
    Obj(Vec<(Key, Node)>),
    Arr(Vec<Node>),
}

impl Node {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Obj(o) => o.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a string node.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array node (empty for anything else).
    pub fn items(&self) -> &[Node] {
        match self {
            Node::Arr(a) => a,
            _ => &[],
        }
    }

    /// Compact or indented JSON, as a bundle's document writes it (the same writer).
    pub fn to_json(&self, pretty: bool) -> String {
        let mut doc = Doc::default();
        let root = doc.import(self);
        let mut out = String::with_capacity(doc.json_len_hint());
        doc.write(root, &mut out, pretty, 0);
        out
    }
}

/// Written straight from the tree (not through a document): the mapping bench's
/// "serialize tree" baseline is this.
impl Serialize for Node {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Str(s) => serializer.serialize_str(s),
            Node::Num(n) => match serde_json::value::RawValue::from_string(n.to_string()) {
                Ok(raw) => raw.serialize(serializer),
                Err(_) => serializer.serialize_str(n),
            },
            Node::Bool(b) => serializer.serialize_bool(*b),
            Node::Obj(o) => {
                let mut map = serializer.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    map.serialize_entry(k.as_str(), v)?;
                }
                map.end()
            }
            Node::Arr(a) => {
                let mut seq = serializer.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_like_serde_json() {
        let n = Node::Obj(vec![
            (
                "b".into(),
                Node::Str("x\"\n\u{1}\u{8}\u{c}\u{1f}é\\\t\r".into()),
            ),
            ("a".into(), Node::Num("1.50".into())),
            (
                "c".into(),
                Node::Arr(vec![Node::Bool(true), Node::Obj(Vec::new())]),
            ),
        ]);
        let mine = n.to_json(false);
        assert_eq!(
            mine,
            r#"{"b":"x\"\n\u0001\b\f\u001fé\\\t\r","a":1.50,"c":[true,{}]}"#
        );
        assert_eq!(
            serde_json::to_string(&n).ok().as_deref(),
            Some(mine.as_str())
        );
        assert_eq!(
            serde_json::to_string_pretty(&n).ok().as_deref(),
            Some(n.to_json(true).as_str())
        );
    }

    /// Keys compare by address: every way of making one must intern it.
    #[test]
    fn keys_of_the_same_name_are_equal_however_made() {
        let made = [
            Key::from("family"),
            Key::from(String::from("family")),
            Key::from(format!("fam{}", "ily")),
        ];
        assert!(made.iter().all(|k| *k == made[0] && *k == "family"));
        assert!(Key::from("given") != made[0]);
        assert!(names().resource_type == Key::from("resourceType"));
    }
}

//! Borrowed views of a field, a repetition, a component or a subcomponent.

use std::borrow::Cow;
use std::fmt;

use crate::{Charset, Separators, escape};

/// Which level of the field hierarchy a [`Value`] is, so that it knows which delimiter
/// splits it into its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A whole field: repetitions separated by the repetition separator.
    Field,
    /// One repetition: components.
    Repetition,
    /// One component: subcomponents.
    Component,
    /// A subcomponent: a leaf.
    Subcomponent,
    /// MSH-1 and MSH-2: taken literally, never split or unescaped.
    Literal,
}

impl Level {
    fn child(self) -> Level {
        match self {
            Level::Field => Level::Repetition,
            Level::Repetition => Level::Component,
            Level::Component | Level::Subcomponent => Level::Subcomponent,
            Level::Literal => Level::Literal,
        }
    }
}

/// How the value's bytes are to be read: the message's separators and character set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub separators: Separators,
    pub charset: Charset,
}

/// A piece of a message, borrowed from the input bytes. Cheap to copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Value<'a> {
    raw: &'a [u8],
    level: Level,
    encoding: Encoding,
}

impl fmt::Debug for Value<'_> {
    // Values are patient data: Debug shows the shape, not the content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("level", &self.level)
            .field("len", &self.raw.len())
            .finish()
    }
}

impl<'a> Value<'a> {
    #[inline]
    pub(crate) fn new(raw: &'a [u8], level: Level, encoding: Encoding) -> Self {
        Value {
            raw,
            level,
            encoding,
        }
    }

    /// The bytes as they are in the message: still escaped, in the message's character set.
    #[inline]
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    #[inline]
    pub fn level(&self) -> Level {
        self.level
    }

    #[inline]
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Empty: nothing was sent (the receiver keeps what it had).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The explicit null `""`: the sender says "delete what you have".
    #[inline]
    pub fn is_null(&self) -> bool {
        self.raw == b"\"\""
    }

    /// Neither empty nor the explicit null.
    #[inline]
    pub fn is_valued(&self) -> bool {
        !self.is_empty() && !self.is_null()
    }

    /// The decoded text: escape sequences decoded, then the character set decoded.
    /// Borrows from the input when no escape or transcoding is needed. For a field or
    /// repetition this is the text of the whole piece, delimiters included.
    pub fn text(&self) -> Cow<'a, str> {
        if self.level == Level::Literal {
            return self.encoding.charset.decode(self.raw);
        }
        match escape::unescape(self.raw, &self.encoding.separators) {
            Cow::Borrowed(bytes) => self.encoding.charset.decode(bytes),
            Cow::Owned(bytes) => Cow::Owned(self.encoding.charset.decode_owned(bytes)),
        }
    }

    /// The pieces one level down (repetitions of a field, components of a repetition,
    /// subcomponents of a component). A leaf yields itself.
    #[inline]
    pub fn children(&self) -> Children<'a> {
        Children {
            rest: Some(self.raw),
            delimiter: self.delimiter(),
            level: self.level.child(),
            encoding: self.encoding,
        }
    }

    /// The `n`-th child (1-based), or `None` when there are fewer. An empty child is
    /// returned as an empty value, not `None`, so that its position is kept.
    #[inline]
    pub fn child(&self, n: usize) -> Option<Value<'a>> {
        if n == 0 {
            return None;
        }
        self.children().nth(n - 1)
    }

    /// The children split once, for reading several of them.
    pub fn index_children(&self) -> ChildIndex<'a> {
        let mut index = ChildIndex {
            value: *self,
            starts: [0; CHILD_INDEX_ROOM + 1],
            count: 1,
            overflow: false,
        };
        let Some(delimiter) = self.delimiter() else {
            return index;
        };
        // Offsets are kept as u32: a value past 4 GiB (never seen in HL7) is read by
        // scanning, as without an index.
        if u32::try_from(self.raw.len()).is_err() {
            index.count = 0;
            index.overflow = true;
            return index;
        }
        for (pos, &b) in self.raw.iter().enumerate() {
            if b == delimiter {
                index.starts[index.count] = pos as u32 + 1;
                if index.count == CHILD_INDEX_ROOM {
                    index.overflow = true;
                    break;
                }
                index.count += 1;
            }
        }
        index
    }

    /// The first leaf: the first subcomponent of the first component of the first
    /// repetition (as many levels as this value has), found in one pass. A subcomponent
    /// or a literal value is its own first leaf.
    #[inline]
    pub fn first_leaf(&self) -> Value<'a> {
        let s = &self.encoding.separators;
        let stops = match self.level {
            Level::Field => [s.repetition, s.component, s.subcomponent],
            Level::Repetition => [s.component, s.subcomponent, s.subcomponent],
            Level::Component => [s.subcomponent; 3],
            Level::Subcomponent | Level::Literal => return *self,
        };
        let end = self
            .raw
            .iter()
            .position(|b| stops.contains(b))
            .unwrap_or(self.raw.len());
        Value::new(&self.raw[..end], Level::Subcomponent, self.encoding)
    }

    #[inline]
    fn delimiter(&self) -> Option<u8> {
        match self.level {
            Level::Field => Some(self.encoding.separators.repetition),
            Level::Repetition => Some(self.encoding.separators.component),
            Level::Component => Some(self.encoding.separators.subcomponent),
            Level::Subcomponent | Level::Literal => None,
        }
    }

    /// Repetitions of a field (a non-field value yields itself).
    #[inline]
    pub fn repetitions(&self) -> Children<'a> {
        match self.level {
            Level::Field => self.children(),
            _ => self.single(),
        }
    }

    /// Components: of the first repetition when this is a field.
    pub fn components(&self) -> Children<'a> {
        match self.level {
            Level::Field => self.first_child().children(),
            Level::Repetition => self.children(),
            _ => self.single(),
        }
    }

    /// The `n`-th component (1-based), of the first repetition when this is a field.
    pub fn component(&self, n: usize) -> Option<Value<'a>> {
        if n == 0 {
            return None;
        }
        self.components().nth(n - 1)
    }

    fn first_child(&self) -> Value<'a> {
        self.children().next().unwrap_or(*self)
    }

    fn single(&self) -> Children<'a> {
        Children {
            rest: Some(self.raw),
            delimiter: None,
            level: self.level,
            encoding: self.encoding,
        }
    }
}

/// The children of one [`Value`], split once: reading many of them (a datatype map reads
/// each component of an XCN or an XAD in turn) costs one pass over the value instead of
/// one pass per child. Allocates nothing; values with more children than it has room
/// for are still read whole, the ones past the room by scanning as [`Value::child`] does.
#[derive(Debug, Clone, Copy)]
pub struct ChildIndex<'a> {
    value: Value<'a>,
    /// `starts[i]` is where child `i + 1` starts; child `i + 1` ends one byte (its
    /// delimiter) before `starts[i + 1]`, or at the value's end for the last one.
    starts: [u32; CHILD_INDEX_ROOM + 1],
    /// How many children are indexed.
    count: usize,
    /// Whether the value has more children than are indexed (`starts[count]` is then
    /// where the first one not indexed starts).
    overflow: bool,
}

/// Room for the components of the widest common datatypes (XCN has 23).
const CHILD_INDEX_ROOM: usize = 24;

impl<'a> ChildIndex<'a> {
    /// The value the index splits.
    #[inline]
    pub fn value(&self) -> Value<'a> {
        self.value
    }

    /// The `n`-th child (1-based), as [`Value::child`] returns it.
    #[inline]
    pub fn child(&self, n: usize) -> Option<Value<'a>> {
        if n == 0 {
            return None;
        }
        if n > self.count {
            return if self.overflow {
                self.value.child(n)
            } else {
                None
            };
        }
        if self.value.delimiter().is_none() {
            // A leaf is its own only child.
            return Some(self.value);
        }
        let raw = self.value.raw;
        let start = self.starts[n - 1] as usize;
        let end = if n < self.count || self.overflow {
            self.starts[n] as usize - 1
        } else {
            raw.len()
        };
        Some(Value::new(
            &raw[start..end],
            self.value.level.child(),
            self.value.encoding,
        ))
    }
}

/// Iterator over the children of a [`Value`]. Allocates nothing.
#[derive(Debug, Clone)]
pub struct Children<'a> {
    rest: Option<&'a [u8]>,
    delimiter: Option<u8>,
    level: Level,
    encoding: Encoding,
}

impl<'a> Iterator for Children<'a> {
    type Item = Value<'a>;

    #[inline]
    fn next(&mut self) -> Option<Value<'a>> {
        let rest = self.rest?;
        let piece = match self.delimiter.and_then(|d| find_byte(d, rest)) {
            Some(pos) => {
                self.rest = Some(&rest[pos + 1..]);
                &rest[..pos]
            }
            None => {
                self.rest = None;
                rest
            }
        };
        Some(Value::new(piece, self.level, self.encoding))
    }

    /// Skips `n` pieces by their delimiters alone, without making a value of each
    /// (`child(n)` and `component(n)` are `nth`, on every field a mapping reads).
    #[inline]
    fn nth(&mut self, n: usize) -> Option<Value<'a>> {
        for _ in 0..n {
            let rest = self.rest?;
            match self.delimiter.and_then(|d| find_byte(d, rest)) {
                Some(pos) => self.rest = Some(&rest[pos + 1..]),
                None => {
                    self.rest = None;
                    return None;
                }
            }
        }
        self.next()
    }
}

/// The first `needle` in `haystack`. Components and subcomponents are mostly a few bytes
/// long, where a plain loop beats `memchr`'s vectorised search and its set-up; long
/// pieces (text, encapsulated data) still get `memchr`.
#[inline]
pub(crate) fn find_byte(needle: u8, haystack: &[u8]) -> Option<usize> {
    if haystack.len() < 32 {
        haystack.iter().position(|&b| b == needle)
    } else {
        memchr::memchr(needle, haystack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(raw: &str) -> Value<'_> {
        Value::new(
            raw.as_bytes(),
            Level::Field,
            Encoding {
                separators: Separators::default(),
                charset: Charset::Ascii,
            },
        )
    }

    #[test]
    fn splits_levels() {
        let f = field("a^b&c~d");
        let reps: Vec<_> = f.repetitions().map(|v| v.text()).collect();
        assert_eq!(reps, ["a^b&c", "d"]);
        assert_eq!(f.component(2).unwrap().text(), "b&c");
        let sub = f.component(2).unwrap().child(2).unwrap();
        assert_eq!(sub.text(), "c");
        assert_eq!(sub.level(), Level::Subcomponent);
        assert!(f.component(3).is_none());
        assert!(f.component(0).is_none());
    }

    /// Fields of every shape the fast paths must agree with the general ones on: empty
    /// pieces, trailing delimiters, several levels at once, more components than a
    /// [`ChildIndex`] has room for.
    fn shapes() -> Vec<String> {
        let wide = (1..=30).map(|i| i.to_string()).collect::<Vec<_>>();
        let mut shapes: Vec<String> = [
            "",
            "a",
            "a^b&c~d",
            "^^x^",
            "~",
            "a&b^&&c^d",
            "x~y~",
            "&b",
            "ab&c~d^e",
            "a^b~c^d^e",
            "~^b",
            "a^",
        ]
        .map(str::to_owned)
        .to_vec();
        shapes.push(wide.join("^"));
        shapes
    }

    /// A field of `raw` and every piece of it, level by level down to subcomponents.
    fn pieces(raw: &str) -> Vec<Value<'_>> {
        let mut values = vec![field(raw)];
        let mut level = values.clone();
        for _ in 0..3 {
            level = level.iter().flat_map(|v| v.children()).collect();
            values.extend(level.iter().copied());
        }
        values
    }

    /// The index gives what `child` gives, at every level, past its room included.
    #[test]
    fn child_index_matches_child() {
        for raw in shapes() {
            for v in pieces(&raw) {
                let index = v.index_children();
                for n in 0..40 {
                    assert_eq!(
                        index.child(n),
                        v.child(n),
                        "{raw:?} {:?} child {n}",
                        v.level()
                    );
                }
            }
        }
    }

    #[test]
    fn first_leaf_is_first_child_down_to_a_subcomponent() {
        for raw in shapes() {
            for v in pieces(&raw) {
                let mut expected = v;
                while let Some(c) = expected.child(1).filter(|c| c.level() != expected.level()) {
                    expected = c;
                }
                assert_eq!(v.first_leaf(), expected, "{raw:?} {:?}", v.level());
            }
        }
    }

    #[test]
    fn null_and_empty() {
        assert!(field("\"\"").is_null());
        assert!(!field("\"\"").is_valued());
        assert!(field("").is_empty());
        assert!(field("x").is_valued());
    }
}

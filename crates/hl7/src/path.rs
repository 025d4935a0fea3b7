//! Paths as the spec writes them: `PID-3`, `PID-3[2]`, `PID-3[*].1`, `PID-5.1.1`,
//! `OBX[3]-5`. Every index is 1-based; `*` selects all. An index left out means the first.

use std::fmt;
use std::str::FromStr;

use nom::Parser;
use nom::branch::alt;
use nom::bytes::complete::tag;
use nom::character::complete::{char, digit1, satisfy};
use nom::combinator::{map, map_res, opt, recognize};
use nom::sequence::{delimited, preceded};

use crate::message::{Message, Segment};
use crate::value::{Level, Value};

/// Which occurrences an index selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Selector {
    /// The n-th (1-based).
    Nth(u32),
    /// Every one (`*`).
    All,
}

/// A compiled path. Parse once (`"PID-3[*].1".parse()`), use many times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    segment: [u8; 3],
    occurrence: Option<Selector>,
    field: Option<u32>,
    repetition: Option<Selector>,
    component: Option<u32>,
    subcomponent: Option<u32>,
}

/// A path that does not follow the grammar; `position` is the character where it stops making sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path {path:?} at character {position}: expected {expected}")]
pub struct PathError {
    pub path: String,
    pub position: usize,
    pub expected: &'static str,
}

type In<'s> = &'s str;
type Res<'s, T> = nom::IResult<In<'s>, T>;

fn number(i: In<'_>) -> Res<'_, u32> {
    map_res(digit1, |d: &str| match d.parse::<u32>() {
        Ok(0) | Err(_) => Err(()),
        Ok(n) => Ok(n),
    })
    .parse(i)
}

fn selector(i: In<'_>) -> Res<'_, Selector> {
    delimited(
        char('['),
        alt((
            map(char('*'), |_| Selector::All),
            map(number, Selector::Nth),
        )),
        char(']'),
    )
    .parse(i)
}

fn segment_id(i: In<'_>) -> Res<'_, &str> {
    recognize((
        satisfy(|c| c.is_ascii_uppercase()),
        satisfy(|c| c.is_ascii_uppercase() || c.is_ascii_digit()),
        satisfy(|c| c.is_ascii_uppercase() || c.is_ascii_digit()),
    ))
    .parse(i)
}

type FieldPart = (u32, Option<Selector>, Option<(u32, Option<u32>)>);

fn field_part(i: In<'_>) -> Res<'_, FieldPart> {
    preceded(
        tag("-"),
        (
            number,
            opt(selector),
            opt((
                preceded(char('.'), number),
                opt(preceded(char('.'), number)),
            )),
        ),
    )
    .parse(i)
}

impl FromStr for Path {
    type Err = PathError;

    fn from_str(s: &str) -> Result<Self, PathError> {
        let trimmed = s.trim();
        let error = |rest: &str, expected| PathError {
            path: s.to_owned(),
            position: trimmed.len() - rest.len(),
            expected,
        };
        let (rest, id) =
            segment_id(trimmed).map_err(|_| error(trimmed, "a segment id such as PID"))?;
        let (rest, occurrence) = opt(selector)
            .parse(rest)
            .map_err(|_| error(rest, "[n] or [*]"))?;
        let (rest, field) = opt(field_part)
            .parse(rest)
            .map_err(|_| error(rest, "-field"))?;
        if !rest.is_empty() {
            let expected = if rest.contains("[0]") || rest.contains(".0") || rest.contains("-0") {
                "indexes start at 1"
            } else {
                "-field[repetition].component.subcomponent"
            };
            return Err(error(rest, expected));
        }
        let b = id.as_bytes();
        let (field, repetition, component, subcomponent) = match field {
            None => (None, None, None, None),
            Some((f, rep, None)) => (Some(f), rep, None, None),
            Some((f, rep, Some((c, sub)))) => (Some(f), rep, Some(c), sub),
        };
        Ok(Path {
            segment: [b[0], b[1], b[2]],
            occurrence,
            field,
            repetition,
            component,
            subcomponent,
        })
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sel = |s: Selector| match s {
            Selector::All => "[*]".to_owned(),
            Selector::Nth(n) => format!("[{n}]"),
        };
        f.write_str(self.segment_id())?;
        if let Some(o) = self.occurrence {
            f.write_str(&sel(o))?;
        }
        if let Some(field) = self.field {
            write!(f, "-{field}")?;
            if let Some(r) = self.repetition {
                f.write_str(&sel(r))?;
            }
            if let Some(c) = self.component {
                write!(f, ".{c}")?;
                if let Some(s) = self.subcomponent {
                    write!(f, ".{s}")?;
                }
            }
        }
        Ok(())
    }
}

impl Path {
    pub fn segment_id(&self) -> &str {
        std::str::from_utf8(&self.segment).unwrap_or("???")
    }

    #[inline]
    pub fn field(&self) -> Option<u32> {
        self.field
    }

    pub fn component(&self) -> Option<u32> {
        self.component
    }

    pub fn subcomponent(&self) -> Option<u32> {
        self.subcomponent
    }

    #[inline]
    pub fn occurrence(&self) -> Selector {
        self.occurrence.unwrap_or(Selector::Nth(1))
    }

    #[inline]
    pub fn repetition(&self) -> Selector {
        self.repetition.unwrap_or(Selector::Nth(1))
    }

    /// Whether the path can match more than one value.
    #[inline]
    pub fn is_multiple(&self) -> bool {
        self.occurrence == Some(Selector::All) || self.repetition == Some(Selector::All)
    }

    /// The same path with the segment occurrence replaced, to address one segment among many.
    pub fn with_occurrence(&self, occurrence: Selector) -> Path {
        Path {
            occurrence: Some(occurrence),
            ..*self
        }
    }

    /// The same path with another repetition selector (`PID-3` → `PID-3[*]`).
    pub fn with_repetition(&self, repetition: Selector) -> Path {
        Path {
            repetition: Some(repetition),
            ..*self
        }
    }

    /// The one value this path selects in one segment when it names a single repetition
    /// (`PID-5.1`, `PID-3[2].4`): what [`Path::values_in`] yields, found without building
    /// an iterator. `None` when the path selects every repetition or names no field.
    #[inline]
    pub fn single_value_in<'a>(&self, segment: Segment<'_, 'a>) -> Option<Option<Value<'a>>> {
        let (Some(field), Selector::Nth(rep)) = (self.field, self.repetition()) else {
            return None;
        };
        let value = segment
            .field(field as usize)
            .and_then(|f| f.repetitions().nth(rep as usize - 1))
            .and_then(|rep| self.within_repetition(rep))
            .filter(|v| !v.is_empty());
        Some(value)
    }

    /// The component (and subcomponent) this path names inside one repetition, or the
    /// repetition itself when the path names none.
    #[inline]
    fn within_repetition<'a>(&self, rep: Value<'a>) -> Option<Value<'a>> {
        match self.component {
            None => Some(rep),
            Some(c) => rep
                .child(c as usize)
                .and_then(|comp| match self.subcomponent {
                    None => Some(comp),
                    Some(s) => comp.child(s as usize),
                }),
        }
    }

    /// The values this path selects in one segment (whatever the segment's id), ignoring
    /// the occurrence part: used to read paths relative to a segment of a group.
    pub fn values_in<'a>(
        &self,
        segment: Segment<'_, 'a>,
    ) -> impl Iterator<Item = Value<'a>> + use<'a> {
        let path = *self;
        let whole = match path.field {
            None => Some(Value::new(
                segment.raw(),
                Level::Literal,
                segment.encoding(),
            )),
            Some(_) => None,
        };
        let fields = path
            .field
            .and_then(|n| segment.field(n as usize))
            .into_iter()
            .flat_map(move |field| select(field.repetitions(), path.repetition()))
            .filter_map(move |rep| path.within_repetition(rep));
        whole.into_iter().chain(fields).filter(|v| !v.is_empty())
    }
}

/// Either all items or the n-th one.
fn select<I: Iterator>(iter: I, selector: Selector) -> impl Iterator<Item = I::Item> {
    let (skip, take) = match selector {
        Selector::All => (0, usize::MAX),
        Selector::Nth(n) => (n as usize - 1, 1),
    };
    iter.skip(skip).take(take)
}

impl<'a> Message<'a> {
    /// Every non-empty value the path selects, in message order. `""` (explicit null) is
    /// a value; empty fields are not.
    pub fn iter<'s>(&'s self, path: &Path) -> impl Iterator<Item = Value<'a>> + 's {
        let path = *path;
        let segments = self.segments().filter({
            let id = path.segment;
            move |s| *s.id_bytes() == id
        });
        select(segments, path.occurrence()).flat_map(move |seg| path.values_in(seg))
    }

    /// The first value the path selects, if any.
    pub fn get(&self, path: &Path) -> Option<Value<'a>> {
        self.iter(path).next()
    }

    /// How many values the path selects: `count("OBX[*]")` is the number of OBX segments,
    /// `count("PID-3[*]")` the number of PID-3 repetitions.
    pub fn count(&self, path: &Path) -> usize {
        self.iter(path).count()
    }

    /// Whether the path selects a value that is neither empty nor the explicit null.
    pub fn is_valued(&self, path: &Path) -> bool {
        self.iter(path).any(|v| v.is_valued())
    }

    /// Convenience: parses `path` and returns the first value's decoded text.
    pub fn text(&self, path: &str) -> Result<Option<String>, PathError> {
        let path: Path = path.parse()?;
        Ok(self.get(&path).map(|v| v.text().into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Path {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays() {
        for s in [
            "PID",
            "PID-3",
            "PID-3[2]",
            "PID-3[*].1",
            "PID-5.1.1",
            "OBX[3]-5",
            "ZBE[*]-7.10",
            "OBX[*]",
        ] {
            assert_eq!(p(s).to_string(), s);
        }
        let path = p("OBX[3]-5[*].2.1");
        assert_eq!(path.occurrence(), Selector::Nth(3));
        assert_eq!(path.repetition(), Selector::All);
        assert_eq!(
            (path.field(), path.component(), path.subcomponent()),
            (Some(5), Some(2), Some(1))
        );
    }

    #[test]
    fn rejects_bad_paths() {
        for (s, pos) in [
            ("pid-3", 0),
            ("PID-", 3),
            ("PID-0", 3),
            ("PID-3[0]", 5),
            ("PID-3.1.2.3", 9),
            ("PID3", 3),
            ("PID-3[", 5),
        ] {
            let err = s.parse::<Path>().unwrap_err();
            assert_eq!(err.position, pos, "{s}: {err}");
        }
        assert!(p("PID-3").to_string() == "PID-3");
        assert!(
            "PID-3[0]"
                .parse::<Path>()
                .unwrap_err()
                .to_string()
                .contains("start at 1")
        );
    }

    const ORU: &[u8] = b"MSH|^~\\&|LAB|HOSP|||20240101||ORU^R01^ORU_R01|42|P|2.5.1\r\
PID|1||111^^^HOSP&1.2.3&ISO^PI~222^^^NAT^NH||DOE^JANE||\"\"\r\
OBR|1\r\
OBX|1|NM|GLU||5.5|mmol/L\r\
OBX|2|NM|NA||140|mmol/L\r\
OBR|2\r\
OBX|1|ST|NOTE||a\\F\\b\r";

    #[test]
    fn selects_values() {
        let m = Message::parse(ORU).unwrap();
        let text = |s: &str| m.get(&p(s)).map(|v| v.text().into_owned());
        assert_eq!(text("PID-3").as_deref(), Some("111^^^HOSP&1.2.3&ISO^PI"));
        assert_eq!(text("PID-3[2].1").as_deref(), Some("222"));
        assert_eq!(text("PID-3.4.2").as_deref(), Some("1.2.3"));
        assert_eq!(text("OBX[2]-5").as_deref(), Some("140"));
        assert_eq!(text("OBX[3]-5").as_deref(), Some("a|b"));
        assert_eq!(text("MSH-9.2").as_deref(), Some("R01"));
        assert_eq!(text("MSH-2").as_deref(), Some("^~\\&"));
        assert_eq!(text("PID-3[3]"), None);
        assert_eq!(text("PID-6"), None);
        assert_eq!(text("ZZZ-1"), None);
        let ids: Vec<_> = m.iter(&p("PID-3[*].1")).map(|v| v.text()).collect();
        assert_eq!(ids, ["111", "222"]);
        assert_eq!(m.count(&p("OBX[*]")), 3);
        assert_eq!(m.count(&p("OBX")), 1);
        assert_eq!(m.count(&p("PID-3[*]")), 2);
        assert!(m.get(&p("PID-7")).unwrap().is_null());
        assert!(!m.is_valued(&p("PID-7")));
        assert!(m.is_valued(&p("PID-5")));
        assert!(!m.is_valued(&p("PID-6")));
    }

    /// The direct read gives what the iterator gives, for every shape of single path.
    #[test]
    fn single_value_matches_values_in() {
        let m = Message::parse(ORU).unwrap();
        for seg in m.segments() {
            for path in [
                "PID-3",
                "PID-3.1",
                "PID-3[2].1",
                "PID-3.4.2",
                "PID-3[3]",
                "PID-5.1.1",
                "PID-6",
                "PID-7",
                "PID-99",
                "OBX-5",
                "MSH-2",
                "MSH-9.2",
                "MSH-1",
            ] {
                let path = p(path);
                let single = path.single_value_in(seg).unwrap().map(|v| v.raw());
                let iterated = path.values_in(seg).next().map(|v| v.raw());
                assert_eq!(single, iterated, "{path} in {}", seg.id());
            }
            assert!(p("PID-3[*].1").single_value_in(seg).is_none());
            assert!(p("PID").single_value_in(seg).is_none());
        }
    }
}

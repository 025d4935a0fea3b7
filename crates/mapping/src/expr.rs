//! The small languages inside mapping files: source paths (`PID-3[*].1`, `4.2`, with
//! `A | B` alternatives), FHIR target paths (`name[].given[]`, `valueQuantity.value`) and
//! conditions (`valued(PID-3) and not equals(PID-8, "U")`). Each is parsed once, when the
//! pack is loaded.

use passerelle_hl7::Path;

use crate::json::Key;

/// Where a value is read: in the current segment or a segment found around it, or inside
/// the current value (datatype maps read components: `1`, `4.2`, `.` for the value itself).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SrcPath {
    /// A spec path, and its segment id as bytes (compared for every segment read).
    Segment(Path, [u8; 3]),
    /// Component and subcomponent numbers, relative to the value a datatype map is applied to.
    Relative(Vec<usize>),
}

/// First-non-empty alternatives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Source(pub(crate) Vec<SrcPath>);

/// A syntax error at a character position inside the expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExprError {
    pub(crate) position: usize,
    pub(crate) message: String,
}

fn err(position: usize, message: impl Into<String>) -> ExprError {
    ExprError {
        position,
        message: message.into(),
    }
}

pub(crate) fn parse_src_path(s: &str, offset: usize) -> Result<SrcPath, ExprError> {
    let t = s.trim();
    let lead = s.len() - s.trim_start().len() + offset;
    if t == "." {
        return Ok(SrcPath::Relative(Vec::new()));
    }
    if t.starts_with(|c: char| c.is_ascii_digit()) {
        let mut parts = Vec::new();
        for (i, p) in t.split('.').enumerate() {
            match p.parse::<usize>() {
                Ok(n) if n >= 1 && i < 2 => parts.push(n),
                _ => {
                    return Err(err(
                        lead,
                        format!("relative path {t:?} must be component[.subcomponent], 1-based"),
                    ));
                }
            }
        }
        return Ok(SrcPath::Relative(parts));
    }
    t.parse::<Path>()
        .map(|p| {
            let id = p.segment_id().as_bytes();
            let id = [id[0], id[1], id[2]];
            SrcPath::Segment(p, id)
        })
        .map_err(|e| err(lead + e.position, e.to_string()))
}

pub(crate) fn parse_source(s: &str) -> Result<Source, ExprError> {
    let mut alts = Vec::new();
    let mut offset = 0;
    for part in s.split('|') {
        if part.trim().is_empty() {
            return Err(err(offset, "empty alternative in path"));
        }
        alts.push(parse_src_path(part, offset)?);
        offset += part.len() + 1;
    }
    Ok(Source(alts))
}

/// How a step of a target path addresses an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Index {
    /// A plain member.
    None,
    /// `[]`: append a new element.
    Append,
    /// `[n]` (0-based, as in FHIRPath): that element, created when missing.
    At(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) key: Key,
    pub(crate) index: Index,
}

/// A FHIR element path relative to the resource or datatype being built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target(pub(crate) Vec<Step>);

impl Target {
    /// Whether a step appends: then each value read goes to a new element.
    pub(crate) fn appends(&self) -> bool {
        self.0.iter().any(|s| s.index == Index::Append)
    }
}

pub(crate) fn parse_target(s: &str) -> Result<Target, ExprError> {
    let mut steps = Vec::new();
    let mut offset = 0;
    for part in s.split('.') {
        let (key, index) = match part.find('[') {
            None => (part, Index::None),
            Some(p) => {
                let inner = part[p + 1..]
                    .strip_suffix(']')
                    .ok_or_else(|| err(offset + p, "expected ] at the end of the step"))?;
                let index = if inner.is_empty() {
                    Index::Append
                } else {
                    Index::At(inner.parse().map_err(|_| {
                        err(offset + p + 1, "an index is [] (append) or [n] (0-based)")
                    })?)
                };
                (&part[..p], index)
            }
        };
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(err(
                offset,
                "expected a FHIR element name such as identifier",
            ));
        }
        steps.push(Step {
            key: Key::from(key.to_owned()),
            index,
        });
        offset += part.len() + 1;
    }
    Ok(Target(steps))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The closed condition language. No variables, no functions beyond these.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cond {
    /// The path selects a value that is neither empty nor `""`.
    Valued(SrcPath),
    /// The path's first value's text equals the string.
    Equals(SrcPath, String),
    /// The path's first value's text is one of the strings.
    In(SrcPath, Vec<String>),
    /// Some value the path selects (any repetition, with `[*]`) has one of the strings as
    /// its text: `any(PID-32[*], ["VALI"])` holds for `PROV~VALI`, where `in` reads only
    /// the first repetition.
    Any(SrcPath, Vec<String>),
    /// The number of values the path selects, compared with a number.
    Count(SrcPath, Cmp, usize),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
}

impl Cond {
    /// Every path the condition reads.
    pub(crate) fn paths(&self, out: &mut Vec<SrcPath>) {
        match self {
            Cond::Valued(p)
            | Cond::Equals(p, _)
            | Cond::In(p, _)
            | Cond::Any(p, _)
            | Cond::Count(p, _, _) => out.push(p.clone()),
            Cond::And(a, b) | Cond::Or(a, b) => {
                a.paths(out);
                b.paths(out);
            }
            Cond::Not(a) => a.paths(out),
        }
    }
}

struct CondParser<'s> {
    s: &'s str,
    pos: usize,
}

impl<'s> CondParser<'s> {
    fn skip_ws(&mut self) {
        while self.s[self.pos..].starts_with(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn peek_word(&mut self) -> &'s str {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.s[self.pos..].starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), ExprError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(err(self.pos, format!("expected {token:?}")))
        }
    }

    fn or(&mut self) -> Result<Cond, ExprError> {
        let mut left = self.and()?;
        while self.peek_word() == "or" {
            self.pos += 2;
            let right = self.and()?;
            left = Cond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Cond, ExprError> {
        let mut left = self.not()?;
        while self.peek_word() == "and" {
            self.pos += 3;
            let right = self.not()?;
            left = Cond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Cond, ExprError> {
        if self.peek_word() == "not" {
            self.pos += 3;
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn path(&mut self) -> Result<SrcPath, ExprError> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let end = rest.find([',', ')']).unwrap_or(rest.len());
        let path = parse_src_path(&rest[..end], self.pos)?;
        self.pos += end;
        Ok(path)
    }

    fn string(&mut self) -> Result<String, ExprError> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let quote = rest
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| err(self.pos, "expected a quoted string"))?;
        let end = rest[1..]
            .find(quote)
            .ok_or_else(|| err(self.pos, "unterminated string"))?;
        let text = rest[1..1 + end].to_owned();
        self.pos += end + 2;
        Ok(text)
    }

    fn primary(&mut self) -> Result<Cond, ExprError> {
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        let start = self.pos;
        let word = self.peek_word();
        self.pos += word.len();
        let cond = match word {
            "valued" => {
                self.expect("(")?;
                Cond::Valued(self.path()?)
            }
            "equals" => {
                self.expect("(")?;
                let p = self.path()?;
                self.expect(",")?;
                Cond::Equals(p, self.string()?)
            }
            "in" | "any" => {
                self.expect("(")?;
                let p = self.path()?;
                self.expect(",")?;
                self.expect("[")?;
                let mut items = vec![self.string()?];
                while self.eat(",") {
                    items.push(self.string()?);
                }
                self.expect("]")?;
                if word == "any" {
                    Cond::Any(p, items)
                } else {
                    Cond::In(p, items)
                }
            }
            "count" => {
                self.expect("(")?;
                let p = self.path()?;
                self.expect(")")?;
                let cmp = [
                    ("==", Cmp::Eq),
                    ("!=", Cmp::Ne),
                    ("<=", Cmp::Le),
                    (">=", Cmp::Ge),
                    ("<", Cmp::Lt),
                    (">", Cmp::Gt),
                ]
                .into_iter()
                .find(|(t, _)| self.eat(t))
                .map(|(_, c)| c)
                .ok_or_else(|| err(self.pos, "expected == != < <= > >= after count(...)"))?;
                self.skip_ws();
                let rest = &self.s[self.pos..];
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let n = rest[..end]
                    .parse()
                    .map_err(|_| err(self.pos, "expected a number"))?;
                self.pos += end;
                return Ok(Cond::Count(p, cmp, n));
            }
            _ => {
                return Err(err(
                    start,
                    "expected valued(…), equals(…, \"x\"), in(…, [\"x\"]), any(…, [\"x\"]), count(…) OP n, not, or (…)",
                ));
            }
        };
        self.expect(")")?;
        Ok(cond)
    }
}

pub(crate) fn parse_cond(s: &str) -> Result<Cond, ExprError> {
    let mut p = CondParser { s, pos: 0 };
    let cond = p.or()?;
    p.skip_ws();
    if p.pos != s.len() {
        return Err(err(p.pos, "unexpected text after the condition"));
    }
    Ok(cond)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_and_targets() {
        let s = parse_source("OBX-14 | OBR-7")
            .map_err(|e| e.message)
            .unwrap_or(Source(vec![]));
        assert_eq!(s.0.len(), 2);
        assert_eq!(
            parse_source("4.2").ok(),
            Some(Source(vec![SrcPath::Relative(vec![4, 2])]))
        );
        assert!(parse_source("4.2.1").is_err());
        assert_eq!(parse_source("PID-3[0]").map_err(|e| e.position), Err(5));
        let t = parse_target("name[].given[]").ok().map(|t| t.0.len());
        assert_eq!(t, Some(2));
        assert!(parse_target("name[x]").is_err());
        assert!(parse_target("a..b").is_err());
    }

    #[test]
    fn parses_conditions() {
        let c = parse_cond(
            r#"valued(PID-3) and not (equals(PID-8, "U") or in(PV1-2, ['I','E'])) or count(PID-11[*]) >= 2 and any(PID-32[*], ["VALI"])"#,
        );
        assert!(matches!(c, Ok(Cond::Or(_, _))), "{c:?}");
        for (bad, pos) in [
            ("valued(PID-3", 12),
            ("equals(PID-8, U)", 14),
            ("count(PID-3) 2", 13),
            ("valid(PID-3)", 0),
            ("valued(PID-3) xor", 14),
        ] {
            assert_eq!(parse_cond(bad).map_err(|e| e.position), Err(pos), "{bad}");
        }
    }
}

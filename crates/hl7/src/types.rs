//! Typed readings of the primitive data types that mappings need: TS/DTM (date and time
//! with precision and UTC offset) and NM (numbers, kept as decimal text so that no
//! precision is lost on the way to FHIR `decimal`).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// How much of a DTM was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// Seconds with this many fractional digits (1–4 in HL7).
    Fraction(u8),
}

/// A DTM (or the first component of a TS): `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// Fractional seconds as sent: the digits' value and their count.
    pub fraction: u32,
    pub precision: Precision,
    /// Offset from UTC in minutes, when sent.
    pub offset_minutes: Option<i16>,
}

/// Why a DTM or NM value could not be read. Says what, never the value itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("date/time has a bad length or non-digit characters")]
    DateTimeSyntax,
    #[error("date/time has an out-of-range part ({0})")]
    DateTimeRange(&'static str),
    #[error("UTC offset is not +HHMM or -HHMM within ±14:00")]
    Offset,
    #[error("a date/time with a time of day needs a UTC offset, and none was sent or configured")]
    NoOffset,
    #[error("number is not [+|-]digits[.digits]")]
    Number,
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0')),
    )
}

pub(crate) fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if year.is_multiple_of(4) && !year.is_multiple_of(100) || year.is_multiple_of(400) => 29,
        _ => 28,
    }
}

impl DateTime {
    /// Parses a DTM. Surrounding blanks are ignored.
    pub fn parse(text: &str) -> Result<DateTime, TypeError> {
        let s = text.trim().as_bytes();
        let (body, offset) = match s.iter().position(|&b| b == b'+' || b == b'-') {
            Some(p) => (&s[..p], Some(parse_offset(&s[p..])?)),
            None => (s, None),
        };
        let (main, frac) = match body.iter().position(|&b| b == b'.') {
            Some(p) => (&body[..p], Some(&body[p + 1..])),
            None => (body, None),
        };
        if !matches!(main.len(), 4 | 6 | 8 | 10 | 12 | 14) {
            return Err(TypeError::DateTimeSyntax);
        }
        let part = |from: usize, to: usize| -> Result<u32, TypeError> {
            match main.get(from..to) {
                None => Ok(0),
                Some(p) => digits(p).ok_or(TypeError::DateTimeSyntax),
            }
        };
        let mut dt = DateTime {
            year: part(0, 4)? as u16,
            month: if main.len() >= 6 {
                part(4, 6)? as u8
            } else {
                1
            },
            day: if main.len() >= 8 {
                part(6, 8)? as u8
            } else {
                1
            },
            hour: part(8, 10)? as u8,
            minute: part(10, 12)? as u8,
            second: part(12, 14)? as u8,
            fraction: 0,
            precision: match main.len() {
                4 => Precision::Year,
                6 => Precision::Month,
                8 => Precision::Day,
                10 => Precision::Hour,
                12 => Precision::Minute,
                _ => Precision::Second,
            },
            offset_minutes: offset,
        };
        if let Some(frac) = frac {
            if main.len() != 14 || frac.is_empty() || frac.len() > 9 {
                return Err(TypeError::DateTimeSyntax);
            }
            dt.fraction = digits(frac).ok_or(TypeError::DateTimeSyntax)?;
            dt.precision = Precision::Fraction(frac.len() as u8);
        }
        if !(1..=12).contains(&dt.month) {
            return Err(TypeError::DateTimeRange("month"));
        }
        if dt.day < 1 || dt.day > days_in_month(dt.year, dt.month) {
            return Err(TypeError::DateTimeRange("day"));
        }
        if dt.hour > 23 {
            return Err(TypeError::DateTimeRange("hour"));
        }
        if dt.minute > 59 {
            return Err(TypeError::DateTimeRange("minute"));
        }
        if dt.second > 59 {
            return Err(TypeError::DateTimeRange("second"));
        }
        Ok(dt)
    }

    /// Whether a time of day was sent (precision hour or finer).
    pub fn has_time(&self) -> bool {
        self.precision >= Precision::Hour
    }

    /// FHIR `date` (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`), dropping any time part.
    pub fn to_fhir_date(&self) -> String {
        let mut out = String::with_capacity(10);
        self.write_fhir_date(&mut out);
        out
    }

    /// [`DateTime::to_fhir_date`], appended to `out`.
    pub fn write_fhir_date(&self, out: &mut String) {
        push_digits(out, u32::from(self.year), 4);
        if self.precision >= Precision::Month {
            out.push('-');
            push_digits(out, u32::from(self.month), 2);
        }
        if self.precision >= Precision::Day {
            out.push('-');
            push_digits(out, u32::from(self.day), 2);
        }
    }

    /// FHIR `dateTime`. FHIR requires seconds and a zone once there is a time of day, so
    /// hour and minute precision are completed with zeros, and `default_offset` (the
    /// site's offset, in minutes) is used when the sender gave none.
    pub fn to_fhir_datetime(&self, default_offset: Option<i16>) -> Result<String, TypeError> {
        if !self.has_time() {
            return Ok(self.to_fhir_date());
        }
        let offset = self
            .offset_minutes
            .or(default_offset)
            .ok_or(TypeError::NoOffset)?;
        Ok(self.to_fhir_datetime_at(offset))
    }

    /// FHIR `dateTime` with `offset` minutes from UTC as its zone; a date alone when no
    /// time of day was sent. The time is written as sent, not converted: give the sent
    /// offset when there is one, and otherwise the one the caller works out (the mapper
    /// applies the site's summer time).
    pub fn to_fhir_datetime_at(&self, offset: i16) -> String {
        let mut out = String::with_capacity(32);
        self.write_fhir_datetime_at(offset, &mut out);
        out
    }

    /// [`DateTime::to_fhir_datetime_at`], appended to `out`.
    pub fn write_fhir_datetime_at(&self, offset: i16, out: &mut String) {
        self.write_fhir_date(out);
        if !self.has_time() {
            return;
        }
        out.push('T');
        push_digits(out, u32::from(self.hour), 2);
        out.push(':');
        push_digits(out, u32::from(self.minute), 2);
        out.push(':');
        push_digits(out, u32::from(self.second), 2);
        if let Precision::Fraction(n) = self.precision {
            out.push('.');
            push_digits(out, self.fraction, usize::from(n));
        }
        push_offset(out, offset, true);
    }

    /// Milliseconds since 1970-01-01 UTC, reading a missing offset as `default_offset`
    /// minutes (`None`: UTC).
    pub fn to_unix_millis(&self, default_offset: Option<i16>) -> i64 {
        let days = days_from_civil(i64::from(self.year), self.month, self.day);
        let secs = days * 86_400
            + i64::from(self.hour) * 3_600
            + i64::from(self.minute) * 60
            + i64::from(self.second);
        let offset = i64::from(self.offset_minutes.or(default_offset).unwrap_or(0));
        let frac_ms = match self.precision {
            Precision::Fraction(n) => i64::from(self.fraction) * 1_000 / 10_i64.pow(u32::from(n)),
            _ => 0,
        };
        (secs - offset * 60) * 1_000 + frac_ms
    }

    /// The current time in UTC, at second precision, with offset +0000.
    pub fn now_utc() -> DateTime {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        DateTime::from_unix(secs)
    }

    /// A UTC date and time from seconds since 1970-01-01.
    pub fn from_unix(secs: u64) -> DateTime {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year: year as u16,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            fraction: 0,
            precision: Precision::Second,
            offset_minutes: Some(0),
        }
    }
}

/// Writes the DTM form back, at its precision.
impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.year)?;
        let parts = [
            (Precision::Month, self.month),
            (Precision::Day, self.day),
            (Precision::Hour, self.hour),
            (Precision::Minute, self.minute),
            (Precision::Second, self.second),
        ];
        for (p, v) in parts {
            if self.precision >= p {
                write!(f, "{v:02}")?;
            }
        }
        if let Precision::Fraction(n) = self.precision {
            write!(f, ".{:0width$}", self.fraction, width = usize::from(n))?;
        }
        if let Some(o) = self.offset_minutes {
            let mut text = String::with_capacity(5);
            push_offset(&mut text, o, false);
            f.write_str(&text)?;
        }
        Ok(())
    }
}

fn parse_offset(s: &[u8]) -> Result<i16, TypeError> {
    let [sign, rest @ ..] = s else {
        return Err(TypeError::Offset);
    };
    if rest.len() != 4 {
        return Err(TypeError::Offset);
    }
    let hours = digits(&rest[..2]).ok_or(TypeError::Offset)? as i16;
    let minutes = digits(&rest[2..]).ok_or(TypeError::Offset)? as i16;
    if hours > 14 || minutes > 59 {
        return Err(TypeError::Offset);
    }
    let total = hours * 60 + minutes;
    Ok(if *sign == b'-' { -total } else { total })
}

/// Writes `n` with exactly `width` decimal digits, zeros in front (dates and times are
/// written for every timestamp a mapping converts: no formatting machinery).
fn push_digits(out: &mut String, n: u32, width: usize) {
    let mut buf = [b'0'; 10];
    let width = width.min(buf.len());
    let mut n = n;
    for digit in buf[..width].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(buf[..width].iter().map(|&b| char::from(b)));
}

/// A UTC offset: `+hh:mm` (FHIR, `Z` for zero) or `+hhmm` (HL7).
fn push_offset(out: &mut String, minutes: i16, fhir: bool) {
    if fhir && minutes == 0 {
        out.push('Z');
        return;
    }
    out.push(if minutes < 0 { '-' } else { '+' });
    let m = u32::from(minutes.unsigned_abs());
    push_digits(out, m / 60, 2);
    if fhir {
        out.push(':');
    }
    push_digits(out, m % 60, 2);
}

/// (year, month, day) to days since 1970-01-01 (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// An NM value, kept as canonical decimal text (FHIR `decimal` keeps precision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Number {
    canonical: String,
}

impl Number {
    /// Parses `[+|-]digits[.digits]` (digits on at least one side of the point).
    pub fn parse(text: &str) -> Result<Number, TypeError> {
        let s = text.trim();
        let (negative, unsigned) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = match unsigned.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (unsigned, None),
        };
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int)
            || !frac.is_none_or(all_digits)
            || int.is_empty() && frac.is_none_or(str::is_empty)
        {
            return Err(TypeError::Number);
        }
        let int = int.trim_start_matches('0');
        let mut canonical = String::with_capacity(s.len() + 1);
        let is_zero = int.is_empty() && frac.is_none_or(|f| f.bytes().all(|b| b == b'0'));
        if negative && !is_zero {
            canonical.push('-');
        }
        canonical.push_str(if int.is_empty() { "0" } else { int });
        if let Some(f) = frac.filter(|f| !f.is_empty()) {
            canonical.push('.');
            canonical.push_str(f);
        }
        Ok(Number { canonical })
    }

    /// Canonical decimal text: no `+`, no leading zeros, trailing zeros kept.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    pub fn to_f64(&self) -> f64 {
        self.canonical.parse().unwrap_or(f64::NAN)
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_precision() {
        let cases = [
            ("2024", Precision::Year, "2024"),
            ("202402", Precision::Month, "2024-02"),
            ("20240229", Precision::Day, "2024-02-29"),
            ("2024022913", Precision::Hour, "2024-02-29T13:00:00+01:00"),
            (
                "202402291307",
                Precision::Minute,
                "2024-02-29T13:07:00+01:00",
            ),
            (
                "20240229130745",
                Precision::Second,
                "2024-02-29T13:07:45+01:00",
            ),
            (
                "20240229130745.12",
                Precision::Fraction(2),
                "2024-02-29T13:07:45.12+01:00",
            ),
            (
                "20240229130745.0012-0500",
                Precision::Fraction(4),
                "2024-02-29T13:07:45.0012-05:00",
            ),
            (
                "20240229130745+0000",
                Precision::Second,
                "2024-02-29T13:07:45Z",
            ),
        ];
        for (text, precision, fhir) in cases {
            let dt = DateTime::parse(text).unwrap();
            assert_eq!(dt.precision, precision, "{text}");
            assert_eq!(dt.to_fhir_datetime(Some(60)).unwrap(), fhir, "{text}");
            assert_eq!(dt.to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_dates() {
        for bad in [
            "",
            "202",
            "2024021",
            "20230229",
            "20241301",
            "2024010125",
            "202401011260",
            "20240101120060",
            "2024010112+01",
            "20240101+1500",
            "2024.5",
            "2024o101",
            "20240101120000.",
        ] {
            assert!(DateTime::parse(bad).is_err(), "{bad}");
        }
        let no_zone = DateTime::parse("202401011200").unwrap();
        assert_eq!(no_zone.to_fhir_datetime(None), Err(TypeError::NoOffset));
        assert_eq!(no_zone.to_fhir_date(), "2024-01-01");
    }

    /// The zone is the one given (the sent one, or the caller's for a time sent without);
    /// dates are written to their precision.
    #[test]
    fn fhir_text_in_a_given_zone() {
        for (text, offset, fhir) in [
            ("20240311084512-0500", -300, "2024-03-11T08:45:12-05:00"),
            ("202403110845", 60, "2024-03-11T08:45:00+01:00"),
            ("2024031108", 0, "2024-03-11T08:00:00Z"),
            ("20240311084512.1234", 330, "2024-03-11T08:45:12.1234+05:30"),
            ("20241231235959.5", -720, "2024-12-31T23:59:59.5-12:00"),
            ("20240311", 60, "2024-03-11"),
            ("202403", 60, "2024-03"),
            ("0999", 60, "0999"),
        ] {
            let dt = DateTime::parse(text).unwrap();
            assert_eq!(dt.to_fhir_datetime_at(offset), fhir, "{text}");
        }
    }

    #[test]
    fn to_unix_millis_inverts_from_unix() {
        for secs in [0u64, 1_709_164_800, 4_102_444_799, 951_782_400] {
            assert_eq!(
                DateTime::from_unix(secs).to_unix_millis(None),
                secs as i64 * 1_000
            );
        }
        let paris = DateTime::parse("20240101120000.5+0100").unwrap();
        assert_eq!(paris.to_unix_millis(None), 1_704_106_800_500);
        let local = DateTime::parse("20240101").unwrap();
        assert_eq!(local.to_unix_millis(Some(60)), 1_704_063_600_000);
    }

    #[test]
    fn unix_time_conversion() {
        assert_eq!(DateTime::from_unix(0).to_string(), "19700101000000+0000");
        assert_eq!(
            DateTime::from_unix(1_709_164_800).to_string(),
            "20240229000000+0000"
        );
        assert_eq!(
            DateTime::from_unix(4_102_444_799).to_string(),
            "20991231235959+0000"
        );
    }

    #[test]
    fn numbers() {
        for (text, canonical) in [
            ("5", "5"),
            ("+5.50", "5.50"),
            ("-0012.0", "-12.0"),
            (".5", "0.5"),
            ("5.", "5"),
            ("-0", "0"),
            (" 140 ", "140"),
        ] {
            assert_eq!(Number::parse(text).unwrap().as_str(), canonical, "{text}");
        }
        for bad in ["", "-", ".", "1.2.3", "1e5", "abc", "1,5", "+-1"] {
            assert!(Number::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Number::parse("-2.25").unwrap().to_f64(), -2.25);
    }
}

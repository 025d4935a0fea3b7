//! The site's UTC offset for a local time sent without one: a standard offset and, where
//! the site observes it, the summer-time rule of its region. The rules are the EU's (since
//! 1996: from the last Sunday of March to the last Sunday of October, at 01:00 UTC) and
//! the US/Canada's (since 2007: from the second Sunday of March at 02:00 local to the first
//! Sunday of November at 02:00 local). Local times in the hour that does not exist or
//! repeats are resolved as standard time.

use passerelle_hl7::types::DateTime;

/// A summer-time rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummerTime {
    /// No summer time: the standard offset all year.
    None,
    /// European Union (and the UK, Switzerland, Norway…): +1 h from the last Sunday of
    /// March to the last Sunday of October, both at 01:00 UTC.
    Eu,
    /// United States and Canada: +1 h from the second Sunday of March to the first Sunday
    /// of November, both at 02:00 local time.
    Us,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// 0 = Sunday.
fn weekday(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

fn last_sunday(year: i64, month: i64, days_in_month: i64) -> i64 {
    let last = days_from_civil(year, month, days_in_month);
    last - weekday(last)
}

fn nth_sunday(year: i64, month: i64, n: i64) -> i64 {
    let first = days_from_civil(year, month, 1);
    first + (7 - weekday(first)) % 7 + 7 * (n - 1)
}

/// The offset (minutes) of the site at local time `dt`.
pub(crate) fn offset_at(dt: &DateTime, standard: i16, rule: SummerTime) -> i16 {
    let year = i64::from(dt.year);
    let local = days_from_civil(year, i64::from(dt.month), i64::from(dt.day)) * 1440
        + i64::from(dt.hour) * 60
        + i64::from(dt.minute);
    let std = i64::from(standard);
    let utc = local - std;
    let summer = match rule {
        SummerTime::None => false,
        SummerTime::Eu => {
            let start = last_sunday(year, 3, 31) * 1440 + 60;
            let end = last_sunday(year, 10, 31) * 1440 + 60;
            (start..end).contains(&utc)
        }
        SummerTime::Us => {
            let start = nth_sunday(year, 3, 2) * 1440 + 120 - std;
            let end = nth_sunday(year, 11, 1) * 1440 + 60 - std;
            (start..end).contains(&utc)
        }
    };
    if summer { standard + 60 } else { standard }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, standard: i16, rule: SummerTime) -> i16 {
        offset_at(&DateTime::parse(text).unwrap(), standard, rule)
    }

    #[test]
    fn calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 3, 31), 19_813);
        assert_eq!(weekday(days_from_civil(2024, 3, 31)), 0); // a Sunday
        assert_eq!(last_sunday(2024, 10, 31), days_from_civil(2024, 10, 27));
        assert_eq!(nth_sunday(2024, 3, 2), days_from_civil(2024, 3, 10));
        assert_eq!(nth_sunday(2024, 11, 1), days_from_civil(2024, 11, 3));
    }

    #[test]
    fn european_summer_time() {
        let eu = SummerTime::Eu;
        assert_eq!(at("20240115120000", 60, eu), 60);
        assert_eq!(at("20240701120000", 60, eu), 120);
        // 2024-03-31: 02:00 local (01:00 UTC) jumps to 03:00.
        assert_eq!(at("202403310159", 60, eu), 60);
        assert_eq!(at("202403310300", 60, eu), 120);
        // 2024-10-27: 03:00 summer time (01:00 UTC) goes back to 02:00.
        assert_eq!(at("202410270159", 60, eu), 120);
        assert_eq!(at("202410270200", 60, eu), 60);
        assert_eq!(at("20240701120000", 0, eu), 60); // London
        assert_eq!(at("20240701120000", 60, SummerTime::None), 60);
    }

    #[test]
    fn us_daylight_saving_time() {
        let us = SummerTime::Us;
        assert_eq!(at("20240115120000", -300, us), -300);
        assert_eq!(at("20240701120000", -300, us), -240);
        // 2024-03-10 02:00 EST → 03:00 EDT; 2024-11-03 02:00 EDT → 01:00 EST.
        assert_eq!(at("202403100159", -300, us), -300);
        assert_eq!(at("202403100300", -300, us), -240);
        assert_eq!(at("202411030059", -300, us), -240);
        assert_eq!(at("202411030200", -300, us), -300);
    }
}

//! RFC 3339 text for `Timestamp`s (UTC, microsecond precision), so every tool
//! that shows or accepts a time (the API, the replay tool, audit exports)
//! agrees on one form. Pure arithmetic on the proleptic Gregorian calendar
//! (Howard Hinnant's `days_from_civil`), which keeps a date library out of
//! the domain.

use crate::values::Timestamp;

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

impl Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, always UTC and always six fraction digits.
    pub fn to_rfc3339(self) -> String {
        let seconds = self.as_micros().div_euclid(MICROS_PER_SECOND);
        let micros = self.as_micros().rem_euclid(MICROS_PER_SECOND);
        let (year, month, day) = civil_from_days(seconds.div_euclid(SECONDS_PER_DAY));
        let of_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z")
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; fractions beyond
    /// microseconds are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, String> {
        let bad = || format!("{text:?} is not an RFC 3339 time like 2026-11-23T14:02:00Z");
        let bytes = text.as_bytes();
        let shape_ok = bytes.len() >= 20
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && matches!(bytes[10], b'T' | b't' | b' ')
            && bytes[13] == b':'
            && bytes[16] == b':';
        if !shape_ok {
            return Err(bad());
        }
        let digits = |from: usize, to: usize| -> Result<i64, String> {
            let part = text.get(from..to).ok_or_else(bad)?;
            if part.bytes().all(|b| b.is_ascii_digit()) { part.parse().map_err(|_| bad()) } else { Err(bad()) }
        };
        let (year, month, day) = (digits(0, 4)?, digits(5, 7)?, digits(8, 10)?);
        let (hour, minute, second) = (digits(11, 13)?, digits(14, 16)?, digits(17, 19)?);
        // A day the month does not have (February 30th) is refused, not carried into the next
        // month; a leap second (:60) is the second after :59.
        if !(1..=12).contains(&month)
            || !(1..=days_in_month(year, month)).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return Err(bad());
        }
        let mut rest = &text[19..];
        let mut micros = 0i64;
        if let Some(fraction) = rest.strip_prefix('.') {
            let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if len == 0 {
                return Err(bad());
            }
            for (i, b) in fraction.bytes().take(6).take_while(u8::is_ascii_digit).enumerate() {
                micros += i64::from(b - b'0') * 10i64.pow(5 - i as u32);
            }
            rest = &fraction[len..];
        }
        let offset_seconds = match rest.as_bytes() {
            b"Z" | b"z" => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let (h, m) = (digits(text.len() - 5, text.len() - 3)?, digits(text.len() - 2, text.len())?);
                if h > 23 || m > 59 {
                    return Err(bad());
                }
                let magnitude = h * 3600 + m * 60;
                if *sign == b'-' { -magnitude } else { magnitude }
            }
            _ => return Err(bad()),
        };
        let seconds =
            days_from_civil(year, month, day) * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_seconds;
        Ok(Timestamp::from_micros(seconds * MICROS_PER_SECOND + micros))
    }
}

/// Days of `month` (1–12) in `year`, in the proleptic Gregorian calendar.
fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date of a day number (inverse of `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_round_trips() {
        let t = Timestamp::parse_rfc3339("2026-11-23T14:02:00Z").unwrap();
        assert_eq!(t.as_micros(), 1_795_442_520_000_000);
        assert_eq!(t.to_rfc3339(), "2026-11-23T14:02:00.000000Z");
        let t = Timestamp::parse_rfc3339("1969-12-31T23:59:59.5-01:00").unwrap();
        assert_eq!(t.to_rfc3339(), "1970-01-01T00:59:59.500000Z");
        assert_eq!(
            Timestamp::parse_rfc3339("2024-02-29T00:00:00.1234567+02:30").unwrap().as_micros() % 1_000_000,
            123_456
        );
        for us in [0, 1, -1, 951_782_400_123_456, 4_102_444_800_000_000, -62_135_596_800_000_000] {
            let t = Timestamp::from_micros(us);
            assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()), Ok(t), "{us}");
        }
    }

    #[test]
    fn malformed_times_are_refused() {
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-23 14:02",
            "2026-11-23T14:02:00",
            "x026-11-23T14:02:00Z",
            "2026-11-23T14:02:00.Z",
            "2026-11-23T14:02:00+2:00",
            // Days the month does not have (found by a black-box check: they were carried into
            // the next month).
            "2026-02-30T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T12:00:00Z",
            "2026-11-00T00:00:00Z",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
        for leap_day in ["2024-02-29T00:00:00Z", "2000-02-29T00:00:00Z", "2026-12-31T23:59:59Z"] {
            assert_eq!(
                Timestamp::parse_rfc3339(leap_day).map(|t| t.to_rfc3339()[..19].to_owned()),
                Ok(leap_day[..19].to_owned())
            );
        }
    }
}

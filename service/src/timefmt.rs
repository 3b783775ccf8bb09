//! Instants and days as the admin API writes and reads them: RFC 3339 UTC,
//! epoch milliseconds, and `YYYY-MM-DD` days (UTC, like the windows).

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, UtcOffset};

fn at_ms(ms: u64) -> Option<OffsetDateTime> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// `2025-01-31T14:05:00.123Z` (an out-of-range instant shows as its ms).
pub fn rfc3339_ms(ms: u64) -> String {
    at_ms(ms)
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Epoch ms from `1738332300000`, `2025-01-31T14:05:00Z` (any offset) or
/// `2025-01-31` (its start, UTC).
pub fn parse_instant(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("{s:?} is out of range"));
    }
    let t = match OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => t,
        Err(_) => parse_date(s)
            .map_err(|_| {
                format!("{s:?} is not epoch ms, an RFC 3339 time or a YYYY-MM-DD date")
            })?
            .midnight()
            .assume_utc(),
    };
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// A `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, format_description!("[year]-[month]-[day]"))
        .map_err(|_| format!("{s:?} is not a YYYY-MM-DD date"))
}

/// The UTC date of an instant.
pub fn date_of_ms(ms: u64) -> Option<Date> {
    at_ms(ms).map(|t| t.to_offset(UtcOffset::UTC).date())
}

/// `20250131`, the day id the scripts use in keys.
pub fn day_id(d: Date) -> String {
    format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `2025-01-31`.
pub fn day_text(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn instants_parse_from_ms_rfc3339_and_dates() {
        assert_eq!(parse_instant("1738332300000").unwrap(), 1_738_332_300_000);
        assert_eq!(parse_instant("2025-01-31T14:05:00Z").unwrap(), 1_738_332_300_000);
        assert_eq!(parse_instant("2025-01-31T15:05:00+01:00").unwrap(), 1_738_332_300_000);
        assert_eq!(parse_instant("2025-01-31").unwrap(), 1_738_281_600_000);
        assert!(parse_instant("yesterday").is_err());
        assert_eq!(rfc3339_ms(1_738_332_300_123), "2025-01-31T14:05:00.123Z");
        let d = date_of_ms(1_738_332_300_000).unwrap();
        assert_eq!((day_id(d), day_text(d)), ("20250131".to_string(), "2025-01-31".to_string()));
    }
}

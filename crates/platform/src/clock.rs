//! Wall-clock helpers every service shares: the current time in epoch milliseconds and
//! the one RFC 3339 formatting of an epoch-millisecond instant. Event-time logic never
//! reads the clock itself; callers pass `now_ms()` in, so that logic stays testable.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

/// 9999-12-31T23:59:59.999Z: the last instant RFC 3339 can show.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch (UTC); 0 for a clock set before 1970, `i64::MAX`
/// for one beyond what `i64` holds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `ms` as RFC 3339 UTC: `2024-02-29T01:00:00Z`, with `.mmm` only when it is not a whole
/// second. Instants outside `0..=MAX_TIME_MS` are clamped into it.
pub fn rfc3339(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_TIME_MS);
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let Ok(t) = OffsetDateTime::from_unix_timestamp(secs) else {
        return String::new();
    };
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    if frac == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_709_168_400_000; // 2024-02-29T01:00:00Z

    #[test]
    fn rfc3339_prints_utc_with_milliseconds_only_when_needed() {
        assert_eq!(rfc3339(T), "2024-02-29T01:00:00Z");
        assert_eq!(rfc3339(T + 7), "2024-02-29T01:00:00.007Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn now_is_after_2024() {
        assert!(now_ms() > T);
    }
}

//! Request parameters: parsing and validation of `from`/`to`/`step`/`limit`/`window`/
//! `currency` into typed values, each failure an error naming its parameter, plus the
//! bucket arithmetic (docs: README "Query API", devstack QUERY_SEMANTICS.md). Both
//! transports go through here; what the numbers mean is the business of `query`.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use pulse_platform::clock::{MAX_TIME_MS, now_ms, rfc3339};

use crate::error::QueryError;

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// The steps of a series, as written in requests, with their length.
pub const STEPS: [(&str, i64); 5] = [
    ("1m", MINUTE_MS),
    ("5m", 5 * MINUTE_MS),
    ("15m", 15 * MINUTE_MS),
    ("1h", HOUR_MS),
    ("1d", DAY_MS),
];
pub const DEFAULT_STEP: &str = "1m";
pub const DEFAULT_WINDOW: &str = "5m";
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 1000;

/// A time given as RFC 3339 (`2024-02-29T01:00:00Z`) or epoch milliseconds.
pub fn parse_time(parameter: &'static str, raw: &str) -> Result<i64, QueryError> {
    let s = raw.trim();
    let ms = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<i64>().ok()
    } else {
        OffsetDateTime::parse(s, &Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok())
    };
    match ms {
        Some(ms) if (0..=MAX_TIME_MS).contains(&ms) => Ok(ms),
        Some(_) => Err(QueryError::invalid(
            parameter,
            format!("{raw:?} is outside 1970-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999Z"),
        )),
        None => Err(QueryError::invalid(
            parameter,
            format!(
                "{raw:?} is neither RFC 3339 (e.g. 2024-02-29T01:00:00Z) nor epoch milliseconds"
            ),
        )),
    }
}

/// A half-open event-time range `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl TimeRange {
    /// The range of optional bounds: `to` defaults to `now`, `from` to `to` − 1 h
    /// (not before the epoch); `from < to` is required.
    pub fn new(from_ms: Option<i64>, to_ms: Option<i64>, now_ms: i64) -> Result<Self, QueryError> {
        let to_ms = to_ms.unwrap_or(now_ms).clamp(0, MAX_TIME_MS);
        let from_ms = from_ms.unwrap_or_else(|| (to_ms - HOUR_MS).max(0));
        if from_ms >= to_ms {
            return Err(QueryError::InvalidRange {
                message: format!(
                    "`from` ({}) must be before `to` ({})",
                    rfc3339(from_ms),
                    rfc3339(to_ms)
                ),
            });
        }
        Ok(Self { from_ms, to_ms })
    }

    /// The range of the HTTP parameters `from` and `to` (absent = default).
    pub fn parse(from: Option<&str>, to: Option<&str>, now_ms: i64) -> Result<Self, QueryError> {
        let from = from.map(|s| parse_time("from", s)).transpose()?;
        let to = to.map(|s| parse_time("to", s)).transpose()?;
        Self::new(from, to, now_ms)
    }

    /// The range of a gRPC request, where 0 (or a negative value) means the default.
    pub fn from_grpc(from_ms: i64, to_ms: i64, now_ms: i64) -> Result<Self, QueryError> {
        let bound = |parameter: &'static str, v: i64| -> Result<Option<i64>, QueryError> {
            match v {
                v if v <= 0 => Ok(None),
                v if v > MAX_TIME_MS => Err(QueryError::invalid(
                    parameter,
                    format!("{v} is after 9999-12-31T23:59:59.999Z"),
                )),
                v => Ok(Some(v)),
            }
        };
        Self::new(bound("from", from_ms)?, bound("to", to_ms)?, now_ms)
    }
}

/// The bucket length of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub ms: i64,
    pub label: &'static str,
}

impl Step {
    /// One of 1m, 5m, 15m, 1h, 1d; absent or empty means 1m.
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let raw = raw
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_STEP);
        STEPS
            .iter()
            .find(|(label, _)| *label == raw)
            .map(|(label, ms)| Self { ms: *ms, label })
            .ok_or_else(|| {
                QueryError::invalid("step", format!("{raw:?} is not one of 1m, 5m, 15m, 1h, 1d"))
            })
    }

    /// The bucket of a window: `floor(window_start_ms / step) * step`.
    pub fn bucket(&self, ms: i64) -> i64 {
        ms.div_euclid(self.ms) * self.ms
    }

    /// Every bucket start from the bucket of `from` up to the last one before `to`,
    /// refused when there are more than `max_points`.
    pub fn buckets(&self, range: TimeRange, max_points: usize) -> Result<Vec<i64>, QueryError> {
        let first = self.bucket(range.from_ms);
        let count = (range.to_ms - first + self.ms - 1) / self.ms;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        if count > max_points {
            return Err(QueryError::TooManyPoints {
                message: format!(
                    "{count} buckets of {} between {} and {}; at most {max_points} per answer: use a larger step or a shorter range",
                    self.label,
                    rfc3339(range.from_ms),
                    rfc3339(range.to_ms)
                ),
            });
        }
        Ok((0..count)
            .map(|i| first + i64::try_from(i).unwrap_or(0) * self.ms)
            .collect())
    }
}

/// The look-back of `active_users/current`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub ms: i64,
    /// As requested (trimmed), e.g. `5m`.
    pub label: String,
}

impl Window {
    /// `<n>m` or `<n>h` (n ≥ 1) up to one day, or `1d`; absent or empty means 5m.
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let raw = raw
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_WINDOW);
        let bad = || {
            QueryError::invalid(
                "window",
                format!("{raw:?} is not a duration like 5m, 2h or 1d (at most 1d)"),
            )
        };
        let split = raw.len().checked_sub(1).ok_or_else(bad)?;
        let (digits, unit) = (
            raw.get(..split).ok_or_else(bad)?,
            raw.get(split..).ok_or_else(bad)?,
        );
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let unit_ms = match unit {
            "m" => MINUTE_MS,
            "h" => HOUR_MS,
            "d" => DAY_MS,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        if n < 1 || ms > DAY_MS {
            return Err(bad());
        }
        Ok(Self {
            ms,
            label: raw.to_owned(),
        })
    }
}

/// `limit` of top pages: 1..=1000, absent means 10.
pub fn parse_limit(raw: Option<&str>) -> Result<u32, QueryError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                QueryError::invalid(
                    "limit",
                    format!("{s:?} is not an integer in 1..={MAX_LIMIT}"),
                )
            }),
    }
}

/// The gRPC `limit`, where 0 means the default.
pub fn limit_from_grpc(limit: u32) -> Result<u32, QueryError> {
    match limit {
        0 => Ok(DEFAULT_LIMIT),
        n if n <= MAX_LIMIT => Ok(n),
        n => Err(QueryError::invalid(
            "limit",
            format!("{n} is not an integer in 1..={MAX_LIMIT}"),
        )),
    }
}

/// An optional ISO-4217 currency filter: three uppercase ASCII letters.
pub fn parse_currency(raw: Option<&str>) -> Result<Option<String>, QueryError> {
    match raw {
        None => Ok(None),
        Some(s) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) => {
            Ok(Some(s.to_owned()))
        }
        Some(s) => Err(QueryError::invalid(
            "currency",
            format!("{s:?} is not an ISO-4217 code (three uppercase letters, e.g. EUR)"),
        )),
    }
}

/// Default and most events of one `/v1/events` answer.
pub const DEFAULT_EVENTS_LIMIT: u32 = 100;
pub const MAX_EVENTS_LIMIT: u32 = 1000;
/// Longest producer trace id searched (ingest keeps at most 128 bytes of it).
pub const MAX_SOURCE_TRACE_ID_BYTES: usize = 256;

/// `limit` of `/v1/events`: 1..=1000, absent means 100 (gRPC: 0 means 100).
pub fn parse_events_limit(raw: Option<&str>) -> Result<u32, QueryError> {
    let bad = |s: &str| {
        QueryError::invalid(
            "limit",
            format!("{s:?} is not an integer in 1..={MAX_EVENTS_LIMIT}"),
        )
    };
    match raw {
        None => Ok(DEFAULT_EVENTS_LIMIT),
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_EVENTS_LIMIT).contains(n))
            .ok_or_else(|| bad(s)),
    }
}

/// The gRPC `limit` of `FindEvents`, where 0 means the default.
pub fn events_limit_from_grpc(limit: u32) -> Result<u32, QueryError> {
    match limit {
        0 => Ok(DEFAULT_EVENTS_LIMIT),
        n if n <= MAX_EVENTS_LIMIT => Ok(n),
        n => Err(QueryError::invalid(
            "limit",
            format!("{n} is not an integer in 1..={MAX_EVENTS_LIMIT}"),
        )),
    }
}

/// The producer trace id searched (`metadata.trace_id` as the producer sent it, any
/// form, matched exactly): required, 1 to 256 bytes, no control characters.
pub fn parse_source_trace_id(raw: Option<&str>) -> Result<String, QueryError> {
    let bad = |why: String| QueryError::invalid("source_trace_id", why);
    match raw {
        None | Some("") => Err(bad(
            "is required: the producer's `metadata.trace_id`, e.g. source_trace_id=abcd-1234"
                .to_owned(),
        )),
        Some(s) if s.len() > MAX_SOURCE_TRACE_ID_BYTES => Err(bad(format!(
            "is {} bytes; at most {MAX_SOURCE_TRACE_ID_BYTES}",
            s.len()
        ))),
        Some(s) if s.chars().any(char::is_control) => {
            Err(bad(format!("{s:?} contains a control character")))
        }
        Some(s) => Ok(s.to_owned()),
    }
}

/// A user id from the path: non-empty, at most 256 bytes.
pub fn parse_user_id(raw: &str) -> Result<String, QueryError> {
    if raw.is_empty() || raw.len() > 256 {
        return Err(QueryError::invalid("user_id", "must be 1 to 256 bytes"));
    }
    Ok(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_platform::api_error::ApiError as _;

    const T: i64 = 1_709_168_400_000; // 2024-02-29T01:00:00Z

    fn param_of(e: QueryError) -> &'static str {
        e.parameter().unwrap()
    }

    #[test]
    fn times_parse_from_rfc3339_and_epoch_milliseconds() {
        assert_eq!(parse_time("from", "2024-02-29T01:00:00Z").unwrap(), T);
        assert_eq!(parse_time("from", "2024-02-29T02:00:00+01:00").unwrap(), T);
        assert_eq!(
            parse_time("from", "2024-02-29T01:00:00.250Z").unwrap(),
            T + 250
        );
        assert_eq!(parse_time("to", &T.to_string()).unwrap(), T);
        assert_eq!(parse_time("to", "0").unwrap(), 0);
    }

    #[test]
    fn bad_times_name_their_parameter() {
        for bad in [
            "",
            "yesterday",
            "2024-02-30T00:00:00Z",
            "-5",
            "1e9",
            "99999999999999999999",
        ] {
            let e = parse_time("to", bad).unwrap_err();
            assert_eq!(param_of(e), "to", "{bad:?}");
        }
        assert_eq!(
            param_of(parse_time("from", "1969-12-31T23:59:59Z").unwrap_err()),
            "from"
        );
    }

    #[test]
    fn rfc3339_prints_utc_with_milliseconds_only_when_needed() {
        assert_eq!(rfc3339(T), "2024-02-29T01:00:00Z");
        assert_eq!(rfc3339(T + 7), "2024-02-29T01:00:00.007Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_time("x", &rfc3339(T + 123)).unwrap(), T + 123);
    }

    #[test]
    fn ranges_default_to_the_last_hour_and_need_from_before_to() {
        assert_eq!(
            TimeRange::parse(None, None, T).unwrap(),
            TimeRange {
                from_ms: T - HOUR_MS,
                to_ms: T
            }
        );
        let to = (T + 5).to_string();
        assert_eq!(
            TimeRange::parse(None, Some(&to), T).unwrap(),
            TimeRange {
                from_ms: T + 5 - HOUR_MS,
                to_ms: T + 5
            }
        );
        let from = T.to_string();
        let e = TimeRange::parse(Some(&from), Some(&from), T).unwrap_err();
        assert_eq!((e.code(), param_of(e)), ("invalid_range", "from"));
        assert_eq!(TimeRange::new(None, Some(10), 0).unwrap().from_ms, 0);
    }

    #[test]
    fn grpc_ranges_treat_zero_as_the_default() {
        assert_eq!(
            TimeRange::from_grpc(0, 0, T).unwrap(),
            TimeRange {
                from_ms: T - HOUR_MS,
                to_ms: T
            }
        );
        assert_eq!(
            TimeRange::from_grpc(5, 10, T).unwrap(),
            TimeRange {
                from_ms: 5,
                to_ms: 10
            }
        );
        assert_eq!(
            param_of(TimeRange::from_grpc(0, i64::MAX, T).unwrap_err()),
            "to"
        );
    }

    #[test]
    fn steps_are_the_five_documented_ones() {
        assert_eq!(Step::parse(None).unwrap().ms, MINUTE_MS);
        assert_eq!(Step::parse(Some("15m")).unwrap().ms, 15 * MINUTE_MS);
        assert_eq!(Step::parse(Some("1d")).unwrap().label, "1d");
        for bad in ["2m", "60s", "1H", "m", "-1m"] {
            assert_eq!(
                param_of(Step::parse(Some(bad)).unwrap_err()),
                "step",
                "{bad}"
            );
        }
    }

    #[test]
    fn buckets_align_to_the_epoch_and_stop_before_to() {
        let step = Step::parse(Some("5m")).unwrap();
        // 01:03 .. 01:15 → buckets 01:00, 01:05, 01:10 (01:15 is not < to).
        let r = TimeRange {
            from_ms: T + 3 * MINUTE_MS,
            to_ms: T + 15 * MINUTE_MS,
        };
        assert_eq!(
            step.buckets(r, 1500).unwrap(),
            vec![T, T + 5 * MINUTE_MS, T + 10 * MINUTE_MS]
        );
        let r = TimeRange {
            from_ms: T,
            to_ms: T + 15 * MINUTE_MS + 1,
        };
        assert_eq!(step.buckets(r, 1500).unwrap().len(), 4);
        assert_eq!(step.bucket(T + 5 * MINUTE_MS - 1), T);
    }

    #[test]
    fn too_many_points_names_the_step() {
        let step = Step::parse(Some("1m")).unwrap();
        let r = TimeRange {
            from_ms: T,
            to_ms: T + 2 * DAY_MS,
        };
        let e = step.buckets(r, 1500).unwrap_err();
        assert_eq!((e.code(), param_of(e)), ("too_many_points", "step"));
        assert_eq!(
            step.buckets(
                TimeRange {
                    from_ms: T,
                    to_ms: T + 1500 * MINUTE_MS
                },
                1500
            )
            .unwrap()
            .len(),
            1500
        );
    }

    #[test]
    fn windows_accept_minutes_and_hours_up_to_a_day() {
        assert_eq!(Window::parse(None).unwrap().ms, 5 * MINUTE_MS);
        assert_eq!(Window::parse(Some("90m")).unwrap().ms, 90 * MINUTE_MS);
        assert_eq!(Window::parse(Some("24h")).unwrap().ms, DAY_MS);
        assert_eq!(Window::parse(Some("1d")).unwrap().ms, DAY_MS);
        for bad in [
            "0m",
            "25h",
            "2d",
            "5",
            "m",
            "5s",
            "1.5h",
            "-5m",
            "é",
            "99999999999999999999h",
        ] {
            assert_eq!(
                param_of(Window::parse(Some(bad)).unwrap_err()),
                "window",
                "{bad}"
            );
        }
    }

    #[test]
    fn limits_are_1_to_1000_and_default_to_10() {
        assert_eq!(parse_limit(None).unwrap(), 10);
        assert_eq!(parse_limit(Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", ""] {
            assert_eq!(
                param_of(parse_limit(Some(bad)).unwrap_err()),
                "limit",
                "{bad}"
            );
        }
        assert_eq!(limit_from_grpc(0).unwrap(), 10);
        assert_eq!(param_of(limit_from_grpc(1001).unwrap_err()), "limit");
    }

    #[test]
    fn events_limits_are_1_to_1000_and_default_to_100() {
        assert_eq!(parse_events_limit(None).unwrap(), 100);
        assert_eq!(parse_events_limit(Some(" 1000 ")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "many", ""] {
            assert_eq!(
                param_of(parse_events_limit(Some(bad)).unwrap_err()),
                "limit",
                "{bad}"
            );
        }
        assert_eq!(events_limit_from_grpc(0).unwrap(), 100);
        assert_eq!(events_limit_from_grpc(7).unwrap(), 7);
        assert_eq!(param_of(events_limit_from_grpc(1001).unwrap_err()), "limit");
    }

    #[test]
    fn source_trace_ids_are_required_bounded_and_printable() {
        assert_eq!(
            parse_source_trace_id(Some("abcd-1234")).unwrap(),
            "abcd-1234"
        );
        let w3c = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(parse_source_trace_id(Some(w3c)).unwrap(), w3c);
        let long = "x".repeat(MAX_SOURCE_TRACE_ID_BYTES + 1);
        for bad in [None, Some(""), Some(long.as_str()), Some("a\nb")] {
            let e = parse_source_trace_id(bad).unwrap_err();
            assert_eq!(param_of(e), "source_trace_id", "{bad:?}");
        }
        assert!(
            parse_source_trace_id(None)
                .unwrap_err()
                .to_string()
                .contains("required")
        );
    }

    #[test]
    fn currencies_are_three_uppercase_letters() {
        assert_eq!(parse_currency(None).unwrap(), None);
        assert_eq!(parse_currency(Some("EUR")).unwrap().as_deref(), Some("EUR"));
        for bad in ["eur", "EURO", "E1R", "", "€UR"] {
            assert_eq!(
                param_of(parse_currency(Some(bad)).unwrap_err()),
                "currency",
                "{bad}"
            );
        }
    }
}

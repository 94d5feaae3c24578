//! Retrying writes: error classification (retryable or not), exponential backoff with
//! jitter, and a circuit breaker that stops hammering a dead server. Pure logic: the
//! caller sleeps.

use std::time::Duration;

/// Whether a failed write may succeed when retried unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection refused/reset, timeouts, server overload (too many parts, memory): retry.
    Retryable,
    /// The server refuses the data itself (parse or type errors): retrying cannot help.
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// ClickHouse exception codes that mean "try again later".
const RETRYABLE_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (replica starting)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
];

/// Classifies a `clickhouse` client error.
pub fn classify(err: &clickhouse::error::Error) -> ErrorKind {
    use clickhouse::error::Error as E;
    match err {
        E::Network(_) | E::TimedOut => ErrorKind::Retryable,
        E::BadResponse(text) => classify_message(text),
        _ => classify_message(&err.to_string()),
    }
}

/// Classifies a server message by its `Code: N` (unknown codes and 5xx-like text are
/// treated as retryable only when they look transient).
pub fn classify_message(text: &str) -> ErrorKind {
    let code = text
        .split("Code: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok());
    match code {
        Some(c) if RETRYABLE_CODES.contains(&c) => ErrorKind::Retryable,
        Some(_) => ErrorKind::Permanent,
        None => ErrorKind::Retryable,
    }
}

/// Exponential backoff with full jitter and a cap; after `open_after` consecutive failures
/// the breaker is open and waits `open_wait` between probes.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub open_after: u32,
    pub open_wait: Duration,
    failures: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, open_after: u32, open_wait: Duration) -> Self {
        Self {
            base,
            cap,
            open_after,
            open_wait,
            failures: 0,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.is_open() {
            return self.open_wait;
        }
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        // xorshift jitter in [exp/2, exp].
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = exp / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let extra = if jitter_ms == 0 {
            0
        } else {
            self.seed % (jitter_ms + 1)
        };
        half + Duration::from_millis(extra)
    }

    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// The circuit is open: the server failed `open_after` times in a row.
    pub fn is_open(&self) -> bool {
        self.failures >= self.open_after
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_codes_are_classified() {
        assert_eq!(
            classify_message("Code: 252, e.displayText() = DB::Exception: Too many parts"),
            ErrorKind::Retryable
        );
        assert_eq!(
            classify_message("Code: 27, e.displayText() = DB::Exception: Cannot parse input"),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify_message("Code: 53. DB::Exception: Type mismatch"),
            ErrorKind::Permanent
        );
        assert_eq!(
            classify_message("connection reset by peer"),
            ErrorKind::Retryable
        );
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_then_the_breaker_opens() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            6,
            Duration::from_secs(10),
        );
        let waits: Vec<Duration> = (0..5).map(|_| b.failure()).collect();
        for (i, w) in waits.iter().enumerate() {
            let exp =
                (Duration::from_millis(100) * 2u32.pow(i as u32 + 1)).min(Duration::from_secs(2));
            assert!(
                *w >= exp / 2 && *w <= exp,
                "attempt {i}: {w:?} not in [{:?}, {exp:?}]",
                exp / 2
            );
        }
        assert!(!b.is_open());
        assert_eq!(
            b.failure(),
            Duration::from_secs(10),
            "open circuit waits the probe interval"
        );
        assert!(b.is_open());
        b.success();
        assert!(!b.is_open() && b.failures() == 0);
    }
}

//! Load-run accounting: event counts by outcome, request latencies (a log-bucket
//! histogram, so memory stays fixed however long the run), the counts shown beside the
//! live progress and the final summary. Sending and generating are left to the other
//! loadgen modules.

use std::time::Duration;

/// Request latencies in log buckets: bucket `i` holds [B^i, B^(i+1)) microseconds with
/// B = 1.05, so a percentile is within 2.5 % of the exact value.
#[derive(Debug, Clone)]
pub struct Latencies {
    counts: Vec<u64>,
    total: u64,
}

const BASE: f64 = 1.05;
/// Enough buckets for 1 µs .. ~27 h.
const BUCKETS: usize = 520;

impl Default for Latencies {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros().max(1)) as f64;
        let i = ((us.ln() / BASE.ln()) as usize).min(BUCKETS - 1);
        self.counts[i] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The q-quantile (nearest rank), as the geometric middle of its bucket; None when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let us = BASE.powf(i as f64 + 0.5);
                return Some(Duration::from_secs_f64(us / 1e6));
            }
        }
        None
    }
}

/// Running counts of a load run. An event is `sent` only once ingest answered for it
/// (accepted, duplicate or rejected); `failed` events were never acknowledged (transport
/// failures after every retry, or an error answer); `unsent` ones were dropped at Ctrl-C.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub generated: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub failed: u64,
    pub unsent: u64,
    pub requests: u64,
    pub retries: u64,
    pub latencies: Latencies,
}

impl Counts {
    pub fn sent(&self) -> u64 {
        self.accepted + self.duplicates + self.rejected
    }

    /// Events whose fate is settled: answered, failed or dropped unsent.
    pub fn done(&self) -> u64 {
        self.sent() + self.failed + self.unsent
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
    )
}

/// The counts shown beside the progress (`crate::progress`): outcomes so far and the
/// request latency percentiles.
pub fn progress_message(c: &Counts) -> String {
    format!(
        "accepted {}, duplicates {}, rejected {}, failed {}, p50 {}, p99 {}",
        c.accepted,
        c.duplicates,
        c.rejected,
        c.failed,
        ms(c.latencies.quantile(0.5)),
        ms(c.latencies.quantile(0.99)),
    )
}

/// The end-of-run summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub seed: u64,
    pub generated: u64,
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub failed: u64,
    pub unsent: u64,
    pub requests: u64,
    pub retries: u64,
    pub elapsed: Duration,
    /// Events answered per second over the run.
    pub achieved_rate: f64,
    pub latency_p50: Option<Duration>,
    pub latency_p99: Option<Duration>,
}

impl Summary {
    pub fn new(seed: u64, c: &Counts, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        Self {
            seed,
            generated: c.generated,
            sent: c.sent(),
            accepted: c.accepted,
            duplicates: c.duplicates,
            rejected: c.rejected,
            failed: c.failed,
            unsent: c.unsent,
            requests: c.requests,
            retries: c.retries,
            elapsed,
            achieved_rate: if secs > 0.0 {
                c.sent() as f64 / secs
            } else {
                0.0
            },
            latency_p50: c.latencies.quantile(0.5),
            latency_p99: c.latencies.quantile(0.99),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "loadgen summary (seed {})", self.seed)?;
        writeln!(f, "  sent          {}", self.sent)?;
        writeln!(f, "  accepted      {}", self.accepted)?;
        writeln!(f, "  duplicates    {}", self.duplicates)?;
        writeln!(f, "  rejected      {}", self.rejected)?;
        writeln!(f, "  failed        {} (never acknowledged)", self.failed)?;
        if self.unsent > 0 {
            writeln!(
                f,
                "  unsent        {} (stopped before sending)",
                self.unsent
            )?;
        }
        writeln!(
            f,
            "  requests      {} ({} retried)",
            self.requests, self.retries
        )?;
        writeln!(
            f,
            "  achieved rate {:.1} events/s over {:.1} s",
            self.achieved_rate,
            self.elapsed.as_secs_f64()
        )?;
        write!(
            f,
            "  latency       p50 {}  p99 {}",
            ms(self.latency_p50),
            ms(self.latency_p99)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_are_within_the_bucket_resolution() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile(0.5), None);
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        let near = |got: Option<Duration>, want_ms: f64| {
            let got = got.unwrap().as_secs_f64() * 1e3;
            (got - want_ms).abs() <= want_ms * 0.03
        };
        assert!(near(l.quantile(0.5), 500.0), "{:?}", l.quantile(0.5));
        assert!(near(l.quantile(0.99), 990.0), "{:?}", l.quantile(0.99));
        assert!(near(l.quantile(0.0), 1.0));
        assert_eq!(l.count(), 1000);
    }

    #[test]
    fn summary_rate_counts_only_answered_events() {
        let c = Counts {
            generated: 120,
            accepted: 90,
            duplicates: 5,
            rejected: 5,
            failed: 20,
            ..Counts::default()
        };
        let s = Summary::new(1, &c, Duration::from_secs(10));
        assert_eq!(s.sent, 100);
        assert!((s.achieved_rate - 10.0).abs() < 1e-9);
        let text = s.to_string();
        assert!(text.contains("failed        20"), "{text}");
    }
}

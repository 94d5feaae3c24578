//! A sink's *blocked* state: while the store refuses every write for a reason that is not
//! about the data (see `retry::ErrorKind::Blocking`), readiness answers 503 with the
//! reason, `pulse_writer_blocked{sink,reason}` is 1, and each retry is logged at WARN with
//! the error. Retrying, pausing and committing stay with the sink loops.

use pulse_platform::Health;

use crate::metrics as m;
use crate::retry::BlockReason;

/// The blocked state of one sink.
#[derive(Debug)]
pub struct Blocked {
    sink: &'static str,
    health: Health,
    current: Option<BlockReason>,
}

impl Blocked {
    /// Not blocked; every reason's gauge is 0 (so the series exist for alerts).
    pub fn new(sink: &'static str, health: Health) -> Self {
        for r in BlockReason::ALL {
            metrics::gauge!(m::BLOCKED, "sink" => sink, "reason" => r.as_str()).set(0.0);
        }
        Self {
            sink,
            health,
            current: None,
        }
    }

    /// The store refused a write for `reason` (`error` is the store's message).
    pub fn set(&mut self, reason: BlockReason, error: &str) {
        if self.current != Some(reason) {
            if let Some(old) = self.current {
                metrics::gauge!(m::BLOCKED, "sink" => self.sink, "reason" => old.as_str()).set(0.0);
            }
            metrics::gauge!(m::BLOCKED, "sink" => self.sink, "reason" => reason.as_str()).set(1.0);
            tracing::warn!(
                sink = self.sink,
                reason = reason.as_str(),
                error,
                "the store refuses writes for a reason that is not about the data; consumption paused, nothing dead-lettered or committed, retrying until it is fixed"
            );
            self.current = Some(reason);
        }
        // The reason with the store's (first line of the) message, for /readyz.
        let first_line = error.lines().next().unwrap_or_default();
        let detail: String = first_line.chars().take(300).collect();
        self.health
            .block(self.sink, format!("{} ({detail})", reason.as_str()));
    }

    /// A write succeeded: not blocked any more.
    pub fn clear(&mut self) {
        if let Some(old) = self.current.take() {
            metrics::gauge!(m::BLOCKED, "sink" => self.sink, "reason" => old.as_str()).set(0.0);
            tracing::info!(
                sink = self.sink,
                reason = old.as_str(),
                "the store accepts writes again; consumption resumes"
            );
            self.health.unblock(self.sink);
        }
    }

    pub fn reason(&self) -> Option<BlockReason> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_sink_is_not_ready_until_a_write_succeeds() {
        let health = Health::new();
        health.set_ready(true);
        let mut b = Blocked::new("clickhouse", health.clone());
        assert!(health.is_ready());
        b.set(
            BlockReason::UnknownTable,
            "Code: 60, e.displayText() = DB::Exception: Table pulse.events doesn't exist.",
        );
        assert!(!health.is_ready());
        assert_eq!(
            health.blocked().as_deref(),
            Some(
                "clickhouse: unknown_table (Code: 60, e.displayText() = DB::Exception: Table pulse.events doesn't exist.)"
            )
        );
        assert_eq!(b.reason(), Some(BlockReason::UnknownTable));
        b.set(BlockReason::Authentication, "Code: 193");
        assert_eq!(
            health.blocked().as_deref(),
            Some("clickhouse: authentication (Code: 193)")
        );
        b.clear();
        assert!(health.is_ready() && health.blocked().is_none());
        assert_eq!(b.reason(), None);
    }
}

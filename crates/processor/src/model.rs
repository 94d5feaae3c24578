//! The processor's input and settings, shared by the window, session and watermark logic.
//! Everything here is plain data; Kafka and protobuf decoding live in `run`.

/// One event as the processor sees it: the fields the aggregates need, plus where it came
/// from (partition and offset decide output versions and the safe commit point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputEvent {
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub user_id: String,
    pub event_type: String,
    /// Empty when the event has no page.
    pub page: String,
    /// Empty when the event has no amount.
    pub currency: String,
    pub amount_micros: Option<i64>,
    /// Event time (the producer's `metadata.event_timestamp`), epoch ms.
    pub event_time_ms: i64,
    /// Processing time (`pulse-ingest-ts`), epoch ms.
    pub ingest_ms: i64,
}

impl InputEvent {
    /// Page views are events of type `page_view`.
    pub fn is_page_view(&self) -> bool {
        self.event_type == "page_view"
    }

    /// Revenue comes from `purchase` events that carry an amount and a currency.
    pub fn revenue(&self) -> Option<(&str, i64)> {
        match (self.event_type.as_str(), self.amount_micros) {
            ("purchase", Some(a)) if !self.currency.is_empty() => Some((self.currency.as_str(), a)),
            _ => None,
        }
    }
}

/// Event-time settings (all durations in ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeConfig {
    /// Tumbling window size.
    pub window_ms: i64,
    /// How long after a window's end (in event time, by the watermark) a late event still
    /// corrects it; later events go to the late topic.
    pub allowed_lateness_ms: i64,
    /// Watermark = max event time seen − this.
    pub max_out_of_orderness_ms: i64,
    /// A partition with no record for this long (processing time) is idle and does not
    /// hold the watermark back.
    pub idle_timeout_ms: i64,
    /// An event time beyond processing time + this is future-dated: it is aggregated but
    /// never advances the watermark.
    pub max_future_skew_ms: i64,
    /// Session gap: a user's events further apart than this start a new session.
    pub session_gap_ms: i64,
}

impl Default for TimeConfig {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            allowed_lateness_ms: 60_000,
            max_out_of_orderness_ms: 5_000,
            idle_timeout_ms: 30_000,
            max_future_skew_ms: 300_000,
            session_gap_ms: 30 * 60_000,
        }
    }
}

/// Default maximum session duration (24 h): a user's run of events with no gap longer than
/// the session gap is cut into sessions shorter than this (see `session`). Kept out of
/// [`TimeConfig`], which other crates build field by field; the engine takes it with
/// `Engine::with_max_session_ms`.
pub const DEFAULT_MAX_SESSION_MS: i64 = 24 * 3_600_000;

/// Whether an event was taken into state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Added,
    /// Its event id is already in one of the user's open windows or sessions.
    Duplicate,
    /// Later than the allowed lateness: goes to the late topic.
    Late,
}

/// The deterministic version of an aggregate: derived only from the input folded in, so a
/// rebuild after a restart gives the same version for the same content. Higher offsets win;
/// for the same highest offset, more events win (a rebuild from a later commit point that
/// sees only a suffix of a window's events gets a lower version than the complete one); a
/// final result beats an early one with the same content.
pub fn version(max_offset: i64, event_count: u64, is_final: bool) -> u64 {
    let offset = u64::try_from(max_offset.saturating_add(1)).unwrap_or(0);
    let count = event_count.min((1 << 23) - 1);
    (offset << 24) | (count << 1) | u64::from(is_final)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_offset_then_count_then_finality() {
        assert!(version(10, 1, false) > version(9, 100, true));
        assert!(version(10, 5, false) > version(10, 4, true));
        assert!(version(10, 5, true) > version(10, 5, false));
        assert_eq!(version(10, 5, true), version(10, 5, true));
    }
}

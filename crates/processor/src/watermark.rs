//! Per-partition event-time watermarks and the processor's combined watermark.
//!
//! Each assigned partition tracks the highest (non-future) event time it has seen; its
//! watermark is that time minus `max_out_of_orderness_ms`, so it only ever moves forward.
//! The combined watermark is the minimum over the partitions that have data and are not
//! idle; idle partitions (no record for `idle_timeout_ms` of processing time) do not hold
//! it back, and when every partition with data is idle it is the maximum of theirs, so
//! event time keeps advancing when traffic stops.
//!
//! The combined value is a pure function of the current state: it can step back when an
//! idle partition becomes active again or when a partition is assigned. Callers that need
//! a monotonic value keep the maximum of what they have used.

use std::collections::BTreeMap;

use crate::model::TimeConfig;

/// How an observed event relates to processing time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The event advanced (or could have advanced) the partition's watermark.
    Normal,
    /// `event_time > now_ms + max_future_skew_ms`: it is aggregated but never advances
    /// the watermark.
    Future,
}

#[derive(Debug, Clone, Copy)]
struct PartitionState {
    /// Highest non-future event time seen, None before data.
    max_event_ms: Option<i64>,
    /// Processing time of the last record (or of the assignment).
    last_activity_ms: i64,
}

/// Per-partition event-time watermarks.
///
/// The processor's watermark is the minimum over assigned partitions that have seen data
/// and are not idle; a partition is idle when no record arrived for `idle_timeout_ms` of
/// processing time, and then does not hold the watermark back. If every partition with
/// data is idle, the watermark is the maximum of their watermarks (time still advances
/// when traffic stops). Future-dated events never advance it.
#[derive(Debug, Clone)]
pub struct Watermarks {
    cfg: TimeConfig,
    partitions: BTreeMap<i32, PartitionState>,
}

impl Watermarks {
    /// Creates an empty set (no partition assigned).
    pub fn new(cfg: TimeConfig) -> Self {
        Self {
            cfg,
            partitions: BTreeMap::new(),
        }
    }

    /// Assigns `partition`; it starts with no data and counts as active from `now_ms`.
    /// Assigning a partition that is already assigned only refreshes its activity.
    pub fn assign(&mut self, partition: i32, now_ms: i64) {
        self.touch(partition, now_ms);
    }

    /// Forgets `partition` (it no longer counts for the combined watermark).
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Records an event of `partition` (also marks the partition active at `now_ms`).
    /// Future events refresh activity but do not move max event time. An unassigned
    /// partition is assigned implicitly.
    pub fn observe(&mut self, partition: i32, event_time_ms: i64, now_ms: i64) -> Observation {
        let future = event_time_ms > now_ms.saturating_add(self.cfg.max_future_skew_ms.max(0));
        let state = self.state_mut(partition, now_ms);
        if future {
            return Observation::Future;
        }
        state.max_event_ms = Some(match state.max_event_ms {
            Some(m) => m.max(event_time_ms),
            None => event_time_ms,
        });
        Observation::Normal
    }

    /// Marks activity without an event (e.g. a record that could not be decoded). An
    /// unassigned partition is assigned implicitly.
    pub fn touch(&mut self, partition: i32, now_ms: i64) {
        self.state_mut(partition, now_ms);
    }

    /// The highest (non-future) event time the partition has seen, None before data.
    pub fn max_event_time(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(|s| s.max_event_ms)
    }

    /// The partition's own watermark (max event time − max_out_of_orderness_ms), None
    /// before data or when the partition is not assigned.
    pub fn partition_watermark(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|s| self.watermark_of(s))
    }

    /// The combined watermark at processing time `now_ms`; None when no assigned
    /// partition has data, or while an active (not idle) assigned partition has none yet.
    pub fn current(&self, now_ms: i64) -> Option<i64> {
        let mut active_min: Option<i64> = None;
        let mut idle_max: Option<i64> = None;
        for state in self.partitions.values() {
            let Some(wm) = self.watermark_of(state) else {
                // An active partition that has not delivered data yet (e.g. its backlog is
                // still being fetched) holds the watermark back; an idle one does not.
                if !self.is_idle(state, now_ms) {
                    return None;
                }
                continue;
            };
            if self.is_idle(state, now_ms) {
                idle_max = Some(idle_max.map_or(wm, |m| m.max(wm)));
            } else {
                active_min = Some(active_min.map_or(wm, |m| m.min(wm)));
            }
        }
        active_min.or(idle_max)
    }

    /// The assigned partitions that are idle at `now_ms` (with or without data), ascending.
    pub fn idle_partitions(&self, now_ms: i64) -> Vec<i32> {
        self.partitions
            .iter()
            .filter(|(_, s)| self.is_idle(s, now_ms))
            .map(|(p, _)| *p)
            .collect()
    }

    fn state_mut(&mut self, partition: i32, now_ms: i64) -> &mut PartitionState {
        let state = self.partitions.entry(partition).or_insert(PartitionState {
            max_event_ms: None,
            last_activity_ms: now_ms,
        });
        state.last_activity_ms = state.last_activity_ms.max(now_ms);
        state
    }

    fn watermark_of(&self, state: &PartitionState) -> Option<i64> {
        state
            .max_event_ms
            .map(|m| m.saturating_sub(self.cfg.max_out_of_orderness_ms.max(0)))
    }

    fn is_idle(&self, state: &PartitionState, now_ms: i64) -> bool {
        now_ms.saturating_sub(state.last_activity_ms) >= self.cfg.idle_timeout_ms.max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TimeConfig {
        TimeConfig {
            max_out_of_orderness_ms: 1_000,
            idle_timeout_ms: 10_000,
            max_future_skew_ms: 60_000,
            ..TimeConfig::default()
        }
    }

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn a_partition_watermark_is_max_event_time_minus_out_of_orderness() {
        let mut w = Watermarks::new(cfg());
        w.assign(0, NOW);
        assert_eq!(w.partition_watermark(0), None);
        assert_eq!(w.current(NOW), None);
        assert_eq!(w.observe(0, NOW - 5_000, NOW), Observation::Normal);
        assert_eq!(w.partition_watermark(0), Some(NOW - 6_000));
        assert_eq!(w.current(NOW), Some(NOW - 6_000));
    }

    #[test]
    fn the_watermark_is_monotonic_per_partition() {
        let mut w = Watermarks::new(cfg());
        w.observe(0, NOW - 1_000, NOW);
        w.observe(0, NOW - 50_000, NOW + 1);
        assert_eq!(w.partition_watermark(0), Some(NOW - 2_000));
    }

    #[test]
    fn the_combined_watermark_is_the_minimum_over_active_partitions() {
        let mut w = Watermarks::new(cfg());
        w.assign(0, NOW);
        w.assign(1, NOW);
        w.assign(2, NOW);
        w.observe(0, NOW - 1_000, NOW);
        w.observe(1, NOW - 20_000, NOW);
        // Partition 2 is active but delivered nothing yet (its backlog may still be on the
        // way): no watermark, so partitions 0 and 1 cannot make its events late.
        assert_eq!(w.current(NOW), None);
        w.observe(2, NOW - 5_000, NOW);
        assert_eq!(w.current(NOW), Some(NOW - 21_000));
        // Once silent for the idle timeout, a partition without data no longer holds it back.
        let mut v = Watermarks::new(cfg());
        v.assign(3, NOW);
        v.observe(0, NOW - 1_000, NOW + 10_000);
        assert_eq!(v.current(NOW + 10_000), Some(NOW - 2_000));
    }

    #[test]
    fn an_idle_partition_does_not_hold_the_watermark_back() {
        let mut w = Watermarks::new(cfg());
        w.observe(0, NOW - 20_000, NOW);
        w.observe(1, NOW - 1_000, NOW + 5_000);
        assert_eq!(w.current(NOW + 9_999), Some(NOW - 21_000));
        assert_eq!(w.idle_partitions(NOW + 9_999), Vec::<i32>::new());
        // Partition 0 saw nothing for 10 s: idle, skipped.
        assert_eq!(w.idle_partitions(NOW + 10_000), vec![0]);
        assert_eq!(w.current(NOW + 10_000), Some(NOW - 2_000));
        // A record (even an undecodable one) makes it active again.
        w.touch(0, NOW + 11_000);
        assert_eq!(w.current(NOW + 11_000), Some(NOW - 21_000));
    }

    #[test]
    fn when_every_partition_is_idle_the_watermark_is_their_maximum() {
        let mut w = Watermarks::new(cfg());
        w.observe(0, NOW - 20_000, NOW);
        w.observe(1, NOW - 1_000, NOW);
        assert_eq!(w.idle_partitions(NOW + 100_000), vec![0, 1]);
        assert_eq!(w.current(NOW + 100_000), Some(NOW - 2_000));
    }

    #[test]
    fn a_future_event_does_not_advance_the_watermark_but_refreshes_activity() {
        let mut w = Watermarks::new(cfg());
        w.observe(0, NOW - 1_000, NOW);
        assert_eq!(
            w.observe(0, NOW + 5_000 + 60_001, NOW + 5_000),
            Observation::Future
        );
        assert_eq!(w.partition_watermark(0), Some(NOW - 2_000));
        assert_eq!(w.idle_partitions(NOW + 14_999), Vec::<i32>::new());
        // Exactly at the skew limit is still normal.
        assert_eq!(w.observe(0, NOW + 60_000, NOW), Observation::Normal);
        assert_eq!(w.partition_watermark(0), Some(NOW + 59_000));
    }

    #[test]
    fn a_partition_with_only_future_events_has_no_watermark() {
        let mut w = Watermarks::new(cfg());
        assert_eq!(w.observe(3, NOW + 1_000_000, NOW), Observation::Future);
        assert_eq!(w.partition_watermark(3), None);
        assert_eq!(w.current(NOW), None);
    }

    #[test]
    fn observing_an_unassigned_partition_assigns_it() {
        let mut w = Watermarks::new(cfg());
        w.observe(7, NOW, NOW);
        assert_eq!(w.partition_watermark(7), Some(NOW - 1_000));
        assert_eq!(w.idle_partitions(NOW + 10_000), vec![7]);
    }

    #[test]
    fn revoking_a_partition_removes_it_from_the_watermark() {
        let mut w = Watermarks::new(cfg());
        w.observe(0, NOW - 20_000, NOW);
        w.observe(1, NOW - 1_000, NOW);
        w.revoke(0);
        assert_eq!(w.partition_watermark(0), None);
        assert_eq!(w.current(NOW), Some(NOW - 2_000));
        w.revoke(1);
        assert_eq!(w.current(NOW), None);
        assert!(w.idle_partitions(NOW + 1_000_000).is_empty());
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let mut w = Watermarks::new(TimeConfig {
            max_out_of_orderness_ms: i64::MAX,
            idle_timeout_ms: i64::MAX,
            max_future_skew_ms: i64::MAX,
            ..TimeConfig::default()
        });
        w.observe(0, i64::MIN, i64::MAX);
        w.observe(1, i64::MAX, 0);
        assert_eq!(w.partition_watermark(0), Some(i64::MIN));
        assert_eq!(w.partition_watermark(1), Some(0));
        assert_eq!(w.current(i64::MIN), Some(i64::MIN));
        assert_eq!(w.idle_partitions(i64::MAX), vec![1]);
    }
}

//! The comparison itself, without I/O: the topics' side of a closed range (a [`Book`])
//! against what the stores hold for it, per window and per path, and the revenue per
//! hour and currency against what the query API serves. Every accepted event must end in
//! exactly one terminal state per path:
//! - `clickhouse`: a row of `events`, or dead-lettered by a writer;
//! - `archive`: a row of the Parquet archive (distinct ids: the archive is at least
//!   once), or dead-lettered by a writer;
//! - `aggregate`: counted by the latest version of its user's window, or on the late
//!   topic. Aggregates carry no ids, so this path is checked by count per user and window.

use std::collections::{BTreeMap, HashMap, HashSet};

use pulse_contracts::money::micros_to_decimal;
use pulse_storage::ledger::UserWindow;

use super::book::{Accepted, Book};

/// The paths an accepted event takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    Clickhouse,
    Archive,
    Aggregate,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Clickhouse, Path::Archive, Path::Aggregate];

    /// The metric label and the word printed.
    pub fn label(self) -> &'static str {
        match self {
            Path::Clickhouse => "clickhouse",
            Path::Archive => "archive",
            Path::Aggregate => "aggregate",
        }
    }
}

/// An event id with its event time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdAt {
    pub event_time_ms: i64,
    pub event_id: String,
}

/// One path's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathResult {
    /// Accepted events checked (all of the range's).
    pub checked: u64,
    /// Accepted events in no terminal state of the path (ids; aggregate: empty, see
    /// `missing_count`).
    pub missing: Vec<IdAt>,
    /// Accepted events in more than one terminal state (stored and dead-lettered).
    pub duplicate: Vec<IdAt>,
    /// Ids stored for the range that were never accepted.
    pub unexpected: Vec<IdAt>,
    /// Counts (equal to the lengths above on the id paths; the aggregate path has only these).
    pub missing_count: u64,
    pub duplicate_count: u64,
    pub unexpected_count: u64,
}

impl PathResult {
    pub fn is_clean(&self) -> bool {
        self.missing_count == 0 && self.duplicate_count == 0 && self.unexpected_count == 0
    }
}

/// One window of the per-minute table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowRow {
    pub start_ms: i64,
    pub accepted: u64,
    pub clickhouse: u64,
    /// `None` when the archive was not checked.
    pub archive: Option<u64>,
    pub aggregated: u64,
    pub late: u64,
    pub dlq: u64,
}

/// A user's window whose count differs from its accepted, not late events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowDiff {
    pub user_id: String,
    pub window_start_ms: i64,
    /// Accepted, not late, distinct events.
    pub expected: u64,
    /// `event_count` of the latest version (0: no row).
    pub counted: u64,
}

/// Revenue of one hour and currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevenueRow {
    pub hour_ms: i64,
    pub currency: String,
    /// From the raw events: accepted, not late, distinct ids, exact micros.
    pub raw: i128,
    /// As the query API serves it from the aggregates.
    pub served: i128,
}

impl RevenueRow {
    pub fn delta(&self) -> i128 {
        self.served - self.raw
    }
}

/// What the stores hold for the range.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// ClickHouse `events`: id → event time.
    pub clickhouse: HashMap<String, i64>,
    /// Parquet archive: id → event time; `None` when not checked.
    pub archive: Option<HashMap<String, i64>>,
    /// Latest version of every user's window starting in the range.
    pub windows: Vec<UserWindow>,
    /// Revenue the query API serves: (hour, currency) → micros; `None` when not checked.
    pub served_revenue: Option<BTreeMap<(i64, String), i128>>,
}

/// The reconciliation of one closed range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub from_ms: i64,
    pub to_ms: i64,
    pub window_ms: i64,
    pub windows: Vec<WindowRow>,
    pub paths: BTreeMap<Path, PathResult>,
    pub window_diffs: Vec<WindowDiff>,
    /// Users' windows whose latest version is not final although the range is closed.
    pub open_windows: u64,
    /// Extra copies of ids on the events topic (replays, redeliveries; not a mismatch).
    pub topic_copies: u64,
    /// Events of the range accepted too recently to judge (left out on every side).
    pub in_flight: u64,
    /// `None` when revenue was not checked.
    pub revenue: Option<Vec<RevenueRow>>,
}

const HOUR_MS: i64 = 3_600_000;

fn window_of(t: i64, from: i64, window_ms: i64) -> i64 {
    from + (t - from).div_euclid(window_ms) * window_ms
}

/// Compares the book's events in `[from, to)` with `stored`; windows of `window_ms`.
/// Events accepted at or after `accepted_before` are in flight (a late arrival the
/// processor and writers may not have handled yet): left out on every side.
pub fn reconcile(
    book: &Book,
    stored: &Stored,
    range: (i64, i64),
    window_ms: i64,
    accepted_before: i64,
) -> Report {
    let (from, to) = range;
    let in_range = |t: i64| (from..to).contains(&t);
    type Entry<'a> = (&'a str, &'a Accepted);
    let (accepted, in_flight): (Vec<Entry>, Vec<Entry>) = book
        .accepted
        .iter()
        .map(|(id, a)| (&**id, a))
        .filter(|(_, a)| in_range(a.event_time_ms))
        .partition(|(_, a)| a.ingest_ms < accepted_before);
    let ids: HashSet<&str> = accepted.iter().map(|(id, _)| *id).collect();
    let flying: HashSet<&str> = in_flight.iter().map(|(id, _)| *id).collect();
    let in_range = |t: i64, id: &str| (from..to).contains(&t) && !flying.contains(id);
    let is_late = |id: &str| book.late.contains_key(id);
    let is_dlq = |a: &Accepted| book.dlq.contains_key(&a.hash);

    let mut rows: BTreeMap<i64, WindowRow> = BTreeMap::new();
    let mut w = from;
    while w < to {
        rows.insert(
            w,
            WindowRow {
                start_ms: w,
                archive: stored.archive.as_ref().map(|_| 0),
                ..WindowRow::default()
            },
        );
        w = w.saturating_add(window_ms.max(1));
    }

    let mut report = Report {
        from_ms: from,
        to_ms: to,
        window_ms,
        in_flight: in_flight.len() as u64,
        ..Report::default()
    };
    let id_at = |(id, a): &Entry| IdAt {
        event_time_ms: a.event_time_ms,
        event_id: (*id).to_owned(),
    };

    // The id paths.
    let mut id_path = |path: Path, store: &HashMap<String, i64>| {
        let mut r = PathResult {
            checked: accepted.len() as u64,
            ..PathResult::default()
        };
        for e in &accepted {
            let (id, a) = *e;
            let (stored_there, dead) = (store.contains_key(id), is_dlq(a));
            let slot = rows.get_mut(&window_of(a.event_time_ms, from, window_ms));
            if let Some(slot) = slot {
                match path {
                    Path::Clickhouse if stored_there => slot.clickhouse += 1,
                    Path::Archive if stored_there => {
                        slot.archive = Some(slot.archive.unwrap_or(0) + 1);
                    }
                    _ => {}
                }
            }
            match (stored_there, dead) {
                (false, false) => r.missing.push(id_at(e)),
                (true, true) => r.duplicate.push(id_at(e)),
                _ => {}
            }
        }
        for (id, t) in store {
            if in_range(*t, id) && !ids.contains(id.as_str()) {
                r.unexpected.push(IdAt {
                    event_time_ms: *t,
                    event_id: id.clone(),
                });
            }
        }
        for v in [&mut r.missing, &mut r.duplicate, &mut r.unexpected] {
            v.sort();
        }
        r.missing_count = r.missing.len() as u64;
        r.duplicate_count = r.duplicate.len() as u64;
        r.unexpected_count = r.unexpected.len() as u64;
        r
    };
    let ch = id_path(Path::Clickhouse, &stored.clickhouse);
    report.paths.insert(Path::Clickhouse, ch);
    if let Some(archive) = &stored.archive {
        let ar = id_path(Path::Archive, archive);
        report.paths.insert(Path::Archive, ar);
    }

    // Per-window late and DLQ counts, and the expected aggregate per user and window.
    let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for &(id, a) in &accepted {
        let w = window_of(a.event_time_ms, from, window_ms);
        if let Some(slot) = rows.get_mut(&w) {
            slot.accepted += 1;
            if is_late(id) {
                slot.late += 1;
            }
            if is_dlq(a) {
                slot.dlq += 1;
            }
        }
        report.topic_copies += u64::from(a.copies.saturating_sub(1));
        if !is_late(id) {
            *expected.entry((a.user_id.to_string(), w)).or_insert(0) += 1;
        }
    }
    let late_unexpected = book
        .late
        .iter()
        .filter(|(id, t)| in_range(**t, id) && !ids.contains(&***id))
        .count() as u64;

    // The aggregate path, by count per user and window.
    let mut counted: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for uw in &stored.windows {
        if !(from..to).contains(&uw.window_start_ms) {
            continue;
        }
        *counted
            .entry((uw.user_id.clone(), uw.window_start_ms))
            .or_insert(0) += uw.events;
        if let Some(slot) = rows.get_mut(&uw.window_start_ms) {
            slot.aggregated += uw.events;
        }
        if uw.is_final == 0 {
            report.open_windows += 1;
        }
    }
    let mut agg = PathResult {
        checked: accepted.len() as u64,
        unexpected_count: late_unexpected,
        ..PathResult::default()
    };
    let keys: std::collections::BTreeSet<&(String, i64)> =
        expected.keys().chain(counted.keys()).collect();
    for key in keys {
        let (e, c) = (
            expected.get(key).copied().unwrap_or(0),
            counted.get(key).copied().unwrap_or(0),
        );
        if e != c {
            agg.missing_count += e.saturating_sub(c);
            agg.duplicate_count += c.saturating_sub(e);
            report.window_diffs.push(WindowDiff {
                user_id: key.0.clone(),
                window_start_ms: key.1,
                expected: e,
                counted: c,
            });
        }
    }
    report.paths.insert(Path::Aggregate, agg);
    report.windows = rows.into_values().collect();

    // Revenue per hour and currency.
    if let Some(served) = &stored.served_revenue {
        let mut raw: BTreeMap<(i64, String), i128> = BTreeMap::new();
        for &(id, a) in &accepted {
            if is_late(id) {
                continue;
            }
            if let Some((currency, micros)) = &a.revenue {
                let hour = a.event_time_ms.div_euclid(HOUR_MS) * HOUR_MS;
                *raw.entry((hour, currency.to_string())).or_insert(0) += i128::from(*micros);
            }
        }
        let keys: std::collections::BTreeSet<&(i64, String)> =
            raw.keys().chain(served.keys()).collect();
        report.revenue = Some(
            keys.into_iter()
                .map(|k| RevenueRow {
                    hour_ms: k.0,
                    currency: k.1.clone(),
                    raw: raw.get(k).copied().unwrap_or(0),
                    served: served.get(k).copied().unwrap_or(0),
                })
                .collect(),
        );
    }
    report
}

impl Report {
    /// The revenue rows that differ.
    pub fn revenue_mismatches(&self) -> Vec<&RevenueRow> {
        self.revenue
            .iter()
            .flatten()
            .filter(|r| r.raw != r.served)
            .collect()
    }

    /// Whether anything differs.
    pub fn is_mismatch(&self) -> bool {
        self.paths.values().any(|p| !p.is_clean())
            || self.open_windows > 0
            || !self.revenue_mismatches().is_empty()
    }

    /// One line naming every kind of difference (for the error and the log).
    pub fn mismatch_summary(&self) -> String {
        let mut parts = Vec::new();
        for (path, r) in &self.paths {
            for (n, what) in [
                (r.missing_count, "missing"),
                (r.duplicate_count, "in two terminal states"),
                (r.unexpected_count, "unexpected"),
            ] {
                if n > 0 {
                    parts.push(format!("{}: {n} {what}", path.label()));
                }
            }
        }
        if self.open_windows > 0 {
            parts.push(format!(
                "aggregate: {} window(s) not final",
                self.open_windows
            ));
        }
        let rev = self.revenue_mismatches();
        if !rev.is_empty() {
            parts.push(format!(
                "revenue: {} hour/currency bucket(s) differ",
                rev.len()
            ));
        }
        parts.join("; ")
    }

    /// The printed report: the per-window table, each path's result with up to `max_ids`
    /// ids per difference, the windows whose counts differ, and the revenue check.
    pub fn lines(&self, max_ids: usize) -> Vec<String> {
        let t = crate::rfc3339;
        let mut out = vec![format!(
            "ledger [{}, {}) window {} ms",
            t(self.from_ms),
            t(self.to_ms),
            self.window_ms
        )];
        out.push(format!(
            "{:<24} {:>9} {:>10} {:>9} {:>10} {:>6} {:>5}",
            "window", "accepted", "clickhouse", "archive", "aggregated", "late", "dlq"
        ));
        let mut total = WindowRow {
            archive: self.windows.first().and_then(|w| w.archive.map(|_| 0)),
            ..WindowRow::default()
        };
        let archive = |a: Option<u64>| a.map_or_else(|| "-".to_owned(), |n| n.to_string());
        for w in &self.windows {
            out.push(format!(
                "{:<24} {:>9} {:>10} {:>9} {:>10} {:>6} {:>5}",
                t(w.start_ms),
                w.accepted,
                w.clickhouse,
                archive(w.archive),
                w.aggregated,
                w.late,
                w.dlq
            ));
            total.accepted += w.accepted;
            total.clickhouse += w.clickhouse;
            total.archive = total.archive.map(|n| n + w.archive.unwrap_or(0));
            total.aggregated += w.aggregated;
            total.late += w.late;
            total.dlq += w.dlq;
        }
        out.push(format!(
            "{:<24} {:>9} {:>10} {:>9} {:>10} {:>6} {:>5}",
            "total",
            total.accepted,
            total.clickhouse,
            archive(total.archive),
            total.aggregated,
            total.late,
            total.dlq
        ));
        for (path, r) in &self.paths {
            out.push(format!(
                "path {}: checked {}, missing {}, in two terminal states {}, unexpected {}",
                path.label(),
                r.checked,
                r.missing_count,
                r.duplicate_count,
                r.unexpected_count
            ));
            for (ids, what) in [
                (&r.missing, "missing"),
                (&r.duplicate, "stored and dead-lettered"),
                (&r.unexpected, "unexpected (never accepted)"),
            ] {
                if ids.is_empty() {
                    continue;
                }
                let shown: Vec<String> = ids
                    .iter()
                    .take(max_ids)
                    .map(|i| format!("{} ({})", i.event_id, t(i.event_time_ms)))
                    .collect();
                let more = ids.len().saturating_sub(max_ids);
                out.push(format!(
                    "  {what} in {}: {}{}",
                    path.label(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" … and {more} more")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        for d in self.window_diffs.iter().take(max_ids) {
            out.push(format!(
                "  aggregate: user {} window {}: {} accepted (not late), {} counted",
                d.user_id,
                t(d.window_start_ms),
                d.expected,
                d.counted
            ));
        }
        if self.window_diffs.len() > max_ids {
            out.push(format!(
                "  aggregate: … and {} more window(s)",
                self.window_diffs.len() - max_ids
            ));
        }
        if self.open_windows > 0 {
            out.push(format!(
                "  aggregate: {} user window(s) of the closed range are not final",
                self.open_windows
            ));
        }
        if self.topic_copies > 0 {
            out.push(format!(
                "note: {} extra copies of ids on the events topic (replays or redeliveries; counted once)",
                self.topic_copies
            ));
        }
        if self.in_flight > 0 {
            out.push(format!(
                "note: {} event(s) of the range accepted within --settle of now are in flight and left out",
                self.in_flight
            ));
        }
        match &self.revenue {
            None => out.push("revenue: not checked".into()),
            Some(rows) => {
                out.push("revenue per hour and currency (raw events vs query API):".into());
                for r in rows {
                    out.push(format!(
                        "  {} {} raw {} served {} delta {}{}",
                        t(r.hour_ms),
                        r.currency,
                        decimal(r.raw),
                        decimal(r.served),
                        decimal(r.delta()),
                        if r.raw == r.served { "" } else { "  MISMATCH" }
                    ));
                }
                if rows.is_empty() {
                    out.push("  (no revenue in the range)".into());
                }
            }
        }
        out.push(if self.is_mismatch() {
            format!("result: MISMATCH — {}", self.mismatch_summary())
        } else {
            "result: reconciled, no difference".into()
        });
        out
    }
}

/// Micros as an exact decimal (sums beyond i64 are shown in micros).
pub fn decimal(micros: i128) -> String {
    i64::try_from(micros).map_or_else(|_| format!("{micros} micros"), micros_to_decimal)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use pulse_contracts::pb::events::v1::{Event, EventKey, Metadata, Payload};
    use pulse_contracts::wire;

    use super::*;
    use crate::ledger::topic::RawRecord;

    /// 2025-11-25T00:00:00Z.
    const T: i64 = 1_764_028_800_000;
    const M: i64 = 60_000;

    fn ev(id: &str, user: &str, t: i64, eur: Option<i64>) -> Event {
        Event {
            event_id: id.into(),
            event_type: if eur.is_some() {
                "purchase"
            } else {
                "page_view"
            }
            .into(),
            key: Some(EventKey {
                user_id: user.into(),
                session_id: String::new(),
            }),
            payload: Some(Payload {
                currency: if eur.is_some() {
                    "EUR".into()
                } else {
                    String::new()
                },
                amount_micros: eur,
                ..Payload::default()
            }),
            metadata: Some(Metadata {
                event_timestamp_ms: t,
                ..Metadata::default()
            }),
            ..Event::default()
        }
    }

    fn rec(e: &Event, ingest_ms: i64) -> RawRecord {
        RawRecord {
            partition: 0,
            offset: 0,
            event_id: Some(e.event_id.clone()),
            source_topic: None,
            ingest_ms: Some(ingest_ms),
            payload: wire::frame(1, &[0], &e.encode_to_vec()),
        }
    }

    fn window(user: &str, start: i64, events: u64) -> UserWindow {
        UserWindow {
            user_id: user.into(),
            window_start_ms: start,
            events,
            is_final: 1,
        }
    }

    /// Two windows: u1 has a1..a3 (a3 a 2.50 EUR purchase) in the first, u2 has b1 (late)
    /// and b2 (dead-lettered) in the second.
    fn book() -> Book {
        let mut b = Book::new(T, T + 2 * M);
        let events = [
            ev("a1", "u1", T + 1_000, None),
            ev("a2", "u1", T + 2_000, None),
            ev("a3", "u1", T + 3_000, Some(2_500_000)),
            ev("b1", "u2", T + M + 1_000, None),
            ev("b2", "u2", T + M + 2_000, Some(1_000_000)),
        ];
        let recs: Vec<RawRecord> = events.iter().map(|e| rec(e, T)).collect();
        b.add_events(&recs);
        b.add_late(&[recs[3].clone()]);
        let mut dead = recs[4].clone();
        dead.source_topic = Some("events".into());
        b.add_dlq(&[dead], "events");
        b
    }

    fn all_stored() -> Stored {
        let ids = |ids: &[(&str, i64)]| -> HashMap<String, i64> {
            ids.iter().map(|(i, t)| ((*i).to_owned(), *t)).collect()
        };
        Stored {
            clickhouse: ids(&[
                ("a1", T + 1_000),
                ("a2", T + 2_000),
                ("a3", T + 3_000),
                ("b1", T + M + 1_000),
            ]),
            archive: Some(ids(&[
                ("a1", T + 1_000),
                ("a2", T + 2_000),
                ("a3", T + 3_000),
                ("b1", T + M + 1_000),
            ])),
            windows: vec![window("u1", T, 3), window("u2", T + M, 1)],
            served_revenue: Some([((T, "EUR".to_owned()), 3_500_000)].into()),
        }
    }

    #[test]
    fn every_event_in_one_terminal_state_per_path_reconciles_to_zero() {
        let r = reconcile(&book(), &all_stored(), (T, T + 2 * M), M, i64::MAX);
        assert!(!r.is_mismatch(), "{}", r.lines(10).join("\n"));
        assert_eq!(
            r.windows,
            [
                WindowRow {
                    start_ms: T,
                    accepted: 3,
                    clickhouse: 3,
                    archive: Some(3),
                    aggregated: 3,
                    late: 0,
                    dlq: 0
                },
                WindowRow {
                    start_ms: T + M,
                    accepted: 2,
                    clickhouse: 1,
                    archive: Some(1),
                    aggregated: 1,
                    late: 1,
                    dlq: 1
                },
            ]
        );
        assert!(r.paths.values().all(|p| p.checked == 5));
        // b2 (1.00 EUR) was dead-lettered but is a non-late accepted event: the raw side
        // counts it, so the aggregate must too.
        assert_eq!(r.revenue.as_ref().unwrap()[0].raw, 3_500_000);
        assert_eq!(
            r.lines(10).last().unwrap(),
            "result: reconciled, no difference"
        );
    }

    #[test]
    fn lost_doubled_and_unknown_ids_are_named_per_path() {
        let mut s = all_stored();
        s.clickhouse.remove("a2");
        s.clickhouse.insert("b2".into(), T + M + 2_000); // stored and dead-lettered
        s.clickhouse.insert("ghost".into(), T + 5); // never accepted
        s.clickhouse.insert("other-range".into(), T + 3 * M); // not in the range: ignored
        s.archive.as_mut().unwrap().remove("a1");
        let r = reconcile(&book(), &s, (T, T + 2 * M), M, i64::MAX);
        let ch = &r.paths[&Path::Clickhouse];
        let names = |v: &[IdAt]| v.iter().map(|i| i.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ch.missing), ["a2"]);
        assert_eq!(names(&ch.duplicate), ["b2"]);
        assert_eq!(names(&ch.unexpected), ["ghost"]);
        assert_eq!(names(&r.paths[&Path::Archive].missing), ["a1"]);
        assert!(r.paths[&Path::Aggregate].is_clean());
        assert_eq!(
            r.mismatch_summary(),
            "clickhouse: 1 missing; clickhouse: 1 in two terminal states; clickhouse: 1 unexpected; archive: 1 missing"
        );
        let text = r.lines(10).join("\n");
        assert!(
            text.contains("  missing in clickhouse: a2 (2025-11-25T00:00:02Z)"),
            "{text}"
        );
        assert!(
            text.contains("  missing in archive: a1 (2025-11-25T00:00:01Z)"),
            "{text}"
        );
    }

    #[test]
    fn aggregate_counts_are_checked_per_user_and_window_and_late_events_are_not_expected() {
        let mut s = all_stored();
        // u1's window counted 2 of 3; u2's counted its late event too; u3 never existed.
        s.windows = vec![
            window("u1", T, 2),
            window("u2", T + M, 2),
            window("u3", T, 1),
        ];
        s.windows.push(UserWindow {
            is_final: 0,
            ..window("u4", T + M, 0)
        });
        let r = reconcile(&book(), &s, (T, T + 2 * M), M, i64::MAX);
        let agg = &r.paths[&Path::Aggregate];
        assert_eq!((agg.missing_count, agg.duplicate_count), (1, 2));
        assert_eq!(r.open_windows, 1);
        assert_eq!(
            r.window_diffs,
            [
                WindowDiff {
                    user_id: "u1".into(),
                    window_start_ms: T,
                    expected: 3,
                    counted: 2
                },
                WindowDiff {
                    user_id: "u2".into(),
                    window_start_ms: T + M,
                    expected: 1,
                    counted: 2
                },
                WindowDiff {
                    user_id: "u3".into(),
                    window_start_ms: T,
                    expected: 0,
                    counted: 1
                },
            ]
        );
        assert!(
            r.mismatch_summary()
                .contains("aggregate: 1 window(s) not final")
        );
    }

    #[test]
    fn revenue_differences_are_exact_and_per_hour_and_currency() {
        let mut s = all_stored();
        s.served_revenue = Some(
            [
                ((T, "EUR".to_owned()), 3_500_001),
                ((T, "USD".to_owned()), 5),
            ]
            .into(),
        );
        let r = reconcile(&book(), &s, (T, T + 2 * M), M, i64::MAX);
        let bad: Vec<(&str, i128)> = r
            .revenue_mismatches()
            .iter()
            .map(|x| (x.currency.as_str(), x.delta()))
            .collect();
        assert_eq!(bad, [("EUR", 1), ("USD", 5)]);
        let text = r.lines(10).join("\n");
        assert!(
            text.contains(
                "2025-11-25T00:00:00Z EUR raw 3.50 served 3.500001 delta 0.000001  MISMATCH"
            ),
            "{text}"
        );
    }

    #[test]
    fn events_accepted_too_recently_are_left_out_on_every_side() {
        let mut b = book();
        let fresh = ev("fresh", "u1", T + 4_000, Some(9));
        b.add_events(&[rec(&fresh, T + 10 * M)]);
        let mut s = all_stored();
        s.clickhouse.insert("fresh".into(), T + 4_000);
        let r = reconcile(&b, &s, (T, T + 2 * M), M, T + 5 * M);
        assert!(!r.is_mismatch(), "{}", r.lines(10).join("\n"));
        assert_eq!(r.in_flight, 1);
    }
}

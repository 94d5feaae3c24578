//! The topic side of the ledger: what the events, late and DLQ topics say, decoded and kept
//! by event id for the event-time span the ledger still has to reconcile. Records are
//! decoded here (Confluent frame, then `pulse.events.v1.Event`); the stores' side and the
//! comparison are `sources` and `reconcile`.
//!
//! Memory is bounded by a budget of held events (`--max-held-events`): an entry costs one
//! map slot (the id's boxed bytes, times, the value hash, the user id, the revenue, the
//! record's offset), about 200 bytes. With a budget ([`Book::set_budget`], `ledger
//! watch`), a book over it *defers* the latest windows: it forgets their events, ignores
//! the rest of them while reading on, and remembers, per partition of the events topic,
//! the first offset of a deferred record; once every window before the deferred ones is
//! reconciled, [`Book::take_rewind`] hands those offsets back and the topic is read again
//! from there. Nothing is skipped: a span that does not fit is reconciled in pieces that
//! do, at the price of reading part of the topic twice. One window is always held whole
//! (a window with more events than the budget is held anyway; the gauge shows it).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;

use prost::Message as _;
use pulse_contracts::pb::events::v1::Event;
use pulse_contracts::wire;

use super::topic::RawRecord;

/// One accepted event (a record of the events topic), as the ledger needs it; its id is
/// the key of [`Book::accepted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub user_id: Box<str>,
    pub event_time_ms: i64,
    /// When ingest accepted it (`pulse-ingest-ts`, else the event's ingest info), epoch ms.
    pub ingest_ms: i64,
    /// Hash of the record's value: how a DLQ record is matched to the event it holds.
    pub hash: u64,
    /// `(currency, micros)` when the event counts as revenue (a purchase with an amount
    /// and a currency, as the processor counts it).
    pub revenue: Option<(Box<str>, i64)>,
    /// Records on the topic with this id (more than one: a replay or a redelivery;
    /// harmless downstream, shown for information).
    pub copies: u32,
    /// Where its first record is on the events topic (to read it again if deferred).
    pub partition: i32,
    pub offset: i64,
}

/// A stable hash of a record value (the same bytes hash alike in every process).
pub fn value_hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// The event in a Confluent-framed record value, if it is one.
pub fn decode_event(payload: &[u8]) -> Option<Event> {
    let framed = wire::unframe(payload).ok()?;
    Event::decode(framed.payload).ok()
}

/// The revenue of an event as the processor counts it (see `processor::model`).
pub fn revenue_of(e: &Event) -> Option<(String, i64)> {
    let p = e.payload.as_ref()?;
    match (e.event_type.as_str(), p.amount_micros) {
        ("purchase", Some(a)) if !p.currency.is_empty() => Some((p.currency.clone(), a)),
        _ => None,
    }
}

/// The held-events budget of a book that defers windows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Events held at most (accepted, late and dead-lettered entries together).
    pub max_held: usize,
    /// The reconciliation's window: deferral cuts on window boundaries.
    pub window_ms: i64,
}

/// What the topics say about the events of a span of event time.
#[derive(Debug, Default)]
pub struct Book {
    /// Accepted events by id.
    pub accepted: HashMap<Box<str>, Accepted>,
    /// Events on the late topic: id → event time.
    pub late: HashMap<Box<str>, i64>,
    /// Values the writers dead-lettered from the events topic: value hash → event time
    /// (a record that is not a decodable event matches no accepted event and is not kept).
    pub dlq: HashMap<u64, i64>,
    /// Records of the events topic that are not a decodable event (they have no event
    /// time, so no range; the writers dead-letter them). Each record counted once, also
    /// when read again after a deferral.
    pub undecodable: u64,
    /// Records ignored because their event time is before `keep_from` (a range already
    /// reconciled) or at/after `keep_to`; counted once, like `undecodable`.
    pub outside: u64,
    /// Records ignored because their window was deferred (read again later).
    pub deferred: u64,
    keep_from: i64,
    keep_to: i64,
    budget: Option<Budget>,
    /// The end of the held span while windows are deferred (`None`: nothing deferred).
    defer_from: Option<i64>,
    /// Per partition of the events topic: the first offset of a deferred record.
    rewind: BTreeMap<i32, i64>,
    /// Per partition of the events topic: the highest offset read so far (records read
    /// again after a deferral are not counted twice).
    seen: BTreeMap<i32, i64>,
    /// The most entries held at once.
    pub peak_held: usize,
    /// Held entries at which the budget is looked at again (after a deferral that could
    /// not get under it: one window over the budget is not recounted at every event).
    recheck_at: usize,
}

impl Book {
    /// A book keeping event times in `[keep_from, keep_to)`.
    pub fn new(keep_from: i64, keep_to: i64) -> Self {
        Self {
            keep_from,
            keep_to,
            ..Self::default()
        }
    }

    /// Bounds the book: over `budget.max_held` entries it defers its latest windows.
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = Some(budget);
    }

    /// Entries held now: accepted, late and dead-lettered events.
    pub fn held(&self) -> usize {
        self.accepted.len() + self.late.len() + self.dlq.len()
    }

    /// Where the held span ends while windows are deferred.
    pub fn deferred_from(&self) -> Option<i64> {
        self.defer_from
    }

    fn keeps(&self, t: i64) -> bool {
        (self.keep_from..self.keep_to).contains(&t)
    }

    fn held_end(&self) -> i64 {
        self.defer_from.unwrap_or(self.keep_to)
    }

    /// Whether the record at (`partition`, `offset`) is read for the first time.
    fn first_read(&mut self, partition: i32, offset: i64) -> bool {
        match self.seen.get_mut(&partition) {
            Some(s) if *s >= offset => false,
            Some(s) => {
                *s = offset;
                true
            }
            None => {
                self.seen.insert(partition, offset);
                true
            }
        }
    }

    fn defer_record(&mut self, partition: i32, offset: i64) {
        self.deferred += 1;
        let r = self.rewind.entry(partition).or_insert(offset);
        *r = (*r).min(offset);
    }

    /// Adds records of the events topic.
    pub fn add_events(&mut self, records: &[RawRecord]) {
        for r in records {
            let first = self.first_read(r.partition, r.offset);
            let Some(e) = decode_event(&r.payload) else {
                self.undecodable += u64::from(first);
                continue;
            };
            let t = e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms);
            if !self.keeps(t) {
                self.outside += u64::from(first);
                continue;
            }
            if t >= self.held_end() {
                self.defer_record(r.partition, r.offset);
                continue;
            }
            if let Some(a) = self.accepted.get_mut(e.event_id.as_str()) {
                a.copies = a.copies.saturating_add(1);
                continue;
            }
            let a = Accepted {
                user_id: e
                    .key
                    .as_ref()
                    .map(|k| k.user_id.as_str())
                    .unwrap_or_default()
                    .into(),
                event_time_ms: t,
                ingest_ms: r
                    .ingest_ms
                    .or_else(|| e.ingest.as_ref().map(|i| i.ingest_timestamp_ms))
                    .unwrap_or(0),
                hash: value_hash(&r.payload),
                revenue: revenue_of(&e).map(|(c, m)| (c.into_boxed_str(), m)),
                copies: 1,
                partition: r.partition,
                offset: r.offset,
            };
            self.accepted.insert(e.event_id.into_boxed_str(), a);
            self.enforce_budget();
        }
        self.peak_held = self.peak_held.max(self.held());
    }

    /// Adds records of the late topic (the processor keeps the original value).
    pub fn add_late(&mut self, records: &[RawRecord]) {
        for r in records {
            let Some(e) = decode_event(&r.payload) else {
                continue;
            };
            let t = e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms);
            if self.keeps(t) {
                self.late.insert(e.event_id.into_boxed_str(), t);
            }
        }
        self.peak_held = self.peak_held.max(self.held());
    }

    /// Adds records of the DLQ: only those the writers dead-lettered from `events_topic`
    /// (ingest's rejections were never accepted) that hold a decodable event.
    pub fn add_dlq(&mut self, records: &[RawRecord], events_topic: &str) {
        for r in records {
            if r.source_topic.as_deref() != Some(events_topic) {
                continue;
            }
            let Some(e) = decode_event(&r.payload) else {
                continue;
            };
            let t = e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms);
            if self.keeps(t) {
                self.dlq.insert(value_hash(&r.payload), t);
            }
        }
        self.peak_held = self.peak_held.max(self.held());
    }

    /// Over budget: defers the latest windows held, keeping the earliest windows whose
    /// events fit three quarters of the budget (room for their late arrivals), and at
    /// least the first one.
    fn enforce_budget(&mut self) {
        let Some(b) = self.budget else { return };
        if self.held() <= b.max_held.max(self.recheck_at) {
            return;
        }
        let w = b.window_ms.max(1);
        let mut per_window: BTreeMap<i64, usize> = BTreeMap::new();
        for a in self.accepted.values() {
            *per_window
                .entry(a.event_time_ms.div_euclid(w) * w)
                .or_insert(0) += 1;
        }
        let target = (b.max_held / 4 * 3).saturating_sub(self.late.len() + self.dlq.len());
        let mut cut = None;
        let mut sum = 0;
        for (start, n) in &per_window {
            sum += n;
            if cut.is_some() && sum > target {
                break;
            }
            cut = Some(start.saturating_add(w));
        }
        let Some(cut) = cut.filter(|c| *c < self.held_end()) else {
            // One window over the budget: held whole, looked at again a quarter later.
            self.recheck_at = self.held().saturating_add(b.max_held / 4);
            return;
        };
        self.recheck_at = 0;
        self.defer_from = Some(cut);
        let mut rewind = std::mem::take(&mut self.rewind);
        self.accepted.retain(|_, a| {
            if a.event_time_ms < cut {
                return true;
            }
            let r = rewind.entry(a.partition).or_insert(a.offset);
            *r = (*r).min(a.offset);
            false
        });
        self.rewind = rewind;
        tracing::info!(
            held = self.held(),
            max_held = b.max_held,
            deferred_from = cut,
            "ledger: over its held-events budget; later windows are deferred and read again after these are reconciled"
        );
    }

    /// Forgets event times before `t` (reconciled) and ignores them from now on.
    pub fn forget_before(&mut self, t: i64) {
        self.keep_from = self.keep_from.max(t);
        self.recheck_at = 0;
        self.accepted.retain(|_, a| a.event_time_ms >= t);
        self.late.retain(|_, et| *et >= t);
        self.dlq.retain(|_, et| *et >= t);
    }

    /// When every window before the deferred ones has been forgotten (reconciled): ends
    /// the deferral and returns, per partition of the events topic, the offset to read
    /// again from. `None` while windows before them are held, or nothing was deferred.
    pub fn take_rewind(&mut self) -> Option<BTreeMap<i32, i64>> {
        let from = self.defer_from?;
        if self.keep_from < from {
            return None;
        }
        self.defer_from = None;
        Some(std::mem::take(&mut self.rewind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_contracts::pb::events::v1::{EventKey, Metadata, Payload};
    use std::collections::BTreeMap;

    /// A record of `e` at the next offset of partition 0.
    fn rec(e: &Event) -> RawRecord {
        static OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        RawRecord {
            partition: 0,
            offset: OFFSET.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            event_id: Some(e.event_id.clone()),
            source_topic: None,
            ingest_ms: None,
            payload: wire::frame(1, &[0], &e.encode_to_vec()),
        }
    }

    fn ev(id: &str, t: i64, purchase: Option<(&str, i64)>) -> Event {
        Event {
            event_id: id.into(),
            event_type: if purchase.is_some() {
                "purchase"
            } else {
                "page_view"
            }
            .into(),
            key: Some(EventKey {
                user_id: "u".into(),
                session_id: String::new(),
            }),
            payload: Some(Payload {
                currency: purchase.map(|p| p.0.to_owned()).unwrap_or_default(),
                amount_micros: purchase.map(|p| p.1),
                ..Payload::default()
            }),
            metadata: Some(Metadata {
                event_timestamp_ms: t,
                ..Metadata::default()
            }),
            ..Event::default()
        }
    }

    #[test]
    fn events_are_kept_once_by_id_within_the_span_with_their_revenue() {
        let mut b = Book::new(100, 200);
        let a = ev("a", 150, Some(("EUR", 1_500_000)));
        b.add_events(&[
            rec(&a),
            rec(&a),
            rec(&ev("early", 99, None)),
            rec(&ev("at-end", 200, None)),
        ]);
        b.add_events(&[RawRecord {
            payload: b"garbage".to_vec(),
            ..rec(&a)
        }]);
        assert_eq!(b.accepted.len(), 1);
        let got = &b.accepted["a"];
        assert_eq!(got.copies, 2);
        assert_eq!(got.revenue, Some(("EUR".into(), 1_500_000)));
        assert_eq!(&*got.user_id, "u");
        assert_eq!((b.outside, b.undecodable), (2, 1));
    }

    #[test]
    fn only_purchases_with_amount_and_currency_are_revenue() {
        assert_eq!(revenue_of(&ev("x", 0, None)), None);
        assert_eq!(revenue_of(&ev("x", 0, Some(("", 5)))), None);
        let mut view = ev("x", 0, Some(("EUR", 5)));
        view.event_type = "page_view".into();
        assert_eq!(revenue_of(&view), None);
    }

    #[test]
    fn dlq_records_match_by_value_only_when_the_writers_dead_lettered_them_from_the_events_topic() {
        let e = ev("a", 150, None);
        let mut b = Book::new(0, 1_000);
        let mut from_writer = rec(&e);
        from_writer.source_topic = Some("events".into());
        let mut from_elsewhere = rec(&ev("b", 150, None));
        from_elsewhere.source_topic = Some("sessions".into());
        b.add_dlq(
            &[from_writer, from_elsewhere, rec(&ev("c", 1, None))],
            "events",
        );
        assert_eq!(b.dlq.len(), 1);
        b.add_events(&[rec(&e)]);
        assert!(b.dlq.contains_key(&b.accepted["a"].hash));
    }

    #[test]
    fn forgetting_drops_reconciled_times_and_ignores_them_afterwards() {
        let mut b = Book::new(0, i64::MAX);
        b.add_events(&[rec(&ev("old", 10, None)), rec(&ev("new", 70, None))]);
        b.add_late(&[rec(&ev("late-old", 5, None))]);
        b.forget_before(60);
        assert_eq!(b.accepted.keys().map(|k| &**k).collect::<Vec<_>>(), ["new"]);
        assert!(b.late.is_empty());
        b.add_events(&[rec(&ev("older", 20, None))]);
        assert_eq!((b.accepted.len(), b.outside), (1, 1));
    }

    const W: i64 = 60_000;

    /// 12 records on partition 0, offsets 0..12, cycling through windows A, B, C.
    fn cycling() -> Vec<RawRecord> {
        (0..12)
            .map(|o| {
                let mut r = rec(&ev(&format!("e{o}"), (o % 3) * W + o, None));
                r.offset = o;
                r
            })
            .collect()
    }

    #[test]
    fn a_book_over_its_budget_defers_its_latest_windows_and_reads_them_again_afterwards() {
        let mut b = Book::new(0, i64::MAX);
        b.set_budget(Budget {
            max_held: 8,
            window_ms: W,
        });
        let records = cycling();
        b.add_events(&records);
        // At the 9th event (3 per window) C was deferred: A and B fit 3/4 of the budget.
        assert_eq!(b.deferred_from(), Some(2 * W));
        assert!(b.held() <= 8, "{}", b.held());
        assert!(b.peak_held <= 9, "{}", b.peak_held);
        let windows = |b: &Book| {
            let mut w: Vec<i64> = b.accepted.values().map(|a| a.event_time_ms / W).collect();
            w.sort_unstable();
            w
        };
        assert_eq!(windows(&b), [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(b.deferred, 1, "e11 read after the cut");
        // Not before B is reconciled too.
        b.forget_before(W);
        assert_eq!(b.take_rewind(), None);
        b.forget_before(2 * W);
        let rewind = b.take_rewind().expect("the deferral ends");
        assert_eq!(rewind, BTreeMap::from([(0, 2)]), "e2 is C's first record");
        assert_eq!(b.take_rewind(), None, "handed out once");
        // Read again from offset 2: A's and B's records are reconciled (outside, but not
        // counted again), C's are all held, once.
        b.add_events(&records[2..]);
        assert_eq!(windows(&b), [2, 2, 2, 2]);
        assert!(b.accepted.values().all(|a| a.copies == 1));
        assert_eq!((b.outside, b.undecodable), (0, 0));
        assert_eq!(b.deferred_from(), None);
    }

    #[test]
    fn one_window_over_the_budget_is_held_whole_and_a_book_without_budget_never_defers() {
        let same_window: Vec<RawRecord> = (0..6)
            .map(|o| {
                let mut r = rec(&ev(&format!("s{o}"), 1_000 + o, None));
                r.offset = o;
                r
            })
            .collect();
        let mut b = Book::new(0, i64::MAX);
        b.set_budget(Budget {
            max_held: 4,
            window_ms: W,
        });
        b.add_events(&same_window);
        // All held; the windows after it are deferred.
        assert_eq!((b.accepted.len(), b.deferred_from()), (6, Some(W)));
        let mut unbounded = Book::new(0, i64::MAX);
        unbounded.add_events(&cycling());
        assert_eq!((unbounded.held(), unbounded.deferred_from()), (12, None));
    }

    #[test]
    fn late_and_dead_lettered_entries_are_forgotten_with_their_window() {
        let mut b = Book::new(0, i64::MAX);
        let mut dead = rec(&ev("d", 10, None));
        dead.source_topic = Some("events".into());
        let mut garbage = dead.clone();
        garbage.payload = b"not an event".to_vec();
        b.add_dlq(&[dead, garbage], "events");
        b.add_late(&[rec(&ev("l", 20, None)), rec(&ev("l2", W + 5, None))]);
        assert_eq!(
            b.held(),
            3,
            "undecodable dead letters match no event: not kept"
        );
        b.forget_before(W);
        assert_eq!((b.dlq.len(), b.late.len()), (0, 1));
    }

    /// Resident bytes of this process (Linux; 0 elsewhere).
    fn rss_bytes() -> usize {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
            .map_or(0, |pages| pages * 4096)
    }

    /// What one held event costs: `cargo test --release -p pulsectl --lib -- --ignored
    /// --nocapture book_memory` (README, Memory: the ledger's row).
    #[test]
    #[ignore = "a measurement, run on demand"]
    fn book_memory_per_held_event() {
        const N: usize = 200_000;
        let records: Vec<RawRecord> = (0..N)
            .map(|i| {
                let mut e = ev(
                    &format!("0192f3c4-5b6a-7c8d-9e0f-{i:012}"),
                    1_000 + i as i64,
                    (i % 10 == 0).then_some(("EUR", 1_990_000)),
                );
                e.key = Some(EventKey {
                    user_id: format!("lg-15-u{i:07}"),
                    session_id: String::new(),
                });
                let mut r = rec(&e);
                r.offset = i as i64;
                r
            })
            .collect();
        let before = rss_bytes();
        let mut b = Book::new(0, i64::MAX);
        for chunk in records.chunks(20_000) {
            b.add_events(chunk);
        }
        let after = rss_bytes();
        assert_eq!(b.accepted.len(), N);
        let per = (after.saturating_sub(before)) / N;
        println!(
            "ledger book: {N} held events, RSS +{:.1} MiB, {per} B per event",
            (after - before) as f64 / (1024.0 * 1024.0)
        );
        assert!(per < 400, "{per} B per held event");
    }
}

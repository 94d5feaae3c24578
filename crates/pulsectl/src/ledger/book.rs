//! The topic side of the ledger: what the events, late and DLQ topics say, decoded and kept
//! by event id for the event-time span the ledger still has to reconcile. Records are
//! decoded here (Confluent frame, then `pulse.events.v1.Event`); the stores' side and the
//! comparison are `sources` and `reconcile`.

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;

use prost::Message as _;
use pulse_contracts::pb::events::v1::Event;
use pulse_contracts::wire;

use super::topic::RawRecord;

/// One accepted event (a record of the events topic), as the ledger needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub event_id: String,
    pub user_id: String,
    pub event_time_ms: i64,
    /// When ingest accepted it (`pulse-ingest-ts`, else the event's ingest info), epoch ms.
    pub ingest_ms: i64,
    /// Hash of the record's value: how a DLQ record is matched to the event it holds.
    pub hash: u64,
    /// `(currency, micros)` when the event counts as revenue (a purchase with an amount
    /// and a currency, as the processor counts it).
    pub revenue: Option<(String, i64)>,
    /// Records on the topic with this id (more than one: a replay or a redelivery;
    /// harmless downstream, shown for information).
    pub copies: u32,
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

/// What the topics say about the events of a span of event time.
#[derive(Debug, Default)]
pub struct Book {
    /// Accepted events by id.
    pub accepted: HashMap<String, Accepted>,
    /// Events on the late topic: id → event time.
    pub late: HashMap<String, i64>,
    /// Hashes of the values the writers dead-lettered from the events topic.
    pub dlq: HashSet<u64>,
    /// Records of the events topic that are not a decodable event (they have no event
    /// time, so no range; the writers dead-letter them).
    pub undecodable: u64,
    /// Records ignored because their event time is before `keep_from` (a range already
    /// reconciled) or at/after `keep_to`.
    pub outside: u64,
    keep_from: i64,
    keep_to: i64,
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

    fn keeps(&self, t: i64) -> bool {
        (self.keep_from..self.keep_to).contains(&t)
    }

    /// Adds records of the events topic.
    pub fn add_events(&mut self, records: &[RawRecord]) {
        for r in records {
            let Some(e) = decode_event(&r.payload) else {
                self.undecodable += 1;
                continue;
            };
            let t = e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms);
            if !self.keeps(t) {
                self.outside += 1;
                continue;
            }
            if let Some(a) = self.accepted.get_mut(&e.event_id) {
                a.copies = a.copies.saturating_add(1);
                continue;
            }
            let a = Accepted {
                event_id: e.event_id.clone(),
                user_id: e
                    .key
                    .as_ref()
                    .map(|k| k.user_id.clone())
                    .unwrap_or_default(),
                event_time_ms: t,
                ingest_ms: r
                    .ingest_ms
                    .or_else(|| e.ingest.as_ref().map(|i| i.ingest_timestamp_ms))
                    .unwrap_or(0),
                hash: value_hash(&r.payload),
                revenue: revenue_of(&e),
                copies: 1,
            };
            self.accepted.insert(e.event_id, a);
        }
    }

    /// Adds records of the late topic (the processor keeps the original value).
    pub fn add_late(&mut self, records: &[RawRecord]) {
        for r in records {
            let Some(e) = decode_event(&r.payload) else {
                continue;
            };
            let t = e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms);
            if self.keeps(t) {
                self.late.insert(e.event_id, t);
            }
        }
    }

    /// Adds records of the DLQ: only those the writers dead-lettered from `events_topic`
    /// (ingest's rejections were never accepted).
    pub fn add_dlq(&mut self, records: &[RawRecord], events_topic: &str) {
        for r in records {
            if r.source_topic.as_deref() == Some(events_topic) {
                self.dlq.insert(value_hash(&r.payload));
            }
        }
    }

    /// Forgets event times before `t` (reconciled) and ignores them from now on.
    pub fn forget_before(&mut self, t: i64) {
        self.keep_from = self.keep_from.max(t);
        self.accepted.retain(|_, a| a.event_time_ms >= t);
        self.late.retain(|_, et| *et >= t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_contracts::pb::events::v1::{EventKey, Metadata, Payload};

    fn rec(e: &Event) -> RawRecord {
        RawRecord {
            partition: 0,
            offset: 0,
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
        assert_eq!(got.user_id, "u");
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
        assert!(b.dlq.contains(&b.accepted["a"].hash));
    }

    #[test]
    fn forgetting_drops_reconciled_times_and_ignores_them_afterwards() {
        let mut b = Book::new(0, i64::MAX);
        b.add_events(&[rec(&ev("old", 10, None)), rec(&ev("new", 70, None))]);
        b.add_late(&[rec(&ev("late-old", 5, None))]);
        b.forget_before(60);
        assert_eq!(b.accepted.keys().collect::<Vec<_>>(), ["new"]);
        assert!(b.late.is_empty());
        b.add_events(&[rec(&ev("older", 20, None))]);
        assert_eq!((b.accepted.len(), b.outside), (1, 1));
    }
}

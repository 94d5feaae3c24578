//! The processor's input and settings, shared by the window, session and watermark logic,
//! and the decoding of an events-topic record into its input ([`decode`]); Kafka itself
//! lives in `run`.

use prost::Message as _;
use pulse_contracts::{headers, wire};
use rdkafka::message::BorrowedHeaders;

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

/// The part of `pulse.events.v1.Event` the processor reads, with the same field numbers:
/// decoding skips the rest (referrer, properties, trace id, source, …) instead of
/// allocating it, and the strings read are moved into the [`InputEvent`], not copied. A
/// test decodes a full `Event` with both and compares (`lean_decoding_reads_what_the_full_message_holds`).
#[derive(Clone, PartialEq, prost::Message)]
struct LeanEvent {
    #[prost(string, tag = "1")]
    event_id: String,
    #[prost(string, tag = "3")]
    event_type: String,
    #[prost(message, optional, tag = "4")]
    key: Option<LeanKey>,
    #[prost(message, optional, tag = "5")]
    payload: Option<LeanPayload>,
    #[prost(message, optional, tag = "6")]
    metadata: Option<LeanMetadata>,
    #[prost(message, optional, tag = "7")]
    ingest: Option<LeanIngest>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanKey {
    #[prost(string, tag = "1")]
    user_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanPayload {
    #[prost(string, tag = "1")]
    page: String,
    #[prost(string, tag = "3")]
    currency: String,
    #[prost(int64, optional, tag = "4")]
    amount_micros: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanMetadata {
    #[prost(int64, tag = "1")]
    event_timestamp_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeanIngest {
    #[prost(int64, tag = "1")]
    ingest_timestamp_ms: i64,
}

/// Decodes a record of the events topic (a Confluent-framed `pulse.events.v1.Event`) at
/// `partition`/`offset`. Processing time is the `pulse-ingest-ts` header, else the event's
/// `ingest.ingest_timestamp_ms`, else 0. None when the value is not a framed Pulse event
/// (or has no key).
pub fn decode(
    partition: i32,
    offset: i64,
    value: &[u8],
    record_headers: Option<&BorrowedHeaders>,
) -> Option<InputEvent> {
    let framed = wire::unframe(value).ok()?;
    let e = LeanEvent::decode(framed.payload).ok()?;
    let user_id = e.key?.user_id;
    let payload = e.payload.unwrap_or_default();
    let ingest_ms = record_headers
        .and_then(headers::ingest_ts_ms)
        .or_else(|| e.ingest.map(|i| i.ingest_timestamp_ms))
        .unwrap_or(0);
    Some(InputEvent {
        partition,
        offset,
        event_id: e.event_id,
        user_id,
        event_type: e.event_type,
        page: payload.page,
        currency: payload.currency,
        amount_micros: payload.amount_micros,
        event_time_ms: e.metadata.map_or(0, |m| m.event_timestamp_ms),
        ingest_ms,
    })
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

    use pulse_contracts::pb::events::v1 as ev;
    use rdkafka::message::OwnedHeaders;

    fn full_event(with_key: bool) -> ev::Event {
        ev::Event {
            event_id: "e-1".into(),
            schema_version: 3,
            event_type: "purchase".into(),
            key: with_key.then(|| ev::EventKey {
                user_id: "u-1".into(),
                session_id: "s-9".into(),
            }),
            payload: Some(ev::Payload {
                page: "/cart".into(),
                referrer: "https://example.com/".into(),
                currency: "EUR".into(),
                amount_micros: Some(12_340_000),
                properties: [("plan".to_owned(), "pro".to_owned())].into(),
            }),
            metadata: Some(ev::Metadata {
                event_timestamp_ms: 1_700_000_000_123,
                trace_id: "abcd".into(),
                source: "web".into(),
            }),
            ingest: Some(ev::IngestInfo {
                ingest_timestamp_ms: 1_700_000_000_456,
                ingest_source: "shop".into(),
                protocol: "http".into(),
            }),
        }
    }

    #[test]
    fn lean_decoding_reads_what_the_full_message_holds() {
        let full = full_event(true);
        let value = wire::frame(7, &[0], &full.encode_to_vec());
        let got = decode(2, 41, &value, None).expect("a framed event decodes");
        let payload = full.payload.clone().unwrap_or_default();
        assert_eq!(
            got,
            InputEvent {
                partition: 2,
                offset: 41,
                event_id: full.event_id.clone(),
                user_id: full.key.clone().unwrap_or_default().user_id,
                event_type: full.event_type.clone(),
                page: payload.page,
                currency: payload.currency,
                amount_micros: payload.amount_micros,
                event_time_ms: 1_700_000_000_123,
                // No header: the event's own ingest time.
                ingest_ms: 1_700_000_000_456,
            }
        );
        // The header wins over the event's field.
        let h = headers::with_str(OwnedHeaders::new(), headers::INGEST_TS, "1700000000999");
        let got = decode(2, 41, &value, Some(h.as_borrowed())).expect("decodes");
        assert_eq!(got.ingest_ms, 1_700_000_000_999);
    }

    #[test]
    fn records_that_are_not_keyed_framed_events_do_not_decode() {
        let keyless = wire::frame(7, &[0], &full_event(false).encode_to_vec());
        assert_eq!(decode(0, 0, &keyless, None), None);
        let unframed = full_event(true).encode_to_vec();
        assert_eq!(decode(0, 0, &unframed, None), None);
        assert_eq!(decode(0, 0, &[], None), None);
        assert_eq!(decode(0, 0, &[0, 0, 0, 0, 7, 0, 0xff, 0xff], None), None);
    }

    #[test]
    fn versions_order_by_offset_then_count_then_finality() {
        assert!(version(10, 1, false) > version(9, 100, true));
        assert!(version(10, 5, false) > version(10, 4, true));
        assert!(version(10, 5, true) > version(10, 5, false));
        assert_eq!(version(10, 5, true), version(10, 5, true));
    }
}

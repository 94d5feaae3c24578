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
    let (e, ingest) = match read_in_place(framed.payload) {
        Some(e) => {
            let ingest = e.ingest_timestamp_ms;
            (e.owned()?, ingest)
        }
        // Anything unusual: prost's decoding decides.
        None => decode_with_prost(framed.payload)?,
    };
    let ingest_ms = record_headers
        .and_then(headers::ingest_ts_ms)
        .or(ingest)
        .unwrap_or(0);
    Some(InputEvent {
        partition,
        offset,
        ingest_ms,
        ..e
    })
}

/// [`decode`]'s event by prost's decoding of a [`LeanEvent`] (partition, offset and
/// processing time left for the caller), and its `ingest.ingest_timestamp_ms` (None
/// without `ingest`).
fn decode_with_prost(payload: &[u8]) -> Option<(InputEvent, Option<i64>)> {
    let e = LeanEvent::decode(payload).ok()?;
    let user_id = e.key?.user_id;
    let payload = e.payload.unwrap_or_default();
    let event = InputEvent {
        partition: 0,
        offset: 0,
        event_id: e.event_id,
        user_id,
        event_type: e.event_type,
        page: payload.page,
        currency: payload.currency,
        amount_micros: payload.amount_micros,
        event_time_ms: e.metadata.map_or(0, |m| m.event_timestamp_ms),
        ingest_ms: 0,
    };
    Some((event, e.ingest.map(|i| i.ingest_timestamp_ms)))
}

/// The fields of a [`LeanEvent`] read in place (borrowed from the record's value): one
/// exact-size allocation per non-empty string kept, none for the message structure
/// (prost's generic decoding of the nested messages was ~6 % of the core + decode
/// profile, issue #19).
#[derive(Debug, Default, PartialEq)]
struct LeanRef<'a> {
    event_id: &'a str,
    event_type: &'a str,
    /// `key.user_id` ("" when the key has none); None without a key.
    user_id: Option<&'a str>,
    page: &'a str,
    currency: &'a str,
    amount_micros: Option<i64>,
    event_timestamp_ms: i64,
    /// None without `ingest`.
    ingest_timestamp_ms: Option<i64>,
}

impl LeanRef<'_> {
    /// The event (partition, offset and processing time left for the caller); None
    /// without a key, as [`decode`].
    fn owned(&self) -> Option<InputEvent> {
        Some(InputEvent {
            partition: 0,
            offset: 0,
            event_id: self.event_id.to_owned(),
            user_id: self.user_id?.to_owned(),
            event_type: self.event_type.to_owned(),
            page: self.page.to_owned(),
            currency: self.currency.to_owned(),
            amount_micros: self.amount_micros,
            event_time_ms: self.event_timestamp_ms,
            ingest_ms: 0,
        })
    }
}

/// Reads the fields [`LeanEvent`] declares from an encoded `pulse.events.v1.Event` in
/// place, with prost's semantics (the last value of a field wins, a message field given
/// twice is merged, other fields are skipped unread, a string must be UTF-8). None when the
/// value holds anything this reader leaves to prost (a group, a varint of 10 bytes such as
/// a negative number, a wrong wire type, a bad length, invalid UTF-8, …): the caller then
/// decodes with prost, which decides — so a value read here reads the same with prost (a
/// test compares them on every kind of field).
fn read_in_place(mut buf: &[u8]) -> Option<LeanRef<'_>> {
    let mut e = LeanRef::default();
    while !buf.is_empty() {
        let (tag, wire) = pb::key(&mut buf)?;
        match tag {
            1 => e.event_id = pb::string(&mut buf, wire)?,
            3 => e.event_type = pb::string(&mut buf, wire)?,
            4 => {
                let mut key = pb::message(&mut buf, wire)?;
                let user_id = e.user_id.get_or_insert("");
                while !key.is_empty() {
                    match pb::key(&mut key)? {
                        (1, wire) => *user_id = pb::string(&mut key, wire)?,
                        (_, wire) => pb::skip(&mut key, wire)?,
                    }
                }
            }
            5 => {
                let mut payload = pb::message(&mut buf, wire)?;
                while !payload.is_empty() {
                    match pb::key(&mut payload)? {
                        (1, wire) => e.page = pb::string(&mut payload, wire)?,
                        (3, wire) => e.currency = pb::string(&mut payload, wire)?,
                        (4, wire) => e.amount_micros = Some(pb::int64(&mut payload, wire)?),
                        (_, wire) => pb::skip(&mut payload, wire)?,
                    }
                }
            }
            6 => {
                let mut metadata = pb::message(&mut buf, wire)?;
                while !metadata.is_empty() {
                    match pb::key(&mut metadata)? {
                        (1, wire) => e.event_timestamp_ms = pb::int64(&mut metadata, wire)?,
                        (_, wire) => pb::skip(&mut metadata, wire)?,
                    }
                }
            }
            7 => {
                let mut ingest = pb::message(&mut buf, wire)?;
                let ts = e.ingest_timestamp_ms.get_or_insert(0);
                while !ingest.is_empty() {
                    match pb::key(&mut ingest)? {
                        (1, wire) => *ts = pb::int64(&mut ingest, wire)?,
                        (_, wire) => pb::skip(&mut ingest, wire)?,
                    }
                }
            }
            _ => pb::skip(&mut buf, wire)?,
        }
    }
    Some(e)
}

/// The protobuf wire format as far as [`read_in_place`] reads it; None for anything it
/// leaves to prost.
mod pb {
    const VARINT: u8 = 0;
    const FIXED64: u8 = 1;
    const LEN: u8 = 2;
    const FIXED32: u8 = 5;

    /// A varint of up to 9 bytes (values below 2^63; prost reads the longer ones).
    pub fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in buf.iter().take(9).enumerate() {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                *buf = &buf[i + 1..];
                return Some(value);
            }
        }
        None
    }

    /// A field's (tag, wire type): a tag of at least 1 and a key below 2^32, as prost
    /// requires; groups (wire types 3 and 4) are left to prost.
    pub fn key(buf: &mut &[u8]) -> Option<(u64, u8)> {
        let key = varint(buf)?;
        let wire = (key & 7) as u8;
        let tag = key >> 3;
        (key <= u64::from(u32::MAX) && tag >= 1 && matches!(wire, VARINT | FIXED64 | LEN | FIXED32))
            .then_some((tag, wire))
    }

    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = buf.split_at_checked(n)?;
        *buf = rest;
        Some(head)
    }

    /// A length-delimited field's bytes (a string or a message).
    pub fn message<'a>(buf: &mut &'a [u8], wire: u8) -> Option<&'a [u8]> {
        if wire != LEN {
            return None;
        }
        let len = usize::try_from(varint(buf)?).ok()?;
        take(buf, len)
    }

    pub fn string<'a>(buf: &mut &'a [u8], wire: u8) -> Option<&'a str> {
        std::str::from_utf8(message(buf, wire)?).ok()
    }

    pub fn int64(buf: &mut &[u8], wire: u8) -> Option<i64> {
        if wire != VARINT {
            return None;
        }
        varint(buf).map(|v| v as i64)
    }

    /// Skips a field this reader does not keep.
    pub fn skip(buf: &mut &[u8], wire: u8) -> Option<()> {
        match wire {
            VARINT => varint(buf).map(drop),
            FIXED64 => take(buf, 8).map(drop),
            LEN => message(buf, wire).map(drop),
            FIXED32 => take(buf, 4).map(drop),
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

    use proptest::prelude::*;
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

    /// What [`decode`] makes of `payload` without its frame and headers: read in place
    /// when it can (Some), else by prost.
    /// An event and its `ingest.ingest_timestamp_ms`, as [`decode_with_prost`] gives them.
    type Decoded = Option<(InputEvent, Option<i64>)>;

    fn both_ways(payload: &[u8]) -> (Option<Decoded>, Decoded) {
        let in_place =
            read_in_place(payload).map(|e| e.owned().map(|owned| (owned, e.ingest_timestamp_ms)));
        (in_place, decode_with_prost(payload))
    }

    fn event_strategy() -> impl Strategy<Value = ev::Event> {
        let text = || prop_oneof![Just(String::new()), "[a-z0-9/_-]{1,12}", "\\PC{0,6}"];
        let int = || prop_oneof![0i64..2_000_000_000_000, any::<i64>()];
        (
            (
                text(),
                text(),
                any::<u32>(),
                prop::option::of((text(), text())),
            ),
            prop::option::of((text(), text(), text(), prop::option::of(int()), text())),
            prop::option::of((int(), text(), text())),
            prop::option::of((int(), text(), text())),
        )
            .prop_map(
                |((id, kind, version, key), payload, metadata, ingest)| ev::Event {
                    event_id: id,
                    schema_version: version,
                    event_type: kind,
                    key: key.map(|(user_id, session_id)| ev::EventKey {
                        user_id,
                        session_id,
                    }),
                    payload: payload.map(|(page, referrer, currency, amount_micros, prop)| {
                        ev::Payload {
                            page,
                            referrer,
                            currency,
                            amount_micros,
                            properties: [(prop.clone(), prop)].into(),
                        }
                    }),
                    metadata: metadata.map(|(event_timestamp_ms, trace_id, source)| ev::Metadata {
                        event_timestamp_ms,
                        trace_id,
                        source,
                    }),
                    ingest: ingest.map(|(ingest_timestamp_ms, ingest_source, protocol)| {
                        ev::IngestInfo {
                            ingest_timestamp_ms,
                            ingest_source,
                            protocol,
                        }
                    }),
                },
            )
    }

    proptest::proptest! {
        /// Reading in place gives what prost's decoding gives: for events of every shape,
        /// for two concatenated (protobuf's merge: the last value of a field wins, message
        /// fields merge), and with bytes changed or appended (then either both read the
        /// same, or reading in place leaves it to prost).
        #[test]
        fn reading_in_place_reads_what_prost_decodes(
            events in prop::collection::vec(event_strategy(), 1..3),
            noise in prop::collection::vec(any::<u8>(), 0..4),
            flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            let mut value: Vec<u8> = events.iter().flat_map(|e| e.encode_to_vec()).collect();
            let plain = value.clone();
            let (in_place, prost) = both_ways(&plain);
            let small = |e: &ev::Event| {
                [
                    e.metadata.as_ref().map_or(0, |m| m.event_timestamp_ms),
                    e.ingest.as_ref().map_or(0, |i| i.ingest_timestamp_ms),
                    e.payload.as_ref().and_then(|p| p.amount_micros).unwrap_or(0),
                ]
                .iter()
                .all(|v| *v >= 0)
            };
            if events.iter().all(small) {
                // Nothing here is left to prost.
                prop_assert!(in_place.is_some());
            }
            if let Some(got) = in_place {
                prop_assert_eq!(got, prost);
            }
            value.extend(&noise);
            if let Some((at, byte)) = flip {
                let i = at.index(value.len());
                value[i] ^= byte;
            }
            let (in_place, prost) = both_ways(&value);
            if let Some(got) = in_place {
                prop_assert_eq!(got, prost);
            }
        }
    }

    #[test]
    fn versions_order_by_offset_then_count_then_finality() {
        assert!(version(10, 1, false) > version(9, 100, true));
        assert!(version(10, 5, false) > version(10, 4, true));
        assert!(version(10, 5, true) > version(10, 5, false));
        assert_eq!(version(10, 5, true), version(10, 5, true));
    }
}

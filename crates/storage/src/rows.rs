//! Rows of the ClickHouse hot store, field for field in table order (see
//! `crates/storage/clickhouse/0001_init.sql` and the later migrations, whose added columns
//! come last), serialized as RowBinary by the `clickhouse` crate.
//!
//! Types stay within what ClickHouse 18.16 has: booleans are `u8` (`UInt8`), times are
//! `i64` epoch milliseconds, `Date` columns are `u16` days since 1970-01-01, protobuf
//! maps become parallel arrays sorted by key.

use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};
use pulse_contracts::pb::events::v1::Event;

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of the UTC day containing `ms` (floor), clamped to the range
/// of a ClickHouse `Date` (`u16`: 1970-01-01 ..= 2149-06-06).
pub fn epoch_day(ms: i64) -> u16 {
    u16::try_from(ms.div_euclid(MS_PER_DAY).clamp(0, i64::from(u16::MAX))).unwrap_or(u16::MAX)
}

/// One row of `events`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct EventRow {
    pub event_id: String,
    pub schema_version: u32,
    pub event_type: String,
    pub user_id: String,
    pub session_id: String,
    pub page: String,
    pub referrer: String,
    pub currency: String,
    /// 0 when the event has no amount (see `has_amount`).
    pub amount_micros: i64,
    pub has_amount: u8,
    /// Property keys, sorted; `property_values` is parallel.
    pub property_keys: Vec<String>,
    pub property_values: Vec<String>,
    pub event_time_ms: i64,
    pub ingest_time_ms: i64,
    pub trace_id: String,
    pub source: String,
    pub ingest_source: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub written_at_ms: i64,
    /// `epoch_day(event_time_ms)`: the partition day.
    pub event_date: u16,
    /// The producer's own `metadata.trace_id`, as sent (any form; "" when none), kept
    /// even when `trace_id` holds the record's W3C trace id (migration 0002).
    pub source_trace_id: String,
}

impl EventRow {
    /// The row of an accepted event read from `partition`/`offset`. `trace_id` is the
    /// W3C trace id of the Kafka record if known; otherwise the producer's
    /// `metadata.trace_id` is kept. `source_trace_id` is always the producer's.
    pub fn from_event(
        e: &Event,
        partition: i32,
        offset: i64,
        trace_id: Option<&str>,
        written_at_ms: i64,
    ) -> Self {
        let key = e.key.clone().unwrap_or_default();
        let payload = e.payload.as_ref();
        let metadata = e.metadata.clone().unwrap_or_default();
        let ingest = e.ingest.clone().unwrap_or_default();
        let mut properties: Vec<(String, String)> = payload
            .map(|p| {
                p.properties
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        properties.sort();
        let (property_keys, property_values) = properties.into_iter().unzip();
        let amount = payload.and_then(|p| p.amount_micros);
        Self {
            event_id: e.event_id.clone(),
            schema_version: e.schema_version,
            event_type: e.event_type.clone(),
            user_id: key.user_id,
            session_id: key.session_id,
            page: payload.map(|p| p.page.clone()).unwrap_or_default(),
            referrer: payload.map(|p| p.referrer.clone()).unwrap_or_default(),
            currency: payload.map(|p| p.currency.clone()).unwrap_or_default(),
            amount_micros: amount.unwrap_or(0),
            has_amount: u8::from(amount.is_some()),
            property_keys,
            property_values,
            event_time_ms: metadata.event_timestamp_ms,
            ingest_time_ms: ingest.ingest_timestamp_ms,
            trace_id: match trace_id {
                Some(t) if !t.is_empty() => t.to_owned(),
                _ => metadata.trace_id.clone(),
            },
            source_trace_id: metadata.trace_id,
            source: metadata.source,
            ingest_source: ingest.ingest_source,
            kafka_partition: partition,
            kafka_offset: offset,
            written_at_ms,
            event_date: epoch_day(metadata.event_timestamp_ms),
        }
    }
}

/// One row of `user_activity`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct ActivityRow {
    pub user_id: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub page_views: u64,
    /// Pages, sorted; `page_views_by_page` is parallel.
    pub pages: Vec<String>,
    pub page_views_by_page: Vec<u64>,
    /// Event types, sorted; `events_by_type` is parallel.
    pub types: Vec<String>,
    pub events_by_type: Vec<u64>,
    /// Currencies, sorted; `revenue_micros` is parallel.
    pub revenue_currencies: Vec<String>,
    pub revenue_micros: Vec<i64>,
    pub event_count: u64,
    pub first_event_ms: i64,
    pub last_event_ms: i64,
    pub version: u64,
    pub is_final: u8,
    pub last_ingest_ms: i64,
    pub written_at_ms: i64,
    /// `epoch_day(window_start_ms)`: the partition day.
    pub window_date: u16,
    /// The rules version that produced the emission (migration 0004; '' on older rows).
    pub rules_version: String,
}

fn sorted_pairs<V: Clone>(map: &std::collections::HashMap<String, V>) -> (Vec<String>, Vec<V>) {
    let mut pairs: Vec<(&String, &V)> = map.iter().collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    pairs
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unzip()
}

impl ActivityRow {
    /// The row of one emission of a window.
    pub fn from_activity(a: &UserWindowActivity, written_at_ms: i64) -> Self {
        let (pages, page_views_by_page) = sorted_pairs(&a.page_views_by_page);
        let (types, events_by_type) = sorted_pairs(&a.events_by_type);
        let mut revenue: Vec<(String, i64)> = a
            .revenue
            .iter()
            .map(|r| (r.currency.clone(), r.amount_micros))
            .collect();
        revenue.sort();
        let (revenue_currencies, revenue_micros) = revenue.into_iter().unzip();
        Self {
            user_id: a.user_id.clone(),
            window_start_ms: a.window_start_ms,
            window_end_ms: a.window_end_ms,
            page_views: a.page_views,
            pages,
            page_views_by_page,
            types,
            events_by_type,
            revenue_currencies,
            revenue_micros,
            event_count: a.event_count,
            first_event_ms: a.first_event_ms,
            last_event_ms: a.last_event_ms,
            version: a.version,
            is_final: u8::from(a.r#final),
            last_ingest_ms: a.last_ingest_ms,
            written_at_ms,
            window_date: epoch_day(a.window_start_ms),
            rules_version: a.rules_version.clone(),
        }
    }
}

/// One row of `sessions`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct SessionRow {
    pub session_id: String,
    pub user_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub duration_ms: i64,
    pub page_count: u64,
    pub event_count: u64,
    pub version: u64,
    pub is_final: u8,
    pub last_ingest_ms: i64,
    pub merged_session_ids: Vec<String>,
    pub written_at_ms: i64,
    /// `epoch_day(start_ms)`: the partition day.
    pub start_date: u16,
    /// The rules version that produced the emission (migration 0004; '' on older rows).
    pub rules_version: String,
}

impl SessionRow {
    /// The row of one emission of a session.
    pub fn from_session(s: &Session, written_at_ms: i64) -> Self {
        Self {
            session_id: s.session_id.clone(),
            user_id: s.user_id.clone(),
            start_ms: s.start_ms,
            end_ms: s.end_ms,
            duration_ms: s.duration_ms,
            page_count: s.page_count,
            event_count: s.event_count,
            version: s.version,
            is_final: u8::from(s.r#final),
            last_ingest_ms: s.last_ingest_ms,
            merged_session_ids: s.merged_session_ids.clone(),
            written_at_ms,
            start_date: epoch_day(s.start_ms),
            rules_version: s.rules_version.clone(),
        }
    }
}

/// One row of `freshness`: how far a stage got on one Kafka partition.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct FreshnessRow {
    pub stage: String,
    pub kafka_partition: i32,
    pub last_event_time_ms: i64,
    pub last_ingest_ms: i64,
    pub written_at_ms: i64,
}

impl FreshnessRow {
    /// The rows of `stage` for each `(partition, (last event time, last ingest time))`,
    /// written at `written_at_ms`.
    pub fn for_partitions(
        stage: &str,
        partitions: impl IntoIterator<Item = (i32, (i64, i64))>,
        written_at_ms: i64,
    ) -> Vec<Self> {
        partitions
            .into_iter()
            .map(|(partition, (ev, ing))| Self {
                stage: stage.to_owned(),
                kafka_partition: partition,
                last_event_time_ms: ev,
                last_ingest_ms: ing,
                written_at_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_contracts::pb::aggregates::v1::CurrencyAmount;
    use pulse_contracts::pb::events::v1::{EventKey, IngestInfo, Metadata, Payload};

    const T: i64 = 1_709_164_800_000 + 3_600_000; // 2024-02-29 01:00 UTC

    fn event() -> Event {
        Event {
            event_id: "e1".into(),
            schema_version: 2,
            event_type: "purchase".into(),
            key: Some(EventKey {
                user_id: "u1".into(),
                session_id: "s1".into(),
            }),
            payload: Some(Payload {
                page: "/checkout".into(),
                referrer: "https://example.com/".into(),
                currency: "EUR".into(),
                amount_micros: Some(12_340_000),
                properties: [("z", "last"), ("a", "first"), ("m", "mid")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            }),
            metadata: Some(Metadata {
                event_timestamp_ms: T,
                trace_id: "producer-trace".into(),
                source: "web".into(),
            }),
            ingest: Some(IngestInfo {
                ingest_timestamp_ms: T + 250,
                ingest_source: "shop".into(),
                protocol: "http".into(),
            }),
        }
    }

    #[test]
    fn epoch_day_floors_and_clamps() {
        assert_eq!(epoch_day(0), 0);
        assert_eq!(epoch_day(MS_PER_DAY - 1), 0);
        assert_eq!(epoch_day(MS_PER_DAY), 1);
        assert_eq!(epoch_day(T), 19_782); // 2024-02-29
        assert_eq!(epoch_day(-1), 0);
        assert_eq!(epoch_day(i64::MIN), 0);
        assert_eq!(epoch_day(i64::MAX), u16::MAX);
    }

    #[test]
    fn an_event_maps_to_its_row_with_sorted_properties() {
        let row = EventRow::from_event(
            &event(),
            3,
            42,
            Some("0af7651916cd43dd8448eb211c80319c"),
            99,
        );
        assert_eq!(
            row,
            EventRow {
                event_id: "e1".into(),
                schema_version: 2,
                event_type: "purchase".into(),
                user_id: "u1".into(),
                session_id: "s1".into(),
                page: "/checkout".into(),
                referrer: "https://example.com/".into(),
                currency: "EUR".into(),
                amount_micros: 12_340_000,
                has_amount: 1,
                property_keys: vec!["a".into(), "m".into(), "z".into()],
                property_values: vec!["first".into(), "mid".into(), "last".into()],
                event_time_ms: T,
                ingest_time_ms: T + 250,
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                source: "web".into(),
                ingest_source: "shop".into(),
                kafka_partition: 3,
                kafka_offset: 42,
                written_at_ms: 99,
                event_date: 19_782,
                source_trace_id: "producer-trace".into(),
            }
        );
    }

    #[test]
    fn without_a_record_trace_id_the_producers_is_kept() {
        assert_eq!(
            EventRow::from_event(&event(), 0, 0, None, 0).trace_id,
            "producer-trace"
        );
        assert_eq!(
            EventRow::from_event(&event(), 0, 0, Some(""), 0).trace_id,
            "producer-trace"
        );
    }

    #[test]
    fn the_producers_trace_id_is_kept_beside_the_w3c_one() {
        let row = EventRow::from_event(&event(), 0, 0, Some("0af7651916cd43dd8448eb211c80319c"), 0);
        assert_eq!(
            (row.trace_id.as_str(), row.source_trace_id.as_str()),
            ("0af7651916cd43dd8448eb211c80319c", "producer-trace")
        );
        assert_eq!(
            EventRow::from_event(&event(), 0, 0, None, 0).source_trace_id,
            "producer-trace"
        );
    }

    #[test]
    fn an_event_without_amount_or_optional_parts_has_zero_defaults() {
        let bare = Event {
            event_id: "e2".into(),
            ..Event::default()
        };
        let row = EventRow::from_event(&bare, 0, 7, None, 1);
        assert_eq!(row.has_amount, 0);
        assert_eq!(row.amount_micros, 0);
        assert!(row.property_keys.is_empty() && row.property_values.is_empty());
        assert_eq!(row.user_id, "");
        assert_eq!(row.event_date, 0);

        let mut zero = event();
        if let Some(p) = zero.payload.as_mut() {
            p.amount_micros = Some(0);
        }
        let row = EventRow::from_event(&zero, 0, 0, None, 0);
        assert_eq!((row.amount_micros, row.has_amount), (0, 1));
    }

    #[test]
    fn an_activity_maps_to_parallel_sorted_arrays() {
        let a = UserWindowActivity {
            user_id: "u1".into(),
            window_start_ms: T,
            window_end_ms: T + 60_000,
            page_views: 3,
            page_views_by_page: [("/b".to_owned(), 1), ("/a".to_owned(), 2)].into(),
            events_by_type: [("purchase".to_owned(), 1), ("page_view".to_owned(), 3)].into(),
            revenue: vec![
                CurrencyAmount {
                    currency: "USD".into(),
                    amount_micros: 5,
                },
                CurrencyAmount {
                    currency: "EUR".into(),
                    amount_micros: 7,
                },
            ],
            event_count: 4,
            first_event_ms: T + 1,
            last_event_ms: T + 2,
            version: 5,
            r#final: true,
            last_ingest_ms: T + 3,
            rules_version: "2026-12-rc1+0123456789ab".into(),
        };
        let row = ActivityRow::from_activity(&a, 10);
        assert_eq!(row.pages, ["/a", "/b"]);
        assert_eq!(row.page_views_by_page, [2, 1]);
        assert_eq!(row.types, ["page_view", "purchase"]);
        assert_eq!(row.events_by_type, [3, 1]);
        assert_eq!(row.revenue_currencies, ["EUR", "USD"]);
        assert_eq!(row.revenue_micros, [7, 5]);
        assert_eq!((row.version, row.is_final), (5, 1));
        assert_eq!(
            (row.event_count, row.first_event_ms, row.last_event_ms),
            (4, T + 1, T + 2)
        );
        assert_eq!((row.last_ingest_ms, row.written_at_ms), (T + 3, 10));
        assert_eq!((row.window_end_ms, row.page_views), (T + 60_000, 3));
        assert_eq!(row.window_date, 19_782);
        assert_eq!(row.rules_version, "2026-12-rc1+0123456789ab");
    }

    #[test]
    fn a_session_maps_field_for_field() {
        let s = Session {
            session_id: "s9".into(),
            user_id: "u1".into(),
            start_ms: T,
            end_ms: T + 90_000,
            duration_ms: 90_000,
            page_count: 4,
            event_count: 6,
            version: 8,
            r#final: false,
            last_ingest_ms: T + 91_000,
            merged_session_ids: vec!["s7".into(), "s8".into()],
            rules_version: "0123456789ab".into(),
        };
        assert_eq!(
            SessionRow::from_session(&s, 77),
            SessionRow {
                session_id: "s9".into(),
                user_id: "u1".into(),
                start_ms: T,
                end_ms: T + 90_000,
                duration_ms: 90_000,
                page_count: 4,
                event_count: 6,
                version: 8,
                is_final: 0,
                last_ingest_ms: T + 91_000,
                merged_session_ids: vec!["s7".into(), "s8".into()],
                written_at_ms: 77,
                start_date: 19_782,
                rules_version: "0123456789ab".into(),
            }
        );
    }
}

//! The Parquet archive format, pure: the row of one raw event, the Arrow schema, rows →
//! Parquet bytes (zstd), and the object keys (Hive-style `events/dt=YYYY-MM-DD/hour=HH/`
//! by event time, file names derived from topic, partition and offsets). Uploading,
//! batching and commits are `parquet_sink`'s.

use std::sync::Arc;

use arrow_array::builder::{MapBuilder, MapFieldNames, StringBuilder};
use arrow_array::{
    ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use pulse_contracts::pb::events::v1::Event;

/// The column of the producer's `metadata.trace_id`, added after the first release of the
/// archive: the last column and nullable, so files without it (written before) stay valid
/// archive files and every reader treats its absence as null.
pub const SOURCE_TRACE_ID: &str = "source_trace_id";

/// Folder of the raw events under the S3 prefix.
pub const EVENTS_DIR: &str = "events";
/// Rows per Parquet row group (a file of more rows has several).
pub const ROW_GROUP_ROWS: usize = 65_536;
/// zstd level of every column (zstd's own default).
pub const ZSTD_LEVEL: i32 = 3;

const MS_PER_HOUR: i64 = 3_600_000;
/// 9999-12-31T23:59:59.999Z: event times are clamped to 1970..=9999 for the folder name.
const MAX_FOLDER_MS: i64 = 253_402_300_799_999;

/// Why rows could not be encoded (a bug, never the data: every event has a row).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("building the Arrow batch: {0}")]
    Arrow(#[from] ArrowError),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] ParquetError),
}

/// One archived event: a column per field of the README's Parquet schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRow {
    pub event_id: String,
    /// `schema_version` of the event (saturated at `i32::MAX`; `event_proto` keeps it exact).
    pub schema_version: i32,
    pub event_type: String,
    pub user_id: String,
    /// Empty when the producer sent none (as every string of the event).
    pub session_id: String,
    pub page: String,
    pub referrer: String,
    pub currency: String,
    /// `None` when the event carries no amount.
    pub amount_micros: Option<i64>,
    /// Sorted by key (so the same rows always encode to the same bytes).
    pub properties: Vec<(String, String)>,
    pub event_time_ms: i64,
    pub ingest_time_ms: i64,
    pub trace_id: String,
    pub source: String,
    pub ingest_source: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    /// The event's protobuf bytes without the Confluent framing (for lossless replay).
    pub event_proto: Vec<u8>,
    /// The producer's own `metadata.trace_id` as sent (any form), kept even when
    /// `trace_id` holds the record's W3C trace id; `None` when the producer sent none.
    /// The last column, nullable: files written before it existed lack it and read as
    /// `None` ([`SOURCE_TRACE_ID`]).
    pub source_trace_id: Option<String>,
}

impl ArchiveRow {
    /// The row of `e`, read from `topic`/`partition`/`offset`, whose unframed protobuf
    /// bytes are `event_proto`. `trace_id` is the W3C trace id of the record's headers if
    /// known; otherwise the producer's `metadata.trace_id` is kept. `source_trace_id` is
    /// always the producer's (`None` when empty).
    pub fn from_event(
        e: &Event,
        event_proto: &[u8],
        topic: &str,
        partition: i32,
        offset: i64,
        trace_id: Option<&str>,
    ) -> Self {
        let key = e.key.clone().unwrap_or_default();
        let payload = e.payload.clone().unwrap_or_default();
        let metadata = e.metadata.clone().unwrap_or_default();
        let ingest = e.ingest.clone().unwrap_or_default();
        let mut properties: Vec<(String, String)> = payload.properties.into_iter().collect();
        properties.sort();
        Self {
            event_id: e.event_id.clone(),
            schema_version: i32::try_from(e.schema_version).unwrap_or(i32::MAX),
            event_type: e.event_type.clone(),
            user_id: key.user_id,
            session_id: key.session_id,
            page: payload.page,
            referrer: payload.referrer,
            currency: payload.currency,
            amount_micros: payload.amount_micros,
            properties,
            event_time_ms: metadata.event_timestamp_ms,
            ingest_time_ms: ingest.ingest_timestamp_ms,
            trace_id: match trace_id {
                Some(t) if !t.is_empty() => t.to_owned(),
                _ => metadata.trace_id.clone(),
            },
            source: metadata.source,
            ingest_source: ingest.ingest_source,
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
            event_proto: event_proto.to_vec(),
            source_trace_id: (!metadata.trace_id.is_empty()).then_some(metadata.trace_id),
        }
    }
}

/// The UTC hour an event time falls in: its `dt=`/`hour=` folder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HourBucket {
    /// `YYYY-MM-DD`.
    pub dt: String,
    /// 0..=23.
    pub hour: u8,
}

impl HourBucket {
    /// `dt=YYYY-MM-DD/hour=HH`.
    pub fn folder(&self) -> String {
        format!("dt={}/hour={:02}", self.dt, self.hour)
    }
}

/// The hour bucket of `event_time_ms` (epoch ms, UTC). Times before 1970 or after 9999
/// are clamped to the first or last hour of that range (ingest never accepts them).
pub fn hour_bucket(event_time_ms: i64) -> HourBucket {
    let ms = event_time_ms.clamp(0, MAX_FOLDER_MS);
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    HourBucket {
        dt: format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        hour: u8::try_from((ms % 86_400_000) / MS_PER_HOUR).unwrap_or(0),
    }
}

/// The file name of the rows of `topic`/`partition` with offsets `first..=last`:
/// `{topic}-p{partition}-o{first:020}-{last:020}.parquet`. Deterministic, so a retried
/// upload of the same rows overwrites the same object.
pub fn object_name(topic: &str, partition: i32, first: i64, last: i64) -> String {
    format!("{topic}-p{partition}-o{first:020}-{last:020}.parquet")
}

/// The key, relative to the S3 prefix, of the file holding `bucket`'s rows of
/// `topic`/`partition` with offsets `first..=last`.
pub fn object_key(
    bucket: &HourBucket,
    topic: &str,
    partition: i32,
    first: i64,
    last: i64,
) -> String {
    format!(
        "{EVENTS_DIR}/{}/{}",
        bucket.folder(),
        object_name(topic, partition, first, last)
    )
}

/// Field names of the `properties` map (Parquet's conventional MAP layout).
fn map_names() -> MapFieldNames {
    MapFieldNames {
        entry: "key_value".into(),
        key: "key".into(),
        value: "value".into(),
    }
}

fn properties_type() -> DataType {
    let names = map_names();
    DataType::Map(
        Arc::new(Field::new(
            names.entry,
            DataType::Struct(Fields::from(vec![
                Field::new(names.key, DataType::Utf8, false),
                Field::new(names.value, DataType::Utf8, false),
            ])),
            false,
        )),
        false,
    )
}

fn utc_ms() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The archive's Arrow schema (documented in the README's Writer section).
pub fn schema() -> SchemaRef {
    let s = |name: &str| Field::new(name, DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        s("event_id"),
        Field::new("schema_version", DataType::Int32, false),
        s("event_type"),
        s("user_id"),
        s("session_id"),
        s("page"),
        s("referrer"),
        s("currency"),
        Field::new("amount_micros", DataType::Int64, true),
        Field::new("properties", properties_type(), false),
        Field::new("event_time", utc_ms(), false),
        Field::new("ingest_time", utc_ms(), false),
        s("trace_id"),
        s("source"),
        s("ingest_source"),
        s("kafka_topic"),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new("event_proto", DataType::Binary, false),
        Field::new(SOURCE_TRACE_ID, DataType::Utf8, true),
    ]))
}

fn strings(rows: &[ArchiveRow], f: impl Fn(&ArchiveRow) -> &str) -> ArrayRef {
    Arc::new(rows.iter().map(|r| Some(f(r))).collect::<StringArray>())
}

/// The rows as one Arrow record batch of [`schema`].
pub fn record_batch(rows: &[ArchiveRow]) -> Result<RecordBatch, ArchiveError> {
    let names = map_names();
    let mut props = MapBuilder::new(
        Some(names.clone()),
        StringBuilder::new(),
        StringBuilder::new(),
    )
    .with_values_field(Field::new(names.value, DataType::Utf8, false));
    for r in rows {
        for (k, v) in &r.properties {
            props.keys().append_value(k);
            props.values().append_value(v);
        }
        props.append(true)?;
    }
    let columns: Vec<ArrayRef> = vec![
        strings(rows, |r| &r.event_id),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.schema_version),
        )),
        strings(rows, |r| &r.event_type),
        strings(rows, |r| &r.user_id),
        strings(rows, |r| &r.session_id),
        strings(rows, |r| &r.page),
        strings(rows, |r| &r.referrer),
        strings(rows, |r| &r.currency),
        Arc::new(rows.iter().map(|r| r.amount_micros).collect::<Int64Array>()),
        Arc::new(props.finish()),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.event_time_ms))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ingest_time_ms))
                .with_timezone("UTC"),
        ),
        strings(rows, |r| &r.trace_id),
        strings(rows, |r| &r.source),
        strings(rows, |r| &r.ingest_source),
        strings(rows, |r| &r.kafka_topic),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.kafka_partition),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.kafka_offset),
        )),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.event_proto.as_slice()))
                .collect::<BinaryArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.source_trace_id.as_deref())
                .collect::<StringArray>(),
        ),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// Writer settings: zstd, row groups of [`ROW_GROUP_ROWS`].
pub fn writer_properties() -> Result<WriterProperties, ArchiveError> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build())
}

/// One Parquet file holding `rows` in order. The same rows always give the same bytes.
pub fn encode(rows: &[ArchiveRow]) -> Result<Vec<u8>, ArchiveError> {
    let batch = record_batch(rows)?;
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.event_proto.len()).sum::<usize>() / 2);
    let mut w = ArrowWriter::try_new(&mut out, schema(), Some(writer_properties()?))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
    use arrow_array::{Array, MapArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use prost::Message as _;
    use pulse_contracts::pb::events::v1::{EventKey, IngestInfo, Metadata, Payload};

    const T: i64 = 1_709_164_800_000 + 3_600_000; // 2024-02-29 01:00 UTC

    fn event(id: &str, amount: Option<i64>, props: &[(&str, &str)]) -> Event {
        Event {
            event_id: id.into(),
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
                amount_micros: amount,
                properties: props
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
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

    fn row(e: &Event, offset: i64, trace: Option<&str>) -> ArchiveRow {
        ArchiveRow::from_event(e, &e.encode_to_vec(), "pulse.events.v1", 2, offset, trace)
    }

    /// Reads a file back with the parquet crate's Arrow reader.
    fn decode(bytes: Vec<u8>) -> (SchemaRef, Vec<ArchiveRow>, usize) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let row_groups = builder.metadata().num_row_groups();
        let reader = builder.build().unwrap();
        let mut out = Vec::new();
        let mut schema = None;
        for batch in reader {
            let b = batch.unwrap();
            schema.get_or_insert(b.schema());
            let s = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
            let (id, ty, user, session, page, referrer, currency) = (
                s("event_id"),
                s("event_type"),
                s("user_id"),
                s("session_id"),
                s("page"),
                s("referrer"),
                s("currency"),
            );
            let (trace, source, ingest_source, topic) = (
                s("trace_id"),
                s("source"),
                s("ingest_source"),
                s("kafka_topic"),
            );
            let i32s = |name: &str| {
                b.column_by_name(name)
                    .unwrap()
                    .as_primitive::<Int32Type>()
                    .clone()
            };
            let i64s = |name: &str| {
                b.column_by_name(name)
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .clone()
            };
            let ts = |name: &str| {
                b.column_by_name(name)
                    .unwrap()
                    .as_primitive::<TimestampMillisecondType>()
                    .clone()
            };
            let (version, partition) = (i32s("schema_version"), i32s("kafka_partition"));
            let (amount, offset) = (i64s("amount_micros"), i64s("kafka_offset"));
            let (event_time, ingest_time) = (ts("event_time"), ts("ingest_time"));
            let props: &MapArray = b.column_by_name("properties").unwrap().as_map();
            let proto = b.column_by_name("event_proto").unwrap().as_binary::<i32>();
            let source_trace = s(SOURCE_TRACE_ID);
            for i in 0..b.num_rows() {
                let entries = props.value(i);
                let keys = entries.column(0).as_string::<i32>();
                let values = entries.column(1).as_string::<i32>();
                out.push(ArchiveRow {
                    event_id: id.value(i).into(),
                    schema_version: version.value(i),
                    event_type: ty.value(i).into(),
                    user_id: user.value(i).into(),
                    session_id: session.value(i).into(),
                    page: page.value(i).into(),
                    referrer: referrer.value(i).into(),
                    currency: currency.value(i).into(),
                    amount_micros: amount.is_valid(i).then(|| amount.value(i)),
                    properties: (0..keys.len())
                        .map(|j| (keys.value(j).to_owned(), values.value(j).to_owned()))
                        .collect(),
                    event_time_ms: event_time.value(i),
                    ingest_time_ms: ingest_time.value(i),
                    trace_id: trace.value(i).into(),
                    source: source.value(i).into(),
                    ingest_source: ingest_source.value(i).into(),
                    kafka_topic: topic.value(i).into(),
                    kafka_partition: partition.value(i),
                    kafka_offset: offset.value(i),
                    event_proto: proto.value(i).to_vec(),
                    source_trace_id: source_trace
                        .is_valid(i)
                        .then(|| source_trace.value(i).into()),
                });
            }
        }
        (schema.unwrap(), out, row_groups)
    }

    #[test]
    fn object_names_are_deterministic_and_zero_padded() {
        assert_eq!(
            object_name("pulse.events.v1", 3, 7, 1_234),
            "pulse.events.v1-p3-o00000000000000000007-00000000000000001234.parquet"
        );
        let b = hour_bucket(T);
        assert_eq!(
            object_key(&b, "pulse.events.v1", 0, 0, 9),
            "events/dt=2024-02-29/hour=01/pulse.events.v1-p0-o00000000000000000000-00000000000000000009.parquet"
        );
        // Zero padding keeps lexical order equal to offset order.
        assert!(object_name("t", 0, 9, 9) < object_name("t", 0, 10, 10));
    }

    #[test]
    fn the_last_millisecond_of_a_day_and_midnight_fall_in_different_hours() {
        let midnight = 1_709_251_200_000; // 2024-03-01 00:00:00.000 UTC
        assert_eq!(
            hour_bucket(midnight - 1),
            HourBucket {
                dt: "2024-02-29".into(),
                hour: 23
            }
        );
        assert_eq!(hour_bucket(midnight - 1).folder(), "dt=2024-02-29/hour=23");
        assert_eq!(hour_bucket(midnight).folder(), "dt=2024-03-01/hour=00");
        assert_eq!(hour_bucket(midnight + MS_PER_HOUR - 1).hour, 0);
        assert_eq!(hour_bucket(midnight + MS_PER_HOUR).hour, 1);
    }

    #[test]
    fn times_outside_the_folder_range_are_clamped_not_panicking() {
        assert_eq!(hour_bucket(0).folder(), "dt=1970-01-01/hour=00");
        assert_eq!(hour_bucket(-1).folder(), "dt=1970-01-01/hour=00");
        assert_eq!(hour_bucket(i64::MIN).folder(), "dt=1970-01-01/hour=00");
        assert_eq!(hour_bucket(i64::MAX).folder(), "dt=9999-12-31/hour=23");
    }

    #[test]
    fn an_event_maps_to_its_row_with_sorted_properties_and_the_record_trace_id() {
        let e = event("e1", Some(12_340_000), &[("z", "last"), ("a", "first")]);
        let r = row(&e, 42, Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(
            r.properties,
            vec![("a".into(), "first".into()), ("z".into(), "last".into())]
        );
        assert_eq!(r.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!((r.kafka_partition, r.kafka_offset), (2, 42));
        assert_eq!(r.amount_micros, Some(12_340_000));
        assert_eq!(Event::decode(r.event_proto.as_slice()).unwrap(), e);
        assert_eq!(row(&e, 0, None).trace_id, "producer-trace");
        assert_eq!(row(&e, 0, Some("")).trace_id, "producer-trace");
        // The producer's id is kept beside the W3C one, whichever `trace_id` holds.
        assert_eq!(r.source_trace_id.as_deref(), Some("producer-trace"));
        assert_eq!(
            row(&e, 0, None).source_trace_id.as_deref(),
            Some("producer-trace")
        );
        let big = Event {
            schema_version: u32::MAX,
            ..Event::default()
        };
        assert_eq!(row(&big, 0, None).schema_version, i32::MAX);
        assert_eq!(row(&big, 0, None).source_trace_id, None, "none sent: null");
    }

    #[test]
    fn rows_round_trip_through_parquet() {
        let rows = vec![
            row(
                &event("e1", Some(12_340_000), &[("z", "1"), ("a", "2")]),
                5,
                Some("abc"),
            ),
            row(&event("e2", None, &[]), 6, None),
            row(&event("e3", Some(0), &[("k", "")]), 9, None),
            row(&Event::default(), 10, None),
        ];
        let bytes = encode(&rows).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        let (schema, back, row_groups) = decode(bytes.clone());
        assert_eq!(back, rows);
        assert_eq!(row_groups, 1);
        assert_eq!(
            schema.fields(),
            super::schema().fields(),
            "the Arrow schema survives"
        );
        assert_eq!(
            schema.field_with_name("event_time").unwrap().data_type(),
            &utc_ms()
        );
        assert!(
            schema
                .field_with_name("amount_micros")
                .unwrap()
                .is_nullable()
        );
        assert!(
            schema
                .field_with_name(SOURCE_TRACE_ID)
                .unwrap()
                .is_nullable()
        );
        assert!(back.iter().any(|r| r.source_trace_id.is_some()));
        assert!(back.iter().any(|r| r.source_trace_id.is_none()));
        assert_eq!(
            encode(&rows).unwrap(),
            bytes,
            "the same rows give the same bytes"
        );
    }

    #[test]
    fn the_file_has_the_documented_schema_and_zstd_columns() {
        let rows = vec![row(&event("e1", None, &[]), 0, None)];
        let bytes = encode(&rows).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let fields: Vec<String> = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let expected: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(fields, expected);
        let meta = builder.metadata();
        for col in meta.row_group(0).columns() {
            assert!(
                matches!(col.compression(), Compression::ZSTD(_)),
                "{} is {:?}",
                col.column_path(),
                col.compression()
            );
        }
    }

    #[test]
    fn source_trace_id_is_appended_last_so_older_columns_keep_their_positions() {
        // The columns of files written before `source_trace_id` existed, in their order.
        const BEFORE: [&str; 19] = [
            "event_id",
            "schema_version",
            "event_type",
            "user_id",
            "session_id",
            "page",
            "referrer",
            "currency",
            "amount_micros",
            "properties",
            "event_time",
            "ingest_time",
            "trace_id",
            "source",
            "ingest_source",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            "event_proto",
        ];
        let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names[..BEFORE.len()], BEFORE);
        assert_eq!(names[BEFORE.len()..], [SOURCE_TRACE_ID]);
    }

    #[test]
    fn many_rows_are_split_into_row_groups() {
        let e = event("e", Some(1), &[("a", "b")]);
        let rows: Vec<ArchiveRow> = (0..(ROW_GROUP_ROWS as i64 + 10))
            .map(|i| row(&e, i, None))
            .collect();
        let (_, back, row_groups) = decode(encode(&rows).unwrap());
        assert_eq!(row_groups, 2);
        assert_eq!(back.len(), rows.len());
        assert_eq!(back.last().unwrap().kafka_offset, ROW_GROUP_ROWS as i64 + 9);
    }

    #[test]
    fn an_empty_file_still_has_the_schema() {
        let bytes = encode(&[]).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        assert_eq!(builder.metadata().file_metadata().num_rows(), 0);
        assert_eq!(builder.schema().fields().len(), schema().fields().len());
    }
}

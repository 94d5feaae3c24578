//! Reading the Parquet archive for `pulsectl replay`: the time range flags, the hour folders
//! (`events/dt=YYYY-MM-DD/hour=HH/`) that overlap a range, listing them, and decoding one
//! object into the rows whose event time is in the range. The folder layout, object names
//! and schema are the writer's (`pulse_storage::archive`); publishing is `replay`'s. Files
//! of every archive schema so far are read: those written before the `source_trace_id`
//! column existed read as if it were null.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMillisecondType;
use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pulse_platform::s3::S3Config;
use pulse_storage::archive::{EVENTS_DIR, HourBucket, SOURCE_TRACE_ID, hour_bucket};

const MS_PER_HOUR: i64 = 3_600_000;
/// 9999-12-31T23:00:00Z, the last hour folder: `archive::hour_bucket` clamps event times to
/// 1970..=9999, so times outside that range live in its first or last folder.
const LAST_FOLDER_HOUR_MS: i64 = 253_402_297_200_000;
/// The longest range one replay may cover (one LIST request per hour folder).
pub const MAX_HOURS: i64 = 24 * 366;

/// The columns replay needs (every archive file has them), plus [`SOURCE_TRACE_ID`] when the
/// file has it; the others of the archive are not decoded.
const COLUMNS: [&str; 6] = [
    "event_id",
    "user_id",
    "event_time",
    "ingest_time",
    "trace_id",
    "event_proto",
];

/// One archived event, with what re-publishing it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedEvent {
    pub event_id: String,
    pub user_id: String,
    pub event_time_ms: i64,
    /// The original ingest time (`pulse-ingest-ts`).
    pub ingest_time_ms: i64,
    /// The W3C trace id of the original record, or the producer's `metadata.trace_id`.
    pub trace_id: String,
    /// The `pulse.events.v1.Event` protobuf bytes, unframed.
    pub event_proto: Vec<u8>,
    /// The producer's `metadata.trace_id` (the `source_trace_id` column); `None` when the
    /// producer sent none or the file predates the column (`event_proto` still holds it).
    pub source_trace_id: Option<String>,
}

/// Why an archive object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("s3: {0}")]
    Store(#[from] object_store::Error),
    #[error("not a readable Parquet file: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("not in the archive format: {0}")]
    Format(String),
}

/// `--from`/`--to`: an RFC 3339 time (`2025-11-24T23:59:00Z`) or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is neither RFC 3339 nor epoch milliseconds: {e}"))?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000))
        .map_err(|_| format!("{s:?} is out of range"))
}

/// The number of hours of `[from_ms, to_ms)` (whole or partial).
pub fn hours_spanned(from_ms: i64, to_ms: i64) -> i64 {
    if from_ms >= to_ms {
        return 0;
    }
    let first = from_ms.div_euclid(MS_PER_HOUR);
    let last = (to_ms - 1).div_euclid(MS_PER_HOUR);
    last.saturating_sub(first).saturating_add(1)
}

/// The hour folders whose hour overlaps `[from_ms, to_ms)`, in time order: the folder of
/// `from_ms` through the folder of the range's last millisecond, `to_ms - 1` (so a `to` on
/// the hour does not list the folder starting there). Times are clamped as the writer
/// clamps them. Empty when `from_ms >= to_ms`.
pub fn hour_folders(from_ms: i64, to_ms: i64) -> Vec<HourBucket> {
    if from_ms >= to_ms {
        return Vec::new();
    }
    let hour = |ms: i64| ms.clamp(0, LAST_FOLDER_HOUR_MS).div_euclid(MS_PER_HOUR);
    (hour(from_ms)..=hour(to_ms - 1))
        .map(|h| hour_bucket(h * MS_PER_HOUR))
        .collect()
}

/// Whether an event time is in `[from_ms, to_ms)`.
pub fn in_range(event_time_ms: i64, from_ms: i64, to_ms: i64) -> bool {
    (from_ms..to_ms).contains(&event_time_ms)
}

/// The folder path of `bucket` under the configured prefix.
pub fn folder_path(s3: &S3Config, bucket: &HourBucket) -> Path {
    s3.key(&format!("{EVENTS_DIR}/{}", bucket.folder()))
}

/// The Parquet objects in one hour folder, sorted by key (partition, then offsets).
pub async fn list_folder(
    store: &dyn ObjectStore,
    folder: &Path,
) -> Result<Vec<Path>, object_store::Error> {
    let listed: Vec<_> = store.list(Some(folder)).try_collect().await?;
    let mut keys: Vec<Path> = listed
        .into_iter()
        .map(|m| m.location)
        .filter(|p| p.as_ref().ends_with(".parquet"))
        .collect();
    keys.sort();
    Ok(keys)
}

/// Downloads and decodes one object: (rows in the file, its rows in `[from_ms, to_ms)`).
pub async fn read_object(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    from_ms: i64,
    to_ms: i64,
) -> Result<(u64, Vec<ArchivedEvent>), ObjectError> {
    let bytes = store.get(key).await?.bytes().await?;
    decode(bytes, from_ms, to_ms)
}

/// Decodes an archive file: (rows in the file, its rows in `[from_ms, to_ms)`, in file order).
pub fn decode(
    bytes: Bytes,
    from_ms: i64,
    to_ms: i64,
) -> Result<(u64, Vec<ArchivedEvent>), ObjectError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let fields = builder.schema().fields();
    let mut roots = Vec::with_capacity(COLUMNS.len());
    for name in COLUMNS {
        let i = fields
            .iter()
            .position(|f| f.name() == name)
            .ok_or_else(|| ObjectError::Format(format!("no column {name}")))?;
        roots.push(i);
    }
    if let Some(i) = fields.iter().position(|f| f.name() == SOURCE_TRACE_ID) {
        roots.push(i);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build()?;
    let (mut total, mut out) = (0_u64, Vec::new());
    for batch in reader {
        let batch = batch.map_err(|e| ObjectError::Format(e.to_string()))?;
        total += batch.num_rows() as u64;
        rows_in_range(&batch, from_ms, to_ms, &mut out)?;
    }
    Ok((total, out))
}

fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, ObjectError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| ObjectError::Format(format!("no column {name}")))?;
    if c.null_count() > 0 {
        return Err(ObjectError::Format(format!("column {name} has nulls")));
    }
    Ok(c.as_ref())
}

fn wrong_type(name: &str, want: &str) -> ObjectError {
    ObjectError::Format(format!("column {name} is not {want}"))
}

fn rows_in_range(
    b: &RecordBatch,
    from_ms: i64,
    to_ms: i64,
    out: &mut Vec<ArchivedEvent>,
) -> Result<(), ObjectError> {
    let string = |name: &str| {
        column(b, name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| wrong_type(name, "a string"))
    };
    let millis = |name: &str| {
        column(b, name)?
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| wrong_type(name, "a timestamp in milliseconds"))
    };
    let (ids, users, traces) = (string("event_id")?, string("user_id")?, string("trace_id")?);
    let (event_times, ingest_times) = (millis("event_time")?, millis("ingest_time")?);
    let protos = column(b, "event_proto")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| wrong_type("event_proto", "binary"))?;
    // Optional and nullable: absent in files written before it existed.
    let source_traces = match b.column_by_name(SOURCE_TRACE_ID) {
        Some(c) => Some(
            c.as_string_opt::<i32>()
                .ok_or_else(|| wrong_type(SOURCE_TRACE_ID, "a string"))?,
        ),
        None => None,
    };
    for i in 0..b.num_rows() {
        let event_time_ms = event_times.value(i);
        if !in_range(event_time_ms, from_ms, to_ms) {
            continue;
        }
        out.push(ArchivedEvent {
            event_id: ids.value(i).to_owned(),
            user_id: users.value(i).to_owned(),
            event_time_ms,
            ingest_time_ms: ingest_times.value(i),
            trace_id: traces.value(i).to_owned(),
            event_proto: protos.value(i).to_vec(),
            source_trace_id: source_traces
                .filter(|c| c.is_valid(i))
                .map(|c| c.value(i).to_owned()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_storage::archive::{ArchiveRow, encode};

    /// 2025-11-25T00:00:00Z.
    const MIDNIGHT: i64 = 1_764_028_800_000;
    const MINUTE: i64 = 60_000;

    fn folders(from: i64, to: i64) -> Vec<String> {
        hour_folders(from, to)
            .iter()
            .map(HourBucket::folder)
            .collect()
    }

    fn row(id: &str, event_time_ms: i64) -> ArchiveRow {
        ArchiveRow {
            event_id: id.into(),
            schema_version: 1,
            event_type: "page_view".into(),
            user_id: format!("u-{id}"),
            session_id: String::new(),
            page: "/".into(),
            referrer: String::new(),
            currency: String::new(),
            amount_micros: None,
            properties: vec![("k".into(), "v".into())],
            event_time_ms,
            ingest_time_ms: event_time_ms + 7,
            trace_id: format!("trace-{id}"),
            source: "web".into(),
            ingest_source: "shop".into(),
            kafka_topic: "t".into(),
            kafka_partition: 0,
            kafka_offset: 0,
            event_proto: format!("proto-{id}").into_bytes(),
            source_trace_id: None,
        }
    }

    #[test]
    fn a_range_from_23_59_to_00_30_lists_the_two_hours_it_touches() {
        assert_eq!(
            folders(MIDNIGHT - MINUTE, MIDNIGHT + 30 * MINUTE),
            vec!["dt=2025-11-24/hour=23", "dt=2025-11-25/hour=00"]
        );
    }

    #[test]
    fn a_range_ending_exactly_on_an_hour_does_not_list_the_hour_starting_there() {
        assert_eq!(
            folders(MIDNIGHT - MINUTE, MIDNIGHT),
            vec!["dt=2025-11-24/hour=23"]
        );
        assert_eq!(
            folders(MIDNIGHT - MINUTE, MIDNIGHT + 2 * 60 * MINUTE),
            vec![
                "dt=2025-11-24/hour=23",
                "dt=2025-11-25/hour=00",
                "dt=2025-11-25/hour=01"
            ]
        );
        // One millisecond past the hour does.
        assert_eq!(folders(MIDNIGHT - MINUTE, MIDNIGHT + 1).len(), 2);
    }

    #[test]
    fn a_range_starting_exactly_on_an_hour_starts_with_that_hour() {
        assert_eq!(
            folders(MIDNIGHT, MIDNIGHT + 60 * MINUTE),
            vec!["dt=2025-11-25/hour=00"]
        );
        assert_eq!(
            folders(MIDNIGHT, MIDNIGHT + 1),
            vec!["dt=2025-11-25/hour=00"]
        );
    }

    #[test]
    fn empty_and_inverted_ranges_list_nothing() {
        assert!(hour_folders(MIDNIGHT, MIDNIGHT).is_empty());
        assert!(hour_folders(MIDNIGHT + 1, MIDNIGHT).is_empty());
        assert_eq!(hours_spanned(MIDNIGHT, MIDNIGHT), 0);
    }

    #[test]
    fn a_range_across_days_and_a_leap_day_has_one_folder_per_hour() {
        // 2024-02-28T22:00Z .. 2024-03-01T02:00Z: 2 + 24 + 2 hours.
        let from = 1_709_157_600_000;
        let to = from + 28 * 60 * MINUTE;
        let f = folders(from, to);
        assert_eq!(f.len(), 28);
        assert_eq!(hours_spanned(from, to), 28);
        assert_eq!(f[0], "dt=2024-02-28/hour=22");
        assert_eq!(f[2], "dt=2024-02-29/hour=00");
        assert_eq!(f[27], "dt=2024-03-01/hour=01");
    }

    #[test]
    fn times_outside_the_folder_range_map_to_the_writers_clamped_folders() {
        // The writer puts pre-1970 times into the first folder and post-9999 ones into the
        // last: a range covering them lists those folders, never panics.
        assert_eq!(folders(-5, 1), vec!["dt=1970-01-01/hour=00"]);
        assert_eq!(folders(i64::MIN, -1), vec!["dt=1970-01-01/hour=00"]);
        assert_eq!(
            folders(i64::MAX - 1, i64::MAX),
            vec!["dt=9999-12-31/hour=23"]
        );
        assert_eq!(
            hour_bucket(i64::MAX).folder(),
            folders(LAST_FOLDER_HOUR_MS, LAST_FOLDER_HOUR_MS + 1)[0]
        );
        assert!(hours_spanned(i64::MIN, i64::MAX) > MAX_HOURS);
    }

    #[test]
    fn times_parse_as_rfc3339_or_epoch_milliseconds() {
        assert_eq!(parse_time("2025-11-25T00:00:00Z"), Ok(MIDNIGHT));
        assert_eq!(parse_time("2025-11-24T23:59:00.5Z"), Ok(MIDNIGHT - 59_500));
        assert_eq!(parse_time("2025-11-25T01:00:00+01:00"), Ok(MIDNIGHT));
        assert_eq!(parse_time("1764028800000"), Ok(MIDNIGHT));
        assert_eq!(parse_time(" 0 "), Ok(0));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2025-11-25").is_err());
    }

    #[test]
    fn the_range_is_half_open() {
        assert!(in_range(MIDNIGHT, MIDNIGHT, MIDNIGHT + 1));
        assert!(!in_range(MIDNIGHT + 1, MIDNIGHT, MIDNIGHT + 1));
        assert!(!in_range(MIDNIGHT - 1, MIDNIGHT, MIDNIGHT + 1));
        assert!(!in_range(MIDNIGHT, MIDNIGHT, MIDNIGHT));
    }

    #[test]
    fn decoding_keeps_only_the_rows_in_range_with_their_replay_columns() {
        let rows = vec![
            row("before", MIDNIGHT - MINUTE - 1),
            row("first", MIDNIGHT - MINUTE),
            ArchiveRow {
                source_trace_id: Some("abcd-1234".into()),
                ..row("inside", MIDNIGHT)
            },
            row("last", MIDNIGHT + 60 * MINUTE - 1),
            row("at-to", MIDNIGHT + 60 * MINUTE),
        ];
        let bytes = Bytes::from(encode(&rows).unwrap());
        let (total, kept) = decode(bytes, MIDNIGHT - MINUTE, MIDNIGHT + 60 * MINUTE).unwrap();
        assert_eq!(total, 5);
        let ids: Vec<&str> = kept.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["first", "inside", "last"]);
        assert_eq!(
            kept[1],
            ArchivedEvent {
                event_id: "inside".into(),
                user_id: "u-inside".into(),
                event_time_ms: MIDNIGHT,
                ingest_time_ms: MIDNIGHT + 7,
                trace_id: "trace-inside".into(),
                event_proto: b"proto-inside".to_vec(),
                source_trace_id: Some("abcd-1234".into()),
            }
        );
        assert_eq!(kept[0].source_trace_id, None, "null reads as None");
    }

    /// An archive file written by the writer before the `source_trace_id` column existed
    /// (the previous release's `archive::encode`, kept as written): two events at
    /// 2025-11-25T00:00Z and 00:01Z, the first with producer trace id `abcd-1234` and a
    /// W3C record trace id, the second with neither.
    const BEFORE_SOURCE_TRACE_ID: &[u8] =
        include_bytes!("../../testdata/archive-before-source-trace-id.parquet");

    #[test]
    fn a_file_written_before_the_source_trace_id_column_reads_with_none() {
        use prost::Message as _;
        let bytes = Bytes::from_static(BEFORE_SOURCE_TRACE_ID);
        let schema = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
            .unwrap()
            .schema()
            .clone();
        assert!(
            schema.field_with_name(SOURCE_TRACE_ID).is_err(),
            "the fixture must be in the old schema"
        );
        assert_eq!(schema.fields().len(), 19);
        let (total, kept) = decode(bytes, MIDNIGHT, MIDNIGHT + MS_PER_HOUR).unwrap();
        assert_eq!(total, 2);
        let got: Vec<_> = kept
            .iter()
            .map(|e| {
                (
                    e.event_id.as_str(),
                    e.user_id.as_str(),
                    e.event_time_ms,
                    e.ingest_time_ms,
                    e.trace_id.as_str(),
                    e.source_trace_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "old-1",
                    "u123",
                    MIDNIGHT,
                    MIDNIGHT + 250,
                    "0af7651916cd43dd8448eb211c80319c",
                    None
                ),
                (
                    "old-2",
                    "u124",
                    MIDNIGHT + MINUTE,
                    MIDNIGHT + MINUTE + 250,
                    "",
                    None
                ),
            ]
        );
        // The producer's id is still in the event itself, so a replay of an old file keeps it.
        let e =
            pulse_contracts::pb::events::v1::Event::decode(kept[0].event_proto.as_slice()).unwrap();
        assert_eq!(e.metadata.unwrap().trace_id, "abcd-1234");
    }

    #[test]
    fn files_that_are_not_archive_parquet_are_errors_not_panics() {
        assert!(matches!(
            decode(Bytes::from_static(b"not parquet"), 0, 1),
            Err(ObjectError::Parquet(_))
        ));
        let bytes = encode(&[row("x", 5)]).unwrap();
        assert!(decode(Bytes::from(bytes[..bytes.len() / 2].to_vec()), 0, 10).is_err());
    }
}

//! `pulsectl replay --from … --to …`: re-publishes the events of an event-time range from
//! the Parquet archive to the events topic. Only the hour folders that overlap the range
//! are listed; rows outside the range are dropped, repeated event ids (the archive is at
//! least once) are published once, and each event goes out with its original bytes, id,
//! ingest time and trace id, Confluent-framed with the topic's registered schema id.
//! Reading the archive is `replay::read`; the archive format is `pulse_storage::archive`.
//! Progress (objects read out of those listed) goes to stderr (`crate::progress`).
//! `--source-trace-id` keeps only the events whose producer trace id (`metadata.trace_id`,
//! the archive's `source_trace_id` column) is that value; rows of files written before the
//! column existed never match.

mod publish;
pub mod read;

use std::collections::HashSet;
use std::sync::Arc;

use object_store::ObjectStore;
use pulse_contracts::topics;
use pulse_contracts::wire::WireError;
use pulse_platform::config::{Problems, Validate, validate_all};
use pulse_platform::kafka::{KafkaConfig, KafkaProducer};
use pulse_platform::s3::S3Config;
use rdkafka::error::KafkaError;

use self::publish::{Publisher, topic_exists};
pub use self::publish::{Target, record, registered_schema, w3c_trace_id};
pub use self::read::{ArchivedEvent, hour_folders, in_range, parse_time};
use crate::progress::{Progress, ProgressArgs};

/// Error messages kept for the summary (the counts are always complete).
const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Start of the event-time range, inclusive: RFC 3339 (`2025-11-24T23:59:00Z`) or epoch ms.
    #[arg(long, value_parser = read::parse_time, allow_hyphen_values = true)]
    pub from: i64,
    /// End of the event-time range, exclusive: RFC 3339 or epoch ms.
    #[arg(long, value_parser = read::parse_time, allow_hyphen_values = true)]
    pub to: i64,
    /// Read the archive and report what would be published; publish nothing (needs
    /// neither Kafka nor the schema registry).
    #[arg(long)]
    pub dry_run: bool,
    /// Replay only the events whose producer trace id (`metadata.trace_id`, archived as
    /// `source_trace_id`) equals this value exactly. Archive files written before that
    /// column existed have no such ids: none of their events match.
    #[arg(long = "source-trace-id")]
    pub source_trace_id: Option<String>,
    /// The topic to publish to.
    #[arg(long, default_value = topics::EVENTS)]
    pub topic: String,
    /// Schema registry base URL (events are framed with the id registered for `<topic>-value`).
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    #[command(flatten)]
    pub registry_auth: pulse_platform::registry_auth::RegistryAuthArgs,
    #[command(flatten)]
    pub s3: S3Config,
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

impl Validate for ReplayArgs {
    fn validate(&self, p: &mut Problems) {
        p.check(
            self.from < self.to,
            "--from / --to",
            format!(
                "--from must be before --to, got {} and {}",
                crate::rfc3339(self.from),
                crate::rfc3339(self.to)
            ),
        );
        let hours = read::hours_spanned(self.from, self.to);
        p.check(
            hours <= read::MAX_HOURS,
            "--from / --to",
            format!(
                "the range spans {hours} hours; at most {} per replay (split it)",
                read::MAX_HOURS
            ),
        );
        p.check(!self.topic.is_empty(), "--topic", "must not be empty");
        p.check(
            self.source_trace_id.as_ref().is_none_or(|t| !t.is_empty()),
            "--source-trace-id",
            "must not be empty (leave the flag out to replay every event)",
        );
        if !self.dry_run {
            self.registry_auth.validate(p);
        }
        p.check(
            self.schema_registry_url.starts_with("http://")
                || self.schema_registry_url.starts_with("https://"),
            "--schema-registry-url / PULSE_SCHEMA_REGISTRY_URL",
            format!("must be an http(s) URL, got {:?}", self.schema_registry_url),
        );
    }
}

/// Why a replay could not run (failures of single objects or records are in [`Summary`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Config(#[from] pulse_platform::config::ConfigErrors),
    #[error("s3: {0}")]
    Store(#[from] object_store::Error),
    #[error("s3: listing {folder}: {source}; nothing was published")]
    List {
        folder: String,
        source: object_store::Error,
    },
    #[error(
        "schema registry: could not get the schema id of {topic}-value: {source} (is the registry reachable and the events schema registered for the topic?)"
    )]
    Registry { topic: String, source: WireError },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist; create it first (pulsectl topics create)")]
    NoTopic(String),
    #[error(
        "replay incomplete: {objects_failed} object(s) unreadable, {failed} event(s) not acknowledged; re-running the same range is safe"
    )]
    Incomplete { objects_failed: usize, failed: u64 },
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Hour folders listed.
    pub folders: usize,
    /// Parquet objects read.
    pub objects: usize,
    /// Objects that could not be read or decoded (their rows were not published).
    pub objects_failed: usize,
    /// Rows in the objects read.
    pub rows_read: u64,
    /// Rows with an event time in `[from, to)`.
    pub rows_in_range: u64,
    /// Rows in range left out because their producer trace id is not `--source-trace-id`
    /// (0 without the flag).
    pub not_matching: u64,
    /// Rows in range whose event id was already taken (published once).
    pub duplicates: u64,
    /// Events acknowledged by the broker (0 in a dry run).
    pub published: u64,
    /// Events that were not acknowledged.
    pub failed: u64,
    /// The schema id the events were framed with (none in a dry run).
    pub schema_id: Option<u32>,
    /// The first error messages.
    pub errors: Vec<String>,
}

impl Summary {
    /// Whether every object was read and every event acknowledged.
    pub fn complete(&self) -> bool {
        self.objects_failed == 0 && self.failed == 0
    }

    /// Distinct events in the range (that match `--source-trace-id`, when given): what a
    /// replay publishes.
    pub fn unique(&self) -> u64 {
        self.rows_in_range - self.not_matching - self.duplicates
    }

    pub(crate) fn note(&mut self, error: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(error);
        }
    }
}

/// Which archived events of the range a replay publishes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Select<'a> {
    /// Only events whose producer trace id (`source_trace_id`) is exactly this.
    pub source_trace_id: Option<&'a str>,
}

impl Select<'_> {
    /// Whether `e` is selected: a row without a producer trace id (none sent, or a file
    /// older than the column) never matches a `source_trace_id`.
    pub fn matches(&self, e: &ArchivedEvent) -> bool {
        self.source_trace_id
            .is_none_or(|want| e.source_trace_id.as_deref() == Some(want))
    }
}

/// Replays `[from_ms, to_ms)` from the archive in `store` (keys under `s3`'s prefix) to
/// `target`, or only counts when `target` is `None` (dry run); only the events `select`
/// keeps.
///
/// Every overlapping hour folder is listed first, so a listing failure publishes nothing.
/// Then folder by folder, in time order: its objects are read, rows in range are sorted by
/// event time (then id), and each event id not seen before in this replay is published.
/// An unreadable object is counted and skipped; every acknowledgement is awaited before
/// this returns. `progress` counts the objects read (the total is known once every folder
/// is listed), with the rows and events published so far.
pub async fn replay_archive(
    store: &Arc<dyn ObjectStore>,
    s3: &S3Config,
    from_ms: i64,
    to_ms: i64,
    select: Select<'_>,
    target: Option<Target<'_>>,
    progress: &Progress,
) -> Result<Summary, ReplayError> {
    let mut summary = Summary {
        schema_id: target.map(|t| t.schema_id),
        ..Summary::default()
    };
    let folders = read::hour_folders(from_ms, to_ms);
    let mut listed = Vec::with_capacity(folders.len());
    for (i, f) in folders.iter().enumerate() {
        progress.set_message(format!(
            "listing hour folder {} of {}",
            i + 1,
            folders.len()
        ));
        let folder = read::folder_path(s3, f);
        let keys = read::list_folder(store.as_ref(), &folder)
            .await
            .map_err(|source| ReplayError::List {
                folder: folder.to_string(),
                source,
            })?;
        listed.push(keys);
    }
    summary.folders = folders.len();
    progress.set_total(Some(listed.iter().map(|k| k.len() as u64).sum()));
    let mut publisher = target.map(Publisher::new);
    let mut seen: HashSet<String> = HashSet::new();
    for keys in listed {
        let mut rows: Vec<ArchivedEvent> = Vec::new();
        for key in keys {
            match read::read_object(store, &key, from_ms, to_ms).await {
                Ok((total, mut kept)) => {
                    summary.objects += 1;
                    summary.rows_read += total;
                    summary.rows_in_range += kept.len() as u64;
                    let before = kept.len();
                    kept.retain(|e| select.matches(e));
                    summary.not_matching += (before - kept.len()) as u64;
                    rows.extend(kept);
                }
                Err(e) => {
                    summary.objects_failed += 1;
                    summary.note(format!("{key}: {e}"));
                }
            }
            progress.inc(1);
            progress.set_message(progress_message(&summary));
        }
        // Event-time order; folders come in time order too, so the whole replay is in
        // event-time order and a processor sees no replayed event behind its watermark
        // because of the order of the archive's objects.
        rows.sort_by(|a, b| (a.event_time_ms, &a.event_id).cmp(&(b.event_time_ms, &b.event_id)));
        for e in rows {
            if !seen.insert(e.event_id.clone()) {
                summary.duplicates += 1;
                continue;
            }
            if let Some(p) = publisher.as_mut() {
                p.send(&e, &mut summary).await;
            }
        }
        progress.set_message(progress_message(&summary));
    }
    if let Some(p) = publisher.as_mut() {
        p.drain(&mut summary).await;
    }
    progress.set_message(progress_message(&summary));
    Ok(summary)
}

/// The counts beside the progress.
fn progress_message(s: &Summary) -> String {
    let mut m = format!("rows in range {}", s.rows_in_range);
    if s.not_matching > 0 {
        m.push_str(&format!(", not matching {}", s.not_matching));
    }
    m.push_str(&format!(", duplicates {}", s.duplicates));
    if s.schema_id.is_some() {
        m.push_str(&format!(", published {}, failed {}", s.published, s.failed));
    }
    if s.objects_failed > 0 {
        m.push_str(&format!(", unreadable objects {}", s.objects_failed));
    }
    m
}

/// Runs a replay as configured (validated first): the registry lookup, the topic check and
/// the producer only when not a dry run. With `progress`, shows it on stderr.
pub async fn replay(
    args: &ReplayArgs,
    progress: Option<&ProgressArgs>,
) -> Result<Summary, ReplayError> {
    validate_all(&[&args.s3, &args.kafka, args])?;
    let store = args.s3.object_store()?;
    let select = Select {
        source_trace_id: args.source_trace_id.as_deref(),
    };
    let label = if args.dry_run {
        "replay (dry run)"
    } else {
        "replay"
    };
    if args.dry_run {
        let bar = Progress::maybe(progress, label, "objects", None);
        let summary =
            replay_archive(&store, &args.s3, args.from, args.to, select, None, &bar).await;
        bar.finish();
        return summary;
    }
    let (schema_id, message_indexes) =
        registered_schema(&args.registry_auth, &args.schema_registry_url, &args.topic).await?;
    if !topic_exists(&args.kafka, &args.topic).await? {
        return Err(ReplayError::NoTopic(args.topic.clone()));
    }
    let producer = KafkaProducer::new(&args.kafka, "pulsectl-replay")?;
    let target = Target {
        producer: &producer,
        topic: &args.topic,
        schema_id,
        message_indexes: &message_indexes,
    };
    let bar = Progress::maybe(progress, label, "objects", None);
    let summary = replay_archive(
        &store,
        &args.s3,
        args.from,
        args.to,
        select,
        Some(target),
        &bar,
    )
    .await;
    bar.finish();
    summary
}

/// The summary lines `run` prints.
pub fn summary_lines(args: &ReplayArgs, s: &Summary) -> Vec<String> {
    let mut lines = vec![
        format!(
            "replay [{}, {}) from s3://{}/{} ({} hour folder(s))",
            crate::rfc3339(args.from),
            crate::rfc3339(args.to),
            args.s3.bucket,
            args.s3.prefix,
            s.folders
        ),
        format!(
            "objects read: {}, unreadable: {}, rows read: {}, rows in range: {}, duplicates skipped: {}",
            s.objects, s.objects_failed, s.rows_read, s.rows_in_range, s.duplicates
        ),
    ];
    if let Some(id) = &args.source_trace_id {
        lines.push(format!(
            "source trace id {id:?}: {} row(s) in range matched, {} did not",
            s.rows_in_range - s.not_matching,
            s.not_matching
        ));
    }
    lines.push(match s.schema_id {
        None => format!(
            "dry run: {} event(s) would be published to {}; nothing was sent",
            s.unique(),
            args.topic
        ),
        Some(id) => format!(
            "published: {}, failed: {} (to {}, schema id {id})",
            s.published, s.failed, args.topic
        ),
    });
    lines
}

pub async fn run(args: ReplayArgs, progress: &ProgressArgs) -> Result<(), crate::Error> {
    let summary = replay(&args, Some(progress)).await?;
    for e in &summary.errors {
        eprintln!("error: {e}");
    }
    for line in summary_lines(&args, &summary) {
        println!("{line}");
    }
    if summary.complete() {
        Ok(())
    } else {
        Err(ReplayError::Incomplete {
            objects_failed: summary.objects_failed,
            failed: summary.failed,
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};
    use pulse_contracts::headers;
    use pulse_platform::kafka::{AckFuture, Acked, OutRecord, ProduceError, RecordProducer};
    use pulse_storage::archive::{ArchiveRow, encode, hour_bucket, object_key};

    use super::*;

    /// 2025-11-25T00:00:00Z.
    const MIDNIGHT: i64 = 1_764_028_800_000;
    const MINUTE: i64 = 60_000;
    const FROM: i64 = MIDNIGHT - MINUTE;
    const TO: i64 = MIDNIGHT + 60 * MINUTE;

    /// Records what it is asked to send; acknowledges all but the refused event ids.
    #[derive(Default)]
    struct Fake {
        sent: Mutex<Vec<OutRecord>>,
        refuse: Vec<String>,
    }

    impl RecordProducer for Fake {
        fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError> {
            let id = headers::get_str(record.headers.as_borrowed(), headers::EVENT_ID)
                .unwrap_or_default()
                .to_owned();
            let refused = self.refuse.contains(&id);
            self.sent.lock().unwrap().push(record);
            Ok(Box::pin(async move {
                if refused {
                    Err(ProduceError::Cancelled)
                } else {
                    Ok(Acked {
                        partition: 0,
                        offset: 0,
                    })
                }
            }))
        }
    }

    impl Fake {
        fn ids(&self) -> Vec<String> {
            self.sent
                .lock()
                .unwrap()
                .iter()
                .map(|r| {
                    headers::get_str(r.headers.as_borrowed(), headers::EVENT_ID)
                        .unwrap()
                        .to_owned()
                })
                .collect()
        }
    }

    fn s3() -> S3Config {
        S3Config {
            endpoint: String::new(),
            bucket: "pulse".into(),
            prefix: "arch".into(),
            region: "us-east-1".into(),
            ..S3Config::default()
        }
    }

    fn row(id: &str, event_time_ms: i64, offset: i64) -> ArchiveRow {
        ArchiveRow {
            event_id: id.into(),
            schema_version: 1,
            event_type: "page_view".into(),
            user_id: format!("user-{id}"),
            session_id: String::new(),
            page: "/".into(),
            referrer: String::new(),
            currency: String::new(),
            amount_micros: None,
            properties: Vec::new(),
            event_time_ms,
            ingest_time_ms: event_time_ms + 250,
            trace_id: String::new(),
            source: "web".into(),
            ingest_source: "shop".into(),
            kafka_topic: "t".into(),
            kafka_partition: 0,
            kafka_offset: offset,
            event_proto: format!("proto-{id}").into_bytes(),
            source_trace_id: None,
        }
    }

    async fn put(store: &Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
        store
            .put(&s3().key(key), PutPayload::from(bytes))
            .await
            .unwrap();
    }

    /// Archives rows the way the writer lays them out (one object per hour and offset
    /// range), plus an object repeating some rows (an at-least-once re-upload), objects in
    /// the hours just outside the range holding rows that claim to be in it (the writer
    /// never puts them there: read, they would be published), a corrupt object and a file
    /// that is not Parquet.
    async fn archive() -> Arc<dyn ObjectStore> {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let hour23 = vec![
            row("before", FROM - 1, 0),
            row("first", FROM, 1),
            row("b", FROM + 30_000, 2),
            row("a", FROM + 30_000, 3),
        ];
        let hour00 = vec![
            row("midnight", MIDNIGHT, 4),
            row("last", TO - 1, 6),
            row("early", MIDNIGHT + 1, 5),
        ];
        for rows in [&hour23, &hour00] {
            let (first, last) = (rows[0].kafka_offset, rows[rows.len() - 1].kafka_offset);
            let key = object_key(&hour_bucket(rows[0].event_time_ms), "t", 0, first, last);
            put(&store, &key, encode(rows).unwrap()).await;
        }
        let again = vec![hour23[1].clone(), hour23[2].clone()];
        put(
            &store,
            &object_key(&hour_bucket(FROM), "t", 0, 1, 2),
            encode(&again).unwrap(),
        )
        .await;
        for trap in [FROM - 60 * MINUTE, TO] {
            let rows = vec![row(&format!("trap-{trap}"), MIDNIGHT + 5, 9)];
            put(
                &store,
                &object_key(&hour_bucket(trap), "t", 0, 9, 9),
                encode(&rows).unwrap(),
            )
            .await;
        }
        put(
            &store,
            &object_key(&hour_bucket(MIDNIGHT), "t", 1, 0, 0),
            b"PAR1 truncated".to_vec(),
        )
        .await;
        put(
            &store,
            "events/dt=2025-11-25/hour=00/_SUCCESS",
            b"".to_vec(),
        )
        .await;
        store
    }

    fn target(p: &Fake) -> Target<'_> {
        Target {
            producer: p,
            topic: "out",
            schema_id: 7,
            message_indexes: &[0],
        }
    }

    #[tokio::test]
    async fn replay_publishes_each_in_range_event_once_in_event_time_order() {
        let store = archive().await;
        let fake = Fake::default();
        let s = replay_archive(
            &store,
            &s3(),
            FROM,
            TO,
            Select::default(),
            Some(target(&fake)),
            &Progress::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(
            fake.ids(),
            ["first", "a", "b", "midnight", "early", "last"],
            "sorted by event time, then id; the traps and the out-of-range row left out"
        );
        assert_eq!(s.folders, 2);
        assert_eq!((s.objects, s.objects_failed), (3, 1));
        assert_eq!(s.rows_read, 4 + 3 + 2);
        assert_eq!((s.rows_in_range, s.duplicates), (8, 2));
        assert_eq!((s.published, s.failed, s.unique()), (6, 0, 6));
        assert_eq!(s.schema_id, Some(7));
        assert_eq!(s.errors.len(), 1);
        assert!(s.errors[0].contains("hour=00/t-p1-"), "{:?}", s.errors);
        assert!(
            !s.complete(),
            "an unreadable object makes the replay incomplete"
        );
        let sent = fake.sent.lock().unwrap();
        let r = &sent[3];
        assert_eq!(r.topic, "out");
        assert_eq!(r.key.as_deref(), Some(&b"user-midnight"[..]));
        assert_eq!(
            r.payload,
            pulse_contracts::wire::frame(7, &[0], b"proto-midnight")
        );
        assert_eq!(
            headers::ingest_ts_ms(r.headers.as_borrowed()),
            Some(MIDNIGHT + 250)
        );
    }

    #[tokio::test]
    async fn a_dry_run_counts_the_same_and_publishes_nothing() {
        let store = archive().await;
        let s = replay_archive(
            &store,
            &s3(),
            FROM,
            TO,
            Select::default(),
            None,
            &Progress::hidden(),
        )
        .await
        .unwrap();
        assert_eq!((s.rows_in_range, s.duplicates, s.unique()), (8, 2, 6));
        assert_eq!((s.published, s.schema_id), (0, None));
    }

    #[tokio::test]
    async fn unacknowledged_events_are_counted_and_the_rest_still_published() {
        let store = archive().await;
        let fake = Fake {
            refuse: vec!["early".into()],
            ..Fake::default()
        };
        let s = replay_archive(
            &store,
            &s3(),
            FROM,
            MIDNIGHT + 2,
            Select::default(),
            Some(target(&fake)),
            &Progress::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(fake.ids(), ["first", "a", "b", "midnight", "early"]);
        assert_eq!((s.published, s.failed), (4, 1));
        assert!(!s.complete());
        assert!(
            s.errors.iter().any(|e| e.contains("not acknowledged")),
            "{:?}",
            s.errors
        );
    }

    #[tokio::test]
    async fn a_range_with_no_archive_publishes_nothing_and_is_complete() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let fake = Fake::default();
        let s = replay_archive(
            &store,
            &s3(),
            FROM,
            TO,
            Select::default(),
            Some(target(&fake)),
            &Progress::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(s.folders, 2);
        assert_eq!((s.objects, s.published), (0, 0));
        assert!(s.complete());
        assert!(fake.ids().is_empty());
    }

    #[test]
    fn replay_parses_times_and_flattened_settings() {
        use clap::Parser;
        let cli = crate::Cli::parse_from([
            "pulsectl",
            "replay",
            "--from",
            "2025-11-24T23:59:00Z",
            "--to",
            "1764032400000",
            "--dry-run",
            "--s3-prefix",
            "archive",
            "--kafka-brokers",
            "k:9092",
        ]);
        let crate::Command::Replay(args) = cli.command else {
            panic!("not replay")
        };
        assert_eq!((args.from, args.to, args.dry_run), (FROM, TO, true));
        assert_eq!(args.topic, "pulse.events.v1");
        assert_eq!(args.s3.prefix, "archive");
        assert_eq!(args.kafka.brokers, "k:9092");
        assert!(validate_all(&[args.as_ref()]).is_ok());
        assert!(
            crate::Cli::try_parse_from(["pulsectl", "replay", "--from", "1", "--to", "soon"])
                .is_err()
        );
        assert!(crate::Cli::try_parse_from(["pulsectl", "replay", "--from", "1"]).is_err());
    }

    #[test]
    fn inverted_and_too_long_ranges_are_refused() {
        use clap::Parser;
        let args = |from: &str, to: &str| {
            let cli = crate::Cli::parse_from(["pulsectl", "replay", "--from", from, "--to", to]);
            match cli.command {
                crate::Command::Replay(a) => a,
                _ => panic!("not replay"),
            }
        };
        let errors = validate_all(&[args("10", "10").as_ref()]).unwrap_err();
        assert!(
            errors.to_string().contains("--from must be before --to"),
            "{errors}"
        );
        let year = 366 * 24 * 3_600_000_i64;
        assert!(validate_all(&[args("0", &year.to_string()).as_ref()]).is_ok());
        let errors = validate_all(&[args("0", &(year + 1).to_string()).as_ref()]).unwrap_err();
        assert!(errors.to_string().contains("8785 hours"), "{errors}");
    }

    #[test]
    fn the_summary_names_the_range_and_what_was_published() {
        use clap::Parser;
        let cli = crate::Cli::parse_from([
            "pulsectl",
            "replay",
            "--from",
            &FROM.to_string(),
            "--to",
            &TO.to_string(),
        ]);
        let crate::Command::Replay(args) = cli.command else {
            panic!("not replay")
        };
        let mut s = Summary {
            folders: 2,
            objects: 3,
            rows_read: 9,
            rows_in_range: 8,
            duplicates: 2,
            ..Summary::default()
        };
        let lines = summary_lines(&args, &s);
        assert_eq!(
            lines[0],
            "replay [2025-11-24T23:59:00Z, 2025-11-25T01:00:00Z) from s3://pulse/ (2 hour folder(s))"
        );
        assert_eq!(
            lines[1],
            "objects read: 3, unreadable: 0, rows read: 9, rows in range: 8, duplicates skipped: 2"
        );
        assert_eq!(
            lines[2],
            "dry run: 6 event(s) would be published to pulse.events.v1; nothing was sent"
        );
        s.schema_id = Some(4);
        s.published = 6;
        assert_eq!(
            summary_lines(&args, &s)[2],
            "published: 6, failed: 0 (to pulse.events.v1, schema id 4)"
        );
    }

    #[tokio::test]
    async fn a_source_trace_id_selects_only_the_events_that_carry_it() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let traced = |id: &str, t: i64, off: i64, trace: Option<&str>| ArchiveRow {
            source_trace_id: trace.map(str::to_owned),
            ..row(id, t, off)
        };
        let rows = vec![
            traced("x1", FROM, 0, Some("abcd-1234")),
            traced("y", FROM + 1, 1, Some("abcd-12345")),
            traced("none", FROM + 2, 2, None),
            traced("x2", MIDNIGHT, 3, Some("abcd-1234")),
            traced("x-out", TO, 4, Some("abcd-1234")),
        ];
        put(
            &store,
            &object_key(&hour_bucket(FROM), "t", 0, 0, 4),
            encode(&rows).unwrap(),
        )
        .await;
        // x1 again in another object (at least once): still published once.
        put(
            &store,
            &object_key(&hour_bucket(FROM), "t", 1, 0, 0),
            encode(&rows[..1]).unwrap(),
        )
        .await;
        let fake = Fake::default();
        let select = Select {
            source_trace_id: Some("abcd-1234"),
        };
        let s = replay_archive(
            &store,
            &s3(),
            FROM,
            TO,
            select,
            Some(target(&fake)),
            &Progress::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(fake.ids(), ["x1", "x2"], "exact match only, in range");
        assert_eq!((s.rows_in_range, s.not_matching, s.duplicates), (5, 2, 1));
        assert_eq!((s.unique(), s.published), (2, 2));
        let dry = replay_archive(&store, &s3(), FROM, TO, select, None, &Progress::hidden())
            .await
            .unwrap();
        assert_eq!((dry.unique(), dry.not_matching, dry.published), (2, 2, 0));
        let nobody = Select {
            source_trace_id: Some("abcd"),
        };
        let none = replay_archive(&store, &s3(), FROM, TO, nobody, None, &Progress::hidden())
            .await
            .unwrap();
        assert_eq!((none.unique(), none.not_matching), (0, 5));
    }

    #[test]
    fn an_empty_source_trace_id_is_refused_naming_the_flag() {
        use clap::Parser;
        let cli = crate::Cli::parse_from([
            "pulsectl",
            "replay",
            "--from",
            "0",
            "--to",
            "1",
            "--source-trace-id",
            "",
        ]);
        let crate::Command::Replay(args) = cli.command else {
            panic!("not replay")
        };
        let errors = validate_all(&[args.as_ref()]).unwrap_err().to_string();
        assert!(errors.contains("--source-trace-id"), "{errors}");
    }

    #[test]
    fn keys_are_listed_under_the_prefix() {
        let f = read::folder_path(&s3(), &hour_bucket(MIDNIGHT));
        assert_eq!(f, Path::from("arch/events/dt=2025-11-25/hour=00"));
    }
}

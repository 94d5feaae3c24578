//! `pulsectl replay` against the real broker, s3s-fs and an in-process schema registry:
//! events archived by the real Parquet sink (plus an at-least-once re-upload and objects in
//! the hours just outside the range) are re-published for a sub-range into a fresh topic —
//! exactly the events in range, each once, with their original ids, bytes, keys and ingest
//! times, framed with the topic's registered schema id; a dry run publishes nothing, and a
//! topic without a registered schema publishes nothing and fails. `--source-trace-id`
//! re-publishes only the events with that producer trace id; rows of archive files older
//! than the `source_trace_id` column never match it.

use std::collections::{BTreeMap, BTreeSet};

use clap::Parser;
use object_store::{ObjectStoreExt, PutPayload};
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, trace_context, wire};
use pulse_platform::kafka::{KafkaProducer, TopicSpec};
use pulse_storage::archive::{ArchiveRow, encode, hour_bucket, object_key};
use pulse_tests::short_unique;
use pulsectl::replay::{ReplayArgs, ReplayError, read, replay};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};

use crate::support::{archive, child_process, cleanup, events, kafka, registry};

/// 2025-11-25T00:00:00Z.
const MIDNIGHT: i64 = 1_764_028_800_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
/// The replayed range: from 23:59 to 01:00 exactly.
const FROM: i64 = MIDNIGHT - MINUTE;
const TO: i64 = MIDNIGHT + HOUR;

/// Event `id` at `event_time_ms`; every other one carries no W3C trace (only a producer
/// trace id in its metadata).
fn event(id: &str, user: &str, event_time_ms: i64) -> ev::Event {
    events::event(id, user, event_time_ms)
        .session(format!("s-{user}"))
        .page(format!("/p/{id}"))
        .trace_id(format!("producer-{id}"))
        .source("web")
        .ingested(event_time_ms + 321, "shop")
        .build()
}

/// What was archived for one event id.
#[derive(Debug, Clone)]
struct Archived {
    user: String,
    proto: Vec<u8>,
    ingest_ms: i64,
    /// The W3C trace id of its record, if it had one.
    w3c_trace: Option<String>,
}

/// Sends `e` framed as ingest does (schema id 1 on the source topic), with a
/// `traceparent` when `trace` is given.
async fn send(p: &KafkaProducer, topic: &str, partition: i32, e: &ev::Event, trace: Option<&str>) {
    let id = [(headers::EVENT_ID, e.event_id.as_str())];
    archive::send_event(p, topic, partition, e, &id, trace).await;
}

/// Runs the real Parquet sink on `topic` until it committed every record, under `prefix`.
async fn archive_with_the_parquet_sink(topic: &str, dlq: &str, prefix: &str) {
    let group = pulse_tests::unique("rp_group");
    let cfg = archive::parquet_config(
        topic,
        dlq,
        &group,
        prefix,
        &[
            "--kafka-partitions",
            "2",
            "--clickhouse-url",
            "http://127.0.0.1:1",
            "--parquet-freshness",
            "false",
            "--parquet-max-age-ms",
            "200",
        ],
    );
    let sink = archive::Sink::start(&cfg).await;
    archive::wait_committed_to_end("replay-test", &group, topic, 2).await;
    sink.stop().await;
}

/// Writes `rows` as one archive object of `hour_of` (at `partition`, offsets 0..=0).
async fn put_object(prefix: &str, hour_of: i64, topic: &str, partition: i32, rows: &[ArchiveRow]) {
    let mut s3 = pulse_tests::s3();
    s3.prefix = prefix.to_owned();
    let key = s3.key(&object_key(&hour_bucket(hour_of), topic, partition, 0, 0));
    s3.object_store()
        .unwrap()
        .put(&key, PutPayload::from(encode(rows).unwrap()))
        .await
        .unwrap();
}

/// Every archived row under `prefix` with an event time in `[from, to)`, read as replay
/// reads them.
async fn read_archive(prefix: &str, from: i64, to: i64) -> Vec<read::ArchivedEvent> {
    let mut s3 = pulse_tests::s3();
    s3.prefix = prefix.to_owned();
    let store = s3.object_store().unwrap();
    let mut out = Vec::new();
    for bucket in read::hour_folders(from, to) {
        let keys = read::list_folder(store.as_ref(), &read::folder_path(&s3, &bucket))
            .await
            .unwrap();
        for key in keys {
            out.extend(read::read_object(&store, &key, from, to).await.unwrap().1);
        }
    }
    out
}

/// Every record of `topic` (all partitions, from the beginning to the current end).
async fn read_all(topic: &str) -> Vec<OwnedMessage> {
    kafka::read_to_end(&pulse_tests::kafka(), topic).await
}

fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// `pulsectl replay` and its flags for the range, `topic`, `registry` and the archive under
/// `prefix`, then `extra`.
fn argv(prefix: &str, topic: &str, registry: &str, extra: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "pulsectl",
        "replay",
        "--from",
        "2025-11-24T23:59:00Z",
        "--to",
        &TO.to_string(),
        "--topic",
        topic,
        "--schema-registry-url",
        registry,
        "--kafka-brokers",
        &pulse_tests::kafka().brokers,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(archive::s3_flags(prefix));
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

fn args(prefix: &str, topic: &str, registry: &str, extra: &[&str]) -> ReplayArgs {
    match pulsectl::Cli::parse_from(argv(prefix, topic, registry, extra)).command {
        pulsectl::Command::Replay(a) => *a,
        other => panic!("not replay: {other:?}"),
    }
}

#[tokio::test]
async fn replay_republishes_exactly_the_archived_events_of_the_range_once_with_their_ids() {
    let kafka = pulse_tests::kafka();
    let source = short_unique("rp_src");
    let dlq = pulse_tests::unique("rp_dlq");
    let target = pulse_tests::unique("rp_target");
    let unregistered = pulse_tests::unique("rp_unreg");
    let traced = pulse_tests::unique("rp_traced");
    let _topics = cleanup::Topics::create(&[
        TopicSpec::new(&source, 2),
        TopicSpec::new(&dlq, 2),
        TopicSpec::new(&target, 2),
        TopicSpec::new(&unregistered, 2),
        TopicSpec::new(&traced, 2),
    ])
    .await;
    let registry = registry::start(&kafka).await;
    let registry_url = format!("http://{}", registry.addr);
    // Another schema first, so the events schema's id is not simply the first one.
    let mut ids = Vec::new();
    for (subject, schema) in [
        (&dlq, pulse_contracts::schemas::AGGREGATES.source),
        (&target, pulse_contracts::schemas::EVENTS.source),
        (&traced, pulse_contracts::schemas::EVENTS.source),
    ] {
        let r: serde_json::Value = registry::register(&registry_url, subject, schema)
            .await
            .json()
            .await
            .unwrap();
        ids.push(u32::try_from(r["id"].as_u64().unwrap()).unwrap());
    }
    let schema_id = ids[1];
    assert_ne!(ids[0], schema_id);

    // The archive: events on both sides of every edge of [23:59, 01:00), across midnight.
    let times: [(&str, i64); 9] = [
        ("e-22h", FROM - HOUR),
        ("e-before", FROM - 1),
        ("e-from", FROM),
        ("e-2359", MIDNIGHT - 1),
        ("e-0000", MIDNIGHT),
        ("e-0030", MIDNIGHT + 30 * MINUTE),
        ("e-last", TO - 1),
        ("e-to", TO),
        ("e-02h", TO + HOUR),
    ];
    let producer = KafkaProducer::new(&kafka, "replay-test").unwrap();
    let mut archived: BTreeMap<String, Archived> = BTreeMap::new();
    for (i, (id, t)) in times.iter().enumerate() {
        let user = format!("u{}", i % 3);
        let e = event(id, &user, *t);
        let trace = (i % 2 == 0).then(|| format!("{:032x}", 0xfeed_0000 + i));
        send(&producer, &source, (i % 2) as i32, &e, trace.as_deref()).await;
        archived.insert(
            (*id).to_owned(),
            Archived {
                user,
                proto: e.encode_to_vec(),
                ingest_ms: t + 321,
                w3c_trace: trace,
            },
        );
    }
    // A producer-side duplicate: the same event sent twice is two records, two rows.
    let again = event("e-2359", &archived["e-2359"].user, MIDNIGHT - 1);
    send(&producer, &source, 1, &again, None).await;
    let prefix = short_unique("rp");
    archive_with_the_parquet_sink(&source, &dlq, &prefix).await;
    // The archive reader sees the producer's trace id in the `source_trace_id` column of
    // every object the sink wrote.
    let archived_rows = read_archive(&prefix, FROM - HOUR, TO + 2 * HOUR).await;
    assert_eq!(archived_rows.len(), times.len() + 1, "{archived_rows:?}");
    for r in &archived_rows {
        assert_eq!(
            r.source_trace_id.as_deref(),
            Some(format!("producer-{}", r.event_id).as_str()),
            "{}",
            r.event_id
        );
    }

    // An at-least-once re-upload: rows of e-from and e-0030 again, in another object.
    let row = |id: &str| {
        let e = ev::Event::decode(archived[id].proto.as_slice()).unwrap();
        ArchiveRow::from_event(&e, &archived[id].proto, &source, 7, 0, None)
    };
    put_object(&prefix, FROM, &source, 7, &[row("e-from")]).await;
    put_object(&prefix, MIDNIGHT, &source, 7, &[row("e-0030")]).await;
    // Objects in the hours just outside the range whose rows claim to be inside it: the
    // writer never puts them there, so they are published only if those hours are listed.
    for (hour, id) in [(FROM - HOUR, "trap-22h"), (TO, "trap-01h")] {
        let e = event(id, "u-trap", MIDNIGHT + 1);
        let trap = ArchiveRow::from_event(&e, &e.encode_to_vec(), &source, 8, 0, None);
        put_object(&prefix, hour, &source, 8, &[trap]).await;
    }

    let expected: BTreeSet<&str> = ["e-from", "e-2359", "e-0000", "e-0030", "e-last"].into();

    // A dry run reads and counts the same, and publishes nothing.
    let dry = replay(&args(&prefix, &target, &registry_url, &["--dry-run"]), None)
        .await
        .unwrap();
    assert_eq!(dry.folders, 2, "23:00 and 00:00 only");
    assert_eq!(dry.rows_in_range, 5 + 1 + 2, "{dry:?}");
    assert_eq!((dry.duplicates, dry.unique()), (3, 5), "{dry:?}");
    assert_eq!((dry.published, dry.objects_failed), (0, 0));
    assert!(read_all(&target).await.is_empty(), "a dry run published");

    // The same dry run as a child process with stderr on a pipe: its progress in plain lines
    // on stderr (objects read of those listed), the summary alone on stdout.
    let cmd = argv(
        &prefix,
        &target,
        &registry_url,
        &["--dry-run", "--progress", "plain"],
    );
    let out = tokio::process::Command::new(child_process::binary("pulsectl"))
        .args(&cmd[1..])
        .env_remove("PULSE_PROGRESS")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "replay (dry run): done, {} objects in ",
            dry.objects
        )) && stderr.contains(&format!("rows in range {}", dry.rows_in_range)),
        "{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "the summary only:\n{stdout}");
    assert!(
        lines[2].starts_with("dry run: 5 event(s) would be published"),
        "{stdout}"
    );

    // A topic whose subject has no schema: refused before anything is published.
    let err = replay(&args(&prefix, &unregistered, &registry_url, &[]), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::Registry { .. }), "{err}");
    assert!(read_all(&unregistered).await.is_empty());

    let s = replay(&args(&prefix, &target, &registry_url, &[]), None)
        .await
        .unwrap();
    assert!(s.complete(), "{s:?}");
    assert_eq!((s.published, s.failed, s.duplicates), (5, 0, 3), "{s:?}");
    assert_eq!(s.objects, dry.objects);
    assert_eq!(s.schema_id, Some(schema_id));

    let records = read_all(&target).await;
    let got: Vec<&str> = records
        .iter()
        .map(|m| header(m, headers::EVENT_ID).unwrap())
        .collect();
    assert_eq!(got.len(), expected.len(), "each event once: {got:?}");
    assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), expected);
    for m in &records {
        let id = header(m, headers::EVENT_ID).unwrap();
        let a = &archived[id];
        let framed = wire::unframe(m.payload().unwrap()).unwrap();
        assert_eq!(framed.schema_id, schema_id, "{id}");
        assert_eq!(framed.message_indexes, vec![0]);
        assert_eq!(
            framed.payload,
            a.proto.as_slice(),
            "{id}: the original bytes"
        );
        let replayed = ev::Event::decode(framed.payload).unwrap();
        assert_eq!(
            replayed.event_id, id,
            "the header names the event in the value"
        );
        // The producer's trace id travels in the event: stored again as `source_trace_id`.
        assert_eq!(
            replayed.metadata.unwrap().trace_id,
            format!("producer-{id}"),
            "{id}: the producer's trace id"
        );
        assert_eq!(m.key(), Some(a.user.as_bytes()));
        assert_eq!(
            header(m, headers::INGEST_TS),
            Some(a.ingest_ms.to_string().as_str()),
            "{id}: the original ingest time"
        );
        assert_eq!(header(m, headers::REPLAY), Some("1"));
        let trace = trace_context::trace_id_hex(&trace_context::extract(m.headers()))
            .unwrap_or_else(|| panic!("{id} has no valid traceparent"));
        match &a.w3c_trace {
            Some(original) => assert_eq!(&trace, original, "{id}: the original trace"),
            None => assert_eq!(trace.len(), 32, "{id}: a new trace"),
        }
    }
    // The same key goes to the same partition as ingest's key hashing would send it: each
    // user's replayed events share one partition.
    let mut partition_of: BTreeMap<&[u8], BTreeSet<i32>> = BTreeMap::new();
    for m in &records {
        partition_of
            .entry(m.key().unwrap())
            .or_default()
            .insert(m.partition());
    }
    assert!(
        partition_of.values().all(|p| p.len() == 1),
        "{partition_of:?}"
    );

    // One producer trace id: e-0030 is archived twice (the re-upload), published once; a
    // trace id that is only a prefix of others, or of no event, selects nothing.
    let dry = replay(
        &args(
            &prefix,
            &traced,
            &registry_url,
            &["--dry-run", "--source-trace-id", "producer-e-0030"],
        ),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (
            dry.rows_in_range,
            dry.not_matching,
            dry.duplicates,
            dry.unique()
        ),
        (8, 6, 1, 1),
        "{dry:?}"
    );
    for nobody in ["producer-e", "producer-e-22h", "e-0030"] {
        let s = replay(
            &args(
                &prefix,
                &traced,
                &registry_url,
                &["--dry-run", "--source-trace-id", nobody],
            ),
            None,
        )
        .await
        .unwrap();
        assert_eq!((s.unique(), s.not_matching), (0, 8), "{nobody}: {s:?}");
    }
    assert!(read_all(&traced).await.is_empty(), "a dry run published");
    let s = replay(
        &args(
            &prefix,
            &traced,
            &registry_url,
            &["--source-trace-id", "producer-e-0030"],
        ),
        None,
    )
    .await
    .unwrap();
    assert!(s.complete(), "{s:?}");
    assert_eq!(
        (s.published, s.not_matching, s.duplicates),
        (1, 6, 1),
        "{s:?}"
    );
    let records = read_all(&traced).await;
    let got: Vec<&str> = records
        .iter()
        .map(|m| header(m, headers::EVENT_ID).unwrap())
        .collect();
    assert_eq!(got, ["e-0030"]);
    let framed = wire::unframe(records[0].payload().unwrap()).unwrap();
    assert_eq!(framed.payload, archived["e-0030"].proto.as_slice());
    registry.stop().await.unwrap();
}

/// An archive object written by the previous release's writer (no `source_trace_id`
/// column; kept as it wrote it): `old-1` (producer trace id `abcd-1234`) at
/// 2025-11-25T00:00Z and `old-2` (none) a minute later.
const BEFORE_SOURCE_TRACE_ID: &[u8] =
    include_bytes!("../../../crates/pulsectl/testdata/archive-before-source-trace-id.parquet");

#[tokio::test]
async fn objects_of_the_previous_and_the_current_archive_schema_are_read_side_by_side() {
    let prefix = short_unique("rp_upg");
    let topic = "pulse.events.v1";
    // The old object where the previous writer left it, and a new one in the same folder.
    let mut s3 = pulse_tests::s3();
    s3.prefix = prefix.clone();
    let key = s3.key(&object_key(&hour_bucket(MIDNIGHT), topic, 0, 120, 121));
    s3.object_store()
        .unwrap()
        .put(&key, PutPayload::from(BEFORE_SOURCE_TRACE_ID.to_vec()))
        .await
        .unwrap();
    let e = events::event("new-1", "u1", MIDNIGHT + 2 * MINUTE)
        .trace_id("abcd-5678")
        .ingested(MIDNIGHT + 2 * MINUTE + 5, "shop")
        .build();
    let row = ArchiveRow::from_event(&e, &e.encode_to_vec(), topic, 1, 0, None);
    put_object(&prefix, MIDNIGHT, topic, 1, &[row]).await;

    let mut rows = read_archive(&prefix, FROM, TO).await;
    rows.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    let got: Vec<(&str, Option<&str>)> = rows
        .iter()
        .map(|r| (r.event_id.as_str(), r.source_trace_id.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("new-1", Some("abcd-5678")),
            ("old-1", None),
            ("old-2", None)
        ]
    );
    // The old object's events still carry the producer's id inside, for a replay.
    let old = ev::Event::decode(rows[1].event_proto.as_slice()).unwrap();
    assert_eq!(old.metadata.unwrap().trace_id, "abcd-1234");

    // A dry run over both reads every object and row.
    let s = replay(
        &args(&prefix, topic, "http://127.0.0.1:1", &["--dry-run"]),
        None,
    )
    .await
    .unwrap();
    assert_eq!((s.objects, s.objects_failed), (2, 0), "{s:?}");
    assert_eq!((s.rows_in_range, s.unique()), (3, 3), "{s:?}");

    // --source-trace-id: the new object's event matches its id; the old object's events
    // never match, not even by the id their event bytes carry (`abcd-1234`), since that
    // file has no `source_trace_id` column.
    for (id, want) in [("abcd-5678", 1), ("abcd-1234", 0)] {
        let s = replay(
            &args(
                &prefix,
                topic,
                "http://127.0.0.1:1",
                &["--dry-run", "--source-trace-id", id],
            ),
            None,
        )
        .await
        .unwrap();
        assert_eq!((s.objects, s.objects_failed), (2, 0), "{id}: {s:?}");
        assert_eq!(
            (s.rows_in_range, s.unique(), s.not_matching),
            (3, want, 3 - want),
            "{id}: {s:?}"
        );
    }
}

//! The Parquet archive's side of the tests that run the real sink (`writer_parquet`,
//! `pulsectl_replay`): its flags, the running sink, framed source events, and the group's
//! committed offsets.

use std::time::Duration;

use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{Acked, KafkaProducer, OutRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::wait_until;

/// Time allowed for the sink to commit everything.
const DEADLINE: Duration = Duration::from_secs(60);

/// `pulse-writer --sink parquet` flags for the test broker and S3, writing under `prefix`,
/// with short retries, then `extra`.
pub fn parquet_config(
    events: &str,
    dlq: &str,
    group: &str,
    prefix: &str,
    extra: &[&str],
) -> pulse_writer::Config {
    let kafka = pulse_tests::kafka();
    let mut args: Vec<String> = [
        "pulse-writer",
        "--sink",
        "parquet",
        "--kafka-brokers",
        &kafka.brokers,
        "--events-topic",
        events,
        "--dlq-topic",
        dlq,
        "--group-id",
        group,
        "--retry-base-ms",
        "20",
        "--retry-max-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(s3_flags(prefix));
    args.extend(extra.iter().map(|s| s.to_string()));
    pulse_writer::Config::parse_from(args)
}

/// The `--s3-*` flags naming the test S3 server, its bucket and credentials, and `prefix`.
pub fn s3_flags(prefix: &str) -> Vec<String> {
    let s3 = pulse_tests::s3();
    [
        ("--s3-endpoint", s3.endpoint.as_str()),
        ("--s3-bucket", &s3.bucket),
        (
            "--s3-access-key-file",
            &pulse_tests::secret_file("s3-access-key", s3.access_key.expose()),
        ),
        (
            "--s3-secret-key-file",
            &pulse_tests::secret_file("s3-secret-key", s3.secret_key.expose()),
        ),
        ("--s3-prefix", prefix),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v.to_owned()])
    .collect()
}

/// A Parquet sink running in a task of its own.
pub struct Sink {
    stop: CancellationToken,
    task: JoinHandle<Result<(), pulse_writer::parquet_sink::ParquetSinkError>>,
}

impl Sink {
    /// Builds the sink of `cfg` and runs it.
    pub async fn start(cfg: &pulse_writer::Config) -> Self {
        Self::run(pulse_writer::build_parquet(cfg).await.unwrap())
    }

    /// Runs `sink` (built, and perhaps altered, by the caller).
    pub fn run(sink: pulse_writer::parquet_sink::ParquetSink) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(sink.run(stop.clone()));
        Self { stop, task }
    }

    /// Stops the sink (it writes its open roll and commits) and waits for a clean exit.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Sends `e` to `partition` framed as ingest does (schema id 1, keyed by user), with its
/// ingest time, then `extra` headers, then a `traceparent` of trace id `trace` if given.
pub async fn send_event(
    p: &KafkaProducer,
    topic: &str,
    partition: i32,
    e: &ev::Event,
    extra: &[(&str, &str)],
    trace: Option<&str>,
) -> Acked {
    let ingest = e.ingest.as_ref().unwrap().ingest_timestamp_ms;
    let mut h = headers::with_str(OwnedHeaders::new(), headers::INGEST_TS, &ingest.to_string());
    for (name, value) in extra {
        h = headers::with_str(h, name, value);
    }
    if let Some(t) = trace {
        h = headers::with_str(
            h,
            headers::TRACEPARENT,
            &format!("00-{t}-00f067aa0ba902b7-01"),
        );
    }
    let mut rec = OutRecord::new(
        topic,
        Some(e.key.as_ref().unwrap().user_id.clone().into_bytes()),
        wire::frame(1, &[0], &e.encode_to_vec()),
    )
    .with_headers(h);
    rec.partition = Some(partition);
    p.send(rec, Duration::from_secs(10)).await.unwrap()
}

/// The group's committed offset per partition (-1: none).
pub fn committed(c: &BaseConsumer, topic: &str, partitions: i32) -> Vec<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// Waits (at most 60 s) until `group` has committed every record of `topic`; returns the
/// committed offsets.
pub async fn wait_committed_to_end(
    client_id: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<i64> {
    let c: BaseConsumer = pulse_tests::kafka()
        .client_config(client_id)
        .set("group.id", group)
        .create()
        .unwrap();
    let ends: Vec<i64> = (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect();
    wait_until(
        DEADLINE,
        format!("group {group} to commit {topic} to its end {ends:?}"),
        async || {
            let now = committed(&c, topic, partitions);
            if now == ends { Ok(now) } else { Err(now) }
        },
    )
    .await
}

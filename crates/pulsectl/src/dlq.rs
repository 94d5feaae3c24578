//! `pulsectl dlq inspect|redrive`: lists the records of `pulse.events.dlq.v1` with their
//! error code, detail and a preview of the original bytes, and re-submits chosen records'
//! original bytes to ingest's HTTP API (`https://` with `--ca-file` for a TLS ingest).
//! Reading the topic is `dlq::read`; talking to ingest is `ingest_client` (503/429 and lost
//! connections retried for up to a minute; a failed TLS handshake — an untrusted, expired
//! or misnamed certificate — not retried); both show their progress on stderr
//! (`crate::progress`).

pub mod read;

use std::collections::BTreeSet;
use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::config::validate_all;
use pulse_platform::kafka::KafkaConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use self::read::{ReadError, Record, preview, read_topic};
use crate::ingest_client::{Answer, ClientError, IngestArgs, Retry, SendError};
use crate::progress::{Progress, ProgressArgs};

/// Characters of the original bytes shown per record.
const PREVIEW_CHARS: usize = 120;
/// Records per redrive request.
const REDRIVE_BATCH: usize = 100;

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Print the DLQ's records (from the beginning to the current end), one per line.
    Inspect(InspectArgs),
    /// Re-submit records' original bytes to ingest's HTTP API and print its answers.
    Redrive(RedriveArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// The DLQ topic.
    #[arg(long = "topic", default_value = topics::EVENTS_DLQ)]
    pub topic: String,
    /// How long reading the topic may take.
    #[arg(long = "read-timeout", default_value = "30s", value_parser = crate::duration::parse_duration)]
    pub read_timeout: Duration,
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// At most this many records (the first ones that match).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only records with this `pulse-error-code`.
    #[arg(long)]
    pub code: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub topic: TopicArgs,
}

#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("selection").required(true).args(["offsets", "code"]))]
pub struct RedriveArgs {
    /// Records to re-submit: `partition:offset`, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_position)]
    pub offsets: Vec<(i32, i64)>,
    /// Re-submit every record with this `pulse-error-code`.
    #[arg(long)]
    pub code: Option<String>,
    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub topic: TopicArgs,
}

/// `p:o` → (partition, offset).
pub fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not partition:offset"))?;
    let p = p
        .parse()
        .map_err(|_| format!("{s:?}: {p:?} is not a partition number"))?;
    let o = o
        .parse()
        .map_err(|_| format!("{s:?}: {o:?} is not an offset"))?;
    Ok((p, o))
}

/// Why a DLQ command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("ingest: {0}")]
    Client(#[from] ClientError),
    #[error("ingest: {0}")]
    Send(#[from] SendError),
    #[error("ingest: answered {answered} results for {sent} events")]
    Answers { answered: usize, sent: usize },
}

/// The records `inspect` prints: every record of the topic, filtered by code, limited.
pub async fn inspect(
    topic: &TopicArgs,
    code: Option<&str>,
    limit: Option<usize>,
    progress: &Progress,
) -> Result<Vec<Record>, DlqError> {
    let records = read_topic(&topic.kafka, &topic.topic, topic.read_timeout, progress).await?;
    Ok(records
        .into_iter()
        .filter(|r| code.is_none_or(|c| r.code.as_deref() == Some(c)))
        .take(limit.unwrap_or(usize::MAX))
        .collect())
}

/// One text line of `inspect`.
pub fn text_line(r: &Record) -> String {
    format!(
        "{}:{}  {}  {}  {}  | {}",
        r.partition,
        r.offset,
        r.timestamp_ms
            .map_or_else(|| "-".to_owned(), crate::rfc3339),
        r.code.as_deref().unwrap_or("-"),
        r.detail.as_deref().unwrap_or("-"),
        preview(&r.payload, PREVIEW_CHARS)
    )
}

/// One JSON line of `inspect --json`.
pub fn json_line(r: &Record) -> Value {
    json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "timestamp": r.timestamp_ms.map(crate::rfc3339),
        "code": r.code,
        "detail": r.detail,
        "event_id": r.event_id,
        "bytes": r.payload.len(),
        "preview": preview(&r.payload, PREVIEW_CHARS),
    })
}

/// What became of one record on redrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redriven {
    /// Ingest's answer for the re-submitted bytes.
    Answered(Answer),
    /// Not a JSON object (protobuf from gRPC, a record the writer could not decode, or a
    /// body that was not JSON at all): not re-submitted.
    Skipped(String),
    /// The position asked for is not on the topic.
    NotFound,
}

/// Re-submits the selected records; returns each position with its outcome, in order.
/// With `progress`, shows reading the topic (records in range) and then re-submitting
/// (records to send) on stderr.
pub async fn redrive(
    args: &RedriveArgs,
    progress: Option<&ProgressArgs>,
) -> Result<Vec<((i32, i64), Redriven)>, DlqError> {
    let t = &args.topic;
    let reading = Progress::maybe(progress, "dlq read", "records", None);
    let records = read_topic(&t.kafka, &t.topic, t.read_timeout, &reading).await?;
    reading.finish();
    let wanted: BTreeSet<(i32, i64)> = args.offsets.iter().copied().collect();
    let selected: Vec<&Record> = records
        .iter()
        .filter(|r| {
            wanted.contains(&(r.partition, r.offset))
                || args
                    .code
                    .as_deref()
                    .is_some_and(|c| r.code.as_deref() == Some(c))
        })
        .collect();
    let mut out: Vec<((i32, i64), Redriven)> = Vec::new();
    let found: BTreeSet<(i32, i64)> = selected.iter().map(|r| (r.partition, r.offset)).collect();
    for pos in wanted.difference(&found) {
        out.push((*pos, Redriven::NotFound));
    }
    let mut json_records: Vec<&Record> = Vec::new();
    for r in selected {
        if let Some(size) = r.original_size {
            out.push((
                (r.partition, r.offset),
                Redriven::Skipped(format!(
                    "the DLQ kept only the first {} of {size} bytes of the original",
                    r.payload.len()
                )),
            ));
            continue;
        }
        match serde_json::from_slice::<Value>(&r.payload) {
            Ok(Value::Object(_)) => json_records.push(r),
            Ok(_) => out.push((
                (r.partition, r.offset),
                Redriven::Skipped("JSON but not an event object".into()),
            )),
            Err(_) => out.push((
                (r.partition, r.offset),
                Redriven::Skipped(
                    "not a JSON event (protobuf from gRPC, a record the writer could not decode, or an unparseable body)"
                        .into(),
                ),
            )),
        }
    }
    let ingest = args.ingest.http(Duration::from_secs(30))?;
    let sending = Progress::maybe(
        progress,
        "dlq redrive",
        "records",
        Some(json_records.len() as u64),
    );
    let skipped = out.len();
    let retry = Retry {
        max_retry: Duration::from_secs(60),
    };
    let stop = CancellationToken::new();
    for chunk in json_records.chunks(REDRIVE_BATCH) {
        let mut body = b"[".to_vec();
        for (i, r) in chunk.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&r.payload);
        }
        body.push(b']');
        let delivery = retry.run(&stop, || ingest.post(body.clone())).await;
        let answers = delivery.result?;
        if answers.len() != chunk.len() {
            return Err(DlqError::Answers {
                answered: answers.len(),
                sent: chunk.len(),
            });
        }
        for (r, a) in chunk.iter().zip(answers) {
            out.push(((r.partition, r.offset), Redriven::Answered(a)));
        }
        sending.inc(chunk.len() as u64);
        sending.set_message(redrive_message(&out[skipped..], skipped));
    }
    sending.finish();
    out.sort_by_key(|(pos, _)| *pos);
    Ok(out)
}

/// The counts beside the redrive progress: answers by status, and records not sent.
fn redrive_message(answered: &[((i32, i64), Redriven)], not_sent: usize) -> String {
    let mut by_status: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, r) in answered {
        if let Redriven::Answered(a) = r {
            *by_status.entry(a.status.as_str()).or_default() += 1;
        }
    }
    let mut parts: Vec<String> = by_status
        .iter()
        .map(|(status, n)| format!("{status} {n}"))
        .collect();
    parts.push(format!("skipped or not found {not_sent}"));
    parts.join(", ")
}

fn redriven_line((p, o): (i32, i64), r: &Redriven) -> String {
    match r {
        Redriven::Answered(a) => {
            let mut line = format!("{p}:{o}  {}  {}", a.event_id, a.status);
            if let Some(code) = &a.code {
                line.push_str(&format!(
                    "  {code}  {}: {}",
                    a.field.as_deref().unwrap_or(""),
                    a.reason.as_deref().unwrap_or("")
                ));
            }
            line
        }
        Redriven::Skipped(why) => format!("{p}:{o}  skipped: {why}"),
        Redriven::NotFound => format!("{p}:{o}  not found on the topic"),
    }
}

pub async fn run(command: DlqCommand, progress: &ProgressArgs) -> Result<(), crate::Error> {
    match command {
        DlqCommand::Inspect(args) => {
            validate_all(&[&args.topic.kafka])?;
            let reading = Progress::start(progress, "dlq read", "records", None);
            let records = inspect(&args.topic, args.code.as_deref(), args.limit, &reading).await?;
            reading.finish();
            for r in &records {
                if args.json {
                    println!("{}", json_line(r));
                } else {
                    println!("{}", text_line(r));
                }
            }
            if !args.json {
                eprintln!("{} record(s)", records.len());
            }
        }
        DlqCommand::Redrive(args) => {
            validate_all(&[&args.topic.kafka, &args.ingest])?;
            for (pos, r) in redrive(&args, Some(progress)).await? {
                println!("{}", redriven_line(pos, &r));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_as_partition_colon_offset() {
        assert_eq!(parse_position("2:17"), Ok((2, 17)));
        assert!(parse_position("2").is_err());
        assert!(parse_position("a:1").is_err());
    }

    #[test]
    fn inspect_lines_show_position_code_detail_and_preview() {
        let r = Record {
            partition: 1,
            offset: 5,
            timestamp_ms: Some(0),
            code: Some("missing_field".into()),
            detail: Some("key.user_id: is required".into()),
            event_id: Some("lg-1-3".into()),
            original_size: None,
            payload: br#"{"event_id":"lg-1-3"}"#.to_vec(),
        };
        assert_eq!(
            text_line(&r),
            r#"1:5  1970-01-01T00:00:00Z  missing_field  key.user_id: is required  | {"event_id":"lg-1-3"}"#
        );
        let j = json_line(&r);
        assert_eq!(j["code"], "missing_field");
        assert_eq!(j["offset"], 5);
        assert_eq!(j["bytes"], 21);
    }
}

//! PII end to end: the platform brought up as the README does (`scripts/dev.sh up` on free
//! ports, the debug binaries, no synthetic workload) with ingest's default PII policy and a
//! test HMAC key. Events whose user id is an e-mail address are sent — accepted ones (with
//! the address in a property too), one that arrives too late for its window, and one
//! malformed one that carries the address where the DLQ's redaction can read it — and once
//! they are stored, every place the platform keeps data is read back raw: every record
//! (key, value, headers) of every topic of the broker, every table of the `pulse` database,
//! every object of the S3 bucket (its bytes, and its Parquet rows decoded), and every log
//! file of the services. The address appears nowhere; its keyed hash, computed here as
//! ingest documents it (`hmac:` + the first 16 bytes of HMAC-SHA256 in hex), appears where
//! the user id is stored — so the test cannot pass by storing nothing.
//!
//! The one place the address may be is the DLQ record's value under `--dlq-original keep`
//! (the default): the contract keeps a rejected original unchanged for redrive
//! (README, PII). The test checks that value is exactly the bytes sent, and nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pulse_contracts::{headers, topics};
use pulse_platform::kafka::KafkaConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use serde_json::Value;

use crate::support::dev_stack::DevStack;
use crate::support::{Deadline, events, kafka, python, wait_until};

const API_KEY: &str = "pulse-dev-key";
/// The HMAC key of this test's ingest (`PULSE_INGEST_PII_HMAC_KEY`).
const HMAC_KEY: &str = "pii-test-hmac-key-4b7d1e";
/// The user id: an e-mail address, in mixed case (it must not appear in any case).
const ADDRESS: &str = "Pat.Doe@Example.org";
/// The PII policy under test: `None` is ingest's default (`--pii-policy` unset).
const POLICY: Option<&str> = None;
/// How long the pipeline may take to store what was sent.
const SETTLE: Duration = Duration::from_secs(120);

/// The pseudonym ingest gives `value` under `key`, computed independently of ingest's code
/// (Python's hmac): `hmac:` + hex of the first 16 bytes of HMAC-SHA256.
fn expected_hash(key: &str, value: &str) -> String {
    python::run(
        "import hmac, hashlib, sys\n\
         print('hmac:' + hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), \
         hashlib.sha256).hexdigest()[:32])",
        [key, value],
    )
    .trim()
    .to_owned()
}

/// The platform of `scripts/dev.sh up` with ingest's PII policy under test ([`POLICY`]:
/// unset means the default, whatever the test's own environment says) and the test's HMAC
/// key.
struct Platform(DevStack);

impl std::ops::Deref for Platform {
    type Target = DevStack;
    fn deref(&self) -> &DevStack {
        &self.0
    }
}

impl Platform {
    fn up() -> Self {
        let mut settings = vec![("PULSE_INGEST_PII_HMAC_KEY", HMAC_KEY)];
        settings.extend(POLICY.map(|p| ("PULSE_INGEST_PII_POLICY", p)));
        Self(DevStack::up(
            "pulse-pii",
            &settings,
            &["PULSE_INGEST_PII_POLICY"],
        ))
    }

    /// Posts `body` (one JSON event or an array) to ingest; its JSON answer.
    async fn post(&self, body: Vec<u8>) -> Value {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/events", self.ingest))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig::for_brokers(&self.kafka)
    }
}

/// Every topic of the broker, with every record (the current end of each).
async fn every_record(kafka: &KafkaConfig) -> Vec<(String, Vec<OwnedMessage>)> {
    let c: BaseConsumer = kafka.client_config("pulse-test-pii").create().unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let mut names: Vec<String> = md.topics().iter().map(|t| t.name().to_owned()).collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let records = kafka::read_to_end(kafka, &name).await;
        out.push((name, records));
    }
    out
}

/// A record's key, value and headers (names and values) as one byte string, for a search.
fn record_bytes(m: &OwnedMessage, with_value: bool) -> Vec<u8> {
    let mut b = m.key().unwrap_or_default().to_vec();
    if with_value {
        b.extend_from_slice(m.payload().unwrap_or_default());
    }
    if let Some(h) = m.headers() {
        for x in h.iter() {
            b.extend_from_slice(x.key.as_bytes());
            b.extend_from_slice(x.value.unwrap_or_default());
        }
    }
    b
}

/// Every file under `dir` (recursively), with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The rows of every Parquet file under `dir`, decoded (pyarrow) into JSON text per file.
fn parquet_rows(dir: &Path) -> Vec<(String, String)> {
    python::json(
        "import sys, glob, json, pyarrow.parquet as pq\n\
         out = []\n\
         for f in sorted(glob.glob(sys.argv[1] + '/**/*.parquet', recursive=True)):\n\
         \x20   rows = pq.read_table(f).to_pylist()\n\
         \x20   out.append([f, json.dumps(rows, default=str, ensure_ascii=False)])\n\
         print(json.dumps(out), flush=True)\n\
         import os; os._exit(0)  # skip teardown: pyarrow's pools can abort it",
        [dir],
    )
}

/// Whether `haystack` holds `needle`, ignoring ASCII case.
fn holds(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.to_ascii_lowercase().into_bytes();
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(&needle))
}

/// The forms of the address a store could keep: as is, and URL-encoded.
fn address_forms() -> [String; 2] {
    [ADDRESS.to_owned(), ADDRESS.replace('@', "%40")]
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_user_id_is_stored_only_as_its_hmac_in_every_topic_table_object_and_log() {
    let hash = expected_hash(HMAC_KEY, ADDRESS);
    assert!(hash.starts_with("hmac:") && hash.len() == 37, "{hash}");
    let p = Platform::up();
    let now = pulse_platform::clock::now_ms();

    // Accepted: three events of the user, the address in a property too.
    let accepted: Vec<String> = (0..3).map(|i| format!("pii-ok-{i}")).collect();
    let batch: Vec<Value> = accepted
        .iter()
        .enumerate()
        .map(|(i, id)| {
            events::event(id, ADDRESS, now - 2_000 + i as i64 * 500)
                .page("/pricing")
                .property("contact", ADDRESS)
                .json()
        })
        .collect();
    let answer = p.post(serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(answer["accepted"], 3, "{answer}");

    // Too late for its window once the processor has seen the user's events (its
    // watermark moved past the window and the allowed lateness): the late topic.
    wait_until(
        Deadline::after(SETTLE).every(Duration::from_millis(500)),
        "the processor's aggregate of the user in ClickHouse",
        async || {
            let n = p
                .clickhouse_query("SELECT count() FROM pulse.user_activity")
                .await;
            if n.trim() == "0" { Err(n) } else { Ok(()) }
        },
    )
    .await;
    let late_id = "pii-late-0";
    let late = events::event(late_id, ADDRESS, now - 10 * 60_000)
        .page("/old")
        .json();
    let answer = p.post(serde_json::to_vec(&late).unwrap()).await;
    assert_eq!(answer["accepted"], 1, "{answer}");

    // Malformed (an event type the contract refuses), the address where the DLQ's
    // redaction reads: the user id and a property.
    let mut bad = events::event("pii-bad-0", ADDRESS, now)
        .property("contact", ADDRESS)
        .json();
    bad["event_type"] = Value::from("Not A Type");
    let bad_bytes = serde_json::to_vec(&bad).unwrap();
    let answer = p.post(bad_bytes.clone()).await;
    assert_eq!(answer["rejected"], 1, "{answer}");
    let answer_text = answer.to_string();
    assert!(
        !address_forms()
            .iter()
            .any(|a| holds(answer_text.as_bytes(), a)),
        "ingest's answer repeats the address: {answer_text}"
    );

    // Stored: the four accepted events in ClickHouse and the archive, the user's
    // aggregates, the DLQ, late and checkpoint records.
    let mut stored_ids = accepted.clone();
    stored_ids.push(late_id.to_owned());
    stored_ids.sort();
    let kafka = p.kafka_config();
    let s3_root = p.state.path().join("s3");
    wait_until(
        Deadline::after(SETTLE).every(Duration::from_secs(1)),
        "the events in ClickHouse and Parquet, the user's activity, the DLQ, late and checkpoint records",
        async || {
            let ch: Vec<String> = p
                .clickhouse_query("SELECT DISTINCT event_id FROM pulse.events ORDER BY event_id")
                .await
                .lines()
                .map(str::to_owned)
                .collect();
            let activity = p
                .clickhouse_query("SELECT count() FROM pulse.user_activity")
                .await;
            let parquet = parquet_rows(&s3_root)
                .iter()
                .map(|(_, rows)| rows.clone())
                .collect::<String>();
            let in_parquet = stored_ids.iter().filter(|id| parquet.contains(*id)).count();
            let dlq = kafka::read_to_end(&kafka, topics::EVENTS_DLQ).await.len();
            let late = kafka::read_to_end(&kafka, topics::EVENTS_LATE).await.len();
            // The user's open session, in whatever form the user id has there.
            let checkpoint = kafka::read_to_end(&kafka, topics::PROCESSOR_CHECKPOINTS)
                .await
                .iter()
                .any(|m| {
                    let v = m.payload().unwrap_or_default();
                    holds(v, &hash) || holds(v, ADDRESS)
                });
            let state = format!(
                "ClickHouse ids {ch:?}, activity rows {}, Parquet {in_parquet}/{} ids, \
                 DLQ {dlq}, late {late}, checkpoint with the user: {checkpoint}",
                activity.trim(),
                stored_ids.len()
            );
            if ch == stored_ids
                && activity.trim() != "0"
                && in_parquet == stored_ids.len()
                && dlq == 1
                && late == 1
                && checkpoint
            {
                Ok(())
            } else {
                Err(state)
            }
        },
    )
    .await;

    // Every place, with what it holds; and where the user id must be the hash.
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    let mut must_hold_hash: Vec<String> = Vec::new();
    // Records keyed by the user id (checked after the search, which names every leak).
    let mut keyed_by_user: Vec<(String, Option<Vec<u8>>)> = Vec::new();

    // Kafka: every record of every topic.
    let all = every_record(&kafka).await;
    let names: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
    for t in [
        topics::EVENTS,
        topics::EVENTS_DLQ,
        topics::EVENTS_LATE,
        topics::USER_ACTIVITY,
        topics::SESSIONS,
        topics::PROCESSOR_CHECKPOINTS,
    ] {
        assert!(names.contains(&t), "no topic {t} among {names:?}");
    }
    for (topic, records) in &all {
        for m in records {
            let at = format!("topic {topic} @ {}/{}", m.partition(), m.offset());
            if topic == topics::EVENTS || topic == topics::EVENTS_DLQ {
                keyed_by_user.push((at.clone(), m.key().map(<[u8]>::to_vec)));
            }
            if topic == topics::EVENTS_DLQ {
                assert_eq!(
                    pulse_tests::header(m, headers::ERROR_CODE).as_deref(),
                    Some("invalid_event_type"),
                    "{at}"
                );
                // `--dlq-original keep` (the default): the original, unchanged, is the
                // only place the address may be. Its key and headers are searched.
                assert_eq!(
                    m.payload().unwrap_or_default(),
                    &bad_bytes[..],
                    "{at}: the DLQ keeps the original bytes"
                );
                places.push((at, record_bytes(m, false)));
                continue;
            }
            places.push((at, record_bytes(m, true)));
        }
    }
    for topic in [
        topics::EVENTS,
        topics::EVENTS_LATE,
        topics::PROCESSOR_CHECKPOINTS,
    ] {
        must_hold_hash.push(format!("topic {topic}"));
    }

    // ClickHouse: every table of the database, every row.
    let tables = p
        .clickhouse_query("SELECT name FROM system.tables WHERE database = 'pulse' ORDER BY name")
        .await;
    let tables: Vec<&str> = tables.lines().collect();
    for t in ["events", "user_activity", "sessions"] {
        assert!(tables.contains(&t), "no table {t} among {tables:?}");
    }
    for t in &tables {
        let rows = p
            .clickhouse_query(&format!("SELECT * FROM pulse.`{t}` FORMAT TabSeparated"))
            .await;
        places.push((format!("table pulse.{t}"), rows.into_bytes()));
    }
    must_hold_hash.extend([
        "table pulse.events".into(),
        "table pulse.user_activity".into(),
    ]);

    // S3: every object's bytes, and every Parquet file's rows decoded (its columns are
    // compressed, so the bytes alone would hide the address).
    let objects = files(&s3_root);
    assert!(
        objects
            .iter()
            .any(|(f, _)| f.extension().is_some_and(|e| e == "parquet")),
        "no Parquet object under {}",
        s3_root.display()
    );
    for (f, bytes) in objects {
        places.push((format!("object {}", f.display()), bytes));
    }
    let decoded = parquet_rows(&s3_root);
    for (f, rows) in &decoded {
        let at = format!("Parquet rows of {f}");
        if stored_ids.iter().any(|id| rows.contains(id.as_str())) {
            must_hold_hash.push(at.clone());
        }
        places.push((at, rows.clone().into_bytes()));
    }

    // The services' logs.
    let logs = files(&p.state.path().join("logs"));
    let services = ["ingest", "processor", "writer-clickhouse", "writer-parquet"];
    for s in services {
        assert!(
            logs.iter()
                .any(|(f, _)| f.file_stem().is_some_and(|n| n == s)),
            "no log of {s}"
        );
    }
    for (f, bytes) in logs {
        places.push((format!("log {}", f.display()), bytes));
    }

    let leaks: Vec<&str> = places
        .iter()
        .filter(|(_, bytes)| address_forms().iter().any(|a| holds(bytes, a)))
        .map(|(at, _)| at.as_str())
        .collect();
    assert!(
        leaks.is_empty(),
        "the address {ADDRESS} is stored in clear in {} place(s): {leaks:#?}",
        leaks.len()
    );
    // The events and the DLQ record are keyed by the pseudonym.
    for (at, key) in &keyed_by_user {
        assert_eq!(
            key.as_deref(),
            Some(hash.as_bytes()),
            "{at}: the key is not the pseudonym"
        );
    }
    assert_eq!(
        keyed_by_user.len(),
        5,
        "4 events (one of them late) and 1 DLQ record"
    );
    for want in &must_hold_hash {
        let here = |at: &str| at == want || at.starts_with(&format!("{want} "));
        let found = places
            .iter()
            .any(|(at, bytes)| here(at) && holds(bytes, &hash));
        assert!(found, "{want}: the user id's pseudonym {hash} is not there");
    }
}

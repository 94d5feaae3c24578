//! The end-to-end test: the whole platform brought up as the README does
//! (`scripts/dev.sh up`, on free ports, with the debug binaries `scripts/test.sh` built),
//! a deterministic `pulsectl loadgen` workload with duplicates, out-of-order, late and
//! malformed events, then — once the pipeline has settled by watermark and freshness —
//! every query-API answer against the answers loadgen expects, the DLQ and late topics
//! against the events loadgen made malformed and late, the raw events in ClickHouse and in
//! the Parquet archive against every accepted event, ingest's per-`schema_version` count in
//! its live /metrics against its accepted count, and one trace id from the ingest
//! request through the processor's and the writer's spans (collected by an OTLP receiver
//! in the test).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pulse_contracts::{headers, topics};
use pulse_platform::kafka::KafkaConfig;
use pulse_tests::header;
use rdkafka::Message;
use serde_json::{Value, json};

use crate::support::child_process::binary;
use crate::support::dev_stack::DevStack;
use crate::support::wait::Text;
use crate::support::{Deadline, events, kafka, metric_sum, python, wait_until};

const TOKEN: &str = "pulse-dev-token";
const API_KEY: &str = "pulse-dev-key";
/// Sentinel users whose events, dated after the workload, move every partition's
/// watermark past the workload's last window (so its windows become final).
const SENTINELS: usize = 30;
/// The processor's allowed lateness (its default), ms.
const LATENESS_MS: i64 = 60_000;

/// The platform (`scripts/dev.sh up`), exporting its traces to `otlp`; the banner's
/// promises checked.
fn platform_up(otlp: &str) -> DevStack {
    let platform = DevStack::up("pulse-e2e", &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)], &[]);
    // The README promises these in the banner.
    for promised in ["Dashboard", "pulse-dev-token", "pulse-dev-key", "Stop:"] {
        assert!(
            platform.banner.contains(promised),
            "banner lacks {promised}:\n{}",
            platform.banner
        );
    }
    platform
}

/// Runs the deterministic workload; returns loadgen's expected answers.
fn run_loadgen(p: &DevStack, expect: &Path) -> Value {
    let out = Command::new(binary("pulsectl"))
        .args([
            "loadgen",
            "--target",
            &p.ingest,
            "--seed",
            "7",
            "--users",
            "40",
            "--rate",
            "100",
            "--duration",
            "20s",
            "--out-of-order",
            "0.05",
            "--late",
            "0.02",
            "--late-warmup-ms",
            "8000",
            "--duplicates",
            "0.03",
            "--malformed",
            "0.02",
            "--expect-out",
        ])
        .arg(expect)
        .env("PULSE_API_KEY", API_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(expect).unwrap()).unwrap()
}

/// Events dated after the workload's range for users of every partition, so every
/// partition's watermark passes the range's last window end + the allowed lateness.
async fn send_sentinels(p: &DevStack, wave: u32, after_ms: i64) -> Vec<String> {
    let ids: Vec<String> = (0..SENTINELS)
        .map(|i| format!("e2e-sentinel-{wave}-{i}"))
        .collect();
    let events: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            events::event(id, format!("sentinel-{i}"), after_ms)
                .page("/sentinel")
                .json()
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", p.ingest))
        .bearer_auth(API_KEY)
        .json(&events)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "sentinels refused: {body}");
    assert_eq!(body["accepted"], SENTINELS, "sentinels: {body}");
    ids
}

async fn query(p: &DevStack, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", p.query))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert!(status.is_success(), "GET {path}: {status} {body}");
    body
}

fn rfc3339_ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The query API's answers in the shape of loadgen's expectations (times as epoch ms,
/// empty active-user buckets left out).
async fn answers(p: &DevStack, exp: &Value) -> Value {
    let (from, to) = (
        exp["range"]["from_ms"].as_i64().unwrap(),
        exp["range"]["to_ms"].as_i64().unwrap(),
    );
    let range = format!("from={from}&to={to}");
    let au = query(p, &format!("/v1/active_users?{range}&step=1m")).await;
    let active: Vec<Value> = au["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pt| pt["active_users"].as_u64() != Some(0))
        .map(|pt| json!({"ts_ms": rfc3339_ms(&pt["ts"]), "active_users": pt["active_users"]}))
        .collect();
    let rev = query(p, &format!("/v1/revenue?{range}&step=1m")).await;
    let revenue: Vec<Value> = rev["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pt| {
            json!({"ts_ms": rfc3339_ms(&pt["ts"]), "currency": pt["currency"], "amount": pt["amount"]})
        })
        .collect();
    let top = query(p, &format!("/v1/top_pages?{range}&limit=10")).await;
    let mut users = serde_json::Map::new();
    for user in exp["users"].as_object().unwrap().keys() {
        let u = query(p, &format!("/v1/users/{user}?{range}")).await;
        users.insert(
            user.clone(),
            json!({
                "first_seen_ms": rfc3339_ms(&u["first_seen"]),
                "last_seen_ms": rfc3339_ms(&u["last_seen"]),
                "page_views": u["page_views"],
                "events": u["events"],
                "sessions": u["sessions"],
            }),
        );
    }
    let s = query(p, &format!("/v1/sessions?{range}")).await;
    json!({
        "active_users": active,
        "revenue": revenue,
        "top_pages": top["pages"],
        "users": users,
        "sessions": {
            "sessions": s["sessions"],
            "avg_duration_seconds": s["avg_duration_seconds"],
            "p50_duration_seconds": s["p50_duration_seconds"],
            "p95_duration_seconds": s["p95_duration_seconds"],
            "avg_pages": s["avg_pages"],
        },
        "complete": au["freshness"]["complete"],
    })
}

fn expected_answers(exp: &Value) -> Value {
    let active: Vec<Value> = exp["active_users"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pt| pt["active_users"].as_u64() != Some(0))
        .cloned()
        .collect();
    json!({
        "active_users": active,
        "revenue": exp["revenue"],
        "top_pages": exp["top_pages"],
        "users": exp["users"],
        "sessions": exp["sessions"],
        "complete": true,
    })
}

/// Every record of `topic` from the beginning to its current end: its event id and error
/// code headers and its value.
async fn read_topic(kafka: &str, topic: &str) -> Vec<(Option<String>, Option<String>, Vec<u8>)> {
    kafka::read_to_end(&KafkaConfig::for_brokers(kafka), topic)
        .await
        .iter()
        .map(|m| {
            (
                header(m, headers::EVENT_ID),
                header(m, headers::ERROR_CODE),
                m.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect()
}

/// Event ids in every Parquet object of the archive (read by pyarrow from s3s-fs's folder).
fn parquet_event_ids(state: &Path) -> Vec<String> {
    python::json(
        "import sys, glob, json, pyarrow.parquet as pq\n\
         ids = []\n\
         for f in sorted(glob.glob(sys.argv[1] + '/**/*.parquet', recursive=True)):\n\
         \x20   ids += pq.read_table(f, columns=['event_id']).column('event_id').to_pylist()\n\
         print(json.dumps(ids), flush=True)\n\
         import os; os._exit(0)  # skip teardown: pyarrow's pools can abort it",
        [state.join("s3")],
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_answers_exactly_what_loadgen_expects_and_one_trace_links_the_stages() {
    let receiver = pulse_tests::otlp::Receiver::start().await.unwrap();
    let platform = platform_up(&receiver.endpoint());
    let expect_file = platform.state.path().join("expected.json");
    let exp = run_loadgen(&platform, &expect_file);

    let accepted = strings(&exp["accepted_event_ids"]);
    let late = strings(&exp["late_event_ids"]);
    let rejected: BTreeMap<String, String> = exp["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap().to_owned(),
                r["reason_code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        accepted.len() > 1_000,
        "workload too small: {}",
        accepted.len()
    );
    assert!(!late.is_empty(), "the workload has no late events");
    assert!(!rejected.is_empty(), "the workload has no malformed events");
    assert!(
        exp["duplicates"].as_u64().unwrap() > 0,
        "no duplicates sent"
    );

    // The query API calls a range complete once a final window ends at or after its end
    // (a lower bound of the processor's watermark it can see in the store). The range's
    // last minute has no events (loadgen's `to` is the end of the minute after the last
    // event), so the sentinels make windows after it: wave 1 in the minute from `to`, wave 2
    // late enough that every partition's watermark (max event time − 5 s) passes wave 1's
    // windows' end + the allowed lateness, which makes them and every window before final.
    // Both stay within ingest's 5 min future-skew limit (`to` is at most ~2 min ahead).
    let to_ms = exp["range"]["to_ms"].as_i64().unwrap();
    let mut sentinels = send_sentinels(&platform, 1, to_ms + 1_000).await;
    sentinels.extend(send_sentinels(&platform, 2, to_ms + 60_000 + LATENESS_MS + 10_000).await);

    // Settled = the query API says the range is complete and its answers stopped changing
    // into the expected ones; on the deadline, show the difference.
    let want = expected_answers(&exp);
    wait_until(
        Deadline::after(Duration::from_secs(180)).every(Duration::from_secs(1)),
        "the query API's answers to equal loadgen's expectations",
        async || {
            let got = answers(&platform, &exp).await;
            if got == want {
                return Ok(());
            }
            let mut report = String::from("the answers that differ:");
            for (key, w) in want.as_object().unwrap() {
                if &got[key] != w {
                    report.push_str(&format!(
                        "\n{key}:\n  query API: {}\n  expected:  {w}",
                        got[key]
                    ));
                }
            }
            Err(Text(report))
        },
    )
    .await;
    let fresh = query(&platform, "/v1/freshness").await;
    assert!(
        fresh["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["last_event_time"].is_null()),
        "a stage reports no freshness: {fresh}"
    );

    // The DLQ holds exactly the malformed events, each with its reason.
    let dlq = read_topic(&platform.kafka, topics::EVENTS_DLQ).await;
    let mut dlq_ids = BTreeMap::new();
    for (_, code, payload) in &dlq {
        let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let id = v["event_id"].as_str().unwrap_or("<no event_id>").to_owned();
        dlq_ids.insert(id, code.clone().unwrap_or_default());
    }
    assert_eq!(dlq.len(), rejected.len(), "DLQ records: {dlq_ids:?}");
    assert_eq!(
        dlq_ids, rejected,
        "the DLQ (left) vs loadgen's rejected events"
    );

    // The late topic holds exactly the too-late events.
    let late_records = read_topic(&platform.kafka, topics::EVENTS_LATE).await;
    let late_ids = sorted(
        late_records
            .iter()
            .map(|(id, _, _)| id.clone().unwrap_or_default())
            .collect(),
    );
    assert_eq!(
        late_ids,
        sorted(late.clone()),
        "late topic vs loadgen's late events"
    );

    // ClickHouse and the Parquet archive each hold every accepted event exactly once.
    let mut all_ids = accepted.clone();
    all_ids.extend(sentinels.iter().cloned());
    let all_ids = sorted(all_ids);
    let missing = |have: &[String]| {
        let have: BTreeSet<&String> = have.iter().collect();
        all_ids.iter().filter(|i| !have.contains(i)).count()
    };
    wait_until(
        Deadline::after(Duration::from_secs(60)).every(Duration::from_secs(1)),
        format!(
            "the {} accepted events, each once, in ClickHouse and the Parquet archive",
            all_ids.len()
        ),
        async || {
            let ch = platform.clickhouse_query("SELECT event_id FROM pulse.events FINAL ORDER BY event_id",
            )
            .await;
            let ch_ids: Vec<String> = ch.lines().map(str::to_owned).collect();
            let pq_ids = sorted(parquet_event_ids(platform.state.path()));
            if ch_ids == all_ids && pq_ids == all_ids {
                return Ok(());
            }
            Err(format!(
                "stored events differ: ClickHouse {} rows ({} missing), Parquet {} rows ({} missing)",
                ch_ids.len(),
                missing(&ch_ids),
                pq_ids.len(),
                missing(&pq_ids),
            ))
        },
    )
    .await;

    // Ingest's live /metrics counts every accepted event by the producer's schema_version
    // (loadgen and the sentinels send version 1), reconciling with its accepted count.
    let ingest_metrics = reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        platform.port("PULSE_INGEST_ADMIN_PORT")
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let by_version = |labels: &[&str]| {
        metric_sum(
            &ingest_metrics,
            "pulse_ingest_events_by_schema_version_total",
            labels,
        )
        .unwrap_or(0.0)
    };
    let accepted_total = metric_sum(
        &ingest_metrics,
        "pulse_ingest_events_total",
        &["outcome=\"accepted\""],
    )
    .unwrap_or(0.0);
    assert!(
        accepted_total >= all_ids.len() as f64,
        "ingest counted {accepted_total} accepted events, {} are stored",
        all_ids.len()
    );
    assert_eq!(
        (by_version(&["version=\"1\""]), by_version(&[])),
        (accepted_total, accepted_total),
        "accepted events by schema_version vs all accepted events"
    );

    // One trace id links the ingest request to the processor's and the writer's spans.
    // The probe is an event from the middle of the run (not the first record of anything).
    let non_late: BTreeSet<&String> = late.iter().collect();
    let counted: Vec<&String> = accepted
        .iter()
        .filter(|id| !non_late.contains(id))
        .collect();
    let probe = counted[counted.len() / 2];
    let trace_id = platform
        .clickhouse_query(&format!(
            "SELECT any(trace_id) FROM pulse.events FINAL WHERE event_id = '{probe}'"
        ))
        .await
        .trim()
        .to_owned();
    assert_eq!(
        trace_id.len(),
        32,
        "event {probe} has no W3C trace id: {trace_id:?}"
    );
    // The ClickHouse writer's span of this very record, not only a span of a batch.
    wait_until(
        Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(500)),
        format!("spans of trace {trace_id} from ingest, the processor and the writer"),
        async || {
            let services: BTreeSet<String> = receiver
                .spans()
                .iter()
                .filter(|s| s.touches(&trace_id))
                .map(|s| {
                    if s.service == "writer" && s.name != "writer.record" {
                        format!("writer ({})", s.name)
                    } else {
                        s.service.clone()
                    }
                })
                .collect();
            if ["ingest", "processor", "writer"]
                .iter()
                .all(|s| services.contains(*s))
            {
                return Ok(());
            }
            Err(format!(
                "trace {trace_id} reached only {services:?} ({} spans received)",
                receiver.spans().len()
            ))
        },
    )
    .await;
}

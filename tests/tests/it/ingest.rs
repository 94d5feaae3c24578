//! The ingest service against the real broker and a real schema registry (both started
//! by scripts/test.sh / in-process): what lands on the events topic and the DLQ, with
//! which key, framing and headers, and every HTTP error path; gRPC unary and streaming.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::pb::ingest::v1::ingest_service_client::IngestServiceClient;
use pulse_contracts::pb::ingest::v1::{EventStatus, SendEventsRequest};
use pulse_contracts::{headers, trace_context, wire};
use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulse_platform::clock::now_ms;
use pulse_platform::kafka::KafkaConfig;
use pulse_tests::header;
use rdkafka::Message;
use serde_json::{Value, json};

use crate::support::ingest_server::{self, read_exactly};
use crate::support::registry::{self, Registry};
use crate::support::{Deadline, cleanup, events, grpc_meta, wait_until};

struct Harness {
    http: String,
    grpc: String,
    events_topic: String,
    dlq_topic: String,
    schema_id: u32,
    servers: Option<pulse_ingest::Servers>,
    registry: Option<Registry>,
    _topics: cleanup::Topics,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Servers stop with the runtime; explicit stops happen in tests that care.
        let _ = (&self.servers, &self.registry);
    }
}

/// This file's ingest flags: two API keys, 2 partitions, then `extra`.
fn config(kafka: &KafkaConfig, events: &str, dlq: &str, extra: &[&str]) -> pulse_ingest::Config {
    let mut args = vec!["--kafka-partitions", "2"];
    args.extend_from_slice(extra);
    ingest_server::config(
        kafka,
        "test-key=shop,other-key=app",
        "test-hmac",
        events,
        dlq,
        &args,
    )
}

async fn start(extra: &[&str]) -> Harness {
    start_with_producer_options(extra, &[]).await
}

/// [`start`], with extra librdkafka settings (`key=value`) for ingest's producer only.
async fn start_with_producer_options(extra: &[&str], producer_options: &[&str]) -> Harness {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("events");
    let dlq_topic = pulse_tests::unique("dlq");
    let cfg = config(&kafka, &events_topic, &dlq_topic, extra);
    let topics = ingest_server::create_topics(&events_topic, &dlq_topic, 1).await;
    // A real registry with the event schema registered for this topic.
    let registry = registry::start(&kafka).await;
    let url = format!("http://{}", registry.addr);
    let resp: Value =
        registry::register(&url, &events_topic, pulse_contracts::schemas::EVENTS.source)
            .await
            .json()
            .await
            .unwrap();
    let schema_id = resp["id"].as_u64().unwrap() as u32;
    let framer: Arc<dyn Framer> = Arc::new(pulse_contracts::wire::RegistryEncoder::new(&url));
    let producer_kafka = KafkaConfig {
        options: producer_options.iter().map(|o| o.to_string()).collect(),
        ..kafka.clone()
    };
    let servers = ingest_server::serve(&producer_kafka, &cfg, framer, "ingest-test").await;
    Harness {
        http: format!("http://{}/v1/events", servers.http_addr),
        grpc: format!("http://{}", servers.grpc_addr),
        events_topic,
        dlq_topic,
        schema_id,
        servers: Some(servers),
        registry: Some(registry),
        _topics: topics,
    }
}

fn event(id: &str, user: &str) -> Value {
    events::event(id, user, now_ms())
        .session("s1")
        .page("/home")
        .property("ip", "203.0.113.77")
        .property("plan", "pro")
        .source("web")
        .json()
}

/// A purchase in EUR whose event time is an RFC 3339 string.
fn purchase(id: &str, user: &str, amount_micros: i64) -> Value {
    let mut e = events::event(id, user, now_ms())
        .purchase("EUR", amount_micros)
        .json();
    e["metadata"]["event_timestamp"] = json!(chrono_like_now());
    e
}

fn chrono_like_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn post(
    url: &str,
    key: Option<&str>,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new().post(url).body(body);
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, h)
}

#[tokio::test]
async fn accepted_events_land_keyed_framed_and_traced_and_bad_ones_go_to_the_dlq() {
    let h = start(&[]).await;
    let bad = json!({ "schema_version": 1, "event_type": "purchase", "key": { "user_id": "u9" },
                      "payload": { "amount": "12.5" }, "metadata": { "event_timestamp": now_ms() } });
    let bad_bytes = serde_json::to_vec(&bad).unwrap();
    let batch = format!(
        "[{},{},{}]",
        event("e1", "u1"),
        purchase("e2", "u2", 19_990_000),
        String::from_utf8(bad_bytes.clone()).unwrap()
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, body, _) = post(
        &h.http,
        Some("test-key"),
        batch.into_bytes(),
        &[
            ("Content-Type", "application/json"),
            ("traceparent", traceparent),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{body}"
    );
    assert_eq!(body["results"][2]["status"], "rejected");
    assert_eq!(
        body["results"][2]["error"]["field"], "payload.currency",
        "{body}"
    );

    let records = read_exactly(&h.events_topic, 2).await;
    let mut seen = Vec::new();
    for m in &records {
        let framed = wire::unframe(m.payload().unwrap()).unwrap();
        assert_eq!(
            framed.schema_id, h.schema_id,
            "framed with the registered schema id"
        );
        let e = ev::Event::decode(framed.payload).unwrap();
        assert_eq!(
            m.key().unwrap(),
            e.key.as_ref().unwrap().user_id.as_bytes(),
            "keyed by user id"
        );
        assert_eq!(
            header(m, headers::EVENT_ID).as_deref(),
            Some(e.event_id.as_str())
        );
        let ingest_ts: i64 = header(m, headers::INGEST_TS).unwrap().parse().unwrap();
        assert_eq!(e.ingest.as_ref().unwrap().ingest_timestamp_ms, ingest_ts);
        assert_eq!(e.ingest.as_ref().unwrap().ingest_source, "shop");
        let cx = trace_context::extract(m.headers());
        assert_eq!(
            trace_context::trace_id_hex(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            "the request's trace continues in the record"
        );
        seen.push(e);
    }
    seen.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(
        seen[0].payload.as_ref().unwrap().properties["ip"],
        "203.0.113.0",
        "PII default truncates ip"
    );
    assert_eq!(
        seen[1].payload.as_ref().unwrap().amount_micros,
        Some(19_990_000)
    );

    let dlq = read_exactly(&h.dlq_topic, 1).await;
    assert_eq!(
        dlq[0].payload().unwrap(),
        bad_bytes.as_slice(),
        "original bytes kept"
    );
    assert_eq!(
        header(&dlq[0], headers::ERROR_CODE).as_deref(),
        Some("missing_field")
    );
    assert!(
        header(&dlq[0], headers::ERROR_DETAIL)
            .unwrap()
            .contains("payload.currency")
    );
}

#[tokio::test]
async fn duplicates_are_produced_once_and_retries_of_derived_ids_are_duplicates() {
    let h = start(&[]).await;
    let mut no_id = event("x", "u5");
    no_id.as_object_mut().unwrap().remove("event_id");
    let batch = json!([event("d1", "u1"), event("d1", "u1"), no_id]).to_string();
    let (status, body, _) = post(&h.http, Some("test-key"), batch.clone().into_bytes(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(2), Some(1))
    );
    let derived = body["results"][2]["event_id"].as_str().unwrap().to_owned();
    assert!(derived.starts_with("d-"), "{derived}");
    // The client's retry of the same batch: every event is a duplicate.
    let (status, body, _) = post(&h.http, Some("test-key"), batch.into_bytes(), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(3)),
        "{body}"
    );
    assert_eq!(
        body["results"][2]["event_id"].as_str(),
        Some(derived.as_str())
    );
    read_exactly(&h.events_topic, 2).await;
}

#[tokio::test]
async fn gzip_and_ndjson_bodies_are_accepted() {
    let h = start(&[]).await;
    let ndjson = format!("{}\n{}\n", event("n1", "u1"), event("n2", "u2"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(ndjson.as_bytes()).unwrap();
    let (status, body, _) = post(
        &h.http,
        Some("test-key"),
        gz.finish().unwrap(),
        &[
            ("Content-Type", "application/x-ndjson"),
            ("Content-Encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    read_exactly(&h.events_topic, 2).await;
}

#[tokio::test]
async fn error_paths_answer_400_401_413_415_and_429_with_reasons() {
    let h = start(&["--rate-limit", "1", "--rate-burst", "3"]).await;
    let (status, body, hdrs) = post(&h.http, None, b"{}".to_vec(), &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(hdrs.get("www-authenticate").unwrap(), "Bearer");
    let (status, _, _) = post(&h.http, Some("wrong-key"), b"{}".to_vec(), &[]).await;
    assert_eq!(status, 401);

    // Unparseable: 400 with the reason, and the body is kept on the DLQ.
    let (status, body, _) = post(&h.http, Some("other-key"), b"[{\"a\":".to_vec(), &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "unparseable_body");
    let dlq = read_exactly(&h.dlq_topic, 1).await;
    assert_eq!(dlq[0].payload().unwrap(), b"[{\"a\":");

    // A gzip bomb: 413 without inflating it.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 32 * 1024 * 1024]).unwrap();
    let (status, body, _) = post(
        &h.http,
        Some("other-key"),
        gz.finish().unwrap(),
        &[("Content-Encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, _, _) = post(
        &h.http,
        Some("other-key"),
        b"x".to_vec(),
        &[("Content-Type", "text/csv")],
    )
    .await;
    assert_eq!(status, 415);

    // Rate limit: burst 3 events, then 429 with Retry-After.
    let batch = json!([event("r1", "u1"), event("r2", "u1"), event("r3", "u1")]).to_string();
    let (status, _, _) = post(&h.http, Some("test-key"), batch.into_bytes(), &[]).await;
    assert_eq!(status, 200);
    let (status, body, hdrs) = post(
        &h.http,
        Some("test-key"),
        event("r4", "u1").to_string().into_bytes(),
        &[],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(hdrs.get("retry-after").is_some());
}

/// Issue #15 (chaos seed 1, `lg-1-1170`): a batch answered 503 because one of its records
/// was not acknowledged, although its malformed event's DLQ record was; the client
/// retried the whole batch and the rejection was written to the DLQ a second time.
/// Here the producer refuses records over 2000 bytes (`message.max.bytes`), so the
/// batch's oversized valid event is never acknowledged while its other records are.
#[tokio::test]
async fn a_retried_batch_writes_its_rejected_event_to_the_dlq_once() {
    let h = start_with_producer_options(&[], &["message.max.bytes=2000"]).await;
    let bad = json!({ "event_id": "bad-1", "schema_version": 1, "event_type": "purchase",
                      "key": { "user_id": "u9" },
                      "payload": { "amount": "-5", "currency": "EUR" },
                      "metadata": { "event_timestamp": now_ms() } });
    let big = events::event("big-1", "u3", now_ms())
        .page(format!("/{}", "p".repeat(2000)))
        .json();
    let batch = json!([event("ok-1", "u1"), bad, big]).to_string();
    for attempt in 1..=2 {
        let (status, body, _) =
            post(&h.http, Some("test-key"), batch.clone().into_bytes(), &[]).await;
        assert_eq!(status, 503, "attempt {attempt}: {body}");
    }
    // The client gives up on the event the broker refuses and retries the rest.
    let retry = json!([event("ok-1", "u1"), bad]).to_string();
    let (status, body, _) = post(&h.http, Some("test-key"), retry.into_bytes(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["rejected"].as_u64()
        ),
        (Some(0), Some(1), Some(1)),
        "ok-1 was stored by the first attempt; bad-1 is rejected again: {body}"
    );
    assert_eq!(body["results"][1]["status"], "rejected");
    assert_eq!(body["results"][1]["event_id"], "bad-1");
    assert_eq!(
        (
            body["results"][1]["error"]["field"].as_str(),
            body["results"][1]["error"]["code"].as_str()
        ),
        (Some("payload.amount"), Some("invalid_amount")),
        "the same definite rejection: {body}"
    );

    let dlq = read_exactly(&h.dlq_topic, 1).await;
    assert_eq!(
        header(&dlq[0], headers::EVENT_ID).as_deref(),
        Some("bad-1"),
        "exactly one DLQ record, for bad-1"
    );
    assert_eq!(
        header(&dlq[0], headers::ERROR_CODE).as_deref(),
        Some("invalid_amount")
    );
    let stored = read_exactly(&h.events_topic, 1).await;
    assert_eq!(
        header(&stored[0], headers::EVENT_ID).as_deref(),
        Some("ok-1")
    );
}

#[tokio::test]
async fn an_unreachable_broker_answers_503_with_retry_after_and_forgets_the_ids() {
    let dead = KafkaConfig {
        message_timeout_ms: 1_000,
        ..KafkaConfig::for_brokers("127.0.0.1:1")
    };
    let cfg = config(&dead, "t", "d", &[]);
    let servers =
        ingest_server::serve(&dead, &cfg, Arc::new(FixedSchemaId(1)), "ingest-test").await;
    let url = format!("http://{}/v1/events", servers.http_addr);
    for _ in 0..2 {
        // Both attempts are 503 (not "duplicate" the second time): nothing was stored.
        let (status, body, hdrs) = post(
            &url,
            Some("test-key"),
            event("z1", "u1").to_string().into_bytes(),
            &[],
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(hdrs.get("retry-after").unwrap(), "1");
    }
    servers.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_unary_and_streaming_calls_ingest_with_per_event_results() {
    let h = start(&[]).await;
    let mut client = IngestServiceClient::connect(h.grpc.clone()).await.unwrap();
    let pb_event = |id: &str| {
        events::event(id, "g1", now_ms())
            .purchase("USD", 5_250_000)
            .build()
    };
    let mut bad = pb_event("gbad");
    bad.payload.as_mut().unwrap().currency = "XXQ".into();

    let mut req = tonic::Request::new(SendEventsRequest {
        events: vec![pb_event("g-1"), bad.clone()],
    });
    req.metadata_mut()
        .insert("x-api-key", "test-key".parse().unwrap());
    let resp = client.send_events(req).await.unwrap().into_inner();
    assert_eq!((resp.accepted, resp.rejected), (1, 1));
    assert_eq!(resp.results[1].status, EventStatus::Rejected as i32);
    assert_eq!(
        resp.results[1].error.as_ref().unwrap().field,
        "payload.currency"
    );

    let chunks = vec![
        SendEventsRequest {
            events: vec![pb_event("g-2"), pb_event("g-3")],
        },
        SendEventsRequest {
            events: vec![pb_event("g-3"), pb_event("g-4")],
        },
    ];
    let mut req = tonic::Request::new(tokio_stream::iter(chunks));
    req.metadata_mut()
        .insert("authorization", "Bearer test-key".parse().unwrap());
    let resp = client.stream_events(req).await.unwrap().into_inner();
    assert_eq!((resp.accepted, resp.duplicates), (3, 1));
    assert_eq!(
        resp.results.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );

    let mut unauth = tonic::Request::new(SendEventsRequest {
        events: vec![pb_event("g-9")],
    });
    unauth
        .metadata_mut()
        .insert("x-api-key", "nope".parse().unwrap());
    assert_eq!(
        client.send_events(unauth).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    let records = read_exactly(&h.events_topic, 4).await;
    let amounts: Vec<Option<i64>> = records
        .iter()
        .map(|m| {
            ev::Event::decode(wire::unframe(m.payload().unwrap()).unwrap().payload)
                .unwrap()
                .payload
                .unwrap()
                .amount_micros
        })
        .collect();
    assert!(amounts.iter().all(|a| *a == Some(5_250_000)), "{amounts:?}");
    let dlq = read_exactly(&h.dlq_topic, 1).await;
    assert_eq!(
        dlq[0].payload().unwrap(),
        bad.encode_to_vec().as_slice(),
        "gRPC DLQ keeps the protobuf bytes"
    );
}

#[tokio::test]
async fn grpc_serves_health_and_reflection_listing_only_the_ingest_service() {
    let h = start(&[]).await;
    let channel = grpc_meta::channel(&h.grpc).await;
    grpc_meta::assert_health_serving(channel.clone(), "pulse.ingest.v1.IngestService").await;
    grpc_meta::assert_reflection_describes(
        channel,
        "pulse.ingest.v1.IngestService",
        &[
            (
                "SendEvents",
                ".pulse.ingest.v1.SendEventsRequest",
                ".pulse.ingest.v1.SendEventsResponse",
                false,
            ),
            (
                "StreamEvents",
                ".pulse.ingest.v1.SendEventsRequest",
                ".pulse.ingest.v1.SendEventsResponse",
                true,
            ),
            (
                "SendEventsStream",
                ".pulse.ingest.v1.SendEventsRequest",
                ".pulse.ingest.v1.SendEventsResponse",
                true,
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_content_type_or_encoding_that_is_not_visible_ascii_is_refused_with_415() {
    let h = start(&[]).await;
    let body = event("na1", "u1").to_string().into_bytes();
    for (name, value, want) in [
        (
            "content-type",
            &b"application/json\xe9"[..],
            "unsupported_content_type",
        ),
        ("content-encoding", b"\xe9gzip", "unsupported_encoding"),
        ("content-encoding", b"identity\xff", "unsupported_encoding"),
        // A parameter is not the media type: this is still JSON.
        (
            "content-type",
            b"application/json; charset=\xe9",
            "accepted",
        ),
    ] {
        let value = reqwest::header::HeaderValue::from_bytes(value).unwrap();
        let resp = reqwest::Client::new()
            .post(&h.http)
            .bearer_auth("test-key")
            .header(name, value)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        if want == "accepted" {
            assert_eq!(status, 200, "{name}: {answer}");
            assert_eq!(answer["accepted"], 1, "{answer}");
        } else {
            assert_eq!(status, 415, "{name}: {answer}");
            assert_eq!(answer["error"]["code"], want, "{answer}");
        }
    }
}

#[tokio::test]
async fn an_unparseable_body_longer_than_the_broker_takes_is_refused_and_kept_cut_on_the_dlq() {
    // 4 MiB after gzip: longer than the broker's 1 MB message limit. Before the DLQ cut its
    // original, the DLQ record could never be produced and the client got 503 forever.
    let h = start(&[]).await;
    let mut original = b"[{\"a\":".to_vec();
    original.resize(4 * 1024 * 1024, b'x');
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&original).unwrap();
    let (status, body, _) = post(
        &h.http,
        Some("test-key"),
        gz.finish().unwrap(),
        &[("Content-Encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "unparseable_body");
    let dlq = read_exactly(&h.dlq_topic, 1).await;
    let kept = dlq[0].payload().unwrap();
    assert_eq!(kept.len(), 900 * 1024, "cut to --max-dlq-original-bytes");
    assert_eq!(kept, &original[..kept.len()]);
    assert_eq!(
        header(&dlq[0], headers::ORIGINAL_SIZE).as_deref(),
        Some(original.len().to_string().as_str())
    );
}

/// The reference event (the README's quick-start, `docs/examples/reference-event.json`),
/// byte for byte: a producer's `schema_version` 3 and a trace id that is not W3C.
const REFERENCE_EVENT: &[u8] = include_bytes!("../../../docs/examples/reference-event.json");
/// Its `metadata.event_timestamp`, 2026-06-04T11:01:23.456Z, in epoch ms.
const REFERENCE_EVENT_MS: i64 = 1_780_570_883_456;
/// Ingest flags that accept the reference event's fixed event time whatever today's date.
const ANY_EVENT_TIME: &[&str] = &[
    "--max-age-ms",
    "315360000000",
    "--max-future-skew-ms",
    "315360000000",
];

/// The reference event as a producer would send it over gRPC.
fn reference_event_pb() -> ev::Event {
    ev::Event {
        event_id: String::new(),
        schema_version: 3,
        event_type: "page_view".into(),
        key: Some(ev::EventKey {
            user_id: "u123".into(),
            session_id: "s456".into(),
        }),
        payload: Some(ev::Payload {
            page: "/home".into(),
            referrer: "google".into(),
            currency: "USD".into(),
            amount_micros: Some(0),
            properties: Default::default(),
        }),
        metadata: Some(ev::Metadata {
            event_timestamp_ms: REFERENCE_EVENT_MS,
            trace_id: "abcd-1234".into(),
            source: "web-frontend".into(),
        }),
        ingest: None,
    }
}

/// The stored row of an event, as the ClickHouse writer wrote it.
#[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
struct StoredReference {
    schema_version: u32,
    event_type: String,
    user_id: String,
    session_id: String,
    page: String,
    referrer: String,
    currency: String,
    amount_micros: i64,
    has_amount: u8,
    event_time_ms: i64,
    trace_id: String,
    source_trace_id: String,
    source: String,
    ingest_source: String,
}

#[tokio::test]
async fn the_reference_event_over_http_byte_for_byte_and_over_grpc_is_stored_with_version_and_trace_id()
 {
    use clap::Parser as _;
    let h = start(ANY_EVENT_TIME).await;

    // HTTP: the exact bytes, with a W3C trace context on the request.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, body, _) = post(
        &h.http,
        Some("test-key"),
        REFERENCE_EVENT.to_vec(),
        &[
            ("Content-Type", "application/json"),
            ("traceparent", traceparent),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    let http_id = body["results"][0]["event_id"].as_str().unwrap().to_owned();

    // gRPC: its protobuf equivalent (a different derived id: the amount and the time
    // are written differently), with a W3C trace context in the metadata.
    let mut client = IngestServiceClient::connect(h.grpc.clone()).await.unwrap();
    let mut req = tonic::Request::new(SendEventsRequest {
        events: vec![reference_event_pb()],
    });
    req.metadata_mut()
        .insert("x-api-key", "test-key".parse().unwrap());
    req.metadata_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    let resp = client.send_events(req).await.unwrap().into_inner();
    assert_eq!(resp.accepted, 1, "{resp:?}");
    let grpc_id = resp.results[0].event_id.clone();
    assert_ne!(http_id, grpc_id);

    // The ClickHouse writer, on this ingest's topic, into a database of its own.
    let kafka = pulse_tests::kafka();
    let (activity, sessions, dlq) = (
        pulse_tests::unique("activity"),
        pulse_tests::unique("sessions"),
        pulse_tests::unique("writer-dlq"),
    );
    let _topics = cleanup::Topics::create(
        &[&activity, &sessions, &dlq]
            .iter()
            .map(|t| pulse_platform::kafka::TopicSpec::new(t.as_str(), 1))
            .collect::<Vec<_>>(),
    )
    .await;
    let database = cleanup::Database::unique("pulse_reference");
    let cfg = pulse_writer::Config::parse_from([
        "pulse-writer",
        "--kafka-brokers",
        &kafka.brokers,
        "--clickhouse-url",
        &database.url,
        "--clickhouse-database",
        &database.database,
        "--group-id",
        &pulse_tests::unique("writer"),
        "--batch-max-age-ms",
        "200",
        "--events-topic",
        &h.events_topic,
        "--user-activity-topic",
        &activity,
        "--sessions-topic",
        &sessions,
        "--dlq-topic",
        &dlq,
    ]);
    let sink = pulse_writer::build_clickhouse(&cfg).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sink.run(stop.clone()));

    let ch = database.client();
    let stored = |id: String| {
        let ch = ch.clone();
        async move {
            ch.query("SELECT ?fields FROM events FINAL WHERE event_id = ?")
                .bind(id)
                .fetch_all::<StoredReference>()
                .await
                .map_err(|e| e.to_string())
        }
    };
    wait_until(
        Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(200)),
        "both copies of the reference event in ClickHouse",
        async || {
            let (a, b) = (
                stored(http_id.clone()).await?,
                stored(grpc_id.clone()).await?,
            );
            if a.len() == 1 && b.len() == 1 {
                Ok(())
            } else {
                Err(format!("http {a:?}, grpc {b:?}"))
            }
        },
    )
    .await;
    let want = |trace_id: &str| StoredReference {
        schema_version: 3,
        event_type: "page_view".into(),
        user_id: "u123".into(),
        session_id: "s456".into(),
        page: "/home".into(),
        referrer: "google".into(),
        currency: "USD".into(),
        amount_micros: 0,
        has_amount: 1,
        event_time_ms: REFERENCE_EVENT_MS,
        trace_id: trace_id.into(),
        source_trace_id: "abcd-1234".into(),
        source: "web-frontend".into(),
        ingest_source: "shop".into(),
    };
    let over_http = stored(http_id.clone()).await.unwrap().remove(0);
    assert_eq!(
        over_http,
        want("4bf92f3577b34da6a3ce929d0e0e4736"),
        "the producer's trace id beside the request's W3C one"
    );
    let over_grpc = stored(grpc_id.clone()).await.unwrap().remove(0);
    assert_eq!(over_grpc, want("0af7651916cd43dd8448eb211c80319c"));

    // Searchable by the producer's trace id: the documented lookup
    // (crates/storage/clickhouse/0003_events_by_source_trace.sql).
    let found: Vec<String> = ch
        .query(
            "SELECT event_id FROM events FINAL WHERE (user_id, event_time_ms, event_id) IN \
             (SELECT user_id, event_time_ms, event_id FROM events_by_source_trace \
              WHERE source_trace_id = ?) ORDER BY event_id",
        )
        .bind("abcd-1234")
        .fetch_all()
        .await
        .unwrap();
    let mut both = vec![http_id, grpc_id];
    both.sort();
    assert_eq!(found, both);

    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_refused_schema_version_is_rejected_naming_the_field_and_the_setting() {
    let mut flags = ANY_EVENT_TIME.to_vec();
    flags.extend(["--refuse-schema-versions", "2-3"]);
    let h = start(&flags).await;
    let (status, body, _) = post(
        &h.http,
        Some("test-key"),
        REFERENCE_EVENT.to_vec(),
        &[("Content-Type", "application/json")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rejected"], 1, "{body}");
    let error = &body["results"][0]["error"];
    assert_eq!(error["field"], "schema_version", "{body}");
    assert_eq!(error["code"], "unsupported_schema_version", "{body}");
    assert_eq!(
        error["reason"],
        "3 is refused by this deployment (--refuse-schema-versions 2-3); \
         send the event in a version it accepts"
    );

    let mut client = IngestServiceClient::connect(h.grpc.clone()).await.unwrap();
    let mut version_4 = reference_event_pb();
    version_4.schema_version = 4;
    let mut req = tonic::Request::new(SendEventsRequest {
        events: vec![reference_event_pb(), version_4],
    });
    req.metadata_mut()
        .insert("x-api-key", "test-key".parse().unwrap());
    let resp = client.send_events(req).await.unwrap().into_inner();
    assert_eq!((resp.accepted, resp.rejected), (1, 1), "{resp:?}");
    let error = resp.results[0].error.as_ref().unwrap();
    assert_eq!(error.field, "schema_version");
    assert!(error.reason.contains("refused"), "{error:?}");
    assert_eq!(resp.results[1].status, EventStatus::Accepted as i32);
}

/// Waits until a post with `key` answers 401 (`refused`) or not.
async fn wait_key(url: &str, key: &str, refused: bool) {
    let what = format!(
        "the key {key} to be {}",
        if refused { "refused" } else { "accepted" }
    );
    wait_until(Duration::from_secs(10), what, async || {
        let (status, body, _) = post(url, Some(key), b"[]".to_vec(), &[]).await;
        if (status == 401) == refused {
            Ok(())
        } else {
            Err((status, body))
        }
    })
    .await;
}

#[tokio::test]
async fn api_keys_rotate_through_the_key_file_without_a_restart_counted_by_key_name() {
    let handle = pulse_platform::metrics::install("ingest-test").unwrap();
    let dir = cleanup::TempDir::new("api-keys");
    let file = dir.path().join("api-keys");
    let (old, new) = (
        pulse_tests::unique("old-key"),
        pulse_tests::unique("new-key"),
    );
    let (old_name, new_name) = (
        pulse_tests::short_unique("old"),
        pulse_tests::short_unique("new"),
    );
    std::fs::write(
        &file,
        format!("# rotation test\n{old}=rotating:{old_name}\n"),
    )
    .unwrap();
    let h = start(&[
        "--api-keys-file",
        file.to_str().unwrap(),
        "--api-keys-reload-interval",
        "200ms",
    ])
    .await;
    let count = |name: &str| {
        crate::support::metric_sum(
            &handle.render(),
            "pulse_ingest_authenticated_requests_total",
            &[&format!("key=\"{name}\"")],
        )
    };
    // The new key's series exists (at zero) only once the file names it.
    assert_eq!(count(&new_name), None);
    let (status, body, _) = post(&h.http, Some(&old), b"[]".to_vec(), &[]).await;
    assert_ne!(status, 401, "{body}");
    let (status, _, _) = post(&h.http, Some(&new), b"[]".to_vec(), &[]).await;
    assert_eq!(status, 401, "not in the file yet");

    // Both keys of the source valid at once…
    std::fs::write(
        &file,
        format!("{old}=rotating:{old_name}\n{new}=rotating:{new_name}\n"),
    )
    .unwrap();
    wait_key(&h.http, &new, false).await;
    wait_key(&h.http, &old, false).await;
    // …then the old one removed: refused, the new one and the inline keys still served.
    std::fs::write(&file, format!("{new}=rotating:{new_name}\n")).unwrap();
    wait_key(&h.http, &old, true).await;
    wait_key(&h.http, &new, false).await;
    wait_key(&h.http, "test-key", false).await;
    // A broken file keeps the keys in force (once its reload failed).
    std::fs::write(&file, "not a key line\n").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the broken key file's reload to fail",
        async || {
            let failed = crate::support::metric_sum(
                &handle.render(),
                "pulse_ingest_api_keys_reload_total",
                &["outcome=\"error\""],
            )
            .unwrap_or(0.0);
            if failed >= 1.0 { Ok(()) } else { Err(failed) }
        },
    )
    .await;
    wait_key(&h.http, &new, false).await;

    // Requests are counted under each key's name; no series carries a key.
    assert!(
        count(&old_name).is_some_and(|n| n >= 2.0),
        "{:?}",
        count(&old_name)
    );
    assert!(
        count(&new_name).is_some_and(|n| n >= 3.0),
        "{:?}",
        count(&new_name)
    );
    let text = handle.render();
    assert!(
        !text.contains(&old) && !text.contains(&new),
        "a key is in the metrics"
    );
    let reloads = |outcome: &str| {
        crate::support::metric_sum(
            &text,
            "pulse_ingest_api_keys_reload_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(reloads("ok") >= 2.0 && reloads("error") >= 1.0, "{text}");
}

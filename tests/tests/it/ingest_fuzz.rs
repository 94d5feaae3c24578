//! Server-level fuzzing of ingest, against the real broker and a real schema registry:
//! arbitrary bytes, arbitrary JSON values and events, and Content-Type × Content-Encoding
//! combinations (gzip of garbage, truncated and concatenated gzip, a gzip bomb) are POSTed
//! to `/v1/events` over real HTTP; arbitrary protobuf bytes and arbitrary `Event` messages go
//! to the unary gRPC call. Every answer must be one of the documented ones, in the
//! documented shape, and the one a model of the README's rules predicts; the connection must
//! never break, and afterwards both transports still take a good event.
//!
//! One server (and one HTTP client and gRPC channel) is shared by all properties.
//! `PROPTEST_CASES` overrides the number of cases per property (default 96); failures are
//! saved next to this file (`ingest_fuzz.proptest-regressions`) and replayed first.

use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, TestRunner};
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::pb::ingest::v1::ingest_service_client::IngestServiceClient;
use pulse_contracts::pb::ingest::v1::{EventStatus, SendEventsRequest, SendEventsResponse};
use pulse_ingest::pipeline::Framer;
use serde_json::Value;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::support::registry::{self, Registry};
use crate::support::{cleanup, grpc_meta, ingest_server};

mod inputs;

use inputs::{Auth, Class, Gunzip};

/// Limits the server runs with: small, so the fuzzer reaches them.
const MAX_BODY: usize = 16 * 1024;
const MAX_DECOMPRESSED: usize = 64 * 1024;
const MAX_BATCH: usize = 16;
const MAX_EVENT: usize = 4096;
const KEY: &str = "fuzz-key";
const SERVICE: &str = "pulse.ingest.v1.IngestService";

/// Every status `POST /v1/events` may answer, with the error codes documented for it.
const DOCUMENTED: &[(u16, &[&str])] = &[
    (200, &[]),
    (400, &["unparseable_body", "empty_body", "bad_gzip"]),
    (401, &["unauthenticated"]),
    (413, &["body_too_large", "batch_too_large"]),
    (415, &["unsupported_content_type", "unsupported_encoding"]),
    (429, &["rate_limited"]),
    (503, &["backpressure", "unavailable"]),
];

// ---------------------------------------------------------------------------------------
// The shared server

/// The server under test and the clients every property shares.
struct Fuzz {
    rt: tokio::runtime::Runtime,
    http: String,
    client: reqwest::Client,
    channel: Channel,
    _servers: pulse_ingest::Servers,
    _registry: Registry,
    /// Never dropped (a static): the topics outlive the test process.
    _topics: cleanup::Topics,
}

/// Ingest with the real broker and a real registry holding the event schema.
async fn start() -> (
    pulse_ingest::Servers,
    Registry,
    cleanup::Topics,
    String,
    String,
) {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("fuzz_events");
    let dlq_topic = pulse_tests::unique("fuzz_dlq");
    let topics = ingest_server::create_topics(&events_topic, &dlq_topic, 1).await;
    let registry = registry::start(&kafka).await;
    let url = format!("http://{}", registry.addr);
    let status = registry::register(&url, &events_topic, pulse_contracts::schemas::EVENTS.source)
        .await
        .status();
    assert!(
        status.is_success(),
        "registering the event schema: {status}"
    );
    let limits = [MAX_BODY, MAX_DECOMPRESSED, MAX_BATCH, MAX_EVENT].map(|n| n.to_string());
    let config = ingest_server::config(
        &kafka,
        &format!("{KEY}=fuzz"),
        "fuzz-hmac",
        &events_topic,
        &dlq_topic,
        &[
            "--kafka-partitions",
            "2",
            "--rate-limit",
            "0",
            "--max-body-bytes",
            &limits[0],
            "--max-decompressed-bytes",
            &limits[1],
            "--max-batch-events",
            &limits[2],
            "--max-event-bytes",
            &limits[3],
        ],
    );
    let framer: Arc<dyn Framer> = Arc::new(pulse_contracts::wire::RegistryEncoder::new(&url));
    let servers = ingest_server::serve(&kafka, &config, framer, "ingest-fuzz").await;
    let http = format!("http://{}/v1/events", servers.http_addr);
    let grpc = format!("http://{}", servers.grpc_addr);
    (servers, registry, topics, http, grpc)
}

fn fuzz() -> &'static Fuzz {
    static FUZZ: OnceLock<Fuzz> = OnceLock::new();
    FUZZ.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let (servers, registry, topics, http, grpc) = rt.block_on(start());
        let channel = rt.block_on(grpc_meta::channel(&grpc));
        Fuzz {
            rt,
            http,
            client: reqwest::Client::new(),
            channel,
            _servers: servers,
            _registry: registry,
            _topics: topics,
        }
    })
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    ProptestConfig {
        cases,
        // Every shrink step is a request: keep a failure's report quick.
        max_shrink_iters: 256,
        source_file: Some(file!()),
        // `ingest_fuzz.proptest-regressions` next to this file.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// Runs `check` over `strategy` against the shared server, then checks the server is still
/// healthy.
fn run_property<S, F, Fut>(strategy: S, check: F)
where
    S: Strategy,
    S::Value: 'static,
    F: Fn(&'static Fuzz, S::Value) -> Fut,
    Fut: Future<Output = Result<(), TestCaseError>>,
{
    let f = fuzz();
    let mut runner = TestRunner::new(proptest_config());
    if let Err(e) = runner.run(&strategy, |input| f.rt.block_on(check(f, input))) {
        panic!("{e}");
    }
    f.rt.block_on(assert_still_healthy(f));
}

/// Both transports answer health SERVING and still take a well-formed event.
async fn assert_still_healthy(f: &Fuzz) {
    grpc_meta::assert_health_serving(f.channel.clone(), SERVICE).await;
    let id = pulse_tests::unique("healthy");
    let event = inputs::valid_json(&id, "u-healthy");
    let resp = f
        .client
        .post(&f.http)
        .bearer_auth(KEY)
        .json(&event)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    let mut request = tonic::Request::new(SendEventsRequest {
        events: vec![inputs::valid_pb(&format!("{id}-grpc"), "u-healthy")],
    });
    request
        .metadata_mut()
        .insert("x-api-key", KEY.parse().unwrap());
    let answer = IngestServiceClient::new(f.channel.clone())
        .send_events(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 1, "{answer:?}");
}

// ---------------------------------------------------------------------------------------
// HTTP: requests, the model of the answers, and the shape checks

struct Post {
    auth: Auth,
    content_type: Option<Vec<u8>>,
    content_encoding: Option<Vec<u8>>,
    body: Vec<u8>,
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

async fn send(f: &Fuzz, post: &Post) -> Result<Answer, TestCaseError> {
    let mut req = f.client.post(&f.http).body(post.body.clone());
    match post.auth {
        Auth::Bearer => req = req.bearer_auth(KEY),
        Auth::XApiKey => req = req.header("x-api-key", KEY),
        Auth::WrongKey => req = req.bearer_auth("not-a-key"),
        Auth::NoKey => {}
    }
    for (name, value) in [
        ("content-type", &post.content_type),
        ("content-encoding", &post.content_encoding),
    ] {
        if let Some(v) = value {
            let v = reqwest::header::HeaderValue::from_bytes(v).unwrap();
            req = req.header(name, v);
        }
    }
    // Any transport error (reset, early close, garbled answer) fails the property.
    let resp = req
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("request failed: {e:?}")))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .map_err(|e| TestCaseError::fail(format!("reading the answer failed: {e:?}")))?;
    Ok(Answer {
        status,
        headers,
        body: body.to_vec(),
    })
}

/// What the README's rules say a request gets.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// 200 with one result per event; the events at these indexes are well-formed, so
    /// they are accepted (or duplicates of an earlier case).
    Events { count: usize, valid: Vec<usize> },
    /// This status with one of these codes.
    Error(u16, &'static [&'static str]),
    /// The body is not strict JSON (e.g. a number out of range) but may still split into
    /// events that are judged one by one: 200, 400 or 413.
    Lenient,
    /// Anything documented.
    Any,
}

/// How a decoded body splits into events (README "Bodies"); `valid` as in `Expect::Events`.
fn expect_events(format: Class, decoded: &[u8], valid: Vec<usize>) -> Expect {
    let count = if format == Class::Ndjson {
        decoded
            .split(|b| *b == b'\n')
            .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
            .count()
    } else {
        match serde_json::from_slice::<Value>(decoded) {
            Ok(Value::Array(items)) => items.len(),
            Ok(_) => 1,
            Err(_) if decoded.iter().all(u8::is_ascii_whitespace) => 0,
            Err(_) => return Expect::Lenient,
        }
    };
    match count {
        0 => Expect::Error(400, &["empty_body"]),
        n if n > MAX_BATCH => Expect::Error(413, &["batch_too_large"]),
        n => Expect::Events { count: n, valid },
    }
}

/// The model of the README's rules: auth, then Content-Type, then the size on the wire,
/// then Content-Encoding, then how the body splits into events.
fn expect(
    post: &Post,
    content_type: Class,
    encoding: Class,
    gunzip: &Gunzip,
    valid: Vec<usize>,
) -> Expect {
    if !post.auth.ok() {
        return Expect::Error(401, &["unauthenticated"]);
    }
    match content_type {
        Class::Unsupported => return Expect::Error(415, &["unsupported_content_type"]),
        Class::Unknown => return Expect::Any,
        _ => {}
    }
    if post.body.len() > MAX_BODY {
        return Expect::Error(413, &["body_too_large"]);
    }
    match encoding {
        Class::Unsupported => Expect::Error(415, &["unsupported_encoding"]),
        Class::Unknown => Expect::Any,
        Class::Gzip => match gunzip {
            Gunzip::Ok(inner) if inner.len() > MAX_DECOMPRESSED => {
                Expect::Error(413, &["body_too_large"])
            }
            Gunzip::Ok(inner) => expect_events(content_type, inner, valid),
            Gunzip::Broken => Expect::Error(400, &["bad_gzip"]),
            Gunzip::Empty => Expect::Error(400, &["bad_gzip", "empty_body"]),
        },
        _ => expect_events(content_type, &post.body, valid),
    }
}

fn json_str<'a>(v: &'a Value, field: &str) -> Result<&'a str, TestCaseError> {
    v[field]
        .as_str()
        .ok_or_else(|| TestCaseError::fail(format!("{field} is not a string in {v}")))
}

/// The documented 200 shape: one result per event, counts that add up, a field, reason and
/// code for every rejected event and an id for every other. Returns the results.
fn check_results(v: &Value) -> Result<Vec<Value>, TestCaseError> {
    let results = v["results"].as_array().cloned().unwrap_or_default();
    let count = |status: &str| results.iter().filter(|r| r["status"] == status).count();
    for (field, status) in [
        ("accepted", "accepted"),
        ("duplicates", "duplicate"),
        ("rejected", "rejected"),
    ] {
        prop_assert_eq!(v[field].as_u64(), Some(count(status) as u64), "{}", v);
    }
    for (i, r) in results.iter().enumerate() {
        prop_assert_eq!(r["index"].as_u64(), Some(i as u64), "{}", v);
        match json_str(r, "status")? {
            "rejected" => {
                let e = &r["error"];
                json_str(e, "field")?;
                prop_assert!(!json_str(e, "reason")?.is_empty(), "no reason: {}", r);
                prop_assert!(!json_str(e, "code")?.is_empty(), "no code: {}", r);
            }
            "accepted" | "duplicate" => {
                prop_assert!(!json_str(r, "event_id")?.is_empty(), "no id: {}", r);
                prop_assert!(r.get("error").is_none(), "error on a good event: {}", r);
            }
            other => prop_assert!(false, "unknown status {:?} in {}", other, v),
        }
    }
    Ok(results)
}

/// The documented error shape `{"error": {"code", "reason"}}` with a code of this status.
fn check_error(a: &Answer, v: &Value) -> Result<(), TestCaseError> {
    let codes = DOCUMENTED
        .iter()
        .find(|(s, _)| *s == a.status)
        .map(|(_, c)| *c)
        .unwrap_or_default();
    let error = &v["error"];
    prop_assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{}", v);
    let code = json_str(error, "code")?;
    prop_assert!(
        codes.contains(&code),
        "{} with code {:?}: {}",
        a.status,
        code,
        v
    );
    prop_assert!(!json_str(error, "reason")?.is_empty(), "no reason: {}", v);
    let header = |name: &str| a.headers.get(name).and_then(|h| h.to_str().ok());
    match a.status {
        401 => prop_assert_eq!(header("www-authenticate"), Some("Bearer")),
        429 | 503 => prop_assert!(header("retry-after").is_some(), "no Retry-After"),
        _ => {}
    }
    Ok(())
}

/// Checks one answer against the documented shapes and the model's expectation.
fn check_answer(a: &Answer, want: &Expect) -> Result<(), TestCaseError> {
    prop_assert!(
        DOCUMENTED.iter().any(|(s, _)| *s == a.status),
        "undocumented status {}: {}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let content_type = a.headers.get("content-type").and_then(|h| h.to_str().ok());
    prop_assert_eq!(content_type, Some("application/json"));
    let v: Value = serde_json::from_slice(&a.body).map_err(|e| {
        TestCaseError::fail(format!(
            "answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&a.body)
        ))
    })?;
    let results = if a.status == 200 {
        Some(check_results(&v)?)
    } else {
        check_error(a, &v)?;
        None
    };
    match (want, &results) {
        (Expect::Events { count, valid }, Some(results)) => {
            prop_assert_eq!(results.len(), *count, "one result per event: {}", v);
            for i in valid {
                prop_assert!(
                    results[*i]["status"] != "rejected",
                    "a well-formed event was rejected: {}",
                    results[*i]
                );
            }
        }
        (Expect::Error(status, codes), _) => {
            prop_assert_eq!(a.status, *status, "{}", v);
            prop_assert!(codes.contains(&json_str(&v["error"], "code")?), "{}", v);
        }
        (Expect::Lenient, _) => {
            prop_assert!([200, 400, 413].contains(&a.status), "{}", v);
            if a.status == 400 {
                let code = json_str(&v["error"], "code")?;
                prop_assert!(["unparseable_body", "empty_body"].contains(&code), "{}", v);
            }
        }
        (Expect::Any, _) => {}
        (Expect::Events { .. }, None) => {
            prop_assert!(false, "expected 200, got {}: {}", a.status, v)
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// gRPC: raw message bytes, and the checks

/// Sends request bodies as given and decodes answers as `SendEventsResponse`.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = SendEventsResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<SendEventsResponse>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        SendEventsResponse::decode(bytes)
            .map(Some)
            .map_err(|e| tonic::Status::data_loss(format!("undecodable answer: {e}")))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = SendEventsResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

/// `SendEvents` with these exact message bytes.
async fn send_raw(f: &Fuzz, bytes: Vec<u8>) -> Result<SendEventsResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(f.channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let mut request = tonic::Request::new(bytes);
    request
        .metadata_mut()
        .insert("x-api-key", KEY.parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/pulse.ingest.v1.IngestService/SendEvents",
    );
    grpc.unary(request, path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// The codes the README documents for the gRPC call.
const GRPC_DOCUMENTED: &[tonic::Code] = &[
    tonic::Code::Ok,
    tonic::Code::InvalidArgument,
    tonic::Code::Unauthenticated,
    tonic::Code::ResourceExhausted,
    tonic::Code::Unavailable,
];

/// Checks a gRPC answer for `events` (sent with a valid key or not).
fn check_grpc(
    answer: &Result<SendEventsResponse, tonic::Status>,
    events: &[ev::Event],
    valid: &[usize],
    key_ok: bool,
) -> Result<(), TestCaseError> {
    let code = answer
        .as_ref()
        .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
    prop_assert!(
        GRPC_DOCUMENTED.contains(&code),
        "undocumented answer {:?}",
        answer
    );
    let want = if !key_ok {
        tonic::Code::Unauthenticated
    } else if events.is_empty() || events.len() > MAX_BATCH {
        tonic::Code::InvalidArgument
    } else {
        tonic::Code::Ok
    };
    prop_assert_eq!(code, want, "{:?}", answer);
    match answer {
        Err(status) => prop_assert!(!status.message().is_empty(), "no message: {:?}", status),
        Ok(resp) => {
            prop_assert_eq!(resp.results.len(), events.len(), "one result per event");
            let count = |s: EventStatus| {
                resp.results.iter().filter(|r| r.status == s as i32).count() as u32
            };
            prop_assert_eq!(resp.accepted, count(EventStatus::Accepted), "{:?}", resp);
            prop_assert_eq!(resp.duplicates, count(EventStatus::Duplicate), "{:?}", resp);
            prop_assert_eq!(resp.rejected, count(EventStatus::Rejected), "{:?}", resp);
            for (i, r) in resp.results.iter().enumerate() {
                prop_assert_eq!(r.index as usize, i);
                if r.status == EventStatus::Rejected as i32 {
                    let error = r.error.as_ref();
                    prop_assert!(
                        error.is_some_and(|e| !e.reason.is_empty()),
                        "a rejection without a reason: {:?}",
                        r
                    );
                    prop_assert!(
                        !valid.contains(&i),
                        "a well-formed event was rejected: {:?}",
                        r
                    );
                } else {
                    prop_assert!(!r.event_id.is_empty(), "no id: {:?}", r);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The properties

#[test]
fn arbitrary_bytes_over_http_get_a_documented_answer_in_the_documented_shape() {
    let body = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..1024),
        3 => inputs::json_ish(),
        1 => (MAX_BODY + 1..MAX_BODY + 2048).prop_map(|n| vec![b'['; n]),
    ];
    run_property(
        (inputs::auth(), inputs::content_type(), body),
        |f, (auth, (ct, class), body)| async move {
            let post = Post {
                auth,
                content_type: ct,
                content_encoding: None,
                body,
            };
            let want = expect(&post, class, Class::Identity, &Gunzip::Broken, Vec::new());
            check_answer(&send(f, &post).await?, &want)
        },
    );
}

#[test]
fn arbitrary_json_values_and_events_over_http_get_one_result_per_event() {
    let batch = (
        prop_oneof![
            1 => inputs::candidate().prop_map(|c| (vec![c], false)),
            4 => prop::collection::vec(inputs::candidate(), 0..MAX_BATCH + 3).prop_map(|c| (c, true)),
        ],
        any::<bool>(),
    );
    run_property(
        (inputs::auth(), batch),
        |f, (auth, ((candidates, as_array), ndjson))| async move {
            let valid: Vec<usize> = (0..candidates.len()).filter(|i| candidates[*i].1).collect();
            let values: Vec<Value> = candidates.into_iter().map(|(v, _)| v).collect();
            let (body, ct, class) = match (ndjson, as_array) {
                (true, _) => (
                    inputs::ndjson(&values).into_bytes(),
                    "application/x-ndjson",
                    Class::Ndjson,
                ),
                (false, true) => (
                    serde_json::to_vec(&values).unwrap(),
                    "application/json",
                    Class::Json,
                ),
                (false, false) => (
                    serde_json::to_vec(&values[0]).unwrap(),
                    "application/json",
                    Class::Json,
                ),
            };
            let post = Post {
                auth,
                content_type: Some(ct.as_bytes().to_vec()),
                content_encoding: None,
                body,
            };
            let want = expect(&post, class, Class::Identity, &Gunzip::Broken, valid);
            check_answer(&send(f, &post).await?, &want)
        },
    );
}

#[test]
fn content_type_and_encoding_combinations_get_the_documented_status() {
    run_property(
        (
            inputs::auth(),
            inputs::content_type(),
            inputs::content_encoding(),
            inputs::payload(),
        ),
        |f, (auth, (ct, ct_class), (ce, ce_class), (body, gunzip))| async move {
            let post = Post {
                auth,
                content_type: ct,
                content_encoding: ce,
                body,
            };
            let want = expect(&post, ct_class, ce_class, &gunzip, Vec::new());
            check_answer(&send(f, &post).await?, &want)
        },
    );
}

#[test]
fn arbitrary_event_messages_over_grpc_get_one_result_per_event() {
    let key = prop_oneof![
        6 => Just(Some(("x-api-key", KEY.to_owned()))),
        2 => Just(Some(("authorization", format!("Bearer {KEY}")))),
        1 => Just(Some(("x-api-key", "not-a-key".to_owned()))),
        1 => Just(None),
    ];
    run_property(
        (inputs::pb_batch(), key),
        |f, ((events, valid), key)| async move {
            let key_ok = key.as_ref().is_some_and(|(_, v)| v.ends_with(KEY));
            let mut request = tonic::Request::new(SendEventsRequest {
                events: events.clone(),
            });
            if let Some((name, value)) = key {
                request.metadata_mut().insert(name, value.parse().unwrap());
            }
            let answer = IngestServiceClient::new(f.channel.clone())
                .send_events(request)
                .await
                .map(tonic::Response::into_inner);
            check_grpc(&answer, &events, &valid, key_ok)
        },
    );
}

#[test]
fn arbitrary_protobuf_bytes_over_grpc_get_a_documented_code() {
    run_property(inputs::protobuf_ish(), |f, bytes| async move {
        let decoded = SendEventsRequest::decode(bytes.as_slice());
        let answer = send_raw(f, bytes).await;
        match decoded {
            Ok(request) => check_grpc(&answer, &request.events, &[], true),
            Err(e) => {
                // gRPC's status-code rules (and tonic) answer an unparseable request message
                // with INTERNAL, before any handler runs; it must say so.
                let status = answer.as_ref().err();
                prop_assert_eq!(
                    status.map(tonic::Status::code),
                    Some(tonic::Code::Internal),
                    "{:?} for undecodable bytes ({})",
                    answer,
                    e
                );
                let message = status.map(tonic::Status::message).unwrap_or_default();
                prop_assert!(message.contains("decode"), "{}", message);
                Ok(())
            }
        }
    });
}

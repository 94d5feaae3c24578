//! The server limits that refuse instead of queueing, against the real binaries: a
//! connection beyond `--max-connections` (here set by its env, `PULSE_MAX_CONNECTIONS`) is
//! answered at once — `503` with `Retry-After` and `Connection: close` on the query API's
//! HTTP port, `UNAVAILABLE` with `retry-after` metadata on its gRPC port — and served again
//! once a held connection closes; a request body that stalls longer than
//! `--request-body-timeout` is answered `408` with `Retry-After` (the schema registry's
//! HTTP port) and `UNAVAILABLE` with `retry-after` (the query API's gRPC port). Each is
//! counted in `pulse_server_limited_total`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::support::service_process::{ServiceCommand, ServiceProcess, free_addr};
use crate::support::tls::work_dir;
use crate::support::{cleanup, wait_until};

/// A service binary (killed when dropped) with its HTTP (or registry) and gRPC addresses.
struct Server {
    process: ServiceProcess,
    http: String,
    grpc: String,
    _topics: Option<cleanup::Topics>,
}

impl Server {
    /// `pulse-query-api` with `args` and `env`.
    async fn query_api(args: &[&str], env: &[(&str, &str)]) -> Self {
        let (http, grpc) = (free_addr(), free_addr());
        let mut command = ServiceCommand::new("pulse-query-api");
        command
            .env("PULSE_QUERY_API_TOKENS", "server-limits-test-token")
            .args(["--clickhouse-url", &pulse_tests::clickhouse().url])
            .args(["--http-addr", &http, "--grpc-addr", &grpc])
            .args(args)
            .envs(env);
        Self::start(command, "query-api", http, grpc, None).await
    }

    /// `pulse-schema-registry` (anonymous access, schemas in a topic of its own) with
    /// `args`.
    async fn schema_registry(args: &[&str]) -> Self {
        let http = free_addr();
        let topic = pulse_tests::unique("_schemas");
        let mut command = ServiceCommand::new("pulse-schema-registry");
        command
            .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
            .env("PULSE_KAFKA_REPLICATION_FACTOR", "1")
            .env("PULSE_KAFKA_MIN_INSYNC_REPLICAS", "1")
            .env("PULSE_SCHEMAS_TOPIC", &topic)
            .env("PULSE_SCHEMA_REGISTRY_ADDR", &http)
            .args(args);
        let topics = Some(cleanup::Topics::adopt([topic]));
        Self::start(command, "schema-registry", http, String::new(), topics).await
    }

    async fn start(
        mut command: ServiceCommand,
        name: &str,
        http: String,
        grpc: String,
        topics: Option<cleanup::Topics>,
    ) -> Self {
        let log = work_dir(&format!("server-limits-{name}")).join(format!("{name}.log"));
        let mut process = command.spawn(log);
        process.wait_ready(Duration::from_secs(90)).await;
        Self {
            process,
            http,
            grpc,
            _topics: topics,
        }
    }

    /// `pulse_server_limited_total` of `server` and `limit`.
    async fn limited(&self, server: &str, limit: &str) -> f64 {
        self.process
            .metric(
                "pulse_server_limited_total",
                &[
                    &format!("server=\"{server}\""),
                    &format!("limit=\"{limit}\""),
                ],
            )
            .await
            .unwrap_or(0.0)
    }
}

/// Sends `request` on a new connection to `addr` and reads until the server closes it (a
/// reset ends it too) or `within` passed; the answer and when it was complete.
async fn exchange(addr: &str, request: &[u8], within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(within, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        closed.is_ok(),
        "no complete answer within {within:?}: {answer:?}"
    );
    (answer, started.elapsed())
}

/// A keep-alive request: a connection that closes after it was closed by the server.
const GET_OPENAPI: &[u8] = b"GET /openapi.json HTTP/1.1\r\nHost: query-api\r\n\r\n";
const GET_OPENAPI_AND_CLOSE: &[u8] =
    b"GET /openapi.json HTTP/1.1\r\nHost: query-api\r\nConnection: close\r\n\r\n";

async fn health_check(url: &str) -> Result<HealthCheckResponse, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_beyond_max_connections_gets_503_with_retry_after_at_once_until_one_closes() {
    let api = Server::query_api(
        &[
            "--limit-retry-after-secs",
            "3",
            "--header-read-timeout",
            "60s",
        ],
        &[("PULSE_MAX_CONNECTIONS", "2")],
    )
    .await;

    // HTTP: two idle connections hold both slots…
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(&api.http).await.unwrap());
    }
    // …so a third connection's request is answered 503 within a second, and closed.
    let (answer, took) = exchange(&api.http, GET_OPENAPI, Duration::from_secs(1)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_lowercase();
    assert!(lower.contains("\r\nretry-after: 3\r\n"), "{answer}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Once one closes, a new request is served.
    drop(held.pop());
    wait_until(Duration::from_secs(5), "served after a close", async || {
        let (answer, _) = exchange(&api.http, GET_OPENAPI_AND_CLOSE, Duration::from_secs(5)).await;
        match answer.starts_with("HTTP/1.1 200") {
            true => Ok(()),
            false => Err(answer.lines().next().unwrap_or_default().to_owned()),
        }
    })
    .await;

    // gRPC: the same with two idle connections on its port: UNAVAILABLE with retry-after.
    let grpc = format!("http://{}", api.grpc);
    assert!(health_check(&grpc).await.is_ok());
    let mut held_grpc = Vec::new();
    for _ in 0..2 {
        held_grpc.push(TcpStream::connect(&api.grpc).await.unwrap());
    }
    let started = Instant::now();
    let refused = health_check(&grpc).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("retry-after").unwrap(), "3");
    assert!(
        refused.message().contains("open connections"),
        "{refused:?}"
    );
    drop(held_grpc.pop());
    wait_until(
        Duration::from_secs(5),
        "gRPC served after a close",
        async || {
            health_check(&grpc)
                .await
                .map(drop)
                .map_err(|s| s.to_string())
        },
    )
    .await;

    assert!(api.limited("http", "connections").await >= 1.0);
    assert!(api.limited("grpc", "connections").await >= 1.0);
    assert!(
        api.process.logs().contains("connection limit reached"),
        "{}",
        api.process.logs()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stalls_longer_than_the_body_timeout_gets_408_with_retry_after() {
    let registry = Server::schema_registry(&[
        "--request-body-timeout",
        "1s",
        "--limit-retry-after-secs",
        "3",
    ])
    .await;
    let before = registry.limited("http", "body_timeout").await;
    // A 1000-byte body of which only the first byte comes.
    let stalled = b"POST /subjects/stalled-value/versions HTTP/1.1\r\nHost: registry\r\n\
          Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    let (answer, took) = exchange(&registry.http, stalled, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?}: {answer}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let lower = answer.to_lowercase();
    assert!(lower.contains("\r\nretry-after: 3\r\n"), "{answer}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert_eq!(registry.limited("http", "body_timeout").await, before + 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_request_message_that_stalls_gets_unavailable_with_retry_after() {
    let api = Server::query_api(
        &[
            "--request-body-timeout",
            "1s",
            "--limit-retry-after-secs",
            "3",
        ],
        &[],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", api.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let started = Instant::now();
    // A unary call whose request message never comes.
    let refused = grpc
        .client_streaming(
            tonic::Request::new(futures::stream::pending::<HealthCheckRequest>()),
            "/grpc.health.v1.Health/Check".parse().unwrap(),
            tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?}: {refused:?}"
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("retry-after").unwrap(), "3");
    assert!(refused.message().contains("paused"), "{refused:?}");
    assert!(api.limited("grpc", "body_timeout").await >= 1.0);
}

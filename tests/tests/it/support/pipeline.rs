//! The processor, the ClickHouse writer and the query API run in this process as
//! libraries (`processor`, `rules_version`, `shadow`, `rollback`): their configurations on
//! the test's broker and ClickHouse, a loop that runs until stopped, and the query API on
//! free ports with one bearer token.

use clap::Parser as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long stopping a loop or the query API may take.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The topics of a test's pipeline, named uniquely (a shadow derives its own from them).
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub activity: String,
    pub sessions: String,
    pub late: String,
    pub checkpoints: String,
    pub dlq: String,
}

impl Topics {
    /// `<prefix>_events…` and so on, unique to this run.
    pub fn unique(prefix: &str) -> Self {
        let u = |k: &str| pulse_tests::unique(&format!("{prefix}_{k}"));
        Self {
            events: u("events"),
            activity: u("activity"),
            sessions: u("sessions"),
            late: u("late"),
            checkpoints: u("checkpoints"),
            dlq: u("dlq"),
        }
    }

    /// The processor's topic flags: its input, outputs and checkpoints.
    pub fn processor_flags(&self) -> [(&'static str, &str); 5] {
        [
            ("--events-topic", &self.events),
            ("--user-activity-topic", &self.activity),
            ("--sessions-topic", &self.sessions),
            ("--late-topic", &self.late),
            ("--checkpoint-topic", &self.checkpoints),
        ]
    }

    /// The writer's topic flags: its inputs and DLQ.
    pub fn writer_flags(&self) -> [(&'static str, &str); 4] {
        [
            ("--events-topic", &self.events),
            ("--user-activity-topic", &self.activity),
            ("--sessions-topic", &self.sessions),
            ("--dlq-topic", &self.dlq),
        ]
    }
}

/// The event-time rules of a test's processor (the flags of the same names).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub window_ms: i64,
    pub allowed_lateness_ms: i64,
    pub max_out_of_orderness_ms: i64,
    pub session_gap_ms: i64,
}

/// `program`, then `flags` as `--flag value` pairs, then `extra`.
fn argv(program: &str, flags: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    std::iter::once(program.to_owned())
        .chain(
            flags
                .iter()
                .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()]),
        )
        .chain(extra.iter().map(|s| (*s).to_owned()))
        .collect()
}

/// A processor on the test broker: `registry`, `group`, `rules`, early results every
/// 100 ms, the `topics` flags (flag, name), then `extra` flags.
pub fn processor_config(
    registry: &str,
    group: &str,
    rules: Rules,
    topics: &[(&str, &str)],
    extra: &[&str],
) -> pulse_processor::Config {
    let brokers = pulse_tests::kafka().brokers;
    let (window, lateness, disorder, gap) = (
        rules.window_ms.to_string(),
        rules.allowed_lateness_ms.to_string(),
        rules.max_out_of_orderness_ms.to_string(),
        rules.session_gap_ms.to_string(),
    );
    let mut flags = vec![
        ("--kafka-brokers", brokers.as_str()),
        ("--schema-registry-url", registry),
        ("--group-id", group),
        ("--window-ms", &window),
        ("--allowed-lateness-ms", &lateness),
        ("--max-out-of-orderness-ms", &disorder),
        ("--session-gap-ms", &gap),
        ("--emit-interval-ms", "100"),
    ];
    flags.extend_from_slice(topics);
    pulse_processor::Config::parse_from(argv("pulse-processor", &flags, extra))
}

/// A ClickHouse writer on the test broker and ClickHouse: database `db`, `group`, batches
/// of at most 200 ms, the `topics` flags (flag, name), then `extra` flags.
pub fn writer_config(
    db: &str,
    group: &str,
    topics: &[(&str, &str)],
    extra: &[&str],
) -> pulse_writer::Config {
    let (brokers, url) = (pulse_tests::kafka().brokers, pulse_tests::clickhouse().url);
    let mut flags = vec![
        ("--kafka-brokers", brokers.as_str()),
        ("--clickhouse-url", url.as_str()),
        ("--clickhouse-database", db),
        ("--group-id", group),
        ("--batch-max-age-ms", "200"),
    ];
    flags.extend_from_slice(topics);
    pulse_writer::Config::parse_from(argv("pulse-writer", &flags, extra))
}

/// A service loop running in this process until stopped.
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    /// Spawns the loop `run(stop)`.
    pub fn spawn<F, E>(run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: ToString,
    {
        let stop = CancellationToken::new();
        let loop_ = run(stop.clone());
        let task = tokio::spawn(async move { loop_.await.map_err(|e| e.to_string()) });
        Self { stop, task }
    }

    /// Stops the loop; panics if it failed or did not stop within a minute.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(STOP_WAIT, self.task)
            .await
            .expect("a loop did not stop in time")
            .unwrap()
            .unwrap();
    }
}

/// Builds the processor of `cfg` and runs it.
pub async fn start_processor(cfg: &pulse_processor::Config) -> Running {
    let p = pulse_processor::build(cfg).await.unwrap();
    Running::spawn(|stop| p.run(stop))
}

/// Builds the ClickHouse writer of `cfg` and runs it.
pub async fn start_writer(cfg: &pulse_writer::Config) -> Running {
    let sink = pulse_writer::build_clickhouse(cfg).await.unwrap();
    Running::spawn(|stop| sink.run(stop))
}

/// The query API's bearer token in [`QueryApi`].
pub const TOKEN: &str = "pipeline-token";

/// The query API over a test database, on free ports, answering [`TOKEN`].
pub struct QueryApi {
    pub base: String,
    stop: CancellationToken,
    servers: pulse_query_api::Servers,
}

impl QueryApi {
    /// Serves `db` with windows of `window_ms` and no freshness cache.
    pub async fn start(db: &pulse_platform::clickhouse::ClickHouseConfig, window_ms: i64) -> Self {
        let config = pulse_query_api::Config::parse_from([
            "pulse-query-api",
            "--clickhouse-url",
            &db.url,
            "--clickhouse-database",
            &db.database,
            "--window-ms",
            &window_ms.to_string(),
            "--freshness-cache-ms",
            "0",
        ]);
        // As if from PULSE_QUERY_API_TOKENS (a secret is never a flag).
        let config = pulse_query_api::Config {
            api_tokens: TOKEN.into(),
            ..config
        };
        let state = pulse_query_api::AppState::new(&config).unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let servers = pulse_query_api::serve(http, grpc, state, stop.clone())
            .await
            .unwrap();
        Self {
            base: format!("http://{}", servers.http_addr),
            stop,
            servers,
        }
    }

    /// The body of the 200 answer to `GET path` (`/v1/…?…`).
    pub async fn get(&self, path: &str) -> Value {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.json().await.unwrap()
    }

    /// `sessions` and `avg_pages` of `/v1/sessions` over `[from, to)`.
    pub async fn sessions(&self, from: i64, to: i64) -> (u64, f64) {
        let body = self.get(&format!("/v1/sessions?from={from}&to={to}")).await;
        (
            body["sessions"].as_u64().unwrap(),
            body["avg_pages"].as_f64().unwrap(),
        )
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(STOP_WAIT, self.servers.wait())
            .await
            .expect("the query API did not stop in time")
            .unwrap();
    }
}

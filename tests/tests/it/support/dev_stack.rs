//! The whole platform as the README brings it up, `scripts/dev.sh up`, in a state folder
//! of its own on free ports with the debug binaries `scripts/test.sh` built (no build, no
//! synthetic workload unless asked), and `down` when dropped. Used by the tests that need
//! every service at once (`e2e`, `pii`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::child_process::free_port;
use crate::support::cleanup::TempDir;

/// Every port `dev.sh` takes from the environment; each gets a free one.
const PORTS: [&str; 18] = [
    "PULSE_KAFKA_PORT",
    "PULSE_CLICKHOUSE_HTTP_PORT",
    "PULSE_CLICKHOUSE_TCP_PORT",
    "PULSE_S3_PORT",
    "PULSE_SCHEMA_REGISTRY_PORT",
    "PULSE_INGEST_HTTP_PORT",
    "PULSE_INGEST_GRPC_PORT",
    "PULSE_QUERY_HTTP_PORT",
    "PULSE_QUERY_GRPC_PORT",
    "PULSE_SCHEMA_REGISTRY_ADMIN_PORT",
    "PULSE_INGEST_ADMIN_PORT",
    "PULSE_PROCESSOR_ADMIN_PORT",
    "PULSE_WRITER_CLICKHOUSE_ADMIN_PORT",
    "PULSE_WRITER_PARQUET_ADMIN_PORT",
    "PULSE_QUERY_ADMIN_PORT",
    "PULSE_LEDGER_ADMIN_PORT",
    "PULSE_PROMETHEUS_PORT",
    "PULSE_ALERTMANAGER_PORT",
];

/// The repository's root (the parent of the `tests` crate).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate has a parent folder")
        .to_path_buf()
}

/// The platform of `scripts/dev.sh up`; `down` when dropped.
pub struct DevStack {
    env: Vec<(String, String)>,
    /// Variables removed from `dev.sh`'s environment (unless set in `env`).
    unset: Vec<String>,
    /// The state folder: data, logs, pids.
    pub state: TempDir,
    /// `host:port` of the broker.
    pub kafka: String,
    /// `http://host:port` of ClickHouse, ingest's HTTP API and the query API's.
    pub clickhouse: String,
    pub ingest: String,
    pub query: String,
    /// `dev.sh up`'s standard output (the banner).
    pub banner: String,
    ok: bool,
}

impl DevStack {
    /// Brings the platform up in a new state folder named after `prefix`, with `settings`
    /// added to dev.sh's environment (after the defaults here: debug binaries, no build,
    /// no loadgen, JSON logs, a watermark that does not wait for silent partitions beyond
    /// 3 s and an archive that rolls every 2 s) and `unset` removed from it. Panics with
    /// dev.sh's output if it fails.
    pub fn up(prefix: &str, settings: &[(&str, &str)], unset: &[&str]) -> Self {
        let state = TempDir::new(prefix);
        let mut env: Vec<(String, String)> = PORTS
            .iter()
            .map(|name| ((*name).to_owned(), free_port().to_string()))
            .collect();
        let defaults = [
            ("PULSE_STATE", state.path().display().to_string()),
            ("PULSE_DEV_PROFILE", "debug".into()),
            ("PULSE_DEV_BUILD", "0".into()),
            ("PULSE_DEV_LOADGEN", "0".into()),
            // Settle fast: silent partitions stop holding the watermark after 3 s, the
            // archive rolls every 2 s.
            ("PULSE_PROCESSOR_IDLE_TIMEOUT_MS", "3000".into()),
            ("PULSE_WRITER_PARQUET_MAX_AGE_MS", "2000".into()),
            ("PULSE_LOG_FORMAT", "json".into()),
        ];
        env.extend(defaults.map(|(k, v)| (k.to_owned(), v)));
        env.extend(
            settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut stack = Self {
            env,
            unset: unset.iter().map(|u| (*u).to_owned()).collect(),
            state,
            kafka: String::new(),
            clickhouse: String::new(),
            ingest: String::new(),
            query: String::new(),
            banner: String::new(),
            ok: false,
        };
        stack.kafka = format!("127.0.0.1:{}", stack.port("PULSE_KAFKA_PORT"));
        stack.clickhouse = stack.url("PULSE_CLICKHOUSE_HTTP_PORT");
        stack.ingest = stack.url("PULSE_INGEST_HTTP_PORT");
        stack.query = stack.url("PULSE_QUERY_HTTP_PORT");
        let out = stack.dev_sh("up");
        stack.banner = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "scripts/dev.sh up failed:\n{}\n{}",
            stack.banner,
            String::from_utf8_lossy(&out.stderr)
        );
        stack.ok = true;
        stack
    }

    /// The port `dev.sh` was given in `name` (e.g. `PULSE_INGEST_ADMIN_PORT`).
    pub fn port(&self, name: &str) -> &str {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// `http://127.0.0.1:<port of name>`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}", self.port(name))
    }

    /// Runs `sql` on the platform's ClickHouse (HTTP); its answer's text, asserting success.
    pub async fn clickhouse_query(&self, sql: &str) -> String {
        let r = reqwest::Client::new()
            .post(&self.clickhouse)
            .body(sql.to_owned())
            .send()
            .await
            .expect("ClickHouse answers");
        let status = r.status();
        let text = r.text().await.expect("ClickHouse's answer is text");
        assert!(status.is_success(), "{sql}: {text}");
        text
    }

    /// Runs `scripts/dev.sh <arg>` on this platform.
    pub fn dev_sh(&self, arg: &str) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/dev.sh")).arg(arg);
        for name in &self.unset {
            cmd.env_remove(name);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("bash runs")
    }
}

impl Drop for DevStack {
    /// Stops the platform; its state folder (data and logs) goes with the `TempDir`, kept
    /// if `dev.sh down` failed (something may still run there) or the platform never came
    /// up.
    fn drop(&mut self) {
        let out = self.dev_sh("down");
        if !self.ok || !out.status.success() {
            eprintln!(
                "platform state and logs kept in {} (dev.sh down: {})",
                self.state.path().display(),
                String::from_utf8_lossy(&out.stderr)
            );
            self.state.keep();
        }
    }
}

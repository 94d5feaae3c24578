//! The query API's bearer tokens rotate through `--api-tokens-file` without a restart: the
//! real `pulse-query-api` binary against the real ClickHouse takes a new token next to the
//! old one, then refuses the removed one (HTTP and gRPC), keeps its tokens when the file
//! breaks, counts reloads and requests by token name, and names the token (never the
//! token itself) on the platform's per-request completion log line.

use std::path::Path;
use std::time::Duration;

use pulse_contracts::pb::query::v1 as pb;
use pulse_contracts::pb::query::v1::query_service_client::QueryServiceClient;
use pulse_platform::clickhouse::ClickHouseConfig;
use serde_json::Value;

use crate::support::child_process::{binary, free_port};
use crate::support::cleanup::{Database, TempDir};
use crate::support::{metric_sum, wait_until};

/// A fresh database with Pulse's schema, dropped with the guard.
async fn database() -> Database {
    let ch = Database::unique("pulse_query_tokens");
    ch.server_client()
        .query(&format!("CREATE DATABASE {}", ch.database))
        .execute()
        .await
        .unwrap();
    pulse_storage::migrate::migrate(&ch).await.unwrap();
    ch
}

/// Replaces `file`'s content at once (written beside it and renamed over it, as a
/// Kubernetes secret update does), so a reload never sees half a file.
fn replace(file: &Path, content: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The binary on free ports with JSON logs (the completion lines included), killed when
/// dropped.
struct Api {
    child: std::process::Child,
    base: String,
    grpc: String,
    admin: String,
    log: std::path::PathBuf,
    http: reqwest::Client,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api {
    async fn spawn(ch: &ClickHouseConfig, tokens_file: &Path, logs: &TempDir) -> Self {
        let addr = || format!("127.0.0.1:{}", free_port());
        let (http, grpc, admin) = (addr(), addr(), addr());
        let log = logs.path().join("query-api.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = std::process::Command::new(binary("pulse-query-api"));
        cmd.args(["--api-tokens-file", tokens_file.to_str().unwrap()])
            .args(["--api-tokens-reload-interval-ms", "100"])
            .args(["--log-format", "json"])
            .args(["--log-level", "info,pulse_platform::http=debug"])
            .args(["--freshness-cache-ms", "0"])
            .args(["--clickhouse-url", &ch.url])
            .args(["--clickhouse-database", &ch.database])
            .args(["--http-addr", &http, "--grpc-addr", &grpc])
            .args(["--admin-addr", &admin])
            .env_remove("PULSE_QUERY_API_TOKENS")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut api = Self {
            child: cmd.spawn().unwrap(),
            base: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            admin: format!("http://{admin}"),
            log,
            http: reqwest::Client::new(),
        };
        let ready = format!("{}/readyz", api.admin);
        let client = api.http.clone();
        wait_until(Duration::from_secs(30), "query-api ready", async || {
            if let Some(status) = api.child.try_wait().unwrap() {
                panic!("query-api exited ({status}): {}", api.logs());
            }
            match client.get(&ready).send().await {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        api
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status of `GET /v1/freshness` with `token`.
    async fn status(&self, token: &str) -> u16 {
        self.http
            .get(format!("{}/v1/freshness", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Waits until `token` is answered `want` (the reload is polled, not instant).
    async fn wait_status(&self, token_label: &str, token: &str, want: u16) {
        wait_until(
            Duration::from_secs(15),
            format!("the {token_label} token answered {want}"),
            async || match self.status(token).await {
                s if s == want => Ok(()),
                s => Err(s),
            },
        )
        .await;
    }

    /// The gRPC status code of `GetFreshness` with `token`.
    async fn grpc_code(&self, token: &str) -> tonic::Code {
        let mut client = QueryServiceClient::connect(self.grpc.clone())
            .await
            .unwrap();
        let mut req = tonic::Request::new(pb::FreshnessRequest {});
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match client.get_freshness(req).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    }

    async fn scrape(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The JSON log lines whose message is `message`.
fn lines_with(logs: &str, message: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

#[tokio::test]
async fn query_tokens_rotate_through_the_token_file_without_a_restart_and_are_named_never_shown() {
    let ch = database().await;
    let dir = TempDir::new("query-tokens");
    let file = dir.path().join("tokens");
    let (old, new) = (
        pulse_tests::unique("q-old-token"),
        pulse_tests::unique("q-new-token"),
    );
    let (old_name, new_name) = (
        pulse_tests::short_unique("ops-old-"),
        pulse_tests::short_unique("ops-new-"),
    );
    replace(&file, &format!("# rotation test\n{old}={old_name}\n"));
    let api = Api::spawn(&ch, &file, &dir).await;
    assert_eq!(api.status(&old).await, 200, "{}", api.logs());
    assert_eq!(api.status(&new).await, 401, "not in the file yet");

    // Old and new valid at once, without a restart…
    replace(&file, &format!("{old}={old_name}\n{new}={new_name}\n"));
    api.wait_status("new", &new, 200).await;
    assert_eq!(api.status(&old).await, 200, "the old token stays valid");
    assert_eq!(api.grpc_code(&new).await, tonic::Code::Ok);
    // …then the old one removed: refused over both transports, the new one served.
    replace(&file, &format!("{new}={new_name}\n"));
    api.wait_status("removed old", &old, 401).await;
    assert_eq!(api.status(&new).await, 200);
    assert_eq!(api.grpc_code(&old).await, tonic::Code::Unauthenticated);
    assert_eq!(api.grpc_code(&new).await, tonic::Code::Ok);

    // A broken file (a token on two lines) keeps the tokens in force, counted as an error.
    replace(&file, &format!("{old}={old_name}\n{old}=again\n"));
    let text = wait_until(
        Duration::from_secs(15),
        "the broken token file's reload to fail",
        async || {
            let text = api.scrape().await;
            match metric_sum(
                &text,
                "pulse_query_api_tokens_reload_total",
                &["outcome=\"error\""],
            ) {
                Some(n) if n >= 1.0 => Ok(text),
                n => Err(n),
            }
        },
    )
    .await;
    assert_eq!(api.status(&new).await, 200, "the previous tokens stay");
    assert_eq!(api.status(&old).await, 401, "the broken file was not taken");
    let ok_reloads = metric_sum(
        &text,
        "pulse_query_api_tokens_reload_total",
        &["outcome=\"ok\""],
    );
    assert!(ok_reloads.is_some_and(|n| n >= 2.0), "{text}");
    assert_eq!(metric_sum(&text, "pulse_query_api_tokens", &[]), Some(1.0));
    let by_name = |name: &str| {
        metric_sum(
            &text,
            "pulse_query_authenticated_requests_total",
            &[&format!("key=\"{name}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(
        by_name(&old_name) >= 2.0 && by_name(&new_name) >= 3.0,
        "{text}"
    );
    assert!(
        !text.contains(&old) && !text.contains(&new),
        "a token in the metrics"
    );

    // The completion line of every request names the token it was served under.
    let logs = wait_until(
        Duration::from_secs(10),
        "the completion line naming the new token",
        async || {
            let logs = api.logs();
            if lines_with(&logs, "request served")
                .iter()
                .any(|l| l["fields"]["auth.key"] == new_name.as_str())
            {
                Ok(logs)
            } else {
                Err(logs.lines().count())
            }
        },
    )
    .await;
    let completions = lines_with(&logs, "request served");
    let line = completions
        .iter()
        .find(|l| l["fields"]["auth.key"] == new_name.as_str())
        .unwrap();
    assert_eq!(line["fields"]["status"], 200, "{line}");
    assert_eq!(line["fields"]["route"], "/v1/freshness", "{line}");
    assert!(
        completions
            .iter()
            .any(|l| l["fields"]["auth.key"] == old_name.as_str()),
        "the old token's requests are named too:\n{logs}"
    );
    let refused = completions
        .iter()
        .find(|l| l["fields"]["status"] == 401)
        .unwrap_or_else(|| panic!("no completion line of a refused request:\n{logs}"));
    assert!(refused["fields"].get("auth.key").is_none(), "{refused}");
    // The reloads name the tokens; nothing anywhere in the log shows one.
    let reloaded = lines_with(
        &logs,
        "query API tokens reloaded from the token file; they apply to new requests",
    );
    assert!(
        reloaded
            .iter()
            .any(|l| l.to_string().contains(&new_name) && l.to_string().contains(&old_name)),
        "{logs}"
    );
    assert!(
        !lines_with(
            &logs,
            "query API token file reload failed; the previous tokens stay in force"
        )
        .is_empty(),
        "{logs}"
    );
    // Every reload is the query API's audit record (the INFO `audit` line; it has no audit
    // topic): `ok` naming the tokens, `failed` with the reason.
    let audits = lines_with(&logs, "audit");
    let audited = |outcome: &str, text: &str| {
        audits.iter().any(|l| {
            let f = &l["fields"];
            f["audit.action"] == "keys.query-tokens.reload"
                && f["audit.actor"] == "file"
                && f["audit.outcome"] == outcome
                && f["audit.detail"].as_str().is_some_and(|d| d.contains(text))
        })
    };
    assert!(
        audited("ok", &new_name) && audited("ok", &old_name),
        "{logs}"
    );
    assert!(audited("failed", "previous tokens stay in force"), "{logs}");
    assert!(
        !logs.contains(&old) && !logs.contains(&new),
        "a token in the log:\n{logs}"
    );
}

//! The query API's bearer tokens rotate through `--api-tokens-file` without a restart: the
//! real `pulse-query-api` binary against the real ClickHouse takes a new token next to the
//! old one, then refuses the removed one (HTTP and gRPC), keeps its tokens when the file
//! breaks, counts reloads and requests by token name, and names the token (never the
//! token itself) on the platform's per-request completion log line. Every reload, taken
//! or not, is an audit record on the audit topic that `pulsectl audit` lists and a writer
//! copies into ClickHouse's `audit_log`; with the broker down the query API still starts,
//! serves and stays ready, and counts the records it could not write.

use std::path::Path;
use std::time::Duration;

use pulse_contracts::pb::query::v1 as pb;
use pulse_contracts::pb::query::v1::query_service_client::QueryServiceClient;
use pulse_platform::audit::{AuditRecord, Outcome};
use pulse_platform::clickhouse::ClickHouseConfig;
use serde_json::Value;

use crate::support::cleanup::{Database, TempDir};
use crate::support::service_process::{ServiceCommand, ServiceProcess, free_addr};
use crate::support::writer_process::{WriterProcess, WriterTopics};
use crate::support::{metric_sum, wait_until};

/// A fresh database with Pulse's schema, dropped with the guard.
async fn database() -> Database {
    Database::migrated("pulse_query_tokens").await
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
    process: ServiceProcess,
    base: String,
    grpc: String,
    http: reqwest::Client,
}

impl Api {
    /// Started with `kafka`'s flags (brokers, audit topic, …) and waited for until ready.
    async fn spawn(
        ch: &ClickHouseConfig,
        tokens_file: &Path,
        logs: &TempDir,
        kafka: &[&str],
    ) -> Self {
        let (http, grpc) = (free_addr(), free_addr());
        let mut process = ServiceCommand::new("pulse-query-api")
            .args(["--api-tokens-file", tokens_file.to_str().unwrap()])
            .args(["--api-tokens-reload-interval-ms", "100"])
            .log_format("json")
            .args(["--log-level", "info,pulse_platform::http=debug"])
            .args(["--freshness-cache-ms", "0"])
            .args(["--clickhouse-url", &ch.url])
            .args(["--clickhouse-database", &ch.database])
            .args(["--http-addr", &http, "--grpc-addr", &grpc])
            .args(kafka)
            .env_remove("PULSE_QUERY_API_TOKENS")
            .env_remove("PULSE_AUDIT_TOPIC")
            .spawn(logs.path().join("query-api.log"));
        process.wait_ready(Duration::from_secs(30)).await;
        Self {
            process,
            base: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            http: reqwest::Client::new(),
        }
    }

    fn logs(&self) -> String {
        self.process.logs()
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

    /// Waits until the series of `name` with `labels` add up to at least `min`; returns
    /// that scrape.
    async fn wait_metric(&self, what: &str, name: &str, labels: &[&str], min: f64) -> String {
        wait_until(Duration::from_secs(30), what, async || {
            let text = self.process.metrics().await;
            match metric_sum(&text, name, labels) {
                Some(n) if n >= min => Ok(text),
                n => Err(n),
            }
        })
        .await
    }

    /// The status of the admin server's `path` (`/readyz`, `/livez`).
    async fn admin_status(&self, path: &str) -> u16 {
        reqwest::get(format!("http://{}{path}", self.process.admin()))
            .await
            .unwrap()
            .status()
            .as_u16()
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
    let (audit_topic, _audit_topic, _) = crate::audit::new_audit_topic("audit-query").await;
    let brokers = pulse_tests::kafka().brokers;
    let kafka = ["--kafka-brokers", &brokers, "--audit-topic", &audit_topic];
    let api = Api::spawn(&ch, &file, &dir, &kafka).await;
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
    let text = api
        .wait_metric(
            "the broken token file's reload to fail",
            "pulse_query_api_tokens_reload_total",
            &["outcome=\"error\""],
            1.0,
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
    // Every reload is also logged as the INFO `audit` line: `ok` naming the tokens, `failed`
    // with the reason.
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

    // The three reloads on the audit topic, as `pulsectl audit` lists them: who (`file`),
    // what, the file, the outcome and the token names (never a token).
    let action = "keys.query-tokens.reload";
    let records = wait_until(
        Duration::from_secs(30),
        "the three reload records on the audit topic",
        async || {
            let r = crate::audit::audit_json(&audit_topic, &["--action", action]).await;
            if r.len() >= 3 { Ok(r) } else { Err(r) }
        },
    )
    .await;
    assert_eq!(records.len(), 3, "one record per reload: {records:#?}");
    for r in &records {
        assert_eq!(
            (r.service.as_str(), r.actor.as_str(), r.action.as_str()),
            ("query-api", "file", action),
            "{r:?}"
        );
        assert_eq!(r.target, file.display().to_string(), "{r:?}");
        let json = serde_json::to_string(r).unwrap();
        assert!(
            !json.contains(&old) && !json.contains(&new),
            "a token in the audit trail: {json}"
        );
    }
    let outcomes: Vec<Outcome> = records.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [Outcome::Ok, Outcome::Ok, Outcome::Failed]);
    assert_eq!(
        records[0].detail,
        format!("added [{new_name}]; removed []; re-keyed []; 2 token(s) in force")
    );
    assert_eq!(
        records[1].detail,
        format!("added []; removed [{old_name}]; re-keyed []; 1 token(s) in force")
    );
    assert!(
        records[2].detail.contains("duplicate token")
            && records[2]
                .detail
                .ends_with("; the previous tokens stay in force"),
        "{:?}",
        records[2]
    );
    let acked = api
        .wait_metric(
            "the three records acknowledged",
            "pulse_audit_records_written_total",
            &[],
            3.0,
        )
        .await;
    assert_eq!(
        metric_sum(&acked, "pulse_audit_records_written_total", &[]),
        Some(3.0)
    );

    // A ClickHouse writer copies them into `audit_log`, where `pulsectl audit --source
    // clickhouse` lists the same records.
    let topics = WriterTopics::create("audit-query").await;
    let args = crate::audit::audit_copy_args(&ch, &pulse_tests::unique("w"), &audit_topic, &topics);
    let mut writer = WriterProcess::spawn(&args, &[], dir.path().join("writer.log"));
    writer
        .wait_metric("pulse_writer_audit_rows_written_total", &[], 3.0)
        .await;
    let by_id = |mut v: Vec<AuditRecord>| {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    let stored =
        crate::audit::audit_json_from_clickhouse(&audit_topic, &ch, &["--action", action]).await;
    assert_eq!(by_id(stored), by_id(records), "the table holds the records");
    writer.kill();
}

/// The query API's availability does not depend on Kafka: with no broker at all it starts,
/// becomes ready, serves and applies a token rotation; the rotation's audit record is
/// counted as not written and logged with its fields, and the audit producer's failures
/// (recreated after the stall timeout) leave readiness and liveness alone.
#[tokio::test]
async fn query_api_serves_and_stays_ready_while_the_audit_broker_is_down() {
    let ch = database().await;
    let dir = TempDir::new("query-tokens-no-broker");
    let file = dir.path().join("tokens");
    let (old, new) = (
        pulse_tests::unique("q-old-token"),
        pulse_tests::unique("q-new-token"),
    );
    replace(&file, &format!("{old}=before\n"));
    // A port nothing listens on: the broker is down for the whole test.
    let down = free_addr();
    let audit_topic = pulse_tests::unique("audit-down");
    let kafka = [
        "--kafka-brokers",
        &down,
        "--audit-topic",
        &audit_topic,
        "--kafka-message-timeout-ms",
        "2000",
        "--kafka-producer-stall-timeout",
        "1s",
    ];
    let api = Api::spawn(&ch, &file, &dir, &kafka).await;
    assert_eq!(api.status(&old).await, 200, "{}", api.logs());

    replace(&file, &format!("{new}=after\n"));
    api.wait_status("new", &new, 200).await;
    assert_eq!(api.status(&old).await, 401);
    let failed = api
        .wait_metric(
            "the reload's audit record counted as not written",
            "pulse_audit_records_failed_total",
            &[],
            1.0,
        )
        .await;
    assert_eq!(
        metric_sum(&failed, "pulse_audit_records_written_total", &[]),
        Some(0.0),
        "{failed}"
    );
    // The producer's failures are seen (it is recreated) while the service stays ready.
    wait_until(
        Duration::from_secs(30),
        "the failing audit producer recreated",
        async || {
            let logs = api.logs();
            if lines_with(&logs, "recreating the audit producer").is_empty() {
                Err(logs.lines().count())
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(api.admin_status("/readyz").await, 200, "{}", api.logs());
    assert_eq!(api.admin_status("/livez").await, 200, "{}", api.logs());
    assert_eq!(api.status(&new).await, 200);
    // What was not written is still on record in the log, with its fields.
    let logs = api.logs();
    let unwritten = lines_with(&logs, "audit record not written to the audit topic");
    assert!(
        unwritten.iter().any(|l| {
            let f = &l["fields"];
            f["audit.action"] == "keys.query-tokens.reload"
                && f["audit.actor"] == "file"
                && f["audit.outcome"] == "ok"
                && f["audit.detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("added [after]; removed [before]"))
        }),
        "{logs}"
    );
    assert!(
        !logs.contains(&old) && !logs.contains(&new),
        "a token in the log:\n{logs}"
    );
}

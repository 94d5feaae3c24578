//! The audit trail and the user-id PII policy against the real broker: a schema registry
//! process with credentials audits a register, a config change and refused writes (an
//! anonymous one, a read-only user's) to its audit topic, and `pulsectl audit` lists them
//! with the right actor, outcome, status and caller address; `pulsectl dlq redrive` audits
//! itself with the operator from `--actor`. An ingest with `key.user_id=hash` stores an
//! e-mail user id only as its HMAC (record key and value), and with
//! `key.user_id.email=refuse` rejects it naming `key.user_id`, keeping neither the address
//! as the DLQ key nor (with `--dlq-original redact`) in the DLQ record's bytes. (The query
//! API's token file reloads are asserted in `query_api_tokens`, with these helpers.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulse_platform::audit::{AuditRecord, Outcome};
use pulse_platform::clock::now_ms;
use pulse_schema_registry::auth::{Role, hash_line};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::child_process::{binary, free_port};
use crate::support::wait::wait_until;
use crate::support::{cleanup, events, ingest_server, metric_sum};

const WRITER: (&str, &str) = ("ci-deploy", "write-pass-audit");
const READER: (&str, &str) = ("dashboards", "read-pass-audit");

/// A registry process with `WRITER` and `READER`, auditing to a topic of its own.
struct Registry {
    _child: Child,
    base: String,
    admin: String,
    audit_topic: String,
    /// The credentials file (`--auth-file`), re-read every 200 ms.
    users_file: PathBuf,
    _dir: cleanup::TempDir,
    _topics: cleanup::Topics,
}

impl Registry {
    async fn start() -> Self {
        let dir = cleanup::TempDir::new("audit-sr");
        let file: PathBuf = dir.path().join("users");
        let lines = [
            hash_line(WRITER.0, Role::Write, WRITER.1).unwrap(),
            hash_line(READER.0, Role::Read, READER.1).unwrap(),
        ];
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let schemas = pulse_tests::unique("_schemas");
        let audit_topic = pulse_tests::unique("audit");
        let (port, admin) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut child = Command::new(binary("pulse-schema-registry"))
            .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
            .env("PULSE_KAFKA_REPLICATION_FACTOR", "1")
            .env("PULSE_KAFKA_MIN_INSYNC_REPLICAS", "1")
            .env("PULSE_SCHEMAS_TOPIC", &schemas)
            .env("PULSE_AUDIT_TOPIC", &audit_topic)
            .env("PULSE_SCHEMA_REGISTRY_ADDR", format!("127.0.0.1:{port}"))
            .env("PULSE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .env("PULSE_REGISTRY_AUTH_FILE", &file)
            .env("PULSE_REGISTRY_AUTH_RELOAD_INTERVAL_MS", "200")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        let log_path = dir.path().join("registry.log");
        wait_until(
            Duration::from_secs(90),
            "the registry to be ready",
            async || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the registry exited ({status}): {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                match reqwest::get(&ready).await {
                    Ok(resp) if resp.status() == 200 => Ok(()),
                    Ok(resp) => Err(resp.status().to_string()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        Self {
            _child: child,
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin}"),
            audit_topic: audit_topic.clone(),
            users_file: file,
            _dir: dir,
            _topics: cleanup::Topics::adopt([schemas, audit_topic]),
        }
    }

    /// A request as `user` (`None`: anonymous); returns the status.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<(&str, &str)>,
        body: Value,
    ) -> u16 {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&body);
        if let Some((u, p)) = user {
            req = req.basic_auth(u, Some(p));
        }
        req.send().await.unwrap().status().as_u16()
    }
}

/// Runs `pulsectl ARGS`; returns (success, stdout, stderr).
async fn pulsectl(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(binary("pulsectl"));
    cmd.args(args)
        .env_remove("PULSE_ACTOR")
        .env_remove("PULSE_AUDIT_TOPIC")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("pulsectl did not finish in 120 s")
        .expect("running pulsectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pulsectl audit --json` on `topic` with `extra` filters: the records it prints.
pub(crate) async fn audit_json(topic: &str, extra: &[&str]) -> Vec<AuditRecord> {
    let brokers = pulse_tests::kafka().brokers;
    let mut args = vec![
        "audit",
        "--json",
        "--audit-topic",
        topic,
        "--kafka-brokers",
        &brokers,
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = pulsectl(&args, &[]).await;
    assert!(ok, "pulsectl audit failed:\n{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn find<'a>(records: &'a [AuditRecord], action: &str, actor: &str) -> Option<&'a AuditRecord> {
    records
        .iter()
        .find(|r| r.action == action && r.actor == actor)
}

#[tokio::test]
async fn registry_writes_and_refused_writes_are_listed_by_pulsectl_audit_with_actor_and_outcome() {
    use reqwest::Method as M;
    let registry = Registry::start().await;
    let subject = format!("{}-value", pulse_tests::unique("audited"));
    let schema = json!({
        "schemaType": "PROTOBUF",
        "schema": "syntax = \"proto3\";\npackage audited;\nmessage M {\n  string f = 1;\n}\n",
    });
    let versions = format!("/subjects/{subject}/versions");
    let config = format!("/config/{subject}");
    assert_eq!(
        registry
            .call(M::POST, &versions, Some(WRITER), schema)
            .await,
        200
    );
    let full = json!({ "compatibility": "FULL" });
    assert_eq!(
        registry
            .call(M::PUT, &config, Some(WRITER), full.clone())
            .await,
        200
    );
    assert_eq!(
        registry.call(M::PUT, "/config", None, full.clone()).await,
        401
    );
    assert_eq!(
        registry.call(M::PUT, &config, Some(READER), full).await,
        403
    );
    // A read is not an administrative change: not audited.
    assert_eq!(
        registry
            .call(M::GET, "/subjects", Some(READER), Value::Null)
            .await,
        200
    );

    let records = wait_until(Duration::from_secs(30), "four audit records", async || {
        let r = audit_json(&registry.audit_topic, &[]).await;
        if r.len() >= 4 { Ok(r) } else { Err(r) }
    })
    .await;
    assert_eq!(records.len(), 4, "{records:#?}");
    assert!(records.iter().all(|r| r.service == "schema-registry"));
    assert!(
        records.iter().all(|r| r
            .source
            .as_deref()
            .is_some_and(|s| s.starts_with("127.0.0.1:"))),
        "the caller's address: {records:#?}"
    );

    let register = find(&records, "schema.register", WRITER.0).expect("register");
    assert_eq!(
        (register.outcome, register.status, register.target.as_str()),
        (Outcome::Ok, Some(200), subject.as_str())
    );
    let change = find(&records, "schema.config", WRITER.0).expect("config change");
    assert_eq!(
        (change.outcome, change.status, change.target.as_str()),
        (Outcome::Ok, Some(200), subject.as_str())
    );
    assert_eq!(
        change.detail,
        format!("PUT {config} {{\"compatibility\":\"FULL\"}}"),
        "what was set"
    );
    let anonymous = find(&records, "schema.config", "anonymous").expect("anonymous refusal");
    assert_eq!(
        (
            anonymous.outcome,
            anonymous.status,
            anonymous.target.as_str()
        ),
        (Outcome::Refused, Some(401), "*")
    );
    assert!(
        anonymous.detail.contains("refused: missing"),
        "{anonymous:?}"
    );
    let forbidden = find(&records, "schema.config", READER.0).expect("read-only refusal");
    assert_eq!(
        (forbidden.outcome, forbidden.status),
        (Outcome::Refused, Some(403))
    );
    assert!(
        forbidden.detail.contains("refused: forbidden"),
        "{forbidden:?}"
    );
    // Oldest first.
    assert!(records.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));

    // Filters: by action (exact and family) and time; the text form names the actors.
    let only = audit_json(&registry.audit_topic, &["--action", "schema.register"]).await;
    assert_eq!(only.len(), 1, "{only:#?}");
    let family = audit_json(
        &registry.audit_topic,
        &["--action", "schema", "--since", "1h"],
    )
    .await;
    assert_eq!(family.len(), 4);
    let future = (now_ms() + 3_600_000).to_string();
    assert!(
        audit_json(&registry.audit_topic, &["--since", &future])
            .await
            .is_empty()
    );
    let brokers = pulse_tests::kafka().brokers;
    let (ok, text, _) = pulsectl(
        &[
            "audit",
            "--audit-topic",
            &registry.audit_topic,
            "--kafka-brokers",
            &brokers,
            "--who",
            "anonymous",
        ],
        &[],
    )
    .await;
    assert!(ok);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0]
            .contains("  schema-registry  anonymous  schema.config  *  refused 401  127.0.0.1:"),
        "{text}"
    );

    // The writes were counted; the failure series exists (at zero) in a live scrape.
    let metrics = reqwest::get(format!("{}/metrics", registry.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_sum(&metrics, "pulse_audit_records_written_total", &[]),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "pulse_audit_records_failed_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        pulse_schema_registry::AUDIT_TOPIC,
        pulse_contracts::topics::AUDIT
    );
}

#[tokio::test]
async fn a_registry_credentials_reload_is_audited_by_user_name_never_by_hash() {
    let registry = Registry::start().await;
    // Rotate: the writer gets a new password, a second writer comes, the reader goes.
    let new_pass = "write-pass-audit-2";
    let lines = [
        hash_line(WRITER.0, Role::Write, new_pass).unwrap(),
        hash_line("ci-deploy-2", Role::Write, "second-writer-pass").unwrap(),
    ];
    // Written beside and renamed over, so a reload never sees half a file.
    let replace = |text: String| {
        let next = registry.users_file.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &registry.users_file).unwrap();
    };
    replace(lines.join("\n") + "\n");
    wait_until(Duration::from_secs(30), "the reload's record", async || {
        let r = audit_json(&registry.audit_topic, &["--action", "keys"]).await;
        if r.is_empty() { Err(r) } else { Ok(()) }
    })
    .await;
    // A broken file keeps the users, and is audited as failed.
    replace("not a credentials line\n".into());
    let records = wait_until(Duration::from_secs(30), "two reload records", async || {
        let r = audit_json(
            &registry.audit_topic,
            &["--action", "keys.registry-users.reload"],
        )
        .await;
        if r.len() >= 2 { Ok(r) } else { Err(r) }
    })
    .await;
    assert_eq!(records.len(), 2, "{records:#?}");
    let (ok, failed) = (&records[0], &records[1]);
    assert_eq!(
        (ok.service.as_str(), ok.actor.as_str(), ok.outcome),
        ("schema-registry", "file", Outcome::Ok)
    );
    assert_eq!(ok.target, registry.users_file.display().to_string());
    assert_eq!(
        ok.detail,
        "added [ci-deploy-2]; removed [dashboards]; changed [ci-deploy]; 2 user(s)"
    );
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(failed.detail.contains("line 1"), "{failed:?}");
    // The new password works, the old one no longer does.
    let config = json!({ "compatibility": "FULL" });
    assert_eq!(
        registry
            .call(
                reqwest::Method::PUT,
                "/config",
                Some((WRITER.0, new_pass)),
                config.clone()
            )
            .await,
        200
    );
    assert_eq!(
        registry
            .call(reqwest::Method::PUT, "/config", Some(WRITER), config)
            .await,
        401
    );
    for r in &records {
        let text = serde_json::to_string(r).unwrap();
        assert!(
            !text.contains("argon2") && !text.contains("pass"),
            "a hash or password in the audit trail: {text}"
        );
    }
}

/// An in-process ingest with its own topics and `extra` flags, framing with a fixed id.
async fn start_ingest(extra: &[&str]) -> (pulse_ingest::Servers, String, String, cleanup::Topics) {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("events");
    let dlq_topic = pulse_tests::unique("dlq");
    let topics = ingest_server::create_topics(&events_topic, &dlq_topic, 1).await;
    let cfg = ingest_server::config(
        &kafka,
        "audit-key=audit",
        "audit-hmac-key",
        &events_topic,
        &dlq_topic,
        extra,
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(1));
    let servers = ingest_server::serve(&kafka, &cfg, framer, "audit-test").await;
    (servers, events_topic, dlq_topic, topics)
}

async fn post(servers: &pulse_ingest::Servers, body: Vec<u8>) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/events", servers.http_addr))
        .header("Authorization", "Bearer audit-key")
        .body(body)
        .send()
        .await
        .unwrap();
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_dlq_redrive_is_audited_with_the_operator_and_its_outcome() {
    let (servers, _events, dlq, _topics) = start_ingest(&[]).await;
    // An event without a user id is rejected onto the DLQ.
    let bad = json!({ "event_id": "audit-bad-1", "schema_version": 1, "event_type": "page_view",
                      "key": {}, "metadata": { "event_timestamp": now_ms() } });
    let answer = post(&servers, serde_json::to_vec(&bad).unwrap()).await;
    assert_eq!(answer["rejected"], 1, "{answer}");
    let on_dlq = ingest_server::read_exactly(&dlq, 1).await;
    let position = format!("{}:{}", on_dlq[0].partition(), on_dlq[0].offset());

    let audit_topic = pulse_tests::unique("audit");
    let _audit = cleanup::Topics::adopt([audit_topic.clone()]);
    let brokers = pulse_tests::kafka().brokers;
    let target = format!("http://{}", servers.http_addr);
    let (ok, stdout, stderr) = pulsectl(
        &[
            "--actor",
            "ops-alice",
            "dlq",
            "redrive",
            "--offsets",
            &position,
            "--target",
            &target,
            "--topic",
            &dlq,
            "--kafka-brokers",
            &brokers,
            "--audit-topic",
            &audit_topic,
        ],
        &[
            ("PULSE_KAFKA_REPLICATION_FACTOR", "1"),
            ("PULSE_KAFKA_MIN_INSYNC_REPLICAS", "1"),
            ("PULSE_API_KEY", "audit-key"),
        ],
    )
    .await;
    assert!(ok, "redrive failed:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("audit record"),
        "the record was written:\n{stderr}"
    );
    // A redrive that ingest refuses (a wrong API key) fails, and is audited as failed,
    // with the operator from $USER.
    let (ok, _, stderr) = pulsectl(
        &[
            "dlq",
            "redrive",
            "--offsets",
            &position,
            "--target",
            &target,
            "--topic",
            &dlq,
            "--kafka-brokers",
            &brokers,
            "--audit-topic",
            &audit_topic,
        ],
        &[("USER", "ops-bob"), ("PULSE_API_KEY", "not-a-key")],
    )
    .await;
    assert!(!ok, "a redrive with a wrong key fails:\n{stderr}");

    let records = audit_json(&audit_topic, &["--action", "dlq.redrive"]).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    let done = find(&records, "dlq.redrive", "ops-alice").expect("alice's redrive");
    assert_eq!(
        (done.outcome, done.target.as_str()),
        (Outcome::Ok, dlq.as_str())
    );
    assert_eq!(done.service, "pulsectl");
    assert!(
        done.detail.contains("1 record(s) to http://127.0.0.1:"),
        "{done:?}"
    );
    let failed = find(&records, "dlq.redrive", "ops-bob").expect("bob's redrive");
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(failed.detail.contains("401"), "the error: {failed:?}");
}

#[tokio::test]
async fn an_email_user_id_is_stored_only_as_its_hmac_on_the_events_topic() {
    let (servers, events_topic, _dlq, _topics) =
        start_ingest(&["--pii-policy", "key.user_id=hash,email=hash"]).await;
    let address = "dana.doe@example.com";
    let sample = events::event("pii-1", address, now_ms()).page("/home");
    let answer = post(&servers, serde_json::to_vec(&sample.json()).unwrap()).await;
    assert_eq!(answer["accepted"], 1, "{answer}");
    let records = ingest_server::read_exactly(&events_topic, 1).await;
    let record: &OwnedMessage = &records[0];
    let key = String::from_utf8(record.key().unwrap().to_vec()).unwrap();
    assert!(
        key.starts_with("hmac:") && key.len() == 37,
        "the Kafka key is the HMAC: {key}"
    );
    let value = record.payload().unwrap();
    let event = ev::Event::decode(pulse_contracts::wire::unframe(value).unwrap().payload).unwrap();
    assert_eq!(
        event.key.as_ref().unwrap().user_id,
        key,
        "the same pseudonym"
    );
    for bytes in [record.key().unwrap(), value] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains("dana") && !text.contains("example.com"),
            "{text}"
        );
    }
    // Stable: the same user's next event has the same pseudonym (per-user metrics work).
    let next = events::event("pii-2", address, now_ms()).page("/cart");
    post(&servers, serde_json::to_vec(&next.json()).unwrap()).await;
    let both = ingest_server::read_exactly(&events_topic, 2).await;
    assert!(both.iter().all(|m| m.key() == record.key()));
}

#[tokio::test]
async fn a_refused_email_user_id_names_the_field_and_stays_out_of_the_dlq() {
    let (servers, _events, dlq, _topics) = start_ingest(&[
        "--pii-policy",
        "key.user_id.email=refuse",
        "--dlq-original",
        "redact",
    ])
    .await;
    let sample = events::event("pii-3", "erin@example.org", now_ms()).page("/home");
    let answer = post(&servers, serde_json::to_vec(&sample.json()).unwrap()).await;
    assert_eq!(answer["rejected"], 1, "{answer}");
    let text = answer.to_string();
    assert_eq!(
        answer["results"][0]["error"]["field"], "key.user_id",
        "{text}"
    );
    assert_eq!(
        answer["results"][0]["error"]["code"], "pii_refused",
        "{text}"
    );
    assert!(
        !text.contains("erin"),
        "the answer does not echo the address: {text}"
    );
    let on_dlq = ingest_server::read_exactly(&dlq, 1).await;
    let record = &on_dlq[0];
    let key = String::from_utf8_lossy(record.key().unwrap()).into_owned();
    assert!(key.starts_with("hmac:"), "{key}");
    let kept: Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
    assert_eq!(
        kept["key"]["user_id"],
        key.as_str(),
        "the bytes are redacted"
    );
    assert_eq!(kept["event_id"], "pii-3");
    let all = format!(
        "{key}{}{:?}",
        String::from_utf8_lossy(record.payload().unwrap()),
        record.headers().map(|h| h
            .iter()
            .map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
            .collect::<Vec<_>>())
    );
    assert!(!all.contains("erin"), "{all}");
    assert!(all.contains("fields"), "flagged as redacted: {all}");
}

#[tokio::test]
async fn an_api_key_file_reload_is_audited_by_key_name_never_by_key() {
    let dir = cleanup::TempDir::new("audit-keys");
    let file = dir.path().join("api-keys");
    let (old, new, other) = (
        pulse_tests::unique("old-secret"),
        pulse_tests::unique("new-secret"),
        pulse_tests::unique("ios-secret"),
    );
    std::fs::write(&file, format!("{old}=web:web-old\n")).unwrap();
    let audit_topic = pulse_tests::unique("audit");
    let single = pulse_platform::kafka::KafkaConfig {
        topics: pulse_platform::kafka::TopicSettings::single_broker(),
        ..pulse_tests::kafka()
    };
    pulse_platform::kafka::ensure_topics(
        &single,
        &[pulse_platform::audit::topic_spec(&audit_topic)],
    )
    .await
    .unwrap();
    let _audit = cleanup::Topics::adopt([audit_topic.clone()]);
    let (_servers, _events, _dlq, _topics) = start_ingest(&[
        "--api-keys-file",
        file.to_str().unwrap(),
        "--api-keys-reload-interval",
        "200ms",
        "--audit-topic",
        &audit_topic,
    ])
    .await;

    // Rotate: the old key goes, a new one for the same source and one more come.
    std::fs::write(&file, format!("{new}=web:web-new\n{other}=ios\n")).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the reload's audit record",
        async || {
            let r = audit_json(&audit_topic, &["--action", "keys"]).await;
            if r.is_empty() { Err(r) } else { Ok(()) }
        },
    )
    .await;
    // A file that does not parse keeps the keys, and is audited as failed.
    std::fs::write(&file, "not a key line\n").unwrap();
    let records = wait_until(Duration::from_secs(30), "two reload records", async || {
        let r = audit_json(&audit_topic, &["--action", "keys.reload"]).await;
        if r.len() >= 2 { Ok(r) } else { Err(r) }
    })
    .await;
    assert_eq!(records.len(), 2, "{records:#?}");
    let (ok, failed) = (&records[0], &records[1]);
    assert_eq!(
        (ok.service.as_str(), ok.actor.as_str(), ok.outcome),
        ("ingest", "file", Outcome::Ok)
    );
    assert_eq!(ok.target, file.display().to_string());
    assert_eq!(
        ok.detail, "added [ios, web-new]; removed [web-old]; re-keyed []; 3 key(s) in force",
        "the inline key counts too"
    );
    assert_eq!(
        (failed.actor.as_str(), failed.outcome),
        ("file", Outcome::Failed)
    );
    assert!(failed.detail.contains("line 1"), "{failed:?}");
    for r in &records {
        let json = serde_json::to_string(r).unwrap();
        for secret in [&old, &new, &other] {
            assert!(
                !json.contains(secret.as_str()),
                "a key in the audit trail: {json}"
            );
        }
    }
}

/// `pulsectl audit --json --source clickhouse` on `topic`'s copy in `ch`, with `extra`.
pub(crate) async fn audit_json_from_clickhouse(
    topic: &str,
    ch: &pulse_platform::clickhouse::ClickHouseConfig,
    extra: &[&str],
) -> Vec<AuditRecord> {
    let mut args = vec![
        "--source",
        "clickhouse",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
    ];
    args.extend_from_slice(extra);
    audit_json(topic, &args).await
}

/// A new audit topic named after `prefix` (as the services create it, on the one test
/// broker; deleted when the guard drops), and those single-broker Kafka settings.
pub(crate) async fn new_audit_topic(
    prefix: &str,
) -> (String, cleanup::Topics, pulse_platform::kafka::KafkaConfig) {
    let single = pulse_platform::kafka::KafkaConfig {
        topics: pulse_platform::kafka::TopicSettings::single_broker(),
        ..pulse_tests::kafka()
    };
    let topic = pulse_tests::unique(prefix);
    pulse_platform::kafka::ensure_topics(&single, &[pulse_platform::audit::topic_spec(&topic)])
        .await
        .unwrap();
    let guard = cleanup::Topics::adopt([topic.clone()]);
    (topic, guard, single)
}

/// The flags of a ClickHouse writer in `group` that copies `audit_topic` into `ch`.
pub(crate) fn audit_copy_args(
    ch: &pulse_platform::clickhouse::ClickHouseConfig,
    group: &str,
    audit_topic: &str,
    topics: &crate::support::writer_process::WriterTopics,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--group-id",
        group,
        "--audit-topic",
        audit_topic,
        "--batch-max-age-ms",
        "100",
    ]
    .map(String::from)
    .to_vec();
    a.extend(topics.flags());
    a
}

/// The rows of `audit_log` copied from `topic`, as stored (no dedup): (offset, actor, action).
async fn stored_rows(
    ch: &pulse_platform::clickhouse::ClickHouseConfig,
    topic: &str,
) -> Vec<(i64, String, String)> {
    ch.client()
        .query(
            "SELECT kafka_offset, actor, action FROM audit_log WHERE kafka_topic = ? \
             ORDER BY kafka_offset",
        )
        .bind(topic)
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_writer_copies_the_audit_topic_into_clickhouse_exactly_once_across_a_restart() {
    use crate::support::writer_process::{WriterProcess, WriterTopics};
    use pulse_platform::audit::{action, write_now};
    use pulse_platform::kafka::{KafkaProducer, RecordProducer as _};

    let ch = cleanup::Database::unique("pulse_audit");
    let dir = cleanup::TempDir::new("audit-writer");
    let (audit_topic, _audit, single) = new_audit_topic("audit").await;
    let producer = KafkaProducer::new(&single, "audit-copy-test").unwrap();
    let write = async |record: AuditRecord| {
        write_now(&producer, &audit_topic, &record, Duration::from_secs(10))
            .await
            .unwrap();
    };
    // Three replays by one operator, then a record that is not audit JSON (skipped).
    for i in 0..3 {
        write(
            AuditRecord::new(
                "pulsectl",
                "ops-carol",
                action::REPLAY,
                &format!("range-{i}"),
                Outcome::Ok,
            )
            .with_source("pulsectl@bastion")
            .with_detail(format!("replay {i}")),
        )
        .await;
    }
    let unreadable = producer
        .enqueue(pulse_platform::kafka::OutRecord::new(
            &audit_topic,
            None,
            b"not an audit record".to_vec(),
        ))
        .unwrap()
        .await
        .unwrap()
        .offset;

    let topics = WriterTopics::create("audit").await;
    // The database migrated beforehand: a writer that applies migrations records them on
    // this topic (`migrate`, actor `pulse-writer`), which would be copied as a fourth row.
    pulse_storage::migrate::migrate(&ch).await.unwrap();
    let args = |group: &str| audit_copy_args(&ch, group, &audit_topic, &topics);
    let log = dir.path().join("writer.log");
    let mut first = WriterProcess::spawn(&args(&pulse_tests::unique("w")), &[], log.clone());
    first
        .wait_metric("pulse_writer_audit_rows_written_total", &[], 3.0)
        .await;
    first
        .wait_metric(
            "pulse_writer_audit_rows_skipped_total",
            &["reason=\"unreadable\""],
            1.0,
        )
        .await;
    let rows = stored_rows(&ch, &audit_topic).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.0 < unreadable && r.1 == "ops-carol"));
    // The failure series is in the live scrape, at zero.
    assert_eq!(
        first
            .metric("pulse_writer_audit_rows_failed_total", &[])
            .await,
        Some(0.0)
    );

    // A crash (SIGKILL: no final commit), and the next writer re-reads the whole topic
    // (a group of its own: the worst case of a crash before any commit). Nothing stored
    // is inserted again; a new record is.
    first.kill();
    let mut second = WriterProcess::spawn(&args(&pulse_tests::unique("w")), &[], log.clone());
    second
        .wait_metric(
            "pulse_writer_audit_rows_skipped_total",
            &["reason=\"duplicate\""],
            3.0,
        )
        .await;
    write(
        AuditRecord::new(
            "pulsectl",
            "ops-dave",
            action::MIGRATE,
            "pulse",
            Outcome::Failed,
        )
        .with_detail("migration 5 failed"),
    )
    .await;
    second
        .wait_metric("pulse_writer_audit_rows_written_total", &[], 1.0)
        .await;
    let rows = stored_rows(&ch, &audit_topic).await;
    let offsets: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(offsets.len(), 4, "each record once: {rows:?}");
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]) && !offsets.contains(&unreadable),
        "each offset once, the unreadable record's not at all: {rows:?}"
    );
    assert_eq!(
        (rows[3].1.as_str(), rows[3].2.as_str()),
        ("ops-dave", "migrate")
    );
    assert_eq!(
        second
            .metric("pulse_writer_audit_rows_written_total", &[])
            .await,
        Some(1.0),
        "the restarted writer inserted only the new record"
    );

    // `pulsectl audit --source clickhouse` lists them like the topic does, with filters.
    let from_table = audit_json_from_clickhouse(&audit_topic, &ch, &[]).await;
    let from_topic = audit_json(&audit_topic, &[]).await;
    assert_eq!(from_table.len(), 4, "{from_table:#?}");
    let by_id = |mut v: Vec<AuditRecord>| {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    assert_eq!(
        by_id(from_table),
        by_id(from_topic),
        "the copy holds the records unchanged"
    );
    let carol = audit_json_from_clickhouse(&audit_topic, &ch, &["--who", "ops-carol"]).await;
    let mut targets: Vec<&str> = carol.iter().map(|r| r.target.as_str()).collect();
    targets.sort_unstable();
    assert_eq!(targets, ["range-0", "range-1", "range-2"]);
    assert!(
        carol
            .iter()
            .all(|r| r.source.as_deref() == Some("pulsectl@bastion"))
    );
    let failed = audit_json_from_clickhouse(&audit_topic, &ch, &["--action", "migrate"]).await;
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(
        (
            failed[0].actor.as_str(),
            failed[0].outcome,
            failed[0].status
        ),
        ("ops-dave", Outcome::Failed, None)
    );
    let future = (now_ms() + 3_600_000).to_string();
    assert!(
        audit_json_from_clickhouse(&audit_topic, &ch, &["--since", &future])
            .await
            .is_empty()
    );
    assert!(
        audit_json_from_clickhouse(&audit_topic, &ch, &["--since", "1h"])
            .await
            .len()
            == 4
    );
    second.kill();
}

/// `pulsectl replay` audits itself like a redrive: the operator, the topic republished to,
/// the event-time range and the outcome (a failed replay with its error); a dry run changes
/// nothing and is not audited.
#[tokio::test]
async fn a_replay_is_audited_with_its_range_and_outcome() {
    use pulse_platform::kafka::TopicSpec;

    let kafka = pulse_tests::kafka();
    let topic = pulse_tests::unique("audit_replay");
    let unregistered = pulse_tests::unique("audit_replay_unreg");
    let _topics = cleanup::Topics::create(&[
        TopicSpec::new(topic.as_str(), 1),
        TopicSpec::new(unregistered.as_str(), 1),
    ])
    .await;
    let audit_topic = pulse_tests::unique("audit");
    let _audit = cleanup::Topics::adopt([audit_topic.clone()]);
    let registry = crate::support::registry::start(&kafka).await;
    let registry_url = format!("http://{}", registry.addr);
    let r = crate::support::registry::register(
        &registry_url,
        &topic,
        pulse_contracts::schemas::EVENTS.source,
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    // Nothing is archived under this prefix: the replay has nothing to republish.
    let prefix = pulse_tests::unique("audit-replay");
    let replay = |to: &str, extra: &[&str]| -> Vec<String> {
        let mut argv: Vec<String> = [
            "replay",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T01:00:00Z",
            "--topic",
            to,
            "--schema-registry-url",
            &registry_url,
            "--kafka-brokers",
            &kafka.brokers,
            "--audit-topic",
            &audit_topic,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(crate::support::archive::s3_flags(&prefix));
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    };
    let run = async |argv: Vec<String>, user: &str| {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        pulsectl(&args, &[("USER", user)]).await
    };
    let (ok, stdout, stderr) = run(replay(&topic, &["--actor", "ops-carol"]), "x").await;
    assert!(ok, "replay failed:\n{stdout}\n{stderr}");
    let (ok, stdout, stderr) = run(replay(&topic, &["--dry-run"]), "ops-dry").await;
    assert!(ok, "dry run failed:\n{stdout}\n{stderr}");
    // No events schema for this topic: the replay fails before it publishes anything.
    let (ok, _, stderr) = run(replay(&unregistered, &[]), "ops-dave").await;
    assert!(!ok, "a replay to an unregistered topic fails:\n{stderr}");

    let records = audit_json(&audit_topic, &["--action", "replay"]).await;
    assert_eq!(records.len(), 2, "the dry run is not audited: {records:#?}");
    let done = find(&records, "replay", "ops-carol").expect("carol's replay");
    assert_eq!(
        (done.outcome, done.target.as_str(), done.service.as_str()),
        (Outcome::Ok, topic.as_str(), "pulsectl")
    );
    assert_eq!(
        done.detail, "event time 2026-01-01T00:00:00Z .. 2026-01-01T01:00:00Z",
        "{done:?}"
    );
    let failed = find(&records, "replay", "ops-dave").expect("dave's replay");
    assert_eq!(
        (failed.outcome, failed.target.as_str()),
        (Outcome::Failed, unregistered.as_str())
    );
    assert!(
        failed.detail.starts_with("event time 2026-01-01T00:00:00Z")
            && failed.detail.contains("schema id"),
        "the range and the error: {failed:?}"
    );
    registry.stop().await.unwrap();
}

/// Refusals are recorded as `refused` with their reasons, not as `failed`: a `shadow
/// promote check` and a `promote finish` on a range with nothing to compare, and a `shadow
/// discard` whose flags are refused (a registry user without a password). Records written
/// before `refused` existed (`ok`, and a refusal recorded as `failed`) still read, from the
/// topic and from the writer's ClickHouse copy.
#[tokio::test]
async fn refused_shadow_commands_are_recorded_refused_with_their_reasons() {
    use crate::support::writer_process::{WriterProcess, WriterTopics};
    use pulse_platform::kafka::{KafkaProducer, OutRecord};

    let ch = cleanup::Database::unique("pulse_audit_refused");
    pulse_storage::migrate::migrate(&ch).await.unwrap();
    pulse_storage::migrate::create_shadow_tables(&ch, "next")
        .await
        .unwrap();
    let brokers = pulse_tests::kafka().brokers;
    let (audit_topic, _audit, single) = new_audit_topic("audit_refused").await;
    // Two records as pulsectl wrote them before this change: an ok migration and a refused
    // promote check recorded as `failed`.
    let producer = KafkaProducer::new(&single, "audit-refused-test").unwrap();
    for (id, action, outcome, detail) in [
        ("old-1", "migrate", "ok", "database pulse migrated"),
        (
            "old-2",
            "shadow.promote.check",
            "failed",
            "windows [1970-01-01T00:00:00Z, 1970-01-01T00:01:00Z), tolerance 0: refused: x",
        ),
    ] {
        let json = json!({"v": 1, "id": id, "ts_ms": 1_000, "service": "pulsectl",
            "actor": "ops-old", "action": action, "target": "next", "outcome": outcome,
            "source": "pulsectl@old", "detail": detail});
        producer
            .send(
                OutRecord::new(&audit_topic, None, json.to_string().into_bytes()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    let common: Vec<String> = [
        "--shadow",
        "next",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--audit-topic",
        &audit_topic,
        "--actor",
        "ops-erin",
        "--kafka-brokers",
        &brokers,
        "--kafka-replication-factor",
        "1",
        "--kafka-min-insync-replicas",
        "1",
    ]
    .map(String::from)
    .to_vec();
    let run = async |head: &[&str], tail: &[&str]| {
        let mut args: Vec<&str> = head.to_vec();
        args.extend(common.iter().map(String::as_str));
        args.extend_from_slice(tail);
        pulsectl(&args, &[]).await
    };
    let range = ["--from", "0", "--to", "60000", "--window-ms", "10000"];
    let (ok, stdout, stderr) = run(&["shadow", "promote", "check"], &range).await;
    assert!(!ok, "an empty range is refused:\n{stdout}\n{stderr}");
    assert!(stdout.contains("promotion: REFUSED"), "{stdout}");
    let mut finish = range.to_vec();
    finish.extend(["--keep-topics", "--keep-groups", "--keep-subjects"]);
    let (ok, stdout, stderr) = run(&["shadow", "promote", "finish"], &finish).await;
    assert!(!ok, "an empty range is refused:\n{stdout}\n{stderr}");
    assert!(stdout.contains("nothing was discarded"), "{stdout}");
    let (ok, stdout, stderr) = run(
        &["shadow", "discard"],
        &["--keep-topics", "--registry-username", "ops"],
    )
    .await;
    assert!(
        !ok,
        "a registry user without a password:\n{stdout}\n{stderr}"
    );

    let records = audit_json(&audit_topic, &[]).await;
    let got: Vec<(&str, &str, Outcome)> = records
        .iter()
        .map(|r| (r.actor.as_str(), r.action.as_str(), r.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("ops-old", "migrate", Outcome::Ok),
            ("ops-old", "shadow.promote.check", Outcome::Failed),
            ("ops-erin", "shadow.promote.check", Outcome::Refused),
            ("ops-erin", "shadow.promote.finish", Outcome::Refused),
            ("ops-erin", "shadow.discard", Outcome::Refused),
        ],
        "{records:#?}"
    );
    let nothing = "no window of the range has final rows on both sides";
    let check = &records[2].detail;
    assert!(
        check.starts_with(
            "windows [1970-01-01T00:00:00Z, 1970-01-01T00:01:00Z), tolerance 0: refused: "
        ) && check.contains(nothing),
        "the range and the reasons: {check}"
    );
    let finish = &records[3].detail;
    assert!(
        finish.contains(nothing) && finish.ends_with("(nothing was discarded)"),
        "{finish}"
    );
    let discard = &records[4].detail;
    assert!(
        discard.contains("--registry-username is set but no password"),
        "the reason names the flag: {discard}"
    );
    // `--outcome` lists only those, and the text line shows the outcome.
    let ids = |v: &[AuditRecord]| -> Vec<String> {
        let mut ids: Vec<String> = v.iter().map(|r| r.id.clone()).collect();
        ids.sort();
        ids
    };
    let refused = audit_json(&audit_topic, &["--outcome", "refused"]).await;
    assert_eq!(ids(&refused), ids(&records[2..]), "{refused:#?}");
    let failed = audit_json(&audit_topic, &["--outcome", "failed"]).await;
    assert_eq!(ids(&failed), ["old-2"], "{failed:#?}");
    let (ok, text, stderr) = pulsectl(
        &[
            "audit",
            "--audit-topic",
            &audit_topic,
            "--kafka-brokers",
            &brokers,
            "--outcome",
            "refused",
            "--action",
            "shadow.discard",
        ],
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        text.contains("  pulsectl  ops-erin  shadow.discard  next  refused  "),
        "{text}"
    );

    // The writer's ClickHouse copy holds the same records and outcomes, old ones included.
    let topics = WriterTopics::create("auditref").await;
    let args = audit_copy_args(&ch, &pulse_tests::unique("w"), &audit_topic, &topics);
    let dir = cleanup::TempDir::new("audit-refused");
    let mut writer = WriterProcess::spawn(&args, &[], dir.path().join("writer.log"));
    writer
        .wait_metric("pulse_writer_audit_rows_written_total", &[], 5.0)
        .await;
    let mut from_table = audit_json_from_clickhouse(&audit_topic, &ch, &[]).await;
    let mut from_topic = records.clone();
    from_table.sort_by(|a, b| a.id.cmp(&b.id));
    from_topic.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        from_table, from_topic,
        "the copy holds the records unchanged"
    );
    let refused = audit_json_from_clickhouse(&audit_topic, &ch, &["--outcome", "refused"]).await;
    assert_eq!(ids(&refused), ids(&records[2..]), "{refused:#?}");
    writer.kill();
}

#[tokio::test]
async fn a_registry_subject_delete_soft_and_permanent_is_audited_with_actor_and_outcome() {
    use reqwest::Method as M;
    let registry = Registry::start().await;
    let subject = format!("{}-value", pulse_tests::unique("deleted"));
    let schema = json!({
        "schemaType": "PROTOBUF",
        "schema": "syntax = \"proto3\";\npackage deleted;\nmessage M {\n  string f = 1;\n}\n",
    });
    let path = format!("/subjects/{subject}");
    assert_eq!(
        registry
            .call(M::POST, &format!("{path}/versions"), Some(WRITER), schema)
            .await,
        200
    );
    // A read-only user's delete is refused (and audited as refused); the writer's soft
    // delete, then its permanent delete, are done; a second permanent delete finds
    // nothing (audited as failed).
    assert_eq!(
        registry
            .call(M::DELETE, &path, Some(READER), Value::Null)
            .await,
        403
    );
    assert_eq!(
        registry
            .call(M::DELETE, &path, Some(WRITER), Value::Null)
            .await,
        200
    );
    let permanent = format!("{path}?permanent=true");
    assert_eq!(
        registry
            .call(M::DELETE, &permanent, Some(WRITER), Value::Null)
            .await,
        200
    );
    assert_eq!(
        registry
            .call(M::DELETE, &permanent, Some(WRITER), Value::Null)
            .await,
        404
    );

    let deletes = wait_until(Duration::from_secs(30), "four delete records", async || {
        let r = audit_json(&registry.audit_topic, &["--action", "schema.delete"]).await;
        if r.len() >= 4 { Ok(r) } else { Err(r) }
    })
    .await;
    assert_eq!(deletes.len(), 4, "{deletes:#?}");
    assert!(deletes.iter().all(|r| r.target == subject), "{deletes:#?}");
    let outcomes: Vec<(String, Outcome, Option<u16>)> = deletes
        .iter()
        .map(|r| (r.actor.clone(), r.outcome, r.status))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (READER.0.to_owned(), Outcome::Refused, Some(403)),
            (WRITER.0.to_owned(), Outcome::Ok, Some(200)),
            (WRITER.0.to_owned(), Outcome::Ok, Some(200)),
            (WRITER.0.to_owned(), Outcome::Failed, Some(404)),
        ]
    );
    // The permanent one is told apart by its request line.
    assert!(
        !deletes[1].detail.contains("permanent=true"),
        "{:?}",
        deletes[1]
    );
    assert!(
        deletes[2].detail.contains("permanent=true"),
        "{:?}",
        deletes[2]
    );
}

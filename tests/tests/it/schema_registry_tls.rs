//! The schema registry's clients against a registry that serves TLS with a certificate of
//! a private CA (made by the test with the `openssl` CLI): `pulsectl schemas` registers
//! and checks, the real `pulse-ingest` binary starts and frames an event, the real
//! `pulse-processor` binary starts (it looks its output schemas up before it is ready),
//! all through `--schema-registry-ca-file`; a wrong CA fails with the certificate problem
//! named, and a missing CA file is a start-up error naming the flag.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser as _;
use pulse_contracts::schemas;
use pulse_ingest::pipeline::Framer as _;
use pulse_platform::kafka::{KafkaConfig, TopicKind, TopicSettings, TopicSpec, ensure_topics};
use pulse_platform::server::ServerArgs;
use serde_json::{Value, json};

use crate::server_tls::{client_trusting, pki};
use crate::support::child_process::{binary, free_port};
use crate::support::ingest_server::read_exactly;
use crate::support::service_process::{ServiceCommand, ServiceProcess};
use crate::support::{cleanup, events};

/// A registry replica serving HTTPS with `cert`/`key` on a port of its own, keeping its
/// schemas in a topic of its own (deleted when dropped).
struct TlsRegistry {
    replica: pulse_schema_registry::Replica,
    url: String,
    _topic: cleanup::Topics,
}

async fn tls_registry(cert: &Path, key: &Path) -> TlsRegistry {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        server: ServerArgs,
    }
    let flags = Flags::parse_from([
        "test",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ]);
    let topic = pulse_tests::unique("_schemas");
    let replica = pulse_schema_registry::Replica::start_with_server(
        &pulse_tests::kafka(),
        &topic,
        Duration::from_secs(30),
        Duration::from_secs(60),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        pulse_schema_registry::auth::Access::anonymous(),
        &flags.server.settings().unwrap(),
    )
    .await
    .unwrap();
    TlsRegistry {
        url: format!("https://127.0.0.1:{}", replica.addr.port()),
        replica,
        _topic: cleanup::Topics::adopt([topic]),
    }
}

/// Registers `schema` (a .proto source) for `<topic>-value` over HTTPS trusting `ca`;
/// returns its id.
async fn register(url: &str, ca: &Path, topic: &str, schema: &str) -> u32 {
    let resp = client_trusting(ca)
        .post(format!("{url}/subjects/{topic}-value/versions"))
        .json(&json!({ "schemaType": "PROTOBUF", "schema": schema }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    u32::try_from(body["id"].as_u64().unwrap()).unwrap()
}

/// `pulsectl schemas <command>` against `url` with `extra` flags: (success, stdout+stderr).
fn pulsectl_schemas(command: &str, url: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(binary("pulsectl"))
        .args(["schemas", command, "--schema-registry-url", url])
        .args(extra)
        .env_remove("PULSE_SCHEMA_REGISTRY_CA_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A Pulse service binary with `args` and `env` (killed when dropped), its log in `dir`.
fn spawn_service(dir: &Path, name: &str, args: &[String], env: &[(&str, &str)]) -> ServiceProcess {
    ServiceCommand::new(name)
        .args(args)
        .envs(env)
        .spawn(dir.join(format!("{name}.log")))
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

fn kafka_flags(kafka: &KafkaConfig) -> Vec<String> {
    [
        "--kafka-brokers",
        &kafka.brokers,
        "--kafka-partitions",
        "1",
        "--kafka-replication-factor",
        "1",
        "--kafka-min-insync-replicas",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn pulsectl_ingest_and_the_processor_use_an_https_registry_through_its_ca_file() {
    let (ca, cert, key) = pki("registry-tls");
    let dir = ca.parent().unwrap().to_owned();
    let registry = tls_registry(&cert, &key).await;
    let url = registry.url.clone();
    let ca_flag = ["--schema-registry-ca-file", ca.to_str().unwrap()];

    // pulsectl registers Pulse's schemas and checks them, trusting the CA file.
    let (ok, out) = pulsectl_schemas("register", &url, &ca_flag);
    assert!(ok, "pulsectl schemas register: {out}");
    let subject = schemas::value_subject(pulse_contracts::topics::EVENTS);
    assert!(out.contains(&subject), "{out}");
    let (ok, out) = pulsectl_schemas("check", &url, &ca_flag);
    assert!(
        ok && out.contains("compatible"),
        "pulsectl schemas check: {out}"
    );

    // Topics of this test, their subjects registered.
    let kafka = KafkaConfig {
        topics: TopicSettings::single_broker(),
        ..pulse_tests::kafka()
    };
    let names = [
        "events",
        "dlq",
        "activity",
        "sessions",
        "late",
        "checkpoints",
    ]
    .map(|kind| pulse_tests::unique(&format!("registry_tls_{kind}")));
    let [events_topic, dlq, activity, sessions, late, checkpoints] = &names;
    ensure_topics(
        &kafka,
        &[
            TopicSpec::of(TopicKind::Events, events_topic, 1),
            TopicSpec::of(TopicKind::Dlq, dlq, 1),
        ],
    )
    .await
    .unwrap();
    let _topics = cleanup::Topics::adopt(names.clone());
    let events_id = register(&url, &ca, events_topic, schemas::EVENTS.source).await;
    register(&url, &ca, activity, schemas::AGGREGATES.source).await;
    register(&url, &ca, sessions, schemas::AGGREGATES.source).await;

    // Ingest: ready only once it framed through the registry; then it accepts an event.
    let http = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<String> = [
        "--http-addr",
        &http,
        "--grpc-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--events-topic",
        events_topic,
        "--dlq-topic",
        dlq,
        "--schema-registry-url",
        &url,
        "--schema-registry-ca-file",
        ca.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(kafka_flags(&kafka));
    let env = [
        ("PULSE_INGEST_API_KEYS", "tls-key=registry-tls"),
        ("PULSE_INGEST_PII_HMAC_KEY", "registry-tls-hmac"),
    ];
    let mut ingest = spawn_service(&dir, "pulse-ingest", &args, &env);
    // The processor: ready only once it found its output subjects through the registry.
    let mut args: Vec<String> = [
        "--events-topic",
        events_topic,
        "--user-activity-topic",
        activity,
        "--sessions-topic",
        sessions,
        "--late-topic",
        late,
        "--checkpoint-topic",
        checkpoints,
        "--group-id",
        &pulse_tests::unique("registry_tls"),
        "--schema-registry-url",
        &url,
        "--schema-registry-ca-file",
        ca.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(kafka_flags(&kafka));
    let mut processor = spawn_service(&dir, "pulse-processor", &args, &[]);
    ingest.wait_ready(Duration::from_secs(30)).await;
    processor.wait_ready(Duration::from_secs(30)).await;

    let event = events::event("tls-1", "u-tls", now_ms())
        .page("/tls")
        .json();
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/v1/events"))
        .header("Authorization", "Bearer tls-key")
        .json(&event)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "ingest answered {status}: {body}");
    let records = read_exactly(events_topic, 1).await;
    let framed =
        pulse_contracts::wire::unframe(rdkafka::Message::payload(&records[0]).unwrap()).unwrap();
    assert_eq!(
        framed.schema_id, events_id,
        "the event is framed with the id the TLS registry holds"
    );
    drop((ingest, processor));
    registry.replica.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_registry_ca_names_the_certificate_problem_and_a_missing_one_the_flag() {
    let (_, cert, key) = pki("registry-tls-served");
    let (wrong_ca, _, _) = pki("registry-tls-wrong");
    let dir = wrong_ca.parent().unwrap().to_owned();
    let registry = tls_registry(&cert, &key).await;
    let url = registry.url.clone();
    let wrong = wrong_ca.to_str().unwrap();

    // pulsectl: exits non-zero with the TLS verifier's reason.
    let (ok, out) = pulsectl_schemas("register", &url, &["--schema-registry-ca-file", wrong]);
    assert!(
        !ok,
        "pulsectl schemas register succeeded with a wrong CA: {out}"
    );
    assert!(
        out.contains("certificate") && out.contains("UnknownIssuer"),
        "the error names the certificate problem: {out}"
    );

    // Ingest's and the processor's registry clients (what their binaries frame with): the
    // lookup fails with the certificate problem in the error.
    let ingest = pulse_ingest::Config::parse_from([
        "pulse-ingest",
        "--schema-registry-url",
        &url,
        "--schema-registry-ca-file",
        wrong,
    ]);
    let encoder = pulse_ingest::registry_encoder(&ingest).unwrap();
    let err = encoder
        .frame("any-topic", &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("certificate") && err.contains("UnknownIssuer"),
        "ingest's registry error names the certificate problem: {err}"
    );
    let processor = pulse_processor::Config::parse_from([
        "pulse-processor",
        "--schema-registry-url",
        &url,
        "--schema-registry-ca-file",
        wrong,
    ]);
    let encoder = pulse_processor::registry_encoder(&processor).unwrap();
    let err = encoder
        .encode("any-topic", schemas::SESSION.full_name, &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("certificate") && err.contains("UnknownIssuer"),
        "the processor's registry error names the certificate problem: {err}"
    );

    // A CA file that is missing or holds no certificate: refused at start, naming the flag.
    let missing = dir.join("no-such-ca.pem");
    let (ok, out) = pulsectl_schemas(
        "check",
        &url,
        &["--schema-registry-ca-file", missing.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("--schema-registry-ca-file") && out.contains("cannot read"),
        "{out}"
    );
    let not_pem = dir.join("not-a-ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let mut args: Vec<String> = [
        "--schema-registry-url",
        &url,
        "--schema-registry-ca-file",
        not_pem.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(kafka_flags(&pulse_tests::kafka()));
    let env = [
        ("PULSE_INGEST_API_KEYS", "k=s"),
        ("PULSE_INGEST_PII_HMAC_KEY", "h"),
    ];
    let mut bad = spawn_service(&dir, "pulse-ingest", &args, &env);
    let code = bad.wait_exit(Duration::from_secs(20)).await.code();
    let log = bad.logs();
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("--schema-registry-ca-file") && log.contains("holds no PEM certificate"),
        "ingest's start-up error names the flag and the reason: {log}"
    );
    registry.replica.stop().await.unwrap();
}

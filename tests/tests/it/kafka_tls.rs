//! Kafka over TLS (and SASL) through Pulse's one client builder
//! ([`KafkaConfig::client_config`]), against a real broker: each test starts its own Tansu
//! behind a TLS terminator (tokio-rustls, in this test) with certificates the test makes
//! with the `openssl` CLI. Tansu advertises the terminator's address, so every connection
//! a client makes after bootstrap goes through TLS as well. (Tansu 0.6 has `--cert/--key`
//! flags but does not use them: its acceptor is built and dropped.) For mutual TLS the
//! terminator requires a client certificate signed by the test's CA.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulse_platform::kafka::{
    KafkaConfig, KafkaConsumer, KafkaProducer, OutRecord, RecordProducer, TopicSettings, TopicSpec,
    ensure_topics,
};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message};
use tokio::net::TcpStream;

use crate::support::child_process::free_port;
use crate::support::tls::{
    ClientAuth, Terminator, cert_der, make_ca, make_client_cert, make_server_cert, work_dir,
};
use crate::support::wait_until;

/// A Tansu broker of this test on `port` (plaintext, sqlite storage in `dir`) that tells
/// clients to connect to `advertised` instead; killed on drop.
pub(crate) struct Tansu(Child);

impl Tansu {
    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Tansu {
    pub(crate) async fn start(
        dir: &Path,
        port: u16,
        advertised: u16,
        authentication: bool,
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        let mut cmd = Command::new("tansu");
        cmd.current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{advertised}"),
                // Relative: Tansu drops a leading slash (see scripts/stack.sh).
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if authentication {
            cmd.arg("--authentication");
        }
        let child = cmd.spawn().expect(
            "tansu on PATH: scripts/install-deps.sh builds it into ~/.cache/pulse/tools/bin, \
             which scripts/test.sh puts on PATH",
        );
        let this = Self(child);
        wait_until(
            Duration::from_secs(60),
            format!(
                "Tansu listening on 127.0.0.1:{port} (log: {})",
                dir.display()
            ),
            async || {
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        this
    }
}

impl Tansu {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker reachable only through TLS, with the CA that signed its certificate.
struct TlsBroker {
    dir: PathBuf,
    ca: PathBuf,
    terminator: Terminator,
    /// Tansu's own (plaintext) port, behind the terminator.
    tansu_port: u16,
    _tansu: Tansu,
}

impl TlsBroker {
    async fn start(name: &str) -> Self {
        Self::start_with(name, None).await
    }

    /// A broker whose terminator requires a client certificate signed by [`Self::ca`].
    async fn start_mutual(name: &str) -> Self {
        Self::start_full(name, None, true).await
    }

    /// With `scram_user` (user, password): the broker requires SASL authentication and
    /// knows that SCRAM-SHA-512 user. Tansu refuses every request before authentication,
    /// so the user is created first, through a plaintext start of the same broker.
    async fn start_with(name: &str, scram_user: Option<(&str, &str)>) -> Self {
        Self::start_full(name, scram_user, false).await
    }

    async fn start_full(name: &str, scram_user: Option<(&str, &str)>, mutual: bool) -> Self {
        let dir = work_dir(name);
        let ca = make_ca(&dir, "pulse-test-ca");
        let (cert, key) = make_server_cert(&dir, "pulse-test-ca");
        let tansu_port = free_port();
        if let Some((user, password)) = scram_user {
            let plain = Tansu::start(&dir, tansu_port, tansu_port, false).await;
            create_scram_user(tansu_port, "SCRAM-SHA-512", user, password);
            plain.stop();
        }
        let client_auth = if mutual {
            ClientAuth::Require(&ca)
        } else {
            ClientAuth::None
        };
        let terminator = Terminator::start_with(&cert, &key, tansu_port, client_auth).await;
        let tansu = Tansu::start(&dir, tansu_port, terminator.port, scram_user.is_some()).await;
        Self {
            dir,
            ca,
            terminator,
            tansu_port,
            _tansu: tansu,
        }
    }

    /// Pulse's Kafka settings for this broker with `options` (the TLS ones included).
    fn kafka(&self, options: &[String]) -> KafkaConfig {
        KafkaConfig {
            topics: TopicSettings::single_broker(),
            options: options.to_vec(),
            ..KafkaConfig::for_brokers(format!("127.0.0.1:{}", self.terminator.port))
        }
    }

    fn tls_options(&self, ca: &Path) -> Vec<String> {
        vec![
            "security.protocol=SSL".into(),
            format!("ssl.ca.location={}", ca.display()),
        ]
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        if std::env::var("PULSE_TEST_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Creates a topic, produces three records with Pulse's producer and reads them back
/// with Pulse's consumer, all built from `kafka`.
pub(crate) async fn round_trip(kafka: &KafkaConfig) {
    let topic = pulse_tests::unique("tls");
    ensure_topics(kafka, &[TopicSpec::new(&topic, 1)])
        .await
        .unwrap();
    let producer = KafkaProducer::new(kafka, "pulse-test-tls").unwrap();
    let mut acks = Vec::new();
    for i in 0..3 {
        let rec = OutRecord::new(&topic, Some(b"k".to_vec()), format!("v{i}").into_bytes());
        acks.push(producer.enqueue(rec).unwrap());
    }
    for (i, ack) in acks.into_iter().enumerate() {
        let acked = tokio::time::timeout(Duration::from_secs(60), ack)
            .await
            .expect("an acknowledgement within 60 s")
            .unwrap();
        assert_eq!(acked.offset, i as i64);
    }
    let (consumer, _) = KafkaConsumer::new(
        kafka,
        "pulse-test-tls",
        &pulse_tests::unique("tls"),
        &[&topic],
    )
    .unwrap();
    for i in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("a record within 60 s")
            .unwrap();
        assert_eq!(m.payload().unwrap(), format!("v{i}").as_bytes());
    }
}

/// What librdkafka reports of a client (errors, and log lines from warnings up: a failed
/// TLS handshake or authentication is logged from librdkafka's threads at once, while an
/// error event waits for a poll), for asserting on them.
#[derive(Default, Clone)]
pub(crate) struct Errors(Arc<Mutex<Vec<String>>>);

impl ClientContext for Errors {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.0.lock().unwrap().push(format!("{fac}: {log_message}"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push(format!("{error}: {reason}"));
    }
}

impl rdkafka::consumer::ConsumerContext for Errors {}

/// What a client built from `kafka` reports when it asks for the cluster's metadata:
/// `Ok` with the broker count, or the errors librdkafka raised meanwhile (or why the
/// client could not be created).
pub(crate) async fn metadata_or_errors(kafka: &KafkaConfig) -> Result<usize, Vec<String>> {
    let errors = Errors::default();
    let consumer: BaseConsumer<Errors> = kafka
        .client_config("pulse-test-tls-probe")
        .create_with_context(errors.clone())
        .map_err(|e| vec![e.to_string()])?;
    let seen = errors.clone();
    let result = tokio::task::spawn_blocking(move || {
        let result = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|md| md.brokers().len())
            .map_err(|e| e.to_string());
        // Error events reach the context only when the client is polled.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while result.is_err()
            && seen.0.lock().unwrap().is_empty()
            && std::time::Instant::now() < until
        {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        result
    })
    .await
    .unwrap();
    result.map_err(|e| {
        let mut seen = errors.0.lock().unwrap().clone();
        seen.push(e);
        seen
    })
}

#[tokio::test]
async fn produce_and_consume_through_tls_with_the_brokers_ca() {
    let broker = TlsBroker::start("kafka-tls-ok").await;
    let kafka = broker.kafka(&broker.tls_options(&broker.ca));
    pulse_platform::config::validate_all(&[&kafka]).unwrap();
    round_trip(&kafka).await;
    // Every client went through the terminator: the admin client, the producer, the
    // consumer and its group coordinator connection.
    assert!(
        broker.terminator.handshakes() >= 3,
        "{} TLS handshakes",
        broker.terminator.handshakes()
    );
    assert!(
        broker.terminator.failures().is_empty(),
        "{:?}",
        broker.terminator.failures()
    );
}

#[tokio::test]
async fn a_wrong_ca_fails_with_a_certificate_verification_error() {
    let broker = TlsBroker::start("kafka-tls-wrong-ca").await;
    let other_ca = make_ca(&broker.dir, "some-other-ca");
    let kafka = broker.kafka(&broker.tls_options(&other_ca));
    let errors = metadata_or_errors(&kafka)
        .await
        .expect_err("metadata through TLS with a CA that did not sign the broker's certificate");
    let text = errors.join("\n");
    assert!(
        text.contains("SSL handshake failed") && text.contains("certificate verify failed"),
        "{text}"
    );
    assert_eq!(broker.terminator.handshakes(), 0);
    // The same broker with the right CA answers: the failure was the CA, not the broker.
    let right = broker.kafka(&broker.tls_options(&broker.ca));
    assert_eq!(metadata_or_errors(&right).await, Ok(1));
}

/// Creates the SCRAM user `user` with `password` (given on stdin) for `mechanism`
/// (`SCRAM-SHA-256` or `SCRAM-SHA-512`) on the plaintext broker at `port`, with a client
/// Pulse did not write (confluent-kafka in the test venv): the Rust client has no
/// AlterUserScramCredentials.
pub(crate) fn create_scram_user(port: u16, mechanism: &str, user: &str, password: &str) {
    use std::io::Write as _;
    let python = std::env::var("PULSE_TEST_PYTHON").expect(
        "PULSE_TEST_PYTHON is not set: run the tests with scripts/test.sh (it provides the venv)",
    );
    let script = r#"
import sys
from confluent_kafka.admin import (AdminClient, ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialUpsertion)
bootstrap, mechanism, user = sys.argv[1:4]
password = sys.stdin.read().encode()
admin = AdminClient({"bootstrap.servers": bootstrap})
upsert = UserScramCredentialUpsertion(
    user, ScramCredentialInfo(ScramMechanism[mechanism.replace("-", "_")], 4096), password)
for f in admin.alter_user_scram_credentials([upsert], request_timeout=30).values():
    f.result()
"#;
    let mut child = Command::new(python)
        .args(["-c", script, &format!("127.0.0.1:{port}"), mechanism, user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "creating the SCRAM user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SASL SCRAM-SHA-512 over TLS (SASL_SSL), the password from a file; a wrong password and
/// no SASL at all are refused. Tansu 0.6 started with `--authentication` refuses every
/// request before authentication and checks SCRAM proofs against the credentials stored
/// with AlterUserScramCredentials; it offers no PLAIN (its SASL library is built without
/// it) and its OAUTHBEARER validator accepts no token.
#[tokio::test]
async fn sasl_scram_over_tls_with_the_password_from_a_file() {
    let broker =
        TlsBroker::start_with("kafka-sasl-ssl", Some(("pulse", "pulse-test-password"))).await;

    let password = broker.dir.join("sasl-password");
    std::fs::write(&password, "pulse-test-password\n").unwrap();
    let mut options = broker.tls_options(&broker.ca);
    options[0] = "security.protocol=SASL_SSL".into();
    options.extend([
        "sasl.mechanism=SCRAM-SHA-512".to_owned(),
        "sasl.username=pulse".to_owned(),
    ]);
    let kafka = KafkaConfig {
        sasl_password_file: Some(password.clone()),
        ..broker.kafka(&options)
    };
    pulse_platform::config::validate_all(&[&kafka]).unwrap();
    round_trip(&kafka).await;

    // A wrong password: the broker refuses the authentication.
    std::fs::write(&password, "not-the-password").unwrap();
    let errors = metadata_or_errors(&kafka)
        .await
        .expect_err("metadata with a wrong SASL password");
    let text = errors.join("\n");
    assert!(text.contains("SASL SCRAM authentication failed"), "{text}");

    // TLS only, no SASL: the broker refuses every request.
    let anonymous = broker.kafka(&broker.tls_options(&broker.ca));
    assert!(
        metadata_or_errors(&anonymous).await.is_err(),
        "an unauthenticated client got metadata"
    );
}

/// Mutual TLS: the terminator requires a client certificate signed by the test's CA.
/// Pulse's producer and consumer present theirs (`ssl.certificate.location`,
/// `ssl.key.location`, the key encrypted, its password from `--kafka-ssl-key-password-file`)
/// and produce and consume; the terminator saw that very certificate on every connection.
/// No client certificate, one from another CA, or a wrong key password fail with a clear
/// error.
#[tokio::test]
async fn mutual_tls_with_an_encrypted_client_key_whose_password_is_in_a_file() {
    let broker = TlsBroker::start_mutual("kafka-mtls").await;
    let (cert, key) = make_client_cert(
        &broker.dir,
        "pulse-test-ca",
        "pulse-client",
        Some("client-key-password"),
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("BEGIN ENCRYPTED PRIVATE KEY"),
        "the client key is encrypted"
    );
    let password = broker.dir.join("ssl-key-password");
    std::fs::write(&password, "client-key-password\n").unwrap();
    let mut options = broker.tls_options(&broker.ca);
    options.extend([
        format!("ssl.certificate.location={}", cert.display()),
        format!("ssl.key.location={}", key.display()),
    ]);
    let kafka = KafkaConfig {
        ssl_key_password_file: Some(password.clone()),
        ..broker.kafka(&options)
    };
    pulse_platform::config::validate_all(&[&kafka]).unwrap();
    round_trip(&kafka).await;
    let presented = broker.terminator.client_certificates();
    assert!(
        presented.len() >= 3 && presented.len() == broker.terminator.handshakes(),
        "{} client certificates in {} handshakes",
        presented.len(),
        broker.terminator.handshakes()
    );
    let ours = cert_der(&cert);
    assert!(
        presented.iter().all(|c| *c == ours),
        "a client certificate that is not ours"
    );
    assert!(
        broker.terminator.failures().is_empty(),
        "{:?}",
        broker.terminator.failures()
    );

    // No client certificate: the terminator refuses the handshake, and librdkafka says why.
    let anonymous = broker.kafka(&broker.tls_options(&broker.ca));
    let text = metadata_or_errors(&anonymous)
        .await
        .expect_err("metadata without a client certificate")
        .join("\n");
    assert!(
        text.contains("Receive failed") && text.contains("alert certificate required"),
        "{text}"
    );
    assert!(
        broker
            .terminator
            .failures()
            .iter()
            .any(|f| f.contains("peer sent no certificates")),
        "{:?}",
        broker.terminator.failures()
    );

    // A client certificate another CA signed. The broker's certificate request names the
    // CA it accepts, so OpenSSL does not even send this one: the same error as none.
    make_ca(&broker.dir, "other-client-ca");
    let (other_cert, other_key) =
        make_client_cert(&broker.dir, "other-client-ca", "stranger", None);
    let mut stranger = broker.tls_options(&broker.ca);
    stranger.extend([
        format!("ssl.certificate.location={}", other_cert.display()),
        format!("ssl.key.location={}", other_key.display()),
    ]);
    let stranger = broker.kafka(&stranger);
    let text = metadata_or_errors(&stranger)
        .await
        .expect_err("metadata with a client certificate of another CA")
        .join("\n");
    assert!(text.contains("alert certificate required"), "{text}");
    // A broker that names no CA gets the certificate, and refuses it as unknown.
    let naming_no_ca = Terminator::start_with(
        &broker.dir.join("server.pem"),
        &broker.dir.join("server.key"),
        broker.tansu_port,
        ClientAuth::RequireNamingNoCa(&broker.ca),
    )
    .await;
    let text = metadata_or_errors(&KafkaConfig {
        brokers: format!("127.0.0.1:{}", naming_no_ca.port),
        ..stranger.clone()
    })
    .await
    .expect_err("metadata with a client certificate of another CA, sent")
    .join("\n");
    assert!(text.contains("alert unknown ca"), "{text}");
    assert!(
        naming_no_ca
            .failures()
            .iter()
            .any(|f| f.contains("UnknownIssuer")),
        "{:?}",
        naming_no_ca.failures()
    );
    assert_eq!(naming_no_ca.handshakes(), 0);

    // A wrong key password, or none: the key cannot be read and no client is created.
    std::fs::write(&password, "not-the-password").unwrap();
    for kafka in [
        kafka.clone(),
        KafkaConfig {
            ssl_key_password_file: None,
            ..kafka.clone()
        },
    ] {
        let Err(err) = KafkaProducer::new(&kafka, "pulse-test-tls") else {
            panic!("a producer whose client key cannot be decrypted");
        };
        let err = err.to_string();
        assert!(err.contains("ssl.key.location failed"), "{err}");
    }
}

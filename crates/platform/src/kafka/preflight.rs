//! A connection check beside each topic admin operation, so that a broker refusing the
//! client's SASL authentication, or a failed TLS handshake, ends the operation at once
//! with librdkafka's reason ([`Refused`]) instead of a timeout a minute later. rdkafka
//! 0.39 queues librdkafka's error events and log lines on a client's main queue, and its
//! `AdminClient` never polls that queue (serving it would need FFI, which the workspace
//! forbids), so an admin request only ever sees `OperationTimedOut`. The check is a
//! short-lived producer that asks for one topic's metadata and polls its own main queue,
//! running on a blocking thread while the admin operation runs ([`guarded`]); it adds no
//! wait to an operation that succeeds, and none at all to a PLAINTEXT connection (nothing
//! there can be refused). Creating and describing topics stay with `topics`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::KafkaConfig;
use crate::kafka::config::SECRET_OPTIONS;
use crate::secret::Secret;

/// Why the broker cannot be used with these settings, as librdkafka reported it. The
/// reason is librdkafka's text with any configured secret replaced by `<redacted>`
/// (librdkafka does not put secrets in its messages; this makes sure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The broker refused the SASL handshake or authentication: a wrong password or
    /// user, a mechanism the broker does not offer, a token it does not accept.
    #[error(
        "Kafka SASL authentication failed (sasl.mechanism {mechanism}{}): {reason}; check {}",
        .user.as_deref().map(|u| format!(", sasl.username {u}")).unwrap_or_default(),
        sasl_hint(.mechanism)
    )]
    Sasl {
        mechanism: String,
        user: Option<String>,
        reason: String,
    },
    /// The TLS handshake with the broker failed: a CA that did not sign the broker's
    /// certificate, a client certificate the broker refuses, no TLS on the other side.
    #[error(
        "Kafka TLS handshake failed: {reason}; check ssl.ca.location (the CA that signed the \
         broker's certificate) and, if the broker asks for a client certificate, \
         ssl.certificate.location and ssl.key.location"
    )]
    Tls { reason: String },
}

/// What to check for a SASL refusal with `mechanism`.
fn sasl_hint(mechanism: &str) -> String {
    match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => format!(
            "sasl.mechanism, sasl.username and the password ({})",
            SECRET_OPTIONS[0].how()
        ),
        "OAUTHBEARER" => {
            "sasl.mechanism and the sasl.oauthbearer.* settings (the token's principal, \
             scope and issuer)"
                .to_owned()
        }
        _ => "sasl.mechanism and its settings".to_owned(),
    }
}

/// What kind of refusal a librdkafka error code is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sasl,
    Tls,
}

/// librdkafka's codes for a refused SASL handshake or authentication (its own
/// `_AUTHENTICATION`, or the broker's code when librdkafka passes it on) and for a failed
/// TLS handshake (`_SSL`). Everything else (a broker down, a timeout, a disconnect) is
/// left to the admin operation and its own error.
fn classify(code: RDKafkaErrorCode) -> Option<Kind> {
    use RDKafkaErrorCode as C;
    match code {
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState => Some(Kind::Sasl),
        C::SSL => Some(Kind::Tls),
        _ => None,
    }
}

/// What the check needs to name a refusal: the SASL mechanism and user (shown), and the
/// secrets (never shown: redacted from librdkafka's text).
#[derive(Clone)]
struct Names {
    mechanism: String,
    user: Option<String>,
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Names {
    fn of(config: &ClientConfig) -> Self {
        let mechanism = config
            .get("sasl.mechanism")
            .or_else(|| config.get("sasl.mechanisms"))
            .unwrap_or("GSSAPI")
            .to_owned();
        Self {
            mechanism,
            user: config
                .get("sasl.username")
                .filter(|u| !u.is_empty())
                .map(str::to_owned),
            secrets: SECRET_OPTIONS
                .iter()
                .filter_map(|o| config.get(o.key))
                .filter(|s| !s.is_empty())
                .map(Secret::from)
                .collect(),
        }
    }

    /// The refusal `code` stands for, with `reason` (librdkafka's text) redacted.
    fn refusal(&self, code: RDKafkaErrorCode, reason: &str) -> Option<Refused> {
        let reason = redact(reason, &self.secrets);
        classify(code).map(|kind| match kind {
            Kind::Sasl => Refused::Sasl {
                mechanism: self.mechanism.clone(),
                user: self.user.clone(),
                reason,
            },
            Kind::Tls => Refused::Tls { reason },
        })
    }
}

/// `text` with every one of `secrets` replaced by `<redacted>`.
fn redact(text: &str, secrets: &[Secret]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.expose(), "<redacted>"))
}

/// The check's client context: logs librdkafka's lines as the services' clients do, and
/// keeps the first refusal librdkafka reports.
#[derive(Debug, Clone)]
struct Watch {
    names: Arc<Names>,
    refused: Arc<Mutex<Option<Refused>>>,
}

impl Watch {
    fn refused(&self) -> Option<Refused> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Watch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let Some(refusal) = error
            .rdkafka_error_code()
            .and_then(|code| self.names.refusal(code, reason))
        else {
            tracing::debug!(%error, reason, "kafka connection check: librdkafka error");
            return;
        };
        // The first refusal is the one to report (librdkafka repeats it on every retry).
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(refusal);
    }
}

impl ProducerContext for Watch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// How long one metadata request of the check waits before the check serves the error
/// events (a refusal is seen at most about this late).
const SLICE: Duration = Duration::from_millis(250);
/// How long one poll of the check's main queue may take (it drains what is queued).
const POLL: Duration = Duration::from_millis(20);
/// The longest the check runs (the admin operation it guards ends sooner).
const LIMIT: Duration = Duration::from_secs(90);

/// A running check; stops (within [`SLICE`]) when dropped.
#[derive(Debug)]
struct Preflight {
    watch: Watch,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Preflight {
    /// Starts the check for `cfg`, asking for the metadata of `topic` (or of every topic
    /// when `None`), or `None` for a PLAINTEXT connection (no TLS, no SASL: nothing to
    /// refuse).
    fn start(cfg: &KafkaConfig, topic: Option<&str>) -> Option<Self> {
        let mut config = cfg.client_config("pulse-topic-admin-check");
        let protocol = config
            .get("security.protocol")
            .unwrap_or("plaintext")
            .to_ascii_lowercase();
        if protocol == "plaintext" {
            return None;
        }
        // Asking for a topic's metadata must never create it (a producer's default), least
        // of all with the broker's defaults just before the admin request creates it.
        config.set("allow.auto.create.topics", "false");
        let watch = Watch {
            names: Arc::new(Names::of(&config)),
            refused: Arc::default(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let topic = topic.map(str::to_owned);
        let task = tokio::task::spawn_blocking({
            let (watch, stop) = (watch.clone(), Arc::clone(&stop));
            move || run(&config, topic.as_deref(), watch, &stop)
        });
        Some(Self { watch, stop, task })
    }

    /// The refusal the check saw, once it ended (`None`: the broker answered, or the check
    /// could not tell).
    async fn finished(&mut self) -> Option<Refused> {
        if let Err(e) = (&mut self.task).await {
            tracing::warn!(error = %e, "kafka connection check: the task failed");
        }
        self.watch.refused()
    }
}

impl Drop for Preflight {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The check itself: metadata requests for `topic` (one topic keeps the answer small on a
/// cluster with many; whether it exists does not matter) of [`SLICE`] each, the main
/// queue served between them, until the broker answers, librdkafka reports a refusal,
/// `stop` is set or [`LIMIT`] passed.
fn run(config: &ClientConfig, topic: Option<&str>, watch: Watch, stop: &AtomicBool) {
    let producer: BaseProducer<Watch> = match config.create_with_context(watch.clone()) {
        Ok(p) => p,
        Err(e) => {
            // The admin client is created from the same settings and reports this.
            tracing::debug!(error = %e, "kafka connection check: cannot create the client");
            return;
        }
    };
    let started = Instant::now();
    let outcome = loop {
        let answered = producer.client().fetch_metadata(topic, SLICE).is_ok();
        producer.poll(POLL);
        if answered {
            break "the broker answered";
        } else if watch.refused().is_some() {
            break "the broker refused the client";
        } else if stop.load(Ordering::Relaxed) {
            break "the admin operation ended first";
        } else if started.elapsed() >= LIMIT {
            break "no answer, no refusal";
        }
    };
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis(),
        outcome,
        "kafka connection check done"
    );
}

/// Runs `op` (an admin operation on `topic`, if it names one) with the connection check
/// beside it: a refusal the check sees ends it at once with that refusal; otherwise `op`'s
/// own result (a refusal the check saw wins over `op`'s error, which would only be a
/// timeout).
pub(crate) async fn guarded<T, E>(
    cfg: &KafkaConfig,
    topic: Option<&str>,
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<Refused>,
{
    let Some(mut check) = Preflight::start(cfg, topic) else {
        return op.await;
    };
    let mut op = std::pin::pin!(op);
    let result = tokio::select! {
        biased;
        r = &mut op => r,
        refused = check.finished() => match refused {
            Some(r) => return Err(r.into()),
            None => op.await,
        },
    };
    match (result, check.watch.refused()) {
        (Err(_), Some(r)) => Err(r.into()),
        (result, _) => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_and_tls_codes_are_refusals_and_others_are_not() {
        use RDKafkaErrorCode as C;
        for code in [
            C::Authentication,
            C::SaslAuthenticationFailed,
            C::UnsupportedSASLMechanism,
            C::IllegalSASLState,
        ] {
            assert_eq!(classify(code), Some(Kind::Sasl), "{code:?}");
        }
        assert_eq!(classify(C::SSL), Some(Kind::Tls));
        for code in [
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::OperationTimedOut,
            C::RequestTimedOut,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::Resolve,
        ] {
            assert_eq!(classify(code), None, "{code:?}");
        }
    }

    fn sasl_config(password: &str) -> ClientConfig {
        let cfg = KafkaConfig {
            options: vec![
                "security.protocol=SASL_PLAINTEXT".into(),
                "sasl.mechanisms=PLAIN".into(),
                "sasl.username=pulse".into(),
            ],
            sasl_password: password.into(),
            ..KafkaConfig::for_brokers("127.0.0.1:1")
        };
        cfg.client_config("t")
    }

    #[test]
    fn a_sasl_refusal_names_mechanism_user_and_reason_and_never_the_password() {
        let names = Names::of(&sasl_config("hunter2-secret"));
        assert!(!format!("{names:?}").contains("hunter2"));
        let reason = "sasl_plaintext://127.0.0.1:1/bootstrap: SASL authentication error: \
                      Authentication failed: Invalid username or password (after 1ms in state \
                      AUTH_REQ) [hunter2-secret]";
        let refused = names
            .refusal(RDKafkaErrorCode::Authentication, reason)
            .unwrap();
        let text = refused.to_string();
        for needle in [
            "Kafka SASL authentication failed",
            "sasl.mechanism PLAIN",
            "sasl.username pulse",
            "SASL authentication error: Authentication failed: Invalid username or password",
            "PULSE_KAFKA_SASL_PASSWORD",
            "[<redacted>]",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(
            names.refusal(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
            None
        );
    }

    #[test]
    fn a_tls_refusal_names_the_handshake_and_the_ca_setting() {
        let names = Names::of(&KafkaConfig::default().client_config("t"));
        let text = names
            .refusal(
                RDKafkaErrorCode::SSL,
                "ssl://127.0.0.1:1/bootstrap: SSL handshake failed: certificate verify failed",
            )
            .unwrap()
            .to_string();
        assert!(
            text.starts_with("Kafka TLS handshake failed: ssl://127.0.0.1:1/bootstrap: SSL handshake failed: certificate verify failed;"),
            "{text}"
        );
        assert!(text.contains("ssl.ca.location"), "{text}");
    }

    #[test]
    fn oauthbearer_refusals_point_at_the_token_settings() {
        let cfg = KafkaConfig {
            options: vec![
                "security.protocol=SASL_SSL".into(),
                "sasl.mechanism=OAUTHBEARER".into(),
            ],
            ..KafkaConfig::default()
        };
        let text = Names::of(&cfg.client_config("t"))
            .refusal(RDKafkaErrorCode::Authentication, "denied")
            .unwrap()
            .to_string();
        assert!(
            text.starts_with("Kafka SASL authentication failed (sasl.mechanism OAUTHBEARER): denied; check sasl.mechanism and the sasl.oauthbearer.*"),
            "{text}"
        );
    }

    /// A server that answers a TLS ClientHello with bytes that are not TLS: librdkafka
    /// reports a failed TLS handshake, and the guarded operation (which would wait for
    /// far longer) ends with it at once.
    #[tokio::test]
    async fn a_failed_tls_handshake_ends_the_guarded_operation_at_once() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0_u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot tls at all, sorry\r\n")
                        .await;
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        let cfg = KafkaConfig {
            options: vec!["security.protocol=SSL".into()],
            ..KafkaConfig::for_brokers(format!("127.0.0.1:{port}"))
        };
        let started = Instant::now();
        let result: Result<(), Refused> = guarded(&cfg, Some("t"), async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
        .await;
        let elapsed = started.elapsed();
        server.abort();
        match result {
            Err(Refused::Tls { reason }) => {
                assert!(reason.contains("SSL handshake failed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(elapsed < Duration::from_secs(10), "after {elapsed:?}");
    }

    /// Without TLS or SASL there is nothing to refuse: no check runs, `op` alone decides.
    #[tokio::test]
    async fn a_plaintext_connection_runs_no_check() {
        assert!(Preflight::start(&KafkaConfig::for_brokers("127.0.0.1:1"), None).is_none());
        let r: Result<u8, Refused> =
            guarded(&KafkaConfig::for_brokers("127.0.0.1:1"), None, async {
                Ok(7)
            })
            .await;
        assert_eq!(r, Ok(7));
    }
}

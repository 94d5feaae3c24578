//! The client of ingest's API: one batch over HTTP (`POST /v1/events`, a JSON array) or
//! gRPC (unary `SendEvents`), answered with one result per event; retries of 503/429 (and
//! `UNAVAILABLE`/`RESOURCE_EXHAUSTED`) honouring Retry-After, and of transport failures,
//! with backoff; and the flags that say where ingest is ([`IngestArgs`]: URL, CA file, API
//! key). A failed TLS handshake (a certificate the CA did not sign, an expired one, a name
//! mismatch, a plain-HTTP server behind an `https://` URL) is not retried: a retry cannot
//! fix it. Shared by `loadgen` and `dlq redrive`; what to send is left to them.

use pulse_platform::clickhouse::error_chain as chain;
use pulse_platform::secret::{Secret, removed_secret_flag};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pulse_contracts::pb::events::v1 as pb;
use pulse_contracts::pb::ingest::v1::ingest_service_client::IngestServiceClient;
use pulse_contracts::pb::ingest::v1::{EventStatus, SendEventsRequest};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Where ingest's HTTP API is and how to talk to it; flattened into every command that
/// sends to ingest (`loadgen`, `dlq redrive`).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Ingest's HTTP base URL (events are POSTed to /v1/events as JSON arrays); `https://`
    /// for an ingest with `--tls-cert-file` (see `--ca-file`).
    #[arg(
        long,
        env = "PULSE_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// PEM CA certificate(s) to trust for an `https://` target or gRPC URL (ingest with
    /// `--tls-cert-file`); unset: the built-in web roots over HTTPS, and gRPC over TLS is
    /// not possible.
    #[arg(long = "ca-file", env = "PULSE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// API key, sent as `Authorization: Bearer <key>`, from PULSE_API_KEY (environment
    /// only, never a flag). Never logged.
    #[arg(skip = Secret::from_env(API_KEY_ENV))]
    pub api_key: Secret,
    /// File holding the API key (e.g. a mounted Kubernetes Secret). Or set the key itself
    /// in PULSE_API_KEY (environment only, no flag; not both). Neither: the dev stack's
    /// `pulse-dev-key`.
    #[arg(long = "api-key-file", env = "PULSE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Removed: took the API key as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "api-key", hide = true)]
    pub removed_api_key_flag: Option<Secret>,
}

/// The environment variable holding the API key; environment only, never a flag.
pub const API_KEY_ENV: &str = "PULSE_API_KEY";
/// The API key of the local dev stack, used when none is set.
pub const DEV_API_KEY: &str = "pulse-dev-key";
const API_KEY_FILE: &str = "--api-key-file / PULSE_API_KEY_FILE";

impl Default for IngestArgs {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".into(),
            ca_file: None,
            api_key: Secret::default(),
            api_key_file: None,
            removed_api_key_flag: None,
        }
    }
}

impl pulse_platform::config::Validate for IngestArgs {
    fn validate(&self, p: &mut pulse_platform::config::Problems) {
        removed_secret_flag(
            p,
            "--api-key",
            self.removed_api_key_flag.is_some(),
            "--api-key-file or the environment variable PULSE_API_KEY",
        );
        if let Err(ClientError::ApiKey(reason)) = self.key() {
            p.add(API_KEY_FILE, reason);
        }
        p.check(
            self.target.starts_with("http://") || self.target.starts_with("https://"),
            "--target",
            format!("must be an http(s) URL, got {:?}", self.target),
        );
    }
}

impl IngestArgs {
    /// The API key: `--api-key-file`'s content, else PULSE_API_KEY, else the dev stack's
    /// key. The error names the file, never a key.
    pub fn key(&self) -> Result<Secret, ClientError> {
        let key = Secret::resolve(&self.api_key, self.api_key_file.as_deref())
            .map_err(ClientError::ApiKey)?;
        Ok(if key.is_empty() {
            Secret::new(DEV_API_KEY)
        } else {
            key
        })
    }

    /// A client of the HTTP API at `--target`, trusting `--ca-file`.
    pub fn http(&self, timeout: Duration) -> Result<HttpIngest, ClientError> {
        HttpIngest::new_with_ca(
            &self.target,
            self.key()?.expose(),
            timeout,
            self.ca_file.as_deref(),
        )
    }

    /// A client of the gRPC API at `url`, over TLS trusting `--ca-file` when given.
    pub async fn grpc(&self, url: &str, timeout: Duration) -> Result<GrpcIngest, ClientError> {
        let key = self.key()?;
        GrpcIngest::connect_with_ca(url, key.expose(), timeout, self.ca_file.as_deref()).await
    }
}

/// Ingest's answer for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// "accepted", "duplicate" or "rejected".
    pub status: String,
    pub event_id: String,
    /// For rejected events: the validation code (HTTP only; gRPC reports no code).
    pub code: Option<String>,
    pub field: Option<String>,
    pub reason: Option<String>,
}

/// Why a client for ingest could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("{url}: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("{url}: {}", chain(source))]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("--api-key-file / PULSE_API_KEY_FILE: {0}")]
    ApiKey(String),
    #[error("--ca-file {}: {reason}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// The PEM CA certificate(s) of `--ca-file`.
fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ClientError::CaFile {
            path: path.to_owned(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(pem)
}

/// A request's failure on the way, with its causes.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a request got no per-event answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// 503/429 (or their gRPC codes): nothing of the batch counted; retry after the wait.
    #[error("ingest answered {status}: {reason}")]
    Retryable {
        status: String,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// No answer (connection refused or reset, timeout): the outcome is unknown.
    #[error("transport failure: {}", chain(source.as_ref()))]
    Transport { source: Cause },
    /// An error answer a retry cannot fix (400, 401, 413, 415, …).
    #[error("ingest answered {status}: {reason}")]
    Refused { status: String, reason: String },
    /// The TLS handshake with `url` failed (the server's certificate is not trusted,
    /// expired or for another name; or TLS itself failed): nothing was sent, and a retry
    /// cannot fix it.
    #[error("TLS handshake with {url} failed (not retried): {reason}")]
    Tls { url: String, reason: String },
}

impl SendError {
    /// No answer because of `e`.
    pub fn transport(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Transport {
            source: Arc::new(e),
        }
    }

    /// No answer from `url` because of `e`: [`SendError::Tls`] when a TLS error is among
    /// its causes, else [`SendError::Transport`].
    pub fn no_answer(url: &str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        match tls_failure(&e) {
            Some(reason) => Self::Tls {
                url: url.to_owned(),
                reason,
            },
            None => Self::transport(e),
        }
    }
}

/// The TLS error among `e` and its causes, described, if there is one. rustls reports a
/// failed handshake as an `io::Error` wrapping a `rustls::Error` (reqwest wraps that in
/// another `io::Error`); `io::Error::source` skips the wrapped error, so each `io::Error`
/// is looked into as well.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    rustls_error_among(e).map(describe_tls)
}

/// The `rustls::Error` among `e` and its causes (looking into each `io::Error`, as
/// [`tls_failure`] says), if there is one; each client describes it in its own terms.
pub(crate) fn rustls_error_among<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = rustls_error(err) {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

/// `e` as a `rustls::Error`, or the one inside it if `e` is an `io::Error` wrapping one
/// (through more `io::Error`s).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// rustls's description of `e`, with what it means for the common cases.
fn describe_tls(e: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            " (the server's certificate is not signed by a CA in --ca-file)"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            " (the server's certificate has expired)"
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            " (the server's certificate is not valid yet)"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            " (the server's certificate does not name the URL's host)"
        }
        E::InvalidMessage(_) => " (is the server speaking TLS at all?)",
        _ => "",
    };
    format!("{e}{hint}")
}

/// Ingest's HTTP intake.
#[derive(Debug, Clone)]
pub struct HttpIngest {
    client: reqwest::Client,
    url: String,
    api_key: String,
}

impl HttpIngest {
    /// `target` is the base URL (`http://127.0.0.1:8080`); events go to `/v1/events`.
    pub fn new(target: &str, api_key: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::new_with_ca(target, api_key, timeout, None)
    }

    /// [`new`](Self::new), trusting the CA certificate(s) in `ca` (PEM) for `https://`.
    pub fn new_with_ca(
        target: &str,
        api_key: &str,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().timeout(timeout);
        if let Some(path) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read_ca(path)?).map_err(|e| {
                ClientError::CaFile {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(ClientError::Http)?;
        Ok(Self {
            client,
            url: format!("{}/v1/events", target.trim_end_matches('/')),
            api_key: api_key.to_owned(),
        })
    }

    /// Posts a JSON body (one event or an array) and returns the per-event answers.
    pub async fn post(&self, body: Vec<u8>) -> Result<Vec<Answer>, SendError> {
        let resp = self
            .client
            .post(&self.url)
            .header("Authorization", format!("Bearer {}", self.api_key))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::no_answer(&self.url, e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.map_err(SendError::transport)?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let reason = value["error"]["reason"]
                .as_str()
                .or(value["error"]["code"].as_str())
                .map_or_else(|| text.chars().take(200).collect(), str::to_owned);
            let status_text = format!(
                "{} {}",
                status.as_u16(),
                value["error"]["code"].as_str().unwrap_or("")
            )
            .trim()
            .to_owned();
            return Err(if status.as_u16() == 503 || status.as_u16() == 429 {
                SendError::Retryable {
                    status: status_text,
                    reason,
                    retry_after,
                }
            } else {
                SendError::Refused {
                    status: status_text,
                    reason,
                }
            });
        }
        let results = value["results"]
            .as_array()
            .ok_or_else(|| SendError::Refused {
                status: status.as_u16().to_string(),
                reason: "the answer has no results".into(),
            })?;
        let mut answers: Vec<(u64, Answer)> = results
            .iter()
            .map(|r| {
                let text = |v: &Value| v.as_str().map(str::to_owned);
                (
                    r["index"].as_u64().unwrap_or(u64::MAX),
                    Answer {
                        status: r["status"].as_str().unwrap_or("").to_owned(),
                        event_id: r["event_id"].as_str().unwrap_or("").to_owned(),
                        code: text(&r["error"]["code"]),
                        field: text(&r["error"]["field"]),
                        reason: text(&r["error"]["reason"]),
                    },
                )
            })
            .collect();
        answers.sort_by_key(|(i, _)| *i);
        Ok(answers.into_iter().map(|(_, a)| a).collect())
    }
}

/// Ingest's gRPC intake (unary batch call).
#[derive(Debug, Clone)]
pub struct GrpcIngest {
    client: IngestServiceClient<tonic::transport::Channel>,
    url: String,
    api_key: String,
}

impl GrpcIngest {
    pub async fn connect(url: &str, api_key: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with_ca(url, api_key, timeout, None).await
    }

    /// [`connect`](Self::connect) over TLS when `ca` (PEM CA certificate(s)) is given.
    pub async fn connect_with_ca(
        url: &str,
        api_key: &str,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let url_error = |source| ClientError::Url {
            url: url.to_owned(),
            source,
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(url_error)?
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(path) = ca {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read_ca(path)?));
            endpoint = endpoint.tls_config(tls).map_err(url_error)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            client: IngestServiceClient::new(channel),
            url: url.to_owned(),
            api_key: api_key.to_owned(),
        })
    }

    pub async fn send(&self, events: Vec<pb::Event>) -> Result<Vec<Answer>, SendError> {
        let mut req = tonic::Request::new(SendEventsRequest { events });
        let auth = format!("Bearer {}", self.api_key)
            .parse()
            .map_err(|_| SendError::Refused {
                status: "invalid api key".into(),
                reason: "the API key is not a valid metadata value".into(),
            })?;
        req.metadata_mut().insert("authorization", auth);
        let mut client = self.client.clone();
        match client.send_events(req).await {
            Ok(resp) => {
                let mut results = resp.into_inner().results;
                results.sort_by_key(|r| r.index);
                Ok(results
                    .into_iter()
                    .map(|r| Answer {
                        status: match EventStatus::try_from(r.status) {
                            Ok(EventStatus::Accepted) => "accepted",
                            Ok(EventStatus::Duplicate) => "duplicate",
                            Ok(EventStatus::Rejected) => "rejected",
                            _ => "unspecified",
                        }
                        .to_owned(),
                        event_id: r.event_id,
                        code: None,
                        field: r.error.as_ref().map(|e| e.field.clone()),
                        reason: r.error.map(|e| e.reason),
                    })
                    .collect())
            }
            Err(status) => {
                let retry_after = status
                    .metadata()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let code = format!("{:?}", status.code());
                // A status made on this side (with a transport error as its source) means
                // ingest never answered; a status from ingest has no source.
                let no_answer = std::error::Error::source(&status).is_some()
                    || matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    );
                let reason = status.message().to_owned();
                Err(match status.code() {
                    _ if no_answer => SendError::no_answer(&self.url, status),
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
                        SendError::Retryable {
                            status: code,
                            reason,
                            retry_after,
                        }
                    }
                    _ => SendError::Refused {
                        status: code,
                        reason,
                    },
                })
            }
        }
    }
}

/// How a batch went after retries.
#[derive(Debug)]
pub struct Delivery {
    pub result: Result<Vec<Answer>, SendError>,
    /// Requests made (1 + retries).
    pub attempts: u32,
    /// Latencies of the requests that got an answer from ingest (any status).
    pub latencies: Vec<Duration>,
    /// Some attempt failed — got no answer, or a retryable refusal (503/429: ingest keeps
    /// the records of a failed batch that the broker did store, and answers them
    /// `duplicate` on the retry) — so its events may have been accepted already: a
    /// `duplicate` answer on a later attempt can be that first acceptance.
    pub earlier_attempt_failed: bool,
    /// Stopped (Ctrl-C) while waiting to retry.
    pub abandoned: bool,
}

/// Retry policy: retryable failures are retried until `max_retry` has passed since the
/// first attempt, waiting Retry-After when given, else 200 ms doubling up to 5 s. Refusals
/// and TLS failures end it at once.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub max_retry: Duration,
}

impl Retry {
    /// Calls `attempt` until it is answered, refused, out of retry time or stopped.
    pub async fn run<F, Fut>(&self, stop: &CancellationToken, mut attempt: F) -> Delivery
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Answer>, SendError>>,
    {
        let first = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(200);
        let mut d = Delivery {
            // Replaced by the first attempt's result (the loop runs at least once).
            result: Ok(Vec::new()),
            attempts: 0,
            latencies: Vec::new(),
            earlier_attempt_failed: false,
            abandoned: false,
        };
        loop {
            let started = tokio::time::Instant::now();
            d.attempts += 1;
            let result = attempt().await;
            match &result {
                Err(SendError::Transport { .. }) => d.earlier_attempt_failed = true,
                Err(SendError::Retryable { .. }) => {
                    d.earlier_attempt_failed = true;
                    d.latencies.push(started.elapsed());
                }
                _ => d.latencies.push(started.elapsed()),
            }
            let wait = match &result {
                Err(SendError::Retryable { retry_after, .. }) => retry_after.unwrap_or(backoff),
                Err(SendError::Transport { .. }) => backoff,
                Ok(_) | Err(SendError::Refused { .. } | SendError::Tls { .. }) => {
                    d.result = result;
                    return d;
                }
            };
            d.result = result;
            if first.elapsed() + wait > self.max_retry {
                return d;
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    d.abandoned = true;
                    return d;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ingest: IngestArgs,
    }

    fn parse(args: &[&str]) -> IngestArgs {
        <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .ingest
    }

    #[test]
    fn the_removed_api_key_flag_is_refused_naming_the_replacement_not_the_value() {
        let old = parse(&["--api-key", "key-from-arg"]);
        let text = pulse_platform::config::validate_all(&[&old])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--api-key: this flag was removed")
                && text.contains("--api-key-file or the environment variable PULSE_API_KEY"),
            "{text}"
        );
        assert!(!text.contains("key-from-arg"), "{text}");
        assert_ne!(old.key().unwrap().expose(), "key-from-arg");
    }

    #[test]
    fn the_api_key_comes_from_its_file_or_the_environment_never_both() {
        let dir = std::env::temp_dir().join(format!("pulsectl-api-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(
            parse(&["--api-key-file", path]).key().unwrap().expose(),
            "from-file"
        );
        let from_env = IngestArgs {
            api_key: "from-env".into(),
            ..parse(&[])
        };
        assert_eq!(from_env.key().unwrap().expose(), "from-env");
        let both = IngestArgs {
            api_key: "from-env".into(),
            ..parse(&["--api-key-file", path])
        };
        let text = pulse_platform::config::validate_all(&[&both])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--api-key-file") && text.contains("set only one"),
            "{text}"
        );
        assert!(
            !text.contains("from-env") && !text.contains("from-file"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn help_never_shows_secret_values() {
        use clap::CommandFactory as _;
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains(&format!("itself in {API_KEY_ENV} (environment only")),
            "{API_KEY_ENV} missing in --help"
        );
        assert!(
            !help.contains(&format!("[env: {API_KEY_ENV}]"))
                && !help.contains(&format!("{API_KEY_ENV}=")),
            "--help offers {API_KEY_ENV} as a flag or shows its value"
        );
        assert!(!help.contains("--api-key "), "--api-key in --help");
    }

    fn accepted() -> Vec<Answer> {
        vec![Answer {
            status: "accepted".into(),
            event_id: "e".into(),
            code: None,
            field: None,
            reason: None,
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_answers_are_retried_after_their_retry_after_until_answered() {
        let calls = AtomicU32::new(0);
        let retry = Retry {
            max_retry: Duration::from_secs(60),
        };
        let started = tokio::time::Instant::now();
        let d = retry
            .run(&CancellationToken::new(), || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(SendError::Retryable {
                            status: "503".into(),
                            reason: "busy".into(),
                            retry_after: Some(Duration::from_secs(2)),
                        }),
                        1 => Err(SendError::transport(std::io::Error::from(
                            std::io::ErrorKind::ConnectionReset,
                        ))),
                        _ => Ok(accepted()),
                    }
                }
            })
            .await;
        assert_eq!(d.result.unwrap(), accepted());
        assert_eq!(d.attempts, 3);
        assert!(d.earlier_attempt_failed);
        assert!(started.elapsed() >= Duration::from_millis(2_400));
    }

    /// Chaos run, seed 22238: ingest answered 503 for a batch the broker had stored part of
    /// (during a broker stall); the retry answered those events `duplicate`, which loadgen
    /// counted as intentional duplicates, so its expected answers missed 6 stored events.
    #[tokio::test(start_paused = true)]
    async fn a_retryable_refusal_marks_the_delivery_as_possibly_taken_already() {
        let retry = Retry {
            max_retry: Duration::from_secs(60),
        };
        let calls = AtomicU32::new(0);
        let d = retry
            .run(&CancellationToken::new(), || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(SendError::Retryable {
                            status: "503".into(),
                            reason: "broker did not acknowledge the record".into(),
                            retry_after: None,
                        }),
                        _ => Ok(accepted()),
                    }
                }
            })
            .await;
        assert_eq!(d.attempts, 2);
        assert!(d.earlier_attempt_failed);
        assert_eq!(d.latencies.len(), 2, "both attempts were answered");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_answers_are_not_retried_and_retries_stop_at_the_limit() {
        let retry = Retry {
            max_retry: Duration::from_secs(3),
        };
        let stop = CancellationToken::new();
        let d = retry
            .run(&stop, || async {
                Err(SendError::Refused {
                    status: "401".into(),
                    reason: "no key".into(),
                })
            })
            .await;
        assert_eq!(d.attempts, 1);
        let d = retry
            .run(&stop, || async {
                Err(SendError::transport(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            })
            .await;
        assert!(d.result.is_err());
        assert!(d.attempts > 2 && d.attempts < 10, "{}", d.attempts);
    }

    /// A certificate rustls refused, as reqwest and tonic carry it: inside an `io::Error`
    /// (whose `source` skips it) inside the client's own error.
    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_certificate_error_anywhere_among_the_causes_is_a_tls_failure() {
        let cert = |e| rustls::Error::InvalidCertificate(e);
        let wrapped =
            |e: rustls::Error| Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let e = SendError::no_answer(
            "https://ingest:8443/v1/events",
            wrapped(cert(rustls::CertificateError::UnknownIssuer)),
        );
        let text = e.to_string();
        assert!(matches!(e, SendError::Tls { .. }), "{e:?}");
        assert!(text.contains("https://ingest:8443/v1/events"), "{text}");
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(text.contains("not signed by a CA in --ca-file"), "{text}");
        let e = SendError::no_answer("u", wrapped(cert(rustls::CertificateError::Expired)));
        assert!(e.to_string().contains("has expired"), "{e}");
        let e = SendError::no_answer(
            "u",
            wrapped(cert(rustls::CertificateError::NotValidForName)),
        );
        assert!(
            e.to_string().contains("does not name the URL's host"),
            "{e}"
        );
        // A refused connection is a transport failure, retried.
        let e = SendError::no_answer(
            "u",
            Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        );
        assert!(matches!(e, SendError::Transport { .. }), "{e:?}");
    }

    /// An `https://` target whose server speaks plain HTTP: the handshake fails in
    /// reqwest's own client, and that is a TLS failure naming the URL, not a transport
    /// failure to retry.
    #[tokio::test]
    async fn https_to_a_plain_http_server_is_a_tls_failure() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut hello = [0u8; 512];
                let _ = s.read(&mut hello).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let target = format!("https://127.0.0.1:{port}");
        let ingest = HttpIngest::new(&target, "k", Duration::from_secs(5)).unwrap();
        let e = ingest.post(b"[]".to_vec()).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SendError::Tls { .. }), "{e:?}");
        assert!(
            text.starts_with(&format!(
                "TLS handshake with {target}/v1/events failed (not retried): "
            )),
            "{text}"
        );
        assert!(
            text.contains("is the server speaking TLS at all?"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_failure_is_not_retried() {
        let retry = Retry {
            max_retry: Duration::from_secs(60),
        };
        let started = tokio::time::Instant::now();
        let d = retry
            .run(&CancellationToken::new(), || async {
                Err(SendError::Tls {
                    url: "https://ingest:8443/v1/events".into(),
                    reason: "invalid peer certificate: UnknownIssuer".into(),
                })
            })
            .await;
        assert_eq!(d.attempts, 1);
        assert!(matches!(d.result, Err(SendError::Tls { .. })));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

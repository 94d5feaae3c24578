//! The HTTP(S) transport of the ClickHouse client: a hyper client whose rustls connector
//! trusts the CA file of `--clickhouse-ca-file`, or the system's roots without one. Plain
//! `http://` URLs use the same client without TLS. A connection error names the endpoint
//! and the roots it was checked against, because the `clickhouse` crate's own message
//! stops at "network error: client error (Connect)" (see [`error_chain`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// The `clickhouse` crate's own defaults: TCP keep-alive, and an idle pool timeout below
/// the server's keep-alive timeout (3 s before 23.11).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The certificates a CA file holds (PEM, one or more); the error names the file, and
/// says why none could be used.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ca_roots(path, &pem)
}

/// The trust anchors of `pem`, the contents of the CA file `path` (named in the error):
/// at least one certificate, each usable as a CA.
pub(crate) fn ca_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            format!(
                "certificate {} of {} is not usable as a CA: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(store)
}

/// The system's CA certificates (the platform's store; `SSL_CERT_FILE` / `SSL_CERT_DIR`
/// when set).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (_, unusable) = store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(format!(
            "no usable system CA certificate ({why}; {unusable} unusable): set --clickhouse-ca-file"
        ));
    }
    Ok(store)
}

/// What the connector trusts, for error messages.
fn describe_roots(ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(path) => format!("the CA file {}", path.display()),
        None => "the system's CA certificates".to_owned(),
    }
}

/// The roots TLS connections trust: the CA file's certificates, or the system's.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    match ca_file {
        Some(path) => read_ca_file(path),
        None => system_roots(),
    }
}

/// A `clickhouse` client over this transport. With `https` (the URL's scheme), TLS with
/// the roots of `ca_file` or the system's; without, plain HTTP and no roots are loaded.
pub fn client(https: bool, ca_file: Option<&Path>) -> Result<clickhouse::Client, String> {
    let roots = if https {
        roots(ca_file)?
    } else {
        RootCertStore::empty()
    };
    // rustls is built with two crypto providers in this workspace: name one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let connector = Connector {
        inner: https,
        roots: describe_roots(ca_file).into(),
    };
    let hyper = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector);
    Ok(clickhouse::Client::with_http_client(hyper))
}

/// A client that cannot connect anywhere: every request fails with `reason` (a CA file
/// that became unreadable after start). Used so that `client()` stays infallible.
pub fn broken_client(reason: String) -> clickhouse::Client {
    let hyper = HyperClient::builder(TokioExecutor::new()).build(Broken(reason.into()));
    clickhouse::Client::with_http_client(hyper)
}

/// The rustls connector, with errors that name the endpoint and the roots.
#[derive(Clone)]
struct Connector {
    inner: HttpsConnector<HttpConnector>,
    roots: Arc<str>,
}

type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type ConnectFuture = Pin<Box<dyn Future<Output = Result<Stream, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|source| ConnectError {
            endpoint: String::new(),
            roots: None,
            source,
        })
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let endpoint = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str())
        );
        let roots = https.then(|| self.roots.clone());
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            connecting.await.map_err(|source| ConnectError {
                endpoint,
                roots,
                source,
            })
        })
    }
}

/// A failed connection to ClickHouse: the endpoint, the roots (TLS only) and the cause,
/// all in the message.
#[derive(Debug)]
pub struct ConnectError {
    endpoint: String,
    roots: Option<Arc<str>>,
    source: Box<dyn StdError + Send + Sync>,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot connect to ClickHouse at {}", self.endpoint)?;
        if let Some(roots) = &self.roots {
            write!(f, " (TLS, server certificate checked against {roots})")?;
        }
        write!(f, ": {}", error_chain(self.source.as_ref()))
    }
}

// The cause is part of the message (a chain printer would print it twice).
impl StdError for ConnectError {}

/// A connector whose every connection fails with its reason.
#[derive(Clone)]
struct Broken(Arc<str>);

impl tower_service::Service<Uri> for Broken {
    type Response = Stream;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let error = ConnectError {
            endpoint: uri.to_string().trim_end_matches('/').to_owned(),
            roots: None,
            source: self.0.to_string().into(),
        };
        Box::pin(async move { Err(error) })
    }
}

/// An error and its causes in one line, `a: b: c`, leaving out a cause whose text the
/// line already holds (many errors repeat their source in their own message). Use it to
/// log or report a `clickhouse` error: its own `Display` of a failed connection is only
/// "network error: client error (Connect)".
pub fn error_chain(error: &(dyn StdError + '_)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

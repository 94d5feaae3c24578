//! An HTTP server (axum) and a gRPC server (tonic) side by side, as a service that answers
//! on both transports runs them: each on its own listener with `TCP_NODELAY`, TLS when a
//! certificate is configured and the limits of [`crate::limits`] (see [`ServerArgs`], the
//! flags every serving service flattens into its config), the gRPC one
//! with health and reflection beside the service (whose calls run in the server span of
//! [`crate::grpc::Traced`]), both stopped by one token. Stopping is
//! ordered: both stop accepting at once, then each finishes its in-flight requests, and
//! [`ServerPair::stop`] returns only when both have, so the caller can flush what those
//! requests queued (a producer, say) afterwards. Routes and services are the caller's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

use crate::config::{Problems, Validate};
use crate::limits::LimitArgs;
use crate::listener::{AcceptSettings, HttpListener};
use crate::tls::{Alpn, ReloadingTls, TlsError, TlsFiles};

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// The TLS flags of a service's admin server (/metrics, /livez, /readyz): plain HTTP
/// without them (the service's own certificate is not used there). Part of [`ServerArgs`]
/// and of [`AdminServerArgs`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminTlsArgs {
    /// PEM certificate chain (leaf first) of the admin server (/metrics, /livez, /readyz);
    /// with `--admin-tls-key-file` it speaks TLS only. Reloaded when the file changes.
    #[arg(long = "admin-tls-cert-file", env = "PULSE_ADMIN_TLS_CERT_FILE")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--admin-tls-cert-file`.
    #[arg(long = "admin-tls-key-file", env = "PULSE_ADMIN_TLS_KEY_FILE")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s) whose client certificates the admin server requires.
    #[arg(
        long = "admin-tls-client-ca-file",
        env = "PULSE_ADMIN_TLS_CLIENT_CA_FILE"
    )]
    pub admin_tls_client_ca_file: Option<PathBuf>,
}

impl AdminTlsArgs {
    /// The TLS files of the admin server, if TLS is on there.
    pub fn files(&self) -> Result<Option<TlsFiles>, (String, String)> {
        tls_files(
            &self.admin_tls_cert_file,
            &self.admin_tls_key_file,
            &self.admin_tls_client_ca_file,
            "admin-",
        )
    }
}

/// What every listener of a service shares (its HTTP and gRPC servers and its admin
/// server alike): how TLS files are watched, how long a handshake and a request's headers
/// may take, and the limits. Part of [`ServerArgs`] and of [`AdminServerArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerArgs {
    /// How often the certificate, key and client CA files are checked for changes.
    #[arg(
        long = "tls-reload-interval",
        env = "PULSE_TLS_RELOAD_INTERVAL",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub tls_reload_interval: Duration,
    /// Longest time a client may take to finish its TLS handshake.
    #[arg(
        long = "tls-handshake-timeout",
        env = "PULSE_TLS_HANDSHAKE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub tls_handshake_timeout: Duration,
    /// Longest time a client may take to send a request's headers (HTTP/1: from the
    /// connection, or the end of the previous request, to the end of the headers, so an
    /// idle keep-alive connection is closed after it too; HTTP/2 and gRPC: the connection
    /// preface). The connection is closed after it (slowloris) and counted, unless it was
    /// an idle keep-alive connection.
    #[arg(
        long = "header-read-timeout",
        env = "PULSE_HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub header_read_timeout: Duration,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl Default for ListenerArgs {
    fn default() -> Self {
        Self {
            tls_reload_interval: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            limits: LimitArgs::default(),
        }
    }
}

impl Validate for ListenerArgs {
    fn validate(&self, p: &mut Problems) {
        p.check(
            !self.tls_reload_interval.is_zero(),
            "--tls-reload-interval / PULSE_TLS_RELOAD_INTERVAL",
            "must be more than 0",
        );
        p.check(
            !self.tls_handshake_timeout.is_zero(),
            "--tls-handshake-timeout / PULSE_TLS_HANDSHAKE_TIMEOUT",
            "must be more than 0",
        );
        p.check(
            !self.header_read_timeout.is_zero(),
            "--header-read-timeout / PULSE_HEADER_READ_TIMEOUT",
            "must be more than 0",
        );
        self.limits.validate(p);
    }
}

impl ListenerArgs {
    /// The settings of a listener with the TLS `files` (loaded now), labelled `listener`
    /// (`service` or `admin`) in the TLS metrics.
    fn settings_of(
        &self,
        files: Option<TlsFiles>,
        listener: &'static str,
    ) -> Result<ServerSettings, TlsError> {
        Ok(ServerSettings {
            tls: files.map(|f| ReloadingTls::load(f, listener)).transpose()?,
            tls_reload_interval: self.tls_reload_interval,
            tls_handshake_timeout: self.tls_handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            limits: self.limits.clone(),
        })
    }
}

/// The server flags of a service with HTTP and gRPC servers of its own: their TLS, the TLS
/// of its admin server, and what all its listeners share. A service flattens it into its
/// config as `server`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// PEM certificate chain (leaf first) of the service's HTTP and gRPC servers; with
    /// `--tls-key-file` they speak TLS only. Reloaded when the file changes.
    #[arg(long = "tls-cert-file", env = "PULSE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file`.
    #[arg(long = "tls-key-file", env = "PULSE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate one of them
    /// signed (mutual TLS).
    #[arg(long = "tls-client-ca-file", env = "PULSE_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub admin_tls: AdminTlsArgs,
    #[command(flatten)]
    pub listener: ListenerArgs,
}

/// The server flags of a service whose only server is its admin server (the processor,
/// the writers): its TLS and the listener settings. Flattened into the config as
/// `admin_server`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminServerArgs {
    #[command(flatten)]
    pub admin_tls: AdminTlsArgs,
    #[command(flatten)]
    pub listener: ListenerArgs,
}

/// The TLS files of one listener from its three flags, or a problem naming them.
fn tls_files(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    client_ca: &Option<PathBuf>,
    prefix: &str,
) -> Result<Option<TlsFiles>, (String, String)> {
    let flag = |name: &str| {
        format!(
            "--{prefix}tls-{name} / PULSE_{}TLS_{}",
            prefix.replace('-', "_").to_uppercase(),
            name.replace('-', "_").to_uppercase()
        )
    };
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
        })),
        (None, None) if client_ca.is_some() => Err((
            flag("client-ca-file"),
            format!("needs {} and {}", flag("cert-file"), flag("key-file")),
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err((
            flag("key-file"),
            format!("is required with {}", flag("cert-file")),
        )),
        (None, Some(_)) => Err((
            flag("cert-file"),
            format!("is required with {}", flag("key-file")),
        )),
    }
}

/// The problem of a listener's TLS flags or files, if any (the files are loaded once, so a
/// bad file is reported with the other problems at start).
fn validate_tls(
    files: Result<Option<TlsFiles>, (String, String)>,
    listener: &'static str,
    p: &mut Problems,
) {
    match files {
        Err((key, reason)) => p.add(key, reason),
        Ok(Some(files)) => {
            if let Err(e) = ReloadingTls::load(files, listener) {
                let key = if listener == "admin" {
                    "--admin-tls-*"
                } else {
                    "--tls-*"
                };
                p.add(key, e.to_string());
            }
        }
        Ok(None) => {}
    }
}

fn flags_error((key, reason): (String, String)) -> TlsError {
    TlsError::Flags { key, reason }
}

/// The settings of a service's admin server, from whichever flag group the service has.
pub trait AdminSettingsArgs {
    /// The settings of the admin server (loads its certificate if TLS is on).
    fn admin_settings(&self) -> Result<ServerSettings, TlsError>;
}

impl ServerArgs {
    /// The TLS files of the service's HTTP and gRPC servers, if TLS is on.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, (String, String)> {
        tls_files(
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_client_ca_file,
            "",
        )
    }

    /// The TLS files of the admin server, if TLS is on there.
    pub fn admin_tls_files(&self) -> Result<Option<TlsFiles>, (String, String)> {
        self.admin_tls.files()
    }

    /// The settings of the service's servers (loads the certificate if TLS is on).
    pub fn settings(&self) -> Result<ServerSettings, TlsError> {
        let files = self.tls_files().map_err(flags_error)?;
        self.listener.settings_of(files, "service")
    }

    /// The settings of the admin server.
    pub fn admin_settings(&self) -> Result<ServerSettings, TlsError> {
        let files = self.admin_tls_files().map_err(flags_error)?;
        self.listener.settings_of(files, "admin")
    }
}

impl AdminSettingsArgs for ServerArgs {
    fn admin_settings(&self) -> Result<ServerSettings, TlsError> {
        ServerArgs::admin_settings(self)
    }
}

impl AdminSettingsArgs for AdminServerArgs {
    fn admin_settings(&self) -> Result<ServerSettings, TlsError> {
        let files = self.admin_tls.files().map_err(flags_error)?;
        self.listener.settings_of(files, "admin")
    }
}

impl Validate for ServerArgs {
    fn validate(&self, p: &mut Problems) {
        validate_tls(self.tls_files(), "service", p);
        validate_tls(self.admin_tls.files(), "admin", p);
        self.listener.validate(p);
    }
}

impl Validate for AdminServerArgs {
    fn validate(&self, p: &mut Problems) {
        validate_tls(self.admin_tls.files(), "admin", p);
        self.listener.validate(p);
    }
}

/// How a service's servers (or its admin server) listen: TLS (reloaded) or plain, and
/// the limits. [`Default`] is plain with the default limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub tls: Option<Arc<ReloadingTls>>,
    pub tls_reload_interval: Duration,
    pub tls_handshake_timeout: Duration,
    /// See [`ListenerArgs::header_read_timeout`].
    pub header_read_timeout: Duration,
    pub limits: LimitArgs,
}

impl Default for ServerSettings {
    fn default() -> Self {
        let args = ListenerArgs::default();
        Self {
            tls: None,
            tls_reload_interval: args.tls_reload_interval,
            tls_handshake_timeout: args.tls_handshake_timeout,
            header_read_timeout: args.header_read_timeout,
            limits: args.limits,
        }
    }
}

impl ServerSettings {
    /// How a listener of these settings accepts, labelled `server` in the limit metric.
    pub fn accept(&self, alpn: Alpn, server: &'static str) -> AcceptSettings {
        AcceptSettings {
            tls: self.tls.clone(),
            alpn,
            handshake_timeout: self.tls_handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            max_connections: self.limits.max_connections,
            retry_after_secs: self.limits.limit_retry_after_secs,
            server,
        }
    }

    /// Watches the certificate files (if TLS is on) until `stop` is cancelled, and
    /// publishes the certificate's metrics (see [`ReloadingTls::init_metrics`]).
    pub fn watch(&self, stop: CancellationToken) {
        if let Some(tls) = &self.tls {
            tls.init_metrics();
            tokio::spawn(tls.clone().watch(self.tls_reload_interval, stop));
        }
    }

    /// `http` or `https`, for log lines.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Why a server pair could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the address of the {transport} listener: {source}")]
    LocalAddr {
        transport: &'static str,
        source: std::io::Error,
    },
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("the {transport} server task ended abnormally: {source}")]
    Task {
        transport: &'static str,
        source: tokio::task::JoinError,
    },
}

/// The running HTTP and gRPC servers.
#[derive(Debug)]
pub struct ServerPair {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ServerPair {
    /// Serves `app` on `http` and `service` (with gRPC health and reflection from the
    /// encoded `descriptors`) on `grpc` until `stop` is cancelled, plain and with the
    /// default limits (see [`start_with`](Self::start_with)).
    pub async fn start<S>(
        http: TcpListener,
        app: axum::Router,
        grpc: TcpListener,
        service: S,
        descriptors: &'static [u8],
        stop: CancellationToken,
    ) -> Result<Self, ServeError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self::start_with(
            http,
            app,
            grpc,
            service,
            descriptors,
            &ServerSettings::default(),
            stop,
        )
        .await
    }

    /// [`start`](Self::start) with TLS and limits from `settings`.
    pub async fn start_with<S>(
        http: TcpListener,
        app: axum::Router,
        grpc: TcpListener,
        service: S,
        descriptors: &'static [u8],
        settings: &ServerSettings,
        stop: CancellationToken,
    ) -> Result<Self, ServeError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let local = |l: &TcpListener, transport| {
            l.local_addr()
                .map_err(|source| ServeError::LocalAddr { transport, source })
        };
        let http_addr = local(&http, "HTTP")?;
        let grpc_addr = local(&grpc, "gRPC")?;
        let (health, reflection) = crate::grpc::health_and_reflection(S::NAME, descriptors).await?;
        settings.watch(stop.clone());
        let http = {
            let stop = stop.clone();
            let listener = HttpListener::new(
                http,
                settings.accept(Alpn::Http, "http"),
                stop.child_token(),
            )
            .map_err(|source| ServeError::LocalAddr {
                transport: "HTTP",
                source,
            })?;
            let app = crate::limits::http(app, &settings.limits, "http");
            tokio::spawn(crate::listener::serve(listener, app, stop))
        };
        let grpc = {
            let stop = stop.clone();
            let incoming = crate::listener::grpc_incoming(
                grpc,
                settings.accept(Alpn::Grpc, "grpc"),
                stop.child_token(),
            );
            let limits = crate::limits::grpc_layer(settings.limits.clone());
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .layer(limits)
                    .add_service(health)
                    .add_service(reflection)
                    .add_service(crate::grpc::Traced::new(service))
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                    .await
            })
        };
        Ok(Self {
            http_addr,
            grpc_addr,
            stop,
            http,
            grpc,
        })
    }

    /// Stops accepting on both and waits until their in-flight requests finished.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits until both servers stopped (after the token given to
    /// [`start`](Self::start) was cancelled and in-flight requests finished). The first
    /// failure is returned; both are always awaited.
    pub async fn wait(self) -> Result<(), ServeError> {
        let http = self.http.await;
        let grpc = self.grpc.await;
        http.map_err(|source| ServeError::Task {
            transport: "HTTP",
            source,
        })?
        .map_err(ServeError::Http)?;
        grpc.map_err(|source| ServeError::Task {
            transport: "gRPC",
            source,
        })??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn problems(args: &[&str]) -> Vec<String> {
        let flags = Flags::parse_from(std::iter::once("test").chain(args.iter().copied()));
        let mut p = Problems::default();
        flags.server.validate(&mut p);
        match p.into_result() {
            Ok(()) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|e| format!("{}: {}", e.key, e.reason))
                    .collect()
            }
        }
    }

    #[test]
    fn bad_tls_and_limit_settings_are_named_at_once() {
        assert!(problems(&[]).is_empty());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let found = problems(&[
            "--tls-cert-file",
            missing,
            "--admin-tls-client-ca-file",
            missing,
            "--max-concurrent-requests",
            "0",
            "--request-body-timeout",
            "0s",
        ]);
        assert_eq!(
            found,
            [
                "--tls-key-file / PULSE_TLS_KEY_FILE: is required with --tls-cert-file / PULSE_TLS_CERT_FILE",
                "--admin-tls-client-ca-file / PULSE_ADMIN_TLS_CLIENT_CA_FILE: needs --admin-tls-cert-file / PULSE_ADMIN_TLS_CERT_FILE and --admin-tls-key-file / PULSE_ADMIN_TLS_KEY_FILE",
                "--request-body-timeout / PULSE_REQUEST_BODY_TIMEOUT: must be more than 0",
                "--max-concurrent-requests / PULSE_MAX_CONCURRENT_REQUESTS: must be at least 1",
            ]
        );
        let found = problems(&["--tls-cert-file", missing, "--tls-key-file", missing]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("--tls-*: reading "), "{found:?}");
    }

    #[test]
    fn a_service_with_only_an_admin_server_has_the_admin_and_listener_flags() {
        #[derive(Debug, clap::Parser)]
        struct AdminOnly {
            #[command(flatten)]
            admin_server: AdminServerArgs,
        }
        let problems = |args: &[&str]| {
            let flags = AdminOnly::parse_from(std::iter::once("test").chain(args.iter().copied()));
            let mut p = Problems::default();
            flags.admin_server.validate(&mut p);
            p.into_result()
                .err()
                .map(|e| e.0.into_iter().map(|e| e.key).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert!(problems(&[]).is_empty());
        assert_eq!(
            problems(&[
                "--admin-tls-cert-file",
                "c.pem",
                "--header-read-timeout",
                "0s",
                "--max-connections",
                "0"
            ]),
            [
                "--admin-tls-key-file / PULSE_ADMIN_TLS_KEY_FILE",
                "--header-read-timeout / PULSE_HEADER_READ_TIMEOUT",
                "--max-connections / PULSE_MAX_CONNECTIONS",
            ]
        );
        // The service's own TLS flags are not offered where there is no such server.
        assert!(AdminOnly::try_parse_from(["test", "--tls-cert-file", "c.pem"]).is_err());
        let flags = AdminOnly::parse_from(["test", "--header-read-timeout", "750ms"]);
        let settings = flags.admin_server.admin_settings().unwrap();
        assert!(settings.tls.is_none());
        assert_eq!(settings.header_read_timeout, Duration::from_millis(750));
        assert_eq!(
            settings.accept(Alpn::Http, "admin").header_read_timeout,
            Duration::from_millis(750)
        );
    }

    #[test]
    fn without_a_certificate_the_servers_stay_plain() {
        let flags = Flags::parse_from(["test"]);
        let settings = flags.server.settings().unwrap();
        assert!(settings.tls.is_none());
        assert_eq!(settings.scheme(), "http");
        assert!(flags.server.admin_settings().unwrap().tls.is_none());
        let half = Flags::parse_from(["test", "--tls-key-file", "k.pem"]);
        let e = half.server.settings().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-cert-file / PULSE_TLS_CERT_FILE: is required with --tls-key-file / PULSE_TLS_KEY_FILE"
        );
    }
}

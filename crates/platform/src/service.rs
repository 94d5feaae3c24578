//! The life cycle every service binary shares: install metrics, serve the admin endpoints,
//! hand the service a [`Shutdown`], and after the service returned, keep the admin server
//! up until its work is flushed, then stop it.

use std::future::Future;
use std::net::SocketAddr;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigErrors, Validate};
use crate::server::ServerSettings;
use crate::telemetry::{self, TelemetryConfig};
use crate::tls::TlsError;
use crate::{Health, Shutdown, admin};

/// What a running service gets from the platform.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    pub service: &'static str,
    pub shutdown: Shutdown,
    pub health: Health,
    pub metrics: PrometheusHandle,
    /// Where the admin server actually listens (useful with port 0 in tests).
    pub admin_addr: SocketAddr,
}

impl ServiceContext {
    /// Watches `producer` until shutdown starts (see
    /// [`crate::kafka::producer::spawn_watchdog`]): while it cannot deliver for its
    /// config's stall timeout, readiness is blocked for `component` and the client is
    /// recreated.
    pub fn watch_producer(
        &self,
        producer: &crate::kafka::KafkaProducer,
        component: &'static str,
        stall: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        crate::kafka::producer::spawn_watchdog(
            producer.clone(),
            self.health.clone(),
            component,
            stall,
            self.shutdown.child_token(),
        )
    }

    /// Runs `attempt` until it succeeds, waiting 200 ms after the first failure and twice
    /// as long after each next one (at most 5 s), logging each failure at WARN as
    /// "waiting for `what`". Returns false when shutdown starts first. For start-up
    /// dependencies a service cannot work without (a registered schema, say): the service
    /// stays alive and not ready instead of crash-looping.
    pub async fn wait_until_ok<F, Fut, E>(&self, what: &str, mut attempt: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut pause = std::time::Duration::from_millis(200);
        loop {
            match attempt().await {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "waiting for {what}"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(std::time::Duration::from_secs(5));
        }
    }
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Stops the admin server and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server failed"),
            Err(e) => tracing::warn!(error = %e, "admin server task panicked"),
        }
    }
}

/// Installs metrics and starts the admin server on `listener` (plain HTTP, default limits).
pub fn start(
    service: &'static str,
    listener: TcpListener,
) -> std::io::Result<(ServiceContext, AdminServer)> {
    start_with(service, listener, ServerSettings::default())
}

/// [`start`] with the admin server's TLS and limits from `settings`.
pub fn start_with(
    service: &'static str,
    listener: TcpListener,
    settings: ServerSettings,
) -> std::io::Result<(ServiceContext, AdminServer)> {
    let metrics = crate::metrics::install(service).map_err(std::io::Error::other)?;
    let health = Health::new();
    let shutdown = Shutdown::new(health.clone());
    let admin_addr = listener.local_addr()?;
    let tls_on = settings.tls.is_some();
    let stop = CancellationToken::new();
    let task = {
        let (health, metrics, stop) = (health.clone(), metrics.clone(), stop.clone());
        tokio::spawn(
            async move { admin::serve_with(listener, health, metrics, &settings, stop).await },
        )
    };
    tracing::info!(service, %admin_addr, tls = tls_on, "admin server listening (/metrics, /livez, /readyz)");
    Ok((
        ServiceContext {
            service,
            shutdown,
            health,
            metrics,
            admin_addr,
        },
        AdminServer { stop, task },
    ))
}

/// A service binary's config: clap-parsed, self-validating, with telemetry and admin address.
pub trait ServiceConfig: Parser + Validate {
    fn telemetry(&self) -> &TelemetryConfig;
    fn admin_addr(&self) -> SocketAddr;
    /// The settings of the admin server (TLS, header read timeout, limits) from the
    /// service's server flags ([`crate::server::ServerArgs`] or
    /// [`crate::server::AdminServerArgs`]). Without them: plain, default limits.
    fn admin_settings(&self) -> Result<ServerSettings, TlsError> {
        Ok(ServerSettings::default())
    }
}

/// Implements [`ServiceConfig`] for a service config with `telemetry: TelemetryConfig` and
/// `admin_addr: SocketAddr` fields, and with a field of server flags (`server: ServerArgs`,
/// or `admin_server: AdminServerArgs` for a service whose only server is its admin server)
/// when written `impl_service_config!(Config, server)`.
#[macro_export]
macro_rules! impl_service_config {
    ($config:ty) => {
        impl $crate::service::ServiceConfig for $config {
            fn telemetry(&self) -> &$crate::telemetry::TelemetryConfig {
                &self.telemetry
            }
            fn admin_addr(&self) -> ::std::net::SocketAddr {
                self.admin_addr
            }
        }
    };
    ($config:ty, $server:ident) => {
        impl $crate::service::ServiceConfig for $config {
            fn telemetry(&self) -> &$crate::telemetry::TelemetryConfig {
                &self.telemetry
            }
            fn admin_addr(&self) -> ::std::net::SocketAddr {
                self.admin_addr
            }
            fn admin_settings(
                &self,
            ) -> ::std::result::Result<$crate::server::ServerSettings, $crate::tls::TlsError> {
                $crate::server::AdminSettingsArgs::admin_settings(&self.$server)
            }
        }
    };
}

/// Error of a service's `main`.
pub type MainError = Box<dyn std::error::Error + Send + Sync>;

/// The whole `main` of a service: parse and validate config (all errors at once), start
/// telemetry and the admin server, install signal handlers, run `body` until it returns,
/// then stop the admin server and flush telemetry.
pub async fn main<C, F, Fut, E>(service: &'static str, body: F) -> Result<(), MainError>
where
    C: ServiceConfig,
    F: FnOnce(C, ServiceContext) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    // First: re-executes the process with glibc's allocator tuned (returns on failure).
    let untuned = crate::malloc::tune();
    let config = C::parse();
    crate::config::validate_all(&[&config])
        .map_err(|e: ConfigErrors| -> MainError { e.to_string().into() })?;
    let _telemetry = telemetry::init(service, config.telemetry())?;
    if let Some(reason) = untuned {
        tracing::warn!(%reason, "glibc's allocator runs with its defaults");
    }
    let listener = TcpListener::bind(config.admin_addr())
        .await
        .map_err(|e| -> MainError {
            format!("binding the admin server to {}: {e}", config.admin_addr()).into()
        })?;
    let admin_settings = config.admin_settings()?;
    let (ctx, admin) = start_with(service, listener, admin_settings)?;
    ctx.shutdown.install_signal_handlers()?;
    let result = body(config, ctx).await;
    admin.stop().await;
    match result {
        Ok(()) => {
            tracing::info!(service, "stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!(service, error = %e, "service failed");
            Err(Box::new(e))
        }
    }
}

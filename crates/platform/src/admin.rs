//! The admin HTTP server every service runs: `/metrics` (Prometheus text), `/livez`
//! (the process can still do its work: 503 only when a part of it is stuck in a way only
//! a restart fixes, see [`Health::fail_liveness`]) and `/readyz` (ready for traffic; 503
//! while a part is blocked and once draining starts).
//!
//! None of the routes changes state or reveals configuration (the metrics carry the build
//! version and operational series only), so they stay open: no token is asked for. The
//! server speaks TLS when `--admin-tls-cert-file`/`--admin-tls-key-file` are set and has
//! the same header read timeout and limits as the service's servers (see
//! [`crate::server::ServerSettings`]; a service whose only server is this one takes them
//! from [`crate::server::AdminServerArgs`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness state shared by a service and its admin server.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    ready: AtomicBool,
    draining: AtomicBool,
    /// Why parts of the service cannot do their work right now (see [`Health::block`]).
    blocked: Mutex<BTreeMap<&'static str, String>>,
    /// Why parts of the service need a restart (see [`Health::fail_liveness`]).
    dead: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }
    /// The service finished starting (dependencies answered, listeners bound).
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }
    /// Shutdown began: readiness turns 503 for good.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst) && !self.is_draining() && self.blocked().is_none()
    }
    /// `component` cannot do its work for `reason` (e.g. a sink refusing every write):
    /// readiness answers 503 with the reason until [`Health::unblock`] (or a new reason
    /// replaces this one).
    pub fn block(&self, component: &'static str, reason: impl Into<String>) {
        self.blocked_map().insert(component, reason.into());
    }
    /// `component` works again.
    pub fn unblock(&self, component: &'static str) {
        self.blocked_map().remove(component);
    }
    /// The blocked components and their reasons (`"sink: reason; ..."`), if any.
    pub fn blocked(&self) -> Option<String> {
        joined(&self.blocked_map())
    }
    /// `component` is stuck in a way only a restart fixes (e.g. a producer that delivered
    /// nothing for its liveness timeout although it was recreated): `/livez` answers 503
    /// with the reason until [`Health::revive`], so the orchestrator restarts the process.
    pub fn fail_liveness(&self, component: &'static str, reason: impl Into<String>) {
        lock_map(&self.inner.dead).insert(component, reason.into());
    }
    /// `component` works again (it recovered before the restart).
    pub fn revive(&self, component: &'static str) {
        lock_map(&self.inner.dead).remove(component);
    }
    pub fn is_dead(&self) -> bool {
        !lock_map(&self.inner.dead).is_empty()
    }
    /// Why liveness fails (`"component: reason; ..."`), if it does.
    pub fn dead(&self) -> Option<String> {
        joined(&lock_map(&self.inner.dead))
    }
    fn blocked_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        lock_map(&self.inner.blocked)
    }
}

// The maps stay consistent even if a holder panicked (single inserts and removes).
fn lock_map<'a>(
    m: &'a Mutex<BTreeMap<&'static str, String>>,
) -> std::sync::MutexGuard<'a, BTreeMap<&'static str, String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn joined(map: &BTreeMap<&'static str, String>) -> Option<String> {
    (!map.is_empty()).then(|| {
        map.iter()
            .map(|(c, r)| format!("{c}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

impl Health {}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: PrometheusHandle,
}

/// The admin routes.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { health, metrics })
}

async fn render_metrics(
    State(s): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn livez(State(s): State<AdminState>) -> (StatusCode, String) {
    match s.health.dead() {
        Some(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("restart needed: {reasons}\n"),
        ),
        None => (StatusCode::OK, "ok\n".into()),
    }
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.health.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
    } else if let Some(reasons) = s.health.blocked() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("blocked: {reasons}\n"),
        )
    } else if s.health.is_ready() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
    }
}

/// Serves the admin routes on `listener` until `stop` is cancelled. The admin server
/// outlives the service's draining so `/metrics` and `/readyz` stay observable.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        listener,
        health,
        metrics,
        &crate::server::ServerSettings::default(),
        stop,
    )
    .await
}

/// [`serve`] with TLS and limits from `settings`.
pub async fn serve_with(
    listener: TcpListener,
    health: Health,
    metrics: PrometheusHandle,
    settings: &crate::server::ServerSettings,
    stop: CancellationToken,
) -> std::io::Result<()> {
    settings.watch(stop.clone());
    let listener = crate::listener::HttpListener::new(
        listener,
        settings.accept(crate::tls::Alpn::Http, "admin"),
        stop.child_token(),
    )?;
    let app = crate::limits::http(router(health, metrics), &settings.limits, "admin");
    crate::listener::serve(listener, app, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_turns_503_as_soon_as_draining_starts() {
        let handle = crate::metrics::install("test").unwrap();
        let health = Health::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health.clone(), handle, stop.clone()));
        let client = reqwest::Client::new();
        let get = |path: &'static str| {
            let client = client.clone();
            async move {
                client
                    .get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .unwrap()
            }
        };

        assert_eq!(get("/livez").await.status(), 200);
        assert_eq!(
            get("/readyz").await.status(),
            503,
            "not ready before start finished"
        );
        health.set_ready(true);
        assert_eq!(get("/readyz").await.status(), 200);
        health.block("sink", "unknown_table: Code: 60");
        let r = get("/readyz").await;
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.text().await.unwrap(),
            "blocked: sink: unknown_table: Code: 60\n"
        );
        health.unblock("sink");
        assert_eq!(
            get("/readyz").await.status(),
            200,
            "ready again once unblocked"
        );
        health.start_draining();
        let r = get("/readyz").await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.text().await.unwrap(), "draining\n");
        assert_eq!(
            get("/livez").await.status(),
            200,
            "still alive while draining"
        );
        health.fail_liveness("kafka-producer", "delivered nothing for 180 s");
        let r = get("/livez").await;
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.text().await.unwrap(),
            "restart needed: kafka-producer: delivered nothing for 180 s\n"
        );
        health.revive("kafka-producer");
        assert_eq!(get("/livez").await.status(), 200, "alive once revived");

        let body = get("/metrics").await.text().await.unwrap();
        assert!(body.contains("pulse_build_info"), "{body}");
        assert!(body.contains("service=\"test\""), "{body}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}

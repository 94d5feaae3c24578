//! The admin HTTP server every service runs: `/metrics` (Prometheus text), `/livez`
//! (the process is up) and `/readyz` (ready for traffic; 503 once draining starts).

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
        let map = self.blocked_map();
        (!map.is_empty()).then(|| {
            map.iter()
                .map(|(c, r)| format!("{c}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
    fn blocked_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        // The map stays consistent even if a holder panicked (single inserts and removes).
        self.inner
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: PrometheusHandle,
}

/// The admin routes.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(|| async { "ok\n" }))
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
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
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

        let body = get("/metrics").await.text().await.unwrap();
        assert!(body.contains("pulse_build_info"), "{body}");
        assert!(body.contains("service=\"test\""), "{body}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}

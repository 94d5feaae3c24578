//! Graceful shutdown: the first SIGTERM/SIGINT marks the service as draining (readiness
//! 503) and cancels the shutdown token, so the service stops accepting, drains in-flight
//! work, flushes producers and commits offsets; a second signal exits at once.

use tokio_util::sync::CancellationToken;

use crate::admin::Health;

/// Runs `step` every `interval` until `stop` is cancelled — the polling loop of every file
/// watcher (TLS certificates, ingest API keys, registry credentials). The first run is one
/// interval after the call (the caller has just loaded the files); a slow step delays the
/// next one instead of bunching them up.
pub async fn every<F, Fut>(interval: std::time::Duration, stop: &CancellationToken, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        step().await;
    }
}

/// Exit code when a second signal forces an immediate exit.
pub const FORCED_EXIT_CODE: i32 = 130;

/// The shutdown tree's root: clone it into every task that must stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    token: CancellationToken,
    health: Health,
}

impl Shutdown {
    pub fn new(health: Health) -> Self {
        Self {
            token: CancellationToken::new(),
            health,
        }
    }

    /// Starts listening for SIGTERM and SIGINT (Ctrl-C).
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let this = self.clone();
            tokio::spawn(async move {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                tracing::info!("shutdown signal received, draining; send another to exit at once");
                this.trigger();
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                tracing::warn!("second shutdown signal, exiting at once");
                std::process::exit(FORCED_EXIT_CODE);
            });
        }
        #[cfg(not(unix))]
        {
            let this = self.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                this.trigger();
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(FORCED_EXIT_CODE);
            });
        }
        Ok(())
    }

    /// Begins shutdown: readiness turns 503, then every waiter is woken.
    pub fn trigger(&self) {
        self.health.start_draining();
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown began.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// A child token, cancelled with this one, for a sub-task.
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    pub fn health(&self) -> &Health {
        &self.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_drains_readiness_before_waking_waiters() {
        let health = Health::new();
        health.set_ready(true);
        let s = Shutdown::new(health.clone());
        let child = s.child_token();
        let waiter = {
            let s = s.clone();
            let health = health.clone();
            tokio::spawn(async move {
                s.cancelled().await;
                health.is_ready()
            })
        };
        s.trigger();
        assert!(
            !waiter.await.unwrap(),
            "readiness was already false when waiters woke"
        );
        assert!(child.is_cancelled());
        assert!(s.is_triggered());
    }
}

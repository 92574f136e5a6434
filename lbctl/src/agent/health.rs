//! The agent's HTTP endpoints, as kube-proxy has them:
//!
//! - `/healthz`: 200 with `lastUpdated`/`currentTime` while the maps keep up
//!   with the source; 503 when a change has waited longer than the timeout
//!   (writes keep failing, or the loop is stuck).
//! - `/livez`: 200 while the process serves (same body).
//! - `/readyz`: 200 once the first full sync is in the maps, 503 before.
//! - `/metrics`: Prometheus text format.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tracing::info;

use super::metrics::Metrics;

#[derive(Debug, Default)]
struct HealthState {
    ready: bool,
    last_updated: Option<SystemTime>,
    /// Since when a change seen in the source waits for its writes.
    pending_since: Option<Instant>,
}

/// Shared between the agent loop and the HTTP server.
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    timeout: Duration,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            state: Mutex::new(HealthState::default()),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change was seen and is not in the maps yet.
    pub fn pending(&self) {
        let mut s = self.lock();
        s.pending_since.get_or_insert_with(Instant::now);
    }

    /// The maps hold everything the source says.
    pub fn synced(&self) {
        let mut s = self.lock();
        s.ready = true;
        s.last_updated = Some(SystemTime::now());
        s.pending_since = None;
    }

    pub fn ready(&self) -> bool {
        self.lock().ready
    }

    /// Healthy unless a change has waited longer than the timeout.
    pub fn healthy(&self) -> bool {
        self.lock()
            .pending_since
            .is_none_or(|t| t.elapsed() <= self.timeout)
    }

    fn body(&self) -> String {
        let fmt = |t: SystemTime| {
            jiff::Timestamp::try_from(t)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let last = self.lock().last_updated.map(fmt).unwrap_or_default();
        format!(
            "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\"}}\n",
            fmt(SystemTime::now())
        )
    }
}

#[derive(Clone)]
struct App {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    let code = if app.health.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "application/json")],
        app.health.body(),
    )
}

async fn livez(State(app): State<App>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        app.health.body(),
    )
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    if app.health.ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the first sync is not in the maps yet\n",
        )
    }
}

async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    // Reading the per-CPU maps is blocking work.
    let m = app.metrics.clone();
    let text = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    (
        StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Serves the endpoints on `listener` until the runtime ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(App { health, metrics });
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(?addr, "serving /healthz /livez /readyz /metrics");
    axum::serve(listener, app).await.context("HTTP server")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_the_first_sync_unhealthy_when_a_change_waits_too_long() {
        let h = Health::new(Duration::from_millis(30));
        assert!(!h.ready() && h.healthy(), "nothing pending yet");
        h.pending();
        assert!(h.healthy(), "a fresh change is fine");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.healthy(), "a change waiting past the timeout is not");
        h.synced();
        assert!(h.ready() && h.healthy());
        assert!(h.body().contains("\"lastUpdated\": \"20"), "{}", h.body());
    }
}

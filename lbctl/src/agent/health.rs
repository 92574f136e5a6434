//! The agent's HTTP endpoints, as kube-proxy has them (its
//! `pkg/proxy/healthcheck`), on both listeners:
//!
//! - `/healthz`: JSON `lastUpdated`, `currentTime`, `nodeEligible`,
//!   `healthy`, `status.IPv4`; 503 when a change has waited longer than the
//!   timeout (writes keep failing, or the loop is stuck) or when this node
//!   is not eligible (its Node is being deleted or carries the cluster
//!   autoscaler's `ToBeDeletedByClusterAutoscaler` taint), so load
//!   balancers drain it.
//! - `/livez`: the same without the node: 503 only when unhealthy.
//! - `/readyz`: 200 once the first full sync is in the maps, 503 before.
//! - `/proxyMode`: `ebpf` (kube-proxy answers its mode there).
//! - `/metrics`: Prometheus text format.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use k8s_openapi::api::core::v1::Node;
use tracing::info;

use super::metrics::Metrics;

/// The cluster autoscaler's taint on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending to this node: not while its
/// Node is being deleted or tainted for deletion (kube-proxy's rule).
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

#[derive(Debug)]
struct HealthState {
    ready: bool,
    node_eligible: bool,
    last_updated: Option<SystemTime>,
    /// Since when a change seen in the source waits for its writes.
    pending_since: Option<Instant>,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            ready: false,
            node_eligible: true,
            last_updated: None,
            pending_since: None,
        }
    }
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

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_is_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// Healthy unless a change has waited longer than the timeout.
    pub fn healthy(&self) -> bool {
        self.lock()
            .pending_since
            .is_none_or(|t| t.elapsed() <= self.timeout)
    }

    /// kube-proxy's JSON; `node_eligible` only on `/healthz`. A healthy
    /// answer says `lastUpdated` is now, as kube-proxy's does.
    fn body(&self, node_eligible: Option<bool>, healthy: bool) -> String {
        let fmt = |t: SystemTime| {
            jiff::Timestamp::try_from(t)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let now = SystemTime::now();
        let updated = self.lock().last_updated.map(fmt).unwrap_or_default();
        let mut v = serde_json::json!({
            "lastUpdated": if healthy { fmt(now) } else { updated.clone() },
            "currentTime": fmt(now),
            "healthy": self.healthy(),
            "status": {"IPv4": {"lastUpdated": updated, "healthy": self.healthy()}},
        });
        if let Some(e) = node_eligible {
            v["nodeEligible"] = e.into();
        }
        format!("{v}\n")
    }
}

#[derive(Clone)]
struct App {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    let eligible = app.health.node_is_eligible();
    let healthy = app.health.healthy() && eligible;
    (
        code(healthy),
        [("content-type", "application/json")],
        app.health.body(Some(eligible), healthy),
    )
}

async fn livez(State(app): State<App>) -> impl IntoResponse {
    let healthy = app.health.healthy();
    (
        code(healthy),
        [("content-type", "application/json")],
        app.health.body(None, healthy),
    )
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn proxy_mode() -> &'static str {
    "ebpf"
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
        .route("/proxyMode", get(proxy_mode))
        .route("/metrics", get(metrics_text))
        .with_state(App { health, metrics });
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(?addr, "serving /healthz /livez /readyz /proxyMode /metrics");
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
        let v: serde_json::Value = serde_json::from_str(&h.body(Some(true), true)).unwrap();
        assert!(v["lastUpdated"].as_str().unwrap().starts_with("20"), "{v}");
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(v["status"]["IPv4"]["healthy"], true);
        let v: serde_json::Value = serde_json::from_str(&h.body(None, true)).unwrap();
        assert!(
            v.get("nodeEligible").is_none(),
            "/livez says nothing of the node"
        );
    }

    #[test]
    fn a_node_being_deleted_is_not_eligible() {
        let mut n = Node::default();
        assert!(node_eligible(&n));
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(!node_eligible(&n));
        let mut n = Node::default();
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(!node_eligible(&n));
    }
}

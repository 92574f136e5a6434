//! Health check node ports, as kube-proxy serves them: for each Service
//! with `externalTrafficPolicy: Local` (which the API server gives a
//! `healthCheckNodePort`), an HTTP listener on that port answering how many
//! of the Service's endpoints are ready on this node. Cloud load balancers
//! send to a node only while it answers 200. The listener appears and
//! disappears with the Service.
//!
//! Answer (kube-proxy's): `X-Load-Balancing-Endpoint-Weight: N` and JSON
//! `{"service":{"namespace","name"},"localEndpoints":N,"serviceProxyHealthy"}`;
//! 200 when N > 0 and the agent is healthy, 503 otherwise. Here "healthy"
//! also needs this node to be eligible (its Node not being deleted), so a
//! node on its way out is drained.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tracing::{info, warn};

use super::{
    health::Health,
    model::{BackendState, ObjKey, ServicePortKey, ServicePortState},
};

/// What one listener answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: ObjKey,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The health check node port each Service asks for, and its local
/// endpoint count, from its translated ports.
pub fn wanted(
    service: &ObjKey,
    ports: &BTreeMap<ServicePortKey, ServicePortState>,
) -> Option<(u16, Target)> {
    let hc = ports.values().find_map(|p| p.health_check_node_port)?;
    // Endpoints, not ports: one pod serving two ports counts once.
    let mut local: Vec<Ipv4Addr> = ports
        .values()
        .flat_map(|p| &p.backends)
        .filter(|b| b.local && b.state == BackendState::Active)
        .map(|b| b.addr.addr)
        .collect();
    local.sort_unstable();
    local.dedup();
    Some((
        hc,
        Target {
            service: service.clone(),
            local_endpoints: local.len(),
        },
    ))
}

struct Listener {
    target: Arc<Mutex<Target>>,
    task: tokio::task::JoinHandle<()>,
}

/// The listeners, by port.
pub struct HealthCheckServers {
    health: Arc<Health>,
    by_service: BTreeMap<ObjKey, u16>,
    listeners: BTreeMap<u16, Listener>,
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            by_service: BTreeMap::new(),
            listeners: BTreeMap::new(),
        }
    }

    /// A Service was translated again: start, update or stop its listener.
    pub async fn update(
        &mut self,
        service: &ObjKey,
        ports: &BTreeMap<ServicePortKey, ServicePortState>,
    ) {
        let want = wanted(service, ports);
        let had = self.by_service.get(service).copied();
        if had.is_some() && had != want.as_ref().map(|w| w.0) {
            self.stop(service);
        }
        let Some((port, target)) = want else { return };
        if let Some(l) = self.listeners.get(&port) {
            *l.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
            return;
        }
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!(service = %service, port, "health check node port not served: binding {addr}: {e}");
                return;
            }
        };
        info!(service = %service, port, local_endpoints = target.local_endpoints, "serving the health check node port");
        let target = Arc::new(Mutex::new(target));
        let app = Router::new()
            .fallback(get(answer))
            .with_state((target.clone(), self.health.clone()));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.by_service.insert(service.clone(), port);
        self.listeners.insert(port, Listener { target, task });
    }

    fn stop(&mut self, service: &ObjKey) {
        if let Some(port) = self.by_service.remove(service)
            && let Some(l) = self.listeners.remove(&port)
        {
            l.task.abort();
            info!(service = %service, port, "health check node port closed");
        }
    }
}

async fn answer(
    State((target, health)): State<(Arc<Mutex<Target>>, Arc<Health>)>,
) -> impl IntoResponse {
    let t = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let healthy = health.healthy() && health.node_is_eligible();
    let code = if t.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": t.service.namespace, "name": t.service.name},
        "localEndpoints": t.local_endpoints,
        "serviceProxyHealthy": healthy,
    });
    (
        code,
        [
            ("content-type", "application/json".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            (
                "x-load-balancing-endpoint-weight",
                t.local_endpoints.to_string(),
            ),
        ],
        body.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::{self, NodeInfo, Objects};

    #[test]
    fn counts_ready_endpoints_on_this_node_once_each() {
        let f = crate::agent::source::dir::parse(
            "t.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalTrafficPolicy: Local
  healthCheckNodePort: 31500
  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: x, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.244.1.11], nodeName: here}
- {addresses: [10.244.1.12], nodeName: here, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.11], nodeName: elsewhere}
"#,
        );
        let mut objs = Objects::default();
        crate::agent::source::dir::merge(&mut objs, &mut BTreeMap::new(), &f);
        let node = NodeInfo {
            name: "here".into(),
            ..Default::default()
        };
        let key = ObjKey {
            namespace: "x".into(),
            name: "lb".into(),
        };
        let ports = model::translate_service(
            &key,
            &objs.services[&key],
            &objs.slices.values().map(|s| s.as_ref()).collect::<Vec<_>>(),
            None,
            &node,
        )
        .unwrap();
        // Two ports, one ready local pod: 1. The terminating one and the
        // other node's do not count.
        assert_eq!(
            wanted(&key, &ports),
            Some((
                31500,
                Target {
                    service: key.clone(),
                    local_endpoints: 1
                }
            ))
        );
        let plain: BTreeMap<ServicePortKey, ServicePortState> = BTreeMap::new();
        assert_eq!(wanted(&key, &plain), None);
    }
}

//! A Service as the agent keeps it: the fields translation and the manifest
//! source's allocation read, made at ingest, in the shapes the API gives
//! them (validation stays with translation, so a bad value is reported as
//! before). The k8s-openapi `Service` is 824 bytes before its strings
//! (object metadata, a spec of some forty optional fields, a status), and
//! a real one carries labels, annotations such as kubectl's
//! last-applied-configuration and a selector the agent never reads; this
//! one is about 300 bytes. Its name and namespace are the store's key.

use k8s_openapi::api::core::v1::Service;

use super::{
    intern::{Interned, intern},
    model::{
        ANNOTATION_ALGORITHM, ANNOTATION_MODE, ANNOTATION_WEIGHTS, LABEL_HEADLESS, LABEL_PROXY_NAME,
    },
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Svc {
    /// Labelled `service.kubernetes.io/service-proxy-name` (another proxy
    /// serves it) or `service.kubernetes.io/headless`: not programmed.
    pub foreign: bool,
    /// None: the object has no spec (nothing to program).
    pub spec: Option<SvcSpec>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Vec<Ingress>,
    /// The `lbctl.dev/` load-balancing annotations, when it has any (few
    /// do: boxed).
    pub balancing: Option<Box<SvcBalancing>>,
}

/// The annotations as written; translation reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcBalancing {
    pub algorithm: Option<String>,
    pub weights: Option<String>,
    pub mode: Option<String>,
}

/// Words from a small vocabulary (types, policies, protocols, port names)
/// are shared (`intern`): one pointer each, one copy in the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcSpec {
    pub type_: Option<Interned>,
    pub cluster_ip: Option<String>,
    pub cluster_ips: Option<Vec<String>>,
    pub external_ips: Option<Vec<String>>,
    pub external_traffic_policy: Option<Interned>,
    pub internal_traffic_policy: Option<Interned>,
    pub session_affinity: Option<Interned>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: Option<i32>,
    pub health_check_node_port: Option<i32>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub ports: Option<Vec<SvcPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcPort {
    pub name: Option<Interned>,
    pub protocol: Option<Interned>,
    pub port: i32,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingress {
    pub ip: Option<String>,
    /// `ipMode: Proxy`.
    pub proxy: bool,
}

/// A list allocated at its length (kept for the Service's life).
fn exact<T: Clone>(v: &Option<Vec<T>>) -> Option<Vec<T>> {
    v.as_ref().map(|v| v.as_slice().to_vec())
}

impl From<&Service> for Svc {
    fn from(s: &Service) -> Self {
        let labels = s.metadata.labels.as_ref();
        let ann = s.metadata.annotations.as_ref();
        let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
        let balancing = SvcBalancing {
            algorithm: get(ANNOTATION_ALGORITHM),
            weights: get(ANNOTATION_WEIGHTS),
            mode: get(ANNOTATION_MODE),
        };
        let balancing = (balancing != SvcBalancing::default()).then(|| Box::new(balancing));
        let spec = s.spec.as_ref().map(|spec| SvcSpec {
            type_: spec.type_.as_deref().map(intern),
            cluster_ip: spec.cluster_ip.clone(),
            cluster_ips: exact(&spec.cluster_ips),
            external_ips: exact(&spec.external_ips),
            external_traffic_policy: spec.external_traffic_policy.as_deref().map(intern),
            internal_traffic_policy: spec.internal_traffic_policy.as_deref().map(intern),
            session_affinity: spec.session_affinity.as_deref().map(intern),
            affinity_timeout_s: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            health_check_node_port: spec.health_check_node_port,
            load_balancer_source_ranges: exact(&spec.load_balancer_source_ranges),
            allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
            ports: spec.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| SvcPort {
                        name: p.name.as_deref().map(intern),
                        protocol: p.protocol.as_deref().map(intern),
                        port: p.port,
                        node_port: p.node_port,
                    })
                    .collect()
            }),
        });
        let ingress = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|i| Ingress {
                ip: i.ip.clone(),
                proxy: i.ip_mode.as_deref() == Some("Proxy"),
            })
            .collect();
        Self {
            foreign: labels.is_some_and(|l| {
                l.contains_key(LABEL_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
            }),
            spec,
            ingress,
            balancing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_translation_and_allocation_read() {
        let s: Service = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  labels: {app: web}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
spec:
  type: LoadBalancer
  selector: {app: web}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  externalIPs: [203.0.113.9]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Cluster
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [10.0.0.0/8]
  allocateLoadBalancerNodePorts: false
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.5}, {ip: 198.51.100.6, ipMode: Proxy}, {hostname: lb.example}]
"#,
        )
        .unwrap();
        let c = Svc::from(&s);
        assert!(!c.foreign);
        let spec = c.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.10".to_string()]));
        assert_eq!(spec.external_ips, Some(vec!["203.0.113.9".to_string()]));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(spec.affinity_timeout_s, Some(60));
        assert_eq!(spec.health_check_node_port, Some(32000));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_string()])
        );
        assert_eq!(spec.allocate_load_balancer_node_ports, Some(false));
        assert_eq!(
            spec.ports,
            Some(vec![SvcPort {
                name: Some(intern("http")),
                protocol: Some(intern("TCP")),
                port: 80,
                node_port: Some(30080),
            }])
        );
        assert_eq!(
            c.ingress,
            vec![
                Ingress {
                    ip: Some("198.51.100.5".into()),
                    proxy: false
                },
                Ingress {
                    ip: Some("198.51.100.6".into()),
                    proxy: true
                },
                Ingress {
                    ip: None,
                    proxy: false
                },
            ]
        );
        assert!(std::mem::size_of::<Svc>() < 400);
    }

    #[test]
    fn services_of_another_proxy_or_headless_are_foreign() {
        for label in [LABEL_PROXY_NAME, LABEL_HEADLESS] {
            let y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a, labels: {{\"{label}\": x}}}}\nspec: {{ports: [{{port: 80}}]}}\n"
            );
            let s: Service = serde_yaml::from_str(&y).unwrap();
            assert!(Svc::from(&s).foreign, "{label}");
        }
    }
}

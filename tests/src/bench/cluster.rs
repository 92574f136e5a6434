//! The synthetic cluster every datapath in the benchmark is given: the same
//! Services and endpoints, as kube-proxy's input ([`Svc`]) for the
//! iptables and nftables recreations, and as Kubernetes objects for our
//! agent (built in code: 100,000 Services as YAML would cost more to parse
//! than to program).

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lbctl::agent::model::{ObjKey, Objects};

use crate::kubeproxy::{self, Svc};

/// `n` Services of `per_svc` endpoints, the first 2,000 with a NodePort
/// (kube-proxy's recreation's [`kubeproxy::synthetic`] layout), every
/// endpoint address distinct (10.128.0.0/12), as in a real cluster.
pub fn services(n: usize, per_svc: usize) -> Vec<Svc> {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 1));
    let mut svcs = kubeproxy::synthetic(n, per_svc);
    for (i, s) in svcs.iter_mut().enumerate() {
        for (j, ep) in s.endpoints.iter_mut().enumerate() {
            ep.0 = Ipv4Addr::from(base + (i * per_svc + j) as u32);
        }
    }
    svcs
}

/// The Service the end-to-end runs target: in the middle of the list, so
/// kube-proxy's linear chains are walked half way (their average), and
/// with a NodePort. Its endpoints become the real pods.
pub fn target_index(n: usize) -> usize {
    (n / 2).min(kubeproxy::SYNTHETIC_NODEPORTS - 1)
}

fn meta(ns: &str, name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        labels,
        ..Default::default()
    }
}

/// One Service port as the objects our agent reads.
pub fn to_objects(svcs: &[Svc], node_name: &str) -> Objects {
    let mut o = Objects::default();
    for s in svcs {
        let svc = Service {
            metadata: meta(&s.namespace, &s.name, None),
            spec: Some(ServiceSpec {
                type_: Some(if s.node_port.is_some() {
                    "NodePort".into()
                } else {
                    "ClusterIP".into()
                }),
                cluster_ip: Some(s.cluster_ip.to_string()),
                cluster_ips: Some(vec![s.cluster_ip.to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some(s.port_name.clone()),
                    port: s.port.into(),
                    node_port: s.node_port.map(i32::from),
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::Int(
                        s.endpoints.first().map_or(8080, |e| e.1).into(),
                    )),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let labels = BTreeMap::from([("kubernetes.io/service-name".to_string(), s.name.clone())]);
        let slice = EndpointSlice {
            metadata: meta(&s.namespace, &format!("{}-1", s.name), Some(labels)),
            address_type: "IPv4".into(),
            endpoints: Some(
                s.endpoints
                    .iter()
                    .map(|(ip, _)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(node_name.into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some(s.port_name.clone()),
                port: Some(s.endpoints.first().map_or(8080, |e| e.1).into()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        };
        o.services.insert(
            ObjKey::of(&svc.metadata),
            Arc::new(lbctl::agent::svc::Svc::from(&svc)),
        );
        o.slices.insert(
            ObjKey::of(&slice.metadata),
            Arc::new(lbctl::agent::slice::Slice::from(&slice)),
        );
    }
    o
}

/// The same as manifest text, for the agent's directory source.
pub fn to_yaml(svcs: &[Svc], node_name: &str) -> String {
    let mut y = String::with_capacity(svcs.len() * 900);
    for s in svcs {
        let np = if s.node_port.is_some() {
            "type: NodePort\n  "
        } else {
            ""
        };
        let node_port = s
            .node_port
            .map_or(String::new(), |p| format!(", nodePort: {p}"));
        let target = s.endpoints.first().map_or(8080, |e| e.1);
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  {np}clusterIP: {}\n  ports: [{{name: {}, port: {}, targetPort: {target}{node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {}-1, namespace: {}, labels: {{kubernetes.io/service-name: {}}}}}\naddressType: IPv4\nports: [{{name: {}, port: {target}}}]\nendpoints:\n",
            s.name,
            s.namespace,
            s.cluster_ip,
            s.port_name,
            s.port,
            s.name,
            s.namespace,
            s.name,
            s.port_name
        );
        for (ip, _) in &s.endpoints {
            y += &format!(
                "- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node_name}}}\n"
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_yaml_say_the_same() {
        let svcs = services(30, 10);
        let node = lbctl::agent::model::NodeInfo {
            name: "node-a".into(),
            zone: None,
            addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
            snat: None,
            balancing: Default::default(),
        };
        let from_code = lbctl::agent::model::translate(&to_objects(&svcs, "node-a"), &node);
        let from_yaml = lbctl::agent::model::translate(
            &crate::fixture::objects(&to_yaml(&svcs, "node-a")),
            &node,
        );
        assert!(from_code.errors.is_empty(), "{:?}", from_code.errors);
        assert_eq!(from_code, from_yaml);
        assert_eq!(target_index(10_000), 1999);
        assert_eq!(target_index(1000), 500);
    }
}

//! An EndpointSlice as the agent keeps it: what translation reads and
//! nothing else, made at ingest. The k8s-openapi `Endpoint` is about 340
//! bytes before its strings (a target reference of seven optional strings,
//! deprecated topology, hostname, ...); this one is under a hundred, with
//! addresses parsed once. At 10,000 Services of 10 endpoints the store's
//! slices shrank from 35 MiB to a few.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    intern::{Interned, intern},
    model::{LABEL_HEADLESS, LABEL_PROXY_NAME, LABEL_SERVICE_NAME},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// The `kubernetes.io/service-name` label: the Service it serves (none
    /// when the slice is labelled `service.kubernetes.io/headless` or
    /// `service.kubernetes.io/service-proxy-name`).
    pub service: Option<String>,
    /// `addressType: IPv4` (IPv6 and FQDN slices are not programmed).
    pub ipv4: bool,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlicePort {
    /// Shared (`intern`), as a Service's port names are.
    pub name: Option<Interned>,
    pub protocol: Option<Interned>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first IPv4 address: kube-proxy uses only an endpoint's first
    /// address (the API calls them fungible). Others, and unparsable ones,
    /// are left out: the datapath is IPv4 and the API server validates
    /// addresses.
    pub address: Option<Ipv4Addr>,
    /// The conditions as written (unset is not false: see the model).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Shared (`intern`).
    pub node_name: Option<Interned>,
    pub zone: Option<Interned>,
    /// Topology hints (zones, nodes), rare: boxed.
    pub hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    pub for_zones: Vec<String>,
    pub for_nodes: Vec<String>,
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Self {
        // From a slice, not a flattened Option: the exact length is known,
        // so the vector is allocated once at its size (growing by doubling
        // left 10 endpoints in room for 16).
        let endpoints = s
            .endpoints
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|ep| {
                let c = ep.conditions.as_ref();
                let hints = ep.hints.as_ref().map(|h| {
                    Box::new(Hints {
                        for_zones: h
                            .for_zones
                            .iter()
                            .flatten()
                            .map(|z| z.name.clone())
                            .collect(),
                        for_nodes: h
                            .for_nodes
                            .iter()
                            .flatten()
                            .map(|n| n.name.clone())
                            .collect(),
                    })
                });
                let address = ep.addresses.iter().find_map(|a| match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) => Some(a),
                    _ => None,
                });
                SliceEndpoint {
                    address,
                    ready: c.and_then(|c| c.ready),
                    serving: c.and_then(|c| c.serving),
                    terminating: c.and_then(|c| c.terminating),
                    node_name: ep.node_name.as_deref().map(intern),
                    zone: ep.zone.as_deref().map(intern),
                    hints,
                }
            })
            .collect();
        let labels = s.metadata.labels.as_ref();
        // As kube-proxy's informers select them: a slice labelled headless
        // or for another proxy serves no Service of ours, whatever its
        // service-name says.
        let foreign = labels
            .is_some_and(|l| l.contains_key(LABEL_HEADLESS) || l.contains_key(LABEL_PROXY_NAME));
        Self {
            service: labels
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .filter(|_| !foreign)
                .cloned(),
            ipv4: s.address_type == "IPv4",
            ports: s
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|p| SlicePort {
                    name: p.name.as_deref().map(intern),
                    protocol: p.protocol.as_deref().map(intern),
                    port: p.port,
                })
                .collect(),
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_translation_reads() {
        let s: EndpointSlice = serde_yaml::from_str(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
  annotations: {big: "not kept"}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5, "fd00::5", not-an-address]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
  zone: z1
  hints: {forZones: [{name: z1}], forNodes: [{name: node-a}]}
  targetRef: {kind: Pod, name: web-x, namespace: demo}
- addresses: [10.244.1.6]
"#,
        )
        .unwrap();
        let c = Slice::from(&s);
        assert_eq!(c.service.as_deref(), Some("web"));
        assert!(c.ipv4);
        assert_eq!(
            c.ports,
            vec![SlicePort {
                name: Some(intern("http")),
                protocol: Some(intern("TCP")),
                port: Some(8080)
            }]
        );
        let e = &c.endpoints[0];
        assert_eq!(e.address, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(
            (e.ready, e.serving, e.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert_eq!(
            e.hints.as_deref(),
            Some(&Hints {
                for_zones: vec!["z1".into()],
                for_nodes: vec!["node-a".into()]
            })
        );
        // Unset conditions stay unset (ready by default is the model's).
        let e = &c.endpoints[1];
        assert_eq!(
            (e.ready, e.serving, e.terminating, e.hints.is_none()),
            (None, None, None, true)
        );
        assert!(std::mem::size_of::<SliceEndpoint>() < 100);
        assert_eq!(c.endpoints.capacity(), 2, "allocated at its length");
    }
}

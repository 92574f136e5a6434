//! Which endpoints each kind of traffic may use on this node: kube-proxy's
//! `CategorizeEndpoints` (pkg/proxy/topology.go), rule for rule, so the
//! socket and device paths pick from exactly the endpoints kube-proxy's
//! chains would hold.
//!
//! - **Cluster** endpoints (used when `internalTrafficPolicy` is Cluster or
//!   the Service is reachable from outside): the ready ones, narrowed by
//!   topology hints when every ready endpoint carries them and one names
//!   this node (`forNodes`) or its zone (`forZones`); when none is ready,
//!   the serving-and-terminating ones.
//! - **Local** endpoints (used under a `Local` policy): the ready ones on
//!   this node; when none is, this node's serving-and-terminating ones.
//!
//! Topology comes from the hints alone, as in kube-proxy: the EndpointSlice
//! controller turns `trafficDistribution` and the topology-mode annotation
//! into hints, and slices written by hand carry whatever hints they say.

use super::model::{Backend, BackendAddr, BackendState};

/// The topology narrowing applied to Cluster endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TopologyMode {
    /// Every ready endpoint has `forNodes` hints and one names this node.
    PreferSameNode,
    /// Every ready endpoint has `forZones` hints and one names this zone.
    PreferSameZone,
}

impl TopologyMode {
    pub fn label(self) -> &'static str {
        match self {
            Self::PreferSameNode => "PreferSameNode",
            Self::PreferSameZone => "PreferSameZone",
        }
    }
}

/// One traffic policy's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEndpoints {
    pub backends: Vec<BackendAddr>,
    /// No endpoint was ready: these are serving-but-terminating ones.
    pub terminating_fallback: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointSets {
    /// For Cluster policy (empty when the port does not use it).
    pub cluster: PolicyEndpoints,
    /// For Local policy (empty when the port does not use it).
    pub local: PolicyEndpoints,
    /// Topology hints narrowed `cluster`.
    pub topology: Option<TopologyMode>,
    /// Some endpoint is usable somewhere (ready, or serving and
    /// terminating): without one, traffic is rejected; with one but none
    /// for a policy here, that policy's traffic is dropped.
    pub has_endpoints: bool,
}

/// What decides the categories, besides the endpoints.
#[derive(Clone, Copy, Debug)]
pub struct Policies {
    pub internal_local: bool,
    pub external_local: bool,
    /// NodePort, LoadBalancer or external IPs: external traffic exists.
    pub externally_accessible: bool,
}

impl Policies {
    /// kube-proxy's `UsesClusterEndpoints`: even under `externalTraffic
    /// Policy: Local` the Cluster endpoints serve pods and the node
    /// reaching an external address (the short-circuit).
    fn uses_cluster(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    fn uses_local(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible)
    }
}

fn ready(b: &Backend) -> bool {
    b.state == BackendState::Active
}

fn serving_terminating(b: &Backend) -> bool {
    b.state == BackendState::Terminating
}

fn pick(backends: &[Backend], f: impl Fn(&Backend) -> bool) -> Vec<BackendAddr> {
    backends.iter().filter(|b| f(b)).map(|b| b.addr).collect()
}

/// kube-proxy's `topologyModeFromHints`.
fn topology_mode(backends: &[Backend], node: &str, zone: Option<&str>) -> Option<TopologyMode> {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for b in backends.iter().filter(|b| ready(b)) {
        any_ready = true;
        if b.hint_nodes().is_empty() {
            all_node_hints = false;
        } else if b.hint_nodes().iter().any(|n| n == node) {
            for_node = true;
        }
        if b.hint_zones().is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| b.hint_zones().iter().any(|h| h == z)) {
            for_zone = true;
        }
    }
    if !any_ready {
        return None;
    }
    if all_node_hints && for_node {
        return Some(TopologyMode::PreferSameNode);
    }
    if all_zone_hints && for_zone {
        return Some(TopologyMode::PreferSameZone);
    }
    None
}

fn available(b: &Backend, mode: Option<TopologyMode>, node: &str, zone: Option<&str>) -> bool {
    match mode {
        None => true,
        Some(TopologyMode::PreferSameNode) => b.hint_nodes().iter().any(|n| n == node),
        Some(TopologyMode::PreferSameZone) => {
            zone.is_some_and(|z| b.hint_zones().iter().any(|h| h == z))
        }
    }
}

/// The endpoint categories of one Service port on node `node` in `zone`.
pub fn categorize(
    backends: &[Backend],
    policies: Policies,
    node: &str,
    zone: Option<&str>,
) -> EndpointSets {
    let mut out = EndpointSets {
        has_endpoints: backends.iter().any(|b| ready(b) || serving_terminating(b)),
        ..Default::default()
    };
    if policies.uses_cluster() {
        let mode = topology_mode(backends, node, zone);
        out.topology = mode;
        out.cluster.backends = pick(backends, |b| ready(b) && available(b, mode, node, zone));
        if out.cluster.backends.is_empty() {
            out.cluster.backends = pick(backends, serving_terminating);
            out.cluster.terminating_fallback = !out.cluster.backends.is_empty();
        }
    }
    if policies.uses_local() {
        out.local.backends = pick(backends, |b| b.local && ready(b));
        if out.local.backends.is_empty() {
            out.local.backends = pick(backends, |b| b.local && serving_terminating(b));
            out.local.terminating_fallback = !out.local.backends.is_empty();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::agent::model::Proto;

    fn be(last: u8, state: BackendState, local: bool) -> Backend {
        Backend {
            addr: BackendAddr {
                addr: Ipv4Addr::new(10, 244, 1, last),
                port: 8080,
                proto: Proto::Tcp,
            },
            state,
            ready: state == BackendState::Active,
            serving: true,
            terminating: state == BackendState::Terminating,
            local,
            node_name: None,
            zone: None,
            hints: None,
            weight: crate::agent::model::DEFAULT_WEIGHT,
        }
    }

    fn hints(zones: &[&str], nodes: &[&str]) -> Option<Box<crate::agent::slice::Hints>> {
        Some(Box::new(crate::agent::slice::Hints {
            for_zones: zones.iter().map(|z| z.to_string()).collect(),
            for_nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }))
    }

    fn lasts(p: &PolicyEndpoints) -> Vec<u8> {
        p.backends.iter().map(|b| b.addr.octets()[3]).collect()
    }

    const CLUSTER: Policies = Policies {
        internal_local: false,
        external_local: false,
        externally_accessible: true,
    };
    const ETP_LOCAL: Policies = Policies {
        internal_local: false,
        external_local: true,
        externally_accessible: true,
    };
    const ITP_LOCAL_ONLY: Policies = Policies {
        internal_local: true,
        external_local: false,
        externally_accessible: false,
    };

    use BackendState::{Active as R, Terminating as T};

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let b = [be(1, R, false), be(2, T, true), be(3, R, true)];
        let s = categorize(&b, ETP_LOCAL, "n", None);
        assert_eq!(lasts(&s.cluster), [1, 3]);
        assert_eq!(lasts(&s.local), [3]);
        assert!(!s.cluster.terminating_fallback && !s.local.terminating_fallback);
        assert!(s.has_endpoints);
    }

    #[test]
    fn terminating_fallback_per_policy() {
        // Nothing ready anywhere: Cluster falls back to every serving
        // terminating endpoint, Local to the ones on this node.
        let b = [be(1, T, false), be(2, T, true)];
        let s = categorize(&b, ETP_LOCAL, "n", None);
        assert_eq!(lasts(&s.cluster), [1, 2]);
        assert!(s.cluster.terminating_fallback);
        assert_eq!(lasts(&s.local), [2]);
        assert!(s.local.terminating_fallback);
        // A ready endpoint elsewhere: Cluster uses it, Local falls back to
        // the local terminating one.
        let b = [be(1, R, false), be(2, T, true)];
        let s = categorize(&b, ETP_LOCAL, "n", None);
        assert_eq!(lasts(&s.cluster), [1]);
        assert_eq!(lasts(&s.local), [2]);
        assert!(s.local.terminating_fallback);
    }

    #[test]
    fn no_local_endpoint_is_a_drop_none_at_all_a_reject() {
        let s = categorize(&[be(1, R, false)], ETP_LOCAL, "n", None);
        assert!(s.local.backends.is_empty() && s.has_endpoints);
        let s = categorize(&[], ETP_LOCAL, "n", None);
        assert!(!s.has_endpoints);
    }

    #[test]
    fn only_the_policies_in_use_are_computed() {
        let b = [be(1, R, false), be(2, R, true)];
        let s = categorize(&b, CLUSTER, "n", None);
        assert!(s.local.backends.is_empty());
        assert_eq!(lasts(&s.cluster), [1, 2]);
        let s = categorize(&b, ITP_LOCAL_ONLY, "n", None);
        assert!(s.cluster.backends.is_empty());
        assert_eq!(lasts(&s.local), [2]);
    }

    #[test]
    fn zone_hints_narrow_only_when_all_ready_have_them() {
        let mut a = be(1, R, false);
        a.hints = hints(&["z1"], &[]);
        let mut b = be(2, R, false);
        b.hints = hints(&["z2"], &[]);
        let s = categorize(&[a.clone(), b.clone()], CLUSTER, "n", Some("z1"));
        assert_eq!(lasts(&s.cluster), [1]);
        assert_eq!(s.topology, Some(TopologyMode::PreferSameZone));
        // A zone no hint names, no zone label, or one ready endpoint
        // without hints: no narrowing.
        for (zone, eps) in [
            (Some("z3"), vec![a.clone(), b.clone()]),
            (None, vec![a.clone(), b.clone()]),
            (Some("z1"), vec![a.clone(), b.clone(), be(3, R, false)]),
        ] {
            let s = categorize(&eps, CLUSTER, "n", zone);
            assert_eq!(s.topology, None, "{zone:?}");
            assert_eq!(s.cluster.backends.len(), eps.len());
        }
        // A terminating endpoint without hints does not count.
        let s = categorize(&[a, b, be(3, T, false)], CLUSTER, "n", Some("z2"));
        assert_eq!(lasts(&s.cluster), [2]);
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let mut a = be(1, R, true);
        a.hints = hints(&["z1"], &["n"]);
        let mut b = be(2, R, false);
        b.hints = hints(&["z1"], &["m"]);
        let s = categorize(&[a.clone(), b.clone()], CLUSTER, "n", Some("z1"));
        assert_eq!(s.topology, Some(TopologyMode::PreferSameNode));
        assert_eq!(lasts(&s.cluster), [1]);
        // On a node no hint names, the zone hints apply.
        let s = categorize(&[a, b], CLUSTER, "o", Some("z1"));
        assert_eq!(s.topology, Some(TopologyMode::PreferSameZone));
        assert_eq!(lasts(&s.cluster), [1, 2]);
    }
}

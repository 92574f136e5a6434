//! Service fields the agent accepts but the datapath does not act on yet
//! (`NE_*` in lb-common). Each Service port that asks for one is logged
//! when it starts or stops asking, not at every endpoint change, and
//! `lbctl services` shows the same bits from the maps: nothing is silently
//! ignored.

use std::collections::BTreeMap;

use lb_common::service::not_enforced_names;
use tracing::{info, warn};

use super::model::{ObjKey, ServicePortKey, ServicePortState};

#[derive(Debug, Default)]
pub struct NotEnforced {
    /// What was last reported per Service port (absent: nothing).
    reported: BTreeMap<ServicePortKey, u32>,
}

/// One line for the log: what changed for one Service port.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// Asks for these and they are not enforced.
    Ignored(ServicePortKey, Vec<&'static str>),
    /// No longer asks for anything the datapath lacks.
    Cleared(ServicePortKey),
}

impl NotEnforced {
    /// Takes a Service's newly translated ports and returns what to say.
    pub fn update(
        &mut self,
        service: &ObjKey,
        ports: &BTreeMap<ServicePortKey, ServicePortState>,
    ) -> Vec<Report> {
        let mut out = Vec::new();
        let old: Vec<ServicePortKey> = self
            .reported
            .keys()
            .filter(|k| k.namespace == service.namespace && k.name == service.name)
            .cloned()
            .collect();
        for k in old {
            if ports.get(&k).is_none_or(|p| p.not_enforced == 0) {
                self.reported.remove(&k);
                out.push(Report::Cleared(k));
            }
        }
        for (k, p) in ports {
            if p.not_enforced != 0 && self.reported.get(k) != Some(&p.not_enforced) {
                self.reported.insert(k.clone(), p.not_enforced);
                out.push(Report::Ignored(
                    k.clone(),
                    not_enforced_names(p.not_enforced).collect(),
                ));
            }
        }
        out
    }

    /// `update`, written to the log.
    pub fn log(&mut self, service: &ObjKey, ports: &BTreeMap<ServicePortKey, ServicePortState>) {
        for r in self.update(service, ports) {
            match r {
                Report::Ignored(k, names) => warn!(
                    service = %k,
                    not_enforced = ?names,
                    "accepted but not enforced yet: this port is forwarded as if these fields were not set"
                ),
                Report::Cleared(k) => info!(service = %k, "no field left that is not enforced"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::service::{NE_SESSION_AFFINITY, NE_SOURCE_RANGES};

    use super::*;
    use crate::agent::model::{Proto, ServiceType, TrafficPolicy};

    fn port(name: &str, bits: u32) -> (ServicePortKey, ServicePortState) {
        (
            ServicePortKey {
                namespace: "ns".into(),
                name: "svc".into(),
                port_name: name.into(),
            },
            ServicePortState {
                svc_type: ServiceType::ClusterIp,
                proto: Proto::Tcp,
                port: 80,
                node_port: None,
                frontends: Default::default(),
                backends: vec![],
                sets: Default::default(),
                affinity_timeout_s: None,
                external_policy: TrafficPolicy::Cluster,
                internal_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
                source_ranges: vec![],
                not_enforced: bits,
                maglev_table: 0,
                dsr: false,
            },
        )
    }

    #[test]
    fn reported_once_then_on_change_then_cleared() {
        let svc = ObjKey {
            namespace: "ns".into(),
            name: "svc".into(),
        };
        let mut ne = NotEnforced::default();
        let ports = BTreeMap::from([port("a", NE_SESSION_AFFINITY), port("b", 0)]);
        let r = ne.update(&svc, &ports);
        assert_eq!(
            r,
            [Report::Ignored(
                port("a", 0).0,
                vec!["sessionAffinity: ClientIP"]
            )]
        );
        assert!(ne.update(&svc, &ports).is_empty(), "said twice");
        let ports = BTreeMap::from([port("a", NE_SESSION_AFFINITY | NE_SOURCE_RANGES)]);
        assert_eq!(
            ne.update(&svc, &ports),
            [Report::Ignored(
                port("a", 0).0,
                vec!["sessionAffinity: ClientIP", "loadBalancerSourceRanges"]
            )]
        );
        assert_eq!(
            ne.update(&svc, &BTreeMap::new()),
            [Report::Cleared(port("a", 0).0)]
        );
    }
}

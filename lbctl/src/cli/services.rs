//! `lbctl services`: Services as the datapath has them, from the pinned
//! maps alone (names come from the agent's meta map, not the API).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use lb_common::{ip4_octets, port_host, service::*};
use serde::Serialize;

use super::{PinArgs, render};
use crate::{
    agent::{
        apply::MapWriter,
        model::{FrontendKind, Proto},
        state::{MapState, cstr},
    },
    datapath::maps::ServiceMaps,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// One Service port. Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    #[serde(rename = "type")]
    pub svc_type: String,
    pub protocol: String,
    pub frontends: Vec<FrontendView>,
    pub backends: Vec<BackendView>,
    pub session_affinity_timeout_s: Option<u32>,
    /// How new flows pick a backend: `hash` (a slot per backend) or
    /// `maglev` (a table of `maglev_table_size` slots).
    pub algorithm: String,
    pub maglev_table_size: Option<u32>,
    /// How flows from outside reach a backend on another node: `snat` or
    /// `dsr` (direct server return).
    pub mode: String,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
    /// `loadBalancerSourceRanges` as programmed (CIDRs).
    pub source_ranges: Vec<String>,
    /// Fields the Service sets that the datapath does not act on yet.
    pub not_enforced: Vec<String>,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    pub kind: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    /// What the datapath does with it: `active` (gets new flows),
    /// `terminating` (only when no backend is active), `quarantined`.
    pub state: String,
    /// The endpoint's conditions as the API had them.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
    /// Which traffic gives it new flows ("Cluster", "Local", both, with
    /// "terminating fallback" when no endpoint is ready), or why none does.
    pub new_flows: String,
    pub node: String,
    pub zone: String,
    /// Slots it holds in the port's Maglev table (the all-traffic one):
    /// its share of new flows, which its weight sets.
    pub maglev_slots: Option<u32>,
}

fn state_label(s: u8) -> &'static str {
    match s {
        BACKEND_ACTIVE => "active",
        BACKEND_TERMINATING => "terminating",
        BACKEND_QUARANTINED => "quarantined",
        _ => "unknown",
    }
}

/// Builds the view from map contents and per-service counters.
pub fn view(
    state: &MapState,
    stats: impl Fn(u32) -> lb_common::counters::ServiceStats,
) -> Vec<ServiceView> {
    let mut out: BTreeMap<u32, ServiceView> = BTreeMap::new();
    for (id, m) in &state.service_meta {
        let policy = |p| {
            if p == POLICY_LOCAL {
                "Local"
            } else {
                "Cluster"
            }
        };
        let s = stats(*id);
        out.insert(
            *id,
            ServiceView {
                id: *id,
                namespace: cstr(&m.namespace).into(),
                name: cstr(&m.name).into(),
                port_name: cstr(&m.port_name).into(),
                svc_type: match m.svc_type {
                    SVC_TYPE_NODE_PORT => "NodePort",
                    SVC_TYPE_LOAD_BALANCER => "LoadBalancer",
                    _ => "ClusterIP",
                }
                .into(),
                protocol: Proto::from_number(m.proto).map_or("?".into(), |p| p.to_string()),
                frontends: vec![],
                backends: vec![],
                session_affinity_timeout_s: (m.affinity_timeout_s > 0)
                    .then_some(m.affinity_timeout_s),
                algorithm: "hash".into(),
                maglev_table_size: None,
                mode: "snat".into(),
                external_traffic_policy: policy(m.external_policy).into(),
                internal_traffic_policy: policy(m.internal_policy).into(),
                source_ranges: vec![],
                not_enforced: not_enforced_names(m.not_enforced)
                    .map(str::to_string)
                    .collect(),
                flows: s.flows,
                packets: s.packets,
                bytes: s.bytes,
            },
        );
    }
    // Each Maglev port's table (of its first all-traffic frontend): slots
    // by backend.
    let mut tables: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (k, f) in &state.frontends {
        let Some(v) = out.get_mut(&f.service_id) else {
            continue;
        };
        // The second entry of a frontend (traffic from inside the node
        // under externalTrafficPolicy Local) is the same address.
        if k.scope != SCOPE_ALL {
            continue;
        }
        if f.flags & FE_DSR != 0 {
            v.mode = "dsr".into();
        }
        if f.flags & FE_MAGLEV != 0 && !tables.contains_key(&f.service_id) {
            v.algorithm = "maglev".into();
            v.maglev_table_size = Some(f.count.into());
            let mut shares = BTreeMap::new();
            for slot in 0..u32::from(f.count) {
                if let Some(id) = state.slot(f.backend_set, slot) {
                    *shares.entry(id).or_insert(0) += 1;
                }
            }
            tables.insert(f.service_id, shares);
        }
        v.frontends.push(FrontendView {
            kind: FrontendKind::from_number(f.kind)
                .map_or("?", |k| k.label())
                .into(),
            address: Ipv4Addr::from(ip4_octets(k.addr)),
            port: port_host(k.port),
        });
    }
    for k in state.source_ranges.keys() {
        if let Some(v) = out.get_mut(&k.service_id) {
            v.source_ranges.push(format!(
                "{}/{}",
                Ipv4Addr::from(ip4_octets(k.addr)),
                k.prefix_len
            ));
        }
    }
    // Every backend of each port, with what the port does with it.
    for (k, flags) in &state.svc_backends {
        let Some(v) = out.get_mut(&k.service_id) else {
            continue;
        };
        let id = k.backend_id;
        let Some(b) = state.backends.get(&id) else {
            continue;
        };
        // The endpoint's conditions as the API had them.
        let conditions = b.flags >> BACKEND_COND_SHIFT;
        let terminating = conditions & COND_TERMINATING != 0;
        let local = b.flags & BACKEND_LOCAL != 0;
        v.backends.push(BackendView {
            id,
            address: Ipv4Addr::from(ip4_octets(b.addr)),
            port: port_host(b.port),
            state: state_label(b.state).into(),
            ready: conditions & COND_READY != 0,
            serving: conditions & COND_SERVING != 0,
            terminating,
            local,
            new_flows: new_flows(*flags, terminating, local),
            node: state.node_name(b).into(),
            zone: state.zone_name(b).into(),
            maglev_slots: tables
                .get(&k.service_id)
                .map(|t| t.get(&id).copied().unwrap_or(0)),
        });
    }
    out.into_values().collect()
}

/// A port's use of one backend (`SB_*`), in words.
pub fn new_flows(flags: u32, terminating: bool, local: bool) -> String {
    let mut lists = Vec::new();
    if flags & SB_CLUSTER != 0 {
        lists.push("Cluster");
    }
    if flags & SB_LOCAL != 0 {
        lists.push("Local");
    }
    if !lists.is_empty() {
        let l = lists.join("+");
        return if flags & SB_FALLBACK != 0 {
            format!("{l} (terminating fallback)")
        } else {
            l
        };
    }
    if flags & SB_DRAINED != 0 {
        "no: drained (weight 0), existing flows stay".into()
    } else if flags & SB_SERVING == 0 {
        "no: not ready, existing TCP flows only".into()
    } else if terminating {
        "no: terminating, existing flows only".into()
    } else if flags & SB_TOPOLOGY_FILTERED != 0 {
        "no: topology hints".into()
    } else if !local {
        "no: Local policy, other node".into()
    } else {
        "no".into()
    }
}

pub fn table(views: &[ServiceView]) -> String {
    let rows = views
        .iter()
        .map(|v| {
            let name = if v.port_name.is_empty() {
                format!("{}/{}", v.namespace, v.name)
            } else {
                format!("{}/{}:{}", v.namespace, v.name, v.port_name)
            };
            let fronts: Vec<String> = v
                .frontends
                .iter()
                .map(|f| format!("{}:{} ({})", f.address, f.port, f.kind))
                .collect();
            let active = v.backends.iter().filter(|b| b.state == "active").count();
            let affinity = match v.session_affinity_timeout_s {
                Some(t) => format!("ClientIP {t}s"),
                None => "None".into(),
            };
            vec![
                name,
                v.svc_type.clone(),
                v.protocol.clone(),
                {
                    let a = match v.maglev_table_size {
                        Some(m) => format!("maglev/{m}"),
                        None => v.algorithm.clone(),
                    };
                    if v.mode == "dsr" {
                        format!("{a}\ndsr")
                    } else {
                        a
                    }
                },
                fronts.join("\n"),
                format!("{active}/{}", v.backends.len()),
                affinity,
                format!(
                    "{}/{}",
                    v.external_traffic_policy, v.internal_traffic_policy
                ),
                if v.not_enforced.is_empty() {
                    "-".into()
                } else {
                    v.not_enforced.join("\n")
                },
                v.flows.to_string(),
                v.packets.to_string(),
                v.bytes.to_string(),
            ]
        })
        .collect();
    render::table(
        &[
            "SERVICE",
            "TYPE",
            "PROTO",
            "ALGORITHM",
            "FRONTENDS",
            "BACKENDS",
            "AFFINITY",
            "POLICY EXT/INT",
            "NOT ENFORCED",
            "FLOWS",
            "PACKETS",
            "BYTES",
        ],
        rows,
    )
}

pub fn execute(args: Args) -> Result<()> {
    let maps = ServiceMaps::open(&args.pins.bpffs)?;
    let state = maps.read()?;
    let views = view(&state, |id| maps.service_stats(id));
    match render::structured(args.output, &views)? {
        Some(s) => print!("{s}"),
        None => print!("{}", table(&views)),
    }
    Ok(())
}

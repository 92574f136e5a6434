//! `lbctl backends NS/NAME[:PORT]`: one Service's backends as the datapath
//! has them, with their state, node and counters.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use lb_common::conntrack::CT_ORIGINAL;
use serde::Serialize;

use super::{
    PinArgs, render,
    services::{self, BackendView, ServiceView},
};
use crate::{agent::apply::MapWriter, datapath::maps::ServiceMaps};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Service: `namespace/name`, or `namespace/name:port` for one
    /// of its ports (port name or number).
    pub service: String,
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// One Service port and its backends. Field names are part of the
/// JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceBackendsView {
    pub service: String,
    pub port_name: String,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendStatsView {
    #[serde(flatten)]
    pub backend: BackendView,
    /// Flows given this backend since it was programmed (device-path flows
    /// and translated sockets), and the device path's packets and bytes.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Device-path flows to it in the connection-tracking table now.
    pub conntrack_flows: u64,
}

/// `namespace/name[:port]` split into its parts.
pub fn parse_selector(s: &str) -> Result<(String, String, Option<String>)> {
    let Some((ns, rest)) = s.split_once('/') else {
        bail!("{s:?}: give the Service as namespace/name or namespace/name:port");
    };
    let (name, port) = match rest.split_once(':') {
        Some((n, p)) => (n, Some(p.to_string())),
        None => (rest, None),
    };
    if ns.is_empty() || name.is_empty() {
        bail!("{s:?}: give the Service as namespace/name or namespace/name:port");
    }
    Ok((ns.into(), name.into(), port))
}

/// The selected Service's ports with per-backend counters.
pub fn view(
    services: &[ServiceView],
    selector: &str,
    stats: impl Fn(u32) -> lb_common::counters::BackendStats,
    conntrack: &BTreeMap<u32, u64>,
    port_numbers: &BTreeMap<u32, u16>,
) -> Result<Vec<ServiceBackendsView>> {
    let (ns, name, port) = parse_selector(selector)?;
    let mut out = Vec::new();
    for s in services
        .iter()
        .filter(|s| s.namespace == ns && s.name == name)
    {
        let number = port_numbers.get(&s.id).copied().unwrap_or_default();
        if let Some(p) = &port
            && *p != s.port_name
            && *p != number.to_string()
        {
            continue;
        }
        out.push(ServiceBackendsView {
            service: format!("{}/{}", s.namespace, s.name),
            port_name: s.port_name.clone(),
            port: number,
            protocol: s.protocol.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| {
                    let st = stats(b.id);
                    BackendStatsView {
                        backend: b.clone(),
                        flows: st.flows,
                        packets: st.packets,
                        bytes: st.bytes,
                        conntrack_flows: conntrack.get(&b.id).copied().unwrap_or(0),
                    }
                })
                .collect(),
        });
    }
    if out.is_empty() {
        let known: Vec<String> = services
            .iter()
            .filter(|s| s.namespace == ns && s.name == name)
            .map(|s| s.port_name.clone())
            .collect();
        if known.is_empty() {
            bail!("no Service {ns}/{name} in the datapath (see lbctl services)");
        }
        bail!(
            "Service {ns}/{name} has no port {:?} in the datapath (ports: {})",
            port.unwrap_or_default(),
            known.join(", ")
        );
    }
    Ok(out)
}

fn conditions(b: &BackendView) -> String {
    let mut c = Vec::new();
    if b.ready {
        c.push("ready");
    }
    if b.serving {
        c.push("serving");
    }
    if b.terminating {
        c.push("terminating");
    }
    if c.is_empty() {
        "-".into()
    } else {
        c.join(",")
    }
}

pub fn table(views: &[ServiceBackendsView]) -> String {
    let mut out = String::new();
    for (i, v) in views.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let port = if v.port_name.is_empty() {
            format!("{}/{}", v.port, v.protocol)
        } else {
            format!("{} {}/{}", v.port_name, v.port, v.protocol)
        };
        out += &format!("{} port {port}\n", v.service);
        let rows = v
            .backends
            .iter()
            .map(|b| {
                let be = &b.backend;
                vec![
                    be.id.to_string(),
                    format!("{}:{}", be.address, be.port),
                    be.state.clone(),
                    conditions(be),
                    match be.maglev_slots {
                        // Its share of the Maglev table: what its weight
                        // gives it.
                        Some(n) if n > 0 => format!("{} ({n} slots)", be.new_flows),
                        _ => be.new_flows.clone(),
                    },
                    if be.node.is_empty() {
                        "-".into()
                    } else if be.local {
                        format!("{} (local)", be.node)
                    } else {
                        be.node.clone()
                    },
                    if be.zone.is_empty() {
                        "-".into()
                    } else {
                        be.zone.clone()
                    },
                    b.flows.to_string(),
                    b.conntrack_flows.to_string(),
                    b.packets.to_string(),
                    b.bytes.to_string(),
                ]
            })
            .collect();
        out += &render::table(
            &[
                "ID",
                "BACKEND",
                "STATE",
                "CONDITIONS",
                "NEW FLOWS",
                "NODE",
                "ZONE",
                "FLOWS",
                "CT FLOWS",
                "PACKETS",
                "BYTES",
            ],
            rows,
        );
    }
    out
}

pub fn execute(args: Args) -> Result<()> {
    let maps = ServiceMaps::open(&args.pins.bpffs)?;
    let state = maps.read()?;
    let services = services::view(&state, |id| maps.service_stats(id));
    let mut conntrack: BTreeMap<u32, u64> = BTreeMap::new();
    for (k, e) in maps.conntrack.entries().context("reading the flow table")? {
        if k.dir == CT_ORIGINAL {
            *conntrack.entry(e.backend_id).or_default() += 1;
        }
    }
    let port_numbers = state
        .service_meta
        .iter()
        .map(|(id, m)| (*id, m.port))
        .collect();
    let views = view(
        &services,
        &args.service,
        |id| maps.backend_stats(id),
        &conntrack,
        &port_numbers,
    )?;
    match render::structured(args.output, &views)? {
        Some(s) => print!("{s}"),
        None => print!("{}", table(&views)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(
            parse_selector("demo/web:http").unwrap(),
            ("demo".into(), "web".into(), Some("http".into()))
        );
        assert_eq!(
            parse_selector("demo/web").unwrap(),
            ("demo".into(), "web".into(), None)
        );
        for bad in ["web", "/web", "demo/"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_service_or_port_is_named() {
        let e = view(
            &[],
            "demo/web",
            |_| Default::default(),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no Service demo/web"), "{e}");
    }
}

//! `lbctl conntrack`: the device path's flows, both directions, with the
//! translation each applies, age and state; filterable; `--count` only
//! counts.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use lb_common::{
    conntrack::{
        CT_CLOSING, CT_DSR, CT_FIN_ORIGINAL, CT_FIN_REPLY, CT_LOCAL_BACKEND, CT_NO_ID, CT_ORIGINAL,
        CT_SEEN_REPLY, CT_SNAT,
    },
    ip4_octets, port_host,
};
use serde::Serialize;

use super::{PinArgs, render};
use crate::{
    agent::{model::Proto, state::cstr},
    datapath::maps::ServiceMaps,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Only flows of this Service (`namespace/name`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only flows with this client address.
    #[arg(long)]
    pub client: Option<Ipv4Addr>,
    /// Only flows to this backend address.
    #[arg(long)]
    pub backend: Option<Ipv4Addr>,
    /// Print only the number of matching entries.
    #[arg(long)]
    pub count: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// One entry. Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowView {
    /// `original` (client to frontend) or `reply` (backend to client/node).
    pub direction: String,
    pub protocol: String,
    /// The tuple a packet carries.
    pub src: String,
    pub dst: String,
    /// What it is rewritten to.
    pub nat_src: String,
    pub nat_dst: String,
    pub service: String,
    pub backend_id: u32,
    /// `syn`, `established`, `half-closed` (a FIN in one direction),
    /// `closing`; `udp` for UDP.
    pub state: String,
    pub snat: bool,
    pub local_backend: bool,
    /// Direct server return: an original entry sends the client's packets
    /// in IPIP to the backend's node (the replies do not come back here);
    /// a reply entry, on the backend's node, gives the backend's replies
    /// the frontend's address.
    pub dsr: bool,
    pub age_s: u32,
    pub idle_s: u32,
    pub expires_in_s: i64,
    pub packets: u64,
    pub bytes: u64,
}

pub fn now_s() -> u32 {
    // The datapath stamps entries with CLOCK_MONOTONIC_COARSE seconds.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

fn ep(addr: u32, port: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(ip4_octets(addr)), port_host(port))
}

pub fn view(maps: &ServiceMaps) -> Result<Vec<FlowView>> {
    let now = now_s();
    let names: std::collections::BTreeMap<u32, String> = maps
        .service_meta
        .iter()
        .filter_map(Result::ok)
        .map(|(id, m)| (id, format!("{}/{}", cstr(&m.namespace), cstr(&m.name))))
        .collect();
    let mut out: Vec<FlowView> = maps
        .conntrack
        .entries()
        .context("reading the flow table")?
        .into_iter()
        .filter(|(_, e)| now.wrapping_sub(e.last_seen_s) <= e.lifetime_s)
        .map(|(k, e)| {
            let proto = Proto::from_number(k.proto);
            let state = if proto == Some(Proto::Udp) {
                "udp"
            } else if e.flags & CT_CLOSING != 0 {
                "closing"
            } else if e.flags & (CT_FIN_ORIGINAL | CT_FIN_REPLY) != 0 {
                "half-closed"
            } else if e.flags & CT_SEEN_REPLY != 0 {
                "established"
            } else {
                "syn"
            };
            FlowView {
                direction: if k.dir == CT_ORIGINAL {
                    "original"
                } else {
                    "reply"
                }
                .into(),
                protocol: proto.map_or_else(|| k.proto.to_string(), |p| p.to_string()),
                src: ep(k.src_addr, k.src_port),
                dst: ep(k.dst_addr, k.dst_port),
                // A DSR flow's original entry holds the outer source (this
                // node) there; the packet's own source stays the client.
                nat_src: if e.flags & (CT_DSR | CT_LOCAL_BACKEND) == CT_DSR {
                    ep(k.src_addr, e.nat_src_port)
                } else {
                    ep(e.nat_src_addr, e.nat_src_port)
                },
                nat_dst: ep(e.nat_dst_addr, e.nat_dst_port),
                // A DSR reply entry whose frontend is another node's
                // NodePort names no Service of this node.
                service: if e.service_id == CT_NO_ID {
                    "-".into()
                } else {
                    names
                        .get(&e.service_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", e.service_id))
                },
                backend_id: e.backend_id,
                state: state.into(),
                snat: e.flags & CT_SNAT != 0,
                local_backend: e.flags & CT_LOCAL_BACKEND != 0,
                dsr: e.flags & CT_DSR != 0,
                age_s: now.wrapping_sub(e.created_s),
                idle_s: now.wrapping_sub(e.last_seen_s),
                expires_in_s: e.last_seen_s as i64 + e.lifetime_s as i64 - now as i64,
                packets: e.packets,
                bytes: e.bytes,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.direction, &a.src).cmp(&(&b.service, &b.direction, &b.src)));
    Ok(out)
}

/// The client of a flow: the source of an original entry, the destination
/// a reply is translated back to.
fn client(f: &FlowView) -> &str {
    if f.direction == "original" {
        &f.src
    } else {
        &f.nat_dst
    }
}

/// The backend of a flow: where an original entry sends, where a reply
/// comes from.
fn backend(f: &FlowView) -> &str {
    if f.direction == "original" {
        &f.nat_dst
    } else {
        &f.src
    }
}

pub fn filter(flows: Vec<FlowView>, args: &Args) -> Vec<FlowView> {
    let host = |s: &str| {
        s.rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_default()
    };
    flows
        .into_iter()
        .filter(|f| args.service.as_ref().is_none_or(|s| &f.service == s))
        .filter(|f| args.client.is_none_or(|c| host(client(f)) == c.to_string()))
        .filter(|f| {
            args.backend
                .is_none_or(|b| host(backend(f)) == b.to_string())
        })
        .collect()
}

pub fn table(flows: &[FlowView]) -> String {
    render::table(
        &[
            "SERVICE", "DIR", "PROTO", "SRC", "DST", "NAT SRC", "NAT DST", "STATE", "AGE", "IDLE",
            "PACKETS",
        ],
        flows
            .iter()
            .map(|f| {
                vec![
                    f.service.clone(),
                    if f.dsr {
                        format!("{}/dsr", f.direction)
                    } else {
                        f.direction.clone()
                    },
                    f.protocol.clone(),
                    f.src.clone(),
                    f.dst.clone(),
                    f.nat_src.clone(),
                    f.nat_dst.clone(),
                    f.state.clone(),
                    format!("{}s", f.age_s),
                    format!("{}s", f.idle_s),
                    f.packets.to_string(),
                ]
            })
            .collect(),
    )
}

pub fn execute(args: Args) -> Result<()> {
    let maps = ServiceMaps::open(&args.pins.bpffs)?;
    let flows = filter(view(&maps)?, &args);
    if args.count {
        match args.output {
            render::Output::Table => println!("{}", flows.len()),
            o => print!(
                "{}",
                render::structured(o, &serde_json::json!({ "count": flows.len() }))?
                    .unwrap_or_default()
            ),
        }
        return Ok(());
    }
    match render::structured(args.output, &flows)? {
        Some(s) => print!("{s}"),
        None => print!("{}", table(&flows)),
    }
    Ok(())
}

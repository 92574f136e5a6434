//! `lbctl status`: what is attached where (from the pinned links) and how
//! many entries each map holds.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{PinArgs, render};
use lb_common::status::{AGENT_PENDING, AGENT_READY, AGENT_SOURCE_API, AgentStatus};

use crate::{
    agent::{apply::MapWriter, state::cstr},
    datapath::{attach, maps::ServiceMaps},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusView {
    pub bpffs: String,
    pub layout_version: u32,
    /// The agent's own record; absent when no agent has written one.
    pub agent: Option<AgentView>,
    /// The settings the agent wrote for the datapath.
    pub datapath: DatapathView,
    pub attachments: Vec<AttachmentView>,
    pub maps: Vec<MapView>,
}

/// The agent's sync status, from its pinned record (`LB_AGENT_V1`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentView {
    pub pid: u32,
    /// Whether that pid is a live process here (false once the agent
    /// exited: the datapath keeps forwarding, nobody follows the source).
    pub running: bool,
    pub version: String,
    pub node: String,
    /// `api` or `manifests`, and the API server URL or the folder.
    pub source: String,
    pub source_location: String,
    pub cgroup: String,
    /// The first full sync is in the maps.
    pub ready: bool,
    /// Changes are waiting for the maps.
    pub pending: bool,
    pub started_unix_s: u64,
    /// Seconds since the last write pass and since the maps were last
    /// confirmed to hold what the source says (null: never).
    pub last_sync_age_s: Option<u64>,
    pub last_check_age_s: Option<u64>,
    pub syncs: u64,
    pub writes: u64,
    pub service_ports: u32,
    pub errors: u64,
    pub last_error: String,
    pub last_error_age_s: Option<u64>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The view of a record; `None` for an all-zero one (no agent wrote it).
pub fn agent_view(r: &AgentStatus, now: u64, running: bool) -> Option<AgentView> {
    if r.started_unix_s == 0 {
        return None;
    }
    let age = |t: u64| (t != 0).then(|| now.saturating_sub(t));
    Some(AgentView {
        pid: r.pid,
        running,
        version: cstr(&r.version).into(),
        node: cstr(&r.node_name).into(),
        source: if r.flags & AGENT_SOURCE_API != 0 {
            "api"
        } else {
            "manifests"
        }
        .into(),
        source_location: cstr(&r.source).into(),
        cgroup: cstr(&r.cgroup).into(),
        ready: r.flags & AGENT_READY != 0,
        pending: r.flags & AGENT_PENDING != 0,
        started_unix_s: r.started_unix_s,
        last_sync_age_s: age(r.last_sync_unix_s),
        last_check_age_s: age(r.last_check_unix_s),
        syncs: r.syncs,
        writes: r.writes,
        service_ports: r.service_ports,
        errors: r.errors,
        last_error: cstr(&r.last_error).into(),
        last_error_age_s: age(r.last_error_unix_s),
    })
}

/// Entries of a pinned map of any layout (0 when it cannot be opened).
fn count_keys(pin: &std::path::Path) -> usize {
    aya::maps::MapData::from_pin(pin)
        .ok()
        .and_then(|m| aya::maps::HashMap::<_, lb_common::conntrack::Frag4Key, lb_common::conntrack::Frag4Ports>::try_from(aya::maps::Map::LruHashMap(m)).ok())
        .map_or(0, |m| m.keys().filter_map(Result::ok).count())
}

fn pid_running(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

fn ago(s: Option<u64>) -> String {
    s.map_or("never".into(), |s| format!("{s}s ago"))
}

/// The agent part of the table: one line per fact.
pub fn agent_table(a: Option<&AgentView>) -> String {
    let Some(a) = a else {
        return "agent: no record (no agent has run with this --bpffs since the maps were made)\n"
            .into();
    };
    let state = match (a.running, a.ready, a.pending) {
        (false, ..) => {
            "not running: the datapath forwards as programmed, nobody follows the source"
        }
        (true, false, _) => "starting: first sync not done",
        (true, true, true) => "running, changes waiting for the maps",
        (true, true, false) => "running, in sync",
    };
    let mut rows = vec![
        vec!["agent".into(), format!("pid {} ({state})", a.pid)],
        vec!["version".into(), a.version.clone()],
        vec!["node".into(), a.node.clone()],
        vec![
            "source".into(),
            format!("{} {}", a.source, a.source_location),
        ],
        vec!["cgroup".into(), a.cgroup.clone()],
        vec![
            "last sync".into(),
            format!(
                "{} ({} passes, {} map writes, {} service ports)",
                ago(a.last_sync_age_s),
                a.syncs,
                a.writes,
                a.service_ports
            ),
        ],
        vec!["last checked".into(), ago(a.last_check_age_s)],
        vec!["errors".into(), a.errors.to_string()],
    ];
    if !a.last_error.is_empty() {
        rows.push(vec![
            "last error".into(),
            format!("{} ({})", a.last_error, ago(a.last_error_age_s)),
        ]);
    }
    render::pairs(rows)
}

/// `LB_CONFIG_V2`: what the programs read besides the Services.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DatapathView {
    /// Source address of flows SNATed to another node's backend when the
    /// frontend is not a node address (empty: the frontend address).
    pub snat_address: String,
    /// `FIRST-LAST` (`--snat-port-range`).
    pub snat_ports: String,
    /// CIDRs whose addresses no Service has are dropped.
    pub service_cidrs: Vec<String>,
    /// Flood protection: new flows a second per CPU taken into conntrack
    /// (`--new-flow-rate`; 0: no limit) and the burst.
    pub new_flow_rate: u32,
    pub new_flow_burst: u32,
    /// Ports in the port map (frontends' and SNAT ranges'), when it is in
    /// force: the device path passes packets to other ports at once.
    /// Absent while it is not (no agent has written it whole yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_map_ports: Option<u32>,
    /// The node's addresses the device path knows without a lookup
    /// (`LB4_NODE_ADDRS_V1`); empty: every address is looked up.
    pub node_addresses: Vec<String>,
}

/// `ports`: the port map's words; `node`: the node's own addresses.
pub fn datapath_view(
    c: &lb_common::config::Config,
    ports: &std::collections::BTreeMap<u32, u64>,
    node: &lb_common::config::NodeAddrs4,
) -> DatapathView {
    DatapathView {
        node_addresses: node
            .list()
            .map(|a| std::net::Ipv4Addr::from(lb_common::ip4_octets(a)).to_string())
            .collect(),
        port_map_ports: (c.flags & lb_common::config::CFG_PORTS != 0)
            .then(|| ports.values().map(|w| w.count_ones()).sum()),
        snat_address: match c.snat_addr {
            0 => String::new(),
            a => std::net::Ipv4Addr::from(lb_common::ip4_octets(a)).to_string(),
        },
        snat_ports: format!("{}-{}", c.snat_port_min, c.snat_port_max),
        service_cidrs: c
            .service_cidr_list()
            .map(|(a, l)| format!("{}/{l}", std::net::Ipv4Addr::from_bits(a)))
            .collect(),
        new_flow_rate: c.flow_rate().0,
        new_flow_burst: c.flow_rate().1,
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttachmentView {
    pub program: String,
    /// The device for tc and XDP hooks; empty for the cgroup hooks.
    pub device: String,
    /// For the XDP program: `native` or `generic`, as the device reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    pub link_id: u32,
    pub program_id: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MapView {
    pub map: String,
    pub entries: usize,
    /// How many entries the map holds at most, as the kernel has it (0
    /// when it cannot be read).
    pub max_entries: u32,
}

/// The XDP mode of each of `devices` as the kernel reports it, asked in
/// the agent's network namespace (its devices' names are that namespace's)
/// when its process `agent_pid` is there to enter, else in this one.
fn xdp_modes(devices: &[String], agent_pid: Option<u32>) -> Vec<String> {
    let ask = |devices: &[String]| -> Vec<String> {
        devices
            .iter()
            .map(|d| {
                let Ok(name) = std::ffi::CString::new(d.as_str()) else {
                    return "unknown".into();
                };
                // SAFETY: NUL-terminated name.
                let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                if index == 0 {
                    return "device not found".into();
                }
                crate::datapath::xdp_mode::attached(index)
                    .map_or_else(|e| format!("unknown ({e})"), |m| m.name().into())
            })
            .collect()
    };
    let ns = agent_pid.and_then(|p| std::fs::File::open(format!("/proc/{p}/ns/net")).ok());
    let Some(ns) = ns else {
        return ask(devices);
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return devices.iter().map(|_| "unknown (setns)".into()).collect();
            }
            ask(devices)
        })
        .join()
        .unwrap_or_default()
    })
}

pub fn execute(args: Args) -> Result<()> {
    let pins = &args.pins.bpffs;
    let maps = ServiceMaps::open(pins)?;
    let mut attachments = Vec::new();
    for (file, program, device) in attach::pinned(pins) {
        let path = crate::datapath::pins::links_dir(pins).join(&file);
        // A link the agent removes meanwhile (a device no longer matched)
        // is no longer attached: left out, not an error.
        if !path.exists() {
            continue;
        }
        let link: aya::programs::links::FdLink =
            match aya::programs::links::PinnedLink::from_pin(&path) {
                Ok(l) => l.into(),
                Err(_) if !path.exists() => continue,
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            };
        let info = link
            .info()
            .with_context(|| format!("reading {}", path.display()))?;
        attachments.push(AttachmentView {
            program,
            xdp_mode: None,
            device: device.unwrap_or_default(),
            link_id: info.id(),
            program_id: info.program_id(),
        });
    }
    let st = maps.read()?;
    let ct = maps
        .conntrack
        .entries()
        .context("reading the flow table")?
        .len();
    let record = maps.agent_status().ok();
    let agent = record
        .as_ref()
        .and_then(|r| agent_view(r, now_unix(), pid_running(r.pid)));
    let xdp: Vec<usize> = (0..attachments.len())
        .filter(|&i| attachments[i].program == attach::XDP_FROM_NETDEV)
        .collect();
    let devices: Vec<String> = xdp.iter().map(|&i| attachments[i].device.clone()).collect();
    let running = record.filter(|r| pid_running(r.pid)).map(|r| r.pid);
    for (i, mode) in xdp.into_iter().zip(xdp_modes(&devices, running)) {
        attachments[i].xdp_mode = Some(mode);
    }
    let view = StatusView {
        bpffs: pins.display().to_string(),
        layout_version: lb_common::LAYOUT_VERSION,
        agent,
        datapath: datapath_view(
            &maps.config().unwrap_or_default(),
            &st.ports,
            &maps.node_addrs().unwrap_or_default(),
        ),
        attachments,
        maps: [
            (lb_common::maps::ADDRS4, st.addrs.len()),
            (lb_common::maps::FRONTENDS4, st.frontends.len()),
            (lb_common::maps::BACKEND_SLOTS, st.slots.len()),
            (lb_common::maps::SERVICE_BACKENDS, st.svc_backends.len()),
            (lb_common::maps::SOURCE_RANGES4, st.source_ranges.len()),
            (lb_common::maps::BACKENDS4, st.backends.len()),
            (lb_common::maps::SERVICE_META, st.service_meta.len()),
            (lb_common::maps::NAMES, st.names.len()),
            (lb_common::maps::CONNTRACK4, ct),
            (
                lb_common::maps::FRAGS4,
                count_keys(&pins.join(lb_common::maps::FRAGS4)),
            ),
            (
                lb_common::maps::AFFINITY4,
                maps.affinity.keys().filter_map(Result::ok).count(),
            ),
            (
                lb_common::maps::BACKEND_STATS,
                maps.backend_stats.keys().filter_map(Result::ok).count(),
            ),
        ]
        .into_iter()
        .map(|(m, n)| MapView {
            map: m.into(),
            entries: n,
            max_entries: aya::maps::MapInfo::from_pin(pins.join(m)).map_or(0, |i| {
                if m == lb_common::maps::CONNTRACK4 {
                    // Sets of flows after the table's head.
                    return lb_common::conntrack::ct_sets(i.max_entries())
                        .saturating_mul(lb_common::conntrack::CT_WAYS as u32);
                }
                // The backends array's index 0 is "no backend": it holds
                // one entry fewer than its size.
                let unused = u32::from(m == lb_common::maps::BACKENDS4);
                i.max_entries().saturating_sub(unused)
            }),
        })
        .collect(),
    };
    match render::structured(args.output, &view)? {
        Some(s) => print!("{s}"),
        None => {
            print!("{}", agent_table(view.agent.as_ref()));
            let d = &view.datapath;
            print!(
                "{}",
                render::pairs(vec![
                    vec![
                        "snat".into(),
                        format!(
                            "{} ports {}",
                            if d.snat_address.is_empty() {
                                "frontend address"
                            } else {
                                &d.snat_address
                            },
                            d.snat_ports
                        ),
                    ],
                    vec![
                        "service CIDRs".into(),
                        if d.service_cidrs.is_empty() {
                            "none (no unallocated-address drop)".into()
                        } else {
                            format!(
                                "{} (unallocated addresses dropped)",
                                d.service_cidrs.join(", ")
                            )
                        },
                    ],
                    vec![
                        "new flows".into(),
                        if d.new_flow_rate == 0 {
                            "no limit (--new-flow-rate 0)".into()
                        } else {
                            format!(
                                "{} a second per CPU, {} at once (flood protection)",
                                d.new_flow_rate, d.new_flow_burst
                            )
                        },
                    ],
                    vec![
                        "port map".into(),
                        match d.port_map_ports {
                            Some(n) => format!(
                                "{n} ports of frontends and SNAT ranges (other ports pass at once)"
                            ),
                            None => "not in force (every packet looked up)".into(),
                        },
                    ],
                    vec![
                        "node addresses".into(),
                        if d.node_addresses.is_empty() {
                            "none written (every address looked up)".into()
                        } else {
                            format!("{} (known without a lookup)", d.node_addresses.join(", "))
                        },
                    ],
                ])
            );
            println!();
            let rows = view
                .attachments
                .iter()
                .map(|a| {
                    let at = if a.device.is_empty() {
                        // The agent's record names the cgroup.
                        view.agent
                            .as_ref()
                            .map_or("cgroup".into(), |g| format!("cgroup {}", g.cgroup))
                    } else if let Some(m) = &a.xdp_mode {
                        format!("{} (XDP {m})", a.device)
                    } else {
                        a.device.clone()
                    };
                    vec![
                        a.program.clone(),
                        at,
                        a.link_id.to_string(),
                        a.program_id.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render::table(&["PROGRAM", "ATTACHED TO", "LINK", "PROGRAM ID"], rows)
            );
            println!();
            let rows = view
                .maps
                .iter()
                .map(|m| {
                    vec![
                        m.map.clone(),
                        m.entries.to_string(),
                        m.max_entries.to_string(),
                    ]
                })
                .collect();
            print!("{}", render::table(&["MAP", "ENTRIES", "MAX"], rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::fixed;

    #[test]
    fn agent_record_to_view_and_table() {
        assert_eq!(agent_view(&AgentStatus::default(), 1000, false), None);
        let r = AgentStatus {
            pid: 4242,
            flags: AGENT_READY,
            started_unix_s: 900,
            last_sync_unix_s: 990,
            last_check_unix_s: 999,
            syncs: 3,
            writes: 42,
            errors: 1,
            last_error_unix_s: 950,
            service_ports: 2,
            version: fixed("0.1.0"),
            node_name: fixed("node-a"),
            source: fixed("/etc/lb/manifests"),
            cgroup: fixed("/sys/fs/cgroup"),
            last_error: fixed("skipped: e2e/bad: unknown protocol FOO"),
            ..Default::default()
        };
        let v = agent_view(&r, 1000, true).unwrap();
        assert_eq!(v.last_sync_age_s, Some(10));
        assert_eq!(v.source, "manifests");
        let t = agent_table(Some(&v));
        let want = concat!(
            " agent         pid 4242 (running, in sync)\n",
            " version       0.1.0\n",
            " node          node-a\n",
            " source        manifests /etc/lb/manifests\n",
            " cgroup        /sys/fs/cgroup\n",
            " last sync     10s ago (3 passes, 42 map writes, 2 service ports)\n",
            " last checked  1s ago\n",
            " errors        1\n",
            " last error    skipped: e2e/bad: unknown protocol FOO (50s ago)\n",
        );
        assert_eq!(t, want, "\n{t}");
        let stopped = agent_table(agent_view(&r, 1000, false).as_ref());
        assert!(stopped.contains("not running"), "{stopped}");
    }
}

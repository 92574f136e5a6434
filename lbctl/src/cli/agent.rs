//! `lbctl agent`.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use super::PinArgs;
use crate::agent::{
    allocate::Allocator,
    nf_conntrack::{Settings as NfSettings, parse_duration},
    run::{self, AgentConfig, SourceConfig},
    service_cidrs::ServiceCidrs,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Folder of Kubernetes manifests (Services, EndpointSlices, Endpoints,
    /// Nodes; YAML or JSON, multi-document), watched for changes. Without
    /// it, the agent watches the Kubernetes API.
    #[arg(long, env = "LBCTL_MANIFESTS", conflicts_with_all = ["kubeconfig", "watch_endpoints"])]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API source (default: $KUBECONFIG, ~/.kube/config,
    /// then the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Also watch v1/Endpoints, for Services that have hand-written
    /// Endpoints and no EndpointSlice (clusters or tools without the
    /// EndpointSlice mirroring controller).
    #[arg(long)]
    pub watch_endpoints: bool,
    /// Forward the datapath's own log records (aya-log, debug level) to
    /// the agent's log. Off: the log calls are removed from the programs
    /// when they load, so they cost nothing.
    #[arg(long)]
    pub datapath_logs: bool,
    /// This node's name (EndpointSlice nodeName for locality, Node object).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Address NodePorts answer on (repeat for several); default: the Node
    /// object's InternalIP/ExternalIP addresses.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<Ipv4Addr>,
    /// Source address for SNAT to backends on other nodes (default: first
    /// node address).
    #[arg(long)]
    pub snat_ip: Option<Ipv4Addr>,
    /// External device name patterns for the per-packet path (`*`, `?`),
    /// comma-separated; attached as they appear.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// XDP in front of tc on those devices: `auto` native where the
    /// driver has it, generic on hardware whose driver has not, tc alone
    /// elsewhere (veth and other virtual devices: see the README);
    /// `native` or `generic` on every device or an error; `off` tc alone.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp: crate::datapath::attach::XdpChoice,
    /// cgroup (v2) whose processes get socket-level load balancing
    /// (default: the cgroup v2 root, found from /proc/self/mountinfo).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// How often the manifest folder is checked (and, with the API source,
    /// how often devices are looked for and failed writes retried).
    #[arg(long, default_value = "200")]
    pub poll_ms: u64,
    /// Listener for /healthz, /livez and /readyz ("" to disable).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Listener for /metrics ("" to disable).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// /healthz fails once a change has waited this many seconds for the
    /// maps.
    #[arg(long, default_value = "60")]
    pub healthz_timeout_s: u64,
    /// The service CIDRs (comma-separated): traffic to an address of one
    /// of them that no Service has is dropped, as kube-proxy's nftables
    /// mode drops it. Not given, the API's ServiceCIDR objects say (the
    /// API server keeps one from its `--service-cluster-ip-range`). With a
    /// manifest folder, Services written without `clusterIP` get one from
    /// the first, as the API server would give them. Default with a
    /// manifest folder: 10.96.0.0/12.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<String>,
    /// Which addresses NodePorts answer on: CIDRs and the keywords
    /// `primary` (the node's addresses), `all` (every address of this
    /// machine) and `localhost` (127.0.0.1, for the node's processes), as
    /// kube-proxy's flag. Default: primary, or every address of this
    /// machine when the node has none (a manifest folder without a Node).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// With a manifest folder, NodePort and LoadBalancer ports written
    /// without `nodePort` get one from this range (FIRST-LAST).
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// Size of the Service maps: entries for frontends, addresses,
    /// Service ports and backends each, twice that for backend slots and
    /// (Service port, backend) pairs (Cilium's `bpf-lb-map-max`). Hashes
    /// without preallocation: an idle map costs 16 bytes per entry of its
    /// size (rounded up to a power of two). A restart with another size
    /// migrates the pinned maps, entries included.
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_LB_MAP_MAX)]
    pub lb_map_max: u32,
    /// How new flows pick a Service's backend unless its
    /// `lbctl.dev/lb-algorithm` annotation says: `hash` (a slot per
    /// backend, as kube-proxy spreads them) or `maglev` (a Maglev table
    /// per Service port: every node picks the same backend for a flow,
    /// and a backend leaving moves few others' flows).
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Hash)]
    pub lb_algorithm: LbAlgorithm,
    /// Slots of a Maglev table, a prime up to 65521 (Cilium's
    /// `bpf-lb-maglev-table-size`; at least 100 times a Service's backends
    /// keeps their shares within 1%). A table takes 8 bytes a slot.
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_MAGLEV_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// How a flow from outside (NodePort, LoadBalancer IP, external IP)
    /// reaches a backend on another node unless the Service's
    /// `lbctl.dev/lb-mode` annotation says: `snat` (the node's address as
    /// source; replies come back through it, as with kube-proxy), `dsr`
    /// (direct server return: in IPIP to the backend's node, which sends
    /// the replies straight to the client) or `hybrid` (DSR for TCP, SNAT
    /// for UDP). DSR needs every node's agent on the device that receives
    /// node-to-node traffic, and a network that lets a node send with a
    /// Service address as source.
    #[arg(long, value_enum, default_value_t = LbModeArg::Snat)]
    pub lb_mode: LbModeArg,
    /// Maglev tables the slots map has room for beyond `--lb-map-max`:
    /// one per Service port using Maglev, two for one with
    /// externalTrafficPolicy Local (its Local and Cluster lists), one
    /// more for each table being replaced. An idle slot costs 16 bytes
    /// (the hash's buckets).
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_MAGLEV_MAP_MAX)]
    pub maglev_map_max: u32,
    /// Entries of the device path's connection-tracking table (two per
    /// flow from outside; sets of four, a full set giving up an expired,
    /// then a never-answered, then its oldest flow; preallocated, 80 bytes
    /// an entry). Default: 0.05% of the node's memory in
    /// entries, a power of two from 65,536 (below 32 GiB) to 4,194,304
    /// (`lbctl status` shows it). A restart with another size migrates
    /// the pinned table, flows included.
    #[arg(long)]
    pub conntrack_max: Option<u32>,
    /// Entries of the session affinity table (one per client and Service
    /// port; least recently used evicted first). Migrated as above.
    #[arg(long)]
    pub affinity_max: Option<u32>,
    /// Source ports (FIRST-LAST) for flows from outside SNATed to a
    /// backend on another node. Where they overlap this node's ephemeral
    /// ports (ip_local_port_range) they are added to
    /// ip_local_reserved_ports, so no socket of the node gets one.
    #[arg(long, default_value = "61000-65535")]
    pub snat_port_range: String,
    /// Flood protection: new flows from outside each CPU takes into the
    /// device path's conntrack table a second (0: no limit, the default).
    /// Past it a flow to a Maglev frontend under DSR goes on without an
    /// entry (the table keeps it on its backend), any other new flow is
    /// dropped (its client sends the SYN again), so a SYN flood cannot
    /// push established flows out of the table. Counted
    /// `forward_untracked` and `drop_flood`.
    #[arg(long, default_value_t = 0)]
    pub new_flow_rate: u32,
    /// How many new flows a CPU may take at once above the rate.
    #[arg(long, default_value_t = 1000)]
    pub new_flow_burst: u32,
    /// The node's netfilter conntrack table (`nf_conntrack_max`), as
    /// kube-proxy sizes it: this many entries per CPU, at least
    /// `--conntrack-min` (0: leave the kernel's). Written only from the
    /// host's network namespace (the kernel allows no other). This is
    /// netfilter's table, for the node's traffic that no Service
    /// translates; `--conntrack-max` sizes the datapath's own.
    #[arg(long, default_value_t = 32768)]
    pub conntrack_max_per_core: u32,
    /// The least `nf_conntrack_max` set from `--conntrack-max-per-core`.
    #[arg(long, default_value_t = 131072)]
    pub conntrack_min: u32,
    /// Netfilter's timeout for established TCP flows of the node (`0`:
    /// leave the kernel's), as kube-proxy's flag; Go durations (`24h`,
    /// `1h0m0s`).
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Netfilter's timeout for TCP flows in CLOSE_WAIT (`0`: leave), as
    /// kube-proxy's flag.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Turn on `nf_conntrack_tcp_be_liberal` (out-of-window packets are
    /// not marked INVALID), as kube-proxy's flag.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub conntrack_tcp_be_liberal: bool,
    /// Netfilter's timeout for UDP flows seen one way (`0`: leave).
    #[arg(long, default_value = "0", value_parser = duration)]
    pub conntrack_udp_timeout: Duration,
    /// Netfilter's timeout for UDP flows seen both ways (`0`: leave).
    #[arg(long, default_value = "0", value_parser = duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// Remove every attachment and pinned map, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

pub async fn execute(args: Args) -> Result<()> {
    if args.cleanup {
        return run::cleanup(&args.pins.bpffs);
    }
    let source = match args.manifests {
        // A folder that is not there yet (a volume still being mounted)
        // is reported and waited for: the agent stays alive, not ready.
        Some(dir) => SourceConfig::Dir(dir),
        None => SourceConfig::Cluster {
            kubeconfig: args.kubeconfig,
            watch_endpoints: args.watch_endpoints,
        },
    };
    let node_name = match args.node_name {
        Some(n) => n,
        None => hostname()?,
    };
    let mut given = Vec::new();
    for c in &args.service_cidr {
        given.extend(
            crate::agent::service_cidrs::parse(c)
                .map_err(|e| anyhow::anyhow!("--service-cidr {e}"))?,
        );
    }
    if given.is_empty() && matches!(source, SourceConfig::Dir(_)) {
        given.push((Ipv4Addr::new(10, 96, 0, 0), 12));
    }
    let allocator = match given.first() {
        Some((a, l)) => Allocator::new(&format!("{a}/{l}"), &args.service_node_port_range)?,
        None => Allocator::new("10.96.0.0/12", &args.service_node_port_range)?,
    };
    let service_cidrs = if args.service_cidr.is_empty() && !matches!(source, SourceConfig::Dir(_)) {
        ServiceCidrs::FromApi
    } else {
        ServiceCidrs::Given(given)
    };
    let nodeport_addresses = crate::agent::nodeport_addrs::parse(&args.nodeport_addresses)
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.lb_map_max >= 16,
        "--lb-map-max {}: at least 16 entries",
        args.lb_map_max
    );
    let maglev_table_size = crate::agent::maglev::check_table_size(args.maglev_table_size)
        .map_err(|e| anyhow::anyhow!("--maglev-table-size: {e}"))?;
    let maglev_chunks = lb_common::maps::maglev_chunks(args.maglev_map_max, maglev_table_size);
    let mut map_sizes: std::collections::BTreeMap<String, u32> =
        lb_common::maps::lb_map_entries(args.lb_map_max, maglev_chunks)
            .into_iter()
            .map(|(m, n)| (m.to_string(), n))
            .collect();
    map_sizes.insert(
        lb_common::maps::CONNTRACK4.to_string(),
        conntrack_default(memory_bytes()),
    );
    for (map, n, flag) in [
        (
            lb_common::maps::CONNTRACK4,
            args.conntrack_max,
            "--conntrack-max",
        ),
        (
            lb_common::maps::AFFINITY4,
            args.affinity_max,
            "--affinity-max",
        ),
    ] {
        if let Some(n) = n {
            anyhow::ensure!(n >= 2, "{flag} {n}: at least 2 entries");
            map_sizes.insert(map.to_string(), n);
        }
    }
    // The flow table is sized in flows; its map holds sets of them.
    if let Some(n) = map_sizes.get_mut(lb_common::maps::CONNTRACK4) {
        *n = lb_common::conntrack::ct_table_len(*n);
    }
    let snat_ports = crate::agent::snat_ports::parse(&args.snat_port_range)
        .map_err(|e| anyhow::anyhow!("--snat-port-range {e}"))?;
    run::run(AgentConfig {
        capacity: crate::agent::reconcile::Capacity {
            lb_map_max: args.lb_map_max,
            maglev_chunks,
        },
        balancing: crate::agent::model::Balancing {
            maglev: args.lb_algorithm == LbAlgorithm::Maglev,
            table_size: maglev_table_size,
            mode: match args.lb_mode {
                LbModeArg::Snat => crate::agent::model::LbMode::Snat,
                LbModeArg::Dsr => crate::agent::model::LbMode::Dsr,
                LbModeArg::Hybrid => crate::agent::model::LbMode::Hybrid,
            },
        },
        map_sizes,
        snat_ports,
        new_flow_rate: args.new_flow_rate,
        new_flow_burst: args.new_flow_burst,
        nodeport_addresses,
        service_cidrs,
        source,
        allocator,
        datapath_logs: args.datapath_logs,
        bpffs: args.pins.bpffs,
        node_name,
        node_ips: args.node_ips,
        snat_ip: args.snat_ip,
        devices: args.devices,
        xdp: args.xdp,
        cgroup: args.cgroup,
        poll: Duration::from_millis(args.poll_ms.max(10)),
        healthz_addr: addr(&args.healthz_bind_address)?,
        metrics_addr: addr(&args.metrics_bind_address)?,
        healthz_timeout: Duration::from_secs(args.healthz_timeout_s),
        nf_conntrack: NfSettings {
            max_per_core: args.conntrack_max_per_core,
            min: args.conntrack_min,
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
            tcp_be_liberal: args.conntrack_tcp_be_liberal,
            udp: args.conntrack_udp_timeout,
            udp_stream: args.conntrack_udp_timeout_stream,
        },
    })
    .await
}

/// The node's memory (`MemTotal`), 0 when unreadable.
fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Conntrack entries for a node of `mem` bytes: 0.05% of its memory at
/// 130 bytes an entry (what the kernel LRU hash it replaced took; the set
/// table takes 80, so the same count costs less), the power of two below, from 65,536 to
/// 4,194,304 (Cilium sizes its tables from memory the same way, with a
/// larger share).
pub fn conntrack_default(mem: u64) -> u32 {
    let entries = mem / 2000 / 130;
    let pow2 = if entries == 0 {
        1
    } else {
        1u64 << (63 - entries.leading_zeros())
    };
    pow2.clamp(1 << 16, 1 << 22) as u32
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn addr(s: &str) -> Result<Option<std::net::SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("{s:?} is not an address:port"))
}

/// The default node name, as the kubelet's: the host name.
pub fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (give --node-name)")?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::conntrack_default;

    #[test]
    fn conntrack_follows_memory_within_bounds() {
        const GIB: u64 = 1 << 30;
        assert_eq!(conntrack_default(0), 1 << 16);
        assert_eq!(conntrack_default(2 * GIB), 1 << 16);
        // This machine (24 GiB): 0.05% is 12.9 MB, 99,000 entries.
        assert_eq!(conntrack_default(24 * GIB), 1 << 16);
        assert_eq!(conntrack_default(64 * GIB), 1 << 18);
        assert_eq!(conntrack_default(256 * GIB), 1 << 20);
        assert_eq!(conntrack_default(4096 * GIB), 1 << 22);
    }
}

/// `--lb-algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    Hash,
    Maglev,
}

/// `--lb-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbModeArg {
    Snat,
    Dsr,
    Hybrid,
}

//! The agent's loop: load and attach the datapath, then poll the source and
//! reconcile until told to stop.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
    time::Instant,
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use lb_common::{config::Config, ip4};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use futures::{FutureExt, StreamExt};

use super::{
    allocate::Allocator,
    health::{self, Health},
    logs,
    metrics::Metrics,
    model::NodeInfo,
    reconcile::Reconciler,
    service_cidrs::{self, ServiceCidrs},
    source::{
        dir::DirSource,
        kube::{self as kube_source, ClusterSync, Update, Updates},
    },
    status::StatusRecord,
    store::Store,
};
use crate::datapath::{attach, load, maps::ServiceMaps, pins};

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A folder of manifests, polled.
    Dir(PathBuf),
    /// The Kubernetes API.
    Cluster {
        kubeconfig: Option<PathBuf>,
        /// Also read `v1/Endpoints` (for Services without EndpointSlices).
        watch_endpoints: bool,
    },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    /// Map sizes by map name, where not the object's.
    pub map_sizes: std::collections::BTreeMap<String, u32>,
    /// `--lb-map-max`: what the Service ports must fit in.
    pub capacity: super::reconcile::Capacity,
    /// `--lb-algorithm`, `--maglev-table-size`.
    pub balancing: super::model::Balancing,
    /// Source ports for SNAT to backends on other nodes.
    pub snat_ports: std::ops::RangeInclusive<u16>,
    /// Flood protection: new flows from outside a second per CPU that go
    /// into conntrack (0: no limit), and how many may come at once.
    pub new_flow_rate: u32,
    pub new_flow_burst: u32,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: Vec<super::nodeport_addrs::Selector>,
    /// The service CIDRs whose unallocated addresses are dropped.
    pub service_cidrs: ServiceCidrs,
    /// ClusterIPs and nodePorts for manifests written without them
    /// (manifest folder only: the API server does this for its own).
    pub allocator: Allocator,
    /// Forward aya-log records from the programs (else compiled out at
    /// load).
    pub datapath_logs: bool,
    pub bpffs: PathBuf,
    pub node_name: String,
    /// NodePort addresses given on the command line; when empty, the Node
    /// object's InternalIP/ExternalIP addresses.
    pub node_ips: Vec<Ipv4Addr>,
    pub snat_ip: Option<Ipv4Addr>,
    /// Device name patterns (`*` and `?`), attached as they appear.
    pub devices: Vec<String>,
    /// `--xdp`.
    pub xdp: attach::XdpChoice,
    pub cgroup: Option<PathBuf>,
    pub poll: Duration,
    /// `/healthz`, `/livez`, `/readyz` (and `/metrics`) listener.
    pub healthz_addr: Option<SocketAddr>,
    /// `/metrics` (and the health endpoints) listener.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz` fails once a change waits longer than this.
    pub healthz_timeout: Duration,
    /// The node's netfilter conntrack settings (kube-proxy's flags).
    pub nf_conntrack: super::nf_conntrack::Settings,
}

/// Node facts: flags win over the Node object; NodePort addresses as
/// `--nodeport-addresses` picks them among the node's and this machine's.
pub fn node_info(cfg: &AgentConfig, node: Option<&Node>) -> NodeInfo {
    let mut info = NodeInfo::from_flags_and_node(&cfg.node_name, &cfg.node_ips, cfg.snat_ip, node);
    info.balancing = cfg.balancing;
    info.addresses = super::nodeport_addrs::resolve(
        &cfg.nodeport_addresses,
        &info.addresses,
        &super::nodeport_addrs::machine_addresses(),
    );
    info
}

/// `*` matches any run of characters, `?` one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// Interfaces of the agent's network namespace, (name, index), from the
/// kernel: not /sys, which shows the namespace of whoever mounted it.
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed
    // below; names are NUL-terminated.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .to_string();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

/// Interfaces of this namespace whose name matches a pattern.
fn matching_devices(patterns: &[String]) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = interfaces()
        .into_iter()
        .filter(|(n, _)| patterns.iter().any(|p| glob_match(p, n)))
        .collect();
    out.sort();
    out
}

/// The objects' source, as the loop sees it.
enum Source {
    Dir(DirSource),
    Cluster {
        updates: Updates,
        sync: Box<ClusterSync>,
    },
}

/// The datapath's settings for this node.
/// `ports_whole`: the port map holds every port in use (the device path
/// may pass packets to other ports at once).
fn datapath_config(
    node: &NodeInfo,
    cfg: &AgentConfig,
    host_netns_cookie: u64,
    cidrs: &[(u32, u8)],
    ports_whole: bool,
) -> Config {
    let mut c = Config {
        snat_addr: node.snat.map_or(0, |a| ip4(a.octets())),
        snat_port_min: *cfg.snat_ports.start(),
        snat_port_max: *cfg.snat_ports.end(),
        flags: if ports_whole {
            lb_common::config::CFG_PORTS
        } else {
            0
        },
        host_netns_cookie,
        ..Config::default()
    };
    c.set_service_cidrs(cidrs);
    c.set_flow_rate(cfg.new_flow_rate, cfg.new_flow_burst);
    c
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let started = Instant::now();
    pins::prepare(&cfg.bpffs)?;
    super::snat_ports::reserve(&cfg.snat_ports)
        .context("reserving the SNAT ports (ip_local_reserved_ports)")?;
    let host_netns_cookie = super::nodeport_addrs::own_netns_cookie()
        .context("reading this network namespace's cookie (SO_NETNS_COOKIE)")?;
    let health = Arc::new(Health::new(cfg.healthz_timeout));
    let metrics = Arc::new(Metrics::new(cfg.bpffs.clone()));
    let mut addrs: Vec<SocketAddr> = cfg
        .healthz_addr
        .into_iter()
        .chain(cfg.metrics_addr)
        .collect();
    addrs.dedup();
    for addr in addrs {
        let (h, m) = (health.clone(), metrics.clone());
        // Bound here, so a taken port fails the start rather than later.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(async move {
            if let Err(e) = health::serve(listener, h, m).await {
                warn!("{e:#}");
            }
        });
    }
    let (mut source, source_label) = match &cfg.source {
        SourceConfig::Dir(dir) => {
            info!(folder = %dir.display(), "source: manifest folder");
            let mut src = DirSource::new(dir);
            src.prefetch();
            (Source::Dir(src), dir.display().to_string())
        }
        SourceConfig::Cluster {
            kubeconfig,
            watch_endpoints,
        } => {
            let (client, url) = kube_source::client(kubeconfig.as_deref()).await?;
            info!(
                node = %cfg.node_name,
                endpoints = watch_endpoints,
                "watching the Kubernetes API"
            );
            let src = Source::Cluster {
                updates: kube_source::watch(
                    &client,
                    &cfg.node_name,
                    *watch_endpoints,
                    cfg.service_cidrs == ServiceCidrs::FromApi,
                ),
                sync: Box::new(ClusterSync::new(*watch_endpoints)),
            };
            (src, url)
        }
    };

    // Pins of another size or definition are migrated (logged) first.
    let (mut ebpf, _migrated) = load::load_with(&cfg.bpffs, cfg.datapath_logs, &cfg.map_sizes)?;
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => pins::cgroup2_root()?,
    };
    let n = attach::cgroup(&mut ebpf, &cfg.bpffs, &cgroup)?;
    info!(cgroup = %cgroup.display(), attached = n.attached, replaced = n.replaced, moved_from_another_cgroup = n.moved, "socket programs in place");
    if cfg.datapath_logs {
        logs::start(&mut ebpf);
    }
    // Devices an earlier agent attached that --devices no longer names
    // (it ran with other flags) lose their programs.
    for (_, _, dev) in attach::pinned(&cfg.bpffs) {
        if let Some(dev) = dev
            && !cfg.devices.iter().any(|p| glob_match(p, &dev))
        {
            attach::detach_device(&cfg.bpffs, &dev)?;
            info!(device = %dev, "device programs removed: no longer matched by --devices");
        }
    }

    // Devices done, by name and the ifindex they had: a device deleted and
    // made again under the same name gets a new index and is attached anew.
    let mut attached_devices: std::collections::BTreeMap<String, u32> = Default::default();
    // Whether lb_sock_egress is on the cgroup (None: not yet decided by
    // this agent; a pinned one of an earlier agent is swapped or removed).
    let mut sock_egress: Option<bool> = None;
    // Adopts ids and entries from the pinned maps: no flow moves.
    let maps = ServiceMaps::open(&cfg.bpffs)?;
    // The SNAT range the pinned config had (an earlier agent's): its ports
    // stay in the port map, for the replies of flows SNATed before.
    let pinned_snat = maps
        .config()
        .ok()
        .filter(|c| c.snat_port_min > 0 && c.snat_port_max >= c.snat_port_min)
        .map(|c| c.snat_port_min..=c.snat_port_max);

    let mut rec = Reconciler::adopt(maps)?;
    rec.set_capacity(cfg.capacity);
    rec.add_snat_ports(cfg.snat_ports.clone());
    if let Some(r) = pinned_snat {
        rec.add_snat_ports(r);
    }
    metrics.map_capacity(&cfg.capacity);
    // Services with a port refused for a full map: tried again once a
    // flush has removed entries.
    // The last refusal of each is kept so a retry that fails alike is not
    // logged again.
    let mut refused: std::collections::BTreeMap<super::model::ObjKey, String> = Default::default();
    // Connected UDP sockets of backends that leave are ended off the loop.
    let terminator = super::stale_sockets::Terminator::start(
        cfg.bpffs.clone(),
        PathBuf::from("/proc"),
        metrics.udp_sockets_destroyed.clone(),
    )
    .context("starting the UDP socket worker")?;
    // Before the device programs of this version are attached: they end
    // flows whose backend has no entry.
    let migrated = rec
        .migrate_service_backends()
        .context("marking adopted backends in LB_SVC_BACKENDS_V1")?;
    if migrated > 0 {
        info!(
            entries = migrated,
            "maps from an older agent: their backends marked serving until the first sync"
        );
    }
    // Addresses and ports given out by a previous agent stay the same.
    let mut allocator = cfg.allocator.clone();
    allocator.adopt_frontends(&rec.written_frontends(), |id| {
        rec.written_service_meta(id).copied()
    });
    let mut status = StatusRecord::new(
        matches!(cfg.source, SourceConfig::Cluster { .. }),
        &source_label,
        &cfg.node_name,
        &cgroup.display().to_string(),
    );
    tune_nf_conntrack(&cfg.nf_conntrack, &mut status);
    // Published before the first sync: `lbctl status` shows a starting
    // agent (pending) rather than no agent while a large first sync runs.
    publish(&mut rec, &mut status);
    let mut store = Store::default();
    let mut not_enforced = super::unenforced::NotEnforced::default();
    let mut health_checks = super::hcnp::HealthCheckServers::new(health.clone());
    let mut node: Option<NodeInfo> = None;
    // The Node object last seen (None inside: none of this name).
    let mut last_node: Option<Option<Node>> = None;
    let mut last_config = None;
    let mut last_node_addrs = None;
    // The service CIDRs in force (from the flag, or the API once listed).
    let mut cidrs: Vec<(Ipv4Addr, u8)> = match &cfg.service_cidrs {
        ServiceCidrs::Given(v) => v.clone(),
        ServiceCidrs::FromApi => Vec::new(),
    };
    let mut cidrs_logged = None;
    // The target has changes the maps do not have yet.
    let mut unflushed = false;
    let mut synced_once = false;
    let mut waiting_logged = false;
    // When the oldest change not yet in the maps was seen.
    let mut change_seen: Option<Instant> = None;
    // Time spent translating into the target since the last flush.
    let mut translating = std::time::Duration::ZERO;
    let mut ticker = tokio::time::interval(cfg.poll);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let mut node_obj: Option<Option<Node>> = None;
        let mut ready = true;
        match &mut source {
            Source::Dir(dir) => {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
                match dir.poll() {
                    Ok(Some(mut snap)) => {
                        metrics.event("files");
                        for e in &snap.errors {
                            warn!("skipped: {e}");
                            metrics.error("file");
                            status.error(&format!("skipped: {e}"));
                        }
                        for e in allocator.complete(&mut snap.objects.services) {
                            warn!("not completed: {e}");
                            metrics.error("object");
                            status.error(&format!("not completed: {e}"));
                        }
                        store.replace_services(snap.objects.services);
                        store.replace_slices(snap.objects.slices);
                        store.replace_endpoints(snap.objects.endpoints);
                        node_obj = Some(snap.nodes.get(&cfg.node_name).cloned());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!("reading manifests: {e}");
                        metrics.error("source");
                        status.error(&format!("reading manifests: {e}"));
                    }
                }
            }
            Source::Cluster { updates, sync } => {
                let first = tokio::select! {
                    _ = ticker.tick() => None,
                    u = updates.next() => u,
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                };
                // Everything already waiting goes into one flush.
                let mut batch: Vec<Update> = first.into_iter().collect();
                while batch.len() < 10_000 {
                    match updates.next().now_or_never() {
                        Some(Some(u)) => batch.push(u),
                        _ => break,
                    }
                }
                let had_node = sync.node.clone();
                let mut listed = false;
                for u in batch {
                    let kind = match &u {
                        Update::Unavailable(kind, e) => {
                            warn!(
                                kind = kind.label(),
                                "not readable ({e}): the agent does without it until restarted; for ServiceCIDR, give --service-cidr to drop unallocated addresses"
                            );
                            kind.label()
                        }
                        Update::Error(kind, e) => {
                            warn!(kind = kind.label(), "watch: {e}");
                            metrics.error("watch");
                            status.error(&format!("watch {}: {e}", kind.label()));
                            kind.label()
                        }
                        Update::Service(_) => "Service",
                        Update::Slice(_) => "EndpointSlice",
                        Update::Endpoints(_) => "Endpoints",
                        Update::Node(_) => "Node",
                        Update::ServiceCidr(_) => "ServiceCIDR",
                    };
                    if !matches!(u, Update::Error(..) | Update::Unavailable(..)) {
                        metrics.event(kind);
                    }
                    if sync.apply(&mut store, u).listed {
                        info!(kind, "listed");
                        metrics.listed(kind);
                        listed = true;
                    }
                }
                if listed || sync.node != had_node || node.is_none() {
                    node_obj = Some(sync.node.clone());
                }
                if let Some(objs) = sync.service_cidrs() {
                    let (v, bad) = service_cidrs::from_objects(objs);
                    for e in bad {
                        warn!("ServiceCIDR: {e}");
                    }
                    cidrs = v;
                }
                ready = sync.ready();
                if !ready && !waiting_logged {
                    info!(waiting_for = ?sync.waiting_for(), "nothing programmed until every kind has listed once");
                    waiting_logged = true;
                }
            }
        }
        for (dev, index) in matching_devices(&cfg.devices) {
            if attached_devices.get(&dev) == Some(&index) {
                continue;
            }
            match attach::device(&mut ebpf, &cfg.bpffs, &dev) {
                Ok(n) => {
                    info!(device = %dev, ifindex = index, attached = n.attached, replaced = n.replaced, "device programs in place");
                }
                Err(e) => {
                    warn!(device = %dev, "attaching: {e:#}");
                    continue;
                }
            }
            // XDP only in front of a tc program that takes what it leaves.
            match attach::xdp(&mut ebpf, &cfg.bpffs, &dev, cfg.xdp) {
                Ok(attach::XdpOutcome::On { mode, replaced }) => {
                    info!(device = %dev, mode = mode.name(), replaced, "XDP in place");
                    attached_devices.insert(dev, index);
                }
                Ok(attach::XdpOutcome::Off { reason }) => {
                    info!(device = %dev, %reason, "no XDP: tc alone");
                    attached_devices.insert(dev, index);
                }
                Err(e) => {
                    // tc carries the device; told once, not every pass.
                    warn!(device = %dev, "XDP: {e:#} (tc alone)");
                    attached_devices.insert(dev, index);
                }
            }
        }
        if !ready {
            status.pending();
            publish(&mut rec, &mut status);
            continue;
        }
        if let Some(obj) = node_obj {
            // kube-proxy's /healthz fails on a Node being deleted (load
            // balancers then drain it) and, with the API, on a missing
            // Node; a manifest folder may simply have no Node.
            health.set_node_eligible(match &obj {
                Some(n) => health::node_eligible(n),
                None => matches!(cfg.source, SourceConfig::Dir(_)),
            });
            last_node = Some(obj);
        }
        // Every pass: the machine's addresses may have changed.
        if let Some(obj) = &last_node {
            let info = node_info(&cfg, obj.as_ref());
            if node.as_ref() != Some(&info) {
                if obj.is_none() && info.addresses.is_empty() {
                    warn!(node = %cfg.node_name, "no Node object of this name: NodePorts answer on no address (set --node-ip)");
                }
                info!(addresses = ?info.addresses, snat = ?info.snat, zone = ?info.zone, "node");
                // Locality and NodePort addresses are in every Service.
                store.all_dirty();
                rec.set_snat_addrs(&info.snat.into_iter().collect::<Vec<_>>());
                node = Some(info);
                unflushed = true;
            }
        }
        let Some(node) = &node else { continue };
        let (dp_cidrs, left_out) = service_cidrs::for_datapath(&cidrs);
        if cidrs_logged.as_ref() != Some(&cidrs) {
            info!(service_cidrs = %service_cidrs::show(cidrs.iter().copied()), "unallocated addresses of the service CIDRs are dropped");
            if !left_out.is_empty() {
                warn!(
                    not_enforced = %service_cidrs::show(left_out.iter().copied()),
                    max = lb_common::config::MAX_SERVICE_CIDRS,
                    "more service CIDRs than the datapath checks: these are not enforced"
                );
                status.error(&format!(
                    "service CIDRs not enforced (more than {}): {}",
                    lb_common::config::MAX_SERVICE_CIDRS,
                    service_cidrs::show(left_out.iter().copied())
                ));
            }
            cidrs_logged = Some(cidrs.clone());
        }
        let config = datapath_config(node, &cfg, host_netns_cookie, &dp_cidrs, rec.ports_whole());
        if last_config != Some(config) {
            rec.writer
                .set_config(config)
                .context("writing datapath config")?;
            last_config = Some(config);
        }
        let (own, left_out) = node.own_addrs4();
        if last_node_addrs != Some(own) {
            rec.writer
                .set_node_addrs(own)
                .context("writing the node's addresses")?;
            if left_out > 0 {
                info!(
                    held = lb_common::config::MAX_NODE_ADDRS,
                    left_out,
                    "more node addresses than the datapath holds: the rest are found through the address map"
                );
            }
            last_node_addrs = Some(own);
        }
        if store.is_dirty() {
            health.pending();
            change_seen.get_or_insert_with(Instant::now);
            let t = Instant::now();
            for change in store.take_changes(node) {
                let ports = match change.ports {
                    Ok(p) => p,
                    Err(e) => {
                        // Skipped alone: its entries go, the rest stays.
                        warn!("skipped: {e}");
                        metrics.error("object");
                        status.error(&format!("skipped: {e}"));
                        Default::default()
                    }
                };
                not_enforced.log(&change.service, &ports);
                health_checks.update(&change.service, &ports).await;
                match rec.set_service(&change.service, ports) {
                    Ok(()) => {
                        refused.remove(&change.service);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if refused.get(&change.service) != Some(&msg) {
                            warn!(service = %change.service, "not programmed: {msg}");
                            metrics.error("sync");
                            status.error(&format!("{} not programmed: {msg}", change.service));
                        }
                        if matches!(e, super::reconcile::ReconcileError::Full { .. }) {
                            refused.insert(change.service.clone(), msg);
                        }
                    }
                }
            }
            unflushed = true;
            translating += t.elapsed();
        }
        if !unflushed {
            status.in_sync();
            publish(&mut rec, &mut status);
            continue;
        }
        // A pass writes map by map: readers (lbctl, probes) see it under
        // way from the record, flagged before the first write and
        // recorded after the last, rather than a half-written Service.
        status.pending();
        publish(&mut rec, &mut status);
        match rec.flush() {
            Ok(o) => {
                unflushed = false;
                let translated = std::mem::take(&mut translating);
                terminator.backends_left(o.udp_left.clone());
                if o.writes > 0 {
                    for k in refused.keys() {
                        store.mark_dirty(k.clone());
                    }
                }
                status.synced(o.writes, rec.port_count());
                metrics.sync_duration.observe(o.elapsed.as_secs_f64());
                if let Some(t) = change_seen.take() {
                    metrics
                        .programming_latency
                        .observe(t.elapsed().as_secs_f64());
                }
                health.synced();
                metrics.map_entries(&rec.written_lens());
                if !synced_once {
                    // After a restart this is 0: every id and entry adopted.
                    info!(
                        writes = o.writes,
                        service_ports = rec.port_count(),
                        translate_us = translated.as_micros() as u64,
                        elapsed_us = o.elapsed.as_micros() as u64,
                        since_start_ms = started.elapsed().as_millis() as u64,
                        "first sync done"
                    );
                    synced_once = true;
                } else if o.writes > 0 {
                    info!(
                        writes = o.writes,
                        service_ports = rec.port_count(),
                        elapsed_us = o.elapsed.as_micros() as u64,
                        "maps in sync"
                    );
                } else {
                    debug!("maps already in sync");
                }
            }
            Err(e) => {
                metrics.error("sync");
                warn!("sync incomplete, retrying: {e}");
                status.pending();
                status.error(&format!("sync incomplete: {e}"));
            }
        }
        // Source ranges on the socket path: the egress program is on the
        // cgroup while some Service has ranges, off otherwise.
        let want_egress = rec.has_source_ranges();
        if sock_egress != Some(want_egress) {
            match attach::sock_egress(&mut ebpf, &cfg.bpffs, &cgroup, want_egress) {
                Ok(changed) => {
                    if changed {
                        info!(
                            attached = want_egress,
                            "socket egress check of loadBalancerSourceRanges"
                        );
                    }
                    sock_egress = Some(want_egress);
                }
                Err(e) => {
                    warn!("socket egress program: {e:#}");
                    status.error(&format!("socket egress program: {e:#}"));
                }
            }
        }
        publish(&mut rec, &mut status);
    }
    info!(pins = %cfg.bpffs.display(), "stopping; the datapath stays in place");
    Ok(())
}

/// Writes the status record when it changed. A failure is logged, never
/// fatal: the record is for people, the maps are what matters.
fn publish(rec: &mut Reconciler<ServiceMaps>, status: &mut StatusRecord) {
    if let Some(s) = status.take_changed()
        && let Err(e) = rec.writer.set_agent_status(s)
    {
        debug!("writing the status record: {e}");
    }
}

/// Writes the node's netfilter conntrack settings once, at start, as
/// kube-proxy does; a failure is logged and recorded, never fatal.
fn tune_nf_conntrack(settings: &super::nf_conntrack::Settings, status: &mut StatusRecord) {
    use super::nf_conntrack::{Files, Outcome, apply};
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (outcomes, errors) = apply(settings, cpus, &Files::default());
    for o in outcomes {
        match o {
            Outcome::Set { name, from, to } => {
                info!(%name, from, to, "netfilter conntrack setting")
            }
            Outcome::Unchanged { name, value } => {
                debug!(%name, value, "netfilter conntrack setting already so")
            }
            Outcome::HostOnly { name, value } => info!(
                %name,
                value,
                "netfilter conntrack setting of the host, not writable from this network namespace: left as is"
            ),
        }
    }
    for e in errors {
        warn!("netfilter conntrack: {e}");
        status.error(&format!("netfilter conntrack: {e}"));
    }
}

/// `lbctl agent --cleanup`: remove everything the agent attached and pinned.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    attach::cleanup(bpffs)?;
    info!(pins = %bpffs.display(), "removed every attachment and map");
    Ok(())
}

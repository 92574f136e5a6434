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

use super::{
    health::{self, Health},
    metrics::{MapLabel, Metrics},
    model::{self, Desired, NodeInfo},
    reconcile::Reconciler,
    source::dir::DirSource,
};
use crate::datapath::{attach, load, maps::ServiceMaps, pins};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    pub bpffs: PathBuf,
    pub node_name: String,
    /// NodePort addresses given on the command line; when empty, the Node
    /// object's InternalIP/ExternalIP addresses.
    pub node_ips: Vec<Ipv4Addr>,
    pub snat_ip: Option<Ipv4Addr>,
    /// Device name patterns (`*` and `?`), attached as they appear.
    pub devices: Vec<String>,
    pub cgroup: Option<PathBuf>,
    pub poll: Duration,
    /// `/healthz`, `/livez`, `/readyz` (and `/metrics`) listener.
    pub healthz_addr: Option<SocketAddr>,
    /// `/metrics` (and the health endpoints) listener.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz` fails once a change waits longer than this.
    pub healthz_timeout: Duration,
}

/// Node facts: flags win over the Node object.
pub fn node_info(cfg: &AgentConfig, node: Option<&Node>) -> NodeInfo {
    let mut addresses = cfg.node_ips.clone();
    if addresses.is_empty() {
        for a in node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP")
                && let Ok(ip) = a.address.parse()
            {
                addresses.push(ip);
            }
        }
    }
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned();
    let snat = cfg.snat_ip.or(addresses.first().copied());
    NodeInfo {
        name: cfg.node_name.clone(),
        zone,
        addresses,
        snat,
    }
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

pub async fn run(cfg: AgentConfig) -> Result<()> {
    pins::prepare(&cfg.bpffs)?;
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
    let mut ebpf = load::load(&cfg.bpffs)?;
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => pins::cgroup2_root()?,
    };
    let n = attach::cgroup(&mut ebpf, &cfg.bpffs, &cgroup)?;
    info!(cgroup = %cgroup.display(), attached = n.attached, replaced = n.replaced, "socket programs in place");

    let mut source = DirSource::new(&cfg.manifests);
    // Devices done, by name and the ifindex they had: a device deleted and
    // made again under the same name gets a new index and is attached anew.
    let mut attached_devices: std::collections::BTreeMap<String, u32> = Default::default();
    let mut last_config = None;
    // Adopts ids and entries from the pinned maps: no flow moves.
    let mut rec = Reconciler::adopt(ServiceMaps::open(&cfg.bpffs)?)?;
    let mut pending: Option<Desired> = None;
    let mut synced_once = false;
    // When the oldest change not yet in the maps was seen.
    let mut change_seen: Option<Instant> = None;
    let mut ticker = tokio::time::interval(cfg.poll);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        for (dev, index) in matching_devices(&cfg.devices) {
            if attached_devices.get(&dev) == Some(&index) {
                continue;
            }
            match attach::device(&mut ebpf, &cfg.bpffs, &dev) {
                Ok(n) => {
                    info!(device = %dev, ifindex = index, attached = n.attached, replaced = n.replaced, "device programs in place");
                    attached_devices.insert(dev, index);
                }
                Err(e) => warn!(device = %dev, "attaching: {e:#}"),
            }
        }
        match source.poll() {
            Ok(Some(snap)) => {
                metrics
                    .source_events
                    .get_or_create(&super::metrics::KindLabel {
                        kind: "files".into(),
                    })
                    .inc();
                for e in &snap.errors {
                    warn!("skipped: {e}");
                    metrics.error("file");
                }
                health.pending();
                change_seen.get_or_insert_with(Instant::now);
                let node = node_info(&cfg, snap.nodes.get(&cfg.node_name));
                let snat = node.snat;
                let config = Config {
                    snat_addr: snat.map_or(0, |a| ip4(a.octets())),
                    snat_port_min: 32768,
                    snat_port_max: 60999,
                    flags: 0,
                    _reserved: 0,
                };
                if last_config != Some(config) {
                    rec.writer
                        .set_config(config)
                        .context("writing datapath config")?;
                    last_config = Some(config);
                }
                let desired = model::translate(&snap.objects, &node);
                for e in &desired.errors {
                    warn!("skipped: {e}");
                    metrics.error("object");
                }
                pending = Some(desired);
            }
            Ok(None) => {}
            Err(e) => {
                warn!("reading manifests: {e}");
                metrics.error("source");
            }
        }
        if let Some(desired) = &pending {
            let result = rec.reconcile(desired);
            match &result {
                Ok(o) => {
                    metrics.sync_duration.observe(o.elapsed.as_secs_f64());
                    if let Some(t) = change_seen.take() {
                        metrics
                            .programming_latency
                            .observe(t.elapsed().as_secs_f64());
                    }
                    health.synced();
                    let st = rec.state();
                    for (map, n) in [
                        (lb_common::maps::FRONTENDS4, st.frontends.len()),
                        (lb_common::maps::ADDRS4, st.addrs.len()),
                        (lb_common::maps::BACKEND_SLOTS, st.slots.len()),
                        (lb_common::maps::BACKENDS4, st.backends.len()),
                        (lb_common::maps::SERVICE_META, st.service_meta.len()),
                        (lb_common::maps::BACKEND_META, st.backend_meta.len()),
                    ] {
                        metrics
                            .map_entries
                            .get_or_create(&MapLabel { map: map.into() })
                            .set(n as i64);
                    }
                }
                Err(_) => metrics.error("sync"),
            }
            match result {
                Ok(o) if !synced_once => {
                    // After a restart this is 0: every id and entry adopted.
                    info!(
                        writes = o.writes,
                        services = desired.ports.len(),
                        elapsed_us = o.elapsed.as_micros() as u64,
                        "first sync done"
                    );
                    synced_once = true;
                    pending = None;
                }
                Ok(o) => {
                    if o.writes > 0 {
                        info!(
                            writes = o.writes,
                            services = desired.ports.len(),
                            elapsed_us = o.elapsed.as_micros() as u64,
                            "maps in sync"
                        );
                    } else {
                        debug!("maps already in sync");
                    }
                    pending = None;
                }
                Err(e) => warn!("sync incomplete, retrying: {e}"),
            }
        }
    }
    info!(pins = %cfg.bpffs.display(), "stopping; the datapath stays in place");
    Ok(())
}

/// `lbctl agent --cleanup`: remove everything the agent attached and pinned.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    attach::cleanup(bpffs)?;
    info!(pins = %bpffs.display(), "removed every attachment and map");
    Ok(())
}

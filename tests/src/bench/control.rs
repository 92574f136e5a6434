//! The control plane: how long until the maps (or rules) hold the
//! Services, how long one EndpointSlice change takes to reach them, and the
//! agent's memory; beside it kube-proxy's full syncs of the same Services,
//! recreated (`iptables-restore`, `nft -f`).

use std::time::Instant;

use lbctl::{
    agent::{reconcile::Reconciler, store::Store},
    datapath::maps::ServiceMaps,
};

use super::{
    Progress, agent, cluster,
    e2e::{self, load_into},
    node_info,
    packet::NODE,
    percentile,
};
use crate::{
    guard::{Bpffs, Cgroup, Netns, unique},
    kubeproxy::{self, NodeCfg},
};

/// The agent at one size.
pub struct AgentRun {
    pub services: usize,
    /// Agent start to every Service in the maps (read, parse, translate,
    /// write), seconds.
    pub full_sync_s: f64,
    /// Of it, as the agent logs its first sync: translating the objects
    /// into the target, and writing the maps (seconds).
    pub translate_s: f64,
    pub write_s: f64,
    pub peak_rss_kib: u64,
}

impl AgentRun {
    /// One start of the agent: `full` from start to its first sync, the
    /// rest from its log line "first sync done".
    fn from_log(services: usize, full: std::time::Duration, log: &str, peak_rss_kib: u64) -> Self {
        Self {
            services,
            full_sync_s: full.as_secs_f64(),
            translate_s: first_sync_field(log, "translate_us"),
            write_s: first_sync_field(log, "elapsed_us"),
            peak_rss_kib,
        }
    }
}

/// A `key=value` field of the agent's "first sync done" log line, in
/// seconds (the fields are in microseconds).
fn first_sync_field(log: &str, key: &str) -> f64 {
    log.lines()
        .find(|l| l.contains("first sync done"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |us| us / 1e6)
}

/// One kube-proxy backend's syncs at one size.
#[derive(Clone, Debug, Default)]
pub struct Sync {
    /// The first full sync, seconds (None: not run, too slow here).
    pub first_s: Option<f64>,
    /// A change applied as kube-proxy's full sync does (the whole rule set
    /// again, into the loaded namespace): p50 and worst seconds over
    /// `samples` (0: not run).
    pub change_s: (f64, f64),
    pub samples: usize,
}

/// kube-proxy's recreated syncs at one size.
pub struct RulesRun {
    pub services: usize,
    pub iptables_rules: usize,
    pub iptables_legacy: Sync,
    pub iptables_nft: Sync,
    pub nftables: Sync,
}

pub struct Results {
    pub agent: Vec<AgentRun>,
    /// One EndpointSlice change to its map writes, ms: p50, p99; samples;
    /// map writes p50 and max.
    pub change_ms: (f64, f64),
    pub changes: usize,
    pub change_writes: (f64, f64),
    pub change_services: usize,
    pub rules: Vec<RulesRun>,
}

/// The real agent on a folder of `n` Services: full sync time, peak RSS.
pub fn agent_run(n: usize) -> AgentRun {
    agent_runs(n, false).0
}

/// As [`agent_run`]; with `restart`, the agent is then killed and started
/// again on the maps it left pinned, as in a DaemonSet rollout: the second
/// run is its start to the first sync (adopting every id, writing nothing)
/// and its peak RSS.
pub fn agent_runs(n: usize, restart: bool) -> (AgentRun, Option<AgentRun>) {
    let ns = Netns::new("bn");
    let cg = Cgroup::new();
    let fs = Bpffs::new();
    let work = std::env::temp_dir().join(unique("bw"));
    let svcs = cluster::services(n, 10);
    let (agent, first) = one_start(n, &ns, &cg, &fs, &work, &svcs);
    let (agent, second) = if restart {
        drop(agent);
        let (agent, again) = one_start(n, &ns, &cg, &fs, &work, &svcs);
        (agent, Some(again))
    } else {
        (agent, None)
    };
    agent::stop(agent, &fs.pins());
    let _ = std::fs::remove_dir_all(&work);
    (first, second)
}

fn one_start(
    n: usize,
    ns: &Netns,
    cg: &Cgroup,
    fs: &Bpffs,
    work: &std::path::Path,
    svcs: &[kubeproxy::Svc],
) -> (crate::guard::Proc, AgentRun) {
    let mut peak_kib = 0u64;
    let (agent, full) = agent::start(ns, work, svcs, &fs.pins(), &cg.path, &[], |pid| {
        peak_kib = peak_kib.max(vm_hwm_kib(pid))
    });
    let log = std::fs::read_to_string(work.join("agent.log")).unwrap_or_default();
    // The agent's own account of its start (timestamps of each step).
    for l in log.lines().take_while(|l| !l.contains("first sync done")) {
        eprintln!("agent: {l}");
    }
    if let Some(l) = log.lines().find(|l| l.contains("first sync done")) {
        eprintln!("agent: {l}");
    }
    let run = AgentRun::from_log(n, full, &log, peak_kib);
    (agent, run)
}

/// The agent on the Kubernetes API: `n` Services x 10 endpoints created in
/// a real API server (built from upstream; ClusterIPs allocated by it, as
/// users write Services), then the agent started with a kubeconfig, timed
/// from its start until every Service is in the maps (its first sync, which
/// is when `/readyz` turns 200). Returns the run and how long loading the
/// objects took (seconds).
pub fn api_run(n: usize) -> (AgentRun, f64) {
    use crate::{controlplane, topo};
    let t = topo::Topology::new(0);
    let cp = controlplane::ControlPlane::start(&t.lan, "lan0", controlplane::CP_IP);
    let svcs = cluster::services(n, 10);
    let yaml: String = cluster::to_yaml(&svcs, "node-a")
        .lines()
        // The API server allocates them.
        .filter(|l| !l.trim_start().starts_with("clusterIP: "))
        .flat_map(|l| [l, "\n"])
        .collect();
    let namespaces: std::collections::BTreeSet<&str> =
        svcs.iter().map(|s| s.namespace.as_str()).collect();
    for ns in namespaces {
        cp.kubectl_ok(&["create", "namespace", ns]);
    }
    // In four `kubectl create` processes at once: one is one request at a
    // time (minutes at 100,000 objects).
    let loaded = Instant::now();
    let docs: Vec<&str> = yaml.split("---\n").filter(|d| !d.is_empty()).collect();
    let parts: Vec<String> = docs
        .chunks(docs.len().div_ceil(4).max(1))
        .map(|c| c.join("---\n"))
        .collect();
    let work = std::env::temp_dir().join(unique("bw"));
    std::fs::create_dir_all(&work).unwrap();
    std::thread::scope(|sc| {
        for (i, part) in parts.iter().enumerate() {
            let cp = &cp;
            // From a file: kubectl creates as it reads and prints a line
            // per object, so a pipe both ways would fill and stall.
            let file = work.join(format!("part-{i}.yaml"));
            std::fs::write(&file, part).unwrap();
            sc.spawn(move || {
                let out = cp
                    .kubectl_command()
                    .arg("create")
                    .arg("-f")
                    .arg(&file)
                    .output()
                    .expect("kubectl");
                assert!(
                    out.status.success(),
                    "kubectl create: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            });
        }
    });
    let load_s = loaded.elapsed().as_secs_f64();
    let fs = Bpffs::new();
    let kubeconfig = work.join("kubeconfig");
    std::fs::copy(cp.admin_kubeconfig(), &kubeconfig).expect("kubeconfig");
    let source = ["--kubeconfig".to_string(), kubeconfig.display().to_string()];
    let mut peak_kib = 0u64;
    let (agent, full) = agent::start_on(
        &t.node,
        &work,
        &source,
        n,
        &fs.pins(),
        &t.cgroup.path,
        &[],
        |pid| peak_kib = peak_kib.max(vm_hwm_kib(pid)),
    );
    let log = std::fs::read_to_string(work.join("agent.log")).unwrap_or_default();
    let run = AgentRun::from_log(n, full, &log, peak_kib);
    agent::stop(agent, &fs.pins());
    let _ = std::fs::remove_dir_all(&work);
    (run, load_s)
}

/// A process's peak resident set (VmHWM), KiB; 0 when gone.
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One EndpointSlice change (an endpoint replaced) to its map writes, as
/// the agent handles a watch event: the store marks the Service dirty,
/// only it is translated, only the keys it touched are diffed and written,
/// on real pinned maps. Returns (latencies ms sorted, writes sorted).
pub fn changes(n: usize, count: usize) -> (Vec<f64>, Vec<f64>) {
    let (fs, _ebpf) = crate::fixture::datapath_for(n * 10);
    let objs = cluster::to_objects(&cluster::services(n, 10), "node-a");
    let node = node_info(NODE);
    let mut store = Store::default();
    store.replace_services(objs.services.clone());
    store.replace_slices(objs.slices.clone());
    let mut rec = Reconciler::adopt(ServiceMaps::open(&fs.pins()).unwrap()).unwrap();
    // The capacity the maps were made with (`--lb-map-max`).
    rec.set_capacity(lbctl::agent::reconcile::Capacity {
        lb_map_max: crate::fixture::lb_map_max_for(n * 10),
        maglev_chunks: lb_common::maps::DEFAULT_MAGLEV_CHUNKS,
    });
    for c in store.take_changes(&node) {
        rec.set_service(&c.service, c.ports.unwrap()).unwrap();
    }
    rec.flush().unwrap();
    let mut lat = Vec::new();
    let mut writes = Vec::new();
    let keys: Vec<_> = objs.slices.keys().cloned().collect();
    for i in 0..count {
        let key = keys[(i * 7919) % n].clone();
        let mut slice = (**store.objects().slices.get(&key).unwrap()).clone();
        slice.endpoints[i % 10].address = Some(std::net::Ipv4Addr::new(
            10,
            250,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ));
        let slice = std::sync::Arc::new(slice);
        let t = Instant::now();
        store.slice(key, Some(slice));
        for c in store.take_changes(&node) {
            rec.set_service(&c.service, c.ports.unwrap()).unwrap();
        }
        let o = rec.flush().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        writes.push(o.writes as f64);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    writes.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat, writes)
}

pub fn kube_proxy_node() -> NodeCfg {
    NodeCfg {
        node_ip: NODE,
        cluster_cidr: "10.244.0.0/16".into(),
        service_cidr: Some("10.96.0.0/12".into()),
    }
}

/// One backend's full syncs of `svcs` in a namespace of its own: the first
/// (unless `first` is already known), then `samples` more, each after one
/// endpoint changed.
fn sync(
    svcs: &mut [kubeproxy::Svc],
    program: &str,
    args: &[&str],
    text: impl Fn(&[kubeproxy::Svc]) -> String,
    first: Option<f64>,
    samples: usize,
) -> Sync {
    let ns = Netns::new("bk");
    let mut out = Sync {
        first_s: first,
        samples,
        ..Default::default()
    };
    if first.is_none() || samples > 0 {
        let t = load_into(&ns, program, args, &text(svcs));
        out.first_s.get_or_insert(t);
    }
    let n = svcs.len();
    let mut change = Vec::new();
    for i in 0..samples {
        let s = &mut svcs[(i * 7919) % n];
        let k = i % s.endpoints.len();
        s.endpoints[k].0 = std::net::Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250 + 1) as u8);
        change.push(load_into(&ns, program, args, &text(svcs)));
    }
    change.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if !change.is_empty() {
        out.change_s = (percentile(&change, 0.5), *change.last().unwrap());
    }
    out
}

/// kube-proxy's syncs of `n` Services. iptables-nft and nftables syncs of
/// 10,000 Services take minutes here (kernel time in the nf_tables
/// transaction), so beyond 1,000 iptables-nft is not run and nftables'
/// first sync is the one the end-to-end part measured, without change
/// samples (a change is the same full sync).
fn rules_run(n: usize, samples: usize, e2e: Option<&e2e::Results>) -> RulesRun {
    let node = kube_proxy_node();
    let mut svcs = cluster::services(n, 10);
    let ipt = |s: &[kubeproxy::Svc]| kubeproxy::iptables_restore(s, &node);
    let nft = |s: &[kubeproxy::Svc]| kubeproxy::nft_script(s, &node);
    let iptables_rules = ipt(&svcs).lines().filter(|l| l.starts_with("-A ")).count();
    let big = n > 1_000;
    let iptables_legacy = sync(
        &mut svcs,
        "iptables-legacy-restore",
        &["--noflush"],
        ipt,
        None,
        samples,
    );
    let iptables_nft = if big {
        Sync::default()
    } else {
        sync(
            &mut svcs,
            "iptables-nft-restore",
            &["--noflush"],
            ipt,
            None,
            samples,
        )
    };
    let known = e2e.and_then(|e| e.load_s(e2e::Datapath::Nftables, n));
    let nftables = sync(
        &mut svcs,
        "nft",
        &["-f", "-"],
        nft,
        known,
        if big { 0 } else { samples },
    );
    RulesRun {
        services: n,
        iptables_rules,
        iptables_legacy,
        iptables_nft,
        nftables,
    }
}

pub fn run(quick: bool, e2e: Option<&e2e::Results>, progress: &mut Progress) -> Results {
    let sizes: &[usize] = if quick { &[100] } else { &[1_000, 10_000] };
    let mut agent = Vec::new();
    for &n in sizes {
        progress.step(&format!("control plane: agent full sync of {n} Services"));
        agent.push(agent_run(n));
    }
    let n = *sizes.last().unwrap();
    let count = if quick { 20 } else { 200 };
    progress.step(&format!(
        "control plane: {count} EndpointSlice changes among {n} Services"
    ));
    let (lat, writes) = changes(n, count);
    let mut rules = Vec::new();
    for &n in sizes {
        progress.step(&format!(
            "control plane: kube-proxy iptables-restore and nft -f of {n} Services"
        ));
        rules.push(rules_run(n, if quick { 2 } else { 3 }, e2e));
    }
    Results {
        agent,
        change_ms: (percentile(&lat, 0.5), percentile(&lat, 0.99)),
        changes: count,
        change_writes: (percentile(&writes, 0.5), *writes.last().unwrap()),
        change_services: n,
        rules,
    }
}

fn secs(s: Option<f64>) -> String {
    s.map_or("not run (minutes here)".into(), |s| format!("{s:.2} s"))
}

fn change(s: &Sync) -> String {
    if s.samples == 0 {
        return "a full sync (as above)".into();
    }
    format!("{:.2} / {:.2} s", s.change_s.0, s.change_s.1)
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| figure | this datapath | kube-proxy iptables (legacy) | kube-proxy iptables (nft backend) | kube-proxy nftables |\n|---|---|---|---|---|\n",
        );
        for (a, r) in self.agent.iter().zip(&self.rules) {
            s += &format!(
                "| {} Services x 10 endpoints: start to all in the datapath | {:.2} s (agent start, read, parse, translate, write; of it translate {:.2} s, write {:.2} s) | {} (iptables-restore, {} rules) | {} | {} (nft -f) |\n",
                super::thousands(a.services),
                a.full_sync_s,
                a.translate_s,
                a.write_s,
                secs(r.iptables_legacy.first_s),
                super::thousands(r.iptables_rules),
                secs(r.iptables_nft.first_s),
                secs(r.nftables.first_s),
            );
        }
        for r in &self.rules {
            let ours = if r.services == self.change_services {
                format!(
                    "{:.3} / {:.3} ms (p50 / p99 over {}; {} / {} map writes)",
                    self.change_ms.0,
                    self.change_ms.1,
                    self.changes,
                    self.change_writes.0,
                    self.change_writes.1
                )
            } else {
                String::new()
            };
            s += &format!(
                "| one EndpointSlice change among {} Services to the datapath, p50 / worst | {ours} | {} | {} | {} |\n",
                super::thousands(r.services),
                change(&r.iptables_legacy),
                if r.iptables_nft.first_s.is_some() {
                    change(&r.iptables_nft)
                } else {
                    "not run".into()
                },
                change(&r.nftables),
            );
        }
        for a in &self.agent {
            s += &format!(
                "| agent peak RSS (VmHWM), {} Services | {:.1} MiB | | | |\n",
                super::thousands(a.services),
                a.peak_rss_kib as f64 / 1024.0
            );
        }
        s
    }
}

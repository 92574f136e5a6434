//! End to end through a ClusterIP and a NodePort: the same namespaces, the
//! same nginx backends and the same client (wrk) for every datapath, one
//! after the other in one run:
//!
//! - `direct`: the client sends to a pod address (no Service: the floor);
//! - `lb`: this datapath (socket programs for the ClusterIP client pod, tc
//!   on the node's device for NodePort), the real agent on a folder;
//! - `iptables` and `nftables`: kube-proxy's rule sets for the same
//!   Services (`kubeproxy.rs`, recreated from its source), loaded into the
//!   node's namespace with `iptables-legacy-restore` (x_tables: the
//!   backend whose full sync finishes at 10,000 Services; iptables-nft
//!   needs over 6 minutes there, see `control`) and `nft -f`.
//!
//! ```text
//!   client 172.18.0.10 ── eth0 ─ node 172.18.0.2 ─ br0 10.244.1.1 ── pod 10.244.1.11 (nginx :8080)
//!   client pod 10.244.2.10 ── vcpod 10.244.2.1 (routed, as Calico wires pods)
//! ```
//!
//! The Service the clients use sits in the middle of kube-proxy's chains
//! (`cluster::target_index`), with the one nginx pod as its endpoint; the
//! others have 10 unreachable endpoints each and only fill the tables.

use std::{net::Ipv4Addr, process::Stdio, time::Instant};

use super::{Progress, agent, cluster, control::kube_proxy_node};
use crate::{
    guard::{Bpffs, Cgroup, Netns, Proc, unique},
    kubeproxy,
    topo::{ip, veth},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 10);
/// One backend: the direct floor and every datapath then reach the same
/// single nginx, so the difference is the datapath alone (four backends on
/// two cores would measure their competition, and the floor could only hit
/// one of them). The backend choice itself is in the per-packet part.
const PODS: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Datapath {
    Direct,
    Lb,
    /// The same with `--xdp native` on the node's device: NodePort
    /// packets are translated in the driver.
    LbXdp,
    Iptables,
    Nftables,
}

impl Datapath {
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to the pod (floor)",
            Self::Lb => "this datapath (eBPF)",
            Self::LbXdp => "this datapath, XDP on the device",
            Self::Iptables => "kube-proxy iptables (legacy)",
            Self::Nftables => "kube-proxy nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    ClusterIp,
    NodePort,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP (from a pod)",
            Self::NodePort => "NodePort (from outside)",
        }
    }
}

/// What wrk measured for one datapath, size and frontend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Measure {
    /// Requests per second on kept-alive connections (16 connections).
    pub keepalive_rps: f64,
    /// New connections per second (one request each, 16 at a time).
    pub new_conn_per_s: f64,
    /// Latency of one request at a time on a kept-alive connection, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Socket errors and non-2xx answers over the three runs.
    pub errors: u64,
}

pub struct Row {
    pub datapath: Datapath,
    pub via: Via,
    pub services: usize,
    pub m: Measure,
}

pub struct Results {
    pub sizes: Vec<usize>,
    pub seconds: u64,
    pub rounds: usize,
    pub rows: Vec<Row>,
    /// How long loading each rule set took (kube-proxy's first full sync):
    /// (datapath, Services, seconds).
    pub loads: Vec<(Datapath, usize, f64)>,
}

/// The namespaces, the nginx backends, and the cgroup the client pod's
/// processes run in. Everything goes when it drops.
struct Bench {
    node: Netns,
    client: Netns,
    cpod: Netns,
    pods: Vec<Netns>,
    cgroup: Cgroup,
    work: std::path::PathBuf,
    servers: Vec<Proc>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn sysctl(ns: &Netns, kv: &str) {
    ns.run(&["sysctl", "-qw", kv]);
}

impl Bench {
    fn new() -> Self {
        let node = Netns::new("bnd");
        let client = Netns::new("bcl");
        let cpod = Netns::new("bcp");
        veth(&client, "eth0", &node, "eth0");
        ip(
            &node,
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"],
        );
        ip(
            &client,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
        );
        // Only the direct floor uses this route (pods are not reachable
        // from outside in a real cluster).
        ip(
            &client,
            &["route", "add", "10.244.0.0/16", "via", &NODE_IP.to_string()],
        );
        veth(&cpod, "eth0", &node, "vcpod");
        ip(&node, &["addr", "add", "10.244.2.1/24", "dev", "vcpod"]);
        ip(&cpod, &["addr", "add", "10.244.2.10/24", "dev", "eth0"]);
        ip(&cpod, &["route", "add", "default", "via", "10.244.2.1"]);
        ip(&node, &["link", "add", "br0", "type", "bridge"]);
        ip(&node, &["addr", "add", "10.244.1.1/24", "dev", "br0"]);
        ip(&node, &["link", "set", "br0", "up"]);
        sysctl(&node, "net.ipv4.ip_forward=1");
        let work = std::env::temp_dir().join(unique("be"));
        std::fs::create_dir_all(&work).unwrap();
        let mut b = Self {
            node,
            client,
            cpod,
            pods: vec![],
            cgroup: Cgroup::new(),
            work,
            servers: vec![],
        };
        for ns in [&b.client, &b.cpod] {
            sysctl(ns, "net.ipv4.ip_local_port_range=1024 65000");
            sysctl(ns, "net.ipv4.tcp_tw_reuse=1");
        }
        for i in 1..=PODS {
            let ns = Netns::new("bpo");
            let host_if = format!("veth{i}");
            veth(&ns, "eth0", &b.node, &host_if);
            ip(&b.node, &["link", "set", &host_if, "master", "br0"]);
            ip(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("10.244.1.{}/24", 10 + i),
                    "dev",
                    "eth0",
                ],
            );
            ip(&ns, &["route", "add", "default", "via", "10.244.1.1"]);
            let server = b.nginx(&ns, i);
            b.servers.push(server);
            b.pods.push(ns);
        }
        for ns in &b.pods {
            crate::topo::Topology::wait_listening(&ns.name, 8080);
        }
        b
    }

    /// nginx in `ns` on 8080, one process (no master: killing it by its
    /// PID leaves nothing behind), answering every request with its name.
    fn nginx(&self, ns: &Netns, i: usize) -> Proc {
        let dir = self.work.join(format!("nginx-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000000;\n  server {{\n    listen 8080 backlog=4096;\n    location / {{ return 200 \"pod-{i}\\n\"; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = ns
            .command("nginx")
            .args(["-c", &path.display().to_string(), "-p", &d.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        Proc(child)
    }

    /// wrk from the client pod (in the cgroup the socket programs see), or
    /// from the outside client.
    fn wrk(&self, via: Via, args: &[&str]) -> String {
        let mut cmd = match via {
            Via::ClusterIp => {
                let mut inner = vec![format!("--net=/run/netns/{}", self.cpod.name), "wrk".into()];
                inner.extend(args.iter().map(|s| s.to_string()));
                let refs: Vec<&str> = inner.iter().map(String::as_str).collect();
                self.cgroup.command("nsenter", &refs)
            }
            Via::NodePort => {
                let mut c = self.client.command("wrk");
                c.args(args);
                c
            }
        };
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("wrk (apt-get install wrk)");
        assert!(
            out.status.success(),
            "wrk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The three runs against `url`.
    fn measure(&self, via: Via, url: &str, seconds: u64) -> Measure {
        let d = format!("{seconds}s");
        let keep = parse_wrk(&self.wrk(via, &["-t1", "-c16", &format!("-d{d}"), url]));
        let new = parse_wrk(&self.wrk(
            via,
            &[
                "-t1",
                "-c16",
                &format!("-d{d}"),
                "-H",
                "Connection: close",
                url,
            ],
        ));
        let lat = parse_wrk(&self.wrk(via, &["-t1", "-c1", &format!("-d{d}"), "--latency", url]));
        Measure {
            keepalive_rps: keep.rps,
            new_conn_per_s: new.rps,
            p50_us: lat.p50_us,
            p99_us: lat.p99_us,
            errors: keep.errors + new.errors + lat.errors,
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

fn duration_us(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(0.0) * mult
}

/// The figures of wrk's text report.
pub fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk::default();
    for l in out.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_us = duration_us(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_us = duration_us(v);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    w
}

/// The Services, with the target's endpoints being the nginx pods.
fn services(n: usize) -> (Vec<kubeproxy::Svc>, usize) {
    let mut svcs = cluster::services(n, 10);
    let t = cluster::target_index(n);
    svcs[t].endpoints = (1..=PODS)
        .map(|i| (Ipv4Addr::new(10, 244, 1, 10 + i as u8), 8080))
        .collect();
    (svcs, t)
}

/// Feeds `text` to `program args` inside `ns`; how long it took.
pub fn load_into(ns: &Netns, program: &str, args: &[&str], text: &str) -> f64 {
    use std::io::Write;
    let t = Instant::now();
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// One datapath at one size, set up in namespaces of its own (so all of them
/// can stand side by side and be measured in turns).
struct Setup {
    dp: Datapath,
    bench: Bench,
    bpffs: Bpffs,
    agent: Option<Proc>,
    urls: [String; 2],
    load_s: f64,
}

impl Setup {
    fn new(dp: Datapath, n: usize, progress: &mut Progress) -> Self {
        progress.step(&format!(
            "end to end: setting up {} with {} Services",
            dp.label(),
            super::thousands(n)
        ));
        let bench = Bench::new();
        let (svcs, t) = services(n);
        let target = &svcs[t];
        let node_port = target.node_port.expect("target has a NodePort");
        let bpffs = Bpffs::new();
        if dp == Datapath::LbXdp {
            // The client puts whole checksums on what it sends, as a
            // wire delivers them (an XDP program cannot see a checksum
            // left to offload: see the README's XDP section).
            bench.client.run(&["ethtool", "-K", "eth0", "tx", "off"]);
        }
        let devices: &[&str] = match dp {
            Datapath::LbXdp => &["--devices", "eth0", "--xdp", "native"],
            _ => &["--devices", "eth0"],
        };
        let agent = matches!(dp, Datapath::Lb | Datapath::LbXdp).then(|| {
            let (proc, _) = agent::start(
                &bench.node,
                &bench.work,
                &svcs,
                &bpffs.pins(),
                &bench.cgroup.path,
                devices,
                |_| {},
            );
            proc
        });
        if dp == Datapath::LbXdp {
            let modes = agent::xdp_modes(&bpffs.pins());
            assert_eq!(modes, ["native"], "XDP in the driver on eth0");
        }
        let load_s = match dp {
            Datapath::Iptables => load_into(
                &bench.node,
                "iptables-legacy-restore",
                &["--noflush"],
                &kubeproxy::iptables_restore(&svcs, &kube_proxy_node()),
            ),
            Datapath::Nftables => load_into(
                &bench.node,
                "nft",
                &["-f", "-"],
                &kubeproxy::nft_script(&svcs, &kube_proxy_node()),
            ),
            _ => 0.0,
        };
        let urls = match dp {
            Datapath::Direct => [
                "http://10.244.1.11:8080/".to_string(),
                "http://10.244.1.11:8080/".to_string(),
            ],
            _ => [
                format!("http://{}:{}/", target.cluster_ip, target.port),
                format!("http://{NODE_IP}:{node_port}/"),
            ],
        };
        // Warm-up: caches, neighbours, the first flows.
        for (via, url) in VIAS.iter().zip(&urls) {
            bench.wrk(*via, &["-t1", "-c4", "-d1s", url]);
        }
        Self {
            dp,
            bench,
            bpffs,
            agent,
            urls,
            load_s,
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            agent::stop(a, &self.bpffs.pins());
        }
    }
}

const VIAS: [Via; 2] = [Via::ClusterIp, Via::NodePort];
pub const DATAPATHS: [Datapath; 5] = [
    Datapath::Direct,
    Datapath::Lb,
    Datapath::LbXdp,
    Datapath::Iptables,
    Datapath::Nftables,
];

/// Median of each figure over the rounds.
fn median_of(ms: &[Measure]) -> Measure {
    let med = |f: &dyn Fn(&Measure) -> f64| super::packet::median(ms.iter().map(f).collect());
    Measure {
        keepalive_rps: med(&|m| m.keepalive_rps),
        new_conn_per_s: med(&|m| m.new_conn_per_s),
        p50_us: med(&|m| m.p50_us),
        p99_us: med(&|m| m.p99_us),
        errors: ms.iter().map(|m| m.errors).sum(),
    }
}

pub fn run(quick: bool, progress: &mut Progress) -> Results {
    let (sizes, seconds, rounds): (Vec<usize>, u64, usize) = if quick {
        (vec![10], 1, 1)
    } else {
        (vec![1, 1_000, 10_000], 1, 4)
    };
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    for &n in &sizes {
        // All side by side, measured in turns, so a drift of the
        // machine (other tenants, frequency) touches each alike.
        let setups: Vec<Setup> = DATAPATHS
            .iter()
            .map(|dp| Setup::new(*dp, n, progress))
            .collect();
        let mut got: Vec<[Vec<Measure>; 2]> = vec![[vec![], vec![]]; setups.len()];
        for r in 0..rounds {
            progress.step(&format!(
                "end to end: {} Services, round {} of {rounds}",
                super::thousands(n),
                r + 1
            ));
            for (i, s) in setups.iter().enumerate() {
                for (k, via) in VIAS.iter().enumerate() {
                    got[i][k].push(s.bench.measure(*via, &s.urls[k], seconds));
                }
            }
        }
        for (s, g) in setups.iter().zip(&got) {
            for (k, via) in VIAS.iter().enumerate() {
                rows.push(Row {
                    datapath: s.dp,
                    via: *via,
                    services: n,
                    m: median_of(&g[k]),
                });
            }
            if matches!(s.dp, Datapath::Iptables | Datapath::Nftables) {
                loads.push((s.dp, n, s.load_s));
            }
        }
    }
    Results {
        sizes,
        seconds,
        rounds,
        rows,
        loads,
    }
}

impl Results {
    pub fn load_s(&self, dp: Datapath, n: usize) -> Option<f64> {
        self.loads
            .iter()
            .find(|l| l.0 == dp && l.1 == n)
            .map(|l| l.2)
    }

    pub fn get(&self, dp: Datapath, via: Via, n: usize) -> Option<&Measure> {
        self.rows
            .iter()
            .find(|r| r.datapath == dp && r.via == via && r.services == n)
            .map(|r| &r.m)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for via in [Via::ClusterIp, Via::NodePort] {
            s += &format!(
                "\n**{}** (wrk; each figure the median of {} rounds of {} s, the datapaths measured in turns; new connections: one request each, 16 at a time; keep-alive: 16 connections; latency: one request at a time)\n\n",
                via.label(),
                self.rounds,
                self.seconds
            );
            s += "| datapath | Services | new connections/s | requests/s kept alive | latency p50 (µs) | latency p99 (µs) | vs floor (new conn/s) | errors |\n|---|---|---|---|---|---|---|---|\n";
            for &n in &self.sizes {
                let floor = self
                    .get(Datapath::Direct, via, n)
                    .map_or(0.0, |m| m.new_conn_per_s);
                for dp in DATAPATHS {
                    let Some(m) = self.get(dp, via, n) else {
                        continue;
                    };
                    let ratio = if floor > 0.0 {
                        m.new_conn_per_s / floor
                    } else {
                        0.0
                    };
                    s += &format!(
                        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} |\n",
                        dp.label(),
                        super::thousands(n),
                        m.new_conn_per_s,
                        m.keepalive_rps,
                        m.p50_us,
                        m.p99_us,
                        ratio,
                        m.errors
                    );
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_reports() {
        let out = "Running 3s test @ http://10.96.3.242:80/\n  1 threads and 1 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency    61.20us   20.01us   1.21ms   93.10%\n    Req/Sec    15.90k   512.10    16.62k    70.00%\n  Latency Distribution\n     50%   57.00us\n     75%   62.00us\n     90%   71.00us\n     99%    1.10ms\n  47466 requests in 3.00s, 7.56MB read\n  Socket errors: connect 0, read 3, write 0, timeout 1\nRequests/sec:  15821.33\nTransfer/sec:      2.52MB\n";
        let w = parse_wrk(out);
        assert_eq!(
            w,
            Wrk {
                rps: 15821.33,
                p50_us: 57.0,
                p99_us: 1100.0,
                errors: 4
            }
        );
    }
}

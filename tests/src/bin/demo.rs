//! The demo: a node, three pods with HTTP servers, an outside client and a
//! server outside the cluster, all in network namespaces; Kubernetes YAML in
//! a folder; the real `lbctl agent` keeping the real datapath in sync; real
//! requests. Prints only what happened, then removes everything it made.

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_tests::{
    guard::{Bpffs, sweep, unique},
    require_root,
    topo::{self, Agent, CLIENT_IP, EXT_IP, NODE_IP, NODE_NAME, Topology},
};

const WEB: &str = r#"# A Deployment's Service, as a tutorial would write it.
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: NodePort
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
    nodePort: 30080
---
# What the EndpointSlice controller writes for it: port named like the
# Service port, number resolved from the pods' container port "http".
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-7x2kq
  namespace: demo
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["10.244.1.11"]
  conditions: {ready: true}
  nodeName: NODE
- addresses: ["10.244.1.12"]
  conditions: {ready: true}
  nodeName: NODE
- addresses: ["10.244.1.13"]
  conditions: {ready: true}
  nodeName: NODE
"#;

const LEGACY: &str = r#"# A service outside the cluster: a Service without selector and the
# Endpoints object written by hand (the classic pattern).
apiVersion: v1
kind: Service
metadata:
  name: legacy-api
spec:
  clusterIP: 10.96.0.20
  ports:
  - port: 80
---
apiVersion: v1
kind: Endpoints
metadata:
  name: legacy-api
subsets:
- addresses:
  - ip: EXT
  ports:
  - port: 8000
"#;

fn main() -> Result<()> {
    require_root();
    sweep();
    let lbctl = topo::lbctl_binary();
    println!("== Building the topology (network namespaces)");
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let ext_ns = t.ext.name.clone();
    t.http_server(&ext_ns, 8000, "legacy-api at 192.168.0.10");
    Topology::wait_listening(&ext_ns, 8000);
    println!(
        "   node    {NODE_NAME}: eth0 {NODE_IP} (outside), eth1 192.168.0.1, br0 10.244.1.1 (pods)"
    );
    for p in &t.pods {
        println!(
            "   {}   {}: HTTP server on :8080 answering with its name",
            p.name, p.ip
        );
    }
    println!("   client  {CLIENT_IP}: outside the cluster");
    println!("   legacy  {EXT_IP}:8000: HTTP server outside the cluster");

    let work = std::env::temp_dir().join(unique("dm"));
    let manifests = work.join("manifests");
    fs::create_dir_all(&manifests)?;
    fs::write(manifests.join("web.yaml"), WEB.replace("NODE", NODE_NAME))?;
    fs::write(
        manifests.join("legacy-api.yaml"),
        LEGACY.replace("EXT", &EXT_IP.to_string()),
    )?;
    println!("\n== Manifests in {}", manifests.display());
    println!(
        "   web.yaml         Service demo/web (NodePort 30080, ClusterIP 10.96.0.10) + EndpointSlice (3 pods)"
    );
    println!(
        "   legacy-api.yaml  Service default/legacy-api (no selector, ClusterIP 10.96.0.20) + Endpoints {EXT_IP}:8000"
    );

    let bpffs = Bpffs::new();
    let pins = bpffs.pins();
    println!("\n== Starting lbctl agent in the node namespace");
    println!(
        "   lbctl agent --manifests {} --bpffs {} --cgroup {} --node-name {NODE_NAME} --node-ip {NODE_IP} --devices eth0",
        manifests.display(),
        pins.display(),
        t.cgroup.path.display()
    );
    let mut agent = Agent::start(
        &lbctl,
        &t.node,
        &manifests,
        &pins,
        &t.cgroup.path,
        &work.join("agent.log"),
    );
    wait_programmed(&lbctl, &pins, 2)?;

    let result = requests(&t, &lbctl, &pins);
    let np = format!("{NODE_IP}:30080");
    let views: [&[&str]; 8] = [
        &["services"],
        &["backends", "demo/web:http"],
        &["conntrack", "--client", "172.18.0.10"],
        &["counters"],
        // A packet from outside on a port no request used yet: the real
        // program's answer for a new flow.
        &["explain", "--src", "172.18.0.10:40000", "--dst", &np],
        &[
            "explain",
            "--src",
            "172.18.0.10:40000",
            "--dst",
            "172.18.0.2:22",
        ],
        // A pod's socket by its cookie (SO_COOKIE; here a made-up one).
        &["explain", "--cookie", "4242", "--dst", "10.96.0.10:80"],
        &["status"],
    ];
    for args in views {
        println!("\n== lbctl {}", args.join(" "));
        // In the node's network namespace, as from the agent's pod: explain
        // runs the packet as arriving on the node's device.
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", t.node.name))
            .arg(&lbctl)
            .args(args)
            .arg("--bpffs")
            .arg(&pins)
            .output()?;
        print!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    println!("\n== Cleaning up");
    agent.stop();
    let cleanup = Command::new(&lbctl)
        .args(["agent", "--cleanup", "--bpffs"])
        .arg(&pins)
        .output()?;
    if !cleanup.status.success() {
        bail!(
            "lbctl agent --cleanup failed: {}",
            String::from_utf8_lossy(&cleanup.stderr)
        );
    }
    let _ = fs::remove_dir_all(&work);
    drop(t);
    drop(bpffs);
    println!("   agent stopped, attachments and maps removed, namespaces deleted");
    result
}

/// Waits until the agent has programmed `services` service ports.
fn wait_programmed(lbctl: &std::path::Path, pins: &std::path::Path, services: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(lbctl)
            .args(["services", "-o", "json", "--bpffs"])
            .arg(pins)
            .output()?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if v.as_array().is_some_and(|a| a.len() >= services) {
                println!("   agent synced: {services} service ports in the maps");
                return Ok(());
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent did not program the maps within 20s")
}

fn report(
    title: &str,
    n: usize,
    mut request: impl FnMut() -> Result<String, String>,
) -> Result<()> {
    println!("\n== {title}");
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for i in 1..=n {
        match request() {
            Ok(body) => {
                println!("   request {i}: answered by {body}");
                *by_backend.entry(body).or_default() += 1;
            }
            Err(e) => {
                println!("   request {i}: FAILED ({e})");
                failed += 1;
            }
        }
    }
    let summary: Vec<String> = by_backend
        .iter()
        .map(|(b, c)| format!("{b} x{c}"))
        .collect();
    println!("   {} of {n} answered: {}", n - failed, summary.join(", "));
    if failed > 0 {
        bail!("{failed} of {n} requests failed: {title}");
    }
    Ok(())
}

fn requests(t: &Topology, _lbctl: &std::path::Path, _pins: &std::path::Path) -> Result<()> {
    let pod1 = t.pod("pod-1");
    let curl_in_pod = |url: &str| {
        let args = topo::curl_args(url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        topo::curl(t.in_pod_cgroup(&pod1.ns, "curl", &refs))
    };
    report(
        "pod-1 -> http://10.96.0.10 (ClusterIP of demo/web, translated at connect())",
        9,
        || curl_in_pod("http://10.96.0.10/"),
    )?;
    report(
        &format!(
            "client {CLIENT_IP} -> http://{NODE_IP}:30080 (NodePort of demo/web, translated per packet)"
        ),
        9,
        || {
            let mut c = t.client.command("curl");
            c.args(topo::curl_args(&format!("http://{NODE_IP}:30080/")));
            topo::curl(c)
        },
    )?;
    report(
        "pod-1 -> http://10.96.0.20 (Service without selector -> Endpoints 192.168.0.10:8000)",
        3,
        || curl_in_pod("http://10.96.0.20/"),
    )
}

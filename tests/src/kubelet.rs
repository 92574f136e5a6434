//! What a kubelet does for the pods the tests need, until real kubelets
//! run here: a pod the API server has bound to one of the test's nodes gets
//! a network namespace on that node's pod bridge, a real HTTP server on
//! each TCP containerPort (answering the pod's name), and a status written
//! through the status subresource (podIP, Running, Ready) exactly as a
//! kubelet writes it. A pod being deleted is stopped and then removed with
//! grace period 0, as a kubelet confirms a deletion, after serving on for
//! five seconds (what a preStop sleep gives a real app). The EndpointSlices
//! that follow are the real endpointslice controller's.
//!
//! The test drives it (`sync`, `wait_ready`): no thread, so every step a
//! test asserts on has happened when it returns.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    controlplane::{ControlPlane, now},
    guard::{Netns, Proc, unique},
    topo::{self, NODE_B_IP, NODE_B_NAME, NODE_IP, NODE_NAME, Topology},
};

/// A pod this harness runs.
pub struct RunningPod {
    pub ip: Ipv4Addr,
    pub node: String,
    pub ns: Netns,
    _servers: Vec<Proc>,
}

#[derive(Default)]
pub struct Kubelets {
    /// By pod UID (a recreated pod of the same name is another pod).
    pods: BTreeMap<String, RunningPod>,
    /// Pod names by UID, for lookups by name.
    names: BTreeMap<String, String>,
    next_host: [u8; 2],
    /// Pods being deleted, since when.
    terminating: BTreeMap<String, Instant>,
}

/// How long a deleted pod's servers go on answering (a preStop sleep).
/// Five seconds: with two, a loaded CI machine's endpointslice controller
/// and agent sometimes learnt of the deletion after the pod had stopped,
/// and one new connection of e2e_cluster's disruption test timed out
/// (twice in fresh-clone runs, never alone).
const DRAIN: Duration = Duration::from_secs(5);

/// Node name -> (index of its pod network, its address).
fn node_of(name: &str) -> Option<(usize, Ipv4Addr)> {
    match name {
        NODE_NAME => Some((0, NODE_IP)),
        NODE_B_NAME => Some((1, NODE_B_IP)),
        _ => None,
    }
}

impl Kubelets {
    pub fn new() -> Self {
        Self::default()
    }

    /// One pass over the pods bound to the test's nodes: start new ones,
    /// stop and remove deleted ones. Returns how many run.
    pub fn sync(&mut self, cp: &ControlPlane, topo: &Topology) -> usize {
        let list = cp.get_json(&["pods", "-A"]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let mut seen = Vec::new();
        for pod in &items {
            let uid = pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
            let Some((net, node_ip)) = node_of(node) else {
                continue;
            };
            let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            if !pod["metadata"]["deletionTimestamp"].is_null() {
                // The endpointslice controller marks a deleted pod's
                // endpoint terminating at once; its containers serve on
                // for DRAIN (as a preStop sleep lets a real app), then
                // stop, and the deletion is confirmed.
                let since = *self
                    .terminating
                    .entry(uid.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() < DRAIN {
                    seen.push(uid);
                    continue;
                }
                self.terminating.remove(&uid);
                self.pods.remove(&uid);
                self.names.remove(&uid);
                let _ = cp.kubectl(&[
                    "delete",
                    "pod",
                    name,
                    "-n",
                    namespace,
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ]);
                continue;
            }
            seen.push(uid.clone());
            if self.pods.contains_key(&uid) {
                continue;
            }
            let running = self.run_pod(topo, pod, net, node);
            let ip = running.ip;
            self.pods.insert(uid.clone(), running);
            self.names.insert(uid, format!("{namespace}/{name}"));
            set_status(cp, namespace, name, pod, ip, node_ip, true);
        }
        // Pods gone from the API (deleted with grace 0 by someone else).
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !seen.contains(u))
            .cloned()
            .collect();
        for u in gone {
            self.pods.remove(&u);
            self.names.remove(&u);
        }
        self.pods.len()
    }

    fn run_pod(&mut self, topo: &Topology, pod: &Value, net: usize, node: &str) -> RunningPod {
        let node_ns = if net == 0 { &topo.node } else { &topo.node_b };
        // 10.244.<1|2>.100 and up: the static pods of Topology use .11+.
        self.next_host[net] += 1;
        let host = 99 + self.next_host[net];
        let ip = Ipv4Addr::new(10, 244, net as u8 + 1, host);
        let gw = Ipv4Addr::new(10, 244, net as u8 + 1, 1);
        let ns = Netns::new("kp");
        let host_if = unique("kv");
        let host_if = &host_if[host_if.len().saturating_sub(15)..];
        topo::veth(&ns, "eth0", node_ns, host_if);
        topo::ip(node_ns, &["link", "set", host_if, "master", "br0"]);
        topo::ip(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        topo::ip(&ns, &["route", "add", "default", "via", &gw.to_string()]);
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            for p in c["ports"].as_array().into_iter().flatten() {
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                if let (Some(port), "TCP") = (p["containerPort"].as_u64(), proto) {
                    servers.push(topo::http_server(&ns.name, port as u16, name));
                    ports.push(port as u16);
                }
            }
        }
        for port in ports {
            Topology::wait_listening(&ns.name, port);
        }
        RunningPod {
            ip,
            node: node.to_string(),
            ns,
            _servers: servers,
        }
    }

    /// Syncs until `n` pods matching `selector` in `namespace` are Ready.
    pub fn wait_ready(
        &mut self,
        cp: &ControlPlane,
        topo: &Topology,
        namespace: &str,
        selector: &str,
        n: usize,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = 0;
        while Instant::now() < deadline {
            self.sync(cp, topo);
            let list = cp.get_json(&["pods", "-n", namespace, "-l", selector]);
            let ready = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && is_ready(p))
                .count();
            let total = list["items"].as_array().map_or(0, Vec::len);
            if ready == n && total == n {
                return;
            }
            last = total;
            thread::sleep(Duration::from_millis(100));
        }
        let pods = cp.kubectl(&["get", "pods", "-n", namespace, "-l", selector, "-o", "wide"]);
        panic!(
            "{namespace}/{selector}: wanted {n} ready pods, {last} exist:\n{}\n--- kube-scheduler:\n{}",
            String::from_utf8_lossy(&pods.stdout),
            cp.log_tail("kube-scheduler")
        );
    }

    /// The running pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> &RunningPod {
        let key = format!("{namespace}/{name}");
        let uid = self
            .names
            .iter()
            .find(|(_, n)| **n == key)
            .map(|(u, _)| u)
            .unwrap_or_else(|| panic!("pod {key} does not run"));
        &self.pods[uid]
    }

    /// Names (namespace/name) of running pods.
    pub fn running(&self) -> Vec<String> {
        self.names.values().cloned().collect()
    }

    /// Flips a pod's readiness, as a kubelet does when a readiness probe
    /// starts failing or passes again.
    pub fn set_ready(&self, cp: &ControlPlane, namespace: &str, name: &str, ready: bool) {
        let pod = cp.get_json(&["pod", name, "-n", namespace]);
        let running = self.pod(namespace, name);
        let node_ip = node_of(&running.node).map(|n| n.1).expect("node");
        set_status(cp, namespace, name, &pod, running.ip, node_ip, ready);
    }
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The status a kubelet writes for a running pod.
fn set_status(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    pod: &Value,
    ip: Ipv4Addr,
    node_ip: Ipv4Addr,
    ready: bool,
) {
    let t = now();
    let flag = if ready { "True" } else { "False" };
    let containers: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({
                "name": c["name"], "image": c["image"], "imageID": "",
                "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": t}},
            })
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": node_ip.to_string(), "hostIPs": [{"ip": node_ip.to_string()}],
        "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
        "startTime": t,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
            {"type": "Ready", "status": flag, "lastTransitionTime": t},
        ],
        "containerStatuses": containers,
    }});
    cp.kubectl_ok(&[
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

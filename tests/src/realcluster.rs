//! The test topology (nodes, pods, an outside client, hosts outside the
//! cluster, all in network namespaces) with a real control plane on its
//! LAN, the nodes registered as `v1/Node` objects, the project's own
//! manifests applied from `deploy/` with `kubectl apply -f`, and the agent
//! on each node (node-a's is the one the tests inspect) running with the
//! credentials of its own ServiceAccount.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    controlplane::{CP_IP, ControlPlane},
    guard::{Bpffs, Cgroup},
    kubelet::Kubelets,
    topo::{self, Agent, Cluster, NODE_B_IP, NODE_B_NAME, NODE_IP, NODE_NAME, Topology},
};

/// The agent on node-b: its own pins and cgroup, the same credentials.
pub struct NodeB {
    pub agent: Agent,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
}

/// The repository's deploy/ folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

pub struct RealCluster {
    /// Dropped first: pods, then the agents and topology, then the control
    /// plane.
    pub kubelets: Kubelets,
    pub node_b: NodeB,
    pub c: Cluster,
    pub cp: ControlPlane,
}

impl RealCluster {
    /// `pods_a`/`pods_b` static pods (Topology's) on node-a/node-b; pods
    /// made through the API run on either node via `kubelets`.
    pub fn start(lbctl: &Path, pods_a: usize, pods_b: usize) -> Self {
        let t = Topology::with_remote(pods_a, pods_b);
        let cp = ControlPlane::start(&t.lan, "lan0", CP_IP);
        // The control plane answers pods too (the `kubernetes` Service).
        for (net, via) in [("10.244.1.0/24", NODE_IP), ("10.244.2.0/24", NODE_B_IP)] {
            topo::ip(&cp.netns, &["route", "add", net, "via", &via.to_string()]);
        }
        cp.register_node(NODE_NAME, NODE_IP, "zone-a");
        cp.register_node(NODE_B_NAME, NODE_B_IP, "zone-b");
        // The product's own manifests, as users apply them.
        cp.kubectl_ok(&["apply", "-f", &deploy_dir().display().to_string()]);
        let mut c = Cluster::new(lbctl, t);
        let kubeconfig = c.work.join("agent.kubeconfig");
        std::fs::write(
            &kubeconfig,
            cp.service_account_kubeconfig("lb-system", "lbctl"),
        )
        .expect("write the agent's kubeconfig");
        // No --node-ip: NodePorts answer on the Node object's addresses.
        c.source = vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
            // The datapath's own records (a refused connect) in the log.
            "--datapath-logs".into(),
        ];
        c.start_agent();
        let bpffs = Bpffs::new();
        let cgroup = Cgroup::new();
        let source_b: Vec<String> = vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            NODE_B_NAME.into(),
        ];
        let agent = Agent::start_with(
            lbctl,
            &c.topo.node_b,
            &source_b,
            &bpffs.pins(),
            &cgroup.path,
            &c.work.join("agent-b.log"),
        );
        let rc = Self {
            kubelets: Kubelets::new(),
            node_b: NodeB {
                agent,
                bpffs,
                cgroup,
            },
            c,
            cp,
        };
        rc.wait_agent_ready();
        rc
    }

    /// Runs the kubelets' stand-in until `n` pods of `selector` in
    /// `namespace` are ready.
    pub fn wait_pods(&mut self, namespace: &str, selector: &str, n: usize) {
        self.kubelets
            .wait_ready(&self.cp, &self.c.topo, namespace, selector, n);
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.c.work.join("agent.kubeconfig")
    }

    /// GET on the agent's health listener in node-a: (status, body).
    pub fn agent_get(&self, path: &str) -> (u16, String) {
        topo::agent_get(&self.c.topo.node, path)
    }

    /// The value of one metric line (`name{labels}`) of the agent's
    /// /metrics, 0 when absent.
    pub fn agent_metric(&self, series: &str) -> f64 {
        let out = self
            .c
            .topo
            .node
            .command("curl")
            .args(["-s", "-m", "2", "http://127.0.0.1:10249/metrics"])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until node-a's agent (and node-b's) answer /readyz 200.
    pub fn wait_agent_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.agent_get("/readyz").0 == 200
                && topo::agent_get(&self.c.topo.node_b, "/readyz").0 == 200
            {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the agents never became ready against kube-apiserver\nnode-a's log:\n{}\nnode-b's log:\n{}",
            self.c.agent_log(),
            std::fs::read_to_string(self.c.work.join("agent-b.log")).unwrap_or_default()
        );
    }

    /// One of the Service's fields through kubectl's jsonpath.
    pub fn service_field(&self, namespace: &str, name: &str, path: &str) -> String {
        self.cp.kubectl_ok(&[
            "get",
            "service",
            name,
            "-n",
            namespace,
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    }

    /// Waits until the agent programs `ns/name` with exactly `backends`
    /// (address:port, sorted) on every port.
    /// (Backends that are ready or serving: a quarantined one, neither,
    /// is kept only for its TCP connections.)
    pub fn wait_backends(&self, service: &str, want: &[String]) {
        self.wait_backends_where(service, want, |b| b["state"] != "quarantined");
    }

    /// As `wait_backends`, counting only backends that take new flows.
    pub fn wait_backends_ready(&self, service: &str, want: &[String]) {
        self.wait_backends_where(service, want, |b| b["state"] == "active");
    }

    fn wait_backends_where(
        &self,
        service: &str,
        want: &[String],
        keep: impl Fn(&serde_json::Value) -> bool,
    ) {
        let mut want = want.to_vec();
        want.sort();
        let matches = |svcs: &[serde_json::Value]| {
            let mine: Vec<&serde_json::Value> = svcs
                .iter()
                .filter(|s| {
                    let ns = s["namespace"].as_str().unwrap_or_default();
                    let name = s["name"].as_str().unwrap_or_default();
                    format!("{ns}/{name}") == service
                })
                .collect();
            !mine.is_empty()
                && mine.iter().all(|s| {
                    let mut got: Vec<String> = s["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|b| keep(b))
                        .filter_map(|b| Some(format!("{}:{}", b["address"].as_str()?, b["port"])))
                        .collect();
                    got.sort();
                    got == want
                })
        };
        // After an API server outage a watcher may sit in its backoff
        // (kube-runtime's default, as client-go's: up to 30 s, jittered)
        // before it reconnects; give that room.
        let deadline = Instant::now() + Duration::from_secs(75);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.c.settled_services() {
                Ok(v) if v.as_array().is_some_and(|a| matches(a)) => return,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(50));
        }
        // What the API itself says, to tell a slow controller from a
        // stuck agent.
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let slices = self.cp.kubectl(&[
            "get",
            "endpointslices",
            "-n",
            ns,
            "-l",
            &format!("kubernetes.io/service-name={name}"),
            "-o",
            "yaml",
        ]);
        panic!(
            "timed out waiting for {service} -> {want:?}\nlbctl services: {last}\n\
             --- EndpointSlices in the API:\n{}\n--- agent log:\n{}\n--- kube-controller-manager:\n{}",
            String::from_utf8_lossy(&slices.stdout),
            self.c.agent_log(),
            self.cp.log_tail("kube-controller-manager"),
        );
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        // Pods first (their servers and namespaces), while the API
        // server still answers.
        self.kubelets = Kubelets::new();
        self.node_b.agent.stop();
        let _ = std::process::Command::new(&self.c.lbctl)
            .args(["agent", "--cleanup", "--bpffs"])
            .arg(self.node_b.bpffs.pins())
            .output();
    }
}

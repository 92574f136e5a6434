//! Real nodes: kubelets and containerd built from upstream run the pods,
//! kube-proxy is absent, and the agent is installed with the Helm chart as
//! the README tells users, running as the DaemonSet's pods on both nodes.
//! Traffic goes from real pods to a ClusterIP and from outside the nodes
//! to a NodePort, to backends on both nodes.

use std::{
    collections::BTreeSet,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{controlplane::CP_IP, nodes::NodeCluster, require_root, topo::lbctl_binary};

fn chart_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("charts/lbctl")
        .display()
        .to_string()
}

/// Waits for `ok`, with a deadline; `what` names it in the panic.
fn wait(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(250));
    }
}

/// The chart installed as the README's command does, with this cluster's
/// API server address and the hybrid host's cgroup v2 mount; waits for the
/// DaemonSet's pods on every node.
fn install_agent(c: &NodeCluster) {
    let out = c.helm(&[
        "install",
        "lbctl",
        &chart_dir(),
        "--namespace",
        "lb-system",
        "--create-namespace",
        "--set",
        &format!("k8sServiceHost={CP_IP}"),
        "--set",
        "k8sServicePort=6443",
        "--set",
        "cgroupRoot=/sys/fs/cgroup/unified",
    ]);
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = c.cp.kubectl(&[
        "-n",
        "lb-system",
        "rollout",
        "status",
        "daemonset/lbctl",
        "--timeout=180s",
    ]);
    if !status.status.success() {
        let pods =
            c.cp.kubectl(&["-n", "lb-system", "get", "pods", "-o", "wide"]);
        let describe = c.cp.kubectl(&["-n", "lb-system", "describe", "pods"]);
        let logs: String = c
            .nodes
            .iter()
            .map(|n| format!("--- {} kubelet:\n{}\n", n.name, n.log_tail("kubelet")))
            .collect();
        panic!(
            "the DaemonSet did not roll out: {}\n{}\n{}\n{logs}",
            String::from_utf8_lossy(&status.stderr),
            String::from_utf8_lossy(&pods.stdout),
            String::from_utf8_lossy(&describe.stdout)
        );
    }
}

const BACKENDS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      # One on each node.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: web}
      containers:
        - name: web
          image: registry.k8s.io/e2e-test-images/agnhost:2.66.1
          args: ["netexec", "--http-port=8080"]
          ports:
            - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
    - port: 80
      targetPort: 8080
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
    - name: client
      image: registry.k8s.io/e2e-test-images/agnhost:2.66.1
      args: ["pause"]
"#;

#[test]
fn the_chart_on_real_nodes_serves_cluster_ips_and_node_ports() {
    require_root();
    let c = NodeCluster::start(&lbctl_binary());
    install_agent(&c);
    c.cp.apply(BACKENDS);
    c.cp.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=web",
        "--timeout=120s",
    ]);
    c.cp.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ]);
    let svc = c.cp.get_json(&["service", "web"]);
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("nodePort");
    let pods: BTreeSet<String> =
        c.cp.kubectl_ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pods.len(), 2);

    // From a real pod to the ClusterIP: both backends answer.
    let mut seen = BTreeSet::new();
    wait("both backends behind the ClusterIP", 60, || {
        let out = c.cp.kubectl(&[
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{cluster_ip}/hostname"),
        ]);
        if out.status.success() {
            seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        seen == pods
    });

    // From outside the nodes (the control plane's namespace on the LAN) to
    // the NodePort of each node.
    for node in &c.nodes {
        let mut seen = BTreeSet::new();
        wait(
            &format!("both backends behind {}'s NodePort", node.name),
            60,
            || {
                let out = c.cp.in_netns(
                    "curl",
                    &[
                        "-s",
                        "--max-time",
                        "2",
                        &format!("http://{}:{node_port}/hostname", node.ip),
                    ],
                );
                if out.status.success() {
                    seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
                }
                seen == pods
            },
        );
    }
}

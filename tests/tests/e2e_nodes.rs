//! Real nodes: kubelets and containerd built from upstream run the pods,
//! kube-proxy is absent, and the agent is installed with the Helm chart as
//! the README tells users, running as the DaemonSet's pods on both nodes.
//! Traffic goes from real pods to a ClusterIP and from outside the nodes
//! to a NodePort, to backends on both nodes; `kubectl rollout restart` of
//! the DaemonSet under steady traffic through both loses no request.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{nodes::NodeCluster, require_root};

/// Waits for `ok`, with a deadline; `what` names it in the panic.
fn wait(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(250));
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
    // The agent's image is made from this package's lbctl (cargo builds it
    // before the tests; the lbctl package's own binary it does not).
    let mut c = NodeCluster::start(std::path::Path::new(env!("CARGO_BIN_EXE_lbctl-e2e")));
    c.install_agent();
    // The node's netfilter conntrack tuned as kube-proxy tunes it (the
    // timeouts are the node's network namespace's own; the hash size and
    // nf_conntrack_max, the machine's, are left).
    for node in &c.nodes {
        let sysctl = |name: &str| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", node.netns.name))
                .args(["cat", &format!("/proc/sys/net/netfilter/{name}")])
                .output()
                .expect("nsenter");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        wait("kube-proxy's conntrack timeouts on the node", 30, || {
            sysctl("nf_conntrack_tcp_timeout_close_wait") == "3600"
                && sysctl("nf_conntrack_tcp_timeout_established") == "86400"
        });
    }
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

    load_balancer_from_outside(&mut c, &pods);
    restart_under_traffic(&c, &cluster_ip, node_port);
    restart_the_api_server(&mut c, &cluster_ip);
}

/// The API server restarted (as upstream's "should work after restarting
/// apiserver", which needs SSH to a control-plane node): Services keep
/// working while it is down, and once it is back the agents' watches
/// resume and a new Service is forwarded.
fn restart_the_api_server(c: &mut NodeCluster, cluster_ip: &str) {
    c.cp.stop_apiserver();
    // Pods reach the ClusterIP with no API server (exec needs one: ask
    // from the node that runs the client pod, through the datapath of
    // that node's own processes).
    let node = c.node("node-a");
    let out = node
        .command(std::path::Path::new("curl"))
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://{cluster_ip}/hostname"),
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "the ClusterIP answers with the API server down"
    );
    c.cp.start_apiserver();
    c.cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: after-restart\nspec:\n  selector: {app: web}\n  ports:\n    - port: 81\n      targetPort: 8080\n",
    );
    let ip = c.cp.get_json(&["service", "after-restart"])["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    wait("the Service made after the restart", 60, || {
        c.cp.kubectl(&[
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{ip}:81/hostname"),
        ])
        .status
        .success()
    });
}

/// A Service of type LoadBalancer: the test cluster's load balancer
/// (`lb-cloud`) writes its address and routes it to the nodes; a client
/// outside the nodes reaches both backends through it; deleting the
/// Service releases the address (the cleanup finalizer is removed).
fn load_balancer_from_outside(c: &mut NodeCluster, pods: &BTreeSet<String>) {
    c.start_load_balancer(std::path::Path::new(env!("CARGO_BIN_EXE_lb-cloud")));
    c.cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-lb\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  ports:\n    - port: 80\n      targetPort: 8080\n",
    );
    let mut ip = String::new();
    wait("the load balancer's address", 60, || {
        ip = c.cp.kubectl_ok(&[
            "get",
            "service",
            "web-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        !ip.is_empty()
    });
    assert!(ip.starts_with("172.18.1."), "an address of the pool: {ip}");
    let mut seen = BTreeSet::new();
    wait("both backends behind the load balancer", 60, || {
        let out = c.cp.in_netns(
            "curl",
            &["-s", "--max-time", "2", &format!("http://{ip}/hostname")],
        );
        if out.status.success() {
            seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        seen == *pods
    });
    c.cp.kubectl_ok(&[
        "delete",
        "service",
        "web-lb",
        "--wait=true",
        "--timeout=60s",
    ]);
}

/// The names of the agent's pods, space-separated.
fn agent_pods(c: &NodeCluster) -> String {
    c.cp.kubectl_ok(&[
        "-n",
        "lb-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=lbctl",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
}

/// `kubectl rollout restart` of the agent's DaemonSet while a pod sends
/// requests to the ClusterIP and a client outside the nodes to each
/// node's NodePort, back to back: every request is answered. The old pod
/// leaves its programs and maps pinned; the new one adopts them.
fn restart_under_traffic(c: &NodeCluster, cluster_ip: &str, node_port: u64) {
    let old_pods = agent_pods(c);
    // In the pod: one line per request, the HTTP status or ERR, until
    // /tmp/stop appears.
    let mut pod_loop = c
        .cp
        .kubectl_command()
        .args([
            "exec",
            "client",
            "--",
            "bash",
            "-c",
            &format!(
                "while [ ! -e /tmp/stop ]; do curl -s -o /dev/null --max-time 2 -w '%{{http_code}}\\n' \
                 http://{cluster_ip}/hostname || echo ERR; done"
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl exec");
    let stdout = pod_loop.stdout.take().expect("stdout");
    let pod_counts = thread::spawn(move || {
        let (mut ok, mut failed) = (0u64, 0u64);
        for line in BufReader::new(stdout).lines() {
            match line.unwrap_or_default().trim() {
                "200" => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    });
    // Outside: the control plane's namespace on the LAN, each node's
    // NodePort in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_out, failed_out) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let outside = {
        let (stop, ok_out, failed_out) = (stop.clone(), ok_out.clone(), failed_out.clone());
        let netns = c.cp.netns.name.clone();
        let urls: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("http://{}:{node_port}/hostname", n.ip))
            .collect();
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{netns}"))
                    .args(["curl", "-sf", "-o", "/dev/null", "--max-time", "2"])
                    .arg(&urls[i % urls.len()])
                    .output()
                    .expect("curl");
                if out.status.success() {
                    ok_out.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed_out.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    // Traffic flows before the restart begins.
    wait("requests before the restart", 30, || {
        ok_out.load(Ordering::Relaxed) >= 5
    });
    c.cp.kubectl_ok(&["-n", "lb-system", "rollout", "restart", "daemonset/lbctl"]);
    c.rollout("lb-system", "daemonset/lbctl");
    let new_pods = agent_pods(c);
    let old: BTreeSet<&str> = old_pods.split_whitespace().collect();
    assert!(
        new_pods.split_whitespace().all(|p| !old.contains(p)),
        "every agent pod was replaced: {old_pods} -> {new_pods}"
    );
    // And after it, until the new agents have served some.
    let after = ok_out.load(Ordering::Relaxed);
    wait("requests after the restart", 30, || {
        ok_out.load(Ordering::Relaxed) >= after + 5
    });
    stop.store(true, Ordering::Relaxed);
    outside.join().expect("outside client");
    c.cp.kubectl_ok(&["exec", "client", "--", "touch", "/tmp/stop"]);
    let _ = pod_loop.wait();
    let (ok_pod, failed_pod) = pod_counts.join().expect("pod client");
    let (ok_out, failed_out) = (
        ok_out.load(Ordering::Relaxed),
        failed_out.load(Ordering::Relaxed),
    );
    eprintln!(
        "rollout restart under traffic: ClusterIP from a pod {ok_pod} answered, {failed_pod} lost; \
         NodePort from outside {ok_out} answered, {failed_out} lost"
    );
    assert!(ok_pod > 0, "the pod's requests ran");
    assert_eq!(
        failed_pod, 0,
        "requests to the ClusterIP lost during the restart"
    );
    assert_eq!(
        failed_out, 0,
        "requests to the NodePorts lost during the restart"
    );
}

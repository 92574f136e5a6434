//! End to end in network namespaces: the real agent on a manifest folder,
//! the real programs attached, real clients and servers.

use std::{
    collections::BTreeSet,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    guard::{Bpffs, sweep, unique},
    require_root,
    topo::{self, Agent, EXT_IP, NODE_IP, NODE_NAME, Topology},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: e2e, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: NODE}
- {addresses: [10.244.1.12], conditions: {ready: true}, nodeName: NODE}
- {addresses: [10.244.1.13], conditions: {ready: true}, nodeName: NODE}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: e2e}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: legacy, namespace: e2e}
subsets: [{addresses: [{ip: EXT}], ports: [{port: 8000}]}]
"#;

/// Sends one datagram to `to` from an unconnected socket and prints
/// "<sender address>:<port> <reply>", as recvfrom reports them.
const UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
data, peer = s.recvfrom(2048)
print(f"{peer[0]}:{peer[1]} {data.decode()}")
"#;

fn wait_synced(lbctl: &std::path::Path, pins: &std::path::Path, ports: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(lbctl)
            .args(["services", "-o", "json", "--bpffs"])
            .arg(pins)
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v.as_array().is_some_and(|a| a.len() >= ports) {
                return;
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("agent did not program {ports} service ports in 20s");
}

#[test]
fn services_answer_from_pods_host_and_outside() {
    require_root();
    sweep();
    let lbctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"));
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let pods: Vec<(String, String)> = t
        .pods
        .iter()
        .map(|p| (p.ns.name.clone(), p.name.clone()))
        .collect();
    for (ns, name) in &pods {
        t.udp_server(ns, 5353, name);
    }
    let ext = t.ext.name.clone();
    t.http_server(&ext, 8000, "external");
    Topology::wait_listening(&ext, 8000);

    let work = std::env::temp_dir().join(unique("e2"));
    fs::create_dir_all(&work).unwrap();
    fs::write(
        work.join("services.yaml"),
        MANIFESTS
            .replace("NODE", NODE_NAME)
            .replace("EXT", &EXT_IP.to_string()),
    )
    .unwrap();
    let bpffs = Bpffs::new();
    let pins = bpffs.pins();
    let mut agent = Agent::start(
        &lbctl,
        &t.node,
        &work,
        &pins,
        &t.cgroup.path,
        &std::env::temp_dir().join(unique("lg")),
    );
    wait_synced(&lbctl, &pins, 3);

    let pod1 = &t.pod("pod-1").ns;
    let get = |cmd: Command| topo::curl(cmd).unwrap_or_else(|e| panic!("request failed: {e}"));
    let curl_from = |ns: &lb_tests::guard::Netns, url: &str| {
        let args = topo::curl_args(url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        get(t.in_pod_cgroup(ns, "curl", &refs))
    };

    // ClusterIP from a pod reaches each of the three backends.
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(curl_from(pod1, "http://10.96.0.10/"));
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["pod-1".into(), "pod-2".into(), "pod-3".into()]),
        "ClusterIP backends reached"
    );

    // From the node itself (a host-network process in the cgroup).
    let body = curl_from(&t.node, "http://10.96.0.10/");
    assert!(body.starts_with("pod-"), "host-network client got {body:?}");

    // NodePort from outside (not in the cgroup: the per-packet path).
    let mut c = t.client.command("curl");
    c.args(topo::curl_args(&format!("http://{NODE_IP}:30080/")));
    assert!(get(c).starts_with("pod-"));

    // A Service without selector, backed by hand-written Endpoints.
    assert_eq!(curl_from(pod1, "http://10.96.0.20/"), "external");

    // UDP: the client's recvfrom shows the Service address, not the pod's.
    let reply = get(t.in_pod_cgroup(pod1, "python3", &["-c", UDP_CLIENT, "10.96.0.10", "53"]));
    let (from, body) = reply.split_once(' ').expect("reply");
    assert_eq!(
        from, "10.96.0.10:53",
        "recvfrom must report the Service address"
    );
    assert!(body.starts_with("pod-"), "{reply}");

    agent.stop();
    // Pinned: the datapath keeps forwarding with the agent gone.
    assert!(
        curl_from(pod1, "http://10.96.0.10/").starts_with("pod-"),
        "after the agent stopped"
    );
    let cleanup = Command::new(&lbctl)
        .args(["agent", "--cleanup", "--bpffs"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    let _ = fs::remove_dir_all(&work);
}

//! The inspection commands against a running agent and real traffic:
//! `lbctl explain` predicts the backend that then really answers (device
//! path: the real program on a synthetic packet; socket path: the shared
//! selection code on the socket's cookie), `lbctl backends` counts what
//! each backend served, and `lbctl status` reports the agent's sync state.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::Stdio,
};

use lb_tests::{
    guard::{Proc, sweep},
    require_root,
    topo::{self, CLIENT_IP, Cluster, NODE_IP, NODE_NAME, Topology},
};
use serde_json::Value;

fn lbctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"))
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: e2e, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.12], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.13], conditions: {ready: true}, nodeName: node-a}
"#;

/// Opens a TCP socket, prints its cookie (SO_COOKIE), waits for a line on
/// stdin, then connects to the address given and prints the HTTP body.
const COOKIE_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)
sys.stdin.readline()
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode().strip(), flush=True)
"#;

fn backend_of(v: &Value) -> String {
    format!(
        "{}:{}",
        v["backend"]["address"].as_str().unwrap(),
        v["backend"]["port"]
    )
}

#[test]
fn explain_backends_and_status_agree_with_real_traffic() {
    require_root();
    sweep();
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let pod_of: BTreeMap<String, String> = t
        .pods
        .iter()
        .map(|p| (format!("{}:8080", p.ip), p.name.clone()))
        .collect();
    let cgroup = t.cgroup.path.display().to_string();
    let mut c = Cluster::start(&lbctl(), t, &[("web.yaml", WEB)]);
    c.wait_services("e2e/web", |s| s.len() == 1);

    // The agent's record: running, synced, from this folder and cgroup.
    let status = c.wait_status("the agent's record to say ready", |s| {
        s["agent"]["ready"] == true
    });
    let agent = &status["agent"];
    assert_eq!(agent["running"], true, "{status:#}");
    assert_eq!(agent["source"], "manifests");
    assert_eq!(agent["source_location"], c.manifests.display().to_string());
    assert_eq!(agent["node"], NODE_NAME);
    assert_eq!(agent["cgroup"], cgroup);
    assert_eq!(agent["service_ports"], 1);
    assert!(agent["syncs"].as_u64().unwrap() >= 1, "{agent:#}");
    assert!(agent["writes"].as_u64().unwrap() >= 10, "{agent:#}");

    // Device path: for each client port, explain predicts a new flow's
    // backend; the request from that port is answered by that backend;
    // explain then finds the flow's entry and names the same backend.
    let dst = format!("{NODE_IP}:30080");
    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    for p in 41000..41012u16 {
        let src = format!("{CLIENT_IP}:{p}");
        let before = c.explain(&["--src", &src, "--dst", &dst]);
        assert_eq!(before["decision"], "new_flow", "{before:#}");
        assert_eq!(before["path"], "device");
        assert_eq!(before["device"], "eth0");
        assert_eq!(before["frontend"]["service"], "e2e/web");
        assert_eq!(before["frontend"]["kind"], "NodePort");
        assert_eq!(before["verdicts"][0], "forward_new", "{before:#}");
        let predicted = backend_of(&before);
        assert_eq!(before["translated_dst"], predicted, "{before:#}");

        let mut cmd = c.topo.client.command("curl");
        cmd.args(["--local-port", &p.to_string()])
            .args(topo::curl_args(&format!("http://{dst}/")));
        let body = topo::curl(cmd).unwrap_or_else(|e| panic!("GET from port {p}: {e}"));
        assert_eq!(
            Some(&body),
            pod_of.get(&predicted),
            "explain predicted {predicted} for port {p}"
        );
        *answered.entry(predicted.clone()).or_default() += 1;

        let after = c.explain(&["--src", &src, "--dst", &dst]);
        assert_eq!(after["decision"], "existing_flow", "{after:#}");
        assert_eq!(backend_of(&after), predicted, "{after:#}");
        assert!(
            after["conntrack"]["packets"].as_u64().unwrap() >= 3,
            "{after:#}"
        );
    }
    assert!(
        answered.len() >= 2,
        "12 flows over 3 backends: {answered:?}"
    );

    // explain changed nothing: its flows went to a scratch table. At most
    // the 12 real flows' two entries each: a closed flow's entries live
    // 10 s, so on a slow run the first ones may have expired already.
    let ct = c.lbctl_json(&["conntrack", "--count"]).unwrap();
    let n = ct["count"].as_u64().unwrap_or(u64::MAX);
    assert!(
        n <= 24 && n.is_multiple_of(2),
        "12 flows, two entries each, none from explain: {ct}"
    );

    // Per-backend counters: each backend's flows are exactly the requests
    // it answered; packets and bytes went up for those that served.
    let be = c.lbctl_json(&["backends", "e2e/web:http"]).unwrap();
    let rows = be[0]["backends"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{be:#}");
    for b in rows {
        let key = format!("{}:{}", b["address"].as_str().unwrap(), b["port"]);
        let want = answered.get(&key).copied().unwrap_or(0);
        assert_eq!(b["flows"].as_u64().unwrap(), want, "{key}: {be:#}");
        assert_eq!(
            b["conntrack_flows"].as_u64().unwrap(),
            want,
            "{key}: {be:#}"
        );
        assert_eq!(
            b["packets"].as_u64().unwrap() > 0,
            want > 0,
            "{key}: {be:#}"
        );
        assert_eq!(b["state"], "active");
        assert_eq!(b["ready"], true);
        assert_eq!(b["node"], NODE_NAME);
        assert_eq!(b["local"], true);
    }

    // Socket path: a pod's socket, before connect(): explain predicts from
    // its cookie; the connection is answered by that backend; explain
    // then finds the socket's translation.
    let pod1 = c.topo.pod("pod-1").ns.name.clone();
    let pod1 = &c.topo.pods.iter().find(|p| p.ns.name == pod1).unwrap().ns;
    for _ in 0..4 {
        let mut child = c
            .in_cgroup(pod1, "python3", &["-c", COOKIE_CLIENT, "10.96.0.10", "80"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python client");
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let guard = Proc(child);
        let cookie = lines.next().unwrap().unwrap();
        let before = c.explain(&["--cookie", &cookie, "--dst", "10.96.0.10:80"]);
        assert_eq!(before["decision"], "new_socket", "{before:#}");
        assert_eq!(before["path"], "socket");
        let predicted = backend_of(&before);
        writeln!(stdin, "go").unwrap();
        let body = lines.next().expect("answer").unwrap();
        assert_eq!(
            Some(&body),
            pod_of.get(&predicted),
            "explain predicted {predicted} for socket {cookie}"
        );
        let after = c.explain(&["--cookie", &cookie, "--dst", "10.96.0.10:80"]);
        assert_eq!(after["decision"], "existing_socket", "{after:#}");
        assert_eq!(backend_of(&after), predicted);
        drop(guard);
    }

    // Counters went up by exactly what was sent: 12 device-path flows and
    // 4 sockets for the Service, 12 new flows among the verdicts (the 36
    // explain runs counted in their scratch maps only).
    let svc = c.lbctl_json(&["services"]).unwrap();
    assert_eq!(svc[0]["flows"], 16, "{svc:#}");
    let verdicts = c.verdicts();
    assert_eq!(verdicts["forward_new"], 12, "{verdicts:#?}");
    assert_eq!(verdicts["sock_translated"], 4, "{verdicts:#?}");

    // Not a Service: passed untouched, by the program's own verdict.
    let other = c.explain(&["--src", "172.18.0.10:41999", "--dst", "172.18.0.2:22"]);
    assert_eq!(other["decision"], "not_a_service", "{other:#}");

    // The agent gone: the record says so, the datapath stays.
    c.agent.take().expect("agent").stop();
    let status = c.lbctl_json(&["status"]).unwrap();
    assert_eq!(status["agent"]["running"], false, "{status:#}");
    // No scratch folder of explain is left in the pin folder.
    let left: Vec<String> = std::fs::read_dir(c.pins())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("explain-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

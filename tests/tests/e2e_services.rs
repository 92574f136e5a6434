//! End to end in network namespaces: the real agent on a manifest folder,
//! the real programs attached, real clients and servers.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use lb_tests::{
    guard::{sweep, unique},
    require_root,
    topo::{self, Cluster, DevicePath, EXT_IP, NODE_B_NAME, NODE_IP, NODE_NAME, Topology},
};

fn lbctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"))
}

/// A Service (NodePort 30080 on port 80, UDP 53 as ClusterIP) over ready
/// pods.
fn web(endpoints: &[(&str, &str)]) -> String {
    let with: Vec<(&str, &str, &str)> = endpoints
        .iter()
        .map(|(a, n)| (*a, *n, "ready: true"))
        .collect();
    web_with(&with)
}

/// The same with each endpoint's conditions.
fn web_with(endpoints: &[(&str, &str, &str)]) -> String {
    let mut y = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.9]
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
"#,
    );
    for (addr, node, conditions) in endpoints {
        y +=
            &format!("- {{addresses: [{addr}], conditions: {{{conditions}}}, nodeName: {node}}}\n");
    }
    y
}

const LEGACY: &str = r#"
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

fn three_local() -> String {
    web(&[
        ("10.244.1.11", NODE_NAME),
        ("10.244.1.12", NODE_NAME),
        ("10.244.1.13", NODE_NAME),
    ])
}

fn backends_of(services: &[serde_json::Value], name: &str, port: &str) -> usize {
    services
        .iter()
        .find(|s| s["name"] == name && s["port_name"] == port)
        .and_then(|s| s["backends"].as_array())
        .map_or(0, Vec::len)
}

#[test]
fn services_answer_from_pods_host_and_outside() {
    services_answer_from_pods_host_and_outside_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn services_answer_from_pods_host_and_outside_in_xdp() {
    services_answer_from_pods_host_and_outside_on(DevicePath::Xdp);
}

fn services_answer_from_pods_host_and_outside_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(5353);
    let ext = t.ext.name.clone();
    t.http_server(&ext, 8000, "external");
    Topology::wait_listening(&ext, 8000);
    let mut c = Cluster::start_on(
        &lbctl(),
        t,
        &[
            ("web.yaml", &three_local()),
            ("legacy.yaml", &LEGACY.replace("EXT", &EXT_IP.to_string())),
        ],
        path,
    );
    c.wait_services("3 service ports", |s| s.len() == 3);
    let pod1 = &c.topo.pod("pod-1").ns;

    // ClusterIP from a pod reaches each of the three backends.
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(c.get_from_pod(pod1, "http://10.96.0.10/"));
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
    let body = c.get_from_pod(&c.topo.node, "http://10.96.0.10/");
    assert!(body.starts_with("pod-"), "host-network client got {body:?}");

    // NodePort from outside (not in the cgroup: the per-packet path).
    assert!(
        c.get_from_client(&format!("http://{NODE_IP}:30080/"))
            .starts_with("pod-")
    );

    // A Service without selector, backed by hand-written Endpoints.
    assert_eq!(c.get_from_pod(pod1, "http://10.96.0.20/"), "external");

    // UDP: the client's recvfrom shows the Service address, not the pod's.
    let reply = topo::curl(c.in_cgroup(pod1, "python3", &["-c", UDP_CLIENT, "10.96.0.10", "53"]))
        .expect("UDP request");
    let (from, body) = reply.split_once(' ').expect("reply");
    assert_eq!(
        from, "10.96.0.10:53",
        "recvfrom must report the Service address"
    );
    assert!(body.starts_with("pod-"), "{reply}");

    // What lbctl shows of it. Conntrack: the NodePort flow from the client
    // (both directions), translated to one of the pods.
    let flows = c
        .lbctl_json(&["conntrack", "--client", "172.18.0.10"])
        .unwrap();
    let flows = flows.as_array().unwrap();
    assert!(
        flows.iter().any(|f| f["direction"] == "original"
            && f["service"] == "e2e/web"
            && f["dst"] == "172.18.0.2:30080"),
        "{flows:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["direction"] == "reply" && f["nat_src"] == "172.18.0.2:30080"),
        "{flows:#?}"
    );
    let count = c
        .lbctl_json(&["conntrack", "--count", "--service", "e2e/web"])
        .unwrap();
    assert!(count["count"].as_u64().unwrap() >= 2, "{count}");
    let verdicts = c.verdicts();
    assert!(
        verdicts["forward_new"] >= 1 && verdicts["sock_translated"] >= 3,
        "{verdicts:#?}"
    );
    // The port map in force once the agent wrote it whole: the SNAT
    // range's 4,536 ports and the Services' (NodePort 30080, port 80, 53).
    let status = c.wait_status("the port map in force", |s| {
        s["datapath"]["port_map_ports"]
            .as_u64()
            .is_some_and(|n| n >= 4536 + 3)
    });
    // The node's address, known to the device path without a lookup.
    assert_eq!(
        status["datapath"]["node_addresses"],
        serde_json::json!(["172.18.0.2"]),
        "{status:#?}"
    );
    let attachments = status["attachments"].as_array().unwrap();
    assert_eq!(
        attachments.len(),
        // 8 socket hooks (IPv4 and IPv4-mapped IPv6), 2 tc on eth0, and
        // XDP there when on.
        if path == DevicePath::Xdp { 11 } else { 10 },
        "{status:#?}"
    );
    let xdp: Vec<_> = attachments
        .iter()
        .filter(|a| a["program"] == "lb_xdp_from_netdev")
        .collect();
    match path {
        DevicePath::Xdp => assert!(
            xdp.len() == 1 && xdp[0]["device"] == "eth0" && xdp[0]["xdp_mode"] == "native",
            "{status:#?}"
        ),
        // `--xdp auto` leaves a veth to tc.
        DevicePath::Tc => {
            assert!(xdp.is_empty(), "{status:#?}");
            assert!(
                c.agent_log().contains("no XDP: tc alone"),
                "{}",
                c.agent_log()
            );
        }
    }

    // XDP alone: with tc's ingress program off eth0, the NodePort still
    // answers the outside client.
    if path == DevicePath::Xdp {
        c.without_tc_ingress();
        for _ in 0..3 {
            assert!(
                c.get_from_client(&format!("http://{NODE_IP}:30080/"))
                    .starts_with("pod-"),
                "NodePort through XDP alone"
            );
        }
    }

    // Pinned: the datapath keeps forwarding with the agent gone.
    c.agent.take().expect("agent").stop();
    assert!(
        c.get_from_pod(pod1, "http://10.96.0.10/")
            .starts_with("pod-"),
        "after the agent stopped"
    );
    assert!(
        c.get_from_client(&format!("http://{NODE_IP}:30080/"))
            .starts_with("pod-"),
        "NodePort after the agent stopped"
    );
}

#[test]
fn nodeport_to_a_backend_on_another_node_is_snated() {
    nodeport_to_a_backend_on_another_node_is_snated_on(DevicePath::Tc);
}

/// The same with XDP: the SNATed packets and their replies leave by `XDP_TX`.
#[test]
fn nodeport_to_a_backend_on_another_node_is_snated_in_xdp() {
    nodeport_to_a_backend_on_another_node_is_snated_on(DevicePath::Xdp);
}

fn nodeport_to_a_backend_on_another_node_is_snated_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::with_remote(1, 1);
    t.start_pod_servers(8080);
    // Only the pod on node-b backs the Service: the client has no route to
    // it, so only SNAT to node-a and the reverse translation make it work.
    let c = Cluster::start_on(
        &lbctl(),
        t,
        &[("web.yaml", &web(&[("10.244.2.11", NODE_B_NAME)]))],
        path,
    );
    c.wait_services("web with its remote backend", |s| {
        backends_of(s, "web", "http") == 1
    });
    for _ in 0..5 {
        assert_eq!(
            c.get_from_client(&format!("http://{NODE_IP}:30080/")),
            "pod-b1"
        );
    }
    // XDP alone: the SNATed packets and the replies leave by XDP_TX, as
    // tc ingress is gone.
    if path == DevicePath::Xdp {
        c.without_tc_ingress();
        for _ in 0..5 {
            assert_eq!(
                c.get_from_client(&format!("http://{NODE_IP}:30080/")),
                "pod-b1",
                "through XDP alone"
            );
        }
    }
    // And a pod on node-a reaches it through the ClusterIP.
    assert_eq!(
        c.get_from_pod(&c.topo.pod("pod-1").ns, "http://10.96.0.10/"),
        "pod-b1"
    );
}

const LOAD_BALANCER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: public, namespace: e2e}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.5}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: public-1, namespace: e2e, labels: {kubernetes.io/service-name: public}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.12], nodeName: node-a}]
"#;

#[test]
fn external_and_load_balancer_ips_from_outside_and_from_pods() {
    external_and_load_balancer_ips_from_outside_and_from_pods_on(DevicePath::Tc);
}

/// The same with XDP in front of tc.
#[test]
fn external_and_load_balancer_ips_from_outside_and_from_pods_in_xdp() {
    external_and_load_balancer_ips_from_outside_and_from_pods_on(DevicePath::Xdp);
}

fn external_and_load_balancer_ips_from_outside_and_from_pods_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    // The outside client routes the external and LoadBalancer IPs to
    // node-a, as an upstream router or a load balancer would.
    for ip in ["203.0.113.9/32", "198.51.100.5/32"] {
        t.client
            .run(&["ip", "route", "add", ip, "via", &NODE_IP.to_string()]);
    }
    let c = Cluster::start_on(
        &lbctl(),
        t,
        &[
            (
                "web.yaml",
                &web(&[("10.244.1.11", NODE_NAME), ("10.244.1.12", NODE_NAME)]),
            ),
            ("public.yaml", LOAD_BALANCER),
        ],
        path,
    );
    c.wait_services("web and public", |s| {
        backends_of(s, "web", "http") == 2 && backends_of(s, "public", "http") == 1
    });
    let pod = &c.topo.pod("pod-1").ns;
    assert!(c.get_from_client("http://203.0.113.9/").starts_with("pod-"));
    assert!(
        c.get_from_pod(pod, "http://203.0.113.9/")
            .starts_with("pod-")
    );
    assert_eq!(c.get_from_client("http://198.51.100.5/"), "pod-2");
    assert_eq!(c.get_from_pod(pod, "http://198.51.100.5/"), "pod-2");
    assert_eq!(
        c.get_from_client(&format!("http://{NODE_IP}:30081/")),
        "pod-2"
    );
}

#[test]
fn multi_port_service_with_named_target_ports() {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    t.start_pod_servers_named(9090, "-admin");
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: app, namespace: e2e}
spec:
  clusterIP: 10.96.0.30
  ports:
  - {name: web, port: 80, targetPort: http}
  - {name: admin, port: 81, targetPort: admin-port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: app-1, namespace: e2e, labels: {kubernetes.io/service-name: app}}
addressType: IPv4
ports: [{name: web, port: 8080}, {name: admin, port: 9090}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
"#;
    let c = Cluster::start(&lbctl(), t, &[("app.yaml", yaml)]);
    c.wait_services("both ports", |s| s.len() == 2);
    let pod = &c.topo.pod("pod-2").ns;
    for _ in 0..4 {
        let web = c.get_from_pod(pod, "http://10.96.0.30:80/");
        let admin = c.get_from_pod(pod, "http://10.96.0.30:81/");
        assert!(web.starts_with("pod-") && !web.ends_with("-admin"), "{web}");
        assert!(admin.ends_with("-admin"), "{admin}");
    }
}

/// curl arguments for a download: the body goes to `out`,
/// the headers to `out.h`.
fn slow_download_args(url: &str, out: &std::path::Path) -> Vec<String> {
    let headers = out.with_extension("h");
    ["-sS", "--noproxy", "*", "--max-time", "60", "-D"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            headers.display().to_string(),
            "-o".into(),
            out.display().to_string(),
            url.to_string(),
        ])
        .collect()
}

fn spawn(mut cmd: Command) -> std::process::Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start curl")
}

fn served_by(out: &std::path::Path) -> String {
    let h = std::fs::read_to_string(out.with_extension("h")).expect("headers");
    h.lines()
        .find_map(|l| l.strip_prefix("X-Pod: "))
        .map(|s| s.trim().to_string())
        .expect("X-Pod header")
}

#[test]
fn long_transfers_keep_their_backend_while_the_set_changes() {
    require_root();
    sweep();
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let c = Cluster::start(&lbctl(), t, &[("web.yaml", &three_local())]);
    c.wait_services("3 backends", |s| backends_of(s, "web", "http") == 3);

    // 8 MB paced by the server: about four seconds in flight, full-MTU segments
    // through the NodePort translation (checksum offload on veth) and
    // through the socket translation.
    const SIZE: usize = 8 << 20;
    let dir = c.work.join(unique("dl"));
    std::fs::create_dir_all(&dir).unwrap();
    let via_nodeport = dir.join("nodeport.bin");
    let via_clusterip = dir.join("clusterip.bin");
    let mut client_curl = c.topo.client.command("curl");
    client_curl.args(slow_download_args(
        &format!("http://{NODE_IP}:30080/slow/{SIZE}"),
        &via_nodeport,
    ));
    let mut np = spawn(client_curl);
    let pod_args = slow_download_args(&format!("http://10.96.0.10/slow/{SIZE}"), &via_clusterip);
    let refs: Vec<&str> = pod_args.iter().map(String::as_str).collect();
    let mut ci = spawn(c.in_cgroup(&c.topo.pod("pod-1").ns, "curl", &refs));
    thread::sleep(Duration::from_millis(1500));
    let np_pod = served_by(&via_nodeport);
    let ci_pod = served_by(&via_clusterip);

    // Replace the backend set while both transfers run, as a rollout does:
    // the pods that serve the transfers start terminating (still serving),
    // only the others take new connections.
    let pods = [
        ("10.244.1.11", "pod-1"),
        ("10.244.1.12", "pod-2"),
        ("10.244.1.13", "pod-3"),
    ];
    let busy = |name: &str| name == np_pod || name == ci_pod;
    let keep: Vec<(&str, &str)> = pods
        .iter()
        .filter(|(_, name)| !busy(name))
        .map(|(addr, _)| (*addr, NODE_NAME))
        .collect();
    let rollout: Vec<(&str, &str, &str)> = pods
        .iter()
        .map(|(addr, name)| {
            let conditions = if busy(name) {
                "ready: false, serving: true, terminating: true"
            } else {
                "ready: true"
            };
            (*addr, NODE_NAME, conditions)
        })
        .collect();
    assert!(!keep.is_empty());
    for (child, what) in [(&mut np, "NodePort"), (&mut ci, "ClusterIP")] {
        if child.try_wait().unwrap().is_some() {
            let (status, err) = child.wait_with_output_ref();
            let sizes: Vec<u64> = [&via_nodeport, &via_clusterip]
                .iter()
                .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                .collect();
            panic!(
                "the {what} transfer ended before the backend set changed: {status} {err} sizes {sizes:?}"
            );
        }
    }
    c.write("web.yaml", &web_with(&rollout));
    c.wait_services("the busy backends terminating", |s| {
        s.iter()
            .find(|s| s["name"] == "web" && s["port_name"] == "http")
            .and_then(|s| s["backends"].as_array())
            .is_some_and(|b| b.iter().filter(|b| b["state"] == "active").count() == keep.len())
    });
    // New connections go to the new set only.
    let fresh = c.get_from_client(&format!("http://{NODE_IP}:30080/"));
    assert!(
        keep.iter()
            .any(|(a, _)| *a == c.topo.pod(&fresh).ip.to_string()),
        "new flow went to {fresh}"
    );

    for (child, file, pod) in [
        (&mut np, &via_nodeport, &np_pod),
        (&mut ci, &via_clusterip, &ci_pod),
    ] {
        let out = child.wait_with_output_ref();
        assert!(
            out.0.success(),
            "download via {} failed: {}",
            file.display(),
            out.1
        );
        let got = std::fs::read(file).unwrap();
        assert_eq!(got.len(), SIZE, "{}: length", file.display());
        assert!(
            got == topo::pattern(SIZE),
            "{}: bytes differ",
            file.display()
        );
        assert_eq!(&served_by(file), pod, "the transfer kept its backend");
    }
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String);
}

impl WaitRef for std::process::Child {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String) {
        let status = self.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }
}

//! Service semantics end to end, as the upstream `[sig-network]` tests
//! check them: session affinity, traffic policies, terminating endpoints,
//! refusals. The real agent on a manifest folder, the real programs, real
//! clients (pods in the socket-LB cgroup, an outside client on the LAN).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::Stdio,
};

use lb_tests::{
    guard::sweep,
    require_root,
    topo::{self, CLIENT_IP, Cluster, DevicePath, NODE_B_NAME, NODE_IP, NODE_NAME, Topology},
};

fn lbctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"))
}

/// Client probes, one mode per call, each printing one line per answer:
/// - `http HOST PORT N PATH`: N GETs, each on a new connection: the bodies;
/// - `tcp HOST PORT TIMEOUT [SRC]`: one connect (from address SRC):
///   `connected`, or the error's class and errno
///   (`ConnectionRefusedError 111`, `TimeoutError`);
/// - `udp HOST PORT`: an unconnected sendto and a recvfrom: the reply or
///   the error;
/// - `udp-connected HOST PORT`: connect, send, recv: the same;
/// - `udp-until HOST PORT`: one unconnected socket sends every 50 ms until
///   an answer comes (20 s at most): `refused=N reply=TEXT`.
const PROBE: &str = r#"
import http.client, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def err(e):
    return "TimeoutError" if isinstance(e, TimeoutError) else f"{type(e).__name__} {e.errno}"
if mode == "http":
    for _ in range(int(sys.argv[4])):
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", sys.argv[5])
        print(c.getresponse().read().decode().strip(), flush=True)
        c.close()
elif mode == "tcp":
    s = socket.socket()
    s.settimeout(float(sys.argv[4]))
    if len(sys.argv) > 5:
        s.bind((sys.argv[5], 0))
    try:
        s.connect((host, port))
        print("connected")
    except OSError as e:
        print(err(e))
elif mode in ("udp", "udp-connected"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        if mode == "udp":
            s.sendto(b"ping", (host, port))
        else:
            s.connect((host, port))
            s.send(b"ping")
        print("reply", s.recv(2048).decode())
    except OSError as e:
        print(err(e))
elif mode == "upload":
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.request("POST", "/", body=bytes(int(sys.argv[4])))
        print(c.getresponse().read().decode().strip())
    except OSError as e:
        print(err(e))
elif mode == "udp-big":
    # Datagrams of argv[4] bytes, each from a new socket (a new flow), sent
    # in fragments (IP_MTU_DISCOVER = IP_PMTUDISC_DONT): the answer names
    # the backend and the length it received, padded to that length.
    for _ in range(int(sys.argv[5])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, 10, 0)
        s.settimeout(3)
        try:
            s.sendto(b"big".ljust(int(sys.argv[4]), b"x"), (host, port))
            answer = s.recv(65535)
            name, got = answer.split()[:2]
            print(name.decode(), got.decode(), len(answer), flush=True)
        except OSError as e:
            print(err(e), flush=True)
        s.close()
elif mode == "udp-stream":
    # One socket sending from one port; "connected": connect() once and
    # send(), as DNS clients do, connecting again only after an error.
    connected = len(sys.argv) > 4 and sys.argv[4] == "connected"
    def sock():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.1)
        if connected:
            s.connect((host, port))
        return s
    s = sock()
    first, deadline = None, time.time() + 20
    while time.time() < deadline:
        try:
            if connected:
                s.send(b"ping")
            else:
                s.sendto(b"ping", (host, port))
            name = s.recv(2048).decode()
        except TimeoutError:
            continue
        except OSError as e:
            print("error", err(e), flush=True)
            s.close()
            s = sock()
            continue
        if first is None:
            first = name
            print("first", name, flush=True)
        elif name != first:
            print("moved", name)
            sys.exit(0)
        time.sleep(0.05)
    print("stuck", first)
elif mode == "slow":
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/slow/" + sys.argv[4])
    r = c.getresponse()
    print(r.getheader("X-Pod"), flush=True)
    try:
        n = 0
        while True:
            b = r.read(65536)
            if not b:
                break
            n += len(b)
        print("complete", n)
    except OSError as e:
        print(err(e))
elif mode == "dual-stack":
    # A dual-stack socket, as Java opens by default: the Service address
    # written IPv4-mapped.
    mapped = "::ffff:" + host
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.settimeout(3)
    t.connect((mapped, port))
    t.sendall(b"GET / HTTP/1.0\r\n\r\n")
    body = b""
    while True:
        b = t.recv(4096)
        if not b:
            break
        body += b
    print("tcp", t.getpeername()[0], body.split(b"\r\n\r\n", 1)[1].decode().strip())
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.sendto(b"ping", (mapped, int(sys.argv[4])))
    data, peer = u.recvfrom(2048)
    print("udp", peer[0], data.decode())
elif mode == "udp-until":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    refused, deadline = 0, time.time() + 20
    print("started", flush=True)
    while time.time() < deadline:
        try:
            s.sendto(b"ping", (host, port))
            print(f"refused={refused} reply={s.recv(2048).decode()}")
            sys.exit(0)
        except ConnectionRefusedError:
            refused += 1
            time.sleep(0.05)
        except TimeoutError:
            pass
    print(f"refused={refused} no reply")
"#;

/// Where a probe runs: a pod (in the socket-LB cgroup) or the outside
/// client (not).
#[derive(Clone, Copy)]
enum From {
    Pod(&'static str),
    Outside,
}

/// Runs the probe.
fn probe_from(c: &Cluster, from: From, args: &[&str]) -> String {
    let (ns, cgroup) = match from {
        From::Pod(name) => (&c.topo.pod(name).ns, true),
        From::Outside => (&c.topo.client, false),
    };
    let mut all = vec!["-c", PROBE];
    all.extend_from_slice(args);
    let cmd = if cgroup {
        c.in_cgroup(ns, "python3", &all)
    } else {
        let mut cmd = ns.command("python3");
        cmd.args(&all);
        cmd
    };
    topo::curl(cmd).unwrap_or_else(|e| panic!("probe {args:?} from {}: {e}", ns.name))
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts the probe in the background; its output is read line by line
/// (the test acts between lines).
fn spawn_probe(c: &Cluster, from: From, args: &[&str]) -> (std::process::Child, Lines) {
    let mut all = vec!["-c", PROBE];
    all.extend_from_slice(args);
    let mut cmd = match from {
        From::Pod(name) => c.in_cgroup(&c.topo.pod(name).ns, "python3", &all),
        From::Outside => {
            let mut cmd = c.topo.client.command("python3");
            cmd.args(&all);
            cmd
        }
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the probe");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

fn distinct(out: &str) -> BTreeSet<String> {
    out.lines().map(str::to_string).collect()
}

fn slice(name: &str, svc: &str, port: u16, endpoints: &[(&str, &str, &str)]) -> String {
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: e2e, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: {port}}}]\nendpoints:\n"
    );
    for (addr, node, conditions) in endpoints {
        y +=
            &format!("- {{addresses: [{addr}], nodeName: {node}, conditions: {{{conditions}}}}}\n");
    }
    y
}

const READY: &str = "ready: true";
const TERMINATING: &str = "ready: false, serving: true, terminating: true";

fn sticky(affinity: bool) -> String {
    let affinity = if affinity {
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: e2e}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.90\n{affinity}  ports: [{{port: 80, targetPort: 8080, nodePort: 30090}}]\n{}",
        slice(
            "sticky-1",
            "sticky",
            8080,
            &[
                ("10.244.1.11", NODE_NAME, READY),
                ("10.244.1.12", NODE_NAME, READY),
                ("10.244.1.13", NODE_NAME, READY),
            ],
        )
    )
}

fn affinity_of(services: &[serde_json::Value]) -> Option<u64> {
    services
        .iter()
        .find(|s| s["name"] == "sticky")
        .and_then(|s| s["session_affinity_timeout_s"].as_u64())
}

/// sessionAffinity ClientIP: 100 connections from one pod (socket path)
/// and 100 from an outside client (device path) each land on one backend,
/// the same one after the agent restarts; with affinity switched off they
/// spread again.
#[test]
fn session_affinity_on_both_paths_across_restarts_and_off_again() {
    session_affinity_on_both_paths_across_restarts_and_off_again_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn session_affinity_on_both_paths_across_restarts_and_off_again_in_xdp() {
    session_affinity_on_both_paths_across_restarts_and_off_again_on(DevicePath::Xdp);
}

fn session_affinity_on_both_paths_across_restarts_and_off_again_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let mut c = Cluster::start_on(&lbctl(), t, &[("sticky.yaml", &sticky(true))], path);
    c.wait_services("sticky with affinity", |s| affinity_of(s) == Some(600));
    let (pod, client) = (From::Pod("pod-1"), From::Outside);
    let np = NODE_IP.to_string();

    let from_pod = distinct(&probe_from(
        &c,
        pod,
        &["http", "10.96.0.90", "80", "100", "/"],
    ));
    assert_eq!(from_pod.len(), 1, "a pod's 100 connections: {from_pod:?}");
    let from_outside = distinct(&probe_from(&c, client, &["http", &np, "30090", "100", "/"]));
    assert_eq!(
        from_outside.len(),
        1,
        "an outside client's 100 connections: {from_outside:?}"
    );

    // A restarted agent adopts the maps; the affinity table is pinned.
    c.agent.take().expect("agent").stop();
    c.start_agent();
    c.wait_services("sticky after the restart", |s| affinity_of(s) == Some(600));
    assert_eq!(
        distinct(&probe_from(
            &c,
            pod,
            &["http", "10.96.0.90", "80", "20", "/"]
        )),
        from_pod,
        "the pod's backend after the agent restarted"
    );
    assert_eq!(
        distinct(&probe_from(&c, client, &["http", &np, "30090", "20", "/"])),
        from_outside,
        "the outside client's backend after the agent restarted"
    );

    // Affinity off: new connections spread over the three pods again.
    c.write("sticky.yaml", &sticky(false));
    c.wait_services("sticky without affinity", |s| {
        s.iter().any(|s| s["name"] == "sticky") && affinity_of(s).is_none()
    });
    let spread = distinct(&probe_from(
        &c,
        pod,
        &["http", "10.96.0.90", "80", "60", "/"],
    ));
    assert_eq!(spread.len(), 3, "a pod after affinity went off: {spread:?}");
    let spread = distinct(&probe_from(&c, client, &["http", &np, "30090", "60", "/"]));
    assert_eq!(
        spread.len(),
        3,
        "outside client after affinity went off: {spread:?}"
    );
}

fn policies(endpoints: &[(&str, &str, &str)]) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: etp, namespace: e2e}}
spec:
  type: NodePort
  clusterIP: 10.96.0.91
  externalTrafficPolicy: Local
  ports: [{{port: 80, targetPort: 8080, nodePort: 30091}}]
---
apiVersion: v1
kind: Service
metadata: {{name: itp, namespace: e2e}}
spec:
  clusterIP: 10.96.0.92
  internalTrafficPolicy: Local
  ports: [{{port: 80, targetPort: 8080}}]
{}{}"#,
        slice("etp-1", "etp", 8080, endpoints),
        slice("itp-1", "itp", 8080, endpoints)
    )
}

fn backends_of(services: &[serde_json::Value], name: &str) -> usize {
    services
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["backends"].as_array())
        .map_or(0, Vec::len)
}

/// externalTrafficPolicy Local: outside clients reach only this node's
/// endpoint, which sees their own address; pods and the node reach every
/// endpoint through the same address; with no endpoint here, outside
/// traffic is dropped. internalTrafficPolicy Local: pods reach only this
/// node's endpoints, and fail at once when there is none.
#[test]
fn traffic_policies_local_on_both_paths() {
    traffic_policies_local_on_both_paths_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn traffic_policies_local_on_both_paths_in_xdp() {
    traffic_policies_local_on_both_paths_on(DevicePath::Xdp);
}

fn traffic_policies_local_on_both_paths_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::with_remote(1, 1);
    t.start_pod_servers(8080);
    let both = [
        ("10.244.1.11", NODE_NAME, READY),
        ("10.244.2.11", NODE_B_NAME, READY),
    ];
    let c = Cluster::start_on(&lbctl(), t, &[("policies.yaml", &policies(&both))], path);
    c.wait_services("both services, both endpoints", |s| {
        backends_of(s, "etp") == 2 && backends_of(s, "itp") == 2
    });
    let (pod, client) = (From::Pod("pod-1"), From::Outside);
    let np = NODE_IP.to_string();

    let outside = distinct(&probe_from(&c, client, &["http", &np, "30091", "30", "/"]));
    assert_eq!(
        outside,
        BTreeSet::from(["pod-1".to_string()]),
        "outside via eTP Local"
    );
    assert_eq!(
        probe_from(&c, client, &["http", &np, "30091", "1", "/client"]),
        topo::CLIENT_IP.to_string(),
        "the backend sees the outside client's own address"
    );
    let inside = distinct(&probe_from(&c, pod, &["http", &np, "30091", "60", "/"]));
    assert_eq!(
        inside.len(),
        2,
        "a pod reaches every endpoint through the NodePort: {inside:?}"
    );
    let itp = distinct(&probe_from(
        &c,
        pod,
        &["http", "10.96.0.92", "80", "30", "/"],
    ));
    assert_eq!(
        itp,
        BTreeSet::from(["pod-1".to_string()]),
        "iTP Local from a pod"
    );

    // Only the endpoint on node-b left.
    c.write(
        "policies.yaml",
        &policies(&[("10.244.2.11", NODE_B_NAME, READY)]),
    );
    c.wait_services("one remote endpoint", |s| {
        backends_of(s, "etp") == 1 && backends_of(s, "itp") == 1
    });
    let before = c.verdicts()["drop_no_local_backend"];
    assert_eq!(
        probe_from(&c, client, &["tcp", &np, "30091", "1"]),
        "TimeoutError",
        "outside traffic without a local endpoint is dropped"
    );
    assert_eq!(
        probe_from(&c, pod, &["tcp", "10.96.0.92", "80", "3"]),
        "OSError 113",
        "iTP Local without a local endpoint: EHOSTUNREACH at once"
    );
    assert!(c.verdicts()["drop_no_local_backend"] >= before + 2);
    // Pods still reach the remote endpoint through the NodePort and the
    // eTP Service's ClusterIP.
    for url in [
        format!("http://{np}:30091/"),
        "http://10.96.0.91/".to_string(),
    ] {
        assert_eq!(
            c.get_from_pod(&c.topo.pod("pod-1").ns, &url),
            "pod-b1",
            "{url}"
        );
    }
}

fn empty_service() -> &'static str {
    r#"apiVersion: v1
kind: Service
metadata: {name: none, namespace: e2e}
spec:
  type: NodePort
  clusterIP: 10.96.0.93
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30092}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30093}
"#
}

fn none_slice(endpoints: &[(&str, &str, &str)]) -> String {
    let mut y = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: none-1, namespace: e2e, labels: {kubernetes.io/service-name: none}}\naddressType: IPv4\nports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]\nendpoints:\n",
    );
    for (addr, node, conditions) in endpoints {
        y +=
            &format!("- {{addresses: [{addr}], nodeName: {node}, conditions: {{{conditions}}}}}\n");
    }
    y
}

/// A Service without endpoints refuses at once, from pods and from
/// outside, TCP and UDP, and so does a ClusterIP port no Service defines;
/// a UDP client that was refused reaches the first endpoint as soon as it
/// appears; with no endpoint ready, terminating ones serve.
#[test]
fn refusals_first_endpoint_and_terminating_fallback() {
    refusals_first_endpoint_and_terminating_fallback_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn refusals_first_endpoint_and_terminating_fallback_in_xdp() {
    refusals_first_endpoint_and_terminating_fallback_on(DevicePath::Xdp);
}

fn refusals_first_endpoint_and_terminating_fallback_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(5353);
    let c = Cluster::start_on(&lbctl(), t, &[("none.yaml", empty_service())], path);
    c.wait_services("the empty Service", |s| {
        s.iter().filter(|s| s["name"] == "none").count() == 2
    });
    let (pod, client) = (From::Pod("pod-1"), From::Outside);
    let np = NODE_IP.to_string();
    let before = c.verdicts();

    let refused = "ConnectionRefusedError 111";
    for (what, from, args) in [
        ("TCP from a pod", pod, vec!["tcp", "10.96.0.93", "80", "3"]),
        ("UDP from a pod", pod, vec!["udp", "10.96.0.93", "53"]),
        (
            "an undefined ClusterIP port from a pod",
            pod,
            vec!["tcp", "10.96.0.93", "81", "3"],
        ),
        ("TCP from outside", client, vec!["tcp", &np, "30092", "3"]),
        (
            "UDP from outside",
            client,
            vec!["udp-connected", &np, "30093"],
        ),
    ] {
        assert_eq!(probe_from(&c, from, &args), refused, "{what}");
    }
    let after = c.verdicts();
    assert_eq!(
        after["reject_no_backend"] - before["reject_no_backend"],
        4,
        "{after:?}"
    );
    assert_eq!(
        after["reject_undefined_port"] - before["reject_undefined_port"],
        1
    );

    // A UDP client keeps sending from one socket; the first endpoint
    // appears: its next datagram gets there.
    let (mut child, mut lines) = spawn_probe(&c, pod, &["udp-until", "10.96.0.93", "53"]);
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("started")
    );
    c.write(
        "none-slice.yaml",
        &none_slice(&[("10.244.1.12", NODE_NAME, READY)]),
    );
    let last = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = child.wait();
    assert!(
        last.ends_with("reply=pod-2") && !last.starts_with("refused=0 "),
        "the refused client's datagrams after the first endpoint: {last}"
    );

    // Both endpoints terminating (serving): new connections still go to
    // them. One ready again: only it gets new connections.
    c.write(
        "none-slice.yaml",
        &none_slice(&[
            ("10.244.1.11", NODE_NAME, TERMINATING),
            ("10.244.1.12", NODE_NAME, TERMINATING),
        ]),
    );
    c.wait_services("two terminating endpoints", |s| {
        s.iter().any(|s| {
            s["name"] == "none"
                && s["port_name"] == "http"
                && s["backends"].as_array().is_some_and(|b| {
                    b.len() == 2
                        && b.iter()
                            .all(|b| b["new_flows"] == "Cluster (terminating fallback)")
                })
        })
    });
    let fallback = distinct(&probe_from(
        &c,
        pod,
        &["http", "10.96.0.93", "80", "40", "/"],
    ));
    assert_eq!(fallback.len(), 2, "terminating fallback: {fallback:?}");
    c.write(
        "none-slice.yaml",
        &none_slice(&[
            ("10.244.1.11", NODE_NAME, READY),
            ("10.244.1.12", NODE_NAME, TERMINATING),
        ]),
    );
    c.wait_services("one ready, one terminating", |s| {
        s.iter().any(|s| {
            s["name"] == "none"
                && s["port_name"] == "http"
                && s["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["new_flows"] == "Cluster"))
        })
    });
    let ready = distinct(&probe_from(
        &c,
        pod,
        &["http", "10.96.0.93", "80", "30", "/"],
    ));
    assert_eq!(ready, BTreeSet::from(["pod-1".to_string()]));
    let from_outside = c.get_from_client(&format!("http://{np}:30092/"));
    assert_eq!(from_outside, "pod-1");
}

fn moving_service(endpoints: &[(&str, &str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: moving, namespace: e2e}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.94\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30094}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30095}}\n---\n{}",
        none_slice(endpoints)
            .replace("none-1", "moving-1")
            .replace("service-name: none", "service-name: moving")
    )
}

/// Reads one line of a probe running in the background.
fn line(lines: &mut Lines) -> String {
    lines.next().and_then(Result::ok).unwrap_or_default()
}

/// A flow never outlives its backend: a UDP client sending from one port
/// (outside, through the NodePort; a pod, through the ClusterIP) moves to
/// the remaining backend once its backend leaves the Service, and a long
/// TCP download from a backend that leaves ends with a reset at once
/// instead of hanging.
#[test]
fn flows_of_a_backend_that_left_move_or_end() {
    flows_of_a_backend_that_left_move_or_end_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn flows_of_a_backend_that_left_move_or_end_in_xdp() {
    flows_of_a_backend_that_left_move_or_end_on(DevicePath::Xdp);
}

fn flows_of_a_backend_that_left_move_or_end_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(5353);
    let both = [
        ("10.244.1.11", NODE_NAME, READY),
        ("10.244.1.12", NODE_NAME, READY),
    ];
    let ip_of = |name: &str| if name == "pod-1" { both[0] } else { both[1] };
    let c = Cluster::start_on(
        &lbctl(),
        t,
        &[("moving.yaml", &moving_service(&both))],
        path,
    );
    c.wait_services("moving with two endpoints", |s| {
        backends_of(s, "moving") == 2
    });
    let np = NODE_IP.to_string();
    let keep_only = |name: &str| {
        let other = if name == "pod-1" { "pod-2" } else { "pod-1" };
        c.write("moving.yaml", &moving_service(&[ip_of(other)]));
        c.wait_services("one endpoint left", |s| backends_of(s, "moving") == 1);
    };

    // A UDP client sending from one port, until its replies come from
    // another backend: what it printed after the first reply.
    let stream_moves = |from: From, args: &[&str]| -> Vec<String> {
        c.write("moving.yaml", &moving_service(&both));
        c.wait_services("both endpoints", |s| backends_of(s, "moving") == 2);
        let (mut probe, mut lines) = spawn_probe(&c, from, args);
        let first = line(&mut lines);
        let name = first.strip_prefix("first ").expect(&first).to_string();
        keep_only(&name);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = probe.wait();
        assert!(
            rest.last().is_some_and(|l| l.starts_with("moved pod-")),
            "{args:?}: a UDP flow whose backend left: {rest:?}"
        );
        rest
    };
    // Through the NodePort (device path), a pod's unconnected socket
    // (socket path, re-chosen per datagram).
    stream_moves(From::Outside, &["udp-stream", &np, "30095"]);
    stream_moves(From::Pod("pod-1"), &["udp-stream", "10.96.0.94", "53"]);
    // A pod's connected socket, translated once at connect(): the agent
    // destroys it (sock_diag), its owner sees the error and connects
    // again, to the remaining backend.
    let rest = stream_moves(
        From::Pod("pod-1"),
        &["udp-stream", "10.96.0.94", "53", "connected"],
    );
    assert!(
        rest.iter().any(|l| l.starts_with("error ")),
        "the connected socket was not ended: {rest:?}"
    );
    assert!(
        c.agent_log()
            .contains("connected UDP sockets of backends that left destroyed"),
        "not logged:\n{}",
        c.agent_log()
    );

    c.write("moving.yaml", &moving_service(&both));
    c.wait_services("both endpoints again", |s| backends_of(s, "moving") == 2);
    let before = c.verdicts()["reset_backend_gone"];
    let (mut tcp, mut lines) = spawn_probe(&c, From::Outside, &["slow", &np, "30094", "8000000"]);
    let name = line(&mut lines);
    keep_only(&name);
    let end = line(&mut lines);
    let _ = tcp.wait();
    assert_eq!(
        end, "ConnectionResetError 104",
        "a download from a backend that left the Service"
    );
    assert!(c.verdicts()["reset_backend_gone"] > before);
}

/// loadBalancerSourceRanges: an outside client inside the ranges reaches
/// the LoadBalancer IP, one outside them is dropped (counted); the
/// NodePort is not subject to the ranges (as with kube-proxy).
#[test]
fn source_ranges_guard_the_load_balancer_ip() {
    source_ranges_guard_the_load_balancer_ip_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn source_ranges_guard_the_load_balancer_ip_in_xdp() {
    source_ranges_guard_the_load_balancer_ip_on(DevicePath::Xdp);
}

fn source_ranges_guard_the_load_balancer_ip_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(8080);
    // A second client address on the LAN, and the LoadBalancer IP routed
    // to node-a as a load balancer or router would.
    let np = NODE_IP.to_string();
    t.client
        .run(&["ip", "addr", "add", "172.18.0.11/24", "dev", "eth0"]);
    t.client
        .run(&["ip", "route", "add", "198.51.100.6/32", "via", &np]);
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ranged, namespace: e2e}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.95\n  loadBalancerSourceRanges: [{}/32, 10.244.1.11/32]\n  ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30096}}, {{name: udp, protocol: UDP, port: 80, targetPort: 8080, nodePort: 30096}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.51.100.6}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ranged-1, namespace: e2e, labels: {{kubernetes.io/service-name: ranged}}}}\naddressType: IPv4\nports: [{{name: tcp, port: 8080}}, {{name: udp, protocol: UDP, port: 8080}}]\nendpoints:\n- {{addresses: [10.244.1.11], nodeName: {NODE_NAME}, conditions: {{ready: true}}}}\n",
        topo::CLIENT_IP,
    );
    let c = Cluster::start_on(&lbctl(), t, &[("ranged.yaml", &yaml)], path);
    c.wait_services("ranged", |s| {
        s.iter()
            .any(|s| s["name"] == "ranged" && s["source_ranges"][0] == "172.18.0.10/32")
    });
    let inside = CLIENT_IP.to_string();
    assert_eq!(
        probe_from(
            &c,
            From::Outside,
            &["tcp", "198.51.100.6", "80", "3", &inside]
        ),
        "connected"
    );
    let before = c.verdicts()["drop_source_range"];
    assert_eq!(
        probe_from(
            &c,
            From::Outside,
            &["tcp", "198.51.100.6", "80", "1", "172.18.0.11"]
        ),
        "TimeoutError",
        "a source outside the ranges"
    );
    assert!(c.verdicts()["drop_source_range"] > before);
    assert_eq!(
        probe_from(
            &c,
            From::Outside,
            &["tcp", &np, "30096", "3", "172.18.0.11"]
        ),
        "connected",
        "the NodePort is not subject to the ranges"
    );
    // Pods: the socket programs translate at connect(), before the source
    // is chosen; the egress check drops the first packet of a pod outside
    // the ranges (a SYN: connect() times out; a datagram: lost), as
    // kube-proxy's rules drop it.
    let before = c.verdicts()["drop_source_range"];
    for proto in ["tcp", "udp-connected", "udp"] {
        let inside = probe_from(&c, From::Pod("pod-1"), &[proto, "198.51.100.6", "80", "3"]);
        assert!(
            inside == "connected" || inside.starts_with("reply "),
            "{proto} from pod-1 (in the ranges): {inside}"
        );
        assert_eq!(
            probe_from(&c, From::Pod("pod-2"), &[proto, "198.51.100.6", "80", "1"]),
            "TimeoutError",
            "{proto} from pod-2 (outside the ranges)"
        );
        // The ClusterIP is not subject to the ranges.
        let cluster = probe_from(&c, From::Pod("pod-2"), &[proto, "10.96.0.95", "80", "3"]);
        assert!(
            cluster == "connected" || cluster.starts_with("reply "),
            "{proto} from pod-2 to the ClusterIP: {cluster}"
        );
    }
    assert!(c.verdicts()["drop_source_range"] >= before + 3);
    let status = c.lbctl_json(&["status"]).expect("lbctl status");
    assert!(
        status["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["program"] == "lb_sock_egress"),
        "the egress check is on while a Service has ranges: {status:#}"
    );
    // No Service with ranges left: the egress program comes off.
    c.write("ranged.yaml", "");
    c.wait_status("lb_sock_egress detached", |s| {
        !s["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["program"] == "lb_sock_egress")
    });
}

/// An agent restarted with another connection-tracking size migrates the
/// pinned table: a download through the NodePort that started before goes
/// on to the end, and `lbctl status` shows the new size.
#[test]
fn restart_with_another_conntrack_size_keeps_flows() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let mut c = Cluster::start(&lbctl(), t, &[("moving.yaml", &moving_service(&one))]);
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    let np = NODE_IP.to_string();
    let (mut child, mut lines) = spawn_probe(&c, From::Outside, &["slow", &np, "30094", "4000000"]);
    assert_eq!(line(&mut lines), "pod-1");

    c.agent.take().expect("agent").stop();
    c.source.extend(["--conntrack-max".into(), "4096".into()]);
    c.start_agent();
    c.wait_services("moving after the restart", |s| {
        backends_of(s, "moving") == 1
    });
    assert_eq!(line(&mut lines), "complete 4000000", "the download");
    let _ = child.wait();
    let status = c.lbctl_json(&["status"]).expect("lbctl status");
    let ct = status["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["map"] == lb_common::maps::CONNTRACK4))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ct["max_entries"], 4096, "{status}");
    assert!(
        c.agent_log()
            .contains("pinned map migrated to its new definition"),
        "{}",
        c.agent_log()
    );
}

/// An agent restarted with another `--cgroup` and `--devices` moves the
/// socket programs to the new cgroup (the old one's processes are no
/// longer translated) and removes the programs of devices the new list
/// does not name.
#[test]
fn restart_with_other_cgroup_and_devices_moves_the_attachments() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let mut c = Cluster::start(&lbctl(), t, &[("moving.yaml", &moving_service(&one))]);
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    let attachments = |c: &Cluster| -> Vec<String> {
        let s = c.lbctl_json(&["status"]).expect("lbctl status");
        s["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                format!(
                    "{}@{}",
                    a["program"].as_str().unwrap_or(""),
                    a["device"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    assert_eq!(attachments(&c).len(), 10, "{:?}", attachments(&c));
    assert_eq!(
        c.get_from_pod(&c.topo.pod("pod-1").ns, "http://10.96.0.94/"),
        "pod-1"
    );

    c.agent.take().expect("agent").stop();
    let old = std::mem::replace(&mut c.topo.cgroup, lb_tests::guard::Cgroup::new());
    c.source.extend(["--devices".into(), "dum*".into()]);
    c.start_agent();
    c.wait_services("moving after the restart", |s| {
        backends_of(s, "moving") == 1
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while attachments(&c).len() != 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            attachments(&c)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        attachments(&c).iter().all(|a| a.ends_with('@')),
        "{:?}",
        attachments(&c)
    );
    // The new cgroup's processes are translated, the old one's not.
    assert_eq!(
        c.get_from_pod(&c.topo.pod("pod-1").ns, "http://10.96.0.94/"),
        "pod-1"
    );
    let ns = format!("--net=/run/netns/{}", c.topo.pod("pod-1").ns.name);
    let in_old = topo::curl(old.command(
        "nsenter",
        &[&ns, "python3", "-c", PROBE, "tcp", "10.96.0.94", "80", "1"],
    ))
    .unwrap_or_default();
    assert_ne!(
        in_old, "connected",
        "a process of the old cgroup still translated"
    );
    assert!(
        c.agent_log().contains("no longer matched by --devices"),
        "{}",
        c.agent_log()
    );
}

/// Dual-stack sockets (`AF_INET6`, the Service address IPv4-mapped, as
/// Java connects by default) are load-balanced like IPv4 ones, TCP and
/// UDP, and see the Service address as their peer; and a pod that reaches
/// its own Service and lands on itself (hairpin) gets its answer.
#[test]
fn dual_stack_sockets_and_hairpin() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(5353);
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let c = Cluster::start(&lbctl(), t, &[("moving.yaml", &moving_service(&one))]);
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    // pod-1 is the only endpoint: every answer is a hairpin.
    let out = probe_from(
        &c,
        From::Pod("pod-1"),
        &["dual-stack", "10.96.0.94", "80", "53"],
    );
    assert_eq!(
        out, "tcp ::ffff:10.96.0.94 pod-1\nudp ::ffff:10.96.0.94 pod-1",
        "a dual-stack socket to the ClusterIP"
    );
    assert_eq!(
        probe_from(&c, From::Pod("pod-1"), &["udp", "10.96.0.94", "53"]),
        "reply pod-1",
        "UDP hairpin from an IPv4 socket"
    );
    assert_eq!(
        c.get_from_pod(&c.topo.pod("pod-1").ns, "http://10.96.0.94/"),
        "pod-1",
        "TCP hairpin"
    );
}

/// `--nodeport-addresses` as kube-proxy reads it: a CIDR picks this
/// machine's addresses in it, including one added later; `localhost` gives
/// the node's own processes NodePorts on 127.0.0.1 (a pod's loopback stays
/// its own). And an address of the service CIDR no Service has is dropped
/// (refused at once from a pod).
#[test]
fn nodeport_addresses_localhost_and_unallocated_service_ips() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let mut c = Cluster::new(&lbctl(), t);
    c.write("moving.yaml", &moving_service(&one));
    c.source = vec![
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--node-name".into(),
        NODE_NAME.into(),
        "--nodeport-addresses".into(),
        "172.18.0.0/24,localhost".into(),
    ];
    c.start_agent();
    let frontends = |c: &Cluster| -> BTreeSet<String> {
        c.lbctl_json(&["services"])
            .ok()
            .and_then(|s| {
                s.as_array()?
                    .iter()
                    .find(|s| s["name"] == "moving" && s["port_name"] == "http")
                    .map(|s| {
                        s["frontends"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|f| {
                                format!("{}:{}", f["address"].as_str().unwrap_or(""), f["port"])
                            })
                            .collect()
                    })
            })
            .unwrap_or_default()
    };
    let want = |extra: &[&str]| -> BTreeSet<String> {
        ["10.96.0.94:80", "172.18.0.2:30094", "127.0.0.1:30094"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let wait_for = |c: &Cluster, w: BTreeSet<String>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while frontends(c) != w {
            assert!(
                std::time::Instant::now() < deadline,
                "frontends {:?}, want {w:?}\n{}",
                frontends(c),
                c.agent_log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The pod bridge's 10.244.1.1 is not in the CIDR: no NodePort there.
    wait_for(&c, want(&[]));
    assert_eq!(c.get_from_client("http://172.18.0.2:30094/"), "pod-1");
    // An address that appears later gets the NodePort too.
    c.topo
        .node
        .run(&["ip", "addr", "add", "172.18.0.30/24", "dev", "eth0"]);
    wait_for(&c, want(&["172.18.0.30:30094"]));
    assert_eq!(c.get_from_client("http://172.18.0.30:30094/"), "pod-1");
    // localhost: the node's processes, not a pod's loopback.
    assert_eq!(
        c.get_from_pod(&c.topo.node, "http://127.0.0.1:30094/"),
        "pod-1"
    );
    assert_eq!(
        probe_from(&c, From::Pod("pod-1"), &["tcp", "127.0.0.1", "30094", "3"]),
        "ConnectionRefusedError 111",
        "a pod's own loopback"
    );
    // The manifest folder's service CIDR (10.96.0.0/12): an address no
    // Service has is refused at once from a pod, and counted.
    let before = c.verdicts()["drop_unallocated_service_ip"];
    assert_eq!(
        probe_from(&c, From::Pod("pod-1"), &["tcp", "10.96.0.200", "80", "3"]),
        "OSError 101"
    );
    assert!(c.verdicts()["drop_unallocated_service_ip"] > before);
}

/// ICMP errors about a flow reach the client translated: a UDP datagram
/// through the NodePort to a pod with nothing on the port gets the pod's
/// port unreachable back as if from the NodePort, so the client's
/// connected socket fails with ECONNREFUSED instead of waiting.
#[test]
fn icmp_errors_reach_the_client_translated() {
    icmp_errors_reach_the_client_translated_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn icmp_errors_reach_the_client_translated_in_xdp() {
    icmp_errors_reach_the_client_translated_on(DevicePath::Xdp);
}

fn icmp_errors_reach_the_client_translated_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    // No UDP server in the pod: its kernel answers port unreachable.
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let c = Cluster::start_on(&lbctl(), t, &[("moving.yaml", &moving_service(&one))], path);
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    let before = c.verdicts()["icmp_translated"];
    let np = NODE_IP.to_string();
    assert_eq!(
        probe_from(&c, From::Outside, &["udp-connected", &np, "30095"]),
        "ConnectionRefusedError 111"
    );
    assert!(c.verdicts()["icmp_translated"] > before);
}

/// A UDP datagram larger than the path's MTU reaches the NodePort in
/// fragments: the first fragment's flow carries the later ones (their
/// ports are only in the first), so the backend gets the whole datagram
/// and its answer, fragmented too, comes back whole, for a backend on this
/// node and one on the other node (SNAT both ways).
#[test]
fn fragmented_datagrams_through_a_node_port() {
    fragmented_datagrams_through_a_node_port_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn fragmented_datagrams_through_a_node_port_in_xdp() {
    fragmented_datagrams_through_a_node_port_on(DevicePath::Xdp);
}

fn fragmented_datagrams_through_a_node_port_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::with_remote(1, 1);
    t.start_pod_servers(8080);
    t.start_pod_udp_servers(5353);
    let both = [
        ("10.244.1.11", NODE_NAME, READY),
        ("10.244.2.11", NODE_B_NAME, READY),
    ];
    let c = Cluster::start_on(
        &lbctl(),
        t,
        &[("moving.yaml", &moving_service(&both))],
        path,
    );
    c.wait_services("moving", |s| backends_of(s, "moving") == 2);
    let before = c.verdicts();
    let np = NODE_IP.to_string();
    let out = probe_from(&c, From::Outside, &["udp-big", &np, "30095", "4000", "24"]);
    let mut seen = BTreeSet::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(
            f.get(1..),
            Some(&["4000", "4000"][..]),
            "a 4,000-byte datagram and its answer, whole: {l:?}\nall: {out}"
        );
        seen.insert(f[0].to_string());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["pod-1".to_string(), "pod-b1".to_string()]),
        "24 datagrams from 24 ports reach both backends"
    );
    let after = c.verdicts();
    assert!(
        after["forward_established"] - before["forward_established"] >= 48,
        "the later fragments follow their first: {before:?} -> {after:?}"
    );
    assert_eq!(
        after["pass_fragment_unknown"], before["pass_fragment_unknown"],
        "no fragment was left untranslated"
    );
}

/// Path MTU discovery through a NodePort: the way from node-a to node-b's
/// pods has a smaller MTU (1,400: node-b's link, and node-a's route to
/// them) than the client's link (1,500). The client's full-size segments
/// to a backend on node-b are answered by the datapath with a
/// fragmentation needed (before SNAT, quoting them as sent), the client
/// lowers its path MTU and a 2 MB upload completes; without the answer the
/// segments would die on node-b's link.
#[test]
fn path_mtu_discovery_through_a_node_port() {
    path_mtu_discovery_through_a_node_port_on(DevicePath::Tc);
}

/// The same with XDP in front of tc on node-a's eth0.
#[test]
fn path_mtu_discovery_through_a_node_port_in_xdp() {
    path_mtu_discovery_through_a_node_port_on(DevicePath::Xdp);
}

fn path_mtu_discovery_through_a_node_port_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::with_remote(0, 1);
    t.start_pod_servers(8080);
    t.node_b.run(&["ip", "link", "set", "eth0", "mtu", "1400"]);
    t.node.run(&[
        "ip",
        "route",
        "replace",
        "10.244.2.0/24",
        "via",
        &topo::NODE_B_IP.to_string(),
        "mtu",
        "lock",
        "1400",
    ]);
    let remote = [("10.244.2.11", NODE_B_NAME, READY)];
    let c = Cluster::start_on(
        &lbctl(),
        t,
        &[("moving.yaml", &moving_service(&remote))],
        path,
    );
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    let before = c.verdicts()["frag_needed_sent"];
    let np = NODE_IP.to_string();
    assert_eq!(
        probe_from(&c, From::Outside, &["upload", &np, "30094", "2000000"]),
        "pod-b1 2000000",
        "a 2 MB upload over the smaller-MTU path"
    );
    assert!(
        c.verdicts()["frag_needed_sent"] > before,
        "no fragmentation needed was sent: the path MTU was not discovered"
    );
}

/// A map that is full is never silent: with `--lb-map-max 16`, a Service
/// with 20 endpoints does not fit; it is refused whole and named (log and
/// `lbctl status`), the Service that fits forwards from a pod and from
/// outside, and the refused one is programmed once it fits.
#[test]
fn a_full_map_refuses_the_port_that_does_not_fit_and_the_rest_forwards() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let svc = |name: &str, ip: &str, node_port: u16, eps: &[(&str, &str, &str)]| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports: [{{port: 80, targetPort: 8080, nodePort: {node_port}}}]\n{}",
            slice(&format!("{name}-1"), name, 8080, eps)
        )
    };
    let many: Vec<String> = (1..=20).map(|i| format!("10.244.9.{i}")).collect();
    let big = |n: usize| -> Vec<(&str, &str, &str)> {
        many[..n]
            .iter()
            .map(|a| (a.as_str(), NODE_B_NAME, READY))
            .collect()
    };
    let mut c = Cluster::new(&lbctl(), t);
    c.write(
        "fits.yaml",
        &svc(
            "fits",
            "10.96.0.96",
            30097,
            &[("10.244.1.11", NODE_NAME, READY)],
        ),
    );
    c.write("big.yaml", &svc("big", "10.96.0.98", 30098, &big(20)));
    c.source = vec![
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--node-name".into(),
        NODE_NAME.into(),
        "--node-ip".into(),
        NODE_IP.to_string(),
        "--lb-map-max".into(),
        "16".into(),
    ];
    c.start_agent();
    c.wait_services("the Service that fits", |s| backends_of(s, "fits") == 1);
    // Refused when the Service that fits is in (21 backends) or not yet
    // (20): the map, its size and the flag are named either way.
    c.wait_status("the refusal in the agent's record", |status| {
        status["agent"]["last_error"].as_str().is_some_and(|e| {
            e.starts_with("e2e/big not programmed: map LB4_BACKENDS_V1 is full: ")
                && e.ends_with(" entries needed, 16 fit (raise --lb-map-max)")
        })
    });
    assert!(c.agent_log().contains("map LB4_BACKENDS_V1 is full"));
    assert_eq!(c.get_from_client("http://172.18.0.2:30097/"), "pod-1");
    assert_eq!(
        c.get_from_pod(&c.topo.pod("pod-1").ns, "http://10.96.0.96/"),
        "pod-1"
    );
    // Fewer endpoints: it fits now.
    c.write("big.yaml", &svc("big", "10.96.0.98", 30098, &big(12)));
    c.wait_services("the refused Service, smaller", |s| {
        backends_of(s, "big") == 12
    });
    assert_eq!(c.get_from_client("http://172.18.0.2:30097/"), "pod-1");
}

/// One HTTP GET per source port given, each from that port (`SO_REUSEADDR`,
/// the server closes first): prints "<port> <body>" per port.
const FROM_PORTS: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for sport in map(int, sys.argv[3:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("0.0.0.0", sport))
    s.connect((host, port))
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    print(sport, data.split(b"\r\n\r\n", 1)[1].decode().strip())
"#;

/// Which backend answered each source port's request to `host:port`.
fn backends_by_port(
    c: &Cluster,
    host: std::net::Ipv4Addr,
    port: u16,
    ports: std::ops::Range<u16>,
) -> std::collections::BTreeMap<u16, String> {
    let mut cmd = c.topo.client.command("python3");
    cmd.args(["-c", FROM_PORTS, &host.to_string(), &port.to_string()]);
    cmd.args(ports.clone().map(|p| p.to_string()));
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "requests to {host}:{port}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.diagnosis()
    );
    let got: std::collections::BTreeMap<u16, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, b)| (p.parse().unwrap(), b.to_string()))
        .collect();
    assert_eq!(got.len(), ports.len(), "an answer per port");
    got
}

/// A NodePort Service under Maglev with five endpoints (three on node-a,
/// two on node-b), as each node's agent reads it.
fn maglev_shop(endpoints: &[(&str, &str)]) -> String {
    let mut y = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: shop, namespace: e2e, annotations: {lbctl.dev/lb-algorithm: maglev}}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30030}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-a, namespace: e2e, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
"#,
    );
    for (addr, node) in endpoints {
        y += &format!("- {{addresses: [{addr}], nodeName: {node}}}\n");
    }
    y
}

/// Maglev end to end, two nodes, each with its own agent and maps and no
/// state shared: the same client flow (source port) sent to either node's
/// NodePort reaches the same backend; with one of five backends removed,
/// the flows of the other four stay where they were, measured over 150
/// flows (a slot per backend, `hash % N`, would move about four in five).
#[test]
fn maglev_picks_the_same_backend_on_both_nodes_and_a_removal_moves_few_flows() {
    use lb_tests::topo::NODE_B_IP;
    require_root();
    sweep();
    let mut t = Topology::with_remote(3, 2);
    t.start_pod_servers(8080);
    let all = [
        ("10.244.1.11", NODE_NAME),
        ("10.244.1.12", NODE_NAME),
        ("10.244.1.13", NODE_NAME),
        ("10.244.2.11", NODE_B_NAME),
        ("10.244.2.12", NODE_B_NAME),
    ];
    let c = Cluster::start(&lbctl(), t, &[("shop.yaml", &maglev_shop(&all))]);
    let b = NodeB::start(&c, &[("shop.yaml", &maglev_shop(&all))]);
    let settled = |pins: &std::path::Path, n: usize| {
        wait_settled(pins, &format!("shop with {n} backends"), |s| {
            s["name"] == "shop"
                && s["algorithm"] == "maglev"
                && s["backends"].as_array().map_or(0, Vec::len) == n
        })
    };
    settled(&c.pins(), 5);
    settled(&b.bpffs.pins(), 5);

    // The same flows through either node: the same backends.
    let on_a = backends_by_port(&c, NODE_IP, 30030, 20_000..20_040);
    let on_b = backends_by_port(&c, NODE_B_IP, 30030, 20_000..20_040);
    assert_eq!(on_a, on_b, "node-a and node-b pick alike");
    let used: BTreeSet<&String> = on_a.values().collect();
    assert_eq!(used.len(), 5, "40 flows reach all five: {on_a:?}");

    // 150 flows through node-a; one backend leaves (both agents); the
    // same flows, new to node-b, through node-b.
    let before = backends_by_port(&c, NODE_IP, 30030, 21_000..21_150);
    let four: Vec<(&str, &str)> = all
        .iter()
        .copied()
        .filter(|(a, _)| *a != "10.244.1.12")
        .collect();
    c.write("shop.yaml", &maglev_shop(&four));
    b.write("shop.yaml", &maglev_shop(&four));
    settled(&c.pins(), 4);
    settled(&b.bpffs.pins(), 4);
    let after = backends_by_port(&c, NODE_B_IP, 30030, 21_000..21_150);
    let gone = before.values().filter(|b| *b == "pod-2").count();
    let moved_others = before
        .iter()
        .filter(|(p, b)| *b != "pod-2" && after[*p] != **b)
        .count();
    println!(
        "maglev: of 150 flows, {gone} were on the backend that left (all moved), {moved_others} of the other {} moved",
        150 - gone
    );
    assert!(
        (15..=45).contains(&gone),
        "about a fifth of 150 flows were on the backend that left: {gone}"
    );
    assert!(after.values().all(|b| b != "pod-2"));
    // Maglev moves under 2% of the other slots: at most a few flows.
    assert!(
        moved_others <= 6,
        "{moved_others} of {} flows of staying backends moved",
        150 - gone
    );
    drop(b);
}

/// node-b's own agent, beside node-a's: its folder of manifests, maps and
/// cgroup, nothing shared with node-a's. Dropped in field order: the
/// agent ends before its maps and cgroup go.
struct NodeB {
    _agent: topo::Agent,
    bpffs: lb_tests::guard::Bpffs,
    _cgroup: lb_tests::guard::Cgroup,
    manifests: PathBuf,
}

impl NodeB {
    fn start(c: &Cluster, files: &[(&str, &str)]) -> Self {
        let work = c.work.join("node-b");
        let manifests = work.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        for (name, text) in files {
            std::fs::write(manifests.join(name), text).unwrap();
        }
        let bpffs = lb_tests::guard::Bpffs::new();
        let cgroup = lb_tests::guard::Cgroup::new();
        let source = vec![
            "--manifests".to_string(),
            manifests.display().to_string(),
            "--node-name".into(),
            NODE_B_NAME.into(),
            "--node-ip".into(),
            topo::NODE_B_IP.to_string(),
        ];
        let agent = topo::Agent::start_with(
            &lbctl(),
            &c.topo.node_b,
            &source,
            &bpffs.pins(),
            &cgroup.path,
            &work.join("agent.log"),
        );
        Self {
            _agent: agent,
            bpffs,
            _cgroup: cgroup,
            manifests,
        }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.manifests.join(name), text).unwrap();
    }

    /// `lbctl counters` of node-b: every verdict's count by its label.
    fn verdicts(&self) -> std::collections::BTreeMap<String, u64> {
        topo::verdicts(&lbctl(), &self.bpffs.pins())
    }
}

/// Waits until the agent whose maps are at `pins` has programmed a
/// Service port satisfying `ok` (read between write passes).
fn wait_settled(pins: &std::path::Path, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(v) = topo::settled_services(&lbctl(), pins)
            && v.as_array().is_some_and(|a| a.iter().any(&ok))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} in {}",
            pins.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A NodePort under direct server return whose one endpoint is on node-b.
const DSR_WEB: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e, annotations: {lbctl.dev/lb-mode: dsr}}
spec:
  type: NodePort
  clusterIP: 10.96.0.31
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30031}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: e2e, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.2.11], nodeName: node-b}]
"#;

#[test]
fn dsr_replies_reach_the_client_without_passing_the_first_node() {
    dsr_replies_skip_the_first_node_on(DevicePath::Tc);
}

/// The same with XDP on node-a: it encapsulates and sends by `XDP_TX`.
#[test]
fn dsr_replies_reach_the_client_without_passing_the_first_node_in_xdp() {
    dsr_replies_skip_the_first_node_on(DevicePath::Xdp);
}

/// A client downloads 2 MB from a NodePort of node-a whose backend is on
/// node-b, under DSR: node-a sends the client's packets to node-b in IPIP,
/// node-b's agent decapsulates them and sends the backend's replies
/// straight to the client from node-a's NodePort address. node-a's device
/// counts the client's requests and ACKs only, not the 2 MB.
fn dsr_replies_skip_the_first_node_on(path: DevicePath) {
    require_root();
    sweep();
    let mut t = Topology::with_remote(1, 1);
    t.start_pod_servers(8080);
    let c = Cluster::start_on(&lbctl(), t, &[("web.yaml", DSR_WEB)], path);
    let b = NodeB::start(&c, &[("web.yaml", DSR_WEB)]);
    let dsr_web = |s: &serde_json::Value| {
        s["name"] == "web"
            && s["mode"] == "dsr"
            && s["backends"].as_array().map_or(0, Vec::len) == 1
    };
    wait_settled(&c.pins(), "web under DSR", dsr_web);
    wait_settled(&b.bpffs.pins(), "web under DSR", dsr_web);
    for _ in 0..3 {
        assert_eq!(
            c.get_from_client(&format!("http://{NODE_IP}:30031/")),
            "pod-b1"
        );
    }
    let counter = |what: &str| -> u64 {
        c.topo
            .node
            .run(&["cat", &format!("/sys/class/net/eth0/statistics/{what}")])
            .trim()
            .parse()
            .unwrap()
    };
    let (rx, tx) = (counter("rx_bytes"), counter("tx_bytes"));
    const SIZE: u64 = 2_000_000;
    let got = c.topo.client.run(&[
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("http://{NODE_IP}:30031/bytes/{SIZE}"),
    ]);
    assert_eq!(got, format!("200 {SIZE}"), "{}", c.diagnosis());
    let (rx, tx) = (counter("rx_bytes") - rx, counter("tx_bytes") - tx);
    println!(
        "dsr ({path:?}): {SIZE} bytes downloaded through node-a's NodePort; node-a's eth0 received {rx} and sent {tx} bytes"
    );
    assert!(
        rx < SIZE / 10 && tx < SIZE / 10,
        "the download passed node-a: received {rx}, sent {tx}"
    );
    let a = c.verdicts();
    let bv = b.verdicts();
    assert!(a["forward_dsr"] >= 4, "node-a: {a:?}");
    assert!(
        bv["dsr_decapsulated"] > 0 && bv["reply"] > 0,
        "node-b: {bv:?}"
    );

    // What lbctl shows: explain on node-a names DSR and the inner
    // rewrite; node-b's conntrack holds the reply entries that give the
    // backend's replies node-a's NodePort as source.
    let v = c.explain(&[
        "--src",
        &format!("{CLIENT_IP}:45000"),
        "--dst",
        &format!("{NODE_IP}:30031"),
    ]);
    assert_eq!(v["decision"], "new_flow", "{v:#}");
    assert_eq!(v["dsr"], true, "{v:#}");
    assert_eq!(v["verdicts"][0], "forward_dsr", "{v:#}");
    assert_eq!(v["translated_src"], format!("{CLIENT_IP}:45000"), "{v:#}");
    assert_eq!(v["translated_dst"], "10.244.2.11:8080", "{v:#}");
    let out = std::process::Command::new(lbctl())
        .args(["conntrack", "-o", "json", "--bpffs"])
        .arg(b.bpffs.pins())
        .output()
        .expect("lbctl conntrack");
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("conntrack json");
    let replies: Vec<&serde_json::Value> = flows
        .as_array()
        .expect("a list of flows")
        .iter()
        .filter(|f| f["direction"] == "reply" && f["dsr"] == true)
        .collect();
    assert!(!replies.is_empty(), "{flows:#}");
    for f in replies {
        assert_eq!(f["nat_src"], format!("{NODE_IP}:30031"), "{f:#}");
        assert_eq!(f["src"], "10.244.2.11:8080", "{f:#}");
    }
}

/// A LoadBalancer IP under Maglev and DSR, two endpoints on each node.
const ECMP_SHOP: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: shop
  namespace: e2e
  annotations: {lbctl.dev/lb-algorithm: maglev, lbctl.dev/lb-mode: dsr}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.32
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30032}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-x, namespace: e2e, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
- {addresses: [10.244.2.11], nodeName: node-b}
- {addresses: [10.244.2.12], nodeName: node-b}
"#;

#[test]
fn a_transfer_goes_on_when_the_routers_ecmp_moves_it_to_the_other_node() {
    ecmp_move_on(DevicePath::Tc);
}

#[test]
fn a_transfer_goes_on_when_the_routers_ecmp_moves_it_to_the_other_node_in_xdp() {
    ecmp_move_on(DevicePath::Xdp);
}

/// Nodes behind an ECMP router, as a cloud or a BGP fabric puts them: a
/// client in its own network reaches a LoadBalancer IP through a router
/// whose route to it has both nodes as next hops. A slow 3 MB download
/// starts on whichever node the router's hash picks; mid-transfer the
/// route moves it to the other node, which has never seen the flow and
/// shares no state with the first. Maglev gives the other node the same
/// backend for the flow's next packet, DSR keeps the replies off both
/// routes, and the download completes, every byte.
fn ecmp_move_on(path: DevicePath) {
    use lb_tests::guard::Netns;
    use std::net::Ipv4Addr;
    require_root();
    sweep();
    const VIP: &str = "198.51.100.10";
    const SIZE: u64 = 3_000_000;
    let mut t = Topology::with_remote(2, 2);
    t.start_pod_servers(8080);
    // client 10.99.0.2 ── router ── LAN 172.18.0.20 ── node-a, node-b
    let router = Netns::new("rt");
    let client = Netns::new("ec");
    topo::veth(&t.lan, "p-router", &router, "eth0");
    topo::ip(&t.lan, &["link", "set", "p-router", "master", "lan0"]);
    topo::ip(&router, &["addr", "add", "172.18.0.20/24", "dev", "eth0"]);
    topo::veth(&router, "eth1", &client, "eth0");
    topo::ip(&router, &["addr", "add", "10.99.0.1/24", "dev", "eth1"]);
    topo::ip(&client, &["addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    topo::ip(&client, &["route", "add", "default", "via", "10.99.0.1"]);
    router.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let via = |nodes: &[Ipv4Addr]| {
        let mut args = vec!["route", "replace", VIP];
        let hops: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        if let [one] = hops.as_slice() {
            args.extend(["via", one.as_str()]);
        } else {
            for h in &hops {
                args.extend(["nexthop", "via", h.as_str(), "weight", "1"]);
            }
        }
        topo::ip(&router, &args);
    };
    via(&[NODE_IP, topo::NODE_B_IP]);
    for node in [&t.node, &t.node_b] {
        topo::ip(
            node,
            &["route", "add", "10.99.0.0/24", "via", "172.18.0.20"],
        );
    }
    if path == DevicePath::Xdp {
        // Whole checksums on the wire towards node-a's XDP.
        for (ns, dev) in [(&router, "eth0"), (&router, "eth1"), (&client, "eth0")] {
            ns.run(&["ethtool", "-K", dev, "tx", "off"]);
        }
    }
    let c = Cluster::start_on(&lbctl(), t, &[("shop.yaml", ECMP_SHOP)], path);
    let b = NodeB::start(&c, &[("shop.yaml", ECMP_SHOP)]);
    let ready = |s: &serde_json::Value| {
        s["name"] == "shop"
            && s["mode"] == "dsr"
            && s["algorithm"] == "maglev"
            && s["backends"].as_array().map_or(0, Vec::len) == 4
    };
    wait_settled(&c.pins(), "shop under Maglev and DSR", ready);
    wait_settled(&b.bpffs.pins(), "shop under Maglev and DSR", ready);

    // Which node holds a flow of the client (its original entry).
    let holds = |pins: &std::path::Path| -> bool {
        let out = std::process::Command::new(lbctl())
            .args([
                "conntrack",
                "-o",
                "json",
                "--client",
                "10.99.0.2",
                "--bpffs",
            ])
            .arg(pins)
            .output()
            .expect("lbctl conntrack");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|f| f["direction"] == "original" && f["dst"] == format!("{VIP}:80"))
        })
    };
    let mut curl = client.command("curl");
    curl.args([
        "-sS",
        "--max-time",
        "60",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("http://{VIP}/slow/{SIZE}"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let download = curl.spawn().expect("curl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (first, second, second_ip, second_pins) = loop {
        if holds(&c.pins()) {
            break (NODE_NAME, NODE_B_NAME, topo::NODE_B_IP, b.bpffs.pins());
        }
        if holds(&b.bpffs.pins()) {
            break (NODE_B_NAME, NODE_NAME, NODE_IP, c.pins());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the download's flow on neither node"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // The router's hash moves the flow: its next packets go to the other
    // node.
    via(&[second_ip]);
    let out = download.wait_with_output().expect("curl");
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    println!("ecmp ({path:?}): started on {first}, moved to {second}; curl: {got}");
    assert_eq!(
        got,
        format!("200 {SIZE}"),
        "the download after the move: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.diagnosis()
    );
    assert!(
        holds(&second_pins),
        "the flow went on through {second} (its own entry)"
    );
    drop(b);
}

/// Flood protection end to end: node-a's agent takes 500 new flows a
/// second per CPU into conntrack (burst 100). A client downloads 8 MB
/// slowly through a NodePort while a namespace on the LAN sends SYNs from
/// random sources to the same NodePort as fast as hping3 makes them. The
/// download completes, every byte; the flood's flows past the rate are
/// dropped, those within it stay within what the rate allows; a new
/// connection after the flood is served.
#[test]
fn a_syn_flood_leaves_established_transfers_alone() {
    use lb_tests::guard::{Netns, Proc};
    require_root();
    sweep();
    const RATE: u64 = 500;
    const BURST: u64 = 100;
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let flooder = Netns::new("fl");
    topo::veth(&t.lan, "p-flood", &flooder, "eth0");
    topo::ip(&t.lan, &["link", "set", "p-flood", "master", "lan0"]);
    topo::ip(&flooder, &["addr", "add", "172.18.0.30/24", "dev", "eth0"]);
    let one = [("10.244.1.11", NODE_NAME, READY)];
    let mut c = Cluster::start(&lbctl(), t, &[("moving.yaml", &moving_service(&one))]);
    c.agent.take().expect("agent").stop();
    c.source.extend(
        [
            "--new-flow-rate",
            &RATE.to_string(),
            "--new-flow-burst",
            &BURST.to_string(),
            "--conntrack-max",
            "16384",
        ]
        .map(String::from),
    );
    c.start_agent();
    c.wait_services("moving", |s| backends_of(s, "moving") == 1);
    let status = c.lbctl_json(&["status"]).expect("lbctl status");
    assert_eq!(status["datapath"]["new_flow_rate"], RATE, "{status:#}");
    assert_eq!(status["datapath"]["new_flow_burst"], BURST, "{status:#}");

    let np = NODE_IP.to_string();
    let (mut download, mut lines) =
        spawn_probe(&c, From::Outside, &["slow", &np, "30094", "8000000"]);
    assert_eq!(line(&mut lines), "pod-1");
    let before = c.verdicts();
    let started = std::time::Instant::now();
    let flood = Proc(
        flooder
            .command("hping3")
            .args(["--flood", "-q", "-S", "-p", "30094", "--rand-source", &np])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hping3"),
    );
    let end = line(&mut lines);
    let secs = started.elapsed().as_secs_f64();
    drop(flood);
    let _ = download.wait();
    let after = c.verdicts();
    let delta = |v: &str| after.get(v).copied().unwrap_or(0) - before.get(v).copied().unwrap_or(0);
    let (taken, dropped) = (delta("forward_new"), delta("drop_flood"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    println!(
        "syn flood: {} new flows in {secs:.1} s ({:.0} a second) during the download; {taken} taken into conntrack, {dropped} dropped past the rate ({RATE}/s per CPU, {cpus} CPUs)",
        taken + dropped,
        (taken + dropped) as f64 / secs
    );
    assert_eq!(end, "complete 8000000", "the download under the flood");
    assert!(dropped > 0, "the flood went past the rate: {after:?}");
    let allowed = (RATE as f64 * secs + BURST as f64 + 1.0) * cpus as f64;
    assert!(
        (taken as f64) <= allowed,
        "{taken} flows taken, the rate allows {allowed:.0}"
    );
    // The flood over, a new connection is served.
    assert_eq!(
        c.get_from_client(&format!("http://{NODE_IP}:30094/")),
        "pod-1"
    );
}

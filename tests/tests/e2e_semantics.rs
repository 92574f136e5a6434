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
    topo::{self, Cluster, NODE_B_NAME, NODE_IP, NODE_NAME, Topology},
};

fn lbctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"))
}

/// Client probes, one mode per call, each printing one line per answer:
/// - `http HOST PORT N PATH`: N GETs, each on a new connection: the bodies;
/// - `tcp HOST PORT TIMEOUT`: one connect: `connected`, or the error's
///   class and errno (`ConnectionRefusedError 111`, `TimeoutError`);
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
    require_root();
    sweep();
    let mut t = Topology::new(3);
    t.start_pod_servers(8080);
    let mut c = Cluster::start(&lbctl(), t, &[("sticky.yaml", &sticky(true))]);
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
    require_root();
    sweep();
    let mut t = Topology::with_remote(1, 1);
    t.start_pod_servers(8080);
    let both = [
        ("10.244.1.11", NODE_NAME, READY),
        ("10.244.2.11", NODE_B_NAME, READY),
    ];
    let c = Cluster::start(&lbctl(), t, &[("policies.yaml", &policies(&both))]);
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
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    let pods: Vec<(String, String)> = t
        .pods
        .iter()
        .map(|p| (p.ns.name.clone(), p.name.clone()))
        .collect();
    for (ns, name) in &pods {
        t.udp_server(ns, 5353, name);
    }
    let c = Cluster::start(&lbctl(), t, &[("none.yaml", empty_service())]);
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
    let mut child = c
        .in_cgroup(
            &c.topo.pod("pod-1").ns,
            "python3",
            &["-c", PROBE, "udp-until", "10.96.0.93", "53"],
        )
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("UDP client");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
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

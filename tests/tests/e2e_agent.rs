//! The agent's life cycle end to end: it may die and restart at any moment
//! while traffic flows, and the datapath must not notice.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    guard::sweep,
    require_root,
    topo::{self, Cluster, NODE_IP, NODE_NAME, Topology},
};

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
- {addresses: [10.244.1.11], nodeName: NODE}
- {addresses: [10.244.1.12], nodeName: NODE}
"#;

#[test]
fn agent_killed_and_restarted_under_traffic_loses_no_request() {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    let mut c = Cluster::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        t,
        &[("web.yaml", &WEB.replace("NODE", NODE_NAME))],
    );
    c.wait_services("web", |s| {
        s.len() == 1 && s[0]["backends"].as_array().is_some_and(|b| b.len() == 2)
    });
    let before = c.lbctl_json(&["services"]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Requests in a loop from a pod (ClusterIP) and from outside (NodePort).
    let mut loops = Vec::new();
    for (i, url) in [
        "http://10.96.0.10/".to_string(),
        format!("http://{NODE_IP}:30080/"),
    ]
    .into_iter()
    .enumerate()
    {
        let cmd_for = {
            let pod_ns = c.topo.pod("pod-1").ns.name.clone();
            let client_ns = c.topo.client.name.clone();
            let cgroup = c.topo.cgroup.path.clone();
            move |url: &str| -> std::process::Command {
                let mut cmd = std::process::Command::new("sh");
                let args = topo::curl_args(url).join("' '");
                let script = if i == 0 {
                    format!(
                        "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{pod_ns} curl '{args}'",
                        cgroup.display()
                    )
                } else {
                    format!("exec ip netns exec {client_ns} curl '{args}'")
                };
                cmd.args(["-c", &script]);
                cmd
            }
        };
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        loops.push(thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match topo::curl(cmd_for(&url)) {
                    Ok(body) if body.starts_with("pod-") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(body) => errors
                        .lock()
                        .unwrap()
                        .push(format!("{url}: unexpected {body:?}")),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(format!("{url}: {e}"));
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    thread::sleep(Duration::from_millis(700));
    // Killed without warning, twice, and restarted each time.
    for _ in 0..2 {
        c.agent.as_mut().expect("agent").kill();
        thread::sleep(Duration::from_millis(700));
        c.start_agent();
        wait_log(&c, "first sync done", 1);
        let log = c.agent_log();
        assert!(
            log.contains("writes=0"),
            "a restart must adopt the maps and write nothing:\n{log}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} requests failed: {errors:#?}",
        errors.len()
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 20,
        "too few requests ran: {}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    // Same ids, same backends: nothing moved.
    let after = c.lbctl_json(&["services"]).unwrap();
    let strip = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].clone(),
                    s["frontends"].clone(),
                    s["backends"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after));
}

/// GET on the node's loopback (the agent's listeners live in the node's
/// network namespace): (status code, body).
fn node_get(c: &Cluster, url: &str) -> (u16, String) {
    let mut cmd = c.topo.node.command("curl");
    cmd.args([
        "-s",
        "--max-time",
        "3",
        "--noproxy",
        "*",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
}

#[test]
fn health_endpoints_and_metrics_follow_the_agent() {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    let web = WEB.replace("NODE", NODE_NAME);
    let mut c = Cluster::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        t,
        &[("web.yaml", &web)],
    );
    c.wait_services("web", |s| s.len() == 1);

    // A restart whose source cannot be read: alive, not ready.
    c.agent.as_mut().expect("agent").kill();
    std::fs::remove_dir_all(&c.manifests).unwrap();
    c.start_agent();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_get(&c, "http://127.0.0.1:10256/livez").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "agent never served /livez:\n{}",
            c.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    while !c.agent_log().contains("reading manifests") {
        assert!(
            Instant::now() < deadline,
            "agent never reported the missing folder:\n{}",
            c.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        node_get(&c, "http://127.0.0.1:10256/readyz").0,
        503,
        "ready before any sync"
    );
    assert_eq!(
        node_get(&c, "http://127.0.0.1:10256/livez").0,
        200,
        "alive all the same"
    );
    // The datapath still forwards meanwhile (pinned).
    assert!(
        c.get_from_client(&format!("http://{NODE_IP}:30080/"))
            .starts_with("pod-")
    );

    std::fs::create_dir_all(&c.manifests).unwrap();
    c.write("web.yaml", &web);
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_get(&c, "http://127.0.0.1:10256/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready:\n{}", c.agent_log());
        thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = node_get(&c, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    assert!(
        v["lastUpdated"]
            .as_str()
            .is_some_and(|t| t.starts_with("20"))
            && v["currentTime"].is_string()
            && v["nodeEligible"] == true,
        "{body}"
    );

    let before = node_get(&c, "http://127.0.0.1:10249/metrics").1;
    let flows = r#"lb_service_flows_total{namespace="e2e",name="web",port="http"}"#;
    let new_verdicts = r#"lb_datapath_verdicts_total{verdict="forward_new"}"#;
    let (f0, v0) = (metric(&before, flows), metric(&before, new_verdicts));
    for _ in 0..3 {
        c.get_from_client(&format!("http://{NODE_IP}:30080/"));
    }
    let after = node_get(&c, "http://127.0.0.1:10249/metrics").1;
    assert_eq!(metric(&after, flows), f0 + 3.0, "three new NodePort flows");
    assert_eq!(metric(&after, new_verdicts), v0 + 3.0);
    assert_eq!(
        metric(&after, r#"lb_map_entries{map="LB4_FRONTENDS_V1"}"#),
        2.0,
        "ClusterIP and NodePort"
    );
    assert!(metric(&after, "lb_sync_duration_seconds_count") >= 1.0);
    assert!(metric(&after, "lb_network_programming_duration_seconds_count") >= 1.0);
    assert!(
        after.contains(r#"lb_errors_total{kind="source"}"#),
        "the missing folder was counted:\n{}",
        c.agent_log()
    );
}

/// (link id, program id) of every pinned link, by file name.
fn links(pins: &std::path::Path) -> std::collections::BTreeMap<String, (u32, u32)> {
    std::fs::read_dir(pins.join("links"))
        .unwrap()
        .flatten()
        .map(|e| {
            let link: aya::programs::links::FdLink =
                aya::programs::links::PinnedLink::from_pin(e.path())
                    .unwrap()
                    .into();
            let info = link.info().unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                (info.id(), info.program_id()),
            )
        })
        .collect()
}

fn wait_log(c: &Cluster, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.agent_log().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {times}x {needle:?} in the agent log:\n{}",
            c.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn restart_swaps_programs_under_the_links_and_reattaches_devices() {
    require_root();
    sweep();
    let mut t = Topology::new(2);
    t.start_pod_servers(8080);
    let mut c = Cluster::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        t,
        &[("web.yaml", &WEB.replace("NODE", NODE_NAME))],
    );
    c.wait_services("web", |s| s.len() == 1);
    wait_log(&c, "first sync done", 1);
    let before = links(&c.pins());
    assert_eq!(
        before.len(),
        10,
        "8 socket hooks (IPv4, IPv4-mapped IPv6) and 2 on eth0: {before:?}"
    );

    // A new agent loads its own programs and swaps them in under the same
    // links: same link ids, new program ids.
    c.agent.as_mut().unwrap().kill();
    c.start_agent();
    wait_log(&c, "first sync done", 1);
    let log = c.agent_log();
    assert!(
        log.contains("replaced=8") && log.contains("replaced=2"),
        "{log}"
    );
    let after = links(&c.pins());
    for (name, (link, prog)) in &before {
        let (link2, prog2) = after[name];
        assert_eq!(*link, link2, "{name}: same link");
        assert_ne!(*prog, prog2, "{name}: program swapped in");
    }
    let mut cmd = c.topo.client.command("curl");
    cmd.args(topo::curl_args(&format!("http://{NODE_IP}:30080/")));
    if let Err(e) = topo::curl(cmd) {
        let m = node_get(&c, "http://127.0.0.1:10249/metrics").1;
        let v: Vec<&str> = m.lines().filter(|l| l.starts_with("lb_datapath")).collect();
        panic!("{e}\n{v:#?}\n{}", c.agent_log());
    }

    // A device that appears is attached; deleted and made again under the
    // same name, it is attached again.
    let node = &c.topo.node;
    let add = || {
        node.run(&[
            "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum0p",
        ])
    };
    // The tc attachment's line (XDP's own line names the device too).
    let attached = "device programs in place device=dum0 ";
    add();
    wait_log(&c, attached, 1);
    assert!(links(&c.pins()).contains_key("lb_from_netdev@dum0"));
    node.run(&["ip", "link", "del", "dum0"]);
    add();
    wait_log(&c, attached, 2);
    let log = c.agent_log();
    let last = log.lines().rev().find(|l| l.contains(attached)).unwrap();
    assert!(
        last.contains("attached=2"),
        "re-attached, not replaced under a dead link: {last}"
    );
}

/// A tutorial's manifest, as written: no clusterIP, no nodePort.
const TUTORIAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  type: NodePort
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-a, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: NODE}
"#;

/// The ClusterIP and NodePort `lbctl services` shows for the one Service.
fn allocated(c: &Cluster) -> (String, u64) {
    let v = c.lbctl_json(&["services"]).unwrap();
    let fronts = v[0]["frontends"].as_array().unwrap().clone();
    let of = |kind: &str| {
        fronts
            .iter()
            .find(|f| f["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} frontend: {fronts:?}"))
            .clone()
    };
    (
        of("ClusterIP")["address"].as_str().unwrap().to_string(),
        of("NodePort")["port"].as_u64().unwrap(),
    )
}

#[test]
fn manifests_without_cluster_ip_get_one_that_survives_restarts() {
    require_root();
    sweep();
    let mut t = Topology::new(1);
    t.start_pod_servers(8080);
    let mut c = Cluster::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        t,
        &[("hello.yaml", &TUTORIAL.replace("NODE", NODE_NAME))],
    );
    c.wait_services("hello with a ClusterIP and a NodePort", |s| {
        s.len() == 1 && s[0]["frontends"].as_array().is_some_and(|f| f.len() == 2)
    });
    let (ip, np) = allocated(&c);
    let addr: std::net::Ipv4Addr = ip.parse().unwrap();
    // The default --service-cidr, 10.96.0.0/12; the default NodePort range.
    assert_eq!(
        u32::from(addr) >> 20,
        u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) >> 20
    );
    assert!((30000..=32767).contains(&np), "{np}");
    let pod = &c.topo.pod("pod-1").ns;
    assert_eq!(
        c.get_from_pod(pod, &format!("http://{ip}/")).trim(),
        "pod-1"
    );
    assert_eq!(
        c.get_from_client(&format!("http://{NODE_IP}:{np}/")).trim(),
        "pod-1"
    );
    // `lbctl diff` completes the folder as the agent does: no difference.
    let out = std::process::Command::new(&c.lbctl)
        .args([
            "diff",
            "--node-name",
            NODE_NAME,
            "--node-ip",
            &NODE_IP.to_string(),
        ])
        .arg("--manifests")
        .arg(&c.manifests)
        .arg("--bpffs")
        .arg(c.pins())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Restarted: the same address and port, nothing rewritten.
    c.agent.as_mut().unwrap().stop();
    c.start_agent();
    wait_log(&c, "first sync done writes=0", 1);
    assert_eq!(allocated(&c), (ip, np));
}

//! The agent against a real control plane built from upstream
//! (kube-apiserver, kube-controller-manager, kube-scheduler, etcd): the
//! agent runs with its own ServiceAccount's token and the ClusterRole from
//! `deploy/`; manifests are applied with `kubectl` as users write them (no
//! clusterIP: the API server allocates it); EndpointSlices come from the
//! real endpointslice and mirroring controllers; pods are bound by the real
//! scheduler and run by the test's stand-in for the kubelet. Real traffic
//! asserts every step.
//!
//! The tests take one control plane each and run one at a time (a
//! control plane's start is heavy on a two-core machine).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    controlplane::{self, SERVICE_CIDR},
    guard::{Proc, sweep},
    postgres::{Postgres, time_switch, which_server},
    realcluster::{RealCluster, deploy_dir},
    require_root,
    topo::{self, EXT_IP, NODE_B_IP, NODE_IP},
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lbctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e"))
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a test request comes from.
#[derive(Clone, Copy)]
enum From {
    /// pod-1, in the socket-LB cgroup (translated at connect()).
    Pod,
    /// The outside client (translated per packet on the node's device).
    Client,
}

fn get(rc: &RealCluster, from: From, url: &str) -> Result<String, String> {
    let args = topo::curl_args(url);
    match from {
        From::Pod => {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            topo::curl(rc.c.in_cgroup(&rc.c.topo.pod("pod-1").ns, "curl", &refs))
        }
        From::Client => {
            let mut c = rc.c.topo.client.command("curl");
            c.args(args);
            topo::curl(c)
        }
    }
}

/// GET `url` until `ok` holds for the answer, with a deadline.
fn wait_answer(rc: &RealCluster, from: From, url: &str, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        match get(rc, from, url) {
            Ok(body) if ok(body.trim()) => return,
            Ok(body) => last = body,
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what}: last answer {last:?}\nagent log:\n{}",
        rc.c.agent_log()
    );
}

/// What a failed request leaves to look at: the same request again, each
/// pod directly from pod-1, the nodes' neighbours.
fn diagnose(rc: &RealCluster, from: From, url: &str) -> String {
    let mut out = String::new();
    for _ in 0..3 {
        out.push_str(&format!("again: {:?}\n", get(rc, from, url)));
    }
    for p in rc.kubelets.running() {
        let (ns, name) = p.split_once('/').unwrap();
        let ip = rc.kubelets.pod(ns, name).ip;
        let direct = get(rc, From::Pod, &format!("http://{ip}:8080/"));
        out.push_str(&format!("pod-1 -> {ip}:8080 directly: {direct:?}\n"));
    }
    out.push_str(&rc.c.topo.node.run(&["ip", "neigh"]));
    out.push_str(&rc.c.topo.node_b.run(&["ip", "neigh"]));
    out
}

/// The names that answer `n` new connections to `url`; a failure panics
/// with what there is to see.
fn answers(rc: &RealCluster, from: From, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| match get(rc, from, url) {
            Ok(body) => body.trim().to_string(),
            Err(e) => panic!(
                "request {i} to {url}: {e}\n{}\nverdicts: {:?}\nservices: {}\nagent log:\n{}",
                diagnose(rc, from, url),
                rc.c.verdicts(),
                rc.c.lbctl_json(&["services"]).unwrap_or_default(),
                rc.c.agent_log()
            ),
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Pod names of a selector, as the API has them.
fn pod_names(rc: &RealCluster, ns: &str, selector: &str) -> BTreeSet<String> {
    let v = rc.cp.get_json(&["pods", "-n", ns, "-l", selector]);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

fn in_service_cidr(ip: &str) -> bool {
    let (net, bits) = SERVICE_CIDR.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let bits: u32 = bits.parse().unwrap();
    let ip: Ipv4Addr = ip.parse().expect("a ClusterIP");
    let mask = u32::MAX << (32 - bits);
    u32::from(ip) & mask == u32::from(net) & mask
}

const POSTGRES: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: db
---
apiVersion: v1
kind: Service
metadata:
  name: postgres
  namespace: db
spec:
  ports:
  - name: pg
    port: 5432
"#;

fn postgres_endpoints(ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Endpoints
metadata:
  name: postgres
  namespace: db
subsets:
- addresses:
  - ip: {ip}
  ports:
  - name: pg
    port: 5432
"#
    )
}

/// Twelve gateways on six hosts (ports 8080 and 8081 on each) behind one
/// Service port 80, as a Ceph RGW deployment outside the cluster is
/// published: the Endpoints form of the seeds' manifests.
fn gateways_endpoints(name: &str, hosts: &[Ipv4Addr]) -> String {
    let addrs: String = hosts.iter().map(|h| format!("  - ip: {h}\n")).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  ports:
  - name: http
    port: 80
---
apiVersion: v1
kind: Endpoints
metadata:
  name: {name}
  namespace: default
subsets:
- addresses:
{addrs}  ports:
  - name: http
    port: 8080
- addresses:
{addrs}  ports:
  - name: http
    port: 8081
"#
    )
}

/// The same gateways as hand-written EndpointSlices (what the Kubernetes
/// documentation recommends since v1 Endpoints were deprecated in 1.33):
/// one slice per port number, both with the port name `http`.
fn gateways_slices(name: &str, hosts: &[Ipv4Addr]) -> String {
    let eps: String = hosts
        .iter()
        .map(|h| format!("- addresses: [\"{h}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    let mut out = format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  ports:
  - name: http
    port: 80
"#
    );
    for port in [8080, 8081] {
        out.push_str(&format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{port}
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
    endpointslice.kubernetes.io/managed-by: storage-team
addressType: IPv4
ports:
- name: http
  port: {port}
  protocol: TCP
endpoints:
{eps}"#
        ));
    }
    out
}

#[test]
fn rbac_and_the_seed_manifests_against_kube_apiserver() {
    require_root();
    let _one = serial();
    sweep();
    let rc = RealCluster::start(&lbctl(), 1, 0);
    let cp = &rc.cp;

    // The agent's own credentials: exactly what it needs, nothing more.
    let as_agent = |args: &[&str]| {
        let mut all = vec!["--kubeconfig"];
        let kc = rc.kubeconfig().display().to_string();
        all.push(&kc);
        all.extend_from_slice(args);
        let out = cp.in_netns(&controlplane::bin("kubectl").display().to_string(), &all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (verb, resource) in [
        ("list", "services"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("get", "nodes"),
        ("watch", "servicecidrs.networking.k8s.io"),
    ] {
        let (ok, err) = as_agent(&["auth", "can-i", verb, resource, "-A"]);
        assert!(ok, "the agent may not {verb} {resource}: {err}");
    }
    let (ok, err) = as_agent(&["get", "secrets", "-A"]);
    assert!(!ok, "the agent's ServiceAccount may list Secrets");
    assert!(err.contains("Forbidden"), "not refused by RBAC: {err}");
    let (ok, _) = as_agent(&["get", "endpoints", "-A"]);
    assert!(!ok, "endpoints are only granted with --watch-endpoints");

    // The service CIDRs come from the API's ServiceCIDR objects (the API
    // server made one from its --service-cluster-ip-range): an address of
    // one that no Service has is dropped, as kube-proxy's nftables mode
    // does; one added by kubectl counts at once, and one deleted stops.
    let cidrs = |rc: &RealCluster| -> Vec<String> {
        rc.c.lbctl_json(&["status"])
            .ok()
            .and_then(|v| serde_json::from_value(v["datapath"]["service_cidrs"].clone()).ok())
            .unwrap_or_default()
    };
    let wait_cidrs = |want: &[&str]| {
        rc.cp.wait(
            "the service CIDRs in the datapath",
            Duration::from_secs(20),
            |_| cidrs(&rc) == want,
        );
    };
    wait_cidrs(&[SERVICE_CIDR]);
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: extra\n\
         spec:\n  cidrs: [\"10.200.0.0/24\", \"fd00:10:200::/112\"]\n",
    );
    wait_cidrs(&[SERVICE_CIDR, "10.200.0.0/24"]);
    let before = rc.c.verdicts()["drop_unallocated_service_ip"];
    let unallocated = get(&rc, From::Pod, "http://10.200.0.9/");
    assert!(
        unallocated.is_err(),
        "an unallocated address of the new ServiceCIDR answered: {unallocated:?}"
    );
    assert!(
        rc.c.verdicts()["drop_unallocated_service_ip"] > before,
        "not refused by the datapath: {unallocated:?}"
    );
    cp.kubectl_ok(&["delete", "servicecidr", "extra"]);
    wait_cidrs(&[SERVICE_CIDR]);

    // A selector-less Service and hand-written Endpoints naming a
    // PostgreSQL primary; the mirroring controller writes the slice.
    let t = &rc.c.topo;
    let primary = EXT_IP;
    let replica = Ipv4Addr::new(192, 168, 0, 11);
    t.ext
        .run(&["ip", "addr", "add", &format!("{replica}/24"), "dev", "eth0"]);
    let _pg1 = Postgres::start(&t.ext, primary, "primary");
    let _pg2 = Postgres::start(&t.ext, replica, "replica");
    cp.apply(POSTGRES);
    cp.apply(&postgres_endpoints(&primary.to_string()));
    let cluster_ip = rc.service_field("db", "postgres", ".spec.clusterIP");
    assert!(
        in_service_cidr(&cluster_ip),
        "{cluster_ip} not from {SERVICE_CIDR}"
    );
    rc.wait_backends("db/postgres", &[format!("{primary}:5432")]);
    let slices = cp.get_json(&[
        "endpointslices",
        "-n",
        "db",
        "-l",
        "kubernetes.io/service-name=postgres",
    ]);
    let managers: Vec<&str> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"].as_str())
        .collect();
    assert_eq!(
        managers,
        ["endpointslicemirroring-controller.k8s.io"],
        "the slice is the mirroring controller's"
    );
    let pod = &t.pod("pod-1").ns;
    let psql = || {
        let args = which_server(&cluster_ip);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        topo::curl(rc.c.in_cgroup(pod, "psql", &refs))
    };
    assert_eq!(psql().expect("psql to the primary"), "primary");
    cp.apply(&postgres_endpoints(&replica.to_string()));
    let took = time_switch(psql, "primary", "replica");
    eprintln!(
        "kubectl apply of the Endpoints -> new connections at the replica: {} ms",
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(1),
        "switch took {took:?} (mirroring controller + agent); promised under a second"
    );

    // Twelve gateways on six hosts behind one port.
    let hosts: Vec<Ipv4Addr> = (21..27).map(|h| Ipv4Addr::new(192, 168, 0, h)).collect();
    let mut servers: Vec<Proc> = Vec::new();
    for h in &hosts {
        t.ext
            .run(&["ip", "addr", "add", &format!("{h}/24"), "dev", "eth0"]);
        for port in [8080, 8081] {
            servers.push(topo::http_server_on(
                &t.ext.name,
                *h,
                port,
                &format!("{h}:{port}"),
            ));
        }
    }
    for h in &hosts {
        for port in [8080, 8081] {
            topo::Topology::wait_listening_on(&t.ext.name, &h.to_string(), port);
        }
    }
    let want: Vec<String> = hosts
        .iter()
        .flat_map(|h| [format!("{h}:8080"), format!("{h}:8081")])
        .collect();
    let all: BTreeSet<String> = want.iter().cloned().collect();
    cp.apply(&gateways_slices("ceph-rgw", &hosts));
    rc.wait_backends("default/ceph-rgw", &want);
    let rgw = rc.service_field("default", "ceph-rgw", ".spec.clusterIP");
    let seen = answers(&rc, From::Pod, &format!("http://{rgw}/"), 150);
    assert_eq!(seen, all, "150 requests did not reach all twelve gateways");

    // The Endpoints form: the mirroring controller of this release cannot
    // mirror it (both subsets carry port name `http` and it packs them
    // into one slice, which the API rejects: "ports[1].name: Duplicate
    // value"), so kube-proxy would give this Service no backend, and so
    // does the agent by default. With --watch-endpoints (and the optional
    // RBAC file) the agent reads the Endpoints of a Service that has no
    // EndpointSlice and serves all twelve.
    cp.apply(&gateways_endpoints("ceph-legacy", &hosts));
    rc.cp.wait(
        "the mirroring controller's verdict",
        Duration::from_secs(20),
        |cp| {
            std::fs::read_to_string(cp.dir.join("logs/kube-controller-manager.log"))
                .unwrap_or_default()
                .contains("Endpoints default/ceph-legacy")
        },
    );
    let slices = cp.get_json(&[
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=ceph-legacy",
    ]);
    assert_eq!(
        slices["items"].as_array().map_or(0, Vec::len),
        0,
        "the mirroring controller mirrored the two-subset Endpoints after all"
    );
    rc.wait_backends("default/ceph-legacy", &[]);
    let deploy = deploy_dir().join("optional").display().to_string();
    cp.kubectl_ok(&["apply", "-f", &deploy]);
    let mut rc = rc;
    rc.c.agent.as_mut().unwrap().stop();
    rc.c.source.push("--watch-endpoints".into());
    rc.c.start_agent();
    rc.wait_agent_ready();
    rc.wait_backends("default/ceph-legacy", &want);
    let legacy = rc.service_field("default", "ceph-legacy", ".spec.clusterIP");
    let seen = answers(&rc, From::Pod, &format!("http://{legacy}/"), 150);
    assert_eq!(seen, all, "the Endpoints form did not reach all twelve");
    drop(servers);
}

fn web_deployment(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: agnhost
        image: registry.k8s.io/e2e-test-images/agnhost:2.53
        args: ["netexec", "--http-port=8080"]
        ports:
        - containerPort: 8080
"#
    )
}

/// A cluster with Deployment `web` of `replicas` ready pods, exposed as a
/// NodePort Service the way users do it (`kubectl expose`).
fn web_exposed(replicas: usize) -> RealCluster {
    let mut rc = RealCluster::start(&lbctl(), 1, 0);
    rc.cp.apply(&web_deployment(replicas as u32));
    rc.wait_pods("default", "app=web", replicas);
    rc.cp.kubectl_ok(&[
        "expose",
        "deployment",
        "web",
        "--type=NodePort",
        "--port=80",
        "--target-port=8080",
    ]);
    rc
}

/// Two pods whose container port named `http` has different numbers.
const NAMED_PORTS: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: named-a
  labels: {app: named}
spec:
  containers:
  - name: c
    image: registry.k8s.io/e2e-test-images/agnhost:2.53
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: named-b
  labels: {app: named}
spec:
  containers:
  - name: c
    image: registry.k8s.io/e2e-test-images/agnhost:2.53
    ports: [{name: http, containerPort: 9090}]
---
apiVersion: v1
kind: Service
metadata:
  name: named
spec:
  selector: {app: named}
  ports:
  - port: 80
    targetPort: http
"#;

#[test]
fn deployments_exposed_scaled_flipped_and_retyped() {
    require_root();
    let _one = serial();
    sweep();
    // kubectl create deployment + expose --type NodePort.
    let mut rc = web_exposed(3);
    let names = pod_names(&rc, "default", "app=web");
    let ip = rc.service_field("default", "web", ".spec.clusterIP");
    let node_port = rc.service_field("default", "web", ".spec.ports[0].nodePort");
    let cluster_url = format!("http://{ip}/");
    let node_url = format!("http://{NODE_IP}:{node_port}/");
    wait_answer(
        &rc,
        From::Pod,
        &cluster_url,
        "web through its ClusterIP",
        |b| names.contains(b),
    );
    assert_eq!(
        answers(&rc, From::Pod, &cluster_url, 60),
        names,
        "ClusterIP"
    );
    assert_eq!(
        answers(&rc, From::Client, &node_url, 60),
        names,
        "NodePort on the Node object's address"
    );
    assert_eq!(
        answers(
            &rc,
            From::Client,
            &format!("http://{NODE_B_IP}:{node_port}/"),
            60
        ),
        names,
        "NodePort through node-b's agent"
    );

    // Scale up, then down: the real controllers and scheduler decide.
    rc.cp
        .kubectl_ok(&["scale", "deployment", "web", "--replicas=5"]);
    rc.wait_pods("default", "app=web", 5);
    let five = pod_names(&rc, "default", "app=web");
    assert_eq!(five.len(), 5);
    let five_ips: Vec<String> = five
        .iter()
        .map(|n| format!("{}:8080", rc.kubelets.pod("default", n).ip))
        .collect();
    rc.wait_backends("default/web", &five_ips);
    assert_eq!(
        answers(&rc, From::Pod, &cluster_url, 100),
        five,
        "scaled to 5"
    );
    rc.cp
        .kubectl_ok(&["scale", "deployment", "web", "--replicas=2"]);
    rc.wait_pods("default", "app=web", 2);
    let two = pod_names(&rc, "default", "app=web");
    let two_ips: Vec<String> = two
        .iter()
        .map(|n| format!("{}:8080", rc.kubelets.pod("default", n).ip))
        .collect();
    rc.wait_backends("default/web", &two_ips);
    assert_eq!(
        answers(&rc, From::Pod, &cluster_url, 40),
        two,
        "scaled to 2"
    );
    assert_eq!(
        answers(&rc, From::Client, &node_url, 40),
        two,
        "scaled to 2"
    );

    // Readiness flips: a pod that is not ready gets no new connection.
    let flipped = two.iter().next().unwrap().clone();
    let other: BTreeSet<String> = two.iter().filter(|n| **n != flipped).cloned().collect();
    rc.kubelets.set_ready(&rc.cp, "default", &flipped, false);
    let other_ip = format!(
        "{}:8080",
        rc.kubelets.pod("default", other.iter().next().unwrap()).ip
    );
    rc.wait_backends_ready("default/web", &[other_ip]);
    assert_eq!(
        answers(&rc, From::Pod, &cluster_url, 30),
        other,
        "not ready"
    );
    rc.kubelets.set_ready(&rc.cp, "default", &flipped, true);
    rc.wait_backends_ready("default/web", &two_ips);
    assert_eq!(
        answers(&rc, From::Pod, &cluster_url, 40),
        two,
        "ready again"
    );

    // Deleted and recreated: a new ClusterIP; the old one answers no more.
    rc.cp.kubectl_ok(&["delete", "service", "web"]);
    rc.c.wait_services("web gone", |s| {
        !s.iter()
            .any(|v| v["name"] == "web" && v["namespace"] == "default")
    });
    rc.cp.kubectl_ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let ip2 = rc.service_field("default", "web", ".spec.clusterIP");
    wait_answer(
        &rc,
        From::Pod,
        &format!("http://{ip2}/"),
        "the recreated Service",
        |b| two.contains(b),
    );
    if ip2 != ip {
        let args = topo::curl_args(&cluster_url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let pod = &rc.c.topo.pod("pod-1").ns;
        assert!(
            topo::curl(rc.c.in_cgroup(pod, "curl", &refs)).is_err(),
            "the deleted Service's ClusterIP still answers"
        );
    }

    // Type changes: ClusterIP -> NodePort -> ExternalName -> ClusterIP.
    let url2 = format!("http://{ip2}/");
    rc.cp.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let np = rc.service_field("default", "web", ".spec.ports[0].nodePort");
    assert!(!np.is_empty(), "no nodePort allocated");
    let np_url = format!("http://{NODE_IP}:{np}/");
    wait_answer(&rc, From::Client, &np_url, "the new NodePort", |b| {
        two.contains(b)
    });
    rc.cp.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec":{"type":"ExternalName","externalName":"web.example.com"}}"#,
    ]);
    assert_eq!(
        rc.service_field("default", "web", ".spec.clusterIP"),
        "",
        "the API server keeps a ClusterIP on an ExternalName Service"
    );
    rc.c.wait_services("web unprogrammed as ExternalName", |s| {
        !s.iter()
            .any(|v| v["name"] == "web" && v["namespace"] == "default")
    });
    rc.cp.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec":{"type":"ClusterIP","externalName":null}}"#,
    ]);
    let ip3 = rc.service_field("default", "web", ".spec.clusterIP");
    assert!(in_service_cidr(&ip3), "no ClusterIP after ExternalName");
    wait_answer(
        &rc,
        From::Pod,
        &format!("http://{ip3}/"),
        "ClusterIP again",
        |b| two.contains(b),
    );
    let _ = url2;

    // A named targetPort that differs per pod.
    rc.cp.apply(NAMED_PORTS);
    rc.wait_pods("default", "app=named", 2);
    let a = rc.kubelets.pod("default", "named-a").ip;
    let b = rc.kubelets.pod("default", "named-b").ip;
    rc.wait_backends("default/named", &[format!("{a}:8080"), format!("{b}:9090")]);
    let named_ip = rc.service_field("default", "named", ".spec.clusterIP");
    assert_eq!(
        answers(&rc, From::Pod, &format!("http://{named_ip}/"), 40),
        set(&["named-a", "named-b"]),
        "named targetPort resolved per pod"
    );

    // Health check node ports: a LoadBalancer Service with
    // externalTrafficPolicy Local gets one from the API server; each
    // node's agent answers it with its own count of ready endpoints.
    rc.cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: local}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, selector: {app: named}, ports: [{port: 80, targetPort: http}]}\n",
    );
    let hc = rc.service_field("default", "local", ".spec.healthCheckNodePort");
    assert!(!hc.is_empty(), "no healthCheckNodePort allocated");
    let on = |node: &str| {
        ["named-a", "named-b"]
            .iter()
            .filter(|p| rc.kubelets.pod("default", p).node == node)
            .count()
    };
    for (ns, node) in [(&rc.c.topo.node, "node-a"), (&rc.c.topo.node_b, "node-b")] {
        let want = on(node);
        let deadline = Instant::now() + Duration::from_secs(20);
        let (code, headers, body) = loop {
            let out = ns
                .command("curl")
                .args([
                    "-s",
                    "-m",
                    "2",
                    "-D",
                    "-",
                    "-o",
                    "-",
                    "-w",
                    "\n%{http_code}",
                ])
                .arg(format!("http://127.0.0.1:{hc}/"))
                .output()
                .expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
            let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or(("", rest));
            let code: u16 = code.trim().parse().unwrap_or(0);
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            if code != 0 && v["localEndpoints"] == want {
                break (code, headers.to_lowercase(), v);
            }
            assert!(
                Instant::now() < deadline,
                "{node}: health check node port {hc}: {code} {text}"
            );
            thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(code, if want > 0 { 200 } else { 503 }, "{node}: {body}");
        assert_eq!(body["service"]["name"], "local", "{body}");
        assert_eq!(body["serviceProxyHealthy"], true, "{body}");
        assert!(
            headers.contains(&format!("x-load-balancing-endpoint-weight: {want}")),
            "{node}: {headers}"
        );
    }
    rc.cp.kubectl_ok(&["delete", "service", "local"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out =
            rc.c.topo
                .node
                .command("curl")
                .args(["-s", "-m", "2"])
                .arg(format!("http://127.0.0.1:{hc}/"))
                .output()
                .expect("curl");
        if out.status.code() == Some(7) {
            break; // refused: the listener went with the Service
        }
        assert!(
            Instant::now() < deadline,
            "the health check node port outlived its Service"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // sessionAffinity set with kubectl: the API server's default timeout
    // (10800 s) reaches the maps, and every connection of one pod goes to
    // one backend.
    rc.cp.kubectl_ok(&[
        "patch",
        "service",
        "named",
        "-p",
        r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
    ]);
    rc.c.wait_services("named with session affinity", |s| {
        s.iter().any(|v| {
            v["name"] == "named"
                && v["session_affinity_timeout_s"] == 10800
                && v["not_enforced"].as_array().is_some_and(Vec::is_empty)
        })
    });
    let sticky = answers(&rc, From::Pod, &format!("http://{named_ip}/"), 20);
    assert_eq!(
        sticky.len(),
        1,
        "one pod, two backends under affinity: {sticky:?}"
    );

    // The Node's address moves: NodePorts follow the Node object.
    let moved = Ipv4Addr::new(172, 18, 0, 20);
    rc.c.topo
        .node
        .run(&["ip", "addr", "add", &format!("{moved}/24"), "dev", "eth0"]);
    rc.cp.kubectl_ok(&[
        "patch",
        "node",
        "node-a",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{moved}"}},{{"type":"Hostname","address":"node-a"}}]}}}}"#
        ),
    ]);
    rc.cp.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let np = rc.service_field("default", "web", ".spec.ports[0].nodePort");
    let moved_url = format!("http://{moved}:{np}/");
    wait_answer(
        &rc,
        From::Client,
        &moved_url,
        "the NodePort on the Node's new address",
        |b| two.contains(b),
    );

    // kube-proxy's endpoints: a Node tainted for deletion by the cluster
    // autoscaler fails /healthz (load balancers drain it) but not /livez;
    // /proxyMode answers on the metrics port.
    let taint = "ToBeDeletedByClusterAutoscaler=1:NoSchedule";
    rc.cp.kubectl_ok(&["taint", "node", "node-a", taint]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rc.agent_get("/healthz").0 != 503 {
        assert!(
            Instant::now() < deadline,
            "/healthz stayed 200 on a node being deleted"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (_, body) = rc.agent_get("/healthz");
    let v: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    assert_eq!(v["nodeEligible"], false, "{body}");
    assert!(
        v["lastUpdated"].is_string() && v["currentTime"].is_string(),
        "{body}"
    );
    assert_eq!(rc.agent_get("/livez").0, 200, "/livez looks at the node");
    rc.cp.kubectl_ok(&[
        "taint",
        "node",
        "node-a",
        "ToBeDeletedByClusterAutoscaler:NoSchedule-",
    ]);
    while rc.agent_get("/healthz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "/healthz stayed 503 after the taint went"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let out =
        rc.c.topo
            .node
            .command("curl")
            .args(["-s", "-m", "2", "http://127.0.0.1:10249/proxyMode"])
            .output()
            .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ebpf");

    // lbctl as an unprivileged user: a clear word, not EPERM.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&rc.c.lbctl)
        .args(["services", "--bpffs"])
        .arg(rc.c.pins())
        .output()
        .expect("setpriv lbctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("root"),
        "lbctl services without privileges: {err}"
    );

    // lbctl diff, against the real API with the agent's credentials: the
    // maps hold exactly what the API says.
    let out =
        rc.c.topo
            .node
            .command(&rc.c.lbctl.display().to_string())
            .args(["diff", "--kubeconfig"])
            .arg(rc.kubeconfig())
            .args(["--node-name", "node-a", "--bpffs"])
            .arg(rc.c.pins())
            .output()
            .expect("lbctl diff");
    assert!(
        out.status.success(),
        "lbctl diff against kube-apiserver: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requests sent steadily through `url` from the outside client and from
/// pod-1 by a background thread; counts the failures.
struct Steady {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Steady {
    fn start(rc: &RealCluster, client_url: String, pod_url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let client_ns = rc.c.topo.client.name.clone();
        let pod_cmd = {
            let args = topo::curl_args(&pod_url);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let c = rc.c.in_cgroup(&rc.c.topo.pod("pod-1").ns, "curl", &refs);
            (
                c.get_program().to_owned(),
                c.get_args().map(|a| a.to_owned()).collect::<Vec<_>>(),
            )
        };
        let mut threads = Vec::new();
        for which in 0..2 {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            let client_ns = client_ns.clone();
            let client_url = client_url.clone();
            let pod_cmd = pod_cmd.clone();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let cmd = if which == 0 {
                        let mut c = std::process::Command::new("ip");
                        c.args(["netns", "exec", &client_ns, "curl"])
                            .args(topo::curl_args(&client_url));
                        c
                    } else {
                        let mut c = std::process::Command::new(&pod_cmd.0);
                        c.args(&pod_cmd.1);
                        c
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = topo::curl(cmd) {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("{}: {e}", ["client", "pod"][which]));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        Self {
            stop,
            sent,
            failed,
            threads,
        }
    }

    /// Stops and returns (sent, failures).
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.lock().unwrap().clone(),
        )
    }
}

#[test]
fn forwarding_survives_agent_apiserver_and_etcd_disruption() {
    require_root();
    let _one = serial();
    sweep();
    let mut rc = web_exposed(2);
    let ip = rc.service_field("default", "web", ".spec.clusterIP");
    let np = rc.service_field("default", "web", ".spec.ports[0].nodePort");
    let names = pod_names(&rc, "default", "app=web");
    wait_answer(&rc, From::Pod, &format!("http://{ip}/"), "web", |b| {
        names.contains(b)
    });
    let steady = Steady::start(
        &rc,
        format!("http://{NODE_IP}:{np}/"),
        format!("http://{ip}/"),
    );

    // 1. The agent killed (SIGKILL) and restarted: the pinned datapath
    //    keeps forwarding; the new agent adopts it and becomes ready.
    rc.c.agent.as_mut().unwrap().kill();
    thread::sleep(Duration::from_millis(500));
    rc.c.start_agent();
    rc.wait_agent_ready();

    // 2. kube-apiserver restarted; a change made after it is followed.
    rc.cp.stop_apiserver();
    assert_eq!(rc.agent_get("/healthz").0, 200, "healthz during API outage");
    rc.cp.start_apiserver();
    rc.cp
        .kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    rc.wait_pods("default", "app=web", 3);
    let three: Vec<String> = pod_names(&rc, "default", "app=web")
        .iter()
        .map(|n| format!("{}:8080", rc.kubelets.pod("default", n).ip))
        .collect();
    rc.wait_backends("default/web", &three);

    // 3. etcd compacted past every watch's revision while the API server
    //    restarts: resumed watches get 410 Gone and the agent relists.
    let lists = |rc: &RealCluster| rc.agent_metric(r#"lb_source_lists_total{kind="Service"}"#);
    let before = lists(&rc);
    rc.cp.stop_apiserver();
    rc.cp.compact_etcd();
    rc.cp.start_apiserver();
    // The scale-down deletes a pod, which the stand-in kubelet stops 5 s
    // later: it is made once the agent watches again (its re-list done),
    // as a real pod's grace period outlasts a proxy's reconnect. Before
    // that no datapath can know the pod is going, and new connections to
    // it would time out (kube-proxy's too).
    let deadline = Instant::now() + Duration::from_secs(75);
    while lists(&rc) <= before {
        assert!(
            Instant::now() < deadline,
            "no re-list after the history was compacted ({before} lists before)"
        );
        thread::sleep(Duration::from_millis(100));
    }
    rc.cp
        .kubectl_ok(&["scale", "deployment", "web", "--replicas=2"]);
    rc.wait_pods("default", "app=web", 2);
    let two: Vec<String> = pod_names(&rc, "default", "app=web")
        .iter()
        .map(|n| format!("{}:8080", rc.kubelets.pod("default", n).ip))
        .collect();
    rc.wait_backends("default/web", &two);
    assert!(
        lists(&rc) > before,
        "no re-list after the history was compacted ({before} lists before)"
    );

    // 4. The API server unreachable for 30 s (its link down): forwarding
    //    goes on, /healthz and /readyz stay 200 (nothing waits for the
    //    maps), and a change made during the outage lands after it.
    topo::ip(&rc.cp.netns, &["link", "set", "eth0", "down"]);
    let outage = Instant::now();
    rc.cp
        .kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    while outage.elapsed() < Duration::from_secs(30) {
        assert_eq!(rc.agent_get("/healthz").0, 200, "healthz in the outage");
        assert_eq!(rc.agent_get("/readyz").0, 200, "readyz in the outage");
        thread::sleep(Duration::from_secs(1));
    }
    topo::ip(&rc.cp.netns, &["link", "set", "eth0", "up"]);
    rc.wait_pods("default", "app=web", 3);
    let three: Vec<String> = pod_names(&rc, "default", "app=web")
        .iter()
        .map(|n| format!("{}:8080", rc.kubelets.pod("default", n).ip))
        .collect();
    rc.wait_backends("default/web", &three);

    assert!(
        rc.agent_metric(r#"lb_errors_total{kind="watch"}"#) > 0.0,
        "the outages were not counted as watch errors"
    );
    let (sent, failed) = steady.finish();
    eprintln!(
        "{sent} requests through the disruptions, {} failed",
        failed.len()
    );
    assert!(sent > 100, "too few requests sent ({sent})");
    assert!(failed.is_empty(), "requests failed: {failed:?}");
}

#[test]
fn deploy_manifests_and_the_chart_pass_server_side_dry_run() {
    require_root();
    let _one = serial();
    sweep();
    let t = topo::Topology::new(0);
    let cp = controlplane::ControlPlane::start(&t.lan, "lan0", controlplane::CP_IP);
    // A server-side dry run checks each object against the API (schema,
    // defaults, admission) without storing it, so the namespace the
    // others live in must exist for real.
    cp.kubectl_ok(&["create", "namespace", "lb-system"]);
    let deploy = deploy_dir().display().to_string();
    cp.kubectl_ok(&["apply", "--dry-run=server", "-f", &deploy]);
    let optional = deploy_dir().join("optional").display().to_string();
    cp.kubectl_ok(&["apply", "--dry-run=server", "-f", &optional]);
    let chart = deploy_dir().parent().unwrap().join("charts/lbctl");
    let rendered = std::process::Command::new(controlplane::bin("helm"))
        .args(["template", "lbctl"])
        .arg(&chart)
        .args(["--namespace", "lb-system"])
        .output()
        .expect("helm template");
    assert!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let out = cp.kubectl_stdin(
        &["apply", "--dry-run=server", "-f", "-"],
        &String::from_utf8_lossy(&rendered.stdout),
    );
    assert!(
        out.status.success(),
        "dry run of helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

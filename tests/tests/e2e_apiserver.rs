//! The agent's cluster source against the in-repo API server (real HTTP
//! list/watch): it programs nothing before every kind has listed, follows
//! watch events, resumes a dropped watch from where it was (bookmarks keep
//! that point fresh), re-lists after 410 Gone and prunes what the re-list
//! no longer has, keeps the datapath through an API outage, skips a bad
//! object alone, follows its Node's addresses, and reads hand-written
//! Endpoints with `--watch-endpoints`. `/readyz` and `/healthz` are checked
//! along the way.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    apiserver::{ApiServer, ENDPOINTSLICES, SERVICES},
    guard::{Bpffs, Cgroup, Netns, Proc, sweep, unique},
    require_root,
};
use serde_json::Value;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: node-a}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: e2e, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: e2e}
spec: {clusterIP: 10.96.0.11, selector: {app: old}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: old-a, namespace: e2e, labels: {kubernetes.io/service-name: old}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.21]}]
---
apiVersion: v1
kind: Service
metadata: {name: pg, namespace: e2e}
spec: {clusterIP: 10.96.0.12, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: pg, namespace: e2e}
subsets: [{addresses: [{ip: 192.168.0.10}], ports: [{port: 5432}]}]
"#;

fn slice_web(ips: &[&str]) -> String {
    let eps: Vec<String> = ips
        .iter()
        .map(|ip| format!("- {{addresses: [{ip}], nodeName: node-a}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-a, namespace: e2e, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}\n",
        eps.join("\n")
    )
}

struct Harness {
    ns: Netns,
    lbctl: PathBuf,
    bpffs: Bpffs,
    work: PathBuf,
    _cg: Cgroup,
    agent: Option<Proc>,
}

impl Harness {
    fn services(&self) -> Vec<Value> {
        let out = Command::new(&self.lbctl)
            .args(["services", "-o", "json", "--bpffs"])
            .arg(self.bpffs.pins())
            .output()
            .expect("lbctl services");
        if !out.status.success() {
            return vec![];
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// `lbctl status -o json`'s agent record.
    fn agent_status(&self) -> Value {
        let out = Command::new(&self.lbctl)
            .args(["status", "-o", "json", "--bpffs"])
            .arg(self.bpffs.pins())
            .output()
            .expect("lbctl status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["agent"].clone()
    }

    fn service(&self, name: &str) -> Option<Value> {
        self.services().into_iter().find(|s| s["name"] == name)
    }

    fn backends(&self, name: &str) -> Vec<String> {
        let mut b: Vec<String> = self
            .service(name)
            .and_then(|s| s["backends"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
            .collect();
        b.sort();
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("agent.log")).unwrap_or_default()
    }

    /// Waits until `ok` holds (checked every 50 ms, for up to 10 s).
    fn wait(&self, what: &str, ok: impl Fn(&Self) -> bool) -> Duration {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if ok(self) {
                return start.elapsed();
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; services: {:?}\nagent log:\n{}",
            self.services(),
            self.log()
        );
    }

    /// GET on the agent's health listener, inside its namespace.
    fn get(&self, path: &str) -> (u16, String) {
        let out = self
            .ns
            .command("curl")
            .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:10256{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.0.kill();
            let _ = a.0.wait();
        }
        let _ = Command::new(&self.lbctl)
            .args(["agent", "--cleanup", "--bpffs"])
            .arg(self.bpffs.pins())
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn start_agent(h: &mut Harness, kubeconfig: &Path) {
    let log = std::fs::File::create(h.work.join("agent.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.ns.name))
        .arg(&h.lbctl)
        .args([
            "agent",
            "--watch-endpoints",
            "--datapath-logs",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .arg("--bpffs")
        .arg(h.bpffs.pins())
        .arg("--cgroup")
        .arg(&h._cg.path)
        .args(["--node-name", "node-a", "--poll-ms", "100"])
        .env("RUST_LOG", "info,datapath=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start lbctl agent");
    h.agent = Some(Proc(child));
}

#[test]
fn agent_follows_the_api_through_watches_relists_and_outages() {
    require_root();
    sweep();
    let ns = Netns::new("api");
    let mut api = ApiServer::start_in(Some(&ns.name));
    api.apply_yaml(OBJECTS);
    let work = std::env::temp_dir().join(unique("ap"));
    std::fs::create_dir_all(&work).unwrap();
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut h = Harness {
        ns,
        lbctl: PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        bpffs: Bpffs::new(),
        work,
        _cg: Cgroup::new(),
        agent: None,
    };

    // 1. Services listed but EndpointSlices not yet: nothing is programmed
    //    (a Service would look backend-less) and the agent is not ready.
    api.hold(ENDPOINTSLICES);
    start_agent(&mut h, &kubeconfig);
    h.wait("the agent to list Services", |_| {
        api.requests().iter().any(|r| r == "list services")
            && api.requests().iter().any(|r| r == "list endpointslices")
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        h.get("/readyz").0,
        503,
        "ready before EndpointSlices listed"
    );
    assert!(
        h.services().is_empty(),
        "programmed before every kind listed"
    );
    api.release();
    h.wait("the first sync", |h| {
        h.backends("web") == ["10.244.1.11:8080", "10.244.1.12:8080"]
    });
    let web = h.service("web").unwrap();
    let fronts: Vec<String> = web["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {}:{}",
                f["kind"].as_str().unwrap(),
                f["address"].as_str().unwrap(),
                f["port"]
            )
        })
        .collect();
    assert!(
        fronts.contains(&"ClusterIP 10.96.0.10:80".to_string()),
        "{fronts:?}"
    );
    assert!(
        fronts.contains(&"NodePort 172.18.0.2:30080".to_string()),
        "NodePort on the Node's InternalIP: {fronts:?}"
    );
    assert_eq!(
        h.backends("pg"),
        ["192.168.0.10:5432"],
        "hand-written Endpoints with --watch-endpoints"
    );
    assert_eq!(h.backends("old"), ["10.244.1.21:8080"]);
    h.wait("readyz", |h| h.get("/readyz").0 == 200);
    let (code, body) = h.get("/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("lastUpdated"), "{body}");

    // 2. A watch event: one endpoint more.
    api.apply_yaml(&slice_web(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]));
    let took = h.wait("a watched EndpointSlice change", |h| {
        h.backends("web").len() == 3
    });
    eprintln!(
        "watch event to maps: {} ms (polling every 50 ms)",
        took.as_millis()
    );

    // 2b. A Service without endpoints refuses connections at connect(),
    //     and the datapath says so in the agent's log (--datapath-logs).
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: e2e}\nspec: {clusterIP: 10.96.0.15, ports: [{port: 80}]}\n",
    );
    h.wait("the empty Service", |h| h.service("empty").is_some());
    let procs = h._cg.path.join("cgroup.procs");
    // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.ns.name))
        .args(["sh", "-c"])
        .arg(format!(
            "echo $$ > {} && exec curl -s -m 2 http://10.96.0.15/",
            procs.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: connection refused expected"
    );
    h.wait("the datapath's log record", |h| {
        h.log().contains("refuse connect to 10.96.0.15:80")
    });

    // 3. Bookmarks: a watch that saw no event of its kind still advances;
    //    after a dropped connection, every watch resumes (no re-list) from
    //    a version at least that of the last change anywhere.
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: later, namespace: e2e}\nspec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}\n",
    );
    thread::sleep(Duration::from_millis(800)); // > the 300 ms bookmark period
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("list"))
        .count();
    let seen = api.requests().len();
    api.drop_watches();
    api.apply_yaml(&slice_web(&["10.244.1.11", "10.244.1.13"]));
    h.wait("a change after a dropped watch", |h| {
        h.backends("web") == ["10.244.1.11:8080", "10.244.1.13:8080"]
    });
    let after: Vec<String> = api.requests()[seen..].to_vec();
    assert_eq!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with("list"))
            .count(),
        lists_before,
        "a dropped watch re-listed: {after:?}"
    );
    let resumed = after
        .iter()
        .find(|r| r.starts_with("watch endpointslices rv="))
        .unwrap_or_else(|| panic!("no resumed slice watch in {after:?}"));
    let rv: u64 = resumed.rsplit('=').next().unwrap().parse().unwrap();
    // The `later` Service was the 9th write; the slice watch's own last
    // event was the 8th.
    assert!(
        rv >= 9,
        "slice watch resumed from {rv}: bookmarks not used ({after:?})"
    );

    // 4. A bad object is reported by name and skipped; the rest stays.
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: e2e}\nspec: {clusterIP: 10.96.0.14, ports: [{port: 80, protocol: FOO}]}\n",
    );
    h.wait("the bad Service reported", |h| {
        h.log().contains("e2e/bad") && h.log().contains("FOO")
    });
    assert!(h.service("bad").is_none());
    assert_eq!(h.backends("web").len(), 2);
    // `lbctl status` names the source and the last error, from the
    // agent's pinned record.
    let st = h.agent_status();
    assert_eq!(st["source"], "api", "{st:#}");
    assert!(
        st["source_location"]
            .as_str()
            .unwrap()
            .starts_with("http://"),
        "{st:#}"
    );
    assert_eq!(st["ready"], true, "{st:#}");
    assert!(st["errors"].as_u64().unwrap() >= 1, "{st:#}");
    assert!(
        st["last_error"].as_str().unwrap().contains("e2e/bad"),
        "{st:#}"
    );

    // 5. The API server goes away: the datapath keeps its state and the
    //    agent stays healthy and ready (nothing is waiting to be written).
    api.stop();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(h.backends("web").len(), 2, "state lost during an outage");
    assert!(h.service("old").is_some());
    assert_eq!(h.get("/readyz").0, 200);
    assert_eq!(h.get("/healthz").0, 200);
    // Meanwhile the cluster changes and etcd compacts its history: the
    // agent's watch versions are gone (410), so it must re-list, and the
    // re-list must prune the deleted Service.
    assert!(api.delete(SERVICES, "e2e", "old"));
    api.apply_yaml(&slice_web(&["10.244.1.14"]));
    api.compact();
    let seen = api.requests().len();
    api.restart();
    h.wait("re-list after 410 Gone", |h| {
        h.service("old").is_none() && h.backends("web") == ["10.244.1.14:8080"]
    });
    let after: Vec<String> = api.requests()[seen..].to_vec();
    assert!(
        after.iter().any(|r| r == "list services"),
        "no re-list after 410: {after:?}"
    );
    assert!(
        h.agent.as_mut().unwrap().0.try_wait().unwrap().is_none(),
        "agent exited"
    );

    // 6. The Node's address changes: NodePorts follow.
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.9}]}\n",
    );
    h.wait("NodePort on the new node address", |h| {
        h.service("web").is_some_and(|s| {
            s["frontends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["kind"] == "NodePort" && f["address"] == "172.18.0.9")
                && !s["frontends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["address"] == "172.18.0.2")
        })
    });

    // 7. The metrics saw watch events of every kind.
    let out =
        h.ns.command("curl")
            .args(["-s", "-m", "2", "http://127.0.0.1:10249/metrics"])
            .output()
            .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    for kind in ["Service", "EndpointSlice", "Endpoints", "Node"] {
        assert!(
            metrics.contains(&format!("lb_source_events_total{{kind=\"{kind}\"}}")),
            "no {kind} events in metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("lb_errors_total{kind=\"watch\"}"),
        "outage not counted:\n{metrics}"
    );
}

//! The agent's cluster source against the in-repo API server (real HTTP
//! list/watch), for the faults kube-apiserver cannot be made to produce on
//! demand (everything else runs against the real control plane, in
//! `e2e_cluster.rs`): one kind's list held while the others answer (the
//! agent programs nothing and is not ready), watches dropped mid-stream
//! (resumed from a bookmarked version, no re-list), and an object the real
//! API server would refuse (reported by name, skipped alone).

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    apiserver::{ApiServer, ENDPOINTSLICES},
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
    /// `lbctl services` as the maps hold it this instant, pass or not.
    fn services_now(&self) -> Vec<Value> {
        let out = Command::new(&self.lbctl)
            .args(["services", "-o", "json", "--bpffs"])
            .arg(self.bpffs.pins())
            .output()
            .expect("lbctl services");
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// `lbctl services`, as a finished write pass left the maps (empty
    /// while a pass runs).
    fn services(&self) -> Vec<Value> {
        lb_tests::topo::settled_services(&self.lbctl, &self.bpffs.pins())
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
        lb_tests::topo::agent_get(&self.ns, path)
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
    let api = ApiServer::start_in(Some(&ns.name));
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
        h.services_now().is_empty(),
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
}

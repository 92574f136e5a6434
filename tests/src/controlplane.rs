//! A real Kubernetes control plane, built from upstream (`cargo xtask
//! setup` builds etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubectl and helm from the Go modules in
//! `tests/cluster/` and links them into `target/cluster-bin/`).
//!
//! Everything runs in a network namespace of its own, joined to the test's
//! LAN bridge by a veth: the API server listens on that namespace's
//! addresses only (its loopback and `CP_IP`), never on the machine's.
//! Every file (PKI, etcd data, logs, kubeconfigs) lives in one temporary
//! folder; processes are stopped by PID and the folder is removed on drop,
//! even when the test fails.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::guard::{Cgroup, Netns, PREFIX, Proc, unique};

/// The control plane's address on the LAN (the nodes reach the API server
/// there, as kubelets reach a control-plane node).
pub const CP_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);
pub const API_PORT: u16 = 6443;
/// ClusterIPs are allocated from here by the API server.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const NODEPORT_RANGE: &str = "30000-32767";
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";

/// Where `cargo xtask setup` links the upstream binaries.
pub fn bin_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    root.join("target/cluster-bin")
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask setup` builds the control plane from tests/cluster/",
        p.display()
    );
    p
}

/// The Kubernetes release the Go module pins.
pub fn kubernetes_version() -> String {
    let gomod = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/kubernetes/go.mod");
    let text = std::fs::read_to_string(&gomod).expect("tests/cluster/kubernetes/go.mod");
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("k8s.io/kubernetes"), Some(v)) => Some(v.to_string()),
                (Some("require"), Some("k8s.io/kubernetes")) => w.next().map(str::to_string),
                _ => None,
            }
        })
        .expect("go.mod requires k8s.io/kubernetes")
}

/// The cluster's PKI: one CA, the API server's serving certificate, client
/// certificates for the admin and each component, and the ServiceAccount
/// token signing key; with real nodes also each kubelet's client
/// certificate (`system:node:<name>` in `system:nodes`, as the Node
/// authorizer expects), the API server's client certificate for the
/// kubelets (exec, logs, port-forward) and the CA key the controller
/// manager signs with.
fn write_pki(dir: &Path, ip: Ipv4Addr, nodes: &[String]) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "lb-test-cluster-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write ca.crt");
    if !nodes.is_empty() {
        std::fs::write(dir.join("ca.key"), ca_key.serialize_pem()).expect("write ca.key");
    }
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |name: &str, cn: &str, org: Option<&str>, sans: Vec<String>, server: bool| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
    };
    leaf(
        "apiserver",
        "kube-apiserver",
        None,
        vec![
            ip.to_string(),
            "127.0.0.1".into(),
            // The `kubernetes` Service's ClusterIP: the first of the CIDR.
            "10.96.0.1".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ],
        true,
    );
    leaf(
        "admin",
        "lb-test-admin",
        Some("system:masters"),
        vec![],
        false,
    );
    leaf(
        "controller-manager",
        "system:kube-controller-manager",
        None,
        vec![],
        false,
    );
    leaf("scheduler", "system:kube-scheduler", None, vec![], false);
    for node in nodes {
        leaf(
            &format!("kubelet-{node}"),
            &format!("system:node:{node}"),
            Some("system:nodes"),
            vec![],
            false,
        );
    }
    if !nodes.is_empty() {
        leaf(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            vec![],
            false,
        );
    }
    let sa = KeyPair::generate().expect("SA key");
    std::fs::write(dir.join("sa.key"), sa.serialize_pem()).expect("write sa.key");
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem()).expect("write sa.pub");
}

fn kubeconfig_with(server: &str, ca: &Path, user: &str) -> String {
    let ca = std::fs::read(ca).expect("ca.crt");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lb\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\ncontexts:\n- name: lb\n  context: {{cluster: lb, user: u}}\ncurrent-context: lb\nusers:\n- name: u\n  user:\n{user}",
        base64(&ca)
    )
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A running control plane. Dropping it stops every process (by PID),
/// deletes its namespace and its folder.
pub struct ControlPlane {
    pub netns: Netns,
    pub dir: PathBuf,
    pub ip: Ipv4Addr,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    controller_manager: Option<Proc>,
    scheduler: Option<Proc>,
    /// Real kubelets' node names (empty when the tests stand in for them).
    nodes: Vec<String>,
    /// A test's control plane runs in a cgroup of the test's (named with
    /// its PID), so a run that dies before its drop leaves nothing the
    /// next run's sweep does not kill. Last: dropped after the processes.
    cgroup: Option<Cgroup>,
}

impl ControlPlane {
    /// Starts the control plane in a namespace of its own, joined to the
    /// bridge `bridge` of `lan` at `ip`/24, and waits until the API server
    /// is ready and the controllers have made the default ServiceAccount.
    pub fn start(lan: &Netns, bridge: &str, ip: Ipv4Addr) -> Self {
        let port = unique("cp");
        Self::start_in(
            lan,
            bridge,
            ip,
            Netns::new("cp"),
            &port,
            std::env::temp_dir().join(unique("kc")),
        )
    }

    /// As `start`, with the namespace, the LAN port's name and the folder
    /// given (`cargo xtask cluster up` names them so they outlive it).
    pub fn start_in(
        lan: &Netns,
        bridge: &str,
        ip: Ipv4Addr,
        netns: Netns,
        port: &str,
        dir: PathBuf,
    ) -> Self {
        Self::start_for_nodes(lan, bridge, ip, netns, port, dir, &[])
    }

    /// As `start_in`, for real kubelets named `nodes`: their credentials,
    /// the API server's client certificate for them, and every controller
    /// of kube-controller-manager's default set (a real cluster's, node
    /// lifecycle included) instead of the few the stand-in needs.
    pub fn start_for_nodes(
        lan: &Netns,
        bridge: &str,
        ip: Ipv4Addr,
        netns: Netns,
        port: &str,
        dir: PathBuf,
        nodes: &[&str],
    ) -> Self {
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        std::fs::create_dir_all(dir.join("logs")).expect("control plane folder");
        let port = &port[port.len().saturating_sub(15)..];
        crate::topo::veth(lan, port, &netns, "eth0");
        crate::topo::ip(lan, &["link", "set", port, "master", bridge]);
        crate::topo::ip(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        write_pki(&dir, ip, &nodes);
        let server = format!("https://{ip}:{API_PORT}");
        let kubelets: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (format!("kubelet-{n}"), format!("kubelet-{n}")))
            .collect();
        for (name, cert) in [
            ("admin", "admin"),
            ("controller-manager", "controller-manager"),
            ("scheduler", "scheduler"),
        ]
        .into_iter()
        .chain(kubelets.iter().map(|(a, b)| (a.as_str(), b.as_str())))
        {
            let user = format!(
                "    client-certificate: {}\n    client-key: {}\n",
                dir.join(format!("{cert}.crt")).display(),
                dir.join(format!("{cert}.key")).display()
            );
            std::fs::write(
                dir.join(format!("{name}.kubeconfig")),
                kubeconfig_with(&server, &dir.join("ca.crt"), &user),
            )
            .expect("write kubeconfig");
        }
        let mut cp = Self {
            netns,
            dir,
            ip,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
            nodes,
            // `cluster up` names its namespace itself and outlives us.
            cgroup: None,
        };
        if cp.netns.name.starts_with(PREFIX) {
            cp.cgroup = Some(Cgroup::new());
        }
        cp.start_etcd();
        cp.start_apiserver();
        cp.start_controllers();
        cp.wait(
            "the default ServiceAccount",
            Duration::from_secs(60),
            |cp| {
                cp.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                    .status
                    .success()
            },
        );
        cp
    }

    /// A command run in the control plane's namespace, logging to
    /// `logs/<name>.log`.
    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))
            .expect("log file");
        let netns = format!("--net=/run/netns/{}", self.netns.name);
        let mut cmd = match &self.cgroup {
            Some(cg) => {
                let mut all = vec![netns.as_str(), program.to_str().expect("utf-8 path")];
                all.extend(args.iter().map(String::as_str));
                cg.command("nsenter", &all)
            }
            None => {
                let mut c = Command::new("nsenter");
                c.arg(&netns).arg(program).args(args);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc(child)
    }

    /// The last lines of a component's log (for failure messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn start_etcd(&mut self) {
        let data = self.dir.join("etcd");
        let args: Vec<String> = [
            "--name=lb",
            &format!("--data-dir={}", data.display()),
            &format!("--listen-client-urls={ETCD_CLIENT}"),
            &format!("--advertise-client-urls={ETCD_CLIENT}"),
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=lb=http://127.0.0.1:2380",
            "--listen-metrics-urls=http://127.0.0.1:2381",
            "--log-level=warn",
            // The disk is shared with builds: an fsync now and then is slow.
            "--unsafe-no-fsync",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.etcd = Some(self.spawn("etcd", &bin("etcd"), &args));
        self.wait("etcd", Duration::from_secs(30), |cp| {
            cp.in_netns("curl", &["-sf", "http://127.0.0.1:2379/health"])
                .status
                .success()
        });
    }

    fn apiserver_args(&self) -> Vec<String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut args = vec![
            format!("--etcd-servers={ETCD_CLIENT}"),
            // Every address of the control plane's own namespace: its
            // loopback and CP_IP, nothing of the machine's.
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={}", self.ip),
            format!("--secure-port={API_PORT}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-node-port-range={NODEPORT_RANGE}"),
            "--authorization-mode=Node,RBAC".into(),
            format!("--client-ca-file={}", d("ca.crt")),
            // No aggregated API servers here; naming the CA keeps the
            // components from complaining that the bundle is missing.
            format!("--requestheader-client-ca-file={}", d("ca.crt")),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", d("apiserver-certs")),
            // Soon-to-be-compacted watch caches are what the 410 test needs;
            // default compaction every 5 minutes stays out of the way.
            "--v=1".into(),
        ];
        if !self.nodes.is_empty() {
            // exec, logs and port-forward reach the kubelets as this client.
            args.push(format!(
                "--kubelet-client-certificate={}",
                d("apiserver-kubelet-client.crt")
            ));
            args.push(format!(
                "--kubelet-client-key={}",
                d("apiserver-kubelet-client.key")
            ));
            args.push("--kubelet-preferred-address-types=InternalIP,Hostname".into());
        }
        args
    }

    pub fn start_apiserver(&mut self) {
        let args = self.apiserver_args();
        self.apiserver = Some(self.spawn("kube-apiserver", &bin("kube-apiserver"), &args));
        self.wait("kube-apiserver /readyz", Duration::from_secs(90), |cp| {
            cp.kubectl(&["get", "--raw", "/readyz"]).status.success()
        });
    }

    /// Stops the API server (SIGTERM, by PID) and waits for it to exit.
    pub fn stop_apiserver(&mut self) {
        if let Some(p) = self.apiserver.take() {
            stop(p, Duration::from_secs(20));
        }
    }

    fn start_controllers(&mut self) {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut kcm: Vec<String> = vec![
            format!("--kubeconfig={}", d("controller-manager.kubeconfig")),
            format!(
                "--authentication-kubeconfig={}",
                d("controller-manager.kubeconfig")
            ),
            format!(
                "--authorization-kubeconfig={}",
                d("controller-manager.kubeconfig")
            ),
            // The controllers that write what the agent reads, and those
            // that keep a cluster's objects consistent; with real kubelets
            // the whole default set, as a real cluster runs.
            if self.nodes.is_empty() {
                "--controllers=endpointslice-controller,endpointslice-mirroring-controller,\
                 serviceaccount-controller,serviceaccount-token-controller,namespace-controller,\
                 garbage-collector-controller,deployment-controller,replicaset-controller,\
                 service-cidr-controller"
                    .into()
            } else {
                "--controllers=*".into()
            },
            format!("--service-account-private-key-file={}", d("sa.key")),
            format!("--root-ca-file={}", d("ca.crt")),
            "--use-service-account-credentials=true".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            // Endpoint changes are written at once (the default batches
            // nothing either, but say so).
            "--endpointslice-updates-batch-period=0s".into(),
        ];
        if !self.nodes.is_empty() {
            kcm.push(format!("--cluster-signing-cert-file={}", d("ca.crt")));
            kcm.push(format!("--cluster-signing-key-file={}", d("ca.key")));
            // Pod networks are the nodes' own (each node's CNI
            // configuration), not allocated by the controller manager.
            kcm.push("--allocate-node-cidrs=false".into());
        }
        self.controller_manager = Some(self.spawn(
            "kube-controller-manager",
            &bin("kube-controller-manager"),
            &kcm,
        ));
        let sched: Vec<String> = vec![
            format!("--kubeconfig={}", d("scheduler.kubeconfig")),
            format!("--authentication-kubeconfig={}", d("scheduler.kubeconfig")),
            format!("--authorization-kubeconfig={}", d("scheduler.kubeconfig")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
        ];
        self.scheduler = Some(self.spawn("kube-scheduler", &bin("kube-scheduler"), &sched));
    }

    /// A command inside the control plane's namespace.
    pub fn in_netns(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns.name))
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// The kubeconfig of the real kubelet of `node` (its client
    /// certificate), written at start.
    pub fn kubelet_kubeconfig(&self, node: &str) -> PathBuf {
        self.dir.join(format!("kubelet-{node}.kubeconfig"))
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// `kubectl` as the cluster admin, from the control plane's namespace.
    pub fn kubectl_command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns.name))
            .arg(bin("kubectl"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig());
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_command()
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// kubectl with `input` on stdin (`apply -f -` and the like).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to kubectl");
        child.wait_with_output().expect("kubectl")
    }

    /// `kubectl apply -f -` of manifests exactly as a user writes them.
    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "kubectl apply: {}{}\n{yaml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&all)).expect("kubectl JSON")
    }

    /// A kubeconfig for a ServiceAccount: a token from the TokenRequest
    /// API (as the kubelet mounts into a pod), the cluster's CA, and the
    /// server at CP_IP (reachable from the nodes).
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> String {
        let token = self.kubectl_ok(&["create", "token", name, "-n", namespace, "--duration=2h"]);
        kubeconfig_with(
            &format!("https://{}:{API_PORT}", self.ip),
            &self.dir.join("ca.crt"),
            &format!("    token: {}\n", token.trim()),
        )
    }

    /// Compacts etcd to its current revision: every watch resumed from an
    /// older resourceVersion then gets 410 Gone from the API server, as
    /// after a long disconnection in a busy cluster.
    pub fn compact_etcd(&self) {
        // etcd's JSON gateway: a one-key range read gives the revision.
        let v = self.etcd_post("range", r#"{"key":"AA==","limit":1}"#);
        let rev = v["header"]["revision"].as_str().expect("etcd revision");
        self.etcd_post(
            "compaction",
            &format!(r#"{{"revision":"{rev}","physical":true}}"#),
        );
    }

    /// POST to etcd's JSON gateway (`/v3/kv/<call>`) from the control
    /// plane's namespace; the answer, parsed.
    fn etcd_post(&self, call: &str, body: &str) -> serde_json::Value {
        let out = self.in_netns(
            "curl",
            &[
                "-sf",
                "-X",
                "POST",
                "-d",
                body,
                &format!("http://127.0.0.1:2379/v3/kv/{call}"),
            ],
        );
        assert!(out.status.success(), "etcd {call} failed");
        serde_json::from_slice(&out.stdout).expect("etcd's JSON answer")
    }

    /// Waits for `ok`, with a deadline; panics with the API server's log.
    pub fn wait(&self, what: &str, limit: Duration, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}\n--- kube-apiserver:\n{}\n--- etcd:\n{}\n--- kube-controller-manager:\n{}",
            self.log_tail("kube-apiserver"),
            self.log_tail("etcd"),
            self.log_tail("kube-controller-manager")
        );
    }

    /// Registers a Node as a kubelet would: the object, then its status
    /// (Ready, addresses, capacity) through the status subresource.
    pub fn register_node(&self, name: &str, ip: Ipv4Addr, zone: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n    topology.kubernetes.io/zone: {zone}\n"
        ));
        let status = serde_json::json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "test harness", "lastHeartbeatTime": now(), "lastTransitionTime": now(),
            }],
        }});
        self.kubectl_ok(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        // The API server's admission taints a new Node not-ready; the node
        // lifecycle controller lifts it once the Node reports Ready. That
        // controller is not run here (it would also mark the nodes
        // NotReady for want of kubelet heartbeats), so do its part.
        self.kubectl_ok(&[
            "taint",
            "node",
            name,
            "node.kubernetes.io/not-ready:NoSchedule-",
        ]);
    }
}

/// RFC 3339 UTC, as Kubernetes writes times.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .expect("round")
        .to_string()
}

/// SIGTERM by PID, then wait (SIGKILL after `grace`).
fn stop(mut p: Proc, grace: Duration) {
    // SAFETY: our own child's PID.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = p.0.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Proc's drop kills and reaps it.
}

impl ControlPlane {
    /// Leaves everything running and returns the PIDs (etcd, API server,
    /// controller manager, scheduler), for `cluster up`; the caller owns
    /// stopping them.
    pub fn detach(mut self) -> Vec<u32> {
        let pids = [
            self.etcd.take(),
            self.apiserver.take(),
            self.controller_manager.take(),
            self.scheduler.take(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            let pid = p.0.id();
            std::mem::forget(p);
            pid
        })
        .collect();
        // The namespace stays (an empty name makes its drop a no-op).
        self.netns.name.clear();
        self.dir = PathBuf::new();
        pids
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for p in [
            self.scheduler.take(),
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            // Tearing down: a graceful API server shutdown (up to half a
            // minute, waiting out its watches) serves nobody here.
            stop(p, Duration::from_secs(3));
        }
        if !self.dir.as_os_str().is_empty() && std::env::var_os("LB_KEEP_CLUSTER_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

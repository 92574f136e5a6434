//! A cluster of real nodes: the control plane (controlplane.rs) and, per
//! node, containerd (with runc and the CNI bridge, host-local, loopback and
//! portmap plugins) and a kubelet, all built from upstream by the set-up.
//! No kube-proxy: the agent is installed as users install it (the Helm
//! chart) and runs as the DaemonSet's pods.
//!
//! Each node is a network namespace on the LAN bridge (its address, its
//! pod network 10.244.<n>.0/24 on the CNI bridge `cni0`, routes to the
//! other nodes' pod networks) and a mount namespace of its own in which
//! - `/sys/fs/bpf` is a bpffs instance of its own, so the agents of two
//!   nodes never see each other's pins;
//! - `/sys/fs/cgroup/unified` (the cgroup v2 mount of this hybrid host) is
//!   a cgroup the test made, so each node's agent attaches its socket
//!   programs to its own node's processes only, never the machine's root.
//!
//! The kubelets use the cgroupfs driver on cgroup v1 with a cgroup root of
//! their own. Everything a node starts lives in its v2 cgroup (runc puts
//! containers there too on hybrid hosts), which `cgroup.kill` ends at
//! once; v1 leftovers are killed by PID from their `cgroup.procs`. The
//! kernel tunables the kubelet sets machine-wide are restored on drop.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    controlplane::{self, CP_IP, ControlPlane},
    guard::{Netns, Proc, TUNABLES_FILE, cgroup_v1_mounts, kill_and_remove_tree, unique},
    images::{self, Archive},
    topo,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// What each node is: name, LAN address, the third octet of its pod
/// network, zone.
pub const NODES: &[(&str, Ipv4Addr, u8, &str)] = &[
    ("node-a", Ipv4Addr::new(172, 18, 0, 2), 1, "zone-a"),
    ("node-b", Ipv4Addr::new(172, 18, 0, 3), 2, "zone-b"),
    // Three: several upstream tests want three schedulable nodes in three
    // zones.
    ("node-c", Ipv4Addr::new(172, 18, 0, 4), 3, "zone-c"),
    // Six (`NodeCluster::start_with`): Traffic Distribution's zone tests
    // want two nodes in each of three zones.
    ("node-d", Ipv4Addr::new(172, 18, 0, 5), 4, "zone-a"),
    ("node-e", Ipv4Addr::new(172, 18, 0, 6), 5, "zone-b"),
    ("node-f", Ipv4Addr::new(172, 18, 0, 7), 6, "zone-c"),
];

/// Nodes of a cluster started with [`NodeCluster::start`].
pub const DEFAULT_NODES: usize = 3;

/// LoadBalancer addresses: routed from the LAN's router (the control
/// plane's namespace) to the nodes.
pub const LB_POOL: &str = "172.18.1.0/24";

/// The source of traffic from the LAN's router (where e2e.test runs) to
/// the LoadBalancer addresses: a client outside the nodes' network, as on
/// the internet (RFC 2544's benchmarking range). Upstream's
/// externalTrafficPolicy tests check that the source a backend sees is not
/// in the nodes' /16. The nodes route it back through the router.
pub const OUTSIDE_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The kernel tunables the kubelet sets machine-wide
/// (pkg/kubelet/cm: setupKernelTunables), restored when the cluster goes.
const KERNEL_TUNABLES: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// A command run inside a node: its mount namespace (the holder's) and its
/// network namespace, in its v2 cgroup.
fn node_command(holder: u32, netns: &str, cgroup: &Path, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg("-t")
        .arg(holder.to_string())
        .arg("-m")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    in_cgroup(&mut c, cgroup);
    c
}

/// Moves the child into `cgroup` between fork and exec (a raw write: no
/// allocation after fork).
fn in_cgroup(c: &mut Command, cgroup: &Path) {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).expect("path");
    // SAFETY: only async-signal-safe calls (open, write, close) run in the
    // child.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))
        .expect("log file")
}

/// One node: its namespaces, cgroups, folders and processes.
pub struct RealNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub netns: Netns,
    pub dir: PathBuf,
    /// The node's cgroup in the v2 hierarchy (its `/sys/fs/cgroup/unified`).
    pub cgroup: PathBuf,
    /// The kubelet's cgroupRoot in the v1 hierarchies.
    cgroup_root: String,
    holder: Option<Proc>,
    containerd: Option<Proc>,
    kubelet: Option<Proc>,
}

impl RealNode {
    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().expect("holder").0.id()
    }

    /// A command inside this node (its mount and network namespaces).
    pub fn command(&self, program: &Path) -> Command {
        node_command(self.holder_pid(), &self.netns.name, &self.cgroup, program)
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` against this node's containerd, in its `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self
            .command(&controlplane::bin("ctr"))
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn new(lan: &Netns, name: &str, ip: Ipv4Addr, net: u8, work: &Path) -> Self {
        let dir = work.join(name);
        for d in ["logs", "net.d", "containerd", "kubelet", "cni-ipam"] {
            std::fs::create_dir_all(dir.join(d)).expect("node folder");
        }
        let netns = Netns::new("nd");
        let port = unique("nl");
        topo::veth(lan, &port, &netns, "eth0");
        topo::ip(lan, &["link", "set", &port, "master", "lan0"]);
        topo::ip(&netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        let v2 = lbctl::datapath::pins::cgroup2_root().expect("cgroup v2 mount");
        let cgroup = v2.join(unique("nc"));
        std::fs::create_dir_all(&cgroup).expect("node cgroup");
        let mut node = Self {
            name: name.to_string(),
            ip,
            pod_cidr: format!("10.244.{net}.0/24"),
            netns,
            dir,
            cgroup,
            cgroup_root: format!("/{}", unique("nk")),
            holder: None,
            containerd: None,
            kubelet: None,
        };
        // The kubelet wants its cgroup root to exist in every hierarchy,
        // v1 controllers and (seen through the node's mount) v2.
        let root = node.cgroup_root.trim_start_matches('/').to_string();
        for m in cgroup_v1_mounts() {
            std::fs::create_dir_all(m.join(&root)).expect("v1 cgroup root");
        }
        std::fs::create_dir_all(node.cgroup.join(&root)).expect("v2 cgroup root");
        node.start_holder(&v2);
        node
    }

    /// The process that holds the node's mount namespace: a private copy
    /// of the machine's mounts with the node's own bpffs and cgroup v2
    /// view. The machine's bpffs is unmounted there first (only there):
    /// containerd checks the propagation of the first mount it finds at a
    /// path, and the DaemonSet's Bidirectional volume needs it shared.
    fn start_holder(&mut self, v2: &Path) {
        let ready = self.dir.join("mounts-ready");
        let script = format!(
            "set -e; umount -l /sys/fs/bpf 2>/dev/null || true; \
             mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf; \
             mount --bind {cg} {v2}; touch {ready}; exec sleep 2147483647",
            cg = self.cgroup.display(),
            v2 = v2.display(),
            ready = ready.display()
        );
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(log_file(&self.dir, "holder"))
        .stderr(log_file(&self.dir, "holder"));
        in_cgroup(&mut c, &self.cgroup);
        self.holder = Some(Proc(c.spawn().expect("unshare")));
        wait_for(&format!("{}'s mount namespace", self.name), 10, || {
            ready.exists()
        });
    }

    fn write_cni_config(&self) {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lb-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.dir.join("cni-ipam").display().to_string(),
                        "ranges": [[{"subnet": self.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        std::fs::write(
            self.dir.join("net.d/10-lb-pods.conflist"),
            serde_json::to_string_pretty(&conf).expect("json"),
        )
        .expect("CNI config");
    }

    fn start_containerd(&mut self, cni_bin: &Path, images: &[Archive]) {
        self.write_cni_config();
        let d = |p: &str| self.dir.join(p).display().to_string();
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # No process here has CAP_SYS_RESOURCE: runc could not lower a
  # container's oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  # Pods' network namespaces pinned in the node's own state folder, not in
  # the machine's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{conf}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
"#,
            root = d("containerd/root"),
            state = d("containerd/state"),
            sock = self.containerd_socket().display(),
            runc = controlplane::bin("runc").display(),
            cni_bin = cni_bin.display(),
            conf = d("net.d"),
            pause = images::PAUSE,
        );
        let path = self.dir.join("containerd/config.toml");
        std::fs::write(&path, config).expect("containerd config");
        let bin_dir = controlplane::bin_dir();
        let mut c = self.command(&controlplane::bin("containerd"));
        c.arg("--config")
            .arg(&path)
            // The shim is found on PATH.
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log_file(&self.dir, "containerd"))
            .stderr(log_file(&self.dir, "containerd"));
        self.containerd = Some(Proc(c.spawn().expect("containerd")));
        let sock = self.containerd_socket();
        wait_for(&format!("{}'s containerd", self.name), 30, || {
            sock.exists()
                && self
                    .command(&controlplane::bin("ctr"))
                    .arg("--address")
                    .arg(&sock)
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        for image in images {
            self.ctr(&[
                "images",
                "import",
                "--base-name",
                image.repository(),
                &image.path.display().to_string(),
            ]);
            // Never garbage-collected, by containerd or the kubelet.
            self.ctr(&[
                "images",
                "label",
                &image.reference,
                "io.cri-containerd.pinned=pinned",
            ]);
        }
    }

    fn start_kubelet(&mut self, cp: &ControlPlane, zone: &str) {
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host has cgroup v1 only: the cgroupfs driver, v1 allowed, and a
# cgroup root of this node's own (two kubelets share the hierarchy).
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: {cgroup_root}
containerRuntimeEndpoint: unix://{sock}
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
resolvConf: {resolv}
failSwapOn: false
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A shared test machine's disk and memory are not this node's to guard.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
serializeImagePulls: false
# The node's own: the default, /var/log/pods, is the machine's, and each
# kubelet removes the folders of pods it does not know there, so the
# nodes deleted each other's pod logs (and they outlived the cluster).
podLogsDir: {pod_logs}
"#,
            cgroup_root = self.cgroup_root,
            sock = self.containerd_socket().display(),
            ip = self.ip,
            ca = cp.dir.join("ca.crt").display(),
            resolv = self.dir.join("resolv.conf").display(),
            pod_logs = self.dir.join("pod-logs").display(),
        );
        // Pods of dnsPolicy Default get the node's resolver: none here.
        std::fs::write(self.dir.join("resolv.conf"), "options ndots:1\n").expect("resolv.conf");
        let path = self.dir.join("kubelet/config.yaml");
        std::fs::write(&path, config).expect("kubelet config");
        let mut c = self.command(&controlplane::bin("kubelet"));
        c.arg(format!("--config={}", path.display()))
            .arg(format!(
                "--kubeconfig={}",
                cp.kubelet_kubeconfig(&self.name).display()
            ))
            .arg(format!("--node-ip={}", self.ip))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!(
                "--root-dir={}",
                self.dir.join("kubelet/root").display()
            ))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kubelet/pki").display()
            ))
            .arg(format!("--node-labels=topology.kubernetes.io/zone={zone}"))
            .arg("--v=2")
            .stdin(Stdio::null())
            .stdout(log_file(&self.dir, "kubelet"))
            .stderr(log_file(&self.dir, "kubelet"));
        self.kubelet = Some(Proc(c.spawn().expect("kubelet")));
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // Everything the node started (containerd, shims, containers, the
        // kubelet, the mount namespace's holder) is in its v2 cgroup.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        for p in [
            self.kubelet.take(),
            self.containerd.take(),
            self.holder.take(),
        ]
        .into_iter()
        .flatten()
        {
            drop(p);
        }
        kill_and_remove_tree(&self.cgroup);
        for m in cgroup_v1_mounts() {
            kill_and_remove_tree(&m.join(self.cgroup_root.trim_start_matches('/')));
        }
        if std::env::var_os("LB_KEEP_CLUSTER_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for `ok` with a deadline of `secs`.
fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The whole cluster. Dropping it ends the nodes, restores the kernel
/// tunables, then stops the control plane.
pub struct NodeCluster {
    /// The load balancer controller (`lb-cloud`), when started.
    lb_cloud: Option<Proc>,
    pub nodes: Vec<RealNode>,
    pub cp: ControlPlane,
    pub lan: Netns,
    pub work: PathBuf,
    tunables: Vec<(PathBuf, String)>,
}

impl NodeCluster {
    /// The control plane, then each node with its images imported and
    /// its kubelet registered and Ready. `lbctl` is the release binary the
    /// agent image is made from.
    pub fn start(lbctl: &Path) -> Self {
        Self::start_with(lbctl, DEFAULT_NODES)
    }

    /// As [`Self::start`], with the first `count` of [`NODES`].
    pub fn start_with(lbctl: &Path, count: usize) -> Self {
        assert!(
            (1..=NODES.len()).contains(&count),
            "1 to {} nodes",
            NODES.len()
        );
        let nodes = &NODES[..count];
        // Nodes first (their processes, cgroups and kernel tunables), then
        // the namespaces and folders of runs that died.
        crate::guard::sweep();
        let images = images::build_all(lbctl);
        let work = std::env::temp_dir().join(unique("rn"));
        std::fs::create_dir_all(&work).expect("cluster folder");
        let lan = Netns::new("ln");
        topo::ip(&lan, &["link", "add", "lan0", "type", "bridge"]);
        topo::ip(&lan, &["link", "set", "lan0", "up"]);
        let names: Vec<&str> = nodes.iter().map(|n| n.0).collect();
        let cp = ControlPlane::start_for_nodes(
            &lan,
            "lan0",
            CP_IP,
            Netns::new("cp"),
            &unique("cp"),
            work.join("control-plane"),
            &names,
        );
        let tunables: Vec<(PathBuf, String)> = KERNEL_TUNABLES
            .iter()
            .filter_map(|t| {
                let p = Path::new("/proc/sys").join(t);
                Some((p.clone(), std::fs::read_to_string(&p).ok()?))
            })
            .collect();
        // Also on disk: a run that dies before its drop has them restored
        // by the next run's sweep.
        std::fs::write(
            work.join(TUNABLES_FILE),
            tunables
                .iter()
                .map(|(p, v)| format!("{} {}\n", p.display(), v.trim()))
                .collect::<String>(),
        )
        .expect("record the kernel tunables");
        let cni_bin = work.join("cni-bin");
        std::fs::create_dir_all(&cni_bin).expect("cni-bin");
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            std::os::unix::fs::symlink(controlplane::bin(plugin), cni_bin.join(plugin))
                .expect("CNI plugin link");
        }
        let mut cluster = Self {
            lb_cloud: None,
            nodes: Vec::new(),
            cp,
            lan,
            work,
            tunables,
        };
        for (name, ip, net, _) in nodes {
            cluster
                .nodes
                .push(RealNode::new(&cluster.lan, name, *ip, *net, &cluster.work));
        }
        // Pod networks are routed: each node to the others' pods, the
        // control plane to every pod (webhooks, the `kubernetes` Service's
        // replies).
        for (_, ip, net, _) in nodes {
            let dst = format!("10.244.{net}.0/24");
            topo::ip(
                &cluster.cp.netns,
                &["route", "add", &dst, "via", &ip.to_string()],
            );
            for n in &cluster.nodes {
                if n.ip != *ip {
                    topo::ip(&n.netns, &["route", "add", &dst, "via", &ip.to_string()]);
                }
            }
        }
        // The router spreads flows to a LoadBalancer address over its
        // nodes by the 5-tuple, as a cloud load balancer spreads
        // connections (Linux's default hashes addresses only: one client
        // would always reach one node).
        cluster
            .cp
            .netns
            .run(&["sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=1"]);
        // The outside client: an address of the router, routed back to it
        // by every node.
        topo::ip(
            &cluster.cp.netns,
            &["addr", "add", &format!("{OUTSIDE_CLIENT}/32"), "dev", "lo"],
        );
        for n in &cluster.nodes {
            topo::ip(
                &n.netns,
                &[
                    "route",
                    "add",
                    &format!("{OUTSIDE_CLIENT}/32"),
                    "via",
                    &CP_IP.to_string(),
                ],
            );
        }
        for (i, (_, _, _, zone)) in nodes.iter().enumerate() {
            cluster.nodes[i].start_containerd(&cni_bin, &images);
            let cp = &cluster.cp;
            cluster.nodes[i].start_kubelet(cp, zone);
        }
        cluster.wait_nodes_ready();
        cluster
    }

    fn wait_nodes_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = self
                .cp
                .kubectl(&[
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                ]);
            let text = String::from_utf8_lossy(&ready.stdout).to_string();
            let n = text.lines().filter(|l| l.ends_with("=True")).count();
            if n == self.nodes.len() {
                return;
            }
            if Instant::now() > deadline {
                let logs: String = self
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "--- {} kubelet:\n{}\n--- {} containerd:\n{}\n",
                            n.name,
                            n.log_tail("kubelet"),
                            n.name,
                            n.log_tail("containerd")
                        )
                    })
                    .collect();
                panic!("nodes not Ready: {text}\n{logs}");
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn node(&self, name: &str) -> &RealNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The agent installed with the chart as the README's command does,
    /// with this cluster's API server address and the hybrid host's cgroup
    /// v2 mount; waits for the DaemonSet's pods on every node.
    pub fn install_agent(&self) {
        self.install_agent_in("lb-system", &[]);
    }

    /// As [`Self::install_agent`], into `namespace` with more `--set`
    /// values (`key=value`).
    pub fn install_agent_in(&self, namespace: &str, sets: &[&str]) {
        let chart = workspace().join("charts/lbctl");
        let host = format!("k8sServiceHost={CP_IP}");
        let mut args = vec![
            "install",
            "lbctl",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            namespace,
            "--create-namespace",
            "--set",
            &host,
            "--set",
            "k8sServicePort=6443",
            "--set",
            "cgroupRoot=/sys/fs/cgroup/unified",
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = self.helm(&args);
        assert!(
            out.status.success(),
            "helm install: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.rollout(namespace, "daemonset/lbctl");
    }

    /// CoreDNS as kubeadm installs it (tests/cluster/addons/coredns.yaml),
    /// behind the `kube-dns` Service the kubelets point pods at.
    pub fn install_dns(&self) {
        let manifest = workspace().join("tests/cluster/addons/coredns.yaml");
        self.cp
            .kubectl_ok(&["apply", "-f", &manifest.display().to_string()]);
        self.rollout("kube-system", "deployment/coredns");
    }

    /// `kubectl rollout status`, with the pods, their events and the
    /// kubelets' logs when it times out.
    pub fn rollout(&self, namespace: &str, what: &str) {
        let status =
            self.cp
                .kubectl(&["-n", namespace, "rollout", "status", what, "--timeout=180s"]);
        if !status.status.success() {
            let pods = self
                .cp
                .kubectl(&["-n", namespace, "get", "pods", "-o", "wide"]);
            let describe = self.cp.kubectl(&["-n", namespace, "describe", "pods"]);
            let logs: String = self
                .nodes
                .iter()
                .map(|n| format!("--- {} kubelet:\n{}\n", n.name, n.log_tail("kubelet")))
                .collect();
            panic!(
                "{what} did not roll out: {}\n{}\n{}\n{logs}",
                String::from_utf8_lossy(&status.stderr),
                String::from_utf8_lossy(&pods.stdout),
                String::from_utf8_lossy(&describe.stdout)
            );
        }
    }

    /// The "cloud" load balancer (the `lb-cloud` binary beside `lbctl`):
    /// addresses from `LB_POOL` for Services of type LoadBalancer, routed
    /// from the control plane's namespace (where e2e.test runs) to the
    /// nodes that pass its health checks.
    pub fn start_load_balancer(&mut self, lb_cloud: &Path) {
        let log = self.work.join("lb-cloud.log");
        let file = std::fs::File::create(&log).expect("lb-cloud log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.cp.netns.name))
            .arg(lb_cloud)
            .arg("--kubeconfig")
            .arg(self.cp.admin_kubeconfig())
            .args(["--pool", LB_POOL])
            .args(["--src", &OUTSIDE_CLIENT.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("lb-cloud");
        self.lb_cloud = Some(Proc(child));
    }

    /// `helm` as the cluster admin, from the control plane's namespace.
    pub fn helm(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.cp.netns.name))
            .arg(controlplane::bin("helm"))
            .arg("--kubeconfig")
            .arg(self.cp.admin_kubeconfig())
            .args(args)
            .env("HELM_CACHE_HOME", self.work.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.work.join("helm/config"))
            .env("HELM_DATA_HOME", self.work.join("helm/data"))
            .output()
            .expect("helm")
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        for (path, value) in &self.tunables {
            let _ = std::fs::write(path, value);
        }
        if std::env::var_os("LB_KEEP_CLUSTER_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

//! A small cluster in network namespaces, shared by the demo and the
//! end-to-end tests:
//!
//! ```text
//!   client 172.18.0.10      (outside; no route to pod networks)
//!        │
//!   lan ─┴─ bridge ───────────────┬─────────────────────────────┐
//!        │ eth0 172.18.0.2        │ eth0 172.18.0.3             │
//!      node-a (agent)           node-b                          │
//!   eth1 192.168.0.1 ── ext 192.168.0.10 (outside the cluster)  │
//!   br0 10.244.1.1            br0 10.244.2.1
//!   pod-1..3 10.244.1.11-13   pod-b1.. 10.244.2.11-
//! ```
//!
//! Nothing is created in the machine's own namespace: every veth is made
//! inside a test namespace with its peer in another, so no traffic can
//! leave the test's namespaces.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::guard::{Cgroup, Netns, Proc, run};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
pub const NODE_B_NAME: &str = "node-b";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 10);
pub const EXT_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
pub const POD_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const NODE_NAME: &str = "node-a";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

pub struct Topology {
    pub lan: Netns,
    pub node: Netns,
    pub node_b: Netns,
    pub client: Netns,
    pub ext: Netns,
    pub pods: Vec<Pod>,
    /// Socket-level load balancing applies to processes in this cgroup.
    pub cgroup: Cgroup,
    servers: Vec<Proc>,
}

pub fn ip(ns: &Netns, args: &[&str]) {
    let mut all = vec!["-n", ns.name.as_str()];
    all.extend_from_slice(args);
    run("ip", &all);
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`), both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(
        a,
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
    );
    ip(a, &["link", "set", a_if, "up"]);
    ip(b, &["link", "set", b_if, "up"]);
}

/// A bridge `br0` at 10.244.<net>.1 in `node` with `n` pods on it.
fn pod_network(node: &Netns, net: u8, n: usize, prefix: &str) -> Vec<Pod> {
    let gw = Ipv4Addr::new(10, 244, net, 1);
    // A fixed MAC: a bridge without one takes its lowest port's, so it
    // would change as pods come and go, and pods would keep sending to
    // their gateway's old address.
    let mac = format!("02:00:0a:f4:{net:02x}:01");
    ip(
        node,
        &["link", "add", "br0", "address", &mac, "type", "bridge"],
    );
    ip(node, &["addr", "add", &format!("{gw}/24"), "dev", "br0"]);
    ip(node, &["link", "set", "br0", "up"]);
    (1..=n)
        .map(|i| {
            let ns = Netns::new("po");
            let pod_ip = Ipv4Addr::new(10, 244, net, 10 + i as u8);
            let host_if = format!("veth{i}");
            veth(&ns, "eth0", node, &host_if);
            ip(node, &["link", "set", &host_if, "master", "br0"]);
            ip(
                &ns,
                &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"],
            );
            ip(&ns, &["route", "add", "default", "via", &gw.to_string()]);
            Pod {
                name: format!("{prefix}{i}"),
                ip: pod_ip,
                ns,
            }
        })
        .collect()
}

impl Topology {
    /// `pods` pods on node-a and `pods_b` on node-b.
    pub fn new(pods: usize) -> Self {
        Self::with_remote(pods, 0)
    }

    pub fn with_remote(pods: usize, pods_b: usize) -> Self {
        let lan = Netns::new("ln");
        let node = Netns::new("nd");
        let node_b = Netns::new("nb");
        let client = Netns::new("cl");
        let ext = Netns::new("ex");
        ip(&lan, &["link", "add", "lan0", "type", "bridge"]);
        ip(&lan, &["link", "set", "lan0", "up"]);
        for (ns, port, addr) in [
            (&client, "p-client", CLIENT_IP),
            (&node, "p-node-a", NODE_IP),
            (&node_b, "p-node-b", NODE_B_IP),
        ] {
            veth(&lan, port, ns, "eth0");
            ip(&lan, &["link", "set", port, "master", "lan0"]);
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        }
        for n in [&node, &node_b] {
            n.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }

        veth(&node, "eth1", &ext, "eth0");
        ip(
            &node,
            &["addr", "add", &format!("{EXT_GW}/24"), "dev", "eth1"],
        );
        ip(
            &ext,
            &["addr", "add", &format!("{EXT_IP}/24"), "dev", "eth0"],
        );
        ip(
            &ext,
            &["route", "add", "default", "via", &EXT_GW.to_string()],
        );

        // Each node routes the other's pod network through it.
        ip(
            &node,
            &[
                "route",
                "add",
                "10.244.2.0/24",
                "via",
                &NODE_B_IP.to_string(),
            ],
        );
        ip(
            &node_b,
            &["route", "add", "10.244.1.0/24", "via", &NODE_IP.to_string()],
        );

        let mut all = pod_network(&node, 1, pods, "pod-");
        all.extend(pod_network(&node_b, 2, pods_b, "pod-b"));
        Self {
            lan,
            node,
            node_b,
            client,
            ext,
            pods: all,
            cgroup: Cgroup::new(),
            servers: vec![],
        }
    }

    /// What reaches node-a's eth0 as from a wire: the senders towards it
    /// (the client, node-b, which forwards its pods' packets) compute
    /// their checksums instead of leaving them to offload, which an XDP
    /// program cannot see. And node-a's port on the LAN takes the frames
    /// XDP sends back out: a veth hands `XDP_TX` frames to its peer's
    /// NAPI ring, which the kernel polls at once only when the peer runs
    /// an XDP program of its own; a do-nothing one (`XDP_PASS`) goes there,
    /// its link pinned in the test's own bpffs `bpffs` (gone with it).
    pub fn wire_checksums(&self, bpffs: &Path) {
        for ns in [&self.client, &self.node_b] {
            ns.run(&["ethtool", "-K", "eth0", "tx", "off"]);
        }
        let netns = format!("/run/netns/{}", self.lan.name);
        let pin = bpffs.join("lan-port-xdp");
        thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&netns).expect("netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            assert_eq!(
                unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            let mut floor = lbctl::datapath::load::load_floor().expect("floor object");
            let prog: &mut aya::programs::Xdp = floor
                .program_mut("floor_xdp")
                .expect("floor_xdp")
                .try_into()
                .expect("xdp");
            prog.load().expect("load floor_xdp");
            let id = prog
                .attach("p-node-a", aya::programs::XdpMode::Driver)
                .expect("XDP_PASS on the LAN port");
            let link: aya::programs::links::FdLink = prog
                .take_link(id)
                .expect("link")
                .try_into()
                .expect("bpf_link");
            link.pin(&pin).expect("pin the LAN port's XDP link");
        })
        .join()
        .expect("XDP on the LAN port");
    }

    /// An HTTP server in `ns` on `port` that answers every GET with `name`.
    pub fn http_server(&mut self, ns_name: &str, port: u16, name: &str) {
        self.python_server(ns_name, HTTP_SERVER, port, name);
    }

    /// A UDP server in `ns` on `port` that answers every datagram with
    /// `name`; a datagram starting `big` is answered with `name` and its
    /// length, padded to that length (so a fragmented question gets a
    /// fragmented answer).
    pub fn udp_server(&mut self, ns_name: &str, port: u16, name: &str) {
        const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
# Answers larger than the MTU leave in fragments (no path MTU discovery).
s.setsockopt(socket.IPPROTO_IP, 10, 0)
while True:
    data, peer = s.recvfrom(65535)
    answer = sys.argv[2].encode()
    if data.startswith(b"big"):
        answer = f"{sys.argv[2]} {len(data)} ".encode().ljust(len(data), b".")
    s.sendto(answer, peer)
"#;
        self.python_server(ns_name, SERVER, port, name);
    }

    /// Runs a Python server `script` in `ns_name` with (port, name) as its
    /// arguments; stopped when the topology is dropped.
    fn python_server(&mut self, ns_name: &str, script: &str, port: u16, name: &str) {
        self.servers
            .push(python_server(ns_name, script, port, name));
    }

    /// Waits until something listens on `port` in namespace `ns_name`.
    pub fn wait_listening(ns_name: &str, port: u16) {
        Self::wait_listening_on(ns_name, "", port);
    }

    /// Waits until something listens on `addr:port` (any address when
    /// `addr` is empty) in namespace `ns_name`.
    pub fn wait_listening_on(ns_name: &str, addr: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!("{addr}:{port} ");
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", ns_name, "ss", "-ltnH"])
                .output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&want)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let out = Command::new("ip")
            .args(["netns", "exec", ns_name, "ss", "-ltnpH"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        panic!("nothing listens on {addr}:{port} in {ns_name}; listening:\n{out}");
    }

    /// Starts an HTTP server in every pod, answering with the pod's name.
    pub fn start_pod_servers(&mut self, port: u16) {
        self.start_pod_servers_named(port, "");
    }

    /// (namespace, pod name) of every pod, owned: the servers started for
    /// them borrow the topology mutably.
    fn pod_names(&self) -> Vec<(String, String)> {
        self.pods
            .iter()
            .map(|p| (p.ns.name.clone(), p.name.clone()))
            .collect()
    }

    /// A UDP server on `port` in every pod, answering with the pod's name
    /// (see [`Self::udp_server`]).
    pub fn start_pod_udp_servers(&mut self, port: u16) {
        for (ns, name) in &self.pod_names() {
            self.udp_server(ns, port, name);
        }
    }

    /// As [`Self::start_pod_servers`], answering with the pod's name and
    /// `suffix` (to tell several ports apart).
    pub fn start_pod_servers_named(&mut self, port: u16, suffix: &str) {
        let pods = self.pod_names();
        for (ns, name) in &pods {
            self.http_server(ns, port, &format!("{name}{suffix}"));
        }
        for (ns, _) in &pods {
            Self::wait_listening(ns, port);
        }
    }

    /// A command run in `ns` by a process that first joins the test cgroup
    /// (so the socket programs see it). It joins before entering the
    /// namespace: `ip netns exec` remounts /sys, hiding the cgroup folder.
    pub fn in_pod_cgroup(&self, ns: &Netns, program: &str, args: &[&str]) -> Command {
        let mut inner = vec![format!("--net=/run/netns/{}", ns.name), program.to_string()];
        inner.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = inner.iter().map(String::as_str).collect();
        self.cgroup.command("nsenter", &refs)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod")
    }
}

/// The test HTTP server: GET /bytes/N answers N bytes of pattern() (for
/// byte-exact transfer checks), /slow/N the same paced at about 2 MB/s (a
/// long transfer); /client the client's address as the server sees it;
/// anything else answers the server's name. Every answer names the server
/// in an X-Pod header.
const HTTP_SERVER: &str = r#"
import http.server, socketserver, sys, time
CHUNK = bytes(i % 251 for i in range(251 * 256))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/bytes/") or self.path.startswith("/slow/"):
            n = int(self.path.split("/")[2])
            pause = 0.03 if self.path.startswith("/slow/") else 0
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("X-Pod", sys.argv[2])
            self.end_headers()
            sent = 0
            while sent < n:
                part = CHUNK[: min(len(CHUNK), n - sent)]
                self.wfile.write(part)
                sent += len(part)
                if pause:
                    time.sleep(pause)
            return
        text = self.client_address[0] if self.path == "/client" else sys.argv[2]
        body = (text + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pod", sys.argv[2])
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        # An upload: read it whole, answer the pod's name and its length.
        n, got = int(self.headers["Content-Length"]), 0
        while got < n:
            part = self.rfile.read(min(65536, n - got))
            if not part:
                break
            got += len(part)
        body = f"{sys.argv[2]} {got}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    # HTTPServer.server_bind looks the bound address up in DNS (getfqdn)
    # between bind() and listen(): with no resolver in a test namespace
    # that waits out resolver timeouts with the port bound, not listening.
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "test", self.server_address[1]
bind = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
S((bind, int(sys.argv[1])), H).serve_forever()
"#;

/// The test HTTP server in `ns_name` on `port`, answering `name`; stopped
/// when the returned guard drops.
pub fn http_server(ns_name: &str, port: u16, name: &str) -> Proc {
    python_server(ns_name, HTTP_SERVER, port, name)
}

/// The test HTTP server bound to one address of `ns_name` (several
/// "hosts" sharing one namespace).
pub fn http_server_on(ns_name: &str, addr: Ipv4Addr, port: u16, name: &str) -> Proc {
    spawn_python(
        ns_name,
        HTTP_SERVER,
        &[&port.to_string(), name, &addr.to_string()],
    )
}

/// Runs a Python server `script` in `ns_name` with (port, name) as its
/// arguments.
fn python_server(ns_name: &str, script: &str, port: u16, name: &str) -> Proc {
    spawn_python(ns_name, script, &[&port.to_string(), name])
}

fn spawn_python(ns_name: &str, script: &str, args: &[&str]) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", ns_name, "python3", "-c", script])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit()) // a server that fails says why
        .spawn()
        .expect("start a python3 server");
    Proc(child)
}

/// What the test HTTP server sends for `/bytes/N`.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// `curl` a URL and return the body, or an error text.
pub fn curl(mut cmd: Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn curl_args(url: &str) -> Vec<String> {
    ["-sS", "--max-time", "3", "--noproxy", "*", url]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A running agent in the node namespace, stopped (SIGTERM) on drop.
pub struct Agent {
    pub proc: Proc,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `lbctl agent` in the node's network namespace. `nsenter`
    /// (not `ip netns exec`) keeps the machine's /sys, so the cgroup path
    /// stays reachable.
    pub fn start(
        lbctl: &Path,
        node: &Netns,
        manifests: &Path,
        pins: &Path,
        cgroup: &Path,
        log: &Path,
    ) -> Self {
        let source = [
            "--manifests".to_string(),
            manifests.display().to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--node-ip".into(),
            NODE_IP.to_string(),
        ];
        Self::start_with(lbctl, node, &source, pins, cgroup, log)
    }

    /// Starts `lbctl agent` with `source` (its source and node flags) in
    /// the node's namespace.
    pub fn start_with(
        lbctl: &Path,
        node: &Netns,
        source: &[String],
        pins: &Path,
        cgroup: &Path,
        log: &Path,
    ) -> Self {
        // A fresh log per start: tests wait for lines of this run.
        let logf = std::fs::File::create(log).expect("agent log");
        // The test devices, unless the source flags name others.
        let devices: &[&str] = if source.iter().any(|a| a == "--devices") {
            &[]
        } else {
            &["--devices", "eth0,dum*"]
        };
        let child = Command::new("nsenter")
            .arg("--net=".to_string() + &format!("/run/netns/{}", node.name))
            .arg(lbctl)
            .arg("agent")
            .args(source)
            .arg("--bpffs")
            .arg(pins)
            .arg("--cgroup")
            .arg(cgroup)
            .args(devices)
            .args(["--poll-ms", "100"])
            // The datapath's records (with --datapath-logs) are debug level.
            .env("RUST_LOG", "info,datapath=debug")
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("start lbctl agent");
        Self {
            proc: Proc(child),
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL: the agent dies without any chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    /// SIGTERM, as a DaemonSet rollout would, then wait.
    pub fn stop(&mut self) {
        // SAFETY: our own child's PID.
        unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGTERM) };
        let _ = self.proc.0.wait();
    }
}

/// GET on the health listener of the agent running in `ns`:
/// (status, body).
pub fn agent_get(ns: &Netns, path: &str) -> (u16, String) {
    let out = ns
        .command("curl")
        .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:10256{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The lbctl binary next to the running test or demo binary.
pub fn lbctl_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Test binaries live in target/<profile>/deps; bins in target/<profile>.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join("lbctl");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "lbctl binary not found next to {}: build it first (cargo build -p lbctl)",
        exe.display()
    );
}

/// A topology with `lbctl agent` running on node-a over a manifest folder.
/// Dropping it stops the agent, removes its datapath and every file.
pub struct Cluster {
    pub agent: Option<Agent>,
    pub topo: Topology,
    pub lbctl: PathBuf,
    pub work: PathBuf,
    pub manifests: PathBuf,
    pub bpffs: crate::guard::Bpffs,
    /// The agent's source and node flags (a manifest folder, or a
    /// kubeconfig for a real API server).
    pub source: Vec<String>,
}

/// Which program translates what comes from outside on node-a's eth0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePath {
    /// tc alone (`--xdp auto` leaves a veth to tc).
    Tc,
    /// XDP in the driver in front of tc (`--xdp native`), the senders
    /// towards node-a putting whole checksums on the wire.
    Xdp,
}

impl Cluster {
    pub fn start(lbctl: &Path, topo: Topology, files: &[(&str, &str)]) -> Self {
        Self::start_on(lbctl, topo, files, DevicePath::Tc)
    }

    pub fn start_on(
        lbctl: &Path,
        topo: Topology,
        files: &[(&str, &str)],
        path: DevicePath,
    ) -> Self {
        let mut c = Self::new(lbctl, topo);
        c.source = vec![
            "--manifests".into(),
            c.manifests.display().to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--node-ip".into(),
            NODE_IP.to_string(),
        ];
        if path == DevicePath::Xdp {
            c.topo.wire_checksums(&c.bpffs.dir);
            c.source.extend(["--xdp".into(), "native".into()]);
        }
        for (name, text) in files {
            c.write(name, text);
        }
        c.start_agent();
        c
    }

    /// The folders and bpffs of a cluster, no agent yet (`source` and
    /// `start_agent` start one).
    pub fn new(lbctl: &Path, topo: Topology) -> Self {
        let work = std::env::temp_dir().join(crate::guard::unique("wk"));
        let manifests = work.join("manifests");
        std::fs::create_dir_all(&manifests).expect("manifest folder");
        Self {
            agent: None,
            topo,
            lbctl: lbctl.to_path_buf(),
            work,
            manifests,
            bpffs: crate::guard::Bpffs::new(),
            source: vec![],
        }
    }

    pub fn pins(&self) -> PathBuf {
        self.bpffs.pins()
    }

    pub fn start_agent(&mut self) {
        let log = self.work.join("agent.log");
        self.agent = Some(Agent::start_with(
            &self.lbctl,
            &self.topo.node,
            &self.source,
            &self.pins(),
            &self.topo.cgroup.path,
            &log,
        ));
    }

    /// Takes the tc ingress program off node-a's eth0 (its pinned link
    /// removed; the agent re-attaches only a new device): with XDP on,
    /// what still gets translated is XDP's work alone.
    pub fn without_tc_ingress(&self) {
        let pin = self.pins().join("links").join("lb_from_netdev@eth0");
        std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("removing {}: {e}", pin.display()));
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.work.join("agent.log")).unwrap_or_default()
    }

    /// Replaces a manifest file atomically (the source skips dot-files, so
    /// the temporary never counts).
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.manifests.join(name)).expect("rename manifest");
    }

    /// `lbctl <args> -o json --bpffs <pins>`, parsed.
    pub fn lbctl_json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(&self.lbctl)
            .args(args)
            .args(["-o", "json", "--bpffs"])
            .arg(self.pins())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// `lbctl explain ... -o json` run in node-a's network namespace (as
    /// the agent's pod would run it), parsed.
    pub fn explain(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.topo.node.name))
            .arg(&self.lbctl)
            .arg("explain")
            .args(args)
            .args(["-o", "json", "--bpffs"])
            .arg(self.pins())
            .output()
            .expect("run lbctl explain");
        assert!(
            out.status.success(),
            "lbctl explain {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("explain JSON")
    }

    /// `lbctl counters`: every verdict's count by its label.
    pub fn verdicts(&self) -> std::collections::BTreeMap<String, u64> {
        verdicts(&self.lbctl, &self.pins())
    }

    /// `lbctl services` as a finished write pass left the maps (see
    /// [`settled_services`]).
    pub fn settled_services(&self) -> Result<serde_json::Value, String> {
        settled_services(&self.lbctl, &self.pins())
    }

    /// Waits until `lbctl services`, read between write passes, satisfies
    /// `ok`: the maps then hold the whole pass, frontends included (a view
    /// read during a pass can show a port's backends before its frontends).
    pub fn wait_services(&self, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.settled_services() {
                Ok(v) if v.as_array().is_some_and(|a| ok(a)) => return,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.work.join("agent.log")).unwrap_or_default();
        panic!("timed out waiting for {what}; last services: {last}\nagent log:\n{log}");
    }

    /// Waits until `lbctl status -o json` satisfies `ok` (the agent
    /// publishes its record after the maps it describes are written, so a
    /// reader that saw the maps may still see the previous record).
    pub fn wait_status(
        &self,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.lbctl_json(&["status"]) {
                Ok(v) if ok(&v) => return v,
                Ok(v) => last = format!("{v:#}"),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; last status: {last}");
    }

    /// A command in `ns` whose process is in the socket-LB cgroup.
    pub fn in_cgroup(&self, ns: &Netns, program: &str, args: &[&str]) -> Command {
        self.topo.in_pod_cgroup(ns, program, args)
    }

    /// GET `url` from `ns` as a pod (in the cgroup); the body or a panic.
    pub fn get_from_pod(&self, ns: &Netns, url: &str) -> String {
        let args = curl_args(url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.in_cgroup(ns, "curl", &refs))
            .unwrap_or_else(|e| panic!("GET {url} from {}: {e}\n{}", ns.name, self.diagnosis()))
    }

    /// GET `url` from the outside client (not in the cgroup).
    pub fn get_from_client(&self, url: &str) -> String {
        let mut c = self.topo.client.command("curl");
        c.args(curl_args(url));
        curl(c).unwrap_or_else(|e| panic!("GET {url} from the client: {e}\n{}", self.diagnosis()))
    }

    /// What a failed request's message shows: the verdicts counted so far,
    /// the agent's status and the end of its log.
    pub fn diagnosis(&self) -> String {
        let verdicts: Vec<String> = self
            .lbctl_json(&["counters"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|c| c["count"].as_u64().is_some_and(|n| n > 0))
            .map(|c| format!("{}={}", c["verdict"].as_str().unwrap_or("?"), c["count"]))
            .collect();
        let status = self
            .lbctl_json(&["status"])
            .map(|s| s["agent"].to_string())
            .unwrap_or_else(|e| e);
        let log = self.agent_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "verdicts: {}\nagent: {status}\nagent log (last 40 lines):\n{}",
            verdicts.join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
        let _ = Command::new(&self.lbctl)
            .args(["agent", "--cleanup", "--bpffs"])
            .arg(self.pins())
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// `lbctl counters` of the maps at `pins`: every verdict's count by its
/// label.
pub fn verdicts(lbctl: &Path, pins: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new(lbctl)
        .args(["counters", "-o", "json", "--bpffs"])
        .arg(pins)
        .output()
        .expect("lbctl counters");
    assert!(
        out.status.success(),
        "lbctl counters: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("counters JSON");
    v.as_array()
        .expect("a list of verdicts")
        .iter()
        .map(|c| {
            (
                c["verdict"].as_str().unwrap_or_default().to_string(),
                c["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// `lbctl services -o json` for `pins`, read while no write pass runs: the
/// agent flags its record pending before a pass's first write and records
/// the pass after its last, so a view read between two records that show
/// the same finished pass is a whole one. With no agent running the maps
/// do not change.
pub fn settled_services(lbctl: &Path, pins: &Path) -> Result<serde_json::Value, String> {
    let json = |what: &str| -> Result<serde_json::Value, String> {
        let out = Command::new(lbctl)
            .args([what, "-o", "json", "--bpffs"])
            .arg(pins)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    };
    // The finished passes a running agent's record shows (None: no agent
    // running), or an error while a pass is under way.
    let passes = |s: &serde_json::Value| -> Result<Option<u64>, String> {
        let a = &s["agent"];
        if a["running"] != true {
            return Ok(None);
        }
        if a["pending"] == true {
            return Err("the agent has changes on their way to the maps".into());
        }
        Ok(a["syncs"].as_u64())
    };
    let before = passes(&json("status")?)?;
    let services = json("services")?;
    if passes(&json("status")?)? != before {
        return Err("a write pass ran while the maps were read".into());
    }
    Ok(services)
}

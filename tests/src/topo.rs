//! A small cluster in network namespaces, shared by the demo and the
//! end-to-end tests:
//!
//! ```text
//!  client 172.18.0.10 ──eth0── node ──eth1── ext 192.168.0.10
//!   (outside)          172.18.0.2  │  192.168.0.1   (outside the cluster)
//!                               br0 10.244.1.1
//!                        ┌─────────┼─────────┐
//!                      pod-1     pod-2     pod-3    10.244.1.11-13
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
    pub node: Netns,
    pub client: Netns,
    pub ext: Netns,
    pub pods: Vec<Pod>,
    /// Socket-level load balancing applies to processes in this cgroup.
    pub cgroup: Cgroup,
    servers: Vec<Proc>,
}

fn ip(ns: &Netns, args: &[&str]) {
    let mut all = vec!["-n", ns.name.as_str()];
    all.extend_from_slice(args);
    run("ip", &all);
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`), both up.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(
        a,
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
    );
    ip(a, &["link", "set", a_if, "up"]);
    ip(b, &["link", "set", b_if, "up"]);
}

impl Topology {
    pub fn new(pods: usize) -> Self {
        let node = Netns::new("nd");
        let client = Netns::new("cl");
        let ext = Netns::new("ex");
        node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

        veth(&node, "eth0", &client, "eth0");
        ip(
            &node,
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"],
        );
        ip(
            &client,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
        );

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

        ip(&node, &["link", "add", "br0", "type", "bridge"]);
        ip(
            &node,
            &["addr", "add", &format!("{POD_GW}/24"), "dev", "br0"],
        );
        ip(&node, &["link", "set", "br0", "up"]);
        let pods = (1..=pods)
            .map(|i| {
                let ns = Netns::new("po");
                let pod_ip = Ipv4Addr::new(10, 244, 1, 10 + i as u8);
                let host_if = format!("veth{i}");
                veth(&ns, "eth0", &node, &host_if);
                ip(&node, &["link", "set", &host_if, "master", "br0"]);
                ip(
                    &ns,
                    &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"],
                );
                ip(
                    &ns,
                    &["route", "add", "default", "via", &POD_GW.to_string()],
                );
                Pod {
                    name: format!("pod-{i}"),
                    ip: pod_ip,
                    ns,
                }
            })
            .collect();
        Self {
            node,
            client,
            ext,
            pods,
            cgroup: Cgroup::new(),
            servers: vec![],
        }
    }

    /// An HTTP server in `ns` on `port` that answers every GET with `name`.
    pub fn http_server(&mut self, ns_name: &str, port: u16, name: &str) {
        const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (sys.argv[2] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns_name,
                "python3",
                "-c",
                SERVER,
                &port.to_string(),
                name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 HTTP server");
        self.servers.push(Proc(child));
    }

    /// A UDP server in `ns` on `port` that answers every datagram with
    /// `name`.
    pub fn udp_server(&mut self, ns_name: &str, port: u16, name: &str) {
        const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    _, peer = s.recvfrom(2048)
    s.sendto(sys.argv[2].encode(), peer)
"#;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns_name,
                "python3",
                "-c",
                SERVER,
                &port.to_string(),
                name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 UDP server");
        self.servers.push(Proc(child));
    }

    /// Waits until something listens on `port` in namespace `ns_name`.
    pub fn wait_listening(ns_name: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!(":{port} ");
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", ns_name, "ss", "-ltnH"])
                .output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&want)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("nothing listens on port {port} in {ns_name}");
    }

    /// Starts an HTTP server in every pod, answering with the pod's name.
    pub fn start_pod_servers(&mut self, port: u16) {
        let pods: Vec<(String, String)> = self
            .pods
            .iter()
            .map(|p| (p.ns.name.clone(), p.name.clone()))
            .collect();
        for (ns, name) in &pods {
            self.http_server(ns, port, name);
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
        let logf = std::fs::File::create(log).expect("agent log");
        let child = Command::new("nsenter")
            .arg("--net=".to_string() + &format!("/run/netns/{}", node.name))
            .arg(lbctl)
            .args(["agent", "--manifests"])
            .arg(manifests)
            .arg("--bpffs")
            .arg(pins)
            .arg("--cgroup")
            .arg(cgroup)
            .args([
                "--node-name",
                NODE_NAME,
                "--node-ip",
                &NODE_IP.to_string(),
                "--devices",
                "eth0",
                "--poll-ms",
                "100",
            ])
            .env("RUST_LOG", "info")
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("start lbctl agent");
        Self {
            proc: Proc(child),
            log: log.to_path_buf(),
        }
    }

    /// SIGTERM, as a DaemonSet rollout would, then wait.
    pub fn stop(&mut self) {
        // SAFETY: our own child's PID.
        unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGTERM) };
        let _ = self.proc.0.wait();
    }
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

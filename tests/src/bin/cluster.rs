//! `cargo xtask cluster up|down|status`: the control plane the tests use,
//! started by hand for a look around. `up` leaves etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler running in the namespace
//! `lbcluster-cp`, joined to a LAN bridge in `lbcluster-lan`, with every
//! file under /tmp/lbcluster; `down` stops them by PID and removes it all.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use lb_tests::{
    controlplane::{self, CP_IP, ControlPlane},
    guard::Netns,
    topo,
};

const DIR: &str = "/tmp/lbcluster";
const LAN: &str = "lbcluster-lan";
const CP: &str = "lbcluster-cp";

fn main() -> Result<()> {
    lb_tests::require_root();
    match std::env::args().nth(1).as_deref() {
        Some("up") => up(),
        Some("down") => down(),
        Some("status") => status(),
        _ => bail!("usage: cluster up|down|status"),
    }
}

fn pids_file() -> PathBuf {
    PathBuf::from(DIR).join("pids")
}

fn up() -> Result<()> {
    if pids_file().exists() {
        bail!("a cluster is already up ({DIR}); `cargo xtask cluster down` first");
    }
    let lan = Netns::named(LAN);
    topo::ip(&lan, &["link", "add", "lan0", "type", "bridge"]);
    topo::ip(&lan, &["link", "set", "lan0", "up"]);
    let cp = ControlPlane::start_in(
        &lan,
        "lan0",
        CP_IP,
        Netns::named(CP),
        "p-control",
        PathBuf::from(DIR),
    );
    let kubeconfig = cp.admin_kubeconfig();
    let pids = cp.detach();
    std::mem::forget(lan);
    std::fs::write(
        pids_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    println!(
        "Kubernetes {} is up: API server https://{CP_IP}:6443 in namespace {CP} (LAN bridge lan0 in {LAN}).\n\
         kubectl: ip netns exec {CP} {} --kubeconfig {} get --raw /readyz\n\
         logs: {DIR}/logs; stop with `cargo xtask cluster down`",
        controlplane::kubernetes_version(),
        controlplane::bin("kubectl").display(),
        kubeconfig.display()
    );
    Ok(())
}

/// True when `pid` runs one of our upstream binaries (a PID the cluster
/// started, not one the system reused since).
fn ours(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("cluster-bin"))
        .unwrap_or(false)
        || std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|e| e.to_string_lossy().contains("/go/"))
            .unwrap_or(false)
}

fn down() -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(pids_file()) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if ours(pid) {
                // SAFETY: a PID this tool started, checked above.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        // kube-apiserver can take half a minute to shut down gracefully;
        // what is still ours after 10 s gets SIGKILL, so nothing outlives
        // `down`.
        for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            for _ in 0..200 {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if ours(pid) {
                // SAFETY: a PID this tool started, checked again just now.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    for ns in [CP, LAN] {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    if std::path::Path::new(DIR).exists() {
        std::fs::remove_dir_all(DIR).with_context(|| format!("removing {DIR}"))?;
    }
    println!("cluster down");
    Ok(())
}

fn status() -> Result<()> {
    let Ok(text) = std::fs::read_to_string(pids_file()) else {
        println!("no cluster is up");
        return Ok(());
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        println!(
            "{pid:>8}  {}",
            if name.is_empty() {
                "(gone)"
            } else {
                name.trim()
            }
        );
    }
    let out = Command::new("ip")
        .args(["netns", "exec", CP])
        .arg(controlplane::bin("kubectl"))
        .args(["--kubeconfig", &format!("{DIR}/admin.kubeconfig")])
        .args(["get", "--raw", "/readyz?verbose"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

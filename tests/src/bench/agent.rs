//! The real agent for the benchmark: `lbctl-e2e` (lbctl built with this
//! package, so always the current code) in a node namespace on a folder
//! of Services, until its first sync is in the maps.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    guard::{Netns, Proc},
    kubeproxy::Svc,
};

use super::{cluster, packet::NODE};

fn lbctl() -> std::path::PathBuf {
    std::env::current_exe().unwrap().with_file_name("lbctl-e2e")
}

/// Starts the agent in `node` on `work/manifests` holding `svcs`, with
/// its maps in `pins`, socket programs on `cgroup` and tc on `devices`
/// (if any); waits for "first sync done", calling `waiting(pid)` at each
/// poll. Returns the agent (killed by its PID on drop) and the time from
/// start to the first sync.
pub fn start(
    node: &Netns,
    work: &Path,
    svcs: &[Svc],
    pins: &Path,
    cgroup: &Path,
    devices: &[&str],
    waiting: impl FnMut(u32),
) -> (Proc, Duration) {
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("services.yaml"),
        cluster::to_yaml(svcs, "node-a"),
    )
    .unwrap();
    let source = ["--manifests".to_string(), manifests.display().to_string()];
    start_on(
        node,
        work,
        &source,
        svcs.len(),
        pins,
        cgroup,
        devices,
        waiting,
    )
}

/// As `start`, with the source flags given (`--kubeconfig F` for an API
/// server holding `services` Services).
#[expect(clippy::too_many_arguments, reason = "one call per source, all named")]
pub fn start_on(
    node: &Netns,
    work: &Path,
    source: &[String],
    services: usize,
    pins: &Path,
    cgroup: &Path,
    devices: &[&str],
    mut waiting: impl FnMut(u32),
) -> (Proc, Duration) {
    std::fs::create_dir_all(work).unwrap();
    let log = work.join("agent.log");
    let start = Instant::now();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", node.name));
    // A profiler around the agent (`LB_BENCH_AGENT_WRAP="heaptrack -o
    // /tmp/agent"`): where its bytes and time go, with the same inputs.
    if let Ok(wrap) = std::env::var("LB_BENCH_AGENT_WRAP") {
        cmd.args(wrap.split_whitespace());
    }
    cmd.arg(lbctl())
        .arg("agent")
        .args(source)
        .arg("--bpffs")
        .arg(pins)
        .arg("--cgroup")
        .arg(cgroup)
        .args([
            "--node-name",
            "node-a",
            "--node-ip",
            &NODE.to_string(),
            "--poll-ms",
            "50",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
            "--lb-map-max",
            &crate::fixture::lb_map_max_for(services * 10).to_string(),
        ]);
    // Device flags (`--devices eth0`, `--xdp native`); none: no device.
    cmd.args(devices);
    let agent = Proc(
        cmd.stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("lbctl agent (build it: cargo build -p lb-tests --bins)"),
    );
    let pid = agent.0.id();
    loop {
        waiting(pid);
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("first sync done")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "agent did not sync: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (agent, start.elapsed())
}

/// Stops `agent` and removes its attachments and maps.
pub fn stop(agent: Proc, pins: &Path) {
    drop(agent);
    let _ = Command::new(lbctl())
        .args(["agent", "--cleanup", "--bpffs"])
        .arg(pins)
        .output();
}

/// The XDP modes `lbctl status` reports for the agent whose maps are in
/// `pins` (`native`, `generic`), one per device with XDP.
pub fn xdp_modes(pins: &Path) -> Vec<String> {
    let out = Command::new(lbctl())
        .args(["status", "-o", "json", "--bpffs"])
        .arg(pins)
        .output()
        .expect("lbctl status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["xdp_mode"].as_str().map(str::to_string))
        .collect()
}

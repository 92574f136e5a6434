//! `cargo xtask bench`: the figures behind the README's Performance
//! section, all measured in one run on one machine. A benchmark, not a
//! test: it prints and writes figures and asserts nothing about them.
//!
//! - `packet`: per-packet cost with BPF_PROG_TEST_RUN at 1 to 100,000
//!   Services, beside do-nothing floors; map memory; verifier counts.
//! - `e2e`: requests through a ClusterIP and a NodePort in network
//!   namespaces: direct to the pod (the floor), this datapath, and
//!   kube-proxy's iptables and nftables rule sets recreated.
//! - `control`: agent sync and change latency, peak RSS; kube-proxy's
//!   iptables-restore and nft -f of the same Services.
//! - `plot`: SVG plots of the above.

pub mod agent;
pub mod cluster;
pub mod control;
pub mod e2e;
pub mod memory;
pub mod packet;
pub mod plot;

use std::{net::Ipv4Addr, time::Instant};

use lbctl::agent::model::NodeInfo;

/// CPU model, cores and kernel: absolute figures are only true here.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

pub fn node_info(addr: Ipv4Addr) -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![addr],
        snat: None,
        balancing: Default::default(),
    }
}

/// 10000 -> "10,000".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The progress display: each step with the time since the start, on
/// stderr (the results go to stdout).
pub struct Progress {
    start: Instant,
    steps: usize,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            steps: 0,
        }
    }

    pub fn step(&mut self, what: &str) {
        self.steps += 1;
        let t = self.start.elapsed().as_secs();
        eprintln!("[{:02}:{:02}] {:>3}. {what}", t / 60, t % 60, self.steps);
    }

    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands() {
        assert_eq!(super::thousands(1), "1");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(100_000), "100,000");
    }
}

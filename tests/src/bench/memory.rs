//! Kernel memory of the pinned maps, as the kernel accounts it (the
//! `memlock` line of each map's fdinfo: what the map charges to the
//! memory cgroup, preallocated or not).

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::MapData;

/// (map name, bytes) for every map pinned in `pins`, largest first.
pub fn maps(pins: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for name in lb_common::maps::ALL {
        let Ok(m) = MapData::from_pin(pins.join(name)) else {
            continue;
        };
        let fd = m.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        let bytes = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((name.to_string(), bytes));
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

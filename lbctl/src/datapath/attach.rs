//! Attaching the programs: socket hooks on a cgroup, tc (tcx) hooks on
//! devices. Every attachment is a bpf_link pinned under `<pins>/links`, so it
//! stays when the agent exits (the datapath keeps forwarding); a restarted
//! or upgraded agent swaps its own programs in under those links with one
//! atomic update each, so packets always meet a program.

use std::{
    fs,
    path::{Path, PathBuf},
};

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder,
        SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions,
    },
};

use super::pins::links_dir;

/// The socket-level programs and their hooks.
pub const SOCK_PROGRAMS: &[&str] = &[
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];
/// `loadBalancerSourceRanges` for sockets: on the cgroup only while some
/// Service has source ranges.
pub const SOCK_EGRESS: &str = "lb_sock_egress";
pub const FROM_NETDEV: &str = "lb_from_netdev";
pub const TO_NETDEV: &str = "lb_to_netdev";

fn link_path(pins: &Path, program: &str, device: Option<&str>) -> PathBuf {
    let name = match device {
        Some(d) => format!("{program}@{d}"),
        None => program.to_string(),
    };
    links_dir(pins).join(name)
}

/// What happened to each hook on (re)start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Newly attached and pinned.
    pub attached: usize,
    /// A pinned link found and pointed at this agent's program, atomically.
    pub replaced: usize,
    /// A pinned link on another cgroup (an agent started with another
    /// `--cgroup`): attached anew where asked, then the old one removed.
    pub moved: usize,
}

/// Whether the link pinned at `path` is attached to another cgroup than
/// the one whose id is `want`.
fn on_other_cgroup(path: &Path, want: u64) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let link =
        super::link::open_pinned(path).with_context(|| format!("opening {}", path.display()))?;
    let id = super::link::cgroup_id(link.as_fd())
        .with_context(|| format!("reading the cgroup of {}", path.display()))?;
    Ok(id.is_some_and(|id| id != want))
}

/// Puts this agent's `prog` under the link pinned at `path`, if there is a
/// live one. Returns false when there is none (or it is defunct: its device
/// went away), after removing a defunct pin.
fn replace_pinned(path: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let link =
        super::link::open_pinned(path).with_context(|| format!("opening {}", path.display()))?;
    match super::link::update(link.as_fd(), prog) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            fs::remove_file(path)
                .with_context(|| format!("removing defunct {}", path.display()))?;
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("replacing the program under {}", path.display())),
    }
}

/// Attaches the socket programs to `cgroup`, or swaps them in under the
/// pinned links of an earlier agent.
pub fn cgroup(ebpf: &mut Ebpf, pins: &Path, cgroup: &Path) -> Result<Outcome> {
    let mut out = Outcome::default();
    let cg =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    // A cgroup's id is its folder's inode number.
    let want = std::os::unix::fs::MetadataExt::ino(&cg.metadata()?);
    for name in SOCK_PROGRAMS {
        let path = link_path(pins, name, None);
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        let moving = on_other_cgroup(&path, want)?;
        if !moving && replace_pinned(&path, prog.fd()?.as_fd())? {
            out.replaced += 1;
            continue;
        }
        // Make before break: the new cgroup has the program before the
        // old link goes (its last reference is the pin).
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        if moving {
            fs::remove_file(&path)
                .with_context(|| format!("removing {} (another cgroup)", path.display()))?;
            out.moved += 1;
        } else {
            out.attached += 1;
        }
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    Ok(out)
}

/// Puts `lb_sock_egress` on `cgroup` (`on`), swapping this agent's program
/// in under a pinned link of an earlier agent, or takes it off. Returns
/// whether an attachment was made or removed.
pub fn sock_egress(ebpf: &mut Ebpf, pins: &Path, cgroup: &Path, on: bool) -> Result<bool> {
    let path = link_path(pins, SOCK_EGRESS, None);
    if !on {
        if !path.exists() {
            return Ok(false);
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        return Ok(true);
    }
    let cg =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let want = std::os::unix::fs::MetadataExt::ino(&cg.metadata()?);
    let prog: &mut CgroupSkb = ebpf
        .program_mut(SOCK_EGRESS)
        .with_context(|| format!("program {SOCK_EGRESS} missing from the object"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("loading {SOCK_EGRESS}"))?;
    }
    let moving = on_other_cgroup(&path, want)?;
    if !moving && replace_pinned(&path, prog.fd()?.as_fd())? {
        return Ok(false);
    }
    let id = prog
        .attach(&cg, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {SOCK_EGRESS} to cgroup {}", cgroup.display()))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    if moving {
        fs::remove_file(&path)
            .with_context(|| format!("removing {} (another cgroup)", path.display()))?;
    }
    link.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(true)
}

/// Attaches the device programs to `device` (tcx ingress and egress), or
/// swaps them in under live pinned links.
pub fn device(ebpf: &mut Ebpf, pins: &Path, device: &str) -> Result<Outcome> {
    let mut out = Outcome::default();
    for (name, dir) in [
        (FROM_NETDEV, TcAttachType::Ingress),
        (TO_NETDEV, TcAttachType::Egress),
    ] {
        let path = link_path(pins, name, Some(device));
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        if replace_pinned(&path, prog.fd()?.as_fd())? {
            out.replaced += 1;
            continue;
        }
        let id = prog
            .attach_with_options(device, dir, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("attaching {name} to {device} ({dir:?})"))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        out.attached += 1;
    }
    Ok(out)
}

/// Pinned attachments: (file name, program, device).
pub fn pinned(pins: &Path) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(links_dir(pins)) else {
        return out;
    };
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let (prog, dev) = match file.split_once('@') {
            Some((p, d)) => (p.to_string(), Some(d.to_string())),
            None => (file.clone(), None),
        };
        out.push((file, prog, dev));
    }
    out.sort();
    out
}

/// Detaches a device's programs (the device went away or is no longer
/// matched): unpinning drops the last reference to the link.
pub fn detach_device(pins: &Path, device: &str) -> Result<()> {
    for name in [FROM_NETDEV, TO_NETDEV] {
        let path = link_path(pins, name, Some(device));
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes every pinned link and map: the datapath stops.
pub fn cleanup(pins: &Path) -> Result<()> {
    if !pins.exists() {
        return Ok(());
    }
    let links = links_dir(pins);
    if links.exists() {
        for e in fs::read_dir(&links)?.flatten() {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
        fs::remove_dir(&links)?;
    }
    for e in fs::read_dir(pins)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            // A scratch folder of an `lbctl explain` that did not finish.
            for f in fs::read_dir(&p)?.flatten() {
                fs::remove_file(f.path())
                    .with_context(|| format!("removing {}", f.path().display()))?;
            }
            fs::remove_dir(&p).with_context(|| format!("removing {}", p.display()))?;
        } else {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    fs::remove_dir(pins).with_context(|| format!("removing {}", pins.display()))?;
    Ok(())
}

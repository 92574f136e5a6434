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
        SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc::TcAttachOptions,
    },
};

use super::{
    pins::links_dir,
    xdp_mode::{self, XdpAttached},
};

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
/// The device path in XDP, in front of `lb_from_netdev` (`--xdp`).
pub const XDP_FROM_NETDEV: &str = "lb_xdp_from_netdev";

/// `--xdp`: whether and how the XDP program goes on the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpChoice {
    /// tc only.
    Off,
    /// Native where the driver has it; generic on a hardware device whose
    /// driver has not; tc alone elsewhere: on veth (see `VETH_REASON`) and
    /// on virtual devices without native XDP, where generic XDP would cost
    /// more than tc saves.
    Auto,
    /// Native (in the driver) on every device, or the device is refused.
    Native,
    /// Generic (on the skb) on every device.
    Generic,
}

/// Why `auto` leaves veth devices to tc: a packet built on this host
/// crosses a veth with its checksum left to offload (CHECKSUM_PARTIAL),
/// which an XDP program cannot see; a rewritten one then leaves with a
/// wrong checksum. Packets from a wire always carry whole checksums.
pub const VETH_REASON: &str =
    "veth: host-built packets cross it with checksums left to offload, which XDP cannot see";

/// The XDP outcome on one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpOutcome {
    /// Attached (or kept, with this agent's program swapped in) in `mode`.
    On { mode: XdpAttached, replaced: bool },
    /// tc only, and why.
    Off { reason: String },
}

/// The driver of `device` and its bus address, empty for a virtual device
/// (`ETHTOOL_GDRVINFO`, as `ethtool -i` shows `driver` and `bus-info`).
pub fn driver(device: &str) -> Option<(String, String)> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // `struct ethtool_drvinfo`: cmd, then driver[32], ...; 196 bytes.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    // SAFETY: zeroed plain-old-data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = device.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = info.as_mut_ptr().cast();
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq points at `info`, which outlives the call.
    let r = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    if r < 0 {
        return None;
    }
    let text = |d: &[u8]| {
        let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
        String::from_utf8_lossy(&d[..end]).into_owned()
    };
    // driver[32], version[32], fw_version[32], bus_info[32].
    Some((text(&info[4..36]), text(&info[100..132])))
}

fn ifindex(device: &str) -> Result<u32> {
    let c = std::ffi::CString::new(device)?;
    // SAFETY: NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(i != 0, "no device {device}");
    Ok(i)
}

/// Puts the XDP program on `device` as `choice` says, swapping it in under
/// a live pinned link of an earlier agent when that link's mode is one
/// `choice` accepts, re-attaching otherwise (tc, always attached, carries
/// the traffic meanwhile). With `auto`, a device that takes no XDP is left
/// to tc and the reason returned; with `native` or `generic` it is an error.
pub fn xdp(ebpf: &mut Ebpf, pins: &Path, device: &str, choice: XdpChoice) -> Result<XdpOutcome> {
    let path = link_path(pins, XDP_FROM_NETDEV, Some(device));
    let off = |path: &Path, reason: &str| -> Result<XdpOutcome> {
        if path.exists() {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(XdpOutcome::Off {
            reason: reason.into(),
        })
    };
    if choice == XdpChoice::Off {
        return off(&path, "--xdp=off");
    }
    let (driver, bus) = driver(device).unwrap_or_default();
    if choice == XdpChoice::Auto && driver == "veth" {
        return off(&path, VETH_REASON);
    }
    let hardware = !bus.is_empty();
    let index = ifindex(device)?;
    let prog: &mut Xdp = ebpf
        .program_mut(XDP_FROM_NETDEV)
        .with_context(|| format!("program {XDP_FROM_NETDEV} missing from the object"))?
        .try_into()?;
    if prog.fd().is_err() {
        super::load::verified(|| prog.load())
            .with_context(|| format!("loading {XDP_FROM_NETDEV}"))?;
    }
    let accepts = |m: XdpAttached| match choice {
        XdpChoice::Native => m == XdpAttached::Driver,
        XdpChoice::Generic => m == XdpAttached::Skb,
        _ => matches!(m, XdpAttached::Driver | XdpAttached::Skb),
    };
    if path.exists() {
        let now = xdp_mode::attached(index)
            .with_context(|| format!("reading the XDP mode of {device}"))?;
        if accepts(now) {
            if replace_pinned(&path, prog.fd()?.as_fd())? {
                return Ok(XdpOutcome::On {
                    mode: now,
                    replaced: true,
                });
            }
        } else {
            // Another mode than asked: off, then on again as asked.
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let modes: &[(XdpMode, XdpAttached)] = match choice {
        XdpChoice::Native => &[(XdpMode::Driver, XdpAttached::Driver)],
        XdpChoice::Generic => &[(XdpMode::Skb, XdpAttached::Skb)],
        _ if hardware => &[
            (XdpMode::Driver, XdpAttached::Driver),
            (XdpMode::Skb, XdpAttached::Skb),
        ],
        _ => &[(XdpMode::Driver, XdpAttached::Driver)],
    };
    let mut errors = Vec::new();
    for (mode, attached) in modes {
        match prog.attach_to_if_index(index, *mode) {
            Ok(id) => {
                let link: FdLink = prog
                    .take_link(id)?
                    .try_into()
                    .with_context(|| format!("{device}: XDP attached without a bpf_link"))?;
                link.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                return Ok(XdpOutcome::On {
                    mode: *attached,
                    replaced: false,
                });
            }
            Err(e) => errors.push(format!("{}: {e}", attached.name())),
        }
    }
    let reason = if choice == XdpChoice::Auto && !hardware {
        format!(
            "virtual device ({driver}) without native XDP: generic XDP would cost more than tc ({})",
            errors.join("; ")
        )
    } else {
        format!("XDP refused ({})", errors.join("; "))
    };
    if choice == XdpChoice::Auto {
        return off(&path, &reason);
    }
    anyhow::bail!("{device}: {reason}")
}

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
            super::load::verified(|| prog.load()).with_context(|| format!("loading {name}"))?;
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
        super::load::verified(|| prog.load()).with_context(|| format!("loading {SOCK_EGRESS}"))?;
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
            super::load::verified(|| prog.load()).with_context(|| format!("loading {name}"))?;
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
    for name in [XDP_FROM_NETDEV, FROM_NETDEV, TO_NETDEV] {
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

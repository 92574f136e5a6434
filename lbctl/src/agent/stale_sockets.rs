//! Connected UDP sockets whose backend left the Service, ended.
//!
//! The socket programs translate a connected UDP socket once, at
//! `connect()`: its datagrams then go to the backend's address with no
//! program on the way, so a backend that leaves would keep receiving them
//! (or black-hole them) for the socket's life. After a flush that took UDP
//! backends out of a Service port, a worker thread visits every network
//! namespace of the node (one `/proc/<pid>/ns/net` per namespace), lists
//! its connected UDP sockets (sock_diag) and destroys each one that the
//! socket programs connected through that port to a backend that left: the
//! socket's (cookie, backend) entry in `LB4_SOCK_REVNAT_V1` names the port.
//! Sockets connected to a pod address directly have no such entry and are
//! never touched. The owner sees ECONNABORTED (EDESTADDRREQ on `send`) and
//! connects again, to a live backend, as Cilium's socket termination does.
//!
//! Unconnected UDP sockets need none of this: their datagrams pass the
//! `sendmsg` program, which re-chooses when the backend left.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use lb_common::sock::SockRevNat4Key;
use prometheus_client::metrics::counter::Counter;
use tracing::{debug, info, warn};

use super::reconcile::UdpLeft;
use crate::datapath::{maps::SockMaps, sockdiag::SockDiag};

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub namespaces: usize,
    pub sockets: usize,
    pub destroyed: usize,
}

/// The worker: passes are asked for with [`Terminator::backends_left`] and
/// run in order on one thread (it enters other network namespaces, which
/// only the calling thread does, so the agent's other threads never move).
pub struct Terminator {
    tx: mpsc::Sender<Vec<UdpLeft>>,
}

impl Terminator {
    /// Starts the worker. `proc` is the process folder whose `ns/net`
    /// links name the node's namespaces (`/proc`: the DaemonSet runs with
    /// the host's PID namespace).
    pub fn start(pins: PathBuf, proc: PathBuf, counter: Counter) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<UdpLeft>>();
        let home = fs::File::open("/proc/thread-self/ns/net")?;
        thread::Builder::new()
            .name("udp-sockets".into())
            .spawn(move || {
                let home: OwnedFd = home.into();
                while let Ok(first) = rx.recv() {
                    // Everything asked meanwhile goes into one pass.
                    let mut left: BTreeSet<UdpLeft> = first.into_iter().collect();
                    left.extend(rx.try_iter().flatten());
                    match pass(&pins, &proc, &left, &home) {
                        Ok(p) => {
                            counter.inc_by(p.destroyed as u64);
                            if p.destroyed > 0 {
                                info!(
                                    destroyed = p.destroyed,
                                    namespaces = p.namespaces,
                                    connected_udp_sockets = p.sockets,
                                    "connected UDP sockets of backends that left destroyed"
                                );
                            } else {
                                debug!(
                                    namespaces = p.namespaces,
                                    sockets = p.sockets,
                                    "no connected UDP socket of the backends that left"
                                );
                            }
                        }
                        Err(e) => warn!("ending UDP sockets of backends that left: {e}"),
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Backends that left: their sockets are ended by the next pass.
    pub fn backends_left(&self, left: Vec<UdpLeft>) {
        if !left.is_empty() {
            // The worker lives as long as the agent; a send can only fail
            // once it has panicked, which its log shows.
            let _ = self.tx.send(left);
        }
    }
}

/// One `ns/net` path per network namespace of the node.
pub fn namespaces(proc: &Path) -> Vec<PathBuf> {
    let mut seen: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let Ok(dir) = fs::read_dir(proc) else {
        return Vec::new();
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = e.path().join("ns/net");
        // A process that ended meanwhile, or a kernel thread: skipped.
        if let Ok(m) = fs::metadata(&path) {
            seen.entry((m.dev(), m.ino())).or_insert(path);
        }
    }
    seen.into_values().collect()
}

fn setns(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor; affects this thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Visits every namespace and ends the sockets of `left`; comes back to
/// `home` (the agent's namespace) whatever happens.
fn pass(pins: &Path, proc: &Path, left: &BTreeSet<UdpLeft>, home: &OwnedFd) -> io::Result<Pass> {
    let revnat = SockMaps::open(pins)
        .map_err(|e| io::Error::other(e.to_string()))?
        .revnat;
    let wanted: BTreeSet<(u32, u16)> = left.iter().map(|l| (l.addr, l.port)).collect();
    let mut out = Pass::default();
    for ns in namespaces(proc) {
        let Ok(f) = fs::File::open(&ns) else { continue };
        if let Err(e) = setns(&f) {
            debug!(ns = %ns.display(), "entering: {e}");
            continue;
        }
        out.namespaces += 1;
        let r = in_namespace(&revnat, &wanted, left, &mut out);
        setns(home)?;
        if let Err(e) = r {
            debug!(ns = %ns.display(), "sockets: {e}");
        }
    }
    Ok(out)
}

fn in_namespace(
    revnat: &aya::maps::HashMap<aya::maps::MapData, SockRevNat4Key, lb_common::sock::SockRevNat4>,
    wanted: &BTreeSet<(u32, u16)>,
    left: &BTreeSet<UdpLeft>,
    out: &mut Pass,
) -> io::Result<()> {
    let mut diag = SockDiag::open()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for s in diag.connected_udp(family)? {
            out.sockets += 1;
            let addr = lb_common::ip4(s.dst.octets());
            let port = lb_common::port(s.dst_port);
            if !wanted.contains(&(addr, port)) {
                continue;
            }
            let key = SockRevNat4Key {
                cookie: s.cookie,
                backend_addr: addr,
                backend_port: port,
                _pad: 0,
            };
            // Only a socket the programs connected through a port the
            // backend left.
            let Ok(rev) = revnat.get(&key, 0) else {
                continue;
            };
            let gone = UdpLeft {
                service_id: rev.service_id,
                addr,
                port,
            };
            if left.contains(&gone) && diag.destroy(&s)? {
                out.destroyed += 1;
            }
        }
    }
    Ok(())
}

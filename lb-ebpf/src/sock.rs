//! Socket-level load balancing (cgroup connect4, sendmsg4, recvmsg4,
//! getpeername4). A pod's or host process's socket is pointed at a backend
//! once, when it connects or sends, so its packets need no NAT and no
//! connection tracking; the reverse translation makes the socket see the
//! Service address as its peer.

use aya_ebpf::{
    helpers::{
        bpf_get_socket_cookie,
        generated::{bpf_get_netns_cookie, bpf_set_retval},
    },
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    counters::{
        V_DROP_NO_LOCAL_BACKEND, V_DROP_UNALLOCATED_SERVICE_IP, V_REJECT_NO_BACKEND,
        V_REJECT_UNDEFINED_PORT, V_SOCK_REVERSED, V_SOCK_TRANSLATED,
    },
    hash,
    service::{
        ADDR_CLUSTER_IP, AFFINITY_BY_NETNS, FE_SOURCE_RANGES, Frontend4Key, SB_SERVING, SCOPE_ALL,
        ServiceBackendKey,
    },
    sock::{REV_SOURCE_RANGES, SockFlow4, SockFlow4Key, SockRevNat4, SockRevNat4Key},
};

use crate::{
    maps::{ADDRS4, CONFIG, SERVICE_BACKENDS, SOCK_FLOWS4, SOCK_REVNAT4, backend},
    select::{self, Client},
    stats,
};

/// Return values of cgroup sock_addr programs.
const SOCK_ALLOW: i32 = 1;
const SOCK_DENY: i32 = 0;
const ENETUNREACH: i32 = 101;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Fails the connect or send at once with `errno`.
#[inline(always)]
fn deny(errno: i32) -> i32 {
    // SAFETY: helper with a plain integer.
    unsafe { bpf_set_retval(-errno) };
    SOCK_DENY
}

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as `user_ip6` holds it (wire order).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Which address field of the context a hook reads and rewrites: IPv4
/// sockets' `user_ip4`, or the IPv4 part of an IPv4-mapped address in a
/// dual-stack IPv6 socket's `user_ip6` (Java's default, Python's with
/// `AF_INET6`): both are load-balanced alike.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V4Mapped,
}

/// The IPv4 address a hook sees, None when it is not one (a real IPv6
/// address: not load-balanced yet).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: Family) -> Option<u32> {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    match family {
        Family::V4 => Some(sa.user_ip4),
        Family::V4Mapped => {
            let a = sa.user_ip6;
            (a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED).then_some(a[3])
        }
    }
}

/// Rewrites the hook's address and port (wire order).
#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: Family, addr: u32, port: u16) {
    // SAFETY: valid context; these fields are writable in connect,
    // sendmsg, recvmsg and getpeername hooks of their family.
    unsafe {
        match family {
            Family::V4 => (*ctx.sock_addr).user_ip4 = addr,
            Family::V4Mapped => (*ctx.sock_addr).user_ip6[3] = addr,
        }
        (*ctx.sock_addr).user_port = port as u32;
    }
}

#[inline(always)]
fn frontend_key(ctx: &SockAddrContext, family: Family) -> Option<Frontend4Key> {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    Some(Frontend4Key {
        addr: user_addr(ctx, family)?,
        // user_port holds the wire-order port in its low 16 bits.
        port: sa.user_port as u16,
        proto,
        scope: SCOPE_ALL,
    })
}

/// 127.0.0.0/8 in wire order.
const LOOPBACK_NET: u32 = u32::from_ne_bytes([127, 0, 0, 0]);
const LOOPBACK_MASK: u32 = u32::from_ne_bytes([255, 0, 0, 0]);

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: valid context pointer.
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: valid context pointer.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// connect4 (TCP and connected UDP) and sendmsg4 (unconnected UDP).
/// `sticky`: remember the choice per (socket, frontend), for sendmsg where
/// every datagram passes here.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, family: Family, sticky: bool) -> i32 {
    let Some(key) = frontend_key(ctx, family) else {
        return SOCK_ALLOW;
    };
    let Some((key, fe)) = select::frontend_internal(&key) else {
        // SAFETY: copied out at once.
        match unsafe { ADDRS4.get(key.addr) }.copied() {
            // A ClusterIP on a port its Service does not define: refused,
            // as kube-proxy's nftables mode does, rather than sent off the
            // node.
            Some(f) if f & ADDR_CLUSTER_IP != 0 => {
                stats::verdict(V_REJECT_UNDEFINED_PORT);
                return deny(ECONNREFUSED);
            }
            // An address of the service CIDR no Service has: nothing is
            // there (kube-proxy's nftables mode drops it).
            None if CONFIG.get(0).is_some_and(|c| c.in_service_cidr(key.addr)) => {
                stats::verdict(V_DROP_UNALLOCATED_SERVICE_IP);
                return deny(ENETUNREACH);
            }
            _ => return SOCK_ALLOW,
        }
    };
    // NodePorts on 127.0.0.1 (`--nodeport-addresses localhost`) are the
    // node's: a pod's loopback is its own.
    if key.addr & LOOPBACK_MASK == LOOPBACK_NET
        && CONFIG
            .get(0)
            .is_none_or(|c| c.host_netns_cookie != netns_cookie(ctx))
    {
        return SOCK_ALLOW;
    }
    let cookie = cookie(ctx);
    let flow = SockFlow4Key {
        cookie,
        frontend_addr: key.addr,
        frontend_port: key.port,
        proto: key.proto,
        _pad: 0,
    };
    // A datagram socket keeps its backend (same id, same address: ids can
    // be reused after a backend is gone) while the Service port still has
    // it serving, as the device path keeps a UDP flow.
    let kept = if sticky {
        // SAFETY: values copied out at once.
        unsafe {
            SOCK_FLOWS4.get(&flow).and_then(|f| {
                let b = backend(f.backend_id)?;
                let same = b.addr == f.backend_addr && b.port == f.backend_port;
                let sb = ServiceBackendKey {
                    service_id: fe.service_id,
                    backend_id: f.backend_id,
                };
                let serving = SERVICE_BACKENDS
                    .get(&sb)
                    .is_some_and(|flags| flags & SB_SERVING != 0);
                (same && serving).then_some((f.backend_id, b))
            })
        }
    } else {
        None
    };
    let (_backend_id, backend) = match kept {
        Some(k) => k,
        None => match select::choose(
            &key,
            &fe,
            hash::sock4(cookie, key.addr, key.port, key.proto),
            &Client {
                kind: AFFINITY_BY_NETNS,
                id: netns_cookie(ctx),
            },
        ) {
            Ok(c) => {
                if sticky {
                    let f = SockFlow4 {
                        backend_id: c.backend_id,
                        backend_addr: c.backend.addr,
                        backend_port: c.backend.port,
                        _pad: 0,
                    };
                    let _ = SOCK_FLOWS4.insert(&flow, &f, 0);
                }
                stats::new_flow(fe.service_id);
                stats::backend_flow(c.backend_id);
                (c.backend_id, c.backend)
            }
            Err(v) => {
                stats::verdict(v);
                if v == V_REJECT_NO_BACKEND || v == V_DROP_NO_LOCAL_BACKEND {
                    stats::no_backend(fe.service_id);
                }
                debug!(
                    ctx,
                    "refuse connect to {:i}:{} (service {}): verdict {}",
                    u32::from_be(key.addr),
                    u16::from_be(key.port),
                    fe.service_id,
                    v
                );
                // No endpoint at all: refused like kube-proxy's REJECT, the
                // caller sees ECONNREFUSED at once. None this node may use
                // (a Local policy; kube-proxy drops): EHOSTUNREACH at once,
                // as a socket cannot be left waiting for a dropped SYN.
                return deny(if v == V_REJECT_NO_BACKEND {
                    ECONNREFUSED
                } else {
                    EHOSTUNREACH
                });
            }
        },
    };
    let rev_key = SockRevNat4Key {
        cookie,
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: 0,
    };
    let rev = SockRevNat4 {
        frontend_addr: key.addr,
        frontend_port: key.port,
        flags: if fe.flags & FE_SOURCE_RANGES != 0 {
            REV_SOURCE_RANGES
        } else {
            0
        },
        service_id: fe.service_id,
    };
    // A datagram socket that keeps its backend has its entry already: a
    // lookup, not a write per datagram (it is written again only if the
    // LRU evicted it).
    if kept.is_none() || SOCK_REVNAT4.get_ptr(&rev_key).is_none() {
        let _ = SOCK_REVNAT4.insert(&rev_key, &rev, 0);
    }
    set_user_addr(ctx, family, backend.addr, backend.port);
    stats::verdict(V_SOCK_TRANSLATED);
    SOCK_ALLOW
}

/// recvmsg and getpeername: show the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(addr) = user_addr(ctx, family) else {
        return SOCK_ALLOW;
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let key = SockRevNat4Key {
        cookie: cookie(ctx),
        backend_addr: addr,
        backend_port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REVNAT4.get(&key).copied() } {
        set_user_addr(ctx, family, rev.frontend_addr, rev.frontend_port);
        stats::verdict(V_SOCK_REVERSED);
    }
    SOCK_ALLOW
}

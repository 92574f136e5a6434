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
        V_DROP_NO_LOCAL_BACKEND, V_REJECT_NO_BACKEND, V_REJECT_UNDEFINED_PORT, V_SOCK_REVERSED,
        V_SOCK_TRANSLATED,
    },
    hash,
    service::{ADDR_CLUSTER_IP, AFFINITY_BY_NETNS, BACKEND_ACTIVE, Frontend4Key, SCOPE_ALL},
    sock::{SockFlow4, SockFlow4Key, SockRevNat4, SockRevNat4Key},
};

use crate::{
    maps::{ADDRS4, BACKENDS4, SOCK_FLOWS4, SOCK_REVNAT4},
    select::{self, Client},
    stats,
};

/// Return values of cgroup sock_addr programs.
const SOCK_ALLOW: i32 = 1;
const SOCK_DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Fails the connect or send at once with `errno`.
#[inline(always)]
fn deny(errno: i32) -> i32 {
    // SAFETY: helper with a plain integer.
    unsafe { bpf_set_retval(-errno) };
    SOCK_DENY
}

#[inline(always)]
fn frontend_key(ctx: &SockAddrContext) -> Option<Frontend4Key> {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    Some(Frontend4Key {
        addr: sa.user_ip4,
        // user_port holds the wire-order port in its low 16 bits.
        port: sa.user_port as u16,
        proto,
        scope: SCOPE_ALL,
    })
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
pub fn translate(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let Some(key) = frontend_key(ctx) else {
        return SOCK_ALLOW;
    };
    let Some((key, fe)) = select::frontend_internal(&key) else {
        // A ClusterIP on a port its Service does not define: refused, as
        // kube-proxy's nftables mode does, rather than sent off the node.
        // SAFETY: copied out at once.
        if unsafe { ADDRS4.get(key.addr) }.is_some_and(|f| f & ADDR_CLUSTER_IP != 0) {
            stats::verdict(V_REJECT_UNDEFINED_PORT);
            return deny(ECONNREFUSED);
        }
        return SOCK_ALLOW;
    };
    let cookie = cookie(ctx);
    let flow = SockFlow4Key {
        cookie,
        frontend_addr: key.addr,
        frontend_port: key.port,
        proto: key.proto,
        _pad: 0,
    };
    // A datagram socket keeps its backend while that backend is active
    // (same id, same address: ids can be reused after a backend is gone).
    let kept = if sticky {
        // SAFETY: values copied out at once.
        unsafe {
            SOCK_FLOWS4.get(&flow).and_then(|f| {
                let b = BACKENDS4.get(f.backend_id)?;
                let same = b.addr == f.backend_addr && b.port == f.backend_port;
                (same && b.state == BACKEND_ACTIVE).then_some((f.backend_id, *b))
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
                // SAFETY: valid context pointer.
                id: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
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
        _pad: 0,
        service_id: fe.service_id,
    };
    let _ = SOCK_REVNAT4.insert(&rev_key, &rev, 0);
    // SAFETY: valid context; these fields are writable in connect4/sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = backend.addr;
        (*ctx.sock_addr).user_port = backend.port as u32;
    }
    stats::verdict(V_SOCK_TRANSLATED);
    SOCK_ALLOW
}

/// recvmsg4 and getpeername4: show the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let key = SockRevNat4Key {
        cookie: cookie(ctx),
        backend_addr: sa.user_ip4,
        backend_port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REVNAT4.get(&key).copied() } {
        // SAFETY: these fields are writable in recvmsg4/getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = rev.frontend_addr;
            (*ctx.sock_addr).user_port = rev.frontend_port as u32;
        }
        stats::verdict(V_SOCK_REVERSED);
    }
    SOCK_ALLOW
}

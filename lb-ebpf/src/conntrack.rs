//! Per-packet flow state for the device path: lookup with expiry, touch with
//! TCP-aware lifetimes, and creation of both directions of a flow.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    PROTO_TCP,
    conntrack::{
        CT_CLOSING, CT_DSR, CT_FIN_ORIGINAL, CT_FIN_REPLY, CT_LIFETIME_TCP_CLOSING,
        CT_LIFETIME_TCP_ESTABLISHED, CT_LIFETIME_TCP_SYN, CT_LIFETIME_UDP, CT_LOCAL_BACKEND,
        CT_ORIGINAL, CT_REPLY, CT_SEEN_REPLY, CT_TIME_WAIT_S, Ct4Entry, Ct4Key,
    },
};

use crate::{
    maps::CONNTRACK4,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> Ct4Key {
    Ct4Key {
        src_addr: pkt.src_addr,
        dst_addr: pkt.dst_addr,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// Whether entry `e` has an other direction here. The client's direction
/// of a DSR flow on the node it came to has none (the replies go from the
/// backend's node straight to the client): its `other_key` would name an
/// unrelated flow's entry (an SNATed flow's reply entry, when the client's
/// port is in the SNAT range and that flow holds it as its SNAT port).
#[inline(always)]
pub fn paired(e: &Ct4Entry) -> bool {
    e.flags & (CT_DSR | CT_LOCAL_BACKEND) != CT_DSR
}

/// The key of the other direction of the flow an entry belongs to: the
/// packets it rewrites come back with the rewritten tuple reversed.
#[inline(always)]
pub fn other_key(k: &Ct4Key, e: &Ct4Entry) -> Ct4Key {
    Ct4Key {
        src_addr: e.nat_dst_addr,
        dst_addr: e.nat_src_addr,
        src_port: e.nat_dst_port,
        dst_port: e.nat_src_port,
        proto: k.proto,
        dir: if k.dir == CT_ORIGINAL {
            CT_REPLY
        } else {
            CT_ORIGINAL
        },
        _pad: 0,
    }
}

#[inline(always)]
pub fn initial_lifetime(proto: u8) -> u32 {
    if proto == PROTO_TCP {
        CT_LIFETIME_TCP_SYN
    } else {
        CT_LIFETIME_UDP
    }
}

/// Whether entry `e` has outlived its lifetime at `now`.
#[inline(always)]
pub fn expired(e: &Ct4Entry, now: u32) -> bool {
    now.wrapping_sub(e.last_seen_s) > e.lifetime_s
}

/// Whether the SNAT port of reply entry `e` may be given to a new flow:
/// the entry has expired and, for a TCP flow that ended, the backend's
/// TIME_WAIT for the old connection (`CT_TIME_WAIT_S` after its last
/// packet) is over; a SYN reusing the tuple earlier could meet it and
/// stall (timestamps older than the old connection's are refused).
#[inline(always)]
pub fn snat_port_free(e: &Ct4Entry, now: u32) -> bool {
    expired(e, now)
        && (e.flags & CT_CLOSING == 0 || now.wrapping_sub(e.last_seen_s) > CT_TIME_WAIT_S)
}

/// The entry for `k`, live or not.
#[inline(always)]
pub fn get(k: &Ct4Key) -> Option<&'static Ct4Entry> {
    // SAFETY: LRU map value, read only.
    CONNTRACK4.get_ptr(k).map(|e| unsafe { &*e })
}

/// A live entry for `k`, or None (absent or expired).
#[inline(always)]
pub fn lookup(k: &Ct4Key, now: u32) -> Option<&'static mut Ct4Entry> {
    let e = CONNTRACK4.get_ptr_mut(k)?;
    // SAFETY: LRU map value; concurrent updates of counters may race, which
    // costs at most a lost increment.
    let e = unsafe { &mut *e };
    if expired(e, now) {
        return None;
    }
    Some(e)
}

/// Records a packet on entry `e` (found under `k`), moving its lifetime with
/// what the packet shows: the first reply makes a flow established; for
/// TCP, a FIN marks its direction done (a half-close stays established),
/// and a RST or a FIN in both directions makes the flow closing. Both
/// entries of the flow learn it, so they age together.
#[inline(always)]
pub fn touch(k: &Ct4Key, e: &mut Ct4Entry, pkt: &Packet, len: u32, now: u32) {
    e.last_seen_s = now;
    e.packets += 1;
    e.bytes += len as u64;
    let mut flags = e.flags;
    // Under DSR no reply passes here: the client's ACK of the handshake
    // shows the backend answered.
    if k.dir == CT_REPLY || (flags & CT_DSR != 0 && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK)
    {
        flags |= CT_SEEN_REPLY;
    }
    if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_FIN != 0 {
            flags |= if k.dir == CT_ORIGINAL {
                CT_FIN_ORIGINAL
            } else {
                CT_FIN_REPLY
            };
        }
        if pkt.tcp_flags & TCP_RST != 0
            || flags & (CT_FIN_ORIGINAL | CT_FIN_REPLY) == CT_FIN_ORIGINAL | CT_FIN_REPLY
        {
            flags |= CT_CLOSING;
        }
    }
    // Nothing new (most packets): no other write.
    if flags == e.flags {
        return;
    }
    let lifetime = if flags & CT_CLOSING != 0 {
        CT_LIFETIME_TCP_CLOSING
    } else if pkt.proto != PROTO_TCP {
        CT_LIFETIME_UDP
    } else if flags & CT_SEEN_REPLY != 0 {
        CT_LIFETIME_TCP_ESTABLISHED
    } else {
        CT_LIFETIME_TCP_SYN
    };
    e.flags = flags;
    e.lifetime_s = lifetime;
    if !paired(e) {
        return;
    }
    // The other direction learns the same, so both age together.
    if let Some(o) = CONNTRACK4.get_ptr_mut(&other_key(k, e)) {
        // SAFETY: as in `lookup`.
        let o = unsafe { &mut *o };
        o.flags |= flags;
        o.lifetime_s = lifetime;
        o.last_seen_s = now;
    }
}

/// Creates the reply entry; fails if one exists (an SNAT port in use).
#[inline(always)]
pub fn create_reply(k: &Ct4Key, e: &Ct4Entry, exclusive: bool) -> Result<(), ()> {
    let flags = if exclusive { BPF_NOEXIST } else { BPF_ANY };
    CONNTRACK4.insert(k, e, flags as u64).map_err(|_| ())
}

#[inline(always)]
pub fn create_original(k: &Ct4Key, e: &Ct4Entry) -> Result<(), ()> {
    CONNTRACK4.insert(k, e, BPF_ANY as u64).map_err(|_| ())
}

/// Removes both directions of the flow `e` (found under `k`).
#[inline(always)]
pub fn forget(k: &Ct4Key, e: &Ct4Entry) {
    if paired(e) {
        let _ = CONNTRACK4.remove(&other_key(k, e));
    }
    let _ = CONNTRACK4.remove(k);
}

//! cgroup skb egress: `loadBalancerSourceRanges` for pods and host
//! processes. The socket hooks translate at `connect()`, before the kernel
//! has chosen the socket's source address, so they cannot check it; this
//! program sees the socket's first packet with its source and drops it when
//! the source is outside the ranges, as kube-proxy drops it.
//!
//! Attached by the agent only while some Service has source ranges: other
//! clusters pay nothing per packet. When attached, a TCP packet that is not
//! a SYN returns after reading two header bytes; a SYN or a UDP datagram
//! costs one lookup of its socket's translation, and only a translation to
//! a guarded frontend costs the range lookup.

use aya_ebpf::{helpers::bpf_get_socket_cookie, maps::lpm_trie::Key, programs::SkBuffContext};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    counters::V_DROP_SOURCE_RANGE,
    service::{SOURCE_RANGE_ID_BITS, SourceRange4},
    sock::{REV_SOURCE_RANGES, SockRevNat4Key},
};

use crate::{
    maps::{SOCK_REVNAT4, SOURCE_RANGES4},
    stats,
};

/// Return values of cgroup skb egress programs. Dropping with the
/// congestion bit set (2) makes the kernel report NET_XMIT_DROP instead of
/// EPERM: a UDP `send()` then succeeds and the datagram is lost, a SYN is
/// retransmitted until `connect()` times out, as when kube-proxy's rules
/// drop the packet (0 would fail the call with EPERM at once).
const PASS: i32 = 1;
const DROP: i32 = 2;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The packet's verdict; the skb starts at its IPv4 header.
#[inline(always)]
pub fn check(ctx: &SkBuffContext) -> i32 {
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return PASS;
    };
    if vihl >> 4 != 4 {
        return PASS;
    }
    let l4 = usize::from(vihl & 0x0f) * 4;
    let Ok(proto) = ctx.load::<u8>(9) else {
        return PASS;
    };
    match proto {
        PROTO_TCP => match ctx.load::<u8>(l4 + 13) {
            // Only a connection's first packet: without it there is none.
            Ok(flags) if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => {}
            _ => return PASS,
        },
        PROTO_UDP => {
            // A later fragment has no ports; its datagram's first fragment
            // was checked (and, dropped, leaves nothing to reassemble).
            match ctx.load::<u16>(6) {
                Ok(frag) if u16::from_be(frag) & 0x1fff == 0 => {}
                _ => return PASS,
            }
        }
        _ => return PASS,
    }
    let (Ok(src), Ok(dst), Ok(dst_port)) = (
        ctx.load::<u32>(12),
        ctx.load::<u32>(16),
        ctx.load::<u16>(l4 + 2),
    ) else {
        return PASS;
    };
    let key = SockRevNat4Key {
        // SAFETY: the program's own skb.
        cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        backend_addr: dst,
        backend_port: dst_port,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { SOCK_REVNAT4.get(&key).copied() }) else {
        return PASS;
    };
    if rev.flags & REV_SOURCE_RANGES == 0 {
        return PASS;
    }
    let range = Key::new(
        SOURCE_RANGE_ID_BITS + 32,
        SourceRange4 {
            service_id: rev.service_id,
            addr: src,
        },
    );
    if SOURCE_RANGES4.get(&range).is_some() {
        return PASS;
    }
    stats::verdict(V_DROP_SOURCE_RANGE);
    DROP
}

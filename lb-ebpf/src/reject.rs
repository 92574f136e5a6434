//! Refusing a new flow from outside the node, as kube-proxy's REJECT does
//! for a Service with no endpoint: the packet is turned into the answer in
//! place and sent back out of the device it came in on. A TCP segment gets
//! a RST (RFC 9293 3.10.7.1: the sequence number from its ACK, or an ACK of
//! everything it carried), a UDP datagram an ICMP port unreachable that
//! quotes its IP and UDP headers (RFC 792). The client's connect() or next
//! recv() fails with ECONNREFUSED at once instead of waiting for a timeout.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use lb_common::{
    PROTO_TCP,
    counters::{V_DROP_NO_BACKEND, V_DROP_TOO_BIG, V_FRAG_NEEDED_SENT},
};

use crate::{
    csum::{checksum, sum},
    maps::scratch,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

const ETH_LEN: usize = 14;
const IPPROTO_ICMP: u8 = 1;

/// A RST: Ethernet, IPv4 without options, TCP without options.
#[repr(C)]
struct RstFrame {
    eth: [u8; ETH_LEN],
    ip: [u8; 20],
    tcp: [u8; 20],
}

/// An ICMP port unreachable quoting a 20-byte IPv4 header and 8 bytes.
#[repr(C)]
struct UnreachFrame {
    eth: [u8; ETH_LEN],
    ip: [u8; 20],
    icmp: [u8; 8],
    quote: [u8; 28],
}

/// Refuses the flow of `pkt`: counts `verdict` and returns the redirect
/// when the answer is on its way, counts `drop_no_backend` and drops when
/// none can be sent (a RST is never answered, IP options on a datagram).
/// Out of line: its frames get their own stack frame.
#[inline(never)]
pub fn refuse(ctx: &TcContext, pkt: &Packet, verdict: u32) -> i32 {
    // A later fragment has no header to answer: the first fragment was
    // answered (or will be).
    let built = if !pkt.has_l4() {
        Err(())
    } else if pkt.proto == PROTO_TCP {
        tcp_rst(ctx, pkt)
    } else {
        icmp_port_unreachable(ctx, pkt)
    };
    if built.is_err() {
        stats::verdict(V_DROP_NO_BACKEND);
        return TC_ACT_SHOT;
    }
    stats::verdict(verdict);
    // SAFETY: valid skb pointer; helper with plain integers. Flag 0: out
    // of the device's egress, towards the client.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// Loads `buf.len()` bytes at `off` straight into `buf` (scratch memory:
/// nothing on the BPF stack, whose budget the caller's frame spends).
#[inline(always)]
fn load_into(ctx: &TcContext, off: usize, buf: &mut [u8]) -> Result<(), ()> {
    // SAFETY: valid skb pointer; the helper writes at most `buf.len()`
    // bytes into `buf`.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

/// The Ethernet header back to the sender, into `eth`.
#[inline(always)]
fn eth_back(ctx: &TcContext, eth: &mut [u8; ETH_LEN]) -> Result<(), ()> {
    load_into(ctx, 6, &mut eth[..6])?;
    load_into(ctx, 0, &mut eth[6..12])?;
    eth[12] = 0x08;
    eth[13] = 0x00;
    Ok(())
}

/// An IPv4 header from the packet's destination back to its source, into
/// `ip`.
#[inline(always)]
fn ip_back(ip: &mut [u8; 20], pkt: &Packet, proto: u8, total_len: u16) {
    *ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&pkt.dst_addr.to_ne_bytes());
    ip[16..20].copy_from_slice(&pkt.src_addr.to_ne_bytes());
    let c = checksum(0, ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[inline(always)]
fn tcp_rst(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    if pkt.tcp_flags & TCP_RST != 0 {
        return Err(());
    }
    let l3 = pkt.l3_off as usize;
    let l4 = pkt.l4_off as usize;
    let f = scratch::<RstFrame>().ok_or(())?;
    // The segment's header, as it came: its ports, sequence and
    // acknowledgment numbers and data offset are read in place.
    load_into(ctx, l4, &mut f.tcp)?;
    let total: [u8; 2] = ctx.load(l3 + 2).map_err(|_| ())?;
    let headers = (l4 - l3) as u32 + ((f.tcp[12] >> 4) as u32) * 4;
    let mut seg_len = (u16::from_be_bytes(total) as u32).saturating_sub(headers);
    if pkt.tcp_flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        seg_len += 1;
    }
    let seq = u32::from_be_bytes([f.tcp[4], f.tcp[5], f.tcp[6], f.tcp[7]]);
    let ack = u32::from_be_bytes([f.tcp[8], f.tcp[9], f.tcp[10], f.tcp[11]]);
    let (rst_seq, rst_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };
    eth_back(ctx, &mut f.eth)?;
    ip_back(&mut f.ip, pkt, PROTO_TCP, 40);
    f.tcp = [0u8; 20];
    f.tcp[0..2].copy_from_slice(&pkt.dst_port.to_ne_bytes());
    f.tcp[2..4].copy_from_slice(&pkt.src_port.to_ne_bytes());
    f.tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    f.tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    f.tcp[12] = 5 << 4;
    f.tcp[13] = flags;
    // Pseudo-header: addresses, protocol, TCP length.
    let pseudo = sum(0, &f.ip[12..20]) + PROTO_TCP as u32 + 20;
    let c = checksum(pseudo, &f.tcp);
    f.tcp[16..18].copy_from_slice(&c.to_be_bytes());
    write(ctx, f, core::mem::size_of::<RstFrame>() as u32)
}

#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    icmp_error(ctx, pkt, 3, [0; 4])
}

/// Answers a packet too big for its route, with DF set, with an ICMP
/// fragmentation needed carrying the route's MTU, quoting the packet as
/// its sender sent it; without DF (the kernel would fragment it, tc
/// cannot) it is dropped. Either way counted.
#[inline(never)]
pub fn frag_needed(ctx: &TcContext, pkt: &Packet, mtu: u16) -> i32 {
    let df = ctx
        .load::<[u8; 2]>(pkt.l3_off as usize + 6)
        .is_ok_and(|f| f[0] & 0x40 != 0);
    let [hi, lo] = mtu.to_be_bytes();
    if !df || icmp_error(ctx, pkt, 4, [0, 0, hi, lo]).is_err() {
        stats::verdict(V_DROP_TOO_BIG);
        return TC_ACT_SHOT;
    }
    stats::verdict(V_FRAG_NEEDED_SENT);
    // SAFETY: valid skb pointer; helper with plain integers.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// A destination unreachable of `code` (`rest`: the header's last four
/// bytes) back to the sender of `pkt`, quoting its IP header and the 8
/// bytes after it (a fixed 28: only without IP options).
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &Packet, code: u8, rest: [u8; 4]) -> Result<(), ()> {
    if pkt.l4_off - pkt.l3_off != 20 {
        return Err(());
    }
    let f = scratch::<UnreachFrame>().ok_or(())?;
    load_into(ctx, pkt.l3_off as usize, &mut f.quote)?;
    eth_back(ctx, &mut f.eth)?;
    ip_back(&mut f.ip, pkt, IPPROTO_ICMP, 20 + 8 + 28);
    f.icmp = [3, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    let c = checksum(sum(0, &f.icmp), &f.quote);
    f.icmp[2..4].copy_from_slice(&c.to_be_bytes());
    write(ctx, f, core::mem::size_of::<UnreachFrame>() as u32)
}

/// Makes the packet exactly `frame`.
#[inline(always)]
fn write<T>(ctx: &TcContext, frame: &T, len: u32) -> Result<(), ()> {
    // SAFETY: valid skb pointer; the kernel trims or zero-extends.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), len, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, frame, 0).map_err(|_| ())
}

//! Address and port rewrites with incremental checksum updates.
//!
//! In tc the kernel helpers keep checksum offload right: for a packet whose
//! L4 checksum is still to be completed by the device (CHECKSUM_PARTIAL, as
//! veth and local senders produce), they update only the pseudo-header part.
//! XDP sees a driver's buffer before any skb exists, whose checksums are
//! whole (a NIC sends them so): rewritten in place with RFC 1624 updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::{csum, frame::Frame, parse::Packet};

const IP_CSUM_OFF: u32 = 10;
const IP_SRC_OFF: u32 = 12;
const IP_DST_OFF: u32 = 16;

#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    // A UDP checksum of 0 means "none" and must stay 0; a computed 0 is
    // written as 0xffff.
    if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn addr(ctx: &TcContext, pkt: &Packet, off: u32, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.store((pkt.l3_off + off) as usize, &new, 0)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(
        (pkt.l3_off + IP_CSUM_OFF) as usize,
        old as u64,
        new as u64,
        4,
    )
    .map_err(|_| ())?;
    // A later fragment has no L4 header: the first fragment's checksum,
    // which covers the whole datagram, was fixed with it.
    if !pkt.has_l4() {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off() as usize,
        old as u64,
        new as u64,
        BPF_F_PSEUDO_HDR as u64 | l4_flags(pkt) | 4,
    )
    .map_err(|_| ())
}

#[inline(always)]
fn port(ctx: &TcContext, pkt: &Packet, off: u32, old: u16, new: u16) -> Result<(), ()> {
    if old == new || !pkt.has_l4() {
        return Ok(());
    }
    ctx.store((pkt.l4_off + off) as usize, &new, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        pkt.l4_csum_off() as usize,
        old as u64,
        new as u64,
        l4_flags(pkt) | 2,
    )
    .map_err(|_| ())
}

/// Rewrites the packet's addresses and ports to the given ones (a later
/// fragment's addresses only: its ports are in the first fragment).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
) -> Result<(), ()> {
    addr(ctx, pkt, IP_SRC_OFF, pkt.src_addr, src_addr)?;
    addr(ctx, pkt, IP_DST_OFF, pkt.dst_addr, dst_addr)?;
    port(ctx, pkt, 0, pkt.src_port, src_port)?;
    port(ctx, pkt, 2, pkt.dst_port, dst_port)
}

/// The one's-complement change of a 16-bit word from `old` to `new`
/// (RFC 1624: ~m + m'), to add to a checksum's complement.
#[inline(always)]
fn delta16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The same for a 32-bit field, as its two 16-bit words in memory order
/// (one's-complement sums do not depend on byte order, as long as the
/// checksum is read and written the same way).
#[inline(always)]
fn delta32(old: u32, new: u32) -> u32 {
    delta16(old as u16, new as u16) + delta16((old >> 16) as u16, (new >> 16) as u16)
}

/// The checksum `check` (as stored) after the changes summed in `delta`.
#[inline(always)]
fn adjusted(check: u16, delta: u32) -> u16 {
    !csum::fold((!check) as u32 + delta)
}

/// The IPv4 header as 16-bit words: 5 the checksum, 6-7 the source, 8-9
/// the destination. Words, not the 32-bit fields: an address at offset 26
/// of a frame is 2-byte aligned only.
const IP_WORDS: usize = 10;
const W_CHECK: usize = 5;
const W_SRC: usize = 6;
const W_DST: usize = 8;

/// `rewrite` on packet memory directly, for XDP: the IPv4 checksum and the
/// TCP or UDP checksum (pseudo-header and ports) updated incrementally; a
/// UDP checksum of 0 ("none") stays 0, a computed 0 is written 0xffff.
#[inline(always)]
pub fn rewrite_in_place<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
) -> Result<(), ()> {
    let ip = ctx
        .ptr_at::<[u16; IP_WORDS]>(pkt.l3_off as usize)
        .ok_or(())?;
    let addrs = delta32(pkt.src_addr, src_addr) + delta32(pkt.dst_addr, dst_addr);
    // SAFETY: bounds checked by ptr_at; 2-byte aligned (Ethernet header
    // of 14 bytes at an aligned start).
    let ip = unsafe { &mut *ip };
    ip[W_SRC] = src_addr as u16;
    ip[W_SRC + 1] = (src_addr >> 16) as u16;
    ip[W_DST] = dst_addr as u16;
    ip[W_DST + 1] = (dst_addr >> 16) as u16;
    ip[W_CHECK] = adjusted(ip[W_CHECK], addrs);
    // A later fragment has no L4 header: the first fragment's checksum,
    // which covers the whole datagram, was fixed with it.
    if !pkt.has_l4() {
        return Ok(());
    }
    let l4 = addrs + delta16(pkt.src_port, src_port) + delta16(pkt.dst_port, dst_port);
    if pkt.proto == PROTO_TCP {
        let h = ctx.ptr_at::<[u16; 10]>(pkt.l4_off as usize).ok_or(())?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        h[0] = src_port;
        h[1] = dst_port;
        h[8] = adjusted(h[8], l4);
    } else {
        let h = ctx.ptr_at::<[u16; 4]>(pkt.l4_off as usize).ok_or(())?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        h[0] = src_port;
        h[1] = dst_port;
        if h[3] != 0 {
            let c = adjusted(h[3], l4);
            h[3] = if c == 0 { 0xffff } else { c };
        }
    }
    Ok(())
}

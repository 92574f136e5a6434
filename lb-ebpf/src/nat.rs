//! Address and port rewrites with incremental checksum updates.
//!
//! The kernel helpers keep checksum offload right: for a packet whose L4
//! checksum is still to be completed by the device (CHECKSUM_PARTIAL, as veth
//! and local senders produce), they update only the pseudo-header part.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::parse::Packet;

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

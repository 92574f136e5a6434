//! Sending a rewritten packet on its way when the stack must not route it:
//! its source is now a node address (SNAT), which the stack's input path
//! would drop as martian, so the packet goes straight to the egress device
//! that the FIB names. The lookup serves the XDP program as well.
//!
//! The FIB's answers are kept per CPU for the rest of the second they were
//! given in (`NEXT_HOPS`): a flow's packets, one after the other, pay a
//! FIB lookup (about 170 ns here, nearly half an SNATed reply's cost) once
//! a second instead of each time. A route or neighbour change reaches the
//! flows within a second.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_SHOT, bpf_fib_lookup as FibParams},
    helpers::{
        bpf_redirect_neigh,
        generated::{bpf_fib_lookup, bpf_redirect},
    },
    programs::TcContext,
};
use lb_common::counters::V_DROP_NO_ROUTE;

use crate::{maps::NEXT_HOPS, stats};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Where a packet from `src_addr` to `dst_addr` goes next.
pub enum Next {
    /// Out of `ifindex`, to `dmac` from `smac`.
    Send {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Out of `ifindex`; the kernel resolves the neighbour.
    Neighbour {
        ifindex: u32,
    },
    /// Too big for the route's MTU.
    FragNeeded {
        mtu: u16,
    },
    NoRoute,
}

/// The FIB's answer for this packet. `tot_len`: the IP length of the
/// packet (of each segment, for a GSO packet), checked against the route's
/// MTU (a route `mtu` attribute counts, as in the kernel's forwarding);
/// 0: the packet is checked against the device's MTU.
#[inline(always)]
pub fn lookup(
    ctx: &TcContext,
    proto: u8,
    src_addr: u32,
    dst_addr: u32,
    tot_len: u16,
    now: u32,
) -> Next {
    // SAFETY: valid skb pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    lookup_from(ctx, ifindex, proto, src_addr, dst_addr, tot_len, now)
}

/// Slots of the next-hop cache, per CPU (a power of two).
pub const NEXT_HOP_SLOTS: u32 = 1024;

/// A FIB answer `Next::Send` for (source, destination, protocol, ingress
/// device), good in the second `second` for packets up to `ok_len` bytes
/// (the lookup does not say the route's MTU, only that a length fits).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHop {
    dst_addr: u32,
    src_addr: u32,
    in_ifindex: u32,
    out_ifindex: u32,
    second: u32,
    ok_len: u16,
    proto: u8,
    /// 0: an empty slot.
    valid: u8,
    smac: [u8; 6],
    dmac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 36);

/// The cache slot of destination `dst_addr` (Fibonacci hashing: the top
/// bits of the product).
#[inline(always)]
fn slot(dst_addr: u32) -> u32 {
    dst_addr.wrapping_mul(0x9e37_79b1) >> (32 - NEXT_HOP_SLOTS.trailing_zeros())
}

/// The same for a packet that came in on `ifindex`, from any program type
/// the FIB helper takes (tc or XDP), at coarse second `second`. A
/// `tot_len` of 0 (tc's check against the device, which looks at the
/// skb) always asks the FIB.
#[inline(always)]
pub fn lookup_from<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    proto: u8,
    src_addr: u32,
    dst_addr: u32,
    tot_len: u16,
    second: u32,
) -> Next {
    let cached = NEXT_HOPS.get_ptr_mut(slot(dst_addr));
    if let Some(c) = cached {
        // SAFETY: this CPU's slot; a program runs to completion on it.
        let c = unsafe { &*c };
        if c.valid != 0
            && c.second == second
            && c.dst_addr == dst_addr
            && c.src_addr == src_addr
            && c.in_ifindex == ifindex
            && c.proto == proto
            && tot_len != 0
            && tot_len <= c.ok_len
        {
            return Next::Send {
                ifindex: c.out_ifindex,
                smac: c.smac,
                dmac: c.dmac,
            };
        }
    }
    // SAFETY: plain-old-data, all-zero is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = src_addr;
    p.__bindgen_anon_4.ipv4_dst = dst_addr;
    // SAFETY: params on the stack, size matches.
    let r = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match r {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if let Some(c) = cached
                && tot_len != 0
            {
                // SAFETY: as above.
                unsafe {
                    *c = NextHop {
                        dst_addr,
                        src_addr,
                        in_ifindex: ifindex,
                        out_ifindex: p.ifindex,
                        second,
                        ok_len: tot_len,
                        proto,
                        valid: 1,
                        smac: p.smac,
                        dmac: p.dmac,
                    }
                };
            }
            Next::Send {
                ifindex: p.ifindex,
                smac: p.smac,
                dmac: p.dmac,
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Next::Neighbour { ifindex: p.ifindex },
        // SAFETY: the kernel wrote the MTU in the union.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Next::FragNeeded {
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        _ => Next::NoRoute,
    }
}

/// Sends the (already rewritten) packet where `next` says.
#[inline(always)]
pub fn send(ctx: &TcContext, next: Next) -> i32 {
    match next {
        Next::Send {
            ifindex,
            smac,
            dmac,
        } => {
            if ctx.store(0, &dmac, 0).is_err() || ctx.store(6, &smac, 0).is_err() {
                stats::verdict(V_DROP_NO_ROUTE);
                return TC_ACT_SHOT;
            }
            // SAFETY: helper with plain integers.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        // SAFETY: no neighbour params: the kernel resolves the next hop.
        Next::Neighbour { ifindex } => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Next::FragNeeded { .. } | Next::NoRoute => {
            stats::verdict(V_DROP_NO_ROUTE);
            TC_ACT_SHOT
        }
    }
}

/// Redirects the (already rewritten) packet towards `dst_addr`.
#[inline(always)]
pub fn redirect(ctx: &TcContext, proto: u8, src_addr: u32, dst_addr: u32) -> i32 {
    // Length 0: the FIB checks the skb against the device, and the cache
    // (so its clock) is not used.
    send(ctx, lookup(ctx, proto, src_addr, dst_addr, 0, 0))
}

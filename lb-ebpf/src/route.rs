//! Sending a rewritten packet on its way when the stack must not route it:
//! its source is now a node address (SNAT), which the stack's input path
//! would drop as martian, so the packet goes straight to the egress device
//! that the FIB names.

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

use crate::stats;

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Redirects the (already rewritten) packet towards `dst_addr`.
#[inline(always)]
pub fn redirect(ctx: &TcContext, proto: u8, src_addr: u32, dst_addr: u32) -> i32 {
    // SAFETY: plain-old-data, all-zero is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    // SAFETY: valid skb pointer.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
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
    if r == BPF_FIB_LKUP_RET_SUCCESS {
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
            stats::verdict(V_DROP_NO_ROUTE);
            return TC_ACT_SHOT;
        }
        // SAFETY: helper with plain integers.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if r == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: no neighbour params: the kernel resolves the next hop.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    stats::verdict(V_DROP_NO_ROUTE);
    TC_ACT_SHOT
}

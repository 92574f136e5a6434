//! The device path in XDP, on the node's devices before the stack: new
//! flows, established flows and SNATed flows' replies are translated here,
//! where no skb has been built yet. To a local backend the packet goes up
//! the stack already translated; to a backend on another node it leaves by
//! the device it came in on (`XDP_TX`), its MAC addresses from the FIB.
//!
//! What XDP cannot do goes on untouched to the tc program on the same
//! device, which does it as when XDP is off (`xdp_to_tc`): answers (RSTs,
//! ICMP port unreachable, fragmentation needed), ICMP errors, a next hop
//! out of another device or without a neighbour entry. A packet XDP has
//! dealt with carries a mark in its metadata, so tc lets it pass at once.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    conntrack::Ct4Entry,
    counters::{V_DROP_NO_ROUTE, V_DROP_REWRITE, V_XDP_TO_TC},
    dsr::DSR_OVERHEAD,
};

use crate::{
    device::{Device, Way, encapsulates, rewrite_of},
    dsr,
    frame::Frame,
    nat,
    parse::Packet,
    route, stats,
};

/// The metadata word of a packet XDP has dealt with ("LBXD").
const SEEN: u32 = 0x4c42_5844;

/// Marks a packet XDP passes to the stack as dealt with. Without room for
/// metadata (a driver that has none) tc does the work again, which finds
/// nothing more to do.
#[inline(always)]
fn mark_seen(ctx: &XdpContext) {
    // SAFETY: valid context; the packet pointers are re-read after.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx.cast(), -4) } != 0 {
        return;
    }
    let meta = ctx.metadata();
    if meta + 4 > ctx.data() {
        return;
    }
    // SAFETY: bounds checked against data.
    unsafe { *(meta as *mut u32) = SEEN };
}

/// Whether XDP has dealt with this packet already (tc ingress).
#[inline(always)]
pub fn seen(ctx: &TcContext) -> bool {
    // SAFETY: valid skb pointer.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta, (*ctx.skb.skb).data) };
    let (meta, data) = (meta as usize, data as usize);
    if meta + 4 > data {
        return false;
    }
    // SAFETY: bounds checked against data.
    unsafe { *(meta as *const u32) == SEEN }
}

impl Device for XdpContext {
    const ANSWERS: bool = false;
    const PLANS_SYN: bool = true;

    #[inline(always)]
    fn pass(&self) -> i32 {
        mark_seen(self);
        XDP_PASS as i32
    }

    #[inline(always)]
    fn drop(&self) -> i32 {
        XDP_DROP as i32
    }

    #[inline(always)]
    fn to_tc(&self) -> i32 {
        stats::verdict(V_XDP_TO_TC);
        XDP_PASS as i32
    }

    #[inline(always)]
    fn refuse(&self, _pkt: &Packet, _verdict: u32) -> i32 {
        self.to_tc()
    }

    #[inline(always)]
    fn icmp(&self, _pkt: &Packet) -> i32 {
        self.to_tc()
    }

    /// A buffer is one packet (no GSO before the stack): its own length.
    #[inline(always)]
    fn ip_len(&self, pkt: &Packet, grow: u16) -> u16 {
        match self.ptr_at::<[u8; 2]>(pkt.l3_off as usize + 2) {
            // SAFETY: bounds checked by ptr_at.
            Some(p) => u16::from_be_bytes(unsafe { *p }).saturating_add(grow),
            None => 0,
        }
    }

    #[inline(always)]
    fn route(
        &self,
        proto: u8,
        src_addr: u32,
        dst_addr: u32,
        tot_len: u16,
        now: u32,
    ) -> route::Next {
        route::lookup_from(
            self,
            self.ingress_ifindex() as u32,
            proto,
            src_addr,
            dst_addr,
            tot_len,
            now,
        )
    }

    /// Back out of the device the packet came in on, with a resolved
    /// neighbour. Another device's driver may take no XDP frames; tc
    /// redirects there.
    #[inline(always)]
    fn sends(&self, next: &route::Next) -> bool {
        matches!(next, route::Next::Send { ifindex, .. } if *ifindex as usize == self.ingress_ifindex())
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, e: &Ct4Entry, way: Way, verdict: u32) -> i32 {
        let (src, dst, sport, dport) = rewrite_of(pkt, e);
        if nat::rewrite_in_place(self, pkt, src, dst, sport, dport).is_err() {
            stats::verdict(V_DROP_REWRITE);
            return XDP_DROP as i32;
        }
        pkt.remember_fragment();
        match way {
            Way::Stack => {
                stats::verdict(verdict);
                self.pass()
            }
            Way::Next(route::Next::Send { smac, dmac, .. }) => {
                if encapsulates(e) && dsr::encap_xdp(self, pkt, e).is_err() {
                    stats::verdict(V_DROP_REWRITE);
                    return XDP_DROP as i32;
                }
                let Some(eth) = self.ptr_at::<[u8; 12]>(0) else {
                    stats::verdict(V_DROP_REWRITE);
                    return XDP_DROP as i32;
                };
                // SAFETY: bounds checked by ptr_at.
                let eth = unsafe { &mut *eth };
                eth[..6].copy_from_slice(&dmac);
                eth[6..].copy_from_slice(&smac);
                stats::verdict(verdict);
                XDP_TX as i32
            }
            // `sends` let no other way through.
            Way::Next(_) => {
                stats::verdict(V_DROP_NO_ROUTE);
                XDP_DROP as i32
            }
        }
    }

    /// The Ethernet header moves forward over the outer IP header, and the
    /// buffer starts there.
    #[inline(always)]
    fn decap(&self) -> bool {
        let Some(eth) = self.ptr_at::<[u8; 14]>(0) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let eth = unsafe { *eth };
        // SAFETY: valid context; the pointer is taken anew after.
        if unsafe { bpf_xdp_adjust_head(self.ctx.cast(), DSR_OVERHEAD as i32) } != 0 {
            return false;
        }
        let Some(p) = self.ptr_at::<[u8; 14]>(0) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p = eth };
        true
    }
}

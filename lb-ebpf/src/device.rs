//! What the device path's flow logic (`netdev`) asks of the program it runs
//! in: tc on the node's devices does everything; XDP, before the stack,
//! does the common work (translate, forward, drop) and leaves the rest to
//! the tc program behind it, untouched.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use lb_common::{
    PROTO_TCP,
    conntrack::{CT_SNAT, Ct4Entry},
    counters::{V_DROP_REWRITE, V_PASS_NOT_SERVICE},
    dsr::DSR_OVERHEAD,
};

use crate::{conntrack, dsr, frame::Frame, icmp, nat, parse::Packet, reject, route, stats};

/// Where a rewritten packet goes.
pub enum Way {
    /// To the stack: a local backend (or the client, for a local backend's
    /// reply) that the stack routes to.
    Stack,
    /// Past the stack, where the FIB says (SNATed flows).
    Next(route::Next),
}

pub trait Device: Frame + EbpfContext {
    /// Whether the program builds answers itself (RSTs, ICMP port
    /// unreachable and fragmentation needed) and translates ICMP errors.
    /// When it does not, such packets go to `to_tc` before anything of
    /// them is counted or changed.
    const ANSWERS: bool;
    /// Whether a SYN's backend is chosen before the flow table is read,
    /// so a new flow's two sets are read together (`from_outside`). XDP
    /// only: in tc, whose frame holds more (answers, the route asked
    /// after the flow is made), the plan kept across the probe takes the
    /// frame with its deepest callee past the verifier's 512 bytes.
    const PLANS_SYN: bool;
    /// A packet the device path does not translate, to the stack.
    fn pass(&self) -> i32;
    fn drop(&self) -> i32;
    /// A packet left, untouched, to the tc program (only when !ANSWERS).
    fn to_tc(&self) -> i32;
    fn refuse(&self, pkt: &Packet, verdict: u32) -> i32;
    /// An ICMP error to one of the node's frontend or SNAT addresses.
    fn icmp(&self, pkt: &Packet) -> i32;
    /// The IP length of the packet as it will be sent, `grow` bytes of
    /// outer header added.
    fn ip_len(&self, pkt: &Packet, grow: u16) -> u16;
    /// Where the FIB sends the packet; `now`: the coarse second (the
    /// next-hop cache's clock).
    fn route(&self, proto: u8, src_addr: u32, dst_addr: u32, tot_len: u16, now: u32)
    -> route::Next;
    /// Whether this program can send a packet where `next` says.
    fn sends(&self, next: &route::Next) -> bool;
    /// Rewrites per the entry (and encapsulates, under `CT_DSR`) and hands
    /// the packet on `way`; counts `verdict`.
    fn forward(&self, pkt: &Packet, e: &Ct4Entry, way: Way, verdict: u32) -> i32;
    /// Takes a DSR packet's outer header off (`DSR_OVERHEAD` bytes after
    /// the Ethernet header).
    fn decap(&self) -> bool;
}

/// Whether packets of flow `e` leave in IPIP: the client's direction of a
/// DSR flow on the node it came to (the backend's node holds a DSR reply
/// entry, `CT_LOCAL_BACKEND` too, whose replies leave as they are).
#[inline(always)]
pub fn encapsulates(e: &Ct4Entry) -> bool {
    !conntrack::paired(e)
}

/// The rewrite of a packet of flow `e`: (source address, destination
/// address, source port, destination port). A DSR flow's inner packet
/// keeps the client's source (`nat_src_addr` is the outer one).
#[inline(always)]
pub fn rewrite_of(pkt: &Packet, e: &Ct4Entry) -> (u32, u32, u16, u16) {
    let src = if encapsulates(e) {
        pkt.src_addr
    } else {
        e.nat_src_addr
    };
    (src, e.nat_dst_addr, e.nat_src_port, e.nat_dst_port)
}

/// `way` for a packet of flow `e`.
#[inline(always)]
pub fn way_of<D: Device>(dev: &D, pkt: &Packet, e: &Ct4Entry, now: u32) -> Option<Way> {
    let dsr = encapsulates(e);
    way(
        dev,
        pkt,
        e.flags & CT_SNAT != 0 || dsr,
        e.nat_src_addr,
        e.nat_dst_addr,
        if dsr { DSR_OVERHEAD } else { 0 },
        now,
    )
}

/// Where a packet from `src_addr` to `dst_addr` goes after the rewrite, if
/// this program can send it there (else the packet is for tc). Looked up
/// before anything is rewritten or counted: a packet too big for the route
/// is answered quoting it as its sender sent it (path MTU discovery).
/// `redirect`: the packet must go past the stack (SNAT, DSR); `grow`: the
/// outer header it gets (DSR).
#[inline(always)]
pub fn way<D: Device>(
    dev: &D,
    pkt: &Packet,
    redirect: bool,
    src_addr: u32,
    dst_addr: u32,
    grow: u16,
    now: u32,
) -> Option<Way> {
    if !redirect {
        return Some(Way::Stack);
    }
    let next = dev.route(pkt.proto, src_addr, dst_addr, dev.ip_len(pkt, grow), now);
    if dev.sends(&next) {
        Some(Way::Next(next))
    } else {
        None
    }
}

impl Device for TcContext {
    const ANSWERS: bool = true;
    const PLANS_SYN: bool = false;

    #[inline(always)]
    fn pass(&self) -> i32 {
        TC_ACT_OK
    }

    #[inline(always)]
    fn drop(&self) -> i32 {
        TC_ACT_SHOT
    }

    #[inline(always)]
    fn to_tc(&self) -> i32 {
        // Never asked: tc answers everything itself.
        stats::verdict(V_PASS_NOT_SERVICE);
        TC_ACT_OK
    }

    #[inline(always)]
    fn refuse(&self, pkt: &Packet, verdict: u32) -> i32 {
        reject::refuse(self, pkt, verdict)
    }

    #[inline(always)]
    fn icmp(&self, pkt: &Packet) -> i32 {
        icmp::from_netdev(self, pkt)
    }

    /// Of each segment for a GSO packet (headers and the segment size),
    /// else its own. A GSO packet's segments shrink by what an outer
    /// header adds (`encap_tc`): their length stays.
    #[inline(always)]
    fn ip_len(&self, pkt: &Packet, grow: u16) -> u16 {
        // SAFETY: valid skb pointer.
        let gso_size = unsafe { (*self.skb.skb).gso_size };
        if gso_size == 0 {
            return self
                .load::<[u8; 2]>(pkt.l3_off as usize + 2)
                .map_or(0, |l| u16::from_be_bytes(l).saturating_add(grow));
        }
        let l4_header = if pkt.proto == PROTO_TCP {
            self.load::<u8>(pkt.l4_off as usize + 12)
                .map_or(20, |d| (d >> 4) as u32 * 4)
        } else {
            8
        };
        (pkt.l4_off - pkt.l3_off + l4_header + gso_size).min(u16::MAX as u32) as u16
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
        route::lookup(self, proto, src_addr, dst_addr, tot_len, now)
    }

    #[inline(always)]
    fn sends(&self, _next: &route::Next) -> bool {
        // Every answer, a fragmentation needed or a counted drop included.
        true
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, e: &Ct4Entry, way: Way, verdict: u32) -> i32 {
        let dsr = encapsulates(e);
        if let Way::Next(route::Next::FragNeeded { mtu }) = way {
            // The client's packets may be as big as the route less the
            // outer header.
            let mtu = if dsr {
                mtu.saturating_sub(DSR_OVERHEAD)
            } else {
                mtu
            };
            return reject::frag_needed(self, pkt, mtu);
        }
        let (src, dst, sport, dport) = rewrite_of(pkt, e);
        if nat::rewrite(self, pkt, src, dst, sport, dport).is_err() {
            stats::verdict(V_DROP_REWRITE);
            return TC_ACT_SHOT;
        }
        // The first fragment of a datagram: its flow for the later ones.
        pkt.remember_fragment();
        if dsr && dsr::encap_tc(self, pkt, e).is_err() {
            stats::verdict(V_DROP_REWRITE);
            return TC_ACT_SHOT;
        }
        stats::verdict(verdict);
        match way {
            Way::Next(next) => route::send(self, next),
            Way::Stack => TC_ACT_OK,
        }
    }

    #[inline(always)]
    fn decap(&self) -> bool {
        self.adjust_room(
            -(DSR_OVERHEAD as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64,
        )
        .is_ok()
    }
}

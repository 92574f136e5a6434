//! ICMP errors about translated flows, translated back: a destination
//! unreachable (port unreachable, fragmentation needed) or time exceeded
//! that a backend or a router on the way sends about a packet of a flow
//! reaches the client as if the frontend had sent it, with the quoted
//! packet the one the client sent. Without it the client's stack cannot
//! match the error to its socket (ECONNREFUSED for UDP, path MTU
//! discovery through a NodePort).
//!
//! The quoted packet is the translated one (backend side); the flow's
//! reply entry is found from it reversed, and says everything: the quoted
//! source becomes the client, the quoted destination the frontend, the
//! outer source the frontend and the outer destination the client. Every
//! checksum is fixed: the outer IPv4 header's and the quoted one's
//! (computed anew), the quoted UDP or TCP checksum when it is in the
//! quote (updated, RFC 1624), and the ICMP checksum over all of it.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_REPLY, CT_SNAT, Ct4Key},
    counters::{V_DROP_REWRITE, V_ICMP_TRANSLATED, V_PASS_NOT_SERVICE},
};

use crate::{
    conntrack::{self, now_s},
    csum::{checksum, update},
    maps::scratch,
    parse::Packet,
    route, stats,
};

pub const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Headers being rewritten, in the scratch area (off the BPF stack): the
/// quote as it came and as it goes (IPv4 header and the first 8 bytes
/// after it), and the outer IPv4 header.
#[repr(C)]
struct Work {
    quote: [u8; 28],
    new: [u8; 28],
    outer: [u8; 20],
    tcp_old: [u8; 2],
    tcp_new: [u8; 2],
}

/// An ICMP error on its way in (from a router or a backend on another
/// node, to the SNAT address): translated and sent towards the client.
#[inline(always)]
pub fn from_netdev(ctx: &TcContext, pkt: &Packet) -> i32 {
    translate(ctx, pkt, true)
}

/// An ICMP error a backend on this node sends back about a flow: the
/// client sees it come from the frontend.
#[inline(always)]
pub fn to_netdev(ctx: &TcContext, pkt: &Packet) -> i32 {
    translate(ctx, pkt, false)
}

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, ingress: bool) -> i32 {
    let l3 = pkt.l3_off as usize;
    let l4 = pkt.l4_off as usize;
    // Only errors quote a packet; only a 20-byte outer header is handled
    // (an outer header with options is left to the stack).
    let Ok(head) = ctx.load::<[u8; 4]>(l4) else {
        return pass(ingress);
    };
    if (head[0] != ICMP_DEST_UNREACH && head[0] != ICMP_TIME_EXCEEDED) || l4 - l3 != 20 {
        return pass(ingress);
    }
    let Some(w) = scratch::<Work>() else {
        return pass(ingress);
    };
    // Loads of a constant size (aya's load_bytes may ask for 0 bytes,
    // which the verifier refuses).
    let Ok(q) = ctx.load::<[u8; 28]>(l4 + 8) else {
        return pass(ingress);
    };
    w.quote = q;
    let quote = &w.quote;
    let proto = quote[9];
    if quote[0] != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return pass(ingress);
    }
    let word = |o: usize| u32::from_ne_bytes([quote[o], quote[o + 1], quote[o + 2], quote[o + 3]]);
    let port = |o: usize| u16::from_ne_bytes([quote[o], quote[o + 1]]);
    // The quoted packet went from the node or the client towards the
    // backend: its reverse is the flow's reply tuple.
    let k = Ct4Key {
        src_addr: word(16),
        dst_addr: word(12),
        src_port: port(22),
        dst_port: port(20),
        proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let Some(e) = conntrack::lookup(&k, now_s()) else {
        return pass(ingress);
    };
    let e = *e;
    // Egress: only errors of local backends (the SNATed ones come in).
    if !ingress && e.flags & CT_SNAT != 0 {
        return pass(ingress);
    }

    // The quote as the client sent it: client -> frontend.
    w.new = w.quote;
    let (quote, new) = (&w.quote, &mut w.new);
    new[12..16].copy_from_slice(&e.nat_dst_addr.to_ne_bytes());
    new[16..20].copy_from_slice(&e.nat_src_addr.to_ne_bytes());
    new[20..22].copy_from_slice(&e.nat_dst_port.to_ne_bytes());
    new[22..24].copy_from_slice(&e.nat_src_port.to_ne_bytes());
    new[10] = 0;
    new[11] = 0;
    let c = checksum(0, &new[..20]);
    new[10..12].copy_from_slice(&c.to_be_bytes());
    // The quoted L4 checksum covers the addresses (pseudo-header) and the
    // ports: UDP's is in the quote (0 stays "none"); TCP's only when the
    // error quotes more than 8 bytes.
    let mut l4_csum_off = 0usize;
    if proto == PROTO_UDP {
        let old = u16::from_be_bytes([quote[26], quote[27]]);
        if old != 0 {
            let mut u = update(old, &quote[12..24], &new[12..24]);
            if u == 0 {
                u = 0xffff;
            }
            new[26..28].copy_from_slice(&u.to_be_bytes());
        }
    } else if ctx.len() as usize >= l4 + 8 + 20 + 18 {
        l4_csum_off = l4 + 8 + 20 + 16;
    }
    w.tcp_old = [0; 2];
    w.tcp_new = [0; 2];
    if l4_csum_off != 0 {
        let Ok(old) = ctx.load::<[u8; 2]>(l4_csum_off) else {
            return pass(ingress);
        };
        w.tcp_old = old;
        let t = update(
            u16::from_be_bytes(w.tcp_old),
            &w.quote[12..24],
            &w.new[12..24],
        );
        w.tcp_new = t.to_be_bytes();
    }
    // The ICMP checksum covers the quote (and the TCP checksum in it).
    let icmp_old = u16::from_be_bytes([head[2], head[3]]);
    let mut icmp = update(icmp_old, &w.quote, &w.new);
    if l4_csum_off != 0 {
        icmp = update(icmp, &w.tcp_old, &w.tcp_new);
    }

    // The outer header: from the frontend to the client.
    let Ok(o) = ctx.load::<[u8; 20]>(l3) else {
        return pass(ingress);
    };
    w.outer = o;
    let outer = &mut w.outer;
    outer[12..16].copy_from_slice(&e.nat_src_addr.to_ne_bytes());
    outer[16..20].copy_from_slice(&e.nat_dst_addr.to_ne_bytes());
    outer[10] = 0;
    outer[11] = 0;
    let oc = checksum(0, &outer[..]);
    outer[10..12].copy_from_slice(&oc.to_be_bytes());

    let written = ctx.store(l3, &w.outer, 0).is_ok()
        && ctx.store(l4 + 2, &icmp.to_be_bytes(), 0).is_ok()
        && ctx.store(l4 + 8, &w.new, 0).is_ok()
        && (l4_csum_off == 0 || ctx.store(l4_csum_off, &w.tcp_new, 0).is_ok());
    if !written {
        stats::verdict(V_DROP_REWRITE);
        return aya_ebpf::bindings::TC_ACT_SHOT;
    }
    stats::verdict(V_ICMP_TRANSLATED);
    if ingress && e.flags & CT_SNAT != 0 {
        // From the SNAT address to the client: the stack would refuse a
        // source that is this node's; straight to the FIB's device.
        return route::redirect(ctx, PROTO_ICMP, e.nat_src_addr, e.nat_dst_addr);
    }
    TC_ACT_OK
}

/// Not an error about a flow of ours: untouched (counted on the way in,
/// as every packet the ingress program passes is).
#[inline(always)]
fn pass(ingress: bool) -> i32 {
    if ingress {
        stats::verdict(V_PASS_NOT_SERVICE);
    }
    TC_ACT_OK
}

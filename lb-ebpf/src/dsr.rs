//! Direct server return (`lb_common::dsr`): the node a client's packet came
//! to sends it to the backend's node in IPIP (`encap_*`, from the device
//! programs' `forward`), and the backend's node takes the outer header off
//! and remembers which frontend the backend's replies must come from
//! (`receive`); its tc egress program rewrites them (`netdev::to_netdev`),
//! and they go straight to the client.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_DSR, CT_LOCAL_BACKEND, CT_NO_ID, CT_ORIGINAL, CT_REPLY, Ct4Entry, Ct4Key},
    counters::{V_DROP_REWRITE, V_DSR_DECAPSULATED, V_PASS_TRUNCATED, V_PASS_UNSUPPORTED},
    dsr::{DSR_OVERHEAD, PROTO_IPIP, frontend_of, outer_header},
    service::{Frontend4Key, SCOPE_ALL},
};
use network_types::ip::Ipv4Hdr;

use crate::{
    conntrack::{self, now_s},
    device::Device,
    frame::Frame,
    parse::{self, FRAG_LATER, Packet},
    select, stats,
};

const OUTER: usize = DSR_OVERHEAD as usize;
/// Where the (outer) IP header starts.
const L3: usize = 14;

/// A frontend's address and port (wire order), as the option names it.
type FrontendAddr = (u32, u16);

/// An IPIP packet on a node device: another node's DSR packet for a
/// backend here is decapsulated (its flow's reply entry made or touched)
/// and goes up the stack to the backend; any other IPIP packet (a CNI's
/// tunnel) passes untouched. Out of line, as `encap_tc`: the device
/// programs' own frame stays within the verifier's 512 bytes with the
/// callees it has.
#[inline(never)]
pub fn receive<D: Device>(dev: &D) -> i32 {
    let pkt = match parse::parse(dev) {
        Ok(p) => p,
        Err(v) => {
            stats::verdict(v);
            return dev.pass();
        }
    };
    match inner(dev, &pkt) {
        Ok(Some((inner, frontend))) => {
            if inner.has_l4() {
                remember(&inner, frontend);
            }
            if !dev.decap() {
                stats::verdict(V_DROP_REWRITE);
                return dev.drop();
            }
            stats::verdict(V_DSR_DECAPSULATED);
            dev.pass()
        }
        Ok(None) => {
            stats::verdict(V_PASS_UNSUPPORTED);
            dev.pass()
        }
        Err(v) => {
            stats::verdict(v);
            dev.pass()
        }
    }
}

/// Whether the packet is IPv4 carrying IPv4 (read in place: a packet
/// whose headers are not linear goes on to `netdev`, which pulls them).
#[inline(always)]
pub fn is_ipip<D: Device>(dev: &D) -> bool {
    match dev.ptr_at::<[u8; L3 + 10]>(0) {
        // SAFETY: bounds checked by ptr_at.
        Some(h) => unsafe { (*h)[12] == 0x08 && (*h)[13] == 0x00 && (*h)[L3 + 9] == PROTO_IPIP },
        None => false,
    }
}

/// The inner packet of one of our DSR packets, and the frontend its option
/// names; None for an IPIP packet that is not ours.
#[inline(always)]
fn inner<D: Device>(dev: &D, pkt: &Packet) -> Result<Option<(Packet, FrontendAddr)>, u32> {
    // Offsets as constants (the parser puts IPv4 right after Ethernet):
    // read out of line, `pkt`'s offsets are bounds the verifier no longer
    // knows.
    if pkt.l3_off != L3 as u32 || pkt.l4_off != (L3 + OUTER) as u32 {
        return Ok(None);
    }
    let off = L3;
    let outer = dev.ptr_at::<[u8; OUTER]>(off).ok_or(V_PASS_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let Some(frontend) = frontend_of(unsafe { &*outer }) else {
        return Ok(None);
    };
    let ip = dev.ptr_at::<Ipv4Hdr>(off + OUTER).ok_or(V_PASS_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    let dst_addr = u32::from_ne_bytes(ip.dst_addr);
    // The outer destination is the backend itself (see lb_common::dsr).
    if ip.vihl >> 4 != 4 || ihl < 20 || dst_addr != pkt.dst_addr {
        return Ok(None);
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let frag = parse::frag_kind(ip.frags);
    let mut inner = Packet {
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr,
        src_port: 0,
        dst_port: 0,
        proto,
        tcp_flags: 0,
        l3_off: (L3 + OUTER) as u32,
        l4_off: (L3 + OUTER) as u32 + ihl,
        frag,
        ip_id: u16::from_ne_bytes(ip.id),
        len: pkt.len - OUTER as u32,
    };
    if frag == FRAG_LATER {
        return Ok(Some((inner, frontend)));
    }
    let l4 = L3 + OUTER + ihl as usize;
    let ports = dev.ptr_at::<[u8; 4]>(l4).ok_or(V_PASS_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    inner.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    inner.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    if proto == PROTO_TCP {
        let flags = dev.ptr_at::<u8>(l4 + 13).ok_or(V_PASS_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        inner.tcp_flags = unsafe { *flags };
    }
    Ok(Some((inner, frontend)))
}

/// The reply entry of the inner packet's flow: the backend's replies to
/// the client leave from the frontend. Made by the flow's first packet
/// here, moved on (lifetime, TCP state) by every one after, as the
/// client's direction.
#[inline(always)]
fn remember(inner: &Packet, (addr, port): FrontendAddr) {
    let now = now_s();
    let rkey = Ct4Key {
        src_addr: inner.dst_addr,
        dst_addr: inner.src_addr,
        src_port: inner.dst_port,
        dst_port: inner.src_port,
        proto: inner.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    if let Some(mut e) = conntrack::lookup(&rkey, now)
        && e.flags & CT_DSR != 0
        && e.nat_src_addr == addr
        && e.nat_src_port == port
    {
        let as_client = Ct4Key {
            dir: CT_ORIGINAL,
            ..rkey
        };
        conntrack::touch(&as_client, &mut e, inner, inner.len, now);
        return;
    }
    // The frontend's counters when this node has the same frontend (a
    // LoadBalancer or external IP; a NodePort's address is the other
    // node's).
    let fkey = Frontend4Key {
        addr,
        port,
        proto: inner.proto,
        scope: SCOPE_ALL,
    };
    let service_id = select::frontend(&fkey).map_or(CT_NO_ID, |f| f.service_id);
    let e = Ct4Entry {
        nat_src_addr: addr,
        nat_dst_addr: inner.src_addr,
        nat_src_port: port,
        nat_dst_port: inner.src_port,
        service_id,
        backend_id: CT_NO_ID,
        created_s: now,
        last_seen_s: now,
        lifetime_s: conntrack::initial_lifetime(inner.proto),
        flags: CT_LOCAL_BACKEND | CT_DSR,
        _pad: [0; 3],
        packets: 0,
        bytes: 0,
    };
    // A full table leaves the replies untranslated (the client drops
    // them) until an entry frees: nothing better can be done here.
    let _ = conntrack::create(&rkey, &e);
}

/// The outer header for the (already translated) packet of flow `e`: to
/// its backend from `e.nat_src_addr`, naming the frontend the client sent
/// the packet to.
#[inline(always)]
fn header(inner: [u8; 6], pkt: &Packet, e: &Ct4Entry) -> [u8; OUTER] {
    outer_header(
        u16::from_be_bytes([inner[2], inner[3]]),
        inner[1],
        u16::from_be_bytes([inner[4], inner[5]]),
        e.nat_src_addr,
        e.nat_dst_addr,
        pkt.dst_addr,
        pkt.dst_port,
    )
}

/// Puts the outer header in front of the packet's IP header (tc). A GSO
/// packet's segments shrink by the header, so each still fits the route.
#[inline(never)]
pub fn encap_tc(ctx: &TcContext, pkt: &Packet, e: &Ct4Entry) -> Result<(), ()> {
    let inner = ctx.load::<[u8; 6]>(pkt.l3_off as usize).map_err(|_| ())?;
    let h = header(inner, pkt, e);
    ctx.adjust_room(
        DSR_OVERHEAD as i32,
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64,
    )
    .map_err(|_| ())?;
    ctx.store(pkt.l3_off as usize, &h, 0).map_err(|_| ())
}

/// The same in XDP: the buffer grows at its head; the Ethernet header is
/// written anew by the caller (its addresses come from the FIB).
#[inline(always)]
pub fn encap_xdp(ctx: &XdpContext, pkt: &Packet, e: &Ct4Entry) -> Result<(), ()> {
    let inner = ctx.ptr_at::<[u8; 6]>(pkt.l3_off as usize).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let h = header(unsafe { *inner }, pkt, e);
    // SAFETY: valid context; every pointer is taken anew after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(DSR_OVERHEAD as i32)) } != 0 {
        return Err(());
    }
    let f = ctx.ptr_at::<[u8; 14 + OUTER]>(0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &mut *f };
    f[12] = 0x08;
    f[13] = 0x00;
    f[14..].copy_from_slice(&h);
    Ok(())
}

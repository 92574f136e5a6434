//! Packet parsing for the device path: Ethernet, IPv4 (with options), and
//! the TCP/UDP ports, read in place from the packet. IPIP packets are
//! parsed to their outer header (`dsr` reads on).

use crate::{frame::Frame, icmp::PROTO_ICMP, maps::FRAGS4};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{Frag4Key, Frag4Ports},
    counters::{V_PASS_FRAGMENT_UNKNOWN, V_PASS_NOT_IPV4, V_PASS_TRUNCATED, V_PASS_UNSUPPORTED},
    dsr::PROTO_IPIP,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
/// TCP flags byte bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram: it has the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no L4 header; its ports are the first fragment's.
pub const FRAG_LATER: u8 = 2;

/// Which of `FRAG_*` a packet is, from its IPv4 header's flags and
/// fragment offset field (as on the wire).
#[inline(always)]
pub fn frag_kind(frags: [u8; 2]) -> u8 {
    let frags = u16::from_be_bytes(frags);
    if frags & 0x1fff != 0 {
        FRAG_LATER
    } else if frags & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

/// What the device path needs of a packet. Addresses and ports in wire order.
pub struct Packet {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub l3_off: u32,
    pub l4_off: u32,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// The IP identification field (wire order), which names a datagram's
    /// fragments.
    pub ip_id: u16,
    /// The whole packet's length (counters).
    pub len: u32,
}

impl Packet {
    /// The key a fragmented datagram's ports are remembered under.
    #[inline(always)]
    pub fn frag_key(&self) -> Frag4Key {
        Frag4Key {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            id: self.ip_id,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// Whether the packet carries its L4 header (every packet but a later
    /// fragment).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != FRAG_LATER
    }

    /// After the first fragment of a datagram was translated: its ports,
    /// for the fragments that follow.
    #[inline(always)]
    pub fn remember_fragment(&self) {
        if self.frag == FRAG_FIRST {
            let ports = Frag4Ports {
                src_port: self.src_port,
                dst_port: self.dst_port,
            };
            // A full map evicts the oldest: a lost entry only leaves that
            // datagram's later fragments to the stack.
            let _ = FRAGS4.insert(&self.frag_key(), &ports, 0);
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> u32 {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// Parses a packet; Err carries the pass verdict for packets the device
/// path leaves to the stack. Reads the headers in place (direct packet
/// access); a packet whose headers are not all in the linear area is pulled
/// once, and one still too short is truncated.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Result<Packet, u32> {
    match parse_linear(ctx) {
        Err(V_PASS_TRUNCATED) if (ctx.len() as usize) > ctx.data_end() - ctx.data() => {
            // Headers beyond the linear area (GRO'd or paged packets):
            // pull the most any header chain here needs and retry.
            let want = (EthHdr::LEN + 60 + 20).min(ctx.len() as usize) as u32;
            if !ctx.pull(want) {
                return Err(V_PASS_TRUNCATED);
            }
            parse_linear(ctx)
        }
        r => r,
    }
}

#[inline(always)]
fn parse_linear<F: Frame>(ctx: &F) -> Result<Packet, u32> {
    let eth = ctx.ptr_at::<EthHdr>(0).ok_or(V_PASS_TRUNCATED)?;
    // VLAN-tagged, IPv6, ARP, ...: not ours.
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(V_PASS_NOT_IPV4);
    }
    let l3_off = EthHdr::LEN as u32;
    let ip = ctx
        .ptr_at::<Ipv4Hdr>(l3_off as usize)
        .ok_or(V_PASS_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(V_PASS_NOT_IPV4);
    }
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    if ihl < Ipv4Hdr::LEN as u32 {
        return Err(V_PASS_TRUNCATED);
    }
    if ip.proto != PROTO_TCP
        && ip.proto != PROTO_UDP
        && ip.proto != PROTO_ICMP
        && ip.proto != PROTO_IPIP
    {
        return Err(V_PASS_UNSUPPORTED);
    }
    let (src_addr, dst_addr, proto) = (
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
        ip.proto,
    );
    let ip_id = u16::from_ne_bytes(ip.id);
    let l4_off = l3_off + ihl;
    // Fragments: the first (more-fragments, offset 0) has the L4 header
    // and is parsed as any packet; a later one has none and takes the
    // ports its first fragment left in FRAGS4 when it was translated.
    let frag = frag_kind(ip.frags);
    if frag != FRAG_NONE && (proto == PROTO_ICMP || proto == PROTO_IPIP) {
        return Err(V_PASS_UNSUPPORTED);
    }
    let (src_port, dst_port, tcp_flags) = if frag == FRAG_LATER {
        let key = Frag4Key {
            src_addr,
            dst_addr,
            id: ip_id,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let Some(ports) = (unsafe { FRAGS4.get(&key) }).copied() else {
            return Err(V_PASS_FRAGMENT_UNKNOWN);
        };
        (ports.src_port, ports.dst_port, 0)
    } else {
        l4_ports(ctx, proto, l4_off)?
    };
    Ok(Packet {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        tcp_flags,
        l3_off,
        l4_off,
        frag,
        ip_id,
        len: ctx.len(),
    })
}

/// The ports (wire order) and TCP flags of a packet that carries its L4
/// header. The whole header must be there before anything is rewritten;
/// its first four bytes are the ports for TCP and UDP alike.
#[inline(always)]
fn l4_ports<F: Frame>(ctx: &F, proto: u8, l4_off: u32) -> Result<(u16, u16, u8), u32> {
    if proto == PROTO_TCP {
        let h = ctx
            .ptr_at::<[u8; 20]>(l4_off as usize)
            .ok_or(V_PASS_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        Ok((
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            h[13],
        ))
    } else if proto == PROTO_UDP {
        let h = ctx
            .ptr_at::<[u8; 8]>(l4_off as usize)
            .ok_or(V_PASS_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        Ok((
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            0,
        ))
    } else if proto == PROTO_IPIP {
        // No ports: `l4_off` is the inner header, which `dsr` reads.
        Ok((0, 0, 0))
    } else {
        // ICMP: no ports; its header must be there (icmp.rs reads on).
        ctx.ptr_at::<[u8; 8]>(l4_off as usize)
            .ok_or(V_PASS_TRUNCATED)?;
        Ok((0, 0, 0))
    }
}

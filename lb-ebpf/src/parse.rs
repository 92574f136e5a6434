//! Packet parsing for the device path: Ethernet, IPv4 (with options), and
//! the TCP/UDP ports, read in place from the packet.

use crate::icmp::PROTO_ICMP;
use aya_ebpf::programs::TcContext;
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    counters::{V_PASS_NOT_IPV4, V_PASS_TRUNCATED, V_PASS_UNSUPPORTED},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
/// TCP flags byte bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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
}

impl Packet {
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

/// A pointer to a `T` at `off` in the packet's linear data, bounds-checked
/// as the verifier requires.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Parses a packet; Err carries the pass verdict for packets the device
/// path leaves to the stack. Reads the headers in place (direct packet
/// access); a packet whose headers are not all in the linear area is pulled
/// once, and one still too short is truncated.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    match parse_linear(ctx) {
        Err(V_PASS_TRUNCATED) if (ctx.len() as usize) > ctx.data_end() - ctx.data() => {
            // Headers beyond the linear area (GRO'd or paged packets):
            // pull the most any header chain here needs and retry.
            let want = (EthHdr::LEN + 60 + 20).min(ctx.len() as usize) as u32;
            ctx.pull_data(want).map_err(|_| V_PASS_TRUNCATED)?;
            parse_linear(ctx)
        }
        r => r,
    }
}

#[inline(always)]
fn parse_linear(ctx: &TcContext) -> Result<Packet, u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(V_PASS_TRUNCATED)?;
    // VLAN-tagged, IPv6, ARP, ...: not ours.
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(V_PASS_NOT_IPV4);
    }
    let l3_off = EthHdr::LEN as u32;
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off as usize).ok_or(V_PASS_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(V_PASS_NOT_IPV4);
    }
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    if ihl < Ipv4Hdr::LEN as u32 {
        return Err(V_PASS_TRUNCATED);
    }
    // Any fragment (more-fragments flag or an offset): only the first has
    // ports, so none is translated; the stack reassembles or drops.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(V_PASS_UNSUPPORTED);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_ICMP {
        return Err(V_PASS_UNSUPPORTED);
    }
    let (src_addr, dst_addr, proto) = (
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
        ip.proto,
    );
    let l4_off = l3_off + ihl;
    // The whole L4 header must be there before anything is rewritten; its
    // first four bytes are the ports for TCP and UDP alike.
    let (src_port, dst_port, tcp_flags) = if proto == PROTO_TCP {
        let h = ptr_at::<[u8; 20]>(ctx, l4_off as usize).ok_or(V_PASS_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            h[13],
        )
    } else if proto == PROTO_UDP {
        let h = ptr_at::<[u8; 8]>(ctx, l4_off as usize).ok_or(V_PASS_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            0,
        )
    } else {
        // ICMP: no ports; its header must be there (icmp.rs reads on).
        ptr_at::<[u8; 8]>(ctx, l4_off as usize).ok_or(V_PASS_TRUNCATED)?;
        (0, 0, 0)
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
    })
}

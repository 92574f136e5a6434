//! Packet parsing for the device path: Ethernet, IPv4 (with options), and
//! the TCP/UDP ports. Reads go through `bpf_skb_load_bytes`, which is bounds
//! checked by the kernel and works on non-linear packets.

use aya_ebpf::programs::TcContext;
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    counters::{V_PASS_NOT_IPV4, V_PASS_TRUNCATED, V_PASS_UNSUPPORTED},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
/// TCP flags byte bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

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

/// Parses a packet; Err carries the pass verdict for packets the device
/// path leaves to the stack.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    let eth: EthHdr = ctx.load(0).map_err(|_| V_PASS_TRUNCATED)?;
    // VLAN-tagged, IPv6, ARP, ...: not ours.
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return Err(V_PASS_NOT_IPV4);
    }
    let l3_off = EthHdr::LEN as u32;
    let ip: Ipv4Hdr = ctx.load(l3_off as usize).map_err(|_| V_PASS_TRUNCATED)?;
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
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err(V_PASS_UNSUPPORTED);
    }
    let l4_off = l3_off + ihl;
    // Ports are the first four bytes of both TCP and UDP; the whole L4
    // header must be there before anything is rewritten.
    let hdr_len: u32 = if ip.proto == PROTO_TCP { 20 } else { 8 };
    if (ctx.len()) < l4_off + hdr_len {
        return Err(V_PASS_TRUNCATED);
    }
    let ports: [u16; 2] = ctx.load(l4_off as usize).map_err(|_| V_PASS_TRUNCATED)?;
    let tcp_flags = if ip.proto == PROTO_TCP {
        ctx.load::<u8>(l4_off as usize + 13)
            .map_err(|_| V_PASS_TRUNCATED)?
    } else {
        0
    };
    Ok(Packet {
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: u32::from_ne_bytes(ip.dst_addr),
        src_port: ports[0],
        dst_port: ports[1],
        proto: ip.proto,
        tcp_flags,
        l3_off,
        l4_off,
    })
}

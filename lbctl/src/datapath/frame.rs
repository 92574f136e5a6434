//! A minimal IPv4 frame builder and reader for `lbctl explain`: the
//! synthetic packet it hands the real program, and the rewritten tuple it
//! reads back.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{PROTO_TCP, PROTO_UDP};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// RFC 1071 ones' complement sum over `data`, folded and complemented.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let bytes: Vec<u8> = parts.concat();
    for c in bytes.chunks(2) {
        let hi = u32::from(c[0]) << 8;
        let lo = c.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 (no options) + a TCP segment with `tcp_flags` or a UDP
/// datagram, with valid checksums.
pub fn build(proto: u8, src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Vec<u8> {
    let l4: Vec<u8> = if proto == PROTO_TCP {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&1u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = tcp_flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t
    } else {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&src.port().to_be_bytes());
        u[2..4].copy_from_slice(&dst.port().to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        u
    };
    let mut ip = vec![0u8; IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let mut l4 = l4;
    let c = checksum(&[&pseudo, &l4]);
    let at = if proto == PROTO_UDP { 6 } else { 16 };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(ETH_LEN + ip.len() + l4.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// The (source, destination) of an IPv4 TCP/UDP frame without options.
pub fn tuple(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    tuple_at(frame, ETH_LEN)
}

/// The outer header's addresses and the inner packet's tuple of an IPIP
/// frame (direct server return); None for any other frame.
pub fn ipip(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, SocketAddrV4, SocketAddrV4)> {
    let ip = frame.get(ETH_LEN..ETH_LEN + IP_LEN)?;
    if ip[9] != lb_common::dsr::PROTO_IPIP {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let (s, d) = tuple_at(frame, ETH_LEN + ihl)?;
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Some((addr(&ip[12..16]), addr(&ip[16..20]), s, d))
}

fn tuple_at(frame: &[u8], l3: usize) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let ip = frame.get(l3..l3 + IP_LEN)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4 = frame.get(l3 + ihl..l3 + ihl + 4)?;
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Some((
        SocketAddrV4::new(addr(&ip[12..16]), port(&l4[0..2])),
        SocketAddrV4::new(addr(&ip[16..20]), port(&l4[2..4])),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_inner_tuple_of_an_ipip_frame() {
        let src: SocketAddrV4 = "172.18.0.10:40000".parse().unwrap();
        let dst: SocketAddrV4 = "10.244.2.11:8080".parse().unwrap();
        let inner = build(PROTO_TCP, src, dst, TCP_SYN);
        let outer = lb_common::dsr::outer_header(
            (inner.len() - ETH_LEN) as u16,
            0,
            1,
            lb_common::ip4([172, 18, 0, 2]),
            lb_common::ip4([10, 244, 2, 11]),
            lb_common::ip4([172, 18, 0, 2]),
            lb_common::port(30080),
        );
        let f = [&inner[..ETH_LEN], &outer[..], &inner[ETH_LEN..]].concat();
        assert_eq!(
            ipip(&f),
            Some((
                Ipv4Addr::new(172, 18, 0, 2),
                Ipv4Addr::new(10, 244, 2, 11),
                src,
                dst
            ))
        );
        assert_eq!(ipip(&inner), None);
    }

    #[test]
    fn builds_valid_headers_and_reads_the_tuple_back() {
        let src: SocketAddrV4 = "172.18.0.10:40000".parse().unwrap();
        let dst: SocketAddrV4 = "172.18.0.2:30080".parse().unwrap();
        for proto in [PROTO_TCP, PROTO_UDP] {
            let f = build(proto, src, dst, TCP_SYN);
            assert_eq!(tuple(&f), Some((src, dst)));
            // A valid IPv4 header sums to zero with its checksum in place.
            assert_eq!(checksum(&[&f[14..34]]), 0);
            let l4 = &f[34..];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.ip().octets());
            pseudo.extend_from_slice(&dst.ip().octets());
            pseudo.extend_from_slice(&[0, proto, 0, l4.len() as u8]);
            assert_eq!(checksum(&[&pseudo, l4]), 0, "L4 checksum of {proto}");
        }
        assert_eq!(tuple(&[0u8; 20]), None);
    }
}

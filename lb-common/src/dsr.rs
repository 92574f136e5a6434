//! Direct server return (DSR) on the wire: how the node a client's packet
//! came to hands it to a backend on another node, and how that node knows
//! which frontend the backend's replies must come from.
//!
//! ```text
//! | Ethernet | outer IPv4, 28 bytes                         | inner IPv4 packet        |
//! |          | 20-byte header, proto 4 (IPIP), DF           | client -> backend        |
//! |          | src: the first node, dst: the backend        | (destination translated, |
//! |          | option: type DSR_OPT_TYPE, length 8,         |  source untouched)       |
//! |          |   frontend port (2), frontend address (4)    |                          |
//! ```
//!
//! The outer destination is the backend's own address, so the packet
//! takes the route the cluster already has to the backend's pod CIDR. The
//! option (in the outer header only: the backend never sees it) carries
//! the frontend the client used: two ports of one address may lead to the
//! same backend port, so the backend's node could not tell them apart from
//! the inner packet alone. The outer identification field copies the
//! inner one.

/// IP protocol number of IPv4-in-IPv4.
pub const PROTO_IPIP: u8 = 4;
/// The option's type: RFC 4727's experimental option number 30, copy
/// flag clear, class 2 (debugging and measurement): routers that do not
/// know it forward it untouched.
pub const DSR_OPT_TYPE: u8 = 0x5e;
pub const DSR_OPT_LEN: u8 = 8;
/// What DSR adds to a packet: the outer header with its option.
pub const DSR_OVERHEAD: u16 = 20 + DSR_OPT_LEN as u16;

/// The outer header for an inner packet of `inner_len` bytes (its IP total
/// length), checksum included; addresses and the port in wire order.
pub fn outer_header(
    inner_len: u16,
    tos: u8,
    id: u16,
    src: u32,
    dst: u32,
    frontend_addr: u32,
    frontend_port: u16,
) -> [u8; DSR_OVERHEAD as usize] {
    let mut h = [0u8; DSR_OVERHEAD as usize];
    h[0] = 0x40 | (DSR_OVERHEAD / 4) as u8;
    h[1] = tos;
    h[2..4].copy_from_slice(&inner_len.saturating_add(DSR_OVERHEAD).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // DF: the inner packet's size was checked against the route
    h[8] = 64;
    h[9] = PROTO_IPIP;
    h[12..16].copy_from_slice(&src.to_ne_bytes());
    h[16..20].copy_from_slice(&dst.to_ne_bytes());
    h[20] = DSR_OPT_TYPE;
    h[21] = DSR_OPT_LEN;
    h[22..24].copy_from_slice(&frontend_port.to_ne_bytes());
    h[24..28].copy_from_slice(&frontend_addr.to_ne_bytes());
    let mut sum = 0u32;
    let mut i = 0;
    while i < h.len() {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    h
}

/// The frontend (address, port; wire order) an outer header's option
/// names, when `h` is one of ours.
pub fn frontend_of(h: &[u8; DSR_OVERHEAD as usize]) -> Option<(u32, u16)> {
    if h[0] != 0x40 | (DSR_OVERHEAD / 4) as u8
        || h[9] != PROTO_IPIP
        || h[20] != DSR_OPT_TYPE
        || h[21] != DSR_OPT_LEN
    {
        return None;
    }
    Some((
        u32::from_ne_bytes([h[24], h[25], h[26], h[27]]),
        u16::from_ne_bytes([h[22], h[23]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_checksums_to_zero_and_names_its_frontend() {
        let h = outer_header(
            60,
            0,
            0x1234,
            crate::ip4([172, 18, 0, 2]),
            crate::ip4([10, 244, 2, 11]),
            crate::ip4([192, 168, 50, 10]),
            crate::port(80),
        );
        let mut sum = 0u32;
        for w in h.chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 88);
        assert_eq!(
            frontend_of(&h),
            Some((crate::ip4([192, 168, 50, 10]), crate::port(80)))
        );
    }
}

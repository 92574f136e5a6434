//! Flow hashes that choose a backend. Shared by the datapath and `lbctl`, so
//! `lbctl explain` computes exactly what the kernel computes.

/// Murmur3's 32-bit finaliser: full avalanche, a handful of instructions.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn combine(h: u32, v: u32) -> u32 {
    fmix32(h ^ v.wrapping_mul(0x9e37_79b1)).rotate_left(13)
}

/// Hash of a packet's flow (fields in wire order, as in keys).
#[inline(always)]
pub const fn flow4(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let mut h = 0x5bd1_e995u32;
    h = combine(h, src_addr);
    h = combine(h, dst_addr);
    h = combine(h, ((src_port as u32) << 16) | dst_port as u32);
    h = combine(h, proto as u32);
    fmix32(h)
}

/// Hash of a packet's flow for a Maglev frontend: without the destination
/// address, so a flow to any node's NodePort address, or to a VIP a router
/// spreads over nodes, hashes the same on every node.
#[inline(always)]
pub const fn maglev4(src_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let mut h = 0x1b87_3593u32;
    h = combine(h, src_addr);
    h = combine(h, ((src_port as u32) << 16) | dst_port as u32);
    h = combine(h, proto as u32);
    fmix32(h)
}

/// The flow hash the device path picks a new flow's backend with: `maglev4`
/// for a Maglev frontend, else `flow4`.
#[inline(always)]
pub const fn device4(
    maglev: bool,
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u32 {
    if maglev {
        maglev4(src_addr, src_port, dst_port, proto)
    } else {
        flow4(src_addr, dst_addr, src_port, dst_port, proto)
    }
}

/// A Maglev permutation's seed for a backend (address and port, wire
/// order, as in keys; `salt` tells offset from skip): what every node
/// computes alike from the backend itself, never from its node-local id.
#[inline(always)]
pub const fn backend4(salt: u32, addr: u32, port: u16, proto: u8) -> u32 {
    let mut h = salt;
    h = combine(h, addr);
    h = combine(h, ((port as u32) << 8) | proto as u32);
    fmix32(h)
}

/// Hash of a socket's flow to a frontend: the socket cookie identifies the
/// flow before its source port exists.
#[inline(always)]
pub const fn sock4(cookie: u64, frontend_addr: u32, frontend_port: u16, proto: u8) -> u32 {
    let mut h = 0x27d4_eb2du32;
    h = combine(h, cookie as u32);
    h = combine(h, (cookie >> 32) as u32);
    h = combine(h, frontend_addr);
    h = combine(h, ((frontend_port as u32) << 8) | proto as u32);
    fmix32(h)
}

/// The slot a hash picks among `count` backends (callers check count > 0;
/// the `max` keeps a division-by-zero panic path out of the BPF object).
#[inline(always)]
pub const fn slot(hash: u32, count: u16) -> u32 {
    let n = if count == 0 { 1 } else { count as u32 };
    hash % n
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::ip4;

    /// New flows spread evenly: over 60,000 flows from one client address
    /// (only the source port varies, the hardest case) and over sockets,
    /// every backend of 3 or 10 gets its share within 5%.
    #[test]
    fn picks_are_uniform_over_backends() {
        for count in [3u16, 10] {
            let mut flows = vec![0u32; count as usize];
            let mut socks = vec![0u32; count as usize];
            for i in 0..60_000u32 {
                let sport = (1024 + i % 60_000) as u16;
                let h = flow4(
                    ip4([192, 168, 50, 7]),
                    ip4([172, 18, 0, 2]),
                    sport.to_be(),
                    30080u16.to_be(),
                    6,
                );
                flows[slot(h, count) as usize] += 1;
                let s = sock4(0x1000 + i as u64, ip4([10, 96, 0, 10]), 80u16.to_be(), 6);
                socks[slot(s, count) as usize] += 1;
            }
            let fair = 60_000 / count as u32;
            for (what, hist) in [("flows", &flows), ("sockets", &socks)] {
                for n in hist.iter() {
                    assert!(
                        n.abs_diff(fair) * 20 < fair,
                        "{what} over {count}: {hist:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn slot_never_divides_by_zero() {
        assert_eq!(slot(12345, 0), 0);
    }
}

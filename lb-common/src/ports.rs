//! The destination ports the device path looks further at
//! (`LB_PORTS_V1`): a bit per port that some frontend uses or that the
//! SNAT range holds. A packet to any other port is no Service's, whatever
//! its address (outside the service CIDRs), and leaves after one array
//! lookup: SSH, the kubelet, BGP to the node's own address.

/// 65,536 ports in words of 64 bits.
pub const PORT_WORDS: u32 = 1024;

/// The word index and bit of `port` (host order).
#[inline(always)]
pub fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_has_one_bit() {
        assert_eq!(port_bit(0), (0, 1));
        assert_eq!(port_bit(63), (0, 1 << 63));
        assert_eq!(port_bit(64), (1, 1));
        assert_eq!(port_bit(30080), (470, 1 << 0));
        assert_eq!(port_bit(u16::MAX), (PORT_WORDS - 1, 1 << 63));
    }
}

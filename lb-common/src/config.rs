//! Datapath configuration written by the agent (`LB_CONFIG_V2[0]`).

use crate::user_pod;

/// `LB_PORTS_V1` holds every port a frontend in the maps uses and the SNAT
/// range: the device path passes a packet to any other port (outside the
/// service CIDRs) at once. Set by the agent once it has written the map
/// whole; an agent that does not keep the map never sets it.
pub const CFG_PORTS: u32 = 1 << 0;

/// How many service CIDRs the datapath checks. The API server allows any
/// number of ServiceCIDR objects; clusters have one or two per family. The
/// agent reports the ones past this count as not enforced.
pub const MAX_SERVICE_CIDRS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Source address for SNATed NodePort/external traffic to a backend on
    /// another node when the frontend is not itself a node address (wire
    /// order); 0 = use the frontend address.
    pub snat_addr: u32,
    /// First and last source port for SNAT (host order), reserved for the
    /// datapath (`--snat-port-range`).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CFG_*`.
    pub flags: u32,
    /// How many of `service_cidrs` are set.
    pub service_cidr_count: u32,
    /// Network namespace cookie of the node's own processes: NodePorts on
    /// 127.0.0.1 serve them only (a pod's loopback is its own).
    pub host_netns_cookie: u64,
    /// The service CIDRs (network and mask, both wire order): traffic to
    /// an address in one of them that no Service has is dropped, as
    /// kube-proxy's nftables mode does. Count 0: nothing dropped.
    pub service_cidrs: [u32; MAX_SERVICE_CIDRS],
    pub service_cidr_masks: [u32; MAX_SERVICE_CIDRS],
    /// Flood protection (`--new-flow-rate`, `--new-flow-burst`): each CPU
    /// takes a new flow from outside into conntrack every
    /// `flow_interval_ns` at most, with up to `flow_burst_ns` of them
    /// ahead (a GCRA, the token bucket as one timestamp). 0: no limit.
    pub flow_interval_ns: u64,
    pub flow_burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 72);

impl Config {
    /// Sets the new-flow limit: `rate` flows a second per CPU (0: none),
    /// `burst` of them at once.
    pub fn set_flow_rate(&mut self, rate: u32, burst: u32) {
        if rate == 0 {
            self.flow_interval_ns = 0;
            self.flow_burst_ns = 0;
            return;
        }
        self.flow_interval_ns = (1_000_000_000 / u64::from(rate)).max(1);
        self.flow_burst_ns = self.flow_interval_ns * u64::from(burst.max(1));
    }

    /// (flows a second per CPU, burst), 0 when there is no limit.
    pub fn flow_rate(&self) -> (u32, u32) {
        if self.flow_interval_ns == 0 {
            return (0, 0);
        }
        (
            (1_000_000_000 / self.flow_interval_ns) as u32,
            (self.flow_burst_ns / self.flow_interval_ns) as u32,
        )
    }

    /// Whether `addr` (wire order) is in one of the service CIDRs. The
    /// network and mask are both in wire order, so the test needs no byte
    /// swap.
    #[inline(always)]
    pub fn in_service_cidr(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_SERVICE_CIDRS {
            if (i as u32) < self.service_cidr_count
                && addr & self.service_cidr_masks[i] == self.service_cidrs[i]
            {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Sets the service CIDRs, (address, prefix length) with the address
    /// in host order as `Ipv4Addr::to_bits` gives it; those past
    /// [`MAX_SERVICE_CIDRS`] are left out (the caller reports them).
    pub fn set_service_cidrs(&mut self, cidrs: &[(u32, u8)]) {
        self.service_cidrs = [0; MAX_SERVICE_CIDRS];
        self.service_cidr_masks = [0; MAX_SERVICE_CIDRS];
        let n = cidrs.len().min(MAX_SERVICE_CIDRS);
        for (i, &(addr, len)) in cidrs.iter().take(n).enumerate() {
            let mask = match len {
                0 => 0,
                l => u32::MAX << (32 - l.min(32) as u32),
            };
            self.service_cidrs[i] = (addr & mask).to_be();
            self.service_cidr_masks[i] = mask.to_be();
        }
        self.service_cidr_count = n as u32;
    }

    /// The service CIDRs set, (address in host order, prefix length).
    pub fn service_cidr_list(&self) -> impl Iterator<Item = (u32, u8)> + '_ {
        (0..(self.service_cidr_count as usize).min(MAX_SERVICE_CIDRS)).map(|i| {
            (
                u32::from_be(self.service_cidrs[i]),
                u32::from_be(self.service_cidr_masks[i]).count_ones() as u8,
            )
        })
    }
}

user_pod!(Config);

/// How many of the node's own addresses `NodeAddrs4` holds. A node with
/// more has the rest found through the address map, as any other address.
pub const MAX_NODE_ADDRS: usize = 7;

/// The node's own addresses (the NodePort addresses and the SNAT address,
/// wire order), `LB4_NODE_ADDRS_V1[0]`, written by the agent. Most traffic
/// a node's device path translates is to one of them (NodePorts, the
/// replies of SNATed flows): the program knows them from these few
/// compares on one cache line, without the address map's hash lookup.
/// None of them is a ClusterIP, so the address map's flags would have
/// said nothing more. Empty (an agent that never wrote it): every address
/// is looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs4 {
    pub count: u32,
    pub addrs: [u32; MAX_NODE_ADDRS],
}
const _: () = assert!(core::mem::size_of::<NodeAddrs4>() == 32);

impl NodeAddrs4 {
    /// The first [`MAX_NODE_ADDRS`] of `addrs` (wire order), each once,
    /// and how many were left out.
    pub fn new(addrs: impl IntoIterator<Item = u32>) -> (Self, usize) {
        let mut n = Self::default();
        let mut left_out = 0;
        for a in addrs {
            if n.list().any(|b| b == a) {
                continue;
            }
            if (n.count as usize) < MAX_NODE_ADDRS {
                n.addrs[n.count as usize] = a;
                n.count += 1;
            } else {
                left_out += 1;
            }
        }
        (n, left_out)
    }

    /// Whether `addr` (wire order) is one of them.
    #[inline(always)]
    pub fn contains(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_NODE_ADDRS {
            if (i as u32) < self.count && self.addrs[i] == addr {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The addresses held (wire order).
    pub fn list(&self) -> impl Iterator<Item = u32> + '_ {
        self.addrs[..(self.count as usize).min(MAX_NODE_ADDRS)]
            .iter()
            .copied()
    }
}

user_pod!(NodeAddrs4);

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn node_addresses_are_kept_once_up_to_the_limit() {
        let (n, left_out) = NodeAddrs4::new([1, 2, 1, 3, 4, 5, 6, 7, 8, 9]);
        assert!(n.list().eq([1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(left_out, 2);
        assert!(n.contains(7) && !n.contains(8) && !n.contains(0));
        let (empty, _) = NodeAddrs4::new([]);
        assert!(!empty.contains(0), "an unused slot holds no address");
    }

    #[test]
    fn addresses_in_any_of_the_cidrs() {
        let mut c = Config::default();
        assert!(!c.in_service_cidr(wire([10, 96, 0, 1])), "none set");
        c.set_service_cidrs(&[
            (u32::from_be_bytes([10, 96, 0, 0]), 12),
            (u32::from_be_bytes([172, 30, 5, 7]), 24),
        ]);
        assert!(c.in_service_cidr(wire([10, 96, 0, 1])));
        assert!(c.in_service_cidr(wire([10, 111, 255, 255])));
        assert!(!c.in_service_cidr(wire([10, 112, 0, 0])));
        assert!(
            c.in_service_cidr(wire([172, 30, 5, 200])),
            "host bits masked"
        );
        assert!(!c.in_service_cidr(wire([172, 30, 6, 1])));
        assert!(c.service_cidr_list().eq([
            (u32::from_be_bytes([10, 96, 0, 0]), 12),
            (u32::from_be_bytes([172, 30, 5, 0]), 24)
        ]));
    }

    #[test]
    fn past_the_limit_left_out_and_slash_32_exact() {
        let mut c = Config::default();
        let many = [1, 2, 3, 4, 5, 6].map(|i| (u32::from_be_bytes([10, i, 0, 9]), 32));
        c.set_service_cidrs(&many);
        assert_eq!(c.service_cidr_count as usize, MAX_SERVICE_CIDRS);
        assert!(c.in_service_cidr(wire([10, 4, 0, 9])));
        assert!(!c.in_service_cidr(wire([10, 4, 0, 8])));
        assert!(!c.in_service_cidr(wire([10, 5, 0, 9])), "fifth left out");
    }
}

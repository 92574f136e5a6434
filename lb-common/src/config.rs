//! Datapath configuration written by the agent (`LB_CONFIG_V1[0]`).

use crate::user_pod;

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
    pub flags: u32,
    /// The service CIDR (wire order) and its prefix length: traffic to an
    /// address in it that no Service has is dropped, as kube-proxy's
    /// nftables mode does. Length 0: no CIDR given, nothing dropped.
    pub service_cidr: u32,
    pub service_cidr_len: u8,
    pub _pad: [u8; 7],
    /// Network namespace cookie of the node's own processes: NodePorts on
    /// 127.0.0.1 serve them only (a pod's loopback is its own).
    pub host_netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 32);

impl Config {
    /// Whether `addr` (wire order) is in the service CIDR.
    #[inline(always)]
    pub fn in_service_cidr(&self, addr: u32) -> bool {
        if self.service_cidr_len == 0 || self.service_cidr_len > 32 {
            return false;
        }
        let mask = u32::MAX << (32 - self.service_cidr_len as u32);
        u32::from_be(addr) & mask == u32::from_be(self.service_cidr) & mask
    }
}

user_pod!(Config);

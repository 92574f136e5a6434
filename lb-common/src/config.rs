//! Datapath configuration written by the agent (`LB_CONFIG_V1[0]`).

use crate::user_pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Source address for SNATed NodePort/external traffic to a backend on
    /// another node when the frontend is not itself a node address (wire
    /// order); 0 = use the frontend address.
    pub snat_addr: u32,
    /// First and last source port for SNAT (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

user_pod!(Config);

//! Socket-level translation state (cgroup connect4/sendmsg4/recvmsg4/
//! getpeername4): east-west traffic is translated once per socket, so its
//! packets pay nothing per packet.

use crate::user_pod;

/// Key of the reverse translation for a socket: what the socket talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNat4Key>() == 16);

/// What the socket must see instead: the frontend it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4 {
    pub frontend_addr: u32,
    pub frontend_port: u16,
    /// `REV_*`.
    pub flags: u16,
    pub service_id: u32,
}

/// The frontend has `loadBalancerSourceRanges`: the socket's first packet
/// (a TCP SYN) or each datagram is checked against them on egress, once
/// its source address is known (`lb_sock_egress`).
pub const REV_SOURCE_RANGES: u16 = 1 << 0;
const _: () = assert!(core::mem::size_of::<SockRevNat4>() == 12);

/// An unconnected UDP socket's flow to one frontend, so its datagrams keep
/// their backend while the backend set changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlow4Key {
    pub cookie: u64,
    pub frontend_addr: u32,
    pub frontend_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockFlow4Key>() == 16);

/// The backend an unconnected UDP socket's flow uses. The address is kept
/// beside the id so a reused id is noticed and the flow re-chooses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlow4 {
    pub backend_id: u32,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockFlow4>() == 12);

user_pod!(SockRevNat4Key, SockRevNat4, SockFlow4Key, SockFlow4);

//! Per-packet connection tracking for traffic that is translated per packet
//! (NodePort, external and LoadBalancer IPs arriving on a node device).
//!
//! Each flow has two entries: the original direction, keyed by the tuple the
//! client sent, and the reply direction, keyed by the tuple the backend
//! answers with. Each entry says how to rewrite a packet that matches it, so
//! one lookup translates a packet in either direction.

use crate::user_pod;

pub const CT_ORIGINAL: u8 = 0;
pub const CT_REPLY: u8 = 1;

/// `Ct4Entry::flags`.
pub const CT_SNAT: u8 = 1 << 0;
pub const CT_LOCAL_BACKEND: u8 = 1 << 1;
pub const CT_SEEN_REPLY: u8 = 1 << 2;
/// A RST, or a FIN in both directions: the connection is ending.
pub const CT_CLOSING: u8 = 1 << 3;
/// A FIN from the client, from the backend: one direction is done, the
/// other may go on sending (a half-close keeps the flow established).
pub const CT_FIN_ORIGINAL: u8 = 1 << 4;
pub const CT_FIN_REPLY: u8 = 1 << 5;
/// Direct server return. On the node the client's packets come to (an
/// original-direction entry): the backend is on another node and gets the
/// packets in IPIP, `nat_src_addr` being the outer source (this node's
/// address; the inner source stays the client), and its replies go
/// straight to the client, so this node sees only the client's direction.
/// On the backend's node (a reply-direction entry, `CT_LOCAL_BACKEND`
/// too): made from the encapsulated packets, it turns the backend's
/// replies into the frontend's.
pub const CT_DSR: u8 = 1 << 6;

/// `Ct4Entry::service_id`/`backend_id` of a flow this node knows neither
/// of (a DSR flow's reply entry on the backend's node, when the frontend
/// is another node's NodePort): not counted.
pub const CT_NO_ID: u32 = u32::MAX;

/// Lifetimes in seconds, by what the flow has shown: an entry is dead
/// after `lifetime` seconds without a packet in either direction.
pub const CT_LIFETIME_TCP_SYN: u32 = 60;
pub const CT_LIFETIME_TCP_ESTABLISHED: u32 = 6 * 3600;
pub const CT_LIFETIME_TCP_CLOSING: u32 = 10;
pub const CT_LIFETIME_UDP: u32 = 60;
/// Linux's TIME_WAIT (TCP_TIMEWAIT_LEN): an SNAT port of a closed TCP flow
/// is not given again before, as the backend may still hold the old
/// connection.
pub const CT_TIME_WAIT_S: u32 = 60;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `CT_ORIGINAL` or `CT_REPLY`.
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Entry {
    /// Rewrite for a matching packet (wire order; equal to the packet's
    /// field when that field is not translated).
    pub nat_src_addr: u32,
    pub nat_dst_addr: u32,
    pub nat_src_port: u16,
    pub nat_dst_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// Seconds of `bpf_ktime_get_coarse_ns` when created and last seen.
    pub created_s: u32,
    pub last_seen_s: u32,
    /// The entry is dead after `last_seen_s + lifetime_s`.
    pub lifetime_s: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Entry>() == 56);

user_pod!(Ct4Key, Ct4Entry);

/// A fragmented datagram as its fragments carry it: only the first has the
/// ports, so the device path remembers them under the IP header's fields
/// every fragment repeats (as Cilium does), and translates the later
/// fragments with the same flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frag4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// The IP identification field (wire order).
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 12);

/// The ports of a fragmented datagram's first fragment (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag4Ports {
    pub src_port: u16,
    pub dst_port: u16,
}
const _: () = assert!(core::mem::size_of::<Frag4Ports>() == 4);

user_pod!(Frag4Key, Frag4Ports);

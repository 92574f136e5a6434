//! Map keys and values shared by the kernel programs (`lb-ebpf`) and the user
//! side (`lbctl`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields, no `bool`/`Option`) and a compile-time size assertion, so a layout
//! change fails the build instead of silently corrupting a pinned map.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the
//! wire (network byte order) in native integers, so the datapath compares
//! them without swapping. Use [`ip4`]/[`port`] and their inverses on the user
//! side.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod counters;
pub mod dsr;
pub mod hash;
pub mod maps;
pub mod ports;
pub mod service;
pub mod sock;
pub mod status;

/// Version of every map layout in this crate. Map names carry it
/// (`..._V1`), so an upgraded agent never reads old bytes with a new layout:
/// a new layout gets new pins and the old ones are drained and removed.
pub const LAYOUT_VERSION: u32 = 1;

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// An IPv4 address from its octets to the wire-order `u32` used in keys.
#[inline(always)]
pub const fn ip4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of a wire-order `u32` address.
#[inline(always)]
pub const fn ip4_octets(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A host-order port number to the wire-order `u16` used in keys.
#[inline(always)]
pub const fn port(p: u16) -> u16 {
    p.to_be()
}

/// A wire-order port from a key back to the host-order number.
#[inline(always)]
pub const fn port_host(p: u16) -> u16 {
    u16::from_be(p)
}

/// Implements `aya::Pod` for map types on the user side.
macro_rules! user_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), no padding (size asserted), every bit pattern valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}
pub(crate) use user_pod;

//! Kernel programs of the load balancer. Entry points are thin; the logic
//! lives in one module per concern.
//!
//! | program            | hook                  | job                                          |
//! |--------------------|-----------------------|----------------------------------------------|
//! | `lb_connect4`      | cgroup connect4       | point a TCP/connected-UDP socket at a backend |
//! | `lb_sendmsg4`      | cgroup sendmsg4       | same for each unconnected UDP datagram        |
//! | `lb_recvmsg4`      | cgroup recvmsg4       | show the Service address as the sender        |
//! | `lb_getpeername4`  | cgroup getpeername4   | show the Service address as the peer          |
//! | `lb_connect6` ...  | the same four, IPv6   | the same for `::ffff:a.b.c.d` (dual-stack sockets) |
//! | `lb_sock_egress`   | cgroup skb egress     | `loadBalancerSourceRanges` for sockets (while some Service has them) |
//! | `lb_xdp_from_netdev` | XDP, node dev       | the same as `lb_from_netdev`, before the stack; the rest left to it |
//! | `lb_from_netdev`   | tc ingress, node dev  | NodePort/external/LB: DNAT (+SNAT or DSR), replies; DSR decap |
//! | `lb_to_netdev`     | tc egress, node dev   | local backends' replies back to the frontend (DSR's too) |
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed to the helpers by reference on purpose: \
              one stack slot whose address the helper reads, no extra copy on a \
              512-byte stack the verifier counts"
)]

mod conntrack;
mod csum;
mod device;
mod dsr;
mod flood;
mod frame;
mod icmp;
mod maps;
mod nat;
mod netdev;
mod parse;
mod reject;
mod route;
mod select;
mod sock;
mod sock_egress;
mod stats;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, classifier, xdp},
    programs::{SkBuffContext, SockAddrContext, TcContext, XdpContext},
};
use sock::Family;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4Mapped, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4Mapped, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4Mapped)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4Mapped)
}

#[cgroup_skb(egress)]
pub fn lb_sock_egress(ctx: SkBuffContext) -> i32 {
    sock_egress::check(&ctx)
}

#[xdp]
pub fn lb_xdp_from_netdev(ctx: XdpContext) -> u32 {
    netdev::from_device(&ctx) as u32
}

#[classifier]
pub fn lb_from_netdev(ctx: TcContext) -> i32 {
    netdev::from_netdev(&ctx)
}

#[classifier]
pub fn lb_to_netdev(ctx: TcContext) -> i32 {
    netdev::to_netdev(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

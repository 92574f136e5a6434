//! How XDP is attached to a device, as the kernel reports it: a
//! `RTM_GETLINK` for the device and its `IFLA_XDP` attributes, as
//! `ip -d link show` prints them. A pinned XDP link does not say whether
//! it runs in the driver or on the skb; the device does.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x01;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR_LEN: usize = 16;
/// `struct ifinfomsg`.
const IFINFO_LEN: usize = 16;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

/// XDP on a device (`XDP_ATTACHED_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttached {
    None,
    /// Native: in the driver, before any skb.
    Driver,
    /// Generic: on the skb, after the driver built it.
    Skb,
    Hardware,
    /// Several programs (driver and skb at once).
    Multi,
}

impl XdpAttached {
    fn from_kernel(v: u8) -> Self {
        match v {
            1 => Self::Driver,
            2 => Self::Skb,
            3 => Self::Hardware,
            4 => Self::Multi,
            _ => Self::None,
        }
    }

    /// As `lbctl status` and the agent's logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Driver => "native",
            Self::Skb => "generic",
            Self::Hardware => "offloaded",
            Self::Multi => "multi",
        }
    }
}

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The XDP attachment of device `ifindex` in this thread's namespace.
pub fn attached(ifindex: u32) -> io::Result<XdpAttached> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned and not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + IFINFO_LEN);
    msg.extend_from_slice(&((NLMSG_HDR_LEN + IFINFO_LEN) as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    msg.push(libc::AF_UNSPEC as u8);
    msg.push(0);
    msg.extend_from_slice(&0u16.to_ne_bytes()); // type
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // change
    // SAFETY: buffer and length from one Vec.
    check(unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) })?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buffer and length from one Vec.
    let n = check(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })?;
    parse_reply(&buf[..n])
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Attributes (type, payload) of a netlink attribute stream.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let kind = u16_at(b, 2)? & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, payload))
    })
}

fn parse_reply(b: &[u8]) -> io::Result<XdpAttached> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK");
    let len = u32_at(b, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(b, 4).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(b, NLMSG_HDR_LEN).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != RTM_NEWLINK || len > b.len() || len < NLMSG_HDR_LEN + IFINFO_LEN {
        return Err(bad());
    }
    let xdp = attrs(&b[NLMSG_HDR_LEN + IFINFO_LEN..len]).find(|(k, _)| *k == IFLA_XDP);
    let Some((_, xdp)) = xdp else {
        return Ok(XdpAttached::None);
    };
    Ok(attrs(xdp)
        .find(|(k, _)| *k == IFLA_XDP_ATTACHED)
        .and_then(|(_, v)| v.first().copied())
        .map_or(XdpAttached::None, XdpAttached::from_kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn reply(attrs: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + IFINFO_LEN + attrs.len();
        let mut v = (len as u32).to_ne_bytes().to_vec();
        v.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(&[0; IFINFO_LEN]);
        v.extend_from_slice(attrs);
        v
    }

    #[test]
    fn the_mode_is_read_from_the_nested_xdp_attributes() {
        let mut nested = attr(IFLA_XDP_PROG_ID_FOR_TEST, &7u32.to_ne_bytes());
        nested.extend(attr(IFLA_XDP_ATTACHED, &[1]));
        let mut all = attr(3, b"eth0\0"); // IFLA_IFNAME
        all.extend(attr(IFLA_XDP | NLA_F_NESTED, &nested));
        assert_eq!(parse_reply(&reply(&all)).unwrap(), XdpAttached::Driver);
        let skb = attr(IFLA_XDP, &attr(IFLA_XDP_ATTACHED, &[2]));
        assert_eq!(parse_reply(&reply(&skb)).unwrap(), XdpAttached::Skb);
        assert_eq!(
            parse_reply(&reply(&attr(3, b"lo\0"))).unwrap(),
            XdpAttached::None
        );
    }

    const IFLA_XDP_PROG_ID_FOR_TEST: u16 = 4;
}

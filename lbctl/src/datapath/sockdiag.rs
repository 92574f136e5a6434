//! Connected UDP sockets of a network namespace, listed and destroyed
//! through the kernel's socket diagnostics (NETLINK_SOCK_DIAG,
//! `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY`, as `ss -K` does). The socket
//! programs translate a connected UDP socket once, at `connect()`; when its
//! backend leaves the Service the socket is destroyed so its owner sees an
//! error (ECONNABORTED on `recv`) and connects again, to a live backend.
//!
//! Everything here works in the calling thread's network namespace.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A connected UDP socket is in state TCP_ESTABLISHED.
const TCP_ESTABLISHED: u32 = 1;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// One connected UDP socket, as the dump gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    /// `AF_INET`, or `AF_INET6` for a dual-stack socket connected to an
    /// IPv4-mapped address.
    pub family: u8,
    /// The socket cookie, which the socket programs key their state by.
    pub cookie: u64,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    /// `struct inet_diag_sockid` as the kernel sent it: `SOCK_DESTROY`
    /// wants it back exactly.
    id: [u8; SOCKID_LEN],
}

/// A netlink socket for socket diagnostics in this thread's namespace.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl SockDiag {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        })?;
        // SAFETY: a descriptor just returned and not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    fn send(&mut self, kind: u16, flags: u16, req: &[u8; REQ_LEN]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
        msg.extend(((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(self.seq.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(req);
        // SAFETY: sockaddr_nl zeroed is the kernel as destination.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffer and address valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads messages of request `seq` until it is done; `each` sees every
    /// message's type and payload. An NLMSG_ERROR with an error ends it
    /// with that error.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buffer valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDR_LEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < NLMSG_HDR_LEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message length",
                    ));
                }
                let body = &rest[NLMSG_HDR_LEN..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let err = body
                            .get(0..4)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                        return if err == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-err))
                        };
                    }
                    _ => each(kind, body),
                }
                // A single (non-multipart) answer ends with itself.
                if flags & 0x2 == 0 && kind != NLMSG_ERROR {
                    return Ok(());
                }
            }
        }
    }

    /// Every connected UDP socket of `family` (`AF_INET`, `AF_INET6`) in
    /// this namespace whose peer is an IPv4 address.
    pub fn connected_udp(&mut self, family: u8) -> io::Result<Vec<UdpSocket>> {
        let mut req = [0u8; REQ_LEN];
        req[0] = family;
        req[1] = libc::IPPROTO_UDP as u8;
        req[4..8].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        let mut out = Vec::new();
        self.receive(seq, |kind, body| {
            if kind == SOCK_DIAG_BY_FAMILY
                && let Some(s) = parse_msg(body)
            {
                out.push(s);
            }
        })?;
        Ok(out)
    }

    /// Destroys one socket the dump listed. A socket closed meanwhile is
    /// not an error.
    pub fn destroy(&mut self, s: &UdpSocket) -> io::Result<bool> {
        let mut req = [0u8; REQ_LEN];
        req[0] = s.family;
        req[1] = libc::IPPROTO_UDP as u8;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        req[8..].copy_from_slice(&s.id);
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        match self.receive(seq, |_, _| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// An `inet_diag_msg` whose peer is IPv4 (or IPv4-mapped IPv6).
fn parse_msg(body: &[u8]) -> Option<UdpSocket> {
    if body.len() < MSG_LEN {
        return None;
    }
    let family = body[0];
    let id: [u8; SOCKID_LEN] = body[4..4 + SOCKID_LEN].try_into().ok()?;
    // inet_diag_sockid: sport, dport (big endian), src[4], dst[4] (each
    // a 32-bit word in wire order), if, cookie[2].
    let dst_port = u16::from_be_bytes([id[2], id[3]]);
    let dst_words = &id[20..36];
    let dst = if family == libc::AF_INET as u8 {
        Ipv4Addr::new(dst_words[0], dst_words[1], dst_words[2], dst_words[3])
    } else if dst_words[..10] == [0; 10] && dst_words[10..12] == [0xff, 0xff] {
        Ipv4Addr::new(dst_words[12], dst_words[13], dst_words[14], dst_words[15])
    } else {
        return None;
    };
    let lo = u32::from_ne_bytes(id[40..44].try_into().ok()?) as u64;
    let hi = u32::from_ne_bytes(id[44..48].try_into().ok()?) as u64;
    Some(UdpSocket {
        family,
        cookie: lo | (hi << 32),
        dst,
        dst_port,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(family: u8, dst: [u8; 16], dport: u16, cookie: u64) -> Vec<u8> {
        let mut b = vec![family, 1, 0, 0];
        b.extend(40000u16.to_be_bytes());
        b.extend(dport.to_be_bytes());
        b.extend([0u8; 16]);
        b.extend(dst);
        b.extend(0u32.to_ne_bytes());
        b.extend((cookie as u32).to_ne_bytes());
        b.extend(((cookie >> 32) as u32).to_ne_bytes());
        b.extend([0u8; 20]);
        b
    }

    #[test]
    fn parses_ipv4_and_mapped_peers_only() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 244, 1, 5]);
        let s = parse_msg(&msg(libc::AF_INET as u8, v4, 5353, 0x1_0000_0002)).unwrap();
        assert_eq!(
            (s.dst, s.dst_port, s.cookie),
            (Ipv4Addr::new(10, 244, 1, 5), 5353, 0x1_0000_0002)
        );
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[10, 244, 2, 7]);
        let s = parse_msg(&msg(libc::AF_INET6 as u8, mapped, 53, 9)).unwrap();
        assert_eq!(s.dst, Ipv4Addr::new(10, 244, 2, 7));
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        assert!(parse_msg(&msg(libc::AF_INET6 as u8, v6, 53, 9)).is_none());
        assert!(parse_msg(&[0u8; 10]).is_none());
    }
}

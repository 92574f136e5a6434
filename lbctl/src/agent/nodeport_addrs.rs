//! The addresses NodePorts answer on, as kube-proxy's
//! `--nodeport-addresses` chooses them: CIDRs and the keywords `primary`
//! (the node's own addresses: `--node-ip`, else the Node object's
//! InternalIP/ExternalIP), `all` (every address of this machine) and
//! `localhost` (127.0.0.1, for the node's own processes). Unset, it is
//! `primary` (kube-proxy's nftables default), or every address of this
//! machine when there is no primary address (a manifest folder without a
//! Node). Machine addresses are read again as they come and go.

use std::net::Ipv4Addr;

/// One entry of `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    Primary,
    All,
    Localhost,
    Cidr(Ipv4Addr, u8),
}

/// The flag's entries (comma-separated or repeated); IPv6 CIDRs are
/// accepted and left out (IPv4 datapath).
pub fn parse(items: &[String]) -> Result<Vec<Selector>, String> {
    let mut out = Vec::new();
    for item in items.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        match item {
            "" => {}
            "primary" => out.push(Selector::Primary),
            "all" => out.push(Selector::All),
            "localhost" => out.push(Selector::Localhost),
            cidr => {
                let bad = || {
                    format!("--nodeport-addresses {cidr:?}: not a CIDR nor primary, all, localhost")
                };
                let (a, len) = cidr.split_once('/').ok_or_else(bad)?;
                let len: u8 = len.parse().map_err(|_| bad())?;
                match a.parse::<std::net::IpAddr>().map_err(|_| bad())? {
                    std::net::IpAddr::V6(_) => {}
                    std::net::IpAddr::V4(a) if len <= 32 => {
                        let net = u32::from(a) & mask(len);
                        if len == 0 {
                            out.push(Selector::All);
                        } else if Ipv4Addr::from(net).is_loopback() && len >= 8 {
                            out.push(Selector::Localhost);
                        } else {
                            out.push(Selector::Cidr(Ipv4Addr::from(net), len));
                        }
                    }
                    std::net::IpAddr::V4(_) => return Err(bad()),
                }
            }
        }
    }
    Ok(out)
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// The NodePort addresses, in order, without duplicates. `primary`: the
/// node's own addresses; `machine`: every IPv4 address of this machine's
/// interfaces (loopback left out: only `localhost` gives 127.0.0.1).
pub fn resolve(
    selectors: &[Selector],
    primary: &[Ipv4Addr],
    machine: &[Ipv4Addr],
) -> Vec<Ipv4Addr> {
    let machine: Vec<Ipv4Addr> = machine
        .iter()
        .copied()
        .filter(|a| !a.is_loopback())
        .collect();
    let default = [if primary.is_empty() {
        Selector::All
    } else {
        Selector::Primary
    }];
    let selectors = if selectors.is_empty() {
        &default[..]
    } else {
        selectors
    };
    let mut out = Vec::new();
    for s in selectors {
        let add: Vec<Ipv4Addr> = match *s {
            Selector::Primary => primary.to_vec(),
            Selector::All => machine.clone(),
            Selector::Localhost => vec![Ipv4Addr::LOCALHOST],
            Selector::Cidr(net, len) => machine
                .iter()
                .chain(primary)
                .copied()
                .filter(|a| u32::from(*a) & mask(len) == u32::from(net))
                .collect(),
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Every IPv4 address of this network namespace's interfaces.
pub fn machine_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed below; each entry's addr is
    // either null or a sockaddr of its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.sort();
    out.dedup();
    out
}

/// The network namespace cookie of this process's namespace
/// (`SO_NETNS_COOKIE`), the id the socket programs see for the node's own
/// processes.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket we close below; getsockopt writes 8 bytes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_keywords_and_cidrs() {
        let s = parse(&[
            "primary,localhost".into(),
            "10.0.0.0/8, 2001:db8::/32".into(),
        ])
        .unwrap();
        assert_eq!(
            s,
            [
                Selector::Primary,
                Selector::Localhost,
                Selector::Cidr(ip("10.0.0.0"), 8)
            ]
        );
        assert_eq!(parse(&["0.0.0.0/0".into()]).unwrap(), [Selector::All]);
        assert_eq!(
            parse(&["127.0.0.0/8".into()]).unwrap(),
            [Selector::Localhost]
        );
        assert!(parse(&["eth0".into()]).is_err());
    }

    #[test]
    fn resolves_as_kube_proxy() {
        let primary = [ip("172.18.0.2")];
        let machine = [
            ip("127.0.0.1"),
            ip("172.18.0.2"),
            ip("192.168.0.1"),
            ip("10.244.1.1"),
        ];
        // Unset: primary; with no primary address, the machine's.
        assert_eq!(resolve(&[], &primary, &machine), primary);
        assert_eq!(
            resolve(&[], &[], &machine),
            [ip("172.18.0.2"), ip("192.168.0.1"), ip("10.244.1.1")]
        );
        assert_eq!(
            resolve(
                &[Selector::Cidr(ip("192.168.0.0"), 16), Selector::Localhost],
                &primary,
                &machine
            ),
            [ip("192.168.0.1"), ip("127.0.0.1")]
        );
        assert_eq!(resolve(&[Selector::All], &primary, &machine).len(), 3);
    }

    #[test]
    fn reads_this_machine() {
        assert!(
            machine_addresses().contains(&Ipv4Addr::LOCALHOST) || machine_addresses().is_empty()
        );
        assert!(own_netns_cookie().unwrap() > 0);
    }
}

//! The source ports the device path gives flows it SNATs to a backend on
//! another node. They must never be ports the node's own sockets use, or
//! a reply to one would be taken for the other: the range is a flag
//! (`--snat-port-range`, default 61000-65535, above Linux's default
//! ephemeral range 32768-60999), and when it overlaps this network
//! namespace's `ip_local_port_range` the agent adds it to
//! `ip_local_reserved_ports`, so the kernel never picks those ports for a
//! socket of the node.

use std::{fs, io, ops::RangeInclusive, path::Path};

use tracing::info;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `FIRST-LAST`, both within 1024..=65535.
pub fn parse(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("{s:?}: give the SNAT port range as FIRST-LAST (1024-65535)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

/// The reserved-ports list with `range` in it, or None when it is there
/// already. The list is the kernel's: comma-separated ports and ranges.
pub fn with_reserved(list: &str, range: &RangeInclusive<u16>) -> Option<String> {
    let mut covered = vec![false; range.len()];
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
            None => (part.parse::<u16>(), part.parse::<u16>()),
        };
        let (Ok(a), Ok(b)) = (a, b) else { continue };
        for p in a.max(*range.start())..=b.min(*range.end()) {
            covered[(p - range.start()) as usize] = true;
        }
    }
    if covered.iter().all(|c| *c) {
        return None;
    }
    let ours = format!("{}-{}", range.start(), range.end());
    Some(if list.trim().is_empty() {
        ours
    } else {
        format!("{},{ours}", list.trim())
    })
}

/// Keeps the node's own sockets out of `range` (this network namespace).
pub fn reserve(range: &RangeInclusive<u16>) -> io::Result<()> {
    reserve_in(Path::new(PORT_RANGE), Path::new(RESERVED), range)
}

fn reserve_in(port_range: &Path, reserved: &Path, range: &RangeInclusive<u16>) -> io::Result<()> {
    let ephemeral = fs::read_to_string(port_range)?;
    let mut it = ephemeral.split_whitespace().map(|p| p.parse::<u16>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return Err(io::Error::other(format!(
            "{}: unexpected {ephemeral:?}",
            port_range.display()
        )));
    };
    if *range.end() < lo || *range.start() > hi {
        return Ok(()); // outside the ephemeral range: nothing to do
    }
    let list = fs::read_to_string(reserved)?;
    if let Some(new) = with_reserved(&list, range) {
        fs::write(reserved, &new)?;
        info!(
            ephemeral = %format!("{lo}-{hi}"),
            reserved = %new,
            "SNAT ports overlap the node's ephemeral ports: reserved for the datapath"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(parse("61000-65535").unwrap(), 61000..=65535);
        for bad in ["", "61000", "65535-61000", "80-90", "a-b"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn adds_the_range_once() {
        let r = 40000..=40010;
        assert_eq!(with_reserved("", &r).as_deref(), Some("40000-40010"));
        assert_eq!(
            with_reserved("22,8080-8090\n", &r).as_deref(),
            Some("22,8080-8090,40000-40010")
        );
        assert_eq!(with_reserved("39000-41000", &r), None);
        assert_eq!(with_reserved("40000-40005,40006-40010", &r), None);
    }

    #[test]
    fn reserves_only_what_overlaps_the_ephemeral_range() {
        let dir = std::env::temp_dir().join(format!("lbctl-snat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (pr, rs) = (dir.join("range"), dir.join("reserved"));
        fs::write(&pr, "32768\t60999\n").unwrap();
        fs::write(&rs, "\n").unwrap();
        reserve_in(&pr, &rs, &(61000..=65535)).unwrap();
        assert_eq!(fs::read_to_string(&rs).unwrap(), "\n", "outside: untouched");
        reserve_in(&pr, &rs, &(60000..=61000)).unwrap();
        assert_eq!(fs::read_to_string(&rs).unwrap(), "60000-61000");
        fs::remove_dir_all(&dir).unwrap();
    }
}

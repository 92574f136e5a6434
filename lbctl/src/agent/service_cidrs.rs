//! The service CIDRs whose unallocated addresses the datapath drops, as
//! kube-proxy's nftables mode does: given by `--service-cidr`, or the union
//! of the `spec.cidrs` of the cluster's ServiceCIDR objects
//! (networking.k8s.io/v1), as kube-proxy's ServiceCIDR informer collects
//! them. IPv6 CIDRs are left out: the datapath is IPv4.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::config::MAX_SERVICE_CIDRS;

/// An IPv4 CIDR: network address and prefix length.
pub type Cidr = (Ipv4Addr, u8);

/// Where the service CIDRs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceCidrs {
    /// `--service-cidr` (or the manifest folder's allocation CIDR).
    Given(Vec<(Ipv4Addr, u8)>),
    /// The API's ServiceCIDR objects, watched.
    FromApi,
}

/// One IPv4 CIDR, network address masked; `Ok(None)` for an IPv6 one.
pub fn parse(s: &str) -> Result<Option<(Ipv4Addr, u8)>, String> {
    let bad = || format!("{s:?} is not a CIDR");
    let (a, l) = s.trim().split_once('/').ok_or_else(bad)?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    match a.parse::<IpAddr>().map_err(|_| bad())? {
        IpAddr::V6(_) if len <= 128 => Ok(None),
        IpAddr::V4(a) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Some((Ipv4Addr::from_bits(a.to_bits() & mask), len)))
        }
        _ => Err(bad()),
    }
}

/// The IPv4 CIDRs of ServiceCIDR objects' `spec.cidrs`, sorted, without
/// repeats; the unparsable ones are returned apart, for the log (the API
/// server validates them, so none is expected).
pub fn from_objects<'a>(
    cidrs: impl IntoIterator<Item = &'a str>,
) -> (Vec<(Ipv4Addr, u8)>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for c in cidrs {
        match parse(c) {
            Ok(Some(v)) => out.push(v),
            Ok(None) => {}
            Err(e) => bad.push(e),
        }
    }
    out.sort();
    out.dedup();
    (out, bad)
}

/// The datapath's form: (host-order address, length), and those past the
/// datapath's limit, which are not enforced.
pub fn for_datapath(cidrs: &[Cidr]) -> (Vec<(u32, u8)>, &[Cidr]) {
    let n = cidrs.len().min(MAX_SERVICE_CIDRS);
    (
        cidrs[..n].iter().map(|(a, l)| (a.to_bits(), *l)).collect(),
        &cidrs[n..],
    )
}

/// `a.b.c.d/len, ...` for logs and `lbctl status`.
pub fn show(cidrs: impl IntoIterator<Item = (Ipv4Addr, u8)>) -> String {
    let v: Vec<String> = cidrs.into_iter().map(|(a, l)| format!("{a}/{l}")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masks_and_skips_ipv6() {
        assert_eq!(
            parse("10.96.0.1/12"),
            Ok(Some((Ipv4Addr::new(10, 96, 0, 0), 12)))
        );
        assert_eq!(parse("fd00:10:96::/112"), Ok(None));
        assert!(parse("10.96.0.0").is_err());
        assert!(parse("10.96.0.0/33").is_err());
        assert!(parse("fd00::/129").is_err());
    }

    #[test]
    fn union_of_objects_sorted_once_each() {
        let (v, bad) = from_objects([
            "10.96.0.0/12",
            "fd00:10:96::/112",
            "172.30.0.0/16",
            "10.96.0.0/12",
            "nonsense",
        ]);
        assert_eq!(
            v,
            vec![
                (Ipv4Addr::new(10, 96, 0, 0), 12),
                (Ipv4Addr::new(172, 30, 0, 0), 16)
            ]
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(show(v.clone()), "10.96.0.0/12, 172.30.0.0/16");
        let many: Vec<_> = (0..6).map(|i| (Ipv4Addr::new(10, i, 0, 0), 16)).collect();
        let (dp, left) = for_datapath(&many);
        assert_eq!(dp.len(), MAX_SERVICE_CIDRS);
        assert_eq!(left.len(), 6 - MAX_SERVICE_CIDRS);
    }
}

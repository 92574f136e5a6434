//! Maglev lookup tables (Eisenbud et al., NSDI 2016): a backend set of `M`
//! slots (`M` prime) in which each backend holds about `M / N` slots, in
//! proportion to its weight. Built from the backends themselves (address,
//! port, protocol), never from node-local ids, so two agents given the
//! same backends build the same table and pick the same backend for a flow
//! without sharing any state; a backend that leaves takes its own slots
//! with it and moves few of the others'.

use lb_common::{hash, ip4, port};

use super::model::BackendAddr;

pub const DEFAULT_TABLE_SIZE: u32 = lb_common::maps::DEFAULT_MAGLEV_TABLE_SIZE;

/// Table sizes are primes up to the largest `Frontend::count` holds.
pub const MAX_TABLE_SIZE: u32 = 65_521;

const SALT_OFFSET: u32 = 0x6d61_676c;
const SALT_SKIP: u32 = 0x6576_3031;

/// Checks a table size: a prime in `7..=65_521`.
pub fn check_table_size(m: u32) -> Result<u32, String> {
    if !(7..=MAX_TABLE_SIZE).contains(&m) || !is_prime(m) {
        return Err(format!(
            "Maglev table size {m} is not a prime in 7..={MAX_TABLE_SIZE} (for example 251, 1021, 4093, 16381, 65521)"
        ));
    }
    Ok(m)
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// A backend in a table: what it is (its permutation comes from it) and
/// its weight (0: no slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub addr: BackendAddr,
    pub weight: u16,
}

/// The table of size `m` for `backends`: slot -> index into `backends`.
/// Empty when no backend has a weight. Every backend with a weight holds
/// at least one slot when there are no more of them than slots.
///
/// Population as in the paper, with weights: each round every backend
/// earns its weight in credit and takes its next free preferred slot for
/// each full `max weight` of credit, so shares follow the weights and
/// equal weights give the paper's table exactly.
pub fn table(backends: &[Entry], m: u32) -> Vec<u32> {
    let m64 = u64::from(m);
    let live: Vec<(usize, u64, u64, u64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(i, b)| {
            let (a, p, proto) = (ip4(b.addr.addr.octets()), port(b.addr.port), b.addr.proto);
            let offset = u64::from(hash::backend4(SALT_OFFSET, a, p, proto.number())) % m64;
            let skip = u64::from(hash::backend4(SALT_SKIP, a, p, proto.number())) % (m64 - 1) + 1;
            (i, offset, skip, u64::from(b.weight))
        })
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let max_w = live.iter().map(|l| l.3).max().unwrap_or(1);
    const EMPTY: u32 = u32::MAX;
    let mut slots = vec![EMPTY; m as usize];
    // Each backend's next preference (the j of `offset + j * skip`) and
    // its credit.
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u32;
    while filled < m {
        for (k, &(i, offset, skip, w)) in live.iter().enumerate() {
            credit[k] += w;
            while credit[k] >= max_w {
                credit[k] -= max_w;
                // A prime m and 0 < skip < m: the preferences run through
                // every slot, so a free one is found.
                let mut c = (offset + next[k] * skip) % m64;
                while slots[c as usize] != EMPTY {
                    next[k] += 1;
                    c = (offset + next[k] * skip) % m64;
                }
                slots[c as usize] = i as u32;
                next[k] += 1;
                filled += 1;
                if filled == m {
                    return slots;
                }
            }
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::agent::model::Proto;

    fn be(i: u32, weight: u16) -> Entry {
        Entry {
            addr: BackendAddr {
                addr: Ipv4Addr::from(0x0af4_0000 + i),
                port: 8080,
                proto: Proto::Tcp,
            },
            weight,
        }
    }

    fn shares(t: &[u32], n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        for i in t {
            s[*i as usize] += 1;
        }
        s
    }

    #[test]
    fn table_sizes_are_primes_in_range() {
        for m in [7, 251, 1021, 4093, 16_381, 65_521] {
            assert_eq!(check_table_size(m), Ok(m));
        }
        for m in [0, 1, 4, 1000, 16_384, 65_537, 131_071] {
            assert!(check_table_size(m).is_err(), "{m}");
        }
    }

    /// Equal weights: every backend holds M/N slots, give or take one per
    /// round's remainder (the paper's table is balanced to within 1%).
    #[test]
    fn equal_weights_split_evenly() {
        for n in [1u32, 3, 10, 100] {
            let bs: Vec<Entry> = (0..n).map(|i| be(i, 100)).collect();
            let t = table(&bs, 16_381);
            assert_eq!(t.len(), 16_381);
            let fair = 16_381 / n as usize;
            for s in shares(&t, n as usize) {
                assert!(s.abs_diff(fair) <= 1, "n={n}: {s} vs {fair}");
            }
        }
    }

    /// Two agents with the same backends in any order of ids build the
    /// same table of backends (the input order is the agent's sorted
    /// order, the same everywhere; the permutations come from the
    /// backends, so reversing it only renames the indexes).
    #[test]
    fn the_table_depends_on_the_backends_only() {
        let bs: Vec<Entry> = (0..7).map(|i| be(i, 100)).collect();
        let a = table(&bs, 1021);
        assert_eq!(a, table(&bs, 1021));
        let rev: Vec<Entry> = bs.iter().rev().copied().collect();
        let b: Vec<Entry> = table(&rev, 1021).iter().map(|i| rev[*i as usize]).collect();
        let a: Vec<Entry> = a.iter().map(|i| bs[*i as usize]).collect();
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Ties in a round are taken in input order, so a few slots differ.
        assert!(same * 100 >= a.len() * 95, "{same} of {}", a.len());
    }

    /// Removing one of N backends moves its own slots and few others: the
    /// paper's minimal disruption.
    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [5u32, 10, 50] {
            let bs: Vec<Entry> = (0..n).map(|i| be(i, 100)).collect();
            let before: Vec<Entry> = table(&bs, 16_381).iter().map(|i| bs[*i as usize]).collect();
            let gone = bs[n as usize / 2];
            let rest: Vec<Entry> = bs.iter().filter(|b| **b != gone).copied().collect();
            let after: Vec<Entry> = table(&rest, 16_381)
                .iter()
                .map(|i| rest[*i as usize])
                .collect();
            let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
            let own = before.iter().filter(|b| **b == gone).count();
            // All of its own slots move; of the others, under 2% of the
            // table (the paper measures about 1%).
            assert!(moved >= own);
            assert!(
                (moved - own) * 50 < before.len(),
                "n={n}: {moved} moved, {own} its own"
            );
        }
    }

    #[test]
    fn weights_set_the_shares_and_zero_drains() {
        let bs = [be(0, 100), be(1, 200), be(2, 0), be(3, 100)];
        let t = table(&bs, 16_381);
        let s = shares(&t, 4);
        assert_eq!(s[2], 0, "{s:?}");
        let unit = 16_381.0 / 4.0;
        for (i, w) in [(0, 1.0), (1, 2.0), (3, 1.0)] {
            let want = unit * w;
            assert!(
                (s[i] as f64 - want).abs() < want * 0.01,
                "{i}: {} vs {want}",
                s[i]
            );
        }
        assert!(table(&[be(0, 0)], 251).is_empty());
        // A tiny weight next to a big one still gets its share.
        let t = table(&[be(0, 1), be(1, 1000)], 16_381);
        let s = shares(&t, 2);
        assert!((15..=17).contains(&s[0]), "{s:?}");
    }
}

//! The flow table (`LB4_CT_V2`, `lb_common::conntrack::Ct4Set`) from user
//! space: made (its parameters written) before any program runs on it,
//! read whole for `lbctl`, and written by flow for the tests, the probe and
//! the carrying over of flows into a new table.
//!
//! Writes here are not coordinated with the programs' (a way written by
//! both at once is torn and its check no longer matches: it counts as
//! empty); the agent writes only into a table no program uses yet.

use std::{borrow::Borrow, io, os::fd::AsFd};

use aya::maps::MapData;
use lb_common::conntrack::{
    CT_WAYS, Ct4Entry, Ct4Key, Ct4Params, Ct4Set, ct_check, ct_meta, ct_occupied, ct_set_index,
    ct_sets, ct_victim_rank,
};

/// The flow table behind a map's descriptor (owned or borrowed).
pub struct FlowTable<T: Borrow<MapData>> {
    map: T,
    params: Ct4Params,
}

impl<T: Borrow<MapData>> std::fmt::Debug for FlowTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl<T: Borrow<MapData>> FlowTable<T> {
    /// The table as it is (parameters zero: not made yet, holds no flow).
    pub fn open(map: T) -> io::Result<Self> {
        let mut t = FlowTable {
            map,
            params: Ct4Params::default(),
        };
        t.params = Ct4Params::of(&t.read(0)?);
        Ok(t)
    }

    /// The table, made if it was not: a random seed and as many sets as the
    /// map holds. Call before any program can run on the map.
    pub fn make(map: T) -> io::Result<Self> {
        let mut t = Self::open(map)?;
        if t.params.sets == 0 {
            let len = t
                .map
                .borrow()
                .info()
                .map_err(io::Error::other)?
                .max_entries();
            let params = Ct4Params {
                seed: random_u32()?,
                sets: ct_sets(len),
            };
            if params.sets == 0 {
                return Err(io::Error::other("the flow table has no room for a set"));
            }
            t.write(0, &params.head())?;
            t.params = params;
        }
        Ok(t)
    }

    pub fn params(&self) -> Ct4Params {
        self.params
    }

    fn read(&self, index: u32) -> io::Result<Ct4Set> {
        let mut set = Ct4Set::default();
        elem(
            super::migrate::BPF_MAP_LOOKUP_ELEM,
            self.map.borrow(),
            index,
            (&mut set as *mut Ct4Set).cast(),
        )?;
        Ok(set)
    }

    fn write(&self, index: u32, set: &Ct4Set) -> io::Result<()> {
        elem(
            super::migrate::BPF_MAP_UPDATE_ELEM,
            self.map.borrow(),
            index,
            (set as *const Ct4Set).cast_mut().cast(),
        )
    }

    fn set_of(&self, k: &Ct4Key) -> io::Result<(u32, Ct4Set)> {
        if self.params.sets == 0 {
            return Err(io::Error::other("the flow table is not made yet"));
        }
        let i = ct_set_index(k, self.params);
        Ok((i, self.read(i)?))
    }

    /// `k`'s entry, live or not.
    pub fn get(&self, k: &Ct4Key) -> io::Result<Option<Ct4Entry>> {
        if self.params.sets == 0 {
            return Ok(None);
        }
        let (_, set) = self.set_of(k)?;
        Ok(way_of(&set, k).map(|w| set.entries[w]))
    }

    /// Writes `k`'s entry as the programs do: over its way if it has one,
    /// else over the way with the least to lose at the entry's last-seen
    /// time (which may hold another flow: a full set).
    pub fn insert(&self, k: &Ct4Key, e: &Ct4Entry) -> io::Result<()> {
        let (i, mut set) = self.set_of(k)?;
        let w = way_of(&set, k).unwrap_or_else(|| victim(&set, e.last_seen_s));
        set.keys[w] = *k;
        set.entries[w] = *e;
        set.meta[w] = ct_meta(e);
        set.check[w] = ct_check(k, e);
        self.write(i, &set)
    }

    /// Empties `k`'s way; whether it had one.
    pub fn remove(&self, k: &Ct4Key) -> io::Result<bool> {
        let (i, mut set) = self.set_of(k)?;
        let Some(w) = way_of(&set, k) else {
            return Ok(false);
        };
        set.keys[w] = Ct4Key::default();
        set.entries[w] = Ct4Entry::default();
        set.meta[w] = 0;
        set.check[w] = 0;
        self.write(i, &set).map(|()| true)
    }

    /// Every flow the table holds, live or expired, in set order.
    pub fn entries(&self) -> io::Result<Vec<(Ct4Key, Ct4Entry)>> {
        if self.params.sets == 0 {
            return Ok(Vec::new());
        }
        let sets: Vec<(u32, Ct4Set)> =
            super::batch::lookup_all(self.map.borrow().fd().as_fd(), 1024)?;
        Ok(sets
            .iter()
            .filter(|(i, _)| *i != 0)
            .flat_map(|(_, s)| {
                (0..CT_WAYS)
                    .filter(|&w| holds(s, w))
                    .map(|w| (s.keys[w], s.entries[w]))
            })
            .collect())
    }
}

/// Whether way `w` of `set` holds a flow (occupied, check matching).
fn holds(set: &Ct4Set, w: usize) -> bool {
    ct_occupied(&set.entries[w]) && set.check[w] == ct_check(&set.keys[w], &set.entries[w])
}

/// The way holding `k`, as the programs find it.
fn way_of(set: &Ct4Set, k: &Ct4Key) -> Option<usize> {
    (0..CT_WAYS).find(|&w| set.keys[w] == *k && holds(set, w))
}

/// The way a new flow takes at `now`, as the programs choose it.
fn victim(set: &Ct4Set, now: u32) -> usize {
    (0..CT_WAYS)
        .min_by_key(|&w| ct_victim_rank(set.meta[w], now))
        .unwrap_or(0)
}

/// Makes the flow table pinned at `path` if it is not made yet.
pub fn make_pinned(path: &std::path::Path) -> io::Result<Ct4Params> {
    let data = MapData::from_pin(path).map_err(io::Error::other)?;
    Ok(FlowTable::make(data)?.params())
}

/// Writes `flows` into the table pinned at `to` (made if it is not);
/// returns how many it holds of them afterwards (a smaller table, or a
/// crowded set, keeps those with the most to lose).
pub fn carry(flows: &[(Ct4Key, Ct4Entry)], to: &std::path::Path) -> io::Result<usize> {
    let table = FlowTable::make(MapData::from_pin(to).map_err(io::Error::other)?)?;
    // Oldest first: a crowded set keeps the most recent.
    let mut flows = flows.to_vec();
    flows.sort_by_key(|(_, e)| e.last_seen_s);
    for (k, e) in &flows {
        table.insert(k, e)?;
    }
    let mut kept = 0;
    for (k, _) in &flows {
        kept += usize::from(table.get(k)?.is_some());
    }
    Ok(kept)
}

/// The flows of the table pinned at `path`.
pub fn read_pinned(path: &std::path::Path) -> io::Result<Vec<(Ct4Key, Ct4Entry)>> {
    FlowTable::open(MapData::from_pin(path).map_err(io::Error::other)?)?.entries()
}

/// The data of the flow table map `map` (an array).
pub fn data_of(map: &aya::maps::Map) -> io::Result<&MapData> {
    match map {
        aya::maps::Map::Array(d) => Ok(d),
        _ => Err(io::Error::other("the flow table is not an array map")),
    }
}

fn random_u32() -> io::Result<u32> {
    let mut b = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}

/// A lookup or update of the set at `index`.
fn elem(cmd: libc::c_long, map: &MapData, index: u32, value: *mut u8) -> io::Result<()> {
    super::migrate::map_elem(cmd, map.fd().as_fd(), Some(&index.to_ne_bytes()), value, 0)
}

#[cfg(test)]
mod tests {
    use lb_common::conntrack::{CT_SEEN_REPLY, ct_table_len};

    use super::*;

    fn entry(last_seen_s: u32, lifetime_s: u32, flags: u8) -> Ct4Entry {
        Ct4Entry {
            last_seen_s,
            lifetime_s,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn a_full_set_gives_up_expired_then_unanswered_then_oldest() {
        let with = |entries: [Ct4Entry; CT_WAYS]| Ct4Set {
            meta: entries.map(|e| ct_meta(&e)),
            entries,
            ..Default::default()
        };
        let mut ways = [
            entry(1000, 60, CT_SEEN_REPLY),
            entry(990, 60, CT_SEEN_REPLY),
            entry(995, 60, 0),
            entry(999, 60, 0),
        ];
        assert_eq!(victim(&with(ways), 1000), 2, "the older of the unanswered");
        ways[3] = entry(910, 60, CT_SEEN_REPLY);
        assert_eq!(victim(&with(ways), 1000), 3, "expired first");
        ways[0] = Ct4Entry::default();
        assert_eq!(victim(&with(ways), 1000), 0, "an empty way first");
        let mut ways = [entry(1000, 3600, CT_SEEN_REPLY); CT_WAYS];
        ways[1].last_seen_s = 950;
        assert_eq!(
            victim(&with(ways), 1000),
            1,
            "the least recent answered flow last"
        );
        ways[2].lifetime_s = 10;
        assert_eq!(victim(&with(ways), 1000), 2, "a closing flow before");
    }

    #[test]
    fn a_way_counts_only_with_its_check() {
        let k = Ct4Key {
            src_addr: 1,
            dst_addr: 2,
            src_port: 3,
            dst_port: 4,
            proto: 6,
            ..Default::default()
        };
        let e = entry(5, 60, 0);
        let mut set = Ct4Set::default();
        set.keys[2] = k;
        set.entries[2] = e;
        assert_eq!(way_of(&set, &k), None, "no check: being written");
        set.check[2] = ct_check(&k, &e);
        assert_eq!(way_of(&set, &k), Some(2));
        set.entries[2].nat_dst_addr = 9;
        assert_eq!(way_of(&set, &k), None, "torn: another flow's rewrite");
        set.entries[2] = e;
        set.entries[2].packets = 7;
        set.entries[2].flags = CT_SEEN_REPLY;
        assert_eq!(
            way_of(&set, &k),
            Some(2),
            "counters and flags change in place"
        );
    }

    #[test]
    fn keys_spread_over_every_set() {
        let p = Ct4Params {
            seed: 0x1234_5678,
            sets: ct_sets(ct_table_len(1 << 16)),
        };
        assert_eq!(p.sets, 1 << 14);
        let key = |src: u32, sport: u32, dir: u8| Ct4Key {
            src_addr: src,
            dst_addr: 0xc0a8_0001,
            src_port: sport as u16,
            dst_port: 80,
            proto: 6,
            dir,
            _pad: 0,
        };
        // Many clients with a few ports each; one client with many ports
        // (only the port's 16 bits differ), both directions.
        let families: [Vec<Ct4Key>; 2] = [
            (0..(1u32 << 16))
                .map(|i| key(0x0a00_0000 + (i >> 8), 1024 + (i & 0xff), 0))
                .collect(),
            (0..(1u32 << 15))
                .flat_map(|i| {
                    [
                        key(0x0a00_0001, 20000 + i, 0),
                        key(0x0a00_0001, 20000 + i, 1),
                    ]
                })
                .collect(),
        ];
        for keys in families {
            let mut count = vec![0u32; p.sets as usize + 1];
            for k in &keys {
                let s = ct_set_index(k, p);
                assert!((1..=p.sets).contains(&s));
                count[s as usize] += 1;
            }
            // 4 a set on average: a fair hash leaves about e^-4 of the
            // sets empty (300 of 16,384, as balls in bins) and none past 16.
            let empty = count[1..].iter().filter(|c| **c == 0).count();
            let most = count.iter().max().copied().unwrap_or(0);
            assert!((200..420).contains(&empty), "{empty} empty sets");
            assert!(most <= 16, "a set of {most} keys");
            assert_eq!(count[0], 0, "index 0 holds the parameters");
        }
    }
}

//! What the maps hold, kept as a difference from the target: for each key
//! the target changed since the maps last took it, the value the maps hold
//! (`Before`). Outside those keys the maps equal the target, so the
//! reconciler holds the map contents once, not twice (the second copy was
//! about a fifth of the agent's memory at 10,000 Services), and the keys a
//! flush must compare are exactly the keys kept here.

use std::{
    collections::BTreeMap,
    ops::{Bound, RangeBounds},
};

use lb_common::service::{
    Backend4, Frontend, Frontend4Key, Name, ServiceBackendKey, ServiceMeta, SlotChunk, SlotKey,
};

use super::state::{MapState, Op, RangeKey};

/// A key's value in the maps (None: absent). Boxed: the meta values are
/// 100 to 160 bytes and most kept keys are absent from the maps.
pub type Was<V> = Option<Box<V>>;

/// One map's entries where it may differ from the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kept<K, V> {
    /// Outside these keys the map equals the target.
    Keys(BTreeMap<K, Was<V>>),
    /// The map holds exactly these entries, whatever the target: as an
    /// agent finds its maps at start (empty, or what the agent before it
    /// left), until its first flush. Nothing is recorded as the target
    /// changes: recording every key a first sync adds cost a B-tree entry
    /// per map entry (9 MiB of the peak at 10,000 Services), and an
    /// adopted value boxed cost as much again on a restart. A flush's
    /// writes are not recorded here either: a flush that fails part way
    /// has the maps read again (`Reconciler::flush`).
    Whole(BTreeMap<K, V>),
}

impl<K, V> Default for Kept<K, V> {
    /// The map equals the target.
    fn default() -> Self {
        Self::Keys(BTreeMap::new())
    }
}

impl<K: Ord + Copy, V: Copy> Kept<K, V> {
    /// The map's keys after `after` where it may differ from the target,
    /// in order, with the map's value and the target's at each (a whole
    /// map's come from merging the two in order, with no lookup).
    pub fn pending<'a>(
        &'a self,
        want: &'a BTreeMap<K, V>,
        after: Bound<K>,
    ) -> impl Iterator<Item = (&'a K, Option<&'a V>, Option<&'a V>)> + 'a {
        let range = (after, Bound::Unbounded);
        let (kept, whole) = match self {
            Self::Keys(m) => (Some(m.range(range)), None),
            Self::Whole(m) => (None, Some((m.range(range), want.range(range)))),
        };
        let kept = kept
            .into_iter()
            .flatten()
            .map(|(k, w)| (k, w.as_deref(), want.get(k)));
        // The keys of the map and of the target, merged.
        let whole = whole.into_iter().flat_map(|(held, target)| {
            let (mut held, mut target) = (held.peekable(), target.peekable());
            std::iter::from_fn(move || match (held.peek(), target.peek()) {
                (Some((h, _)), Some((t, _))) if t < h => {
                    let (k, v) = target.next()?;
                    Some((k, None, Some(v)))
                }
                (Some((h, _)), Some((t, _))) if t == h => {
                    let (_, v) = target.next()?;
                    let (k, was) = held.next()?;
                    Some((k, Some(was), Some(v)))
                }
                (Some(_), _) => {
                    let (k, was) = held.next()?;
                    Some((k, Some(was), None))
                }
                (None, _) => {
                    let (k, v) = target.next()?;
                    Some((k, None, Some(v)))
                }
            })
        });
        kept.chain(whole)
    }

    /// The keys, recorded (a whole map's become the keys of it and of the
    /// target, each with the map's value).
    pub fn keys_mut(&mut self, want: &BTreeMap<K, V>) -> &mut BTreeMap<K, Was<V>> {
        if let Self::Whole(m) = self {
            let keys: BTreeMap<K, Was<V>> = m
                .keys()
                .chain(want.keys())
                .map(|k| (*k, m.get(k).map(|v| Box::new(*v))))
                .collect();
            *self = Self::Keys(keys);
        }
        match self {
            Self::Keys(m) => m,
            Self::Whole(_) => unreachable!("made Keys above"),
        }
    }

    fn landed(&mut self, k: &K) {
        if let Self::Keys(m) = self {
            m.remove(k);
        }
    }

    fn is_whole(&self) -> bool {
        matches!(self, Self::Whole(_))
    }
}

/// The maps' value of every key where they may differ from the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Before {
    pub addrs: Kept<u32, u32>,
    pub frontends: Kept<Frontend4Key, Frontend>,
    pub slots: Kept<SlotKey, SlotChunk>,
    pub svc_backends: Kept<ServiceBackendKey, u32>,
    pub source_ranges: Kept<RangeKey, u32>,
    pub backends: Kept<u32, Backend4>,
    pub service_meta: Kept<u32, ServiceMeta>,
    pub names: Kept<u32, Name>,
}

fn was_of<K: Ord + Copy, V: Copy>(
    cur: &BTreeMap<K, V>,
    keys: impl IntoIterator<Item = K>,
) -> Kept<K, V> {
    Kept::Keys(
        keys.into_iter()
            .map(|k| (k, cur.get(&k).map(|v| Box::new(*v))))
            .collect(),
    )
}

impl Before {
    /// The maps hold `cur` and the target is `want`: every key of either
    /// is compared (a diff of two whole states).
    pub fn of(cur: &MapState, want: &MapState) -> Self {
        macro_rules! keys {
            ($f:ident) => {
                was_of(
                    &cur.$f,
                    cur.$f
                        .keys()
                        .chain(want.$f.keys())
                        .copied()
                        .collect::<Vec<_>>(),
                )
            };
        }
        Self {
            addrs: keys!(addrs),
            frontends: keys!(frontends),
            slots: keys!(slots),
            svc_backends: keys!(svc_backends),
            source_ranges: keys!(source_ranges),
            backends: keys!(backends),
            service_meta: keys!(service_meta),
            names: keys!(names),
        }
    }

    /// The maps hold `cur`, whatever the target (an agent adopting its
    /// maps at start).
    pub fn all(cur: MapState) -> Self {
        Self {
            addrs: Kept::Whole(cur.addrs),
            frontends: Kept::Whole(cur.frontends),
            slots: Kept::Whole(cur.slots),
            svc_backends: Kept::Whole(cur.svc_backends),
            source_ranges: Kept::Whole(cur.source_ranges),
            backends: Kept::Whole(cur.backends),
            service_meta: Kept::Whole(cur.service_meta),
            names: Kept::Whole(cur.names),
        }
    }

    /// Whether some map is known whole (see [`Kept::Whole`]): which keys
    /// a failed flush left in it is then not recorded.
    pub fn has_whole_map(&self) -> bool {
        self.addrs.is_whole()
            || self.frontends.is_whole()
            || self.slots.is_whole()
            || self.svc_backends.is_whole()
            || self.source_ranges.is_whole()
            || self.backends.is_whole()
            || self.service_meta.is_whole()
            || self.names.is_whole()
    }

    /// `op` landed: the maps hold the target's value at its key (a flush
    /// diffs and writes without the target changing in between).
    pub fn landed(&mut self, op: &Op) {
        match op {
            Op::PutBackend(k, ..) | Op::DelBackend(k) => self.backends.landed(k),
            Op::PutName(k, _) | Op::DelName(k) => self.names.landed(k),
            Op::PutServiceMeta(k, ..) | Op::DelServiceMeta(k) => self.service_meta.landed(k),
            Op::PutSlot(k, _) | Op::DelSlot(k) => self.slots.landed(k),
            Op::PutServiceBackend(k, _) | Op::DelServiceBackend(k) => self.svc_backends.landed(k),
            Op::PutSourceRange(k, _) | Op::DelSourceRange(k) => self.source_ranges.landed(k),
            Op::PutAddr(k, _) | Op::DelAddr(k) => self.addrs.landed(k),
            Op::PutFrontend(k, _) | Op::DelFrontend(k) => self.frontends.landed(k),
            // Written beside the phases (`Reconciler::write_ports`).
            Op::PutPorts(..) => {}
        }
    }
}

/// Sets `k` to `v` in the target `want`, first keeping the maps' value in
/// `before` unless it is kept already. Returns whether the target changed.
pub fn set<K: Ord + Copy, V: Copy + PartialEq>(
    want: &mut BTreeMap<K, V>,
    before: &mut Kept<K, V>,
    k: K,
    v: Option<V>,
) -> bool {
    use std::collections::btree_map::Entry;
    // One search of the target (a full sync sets hundreds of thousands of
    // keys): the entry is compared, kept and changed in place.
    let keep = |before: &mut Kept<K, V>, was: Option<V>| {
        if let Kept::Keys(m) = before {
            m.entry(k).or_insert_with(|| was.map(Box::new));
        }
    };
    match (want.entry(k), v) {
        (Entry::Occupied(o), Some(v)) if *o.get() == v => false,
        (Entry::Vacant(_), None) => false,
        (Entry::Occupied(mut o), Some(v)) => {
            keep(before, Some(*o.get()));
            o.insert(v);
            true
        }
        (Entry::Occupied(o), None) => {
            keep(before, Some(*o.get()));
            o.remove();
            true
        }
        (Entry::Vacant(e), Some(v)) => {
            keep(before, None);
            e.insert(v);
            true
        }
    }
}

/// The maps' value at `k`.
pub fn written<'a, K: Ord, V>(
    want: &'a BTreeMap<K, V>,
    before: &'a Kept<K, V>,
    k: &K,
) -> Option<&'a V> {
    match before {
        Kept::Whole(m) => m.get(k),
        Kept::Keys(m) => match m.get(k) {
            Some(w) => w.as_deref(),
            None => want.get(k),
        },
    }
}

/// How many entries one map holds.
pub fn written_len<K: Ord, V>(want: &BTreeMap<K, V>, before: &Kept<K, V>) -> usize {
    let m = match before {
        Kept::Whole(m) => return m.len(),
        Kept::Keys(m) => m,
    };
    let mut n = want.len();
    for (k, w) in m {
        n += usize::from(w.is_some());
        n -= usize::from(want.contains_key(k));
    }
    n
}

/// The entries one map holds in `range` (a copy).
pub fn written_range<K: Ord + Copy, V: Copy>(
    want: &BTreeMap<K, V>,
    before: &Kept<K, V>,
    range: impl RangeBounds<K> + Clone,
) -> BTreeMap<K, V> {
    let kept = match before {
        Kept::Whole(m) => return m.range(range).map(|(k, v)| (*k, *v)).collect(),
        Kept::Keys(m) => m,
    };
    let mut m: BTreeMap<K, V> = want.range(range.clone()).map(|(k, v)| (*k, *v)).collect();
    for (k, w) in kept.range(range) {
        match w {
            Some(v) => drop(m.insert(*k, **v)),
            None => drop(m.remove(k)),
        }
    }
    m
}

/// One map's contents, whole (a copy).
pub fn overlay<K: Ord + Copy, V: Copy>(
    want: &BTreeMap<K, V>,
    before: &Kept<K, V>,
) -> BTreeMap<K, V> {
    written_range(want, before, ..)
}

/// The maps' contents, whole: a copy, for `lbctl diff`, the allocator's
/// seed at start and tests.
pub fn materialize(want: &MapState, before: &Before) -> MapState {
    MapState {
        addrs: overlay(&want.addrs, &before.addrs),
        frontends: overlay(&want.frontends, &before.frontends),
        slots: overlay(&want.slots, &before.slots),
        svc_backends: overlay(&want.svc_backends, &before.svc_backends),
        source_ranges: overlay(&want.source_ranges, &before.source_ranges),
        backends: overlay(&want.backends, &before.backends),
        service_meta: overlay(&want.service_meta, &before.service_meta),
        names: overlay(&want.names, &before.names),
        // Kept beside the phases (`port_map`): the target's, as written.
        ports: want.ports.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_are_the_target_overlaid_with_what_was_before() {
        let mut want = MapState::default();
        let mut before = Before::default();
        assert!(set(&mut want.addrs, &mut before.addrs, 1, Some(7)));
        assert!(!set(&mut want.addrs, &mut before.addrs, 1, Some(7)));
        assert_eq!(
            before.addrs,
            Kept::Keys([(1, None)].into()),
            "absent from the maps"
        );
        assert_eq!(written(&want.addrs, &before.addrs, &1), None);
        assert_eq!(written_len(&want.addrs, &before.addrs), 0);
        before.landed(&Op::PutAddr(1, 7));
        assert_eq!(written(&want.addrs, &before.addrs, &1), Some(&7));
        // Changed twice before a flush: the maps' value is the first one.
        assert!(set(&mut want.addrs, &mut before.addrs, 1, Some(8)));
        assert!(set(&mut want.addrs, &mut before.addrs, 1, None));
        assert_eq!(before.addrs, Kept::Keys([(1, Some(Box::new(7)))].into()));
        assert_eq!(written_len(&want.addrs, &before.addrs), 1);
        assert_eq!(materialize(&want, &before).addrs.get(&1), Some(&7));
    }

    #[test]
    fn a_whole_map_records_nothing_and_owes_what_differs() {
        let mut want = MapState::default();
        let mut before = Before::all(MapState::default());
        assert!(before.has_whole_map());
        for k in 0..100 {
            assert!(set(&mut want.addrs, &mut before.addrs, k, Some(k)));
        }
        assert_eq!(
            before.addrs,
            Kept::Whole(BTreeMap::new()),
            "nothing recorded"
        );
        assert_eq!(written(&want.addrs, &before.addrs, &7), None);
        assert_eq!(written_len(&want.addrs, &before.addrs), 0);
        let owed: Vec<u32> = before
            .addrs
            .pending(&want.addrs, Bound::Excluded(95))
            .map(|(k, was, target)| {
                assert_eq!((was, target), (None, Some(k)));
                *k
            })
            .collect();
        assert_eq!(owed, [96, 97, 98, 99]);
        // Recorded from here on: every target key, absent from the map.
        before.addrs.keys_mut(&want.addrs);
        assert_eq!(written_len(&want.addrs, &before.addrs), 0);
        before.landed(&Op::PutAddr(7, 7));
        assert_eq!(written(&want.addrs, &before.addrs, &7), Some(&7));
        assert_eq!(written_len(&want.addrs, &before.addrs), 1);
    }

    #[test]
    fn a_whole_map_merges_its_keys_with_the_target() {
        let cur = MapState {
            addrs: [(1, 1), (5, 5), (9, 9)].into(),
            ..Default::default()
        };
        let mut before = Before::all(cur.clone());
        let mut want = MapState::default();
        for (k, v) in [(1, 1), (3, 3), (9, 10)] {
            set(&mut want.addrs, &mut before.addrs, k, Some(v));
        }
        let pending: Vec<(u32, Option<u32>, Option<u32>)> = before
            .addrs
            .pending(&want.addrs, Bound::Unbounded)
            .map(|(k, v, t)| (*k, v.copied(), t.copied()))
            .collect();
        assert_eq!(
            pending,
            [
                (1, Some(1), Some(1)),
                (3, None, Some(3)),
                (5, Some(5), None),
                (9, Some(9), Some(10))
            ]
        );
        assert_eq!(materialize(&want, &before), cur);
        assert_eq!(written_len(&want.addrs, &before.addrs), 3);
        let ops = super::super::plan::diff_before(&before, &want);
        assert_eq!(ops, [Op::PutAddr(3, 3), Op::PutAddr(9, 10), Op::DelAddr(5)]);
        assert_eq!(ops, super::super::plan::diff(&cur, &want));
        // As recorded keys, the same.
        before.addrs.keys_mut(&want.addrs);
        assert_eq!(materialize(&want, &before), cur);
        assert_eq!(super::super::plan::diff_before(&before, &want), ops);
    }
}

//! What the maps hold, kept as a difference from the target: for each key
//! the target changed since the maps last took it, the value the maps hold
//! (`Before`). Outside those keys the maps equal the target, so the
//! reconciler holds the map contents once, not twice (the second copy was
//! about a fifth of the agent's memory at 10,000 Services), and the keys a
//! flush must compare are exactly the keys kept here.

use std::collections::BTreeMap;

use lb_common::service::{
    Backend4, Frontend, Frontend4Key, Name, ServiceBackendKey, ServiceMeta, SlotKey,
};

use super::state::{MapState, Op, RangeKey};

/// A key's value in the maps (None: absent). Boxed: on a first sync every
/// one is None, and the meta values are 100 to 160 bytes.
pub type Was<V> = Option<Box<V>>;

/// The maps' value of every key where they may differ from the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Before {
    pub addrs: BTreeMap<u32, Was<u32>>,
    pub frontends: BTreeMap<Frontend4Key, Was<Frontend>>,
    pub slots: BTreeMap<SlotKey, Was<u32>>,
    pub svc_backends: BTreeMap<ServiceBackendKey, Was<u32>>,
    pub source_ranges: BTreeMap<RangeKey, Was<u32>>,
    pub backends: BTreeMap<u32, Was<Backend4>>,
    pub service_meta: BTreeMap<u32, Was<ServiceMeta>>,
    pub names: BTreeMap<u32, Was<Name>>,
}

fn was_of<K: Ord + Copy, V: Copy>(
    cur: &BTreeMap<K, V>,
    keys: impl IntoIterator<Item = K>,
) -> BTreeMap<K, Was<V>> {
    keys.into_iter()
        .map(|k| (k, cur.get(&k).map(|v| Box::new(*v))))
        .collect()
}

fn all_of<K: Ord, V>(cur: BTreeMap<K, V>) -> BTreeMap<K, Was<V>> {
    cur.into_iter()
        .map(|(k, v)| (k, Some(Box::new(v))))
        .collect()
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

    /// The maps hold `cur` and the target is empty (an agent adopting
    /// pinned maps).
    pub fn all(cur: MapState) -> Self {
        Self {
            addrs: all_of(cur.addrs),
            frontends: all_of(cur.frontends),
            slots: all_of(cur.slots),
            svc_backends: all_of(cur.svc_backends),
            source_ranges: all_of(cur.source_ranges),
            backends: all_of(cur.backends),
            service_meta: all_of(cur.service_meta),
            names: all_of(cur.names),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
            && self.frontends.is_empty()
            && self.slots.is_empty()
            && self.svc_backends.is_empty()
            && self.source_ranges.is_empty()
            && self.backends.is_empty()
            && self.service_meta.is_empty()
            && self.names.is_empty()
    }

    /// `op` landed: the maps hold the target's value at its key (a flush
    /// diffs and writes without the target changing in between).
    pub fn landed(&mut self, op: &Op) {
        match op {
            Op::PutBackend(k, ..) | Op::DelBackend(k) => drop(self.backends.remove(k)),
            Op::PutName(k, _) | Op::DelName(k) => drop(self.names.remove(k)),
            Op::PutServiceMeta(k, ..) | Op::DelServiceMeta(k) => drop(self.service_meta.remove(k)),
            Op::PutSlot(k, _) | Op::DelSlot(k) => drop(self.slots.remove(k)),
            Op::PutServiceBackend(k, _) | Op::DelServiceBackend(k) => {
                drop(self.svc_backends.remove(k))
            }
            Op::PutSourceRange(k, _) | Op::DelSourceRange(k) => drop(self.source_ranges.remove(k)),
            Op::PutAddr(k, _) | Op::DelAddr(k) => drop(self.addrs.remove(k)),
            Op::PutFrontend(k, _) | Op::DelFrontend(k) => drop(self.frontends.remove(k)),
        }
    }
}

/// Sets `k` to `v` in the target `want`, first keeping the maps' value in
/// `before` unless it is kept already. Returns whether the target changed.
pub fn set<K: Ord + Copy, V: Copy + PartialEq>(
    want: &mut BTreeMap<K, V>,
    before: &mut BTreeMap<K, Was<V>>,
    k: K,
    v: Option<V>,
) -> bool {
    if want.get(&k) == v.as_ref() {
        return false;
    }
    before
        .entry(k)
        .or_insert_with(|| want.get(&k).map(|x| Box::new(*x)));
    match v {
        Some(v) => drop(want.insert(k, v)),
        None => drop(want.remove(&k)),
    }
    true
}

/// The maps' value at `k`.
pub fn written<'a, K: Ord, V>(
    want: &'a BTreeMap<K, V>,
    before: &'a BTreeMap<K, Was<V>>,
    k: &K,
) -> Option<&'a V> {
    match before.get(k) {
        Some(w) => w.as_deref(),
        None => want.get(k),
    }
}

/// How many entries one map holds.
pub fn written_len<K: Ord, V>(want: &BTreeMap<K, V>, before: &BTreeMap<K, Was<V>>) -> usize {
    let mut n = want.len();
    for (k, w) in before {
        n += usize::from(w.is_some());
        n -= usize::from(want.contains_key(k));
    }
    n
}

/// One map's contents, whole (a copy).
pub fn overlay<K: Ord + Copy, V: Copy>(
    want: &BTreeMap<K, V>,
    before: &BTreeMap<K, Was<V>>,
) -> BTreeMap<K, V> {
    let mut m = want.clone();
    for (k, w) in before {
        match w {
            Some(v) => drop(m.insert(*k, **v)),
            None => drop(m.remove(k)),
        }
    }
    m
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
        assert_eq!(before.addrs[&1], None, "absent from the maps");
        assert_eq!(written(&want.addrs, &before.addrs, &1), None);
        assert_eq!(written_len(&want.addrs, &before.addrs), 0);
        before.landed(&Op::PutAddr(1, 7));
        assert_eq!(written(&want.addrs, &before.addrs, &1), Some(&7));
        // Changed twice before a flush: the maps' value is the first one.
        assert!(set(&mut want.addrs, &mut before.addrs, 1, Some(8)));
        assert!(set(&mut want.addrs, &mut before.addrs, 1, None));
        assert_eq!(before.addrs[&1].as_deref(), Some(&7));
        assert_eq!(written_len(&want.addrs, &before.addrs), 1);
        assert_eq!(materialize(&want, &before).addrs.get(&1), Some(&7));
    }
}

//! Node and zone names as the small ids a backend's entry carries
//! (`Backend4::node`, `Backend4::zone`), and when the names map
//! (`LB_NAMES_V1`) needs an entry: one per name some backend of the target
//! uses. The kernel never reads the names; `lbctl` shows them. One entry per
//! node replaced a 104-byte entry per backend.
//!
//! An id, once given, stays with its name while the agent runs (a node whose
//! only backend comes and goes keeps its id), and an agent restarted on its
//! maps takes the ids they hold, so nothing is rewritten.

use std::collections::BTreeMap;

use lb_common::service::{NAME_NODE, NAME_NODE_MAX, NAME_ZONE, NAME_ZONE_MAX, Name};

use super::intern::{Interned, intern};
use super::state::{cstr, fixed};

#[derive(Debug, Default)]
pub struct NameIds {
    /// (kind, name) -> key (`kind | id`).
    keys: BTreeMap<(u32, Interned), u32>,
    /// key -> its name and how many backends of the target carry it.
    names: BTreeMap<u32, (Interned, u32)>,
}

/// What the names map should hold at a key after `acquire` or `release`.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// Unchanged.
    Same,
    Put(Name),
    Delete,
}

impl NameIds {
    /// The ids the maps hold (none carried by a backend of the target yet).
    pub fn adopt(maps: &BTreeMap<u32, Name>) -> Self {
        let mut ids = Self::default();
        for (&key, v) in maps {
            let name = intern(cstr(&v.name));
            ids.keys.insert((key & !0xffff, name.clone()), key);
            ids.names.insert(key, (name, 0));
        }
        ids
    }

    /// The key of `name` (`kind` is `NAME_NODE` or `NAME_ZONE`) for one
    /// more backend, and the names map's entry there. Key 0 when every id
    /// of the kind is in use (the backend then shows no name).
    pub fn acquire(&mut self, kind: u32, name: &Interned) -> (u32, Entry) {
        if let Some(&key) = self.keys.get(&(kind, name.clone())) {
            let e = self.names.get_mut(&key).expect("both indexes");
            e.1 += 1;
            let entry = if e.1 == 1 {
                Entry::Put(value(name))
            } else {
                Entry::Same
            };
            return (key, entry);
        }
        let Some(key) = self.free_key(kind) else {
            return (0, Entry::Same);
        };
        self.keys.insert((kind, name.clone()), key);
        self.names.insert(key, (name.clone(), 1));
        (key, Entry::Put(value(name)))
    }

    /// One backend fewer carries `key`; the entry goes with its last.
    pub fn release(&mut self, key: u32) -> Entry {
        match self.names.get_mut(&key) {
            Some(e) if e.1 > 0 => {
                e.1 -= 1;
                if e.1 == 0 { Entry::Delete } else { Entry::Same }
            }
            _ => Entry::Same,
        }
    }

    /// The lowest id of `kind` no name has; else one of a name no backend
    /// carries now (its entry is already going).
    fn free_key(&mut self, kind: u32) -> Option<u32> {
        let max = if kind == NAME_NODE {
            u32::from(NAME_NODE_MAX)
        } else {
            u32::from(NAME_ZONE_MAX)
        };
        let mut next = kind | 1;
        for &key in self.names.range(kind | 1..=kind | max).map(|(k, _)| k) {
            if key != next {
                break;
            }
            next += 1;
        }
        if next <= kind | max {
            return Some(next);
        }
        let (&key, (name, _)) = self
            .names
            .range(kind | 1..=kind | max)
            .find(|(_, (_, refs))| *refs == 0)?;
        let name = name.clone();
        self.keys.remove(&(kind, name));
        self.names.remove(&key);
        Some(key)
    }
}

fn value(name: &str) -> Name {
    Name { name: fixed(name) }
}

/// The names map key of a backend's node or zone id (0: none).
pub fn node_key(id: u16) -> Option<u32> {
    (id != 0).then_some(NAME_NODE | u32::from(id))
}

pub fn zone_key(id: u8) -> Option<u32> {
    (id != 0).then_some(NAME_ZONE | u32::from(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_id_while_backends_carry_it_and_keeps_it_after() {
        let mut ids = NameIds::default();
        let a = intern("node-a");
        let b = intern("node-b");
        let (ka, e) = ids.acquire(NAME_NODE, &a);
        assert_eq!((ka, e), (NAME_NODE | 1, Entry::Put(value("node-a"))));
        assert_eq!(ids.acquire(NAME_NODE, &a), (ka, Entry::Same));
        let (kb, _) = ids.acquire(NAME_NODE, &b);
        assert_eq!(kb, NAME_NODE | 2);
        // Zones have their own ids.
        assert_eq!(ids.acquire(NAME_ZONE, &a).0, NAME_ZONE | 1);
        assert_eq!(ids.release(ka), Entry::Same);
        assert_eq!(ids.release(ka), Entry::Delete);
        assert_eq!(ids.release(ka), Entry::Same, "no count below zero");
        // Back again: the same id, its entry put again.
        assert_eq!(
            ids.acquire(NAME_NODE, &a),
            (ka, Entry::Put(value("node-a")))
        );

        // Adopted ids stay; a new name takes the lowest free one.
        let maps = BTreeMap::from([
            (NAME_NODE | 2, value("node-b")),
            (NAME_ZONE | 7, value("z")),
        ]);
        let mut ids = NameIds::adopt(&maps);
        assert_eq!(
            ids.acquire(NAME_NODE, &b),
            (NAME_NODE | 2, Entry::Put(value("node-b")))
        );
        assert_eq!(ids.acquire(NAME_NODE, &a).0, NAME_NODE | 1);
        assert_eq!(ids.acquire(NAME_NODE, &intern("node-c")).0, NAME_NODE | 3);
        assert_eq!(ids.acquire(NAME_ZONE, &intern("z")).0, NAME_ZONE | 7);
    }

    #[test]
    fn past_the_last_id_a_name_no_backend_carries_gives_way() {
        let mut ids = NameIds::default();
        for z in 1..=NAME_ZONE_MAX {
            ids.acquire(NAME_ZONE, &intern(&format!("z{z}")));
        }
        assert_eq!(ids.acquire(NAME_ZONE, &intern("more")).0, 0, "all in use");
        assert_eq!(ids.release(NAME_ZONE | 9), Entry::Delete);
        assert_eq!(ids.acquire(NAME_ZONE, &intern("more")).0, NAME_ZONE | 9);
        assert_eq!(node_key(0), None);
        assert_eq!(zone_key(9), Some(NAME_ZONE | 9));
    }
}

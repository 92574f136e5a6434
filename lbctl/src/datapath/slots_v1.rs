//! Backend sets of the first layout (`LB_SLOTS_V1`: (set, slot) -> backend
//! id, one entry per slot) carried into `LB_SLOTS_V2` (16 slots an entry)
//! when an upgraded agent loads its object.
//!
//! The frontends an older agent left pinned name backend sets by id, and
//! the new programs read those sets from `LB_SLOTS_V2` as soon as they are
//! attached, before the agent's first flush: a set missing there would
//! turn every new flow of the Service away until then. So the old entries
//! are converted right after the object is loaded (the new map is pinned,
//! empty) and only then is the old map unpinned. The old programs keep
//! reading the old map until they are replaced; it is freed with them.

use std::{collections::BTreeMap, io, os::fd::AsFd, path::Path};

use lb_common::service::{SlotChunk, SlotKey};

use super::{batch, link};

/// Reads the old map pinned at `path`, if any: its entries as chunks.
pub fn read(path: &Path) -> io::Result<Option<BTreeMap<SlotKey, SlotChunk>>> {
    if !path.exists() {
        return Ok(None);
    }
    let fd = link::open_pinned(path)?;
    let entries: Vec<([u32; 2], u32)> = batch::lookup_all(fd.as_fd(), 8192)?;
    Ok(Some(chunks_of(entries)))
}

/// (set, slot) -> id entries as chunks. A slot past a gap is kept where it
/// was: the slots below `count` are what the datapath reads.
pub fn chunks_of(
    entries: impl IntoIterator<Item = ([u32; 2], u32)>,
) -> BTreeMap<SlotKey, SlotChunk> {
    let mut out: BTreeMap<SlotKey, SlotChunk> = BTreeMap::new();
    for ([set, slot], id) in entries {
        let (k, i) = SlotKey::of_slot(set, slot);
        out.entry(k).or_default().backends[i] = id;
    }
    out
}

/// Writes `chunks` into the new map pinned at `path` (one batch per
/// 8,192 entries); returns how many.
pub fn write(path: &Path, chunks: &BTreeMap<SlotKey, SlotChunk>) -> io::Result<usize> {
    let fd = link::open_pinned(path)?;
    let all: Vec<(&SlotKey, &SlotChunk)> = chunks.iter().collect();
    for part in all.chunks(8192) {
        let keys = batch::pack(part.iter().map(|(k, _)| **k));
        let values = batch::pack(part.iter().map(|(_, v)| **v));
        batch::update(fd.as_fd(), &keys, &values, part.len(), 0).map_err(|s| s.error)?;
    }
    Ok(chunks.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_become_chunks_of_sixteen() {
        let mut entries: Vec<([u32; 2], u32)> = (0..20).map(|s| ([7, s], 100 + s)).collect();
        entries.push(([9, 0], 5));
        let chunks = chunks_of(entries);
        let keys: Vec<(u32, u32)> = chunks.keys().map(|k| (k.backend_set, k.chunk)).collect();
        assert_eq!(keys, [(7, 0), (7, 1), (9, 0)]);
        let first = &chunks[&SlotKey {
            backend_set: 7,
            chunk: 0,
        }];
        assert_eq!(first.backends, core::array::from_fn(|i| 100 + i as u32));
        let second = &chunks[&SlotKey {
            backend_set: 7,
            chunk: 1,
        }];
        assert_eq!(
            second.backends[..5],
            [116, 117, 118, 119, 0],
            "the set's end is zero"
        );
        assert_eq!(
            chunks[&SlotKey {
                backend_set: 9,
                chunk: 0
            }]
                .backends[..2],
            [5, 0]
        );
    }
}

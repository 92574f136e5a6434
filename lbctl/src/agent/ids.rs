//! Dense id allocation. Ids are derived from what is in the maps (so a
//! restarted agent adopts them and moves no traffic); new ids are handed out
//! round-robin above the last one given, so an id freed a moment ago is not
//! reused until the space wraps.

use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct IdPool {
    /// Ids are `1..=max`; 0 means "none" in the maps.
    max: u32,
    cursor: u32,
    /// The ids in use as runs, first id -> last id (inclusive), apart and
    /// not adjacent. Ids handed out in order make one run, so 100,000
    /// backends cost one entry, not a B-tree entry each (about 1 MiB).
    runs: BTreeMap<u32, u32>,
    len: usize,
}

impl IdPool {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            cursor: 0,
            runs: BTreeMap::new(),
            len: 0,
        }
    }

    /// Replaces the set of ids in use (the cursor stays).
    pub fn set_used(&mut self, used: impl IntoIterator<Item = u32>) {
        self.runs.clear();
        self.len = 0;
        for id in used {
            self.insert(id);
        }
        if let Some((_, &last)) = self.runs.last_key_value() {
            self.cursor = self.cursor.max(last);
        }
    }

    /// The run holding `id`, as (first, last).
    fn run_of(&self, id: u32) -> Option<(u32, u32)> {
        let (&first, &last) = self.runs.range(..=id).next_back()?;
        (id <= last).then_some((first, last))
    }

    fn insert(&mut self, id: u32) {
        if self.run_of(id).is_some() {
            return;
        }
        self.len += 1;
        // Joins the run ending just below and the one starting just above.
        let below = id
            .checked_sub(1)
            .and_then(|b| self.run_of(b))
            .map(|(first, _)| first);
        let above = id.checked_add(1).and_then(|a| self.runs.remove(&a));
        let last = above.unwrap_or(id);
        match below {
            Some(first) => self.runs.insert(first, last),
            None => self.runs.insert(id, last),
        };
    }

    /// Gives an id back.
    pub fn free(&mut self, id: u32) {
        let Some((first, last)) = self.run_of(id) else {
            return;
        };
        self.len -= 1;
        if first < id {
            self.runs.insert(first, id - 1);
        } else {
            self.runs.remove(&first);
        }
        if id < last {
            self.runs.insert(id + 1, last);
        }
    }

    /// Hands out ids `1..=max` from now on (ids in use above it stay in
    /// use until freed).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    pub fn in_use(&self) -> usize {
        self.len
    }

    /// The next free id after the cursor, wrapping; None when all are used.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.len as u64 >= self.max as u64 {
            return None;
        }
        let mut id = if self.cursor >= self.max {
            1
        } else {
            self.cursor + 1
        };
        // Past a used run at a time: bounded by the number of runs.
        while let Some((_, last)) = self.run_of(id) {
            id = if last >= self.max { 1 } else { last + 1 };
        }
        self.insert(id);
        self.cursor = id;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_round_robin_and_wraps() {
        let mut p = IdPool::new(3);
        assert_eq!(
            [p.alloc(), p.alloc(), p.alloc(), p.alloc()],
            [Some(1), Some(2), Some(3), None]
        );
        p.set_used([1, 3]);
        assert_eq!(p.alloc(), Some(2));
        p.set_used([3]);
        // 1 and 2 are free; the cursor is at 2, so 1 comes after wrapping.
        assert_eq!(p.alloc(), Some(1));
    }

    #[test]
    fn restored_ids_are_never_handed_out() {
        let mut p = IdPool::new(100);
        p.set_used([5, 6, 7]);
        let got: Vec<_> = (0..5).filter_map(|_| p.alloc()).collect();
        assert_eq!(got, vec![8, 9, 10, 11, 12]);
    }

    #[test]
    fn ids_in_order_are_one_run() {
        let mut p = IdPool::new(1 << 28);
        for _ in 0..100_000 {
            p.alloc();
        }
        assert_eq!((p.in_use(), p.runs.len()), (100_000, 1));
        p.free(50_000);
        assert_eq!(p.runs.len(), 2);
        assert_eq!(p.alloc(), Some(100_001), "round-robin: not the hole");
    }

    proptest::proptest! {
        /// The same ids as a plain set would give, whatever the order of
        /// allocations, frees and restores.
        #[test]
        fn behaves_as_a_set_of_ids(
            ops in proptest::collection::vec((0u8..3, 1u32..=20), 1..200),
            max in 5u32..=20,
        ) {
            let mut p = IdPool::new(max);
            let mut model = std::collections::BTreeSet::new();
            let mut cursor = 0u32;
            for (op, id) in ops {
                match op {
                    0 => {
                        let want = if model.len() as u32 >= max {
                            None
                        } else {
                            let mut i = cursor;
                            loop {
                                i = if i >= max { 1 } else { i + 1 };
                                if !model.contains(&i) {
                                    break Some(i);
                                }
                            }
                        };
                        if let Some(i) = want {
                            model.insert(i);
                            cursor = i;
                        }
                        proptest::prop_assert_eq!(p.alloc(), want);
                    }
                    1 => {
                        model.remove(&id);
                        p.free(id);
                    }
                    _ => {
                        let id = id.min(max);
                        model.insert(id);
                        let used: Vec<u32> = model.iter().copied().collect();
                        p.set_used(used.iter().rev().copied());
                        cursor = cursor.max(*model.last().unwrap());
                    }
                }
                proptest::prop_assert_eq!(p.in_use(), model.len());
                let mut ids = Vec::new();
                for (&first, &last) in &p.runs {
                    ids.extend(first..=last);
                }
                proptest::prop_assert_eq!(ids, model.iter().copied().collect::<Vec<_>>());
            }
        }
    }
}

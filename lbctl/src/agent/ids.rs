//! Dense id allocation. Ids are derived from what is in the maps (so a
//! restarted agent adopts them and moves no traffic); new ids are handed out
//! round-robin above the last one given, so an id freed a moment ago is not
//! reused until the space wraps.

use std::collections::BTreeSet;

#[derive(Clone, Debug)]
pub struct IdPool {
    /// Ids are `1..=max`; 0 means "none" in the maps.
    max: u32,
    cursor: u32,
    used: BTreeSet<u32>,
}

impl IdPool {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            cursor: 0,
            used: BTreeSet::new(),
        }
    }

    /// Replaces the set of ids in use (the cursor stays).
    pub fn set_used(&mut self, used: impl IntoIterator<Item = u32>) {
        self.used = used.into_iter().collect();
        if let Some(&last) = self.used.last() {
            self.cursor = self.cursor.max(last);
        }
    }

    /// Gives an id back.
    pub fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// The next free id after the cursor, wrapping; None when all are used.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.used.len() as u64 >= self.max as u64 {
            return None;
        }
        let mut id = self.cursor;
        loop {
            id = if id >= self.max { 1 } else { id + 1 };
            if !self.used.contains(&id) {
                self.used.insert(id);
                self.cursor = id;
                return Some(id);
            }
        }
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
}

//! Node and zone names, shared: every endpoint of a node names it, so a
//! cluster of 100,000 endpoints on 50 nodes holds 50 strings, not 100,000
//! (an owned `String` per endpoint was a heap block each, in the store's
//! slices and again in each port's translation).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

struct Names {
    set: HashSet<Arc<str>>,
    /// Size after the last prune: names no object holds any more are
    /// dropped when the set has doubled since (nodes come and go).
    pruned_at: usize,
}

static NAMES: Mutex<Option<Names>> = Mutex::new(None);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut g = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = g.get_or_insert_with(|| Names {
        set: HashSet::new(),
        pruned_at: 64,
    });
    if let Some(a) = names.set.get(s) {
        return a.clone();
    }
    if names.set.len() >= 2 * names.pruned_at {
        names.set.retain(|a| Arc::strong_count(a) > 1);
        names.pruned_at = names.set.len().max(64);
    }
    let a: Arc<str> = Arc::from(s);
    names.set.insert(a.clone());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name_and_unused_names_are_dropped() {
        let a = intern("node-intern-test");
        let b = intern("node-intern-test");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        for i in 0..1000 {
            drop(intern(&format!("gone-{i}")));
        }
        let len = NAMES.lock().unwrap().as_ref().unwrap().set.len();
        assert!(len < 1000, "{len} names kept");
    }
}

//! Node and zone names, shared: every endpoint of a node names it, so a
//! cluster of 100,000 endpoints on 50 nodes holds 50 strings, not 100,000
//! (an owned `String` per endpoint was a heap block each, in the store's
//! slices and again in each port's translation).

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex},
};

/// A shared name, one pointer wide: an `Arc<str>` is two words, and every
/// endpoint holds two names, in the store's slices and again in each
/// port's translation (3 MiB of pointers at 10,000 Services x 10).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interned(Arc<Box<str>>);

impl std::ops::Deref for Interned {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Hashes and compares as its text (the set is searched by `&str`).
impl std::borrow::Borrow<str> for Interned {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Interned {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The shared copy (`intern`).
impl From<&str> for Interned {
    fn from(s: &str) -> Self {
        intern(s)
    }
}

impl PartialEq<String> for Interned {
    fn eq(&self, other: &String) -> bool {
        **self.0 == **other
    }
}

impl PartialEq<Interned> for String {
    fn eq(&self, other: &Interned) -> bool {
        **self == **other.0
    }
}

impl serde::Serialize for Interned {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl fmt::Display for Interned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for Interned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self.0, f)
    }
}

struct Names {
    set: HashSet<Interned>,
    /// Size after the last prune: names no object holds any more are
    /// dropped when the set has doubled since (nodes come and go).
    pruned_at: usize,
}

static NAMES: Mutex<Option<Names>> = Mutex::new(None);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Interned {
    let mut g = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = g.get_or_insert_with(|| Names {
        set: HashSet::new(),
        pruned_at: 64,
    });
    if let Some(a) = names.set.get(s) {
        return a.clone();
    }
    if names.set.len() >= 2 * names.pruned_at {
        names.set.retain(|a| Arc::strong_count(&a.0) > 1);
        names.pruned_at = names.set.len().max(64);
    }
    let a = Interned(Arc::new(Box::from(s)));
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
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(&*a, "node-intern-test");
        assert_eq!(std::mem::size_of::<Option<Interned>>(), 8);
        drop((a, b));
        for i in 0..1000 {
            drop(intern(&format!("gone-{i}")));
        }
        let len = NAMES.lock().unwrap().as_ref().unwrap().set.len();
        assert!(len < 1000, "{len} names kept");
    }
}

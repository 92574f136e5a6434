//! The diff between what is in the maps and what should be, as an ordered
//! list of single-entry writes. The order is make-before-break: everything a
//! frontend will point at exists before the frontend points at it, and
//! nothing is removed while a frontend still points at it.

use std::collections::BTreeMap;

use super::state::{MapState, Op};

fn puts<K: Ord + Copy, V: PartialEq + Copy>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    out: &mut Vec<Op>,
    op: impl Fn(K, V) -> Op,
) {
    for (k, v) in want {
        if cur.get(k) != Some(v) {
            out.push(op(*k, *v));
        }
    }
}

fn dels<K: Ord + Copy, V>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    out: &mut Vec<Op>,
    op: impl Fn(K) -> Op,
) {
    for k in cur.keys() {
        if !want.contains_key(k) {
            out.push(op(*k));
        }
    }
}

/// Writes that turn `cur` into `want`; empty when they are equal.
pub fn diff(cur: &MapState, want: &MapState) -> Vec<Op> {
    let mut ops = Vec::new();
    puts(&cur.backends, &want.backends, &mut ops, Op::PutBackend);
    puts(
        &cur.backend_meta,
        &want.backend_meta,
        &mut ops,
        Op::PutBackendMeta,
    );
    for (k, v) in &want.service_meta {
        if cur.service_meta.get(k) != Some(v) {
            ops.push(Op::PutServiceMeta(
                *k,
                *v,
                !cur.service_meta.contains_key(k),
            ));
        }
    }
    puts(&cur.slots, &want.slots, &mut ops, Op::PutSlot);
    // The device path's address filter admits an address before its
    // frontends exist and drops it after they are gone.
    puts(&cur.addrs, &want.addrs, &mut ops, Op::PutAddr);
    puts(&cur.frontends, &want.frontends, &mut ops, Op::PutFrontend);
    dels(&cur.frontends, &want.frontends, &mut ops, Op::DelFrontend);
    dels(&cur.addrs, &want.addrs, &mut ops, Op::DelAddr);
    dels(&cur.slots, &want.slots, &mut ops, Op::DelSlot);
    dels(
        &cur.service_meta,
        &want.service_meta,
        &mut ops,
        Op::DelServiceMeta,
    );
    dels(
        &cur.backend_meta,
        &want.backend_meta,
        &mut ops,
        Op::DelBackendMeta,
    );
    dels(&cur.backends, &want.backends, &mut ops, Op::DelBackend);
    ops
}

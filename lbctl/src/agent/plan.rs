//! The diff between what is in the maps and what should be, as an ordered
//! list of single-entry writes. The order is make-before-break: everything a
//! frontend will point at exists before the frontend points at it, and
//! nothing is removed while a frontend still points at it.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::service::{Frontend4Key, SCOPE_ALL, ServiceBackendKey, SlotKey};

use super::state::{MapState, Op, RangeKey};

/// The keys of each map that may differ between two states.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    pub addrs: BTreeSet<u32>,
    pub frontends: BTreeSet<Frontend4Key>,
    pub slots: BTreeSet<SlotKey>,
    pub svc_backends: BTreeSet<ServiceBackendKey>,
    pub source_ranges: BTreeSet<RangeKey>,
    pub backends: BTreeSet<u32>,
    pub service_meta: BTreeSet<u32>,
    pub backend_meta: BTreeSet<u32>,
}

impl Keys {
    /// Every key of a state.
    pub fn all(s: &MapState) -> Self {
        Self {
            addrs: s.addrs.keys().copied().collect(),
            frontends: s.frontends.keys().copied().collect(),
            slots: s.slots.keys().copied().collect(),
            svc_backends: s.svc_backends.keys().copied().collect(),
            source_ranges: s.source_ranges.keys().copied().collect(),
            backends: s.backends.keys().copied().collect(),
            service_meta: s.service_meta.keys().copied().collect(),
            backend_meta: s.backend_meta.keys().copied().collect(),
        }
    }

    pub fn extend(&mut self, o: Self) {
        self.addrs.extend(o.addrs);
        self.frontends.extend(o.frontends);
        self.slots.extend(o.slots);
        self.svc_backends.extend(o.svc_backends);
        self.source_ranges.extend(o.source_ranges);
        self.backends.extend(o.backends);
        self.service_meta.extend(o.service_meta);
        self.backend_meta.extend(o.backend_meta);
    }
}

fn puts<K: Ord + Copy, V: PartialEq + Copy>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    out: &mut Vec<Op>,
    op: impl Fn(K, V) -> Op,
) {
    for k in keys {
        if let Some(v) = want.get(k)
            && cur.get(k) != Some(v)
        {
            out.push(op(*k, *v));
        }
    }
}

fn dels<K: Ord + Copy, V>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    out: &mut Vec<Op>,
    op: impl Fn(K) -> Op,
) {
    for k in keys {
        if cur.contains_key(k) && !want.contains_key(k) {
            out.push(op(*k));
        }
    }
}

/// Writes that turn `cur` into `want`; empty when they are equal.
pub fn diff(cur: &MapState, want: &MapState) -> Vec<Op> {
    let mut keys = Keys::all(cur);
    keys.extend(Keys::all(want));
    diff_keys(cur, want, &keys)
}

/// Writes that turn `cur` into `want` on `keys`; the rest is taken to be
/// equal already.
pub fn diff_keys(cur: &MapState, want: &MapState, keys: &Keys) -> Vec<Op> {
    let mut ops = Vec::new();
    for phase in 0..PHASES {
        diff_phase(phase, cur, want, keys, &mut ops);
    }
    ops
}

/// How many phases a diff has: each writes one map (puts first, in
/// make-before-break order, deletions after, in reverse).
pub const PHASES: usize = 18;

/// The ops of one phase of the diff. Each phase reads only its own map's
/// entries of `cur`, and the keys of different phases of one map never
/// meet, so a writer may apply a phase's ops (and update `cur`) before the
/// next phase is diffed: the ops are the same as [`diff_keys`] gives, and
/// only one phase's list is ever held (a full sync's whole list was the
/// agent's largest allocation).
pub fn diff_phase(phase: usize, cur: &MapState, want: &MapState, keys: &Keys, ops: &mut Vec<Op>) {
    // A frontend's internal-scope entry exists before its all-traffic
    // entry points at it (`FE_TWO_SCOPES`), and goes after it.
    let scoped = |internal: bool| -> BTreeSet<Frontend4Key> {
        keys.frontends
            .iter()
            .filter(|k| (k.scope != SCOPE_ALL) == internal)
            .copied()
            .collect()
    };
    match phase {
        0 => {
            for k in &keys.backends {
                if let Some(v) = want.backends.get(k)
                    && cur.backends.get(k) != Some(v)
                {
                    ops.push(Op::PutBackend(*k, *v, !cur.backends.contains_key(k)));
                }
            }
        }
        1 => puts(
            &cur.backend_meta,
            &want.backend_meta,
            &keys.backend_meta,
            ops,
            |k, v| Op::PutBackendMeta(k, Box::new(v)),
        ),
        2 => {
            for k in &keys.service_meta {
                if let Some(v) = want.service_meta.get(k)
                    && cur.service_meta.get(k) != Some(v)
                {
                    ops.push(Op::PutServiceMeta(
                        *k,
                        Box::new(*v),
                        !cur.service_meta.contains_key(k),
                    ));
                }
            }
        }
        3 => puts(&cur.slots, &want.slots, &keys.slots, ops, Op::PutSlot),
        4 => puts(
            &cur.svc_backends,
            &want.svc_backends,
            &keys.svc_backends,
            ops,
            Op::PutServiceBackend,
        ),
        // A frontend is flagged for source ranges only once they are there.
        5 => puts(
            &cur.source_ranges,
            &want.source_ranges,
            &keys.source_ranges,
            ops,
            Op::PutSourceRange,
        ),
        // The device path's address filter admits an address before its
        // frontends exist and drops it after they are gone.
        6 => puts(&cur.addrs, &want.addrs, &keys.addrs, ops, Op::PutAddr),
        7 => puts(
            &cur.frontends,
            &want.frontends,
            &scoped(true),
            ops,
            Op::PutFrontend,
        ),
        8 => puts(
            &cur.frontends,
            &want.frontends,
            &scoped(false),
            ops,
            Op::PutFrontend,
        ),
        9 => dels(
            &cur.frontends,
            &want.frontends,
            &scoped(false),
            ops,
            Op::DelFrontend,
        ),
        10 => dels(
            &cur.frontends,
            &want.frontends,
            &scoped(true),
            ops,
            Op::DelFrontend,
        ),
        11 => dels(&cur.addrs, &want.addrs, &keys.addrs, ops, Op::DelAddr),
        12 => dels(
            &cur.source_ranges,
            &want.source_ranges,
            &keys.source_ranges,
            ops,
            Op::DelSourceRange,
        ),
        13 => dels(&cur.slots, &want.slots, &keys.slots, ops, Op::DelSlot),
        14 => dels(
            &cur.svc_backends,
            &want.svc_backends,
            &keys.svc_backends,
            ops,
            Op::DelServiceBackend,
        ),
        15 => dels(
            &cur.service_meta,
            &want.service_meta,
            &keys.service_meta,
            ops,
            Op::DelServiceMeta,
        ),
        16 => dels(
            &cur.backend_meta,
            &want.backend_meta,
            &keys.backend_meta,
            ops,
            Op::DelBackendMeta,
        ),
        17 => dels(
            &cur.backends,
            &want.backends,
            &keys.backends,
            ops,
            Op::DelBackend,
        ),
        _ => {}
    }
}

//! The diff between what is in the maps and what should be, as an ordered
//! list of single-entry writes. The order is make-before-break: everything a
//! frontend will point at exists before the frontend points at it, and
//! nothing is removed while a frontend still points at it.

use std::{collections::BTreeMap, ops::Bound};

use lb_common::service::{Frontend4Key, SCOPE_ALL, ServiceBackendKey, SlotKey};

use super::{
    state::{MapState, Op, RangeKey},
    written::{Before, Kept},
};

/// Where a phase's diff goes on from: after the last key of its previous
/// chunk. A flush writes a phase in chunks, so neither its op list nor the
/// writer's batch buffers ever hold a whole map (they were a sixth of the
/// agent's peak memory at 10,000 Services).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resume {
    #[default]
    Start,
    Id(u32),
    Frontend(Frontend4Key),
    Slot(SlotKey),
    Pair(ServiceBackendKey),
    Range(RangeKey),
}

/// A map key a phase can resume after.
trait PhaseKey: Ord + Copy {
    fn resume(self) -> Resume;
    fn after(r: &Resume) -> Option<Self>;
}

macro_rules! phase_key {
    ($t:ty, $v:ident) => {
        impl PhaseKey for $t {
            fn resume(self) -> Resume {
                Resume::$v(self)
            }
            fn after(r: &Resume) -> Option<Self> {
                match r {
                    Resume::$v(k) => Some(*k),
                    _ => None,
                }
            }
        }
    };
}
phase_key!(u32, Id);
phase_key!(Frontend4Key, Frontend);
phase_key!(SlotKey, Slot);
phase_key!(ServiceBackendKey, Pair);
phase_key!(RangeKey, Range);

/// The op of each key of `before` after `from` that `only` admits, until
/// `out` holds `limit`; returns whether keys are left (`from` then says
/// where to go on).
fn chunk<K: PhaseKey, V: Copy>(
    before: &Kept<K, V>,
    want: &BTreeMap<K, V>,
    only: impl Fn(&K) -> bool,
    (out, from, limit): (&mut Vec<Op>, &mut Resume, usize),
    mut op: impl FnMut(&K, Option<&V>, Option<&V>) -> Option<Op>,
) -> bool {
    let start = match K::after(from) {
        Some(k) => Bound::Excluded(k),
        None => Bound::Unbounded,
    };
    for (k, was, target) in before.pending(want, start) {
        if !only(k) {
            continue;
        }
        if let Some(o) = op(k, was, target) {
            out.push(o);
            if out.len() >= limit {
                *from = k.resume();
                return true;
            }
        }
    }
    false
}

fn puts<K: PhaseKey, V: PartialEq + Copy>(
    before: &Kept<K, V>,
    want: &BTreeMap<K, V>,
    only: impl Fn(&K) -> bool,
    o: (&mut Vec<Op>, &mut Resume, usize),
    op: impl Fn(K, V) -> Op,
) -> bool {
    chunk(before, want, only, o, |k, was, v| {
        let v = v?;
        (was != Some(v)).then(|| op(*k, *v))
    })
}

fn dels<K: PhaseKey, V: Copy>(
    before: &Kept<K, V>,
    want: &BTreeMap<K, V>,
    only: impl Fn(&K) -> bool,
    o: (&mut Vec<Op>, &mut Resume, usize),
    op: impl Fn(K) -> Op,
) -> bool {
    chunk(before, want, only, o, |k, was, v| {
        (was.is_some() && v.is_none()).then(|| op(*k))
    })
}

fn any<K>(_: &K) -> bool {
    true
}

/// Writes that turn `cur` into `want`; empty when they are equal.
pub fn diff(cur: &MapState, want: &MapState) -> Vec<Op> {
    diff_before(&Before::of(cur, want), want)
}

/// Writes that turn the maps into `want`, where they hold `before` at its
/// keys and equal `want` elsewhere.
pub fn diff_before(before: &Before, want: &MapState) -> Vec<Op> {
    let mut ops = Vec::new();
    for phase in 0..PHASES {
        diff_phase(
            phase,
            before,
            want,
            &mut ops,
            &mut Resume::Start,
            usize::MAX,
        );
    }
    ops
}

/// How many phases a diff has: each writes one map (puts first, in
/// make-before-break order, deletions after, in reverse).
pub const PHASES: usize = 18;

/// The ops of one phase of the diff, from `from` on, until `ops` holds
/// `limit`; returns whether the phase has more (`from` then says where to
/// go on). Each phase reads only its own map's entries of `before`, and
/// the keys of different phases of one map never meet, so a writer may
/// apply a chunk's ops (and forget their keys in `before`) before the
/// next chunk or phase is diffed: the ops are the same as [`diff_before`]
/// gives, and only one chunk's list is ever held.
pub fn diff_phase(
    phase: usize,
    before: &Before,
    want: &MapState,
    ops: &mut Vec<Op>,
    from: &mut Resume,
    limit: usize,
) -> bool {
    // A frontend's internal-scope entry exists before its all-traffic
    // entry points at it (`FE_TWO_SCOPES`), and goes after it.
    let internal = |k: &Frontend4Key| k.scope != SCOPE_ALL;
    let all_traffic = |k: &Frontend4Key| k.scope == SCOPE_ALL;
    let b = before;
    let o = (ops, from, limit);
    match phase {
        0 => chunk(&b.backends, &want.backends, any, o, |k, was, v| {
            let v = v?;
            (was != Some(v)).then(|| Op::PutBackend(*k, *v, was.is_none()))
        }),
        1 => puts(&b.names, &want.names, any, o, |k, v| {
            Op::PutName(k, Box::new(v))
        }),
        2 => chunk(&b.service_meta, &want.service_meta, any, o, |k, was, v| {
            let v = v?;
            (was != Some(v)).then(|| Op::PutServiceMeta(*k, Box::new(*v), was.is_none()))
        }),
        3 => puts(&b.slots, &want.slots, any, o, |k, v| {
            Op::PutSlot(k, Box::new(v))
        }),
        4 => puts(
            &b.svc_backends,
            &want.svc_backends,
            any,
            o,
            Op::PutServiceBackend,
        ),
        // A frontend is flagged for source ranges only once they are there.
        5 => puts(
            &b.source_ranges,
            &want.source_ranges,
            any,
            o,
            Op::PutSourceRange,
        ),
        // The device path's address filter admits an address before its
        // frontends exist and drops it after they are gone.
        6 => puts(&b.addrs, &want.addrs, any, o, Op::PutAddr),
        7 => puts(&b.frontends, &want.frontends, internal, o, Op::PutFrontend),
        8 => puts(
            &b.frontends,
            &want.frontends,
            all_traffic,
            o,
            Op::PutFrontend,
        ),
        9 => dels(
            &b.frontends,
            &want.frontends,
            all_traffic,
            o,
            Op::DelFrontend,
        ),
        10 => dels(&b.frontends, &want.frontends, internal, o, Op::DelFrontend),
        11 => dels(&b.addrs, &want.addrs, any, o, Op::DelAddr),
        12 => dels(
            &b.source_ranges,
            &want.source_ranges,
            any,
            o,
            Op::DelSourceRange,
        ),
        13 => dels(&b.slots, &want.slots, any, o, Op::DelSlot),
        14 => dels(
            &b.svc_backends,
            &want.svc_backends,
            any,
            o,
            Op::DelServiceBackend,
        ),
        15 => dels(
            &b.service_meta,
            &want.service_meta,
            any,
            o,
            Op::DelServiceMeta,
        ),
        16 => dels(&b.names, &want.names, any, o, Op::DelName),
        17 => dels(&b.backends, &want.backends, any, o, Op::DelBackend),
        _ => false,
    }
}

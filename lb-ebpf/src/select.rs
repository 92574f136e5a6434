//! Backend selection: a flow hash picks a slot of the frontend's backend set.

use lb_common::{
    counters::{V_DROP_NO_BACKEND, V_DROP_STALE_BACKEND},
    hash,
    service::{Backend4, Frontend, Frontend4Key, SlotKey},
};

use crate::maps::{BACKENDS4, FRONTENDS4, SLOTS};

pub struct Chosen {
    pub backend_id: u32,
    pub backend: Backend4,
}

#[inline(always)]
pub fn frontend(key: &Frontend4Key) -> Option<Frontend> {
    // SAFETY: the value is copied out at once.
    unsafe { FRONTENDS4.get(key).copied() }
}

#[inline(always)]
fn from_set(fe: &Frontend, h: u32) -> Option<Chosen> {
    let slot = SlotKey {
        backend_set: fe.backend_set,
        slot: hash::slot(h, fe.count),
    };
    // SAFETY: values are copied out at once.
    let backend_id = unsafe { *SLOTS.get(&slot)? };
    let backend = unsafe { *BACKENDS4.get(backend_id)? };
    Some(Chosen {
        backend_id,
        backend,
    })
}

/// Picks a backend of `fe` for flow hash `h`. Err carries the verdict.
///
/// The agent deletes an old backend set right after flipping the frontend to
/// a new one; a packet that read the frontend just before the flip may miss
/// its slot, so it re-reads the frontend once.
#[inline(always)]
pub fn pick(key: &Frontend4Key, fe: &Frontend, h: u32) -> Result<Chosen, u32> {
    if fe.count == 0 {
        return Err(V_DROP_NO_BACKEND);
    }
    if let Some(c) = from_set(fe, h) {
        return Ok(c);
    }
    match frontend(key) {
        Some(fresh) if fresh.count > 0 => from_set(&fresh, h).ok_or(V_DROP_STALE_BACKEND),
        Some(_) => Err(V_DROP_NO_BACKEND),
        None => Err(V_DROP_STALE_BACKEND),
    }
}

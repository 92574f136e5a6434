//! Backend selection: the frontend entry for the traffic's scope, session
//! affinity, then a flow hash that picks a slot of the frontend's backend
//! set.

use lb_common::{
    counters::{V_DROP_NO_LOCAL_BACKEND, V_DROP_STALE_BACKEND, V_REJECT_NO_BACKEND},
    hash,
    service::{
        AffinityEntry, AffinityKey, Backend4, FE_AFFINITY_CLIENT_IP, FE_LOCAL_LIST,
        FE_REJECT_NO_BACKEND, FE_TWO_SCOPES, Frontend, Frontend4Key, SB_CLUSTER, SB_LOCAL,
        SCOPE_INTERNAL, ServiceBackendKey, SlotKey,
    },
};

use crate::{
    conntrack::now_s,
    maps::{AFFINITY4, FRONTENDS4, SERVICE_BACKENDS, SLOTS, backend},
};

pub struct Chosen {
    pub backend_id: u32,
    pub backend: Backend4,
}

#[inline(always)]
pub fn frontend(key: &Frontend4Key) -> Option<Frontend> {
    // SAFETY: the value is copied out at once.
    unsafe { FRONTENDS4.get(key).copied() }
}

/// The frontend for traffic from inside the node (pods and host
/// processes): the `SCOPE_INTERNAL` entry where the `ALL` one says there
/// is one. Returns the key it was found under (for `pick`'s re-read).
#[inline(always)]
pub fn frontend_internal(key: &Frontend4Key) -> Option<(Frontend4Key, Frontend)> {
    let fe = frontend(key)?;
    if fe.flags & FE_TWO_SCOPES == 0 {
        return Some((*key, fe));
    }
    let ikey = Frontend4Key {
        scope: SCOPE_INTERNAL,
        ..*key
    };
    match frontend(&ikey) {
        Some(ife) => Some((ikey, ife)),
        // The agent writes it before the flag that points at it and
        // removes it after; absent only if the maps were edited by hand.
        None => Some((*key, fe)),
    }
}

/// Why a frontend with no backend for this traffic turns a new flow away:
/// rejected when the Service has no endpoint at all, dropped when a
/// traffic policy leaves none here (as kube-proxy's REJECT and DROP).
#[inline(always)]
pub fn empty_verdict(fe: &Frontend) -> u32 {
    if fe.flags & FE_REJECT_NO_BACKEND != 0 {
        V_REJECT_NO_BACKEND
    } else {
        V_DROP_NO_LOCAL_BACKEND
    }
}

#[inline(always)]
fn from_set(fe: &Frontend, h: u32) -> Option<Chosen> {
    let (key, i) = SlotKey::of_slot(fe.backend_set, hash::slot(h, fe.count));
    // SAFETY: values are copied out at once; `i` is below 16.
    let chunk = unsafe { SLOTS.get(&key)? };
    let backend_id = *chunk.backends.get(i)?;
    if backend_id == 0 {
        return None;
    }
    let backend = backend(backend_id)?;
    Some(Chosen {
        backend_id,
        backend,
    })
}

/// Picks a backend of `fe` for flow hash `h` (no session affinity: see
/// `choose`). Err carries the verdict.
///
/// The agent deletes an old backend set right after flipping the frontend to
/// a new one; a packet that read the frontend just before the flip may miss
/// its slot, so it re-reads the frontend once.
#[inline(always)]
pub fn pick(key: &Frontend4Key, fe: &Frontend, h: u32) -> Result<Chosen, u32> {
    if fe.count == 0 {
        return Err(empty_verdict(fe));
    }
    if let Some(c) = from_set(fe, h) {
        return Ok(c);
    }
    match frontend(key) {
        Some(fresh) if fresh.count > 0 => from_set(&fresh, h).ok_or(V_DROP_STALE_BACKEND),
        Some(fresh) => Err(empty_verdict(&fresh)),
        None => Err(V_DROP_STALE_BACKEND),
    }
}

/// A client of a frontend, for session affinity: `AFFINITY_BY_*` and the
/// client's address or network namespace cookie.
pub struct Client {
    pub kind: u8,
    pub id: u64,
}

/// The backend for a new flow of `client` to frontend `fe` (found under
/// `key`) with flow hash `h`: under `sessionAffinity: ClientIP` the one the
/// client was last given while it is still one this frontend gives new
/// flows to and the timeout has not passed; else the hash's pick, which the
/// client then keeps.
#[inline(always)]
pub fn choose(key: &Frontend4Key, fe: &Frontend, h: u32, client: &Client) -> Result<Chosen, u32> {
    if fe.flags & FE_AFFINITY_CLIENT_IP == 0 || fe.count == 0 {
        return pick(key, fe, h);
    }
    let akey = AffinityKey {
        client: client.id,
        service_id: fe.service_id,
        kind: client.kind,
        _pad: [0; 3],
    };
    let now = now_s();
    if let Some(a) = AFFINITY4.get_ptr_mut(&akey) {
        // SAFETY: LRU map value; a racing update costs at most a moved
        // timestamp.
        let a = unsafe { &mut *a };
        let sb = ServiceBackendKey {
            service_id: fe.service_id,
            backend_id: a.backend_id,
        };
        let list = if fe.flags & FE_LOCAL_LIST != 0 {
            SB_LOCAL
        } else {
            SB_CLUSTER
        };
        // SAFETY: copied out at once.
        let usable = unsafe { SERVICE_BACKENDS.get(&sb) }.is_some_and(|f| f & list != 0);
        if now.wrapping_sub(a.last_s) <= fe.affinity_timeout_s
            && usable
            && let Some(b) = backend(a.backend_id)
        {
            a.last_s = now;
            return Ok(Chosen {
                backend_id: a.backend_id,
                backend: b,
            });
        }
    }
    let c = pick(key, fe, h)?;
    let entry = AffinityEntry {
        backend_id: c.backend_id,
        last_s: now,
    };
    // Full table: the least recently used client is evicted (LRU).
    let _ = AFFINITY4.insert(&akey, &entry, 0);
    Ok(c)
}

//! Counter updates. Per-CPU slots, so plain adds are race-free.
//!
//! The per-Service-port and per-backend counters are created here, by the
//! first packet or flow that counts (a per-CPU hash insert from a program
//! sets this CPU's slot and zeroes the others): the agent only deletes
//! them with their port or backend. Creating 100,000s of per-CPU entries
//! from user space at start cost more than everything else the agent
//! writes (each a per-CPU allocation outside the allocator's caches).

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::counters::{BackendStats, ServiceStats};

use crate::maps::{BACKEND_STATS, SERVICE_STATS, VERDICT_STATS};

#[inline(always)]
pub fn verdict(v: u32) {
    if let Some(c) = VERDICT_STATS.get_ptr_mut(v) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// This CPU's counters of `id` in `$map`, made (zeroed) when missing. The
/// lookup is inline (every counted packet); the making is out of line
/// (`$made`, a flow's first packet at most), so each call site costs a
/// call, not the insert's code. A full map or an empty allocator cache
/// leaves the packet uncounted.
macro_rules! counters {
    ($name:ident, $made:ident, $map:ident, $v:ty) => {
        #[inline(always)]
        fn $name(id: u32) -> Option<&'static mut $v> {
            match $map.get_ptr_mut(&id) {
                // SAFETY: per-CPU value, see `verdict`.
                Some(p) => Some(unsafe { &mut *p }),
                None => $made(id),
            }
        }

        #[inline(never)]
        fn $made(id: u32) -> Option<&'static mut $v> {
            // Another CPU may create it at the same moment: NOEXIST keeps
            // theirs.
            let _ = $map.insert(&id, &<$v>::default(), BPF_NOEXIST as u64);
            // SAFETY: as above.
            $map.get_ptr_mut(&id).map(|p| unsafe { &mut *p })
        }
    };
}

counters!(service, make_service, SERVICE_STATS, ServiceStats);
counters!(backend, make_backend, BACKEND_STATS, BackendStats);

#[inline(always)]
pub fn new_flow(id: u32) {
    if let Some(s) = service(id) {
        s.flows += 1;
    }
}

/// A new device-path flow's first packet: one lookup of each counter
/// entry, not one per counter.
#[inline(always)]
pub fn first_packet(service_id: u32, backend_id: u32, bytes: u32) {
    if let Some(s) = service(service_id) {
        s.flows += 1;
        s.packets += 1;
        s.bytes += bytes as u64;
    }
    if let Some(b) = backend(backend_id) {
        b.flows += 1;
        b.packets += 1;
        b.bytes += bytes as u64;
    }
}

#[inline(always)]
pub fn packet(id: u32, bytes: u32) {
    if let Some(s) = service(id) {
        s.packets += 1;
        s.bytes += bytes as u64;
    }
}

#[inline(always)]
pub fn no_backend(id: u32) {
    if let Some(s) = service(id) {
        s.no_backend += 1;
    }
}

/// A flow (device path) or socket was given backend `id`.
#[inline(always)]
pub fn backend_flow(id: u32) {
    if let Some(b) = backend(id) {
        b.flows += 1;
    }
}

/// A device-path packet to or from backend `id`.
#[inline(always)]
pub fn backend_packet(id: u32, bytes: u32) {
    if let Some(b) = backend(id) {
        b.packets += 1;
        b.bytes += bytes as u64;
    }
}

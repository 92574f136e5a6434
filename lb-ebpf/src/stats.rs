//! Counter updates. Per-CPU slots, so plain adds are race-free.

use lb_common::counters::ServiceStats;

use crate::maps::{SERVICE_STATS, VERDICT_STATS};

#[inline(always)]
pub fn verdict(v: u32) {
    if let Some(c) = VERDICT_STATS.get_ptr_mut(v) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn service(id: u32) -> Option<&'static mut ServiceStats> {
    // SAFETY: per-CPU slot, see `verdict`.
    SERVICE_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn new_flow(id: u32) {
    if let Some(s) = service(id) {
        s.flows += 1;
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

//! Counter updates. Per-CPU slots, so plain adds are race-free.

use lb_common::counters::{BackendStats, ServiceStats};

use crate::maps::{BACKEND_STATS, SERVICE_STATS, VERDICT_STATS};

#[inline(always)]
pub fn verdict(v: u32) {
    if let Some(c) = VERDICT_STATS.get_ptr_mut(v) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn service(id: u32) -> Option<&'static mut ServiceStats> {
    // SAFETY: per-CPU value, see `verdict`.
    SERVICE_STATS.get_ptr_mut(&id).map(|p| unsafe { &mut *p })
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

#[inline(always)]
fn backend(id: u32) -> Option<&'static mut BackendStats> {
    // SAFETY: per-CPU value, see `verdict`.
    BACKEND_STATS.get_ptr_mut(&id).map(|p| unsafe { &mut *p })
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

//! Flood protection for the device path: each CPU takes new flows into
//! conntrack at the agent's rate (`--new-flow-rate`, with a burst), a
//! generic cell rate algorithm: one timestamp per CPU, the time its next
//! flow is due; a flow earlier than the burst allows is over the rate.

use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::maps::{CONFIG, FLOOD};

/// Whether a new flow now is past this CPU's rate (false, and nothing
/// recorded, without a limit). `burst` flows may come at once.
#[inline(always)]
pub fn over_rate() -> bool {
    let Some(c) = CONFIG.get(0) else {
        return false;
    };
    let (interval, burst) = (c.flow_interval_ns, c.flow_burst_ns);
    if interval == 0 {
        return false;
    }
    let Some(due) = FLOOD.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot: only this CPU's programs use it, one at a time.
    let due = unsafe { &mut *due };
    let next = if *due > now { *due } else { now };
    // `burst` flows at once: the one now and burst - 1 more ahead of it.
    if next - now > burst.saturating_sub(interval) {
        return true;
    }
    *due = next + interval;
    false
}

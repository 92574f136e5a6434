//! Per-packet flow state for the device path: lookup with expiry, touch with
//! TCP-aware lifetimes, and creation of both directions of a flow, in the
//! set-associative flow table (`lb_common::conntrack::Ct4Set`: layout,
//! hashes and the choice of a way to give up live there, shared with user
//! space). The probes are global BPF functions (`lb_ct_*`), verified once.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    PROTO_TCP,
    conntrack::{
        CT_CLOSING, CT_DSR, CT_FIN_ORIGINAL, CT_FIN_REPLY, CT_LIFETIME_TCP_CLOSING,
        CT_LIFETIME_TCP_ESTABLISHED, CT_LIFETIME_TCP_SYN, CT_LIFETIME_UDP, CT_LOCAL_BACKEND,
        CT_ORIGINAL, CT_REPLY, CT_SEEN_REPLY, CT_TIME_WAIT_S, CT_WAYS, Ct4Entry, Ct4Key, Ct4Params,
        Ct4Set, ct_check, ct_meta, ct_set_index, ct_victim_rank,
    },
};

use crate::{
    maps::{CLOCK, CONNTRACK4},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// A CPU's last reading of the coarse clock (`LB_CLOCK`).
#[repr(C)]
pub struct Clock {
    jiffies: u64,
    secs: u64,
}

/// CLOCK_MONOTONIC_COARSE in whole seconds, the time of the flow table
/// (and of `lbctl`, which reads it with clock_gettime). The coarse clock
/// moves only at a tick, when jiffies does: each CPU reads it once a tick
/// and keeps the second. A packet pays one load of jiffies (the verifier
/// inlines `bpf_jiffies64`) and a per-CPU array lookup (inlined too), not
/// the helper's call, the timekeeper's sequence lock and a 64-bit
/// division (a tenth of an established packet's time before). Jiffies is
/// incremented just before the clock at a tick: a CPU may keep the
/// previous tick's second for one tick, as late as the coarse clock is
/// anyway.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return read_clock();
    };
    // SAFETY: per-CPU slot: only this CPU's programs use it, one at a time.
    let c = unsafe { &mut *c };
    if c.jiffies != jiffies {
        c.secs = read_clock() as u64;
        c.jiffies = jiffies;
    }
    c.secs as u32
}

#[inline(always)]
fn read_clock() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> Ct4Key {
    Ct4Key {
        src_addr: pkt.src_addr,
        dst_addr: pkt.dst_addr,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// Whether entry `e` has an other direction here. The client's direction
/// of a DSR flow on the node it came to has none (the replies go from the
/// backend's node straight to the client): its `other_key` would name an
/// unrelated flow's entry (an SNATed flow's reply entry, when the client's
/// port is in the SNAT range and that flow holds it as its SNAT port).
#[inline(always)]
pub fn paired(e: &Ct4Entry) -> bool {
    e.flags & (CT_DSR | CT_LOCAL_BACKEND) != CT_DSR
}

/// The key of the other direction of the flow an entry belongs to: the
/// packets it rewrites come back with the rewritten tuple reversed.
#[inline(always)]
pub fn other_key(k: &Ct4Key, e: &Ct4Entry) -> Ct4Key {
    Ct4Key {
        src_addr: e.nat_dst_addr,
        dst_addr: e.nat_src_addr,
        src_port: e.nat_dst_port,
        dst_port: e.nat_src_port,
        proto: k.proto,
        dir: if k.dir == CT_ORIGINAL {
            CT_REPLY
        } else {
            CT_ORIGINAL
        },
        _pad: 0,
    }
}

#[inline(always)]
pub fn initial_lifetime(proto: u8) -> u32 {
    if proto == PROTO_TCP {
        CT_LIFETIME_TCP_SYN
    } else {
        CT_LIFETIME_UDP
    }
}

/// Whether entry `e` has outlived its lifetime at `now`.
#[inline(always)]
pub fn expired(e: &Ct4Entry, now: u32) -> bool {
    now.wrapping_sub(e.last_seen_s) > e.lifetime_s
}

/// Whether the SNAT port of reply entry `e` may be given to a new flow:
/// the entry has expired and, for a TCP flow that ended, the backend's
/// TIME_WAIT for the old connection (`CT_TIME_WAIT_S` after its last
/// packet) is over; a SYN reusing the tuple earlier could meet it and
/// stall (timestamps older than the old connection's are refused).
#[inline(always)]
pub fn snat_port_free(e: &Ct4Entry, now: u32) -> bool {
    expired(e, now)
        && (e.flags & CT_CLOSING == 0 || now.wrapping_sub(e.last_seen_s) > CT_TIME_WAIT_S)
}

/// The set key `k` lives in and its index (None before the agent made
/// the table).
#[inline(always)]
fn set_of(k: &Ct4Key) -> Option<(u32, &'static mut Ct4Set)> {
    // SAFETY: array values; index 0 is written once, before any program.
    let head = unsafe { &*CONNTRACK4.get_ptr(0)? };
    let p = Ct4Params::of(head);
    if p.sets == 0 {
        return None;
    }
    let index = ct_set_index(k, p);
    // SAFETY: array value; ways are checked, not locked (`Ct4Set`).
    let set = unsafe { &mut *CONNTRACK4.get_ptr_mut(index)? };
    Some((index, set))
}

/// The way of `set` whose key is `k`, whether or not its check matches
/// (a writer reuses it: one key never holds two ways).
#[inline(always)]
fn key_way(set: &Ct4Set, k: &Ct4Key) -> Option<usize> {
    let w = k.words();
    set.keys
        .iter()
        .position(|key| key.words() == w)
        .map(|i| i & (CT_WAYS - 1))
}

/// Whether way `i` holds `k`'s flow whole: its check matches (a way being
/// written, or torn by two CPUs at once, does not).
#[inline(always)]
fn valid(set: &Ct4Set, i: usize, k: &Ct4Key) -> bool {
    let i = i & (CT_WAYS - 1);
    // SAFETY: an aligned u32 of a map value, read once.
    let check = unsafe { core::ptr::read_volatile(&set.check[i]) };
    check == ct_check(k, &set.entries[i])
}

/// The way of `set` holding `k`'s flow, if one does.
#[inline(always)]
fn way_of(set: &Ct4Set, k: &Ct4Key) -> Option<usize> {
    key_way(set, k).filter(|&i| valid(set, i, k))
}

/// The way of `set` a new flow takes at `now`: the one with the least to
/// lose (`ct_victim_rank`), from the ways' `meta` (no entry read).
#[inline(always)]
fn victim(set: &Ct4Set, now: u32) -> usize {
    let mut best = 0;
    let mut rank = u64::MAX;
    for (i, m) in set.meta.iter().enumerate() {
        let r = ct_victim_rank(*m, now);
        if r < rank {
            rank = r;
            best = i;
        }
    }
    best
}

/// Writes way `i`: the check first cleared (readers see no flow there
/// while the rest is written), then key, entry and meta, then the check.
/// Out of line: inline, its copies and hashes made the global functions'
/// frames 128 bytes, past the 512 the verifier allows a call chain from
/// `from_outside` (424).
#[inline(never)]
fn write(set: &mut Ct4Set, i: usize, k: &Ct4Key, e: &Ct4Entry, check: u32) {
    // In range by construction; the mask shows it (no bounds check).
    let i = i & (CT_WAYS - 1);
    // SAFETY: aligned u32s of a map value; volatile so the stores keep
    // their order around the key's and entry's.
    unsafe { core::ptr::write_volatile(&mut set.check[i], 0) };
    set.keys[i] = *k;
    set.entries[i] = *e;
    set.meta[i] = ct_meta(e);
    unsafe { core::ptr::write_volatile(&mut set.check[i], check) };
}

/// `lb_ct_find`'s answer when no way holds the key.
const NOT_FOUND: u64 = u64::MAX;

/// Where `k`'s flow is: its set's index times 4 plus its way, or
/// `NOT_FOUND`. A global BPF function: the verifier checks it once, on
/// its own, and a call costs each path reaching it one instruction (its
/// answer is any scalar to the caller), where the probe inline cost every
/// path its hundred-odd instructions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_find(k: *const Ct4Key) -> u64 {
    // SAFETY: a global function's pointer argument may be null; else it
    // points at a key (the verifier checks the callers pass 16 bytes).
    let Some(k) = (unsafe { k.as_ref() }) else {
        return NOT_FOUND;
    };
    let Some((index, set)) = set_of(k) else {
        return NOT_FOUND;
    };
    match way_of(set, k) {
        Some(i) => ((index as u64) << 2) | i as u64,
        None => NOT_FOUND,
    }
}

/// `lb_ct_find` for `k`, having started the read of the set key `next`
/// lives in just before its own probe. A new flow probes and writes two
/// random sets of a table larger than the caches, and the first read of
/// each waits for memory (half of a new flow's time, read one after the
/// other); read side by side, the two waits overlap, and the write into
/// `next`'s set that follows finds its lines on their way. The two lines
/// of that set a probe reads (checks, metas, keys) are touched; the loads
/// are volatile, so kept though their values are not used.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_find_warming(k: *const Ct4Key, next: *const Ct4Key) -> u64 {
    // SAFETY: null or keys (checked by the verifier).
    let (Some(k), Some(next)) = (unsafe { k.as_ref() }, unsafe { next.as_ref() }) else {
        return NOT_FOUND;
    };
    let (Some((index, set)), Some((_, other))) = (set_of(k), set_of(next)) else {
        return NOT_FOUND;
    };
    // SAFETY: aligned u32s of a map value, each read once.
    unsafe {
        core::ptr::read_volatile(&other.check[0]);
        core::ptr::read_volatile(&other.keys[CT_WAYS - 1].src_addr);
    }
    match way_of(set, k) {
        Some(i) => ((index as u64) << 2) | i as u64,
        None => NOT_FOUND,
    }
}

/// A flow's way: its entry (through `Deref`), updated in place. A reader
/// racing a writer that replaces the way (only when the set is full and
/// this flow has the least to lose) may update the new flow's counters:
/// what a kernel LRU map's reuse of an element does too.
pub struct Flow {
    set: &'static mut Ct4Set,
    way: usize,
}

impl Flow {
    /// Brings the way's `meta` up to date with its entry (after its times
    /// or flags changed).
    #[inline(always)]
    fn seen(&mut self) {
        let i = self.way & (CT_WAYS - 1);
        self.set.meta[i] = ct_meta(&self.set.entries[i]);
    }
}

impl core::ops::Deref for Flow {
    type Target = Ct4Entry;
    #[inline(always)]
    fn deref(&self) -> &Ct4Entry {
        &self.set.entries[self.way & (CT_WAYS - 1)]
    }
}

impl core::ops::DerefMut for Flow {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Ct4Entry {
        &mut self.set.entries[self.way & (CT_WAYS - 1)]
    }
}

/// `k`'s flow, live or not.
#[inline(always)]
fn get_mut(k: &Ct4Key) -> Option<Flow> {
    flow_at(lb_ct_find(k))
}

/// The flow at `at` (`lb_ct_find`'s answer).
#[inline(always)]
fn flow_at(at: u64) -> Option<Flow> {
    if at == NOT_FOUND {
        return None;
    }
    // SAFETY: array value, as in `set_of`.
    let set = unsafe { &mut *CONNTRACK4.get_ptr_mut((at >> 2) as u32)? };
    Some(Flow {
        set,
        way: (at & 3) as usize,
    })
}

/// `k`'s live flow, or None (absent or expired).
#[inline(always)]
pub fn lookup(k: &Ct4Key, now: u32) -> Option<Flow> {
    live(get_mut(k)?, now)
}

/// `lookup`, with the read of the set `next` lives in started first: a
/// new flow's two sets are read side by side (`lb_ct_find_warming`).
#[inline(always)]
pub fn lookup_warming(k: &Ct4Key, next: &Ct4Key, now: u32) -> Option<Flow> {
    live(flow_at(lb_ct_find_warming(k, next))?, now)
}

#[inline(always)]
fn live(e: Flow, now: u32) -> Option<Flow> {
    if expired(&e, now) {
        return None;
    }
    Some(e)
}

/// Records a packet on entry `e` (found under `k`), moving its lifetime with
/// what the packet shows: the first reply makes a flow established; for
/// TCP, a FIN marks its direction done (a half-close stays established),
/// and a RST or a FIN in both directions makes the flow closing. Both
/// entries of the flow learn it, so they age together.
#[inline(always)]
pub fn touch(k: &Ct4Key, e: &mut Flow, pkt: &Packet, len: u32, now: u32) {
    e.last_seen_s = now;
    e.packets += 1;
    e.bytes += len as u64;
    let mut flags = e.flags;
    // Under DSR no reply passes here: the client's ACK of the handshake
    // shows the backend answered.
    if k.dir == CT_REPLY || (flags & CT_DSR != 0 && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK)
    {
        flags |= CT_SEEN_REPLY;
    }
    if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_FIN != 0 {
            flags |= if k.dir == CT_ORIGINAL {
                CT_FIN_ORIGINAL
            } else {
                CT_FIN_REPLY
            };
        }
        if pkt.tcp_flags & TCP_RST != 0
            || flags & (CT_FIN_ORIGINAL | CT_FIN_REPLY) == CT_FIN_ORIGINAL | CT_FIN_REPLY
        {
            flags |= CT_CLOSING;
        }
    }
    // Nothing new (most packets): no other write than the expiry.
    if flags == e.flags {
        e.seen();
        return;
    }
    let lifetime = if flags & CT_CLOSING != 0 {
        CT_LIFETIME_TCP_CLOSING
    } else if pkt.proto != PROTO_TCP {
        CT_LIFETIME_UDP
    } else if flags & CT_SEEN_REPLY != 0 {
        CT_LIFETIME_TCP_ESTABLISHED
    } else {
        CT_LIFETIME_TCP_SYN
    };
    e.flags = flags;
    e.lifetime_s = lifetime;
    e.seen();
    if !paired(e) {
        return;
    }
    // The other direction learns the same, so both age together.
    if let Some(mut o) = get_mut(&other_key(k, e)) {
        o.flags |= flags;
        o.lifetime_s = lifetime;
        o.last_seen_s = now;
        o.seen();
    }
}

/// Writes `k`'s entry (a flow's first packet): over its way if it has
/// one, else over the way of its set with the least to lose at the entry's
/// time. Fails only before the agent made the table. Two CPUs making the
/// same new key at once could both find no way and take two: lookups use
/// the first; it needs two new flows with one tuple in the same
/// nanoseconds.
#[inline(always)]
pub fn create(k: &Ct4Key, e: &Ct4Entry) -> Result<(), ()> {
    if lb_ct_create(k, e) == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// `create`, as a global BPF function (see `lb_ct_find`): 0 when written.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_create(k: *const Ct4Key, e: *const Ct4Entry) -> u64 {
    // SAFETY: null or a key and an entry (checked by the verifier).
    let (Some(k), Some(e)) = (unsafe { k.as_ref() }, unsafe { e.as_ref() }) else {
        return 1;
    };
    let Some((_, set)) = set_of(k) else {
        return 1;
    };
    let i = match key_way(set, k) {
        Some(i) => i,
        None => victim(set, e.last_seen_s),
    };
    write(set, i, k, e, ct_check(k, e));
    0
}

/// Takes the SNAT port `k` names (a reply key) for the flow `e` if no
/// flow holds it: no entry, or one whose port is free again
/// (`snat_port_free`) at `e`'s time. One probe of the set, where a get
/// and an insert would be two.
#[inline(always)]
pub fn reserve_snat_port(k: &Ct4Key, e: &Ct4Entry) -> bool {
    lb_ct_reserve_snat_port(k, e) == 0
}

/// `reserve_snat_port`, as a global BPF function (see `lb_ct_find`): 0
/// when taken.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_reserve_snat_port(k: *const Ct4Key, e: *const Ct4Entry) -> u64 {
    // SAFETY: null or a key and an entry (checked by the verifier).
    let (Some(k), Some(e)) = (unsafe { k.as_ref() }, unsafe { e.as_ref() }) else {
        return 1;
    };
    let Some((_, set)) = set_of(k) else {
        return 1;
    };
    let now = e.last_seen_s;
    let i = match key_way(set, k) {
        Some(i) if valid(set, i, k) && !snat_port_free(&set.entries[i], now) => {
            return 1;
        }
        Some(i) => i,
        None => victim(set, now),
    };
    write(set, i, k, e, ct_check(k, e));
    0
}

/// Empties `k`'s way, if it has one.
#[inline(always)]
fn remove(k: &Ct4Key) {
    lb_ct_remove(k);
}

/// `remove`, as a global BPF function (see `lb_ct_find`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_remove(k: *const Ct4Key) -> u64 {
    // SAFETY: null or a key (checked by the verifier).
    let Some(k) = (unsafe { k.as_ref() }) else {
        return 1;
    };
    let Some((_, set)) = set_of(k) else {
        return 1;
    };
    let Some(i) = way_of(set, k) else {
        return 1;
    };
    // Zeros stored in place (a zeroed key and entry passed to `write`
    // would take 72 bytes of this frame).
    let i = i & (CT_WAYS - 1);
    // SAFETY: an aligned u32 of a map value.
    unsafe { core::ptr::write_volatile(&mut set.check[i], 0) };
    set.meta[i] = 0;
    set.keys[i] = Ct4Key::default();
    set.entries[i] = Ct4Entry::default();
    0
}

/// Removes both directions of the flow `e` (found under `k`).
#[inline(always)]
pub fn forget(k: &Ct4Key, e: &Ct4Entry) {
    if paired(e) {
        remove(&other_key(k, e));
    }
    remove(k);
}

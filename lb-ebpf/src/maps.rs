//! Every map of the datapath. Pinned by name under the agent's bpffs folder,
//! so they outlive the agent and a restart adopts them.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    config::{Config, NodeAddrs4},
    conntrack::{Ct4Set, Frag4Key, Frag4Ports, ct_table_len},
    counters::{BackendStats, MAX_VERDICTS, ServiceStats},
    maps::{
        MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_FRAGS, MAX_FRONTENDS, MAX_NAMES,
        MAX_SERVICES, MAX_SLOTS, MAX_SOCK_FLOWS, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    },
    service::{
        AffinityEntry, AffinityKey, Backend4, Frontend, Frontend4Key, Name, ServiceBackendKey,
        ServiceMeta, SlotChunk, SlotKey, SourceRange4,
    },
    sock::{SockFlow4, SockFlow4Key, SockRevNat4, SockRevNat4Key},
    status::AgentStatus,
};

/// Service frontends: (address, port, protocol, scope) -> backend set.
#[map(name = "LB4_FRONTENDS_V1")]
pub static FRONTENDS4: HashMap<Frontend4Key, Frontend> =
    HashMap::pinned(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Every address the device path translates for (frontend and SNAT
/// addresses) -> `ADDR_*` flags.
#[map(name = "LB4_ADDRS_V1")]
pub static ADDRS4: HashMap<u32, u32> = HashMap::pinned(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Backend sets: (set, chunk) -> the backend ids of 16 slots.
#[map(name = "LB_SLOTS_V2")]
pub static SLOTS: HashMap<SlotKey, SlotChunk> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// (Service port, backend) -> `SB_*`: what the port does with each of
/// its backends.
#[map(name = "LB_SVC_BACKENDS_V1")]
pub static SERVICE_BACKENDS: HashMap<ServiceBackendKey, u32> =
    HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// loadBalancerSourceRanges: (Service port, source prefix) -> 1.
#[map(name = "LB4_SOURCE_RANGES_V1")]
pub static SOURCE_RANGES4: LpmTrie<SourceRange4, u32> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

/// Session affinity: (client, Service port) -> backend and last use.
#[map(name = "LB4_AFFINITY_V1")]
pub static AFFINITY4: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// Backends: id -> address, port, state. An array indexed by id (Katran's
/// reals): a lookup is an index, and the agent's writes cost a copy, not
/// an allocation. An id with no backend reads as zeros: use [`backend`].
#[map(name = "LB4_BACKENDS_V1")]
pub static BACKENDS4: Array<Backend4> = Array::pinned(MAX_BACKENDS + 1, 0);

/// The backend with id `id`, if there is one.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend4> {
    BACKENDS4.get(id).copied().filter(Backend4::is_present)
}

/// Names of Service ports for `lbctl` (never read here).
#[map(name = "LB_SVC_META_V1")]
pub static SERVICE_META: HashMap<u32, ServiceMeta> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Node and zone names by the ids backends carry, for `lbctl` (never read
/// here).
#[map(name = "LB_NAMES_V1")]
pub static NAMES: HashMap<u32, Name> = HashMap::pinned(MAX_NAMES, BPF_F_NO_PREALLOC);

/// Per-packet flows (device path), both directions: a set-associative
/// table (`lb_common::conntrack::Ct4Set`, `crate::conntrack`).
/// Mappable only for where the kernel puts it: an mmapable array's values
/// start on a page, so each 320-byte set is five whole cache lines, its
/// checks, metas and keys the first two (another array's values start 312
/// bytes into its allocation: a set straddled six lines, those three).
/// Nothing maps it.
#[map(name = "LB4_CT_V2")]
pub static CONNTRACK4: Array<Ct4Set> = Array::pinned(ct_table_len(MAX_CONNTRACK), BPF_F_MMAPABLE);

/// Fragmented datagrams: the first fragment's ports, for the later ones.
#[map(name = "LB4_FRAGS_V1")]
pub static FRAGS4: LruHashMap<Frag4Key, Frag4Ports> = LruHashMap::pinned(MAX_FRAGS, 0);

/// Socket-level reverse translation: (cookie, backend) -> frontend.
#[map(name = "LB4_SOCK_REVNAT_V1")]
pub static SOCK_REVNAT4: LruHashMap<SockRevNat4Key, SockRevNat4> =
    LruHashMap::pinned(MAX_SOCK_REVNAT, 0);

/// Unconnected UDP sockets: (cookie, frontend) -> backend.
#[map(name = "LB4_SOCK_FLOWS_V1")]
pub static SOCK_FLOWS4: LruHashMap<SockFlow4Key, SockFlow4> = LruHashMap::pinned(MAX_SOCK_FLOWS, 0);

/// Counters per Service port, per CPU: entries made and removed by the
/// agent with their Service port (never created here), so the memory is
/// that of the ports there are, not of the map's size times the CPUs.
#[map(name = "LB_SVC_STATS_V2")]
pub static SERVICE_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Counters per verdict (`lb_common::counters::V_*`), per CPU.
#[map(name = "LB_VERDICTS_V1")]
pub static VERDICT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_VERDICTS, 0);

/// Counters per backend, per CPU: entries made and removed by the agent
/// with their backend (never created here).
#[map(name = "LB_BE_STATS_V1")]
pub static BACKEND_STATS: PerCpuHashMap<u32, BackendStats> =
    PerCpuHashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// The agent's sync status for `lbctl status` (never read here).
#[map(name = "LB_AGENT_V1")]
pub static AGENT_STATUS: Array<AgentStatus> = Array::pinned(1, 0);

/// Datapath configuration, one entry.
#[map(name = "LB_CONFIG_V2")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// A bit per destination port some frontend or the SNAT range uses
/// (`lb_common::ports`), valid while the config says `CFG_PORTS`.
#[map(name = "LB_PORTS_V1")]
pub static PORTS: Array<u64> = Array::pinned(lb_common::ports::PORT_WORDS, 0);

/// The node's own addresses (`lb_common::config::NodeAddrs4`), one entry.
#[map(name = "LB4_NODE_ADDRS_V1")]
pub static NODE_ADDRS4: Array<NodeAddrs4> = Array::pinned(1, 0);

/// Whether the device path must look further at a packet to `port` (wire
/// order): true unless the agent's port map says no frontend and no SNAT
/// range has it.
#[inline(always)]
pub fn port_in_use(port: u16) -> bool {
    let (word, bit) = lb_common::ports::port_bit(u16::from_be(port));
    PORTS.get(word).is_none_or(|w| w & bit != 0)
}

/// Whether `addr` is one of the node's own addresses (never a ClusterIP).
#[inline(always)]
pub fn is_node_addr(addr: u32) -> bool {
    NODE_ADDRS4.get(0).is_some_and(|n| n.contains(addr))
}

/// Room to build a packet's new headers (a refusal, a translated ICMP
/// error) off the 512-byte BPF stack. Per CPU, one entry, never pinned:
/// only the program run on this CPU uses it, for the length of one run.
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; 128],
}

#[map(name = "LB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Flood protection's state: per CPU, the time (ns) its next new flow is
/// due at the configured rate (`flood::over_rate`). Never pinned: a
/// reload starts afresh.
#[map(name = "LB_FLOOD")]
pub static FLOOD: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The coarse clock's second as this CPU last read it, and the jiffy it
/// read it in (`conntrack::now_s`). Never pinned: a reload starts afresh.
#[map(name = "LB_CLOCK")]
pub static CLOCK: PerCpuArray<crate::conntrack::Clock> = PerCpuArray::with_max_entries(1, 0);

/// The FIB's recent answers, per CPU (`route::lookup_from`). Never
/// pinned: a reload starts afresh.
#[map(name = "LB_NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<crate::route::NextHop> =
    PerCpuArray::with_max_entries(crate::route::NEXT_HOP_SLOTS, 0);

/// This CPU's scratch area as a `T`: a repr(C) struct of byte arrays
/// (alignment 1) of at most 128 bytes.
#[inline(always)]
pub fn scratch<T>() -> Option<&'static mut T> {
    const { assert!(core::mem::size_of::<T>() <= 128 && core::mem::align_of::<T>() == 1) };
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, a program runs to completion on its CPU; the
    // buffer holds a T (size and alignment asserted above).
    Some(unsafe { &mut *((*p).buf.as_mut_ptr() as *mut T) })
}

// The names above are checked against `lb_common::maps` by lbctl's tests,
// which open every map by those constants in the built object.

//! Names and sizes of the maps, shared so the user side opens exactly what the
//! kernel object declares. Every name ends in the layout version.

pub const FRONTENDS4: &str = "LB4_FRONTENDS_V1";
pub const ADDRS4: &str = "LB4_ADDRS_V1";
pub const BACKEND_SLOTS: &str = "LB_SLOTS_V2";
pub const SERVICE_BACKENDS: &str = "LB_SVC_BACKENDS_V1";
pub const AFFINITY4: &str = "LB4_AFFINITY_V1";
pub const SOURCE_RANGES4: &str = "LB4_SOURCE_RANGES_V1";
pub const BACKENDS4: &str = "LB4_BACKENDS_V1";
pub const SERVICE_META: &str = "LB_SVC_META_V1";
pub const NAMES: &str = "LB_NAMES_V1";
pub const CONNTRACK4: &str = "LB4_CT_V2";
pub const FRAGS4: &str = "LB4_FRAGS_V1";
pub const SOCK_REVNAT4: &str = "LB4_SOCK_REVNAT_V1";
pub const SOCK_FLOWS4: &str = "LB4_SOCK_FLOWS_V1";
pub const SERVICE_STATS: &str = "LB_SVC_STATS_V2";
pub const VERDICT_STATS: &str = "LB_VERDICTS_V1";
pub const CONFIG: &str = "LB_CONFIG_V2";
pub const BACKEND_STATS: &str = "LB_BE_STATS_V1";
pub const AGENT_STATUS: &str = "LB_AGENT_V1";
/// A bit per destination port the device path looks further at
/// (`crate::ports`).
pub const PORTS: &str = "LB_PORTS_V1";
/// The node's own addresses, known without the address map's lookup
/// (`crate::config::NodeAddrs4`).
pub const NODE_ADDRS4: &str = "LB4_NODE_ADDRS_V1";

/// Every map the agent pins, in the order `lbctl` lists them.
pub const ALL: &[&str] = &[
    FRONTENDS4,
    ADDRS4,
    BACKEND_SLOTS,
    SERVICE_BACKENDS,
    SOURCE_RANGES4,
    BACKENDS4,
    SERVICE_META,
    NAMES,
    CONNTRACK4,
    FRAGS4,
    AFFINITY4,
    SOCK_REVNAT4,
    SOCK_FLOWS4,
    SERVICE_STATS,
    VERDICT_STATS,
    CONFIG,
    BACKEND_STATS,
    AGENT_STATUS,
    PORTS,
    NODE_ADDRS4,
];

/// Maps from an earlier layout that the agent removes when it finds them
/// pinned (their successors carry the next `_V<n>`).
pub const RETIRED: &[&str] = &[
    // A per-CPU array indexed by service id: its memory grew with the
    // CPU count whatever the number of Services. Now a per-CPU hash.
    "LB_SVC_STATS_V1",
    // A backend's node and zone names and conditions, 104 bytes per
    // backend. Now ids and bits in `LB4_BACKENDS_V1` and one name per node
    // or zone in `LB_NAMES_V1`.
    "LB_BE_META_V1",
    // One entry per slot. Now 16 slots an entry (`SlotChunk`); the agent
    // converts the entries when it finds the map (`RETIRED_SLOTS`).
    RETIRED_SLOTS,
    // A kernel LRU hash of flows. Now a set-associative table in an array
    // (`conntrack::Ct4Set`); the agent moves the flows over when it finds
    // the map (`RETIRED_CONNTRACK4`).
    RETIRED_CONNTRACK4,
    // 56 bytes; now 72, with the flood protection's rate. The agent
    // writes the configuration whole at start: nothing to carry over.
    "LB_CONFIG_V1",
];

/// The flows of the first layout: an LRU hash, (`Ct4Key`) -> `Ct4Entry`.
pub const RETIRED_CONNTRACK4: &str = "LB4_CT_V1";

/// The backend slots of the first layout: (set, slot) -> backend id.
pub const RETIRED_SLOTS: &str = "LB_SLOTS_V1";

/// Default of the agent's `--lb-map-max` (Cilium's `bpf-lb-map-max`
/// default): the size of the Service maps, see [`lb_map_sizes`]. A node of
/// a cluster with up to 65,536 Service frontends and backends fits.
pub const DEFAULT_LB_MAP_MAX: u32 = 1 << 16;

/// The maps `--lb-map-max N` sizes and how many entries each holds for
/// `n`: one per frontend, address, Service port or backend each (`n`);
/// chunks of backend slots (16 slots each, at least one per set) and
/// (Service port, backend) pairs twice that (a port's Cluster and Local
/// lists, and its old and new set during a swap), the slots plus
/// `maglev_chunks` for Maglev tables ([`maglev_chunks`]). All are hashes
/// without preallocation (an LPM trie for the ranges: a map holds a bucket
/// array, 16 bytes per power-of-two entry, until entries come), except
/// the backends: an array indexed by backend id (`1..=n`), see
/// [`lb_map_entries`].
pub const fn lb_map_sizes(n: u32, maglev_chunks: u32) -> [(&'static str, u32); 9] {
    sizes(n, maglev_chunks, 0)
}

/// The kernel's `max_entries` of the maps [`lb_map_sizes`] sizes: the
/// same, but the backends array has one more (index 0 is "no backend",
/// so ids `1..=n` index it).
pub const fn lb_map_entries(n: u32, maglev_chunks: u32) -> [(&'static str, u32); 9] {
    sizes(n, maglev_chunks, 1)
}

/// Slot chunks `tables` Maglev tables of `table_size` slots take (a table
/// being replaced counts until the old one is deleted).
pub const fn maglev_chunks(tables: u32, table_size: u32) -> u32 {
    tables.saturating_mul(table_size.div_ceil(crate::service::SLOTS_PER_CHUNK))
}

/// Default of the agent's `--maglev-map-max`: Maglev tables the slots map
/// has room for beyond `--lb-map-max`'s sets (8 MiB of slots at the
/// default table size when all are used, 1 MiB more of empty hash
/// buckets while none is).
pub const DEFAULT_MAGLEV_MAP_MAX: u32 = 64;

/// Default of `--maglev-table-size`: Cilium's (64 KiB of backend ids a
/// table; Services up to about 160 backends at the Maglev paper's
/// `M >= 100 N`).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// The slot chunks the defaults leave for Maglev tables.
pub const DEFAULT_MAGLEV_CHUNKS: u32 =
    maglev_chunks(DEFAULT_MAGLEV_MAP_MAX, DEFAULT_MAGLEV_TABLE_SIZE);

const fn sizes(n: u32, maglev_chunks: u32, backends_extra: u32) -> [(&'static str, u32); 9] {
    let twice = n.saturating_mul(2);
    [
        (FRONTENDS4, n),
        (ADDRS4, n),
        (SERVICE_META, n),
        (SERVICE_STATS, n),
        (SOURCE_RANGES4, n),
        (BACKENDS4, n.saturating_add(backends_extra)),
        (BACKEND_STATS, n),
        (BACKEND_SLOTS, twice.saturating_add(maglev_chunks)),
        (SERVICE_BACKENDS, twice),
    ]
}

/// Frontends (address, port, protocol, scope), as compiled; the agent
/// sizes them with `--lb-map-max`.
pub const MAX_FRONTENDS: u32 = DEFAULT_LB_MAP_MAX;
/// Chunks of 16 backend slots over all live backend sets (at least one
/// per set); also the size of the (Service port, backend) pairs.
pub const MAX_SLOTS: u32 = DEFAULT_LB_MAP_MAX * 2 + DEFAULT_MAGLEV_CHUNKS;
/// Distinct backends (address, port, protocol); the array of them has
/// one more entry (index 0 is "no backend").
pub const MAX_BACKENDS: u32 = DEFAULT_LB_MAP_MAX;
/// Node and zone names (`LB_NAMES_V1`): ids up to `NAME_NODE_MAX` nodes
/// and 255 zones.
pub const MAX_NAMES: u32 = 1 << 15;
/// Service ports (the unit of counters and names).
pub const MAX_SERVICES: u32 = DEFAULT_LB_MAP_MAX;
/// Service port ids are `1..SERVICE_ID_SPACE`: keys of hashes, not
/// indexes, so the id space is not a map size. Backend ids index the
/// backends array: `1..=` its size (`--lb-map-max`).
pub const SERVICE_ID_SPACE: u32 = 1 << 24;
/// Per-packet connection tracking entries (two per NodePort/external
/// flow), as compiled: the table is preallocated (80 bytes an entry,
/// `conntrack::Ct4Set`), so the agent sizes it from the node's memory
/// (`--conntrack-max`, entries; the map has `conntrack::ct_table_len` sets).
pub const MAX_CONNTRACK: u32 = 1 << 16;
/// Fragmented datagrams in flight through the device path (first
/// fragment's ports by source, destination, IP id and protocol), least
/// recently used evicted first: fragments of one datagram arrive within
/// milliseconds, so a few thousand cover any burst.
pub const MAX_FRAGS: u32 = 1 << 13;
/// Socket-level reverse translations (one per translated socket and backend).
pub const MAX_SOCK_REVNAT: u32 = 1 << 16;
/// Unconnected UDP sockets' chosen backend per frontend.
pub const MAX_SOCK_FLOWS: u32 = 1 << 14;
/// Session affinity entries (client, Service port), least recently used
/// evicted first.
pub const MAX_AFFINITY: u32 = 1 << 14;
/// loadBalancerSourceRanges prefixes over all Service ports.
pub const MAX_SOURCE_RANGES: u32 = 1 << 16;

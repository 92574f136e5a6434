//! Names and sizes of the maps, shared so the user side opens exactly what the
//! kernel object declares. Every name ends in the layout version.

pub const FRONTENDS4: &str = "LB4_FRONTENDS_V1";
pub const ADDRS4: &str = "LB4_ADDRS_V1";
pub const BACKEND_SLOTS: &str = "LB_SLOTS_V1";
pub const SERVICE_BACKENDS: &str = "LB_SVC_BACKENDS_V1";
pub const AFFINITY4: &str = "LB4_AFFINITY_V1";
pub const SOURCE_RANGES4: &str = "LB4_SOURCE_RANGES_V1";
pub const BACKENDS4: &str = "LB4_BACKENDS_V1";
pub const SERVICE_META: &str = "LB_SVC_META_V1";
pub const BACKEND_META: &str = "LB_BE_META_V1";
pub const CONNTRACK4: &str = "LB4_CT_V1";
pub const FRAGS4: &str = "LB4_FRAGS_V1";
pub const SOCK_REVNAT4: &str = "LB4_SOCK_REVNAT_V1";
pub const SOCK_FLOWS4: &str = "LB4_SOCK_FLOWS_V1";
pub const SERVICE_STATS: &str = "LB_SVC_STATS_V1";
pub const VERDICT_STATS: &str = "LB_VERDICTS_V1";
pub const CONFIG: &str = "LB_CONFIG_V1";
pub const BACKEND_STATS: &str = "LB_BE_STATS_V1";
pub const AGENT_STATUS: &str = "LB_AGENT_V1";

/// Every map the agent pins, in the order `lbctl` lists them.
pub const ALL: &[&str] = &[
    FRONTENDS4,
    ADDRS4,
    BACKEND_SLOTS,
    SERVICE_BACKENDS,
    SOURCE_RANGES4,
    BACKENDS4,
    SERVICE_META,
    BACKEND_META,
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
];

/// Frontends (address, port, protocol, scope). 100,000 Services with a
/// ClusterIP, a NodePort on two node addresses and an external IP fit.
pub const MAX_FRONTENDS: u32 = 1 << 19;
/// Backend slots over all live backend sets (two sets per service port may
/// exist for an instant during a swap).
pub const MAX_SLOTS: u32 = 1 << 21;
/// Distinct backends (address, port, protocol).
pub const MAX_BACKENDS: u32 = 1 << 20;
/// Service ports (the unit of counters and names); ids are `1..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 1 << 18;
/// Per-packet connection tracking entries (two per NodePort/external flow).
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Fragmented datagrams in flight through the device path (first
/// fragment's ports by source, destination, IP id and protocol), least
/// recently used evicted first: fragments of one datagram arrive within
/// milliseconds, so a few thousand cover any burst.
pub const MAX_FRAGS: u32 = 1 << 13;
/// Socket-level reverse translations (one per translated socket and backend).
pub const MAX_SOCK_REVNAT: u32 = 1 << 18;
/// Unconnected UDP sockets' chosen backend per frontend.
pub const MAX_SOCK_FLOWS: u32 = 1 << 17;
/// Session affinity entries (client, Service port), least recently used
/// evicted first.
pub const MAX_AFFINITY: u32 = 1 << 16;
/// loadBalancerSourceRanges prefixes over all Service ports.
pub const MAX_SOURCE_RANGES: u32 = 1 << 16;

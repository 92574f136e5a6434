//! Service frontends, backend sets and backends.
//!
//! ```text
//! LB4_FRONTENDS_V1   (addr, port, proto, scope) -> Frontend { service_id, backend_set, count, .. }
//! LB_SLOTS_V1        (backend_set, slot)         -> backend_id
//! LB4_BACKENDS_V1    backend_id (array index)    -> Backend4 { addr, port, proto, state, flags }
//! ```
//!
//! A Service's backend set is replaced atomically: the agent writes the new
//! set under a fresh `backend_set` id, then flips each frontend to it with one
//! map update (a packet reads a frontend once), then deletes the old set.

use crate::user_pod;

/// Frontend scope: which traffic a frontend entry serves. `ALL` serves
/// everything unless the entry has `FE_TWO_SCOPES`: then traffic from
/// inside the node (pods and host processes, the socket path) reads the
/// `INTERNAL` entry of the same address instead. That is how an external
/// frontend (NodePort, LoadBalancer, external IP) under
/// `externalTrafficPolicy: Local` sends outside clients to this node's
/// endpoints only while pods and the node reach every endpoint, as
/// kube-proxy's short-circuit rules do.
pub const SCOPE_ALL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// What kind of address a frontend is (`Frontend::kind`).
pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_NODE_PORT: u8 = 2;
pub const KIND_EXTERNAL_IP: u8 = 3;
pub const KIND_LOAD_BALANCER: u8 = 4;

/// `Frontend::flags`.
pub const FE_AFFINITY_CLIENT_IP: u16 = 1 << 0;
pub const FE_EXTERNAL_LOCAL: u16 = 1 << 1;
pub const FE_INTERNAL_LOCAL: u16 = 1 << 2;
/// Reject (rather than drop) new flows when there is no backend: the
/// Service has no usable endpoint anywhere (kube-proxy's REJECT). Without
/// it, `count == 0` means a traffic policy left this node none (DROP).
pub const FE_REJECT_NO_BACKEND: u16 = 1 << 3;
/// Traffic from inside the node reads the `SCOPE_INTERNAL` entry instead.
pub const FE_TWO_SCOPES: u16 = 1 << 4;
/// The entry's backend set is the Local-policy list (`SB_LOCAL`), else
/// the Cluster-policy one (`SB_CLUSTER`).
pub const FE_LOCAL_LIST: u16 = 1 << 5;
/// A LoadBalancer IP whose Service has `loadBalancerSourceRanges`: new
/// flows from outside only from a source in `LB4_SOURCE_RANGES_V1`.
pub const FE_SOURCE_RANGES: u16 = 1 << 6;
/// The backend set is a Maglev table (`count` slots, a prime): new flows
/// from outside hash without the destination address (`hash::maglev4`),
/// so every node's table, built from the same backends, gives a flow the
/// same backend whichever node address or router path it came by.
pub const FE_MAGLEV: u16 = 1 << 7;
/// Direct server return (`lb_common::dsr`): a new flow from outside to a
/// backend on another node goes there in IPIP, not SNATed, and the
/// backend's node sends the replies straight to the client. Set on
/// NodePort, LoadBalancer and external IP frontends only.
pub const FE_DSR: u16 = 1 << 8;

/// `LB4_SOURCE_RANGES_V1` (LPM trie) data: a Service port and a source
/// prefix. The trie's prefix length counts the 32 bits of the service id
/// too, so one lookup `(32 + 32, service, source)` finds whether any of the
/// port's ranges holds the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4 {
    pub service_id: u32,
    /// Wire order.
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<SourceRange4>() == 8);
/// Bits of `SourceRange4::service_id` in a trie prefix length.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// `LB4_ADDRS_V1` values: why an address is there. The device path looks
/// up a packet's destination here first, so traffic not for a Service costs
/// one lookup.
pub const ADDR_FRONTEND: u32 = 1 << 0;
/// Replies of SNATed flows come back to this address.
pub const ADDR_SNAT: u32 = 1 << 1;
/// Some Service's ClusterIP: a port no Service defines on it is refused.
pub const ADDR_CLUSTER_IP: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend4Key {
    /// Wire order.
    pub addr: u32,
    /// Wire order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<Frontend4Key>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Dense id of the Service port: index of counters and names.
    pub service_id: u32,
    /// Id of the backend set serving this frontend now.
    pub backend_set: u32,
    /// Backends for new flows in slots `0..count`; 0 = no backend. Under
    /// `FE_MAGLEV` the table's size (each backend holds slots in
    /// proportion to its weight), else one slot per backend.
    pub count: u16,
    /// How many of those `count` are terminating-but-serving endpoints,
    /// used because no endpoint is ready (kube-proxy's fallback): 0 or
    /// `count`. The datapath does not read it; `lbctl` shows it.
    pub terminating: u16,
    pub flags: u16,
    pub kind: u8,
    pub _pad: u8,
    /// Session affinity timeout in seconds when `FE_AFFINITY_CLIENT_IP`.
    pub affinity_timeout_s: u32,
    /// How many distinct backends the set holds, for `lbctl` (the kernel
    /// reads `count`). Was `_reserved`, always 0: an older agent's entry
    /// reads as "see `count`".
    pub backends: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 24);

impl Frontend {
    /// How many backends new flows go to (`count` is a table's size under
    /// `FE_MAGLEV`).
    pub const fn backend_count(&self) -> u32 {
        if self.flags & FE_MAGLEV != 0 {
            self.backends
        } else {
            self.count as u32
        }
    }
}

/// Backend ids per `LB_SLOTS_V2` entry: a set of `n` backends takes
/// `ceil(n / 16)` entries, so a Service of 10 endpoints is one map entry
/// (one write at sync, one lookup per new flow).
pub const SLOTS_PER_CHUNK: u32 = 16;

/// `LB_SLOTS_V2` key: chunk `chunk` of backend set `backend_set`, which
/// holds the set's slots `chunk * 16 .. chunk * 16 + 15`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub backend_set: u32,
    pub chunk: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

impl SlotKey {
    /// The chunk that holds slot `slot` of `backend_set`, and the slot's
    /// index in it.
    #[inline(always)]
    pub const fn of_slot(backend_set: u32, slot: u32) -> (Self, usize) {
        (
            Self {
                backend_set,
                chunk: slot / SLOTS_PER_CHUNK,
            },
            (slot % SLOTS_PER_CHUNK) as usize,
        )
    }
}

/// `LB_SLOTS_V2` value: backend ids of 16 consecutive slots. Slots past
/// the set's end hold 0 (no backend has id 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotChunk {
    pub backends: [u32; SLOTS_PER_CHUNK as usize],
}
const _: () = assert!(core::mem::size_of::<SlotChunk>() == 64);

/// `LB_SVC_BACKENDS_V1`: (Service port, backend) -> `SB_*` flags. Every
/// endpoint of a Service port (ready, terminating, or neither), and what
/// the port does with it. A flow whose backend has no entry here any more
/// has lost its backend (the device path ends or moves it); session
/// affinity asks "may this frontend still give the client's backend new
/// flows"; `lbctl` shows why a backend gets no new flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceBackendKey {
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceBackendKey>() == 8);

/// `LB4_AFFINITY_V1` key: a client of a Service port under
/// `sessionAffinity: ClientIP`. Outside clients (device path) are their
/// IPv4 address; pods and host processes (socket path, where the source
/// address is not chosen yet at connect) their network namespace's
/// cookie: one per pod, as its address is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub client: u64,
    pub service_id: u32,
    /// `AFFINITY_BY_*`.
    pub kind: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// `LB_SVC_BACKENDS_V1` values: the backend gets new flows of frontends
/// that read the Cluster-policy list, of ones that read the Local-policy
/// list; it is in them as a terminating fallback (no endpoint was ready);
/// topology hints left it out of the Cluster list.
pub const SB_CLUSTER: u32 = 1 << 0;
pub const SB_LOCAL: u32 = 1 << 1;
pub const SB_FALLBACK: u32 = 1 << 2;
pub const SB_TOPOLOGY_FILTERED: u32 = 1 << 3;
/// Ready, or serving and terminating: its UDP flows stay. Without it (not
/// ready, not serving) only its TCP connections go on.
pub const SB_SERVING: u32 = 1 << 4;
/// Weight 0 (the Service's backend-weights annotation): no new flows, its
/// flows stay (drained).
pub const SB_DRAINED: u32 = 1 << 5;

pub const AFFINITY_BY_ADDR: u8 = 1;
pub const AFFINITY_BY_NETNS: u8 = 2;

/// The backend a client was last given and when (seconds of the coarse
/// monotonic clock); it holds while `now - last_s <= timeout`, and each
/// new connection that uses it moves `last_s`, as iptables' `recent`
/// match does for kube-proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub last_s: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 8);

/// `Backend4::state`.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
/// Not ready and not serving: kept only so existing flows can drain.
pub const BACKEND_QUARANTINED: u8 = 2;

/// `Backend4::flags`: the backend runs on this node (no SNAT needed for
/// NodePort traffic, eligible under `Local` traffic policies).
pub const BACKEND_LOCAL: u8 = 1 << 0;
/// `Backend4::flags`: the endpoint's conditions as the API had them, for
/// `lbctl` (the kernel reads `state`): bits `COND_*` shifted by this.
pub const BACKEND_COND_SHIFT: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    /// Wire order.
    pub addr: u32,
    /// Wire order.
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    /// `BACKEND_LOCAL`, and the conditions (`BACKEND_COND_SHIFT`).
    pub flags: u8,
    /// The endpoint's zone: its name is `LB_NAMES_V1[NAME_ZONE | zone]`;
    /// 0 = none. For `lbctl`: topology is decided by the agent. (Always 0
    /// before names had ids, so older entries read as "no zone".)
    pub zone: u8,
    /// The endpoint's node: `LB_NAMES_V1[NAME_NODE | node]`; 0 = none.
    /// (Was padding, always 0.)
    pub node: u16,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 12);

impl Backend4 {
    /// `LB4_BACKENDS_V1` is an array indexed by backend id: an id with no
    /// backend reads as all zeros, and no endpoint has address 0.0.0.0
    /// (the agent never writes one).
    #[inline(always)]
    pub const fn is_present(&self) -> bool {
        self.addr != 0
    }
}

/// `LB_NAMES_V1` keys: node and zone names by the id backends carry, for
/// `lbctl`; the kernel never reads them. One entry per node or zone, where
/// a name per backend took a 104-byte value for each (`LB_BE_META_V1`).
pub const NAME_NODE: u32 = 1 << 16;
pub const NAME_ZONE: u32 = 2 << 16;
/// Ids `1..=NAME_NODE_MAX` for nodes, `1..=255` for zones (`Backend4`'s
/// field sizes); a name past them is shown as none.
pub const NAME_NODE_MAX: u16 = 16_383;
pub const NAME_ZONE_MAX: u8 = u8::MAX;

/// A node or zone name, NUL-padded UTF-8 (Kubernetes names fit in 63
/// bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name {
    pub name: [u8; 64],
}
const _: () = assert!(core::mem::size_of::<Name>() == 64);

impl Default for Name {
    fn default() -> Self {
        Self { name: [0; 64] }
    }
}

/// Names for `lbctl`, written by the agent; the kernel never reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// NUL-padded UTF-8.
    pub namespace: [u8; 64],
    pub name: [u8; 64],
    pub port_name: [u8; 16],
    /// `SVC_TYPE_*`.
    pub svc_type: u8,
    /// `POLICY_*` for externalTrafficPolicy and internalTrafficPolicy.
    pub external_policy: u8,
    pub internal_policy: u8,
    pub proto: u8,
    /// Host order.
    pub port: u16,
    pub node_port: u16,
    pub affinity_timeout_s: u32,
    /// `NE_*`: fields of this Service port the agent accepted but the
    /// datapath does not act on yet (was `_reserved`, always 0 before, so
    /// an older agent's entries read as "nothing to report").
    pub not_enforced: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceMeta>() == 160);

impl Default for ServiceMeta {
    fn default() -> Self {
        Self {
            namespace: [0; 64],
            name: [0; 64],
            port_name: [0; 16],
            svc_type: 0,
            external_policy: 0,
            internal_policy: 0,
            proto: 0,
            port: 0,
            node_port: 0,
            affinity_timeout_s: 0,
            not_enforced: 0,
        }
    }
}

/// `ServiceMeta::not_enforced` bits: what a Service asks for that the
/// datapath does not do yet. The agent logs them and `lbctl services`
/// shows them, so nothing is silently ignored. Append only.
pub const NE_SESSION_AFFINITY: u32 = 1 << 0;
pub const NE_EXTERNAL_TRAFFIC_LOCAL: u32 = 1 << 1;
pub const NE_INTERNAL_TRAFFIC_LOCAL: u32 = 1 << 2;
/// No longer set: the agent serves health check node ports. Kept so the
/// bit keeps its meaning in maps an older agent wrote.
pub const NE_HEALTH_CHECK_NODE_PORT: u32 = 1 << 3;
pub const NE_SOURCE_RANGES: u32 = 1 << 4;
pub const NE_TOPOLOGY: u32 = 1 << 5;
pub const NE_LB_IP_MODE_PROXY: u32 = 1 << 6;
pub const NE_PROTOCOL_SCTP: u32 = 1 << 7;
/// An `lbctl.dev/` load-balancing annotation could not be read: the
/// port runs with the agent's defaults (the agent logs why).
pub const NE_LB_ANNOTATION: u32 = 1 << 8;
/// Backend weights other than 0 under `lbctl.dev/lb-algorithm: hash`
/// (weights need Maglev; 0 still drains).
pub const NE_WEIGHTS_WITHOUT_MAGLEV: u32 = 1 << 9;

/// Each `NE_*` bit and the Service field it stands for, as users write it.
pub const NOT_ENFORCED: &[(u32, &str)] = &[
    (NE_SESSION_AFFINITY, "sessionAffinity: ClientIP"),
    (NE_EXTERNAL_TRAFFIC_LOCAL, "externalTrafficPolicy: Local"),
    (NE_INTERNAL_TRAFFIC_LOCAL, "internalTrafficPolicy: Local"),
    (NE_HEALTH_CHECK_NODE_PORT, "healthCheckNodePort"),
    (NE_SOURCE_RANGES, "loadBalancerSourceRanges"),
    (NE_TOPOLOGY, "trafficDistribution / topology hints"),
    (NE_LB_IP_MODE_PROXY, "loadBalancer ipMode: Proxy"),
    (NE_PROTOCOL_SCTP, "protocol: SCTP"),
    (
        NE_LB_ANNOTATION,
        "lbctl.dev annotation (unreadable, ignored)",
    ),
    (
        NE_WEIGHTS_WITHOUT_MAGLEV,
        "backend weights under lb-algorithm: hash",
    ),
];

/// The names of the bits set in `bits`, in `NOT_ENFORCED` order.
pub fn not_enforced_names(bits: u32) -> impl Iterator<Item = &'static str> {
    NOT_ENFORCED
        .iter()
        .filter(move |(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
}

pub const SVC_TYPE_CLUSTER_IP: u8 = 1;
pub const SVC_TYPE_NODE_PORT: u8 = 2;
pub const SVC_TYPE_LOAD_BALANCER: u8 = 3;

pub const POLICY_CLUSTER: u8 = 0;
pub const POLICY_LOCAL: u8 = 1;

pub const COND_READY: u8 = 1 << 0;
pub const COND_SERVING: u8 = 1 << 1;
pub const COND_TERMINATING: u8 = 1 << 2;

user_pod!(
    Frontend4Key,
    Frontend,
    SlotKey,
    SlotChunk,
    ServiceBackendKey,
    SourceRange4,
    AffinityKey,
    AffinityEntry,
    Backend4,
    ServiceMeta,
    Name
);

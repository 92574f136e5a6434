//! Service frontends, backend sets and backends.
//!
//! ```text
//! LB4_FRONTENDS_V1   (addr, port, proto, scope) -> Frontend { service_id, backend_set, count, .. }
//! LB_SLOTS_V1        (backend_set, slot)         -> backend_id
//! LB4_BACKENDS_V1    backend_id                  -> Backend4 { addr, port, proto, state, flags }
//! ```
//!
//! A Service's backend set is replaced atomically: the agent writes the new
//! set under a fresh `backend_set` id, then flips each frontend to it with one
//! map update (a packet reads a frontend once), then deletes the old set.

use crate::user_pod;

/// Frontend scope: which traffic a frontend entry serves. Reserved for
/// traffic policies: when external and internal backend sets differ, the
/// agent writes an `INTERNAL` entry beside the `ALL` one.
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
/// Reject (rather than drop) new flows when there is no backend.
pub const FE_REJECT_NO_BACKEND: u16 = 1 << 3;

/// `LB4_ADDRS_V1` values: why an address is there. The device path looks
/// up a packet's destination here first, so traffic not for a Service costs
/// one lookup.
pub const ADDR_FRONTEND: u32 = 1 << 0;
/// Replies of SNATed flows come back to this address.
pub const ADDR_SNAT: u32 = 1 << 1;

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
    /// Serving backends in slots `0..count`; 0 = no backend.
    pub count: u16,
    /// Terminating-but-serving backends in slots `count..count+terminating`,
    /// used only when `count == 0` (terminating endpoints fallback).
    pub terminating: u16,
    pub flags: u16,
    pub kind: u8,
    pub _pad: u8,
    /// Session affinity timeout in seconds when `FE_AFFINITY_CLIENT_IP`.
    pub affinity_timeout_s: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub backend_set: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// `Backend4::state`.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
/// Not ready and not serving: kept only so existing flows can drain.
pub const BACKEND_QUARANTINED: u8 = 2;

/// `Backend4::flags`: the backend runs on this node (no SNAT needed for
/// NodePort traffic, eligible under `Local` traffic policies).
pub const BACKEND_LOCAL: u8 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    /// Wire order.
    pub addr: u32,
    /// Wire order.
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub flags: u8,
    /// Agent-assigned zone index (topology hints), 0 = unknown.
    pub zone: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 12);

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

/// Backend names for `lbctl`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendMeta {
    pub node_name: [u8; 64],
    pub zone: [u8; 32],
    /// Endpoint conditions as the API had them (`COND_*`).
    pub conditions: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<BackendMeta>() == 104);

impl Default for BackendMeta {
    fn default() -> Self {
        Self {
            node_name: [0; 64],
            zone: [0; 32],
            conditions: 0,
            _pad: [0; 7],
        }
    }
}

pub const COND_READY: u8 = 1 << 0;
pub const COND_SERVING: u8 = 1 << 1;
pub const COND_TERMINATING: u8 = 1 << 2;

user_pod!(
    Frontend4Key,
    Frontend,
    SlotKey,
    Backend4,
    ServiceMeta,
    BackendMeta
);

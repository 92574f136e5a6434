//! Counters: per Service port and per verdict, in per-CPU arrays.
//!
//! The verdict list is append-only: a number, once given, keeps its meaning
//! in every release, so dashboards and `lbctl` from different versions agree.

use crate::user_pod;

/// Per Service port (`LB_SVC_STATS_V1[service_id]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Flows (connections, UDP sockets, NodePort flows) given a backend.
    pub flows: u64,
    /// Packets and bytes translated per packet (device path only; the socket
    /// path translates once per socket and sees no packets).
    pub packets: u64,
    pub bytes: u64,
    /// New flows refused because the service had no backend.
    pub no_backend: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 32);

/// Per backend (`LB_BE_STATS_V1[backend_id]`, per CPU): a hash entry the
/// agent creates with the backend and deletes with it, so memory follows
/// the backends that exist (backends x CPUs x 24 bytes) instead of a
/// per-CPU array sized for every possible backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Flows given this backend (device path flows and translated sockets).
    pub flows: u64,
    /// Packets and bytes of the device path's flows to and from it.
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 24);

user_pod!(ServiceStats, BackendStats);

macro_rules! verdicts {
    ($($(#[$doc:meta])* $name:ident = $val:literal, $label:literal;)+) => {
        $( $(#[$doc])* pub const $name: u32 = $val; )+
        /// `(number, metric label)` of every verdict, in number order.
        pub const VERDICTS: &[(u32, &str)] = &[$(($val, $label)),+];
    };
}

verdicts! {
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): passed untouched.
    V_PASS_NOT_IPV4 = 0, "pass_not_ipv4";
    /// IPv4 but not for a Service and no flow: passed untouched.
    V_PASS_NOT_SERVICE = 1, "pass_not_service";
    /// New flow given a backend (device path).
    V_FORWARD_NEW = 2, "forward_new";
    /// Packet of a known flow, original direction.
    V_FORWARD_ESTABLISHED = 3, "forward_established";
    /// Reply translated back to the frontend.
    V_REPLY = 4, "reply";
    /// Socket translated at connect/sendmsg.
    V_SOCK_TRANSLATED = 5, "sock_translated";
    /// Socket address translated back at recvmsg/getpeername.
    V_SOCK_REVERSED = 6, "sock_reversed";
    /// Headers shorter than they claim: passed to the stack to drop.
    V_PASS_TRUNCATED = 7, "pass_truncated";
    /// A protocol other than TCP, UDP and ICMP (or an ICMP fragment):
    /// passed.
    V_PASS_UNSUPPORTED = 8, "pass_unsupported";
    /// New flow to a Service with no backend: dropped or refused.
    V_DROP_NO_BACKEND = 9, "drop_no_backend";
    /// A backend slot or backend vanished mid-update.
    V_DROP_STALE_BACKEND = 10, "drop_stale_backend";
    /// No route to the backend or client (device path redirect).
    V_DROP_NO_ROUTE = 11, "drop_no_route";
    /// Connection tracking table refused an entry.
    V_DROP_CT_FULL = 12, "drop_ct_full";
    /// Rewriting the packet failed.
    V_DROP_REWRITE = 13, "drop_rewrite";
    /// New flow to a Service that has endpoints, but none this traffic
    /// may use here (`externalTrafficPolicy`/`internalTrafficPolicy:
    /// Local` with no endpoint on this node): dropped, as kube-proxy does.
    V_DROP_NO_LOCAL_BACKEND = 14, "drop_no_local_backend";
    /// New flow to a Service with no endpoint at all, refused: a TCP RST
    /// or an ICMP port unreachable sent back (device path), ECONNREFUSED
    /// (socket path). `drop_no_backend` counts the ones that could not be
    /// answered (IP options, a reply that could not be built).
    V_REJECT_NO_BACKEND = 15, "reject_no_backend";
    /// To a ClusterIP on a port its Service does not define: refused
    /// (kube-proxy's nftables mode does the same).
    V_REJECT_UNDEFINED_PORT = 16, "reject_undefined_port";
    /// A TCP segment of a flow whose backend left the Service: the flow is
    /// ended at once with a RST to the client (its entries removed), not
    /// left to time out against a backend that is gone.
    V_RESET_BACKEND_GONE = 17, "reset_backend_gone";
    /// A UDP datagram (or a TCP SYN) of a flow whose backend left the
    /// Service, or a SYN reusing a closing flow's tuple: a new flow, to a
    /// live backend.
    V_FORWARD_RENEWED = 18, "forward_renewed";
    /// A new flow to a LoadBalancer IP from a source outside its
    /// Service's `loadBalancerSourceRanges`: dropped.
    V_DROP_SOURCE_RANGE = 19, "drop_source_range";
    /// A new flow to a backend on another node found no free port in the
    /// SNAT range (`--snat-port-range`) after its tries: dropped.
    V_DROP_NO_SNAT_PORT = 20, "drop_no_snat_port";
    /// To an address of the service CIDR that no Service has: dropped
    /// (device path), refused with ENETUNREACH (socket path), as
    /// kube-proxy's nftables mode drops it.
    V_DROP_UNALLOCATED_SERVICE_IP = 21, "drop_unallocated_service_ip";
    /// An ICMP error about a translated flow (destination unreachable,
    /// fragmentation needed, time exceeded), translated back towards the
    /// client with every checksum fixed.
    V_ICMP_TRANSLATED = 22, "icmp_translated";
    /// A packet of a flow redirected to another node was too big for the
    /// route: an ICMP fragmentation needed sent back to its sender.
    V_FRAG_NEEDED_SENT = 23, "frag_needed_sent";
    /// The same without DF set: dropped (tc cannot fragment).
    V_DROP_TOO_BIG = 24, "drop_too_big";
    /// A fragment after the first of a datagram whose first fragment this
    /// path did not translate (not a Service's, or not seen yet): left to
    /// the stack, as any fragment was before.
    V_PASS_FRAGMENT_UNKNOWN = 25, "pass_fragment_unknown";
    /// XDP left the packet, untouched, to the tc program on the same
    /// device, which counts its own verdict: an answer to build (RST, ICMP
    /// port unreachable, fragmentation needed), an ICMP error to translate,
    /// a next hop out of another device or without a neighbour entry.
    V_XDP_TO_TC = 26, "xdp_to_tc";
    /// A new flow to a frontend under direct server return, sent in IPIP
    /// to its backend's node (its packets after that count as
    /// `forward_established`).
    V_FORWARD_DSR = 27, "forward_dsr";
    /// An IPIP packet from another node's direct server return,
    /// decapsulated for a backend here; its replies will leave with the
    /// frontend as their source (`reply`).
    V_DSR_DECAPSULATED = 28, "dsr_decapsulated";
    /// Flood protection: a new flow past this CPU's new-flow rate to a
    /// Maglev frontend under DSR, sent on without a conntrack entry (its
    /// next packets find the same backend in the table): Katran's bypass.
    V_FORWARD_UNTRACKED = 29, "forward_untracked";
    /// Flood protection: a new flow past this CPU's new-flow rate that
    /// needs a conntrack entry (SNAT, a local backend, no Maglev table):
    /// dropped, so a flood cannot push established flows out of the
    /// table; a real client sends its SYN again.
    V_DROP_FLOOD = 30, "drop_flood";
}

/// Size of the verdict counter array; room to append.
pub const MAX_VERDICTS: u32 = 64;

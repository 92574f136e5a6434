//! Kubernetes objects -> the desired datapath state. Pure: no I/O, no ids.
//!
//! Follows kube-proxy's rules: backends come from EndpointSlices labelled
//! `kubernetes.io/service-name`; a Service with no EndpointSlice at all falls
//! back to its hand-written `Endpoints` (what the EndpointSlice mirroring
//! controller would have mirrored). A backend's port is the endpoint port
//! whose name equals the Service port's name; `targetPort` (a number or a
//! container port name) was already resolved into it by whoever wrote the
//! endpoints. Headless and ExternalName Services, and Services labelled
//! `service.kubernetes.io/service-proxy-name` or
//! `service.kubernetes.io/headless`, get no entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Endpoints;
use lb_common::service::{NE_LB_ANNOTATION, NE_PROTOCOL_SCTP, NE_WEIGHTS_WITHOUT_MAGLEV};

use super::categorize::{self, EndpointSets, Policies};
use super::intern::Interned;
use super::slice::{Hints, Slice};
use super::svc::{Svc, SvcBalancing};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    /// Shared (`intern`): a cluster has few namespaces, and every object's
    /// key in the store, the slice index and the dirty set names one.
    pub namespace: Interned,
    pub name: String,
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ObjKey {
    pub fn new(namespace: impl AsRef<str>, name: impl Into<String>) -> Self {
        Self {
            namespace: super::intern::intern(namespace.as_ref()),
            name: name.into(),
        }
    }

    /// The key of an object: without a namespace it is in `default`, as
    /// `kubectl apply` would put it.
    pub fn of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            m.namespace.as_deref().unwrap_or("default"),
            m.name.clone().unwrap_or_default(),
        )
    }
}

/// The objects the agent reads, from any source. Shared, not copied: a
/// source's snapshot and the store hold the same objects, and an unchanged
/// object is recognised by pointer.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services as the agent keeps them ([`Svc`]: made at ingest).
    pub services: BTreeMap<ObjKey, Arc<Svc>>,
    /// EndpointSlices as the agent keeps them ([`Slice`]: made at ingest).
    pub slices: BTreeMap<ObjKey, Arc<Slice>>,
    pub endpoints: BTreeMap<ObjKey, Arc<Endpoints>>,
}

/// The Service an EndpointSlice belongs to, from its label.
pub fn slice_service(key: &ObjKey, s: &Slice) -> Option<ObjKey> {
    let svc = s.service.as_ref()?;
    Some(ObjKey::new(key.namespace.clone(), svc.clone()))
}

/// What the agent knows of its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// Addresses NodePorts answer on.
    pub addresses: Vec<Ipv4Addr>,
    /// Source address for SNAT to backends on other nodes (replies come
    /// back to it).
    pub snat: Option<Ipv4Addr>,
    /// The agent's defaults for how ports pick among backends (flags).
    pub balancing: Balancing,
}

/// How new flows pick among a port's backends, and how flows from outside
/// reach a backend on another node, unless the Service's annotations say
/// otherwise (`--lb-algorithm`, `--maglev-table-size`, `--lb-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balancing {
    pub maglev: bool,
    /// A prime (`maglev::check_table_size`).
    pub table_size: u32,
    pub mode: LbMode,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            maglev: false,
            table_size: super::maglev::DEFAULT_TABLE_SIZE,
            mode: LbMode::Snat,
        }
    }
}

/// How a flow from outside reaches a backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbMode {
    /// Source translated to the node (kube-proxy's way): replies come
    /// back through it.
    #[default]
    Snat,
    /// Direct server return: sent in IPIP, replies straight from the
    /// backend's node to the client.
    Dsr,
    /// DSR for TCP, SNAT for UDP and SCTP.
    Hybrid,
}

impl LbMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "snat" => Some(Self::Snat),
            "dsr" => Some(Self::Dsr),
            "hybrid" => Some(Self::Hybrid),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Dsr => "dsr",
            Self::Hybrid => "hybrid",
        }
    }

    /// Whether flows of `proto` go by DSR.
    pub fn dsr(self, proto: Proto) -> bool {
        match self {
            Self::Snat => false,
            Self::Dsr => true,
            Self::Hybrid => proto == Proto::Tcp,
        }
    }
}

/// Service annotations that choose how its ports pick backends.
/// `maglev` or `hash` (one slot per backend, the default).
pub const ANNOTATION_ALGORITHM: &str = "lbctl.dev/lb-algorithm";
/// `ADDR[:PORT]=WEIGHT, ...`: weights of the Service's endpoints (0 to
/// 10000, `DEFAULT_WEIGHT` for the ones not named; 0 drains). Weights turn
/// Maglev on unless the algorithm annotation says `hash`, under which
/// only 0 is acted on.
pub const ANNOTATION_WEIGHTS: &str = "lbctl.dev/backend-weights";
/// `snat`, `dsr` or `hybrid` (`LbMode`): how this Service's flows from
/// outside reach backends on other nodes.
pub const ANNOTATION_MODE: &str = "lbctl.dev/lb-mode";
pub const DEFAULT_WEIGHT: u16 = 100;
pub const MAX_WEIGHT: u16 = 10_000;

impl NodeInfo {
    /// The node's own addresses as the device path holds them
    /// (`LB4_NODE_ADDRS_V1`): the NodePort addresses, then the SNAT
    /// address; and how many did not fit (found through the address map).
    pub fn own_addrs4(&self) -> (lb_common::config::NodeAddrs4, usize) {
        lb_common::config::NodeAddrs4::new(
            self.addresses
                .iter()
                .chain(self.snat.iter())
                .map(|a| lb_common::ip4(a.octets())),
        )
    }

    /// Node facts from the agent's flags and, where a flag is not given,
    /// the Node object: NodePort addresses are its InternalIP/ExternalIP
    /// addresses, SNAT the first of them, the zone its topology label.
    pub fn from_flags_and_node(
        name: &str,
        node_ips: &[Ipv4Addr],
        snat_ip: Option<Ipv4Addr>,
        node: Option<&k8s_openapi::api::core::v1::Node>,
    ) -> Self {
        let mut addresses = node_ips.to_vec();
        if addresses.is_empty() {
            for a in node
                .and_then(|n| n.status.as_ref())
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
            {
                if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP")
                    && let Ok(ip) = a.address.parse()
                {
                    addresses.push(ip);
                }
            }
        }
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned();
        Self {
            name: name.to_string(),
            zone,
            snat: snat_ip.or(addresses.first().copied()),
            addresses,
            balancing: Balancing::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::PROTO_TCP,
            Self::Udp => lb_common::PROTO_UDP,
            Self::Sctp => lb_common::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Self::Tcp),
            lb_common::PROTO_UDP => Some(Self::Udp),
            lb_common::PROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    fn parse(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// One Service port: the unit that gets a service id, counters and a
/// backend set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" for a single unnamed port).
    pub port_name: String,
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub fn number(self) -> u8 {
        use lb_common::service::*;
        match self {
            Self::ClusterIp => KIND_CLUSTER_IP,
            Self::NodePort => KIND_NODE_PORT,
            Self::ExternalIp => KIND_EXTERNAL_IP,
            Self::LoadBalancer => KIND_LOAD_BALANCER,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        use lb_common::service::*;
        match n {
            KIND_CLUSTER_IP => Some(Self::ClusterIp),
            KIND_NODE_PORT => Some(Self::NodePort),
            KIND_EXTERNAL_IP => Some(Self::ExternalIp),
            KIND_LOAD_BALANCER => Some(Self::LoadBalancer),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub kind: FrontendKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready: gets new flows.
    Active,
    /// Serving but terminating: kept for existing flows, and a fallback
    /// when no endpoint is ready.
    Terminating,
    /// Neither ready nor serving (a failing readiness probe): no new
    /// flows; its TCP connections go on, as with kube-proxy, its UDP flows
    /// move to a serving backend.
    Quarantined,
}

/// Address, port and protocol: what identifies a backend in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: BackendAddr,
    pub state: BackendState,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Runs on this agent's node.
    pub local: bool,
    /// Shared (`intern`).
    pub node_name: Option<Interned>,
    pub zone: Option<Interned>,
    /// Topology hints: zones and nodes this endpoint should serve. Rare,
    /// so boxed: two vectors inline were 40% of a backend's bytes (kept
    /// for every backend of every port, 4 MiB at 10,000 Services).
    pub hints: Option<Box<Hints>>,
    /// Share of new flows relative to the others (the Service's
    /// backend-weights annotation, `DEFAULT_WEIGHT` without one); 0:
    /// drained, no new flows, its flows stay.
    pub weight: u16,
}

impl Backend {
    pub fn hint_zones(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.for_zones)
    }

    pub fn hint_nodes(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.for_nodes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Everything the datapath needs of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortState {
    pub svc_type: ServiceType,
    pub proto: Proto,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Sorted, without duplicates. A list, not a set: kept in each port's
    /// record, where a set cost a B-tree node for one to three addresses.
    pub frontends: Vec<FrontendAddr>,
    /// Sorted, deduplicated by address: every endpoint that is ready or
    /// serving (kept for existing flows even when not chosen).
    pub backends: Vec<Backend>,
    /// Which of them each traffic policy gives new flows to, on this node.
    pub sets: EndpointSets,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges` (IPv4 ones), plus the LoadBalancer IPs
    /// themselves when a range holds a node address (kube-proxy's rule for
    /// VIPs that loop back with themselves as source); empty: no filter.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// `NE_*` bits: what this port asks for that the datapath does not do
    /// yet.
    pub not_enforced: u32,
    /// The size of the port's Maglev tables; 0: new flows hash over one
    /// slot per backend.
    pub maglev_table: u32,
    /// Flows from outside reach backends on other nodes by direct server
    /// return (the Service's mode, for this port's protocol).
    pub dsr: bool,
}

/// A problem with one object: it is skipped, everything else goes on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {reason}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub ports: BTreeMap<ServicePortKey, ServicePortState>,
    /// Addresses SNATed flows' replies come back to.
    pub snat_addrs: Vec<Ipv4Addr>,
    pub errors: Vec<ObjectError>,
}

/// Translates objects into the desired state.
pub fn translate(objs: &Objects, node: &NodeInfo) -> Desired {
    let mut out = Desired {
        snat_addrs: node.snat.into_iter().collect(),
        ..Default::default()
    };
    // Slices by the Service they belong to.
    let mut slices: BTreeMap<ObjKey, Vec<&Slice>> = BTreeMap::new();
    for (k, s) in &objs.slices {
        if let Some(svc) = slice_service(k, s) {
            slices.entry(svc).or_default().push(s);
        }
    }
    for (key, svc) in &objs.services {
        let svc_slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        let endpoints = objs.endpoints.get(key).map(|e| &**e);
        match translate_service(key, svc, svc_slices, endpoints, node) {
            Ok(ports) => out.ports.extend(ports),
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// One Service's ports, from the Service, the EndpointSlices labelled with
/// its name and its Endpoints (read only when it has no slice at all).
pub fn translate_service(
    key: &ObjKey,
    svc: &Svc,
    svc_slices: &[&Slice],
    endpoints: Option<&Endpoints>,
    node: &NodeInfo,
) -> Result<BTreeMap<ServicePortKey, ServicePortState>, ObjectError> {
    let mut out = BTreeMap::new();
    // IPv6 and FQDN slices: not programmed (IPv4 datapath).
    let v4: Vec<&Slice> = svc_slices.iter().copied().filter(|s| s.ipv4).collect();
    // A Service whose slices are all IPv6 still has slices: it does not
    // fall back to Endpoints.
    let use_endpoints = svc_slices.is_empty();
    service(
        key,
        svc,
        &v4,
        use_endpoints.then_some(endpoints).flatten(),
        node,
        &mut out,
    )
    .map_err(|reason| ObjectError {
        kind: "Service",
        object: key.to_string(),
        reason,
    })?;
    Ok(out)
}

fn parse_v4(s: &str, what: &str) -> Result<Option<Ipv4Addr>, String> {
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => Ok(Some(a)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None), // IPv6: not programmed yet.
        Err(_) => Err(format!("{what} {s:?} is not an IP address")),
    }
}

/// An IPv4 CIDR (`a.b.c.d/n`, or an address alone as /32) with its host
/// bits cleared; None for IPv6 (not programmed yet).
fn parse_cidr_v4(s: &str) -> Result<Option<(Ipv4Addr, u8)>, String> {
    let bad = || format!("loadBalancerSourceRanges entry {s:?} is not a CIDR");
    let (addr, len) = match s.trim().split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
        None => (s.trim(), 32),
    };
    match addr.parse::<std::net::IpAddr>().map_err(|_| bad())? {
        std::net::IpAddr::V6(_) => Ok(None),
        std::net::IpAddr::V4(a) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Some((Ipv4Addr::from(u32::from(a) & mask), len)))
        }
        std::net::IpAddr::V4(_) => Err(bad()),
    }
}

fn cidr_contains((net, len): (Ipv4Addr, u8), a: Ipv4Addr) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(net)
}

fn port_u16(p: i32, what: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {p} is out of range"))
}

fn service(
    key: &ObjKey,
    svc: &Svc,
    svc_slices: &[&Slice],
    endpoints: Option<&Endpoints>,
    node: &NodeInfo,
    out: &mut BTreeMap<ServicePortKey, ServicePortState>,
) -> Result<(), String> {
    if svc.foreign {
        return Ok(());
    }
    let Some(spec) = &svc.spec else { return Ok(()) };
    let svc_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => return Ok(()),
        other => return Err(format!("unknown type {other:?}")),
    };
    let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => vec![],
    };
    if cluster_ips.iter().any(|ip| ip.as_str() == "None") {
        return Ok(()); // headless
    }
    let mut cluster_v4 = Vec::new();
    for ip in cluster_ips.iter().filter(|ip| !ip.is_empty()) {
        cluster_v4.extend(parse_v4(ip, "clusterIP")?);
    }
    let mut external_v4 = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        external_v4.extend(parse_v4(ip, "externalIP")?);
    }
    let mut lb_v4 = Vec::new();
    if svc_type == ServiceType::LoadBalancer {
        for ing in &svc.ingress {
            let Some(ip) = &ing.ip else { continue };
            let addr = parse_v4(ip, "loadBalancer ingress IP")?;
            // ipMode Proxy: the load balancer delivers to the NodePort
            // itself (it does not keep the destination address), so the
            // ingress IP is not captured on nodes, as kube-proxy does.
            if !ing.proxy {
                lb_v4.extend(addr);
            }
        }
    }
    let policy = |p: Option<&str>, what: &str| match p {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!("unknown {what} {other:?}")),
    };
    let external_policy = policy(
        spec.external_traffic_policy.as_deref(),
        "externalTrafficPolicy",
    )?;
    let internal_policy = policy(
        spec.internal_traffic_policy.as_deref(),
        "internalTrafficPolicy",
    )?;
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => Some(
            spec.affinity_timeout_s
                .map_or(10800, |t| t.clamp(1, 86400) as u32),
        ),
        Some(other) => return Err(format!("unknown sessionAffinity {other:?}")),
    };
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) => Some(port_u16(p, "healthCheckNodePort")?),
        None => None,
    };
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        source_ranges.extend(parse_cidr_v4(r)?);
    }
    if !lb_v4.is_empty()
        && source_ranges
            .iter()
            .any(|r| node.addresses.iter().any(|a| cidr_contains(*r, *a)))
    {
        source_ranges.extend(lb_v4.iter().map(|ip| (*ip, 32)));
    }
    source_ranges.sort_unstable();
    source_ranges.dedup();
    // What the Service asks for that the datapath does not do yet: logged
    // by the agent and shown by lbctl, never silently ignored.
    let mut not_enforced = 0;
    let lb = service_balancing(svc.balancing.as_deref(), node.balancing);
    if let Err(e) = &lb {
        // The annotation is the operator's, not validated by the API
        // server: a typo must not take the Service down. Its ports are
        // programmed with the defaults, the bit shows it.
        tracing::warn!(service = %key, "{e}: annotation ignored");
        not_enforced |= NE_LB_ANNOTATION;
    }
    let lb = lb.unwrap_or_else(|_| PortBalancing::defaults(node.balancing));
    if lb.only_drain {
        not_enforced |= NE_WEIGHTS_WITHOUT_MAGLEV;
    }
    let policies = Policies {
        internal_local: internal_policy == TrafficPolicy::Local,
        external_local: external_policy == TrafficPolicy::Local,
        externally_accessible: svc_type != ServiceType::ClusterIp
            || !external_v4.is_empty()
            || !lb_v4.is_empty(),
    };

    // Validate every port before emitting any, so a bad port skips the
    // whole Service rather than half of it.
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut parsed = Vec::with_capacity(ports.len());
    for p in ports {
        let name = p.name.as_deref().unwrap_or_default().to_string();
        let proto =
            Proto::parse(p.protocol.as_deref()).map_err(|e| format!("port {name:?}: {e}"))?;
        let port = port_u16(p.port, "port")?;
        let node_port = match (svc_type, p.node_port) {
            (ServiceType::ClusterIp, _) | (_, None) => None,
            (_, Some(np)) => Some(port_u16(np, "nodePort")?),
        };
        parsed.push((name, proto, port, node_port));
    }
    for (name, proto, port, node_port) in parsed {
        let state = |frontends, mut backends: Vec<Backend>, not_enforced| ServicePortState {
            svc_type,
            proto,
            port,
            node_port,
            frontends,
            sets: {
                lb.weigh(&mut backends);
                // Drained backends (weight 0) get no new flows from any
                // list; they stay in `backends` for their flows.
                let drained = backends.iter().any(|b| b.weight == 0);
                let live: Vec<Backend>;
                let usable = if drained {
                    live = backends.iter().filter(|b| b.weight > 0).cloned().collect();
                    &live
                } else {
                    &backends
                };
                categorize::categorize(usable, policies, &node.name, node.zone.as_deref())
            },
            backends,
            affinity_timeout_s,
            external_policy,
            internal_policy,
            health_check_node_port,
            source_ranges: source_ranges.clone(),
            not_enforced,
            maglev_table: lb.maglev_table,
            dsr: lb.mode.dsr(proto),
        };
        let port_key = ServicePortKey {
            namespace: key.namespace.to_string(),
            name: key.name.clone(),
            port_name: name.clone(),
        };
        if proto == Proto::Sctp {
            // Not in the datapath yet: recorded without frontends (nothing
            // is translated), so the agent and lbctl name it.
            out.insert(
                port_key,
                state(vec![], vec![], not_enforced | NE_PROTOCOL_SCTP),
            );
            continue;
        }
        let mut frontends = BTreeSet::new();
        let mut add = |addrs: &[Ipv4Addr], port: u16, kind| {
            for &addr in addrs {
                frontends.insert(FrontendAddr {
                    addr,
                    port,
                    proto,
                    kind,
                });
            }
        };
        add(&cluster_v4, port, FrontendKind::ClusterIp);
        add(&external_v4, port, FrontendKind::ExternalIp);
        add(&lb_v4, port, FrontendKind::LoadBalancer);
        if let Some(np) = node_port {
            add(&node.addresses, np, FrontendKind::NodePort);
        }
        let backends = if let Some(eps) = endpoints {
            endpoints_backends(Some(eps), &name, proto, node)
        } else {
            slice_backends(svc_slices, &name, proto, node)
        };
        let frontends = frontends.into_iter().collect();
        out.insert(port_key, state(frontends, backends, not_enforced));
    }
    Ok(())
}

/// How one Service's ports pick backends, from its annotations and the
/// agent's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PortBalancing {
    maglev_table: u32,
    mode: LbMode,
    /// (address, port if named) -> weight, in the annotation's order.
    weights: Vec<(Ipv4Addr, Option<u16>, u16)>,
    /// The algorithm annotation says `hash` and weights are given: only
    /// 0 (drain) is acted on.
    only_drain: bool,
}

impl PortBalancing {
    /// The agent's defaults, for a Service without (readable) annotations.
    fn defaults(b: Balancing) -> Self {
        Self {
            maglev_table: if b.maglev { b.table_size } else { 0 },
            mode: b.mode,
            ..Default::default()
        }
    }

    /// Gives each backend its weight: one named with its port before one
    /// named by address alone.
    fn weigh(&self, backends: &mut [Backend]) {
        if self.weights.is_empty() {
            return;
        }
        for b in backends {
            let exact = self
                .weights
                .iter()
                .find(|(a, p, _)| *a == b.addr.addr && *p == Some(b.addr.port));
            let any = || {
                self.weights
                    .iter()
                    .find(|(a, p, _)| *a == b.addr.addr && p.is_none())
            };
            if let Some((_, _, w)) = exact.or_else(any) {
                b.weight = if self.only_drain && *w > 0 {
                    DEFAULT_WEIGHT
                } else {
                    *w
                };
            }
        }
    }
}

fn service_balancing(
    ann: Option<&SvcBalancing>,
    defaults: Balancing,
) -> Result<PortBalancing, String> {
    let mut out = PortBalancing::defaults(defaults);
    let Some(ann) = ann else { return Ok(out) };
    let algorithm = match ann.algorithm.as_deref().map(str::trim) {
        None => None,
        Some("maglev") => Some(true),
        Some("hash") => Some(false),
        Some(other) => {
            return Err(format!(
                "{ANNOTATION_ALGORITHM} {other:?} is neither \"maglev\" nor \"hash\""
            ));
        }
    };
    if let Some(w) = &ann.weights {
        out.weights = parse_weights(w)?;
    }
    if let Some(m) = &ann.mode {
        out.mode = LbMode::parse(m).ok_or_else(|| {
            format!("{ANNOTATION_MODE} {m:?} is none of \"snat\", \"dsr\", \"hybrid\"")
        })?;
    }
    let maglev = algorithm.unwrap_or(defaults.maglev || !out.weights.is_empty());
    out.maglev_table = if maglev { defaults.table_size } else { 0 };
    out.only_drain = !maglev && out.weights.iter().any(|(_, _, w)| *w != 0);
    Ok(out)
}

/// `10.244.1.5=0, 10.244.2.7:8080=200`.
fn parse_weights(s: &str) -> Result<Vec<(Ipv4Addr, Option<u16>, u16)>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || {
            format!(
                "{ANNOTATION_WEIGHTS} entry {item:?} is not ADDRESS[:PORT]=WEIGHT with a weight 0..={MAX_WEIGHT}"
            )
        };
        let (who, w) = item.split_once('=').ok_or_else(bad)?;
        let w: u16 = w.trim().parse().map_err(|_| bad())?;
        if w > MAX_WEIGHT {
            return Err(bad());
        }
        let who = who.trim();
        let (addr, port) = match who.parse::<std::net::SocketAddrV4>() {
            Ok(sa) => (*sa.ip(), Some(sa.port())),
            Err(_) => (who.parse::<Ipv4Addr>().map_err(|_| bad())?, None),
        };
        out.push((addr, port, w));
    }
    Ok(out)
}

fn finish(mut v: Vec<Backend>) -> Vec<Backend> {
    // One backend per address: the first (sorted: Active before
    // Terminating) wins, as when slices overlap during a rollout.
    v.sort();
    v.dedup_by(|b, a| a.addr == b.addr);
    // Kept for the life of the port (the reconciler compares the next
    // translation with it): no room for growth.
    v.shrink_to_fit();
    v
}

fn slice_backends(
    slices: &[&Slice],
    port_name: &str,
    proto: Proto,
    node: &NodeInfo,
) -> Vec<Backend> {
    let mut out = Vec::new();
    for s in slices {
        let port = s.ports.iter().find(|ep| {
            ep.name.as_deref().unwrap_or("") == port_name
                && Proto::parse(ep.protocol.as_deref()).ok() == Some(proto)
        });
        let Some(port) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        if port == 0 {
            continue;
        }
        for ep in &s.endpoints {
            // Unset ready means ready; unset serving follows ready.
            let ready = ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(ready);
            let terminating = ep.terminating.unwrap_or(false);
            let state = if ready {
                BackendState::Active
            } else if serving && terminating {
                BackendState::Terminating
            } else {
                BackendState::Quarantined
            };
            if let Some(addr) = ep.address {
                out.push(Backend {
                    addr: BackendAddr { addr, port, proto },
                    state,
                    ready,
                    serving,
                    terminating,
                    local: ep.node_name.as_deref().is_some_and(|n| n == node.name),
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    hints: ep.hints.clone(),
                    weight: DEFAULT_WEIGHT,
                });
            }
        }
    }
    finish(out)
}

fn endpoints_backends(
    eps: Option<&Endpoints>,
    port_name: &str,
    proto: Proto,
    node: &NodeInfo,
) -> Vec<Backend> {
    let mut out = Vec::new();
    for subset in eps.and_then(|e| e.subsets.as_ref()).into_iter().flatten() {
        // Matched by port name, as the mirroring controller and kube-proxy
        // do; an unnamed Service port matches an unnamed endpoint port.
        let port = subset.ports.iter().flatten().find(|ep| {
            ep.name.as_deref().unwrap_or("") == port_name
                && Proto::parse(ep.protocol.as_deref()).ok() == Some(proto)
        });
        let Some(port) = port
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for a in subset.addresses.iter().flatten() {
            let Ok(addr) = a.ip.parse::<Ipv4Addr>() else {
                continue;
            };
            out.push(Backend {
                addr: BackendAddr { addr, port, proto },
                state: BackendState::Active,
                ready: true,
                serving: true,
                terminating: false,
                local: a.node_name.as_deref().is_some_and(|n| n == node.name),
                node_name: a.node_name.as_deref().map(super::intern::intern),
                zone: None,
                hints: None,
                weight: DEFAULT_WEIGHT,
            });
        }
    }
    finish(out)
}

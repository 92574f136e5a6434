//! `lbctl explain`: where a packet or socket would go, and why.
//!
//! - A packet from outside the node (`--src`): the real `lb_from_netdev`
//!   program runs on a synthetic packet with `BPF_PROG_TEST_RUN`, against
//!   the live service maps and a scratch copy of the connection table that
//!   starts with the flow's live entries (`datapath::probe`). The answer is
//!   the program's own: its verdict, its rewrite, the flow it created.
//! - A pod's or host process's socket (`--cookie`): sockets are translated
//!   at connect()/sendmsg(), where BPF_PROG_TEST_RUN does not reach, so the
//!   selection is computed with the datapath's own code (`lb_common::hash`)
//!   on the live maps, after looking for the translation the socket already
//!   has.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result, bail};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_ORIGINAL, CT_SNAT, Ct4Entry, Ct4Key},
    counters::{
        V_DROP_NO_BACKEND, V_DROP_NO_LOCAL_BACKEND, V_DROP_SOURCE_RANGE, V_FORWARD_DSR,
        V_FORWARD_ESTABLISHED, V_FORWARD_NEW, V_FORWARD_RENEWED, V_PASS_NOT_SERVICE,
        V_REJECT_NO_BACKEND, V_REJECT_UNDEFINED_PORT, V_REPLY, V_RESET_BACKEND_GONE, VERDICTS,
    },
    hash, ip4, ip4_octets, port, port_host,
    service::{
        ADDR_CLUSTER_IP, AFFINITY_BY_ADDR, AffinityKey, BACKEND_ACTIVE, BACKEND_LOCAL,
        FE_AFFINITY_CLIENT_IP, FE_LOCAL_LIST, FE_MAGLEV, FE_REJECT_NO_BACKEND, FE_TWO_SCOPES,
        Frontend, Frontend4Key, SB_TOPOLOGY_FILTERED, SCOPE_ALL, SCOPE_INTERNAL,
    },
    sock::SockFlow4Key,
};
use serde::Serialize;

use super::{PinArgs, render};
use crate::{
    agent::{
        apply::MapWriter,
        model::FrontendKind,
        state::{MapState, cstr},
    },
    datapath::{
        attach, frame,
        maps::{ServiceMaps, SockMaps},
        probe,
    },
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    #[default]
    Tcp,
    Udp,
}

impl ProtoArg {
    fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Destination: the Service address and port (ClusterIP, node address
    /// with a NodePort, externalIP, LoadBalancer IP).
    #[arg(long)]
    pub dst: SocketAddrV4,
    /// Source of a packet from outside the node (the per-packet device
    /// path): client address and port.
    #[arg(long, required_unless_present = "cookie")]
    pub src: Option<SocketAddrV4>,
    /// Socket cookie of a pod's or host process's socket (the socket path,
    /// translated at connect()/sendmsg()): SO_COOKIE, or `ss -e` (`sk:`).
    #[arg(long, conflicts_with = "src")]
    pub cookie: Option<u64>,
    #[arg(long, value_enum, default_value_t)]
    pub proto: ProtoArg,
    /// Device the packet arrives on (default: the first device the agent
    /// attached to); its FIB decides where an SNATed flow leaves.
    #[arg(long)]
    pub device: Option<String>,
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// The answer. Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExplainView {
    /// `device` (per packet, tc on a node device) or `socket` (per socket).
    pub path: String,
    /// The program that decides: `lb_from_netdev`, `lb_connect4`,
    /// `lb_sendmsg4`.
    pub program: String,
    pub protocol: String,
    pub src: Option<String>,
    pub dst: String,
    pub cookie: Option<u64>,
    pub device: Option<String>,
    pub frontend: Option<FrontendInfo>,
    /// `new_flow`, `existing_flow`, `reply`, `new_socket`,
    /// `existing_socket`, `no_backend`, `not_a_service`, or another
    /// datapath verdict.
    pub decision: String,
    /// Why, in one sentence.
    pub reason: String,
    /// Device path: the verdicts the program counted, and its return code.
    pub verdicts: Vec<String>,
    pub return_code: Option<String>,
    /// The flow hash, the number of backends it chose among, and the slot.
    pub hash: Option<u32>,
    pub candidates: u32,
    pub slot: Option<u32>,
    pub backend: Option<BackendInfo>,
    /// The packet's addresses after translation (device path), or where
    /// connect()/sendmsg() goes (socket path).
    pub translated_src: Option<String>,
    pub translated_dst: Option<String>,
    pub snat: bool,
    /// Direct server return: the packet leaves in IPIP for the backend's
    /// node, which answers the client itself.
    pub dsr: bool,
    /// The live connection-tracking entry this flow already has.
    pub conntrack: Option<ConntrackInfo>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FrontendInfo {
    pub service: String,
    pub port_name: String,
    pub service_id: u32,
    pub kind: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub active_backends: u32,
    pub terminating_backends: u16,
    pub session_affinity: String,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendInfo {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub node: String,
    pub local: bool,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConntrackInfo {
    pub age_s: u32,
    pub idle_s: u32,
    pub packets: u64,
    pub backend_id: u32,
}

impl ExplainView {
    /// What every answer starts with: the question and the frontend it
    /// meets; the path fills in the rest.
    fn new(
        path: &str,
        program: &str,
        proto: u8,
        dst: SocketAddrV4,
        st: &MapState,
        key: &Frontend4Key,
        fe: Option<Frontend>,
    ) -> Self {
        Self {
            path: path.into(),
            program: program.into(),
            protocol: if proto == PROTO_TCP { "TCP" } else { "UDP" }.into(),
            src: None,
            dst: dst.to_string(),
            cookie: None,
            device: None,
            frontend: fe.map(|f| frontend_info(st, key, &f)),
            decision: String::new(),
            reason: String::new(),
            verdicts: vec![],
            return_code: None,
            hash: None,
            candidates: fe.map_or(0, |f| f.backend_count()),
            slot: None,
            backend: None,
            translated_src: None,
            translated_dst: None,
            snat: false,
            dsr: false,
            conntrack: None,
            notes: vec![],
        }
    }
}

/// The frontend (all-traffic scope) a packet or socket to `dst` meets.
fn frontend(st: &MapState, proto: u8, dst: SocketAddrV4) -> (Frontend4Key, Option<Frontend>) {
    let key = Frontend4Key {
        addr: ip4(dst.ip().octets()),
        port: port(dst.port()),
        proto,
        scope: SCOPE_ALL,
    };
    (key, st.frontends.get(&key).copied())
}

fn ep(addr: u32, p: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(ip4_octets(addr)), port_host(p))
}

fn frontend_info(st: &MapState, k: &Frontend4Key, fe: &Frontend) -> FrontendInfo {
    let meta = st.service_meta.get(&fe.service_id);
    let policy = |p: Option<u8>| {
        if p == Some(lb_common::service::POLICY_LOCAL) {
            "Local"
        } else {
            "Cluster"
        }
    };
    FrontendInfo {
        service: meta.map_or_else(
            || format!("#{}", fe.service_id),
            |m| format!("{}/{}", cstr(&m.namespace), cstr(&m.name)),
        ),
        port_name: meta.map_or(String::new(), |m| cstr(&m.port_name).into()),
        service_id: fe.service_id,
        kind: FrontendKind::from_number(fe.kind)
            .map_or("?", |k| k.label())
            .into(),
        address: Ipv4Addr::from(ip4_octets(k.addr)),
        port: port_host(k.port),
        active_backends: fe.backend_count(),
        terminating_backends: fe.terminating,
        session_affinity: match meta.map_or(0, |m| m.affinity_timeout_s) {
            0 => "None".into(),
            t => format!("ClientIP {t}s"),
        },
        external_traffic_policy: policy(meta.map(|m| m.external_policy)).into(),
        internal_traffic_policy: policy(meta.map(|m| m.internal_policy)).into(),
    }
}

fn backend_info(st: &MapState, id: u32) -> Option<BackendInfo> {
    let b = st.backends.get(&id)?;
    Some(BackendInfo {
        id,
        address: Ipv4Addr::from(ip4_octets(b.addr)),
        port: port_host(b.port),
        node: st.node_name(b).into(),
        local: b.flags & BACKEND_LOCAL != 0,
        active: b.state == BACKEND_ACTIVE,
    })
}

/// The backend the datapath's selection gives hash `h` (as `select::pick`
/// does it: slot `h % count` of the frontend's set).
pub fn pick(st: &MapState, fe: &Frontend, h: u32) -> Option<(u32, u32)> {
    if fe.count == 0 {
        return None;
    }
    let slot = hash::slot(h, fe.count);
    Some((slot, st.slot(fe.backend_set, slot)?))
}

fn verdict_label(v: u32) -> String {
    VERDICTS
        .iter()
        .find(|(n, _)| *n == v)
        .map_or_else(|| format!("verdict {v}"), |(_, l)| l.to_string())
}

fn tc_code(rc: i32) -> String {
    match rc {
        0 => "TC_ACT_OK (to the stack)".into(),
        2 => "TC_ACT_SHOT (dropped)".into(),
        7 => "TC_ACT_REDIRECT (to the egress device)".into(),
        n => format!("{n}"),
    }
}

fn live(e: &Ct4Entry, now: u32) -> bool {
    now.wrapping_sub(e.last_seen_s) <= e.lifetime_s
}

/// The device path: the real program on a synthetic packet.
pub fn device(
    maps: &ServiceMaps,
    st: &MapState,
    proto: u8,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    device: Option<(String, u32)>,
) -> Result<ExplainView> {
    let now = super::conntrack::now_s();
    let (key, fe) = frontend(st, proto, dst);
    let okey = Ct4Key {
        src_addr: ip4(src.ip().octets()),
        dst_addr: key.addr,
        src_port: port(src.port()),
        dst_port: key.port,
        proto,
        dir: CT_ORIGINAL,
        _pad: 0,
    };
    let mut rkey = okey;
    rkey.dir = lb_common::conntrack::CT_REPLY;
    // The live entries this tuple meets, copied into the probe's table.
    let mut seed = Vec::new();
    let mut existing = None;
    for k in [okey, rkey] {
        if let Some(e) = maps.conntrack.get(&k).context("reading the flow table")?
            && live(&e, now)
        {
            seed.push((k, e));
            if k.dir == CT_ORIGINAL {
                existing = Some(e);
            }
        }
    }
    let flags = if existing.is_some() {
        frame::TCP_ACK
    } else {
        frame::TCP_SYN
    };
    let input = frame::build(proto, src, dst, flags);
    let ifindex = device.as_ref().map_or(0, |d| d.1);
    // The client's live session affinity entry, copied into the probe's
    // scratch table, so the program decides as it would now.
    let affinity = fe
        .filter(|f| f.flags & FE_AFFINITY_CLIENT_IP != 0)
        .and_then(|f| {
            let k = AffinityKey {
                client: okey.src_addr as u64,
                service_id: f.service_id,
                kind: AFFINITY_BY_ADDR,
                _pad: [0; 3],
            };
            maps.affinity.get(&k, 0).ok().map(|e| (k, e))
        });
    let probe = probe::from_netdev(&maps.dir, &input, ifindex, &seed, affinity.as_slice())?;

    let mut v = ExplainView {
        src: Some(src.to_string()),
        device: device.as_ref().map(|d| d.0.clone()),
        verdicts: probe.verdicts.iter().map(|v| verdict_label(*v)).collect(),
        return_code: Some(tc_code(probe.return_code)),
        conntrack: existing.map(|e| ConntrackInfo {
            age_s: now.wrapping_sub(e.created_s),
            idle_s: now.wrapping_sub(e.last_seen_s),
            packets: e.packets,
            backend_id: e.backend_id,
        }),
        ..ExplainView::new("device", attach::FROM_NETDEV, proto, dst, st, &key, fe)
    };
    if let Some((outer_src, outer_dst, s, d)) = frame::ipip(&probe.frame) {
        v.translated_src = Some(s.to_string());
        v.translated_dst = Some(d.to_string());
        v.dsr = true;
        v.notes.push(format!(
            "direct server return: sent in IPIP from {outer_src} to {outer_dst}; the backend's node answers the client itself, from {dst}"
        ));
    } else if let Some((s, d)) = frame::tuple(&probe.frame)
        && (s, d) != (src, dst)
    {
        v.translated_src = Some(s.to_string());
        v.translated_dst = Some(d.to_string());
    }
    let has = |x: u32| probe.verdicts.contains(&x);
    let h = hash::device4(
        fe.is_some_and(|f| f.flags & FE_MAGLEV != 0),
        okey.src_addr,
        okey.dst_addr,
        okey.src_port,
        okey.dst_port,
        proto,
    );
    if has(V_FORWARD_ESTABLISHED) {
        let e = existing.unwrap_or_default();
        v.decision = "existing_flow".into();
        v.reason = format!(
            "the flow has a connection-tracking entry (created {}s ago): it keeps backend {}",
            now.wrapping_sub(e.created_s),
            e.backend_id
        );
        v.backend = backend_info(st, e.backend_id);
        v.snat = e.flags & CT_SNAT != 0;
    } else if has(V_DROP_SOURCE_RANGE) {
        v.decision = "dropped_source_range".into();
        v.reason = "the source is outside the Service's loadBalancerSourceRanges: a new flow \
                    to its LoadBalancer IP is dropped"
            .into();
    } else if has(V_RESET_BACKEND_GONE) {
        let e = existing.unwrap_or_default();
        v.decision = "reset_backend_gone".into();
        v.reason = format!(
            "the connection's backend {} left the Service: the next segment gets a RST back and the flow's entries go",
            e.backend_id
        );
    } else if has(V_FORWARD_NEW) || has(V_FORWARD_RENEWED) || has(V_FORWARD_DSR) {
        let e = probe.entry.unwrap_or_default();
        v.decision = "new_flow".into();
        if has(V_FORWARD_RENEWED) {
            v.notes.push(format!(
                "the flow had backend {}, which no longer serves this Service: it starts afresh",
                existing.map_or(0, |e| e.backend_id)
            ));
        }
        v.hash = Some(h);
        v.backend = backend_info(st, e.backend_id);
        v.snat = e.flags & CT_SNAT != 0;
        let fe = fe.unwrap_or_default();
        let computed = pick(st, &fe, h);
        v.slot = computed.map(|c| c.0);
        let slot = v.slot.map_or("?".into(), |s| s.to_string());
        v.reason = if fe.flags & FE_MAGLEV != 0 {
            format!(
                "hash {h:#010x} of (src, ports, protocol) % Maglev table of {} slots ({} backends) = slot {slot} -> backend {}",
                fe.count, fe.backends, e.backend_id
            )
        } else {
            format!(
                "hash {h:#010x} of (src, dst, ports, protocol) % {} backends = slot {slot} -> backend {}",
                fe.count, e.backend_id
            )
        };
        let sticky = affinity
            .as_ref()
            .filter(|(_, a)| a.backend_id == e.backend_id);
        if let Some((_, a)) = sticky {
            v.decision = "session_affinity".into();
            v.reason = format!(
                "sessionAffinity ClientIP: this client was given backend {} {}s ago (timeout {}s), it keeps it",
                a.backend_id,
                now.wrapping_sub(a.last_s),
                fe.affinity_timeout_s
            );
        } else if computed.map(|c| c.1) != Some(e.backend_id) {
            v.notes.push(format!(
                "the slot computed from the maps holds backend {:?}, the program chose {}: the maps changed between reads",
                computed.map(|c| c.1),
                e.backend_id
            ));
        }
        if v.snat {
            v.notes.push(
                "the backend is on another node: source NATed to this node, the reply comes back here"
                    .into(),
            );
        }
    } else if has(V_REPLY) {
        let e = seed.iter().find(|(k, _)| k.dir != CT_ORIGINAL).map(|x| x.1);
        v.decision = "reply".into();
        v.reason = "a reply of a flow this node SNATed: translated back to the client".into();
        v.backend = e.and_then(|e| backend_info(st, e.backend_id));
    } else if has(V_REJECT_NO_BACKEND) {
        v.decision = "rejected".into();
        v.reason = format!(
            "the Service has no endpoint: the client is refused at once ({})",
            if proto == PROTO_TCP {
                "a TCP RST"
            } else {
                "an ICMP port unreachable"
            }
        );
    } else if has(V_REJECT_UNDEFINED_PORT) {
        v.decision = "rejected_undefined_port".into();
        v.reason = "a ClusterIP on a port no Service defines: refused at once".into();
    } else if has(V_DROP_NO_LOCAL_BACKEND) {
        v.decision = "dropped_no_local_backend".into();
        v.reason = "externalTrafficPolicy Local and no endpoint on this node: dropped, \
                    as kube-proxy does (pods and the node still reach the other nodes' endpoints)"
            .into();
    } else if has(V_DROP_NO_BACKEND) {
        v.decision = "no_backend".into();
        v.reason = "the Service has no endpoint and the refusal could not be sent: dropped".into();
    } else if has(V_PASS_NOT_SERVICE) || probe.verdicts.is_empty() {
        v.decision = "not_a_service".into();
        v.reason =
            "no frontend has this address, port and protocol: passed to the stack untouched".into();
    } else {
        v.decision = v.verdicts.first().cloned().unwrap_or_default();
        v.reason = format!("the program's verdict: {}", v.verdicts.join(", "));
    }
    policy_notes(st, fe.as_ref(), &mut v.notes);
    if v.frontend.as_ref().is_some_and(|f| f.kind == "ClusterIP") {
        v.notes.push(
            "from pods and host processes this ClusterIP is translated per socket at connect(): \
             explain a socket with --cookie"
                .into(),
        );
    }
    if device.is_none() {
        v.notes.push(
            "no device: run on the node (hostNetwork) or give --device; an SNATed flow's \
             route is not looked up"
                .into(),
        );
    }
    Ok(v)
}

/// The socket path: the socket's existing translation, else the
/// datapath's selection on the live maps.
pub fn socket(
    st: &MapState,
    sock: &SockMaps,
    proto: u8,
    cookie: u64,
    dst: SocketAddrV4,
) -> ExplainView {
    let (mut key, mut fe) = frontend(st, proto, dst);
    // Pods and host processes read the internal entry where there is one.
    if fe.is_some_and(|f| f.flags & FE_TWO_SCOPES != 0) {
        let ikey = Frontend4Key {
            scope: SCOPE_INTERNAL,
            ..key
        };
        if let Some(i) = st.frontends.get(&ikey) {
            key = ikey;
            fe = Some(*i);
        }
    }
    let program = if proto == PROTO_UDP {
        "lb_connect4 / lb_sendmsg4"
    } else {
        "lb_connect4"
    };
    let mut v = ExplainView {
        cookie: Some(cookie),
        ..ExplainView::new("socket", program, proto, dst, st, &key, fe)
    };
    let Some(fe) = fe else {
        if st
            .addrs
            .get(&key.addr)
            .is_some_and(|f| f & ADDR_CLUSTER_IP != 0)
        {
            v.decision = "rejected_undefined_port".into();
            v.reason =
                "a ClusterIP on a port no Service defines: connect() fails with ECONNREFUSED"
                    .into();
            return v;
        }
        v.decision = "not_a_service".into();
        v.reason =
            "no frontend has this address, port and protocol: the socket connects to it unchanged"
                .into();
        return v;
    };
    policy_notes(st, Some(&fe), &mut v.notes);
    let by_addr: BTreeMap<(u32, u16), u32> = st
        .backends
        .iter()
        .map(|(id, b)| ((b.addr, b.port), *id))
        .collect();
    // A datagram socket's remembered choice (sendmsg), then any socket's
    // reverse translation entry (connect).
    let flow = SockFlow4Key {
        cookie,
        frontend_addr: key.addr,
        frontend_port: key.port,
        proto,
        _pad: 0,
    };
    let existing = sock
        .flows
        .get(&flow, 0)
        .ok()
        .map(|f| (f.backend_addr, f.backend_port))
        .or_else(|| {
            sock.revnat
                .iter()
                .filter_map(Result::ok)
                .find(|(k, r)| {
                    k.cookie == cookie && r.frontend_addr == key.addr && r.frontend_port == key.port
                })
                .map(|(k, _)| (k.backend_addr, k.backend_port))
        });
    if let Some((addr, p)) = existing {
        v.decision = "existing_socket".into();
        v.reason = format!(
            "socket {cookie} was already translated to {} (its reverse-translation entry)",
            ep(addr, p)
        );
        v.translated_dst = Some(ep(addr, p));
        v.backend = by_addr.get(&(addr, p)).and_then(|id| backend_info(st, *id));
        return v;
    }
    let h = hash::sock4(cookie, key.addr, key.port, proto);
    v.hash = Some(h);
    match pick(st, &fe, h) {
        None if fe.flags & FE_REJECT_NO_BACKEND != 0 => {
            v.decision = "rejected".into();
            v.reason = "the Service has no endpoint: connect() and sendmsg() fail with \
                        ECONNREFUSED at once"
                .into();
        }
        None => {
            v.decision = "dropped_no_local_backend".into();
            v.reason = "internalTrafficPolicy Local and no endpoint on this node: connect() \
                        and sendmsg() fail with EHOSTUNREACH at once"
                .into();
        }
        Some((slot, id)) => {
            v.decision = "new_socket".into();
            v.slot = Some(slot);
            v.backend = backend_info(st, id);
            v.translated_dst = v
                .backend
                .as_ref()
                .map(|b| format!("{}:{}", b.address, b.port));
            v.reason = if fe.flags & FE_MAGLEV != 0 {
                format!(
                    "hash {h:#010x} of (cookie, frontend) % Maglev table of {} slots ({} backends) = slot {slot} -> backend {id}",
                    fe.count, fe.backends
                )
            } else {
                format!(
                    "hash {h:#010x} of (cookie, frontend) % {} backends = slot {slot} -> backend {id}",
                    fe.count
                )
            };
            v.notes.push(
                "the socket then talks to the backend directly; getpeername()/recvfrom() show the Service address"
                    .into(),
            );
            if fe.flags & FE_AFFINITY_CLIENT_IP != 0 {
                v.notes.push(format!(
                    "sessionAffinity ClientIP: a pod (its network namespace) that was given a backend of this Service in the last {}s keeps it; the hash decides only for a new client",
                    fe.affinity_timeout_s
                ));
            }
        }
    }
    v
}

/// The Service port's policy decisions that shaped the frontend's list.
fn policy_notes(st: &MapState, fe: Option<&Frontend>, notes: &mut Vec<String>) {
    let Some(fe) = fe else { return };
    if fe.flags & FE_LOCAL_LIST != 0 {
        notes.push(
            "traffic policy Local: only this node's endpoints, and no SNAT (the backend sees the client's address)"
                .into(),
        );
    }
    if fe.terminating > 0 {
        notes.push(
            "no endpoint is ready: new flows go to serving terminating ones (kube-proxy's fallback)"
                .into(),
        );
    }
    let filtered = st
        .svc_backends
        .iter()
        .filter(|(k, f)| k.service_id == fe.service_id && *f & SB_TOPOLOGY_FILTERED != 0)
        .count();
    if filtered > 0 {
        notes.push(format!(
            "topology hints: {filtered} ready endpoint(s) left out for another zone or node"
        ));
    }
}

pub fn table(v: &ExplainView) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let what = match (&v.src, v.cookie) {
        (Some(s), _) => format!("{} {s} -> {}", v.protocol, v.dst),
        (None, Some(c)) => format!("{} socket {c} -> {}", v.protocol, v.dst),
        _ => v.dst.clone(),
    };
    let on = v
        .device
        .as_ref()
        .map_or(String::new(), |d| format!(" on {d}"));
    rows.push(vec![
        "packet".into(),
        format!("{what} ({} path, {}{on})", v.path, v.program),
    ]);
    rows.push(vec![
        "frontend".into(),
        match &v.frontend {
            Some(f) => format!(
                "{}{} {} {}:{} ({} active, {} terminating backends; affinity {}; policy {}/{})",
                f.service,
                if f.port_name.is_empty() {
                    String::new()
                } else {
                    format!(":{}", f.port_name)
                },
                f.kind,
                f.address,
                f.port,
                f.active_backends,
                f.terminating_backends,
                f.session_affinity,
                f.external_traffic_policy,
                f.internal_traffic_policy
            ),
            None => "none".into(),
        },
    ]);
    if let Some(c) = &v.conntrack {
        rows.push(vec![
            "conntrack".into(),
            format!(
                "entry to backend {}, age {}s, idle {}s, {} packets",
                c.backend_id, c.age_s, c.idle_s, c.packets
            ),
        ]);
    }
    rows.push(vec![
        "decision".into(),
        format!("{}: {}", v.decision, v.reason),
    ]);
    if let Some(b) = &v.backend {
        let node = if b.node.is_empty() {
            String::new()
        } else if b.local {
            format!(", {} (local)", b.node)
        } else {
            format!(", {}", b.node)
        };
        rows.push(vec![
            "backend".into(),
            format!("{}:{} (id {}{node})", b.address, b.port, b.id),
        ]);
    }
    if let (Some(s), Some(d)) = (&v.translated_src, &v.translated_dst) {
        rows.push(vec![
            "rewrite".into(),
            format!(
                "{s} -> {d}{}",
                if v.snat {
                    " (SNAT)"
                } else if v.dsr {
                    " (DSR, in IPIP)"
                } else {
                    ""
                }
            ),
        ]);
    } else if let Some(d) = &v.translated_dst {
        rows.push(vec!["connects to".into(), d.clone()]);
    }
    if !v.verdicts.is_empty() || v.return_code.is_some() {
        rows.push(vec![
            "verdict".into(),
            format!(
                "{} -> {}",
                v.verdicts.join(", "),
                v.return_code.clone().unwrap_or_default()
            ),
        ]);
    }
    for n in &v.notes {
        rows.push(vec!["note".into(), n.clone()]);
    }
    render::pairs(rows)
}

/// The device to run as: the one named, else the first the agent attached.
fn pick_device(pins: &std::path::Path, named: Option<&str>) -> Option<(String, u32)> {
    let name = match named {
        Some(n) => n.to_string(),
        None => attach::pinned(pins)
            .into_iter()
            .find_map(|(_, prog, dev)| (prog == attach::FROM_NETDEV).then_some(dev).flatten())?,
    };
    let c = std::ffi::CString::new(name.clone()).ok()?;
    // SAFETY: NUL-terminated name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some((name, idx))
}

pub fn execute(args: Args) -> Result<()> {
    let pins = &args.pins.bpffs;
    let maps = ServiceMaps::open(pins)?;
    let st = maps.read()?;
    let proto = args.proto.number();
    let view = match (args.src, args.cookie) {
        (Some(src), _) => {
            let dev = pick_device(pins, args.device.as_deref());
            if let (Some(d), None) = (&args.device, &dev) {
                bail!("no device {d} in this network namespace");
            }
            device(&maps, &st, proto, src, args.dst, dev)?
        }
        (None, Some(cookie)) => socket(&st, &SockMaps::open(pins)?, proto, cookie, args.dst),
        (None, None) => bail!(
            "give --src IP:PORT (a packet from outside the node) or --cookie N (a pod's socket)"
        ),
    };
    match render::structured(args.output, &view)? {
        Some(s) => print!("{s}"),
        None => print!("{}", table(&view)),
    }
    Ok(())
}

//! The device path: packets from outside the node to NodePort, external and
//! LoadBalancer addresses, translated per packet with connection tracking
//! (XDP and tc ingress on the node's devices: one flow logic, generic over
//! the program's `Device`), and replies of local backends translated back
//! on their way out (tc egress).

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_get_prandom_u32, maps::lpm_trie::Key, programs::TcContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    PROTO_TCP,
    config::CFG_PORTS,
    conntrack::{
        CT_CLOSING, CT_DSR, CT_LOCAL_BACKEND, CT_NO_ID, CT_ORIGINAL, CT_REPLY, CT_SNAT, Ct4Entry,
        Ct4Key,
    },
    counters::{
        V_DROP_CT_FULL, V_DROP_FLOOD, V_DROP_NO_LOCAL_BACKEND, V_DROP_NO_SNAT_PORT,
        V_DROP_SOURCE_RANGE, V_DROP_UNALLOCATED_SERVICE_IP, V_FORWARD_DSR, V_FORWARD_ESTABLISHED,
        V_FORWARD_NEW, V_FORWARD_RENEWED, V_FORWARD_UNTRACKED, V_PASS_NOT_SERVICE,
        V_PASS_UNSUPPORTED, V_REJECT_NO_BACKEND, V_REJECT_UNDEFINED_PORT, V_REPLY,
        V_RESET_BACKEND_GONE,
    },
    dsr::{DSR_OVERHEAD, PROTO_IPIP},
    hash,
    service::{
        ADDR_CLUSTER_IP, AFFINITY_BY_ADDR, BACKEND_LOCAL, FE_AFFINITY_CLIENT_IP, FE_DSR, FE_MAGLEV,
        FE_SOURCE_RANGES, Frontend, Frontend4Key, KIND_NODE_PORT, SB_SERVING, SCOPE_ALL,
        SOURCE_RANGE_ID_BITS, ServiceBackendKey, SourceRange4,
    },
};

use crate::{
    conntrack::{self, now_s},
    device::{Device, Way, way, way_of},
    dsr, flood,
    icmp::{self, PROTO_ICMP},
    maps::{self, ADDRS4, CONFIG, SERVICE_BACKENDS, SOURCE_RANGES4, backend},
    parse::{self, Packet, TCP_ACK, TCP_SYN},
    select::{self, Chosen, Client},
    stats, xdp,
};

/// tc ingress on a node device: what XDP dealt with already passes.
#[inline(always)]
pub fn from_netdev(ctx: &TcContext) -> i32 {
    if xdp::seen(ctx) {
        return TC_ACT_OK;
    }
    from_device(ctx)
}

/// A packet on a node device, in tc or XDP: another node's direct server
/// return for a backend here (or a CNI's tunnel, passed), or a packet from
/// outside. The two are siblings, each out of line: the verifier counts
/// the stack of a chain of calls, and `from_outside`'s frame with its
/// callees leaves no room for `dsr::receive`'s.
#[inline(always)]
pub fn from_device<D: Device>(dev: &D) -> i32 {
    if dsr::is_ipip(dev) {
        return dsr::receive(dev);
    }
    from_outside(dev)
}

/// A packet from outside the node, in tc or XDP.
#[inline(never)]
fn from_outside<D: Device>(dev: &D) -> i32 {
    let pkt = match parse::parse(dev) {
        Ok(p) => p,
        Err(v) => {
            stats::verdict(v);
            return dev.pass();
        }
    };
    // IPIP went to `dsr::receive` (this one's headers were not linear
    // then): not translated.
    if pkt.proto == PROTO_IPIP {
        stats::verdict(V_PASS_UNSUPPORTED);
        return dev.pass();
    }
    // Most traffic to a node that is no Service's (SSH, the kubelet, BGP)
    // goes to a port no frontend and no SNAT range uses: it leaves after
    // one array lookup, whatever its address, once the agent has written
    // the port map whole. Addresses of the service CIDRs go on (an
    // undefined ClusterIP port is refused, an unallocated address
    // dropped), and so do ICMP errors (no ports).
    if pkt.proto != PROTO_ICMP
        && !maps::port_in_use(pkt.dst_port)
        && CONFIG
            .get(0)
            .is_some_and(|c| c.flags & CFG_PORTS != 0 && !c.in_service_cidr(pkt.dst_addr))
    {
        stats::verdict(V_PASS_NOT_SERVICE);
        return dev.pass();
    }
    // Every packet this path translates is addressed to a frontend or an
    // SNAT address: anything else leaves after one lookup. The node's own
    // addresses (NodePorts, SNATed flows' replies: most of what comes
    // here) are known without it, and are no ClusterIP (flags 0).
    let addr_flags = if maps::is_node_addr(pkt.dst_addr) {
        Some(0)
    } else {
        // SAFETY: copied out at once.
        (unsafe { ADDRS4.get(pkt.dst_addr) }).copied()
    };
    let Some(addr_flags) = addr_flags else {
        // An address of the service CIDR that no Service has: nothing is
        // there (kube-proxy's nftables mode drops it).
        if CONFIG
            .get(0)
            .is_some_and(|c| c.in_service_cidr(pkt.dst_addr))
        {
            stats::verdict(V_DROP_UNALLOCATED_SERVICE_IP);
            return dev.drop();
        }
        stats::verdict(V_PASS_NOT_SERVICE);
        return dev.pass();
    };
    // An ICMP error about one of our flows (to an SNAT address).
    if pkt.proto == PROTO_ICMP {
        return dev.icmp(&pkt);
    }
    let now = now_s();
    let len = pkt.len;

    // A reply from a backend on another node comes to the SNAT address
    // and a port of the SNAT range: looked up first there, before the
    // client's direction (which a packet to an SNAT port has only when a
    // frontend uses a port of the range). Elsewhere only when no frontend
    // takes the packet (a frontend hit is a new flow, and one lookup
    // fewer), so a reply to a port the range no longer holds (the range
    // was changed) is still found.
    let (snat_min, snat_span) = snat_ports();
    let snat_port = (u16::from_be(pkt.dst_port) as u32).wrapping_sub(snat_min) < snat_span;
    if snat_port && let Some(verdict) = reply(dev, &pkt, now, len) {
        return verdict;
    }

    // A TCP SYN opens a flow (all but a retransmitted one, or one reusing
    // the tuple of a connection that is closing): its backend is chosen
    // before the flow table is read, so the client's set and the set its
    // replies will take are read together, one wait for memory where a
    // new flow had two (`conntrack::lookup_warming`). Other packets read
    // the table first (most belong to a flow), and so does a SYN under
    // session affinity (choosing writes the client's affinity entry: only
    // for a flow that is new).
    let k = conntrack::key(&pkt, CT_ORIGINAL);
    let syn = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut fe = None;
    // The plan made for a SYN, as a word (`Plan::packed`: what the probe
    // and its callers leave room for in this frame), or 0.
    let mut planned = 0u64;
    let mut found = None;
    if D::PLANS_SYN && syn {
        fe = select::frontend(&frontend_key(&pkt));
        if let Some(f) = &fe
            && f.flags & FE_AFFINITY_CLIENT_IP == 0
            && let Ok(c) = select::pick(&frontend_key(&pkt), f, flow_hash(f, &pkt))
        {
            let p = Plan::new(f, c);
            found = conntrack::lookup_warming(&k, &p.reply_key(f, &pkt), now);
            planned = p.packed();
        }
    }
    if planned == 0 {
        found = conntrack::lookup(&k, now);
    }

    // A packet of a known flow from the client.
    let mut new_verdict = V_FORWARD_NEW;
    if let Some(mut e) = found {
        match still_served(&e, &pkt) {
            Served::Yes => {
                let Some(way) = way_of(dev, &pkt, &e, now) else {
                    return dev.to_tc();
                };
                conntrack::touch(&k, &mut e, &pkt, len, now);
                let e = *e;
                stats::packet(e.service_id, len);
                stats::backend_packet(e.backend_id, len);
                return dev.forward(&pkt, &e, way, V_FORWARD_ESTABLISHED);
            }
            Served::Reset => {
                if !D::ANSWERS {
                    return dev.to_tc();
                }
                let e = *e;
                conntrack::forget(&k, &e);
                return dev.refuse(&pkt, V_RESET_BACKEND_GONE);
            }
            Served::Renew => {
                let e = *e;
                conntrack::forget(&k, &e);
                new_verdict = V_FORWARD_RENEWED;
            }
        }
    }
    if !(D::PLANS_SYN && syn) {
        fe = select::frontend(&frontend_key(&pkt));
    }
    if fe.is_none()
        && !snat_port
        && let Some(verdict) = reply(dev, &pkt, now, len)
    {
        return verdict;
    }
    let Some(fe) = fe else {
        // A ClusterIP on a port its Service does not define: refused, as
        // kube-proxy's nftables mode does.
        if addr_flags & ADDR_CLUSTER_IP != 0 {
            return dev.refuse(&pkt, V_REJECT_UNDEFINED_PORT);
        }
        stats::verdict(V_PASS_NOT_SERVICE);
        return dev.pass();
    };
    // loadBalancerSourceRanges: new flows to the LoadBalancer IP only from
    // the Service's ranges (established ones were let in).
    if fe.flags & FE_SOURCE_RANGES != 0 {
        let key = Key::new(
            SOURCE_RANGE_ID_BITS + 32,
            SourceRange4 {
                service_id: fe.service_id,
                addr: pkt.src_addr,
            },
        );
        if SOURCE_RANGES4.get(&key).is_none() {
            stats::verdict(V_DROP_SOURCE_RANGE);
            return dev.drop();
        }
    }
    let chosen = match Plan::unpacked(planned) {
        Some(p) => Ok(p),
        None => choose(&pkt, &fe),
    };
    let plan = match chosen {
        Ok(p) => p,
        Err(v) => {
            if v == V_REJECT_NO_BACKEND && !D::ANSWERS {
                return dev.to_tc();
            }
            if v == V_REJECT_NO_BACKEND || v == V_DROP_NO_LOCAL_BACKEND {
                stats::no_backend(fe.service_id);
            }
            if v == V_REJECT_NO_BACKEND {
                return dev.refuse(&pkt, v);
            }
            stats::verdict(v);
            // Off the forwarding path: a dropped first packet. Compiled
            // out at load unless the agent runs with --datapath-logs.
            debug!(
                dev,
                "drop new flow to {:i}:{} (service {}): verdict {}",
                u32::from_be(pkt.dst_addr),
                u16::from_be(pkt.dst_port),
                fe.service_id,
                v
            );
            return dev.drop();
        }
    };
    let chosen = &plan.chosen;
    let (local, dsr, snat_addr) = (plan.local(), plan.dsr(&fe), plan.snat_addr(&fe, &pkt));
    // XDP must know it can send the packet before it records the flow (or
    // leave it to tc untouched); tc asks after, as the stack it has left
    // then is what the verifier's 512 bytes allow.
    let early = if D::ANSWERS {
        None
    } else {
        let grow = if dsr { DSR_OVERHEAD } else { 0 };
        let Some(w) = way(dev, &pkt, !local, snat_addr, chosen.backend.addr, grow, now) else {
            return dev.to_tc();
        };
        Some(w)
    };
    if dsr && new_verdict == V_FORWARD_NEW {
        new_verdict = V_FORWARD_DSR;
    }
    // Past this CPU's new-flow rate nothing more goes into conntrack: a
    // flow the Maglev table alone keeps on its backend (DSR: no reply
    // comes back here) goes on untracked, any other is dropped.
    let track = if flood::over_rate() {
        if !(dsr && fe.flags & FE_MAGLEV != 0) {
            stats::verdict(V_DROP_FLOOD);
            return dev.drop();
        }
        new_verdict = V_FORWARD_UNTRACKED;
        false
    } else {
        true
    };
    let (service_id, backend_id) = (fe.service_id, chosen.backend_id);
    match new_flow(&pkt, &fe, &plan, track, now) {
        Ok(e) => {
            // An untracked packet is no new flow to count, only a packet.
            if track {
                stats::first_packet(service_id, backend_id, len);
            } else {
                stats::packet(service_id, len);
                stats::backend_packet(backend_id, len);
            }
            let way = match early {
                Some(w) => w,
                // tc sends everywhere: never None.
                None => way_of(dev, &pkt, &e, now).unwrap_or(Way::Stack),
            };
            dev.forward(&pkt, &e, way, new_verdict)
        }
        Err(v) => {
            stats::verdict(v);
            debug!(
                dev,
                "drop new flow to {:i}:{}: no conntrack entry (verdict {})",
                u32::from_be(pkt.dst_addr),
                u16::from_be(pkt.dst_port),
                v
            );
            dev.drop()
        }
    }
}

/// A reply of an SNATed flow (from a backend on another node), translated
/// back; None when the packet is none.
#[inline(always)]
fn reply<D: Device>(dev: &D, pkt: &Packet, now: u32, len: u32) -> Option<i32> {
    let k = conntrack::key(pkt, CT_REPLY);
    let mut e = conntrack::lookup(&k, now)?;
    let Some(way) = way_of(dev, pkt, &e, now) else {
        return Some(dev.to_tc());
    };
    conntrack::touch(&k, &mut e, pkt, len, now);
    let e = *e;
    stats::packet(e.service_id, len);
    stats::backend_packet(e.backend_id, len);
    Some(dev.forward(pkt, &e, way, V_REPLY))
}

/// The frontend a packet from outside is for.
#[inline(always)]
fn frontend_key(pkt: &Packet) -> Frontend4Key {
    Frontend4Key {
        addr: pkt.dst_addr,
        port: pkt.dst_port,
        proto: pkt.proto,
        scope: SCOPE_ALL,
    }
}

/// The backend of frontend `fe` for a new flow of this packet's (its
/// client's under session affinity).
#[inline(always)]
fn choose(pkt: &Packet, fe: &Frontend) -> Result<Plan, u32> {
    let client = Client {
        kind: AFFINITY_BY_ADDR,
        id: pkt.src_addr as u64,
    };
    select::choose(&frontend_key(pkt), fe, flow_hash(fe, pkt), &client).map(|c| Plan::new(fe, c))
}

/// The flow hash a frontend's backend is picked with.
#[inline(always)]
fn flow_hash(fe: &Frontend, pkt: &Packet) -> u32 {
    hash::device4(
        fe.flags & FE_MAGLEV != 0,
        pkt.src_addr,
        pkt.dst_addr,
        pkt.src_port,
        pkt.dst_port,
        pkt.proto,
    )
}

/// A new flow's backend, and where its SNAT port search starts.
struct Plan {
    chosen: Chosen,
    /// Of the SNAT range's span (for an SNATed flow).
    snat_start: u32,
}

impl Plan {
    /// The plan as one word: the backend's id (never 0) and the SNAT
    /// start.
    #[inline(always)]
    fn packed(&self) -> u64 {
        ((self.chosen.backend_id as u64) << 32) | self.snat_start as u64
    }

    /// A `packed` plan, its backend read again (an array's inline lookup);
    /// None for 0, or when the backend has just gone (chosen again then).
    #[inline(always)]
    fn unpacked(word: u64) -> Option<Self> {
        let backend_id = (word >> 32) as u32;
        if backend_id == 0 {
            return None;
        }
        Some(Plan {
            chosen: Chosen {
                backend_id,
                backend: backend(backend_id)?,
            },
            snat_start: word as u32,
        })
    }

    #[inline(always)]
    fn new(fe: &Frontend, chosen: Chosen) -> Self {
        let mut p = Plan {
            chosen,
            snat_start: 0,
        };
        if p.snated(fe) {
            // SAFETY: helper without arguments.
            p.snat_start = (unsafe { bpf_get_prandom_u32() }) % snat_ports().1;
        }
        p
    }

    /// The backend is on this node.
    #[inline(always)]
    fn local(&self) -> bool {
        self.chosen.backend.flags & BACKEND_LOCAL != 0
    }

    /// The backend answers the client itself, not through this node.
    #[inline(always)]
    fn dsr(&self, fe: &Frontend) -> bool {
        !self.local() && fe.flags & FE_DSR != 0
    }

    /// The backend answers this node (on another node, not under DSR).
    #[inline(always)]
    fn snated(&self, fe: &Frontend) -> bool {
        !self.local() && fe.flags & FE_DSR == 0
    }

    /// The backend answers the node when it is on another node: the
    /// source becomes a node address. Under DSR it answers the client
    /// itself and the node address is the outer source of the packets it
    /// is sent. 0 for a local backend.
    #[inline(always)]
    fn snat_addr(&self, fe: &Frontend, pkt: &Packet) -> u32 {
        if self.local() { 0 } else { snat_addr(fe, pkt) }
    }

    /// The key of the flow's reply entry, as `new_flow` first tries it
    /// (under DSR, which has none, the client's).
    #[inline(always)]
    fn reply_key(&self, fe: &Frontend, pkt: &Packet) -> Ct4Key {
        if self.dsr(fe) {
            return conntrack::key(pkt, CT_ORIGINAL);
        }
        let b = &self.chosen.backend;
        let mut k = Ct4Key {
            src_addr: b.addr,
            dst_addr: pkt.src_addr,
            src_port: b.port,
            dst_port: pkt.src_port,
            proto: pkt.proto,
            dir: CT_REPLY,
            _pad: 0,
        };
        if !self.local() {
            k.dst_addr = snat_addr(fe, pkt);
            k.dst_port = snat_port(self.snat_start, 0).to_be();
        }
        k
    }
}

enum Served {
    /// The flow goes on to its backend.
    Yes,
    /// Its backend left the Service and the segment belongs to a TCP
    /// connection: end it with a RST to the client.
    Reset,
    /// Start a new flow on this tuple (a datagram whose backend left or
    /// stopped serving, a SYN whose entry is stale or closing).
    Renew,
}

/// Whether the flow of entry `e` may go on, checked on every packet from
/// the client (as Cilium does on a conntrack hit): a backend the Service
/// no longer lists has left; one that no longer serves keeps only its TCP
/// connections, as kube-proxy leaves them.
#[inline(always)]
fn still_served(e: &Ct4Entry, pkt: &Packet) -> Served {
    let tcp = pkt.proto == PROTO_TCP;
    let syn = tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A new connection reusing the tuple of one that is closing.
    if syn && e.flags & CT_CLOSING != 0 {
        return Served::Renew;
    }
    let key = ServiceBackendKey {
        service_id: e.service_id,
        backend_id: e.backend_id,
    };
    // SAFETY: copied out at once.
    let flags = unsafe { SERVICE_BACKENDS.get(&key) }.copied();
    let served = match flags {
        Some(f) => tcp || f & SB_SERVING != 0,
        None => false,
    };
    if served {
        Served::Yes
    } else if tcp && !syn {
        Served::Reset
    } else {
        Served::Renew
    }
}

/// tc egress on a node device: replies of backends on this node leave with
/// the frontend as their source.
#[inline(always)]
pub fn to_netdev(ctx: &TcContext) -> i32 {
    let Ok(pkt) = parse::parse(ctx) else {
        return TC_ACT_OK;
    };
    if pkt.proto == PROTO_ICMP {
        return icmp::to_netdev(ctx, &pkt);
    }
    // DSR packets this node sends on (and a CNI's tunnel): no reply.
    if pkt.proto == PROTO_IPIP {
        return TC_ACT_OK;
    }
    let k = conntrack::key(&pkt, CT_REPLY);
    let now = now_s();
    let Some(mut e) = conntrack::lookup(&k, now) else {
        return TC_ACT_OK;
    };
    // SNATed flows' replies arrive on ingress; only local backends' here.
    if e.flags & CT_LOCAL_BACKEND == 0 {
        return TC_ACT_OK;
    }
    let len = ctx.len();
    conntrack::touch(&k, &mut e, &pkt, len, now);
    let e = *e;
    // A DSR flow's frontend may be another node's (a NodePort of its
    // address): nothing here to count it under.
    if e.service_id != CT_NO_ID {
        stats::packet(e.service_id, len);
    }
    if e.backend_id != CT_NO_ID {
        stats::backend_packet(e.backend_id, len);
    }
    ctx.forward(&pkt, &e, Way::Stack, V_REPLY)
}

/// Records both directions of a new flow (the client's only under DSR:
/// the replies do not come back here); returns the original direction's
/// entry (the rewrite for this packet).
#[inline(always)]
fn new_flow(
    pkt: &Packet,
    fe: &Frontend,
    plan: &Plan,
    track: bool,
    now: u32,
) -> Result<Ct4Entry, u32> {
    let len = pkt.len;
    let chosen = &plan.chosen;
    let b = &chosen.backend;
    let (local, dsr, snat_addr) = (plan.local(), plan.dsr(fe), plan.snat_addr(fe, pkt));
    let lifetime = conntrack::initial_lifetime(pkt.proto);
    let mut orig = Ct4Entry {
        nat_src_addr: pkt.src_addr,
        nat_dst_addr: b.addr,
        nat_src_port: pkt.src_port,
        nat_dst_port: b.port,
        service_id: fe.service_id,
        backend_id: chosen.backend_id,
        created_s: now,
        last_seen_s: now,
        lifetime_s: lifetime,
        flags: if local { CT_LOCAL_BACKEND } else { CT_SNAT },
        _pad: [0; 3],
        packets: 1,
        bytes: len as u64,
    };
    let reply = Ct4Entry {
        nat_src_addr: pkt.dst_addr,
        nat_dst_addr: pkt.src_addr,
        nat_src_port: pkt.dst_port,
        nat_dst_port: pkt.src_port,
        packets: 0,
        bytes: 0,
        ..orig
    };
    let mut rkey = plan.reply_key(fe, pkt);
    if dsr {
        orig.nat_src_addr = snat_addr;
        orig.flags = CT_DSR;
        // Untracked (flood protection): the entry only says how to send
        // this packet.
        if !track {
            return Ok(orig);
        }
    } else if local {
        conntrack::create(&rkey, &reply).map_err(|_| V_DROP_CT_FULL)?;
    } else {
        // The backend answers the node: source becomes a node address and
        // a port of the SNAT range no other flow to that backend holds. A
        // port whose reply entry has expired is free again (an LRU entry
        // stays until evicted), a closed TCP flow's only once the backend
        // can no longer hold the old connection in TIME_WAIT.
        orig.nat_src_addr = snat_addr;
        let mut port = 0u16;
        let mut done = false;
        for i in 0..SNAT_TRIES {
            port = snat_port(plan.snat_start, i);
            rkey.dst_port = port.to_be();
            if conntrack::reserve_snat_port(&rkey, &reply) {
                done = true;
                break;
            }
        }
        if !done {
            return Err(V_DROP_NO_SNAT_PORT);
        }
        orig.nat_src_port = port.to_be();
    }
    let okey = conntrack::key(pkt, CT_ORIGINAL);
    conntrack::create(&okey, &orig).map_err(|_| V_DROP_CT_FULL)?;
    Ok(orig)
}

#[inline(always)]
fn snat_addr(fe: &Frontend, pkt: &Packet) -> u32 {
    // A NodePort's address is this node's; other frontends use the
    // configured node address.
    if fe.kind == KIND_NODE_PORT {
        return pkt.dst_addr;
    }
    match CONFIG.get(0) {
        Some(c) if c.snat_addr != 0 => c.snat_addr,
        _ => pkt.dst_addr,
    }
}

/// Ports tried for a new SNATed flow before it is dropped
/// (`drop_no_snat_port`): from a random start, in order, so a range of up
/// to this many ports is tried whole.
const SNAT_TRIES: u32 = 8;

/// The SNAT port `i` tries after `start` (host order).
#[inline(always)]
fn snat_port(start: u32, i: u32) -> u16 {
    let (min, span) = snat_ports();
    (min + (start + i) % span) as u16
}

/// The SNAT port range: first port and number of ports (host order).
#[inline(always)]
fn snat_ports() -> (u32, u32) {
    let (min, max) = match CONFIG.get(0) {
        Some(c) if c.snat_port_max >= c.snat_port_min && c.snat_port_min > 0 => {
            (c.snat_port_min, c.snat_port_max)
        }
        _ => (61000, 65535),
    };
    // Never 0 (and known not to be): a division by a value the compiler
    // cannot prove non-zero leaves a panic path the verifier refuses.
    let span = (max as u32).wrapping_sub(min as u32).wrapping_add(1).max(1);
    (min as u32, span)
}

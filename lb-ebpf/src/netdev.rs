//! The device path: packets from outside the node to NodePort, external and
//! LoadBalancer addresses, translated per packet with connection tracking
//! (tc ingress on the node's devices), and replies of local backends
//! translated back on their way out (tc egress).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    conntrack::{CT_LOCAL_BACKEND, CT_ORIGINAL, CT_REPLY, CT_SNAT, Ct4Entry, Ct4Key},
    counters::{
        V_DROP_CT_FULL, V_DROP_NO_LOCAL_BACKEND, V_DROP_REWRITE, V_FORWARD_ESTABLISHED,
        V_FORWARD_NEW, V_PASS_NOT_SERVICE, V_REJECT_NO_BACKEND, V_REJECT_UNDEFINED_PORT, V_REPLY,
    },
    hash,
    service::{
        ADDR_CLUSTER_IP, AFFINITY_BY_ADDR, BACKEND_LOCAL, Frontend, Frontend4Key, KIND_NODE_PORT,
        SCOPE_ALL,
    },
};

use crate::{
    conntrack::{self, now_s},
    maps::{ADDRS4, CONFIG},
    nat,
    parse::{self, Packet},
    reject, route,
    select::{self, Chosen, Client},
    stats,
};

/// tc ingress on a node device.
#[inline(always)]
pub fn from_netdev(ctx: &TcContext) -> i32 {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(v) => {
            stats::verdict(v);
            return TC_ACT_OK;
        }
    };
    // Every packet this path translates is addressed to a frontend or an
    // SNAT address: anything else leaves after one lookup.
    // SAFETY: copied out at once.
    let Some(addr_flags) = (unsafe { ADDRS4.get(pkt.dst_addr) }).copied() else {
        stats::verdict(V_PASS_NOT_SERVICE);
        return TC_ACT_OK;
    };
    let now = now_s();
    let len = ctx.len();

    // A packet of a known flow from the client.
    let k = conntrack::key(&pkt, CT_ORIGINAL);
    if let Some(e) = conntrack::lookup(&k, now) {
        conntrack::touch(&k, e, &pkt, len, now);
        let e = *e;
        stats::packet(e.service_id, len);
        stats::backend_packet(e.backend_id, len);
        return apply(ctx, &pkt, &e, V_FORWARD_ESTABLISHED);
    }
    // A reply from a backend on another node, to the SNAT address.
    let k = conntrack::key(&pkt, CT_REPLY);
    if let Some(e) = conntrack::lookup(&k, now) {
        conntrack::touch(&k, e, &pkt, len, now);
        let e = *e;
        stats::packet(e.service_id, len);
        stats::backend_packet(e.backend_id, len);
        return apply(ctx, &pkt, &e, V_REPLY);
    }

    let fkey = Frontend4Key {
        addr: pkt.dst_addr,
        port: pkt.dst_port,
        proto: pkt.proto,
        scope: SCOPE_ALL,
    };
    let Some(fe) = select::frontend(&fkey) else {
        // A ClusterIP on a port its Service does not define: refused, as
        // kube-proxy's nftables mode does.
        if addr_flags & ADDR_CLUSTER_IP != 0 {
            return reject::refuse(ctx, &pkt, V_REJECT_UNDEFINED_PORT);
        }
        stats::verdict(V_PASS_NOT_SERVICE);
        return TC_ACT_OK;
    };
    let h = hash::flow4(
        pkt.src_addr,
        pkt.dst_addr,
        pkt.src_port,
        pkt.dst_port,
        pkt.proto,
    );
    let client = Client {
        kind: AFFINITY_BY_ADDR,
        id: pkt.src_addr as u64,
    };
    let chosen = match select::choose(&fkey, &fe, h, &client) {
        Ok(c) => c,
        Err(v) => {
            if v == V_REJECT_NO_BACKEND || v == V_DROP_NO_LOCAL_BACKEND {
                stats::no_backend(fe.service_id);
            }
            if v == V_REJECT_NO_BACKEND {
                return reject::refuse(ctx, &pkt, v);
            }
            stats::verdict(v);
            // Off the forwarding path: a dropped first packet. Compiled
            // out at load unless the agent runs with --datapath-logs.
            debug!(
                ctx,
                "drop new flow to {:i}:{} (service {}): verdict {}",
                u32::from_be(pkt.dst_addr),
                u16::from_be(pkt.dst_port),
                fe.service_id,
                v
            );
            return TC_ACT_SHOT;
        }
    };
    match new_flow(&pkt, &fe, &chosen, now, len) {
        Ok(e) => {
            stats::new_flow(fe.service_id);
            stats::packet(fe.service_id, len);
            stats::backend_flow(chosen.backend_id);
            stats::backend_packet(chosen.backend_id, len);
            apply(ctx, &pkt, &e, V_FORWARD_NEW)
        }
        Err(v) => {
            stats::verdict(v);
            debug!(
                ctx,
                "drop new flow to {:i}:{}: no conntrack entry (verdict {})",
                u32::from_be(pkt.dst_addr),
                u16::from_be(pkt.dst_port),
                v
            );
            TC_ACT_SHOT
        }
    }
}

/// tc egress on a node device: replies of backends on this node leave with
/// the frontend as their source.
#[inline(always)]
pub fn to_netdev(ctx: &TcContext) -> i32 {
    let Ok(pkt) = parse::parse(ctx) else {
        return TC_ACT_OK;
    };
    let k = conntrack::key(&pkt, CT_REPLY);
    let now = now_s();
    let Some(e) = conntrack::lookup(&k, now) else {
        return TC_ACT_OK;
    };
    // SNATed flows' replies arrive on ingress; only local backends' here.
    if e.flags & CT_LOCAL_BACKEND == 0 {
        return TC_ACT_OK;
    }
    let len = ctx.len();
    conntrack::touch(&k, e, &pkt, len, now);
    let e = *e;
    stats::packet(e.service_id, len);
    stats::backend_packet(e.backend_id, len);
    apply(ctx, &pkt, &e, V_REPLY)
}

/// Rewrites per the entry, then hands the packet on: to the stack when it
/// can route it, straight to the egress device when the source is a node
/// address it would refuse.
#[inline(always)]
fn apply(ctx: &TcContext, pkt: &Packet, e: &Ct4Entry, verdict: u32) -> i32 {
    if nat::rewrite(
        ctx,
        pkt,
        e.nat_src_addr,
        e.nat_dst_addr,
        e.nat_src_port,
        e.nat_dst_port,
    )
    .is_err()
    {
        stats::verdict(V_DROP_REWRITE);
        return TC_ACT_SHOT;
    }
    stats::verdict(verdict);
    if e.flags & CT_SNAT != 0 {
        route::redirect(ctx, pkt.proto, e.nat_src_addr, e.nat_dst_addr)
    } else {
        TC_ACT_OK
    }
}

/// Records both directions of a new flow; returns the original direction's
/// entry (the rewrite for this packet).
#[inline(always)]
fn new_flow(
    pkt: &Packet,
    fe: &Frontend,
    chosen: &Chosen,
    now: u32,
    len: u32,
) -> Result<Ct4Entry, u32> {
    let b = &chosen.backend;
    let local = b.flags & BACKEND_LOCAL != 0;
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
    let mut rkey = Ct4Key {
        src_addr: b.addr,
        dst_addr: pkt.src_addr,
        src_port: b.port,
        dst_port: pkt.src_port,
        proto: pkt.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    if local {
        conntrack::create_reply(&rkey, &reply, false).map_err(|_| V_DROP_CT_FULL)?;
    } else {
        // The backend answers the node: source becomes a node address and
        // a port no other flow to that backend uses.
        let snat_addr = snat_addr(fe, pkt);
        rkey.dst_addr = snat_addr;
        orig.nat_src_addr = snat_addr;
        let mut done = false;
        let mut try_port = pkt.src_port;
        for i in 0..4u32 {
            if i > 0 {
                try_port = random_port();
            }
            rkey.dst_port = try_port;
            if conntrack::create_reply(&rkey, &reply, true).is_ok() {
                done = true;
                break;
            }
        }
        if !done {
            return Err(V_DROP_CT_FULL);
        }
        orig.nat_src_port = try_port;
    }
    let okey = conntrack::key(pkt, CT_ORIGINAL);
    conntrack::create_original(&okey, &orig).map_err(|_| V_DROP_CT_FULL)?;
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

#[inline(always)]
fn random_port() -> u16 {
    let (min, max) = match CONFIG.get(0) {
        Some(c) if c.snat_port_max > c.snat_port_min => (c.snat_port_min, c.snat_port_max),
        _ => (32768, 60999),
    };
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let span = (max as u32).wrapping_sub(min as u32).wrapping_add(1).max(1);
    let p = min as u32 + r % span;
    (p as u16).to_be()
}

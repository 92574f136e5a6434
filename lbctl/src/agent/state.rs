//! The contents of the service maps as plain ordered collections, and the
//! single-entry operations that change them. The in-memory map writer, the
//! reconciler's mirror of what it wrote, golden dumps and `lbctl diff` all
//! use this one representation.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use lb_common::{
    ip4_octets, port_host,
    service::{
        Backend4, Frontend, Frontend4Key, Name, SLOTS_PER_CHUNK, ServiceBackendKey, ServiceMeta,
        SlotChunk, SlotKey,
    },
};

/// The (slot, backend id) pairs a chunk of a backend set holds: its
/// non-zero ids, numbered from the chunk's first slot.
pub fn slot_ids(k: &SlotKey, v: &SlotChunk) -> impl Iterator<Item = (u32, u32)> {
    let first = k.chunk * SLOTS_PER_CHUNK;
    (first..).zip(v.backends).filter(|(_, id)| *id != 0)
}

/// The chunks that hold backend list `ids` as set `set` (slot `i` is
/// `ids[i]`); none for an empty list.
pub fn set_chunks(set: u32, ids: &[u32]) -> impl Iterator<Item = (SlotKey, SlotChunk)> + '_ {
    (0u32..)
        .zip(ids.chunks(SLOTS_PER_CHUNK as usize))
        .map(move |(chunk, part)| {
            let mut v = SlotChunk::default();
            v.backends[..part.len()].copy_from_slice(part);
            (
                SlotKey {
                    backend_set: set,
                    chunk,
                },
                v,
            )
        })
}

/// A `loadBalancerSourceRanges` prefix of a Service port
/// (`LB4_SOURCE_RANGES_V1`, an LPM trie keyed by (32 + `prefix_len`,
/// `SourceRange4`)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub service_id: u32,
    /// Wire order, host bits clear.
    pub addr: u32,
    pub prefix_len: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// Addresses the device path translates for -> `ADDR_*` flags.
    pub addrs: BTreeMap<u32, u32>,
    pub frontends: BTreeMap<Frontend4Key, Frontend>,
    /// Backend sets, 16 slots an entry (`slot_ids` reads them).
    pub slots: BTreeMap<SlotKey, SlotChunk>,
    pub source_ranges: BTreeMap<RangeKey, u32>,
    /// (Service port, backend) -> `SB_*`.
    pub svc_backends: BTreeMap<ServiceBackendKey, u32>,
    pub backends: BTreeMap<u32, Backend4>,
    pub service_meta: BTreeMap<u32, ServiceMeta>,
    /// Node and zone names by `NAME_NODE | id` / `NAME_ZONE | id`.
    pub names: BTreeMap<u32, Name>,
    /// `LB_PORTS_V1`: word index -> a bit per port (`lb_common::ports`);
    /// words that are 0 are left out.
    pub ports: BTreeMap<u32, u64>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// With whether the id is new to the maps (its counters are created
    /// zeroed; an existing id keeps its counts).
    PutBackend(u32, Backend4, bool),
    /// Boxed, as the service meta below: an op list of a full sync holds
    /// hundreds of thousands of ops, each as large as its largest variant.
    PutName(u32, Box<Name>),
    /// A new service id: its meta, and its counters start from zero.
    PutServiceMeta(u32, Box<ServiceMeta>, bool),
    /// Boxed: 64 bytes.
    PutSlot(SlotKey, Box<SlotChunk>),
    PutServiceBackend(ServiceBackendKey, u32),
    PutSourceRange(RangeKey, u32),
    PutAddr(u32, u32),
    PutFrontend(Frontend4Key, Frontend),
    DelFrontend(Frontend4Key),
    DelAddr(u32),
    DelSlot(SlotKey),
    DelServiceBackend(ServiceBackendKey),
    DelSourceRange(RangeKey),
    DelServiceMeta(u32),
    DelName(u32),
    DelBackend(u32),
    /// A word of the port map (0 clears it).
    PutPorts(u32, u64),
}

impl MapState {
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend(k, v, _) => drop(self.backends.insert(k, v)),
            Op::PutName(k, ref v) => drop(self.names.insert(k, **v)),
            Op::PutServiceMeta(k, ref v, _) => drop(self.service_meta.insert(k, **v)),
            Op::PutSlot(k, ref v) => drop(self.slots.insert(k, **v)),
            Op::PutServiceBackend(k, v) => drop(self.svc_backends.insert(k, v)),
            Op::DelServiceBackend(k) => drop(self.svc_backends.remove(&k)),
            Op::PutSourceRange(k, v) => drop(self.source_ranges.insert(k, v)),
            Op::DelSourceRange(k) => drop(self.source_ranges.remove(&k)),
            Op::PutAddr(k, v) => drop(self.addrs.insert(k, v)),
            Op::DelAddr(k) => drop(self.addrs.remove(&k)),
            Op::PutFrontend(k, v) => drop(self.frontends.insert(k, v)),
            Op::DelFrontend(k) => drop(self.frontends.remove(&k)),
            Op::PutPorts(k, 0) => drop(self.ports.remove(&k)),
            Op::PutPorts(k, v) => drop(self.ports.insert(k, v)),
            Op::DelSlot(k) => drop(self.slots.remove(&k)),
            Op::DelServiceMeta(k) => drop(self.service_meta.remove(&k)),
            Op::DelName(k) => drop(self.names.remove(&k)),
            Op::DelBackend(k) => drop(self.backends.remove(&k)),
        }
    }

    /// The backend id in slot `slot` of set `set`, as the datapath reads it.
    pub fn slot(&self, set: u32, slot: u32) -> Option<u32> {
        let (k, i) = SlotKey::of_slot(set, slot);
        let id = self.slots.get(&k)?.backends[i];
        (id != 0).then_some(id)
    }

    /// Every slot of every set: (set, slot, backend id).
    pub fn slot_entries(&self) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        self.slots
            .iter()
            .flat_map(|(k, v)| slot_ids(k, v).map(move |(slot, id)| (k.backend_set, slot, id)))
    }

    /// A backend's node name as the names map holds it ("" when none).
    pub fn node_name(&self, b: &Backend4) -> &str {
        super::names::node_key(b.node)
            .and_then(|k| self.names.get(&k))
            .map_or("", |n| cstr(&n.name))
    }

    /// A backend's zone name ("" when none).
    pub fn zone_name(&self, b: &Backend4) -> &str {
        super::names::zone_key(b.zone)
            .and_then(|k| self.names.get(&k))
            .map_or("", |n| cstr(&n.name))
    }

    pub fn entries(&self) -> usize {
        self.addrs.len()
            + self.frontends.len()
            + self.slots.len()
            + self.svc_backends.len()
            + self.source_ranges.len()
            + self.backends.len()
            + self.service_meta.len()
            + self.names.len()
            + self.ports.len()
    }

    /// One line per entry (per slot for backend sets), stable order: golden
    /// files and diffs.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.addrs {
            let _ = writeln!(
                s,
                "addr {} -> flags={:#x}",
                Ipv4Addr::from(ip4_octets(*k)),
                v
            );
        }
        for (k, v) in &self.frontends {
            let _ = writeln!(
                s,
                "frontend {}:{}/{} scope={} -> svc={} set={} count={} term={} kind={} flags={:#x}",
                Ipv4Addr::from(ip4_octets(k.addr)),
                port_host(k.port),
                k.proto,
                k.scope,
                v.service_id,
                v.backend_set,
                v.count,
                v.terminating,
                v.kind,
                v.flags
            );
        }
        // One line per slot, not per chunk: a set reads as its list.
        for (k, v) in &self.slots {
            for (slot, id) in slot_ids(k, v) {
                let _ = writeln!(s, "slot {}/{} -> backend={}", k.backend_set, slot, id);
            }
        }
        for (k, v) in &self.svc_backends {
            let _ = writeln!(
                s,
                "svc-backend {}/{} -> flags={:#x}",
                k.service_id, k.backend_id, v
            );
        }
        for k in self.source_ranges.keys() {
            let _ = writeln!(
                s,
                "source-range {} {}/{}",
                k.service_id,
                Ipv4Addr::from(ip4_octets(k.addr)),
                k.prefix_len
            );
        }
        for (k, v) in &self.backends {
            let _ = writeln!(
                s,
                "backend {} -> {}:{}/{} state={} flags={:#x} node={} zone={}",
                k,
                Ipv4Addr::from(ip4_octets(v.addr)),
                port_host(v.port),
                v.proto,
                v.state,
                v.flags,
                v.node,
                v.zone
            );
        }
        for (k, v) in &self.service_meta {
            let _ = writeln!(
                s,
                "service {} -> {}/{}:{}",
                k,
                cstr(&v.namespace),
                cstr(&v.name),
                cstr(&v.port_name)
            );
        }
        for (k, v) in &self.names {
            let kind = match k & !0xffff {
                lb_common::service::NAME_NODE => "node",
                lb_common::service::NAME_ZONE => "zone",
                _ => "?",
            };
            let _ = writeln!(s, "name {kind} {} -> {}", k & 0xffff, cstr(&v.name));
        }
        for (k, v) in &self.ports {
            let ports: Vec<String> = (0..64)
                .filter(|b| v & (1 << b) != 0)
                .map(|b| (k * 64 + b).to_string())
                .collect();
            let _ = writeln!(s, "ports {k} -> {}", ports.join(","));
        }
        s
    }
}

/// A NUL-padded name field as text.
pub fn cstr(b: &[u8]) -> &str {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).unwrap_or("<invalid utf-8>")
}

/// Text into a NUL-padded name field (cut at a char boundary if too long;
/// Kubernetes names fit: 63 bytes for names, 15 for port names).
pub fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

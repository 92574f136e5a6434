//! Desired state + ids -> map contents, and the loop step that writes the
//! difference. Ids are read back from what is in the maps: a restarted agent
//! adopts every service, backend and backend-set id, so no flow moves.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use smallvec::SmallVec;

use lb_common::{
    ip4,
    maps::{BACKENDS4, SERVICE_ID_SPACE},
    port,
    service::*,
};

use super::{
    apply::{MapError, MapWriter},
    categorize::PolicyEndpoints,
    ids::IdPool,
    maglev,
    model::{
        Backend, BackendAddr, BackendState, Desired, FrontendKind, ObjKey, Proto, ServicePortKey,
        ServicePortState, ServiceType, TrafficPolicy,
    },
    names, plan,
    state::{self, MapState, Op, RangeKey, cstr, fixed},
    written::{self, Before},
};

/// Ops a flush diffs and writes at a time (one batch per map): what bounds
/// the op list and the writer's buffers.
const FLUSH_CHUNK: usize = 8192;

/// Backend sets: at most two per service port live at once (old and new).
const MAX_SETS: u32 = u32::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("out of {0} ids")]
    OutOfIds(&'static str),
    /// The port would take a map past its size: refused whole (nothing of
    /// it written), the ports that fit keep working.
    #[error(
        "map {map} is full: {need} entries needed, {size} fit (raise --lb-map-max{})",
        if *map == lb_common::maps::BACKEND_SLOTS { ", or --maglev-map-max for Maglev tables" } else { "" }
    )]
    Full {
        map: &'static str,
        size: u32,
        need: usize,
    },
    #[error(transparent)]
    Map(#[from] MapError),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub writes: usize,
    pub elapsed: Duration,
    /// UDP backends this flush took out of a Service port's serving ones:
    /// sockets connected to them through that port are to be ended.
    pub udp_left: Vec<UdpLeft>,
}

/// A UDP backend that stopped serving a Service port (wire order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpLeft {
    pub service_id: u32,
    pub addr: u32,
    pub port: u16,
}

/// Whether `op`, about to be applied to `state`, takes a UDP backend out
/// of a Service port's serving ones (removed, or kept not serving).
fn udp_backend_leaving(want: &MapState, before: &Before, op: &Op) -> Option<UdpLeft> {
    let (k, serving_after) = match op {
        Op::DelServiceBackend(k) => (k, false),
        Op::PutServiceBackend(k, f) => (k, f & SB_SERVING != 0),
        _ => return None,
    };
    let was_serving = written::written(&want.svc_backends, &before.svc_backends, k)
        .is_some_and(|f| f & SB_SERVING != 0);
    let b = written::written(&want.backends, &before.backends, &k.backend_id)?;
    (was_serving && !serving_after && b.proto == lb_common::PROTO_UDP).then_some(UdpLeft {
        service_id: k.service_id,
        addr: b.addr,
        port: b.port,
    })
}

/// How many entries each Service map holds (`--lb-map-max`, see
/// `lb_common::maps::lb_map_sizes`): a port that would take the target
/// past one is refused, by name, before anything of it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub lb_map_max: u32,
    /// Slot chunks for Maglev tables (`--maglev-map-max` tables of
    /// `--maglev-table-size`, `lb_common::maps::maglev_chunks`).
    pub maglev_chunks: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            lb_map_max: lb_common::maps::DEFAULT_LB_MAP_MAX,
            maglev_chunks: lb_common::maps::DEFAULT_MAGLEV_CHUNKS,
        }
    }
}

impl Capacity {
    /// The size of `map`.
    pub fn of(&self, map: &str) -> u32 {
        lb_common::maps::lb_map_sizes(self.lb_map_max, self.maglev_chunks)
            .into_iter()
            .find(|(m, _)| *m == map)
            .map_or(u32::MAX, |(_, n)| n)
    }

    fn check(&self, map: &'static str, need: usize) -> Result<(), ReconcileError> {
        let size = self.of(map);
        if need > size as usize {
            return Err(ReconcileError::Full { map, size, need });
        }
        Ok(())
    }
}

/// A backend's id and the ports that list it.
#[derive(Clone, Debug)]
struct BackendRec {
    id: u32,
    owners: Owners<()>,
}

/// A port's key, shared: see `Reconciler::ports`.
type PortKey = Arc<ServicePortKey>;

/// The ports that put an entry into the target, each with the value it
/// wants, in key order: the first wins (as a full translation would give
/// it). Nearly always one port, held inline: a sorted vector of shared
/// keys on the heap cost a 32-byte allocation per backend, a map per
/// entry two kilobytes (a B-tree node).
#[derive(Clone, Debug)]
struct Owners<V>(SmallVec<[(PortKey, V); 1]>);

impl<V> Default for Owners<V> {
    fn default() -> Self {
        Self(SmallVec::new())
    }
}

impl<V> Owners<V> {
    fn insert(&mut self, key: &Arc<ServicePortKey>, v: V) {
        match self.0.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            Ok(i) => self.0[i] = (key.clone(), v),
            Err(i) => {
                // One more, not a doubling: most lists stay at one.
                self.0.reserve_exact(1);
                self.0.insert(i, (key.clone(), v))
            }
        }
    }

    fn remove(&mut self, key: &ServicePortKey) {
        if let Ok(i) = self.0.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            self.0.remove(i);
        }
    }

    fn first(&self) -> Option<&V> {
        self.0.first().map(|(_, v)| v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one service port put into the target.
#[derive(Clone, Debug)]
struct PortEntry {
    /// The translation it was made from: compared with the next one, and
    /// read for the entries of the backends it owns first. Its backends
    /// (sorted by address) are the port's; no second list is kept.
    input: ServicePortState,
    svc_id: u32,
    /// The backend sets its frontends point at, one per distinct list of
    /// backends its traffic policies give (none without frontends).
    sets: Vec<u32>,
    frontends: Vec<Frontend4Key>,
}

/// Which frontends the maps hold for each service and how many read each
/// backend set, as written: what "which sets do this service's frontends
/// read in the maps" needs, without a scan.
#[derive(Debug, Default)]
struct WrittenIndex {
    /// service id -> its frontend keys, as written.
    /// Sorted, inline up to two (a ClusterIP and a NodePort): a set per
    /// service cost a B-tree node.
    fe_by_svc: BTreeMap<u32, SmallVec<[Frontend4Key; 2]>>,
    /// backend set -> number of frontends pointing at it, as written.
    set_refs: BTreeMap<u32, u32>,
}

impl WrittenIndex {
    fn new<'a>(frontends: impl Iterator<Item = (&'a Frontend4Key, &'a Frontend)>) -> Self {
        let mut m = Self::default();
        for (k, v) in frontends {
            m.link(*k, v);
        }
        m
    }

    fn link(&mut self, k: Frontend4Key, v: &Frontend) {
        let list = self.fe_by_svc.entry(v.service_id).or_default();
        if let Err(i) = list.binary_search(&k) {
            list.insert(i, k);
        }
        *self.set_refs.entry(v.backend_set).or_default() += 1;
    }

    fn unlink(&mut self, k: Frontend4Key, old: &Frontend) {
        if let Some(s) = self.fe_by_svc.get_mut(&old.service_id) {
            if let Ok(i) = s.binary_search(&k) {
                s.remove(i);
            }
            if s.is_empty() {
                self.fe_by_svc.remove(&old.service_id);
            }
        }
        if let Some(n) = self.set_refs.get_mut(&old.backend_set) {
            *n -= 1;
            if *n == 0 {
                self.set_refs.remove(&old.backend_set);
            }
        }
    }

    /// `op` is about to land on maps holding `old` at its key.
    fn apply(&mut self, op: &Op, old: Option<&Frontend>) {
        let k = match op {
            Op::PutFrontend(k, _) | Op::DelFrontend(k) => *k,
            _ => return,
        };
        if let Some(old) = old {
            self.unlink(k, old);
        }
        if let Op::PutFrontend(k, v) = op {
            self.link(*k, v);
        }
    }
}

/// The chunk keys of one backend set.
fn set_range(set: u32) -> std::ops::RangeInclusive<SlotKey> {
    SlotKey {
        backend_set: set,
        chunk: 0,
    }..=SlotKey {
        backend_set: set,
        chunk: u32::MAX,
    }
}

/// The chunks of one backend set.
fn set_chunks_in(
    slots: &BTreeMap<SlotKey, SlotChunk>,
    set: u32,
) -> impl Iterator<Item = (&SlotKey, &SlotChunk)> {
    slots.range(set_range(set))
}

/// The (slot, backend id) pairs of one backend set.
fn set_slots(slots: &BTreeMap<SlotKey, SlotChunk>, set: u32) -> impl Iterator<Item = (u32, u32)> {
    set_chunks_in(slots, set).flat_map(|(k, v)| state::slot_ids(k, v))
}

/// The backend entries of one Service port.
fn port_backends(
    svc_backends: &BTreeMap<ServiceBackendKey, u32>,
    svc_id: u32,
) -> impl Iterator<Item = (&ServiceBackendKey, &u32)> {
    svc_backends.range(
        ServiceBackendKey {
            service_id: svc_id,
            backend_id: 0,
        }..=ServiceBackendKey {
            service_id: svc_id,
            backend_id: u32::MAX,
        },
    )
}

/// One frontend entry a port wants: which of its backend lists it reads.
struct FrontendPlan {
    key: Frontend4Key,
    kind: FrontendKind,
    list: usize,
    flags: u16,
}

/// Keeps the maps equal to the desired state of every service port, by
/// writing only what a change touches.
///
/// The target (`want`) is maintained incrementally: each service port adds
/// its entries to it; entries two ports share (a backend, a frontend two
/// Services claim) go to the first port by key, as a full translation would
/// give them. Every key the target changes is remembered until a flush
/// writes it; a flush diffs only those keys, so one EndpointSlice update
/// costs a handful of comparisons and writes whatever the cluster's size.
/// Invariant: outside the keys of `before`, the maps equal the target.
pub struct Reconciler<W> {
    pub writer: W,
    /// The target: what the maps should hold.
    want: MapState,
    /// What the maps hold where they may differ from the target.
    before: Before,
    index: WrittenIndex,
    /// Ports by key. A port's key is one shared allocation (`PortKey`)
    /// for this map, the id map, the owner lists and the set owners: a
    /// copy each of its three strings cost about 170 bytes. The records
    /// are boxed: one is about 280 bytes, and B-tree nodes filled in key
    /// order stay half empty (a node inline held 3 KiB for 5 or 6).
    ports: BTreeMap<PortKey, Box<PortEntry>>,
    frontend_owners: BTreeMap<Frontend4Key, Owners<Frontend>>,
    /// Frontends per address in the target (all, and ClusterIP ones), and
    /// the SNAT addresses.
    addr_frontends: BTreeMap<u32, u32>,
    addr_cluster_ips: BTreeMap<u32, u32>,
    snat: BTreeSet<u32>,
    /// `LB_PORTS_V1`: the ports the frontends and SNAT ranges use.
    port_map: super::port_map::PortMap,
    svc_ids: BTreeMap<PortKey, u32>,
    /// Backend address -> its id and the ports that list it (its entries
    /// are made from the first port's input). One map for both: an id map
    /// and an owner map by id cost two B-tree entries per backend. A
    /// backend no port lists keeps its id until the flush that deletes
    /// its entries.
    backends: BTreeMap<BackendAddr, BackendRec>,
    svc_pool: IdPool,
    backend_pool: IdPool,
    set_pool: IdPool,
    /// Ids the target no longer uses: freed once a flush has removed their
    /// entries from the maps, so nothing is reused while still in a map.
    retiring_svcs: BTreeSet<PortKey>,
    retiring_backends: BTreeSet<BackendAddr>,
    retiring_sets: BTreeSet<u32>,
    /// Backend set -> the port whose frontends read it in the target.
    set_owner: BTreeMap<u32, PortKey>,
    /// Node and zone names' ids, counted over the target's backends.
    name_ids: names::NameIds,
    capacity: Capacity,
    /// A flush failed while a map was whole: the maps are to be
    /// read before the next one (see `reread_maps`).
    reread: bool,
}

impl<W: MapWriter> Reconciler<W> {
    /// Adopts whatever the maps hold: their ids are kept for the services
    /// and backends that still want them; the rest goes at the first flush.
    pub fn adopt(writer: W) -> Result<Self, MapError> {
        let state = writer.read()?;
        let svc_ids: BTreeMap<PortKey, u32> = state
            .service_meta
            .iter()
            .map(|(id, m)| {
                let k = ServicePortKey {
                    namespace: cstr(&m.namespace).to_string(),
                    name: cstr(&m.name).to_string(),
                    port_name: cstr(&m.port_name).to_string(),
                };
                (Arc::new(k), *id)
            })
            .collect();
        let backends: BTreeMap<BackendAddr, BackendRec> = state
            .backends
            .iter()
            .filter_map(|(id, b)| {
                let addr = BackendAddr {
                    addr: lb_common::ip4_octets(b.addr).into(),
                    port: lb_common::port_host(b.port),
                    proto: Proto::from_number(b.proto)?,
                };
                let rec = BackendRec {
                    id: *id,
                    owners: Owners::default(),
                };
                Some((addr, rec))
            })
            .collect();
        let mut svc_pool = IdPool::new(SERVICE_ID_SPACE - 1);
        // Backend ids index the backends array: `set_capacity` bounds them
        // by its size.
        let mut backend_pool = IdPool::new(Capacity::default().of(BACKENDS4));
        let mut set_pool = IdPool::new(MAX_SETS);
        let mut svc_used: BTreeSet<u32> = state.service_meta.keys().copied().collect();
        svc_used.extend(state.frontends.values().map(|f| f.service_id));
        svc_pool.set_used(svc_used);
        backend_pool.set_used(state.backends.keys().copied());
        let mut sets: BTreeSet<u32> = state.slots.keys().map(|k| k.backend_set).collect();
        sets.extend(state.frontends.values().map(|f| f.backend_set));
        set_pool.set_used(sets.iter().copied());
        let port_map = super::port_map::PortMap::adopt(&state.ports);
        Ok(Self {
            writer,
            retiring_svcs: svc_ids.keys().cloned().collect(),
            retiring_backends: backends.keys().copied().collect(),
            retiring_sets: sets,
            index: WrittenIndex::new(state.frontends.iter()),
            name_ids: names::NameIds::adopt(&state.names),
            // Everything in the maps is to be compared at the first flush.
            before: Before::all(state),
            want: MapState::default(),
            ports: BTreeMap::new(),
            frontend_owners: BTreeMap::new(),
            addr_frontends: BTreeMap::new(),
            addr_cluster_ips: BTreeMap::new(),
            snat: BTreeSet::new(),
            port_map,
            svc_ids,
            backends,
            svc_pool,
            backend_pool,
            set_pool,
            set_owner: BTreeMap::new(),
            capacity: Capacity::default(),
            reread: false,
        })
    }

    /// The map sizes the ports must fit in.
    pub fn set_capacity(&mut self, capacity: Capacity) {
        self.capacity = capacity;
        self.backend_pool.set_max(capacity.of(BACKENDS4));
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Refuses a port (its record before, `prev`, and its new entries:
    /// `ids` of backends, `lists` of slots, `svc_backends` pairs,
    /// `frontends`) when the target with it would not fit the maps. Counts
    /// the target as it would be with the port's previous entries replaced
    /// (a backend another port shares is counted as new: near the limit a
    /// port may be refused one entry early, never let past it).
    fn fits(
        &self,
        prev: Option<&PortEntry>,
        svc_id: u32,
        ids: &[(u32, &Backend)],
        lists: &[(Vec<u32>, bool)],
        svc_backends: usize,
        frontends: usize,
    ) -> Result<(), ReconcileError> {
        let w = &self.want;
        let cap = &self.capacity;
        let new_svc = usize::from(!w.service_meta.contains_key(&svc_id));
        cap.check(
            lb_common::maps::SERVICE_META,
            w.service_meta.len() + new_svc,
        )?;
        let new_backends = ids
            .iter()
            .filter(|(id, _)| !w.backends.contains_key(id))
            .count();
        cap.check(BACKENDS4, w.backends.len() + new_backends)?;
        let prev_slots: usize = prev.map_or(0, |p| {
            p.sets
                .iter()
                .map(|s| set_chunks_in(&w.slots, *s).count())
                .sum()
        });
        let chunk = SLOTS_PER_CHUNK as usize;
        let new_slots: usize = lists.iter().map(|(l, _)| l.len().div_ceil(chunk)).sum();
        cap.check(
            lb_common::maps::BACKEND_SLOTS,
            (w.slots.len() + new_slots).saturating_sub(prev_slots),
        )?;
        let prev_pairs = port_backends(&w.svc_backends, svc_id).count();
        cap.check(
            lb_common::maps::SERVICE_BACKENDS,
            (w.svc_backends.len() + svc_backends).saturating_sub(prev_pairs),
        )?;
        let prev_frontends = prev.map_or(0, |p| p.frontends.len());
        cap.check(
            lb_common::maps::FRONTENDS4,
            (w.frontends.len() + frontends).saturating_sub(prev_frontends),
        )?;
        // LB4_ADDRS_V1 has the size of LB4_FRONTENDS_V1 and an entry per
        // frontend address (and SNAT address) at most: it fits when they do.
        Ok(())
    }

    /// Maps written by an agent that predates `LB_SVC_BACKENDS_V1` have
    /// none of its entries, and the device path would take every flow for
    /// one whose backend left. Until the first flush writes the real ones,
    /// every backend a frontend reads is marked serving for its port.
    /// Returns the entries written (0 when the maps have any already).
    pub fn migrate_service_backends(&mut self) -> Result<usize, MapError> {
        if written::written_len(&self.want.svc_backends, &self.before.svc_backends) != 0 {
            return Ok(0);
        }
        let st = &self.state();
        let keys: BTreeSet<ServiceBackendKey> = st
            .frontends
            .values()
            .flat_map(|f| {
                set_slots(&st.slots, f.backend_set).map(|(_, id)| ServiceBackendKey {
                    service_id: f.service_id,
                    backend_id: id,
                })
            })
            .collect();
        for k in &keys {
            let v = SB_SERVING | SB_CLUSTER;
            self.writer.apply(&Op::PutServiceBackend(*k, v))?;
            // Compared with the target at the first flush.
            self.before
                .svc_backends
                .keys_mut(&self.want.svc_backends)
                .insert(*k, Some(Box::new(v)));
        }
        Ok(keys.len())
    }

    /// What is in the maps, as far as this agent wrote or read it: a copy
    /// (see `written_len` for counts).
    pub fn state(&self) -> MapState {
        written::materialize(&self.want, &self.before)
    }

    /// The frontends the maps hold (a copy of that map alone).
    pub fn written_frontends(&self) -> BTreeMap<Frontend4Key, Frontend> {
        written::overlay(&self.want.frontends, &self.before.frontends)
    }

    /// A Service port's names as the maps hold them.
    pub fn written_service_meta(&self, id: u32) -> Option<&ServiceMeta> {
        written::written(&self.want.service_meta, &self.before.service_meta, &id)
    }

    /// How many entries each map holds, by name.
    pub fn written_lens(&self) -> [(&'static str, usize); 8] {
        use lb_common::maps::*;
        let (w, b) = (&self.want, &self.before);
        [
            (FRONTENDS4, written::written_len(&w.frontends, &b.frontends)),
            (ADDRS4, written::written_len(&w.addrs, &b.addrs)),
            (BACKEND_SLOTS, written::written_len(&w.slots, &b.slots)),
            (
                SERVICE_BACKENDS,
                written::written_len(&w.svc_backends, &b.svc_backends),
            ),
            (
                SOURCE_RANGES4,
                written::written_len(&w.source_ranges, &b.source_ranges),
            ),
            (BACKENDS4, written::written_len(&w.backends, &b.backends)),
            (
                SERVICE_META,
                written::written_len(&w.service_meta, &b.service_meta),
            ),
            (NAMES, written::written_len(&w.names, &b.names)),
        ]
    }

    /// Whether the maps hold a `loadBalancerSourceRanges` entry.
    pub fn has_source_ranges(&self) -> bool {
        written::written_len(&self.want.source_ranges, &self.before.source_ranges) > 0
    }

    /// What the maps should hold.
    pub fn target(&self) -> &MapState {
        &self.want
    }

    pub fn service_id(&self, k: &ServicePortKey) -> Option<u32> {
        self.svc_ids.get(k).copied()
    }

    /// Service ports in the target.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Makes the maps hold exactly `desired` (every Service not in it goes).
    pub fn reconcile(&mut self, desired: &Desired) -> Result<Outcome, ReconcileError> {
        let start = Instant::now();
        let mut by_svc: BTreeMap<ObjKey, BTreeMap<ServicePortKey, ServicePortState>> =
            BTreeMap::new();
        for k in self.ports.keys() {
            by_svc
                .entry(ObjKey::new(&k.namespace, &k.name))
                .or_default();
        }
        for (k, v) in &desired.ports {
            by_svc
                .entry(ObjKey::new(&k.namespace, &k.name))
                .or_default()
                .insert(k.clone(), v.clone());
        }
        for (svc, ports) in by_svc {
            self.set_service(&svc, ports)?;
        }
        self.set_snat_addrs(&desired.snat_addrs);
        let mut o = self.flush()?;
        o.elapsed = start.elapsed();
        Ok(o)
    }

    /// The SNAT addresses replies come back to.
    pub fn set_snat_addrs(&mut self, addrs: &[Ipv4Addr]) {
        let next: BTreeSet<u32> = addrs.iter().map(|a| ip4(a.octets())).collect();
        let changed: Vec<u32> = self.snat.symmetric_difference(&next).copied().collect();
        self.snat = next;
        for a in changed {
            self.refresh_addr(a);
        }
    }

    /// Sets one Service's ports in the target (empty: the Service is gone).
    /// Nothing is written until `flush`.
    pub fn set_service(
        &mut self,
        svc: &ObjKey,
        ports: BTreeMap<ServicePortKey, ServicePortState>,
    ) -> Result<(), ReconcileError> {
        let lo = ServicePortKey {
            namespace: svc.namespace.to_string(),
            name: svc.name.clone(),
            port_name: String::new(),
        };
        let old: Vec<PortKey> = self
            .ports
            .range::<ServicePortKey, _>(lo..)
            .take_while(|(k, _)| k.namespace == svc.namespace && k.name == svc.name)
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            if !ports.contains_key(k.as_ref()) {
                self.remove_port(&k);
            }
        }
        for (k, sp) in ports {
            if self.ports.get(&k).is_some_and(|e| e.input == sp) {
                continue;
            }
            self.set_port(k, sp)?;
        }
        Ok(())
    }

    /// The writes a flush would make now, without making them: what the
    /// maps lack, hold stale or hold extra compared with the target
    /// (`lbctl diff`).
    pub fn pending_ops(&self) -> Vec<Op> {
        plan::diff_before(&self.before, &self.want)
    }

    /// Writes what the target changed since the last complete flush, in
    /// make-before-break order. On a failed write the maps keep what did
    /// land; the next flush goes on from there.
    pub fn flush(&mut self) -> Result<Outcome, ReconcileError> {
        let start = Instant::now();
        self.reread_maps()?;
        // New ports into the port map before their frontends.
        let mut writes = self.write_ports(true)?;
        // Phase by phase, in chunks: only one chunk's ops are held at a time.
        let mut udp_left: Vec<UdpLeft> = Vec::new();
        let mut ops = Vec::new();
        for phase in 0..plan::PHASES {
            let mut from = plan::Resume::Start;
            loop {
                ops.clear();
                let more = plan::diff_phase(
                    phase,
                    &self.before,
                    &self.want,
                    &mut ops,
                    &mut from,
                    FLUSH_CHUNK,
                );
                // Each key is in the diff once, so every op can be judged
                // against the maps as they are before it.
                udp_left.extend(
                    ops.iter()
                        .filter_map(|op| udp_backend_leaving(&self.want, &self.before, op)),
                );
                let written = self.writer.apply_all(&ops);
                let landed = match &written {
                    Ok(()) => ops.len(),
                    Err((n, _)) => *n,
                };
                for op in &ops[..landed] {
                    if let Op::PutFrontend(k, _) | Op::DelFrontend(k) = op {
                        let old = written::written(&self.want.frontends, &self.before.frontends, k);
                        self.index.apply(op, old);
                    }
                    self.before.landed(op);
                }
                writes += landed;
                if let Err((_, e)) = written {
                    // A whole map does not record which of its keys
                    // landed: what the maps hold is read instead.
                    if self.before.has_whole_map() {
                        self.reread = true;
                        self.reread_maps()?;
                    }
                    return Err(e.into());
                }
                if !more {
                    break;
                }
            }
        }
        // Ports whose last frontend went, out of the port map after it.
        writes += self.write_ports(false)?;
        self.port_map.set_whole();
        self.want.ports = self.port_map.target();
        // Every key left was equal to the target.
        self.before = Before::default();
        // The maps hold nothing of the retired ids now.
        for k in std::mem::take(&mut self.retiring_svcs) {
            if !self.ports.contains_key(&k)
                && let Some(id) = self.svc_ids.remove(&k)
            {
                self.svc_pool.free(id);
            }
        }
        for a in std::mem::take(&mut self.retiring_backends) {
            if let Some(r) = self.backends.get(&a)
                && r.owners.is_empty()
            {
                self.backend_pool.free(r.id);
                self.backends.remove(&a);
            }
        }
        for set in std::mem::take(&mut self.retiring_sets) {
            if !self.set_owner.contains_key(&set) {
                self.set_pool.free(set);
            }
        }
        Ok(Outcome {
            writes,
            elapsed: start.elapsed(),
            udp_left,
        })
    }

    /// Writes the port map's changes (`keep`: no bit cleared yet); returns
    /// how many words were written.
    fn write_ports(&mut self, keep: bool) -> Result<usize, ReconcileError> {
        let ops = self.port_map.ops(keep);
        let written = self.writer.apply_all(&ops);
        let landed = match &written {
            Ok(()) => ops.len(),
            Err((n, _)) => *n,
        };
        for op in &ops[..landed] {
            self.port_map.landed(op);
        }
        written.map_err(|(_, e)| e)?;
        Ok(landed)
    }

    /// Ports of the SNAT range `range` (and of `previous`, the range the
    /// pinned config had) in the port map for the agent's life: replies of
    /// SNATed flows come back to them.
    pub fn add_snat_ports(&mut self, range: std::ops::RangeInclusive<u16>) {
        self.port_map.add_snat_range(range);
    }

    /// Whether the port map has been written whole (the config may say
    /// `CFG_PORTS`).
    pub fn ports_whole(&self) -> bool {
        self.port_map.is_whole()
    }

    /// After a flush failed on a whole map: what the maps hold,
    /// read, is what the next flush compares with (until it is read, the
    /// target's changes are not recorded against those maps).
    fn reread_maps(&mut self) -> Result<(), MapError> {
        if self.reread {
            let cur = self.writer.read()?;
            self.before = Before::of(&cur, &self.want);
            self.reread = false;
        }
        Ok(())
    }

    fn remove_port(&mut self, k: &PortKey) {
        let Some(e) = self.ports.remove(k.as_ref()) else {
            return;
        };
        for b in &e.input.backends {
            self.release_backend(k, b.addr);
        }
        for fk in &e.frontends {
            self.release_frontend(k, *fk);
        }
        for set in e.sets {
            self.drop_set(set);
        }
        self.write_port_backends(e.svc_id, &BTreeMap::new());
        self.write_port_ranges(e.svc_id, &BTreeSet::new());
        written::set(
            &mut self.want.service_meta,
            &mut self.before.service_meta,
            e.svc_id,
            None,
        );
        self.retiring_svcs.insert(k.clone());
    }

    fn release_backend(&mut self, k: &ServicePortKey, a: BackendAddr) {
        let Some(r) = self.backends.get_mut(&a) else {
            return;
        };
        r.owners.remove(k);
        if r.owners.is_empty() {
            self.retiring_backends.insert(a);
        }
        self.refresh_backend(a);
    }

    /// Puts a backend's entry in the target from its first owner's input,
    /// or takes it out when no port lists it.
    fn refresh_backend(&mut self, addr: BackendAddr) {
        let Some(r) = self.backends.get(&addr) else {
            return;
        };
        let b = r.owners.0.first().and_then(|(port, _)| {
            let input = &self.ports.get(port.as_ref())?.input;
            let i = input
                .backends
                .binary_search_by(|b| b.addr.cmp(&addr))
                .ok()?;
            Some(&input.backends[i])
        });
        put_backend(
            &mut self.name_ids,
            &mut self.want,
            &mut self.before,
            r.id,
            b,
        );
    }

    fn release_frontend(&mut self, k: &ServicePortKey, fk: Frontend4Key) {
        if let Some(owners) = self.frontend_owners.get_mut(&fk) {
            owners.remove(k);
            if owners.is_empty() {
                self.frontend_owners.remove(&fk);
            }
        }
        self.refresh_frontend(fk);
    }

    fn refresh_frontend(&mut self, fk: Frontend4Key) {
        let old = self.want.frontends.get(&fk);
        let had = old.is_some();
        let was_cluster_ip = old.is_some_and(|f| f.kind == KIND_CLUSTER_IP);
        let v = self
            .frontend_owners
            .get(&fk)
            .and_then(Owners::first)
            .copied();
        written::set(&mut self.want.frontends, &mut self.before.frontends, fk, v);
        match v {
            Some(_) => {
                if !had {
                    *self.addr_frontends.entry(fk.addr).or_default() += 1;
                    self.port_map.frontend_added(fk.port);
                }
            }
            None => {
                if had {
                    self.port_map.frontend_removed(fk.port);
                }
                if had && let Some(n) = self.addr_frontends.get_mut(&fk.addr) {
                    *n -= 1;
                    if *n == 0 {
                        self.addr_frontends.remove(&fk.addr);
                    }
                }
            }
        }
        let is_cluster_ip = v.is_some_and(|f| f.kind == KIND_CLUSTER_IP);
        if is_cluster_ip && !was_cluster_ip {
            *self.addr_cluster_ips.entry(fk.addr).or_default() += 1;
        } else if was_cluster_ip
            && !is_cluster_ip
            && let Some(n) = self.addr_cluster_ips.get_mut(&fk.addr)
        {
            *n -= 1;
            if *n == 0 {
                self.addr_cluster_ips.remove(&fk.addr);
            }
        }
        self.refresh_addr(fk.addr);
    }

    fn refresh_addr(&mut self, addr: u32) {
        let mut flags = 0;
        if self.addr_frontends.contains_key(&addr) {
            flags |= ADDR_FRONTEND;
        }
        if self.snat.contains(&addr) {
            flags |= ADDR_SNAT;
        }
        if self.addr_cluster_ips.contains_key(&addr) {
            flags |= ADDR_CLUSTER_IP;
        }
        let v = (flags != 0).then_some(flags);
        written::set(&mut self.want.addrs, &mut self.before.addrs, addr, v);
    }

    /// Takes a set's slots out of the target; the set id is freed after
    /// the flush that deletes them.
    fn drop_set(&mut self, set: u32) {
        self.set_owner.remove(&set);
        self.write_slots(set, &[]);
        self.retiring_sets.insert(set);
    }

    /// Makes the target's slots of `set` exactly `slots`.
    fn write_slots(&mut self, set: u32, slots: &[u32]) {
        let chunks = slots.len().div_ceil(SLOTS_PER_CHUNK as usize);
        let old: Vec<SlotKey> = set_chunks_in(&self.want.slots, set)
            .map(|(k, _)| *k)
            .filter(|k| k.chunk as usize >= chunks)
            .collect();
        for k in old {
            written::set(&mut self.want.slots, &mut self.before.slots, k, None);
        }
        for (k, v) in state::set_chunks(set, slots) {
            written::set(&mut self.want.slots, &mut self.before.slots, k, Some(v));
        }
    }

    /// Makes the target's source ranges of service port `svc_id` exactly
    /// `ranges`.
    fn write_port_ranges(&mut self, svc_id: u32, ranges: &BTreeSet<RangeKey>) {
        let lo = RangeKey {
            service_id: svc_id,
            ..Default::default()
        };
        let old: Vec<RangeKey> = self
            .want
            .source_ranges
            .range(lo..)
            .take_while(|(k, _)| k.service_id == svc_id)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if !ranges.contains(&k) {
                let b = &mut self.before.source_ranges;
                written::set(&mut self.want.source_ranges, b, k, None);
            }
        }
        for k in ranges {
            let b = &mut self.before.source_ranges;
            written::set(&mut self.want.source_ranges, b, *k, Some(1));
        }
    }

    /// Makes the target's backend entries of service port `svc_id`
    /// exactly `entries` (backend id -> `SB_*`).
    fn write_port_backends(&mut self, svc_id: u32, entries: &BTreeMap<u32, u32>) {
        let old: Vec<ServiceBackendKey> = port_backends(&self.want.svc_backends, svc_id)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if !entries.contains_key(&k.backend_id) {
                let b = &mut self.before.svc_backends;
                written::set(&mut self.want.svc_backends, b, k, None);
            }
        }
        for (id, flags) in entries {
            let k = ServiceBackendKey {
                service_id: svc_id,
                backend_id: *id,
            };
            let b = &mut self.before.svc_backends;
            written::set(&mut self.want.svc_backends, b, k, Some(*flags));
        }
    }

    /// The sets the maps' frontends of a service read.
    fn live_sets(&self, svc_id: u32) -> BTreeSet<u32> {
        self.index
            .fe_by_svc
            .get(&svc_id)
            .into_iter()
            .flatten()
            .filter_map(|k| {
                written::written(&self.want.frontends, &self.before.frontends, k)
                    .map(|f| f.backend_set)
            })
            .collect()
    }

    /// The chunks of `set` as the maps hold them.
    fn written_slots(&self, set: u32) -> BTreeMap<SlotKey, SlotChunk> {
        written::written_range(&self.want.slots, &self.before.slots, set_range(set))
    }

    /// Whether `slots` hold set `set` as exactly the list `want`.
    fn slots_equal(slots: &BTreeMap<SlotKey, SlotChunk>, set: u32, want: &[u32]) -> bool {
        set_chunks_in(slots, set)
            .map(|(k, v)| (*k, *v))
            .eq(state::set_chunks(set, want))
    }

    /// A backend set id for each list: one that already holds it (in the
    /// target, or in the maps after a restart), else one of the port's
    /// sets no frontend in the maps reads (filled in place), else a new
    /// one. Nothing changes when ids run out.
    fn choose_sets(
        &mut self,
        svc_id: u32,
        prev: &[u32],
        lists: &[(Vec<u32>, bool)],
    ) -> Result<Vec<u32>, ReconcileError> {
        let mut chosen: Vec<Option<u32>> = vec![None; lists.len()];
        let free = |chosen: &[Option<u32>], s: u32| !chosen.contains(&Some(s));
        for (i, (l, _)) in lists.iter().enumerate() {
            chosen[i] = prev
                .iter()
                .copied()
                .find(|s| free(&chosen, *s) && Self::slots_equal(&self.want.slots, *s, l));
        }
        let live = self.live_sets(svc_id);
        for (i, (l, _)) in lists.iter().enumerate() {
            if chosen[i].is_none() {
                chosen[i] = live.iter().copied().find(|s| {
                    free(&chosen, *s) && {
                        let written = self.written_slots(*s);
                        Self::slots_equal(&written, *s, l)
                    }
                });
            }
        }
        for i in 0..lists.len() {
            if chosen[i].is_none() {
                chosen[i] = prev
                    .iter()
                    .copied()
                    .find(|s| free(&chosen, *s) && !self.index.set_refs.contains_key(s));
            }
        }
        let mut fresh = Vec::new();
        for c in chosen.iter_mut().filter(|c| c.is_none()) {
            let Some(s) = self.set_pool.alloc() else {
                for s in fresh {
                    self.set_pool.free(s);
                }
                return Err(ReconcileError::OutOfIds("backend set"));
            };
            fresh.push(s);
            *c = Some(s);
        }
        Ok(chosen.into_iter().flatten().collect())
    }

    /// Puts one service port into the target, replacing what it had. Ids
    /// are allocated before anything changes, so running out of them leaves
    /// the target as it was.
    fn set_port(
        &mut self,
        key: ServicePortKey,
        sp: ServicePortState,
    ) -> Result<(), ReconcileError> {
        // The shared key: the one the id map holds (every other use of
        // the key shares it), else a new one.
        let (akey, svc_id, new_svc) = match self.svc_ids.get_key_value(&key) {
            Some((k, id)) => (k.clone(), *id, false),
            None => {
                let id = self
                    .svc_pool
                    .alloc()
                    .ok_or(ReconcileError::OutOfIds("service"))?;
                let k = Arc::new(key);
                self.svc_ids.insert(k.clone(), id);
                (k, id, true)
            }
        };
        // The backend ids this call hands out: kept only if the port gets
        // in. Nothing was written with them, so a refusal gives them back
        // at once (the next port may fit in their place).
        let mut fresh: Vec<BackendAddr> = Vec::new();
        let refused = |this: &mut Self, fresh: Vec<BackendAddr>, e: ReconcileError| {
            if new_svc {
                this.retiring_svcs.insert(akey.clone());
            }
            for a in &fresh {
                if let Some(r) = this.backends.remove(a) {
                    this.backend_pool.free(r.id);
                }
            }
            Err(e)
        };
        let mut ids = Vec::with_capacity(sp.backends.len());
        for (i, b) in sp.backends.iter().enumerate() {
            let id = match self.backends.get(&b.addr) {
                Some(r) => r.id,
                None => {
                    let Some(id) = self.backend_pool.alloc() else {
                        // Backend ids index the backends array: the ids of
                        // backends leaving (freed once a flush deleted
                        // them) count as taken.
                        let more = sp.backends[i..]
                            .iter()
                            .filter(|b| !self.backends.contains_key(&b.addr))
                            .count();
                        let e = ReconcileError::Full {
                            map: BACKENDS4,
                            size: self.capacity.of(BACKENDS4),
                            need: self.backend_pool.in_use() + more,
                        };
                        return refused(self, fresh, e);
                    };
                    // Owned by this port if it gets in (`refused` undoes it).
                    let mut owners = Owners::default();
                    owners.insert(&akey, ());
                    self.backends.insert(b.addr, BackendRec { id, owners });
                    fresh.push(b.addr);
                    id
                }
            };
            ids.push((id, b));
        }
        let key: &ServicePortKey = &akey;
        // The backend lists the port's traffic wants (kube-proxy's Cluster
        // and Local endpoints) and which list each frontend entry reads.
        // The ids by address from `ids` (in `sp.backends` order, sorted by
        // address), not the reconciler-wide index.
        let (lists, plans) = frontend_plans(&sp, |a| {
            match sp.backends.binary_search_by(|b| b.addr.cmp(a)) {
                Ok(i) => ids[i].0,
                Err(_) => self.backends[a].id,
            }
        });
        // Each distinct list gets a backend set that is never changed in
        // place while the maps' frontends read it.
        let prev_entry = self.ports.get(key).map(|p| &**p);
        let prev_sets = prev_entry.map(|p| p.sets.clone()).unwrap_or_default();
        let entries = port_backend_flags(&sp, &ids);
        let fits = self.fits(prev_entry, svc_id, &ids, &lists, entries.len(), plans.len());
        let sets = match fits.and_then(|()| self.choose_sets(svc_id, &prev_sets, &lists)) {
            Ok(sets) => sets,
            Err(e) => return refused(self, fresh, e),
        };

        // From here on nothing fails.
        if !new_svc {
            self.retiring_svcs.remove(key);
        }
        let prev = self.ports.remove(key);
        let meta = service_meta(key, &sp);
        let ranges: BTreeSet<RangeKey> = if plans.iter().any(|p| p.flags & FE_SOURCE_RANGES != 0) {
            sp.source_ranges
                .iter()
                .map(|(a, len)| RangeKey {
                    service_id: svc_id,
                    addr: ip4(a.octets()),
                    prefix_len: *len,
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        // Distinct backends of each list (a Maglev table repeats them):
        // counted once per list, not per frontend reading it.
        let distinct: Vec<usize> = lists
            .iter()
            .map(|(slots, _)| {
                if sp.maglev_table > 0 {
                    slots.iter().collect::<BTreeSet<_>>().len()
                } else {
                    slots.len()
                }
            })
            .collect();
        let fe_values: Vec<(Frontend4Key, Frontend)> = plans
            .iter()
            .map(|plan| {
                let (slots, fallback) = &lists[plan.list];
                let count = slots.len().min(u16::MAX as usize) as u16;
                let distinct = distinct[plan.list];
                let v = Frontend {
                    service_id: svc_id,
                    backend_set: sets[plan.list],
                    count,
                    terminating: if *fallback { distinct as u16 } else { 0 },
                    flags: plan.flags,
                    kind: plan.kind.number(),
                    _pad: 0,
                    affinity_timeout_s: sp.affinity_timeout_s.unwrap_or(0),
                    backends: distinct as u32,
                };
                (plan.key, v)
            })
            .collect();
        let id_list: Vec<(u32, BackendAddr)> = ids.iter().map(|(id, b)| (*id, b.addr)).collect();
        // Sorted by address, as the translation sorts the backends.
        let backends: Vec<BackendAddr> = sp.backends.iter().map(|b| b.addr).collect();
        // The port is in place before its backends are refreshed: their
        // values are read from the first owner's input.
        self.ports.insert(
            akey.clone(),
            Box::new(PortEntry {
                input: sp,
                svc_id,
                sets: sets.clone(),
                frontends: fe_values.iter().map(|(k, _)| *k).collect(),
            }),
        );
        written::set(
            &mut self.want.service_meta,
            &mut self.before.service_meta,
            svc_id,
            Some(meta),
        );
        // A backend whose first owner is this port is made from the
        // translation at hand (as `refresh_backend` finds it, without
        // looking the port up); one another port owns first, from that
        // port's.
        let input = &self.ports[key].input;
        let mut owned_elsewhere = Vec::new();
        for (j, (id, addr)) in id_list.iter().enumerate() {
            // `id_list` is in the order of the port's backends.
            let b = &input.backends[j];
            debug_assert_eq!(b.addr, *addr);
            // A backend given its id above has this port as its only owner
            // already; another is looked up.
            let owned_here = fresh.binary_search(addr).is_ok() || {
                self.retiring_backends.remove(addr);
                // Made above, with its id, for every backend of the port.
                let owners = &mut self
                    .backends
                    .get_mut(addr)
                    .expect("every backend of the port has an id")
                    .owners;
                owners.insert(&akey, ());
                let first = owners.0.first().map(|(k, _)| k);
                first.is_some_and(|k| Arc::ptr_eq(k, &akey) || **k == *akey)
            };
            if owned_here {
                put_backend(
                    &mut self.name_ids,
                    &mut self.want,
                    &mut self.before,
                    *id,
                    Some(b),
                );
            } else {
                owned_elsewhere.push(*addr);
            }
        }
        for addr in owned_elsewhere {
            self.refresh_backend(addr);
        }
        if let Some(p) = &prev {
            for b in &p.input.backends {
                if backends.binary_search(&b.addr).is_err() {
                    self.release_backend(key, b.addr);
                }
            }
        }

        for (set, list) in sets.iter().zip(&lists) {
            self.retiring_sets.remove(set);
            self.set_owner.insert(*set, akey.clone());
            self.write_slots(*set, &list.0);
        }
        for p in &prev_sets {
            if !sets.contains(p) {
                self.drop_set(*p);
            }
        }
        self.write_port_backends(svc_id, &entries);
        self.write_port_ranges(svc_id, &ranges);

        for (fk, v) in &fe_values {
            // Two Services claiming one address:port: the first (by
            // namespace/name) keeps it, as with kube-proxy's sorted rules.
            self.frontend_owners
                .entry(*fk)
                .or_default()
                .insert(&akey, *v);
            self.refresh_frontend(*fk);
        }
        if let Some(p) = &prev {
            for fk in &p.frontends {
                if !fe_values.iter().any(|(k, _)| k == fk) {
                    self.release_frontend(key, *fk);
                }
            }
        }
        Ok(())
    }
}

/// The backend lists (ids in slot order, terminating fallback) a port's
/// frontends read, and each frontend entry's list and flags, as kube-proxy
/// routes each kind of traffic:
///
/// - ClusterIP: the internal policy's endpoints, on both paths;
/// - NodePort, LoadBalancer and external IPs: the external policy's; under
///   `Local`, traffic from inside the node (socket path) reads a second,
///   `SCOPE_INTERNAL` entry with the Cluster endpoints, as kube-proxy
///   short-circuits pod and host traffic to external addresses.
///
/// A policy with no endpoint here drops new flows, unless the Service has
/// none anywhere: then they are rejected (`FE_REJECT_NO_BACKEND`).
fn frontend_plans(
    sp: &ServicePortState,
    id_of: impl Fn(&BackendAddr) -> u32,
) -> (Vec<(Vec<u32>, bool)>, Vec<FrontendPlan>) {
    let mut lists: Vec<(Vec<u32>, bool)> = Vec::new();
    let mut index = |p: &PolicyEndpoints| {
        let ids = if sp.maglev_table > 0 {
            maglev_list(sp, &p.backends, &id_of)
        } else {
            p.backends.iter().map(&id_of).collect::<Vec<u32>>()
        };
        let l = (ids, p.terminating_fallback);
        match lists.iter().position(|x| *x == l) {
            Some(i) => i,
            None => {
                lists.push(l);
                lists.len() - 1
            }
        }
    };
    let internal_local = sp.internal_policy == TrafficPolicy::Local;
    let external_local = sp.external_policy == TrafficPolicy::Local;
    let mut base = 0;
    if sp.affinity_timeout_s.is_some() {
        base |= FE_AFFINITY_CLIENT_IP;
    }
    if external_local {
        base |= FE_EXTERNAL_LOCAL;
    }
    if internal_local {
        base |= FE_INTERNAL_LOCAL;
    }
    if !sp.sets.has_endpoints {
        base |= FE_REJECT_NO_BACKEND;
    }
    if sp.maglev_table > 0 {
        base |= FE_MAGLEV;
    }
    let mut plans = Vec::with_capacity(sp.frontends.len());
    for fa in &sp.frontends {
        let key = Frontend4Key {
            addr: ip4(fa.addr.octets()),
            port: port(fa.port),
            proto: fa.proto.number(),
            scope: SCOPE_ALL,
        };
        let ranges = if fa.kind == FrontendKind::LoadBalancer && !sp.source_ranges.is_empty() {
            FE_SOURCE_RANGES
        } else {
            0
        };
        // Direct server return is for flows from outside (the device
        // path); a ClusterIP is reached from pods and the node.
        let dsr = if sp.dsr && fa.kind != FrontendKind::ClusterIp {
            FE_DSR
        } else {
            0
        };
        let plan = |key, list, flags: u16| FrontendPlan {
            key,
            kind: fa.kind,
            list,
            flags: flags | ranges | dsr,
        };
        if fa.kind == FrontendKind::ClusterIp {
            if internal_local {
                plans.push(plan(key, index(&sp.sets.local), base | FE_LOCAL_LIST));
            } else {
                plans.push(plan(key, index(&sp.sets.cluster), base));
            }
        } else if external_local {
            let local = index(&sp.sets.local);
            let cluster = index(&sp.sets.cluster);
            if local == cluster {
                plans.push(plan(key, local, base | FE_LOCAL_LIST));
            } else {
                plans.push(plan(key, local, base | FE_TWO_SCOPES | FE_LOCAL_LIST));
                let internal = Frontend4Key {
                    scope: SCOPE_INTERNAL,
                    ..key
                };
                plans.push(plan(internal, cluster, base));
            }
        } else {
            plans.push(plan(key, index(&sp.sets.cluster), base));
        }
    }
    (lists, plans)
}

/// The Maglev table of `sp.maglev_table` slots over `backends` (sorted, as
/// the categorization leaves them), with their weights: backend ids by
/// slot. Empty without a backend.
fn maglev_list(
    sp: &ServicePortState,
    backends: &[BackendAddr],
    id_of: impl Fn(&BackendAddr) -> u32,
) -> Vec<u32> {
    let entries: Vec<maglev::Entry> = backends
        .iter()
        .map(|a| maglev::Entry {
            addr: *a,
            weight: sp
                .backends
                .binary_search_by(|b| b.addr.cmp(a))
                .map_or(super::model::DEFAULT_WEIGHT, |i| sp.backends[i].weight),
        })
        .collect();
    let ids: Vec<u32> = backends.iter().map(id_of).collect();
    maglev::table(&entries, sp.maglev_table)
        .into_iter()
        .map(|i| ids[i as usize])
        .collect()
}

/// Each backend of a port and what the port does with it (`SB_*`).
fn port_backend_flags(sp: &ServicePortState, ids: &[(u32, &Backend)]) -> BTreeMap<u32, u32> {
    let sets = &sp.sets;
    let fallback = |p: &PolicyEndpoints| {
        if p.terminating_fallback {
            SB_FALLBACK
        } else {
            0
        }
    };
    ids.iter()
        .map(|(id, b)| {
            let mut f = 0;
            if b.state != BackendState::Quarantined {
                f |= SB_SERVING;
            }
            if sets.cluster.backends.contains(&b.addr) {
                f |= SB_CLUSTER | fallback(&sets.cluster);
            } else if sets.topology.is_some() && b.state == BackendState::Active {
                f |= SB_TOPOLOGY_FILTERED;
            }
            if sets.local.backends.contains(&b.addr) {
                f |= SB_LOCAL | fallback(&sets.local);
            }
            if b.weight == 0 {
                f |= SB_DRAINED;
            }
            (*id, f)
        })
        .collect()
}

/// The names map's entry at `key` as `NameIds` says.
fn name_entry(want: &mut MapState, before: &mut Before, key: u32, e: names::Entry) {
    let v = match e {
        names::Entry::Same => return,
        names::Entry::Put(v) => Some(v),
        names::Entry::Delete => None,
    };
    written::set(&mut want.names, &mut before.names, key, v);
}

/// Makes the target's entry of backend `id` the one made from `b` (its
/// first owner's translation; None: no owner left), with its node and
/// zone names.
fn put_backend(
    name_ids: &mut names::NameIds,
    want: &mut MapState,
    before: &mut Before,
    id: u32,
    b: Option<&Backend>,
) {
    // The new names are taken before the old are let go: a name the
    // backend keeps is never dropped in between.
    let new = b.map(|b| {
        let mut v = backend_entry(b);
        if let Some(n) = &b.node_name {
            let (key, e) = name_ids.acquire(NAME_NODE, n);
            name_entry(want, before, key, e);
            v.node = key as u16;
        }
        if let Some(z) = &b.zone {
            let (key, e) = name_ids.acquire(NAME_ZONE, z);
            name_entry(want, before, key, e);
            v.zone = key as u8;
        }
        v
    });
    if let Some(old) = want.backends.get(&id).copied() {
        for key in [names::node_key(old.node), names::zone_key(old.zone)]
            .into_iter()
            .flatten()
        {
            let e = name_ids.release(key);
            name_entry(want, before, key, e);
        }
    }
    written::set(&mut want.backends, &mut before.backends, id, new);
}

/// A backend's entry, without its node and zone ids (`put_backend` gives
/// them).
fn backend_entry(b: &Backend) -> Backend4 {
    let mut conditions = 0;
    if b.ready {
        conditions |= COND_READY;
    }
    if b.serving {
        conditions |= COND_SERVING;
    }
    if b.terminating {
        conditions |= COND_TERMINATING;
    }
    let local = if b.local { BACKEND_LOCAL } else { 0 };
    Backend4 {
        addr: ip4(b.addr.addr.octets()),
        port: port(b.addr.port),
        proto: b.addr.proto.number(),
        state: match b.state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Terminating => BACKEND_TERMINATING,
            BackendState::Quarantined => BACKEND_QUARANTINED,
        },
        flags: local | conditions << BACKEND_COND_SHIFT,
        zone: 0,
        node: 0,
    }
}

fn service_meta(key: &ServicePortKey, sp: &ServicePortState) -> ServiceMeta {
    let policy = |p| match p {
        TrafficPolicy::Cluster => POLICY_CLUSTER,
        TrafficPolicy::Local => POLICY_LOCAL,
    };
    ServiceMeta {
        namespace: fixed(&key.namespace),
        name: fixed(&key.name),
        port_name: fixed(&key.port_name),
        svc_type: match sp.svc_type {
            ServiceType::ClusterIp => SVC_TYPE_CLUSTER_IP,
            ServiceType::NodePort => SVC_TYPE_NODE_PORT,
            ServiceType::LoadBalancer => SVC_TYPE_LOAD_BALANCER,
        },
        external_policy: policy(sp.external_policy),
        internal_policy: policy(sp.internal_policy),
        proto: sp.proto.number(),
        port: sp.port,
        node_port: sp.node_port.unwrap_or(0),
        affinity_timeout_s: sp.affinity_timeout_s.unwrap_or(0),
        not_enforced: sp.not_enforced,
    }
}

//! Desired state + ids -> map contents, and the loop step that writes the
//! difference. Ids are read back from what is in the maps: a restarted agent
//! adopts every service, backend and backend-set id, so no flow moves.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_common::{
    ip4,
    maps::{MAX_BACKENDS, MAX_SERVICES},
    port,
    service::*,
};

use super::{
    apply::{MapError, MapWriter},
    ids::IdPool,
    model::{
        Backend, BackendAddr, BackendState, Desired, Proto, ServicePortKey, ServiceType,
        TrafficPolicy,
    },
    plan,
    state::{MapState, cstr, fixed},
};

/// Backend sets: at most two per service port live at once (old and new).
const MAX_SETS: u32 = u32::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("out of {0} ids")]
    OutOfIds(&'static str),
    #[error(transparent)]
    Map(#[from] MapError),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub writes: usize,
    pub elapsed: Duration,
}

pub struct Reconciler<W> {
    pub writer: W,
    /// What is in the maps, as far as this agent wrote or read it.
    state: MapState,
    svc_ids: BTreeMap<ServicePortKey, u32>,
    backend_ids: BTreeMap<BackendAddr, u32>,
    svc_pool: IdPool,
    backend_pool: IdPool,
    set_pool: IdPool,
    /// A new backend set allocated for a service id whose writes did not
    /// all land yet: the next attempt fills the same set instead of starting
    /// another, so progress under failing writes is kept.
    pending_sets: BTreeMap<u32, u32>,
}

impl<W: MapWriter> Reconciler<W> {
    /// Adopts whatever the maps hold.
    pub fn adopt(writer: W) -> Result<Self, MapError> {
        let state = writer.read()?;
        let mut r = Self {
            writer,
            state,
            svc_ids: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            svc_pool: IdPool::new(MAX_SERVICES - 1),
            backend_pool: IdPool::new(MAX_BACKENDS - 1),
            set_pool: IdPool::new(MAX_SETS),
            pending_sets: BTreeMap::new(),
        };
        r.index();
        Ok(r)
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }

    pub fn service_id(&self, k: &ServicePortKey) -> Option<u32> {
        self.svc_ids.get(k).copied()
    }

    /// Rebuilds the id indexes from the map state.
    fn index(&mut self) {
        self.svc_ids = self
            .state
            .service_meta
            .iter()
            .map(|(id, m)| {
                let k = ServicePortKey {
                    namespace: cstr(&m.namespace).to_string(),
                    name: cstr(&m.name).to_string(),
                    port_name: cstr(&m.port_name).to_string(),
                };
                (k, *id)
            })
            .collect();
        self.backend_ids = self
            .state
            .backends
            .iter()
            .filter_map(|(id, b)| {
                let addr = BackendAddr {
                    addr: lb_common::ip4_octets(b.addr).into(),
                    port: lb_common::port_host(b.port),
                    proto: Proto::from_number(b.proto)?,
                };
                Some((addr, *id))
            })
            .collect();
        let mut svc_used: BTreeSet<u32> = self.state.service_meta.keys().copied().collect();
        svc_used.extend(self.state.frontends.values().map(|f| f.service_id));
        self.svc_pool.set_used(svc_used);
        self.backend_pool
            .set_used(self.state.backends.keys().copied());
        let mut sets: BTreeSet<u32> = self.state.slots.keys().map(|k| k.backend_set).collect();
        sets.extend(self.state.frontends.values().map(|f| f.backend_set));
        // A pending set is promoted or dropped once frontends point at it.
        let current: BTreeSet<u32> = self
            .state
            .frontends
            .values()
            .map(|f| f.backend_set)
            .collect();
        self.pending_sets.retain(|_, set| !current.contains(set));
        sets.extend(self.pending_sets.values().copied());
        self.set_pool.set_used(sets);
    }

    /// Writes what differs between the maps and `desired`. On a failed write
    /// the state keeps what did succeed; the next call picks up from there.
    pub fn reconcile(&mut self, desired: &Desired) -> Result<Outcome, ReconcileError> {
        let start = Instant::now();
        let target = self.target(desired);
        let result = match target {
            Ok(target) => self.write(&target),
            Err(e) => Err(e),
        };
        self.index();
        let writes = result?;
        Ok(Outcome {
            writes,
            elapsed: start.elapsed(),
        })
    }

    fn write(&mut self, target: &MapState) -> Result<usize, ReconcileError> {
        let ops = plan::diff(&self.state, target);
        for op in &ops {
            self.writer.apply(op)?;
            self.state.apply(op);
        }
        Ok(ops.len())
    }

    /// The map contents for `desired`, allocating ids for what is new.
    fn target(&mut self, desired: &Desired) -> Result<MapState, ReconcileError> {
        let mut t = MapState::default();
        let wanted: BTreeSet<u32> = desired
            .ports
            .keys()
            .filter_map(|k| self.svc_ids.get(k).copied())
            .collect();
        self.pending_sets.retain(|svc, _| wanted.contains(svc));
        // Every backend set in the maps with its slot list, and the sets
        // each service id's frontends point at (more than one while a flip
        // is half done).
        let mut set_slots: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (k, v) in &self.state.slots {
            set_slots.entry(k.backend_set).or_default().push(*v);
        }
        let mut live: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for f in self.state.frontends.values() {
            live.entry(f.service_id).or_default().insert(f.backend_set);
        }
        let all_live: BTreeSet<u32> = live.values().flatten().copied().collect();
        for (key, sp) in &desired.ports {
            let svc_id = match self.svc_ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = self
                        .svc_pool
                        .alloc()
                        .ok_or(ReconcileError::OutOfIds("service"))?;
                    self.svc_ids.insert(key.clone(), id);
                    id
                }
            };
            t.service_meta.insert(svc_id, service_meta(key, sp));

            let mut active = Vec::new();
            let mut terminating = Vec::new();
            for b in &sp.backends {
                let id = match self.backend_ids.get(&b.addr) {
                    Some(id) => *id,
                    None => {
                        let id = self
                            .backend_pool
                            .alloc()
                            .ok_or(ReconcileError::OutOfIds("backend"))?;
                        self.backend_ids.insert(b.addr, id);
                        id
                    }
                };
                // A backend shared by two Services is one entry; the first
                // Service's view of it wins for state and locality.
                t.backends.entry(id).or_insert_with(|| backend_entry(b));
                t.backend_meta.entry(id).or_insert_with(|| backend_meta(b));
                match b.state {
                    BackendState::Active => active.push(id),
                    BackendState::Terminating => terminating.push(id),
                }
            }
            if sp.frontends.is_empty() {
                continue; // nothing would point at a backend set
            }
            let mut slots = active.clone();
            slots.extend(&terminating);
            // A set that already holds exactly these slots is kept (no
            // write); otherwise a set no frontend reads is filled: the one
            // a failed attempt began, or a new one. A set that frontends
            // read is never changed in place.
            let pending = self.pending_sets.get(&svc_id).copied();
            let matching = live
                .get(&svc_id)
                .into_iter()
                .flatten()
                .copied()
                .chain(pending)
                .find(|set| set_slots.get(set).map_or(&[][..], Vec::as_slice) == slots.as_slice());
            let set = match (matching, pending) {
                (Some(set), _) => set,
                (None, Some(p)) if !all_live.contains(&p) => p,
                _ => {
                    let set = self
                        .set_pool
                        .alloc()
                        .ok_or(ReconcileError::OutOfIds("backend set"))?;
                    self.pending_sets.insert(svc_id, set);
                    set
                }
            };
            for (i, id) in slots.iter().enumerate() {
                t.slots.insert(
                    SlotKey {
                        backend_set: set,
                        slot: i as u32,
                    },
                    *id,
                );
            }
            let mut flags = 0;
            if sp.affinity_timeout_s.is_some() {
                flags |= FE_AFFINITY_CLIENT_IP;
            }
            if sp.external_policy == TrafficPolicy::Local {
                flags |= FE_EXTERNAL_LOCAL;
            }
            if sp.internal_policy == TrafficPolicy::Local {
                flags |= FE_INTERNAL_LOCAL;
            }
            for fa in &sp.frontends {
                let k = Frontend4Key {
                    addr: ip4(fa.addr.octets()),
                    port: port(fa.port),
                    proto: fa.proto.number(),
                    scope: SCOPE_ALL,
                };
                let v = Frontend {
                    service_id: svc_id,
                    backend_set: set,
                    count: active.len().min(u16::MAX as usize) as u16,
                    terminating: terminating.len().min(u16::MAX as usize) as u16,
                    flags,
                    kind: fa.kind.number(),
                    _pad: 0,
                    affinity_timeout_s: sp.affinity_timeout_s.unwrap_or(0),
                    _reserved: 0,
                };
                // Two Services claiming one address:port: the first (by
                // namespace/name) keeps it, as with kube-proxy's sorted rules.
                t.frontends.entry(k).or_insert(v);
                *t.addrs.entry(k.addr).or_default() |= ADDR_FRONTEND;
            }
        }
        for a in &desired.snat_addrs {
            *t.addrs.entry(ip4(a.octets())).or_default() |= ADDR_SNAT;
        }
        Ok(t)
    }
}

fn backend_entry(b: &Backend) -> Backend4 {
    Backend4 {
        addr: ip4(b.addr.addr.octets()),
        port: port(b.addr.port),
        proto: b.addr.proto.number(),
        state: match b.state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Terminating => BACKEND_TERMINATING,
        },
        flags: if b.local { BACKEND_LOCAL } else { 0 },
        zone: 0,
        _pad: 0,
    }
}

fn backend_meta(b: &Backend) -> BackendMeta {
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
    BackendMeta {
        node_name: fixed(b.node_name.as_deref().unwrap_or("")),
        zone: fixed(b.zone.as_deref().unwrap_or("")),
        conditions,
        _pad: [0; 7],
    }
}

fn service_meta(key: &ServicePortKey, sp: &super::model::ServicePortState) -> ServiceMeta {
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
        _reserved: 0,
    }
}

//! Typed access to the pinned maps, for the agent (writes) and `lbctl`
//! (reads).

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError as AyaMapError, PerCpuArray, PerCpuHashMap,
    lpm_trie::{Key as TrieKey, LpmTrie},
};
use lb_common::{
    config::{Config, NodeAddrs4},
    counters::{BackendStats, MAX_VERDICTS, ServiceStats},
    maps as names,
    service::{
        AffinityEntry, AffinityKey, Backend4, Frontend, Frontend4Key, Name, SOURCE_RANGE_ID_BITS,
        ServiceBackendKey, ServiceMeta, SlotChunk, SlotKey, SourceRange4,
    },
    sock::{SockFlow4, SockFlow4Key, SockRevNat4, SockRevNat4Key},
    status::AgentStatus,
};

use crate::agent::{
    apply::{MapError, MapWriter},
    state::{MapState, Op, RangeKey},
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "nothing is pinned at {dir}: is the agent running, and with this --bpffs \
         (or LBCTL_BPFFS)?"
    )]
    NoPins { dir: String },
    #[error(
        "the maps in {dir} have layout version {found}, this lbctl reads version {ours}: \
         use the lbctl of the agent that made them (or restart the agent with this \
         version, which pins its own maps)"
    )]
    Layout {
        dir: String,
        found: String,
        ours: u32,
    },
    #[error(
        "map {name} is not pinned in {dir}: is the agent running with this --bpffs? \
         (a different layout version pins different names)"
    )]
    Missing { name: &'static str, dir: String },
    #[error(
        "permission denied opening the pinned map {name} in {dir}: reading BPF maps \
         needs root (CAP_BPF and CAP_SYS_ADMIN); run lbctl with sudo or in the agent's pod"
    )]
    Privileges { name: &'static str, dir: String },
    #[error("opening pinned map {name} in {dir}: {source} (lbctl needs root or CAP_BPF)")]
    Open {
        name: &'static str,
        dir: String,
        #[source]
        source: AyaMapError,
    },
}

/// Why `name` is not in `dir`: nothing pinned, another layout, or just
/// that map missing.
fn missing(dir: &Path, name: &'static str) -> OpenError {
    let d = dir.display().to_string();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return OpenError::Privileges { name, dir: d };
        }
        Err(_) => return OpenError::NoPins { dir: d },
    };
    // Map names end in _V<layout>; the same stem with another version is
    // a layout mismatch.
    let stem = name.rsplit_once("_V").map_or(name, |(s, _)| s);
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        if let Some((s, v)) = f.rsplit_once("_V")
            && s == stem
            && f != name
        {
            return OpenError::Layout {
                dir: d,
                found: v.to_string(),
                ours: lb_common::LAYOUT_VERSION,
            };
        }
    }
    OpenError::Missing { name, dir: d }
}

fn open(dir: &Path, name: &'static str) -> Result<Map, OpenError> {
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(OpenError::Privileges {
                name,
                dir: dir.display().to_string(),
            });
        }
        Err(_) => return Err(missing(dir, name)),
    }
    let err = |source: AyaMapError| {
        if let AyaMapError::SyscallError(e) = &source
            && e.io_error.kind() == std::io::ErrorKind::PermissionDenied
        {
            return OpenError::Privileges {
                name,
                dir: dir.display().to_string(),
            };
        }
        OpenError::Open {
            name,
            dir: dir.display().to_string(),
            source,
        }
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

macro_rules! typed {
    ($dir:expr, $name:expr, $ty:ty) => {{
        let m = open($dir, $name)?;
        <$ty>::try_from(m).map_err(|source| OpenError::Open {
            name: $name,
            dir: $dir.display().to_string(),
            source,
        })?
    }};
}

/// The flow table pinned in `dir`.
fn flow_table(dir: &Path) -> Result<super::flows::FlowTable<MapData>, OpenError> {
    let name = names::CONNTRACK4;
    let Map::Array(data) = open(dir, name)? else {
        return Err(OpenError::Open {
            name,
            dir: dir.display().to_string(),
            source: AyaMapError::InvalidMapType { map_type: 0 },
        });
    };
    super::flows::FlowTable::open(data).map_err(|e| OpenError::Open {
        name,
        dir: dir.display().to_string(),
        source: AyaMapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_elem",
            io_error: e,
        }),
    })
}

/// The service maps and counters.
pub struct ServiceMaps {
    pub dir: PathBuf,
    pub addrs: HashMap<MapData, u32, u32>,
    pub frontends: HashMap<MapData, Frontend4Key, Frontend>,
    pub slots: HashMap<MapData, SlotKey, SlotChunk>,
    pub svc_backends: HashMap<MapData, ServiceBackendKey, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRange4, u32>,
    /// Indexed by backend id; an id with no backend holds zeros.
    pub backends: Array<MapData, Backend4>,
    pub service_meta: HashMap<MapData, u32, ServiceMeta>,
    pub names: HashMap<MapData, u32, Name>,
    pub service_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    pub verdicts: PerCpuArray<MapData, u64>,
    pub conntrack: super::flows::FlowTable<MapData>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub config: Array<MapData, Config>,
    pub backend_stats: PerCpuHashMap<MapData, u32, BackendStats>,
    pub agent: Array<MapData, AgentStatus>,
    /// A bit per port the device path looks further at.
    pub ports: Array<MapData, u64>,
    /// The node's own addresses, known to the device path without a lookup.
    pub node_addrs: Array<MapData, NodeAddrs4>,
    /// Descriptors for batched writes (aya's maps do not lend theirs).
    batch_fds: super::batch_writer::Fds,
}

impl std::fmt::Debug for ServiceMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMaps")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ServiceMaps {
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            addrs: typed!(dir, names::ADDRS4, HashMap<MapData, u32, u32>),
            frontends: typed!(dir, names::FRONTENDS4, HashMap<MapData, Frontend4Key, Frontend>),
            slots: typed!(dir, names::BACKEND_SLOTS, HashMap<MapData, SlotKey, SlotChunk>),
            svc_backends: typed!(dir, names::SERVICE_BACKENDS, HashMap<MapData, ServiceBackendKey, u32>),
            source_ranges: typed!(dir, names::SOURCE_RANGES4, LpmTrie<MapData, SourceRange4, u32>),
            backends: typed!(dir, names::BACKENDS4, Array<MapData, Backend4>),
            service_meta: typed!(dir, names::SERVICE_META, HashMap<MapData, u32, ServiceMeta>),
            names: typed!(dir, names::NAMES, HashMap<MapData, u32, Name>),
            service_stats: typed!(dir, names::SERVICE_STATS, PerCpuHashMap<MapData, u32, ServiceStats>),
            verdicts: typed!(dir, names::VERDICT_STATS, PerCpuArray<MapData, u64>),
            conntrack: flow_table(dir)?,
            affinity: typed!(dir, names::AFFINITY4, HashMap<MapData, AffinityKey, AffinityEntry>),
            config: typed!(dir, names::CONFIG, Array<MapData, Config>),
            backend_stats: typed!(dir, names::BACKEND_STATS, PerCpuHashMap<MapData, u32, BackendStats>),
            agent: typed!(dir, names::AGENT_STATUS, Array<MapData, AgentStatus>),
            ports: typed!(dir, names::PORTS, Array<MapData, u64>),
            node_addrs: typed!(dir, names::NODE_ADDRS4, Array<MapData, NodeAddrs4>),
            batch_fds: Default::default(),
        })
    }

    /// A Service port's counters summed over CPUs.
    pub fn service_stats(&self, id: u32) -> ServiceStats {
        let mut sum = ServiceStats::default();
        if let Ok(per_cpu) = self.service_stats.get(&id, 0) {
            for s in per_cpu.iter() {
                sum.flows += s.flows;
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.no_backend += s.no_backend;
            }
        }
        sum
    }

    /// Every verdict's count summed over CPUs, indexed by verdict number.
    pub fn verdicts(&self) -> Vec<u64> {
        (0..MAX_VERDICTS)
            .map(|i| {
                self.verdicts
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// A backend's counters summed over CPUs (zero when it has none).
    pub fn backend_stats(&self, id: u32) -> BackendStats {
        let mut sum = BackendStats::default();
        if let Ok(per_cpu) = self.backend_stats.get(&id, 0) {
            for s in per_cpu.iter() {
                sum.flows += s.flows;
                sum.packets += s.packets;
                sum.bytes += s.bytes;
            }
        }
        sum
    }

    /// The agent's status record (all zero before an agent wrote one).
    pub fn agent_status(&self) -> Result<AgentStatus, AyaMapError> {
        self.agent.get(&0, 0)
    }

    pub fn set_agent_status(&mut self, s: &AgentStatus) -> Result<(), AyaMapError> {
        self.agent.set(0, *s, 0)
    }

    /// The datapath settings the agent wrote (all zero before it did).
    pub fn config(&self) -> Result<Config, AyaMapError> {
        self.config.get(&0, 0)
    }

    pub fn set_config(&mut self, c: Config) -> Result<(), AyaMapError> {
        self.config.set(0, c, 0)
    }

    /// The node's own addresses the agent wrote (none before it did).
    pub fn node_addrs(&self) -> Result<NodeAddrs4, AyaMapError> {
        self.node_addrs.get(&0, 0)
    }

    pub fn set_node_addrs(&mut self, n: NodeAddrs4) -> Result<(), AyaMapError> {
        self.node_addrs.set(0, n, 0)
    }
}

/// A delete of an absent key is a success (writes are idempotent); aya
/// reports it as `KeyNotFound` or as the syscall's ENOENT by map type.
fn absent_ok(r: Result<(), AyaMapError>) -> Result<(), AyaMapError> {
    match r {
        Err(AyaMapError::KeyNotFound) => Ok(()),
        Err(AyaMapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        r => r,
    }
}

/// The socket path's maps (for `lbctl explain --cookie`).
pub struct SockMaps {
    /// (cookie, backend) -> frontend: every translated socket.
    pub revnat: HashMap<MapData, SockRevNat4Key, SockRevNat4>,
    /// (cookie, frontend) -> backend: unconnected UDP sockets' choice.
    pub flows: HashMap<MapData, SockFlow4Key, SockFlow4>,
}

impl SockMaps {
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            revnat: typed!(dir, names::SOCK_REVNAT4, HashMap<MapData, SockRevNat4Key, SockRevNat4>),
            flows: typed!(dir, names::SOCK_FLOWS4, HashMap<MapData, SockFlow4Key, SockFlow4>),
        })
    }
}

fn trie_key(k: &RangeKey) -> TrieKey<SourceRange4> {
    TrieKey::new(
        SOURCE_RANGE_ID_BITS + k.prefix_len as u32,
        SourceRange4 {
            service_id: k.service_id,
            addr: k.addr,
        },
    )
}

fn to_io(e: AyaMapError) -> std::io::Error {
    std::io::Error::other(e)
}

/// Deleting an absent key is a success: writes are idempotent.
fn del<K: aya::Pod, V: aya::Pod>(m: &mut HashMap<MapData, K, V>, k: &K) -> Result<(), AyaMapError> {
    absent_ok(m.remove(k))
}

/// A whole hash map in batches of 8,192 entries: one call per batch
/// rather than two per entry (a restart reads every entry once).
fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, MapError> {
    use aya::maps::IterableMap;
    let fd = m.map().fd().as_fd();
    let entries = super::batch::lookup_all::<K, V>(fd, 8192).map_err(|e| MapError::Read {
        map: name,
        source: e,
    })?;
    Ok(entries.into_iter().collect())
}

/// The backends the array holds (ids with a backend), by id.
fn read_backends(
    m: &Array<MapData, Backend4>,
) -> Result<std::collections::BTreeMap<u32, Backend4>, MapError> {
    use aya::maps::IterableMap;
    let fd = m.map().fd().as_fd();
    let entries =
        super::batch::lookup_all::<u32, Backend4>(fd, 8192).map_err(|e| MapError::Read {
            map: names::BACKENDS4,
            source: e,
        })?;
    Ok(entries
        .into_iter()
        .filter(|(_, b)| b.is_present())
        .collect())
}

impl MapWriter for ServiceMaps {
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), (usize, MapError)> {
        use super::batch_writer::{kind, write};
        let mut i = 0;
        while i < ops.len() {
            let Some(k) = kind(&ops[i]) else {
                self.apply(&ops[i]).map_err(|e| (i, e))?;
                i += 1;
                continue;
            };
            let run = ops[i..].iter().take_while(|o| kind(o) == Some(k)).count();
            write(&self.dir, &mut self.batch_fds, k, &ops[i..i + run])
                .map_err(|(done, e)| (i + done, e))?;
            i += run;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), MapError> {
        let r = match *op {
            // Counters are made by the datapath when first used (see
            // lb-ebpf/src/stats.rs), deleted here with their owner.
            Op::PutBackend(k, v, _) => self.backends.set(k, v, 0),
            Op::PutName(k, ref v) => self.names.insert(k, **v, 0),
            Op::PutServiceMeta(k, ref v, _) => self.service_meta.insert(k, **v, 0),
            Op::PutSlot(k, ref v) => self.slots.insert(k, **v, 0),
            Op::PutServiceBackend(k, v) => self.svc_backends.insert(k, v, 0),
            Op::DelServiceBackend(k) => del(&mut self.svc_backends, &k),
            Op::PutSourceRange(k, v) => self.source_ranges.insert(&trie_key(&k), v, 0),
            Op::DelSourceRange(k) => match self.source_ranges.remove(&trie_key(&k)) {
                Err(AyaMapError::KeyNotFound) => Ok(()),
                r => r,
            },
            Op::PutAddr(k, v) => self.addrs.insert(k, v, 0),
            Op::DelAddr(k) => del(&mut self.addrs, &k),
            Op::PutFrontend(k, v) => self.frontends.insert(k, v, 0),
            Op::DelFrontend(k) => del(&mut self.frontends, &k),
            Op::PutPorts(k, v) => self.ports.set(k, v, 0),
            Op::DelSlot(k) => del(&mut self.slots, &k),
            Op::DelServiceMeta(k) => del(&mut self.service_meta, &k)
                .and_then(|_| absent_ok(self.service_stats.remove(&k))),
            Op::DelName(k) => del(&mut self.names, &k),
            Op::DelBackend(k) => self
                .backends
                .set(k, Backend4::default(), 0)
                .and_then(|_| absent_ok(self.backend_stats.remove(&k))),
        };
        r.map_err(|e| MapError::Write {
            op: Box::new(op.clone()),
            source: to_io(e),
        })
    }

    fn read(&self) -> Result<MapState, MapError> {
        Ok(MapState {
            addrs: read_all(&self.addrs, names::ADDRS4)?,
            frontends: read_all(&self.frontends, names::FRONTENDS4)?,
            slots: read_all(&self.slots, names::BACKEND_SLOTS)?,
            svc_backends: read_all(&self.svc_backends, names::SERVICE_BACKENDS)?,
            source_ranges: self
                .source_ranges
                .iter()
                .map(|r| {
                    let (k, v) = r.map_err(|e| MapError::Read {
                        map: names::SOURCE_RANGES4,
                        source: to_io(e),
                    })?;
                    let d = k.data();
                    let k = RangeKey {
                        service_id: d.service_id,
                        addr: d.addr,
                        prefix_len: k.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS) as u8,
                    };
                    Ok((k, v))
                })
                .collect::<Result<_, MapError>>()?,
            backends: read_backends(&self.backends)?,
            service_meta: read_all(&self.service_meta, names::SERVICE_META)?,
            names: read_all(&self.names, names::NAMES)?,
            ports: (0..lb_common::ports::PORT_WORDS)
                .map(|i| {
                    self.ports
                        .get(&i, 0)
                        .map(|w| (i, w))
                        .map_err(|e| MapError::Read {
                            map: names::PORTS,
                            source: to_io(e),
                        })
                })
                .filter(|r| !matches!(r, Ok((_, 0))))
                .collect::<Result<_, MapError>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_why_a_map_is_not_there() {
        let dir = std::env::temp_dir().join(format!("lbctl-maps-{}", std::process::id()));
        let e = missing(&dir, names::FRONTENDS4).to_string();
        assert!(e.contains("nothing is pinned"), "{e}");
        std::fs::create_dir_all(&dir).unwrap();
        let e = missing(&dir, names::FRONTENDS4).to_string();
        assert!(e.contains("is not pinned"), "{e}");
        let other = names::FRONTENDS4.replace("_V1", "_V7");
        std::fs::write(dir.join(other), "").unwrap();
        let e = missing(&dir, names::FRONTENDS4).to_string();
        assert!(
            e.contains("layout version 7, this lbctl reads version 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! What the API server fills in for a Service written without it, done
//! for the directory source (tutorials' manifests carry no `clusterIP`):
//! a ClusterIP from `--service-cidr` and, for NodePort and LoadBalancer
//! Services, a nodePort from `--service-node-port-range` for each port
//! that has none.
//!
//! Allocations are stable. On start the agent adopts what the pinned maps
//! hold (the ClusterIP and nodePorts each Service port was programmed
//! with), so a restart moves no address; a new Service's address starts at
//! a hash of its namespace and name and probes upward past what is taken,
//! so it does not depend on the order files are read in. Addresses and
//! ports written in the manifests always win; an allocation they collide
//! with is given up and made again. As with the API server, the network
//! address, the first address (the `kubernetes` Service's by convention)
//! and the broadcast address are never given out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::{
    ip4_octets, port_host,
    service::{Frontend, Frontend4Key, ServiceMeta},
};

use super::{
    model::{FrontendKind, ObjKey, ObjectError},
    state::{MapState, cstr},
    svc::Svc,
};

/// A bad `--service-cidr` or `--service-node-port-range`.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("--service-cidr {0:?}: expected an IPv4 CIDR such as 10.96.0.0/12, of /8 to /30")]
    Cidr(String),
    #[error("--service-node-port-range {0:?}: expected FIRST-LAST such as 30000-32767")]
    Ports(String),
}

#[derive(Debug, Clone)]
pub struct Allocator {
    /// First and last address of the CIDR, host order.
    net: (u32, u32),
    ports: (u16, u16),
    cluster_ips: BTreeMap<ObjKey, Ipv4Addr>,
    /// By (Service, port name).
    node_ports: BTreeMap<(ObjKey, String), u16>,
    /// Last completion per Service: the object as read, what was filled
    /// in, the object handed on.
    completed: BTreeMap<ObjKey, (Arc<Svc>, Fill, Arc<Svc>)>,
}

/// A ClusterIP (if one was missing) and nodePorts by port name.
type Fill = (Option<Ipv4Addr>, BTreeMap<String, u16>);

/// FNV-1a: the same start for the same name on every node and version.
fn hash(key: &ObjKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.namespace.bytes().chain([b'/']).chain(key.name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Allocator {
    pub fn new(cidr: &str, node_ports: &str) -> Result<Self, RangeError> {
        let bad_cidr = || RangeError::Cidr(cidr.to_string());
        let (addr, bits) = cidr.split_once('/').ok_or_else(bad_cidr)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad_cidr())?;
        let bits: u32 = bits.parse().map_err(|_| bad_cidr())?;
        if !(8..=30).contains(&bits) {
            return Err(bad_cidr());
        }
        let mask = u32::MAX << (32 - bits);
        let first = u32::from(addr) & mask;
        let bad_ports = || RangeError::Ports(node_ports.to_string());
        let (lo, hi) = node_ports.split_once('-').ok_or_else(bad_ports)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad_ports())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad_ports())?;
        if lo == 0 || lo > hi {
            return Err(bad_ports());
        }
        Ok(Self {
            net: (first, first | !mask),
            ports: (lo, hi),
            cluster_ips: BTreeMap::new(),
            node_ports: BTreeMap::new(),
            completed: BTreeMap::new(),
        })
    }

    fn allocatable(&self, ip: u32) -> bool {
        // Not the network address, the first address, the broadcast.
        ip > self.net.0 + 1 && ip < self.net.1
    }

    /// Takes the ClusterIPs and nodePorts the maps were programmed with,
    /// by Service (and port name), from a previous agent's entries.
    pub fn adopt(&mut self, maps: &MapState) {
        self.adopt_frontends(&maps.frontends, |id| maps.service_meta.get(&id).copied());
    }

    /// As `adopt`, from the frontends alone and a Service port's names by
    /// id: an agent starting on its pinned maps seeds the allocator
    /// without a copy of every map.
    pub fn adopt_frontends(
        &mut self,
        frontends: &BTreeMap<Frontend4Key, Frontend>,
        meta_of: impl Fn(u32) -> Option<ServiceMeta>,
    ) {
        for (k, f) in frontends {
            let Some(meta) = meta_of(f.service_id) else {
                continue;
            };
            let svc = ObjKey {
                namespace: cstr(&meta.namespace).into(),
                name: cstr(&meta.name).to_string(),
            };
            if FrontendKind::from_number(f.kind) == Some(FrontendKind::ClusterIp) {
                let ip = u32::from_be_bytes(ip4_octets(k.addr));
                if self.allocatable(ip) {
                    self.cluster_ips.insert(svc.clone(), Ipv4Addr::from(ip));
                }
            }
            if FrontendKind::from_number(f.kind) == Some(FrontendKind::NodePort) {
                let port = port_host(k.port);
                if (self.ports.0..=self.ports.1).contains(&port) {
                    self.node_ports
                        .insert((svc, cstr(&meta.port_name).to_string()), port);
                }
            }
        }
    }

    /// Fills in the ClusterIP and nodePorts a Service was written without.
    /// Services that need nothing are left untouched (same `Arc`). A
    /// Service that cannot get one (the range is full) is reported by name
    /// and left as written.
    pub fn complete(&mut self, services: &mut BTreeMap<ObjKey, Arc<Svc>>) -> Vec<ObjectError> {
        let mut errors = Vec::new();
        // What the manifests name themselves is taken first.
        let mut used_ips: BTreeSet<u32> = BTreeSet::new();
        let mut used_ports: BTreeSet<u16> = BTreeSet::new();
        for svc in services.values() {
            let Some(spec) = &svc.spec else { continue };
            for ip in spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip) {
                if let Ok(a) = ip.parse::<Ipv4Addr>() {
                    used_ips.insert(u32::from(a));
                }
            }
            for p in spec.ports.iter().flatten() {
                if let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok()) {
                    used_ports.insert(np);
                }
            }
        }
        // Keep what Services that still need an allocation have, unless a
        // written address or port now takes it; forget the rest.
        self.cluster_ips.retain(|k, ip| {
            services.get(k).is_some_and(|s| wants_cluster_ip(s))
                && !used_ips.contains(&u32::from(*ip))
        });
        self.node_ports.retain(|(k, name), p| {
            services
                .get(k)
                .is_some_and(|s| missing_node_ports(s).contains(name))
                && !used_ports.contains(p)
        });
        used_ips.extend(self.cluster_ips.values().map(|ip| u32::from(*ip)));
        used_ports.extend(self.node_ports.values());

        for (k, svc) in services.iter_mut() {
            let need_ip = wants_cluster_ip(svc);
            let need_ports = missing_node_ports(svc);
            if !need_ip && need_ports.is_empty() {
                continue;
            }
            let ip = if need_ip {
                match self.cluster_ip(k, &mut used_ips) {
                    Some(ip) => Some(ip),
                    None => {
                        errors.push(full(k, "no free ClusterIP left in --service-cidr"));
                        continue;
                    }
                }
            } else {
                None
            };
            let mut ports = BTreeMap::new();
            for name in need_ports {
                match self.node_port(k, &name, &mut used_ports) {
                    Some(p) => drop(ports.insert(name, p)),
                    None => {
                        errors.push(full(
                            k,
                            "no free nodePort left in --service-node-port-range",
                        ));
                        break;
                    }
                }
            }
            // The same object completed the same way as last time: the
            // same `Arc`, so the store sees no change and translates
            // nothing again.
            let fill = (ip, ports);
            if let Some((input, filled, output)) = self.completed.get(k)
                && Arc::ptr_eq(input, svc)
                && *filled == fill
            {
                *svc = output.clone();
                continue;
            }
            let input = svc.clone();
            let mut out = (**svc).clone();
            if let Some(spec) = out.spec.as_mut() {
                if let Some(ip) = fill.0 {
                    spec.cluster_ip = Some(ip.to_string());
                    spec.cluster_ips = Some(vec![ip.to_string()]);
                }
                for p in spec.ports.iter_mut().flatten() {
                    if p.node_port.is_none()
                        && let Some(np) = fill.1.get(p.name.as_deref().unwrap_or(""))
                    {
                        p.node_port = Some(i32::from(*np));
                    }
                }
            }
            *svc = Arc::new(out);
            self.completed.insert(k.clone(), (input, fill, svc.clone()));
        }
        self.completed.retain(|k, _| services.contains_key(k));
        errors
    }

    fn cluster_ip(&mut self, k: &ObjKey, used: &mut BTreeSet<u32>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.cluster_ips.get(k) {
            return Some(*ip);
        }
        let (first, last) = (self.net.0 + 2, self.net.1 - 1);
        let size = u64::from(last - first + 1);
        let start = (hash(k) % size) as u32;
        let ip = (0..size as u32)
            .map(|i| first + (start + i) % size as u32)
            .find(|ip| !used.contains(ip))?;
        used.insert(ip);
        let ip = Ipv4Addr::from(ip);
        self.cluster_ips.insert(k.clone(), ip);
        Some(ip)
    }

    fn node_port(&mut self, k: &ObjKey, name: &str, used: &mut BTreeSet<u16>) -> Option<u16> {
        let key = (k.clone(), name.to_string());
        if let Some(p) = self.node_ports.get(&key) {
            return Some(*p);
        }
        let size = u64::from(self.ports.1 - self.ports.0) + 1;
        let mut h = hash(k);
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let start = h % size;
        let port = (0..size)
            .map(|i| self.ports.0 + ((start + i) % size) as u16)
            .find(|p| !used.contains(p))?;
        used.insert(port);
        self.node_ports.insert(key, port);
        Some(port)
    }
}

fn full(k: &ObjKey, reason: &str) -> ObjectError {
    ObjectError {
        kind: "Service",
        object: k.to_string(),
        reason: reason.to_string(),
    }
}

fn service_type(svc: &Svc) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

/// A Service that is not headless, not ExternalName, and names no
/// ClusterIP.
fn wants_cluster_ip(svc: &Svc) -> bool {
    let Some(spec) = &svc.spec else { return false };
    let named = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .any(|ip| !ip.is_empty());
    service_type(svc) != "ExternalName" && !named
}

/// Names of the ports of a NodePort or LoadBalancer Service that have no
/// nodePort (LoadBalancer with `allocateLoadBalancerNodePorts: false`
/// gets none, as from the API server).
fn missing_node_ports(svc: &Svc) -> Vec<String> {
    let Some(spec) = &svc.spec else { return vec![] };
    let wants = match service_type(svc) {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    if !wants {
        return vec![];
    }
    spec.ports
        .iter()
        .flatten()
        .filter(|p| p.node_port.is_none())
        .map(|p| p.name.as_deref().unwrap_or_default().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::Objects;

    fn services(yaml: &str) -> BTreeMap<ObjKey, Arc<Svc>> {
        let f = crate::agent::source::dir::parse("t.yaml", yaml);
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        let mut objs = Objects::default();
        let mut nodes = BTreeMap::new();
        crate::agent::source::dir::merge(&mut objs, &mut nodes, &f);
        objs.services
    }

    fn ip_of(s: &BTreeMap<ObjKey, Arc<Svc>>, name: &str) -> String {
        let svc = s.iter().find(|(k, _)| k.name == name).unwrap().1;
        svc.spec
            .as_ref()
            .unwrap()
            .cluster_ip
            .clone()
            .unwrap_or_default()
    }

    fn node_port_of(s: &BTreeMap<ObjKey, Arc<Svc>>, name: &str) -> i32 {
        let svc = s.iter().find(|(k, _)| k.name == name).unwrap().1;
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .node_port
            .unwrap_or(0)
    }

    const TUTORIAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: fixed}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"#;

    #[test]
    fn fills_in_what_the_api_server_would_and_keeps_it() {
        let mut a = Allocator::new("10.96.0.0/16", "30000-32767").unwrap();
        let mut s = services(TUTORIAL);
        assert!(a.complete(&mut s).is_empty());
        let web = ip_of(&s, "web");
        let db = ip_of(&s, "db");
        for ip in [&web, &db] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ip.octets()[..2], [10, 96], "{ip} outside the CIDR");
            assert_ne!(
                ip,
                Ipv4Addr::new(10, 96, 0, 1),
                "the first address is reserved"
            );
        }
        assert_ne!(web, db);
        assert_eq!(ip_of(&s, "fixed"), "10.96.0.50");
        assert_eq!(ip_of(&s, "headless"), "None");
        assert_eq!(ip_of(&s, "ext"), "");
        let np = node_port_of(&s, "web");
        assert!((30000..=32767).contains(&np), "{np}");
        assert_eq!(
            node_port_of(&s, "db"),
            0,
            "a ClusterIP Service gets no nodePort"
        );

        // The folder read again: the same answers.
        let mut again = services(TUTORIAL);
        a.complete(&mut again);
        assert_eq!(
            (ip_of(&again, "web"), node_port_of(&again, "web")),
            (web.clone(), np)
        );
        // The same objects again (the folder unchanged): the same `Arc`s
        // come out, so the store sees no change.
        let input = services(TUTORIAL);
        let (mut x, mut y) = (input.clone(), input.clone());
        a.complete(&mut x);
        a.complete(&mut y);
        assert!(x.iter().all(|(k, v)| Arc::ptr_eq(v, &y[k])));
        // Another agent (or this one after a restart without maps) starts
        // from the same hash: the same answers.
        let mut b = Allocator::new("10.96.0.0/16", "30000-32767").unwrap();
        let mut other = services(TUTORIAL);
        b.complete(&mut other);
        assert_eq!(ip_of(&other, "web"), web);
        assert_eq!(ip_of(&other, "db"), db);
    }

    #[test]
    fn written_addresses_win_and_collisions_probe_on() {
        let mut a = Allocator::new("10.96.0.0/16", "30000-32767").unwrap();
        let mut s = services(TUTORIAL);
        a.complete(&mut s);
        let web = ip_of(&s, "web");
        // A new Service names web's address itself: it keeps it, web moves.
        let taken = format!(
            "{TUTORIAL}---\napiVersion: v1\nkind: Service\nmetadata: {{name: squatter}}\nspec: {{clusterIP: {web}, ports: [{{port: 80}}]}}\n"
        );
        let mut s = services(&taken);
        assert!(a.complete(&mut s).is_empty());
        assert_eq!(ip_of(&s, "squatter"), web);
        assert_ne!(ip_of(&s, "web"), web);
        // A /30 has one address to give (network, first and broadcast
        // reserved): the second Service is reported by name.
        let mut tiny = Allocator::new("10.0.0.0/30", "30000-30000").unwrap();
        let mut s = services(TUTORIAL);
        let errs: Vec<String> = tiny
            .complete(&mut s)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("no free ClusterIP"), "{errs:?}");
    }

    #[test]
    fn adopts_what_the_maps_were_programmed_with() {
        use crate::agent::{apply::InMemory, model, reconcile::Reconciler};
        let mut a = Allocator::new("10.96.0.0/16", "30000-32767").unwrap();
        let mut s = services(TUTORIAL);
        a.complete(&mut s);
        let objs = Objects {
            services: s.clone(),
            ..Default::default()
        };
        let node = model::NodeInfo {
            addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
            ..Default::default()
        };
        let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
        rec.reconcile(&model::translate(&objs, &node)).unwrap();
        // Seeded from the maps, a new allocator holds what was programmed
        // (before any hash is consulted) and completes the folder the same.
        let mut b = Allocator::new("10.96.0.0/16", "30000-32767").unwrap();
        b.adopt(&rec.state());
        for (k, ip) in &a.cluster_ips {
            assert_eq!(b.cluster_ips.get(k), Some(ip), "{k}");
        }
        assert_eq!(b.node_ports, a.node_ports);
        let mut again = services(TUTORIAL);
        assert!(b.complete(&mut again).is_empty());
        for name in ["web", "db"] {
            assert_eq!(ip_of(&again, name), ip_of(&s, name));
        }
        assert_eq!(node_port_of(&again, "web"), node_port_of(&s, "web"));
        assert!(Allocator::new("10.96.0.0", "30000-32767").is_err());
        assert!(Allocator::new("10.96.0.0/16", "32767-30000").is_err());
    }
}

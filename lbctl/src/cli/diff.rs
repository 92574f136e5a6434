//! `lbctl diff`: what the agent's source says against what the maps hold.
//! The source (a manifest folder, or the API read once) is translated by
//! the agent's own code, onto a copy of the pinned maps' contents with their
//! ids adopted, exactly as a starting agent would; every write that agent
//! would make is a difference: an entry missing, stale or extra.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_common::service::{SLOTS_PER_CHUNK, SlotChunk};
use serde::Serialize;

use super::{PinArgs, render};
use crate::{
    agent::{
        allocate::Allocator,
        apply::{InMemory, MapWriter},
        model::{NodeInfo, ObjKey},
        reconcile::Reconciler,
        source::{dir::DirSource, kube as kube_source},
        state::{MapState, Op},
        store::Store,
    },
    datapath::maps::ServiceMaps,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Compare with this manifest folder (else with the Kubernetes API).
    #[arg(long, conflicts_with_all = ["kubeconfig", "watch_endpoints"])]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: as the agent finds it).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Read v1/Endpoints too, as an agent run with --watch-endpoints.
    #[arg(long)]
    pub watch_endpoints: bool,
    /// The node, as given to the agent (default: hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// NodePort addresses, as given to the agent.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<Ipv4Addr>,
    /// SNAT address, as given to the agent.
    #[arg(long)]
    pub snat_ip: Option<Ipv4Addr>,
    /// Service CIDR, as given to the agent (manifests without clusterIP).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: String,
    /// NodePort range, as given to the agent (manifests without nodePort).
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// One difference. Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiffView {
    /// `missing` (the source has it, the maps do not), `stale` (both, with
    /// different values) or `extra` (the maps have it, the source does not).
    pub change: String,
    /// Map, as in `lbctl status`.
    pub map: String,
    /// The entry's key and, for missing and stale entries, the value the
    /// source wants.
    pub entry: String,
    /// What the maps hold now ("" when missing).
    pub have: String,
}

/// One line of `MapState::dump` for one entry.
fn line(st: &MapState) -> String {
    st.dump().trim_end().to_string()
}

fn view(cur: &MapState, op: &Op) -> DiffView {
    use lb_common::maps::*;
    let mut want = MapState::default();
    want.apply(op);
    let mut have = MapState::default();
    let (map, present) = match op {
        Op::PutAddr(k, _) | Op::DelAddr(k) => {
            if let Some(v) = cur.addrs.get(k) {
                have.addrs.insert(*k, *v);
            }
            (ADDRS4, cur.addrs.contains_key(k))
        }
        Op::PutFrontend(k, _) | Op::DelFrontend(k) => {
            if let Some(v) = cur.frontends.get(k) {
                have.frontends.insert(*k, *v);
            }
            (FRONTENDS4, cur.frontends.contains_key(k))
        }
        Op::PutSlot(k, _) | Op::DelSlot(k) => {
            if let Some(v) = cur.slots.get(k) {
                have.slots.insert(*k, *v);
            }
            (BACKEND_SLOTS, cur.slots.contains_key(k))
        }
        Op::PutSourceRange(k, _) | Op::DelSourceRange(k) => {
            if let Some(v) = cur.source_ranges.get(k) {
                have.source_ranges.insert(*k, *v);
            }
            (SOURCE_RANGES4, cur.source_ranges.contains_key(k))
        }
        Op::PutServiceBackend(k, _) | Op::DelServiceBackend(k) => {
            if let Some(v) = cur.svc_backends.get(k) {
                have.svc_backends.insert(*k, *v);
            }
            (SERVICE_BACKENDS, cur.svc_backends.contains_key(k))
        }
        Op::PutBackend(k, ..) | Op::DelBackend(k) => {
            if let Some(v) = cur.backends.get(k) {
                have.backends.insert(*k, *v);
            }
            (BACKENDS4, cur.backends.contains_key(k))
        }
        Op::PutServiceMeta(k, _, _) | Op::DelServiceMeta(k) => {
            if let Some(v) = cur.service_meta.get(k) {
                have.service_meta.insert(*k, *v);
            }
            (SERVICE_META, cur.service_meta.contains_key(k))
        }
        Op::PutName(k, _) | Op::DelName(k) => {
            if let Some(v) = cur.names.get(k) {
                have.names.insert(*k, *v);
            }
            (NAMES, cur.names.contains_key(k))
        }
        Op::PutPorts(k, _) => {
            if let Some(v) = cur.ports.get(k) {
                have.ports.insert(*k, *v);
            }
            (PORTS, cur.ports.contains_key(k))
        }
    };
    let deleting = matches!(
        op,
        Op::DelAddr(_)
            | Op::DelFrontend(_)
            | Op::DelSlot(_)
            | Op::DelServiceBackend(_)
            | Op::DelSourceRange(_)
            | Op::DelBackend(_)
            | Op::DelServiceMeta(_)
            | Op::DelName(_)
            | Op::PutPorts(_, 0)
    );
    let change = match (deleting, present) {
        (true, _) => "extra",
        (false, true) => "stale",
        (false, false) => "missing",
    };
    DiffView {
        change: change.into(),
        map: map.into(),
        entry: if deleting { line(&have) } else { line(&want) },
        have: if present { line(&have) } else { String::new() },
    }
}

/// A backend set's chunk written or deleted, as one difference per slot
/// that changes (a set reads as its list, as in `MapState::dump`).
fn slot_views(cur: &MapState, op: &Op) -> Vec<DiffView> {
    let (key, want) = match op {
        Op::PutSlot(k, v) => (*k, **v),
        Op::DelSlot(k) => (*k, SlotChunk::default()),
        _ => return Vec::new(),
    };
    let have = cur.slots.get(&key).copied().unwrap_or_default();
    let first = key.chunk * SLOTS_PER_CHUNK;
    let line = |slot: u32, id: u32| format!("slot {}/{slot} -> backend={id}", key.backend_set);
    (first..)
        .zip(want.backends.iter().zip(have.backends))
        .filter(|(_, (w, h))| **w != *h)
        .map(|(slot, (w, h))| {
            let change = match (*w, h) {
                (0, _) => "extra",
                (_, 0) => "missing",
                _ => "stale",
            };
            DiffView {
                change: change.into(),
                map: lb_common::maps::BACKEND_SLOTS.into(),
                entry: line(slot, if *w == 0 { h } else { *w }),
                have: if h == 0 { String::new() } else { line(slot, h) },
            }
        })
        .collect()
}

/// The differences between the maps (`cur`) and what `store` translates to.
pub fn compute(cur: MapState, store: &mut Store, node: &NodeInfo) -> Result<Vec<DiffView>> {
    let mut rec = Reconciler::adopt(InMemory {
        state: cur.clone(),
        writes: 0,
    })?;
    for c in store.take_changes(node) {
        let ports = c.ports.unwrap_or_default();
        rec.set_service(&c.service, ports)?;
    }
    rec.set_snat_addrs(&node.snat.into_iter().collect::<Vec<_>>());
    Ok(rec
        .pending_ops()
        .iter()
        .flat_map(|op| match op {
            Op::PutSlot(..) | Op::DelSlot(_) => slot_views(&cur, op),
            _ => vec![view(&cur, op)],
        })
        .collect())
}

pub fn table(v: &[DiffView]) -> String {
    render::table(
        &["CHANGE", "MAP", "ENTRY", "MAPS HOLD"],
        v.iter()
            .map(|d| {
                vec![
                    d.change.clone(),
                    d.map.clone(),
                    d.entry.clone(),
                    d.have.clone(),
                ]
            })
            .collect(),
    )
}

async fn from_api(args: &Args, store: &mut Store, node_name: &str) -> Result<Option<Node>> {
    use kube::{Api, api::ListParams};
    let (client, _) = kube_source::client(args.kubeconfig.as_deref()).await?;
    let lp = ListParams::default();
    let svcs = Api::<Service>::all(client.clone())
        .list(&lp)
        .await
        .context("listing Services")?;
    store.replace_services(
        svcs.items
            .into_iter()
            .map(|o| {
                (
                    ObjKey::of(&o.metadata),
                    Arc::new(crate::agent::svc::Svc::from(&o)),
                )
            })
            .collect(),
    );
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&lp)
        .await
        .context("listing EndpointSlices")?;
    store.replace_slices(
        slices
            .items
            .into_iter()
            .map(|o| {
                (
                    ObjKey::of(&o.metadata),
                    Arc::new(crate::agent::slice::Slice::from(&o)),
                )
            })
            .collect(),
    );
    if args.watch_endpoints {
        let eps = Api::<Endpoints>::all(client.clone())
            .list(&lp)
            .await
            .context("listing Endpoints")?;
        store.replace_endpoints(
            eps.items
                .into_iter()
                .map(|o| (ObjKey::of(&o.metadata), Arc::new(o)))
                .collect(),
        );
    }
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default().fields(&format!("metadata.name={node_name}")))
        .await
        .context("reading this Node")?;
    Ok(nodes.items.into_iter().next())
}

/// Prints the differences; exits 1 when there are any (as `diff` does).
pub async fn execute(args: Args) -> Result<()> {
    let maps = ServiceMaps::open(&args.pins.bpffs)?;
    let cur = maps.read().context("reading the pinned maps")?;
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => super::agent::hostname()?,
    };
    let mut store = Store::default();
    let node = match &args.manifests {
        Some(dir) => {
            let mut snap = DirSource::new(dir)
                .poll()
                .with_context(|| format!("reading {}", dir.display()))?
                .unwrap_or_default();
            for e in &snap.errors {
                eprintln!("skipped: {e}");
            }
            // Completed as the agent completes them: what the maps were
            // programmed with first.
            let mut alloc = Allocator::new(&args.service_cidr, &args.service_node_port_range)?;
            alloc.adopt(&cur);
            for e in alloc.complete(&mut snap.objects.services) {
                eprintln!("not completed: {e}");
            }
            store.replace_services(snap.objects.services);
            store.replace_slices(snap.objects.slices);
            store.replace_endpoints(snap.objects.endpoints);
            snap.nodes.get(&node_name).cloned()
        }
        None => from_api(&args, &mut store, &node_name).await?,
    };
    let info =
        NodeInfo::from_flags_and_node(&node_name, &args.node_ips, args.snat_ip, node.as_ref());
    let diffs = compute(cur, &mut store, &info)?;
    match render::structured(args.output, &diffs)? {
        Some(s) => print!("{s}"),
        None if diffs.is_empty() => println!("no difference: the maps hold what the source says"),
        None => print!("{}", table(&diffs)),
    }
    if !diffs.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::source::dir;

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, externalIPs: [203.0.113.9], ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.11]}]
"#;

    fn store() -> Store {
        let f = dir::parse("web.yaml", WEB);
        let mut o = crate::agent::model::Objects::default();
        dir::merge(&mut o, &mut Default::default(), &f);
        let mut s = Store::default();
        s.replace_services(o.services);
        s.replace_slices(o.slices);
        s
    }

    #[test]
    fn names_missing_stale_and_extra_entries() {
        let node = NodeInfo::default();
        let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
        let mut st = store();
        for c in st.take_changes(&node) {
            rec.set_service(&c.service, c.ports.unwrap()).unwrap();
        }
        rec.flush().unwrap();
        let synced = rec.state();
        assert!(
            compute(synced.clone(), &mut store(), &node)
                .unwrap()
                .is_empty()
        );

        let mut broken = synced.clone();
        // The ClusterIP frontend (the externalIP one stays, so the backend
        // set is still known as this Service's).
        let fk = *broken
            .frontends
            .keys()
            .find(|k| k.addr == lb_common::ip4([10, 96, 0, 10]))
            .unwrap();
        broken.frontends.remove(&fk);
        let (id, mut b) = broken
            .backends
            .iter()
            .map(|(k, v)| (*k, *v))
            .next()
            .unwrap();
        b.flags = lb_common::service::BACKEND_LOCAL;
        broken.backends.insert(id, b);
        broken.addrs.insert(lb_common::ip4([10, 1, 2, 3]), 1);
        let d = compute(broken, &mut store(), &node).unwrap();
        let got: Vec<(&str, &str)> = d
            .iter()
            .map(|d| (d.change.as_str(), d.map.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("stale", lb_common::maps::BACKENDS4),
                ("missing", lb_common::maps::FRONTENDS4),
                ("extra", lb_common::maps::ADDRS4),
            ],
            "{d:#?}"
        );
        assert!(d[1].entry.contains("10.96.0.10:80"), "{}", d[1].entry);
        assert!(d[0].have.contains("flags=0x1"), "{}", d[0].have);
        let t = table(&d);
        assert!(t.contains("CHANGE") && t.contains("missing"), "{t}");
    }

    #[test]
    fn a_backend_set_differs_slot_by_slot() {
        use lb_common::service::SlotKey;
        let key = SlotKey {
            backend_set: 4,
            chunk: 1,
        };
        let chunk = |ids: &[u32]| {
            let mut c = SlotChunk::default();
            c.backends[..ids.len()].copy_from_slice(ids);
            c
        };
        let mut cur = MapState::default();
        cur.slots.insert(key, chunk(&[1, 2]));
        let rows = |op: &Op| -> Vec<(String, String, String)> {
            slot_views(&cur, op)
                .into_iter()
                .map(|d| (d.change, d.entry, d.have))
                .collect()
        };
        let put = Op::PutSlot(key, Box::new(chunk(&[1, 3, 4])));
        assert_eq!(
            rows(&put),
            [
                (
                    "stale".into(),
                    "slot 4/17 -> backend=3".into(),
                    "slot 4/17 -> backend=2".into()
                ),
                ("missing".into(), "slot 4/18 -> backend=4".into(), "".into()),
            ]
        );
        let del = Op::DelSlot(key);
        assert_eq!(
            rows(&del),
            [
                (
                    "extra".into(),
                    "slot 4/16 -> backend=1".into(),
                    "slot 4/16 -> backend=1".into()
                ),
                (
                    "extra".into(),
                    "slot 4/17 -> backend=2".into(),
                    "slot 4/17 -> backend=2".into()
                ),
            ]
        );
    }
}

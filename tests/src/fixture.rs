//! Map state for datapath tests, set through the agent's own translation:
//! manifests -> model -> reconciler -> pinned maps.

use std::path::Path;

use lbctl::{
    agent::{
        model::{self, NodeInfo, Objects},
        reconcile::Reconciler,
        source::dir,
    },
    datapath::{load, maps::ServiceMaps, pins},
};

use crate::guard::Bpffs;

/// The embedded object loaded with its maps pinned in a private bpffs
/// (unmounted when the returned guard drops).
pub fn datapath() -> (Bpffs, aya::Ebpf) {
    let fs = Bpffs::new();
    pins::prepare(&fs.pins()).expect("pin folder");
    let ebpf = load::load(&fs.pins()).expect("load the embedded object");
    (fs, ebpf)
}

/// `--lb-map-max` for a cluster of `backends` backends (and fewer
/// frontends): the default, or the power of two that holds them.
pub fn lb_map_max_for(backends: usize) -> u32 {
    (backends as u32)
        .next_power_of_two()
        .max(lb_common::maps::DEFAULT_LB_MAP_MAX)
}

/// As [`datapath`], with the Service maps sized as `--lb-map-max` would
/// size them for `backends` backends.
pub fn datapath_for(backends: usize) -> (Bpffs, aya::Ebpf) {
    datapath_sized(&map_sizes_for(backends))
}

/// As [`datapath`], with these map sizes (by name).
pub fn datapath_sized(sizes: &std::collections::BTreeMap<String, u32>) -> (Bpffs, aya::Ebpf) {
    let fs = Bpffs::new();
    pins::prepare(&fs.pins()).expect("pin folder");
    let (ebpf, _) = load::load_with(&fs.pins(), false, sizes).expect("load the embedded object");
    (fs, ebpf)
}

/// The map sizes [`datapath_for`] gives: another load of the object on
/// the same pins must be given them too, or it migrates the pinned maps
/// to the object's own sizes (dropping what does not fit).
pub fn map_sizes_for(backends: usize) -> std::collections::BTreeMap<String, u32> {
    lb_common::maps::lb_map_entries(
        lb_map_max_for(backends),
        lb_common::maps::DEFAULT_MAGLEV_CHUNKS,
    )
    .into_iter()
    .map(|(m, n)| (m.to_string(), n))
    .collect()
}

pub fn objects(yaml: &str) -> Objects {
    let f = dir::parse("fixture.yaml", yaml);
    assert!(f.errors.is_empty(), "fixture manifests: {:?}", f.errors);
    let mut objs = Objects::default();
    dir::merge(&mut objs, &mut Default::default(), &f);
    objs
}

/// Programs the maps pinned in `pins` with what `yaml` says, as the agent
/// on `node` would.
pub fn program(pins: &Path, yaml: &str, node: &NodeInfo) -> Reconciler<ServiceMaps> {
    let desired = model::translate(&objects(yaml), node);
    assert!(
        desired.errors.is_empty(),
        "fixture objects: {:?}",
        desired.errors
    );
    let mut maps = ServiceMaps::open(pins).expect("open pinned maps");
    // The node's own addresses, as the agent writes them.
    maps.set_node_addrs(node.own_addrs4().0)
        .expect("write the node's addresses");
    let mut rec = Reconciler::adopt(maps).expect("adopt maps");
    rec.reconcile(&desired).expect("reconcile");
    rec
}

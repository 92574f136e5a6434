//! Map state for datapath tests, set through the agent's own translation:
//! manifests -> model -> reconciler -> pinned maps.

use std::path::Path;

use lbctl::{
    agent::{
        model::{self, NodeInfo, Objects},
        reconcile::Reconciler,
        source::dir,
    },
    datapath::maps::ServiceMaps,
};

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
    let maps = ServiceMaps::open(pins).expect("open pinned maps");
    let mut rec = Reconciler::adopt(maps).expect("adopt maps");
    rec.reconcile(&desired).expect("reconcile");
    rec
}

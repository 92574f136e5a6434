//! Test support: guards that clean up after themselves (bpffs mounts,
//! network namespaces, cgroups, processes), and a packet builder whose
//! checksums are computed from scratch, independently of the datapath.

pub mod apiserver;
pub mod bench;
pub mod controlplane;
pub mod e2e;
pub mod fixture;
pub mod guard;
pub mod images;
pub mod kubelet;
pub mod kubeproxy;
pub mod nodes;
pub mod packet;
pub mod postgres;
pub mod realcluster;
pub mod topo;

/// Tests need root (bpf, netns, mounts). Fail with a clear message rather
/// than a confusing EPERM deep inside.
pub fn require_root() {
    // SAFETY: trivial libc call.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root (bpf, netns, mounts): run `cargo xtask test`"
    );
}

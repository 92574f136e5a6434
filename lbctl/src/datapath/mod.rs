//! The kernel side as seen from user space: the embedded object, pins,
//! attachment, and typed access to the pinned maps.

pub mod attach;
pub mod batch;
pub mod batch_writer;
pub mod flows;
pub mod frame;
pub mod link;
pub mod load;
pub mod maps;
pub mod migrate;
pub mod pins;
pub mod probe;
pub mod slots_v1;
pub mod sockdiag;
pub mod xdp_mode;

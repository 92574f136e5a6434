//! `lbctl agent`: sources -> model (pure) -> reconcile (diff) -> maps.

pub mod allocate;
pub mod apply;
pub mod categorize;
pub mod hcnp;
pub mod health;
pub mod heap;
pub mod ids;
pub mod intern;
pub mod logs;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod names;
pub mod nf_conntrack;
pub mod nodeport_addrs;
pub mod plan;
pub mod port_map;
pub mod reconcile;
pub mod run;
pub mod service_cidrs;
pub mod slice;
pub mod snat_ports;
pub mod source;
pub mod stale_sockets;
pub mod state;
pub mod status;
pub mod store;
pub mod svc;
pub mod unenforced;
pub mod written;

#[cfg(test)]
mod tests;

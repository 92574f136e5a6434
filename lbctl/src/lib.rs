//! lbctl: the agent that keeps the eBPF datapath in sync with Kubernetes
//! Services, and the operator's view of that datapath.

pub mod agent;
pub mod cli;
pub mod datapath;

//! Where the agent's objects come from: a manifest directory or the API.

pub mod dir;
pub mod kube;

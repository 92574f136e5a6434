//! The agent's own state, pinned beside the maps (`LB_AGENT_V1[0]`) so that
//! `lbctl status` can tell an operator whether the maps are being kept in
//! sync, and by whom, without the API server. The kernel never reads it.

use crate::user_pod;

/// `AgentStatus::flags`.
/// The first full sync of the source is in the maps.
pub const AGENT_READY: u32 = 1 << 0;
/// Changes are waiting for the maps: a write pass is under way (set before
/// its first write, cleared with the record of the pass after its last), a
/// write failed and is retried, or the source has not listed every kind yet.
pub const AGENT_PENDING: u32 = 1 << 1;
/// The source is the Kubernetes API (else a manifest folder).
pub const AGENT_SOURCE_API: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// Process id of the agent, in its own pid namespace.
    pub pid: u32,
    /// `AGENT_*`.
    pub flags: u32,
    /// Unix seconds: agent start, last successful write pass, last time the
    /// maps were checked against the source (a pass with nothing to write
    /// counts), last error.
    pub started_unix_s: u64,
    pub last_sync_unix_s: u64,
    pub last_check_unix_s: u64,
    pub last_error_unix_s: u64,
    /// Write passes that completed, map entries written over the agent's
    /// life, errors (objects skipped, writes failed, watch failures).
    pub syncs: u64,
    pub writes: u64,
    pub errors: u64,
    /// Service ports programmed after the last pass.
    pub service_ports: u32,
    pub _pad: u32,
    /// NUL-padded UTF-8: lbctl version, node name, source (folder path or
    /// API server URL), cgroup of the socket programs, last error message.
    pub version: [u8; 16],
    pub node_name: [u8; 64],
    pub source: [u8; 128],
    pub cgroup: [u8; 128],
    pub last_error: [u8; 192],
}
const _: () = assert!(core::mem::size_of::<AgentStatus>() == 600);

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            pid: 0,
            flags: 0,
            started_unix_s: 0,
            last_sync_unix_s: 0,
            last_check_unix_s: 0,
            last_error_unix_s: 0,
            syncs: 0,
            writes: 0,
            errors: 0,
            service_ports: 0,
            _pad: 0,
            version: [0; 16],
            node_name: [0; 64],
            source: [0; 128],
            cgroup: [0; 128],
            last_error: [0; 192],
        }
    }
}

user_pod!(AgentStatus);

//! The agent's status record, pinned as `LB_AGENT_V1` so `lbctl status`
//! answers "is anyone keeping these maps in sync, and since when?" from the
//! node alone, with the API server down.

use std::time::{SystemTime, UNIX_EPOCH};

use lb_common::status::{AGENT_PENDING, AGENT_READY, AGENT_SOURCE_API, AgentStatus};

use super::state::fixed;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The record and whether it changed since it was last published.
#[derive(Debug)]
pub struct StatusRecord {
    rec: AgentStatus,
    changed: bool,
}

impl StatusRecord {
    pub fn new(api: bool, source: &str, node_name: &str, cgroup: &str) -> Self {
        let now = now_s();
        Self {
            rec: AgentStatus {
                pid: std::process::id(),
                flags: if api { AGENT_SOURCE_API } else { 0 } | AGENT_PENDING,
                started_unix_s: now,
                version: fixed(env!("CARGO_PKG_VERSION")),
                node_name: fixed(node_name),
                source: fixed(source),
                cgroup: fixed(cgroup),
                ..Default::default()
            },
            changed: true,
        }
    }

    fn set_flag(&mut self, flag: u32, on: bool) {
        let f = if on {
            self.rec.flags | flag
        } else {
            self.rec.flags & !flag
        };
        if f != self.rec.flags {
            self.rec.flags = f;
            self.changed = true;
        }
    }

    /// Something was skipped or failed; `what` is kept for `lbctl status`.
    pub fn error(&mut self, what: &str) {
        self.rec.errors += 1;
        self.rec.last_error_unix_s = now_s();
        self.rec.last_error = fixed(what);
        self.changed = true;
    }

    /// A write pass completed.
    pub fn synced(&mut self, writes: usize, service_ports: usize) {
        let now = now_s();
        self.rec.syncs += 1;
        self.rec.writes += writes as u64;
        self.rec.service_ports = service_ports as u32;
        self.rec.last_sync_unix_s = now;
        self.rec.last_check_unix_s = now;
        self.set_flag(AGENT_READY, true);
        self.set_flag(AGENT_PENDING, false);
        self.changed = true;
    }

    /// The maps hold the target and nothing waits: refreshed at most once a
    /// second, so a quiet agent still shows it is alive.
    pub fn in_sync(&mut self) {
        let now = now_s();
        self.set_flag(AGENT_PENDING, false);
        if now > self.rec.last_check_unix_s {
            self.rec.last_check_unix_s = now;
            self.changed = true;
        }
    }

    /// Changes wait for the maps (or the source has not listed yet).
    pub fn pending(&mut self) {
        self.set_flag(AGENT_PENDING, true);
    }

    /// The record to write, once per change.
    pub fn take_changed(&mut self) -> Option<&AgentStatus> {
        std::mem::take(&mut self.changed).then_some(&self.rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::cstr;

    #[test]
    fn records_syncs_errors_and_publishes_once_per_change() {
        let mut s = StatusRecord::new(false, "/etc/lb", "node-a", "/sys/fs/cgroup");
        let r = *s.take_changed().expect("first publish");
        assert_eq!(r.pid, std::process::id());
        assert_eq!(r.flags, AGENT_PENDING);
        assert_eq!(cstr(&r.source), "/etc/lb");
        assert!(s.take_changed().is_none(), "nothing new");
        s.synced(24, 3);
        s.error("skipped: e2e/bad: unknown protocol FOO");
        let r = *s.take_changed().unwrap();
        assert_eq!(
            (r.syncs, r.writes, r.service_ports, r.errors),
            (1, 24, 3, 1)
        );
        assert_eq!(r.flags, AGENT_READY);
        assert_eq!(
            cstr(&r.last_error),
            "skipped: e2e/bad: unknown protocol FOO"
        );
        s.in_sync();
        assert!(s.take_changed().is_none(), "same second, same state");
        s.pending();
        assert_eq!(s.take_changed().unwrap().flags, AGENT_READY | AGENT_PENDING);
    }
}

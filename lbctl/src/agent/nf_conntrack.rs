//! The node's netfilter connection-tracking settings, as kube-proxy's
//! conntracker writes them at start (`--conntrack-max-per-core`,
//! `--conntrack-min`, `--conntrack-tcp-timeout-established`,
//! `--conntrack-tcp-timeout-close-wait`, `--conntrack-tcp-be-liberal`,
//! `--conntrack-udp-timeout`, `--conntrack-udp-timeout-stream`).
//!
//! The Service datapath keeps its own table, but the node's other traffic
//! (hostNetwork pods, the kubelet, traffic to pods that no Service
//! translates) goes through netfilter's, and operators replacing kube-proxy
//! expect the node tuned as kube-proxy tunes it: a one-hour CLOSE_WAIT
//! instead of the kernel's minute, a day for established flows instead of
//! five.
//!
//! The timeouts are per network namespace (they apply where the agent
//! runs: the host's, as a hostNetwork DaemonSet). `nf_conntrack_max` and
//! the hash size are the host's: the kernel lets only the initial network
//! namespace write them, so elsewhere they are left alone and said so.

use std::{path::PathBuf, time::Duration};

use thiserror::Error;

/// What to write; `None` or zero leaves the kernel's value, as in
/// kube-proxy's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_be_liberal: bool,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Default for Settings {
    /// kube-proxy's defaults.
    fn default() -> Self {
        Self {
            max_per_core: 32 * 1024,
            min: 128 * 1024,
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp: Duration::ZERO,
            udp_stream: Duration::ZERO,
        }
    }
}

impl Settings {
    /// `nf_conntrack_max` to ask for (0: leave), as kube-proxy computes it:
    /// per core times the CPUs, at least `min`.
    pub fn max(&self, cpus: u32) -> u32 {
        if self.max_per_core == 0 {
            return 0;
        }
        self.max_per_core.saturating_mul(cpus).max(self.min)
    }

    /// The sysctls (under `net/netfilter/`) to set and their values.
    pub fn sysctls(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for (name, d) in [
            ("nf_conntrack_tcp_timeout_established", self.tcp_established),
            ("nf_conntrack_tcp_timeout_close_wait", self.tcp_close_wait),
            ("nf_conntrack_udp_timeout", self.udp),
            ("nf_conntrack_udp_timeout_stream", self.udp_stream),
        ] {
            if !d.is_zero() {
                out.push((name, d.as_secs().max(1)));
            }
        }
        // Only turned on, as kube-proxy: off is the kernel's default and
        // someone else may have turned it on for a reason.
        if self.tcp_be_liberal {
            out.push(("nf_conntrack_tcp_be_liberal", 1));
        }
        out
    }
}

/// A Go-style duration as kube-proxy's flags take it: `24h`, `1h0m0s`,
/// `90s`, `1m30s`, `500ms`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("an empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?}: expected a number (e.g. 24h, 1h0m0s, 90s)"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let one = match &rest[..unit] {
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            "" => return Err(format!("{s:?}: a number without a unit (h, m, s or ms)")),
            u => return Err(format!("{s:?}: unknown unit {u:?} (h, m, s or ms)")),
        };
        rest = &rest[unit..];
        let n = u32::try_from(n).map_err(|_| format!("{s:?}: number too large"))?;
        total += one * n;
    }
    Ok(total)
}

#[derive(Debug, Error)]
pub enum WriteError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// One setting's outcome, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Set {
        name: String,
        from: u64,
        to: u64,
    },
    Unchanged {
        name: String,
        value: u64,
    },
    /// The host's setting, not writable from this network namespace.
    HostOnly {
        name: String,
        value: u64,
    },
}

/// Where the files are (a test points it at a folder of its own).
#[derive(Clone, Debug)]
pub struct Files {
    pub proc_sys: PathBuf,
    pub sys_module: PathBuf,
}

impl Default for Files {
    fn default() -> Self {
        Self {
            proc_sys: "/proc/sys".into(),
            sys_module: "/sys/module".into(),
        }
    }
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write_u64(path: &std::path::Path, v: u64) -> Result<(), WriteError> {
    std::fs::write(path, format!("{v}\n")).map_err(|source| WriteError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A proc file the kernel made read-only here (mode without write bits):
/// `nf_conntrack_max` outside the initial network namespace.
fn read_only(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o222 == 0)
}

/// Applies `settings` where the agent runs; every setting is tried, the
/// outcomes and the errors are returned for the log and the status.
pub fn apply(settings: &Settings, cpus: u32, files: &Files) -> (Vec<Outcome>, Vec<WriteError>) {
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    let netfilter = files.proc_sys.join("net/netfilter");
    let set = |name: &str, to: u64, outcomes: &mut Vec<Outcome>, errors: &mut Vec<WriteError>| {
        let path = netfilter.join(name);
        let from = read_u64(&path).unwrap_or(0);
        if from == to {
            outcomes.push(Outcome::Unchanged {
                name: name.into(),
                value: to,
            });
            return true;
        }
        if read_only(&path) {
            outcomes.push(Outcome::HostOnly {
                name: name.into(),
                value: from,
            });
            return false;
        }
        match write_u64(&path, to) {
            Ok(()) => {
                outcomes.push(Outcome::Set {
                    name: name.into(),
                    from,
                    to,
                });
                true
            }
            Err(e) => {
                errors.push(e);
                false
            }
        }
    };
    let max = settings.max(cpus);
    if max > 0
        && set(
            "nf_conntrack_max",
            u64::from(max),
            &mut outcomes,
            &mut errors,
        )
    {
        // The hash table: a bucket per four entries, only ever grown (as
        // kube-proxy); the kernel takes it from the initial namespace only.
        let hashsize = files.sys_module.join("nf_conntrack/parameters/hashsize");
        let want = u64::from(max / 4);
        match read_u64(&hashsize) {
            Some(have) if have >= want => {}
            Some(have) => match write_u64(&hashsize, want) {
                Ok(()) => outcomes.push(Outcome::Set {
                    name: "hashsize".into(),
                    from: have,
                    to: want,
                }),
                Err(e) => errors.push(e),
            },
            None => {}
        }
    }
    for (name, v) in settings.sysctls() {
        set(name, v, &mut outcomes, &mut errors);
    }
    (outcomes, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_kube_proxy_flags_take_them() {
        let d = |s| parse_duration(s).unwrap().as_secs();
        assert_eq!(d("24h0m0s"), 86_400);
        assert_eq!(d("1h"), 3_600);
        assert_eq!(d("1m30s"), 90);
        assert_eq!(d("0"), 0);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "h", "10", "3d", "1h-1m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kube_proxy_defaults_and_the_max_from_cores() {
        let s = Settings::default();
        assert_eq!(s.max(2), 131_072, "the floor");
        assert_eq!(s.max(8), 262_144);
        assert_eq!(
            Settings {
                max_per_core: 0,
                ..s.clone()
            }
            .max(64),
            0,
            "0 per core leaves the kernel's"
        );
        assert_eq!(
            s.sysctls(),
            vec![
                ("nf_conntrack_tcp_timeout_established", 86_400),
                ("nf_conntrack_tcp_timeout_close_wait", 3_600),
            ]
        );
    }

    /// A folder of the test's own, removed on drop.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake(max_mode: u32) -> (TempDir, Files) {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = TempDir(std::env::temp_dir().join(format!(
            "lbctl-nf-conntrack-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        let root = dir.0.clone();
        let nf = root.join("sys/net/netfilter");
        let hs = root.join("module/nf_conntrack/parameters");
        std::fs::create_dir_all(&nf).unwrap();
        std::fs::create_dir_all(&hs).unwrap();
        for (f, v) in [
            ("nf_conntrack_max", 262_144),
            ("nf_conntrack_tcp_timeout_established", 432_000),
            ("nf_conntrack_tcp_timeout_close_wait", 60),
            ("nf_conntrack_udp_timeout", 30),
        ] {
            std::fs::write(nf.join(f), format!("{v}\n")).unwrap();
        }
        std::fs::set_permissions(
            nf.join("nf_conntrack_max"),
            std::fs::Permissions::from_mode(max_mode),
        )
        .unwrap();
        std::fs::write(hs.join("hashsize"), "16384\n").unwrap();
        let files = Files {
            proc_sys: root.join("sys"),
            sys_module: root.join("module"),
        };
        (dir, files)
    }

    #[test]
    fn writes_what_differs_and_leaves_the_host_settings_of_another_namespace() {
        let (_dir, files) = fake(0o444);
        let s = Settings {
            udp: Duration::from_secs(30),
            ..Settings::default()
        };
        let (outcomes, errors) = apply(&s, 2, &files);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            outcomes,
            vec![
                Outcome::HostOnly {
                    name: "nf_conntrack_max".into(),
                    value: 262_144
                },
                Outcome::Set {
                    name: "nf_conntrack_tcp_timeout_established".into(),
                    from: 432_000,
                    to: 86_400
                },
                Outcome::Set {
                    name: "nf_conntrack_tcp_timeout_close_wait".into(),
                    from: 60,
                    to: 3_600
                },
                Outcome::Unchanged {
                    name: "nf_conntrack_udp_timeout".into(),
                    value: 30
                },
            ]
        );
        let nf = files.proc_sys.join("net/netfilter");
        assert_eq!(
            read_u64(&nf.join("nf_conntrack_tcp_timeout_close_wait")),
            Some(3_600)
        );
        assert_eq!(
            read_u64(&files.sys_module.join("nf_conntrack/parameters/hashsize")),
            Some(16_384),
            "the hash size follows a max that was set"
        );
    }

    #[test]
    fn in_the_host_namespace_the_max_and_a_larger_hash_size_are_written() {
        let (_dir, files) = fake(0o644);
        let (outcomes, errors) = apply(&Settings::default(), 16, &files);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            outcomes[..2],
            [
                Outcome::Set {
                    name: "nf_conntrack_max".into(),
                    from: 262_144,
                    to: 524_288
                },
                Outcome::Set {
                    name: "hashsize".into(),
                    from: 16_384,
                    to: 131_072
                },
            ]
        );
    }
}

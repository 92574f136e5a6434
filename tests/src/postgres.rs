//! Real PostgreSQL servers in a test namespace: `initdb` into a folder the
//! test owns, `postgres` run as the `postgres` user, trust authentication
//! for the test network, stopped (by PID) and removed on drop.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::guard::{Netns, Proc, run, unique};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub addr: Ipv4Addr,
    dir: PathBuf,
    proc: Proc,
}

impl Postgres {
    /// Starts a server named `name` (its `cluster_name`) on `addr:5432` in
    /// `ns`; `addr` must be configured there.
    pub fn start(ns: &Netns, addr: Ipv4Addr, name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("pg"));
        let data = dir.join("data");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        run("chown", &["postgres:postgres", dir.to_str().unwrap()]);
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &format!("{BIN}/initdb"),
                "--no-sync",
                "-A",
                "trust",
                "-D",
                data.to_str().unwrap(),
            ],
        );
        let hba = data.join("pg_hba.conf");
        let mut text = fs::read_to_string(&hba).unwrap();
        text.push_str("host all all 0.0.0.0/0 trust\n");
        fs::write(&hba, text).unwrap();
        // setpriv execs (no fork): our child's PID becomes the postmaster's,
        // so it is ours to stop.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--clear-groups",
            ])
            .arg(format!("{BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", &format!("listen_addresses={addr}"), "-c", "port=5432"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", dir.display()),
                "-c",
                &format!("cluster_name={name}"),
            ])
            .args(["-c", "fsync=off", "-c", "shared_buffers=16MB"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("postgres.log")).expect("log"))
            .spawn()
            .expect("start postgres");
        let pg = Self {
            addr,
            dir,
            proc: Proc(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last;
        loop {
            let check = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns.name,
                    &format!("{BIN}/pg_isready"),
                    "-h",
                    &addr.to_string(),
                ])
                .output();
            let ready = check.as_ref().is_ok_and(|o| o.status.success());
            last = format!("{check:?}");
            if ready {
                return pg;
            }
            assert!(
                Instant::now() < deadline,
                "postgres {name} did not start: {last}\n{}",
                fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown of the postmaster we started; it takes its
        // backends with it. Proc's drop then reaps it.
        // SAFETY: our own child's PID.
        unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.proc.0.try_wait().ok().flatten().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `psql` arguments that ask a server for its `cluster_name`.
pub fn which_server(host: &str) -> Vec<String> {
    vec![
        format!(
            "host={host} port=5432 user=postgres dbname=postgres sslmode=disable connect_timeout=3"
        ),
        "-Atc".into(),
        "show cluster_name".into(),
    ]
}

/// After a switch from server `from` to server `to` began: connects with
/// `psql` (which returns the answering server's name) until `to` answers,
/// and returns how long that took. Every connection meanwhile must reach
/// `from` or `to`: a failed one, or another server, panics.
pub fn time_switch(psql: impl Fn() -> Result<String, String>, from: &str, to: &str) -> Duration {
    let changed = Instant::now();
    loop {
        match psql() {
            Ok(s) if s == to => return changed.elapsed(),
            Ok(s) => assert_eq!(s, from, "unexpected server"),
            Err(e) => panic!("a connection failed during the switch: {e}"),
        }
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "never reached {to}"
        );
    }
}

//! RAII guards. Each test names its resources with a unique prefix and a
//! sweep at start removes leftovers of earlier runs that died.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Prefix of everything the tests create: namespaces, bpffs folders,
/// cgroups, interfaces.
pub const PREFIX: &str = "lbt";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique name: prefix, pid, tag, sequence. Keep tags to two
/// characters: interface names have 15 at most.
pub fn unique(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}{tag}{n}", std::process::id())
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn run_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A private bpffs instance mounted in a fresh folder: pins of one test
/// never meet another's. Unmounted (dropping every pin) on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("bpf"));
        fs::create_dir_all(&dir).expect("create bpffs dir");
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "mount bpffs at {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Self { dir }
    }

    /// The agent's pin folder inside this bpffs.
    pub fn pins(&self) -> PathBuf {
        self.dir.join("lb")
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

fn umount(dir: &Path) {
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated string.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let _ = fs::remove_dir(dir);
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        umount(&self.dir);
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        Self::named(&unique(tag))
    }

    /// A namespace with this exact name (outside the sweep's prefix when
    /// it must outlive the process, as `cargo xtask cluster up`'s).
    pub fn named(name: &str) -> Self {
        let name = name.to_string();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A cgroup v2 child the test creates and runs its clients in; removed on
/// drop (after its processes are gone).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let root = lbctl::datapath::pins::cgroup2_root().expect("cgroup2 mount");
        let path = root.join(unique("cg"));
        fs::create_dir_all(&path).expect("create cgroup");
        Self { path }
    }

    /// A command that moves itself into this cgroup before it executes.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut script = format!("echo $$ > {} && exec", procs.display());
        script.push(' ');
        script.push_str(&shell_words(program, args));
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

fn shell_words(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes started in it were ours; move any survivor out first.
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            let parent = self.path.parent().map(|p| p.join("cgroup.procs"));
            for pid in procs.lines() {
                if let Some(p) = &parent {
                    let _ = fs::write(p, pid);
                }
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// A child process, killed (by its own PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel tunables' values before the kubelets ran, in the cluster's
/// folder.
pub const TUNABLES_FILE: &str = "kernel-tunables";

/// Writes back tunables recorded by `NodeCluster::start`.
fn restore_tunables(file: &Path) {
    for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
        if let Some((path, value)) = line.split_once(' ')
            && path.starts_with("/proc/sys/")
        {
            let _ = std::fs::write(path, value);
        }
    }
}

/// The v1 controller mounts of this host (cgroupfs driver paths).
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next() != Some("cgroup") {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .collect()
}

/// Every folder of a cgroup tree, deepest first.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.reverse();
    out
}

/// SIGKILLs every process in a cgroup tree (v1: no `cgroup.kill`) and
/// removes its folders once empty.
pub fn kill_and_remove_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tree = cgroup_tree(root);
        let mut alive = 0;
        for d in &tree {
            for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                alive += 1;
                // SAFETY: a process in a cgroup this cluster made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for d in &tree {
            let _ = std::fs::remove_dir(d);
        }
        if (alive == 0 && !root.exists()) || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Removes leftovers of earlier runs: namespaces, bpffs mounts and cgroups
/// whose names carry the test prefix and a PID that is no longer alive.
pub fn sweep() {
    // A leftover belongs to a test process that is gone.
    let alive = |name: &str| -> bool {
        let digits: String = name
            .trim_start_matches(PREFIX)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        !digits.is_empty() && Path::new("/proc").join(&digits).exists()
    };
    // Real nodes of a run that died: the kernel tunables their kubelets
    // changed, then every process in their cgroups (v2, and the kubelets'
    // v1 roots), before their folders and namespaces go.
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(PREFIX) && !alive(&name) {
                restore_tunables(&e.path().join(TUNABLES_FILE));
            }
        }
    }
    let mut roots: Vec<PathBuf> = cgroup_v1_mounts();
    if let Ok(v2) = lbctl::datapath::pins::cgroup2_root() {
        roots.push(v2);
    }
    for root in roots {
        let Ok(rd) = fs::read_dir(&root) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(PREFIX) && !alive(&name) {
                let _ = fs::write(e.path().join("cgroup.kill"), "1");
                kill_and_remove_tree(&e.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) && !alive(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(PREFIX) && !alive(&name) {
                let path = e.path();
                umount(&path); // a bpffs mount, or a no-op
                let _ = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
            }
        }
    }
}

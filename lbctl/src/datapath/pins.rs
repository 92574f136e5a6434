//! bpffs and cgroup2: finding them, mounting bpffs where it is missing, and
//! the layout of the agent's pin folder:
//!
//! ```text
//! <bpffs dir>/LB4_FRONTENDS_V1 ...   maps, named with their layout version
//! <bpffs dir>/links/<program>[@<device>]   attachments that outlive the agent
//! ```

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

pub fn links_dir(pins: &Path) -> PathBuf {
    pins.join("links")
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: zeroed statfs is valid; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Makes `dir` (and its links folder) exist on a bpffs. If its nearest
/// existing parent is not a bpffs and is `/sys/fs/bpf`, mounts one there, as
/// a node without systemd's mount would need.
pub fn prepare(dir: &Path) -> Result<()> {
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if !is_bpffs(&existing) {
        if existing == Path::new("/sys/fs/bpf") {
            mount_bpffs(&existing)?;
        } else {
            bail!(
                "{} is not on a bpffs: mount one (mount -t bpf bpf {}) or pick --bpffs under /sys/fs/bpf",
                dir.display(),
                existing.display()
            );
        }
    }
    fs::create_dir_all(links_dir(dir)).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

pub fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at)?;
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings, no data argument.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", at.display()));
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo (it is not always
/// /sys/fs/cgroup: hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp.replace("\\040", " ")));
        }
    }
    bail!("no cgroup v2 mount found in /proc/self/mountinfo")
}

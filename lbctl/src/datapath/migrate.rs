//! Pinned maps whose definition differs from what this agent wants are
//! migrated, never silently reused.
//!
//! The loader adopts a pinned map by name whatever its definition, so an
//! agent restarted with another size (`--conntrack-max`), or an upgrade
//! that changed a map's size or flags, would keep the old map. Before the
//! object is loaded, every pin whose key size, value size, entry count or
//! flags differ from the object's definition (with this agent's sizes) is
//! set aside under `migrating-<name>` (pinned there, then unpinned from its
//! name: bpffs has no rename); the loader then creates and pins the map
//! as defined, and the old entries are copied in (key and value layouts
//! are the same: a layout change comes with a new name, `_V<n>`). A smaller
//! map takes what fits: an LRU map evicts its least recently used entries,
//! another map stops at its size and says so. Entries the old programs
//! write between the copy and their replacement (milliseconds) are lost.
//! Maps with another key or value size under the same name (the agent's
//! own records) are recreated empty.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use tracing::{info, warn};

/// What a map is, as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// `BPF_MAP_TYPE_*`: a map can change type under one name when its
    /// keys and values keep their layout (the backends, from a hash to an
    /// array indexed by id).
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The object's maps, with `sizes` overriding entry counts by name.
pub fn object_defs(
    object: &[u8],
    sizes: &BTreeMap<String, u32>,
) -> Result<BTreeMap<String, MapDef>, aya_obj::ParseError> {
    let obj = aya_obj::Object::parse(object)?;
    Ok(obj
        .maps
        .iter()
        // Data sections (.rodata, .bss) are not pinned.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| {
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.get(name).copied().unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            };
            (name.clone(), def)
        })
        .collect())
}

/// A pin set aside, to be copied into its replacement.
#[derive(Debug)]
pub struct Staged {
    pub name: String,
    pub old: MapDef,
    pub new: MapDef,
    path: PathBuf,
    fd: OwnedFd,
}

/// Where a map is set aside. bpffs refuses names with a dot.
pub fn old_path(pins: &Path, name: &str) -> PathBuf {
    pins.join(format!("{OLD_PREFIX}{name}"))
}

pub const OLD_PREFIX: &str = "migrating-";

fn def_of(info: &MapInfo) -> MapDef {
    MapDef {
        map_type: info.map_type().map_or(0, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }
}

/// Sets aside every pin in `pins` whose definition differs from `want`
/// (and finishes a migration a killed agent left half done: an `.old` pin
/// whose map was not pinned again is put back first).
pub fn stage(pins: &Path, want: &BTreeMap<String, MapDef>) -> io::Result<Vec<Staged>> {
    let mut staged = Vec::new();
    for (name, new) in want {
        stage_one(pins, name, *new, &mut staged).map_err(|e| context(e, name))?;
    }
    Ok(staged)
}

/// The error, naming the map it is about.
fn context(e: io::Error, name: &str) -> io::Error {
    io::Error::new(e.kind(), format!("map {name}: {e}"))
}

fn stage_one(pins: &Path, name: &str, new: MapDef, staged: &mut Vec<Staged>) -> io::Result<()> {
    let new = &new;
    {
        let path = pins.join(name);
        let old = old_path(pins, name);
        if old.exists() {
            if path.exists() {
                // The new map exists: the copy may not have finished;
                // it is done again below from the old pin.
                staged.push(open_staged(name, &old, *new)?);
                return Ok(());
            }
            repin(&old, &path)?;
        }
        if !path.exists() {
            return Ok(());
        }
        let info = MapInfo::from_pin(&path).map_err(io::Error::other)?;
        let have = def_of(&info);
        if have == *new {
            return Ok(());
        }
        repin(&path, &old)?;
        staged.push(open_staged(name, &old, *new)?);
    }
    Ok(())
}

fn open_staged(name: &str, old: &Path, new: MapDef) -> io::Result<Staged> {
    let info = MapInfo::from_pin(old).map_err(io::Error::other)?;
    let fd = super::link::open_pinned(old)?;
    Ok(Staged {
        name: name.to_string(),
        old: def_of(&info),
        new,
        path: old.to_path_buf(),
        fd,
    })
}

/// What became of one staged map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub name: String,
    pub old: MapDef,
    pub new: MapDef,
    /// Entries copied into the new map (None: recreated empty).
    pub copied: Option<usize>,
    /// Entries that did not fit.
    pub dropped: usize,
}

/// Copies each staged map into the map now pinned under its name, then
/// removes the old pin.
pub fn finish(pins: &Path, staged: Vec<Staged>) -> io::Result<Vec<Migrated>> {
    let mut out = Vec::new();
    for s in staged {
        let name = s.name.clone();
        out.push(finish_one(pins, s).map_err(|e| context(e, &name))?);
    }
    Ok(out)
}

fn finish_one(pins: &Path, s: Staged) -> io::Result<Migrated> {
    {
        let new_fd = super::link::open_pinned(&pins.join(&s.name))?;
        let same_layout = s.old.key_size == s.new.key_size && s.old.value_size == s.new.value_size;
        let (copied, dropped) = if same_layout && s.name == lb_common::maps::CONNTRACK4 {
            // A flow's set depends on the table's size: flows are placed
            // again, not copied by index.
            drop(new_fd);
            let flows = super::flows::read_pinned(&s.path)?;
            let kept = super::flows::carry(&flows, &pins.join(&s.name))?;
            (Some(kept), flows.len() - kept)
        } else if same_layout {
            let (c, d) = copy(s.fd.as_fd(), new_fd.as_fd(), &s.name, s.old)?;
            (Some(c), d)
        } else {
            (None, 0)
        };
        fs::remove_file(&s.path)?;
        let m = Migrated {
            name: s.name,
            old: s.old,
            new: s.new,
            copied,
            dropped,
        };
        match m.copied {
            Some(n) => info!(
                map = %m.name,
                old_max = m.old.max_entries,
                new_max = m.new.max_entries,
                old_flags = m.old.flags,
                new_flags = m.new.flags,
                copied = n,
                dropped = m.dropped,
                "pinned map migrated to its new definition"
            ),
            None => warn!(
                map = %m.name,
                old_key = m.old.key_size,
                old_value = m.old.value_size,
                new_key = m.new.key_size,
                new_value = m.new.value_size,
                "pinned map had another layout under the same name: recreated empty"
            ),
        }
        Ok(m)
    }
}

/// Per-CPU maps hold one value slot per possible CPU, 8-byte aligned.
fn value_buffer_len(name: &str, value_size: u32) -> io::Result<usize> {
    let per_cpu = [
        lb_common::maps::SERVICE_STATS,
        lb_common::maps::VERDICT_STATS,
        lb_common::maps::BACKEND_STATS,
    ]
    .contains(&name);
    if !per_cpu {
        return Ok(value_size as usize);
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    Ok((value_size as usize).div_ceil(8) * 8 * cpus)
}

/// Copies every entry of `from` into `to` (same key and value sizes).
fn copy(from: BorrowedFd, to: BorrowedFd, name: &str, def: MapDef) -> io::Result<(usize, usize)> {
    let mut key = vec![0u8; def.key_size as usize];
    let mut next = vec![0u8; def.key_size as usize];
    let mut value = vec![0u8; value_buffer_len(name, def.value_size)?];
    let (mut copied, mut dropped) = (0, 0);
    let mut first = true;
    loop {
        let r = map_elem(
            BPF_MAP_GET_NEXT_KEY,
            from,
            if first { None } else { Some(&key) },
            next.as_mut_ptr(),
            0,
        );
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        match map_elem(BPF_MAP_LOOKUP_ELEM, from, Some(&key), value.as_mut_ptr(), 0) {
            Ok(()) => {}
            // Deleted meanwhile (LRU eviction by the running programs).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        // An array holds every index: one with no entry reads as zeros.
        if def.map_type == BPF_MAP_TYPE_ARRAY && value.iter().all(|b| *b == 0) {
            continue;
        }
        match map_elem(BPF_MAP_UPDATE_ELEM, to, Some(&key), value.as_mut_ptr(), 0) {
            Ok(()) => copied += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) => dropped += 1,
            Err(e) => return Err(e),
        }
    }
    if dropped > 0 {
        warn!(
            map = name,
            dropped, "entries that did not fit in the resized map"
        );
    }
    Ok((copied, dropped))
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(super) const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;

/// `union bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One map element command (`BPF_MAP_*_ELEM`, `BPF_MAP_GET_NEXT_KEY`) on
/// `fd`: `key` (None: the first key), `value` the buffer read or written.
pub(super) fn map_elem(
    cmd: libc::c_long,
    fd: BorrowedFd,
    key: Option<&[u8]>,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: value as u64,
        flags,
    };
    super::link::bpf(cmd, &mut attr).map(|_| ())
}

/// Moves a pin (bpffs has no rename): pin the object at `to`, then
/// remove `from`. Killed in between, both names hold the same map.
pub fn repin(from: &Path, to: &Path) -> io::Result<()> {
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let fd = super::link::open_pinned(from)?;
    if to.exists() {
        fs::remove_file(to)?;
    }
    let c = CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = PinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    super::link::bpf(BPF_OBJ_PIN, &mut attr)?;
    fs::remove_file(from)
}

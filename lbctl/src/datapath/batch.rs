//! Batched map writes: `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`,
//! one `bpf()` call for many entries of one map (aya has no wrapper for
//! them). A full sync writes hundreds of thousands of entries; one call
//! per entry was most of its time.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` part of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// What a batch did when it stopped early: the entries done before the
/// failing one, and the error.
#[derive(Debug)]
pub struct Stopped {
    pub done: usize,
    pub error: io::Error,
}

fn run(
    cmd: libc::c_long,
    fd: BorrowedFd,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
    elem_flags: u64,
) -> Result<(), Stopped> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags,
        flags: 0,
    };
    match super::link::bpf(cmd, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel writes back how many it processed.
        Err(error) => Err(Stopped {
            done: (attr.count as usize).min(count),
            error,
        }),
    }
}

/// Puts `count` entries: `keys` and `values` packed back to back, each
/// value as the map wants it (per-CPU maps: one 8-byte aligned slot per
/// possible CPU).
pub fn update(
    fd: BorrowedFd,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> Result<(), Stopped> {
    run(
        BPF_MAP_UPDATE_BATCH,
        fd,
        keys,
        Some(values),
        count,
        elem_flags,
    )
}

/// Deletes `count` keys packed back to back.
pub fn delete(fd: BorrowedFd, keys: &[u8], count: usize) -> Result<(), Stopped> {
    run(BPF_MAP_DELETE_BATCH, fd, keys, None, count, 0)
}

/// Packs plain-old-data values back to back.
pub fn pack<T: aya::Pod>(items: impl IntoIterator<Item = T>) -> Vec<u8> {
    let mut out = Vec::new();
    for t in items {
        // SAFETY: `T: Pod` is plain data without padding requirements on
        // read; its bytes are what the kernel expects.
        let b = unsafe {
            std::slice::from_raw_parts((&t as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        out.extend_from_slice(b);
    }
    out
}

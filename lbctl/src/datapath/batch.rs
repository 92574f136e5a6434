//! Batched map operations: `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`
//! and `BPF_MAP_LOOKUP_BATCH`, one `bpf()` call for many entries of one map
//! (aya has no wrapper for them). A full sync writes hundreds of thousands
//! of entries, and an agent restarted on its pinned maps reads as many; one
//! call per entry (two to iterate) was most of their time.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Every entry of a hash map (not per-CPU): keys and values packed back to
/// back, `chunk` entries per call. An entry added or deleted while this
/// runs may or may not be in the result, as with any iteration.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd,
    mut chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut keys = vec![0u8; ks * chunk];
    let mut values = vec![0u8; vs * chunk];
    // The kernel's position between calls: a bucket index for hash maps
    // (4 bytes), a key for others; room for either.
    let mut token_in = vec![0u8; ks.max(8)];
    let mut token_out = vec![0u8; ks.max(8)];
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let r = super::link::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match &r {
            Ok(_) => false,
            // The end of the map; `count` still says what this call read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // A hash bucket holds more entries than the chunk: a hash map
            // returns whole buckets. Again from the same place, larger.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => {
                chunk *= 2;
                keys.resize(ks * chunk, 0);
                values.resize(vs * chunk, 0);
                continue;
            }
            Err(_) => return r.map(|_| out),
        };
        for i in 0..(attr.count as usize).min(chunk) {
            // SAFETY: the kernel wrote `count` whole keys and values; `K`
            // and `V` are plain data of exactly those sizes.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()),
                    std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()),
                )
            };
            out.push((k, v));
        }
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
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

//! A flush's ops written in batches: consecutive ops of one kind (the plan
//! orders them by map, make-before-break) become one `BPF_MAP_*_BATCH`
//! call per map, with the counters a new backend or Service port needs
//! created in a batch before it. Order between kinds is kept, so the maps
//! go through the same states as with one write per op, only fewer
//! syscalls apart.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use lb_common::{maps as names, service::Backend4};

use super::batch::{self, Stopped};
use crate::agent::{apply::MapError, state::Op};

/// Ops that go in batches, by the map they write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    PutBackend,
    PutName,
    PutServiceMeta,
    PutSlot,
    PutServiceBackend,
    PutAddr,
    PutFrontend,
    DelFrontend,
    DelAddr,
    DelSlot,
    DelServiceBackend,
    DelServiceMeta,
    DelName,
    DelBackend,
}

pub fn kind(op: &Op) -> Option<Kind> {
    Some(match op {
        Op::PutBackend(..) => Kind::PutBackend,
        Op::PutName(..) => Kind::PutName,
        Op::PutServiceMeta(..) => Kind::PutServiceMeta,
        Op::PutSlot(..) => Kind::PutSlot,
        Op::PutServiceBackend(..) => Kind::PutServiceBackend,
        Op::PutAddr(..) => Kind::PutAddr,
        Op::PutFrontend(..) => Kind::PutFrontend,
        Op::DelFrontend(..) => Kind::DelFrontend,
        Op::DelAddr(..) => Kind::DelAddr,
        Op::DelSlot(..) => Kind::DelSlot,
        Op::DelServiceBackend(..) => Kind::DelServiceBackend,
        Op::DelServiceMeta(..) => Kind::DelServiceMeta,
        Op::DelName(..) => Kind::DelName,
        Op::DelBackend(..) => Kind::DelBackend,
        // Source ranges live in an LPM trie, which has no batch update;
        // port words are few, written one by one.
        Op::PutSourceRange(..) | Op::DelSourceRange(..) | Op::PutPorts(..) => return None,
    })
}

/// The maps' descriptors, opened from their pins once.
#[derive(Debug, Default)]
pub struct Fds(BTreeMap<&'static str, OwnedFd>);

impl Fds {
    fn get(&mut self, dir: &Path, name: &'static str) -> io::Result<&OwnedFd> {
        if !self.0.contains_key(name) {
            let fd = super::link::open_pinned(&dir.join(name))?;
            self.0.insert(name, fd);
        }
        Ok(&self.0[name])
    }
}

/// Puts all of `keys`/`values`, stopping at a real error.
fn put_all(
    fd: &OwnedFd,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<(), (usize, io::Error)> {
    batch::update(fd.as_fd(), keys, values, count, 0).map_err(|s| (s.done, s.error))
}

/// Deletes all of `keys` (`size` bytes each); an absent key is skipped
/// (deletes are idempotent).
fn delete_all(fd: &OwnedFd, keys: &[u8], size: usize) -> Result<(), (usize, io::Error)> {
    let count = keys.len() / size;
    let mut from = 0;
    while from < count {
        match batch::delete(fd.as_fd(), &keys[from * size..], count - from) {
            Ok(()) => return Ok(()),
            Err(Stopped { done, error }) if error.raw_os_error() == Some(libc::ENOENT) => {
                from += done + 1;
            }
            Err(s) => return Err((from + s.done, s.error)),
        }
    }
    Ok(())
}

/// Writes `ops`, all of one `kind`; on an error, how many landed.
pub fn write(dir: &Path, fds: &mut Fds, kind: Kind, ops: &[Op]) -> Result<(), (usize, MapError)> {
    let fail = |i: usize, e: io::Error| {
        (
            i,
            MapError::Write {
                op: Box::new(ops[i.min(ops.len() - 1)].clone()),
                source: e,
            },
        )
    };
    let n = ops.len();
    macro_rules! fd {
        ($name:expr) => {
            fds.get(dir, $name).map_err(|e| fail(0, e))?
        };
    }
    macro_rules! puts {
        ($name:expr, $pat:pat => ($k:expr, $v:expr)) => {{
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for op in ops {
                if let $pat = op {
                    keys.extend(batch::pack([$k]));
                    values.extend(batch::pack([$v]));
                }
            }
            put_all(fd!($name), &keys, &values, n).map_err(|(i, e)| fail(i, e))
        }};
    }
    macro_rules! dels {
        ($name:expr, $pat:pat => $k:expr) => {{
            let mut keys = Vec::new();
            for op in ops {
                if let $pat = op {
                    keys.extend(batch::pack([$k]));
                }
            }
            // Every op is of this kind: each key the same size.
            delete_all(fd!($name), &keys, keys.len() / n).map_err(|(i, e)| fail(i, e))
        }};
    }
    match kind {
        // Counters are created by the datapath at the first packet or flow
        // that counts (see lb-ebpf/src/stats.rs), deleted here with their
        // backend or port.
        Kind::PutBackend => puts!(names::BACKENDS4, Op::PutBackend(k, v, _) => (*k, *v)),
        Kind::PutName => {
            puts!(names::NAMES, Op::PutName(k, v) => (*k, **v))
        }
        Kind::PutServiceMeta => {
            puts!(names::SERVICE_META, Op::PutServiceMeta(k, v, _) => (*k, **v))
        }
        Kind::PutSlot => puts!(names::BACKEND_SLOTS, Op::PutSlot(k, v) => (*k, **v)),
        Kind::PutServiceBackend => {
            puts!(names::SERVICE_BACKENDS, Op::PutServiceBackend(k, v) => (*k, *v))
        }
        Kind::PutAddr => puts!(names::ADDRS4, Op::PutAddr(k, v) => (*k, *v)),
        Kind::PutFrontend => puts!(names::FRONTENDS4, Op::PutFrontend(k, v) => (*k, *v)),
        Kind::DelFrontend => dels!(names::FRONTENDS4, Op::DelFrontend(k) => *k),
        Kind::DelAddr => dels!(names::ADDRS4, Op::DelAddr(k) => *k),
        Kind::DelSlot => dels!(names::BACKEND_SLOTS, Op::DelSlot(k) => *k),
        Kind::DelServiceBackend => {
            dels!(names::SERVICE_BACKENDS, Op::DelServiceBackend(k) => *k)
        }
        Kind::DelServiceMeta => {
            dels!(names::SERVICE_META, Op::DelServiceMeta(k) => *k)?;
            dels!(names::SERVICE_STATS, Op::DelServiceMeta(k) => *k)
        }
        Kind::DelName => dels!(names::NAMES, Op::DelName(k) => *k),
        Kind::DelBackend => {
            // An array has no deletion: an id with no backend holds zeros.
            puts!(names::BACKENDS4, Op::DelBackend(k) => (*k, Backend4::default()))?;
            dels!(names::BACKEND_STATS, Op::DelBackend(k) => *k)
        }
    }
}

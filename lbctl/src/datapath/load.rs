//! The eBPF objects built by `build.rs` and embedded in `lbctl`.

use std::{collections::BTreeMap, os::fd::AsFd, path::Path};

use aya::{Ebpf, EbpfLoader};
use lb_common::conntrack::{Ct4Entry, Ct4Key};

use super::{
    flows,
    migrate::{self, Migrated},
    slots_v1,
};

/// The datapath object (every program and map).
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));
/// Do-nothing programs: the floor for benchmarks.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this lbctl was built with LB_SKIP_EBPF=1 and carries no eBPF datapath; \
         rebuild it with the eBPF toolchain (cargo xtask setup)"
    )]
    NotBuiltIn,
    #[error("loading the eBPF object (maps pinned under {pins}): {source}")]
    Load {
        pins: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("reading the map definitions of the eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("migrating pinned maps under {pins} to their new definitions: {source}")]
    Migrate {
        pins: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn object(bytes: &'static [u8]) -> Result<&'static [u8], LoadError> {
    if bytes.is_empty() {
        Err(LoadError::NotBuiltIn)
    } else {
        Ok(bytes)
    }
}

/// Loads the datapath object; its maps are pinned in `pin_dir`, or adopted
/// from there when already pinned (an agent restart). Kernel log records
/// are compiled out.
pub fn load(pin_dir: &Path) -> Result<Ebpf, LoadError> {
    load_with_logs(pin_dir, false)
}

/// As `load`; with `logs`, the programs' debug records (aya-log) stay in.
/// Without, the log level global is 0, so the verifier sees every log call
/// as dead code and removes it: no cost per packet.
pub fn load_with_logs(pin_dir: &Path, logs: bool) -> Result<Ebpf, LoadError> {
    load_with(pin_dir, logs, &BTreeMap::new()).map(|(ebpf, _)| ebpf)
}

/// As `load_with_logs`, with map sizes by name (`sizes`, else the
/// object's). Pinned maps whose definition differs (another size, an older
/// agent's flags) are migrated to the new one, entries copied
/// (`migrate`); what was migrated is returned.
pub fn load_with(
    pin_dir: &Path,
    logs: bool,
    sizes: &BTreeMap<String, u32>,
) -> Result<(Ebpf, Vec<Migrated>), LoadError> {
    let obj = object(LB_OBJECT)?;
    let pins = || pin_dir.display().to_string();
    // Backend sets of the first layout, converted once the new map is
    // there (`slots_v1`), then unpinned.
    let old_slots = pin_dir.join(lb_common::maps::RETIRED_SLOTS);
    let slots_v1 = slots_v1::read(&old_slots).map_err(|source| LoadError::Migrate {
        pins: pins(),
        source,
    })?;
    // Maps of an earlier layout, replaced by their next version.
    // Flows of the first layout (an LRU hash), placed in the new table
    // once it is there, then unpinned.
    let old_flows = pin_dir.join(lb_common::maps::RETIRED_CONNTRACK4);
    let flows_v1: Option<Vec<(Ct4Key, Ct4Entry)>> = if old_flows.exists() {
        let fd = super::link::open_pinned(&old_flows).map_err(|source| LoadError::Migrate {
            pins: pins(),
            source,
        })?;
        Some(
            super::batch::lookup_all(fd.as_fd(), 8192).map_err(|source| LoadError::Migrate {
                pins: pins(),
                source,
            })?,
        )
    } else {
        None
    };
    for name in lb_common::maps::RETIRED {
        if [
            lb_common::maps::RETIRED_SLOTS,
            lb_common::maps::RETIRED_CONNTRACK4,
        ]
        .contains(name)
        {
            continue;
        }
        let p = pin_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|source| LoadError::Migrate {
                pins: pins(),
                source,
            })?;
            tracing::info!(map = name, "removed a map of an earlier layout");
        }
    }
    let defs = migrate::object_defs(obj, sizes)?;
    let staged = migrate::stage(pin_dir, &defs).map_err(|source| LoadError::Migrate {
        pins: pins(),
        source,
    })?;
    let level: u8 = if logs { aya_log::Level::Debug as u8 } else { 0 };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(aya_log::LEVEL, &level, false)
        .default_map_pin_directory(pin_dir);
    for (name, n) in sizes {
        loader.map_max_entries(name, *n);
    }
    let ebpf = loader.load(obj).map_err(|source| LoadError::Load {
        pins: pins(),
        source: Box::new(source),
    })?;
    // The flow table is made (seed and sets written) before any program
    // runs on it, flows of a resized one placed in it (`migrate`).
    let flow_table = pin_dir.join(lb_common::maps::CONNTRACK4);
    flows::make_pinned(&flow_table).map_err(|source| LoadError::Migrate {
        pins: pins(),
        source,
    })?;
    let migrated = migrate::finish(pin_dir, staged).map_err(|source| LoadError::Migrate {
        pins: pins(),
        source,
    })?;
    if let Some(old) = flows_v1 {
        let kept = flows::carry(&old, &flow_table)
            .and_then(|n| std::fs::remove_file(&old_flows).map(|()| n))
            .map_err(|source| LoadError::Migrate {
                pins: pins(),
                source,
            })?;
        tracing::info!(
            from = lb_common::maps::RETIRED_CONNTRACK4,
            to = lb_common::maps::CONNTRACK4,
            flows = old.len(),
            kept,
            "flows carried into the new flow table"
        );
    }
    if let Some(chunks) = slots_v1 {
        let new = pin_dir.join(lb_common::maps::BACKEND_SLOTS);
        let n = slots_v1::write(&new, &chunks)
            .and_then(|n| std::fs::remove_file(&old_slots).map(|()| n))
            .map_err(|source| LoadError::Migrate {
                pins: pins(),
                source,
            })?;
        tracing::info!(
            from = lb_common::maps::RETIRED_SLOTS,
            to = lb_common::maps::BACKEND_SLOTS,
            entries = n,
            "backend sets converted to the new layout"
        );
    }
    Ok((ebpf, migrated))
}

/// Loads the floor programs (no maps).
pub fn load_floor() -> Result<Ebpf, LoadError> {
    let obj = object(FLOOR_OBJECT)?;
    Ebpf::load(obj).map_err(|source| LoadError::Load {
        pins: "-".into(),
        source: Box::new(source),
    })
}

/// Runs a program's `load` (BPF_PROG_LOAD), again when the kernel gave up
/// with EAGAIN: the verifier stops a long verification when a signal is
/// pending for the loading thread (the device programs take it about 3 s
/// on a small machine), as libbpf's loader knows and retries, five tries
/// in all.
pub fn verified(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

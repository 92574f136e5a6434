//! Runs the real device-path program on a synthetic packet, for
//! `lbctl explain`, without touching the live datapath's state.
//!
//! The object is loaded a second time: the maps that say where traffic goes
//! (frontends, addresses, backend sets, backends, config, names) are the
//! agent's pinned maps, shared read-only in practice; the maps the program
//! writes (connection tracking, counters, socket maps) are fresh scratch
//! copies pinned in `<pins>/explain-<pid>` and removed afterwards. So the
//! answer is the program's own, and no flow, counter or LRU slot of the
//! live datapath changes.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::{
    conntrack::{Ct4Entry, Ct4Key},
    counters::MAX_VERDICTS,
    maps as names,
    service::{AffinityEntry, AffinityKey},
};

use super::{
    flows::FlowTable,
    load::{LB_OBJECT, object},
};

/// Maps the program only reads: the live ones are used.
const SHARED: &[&str] = &[
    names::FRONTENDS4,
    names::ADDRS4,
    names::BACKEND_SLOTS,
    names::SERVICE_BACKENDS,
    names::SOURCE_RANGES4,
    names::BACKENDS4,
    names::CONFIG,
    names::PORTS,
    names::NODE_ADDRS4,
    names::SERVICE_META,
    names::NAMES,
    names::AGENT_STATUS,
];

/// Maps the program writes, made small: a probe makes one flow.
const SCRATCH_SIZES: &[(&str, u32)] = &[
    (names::CONNTRACK4, 64),
    (names::FRAGS4, 4),
    (names::AFFINITY4, 16),
    (names::SOCK_REVNAT4, 16),
    (names::SOCK_FLOWS4, 16),
    (names::SERVICE_STATS, 1),
    (names::BACKEND_STATS, 1),
];

const SCRATCH_PREFIX: &str = "explain-";

/// What the program did with the packet.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The program's return code (`TC_ACT_*`).
    pub return_code: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Verdict numbers the program counted (in the scratch counters).
    pub verdicts: Vec<u32>,
    /// The scratch conntrack entry for the packet's own tuple after the
    /// run: the flow the program created or refreshed.
    pub entry: Option<Ct4Entry>,
}

/// The scratch folder, removed (with its pins) on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_scratch(&self.0);
    }
}

fn remove_scratch(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes scratch folders of probes whose process is gone (killed midway).
pub fn sweep(pins: &Path) {
    let Ok(rd) = fs::read_dir(pins) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix(SCRATCH_PREFIX)
            && !Path::new("/proc").join(pid).exists()
        {
            remove_scratch(&e.path());
        }
    }
}

/// `struct __sk_buff` as PROG_TEST_RUN's context: the device the packet
/// arrives on (the FIB lookup of an SNATed flow starts there).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx
}

/// Runs `lb_from_netdev` on `frame` as if it arrived on `ifindex` (0: no
/// device). `seed`: conntrack entries of the live table to start from, so
/// a packet of an existing flow takes the path it really takes; `affinity`
/// the same for session affinity entries.
pub fn from_netdev(
    pins: &Path,
    frame: &[u8],
    ifindex: u32,
    seed: &[(Ct4Key, Ct4Entry)],
    affinity: &[(AffinityKey, AffinityEntry)],
) -> anyhow::Result<Probe> {
    use anyhow::Context;
    // Every shared map must exist: the loader would otherwise create (and
    // pin) an empty one at the live path.
    for name in SHARED {
        let p = pins.join(name);
        anyhow::ensure!(
            p.exists(),
            "map {name} is not pinned in {}: is the agent running with this --bpffs?",
            pins.display()
        );
    }
    sweep(pins);
    let dir = pins.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    remove_scratch(&dir);
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _scratch = Scratch(dir.clone());

    let level: u8 = 0;
    let mut loader = EbpfLoader::new();
    loader
        .override_global(aya_log::LEVEL, &level, false)
        .default_map_pin_directory(&dir);
    let shared: Vec<(&str, PathBuf)> = SHARED.iter().map(|n| (*n, pins.join(n))).collect();
    for (name, path) in &shared {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, size) in SCRATCH_SIZES {
        loader.map_max_entries(name, *size);
    }
    let mut ebpf = loader
        .load(object(LB_OBJECT)?)
        .context("loading a second copy of the datapath object")?;

    {
        let ct = FlowTable::make(super::flows::data_of(
            ebpf.map(names::CONNTRACK4)
                .context("conntrack map missing from the object")?,
        )?)
        .context("making the scratch flow table")?;
        for (k, e) in seed {
            ct.insert(k, e).context("seeding the scratch flow table")?;
        }
        let mut aff: HashMap<_, AffinityKey, AffinityEntry> = HashMap::try_from(
            ebpf.map_mut(names::AFFINITY4)
                .context("affinity map missing from the object")?,
        )?;
        for (k, e) in affinity {
            aff.insert(k, e, 0)
                .context("seeding the scratch affinity table")?;
        }
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(super::attach::FROM_NETDEV)
        .context("lb_from_netdev missing from the object")?
        .try_into()?;
    super::load::verified(|| prog.load()).context("loading lb_from_netdev")?;
    let ctx = skb_ctx(ifindex);
    let mut out = vec![0u8; frame.len() + 128];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN of lb_from_netdev")?;
    out.truncate(r.data_size_out as usize);

    let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map(names::VERDICT_STATS)
            .context("verdict map missing from the object")?,
    )?;
    let verdicts = (0..MAX_VERDICTS)
        .filter(|v| {
            counts
                .get(v, 0)
                .is_ok_and(|c| c.iter().copied().sum::<u64>() > 0)
        })
        .collect();
    let ct = FlowTable::open(super::flows::data_of(
        ebpf.map(names::CONNTRACK4)
            .context("conntrack map missing from the object")?,
    )?)?;
    let own = crate::datapath::frame::tuple(frame).map(|(s, d)| Ct4Key {
        src_addr: lb_common::ip4(s.ip().octets()),
        dst_addr: lb_common::ip4(d.ip().octets()),
        src_port: lb_common::port(s.port()),
        dst_port: lb_common::port(d.port()),
        proto: frame.get(23).copied().unwrap_or(0),
        dir: lb_common::conntrack::CT_ORIGINAL,
        _pad: 0,
    });
    let entry = match own {
        Some(k) => ct.get(&k)?,
        None => None,
    };
    Ok(Probe {
        return_code: r.return_value as i32,
        frame: out,
        verdicts,
        entry,
    })
}

//! Per-packet cost of the device path, measured by the kernel with
//! BPF_PROG_TEST_RUN, next to programs that do nothing (the floor on this
//! machine), with growing numbers of Services in the maps; the kernel
//! memory those maps take; the verifier's instruction counts.

use std::{net::Ipv4Addr, time::Instant};

use aya::{
    Ebpf,
    programs::{Program, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use lbctl::{
    agent::{model, reconcile::Reconciler},
    datapath::{load, maps::ServiceMaps},
};

use super::{Progress, cluster, memory, node_info};
use crate::{
    fixture,
    packet::{ACK, Frame, SYN},
};

pub const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

/// The rows, in print order.
pub const ROWS: &[&str] = &[
    "new flow to a NodePort (conntrack create, backend pick, DNAT)",
    "established flow (conntrack hit, DNAT)",
    "reply of a local backend (egress, reverse translation)",
    "not for a Service: node address, port 22 (passed)",
    "not for a Service: routed to a pod address (passed)",
    "floor: tc program returning TC_ACT_OK",
    "floor: XDP program returning XDP_PASS",
    "XDP: new flow to a NodePort (conntrack create, backend pick, DNAT, XDP_PASS)",
    "XDP: established flow (conntrack hit, DNAT)",
    "XDP: reply of an SNATed flow (conntrack hit, next hop, XDP_TX)",
    "XDP: not for a Service: node address, port 22 (passed)",
];

/// Rows of the XDP program, from this index on.
const XDP_ROWS: usize = 7;

pub struct Results {
    pub sizes: Vec<usize>,
    /// ns per packet: `cost[row][size]`, median of the rounds' medians,
    /// and the rounds' min and max.
    pub cost: Vec<Vec<(f64, f64, f64)>>,
    /// Seconds to program each size through the agent's translation.
    pub program_s: Vec<f64>,
    /// Kernel memory of all maps per size, bytes; and per map at the
    /// largest size.
    pub map_bytes: Vec<u64>,
    pub maps_largest: Vec<(String, u64)>,
    /// (program, verified instructions, size in instructions).
    pub insns: Vec<(String, u32, u32)>,
}

fn tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("program")
        .try_into()
        .expect("tc program")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One run of a program on a fresh copy of `frame`, kernel-timed; the
/// frame as the program left it.
fn run_once<P>(p: &P, frame: &[u8]) -> (f64, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 64];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("PROG_TEST_RUN");
    (r.duration.as_nanos() as f64, out)
}

/// Rounds of `calls` runs: (median of the rounds' medians, min, max).
fn rounds(rounds: usize, calls: usize, mut one: impl FnMut(usize) -> f64) -> (f64, f64, f64) {
    let meds: Vec<f64> = (0..rounds)
        .map(|r| median((0..calls).map(|i| one(r * calls + i)).collect()))
        .collect();
    let min = meds.iter().copied().fold(f64::MAX, f64::min);
    let max = meds.iter().copied().fold(0.0, f64::max);
    (median(meds), min, max)
}

pub fn run(quick: bool, progress: &mut Progress) -> Results {
    let sizes: Vec<usize> = if quick {
        vec![1, 100]
    } else {
        vec![1, 1_000, 10_000, 100_000]
    };
    // Rounds and calls per round (one run per call: PROG_TEST_RUN's
    // `repeat` reruns the program on the already rewritten packet, which
    // would measure the pass-through path instead).
    let (n_rounds, calls) = if quick { (2, 300) } else { (5, 10_000) };

    let mut floor = load::load_floor().expect("floor object");
    tc(&mut floor, "floor_tc").load().unwrap();
    let x: &mut Xdp = floor.program_mut("floor_xdp").unwrap().try_into().unwrap();
    lbctl::datapath::load::verified(|| x.load()).unwrap();
    let floor_tc: &SchedClassifier = floor.program("floor_tc").unwrap().try_into().unwrap();
    let xdp: &Xdp = floor.program("floor_xdp").unwrap().try_into().unwrap();

    let client = Ipv4Addr::new(192, 168, 50, 7);
    let other = Frame::tcp((client, 40000), (NODE, 22), ACK).bytes();
    let routed = Frame::tcp((client, 40000), (Ipv4Addr::new(10, 244, 9, 9), 8080), ACK).bytes();

    let dev = XdpDevice::new();
    let mut res = Results {
        sizes: sizes.clone(),
        cost: vec![vec![]; ROWS.len()],
        program_s: vec![],
        map_bytes: vec![],
        maps_largest: vec![],
        insns: vec![],
    };
    for (si, &n) in sizes.iter().enumerate() {
        progress.step(&format!(
            "per-packet cost: programming {n} Services x 10 backends"
        ));
        let (fs, mut ebpf) = fixture::datapath_for(n * 10);
        let pins = fs.pins();
        let t = Instant::now();
        let (np, rec) = program(&pins, n);
        res.program_s.push(t.elapsed().as_secs_f64());
        let mem = memory::maps(&pins);
        res.map_bytes.push(mem.iter().map(|m| m.1).sum());
        if si + 1 == sizes.len() {
            res.maps_largest = mem;
        }

        for name in ["lb_from_netdev", "lb_to_netdev"] {
            lbctl::datapath::load::verified(|| tc(&mut ebpf, name).load()).unwrap();
        }
        if si == 0 {
            for name in [
                "lb_connect4",
                "lb_sendmsg4",
                "lb_recvmsg4",
                "lb_getpeername4",
            ] {
                let p: &mut aya::programs::CgroupSockAddr =
                    ebpf.program_mut(name).unwrap().try_into().unwrap();
                lbctl::datapath::load::verified(|| p.load()).unwrap();
            }
            let p: &mut Xdp = ebpf
                .program_mut("lb_xdp_from_netdev")
                .unwrap()
                .try_into()
                .unwrap();
            lbctl::datapath::load::verified(|| p.load()).unwrap();
            for (name, p) in ebpf.programs() {
                let info = match p {
                    Program::SchedClassifier(p) => p.info(),
                    Program::CgroupSockAddr(p) => p.info(),
                    Program::Xdp(p) => p.info(),
                    _ => continue,
                };
                if let Ok(info) = info {
                    res.insns.push((
                        name.to_string(),
                        info.verified_instruction_count().unwrap_or(0),
                        info.size_translated().unwrap_or(0) / 8,
                    ));
                }
            }
            res.insns.sort();
        }
        progress.step(&format!("per-packet cost: measuring with {n} Services"));
        let from: &SchedClassifier = ebpf.program("lb_from_netdev").unwrap().try_into().unwrap();
        let to: &SchedClassifier = ebpf.program("lb_to_netdev").unwrap().try_into().unwrap();
        // New flows: each call a flow never seen (source address and port
        // vary), so every run creates its conntrack entries.
        res.cost[0].push(rounds(n_rounds, calls, |i| {
            let src = Ipv4Addr::from(u32::from(client) + (i / 60_000) as u32);
            let f = Frame::tcp((src, 1024 + (i % 60_000) as u16), (NODE, np), SYN).bytes();
            run_once(from, &f).0
        }));
        // The flow of `est` exists once its first packet ran.
        let est = Frame::tcp((Ipv4Addr::new(192, 168, 99, 1), 40000), (NODE, np), ACK).bytes();
        let (_, out) = run_once(from, &est);
        res.cost[1].push(rounds(n_rounds, calls, |_| run_once(from, &est).0));
        // The reply of that flow from the chosen backend.
        let be = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let reply = Frame::tcp((be, 8080), (Ipv4Addr::new(192, 168, 99, 1), 40000), ACK).bytes();
        res.cost[2].push(rounds(n_rounds, calls, |_| run_once(to, &reply).0));
        res.cost[3].push(rounds(n_rounds, calls, |_| run_once(from, &other).0));
        res.cost[4].push(rounds(n_rounds, calls, |_| run_once(from, &routed).0));
        res.cost[5].push(rounds(n_rounds, calls, |_| run_once(floor_tc, &other).0));
        res.cost[6].push(rounds(n_rounds, calls, |_| run_once(xdp, &other).0));
        progress.step(&format!("per-packet cost: XDP with {n} Services"));
        let est_key = crate::packet::tcp_ct_key(
            (Ipv4Addr::new(192, 168, 99, 1), 40000),
            (NODE, np),
            lb_common::conntrack::CT_ORIGINAL,
        );
        let est_entry = rec
            .writer
            .conntrack
            .get(&est_key)
            .expect("reading the flow table")
            .expect("the established flow's entry");
        let measure = Measure::Rounds {
            rounds: n_rounds,
            calls,
        };
        let sizes = fixture::map_sizes_for(n * 10);
        for (row, cost) in xdp_rows(&dev, &pins, &sizes, np, &est_entry, measure)
            .into_iter()
            .enumerate()
        {
            res.cost[XDP_ROWS + row].push(cost);
        }
        drop(rec);
    }
    res
}

/// A device for the XDP program's FIB lookups: `eth0` in a namespace of
/// its own (its peer in another), the clients' network routed through a
/// router whose MAC address is fixed, as in the datapath tests.
struct XdpDevice {
    ns: crate::guard::Netns,
    _peer: crate::guard::Netns,
    ifindex: u32,
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);

impl XdpDevice {
    fn new() -> Self {
        let ns = crate::guard::Netns::new("bx");
        let peer = crate::guard::Netns::new("by");
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            crate::guard::run("ip", &all);
        };
        ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
        ]);
        ip(&["link", "set", "eth0", "up"]);
        ip(&["addr", "add", &format!("{NODE}/24"), "dev", "eth0"]);
        ip(&[
            "neigh",
            "add",
            &ROUTER.to_string(),
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ip(&["route", "add", "192.168.0.0/16", "via", &ROUTER.to_string()]);
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ifindex = ns
            .run(&["cat", "/sys/class/net/eth0/ifindex"])
            .trim()
            .parse()
            .expect("ifindex");
        Self {
            ns,
            _peer: peer,
            ifindex,
        }
    }
}

/// Programs `n` Services x 10 backends into the maps pinned at `pins` as
/// the agent does (the capacity the maps were made with, the SNAT range's
/// ports in the port map, the config saying the map is whole, the node's
/// own addresses); returns
/// Service 0's NodePort and the reconciler holding them.
fn program(pins: &std::path::Path, n: usize) -> (u16, Reconciler<ServiceMaps>) {
    let node = node_info(NODE);
    let svcs = cluster::services(n, 10);
    // Service 0 is NodePort 30000.
    let np = svcs[0].node_port.expect("service 0 has a NodePort");
    let desired = model::translate(&cluster::to_objects(&svcs, "node-a"), &node);
    assert!(desired.errors.is_empty(), "{:?}", desired.errors);
    let mut rec = Reconciler::adopt(ServiceMaps::open(pins).unwrap()).unwrap();
    // The capacity the maps were made with (`--lb-map-max`).
    rec.set_capacity(lbctl::agent::reconcile::Capacity {
        lb_map_max: fixture::lb_map_max_for(n * 10),
        maglev_chunks: lb_common::maps::DEFAULT_MAGLEV_CHUNKS,
    });
    rec.add_snat_ports(61000..=65535);
    rec.reconcile(&desired).expect("program the maps");
    rec.writer
        .set_config(lb_common::config::Config {
            flags: lb_common::config::CFG_PORTS,
            ..Default::default()
        })
        .expect("config");
    rec.writer
        .set_node_addrs(node.own_addrs4().0)
        .expect("node addresses");
    (np, rec)
}

/// How the XDP rows are run.
#[derive(Clone, Copy)]
enum Measure {
    /// Every row: `rounds` rounds of `calls` calls.
    Rounds { rounds: usize, calls: usize },
    /// One row (of [`XDP_PROFILE_ROWS`]) called again and again for
    /// `seconds`, for a profiler to sample; the others skipped.
    Loop { row: usize, seconds: f64 },
}

impl Measure {
    fn row(&self, row: usize, one: &mut dyn FnMut(usize) -> f64) -> (f64, f64, f64) {
        match *self {
            Measure::Rounds { rounds: n, calls } => rounds(n, calls, one),
            Measure::Loop { row: r, .. } if r != row => (0.0, 0.0, 0.0),
            Measure::Loop { seconds, .. } => {
                let t = Instant::now();
                let mut all = Vec::new();
                while t.elapsed().as_secs_f64() < seconds {
                    all.push(one(all.len()));
                }
                let n = all.len();
                let m = median(all);
                eprintln!("{}: {n} calls, median {m:.0} ns", XDP_PROFILE_ROWS[row]);
                (m, m, m)
            }
        }
    }
}

/// The XDP rows by the names `bench --only profile --row NAME` takes.
pub const XDP_PROFILE_ROWS: &[&str] = &["new", "established", "reply", "other"];

/// `bench --only profile --row NAME [--seconds S] [--services N] [--conntrack-max
/// N]`: one XDP row, N (default 1) Services x 10 backends programmed as the
/// packet part does, in a flow table of N entries (flow directions;
/// default the object's, 65,536, as the agent's `--conntrack-max`), run
/// for `seconds`
/// (new flows: each call a new one, as in the rows, so conntrack fills
/// and evicts as there) while `perf record -a` samples where the time
/// goes (with `net.core.bpf_jit_kallsyms=1` the program and the helpers
/// it calls are named).
pub fn profile(row: usize, seconds: f64, services: usize, entries: Option<u32>) {
    let dev = XdpDevice::new();
    let mut sizes = fixture::map_sizes_for(services * 10);
    if let Some(n) = entries {
        sizes.insert(
            lb_common::maps::CONNTRACK4.to_string(),
            lb_common::conntrack::ct_table_len(n),
        );
    }
    let (fs, _ebpf) = fixture::datapath_sized(&sizes);
    let pins = fs.pins();
    let (np, _rec) = program(&pins, services);
    // The established row's first call makes its flow (the rest hit it);
    // the SNATed reply's entry takes the rest of its fields from this.
    // Made now: an entry of time 0 would be expired on a machine up for
    // longer than an established flow's lifetime.
    let now = lbctl::cli::conntrack::now_s();
    let e = lb_common::conntrack::Ct4Entry {
        created_s: now,
        last_seen_s: now,
        ..Default::default()
    };
    xdp_rows(&dev, &pins, &sizes, np, &e, Measure::Loop { row, seconds });
}

/// The XDP rows for the maps pinned at `pins`, measured in the device's
/// namespace (PROG_TEST_RUN's FIB lookups are the calling thread's):
/// new flow, established flow `est` (already recorded), the reply of an
/// SNATed flow (its two entries written as the program writes them), and
/// a packet for the node's own port 22.
fn xdp_rows(
    dev: &XdpDevice,
    pins: &std::path::Path,
    sizes: &std::collections::BTreeMap<String, u32>,
    np: u16,
    est: &lb_common::conntrack::Ct4Entry,
    measure: Measure,
) -> Vec<(f64, f64, f64)> {
    use lb_common::conntrack::{CT_LIFETIME_TCP_ESTABLISHED, CT_REPLY, CT_SEEN_REPLY, CT_SNAT};
    let netns = format!("/run/netns/{}", dev.ns.name);
    let ifindex = dev.ifindex;
    let pins = pins.to_path_buf();
    let sizes = sizes.clone();
    let est = *est;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&netns).expect("netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        // The sizes the maps were made with: the object's own would
        // migrate them down (at 100,000 Services dropping addresses).
        let (mut ebpf, _) = load::load_with(&pins, false, &sizes).expect("load");
        let p: &mut Xdp = ebpf
            .program_mut("lb_xdp_from_netdev")
            .unwrap()
            .try_into()
            .unwrap();
        lbctl::datapath::load::verified(|| p.load()).expect("verifier: lb_xdp_from_netdev");
        let p: &Xdp = ebpf
            .program("lb_xdp_from_netdev")
            .unwrap()
            .try_into()
            .unwrap();
        let run = |frame: &[u8]| -> (f64, u32) {
            // `struct xdp_md`: data_end (the frame's length), ingress_ifindex.
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            let mut out = vec![0u8; frame.len() + 64];
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat: 1,
                    ..Default::default()
                })
                .expect("PROG_TEST_RUN (XDP)");
            (r.duration.as_nanos() as f64, r.return_value)
        };
        const XDP_PASS: u32 = 2;
        const XDP_TX: u32 = 3;
        let mut rows = Vec::new();
        let rounds = |row: usize, one: &mut dyn FnMut(usize) -> f64| measure.row(row, one);
        // New flows from other clients than the tc rows' (their entries
        // are still there).
        rows.push(rounds(0, &mut |i| {
            let src = Ipv4Addr::new(192, 168, 120 + (i / 60_000) as u8, 7);
            let f = Frame::tcp((src, 1024 + (i % 60_000) as u16), (NODE, np), SYN).bytes();
            let (t, v) = run(&f);
            assert_eq!(v, XDP_PASS, "XDP new flow");
            t
        }));
        let est_frame =
            Frame::tcp((Ipv4Addr::new(192, 168, 99, 1), 40000), (NODE, np), ACK).bytes();
        rows.push(rounds(1, &mut |_| {
            let (t, v) = run(&est_frame);
            assert_eq!(v, XDP_PASS, "XDP established flow");
            t
        }));
        // An SNATed flow: the client 192.168.98.1:40000 to the NodePort,
        // its backend on another node answering the node's port 62000.
        let client = Ipv4Addr::new(192, 168, 98, 1);
        let backend = Ipv4Addr::new(10, 244, 2, 11);
        let maps = ServiceMaps::open(&pins).expect("maps");
        let reply_key = crate::packet::tcp_ct_key((backend, 8080), (NODE, 62000), CT_REPLY);
        let reply_entry = lb_common::conntrack::Ct4Entry {
            nat_src_addr: lb_common::ip4(NODE.octets()),
            nat_dst_addr: lb_common::ip4(client.octets()),
            nat_src_port: np.to_be(),
            nat_dst_port: 40000u16.to_be(),
            flags: CT_SNAT | CT_SEEN_REPLY,
            lifetime_s: CT_LIFETIME_TCP_ESTABLISHED,
            packets: 0,
            bytes: 0,
            ..est
        };
        maps.conntrack
            .insert(&reply_key, &reply_entry)
            .expect("reply entry");
        let reply = Frame::tcp((backend, 8080), (NODE, 62000), ACK).bytes();
        rows.push(rounds(2, &mut |_| {
            let (t, v) = run(&reply);
            assert_eq!(v, XDP_TX, "XDP reply of an SNATed flow");
            t
        }));
        let other = Frame::tcp((Ipv4Addr::new(192, 168, 50, 7), 40000), (NODE, 22), ACK).bytes();
        rows.push(rounds(3, &mut |_| run(&other).0));
        rows
    })
    .join()
    .expect("XDP rows")
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "| packet | {} |\n|---|{}\n",
            self.sizes
                .iter()
                .map(|n| format!("{} Services (ns)", super::thousands(*n)))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(self.sizes.len())
        );
        for (name, v) in ROWS.iter().zip(&self.cost) {
            s += &format!(
                "| {name} | {} |\n",
                v.iter()
                    .map(|(m, lo, hi)| format!("{m:.0} ({lo:.0}-{hi:.0})"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        s += &format!(
            "| time to program the maps (agent translation and writes) | {} |\n",
            self.program_s
                .iter()
                .map(|t| format!("{t:.2} s"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        s += &format!(
            "| kernel memory of all maps (fdinfo memlock) | {} |\n",
            self.map_bytes
                .iter()
                .map(|b| format!("{} MiB", memory::mib(*b)))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        s
    }
}

//! `cargo xtask bench`: what one packet costs in the datapath, measured by
//! the kernel with BPF_PROG_TEST_RUN, next to programs that do nothing (the
//! floor on this machine), with 1 and 10,000 Services in the maps; and the
//! verifier's instruction count of every program as loaded.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about
//! them. `--quick` runs a small version to check it still runs.

use std::{net::Ipv4Addr, time::Instant};

use aya::{
    Ebpf,
    programs::{Program, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_tests::{
    fixture,
    guard::{Bpffs, sweep},
    packet::{ACK, Frame, SYN},
    require_root,
};
use lbctl::{agent::model::NodeInfo, datapath::load};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// `n` Services of 10 backends each; service 0 is NodePort 30080.
fn manifests_text(n: usize) -> String {
    let mut y = String::with_capacity(n * 900);
    for i in 0..n {
        let (a, b) = ((i / 250) as u8, (i % 250) as u8 + 1);
        let np = if i == 0 { "type: NodePort\n  " } else { "" };
        let port = if i == 0 { ", nodePort: 30080" } else { "" };
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  {np}clusterIP: 10.96.{a}.{b}\n  ports: [{{name: http, port: 80{port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for e in 0..10u8 {
            y += &format!(
                "- {{addresses: [10.{}.{}.{}], nodeName: node-a}}\n",
                100 + i / 65536,
                (i / 256) % 256,
                (i % 256) as u8 ^ e
            );
        }
    }
    y
}

fn tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("program")
        .try_into()
        .expect("tc program")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run_tc(p: &SchedClassifier, frame: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 64];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("PROG_TEST_RUN");
    r.duration.as_nanos() as f64
}

fn run_xdp(p: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 64];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("PROG_TEST_RUN");
    r.duration.as_nanos() as f64
}

fn main() {
    require_root();
    sweep();
    let quick = std::env::args().any(|a| a == "--quick");
    // `--agent`: only the agent's figures.
    if std::env::args().any(|a| a == "--agent") {
        control_plane(quick);
        return;
    }
    // Calls per figure (median), and distinct new flows.
    let (sizes, calls, new_flows): (&[usize], usize, u16) = if quick {
        (&[1, 100], 500, 200)
    } else {
        (&[1, 10_000], 50_000, 20_000)
    };
    println!(
        "# Datapath cost per packet (BPF_PROG_TEST_RUN, kernel-measured, one run per call, median)\n"
    );
    println!("Machine: {}\n", machine());

    let mut floor = load::load_floor().expect("floor object");
    tc(&mut floor, "floor_tc").load().unwrap();
    let x: &mut Xdp = floor.program_mut("floor_xdp").unwrap().try_into().unwrap();
    x.load().unwrap();
    let floor_tc: &SchedClassifier = floor.program("floor_tc").unwrap().try_into().unwrap();
    let xdp: &Xdp = floor.program("floor_xdp").unwrap().try_into().unwrap();

    let client = Ipv4Addr::new(192, 168, 50, 7);
    let est = Frame::tcp((client, 40000), (NODE, 30080), ACK).bytes();
    let other = Frame::tcp((client, 40000), (NODE, 22), ACK).bytes();
    let routed = Frame::tcp((client, 40000), (Ipv4Addr::new(10, 244, 9, 9), 8080), ACK).bytes();

    println!(
        "| packet | {} |",
        sizes
            .iter()
            .map(|n| format!("{n} Services (ns)"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(sizes.len()));
    let mut rows: Vec<(String, Vec<f64>)> = [
        "new flow to a NodePort (conntrack create, backend pick, DNAT)",
        "established flow (conntrack hit, DNAT)",
        "reply of a local backend (egress, reverse translation)",
        "not for a Service: node address, port 22 (passed)",
        "not for a Service: routed to a pod address (passed)",
        "floor: tc program returning TC_ACT_OK",
        "floor: XDP program returning XDP_PASS",
    ]
    .iter()
    .map(|s| (s.to_string(), vec![]))
    .collect();
    let mut insns = Vec::new();
    for (si, &n) in sizes.iter().enumerate() {
        let (fs, mut ebpf) = fixture::datapath();
        let pins = fs.pins();
        let node = NodeInfo {
            name: "node-a".into(),
            zone: None,
            addresses: vec![NODE],
            snat: None,
        };
        let t = Instant::now();
        let _rec = fixture::program(&pins, &manifests_text(n), &node);
        eprintln!(
            "{n} Services programmed in {:.2}s",
            t.elapsed().as_secs_f64()
        );
        for name in ["lb_from_netdev", "lb_to_netdev"] {
            tc(&mut ebpf, name).load().unwrap();
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
                p.load().unwrap();
            }
            for (name, p) in ebpf.programs() {
                let info = match p {
                    Program::SchedClassifier(p) => p.info(),
                    Program::CgroupSockAddr(p) => p.info(),
                    _ => continue,
                };
                if let Ok(info) = info {
                    insns.push((
                        name.to_string(),
                        info.verified_instruction_count().unwrap_or(0),
                        info.size_translated().unwrap_or(0) / 8,
                    ));
                }
            }
        }
        let from: &SchedClassifier = ebpf.program("lb_from_netdev").unwrap().try_into().unwrap();
        let to: &SchedClassifier = ebpf.program("lb_to_netdev").unwrap().try_into().unwrap();

        // One run per call on a fresh copy of the frame: PROG_TEST_RUN's
        // `repeat` reruns the program on the same, already rewritten
        // packet, which would measure the pass-through path instead.
        let once = |p: &SchedClassifier, f: &[u8]| -> f64 {
            median((0..calls).map(|_| run_tc(p, f, 1)).collect())
        };
        let mut news = Vec::new();
        for sport in 0..new_flows {
            let f = Frame::tcp((client, 1024 + sport), (NODE, 30080), SYN).bytes();
            news.push(run_tc(from, &f, 1));
        }
        rows[0].1.push(median(news));
        // The flow of `est` exists once its first packet ran.
        let mut out = vec![0u8; est.len() + 64];
        from.test_run(TestRunOptions {
            data_in: Some(&est),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap();
        rows[1].1.push(once(from, &est));
        // The reply of that flow from the chosen backend.
        let be = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let reply = Frame::tcp((be, 8080), (client, 40000), ACK).bytes();
        rows[2].1.push(once(to, &reply));
        rows[3].1.push(once(from, &other));
        rows[4].1.push(once(from, &routed));
        rows[5].1.push(once(floor_tc, &other));
        rows[6].1.push(median(
            (0..calls).map(|_| run_xdp(xdp, &other, 1)).collect(),
        ));
    }
    for (name, v) in &rows {
        println!(
            "| {name} | {} |",
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    control_plane(quick);
    println!("\n# Verifier: instructions processed, and program size, as loaded\n");
    println!("| program | verified instructions | size (instructions) |\n|---|---|---|");
    insns.sort();
    for (name, verified, size) in insns {
        println!("| {name} | {verified} | {size} |");
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The agent's side: a full sync by the real agent from the directory
/// source, its peak memory, and the cost of one EndpointSlice change.
fn control_plane(quick: bool) {
    use std::{process::Command, time::Duration};

    use lbctl::{
        agent::{model, reconcile::Reconciler, source::dir, store::Store},
        datapath::maps::ServiceMaps,
    };

    let n = if quick { 100 } else { 10_000 };
    println!("\n# Agent: directory source, {n} Services x 10 backends\n");
    // The real agent binary on a folder, in a namespace of its own.
    let ns = lb_tests::guard::Netns::new("bn");
    let cg = lb_tests::guard::Cgroup::new();
    let fs = Bpffs::new();
    let work = std::env::temp_dir().join(lb_tests::guard::unique("bw"));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("services.yaml"), manifests_text(n)).unwrap();
    // lbctl as built with this package (always the current code).
    let lbctl = std::env::current_exe().unwrap().with_file_name("lbctl-e2e");
    let log = work.join("agent.log");
    let start = Instant::now();
    let agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(&lbctl)
        .args(["agent", "--manifests"])
        .arg(&manifests)
        .arg("--bpffs")
        .arg(fs.pins())
        .arg("--cgroup")
        .arg(&cg.path)
        .args([
            "--node-name",
            "node-a",
            "--node-ip",
            "172.18.0.2",
            "--poll-ms",
            "50",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("lbctl agent (build it: cargo build -p lb-tests --bins)");
    // Killed (by its PID) even if this run panics.
    let mut agent = lb_tests::guard::Proc(agent);
    let pid = agent.0.id();
    let mut peak_kb = 0u64;
    loop {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(v) = st.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak_kb = v
                .split_whitespace()
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(peak_kb);
        }
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("first sync done")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "agent did not sync: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let full = start.elapsed();
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    println!("| figure | value |\n|---|---|");
    println!(
        "| agent start to all {n} Services in the maps (read, parse, translate, write) | {:.2} s |",
        full.as_secs_f64()
    );
    println!(
        "| agent peak RSS (VmHWM) | {:.1} MiB |",
        peak_kb as f64 / 1024.0
    );

    // One EndpointSlice change (an endpoint replaced) to its map writes,
    // as the agent handles a watch event: the store marks the Service
    // dirty, only it is translated, only the keys it touched are diffed and
    // written, on the real pinned maps.
    let objs_text = manifests_text(n);
    let objs = {
        let f = dir::parse("bench.yaml", &objs_text);
        let mut o = model::Objects::default();
        dir::merge(&mut o, &mut Default::default(), &f);
        o
    };
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
    };
    let mut store = Store::default();
    store.replace_services(objs.services.clone());
    store.replace_slices(objs.slices.clone());
    store.replace_endpoints(objs.endpoints.clone());
    let mut rec = Reconciler::adopt(ServiceMaps::open(&fs.pins()).unwrap()).unwrap();
    for c in store.take_changes(&node) {
        rec.set_service(&c.service, c.ports.unwrap()).unwrap();
    }
    rec.flush().unwrap();
    let changes = if quick { 20 } else { 200 };
    let mut lat = Vec::new();
    let mut writes = Vec::new();
    let keys: Vec<_> = objs.slices.keys().cloned().collect();
    for i in 0..changes {
        let key = keys[(i * 7919) % n].clone();
        let mut slice = (**store.objects().slices.get(&key).unwrap()).clone();
        slice.endpoints.as_mut().unwrap()[i % 10].addresses =
            vec![format!("10.250.{}.{}", i / 250, i % 250 + 1)];
        let slice = std::sync::Arc::new(slice);
        let t = Instant::now();
        store.slice(key, Some(slice));
        for c in store.take_changes(&node) {
            rec.set_service(&c.service, c.ports.unwrap()).unwrap();
        }
        let o = rec.flush().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        writes.push(o.writes as f64);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    writes.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| one EndpointSlice change to its map writes (event, translate its Service, diff, write), p50 / p99 over {changes} | {:.3} / {:.3} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "| map writes per such change, p50 / max | {} / {} |",
        percentile(&writes, 0.5),
        writes.last().unwrap()
    );
    drop(rec);
    let _ = std::fs::remove_dir_all(&work);
}

//! `cargo xtask bench`: every figure of the README's Performance section in
//! one run (see `lb_tests::bench`). Prints a Markdown report, writes it with
//! SVG plots to `target/bench/`. A benchmark, not a test: it asserts
//! nothing about the figures. `--quick` runs a small version to check it
//! still runs; `--only packet|e2e|control` runs one part; `--only agent
//! [--services N,...]` the agent alone; `--only change [--services N]` one
//! EndpointSlice change's latency; `--only profile --row new|established|
//! reply|other [--seconds S] [--services N] [--conntrack-max N]` one XDP row in a
//! loop, for a profiler.

use std::path::PathBuf;

use lb_tests::{
    bench::{self, Progress, control, e2e, machine, packet, plot},
    guard::sweep,
    kubeproxy, require_root,
};

fn main() -> anyhow::Result<()> {
    require_root();
    sweep();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].as_str())
        .collect();
    let wants = |part: &str| only.is_empty() || only.contains(&part);
    let out_dir = args
        .windows(2)
        .find(|w| w[0] == "--out")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| {
            std::env::current_exe()
                .unwrap()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("bench")
        });

    // `--only profile --row new|established|reply|other [--seconds S]
    // [--services N] [--conntrack-max N]`: one XDP row in a loop, for `perf record
    // -a` (see `packet::profile`), with N Services x 10 backends in the
    // maps and a flow table of N entries (flow directions).
    if only.contains(&"profile") {
        let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
        let row = arg("--row").unwrap_or_else(|| "new".into());
        let Some(row) = packet::XDP_PROFILE_ROWS.iter().position(|r| *r == row) else {
            anyhow::bail!("--row {row}: one of {:?}", packet::XDP_PROFILE_ROWS);
        };
        let seconds = arg("--seconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(10.0);
        let services = services_arg(&args)
            .map(|n| {
                n.parse::<usize>()
                    .map_err(|e| anyhow::anyhow!("--services {n}: {e}"))
            })
            .transpose()?
            .unwrap_or(1);
        let entries = arg("--conntrack-max")
            .map(|n| {
                n.parse::<u32>()
                    .map_err(|e| anyhow::anyhow!("--conntrack-max {n}: {e}"))
            })
            .transpose()?;
        packet::profile(row, seconds, services, entries);
        return Ok(());
    }
    let mut progress = Progress::new();
    let pkt = wants("packet").then(|| packet::run(quick, &mut progress));
    let e2e = wants("e2e").then(|| e2e::run(quick, &mut progress));
    // The control plane reuses the end-to-end part's rule loads (an nft -f of
    // 10,000 Services takes minutes here).
    let ctl = wants("control").then(|| control::run(quick, e2e.as_ref(), &mut progress));
    // `--only agent`: the agent alone at 1,000 / 10,000 / 100,000 Services
    // (start to all in the maps, peak RSS), for working on its memory.
    // `--only change`: one EndpointSlice change among 10,000 Services (or
    // `--services N`), p50 and p99 over 200, as the control part measures.
    if only.contains(&"change") {
        let n = services_arg(&args)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 100 } else { 10_000 });
        let count = if quick { 20 } else { 200 };
        progress.step(&format!("{count} EndpointSlice changes among {n} Services"));
        let (lat, writes) = control::changes(n, count);
        println!(
            "one EndpointSlice change among {n} Services: p50 {:.3} ms, p99 {:.3} ms over {count}; map writes p50 {}, max {}",
            bench::percentile(&lat, 0.5),
            bench::percentile(&lat, 0.99),
            bench::percentile(&writes, 0.5),
            writes.last().unwrap()
        );
        return Ok(());
    }
    // `--only api [--services N]`: the agent on a real API server holding
    // 10,000 Services (or N), start to all in the maps.
    if only.contains(&"api") {
        let n = services_arg(&args)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 100 } else { 10_000 });
        progress.step(&format!(
            "{n} Services in a real API server, then the agent"
        ));
        let (a, load_s) = control::api_run(n);
        println!(
            "agent on the API ({n} Services x 10 endpoints, loaded in {load_s:.0} s): start to all in the maps {:.2} s (translate {:.2} s, write {:.2} s), peak RSS {:.1} MiB",
            a.full_sync_s,
            a.translate_s,
            a.write_s,
            a.peak_rss_kib as f64 / 1024.0
        );
        return Ok(());
    }
    if only.contains(&"agent") {
        // `--services 10000,...`: only these sizes.
        let given: Option<Vec<usize>> =
            services_arg(&args).map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect());
        let sizes: &[usize] = match &given {
            Some(v) => v,
            None if quick => &[100],
            None => &[1_000, 10_000, 100_000],
        };
        println!(
            "| Services x 10 endpoints | start to all in the maps | of it: translate | of it: write | peak RSS (VmHWM) |\n|---|---|---|---|---|"
        );
        let row = |n: usize, what: &str, a: &control::AgentRun| {
            println!(
                "| {n}{what} | {:.2} s | {:.2} s | {:.2} s | {:.1} MiB |",
                a.full_sync_s,
                a.translate_s,
                a.write_s,
                a.peak_rss_kib as f64 / 1024.0
            )
        };
        let mut runs = Vec::new();
        for &n in sizes {
            progress.step(&format!("agent alone: {n} Services, then restarted"));
            let (a, again) = control::agent_runs(n, true);
            row(n, "", &a);
            if let Some(b) = &again {
                row(n, ", restarted on its pinned maps", b);
            }
            runs.push((a, again));
        }
        if runs.len() > 1 {
            for f in plot::write_agent(&out_dir, &runs)? {
                eprintln!("plot: {}", out_dir.join(f).display());
            }
        }
        return Ok(());
    }

    let mut r = format!(
        "# Benchmark{}\n\nMachine: {}. Run took {:.0} s.\n",
        if quick {
            " (quick: sizes and durations cut, figures not meaningful)"
        } else {
            ""
        },
        machine(),
        progress.elapsed_s()
    );
    if let Some(e) = &e2e {
        r += &format!(
            "\n## End to end: direct, this datapath, kube-proxy iptables and nftables\n\nkube-proxy recreated from {}.\n{}",
            kubeproxy::SOURCE,
            e.markdown()
        );
    }
    if let Some(p) = &pkt {
        r += &format!(
            "\n## Per-packet cost (BPF_PROG_TEST_RUN, kernel-measured, one run per call; median of round medians, (min-max) of the rounds)\n\n{}",
            p.markdown()
        );
        r += "\nKernel memory per map at the largest size (fdinfo memlock):\n\n| map | MiB |\n|---|---|\n";
        for (m, b) in &p.maps_largest {
            r += &format!("| {m} | {} |\n", bench::memory::mib(*b));
        }
        r += "\nVerifier: instructions processed, and program size, as loaded:\n\n| program | verified instructions | size (instructions) |\n|---|---|---|\n";
        for (name, verified, size) in &p.insns {
            r += &format!("| {name} | {verified} | {size} |\n");
        }
    }
    if let Some(c) = &ctl {
        r += &format!("\n## Control plane and memory\n\n{}", c.markdown());
    }
    let plots = plot::write(&out_dir, pkt.as_ref(), e2e.as_ref())?;
    if !plots.is_empty() {
        r += "\nPlots: ";
        r += &plots
            .iter()
            .map(|p| format!("`{}`", out_dir.join(p).display()))
            .collect::<Vec<_>>()
            .join(", ");
        r += "\n";
    }
    std::fs::write(out_dir.join("results.md"), &r)?;
    print!("{r}");
    eprintln!("report and plots in {}", out_dir.display());
    Ok(())
}

/// The value of `--services` (`N` or `N,M,...`), if given.
fn services_arg(args: &[String]) -> Option<&str> {
    args.windows(2)
        .find(|w| w[0] == "--services")
        .map(|w| w[1].as_str())
}

//! `cargo xtask e2e`: the upstream Kubernetes e2e suite (`e2e.test`, built
//! from the pinned release) against real nodes with the agent installed by
//! its Helm chart and no kube-proxy. Runs the `[sig-network]` focus of
//! issue #15 (or `--focus`), prints each test's result and, with
//! `--report FILE`, writes the results table (docs/e2e.md).
//!
//! `--passing` runs only the tests listed in tests/cluster/e2e-passing.txt
//! and fails unless every one of them passes (the layer `cargo xtask test`
//! runs); `--write-passing` rewrites that list from the run.
//!
//! `--quick` (with `--passing`) leaves out the listed tests marked
//! `[Slow]`, `[Serial]` or `[Disruptive]` (what CI's time allows).
//!
//! `--tests FILE` runs the tests named in FILE (one full name a line, as
//! in the passing list), e.g. those a stopped run did not reach.
//!
//! Usage: e2e [--focus REGEX] [--skip REGEX] [--passing] [--tests FILE]
//!            [--write-passing] [--report FILE] [--procs N] [--nodes N]
//!            [--keep-logs]
//!
//! `--nodes 6` (default 3) runs two nodes in each of the three zones, as
//! Traffic Distribution's zone tests want.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    controlplane::{self, kubernetes_version},
    e2e::{self, Outcome},
    nodes::NodeCluster,
    topo::lbctl_binary,
};

struct Args {
    focus: String,
    skip: String,
    report: Option<PathBuf>,
    /// The listed tests only, each of which must pass.
    passing: Option<Vec<String>>,
    write_passing: bool,
    /// Parallel test processes.
    procs: usize,
    /// `--tests FILE`: the file, for the report's command line.
    tests: Option<String>,
    /// Nodes of the cluster (3; 6 for Traffic Distribution's zone tests).
    nodes: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        focus: e2e::FOCUS.to_string(),
        skip: e2e::skip_regex(),
        report: None,
        passing: None,
        write_passing: false,
        procs: 3,
        tests: None,
        nodes: lb_tests::nodes::DEFAULT_NODES,
    };
    let mut quick = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--focus" => args.focus = it.next().context("--focus REGEX")?,
            "--skip" => args.skip = it.next().context("--skip REGEX")?,
            "--report" => args.report = Some(it.next().context("--report FILE")?.into()),
            "--passing" => {
                let names = e2e::read_passing(&e2e::passing_list())?;
                args.focus = e2e::focus_of(&names);
                args.passing = Some(names);
            }
            "--quick" => quick = true,
            "--tests" => {
                let file = it.next().context("--tests FILE")?;
                args.focus = e2e::focus_of(&e2e::read_passing(std::path::Path::new(&file))?);
                args.tests = Some(file);
            }
            "--write-passing" => args.write_passing = true,
            "--procs" => args.procs = it.next().context("--procs N")?.parse()?,
            "--nodes" => args.nodes = it.next().context("--nodes N")?.parse()?,
            "--keep-logs" => {
                // SAFETY: single-threaded at this point.
                unsafe { std::env::set_var("LB_KEEP_CLUSTER_LOGS", "1") };
            }
            other => bail!(
                "unknown argument {other}; usage: e2e [--focus RE] [--skip RE] [--passing [--quick]] \
                 [--tests FILE] [--write-passing] [--report FILE] [--procs N] [--nodes N] [--keep-logs]"
            ),
        }
    }
    // The whole passing list wants six nodes when it holds a test that
    // does (the quick subset leaves those out).
    if !quick
        && args
            .passing
            .as_ref()
            .is_some_and(|n| n.iter().any(|n| e2e::needs_six_nodes(n)))
    {
        args.nodes = args.nodes.max(6);
    }
    if quick {
        let names = args
            .passing
            .take()
            .context("--quick narrows --passing")?
            .into_iter()
            .filter(|n| e2e::is_quick(n))
            .collect::<Vec<_>>();
        args.focus = e2e::focus_of(&names);
        args.passing = Some(names);
    }
    Ok(args)
}

fn main() -> Result<()> {
    lb_tests::require_root();
    let args = parse_args()?;
    let started = Instant::now();
    let lbctl = lbctl_binary();
    let mut cluster = NodeCluster::start_with(&lbctl, args.nodes);
    cluster.start_load_balancer(&lbctl.with_file_name("lb-cloud"));
    let up = started.elapsed();
    // In kube-system with kube-proxy's pod label: upstream's "should work
    // after restarting kube-proxy" deletes the pods labelled
    // k8s-app=kube-proxy there and checks that Services still work, so it
    // restarts the agent (it skips itself where there are none).
    cluster.install_agent_in("kube-system", &["podLabels.k8s-app=kube-proxy"]);
    cluster.install_dns();
    let ready = started.elapsed();
    eprintln!(
        "==> cluster up in {:.0}s (nodes Ready), agent and DNS ready at {:.0}s",
        up.as_secs_f64(),
        ready.as_secs_f64()
    );
    let json = cluster.work.join("e2e-report.json");
    let log = cluster.work.join("e2e.log");
    let e2e_args = e2e::suite_args(
        &controlplane::bin("e2e.test"),
        &cluster.cp.admin_kubeconfig(),
        &json,
        &args.focus,
        &args.skip,
        args.procs,
        args.nodes,
    );
    eprintln!("==> ginkgo {} (log: {})", e2e_args.join(" "), log.display());
    let run_start = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cluster.cp.netns.name))
        .arg(controlplane::bin("ginkgo"))
        .args(&e2e_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("e2e.test")?;
    let stderr = child.stderr.take().expect("stderr");
    let err_log = log.with_extension("stderr");
    let err_thread = std::thread::spawn(move || {
        let mut f = std::fs::File::create(err_log).expect("stderr log");
        let _ = std::io::copy(&mut BufReader::new(stderr), &mut f);
    });
    let mut out = std::fs::File::create(&log).context("e2e log")?;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.unwrap_or_default();
        use std::io::Write;
        let _ = writeln!(out, "{line}");
        // Progress: one line per finished test.
        if line.starts_with("• [") || line.contains("[FAILED]") && line.starts_with('•') {
            eprintln!("    {line}");
        }
    }
    let status = child.wait()?;
    let _ = err_thread.join();
    let took = run_start.elapsed();
    let results = e2e::read_report(&json)?;
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for r in &results {
        *counts.entry(r.outcome).or_default() += 1;
        if r.outcome == Outcome::Failed {
            eprintln!(
                "FAILED: {}\n    {}",
                r.name,
                r.failure.lines().next().unwrap_or("")
            );
        }
    }
    eprintln!(
        "==> e2e.test exited {status} after {:.0} min: {counts:?}",
        took.as_secs_f64() / 60.0
    );
    if let Some(path) = &args.report {
        let command = format!(
            "cargo xtask e2e{}{}",
            if args.nodes == lb_tests::nodes::DEFAULT_NODES {
                String::new()
            } else {
                format!(" --nodes {}", args.nodes)
            },
            match &args.tests {
                Some(file) => format!(" --tests {file}"),
                None if args.focus == e2e::FOCUS => String::new(),
                None => format!(" --focus '{}'", args.focus),
            }
        );
        // Merged into the report there: rows of tests not run this time
        // stay, with their run's date.
        let previous = std::fs::read_to_string(path).unwrap_or_default();
        let text = e2e::report(
            &previous,
            &results,
            &kubernetes_version(),
            &command,
            up,
            ready,
            took,
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("==> wrote {}", path.display());
    }
    if args.write_passing {
        let mut text = String::from(
            "# The upstream e2e tests that pass here (written by `cargo xtask e2e \
             --write-passing`, from the report's rows when given --report); `cargo xtask \
             test` runs those not marked [Slow], [Serial] or [Disruptive] and fails if one \
             stops passing; `cargo xtask e2e --passing` runs them all.\n",
        );
        // With a report, the merged rows of every run: the list is what
        // the table says passes.
        let passed: Vec<String> = match &args.report {
            Some(path) => {
                let (rows, _) = e2e::parse_report(&std::fs::read_to_string(path)?);
                rows.into_iter()
                    .filter(|(_, r)| r.result == "pass")
                    .map(|(n, _)| n)
                    .collect()
            }
            None => results
                .iter()
                .filter(|r| r.outcome == Outcome::Passed)
                .map(|r| r.name.clone())
                .collect(),
        };
        for name in passed {
            text.push_str(&name);
            text.push('\n');
        }
        std::fs::write(e2e::passing_list(), text)?;
        eprintln!("==> wrote {}", e2e::passing_list().display());
    }
    drop(cluster);
    if let Some(names) = &args.passing {
        let passed: std::collections::BTreeSet<&str> = results
            .iter()
            .filter(|r| r.outcome == Outcome::Passed)
            .map(|r| r.name.as_str())
            .collect();
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !passed.contains(n.as_str()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} listed e2e tests did not pass: {missing:#?}",
                missing.len()
            );
        }
        eprintln!("==> all {} listed e2e tests passed", names.len());
        return Ok(());
    }
    let failed = counts.get(&Outcome::Failed).copied().unwrap_or(0);
    if failed > 0 || !status.success() {
        bail!("{failed} e2e tests failed (e2e.test exited {status})");
    }
    Ok(())
}

//! Project tasks. `cargo xtask demo` and `cargo xtask test` are the two
//! commands a fresh machine needs; each runs the set-up first.

mod gobuild;
mod lint;
mod setup;
mod sh;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools (idempotent; seconds when done).
    Setup,
    /// Build lbctl with its embedded eBPF datapath (release).
    Build,
    /// Set up, then run every test layer that can run here.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo in network namespaces.
    Demo,
    /// Lint what users install: shell scripts (shellcheck), workflows
    /// (GitHub's schema), deploy/Dockerfile (hadolint), the Helm chart
    /// (helm lint; its objects must be deploy/'s).
    Lint,
    /// A real Kubernetes control plane built from upstream (tests/cluster).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Set up, build, start two real nodes (kubelet, containerd) with the
    /// agent installed by its chart, and run the upstream e2e suite's
    /// `[sig-network]` Service tests (`--report docs/e2e.md` writes the
    /// results table).
    E2e {
        /// Arguments for the runner: --focus REGEX, --skip REGEX,
        /// --report FILE, --keep-logs.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and print datapath cost figures (not a test).
    Bench {
        /// A small run that only checks the benchmark still works.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Rewrite tests/cluster/kubernetes/go.mod for a release (replaces of
    /// every staging module from the release's own go.mod) and tidy it.
    Gomod {
        /// The k8s.io/kubernetes release, e.g. v1.37.2.
        version: String,
    },
    /// Build (or find cached) etcd, the control plane, kubectl and helm.
    Build,
    /// Start etcd, kube-apiserver, kube-controller-manager and
    /// kube-scheduler in a network namespace of their own and print how to
    /// reach them; they run on until `down`.
    Up,
    /// Stop the cluster `up` started (by PID) and remove its folder.
    Down,
    /// Show whether the cluster runs and what it serves.
    Status,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => {
            setup::run()?;
            gobuild::build_all()
        }
        Task::Build => {
            setup::run()?;
            build()
        }
        Task::Test { no_lint, args } => {
            setup::run()?;
            // The control plane the cluster tests run against, and helm.
            gobuild::build_all()?;
            test(!no_lint, &args)
        }
        Task::Bench { quick } => {
            setup::run()?;
            // The bench runs the agent binary built beside it.
            sh::step(
                "build (release)",
                sh::cargo(&["build", "--release", "--quiet", "-p", "lb-tests", "--bins"]),
            )?;
            let args: &[&str] = if quick { &["--quick"] } else { &[] };
            sh::step("bench", release_bin("bench", args))
        }
        Task::E2e { args } => {
            setup::run()?;
            gobuild::build_all()?;
            // The agent's image is made from the release lbctl, which the
            // runner finds beside itself.
            sh::step(
                "build (release)",
                sh::cargo(&[
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "lbctl",
                    "-p",
                    "lb-tests",
                    "--bins",
                ]),
            )?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sh::step("e2e", release_bin("e2e", &args))
        }
        Task::Lint => {
            gobuild::build_all()?;
            lint::run(Some(&gobuild::bin_dir().join("helm")))
        }
        Task::Cluster { action } => match action {
            ClusterAction::Gomod { version } => gobuild::generate_kubernetes_gomod(&version),
            ClusterAction::Build => gobuild::build_all(),
            ClusterAction::Up | ClusterAction::Down | ClusterAction::Status => {
                setup::run()?;
                gobuild::build_all()?;
                let verb = match action {
                    ClusterAction::Up => "up",
                    ClusterAction::Down => "down",
                    _ => "status",
                };
                sh::step(&format!("cluster {verb}"), release_bin("cluster", &[verb]))
            }
        },
        Task::Demo => {
            setup::run()?;
            build()?;
            sh::step("demo", release_bin("demo", &[]))
        }
    }
}

/// `cargo run --release` of one of lb-tests' binaries (demo, bench,
/// cluster) with `args`.
fn release_bin(bin: &str, args: &[&str]) -> std::process::Command {
    let mut c = sh::cargo(&[
        "run",
        "--release",
        "--quiet",
        "-p",
        "lb-tests",
        "--bin",
        bin,
    ]);
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    c
}

fn build() -> Result<()> {
    sh::step(
        "build lbctl (release, eBPF embedded)",
        sh::cargo(&["build", "--release", "-p", "lbctl"]),
    )
}

/// lb-ebpf is no default member (it builds only for bpfel-unknown-none):
/// it is linted for its own target with the nightly the build uses.
fn clippy_ebpf() -> Result<()> {
    if !setup::nightly_route() {
        eprintln!(
            "    clippy lb-ebpf: skipped (the eBPF build takes Debian's rustc-web route here, which has no clippy)"
        );
        return Ok(());
    }
    if !setup::nightly_clippy() {
        anyhow::bail!("clippy for the nightly could not be installed to lint lb-ebpf");
    }
    let mut c = std::process::Command::new("rustup");
    c.current_dir(gobuild::root().join("lb-ebpf")).args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--all-targets",
        "--target-dir",
        "../target/clippy-ebpf",
        "--",
        "-D",
        "warnings",
    ]);
    sh::step(
        "cargo clippy lb-ebpf (bpfel-unknown-none) -- -D warnings",
        c,
    )
}

fn test(lint: bool, extra: &[String]) -> Result<()> {
    if lint {
        sh::step("cargo fmt --check", sh::cargo(&["fmt", "--all", "--check"]))?;
        // Clippy builds lbctl without the datapath (the documented skip
        // switch) in its own target folder, so the test build's eBPF object
        // is not rebuilt twice.
        let mut clippy = sh::cargo(&[
            "clippy",
            "--all-targets",
            "--target-dir",
            "target/clippy",
            "--",
            "-D",
            "warnings",
        ]);
        clippy.env("LB_SKIP_EBPF", "1");
        sh::step("cargo clippy --all-targets -- -D warnings", clippy)?;
        clippy_ebpf()?;
        lint::run(Some(&gobuild::bin_dir().join("helm")))?;
    }
    let mut args = vec!["test", "--workspace"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let counts = sh::tests(
        "cargo test --workspace (unit, datapath, end-to-end)",
        sh::cargo(&args),
    )?;
    if extra.is_empty() {
        // The benchmark is no test: a short run only checks it still works.
        sh::step(
            "bench --quick (checks the benchmark runs; figures are not judged)",
            sh::cargo(&[
                "run", "--quiet", "-p", "lb-tests", "--bin", "bench", "--", "--quick",
            ]),
        )?;
    }
    let mut e2e_passed = 0;
    if extra.is_empty() {
        // The upstream e2e tests that pass on real nodes
        // (tests/cluster/e2e-passing.txt): each must still pass.
        sh::step(
            "build lbctl, the e2e runner and lb-cloud",
            sh::cargo(&[
                "build", "--quiet", "-p", "lbctl", "-p", "lb-tests", "--bins",
            ]),
        )?;
        sh::step(
            "upstream e2e: the passing [sig-network] tests on real nodes",
            sh::cargo(&[
                "run",
                "--quiet",
                "-p",
                "lb-tests",
                "--bin",
                "e2e",
                "--",
                "--passing",
                // The listed tests but the slow, serial and disruptive
                // ones (minutes each): `cargo xtask e2e --passing` runs
                // them all.
                "--quick",
                // One process, as the list was made: with three on two
                // cores, "Conntrack should be able to preserve UDP traffic
                // when server pod cycles for a ClusterIP service with
                // InternalTrafficPolicy set to Local" failed once (to be
                // understood, issue #15).
                "--procs",
                "1",
            ]),
        )?;
        e2e_passed = passing_count()?;
    }
    println!(
        "summary: {} passed, {} failed, {} skipped; upstream e2e: {e2e_passed} passed",
        counts.passed, counts.failed, counts.ignored
    );
    Ok(())
}

/// The number of upstream e2e tests of the passing list CI runs.
fn passing_count() -> Result<usize> {
    let path = gobuild::root().join("tests/cluster/e2e-passing.txt");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    // As the runner's --quick: the slow, serial and disruptive ones are
    // left to `cargo xtask e2e --passing`.
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter(|l| {
            !["[Slow]", "[Serial]", "[Disruptive]"]
                .iter()
                .any(|m| l.contains(m))
                // Two nodes in each of three zones: six, not CI's three.
                && !l.starts_with("[sig-network] Traffic Distribution should route traffic correctly between pods on multiple nodes")
                && !l.starts_with("[sig-network] Traffic Distribution should route traffic to an endpoint on the same node or fall back to same zone")
        })
        .count())
}

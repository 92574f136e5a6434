//! Installs what building and testing need, on a fresh Debian machine of
//! this project's kind or a developer laptop. Idempotent: every step checks
//! first, so a second run takes seconds. Says what it does and what failed.
//!
//! eBPF toolchain route, chosen automatically:
//! 1. rustup's nightly with `rust-src` (`-Z build-std=core`), the usual aya
//!    route, where rustup can install it;
//! 2. otherwise Debian's `rustc-web` + `libstd-rust-web-dev-bpf`, whose
//!    precompiled `core` for bpfel-unknown-none needs no build-std.
//!
//! bpf-linker is built against LLVM 22 (`llvm-22-dev`) when none is found.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};

use crate::sh;

/// Debian packages for building (LLVM for bpf-linker) and for the tests
/// (iproute2 for namespaces, python3 for HTTP and UDP servers and clients,
/// curl as a client, PostgreSQL for the external-service tests) and the
/// benchmark (nginx backends, wrk as the client, iptables and nftables for
/// kube-proxy's recreated rule sets), and for the real nodes: libseccomp
/// for runc's RuntimeDefault profile, umoci to make the OCI images the
/// nodes run, busybox for the upstream tests' busybox image and the tools
/// upstream's agnhost image has (netcat-openbsd, socat, dig; GNU wget,
/// since Debian's busybox wget crashes on `-T`, which the tests use;
/// conntrack for the image of kube-proxy's tests), ethtool for the
/// XDP end-to-end tests' checksum and GRO settings, and hping3 for the
/// SYN flood of the flood protection's end-to-end test.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "curl",
    "python3",
    "postgresql",
    "nginx-light",
    "wrk",
    "iptables",
    "nftables",
    "libseccomp-dev",
    "umoci",
    "busybox",
    "wget",
    "conntrack",
    "netcat-openbsd",
    "socat",
    "bind9-dnsutils",
    "ethtool",
    "hping3",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn run() -> Result<()> {
    let start = Instant::now();
    eprintln!("==> set-up");
    apt(PACKAGES)?;
    let route = ebpf_route()?;
    bpf_linker()?;
    bpffs()?;
    cgroup2()?;
    eprintln!(
        "==> set-up: done in {:.1}s (eBPF route: {route})",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn installed(pkg: &str) -> bool {
    sh::output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("    packages: all present");
        return Ok(());
    }
    eprintln!("    packages: installing {}", missing.join(" "));
    let mut update = std::process::Command::new("apt-get");
    update.args(["update", "-qq"]);
    sh::step("apt-get update", update)?;
    let mut install = std::process::Command::new("apt-get");
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
    ]);
    install.args(&missing);
    sh::step(&format!("apt-get install {}", missing.join(" ")), install)
}

/// bpf-linker is built against this LLVM; it cannot read bitcode from a
/// newer one ("Invalid record"), so a nightly whose LLVM is newer cannot be
/// used. lbctl's build.rs makes the same check.
const LINKER_LLVM: u32 = 22;

/// The LLVM major version of rustup's nightly, if it is installed.
fn nightly_llvm() -> Option<u32> {
    let v = sh::output("rustup", &["run", "nightly", "rustc", "-vV"])?;
    v.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
}

fn nightly_rust_src() -> bool {
    let Some(sysroot) = sh::output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
    else {
        return false;
    };
    PathBuf::from(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

/// True when lb-ebpf builds with rustup's nightly (the route lbctl's
/// build.rs takes first): its LLVM is bpf-linker's or older and rust-src
/// is there.
pub fn nightly_route() -> bool {
    nightly_llvm().is_some_and(|l| l <= LINKER_LLVM) && nightly_rust_src()
}

/// Clippy for the nightly, to lint lb-ebpf for its own target. Added when
/// missing (rustup's component, no new nightly).
pub fn nightly_clippy() -> bool {
    let has = || {
        sh::ok(
            "rustup",
            &["run", "nightly", "cargo", "clippy", "--version"],
        )
    };
    if has() {
        return true;
    }
    let mut c = std::process::Command::new("rustup");
    c.args(["component", "add", "clippy", "--toolchain", "nightly"]);
    sh::step("rustup component add clippy (nightly)", c).is_ok() && has()
}

fn debian_bpf_core() -> bool {
    sh::output("/usr/bin/rustc", &["--print", "sysroot"]).is_some_and(|s| {
        PathBuf::from(s.trim())
            .join("lib/rustlib/bpfel-unknown-none")
            .exists()
    })
}

/// Returns the route taken: the same test lbctl's build.rs makes. The
/// installed nightly is used as it is (never updated: a newer nightly may
/// carry an LLVM the linker cannot read); otherwise Debian's rustc-web.
fn ebpf_route() -> Result<&'static str> {
    match nightly_llvm() {
        Some(llvm) if llvm <= LINKER_LLVM => {
            if nightly_rust_src() {
                eprintln!("    eBPF toolchain: nightly (LLVM {llvm}) with rust-src present");
                return Ok("nightly + build-std");
            }
            eprintln!("    eBPF toolchain: adding rust-src to the installed nightly");
            let mut c = std::process::Command::new("rustup");
            c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
            match sh::step("rustup component add rust-src", c) {
                Ok(()) if nightly_rust_src() => return Ok("nightly + build-std"),
                Ok(()) => eprintln!("    rust-src still missing; trying Debian's route"),
                Err(e) => eprintln!("    no rust-src ({e:#}); trying Debian's route"),
            }
        }
        Some(llvm) => eprintln!(
            "    eBPF toolchain: the installed nightly uses LLVM {llvm}, newer than bpf-linker's {LINKER_LLVM}; using Debian's route"
        ),
        None => eprintln!("    eBPF toolchain: no rustup nightly; using Debian's route"),
    }
    if debian_bpf_core() {
        eprintln!("    eBPF toolchain: Debian rustc-web with the BPF core present");
        return Ok("debian rustc-web");
    }
    apt(&["rustc-web", "libstd-rust-web-dev-bpf"])?;
    if debian_bpf_core() {
        return Ok("debian rustc-web");
    }
    bail!(
        "no eBPF toolchain: neither a rustup nightly with LLVM <= {LINKER_LLVM} and rust-src nor Debian's rustc-web + libstd-rust-web-dev-bpf could be installed"
    )
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin("bpf-linker");
    if sh::ok(bin.to_str().unwrap_or("bpf-linker"), &["--version"])
        || sh::ok("bpf-linker", &["--version"])
    {
        eprintln!("    bpf-linker: present");
        return Ok(());
    }
    eprintln!("    bpf-linker: building against LLVM 22 (about a minute)");
    let mut c = sh::cargo(&[
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    c.env("PATH", path);
    sh::step("cargo install bpf-linker", c)
}

fn bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .context("reading /proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    if mounted {
        eprintln!("    bpffs: mounted");
        return Ok(());
    }
    eprintln!("    bpffs: mounting at /sys/fs/bpf");
    let mut c = std::process::Command::new("mount");
    c.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    sh::step("mount bpffs", c)
}

fn cgroup2() -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if let Some(line) = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        eprintln!(
            "    cgroup v2: {}",
            line.split_whitespace().nth(1).unwrap_or("?")
        );
        return Ok(());
    }
    bail!(
        "no cgroup v2 mount: the socket-level datapath needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )
}

//! Builds the kernel programs (`lb-ebpf`) for `bpfel-unknown-none` and leaves
//! the objects in OUT_DIR, where `lbctl` embeds them. Cargo reruns this when
//! anything under lb-ebpf or lb-common changes, so `lbctl` never ships a stale
//! datapath.
//!
//! Two toolchain routes, chosen automatically (or by `LB_EBPF_ROUTE`):
//! - `nightly`: rustup's nightly with `rust-src`, `-Z build-std=core`;
//! - `debian`: Debian's `rustc-web` with `libstd-rust-web-dev-bpf`, whose
//!   precompiled `core` for the BPF target needs no build-std.
//!
//! Skip switch: `LB_SKIP_EBPF=1` (or aya's `AYA_BUILD_SKIP=1`) writes empty
//! objects, so `cargo check`/`clippy` work without the eBPF toolchain; such a
//! `lbctl` refuses to load the datapath with a clear error.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const OBJECTS: &[&str] = &["lb", "floor"];
const TARGET: &str = "bpfel-unknown-none";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    for var in ["LB_SKIP_EBPF", "AYA_BUILD_SKIP", "LB_EBPF_ROUTE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest_dir.parent().expect("workspace root").to_path_buf();
    println!("cargo:rerun-if-changed={}", root.join("lb-ebpf").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lb-common").display()
    );

    if skip() {
        println!("cargo:warning=LB_SKIP_EBPF set: lbctl is built without its eBPF datapath");
        for o in OBJECTS {
            fs::write(out_dir.join(format!("{o}.bpf.o")), []).expect("write empty object");
        }
        return;
    }

    let route = match env::var("LB_EBPF_ROUTE").ok().as_deref() {
        Some("nightly") => Route::Nightly,
        Some("debian") => Route::Debian,
        Some(other) => fail(&format!(
            "LB_EBPF_ROUTE={other}: expected nightly or debian"
        )),
        None => Route::detect().unwrap_or_else(|| {
            fail(
                "no eBPF toolchain: neither rustup nightly with rust-src nor Debian's \
                 rustc-web with libstd-rust-web-dev-bpf is installed. Run `cargo xtask setup`, \
                 or set LB_SKIP_EBPF=1 to build without the datapath.",
            )
        }),
    };

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = route.cargo();
    cmd.current_dir(&root).args([
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
        "--release",
        "--target",
        TARGET,
        "--target-dir",
    ]);
    cmd.arg(&target_dir);
    // The host build's settings must not leak into the BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    // `--disable-expand-memcpy-in-order`: with LLVM 22's BPF backend,
    // bpf-linker's default `-bpf-expand-memcpy-in-order` also stops
    // constant-size memsets (a zeroed struct, `[0; 3]` padding) from being
    // expanded into stores: each became a call to compiler_builtins'
    // byte-at-a-time `memset` (37 in the device path), slower per packet
    // and a loop the verifier walks byte by byte. Without it llc expands
    // them, as clang's BPF builds do.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!(
            "--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--disable-expand-memcpy-in-order\x1f-Clink-arg=--export=lb_ct_find,lb_ct_create,lb_ct_reserve_snat_port,lb_ct_remove"
        ),
    );
    cmd.env("PATH", path_with_linker());
    route.configure(&mut cmd);

    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("running {cmd:?}: {e}")));
    if !status.success() {
        fail(&format!(
            "building lb-ebpf failed ({status}) with route {route:?}: {cmd:?}"
        ));
    }
    for o in OBJECTS {
        let built = target_dir.join(TARGET).join("release").join(o);
        fs::copy(&built, out_dir.join(format!("{o}.bpf.o")))
            .unwrap_or_else(|e| fail(&format!("copying {}: {e}", built.display())));
    }
}

fn skip() -> bool {
    ["LB_SKIP_EBPF", "AYA_BUILD_SKIP"]
        .iter()
        .any(|v| matches!(env::var(v).as_deref(), Ok("1") | Ok("true") | Ok("TRUE")))
}

#[derive(Debug, Clone, Copy)]
enum Route {
    Nightly,
    Debian,
}

impl Route {
    fn detect() -> Option<Self> {
        if nightly_has_rust_src() && nightly_llvm().is_some_and(|v| v <= LINKER_LLVM) {
            Some(Self::Nightly)
        } else if debian_has_bpf_core() {
            Some(Self::Debian)
        } else {
            None
        }
    }

    fn cargo(self) -> Command {
        match self {
            Self::Nightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo"]);
                c
            }
            Self::Debian => Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into())),
        }
    }

    fn configure(self, cmd: &mut Command) {
        match self {
            Self::Nightly => {
                cmd.args(["-Z", "build-std=core"]);
            }
            Self::Debian => {
                cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
            }
        }
    }
}

/// bpf-linker is built against LLVM 22 and cannot read bitcode from a
/// newer LLVM; a nightly with a newer one is not used (xtask's set-up makes
/// the same check).
const LINKER_LLVM: u32 = 22;

fn nightly_llvm() -> Option<u32> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn debian_has_bpf_core() -> bool {
    let Ok(out) = Command::new(DEBIAN_RUSTC)
        .args(["--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .exists()
}

/// bpf-linker lives in cargo's bin folder and needs LLVM 22's libraries.
fn path_with_linker() -> String {
    let mut parts = vec!["/usr/lib/llvm-22/bin".to_string()];
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string()))
    {
        parts.push(PathBuf::from(home).join("bin").display().to_string());
    }
    parts.push(env::var("PATH").unwrap_or_default());
    parts.join(":")
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1)
}

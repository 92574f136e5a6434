//! Upstream Kubernetes pieces built from their Go modules at pinned
//! versions (the product stays Rust; Go only builds what the tests run
//! against). Each module under `tests/cluster/<name>/` pins one upstream
//! release with `tool` directives; its binaries are built once into a cache
//! folder keyed by the module's go.mod, go.sum and the Go version, and
//! linked into `target/cluster-bin/` where the tests find them.
//!
//! `k8s.io/kubernetes` requires its staging modules at `v0.0.0` and replaces
//! them with folders of its own repository; those replace directives do not
//! apply to a module that depends on it, so ours replaces each with its
//! published `v0.X.Y` twin. `generate_kubernetes_gomod` writes that list
//! from the pinned release's own go.mod (`cargo xtask cluster gomod`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::sh;

/// How a set's binaries are made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `go build` of main packages, all in one command.
    Build,
    /// `go test -c` of one package per binary (upstream's `e2e.test`).
    TestBinary,
}

/// One set of binaries built from a Go module of ours. A module may give
/// several sets (the control plane, the static test image, e2e.test), each
/// cached on its own so that a set's recipe changes alone.
pub struct GoModule {
    /// The cache folder's prefix; unique per set.
    pub name: &'static str,
    /// The module's folder under `tests/cluster/`.
    pub dir: &'static str,
    pub kind: Kind,
    /// (output name, package).
    pub binaries: &'static [(&'static str, &'static str)],
    /// `-X` link flags stamping the release into the binaries (as the
    /// upstream release builds do), from the module version it pins.
    pub stamp: fn(&str) -> Vec<String>,
    /// Build tags, comma-separated ("" for none).
    pub tags: &'static str,
    /// Whether cgo is on: off for what goes into a container image (a
    /// static binary), on where the upstream build needs C (runc).
    pub cgo: bool,
}

/// Kubernetes' version stamps: without them the binaries report
/// `v0.0.0-master` and kubectl warns of version skew.
fn kubernetes_stamp(v: &str) -> Vec<String> {
    let minor = v.split('.').nth(1).unwrap_or("0");
    [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ]
    .iter()
    .flat_map(|pkg| {
        [
            format!("{pkg}.gitVersion={v}"),
            format!("{pkg}.gitMajor=1"),
            format!("{pkg}.gitMinor={minor}"),
            format!("{pkg}.gitTreeState=clean"),
        ]
    })
    .collect()
}

fn no_stamp(_: &str) -> Vec<String> {
    vec![]
}

fn helm_stamp(v: &str) -> Vec<String> {
    vec![format!("helm.sh/helm/v3/internal/version.version={v}")]
}

fn containerd_stamp(v: &str) -> Vec<String> {
    vec![format!(
        "github.com/containerd/containerd/v2/version.Version={v}"
    )]
}

fn runc_stamp(v: &str) -> Vec<String> {
    vec![format!("main.version={}", v.trim_start_matches('v'))]
}

pub const MODULES: &[GoModule] = &[
    GoModule {
        name: "kubernetes",
        dir: "kubernetes",
        kind: Kind::Build,
        binaries: &[
            ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
            (
                "kube-controller-manager",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ),
            ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
            ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
            ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
        ],
        stamp: kubernetes_stamp,
        tags: "",
        cgo: true,
    },
    // The upstream test images' programs, static for their images.
    GoModule {
        name: "agnhost",
        dir: "kubernetes",
        kind: Kind::Build,
        binaries: &[
            ("agnhost", "k8s.io/kubernetes/test/images/agnhost"),
            (
                "regression-issue-74839",
                "k8s.io/kubernetes/test/images/regression-issue-74839",
            ),
        ],
        stamp: kubernetes_stamp,
        tags: "",
        cgo: false,
    },
    // Ginkgo's runner: e2e.test's tests in parallel processes.
    GoModule {
        name: "ginkgo",
        dir: "kubernetes",
        kind: Kind::Build,
        binaries: &[("ginkgo", "github.com/onsi/ginkgo/v2/ginkgo")],
        stamp: no_stamp,
        tags: "",
        cgo: false,
    },
    GoModule {
        name: "e2e",
        dir: "kubernetes",
        kind: Kind::TestBinary,
        binaries: &[("e2e.test", "k8s.io/kubernetes/test/e2e")],
        stamp: kubernetes_stamp,
        tags: "",
        cgo: true,
    },
    GoModule {
        name: "etcd",
        dir: "etcd",
        kind: Kind::Build,
        binaries: &[("etcd", "go.etcd.io/etcd/server/v3")],
        stamp: no_stamp,
        tags: "",
        cgo: true,
    },
    GoModule {
        name: "helm",
        dir: "helm",
        kind: Kind::Build,
        binaries: &[("helm", "helm.sh/helm/v3/cmd/helm")],
        stamp: helm_stamp,
        tags: "",
        cgo: true,
    },
    GoModule {
        name: "containerd",
        dir: "containerd",
        kind: Kind::Build,
        binaries: &[
            (
                "containerd",
                "github.com/containerd/containerd/v2/cmd/containerd",
            ),
            (
                "containerd-shim-runc-v2",
                "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
            ),
            ("ctr", "github.com/containerd/containerd/v2/cmd/ctr"),
        ],
        stamp: containerd_stamp,
        tags: "",
        cgo: true,
    },
    // runc needs cgo (its nsenter is C) and libseccomp for the
    // RuntimeDefault profile pods ask for.
    GoModule {
        name: "runc",
        dir: "runc",
        kind: Kind::Build,
        binaries: &[("runc", "github.com/opencontainers/runc")],
        stamp: runc_stamp,
        tags: "seccomp",
        cgo: true,
    },
    // The cluster DNS (the version kubeadm installs with this release),
    // static for its image.
    GoModule {
        name: "coredns",
        dir: "coredns",
        kind: Kind::Build,
        binaries: &[("coredns", "github.com/coredns/coredns")],
        stamp: no_stamp,
        tags: "",
        cgo: false,
    },
    // The CNI plugins a kind node has: the pod network on each node.
    GoModule {
        name: "cni",
        dir: "cni",
        kind: Kind::Build,
        binaries: &[
            (
                "host-local",
                "github.com/containernetworking/plugins/plugins/ipam/host-local",
            ),
            (
                "bridge",
                "github.com/containernetworking/plugins/plugins/main/bridge",
            ),
            (
                "loopback",
                "github.com/containernetworking/plugins/plugins/main/loopback",
            ),
            (
                "portmap",
                "github.com/containernetworking/plugins/plugins/meta/portmap",
            ),
        ],
        stamp: no_stamp,
        tags: "",
        cgo: false,
    },
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn module_dir(m: &GoModule) -> PathBuf {
    root().join("tests/cluster").join(m.dir)
}

/// Where built binaries are kept between runs: `$LB_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/lb`, else `~/.cache/lb`.
fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("LB_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lb");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/lb")
}

/// The folder tests read: one link per binary.
pub fn bin_dir() -> PathBuf {
    root().join("target/cluster-bin")
}

/// FNV-1a: a stable key for the cache folder (no need for a crypto hash:
/// the inputs are our own files).
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn go_env() -> Vec<(&'static str, &'static str)> {
    // Never fetch another Go toolchain; never stamp VCS data (the module
    // cache has none).
    vec![("GOTOOLCHAIN", "local"), ("GOFLAGS", "-buildvcs=false")]
}

fn go_version() -> Result<String> {
    sh::output("go", &["version"]).context("Go is not installed (`go version` failed)")
}

/// Bump when the build recipe changes (flags, environment), so cached
/// binaries built the old way are not reused.
const RECIPE: &str = "go build -trimpath, stamped, CGO_ENABLED set, v3";

fn cache_key(m: &GoModule, go: &str) -> Result<String> {
    let dir = module_dir(m);
    let mut h = fnv(go.as_bytes(), 0xcbf2_9ce4_8422_2325);
    h = fnv(RECIPE.as_bytes(), h);
    // What the set builds and how.
    h = fnv(m.tags.as_bytes(), h);
    h = fnv(&[u8::from(m.cgo), u8::from(m.kind == Kind::TestBinary)], h);
    for (name, pkg) in m.binaries {
        h = fnv(name.as_bytes(), h);
        h = fnv(pkg.as_bytes(), h);
    }
    for f in ["go.mod", "go.sum"] {
        let p = dir.join(f);
        h = fnv(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            h,
        );
    }
    Ok(format!("{}-{h:016x}", m.name))
}

/// Builds every module whose cache folder is missing and links the
/// binaries into `target/cluster-bin/`. Seconds when all are cached.
pub fn build_all() -> Result<()> {
    let go = go_version()?;
    eprintln!(
        "    upstream: Kubernetes {} ({})",
        kubernetes_version()?,
        go.trim()
    );
    let links = bin_dir();
    std::fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    for m in MODULES {
        let out = cache_root().join("go").join(cache_key(m, &go)?);
        if out.is_dir() {
            eprintln!("    {}: cached in {}", m.name, out.display());
        } else {
            build(m, &out)?;
            prune(m, &out);
        }
        for (name, _) in m.binaries {
            let link = links.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(out.join(name), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}

/// Removes this module's older builds (another go.mod, Go or recipe).
fn prune(m: &GoModule, keep: &Path) {
    let Some(parent) = keep.parent() else { return };
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(hash) = name.strip_prefix(&format!("{}-", m.name)) else {
            continue;
        };
        // Only this set's folders: `name-<16 hex digits>[.partial]`.
        let hash = hash.trim_end_matches(".partial");
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && e.path() != keep {
            eprintln!("    {}: removing the older build {name}", m.name);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn build(m: &GoModule, out: &Path) -> Result<()> {
    let start = Instant::now();
    // Built into a temporary folder renamed at the end, so an interrupted
    // build never looks finished.
    let tmp = out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let version = required_version(m)?;
    let ldflags: Vec<String> = (m.stamp)(&version)
        .into_iter()
        .map(|x| format!("-X {x}"))
        .collect();
    let go = |args: &[&str]| {
        let mut c = Command::new("go");
        c.current_dir(module_dir(m))
            .envs(go_env())
            .env("CGO_ENABLED", if m.cgo { "1" } else { "0" })
            .args(args)
            .arg("-trimpath")
            .arg(format!("-ldflags={}", ldflags.join(" ")));
        if !m.tags.is_empty() {
            c.arg(format!("-tags={}", m.tags));
        }
        c
    };
    match m.kind {
        Kind::Build => {
            // One `go build` for all of a set's binaries: packages shared
            // between them compile once, in parallel.
            let mut c = go(&["build"]);
            c.arg("-o")
                .arg(format!("{}/", tmp.display()))
                .args(m.binaries.iter().map(|(_, pkg)| pkg));
            sh::step(&format!("go build ({})", m.name), c)?;
            for (name, pkg) in m.binaries {
                let built = tmp.join(default_name(pkg));
                if built != tmp.join(name) {
                    std::fs::rename(&built, tmp.join(name))
                        .with_context(|| format!("renaming {}", built.display()))?;
                }
            }
        }
        Kind::TestBinary => {
            for (name, pkg) in m.binaries {
                let mut c = go(&["test", "-c"]);
                c.arg("-o").arg(tmp.join(name)).arg(pkg);
                sh::step(&format!("go test -c {pkg} ({})", m.name), c)?;
            }
        }
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    eprintln!(
        "    {}: built in {:.0}s into {}",
        m.name,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

/// The file `go build -o DIR/` writes for `pkg`: its last path element,
/// or the one before a major-version suffix (`.../server/v3` -> `server`).
fn default_name(pkg: &str) -> &str {
    let mut parts = pkg.rsplit('/');
    let last = parts.next().unwrap_or(pkg);
    let is_major =
        last.len() > 1 && last.starts_with('v') && last[1..].bytes().all(|b| b.is_ascii_digit());
    if is_major {
        parts.next().unwrap_or(last)
    } else {
        last
    }
}

/// The Kubernetes release our module pins (`require k8s.io/kubernetes vX`).
pub fn kubernetes_version() -> Result<String> {
    required_version(&MODULES[0])
}

/// The version of the upstream module a module of ours pins: the module
/// of its first binary's package.
fn required_version(m: &GoModule) -> Result<String> {
    let pkg = m.binaries[0].1;
    let p = module_dir(m).join("go.mod");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            // Inside or outside a require block.
            let first = w.next()?;
            let (module, version) = if first == "require" {
                (w.next()?, w.next()?)
            } else {
                (first, w.next()?)
            };
            (pkg == module || pkg.starts_with(&format!("{module}/"))).then(|| version.to_string())
        })
        .with_context(|| format!("{} requires no module of {pkg}", p.display()))
}

/// Our go.mod for `k8s.io/kubernetes` at `version`, from the release's own
/// go.mod text: every `k8s.io/X => ./staging/...` replace becomes
/// `k8s.io/X => k8s.io/X v0.<minor>.<patch>`.
pub fn kubernetes_gomod(version: &str, upstream: &str) -> Result<String> {
    let Some(rest) = version.strip_prefix("v1.") else {
        bail!("{version}: expected a v1.Y.Z release");
    };
    let twin = format!("v0.{rest}");
    let go = upstream
        .lines()
        .find_map(|l| l.strip_prefix("go "))
        .context("the upstream go.mod has no go line")?
        .trim();
    let mut staging: Vec<&str> = upstream
        .lines()
        .filter_map(|l| {
            let (module, target) = l.trim().split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim())
        })
        .collect();
    staging.sort_unstable();
    staging.dedup();
    if staging.is_empty() {
        bail!("the upstream go.mod of {version} replaces no staging module");
    }
    let mut s = String::new();
    s.push_str(
        "// Generated by `cargo xtask cluster gomod` from k8s.io/kubernetes's own go.mod;\n\
         // regenerate with `cargo xtask cluster gomod vX.Y.Z`, never by hand.\n",
    );
    s.push_str("module lb.test/cluster/kubernetes\n\n");
    s.push_str(&format!(
        "go {go}\n\nrequire k8s.io/kubernetes {version}\n\n"
    ));
    s.push_str("replace (\n");
    for m in &staging {
        s.push_str(&format!("\t{m} => {m} {twin}\n"));
    }
    s.push_str(")\n\ntool (\n");
    let tools = MODULES
        .iter()
        .filter(|m| m.dir == "kubernetes" && m.kind == Kind::Build)
        .flat_map(|m| m.binaries.iter().map(|(_, pkg)| pkg));
    for pkg in tools {
        s.push_str(&format!("\t{pkg}\n"));
    }
    s.push_str(")\n");
    Ok(s)
}

/// Rewrites tests/cluster/kubernetes/go.mod for `version` and tidies it.
pub fn generate_kubernetes_gomod(version: &str) -> Result<()> {
    let json = Command::new("go")
        .envs(go_env())
        .args(["mod", "download", "-json"])
        .arg(format!("k8s.io/kubernetes@{version}"))
        .output()
        .context("go mod download")?;
    if !json.status.success() {
        bail!(
            "go mod download k8s.io/kubernetes@{version}: {}",
            String::from_utf8_lossy(&json.stdout)
        );
    }
    let text = String::from_utf8_lossy(&json.stdout);
    // The JSON's "GoMod" field: the path of the release's go.mod.
    let gomod = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"GoMod\": \""))
        .and_then(|l| l.strip_suffix("\","))
        .context("no GoMod in go mod download's answer")?;
    let upstream = std::fs::read_to_string(gomod).with_context(|| format!("reading {gomod}"))?;
    let dir = root().join("tests/cluster/kubernetes");
    std::fs::write(dir.join("go.mod"), kubernetes_gomod(version, &upstream)?)?;
    let mut tidy = Command::new("go");
    tidy.current_dir(&dir).envs(go_env()).args(["mod", "tidy"]);
    sh::step("go mod tidy (tests/cluster/kubernetes)", tidy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_replaces_become_published_twins() {
        let upstream = "module k8s.io/kubernetes\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\n\
                        replace (\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\
                        \tk8s.io/api => ./staging/src/k8s.io/api\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        let out = kubernetes_gomod("v1.37.2", upstream).unwrap();
        assert!(out.contains("go 1.26.0\n"));
        assert!(out.contains("require k8s.io/kubernetes v1.37.2\n"));
        assert!(out.contains(
            "replace (\n\tk8s.io/api => k8s.io/api v0.37.2\n\tk8s.io/client-go => k8s.io/client-go v0.37.2\n)"
        ));
        assert!(!out.contains("github.com/x/y"));
        assert!(out.contains("\tk8s.io/kubernetes/cmd/kubectl\n"));
    }

    #[test]
    fn binary_names_skip_major_version_suffixes() {
        assert_eq!(default_name("go.etcd.io/etcd/server/v3"), "server");
        assert_eq!(default_name("k8s.io/kubernetes/cmd/kubectl"), "kubectl");
        assert_eq!(default_name("helm.sh/helm/v3/cmd/helm"), "helm");
    }

    #[test]
    fn the_committed_gomod_pins_a_release() {
        let v = kubernetes_version().unwrap();
        assert!(v.starts_with("v1."), "{v}");
        let text = std::fs::read_to_string(root().join("tests/cluster/kubernetes/go.mod")).unwrap();
        let twin = format!("v0.{}", &v[3..]);
        assert!(text.contains(&format!("k8s.io/api => k8s.io/api {twin}")));
    }
}

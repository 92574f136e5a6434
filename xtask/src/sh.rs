//! Running commands with a line saying what runs and how long it took.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    c
}

/// Runs `cmd` with inherited output; fails naming the step.
pub fn step(what: &str, mut cmd: Command) -> Result<()> {
    eprintln!("==> {what}");
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    eprintln!("==> {what}: done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs quietly; true when it exits 0.
pub fn ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs quietly and returns stdout, or None on failure.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// Test counts summed over every test binary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Runs a `cargo test` command, passing its output through, and sums every
/// test binary's result line. The caller prints the total last, so CI reads
/// it from the last line rather than from the last binary's (often an empty
/// doc-test run).
pub fn tests(what: &str, mut cmd: Command) -> Result<Counts> {
    eprintln!("==> {what}");
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut c = Counts::default();
    let stdout = child.stdout.take().context("test output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let n = |w: &[&str]| {
                    w.iter()
                        .rev()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                match words.last() {
                    Some(&"passed") => c.passed += n(&words),
                    Some(&"failed") => c.failed += n(&words),
                    Some(&"ignored") => c.ignored += n(&words),
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    eprintln!("==> {what}: done in {:.1}s", start.elapsed().as_secs_f64());
    if !status.success() {
        println!(
            "summary: {} passed, {} failed, {} skipped",
            c.passed,
            c.failed.max(1),
            c.ignored
        );
        bail!("{what} failed ({status})");
    }
    if c.passed == 0 {
        bail!("{what}: no test ran");
    }
    Ok(c)
}

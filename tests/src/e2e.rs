//! The upstream e2e suite as we run it: its focus, the tests skipped (each
//! with the reason), the arguments of `e2e.test`, and its JSON report
//! turned into the table of docs/e2e.md.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};

/// Issue #15's focus: the `[sig-network]` tests of Services and of what a
/// Service proxy does.
pub const FOCUS: &str = r"\[sig-network\] (Services|Conntrack|Networking Granular Checks: Services|KubeProxy|EndpointSlice|EndpointSliceMirroring|Traffic Distribution|LoadBalancers)";

/// Tests left out, each with why: only what needs something this machine
/// cannot have, or tests of another component.
pub const SKIPS: &[(&str, &str)] = &[
    (
        r"\[Feature:KubeProxyNFAcct\]",
        "counts packets with kube-proxy's nfacct objects (iptables/nftables rules); a test of kube-proxy's own metrics",
    ),
    (
        r"\[Feature:SCTPConnectivity\]",
        "needs SCTP sockets, which this machine's kernel does not have (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT; no loadable modules); the datapath does not forward SCTP either (README, Status)",
    ),
];

/// The skips as one `--ginkgo.skip` regular expression.
pub fn skip_regex() -> String {
    SKIPS
        .iter()
        .map(|(re, _)| format!("({re})"))
        .collect::<Vec<_>>()
        .join("|")
}

/// The command line: Ginkgo's runner (`ginkgo`) with `procs` parallel
/// processes, the focus and skip, one JSON report, then `e2e.test` and
/// its own flags (the admin kubeconfig, the default skeleton provider as
/// a kind cluster's run). Tests marked `[Serial]` run alone at the end,
/// as upstream's parallel runs do.
pub fn suite_args(
    e2e_test: &Path,
    kubeconfig: &Path,
    json: &Path,
    focus: &str,
    skip: &str,
    procs: usize,
    nodes: usize,
) -> Vec<String> {
    let mut a = vec![
        format!("--procs={procs}"),
        format!("--focus={focus}"),
        format!("--json-report={}", json.display()),
        "--no-color".into(),
        // Each step's log, so that a failure can be read afterwards.
        "-v".into(),
        "--timeout=4h".into(),
    ];
    if !skip.is_empty() {
        a.push(format!("--skip={skip}"));
    }
    a.push(e2e_test.display().to_string());
    a.push("--".into());
    a.extend([
        format!("--kubeconfig={}", kubeconfig.display()),
        "--provider=skeleton".into(),
        format!("--num-nodes={nodes}"),
        "--disable-log-dump".into(),
    ]);
    a
}

/// The tests of the focus that pass here, one full name per line:
/// `cargo xtask test` runs them and fails if one stops passing; `cargo
/// xtask e2e --report ...` rewrites the list from a whole run.
pub fn passing_list() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/e2e-passing.txt")
}

/// The names in the passing list (comments and blank lines aside).
pub fn read_passing(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Not marked `[Slow]`, `[Serial]` or `[Disruptive]`, and content with
/// three nodes: what `cargo xtask test` runs of the passing list (the
/// marked ones take minutes each, or the cluster alone).
pub fn is_quick(name: &str) -> bool {
    !["[Slow]", "[Serial]", "[Disruptive]"]
        .iter()
        .any(|m| name.contains(m))
        && !needs_six_nodes(name)
}

/// Tests that want two schedulable nodes in each of three zones (six
/// nodes: `--nodes 6`); with three they skip themselves.
pub fn needs_six_nodes(name: &str) -> bool {
    [
        "[sig-network] Traffic Distribution should route traffic correctly between pods on multiple nodes",
        "[sig-network] Traffic Distribution should route traffic to an endpoint on the same node or fall back to same zone",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// A focus that selects exactly these tests: their full names, regex
/// metacharacters escaped, as one alternation.
pub fn focus_of(names: &[String]) -> String {
    let escape = |n: &str| {
        let mut out = String::new();
        for c in n.chars() {
            if "\\.+*?()|[]{}^$".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    names
        .iter()
        .map(|n| escape(n))
        .collect::<Vec<_>>()
        .join("|")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Passed,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Passed => "pass",
            Outcome::Failed => "fail",
            Outcome::Skipped => "skip",
        }
    }
}

/// One test of the focus and how it went.
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    /// The failure's message, or why the test was skipped.
    pub failure: String,
    pub seconds: f64,
}

/// Ginkgo's JSON report: the tests that ran, those that skipped
/// themselves (with their message) and those our skips left out (with the
/// reason).
pub fn read_report(path: &Path) -> Result<Vec<TestResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let suites: serde_json::Value = serde_json::from_str(&text).context("the JSON report")?;
    let mut out = Vec::new();
    for suite in suites.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut parts: Vec<String> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            parts.push(spec["LeafNodeText"].as_str().unwrap_or("").to_string());
            let name = parts.join(" ");
            let state = spec["State"].as_str().unwrap_or("");
            let skipped_by_filter =
                state == "skipped" && spec["Failure"]["Message"].as_str().unwrap_or("").is_empty();
            // A test the run's filters left out is listed only when one of
            // our skips named it (then with the reason).
            if skipped_by_filter && !(in_focus(&name) && skip_reason(&name).is_some()) {
                continue;
            }
            let outcome = match state {
                "passed" => Outcome::Passed,
                "skipped" | "pending" => Outcome::Skipped,
                _ => Outcome::Failed,
            };
            let failure = if outcome == Outcome::Skipped && skipped_by_filter {
                skip_reason(&name).unwrap_or("skipped").to_string()
            } else {
                spec["Failure"]["Message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            };
            let ns = spec["RunTime"].as_f64().unwrap_or(0.0);
            out.push(TestResult {
                name,
                outcome,
                failure,
                seconds: ns / 1e9,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn in_focus(name: &str) -> bool {
    regex_lite_match(FOCUS, name)
}

/// The reason of the skip whose pattern names this test.
fn skip_reason(name: &str) -> Option<&'static str> {
    SKIPS
        .iter()
        .find(|(re, _)| regex_lite_match(re, name))
        .map(|(_, why)| *why)
}

/// The focus and skip patterns are alternations of literal texts with
/// escaped brackets: matching them needs no regex engine.
fn regex_lite_match(re: &str, text: &str) -> bool {
    let unescaped = re.replace(r"\[", "[").replace(r"\]", "]");
    match (unescaped.find('('), unescaped.rfind(')')) {
        (Some(open), Some(close)) if open < close => {
            let prefix = &unescaped[..open];
            let suffix = &unescaped[close + 1..];
            unescaped[open + 1..close]
                .split('|')
                .any(|alt| text.contains(&format!("{prefix}{alt}{suffix}")))
        }
        _ => text.contains(&unescaped),
    }
}

/// The generated part of docs/e2e.md lies between these lines; the prose
/// around it (the analysis of each failure) is kept as written.
pub const BEGIN: &str =
    "<!-- e2e results: written by `cargo xtask e2e --report`, rows merged run after run -->";
pub const END: &str = "<!-- end of e2e results -->";

/// One test's row: its latest result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub result: String,
    pub seconds: u64,
    /// The date of the run that gave it (UTC).
    pub run: String,
    pub why: String,
}

/// The rows and the list of runs of a report written before.
pub fn parse_report(md: &str) -> (std::collections::BTreeMap<String, Row>, Vec<String>) {
    let mut rows = std::collections::BTreeMap::new();
    let mut runs = Vec::new();
    let Some(block) = md.split(BEGIN).nth(1).and_then(|b| b.split(END).next()) else {
        return (rows, runs);
    };
    for line in block.lines() {
        if let Some(run) = line.strip_prefix("- run ") {
            runs.push(run.to_string());
            continue;
        }
        if !line.starts_with("| [") {
            continue;
        }
        // Cells are split on `|` not escaped as `\|`.
        let mut cells = Vec::new();
        let mut cur = String::new();
        let mut chars = line.trim().trim_matches('|').chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    cur.push('|');
                    chars.next();
                }
                '|' => cells.push(std::mem::take(&mut cur).trim().to_string()),
                c => cur.push(c),
            }
        }
        cells.push(cur.trim().to_string());
        if let [name, result, time, run, why] = &cells[..] {
            rows.insert(
                name.clone(),
                Row {
                    result: result.clone(),
                    seconds: time.trim_end_matches(" s").parse().unwrap_or(0),
                    run: run.clone(),
                    why: why.clone(),
                },
            );
        }
    }
    (rows, runs)
}

/// The report with this run's results merged into `previous` (a test run
/// again replaces its row; the others keep theirs with their run's date).
/// The prose before and after the generated block is kept.
#[allow(clippy::too_many_arguments)]
pub fn report(
    previous: &str,
    results: &[TestResult],
    version: &str,
    command: &str,
    up: Duration,
    ready: Duration,
    took: Duration,
) -> String {
    let today = crate::controlplane::now();
    let date = today.split('T').next().unwrap_or(&today).to_string();
    let (mut rows, mut runs) = parse_report(previous);
    for r in results {
        let why = r
            .failure
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>();
        rows.insert(
            r.name.clone(),
            Row {
                result: r.outcome.word().to_string(),
                seconds: r.seconds.round() as u64,
                run: date.clone(),
                why,
            },
        );
    }
    runs.push(format!(
        "{today}: `{command}`, {} tests in {:.0} min (Kubernetes {version}; nodes Ready {:.0} s after start, agent and DNS ready at {:.0} s)",
        results.len(),
        took.as_secs_f64() / 60.0,
        up.as_secs_f64(),
        ready.as_secs_f64()
    ));
    let count = |w: &str| rows.values().filter(|r| r.result == w).count();
    let mut b = String::new();
    b.push_str(BEGIN);
    b.push_str("\n\n## Results\n\n");
    b.push_str(&format!(
        "**{} passed, {} failed, {} skipped** of the {} tests of the focus that have run, each \
         with its latest result.\n\nRuns:\n\n",
        count("pass"),
        count("fail"),
        count("skip"),
        rows.len()
    ));
    for run in &runs {
        b.push_str(&format!("- run {run}\n"));
    }
    b.push_str("\n| test | result | time | run | reason or failure |\n|---|---|---|---|---|\n");
    for (name, r) in &rows {
        b.push_str(&format!(
            "| {} | {} | {} s | {} | {} |\n",
            name.replace('|', "\\|"),
            r.result,
            r.seconds,
            r.run,
            r.why.replace('|', "\\|")
        ));
    }
    b.push_str(END);
    b.push('\n');
    match (previous.find(BEGIN), previous.find(END)) {
        (Some(i), Some(j)) if i < j => {
            format!(
                "{}{}{}",
                &previous[..i],
                b,
                &previous[j + END.len()..].trim_start_matches('\n')
            )
        }
        _ => format!(
            "{}{}{b}",
            previous,
            if previous.is_empty() { "" } else { "\n" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_focus_and_skips_match_as_ginkgo_would() {
        assert!(in_focus(
            "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
        ));
        assert!(in_focus(
            "[sig-network] Networking Granular Checks: Services should function for pod-Service: http"
        ));
        assert!(!in_focus(
            "[sig-network] DNS should provide DNS for services"
        ));
        assert!(skip_reason(
            "[sig-network] KubeProxy should update metric for tracking accepted packets destined for localhost nodeports [Feature:KubeProxyNFAcct]"
        )
        .is_some());
        assert!(skip_reason(
            "[sig-network] Networking Granular Checks: Services should function for pod-Service: sctp [Feature:SCTPConnectivity]"
        )
        .is_some_and(|why| why.contains("EPROTONOSUPPORT")));
        assert!(
            skip_reason("[sig-network] Services should be able to up and down services").is_none()
        );
    }

    #[test]
    fn a_passing_list_becomes_an_escaped_focus() {
        let names = vec![
            "[sig-network] Services should serve a basic endpoint from pods [Conformance]".to_string(),
            "[sig-network] Networking Granular Checks: Services should function for pod-Service: http".to_string(),
        ];
        assert_eq!(
            focus_of(&names),
            "\\[sig-network\\] Services should serve a basic endpoint from pods \\[Conformance\\]|\\[sig-network\\] Networking Granular Checks: Services should function for pod-Service: http"
        );
    }

    #[test]
    fn reports_merge_run_after_run_and_keep_the_prose() {
        let t = |name: &str, outcome, failure: &str| TestResult {
            name: name.into(),
            outcome,
            failure: failure.into(),
            seconds: 3.4,
        };
        let d = Duration::from_secs(60);
        let first = report(
            "# Upstream e2e results\n\nprose before\n",
            &[
                t("[sig-network] A", Outcome::Passed, ""),
                t(
                    "[sig-network] B | pipes",
                    Outcome::Failed,
                    "timed out\nmore",
                ),
            ],
            "v1.37.2",
            "cargo xtask e2e",
            d,
            d,
            d,
        );
        let with_after = format!("{first}\n## Failures\n\nprose after\n");
        let second = report(
            &with_after,
            &[t("[sig-network] B | pipes", Outcome::Passed, "")],
            "v1.37.2",
            "cargo xtask e2e --tests rest.txt",
            d,
            d,
            d,
        );
        assert!(second.starts_with("# Upstream e2e results\n\nprose before\n"));
        assert!(second.ends_with("## Failures\n\nprose after\n"), "{second}");
        let (rows, runs) = parse_report(&second);
        assert_eq!(runs.len(), 2);
        assert!(runs[1].contains("--tests rest.txt"));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows["[sig-network] A"].result, "pass");
        assert_eq!(rows["[sig-network] B | pipes"].result, "pass");
        assert_eq!(rows["[sig-network] A"].seconds, 3);
        assert!(second.contains("**2 passed, 0 failed, 0 skipped** of the 2 tests"));
        assert_eq!(second.matches(BEGIN).count(), 1);
    }

    #[test]
    fn the_committed_report_parses_and_holds_only_tests_of_the_focus() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/e2e.md");
        let (rows, runs) = parse_report(&std::fs::read_to_string(path).unwrap());
        assert!(!runs.is_empty());
        assert!(rows.len() >= 68, "{} rows", rows.len());
        for (name, row) in &rows {
            assert!(in_focus(name), "{name}");
            assert!(
                ["pass", "fail", "skip"].contains(&row.result.as_str()),
                "{name}"
            );
        }
    }

    #[test]
    fn the_quick_subset_leaves_out_slow_and_six_node_tests() {
        assert!(is_quick(
            "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
        ));
        assert!(!is_quick(
            "[sig-network] LoadBalancers [Feature:LoadBalancer] should handle load balancer cleanup finalizer for service [Slow]"
        ));
        assert!(!is_quick(
            "[sig-network] Traffic Distribution should route traffic correctly between pods on multiple nodes when using PreferClose"
        ));
        assert!(is_quick(
            "[sig-network] Traffic Distribution should route traffic to an endpoint in the same zone when using PreferClose"
        ));
    }
}

//! Kubernetes' own network tests against the real cluster: the upstream
//! e2e suite (`e2e.test`, built at the cluster's release) run by ginkgo
//! from the control-plane namespace, with weft as the pod network and the
//! only Service proxy.
//!
//! Three suites, as CNIs publish theirs: every sig-network conformance
//! spec, the NetworkPolicy specs, and the Service specs beyond conformance.
//! Specs that need what this machine cannot give (a cloud load balancer,
//! IPv6, more nodes) or a feature weft does not have yet are skipped by
//! `deploy/kube/e2e-skips.txt`, each with its reason. A run writes ginkgo's
//! JUnit and JSON reports and a summary: passed, failed and skipped per
//! suite, and every skip with why.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use super::Cluster;
use crate::net::netns_path;

/// A set of specs, by a regular expression over their full text.
#[derive(Debug, Clone, Copy)]
pub struct Suite {
    pub name: &'static str,
    pub focus: &'static str,
}

pub const CONFORMANCE: Suite = Suite {
    name: "sig-network conformance",
    focus: r"\[sig-network\].*\[Conformance\]",
};
pub const NETWORK_POLICY: Suite = Suite {
    name: "NetworkPolicy",
    focus: r"\[sig-network\].*(Feature:NetworkPolicy|\[sig-network\] Netpol)",
};
pub const SERVICES: Suite = Suite {
    name: "Services",
    focus: r"\[sig-network\] Services",
};
pub const SUITES: &[Suite] = &[CONFORMANCE, NETWORK_POLICY, SERVICES];

/// Specs not run, by a regular expression over their text, and why.
#[derive(Debug, Clone)]
pub struct Skip {
    pub pattern: String,
    pub reason: String,
}

/// Reads the skip list: `pattern<TAB>reason` lines; `#` starts a comment.
pub fn read_skips(path: &Path) -> anyhow::Result<Vec<Skip>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut skips = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (pattern, reason) = line.split_once('\t').with_context(|| {
            format!(
                "{}:{}: no tab between pattern and reason",
                path.display(),
                n + 1
            )
        })?;
        regex_check(pattern).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        skips.push(Skip {
            pattern: pattern.trim().to_string(),
            reason: reason.trim().to_string(),
        });
    }
    Ok(skips)
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub suites: Vec<Suite>,
    pub skips: Vec<Skip>,
    /// Parallel ginkgo processes.
    pub procs: usize,
    /// Where the reports go.
    pub report_dir: PathBuf,
}

/// One spec's outcome.
#[derive(Debug, Clone)]
pub struct SpecResult {
    pub text: String,
    pub state: String,
    /// Why it failed or was skipped at run time.
    pub message: String,
    pub seconds: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub specs: Vec<SpecResult>,
    pub suites: Vec<Suite>,
    pub skips: Vec<Skip>,
}

impl Cluster {
    /// Runs the suites' specs in one ginkgo run and summarises them.
    pub async fn run_e2e(&self, opts: &RunOptions) -> anyhow::Result<Summary> {
        let bin = &self.cfg.upstream_bin;
        std::fs::create_dir_all(&opts.report_dir)?;
        let focus = opts
            .suites
            .iter()
            .map(|s| format!("({})", s.focus))
            .collect::<Vec<_>>()
            .join("|");
        let skip = opts
            .skips
            .iter()
            .map(|s| format!("({})", s.pattern))
            .collect::<Vec<_>>()
            .join("|");
        let dir = opts.report_dir.display().to_string();
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.cp_netns()).display()))
            .arg("--")
            .arg(bin.join("ginkgo"))
            .args(["-p", &format!("--procs={}", opts.procs.max(1))])
            .args(["--no-color", "--timeout=3h", "--poll-progress-after=300s"])
            .arg(format!("--focus={focus}"))
            .args((!skip.is_empty()).then(|| format!("--skip={skip}")))
            .args(["--junit-report=junit.xml", "--json-report=report.json"])
            .arg(format!("--output-dir={dir}"))
            .arg(bin.join("e2e.test"))
            .arg("--")
            .arg(format!(
                "--kubeconfig={}",
                self.pki.kubeconfig("admin").display()
            ))
            .arg(format!("--kubectl-path={}", bin.join("kubectl").display()))
            .args(["--provider=skeleton", "--dump-logs-on-failure=false"])
            .arg(format!("--num-nodes={}", self.cfg.nodes))
            .arg(format!("--report-dir={dir}"))
            .arg(format!("--e2e-output-dir={dir}"))
            .current_dir(&opts.report_dir)
            .stdin(Stdio::null());
        let log = std::fs::File::create(opts.report_dir.join("e2e.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        // ginkgo exits non-zero when a spec fails: the report says which.
        let status = cmd.status().await.context("running ginkgo")?;
        let report = opts.report_dir.join("report.json");
        if !report.exists() {
            bail!(
                "ginkgo wrote no report ({status}); see {}",
                opts.report_dir.join("e2e.log").display()
            );
        }
        let summary = Summary {
            specs: read_report(&report)?,
            suites: opts.suites.clone(),
            skips: opts.skips.clone(),
        };
        std::fs::write(opts.report_dir.join("summary.md"), summary.table())?;
        Ok(summary)
    }
}

/// The specs of ginkgo's JSON report.
pub fn read_report(path: &Path) -> anyhow::Result<Vec<SpecResult>> {
    let text = std::fs::read_to_string(path)?;
    let reports: serde_json::Value = serde_json::from_str(&text).context("ginkgo's JSON report")?;
    let mut out = Vec::new();
    for suite in reports.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut parts: Vec<String> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
                .collect();
            parts.push(
                spec["LeafNodeText"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            let seconds = spec["RunTime"].as_f64().unwrap_or_default() / 1e9;
            out.push(SpecResult {
                text: parts.join(" "),
                state: spec["State"].as_str().unwrap_or_default().to_string(),
                message: spec["Failure"]["Message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                seconds,
            });
        }
    }
    Ok(out)
}

impl Summary {
    /// The specs of `suite`.
    pub fn of<'a>(&'a self, suite: &Suite) -> impl Iterator<Item = &'a SpecResult> + 'a {
        let re = regex_lite(suite.focus);
        self.specs.iter().filter(move |s| re.is_match(&s.text))
    }

    /// Why a skipped spec was skipped: the skip list's reason, or what the
    /// spec said when it skipped itself.
    pub fn skip_reason(&self, spec: &SpecResult) -> String {
        for skip in &self.skips {
            if regex_lite(&skip.pattern).is_match(&spec.text) {
                return skip.reason.clone();
            }
        }
        let message = spec.message.lines().next().unwrap_or_default().trim();
        if message.is_empty() {
            "not selected".into()
        } else {
            message.to_string()
        }
    }

    /// (passed, failed, skipped) of a suite.
    pub fn counts(&self, suite: &Suite) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in self.of(suite) {
            match s.state.as_str() {
                "passed" => c.0 += 1,
                "skipped" | "pending" => c.2 += 1,
                _ => c.1 += 1,
            }
        }
        c
    }

    /// The failed specs of every suite.
    pub fn failures(&self) -> Vec<&SpecResult> {
        self.specs
            .iter()
            .filter(|s| !matches!(s.state.as_str(), "passed" | "skipped" | "pending"))
            .filter(|s| {
                self.suites
                    .iter()
                    .any(|suite| regex_lite(suite.focus).is_match(&s.text))
            })
            .collect()
    }

    /// The summary as Markdown: a table per suite, then the failures and
    /// the skips with their reasons.
    pub fn table(&self) -> String {
        let mut out =
            String::from("| suite | passed | failed | skipped |\n| --- | ---: | ---: | ---: |\n");
        for suite in &self.suites {
            let (p, f, s) = self.counts(suite);
            let _ = writeln!(out, "| {} | {p} | {f} | {s} |", suite.name);
        }
        let failures = self.failures();
        if !failures.is_empty() {
            out.push_str("\nFailed:\n\n");
            for f in failures {
                let first = f.message.lines().next().unwrap_or_default();
                let _ = writeln!(out, "- {} ({:.0} s): {first}", f.text, f.seconds);
            }
        }
        let mut skipped: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for suite in &self.suites {
            for s in self
                .of(suite)
                .filter(|s| matches!(s.state.as_str(), "skipped" | "pending"))
            {
                skipped
                    .entry(self.skip_reason(s))
                    .or_default()
                    .push(&s.text);
            }
        }
        if !skipped.is_empty() {
            out.push_str("\nSkipped, by reason:\n");
            for (reason, specs) in &mut skipped {
                specs.sort();
                specs.dedup();
                let _ = writeln!(out, "\n- {reason} ({}):", specs.len());
                for s in specs.iter() {
                    let _ = writeln!(out, "  - {s}");
                }
            }
        }
        out
    }
}

/// Ginkgo's regular expressions are Go's RE2, which the `regex` crate
/// speaks too.
fn regex_check(pattern: &str) -> anyhow::Result<()> {
    regex::Regex::new(pattern).with_context(|| format!("the pattern {pattern:?}"))?;
    Ok(())
}

/// A pattern already checked (the suites' are constants, the skips' were
/// checked on reading); one that is not valid matches nothing.
fn regex_lite(pattern: &str) -> regex::Regex {
    regex::Regex::new(pattern).unwrap_or_else(|_| regex::Regex::new("$^").expect("a valid regex"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suites_select_what_their_names_say() {
        let conformance =
            "[sig-network] Services should serve a basic endpoint from pods  [Conformance]";
        let netpol = "[sig-network] Netpol NetworkPolicy between server and client should deny ingress access to updated pod [Feature:NetworkPolicy]";
        let other = "[sig-node] Pods should be submitted and removed [Conformance]";
        assert!(regex_lite(CONFORMANCE.focus).is_match(conformance));
        assert!(!regex_lite(CONFORMANCE.focus).is_match(other));
        assert!(regex_lite(NETWORK_POLICY.focus).is_match(netpol));
        assert!(!regex_lite(NETWORK_POLICY.focus).is_match(conformance));
        assert!(regex_lite(SERVICES.focus).is_match(conformance));
    }
}

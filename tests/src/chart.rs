//! The helm chart as the tests see it: `helm template` of
//! `deploy/helm/weft` (with helm from `.tools/bin`), its documents parsed,
//! and the CNI config list the chart installs on every node.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_yaml::Value;

use crate::tool;

/// The namespace the chart is rendered for.
pub const NAMESPACE: &str = "kube-system";

/// The repository root.
pub use weft_lab::kube::artifacts::repo_root as repo;

pub fn chart() -> PathBuf {
    repo().join("deploy/helm/weft")
}

pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn helm(args: &[&str], values: Option<&Path>) -> Output {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(args);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    run(&mut cmd)
}

/// `helm template` with the CRDs: each document's text, as helm wrote it.
pub fn render_text(values: Option<&Path>) -> Vec<String> {
    let chart = chart();
    let out = helm(
        &[
            "template",
            "weft",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            NAMESPACE,
            "--include-crds",
        ],
        values,
    );
    let text = String::from_utf8(out.stdout).expect("helm prints UTF-8");
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
    });
    docs
}

/// The rendered documents, parsed. (Validation reads helm's text instead:
/// re-serialising would turn YAML 1.1 octals such as `defaultMode: 0400`
/// into strings.)
pub fn render(values: Option<&Path>) -> Vec<Value> {
    render_text(values)
        .iter()
        .map(|doc| serde_yaml::from_str(doc).expect("helm renders valid YAML"))
        .collect()
}

pub fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

pub fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

pub fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == kind_ && name(d) == name_)
        .unwrap_or_else(|| panic!("no {kind_} {name_} rendered"))
}

/// The CNI network config list the chart's install-cni container writes
/// to every node (`/etc/cni/net.d/05-weft.conflist`), rendered with
/// `values` (the chart's defaults when `None`).
pub fn cni_config_list(values: Option<&Path>) -> serde_json::Value {
    let docs = render(values);
    let text = find(&docs, "ConfigMap", "weft-config")["data"]["cni-config"]
        .as_str()
        .expect("cni-config in the weft-config ConfigMap")
        .to_string();
    serde_json::from_str(&text).expect("the CNI config list is JSON")
}

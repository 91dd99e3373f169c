//! kubectl and helm against the real cluster, run where an operator's
//! would be: in the control-plane namespace, which stands for the world
//! outside the cluster.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::net::netns_path;

/// A kubectl (or helm) with the administrator's kubeconfig.
#[derive(Debug, Clone)]
pub struct Kubectl {
    pub bin: PathBuf,
    pub helm: PathBuf,
    pub kubeconfig: PathBuf,
    pub netns: String,
}

impl Kubectl {
    fn command(&self, bin: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.netns).display()))
            .arg("--")
            .arg(bin)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl with `args`; its stdout, or an error with its stderr.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.command(&self.bin).args(args), "kubectl", args).await
    }

    /// Runs kubectl with `args`, feeding `stdin` (a manifest for `apply -f -`).
    pub async fn run_with_input(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt as _;
        let mut child = self
            .command(&self.bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl ... -o json`, parsed.
    pub async fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all).await?;
        serde_json::from_str(&text).context("kubectl printed no JSON")
    }

    /// Runs helm with `args`.
    pub async fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.command(&self.helm).args(args), "helm", args).await
    }

    /// Retries `args` until it succeeds or `timeout` passes; the last
    /// error if it never does.
    pub async fn eventually(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.run(args).await {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

async fn output(cmd: &mut Command, what: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

//! The lab's service processes: started inside a namespace, logged to a
//! file, stopped with SIGTERM (or killed), restarted with the same flags.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use crate::net::netns_path;

/// How to start one process.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    pub name: String,
    pub netns: String,
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

pub struct Proc {
    pub spec: ProcSpec,
    child: Option<Child>,
}

impl Proc {
    pub fn start(spec: ProcSpec) -> anyhow::Result<Self> {
        let mut p = Self { spec, child: None };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        // Enter only the network namespace: `ip netns exec` would remount
        // /sys and hide the pinned eBPF objects under /sys/fs/bpf.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&self.spec.netns).display()))
            .arg(&self.spec.bin)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.spec.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `signal` and waits up to `grace` for the exit; kills after that.
    /// Returns the exit status, if it exited on its own.
    pub async fn stop_with(
        &mut self,
        signal: Signal,
        grace: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(10))
            .await
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub async fn kill(&mut self) {
        self.stop_with(Signal::SIGKILL, Duration::from_secs(5))
            .await;
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }
}

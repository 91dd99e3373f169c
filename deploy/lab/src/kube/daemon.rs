//! The real cluster's long-running processes (etcd, the API server, each
//! node's containerd and kubelet): started detached inside their node's
//! namespaces, so the cluster outlives the command that brought it up,
//! and found again later through a pid file.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::net::netns_path;

/// How to start one process, and where its pid and log go.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub name: String,
    /// The network namespace it runs in.
    pub netns: String,
    /// The mount namespace it runs in (a node's), if not the host's.
    pub mount_ns: Option<PathBuf>,
    /// The UTS namespace (a node's, whose hostname is the node's name).
    pub uts_ns: Option<PathBuf>,
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

impl Daemon {
    /// Starts it detached (its own session, parented to init), appending
    /// to its log. Fails if it is already running.
    pub fn start(&self) -> anyhow::Result<u32> {
        if let Some(pid) = self.pid() {
            bail!("{} is already running as {pid}", self.name);
        }
        let _ = std::fs::remove_file(&self.pid_file);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        // setsid -f forks, so the daemon is not our child and nobody here
        // has to reap it; the shell writes its own pid, then becomes
        // nsenter, which becomes the program: one pid throughout.
        let mut cmd = Command::new("setsid");
        cmd.args(["-f", "sh", "-c", r#"echo $$ > "$0"; exec "$@""#])
            .arg(&self.pid_file)
            .arg("nsenter")
            .arg(format!("--net={}", netns_path(&self.netns).display()));
        if let Some(mnt) = &self.mount_ns {
            cmd.arg(format!("--mount={}", mnt.display()));
        }
        if let Some(uts) = &self.uts_ns {
            cmd.arg(format!("--uts={}", uts.display()));
        }
        let status = cmd
            .arg("--")
            .arg(&self.bin)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("starting {}", self.name))?;
        if !status.success() {
            bail!("starting {}: setsid exited with {status}", self.name);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = read_pid(&self.pid_file) {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("{} wrote no pid to {}", self.name, self.pid_file.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pid_file).filter(|&pid| alive(pid))
    }

    /// Sends `signal`, waits up to `grace` for it to exit, then kills it.
    pub async fn stop(&self, signal: Signal, grace: Duration) {
        if let Some(pid) = self.pid() {
            stop_pid(pid, signal, grace).await;
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// SIGTERM then start again with the same command line.
    pub async fn restart(&self) -> anyhow::Result<u32> {
        self.stop(Signal::SIGTERM, Duration::from_secs(30)).await;
        self.start()
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`, waits up to `grace`, then SIGKILLs it.
pub async fn stop_pid(pid: u32, signal: Signal, grace: Duration) {
    let target = Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(target, signal);
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive(pid) {
        let _ = nix::sys::signal::kill(target, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

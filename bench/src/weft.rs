//! Driving weft's lab for the benchmarks: bringing it up, installing
//! Services through manifests, and reading the node's pinned load-balancer
//! maps directly (the ground truth of what the datapath forwards by).
//!
//! Benchmark manifests go into a `bench/` subdirectory of the lab's
//! manifest directory: svc-watcher reads it (it walks subdirectories), the
//! lab's own controllers do not (they read only the top level), so tens of
//! thousands of Services cost the lab's reconcile loop nothing and the
//! machine's CPU stays with what is measured.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use datapath_svc::{
    bpf::KernelLbMaps,
    maps::{IPPROTO_TCP, Lb4Key, be_addr, be_port},
};
use weft_lab::{LabConfig, OwnedLab};

/// The capacity the benchmarks give the load-balancer maps: 50,000
/// Services with 3 backends take 200,000 service entries, 10,000 with 10
/// take 110,000 (datapath-svc's `--bpf-lb-map-max`, through its env var).
pub const LB_MAP_MAX: u32 = 262_144;

pub struct BenchLab {
    pub lab: OwnedLab,
    pub name: String,
}

impl BenchLab {
    /// Brings up a one-node lab named `name`.
    pub async fn up(
        name: &str,
        bin_dir: &Path,
        configure: impl FnOnce(&mut LabConfig),
    ) -> anyhow::Result<Self> {
        let run_dir = PathBuf::from("/run/weft-bench").join(name);
        let mut cfg = LabConfig::new(name, run_dir, bin_dir);
        cfg.nodes = 1;
        configure(&mut cfg);
        let lab = OwnedLab::up(cfg).await?;
        std::fs::create_dir_all(lab.manifests.root().join("bench"))?;
        Ok(Self {
            lab,
            name: name.to_string(),
        })
    }

    pub fn node(&self) -> String {
        format!("{}-node1", self.name)
    }

    pub fn bench_dir(&self) -> PathBuf {
        self.lab.manifests.root().join("bench")
    }

    /// Writes a manifest into the benchmark directory atomically (temp
    /// file + rename, as every writer of the directory does).
    pub fn write(&self, file: &str, text: &str) -> anyhow::Result<()> {
        write_atomic(&self.bench_dir().join(file), text)
    }

    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        let path = self.bench_dir().join(file);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/weft").join(self.node())
    }

    pub async fn down(self) {
        self.lab.down().await
    }
}

pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// The backend count of a TCP frontend's master entry, if programmed.
pub fn frontend_count(maps: &KernelLbMaps, ip: Ipv4Addr, port: u16) -> Option<u16> {
    let key = Lb4Key {
        address: be_addr(ip),
        dport: be_port(port),
        backend_slot: 0,
        proto: IPPROTO_TCP,
        ..Default::default()
    };
    maps.service(&key).map(|s| s.count)
}

/// Waits until at least `n` frontends are programmed and `target` has
/// `backends` backends; returns how long that took from `since`.
pub fn wait_programmed(
    pin_dir: &Path,
    n: usize,
    target: (Ipv4Addr, u16, u16),
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let deadline = since + timeout;
    let mut maps = None;
    loop {
        if maps.is_none() {
            maps = KernelLbMaps::open_pinned(pin_dir).ok();
        }
        if let Some(m) = &maps
            && frontend_count(m, target.0, target.1) == Some(target.2)
            && m.frontends() >= n
        {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            let got = maps.as_ref().map(|m| m.frontends()).unwrap_or(0);
            bail!("{got} of {n} frontends programmed after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// RSS and peak RSS (KiB) of a process, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The pid of the process running `bin` inside network namespace `netns`.
pub fn find_pid(bin: &Path, netns: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let target = std::fs::metadata(weft_lab::net::netns_path(netns)).ok()?;
    let bin = std::fs::canonicalize(bin).ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe != bin {
            continue;
        }
        if let Ok(m) = std::fs::metadata(entry.path().join("ns/net"))
            && m.dev() == target.dev()
            && m.ino() == target.ino()
        {
            return Some(pid);
        }
    }
    None
}

//! What a real cluster is made of, built by the repository's scripts:
//! upstream Kubernetes (`deploy/kube/build.sh`, cached by release), the
//! images besides weft's (`deploy/kube/images.sh`, cached alike) and the
//! weft image from this checkout's binaries (`deploy/images/build.sh`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::KubeConfig;

/// The repository this binary was built from: where the scripts, the chart
/// and `.tools` are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The upstream programs a cluster runs.
pub const CLUSTER_PROGRAMS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "pause",
    "agnhost",
    "coredns",
];

/// Builds (or finds in the cache) everything a cluster needs, and returns
/// its configuration: upstream binaries and images from the cache, the weft
/// image from the binaries in `weft_bin`, the chart and helm from `repo`.
pub fn prepare(name: &str, repo: &Path, weft_bin: &Path) -> anyhow::Result<KubeConfig> {
    let upstream = PathBuf::from(script(
        &repo.join("deploy/kube/build.sh"),
        CLUSTER_PROGRAMS,
    )?);
    let images_dir = PathBuf::from(script(
        &repo.join("deploy/kube/images.sh"),
        &[&upstream.display().to_string()],
    )?);
    let mut cfg = KubeConfig::new(name, upstream);
    let archive = weft_bin.join("weft-image.tar");
    script(
        &repo.join("deploy/images/build.sh"),
        &[
            "--bin-dir",
            &weft_bin.display().to_string(),
            "--name",
            &cfg.weft_image,
            "--archive",
            &archive.display().to_string(),
        ],
    )?;
    let mut images: Vec<PathBuf> = std::fs::read_dir(&images_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    images.sort();
    images.push(archive);
    cfg.images = images;
    cfg.helm = repo.join(".tools/bin/helm");
    cfg.chart = Some(repo.join("deploy/helm/weft"));
    Ok(cfg)
}

/// What a cluster of only etcd and the API server needs (the programs are
/// built or taken from the cache), with helm and the chart.
pub fn prepare_api_server(name: &str, repo: &Path) -> anyhow::Result<KubeConfig> {
    let upstream = PathBuf::from(script(
        &repo.join("deploy/kube/build.sh"),
        &["kube-apiserver", "kubectl"],
    )?);
    let mut cfg = KubeConfig::new(name, upstream);
    cfg.nodes = 0;
    cfg.helm = repo.join(".tools/bin/helm");
    cfg.chart = Some(repo.join("deploy/helm/weft"));
    Ok(cfg)
}

/// Runs a build script; its last line of output (the path it made).
fn script(path: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", path.display(), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .with_context(|| format!("{} printed no path", path.display()))
}

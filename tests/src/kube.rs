//! A real Kubernetes cluster for a test (`weft_lab::kube`): upstream
//! control plane and kubelets, weft installed by its chart. Torn down when
//! dropped; on a failure the components' logs are printed first.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use weft_lab::kube::{Cluster, artifacts};

use crate::{bin_dir, load::netexec, require_root};

/// The agnhost image the tests' servers and clients run, under the name
/// Kubernetes' e2e suite uses.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.59";

pub struct TestCluster {
    pub cluster: Cluster,
}

impl TestCluster {
    /// Builds what is missing (upstream binaries are cached across runs),
    /// brings a cluster of `nodes` up and installs weft and CoreDNS.
    pub async fn up(name: &str, nodes: usize) -> Self {
        require_root();
        let repo = artifacts::repo_root();
        let owned = name.to_string();
        let mut cfg =
            tokio::task::spawn_blocking(move || artifacts::prepare(&owned, &repo, &bin_dir()))
                .await
                .expect("preparing the cluster")
                .expect("building upstream Kubernetes and the images");
        cfg.nodes = nodes;
        let test = Self {
            cluster: Cluster::new(cfg),
        };
        if let Err(e) = test.cluster.up().await {
            test.print_logs();
            panic!("bringing the cluster up: {e:#}");
        }
        test
    }

    /// The last lines of every component's log, and what kubectl sees.
    pub fn print_logs(&self) {
        let dir = self.cluster.log_dir();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            eprintln!(
                "---- {} (last {} lines)\n{}",
                entry.path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
        let kubectl = self.cluster.kubectl();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            for args in [
                &["get", "nodes,pods", "-A", "-o", "wide"][..],
                &[
                    "-n",
                    "kube-system",
                    "logs",
                    "-l",
                    "app.kubernetes.io/part-of=weft",
                    "--tail=30",
                    "--prefix",
                    "--all-containers",
                ][..],
                &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
            ] {
                match rt.block_on(kubectl.run(args)) {
                    Ok(out) => eprintln!("---- kubectl {}\n{out}", args.join(" ")),
                    Err(e) => eprintln!("---- kubectl {}: {e:#}", args.join(" ")),
                }
            }
        }
    }

    pub async fn down(self) {
        if let Err(e) = self.cluster.down().await {
            eprintln!("cluster teardown: {e:#}");
        }
    }
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        clean_on_drop(&self.cluster.cfg);
    }
}

/// Asks `addr` for its hostname `n` times from inside the network
/// namespace at `netns` (a pod's, a node's, or the outside world's), over
/// new TCP connections (HTTP `/hostname`) or UDP datagrams; the answers, or
/// the first error.
pub async fn hostnames(
    netns: &Path,
    addr: SocketAddr,
    n: usize,
    udp: bool,
) -> anyhow::Result<Vec<String>> {
    let netns: PathBuf = netns.to_path_buf();
    tokio::task::spawn_blocking(move || {
        weft_common::netns::run_in(&netns, move || {
            (0..n)
                .map(|_| {
                    if udp {
                        netexec::udp_hostname(addr, Duration::from_secs(2))
                    } else {
                        netexec::http_hostname(addr, Duration::from_secs(3))
                    }
                })
                .collect()
        })
    })
    .await?
}

/// A plain HTTP GET from inside `netns`: the response body.
pub async fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let netns = netns.to_path_buf();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        weft_common::netns::run_in(&netns, move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").as_bytes())?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            anyhow::ensure!(
                head.contains(" 200 "),
                "GET {path}: {}",
                head.lines().next().unwrap_or("")
            );
            Ok(body.to_string())
        })
    })
    .await?
}

/// svc-watcher's relist count (every kind), from its metrics at `addr`,
/// read from inside `netns`.
pub async fn watcher_relists(netns: &Path, addr: SocketAddr) -> u64 {
    let text = http_get(netns, addr, "/metrics")
        .await
        .expect("svc-watcher metrics");
    text.lines()
        .filter(|l| l.starts_with("weft_watcher_relists_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Removes a cluster from a `Drop`: on a thread of its own, with a
/// runtime of its own, since the drop may run inside the test's runtime.
pub fn clean_on_drop(cfg: &weft_lab::kube::KubeConfig) {
    let cfg = cfg.clone();
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            let _ = rt.block_on(Cluster::clean(&cfg));
        }
    })
    .join();
}

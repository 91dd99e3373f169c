//! Helpers for the end-to-end tests: finding the built binaries, bringing up
//! a lab per test, and waiting for conditions with a patience budget instead
//! of sleeping.

use std::{
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use weft_lab::{Lab, LabConfig, OwnedLab};
use weft_proto::datapath::v1::{ListServicesRequest, datapath_client::DatapathClient};

pub mod chart;
pub mod kube;
pub mod lbmaps;
pub mod load;
pub mod otlp;

/// Where `cargo build` put the binaries: `WEFT_BIN_DIR`, or the directory
/// above this test executable's `deps/`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    deps.parent()
        .expect("target profile directory")
        .to_path_buf()
}

/// The end-to-end tests build namespaces and load eBPF: they need root. CI
/// runs as root; elsewhere this fails loudly rather than skipping.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "end-to-end tests need root (network namespaces, eBPF); run the suite with sudo"
    );
}

/// A lab for one test, torn down when dropped (also on panic).
pub struct TestLab(OwnedLab);

impl TestLab {
    /// Brings up a lab named after the test (kept short: it prefixes
    /// namespaces and node names).
    pub async fn up(test: &str, nodes: usize) -> Self {
        Self::up_with(test, nodes, |_| {}).await
    }

    /// Like [`TestLab::up`], with the lab's configuration adjusted by
    /// `configure` first (an OTLP endpoint, say).
    pub async fn up_with(test: &str, nodes: usize, configure: impl FnOnce(&mut LabConfig)) -> Self {
        require_root();
        let name = format!("t{}", short_hash(test));
        let run_dir = std::env::temp_dir().join("weft-e2e").join(&name);
        let mut cfg = LabConfig::new(&name, run_dir, bin_dir());
        cfg.nodes = nodes;
        cfg.log_level = "info,weft=debug".into();
        configure(&mut cfg);
        match OwnedLab::up(cfg).await {
            Ok(lab) => Self(lab),
            Err(e) => panic!("{e:#}"),
        }
    }

    pub async fn down(self) {
        self.0.down().await
    }

    /// A client of `node`'s datapath-svc.
    pub fn datapath(&self, node: &str) -> DatapathClient<tonic::transport::Channel> {
        DatapathClient::new(
            self.channel(&format!("datapath-svc/{node}"))
                .expect("channel"),
        )
    }

    /// The cluster IP the lab's allocator gave Service `name` (in the
    /// default namespace's manifests), once it has one.
    pub async fn cluster_ip(&self, name: &str) -> Ipv4Addr {
        eventually(Duration::from_secs(10), "cluster IP allocated", || async {
            self.manifests
                .read()
                .services
                .iter()
                .find(|(_, s)| s.metadata.name.as_deref() == Some(name))
                .and_then(|(_, s)| s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no cluster IP yet"))
        })
        .await
    }

    /// Waits until `node`'s datapath programs `frontend` (as weftctl prints
    /// it: `10.96.0.10:80/TCP`) with exactly `n` active backends.
    pub async fn wait_frontend(&self, node: &str, frontend: &str, n: usize) {
        self.wait_frontend_in(node, frontend, n, "active").await
    }

    /// Like [`TestLab::wait_frontend`], counting backends in `state`
    /// (`active` or `terminating`).
    pub async fn wait_frontend_in(&self, node: &str, frontend: &str, n: usize, state: &str) {
        let dp = self.datapath(node);
        eventually(
            Duration::from_secs(20),
            &format!("{node}: {frontend} with {n} {state} backends"),
            || {
                let mut dp = dp.clone();
                async move {
                    let services = dp
                        .list_services(ListServicesRequest {})
                        .await?
                        .into_inner()
                        .services;
                    let got = services
                        .iter()
                        .find(|s| s.frontend == frontend)
                        .map(|s| s.backends.iter().filter(|b| b.state == state).count())
                        .unwrap_or(0);
                    anyhow::ensure!(got == n, "{got} {state} backends");
                    Ok(())
                }
            },
        )
        .await;
    }
}

impl std::ops::Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}

fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0xff_ffff)
}

/// A Pod manifest running the lab's pod server, which listens on 8080 (the
/// container port named `http`); pinned to `node` and publishing a
/// `hostPort` when given.
pub fn pod_manifest(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
    host_port: Option<u16>,
) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    let host_port = host_port
        .map(|p| format!("          hostPort: {p}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{labels}spec:\n{node}  containers:\n    - name: server\n      image: weft-lab/pod-server\n      ports:\n        - name: http\n          containerPort: 8080\n{host_port}"
    )
}

/// Polls `check` until it returns `Ok`, or fails with its last error after
/// `patience`.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: not within {patience:?}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A third-party tool: from the repository's `.tools/bin` (where the setup
/// script installs it), else from PATH.
pub fn tool(name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let local = repo.join(".tools/bin").join(name);
    if local.exists() {
        return local;
    }
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output();
    match found {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!("{name} is not installed; scripts/setup.sh installs it"),
    }
}

/// Runs a program inside a lab namespace (entering only its network
/// namespace) and returns (exit status, stdout, stderr).
pub fn run_in_netns(
    netns: &str,
    program: &Path,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program)
        .args(args)
        .output()
        .expect("running nsenter");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

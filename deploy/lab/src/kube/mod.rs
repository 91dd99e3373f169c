//! A real Kubernetes on one machine, for weft to run on the way its users
//! run it.
//!
//! Beside the lab (which plays Kubernetes itself), this brings up upstream
//! Kubernetes built from source (`deploy/kube/build.sh`): etcd, the API
//! server, controller-manager and scheduler in the control-plane namespace,
//! and on every node namespace a containerd and a kubelet of their own
//! (their own mount namespace, state, cgroup parent and node IP), with no
//! kube-proxy. weft goes on with `helm install deploy/helm/weft`, from the
//! image built on this machine (`deploy/images/build.sh`), so its
//! DaemonSet and Deployments run as pods and containerd calls `weft-cni`
//! for every other pod. CoreDNS serves cluster DNS, as in any cluster.
//!
//! The processes run detached: `weft-lab kube up` returns with the
//! cluster running, `weft-lab kube down` removes it.

pub mod artifacts;
pub mod control_plane;
pub mod daemon;
pub mod e2e;
pub mod inspect;
pub mod install;
pub mod kubectl;
pub mod node;
pub mod pki;

use std::{
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;

pub use self::control_plane::API_PORT;
use self::{
    daemon::Daemon,
    kubectl::Kubectl,
    node::NodeLayout,
    pki::{Pki, Subject},
};
use crate::net::{self, CP_ADDR};

/// The pod sandbox image the kubelet and containerd expect (1.35's).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";
/// The cluster DNS Service's address.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// Prefix of its namespaces and node names: `<name>-cp`, `<name>-node1`.
    pub name: String,
    pub nodes: usize,
    /// Certificates, etcd, the nodes' directories and logs.
    pub state_dir: PathBuf,
    /// Pid files and the nodes' mount namespaces.
    pub run_dir: PathBuf,
    /// kube-apiserver, kubelet, kubectl, ... (`deploy/kube/build.sh`).
    pub upstream_bin: PathBuf,
    /// Image archives imported into every node's containerd.
    pub images: Vec<PathBuf>,
    pub helm: PathBuf,
    /// The weft chart; `None` brings the cluster up without weft (its
    /// nodes then stay NotReady: there is no pod network).
    pub chart: Option<PathBuf>,
    /// The weft image, as imported (`localhost/weft:dev`).
    pub weft_image: String,
    /// `native` or `tunnel`.
    pub routing_mode: String,
    /// More `--set` values for `helm install`.
    pub helm_set: Vec<String>,
    pub service_cidr: String,
}

impl KubeConfig {
    pub fn new(name: &str, upstream_bin: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            nodes: 2,
            state_dir: PathBuf::from("/var/lib/weft-lab").join(name),
            run_dir: PathBuf::from("/run/weft-lab").join(name),
            upstream_bin: upstream_bin.into(),
            images: Vec::new(),
            helm: PathBuf::from("helm"),
            chart: None,
            weft_image: "localhost/weft:dev".into(),
            routing_mode: "native".into(),
            helm_set: Vec::new(),
            service_cidr: "10.96.0.0/16".into(),
        }
    }
}

/// A real cluster, up or to be brought up.
pub struct Cluster {
    pub cfg: KubeConfig,
    pub pki: Pki,
}

impl Cluster {
    pub fn new(cfg: KubeConfig) -> Self {
        let pki = Pki::new(cfg.state_dir.join("pki"));
        Self { cfg, pki }
    }

    pub fn cp_netns(&self) -> String {
        format!("{}-cp", self.cfg.name)
    }

    pub fn nodes(&self) -> Vec<NodeLayout> {
        (0..self.cfg.nodes)
            .map(|i| {
                let name = format!("{}-node{}", self.cfg.name, i + 1);
                NodeLayout {
                    addr: net::node_addr(i),
                    dir: self.cfg.state_dir.join("nodes").join(&name),
                    mount_ns: self.cfg.run_dir.join("ns").join(&name),
                    uts_ns: self.cfg.run_dir.join("ns").join(format!("{name}.uts")),
                    name,
                }
            })
            .collect()
    }

    /// How many nodes a cluster of this name has on this machine (its
    /// node namespaces), for commands that attach to one already up.
    pub fn node_count(&self) -> usize {
        let prefix = format!("{}-node", self.cfg.name);
        net::netns_with_prefix(&prefix).len()
    }

    pub fn node(&self, name: &str) -> anyhow::Result<NodeLayout> {
        self.nodes()
            .into_iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn log_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("logs")
    }

    pub fn api_server(&self) -> String {
        format!("https://{CP_ADDR}:{API_PORT}")
    }

    /// kubectl and helm as the cluster's administrator, from the
    /// control-plane namespace.
    pub fn kubectl(&self) -> Kubectl {
        Kubectl {
            bin: self.cfg.upstream_bin.join("kubectl"),
            helm: self.cfg.helm.clone(),
            kubeconfig: self.pki.kubeconfig("admin"),
            netns: self.cp_netns(),
        }
    }

    fn daemon(
        &self,
        name: &str,
        node: Option<&NodeLayout>,
        bin: PathBuf,
        args: Vec<String>,
    ) -> Daemon {
        let id = match node {
            Some(n) => format!("{}-{name}", n.name),
            None => name.to_string(),
        };
        Daemon {
            name: id.clone(),
            netns: node.map_or_else(|| self.cp_netns(), |n| n.name.clone()),
            mount_ns: node.map(|n| n.mount_ns.clone()),
            uts_ns: node.map(|n| n.uts_ns.clone()),
            bin,
            args,
            env: Vec::new(),
            log: self.log_dir().join(format!("{id}.log")),
            pid_file: self.cfg.run_dir.join("pids").join(format!("{id}.pid")),
        }
    }

    /// A node's containerd and kubelet.
    pub fn node_daemons(&self, node: &NodeLayout) -> [Daemon; 2] {
        let containerd = self.daemon(
            "containerd",
            Some(node),
            "containerd".into(),
            vec![format!(
                "--config={}",
                node.config("containerd.toml").display()
            )],
        );
        let kubelet = self.daemon(
            "kubelet",
            Some(node),
            self.cfg.upstream_bin.join("kubelet"),
            vec![
                format!("--config={}", node.config("kubelet.yaml").display()),
                format!("--kubeconfig={}", self.pki.kubeconfig(&node.name).display()),
                format!("--hostname-override={}", node.name),
                format!("--node-ip={}", node.addr),
            ],
        );
        [containerd, kubelet]
    }

    /// A daemon by name: `etcd`, `kube-apiserver`, ...,
    /// `<node>-containerd`, `<node>-kubelet`.
    pub fn find_daemon(&self, name: &str) -> anyhow::Result<Daemon> {
        self.control_plane_daemons()
            .into_iter()
            .chain(self.nodes().iter().flat_map(|n| self.node_daemons(n)))
            .find(|d| d.name == name)
            .with_context(|| format!("no process {name} in this cluster"))
    }

    /// Brings the cluster up: network, certificates, control plane,
    /// nodes, then weft by its chart and cluster DNS. Whatever an earlier
    /// cluster of this name left is removed first.
    pub async fn up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        Self::clean(&self.cfg).await?;
        let _ = std::fs::remove_dir_all(&self.cfg.state_dir);
        std::fs::create_dir_all(self.log_dir())?;
        std::fs::create_dir_all(self.cfg.run_dir.join("pids"))?;
        let nodes = self.nodes();
        let addrs: Vec<_> = nodes.iter().map(|n| (n.name.clone(), n.addr)).collect();
        net::build_topology(&self.cp_netns(), &addrs)?;
        self.write_pki(&nodes)?;
        self.start_control_plane().await?;
        for node in &nodes {
            self.start_node(node).await?;
        }
        self.wait_nodes_registered(Duration::from_secs(60)).await?;
        tracing::info!(seconds = started.elapsed().as_secs(), "Kubernetes is up");
        if let Some(chart) = &self.cfg.chart {
            self.install_weft(chart).await?;
            self.install_dns().await?;
        }
        tracing::info!(seconds = started.elapsed().as_secs(), "cluster is up");
        Ok(())
    }

    /// Brings up only etcd and the API server (no nodes, no controllers):
    /// enough for what talks to the API alone, in seconds.
    pub async fn up_api_server(&self) -> anyhow::Result<()> {
        Self::clean(&self.cfg).await?;
        let _ = std::fs::remove_dir_all(&self.cfg.state_dir);
        std::fs::create_dir_all(self.log_dir())?;
        std::fs::create_dir_all(self.cfg.run_dir.join("pids"))?;
        net::build_topology(&self.cp_netns(), &[])?;
        self.write_pki(&[])?;
        let daemons = self.control_plane_daemons();
        self.start_etcd_and_api_server(&daemons[..2]).await
    }

    fn write_pki(&self, nodes: &[NodeLayout]) -> anyhow::Result<()> {
        let service_ip = first_service_ip(&self.cfg.service_cidr)?;
        let api_names: Vec<String> = [
            CP_ADDR.to_string(),
            service_ip.to_string(),
            "127.0.0.1".into(),
            "localhost".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ]
        .into();
        let ca = self.pki.init(&api_names)?;
        let server = self.api_server();
        ca.kubeconfig(
            "admin",
            &Subject {
                user: "kubernetes-admin",
                groups: &["system:masters"],
            },
            &server,
        )?;
        for component in ["kube-controller-manager", "kube-scheduler"] {
            ca.kubeconfig(
                component,
                &Subject {
                    user: &format!("system:{component}"),
                    groups: &[],
                },
                &server,
            )?;
        }
        ca.issue(
            "apiserver-kubelet-client",
            &Subject {
                user: "kube-apiserver-kubelet-client",
                groups: &["kubeadm:cluster-admins"],
            },
            &[],
        )?;
        for node in nodes {
            ca.kubeconfig(
                &node.name,
                &Subject {
                    user: &format!("system:node:{}", node.name),
                    groups: &["system:nodes"],
                },
                &server,
            )?;
        }
        Ok(())
    }

    async fn start_control_plane(&self) -> anyhow::Result<()> {
        let daemons = self.control_plane_daemons();
        self.start_etcd_and_api_server(&daemons[..2]).await?;
        for d in &daemons[2..] {
            d.start()?;
        }
        Ok(())
    }

    async fn start_etcd_and_api_server(&self, daemons: &[Daemon]) -> anyhow::Result<()> {
        let (etcd, rest) = daemons.split_first().context("etcd")?;
        etcd.start()?;
        self.wait_tcp(&self.cp_netns(), ([127, 0, 0, 1], 2379).into(), etcd)
            .await?;
        let apiserver = rest.first().context("kube-apiserver")?;
        apiserver.start()?;
        let ready = self.wait_api(Duration::from_secs(90));
        tokio::pin!(ready);
        // Fail as soon as the API server exits rather than at the timeout.
        loop {
            tokio::select! {
                r = &mut ready => { r?; break }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if apiserver.pid().is_none() {
                        bail!("the API server exited (log: {})", apiserver.log.display());
                    }
                }
            }
        }
        // The API server calls kubelets (logs, exec, port-forward) with
        // this identity; kubeadm binds it the same way.
        self.kubectl()
            .eventually(
                &[
                    "create",
                    "clusterrolebinding",
                    "kubeadm:cluster-admins",
                    "--clusterrole=cluster-admin",
                    "--group=kubeadm:cluster-admins",
                ],
                Duration::from_secs(30),
            )
            .await?;
        Ok(())
    }

    /// Waits until the API server answers `/readyz`.
    pub async fn wait_api(&self, timeout: Duration) -> anyhow::Result<()> {
        self.kubectl()
            .eventually(&["get", "--raw", "/readyz"], timeout)
            .await
            .map(drop)
            .with_context(|| {
                format!(
                    "the API server did not become ready in {timeout:?} (log: {})",
                    self.log_dir().join("kube-apiserver.log").display()
                )
            })
    }

    async fn wait_tcp(
        &self,
        netns: &str,
        addr: std::net::SocketAddr,
        d: &Daemon,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if crate::client::connect_in(&net::netns_path(netns), addr, Duration::from_secs(1))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if d.pid().is_none() || Instant::now() > deadline {
                bail!(
                    "{} does not answer on {addr} (log: {})",
                    d.name,
                    d.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start_node(&self, node: &NodeLayout) -> anyhow::Result<()> {
        node.create()?;
        std::fs::write(
            node.config("containerd.toml"),
            node.containerd_config(PAUSE_IMAGE),
        )?;
        std::fs::write(
            node.config("kubelet.yaml"),
            node.kubelet_config(&self.pki.ca_cert(), DNS_ADDR),
        )?;
        std::fs::write(node.config("resolv.conf"), "")?;
        let [containerd, kubelet] = self.node_daemons(node);
        self.start_containerd(node, &containerd).await?;
        for image in &self.cfg.images {
            self.import_image(node, image).await?;
        }
        kubelet.start()?;
        Ok(())
    }

    /// Starts a node's containerd and waits for its socket.
    pub async fn start_containerd(
        &self,
        node: &NodeLayout,
        containerd: &Daemon,
    ) -> anyhow::Result<()> {
        containerd.start()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(node, &["version"]).await.is_err() {
            if containerd.pid().is_none() || Instant::now() > deadline {
                bail!(
                    "containerd on {} did not start (log: {})",
                    node.name,
                    containerd.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Loads an image archive into a node's containerd, under the name it
    /// carries, where the kubelet finds it (namespace `k8s.io`).
    pub async fn import_image(&self, node: &NodeLayout, archive: &Path) -> anyhow::Result<()> {
        let archive = archive.display().to_string();
        self.ctr(node, &["images", "import", &archive])
            .await
            .map(drop)
    }

    /// Runs `ctr -n k8s.io` against a node's containerd.
    pub async fn ctr(&self, node: &NodeLayout, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec![
            "ctr",
            "--address",
            node::CONTAINERD_SOCKET,
            "--namespace",
            "k8s.io",
        ];
        all.extend_from_slice(args);
        self.node_exec(node, &all).await
    }

    /// Runs a command on a node: in its network and mount namespaces.
    pub async fn node_exec(&self, node: &NodeLayout, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("nsenter")
            .arg(format!("--net={}", net::netns_path(&node.name).display()))
            .arg(format!("--mount={}", node.mount_ns.display()))
            .arg(format!("--uts={}", node.uts_ns.display()))
            .arg("--")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .context("running nsenter")?;
        if !out.status.success() {
            bail!(
                "{} on {}: {}",
                args.join(" "),
                node.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn wait_nodes_registered(&self, timeout: Duration) -> anyhow::Result<()> {
        for node in self.nodes() {
            self.kubectl()
                .eventually(&["get", "node", &node.name], timeout)
                .await
                .with_context(|| {
                    format!(
                        "node {} did not register (log: {})",
                        node.name,
                        self.log_dir()
                            .join(format!("{}-kubelet.log", node.name))
                            .display()
                    )
                })?;
        }
        Ok(())
    }

    /// Stops everything and removes what it made, but the logs.
    pub async fn down(&self) -> anyhow::Result<()> {
        Self::clean(&self.cfg).await?;
        if let Ok(entries) = std::fs::read_dir(&self.cfg.state_dir) {
            for e in entries.flatten() {
                if e.file_name() != "logs" {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Stops every process of the cluster named in `cfg` (kubelets and
    /// containerds with everything they started, then the control plane),
    /// and removes its namespaces, cgroups and pinned eBPF objects.
    pub async fn clean(cfg: &KubeConfig) -> anyhow::Result<()> {
        let mut cfg = cfg.clone();
        // As many nodes as there are, whatever `cfg` says (`down` does not
        // know how many `up` made).
        cfg.nodes = cfg.nodes.max(Self::new(cfg.clone()).node_count());
        let cluster = Self::new(cfg.clone());
        let grace = Duration::from_secs(10);
        for node in cluster.nodes() {
            for d in cluster.node_daemons(&node).iter().rev() {
                d.stop(Signal::SIGTERM, grace).await;
            }
            kill_node_processes(&node).await;
            for ns in [&node.mount_ns, &node.uts_ns] {
                if ns.exists() {
                    let _ = Command::new("umount").arg(ns).status();
                    let _ = std::fs::remove_file(ns);
                }
            }
            remove_cgroups(&node.cgroup_root());
        }
        // The parent of the nodes' cgroups goes with the last cluster.
        for hierarchy in node::cgroup_hierarchies() {
            let _ = std::fs::remove_dir(hierarchy.join("weft-lab"));
        }
        for d in cluster.control_plane_daemons().iter().rev() {
            d.stop(Signal::SIGTERM, grace).await;
        }
        for ns in net::netns_with_prefix(&format!("{}-", cluster.cfg.name)) {
            net::netns_del(&ns)?;
        }
        if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/weft") {
            let prefix = format!("{}-", cfg.name);
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

/// Kills what runs on a node: every process in its mount namespace
/// (containerd's shims among them) and in its cgroup (the containers).
async fn kill_node_processes(node: &NodeLayout) {
    let Ok(ns) = std::fs::metadata(&node.mount_ns) else {
        return;
    };
    let ns_inode = ns.ino();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut pids: Vec<u32> = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            let in_ns = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|m| m.ino() == ns_inode && ns_inode != 0);
            let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&format!(":{}/", node.cgroup_root())));
            if (in_ns || in_cgroup) && daemon::alive(pid) {
                pids.push(pid);
            }
        }
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes a cgroup and everything under it, in every hierarchy.
fn remove_cgroups(root: &str) {
    for hierarchy in node::cgroup_hierarchies() {
        let dir = hierarchy.join(root.trim_start_matches('/'));
        let mut dirs: Vec<PathBuf> = walk_dirs(&dir);
        // Deepest first: a cgroup goes only once its children have.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return out;
    }
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk_dirs(&e.path()));
        }
    }
    out
}

/// The first address of the Service range: the `kubernetes` Service's.
fn first_service_ip(cidr: &str) -> anyhow::Result<Ipv4Addr> {
    let net: ipnet::Ipv4Net = cidr.parse().context("service CIDR")?;
    Ok(Ipv4Addr::from(u32::from(net.network()) + 1))
}

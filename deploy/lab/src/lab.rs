//! A whole weft cluster on one machine.
//!
//! A control-plane namespace (`<lab>-cp`) holds a bridge, the lab's
//! "network", and runs svc-watcher, ipam-svc and identity-svc. Each node is
//! a namespace joined to the bridge, running its own datapath-svc. Each pod
//! is a namespace set up through the real CNI plugin binary, running the
//! lab's pod server. The lab plays kubelet, scheduler, cluster-IP allocator
//! and endpoints controller over a manifest directory, which svc-watcher
//! serves in place of the Kubernetes API.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::core::v1::{
        Namespace, Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    client::{channel_in, is_serving},
    cluster::{self, MANAGED_BY, MANAGED_BY_LABEL, name_of, ns_of},
    manifests::{ManifestDir, Objects, Origin},
    net::{self, netns_path},
    procs::{Proc, ProcSpec},
};

pub use crate::net::{CP_ADDR, EXTERNAL_IP_RANGE, LOAD_BALANCER_RANGE};
pub const WATCHER_PORT: u16 = 9400;
pub const IPAM_PORT: u16 = 9401;
pub const IDENTITY_PORT: u16 = 9402;
pub const DATAPATH_PORT: u16 = 9403;
/// The port pod servers listen on unless a pod declares its own.
pub const POD_PORT: u16 = 8080;

#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every namespace, node and pin directory of this lab.
    pub name: String,
    pub nodes: usize,
    /// Where the weft binaries are (`target/debug`).
    pub bin_dir: PathBuf,
    /// Manifests, logs and service state.
    pub run_dir: PathBuf,
    pub cluster_pool: String,
    pub mask_size: u8,
    pub service_cidr: ipnet::Ipv4Net,
    pub log_level: String,
    /// OTLP/gRPC collector (`http://127.0.0.1:4317`) that every service
    /// and the CNI plugin send their spans to. The services run in the
    /// control-plane and node namespaces and the plugin in the lab's own, so
    /// the address must answer in each (a collector on 127.0.0.1 in every
    /// namespace, for instance).
    pub otlp_endpoint: Option<String>,
    /// `native` or `tunnel` (VXLAN), passed to every datapath-svc.
    pub routing_mode: String,
    /// More flags for every datapath-svc (`--socket-lb=false`, say).
    pub datapath_args: Vec<String>,
}

impl LabConfig {
    pub fn new(name: &str, run_dir: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            nodes: 1,
            bin_dir: bin_dir.into(),
            run_dir: run_dir.into(),
            cluster_pool: "10.244.0.0/16".into(),
            mask_size: 24,
            service_cidr: ipnet::Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 16)
                .expect("a valid prefix"),
            log_level: "info".into(),
            otlp_endpoint: None,
            routing_mode: "native".into(),
            datapath_args: Vec::new(),
        }
    }
}

/// One invocation of the CNI plugin, as a container runtime makes it.
pub struct CniCall<'a> {
    pub node: &'a str,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `runtimeConfig.portMappings`: the pod's hostPorts.
    pub port_mappings: Vec<serde_json::Value>,
}

impl<'a> CniCall<'a> {
    /// A call for a pod without a UID or hostPorts.
    pub fn new(
        node: &'a str,
        command: &'a str,
        container_id: &'a str,
        netns: &'a str,
        namespace: &'a str,
        name: &'a str,
    ) -> Self {
        Self {
            node,
            command,
            container_id,
            netns,
            namespace,
            name,
            uid: "",
            port_mappings: Vec::new(),
        }
    }
}

/// A pod the lab runs.
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    server: Proc,
}

pub struct Lab {
    pub cfg: LabConfig,
    pub manifests: ManifestDir,
    services: Mutex<BTreeMap<String, Proc>>,
    pods: Mutex<BTreeMap<String, RunningPod>>,
    stop: CancellationToken,
}

impl Lab {
    pub fn cp_netns(&self) -> String {
        format!("{}-cp", self.cfg.name)
    }

    pub fn node_names(&self) -> Vec<String> {
        (1..=self.cfg.nodes)
            .map(|i| format!("{}-node{i}", self.cfg.name))
            .collect()
    }

    pub fn node_addr(&self, node: &str) -> Option<Ipv4Addr> {
        let i = self.node_names().iter().position(|n| n == node)?;
        Some(net::node_addr(i))
    }

    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        format!("{}-pod-{namespace}-{name}", self.cfg.name)
    }

    pub fn pod_netns_path(&self, namespace: &str, name: &str) -> PathBuf {
        netns_path(&self.pod_netns(namespace, name))
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.cfg.run_dir.join("nodes").join(node)
    }

    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni.sock")
    }

    /// Where the CNI plugin queues DELs for a node while its datapath-svc
    /// is down (the plugin's `delQueueDir`, datapath-svc's
    /// `--cni-del-queue-dir`).
    pub fn cni_del_queue_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni-del-queue")
    }

    /// Where a node's datapath-svc pins its maps and links.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/weft").join(node)
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.cfg.bin_dir.join(name)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.cfg.run_dir.join("logs")
    }

    /// Removes whatever an earlier lab of the same name left behind:
    /// processes, namespaces and pinned eBPF objects.
    pub fn clean(name: &str) -> anyhow::Result<()> {
        let prefix = format!("{name}-");
        for ns in net::netns_with_prefix(&prefix) {
            kill_processes_in(&ns);
            net::netns_del(&ns)?;
        }
        if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/weft") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Builds the lab's network, starts every service and waits until each
    /// node has its pod CIDR. The lab's control loops run until `down`.
    pub async fn up(cfg: LabConfig) -> anyhow::Result<Arc<Self>> {
        for bin in [
            "svc-watcher",
            "ipam-svc",
            "identity-svc",
            "datapath-svc",
            "weft-cni",
            "weft-lab",
        ] {
            let path = cfg.bin_dir.join(bin);
            if !path.exists() {
                bail!(
                    "{} is missing: build the workspace first (cargo build --workspace)",
                    path.display()
                );
            }
        }
        Self::clean(&cfg.name)?;
        let _ = std::fs::remove_dir_all(&cfg.run_dir);
        let manifests = ManifestDir::new(cfg.run_dir.join("manifests"))?;
        let lab = Arc::new(Self {
            cfg,
            manifests,
            services: Mutex::new(BTreeMap::new()),
            pods: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        });
        std::fs::create_dir_all(lab.log_dir())?;
        lab.build_network()?;
        lab.seed_manifests()?;
        lab.start_control_plane().await?;
        for node in lab.node_names() {
            lab.start_datapath(&node).await?;
        }
        lab.wait_nodes_ready(Duration::from_secs(30)).await?;
        let looping = lab.clone();
        tokio::spawn(async move { looping.control_loop().await });
        Ok(lab)
    }

    fn build_network(&self) -> anyhow::Result<()> {
        let nodes = self
            .node_names()
            .into_iter()
            .map(|n| {
                let addr = self.node_addr(&n).context("node address")?;
                std::fs::create_dir_all(self.node_dir(&n))?;
                Ok((n, addr))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        net::build_topology(&self.cp_netns(), &nodes)
    }

    fn seed_manifests(&self) -> anyhow::Result<()> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.manifests
            .write(&self.manifests.path_for("Namespace", "", "default"), &ns)?;
        for node in self.node_names() {
            let addr = self.node_addr(&node).context("node address")?;
            let obj = Node {
                metadata: ObjectMeta {
                    name: Some(node.clone()),
                    labels: Some(BTreeMap::from([(
                        "kubernetes.io/hostname".into(),
                        node.clone(),
                    )])),
                    ..Default::default()
                },
                spec: Some(NodeSpec::default()),
                status: Some(NodeStatus {
                    addresses: Some(vec![
                        NodeAddress {
                            type_: "InternalIP".into(),
                            address: addr.to_string(),
                        },
                        NodeAddress {
                            type_: "Hostname".into(),
                            address: node.clone(),
                        },
                    ]),
                    ..Default::default()
                }),
            };
            self.manifests
                .write(&self.manifests.path_for("Node", "", &node), &obj)?;
        }
        Ok(())
    }

    fn spec(&self, name: &str, netns: String, bin: &str, mut args: Vec<String>) -> ProcSpec {
        let mut env = vec![("RUST_BACKTRACE".into(), "1".into())];
        if let Some(endpoint) = &self.cfg.otlp_endpoint {
            args.push(format!("--otlp-endpoint={endpoint}"));
            // Export within a fraction of a second (the default waits 5 s),
            // so a trace is complete by the time someone looks.
            env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
        }
        ProcSpec {
            name: name.to_string(),
            netns,
            bin: self.bin(bin),
            args,
            env,
            log: self
                .log_dir()
                .join(format!("{}.log", name.replace('/', "-"))),
        }
    }

    fn control_plane_specs(&self) -> Vec<ProcSpec> {
        let cp = self.cp_netns();
        let state = self.cfg.run_dir.join("state");
        let lvl = self.cfg.log_level.clone();
        vec![
            self.spec(
                "svc-watcher",
                cp.clone(),
                "svc-watcher",
                vec![
                    format!("--listen=0.0.0.0:{WATCHER_PORT}"),
                    "--source=manifests".into(),
                    format!("--manifests-dir={}", self.manifests.root().display()),
                    "--metrics-listen=0.0.0.0:9410".into(),
                    format!("--log-level={lvl}"),
                ],
            ),
            self.spec(
                "ipam-svc",
                cp.clone(),
                "ipam-svc",
                vec![
                    format!("--listen=0.0.0.0:{IPAM_PORT}"),
                    format!("--state-dir={}", state.join("ipam").display()),
                    format!("--watcher=http://127.0.0.1:{WATCHER_PORT}"),
                    format!("--cluster-pool-ipv4-cidr={}", self.cfg.cluster_pool),
                    format!("--cluster-pool-ipv4-mask-size={}", self.cfg.mask_size),
                    "--metrics-listen=0.0.0.0:9411".into(),
                    format!("--log-level={lvl}"),
                ],
            ),
            self.spec(
                "identity-svc",
                cp,
                "identity-svc",
                vec![
                    format!("--listen=0.0.0.0:{IDENTITY_PORT}"),
                    format!("--state-dir={}", state.join("identity").display()),
                    format!("--watcher=http://127.0.0.1:{WATCHER_PORT}"),
                    "--metrics-listen=0.0.0.0:9412".into(),
                    format!("--log-level={lvl}"),
                ],
            ),
        ]
    }

    fn datapath_spec(&self, node: &str) -> ProcSpec {
        let state = self.cfg.run_dir.join("state").join(node);
        let mut args = vec![
            format!("--node={node}"),
            format!("--listen=0.0.0.0:{DATAPATH_PORT}"),
            format!("--cni-socket={}", self.cni_socket(node).display()),
            format!(
                "--cni-del-queue-dir={}",
                self.cni_del_queue_dir(node).display()
            ),
            format!("--state-dir={}", state.display()),
            format!("--watcher=http://{CP_ADDR}:{WATCHER_PORT}"),
            format!("--ipam=http://{CP_ADDR}:{IPAM_PORT}"),
            format!("--identity=http://{CP_ADDR}:{IDENTITY_PORT}"),
            format!("--routing-mode={}", self.cfg.routing_mode),
            format!("--cluster-pool-ipv4-cidr={}", self.cfg.cluster_pool),
            "--metrics-listen=0.0.0.0:9413".into(),
            format!("--log-level={}", self.cfg.log_level),
        ];
        args.extend(self.cfg.datapath_args.iter().cloned());
        self.spec(
            &format!("datapath-svc/{node}"),
            node.to_string(),
            "datapath-svc",
            args,
        )
    }

    async fn start_control_plane(&self) -> anyhow::Result<()> {
        for spec in self.control_plane_specs() {
            let name = spec.name.clone();
            let proc = Proc::start(spec)?;
            self.services.lock().await.insert(name.clone(), proc);
            self.wait_serving(&name, Duration::from_secs(20)).await?;
        }
        Ok(())
    }

    async fn start_datapath(&self, node: &str) -> anyhow::Result<()> {
        let spec = self.datapath_spec(node);
        let name = spec.name.clone();
        let proc = Proc::start(spec)?;
        self.services.lock().await.insert(name.clone(), proc);
        self.wait_serving(&name, Duration::from_secs(20)).await
    }

    /// A gRPC channel to a lab service: `svc-watcher`, `ipam-svc`,
    /// `identity-svc` or `datapath-svc/<node>`.
    pub fn channel(&self, service: &str) -> anyhow::Result<Channel> {
        let (ns, addr) = match service {
            "svc-watcher" => (self.cp_netns(), SocketAddr::from((CP_ADDR, WATCHER_PORT))),
            "ipam-svc" => (self.cp_netns(), SocketAddr::from((CP_ADDR, IPAM_PORT))),
            "identity-svc" => (self.cp_netns(), SocketAddr::from((CP_ADDR, IDENTITY_PORT))),
            other => {
                let node = other
                    .strip_prefix("datapath-svc/")
                    .with_context(|| format!("unknown service {other}"))?;
                let addr = self
                    .node_addr(node)
                    .with_context(|| format!("unknown node {node}"))?;
                (node.to_string(), SocketAddr::from((addr, DATAPATH_PORT)))
            }
        };
        channel_in(netns_path(&ns), addr)
    }

    /// Waits until a service's gRPC health reports SERVING.
    pub async fn wait_serving(&self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_serving(self.channel(service)?).await {
                return Ok(());
            }
            {
                let mut services = self.services.lock().await;
                if let Some(p) = services.get_mut(service)
                    && !p.is_running()
                {
                    bail!("{service} exited; see {}", p.log_path().display());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{service} did not become healthy within {timeout:?}; see {}",
                    self.log_dir().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_nodes_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for node in self.node_names() {
            let mut client = weft_proto::datapath::v1::datapath_client::DatapathClient::new(
                self.channel(&format!("datapath-svc/{node}"))?,
            );
            loop {
                if let Ok(s) = client
                    .status(weft_proto::datapath::v1::StatusRequest {})
                    .await
                    && !s.get_ref().pod_cidr.is_empty()
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {node} got no pod CIDR within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stops a service process gracefully (SIGTERM).
    pub async fn stop_service(
        &self,
        service: &str,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let mut services = self.services.lock().await;
        let p = services
            .get_mut(service)
            .with_context(|| format!("unknown service {service}"))?;
        Ok(p.stop().await)
    }

    /// Kills a service process (SIGKILL).
    pub async fn kill_service(&self, service: &str) -> anyhow::Result<()> {
        let mut services = self.services.lock().await;
        let p = services
            .get_mut(service)
            .with_context(|| format!("unknown service {service}"))?;
        p.kill().await;
        Ok(())
    }

    /// The process id of a running service, to signal it directly (SIGSTOP
    /// to make it hang, say).
    pub async fn service_pid(&self, service: &str) -> Option<u32> {
        self.services.lock().await.get(service).and_then(Proc::pid)
    }

    /// Starts a stopped service again with the same flags.
    pub async fn start_service(&self, service: &str) -> anyhow::Result<()> {
        {
            let mut services = self.services.lock().await;
            let p = services
                .get_mut(service)
                .with_context(|| format!("unknown service {service}"))?;
            p.restart()?;
        }
        self.wait_serving(service, Duration::from_secs(20)).await
    }

    /// The running pods: (namespace/name, node, ip).
    pub async fn pods(&self) -> Vec<(String, String, Ipv4Addr)> {
        self.pods
            .lock()
            .await
            .iter()
            .map(|(k, p)| (k.clone(), p.node.clone(), p.ip))
            .collect()
    }

    /// Waits until a pod is running and reported ready in the manifests.
    pub async fn wait_pod_ready(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Ipv4Addr> {
        let deadline = Instant::now() + timeout;
        loop {
            let objs = self.manifests.read();
            if let Some((_, pod)) = objs
                .pods
                .iter()
                .find(|(_, p)| ns_of(&p.metadata) == namespace && name_of(&p.metadata) == name)
                && cluster::pod_ready(pod)
                && let Some(ip) = cluster::pod_ip(pod)
            {
                return Ok(ip);
            }
            if Instant::now() > deadline {
                bail!("pod {namespace}/{name} not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a lab pod server outside the cluster (in the control-plane
    /// namespace, which stands for the world outside) and returns its
    /// address.
    pub async fn start_outside_server(&self, name: &str, port: u16) -> anyhow::Result<SocketAddr> {
        let proc = Proc::start(ProcSpec {
            name: format!("outside/{name}"),
            netns: self.cp_netns(),
            bin: self.bin("weft-lab"),
            args: vec![
                "pod-server".into(),
                format!("--name={name}"),
                format!("--port={port}"),
            ],
            env: vec![],
            log: self.log_dir().join(format!("outside-{name}.log")),
        })?;
        self.services
            .lock()
            .await
            .insert(format!("outside/{name}"), proc);
        let addr = SocketAddr::from((CP_ADDR, port));
        let ns = netns_path(&self.cp_netns());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = ns.clone();
            let up = tokio::task::spawn_blocking(move || {
                weft_common::netns::run_in(&probe, move || {
                    Ok(
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                            .is_ok(),
                    )
                })
            })
            .await??;
            if up {
                return Ok(addr);
            }
            if Instant::now() > deadline {
                bail!("the outside server {name} did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Marks a pod as terminating (sets its deletionTimestamp), as the API
    /// server does when a pod is deleted with a grace period: it keeps
    /// running, but its endpoints stop being ready.
    pub fn mark_terminating(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let objs = self.manifests.read();
        let (origin, pod) = objs
            .pods
            .iter()
            .find(|(_, p)| ns_of(&p.metadata) == namespace && name_of(&p.metadata) == name)
            .with_context(|| format!("no pod {namespace}/{name}"))?;
        let mut pod = pod.clone();
        pod.metadata.deletion_timestamp = {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            k8s_openapi::jiff::Timestamp::from_second(now)
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
        };
        self.manifests.replace(origin, &pod)
    }

    /// The control loops: every 100 ms when the manifests changed, and every
    /// 2 s regardless.
    async fn control_loop(self: Arc<Self>) {
        let mut last = None;
        let mut last_full = Instant::now();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let fp = self.manifests.fingerprint();
            if last.as_ref() == Some(&fp) && last_full.elapsed() < Duration::from_secs(2) {
                continue;
            }
            last_full = Instant::now();
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = format!("{e:#}"), "lab reconcile");
            }
            last = Some(self.manifests.fingerprint());
        }
    }

    /// One pass of the lab's controllers.
    pub async fn reconcile(&self) -> anyhow::Result<()> {
        let objs = self.manifests.read();
        self.allocate_cluster_ips(&objs)?;
        self.schedule(&objs)?;
        let objs = self.manifests.read();
        self.kubelet(&objs).await?;
        let objs = self.manifests.read();
        self.endpoints_controller(&objs)
    }

    fn allocate_cluster_ips(&self, objs: &Objects) -> anyhow::Result<()> {
        let mut used: BTreeSet<Ipv4Addr> = objs
            .services
            .iter()
            .filter_map(|(_, s)| s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok())
            .collect();
        for (origin, svc) in &objs.services {
            let Some(spec) = &svc.spec else { continue };
            if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty())
                || spec.type_.as_deref() == Some("ExternalName")
            {
                continue;
            }
            let ip = cluster::next_cluster_ip(self.cfg.service_cidr, &used)
                .context("service CIDR exhausted")?;
            used.insert(ip);
            let mut svc = svc.clone();
            if let Some(spec) = svc.spec.as_mut() {
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
            self.manifests.replace(origin, &svc)?;
        }
        Ok(())
    }

    /// Assigns pods without a node to the lab's nodes, round robin.
    fn schedule(&self, objs: &Objects) -> anyhow::Result<()> {
        let nodes = self.node_names();
        let mut load: BTreeMap<String, usize> = nodes.iter().map(|n| (n.clone(), 0)).collect();
        for (_, p) in &objs.pods {
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
                *load.entry(n.clone()).or_default() += 1;
            }
        }
        for (origin, pod) in &objs.pods {
            if pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some()
            {
                continue;
            }
            let Some(node) = load.iter().min_by_key(|(_, n)| **n).map(|(k, _)| k.clone()) else {
                continue;
            };
            *load.entry(node.clone()).or_default() += 1;
            let mut pod = pod.clone();
            pod.spec.get_or_insert_with(Default::default).node_name = Some(node);
            self.manifests.replace(origin, &pod)?;
        }
        Ok(())
    }

    /// Runs the pods the manifests place on lab nodes, tears down the ones
    /// that are gone, and reports status back.
    async fn kubelet(&self, objs: &Objects) -> anyhow::Result<()> {
        let nodes: BTreeSet<String> = self.node_names().into_iter().collect();
        let wanted: BTreeMap<String, (&Origin, &Pod)> = objs
            .pods
            .iter()
            .filter(|(_, p)| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| nodes.contains(n))
            })
            .map(|(o, p)| {
                (
                    format!("{}/{}", ns_of(&p.metadata), name_of(&p.metadata)),
                    (o, p),
                )
            })
            .collect();
        let running: Vec<String> = self.pods.lock().await.keys().cloned().collect();
        for key in running.iter().filter(|k| !wanted.contains_key(*k)) {
            let pod = self.pods.lock().await.remove(key);
            if let Some(pod) = pod {
                self.stop_pod(pod).await?;
            }
        }
        for (key, (origin, pod)) in wanted {
            let known = self.pods.lock().await.get(&key).map(|p| p.ip);
            let ip = match known {
                Some(ip) => ip,
                None => match self.start_pod(pod).await {
                    Ok(running) => {
                        let ip = running.ip;
                        self.pods.lock().await.insert(key.clone(), running);
                        ip
                    }
                    Err(e) => {
                        tracing::warn!(pod = %key, error = format!("{e:#}"), "starting pod");
                        continue;
                    }
                },
            };
            if cluster::pod_ip(pod) != Some(ip) || !cluster::pod_ready(pod) {
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                let mut pod = pod.clone();
                pod.status = Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(ip.to_string()),
                    pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
                    host_ip: self.node_addr(&node).map(|a| a.to_string()),
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                });
                self.manifests.replace(origin, &pod)?;
            }
        }
        Ok(())
    }

    fn pod_ports(pod: &Pod) -> Vec<u16> {
        let mut ports: Vec<u16> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        ports.sort();
        ports.dedup();
        if ports.is_empty() {
            ports.push(POD_PORT);
        }
        ports
    }

    async fn start_pod(&self, pod: &Pod) -> anyhow::Result<RunningPod> {
        let namespace = ns_of(&pod.metadata);
        let name = name_of(&pod.metadata);
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .context("pod has no node")?;
        let netns = self.pod_netns(&namespace, &name);
        net::netns_add(&netns)?;
        let container_id = format!("{:032x}", rand::random::<u128>());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let call = CniCall {
            node: &node,
            command: "ADD",
            container_id: &container_id,
            netns: &netns,
            namespace: &namespace,
            name: &name,
            uid: &uid,
            port_mappings: Self::port_mappings(pod),
        };
        let result = self.cni(&call).await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let _ = net::netns_del(&netns);
                return Err(e);
            }
        };
        let ip = first_ip(&out).with_context(|| format!("CNI result without an address: {out}"))?;
        let ports = Self::pod_ports(pod);
        let mut args = vec!["pod-server".to_string(), format!("--name={name}")];
        args.extend(ports.iter().map(|p| format!("--port={p}")));
        let server = Proc::start(ProcSpec {
            name: format!("pod/{namespace}/{name}"),
            netns: netns.clone(),
            bin: self.bin("weft-lab"),
            args,
            env: vec![],
            log: self.log_dir().join(format!("pod-{namespace}-{name}.log")),
        })?;
        // Ready when the server answers, as a readiness probe would say.
        let probe_ns = netns_path(&netns);
        let port = ports[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ns = probe_ns.clone();
            let up = tokio::task::spawn_blocking(move || {
                weft_common::netns::run_in(&ns, move || {
                    Ok(std::net::TcpStream::connect_timeout(
                        &SocketAddr::from((ip, port)),
                        Duration::from_millis(200),
                    )
                    .is_ok())
                })
            })
            .await??;
            if up {
                break;
            }
            if Instant::now() > deadline {
                bail!("pod {namespace}/{name}: server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(pod = %format!("{namespace}/{name}"), %node, %ip, "pod running");
        Ok(RunningPod {
            namespace,
            name,
            node,
            netns,
            container_id,
            ip,
            server,
        })
    }

    async fn stop_pod(&self, mut pod: RunningPod) -> anyhow::Result<()> {
        pod.server.stop().await;
        self.cni(&CniCall::new(
            &pod.node,
            "DEL",
            &pod.container_id,
            &pod.netns,
            &pod.namespace,
            &pod.name,
        ))
        .await?;
        net::netns_del(&pod.netns)?;
        tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "pod removed");
        Ok(())
    }

    /// A pod's hostPorts as the runtime hands them to CNI plugins
    /// (`runtimeConfig.portMappings`, the portmap convention).
    fn port_mappings(pod: &Pod) -> Vec<serde_json::Value> {
        pod.spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.host_port.is_some_and(|h| h > 0))
            // As containerd 1.6 and 1.7 write them (go-cni's struct has no
            // JSON tags), not as the CNI spec spells them: the real runtime
            // is what the plugin must read.
            .map(|p| {
                serde_json::json!({
                    "HostPort": p.host_port,
                    "ContainerPort": p.container_port,
                    "Protocol": p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                    "HostIP": p.host_ip.clone().unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Runs the CNI plugin binary the way kubelet's runtime does; a
    /// failure is an error carrying the plugin's output.
    pub async fn cni(&self, call: &CniCall<'_>) -> anyhow::Result<String> {
        let out = self.cni_output(call).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "CNI {} for {}/{} failed: {stdout} {}",
                call.command,
                call.namespace,
                call.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Runs the CNI plugin binary and returns what it printed and its exit
    /// status, success or not (tests look at the CNI error object).
    pub async fn cni_output(&self, call: &CniCall<'_>) -> anyhow::Result<std::process::Output> {
        let CniCall {
            node,
            command,
            container_id,
            netns,
            namespace,
            name,
            uid,
            port_mappings,
        } = call;
        // The plugin's entry of the chart's config list, with the list's
        // name and version, as containerd hands it over.
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "socketPath": self.cni_socket(node),
            "delQueueDir": self.cni_del_queue_dir(node),
            "otlpEndpoint": self.cfg.otlp_endpoint,
            "runtimeConfig": { "portMappings": port_mappings },
        });
        let mut child = tokio::process::Command::new(self.bin("weft-cni"))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns_path(netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cfg.bin_dir)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the CNI plugin")?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            stdin.write_all(conf.to_string().as_bytes()).await?;
        }
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("CNI plugin timed out")?
            .context("waiting for the CNI plugin")
    }

    fn endpoints_controller(&self, objs: &Objects) -> anyhow::Result<()> {
        let running: Vec<&Pod> = objs.pods.iter().map(|(_, p)| p).collect();
        let mut keep = BTreeSet::new();
        for (_, svc) in &objs.services {
            let Some(slice) = cluster::endpoint_slice(svc, &running) else {
                continue;
            };
            let ns = ns_of(&slice.metadata);
            let name = name_of(&slice.metadata);
            keep.insert((ns.clone(), name.clone()));
            let existing = objs
                .slices
                .iter()
                .find(|(_, s)| ns_of(&s.metadata) == ns && name_of(&s.metadata) == name);
            match existing {
                Some((_, s)) if s.endpoints == slice.endpoints && s.ports == slice.ports => {}
                Some((origin, _)) => self.manifests.replace(origin, &slice)?,
                None => self.manifests.write(
                    &self.manifests.path_for("EndpointSlice", &ns, &name),
                    &slice,
                )?,
            }
        }
        for (origin, s) in &objs.slices {
            let managed = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|v| v == MANAGED_BY);
            if managed && !keep.contains(&(ns_of(&s.metadata), name_of(&s.metadata))) {
                self.manifests.remove(origin)?;
            }
        }
        Ok(())
    }

    /// Stops the lab: pods (through CNI DEL), datapaths, control plane, and
    /// removes the namespaces and pins. Logs stay under the run directory.
    pub async fn down(&self) -> anyhow::Result<()> {
        self.stop.cancel();
        let pods: Vec<RunningPod> = std::mem::take(&mut *self.pods.lock().await)
            .into_values()
            .collect();
        for pod in pods {
            if let Err(e) = self.stop_pod(pod).await {
                tracing::warn!(error = format!("{e:#}"), "stopping a pod");
            }
        }
        let mut services = std::mem::take(&mut *self.services.lock().await);
        for node in self.node_names() {
            if let Some(mut p) = services.remove(&format!("datapath-svc/{node}")) {
                p.stop().await;
            }
        }
        for (_, mut p) in services {
            p.stop().await;
        }
        Self::clean(&self.cfg.name)
    }

    pub fn run_dir(&self) -> &Path {
        &self.cfg.run_dir
    }
}

fn first_ip(cni_result: &str) -> Option<Ipv4Addr> {
    let v: serde_json::Value = serde_json::from_str(cni_result).ok()?;
    let addr = v.get("ips")?.get(0)?.get("address")?.as_str()?;
    addr.split('/').next()?.parse().ok()
}

/// Kills every process whose network namespace is the named one: processes
/// of an earlier lab that was not shut down.
fn kill_processes_in(ns: &str) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(target) = std::fs::metadata(netns_path(ns)) else {
        return;
    };
    let (dev, ino) = (target.dev(), target.ino());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(entry.path().join("ns/net"))
            && m.dev() == dev
            && m.ino() == ino
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A lab owned by its holder (a test, a benchmark): torn down by
/// [`OwnedLab::down`], and cleaned up when dropped without it, also on a
/// panic, so no namespaces, processes or pins outlive their owner.
pub struct OwnedLab {
    pub lab: Arc<Lab>,
}

impl OwnedLab {
    /// Brings up a lab; one that fails half-way is cleaned up at once.
    pub async fn up(cfg: LabConfig) -> anyhow::Result<Self> {
        let name = cfg.name.clone();
        match Lab::up(cfg).await {
            Ok(lab) => Ok(Self { lab }),
            Err(e) => {
                let _ = Lab::clean(&name);
                Err(e.context(format!("bringing up lab {name}")))
            }
        }
    }

    pub async fn down(self) {
        if let Err(e) = self.lab.down().await {
            eprintln!("lab {} teardown: {e:#}", self.lab.cfg.name);
        }
    }
}

impl Drop for OwnedLab {
    fn drop(&mut self) {
        let _ = Lab::clean(&self.lab.cfg.name);
    }
}

impl std::ops::Deref for OwnedLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

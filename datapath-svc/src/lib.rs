//! datapath-svc: weft's agent on every node.
//!
//! It owns the eBPF programs and maps of its node, hands out pod addresses
//! from the node's CIDR, plumbs pods on CNI ADD and DEL, and keeps the
//! load-balancer maps equal to the cluster state that svc-watcher streams.
//! Everything it needs to keep forwarding is pinned in bpffs or cached in
//! sled, so neither its own restart nor the control plane's interrupts
//! traffic.

pub mod agent;
pub mod api;
pub mod bpf;
pub mod cluster;
pub mod cni;
pub mod control;
pub mod endpoints;
pub mod lb;
pub mod maps;
pub mod metrics;
pub mod podipam;
pub mod podnet;
pub mod sync;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use weft_common::{
    client::lazy_channel, config::CommonArgs, grpc::GrpcServer, shutdown::Shutdown, store::Store,
};
use weft_proto::datapath::v1::{cni_server::CniServer, datapath_server::DatapathServer};

use crate::{
    agent::{Agent, AgentParts},
    bpf::Programs,
    cluster::{ClusterCache, LbController},
    endpoints::Endpoints,
    podipam::PodIpam,
    sync::LbSync,
};

/// datapath-svc: eBPF load-balancing and pod networking for one node.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "datapath-svc", version)]
pub struct Args {
    /// This node's name, as in its Kubernetes Node object.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node: String,

    /// Address of the Datapath gRPC API (status, services, endpoints).
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:9403")]
    pub listen: SocketAddr,

    /// Unix socket the CNI plugin talks to; only root may connect.
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = "/run/weft/cni.sock")]
    pub cni_socket: PathBuf,

    /// Where the local cache lives (pod addresses, endpoints, cluster state).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft/datapath")]
    pub state_dir: PathBuf,

    /// The bpffs mount; maps and links are pinned under `<root>/weft/<node>/`.
    #[arg(long, env = "WEFT_BPF_ROOT", default_value = "/sys/fs/bpf")]
    pub bpf_root: PathBuf,

    /// svc-watcher's gRPC address.
    #[arg(long, env = "WEFT_WATCHER", default_value = "http://127.0.0.1:9400")]
    pub watcher: String,

    /// ipam-svc's gRPC address.
    #[arg(long, env = "WEFT_IPAM", default_value = "http://127.0.0.1:9401")]
    pub ipam: String,

    /// identity-svc's gRPC address.
    #[arg(long, env = "WEFT_IDENTITY", default_value = "http://127.0.0.1:9402")]
    pub identity: String,

    /// MTU of pod interfaces.
    #[arg(long, env = "WEFT_MTU", default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: u32,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Checks what clap cannot: names and addresses that must be usable.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node.is_empty() || self.node.contains('/') || self.node.len() > 253 {
            anyhow::bail!("--node: {:?} is not a valid node name", self.node);
        }
        for (flag, target) in [
            ("--watcher", &self.watcher),
            ("--ipam", &self.ipam),
            ("--identity", &self.identity),
        ] {
            lazy_channel(target).with_context(|| format!("{flag}: {target:?}"))?;
        }
        self.common.metrics_addr()?;
        Ok(())
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_root.join("weft").join(&self.node)
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    if args.common.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let shutdown = Shutdown::on_signals()?;

    podnet::enable_forwarding().context("enabling IPv4 forwarding")?;
    bpf::ensure_bpffs(&args.bpf_root)?;
    let pin_dir = args.pin_dir();
    let (programs, kernel_maps, counters) = Programs::load(&pin_dir)?;
    let counters = Arc::new(counters);

    let store = Store::open(&args.state_dir)?;
    let ipam = PodIpam::new(store.raw_tree("pod_ips")?, control::cached_cidr(&store)?);
    let endpoints = Endpoints::open(&store)?;
    let cache = ClusterCache::open(&store)?;
    let mirror = cache.load()?;
    let lb = LbSync::restore(kernel_maps)?;
    let netlink = podnet::connect()?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry, counters.clone());

    let agent = Arc::new(Agent::new(AgentParts {
        node: args.node.clone(),
        mtu: args.mtu,
        pin_dir: pin_dir.clone(),
        store,
        ipam,
        endpoints,
        programs,
        lb,
        counters,
        netlink,
        cluster: mirror,
        metrics,
    }));

    let restored = agent.restore_endpoints().await?;
    let mut controller = LbController::default();
    {
        let mirror = agent
            .cluster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if mirror.is_synced() {
            let n = controller.full_sync(&agent, &mirror)?;
            tracing::info!(
                frontends = n,
                "load-balancer maps reconciled from the cache"
            );
        }
    }
    tracing::info!(node = %args.node, pin_dir = %pin_dir.display(), endpoints = restored, "datapath ready");

    let token = shutdown.token();
    let watcher = lazy_channel(&args.watcher)?;
    let ipam_channel = lazy_channel(&args.ipam)?;
    let identity_channel = lazy_channel(&args.identity)?;
    let tasks = vec![
        tokio::spawn(cluster::follow(
            agent.clone(),
            cache,
            controller,
            watcher,
            token.clone(),
        )),
        tokio::spawn(control::follow_ipam(
            agent.clone(),
            ipam_channel,
            token.clone(),
        )),
        tokio::spawn(control::follow_identities(
            agent.clone(),
            identity_channel,
            token.clone(),
        )),
    ];
    let metrics_task =
        weft_common::metrics::spawn(args.common.metrics_addr()?, registry, token.clone());

    let cni = GrpcServer::new()
        .add_service(CniServer::new(cni::CniService::new(agent.clone())))
        .serve_unix(&args.cni_socket, token.clone());
    let api = GrpcServer::new()
        .add_service(DatapathServer::new(api::DatapathService::new(
            agent.clone(),
        )))
        .serve_addr(args.listen, token.clone());
    let served = tokio::try_join!(cni, api);
    shutdown.trigger();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(m) = metrics_task {
        let _ = m.await;
    }
    agent.store.flush().await?;
    tracing::info!("datapath-svc stopped; programs and maps stay pinned and keep forwarding");
    served.map(|_| ())
}

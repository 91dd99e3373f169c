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
pub mod cache;
pub mod cluster;
pub mod cni;
pub mod control;
pub mod endpoints;
pub mod flows;
pub mod health;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod podattach;
pub mod podipam;
pub mod podnet;
pub mod policy;
pub mod policy_sync;
pub mod routing;
pub mod sockpods;
pub mod sync;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use weft_common::{
    client::{lazy_channel, lazy_channel_tls},
    config::CommonArgs,
    grpc::GrpcServer,
    shutdown::Shutdown,
    store::Store,
};
use weft_proto::datapath::v1::{cni_server::CniServer, datapath_server::DatapathServer};

use crate::{
    agent::{Agent, AgentParts},
    bpf::Programs,
    cache::ClusterCache,
    cluster::LbController,
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

    /// Where the CNI plugin queues DELs while this agent is down; drained at
    /// start. Must match the plugin's `delQueueDir`.
    #[arg(
        long,
        env = "WEFT_CNI_DEL_QUEUE_DIR",
        default_value = "/var/run/weft/cni-del-queue"
    )]
    pub cni_del_queue_dir: PathBuf,

    /// MTU of pod interfaces; 0 derives it from the external device (less
    /// the VXLAN overhead in tunnel mode).
    #[arg(long, env = "WEFT_MTU", default_value_t = 0, value_parser = mtu)]
    pub mtu: u32,

    /// How pods reach pods on other nodes: routes to each node (`native`)
    /// or a VXLAN overlay (`tunnel`).
    #[arg(long, env = "WEFT_ROUTING_MODE", value_enum, default_value = "native")]
    pub routing_mode: routing::RoutingMode,

    /// The node's external devices (comma-separated); empty picks every
    /// interface that is up and has an IPv4 address.
    #[arg(long, env = "WEFT_DEVICES", value_delimiter = ',', default_value = "")]
    pub devices: Vec<String>,

    /// The cluster's pod CIDR (all nodes' pod CIDRs together): pod traffic
    /// to anywhere outside it is masqueraded.
    #[arg(
        long,
        env = "WEFT_CLUSTER_POOL_IPV4_CIDR",
        default_value = "10.244.0.0/16"
    )]
    pub cluster_pool_ipv4_cidr: ipnet::Ipv4Net,

    /// Masquerade pod traffic leaving the cluster to the node's address, in eBPF.
    #[arg(long, env = "WEFT_ENABLE_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_masquerade: bool,

    /// Default backend selection for Services without the
    /// `weft.io/lb-algorithm` annotation.
    #[arg(long, env = "WEFT_LB_ALGORITHM", default_value = "random", value_parser = ["random", "maglev"])]
    pub lb_algorithm: String,

    /// Maglev lookup table size: a prime; the same on every node.
    #[arg(long, env = "WEFT_MAGLEV_TABLE_SIZE", default_value_t = 16381, value_parser = maglev_size)]
    pub maglev_table_size: u32,

    /// Maglev hash seed: the same on every node.
    #[arg(long, env = "WEFT_MAGLEV_HASH_SEED", default_value_t = 0)]
    pub maglev_hash_seed: u32,

    /// Capacity of the load-balancer service and backend maps (Cilium's
    /// `bpf-lb-map-max`). Every frontend takes one entry plus one per
    /// backend: 10,000 Services with 10 endpoints each need 110,000. Takes
    /// effect when the maps are first created; pinned maps keep their size.
    #[arg(long, env = "WEFT_BPF_LB_MAP_MAX", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub bpf_lb_map_max: u32,

    /// Translate Services at the socket layer (connect, sendmsg, recvmsg,
    /// getpeername) for every process under `--cgroup-root`: the node's own
    /// processes and, unless `--socket-lb-host-namespace-only`, pods too.
    /// Off, every Service is translated per packet.
    #[arg(long, env = "WEFT_SOCKET_LB", default_value_t = true, action = clap::ArgAction::Set)]
    pub socket_lb: bool,

    /// Translate Services at the socket layer for the node's own processes
    /// only, not for pods: their Services are then translated per packet
    /// on their veths. For workloads that must see the Service address on
    /// the wire (some service meshes).
    #[arg(long, env = "WEFT_SOCKET_LB_HOST_NAMESPACE_ONLY", default_value_t = false, action = clap::ArgAction::Set)]
    pub socket_lb_host_namespace_only: bool,

    /// Where to serve kube-proxy's node health endpoint (`/healthz`,
    /// `/livez`: 200 while the datapath is programmed and recent), for
    /// load balancers and monitoring that check it; empty serves none.
    #[arg(long, env = "WEFT_HEALTHZ_LISTEN", default_value = "0.0.0.0:10256")]
    pub healthz_listen: String,

    /// The cgroup v2 directory the socket programs attach to; they apply to
    /// every process in it and below. Empty: the root of the host's cgroup
    /// v2 hierarchy (its first cgroup2 mount), so every process on the node.
    #[arg(long, env = "WEFT_CGROUP_ROOT", default_value = "")]
    pub cgroup_root: String,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn mtu(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v == 0 || (576..=65535).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not 0 or within 576..=65535"))
    }
}

fn maglev_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    maglev::validate_table_size(v).map(|()| v)
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

/// The kube-proxy replacement features this configuration turns on.
fn features(args: &Args) -> Vec<String> {
    let mut f: Vec<String> = [
        "ClusterIP",
        "NodePort",
        "ExternalIP",
        "LoadBalancer",
        "HostPort",
        "SessionAffinity",
        "Maglev",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    f.push(format!(
        "Routing={}",
        match args.routing_mode {
            routing::RoutingMode::Native => "native",
            routing::RoutingMode::Tunnel => "tunnel",
        }
    ));
    if args.enable_masquerade {
        f.push("Masquerade".into());
    }
    if args.socket_lb {
        f.push("SocketLB".into());
        if !args.socket_lb_host_namespace_only {
            f.push("SocketLBPods".into());
        }
    }
    f
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    if args.common.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let shutdown = Shutdown::on_signals()?;
    // mTLS for the API listener and the control-plane clients (not for the
    // node-local CNI socket, which only root can open).
    let tls = args.common.tls()?;

    podnet::enable_forwarding().context("enabling IPv4 forwarding")?;
    bpf::ensure_bpffs(&args.bpf_root)?;
    let netlink = podnet::connect()?;
    let devices = routing::discover_devices(&netlink, &args.devices).await?;
    let pin_dir = args.pin_dir();
    let maglev_cfg = sync::MaglevConfig {
        m: args.maglev_table_size,
        seed: args.maglev_hash_seed,
    };
    let load = bpf::LoadConfig {
        netns_cookie: bpf::netns_cookie().context("reading the network namespace cookie")?,
        cluster_cidr: Some(args.cluster_pool_ipv4_cidr),
        masquerade: args.enable_masquerade,
        maglev: maglev_cfg,
        lb_map_max: args.bpf_lb_map_max,
    };
    let (mut programs, kernel_maps, counters) = Programs::load(&pin_dir, &load)?;
    for d in &devices {
        programs.attach_device(&d.name, d.index, d.addr)?;
    }
    if args.socket_lb {
        let root = if args.cgroup_root.is_empty() {
            bpf::cgroup2_root()
        } else {
            Some(PathBuf::from(&args.cgroup_root))
        };
        match root {
            Some(root) => programs.attach_cgroup(&root)?,
            None => tracing::warn!(
                "no cgroup v2 hierarchy: Services are not reachable from the node's own processes"
            ),
        }
    }
    let counters = Arc::new(counters);
    let policy = policy_sync::PolicySync::restore(programs.take_policy_maps()?)?;
    let flow_ring = programs.take_flows()?;
    let pod_programs = programs
        .take_pod_programs()
        .ok_or_else(|| anyhow::anyhow!("the pod programs were taken twice"))?;
    let sock_pods = sockpods::SockPods::new(programs.take_sock_pods()?);

    let store = Store::open(&args.state_dir)?;
    let ipam = PodIpam::new(store.raw_tree("pod_ips")?, control::cached_cidr(&store)?);
    let endpoints = Endpoints::open(&store)?;
    let cache = ClusterCache::new(&args.state_dir);
    let mirror = cache.load(&store)?;
    let lb = LbSync::restore(kernel_maps, maglev_cfg)?;
    let identity = weft_proto::identity::v1::identity_client::IdentityClient::new(
        lazy_channel_tls(&args.identity, tls.as_ref())?,
    );

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry, counters.clone());

    let device_mtu = devices.first().map(|d| d.mtu).unwrap_or(1500);
    let mtu = match (args.mtu, args.routing_mode) {
        (0, routing::RoutingMode::Tunnel) => device_mtu.saturating_sub(routing::VXLAN_OVERHEAD),
        (0, routing::RoutingMode::Native) => device_mtu,
        (m, _) => m,
    };
    let config = agent::NodeConfig {
        name: args.node.clone(),
        mtu,
        pin_dir: pin_dir.clone(),
        routing_mode: args.routing_mode,
        view: lb::NodeView {
            name: args.node.clone(),
            addrs: devices.iter().map(|d| d.addr).collect(),
            default_algorithm: lb::Algorithm::parse(&args.lb_algorithm).unwrap_or_default(),
        },
        features: features(&args),
        devices,
    };
    let (hostports_tx, hostports_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = Arc::new(Agent::new(AgentParts {
        config,
        store,
        ipam,
        endpoints,
        programs,
        pod_programs,
        sock_pods,
        sock_lb_pods: args.socket_lb && !args.socket_lb_host_namespace_only,
        lb,
        counters,
        netlink,
        cluster: mirror,
        metrics,
        identity,
        hostports_dirty: hostports_tx,
        policy,
        health_checks: health::HealthChecks::new(shutdown.token()),
    }));

    *agent.allocations.lock().unwrap_or_else(|p| p.into_inner()) =
        control::cached_allocations(&agent.store)?;
    let restored = agent.restore_endpoints().await?;
    agent.drain_del_queue(&args.cni_del_queue_dir).await;
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
    let watcher = lazy_channel_tls(&args.watcher, tls.as_ref())?;
    let ipam_channel = lazy_channel_tls(&args.ipam, tls.as_ref())?;
    let identity_channel = lazy_channel_tls(&args.identity, tls.as_ref())?;
    let cache_dirty = Arc::new(tokio::sync::Notify::new());
    let tasks = vec![
        tokio::spawn(cache::keep(
            agent.clone(),
            cache,
            cache_dirty.clone(),
            token.clone(),
        )),
        tokio::spawn(cluster::follow(
            agent.clone(),
            cache_dirty,
            controller,
            watcher,
            hostports_rx,
            token.clone(),
        )),
        tokio::spawn(control::follow_routes(agent.clone(), token.clone())),
        tokio::spawn(policy_sync::follow(agent.clone(), token.clone())),
        tokio::spawn(flows::follow(agent.clone(), flow_ring, token.clone())),
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
    let healthz_task = match args.healthz_listen.trim() {
        "" => None,
        addr => {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| anyhow::anyhow!("--healthz-listen {addr:?}: {e}"))?;
            let health = agent.node_health.clone();
            let token = token.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = health.serve(addr, token).await {
                    tracing::error!(error = %format!("{e:#}"), "node health endpoint stopped");
                }
            }))
        }
    };

    let cni = GrpcServer::new()
        .add_service(CniServer::new(cni::CniService::new(agent.clone())))
        .serve_unix(&args.cni_socket, token.clone());
    let api = GrpcServer::new()
        .tls(tls)
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
    if let Some(h) = healthz_task {
        let _ = h.await;
    }
    agent.store.flush().await?;
    tracing::info!("datapath-svc stopped; programs and maps stay pinned and keep forwarding");
    served.map(|_| ())
}

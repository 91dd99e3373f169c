//! ipam-svc: hands each Node a pod CIDR.
//!
//! In `cluster-pool` mode it carves fixed-size blocks out of the cluster
//! pool(s); in `kubernetes` mode it takes `node.spec.podCIDRs` as they are.
//! Nodes come from svc-watcher; allocations live in a [`store::CidrStore`]
//! and are durable before anyone hears of them, so a restart (or a crash)
//! never hands one block to two nodes and never loses one it reported.
//!
//! # The two stores
//!
//! - `--store sled` (the default, and the local lab): a sled database under
//!   `--state-dir`, flushed before an allocation is reported. One replica
//!   owns it.
//! - `--store kubernetes` (a cluster): one `NodeCIDR` custom resource
//!   (`weft.io/v1alpha1`, CRD in `deploy/crds/`) per allocation, in the API
//!   server found through `--kubeconfig` or the in-cluster configuration.
//!   The API is the truth; a restarted replica reloads from it.
//!
//! # Replicas
//!
//! Any number of replicas may run against the same API without a leader:
//! a block is claimed by creating the object named after it (only one
//! create of a name succeeds), a node's claim is reported only once a
//! consistent read shows it is the node's oldest, deletes carry the
//! resourceVersion they saw, and each replica watches the NodeCIDRs and
//! reloads when another replica changed them, so all replicas converge on
//! the same table and stream it. See [`kube_store`] for the argument.

pub mod allocator;
pub mod config;
pub mod grpc;
pub mod kube_store;
pub mod metrics;
pub mod nodes;
pub mod state;
pub mod store;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;
use weft_common::{backoff, grpc::GrpcServer, shutdown::Shutdown};
use weft_proto::{ipam::v1::ipam_server::IpamServer, watcher::v1::Kind};

/// How long open gRPC connections get to close after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long after a change by another replica the table is reloaded.
const RESYNC_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(100);

pub use config::{Args, Config, Mode, StoreKind};

/// Runs the service as the binary does: validates the flags (and stops there
/// with `--check-config`), sets up logging and signals, and serves until
/// SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    if args.common.check_config {
        println!(
            "ipam-svc: configuration OK (mode {}, pools {:?}, mask /{})",
            config.mode.as_str(),
            config
                .pools
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            config.mask
        );
        return Ok(());
    }
    let _telemetry = weft_common::telemetry::init(&args.common, "ipam-svc")?;
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding gRPC address {}", config.listen))?;
    serve(config, listener, shutdown.token()).await
}

/// Serves on `listener` until `shutdown` fires (or the store cannot be
/// opened at all, which returns an error). Later store trouble is ridden
/// out: reads are answered from memory, reconciles are tried again, health
/// says NOT_SERVING while it lasts (see [`state`]).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match config.store {
        StoreKind::Sled => {
            std::fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
            let store = store::SledCidrStore::open(&config.state_dir)?;
            serve_with(store, config, listener, shutdown).await
        }
        StoreKind::Kubernetes => {
            // Every answer and every failure of the client's requests,
            // resumed watches included, tells the store's health.
            let health = weft_k8s::retry::ApiHealth::new();
            let client =
                weft_k8s::client::connect(config.kubeconfig.as_deref(), Some(health.observer()))
                    .await
                    .context("connecting to the Kubernetes API")?;
            let store =
                kube_store::KubeCidrStore::start(client, health, config.api, shutdown.clone());
            serve_with(store, config, listener, shutdown).await
        }
    }
}

/// [`serve`] over a store the caller opened.
pub async fn serve_with<S: store::CidrStore>(
    store: S,
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let changes = store.changes();
    let readiness = store.readiness(config.api.unready_after, shutdown.clone());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let ipam = Arc::new(
        state::Ipam::open(
            store,
            config.mode,
            config.pools.clone(),
            config.mask,
            metrics,
        )
        .await?,
    );
    weft_common::metrics::spawn(config.metrics_listen, registry, shutdown.clone());

    let channel = weft_common::client::lazy_channel_tls(&config.watcher, config.tls.as_ref())
        .with_context(|| format!("--watcher {:?}", config.watcher))?;
    let events = weft_common::watch::subscribe(
        channel,
        vec![Kind::Node],
        "ipam-svc",
        shutdown.clone(),
        None,
    );
    let follower = tokio::spawn({
        let ipam = ipam.clone();
        let shutdown = shutdown.clone();
        async move {
            nodes::follow(ipam, events, shutdown.clone()).await;
            // Whatever ended the follower ends the service.
            shutdown.cancel();
        }
    });

    // Another replica changed the shared store: reload, shortly (a burst of
    // changes costs one reload).
    let resyncer = tokio::spawn({
        let ipam = ipam.clone();
        let shutdown = shutdown.clone();
        async move {
            backoff::resync_on_changes(
                changes,
                RESYNC_DEBOUNCE,
                shutdown,
                "the allocations",
                || ipam.resync(),
            )
            .await
        }
    });

    let server = weft_common::readiness::serve_tcp(
        GrpcServer::new()
            .tls(config.tls.clone())
            .add_service(grpc::IpamService::new(ipam, shutdown.clone()).server()),
        listener,
        IpamServer::<grpc::IpamService<S>>::NAME,
        readiness,
        shutdown.clone(),
    );
    let served = tokio::select! {
        r = server => r,
        // A client that never closes its connection must not hold up a
        // SIGTERM: everything it could be told is already durable.
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("gRPC connections still open after the shutdown grace; closing them");
            Ok(())
        }
    };
    shutdown.cancel();
    follower.await.context("node follower panicked")?;
    resyncer.await.context("resync task panicked")?;
    served?;
    tracing::info!("stopped");
    Ok(())
}

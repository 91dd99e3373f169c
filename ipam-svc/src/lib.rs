//! ipam-svc: hands each Node a pod CIDR.
//!
//! In `cluster-pool` mode it carves fixed-size blocks out of the cluster
//! pool(s); in `kubernetes` mode it takes `node.spec.podCIDRs` as they are.
//! Nodes come from svc-watcher; allocations live in a [`store::CidrStore`]
//! and are durable before anyone hears of them, so a restart (or a crash)
//! never hands one block to two nodes and never loses one it reported.

pub mod allocator;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod nodes;
pub mod state;
pub mod store;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_common::{grpc::GrpcServer, shutdown::Shutdown};
use weft_proto::watcher::v1::Kind;

/// How long open gRPC connections get to close after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

pub use config::{Args, Config, Mode};

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

/// Serves on `listener` until `shutdown` fires (or the store fails, which
/// returns an error).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let store = store::SledCidrStore::open(&config.state_dir)?;
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

    let channel = weft_common::client::lazy_channel(&config.watcher)
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
            let result = nodes::follow(ipam, events, shutdown.clone()).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "allocation store failed; stopping");
            }
            // Whatever ended the follower ends the service.
            shutdown.cancel();
            result
        }
    });

    let server = GrpcServer::new()
        .add_service(grpc::IpamService::new(ipam, shutdown.clone()).server())
        .serve_tcp(listener, shutdown.clone());
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
    let followed = follower.await.context("node follower panicked")?;
    served?;
    followed?;
    tracing::info!("stopped");
    Ok(())
}

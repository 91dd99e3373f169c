//! identity-svc: maps sets of security labels to numeric identities.
//!
//! The same set always gets the same number (256..=65535; the reserved
//! identities below are built in). Owners hold references, by API or, for
//! pods, by this service itself from svc-watcher's Pods and Namespaces; an
//! identity nobody references is collected after a grace period, and only
//! then may its number go to another set. Everything is durable in an
//! [`store::IdentityStore`] before anyone hears of it.

pub mod config;
pub mod grpc;
pub mod metrics;
pub mod pods;
pub mod state;
pub mod store;
pub mod table;
pub mod validate;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_common::{grpc::GrpcServer, shutdown::Shutdown};
use weft_proto::watcher::v1::Kind;

pub use config::{Args, Config};

/// How long open gRPC connections get to close after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs the service as the binary does: validates the flags (and stops there
/// with `--check-config`), sets up logging and signals, and serves until
/// SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    if args.common.check_config {
        println!(
            "identity-svc: configuration OK (gc grace {:?}, gc interval {:?})",
            config.gc_grace_period, config.gc_interval
        );
        return Ok(());
    }
    let _telemetry = weft_common::telemetry::init(&args.common, "identity-svc")?;
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
    let store = store::SledIdentityStore::open(&config.state_dir)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let ids = Arc::new(state::Identities::open(store, metrics, config.gc_grace_period).await?);
    weft_common::metrics::spawn(config.metrics_listen, registry, shutdown.clone());

    let channel = weft_common::client::lazy_channel(&config.watcher)
        .with_context(|| format!("--watcher {:?}", config.watcher))?;
    let events = weft_common::watch::subscribe(
        channel,
        vec![Kind::Pod, Kind::Namespace],
        "identity-svc",
        shutdown.clone(),
        None,
    );
    let follower = tokio::spawn(stop_on_error(
        "pod follower",
        shutdown.clone(),
        pods::follow(ids.clone(), events, shutdown.clone()),
    ));
    let collector = tokio::spawn(stop_on_error(
        "identity collector",
        shutdown.clone(),
        collect_every(ids.clone(), config.gc_interval, shutdown.clone()),
    ));

    let server = GrpcServer::new()
        .add_service(grpc::IdentityService::new(ids, shutdown.clone()).server())
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
    let followed = follower.await.context("pod follower panicked")?;
    let collected = collector.await.context("identity collector panicked")?;
    served?;
    followed?;
    collected?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `task`; whatever ends it (an error above all) ends the service.
async fn stop_on_error(
    what: &'static str,
    shutdown: CancellationToken,
    task: impl Future<Output = Result<(), state::IdentityError>>,
) -> Result<(), state::IdentityError> {
    let result = task.await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "{what} failed; stopping");
    }
    shutdown.cancel();
    result
}

/// Sweeps unreferenced identities every `interval`.
async fn collect_every<S: store::IdentityStore>(
    ids: Arc<state::Identities<S>>,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), state::IdentityError> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        ids.collect().await?;
    }
}

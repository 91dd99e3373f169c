//! identity-svc: maps sets of security labels to numeric identities.
//!
//! The same set always gets the same number (256..=65535; the reserved
//! identities below are built in). Owners hold references, by API or, for
//! pods, by this service itself from svc-watcher's Pods and Namespaces; an
//! identity nobody references is collected after a grace period, and only
//! then may its number go to another set. Everything is durable in an
//! [`store::IdentityStore`] before anyone hears of it.
//!
//! # The two stores
//!
//! - `--store sled` (the default, and the local lab): a sled database under
//!   `--state-dir`; a batch is applied atomically and flushed before anyone
//!   hears of it. One replica owns it.
//! - `--store kubernetes` (a cluster): one `SecurityIdentity` custom
//!   resource (`weft.io/v1alpha1`, CRD in `deploy/crds/`) per identity,
//!   named after its number, holding its labels and owners, in the API
//!   server found through `--kubeconfig` or the in-cluster configuration.
//!   The API is the truth; a restarted replica reloads from it.
//!
//! # Replicas
//!
//! Any number of replicas may run against the same API without a leader:
//! a number is claimed by creating the object named after it (only one
//! create of a name succeeds), a set's number is reported only once a
//! consistent read shows its object is the set's oldest, owner changes
//! carry the resourceVersion they were computed from (409 Conflict: re-read
//! and retry), collection deletes only an unchanged object, and every
//! replica watches the objects and reloads when another replica changed
//! them, so all converge on one table and stream it. The grace period of an
//! unreferenced identity is timed by each replica from when it saw the last
//! reference go (a restart starts it again: collection is only ever late).
//! See [`kube_store`] for the argument.

pub mod config;
pub mod grpc;
pub mod kube_store;
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
use tonic::server::NamedService as _;
use weft_common::{backoff, grpc::GrpcServer, shutdown::Shutdown};
use weft_proto::{identity::v1::identity_server::IdentityServer, watcher::v1::Kind};

pub use config::{Args, Config, StoreKind};

/// How long open gRPC connections get to close after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long after a change by another replica the table is reloaded.
const RESYNC_DEBOUNCE: Duration = Duration::from_millis(100);

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

/// Serves on `listener` until `shutdown` fires (or the store cannot be
/// opened at all, which returns an error). Later store trouble is ridden
/// out: reads are answered from memory, writes fail after the retry
/// budget, health says NOT_SERVING while it lasts (see [`state`]).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match config.store {
        StoreKind::Sled => {
            std::fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
            let store = store::SledIdentityStore::open(&config.state_dir)?;
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
                kube_store::KubeIdentityStore::start(client, health, config.api, shutdown.clone());
            serve_with(store, config, listener, shutdown).await
        }
    }
}

/// [`serve`] over a store the caller opened.
pub async fn serve_with<S: store::IdentityStore>(
    store: S,
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let changes = store.changes();
    let readiness = store.readiness(config.api.unready_after, shutdown.clone());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let ids = Arc::new(state::Identities::open(store, metrics, config.gc_grace_period).await?);
    weft_common::metrics::spawn(config.metrics_listen, registry, shutdown.clone());

    let channel = weft_common::client::lazy_channel_tls(&config.watcher, config.tls.as_ref())
        .with_context(|| format!("--watcher {:?}", config.watcher))?;
    let events = weft_common::watch::subscribe(
        channel,
        vec![Kind::Pod, Kind::Namespace],
        "identity-svc",
        shutdown.clone(),
        None,
    );
    // The background work rides out store trouble (it tries again); only
    // its end (shutdown, or a panic) ends the service.
    let follower = tokio::spawn(stop_when_done(
        shutdown.clone(),
        pods::follow(ids.clone(), events, shutdown.clone()),
    ));
    let collector = tokio::spawn(stop_when_done(
        shutdown.clone(),
        collect_every(ids.clone(), config.gc_interval, shutdown.clone()),
    ));
    let resyncer = tokio::spawn(stop_when_done(
        shutdown.clone(),
        resync_on_changes(ids.clone(), changes, shutdown.clone()),
    ));

    let server = weft_common::readiness::serve_tcp(
        GrpcServer::new()
            .tls(config.tls.clone())
            .add_service(grpc::IdentityService::new(ids, shutdown.clone()).server()),
        listener,
        IdentityServer::<grpc::IdentityService<S>>::NAME,
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
    follower.await.context("pod follower panicked")?;
    collector.await.context("identity collector panicked")?;
    resyncer.await.context("identity resync panicked")?;
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `task`; whatever ends it ends the service.
async fn stop_when_done(shutdown: CancellationToken, task: impl Future<Output = ()>) {
    task.await;
    shutdown.cancel();
}

/// Reloads the table shortly after another replica changed the shared
/// store (a burst of changes costs one reload).
async fn resync_on_changes<S: store::IdentityStore>(
    ids: Arc<state::Identities<S>>,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    shutdown: CancellationToken,
) {
    backoff::resync_on_changes(changes, RESYNC_DEBOUNCE, shutdown, "the identities", || {
        ids.resync()
    })
    .await
}

/// Sweeps unreferenced identities every `interval`.
async fn collect_every<S: store::IdentityStore>(
    ids: Arc<state::Identities<S>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ids.collect().await {
            tracing::warn!(error = %e, "collecting identities failed; trying again at the next sweep");
        }
    }
}

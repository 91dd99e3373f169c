//! svc-watcher: turns cluster state into weft's typed, versioned event
//! stream (`weft.watcher.v1.Watcher`).
//!
//! A [`source::Source`] (the lab's manifest directory, or the Kubernetes
//! API through kube-rs watchers) feeds a [`state::StateStore`]; the store keeps the objects, a
//! revision and a bounded delta history; [`server::WatcherService`] serves
//! snapshots, resumed deltas and live deltas from it to ipam-svc,
//! identity-svc and every datapath-svc.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;
use weft_common::{
    config::{CommonArgs, parse_duration},
    grpc::GrpcServer,
    readiness::Readiness,
    shutdown::Shutdown,
};
use weft_proto::watcher::v1::watcher_server::WatcherServer;

pub mod convert;
pub mod health;
pub mod metrics;
pub mod server;
pub mod source;
pub mod state;
pub mod subscription;

use crate::{
    health::{WAITING, WatchHealth},
    metrics::Metrics,
    server::WatcherService,
    source::{Source, SourceError, kubernetes::KubeSource, manifests::ManifestSource},
    state::StateStore,
};

/// Where the cluster state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of Kubernetes manifests (the local lab).
    Manifests,
    /// The Kubernetes API (`--kubeconfig`, or the inferred configuration:
    /// `$KUBECONFIG`, `~/.kube/config`, then in-cluster).
    Kubernetes,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "svc-watcher",
    version,
    about = "Serves the cluster state as versioned gRPC watch streams"
)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:9400")]
    pub listen: SocketAddr,

    /// Where the cluster state comes from.
    #[arg(long, env = "WEFT_SOURCE", value_enum, default_value = "manifests")]
    pub source: SourceKind,

    /// The manifest directory (for `--source manifests`).
    #[arg(long, env = "WEFT_MANIFESTS_DIR")]
    pub manifests_dir: Option<PathBuf>,

    /// The kubeconfig to use with `--source kubernetes`; without it the
    /// configuration is inferred (`$KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// How many delta events to keep for subscribers that resume; one that
    /// is further behind gets a snapshot.
    #[arg(long, env = "WEFT_HISTORY", default_value_t = 10_000)]
    pub history: usize,

    /// How long the watch of a kind may stay broken before the gRPC health
    /// turns NOT_SERVING (`weftctl status` shows why): seconds, or a value
    /// like `10s`, `1m`, `500ms`. Subscribers keep being served what is
    /// known meanwhile.
    #[arg(long, env = "WEFT_WATCH_UNREADY_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub watch_unready_after: Duration,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// A validated source choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Manifests { dir: PathBuf },
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub source: SourceConfig,
    pub history: usize,
    /// How long a broken watch is tolerated before NOT_SERVING.
    pub watch_unready_after: Duration,
    /// Mutual TLS for the gRPC listener.
    pub tls: Option<weft_common::tls::TlsConfig>,
}

impl Args {
    /// Checks everything that can be checked without starting.
    pub fn validate(&self) -> anyhow::Result<Config> {
        let metrics_listen = self.common.metrics_addr()?;
        tracing_subscriber::EnvFilter::try_new(&self.common.log_level).with_context(|| {
            format!(
                "--log-level: {:?} is not a valid filter",
                self.common.log_level
            )
        })?;
        let source = match self.source {
            SourceKind::Manifests => {
                let dir = self
                    .manifests_dir
                    .clone()
                    .context("--manifests-dir is required with --source manifests")?;
                let meta = std::fs::metadata(&dir)
                    .with_context(|| format!("--manifests-dir: cannot read {}", dir.display()))?;
                anyhow::ensure!(
                    meta.is_dir(),
                    "--manifests-dir: {} is not a directory",
                    dir.display()
                );
                SourceConfig::Manifests { dir }
            }
            SourceKind::Kubernetes => {
                if let Some(path) = &self.kubeconfig {
                    anyhow::ensure!(
                        path.is_file(),
                        "--kubeconfig: {} is not a readable file",
                        path.display()
                    );
                }
                SourceConfig::Kubernetes {
                    kubeconfig: self.kubeconfig.clone(),
                }
            }
        };
        Ok(Config {
            listen: self.listen,
            metrics_listen,
            source,
            history: self.history,
            watch_unready_after: self.watch_unready_after,
            tls: self.common.tls()?,
        })
    }
}

/// The whole service: validates, sets up logs, metrics and signals, binds
/// and serves until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.validate()?;
    if args.common.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let _telemetry = weft_common::telemetry::init(&args.common, "svc-watcher")?;
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let mut registry = Registry::default();
    let metrics = Metrics::registered(&mut registry);
    let metrics_task =
        weft_common::metrics::spawn(config.metrics_listen, registry, shutdown.token());
    // Bound and served before the first read: health answers NOT_SERVING
    // at once, and early subscribers wait until the state is complete.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding gRPC address {}", config.listen))?;
    let result = serve(&config, listener, metrics, shutdown.token()).await;
    shutdown.trigger();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if result.is_ok() {
        tracing::info!("svc-watcher stopped");
    }
    result
}

/// Runs the configured source and the gRPC service on `listener`, until
/// `shutdown` fires or the source fails for good. Health answers from the
/// start (NOT_SERVING until the state is complete); Subscribe and List wait
/// for the complete state.
pub async fn serve(
    config: &Config,
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Arc::new(StateStore::new(config.history, metrics.clone()));
    tracing::info!(
        epoch = store.epoch(),
        history = config.history,
        "state store ready"
    );
    let serving = Serving {
        tls: config.tls.clone(),
        health: WatchHealth::new(),
        unready_after: config.watch_unready_after,
    };
    match &config.source {
        SourceConfig::Manifests { dir } => {
            let source = ManifestSource::new(dir.clone(), metrics.clone());
            serve_source_with(source, store, listener, metrics, serving, shutdown).await
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let observer = source::kubernetes::observer(serving.health.clone());
            let client = weft_k8s::client::connect(kubeconfig.as_deref(), Some(observer))
                .await
                .context("connecting to the Kubernetes API")?;
            let source = KubeSource::new(client, metrics.clone(), serving.health.clone());
            serve_source_with(source, store, listener, metrics, serving, shutdown).await
        }
    }
}

/// How [`serve_source_with`] serves, beside the source.
#[derive(Debug, Clone)]
pub struct Serving {
    /// Mutual TLS for the gRPC listener.
    pub tls: Option<weft_common::tls::TlsConfig>,
    /// What the source reports of its watches.
    pub health: WatchHealth,
    /// How long a broken watch is tolerated before NOT_SERVING.
    pub unready_after: Duration,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            tls: None,
            health: WatchHealth::new(),
            unready_after: Duration::from_secs(10),
        }
    }
}

/// [`serve`] for any source, over a store the caller made.
pub async fn serve_source<S: Source>(
    source: S,
    store: Arc<StateStore>,
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_source_with(
        source,
        store,
        listener,
        metrics,
        Serving::default(),
        shutdown,
    )
    .await
}

/// [`serve_source`], over mutual TLS when `tls` is given.
pub async fn serve_source_tls<S: Source>(
    source: S,
    store: Arc<StateStore>,
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    tls: Option<weft_common::tls::TlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let serving = Serving {
        tls,
        ..Serving::default()
    };
    serve_source_with(source, store, listener, metrics, serving, shutdown).await
}

/// [`serve_source`] as `serving` says.
pub async fn serve_source_with<S: Source>(
    source: S,
    store: Arc<StateStore>,
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    serving: Serving,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = source.name();
    let Serving {
        tls,
        health,
        unready_after,
    } = serving;
    let (synced_tx, synced_rx) = oneshot::channel();
    let mut source_task = tokio::spawn(source.run(store.clone(), synced_tx, shutdown.clone()));
    let (readiness_tx, readiness) = watch::channel(Readiness::NotReady(WAITING.to_string()));
    tokio::spawn(
        health
            .clone()
            .report(unready_after, readiness_tx, shutdown.clone()),
    );
    let (listed_tx, listed) = watch::channel(false);
    let service = WatcherService::new(store.clone(), metrics, shutdown.clone())
        .until_listed(listed)
        .with_health(health.clone(), unready_after);
    let mut grpc = tokio::spawn(weft_common::readiness::serve_tcp(
        GrpcServer::new()
            .tls(tls)
            .add_service(service.into_server()),
        listener,
        WatcherServer::<WatcherService>::NAME,
        readiness,
        shutdown.clone(),
    ));

    tokio::select! {
        synced = synced_rx => {
            if synced.is_err() {
                // The source ended before it read the state once.
                shutdown.cancel();
                let result = join_source(&mut source_task).await;
                let _ = join_grpc(&mut grpc).await;
                return result.and_then(|()| {
                    anyhow::bail!("source {name} stopped before reading the state")
                });
            }
        }
        g = join_grpc(&mut grpc) => {
            shutdown.cancel();
            let s = join_source(&mut source_task).await;
            return g.and(s);
        }
        _ = shutdown.cancelled() => {
            let s = join_source(&mut source_task).await;
            let g = join_grpc(&mut grpc).await;
            return s.and(g);
        }
    }
    tracing::info!(
        source = name,
        objects = store.len(),
        revision = store.revision(),
        "initial state complete; serving"
    );
    health.synced();
    listed_tx.send_replace(true);

    // Whichever ends first (normally both, on shutdown) stops the other.
    let (source_result, grpc_result) = tokio::select! {
        s = join_source(&mut source_task) => {
            shutdown.cancel();
            (s, join_grpc(&mut grpc).await)
        }
        g = join_grpc(&mut grpc) => {
            shutdown.cancel();
            (join_source(&mut source_task).await, g)
        }
    };
    source_result?;
    grpc_result
}

async fn join_grpc(task: &mut tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    match task.await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("gRPC server task: {e}")),
    }
}

async fn join_source(
    task: &mut tokio::task::JoinHandle<Result<(), SourceError>>,
) -> anyhow::Result<()> {
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("cluster state source")),
        Err(e) => Err(anyhow::anyhow!("cluster state source task: {e}")),
    }
}

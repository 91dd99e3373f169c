//! Flags, each with an environment fallback, and their validation.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use weft_common::config::CommonArgs;
pub use weft_common::config::parse_duration;
use weft_k8s::config::{ApiArgs, ApiConfig};

/// Where identities are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A sled database under `--state-dir` (one replica; the local lab).
    Sled,
    /// SecurityIdentity custom resources in the Kubernetes API (any number
    /// of replicas; a cluster).
    Kubernetes,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "identity-svc",
    version,
    about = "Maps security label sets to numeric identities."
)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:9402")]
    pub listen: SocketAddr,

    /// Directory of the identity database.
    #[arg(
        long,
        env = "WEFT_STATE_DIR",
        default_value = "/var/lib/weft/identity-svc"
    )]
    pub state_dir: PathBuf,

    /// svc-watcher's gRPC endpoint (`http://host:port` or `unix:///path`).
    #[arg(long, env = "WEFT_WATCHER", default_value = "http://127.0.0.1:9400")]
    pub watcher: String,

    /// Where identities are kept.
    #[arg(long, env = "WEFT_STORE", value_enum, default_value_t = StoreKind::Sled)]
    pub store: StoreKind,

    /// The kubeconfig for `--store kubernetes`; without it the configuration
    /// is inferred (`$KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// How long an identity nobody references is kept before it is
    /// collected: seconds, or a value like `90s`, `15m`, `1h30m`, `500ms`.
    #[arg(long, env = "WEFT_IDENTITY_GC_GRACE_PERIOD", default_value = "15m", value_parser = parse_duration)]
    pub gc_grace_period: Duration,

    /// How often unreferenced identities are swept (same syntax).
    #[arg(long, env = "WEFT_IDENTITY_GC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub gc_interval: Duration,

    /// Retry budget and readiness bound of `--store kubernetes`.
    #[command(flatten)]
    pub api: ApiArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Everything the service needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub watcher: String,
    pub gc_grace_period: Duration,
    pub gc_interval: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub store: StoreKind,
    pub kubeconfig: Option<PathBuf>,
    /// How the Kubernetes store uses the API.
    pub api: ApiConfig,
    /// Mutual TLS for the gRPC listener and the svc-watcher client.
    pub tls: Option<weft_common::tls::TlsConfig>,
}

impl Config {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        if args.gc_interval.is_zero() {
            anyhow::bail!("--gc-interval: must be longer than zero");
        }
        if args.watcher.trim().is_empty() {
            anyhow::bail!("--watcher: must not be empty");
        }
        if let Some(path) = &args.kubeconfig
            && !path.is_file()
        {
            anyhow::bail!("--kubeconfig: {} is not a readable file", path.display());
        }
        Ok(Self {
            store: args.store,
            kubeconfig: args.kubeconfig.clone(),
            api: args.api.validate()?,
            listen: args.listen,
            state_dir: args.state_dir.clone(),
            watcher: args.watcher.clone(),
            gc_grace_period: args.gc_grace_period,
            gc_interval: args.gc_interval,
            metrics_listen: args.common.metrics_addr()?,
            tls: args.common.tls()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["identity-svc"]).expect("defaults");
        let c = Config::from_args(&args).expect("valid");
        assert_eq!(c.gc_grace_period, Duration::from_secs(900));
        assert_eq!(c.gc_interval, Duration::from_secs(60));
        assert_eq!(c.listen.port(), 9402);
    }

    #[test]
    fn a_zero_interval_is_refused() {
        let args = Args::try_parse_from(["identity-svc", "--gc-interval", "0s"]).expect("parses");
        let err = Config::from_args(&args).expect_err("zero interval");
        assert!(err.to_string().contains("--gc-interval"), "{err}");
    }
}

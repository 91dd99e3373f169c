//! Flags and their validation. Every flag has an environment fallback; a bad
//! value stops the service at start-up with a message naming the flag, rather
//! than a pool that silently hands out the wrong blocks.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::{IpNet, Ipv4Net};
use weft_common::config::CommonArgs;
use weft_k8s::config::{ApiArgs, ApiConfig};

/// The longest per-node mask: a /30 still leaves two usable pod addresses.
pub const MAX_MASK_SIZE: u8 = 30;

/// Where node CIDRs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Carve blocks out of the cluster pool(s).
    ClusterPool,
    /// Take `node.spec.podCIDRs` as Kubernetes assigned them.
    Kubernetes,
}

impl Mode {
    /// The name used on the command line and in `ListResponse.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ClusterPool => "cluster-pool",
            Mode::Kubernetes => "kubernetes",
        }
    }
}

/// Where allocations are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A sled database under `--state-dir` (one replica; the local lab).
    Sled,
    /// NodeCIDR custom resources in the Kubernetes API (any number of
    /// replicas; a cluster).
    Kubernetes,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ipam-svc", version, about = "Hands each node a pod CIDR.")]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:9401")]
    pub listen: SocketAddr,

    /// Directory of the allocation database.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft/ipam-svc")]
    pub state_dir: PathBuf,

    /// svc-watcher's gRPC endpoint (`http://host:port` or `unix:///path`).
    #[arg(long, env = "WEFT_WATCHER", default_value = "http://127.0.0.1:9400")]
    pub watcher: String,

    /// Where allocations are kept.
    #[arg(long, env = "WEFT_STORE", value_enum, default_value_t = StoreKind::Sled)]
    pub store: StoreKind,

    /// The kubeconfig for `--store kubernetes`; without it the configuration
    /// is inferred (`$KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where node CIDRs come from.
    #[arg(long, env = "WEFT_IPAM_MODE", value_enum, default_value_t = Mode::ClusterPool)]
    pub mode: Mode,

    /// The cluster pool(s), comma-separated IPv4 CIDRs (cluster-pool mode).
    #[arg(
        long,
        env = "WEFT_CLUSTER_POOL_IPV4_CIDR",
        default_value = "10.244.0.0/16"
    )]
    pub cluster_pool_ipv4_cidr: String,

    /// The prefix length of each node's block (cluster-pool mode).
    #[arg(long, env = "WEFT_CLUSTER_POOL_IPV4_MASK_SIZE", default_value_t = 24)]
    pub cluster_pool_ipv4_mask_size: u8,

    /// Retry budget and readiness bound of `--store kubernetes`.
    #[command(flatten)]
    pub api: ApiArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cluster-pool-ipv4-cidr: no pool given")]
    NoPool,
    #[error("--cluster-pool-ipv4-cidr: {value:?} is not a CIDR such as 10.244.0.0/16")]
    NotACidr { value: String },
    #[error("--cluster-pool-ipv4-cidr: {value} is IPv6; only IPv4 pools are supported")]
    Ipv6 { value: String },
    #[error("--cluster-pool-ipv4-cidr: {value} has host bits set; did you mean {network}?")]
    HostBits { value: String, network: Ipv4Net },
    #[error("--cluster-pool-ipv4-cidr: pools {a} and {b} overlap")]
    Overlap { a: Ipv4Net, b: Ipv4Net },
    #[error("--cluster-pool-ipv4-mask-size: /{mask} must be longer than the prefix of pool {pool}")]
    MaskNotLonger { mask: u8, pool: Ipv4Net },
    #[error(
        "--cluster-pool-ipv4-mask-size: /{mask} is longer than /{MAX_MASK_SIZE}, too small for pods"
    )]
    MaskTooLong { mask: u8 },
}

/// The validated pool set of cluster-pool mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools {
    pub cidrs: Vec<Ipv4Net>,
    pub mask: u8,
}

impl Pools {
    /// Parses and checks a comma-separated pool list and the block mask.
    pub fn parse(list: &str, mask: u8) -> Result<Self, ConfigError> {
        let mut cidrs: Vec<Ipv4Net> = Vec::new();
        for value in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            let net: IpNet = value.parse().map_err(|_| ConfigError::NotACidr {
                value: value.to_string(),
            })?;
            let IpNet::V4(net) = net else {
                return Err(ConfigError::Ipv6 {
                    value: value.to_string(),
                });
            };
            if net.trunc() != net {
                return Err(ConfigError::HostBits {
                    value: value.to_string(),
                    network: net.trunc(),
                });
            }
            if let Some(other) = cidrs.iter().find(|o| o.contains(&net) || net.contains(*o)) {
                return Err(ConfigError::Overlap { a: *other, b: net });
            }
            cidrs.push(net);
        }
        if cidrs.is_empty() {
            return Err(ConfigError::NoPool);
        }
        if mask > MAX_MASK_SIZE {
            return Err(ConfigError::MaskTooLong { mask });
        }
        if let Some(pool) = cidrs.iter().find(|p| mask <= p.prefix_len()) {
            return Err(ConfigError::MaskNotLonger { mask, pool: *pool });
        }
        Ok(Self { cidrs, mask })
    }
}

/// Everything the service needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub watcher: String,
    pub mode: Mode,
    /// The pools; empty in kubernetes mode, where the pool flags do not apply.
    pub pools: Vec<Ipv4Net>,
    pub mask: u8,
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
        let (pools, mask) = match args.mode {
            Mode::ClusterPool => {
                let p = Pools::parse(
                    &args.cluster_pool_ipv4_cidr,
                    args.cluster_pool_ipv4_mask_size,
                )?;
                (p.cidrs, p.mask)
            }
            Mode::Kubernetes => (Vec::new(), args.cluster_pool_ipv4_mask_size),
        };
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
            mode: args.mode,
            pools,
            mask,
            metrics_listen: args.common.metrics_addr()?,
            tls: args.common.tls()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test CIDR")
    }

    #[test]
    fn defaults_are_one_slash16_in_slash24s() {
        let args = Args::try_parse_from(["ipam-svc"]).expect("defaults parse");
        let c = Config::from_args(&args).expect("defaults are valid");
        assert_eq!(c.mode, Mode::ClusterPool);
        assert_eq!(c.pools, vec![net("10.244.0.0/16")]);
        assert_eq!(c.mask, 24);
        assert_eq!(c.listen.port(), 9401);
    }

    #[test]
    fn several_pools_are_accepted() {
        let p = Pools::parse("10.244.0.0/16, 10.245.0.0/17", 24).expect("valid");
        assert_eq!(p.cidrs, vec![net("10.244.0.0/16"), net("10.245.0.0/17")]);
    }

    #[test]
    fn bad_pools_and_masks_are_named() {
        let cases = [
            ("", 24, ConfigError::NoPool),
            (
                "10.244.0.0",
                24,
                ConfigError::NotACidr {
                    value: "10.244.0.0".into(),
                },
            ),
            (
                "fd00::/48",
                64,
                ConfigError::Ipv6 {
                    value: "fd00::/48".into(),
                },
            ),
            (
                "10.244.1.0/16",
                24,
                ConfigError::HostBits {
                    value: "10.244.1.0/16".into(),
                    network: net("10.244.0.0/16"),
                },
            ),
            (
                "10.0.0.0/8,10.244.0.0/16",
                24,
                ConfigError::Overlap {
                    a: net("10.0.0.0/8"),
                    b: net("10.244.0.0/16"),
                },
            ),
            (
                "10.244.0.0/16",
                16,
                ConfigError::MaskNotLonger {
                    mask: 16,
                    pool: net("10.244.0.0/16"),
                },
            ),
            ("10.244.0.0/16", 31, ConfigError::MaskTooLong { mask: 31 }),
        ];
        for (list, mask, want) in cases {
            assert_eq!(Pools::parse(list, mask), Err(want), "{list} /{mask}");
        }
        let msg = Pools::parse("10.244.0.0/16", 12)
            .expect_err("mask too short")
            .to_string();
        assert!(msg.contains("--cluster-pool-ipv4-mask-size"), "{msg}");
    }

    #[test]
    fn kubernetes_mode_ignores_the_pool_flags() {
        let args = Args::try_parse_from([
            "ipam-svc",
            "--mode",
            "kubernetes",
            "--cluster-pool-ipv4-cidr",
            "nonsense",
        ])
        .expect("parse");
        let c = Config::from_args(&args).expect("valid in kubernetes mode");
        assert!(c.pools.is_empty());
    }
}

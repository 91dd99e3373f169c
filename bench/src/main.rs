//! `weft-bench`: runs one benchmark, prints its tables and writes CSV.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_bench::{cni, control, datapath, weft::LB_MAP_MAX};

#[derive(Debug, Parser)]
#[command(name = "weft-bench", about = "weft's benchmarks (run as root)")]
struct Args {
    /// Fewer sizes and iterations: a smoke test of the harness.
    #[arg(long, global = true)]
    quick: bool,

    /// Where the CSV files go.
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,

    /// Where the weft binaries are; by default next to this one.
    #[arg(long, global = true, env = "WEFT_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connection rate and latency to a ClusterIP: weft, iptables, nftables, floor.
    Datapath {
        /// Service counts to measure at (comma-separated).
        #[arg(long, value_delimiter = ',')]
        sizes: Option<Vec<usize>>,
        /// Backend pods behind each Service.
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// Connections in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds measured per run.
        #[arg(long)]
        seconds: Option<f64>,
        /// Runs per configuration (the median is reported).
        #[arg(long)]
        runs: Option<usize>,
        /// What to measure (comma-separated): floor, iptables, nftables, weft.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "floor,iptables,nftables,weft"
        )]
        modes: Vec<String>,
        /// The iptables-restore to load kube-proxy's rules with
        /// (iptables-restore is the nft backend on Debian 12;
        /// iptables-legacy-restore the old one).
        #[arg(long, default_value = "iptables-restore")]
        iptables_restore: String,
        /// Skip nftables above this many Services (its rules take minutes
        /// to load there).
        #[arg(long, default_value_t = 10_000)]
        nft_max: usize,
    },
    /// Control plane: change-to-map latency under churn, cold start, rule
    /// load times of kube-proxy's modes, and the services' memory.
    ControlPlane {
        #[arg(long)]
        services: Option<usize>,
        /// Endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Changes measured per source.
        #[arg(long)]
        changes: Option<usize>,
        /// Changes per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Pods created for the memory measurement.
        #[arg(long)]
        pods: Option<usize>,
        #[arg(long, default_value = "iptables-restore")]
        iptables_restore: String,
        /// Only the memory samples (idle, with the Services, with the pods).
        #[arg(long)]
        memory_only: bool,
    },
    /// Just the load generator, from inside a namespace against any address.
    Load {
        /// The namespace to run in (a name under /run/netns).
        #[arg(long)]
        netns: String,
        /// Addresses to connect to, in turn (comma-separated ip:port).
        #[arg(long, value_delimiter = ',')]
        target: Vec<std::net::SocketAddr>,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// CNI ADD/DEL latency: weft-cni against the bridge and host-local plugins.
    Cni {
        #[arg(long)]
        pods: Option<usize>,
        #[arg(long, default_value_t = 20)]
        concurrent: usize,
        /// Rounds of concurrent ADDs and DELs.
        #[arg(long)]
        rounds: Option<usize>,
        #[arg(long, default_value = "/usr/lib/cni")]
        plugin_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the benchmarks need root (network namespaces, eBPF, iptables)"
    );
    // datapath-svc reads its map capacity from the environment; the lab
    // starts it from this process. Set before any thread exists.
    if std::env::var_os("WEFT_BPF_LB_MAP_MAX").is_none() {
        // SAFETY: no other thread runs yet (the runtime is built below).
        unsafe { std::env::set_var("WEFT_BPF_LB_MAP_MAX", LB_MAP_MAX.to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("the executable's directory")?
            .to_path_buf(),
    };
    let quick = args.quick;
    let out = args.out;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.command {
            Command::Datapath {
                sizes,
                backends,
                concurrency,
                seconds,
                runs,
                modes,
                iptables_restore,
                nft_max,
            } => {
                let sizes = sizes.unwrap_or(if quick {
                    vec![1, 1000]
                } else {
                    vec![1, 1000, 10_000, 50_000]
                });
                let seconds = seconds.unwrap_or(if quick { 2.0 } else { 5.0 });
                datapath::run(datapath::Options {
                    sizes,
                    backends,
                    concurrency,
                    warmup: Duration::from_secs(1),
                    duration: Duration::from_secs_f64(seconds),
                    runs: runs.unwrap_or(if quick { 1 } else { 3 }),
                    bin_dir,
                    out_dir: out,
                    iptables_restore,
                    modes,
                    nft_max,
                })
                .await
            }
            Command::ControlPlane {
                services,
                endpoints,
                changes,
                rate,
                pods,
                iptables_restore,
                memory_only,
            } => {
                control::run(control::Options {
                    memory_only,
                    services: services.unwrap_or(if quick { 1000 } else { 10_000 }),
                    endpoints,
                    changes: changes.unwrap_or(if quick { 40 } else { 200 }),
                    rate,
                    pods: pods.unwrap_or(if quick { 50 } else { 500 }),
                    cold_starts: if quick { 1 } else { 3 },
                    bin_dir,
                    out_dir: out,
                    iptables_restore,
                })
                .await
            }
            Command::Load {
                netns,
                target,
                concurrency,
                seconds,
            } => {
                let spec = weft_bench::load::LoadSpec {
                    targets: target,
                    concurrency,
                    warmup: Duration::from_secs(1),
                    duration: Duration::from_secs_f64(seconds),
                };
                let path = weft_lab::net::netns_path(&netns);
                let r = tokio::task::spawn_blocking(move || weft_bench::load::run(&path, &spec))
                    .await??;
                println!(
                    "{:.0} conn/s; latency p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {} errors{}; answered by {:?}",
                    r.rate(),
                    weft_bench::stats::ms(r.latency.p50),
                    weft_bench::stats::ms(r.latency.p90),
                    weft_bench::stats::ms(r.latency.p99),
                    weft_bench::stats::ms(r.latency.max),
                    r.errors,
                    r.first_error.map(|e| format!(" (first: {e})")).unwrap_or_default(),
                    r.answered_by
                );
                Ok(())
            }
            Command::Cni {
                pods,
                concurrent,
                rounds,
                plugin_dir,
            } => {
                cni::run(cni::Options {
                    pods: pods.unwrap_or(if quick { 40 } else { 200 }),
                    concurrent,
                    rounds: rounds.unwrap_or(if quick { 2 } else { 5 }),
                    plugin_dir,
                    bin_dir,
                    out_dir: out,
                })
                .await
            }
        }
    })
}

//! Benchmark 1: the datapath. Connection rate and request latency from a
//! client pod to a ClusterIP with 1 to 50,000 Services installed, through
//! weft's eBPF datapath, kube-proxy-style iptables and nftables rules, and
//! the floor: the client dialling the backend pods directly.
//!
//! At each size every configuration is up at once (the floor, iptables and
//! nftables each on a plain topology of their own, weft in its lab), and
//! the measurements take turns, round after round: whatever else the
//! machine does meanwhile falls on every configuration alike. The median
//! round of each is reported.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use weft_lab::net::netns_path;

use crate::{
    load::{self, LoadResult, LoadSpec},
    report::Table,
    rules,
    services::{self, BenchService, SERVICE_PORT, TARGET_PORT},
    stats::{median_ratio, ms},
    topo::{self, CLUSTER_CIDR, NODE_IP, Plain},
    weft::{self, BenchLab},
};

#[derive(Debug, Clone)]
pub struct Options {
    pub sizes: Vec<usize>,
    pub backends: usize,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Rounds per size; each configuration is measured once per round and
    /// the median round (by rate) is reported.
    pub runs: usize,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
    pub iptables_restore: String,
    pub modes: Vec<String>,
    /// The largest size nftables is measured at.
    pub nft_max: usize,
}

/// Services whose backends are the benchmark's backend pods, on `port`.
fn installed(range: std::ops::Range<usize>, backends: &[Ipv4Addr], port: u16) -> Vec<BenchService> {
    range
        .map(|i| services::service(i, backends.iter().map(|ip| (*ip, port)).collect()))
        .collect()
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// One configuration at one size: where its client runs, what it dials.
struct Config {
    mode: &'static str,
    client_netns: String,
    targets: Vec<SocketAddr>,
    install: Option<Duration>,
    results: Vec<LoadResult>,
}

struct Row {
    mode: &'static str,
    services: usize,
    install: Option<Duration>,
    result: LoadResult,
    /// The median of the per-round ratios to the floor.
    vs_floor: Option<f64>,
    load: String,
}

fn describe(mode: &str, n: usize, r: &LoadResult) {
    println!(
        "    {mode:<11} {n:>6} services: {:>7.0} conn/s, p50 {} ms, p99 {} ms, {} errors{} (load {})",
        r.rate(),
        ms(r.latency.p50),
        ms(r.latency.p99),
        r.errors,
        r.first_error
            .as_ref()
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default(),
        loadavg()
    );
}

/// weft's lab with a client and backend pods; returns (lab, client netns,
/// backend IPs, the backend port of each stage).
async fn weft_lab(opts: &Options) -> anyhow::Result<(BenchLab, String, Vec<Ipv4Addr>, Vec<u16>)> {
    let lab = BenchLab::up("wbd", &opts.bin_dir, |cfg| {
        cfg.log_level = "warn".into();
    })
    .await?;
    // Each stage reaches the backends on a port of its own. A backend
    // keeps TIME_WAIT sockets for a minute; had a later stage reached it
    // on the same (client, port, backend, port) tuple through another
    // frontend, the client's initial sequence numbers and timestamps
    // (derived from the address it dialled) would not follow on from the
    // old connection's, and the backend would answer SYNs with challenge
    // ACKs: stalls that belong to no datapath.
    let ports: Vec<u16> = (0..=opts.sizes.len() as u16)
        .map(|k| TARGET_PORT + k)
        .collect();
    let declared: String = ports
        .iter()
        .map(|p| format!("        - containerPort: {p}\n"))
        .collect();
    let mut pods = vec!["client".to_string()];
    pods.extend((1..=opts.backends).map(|i| format!("be-{i}")));
    for name in &pods {
        let app = if name == "client" {
            "client"
        } else {
            "bench-backend"
        };
        lab.lab.manifests.apply_yaml(
            &format!("pod-{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {app}\nspec:\n  containers:\n    - name: server\n      image: weft-lab/pod-server\n      ports:\n{declared}"
            ),
        )?;
    }
    let mut ips = Vec::new();
    for name in &pods {
        let ip = lab
            .lab
            .wait_pod_ready("default", name, Duration::from_secs(60))
            .await?;
        if name != "client" {
            ips.push(ip);
        }
    }
    let client = lab.lab.pod_netns("default", "client");
    topo::client_sysctls(&client)?;
    for ip in &ips {
        for p in &ports {
            topo::wait_listening(&client, SocketAddr::from((*ip, *p)))?;
        }
    }
    lab.write("namespace.json", &services::namespace_manifest())?;
    Ok((lab, client, ips, ports))
}

/// Services per `nft -f` transaction when loading the nftables rules.
const NFT_BATCH: usize = 2000;

/// A plain topology with kube-proxy's rules for `n` Services loaded.
fn rules_topology(opts: &Options, mode: &'static str, n: usize) -> anyhow::Result<(Plain, Config)> {
    let prefix = if mode == "iptables" { "wbi" } else { "wbt" };
    let plain = Plain::up(prefix, &opts.bin_dir.join("weft-lab"), opts.backends)?;
    let ips: Vec<Ipv4Addr> = plain.backends.iter().map(|b| b.ip).collect();
    let svcs = installed(0..n, &ips, TARGET_PORT);
    let took = if mode == "iptables" {
        let text = rules::iptables_restore(&svcs, CLUSTER_CIDR);
        plain.run_in_node(&opts.iptables_restore, &[], Some(&text))?
    } else {
        // In transactions of NFT_BATCH Services: one transaction of them all
        // costs time quadratic in its size in this kernel (the control-plane
        // benchmark measures that), which at 10,000 Services would take
        // minutes; how the rules got there does not change a packet's path.
        let base = rules::nft_ruleset(&[], CLUSTER_CIDR, "10.100.0.0/16", &[NODE_IP]);
        let mut took = plain.run_in_node("nft", &["-f", "-"], Some(&base))?;
        for batch in svcs.chunks(NFT_BATCH) {
            let text = rules::nft_services(batch, CLUSTER_CIDR);
            took += plain.run_in_node("nft", &["-f", "-"], Some(&text))?;
        }
        took
    };
    println!(
        "  {mode}: {n} services loaded in {:.2} s",
        took.as_secs_f64()
    );
    let config = Config {
        mode,
        client_netns: plain.client.netns.clone(),
        targets: vec![SocketAddr::from((
            services::cluster_ip(n - 1),
            SERVICE_PORT,
        ))],
        install: Some(took),
        results: Vec::new(),
    };
    Ok((plain, config))
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let spec = |targets: &[SocketAddr]| LoadSpec {
        targets: targets.to_vec(),
        concurrency: opts.concurrency,
        warmup: opts.warmup,
        duration: opts.duration,
    };
    let wants = |m: &str| opts.modes.iter().any(|x| x == m);
    anyhow::ensure!(
        !opts.sizes.is_empty() && opts.sizes.iter().all(|n| *n > 0),
        "--sizes must be positive"
    );
    let mut rows: Vec<Row> = Vec::new();

    // Up for the whole run: the floor's topology and weft's lab.
    let floor = Plain::up("wbf", &opts.bin_dir.join("weft-lab"), opts.backends)?;
    let floor_targets: Vec<SocketAddr> = floor
        .backends
        .iter()
        .map(|b| SocketAddr::from((b.ip, TARGET_PORT)))
        .collect();
    let weft = if wants("weft") {
        Some(weft_lab(&opts).await?)
    } else {
        None
    };

    const PER_FILE: usize = 5000;
    let mut installed_weft = 0;
    for (stage, &n) in opts.sizes.iter().enumerate() {
        println!("  --- {n} services ---");
        let mut configs = vec![Config {
            mode: "floor",
            client_netns: floor.client.netns.clone(),
            targets: floor_targets.clone(),
            install: None,
            results: Vec::new(),
        }];
        let mut plains = Vec::new();
        for mode in ["iptables", "nftables"] {
            if mode == "nftables" && n > opts.nft_max {
                println!(
                    "  nftables: skipped above {} services (--nft-max): loading kube-proxy's nftables rules grows quadratically here",
                    opts.nft_max
                );
                continue;
            }
            if wants(mode) {
                let (plain, config) = rules_topology(&opts, mode, n)?;
                plains.push(plain);
                configs.push(config);
            }
        }
        if let Some((lab, client, ips, ports)) = &weft {
            if stage == 0 {
                // weft's own floor: the backend pods dialled directly,
                // through weft's programs, which translate nothing.
                configs.push(Config {
                    mode: "weft-direct",
                    client_netns: client.clone(),
                    targets: ips
                        .iter()
                        .map(|ip| SocketAddr::from((*ip, ports[0])))
                        .collect(),
                    install: None,
                    results: Vec::new(),
                });
            }
            let port = ports[stage + 1];
            let started = Instant::now();
            // Files of PER_FILE Services each; the last, partial one
            // rewritten with the new ones.
            let mut from = installed_weft - installed_weft % PER_FILE;
            while from < n {
                let to = (from - from % PER_FILE + PER_FILE).min(n);
                lab.write(
                    &format!("services-{:06}.json", from / PER_FILE),
                    &services::manifest(&installed(from..to, ips, port)),
                )?;
                from = to;
            }
            installed_weft = n;
            let target = services::cluster_ip(n - 1);
            let pin = lab.pin_dir();
            let backends = opts.backends as u16;
            let took = tokio::task::spawn_blocking(move || {
                weft::wait_programmed(
                    &pin,
                    n,
                    (target, SERVICE_PORT, backends),
                    started,
                    Duration::from_secs(900),
                )
            })
            .await??;
            println!(
                "  weft: {n} services programmed {:.2} s after the manifests were written",
                took.as_secs_f64()
            );
            configs.push(Config {
                mode: "weft",
                client_netns: client.clone(),
                targets: vec![SocketAddr::from((target, SERVICE_PORT))],
                install: Some(took),
                results: Vec::new(),
            });
        }
        if !wants("floor") {
            configs.retain(|c| c.mode != "floor");
        }

        // Each round measures every configuration once, starting one
        // further along each time, so none always goes first (or right
        // after the heaviest).
        for round in 0..opts.runs.max(1) {
            println!("   round {}", round + 1);
            let n_configs = configs.len();
            for k in 0..n_configs {
                let c = &mut configs[(round + k) % n_configs];
                let netns = netns_path(&c.client_netns);
                let s = spec(&c.targets);
                let r = tokio::task::spawn_blocking(move || load::run(&netns, &s)).await??;
                describe(c.mode, n, &r);
                c.results.push(r);
            }
        }
        let load = loadavg();
        // vs floor: the median over rounds of the rate divided by the
        // floor's in the same round, which cancels what drifts between
        // rounds.
        let floor_rates: Vec<f64> = configs
            .iter()
            .find(|c| c.mode == "floor")
            .map(|c| c.results.iter().map(LoadResult::rate).collect())
            .unwrap_or_default();
        for mut c in configs {
            let rates: Vec<f64> = c.results.iter().map(LoadResult::rate).collect();
            let vs_floor = median_ratio(&rates, &floor_rates);
            c.results.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let mid = c.results.len() / 2;
            rows.push(Row {
                mode: c.mode,
                services: n,
                install: c.install,
                vs_floor,
                result: c.results.swap_remove(mid),
                load: load.clone(),
            });
        }
        for p in plains {
            p.down();
        }
    }
    floor.down();
    if let Some((lab, ..)) = weft {
        lab.down().await;
    }

    let mut table = Table::new(
        &format!(
            "Datapath: new TCP connections/s, one request and reply each, client pod -> ClusterIP ({} backends, {} connections in flight, {:?} per measurement, median of {} interleaved rounds, each in a rotated order; vs floor: the median of each round's rate over the floor's in that round)",
            opts.backends, opts.concurrency, opts.duration, opts.runs
        ),
        &[
            "mode",
            "services",
            "conn/s",
            "vs floor",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "errors",
            "install s",
            "answered by",
            "loadavg",
        ],
    );
    for r in &rows {
        table.row(vec![
            r.mode.to_string(),
            r.services.to_string(),
            format!("{:.0}", r.result.rate()),
            r.vs_floor
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
            ms(r.result.latency.p50),
            ms(r.result.latency.p90),
            ms(r.result.latency.p99),
            r.result.errors.to_string(),
            r.install
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            r.result
                .answered_by
                .values()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            r.load.clone(),
        ]);
    }
    table.emit(&opts.out_dir, "datapath.csv")
}

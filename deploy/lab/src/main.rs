//! `weft-lab`: bring the local lab up or down, run the demo, or act as a
//! lab pod's server.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use weft_lab::{Lab, LabConfig, net::netns_path, podserver};

#[derive(Parser)]
#[command(
    name = "weft-lab",
    version,
    about = "weft's local lab: a cluster in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct LabArgs {
    /// The lab's name, prefix of its namespaces and nodes.
    #[arg(long, env = "WEFT_LAB_NAME", default_value = "weft")]
    name: String,
    /// How many nodes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    nodes: u8,
    /// Where the weft binaries are; defaults to this binary's directory.
    #[arg(long, env = "WEFT_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Manifests, logs and state; defaults to /run/weft-lab/<name>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Log level of the services.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// OTLP/gRPC collector for every service's and the CNI plugin's spans,
    /// e.g. `http://127.0.0.1:4317`; it must answer at that address in the
    /// lab's namespaces as well as here.
    #[arg(long, env = "WEFT_LAB_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// How pods reach other nodes: `native` routes or a VXLAN `tunnel`.
    #[arg(long, default_value = "native", value_parser = ["native", "tunnel"])]
    routing_mode: String,
}

impl LabArgs {
    fn config(&self) -> anyhow::Result<LabConfig> {
        let bin_dir = match &self.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("binary directory")?
                .to_path_buf(),
        };
        let run_dir = self
            .run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/weft-lab").join(&self.name));
        let mut cfg = LabConfig::new(&self.name, run_dir, bin_dir);
        cfg.nodes = usize::from(self.nodes);
        cfg.log_level = self.log_level.clone();
        cfg.otlp_endpoint = self.otlp_endpoint.clone();
        cfg.routing_mode = self.routing_mode.clone();
        Ok(cfg)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring the lab up, apply manifests, and run until Ctrl-C.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Manifest files to apply once the lab is up.
        #[arg(long = "apply")]
        apply: Vec<PathBuf>,
    },
    /// Remove what a lab left behind (processes, namespaces, pins).
    Down {
        #[arg(long, env = "WEFT_LAB_NAME", default_value = "weft")]
        name: String,
    },
    /// Bring the lab up with the demo manifests and show a Service being
    /// load-balanced.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
        /// Exit after the demo instead of keeping the lab running.
        #[arg(long)]
        exit: bool,
    },
    /// A real Kubernetes cluster (upstream control plane, containerd and
    /// kubelets built here) with weft installed by its chart.
    Kube {
        #[command(subcommand)]
        command: KubeCmd,
    },
    /// Run the lab pod server (inside a pod's namespace).
    PodServer {
        #[arg(long)]
        name: String,
        #[arg(long = "port", default_value = "8080")]
        ports: Vec<u16>,
    },
}

#[derive(clap::Args, Clone)]
struct KubeArgs {
    /// The cluster's name, prefix of its namespaces and nodes.
    #[arg(long, env = "WEFT_KUBE_NAME", default_value = "kube")]
    name: String,
}

#[derive(Subcommand)]
enum KubeCmd {
    /// Build what is missing (upstream Kubernetes into its cache, the
    /// images), bring the cluster up, install weft with its chart and
    /// CoreDNS, and return with the cluster running.
    Up {
        #[command(flatten)]
        kube: KubeArgs,
        /// How many nodes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
        nodes: u8,
        /// Where the weft binaries are; defaults to this binary's directory.
        #[arg(long, env = "WEFT_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// How pods reach other nodes: `native` routes or a VXLAN `tunnel`.
        #[arg(long, default_value = "native", value_parser = ["native", "tunnel"])]
        routing_mode: String,
        /// More chart values (`--set key=value`), as for `helm install`.
        #[arg(long = "set")]
        set: Vec<String>,
        /// Bring up Kubernetes only: no weft, no DNS.
        #[arg(long)]
        no_weft: bool,
    },
    /// Stop the cluster and remove it (its logs stay).
    Down {
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Restart one of the cluster's processes (`kube-apiserver`, `etcd`,
    /// `<node>-kubelet`, `<node>-containerd`, ...) with SIGTERM.
    Restart {
        #[command(flatten)]
        kube: KubeArgs,
        process: String,
    },
    /// Run Kubernetes' own network tests (the upstream e2e suite) against
    /// the cluster: conformance, NetworkPolicy and Services specs; writes
    /// JUnit and a summary table under the report directory.
    E2e {
        #[command(flatten)]
        kube: KubeArgs,
        /// Which specs: `conformance`, `netpol`, `services`, or `all`.
        #[arg(long, default_value = "all", value_parser = ["conformance", "netpol", "services", "all"])]
        suite: String,
        /// Parallel ginkgo processes.
        #[arg(long, default_value_t = 4)]
        procs: usize,
        /// Where the reports go; defaults to the cluster's state directory.
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
    /// Run kubectl against the cluster, from its control-plane namespace.
    Kubectl {
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The upstream binaries of a cluster that is up (cached by the build).
fn upstream_bin(repo: &std::path::Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(repo.join("deploy/kube/build.sh"))
        .args(weft_lab::kube::artifacts::CLUSTER_PROGRAMS)
        .output()
        .context("running deploy/kube/build.sh")?;
    if !out.status.success() {
        bail!("deploy/kube/build.sh failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

async fn kube(command: KubeCmd) -> anyhow::Result<()> {
    use weft_lab::kube::{Cluster, KubeConfig, artifacts};
    let repo = artifacts::repo_root();
    match command {
        KubeCmd::Up {
            kube,
            nodes,
            bin_dir,
            routing_mode,
            set,
            no_weft,
        } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?
                    .parent()
                    .context("binary directory")?
                    .to_path_buf(),
            };
            let mut cfg = artifacts::prepare(&kube.name, &repo, &bin_dir)?;
            cfg.nodes = usize::from(nodes);
            cfg.routing_mode = routing_mode;
            cfg.helm_set = set;
            if no_weft {
                cfg.chart = None;
            }
            let cluster = Cluster::new(cfg);
            let started = std::time::Instant::now();
            cluster.up().await?;
            let me = std::env::current_exe()?;
            println!(
                "cluster {} is up in {} s: {} nodes, API server {}",
                kube.name,
                started.elapsed().as_secs(),
                nodes,
                cluster.api_server()
            );
            println!(
                "  kubectl:  {} kube kubectl -- get pods -A -o wide",
                me.display()
            );
            println!(
                "  or:       nsenter --net={} {} --kubeconfig {} get nodes",
                netns_path(&cluster.cp_netns()).display(),
                cluster.cfg.upstream_bin.join("kubectl").display(),
                cluster.pki.kubeconfig("admin").display()
            );
            println!("  logs:     {}", cluster.log_dir().display());
            println!("  down:     {} kube down", me.display());
            Ok(())
        }
        KubeCmd::Down { kube } => {
            let cluster = Cluster::new(KubeConfig::new(&kube.name, PathBuf::new()));
            cluster.down().await
        }
        KubeCmd::Restart { kube, process } => {
            let cluster = Cluster::new(KubeConfig::new(&kube.name, upstream_bin(&repo)?));
            let pid = cluster.find_daemon(&process)?.restart().await?;
            println!("{process} restarted as {pid}");
            Ok(())
        }
        KubeCmd::E2e {
            kube,
            suite,
            procs,
            report_dir,
        } => {
            use weft_lab::kube::e2e;
            let mut programs = vec!["e2e.test", "ginkgo"];
            programs.extend(weft_lab::kube::artifacts::CLUSTER_PROGRAMS);
            let out = Command::new(repo.join("deploy/kube/build.sh"))
                .args(&programs)
                .output()
                .context("running deploy/kube/build.sh")?;
            if !out.status.success() {
                bail!("deploy/kube/build.sh failed");
            }
            let mut cfg = KubeConfig::new(
                &kube.name,
                PathBuf::from(String::from_utf8(out.stdout)?.trim()),
            );
            cfg.nodes = Cluster::new(cfg.clone()).node_count();
            let cluster = Cluster::new(cfg);
            let suites = match suite.as_str() {
                "conformance" => vec![e2e::CONFORMANCE],
                "netpol" => vec![e2e::NETWORK_POLICY],
                "services" => vec![e2e::SERVICES],
                _ => e2e::SUITES.to_vec(),
            };
            let opts = e2e::RunOptions {
                suites,
                skips: e2e::read_skips(&repo.join("deploy/kube/e2e-skips.txt"))?,
                procs,
                report_dir: report_dir.unwrap_or_else(|| cluster.cfg.state_dir.join("e2e")),
            };
            println!(
                "running the e2e specs; progress in {}",
                opts.report_dir.join("e2e.log").display()
            );
            let summary = cluster.run_e2e(&opts).await?;
            println!("{}", summary.table());
            println!("reports: {}", opts.report_dir.display());
            if !summary.failures().is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        KubeCmd::Kubectl { kube, args } => {
            let cluster = Cluster::new(KubeConfig::new(&kube.name, upstream_bin(&repo)?));
            let kubectl = cluster.kubectl();
            let status = Command::new("nsenter")
                .arg(format!("--net={}", netns_path(&kubectl.netns).display()))
                .arg("--")
                .arg(&kubectl.bin)
                .args(&args)
                .env("KUBECONFIG", &kubectl.kubeconfig)
                .status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::PodServer { name, ports } => {
            // Every port's server starts before the first is awaited (a
            // lazy iterator would start the next only after one ended).
            let servers: Vec<_> = ports
                .into_iter()
                .map(|p| tokio::spawn(podserver::serve(name.clone(), p)))
                .collect();
            for s in servers {
                s.await??;
            }
            Ok(())
        }
        Cmd::Down { name } => Lab::clean(&name),
        Cmd::Kube { command } => kube(command).await,
        Cmd::Up { lab, apply } => {
            let lab = Lab::up(lab.config()?).await?;
            for file in &apply {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "applied.yaml".into());
                lab.manifests.apply_yaml(&name, &text)?;
            }
            print_access(&lab);
            println!("lab is up; Ctrl-C stops it");
            wait_for_signal().await;
            lab.down().await
        }
        Cmd::Demo { lab, exit } => {
            let lab = Lab::up(lab.config()?).await?;
            let result = demo(&lab).await;
            if result.is_ok() && !exit {
                print_access(&lab);
                println!("\nThe lab keeps running; Ctrl-C stops it.");
                wait_for_signal().await;
            }
            let down = lab.down().await;
            result.and(down)
        }
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn print_access(lab: &Lab) {
    let node = lab.node_names().into_iter().next().unwrap_or_default();
    println!(
        "\nManifests: {}  (edit them; the lab and svc-watcher follow)",
        lab.manifests.root().display()
    );
    println!("Logs:      {}", lab.log_dir().display());
    println!(
        "weftctl:   nsenter --net={} {} service list",
        netns_path(&node).display(),
        lab.bin("weftctl").display()
    );
    println!(
        "grpcurl:   nsenter --net={} grpcurl -plaintext 127.0.0.1:9400 list",
        netns_path(&lab.cp_netns()).display()
    );
}

/// Applies the demo manifests, waits for the pods, shows the service list
/// and calls the Service from the client pod.
async fn demo(lab: &Lab) -> anyhow::Result<()> {
    let manifest = include_str!("../manifests/demo.yaml");
    lab.manifests.apply_yaml("demo.yaml", manifest)?;
    println!(
        "Applied the demo manifests: Service demo/echo over pods echo-1, echo-2, echo-3, and a client pod."
    );
    for pod in ["echo-1", "echo-2", "echo-3", "client"] {
        let ip = lab
            .wait_pod_ready("demo", pod, Duration::from_secs(60))
            .await?;
        println!("  pod demo/{pod:<7} running at {ip}");
    }
    let cluster_ip = wait_cluster_ip(lab, "demo", "echo").await?;
    // Let the EndpointSlice reach the datapath.
    wait_backends(lab, &cluster_ip, 3).await?;

    let node = lab.node_names().into_iter().next().unwrap_or_default();
    println!("\n$ weftctl service list");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(&node).display()))
        .arg(lab.bin("weftctl"))
        .args(["--datapath", "http://127.0.0.1:9403", "service", "list"])
        .output()
        .context("running weftctl")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("weftctl failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    let client = lab.pod_netns_path("demo", "client");
    let tcp: SocketAddr = format!("{cluster_ip}:80").parse()?;
    let udp: SocketAddr = format!("{cluster_ip}:53").parse()?;
    println!("\nFrom pod demo/client, 6 TCP connections to {tcp} and 6 UDP datagrams to {udp}:");
    let answers = podserver::in_pod(&client, move || {
        let mut out = Vec::new();
        for _ in 0..6 {
            out.push(("TCP", tcp, podserver::tcp_who(tcp, Duration::from_secs(2))?));
        }
        for _ in 0..6 {
            out.push(("UDP", udp, podserver::udp_who(udp, Duration::from_secs(2))?));
        }
        Ok(out)
    })?;
    for (proto, addr, pod) in &answers {
        println!("  {proto} {addr} -> answered by {pod}");
    }
    let distinct: std::collections::BTreeSet<_> =
        answers.iter().map(|(_, _, p)| p.clone()).collect();
    println!(
        "\n{} requests answered by {} different pods: {:?}",
        answers.len(),
        distinct.len(),
        distinct
    );
    Ok(())
}

async fn wait_cluster_ip(lab: &Lab, ns: &str, name: &str) -> anyhow::Result<String> {
    for _ in 0..100 {
        let objs = lab.manifests.read();
        if let Some(ip) = objs
            .services
            .iter()
            .find(|(_, s)| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata.name.as_deref() == Some(name)
            })
            .and_then(|(_, s)| s.spec.as_ref()?.cluster_ip.clone())
        {
            return Ok(ip);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("service {ns}/{name} got no cluster IP")
}

async fn wait_backends(lab: &Lab, cluster_ip: &str, n: usize) -> anyhow::Result<()> {
    let node = lab.node_names().into_iter().next().unwrap_or_default();
    let mut client = weft_proto::datapath::v1::datapath_client::DatapathClient::new(
        lab.channel(&format!("datapath-svc/{node}"))?,
    );
    for _ in 0..100 {
        if let Ok(r) = client
            .list_services(weft_proto::datapath::v1::ListServicesRequest {})
            .await
            && r.get_ref()
                .services
                .iter()
                .any(|s| s.frontend.starts_with(&format!("{cluster_ip}:")) && s.backends.len() >= n)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the datapath did not program {cluster_ip} with {n} backends")
}

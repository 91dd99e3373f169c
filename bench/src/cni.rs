//! Benchmark 3: CNI ADD and DEL latency, weft's plugin against Debian's
//! `bridge` + `host-local`, both executed as a container runtime executes
//! them (a fresh process per call, config on stdin, the CNI_* environment),
//! for pods created one after another and many at once.
//!
//! weft-cni runs from the host namespace against a lab node's datapath-svc
//! exactly as the lab's kubelet runs it. The bridge plugin runs inside a
//! node namespace of its own (it creates its bridge where it runs), started
//! from a thread that entered that namespace, so no extra process sits in
//! front of it. Creating the pods' namespaces is not timed.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use weft_lab::{
    lab::CniCall,
    net::{netns_add, netns_del, netns_path},
};

use crate::{
    report::Table,
    services::{self, NAMESPACE},
    stats::{Summary, ms},
    topo,
    weft::BenchLab,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub pods: usize,
    pub concurrent: usize,
    pub rounds: usize,
    pub plugin_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
}

/// Latencies of one plugin: sequential ADD, sequential DEL, concurrent ADD,
/// concurrent DEL.
#[derive(Default)]
struct Timings {
    seq_add: Vec<Duration>,
    seq_del: Vec<Duration>,
    con_add: Vec<Duration>,
    con_del: Vec<Duration>,
}

fn container_id(i: usize) -> String {
    format!("{:032x}", 0xc0de_0000_u64 + i as u64)
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let weft = weft_timings(&opts).await?;
    let bridge = tokio::task::block_in_place(|| bridge_timings(&opts))?;
    let mut table = Table::new(
        &format!(
            "CNI: ADD and DEL latency, {} pods one after another, then {} rounds of {} at once",
            opts.pods, opts.rounds, opts.concurrent
        ),
        &[
            "plugin", "command", "pods", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms",
        ],
    );
    for (plugin, mut t) in [("weft-cni", weft), ("bridge+host-local", bridge)] {
        for (command, pods, samples) in [
            ("ADD", "one by one", &mut t.seq_add),
            ("DEL", "one by one", &mut t.seq_del),
            ("ADD", "at once", &mut t.con_add),
            ("DEL", "at once", &mut t.con_del),
        ] {
            let s = Summary::of(samples);
            table.row(vec![
                plugin.to_string(),
                command.to_string(),
                if pods == "at once" {
                    format!("{} at once", opts.concurrent)
                } else {
                    pods.to_string()
                },
                s.count.to_string(),
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.max),
            ]);
        }
    }
    table.emit(&opts.out_dir, "cni.csv")
}

async fn weft_timings(opts: &Options) -> anyhow::Result<Timings> {
    let lab = BenchLab::up("wbn", &opts.bin_dir, |cfg| {
        cfg.mask_size = 22;
        cfg.log_level = "warn".into();
    })
    .await?;
    let node = lab.node();
    let total = opts.pods.max(opts.concurrent);
    // The pods exist as objects, as they do when kubelet calls the plugin.
    let objects = (0..total)
        .map(|i| services::pod_manifest(&format!("cni-{i}"), &node, &format!("app-{}", i % 10)))
        .collect();
    lab.write("namespace.json", &services::namespace_manifest())?;
    lab.write("pods.json", &services::list(objects))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let netns: Vec<String> = (0..total).map(|i| format!("wbn-cp-{i}")).collect();
    for ns in &netns {
        netns_add(ns)?;
    }
    let call = |i: usize, command: &'static str| {
        let lab = &lab;
        let node = &node;
        let netns = &netns;
        async move {
            let id = container_id(i);
            let name = format!("cni-{i}");
            let t = Instant::now();
            lab.lab
                .cni(&CniCall::new(
                    node, command, &id, &netns[i], NAMESPACE, &name,
                ))
                .await
                .with_context(|| format!("weft-cni {command} {name}"))?;
            anyhow::Ok(t.elapsed())
        }
    };
    let mut t = Timings::default();
    for i in 0..opts.pods {
        t.seq_add.push(call(i, "ADD").await?);
    }
    for i in 0..opts.pods {
        t.seq_del.push(call(i, "DEL").await?);
    }
    for _ in 0..opts.rounds {
        let adds = futures::future::join_all((0..opts.concurrent).map(|i| call(i, "ADD"))).await;
        for a in adds {
            t.con_add.push(a?);
        }
        let dels = futures::future::join_all((0..opts.concurrent).map(|i| call(i, "DEL"))).await;
        for d in dels {
            t.con_del.push(d?);
        }
    }
    for ns in &netns {
        netns_del(ns)?;
    }
    lab.down().await;
    Ok(t)
}

/// The bridge plugin's network configuration, as a runtime would have it
/// in /etc/cni/net.d.
fn bridge_config(data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench-bridge",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.88.0.0/22"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        },
    })
    .to_string()
}

/// Runs `plugin` once, as a runtime does; returns its wall time.
fn exec_plugin(
    plugin: &Path,
    plugin_dir: &Path,
    conf: &str,
    command: &str,
    id: &str,
    netns: &str,
    name: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns_path(netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{} {command} {name}: {} {}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn bridge_timings(opts: &Options) -> anyhow::Result<Timings> {
    let plugin = opts.plugin_dir.join("bridge");
    anyhow::ensure!(
        plugin.exists() && opts.plugin_dir.join("host-local").exists(),
        "{} has no bridge and host-local plugins (apt-get install containernetworking-plugins)",
        opts.plugin_dir.display()
    );
    topo::clean("wbb")?;
    let node = "wbb-node".to_string();
    netns_add(&node)?;
    let data_dir = PathBuf::from("/run/weft-bench/host-local");
    let _ = std::fs::remove_dir_all(&data_dir);
    let conf = bridge_config(&data_dir);
    let total = opts.pods.max(opts.concurrent);
    let netns: Vec<String> = (0..total).map(|i| format!("wbb-p{i}")).collect();
    for ns in &netns {
        netns_add(ns)?;
    }
    let opts = opts.clone();
    let timings = weft_common::netns::run_in(&netns_path(&node), move || {
        let one = |i: usize, command: &str| {
            exec_plugin(
                &plugin,
                &opts.plugin_dir,
                &conf,
                command,
                &container_id(i),
                &netns[i],
                &format!("cni-{i}"),
            )
        };
        let mut t = Timings::default();
        for i in 0..opts.pods {
            t.seq_add.push(one(i, "ADD")?);
        }
        for i in 0..opts.pods {
            t.seq_del.push(one(i, "DEL")?);
        }
        for _ in 0..opts.rounds {
            for command in ["ADD", "DEL"] {
                // Threads started here are in the node namespace too.
                let results: Vec<anyhow::Result<Duration>> = std::thread::scope(|s| {
                    let handles: Vec<_> = (0..opts.concurrent)
                        .map(|i| {
                            let one = &one;
                            s.spawn(move || one(i, command))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(anyhow::anyhow!("a plugin thread panicked"))
                            })
                        })
                        .collect()
                });
                let into = if command == "ADD" {
                    &mut t.con_add
                } else {
                    &mut t.con_del
                };
                for r in results {
                    into.push(r?);
                }
            }
        }
        Ok(t)
    });
    topo::clean("wbb")?;
    timings
}

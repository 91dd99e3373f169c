//! Benchmarks 2 and 4: the control plane and memory.
//!
//! With N Services and N×E endpoints installed in a one-node lab:
//! - the time from a Service or EndpointSlice change to the datapath's
//!   pinned map showing it, under a steady stream of changes, through two
//!   sources: the lab's manifest directory (what an operator of the lab
//!   sees) and svc-watcher's state store fed one event at a time, as the
//!   Kubernetes API source feeds it (measured by serving the store from this
//!   process in svc-watcher's place);
//! - the time a datapath-svc started with empty maps and no cache takes to
//!   program every frontend, svc-watcher holding the state;
//! - for comparison, how long `iptables-restore` and `nft -f` take to load
//!   kube-proxy's rule sets for the same Services, and to apply one
//!   Service's change the way kube-proxy's partial syncs do;
//! - RSS of every service, idle, with the Services, and with P pods.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rand::{Rng as _, SeedableRng as _};
use svc_watcher::{
    metrics::Metrics,
    server::WatcherService,
    source::documents::{self, Format},
    state::{Change, StateStore},
};
use tokio_util::sync::CancellationToken;
use weft_common::{grpc::GrpcServer, watch::ObjKey};
use weft_lab::{
    lab::{CniCall, WATCHER_PORT},
    net::{netns_add, netns_del, netns_path},
};
use weft_proto::watcher::v1::Kind;

use crate::{
    report::Table,
    rules,
    services::{self, BenchService, NAMESPACE, SERVICE_PORT},
    stats::{Summary, ms},
    topo::{self, CLUSTER_CIDR, NODE_IP},
    weft::{self, BenchLab, frontend_count},
};

#[derive(Debug, Clone)]
pub struct Options {
    pub services: usize,
    pub endpoints: usize,
    pub changes: usize,
    pub rate: f64,
    pub pods: usize,
    /// Only the memory samples: no churn, cold starts or kube-proxy loads.
    pub memory_only: bool,
    pub cold_starts: usize,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
    pub iptables_restore: String,
}

/// Services per manifest file: a change rewrites one file of this many.
const PER_FILE: usize = 100;

/// What a change should make the map show for one frontend.
#[derive(Debug, Clone, Copy)]
struct Expect {
    ip: Ipv4Addr,
    /// The master entry's backend count; `None`: the frontend is gone.
    count: Option<u16>,
}

/// One change of the churn.
#[derive(Debug, Clone)]
enum Op {
    /// Service `i` loses its last endpoint, or gets it back.
    Scale(usize),
    /// A new Service (index beyond the installed ones) with its slice.
    Create(usize),
    /// Deletes a Service created earlier.
    Delete(usize),
}

/// The Services as they should be, and the churn's own bookkeeping.
struct Model {
    svcs: Vec<BenchService>,
    endpoints: usize,
    /// Services the churn created, in order of creation.
    extra: Vec<usize>,
    /// Of those, the ones whose creation the map has shown (a deletion
    /// waits for that, or it would undo a change nobody saw).
    visible: Arc<Mutex<BTreeSet<usize>>>,
    next_extra: usize,
    rng: rand::rngs::StdRng,
}

impl Model {
    fn new(n: usize, endpoints: usize) -> Self {
        Self {
            svcs: (0..n)
                .map(|i| services::service(i, services::unique_backends(i, endpoints)))
                .collect(),
            endpoints,
            extra: Vec::new(),
            visible: Arc::new(Mutex::new(BTreeSet::new())),
            next_extra: n,
            rng: rand::rngs::StdRng::seed_from_u64(7),
        }
    }

    fn extra_service(&self, i: usize) -> BenchService {
        services::service(i, services::unique_backends(i, self.endpoints))
    }

    /// The k-th change: scale, create, scale, delete, round and round,
    /// each Scale on a random installed Service not pending in `busy`; a
    /// delete whose candidate has not shown up yet scales instead.
    fn next(&mut self, k: usize, busy: &BTreeSet<usize>) -> (Op, Expect) {
        match k % 4 {
            1 => {
                let i = self.next_extra;
                self.next_extra += 1;
                self.extra.push(i);
                let s = self.extra_service(i);
                (
                    Op::Create(i),
                    Expect {
                        ip: s.cluster_ip,
                        count: Some(s.backends.len() as u16),
                    },
                )
            }
            3 if self.first_visible_extra().is_some() => {
                let i = self.first_visible_extra().unwrap_or_default();
                self.extra.retain(|e| *e != i);
                self.visible
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&i);
                (
                    Op::Delete(i),
                    Expect {
                        ip: services::cluster_ip(i),
                        count: None,
                    },
                )
            }
            _ => {
                let i = loop {
                    let i = self.rng.random_range(0..self.svcs.len());
                    if !busy.contains(&i) {
                        break i;
                    }
                };
                let s = &mut self.svcs[i];
                if s.backends.len() == self.endpoints {
                    s.backends.pop();
                } else {
                    s.backends = services::unique_backends(i, self.endpoints);
                }
                (
                    Op::Scale(i),
                    Expect {
                        ip: s.cluster_ip,
                        count: Some(s.backends.len() as u16),
                    },
                )
            }
        }
    }

    fn first_visible_extra(&self) -> Option<usize> {
        let visible = self.visible.lock().unwrap_or_else(|e| e.into_inner());
        self.extra.iter().copied().find(|i| visible.contains(i))
    }

    fn frontends(&self) -> usize {
        self.svcs.len() + self.extra.len()
    }
}

/// Where changes are made.
enum Driver {
    /// Files in the lab's manifest directory.
    Manifests,
    /// svc-watcher's state store, one event per object.
    Events(Arc<StateStore>),
}

fn file_of(i: usize) -> String {
    format!("services-{:04}.json", i / PER_FILE)
}

fn parse_objects(text: &str) -> anyhow::Result<Vec<weft_proto::watcher::v1::Resource>> {
    let parsed = documents::parse(text.as_bytes(), Format::Json)?;
    anyhow::ensure!(
        parsed.invalid.is_empty(),
        "benchmark objects refused: {:?}",
        parsed.invalid.first().map(|i| i.error.to_string())
    );
    Ok(parsed.objects)
}

impl Driver {
    fn apply(&self, lab: &BenchLab, model: &Model, op: &Op) -> anyhow::Result<()> {
        match (self, op) {
            (Driver::Manifests, Op::Scale(i)) => {
                let from = i - i % PER_FILE;
                let to = (from + PER_FILE).min(model.svcs.len());
                lab.write(&file_of(*i), &services::manifest(&model.svcs[from..to]))
            }
            (Driver::Manifests, Op::Create(i)) => lab.write(
                &format!("extra-{i}.json"),
                &services::manifest(&[model.extra_service(*i)]),
            ),
            (Driver::Manifests, Op::Delete(i)) => lab.remove(&format!("extra-{i}.json")),
            (Driver::Events(store), Op::Scale(i)) => {
                for o in parse_objects(&services::manifest(&model.svcs[*i..=*i]))? {
                    store.apply(Change::Upsert(o))?;
                }
                Ok(())
            }
            (Driver::Events(store), Op::Create(i)) => {
                for o in parse_objects(&services::manifest(&[model.extra_service(*i)]))? {
                    store.apply(Change::Upsert(o))?;
                }
                Ok(())
            }
            (Driver::Events(store), Op::Delete(i)) => {
                let name = format!("svc-{i}");
                store.apply(Change::Delete(ObjKey::new(
                    Kind::EndpointSlice,
                    NAMESPACE,
                    format!("{name}-bench"),
                )))?;
                store.apply(Change::Delete(ObjKey::new(Kind::Service, NAMESPACE, name)))?;
                Ok(())
            }
        }
    }
}

struct Pending {
    svc: Option<usize>,
    /// The Service this change created, if it created one.
    created: Option<usize>,
    expect: Expect,
    since: Instant,
}

/// Makes `changes` changes at `rate` per second through `driver` and
/// measures, for each, the time until the pinned map shows it.
fn churn(
    lab: &BenchLab,
    model: &mut Model,
    driver: &Driver,
    changes: usize,
    rate: f64,
) -> anyhow::Result<Churn> {
    let pending: Arc<Mutex<Vec<Pending>>> = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let maps = datapath_svc::bpf::KernelLbMaps::open_pinned(&lab.pin_dir())?;
    let visible = model.visible.clone();
    let poller = {
        let pending = pending.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            let mut timeouts = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.retain(|c| {
                        let seen = frontend_count(&maps, c.expect.ip, SERVICE_PORT);
                        if seen == c.expect.count {
                            latencies.push(c.since.elapsed());
                            if let Some(i) = c.created {
                                visible.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
                            }
                            false
                        } else if c.since.elapsed() > Duration::from_secs(30) {
                            timeouts += 1;
                            false
                        } else {
                            true
                        }
                    });
                    if finished && p.is_empty() {
                        return (latencies, timeouts);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let start = Instant::now();
    for k in 0..changes {
        let due = start + interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let busy: BTreeSet<usize> = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|p| p.svc)
            .collect();
        let (op, expect) = model.next(k, &busy);
        driver.apply(lab, model, &op)?;
        let since = Instant::now();
        let (svc, created) = match op {
            Op::Scale(i) => (Some(i), None),
            Op::Create(i) => (None, Some(i)),
            Op::Delete(_) => (None, None),
        };
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                svc,
                created,
                expect,
                since,
            });
    }
    done.store(true, Ordering::Release);
    let (latencies, timeouts) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the map poller panicked"))?;
    Ok(Churn {
        latencies,
        timeouts,
    })
}

/// What a churn measured.
struct Churn {
    latencies: Vec<Duration>,
    /// Changes the map never showed within 30 s.
    timeouts: usize,
}

/// Serves `store` as svc-watcher on the lab's control-plane namespace, on
/// every address there (ipam-svc and identity-svc dial 127.0.0.1, the
/// datapath the bridge address).
async fn serve_store(
    lab: &BenchLab,
    store: Arc<StateStore>,
    token: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let ns = netns_path(&lab.lab.cp_netns());
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, WATCHER_PORT));
    let std_listener = tokio::task::spawn_blocking(move || {
        weft_common::netns::run_in(&ns, move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match std::net::TcpListener::bind(addr) {
                    Ok(l) => {
                        l.set_nonblocking(true)?;
                        return Ok(l);
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "binding the watcher address");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })
    })
    .await??;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let service = WatcherService::new(store, Metrics::new(), token.clone());
    Ok(tokio::spawn(
        GrpcServer::new()
            .add_service(service.into_server())
            .serve_tcp(listener, token),
    ))
}

/// Every object in the lab's manifest directory, as svc-watcher reads it.
fn read_manifest_dir(root: &Path) -> anyhow::Result<Vec<weft_proto::watcher::v1::Resource>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let format = if name.ends_with(".json") {
                Format::Json
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                Format::Yaml
            } else {
                continue;
            };
            let bytes = std::fs::read(&path)?;
            out.extend(documents::parse(&bytes, format)?.objects);
        }
    }
    Ok(out)
}

/// RSS of each service, by label.
struct Memory {
    columns: Vec<String>,
    rows: Vec<(String, Vec<(u64, u64)>)>,
}

impl Memory {
    fn new() -> Self {
        Self {
            columns: Vec::new(),
            rows: ["svc-watcher", "ipam-svc", "identity-svc", "datapath-svc"]
                .iter()
                .map(|s| (s.to_string(), Vec::new()))
                .collect(),
        }
    }

    fn sample(&mut self, column: &str, lab: &BenchLab) {
        self.columns.push(column.to_string());
        let cp = lab.lab.cp_netns();
        let node = lab.node();
        for (service, values) in self.rows.iter_mut() {
            let netns = if service == "datapath-svc" {
                &node
            } else {
                &cp
            };
            let v = weft::find_pid(&lab.lab.bin(service), netns)
                .and_then(weft::rss_kib)
                .unwrap_or((0, 0));
            values.push(v);
        }
    }

    fn table(&self, title: &str) -> Table {
        let mut headers: Vec<String> = vec!["service".into()];
        for c in &self.columns {
            headers.push(format!("{c} RSS MiB"));
        }
        headers.push("peak MiB".into());
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let mut t = Table::new(title, &refs);
        for (service, values) in &self.rows {
            let mut row = vec![service.clone()];
            row.extend(
                values
                    .iter()
                    .map(|(rss, _)| format!("{:.1}", *rss as f64 / 1024.0)),
            );
            let peak = values.iter().map(|(_, hwm)| *hwm).max().unwrap_or(0);
            row.push(format!("{:.1}", peak as f64 / 1024.0));
            t.row(row);
        }
        t
    }
}

fn summary_row(t: &mut Table, what: &str, samples: &mut [Duration], extra: &str) {
    let s = Summary::of(samples);
    t.row(vec![
        what.to_string(),
        s.count.to_string(),
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.max),
        extra.to_string(),
    ]);
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let n = opts.services;
    let e = opts.endpoints;
    let mut table = Table::new(
        &format!(
            "Control plane: {n} Services, {} endpoints ({e} each); changes at {}/s",
            n * e,
            opts.rate
        ),
        &[
            "what", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms", "note",
        ],
    );
    let mut memory = Memory::new();

    let lab = BenchLab::up("wbc", &opts.bin_dir, |cfg| {
        cfg.mask_size = 22;
        cfg.log_level = "warn".into();
    })
    .await?;
    memory.sample("idle", &lab);

    // Install everything through the manifest directory.
    let mut model = Model::new(n, e);
    lab.write("namespace.json", &services::namespace_manifest())?;
    let started = Instant::now();
    for (k, chunk) in model.svcs.chunks(PER_FILE).enumerate() {
        lab.write(&file_of(k * PER_FILE), &services::manifest(chunk))?;
    }
    let last = model.svcs.last().context("no services")?.cluster_ip;
    let pin = lab.pin_dir();
    let took = {
        let pin = pin.clone();
        tokio::task::spawn_blocking(move || {
            weft::wait_programmed(
                &pin,
                n,
                (last, SERVICE_PORT, e as u16),
                started,
                Duration::from_secs(900),
            )
        })
        .await??
    };
    println!(
        "  {n} Services with {} endpoints programmed {:.2} s after the manifests were written",
        n * e,
        took.as_secs_f64()
    );
    summary_row(
        &mut table,
        "weft: initial load through the manifest directory",
        &mut [took],
        "all files written at once",
    );
    memory.sample(&format!("{n} svc"), &lab);
    if opts.memory_only {
        let pods = create_pods(&lab, opts.pods).await?;
        memory.sample(&format!("{n} svc + {} pods", opts.pods), &lab);
        delete_pods(&lab, pods).await?;
        lab.down().await;
        return memory
            .table(&format!(
                "Memory: RSS of each service (VmRSS; peak is VmHWM over the run), {n} Services, {} endpoints, {} pods",
                n * e,
                opts.pods
            ))
            .emit(&opts.out_dir, "memory.csv");
    }

    // Churn through the manifest directory.
    let mut c = {
        let driver = Driver::Manifests;
        tokio::task::block_in_place(|| churn(&lab, &mut model, &driver, opts.changes, opts.rate))?
    };
    println!(
        "  manifest churn: {} changes seen, {} timed out",
        c.latencies.len(),
        c.timeouts
    );
    summary_row(
        &mut table,
        "weft: change -> map, manifest-directory source",
        &mut c.latencies,
        &format!(
            "{} timeouts; includes inotify, the 10 ms debounce and the re-read of the file",
            c.timeouts
        ),
    );

    // Cold starts of datapath-svc.
    let node = lab.node();
    let mut cold = Vec::new();
    let mut serving = Vec::new();
    for _ in 0..opts.cold_starts {
        let service = format!("datapath-svc/{node}");
        lab.lab.stop_service(&service).await?;
        let _ = std::fs::remove_dir_all(&pin);
        let _ = std::fs::remove_dir_all(lab.lab.run_dir().join("state").join(&node));
        let frontends = model.frontends();
        let last = model.svcs.last().context("no services")?;
        let target = (last.cluster_ip, SERVICE_PORT, last.backends.len() as u16);
        let t = Instant::now();
        lab.lab.start_service(&service).await?;
        serving.push(t.elapsed());
        let pin = pin.clone();
        let took = tokio::task::spawn_blocking(move || {
            weft::wait_programmed(&pin, frontends, target, t, Duration::from_secs(900))
        })
        .await??;
        println!(
            "  cold start: serving after {:.2} s, {frontends} frontends programmed after {:.2} s",
            serving.last().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            took.as_secs_f64()
        );
        cold.push(took);
    }
    summary_row(
        &mut table,
        "weft: cold start of datapath-svc -> every frontend programmed",
        &mut cold,
        "empty maps, no cache; svc-watcher holds the state",
    );
    summary_row(
        &mut table,
        "weft: cold start of datapath-svc -> gRPC serving",
        &mut serving,
        "",
    );

    // Churn through svc-watcher's state store, one event at a time.
    lab.lab.stop_service("svc-watcher").await?;
    let store = Arc::new(StateStore::new(10_000, Metrics::new()));
    store.replace_all(read_manifest_dir(lab.lab.manifests.root())?)?;
    let token = CancellationToken::new();
    let server = serve_store(&lab, store.clone(), token.clone()).await?;
    let driver = Driver::Events(store);
    // The datapath reconnects to the new store (a new epoch: a snapshot).
    let warm = tokio::task::block_in_place(|| churn(&lab, &mut model, &driver, 4, 2.0))?;
    if warm.timeouts > 0 {
        bail!("the datapath did not follow the in-process svc-watcher");
    }
    let mut c =
        tokio::task::block_in_place(|| churn(&lab, &mut model, &driver, opts.changes, opts.rate))?;
    println!(
        "  event churn: {} changes seen, {} timed out",
        c.latencies.len(),
        c.timeouts
    );
    summary_row(
        &mut table,
        "weft: change -> map, event source (svc-watcher store, one event per object)",
        &mut c.latencies,
        &format!(
            "{} timeouts; the path of the Kubernetes API source",
            c.timeouts
        ),
    );
    token.cancel();
    let _ = server.await;
    lab.lab.start_service("svc-watcher").await?;

    // Pods, for memory.
    let pods = create_pods(&lab, opts.pods).await?;
    memory.sample(&format!("{n} svc + {} pods", opts.pods), &lab);
    delete_pods(&lab, pods).await?;
    let svcs = model.svcs.clone();
    lab.down().await;

    // kube-proxy's modes: loading the same Services, and one change.
    kube_proxy_rows(&mut table, &svcs, &opts)?;

    table.emit(&opts.out_dir, "control_plane.csv")?;
    memory
        .table(&format!(
            "Memory: RSS of each service (VmRSS; peak is VmHWM over the run), {n} Services, {} endpoints, {} pods",
            n * e,
            opts.pods
        ))
        .emit(&opts.out_dir, "memory.csv")
}

/// `count` pods on the lab node: Pod objects in the manifests, each a
/// namespace plumbed by weft-cni (no process runs in them).
async fn create_pods(lab: &BenchLab, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let node = lab.node();
    let objects = (0..count)
        .map(|i| services::pod_manifest(&format!("pod-{i}"), &node, &format!("app-{}", i % 25)))
        .collect();
    lab.write("pods.json", &services::list(objects))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut made = Vec::new();
    for i in 0..count {
        let netns = format!("{}-mp-{i}", lab.name);
        netns_add(&netns)?;
        let id = format!("{:032x}", 0xbe00_0000_u64 + i as u64);
        let name = format!("pod-{i}");
        lab.lab
            .cni(&CniCall::new(&node, "ADD", &id, &netns, NAMESPACE, &name))
            .await
            .with_context(|| format!("CNI ADD of {name}"))?;
        made.push((netns, id));
    }
    Ok(made)
}

async fn delete_pods(lab: &BenchLab, pods: Vec<(String, String)>) -> anyhow::Result<()> {
    let node = lab.node();
    for (i, (netns, id)) in pods.into_iter().enumerate() {
        let name = format!("pod-{i}");
        lab.lab
            .cni(&CniCall::new(&node, "DEL", &id, &netns, NAMESPACE, &name))
            .await?;
        netns_del(&netns)?;
    }
    Ok(())
}

/// Full loads and one-Service updates of kube-proxy's rule sets, each in a
/// namespace of its own.
fn kube_proxy_rows(table: &mut Table, svcs: &[BenchService], opts: &Options) -> anyhow::Result<()> {
    let updates = if opts.changes < 100 { 3 } else { 10 };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for mode in ["iptables", "nftables"] {
        let netns = "wbk-rules";
        topo::clean("wbk")?;
        netns_add(netns)?;
        let mut model = svcs.to_vec();
        let full = if mode == "iptables" {
            let text = rules::iptables_restore(&model, CLUSTER_CIDR);
            topo::run_in_netns(netns, &opts.iptables_restore, &[], Some(&text))?
        } else {
            let text = rules::nft_ruleset(&model, CLUSTER_CIDR, "10.100.0.0/16", &[NODE_IP]);
            topo::run_in_netns(netns, "nft", &["-f", "-"], Some(&text))?
        };
        println!("  {mode}: full load in {:.2} s", full.as_secs_f64());
        summary_row(
            table,
            &format!(
                "kube-proxy {mode}: full load ({})",
                if mode == "iptables" {
                    opts.iptables_restore.as_str()
                } else {
                    "nft -f"
                }
            ),
            &mut [full],
            "the rule set of every Service at once",
        );
        let mut times = Vec::new();
        for _ in 0..updates {
            let i = rng.random_range(0..model.len());
            let before = model[i].clone();
            let mut after = before.clone();
            if after.backends.len() == opts.endpoints {
                after.backends.pop();
            } else {
                after.backends = services::unique_backends(i, opts.endpoints);
            }
            model[i] = after.clone();
            let took = if mode == "iptables" {
                let text = rules::iptables_update(&model, &before, &after, CLUSTER_CIDR);
                topo::run_in_netns(netns, &opts.iptables_restore, &["--noflush"], Some(&text))?
            } else {
                let text = rules::nft_update(&before, &after, CLUSTER_CIDR);
                topo::run_in_netns(netns, "nft", &["-f", "-"], Some(&text))?
            };
            times.push(took);
        }
        summary_row(
            table,
            &format!("kube-proxy {mode}: one Service's endpoints changed"),
            &mut times,
            if mode == "iptables" {
                "partial sync: KUBE-SERVICES rewritten + the Service's chains; kube-proxy adds its 1 s min-sync-period"
            } else {
                "one transaction: the Service's chain refilled, stale endpoint chain deleted"
            },
        );
        netns_del(netns)?;
    }
    Ok(())
}

//! The load-balancer maps a node has pinned, read from the test process,
//! and the state they should hold, computed independently of the datapath
//! from what svc-watcher serves.
//!
//! [`MapWatch`] samples a node's maps continuously, so a restart that
//! flushes them, or rewrites them with other ids, is seen even if it puts
//! everything back a moment later.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use datapath_svc::{
    bpf::KernelLbMaps,
    lb::{self, Frontend, FrontendSpec, NodeView},
    sync::{LbMaps as _, MaglevConfig, MemMaps},
};
use weft_lab::Lab;
use weft_proto::watcher::v1::{Kind, ListRequest, resource, watcher_client::WatcherClient};

/// Everything a node's load-balancer maps hold, copied out of the kernel.
pub fn read(pin_dir: &Path) -> anyhow::Result<MemMaps> {
    let maps = KernelLbMaps::open_pinned(pin_dir)
        .with_context(|| format!("opening the maps pinned in {}", pin_dir.display()))?;
    copy(&maps)
}

fn copy(maps: &KernelLbMaps) -> anyhow::Result<MemMaps> {
    Ok(MemMaps {
        services: maps.services()?.into_iter().collect(),
        backends: maps.backends()?.into_iter().collect(),
        rev_nats: maps.rev_nats()?.into_iter().collect(),
        maglev: maps.maglev()?.into_iter().collect(),
    })
}

/// The frontends `node` should have programmed for the Services and
/// EndpointSlices svc-watcher serves now (the lab runs every datapath with
/// the default algorithm and Maglev settings). HostPort frontends are not
/// included: the tests that use this run pods without host ports.
pub async fn desired(lab: &Lab, node: &str) -> anyhow::Result<BTreeMap<Frontend, FrontendSpec>> {
    let mut watcher = WatcherClient::new(lab.channel("svc-watcher")?);
    let resources = watcher
        .list(ListRequest {
            kinds: vec![Kind::Service as i32, Kind::EndpointSlice as i32],
        })
        .await
        .context("listing Services and EndpointSlices")?
        .into_inner()
        .resources;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for r in resources {
        match r.kind {
            Some(resource::Kind::Service(s)) => services.push(s),
            Some(resource::Kind::EndpointSlice(s)) => slices.push(s),
            _ => {}
        }
    }
    let view = NodeView {
        name: node.to_string(),
        addrs: vec![lab.node_addr(node).context("node address")?],
        default_algorithm: lb::Algorithm::Random,
    };
    let mut out = BTreeMap::new();
    for svc in &services {
        let Some(meta) = &svc.meta else { continue };
        let own: Vec<_> = slices
            .iter()
            .filter(|s| {
                s.service_name == meta.name
                    && s.meta
                        .as_ref()
                        .is_some_and(|m| m.namespace == meta.namespace)
            })
            .collect();
        out.extend(lb::service_frontends(svc, own.iter().copied(), &view));
    }
    Ok(out)
}

/// Checks that `node`'s pinned maps hold exactly `desired`.
pub fn verify(
    pin_dir: &Path,
    desired: &BTreeMap<Frontend, FrontendSpec>,
) -> anyhow::Result<MemMaps> {
    let maps = read(pin_dir)?;
    datapath_svc::sync::verify(&maps, desired, MaglevConfig::default())
        .map_err(|e| anyhow::anyhow!("{}: {e}", pin_dir.display()))?;
    Ok(maps)
}

/// Samples a node's maps every few milliseconds and counts the samples
/// that differ from a baseline.
pub struct MapWatch {
    pub pin_dir: PathBuf,
    stop: Arc<AtomicBool>,
    baseline: Arc<Mutex<MemMaps>>,
    samples: Arc<AtomicU64>,
    deviations: Arc<AtomicU64>,
    first_deviation: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl MapWatch {
    /// Starts sampling with the maps as they are now as the baseline.
    pub fn start(pin_dir: &Path) -> anyhow::Result<Self> {
        let maps = KernelLbMaps::open_pinned(pin_dir)?;
        let baseline = Arc::new(Mutex::new(copy(&maps)?));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU64::new(0));
        let deviations = Arc::new(AtomicU64::new(0));
        let first_deviation = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, baseline, samples, deviations, first) = (
                stop.clone(),
                baseline.clone(),
                samples.clone(),
                deviations.clone(),
                first_deviation.clone(),
            );
            std::thread::Builder::new()
                .name("map watch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let now = copy(&maps);
                        let base = baseline.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        samples.fetch_add(1, Ordering::Relaxed);
                        let differs = match &now {
                            Ok(m) => (m != &base).then(|| describe_diff(&base, m)),
                            Err(e) => Some(format!("reading the maps failed: {e:#}")),
                        };
                        if let Some(d) = differs {
                            deviations.fetch_add(1, Ordering::Relaxed);
                            first
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(d);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })?
        };
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            stop,
            baseline,
            samples,
            deviations,
            first_deviation,
            thread: Some(thread),
        })
    }

    pub fn baseline(&self) -> MemMaps {
        self.baseline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// (samples taken, samples that differed from the baseline, the first
    /// difference) since the start.
    pub fn tally(&self) -> (u64, u64, Option<String>) {
        (
            self.samples.load(Ordering::Relaxed),
            self.deviations.load(Ordering::Relaxed),
            self.first_deviation
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl Drop for MapWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What differs between two copies of the maps, briefly.
pub fn describe_diff(a: &MemMaps, b: &MemMaps) -> String {
    fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
        name: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
        out: &mut Vec<String>,
    ) {
        let gone = a.keys().filter(|k| !b.contains_key(k)).count();
        let new = b.keys().filter(|k| !a.contains_key(k)).count();
        let changed: Vec<_> = a
            .iter()
            .filter(|(k, v)| b.get(k).is_some_and(|w| w != *v))
            .map(|(k, v)| format!("{k:?}: {v:?} -> {:?}", b.get(k)))
            .take(2)
            .collect();
        if gone + new > 0 || !changed.is_empty() {
            out.push(format!(
                "{name}: {} -> {} entries, {gone} gone, {new} new, changed {changed:?}",
                a.len(),
                b.len()
            ));
        }
    }
    let mut out = Vec::new();
    diff("services", &a.services, &b.services, &mut out);
    diff("backends", &a.backends, &b.backends, &mut out);
    diff("reverse NAT", &a.rev_nats, &b.rev_nats, &mut out);
    diff("maglev", &a.maglev, &b.maglev, &mut out);
    out.join("; ")
}

//! Follows the cluster state from svc-watcher and keeps the load-balancer
//! maps in line with it.
//!
//! Every change also wakes the writer of the on-disk cache (see
//! [`crate::cache`]), so a datapath-svc that starts while svc-watcher is
//! down reprograms from the last state it saw instead of from nothing.
//! Changes are applied per Service: a changed Service or EndpointSlice
//! recomputes that Service's frontends only.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weft_common::watch::{Applied, Mirror, ObjKey, subscribe};
use weft_proto::watcher::v1::{Kind, Resource, resource, watch_event::Event};

use crate::{
    agent::Agent,
    lb::{self, Frontend, FrontendSpec},
};

/// The kinds a datapath follows.
pub const KINDS: [Kind; 6] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::Namespace,
    Kind::Node,
    Kind::NetworkPolicy,
];

/// (namespace, name) of a Service.
type SvcKey = (String, String);

/// What a set of frontends is computed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A Service's ClusterIP, NodePort, ExternalIP and LoadBalancer frontends.
    Service(String, String),
    /// The HostPort frontends of a pod on this node (`namespace/name`).
    HostPorts(String),
}

/// Which frontends each owner has and which slices belong to each Service.
#[derive(Default)]
pub struct LbController {
    /// Slice names by Service; a Service nearly always has one, so a
    /// short vector rather than a set (whose smallest node is eleven wide).
    slices: HashMap<SvcKey, Vec<String>>,
    frontends: HashMap<Owner, Vec<Frontend>>,
}

fn add_slice(names: &mut Vec<String>, name: &str) {
    if !names.iter().any(|n| n == name) {
        names.push(name.to_string());
    }
}

fn slice_service(r: &Resource) -> Option<SvcKey> {
    match r.kind.as_ref()? {
        resource::Kind::EndpointSlice(s) => {
            let meta = s.meta.as_ref()?;
            Some((meta.namespace.clone(), s.service_name.clone()))
        }
        _ => None,
    }
}

impl LbController {
    fn desired_for(
        &self,
        agent: &Agent,
        mirror: &Mirror,
        owner: &Owner,
    ) -> Vec<(Frontend, FrontendSpec)> {
        match owner {
            Owner::Service(ns, name) => {
                let Some(Resource {
                    kind: Some(resource::Kind::Service(svc)),
                }) = mirror.get(&ObjKey::new(Kind::Service, ns, name))
                else {
                    agent.health_checks.set(&format!("{ns}/{name}"), None);
                    return Vec::new();
                };
                let key = (ns.clone(), name.clone());
                let slices: Vec<_> = self
                    .slices
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|slice| {
                        match mirror.get(&ObjKey::new(Kind::EndpointSlice, ns, slice)) {
                            Some(Resource {
                                kind: Some(resource::Kind::EndpointSlice(s)),
                            }) => Some(s),
                            _ => None,
                        }
                    })
                    .collect();
                agent.health_checks.set(
                    &format!("{ns}/{name}"),
                    lb::health_check(&svc, slices.iter(), &agent.config.view),
                );
                lb::service_frontends(&svc, slices.iter(), &agent.config.view)
            }
            Owner::HostPorts(pod) => {
                let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
                let declared = match mirror.get(&ObjKey::new(Kind::Pod, ns, name)) {
                    Some(Resource {
                        kind: Some(resource::Kind::Pod(p)),
                    }) => lb::pod_host_ports(&p),
                    _ => Vec::new(),
                };
                let records = agent.endpoints.all().unwrap_or_default();
                let mut out = Vec::new();
                for record in records.iter().filter(|r| r.pod() == *pod) {
                    let Ok(ip) = record.ip.parse() else { continue };
                    let mapped = record.port_mappings.iter().filter_map(|m| {
                        let proto = match m.protocol.to_ascii_lowercase().as_str() {
                            "udp" => lb::Proto::Udp,
                            _ => lb::Proto::Tcp,
                        };
                        Some((
                            proto,
                            u16::try_from(m.host_port).ok()?,
                            u16::try_from(m.container_port).ok()?,
                            m.host_ip.parse().ok(),
                        ))
                    });
                    let ports: Vec<_> = declared.iter().copied().chain(mapped).collect();
                    out.extend(lb::hostport_frontends(pod, ip, ports, &agent.config.view));
                }
                out
            }
        }
    }

    /// Every owner the current state implies.
    fn owners(agent: &Agent, mirror: &Mirror) -> BTreeSet<Owner> {
        let mut owners: BTreeSet<Owner> = mirror
            .of_kind(Kind::Service)
            .map(|(k, _)| Owner::Service(k.namespace.clone(), k.name.clone()))
            .collect();
        owners.extend(
            agent
                .endpoints
                .all()
                .unwrap_or_default()
                .into_iter()
                .map(|r| Owner::HostPorts(r.pod())),
        );
        owners
    }

    /// Recomputes everything and removes what is not wanted. Used at start
    /// and after each full snapshot.
    pub fn full_sync(&mut self, agent: &Agent, mirror: &Mirror) -> anyhow::Result<usize> {
        agent.node_health.queued();
        agent.health_checks.retain(|key| {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            mirror.get(&ObjKey::new(Kind::Service, ns, name)).is_some()
        });
        self.slices.clear();
        for (key, r) in mirror.of_kind(Kind::EndpointSlice) {
            if let Some(svc) = slice_service(&r) {
                add_slice(self.slices.entry(svc).or_default(), &key.name);
            }
        }
        let mut desired: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
        self.frontends.clear();
        for owner in Self::owners(agent, mirror) {
            let fes = self.desired_for(agent, mirror, &owner);
            if !fes.is_empty() {
                self.frontends
                    .insert(owner, fes.iter().map(|(f, _)| *f).collect());
            }
            desired.extend(fes);
        }
        let mut lb = agent.lb.lock().unwrap_or_else(|p| p.into_inner());
        for (f, spec) in &desired {
            lb.apply(*f, Some(spec))?;
        }
        lb.retain(|f| desired.contains_key(f))?;
        agent.metrics.lb_frontends.set(lb.programmed().len() as i64);
        agent.node_health.updated();
        Ok(desired.len())
    }

    /// Applies the objects in `changed`, which the mirror already holds.
    pub fn apply_changes(
        &mut self,
        agent: &Agent,
        mirror: &Mirror,
        changed: &[ObjKey],
        before: &HashMap<ObjKey, Option<SvcKey>>,
    ) -> anyhow::Result<()> {
        let mut dirty: BTreeSet<Owner> = BTreeSet::new();
        for key in changed {
            match key.kind {
                Kind::Service => {
                    dirty.insert(Owner::Service(key.namespace.clone(), key.name.clone()));
                }
                Kind::EndpointSlice => {
                    // The slice may have moved between services.
                    if let Some(Some(old)) = before.get(key) {
                        if let Some(names) = self.slices.get_mut(old) {
                            names.retain(|n| *n != key.name);
                            if names.is_empty() {
                                self.slices.remove(old);
                            }
                        }
                        dirty.insert(Owner::Service(old.0.clone(), old.1.clone()));
                    }
                    if let Some(new) = mirror.get(key).as_ref().and_then(slice_service) {
                        add_slice(self.slices.entry(new.clone()).or_default(), &key.name);
                        dirty.insert(Owner::Service(new.0, new.1));
                    }
                }
                Kind::Pod => {
                    dirty.insert(Owner::HostPorts(format!("{}/{}", key.namespace, key.name)));
                }
                Kind::Node => agent.routes_dirty.notify_one(),
                _ => {}
            }
        }
        if changed.iter().any(|k| {
            matches!(
                k.kind,
                Kind::Pod | Kind::Namespace | Kind::Node | Kind::NetworkPolicy
            )
        }) {
            agent.policy_dirty.notify_one();
        }
        self.apply_owners(agent, mirror, dirty)
    }

    /// Recomputes the frontends of `dirty` owners.
    pub fn apply_owners(
        &mut self,
        agent: &Agent,
        mirror: &Mirror,
        dirty: BTreeSet<Owner>,
    ) -> anyhow::Result<()> {
        agent.node_health.queued();
        let mut lb = agent.lb.lock().unwrap_or_else(|p| p.into_inner());
        for owner in dirty {
            let fes = self.desired_for(agent, mirror, &owner);
            let new: Vec<Frontend> = fes.iter().map(|(f, _)| *f).collect();
            for (f, spec) in &fes {
                lb.apply(*f, Some(spec))?;
            }
            if let Some(old) = self.frontends.get(&owner) {
                for f in old.iter().filter(|f| !new.contains(f)) {
                    // Unless another owner claimed the same frontend.
                    let claimed = self
                        .frontends
                        .iter()
                        .any(|(k, v)| *k != owner && v.contains(f));
                    if !claimed {
                        lb.apply(*f, None)?;
                    }
                }
            }
            if new.is_empty() {
                self.frontends.remove(&owner);
            } else {
                self.frontends.insert(owner, new);
            }
        }
        agent.metrics.lb_frontends.set(lb.programmed().len() as i64);
        agent.node_health.updated();
        Ok(())
    }
}

/// Follows svc-watcher until shutdown.
pub async fn follow(
    agent: Arc<Agent>,
    cache_dirty: Arc<tokio::sync::Notify>,
    mut controller: LbController,
    watcher: Channel,
    mut hostports: tokio::sync::mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) {
    let mut events = Box::pin(subscribe(
        watcher,
        KINDS.to_vec(),
        format!("datapath-svc/{}", agent.node),
        shutdown.clone(),
        Some(agent.peers.watcher.clone()),
    ));
    let mut needs_full_sync = false;
    loop {
        let event = tokio::select! {
            e = events.next() => match e {
                Some(e) => e,
                None => return,
            },
            Some(pod) = hostports.recv() => {
                let mirror = agent.cluster.read().unwrap_or_else(|p| p.into_inner());
                let dirty = BTreeSet::from([Owner::HostPorts(pod)]);
                if let Err(e) = controller.apply_owners(&agent, &mirror, dirty) {
                    tracing::error!(error = %e, "programming host ports failed");
                    agent.peers.record_error(&e);
                    needs_full_sync = true;
                }
                continue;
            }
        };
        let started = Instant::now();
        let is_synced = matches!(event.event, Some(Event::Synced(_)));
        let result = {
            let mut mirror = agent.cluster.write().unwrap_or_else(|p| p.into_inner());
            // Where each slice pointed before, to clean up a move.
            let before: HashMap<ObjKey, Option<SvcKey>> = match &event.event {
                Some(Event::Upsert(r)) => ObjKey::of(r)
                    .filter(|k| k.kind == Kind::EndpointSlice)
                    .map(|k| {
                        let old = mirror.get(&k).as_ref().and_then(slice_service);
                        HashMap::from([(k, old)])
                    })
                    .unwrap_or_default(),
                Some(Event::Delete(k)) => {
                    let k = ObjKey::from_proto(k);
                    let old = mirror.get(&k).as_ref().and_then(slice_service);
                    HashMap::from([(k, old)])
                }
                _ => HashMap::new(),
            };
            let applied = mirror.apply(&event);
            if is_synced || applied != Applied::Nothing {
                cache_dirty.notify_one();
            }
            let outcome = match &applied {
                Applied::Changed(keys) => {
                    if is_synced {
                        Ok(())
                    } else {
                        controller.apply_changes(&agent, &mirror, keys, &before)
                    }
                }
                Applied::Nothing => Ok(()),
            };
            if is_synced {
                agent.routes_dirty.notify_one();
                agent.policy_dirty.notify_one();
            }
            // A complete state (a snapshot, or a resume that caught up) is
            // the moment to recompute everything and drop what is not
            // wanted; so is the first change after a failed write.
            outcome.and_then(|()| {
                if is_synced || std::mem::take(&mut needs_full_sync) {
                    controller.full_sync(&agent, &mirror).map(|_| ())
                } else {
                    Ok(())
                }
            })
        };
        let scope = if is_synced { "full" } else { "delta" };
        match result {
            Ok(()) => {
                agent
                    .metrics
                    .lb_sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                agent
                    .metrics
                    .lb_syncs
                    .get_or_create(&labels(scope, "ok"))
                    .inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "programming the load-balancer maps failed; will retry on the next change");
                agent.peers.record_error(&e);
                agent
                    .metrics
                    .lb_syncs
                    .get_or_create(&labels(scope, "error"))
                    .inc();
                needs_full_sync = true;
            }
        }
    }
}

fn labels(scope: &str, outcome: &str) -> Vec<(String, String)> {
    vec![
        ("scope".into(), scope.into()),
        ("outcome".into(), outcome.into()),
    ]
}

//! The service's allocation table: the allocator, its store, the event feed
//! of `Watch`, and the metrics, behind one lock.
//!
//! The lock is held across the store commit, so nobody (a gRPC reader, a
//! `Watch` subscriber) can see an allocation before it is durable. If a
//! commit fails, memory may be ahead of the disk; rather than guess, the table
//! refuses further use and the service stops, to come back from what is on
//! disk.
//!
//! With a shared store (other replicas write too) a commit can come back
//! [`Committed::Diverged`]: the table is then rebuilt from the store's
//! answer and the plan made again, a few rounds at most. What subscribers
//! are told is always the difference between the last table they heard of
//! and the current one, so they follow other replicas' changes too
//! ([`Ipam::resync`]).

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use tokio::sync::{Mutex, broadcast};
use weft_proto::ipam::v1::{
    AllocationEvent, ListResponse, NodeAllocation, PoolStatus, allocation_event::Event,
};

use crate::{
    allocator::{self, Allocator, Pending, Want},
    config::Mode,
    metrics::Metrics,
    store::{CidrStore, Committed, StoreError},
};

/// How often one reconcile plans again after losing races to other
/// replicas before it leaves the rest to the next change.
const MAX_ROUNDS: usize = 8;

/// How many events a `Watch` subscriber may fall behind before it is cut off.
const EVENT_BUFFER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an earlier store write failed; the service is stopping")]
    Failed,
}

struct Inner {
    alloc: Allocator,
    pending: BTreeMap<String, Pending>,
    failed: bool,
    /// The nodes of the last complete cluster state; `None` before one.
    nodes: Option<BTreeMap<String, Want>>,
    /// What `Watch` subscribers have been told.
    published: BTreeMap<String, Ipv4Net>,
}

pub struct Ipam<S> {
    mode: Mode,
    store: S,
    inner: Mutex<Inner>,
    events: broadcast::Sender<AllocationEvent>,
    metrics: Metrics,
}

impl<S: CidrStore> Ipam<S> {
    /// Loads the allocations on record.
    pub async fn open(
        store: S,
        mode: Mode,
        pools: Vec<Ipv4Net>,
        mask: u8,
        metrics: Metrics,
    ) -> Result<Self, StoreError> {
        let alloc = restore(pools, mask, mode, store.load().await?);
        tracing::info!(
            allocations = alloc.len(),
            mode = mode.as_str(),
            "allocations restored"
        );
        metrics.set_usage(&alloc.usage());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            mode,
            store,
            inner: Mutex::new(Inner {
                published: table(&alloc),
                alloc,
                pending: BTreeMap::new(),
                failed: false,
                nodes: None,
            }),
            events,
            metrics,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Brings the allocations in line with the nodes of a complete cluster
    /// state, durably, then tells `Watch` subscribers.
    pub async fn reconcile(&self, nodes: &BTreeMap<String, Want>) -> Result<(), IpamError> {
        let mut inner = self.usable().await?;
        inner.nodes = Some(nodes.clone());
        self.reconcile_locked(&mut inner).await
    }

    /// Reloads the table from the store (another replica changed it), tells
    /// subscribers what changed, and reconciles with the nodes again.
    pub async fn resync(&self) -> Result<(), IpamError> {
        let mut inner = self.usable().await?;
        let loaded = match self.store.load().await {
            Ok(l) => l,
            Err(e) => {
                inner.failed = true;
                return Err(e.into());
            }
        };
        inner.alloc = restore(
            inner.alloc.pools().to_vec(),
            self.mask(&inner),
            self.mode,
            loaded,
        );
        self.publish(&mut inner);
        self.reconcile_locked(&mut inner).await
    }

    fn mask(&self, inner: &Inner) -> u8 {
        inner.alloc.mask()
    }

    async fn reconcile_locked(&self, inner: &mut Inner) -> Result<(), IpamError> {
        let Some(nodes) = inner.nodes.clone() else {
            return Ok(());
        };
        for _ in 0..MAX_ROUNDS {
            let mut wants = nodes.clone();
            // A node another replica (or the API) still has keeps its block
            // until this replica's view catches up.
            let gone: Vec<(String, Ipv4Net)> = inner
                .alloc
                .allocations()
                .filter(|(n, _)| !wants.contains_key(*n))
                .map(|(n, c)| (n.to_string(), c))
                .collect();
            for (node, cidr) in gone {
                match self.store.node_exists(&node).await {
                    Ok(false) => {}
                    Ok(true) => {
                        tracing::info!(%node, %cidr, "node gone from svc-watcher's view but still in the API; keeping its CIDR");
                        let keep = match self.mode {
                            Mode::ClusterPool => Want::AnyBlock,
                            Mode::Kubernetes => Want::Exactly(Some(cidr)),
                        };
                        wants.insert(node, keep);
                    }
                    Err(e) => {
                        inner.failed = true;
                        return Err(e.into());
                    }
                }
            }
            let out = allocator::reconcile(&mut inner.alloc, &wants);
            if out.changed() {
                match self.store.commit(&out.ops).await {
                    Ok(Committed::AsPlanned) => {}
                    Ok(Committed::Diverged(table)) => {
                        tracing::info!(
                            "another writer came first; planning again from the store's table"
                        );
                        inner.alloc = restore(
                            inner.alloc.pools().to_vec(),
                            self.mask(inner),
                            self.mode,
                            table,
                        );
                        self.publish(inner);
                        continue;
                    }
                    Err(e) => {
                        inner.failed = true;
                        return Err(e.into());
                    }
                }
            }
            self.publish(inner);
            self.report_pending(inner, out.pending);
            return Ok(());
        }
        tracing::warn!(
            rounds = MAX_ROUNDS,
            "still losing races to other writers; trying again on the next change"
        );
        Ok(())
    }

    /// Tells subscribers (and metrics, logs) how the table differs from what
    /// they heard last: releases first, then allocations, in node order.
    fn publish(&self, inner: &mut Inner) {
        let now = table(&inner.alloc);
        for (node, cidr) in &inner.published {
            if !now.contains_key(node) {
                tracing::info!(%node, %cidr, "node gone; pod CIDR released");
                self.metrics.releases.inc();
                let _ = self.events.send(AllocationEvent {
                    event: Some(Event::Released(node.clone())),
                });
            }
        }
        for (node, cidr) in &now {
            if inner.published.get(node) != Some(cidr) {
                tracing::info!(%node, %cidr, "pod CIDR allocated");
                self.metrics.allocations.inc();
                let _ = self.events.send(AllocationEvent {
                    event: Some(Event::Allocated(NodeAllocation {
                        node: node.clone(),
                        cidr: cidr.to_string(),
                    })),
                });
            }
        }
        inner.published = now;
        self.metrics.set_usage(&inner.alloc.usage());
    }

    fn report_pending(&self, inner: &mut Inner, pending: BTreeMap<String, Pending>) {
        for (node, why) in &pending {
            if inner.pending.get(node) == Some(why) {
                continue;
            }
            match why {
                Pending::Exhausted => {
                    self.metrics.pool_exhausted.inc();
                    let pools: Vec<String> =
                        inner.alloc.pools().iter().map(|p| p.to_string()).collect();
                    tracing::error!(%node, ?pools, "pod CIDR pool exhausted; the node stays pending until a block frees up");
                }
                Pending::NoPodCidr => {
                    tracing::info!(%node, "node has no IPv4 spec.podCIDRs yet; pending");
                }
                Pending::Conflict(overlap) => {
                    tracing::error!(%node, error = %overlap, "node's spec.podCIDRs overlaps another node's; pending");
                }
            }
        }
        inner.pending = pending;
    }

    /// The node's CIDR, if it has one.
    pub async fn get(&self, node: &str) -> Result<Option<Ipv4Net>, IpamError> {
        let inner = self.usable().await?;
        Ok(inner.alloc.get(node))
    }

    /// Every allocation and the pools' occupancy.
    pub async fn list(&self) -> Result<ListResponse, IpamError> {
        let inner = self.usable().await?;
        Ok(ListResponse {
            allocations: allocations(&inner.alloc),
            pools: inner
                .alloc
                .usage()
                .into_iter()
                .map(|u| PoolStatus {
                    cidr: u.pool.to_string(),
                    mask_size: u32::from(u.mask),
                    total: u.total,
                    used: u.used,
                })
                .collect(),
            mode: self.mode.as_str().to_string(),
        })
    }

    /// Every current allocation, and a feed of the changes after it: both
    /// taken under the lock, so nothing falls between them.
    pub async fn watch(
        &self,
    ) -> Result<(Vec<NodeAllocation>, broadcast::Receiver<AllocationEvent>), IpamError> {
        let inner = self.usable().await?;
        Ok((allocations(&inner.alloc), self.events.subscribe()))
    }

    async fn usable(&self) -> Result<tokio::sync::MutexGuard<'_, Inner>, IpamError> {
        let inner = self.inner.lock().await;
        if inner.failed {
            return Err(IpamError::Failed);
        }
        Ok(inner)
    }
}

/// An allocator holding `stored`, as loaded from a store.
fn restore(pools: Vec<Ipv4Net>, mask: u8, mode: Mode, stored: Vec<(String, Ipv4Net)>) -> Allocator {
    let mut alloc = Allocator::new(pools, mask);
    for (node, cidr) in stored {
        if let Err(overlap) = alloc.assign(&node, cidr) {
            // Cannot come from this service's own writes; keep the first
            // and let the second node be given a fresh block.
            tracing::error!(%node, error = %overlap, "stored allocation overlaps another; ignoring it");
            continue;
        }
        if mode == Mode::ClusterPool && !alloc.pools().iter().any(|p| p.contains(&cidr)) {
            tracing::warn!(%node, %cidr, "stored allocation is outside every configured pool; the node keeps it");
        }
    }
    alloc
}

fn table(alloc: &Allocator) -> BTreeMap<String, Ipv4Net> {
    alloc
        .allocations()
        .map(|(n, c)| (n.to_string(), c))
        .collect()
}

fn allocations(alloc: &Allocator) -> Vec<NodeAllocation> {
    alloc
        .allocations()
        .map(|(node, cidr)| NodeAllocation {
            node: node.to_string(),
            cidr: cidr.to_string(),
        })
        .collect()
}

//! The service's allocation table: the allocator, its store, the event feed
//! of `Watch`, and the metrics.
//!
//! Two sides, so that no reader ever waits for the store:
//!
//! - the writers' side (the allocator, the nodes wanted, what is pending),
//!   behind an async mutex that serialises reconciles; it is held while a
//!   plan is committed, since each plan must start from the last one's
//!   result;
//! - the published table, behind a lock held only for memory work and never
//!   across a store call: what `GetNodeCidr`, `List` and `Watch` answer
//!   from, always the allocations as last committed, so nobody sees an
//!   allocation before it is durable.
//!
//! During an API outage reads keep being answered from memory; a reconcile
//! fails once the store's retry budget is spent and is tried again later.
//! If a commit fails, the allocator may be ahead of the store; it is marked
//! stale and reloaded from the store before the next reconcile (nothing of
//! it was published).
//!
//! With a shared store (other replicas write too) a commit can come back
//! [`Committed::Diverged`]: the table is then rebuilt from the store's
//! answer and the plan made again, a few rounds at most. What subscribers
//! are told is always the difference between the last table they heard of
//! and the current one, so they follow other replicas' changes too
//! ([`Ipam::resync`]).

use std::{
    collections::BTreeMap,
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

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
}

/// The writers' side.
struct Inner {
    alloc: Allocator,
    pending: BTreeMap<String, Pending>,
    /// A commit failed: the allocator may be ahead of the store.
    stale: bool,
    /// The nodes of the last complete cluster state; `None` before one.
    nodes: Option<BTreeMap<String, Want>>,
}

/// The readers' side: the allocations as last committed, as `Watch`
/// subscribers have been told them, and the pools' occupancy.
struct Published {
    table: BTreeMap<String, Ipv4Net>,
    pools: Vec<PoolStatus>,
}

pub struct Ipam<S> {
    mode: Mode,
    store: S,
    inner: Mutex<Inner>,
    published: RwLock<Published>,
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
            published: RwLock::new(Published {
                table: table(&alloc),
                pools: pool_status(&alloc),
            }),
            inner: Mutex::new(Inner {
                alloc,
                pending: BTreeMap::new(),
                stale: false,
                nodes: None,
            }),
            events,
            metrics,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Published> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // whole table.
        self.published.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Published> {
        self.published.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Brings the allocations in line with the nodes of a complete cluster
    /// state, durably, then tells `Watch` subscribers.
    pub async fn reconcile(&self, nodes: &BTreeMap<String, Want>) -> Result<(), IpamError> {
        let mut inner = self.inner.lock().await;
        inner.nodes = Some(nodes.clone());
        if inner.stale {
            self.reload(&mut inner).await?;
        }
        self.reconcile_locked(&mut inner).await
    }

    /// Reloads the table from the store (another replica changed it), tells
    /// subscribers what changed, and reconciles with the nodes again.
    pub async fn resync(&self) -> Result<(), IpamError> {
        let mut inner = self.inner.lock().await;
        self.reload(&mut inner).await?;
        self.reconcile_locked(&mut inner).await
    }

    /// Makes the allocator what the store holds and publishes it.
    async fn reload(&self, inner: &mut Inner) -> Result<(), IpamError> {
        let loaded = self.store.load().await?;
        inner.alloc = restore(
            inner.alloc.pools().to_vec(),
            self.mask(inner),
            self.mode,
            loaded,
        );
        inner.stale = false;
        self.publish(inner);
        Ok(())
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
                if self.store.node_exists(&node).await? {
                    tracing::info!(%node, %cidr, "node gone from svc-watcher's view but still in the API; keeping its CIDR");
                    let keep = match self.mode {
                        Mode::ClusterPool => Want::AnyBlock,
                        Mode::Kubernetes => Want::Exactly(Some(cidr)),
                    };
                    wants.insert(node, keep);
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
                        inner.stale = true;
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

    /// Makes the allocator's (committed) table the published one, and tells
    /// subscribers (and metrics, logs) how it differs from what they heard
    /// last: releases first, then allocations, in node order.
    fn publish(&self, inner: &Inner) {
        let now = table(&inner.alloc);
        let mut published = self.write();
        for (node, cidr) in &published.table {
            if !now.contains_key(node) {
                tracing::info!(%node, %cidr, "node gone; pod CIDR released");
                self.metrics.releases.inc();
                let _ = self.events.send(AllocationEvent {
                    event: Some(Event::Released(node.clone())),
                });
            }
        }
        for (node, cidr) in &now {
            if published.table.get(node) != Some(cidr) {
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
        published.table = now;
        published.pools = pool_status(&inner.alloc);
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

    /// The node's CIDR, if it has one; never waits for the store.
    pub fn get(&self, node: &str) -> Option<Ipv4Net> {
        self.read().table.get(node).copied()
    }

    /// Every allocation and the pools' occupancy; never waits for the store.
    pub fn list(&self) -> ListResponse {
        let published = self.read();
        ListResponse {
            allocations: allocations(&published.table),
            pools: published.pools.clone(),
            mode: self.mode.as_str().to_string(),
        }
    }

    /// Every current allocation, and a feed of the changes after it: both
    /// taken under the published lock, so nothing falls between them.
    pub fn watch(&self) -> (Vec<NodeAllocation>, broadcast::Receiver<AllocationEvent>) {
        let published = self.read();
        (allocations(&published.table), self.events.subscribe())
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

fn allocations(table: &BTreeMap<String, Ipv4Net>) -> Vec<NodeAllocation> {
    table
        .iter()
        .map(|(node, cidr)| NodeAllocation {
            node: node.clone(),
            cidr: cidr.to_string(),
        })
        .collect()
}

fn pool_status(alloc: &Allocator) -> Vec<PoolStatus> {
    alloc
        .usage()
        .into_iter()
        .map(|u| PoolStatus {
            cidr: u.pool.to_string(),
            mask_size: u32::from(u.mask),
            total: u.total,
            used: u.used,
        })
        .collect()
}

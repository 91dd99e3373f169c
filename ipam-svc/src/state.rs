//! The service's allocation table: the allocator, its store, the event feed
//! of `Watch`, and the metrics, behind one lock.
//!
//! The lock is held across the store commit, so nobody (a gRPC reader, a
//! `Watch` subscriber) can see an allocation before it is durable. If a
//! commit fails, memory may be ahead of the disk; rather than guess, the table
//! refuses further use and the service stops, to come back from what is on
//! disk.

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
    store::{CidrStore, StoreError},
};

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
        let mut alloc = Allocator::new(pools, mask);
        for (node, cidr) in store.load().await? {
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
                alloc,
                pending: BTreeMap::new(),
                failed: false,
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
        let mut inner = self.inner.lock().await;
        if inner.failed {
            return Err(IpamError::Failed);
        }
        let out = allocator::reconcile(&mut inner.alloc, nodes);
        if out.changed()
            && let Err(e) = self.store.commit(&out.ops).await
        {
            inner.failed = true;
            return Err(e.into());
        }
        for (node, cidr) in &out.released {
            tracing::info!(%node, %cidr, "node gone; pod CIDR released");
            self.metrics.releases.inc();
            let _ = self.events.send(AllocationEvent {
                event: Some(Event::Released(node.clone())),
            });
        }
        for (node, cidr) in &out.allocated {
            tracing::info!(%node, %cidr, "pod CIDR allocated");
            self.metrics.allocations.inc();
            let _ = self.events.send(AllocationEvent {
                event: Some(Event::Allocated(NodeAllocation {
                    node: node.clone(),
                    cidr: cidr.to_string(),
                })),
            });
        }
        for (node, why) in &out.pending {
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
        inner.pending = out.pending;
        self.metrics.set_usage(&inner.alloc.usage());
        Ok(())
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

fn allocations(alloc: &Allocator) -> Vec<NodeAllocation> {
    alloc
        .allocations()
        .map(|(node, cidr)| NodeAllocation {
            node: node.to_string(),
            cidr: cidr.to_string(),
        })
        .collect()
}

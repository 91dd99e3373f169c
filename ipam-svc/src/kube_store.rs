//! The Kubernetes backend of [`CidrStore`]: one `NodeCIDR` custom resource
//! per allocation, the authoritative store in a cluster.
//!
//! # How replicas stay safe without a leader
//!
//! - **A block is never given twice.** The object is named after the block
//!   (`10-244-1-0-24`); creating it is the claim, and the API server lets
//!   only one create of a name succeed. A replica whose create fails with
//!   `AlreadyExists` learns the block is taken and plans again.
//! - **A node never ends up with two blocks that were both reported.**
//!   Two replicas with different views can claim different blocks for the
//!   same node. After every claim the replica re-reads the node's objects
//!   (a consistent list by the `weft.io/node` label) and reports its claim
//!   only if it is the node's oldest, by resourceVersion. resourceVersions
//!   are etcd revisions, so the oldest claim stays the oldest: every replica
//!   settles on the same one, and the younger one is deleted before anyone
//!   was told of it.
//! - **Removals are guarded.** Deletes carry the resourceVersion they saw
//!   (a precondition): a block re-claimed meanwhile is not freed by
//!   mistake. And a replica asks the API whether a node is really gone
//!   before freeing its block, since its own view of the nodes may lag.
//!
//! A Lease-elected leader would serialise the writers, but a leader that
//! stalls past its lease keeps writing until it notices; the claims above
//! are safe whatever the timing, so no lease is used.
//!
//! Every replica watches the NodeCIDRs; a change it did not make itself
//! ticks [`CidrStore::changes`], and the service reloads the table (a
//! consistent list), so allocations made by one replica appear in the
//! other's table and `Watch` stream.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_common::backoff::Backoff;
use weft_k8s::{
    api::{self as k8s, label_value, revision},
    crd::{MANAGED_BY_LABEL, NODE_LABEL, NodeCIDR, NodeCIDRSpec, node_cidr_name},
};

use crate::store::{CidrOp, CidrStore, Committed, StoreError};

/// How long transient API trouble (unreachable, 5xx, 429) is retried before
/// a store call fails, which stops the service.
const RETRY_BUDGET: Duration = Duration::from_secs(60);

/// An object as last seen: its revision and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    rv: u64,
    node: String,
    cidr: String,
}

/// What this store asks of the API: its own custom resources (claimed by
/// create, freed by a guarded delete, followed by a watch) and single
/// Nodes, to check one is really gone before freeing its block. The
/// chart's ClusterRole for ipam-svc grants exactly this.
pub const API_ACCESS: &[weft_k8s::access::Access] = &[
    weft_k8s::access::Access {
        group: "weft.io",
        resource: "nodecidrs",
        verbs: &["list", "watch", "create", "delete"],
    },
    weft_k8s::access::Access {
        group: "",
        resource: "nodes",
        verbs: &["get"],
    },
];

pub struct KubeCidrStore {
    api: Api<NodeCIDR>,
    nodes: Api<Node>,
    /// name → the object as this replica last read or wrote it.
    seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    changes: watch::Receiver<u64>,
}

fn api_error(e: &kube::Error) -> StoreError {
    StoreError::Api(e.to_string())
}

/// Whether an error is worth retrying: transport trouble and the server's
/// "try again" answers. Everything else is a real answer.
fn transient(e: &kube::Error) -> bool {
    match k8s::status_code(e) {
        None => true,
        Some(code) => code == 429 || code >= 500,
    }
}

/// Runs `call` until it gives a real answer, backing off over transient
/// errors for up to [`RETRY_BUDGET`].
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match call().await {
            Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what}: Kubernetes API trouble; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

impl KubeCidrStore {
    /// Starts following the NodeCIDRs (for [`CidrStore::changes`]) until
    /// `shutdown`.
    pub fn start(client: Client, shutdown: CancellationToken) -> Self {
        let api: Api<NodeCIDR> = Api::all(client.clone());
        let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
        let (tx, changes) = watch::channel(0u64);
        tokio::spawn(follow(api.clone(), seen.clone(), tx, shutdown));
        Self {
            api,
            nodes: Api::all(client),
            seen,
            changes,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parse(object: &NodeCIDR) -> Result<(String, Seen), StoreError> {
        let rv = revision(&object.metadata).map_err(|e| StoreError::Api(e.to_string()))?;
        Ok((
            object.name_any(),
            Seen {
                rv,
                node: object.spec.node.clone(),
                cidr: object.spec.cidr.clone(),
            },
        ))
    }

    /// Deletes `name` if it is still at revision `rv`; false when it changed
    /// meanwhile (it is someone else's now).
    async fn delete_at(&self, name: &str, rv: u64) -> Result<bool, StoreError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(rv.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let result = retrying("deleting a NodeCIDR", || self.api.delete(name, &params)).await;
        match result {
            Ok(_) => {
                self.seen().remove(name);
                Ok(true)
            }
            Err(e) if k8s::is_not_found(&e) => {
                self.seen().remove(name);
                Ok(true)
            }
            Err(e) if k8s::is_conflict(&e) => Ok(false),
            Err(e) => Err(api_error(&e)),
        }
    }

    /// Lists NodeCIDRs (consistently: no resourceVersion, so the server
    /// reads its latest state), optionally by label.
    async fn list(&self, labels: Option<&str>) -> Result<Vec<(String, Seen)>, StoreError> {
        let mut params = ListParams::default();
        if let Some(l) = labels {
            params = params.labels(l);
        }
        let list = retrying("listing NodeCIDRs", || self.api.list(&params))
            .await
            .map_err(|e| api_error(&e))?;
        list.items.iter().map(Self::parse).collect()
    }

    /// The node's oldest claim, among `objects`.
    fn oldest_for<'a>(objects: &'a [(String, Seen)], node: &str) -> Option<&'a (String, Seen)> {
        objects
            .iter()
            .filter(|(_, s)| s.node == node)
            .min_by_key(|(_, s)| s.rv)
    }

    /// Claims `cidr` for `node`; true when the claim is this node's oldest
    /// (reportable), false when the block was taken or another claim of
    /// the node came first (this one is withdrawn).
    async fn claim(&self, node: &str, cidr: Ipv4Net) -> Result<bool, StoreError> {
        let name = node_cidr_name(&cidr.to_string());
        let object = NodeCIDR {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (NODE_LABEL.to_string(), label_value(node)),
                    (MANAGED_BY_LABEL.to_string(), "ipam-svc".to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: NodeCIDRSpec {
                node: node.to_string(),
                cidr: cidr.to_string(),
            },
        };
        let post = PostParams::default();
        let created = retrying("creating a NodeCIDR", || self.api.create(&post, &object)).await;
        let mine = match created {
            Ok(o) => {
                let (name, seen) = Self::parse(&o)?;
                self.seen().insert(name.clone(), seen.clone());
                seen.rv
            }
            Err(e) if k8s::is_already_exists(&e) => {
                // Taken; unless by this very node (our own create retried
                // after a lost answer, or another replica for the node).
                tracing::debug!(%node, %cidr, "block already claimed");
                return Ok(false);
            }
            Err(e) => return Err(api_error(&e)),
        };
        let objects = self
            .list(Some(&format!("{NODE_LABEL}={}", label_value(node))))
            .await?;
        match Self::oldest_for(&objects, node) {
            Some((oldest, _)) if *oldest == name => Ok(true),
            other => {
                tracing::info!(%node, %cidr, kept = ?other.map(|(n, _)| n), "another replica claimed a block for the node first; withdrawing this claim");
                self.delete_at(&name, mine).await?;
                Ok(false)
            }
        }
    }
}

impl CidrStore for KubeCidrStore {
    /// Every node's oldest claim; younger claims (left by a race between
    /// replicas, never reported) are deleted on the way.
    async fn load(&self) -> Result<Vec<(String, Ipv4Net)>, StoreError> {
        let objects = self.list(None).await?;
        *self.seen() = objects.iter().cloned().collect();
        let mut oldest: BTreeMap<&str, &(String, Seen)> = BTreeMap::new();
        for entry in &objects {
            let slot = oldest.entry(entry.1.node.as_str()).or_insert(entry);
            if entry.1.rv < slot.1.rv {
                *slot = entry;
            }
        }
        let mut table = Vec::new();
        for (name, seen) in &objects {
            if oldest.get(seen.node.as_str()).map(|(n, _)| n) != Some(name) {
                tracing::info!(node = %seen.node, cidr = %seen.cidr, "removing a younger duplicate claim");
                self.delete_at(name, seen.rv).await?;
                continue;
            }
            match seen.cidr.parse::<Ipv4Net>() {
                Ok(cidr) => table.push((seen.node.clone(), cidr)),
                Err(_) => {
                    return Err(StoreError::BadRecord {
                        node: seen.node.clone(),
                        cidr: seen.cidr.clone(),
                    });
                }
            }
        }
        Ok(table)
    }

    async fn commit(&self, ops: &[CidrOp]) -> Result<Committed, StoreError> {
        let mut as_planned = true;
        for op in ops {
            let node = match op {
                CidrOp::Put { node, .. } | CidrOp::Remove { node } => node,
            };
            // What the node held before (for a Put: the block it replaces).
            let held: Vec<(String, u64)> = self
                .seen()
                .iter()
                .filter(|(_, s)| &s.node == node)
                .map(|(n, s)| (n.clone(), s.rv))
                .collect();
            if let CidrOp::Put { cidr, .. } = op
                && !self.claim(node, *cidr).await?
            {
                as_planned = false;
                continue;
            }
            let keep = match op {
                CidrOp::Put { cidr, .. } => Some(node_cidr_name(&cidr.to_string())),
                CidrOp::Remove { .. } => None,
            };
            for (name, rv) in held {
                if Some(&name) != keep.as_ref() && !self.delete_at(&name, rv).await? {
                    as_planned = false;
                }
            }
        }
        if as_planned {
            Ok(Committed::AsPlanned)
        } else {
            Ok(Committed::Diverged(self.load().await?))
        }
    }

    async fn node_exists(&self, node: &str) -> Result<bool, StoreError> {
        match retrying("reading a Node", || self.nodes.get_opt(node)).await {
            Ok(found) => Ok(found.is_some()),
            Err(e) if k8s::status_code(&e) == Some(403) => {
                tracing::warn!(%node, "not allowed to read Nodes; trusting svc-watcher that the node is gone");
                Ok(false)
            }
            Err(e) => Err(api_error(&e)),
        }
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}

/// Watches the NodeCIDRs and ticks `tx` for every change this replica has
/// not seen (made by another writer), and after every relist.
async fn follow(
    api: Api<NodeCIDR>,
    seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    tx: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let known = |o: &NodeCIDR, deleted: bool| {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let at = revision(&o.metadata).ok();
        match seen.get(&o.name_any()) {
            Some(s) => !deleted && Some(s.rv) == at,
            None => deleted,
        }
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        let changed = match event {
            None => return,
            Some(Ok(watcher::Event::Apply(o))) => !known(&o, false),
            Some(Ok(watcher::Event::Delete(o))) => !known(&o, true),
            Some(Ok(watcher::Event::InitDone)) => true,
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching NodeCIDRs; backing off");
                false
            }
        };
        if changed {
            tx.send_modify(|n| *n += 1);
        }
    }
}

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

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_common::readiness::Readiness;
use weft_k8s::{
    api::{self as k8s, label_value, revision},
    config::ApiConfig,
    crd::{MANAGED_BY_LABEL, NODE_LABEL, NodeCIDR, NodeCIDRSpec, node_cidr_name},
    retry::ApiHealth,
};

use crate::store::{CidrOp, CidrStore, Committed, StoreError};

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
    health: ApiHealth,
    config: ApiConfig,
}

fn api_error(e: &kube::Error) -> StoreError {
    StoreError::Api(e.to_string())
}

impl KubeCidrStore {
    /// Starts following the NodeCIDRs (for [`CidrStore::changes`]) until
    /// `shutdown`. `health` is what the client's
    /// observer feeds ([`ApiHealth::observer`]); the store's calls feed it too.
    pub fn start(
        client: Client,
        health: ApiHealth,
        config: ApiConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let api: Api<NodeCIDR> = Api::all(client.clone());
        let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
        let (tx, changes) = watch::channel(0u64);
        let known = weft_k8s::follow::known_at_revision(
            seen.clone(),
            |o: &NodeCIDR| Some(o.name_any()),
            |s: &Seen| s.rv,
        );
        tokio::spawn(weft_k8s::follow::changes(
            api.clone(),
            health.clone(),
            known,
            tx,
            shutdown,
        ));
        Self {
            api,
            nodes: Api::all(client),
            seen,
            changes,
            health,
            config,
        }
    }

    /// Runs one API call under the retry policy.
    async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        weft_k8s::retry::retrying(&self.health, self.config.retry, what, call).await
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
        let result = self
            .retrying("deleting a NodeCIDR", || self.api.delete(name, &params))
            .await;
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
        let list = self
            .retrying("listing NodeCIDRs", || self.api.list(&params))
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
        let created = self
            .retrying("creating a NodeCIDR", || self.api.create(&post, &object))
            .await;
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
        match self
            .retrying("reading a Node", || self.nodes.get_opt(node))
            .await
        {
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

    fn readiness(
        &self,
        unready_after: Duration,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Readiness> {
        let (tx, rx) = watch::channel(Readiness::Ready);
        tokio::spawn(self.health.clone().report(unready_after, tx, shutdown));
        rx
    }
}

//! Where allocations live between runs.
//!
//! The allocator only speaks [`CidrStore`], with two backends: a sled
//! database under the state directory (the lab, a single replica), and
//! NodeCIDR custom resources in the Kubernetes API
//! ([`crate::kube_store::KubeCidrStore`], the cluster, any number of
//! replicas). A backend's `commit` returns only once the writes are
//! durable, and the service acknowledges nothing before that.
//!
//! A private store (sled) is the truth by construction: what the service
//! planned is what happened. A shared store may find that another writer
//! got there first; its `commit` then says so with the table as it really
//! stands ([`Committed::Diverged`]), and the service plans again from that.

use std::{future::Future, path::Path};

use ipnet::Ipv4Net;
use weft_common::store::{MsgTree, Store, StoreError as SledError};
use weft_proto::ipam::v1::NodeAllocation;

/// One write to the allocation table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrOp {
    Put { node: String, cidr: Ipv4Net },
    Remove { node: String },
}

/// How a commit went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Every op took effect as given.
    AsPlanned,
    /// Another writer sharing the store came first somewhere; this is every
    /// allocation as it now stands, and nothing of the plan is to be
    /// reported unless it is in here.
    Diverged(Vec<(String, Ipv4Net)>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sled(#[from] SledError),
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("stored allocation of node {node:?} has an invalid CIDR {cidr:?}")]
    BadRecord { node: String, cidr: String },
}

/// Durable storage of node → CIDR allocations.
pub trait CidrStore: Send + Sync + 'static {
    /// Every allocation on record.
    fn load(&self) -> impl Future<Output = Result<Vec<(String, Ipv4Net)>, StoreError>> + Send;

    /// Applies `ops` in order and returns once they are durable.
    fn commit(&self, ops: &[CidrOp]) -> impl Future<Output = Result<Committed, StoreError>> + Send;

    /// Whether the cluster still has `node`, asked before its CIDR is
    /// released. A replica's view of the nodes can lag another's; a shared
    /// store checks with the API so that a lagging replica does not take a
    /// block from a node that has only just appeared. A private store has
    /// no one to disagree with.
    fn node_exists(&self, _node: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async { Ok(false) }
    }

    /// Ticks whenever another writer may have changed the store; `None`
    /// for a private store.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether the store can be written now: NotReady once it has failed
    /// to reach its backend for `unready_after`, until `shutdown`. A local
    /// store is always ready.
    fn readiness(
        &self,
        unready_after: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::sync::watch::Receiver<weft_common::readiness::Readiness> {
        let _ = (unready_after, shutdown);
        weft_common::readiness::always_ready()
    }
}

/// The sled backend: one tree, node name → `NodeAllocation`.
#[derive(Clone)]
pub struct SledCidrStore {
    store: Store,
    nodes: MsgTree<NodeAllocation>,
}

impl SledCidrStore {
    pub const TREE: &'static str = "node_cidrs";

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::from_store(Store::open(dir)?)
    }

    pub fn from_store(store: Store) -> Result<Self, StoreError> {
        let nodes = store.tree(Self::TREE)?;
        Ok(Self { store, nodes })
    }
}

impl CidrStore for SledCidrStore {
    async fn load(&self) -> Result<Vec<(String, Ipv4Net)>, StoreError> {
        self.nodes
            .entries()?
            .into_iter()
            .map(|(_, a)| match a.cidr.parse::<Ipv4Net>() {
                Ok(cidr) => Ok((a.node, cidr)),
                Err(_) => Err(StoreError::BadRecord {
                    node: a.node,
                    cidr: a.cidr,
                }),
            })
            .collect()
    }

    async fn commit(&self, ops: &[CidrOp]) -> Result<Committed, StoreError> {
        for op in ops {
            match op {
                CidrOp::Put { node, cidr } => self.nodes.insert(
                    node,
                    &NodeAllocation {
                        node: node.clone(),
                        cidr: cidr.to_string(),
                    },
                )?,
                CidrOp::Remove { node } => {
                    self.nodes.remove(node)?;
                }
            }
        }
        self.store.flush().await?;
        Ok(Committed::AsPlanned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test CIDR")
    }

    #[tokio::test]
    async fn allocations_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledCidrStore::open(dir.path()).expect("open");
            s.commit(&[
                CidrOp::Put {
                    node: "a".into(),
                    cidr: net("10.244.0.0/24"),
                },
                CidrOp::Put {
                    node: "b".into(),
                    cidr: net("10.244.1.0/24"),
                },
                CidrOp::Put {
                    node: "c".into(),
                    cidr: net("10.244.2.0/24"),
                },
                CidrOp::Remove { node: "b".into() },
            ])
            .await
            .expect("commit");
        }
        let s = SledCidrStore::open(dir.path()).expect("reopen");
        let mut got = s.load().await.expect("load");
        got.sort();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), net("10.244.0.0/24")),
                ("c".to_string(), net("10.244.2.0/24"))
            ]
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_is_an_error_naming_the_node() {
        let store = Store::temporary().expect("store");
        let tree = store
            .tree::<NodeAllocation>(SledCidrStore::TREE)
            .expect("tree");
        tree.insert(
            "x",
            &NodeAllocation {
                node: "x".into(),
                cidr: "garbage".into(),
            },
        )
        .expect("insert");
        let s = SledCidrStore::from_store(store).expect("open");
        let err = s.load().await.expect_err("bad record");
        assert!(err.to_string().contains("\"x\""), "{err}");
    }
}

//! Where identities and owners live between runs.
//!
//! The table only speaks [`IdentityStore`], with two backends: a sled
//! database under the state directory (the lab, one replica), and
//! SecurityIdentity custom resources in the Kubernetes API
//! ([`crate::kube_store::KubeIdentityStore`], a cluster, any number of
//! replicas). A backend's `commit` returns only once the batch is durable;
//! the service acknowledges nothing before that.
//!
//! A private store (sled) applies a batch atomically and is the truth by
//! construction. A shared store may find that another writer got there
//! first (a number taken, a label set claimed under another number, an
//! identity changed or collected meanwhile); its `commit` then answers
//! [`Committed::Diverged`] with the whole table as it stands, and the
//! service plans again from that.

use std::{collections::BTreeMap, future::Future, path::Path};

use prost::Message as _;
use weft_common::store::{Store, StoreError as SledError};
use weft_proto::identity::v1::SecurityIdentity;

/// One write to the identity table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutIdentity {
        id: u32,
        labels: BTreeMap<String, String>,
    },
    DeleteIdentity(u32),
    PutOwner {
        owner: String,
        id: u32,
    },
    DeleteOwner(String),
}

/// What the store holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    pub identities: Vec<(u32, BTreeMap<String, String>)>,
    pub owners: Vec<(String, u32)>,
}

/// How a commit went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Every op took effect as given.
    AsPlanned,
    /// Another writer came first somewhere; this is everything the store
    /// now holds, and nothing of the plan may be reported unless it is in
    /// here.
    Diverged(Stored),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sled(#[from] SledError),
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("identity store: corrupt record under {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Sled(SledError::Sled(e))
    }
}

/// Durable storage of identities and the owners holding them.
pub trait IdentityStore: Send + Sync + 'static {
    fn load(&self) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// Applies `ops` and returns once they are durable.
    fn commit(&self, ops: &[Op]) -> impl Future<Output = Result<Committed, StoreError>> + Send;

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

/// The sled backend: one tree, so a batch is atomic. Keys are
/// `id/<u32 big-endian>` → `SecurityIdentity` (id and labels) and
/// `owner/<owner>` → the identity as a big-endian u32.
#[derive(Clone)]
pub struct SledIdentityStore {
    store: Store,
    tree: sled::Tree,
}

const ID_PREFIX: &[u8] = b"id/";
const OWNER_PREFIX: &[u8] = b"owner/";

fn id_key(id: u32) -> Vec<u8> {
    [ID_PREFIX, &id.to_be_bytes()].concat()
}

fn owner_key(owner: &str) -> Vec<u8> {
    [OWNER_PREFIX, owner.as_bytes()].concat()
}

impl SledIdentityStore {
    pub const TREE: &'static str = "identities";

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::from_store(Store::open(dir)?)
    }

    pub fn from_store(store: Store) -> Result<Self, StoreError> {
        let tree = store.raw_tree(Self::TREE)?;
        Ok(Self { store, tree })
    }
}

fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

impl IdentityStore for SledIdentityStore {
    async fn load(&self) -> Result<Stored, StoreError> {
        let mut out = Stored::default();
        for item in self.tree.scan_prefix(ID_PREFIX) {
            let (key, value) = item?;
            let identity = SecurityIdentity::decode(&*value).map_err(|e| corrupt(&key, e))?;
            let id_bytes: [u8; 4] = key[ID_PREFIX.len()..]
                .try_into()
                .map_err(|_| corrupt(&key, "key is not id/<u32>"))?;
            let id = u32::from_be_bytes(id_bytes);
            if identity.id != id {
                return Err(corrupt(&key, format!("holds identity {}", identity.id)));
            }
            out.identities
                .push((id, identity.labels.into_iter().collect()));
        }
        for item in self.tree.scan_prefix(OWNER_PREFIX) {
            let (key, value) = item?;
            let owner = std::str::from_utf8(&key[OWNER_PREFIX.len()..])
                .map_err(|e| corrupt(&key, e))?
                .to_string();
            let id: [u8; 4] = (*value)
                .try_into()
                .map_err(|_| corrupt(&key, "value is not a u32"))?;
            out.owners.push((owner, u32::from_be_bytes(id)));
        }
        Ok(out)
    }

    async fn commit(&self, ops: &[Op]) -> Result<Committed, StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::PutIdentity { id, labels } => {
                    let value = SecurityIdentity {
                        id: *id,
                        labels: labels.clone().into_iter().collect(),
                        reserved: false,
                        references: 0,
                    };
                    batch.insert(id_key(*id), value.encode_to_vec());
                }
                Op::DeleteIdentity(id) => batch.remove(id_key(*id)),
                Op::PutOwner { owner, id } => {
                    batch.insert(owner_key(owner), id.to_be_bytes().to_vec());
                }
                Op::DeleteOwner(owner) => batch.remove(owner_key(owner)),
            }
        }
        self.tree.apply_batch(batch)?;
        self.store.flush().await?;
        Ok(Committed::AsPlanned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("k8s:app".to_string(), app.to_string())].into()
    }

    #[tokio::test]
    async fn identities_and_owners_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledIdentityStore::open(dir.path()).expect("open");
            s.commit(&[
                Op::PutIdentity {
                    id: 256,
                    labels: labels("a"),
                },
                Op::PutIdentity {
                    id: 257,
                    labels: labels("b"),
                },
                Op::PutOwner {
                    owner: "pod:default/x".into(),
                    id: 257,
                },
                Op::PutOwner {
                    owner: "gone".into(),
                    id: 256,
                },
            ])
            .await
            .expect("commit");
            s.commit(&[Op::DeleteOwner("gone".into()), Op::DeleteIdentity(256)])
                .await
                .expect("commit");
        }
        let s = SledIdentityStore::open(dir.path()).expect("reopen");
        assert_eq!(
            s.load().await.expect("load"),
            Stored {
                identities: vec![(257, labels("b"))],
                owners: vec![("pod:default/x".into(), 257)],
            }
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_is_an_error_naming_the_key() {
        let store = Store::temporary().expect("store");
        let tree = store.raw_tree(SledIdentityStore::TREE).expect("tree");
        tree.insert(owner_key("o"), &b"xy"[..]).expect("insert");
        let s = SledIdentityStore::from_store(store).expect("open");
        let err = s.load().await.expect_err("corrupt");
        assert!(err.to_string().contains("owner/o"), "{err}");
    }
}

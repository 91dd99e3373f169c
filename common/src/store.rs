//! The sled store each service keeps under its state directory.
//!
//! Values are protobuf messages, so the on-disk format is the same schema the
//! services already speak, and evolves the same compatible way.

use std::{
    marker::PhantomData,
    path::Path,
    time::{Duration, Instant},
};

use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt value under {key:?} in {tree}: {source}")]
    Decode {
        tree: String,
        key: String,
        source: prost::DecodeError,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Waits until every write so far (to any tree of the database) is on disk.
///
/// Not sled's `flush_async`: that waits on a thread of sled's own I/O pool,
/// the pool that must also write the very buffers it waits for, and under a
/// burst of concurrent flushes (twenty CNI ADDs at once) every pool thread
/// can end up waiting while none writes. A blocking flush on tokio's
/// blocking pool waits outside it.
pub async fn flush(tree: &sled::Tree) -> sled::Result<()> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .map_err(|e| sled::Error::Io(std::io::Error::other(format!("flush task: {e}"))))??;
    Ok(())
}

/// A service's database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

/// sled's page cache. Its default (1 GiB) lets a service's memory grow
/// with every write it ever made; what the services keep here (allocations,
/// identities, the datapath's cache of cluster state) is read back whole
/// only at start, so a small cache costs nothing on the hot paths.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// How long opening waits for the database's file lock to be let go.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Whether sled could not take the database's file lock.
fn is_lock_busy(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// sled lets go of its file lock from a background thread some moments
    /// after the last handle is dropped, so a database closed and opened
    /// again in one process can find it still taken: opening waits up to
    /// [`LOCK_WAIT`] for it. Another process holding it is still an error,
    /// only that much later.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES);
        let started = Instant::now();
        let db = loop {
            match config.open() {
                Err(e) if is_lock_busy(&e) && started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => {
                    break result.map_err(|source| StoreError::Open {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
            }
        };
        Ok(Self { db })
    }

    /// A fresh store in a temporary directory, gone when dropped (tests).
    pub fn temporary() -> Result<Self> {
        Ok(Self {
            db: sled::Config::new().temporary(true).open()?,
        })
    }

    /// A named tree of protobuf values.
    pub fn tree<M: Message + Default>(&self, name: &str) -> Result<MsgTree<M>> {
        Ok(MsgTree {
            tree: self.db.open_tree(name)?,
            name: name.to_string(),
            _msg: PhantomData,
        })
    }

    /// A named tree of raw bytes.
    pub fn raw_tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Waits until every write so far is durable on disk. Call before
    /// acknowledging anything that must survive a crash.
    pub async fn flush(&self) -> Result<()> {
        Ok(flush(&self.db).await?)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// A sled tree whose values are one protobuf message type.
#[derive(Clone)]
pub struct MsgTree<M> {
    tree: sled::Tree,
    name: String,
    _msg: PhantomData<fn() -> M>,
}

impl<M: Message + Default> MsgTree<M> {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<M>> {
        let key = key.as_ref();
        self.tree
            .get(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: &M) -> Result<()> {
        self.tree.insert(key.as_ref(), value.encode_to_vec())?;
        Ok(())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<M>> {
        let key = key.as_ref();
        self.tree
            .remove(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, M)>> {
        self.tree
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let m = self.decode(&k, &v)?;
                Ok((k.to_vec(), m))
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    pub fn clear(&self) -> Result<()> {
        self.tree.clear()?;
        Ok(())
    }

    /// Flushes this tree's writes to disk.
    pub async fn flush(&self) -> Result<()> {
        Ok(flush(&self.tree).await?)
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<M> {
        M::decode(value).map_err(|source| StoreError::Decode {
            tree: self.name.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::ipam::v1::NodeAllocation;

    #[test]
    fn a_database_open_elsewhere_is_an_error_after_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = Store::open(dir.path()).expect("open");
        let started = Instant::now();
        let err = Store::open(dir.path()).err().expect("the lock is held");
        assert!(
            started.elapsed() >= LOCK_WAIT,
            "waited {:?}",
            started.elapsed()
        );
        match err {
            StoreError::Open { source, .. } => assert!(is_lock_busy(&source), "{source}"),
            other => panic!("unexpected error: {other}"),
        }
        drop(held);
        Store::open(dir.path()).expect("open once let go");
    }

    #[tokio::test]
    async fn values_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let tree = store.tree::<NodeAllocation>("nodes").expect("tree");
            let a = NodeAllocation {
                node: "n1".into(),
                cidr: "10.244.1.0/24".into(),
            };
            tree.insert("n1", &a).expect("insert");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let tree = store.tree::<NodeAllocation>("nodes").expect("tree");
        let got = tree.get("n1").expect("get").expect("present");
        assert_eq!(got.cidr, "10.244.1.0/24");
        assert_eq!(tree.entries().expect("entries").len(), 1);
    }

    #[test]
    fn corrupt_values_name_the_key() {
        let store = Store::temporary().expect("open");
        let raw = store.raw_tree("nodes").expect("raw");
        raw.insert("bad", &[0xff, 0xff, 0xff][..]).expect("insert");
        let tree = store.tree::<NodeAllocation>("nodes").expect("tree");
        let err = tree.get("bad").expect_err("corrupt value");
        assert!(err.to_string().contains("\"bad\""), "{err}");
    }
}

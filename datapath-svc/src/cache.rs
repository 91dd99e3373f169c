//! The on-disk copy of the cluster state, so that a datapath-svc starting
//! while svc-watcher is down programs from the last state it saw instead of
//! from nothing.
//!
//! One file, rewritten whole (a temporary file, fsynced, then renamed over
//! the old one) a moment after the state last changed: at 10,000 Services
//! keeping every object in the sled store as well cost 15 MiB of the
//! agent's memory, for a copy that is only ever read back whole, at start.
//! A crash can lose the last [`WRITE_DELAY`] of changes; the watcher's
//! snapshot corrects them once it answers, and the pinned maps carry
//! traffic meanwhile.
//!
//! The file is a magic line, a flag byte (whether the state was complete),
//! then each object as a little-endian `u32` length and its protobuf
//! encoding. Anything unreadable is ignored with a warning: a cache may
//! always be empty.

use std::{
    fs,
    io::{self, BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_common::{
    store::{Store, StoreError},
    watch::{Mirror, Packed},
};
use weft_proto::watcher::v1::Resource;

use crate::agent::Agent;

/// How long the state must stay unchanged before it is written; later
/// changes within it are written together.
pub const WRITE_DELAY: Duration = Duration::from_secs(2);

const MAGIC: &[u8] = b"weft cluster cache v1\n";
const FILE: &str = "cluster-cache";

/// Where earlier releases kept the cache: trees of the sled store.
const LEGACY_TREE: &str = "cluster";
const LEGACY_META: &str = "cluster_meta";
const LEGACY_SYNCED: &str = "\u{0}synced";

#[derive(Debug, Clone)]
pub struct ClusterCache {
    path: PathBuf,
}

impl ClusterCache {
    /// The cache in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
        }
    }

    /// The cached state: synced when it was complete when written. A cache
    /// an earlier release kept in `store` is read (and then dropped from
    /// the store) when there is no file yet.
    pub fn load(&self, store: &Store) -> Result<Mirror, StoreError> {
        match fs::File::open(&self.path) {
            Ok(file) => {
                drop_legacy(store)?;
                Ok(read(file).unwrap_or_else(|e| {
                    tracing::warn!(path = %self.path.display(), error = %e, "the cluster cache is unreadable; starting without it");
                    Mirror::new()
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mirror = load_legacy(store)?;
                if mirror.is_synced() {
                    self.save(mirror.packed().cloned().collect(), true)
                        .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
                }
                drop_legacy(store)?;
                Ok(mirror)
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot open the cluster cache; starting without it");
                Ok(Mirror::new())
            }
        }
    }

    /// Replaces the file with `objects`.
    pub fn save(&self, objects: Vec<Packed>, synced: bool) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out = BufWriter::new(fs::File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&[u8::from(synced)])?;
        for object in &objects {
            let bytes = object.bytes();
            let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(bytes)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

fn read(mut file: fs::File) -> io::Result<Mirror> {
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let rest = data
        .strip_prefix(MAGIC)
        .ok_or_else(|| invalid("not a cluster cache"))?;
    let (&synced, mut rest) = rest.split_first().ok_or_else(|| invalid("truncated"))?;
    let mut objects = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_at_checked(4)
            .ok_or_else(|| invalid("truncated"))?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (bytes, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| invalid("truncated"))?;
        objects.push(Resource::decode(bytes).map_err(|e| invalid(&e.to_string()))?);
        rest = tail;
    }
    Ok(if synced == 1 {
        Mirror::with_objects(objects)
    } else {
        Mirror::new()
    })
}

fn load_legacy(store: &Store) -> Result<Mirror, StoreError> {
    let db = store.db();
    if !db.tree_names().iter().any(|n| n == LEGACY_TREE.as_bytes()) {
        return Ok(Mirror::new());
    }
    let synced = store.raw_tree(LEGACY_META)?.contains_key(LEGACY_SYNCED)?;
    let objects = store.tree::<Resource>(LEGACY_TREE)?.entries()?;
    Ok(if synced {
        Mirror::with_objects(objects.into_iter().map(|(_, r)| r))
    } else {
        Mirror::new()
    })
}

fn drop_legacy(store: &Store) -> Result<(), StoreError> {
    let db = store.db();
    for name in [LEGACY_TREE, LEGACY_META] {
        if db.tree_names().iter().any(|n| n == name.as_bytes()) {
            db.drop_tree(name)?;
        }
    }
    Ok(())
}

/// Writes the cache a moment after the state changes (`dirty` is notified
/// on every change), and once more on shutdown if anything is unwritten.
pub async fn keep(
    agent: Arc<Agent>,
    cache: ClusterCache,
    dirty: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = dirty.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(WRITE_DELAY) => false,
            _ = shutdown.cancelled() => true,
        };
        let (objects, synced) = {
            let mirror = agent.cluster.read().unwrap_or_else(|p| p.into_inner());
            (
                mirror.packed().cloned().collect::<Vec<_>>(),
                mirror.is_synced(),
            )
        };
        let count = objects.len();
        let cache = cache.clone();
        match tokio::task::spawn_blocking(move || cache.save(objects, synced)).await {
            Ok(Ok(())) => tracing::debug!(objects = count, "cluster cache written"),
            Ok(Err(e)) => tracing::warn!(error = %e, "writing the cluster cache"),
            Err(e) => tracing::warn!(error = %e, "the cluster cache writer failed"),
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::watch::ObjKey;
    use weft_proto::watcher::v1::{Kind, Namespace, ObjectMeta, resource};

    fn ns(name: &str) -> Resource {
        Resource {
            kind: Some(resource::Kind::Namespace(Namespace {
                meta: Some(ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
            })),
        }
    }

    #[test]
    fn a_written_cache_reads_back_and_a_damaged_one_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::temporary().expect("store");
        let cache = ClusterCache::new(dir.path());
        assert!(
            !cache.load(&store).expect("load").is_synced(),
            "no file: nothing"
        );

        let objects: Vec<Packed> = (0..100)
            .map(|i| Packed::new(&ns(&format!("n{i}"))))
            .collect();
        cache.save(objects, true).expect("save");
        let mirror = cache.load(&store).expect("load");
        assert!(mirror.is_synced());
        assert_eq!(mirror.len(), 100);
        assert_eq!(
            mirror.get(&ObjKey::new(Kind::Namespace, "", "n42")),
            Some(ns("n42"))
        );

        // An incomplete state is not taken for the whole.
        cache
            .save(vec![Packed::new(&ns("a"))], false)
            .expect("save");
        assert!(!cache.load(&store).expect("load").is_synced());

        // Truncated: ignored, not an error.
        cache.save(vec![Packed::new(&ns("a"))], true).expect("save");
        let path = dir.path().join(FILE);
        let len = fs::metadata(&path).expect("meta").len();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len - 3))
            .expect("truncate");
        let mirror = cache.load(&store).expect("load");
        assert!(!mirror.is_synced() && mirror.is_empty());
    }

    #[test]
    fn an_earlier_release_cache_in_the_store_is_moved_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::temporary().expect("store");
        let tree = store.tree::<Resource>(LEGACY_TREE).expect("tree");
        for name in ["a", "b"] {
            tree.insert(format!("ns/{name}"), &ns(name))
                .expect("insert");
        }
        store
            .raw_tree(LEGACY_META)
            .expect("meta")
            .insert(LEGACY_SYNCED, &[])
            .expect("marker");
        let cache = ClusterCache::new(dir.path());
        let mirror = cache.load(&store).expect("load");
        assert!(mirror.is_synced());
        assert_eq!(mirror.len(), 2);
        assert!(
            !store
                .db()
                .tree_names()
                .iter()
                .any(|n| n == LEGACY_TREE.as_bytes()),
            "the old tree is gone"
        );
        assert_eq!(
            cache.load(&store).expect("again").len(),
            2,
            "now from the file"
        );
    }
}

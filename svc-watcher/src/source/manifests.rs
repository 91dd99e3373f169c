//! The local lab's stand-in for the Kubernetes API: a directory of ordinary
//! manifests, re-read whenever it changes.
//!
//! inotify (through `notify`) reports changes; a short debounce turns a
//! burst of writes into one re-read of the files inotify named, and a
//! periodic full re-read catches anything inotify missed (an overflowed
//! queue, a directory replaced wholesale). Only objects whose winning
//! version changed reach the store.
//!
//! Bad input never costs stored state: a file that does not parse keeps
//! contributing what it contributed before; an object that does not
//! validate keeps its previous version from the same file, if any; a
//! directory that cannot be read leaves everything as it was.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use weft_common::watch::{ObjKey, Packed};

use super::{
    Source, SourceError,
    documents::{self, Format},
};
use crate::{
    metrics::Metrics,
    state::{KindSet, StateStore},
};

/// How long to wait after a change notice for the burst to settle. Files
/// are read once their writer closed them, so this only gathers a burst of
/// files into one store update.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(10);
/// How often the whole directory is re-read regardless of notices.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(2);
/// Guards against symlink loops.
const MAX_DEPTH: usize = 16;

/// Whether a directory entry is skipped: hidden files and directories (this
/// also covers Kubernetes' `..data` ConfigMap layout), editor backups and
/// the temporary files atomic writers rename into place.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".tmp") || name.ends_with(".swp")
}

/// The format of a manifest file, or `None` for files that are not one.
pub fn manifest_format(name: &str) -> Option<Format> {
    if is_ignored_name(name) {
        return None;
    }
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    match ext.as_str() {
        "yaml" | "yml" => Some(Format::Yaml),
        "json" => Some(Format::Json),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct FileEntry {
    /// Hash of the contents last read, parsable or not: unchanged contents
    /// are not parsed (or complained about) again.
    digest: u64,
    /// Shared with the state store, not copied.
    objects: BTreeMap<ObjKey, Packed>,
}

/// What reading a file again found.
enum FileRead {
    /// The same contents, or none readable: what it gave before stands.
    Unchanged,
    /// No such file.
    Gone,
    New(FileEntry),
}

/// The directory as last read, file by file.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    metrics: Metrics,
}

impl ManifestDir {
    pub fn new(root: impl Into<PathBuf>, metrics: Metrics) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
            metrics,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the directory; returns whether anything changed. On an
    /// error the previous contents stay as they were.
    pub fn rescan(&mut self) -> Result<bool, SourceError> {
        let paths = list_files(&self.root).map_err(|source| SourceError::Io {
            path: self.root.clone(),
            source,
        })?;
        // Entries move from the last read to this one: an unchanged file
        // costs a read and a hash, never a copy of its objects (at 10,000
        // Services copying them all was most of a re-read's time).
        let mut last = std::mem::take(&mut self.files);
        let mut next = BTreeMap::new();
        let mut changed = false;
        for (path, format) in paths {
            let previous = last.remove(&path);
            match self.read_entry(&path, format, previous.as_ref()) {
                FileRead::Unchanged => {
                    if let Some(previous) = previous {
                        next.insert(path, previous);
                    }
                }
                // Removed between listing and reading: it is gone.
                FileRead::Gone => changed |= previous.is_some(),
                FileRead::New(entry) => {
                    changed = true;
                    next.insert(path, entry);
                }
            }
        }
        // Files that were there last time and are not now.
        changed |= !last.is_empty();
        self.files = next;
        Ok(changed)
    }

    /// Reads one file against what it held before.
    fn read_entry(&self, path: &Path, format: Format, previous: Option<&FileEntry>) -> FileRead {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return FileRead::Gone,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read manifest file; keeping what it gave before");
                return FileRead::Unchanged;
            }
        };
        let digest = digest(&bytes);
        if previous.is_some_and(|p| p.digest == digest) {
            return FileRead::Unchanged;
        }
        let objects = self.read_file(path, &bytes, format, previous);
        FileRead::New(FileEntry { digest, objects })
    }

    /// The objects of one file's new contents, falling back to what the
    /// file gave before wherever the new contents are bad.
    fn read_file(
        &self,
        path: &Path,
        bytes: &[u8],
        format: Format,
        previous: Option<&FileEntry>,
    ) -> BTreeMap<ObjKey, Packed> {
        let previous_objects = || previous.map(|p| p.objects.clone()).unwrap_or_default();
        let parsed = match documents::parse(bytes, format) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "manifest file does not parse; keeping what it gave before");
                self.metrics.invalid("File", "parse");
                return previous_objects();
            }
        };
        let mut objects = BTreeMap::new();
        for object in parsed.objects {
            let Some(key) = ObjKey::of(&object) else {
                continue;
            };
            if objects.insert(key.clone(), Packed::new(&object)).is_some() {
                tracing::warn!(file = %path.display(), object = %key, "object defined twice in one file; the later one wins");
            }
        }
        for bad in parsed.invalid {
            tracing::warn!(
                file = %path.display(),
                document = bad.document,
                kind = bad.kind,
                object = bad.key.as_ref().map(ToString::to_string).unwrap_or_default(),
                error = %bad.error,
                "invalid object skipped"
            );
            self.metrics.invalid(bad.kind, bad.error.reason.as_str());
            // Keep the version this file gave before, as the API server
            // keeps an object when an update to it is refused.
            if let Some(key) = bad.key
                && let Some(old) = previous.and_then(|p| p.objects.get(&key))
            {
                objects.entry(key).or_insert_with(|| old.clone());
            }
        }
        tracing::debug!(
            file = %path.display(),
            objects = objects.len(),
            ignored = parsed.ignored,
            "manifest file read"
        );
        objects
    }

    /// Re-reads only the files in `paths` (all manifest files, as
    /// [`Changed::classify`] sorted them); returns each object whose winning
    /// version changed, with that version (`None`: no file defines it now).
    pub fn reread(&mut self, paths: &BTreeSet<PathBuf>) -> Vec<(ObjKey, Option<Packed>)> {
        let mut updates: Vec<(PathBuf, Option<FileEntry>)> = Vec::new();
        for path in paths {
            let Some(format) = path
                .file_name()
                .and_then(|n| manifest_format(&n.to_string_lossy()))
            else {
                continue;
            };
            let previous = self.files.get(path);
            match self.read_entry(path, format, previous) {
                FileRead::Unchanged => {}
                FileRead::Gone => {
                    if previous.is_some() {
                        updates.push((path.clone(), None));
                    }
                }
                FileRead::New(entry) => updates.push((path.clone(), Some(entry))),
            }
        }
        let affected: BTreeSet<ObjKey> = updates
            .iter()
            .flat_map(|(path, new)| {
                let old = self.files.get(path).into_iter();
                old.chain(new).flat_map(|e| e.objects.keys().cloned())
            })
            .collect();
        let before: Vec<Option<Packed>> = affected.iter().map(|k| self.winner(k)).collect();
        for (path, new) in updates {
            match new {
                Some(entry) => self.files.insert(path, entry),
                None => self.files.remove(&path),
            };
        }
        affected
            .into_iter()
            .zip(before)
            .filter_map(|(key, before)| {
                let after = self.winner(&key);
                (after != before).then_some((key, after))
            })
            .collect()
    }

    /// The version of `key` that wins: the one in the last file, in path
    /// order, that defines it.
    fn winner(&self, key: &ObjKey) -> Option<Packed> {
        self.files
            .values()
            .rev()
            .find_map(|entry| entry.objects.get(key).cloned())
    }

    /// The objects of all files; where two files define the same object the
    /// one later in path order wins.
    pub fn objects(&self) -> Vec<(ObjKey, Packed)> {
        let mut merged: BTreeMap<&ObjKey, (&Path, &Packed)> = BTreeMap::new();
        for (path, entry) in &self.files {
            for (key, object) in &entry.objects {
                match merged.entry(key) {
                    Entry::Vacant(v) => {
                        v.insert((path, object));
                    }
                    Entry::Occupied(mut o) => {
                        tracing::warn!(
                            object = %key,
                            first = %o.get().0.display(),
                            wins = %path.display(),
                            "object defined in two files; the later file wins"
                        );
                        o.insert((path, object));
                    }
                }
            }
        }
        merged
            .into_iter()
            .map(|(k, (_, o))| (k.clone(), o.clone()))
            .collect()
    }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Every manifest file under `root`, in path order.
fn list_files(root: &Path) -> io::Result<Vec<(PathBuf, Format)>> {
    let mut out = Vec::new();
    walk(root, 0, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Format)>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // A subdirectory removed while we walk is simply gone.
        Err(e) if depth > 0 && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_ignored_name(&name) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, as `kubectl apply -f dir` would.
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&path, depth + 1, out)?;
            }
        } else if meta.is_file()
            && let Some(format) = manifest_format(&name)
        {
            out.push((path, format));
        }
    }
    Ok(())
}

/// What inotify reported since the last re-read.
#[derive(Debug, Default)]
struct Changed {
    /// Manifest files written, created, renamed or removed.
    files: BTreeSet<PathBuf>,
    /// Something only a full re-read can follow: a directory created,
    /// removed or renamed, a hidden entry (Kubernetes swaps a mounted
    /// ConfigMap's `..data` symlink), or an inotify error.
    everything: bool,
}

impl Changed {
    /// Sorts one path inotify named.
    fn classify(&mut self, root: &Path, path: &Path) {
        let Ok(relative) = path.strip_prefix(root) else {
            self.everything = true;
            return;
        };
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // An atomic writer's temporary: the rename into place is reported
        // under the real name.
        if name.ends_with('~') || name.ends_with(".tmp") || name.ends_with(".swp") {
            return;
        }
        let hidden = relative
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
        if !hidden && manifest_format(&name).is_some() && !path.is_dir() {
            self.files.insert(path.to_path_buf());
        } else {
            self.everything = true;
        }
    }
}

/// The manifest directory as a [`Source`].
#[derive(Debug)]
pub struct ManifestSource {
    dir: ManifestDir,
    debounce: Duration,
    rescan_every: Duration,
}

impl ManifestSource {
    pub fn new(root: impl Into<PathBuf>, metrics: Metrics) -> Self {
        Self {
            dir: ManifestDir::new(root, metrics),
            debounce: DEFAULT_DEBOUNCE,
            rescan_every: DEFAULT_RESCAN,
        }
    }

    /// Changes the debounce and periodic re-read intervals.
    pub fn with_timing(mut self, debounce: Duration, rescan_every: Duration) -> Self {
        self.debounce = debounce;
        self.rescan_every = rescan_every;
        self
    }
}

/// Re-reads off the async threads and hands the result to the store.
async fn rescan(dir: ManifestDir, store: &StateStore) -> Result<ManifestDir, SourceError> {
    let (dir, result) = tokio::task::spawn_blocking(move || {
        let mut dir = dir;
        let result = dir.rescan().map(|changed| changed.then(|| dir.objects()));
        (dir, result)
    })
    .await
    .map_err(|e| SourceError::Task(e.to_string()))?;
    match result {
        Ok(Some(objects)) => {
            let changes = store.replace_packed(KindSet::all(), objects)?;
            if changes > 0 {
                tracing::info!(
                    changes,
                    revision = store.revision(),
                    objects = store.len(),
                    "manifests changed"
                );
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the manifest directory; keeping the current state");
        }
    }
    Ok(dir)
}

/// Re-reads the files in `paths` off the async threads and hands what
/// changed to the store.
async fn reread(
    dir: ManifestDir,
    paths: BTreeSet<PathBuf>,
    store: &StateStore,
) -> Result<ManifestDir, SourceError> {
    let (dir, changes) = tokio::task::spawn_blocking(move || {
        let mut dir = dir;
        let changes = dir.reread(&paths);
        (dir, changes)
    })
    .await
    .map_err(|e| SourceError::Task(e.to_string()))?;
    if !changes.is_empty() {
        let changes = store.apply_packed(changes);
        tracing::info!(
            changes,
            revision = store.revision(),
            objects = store.len(),
            "manifests changed"
        );
    }
    Ok(dir)
}

/// A live inotify watch and the identity of the directory it watches, so a
/// directory replaced wholesale is noticed and watched anew.
struct Watch {
    _watcher: RecommendedWatcher,
    dir_id: (u64, u64),
}

fn dir_id(root: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(root).ok().map(|m| (m.dev(), m.ino()))
}

fn start_watch(
    root: &Path,
    changed: &Arc<Mutex<Changed>>,
    notices: &mpsc::Sender<()>,
) -> Option<Watch> {
    let id = dir_id(root)?;
    let tx = notices.clone();
    let changed = changed.clone();
    let watched = root.to_path_buf();
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            // Opening and reading files (our own rescans included) is no
            // change; a write being closed is. Writes themselves are waited
            // out: reading a file half written could drop the objects of
            // its missing half for a moment.
            let relevant = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_)) => false,
                _ => true,
            };
            if relevant {
                {
                    let mut changed = changed.lock().unwrap_or_else(|p| p.into_inner());
                    if event.paths.is_empty() || event.need_rescan() {
                        changed.everything = true;
                    }
                    for path in &event.paths {
                        changed.classify(&watched, path);
                    }
                }
                let _ = tx.try_send(());
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "inotify error; re-reading the manifest directory");
            changed.lock().unwrap_or_else(|p| p.into_inner()).everything = true;
            let _ = tx.try_send(());
        }
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(root, RecursiveMode::Recursive)?;
        Ok(w)
    });
    match watcher {
        Ok(w) => Some(Watch {
            _watcher: w,
            dir_id: id,
        }),
        Err(e) => {
            tracing::warn!(dir = %root.display(), error = %e, "cannot watch the manifest directory; relying on periodic re-reads");
            None
        }
    }
}

impl Source for ManifestSource {
    fn name(&self) -> &'static str {
        "manifests"
    }

    async fn run(
        self,
        store: Arc<StateStore>,
        synced: oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let Self {
            dir,
            debounce,
            rescan_every,
        } = self;
        let root = dir.root().to_path_buf();
        let (notices_tx, mut notices) = mpsc::channel::<()>(1);
        let changed = Arc::new(Mutex::new(Changed::default()));
        // Watch before the first read, so nothing written during it is missed.
        let mut watch = start_watch(&root, &changed, &notices_tx);

        let mut dir = tokio::task::spawn_blocking(move || {
            let mut dir = dir;
            dir.rescan().map(|_| dir)
        })
        .await
        .map_err(|e| SourceError::Task(e.to_string()))??;
        store.replace_packed(KindSet::all(), dir.objects())?;
        tracing::info!(
            dir = %root.display(),
            objects = store.len(),
            revision = store.revision(),
            "manifests read"
        );
        let _ = synced.send(());

        let mut tick = tokio::time::interval(rescan_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(()) = notices.recv() => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(debounce) => {}
                    }
                    while notices.try_recv().is_ok() {}
                    let Changed { files, everything } =
                        std::mem::take(&mut *changed.lock().unwrap_or_else(|p| p.into_inner()));
                    if !everything {
                        dir = reread(dir, files, &store).await?;
                        continue;
                    }
                }
                _ = tick.tick() => {}
            }
            dir = rescan(dir, &store).await?;
            let current = dir_id(&root);
            if current.is_some() && watch.as_ref().map(|w| w.dir_id) != current {
                watch = start_watch(&root, &changed, &notices_tx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;

    use weft_proto::watcher::v1::{Kind, resource};

    use super::*;

    #[test]
    fn names_that_are_skipped() {
        assert_eq!(manifest_format("svc.yaml"), Some(Format::Yaml));
        assert_eq!(manifest_format("svc.YML"), Some(Format::Yaml));
        assert_eq!(manifest_format("svc.json"), Some(Format::Json));
        assert_eq!(manifest_format("svc.yaml~"), None);
        assert_eq!(manifest_format(".svc.yaml"), None);
        assert_eq!(manifest_format("svc.yaml.tmp"), None);
        assert_eq!(manifest_format("svc.yaml.swp"), None);
        assert_eq!(manifest_format("README.md"), None);
        assert_eq!(manifest_format("yaml"), None);
    }

    fn keys(dir: &ManifestDir) -> Vec<String> {
        dir.objects().iter().map(|(k, _)| k.to_string()).collect()
    }

    fn label(dir: &ManifestDir, key: &ObjKey) -> Option<String> {
        let (_, object) = dir.objects().into_iter().find(|(k, _)| k == key)?;
        let meta = match object.unpack().kind? {
            resource::Kind::Namespace(n) => n.meta?,
            resource::Kind::Service(s) => s.meta?,
            _ => return None,
        };
        meta.labels.get("v").cloned()
    }

    fn ns_yaml(name: &str, v: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{v: '{v}'}}}}\n"
        )
    }

    #[test]
    fn reads_the_fixtures_once() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut dir = ManifestDir::new(root, Metrics::new());
        assert!(dir.rescan().unwrap());
        assert_eq!(dir.objects().len(), 10, "{:?}", keys(&dir));
        // Unchanged contents: no change reported.
        assert!(!dir.rescan().unwrap());
    }

    #[test]
    fn the_later_file_wins_whatever_the_write_order() {
        let tmp = tempfile::tempdir().unwrap();
        let key = ObjKey::new(Kind::Namespace, "", "x");
        fs::write(tmp.path().join("b.yaml"), ns_yaml("x", "b")).unwrap();
        fs::write(tmp.path().join("a.yaml"), ns_yaml("x", "a")).unwrap();
        let mut dir = ManifestDir::new(tmp.path(), Metrics::new());
        dir.rescan().unwrap();
        assert_eq!(label(&dir, &key).as_deref(), Some("b"));
        fs::write(tmp.path().join("a.yaml"), ns_yaml("x", "a2")).unwrap();
        dir.rescan().unwrap();
        assert_eq!(label(&dir, &key).as_deref(), Some("b"));
        fs::remove_file(tmp.path().join("b.yaml")).unwrap();
        dir.rescan().unwrap();
        assert_eq!(label(&dir, &key).as_deref(), Some("a2"));
    }

    #[test]
    fn bad_input_keeps_what_was_there() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let file = tmp.path().join("svc.yaml");
        let svc = |port: u32, v: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, labels: {{v: '{v}'}}}}\nspec: {{ports: [{{port: {port}}}]}}\n---\n{}",
                ns_yaml("n", v)
            )
        };
        fs::write(&file, svc(80, "1")).unwrap();
        let mut dir = ManifestDir::new(tmp.path(), metrics.clone());
        dir.rescan().unwrap();
        let web = ObjKey::new(Kind::Service, "default", "web");
        let n = ObjKey::new(Kind::Namespace, "", "n");

        // An invalid new version: the old one stays, the rest of the file flows.
        fs::write(&file, svc(70000, "2")).unwrap();
        assert!(dir.rescan().unwrap());
        assert_eq!(label(&dir, &web).as_deref(), Some("1"));
        assert_eq!(label(&dir, &n).as_deref(), Some("2"));
        assert_eq!(metrics.invalid_count("Service", "invalid_port"), 1);
        // The same bad contents are not complained about again.
        assert!(!dir.rescan().unwrap());
        assert_eq!(metrics.invalid_count("Service", "invalid_port"), 1);

        // A file that does not parse keeps all it gave.
        fs::write(&file, "kind: [").unwrap();
        dir.rescan().unwrap();
        assert_eq!(keys(&dir).len(), 2);
        assert_eq!(metrics.invalid_count("File", "parse"), 1);

        // A new file with an invalid object contributes only its valid ones.
        fs::write(
            tmp.path().join("new.json"),
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"}, "spec": {"podCIDR": "nope"}}"#,
        )
        .unwrap();
        dir.rescan().unwrap();
        assert_eq!(keys(&dir).len(), 2);
        assert_eq!(metrics.invalid_count("Node", "invalid_cidr"), 1);

        // A directory that cannot be read changes nothing.
        let mut gone = ManifestDir::new(tmp.path().join("missing"), metrics.clone());
        assert!(gone.rescan().is_err());
        fs::remove_file(&file).unwrap();
        dir.rescan().unwrap();
        assert!(keys(&dir).is_empty());
    }

    #[test]
    fn rereading_named_files_reports_only_winners_that_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.yaml"), tmp.path().join("b.yaml"));
        let x = ObjKey::new(Kind::Namespace, "", "x");
        let y = ObjKey::new(Kind::Namespace, "", "y");
        fs::write(
            &a,
            format!("{}---\n{}", ns_yaml("x", "a"), ns_yaml("y", "a")),
        )
        .unwrap();
        fs::write(&b, ns_yaml("x", "b")).unwrap();
        let mut dir = ManifestDir::new(tmp.path(), Metrics::new());
        dir.rescan().unwrap();
        let paths = |p: &[&Path]| p.iter().map(|p| p.to_path_buf()).collect::<BTreeSet<_>>();
        let changed_keys = |c: &[(ObjKey, Option<Packed>)]| {
            c.iter()
                .map(|(k, o)| (k.clone(), o.is_some()))
                .collect::<Vec<_>>()
        };

        // x is shadowed by b.yaml: changing it in a.yaml changes nothing.
        fs::write(
            &a,
            format!("{}---\n{}", ns_yaml("x", "a2"), ns_yaml("y", "a")),
        )
        .unwrap();
        assert!(dir.reread(&paths(&[&a])).is_empty());
        // Unchanged contents, or a file never read: nothing.
        assert!(
            dir.reread(&paths(&[&a, &tmp.path().join("c.yaml")]))
                .is_empty()
        );
        // b.yaml removed: x falls back to a.yaml's version.
        fs::remove_file(&b).unwrap();
        let c = dir.reread(&paths(&[&b]));
        assert_eq!(changed_keys(&c), vec![(x.clone(), true)]);
        assert_eq!(label(&dir, &x).as_deref(), Some("a2"));
        // y dropped from a.yaml: deleted.
        fs::write(&a, ns_yaml("x", "a2")).unwrap();
        assert_eq!(
            changed_keys(&dir.reread(&paths(&[&a]))),
            vec![(y.clone(), false)]
        );
        // The incremental result agrees with a full re-read.
        let incremental = dir.objects();
        let mut full = ManifestDir::new(tmp.path(), Metrics::new());
        full.rescan().unwrap();
        assert_eq!(incremental, full.objects());
    }

    #[test]
    fn only_manifest_files_are_reread_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir(root.join("sub")).unwrap();
        let mut c = Changed::default();
        c.classify(root, &root.join("svc.yaml"));
        c.classify(root, &root.join("sub/pod.json"));
        c.classify(root, &root.join("svc.yaml.tmp"));
        c.classify(root, &root.join(".svc.yaml.swp"));
        assert_eq!(
            c.files,
            BTreeSet::from([root.join("svc.yaml"), root.join("sub/pod.json")])
        );
        assert!(!c.everything);
        for path in [
            root.join("sub"),
            root.join("..data"),
            root.join("..data/svc.yaml"),
            root.join("notes.txt"),
            root.to_path_buf(),
            PathBuf::from("/elsewhere/svc.yaml"),
        ] {
            let mut c = Changed::default();
            c.classify(root, &path);
            assert!(c.everything, "{}", path.display());
        }
    }
}

//! DELs that could not reach datapath-svc, kept on disk until it can
//! replay them.
//!
//! A DEL the runtime sees fail is retried, but a runtime may also give up
//! and forget the pod, leaking its IP and endpoint; and a node whose agent
//! is down must still be able to tear pods down. So, as Cilium does, the
//! plugin writes the DEL to a queue directory, reports success, and
//! datapath-svc replays the queue when it starts. DEL is idempotent, so a
//! replay of something already gone is harmless.
//!
//! Format: one JSON file per attachment ([`QueuedDel`]), named from the
//! container id and interface name, mode 0600 in a 0700 directory. Writes
//! go to a temporary file that is renamed into place, so a reader never
//! sees half a file; a second DEL for the same attachment replaces the
//! first.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use weft_proto::datapath::v1::CniRequest;

/// The version of the file format, for readers to check.
pub const FORMAT_VERSION: u32 = 1;

const SUFFIX: &str = ".json";
const TMP_PREFIX: &str = ".tmp-";
/// A temporary file older than this belongs to a writer that died.
const STALE_TMP_AGE: Duration = Duration::from_secs(60);

/// One DEL waiting for datapath-svc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueuedDel {
    /// [`FORMAT_VERSION`] at the time of writing.
    pub format: u32,
    pub container_id: String,
    pub ifname: String,
    /// May be empty: the namespace is often gone by DEL time.
    #[serde(default)]
    pub netns: String,
    /// The CNI network name.
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: String,
    /// Milliseconds since the Unix epoch when the plugin queued it.
    #[serde(default)]
    pub queued_at_ms: u64,
    /// Why it was queued, for whoever reads the file.
    #[serde(default)]
    pub reason: String,
}

impl QueuedDel {
    /// The queue entry for a DEL request that could not be delivered.
    pub fn from_request(req: &CniRequest, reason: impl Into<String>) -> Self {
        Self {
            format: FORMAT_VERSION,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            network: req.network.clone(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
            pod_uid: req.pod_uid.clone(),
            queued_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            reason: reason.into(),
        }
    }

    /// The DEL request to replay.
    pub fn to_request(&self) -> CniRequest {
        CniRequest {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            network: self.network.clone(),
            pod_namespace: self.pod_namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: self.pod_uid.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DelQueueError {
    #[error("DEL queue {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("DEL queue entry has no container id or interface name")]
    Incomplete,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DelQueueError + '_ {
    move |source| DelQueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file name for an attachment: `<container id>@<ifname>.json`, with
/// any byte outside `[A-Za-z0-9_.-]` in the interface name %-escaped (a
/// container id has none; `@` appears in neither unescaped, so the name is
/// unambiguous). Very long ids are shortened and given a hash so the name
/// stays within the file system's limit.
pub fn file_name(container_id: &str, ifname: &str) -> String {
    let escape = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    };
    let id = escape(container_id);
    let ifname = escape(ifname);
    if id.len() + ifname.len() <= 200 {
        format!("{id}@{ifname}{SUFFIX}")
    } else {
        let hash = fnv1a(format!("{container_id}\0{ifname}").as_bytes());
        format!("{}-{hash:016x}@{ifname}{SUFFIX}", &id[..100.min(id.len())])
    }
}

/// FNV-1a: stable across builds, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes `del` into `dir` (created 0700 if missing) and makes it durable;
/// returns the file's path.
pub fn enqueue(dir: &Path, del: &QueuedDel) -> Result<PathBuf, DelQueueError> {
    if del.container_id.is_empty() || del.ifname.is_empty() {
        return Err(DelQueueError::Incomplete);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;

    let name = file_name(&del.container_id, &del.ifname);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{name}", std::process::id()));
    let body = serde_json::to_vec_pretty(del).map_err(|e| DelQueueError::Io {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above is filtered by the umask; make sure.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(&body)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path)(e));
    }
    Ok(path)
}

/// A queued DEL read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub path: PathBuf,
    pub del: QueuedDel,
}

impl Pending {
    /// Removes the entry once its DEL has been carried out. Gone already is
    /// fine (a concurrent drain, or a newer DEL that replaced and finished).
    pub fn done(&self) -> io::Result<()> {
        remove_if_present(&self.path)
    }
}

/// A file in the queue that is not a readable entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub path: PathBuf,
    pub error: String,
}

impl Malformed {
    /// Removes the file, after the caller has logged it.
    pub fn discard(&self) -> io::Result<()> {
        remove_if_present(&self.path)
    }
}

/// The contents of the queue.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drained {
    /// Oldest first.
    pub pending: Vec<Pending>,
    pub malformed: Vec<Malformed>,
}

/// Reads every queued DEL in `dir` (a missing directory is an empty
/// queue). Nothing is removed here: the caller replays each DEL and then
/// calls [`Pending::done`], so a crash half-way replays the rest next time.
/// Temporary files left by a writer that died are cleaned up.
pub fn drain_dir(dir: &Path) -> Result<Drained, DelQueueError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Drained::default()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut drained = Drained::default();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            if stale {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if !name.ends_with(SUFFIX) {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<QueuedDel>(&bytes).map_err(|e| e.to_string())
            })
            .and_then(|del| {
                if del.container_id.is_empty() || del.ifname.is_empty() {
                    Err("no container id or interface name".to_string())
                } else {
                    Ok(del)
                }
            });
        match parsed {
            Ok(del) => drained.pending.push(Pending { path, del }),
            // Removed between listing and reading: someone else drained it.
            Err(_) if !path.exists() => {}
            Err(error) => drained.malformed.push(Malformed { path, error }),
        }
    }
    drained
        .pending
        .sort_by(|a, b| (a.del.queued_at_ms, &a.path).cmp(&(b.del.queued_at_ms, &b.path)));
    Ok(drained)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn del(id: &str, ifname: &str, at: u64) -> QueuedDel {
        QueuedDel {
            format: FORMAT_VERSION,
            container_id: id.into(),
            ifname: ifname.into(),
            netns: String::new(),
            network: "weft".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid".into(),
            queued_at_ms: at,
            reason: "test".into(),
        }
    }

    #[test]
    fn enqueue_then_drain_round_trips_and_done_removes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("queue");
        let path = enqueue(&dir, &del("c2", "eth0", 20)).expect("enqueue");
        enqueue(&dir, &del("c1", "eth0", 10)).expect("enqueue");
        assert_eq!(path, dir.join("c2@eth0.json"));

        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);

        let drained = drain_dir(&dir).expect("drain");
        assert!(drained.malformed.is_empty());
        let ids: Vec<_> = drained
            .pending
            .iter()
            .map(|p| p.del.container_id.as_str())
            .collect();
        assert_eq!(ids, ["c1", "c2"], "oldest first");
        assert_eq!(drained.pending[1].del, del("c2", "eth0", 20));

        drained.pending[0].done().expect("done");
        drained.pending[0].done().expect("done twice is fine");
        let left = drain_dir(&dir).expect("drain");
        assert_eq!(left.pending.len(), 1);
        assert_eq!(left.pending[0].del.container_id, "c2");
    }

    #[test]
    fn same_attachment_replaces_the_entry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), &del("c1", "eth0", 1)).expect("enqueue");
        enqueue(tmp.path(), &del("c1", "eth0", 2)).expect("enqueue");
        enqueue(tmp.path(), &del("c1", "net1", 3)).expect("enqueue");
        let drained = drain_dir(tmp.path()).expect("drain");
        assert_eq!(drained.pending.len(), 2);
        assert_eq!(drained.pending[0].del.queued_at_ms, 2);
    }

    #[test]
    fn missing_dir_is_an_empty_queue() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            drain_dir(&tmp.path().join("nope")).expect("drain"),
            Drained::default()
        );
    }

    #[test]
    fn malformed_files_are_reported_not_replayed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("bad@eth0.json"), b"{not json").expect("write");
        fs::write(
            tmp.path().join("empty@eth0.json"),
            br#"{"format":1,"containerId":"","ifname":"eth0"}"#,
        )
        .expect("write");
        fs::write(tmp.path().join("README"), b"ignored").expect("write");
        fs::write(tmp.path().join(".tmp-1-x@eth0.json"), b"partial").expect("write");
        let drained = drain_dir(tmp.path()).expect("drain");
        assert!(drained.pending.is_empty());
        assert_eq!(drained.malformed.len(), 2);
        for m in &drained.malformed {
            m.discard().expect("discard");
        }
        assert!(drain_dir(tmp.path()).expect("drain").malformed.is_empty());
        assert!(
            tmp.path().join(".tmp-1-x@eth0.json").exists(),
            "a fresh temp file may be in use"
        );
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_name("abc", "eth0"), "abc@eth0.json");
        assert_eq!(file_name("abc", "e@/x"), "abc@e%40%2Fx.json");
        assert_ne!(file_name("a-b", "c"), file_name("a", "b-c"));
        let long = "a".repeat(300);
        let name = file_name(&long, "eth0");
        assert!(name.len() < 255, "{}", name.len());
        assert_ne!(name, file_name(&"a".repeat(299), "eth0"));
        assert!(!name.contains('/'));
    }

    #[test]
    fn request_round_trip_keeps_the_attachment() {
        let req = CniRequest {
            container_id: "c".into(),
            netns: "/proc/1/ns/net".into(),
            ifname: "eth0".into(),
            network: "weft".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            mtu: 1400,
            ..Default::default()
        };
        let queued = QueuedDel::from_request(&req, "unreachable");
        assert!(queued.queued_at_ms > 0);
        let back = queued.to_request();
        assert_eq!(back, CniRequest { mtu: 0, ..req });
    }

    #[test]
    fn incomplete_entries_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            enqueue(tmp.path(), &del("", "eth0", 1)),
            Err(DelQueueError::Incomplete)
        ));
    }
}

//! Running the real svc-watcher binary on a temporary manifest directory.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Streaming, transport::Channel};
use weft_common::watch::ObjKey;
use weft_proto::watcher::v1::{
    ListRequest, SubscribeRequest, WatchEvent, watch_event::Event, watcher_client::WatcherClient,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_svc-watcher");
pub const WAIT: Duration = Duration::from_secs(10);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A temp directory holding a copy of the fixtures.
pub fn fixture_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures(), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Replaces a file the way the lab does: write a hidden temp file, rename.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// The svc-watcher process; killed when dropped.
pub struct Watcher {
    child: Child,
    pub addr: String,
    pub metrics_addr: String,
    pub log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Watcher {
    pub fn start(manifests: &Path) -> Self {
        Self::start_with(&["--manifests-dir".as_ref(), manifests.as_os_str()])
    }

    /// Runs the binary with `args` (plus listen addresses from the env).
    pub fn start_with(args: &[&std::ffi::OsStr]) -> Self {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("svc-watcher.log");
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(BIN)
            .args(args)
            .env("WEFT_LISTEN", &addr)
            .env("WEFT_METRICS_LISTEN", &metrics_addr)
            .env("WEFT_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            addr,
            metrics_addr,
            log,
            _logdir: logdir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client, once the service answers List.
    pub async fn client(&self) -> WatcherClient<Channel> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                let mut client = WatcherClient::new(channel);
                if client.list(ListRequest::default()).await.is_ok() {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "svc-watcher did not come up; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The /metrics page.
    pub async fn metrics(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(&self.metrics_addr)
            .await
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a subscription.
pub async fn subscribe(
    client: &mut WatcherClient<Channel>,
    epoch: &str,
    since_revision: u64,
) -> Streaming<WatchEvent> {
    client
        .subscribe(SubscribeRequest {
            kinds: vec![],
            epoch: epoch.into(),
            since_revision,
            subscriber: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn next(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event in time")
        .expect("a healthy stream")
        .expect("the stream goes on")
}

/// The next event if one arrives within `within`.
pub async fn maybe_next(
    stream: &mut Streaming<WatchEvent>,
    within: Duration,
) -> Option<WatchEvent> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(Some(e))) => Some(e),
        Ok(other) => panic!("stream ended: {other:?}"),
        Err(_) => None,
    }
}

/// Reads events up to and including SYNCED.
pub async fn until_synced(stream: &mut Streaming<WatchEvent>) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    loop {
        let e = next(stream).await;
        let done = matches!(e.event, Some(Event::Synced(_)));
        events.push(e);
        if done {
            return events;
        }
    }
}

/// The object an event is about, with "+" for upserts and "-" for deletes.
pub fn describe(e: &WatchEvent) -> String {
    match &e.event {
        Some(Event::Reset(_)) => "RESET".into(),
        Some(Event::Synced(_)) => "SYNCED".into(),
        Some(Event::Upsert(r)) => format!("+{}", ObjKey::of(r).unwrap()),
        Some(Event::Delete(k)) => format!("-{}", ObjKey::from_proto(k)),
        None => "?".into(),
    }
}

pub fn keys_of(events: &[WatchEvent]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Upsert(_))))
        .map(describe)
        .collect()
}

/// The keys of the fixture objects, as `describe` renders upserts.
pub fn fixture_keys() -> BTreeSet<String> {
    [
        "+KIND_NAMESPACE/shop",
        "+KIND_NAMESPACE/kube-system",
        "+KIND_NODE/node-a",
        "+KIND_NODE/node-b",
        "+KIND_SERVICE/shop/web",
        "+KIND_SERVICE/kube-system/kube-dns",
        "+KIND_ENDPOINT_SLICE/shop/web-x1y2z",
        "+KIND_POD/shop/web-1",
        "+KIND_POD/shop/web-2",
        "+KIND_NETWORK_POLICY/shop/db",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

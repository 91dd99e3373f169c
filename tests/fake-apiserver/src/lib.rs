//! An in-memory stand-in for the Kubernetes API server, for tests.
//!
//! It is a fixture, not an API server: no authentication, admission,
//! validation against schemas, garbage collection, finalizers or
//! pagination (a `limit` is ignored and the whole list returned, which the
//! protocol allows). What it does get right is the wire protocol that
//! clients such as kube-rs depend on:
//!
//! - one revision counter for every write, as etcd has: each object's
//!   `metadata.resourceVersion` is the revision of its last write, a list's
//!   the revision it was read at;
//! - LIST with label and field selectors; WATCH
//!   (`?watch=true&resourceVersion=N&allowWatchBookmarks=true`) streaming
//!   JSON lines of `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`, resuming from
//!   any revision still in the event log, with `ERROR` 410 for one that is
//!   not (and a 410 answer to a list at an exact revision that old);
//!   objects moving in or out of a watch's selector arrive as ADDED/DELETED;
//! - create (409 `AlreadyExists`), replace with `metadata.resourceVersion`
//!   (409 `Conflict` when stale; custom resources must carry one), patch as
//!   JSON merge patch, JSON patch, strategic merge patch (treated as a
//!   merge patch) and server-side apply (create-or-merge), delete with
//!   `preconditions`, the `status` subresource;
//! - CustomResourceDefinitions: creating one serves its kinds under
//!   `/apis/<group>/<version>/`; discovery (`/api`, `/apis`, `/version`).
//!
//! Test hooks: [`FakeApiServer::gone_next_watches`] (the next watches get
//! ERROR 410), [`FakeApiServer::compact`] (every resume point in the past
//! becomes too old), [`FakeApiServer::drop_watches`] (cut open watch
//! connections mid-stream), [`FakeApiServer::set_latency`] and
//! [`FakeApiServer::fail_next`]. The binary offers the same under
//! `POST /__fake/{gone,compact,drop-watches,latency,fail}` and
//! `GET /__fake/stats`.
//!
//! Outages, as clients meet them: [`FakeApiServer::set_unavailable`] (every
//! request answered `503 ServiceUnavailable`, open watches cut, as from a
//! server whose storage is gone), [`FakeApiServer::go_away`] and
//! [`FakeApiServer::come_back`] (connections cut and refused, as from a
//! stopped process; with `Restart::LosingHistory` the server comes back
//! without its watch cache, so resuming from an earlier resourceVersion gets
//! 410 Gone). The binary offers timed versions under
//! `POST /__fake/unavailable?ms=N` and `POST /__fake/away?ms=N[&restart=1]`.

mod http;
mod listener;
mod ops;
mod patch;
mod selector;
mod state;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use http::Restart;
pub use ops::ApiError;
pub use state::{Failure, Stats};

use crate::{
    http::Shared,
    ops::Target,
    selector::{FieldSelector, LabelSelector},
    state::Inner,
};

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many writes the event log keeps; a watch resuming from before
    /// them gets 410 Gone.
    pub log_limit: usize,
    /// How often a watch that asked for bookmarks gets one (the real server
    /// sends them about once a minute; tests want them sooner).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            log_limit: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// A running fake API server on a loopback port; stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl FakeApiServer {
    /// Serves on a fresh `127.0.0.1` port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), Options::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::new(options.log_limit, options.bookmark_interval)),
            drop_watches: Mutex::new(CancellationToken::new()),
            control,
        });
        let stop = CancellationToken::new();
        let app = axum::Router::new().fallback({
            let shared = shared.clone();
            move |method, uri, headers, body| {
                http::handle(shared.clone(), method, uri, headers, body)
            }
        });
        tokio::spawn(listener::run(listener, app, control_rx, stop.clone()));
        Ok(Self { shared, addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Stops serving; open watches are cut.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The next `n` watch requests get an `ERROR` event with a 410 Status,
    /// whatever revision they ask for.
    pub fn gone_next_watches(&self, n: usize) {
        self.shared.lock().gone_next += n;
    }

    /// Forgets the event log: a watch resuming from any earlier revision
    /// gets 410.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Cuts every open watch connection mid-stream.
    pub fn drop_watches(&self) {
        self.shared.drop_all_watches();
    }

    /// Delays every request by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Answers matching requests with an error until `failure.remaining`
    /// are used up.
    pub fn fail_next(&self, failure: Failure) {
        self.shared.lock().failures.push(failure);
    }

    /// While `on`, every API request is answered `503 ServiceUnavailable`
    /// (the hooks and the test's own reads and writes still work); turning
    /// it on cuts every open watch, as a server losing its storage does.
    pub fn set_unavailable(&self, on: bool) {
        self.shared.set_unavailable(on);
    }

    /// Takes the server off the network: every open connection is cut and
    /// new ones are refused until [`FakeApiServer::come_back`]. Returns once
    /// the port refuses connections. Objects can still be changed through
    /// the test's own calls meanwhile.
    pub async fn go_away(&self) {
        self.shared.go_away().await;
    }

    /// Listens again on the same port; with [`Restart::LosingHistory`] the
    /// event log is gone first, so a watch resuming from before now gets
    /// 410 Gone and must list again. Returns once connections are accepted.
    pub async fn come_back(&self, restart: Restart) -> std::io::Result<()> {
        self.shared.come_back(restart).await
    }

    /// Forgets every injected failure not yet used.
    pub fn clear_failures(&self) {
        self.shared.lock().failures.clear();
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Open watch connections.
    pub fn open_watches(&self) -> usize {
        let mut inner = self.shared.lock();
        inner.watchers.retain(|w| !w.tx.is_closed());
        inner.watchers.len()
    }

    fn target(inner: &Inner, object: &Value) -> Result<(Target, String), ApiError> {
        let s = |p: &str| {
            object
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let ty = inner
            .type_of(s("/apiVersion"), s("/kind"))
            .ok_or_else(|| ApiError::bad_request("unknown apiVersion/kind"))?;
        let namespace = ty.namespaced.then(|| match s("/metadata/namespace") {
            "" => "default".to_string(),
            ns => ns.to_string(),
        });
        Ok((Target { ty, namespace }, s("/metadata/name").to_string()))
    }

    /// Creates an object (`apiVersion`, `kind`, `metadata.name` set), as a
    /// POST would.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let mut inner = self.shared.lock();
        let (t, _) = Self::target(&inner, &object)?;
        inner.create(&t, object)
    }

    /// Creates the object or replaces it whatever its resourceVersion: how
    /// a test plays "someone changed the cluster".
    pub fn apply(&self, mut object: Value) -> Result<Value, ApiError> {
        let mut inner = self.shared.lock();
        let (t, name) = Self::target(&inner, &object)?;
        match inner.get(&t, &name) {
            Ok(current) => {
                if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert(
                        "resourceVersion".into(),
                        current["metadata"]["resourceVersion"].clone(),
                    );
                }
                inner.replace(&t, &name, object, false)
            }
            Err(_) => inner.create(&t, object),
        }
    }

    /// Deletes an object; `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.shared.lock();
        let probe = serde_json::json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"namespace": namespace, "name": name},
        });
        let (t, name) = Self::target(&inner, &probe)?;
        inner.delete(&t, &name, None)
    }

    /// Every object of a kind, in every namespace.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let mut inner = self.shared.lock();
        let Some(ty) = inner.type_of(api_version, kind) else {
            return Vec::new();
        };
        let t = Target {
            ty,
            namespace: None,
        };
        let items = inner
            .list(&t, &LabelSelector::default(), &FieldSelector::default())
            .0;
        // The test's own reads are not the clients' requests.
        inner.stats.lists -= 1;
        items
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

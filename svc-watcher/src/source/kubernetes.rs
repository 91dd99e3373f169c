//! The Kubernetes API as a [`Source`]: one kube-rs watcher per kind.
//!
//! kube-rs's `runtime::watcher` does the protocol work: it lists, then
//! watches from the list's resourceVersion with bookmarks on, so a
//! reconnect resumes where it was; a `410 Gone` (the resume point was
//! compacted away) makes it list again, and errors back off with
//! [`weft_k8s::retry::backed_off`]: at most about a second (none after 410), so the state
//! is current again within about a second of the API server's return,
//! however long it was gone (kube-runtime's default back-off, up to 30 s
//! and reset only after two quiet minutes, left it a minute behind). Every
//! watch error marks its kind broken and every answer or event marks it
//! working in a [`WatchHealth`] ([`observer`] hears the answers that start
//! a resumed watch, which brings no event). This module turns the events
//! into store writes:
//!
//! - a (re)list arrives as `Init`, `InitApply`..., `InitDone`; the objects
//!   are buffered and handed to [`StateStore::replace_kind_set`] at
//!   `InitDone`, so objects deleted while the watch was down disappear and
//!   subscribers never see a half-listed kind;
//! - `Apply` and `Delete` become single [`Change`]s.
//!
//! The source reports synced only once every kind has completed its first
//! list: a subscriber's first snapshot is the whole cluster. Objects that
//! fail conversion are refused as in the manifest source: counted, logged,
//! and the version stored before (if any) is kept.

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{Api, Client, ResourceExt as _, runtime::watcher};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use weft_common::watch::{ObjKey, Packed};
use weft_k8s::access::{Access, WATCH};
use weft_k8s::{
    observe::{Observer, Outcome},
    retry::backed_off,
};
use weft_proto::watcher::v1::{Kind, Resource};

use super::{Source, SourceError};
use crate::{
    convert::{self, ConvertError, kind_name},
    health::WatchHealth,
    metrics::Metrics,
    state::{Change, KindSet, StateStore},
};

/// What this source asks of the API: a watch of every kind it streams.
/// The chart's ClusterRole for svc-watcher grants exactly this.
pub const API_ACCESS: &[Access] = &[
    Access {
        group: "",
        resource: "services",
        verbs: WATCH,
    },
    Access {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: WATCH,
    },
    Access {
        group: "",
        resource: "pods",
        verbs: WATCH,
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: WATCH,
    },
    Access {
        group: "",
        resource: "namespaces",
        verbs: WATCH,
    },
    Access {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: WATCH,
    },
];

/// The collection each kind is listed and watched at (all namespaces).
const PATHS: &[(&str, Kind)] = &[
    ("/api/v1/services", Kind::Service),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::EndpointSlice,
    ),
    ("/api/v1/pods", Kind::Pod),
    ("/api/v1/nodes", Kind::Node),
    ("/api/v1/namespaces", Kind::Namespace),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        Kind::NetworkPolicy,
    ),
];

/// An observer for the client: an answer to a kind's list or watch
/// request marks the kind working (see the module doc).
pub fn observer(health: WatchHealth) -> Observer {
    Observer::new(move |method, uri, outcome| {
        if method.as_str() != "GET" {
            return;
        }
        let Outcome::Answered(code) = outcome else {
            return;
        };
        if let Some((_, kind)) = PATHS.iter().find(|(p, _)| *p == uri.path())
            && code.is_success()
        {
            health.working(*kind);
        }
    })
}

/// The Kubernetes API through `client`.
pub struct KubeSource {
    client: Client,
    metrics: Metrics,
    health: WatchHealth,
}

impl KubeSource {
    /// `health` hears of every watch error and recovery; the client should
    /// carry [`observer`] of the same.
    pub fn new(client: Client, metrics: Metrics, health: WatchHealth) -> Self {
        Self {
            client,
            metrics,
            health,
        }
    }
}

/// One kind to watch: its API, how to convert it, whether it is namespaced.
struct Follow<K> {
    api: Api<K>,
    kind: Kind,
    namespaced: bool,
    convert: fn(&K) -> Result<Resource, ConvertError>,
}

/// What every per-kind task shares.
#[derive(Clone)]
struct Ctx {
    store: Arc<StateStore>,
    metrics: Metrics,
    health: WatchHealth,
    listed: mpsc::UnboundedSender<Kind>,
    shutdown: CancellationToken,
}

impl Source for KubeSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn run(
        self,
        store: Arc<StateStore>,
        synced: oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let (listed_tx, mut listed) = mpsc::unbounded_channel();
        let ctx = Ctx {
            store: store.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            listed: listed_tx,
            shutdown: shutdown.clone(),
        };
        let c = &self.client;
        let mut tasks = JoinSet::new();
        tasks.spawn(follow(
            Follow {
                api: Api::<Service>::all(c.clone()),
                kind: Kind::Service,
                namespaced: true,
                convert: convert::service,
            },
            ctx.clone(),
        ));
        tasks.spawn(follow(
            Follow {
                api: Api::<EndpointSlice>::all(c.clone()),
                kind: Kind::EndpointSlice,
                namespaced: true,
                convert: convert::endpoint_slice,
            },
            ctx.clone(),
        ));
        tasks.spawn(follow(
            Follow {
                api: Api::<Pod>::all(c.clone()),
                kind: Kind::Pod,
                namespaced: true,
                convert: convert::pod,
            },
            ctx.clone(),
        ));
        tasks.spawn(follow(
            Follow {
                api: Api::<Node>::all(c.clone()),
                kind: Kind::Node,
                namespaced: false,
                convert: convert::node,
            },
            ctx.clone(),
        ));
        tasks.spawn(follow(
            Follow {
                api: Api::<Namespace>::all(c.clone()),
                kind: Kind::Namespace,
                namespaced: false,
                convert: convert::namespace,
            },
            ctx.clone(),
        ));
        tasks.spawn(follow(
            Follow {
                api: Api::<NetworkPolicy>::all(c.clone()),
                kind: Kind::NetworkPolicy,
                namespaced: true,
                convert: convert::network_policy,
            },
            ctx,
        ));

        let mut waiting = KindSet::all();
        let mut synced = Some(synced);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(kind) = listed.recv(), if synced.is_some() => {
                    let mut rest = KindSet::empty();
                    for k in waiting.iter().filter(|k| *k != kind) {
                        rest.insert(k);
                    }
                    waiting = rest;
                    if waiting.iter().next().is_none() {
                        tracing::info!(objects = store.len(), revision = store.revision(), "every kind listed");
                        if let Some(s) = synced.take() {
                            let _ = s.send(());
                        }
                    }
                }
                Some(done) = tasks.join_next() => {
                    // A task ends only on a store error (a bug) or a panic.
                    shutdown.cancel();
                    return match done {
                        Ok(r) => r,
                        Err(e) => Err(SourceError::Task(e.to_string())),
                    };
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| SourceError::Task(e.to_string()))??;
        }
        Ok(())
    }
}

/// The key an object has (or would have) in the store, read from its
/// metadata alone so that refused objects can still be matched up.
fn key_of<K: kube::Resource>(object: &K, kind: Kind, namespaced: bool) -> ObjKey {
    let namespace = if namespaced {
        match object.meta().namespace.as_deref() {
            None | Some("") => "default".to_string(),
            Some(ns) => ns.to_string(),
        }
    } else {
        String::new()
    };
    ObjKey::new(kind, namespace, object.name_any())
}

/// Follows one kind until shutdown; an error is a store failure.
async fn follow<K>(f: Follow<K>, ctx: Ctx) -> Result<(), SourceError>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let name = kind_name(f.kind);
    let mut events = backed_off(watcher(f.api.clone(), watcher::Config::default())).boxed();
    // Packed as they arrive: a list of 100,000 endpoints is held whole
    // until it is complete.
    let mut buffer: Vec<(ObjKey, Packed)> = Vec::new();
    let mut lists = 0u64;
    // When the current break began, if the watch is broken.
    let mut broken_since: Option<tokio::time::Instant> = None;
    // Converts, or on refusal keeps what the store holds for that key.
    let accept = |object: &K| -> Option<Resource> {
        match (f.convert)(object) {
            Ok(r) => Some(r),
            Err(e) => {
                let key = key_of(object, f.kind, f.namespaced);
                tracing::warn!(kind = name, object = %key, error = %e, "invalid object refused; keeping the version stored before, if any");
                ctx.metrics.invalid(name, e.reason.as_str());
                ctx.store.get(&key)
            }
        }
    };
    loop {
        let event = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            e = events.next() => e,
        };
        let Some(event) = event else {
            tracing::warn!(kind = name, "watch stream ended");
            return Ok(());
        };
        match &event {
            // Init comes before the list is even asked for.
            Ok(watcher::Event::Init) => {}
            Ok(_) => {
                ctx.health.working(f.kind);
                if let Some(since) = broken_since.take() {
                    tracing::info!(kind = name, after = ?since.elapsed(), "watch working again");
                }
            }
            // Gone: an answer; the watcher lists again at once.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                ctx.metrics.watch_error(f.kind);
            }
            Err(e) => {
                ctx.health.broken(f.kind, &e.to_string());
                ctx.metrics.watch_error(f.kind);
                // Retried about every second: the first error of a break
                // is a warning, the others are for debugging.
                if broken_since.is_none() {
                    broken_since = Some(tokio::time::Instant::now());
                    tracing::warn!(kind = name, error = %e, "watch error; retrying every second at most");
                } else {
                    tracing::debug!(kind = name, error = %e, "watch error; retrying");
                }
            }
        }
        match event {
            Ok(watcher::Event::Init) => {
                buffer.clear();
                if lists > 0 {
                    ctx.metrics.relist(f.kind);
                    tracing::info!(kind = name, "listing again");
                }
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let Some(r) = accept(&object)
                    && let Some(key) = ObjKey::of(&r)
                {
                    buffer.push((key, Packed::new(&r)));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let objects = std::mem::take(&mut buffer);
                let count = objects.len();
                let changes = ctx.store.replace_packed(KindSet::of([f.kind]), objects)?;
                lists += 1;
                tracing::info!(kind = name, objects = count, changes, "listed");
                if lists == 1 {
                    let _ = ctx.listed.send(f.kind);
                }
            }
            Ok(watcher::Event::Apply(object)) => {
                if let Some(r) = accept(&object) {
                    ctx.store.apply(Change::Upsert(r))?;
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                ctx.store
                    .apply(Change::Delete(key_of(&object, f.kind, f.namespaced)))?;
            }
            Err(_) => {}
        }
    }
}

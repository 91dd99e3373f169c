//! A small in-process stand-in for svc-watcher, shared by the integration
//! tests of ipam-svc and identity-svc (identity-svc includes this file by
//! path).
//!
//! Every subscription gets a full snapshot (RESET, one UPSERT per object,
//! SYNCED), which the contract allows for any `since_revision`, then the
//! deltas the test makes. The snapshot and the registration for deltas
//! happen under one lock, so no delta falls between them. With
//! [`FakeWatcher::hold_sync`] new subscribers get the snapshot without its
//! SYNCED until [`FakeWatcher::release_sync`], to test that nothing is
//! decided on a half-received state.

#![allow(dead_code, unreachable_pub)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_common::watch::ObjKey;
use weft_proto::watcher::v1::{
    Kind, ListRequest, ListResponse, Namespace, Node, ObjectMeta, Pod, Reset, Resource,
    StatusRequest, StatusResponse, SubscribeRequest, Synced, WatchEvent, resource,
    watch_event::Event,
    watcher_server::{Watcher, WatcherServer},
};

struct Subscriber {
    kinds: Vec<Kind>,
    tx: mpsc::UnboundedSender<WatchEvent>,
    synced: bool,
}

impl Subscriber {
    fn wants(&self, kind: Kind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }
}

struct State {
    revision: u64,
    objects: BTreeMap<ObjKey, Resource>,
    subscribers: Vec<Subscriber>,
    hold_sync: bool,
}

#[derive(Clone)]
pub struct FakeWatcher {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    stop: CancellationToken,
}

const EPOCH: &str = "fake-epoch";

fn event(revision: u64, e: Event) -> WatchEvent {
    WatchEvent {
        epoch: EPOCH.into(),
        revision,
        event: Some(e),
    }
}

impl FakeWatcher {
    /// Serves on a fresh loopback port until [`FakeWatcher::stop`] (or the end
    /// of the test's runtime).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake watcher");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            revision: 1,
            objects: BTreeMap::new(),
            subscribers: Vec::new(),
            hold_sync: false,
        }));
        let stop = CancellationToken::new();
        let svc = Svc {
            state: state.clone(),
            stop: stop.clone(),
        };
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(WatcherServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    token.cancelled().await
                })
                .await;
        });
        Self { state, addr, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake watcher lock")
    }

    /// Creates or replaces an object and streams the delta.
    pub fn upsert(&self, resource: Resource) {
        let key = ObjKey::of(&resource).expect("resource with meta");
        let mut s = self.lock();
        s.revision += 1;
        let ev = event(s.revision, Event::Upsert(resource.clone()));
        s.objects.insert(key.clone(), resource);
        s.subscribers
            .retain(|sub| !sub.wants(key.kind) || sub.tx.send(ev.clone()).is_ok());
    }

    /// Removes an object and streams the delta.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = ObjKey::new(kind, namespace, name);
        let mut s = self.lock();
        s.revision += 1;
        let ev = event(s.revision, Event::Delete(key.to_proto()));
        s.objects.remove(&key);
        s.subscribers
            .retain(|sub| !sub.wants(key.kind) || sub.tx.send(ev.clone()).is_ok());
    }

    /// New subscribers get their snapshot without SYNCED until released.
    pub fn hold_sync(&self) {
        self.lock().hold_sync = true;
    }

    /// Sends the held SYNCED to every subscriber that waits for it.
    pub fn release_sync(&self) {
        let mut s = self.lock();
        s.hold_sync = false;
        let rev = s.revision;
        for sub in s.subscribers.iter_mut().filter(|sub| !sub.synced) {
            sub.synced = true;
            let _ = sub.tx.send(event(rev, Event::Synced(Synced {})));
        }
    }

    /// How many subscriptions are open.
    pub fn subscribers(&self) -> usize {
        let mut s = self.lock();
        s.subscribers.retain(|sub| !sub.tx.is_closed());
        s.subscribers.len()
    }
}

struct Svc {
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

type Events = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Watcher for Svc {
    type SubscribeStream = Events;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Events>, Status> {
        let request = request.into_inner();
        let kinds: Vec<Kind> = request.kinds().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state.lock().expect("fake watcher lock");
        let rev = s.revision;
        let _ = tx.send(event(rev, Event::Reset(Reset {})));
        for (key, obj) in &s.objects {
            if kinds.is_empty() || kinds.contains(&key.kind) {
                let _ = tx.send(event(rev, Event::Upsert(obj.clone())));
            }
        }
        let synced = !s.hold_sync;
        if synced {
            let _ = tx.send(event(rev, Event::Synced(Synced {})));
        }
        s.subscribers.push(Subscriber { kinds, tx, synced });
        drop(s);
        let stop = self.stop.clone();
        let stream = futures::StreamExt::take_until(
            futures::StreamExt::map(UnboundedReceiverStream::new(rx), Ok),
            stop.cancelled_owned(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let request = request.into_inner();
        let kinds: Vec<Kind> = request.kinds().collect();
        let s = self.state.lock().expect("fake watcher lock");
        Ok(Response::new(ListResponse {
            epoch: EPOCH.into(),
            revision: s.revision,
            resources: s
                .objects
                .iter()
                .filter(|(k, _)| kinds.is_empty() || kinds.contains(&k.kind))
                .map(|(_, r)| r.clone())
                .collect(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.state.lock().expect("fake watcher lock");
        Ok(Response::new(StatusResponse {
            ready: !s.hold_sync,
            reason: String::new(),
            epoch: EPOCH.into(),
            revision: s.revision,
        }))
    }
}

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    })
}

/// A Node, optionally with `spec.podCIDRs`.
pub fn node(name: &str, pod_cidrs: &[&str]) -> Resource {
    Resource {
        kind: Some(resource::Kind::Node(Node {
            meta: meta("", name, &[]),
            pod_cidrs: pod_cidrs.iter().map(|c| c.to_string()).collect(),
            addresses: Vec::new(),
        })),
    }
}

/// A running Pod.
pub fn pod(namespace: &str, name: &str, labels: &[(&str, &str)], host_network: bool) -> Resource {
    Resource {
        kind: Some(resource::Kind::Pod(Pod {
            meta: meta(namespace, name, labels),
            node_name: "node-1".into(),
            pod_ips: Vec::new(),
            phase: "Running".into(),
            host_network,
            container_ports: Vec::new(),
        })),
    }
}

/// A Namespace.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Resource {
    Resource {
        kind: Some(resource::Kind::Namespace(Namespace {
            meta: meta("", name, labels),
        })),
    }
}

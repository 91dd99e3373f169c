//! The subscriber side of svc-watcher's stream.
//!
//! [`subscribe`] keeps one subscription alive for the life of a service: it
//! reconnects with back-off and resumes from the last event it handed out, so
//! after a watcher restart the subscriber gets a snapshot and otherwise only
//! the deltas it missed. [`Mirror`] applies those events to a local copy of
//! the state, holding a snapshot aside until it is complete so that a consumer
//! never sees a half-received state (a datapath must not flush its maps
//! because the watcher restarted).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weft_proto::watcher::v1::{
    Kind, Resource, ResourceKey, SubscribeRequest, WatchEvent, resource, watch_event::Event,
    watcher_client::WatcherClient,
};

use crate::backoff::Backoff;

/// The Service annotation that picks the backend selection algorithm
/// (read by datapath-svc).
pub const LB_ALGORITHM_ANNOTATION: &str = "weft.io/lb-algorithm";

/// The annotations svc-watcher forwards: those a subscriber reads, and no
/// others. The rest (`kubectl.kubernetes.io/last-applied-configuration`, a
/// whole copy of the object, above all) would travel to every subscriber
/// and sit in every cache for nothing. A subscriber that starts reading an
/// annotation adds it here.
pub const FORWARDED_ANNOTATIONS: &[&str] = &[LB_ALGORITHM_ANNOTATION];

/// The identity of an object in the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a resource, or `None` for an empty one.
    pub fn of(resource: &Resource) -> Option<Self> {
        let (kind, meta) = match resource.kind.as_ref()? {
            resource::Kind::Service(o) => (Kind::Service, o.meta.as_ref()),
            resource::Kind::EndpointSlice(o) => (Kind::EndpointSlice, o.meta.as_ref()),
            resource::Kind::Pod(o) => (Kind::Pod, o.meta.as_ref()),
            resource::Kind::Node(o) => (Kind::Node, o.meta.as_ref()),
            resource::Kind::Namespace(o) => (Kind::Namespace, o.meta.as_ref()),
            resource::Kind::NetworkPolicy(o) => (Kind::NetworkPolicy, o.meta.as_ref()),
        };
        let meta = meta?;
        Some(Self::new(kind, &meta.namespace, &meta.name))
    }

    pub fn from_proto(key: &ResourceKey) -> Self {
        Self::new(key.kind(), &key.namespace, &key.name)
    }

    pub fn to_proto(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind as i32,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind.as_str_name(), self.name)
        } else {
            write!(
                f,
                "{}/{}/{}",
                self.kind.as_str_name(),
                self.namespace,
                self.name
            )
        }
    }
}

/// An object kept as its protobuf encoding.
///
/// Services hold tens of thousands of these (every Service and
/// EndpointSlice of a cluster), and the encoding takes a fraction of the
/// memory of the decoded message with its many small strings. It is shared,
/// not copied, between the places that hold it; and since equal messages
/// encode to equal bytes (maps are `BTreeMap`s), comparing encodings
/// compares objects. Objects are decoded where they are used, one at a time.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Packed(Arc<[u8]>);

impl Packed {
    pub fn new(resource: &Resource) -> Self {
        Self(resource.encode_to_vec().into())
    }

    pub fn unpack(&self) -> Resource {
        // Only `new` makes these, from a message that encoded.
        Resource::decode(&*self.0).expect("a Packed holds an encoded Resource")
    }

    /// The encoding.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.unpack().fmt(f)
    }
}

/// What applying one event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Nothing visible yet (a snapshot is being received) or nothing at all.
    Nothing,
    /// These objects changed (added, replaced or removed).
    Changed(Vec<ObjKey>),
}

/// A local copy of (part of) the cluster state, fed by [`subscribe`]. The
/// objects are kept [`Packed`]; readers get them decoded.
#[derive(Debug, Default, Clone)]
pub struct Mirror {
    objects: BTreeMap<ObjKey, Packed>,
    staging: Option<BTreeMap<ObjKey, Packed>>,
    synced: bool,
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from objects known before (a cache on disk), as if synced.
    /// The first snapshot from the watcher then replaces them, reporting only
    /// what differs.
    pub fn with_objects(objects: impl IntoIterator<Item = Resource>) -> Self {
        let objects = objects
            .into_iter()
            .filter_map(|r| Some((ObjKey::of(&r)?, Packed::new(&r))))
            .collect();
        Self {
            objects,
            staging: None,
            synced: true,
        }
    }

    /// Whether the mirror holds a complete state (from the watcher or a cache).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &ObjKey) -> Option<Resource> {
        self.objects.get(key).map(Packed::unpack)
    }

    /// Every object, still encoded, in key order.
    pub fn packed(&self) -> impl Iterator<Item = &Packed> {
        self.objects.values()
    }

    pub fn objects(&self) -> impl Iterator<Item = (&ObjKey, Resource)> {
        self.objects.iter().map(|(k, p)| (k, p.unpack()))
    }

    /// The objects of one kind.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = (&ObjKey, Resource)> {
        let start = ObjKey::new(kind, "", "");
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(k, p)| (k, p.unpack()))
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn apply(&mut self, event: &WatchEvent) -> Applied {
        match &event.event {
            Some(Event::Reset(_)) => {
                self.staging = Some(BTreeMap::new());
                Applied::Nothing
            }
            Some(Event::Upsert(resource)) => {
                let Some(key) = ObjKey::of(resource) else {
                    return Applied::Nothing;
                };
                let packed = Packed::new(resource);
                match &mut self.staging {
                    Some(staging) => {
                        staging.insert(key, packed);
                        Applied::Nothing
                    }
                    None => {
                        if self.objects.get(&key) == Some(&packed) {
                            return Applied::Nothing;
                        }
                        self.objects.insert(key.clone(), packed);
                        Applied::Changed(vec![key])
                    }
                }
            }
            Some(Event::Delete(key)) => {
                let key = ObjKey::from_proto(key);
                match &mut self.staging {
                    Some(staging) => {
                        staging.remove(&key);
                        Applied::Nothing
                    }
                    None => match self.objects.remove(&key) {
                        Some(_) => Applied::Changed(vec![key]),
                        None => Applied::Nothing,
                    },
                }
            }
            Some(Event::Synced(_)) => {
                self.synced = true;
                let Some(staging) = self.staging.take() else {
                    return Applied::Nothing;
                };
                let mut changed: Vec<ObjKey> = self
                    .objects
                    .keys()
                    .filter(|k| !staging.contains_key(*k))
                    .cloned()
                    .collect();
                changed.extend(
                    staging
                        .iter()
                        .filter(|(k, v)| self.objects.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone()),
                );
                self.objects = staging;
                changed.sort();
                if changed.is_empty() {
                    Applied::Nothing
                } else {
                    Applied::Changed(changed)
                }
            }
            None => Applied::Nothing,
        }
    }
}

/// Where a subscription resumes after a reconnect: the epoch and revision of
/// the last event after which the subscriber held a complete state. Events
/// inside a snapshot (after RESET, before SYNCED) do not move it forward;
/// RESET clears it. A stream that breaks mid-snapshot therefore starts over
/// with a fresh snapshot: resuming at the snapshot's revision would replay
/// only the deltas after it, and [`Mirror`] would take the half-received
/// snapshot for the whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumePoint {
    pub epoch: String,
    pub revision: u64,
    in_snapshot: bool,
}

impl ResumePoint {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an event handed to the consumer.
    pub fn observe(&mut self, event: &WatchEvent) {
        match &event.event {
            Some(Event::Reset(_)) => {
                self.in_snapshot = true;
                self.epoch.clear();
                self.revision = 0;
            }
            Some(Event::Synced(_)) => {
                self.in_snapshot = false;
                self.epoch.clone_from(&event.epoch);
                self.revision = event.revision;
            }
            _ if self.in_snapshot => {}
            _ => {
                self.epoch.clone_from(&event.epoch);
                self.revision = event.revision;
            }
        }
    }
}

/// Subscribes to `kinds` on the watcher behind `channel` and yields every
/// event, across reconnects, until `shutdown` fires. After a reconnect the
/// subscription resumes from the last event yielded; a watcher that cannot
/// resume starts over with RESET and a snapshot, which [`Mirror`] handles.
///
/// `connected` is told of each connection state change, for status pages.
pub fn subscribe(
    channel: Channel,
    kinds: Vec<Kind>,
    subscriber: impl Into<String>,
    shutdown: CancellationToken,
    connected: Option<tokio::sync::watch::Sender<bool>>,
) -> impl Stream<Item = WatchEvent> + Send + 'static {
    let subscriber = subscriber.into();
    // Events wait here decoded; a snapshot of 100,000 endpoints would
    // otherwise sit in memory twice while the consumer catches up.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut client = WatcherClient::new(channel).max_decoding_message_size(64 << 20);
        let mut resume = ResumePoint::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let set_connected = |up: bool| {
            if let Some(c) = &connected {
                c.send_replace(up);
            }
        };
        loop {
            let request = SubscribeRequest {
                kinds: kinds.iter().map(|k| *k as i32).collect(),
                epoch: resume.epoch.clone(),
                since_revision: resume.revision,
                subscriber: subscriber.clone(),
            };
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = client.subscribe(request) => r,
            };
            match attempt {
                Ok(response) => {
                    set_connected(true);
                    let mut stream = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            n = stream.message() => n,
                        };
                        match next {
                            Ok(Some(event)) => {
                                backoff.reset();
                                resume.observe(&event);
                                if tx.send(event).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {
                                tracing::warn!("watcher closed the subscription; resubscribing");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(%status, "watcher subscription broke; resubscribing");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(%status, "watcher unavailable");
                }
            }
            set_connected(false);
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).fuse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::watcher::v1::{Namespace, ObjectMeta, Reset, Synced};

    fn ns(name: &str, label: &str) -> Resource {
        Resource {
            kind: Some(resource::Kind::Namespace(Namespace {
                meta: Some(ObjectMeta {
                    name: name.into(),
                    labels: [("l".to_string(), label.to_string())].into(),
                    ..Default::default()
                }),
            })),
        }
    }

    fn ev(event: Event) -> WatchEvent {
        WatchEvent {
            epoch: "e".into(),
            revision: 1,
            event: Some(event),
        }
    }

    #[test]
    fn a_snapshot_is_applied_whole_and_reports_only_differences() {
        let mut m = Mirror::with_objects([ns("a", "1"), ns("b", "1")]);
        assert_eq!(m.apply(&ev(Event::Reset(Reset {}))), Applied::Nothing);
        assert_eq!(m.apply(&ev(Event::Upsert(ns("a", "1")))), Applied::Nothing);
        assert_eq!(m.apply(&ev(Event::Upsert(ns("c", "1")))), Applied::Nothing);
        // Until SYNCED the old state stays visible.
        assert_eq!(m.len(), 2);
        let changed = m.apply(&ev(Event::Synced(Synced {})));
        assert_eq!(
            changed,
            Applied::Changed(vec![
                ObjKey::new(Kind::Namespace, "", "b"),
                ObjKey::new(Kind::Namespace, "", "c")
            ])
        );
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn a_snapshot_broken_off_is_not_resumed() {
        let at = |revision, event| WatchEvent {
            epoch: "e".into(),
            revision,
            event: Some(event),
        };
        let mut r = ResumePoint::new();
        r.observe(&at(5, Event::Reset(Reset {})));
        r.observe(&at(5, Event::Upsert(ns("a", "1"))));
        // Mid-snapshot: a reconnect must ask for a new snapshot.
        assert_eq!((r.epoch.as_str(), r.revision), ("", 0));
        r.observe(&at(5, Event::Synced(Synced {})));
        assert_eq!((r.epoch.as_str(), r.revision), ("e", 5));
        r.observe(&at(6, Event::Upsert(ns("a", "2"))));
        assert_eq!((r.epoch.as_str(), r.revision), ("e", 6));
    }

    #[test]
    fn deltas_report_real_changes_only() {
        let mut m = Mirror::new();
        assert!(!m.is_synced());
        m.apply(&ev(Event::Synced(Synced {})));
        assert!(m.is_synced());
        assert!(matches!(
            m.apply(&ev(Event::Upsert(ns("a", "1")))),
            Applied::Changed(_)
        ));
        assert_eq!(m.apply(&ev(Event::Upsert(ns("a", "1")))), Applied::Nothing);
        assert!(matches!(
            m.apply(&ev(Event::Upsert(ns("a", "2")))),
            Applied::Changed(_)
        ));
        let key = ObjKey::new(Kind::Namespace, "", "a").to_proto();
        assert!(matches!(
            m.apply(&ev(Event::Delete(key.clone()))),
            Applied::Changed(_)
        ));
        assert_eq!(m.apply(&ev(Event::Delete(key))), Applied::Nothing);
        assert_eq!(m.of_kind(Kind::Namespace).count(), 0);
    }
}

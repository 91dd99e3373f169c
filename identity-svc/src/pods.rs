//! Follows Pods and Namespaces through svc-watcher and holds one reference
//! per pod (owner `pod:<namespace>/<name>`) on the identity of its security
//! labels, the same set every datapath computes with
//! [`weft_common::labels::security_labels`].
//!
//! Nothing is decided before the mirror holds a complete state, so a pod
//! missing from a half-received snapshot keeps its reference. Each complete
//! snapshot reconciles every pod owner (releasing those of pods deleted while
//! the service was down); deltas reconcile only the pods they touch, or every
//! pod of a namespace whose labels changed.
//!
//! Owners under `pod:` belong to this reconciler: a client that allocates
//! with such an owner holds the same single reference, and it is released
//! once the synced state has no such pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use weft_common::{
    backoff,
    labels::security_labels,
    watch::{Applied, Mirror, ObjKey},
};
use weft_proto::watcher::v1::{Kind, Pod, WatchEvent, resource, watch_event::Event};

use crate::{
    state::Identities,
    store::IdentityStore,
    table::{Change, Labels, Table},
};

/// The owner prefix of references held for pods.
pub const POD_OWNER_PREFIX: &str = "pod:";

/// The most events applied before reconciling.
const MAX_BATCH: usize = 1024;

/// The owner of a pod's reference.
pub fn pod_owner(namespace: &str, name: &str) -> String {
    format!("{POD_OWNER_PREFIX}{namespace}/{name}")
}

/// What needs reconciling.
#[derive(Debug, Default)]
pub struct Dirty {
    all: bool,
    pods: BTreeSet<(String, String)>,
    namespaces: BTreeSet<String>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        !self.all && self.pods.is_empty() && self.namespaces.is_empty()
    }

    /// Adds what `other` names (work that could not be done yet).
    fn merge(&mut self, other: Dirty) {
        self.all |= other.all;
        self.pods.extend(other.pods);
        self.namespaces.extend(other.namespaces);
    }

    /// Notes what one event changed.
    pub fn note(&mut self, applied: Applied, event: &WatchEvent) {
        if matches!(event.event, Some(Event::Synced(_))) {
            self.all = true;
        }
        if let Applied::Changed(keys) = applied {
            for key in keys {
                match key.kind {
                    Kind::Pod => {
                        self.pods.insert((key.namespace, key.name));
                    }
                    Kind::Namespace => {
                        self.namespaces.insert(key.name);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Runs until `events` ends or `shutdown` fires. Work the store refused
/// (an API outage) is kept and tried again after a back-off, or with the
/// next event, whichever comes first.
pub async fn follow<S: IdentityStore>(
    ids: Arc<Identities<S>>,
    events: impl Stream<Item = WatchEvent> + Send,
    shutdown: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    let mut mirror = Mirror::new();
    let mut dirty = Dirty::default();
    let mut backoff = backoff::store_retry();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => Some(e),
            _ = backoff::sleep_until(retry_at), if retry_at.is_some() => None,
        };
        if let Some(first) = next {
            let Some(first) = first else { return };
            dirty.note(mirror.apply(&first), &first);
            let mut batched = 1;
            while batched < MAX_BATCH {
                match events.next().now_or_never() {
                    Some(Some(event)) => {
                        dirty.note(mirror.apply(&event), &event);
                        batched += 1;
                    }
                    _ => break,
                }
            }
        }
        if mirror.is_synced() && !dirty.is_empty() {
            let work = std::mem::take(&mut dirty);
            match ids
                .update(|t, now, c| reconcile(t, &mirror, &work, now, c))
                .await
            {
                Ok(()) => {
                    backoff.reset();
                    retry_at = None;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "pod references not written; trying again");
                    dirty.merge(work);
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
    }
}

/// Brings the pod owners named by `dirty` in line with the mirror.
pub fn reconcile(t: &mut Table, mirror: &Mirror, dirty: &Dirty, now: Instant, c: &mut Change) {
    let mut wants: BTreeMap<String, Option<Labels>> = BTreeMap::new();
    if dirty.all {
        for (key, _) in mirror.of_kind(Kind::Pod) {
            wants.insert(
                pod_owner(&key.namespace, &key.name),
                desired(mirror, &key.namespace, &key.name),
            );
        }
        let held: Vec<String> = t
            .owners_with_prefix(POD_OWNER_PREFIX)
            .map(|(o, _)| o.to_string())
            .collect();
        for owner in held {
            wants.entry(owner).or_insert(None);
        }
    } else {
        for (ns, name) in &dirty.pods {
            wants.insert(pod_owner(ns, name), desired(mirror, ns, name));
        }
        for ns in &dirty.namespaces {
            for (key, _) in mirror
                .of_kind(Kind::Pod)
                .filter(|(k, _)| &k.namespace == ns)
            {
                wants.insert(
                    pod_owner(&key.namespace, &key.name),
                    desired(mirror, &key.namespace, &key.name),
                );
            }
        }
    }
    for (owner, want) in wants {
        match want {
            Some(labels) => {
                let current = t.owner(&owner).and_then(|id| t.labels(id));
                if current == Some(&labels) {
                    continue;
                }
                if let Err(e) = t.allocate(labels, Some(&owner), now, c) {
                    tracing::warn!(%owner, error = %e, "pod gets no new identity; it keeps any it had");
                }
            }
            None => {
                t.release(&owner, now, c);
            }
        }
    }
}

/// The security labels a pod in the mirror should hold an identity for;
/// `None` when it should hold none (gone, host network, finished).
fn desired(mirror: &Mirror, namespace: &str, name: &str) -> Option<Labels> {
    let pod = match mirror.get(&ObjKey::new(Kind::Pod, namespace, name))?.kind {
        Some(resource::Kind::Pod(p)) => p,
        _ => return None,
    };
    if !holds_identity(&pod) {
        return None;
    }
    let no_labels = BTreeMap::new();
    let pod_labels = pod.meta.as_ref().map_or(&no_labels, |m| &m.labels);
    let namespace_object = mirror
        .get(&ObjKey::new(Kind::Namespace, "", namespace))
        .and_then(|r| r.kind);
    let ns_labels = match &namespace_object {
        Some(resource::Kind::Namespace(ns)) => ns.meta.as_ref().map_or(&no_labels, |m| &m.labels),
        _ => &no_labels,
    };
    Some(security_labels(namespace, pod_labels, ns_labels))
}

/// Host-network pods share the node's identity; finished pods send nothing.
fn holds_identity(pod: &Pod) -> bool {
    !pod.host_network && !matches!(pod.phase.as_str(), "Succeeded" | "Failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::watcher::v1::{Namespace, ObjectMeta, Resource, ResourceKey, Synced};

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> Option<ObjectMeta> {
        Some(ObjectMeta {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    }

    fn pod(ns: &str, name: &str, app: &str, host_network: bool) -> Resource {
        Resource {
            kind: Some(resource::Kind::Pod(Pod {
                meta: meta(ns, name, &[("app", app)]),
                host_network,
                phase: "Running".into(),
                ..Default::default()
            })),
        }
    }

    fn namespace(name: &str, team: &str) -> Resource {
        Resource {
            kind: Some(resource::Kind::Namespace(Namespace {
                meta: meta("", name, &[("team", team)]),
            })),
        }
    }

    fn ev(e: Event) -> WatchEvent {
        WatchEvent {
            epoch: "e".into(),
            revision: 1,
            event: Some(e),
        }
    }

    /// Applies events and reconciles like the follower does.
    fn feed(t: &mut Table, m: &mut Mirror, events: Vec<Event>) {
        let mut dirty = Dirty::default();
        for e in events {
            let e = ev(e);
            dirty.note(m.apply(&e), &e);
        }
        if m.is_synced() {
            reconcile(t, m, &dirty, Instant::now(), &mut Change::default());
        }
    }

    #[test]
    fn pods_hold_their_identity_and_follow_namespace_labels() {
        let mut t = Table::default();
        let mut m = Mirror::new();
        feed(
            &mut t,
            &mut m,
            vec![
                Event::Upsert(namespace("shop", "a")),
                Event::Upsert(pod("shop", "web-1", "web", false)),
                Event::Upsert(pod("shop", "web-2", "web", false)),
                Event::Upsert(pod("shop", "db", "db", false)),
                Event::Upsert(pod("shop", "agent", "agent", true)),
            ],
        );
        // Nothing before SYNCED.
        assert_eq!(t.len(), 0);
        feed(&mut t, &mut m, vec![Event::Synced(Synced {})]);
        let web = t.owner("pod:shop/web-1").expect("web-1 holds");
        assert_eq!(t.owner("pod:shop/web-2"), Some(web));
        assert_ne!(t.owner("pod:shop/db"), Some(web));
        assert_eq!(t.owner("pod:shop/agent"), None);
        assert_eq!(
            t.labels(web)
                .and_then(|l| l.get("k8s:io.weft.k8s.namespace.labels.team"))
                .map(String::as_str),
            Some("a")
        );
        assert_eq!(t.get(web).map(|i| i.references), Some(2));

        // The namespace's labels change: its pods move to a new identity.
        feed(&mut t, &mut m, vec![Event::Upsert(namespace("shop", "b"))]);
        let web_b = t.owner("pod:shop/web-1").expect("still holds");
        assert_ne!(web_b, web);
        assert_eq!(t.get(web).map(|i| i.references), Some(0));

        // A pod goes: its reference goes.
        feed(
            &mut t,
            &mut m,
            vec![Event::Delete(ResourceKey {
                kind: Kind::Pod as i32,
                namespace: "shop".into(),
                name: "web-2".into(),
            })],
        );
        assert_eq!(t.owner("pod:shop/web-2"), None);
        assert_eq!(t.get(web_b).map(|i| i.references), Some(1));
    }

    #[test]
    fn a_new_snapshot_releases_pods_that_went_away_only_once_complete() {
        let mut t = Table::default();
        let now = Instant::now();
        // Held from before a restart.
        let labels = security_labels("x", &BTreeMap::new(), &BTreeMap::new());
        t.allocate(labels, Some("pod:x/gone"), now, &mut Change::default())
            .expect("free");
        let mut m = Mirror::new();
        feed(
            &mut t,
            &mut m,
            vec![
                Event::Reset(Default::default()),
                Event::Upsert(pod("x", "here", "a", false)),
            ],
        );
        assert!(t.owner("pod:x/gone").is_some());
        feed(&mut t, &mut m, vec![Event::Synced(Synced {})]);
        assert!(t.owner("pod:x/gone").is_none());
        assert!(t.owner("pod:x/here").is_some());
    }
}

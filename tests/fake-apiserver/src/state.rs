//! The objects, the resource versions and the event log, behind one lock.
//!
//! Like etcd, one counter numbers every write: an object's
//! `metadata.resourceVersion` is the revision of its last write, a list's is
//! the revision it was read at, and the log of recent writes lets a watch
//! resume from any revision still in it. Older revisions are "compacted": a
//! watch from there gets `410 Gone`, as from the real server.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::selector::{FieldSelector, LabelSelector};

/// group, version, plural: what a URL path names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Gvr {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
}

impl Gvr {
    pub(crate) fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }

    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// A kind the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResourceType {
    pub(crate) gvr: Gvr,
    pub(crate) kind: String,
    pub(crate) namespaced: bool,
    /// Defined by a CustomResourceDefinition: updates must carry a
    /// resourceVersion, as for every custom resource on the real server.
    pub(crate) custom: bool,
    /// The `status` subresource is enabled: the main endpoint ignores
    /// `.status` and `/status` changes nothing else.
    pub(crate) status_subresource: bool,
}

/// The built-in kinds (the ones weft reads and writes).
pub(crate) fn builtin_types() -> Vec<ResourceType> {
    let t = |g: &str, v: &str, p: &str, k: &str, namespaced: bool| ResourceType {
        gvr: Gvr::new(g, v, p),
        kind: k.into(),
        namespaced,
        custom: false,
        status_subresource: true,
    };
    vec![
        t("", "v1", "namespaces", "Namespace", false),
        t("", "v1", "nodes", "Node", false),
        t("", "v1", "pods", "Pod", true),
        t("", "v1", "services", "Service", true),
        t("", "v1", "configmaps", "ConfigMap", true),
        t(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        t(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
        ),
        t("coordination.k8s.io", "v1", "leases", "Lease", true),
        t(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        ),
    ]
}

/// The kinds a CustomResourceDefinition defines (one per served version).
pub(crate) fn types_of_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let s = |p: &str| spec.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let (group, plural, kind) = (s("/group"), s("/names/plural"), s("/names/kind"));
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Err("spec.group, spec.names.plural and spec.names.kind are required".into());
    }
    let namespaced = match s("/scope") {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            return Err(format!(
                "spec.scope: {other:?} is not Namespaced or Cluster"
            ));
        }
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions is required")?;
    Ok(versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| {
            Some(ResourceType {
                gvr: Gvr::new(group, v.get("name")?.as_str()?, plural),
                kind: kind.into(),
                namespaced,
                custom: true,
                status_subresource: v.pointer("/subresources/status").is_some(),
            })
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as watches see it.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) gvr: Gvr,
    pub(crate) kind: EventType,
    pub(crate) object: Arc<Value>,
    /// The object before a modification, to tell selector transitions.
    pub(crate) old: Option<Arc<Value>>,
}

/// A line for a watch stream: `{"type": ..., "object": ...}`.
pub(crate) type Frame = Arc<Value>;

pub(crate) fn frame(kind: &str, object: &Value) -> Frame {
    Arc::new(json!({"type": kind, "object": object}))
}

/// What one watch wants to see.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) gvr: Gvr,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The frame this watch gets for `event`, if any. An object that stops
    /// matching a selector is DELETED for the watch, one that starts
    /// matching is ADDED, as the real server does.
    pub(crate) fn frame_for(&self, event: &Event) -> Option<Frame> {
        if event.gvr != self.gvr {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.old.as_ref().map(|o| self.matches(o));
        let kind = match (event.kind, before, now) {
            (EventType::Modified, Some(true), true) => EventType::Modified,
            (EventType::Modified, Some(true), false) => EventType::Deleted,
            (EventType::Modified, Some(false) | None, true) => EventType::Added,
            (EventType::Modified, _, false) => return None,
            (other, _, true) => other,
            (_, _, false) => return None,
        };
        Some(frame(kind.as_str(), &event.object))
    }
}

pub(crate) struct Watcher {
    pub(crate) filter: Filter,
    pub(crate) tx: mpsc::UnboundedSender<Frame>,
}

/// Counters the tests read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub lists: u64,
    pub watches: u64,
    pub gets: u64,
    pub creates: u64,
    pub updates: u64,
    pub patches: u64,
    pub deletes: u64,
    /// 409 answers (AlreadyExists and Conflict).
    pub conflicts: u64,
    /// 410 answers and ERROR 410 watch events.
    pub gone: u64,
    /// Failures injected by [`crate::FakeApiServer::fail_next`].
    pub injected: u64,
    pub bookmarks: u64,
    /// Requests answered 503 during [`crate::FakeApiServer::set_unavailable`].
    pub unavailable: u64,
}

/// An injected failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Only requests with this method (`GET`, `POST`, ...); any when `None`.
    pub method: Option<String>,
    /// Only requests whose path and query contain this (`watch=true`
    /// picks watches).
    pub path_contains: Option<String>,
    /// The HTTP status to answer with.
    pub code: u16,
    pub remaining: usize,
}

pub(crate) struct Inner {
    pub(crate) rv: u64,
    pub(crate) types: BTreeMap<Gvr, ResourceType>,
    /// Per kind: (namespace, name) → object, `metadata.resourceVersion` set.
    pub(crate) objects: BTreeMap<Gvr, BTreeMap<(String, String), Value>>,
    pub(crate) log: VecDeque<Arc<Event>>,
    pub(crate) log_limit: usize,
    /// Watches may resume from this revision on; older ones are gone.
    pub(crate) oldest_resumable: u64,
    pub(crate) watchers: Vec<Watcher>,
    pub(crate) next_uid: u64,
    pub(crate) stats: Stats,
    pub(crate) gone_next: usize,
    pub(crate) failures: Vec<Failure>,
    /// Every API request gets 503 while set.
    pub(crate) unavailable: bool,
    pub(crate) latency: Duration,
    pub(crate) bookmark_interval: Duration,
}

impl Inner {
    pub(crate) fn new(log_limit: usize, bookmark_interval: Duration) -> Self {
        let mut inner = Self {
            rv: 1,
            types: BTreeMap::new(),
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            log_limit,
            oldest_resumable: 1,
            watchers: Vec::new(),
            next_uid: 0,
            stats: Stats::default(),
            gone_next: 0,
            failures: Vec::new(),
            unavailable: false,
            latency: Duration::ZERO,
            bookmark_interval,
        };
        for t in builtin_types() {
            inner.register(t);
        }
        inner
    }

    pub(crate) fn register(&mut self, t: ResourceType) {
        self.objects.entry(t.gvr.clone()).or_default();
        self.types.insert(t.gvr.clone(), t);
    }

    pub(crate) fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
    }

    /// Records a write: assigns the next revision, stores or removes the
    /// object, logs the event and hands it to every matching watch.
    pub(crate) fn write(&mut self, gvr: &Gvr, kind: EventType, mut object: Value) -> Value {
        self.rv += 1;
        let rv = self.rv;
        set_rv(&mut object, rv);
        let key = key_of(&object);
        let objects = self.objects.entry(gvr.clone()).or_default();
        let old = match kind {
            EventType::Deleted => objects.remove(&key),
            _ => objects.insert(key, object.clone()),
        };
        let event = Arc::new(Event {
            rv,
            gvr: gvr.clone(),
            kind,
            object: Arc::new(object.clone()),
            old: old.map(Arc::new),
        });
        self.watchers.retain(|w| match w.filter.frame_for(&event) {
            Some(f) => w.tx.send(f).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.log.push_back(event);
        while self.log.len() > self.log_limit {
            if let Some(e) = self.log.pop_front() {
                self.oldest_resumable = e.rv;
            }
        }
        object
    }

    /// Forgets the history: every watch resuming from before now gets 410.
    pub(crate) fn compact(&mut self) {
        self.log.clear();
        self.oldest_resumable = self.rv;
    }
}

pub(crate) fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

pub(crate) fn key_of(object: &Value) -> (String, String) {
    let s = |p: &str| {
        object
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

/// RFC 3339 in UTC, second precision, as metadata timestamps are.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_right() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn selector_transitions_become_adds_and_deletes() {
        let gvr = Gvr::new("", "v1", "pods");
        let filter = Filter {
            gvr: gvr.clone(),
            namespace: None,
            labels: LabelSelector::parse("app=web").expect("parses"),
            fields: FieldSelector::default(),
        };
        let pod = |app: &str| json!({"metadata": {"name": "p", "labels": {"app": app}}});
        let ev = |old: Option<Value>, new: Value| Event {
            rv: 2,
            gvr: gvr.clone(),
            kind: EventType::Modified,
            object: Arc::new(new),
            old: old.map(Arc::new),
        };
        let kind = |f: Option<Frame>| f.map(|f| f["type"].as_str().unwrap_or_default().to_string());
        assert_eq!(
            kind(filter.frame_for(&ev(Some(pod("db")), pod("web")))),
            Some("ADDED".into())
        );
        assert_eq!(
            kind(filter.frame_for(&ev(Some(pod("web")), pod("db")))),
            Some("DELETED".into())
        );
        assert_eq!(
            kind(filter.frame_for(&ev(Some(pod("web")), pod("web")))),
            Some("MODIFIED".into())
        );
        assert_eq!(kind(filter.frame_for(&ev(Some(pod("a")), pod("b")))), None);
    }
}

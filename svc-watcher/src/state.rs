//! The source-independent state store: the current objects, a monotonic
//! revision, and a bounded history of the deltas that led there.
//!
//! Sources write through two styles of API. Snapshot-style sources (the
//! manifest directory re-read after each change) hand over the whole set of
//! objects with [`StateStore::replace_all`] or [`StateStore::replace_kind_set`]
//! and the store works out what changed. Event-style sources (a Kubernetes
//! watch) call [`StateStore::apply`] per event. Either way only real changes
//! (by proto equality) take a revision, so an unchanged re-read costs
//! subscribers nothing.
//!
//! Objects are kept [`Packed`] (their protobuf encoding, shared with
//! whoever else holds them): at 10,000 Services with 100,000 endpoints the
//! decoded messages took most of svc-watcher's memory, and comparing two
//! encodings is a memcmp.
//!
//! Readers never get events pushed at them: a subscriber remembers the
//! revision it has sent up to and pulls the deltas after it from the history
//! (see [`crate::subscription`]); the store only announces the newest
//! revision. That makes "snapshot, then the deltas after it" gap-free and
//! duplicate-free by construction, and a reader that falls behind the
//! history simply starts over with a snapshot.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use tokio::sync::watch;
use weft_common::watch::{ObjKey, Packed};
use weft_proto::watcher::v1::{Kind, Resource};

use crate::{convert::kind_name, metrics::Metrics};

/// Every kind the watcher serves, in protocol order.
pub const KINDS: [Kind; 6] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::Node,
    Kind::Namespace,
    Kind::NetworkPolicy,
];

/// A set of kinds, as requested by a subscriber or replaced by a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KindSet(u8);

/// A `kinds` entry in a request that names no kind the watcher serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kinds[{index}]: {value} is not a known kind")]
pub struct UnknownKind {
    pub index: usize,
    pub value: i32,
}

impl KindSet {
    pub const fn empty() -> Self {
        Self(0)
    }

    pub fn all() -> Self {
        Self::of(KINDS)
    }

    pub fn of(kinds: impl IntoIterator<Item = Kind>) -> Self {
        let mut set = Self::empty();
        for k in kinds {
            set.insert(k);
        }
        set
    }

    /// The kinds of a request; empty means all, as the protocol says.
    pub fn from_request(kinds: &[i32]) -> Result<Self, UnknownKind> {
        if kinds.is_empty() {
            return Ok(Self::all());
        }
        let mut set = Self::empty();
        for (index, &value) in kinds.iter().enumerate() {
            match Kind::try_from(value) {
                Ok(k) if k != Kind::Unspecified => set.insert(k),
                _ => return Err(UnknownKind { index, value }),
            }
        }
        Ok(set)
    }

    pub fn insert(&mut self, kind: Kind) {
        if kind != Kind::Unspecified {
            self.0 |= 1 << (kind as i32);
        }
    }

    pub fn contains(self, kind: Kind) -> bool {
        kind != Kind::Unspecified && self.0 & (1 << (kind as i32)) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Kind> {
        KINDS.into_iter().filter(move |k| self.contains(*k))
    }
}

/// One change, as a source reports it.
// Changes are passed by value and consumed at once; boxing the common case
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace the object (its key comes from its kind and meta).
    Upsert(Resource),
    /// Remove the object, if present.
    Delete(ObjKey),
}

/// One recorded change: the revision it created and what it did.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub revision: u64,
    pub key: ObjKey,
    /// The new object; `None` for a delete.
    pub object: Option<Packed>,
}

/// The whole state of some kinds at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub objects: Vec<Packed>,
}

/// A source handed the store something it cannot key. That is a bug in the
/// source (conversion always sets kind and meta), so it is refused loudly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("object without a kind or metadata cannot be stored")]
    Unkeyed,
    #[error("{0} is outside the kinds being replaced")]
    KindOutsideSet(ObjKey),
}

#[derive(Debug, Default)]
struct Inner {
    objects: BTreeMap<ObjKey, Packed>,
    revision: u64,
    /// Deltas with consecutive revisions ending at `revision`.
    history: VecDeque<Delta>,
}

/// Objects, revisions and history behind one lock; see the module docs.
#[derive(Debug)]
pub struct StateStore {
    epoch: String,
    history_limit: usize,
    inner: RwLock<Inner>,
    revisions: watch::Sender<u64>,
    metrics: Metrics,
}

impl StateStore {
    /// An empty store with a fresh random epoch, keeping the last
    /// `history_limit` deltas for resuming subscribers.
    pub fn new(history_limit: usize, metrics: Metrics) -> Self {
        Self::with_epoch(
            format!("{:016x}", rand::random::<u64>()),
            history_limit,
            metrics,
        )
    }

    /// Like [`StateStore::new`] with a chosen epoch (tests).
    pub fn with_epoch(epoch: impl Into<String>, history_limit: usize, metrics: Metrics) -> Self {
        let (revisions, _) = watch::channel(0);
        Self {
            epoch: epoch.into(),
            history_limit,
            inner: RwLock::new(Inner::default()),
            revisions,
            metrics,
        }
    }

    /// Identifies this process's history; revisions compare only within it.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().objects.is_empty()
    }

    pub fn get(&self, key: &ObjKey) -> Option<Resource> {
        self.read().objects.get(key).map(Packed::unpack)
    }

    /// Announces the newest revision after every change.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// Applies one event from an event-style source. Returns the new
    /// revision, or `None` when the state did not change.
    pub fn apply(&self, change: Change) -> Result<Option<u64>, StateError> {
        let mut touched = BTreeSet::new();
        let revision = {
            let mut inner = self.write();
            let before = inner.revision;
            match change {
                Change::Upsert(object) => {
                    let key = ObjKey::of(&object).ok_or(StateError::Unkeyed)?;
                    self.upsert_locked(&mut inner, key, Packed::new(&object), &mut touched);
                }
                Change::Delete(key) => self.delete_locked(&mut inner, key, &mut touched),
            }
            let changed = (inner.revision != before).then_some(inner.revision);
            if changed.is_some() {
                self.announce(&inner, &touched);
            }
            changed
        };
        Ok(revision)
    }

    /// Makes the stored objects of every kind exactly `objects`. Returns the
    /// number of changes (each took one revision).
    pub fn replace_all(
        &self,
        objects: impl IntoIterator<Item = Resource>,
    ) -> Result<usize, StateError> {
        self.replace_kind_set(KindSet::all(), objects)
    }

    /// Makes the stored objects of the kinds in `kinds` exactly `objects`,
    /// leaving other kinds alone; see [`StateStore::replace_packed`].
    pub fn replace_kind_set(
        &self,
        kinds: KindSet,
        objects: impl IntoIterator<Item = Resource>,
    ) -> Result<usize, StateError> {
        let packed = objects
            .into_iter()
            .map(|o| Ok((ObjKey::of(&o).ok_or(StateError::Unkeyed)?, Packed::new(&o))))
            .collect::<Result<Vec<_>, StateError>>()?;
        self.replace_packed(kinds, packed)
    }

    /// Makes the stored objects of the kinds in `kinds` exactly `objects`
    /// (each with its key), leaving other kinds alone: upserts for new or
    /// changed objects, then deletes for those that are gone, each in key
    /// order. The whole batch is applied under one lock, so no reader sees
    /// half of it.
    pub fn replace_packed(
        &self,
        kinds: KindSet,
        objects: impl IntoIterator<Item = (ObjKey, Packed)>,
    ) -> Result<usize, StateError> {
        let mut wanted = BTreeMap::new();
        for (key, object) in objects {
            if !kinds.contains(key.kind) {
                return Err(StateError::KindOutsideSet(key));
            }
            wanted.insert(key, object);
        }
        let mut inner = self.write();
        let gone: Vec<ObjKey> = inner
            .objects
            .keys()
            .filter(|k| kinds.contains(k.kind) && !wanted.contains_key(*k))
            .cloned()
            .collect();
        let changes = wanted
            .into_iter()
            .map(|(key, object)| (key, Some(object)))
            .chain(gone.into_iter().map(|key| (key, None)));
        Ok(self.apply_locked(&mut inner, changes))
    }

    /// Applies a batch of changes, each an object's key and its new
    /// encoding (`None`: removed), under one lock, so no reader sees half of
    /// it. Returns the number of changes.
    pub fn apply_packed(
        &self,
        changes: impl IntoIterator<Item = (ObjKey, Option<Packed>)>,
    ) -> usize {
        self.apply_locked(&mut self.write(), changes)
    }

    /// Applies `changes` in order (`None`: remove) and announces the newest
    /// revision once; returns the number of changes.
    fn apply_locked(
        &self,
        inner: &mut Inner,
        changes: impl IntoIterator<Item = (ObjKey, Option<Packed>)>,
    ) -> usize {
        let mut touched = BTreeSet::new();
        let before = inner.revision;
        for (key, object) in changes {
            match object {
                Some(object) => self.upsert_locked(inner, key, object, &mut touched),
                None => self.delete_locked(inner, key, &mut touched),
            }
        }
        let changes = inner.revision - before;
        if changes > 0 {
            self.announce(inner, &touched);
        }
        usize::try_from(changes).unwrap_or(usize::MAX)
    }

    /// The current objects of `kinds`, at the current revision.
    pub fn snapshot(&self, kinds: KindSet) -> Snapshot {
        let inner = self.read();
        Snapshot {
            revision: inner.revision,
            objects: inner
                .objects
                .iter()
                .filter(|(k, _)| kinds.contains(k.kind))
                .map(|(_, v)| v.clone())
                .collect(),
        }
    }

    /// The deltas of `kinds` after revision `since`, and the revision they
    /// bring a reader to. `None` when the history no longer reaches back to
    /// `since` (or `since` is from the future): the reader needs a snapshot.
    pub fn deltas_since(&self, since: u64, kinds: KindSet) -> Option<(u64, Vec<Delta>)> {
        let inner = self.read();
        if since > inner.revision {
            return None;
        }
        if since == inner.revision {
            return Some((inner.revision, Vec::new()));
        }
        let first = inner.history.front()?.revision;
        if since + 1 < first {
            return None;
        }
        let skip = usize::try_from(since + 1 - first).ok()?;
        let deltas = inner
            .history
            .iter()
            .skip(skip)
            .filter(|d| kinds.contains(d.key.kind))
            .cloned()
            .collect();
        Some((inner.revision, deltas))
    }

    fn upsert_locked(
        &self,
        inner: &mut Inner,
        key: ObjKey,
        object: Packed,
        touched: &mut BTreeSet<Kind>,
    ) {
        if inner.objects.get(&key) == Some(&object) {
            return;
        }
        inner.objects.insert(key.clone(), object.clone());
        self.metrics.event(key.kind, "upsert");
        touched.insert(key.kind);
        self.record(inner, key, Some(object));
    }

    fn delete_locked(&self, inner: &mut Inner, key: ObjKey, touched: &mut BTreeSet<Kind>) {
        if inner.objects.remove(&key).is_none() {
            return;
        }
        self.metrics.event(key.kind, "delete");
        touched.insert(key.kind);
        self.record(inner, key, None);
    }

    fn record(&self, inner: &mut Inner, key: ObjKey, object: Option<Packed>) {
        inner.revision += 1;
        tracing::debug!(
            revision = inner.revision,
            object = %key,
            change = if object.is_some() { "upsert" } else { "delete" },
            "state changed"
        );
        inner.history.push_back(Delta {
            revision: inner.revision,
            key,
            object,
        });
        while inner.history.len() > self.history_limit {
            inner.history.pop_front();
        }
    }

    /// Updates the gauges and wakes the readers. Called with the write lock
    /// held, so announcements go out in revision order.
    fn announce(&self, inner: &Inner, touched: &BTreeSet<Kind>) {
        for kind in touched {
            let start = ObjKey::new(*kind, "", "");
            let count = inner
                .objects
                .range(start..)
                .take_while(|(k, _)| k.kind == *kind)
                .count();
            self.metrics.set_objects(*kind, count);
            tracing::trace!(kind = kind_name(*kind), count, "objects");
        }
        self.metrics.set_revision(inner.revision);
        self.revisions.send_replace(inner.revision);
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every
        // mutation is a single insert/remove/push), so poisoning is ignored.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

//! One subscriber's view of the store: what to send next.
//!
//! A subscription starts either by resuming (same epoch, revision still in
//! the history: the missed deltas, then SYNCED) or with a snapshot (RESET,
//! one UPSERT per object, SYNCED), and then follows the store by pulling the
//! deltas after the last revision it queued. A subscriber so slow that the
//! history moved past it gets RESET and a fresh snapshot in the same stream:
//! it never silently misses a change. The gRPC layer only drives
//! [`Subscription::next`]; keeping this free of transport makes the
//! protocol testable on its own.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::watch;
use weft_common::watch::{ObjKey, Packed};
use weft_proto::watcher::v1::{Reset, Synced, WatchEvent, watch_event::Event};

use crate::state::{Delta, KindSet, StateStore};

/// An event decided on but not yet sent; objects stay shared with the store
/// (and packed) until they are, so a queued snapshot costs pointers only.
#[derive(Debug)]
enum Pending {
    Reset(u64),
    Upsert(u64, Packed),
    Delete(u64, ObjKey),
    Synced(u64),
}

/// How a subscription began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The missed deltas were replayed.
    Resumed,
    /// A full snapshot was sent.
    Snapshot,
}

/// The event sequence for one subscriber; see the module docs.
#[derive(Debug)]
pub struct Subscription {
    store: Arc<StateStore>,
    kinds: KindSet,
    /// The store revision up to which events are queued.
    position: u64,
    queue: VecDeque<Pending>,
    revisions: watch::Receiver<u64>,
    start: Start,
    snapshots: u64,
}

impl Subscription {
    /// Starts a subscription for `kinds` from a client that last applied
    /// `since_revision` of `epoch` (empty / 0 for a first subscription).
    pub fn start(store: Arc<StateStore>, kinds: KindSet, epoch: &str, since_revision: u64) -> Self {
        let mut revisions = store.revisions();
        revisions.borrow_and_update();
        let mut sub = Self {
            store,
            kinds,
            position: 0,
            queue: VecDeque::new(),
            revisions,
            start: Start::Snapshot,
            snapshots: 0,
        };
        let resumable = since_revision > 0 && !epoch.is_empty() && epoch == sub.store.epoch();
        let replay = if resumable {
            sub.store.deltas_since(since_revision, kinds)
        } else {
            None
        };
        match replay {
            Some((revision, deltas)) => {
                sub.queue_deltas(deltas);
                sub.queue.push_back(Pending::Synced(revision));
                sub.position = revision;
                sub.start = Start::Resumed;
            }
            None => sub.queue_snapshot(),
        }
        sub
    }

    pub fn started(&self) -> Start {
        self.start
    }

    /// How many snapshots this subscription has sent (the first one
    /// included); more than one means the subscriber fell behind.
    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }

    /// The store revision up to which events have been decided.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next event if one is available without waiting.
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        if self.queue.is_empty() {
            self.refill();
        }
        let pending = self.queue.pop_front()?;
        Some(self.encode(pending))
    }

    /// The next event, waiting for the store to change if needed. `None`
    /// only if the store is gone.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(event) = self.try_next() {
                return Some(event);
            }
            if self.revisions.changed().await.is_err() {
                return None;
            }
        }
    }

    fn refill(&mut self) {
        // Mark the announcement seen before reading, so a change racing with
        // this read wakes `next` again rather than being slept through.
        self.revisions.borrow_and_update();
        match self.store.deltas_since(self.position, self.kinds) {
            Some((revision, deltas)) => {
                self.queue_deltas(deltas);
                self.position = revision;
            }
            None => {
                tracing::warn!(
                    position = self.position,
                    revision = self.store.revision(),
                    "subscriber fell behind the history; sending a fresh snapshot"
                );
                self.queue_snapshot();
            }
        }
    }

    fn queue_deltas(&mut self, deltas: Vec<Delta>) {
        self.queue
            .extend(deltas.into_iter().map(|d| match d.object {
                Some(object) => Pending::Upsert(d.revision, object),
                None => Pending::Delete(d.revision, d.key),
            }));
    }

    fn queue_snapshot(&mut self) {
        let snapshot = self.store.snapshot(self.kinds);
        let revision = snapshot.revision;
        self.queue.clear();
        self.queue.push_back(Pending::Reset(revision));
        self.queue.extend(
            snapshot
                .objects
                .into_iter()
                .map(|o| Pending::Upsert(revision, o)),
        );
        self.queue.push_back(Pending::Synced(revision));
        self.position = revision;
        self.snapshots += 1;
    }

    fn encode(&self, pending: Pending) -> WatchEvent {
        let (revision, event) = match pending {
            Pending::Reset(r) => (r, Event::Reset(Reset {})),
            Pending::Upsert(r, o) => (r, Event::Upsert(o.unpack())),
            Pending::Delete(r, k) => (r, Event::Delete(k.to_proto())),
            Pending::Synced(r) => (r, Event::Synced(Synced {})),
        };
        WatchEvent {
            epoch: self.store.epoch().to_string(),
            revision,
            event: Some(event),
        }
    }
}

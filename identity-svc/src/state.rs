//! The service's identity table with its store, the event feed of `Watch`
//! and the metrics, behind one lock.
//!
//! The lock is held across the store commit, so nobody (a caller, a `Watch`
//! subscriber) sees an identity or a reference before it is durable. If a
//! commit fails, memory may be ahead of the disk; rather than guess, the
//! table refuses further use and the service stops, to come back from what
//! is on disk.
//!
//! With a shared store (other replicas write too) a commit can come back
//! [`Committed::Diverged`]: the table is rebuilt from the store's answer,
//! subscribers are told what differs, and the operation runs again on the
//! true table, a few rounds at most. Changes other replicas make reach
//! this one's table and `Watch` stream through [`Identities::resync`].

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, MutexGuard, broadcast};
use weft_proto::identity::v1::{IdentityEvent, SecurityIdentity, identity_event::Event};

use crate::{
    metrics::Metrics,
    store::{Committed, IdentityStore, StoreError},
    table::{Change, Exhausted, Labels, Table},
};

/// How often one operation runs again after losing races to other
/// replicas before it gives up (the caller may retry).
const MAX_ROUNDS: usize = 16;

/// How many events a `Watch` subscriber may fall behind before it is cut off.
const EVENT_BUFFER: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an earlier store write failed; the service is stopping")]
    Failed,
    #[error("other replicas kept changing the identities; try again")]
    Contended,
}

struct Inner {
    table: Table,
    failed: bool,
}

pub struct Identities<S> {
    store: S,
    inner: Mutex<Inner>,
    events: broadcast::Sender<IdentityEvent>,
    metrics: Metrics,
    grace: Duration,
}

impl<S: IdentityStore> Identities<S> {
    /// Loads the table on record; identities without references start their
    /// grace period now.
    pub async fn open(store: S, metrics: Metrics, grace: Duration) -> Result<Self, StoreError> {
        Self::open_with(store, Table::default(), metrics, grace).await
    }

    /// Like [`Identities::open`], starting from `table`'s range (tests use a
    /// small one).
    pub async fn open_with(
        store: S,
        mut table: Table,
        metrics: Metrics,
        grace: Duration,
    ) -> Result<Self, StoreError> {
        let stored = store.load().await?;
        let owners = stored.owners.len();
        table.restore(stored.identities, stored.owners, Instant::now());
        tracing::info!(identities = table.len(), owners, "identities restored");
        metrics.identities.set(table.len() as i64);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            store,
            inner: Mutex::new(Inner {
                table,
                failed: false,
            }),
            events,
            metrics,
            grace,
        })
    }

    /// Runs `f` on the table, makes what it changed durable, then reports it
    /// (metrics, logs, `Watch`). What `f` changed is committed even when it
    /// returns an error for part of its work. With a shared store that
    /// another writer changed first, the table is rebuilt from the store and
    /// `f` runs again, until it changes nothing or its changes hold.
    pub async fn update<T>(
        &self,
        mut f: impl FnMut(&mut Table, Instant, &mut Change) -> T,
    ) -> Result<T, IdentityError> {
        let mut inner = self.usable().await?;
        for _ in 0..MAX_ROUNDS {
            let mut change = Change::default();
            let out = f(&mut inner.table, Instant::now(), &mut change);
            if change.ops.is_empty() {
                self.publish(&inner.table, &change);
                return Ok(out);
            }
            match self.store.commit(&change.ops).await {
                Ok(Committed::AsPlanned) => {
                    self.publish(&inner.table, &change);
                    return Ok(out);
                }
                Ok(Committed::Diverged(stored)) => {
                    tracing::info!(
                        "another replica came first; running again on the store's table"
                    );
                    self.replace_table(&mut inner, stored);
                }
                Err(e) => {
                    inner.failed = true;
                    return Err(e.into());
                }
            }
        }
        Err(IdentityError::Contended)
    }

    /// Reloads the table from the store (another replica changed it) and
    /// tells subscribers what differs.
    pub async fn resync(&self) -> Result<(), IdentityError> {
        let mut inner = self.usable().await?;
        match self.store.load().await {
            Ok(stored) => {
                self.replace_table(&mut inner, stored);
                Ok(())
            }
            Err(e) => {
                inner.failed = true;
                Err(e.into())
            }
        }
    }

    /// Makes the table what the store holds and publishes the difference.
    fn replace_table(&self, inner: &mut Inner, stored: crate::store::Stored) {
        let next = inner
            .table
            .rebuilt(stored.identities, stored.owners, Instant::now());
        let before: BTreeMap<u32, SecurityIdentity> =
            inner.table.list().into_iter().map(|i| (i.id, i)).collect();
        let after: BTreeMap<u32, SecurityIdentity> =
            next.list().into_iter().map(|i| (i.id, i)).collect();
        for (id, identity) in &after {
            if before.get(id) != Some(identity) {
                let _ = self.events.send(IdentityEvent {
                    event: Some(Event::Upsert(identity.clone())),
                });
            }
        }
        for id in before.keys().filter(|id| !after.contains_key(*id)) {
            let _ = self.events.send(IdentityEvent {
                event: Some(Event::Delete(*id)),
            });
        }
        inner.table = next;
        self.metrics.identities.set(inner.table.len() as i64);
    }

    fn publish(&self, table: &Table, change: &Change) {
        for id in &change.created {
            let labels = table.labels(*id);
            tracing::info!(id, ?labels, "identity allocated");
        }
        for id in &change.deleted {
            tracing::info!(id, "identity collected");
        }
        if change.exhausted > 0 {
            tracing::error!(
                refused = change.exhausted,
                "identity range exhausted: every number is in use; the label set gets none until identities are collected"
            );
        }
        self.metrics.allocations.inc_by(change.created.len() as u64);
        self.metrics
            .gc_collected
            .inc_by(change.deleted.len() as u64);
        self.metrics.exhausted.inc_by(u64::from(change.exhausted));
        self.metrics.identities.set(table.len() as i64);
        for id in &change.upserted {
            if let Some(identity) = table.get(*id) {
                let _ = self.events.send(IdentityEvent {
                    event: Some(Event::Upsert(identity)),
                });
            }
        }
        for id in &change.deleted {
            let _ = self.events.send(IdentityEvent {
                event: Some(Event::Delete(*id)),
            });
        }
    }

    /// The identity of `labels`, allocated if new; with an owner, the owner
    /// holds it.
    pub async fn allocate(
        &self,
        labels: Labels,
        owner: Option<&str>,
    ) -> Result<SecurityIdentity, IdentityError> {
        let got = self
            .update(|t, now, c| {
                t.allocate(labels.clone(), owner, now, c)
                    .map(|id| t.get(id))
            })
            .await??;
        got.ok_or(IdentityError::Failed)
    }

    /// Drops the owner's reference; returns the identities it left
    /// unreferenced.
    pub async fn release(&self, owner: &str) -> Result<Vec<u32>, IdentityError> {
        self.update(|t, now, c| {
            t.release(owner, now, c);
            c.unreferenced.clone()
        })
        .await
    }

    /// Collects the identities unreferenced for the grace period.
    pub async fn collect(&self) -> Result<usize, IdentityError> {
        let grace = self.grace;
        self.update(|t, now, c| {
            t.collect(now, grace, c);
            c.deleted.len()
        })
        .await
    }

    pub async fn get(&self, id: u32) -> Result<Option<SecurityIdentity>, IdentityError> {
        Ok(self.usable().await?.table.get(id))
    }

    pub async fn list(&self) -> Result<Vec<SecurityIdentity>, IdentityError> {
        Ok(self.usable().await?.table.list())
    }

    /// The whole table, and a feed of the changes after it: both taken under
    /// the lock, so nothing falls between them.
    pub async fn watch(
        &self,
    ) -> Result<(Vec<SecurityIdentity>, broadcast::Receiver<IdentityEvent>), IdentityError> {
        let inner = self.usable().await?;
        Ok((inner.table.list(), self.events.subscribe()))
    }

    async fn usable(&self) -> Result<MutexGuard<'_, Inner>, IdentityError> {
        let inner = self.inner.lock().await;
        if inner.failed {
            return Err(IdentityError::Failed);
        }
        Ok(inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledIdentityStore;

    fn labels(app: &str) -> Labels {
        [("k8s:app".to_string(), app.to_string())].into()
    }

    async fn open(dir: &std::path::Path) -> Identities<SledIdentityStore> {
        let store = SledIdentityStore::open(dir).expect("open");
        Identities::open(store, Metrics::default(), Duration::ZERO)
            .await
            .expect("load")
    }

    #[tokio::test]
    async fn identities_and_references_survive_a_restart_and_watch_sees_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b);
        {
            let ids = open(dir.path()).await;
            let (snapshot, mut feed) = ids.watch().await.expect("watch");
            assert!(snapshot.iter().all(|i| i.reserved));
            a = ids.allocate(labels("a"), Some("o1")).await.expect("a");
            b = ids.allocate(labels("b"), None).await.expect("b");
            assert_eq!((a.id, a.references), (256, 1));
            let Some(Event::Upsert(first)) = feed.recv().await.expect("event").event else {
                panic!("expected an upsert")
            };
            assert_eq!(first, a);
        }
        let ids = open(dir.path()).await;
        let again = ids.get(a.id).await.expect("get").expect("present");
        assert_eq!(again, a);
        // b had no owner: with a zero grace it goes at the first sweep, a
        // (still referenced) stays.
        assert_eq!(ids.collect().await.expect("gc"), 1);
        assert!(ids.get(b.id).await.expect("get").is_none());
        assert_eq!(ids.release("o1").await.expect("release"), vec![a.id]);
        assert_eq!(ids.collect().await.expect("gc"), 1);
        assert!(ids.list().await.expect("list").iter().all(|i| i.reserved));
    }
}

//! The service's identity table with its store, the event feed of `Watch`
//! and the metrics.
//!
//! Two copies of the table, so that no reader ever waits for the store:
//!
//! - the *working* table, behind an async mutex that serialises the
//!   writers: an operation plans on it, and the mutex is held while its
//!   plan is committed (each plan must start from the last one's result,
//!   and the store's optimistic loops expect one writer per replica);
//! - the *published* table, behind a lock held only for memory work and
//!   never across a store call: what `Get`, `List` and `Watch` answer from,
//!   always the table as last committed, so nobody sees an identity or a
//!   reference before it is durable. After a commit the operation runs
//!   again on it (it is deterministic, and both copies were equal), and its
//!   changes go to `Watch` subscribers under the same lock.
//!
//! During an API outage reads keep being answered from memory; writes fail
//! once the store's retry budget is spent. If a commit fails, the working
//! copy may be ahead of the store; it is marked stale and reloaded from the
//! store before the next write (nothing of it was published).
//!
//! With a shared store (other replicas write too) a commit can come back
//! [`Committed::Diverged`]: both copies are rebuilt from the store's answer,
//! subscribers are told what differs, and the operation runs again on the
//! true table, a few rounds at most. Changes other replicas make reach
//! this one's table and `Watch` stream through [`Identities::resync`].

use std::{
    collections::BTreeMap,
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, broadcast};
use weft_proto::identity::v1::{IdentityEvent, SecurityIdentity, identity_event::Event};

use crate::{
    metrics::Metrics,
    store::{Committed, IdentityStore, StoreError, Stored},
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
    #[error("the identity was allocated but is gone from the table")]
    Vanished,
    #[error("other replicas kept changing the identities; try again")]
    Contended,
}

/// The writers' side.
struct Writer {
    table: Table,
    /// A commit failed: the table may be ahead of the store.
    stale: bool,
}

pub struct Identities<S> {
    store: S,
    writer: Mutex<Writer>,
    published: RwLock<Table>,
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
            published: RwLock::new(table.clone()),
            writer: Mutex::new(Writer {
                table,
                stale: false,
            }),
            events,
            metrics,
            grace,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // whole table.
        self.published.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.published.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the table, makes what it changed durable, then reports it
    /// (metrics, logs, `Watch`). What `f` changed is committed even when it
    /// returns an error for part of its work. With a shared store that
    /// another writer changed first, the table is rebuilt from the store and
    /// `f` runs again, until it changes nothing or its changes hold. `f`
    /// must be deterministic: it runs once more on the published copy.
    pub async fn update<T>(
        &self,
        mut f: impl FnMut(&mut Table, Instant, &mut Change) -> T,
    ) -> Result<T, IdentityError> {
        let mut w = self.writer.lock().await;
        if w.stale {
            let stored = self.store.load().await?;
            tracing::info!("reloaded the identities after a failed write");
            self.replace_table(&mut w, stored);
        }
        for _ in 0..MAX_ROUNDS {
            let now = Instant::now();
            let mut change = Change::default();
            let out = f(&mut w.table, now, &mut change);
            if !change.ops.is_empty() {
                match self.store.commit(&change.ops).await {
                    Ok(Committed::AsPlanned) => {}
                    Ok(Committed::Diverged(stored)) => {
                        tracing::info!(
                            "another replica came first; running again on the store's table"
                        );
                        self.replace_table(&mut w, stored);
                        continue;
                    }
                    Err(e) => {
                        w.stale = true;
                        return Err(e.into());
                    }
                }
            }
            let mut published = self.write();
            let mut again = Change::default();
            f(&mut published, now, &mut again);
            if again.ops != change.ops {
                tracing::error!(
                    "an operation planned differently on the published table; publishing the working copy"
                );
                *published = w.table.clone();
            }
            self.publish(&published, &change);
            return Ok(out);
        }
        Err(IdentityError::Contended)
    }

    /// Reloads the table from the store (another replica changed it) and
    /// tells subscribers what differs. Readers are not held up meanwhile.
    pub async fn resync(&self) -> Result<(), IdentityError> {
        let mut w = self.writer.lock().await;
        let stored = self.store.load().await?;
        self.replace_table(&mut w, stored);
        Ok(())
    }

    /// Makes both copies what the store holds and publishes the difference.
    fn replace_table(&self, w: &mut Writer, stored: Stored) {
        let next = w
            .table
            .rebuilt(stored.identities, stored.owners, Instant::now());
        let mut published = self.write();
        let before: BTreeMap<u32, SecurityIdentity> =
            published.list().into_iter().map(|i| (i.id, i)).collect();
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
        *published = next.clone();
        w.table = next;
        w.stale = false;
        self.metrics.identities.set(published.len() as i64);
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
        got.ok_or(IdentityError::Vanished)
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

    /// One identity, as last committed; never waits for the store.
    pub fn get(&self, id: u32) -> Option<SecurityIdentity> {
        self.read().get(id)
    }

    /// The whole table, as last committed; never waits for the store.
    pub fn list(&self) -> Vec<SecurityIdentity> {
        self.read().list()
    }

    /// The whole table, and a feed of the changes after it: both taken under
    /// the published lock, so nothing falls between them.
    pub fn watch(&self) -> (Vec<SecurityIdentity>, broadcast::Receiver<IdentityEvent>) {
        let table = self.read();
        (table.list(), self.events.subscribe())
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
            let (snapshot, mut feed) = ids.watch();
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
        let again = ids.get(a.id).expect("present");
        assert_eq!(again, a);
        // b had no owner: with a zero grace it goes at the first sweep, a
        // (still referenced) stays.
        assert_eq!(ids.collect().await.expect("gc"), 1);
        assert!(ids.get(b.id).is_none());
        assert_eq!(ids.release("o1").await.expect("release"), vec![a.id]);
        assert_eq!(ids.collect().await.expect("gc"), 1);
        assert!(ids.list().iter().all(|i| i.reserved));
    }

    /// The sled store, with commits that wait until the test lets them go.
    struct Held(SledIdentityStore, std::sync::Arc<tokio::sync::Semaphore>);

    impl IdentityStore for Held {
        async fn load(&self) -> Result<Stored, StoreError> {
            self.0.load().await
        }

        async fn commit(&self, ops: &[crate::store::Op]) -> Result<Committed, StoreError> {
            let _go = self.1.acquire().await;
            self.0.commit(ops).await
        }
    }

    #[tokio::test]
    async fn reads_are_answered_while_a_write_waits_for_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let store = Held(
            SledIdentityStore::open(dir.path()).expect("open"),
            gate.clone(),
        );
        let ids = std::sync::Arc::new(
            Identities::open(store, Metrics::default(), Duration::ZERO)
                .await
                .expect("load"),
        );
        let (_, mut feed) = ids.watch();
        let pending = tokio::spawn({
            let ids = ids.clone();
            async move { ids.allocate(labels("a"), Some("o1")).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pending.is_finished());
        // Nothing of the pending write shows, and nothing waits for it.
        assert!(ids.list().iter().all(|i| i.reserved));
        assert!(ids.get(256).is_none());
        let (snapshot, _) = ids.watch();
        assert!(snapshot.iter().all(|i| i.reserved));
        assert!(feed.try_recv().is_err());

        gate.add_permits(1);
        let a = pending.await.expect("task").expect("allocated");
        assert_eq!(ids.get(a.id), Some(a.clone()));
        let Some(Event::Upsert(first)) = feed.recv().await.expect("event").event else {
            panic!("expected an upsert")
        };
        assert_eq!(first, a);
    }
}

//! Following a store's own custom resources, to hear of what other replicas
//! wrote.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use kube::{Api, runtime::watcher};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::retry::{ApiHealth, backed_off, watch_unreachable};

/// Watches `api` until `shutdown` and ticks `tx` for every change `known`
/// does not recognise (`known(object, deleted)`: this replica wrote it, or
/// already saw it gone), and after every (re)list. Every event and every
/// watch error goes to `health`, so an outage shows while nobody writes.
pub async fn changes<K>(
    api: Api<K>,
    health: ApiHealth,
    known: impl Fn(&K, bool) -> bool,
    tx: watch::Sender<u64>,
    shutdown: CancellationToken,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).into_owned();
    let mut events = backed_off(watcher(api, watcher::Config::default())).boxed();
    let mut broken = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        let changed = match event {
            None => return,
            Some(Err(e)) => {
                if watch_unreachable(&e) {
                    health.failed(&e);
                } else {
                    health.succeeded();
                }
                // Retried about every second: the first error of a break
                // is a warning, the others are for debugging.
                if broken {
                    tracing::debug!(%kind, error = %e, "watch error; retrying");
                } else {
                    tracing::warn!(%kind, error = %e, "watch error; retrying every second at most");
                }
                broken = true;
                false
            }
            Some(Ok(event)) => {
                health.succeeded();
                if std::mem::take(&mut broken) {
                    tracing::info!(%kind, "watch working again");
                }
                match event {
                    watcher::Event::Apply(o) => !known(&o, false),
                    watcher::Event::Delete(o) => !known(&o, true),
                    watcher::Event::InitDone => true,
                    watcher::Event::Init | watcher::Event::InitApply(_) => false,
                }
            }
        };
        if changed {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// The `known` of [`changes`] for a store that remembers, per object key,
/// the revision it last read or wrote: an object is known when it is at
/// that revision (and not deleted), or when a deleted one is already
/// forgotten. `key` names an object (`None`: not one of the store's, so
/// nothing to react to); `rv` reads the remembered revision.
pub fn known_at_revision<K, Key: Ord, V>(
    seen: Arc<Mutex<BTreeMap<Key, V>>>,
    key: impl Fn(&K) -> Option<Key>,
    rv: impl Fn(&V) -> u64,
) -> impl Fn(&K, bool) -> bool
where
    K: kube::Resource,
{
    move |o: &K, deleted: bool| {
        let Some(k) = key(o) else { return true };
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let at = crate::api::revision(o.meta()).ok();
        match seen.get(&k) {
            Some(s) => !deleted && Some(rv(s)) == at,
            None => deleted,
        }
    }
}

//! The Kubernetes backend of [`IdentityStore`]: one `SecurityIdentity`
//! custom resource per identity, named after its number, with its labels
//! and the owners holding it. The authoritative store in a cluster.
//!
//! # How replicas stay safe without a leader
//!
//! - **A number is never given to two label sets.** Creating the object
//!   named after the number is the claim; the API server lets only one
//!   create of a name succeed. A replica whose create fails with
//!   `AlreadyExists` reloads and allocates again.
//! - **A label set never has two reported numbers.** Two replicas with
//!   different views can claim different numbers for the same set. After
//!   every claim the replica re-reads the set's objects (a consistent list
//!   by the `weft.io/labels-hash` label) and reports its number only if its
//!   object is the set's oldest, by resourceVersion (an etcd revision, so
//!   the oldest stays the oldest and every replica picks the same). A
//!   younger claim is withdrawn before anyone hears of it; one left behind
//!   by a crash is merged into the oldest (its owners) and deleted when
//!   the table is next loaded.
//! - **References are never lost to a race.** Owners are changed with
//!   merge patches that carry the resourceVersion they were computed from;
//!   a stale one gets 409 Conflict, and the replica re-reads the object and
//!   applies its change again. A collection deletes with a resourceVersion
//!   precondition, so an identity that gained an owner meanwhile stays.
//!
//! A Lease-elected leader would serialise the writers, but a leader that
//! stalls past its lease keeps writing until it notices; the claims above
//! are safe whatever the timing, so no lease is used. Every replica
//! watches the objects and reloads when another replica changed them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_common::{labels::canonical_key, readiness::Readiness};
use weft_k8s::{
    api::{self as k8s, fnv1a64, revision},
    config::ApiConfig,
    crd::{LABELS_HASH_LABEL, MANAGED_BY_LABEL, SecurityIdentity, SecurityIdentitySpec},
    retry::ApiHealth,
};

use crate::{
    store::{Committed, IdentityStore, Op, StoreError, Stored},
    table::Labels,
};

/// How often an owner update is retried after 409 Conflict.
const MAX_CONFLICTS: usize = 20;

/// An identity object as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    rv: u64,
    labels: Labels,
    owners: BTreeSet<String>,
}

type SeenMap = BTreeMap<u32, Seen>;

/// What this store asks of the API: its own custom resources only (claimed
/// by create, owners changed by patch, read back by get and list, freed by
/// delete, followed by a watch). The chart's ClusterRole for identity-svc
/// grants exactly this.
pub const API_ACCESS: &[weft_k8s::access::Access] = &[weft_k8s::access::Access {
    group: "weft.io",
    resource: "securityidentities",
    verbs: &["get", "list", "watch", "create", "patch", "delete"],
}];

pub struct KubeIdentityStore {
    api: Api<SecurityIdentity>,
    seen: Arc<Mutex<SeenMap>>,
    changes: watch::Receiver<u64>,
    health: ApiHealth,
    config: ApiConfig,
}

fn api_error(e: &kube::Error) -> StoreError {
    StoreError::Api(e.to_string())
}

/// The label value that narrows a list to one label set's objects.
pub fn labels_hash(labels: &Labels) -> String {
    format!("{:016x}", fnv1a64(canonical_key(labels).as_bytes()))
}

/// The number an object stands for, from its name.
fn id_of(object: &SecurityIdentity) -> Option<u32> {
    object.name_any().parse().ok()
}

fn parse(object: &SecurityIdentity) -> Result<Option<(u32, Seen)>, StoreError> {
    let Some(id) = id_of(object) else {
        tracing::warn!(name = %object.name_any(), "SecurityIdentity whose name is not a number; ignoring it");
        return Ok(None);
    };
    let rv = revision(&object.metadata).map_err(|e| StoreError::Api(e.to_string()))?;
    Ok(Some((
        id,
        Seen {
            rv,
            labels: object.spec.labels.clone(),
            owners: object.spec.owners.iter().cloned().collect(),
        },
    )))
}

impl KubeIdentityStore {
    /// Starts following the SecurityIdentities (for
    /// [`IdentityStore::changes`]) until `shutdown`. `health` is what the client's
    /// observer feeds ([`ApiHealth::observer`]); the store's calls feed it too.
    pub fn start(
        client: Client,
        health: ApiHealth,
        config: ApiConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let api: Api<SecurityIdentity> = Api::all(client);
        let seen: Arc<Mutex<SeenMap>> = Arc::default();
        let (tx, changes) = watch::channel(0u64);
        let known = weft_k8s::follow::known_at_revision(seen.clone(), id_of, |s: &Seen| s.rv);
        tokio::spawn(weft_k8s::follow::changes(
            api.clone(),
            health.clone(),
            known,
            tx,
            shutdown,
        ));
        Self {
            api,
            seen,
            changes,
            health,
            config,
        }
    }

    /// Runs one API call under the retry policy.
    async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        weft_k8s::retry::retrying(&self.health, self.config.retry, what, call).await
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, SeenMap> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn list(&self, labels: Option<&str>) -> Result<Vec<(u32, Seen)>, StoreError> {
        let mut params = ListParams::default();
        if let Some(l) = labels {
            params = params.labels(l);
        }
        let list = self
            .retrying("listing SecurityIdentities", || self.api.list(&params))
            .await
            .map_err(|e| api_error(&e))?;
        let mut out = Vec::new();
        for o in &list.items {
            out.extend(parse(o)?);
        }
        Ok(out)
    }

    /// Deletes `id` if still at `rv`; false when it changed meanwhile.
    async fn delete_at(&self, id: u32, rv: u64) -> Result<bool, StoreError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(rv.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let name = id.to_string();
        match self
            .retrying("deleting a SecurityIdentity", || {
                self.api.delete(&name, &params)
            })
            .await
        {
            Ok(_) => {
                self.seen().remove(&id);
                Ok(true)
            }
            Err(e) if k8s::is_not_found(&e) => {
                self.seen().remove(&id);
                Ok(true)
            }
            Err(e) if k8s::is_conflict(&e) => Ok(false),
            Err(e) => Err(api_error(&e)),
        }
    }

    /// Claims `id` for `labels` with `owners`; true when the claim is the
    /// set's oldest (reportable), false when the number was taken or the set
    /// was claimed under another number first (this claim is withdrawn).
    async fn claim(
        &self,
        id: u32,
        labels: &Labels,
        owners: &BTreeSet<String>,
    ) -> Result<bool, StoreError> {
        let hash = labels_hash(labels);
        let object = SecurityIdentity {
            metadata: ObjectMeta {
                name: Some(id.to_string()),
                labels: Some(BTreeMap::from([
                    (LABELS_HASH_LABEL.to_string(), hash.clone()),
                    (MANAGED_BY_LABEL.to_string(), "identity-svc".to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: SecurityIdentitySpec {
                labels: labels.clone(),
                owners: owners.iter().cloned().collect(),
            },
        };
        let post = PostParams::default();
        let mine = match self
            .retrying("creating a SecurityIdentity", || {
                self.api.create(&post, &object)
            })
            .await
        {
            Ok(o) => match parse(&o)? {
                Some((id, seen)) => {
                    let rv = seen.rv;
                    self.seen().insert(id, seen);
                    rv
                }
                None => return Ok(false),
            },
            Err(e) if k8s::is_already_exists(&e) => {
                tracing::debug!(id, "identity number already claimed");
                return Ok(false);
            }
            Err(e) => return Err(api_error(&e)),
        };
        let key = canonical_key(labels);
        let oldest = self
            .list(Some(&format!("{LABELS_HASH_LABEL}={hash}")))
            .await?
            .into_iter()
            .filter(|(_, s)| canonical_key(&s.labels) == key)
            .min_by_key(|(_, s)| s.rv);
        match oldest {
            Some((oldest, _)) if oldest == id => Ok(true),
            other => {
                tracing::info!(id, kept = ?other.map(|(i, _)| i), "the label set was claimed under another number first; withdrawing this claim");
                self.delete_at(id, mine).await?;
                Ok(false)
            }
        }
    }

    /// Adds and removes owners of `id`, re-reading the object after each
    /// 409 Conflict. False when the identity is gone.
    async fn change_owners(
        &self,
        id: u32,
        add: &BTreeSet<String>,
        remove: &BTreeSet<String>,
    ) -> Result<bool, StoreError> {
        let name = id.to_string();
        let mut current = self.seen().get(&id).cloned();
        for _ in 0..MAX_CONFLICTS {
            let Some(seen) = current.take() else {
                return Ok(false);
            };
            let mut owners = seen.owners.clone();
            owners.extend(add.iter().cloned());
            owners.retain(|o| !remove.contains(o));
            if owners == seen.owners {
                return Ok(true);
            }
            // The resourceVersion in a merge patch is a precondition.
            let patch = json!({
                "metadata": {"resourceVersion": seen.rv.to_string()},
                "spec": {"owners": owners},
            });
            let params = PatchParams::default();
            let patch = Patch::Merge(&patch);
            match self
                .retrying("updating SecurityIdentity owners", || {
                    self.api.patch(&name, &params, &patch)
                })
                .await
            {
                Ok(o) => {
                    if let Some((id, seen)) = parse(&o)? {
                        self.seen().insert(id, seen);
                    }
                    return Ok(true);
                }
                Err(e) if k8s::is_conflict(&e) => {
                    tracing::debug!(id, "owners changed meanwhile (409); re-reading");
                    current = match self
                        .retrying("reading a SecurityIdentity", || self.api.get_opt(&name))
                        .await
                    {
                        Ok(Some(o)) => parse(&o)?.map(|(_, s)| s),
                        Ok(None) => None,
                        Err(e) => return Err(api_error(&e)),
                    };
                    match &current {
                        Some(s) => {
                            self.seen().insert(id, s.clone());
                        }
                        None => {
                            self.seen().remove(&id);
                        }
                    }
                }
                Err(e) if k8s::is_not_found(&e) => {
                    self.seen().remove(&id);
                    return Ok(false);
                }
                Err(e) => return Err(api_error(&e)),
            }
        }
        Ok(false)
    }

    /// Reads everything; repairs what a race or a crash left (duplicate
    /// claims of one set, an owner listed twice) and reads again if it did.
    async fn load_and_repair(&self, repair: bool) -> Result<(Stored, bool), StoreError> {
        let objects = self.list(None).await?;
        *self.seen() = objects.iter().cloned().collect();
        // Each set's oldest claim wins; the owners of the others move to it.
        let mut winner: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        for (id, s) in &objects {
            let slot = winner
                .entry(canonical_key(&s.labels))
                .or_insert((*id, s.rv));
            if s.rv < slot.1 {
                *slot = (*id, s.rv);
            }
        }
        let mut owners: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut repairs: Vec<(u32, u64, BTreeSet<String>, String)> = Vec::new();
        let mut identities = Vec::new();
        for (id, s) in &objects {
            let (win, _) = winner[&canonical_key(&s.labels)];
            if win == *id {
                identities.push((*id, s.labels.clone()));
            } else {
                repairs.push((*id, s.rv, s.owners.clone(), canonical_key(&s.labels)));
            }
            // An owner listed twice (a crash between adding it to its new
            // identity and removing it from the old) stays with the most
            // recently written.
            for o in &s.owners {
                let slot = owners.entry(o.clone()).or_insert((win, s.rv));
                if s.rv > slot.1 {
                    *slot = (win, s.rv);
                }
            }
        }
        let stored = Stored {
            identities,
            owners: owners.iter().map(|(o, (id, _))| (o.clone(), *id)).collect(),
        };
        let mut repaired = false;
        if repair {
            for (loser, rv, moved, key) in repairs {
                let win = winner[&key].0;
                tracing::info!(
                    loser,
                    winner = win,
                    "merging a duplicate claim of a label set into the oldest"
                );
                self.change_owners(win, &moved, &BTreeSet::new()).await?;
                self.delete_at(loser, rv).await?;
                repaired = true;
            }
            let listed: Vec<(u32, BTreeSet<String>)> = self
                .seen()
                .iter()
                .map(|(id, s)| (*id, s.owners.clone()))
                .collect();
            for (id, held) in listed {
                let stale: BTreeSet<String> = held
                    .into_iter()
                    .filter(|o| owners.get(o).is_some_and(|(w, _)| *w != id))
                    .collect();
                if !stale.is_empty() && winner.values().any(|(w, _)| *w == id) {
                    self.change_owners(id, &BTreeSet::new(), &stale).await?;
                    repaired = true;
                }
            }
        }
        Ok((stored, repaired))
    }
}

impl IdentityStore for KubeIdentityStore {
    async fn load(&self) -> Result<Stored, StoreError> {
        let (stored, repaired) = self.load_and_repair(true).await?;
        if repaired {
            return Ok(self.load_and_repair(false).await?.0);
        }
        Ok(stored)
    }

    async fn commit(&self, ops: &[Op]) -> Result<Committed, StoreError> {
        // Where every owner the batch touches ends up, and what it leaves.
        let index: BTreeMap<String, u32> = self
            .seen()
            .iter()
            .flat_map(|(id, s)| s.owners.iter().map(move |o| (o.clone(), *id)))
            .collect();
        let mut created: BTreeMap<u32, Labels> = BTreeMap::new();
        let mut deleted: BTreeSet<u32> = BTreeSet::new();
        let mut owner_at: BTreeMap<String, Option<u32>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::PutIdentity { id, labels } => {
                    deleted.remove(id);
                    created.insert(*id, labels.clone());
                }
                Op::DeleteIdentity(id) => {
                    created.remove(id);
                    deleted.insert(*id);
                }
                Op::PutOwner { owner, id } => {
                    owner_at.insert(owner.clone(), Some(*id));
                }
                Op::DeleteOwner(owner) => {
                    owner_at.insert(owner.clone(), None);
                }
            }
        }
        let mut add: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        let mut remove: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for (owner, to) in &owner_at {
            let from = index.get(owner).copied();
            if from == *to {
                continue;
            }
            if let Some(to) = to {
                add.entry(*to).or_default().insert(owner.clone());
            }
            if let Some(from) = from {
                remove.entry(from).or_default().insert(owner.clone());
            }
        }

        let mut as_planned = true;
        // Claims first, with their first owners in the same write.
        for (id, labels) in &created {
            let owners = add.remove(id).unwrap_or_default();
            if !self.claim(*id, labels, &owners).await? {
                as_planned = false;
            }
        }
        if as_planned {
            // New references before dropped ones, so an owner moving
            // between identities is never held by neither.
            let none = BTreeSet::new();
            for (id, owners) in &add {
                if !self.change_owners(*id, owners, &none).await? {
                    as_planned = false;
                }
            }
            for (id, owners) in &remove {
                if !deleted.contains(id) && !created.contains_key(id) {
                    self.change_owners(*id, &none, owners).await?;
                }
            }
            for id in &deleted {
                let rv = self.seen().get(id).map(|s| s.rv);
                if let Some(rv) = rv
                    && !self.delete_at(*id, rv).await?
                {
                    as_planned = false;
                }
            }
        }
        if as_planned {
            Ok(Committed::AsPlanned)
        } else {
            Ok(Committed::Diverged(self.load().await?))
        }
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }

    fn readiness(
        &self,
        unready_after: Duration,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Readiness> {
        let (tx, rx) = watch::channel(Readiness::Ready);
        tokio::spawn(self.health.clone().report(unready_after, tx, shutdown));
        rx
    }
}

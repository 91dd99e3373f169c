//! The identity table: label sets ↔ numbers, owners and their references,
//! and collection of identities nobody references. Pure and in memory; every
//! change is described by a [`Change`] whose `ops` the service makes durable
//! before anyone hears of the result.
//!
//! The number of a label set never changes while the set exists, and a
//! number is reused (lowest free first) only after its identity was
//! collected.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use weft_common::labels::{
    MAX_ALLOCATED_IDENTITY, MIN_ALLOCATED_IDENTITY, canonical_key, reserved, reserved_labels,
};
use weft_proto::identity::v1::SecurityIdentity;

use crate::store::Op;

pub type Labels = BTreeMap<String, String>;

/// Every number of the range is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("every identity number in {min}..={max} is in use")]
pub struct Exhausted {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    labels: Labels,
    key: String,
    refs: u32,
    /// When the last reference went (or the identity was created or loaded
    /// without one); `None` while referenced.
    unreferenced_since: Option<Instant>,
}

/// What one or more table operations changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    /// The writes that make the store match, in an order where every
    /// prefix is consistent (identities before the owners that point at
    /// them; owners dropped before their identities).
    pub ops: Vec<Op>,
    /// Identities whose labels or reference count changed.
    pub upserted: BTreeSet<u32>,
    /// Identities created.
    pub created: Vec<u32>,
    /// Identities whose last reference went.
    pub unreferenced: Vec<u32>,
    /// Identities collected.
    pub deleted: Vec<u32>,
    /// Allocations refused because the range is full.
    pub exhausted: u32,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.upserted.is_empty() && self.deleted.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    min: u32,
    max: u32,
    ids: BTreeMap<u32, Entry>,
    by_key: HashMap<String, u32>,
    owners: BTreeMap<String, u32>,
}

impl Default for Table {
    fn default() -> Self {
        Self::new(MIN_ALLOCATED_IDENTITY, MAX_ALLOCATED_IDENTITY)
    }
}

impl Table {
    /// An empty table allocating from `min..=max`.
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            min,
            max,
            ids: BTreeMap::new(),
            by_key: HashMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Rebuilds the table from what the store holds. Records that cannot
    /// come from this table's own writes are skipped with an error log;
    /// identities without references start their grace period `now`.
    pub fn restore(
        &mut self,
        identities: Vec<(u32, Labels)>,
        owners: Vec<(String, u32)>,
        now: Instant,
    ) {
        for (id, labels) in identities {
            if !(self.min..=self.max).contains(&id) {
                tracing::error!(
                    id,
                    "stored identity outside the allocation range; ignoring it"
                );
                continue;
            }
            let key = canonical_key(&labels);
            if let Some(other) = self.by_key.get(&key) {
                tracing::error!(id, other, %key, "stored identity duplicates another's labels; ignoring it");
                continue;
            }
            self.by_key.insert(key.clone(), id);
            self.ids.insert(
                id,
                Entry {
                    labels,
                    key,
                    refs: 0,
                    unreferenced_since: Some(now),
                },
            );
        }
        for (owner, id) in owners {
            let Some(entry) = self.ids.get_mut(&id) else {
                tracing::error!(%owner, id, "stored owner references an unknown identity; ignoring it");
                continue;
            };
            entry.refs += 1;
            entry.unreferenced_since = None;
            self.owners.insert(owner, id);
        }
    }

    /// A table holding what a store holds, allocating from the same range;
    /// identities that were unreferenced here and still are keep the time
    /// their grace period started.
    pub fn rebuilt(
        &self,
        identities: Vec<(u32, Labels)>,
        owners: Vec<(String, u32)>,
        now: Instant,
    ) -> Table {
        let mut t = Table::new(self.min, self.max);
        t.restore(identities, owners, now);
        for (id, entry) in t.ids.iter_mut() {
            if entry.refs == 0
                && let Some(old) = self.ids.get(id)
                && old.key == entry.key
                && old.unreferenced_since.is_some()
            {
                entry.unreferenced_since = old.unreferenced_since;
            }
        }
        t
    }

    /// The number of allocated (not reserved) identities.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The identity of a label set, if it exists.
    pub fn id_of(&self, labels: &Labels) -> Option<u32> {
        self.by_key.get(&canonical_key(labels)).copied()
    }

    /// The identity an owner holds.
    pub fn owner(&self, owner: &str) -> Option<u32> {
        self.owners.get(owner).copied()
    }

    /// The owners whose name starts with `prefix`.
    pub fn owners_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        self.owners
            .range(prefix.to_string()..)
            .take_while(move |(o, _)| o.starts_with(prefix))
            .map(|(o, id)| (o.as_str(), *id))
    }

    pub fn labels(&self, id: u32) -> Option<&Labels> {
        self.ids.get(&id).map(|e| &e.labels)
    }

    /// The identity of `labels`, created if new; with an owner, the owner
    /// now holds it (moving its reference from any other identity). Nothing
    /// changes when the range is full.
    pub fn allocate(
        &mut self,
        labels: Labels,
        owner: Option<&str>,
        now: Instant,
        change: &mut Change,
    ) -> Result<u32, Exhausted> {
        let key = canonical_key(&labels);
        let id = match self.by_key.get(&key) {
            Some(id) => *id,
            None => {
                let Some(id) = self.lowest_free() else {
                    change.exhausted += 1;
                    return Err(Exhausted {
                        min: self.min,
                        max: self.max,
                    });
                };
                change.ops.push(Op::PutIdentity {
                    id,
                    labels: labels.clone(),
                });
                self.by_key.insert(key.clone(), id);
                self.ids.insert(
                    id,
                    Entry {
                        labels,
                        key,
                        refs: 0,
                        unreferenced_since: Some(now),
                    },
                );
                change.created.push(id);
                change.upserted.insert(id);
                id
            }
        };
        if let Some(owner) = owner {
            self.hold(owner, id, now, change);
        }
        Ok(id)
    }

    fn hold(&mut self, owner: &str, id: u32, now: Instant, change: &mut Change) {
        let previous = self.owners.get(owner).copied();
        if previous == Some(id) {
            return;
        }
        change.ops.push(Op::PutOwner {
            owner: owner.to_string(),
            id,
        });
        self.owners.insert(owner.to_string(), id);
        if let Some(entry) = self.ids.get_mut(&id) {
            entry.refs += 1;
            entry.unreferenced_since = None;
        }
        change.upserted.insert(id);
        if let Some(previous) = previous {
            self.unref(previous, now, change);
        }
    }

    /// Drops the owner's reference; returns the identity it held.
    pub fn release(&mut self, owner: &str, now: Instant, change: &mut Change) -> Option<u32> {
        let id = self.owners.remove(owner)?;
        change.ops.push(Op::DeleteOwner(owner.to_string()));
        self.unref(id, now, change);
        Some(id)
    }

    fn unref(&mut self, id: u32, now: Instant, change: &mut Change) {
        let Some(entry) = self.ids.get_mut(&id) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs == 0 {
            entry.unreferenced_since = Some(now);
            change.unreferenced.push(id);
        }
        change.upserted.insert(id);
    }

    /// Collects every identity unreferenced for at least `grace`.
    pub fn collect(&mut self, now: Instant, grace: Duration, change: &mut Change) {
        let due: Vec<u32> = self
            .ids
            .iter()
            .filter(|(_, e)| {
                e.refs == 0
                    && e.unreferenced_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= grace)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(entry) = self.ids.remove(&id) {
                self.by_key.remove(&entry.key);
                change.ops.push(Op::DeleteIdentity(id));
                change.upserted.remove(&id);
                change.deleted.push(id);
            }
        }
    }

    /// The lowest number of the range nobody has.
    fn lowest_free(&self) -> Option<u32> {
        let mut candidate = self.min;
        for id in self.ids.range(self.min..=self.max).map(|(id, _)| *id) {
            if id != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate <= self.max).then_some(candidate)
    }

    /// One identity, reserved or allocated.
    pub fn get(&self, id: u32) -> Option<SecurityIdentity> {
        if let Some(entry) = self.ids.get(&id) {
            return Some(SecurityIdentity {
                id,
                labels: entry.labels.clone().into_iter().collect(),
                reserved: false,
                references: entry.refs,
            });
        }
        reserved::ALL
            .iter()
            .find(|(rid, _)| *rid == id)
            .map(|(rid, name)| reserved_identity(*rid, name))
    }

    /// The whole table: the reserved identities, then the allocated ones.
    pub fn list(&self) -> Vec<SecurityIdentity> {
        reserved::ALL
            .iter()
            .map(|(id, name)| reserved_identity(*id, name))
            .chain(self.ids.keys().filter_map(|id| self.get(*id)))
            .collect()
    }
}

fn reserved_identity(id: u32, name: &str) -> SecurityIdentity {
    SecurityIdentity {
        id,
        labels: reserved_labels(name).into_iter().collect(),
        reserved: true,
        references: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(app: &str) -> Labels {
        [("k8s:app".to_string(), app.to_string())].into()
    }

    #[test]
    fn the_same_labels_get_the_same_number() {
        let mut t = Table::default();
        let now = Instant::now();
        let mut c = Change::default();
        let a = t.allocate(labels("a"), None, now, &mut c).expect("free");
        let b = t.allocate(labels("b"), None, now, &mut c).expect("free");
        assert_eq!((a, b), (256, 257));
        assert_eq!(t.allocate(labels("a"), None, now, &mut c), Ok(a));
        assert_eq!(c.created, vec![256, 257]);
        assert_eq!(t.get(a).map(|i| i.references), Some(0));
    }

    #[test]
    fn owners_hold_one_reference_and_move_it() {
        let mut t = Table::default();
        let now = Instant::now();
        let mut c = Change::default();
        let a = t
            .allocate(labels("a"), Some("o1"), now, &mut c)
            .expect("free");
        t.allocate(labels("a"), Some("o1"), now, &mut c)
            .expect("free");
        t.allocate(labels("a"), Some("o2"), now, &mut c)
            .expect("free");
        assert_eq!(t.get(a).map(|i| i.references), Some(2));

        // o1 moves to another set.
        let mut c = Change::default();
        let b = t
            .allocate(labels("b"), Some("o1"), now, &mut c)
            .expect("free");
        assert_eq!(t.get(a).map(|i| i.references), Some(1));
        assert_eq!(t.get(b).map(|i| i.references), Some(1));
        assert_eq!(c.upserted, BTreeSet::from([a, b]));

        let mut c = Change::default();
        assert_eq!(t.release("o2", now, &mut c), Some(a));
        assert_eq!(c.unreferenced, vec![a]);
        assert_eq!(t.release("o2", now, &mut c), None);
    }

    #[test]
    fn collection_waits_for_the_grace_period_and_a_new_reference_saves() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let mut c = Change::default();
        let a = t
            .allocate(labels("a"), Some("o"), t0, &mut c)
            .expect("free");
        let b = t.allocate(labels("b"), None, t0, &mut c).expect("free");
        t.release("o", t0, &mut c);

        let mut c = Change::default();
        t.collect(t0 + Duration::from_secs(30), grace, &mut c);
        assert!(c.deleted.is_empty());
        // a is referenced again before its grace period ends: it stays.
        t.allocate(labels("a"), Some("o"), t0 + Duration::from_secs(40), &mut c)
            .expect("exists");
        t.collect(t0 + Duration::from_secs(61), grace, &mut c);
        assert_eq!(c.deleted, vec![b]);
        assert_eq!(c.ops.last(), Some(&Op::DeleteIdentity(b)));
        assert!(t.get(a).is_some());
        assert!(t.get(b).is_none());

        // b's number is free again, for a new set.
        let mut c = Change::default();
        assert_eq!(t.allocate(labels("c"), None, t0, &mut c), Ok(b));
    }

    #[test]
    fn reserved_identities_are_listed_and_never_allocated() {
        let t = Table::default();
        let list = t.list();
        assert_eq!(list.len(), reserved::ALL.len());
        assert!(
            list.iter()
                .all(|i| i.reserved && i.id < MIN_ALLOCATED_IDENTITY)
        );
        let host = t.get(reserved::HOST).expect("host");
        assert!(host.labels.contains_key("reserved:host"));
    }

    #[test]
    fn a_full_range_is_an_error_that_changes_nothing() {
        let mut t = Table::new(256, 257);
        let now = Instant::now();
        let mut c = Change::default();
        t.allocate(labels("a"), Some("o"), now, &mut c)
            .expect("free");
        t.allocate(labels("b"), None, now, &mut c).expect("free");
        let mut c = Change::default();
        let err = t.allocate(labels("c"), Some("o"), now, &mut c);
        assert_eq!(err, Err(Exhausted { min: 256, max: 257 }));
        assert_eq!(c.exhausted, 1);
        assert!(c.ops.is_empty());
        assert_eq!(t.owner("o"), Some(256));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Allocate {
            set: u8,
            owner: Option<u8>,
        },
        Release(u8),
        /// Advance the clock by this many seconds, then sweep.
        Collect(u8),
        /// Rebuild from the ops applied so far (a restart).
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..12, proptest::option::of(0u8..6))
                .prop_map(|(set, owner)| Step::Allocate { set, owner }),
            2 => (0u8..6).prop_map(Step::Release),
            1 => (0u8..90).prop_map(Step::Collect),
            1 => Just(Step::Restart),
        ]
    }

    proptest! {
        /// Whatever happens, one number never stands for two label sets, an
        /// identity keeps its number while referenced, reference counts equal
        /// the owners holding them, and the ops rebuild the same table.
        #[test]
        fn numbers_are_unique_and_stable_while_referenced(steps in proptest::collection::vec(step(), 1..120)) {
            let grace = Duration::from_secs(60);
            let t0 = Instant::now();
            let mut clock = t0;
            // A small range, so numbers get exhausted and reused.
            let mut t = Table::new(256, 263);
            let mut ops: Vec<Op> = Vec::new();
            let mut ever: BTreeMap<u32, Vec<Labels>> = BTreeMap::new();
            let mut held: BTreeMap<String, (u32, Labels)> = BTreeMap::new();
            for s in steps {
                let mut c = Change::default();
                match s {
                    Step::Allocate { set, owner } => {
                        let l = labels(&format!("s{set}"));
                        let owner = owner.map(|o| format!("o{o}"));
                        if let Ok(id) = t.allocate(l.clone(), owner.as_deref(), clock, &mut c) {
                            ever.entry(id).or_default().push(l.clone());
                            if let Some(o) = owner { held.insert(o, (id, l)); }
                        }
                    }
                    Step::Release(o) => {
                        t.release(&format!("o{o}"), clock, &mut c);
                        held.remove(&format!("o{o}"));
                    }
                    Step::Collect(secs) => {
                        clock += Duration::from_secs(u64::from(secs));
                        t.collect(clock, grace, &mut c);
                        for id in &c.deleted {
                            // Only unreferenced identities are collected.
                            prop_assert!(held.values().all(|(h, _)| h != id));
                            ever.remove(id);
                        }
                    }
                    Step::Restart => {
                        let mut identities: BTreeMap<u32, Labels> = BTreeMap::new();
                        let mut owners: BTreeMap<String, u32> = BTreeMap::new();
                        for op in &ops {
                            match op {
                                Op::PutIdentity { id, labels } => { identities.insert(*id, labels.clone()); }
                                Op::DeleteIdentity(id) => { identities.remove(id); }
                                Op::PutOwner { owner, id } => { owners.insert(owner.clone(), *id); }
                                Op::DeleteOwner(owner) => { owners.remove(owner); }
                            }
                        }
                        let mut fresh = Table::new(256, 263);
                        fresh.restore(identities.into_iter().collect(), owners.into_iter().collect(), clock);
                        prop_assert_eq!(&fresh.owners, &t.owners);
                        prop_assert_eq!(fresh.list(), t.list());
                        t = fresh;
                    }
                }
                ops.extend(c.ops);

                // A number stands for one label set until collected.
                for sets in ever.values() {
                    prop_assert!(sets.iter().all(|l| l == &sets[0]));
                }
                // Every owner still has the number and labels it was given.
                for (o, (id, l)) in &held {
                    prop_assert_eq!(t.owner(o), Some(*id));
                    prop_assert_eq!(t.labels(*id), Some(l));
                }
                // References are exactly the owners holding each identity.
                for (id, e) in &t.ids {
                    let n = t.owners.values().filter(|h| *h == id).count() as u32;
                    prop_assert_eq!(e.refs, n);
                    prop_assert_eq!(t.by_key.get(&e.key), Some(id));
                    prop_assert!((256..=263).contains(id));
                }
                prop_assert_eq!(t.by_key.len(), t.ids.len());
            }
        }
    }
}

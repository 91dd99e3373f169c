#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, sync::Arc};

use proptest::prelude::*;
use weft_common::watch::{Mirror, ResumePoint};
use weft_proto::watcher::v1::{self as pb, resource, watch_event::Event};

use super::*;
use crate::subscription::{Start, Subscription};

fn meta(namespace: &str, name: &str, v: u8) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta {
        namespace: namespace.into(),
        name: name.into(),
        labels: [("v".to_string(), v.to_string())].into(),
        ..Default::default()
    })
}

fn ns(name: &str, v: u8) -> Resource {
    Resource {
        kind: Some(resource::Kind::Namespace(pb::Namespace {
            meta: meta("", name, v),
        })),
    }
}

fn pod(namespace: &str, name: &str, v: u8) -> Resource {
    Resource {
        kind: Some(resource::Kind::Pod(pb::Pod {
            meta: meta(namespace, name, v),
            ..Default::default()
        })),
    }
}

fn svc(namespace: &str, name: &str, v: u8) -> Resource {
    Resource {
        kind: Some(resource::Kind::Service(pb::Service {
            meta: meta(namespace, name, v),
            ..Default::default()
        })),
    }
}

fn store(history: usize) -> Arc<StateStore> {
    Arc::new(StateStore::with_epoch("e1", history, Metrics::new()))
}

fn drain(sub: &mut Subscription) -> Vec<WatchEventSummary> {
    std::iter::from_fn(|| sub.try_next()).map(summary).collect()
}

/// An event reduced to what tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WatchEventSummary {
    Reset(u64),
    Upsert(u64, String),
    Delete(u64, String),
    Synced(u64),
}

fn summary(e: pb::WatchEvent) -> WatchEventSummary {
    use WatchEventSummary as S;
    match e.event.unwrap() {
        Event::Reset(_) => S::Reset(e.revision),
        Event::Upsert(r) => S::Upsert(e.revision, ObjKey::of(&r).unwrap().to_string()),
        Event::Delete(k) => S::Delete(e.revision, ObjKey::from_proto(&k).to_string()),
        Event::Synced(_) => S::Synced(e.revision),
    }
}

#[test]
fn only_real_changes_take_a_revision() {
    let s = store(100);
    assert_eq!(s.replace_all([ns("a", 1), pod("a", "p", 1)]).unwrap(), 2);
    assert_eq!(s.revision(), 2);
    // The same state again: nothing happens.
    assert_eq!(s.replace_all([pod("a", "p", 1), ns("a", 1)]).unwrap(), 0);
    assert_eq!(s.revision(), 2);
    assert_eq!(s.apply(Change::Upsert(ns("a", 1))).unwrap(), None);
    assert_eq!(s.apply(Change::Upsert(ns("a", 2))).unwrap(), Some(3));
    assert_eq!(
        s.apply(Change::Delete(ObjKey::new(Kind::Namespace, "", "zz")))
            .unwrap(),
        None
    );
    // A changed object and a removed one.
    assert_eq!(s.replace_all([ns("a", 3)]).unwrap(), 2);
    assert_eq!(s.revision(), 5);
    assert_eq!(s.len(), 1);
    let (rev, deltas) = s.deltas_since(3, KindSet::all()).unwrap();
    assert_eq!(rev, 5);
    assert_eq!(deltas.len(), 2);
    assert!(deltas[0].object.is_some(), "upserts come before deletes");
    assert!(deltas[1].object.is_none());
    assert_eq!(deltas[1].key, ObjKey::new(Kind::Pod, "a", "p"));
}

#[test]
fn replacing_one_kind_leaves_the_others() {
    let s = store(100);
    s.replace_all([ns("a", 1), pod("a", "p", 1)]).unwrap();
    s.replace_kind_set(KindSet::of([Kind::Namespace]), [ns("b", 1)])
        .unwrap();
    assert!(s.get(&ObjKey::new(Kind::Pod, "a", "p")).is_some());
    assert!(s.get(&ObjKey::new(Kind::Namespace, "", "a")).is_none());
    assert!(s.get(&ObjKey::new(Kind::Namespace, "", "b")).is_some());
    assert_eq!(
        s.replace_kind_set(KindSet::of([Kind::Namespace]), [pod("a", "q", 1)]),
        Err(StateError::KindOutsideSet(ObjKey::new(Kind::Pod, "a", "q")))
    );
    assert_eq!(
        s.apply(Change::Upsert(Resource::default())),
        Err(StateError::Unkeyed)
    );
}

#[test]
fn history_coverage_limits() {
    let s = store(3);
    assert_eq!(s.deltas_since(0, KindSet::all()), Some((0, vec![])));
    for v in 1..=5 {
        s.apply(Change::Upsert(ns("a", v))).unwrap();
    }
    // Revisions 3, 4, 5 are kept: a reader at 2 can catch up, one at 1 cannot.
    assert_eq!(s.deltas_since(2, KindSet::all()).unwrap().1.len(), 3);
    assert_eq!(s.deltas_since(1, KindSet::all()), None);
    assert_eq!(s.deltas_since(5, KindSet::all()), Some((5, vec![])));
    assert_eq!(s.deltas_since(6, KindSet::all()), None, "from the future");
    // Filtered by kind, the revision still advances.
    assert_eq!(
        s.deltas_since(2, KindSet::of([Kind::Pod])),
        Some((5, vec![]))
    );
}

#[test]
fn kinds_from_requests() {
    assert_eq!(KindSet::from_request(&[]).unwrap(), KindSet::all());
    let set = KindSet::from_request(&[Kind::Pod as i32, Kind::Node as i32]).unwrap();
    assert!(set.contains(Kind::Pod) && set.contains(Kind::Node) && !set.contains(Kind::Service));
    assert_eq!(
        KindSet::from_request(&[1, 0]).unwrap_err().to_string(),
        "kinds[1]: 0 is not a known kind"
    );
    assert_eq!(
        KindSet::from_request(&[42]).unwrap_err(),
        UnknownKind {
            index: 0,
            value: 42
        }
    );
}

#[test]
fn a_first_subscription_gets_a_snapshot_then_deltas() {
    use WatchEventSummary as S;
    let s = store(100);
    s.replace_all([ns("a", 1), pod("a", "p", 1)]).unwrap();
    let mut sub = Subscription::start(s.clone(), KindSet::all(), "", 0);
    assert_eq!(sub.started(), Start::Snapshot);
    assert_eq!(
        drain(&mut sub),
        vec![
            S::Reset(2),
            S::Upsert(2, "KIND_POD/a/p".into()),
            S::Upsert(2, "KIND_NAMESPACE/a".into()),
            S::Synced(2)
        ]
    );
    s.apply(Change::Delete(ObjKey::new(Kind::Pod, "a", "p")))
        .unwrap();
    assert_eq!(drain(&mut sub), vec![S::Delete(3, "KIND_POD/a/p".into())]);
    assert_eq!(drain(&mut sub), vec![]);
}

#[test]
fn resuming_replays_only_missed_deltas_of_the_kinds_asked_for() {
    use WatchEventSummary as S;
    let s = store(100);
    s.replace_all([ns("a", 1)]).unwrap();
    s.apply(Change::Upsert(pod("a", "p", 1))).unwrap();
    s.apply(Change::Upsert(ns("a", 2))).unwrap();
    let pods = KindSet::of([Kind::Pod]);
    let mut sub = Subscription::start(s.clone(), pods, "e1", 1);
    assert_eq!(sub.started(), Start::Resumed);
    assert_eq!(
        drain(&mut sub),
        vec![S::Upsert(2, "KIND_POD/a/p".into()), S::Synced(3)]
    );
    // Another epoch, or a revision 0, means a snapshot.
    let mut sub = Subscription::start(s.clone(), pods, "other", 3);
    assert_eq!(sub.started(), Start::Snapshot);
    assert_eq!(drain(&mut sub)[0], S::Reset(3));
    assert_eq!(
        Subscription::start(s.clone(), pods, "e1", 0).started(),
        Start::Snapshot
    );
}

#[test]
fn a_subscriber_left_behind_by_the_history_gets_a_fresh_snapshot() {
    use WatchEventSummary as S;
    let s = store(2);
    s.replace_all([ns("a", 1)]).unwrap();
    let mut sub = Subscription::start(s.clone(), KindSet::all(), "", 0);
    assert_eq!(drain(&mut sub).len(), 3);
    for v in 2..=6 {
        s.apply(Change::Upsert(ns("a", v))).unwrap();
    }
    assert_eq!(
        drain(&mut sub),
        vec![
            S::Reset(6),
            S::Upsert(6, "KIND_NAMESPACE/a".into()),
            S::Synced(6)
        ]
    );
    assert_eq!(sub.snapshots(), 2);
    // Resuming from too far back is a snapshot as well.
    assert_eq!(
        Subscription::start(s.clone(), KindSet::all(), "e1", 2).started(),
        Start::Snapshot
    );
}

#[tokio::test]
async fn next_waits_for_a_change() {
    let s = store(100);
    let mut sub = Subscription::start(s.clone(), KindSet::all(), "", 0);
    assert_eq!(drain(&mut sub).len(), 2);
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.apply(Change::Upsert(ns("late", 1))).unwrap();
        })
    };
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.revision, 1);
    assert!(matches!(event.event, Some(Event::Upsert(_))));
    writer.await.unwrap();
}

#[test]
fn metrics_follow_the_state() {
    let mut registry = prometheus_client::registry::Registry::default();
    let registered = Metrics::registered(&mut registry);
    let s2 = StateStore::with_epoch("e", 10, registered);
    s2.replace_all([ns("a", 1), ns("b", 1), pod("a", "p", 1)])
        .unwrap();
    s2.apply(Change::Delete(ObjKey::new(Kind::Namespace, "", "b")))
        .unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("weft_watcher_objects{kind=\"Namespace\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("weft_watcher_objects{kind=\"Pod\"} 1"),
        "{text}"
    );
    assert!(text.contains("weft_watcher_revision 4"), "{text}");
    assert!(
        text.contains("weft_watcher_events_total{kind=\"Namespace\",type=\"upsert\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("weft_watcher_events_total{kind=\"Namespace\",type=\"delete\"} 1"),
        "{text}"
    );
}

// ------------------------------------------------------------- properties

/// The objects the property test plays with: a few of three kinds.
fn universe(i: u8, v: u8) -> Resource {
    match i % 6 {
        0 => ns("a", v),
        1 => ns("b", v),
        2 => pod("a", "p", v),
        3 => pod("b", "p", v),
        4 => svc("a", "s", v),
        _ => svc("a", "t", v),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(u8, u8),
    Delete(u8),
    /// Replace everything with the objects whose bit is set.
    ReplaceAll(u8, u8),
    /// Replace the namespaces only.
    ReplaceNamespaces(u8, u8),
    /// The subscriber reads up to this many events.
    Read(u8),
    /// The connection drops; the subscriber resubscribes from where it was.
    Reconnect,
    /// The server restarts: a new epoch, the same objects re-read.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6, 0u8..3).prop_map(|(i, v)| Op::Upsert(i, v)),
        2 => (0u8..6).prop_map(Op::Delete),
        1 => (any::<u8>(), 0u8..3).prop_map(|(m, v)| Op::ReplaceAll(m, v)),
        1 => (any::<u8>(), 0u8..3).prop_map(|(m, v)| Op::ReplaceNamespaces(m, v)),
        3 => (0u8..8).prop_map(Op::Read),
        2 => Just(Op::Reconnect),
        1 => Just(Op::Restart),
    ]
}

fn kinds_strategy() -> impl Strategy<Value = KindSet> {
    prop_oneof![
        Just(KindSet::all()),
        Just(KindSet::of([Kind::Pod])),
        Just(KindSet::of([Kind::Namespace, Kind::Service])),
    ]
}

fn wanted(store: &StateStore, kinds: KindSet) -> BTreeMap<ObjKey, Resource> {
    store
        .snapshot(kinds)
        .objects
        .into_iter()
        .map(|o| {
            let o = o.unpack();
            (ObjKey::of(&o).unwrap(), o)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever happens — changes of every style, reads interrupted at any
    /// point (mid-snapshot included), reconnects that resume or fall back to
    /// a snapshot, a history too short to resume from, a server restart — a
    /// subscriber that follows the client's resume rule and reads to the end
    /// holds exactly the server's state.
    #[test]
    fn a_subscriber_always_ends_with_the_servers_state(
        history in 1usize..8,
        kinds in kinds_strategy(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut epoch_counter = 1;
        let mut store = store(history);
        let mut mirror = Mirror::new();
        let mut resume = ResumePoint::new();
        let mut sub = Subscription::start(store.clone(), kinds, &resume.epoch, resume.revision);
        let mut last_revision: Option<(String, u64)> = None;
        for op in ops {
            match op {
                Op::Upsert(i, v) => { store.apply(Change::Upsert(universe(i, v))).unwrap(); }
                Op::Delete(i) => {
                    let key = ObjKey::of(&universe(i, 0)).unwrap();
                    store.apply(Change::Delete(key)).unwrap();
                }
                Op::ReplaceAll(mask, v) => {
                    let objects = (0..6).filter(|i| mask & (1 << i) != 0).map(|i| universe(i, v));
                    store.replace_all(objects).unwrap();
                }
                Op::ReplaceNamespaces(mask, v) => {
                    let objects = (0..2).filter(|i| mask & (1 << i) != 0).map(|i| universe(i, v));
                    store.replace_kind_set(KindSet::of([Kind::Namespace]), objects).unwrap();
                }
                Op::Read(n) => {
                    for _ in 0..n {
                        let Some(event) = sub.try_next() else { break };
                        // Revisions never go backwards within an epoch.
                        if let Some((e, r)) = &last_revision
                            && *e == event.epoch
                        {
                            prop_assert!(event.revision >= *r);
                        }
                        last_revision = Some((event.epoch.clone(), event.revision));
                        resume.observe(&event);
                        mirror.apply(&event);
                    }
                }
                Op::Reconnect => {
                    sub = Subscription::start(store.clone(), kinds, &resume.epoch, resume.revision);
                }
                Op::Restart => {
                    epoch_counter += 1;
                    let objects: Vec<Resource> = wanted(&store, KindSet::all()).into_values().collect();
                    let fresh = Arc::new(StateStore::with_epoch(format!("e{epoch_counter}"), history, Metrics::new()));
                    fresh.replace_all(objects).unwrap();
                    store = fresh;
                    sub = Subscription::start(store.clone(), kinds, &resume.epoch, resume.revision);
                }
            }
        }
        while let Some(event) = sub.try_next() {
            resume.observe(&event);
            mirror.apply(&event);
        }
        prop_assert!(mirror.is_synced());
        let have: BTreeMap<ObjKey, Resource> =
            mirror.objects().map(|(k, v)| (k.clone(), v.clone())).collect();
        prop_assert_eq!(have, wanted(&store, kinds));
        prop_assert_eq!(resume.epoch.as_str(), store.epoch());
        if kinds == KindSet::all() {
            prop_assert_eq!(resume.revision, store.revision());
        }
    }
}

//! The real identity-svc binary against an in-process fake svc-watcher.

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use common::{
    fake_watcher::{FakeWatcher, namespace, pod},
    process::{Proc, eventually},
};
use tonic::{Code, transport::Channel};
use weft_common::labels::{MIN_ALLOCATED_IDENTITY, reserved, security_labels};
use weft_proto::{
    identity::v1::{
        AllocateRequest, GetRequest, IdentityEvent, ListRequest, ReleaseRequest, SecurityIdentity,
        WatchRequest, identity_client::IdentityClient, identity_event::Event,
    },
    watcher::v1::Kind,
};

const BIN: &str = env!("CARGO_BIN_EXE_identity-svc");
const WAIT: Duration = Duration::from_secs(10);

type Client = IdentityClient<Channel>;

fn start(dir: &Path, watcher: &FakeWatcher, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
        "--watcher".to_string(),
        watcher.url(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(BIN, &args, &dir.join("identity.log"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn allocate(c: &mut Client, l: &[(&str, &str)], owner: &str) -> SecurityIdentity {
    c.allocate(AllocateRequest {
        labels: labels(l),
        owner: owner.into(),
    })
    .await
    .expect("Allocate")
    .into_inner()
}

async fn get(c: &mut Client, id: u32) -> Result<SecurityIdentity, Code> {
    c.get(GetRequest { id })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.code())
}

async fn release(c: &mut Client, owner: &str) -> Vec<u32> {
    c.release(ReleaseRequest {
        owner: owner.into(),
    })
    .await
    .expect("Release")
    .into_inner()
    .unreferenced
}

async fn next_event(stream: &mut tonic::Streaming<IdentityEvent>) -> Event {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch event in time")
        .expect("watch stream")
        .expect("watch event")
        .event
        .expect("event set")
}

/// Reads a Watch stream up to SYNCED; returns the table it sent.
async fn watch(c: &mut Client) -> (Vec<SecurityIdentity>, tonic::Streaming<IdentityEvent>) {
    let mut stream = c.watch(WatchRequest {}).await.expect("Watch").into_inner();
    let mut table = Vec::new();
    loop {
        match next_event(&mut stream).await {
            Event::Upsert(i) => table.push(i),
            Event::Synced(_) => return (table, stream),
            Event::Delete(id) => panic!("delete {id} before SYNCED"),
        }
    }
}

#[tokio::test]
async fn identities_are_stable_refcounted_and_collected_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    let gc = ["--gc-grace-period", "1s", "--gc-interval", "100ms"];
    let mut p = start(dir.path(), &watcher, &gc);
    let mut c = IdentityClient::new(p.wait_serving().await);

    let web = [
        ("k8s:app", "web"),
        ("k8s:io.kubernetes.pod.namespace", "shop"),
    ];
    let a = allocate(&mut c, &web, "o1").await;
    assert_eq!(
        (a.id, a.references, a.reserved),
        (MIN_ALLOCATED_IDENTITY, 1, false)
    );
    // The same owner twice is one reference; another owner is a second.
    assert_eq!(allocate(&mut c, &web, "o1").await.references, 1);
    assert_eq!(allocate(&mut c, &web, "o2").await.references, 2);
    // A lookup without owner holds nothing.
    let tmp = allocate(&mut c, &[("k8s:app", "tmp")], "").await;
    assert_eq!((tmp.id, tmp.references), (a.id + 1, 0));

    // SIGKILL and restart: the same numbers, labels and references.
    p.kill();
    let mut p = start(dir.path(), &watcher, &gc);
    let mut c = IdentityClient::new(p.wait_serving().await);
    let again = get(&mut c, a.id).await.expect("still there");
    assert_eq!(
        (again.labels.clone(), again.references),
        (a.labels.clone(), 2)
    );
    assert_eq!(allocate(&mut c, &web, "").await.id, a.id);
    let list = c.list(ListRequest {}).await.expect("List").into_inner();
    let (watched, mut stream) = watch(&mut c).await;
    assert_eq!(list.identities, watched);
    for (id, name) in reserved::ALL {
        let r = list
            .identities
            .iter()
            .find(|i| i.id == *id)
            .expect("reserved identity listed");
        assert!(r.reserved);
        assert!(r.labels.contains_key(&format!("reserved:{name}")));
    }

    // The unreferenced one goes after the grace period.
    let deleted = next_delete(&mut stream).await;
    assert_eq!(deleted, tmp.id);
    assert_eq!(get(&mut c, tmp.id).await, Err(Code::NotFound));

    // Released by both owners, then referenced again within the grace
    // period: it stays.
    assert_eq!(release(&mut c, "o1").await, Vec::<u32>::new());
    assert_eq!(release(&mut c, "o2").await, vec![a.id]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(allocate(&mut c, &web, "o3").await.id, a.id);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&mut c, a.id).await.map(|i| i.references), Ok(1));

    // Released for good: collected, and the number is free for a new set.
    assert_eq!(release(&mut c, "o3").await, vec![a.id]);
    assert_eq!(next_delete(&mut stream).await, a.id);
    let new = allocate(&mut c, &[("k8s:app", "new")], "o4").await;
    assert_eq!(new.id, MIN_ALLOCATED_IDENTITY);
    assert_eq!(
        p.metric("weft_identity_gc_collected_total").await,
        Some(2.0)
    );
    assert_eq!(p.metric("weft_identity_identities").await, Some(1.0));
}

async fn next_delete(stream: &mut tonic::Streaming<IdentityEvent>) -> u32 {
    loop {
        if let Event::Delete(id) = next_event(stream).await {
            return id;
        }
    }
}

fn find<'a>(
    table: &'a [SecurityIdentity],
    want: &std::collections::BTreeMap<String, String>,
) -> Option<&'a SecurityIdentity> {
    table.iter().find(|i| {
        i.labels.len() == want.len() && want.iter().all(|(k, v)| i.labels.get(k) == Some(v))
    })
}

#[tokio::test]
async fn pods_from_the_watcher_hold_their_identities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    watcher.upsert(namespace("shop", &[("team", "a")]));
    watcher.upsert(pod(
        "shop",
        "web-1",
        &[("app", "web"), ("pod-template-hash", "x1")],
        false,
    ));
    watcher.upsert(pod(
        "shop",
        "web-2",
        &[("app", "web"), ("pod-template-hash", "x2")],
        false,
    ));
    watcher.upsert(pod("shop", "db-0", &[("app", "db")], false));
    watcher.upsert(pod("shop", "agent", &[("app", "agent")], true));
    let mut p = start(dir.path(), &watcher, &[]);
    let mut c = IdentityClient::new(p.wait_serving().await);

    let ns_a = BTreeMap::from([("team".to_string(), "a".to_string())]);
    let web_a = security_labels("shop", &labels(&[("app", "web")]), &ns_a);
    let db_a = security_labels("shop", &labels(&[("app", "db")]), &ns_a);
    let table = eventually(WAIT, "pod identities", || {
        let mut c = c.clone();
        async move {
            let t = c.list(ListRequest {}).await.ok()?.into_inner().identities;
            (t.iter().filter(|i| !i.reserved).count() == 2).then_some(t)
        }
    })
    .await;
    let web = find(&table, &web_a).expect("web identity").clone();
    assert_eq!(web.references, 2);
    assert_eq!(find(&table, &db_a).expect("db identity").references, 1);
    // The datapath computes the same set and finds the same number.
    let looked_up = c
        .allocate(AllocateRequest {
            labels: web_a.clone().into_iter().collect(),
            owner: String::new(),
        })
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(looked_up.id, web.id);

    // The namespace's labels change: the pods move to new identities.
    let (_, mut stream) = watch(&mut c).await;
    watcher.upsert(namespace("shop", &[("team", "b")]));
    let ns_b = BTreeMap::from([("team".to_string(), "b".to_string())]);
    let web_b = security_labels("shop", &labels(&[("app", "web")]), &ns_b);
    let moved = eventually(WAIT, "the new web identity", || {
        let mut c = c.clone();
        let web_b = web_b.clone();
        async move {
            let t = c.list(ListRequest {}).await.ok()?.into_inner().identities;
            find(&t, &web_b).filter(|i| i.references == 2).cloned()
        }
    })
    .await;
    assert_ne!(moved.id, web.id);
    assert_eq!(get(&mut c, web.id).await.map(|i| i.references), Ok(0));
    let mut saw_new = false;
    while !saw_new {
        if let Event::Upsert(i) = next_event(&mut stream).await {
            saw_new = i.id == moved.id && i.references == 2;
        }
    }

    // A pod deleted: its reference goes.
    watcher.delete(Kind::Pod, "shop", "web-2");
    eventually(WAIT, "web-2's release", || {
        let mut c = c.clone();
        async move { (get(&mut c, moved.id).await.ok()?.references == 1).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn bad_input_health_and_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    let mut p = start(dir.path(), &watcher, &[]);
    // wait_serving asserts the health service says SERVING.
    let mut c = IdentityClient::new(p.wait_serving().await);

    for (l, field) in [
        (&[][..], "labels"),
        (&[("app", "web")][..], "labels[\"app\"]"),
        (&[("reserved:host", "")][..], "labels[\"reserved:host\"]"),
        (&[("k8s:app", "a;b")][..], "labels[\"k8s:app\"]"),
    ] {
        let err = c
            .allocate(AllocateRequest {
                labels: labels(l),
                owner: "o".into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{l:?}");
        assert!(err.message().starts_with(field), "{l:?}: {}", err.message());
    }
    let err = c
        .release(ReleaseRequest {
            owner: String::new(),
        })
        .await
        .expect_err("empty owner");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("owner"));
    assert_eq!(get(&mut c, 4242).await, Err(Code::NotFound));
    assert!(get(&mut c, reserved::WORLD).await.expect("world").reserved);
    // Nothing was stored by the refused calls.
    let list = c.list(ListRequest {}).await.expect("List").into_inner();
    assert!(list.identities.iter().all(|i| i.reserved));

    // An open Watch must not hold up the shutdown.
    let (_, _stream) = watch(&mut c).await;
    let started = std::time::Instant::now();
    let status = p
        .terminate(Duration::from_secs(5))
        .await
        .expect("exited on SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", p.logs());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn check_config_validates_and_exits() {
    let ok = std::process::Command::new(BIN)
        .args(["--check-config", "--gc-grace-period", "1h30m"])
        .output()
        .expect("run");
    assert!(ok.status.success(), "{ok:?}");
    for (flag, value) in [("--gc-grace-period", "10x"), ("--gc-interval", "0")] {
        let out = std::process::Command::new(BIN)
            .args(["--check-config", flag, value])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{flag} {value} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

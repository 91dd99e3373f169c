//! The real ipam-svc binary against an in-process fake svc-watcher.

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use common::{
    fake_watcher::{FakeWatcher, node},
    process::{Proc, eventually},
};
use tonic::{Code, transport::Channel};
use weft_proto::{
    ipam::v1::{
        AllocationEvent, GetNodeCidrRequest, ListRequest, ListResponse, WatchRequest,
        allocation_event::Event, ipam_client::IpamClient,
    },
    watcher::v1::Kind,
};

const BIN: &str = env!("CARGO_BIN_EXE_ipam-svc");
const WAIT: Duration = Duration::from_secs(10);

fn start(dir: &Path, watcher: &FakeWatcher, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
        "--watcher".to_string(),
        watcher.url(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(BIN, &args, &dir.join("ipam.log"))
}

async fn cidr(c: &mut IpamClient<Channel>, node: &str) -> Result<String, Code> {
    c.get_node_cidr(GetNodeCidrRequest { node: node.into() })
        .await
        .map(|r| r.into_inner().cidr)
        .map_err(|s| s.code())
}

async fn wait_cidr(c: &mut IpamClient<Channel>, node: &str) -> String {
    eventually(WAIT, &format!("a CIDR for {node}"), || {
        let mut c = c.clone();
        async move { cidr(&mut c, node).await.ok() }
    })
    .await
}

async fn list(c: &mut IpamClient<Channel>) -> ListResponse {
    c.list(ListRequest {}).await.expect("List").into_inner()
}

fn table(l: &ListResponse) -> BTreeMap<String, String> {
    l.allocations
        .iter()
        .map(|a| (a.node.clone(), a.cidr.clone()))
        .collect()
}

/// Reads a Watch stream up to its SYNCED and returns the snapshot.
async fn watch_snapshot(
    c: &mut IpamClient<Channel>,
) -> (BTreeMap<String, String>, tonic::Streaming<AllocationEvent>) {
    let mut stream = c.watch(WatchRequest {}).await.expect("Watch").into_inner();
    let mut snap = BTreeMap::new();
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("watch event in time")
            .expect("watch stream")
            .expect("watch event");
        match ev.event {
            Some(Event::Allocated(a)) => {
                snap.insert(a.node, a.cidr);
            }
            Some(Event::Synced(_)) => return (snap, stream),
            other => panic!("unexpected event before SYNCED: {other:?}"),
        }
    }
}

async fn next_event(stream: &mut tonic::Streaming<AllocationEvent>) -> Event {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch event in time")
        .expect("watch stream")
        .expect("watch event")
        .event
        .expect("event set")
}

#[tokio::test]
async fn a_node_keeps_its_cidr_across_a_crash_and_frees_it_when_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    watcher.upsert(node("node-b", &[]));
    watcher.upsert(node("node-a", &[]));

    let mut p = start(dir.path(), &watcher, &[]);
    let mut c = IpamClient::new(p.wait_serving().await);
    // Lowest free block, in name order: deterministic.
    assert_eq!(wait_cidr(&mut c, "node-a").await, "10.244.0.0/24");
    assert_eq!(wait_cidr(&mut c, "node-b").await, "10.244.1.0/24");
    let before = list(&mut c).await;
    assert_eq!(before.mode, "cluster-pool");
    assert_eq!(before.pools.len(), 1);
    assert_eq!(before.pools[0].cidr, "10.244.0.0/16");
    assert_eq!((before.pools[0].total, before.pools[0].used), (256, 2));
    assert_eq!(before.pools[0].mask_size, 24);

    // SIGKILL and restart on the same state: the same table, before and
    // after the watcher is heard from again.
    p.kill();
    let mut p = start(dir.path(), &watcher, &[]);
    let mut c = IpamClient::new(p.wait_serving().await);
    assert_eq!(table(&list(&mut c).await), table(&before));
    let (snap, mut stream) = watch_snapshot(&mut c).await;
    assert_eq!(snap, table(&before));

    // node-a goes: its block is released, and a newcomer gets it.
    watcher.delete(Kind::Node, "", "node-a");
    assert_eq!(
        next_event(&mut stream).await,
        Event::Released("node-a".into())
    );
    assert_eq!(cidr(&mut c, "node-a").await, Err(Code::NotFound));
    watcher.upsert(node("node-c", &[]));
    let Event::Allocated(a) = next_event(&mut stream).await else {
        panic!("expected an allocation")
    };
    assert_eq!(
        (a.node.as_str(), a.cidr.as_str()),
        ("node-c", "10.244.0.0/24")
    );

    // List and a fresh Watch agree.
    let now = list(&mut c).await;
    let (snap, _) = watch_snapshot(&mut c).await;
    assert_eq!(table(&now), snap);
    assert_eq!(
        snap,
        BTreeMap::from([
            ("node-b".to_string(), "10.244.1.0/24".to_string()),
            ("node-c".to_string(), "10.244.0.0/24".to_string()),
        ])
    );
    let metric = p.metric("weft_ipam_releases_total").await;
    assert_eq!(metric, Some(1.0));
    assert_eq!(
        p.metric("weft_ipam_cidrs_used{pool=\"10.244.0.0/16\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn nothing_is_released_before_the_watcher_state_is_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    watcher.upsert(node("a", &[]));
    watcher.upsert(node("b", &[]));
    let mut p = start(dir.path(), &watcher, &[]);
    let mut c = IpamClient::new(p.wait_serving().await);
    wait_cidr(&mut c, "a").await;
    wait_cidr(&mut c, "b").await;
    p.kill();

    // While ipam-svc is down, b goes; the next snapshot is held unfinished.
    watcher.delete(Kind::Node, "", "b");
    watcher.hold_sync();
    let mut p = start(dir.path(), &watcher, &[]);
    let mut c = IpamClient::new(p.wait_serving().await);
    eventually(WAIT, "a subscription", || {
        let n = watcher.subscribers();
        async move { (n > 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        cidr(&mut c, "b").await.is_ok(),
        "released on a partial state"
    );

    watcher.release_sync();
    eventually(WAIT, "b's release", || {
        let mut c = c.clone();
        async move { (cidr(&mut c, "b").await == Err(Code::NotFound)).then_some(()) }
    })
    .await;
    assert!(cidr(&mut c, "a").await.is_ok());
}

#[tokio::test]
async fn a_full_pool_leaves_nodes_pending_until_a_block_frees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    for n in ["n1", "n2", "n3"] {
        watcher.upsert(node(n, &[]));
    }
    let mut p = start(
        dir.path(),
        &watcher,
        &[
            "--cluster-pool-ipv4-cidr",
            "10.9.0.0/29",
            "--cluster-pool-ipv4-mask-size",
            "30",
        ],
    );
    let mut c = IpamClient::new(p.wait_serving().await);
    assert_eq!(wait_cidr(&mut c, "n1").await, "10.9.0.0/30");
    assert_eq!(wait_cidr(&mut c, "n2").await, "10.9.0.4/30");
    assert_eq!(cidr(&mut c, "n3").await, Err(Code::NotFound));
    eventually(WAIT, "the exhausted metric", || {
        let p = &p;
        async move { (p.metric("weft_ipam_pool_exhausted_total").await == Some(1.0)).then_some(()) }
    })
    .await;
    assert!(p.logs().contains("pool exhausted"), "{}", p.logs());

    watcher.delete(Kind::Node, "", "n1");
    assert_eq!(wait_cidr(&mut c, "n3").await, "10.9.0.0/30");
    let l = list(&mut c).await;
    assert_eq!((l.pools[0].total, l.pools[0].used), (2, 2));
    // Still serving: exhaustion is not a crash.
    assert_eq!(p.terminate(WAIT).await.map(|s| s.code()), Some(Some(0)));
}

#[tokio::test]
async fn kubernetes_mode_takes_the_node_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    watcher.upsert(node("k1", &["fd00:1::/64", "10.50.3.0/24"]));
    watcher.upsert(node("k2", &[]));
    let mut p = start(dir.path(), &watcher, &["--mode", "kubernetes"]);
    let mut c = IpamClient::new(p.wait_serving().await);
    assert_eq!(wait_cidr(&mut c, "k1").await, "10.50.3.0/24");
    assert_eq!(cidr(&mut c, "k2").await, Err(Code::NotFound));
    let l = list(&mut c).await;
    assert_eq!(l.mode, "kubernetes");
    watcher.upsert(node("k2", &["10.50.4.0/24"]));
    assert_eq!(wait_cidr(&mut c, "k2").await, "10.50.4.0/24");
}

#[tokio::test]
async fn bad_requests_health_and_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    let mut p = start(dir.path(), &watcher, &[]);
    // wait_serving asserts the health service says SERVING.
    let mut c = IpamClient::new(p.wait_serving().await);
    let err = c
        .get_node_cidr(GetNodeCidrRequest {
            node: String::new(),
        })
        .await
        .expect_err("empty node");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node"), "{}", err.message());
    assert_eq!(cidr(&mut c, "nobody").await, Err(Code::NotFound));

    // An open Watch must not hold up the shutdown.
    let (_, _stream) = watch_snapshot(&mut c).await;
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
        .args([
            "--check-config",
            "--cluster-pool-ipv4-cidr",
            "10.0.0.0/16,10.1.0.0/16",
        ])
        .output()
        .expect("run");
    assert!(ok.status.success(), "{ok:?}");

    for (flags, named) in [
        (
            ["--cluster-pool-ipv4-mask-size", "16"],
            "--cluster-pool-ipv4-mask-size",
        ),
        (
            ["--cluster-pool-ipv4-mask-size", "31"],
            "--cluster-pool-ipv4-mask-size",
        ),
        (
            ["--cluster-pool-ipv4-cidr", "10.0.0.1/16"],
            "--cluster-pool-ipv4-cidr",
        ),
        (["--mode", "magic"], "--mode"),
    ] {
        let out = std::process::Command::new(BIN)
            .arg("--check-config")
            .args(flags)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{flags:?} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
}

//! ipam-svc with `--store kubernetes`: real processes against the fake API
//! server (real HTTP, NodeCIDR custom resources), nodes from a fake
//! svc-watcher.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    fake_watcher::{FakeWatcher, node},
    process::{Proc, eventually, health_becomes},
};
use rand::{Rng as _, seq::SliceRandom as _};
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use weft_fake_apiserver::{Failure, FakeApiServer, Restart};
use weft_proto::ipam::v1::{
    GetNodeCidrRequest, ListRequest, ListResponse, WatchRequest, allocation_event::Event,
    ipam_client::IpamClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_ipam-svc");
const WAIT: Duration = Duration::from_secs(20);

/// A fake API server serving weft's CRDs, and a kubeconfig for it.
async fn api(dir: &Path) -> (FakeApiServer, PathBuf) {
    let server = FakeApiServer::start().await.expect("fake API server");
    for (_, yaml) in weft_k8s::crd::crd_files().expect("CRDs") {
        let crd: serde_json::Value = serde_yaml_value(&yaml);
        server.create(crd).expect("install CRD");
    }
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (server, kubeconfig)
}

fn serde_yaml_value(yaml: &str) -> serde_json::Value {
    serde_yaml::from_str(yaml).expect("CRD YAML")
}

fn args(dir: &Path, watcher: &FakeWatcher, kubeconfig: &Path, mask: u8) -> Vec<String> {
    vec![
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--watcher".into(),
        watcher.url(),
        "--store".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--cluster-pool-ipv4-cidr".into(),
        "10.32.0.0/16".into(),
        "--cluster-pool-ipv4-mask-size".into(),
        mask.to_string(),
    ]
}

/// Everything ever reported, checked as it is added.
#[derive(Default)]
struct Acked {
    by_node: BTreeMap<String, String>,
    by_cidr: BTreeMap<String, String>,
}

impl Acked {
    fn record(&mut self, node: String, cidr: String) {
        if let Some(old) = self.by_node.get(&node) {
            assert_eq!(old, &cidr, "{node} was reported with {old}, now {cidr}");
        }
        if let Some(holder) = self.by_cidr.get(&cidr) {
            assert_eq!(holder, &node, "{cidr} reported for {holder} and {node}");
        }
        self.by_node.insert(node.clone(), cidr.clone());
        self.by_cidr.insert(cidr, node);
    }
}

/// Records every allocation a replica streams, until its stream ends.
fn observe(channel: Channel, acked: Arc<Mutex<Acked>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = IpamClient::new(channel);
        let Ok(r) = c.watch(WatchRequest {}).await else {
            return;
        };
        let mut stream = r.into_inner();
        while let Ok(Some(ev)) = stream.message().await {
            if let Some(Event::Allocated(a)) = ev.event {
                acked.lock().expect("lock").record(a.node, a.cidr);
            }
        }
    })
}

/// NodeCIDR objects in the API: node → [cidr].
fn api_table(server: &FakeApiServer) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in server.list("weft.io/v1alpha1", "NodeCIDR") {
        let node = o["spec"]["node"].as_str().expect("node").to_string();
        let cidr = o["spec"]["cidr"].as_str().expect("cidr").to_string();
        assert_eq!(
            o["metadata"]["name"].as_str(),
            Some(cidr.replace(['.', '/'], "-").as_str())
        );
        out.entry(node).or_default().push(cidr);
    }
    out
}

fn table(l: &ListResponse) -> BTreeMap<String, String> {
    l.allocations
        .iter()
        .map(|a| (a.node.clone(), a.cidr.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_doubles_or_loses_a_cidr_in_the_api() {
    const NODES: usize = 1000;
    const CRASHES: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let args = args(dir.path(), &watcher, &kubeconfig, 28);
    let log = dir.path().join("ipam.log");

    let mut order: Vec<usize> = (0..NODES).collect();
    order.shuffle(&mut rand::rng());
    let feeder = tokio::spawn({
        let watcher = watcher.clone();
        async move {
            for chunk in order.chunks(4) {
                for i in chunk {
                    watcher.upsert(node(&format!("node-{i:04}"), &[]));
                }
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
        }
    });

    let acked = Arc::new(Mutex::new(Acked::default()));
    for _ in 0..CRASHES {
        let mut p = Proc::start(BIN, &args, &log);
        let observer = observe(p.wait_serving().await, acked.clone());
        let pause = rand::rng().random_range(100..500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        p.kill();
        observer.await.expect("no CIDR reported twice");
    }
    feeder.await.expect("feeder");

    let mut p = Proc::start(BIN, &args, &log);
    let c = IpamClient::new(p.wait_serving().await);
    let list = eventually(WAIT, "every node allocated", || {
        let mut c = c.clone();
        async move {
            let l = c.list(ListRequest {}).await.ok()?.into_inner();
            (l.allocations.len() == NODES).then_some(l)
        }
    })
    .await;
    let acked = acked.lock().expect("lock");
    assert!(
        acked.by_node.len() > 100,
        "only {} allocations were observed before the crashes",
        acked.by_node.len()
    );
    let mut fresh = Acked::default();
    for a in &list.allocations {
        fresh.record(a.node.clone(), a.cidr.clone());
    }
    for (node, cidr) in &acked.by_node {
        assert_eq!(fresh.by_node.get(node), Some(cidr), "{node} lost {cidr}");
    }
    // The API holds exactly that table: one object per node.
    let in_api = api_table(&server);
    assert_eq!(in_api.len(), NODES);
    for (node, cidrs) in &in_api {
        assert_eq!(cidrs.len(), 1, "{node} holds {cidrs:?}");
        assert_eq!(fresh.by_node.get(node), Some(&cidrs[0]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_allocate_concurrently_without_duplicates_and_agree() {
    const NODES: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut replicas = Vec::new();
    let mut observers = Vec::new();
    for r in 0..2 {
        let rdir = dir.path().join(format!("r{r}"));
        std::fs::create_dir_all(&rdir).expect("dir");
        let mut p = Proc::start(
            BIN,
            &args(&rdir, &watcher, &kubeconfig, 26),
            &rdir.join("ipam.log"),
        );
        observers.push(observe(p.wait_serving().await, acked.clone()));
        replicas.push(p);
    }
    // Nodes arrive in bursts; both replicas race for every one.
    for chunk in (0..NODES).collect::<Vec<_>>().chunks(10) {
        for i in chunk {
            watcher.upsert(node(&format!("node-{i:03}"), &[]));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut tables = Vec::new();
    for p in &mut replicas {
        let c = IpamClient::new(p.wait_serving().await);
        tables.push(
            eventually(WAIT, "every node allocated on each replica", || {
                let mut c = c.clone();
                async move {
                    let l = c.list(ListRequest {}).await.ok()?.into_inner();
                    (l.allocations.len() == NODES).then(|| table(&l))
                }
            })
            .await,
        );
    }
    assert_eq!(tables[0], tables[1], "the replicas disagree");
    let in_api = eventually(WAIT, "one object per node in the API", || async {
        let t = api_table(&server);
        (t.len() == NODES && t.values().all(|c| c.len() == 1)).then_some(t)
    })
    .await;
    for (node, cidrs) in in_api {
        assert_eq!(tables[0].get(&node), Some(&cidrs[0]));
    }
    // Some creates really raced.
    assert!(server.stats().conflicts > 0, "{:?}", server.stats());

    // A node goes: both replicas release it.
    watcher.delete(weft_proto::watcher::v1::Kind::Node, "", "node-000");
    for p in &mut replicas {
        let c = IpamClient::new(p.wait_serving().await);
        eventually(WAIT, "node-000 released", || {
            let mut c = c.clone();
            async move {
                let l = c.list(ListRequest {}).await.ok()?.into_inner();
                (l.allocations.len() == NODES - 1).then_some(())
            }
        })
        .await;
    }
    assert!(!api_table(&server).contains_key("node-000"));
    drop(replicas);
    for o in observers {
        o.await
            .expect("no CIDR reported for two nodes, nor two for one node");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_taken_behind_the_replicas_back_is_a_conflict_it_recovers_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let mut p = Proc::start(
        BIN,
        &args(dir.path(), &watcher, &kubeconfig, 24),
        &dir.path().join("ipam.log"),
    );
    let c = IpamClient::new(p.wait_serving().await);
    // The replica stops hearing about changes...
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: Some("watch=true".into()),
        code: 500,
        remaining: usize::MAX,
    });
    server.drop_watches();
    // ... while someone else claims the lowest block for a node that
    // exists in the cluster.
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "elsewhere"}}))
        .expect("node");
    server
        .create(json!({
            "apiVersion": "weft.io/v1alpha1", "kind": "NodeCIDR",
            "metadata": {"name": "10-32-0-0-24", "labels": {"weft.io/node": "elsewhere"}},
            "spec": {"node": "elsewhere", "cidr": "10.32.0.0/24"},
        }))
        .expect("claim");
    let conflicts = server.stats().conflicts;
    watcher.upsert(node("n1", &[]));
    let got = eventually(WAIT, "n1 allocated", || {
        let mut c = c.clone();
        async move {
            let l = c.list(ListRequest {}).await.ok()?.into_inner();
            table(&l).get("n1").cloned()
        }
    })
    .await;
    assert_eq!(got, "10.32.1.0/24");
    assert!(server.stats().conflicts > conflicts, "the create hit 409");
    // The other claim is kept: its node still exists in the API.
    let l = IpamClient::new(p.wait_serving().await)
        .list(ListRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        table(&l).get("elsewhere").map(String::as_str),
        Some("10.32.0.0/24")
    );
    assert_eq!(api_table(&server).len(), 2);
    server.clear_failures();
}

/// Runs `call` and says how long it took; panics beyond `limit`.
async fn timed<T>(limit: Duration, what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"));
    (out, started.elapsed())
}

/// The API server gone (connections refused) while a new node waits for
/// its block: GetNodeCidr and List are answered from memory at once,
/// health turns NOT_SERVING after the bound, and once the API server is
/// back health is SERVING again and the node gets its block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_api_outage_reads_answer_from_memory_and_allocation_resumes_after() {
    const BOUND: Duration = Duration::from_secs(2);
    const OUTAGE: Duration = Duration::from_secs(6);
    const SERVICE: &str = "weft.ipam.v1.Ipam";
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    watcher.upsert(node("node-a", &[]));
    let mut args = args(dir.path(), &watcher, &kubeconfig, 24);
    args.extend(["--api-retry-budget", "4s", "--api-unready-after", "2s"].map(String::from));
    let mut p = Proc::start(BIN, &args, &dir.path().join("ipam.log"));
    let channel = p.wait_serving().await;
    let c = IpamClient::new(channel.clone());
    let cidr_of = |node: &'static str| {
        let mut c = c.clone();
        async move {
            c.get_node_cidr(GetNodeCidrRequest { node: node.into() })
                .await
                .map(|r| r.into_inner().cidr)
        }
    };
    let a = eventually(WAIT, "node-a's block", || async {
        cidr_of("node-a").await.ok()
    })
    .await;

    server.go_away().await;
    let outage = Instant::now();
    // A node joins: its block waits for the API.
    watcher.upsert(node("node-b", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (got, took) = timed(Duration::from_secs(1), "GetNodeCidr", cidr_of("node-a")).await;
    assert_eq!(got.expect("node-a's block during the outage"), a);
    println!(
        "ipam-svc GetNodeCidr answered in {:.3} s with an allocation pending while the API server was gone",
        took.as_secs_f64()
    );
    let (list, _) = timed(
        Duration::from_secs(1),
        "List",
        c.clone().list(ListRequest {}),
    )
    .await;
    assert_eq!(
        table(&list.expect("List during the outage").into_inner()),
        BTreeMap::from([("node-a".to_string(), a.clone())])
    );
    let (b, _) = timed(Duration::from_secs(1), "GetNodeCidr", cidr_of("node-b")).await;
    assert_eq!(b.expect_err("no block yet").code(), tonic::Code::NotFound);

    health_becomes(&channel, SERVICE, ServingStatus::NotServing, WAIT).await;
    let unready_at = outage.elapsed();
    println!(
        "ipam-svc NOT_SERVING {:.1} s into the outage (bound {BOUND:?})",
        unready_at.as_secs_f64()
    );
    assert!(
        unready_at >= BOUND - Duration::from_millis(300),
        "{unready_at:?}"
    );
    assert!(
        unready_at < BOUND + Duration::from_secs(2),
        "{unready_at:?}"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(outage.elapsed())).await;
    assert_eq!(
        timed(
            Duration::from_secs(1),
            "List",
            c.clone().list(ListRequest {})
        )
        .await
        .0
        .expect("List")
        .into_inner()
        .allocations
        .len(),
        1
    );

    server
        .come_back(Restart::KeepingHistory)
        .await
        .expect("listening again");
    let back = Instant::now();
    health_becomes(&channel, SERVICE, ServingStatus::Serving, WAIT).await;
    let serving = back.elapsed();
    let b = eventually(WAIT, "node-b's block", || async {
        cidr_of("node-b").await.ok()
    })
    .await;
    let allocated = back.elapsed();
    println!(
        "ipam-svc SERVING {:.2} s after the API server returned from a {} s outage; node-b's block {b} at {:.2} s",
        serving.as_secs_f64(),
        OUTAGE.as_secs(),
        allocated.as_secs_f64()
    );
    assert!(serving < Duration::from_secs(3), "{serving:?}");
    // The node's retry backs off to 5 s at most.
    assert!(allocated < Duration::from_secs(7), "{allocated:?}");
    assert_ne!(a, b);
    assert_eq!(api_table(&server).len(), 2);
}

//! identity-svc with `--store kubernetes`: real processes against the fake
//! API server (real HTTP, SecurityIdentity custom resources).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    fake_watcher::FakeWatcher,
    process::{Proc, eventually, health_becomes},
};
use rand::Rng as _;
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use weft_fake_apiserver::{Failure, FakeApiServer};
use weft_proto::identity::v1::{
    AllocateRequest, GetRequest, ListRequest, ReleaseRequest, SecurityIdentity as Identity,
    identity_client::IdentityClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_identity-svc");
const WAIT: Duration = Duration::from_secs(20);

async fn api(dir: &Path) -> (FakeApiServer, PathBuf) {
    let server = FakeApiServer::start().await.expect("fake API server");
    for (_, yaml) in weft_k8s::crd::crd_files().expect("CRDs") {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).expect("CRD YAML");
        server.create(crd).expect("install CRD");
    }
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (server, kubeconfig)
}

fn args(dir: &Path, watcher: &FakeWatcher, kubeconfig: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--watcher".into(),
        watcher.url(),
        "--store".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn set_labels(set: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("k8s:app".to_string(), set.to_string()),
        (
            "k8s:io.kubernetes.pod.namespace".to_string(),
            "kube".to_string(),
        ),
    ])
}

/// Everything ever acknowledged, checked as it is added.
#[derive(Default)]
struct Acked {
    by_set: BTreeMap<String, u32>,
    by_id: BTreeMap<u32, String>,
}

impl Acked {
    fn record(&mut self, set: String, id: u32) {
        if let Some(old) = self.by_set.get(&set) {
            assert_eq!(*old, id, "{set} was {old}, now {id}");
        }
        if let Some(other) = self.by_id.get(&id) {
            assert_eq!(other, &set, "{id} given to {other} and {set}");
        }
        self.by_set.insert(set.clone(), id);
        self.by_id.insert(id, set);
    }
}

/// SecurityIdentity objects in the API: number → (app label, owners).
fn api_table(server: &FakeApiServer) -> BTreeMap<u32, (String, Vec<String>)> {
    server
        .list("weft.io/v1alpha1", "SecurityIdentity")
        .into_iter()
        .map(|o| {
            let id = o["metadata"]["name"]
                .as_str()
                .and_then(|n| n.parse().ok())
                .expect("numeric name");
            let app = o["spec"]["labels"]["k8s:app"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let owners = o["spec"]["owners"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (id, (app, owners))
        })
        .collect()
}

fn allocated(list: &[Identity]) -> BTreeMap<u32, (String, u32)> {
    list.iter()
        .filter(|i| !i.reserved)
        .map(|i| {
            (
                i.id,
                (
                    i.labels.get("k8s:app").cloned().unwrap_or_default(),
                    i.references,
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_doubles_or_loses_an_identity_in_the_api() {
    const TARGET: usize = 1000;
    const CRASHES: usize = 5;
    const CLIENTS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let args = args(dir.path(), &watcher, &kubeconfig, &[]);
    let log = dir.path().join("identity.log");
    let acked = Arc::new(Mutex::new(Acked::default()));
    let next_set = Arc::new(AtomicUsize::new(0));

    for round in 0..=CRASHES {
        let mut p = Proc::start(BIN, &args, &log);
        let channel = p.wait_serving().await;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let channel = channel.clone();
                let acked = acked.clone();
                let next_set = next_set.clone();
                tokio::spawn(async move {
                    let mut c = IdentityClient::new(channel);
                    while acked.lock().expect("lock").by_set.len() < TARGET {
                        let set = format!("set-{}", next_set.fetch_add(1, Ordering::SeqCst));
                        let r = c
                            .allocate(AllocateRequest {
                                labels: set_labels(&set),
                                owner: format!("owner-{set}"),
                            })
                            .await;
                        match r {
                            Ok(i) => acked.lock().expect("lock").record(set, i.into_inner().id),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        if round < CRASHES {
            let pause = rand::rng().random_range(100..400);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            p.kill();
        }
        for c in clients {
            c.await.expect("no number given to two sets");
        }
    }
    assert!(acked.lock().expect("lock").by_set.len() >= TARGET);

    // A fresh start reloads from the API: every acknowledged set with its
    // number and its owner.
    let mut p = Proc::start(BIN, &args, &log);
    let mut c = IdentityClient::new(p.wait_serving().await);
    let list = c.list(ListRequest {}).await.expect("List").into_inner();
    let acked = acked.lock().expect("lock");
    let mut fresh = Acked::default();
    for (id, (set, refs)) in allocated(&list.identities) {
        fresh.record(set, id);
        assert_eq!(refs, 1, "identity {id}");
    }
    for (set, id) in &acked.by_set {
        assert_eq!(fresh.by_set.get(set), Some(id), "{set} lost {id}");
    }
    let in_api = api_table(&server);
    assert_eq!(in_api.len(), fresh.by_set.len(), "one object per identity");
    for (id, (set, owners)) in in_api {
        assert_eq!(fresh.by_id.get(&id), Some(&set));
        assert_eq!(owners, vec![format!("owner-{set}")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_give_each_set_one_number_and_agree() {
    const SETS: usize = 150;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let mut replicas = Vec::new();
    for r in 0..2 {
        let rdir = dir.path().join(format!("r{r}"));
        std::fs::create_dir_all(&rdir).expect("dir");
        let mut p = Proc::start(
            BIN,
            &args(&rdir, &watcher, &kubeconfig, &[]),
            &rdir.join("identity.log"),
        );
        p.wait_serving().await;
        replicas.push(p);
    }
    // Both replicas are asked for every set at the same time, by different
    // owners.
    let acked = Arc::new(Mutex::new(BTreeMap::<(usize, usize), u32>::new()));
    let mut tasks = Vec::new();
    for (r, p) in replicas.iter_mut().enumerate() {
        for k in 0..2 {
            let channel = p.wait_serving().await;
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = IdentityClient::new(channel);
                for i in (k..SETS).step_by(2) {
                    let set = format!("shared-{i}");
                    let id = c
                        .allocate(AllocateRequest {
                            labels: set_labels(&set),
                            owner: format!("r{r}-{set}"),
                        })
                        .await
                        .expect("Allocate")
                        .into_inner()
                        .id;
                    acked.lock().expect("lock").insert((r, i), id);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("allocations");
    }
    let acked = acked.lock().expect("lock").clone();
    let mut numbers = BTreeSet::new();
    for i in 0..SETS {
        assert_eq!(acked[&(0, i)], acked[&(1, i)], "set {i} got two numbers");
        assert!(numbers.insert(acked[&(0, i)]), "a number given to two sets");
    }
    // Both replicas end with the same table: every set, both references.
    let mut tables = Vec::new();
    for p in &mut replicas {
        let c = IdentityClient::new(p.wait_serving().await);
        tables.push(
            eventually(WAIT, "the whole table on each replica", || {
                let mut c = c.clone();
                async move {
                    let l = c.list(ListRequest {}).await.ok()?.into_inner();
                    let t = allocated(&l.identities);
                    (t.len() == SETS && t.values().all(|(_, refs)| *refs == 2)).then_some(t)
                }
            })
            .await,
        );
    }
    assert_eq!(tables[0], tables[1], "the replicas disagree");
    // The replicas really raced (creates of a taken number, stale owners).
    assert!(server.stats().conflicts > 0, "{:?}", server.stats());
    let in_api = eventually(WAIT, "one object per set in the API", || async {
        let t = api_table(&server);
        (t.len() == SETS).then_some(t)
    })
    .await;
    for (id, (set, owners)) in in_api {
        assert_eq!(tables[0].get(&id).map(|(s, _)| s), Some(&set));
        assert_eq!(owners, vec![format!("r0-{set}"), format!("r1-{set}")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_update_gets_409_and_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let gc = ["--gc-grace-period", "500ms", "--gc-interval", "100ms"];
    let mut p = Proc::start(
        BIN,
        &args(dir.path(), &watcher, &kubeconfig, &gc),
        &dir.path().join("identity.log"),
    );
    let mut c = IdentityClient::new(p.wait_serving().await);
    let allocate = |owner: &str| AllocateRequest {
        labels: set_labels("web"),
        owner: owner.into(),
    };
    let id = c
        .allocate(allocate("o1"))
        .await
        .expect("Allocate")
        .into_inner()
        .id;

    // The replica stops hearing of changes, and someone else adds an owner:
    // the replica's resourceVersion is stale now.
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: Some("watch=true".into()),
        code: 500,
        remaining: usize::MAX,
    });
    server.drop_watches();
    let mut object = server
        .list("weft.io/v1alpha1", "SecurityIdentity")
        .pop()
        .expect("the identity object");
    object["spec"]["owners"] = json!(["external", "o1"]);
    server
        .apply(object)
        .expect("update behind the replica's back");
    let conflicts = server.stats().conflicts;

    let again = c
        .allocate(allocate("o2"))
        .await
        .expect("Allocate")
        .into_inner();
    assert_eq!(again.id, id);
    assert!(server.stats().conflicts > conflicts, "the update hit 409");
    assert_eq!(
        api_table(&server)[&id].1,
        vec!["external".to_string(), "o1".into(), "o2".into()],
        "the retried update kept the other writer's owner"
    );

    // Once the watch is back, the replica's table has all three references.
    server.clear_failures();
    eventually(WAIT, "three references", || {
        let mut c = c.clone();
        async move {
            let l = c.list(ListRequest {}).await.ok()?.into_inner();
            (allocated(&l.identities).get(&id).map(|(_, r)| *r) == Some(3)).then_some(())
        }
    })
    .await;

    // Releasing every owner lets the identity be collected: the object goes.
    for owner in ["o1", "o2"] {
        c.release(ReleaseRequest {
            owner: owner.into(),
        })
        .await
        .expect("Release");
    }
    let mut object = server
        .list("weft.io/v1alpha1", "SecurityIdentity")
        .pop()
        .expect("the identity object");
    object["spec"]["owners"] = json!([]);
    server.apply(object).expect("the external owner lets go");
    eventually(WAIT, "the identity collected", || async {
        api_table(&server).is_empty().then_some(())
    })
    .await;
}

/// Runs `call` and says how long it took; panics beyond `limit`.
async fn timed<T>(limit: Duration, what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"));
    (out, started.elapsed())
}

/// The API answers 503 to everything: List and Get are answered from
/// memory at once while an Allocate waits for the API, health turns
/// NOT_SERVING after the bound, the Allocate fails within the retry
/// budget (not minutes inside the client), a later one fails at once, and
/// after the API is back health is SERVING again and allocations work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_api_outage_reads_answer_from_memory_and_writes_fail_within_the_budget() {
    const BUDGET: Duration = Duration::from_secs(4);
    const BOUND: Duration = Duration::from_secs(2);
    const SERVICE: &str = "weft.identity.v1.Identity";
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig) = api(dir.path()).await;
    let watcher = FakeWatcher::start().await;
    let flags = ["--api-retry-budget", "4s", "--api-unready-after", "2s"];
    let mut p = Proc::start(
        BIN,
        &args(dir.path(), &watcher, &kubeconfig, &flags),
        &dir.path().join("identity.log"),
    );
    let channel = p.wait_serving().await;
    let mut c = IdentityClient::new(channel.clone());
    let allocate = |set: &str| AllocateRequest {
        labels: set_labels(set),
        owner: format!("owner-{set}"),
    };
    let before = c
        .allocate(allocate("before"))
        .await
        .expect("Allocate")
        .into_inner();

    server.set_unavailable(true);
    let outage = Instant::now();
    let pending = tokio::spawn({
        let mut c = c.clone();
        async move {
            let started = Instant::now();
            let r = c.allocate(allocate("during")).await;
            (r, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the Allocate waits for the API");

    // Reads do not wait for it.
    let (list, took) = timed(Duration::from_secs(1), "List", c.list(ListRequest {})).await;
    let list = list.expect("List during the outage").into_inner();
    assert!(allocated(&list.identities).contains_key(&before.id));
    println!(
        "identity-svc List answered in {:.3} s with an Allocate pending in a 503 outage",
        took.as_secs_f64()
    );
    let (got, took) = timed(
        Duration::from_secs(1),
        "Get",
        c.get(GetRequest { id: before.id }),
    )
    .await;
    assert_eq!(got.expect("Get during the outage").into_inner(), before);
    assert!(took < Duration::from_secs(1));

    // Health says what is true, after the bound.
    health_becomes(&channel, SERVICE, ServingStatus::NotServing, BUDGET + WAIT).await;
    let unready_at = outage.elapsed();
    println!(
        "identity-svc NOT_SERVING {:.1} s into the outage (bound {BOUND:?})",
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

    // The pending Allocate fails within the budget, as Unavailable.
    let (result, took) = pending.await.expect("allocate task");
    let err = result.expect_err("no identity without the API");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    println!(
        "identity-svc's pending Allocate failed after {:.1} s (retry budget {BUDGET:?})",
        took.as_secs_f64()
    );
    assert!(took < BUDGET + Duration::from_secs(2), "{took:?}");
    // The API has failed for a whole budget: the next write tries once.
    let (again, took) = timed(
        Duration::from_secs(3),
        "Allocate after the budget",
        c.allocate(allocate("later")),
    )
    .await;
    assert_eq!(
        again.expect_err("still down").code(),
        tonic::Code::Unavailable
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let (list, _) = timed(Duration::from_secs(1), "List", c.list(ListRequest {})).await;
    assert_eq!(
        allocated(&list.expect("List").into_inner().identities).len(),
        1,
        "nothing half-written is shown"
    );

    server.set_unavailable(false);
    let back = Instant::now();
    health_becomes(&channel, SERVICE, ServingStatus::Serving, WAIT).await;
    let serving = back.elapsed();
    let id = c
        .allocate(allocate("during"))
        .await
        .expect("Allocate after the outage")
        .into_inner()
        .id;
    let writable = back.elapsed();
    println!(
        "identity-svc SERVING {:.2} s after the API answered again, first allocation done at {:.2} s",
        serving.as_secs_f64(),
        writable.as_secs_f64()
    );
    assert!(serving < Duration::from_secs(3), "{serving:?}");
    assert_ne!(id, before.id);
    assert_eq!(api_table(&server).len(), 2);
}

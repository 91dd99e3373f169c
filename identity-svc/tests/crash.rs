//! SIGKILL at random moments while clients allocate: no number may ever be
//! reported for two label sets, and every acknowledged allocation must
//! still be there, with the same number, after each restart.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{fake_watcher::FakeWatcher, process::Proc};
use rand::Rng as _;
use weft_proto::identity::v1::{AllocateRequest, ListRequest, identity_client::IdentityClient};

const BIN: &str = env!("CARGO_BIN_EXE_identity-svc");
/// At least this many kills, and more until...
const CRASHES: usize = 5;
/// ...at least this many allocations were acknowledged across them.
const ALLOCATIONS: usize = 1000;
const CLIENTS: usize = 4;

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

fn set_labels(set: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("k8s:app".to_string(), set.to_string()),
        (
            "k8s:io.kubernetes.pod.namespace".to_string(),
            "crash".to_string(),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_doubles_or_loses_an_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    let args = vec![
        "--state-dir".to_string(),
        dir.path().join("state").display().to_string(),
        "--watcher".to_string(),
        watcher.url(),
    ];
    let log = dir.path().join("identity.log");
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut next_set = 0usize;

    let mut crashes = 0;
    while crashes < CRASHES || acked.lock().expect("lock").by_set.len() < ALLOCATIONS {
        assert!(
            crashes < 100,
            "too few allocations acknowledged between crashes"
        );
        crashes += 1;
        let mut p = Proc::start(BIN, &args, &log);
        let channel = p.wait_serving().await;
        // Clients allocate distinct sets (each with its own owner) as fast
        // as they can until the process dies under them.
        let clients: Vec<_> = (0..CLIENTS)
            .map(|k| {
                let channel = channel.clone();
                let acked = acked.clone();
                let base = next_set + k * 10_000;
                tokio::spawn(async move {
                    let mut c = IdentityClient::new(channel);
                    for n in 0.. {
                        let set = format!("set-{}", base + n);
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
        next_set += CLIENTS * 10_000;
        let pause = rand::rng().random_range(100..600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        p.kill();
        for c in clients {
            c.await.expect("no number given to two sets");
        }
    }

    // A last start on the same state: every acknowledged set is there with
    // its number, and no number stands for two sets.
    let mut p = Proc::start(BIN, &args, &log);
    let mut c = IdentityClient::new(p.wait_serving().await);
    let list = c.list(ListRequest {}).await.expect("List").into_inner();
    let acked = acked.lock().expect("lock");
    println!(
        "{} allocations acknowledged across {crashes} SIGKILLs; {} identities after the last restart",
        acked.by_set.len(),
        list.identities.iter().filter(|i| !i.reserved).count()
    );
    let mut fresh = Acked::default();
    for i in list.identities.iter().filter(|i| !i.reserved) {
        let set = i.labels.get("k8s:app").cloned().expect("app label");
        fresh.record(set, i.id);
        assert_eq!(i.references, 1, "{i:?}");
    }
    for (set, id) in &acked.by_set {
        assert_eq!(fresh.by_set.get(set), Some(id), "{set} lost {id}");
    }
    drop(p);
}

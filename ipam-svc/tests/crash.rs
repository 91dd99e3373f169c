//! SIGKILL at random moments while nodes keep arriving: no CIDR may ever be
//! reported for two nodes, and every reported allocation must still be there
//! after each restart.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    fake_watcher::{FakeWatcher, node},
    process::{Proc, eventually},
};
use rand::{Rng as _, seq::SliceRandom as _};
use weft_proto::ipam::v1::{
    ListRequest, WatchRequest, allocation_event::Event, ipam_client::IpamClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_ipam-svc");
const NODES: usize = 1000;
const CRASHES: usize = 5;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_doubles_or_loses_a_cidr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watcher = FakeWatcher::start().await;
    let args = vec![
        "--state-dir".to_string(),
        dir.path().join("state").display().to_string(),
        "--watcher".to_string(),
        watcher.url(),
        "--cluster-pool-ipv4-cidr".to_string(),
        "10.32.0.0/16".to_string(),
        "--cluster-pool-ipv4-mask-size".to_string(),
        "28".to_string(),
    ];
    let log = dir.path().join("ipam.log");

    // Nodes keep appearing across the crashes, in random name order: a
    // restart that forgot allocations would redo them in name order among
    // the nodes that arrived meanwhile, and hand out different blocks.
    let mut order: Vec<usize> = (0..NODES).collect();
    order.shuffle(&mut rand::rng());
    let feeder = tokio::spawn({
        let watcher = watcher.clone();
        async move {
            for i in order {
                watcher.upsert(node(&format!("node-{i:04}"), &[]));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    let acked = Arc::new(Mutex::new(Acked::default()));
    // At least CRASHES kills, and more until every node has arrived: the
    // kills fall all through the 1,000 allocations.
    let mut crashes = 0;
    while crashes < CRASHES || !feeder.is_finished() {
        crashes += 1;
        let mut p = Proc::start(BIN, &args, &log);
        let channel = p.wait_serving().await;
        let observer = tokio::spawn({
            let acked = acked.clone();
            async move {
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
            }
        });
        let pause = rand::rng().random_range(50..500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        p.kill();
        // The stream ends with the process; a panic in `record` fails here.
        observer.await.expect("no CIDR reported twice");
    }
    feeder.await.expect("feeder");

    // A last start on the same state: every node gets a block, every block
    // reported before a crash is still its node's, and none is shared.
    let mut p = Proc::start(BIN, &args, &log);
    let c = IpamClient::new(p.wait_serving().await);
    let list = eventually(Duration::from_secs(10), "every node allocated", || {
        let mut c = c.clone();
        async move {
            let l = c.list(ListRequest {}).await.ok()?.into_inner();
            (l.allocations.len() == NODES).then_some(l)
        }
    })
    .await;
    let acked = acked.lock().expect("lock");
    assert!(
        acked.by_node.len() > NODES / 10,
        "only {} allocations were observed before the crashes",
        acked.by_node.len()
    );
    println!(
        "{} allocations acknowledged across {crashes} SIGKILLs; all {NODES} nodes hold distinct blocks after the last restart",
        acked.by_node.len()
    );
    let mut fresh = Acked::default();
    for a in &list.allocations {
        fresh.record(a.node.clone(), a.cidr.clone());
    }
    for (node, cidr) in &acked.by_node {
        assert_eq!(fresh.by_node.get(node), Some(cidr), "{node} lost {cidr}");
    }
    assert_eq!(list.pools[0].used, NODES as u64);
}

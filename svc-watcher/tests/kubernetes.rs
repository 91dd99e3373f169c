//! The real svc-watcher binary with `--source kubernetes` against the fake
//! API server (real HTTP list/watch), read the way every weft service reads
//! it: `weft_common::watch::subscribe` into a `Mirror`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use futures::{Stream, StreamExt as _};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weft_common::watch::{Mirror, ObjKey};
use weft_fake_apiserver::{Failure, FakeApiServer, Restart};
use weft_proto::watcher::v1::{
    ListRequest, Resource, StatusRequest, StatusResponse, WatchEvent, resource,
    watcher_client::WatcherClient,
};

/// The fixture manifests as API objects (lists flattened).
fn fixture_objects() -> Vec<Value> {
    fn collect(v: Value, out: &mut Vec<Value>) {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        if let Some(item_kind) = kind.strip_suffix("List") {
            let api_version = v["apiVersion"].clone();
            for mut item in v["items"].as_array().cloned().unwrap_or_default() {
                if !item_kind.is_empty() {
                    item["kind"] = json!(item_kind);
                    item["apiVersion"] = api_version.clone();
                }
                collect(item, out);
            }
        } else if !v.is_null() {
            out.push(v);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![fixtures()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                collect(v, &mut out);
            }
        }
    }
    out
}

async fn seeded_api() -> FakeApiServer {
    let server = FakeApiServer::start().await.unwrap();
    for o in fixture_objects() {
        // Kinds the API does not serve (the fixtures hold a few that
        // svc-watcher must ignore) are refused there, as a real server would.
        if let Err(e) = server.apply(o.clone()) {
            assert_eq!(e.code, 400, "{o}: {e}");
        }
    }
    server
}

struct Running {
    watcher: Watcher,
    _dir: tempfile::TempDir,
}

fn start_watcher(server: &FakeApiServer) -> Running {
    start_watcher_with(server, &[])
}

fn start_watcher_with(server: &FakeApiServer, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--source".as_ref(),
        "kubernetes".as_ref(),
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    let watcher = Watcher::start_with(&args);
    Running { watcher, _dir: dir }
}

/// (key, resourceVersion) of every object the API serves, in the watcher's
/// kinds.
fn api_state(server: &FakeApiServer) -> BTreeSet<(String, String)> {
    let kinds = [
        ("v1", "Service", "KIND_SERVICE", true),
        (
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "KIND_ENDPOINT_SLICE",
            true,
        ),
        ("v1", "Pod", "KIND_POD", true),
        ("v1", "Node", "KIND_NODE", false),
        ("v1", "Namespace", "KIND_NAMESPACE", false),
        (
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "KIND_NETWORK_POLICY",
            true,
        ),
    ];
    let mut out = BTreeSet::new();
    for (api_version, kind, tag, namespaced) in kinds {
        for o in server.list(api_version, kind) {
            let m = &o["metadata"];
            let name = m["name"].as_str().unwrap();
            let key = if namespaced {
                format!("{tag}/{}/{name}", m["namespace"].as_str().unwrap())
            } else {
                format!("{tag}/{name}")
            };
            out.insert((key, m["resourceVersion"].as_str().unwrap().to_string()));
        }
    }
    out
}

fn meta_rv(r: &Resource) -> String {
    let meta = match r.kind.as_ref().unwrap() {
        resource::Kind::Service(o) => &o.meta,
        resource::Kind::EndpointSlice(o) => &o.meta,
        resource::Kind::Pod(o) => &o.meta,
        resource::Kind::Node(o) => &o.meta,
        resource::Kind::Namespace(o) => &o.meta,
        resource::Kind::NetworkPolicy(o) => &o.meta,
    };
    meta.as_ref().unwrap().resource_version.clone()
}

fn mirror_state(m: &Mirror) -> BTreeSet<(String, String)> {
    m.objects()
        .map(|(k, r)| (k.to_string(), meta_rv(&r)))
        .collect()
}

/// Feeds the mirror until `done` holds for it.
async fn until(
    events: &mut (impl Stream<Item = WatchEvent> + Unpin),
    mirror: &mut Mirror,
    what: &str,
    done: impl Fn(&Mirror) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !(mirror.is_synced() && done(mirror)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(e)) => {
                mirror.apply(&e);
            }
            _ => panic!(
                "timed out waiting for {what}; mirror holds {:?}",
                mirror_state(mirror)
            ),
        }
    }
}

fn subscribe(addr: &str, token: &CancellationToken) -> impl Stream<Item = WatchEvent> + Unpin {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Box::pin(weft_common::watch::subscribe(
        channel,
        vec![],
        "kubernetes-test",
        token.clone(),
        None,
    ))
}

fn service_port(m: &Mirror, ns: &str, name: &str) -> Option<u32> {
    let key = ObjKey::new(weft_proto::watcher::v1::Kind::Service, ns, name);
    match m.get(&key)?.kind.as_ref()? {
        resource::Kind::Service(s) => Some(s.ports.first()?.port),
        _ => None,
    }
}

#[tokio::test]
async fn objects_in_the_api_are_served_and_changes_flow() {
    let server = seeded_api().await;
    let run = start_watcher(&server);
    let token = CancellationToken::new();
    let mut events = subscribe(&run.watcher.addr, &token);
    let mut mirror = Mirror::new();
    until(&mut events, &mut mirror, "the fixture objects", |m| {
        m.objects()
            .map(|(k, _)| format!("+{k}"))
            .collect::<BTreeSet<_>>()
            == fixture_keys()
    })
    .await;
    assert_eq!(mirror_state(&mirror), api_state(&server));
    assert_eq!(service_port(&mirror, "shop", "web"), Some(80));

    // An update, a delete and a create in the API reach the subscriber.
    let mut web = server
        .list("v1", "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "web")
        .unwrap();
    web["spec"]["ports"][0]["port"] = json!(81);
    server.apply(web).unwrap();
    server.delete("v1", "Pod", "shop", "web-1").unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b", "labels": {"team": "b"}}}))
        .unwrap();
    until(&mut events, &mut mirror, "the changes", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    assert_eq!(service_port(&mirror, "shop", "web"), Some(81));

    // An object the API accepts but weft refuses keeps the version before.
    let mut bad = server
        .list("v1", "Node")
        .into_iter()
        .find(|n| n["metadata"]["name"] == "node-a")
        .unwrap();
    bad["spec"]["podCIDR"] = json!("not-a-cidr");
    bad["spec"]["podCIDRs"] = json!(["not-a-cidr"]);
    server.apply(bad).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = run.watcher.metrics().await;
    assert!(
        metrics.contains(
            "weft_watcher_invalid_objects_total{kind=\"Node\",reason=\"invalid_cidr\"} 1"
        ),
        "{metrics}"
    );
    token.cancel();
}

#[tokio::test]
async fn a_dropped_watch_and_410_gone_end_with_exactly_the_api_state() {
    let server = seeded_api().await;
    let run = start_watcher(&server);
    let token = CancellationToken::new();
    let mut events = subscribe(&run.watcher.addr, &token);
    let mut mirror = Mirror::new();
    until(&mut events, &mut mirror, "the initial state", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    let lists_before = server.stats().lists;

    // A connection dropped mid-stream: the watches resume from their
    // resourceVersion and see what happened meanwhile, without a relist.
    server.drop_watches();
    server.delete("v1", "Pod", "shop", "web-2").unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}}))
        .unwrap();
    until(
        &mut events,
        &mut mirror,
        "the state after a dropped watch",
        |m| mirror_state(m) == api_state(&server),
    )
    .await;
    assert_eq!(
        server.stats().lists,
        lists_before,
        "a resumed watch needs no list"
    );

    // Watches cut and kept out while objects change, then the history they
    // would resume from compacted: they get 410 Gone and list again, and
    // objects deleted meanwhile are gone for the subscribers too.
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: Some("watch=true".into()),
        code: 500,
        remaining: usize::MAX,
    });
    server.drop_watches();
    server
        .delete("v1", "Service", "kube-system", "kube-dns")
        .unwrap();
    server.delete("v1", "Namespace", "", "late").unwrap();
    server
        .delete("networking.k8s.io/v1", "NetworkPolicy", "shop", "db")
        .unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c"}, "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"]}}))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.compact();
    server.clear_failures();
    until(&mut events, &mut mirror, "the state after 410 Gone", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    assert!(server.stats().gone > 0, "{:?}", server.stats());
    assert!(server.stats().lists > lists_before);
    let keys: BTreeSet<String> = mirror.objects().map(|(k, _)| k.to_string()).collect();
    assert!(!keys.contains("KIND_SERVICE/kube-system/kube-dns"));
    assert!(keys.contains("KIND_NODE/node-c"));

    let metrics = run.watcher.metrics().await;
    let relists: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_watcher_relists_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(relists >= 1.0, "{metrics}");
    assert!(
        metrics.contains("weft_watcher_watch_errors_total{"),
        "{metrics}"
    );
    token.cancel();
}

#[tokio::test]
async fn nothing_is_served_before_every_kind_was_listed() {
    let server = seeded_api().await;
    // Network policies cannot be listed yet.
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: Some("/networkpolicies".into()),
        code: 500,
        remaining: usize::MAX,
    });
    let run = start_watcher(&server);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = async {
        let channel = Channel::from_shared(format!("http://{}", run.watcher.addr))
            .unwrap()
            .connect()
            .await
            .ok()?;
        WatcherClient::new(channel)
            .list(ListRequest::default())
            .await
            .ok()
    };
    let early = tokio::time::timeout(Duration::from_millis(500), early).await;
    assert!(
        !matches!(early, Ok(Some(_))),
        "served before the network policies were listed"
    );

    server.clear_failures();
    let mut client = run.watcher.client().await;
    let mut stream = common::subscribe(&mut client, "", 0).await;
    let snapshot = until_synced(&mut stream).await;
    assert_eq!(keys_of(&snapshot), fixture_keys());
}

#[test]
fn a_missing_kubeconfig_is_refused_at_start() {
    let out = std::process::Command::new(BIN)
        .args(["--source", "kubernetes", "--kubeconfig"])
        .arg(Path::new("/nonexistent/kubeconfig"))
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kubeconfig"), "{err}");
}

/// The Watcher service's gRPC name, as the health service knows it.
const SERVICE: &str = "weft.watcher.v1.Watcher";

fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// The health of `service`, asked with a one-second deadline: health must
/// answer at once, whatever the state of the watches.
async fn health(addr: &str, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(addr));
    let asked = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        client.check(HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("health of {service:?} did not answer within 1 s"))
    .unwrap()
    .into_inner()
    .status();
    assert!(asked.elapsed() < Duration::from_secs(1));
    answer
}

async fn status(addr: &str) -> StatusResponse {
    let mut client = WatcherClient::new(channel(addr));
    tokio::time::timeout(Duration::from_secs(1), client.status(StatusRequest {}))
        .await
        .expect("Status answers at once")
        .unwrap()
        .into_inner()
}

/// Polls the health (`""` and the Watcher service agree) until it is
/// `want`; how long that took.
async fn health_becomes(addr: &str, want: ServingStatus, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let overall = health(addr, "").await;
        let service = health(addr, SERVICE).await;
        if overall == want && service == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "health not {want:?} within {limit:?}: \"\" {overall:?}, {SERVICE} {service:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_answers_not_serving_at_once_until_every_kind_is_listed() {
    let server = seeded_api().await;
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: Some("/networkpolicies".into()),
        code: 500,
        remaining: usize::MAX,
    });
    let run = start_watcher(&server);
    let addr = &run.watcher.addr;
    // From the very start: the port answers, and says NOT_SERVING.
    let started = Instant::now();
    let first = loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break health(addr, SERVICE).await;
        }
        assert!(started.elapsed() < WAIT, "the port never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "svc-watcher health answered {first:?} {:.2} s after start",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(first, ServingStatus::NotServing);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(health(addr, "").await, ServingStatus::NotServing);
    assert_eq!(health(addr, SERVICE).await, ServingStatus::NotServing);
    let s = status(addr).await;
    assert!(!s.ready);
    assert!(s.reason.contains("first complete list"), "{}", s.reason);

    server.clear_failures();
    health_becomes(addr, ServingStatus::Serving, WAIT).await;
    let s = status(addr).await;
    assert!(s.ready && s.reason.is_empty(), "{s:?}");
}

/// A Service's first port as the subscriber sees it.
fn web_port(m: &Mirror) -> Option<u32> {
    service_port(m, "shop", "web")
}

/// Changes the port of Service shop/web in the API.
fn set_web_port(server: &FakeApiServer, port: u32) {
    let mut web = server
        .list("v1", "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "web")
        .unwrap();
    web["spec"]["ports"][0]["port"] = json!(port);
    server.apply(web).unwrap();
}

/// How long after `since` the subscriber's mirror shows `port` for
/// shop/web.
async fn current_after(
    events: &mut (impl Stream<Item = WatchEvent> + Unpin),
    mirror: &mut Mirror,
    port: u32,
    since: Instant,
) -> Duration {
    until(events, mirror, &format!("shop/web on port {port}"), |m| {
        web_port(m) == Some(port)
    })
    .await;
    since.elapsed()
}

/// The API server gone (connections refused) for 30 s, then back after a
/// restart that lost its watch history (every watch gets 410 Gone and
/// lists again): a change made right at its return reaches a subscriber
/// within 2 s; health is NOT_SERVING while the watch is broken beyond the
/// bound (3 s here), SERVING again once it works.
#[tokio::test]
async fn after_the_api_server_was_gone_the_state_is_current_within_2s_of_its_return() {
    const BOUND: Duration = Duration::from_secs(3);
    const OUTAGE: Duration = Duration::from_secs(30);
    let server = seeded_api().await;
    let run = start_watcher_with(&server, &["--watch-unready-after", "3s"]);
    let addr = &run.watcher.addr;
    let token = CancellationToken::new();
    let mut events = subscribe(addr, &token);
    let mut mirror = Mirror::new();
    until(&mut events, &mut mirror, "the initial state", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    health_becomes(addr, ServingStatus::Serving, WAIT).await;

    // Gone: the subscriber keeps its stream; health turns NOT_SERVING
    // once the watches have been broken for the bound, and says why.
    server.go_away().await;
    let gone_at = Instant::now();
    let unready = health_becomes(addr, ServingStatus::NotServing, BOUND + WAIT).await;
    println!(
        "svc-watcher NOT_SERVING {:.1} s after the API server went away (bound {BOUND:?})",
        unready.as_secs_f64()
    );
    assert!(
        unready >= BOUND - Duration::from_millis(500),
        "NOT_SERVING before the bound: {unready:?}"
    );
    assert!(unready < BOUND + Duration::from_secs(2), "{unready:?}");
    let s = status(addr).await;
    assert!(!s.ready);
    assert!(s.reason.contains("has been broken for"), "{}", s.reason);
    // What the subscribers hold is still served.
    assert_eq!(web_port(&mirror), Some(80));
    // Objects change while the server is away; one is deleted.
    server.delete("v1", "Pod", "shop", "web-1").unwrap();
    tokio::time::sleep(OUTAGE.saturating_sub(gone_at.elapsed())).await;

    // Back, without its history; a change right at the return.
    server.come_back(Restart::LosingHistory).await.unwrap();
    let back = Instant::now();
    set_web_port(&server, 82);
    let current = current_after(&mut events, &mut mirror, 82, back).await;
    health_becomes(addr, ServingStatus::Serving, WAIT).await;
    let serving = back.elapsed();
    println!(
        "svc-watcher current {:.2} s after the API server returned from a {} s outage (watch history lost, relisted); SERVING again within {:.2} s",
        current.as_secs_f64(),
        OUTAGE.as_secs(),
        serving.as_secs_f64()
    );
    assert!(
        current < Duration::from_secs(2),
        "current {current:?} after the return"
    );
    until(&mut events, &mut mirror, "exactly the API state", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    assert!(
        !mirror_state(&mirror)
            .iter()
            .any(|(k, _)| k.contains("web-1"))
    );
    assert!(server.stats().gone > 0, "{:?}", server.stats());
    token.cancel();
}

/// Every request answered 503 for 6 s, then answered again: health NOT_SERVING
/// beyond the bound, and a change right at the return reaches a
/// subscriber within 2 s, without waiting out a back-off grown during the
/// outage.
#[tokio::test]
async fn after_503s_the_state_is_current_within_2s_of_the_api_servers_return() {
    const BOUND: Duration = Duration::from_secs(3);
    const OUTAGE: Duration = Duration::from_secs(6);
    let server = seeded_api().await;
    let run = start_watcher_with(&server, &["--watch-unready-after", "3s"]);
    let addr = &run.watcher.addr;
    let token = CancellationToken::new();
    let mut events = subscribe(addr, &token);
    let mut mirror = Mirror::new();
    until(&mut events, &mut mirror, "the initial state", |m| {
        mirror_state(m) == api_state(&server)
    })
    .await;
    health_becomes(addr, ServingStatus::Serving, WAIT).await;

    server.set_unavailable(true);
    let started = Instant::now();
    let unready = health_becomes(addr, ServingStatus::NotServing, BOUND + WAIT).await;
    assert!(
        unready >= BOUND - Duration::from_millis(500),
        "NOT_SERVING before the bound: {unready:?}"
    );
    assert!(unready < BOUND + Duration::from_secs(2), "{unready:?}");
    let reason = status(addr).await.reason;
    assert!(reason.contains("503"), "{reason}");
    tokio::time::sleep(OUTAGE.saturating_sub(started.elapsed())).await;
    let refused = server.stats().unavailable;
    assert!(refused > 6, "the watches kept trying: {refused} requests");

    server.set_unavailable(false);
    let back = Instant::now();
    set_web_port(&server, 83);
    let current = current_after(&mut events, &mut mirror, 83, back).await;
    health_becomes(addr, ServingStatus::Serving, WAIT).await;
    let serving = back.elapsed();
    println!(
        "svc-watcher current {:.2} s after the API server answered again after {} s of 503s; SERVING again within {:.2} s",
        current.as_secs_f64(),
        OUTAGE.as_secs(),
        serving.as_secs_f64()
    );
    assert!(
        current < Duration::from_secs(2),
        "current {current:?} after the return"
    );
    token.cancel();
}

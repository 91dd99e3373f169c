//! The real svc-watcher binary on a temporary copy of the fixture manifests,
//! over real gRPC.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use weft_common::watch::{Mirror, ObjKey};
use weft_proto::watcher::v1::{
    Kind, ListRequest, Protocol, Resource, ServiceType, SessionAffinity, SubscribeRequest,
    resource, watch_event::Event,
};

fn find<'a>(events: &'a [weft_proto::watcher::v1::WatchEvent], key: &str) -> &'a resource::Kind {
    events
        .iter()
        .find_map(|e| match &e.event {
            Some(Event::Upsert(r)) if format!("+{}", ObjKey::of(r).unwrap()) == key => {
                r.kind.as_ref()
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{key} not in the snapshot"))
}

#[tokio::test]
async fn the_snapshot_holds_the_fixture_objects() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    let events = until_synced(&mut stream).await;

    assert!(matches!(events[0].event, Some(Event::Reset(_))));
    let epoch = &events[0].epoch;
    let revision = events[0].revision;
    assert!(!epoch.is_empty());
    assert!(revision > 0);
    assert!(
        events
            .iter()
            .all(|e| &e.epoch == epoch && e.revision == revision),
        "snapshot events carry the snapshot's epoch and revision"
    );
    assert_eq!(keys_of(&events), fixture_keys());
    assert_eq!(events.len(), fixture_keys().len() + 2);

    let resource::Kind::Service(web) = find(&events, "+KIND_SERVICE/shop/web") else {
        panic!("not a service")
    };
    assert_eq!(web.r#type(), ServiceType::NodePort);
    assert_eq!(web.cluster_ips, vec!["10.96.10.10"]);
    assert_eq!(web.ports[0].port, 80);
    assert_eq!(web.ports[0].target_port, "8080");
    assert_eq!(web.ports[0].node_port, 30080);
    assert_eq!(web.selector["app"], "web");
    let resource::Kind::Service(dns) = find(&events, "+KIND_SERVICE/kube-system/kube-dns") else {
        panic!("not a service")
    };
    assert_eq!(dns.ports[0].protocol(), Protocol::Udp);
    assert_eq!(dns.session_affinity(), SessionAffinity::ClientIp);
    assert_eq!(dns.session_affinity_timeout_seconds, 10_800);
    let resource::Kind::EndpointSlice(slice) = find(&events, "+KIND_ENDPOINT_SLICE/shop/web-x1y2z")
    else {
        panic!("not a slice")
    };
    assert_eq!(slice.service_name, "web");
    assert_eq!(slice.endpoints[0].target_pod, "shop/web-1");
    assert!(slice.endpoints[1].terminating && slice.endpoints[1].serving);
    assert!(!slice.endpoints[1].ready);
    let resource::Kind::Pod(web2) = find(&events, "+KIND_POD/shop/web-2") else {
        panic!("not a pod")
    };
    assert!(web2.meta.as_ref().unwrap().deleting);
    assert_eq!(web2.pod_ips, vec!["10.244.2.10"]);
    let resource::Kind::Node(node_a) = find(&events, "+KIND_NODE/node-a") else {
        panic!("not a node")
    };
    assert_eq!(node_a.pod_cidrs, vec!["10.244.1.0/24"]);
    let resource::Kind::NetworkPolicy(db) = find(&events, "+KIND_NETWORK_POLICY/shop/db") else {
        panic!("not a policy")
    };
    assert_eq!(db.policy_types, vec!["Ingress", "Egress"]);
    assert_eq!(db.egress.len(), 2);

    // List agrees with the snapshot.
    let list = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&list.epoch, epoch);
    assert_eq!(list.revision, revision);
    assert_eq!(list.resources.len(), fixture_keys().len());
    let pods = client
        .list(ListRequest {
            kinds: vec![Kind::Pod as i32],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pods.resources.len(), 2);

    // Unknown kinds are refused, naming the field.
    let status = client
        .subscribe(SubscribeRequest {
            kinds: vec![Kind::Pod as i32, 99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("kinds[1]"),
        "{}",
        status.message()
    );
    let status = client
        .list(ListRequest { kinds: vec![0] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("kinds"), "{}", status.message());
}

#[tokio::test]
async fn an_edit_arrives_as_a_delta_within_a_second() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    let snapshot = until_synced(&mut stream).await;
    let snapshot_revision = snapshot[0].revision;

    // An atomic replace, as the lab writes.
    let shop = dir.path().join("shop.yaml");
    let text = fs::read_to_string(&shop).unwrap();
    let started = Instant::now();
    write_atomic(&shop, &text.replace("    port: 80\n", "    port: 81\n"));
    let event = next(&mut stream).await;
    let elapsed = started.elapsed();
    eprintln!("edit reached the subscriber after {elapsed:?}");
    assert_eq!(describe(&event), "+KIND_SERVICE/shop/web");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(event.revision, snapshot_revision + 1);
    let Some(Event::Upsert(Resource {
        kind: Some(resource::Kind::Service(web)),
    })) = &event.event
    else {
        panic!("not a service upsert")
    };
    assert_eq!(web.ports[0].port, 81);
    // Nothing else in that file changed, so nothing else is sent.
    assert!(
        maybe_next(&mut stream, Duration::from_millis(400))
            .await
            .is_none()
    );

    // A plain in-place write works too.
    let dns = dir.path().join("dns.json");
    let text = fs::read_to_string(&dns).unwrap();
    let started = Instant::now();
    fs::write(&dns, text.replace("\"ClientIP\"", "\"None\"")).unwrap();
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "+KIND_SERVICE/kube-system/kube-dns");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A new file in a new subdirectory.
    let sub = dir.path().join("team-b");
    fs::create_dir(&sub).unwrap();
    write_atomic(
        &sub.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-b}\n",
    );
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "+KIND_NAMESPACE/team-b");

    // Hidden and temporary files are not manifests.
    fs::write(
        dir.path().join(".hidden.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: hidden}\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("ns.yaml.tmp"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: temp}\n",
    )
    .unwrap();
    assert!(
        maybe_next(&mut stream, Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_deleted_file_yields_deletes() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    until_synced(&mut stream).await;

    let started = Instant::now();
    fs::remove_file(dir.path().join("policies/db.yml")).unwrap();
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "-KIND_NETWORK_POLICY/shop/db");
    assert!(started.elapsed() < Duration::from_secs(1));

    fs::remove_file(dir.path().join("shop.yaml")).unwrap();
    let mut deleted = std::collections::BTreeSet::new();
    for _ in 0..4 {
        deleted.insert(describe(&next(&mut stream).await));
    }
    assert_eq!(
        deleted,
        [
            "-KIND_SERVICE/shop/web",
            "-KIND_ENDPOINT_SLICE/shop/web-x1y2z",
            "-KIND_POD/shop/web-1",
            "-KIND_POD/shop/web-2"
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
    let list = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.resources.len(), fixture_keys().len() - 5);
}

#[tokio::test]
async fn a_malformed_file_changes_nothing_and_the_rest_flows() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    until_synced(&mut stream).await;

    // Broken YAML where the shop objects were.
    let shop = dir.path().join("shop.yaml");
    let good = fs::read_to_string(&shop).unwrap();
    write_atomic(
        &shop,
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    assert!(
        maybe_next(&mut stream, Duration::from_millis(700))
            .await
            .is_none(),
        "a file that does not parse changes nothing"
    );
    let logs = watcher.logs();
    assert!(
        logs.contains("shop.yaml") && logs.contains("does not parse"),
        "{logs}"
    );
    let metrics = watcher.metrics().await;
    assert!(
        metrics.contains("weft_watcher_invalid_objects_total{kind=\"File\",reason=\"parse\"} 1"),
        "{metrics}"
    );
    let list = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.resources.len(), fixture_keys().len());

    // An invalid object next to a valid one: the valid one flows.
    write_atomic(
        &dir.path().join("extra.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: [{port: 70000}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n",
    );
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "+KIND_NAMESPACE/extra");
    assert!(
        maybe_next(&mut stream, Duration::from_millis(300))
            .await
            .is_none()
    );
    let logs = watcher.logs();
    assert!(
        logs.contains("spec.ports[0].port: 70000 is out of range"),
        "{logs}"
    );
    assert!(logs.contains("extra.yaml"), "{logs}");
    let metrics = watcher.metrics().await;
    assert!(
        metrics.contains(
            "weft_watcher_invalid_objects_total{kind=\"Service\",reason=\"invalid_port\"} 1"
        ),
        "{metrics}"
    );

    // Repaired (with a change), the file flows again.
    write_atomic(
        &shop,
        &good.replace(
            "    app: web\nspec:\n  type",
            "    app: web2\nspec:\n  type",
        ),
    );
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "+KIND_SERVICE/shop/web");

    // The service kept serving all along.
    let metrics = watcher.metrics().await;
    assert!(metrics.contains("weft_watcher_subscribers 1"), "{metrics}");
}

#[tokio::test]
async fn resuming_yields_only_the_missed_deltas() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    let snapshot = until_synced(&mut stream).await;
    let last = snapshot.last().unwrap();
    let (epoch, revision) = (last.epoch.clone(), last.revision);
    drop(stream);

    // Two changes while away, one rescan each.
    let dns = dir.path().join("dns.json");
    let text = fs::read_to_string(&dns).unwrap();
    fs::write(&dns, text.replace("\"ClientIP\"", "\"None\"")).unwrap();
    wait_revision(&mut client, revision + 1).await;
    fs::remove_file(dir.path().join("policies/db.yml")).unwrap();
    wait_revision(&mut client, revision + 2).await;

    let mut stream = subscribe(&mut client, &epoch, revision).await;
    let events = until_synced(&mut stream).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described,
        vec![
            "+KIND_SERVICE/kube-system/kube-dns",
            "-KIND_NETWORK_POLICY/shop/db",
            "SYNCED"
        ]
    );
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, vec![revision + 1, revision + 2, revision + 2]);
    assert!(events.iter().all(|e| e.epoch == epoch));

    // A stale epoch (another incarnation) gets a snapshot.
    let mut stream = subscribe(&mut client, "some-other-epoch", revision).await;
    let events = until_synced(&mut stream).await;
    assert_eq!(describe(&events[0]), "RESET");
    assert_eq!(events.len(), fixture_keys().len() - 1 + 2);
}

async fn wait_revision(
    client: &mut weft_proto::watcher::v1::watcher_client::WatcherClient<tonic::transport::Channel>,
    at_least: u64,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = client
            .list(ListRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list.revision >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "revision stuck at {}",
            list.revision
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared client (`weft_common::watch`) against the real server: its
/// mirror ends equal to the server's state after changes.
#[tokio::test]
async fn the_shared_client_mirrors_the_state() {
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let channel = weft_common::client::lazy_channel(&format!("http://{}", watcher.addr)).unwrap();
    let shutdown = CancellationToken::new();
    let mut events = Box::pin(weft_common::watch::subscribe(
        channel,
        vec![],
        "test",
        shutdown.clone(),
        None,
    ));
    let mut mirror = Mirror::new();
    while !mirror.is_synced() {
        let e = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap();
        mirror.apply(&e);
    }
    assert_eq!(mirror.len(), fixture_keys().len());
    fs::remove_file(dir.path().join("nodes.yaml")).unwrap();
    write_atomic(
        &dir.path().join("more.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: more}\n",
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let list = client
            .list(ListRequest::default())
            .await
            .unwrap()
            .into_inner();
        let want: BTreeMap<ObjKey, Resource> = list
            .resources
            .into_iter()
            .map(|r| (ObjKey::of(&r).unwrap(), r))
            .collect();
        let have: BTreeMap<ObjKey, Resource> = mirror
            .objects()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if have == want && want.len() == fixture_keys().len() - 2 + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "mirror never caught up");
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), events.next()).await {
            mirror.apply(&e);
        }
    }
    shutdown.cancel();
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let dir = fixture_dir();
    let watcher = Watcher::start(dir.path());
    watcher.client().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", watcher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    // Readiness follows the state a moment after it is complete.
    let deadline = Instant::now() + WAIT;
    for service in ["", "weft.watcher.v1.Watcher"] {
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
            if status == ServingStatus::Serving {
                break;
            }
            assert!(Instant::now() < deadline, "service {service:?}: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn sigterm_exits_zero_promptly_with_subscribers_connected() {
    let dir = fixture_dir();
    let mut watcher = Watcher::start(dir.path());
    let mut client = watcher.client().await;
    let mut stream = subscribe(&mut client, "", 0).await;
    until_synced(&mut stream).await;
    let metrics = watcher.metrics().await;
    assert!(metrics.contains("weft_watcher_subscribers 1"), "{metrics}");

    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watcher.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = watcher.wait_exit(Duration::from_secs(5));
        (status, watcher)
    })
    .await
    .unwrap()
    .0
    .expect("svc-watcher exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The open stream ends rather than hanging.
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[test]
fn check_config_validates_and_exits() {
    let ok = Command::new(BIN)
        .arg("--check-config")
        .arg("--manifests-dir")
        .arg(fixtures())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");

    let missing = Command::new(BIN)
        .args([
            "--check-config",
            "--manifests-dir",
            "/nonexistent/weft-manifests",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--manifests-dir"),
        "{missing:?}"
    );

    let none = Command::new(BIN)
        .arg("--check-config")
        .env_remove("WEFT_MANIFESTS_DIR")
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("--manifests-dir"));

    let bad_level = Command::new(BIN)
        .args(["--check-config", "--log-level", "[[["])
        .arg("--manifests-dir")
        .arg(fixtures())
        .output()
        .unwrap();
    assert!(!bad_level.status.success());
}

//! kube-rs, unmodified, against the fake: the protocol details it relies on.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use weft_fake_apiserver::{Failure, FakeApiServer};

async fn client(server: &FakeApiServer) -> Client {
    let config = kube::Config::new(server.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

fn cm(name: &str, data: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": data}},
        "data": {"v": data},
    }))
    .unwrap()
}

#[tokio::test]
async fn crud_with_optimistic_concurrency() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let pp = PostParams::default();

    let a = api.create(&pp, &cm("a", "1")).await.unwrap();
    let rv1 = a.metadata.resource_version.clone().unwrap();
    let err = api.create(&pp, &cm("a", "2")).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err}"
    );

    // A replace carrying the current resourceVersion works, a stale one is refused.
    let mut next = a.clone();
    next.data = Some([("v".to_string(), "3".to_string())].into());
    let b = api.replace("a", &pp, &next).await.unwrap();
    let rv2 = b.metadata.resource_version.clone().unwrap();
    assert!(rv2.parse::<u64>().unwrap() > rv1.parse::<u64>().unwrap());
    let err = api.replace("a", &pp, &next).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );

    // Merge patch, and a merge patch carrying a stale resourceVersion.
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"w": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["w"], "x");
    let stale = json!({"metadata": {"resourceVersion": rv2}, "data": {"w": "y"}});
    let err = api
        .patch("a", &PatchParams::default(), &Patch::Merge(stale))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err}"
    );

    // Label selectors on lists.
    api.create(&pp, &cm("b", "2")).await.unwrap();
    let l = api
        .list(&ListParams::default().labels("app=2"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].metadata.name.as_deref(), Some("b"));
    let l = api
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);

    // Delete with a stale precondition is refused; with none it works.
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some(rv1),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    let err = api.delete("a", &dp).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err}"
    );
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let err = api.get("a").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err}"
    );

    // Injected failures.
    server.fail_next(Failure {
        method: Some("GET".into()),
        path_contains: None,
        code: 500,
        remaining: 1,
    });
    assert!(api.get("b").await.is_err());
    assert!(api.get("b").await.is_ok());
}

#[tokio::test]
async fn raw_watch_resumes_bookmarks_and_expires() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let list = api.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}))
        .unwrap();

    let mut wp = WatchParams::default().timeout(10);
    wp.bookmarks = true;
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(&first, WatchEvent::Added(ns) if ns.metadata.name.as_deref() == Some("x")));
    let mark = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(mark, WatchEvent::Bookmark(_)), "{mark:?}");

    server.compact();
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    let gone = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(&gone, WatchEvent::Error(e) if e.code == 410),
        "{gone:?}"
    );
}

#[tokio::test]
async fn kube_watcher_relists_after_gone_and_drops() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let ns = |n: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
    server.apply(ns("a")).unwrap();
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(_))));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));

    // A dropped connection: the watcher resumes without a relist.
    let lists = server.stats().lists;
    server.drop_watches();
    server.apply(ns("b")).unwrap();
    loop {
        match next().await {
            Ok(watcher::Event::Apply(n)) => {
                assert_eq!(n.metadata.name.as_deref(), Some("b"));
                break;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => continue,
        }
    }
    assert_eq!(server.stats().lists, lists);

    // 410 Gone: the watcher lists again.
    server.gone_next_watches(1);
    server.drop_watches();
    server.delete("v1", "Namespace", "", "a").unwrap();
    let mut relisted = Vec::new();
    loop {
        match next().await {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(n)) => relisted.push(n.metadata.name.unwrap()),
            Ok(watcher::Event::InitDone) => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => continue,
        }
    }
    assert_eq!(relisted, vec!["b".to_string()]);
    assert!(server.stats().gone >= 1);
}

/// A client without kube's own retry layer, so an outage shows at once.
async fn bare_client(server: &FakeApiServer) -> Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn outages_answer_503_refuse_connections_and_restart_without_history() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Namespace> = Api::all(bare_client(&server).await);
    let ns = |n: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
    server.apply(ns("a")).unwrap();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut wp = WatchParams::default().timeout(30);
    wp.bookmarks = true;
    let mut open = api.watch(&wp, &rv).await.unwrap().boxed();

    // 503 for everything, and the open watch is cut.
    server.set_unavailable(true);
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 503),
        "{err}"
    );
    let cut = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = open.next().await {}
    })
    .await;
    assert!(cut.is_ok(), "the open watch was not cut");
    assert!(server.stats().unavailable >= 1);
    server.set_unavailable(false);
    api.list(&ListParams::default()).await.unwrap();

    // Away: connections are refused, at the TCP level.
    let mut open = api.watch(&wp, &rv).await.unwrap().boxed();
    server.go_away().await;
    let refused = tokio::net::TcpStream::connect(server.addr()).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let cut = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = open.next().await {}
    })
    .await;
    assert!(cut.is_ok(), "the open watch was not cut");
    assert!(api.list(&ListParams::default()).await.is_err());
    // Writes meanwhile (the test's own) are there on return; a resume from
    // before them sees them, since the history was kept.
    server.apply(ns("b")).unwrap();
    server
        .come_back(weft_fake_apiserver::Restart::KeepingHistory)
        .await
        .unwrap();
    let mut resumed = api.watch(&wp, &rv).await.unwrap().boxed();
    let added = resumed.next().await.unwrap().unwrap();
    assert!(
        matches!(&added, WatchEvent::Added(n) if n.metadata.name.as_deref() == Some("b")),
        "{added:?}"
    );

    // A restart that loses the watch cache: resuming from before it is 410.
    server.go_away().await;
    server.apply(ns("c")).unwrap();
    server
        .come_back(weft_fake_apiserver::Restart::LosingHistory)
        .await
        .unwrap();
    let mut stale = api.watch(&wp, &rv).await.unwrap().boxed();
    let gone = stale.next().await.unwrap().unwrap();
    assert!(
        matches!(&gone, WatchEvent::Error(e) if e.code == 410),
        "{gone:?}"
    );
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
}

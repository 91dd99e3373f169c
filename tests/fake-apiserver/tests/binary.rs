//! The fake as a process: CRDs installed from files, discovery, and the
//! `/__fake/` hooks over HTTP.

#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams},
    discovery::{self, ApiResource},
};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn http(addr: &str, method: &str, path: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_binary_serves_crds_discovery_and_hooks() {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_weft-fake-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--bookmark-ms", "200", "--crds"])
            .arg(&crds)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let addr = url.strip_prefix("http://").unwrap().to_string();
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();

    // Discovery finds the CRD's kind, and it can be listed and written.
    let gvk = GroupVersionKind::gvk("weft.io", "v1alpha1", "NodeCIDR");
    let (resource, caps) = discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(resource.plural, "nodecidrs");
    assert_eq!(caps.scope, discovery::Scope::Cluster);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    let list = api.list(&ListParams::default()).await.unwrap();
    assert!(list.items.is_empty());
    let rv = list.metadata.resource_version.unwrap();

    // A forced 410 through the hook.
    let (code, _) = http(&addr, "POST", "/__fake/gone?count=1").await;
    assert_eq!(code, 200);
    let mut wp = WatchParams::default().timeout(5);
    wp.bookmarks = true;
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    let ev = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(&ev, WatchEvent::Error(e) if e.code == 410),
        "{ev:?}"
    );
    // The next watch is normal and gets bookmarks.
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    let ev = stream.next().await.unwrap().unwrap();
    assert!(matches!(ev, WatchEvent::Bookmark(_)), "{ev:?}");

    let (code, stats) = http(&addr, "GET", "/__fake/stats").await;
    assert_eq!(code, 200);
    assert_eq!(stats["gone"], 1);
    assert!(stats["watches"].as_u64().unwrap() >= 2);
    let (code, status) = http(&addr, "GET", "/apis/weft.io/v1alpha1/nodecidrs/missing").await;
    assert_eq!(code, 404);
    assert_eq!(status["reason"], "NotFound");

    // Timed outages: 503 for a while, then away (refused) for a while.
    let (code, _) = http(&addr, "POST", "/__fake/unavailable?ms=300").await;
    assert_eq!(code, 200);
    let (code, status) = http(&addr, "GET", "/api/v1/namespaces").await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (503, Some("ServiceUnavailable"))
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(http(&addr, "GET", "/api/v1/namespaces").await.0, 200);
    let (code, _) = http(&addr, "POST", "/__fake/away?ms=400").await;
    assert_eq!(code, 200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let refused = tokio::net::TcpStream::connect(&addr).await;
    assert!(refused.is_err(), "still accepting while away");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(http(&addr, "GET", "/api/v1/namespaces").await.0, 200);
}

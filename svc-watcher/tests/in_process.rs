//! The library in-process with a scripted event-style source: the seam a
//! Kubernetes source plugs into, and the rule that nobody is served before
//! the source has read the whole state.

#![allow(clippy::unwrap_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::{describe, next, subscribe, until_synced};
use svc_watcher::{
    metrics::Metrics,
    source::{Source, SourceError},
    state::{Change, StateStore},
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use weft_common::watch::ObjKey;
use weft_proto::watcher::v1::{
    Kind, Namespace, ObjectMeta, Resource, resource, watcher_client::WatcherClient,
};

fn ns(name: &str) -> Resource {
    Resource {
        kind: Some(resource::Kind::Namespace(Namespace {
            meta: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
        })),
    }
}

/// Lists slowly, then reports one event per message it is sent.
struct ScriptedSource {
    initial: Vec<Resource>,
    list_delay: Duration,
    events: tokio::sync::mpsc::Receiver<Change>,
}

impl Source for ScriptedSource {
    fn name(&self) -> &'static str {
        "scripted"
    }

    async fn run(
        mut self,
        store: Arc<StateStore>,
        synced: oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        // A list that arrives in parts: without the readiness rule a
        // subscriber could be handed half of it as "the state".
        let mut listed = Vec::new();
        for object in self.initial {
            tokio::time::sleep(self.list_delay).await;
            listed.push(object);
            store.replace_all(listed.clone())?;
        }
        let _ = synced.send(());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                change = self.events.recv() => match change {
                    Some(change) => { store.apply(change)?; }
                    None => { shutdown.cancelled().await; return Ok(()); }
                },
            }
        }
    }
}

#[tokio::test]
async fn an_event_source_plugs_in_and_the_first_snapshot_is_complete() {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let source = ScriptedSource {
        initial: vec![ns("a"), ns("b"), ns("c")],
        list_delay: Duration::from_millis(100),
        events: rx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let store = Arc::new(StateStore::new(100, metrics.clone()));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(svc_watcher::serve_source(
        source,
        store.clone(),
        listener,
        metrics,
        shutdown.clone(),
    ));

    // Connect while the source is still listing: the call waits.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = WatcherClient::new(channel);
    let mut stream = subscribe(&mut client, "", 0).await;
    let snapshot = until_synced(&mut stream).await;
    let described: Vec<String> = snapshot.iter().map(describe).collect();
    assert_eq!(
        described,
        vec![
            "RESET",
            "+KIND_NAMESPACE/a",
            "+KIND_NAMESPACE/b",
            "+KIND_NAMESPACE/c",
            "SYNCED"
        ]
    );
    assert_eq!(snapshot[0].epoch, store.epoch());

    tx.send(Change::Delete(ObjKey::new(Kind::Namespace, "", "b")))
        .await
        .unwrap();
    let event = next(&mut stream).await;
    assert_eq!(describe(&event), "-KIND_NAMESPACE/b");
    assert_eq!(event.revision, store.revision());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve_source returns on shutdown")
        .unwrap()
        .unwrap();
}

//! One trace follows a pod's set-up across processes: the CNI plugin's span
//! is the root, datapath-svc's handling of the CNI ADD is its child, and
//! identity-svc's `Allocate` (called by datapath-svc during the ADD) is a
//! descendant of that — all exported over OTLP to a receiver this test
//! runs.

use std::{collections::HashMap, time::Duration};

use weft_e2e::{
    TestLab, eventually,
    otlp::{Collector, ReceivedSpan},
    require_root,
};
use weft_lab::net::netns_path;
use weft_proto::identity::v1::{ListRequest, identity_client::IdentityClient};

const POD: &str = "traced";
const APP: &str = "traced-app";

fn pod(node: &str) -> String {
    weft_e2e::pod_manifest("default", POD, &[("app", APP)], Some(node), None)
}

/// The spans of the trace the plugin's `CNI ADD` for the pod started,
/// once it holds the plugin's, datapath-svc's and identity-svc's spans.
fn pod_trace(spans: &[ReceivedSpan]) -> anyhow::Result<(ReceivedSpan, Vec<ReceivedSpan>)> {
    let root = spans
        .iter()
        .find(|s| {
            s.service == "weft-cni"
                && s.span.name == "CNI ADD"
                && s.attribute("k8s.pod.name") == Some(POD)
        })
        .ok_or_else(|| anyhow::anyhow!("no CNI ADD span for {POD} yet"))?
        .clone();
    let trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id() == root.trace_id())
        .cloned()
        .collect();
    for service in ["datapath-svc", "identity-svc"] {
        anyhow::ensure!(
            trace.iter().any(|s| s.service == service),
            "no {service} span in trace {} yet: {:?}",
            root.trace_id(),
            trace
                .iter()
                .map(|s| (&s.service, &s.span.name))
                .collect::<Vec<_>>()
        );
    }
    Ok((root, trace))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_cni_plugin_datapath_and_identity() {
    require_root();
    // The plugin runs in this namespace; the services in the lab's. The
    // collector listens on the same loopback port in each, so one
    // endpoint serves them all.
    let host = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
    let port = host.local_addr().expect("receiver address").port();
    let collector = Collector::default();
    collector.serve(host).expect("serve");
    let endpoint = format!("http://127.0.0.1:{port}");
    let lab = TestLab::up_with("one_trace_spans", 1, |cfg| {
        cfg.otlp_endpoint = Some(endpoint.clone());
    })
    .await;
    let node = lab.node_names()[0].clone();
    for ns in [lab.cp_netns(), node.clone()] {
        let listener = weft_common::netns::run_in(&netns_path(&ns), move || {
            Ok(std::net::TcpListener::bind(("127.0.0.1", port))?)
        })
        .unwrap_or_else(|e| panic!("receiver in {ns}: {e:#}"));
        collector.serve(listener).expect("serve");
    }

    // The pod is first bound to a node the lab does not run, so that the
    // cluster state (its labels) reaches the services before the plugin's
    // ADD does, as it would for a pod whose informer event beats kubelet.
    // identity-svc allocating an identity for its labels shows svc-watcher
    // has streamed it.
    lab.manifests
        .apply_yaml("pod-traced.yaml", &pod("parked"))
        .expect("apply");
    let mut identity = IdentityClient::new(lab.channel("identity-svc").expect("channel"));
    eventually(
        Duration::from_secs(10),
        "identity-svc knows the pod's labels",
        || {
            let mut identity = identity.clone();
            async move {
                let ids = identity.list(ListRequest {}).await?.into_inner().identities;
                anyhow::ensure!(
                    ids.iter()
                        .any(|i| i.labels.get("k8s:app").map(String::as_str) == Some(APP)),
                    "not yet"
                );
                Ok(())
            }
        },
    )
    .await;
    let _ = &mut identity;
    lab.manifests
        .apply_yaml("pod-traced.yaml", &pod(&node))
        .expect("apply");
    lab.wait_pod_ready("default", POD, Duration::from_secs(30))
        .await
        .expect("pod ready");

    let (root, trace) = eventually(
        Duration::from_secs(10),
        "the pod's trace is complete",
        || {
            let spans = collector.spans();
            async move { pod_trace(&spans) }
        },
    )
    .await;
    for s in &trace {
        println!(
            "{} {:<14} {:<40} parent {}",
            s.span_id(),
            s.service,
            s.span.name,
            if s.parent_id().is_empty() {
                "-".to_string()
            } else {
                s.parent_id()
            }
        );
    }

    // The plugin's span is the root (the lab's runtime sends no
    // TRACEPARENT).
    assert!(root.parent_id().is_empty(), "{root:?}");
    let by_id: HashMap<String, &ReceivedSpan> = trace.iter().map(|s| (s.span_id(), s)).collect();
    // datapath-svc's server span for the ADD is the plugin span's child.
    let add = trace
        .iter()
        .find(|s| s.service == "datapath-svc" && s.span.name == "weft.datapath.v1.Cni/Add")
        .expect("datapath-svc's span for the Cni/Add call");
    assert_eq!(add.parent_id(), root.span_id(), "datapath-svc's parent");
    // identity-svc's Allocate descends from that span, through
    // datapath-svc's own spans only.
    let allocate = trace
        .iter()
        .find(|s| {
            s.service == "identity-svc" && s.span.name == "weft.identity.v1.Identity/Allocate"
        })
        .expect("identity-svc's span for the Allocate call");
    let mut parent = by_id.get(&allocate.parent_id()).unwrap_or_else(|| {
        panic!(
            "identity-svc's parent {} is in the trace",
            allocate.parent_id()
        )
    });
    while parent.span_id() != add.span_id() {
        assert_eq!(parent.service, "datapath-svc", "{parent:?}");
        parent = by_id
            .get(&parent.parent_id())
            .unwrap_or_else(|| panic!("{}'s parent is in the trace", parent.span.name));
    }
    collector.stop();
    lab.down().await;
}

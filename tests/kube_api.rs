//! weft's Kubernetes-facing parts against a real API server: upstream's
//! kube-apiserver and etcd (built by `deploy/kube/build.sh`), no nodes. The
//! fake API server stays for fault injection; these check the same promises
//! against the real thing:
//!
//! - the chart installs, and its RBAC gives each component exactly what
//!   its code asks of the API (`API_ACCESS` in each crate), no more;
//! - svc-watcher, as the chart's service account, serves the API's state
//!   and keeps serving it through an API server restart and an etcd
//!   compaction that forces a relist (410 Gone);
//! - ipam-svc and identity-svc, as theirs, keep their allocations in the
//!   custom resources and find them again after a restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use weft_common::watch::Mirror;
use weft_e2e::{bin_dir, eventually, kube::watcher_relists, require_root};
use weft_k8s::access::{Access, triples};
use weft_lab::{
    client::channel_in,
    kube::{
        Cluster, artifacts,
        install::{NAMESPACE, RELEASE},
    },
    net::{CP_ADDR, netns_path},
    procs::{Proc, ProcSpec},
};
use weft_proto::{
    identity::v1::identity_client::IdentityClient, ipam::v1::ipam_client::IpamClient,
    watcher::v1::resource,
};

const WATCHER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(CP_ADDR), 9400);
const IPAM: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(CP_ADDR), 9401);
const IDENTITY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(CP_ADDR), 9402);

/// etcd and an API server for one test, removed when dropped.
struct Api(Cluster);

impl Api {
    async fn up(name: &str) -> Self {
        require_root();
        let repo = artifacts::repo_root();
        let owned = name.to_string();
        let cfg = tokio::task::spawn_blocking(move || artifacts::prepare_api_server(&owned, &repo))
            .await
            .expect("preparing")
            .expect("building the API server");
        let api = Self(Cluster::new(cfg));
        api.0
            .up_api_server()
            .await
            .expect("etcd and the API server");
        api
    }

    /// `helm install` of the chart with its defaults: every object goes
    /// through the real API server's validation (the CRDs, the RBAC, the
    /// workloads, which wait for nodes that never come).
    async fn install_chart(&self) {
        let chart = self
            .0
            .cfg
            .chart
            .clone()
            .expect("chart")
            .display()
            .to_string();
        self.0
            .kubectl()
            .helm(&["install", RELEASE, &chart, "--namespace", NAMESPACE])
            .await
            .expect("helm install");
        for crd in ["nodecidrs.weft.io", "securityidentities.weft.io"] {
            self.0
                .kubectl()
                .run(&[
                    "wait",
                    "--for=condition=Established",
                    &format!("crd/{crd}"),
                    "--timeout=30s",
                ])
                .await
                .expect("CRD established");
        }
    }

    /// One of weft's services in the control-plane namespace, acting as
    /// the chart's service account for it.
    async fn start(&self, component: &str, args: &[String]) -> Proc {
        let kubeconfig = self
            .0
            .service_account_kubeconfig(NAMESPACE, &format!("weft-{component}"))
            .await
            .expect("service account kubeconfig");
        let mut args = args.to_vec();
        args.push(format!("--kubeconfig={}", kubeconfig.display()));
        args.push("--log-level=info".into());
        Proc::start(ProcSpec {
            name: component.into(),
            netns: self.0.cp_netns(),
            bin: bin_dir().join(component),
            args,
            env: vec![("RUST_BACKTRACE".into(), "1".into())],
            log: self.0.log_dir().join(format!("{component}.log")),
        })
        .expect("starting the service")
    }

    fn log_tail(&self, component: &str) -> String {
        let text = std::fs::read_to_string(self.0.log_dir().join(format!("{component}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        weft_e2e::kube::clean_on_drop(&self.0.cfg);
    }
}

fn cp(api: &Api) -> PathBuf {
    netns_path(&api.0.cp_netns())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_gives_each_component_exactly_what_its_code_asks_of_the_api() {
    let api = Api::up("ka1").await;
    api.install_chart().await;
    let k = api.0.kubectl();
    let components: [(&str, &[Access]); 4] = [
        ("svc-watcher", svc_watcher::source::kubernetes::API_ACCESS),
        ("ipam-svc", ipam_svc::kube_store::API_ACCESS),
        ("identity-svc", identity_svc::kube_store::API_ACCESS),
        ("datapath", &[]),
    ];
    for (component, access) in components {
        let account = format!("system:serviceaccount:{NAMESPACE}:weft-{component}");
        // Allowed: every verb the code uses, asked of the real authorizer.
        for (group, resource, verb) in triples(access) {
            let target = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            let answer = k
                .run(&["auth", "can-i", &verb, &target, "--as", &account])
                .await;
            assert_eq!(
                answer.as_deref().map(str::trim).ok(),
                Some("yes"),
                "{component} may not {verb} {target}, which its code does"
            );
        }
        // Nothing more: the rules the chart bound to it, rule by rule.
        let granted: BTreeSet<(String, String, String)> = match k
            .json(&["get", "clusterrole", &format!("weft-{component}")])
            .await
        {
            Ok(role) => role["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|rule| {
                    let list = |key: &str| -> Vec<String> {
                        rule[key]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    };
                    let (groups, resources, verbs) =
                        (list("apiGroups"), list("resources"), list("verbs"));
                    let mut out = Vec::new();
                    for g in &groups {
                        for r in &resources {
                            for v in &verbs {
                                out.push((g.clone(), r.clone(), v.clone()));
                            }
                        }
                    }
                    out
                })
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let declared = triples(access);
        let extra: Vec<_> = granted.difference(&declared).collect();
        assert!(
            extra.is_empty(),
            "the chart grants {component} more than its code uses: {extra:?}"
        );
        for (verb, target) in [
            ("get", "secrets"),
            ("delete", "pods"),
            ("create", "services"),
        ] {
            let answer = k
                .run(&["auth", "can-i", verb, target, "--as", &account])
                .await;
            assert!(answer.is_err(), "{component} may {verb} {target}");
        }
        println!("{component}: may {:?}", triples(access));
    }
}

/// What the API holds, as svc-watcher's keys and each object's
/// resourceVersion.
async fn api_state(api: &Api) -> BTreeSet<(String, String)> {
    let kinds = [
        ("services", "KIND_SERVICE", true),
        (
            "endpointslices.discovery.k8s.io",
            "KIND_ENDPOINT_SLICE",
            true,
        ),
        ("pods", "KIND_POD", true),
        ("nodes", "KIND_NODE", false),
        ("namespaces", "KIND_NAMESPACE", false),
        (
            "networkpolicies.networking.k8s.io",
            "KIND_NETWORK_POLICY",
            true,
        ),
    ];
    let mut out = BTreeSet::new();
    for (resource, tag, namespaced) in kinds {
        let list = api
            .0
            .kubectl()
            .json(&["get", resource, "-A"])
            .await
            .expect("list");
        for o in list["items"].as_array().expect("items") {
            let m = &o["metadata"];
            let name = m["name"].as_str().expect("name");
            let key = if namespaced {
                format!(
                    "{tag}/{}/{name}",
                    m["namespace"].as_str().expect("namespace")
                )
            } else {
                format!("{tag}/{name}")
            };
            out.insert((key, m["resourceVersion"].as_str().expect("rv").to_string()));
        }
    }
    out
}

fn mirror_state(m: &Mirror) -> BTreeSet<(String, String)> {
    m.objects()
        .map(|(k, r)| {
            let meta = match r.kind.as_ref() {
                Some(resource::Kind::Service(o)) => o.meta.clone(),
                Some(resource::Kind::EndpointSlice(o)) => o.meta.clone(),
                Some(resource::Kind::Pod(o)) => o.meta.clone(),
                Some(resource::Kind::Node(o)) => o.meta.clone(),
                Some(resource::Kind::Namespace(o)) => o.meta.clone(),
                Some(resource::Kind::NetworkPolicy(o)) => o.meta.clone(),
                None => None,
            };
            (
                k.to_string(),
                meta.map(|m| m.resource_version).unwrap_or_default(),
            )
        })
        .collect()
}

/// A mirror fed from svc-watcher's stream in the background.
fn follow_watcher(
    api: &Api,
    token: &CancellationToken,
) -> std::sync::Arc<std::sync::Mutex<Mirror>> {
    use futures::StreamExt as _;
    let channel = channel_in(cp(api), WATCHER).expect("channel");
    let mut events = Box::pin(weft_common::watch::subscribe(
        channel,
        vec![],
        "kube-api-test",
        token.clone(),
        None,
    ));
    let mirror = std::sync::Arc::new(std::sync::Mutex::new(Mirror::new()));
    let fed = mirror.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            fed.lock().expect("mirror").apply(&e);
        }
    });
    mirror
}

async fn mirror_equals_api(api: &Api, mirror: &std::sync::Mutex<Mirror>) -> anyhow::Result<()> {
    let want = api_state(api).await;
    let (synced, have) = {
        let m = mirror.lock().expect("mirror");
        (m.is_synced(), mirror_state(&m))
    };
    anyhow::ensure!(synced, "not synced yet");
    anyhow::ensure!(
        have == want,
        "svc-watcher lacks {:?} and has extra {:?}",
        want.difference(&have).collect::<Vec<_>>(),
        have.difference(&want).collect::<Vec<_>>()
    );
    Ok(())
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
# No controller-manager here to make it.
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: shop}
---
apiVersion: v1
kind: Node
metadata: {name: api-node-1, labels: {kubernetes.io/hostname: api-node-1}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.0.5]
    conditions: {ready: true}
    nodeName: api-node-1
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: web, image: registry.k8s.io/e2e-test-images/agnhost:2.59}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]
"#;

async fn relists(api: &Api) -> u64 {
    watcher_relists(&cp(api), SocketAddr::from((CP_ADDR, 9410))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn svc_watcher_serves_the_api_state_through_a_restart_and_a_forced_relist() {
    let api = Api::up("ka2").await;
    api.install_chart().await;
    let k = api.0.kubectl();
    k.run_with_input(&["apply", "-f", "-"], OBJECTS)
        .await
        .expect("objects");
    let mut watcher = api
        .start(
            "svc-watcher",
            &[
                "--source=kubernetes".into(),
                format!("--listen={WATCHER}"),
                format!("--metrics-listen={}:9410", CP_ADDR),
            ],
        )
        .await;
    let token = CancellationToken::new();
    let mirror = follow_watcher(&api, &token);
    eventually(
        Duration::from_secs(30),
        "svc-watcher serves the API's objects",
        || mirror_equals_api(&api, &mirror),
    )
    .await;

    // The API server goes away; etcd moves on and forgets every revision
    // svc-watcher saw; the API server returns. Resuming a watch answers
    // 410 Gone, and only a new list catches up.
    let relists_before = relists(&api).await;
    let apiserver = api.0.find_daemon("kube-apiserver").expect("daemon");
    apiserver
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))
        .await;
    api.0.etcd_compact(20).await.expect("compaction");
    apiserver.start().expect("API server");
    api.0
        .wait_api(Duration::from_secs(90))
        .await
        .expect("API server ready");
    k.run(&[
        "-n",
        "shop",
        "patch",
        "service",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"ports":[{"name":"http","port":81,"targetPort":8080}]}}"#,
    ])
    .await
    .expect("patch");
    k.run(&["-n", "shop", "delete", "pod", "web-1", "--wait=false"])
        .await
        .expect("delete");
    k.run(&[
        "-n",
        "shop",
        "create",
        "service",
        "clusterip",
        "late",
        "--tcp=82:8080",
    ])
    .await
    .expect("create");
    eventually(
        Duration::from_secs(60),
        "svc-watcher catches up after the relist",
        || mirror_equals_api(&api, &mirror),
    )
    .await;
    let relists_after = relists(&api).await;
    assert!(
        relists_after > relists_before,
        "svc-watcher never listed again:\n{}",
        api.log_tail("svc-watcher")
    );
    token.cancel();
    watcher.stop().await;
}

async fn ipam_table(api: &Api) -> anyhow::Result<BTreeMap<String, String>> {
    let mut client = IpamClient::new(channel_in(cp(api), IPAM)?);
    let list = client
        .list(weft_proto::ipam::v1::ListRequest {})
        .await?
        .into_inner();
    Ok(list
        .allocations
        .into_iter()
        .map(|a| (a.node, a.cidr))
        .collect())
}

async fn node_cidrs(api: &Api) -> BTreeMap<String, String> {
    let list = api
        .0
        .kubectl()
        .json(&["get", "nodecidrs.weft.io"])
        .await
        .expect("NodeCIDRs");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["spec"]["node"].as_str().unwrap_or_default().to_string(),
                i["spec"]["cidr"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn identity_table(api: &Api) -> anyhow::Result<BTreeMap<u32, BTreeMap<String, String>>> {
    let mut client = IdentityClient::new(channel_in(cp(api), IDENTITY)?);
    let list = client
        .list(weft_proto::identity::v1::ListRequest {})
        .await?
        .into_inner();
    Ok(list
        .identities
        .into_iter()
        .map(|i| (i.id, i.labels.into_iter().collect()))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn allocators_keep_their_state_in_custom_resources_as_the_charts_accounts() {
    let api = Api::up("ka3").await;
    api.install_chart().await;
    let k = api.0.kubectl();
    let state = tempfile::tempdir().expect("state dir");
    let mut watcher = api
        .start(
            "svc-watcher",
            &["--source=kubernetes".into(), format!("--listen={WATCHER}")],
        )
        .await;
    for n in 1..=3 {
        k.run_with_input(
            &["apply", "-f", "-"],
            &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\n"),
        )
        .await
        .expect("node");
    }
    let ipam_args = vec![
        "--store=kubernetes".to_string(),
        format!("--listen={IPAM}"),
        format!("--watcher=http://{WATCHER}"),
        format!("--state-dir={}", state.path().join("ipam").display()),
    ];
    let mut ipam = api.start("ipam-svc", &ipam_args).await;
    let table = eventually(Duration::from_secs(30), "a CIDR for every node", || async {
        let table = ipam_table(&api).await?;
        anyhow::ensure!(table.len() == 3, "{table:?}");
        anyhow::ensure!(
            node_cidrs(&api).await == table,
            "the NodeCIDRs differ from {table:?}"
        );
        Ok(table)
    })
    .await;
    let distinct: BTreeSet<&String> = table.values().collect();
    assert_eq!(distinct.len(), 3, "{table:?}");

    // A node that is gone loses its block: ipam-svc checks with the API
    // (a get of the Node) before it frees one.
    k.run(&["delete", "node", "node-3"])
        .await
        .expect("delete node");
    eventually(
        Duration::from_secs(30),
        "node-3's block is freed",
        || async {
            let now = node_cidrs(&api).await;
            anyhow::ensure!(!now.contains_key("node-3"), "still {now:?}");
            Ok(())
        },
    )
    .await;
    ipam.kill().await;
    ipam.restart().expect("ipam-svc restart");
    let again = eventually(Duration::from_secs(30), "ipam-svc serves again", || {
        ipam_table(&api)
    })
    .await;
    let mut kept = table.clone();
    kept.remove("node-3");
    assert_eq!(again, kept, "allocations changed across a restart");

    let identity_args = vec![
        "--store=kubernetes".to_string(),
        format!("--listen={IDENTITY}"),
        format!("--watcher=http://{WATCHER}"),
        format!("--state-dir={}", state.path().join("identity").display()),
    ];
    let mut identity = api.start("identity-svc", &identity_args).await;
    // No controller-manager here to make it.
    k.run(&["create", "serviceaccount", "default"])
        .await
        .expect("service account");
    for (name, app) in [("a-1", "a"), ("a-2", "a"), ("b-1", "b")] {
        k.run(&[
            "run",
            name,
            "--image=registry.k8s.io/e2e-test-images/agnhost:2.59",
            "--labels",
            &format!("app={app}"),
        ])
        .await
        .expect("pod");
    }
    let ids = eventually(
        Duration::from_secs(30),
        "an identity per label set",
        || async {
            let table = identity_table(&api).await?;
            let apps: BTreeMap<String, u32> = table
                .iter()
                .filter_map(|(id, labels)| Some((labels.get("k8s:app")?.clone(), *id)))
                .collect();
            anyhow::ensure!(apps.len() == 2, "{table:?}");
            let objects = k.json(&["get", "securityidentities.weft.io"]).await?;
            let names: BTreeSet<String> = objects["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
                .collect();
            for id in apps.values() {
                anyhow::ensure!(
                    names.contains(&id.to_string()),
                    "no SecurityIdentity {id} in {names:?}"
                );
            }
            Ok(apps)
        },
    )
    .await;
    identity.kill().await;
    identity.restart().expect("identity-svc restart");
    let after = eventually(Duration::from_secs(30), "identity-svc serves again", || {
        identity_table(&api)
    })
    .await;
    for (app, id) in &ids {
        assert_eq!(
            after.get(id).and_then(|l| l.get("k8s:app")),
            Some(app),
            "identity {id} of app={app} changed across a restart: {after:?}"
        );
    }
    identity.stop().await;
    ipam.stop().await;
    watcher.stop().await;
}

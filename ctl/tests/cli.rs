//! Runs the built `weftctl` binary against in-process fake services that
//! serve the real gRPC contracts (plus the standard health service through
//! weft-common's `GrpcServer`) on port-0 listeners.

use std::{pin::Pin, process::Output};

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_common::{grpc::GrpcServer, readiness::Readiness};
use weft_proto::{
    datapath::v1::{
        self as dp,
        datapath_server::{Datapath, DatapathServer},
    },
    identity::v1::{
        self as id,
        identity_server::{Identity, IdentityServer},
    },
    ipam::v1::{
        self as ipam,
        ipam_server::{Ipam, IpamServer},
    },
    watcher::v1::{
        self as watcher,
        watcher_server::{Watcher, WatcherServer},
    },
};

struct FakeDatapath {
    watcher_connected: bool,
}

#[tonic::async_trait]
impl Datapath for FakeDatapath {
    type FlowsStream = Pin<Box<dyn Stream<Item = Result<dp::Flow, Status>> + Send>>;

    async fn flows(
        &self,
        request: Request<dp::FlowsRequest>,
    ) -> Result<Response<Self::FlowsStream>, Status> {
        let req = request.into_inner();
        let flows = vec![
            dp::Flow {
                time_unix_nanos: 1_700_000_000_123_000_000,
                node: "node-a".into(),
                verdict: "dropped".into(),
                reason: "policy_denied".into(),
                direction: "ingress".into(),
                protocol: "TCP".into(),
                source: "10.244.0.5:40000".into(),
                destination: "10.244.0.7:8080".into(),
                source_pod: "team-b/client".into(),
                destination_pod: "default/web".into(),
                source_identity: 301,
                destination_identity: 300,
                ..Default::default()
            },
            dp::Flow {
                verdict: "forwarded".into(),
                reason: "passed".into(),
                ..Default::default()
            },
        ];
        let matching: Vec<_> = flows
            .into_iter()
            .filter(|f| req.verdict.is_empty() || f.verdict == req.verdict)
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(matching))))
    }

    async fn status(
        &self,
        _: Request<dp::StatusRequest>,
    ) -> Result<Response<dp::StatusResponse>, Status> {
        Ok(Response::new(dp::StatusResponse {
            node: "node-a".into(),
            pod_cidr: "10.244.0.0/24".into(),
            pod_ips_used: 3,
            pod_ips_total: 254,
            components: vec![
                dp::ComponentStatus {
                    name: "svc-watcher".into(),
                    connected: self.watcher_connected,
                    detail: "revision 7".into(),
                    last_error: String::new(),
                },
                dp::ComponentStatus {
                    name: "bpf".into(),
                    connected: true,
                    detail: "tcx".into(),
                    last_error: String::new(),
                },
            ],
            maps: vec![dp::MapStatus {
                name: "weft_lb_svc".into(),
                entries: 6553,
                max_entries: 65536,
            }],
            features: vec!["ClusterIP".into(), "NodePort".into()],
            ..Default::default()
        }))
    }

    async fn list_services(
        &self,
        _: Request<dp::ListServicesRequest>,
    ) -> Result<Response<dp::ListServicesResponse>, Status> {
        Ok(Response::new(dp::ListServicesResponse {
            services: vec![
                dp::ServiceEntry {
                    id: 1,
                    frontend: "10.96.0.1:443/TCP".into(),
                    r#type: "ClusterIP".into(),
                    service: "default/kubernetes".into(),
                    backends: vec![dp::BackendEntry {
                        id: 1,
                        address: "172.18.0.3:6443".into(),
                        state: "active".into(),
                    }],
                },
                dp::ServiceEntry {
                    id: 2,
                    frontend: "10.96.0.20:80/TCP".into(),
                    r#type: "ClusterIP".into(),
                    service: "default/web".into(),
                    backends: vec![
                        dp::BackendEntry {
                            id: 2,
                            address: "10.244.0.5:8080".into(),
                            state: "active".into(),
                        },
                        dp::BackendEntry {
                            id: 3,
                            address: "10.244.0.6:8080".into(),
                            state: "terminating".into(),
                        },
                    ],
                },
            ],
        }))
    }

    async fn list_endpoints(
        &self,
        _: Request<dp::ListEndpointsRequest>,
    ) -> Result<Response<dp::ListEndpointsResponse>, Status> {
        Ok(Response::new(dp::ListEndpointsResponse {
            endpoints: vec![dp::EndpointEntry {
                container_id: "ffeeddccbbaa99887766".into(),
                pod: "default/web-0".into(),
                ip: "10.244.0.5".into(),
                host_ifname: "lxcffeedd".into(),
                identity: 300,
                labels: Default::default(),
            }],
        }))
    }

    async fn dump_lb_maps(
        &self,
        _: Request<dp::DumpLbMapsRequest>,
    ) -> Result<Response<dp::DumpLbMapsResponse>, Status> {
        Ok(Response::new(dp::DumpLbMapsResponse {
            services: vec![dp::LbServiceRow {
                frontend: "10.96.0.1:443/TCP".into(),
                slot: 1,
                backend_id: 1,
                count: 0,
                rev_nat_id: 1,
                flags: 0,
            }],
            backends: vec![dp::LbBackendRow {
                id: 1,
                address: "172.18.0.3:6443".into(),
                flags: 0,
            }],
            rev_nat: vec![dp::LbRevNatRow {
                id: 1,
                address: "10.96.0.1:443".into(),
            }],
        }))
    }
}

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct FakeIdentity;

#[tonic::async_trait]
impl Identity for FakeIdentity {
    async fn allocate(
        &self,
        _: Request<id::AllocateRequest>,
    ) -> Result<Response<id::SecurityIdentity>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn release(
        &self,
        _: Request<id::ReleaseRequest>,
    ) -> Result<Response<id::ReleaseResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get(
        &self,
        _: Request<id::GetRequest>,
    ) -> Result<Response<id::SecurityIdentity>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list(
        &self,
        _: Request<id::ListRequest>,
    ) -> Result<Response<id::ListResponse>, Status> {
        Ok(Response::new(id::ListResponse {
            identities: vec![id::SecurityIdentity {
                id: 300,
                labels: [("k8s:app".to_string(), "web".to_string())].into(),
                reserved: false,
                references: 2,
            }],
        }))
    }

    type WatchStream = Events<id::IdentityEvent>;

    async fn watch(
        &self,
        _: Request<id::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }
}

struct FakeIpam;

#[tonic::async_trait]
impl Ipam for FakeIpam {
    async fn get_node_cidr(
        &self,
        _: Request<ipam::GetNodeCidrRequest>,
    ) -> Result<Response<ipam::NodeAllocation>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list(
        &self,
        _: Request<ipam::ListRequest>,
    ) -> Result<Response<ipam::ListResponse>, Status> {
        Ok(Response::new(ipam::ListResponse {
            allocations: vec![ipam::NodeAllocation {
                node: "node-a".into(),
                cidr: "10.244.0.0/24".into(),
            }],
            pools: vec![ipam::PoolStatus {
                cidr: "10.244.0.0/16".into(),
                mask_size: 24,
                total: 256,
                used: 1,
            }],
            mode: "cluster-pool".into(),
        }))
    }

    type WatchStream = Events<ipam::AllocationEvent>;

    async fn watch(
        &self,
        _: Request<ipam::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }
}

/// The four fake services, each on its own port-0 listener.
struct Cluster {
    datapath: String,
    watcher: String,
    ipam: String,
    identity: String,
    token: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn serve(server: GrpcServer, token: &CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server.serve_tcp(listener, token.clone()));
    format!("http://{addr}")
}

impl Cluster {
    async fn start(watcher_connected: bool) -> Self {
        let token = CancellationToken::new();
        Self {
            datapath: serve(
                GrpcServer::new()
                    .add_service(DatapathServer::new(FakeDatapath { watcher_connected })),
                &token,
            )
            .await,
            watcher: serve(GrpcServer::new(), &token).await,
            ipam: serve(
                GrpcServer::new().add_service(IpamServer::new(FakeIpam)),
                &token,
            )
            .await,
            identity: serve(
                GrpcServer::new().add_service(IdentityServer::new(FakeIdentity)),
                &token,
            )
            .await,
            token,
        }
    }

    async fn weftctl(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "--datapath",
            &self.datapath,
            "--watcher",
            &self.watcher,
            "--ipam",
            &self.ipam,
            "--identity",
            &self.identity,
            "--timeout",
            "2s",
        ];
        all.extend_from_slice(args);
        weftctl(&all).await
    }
}

async fn weftctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .env_clear()
        .args(args)
        .output()
        .await
        .expect("run weftctl")
}

/// An address where nothing listens.
fn dead_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    format!("http://127.0.0.1:{port}")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_list_table() {
    let cluster = Cluster::start(true).await;
    let out = cluster.weftctl(&["service", "list"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "\
ID   Frontend            Service Type   Service              Backend
1    10.96.0.1:443/TCP   ClusterIP      default/kubernetes   1 => 172.18.0.3:6443/TCP (active)
2    10.96.0.20:80/TCP   ClusterIP      default/web          1 => 10.244.0.5:8080/TCP (active)
                                                             2 => 10.244.0.6:8080/TCP (terminating)
"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_list_json() {
    let cluster = Cluster::start(true).await;
    let out = cluster.weftctl(&["service", "list", "-o", "json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        json["services"][1],
        json!({
            "id": 2,
            "frontend": "10.96.0.20:80/TCP",
            "type": "ClusterIP",
            "service": "default/web",
            "backends": [
                {"id": 2, "address": "10.244.0.5:8080", "state": "active"},
                {"id": 3, "address": "10.244.0.6:8080", "state": "terminating"}
            ]
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_healthy_when_everything_serves() {
    let cluster = Cluster::start(true).await;
    let out = cluster.weftctl(&["status"]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    for name in ["svc-watcher", "ipam-svc", "identity-svc", "datapath-svc"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.ends_with("SERVING")),
            "{name}: {text}"
        );
    }
    assert!(text.contains("Pod IPs:    3/254 used"), "{text}");
    assert!(
        text.contains("weft_lb_svc   6553      65536   10.0%"),
        "{text}"
    );
    assert!(text.ends_with("Overall: healthy\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fails_when_a_service_is_down() {
    let mut cluster = Cluster::start(true).await;
    let dead = dead_address();
    cluster.ipam = dead.clone();
    let out = cluster.weftctl(&["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("UNHEALTHY"), "{text}");
    assert!(
        text.contains(&format!("cannot reach ipam-svc at {dead}")),
        "{text}"
    );

    let out = cluster.weftctl(&["status", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["healthy"], false);
    let ipam = json["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == "ipam-svc")
        .cloned()
        .expect("ipam-svc");
    assert_eq!(ipam["status"], "UNREACHABLE");
    assert_eq!(json["datapath"]["node"], "node-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fails_when_a_datapath_component_is_disconnected() {
    let cluster = Cluster::start(false).await;
    let out = cluster.weftctl(&["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("datapath component svc-watcher disconnected"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_datapath_names_the_address() {
    let dead = dead_address();
    let out = weftctl(&["--datapath", &dead, "--timeout", "2s", "service", "list"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach datapath-svc at {dead}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_lists() {
    let cluster = Cluster::start(true).await;

    let out = cluster.weftctl(&["endpoint", "list"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ffeeddccbbaa   default/web-0   10.244.0.5   lxcffeedd   300"),
        "{}",
        stdout(&out)
    );

    let out = cluster.weftctl(&["identity", "list"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ID    Labels        References\n300   k8s:app=web   2\n"
    );

    let out = cluster.weftctl(&["ipam", "list", "-o", "json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        json["allocations"][0],
        json!({"node": "node-a", "cidr": "10.244.0.0/24"})
    );
    assert_eq!(json["pools"][0]["used"], 1);

    let out = cluster.weftctl(&["bpf", "lb", "list"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("172.18.0.3:6443"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_print_one_line_each_and_filter_by_verdict() {
    let cluster = Cluster::start(true).await;
    let out = cluster.weftctl(&["flows", "--verdict", "dropped"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("DROPPED (policy_denied) ingress team-b/client 10.244.0.5:40000 (identity 301) -> default/web 10.244.0.7:8080 (identity 300) TCP"),
        "{text}"
    );
    let out = cluster.weftctl(&["flows", "-o", "json"]).await;
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["reason"], "policy_denied");
}

/// A svc-watcher whose watch has been broken: health NOT_SERVING, and
/// `Status` says why.
struct BrokenWatcher;

const BROKEN: &str = "the watch of Pod has been broken for 12.0 s: connection refused";

#[tonic::async_trait]
impl Watcher for BrokenWatcher {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<watcher::WatchEvent, Status>> + Send>>;

    async fn subscribe(
        &self,
        _: Request<watcher::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }

    async fn list(
        &self,
        _: Request<watcher::ListRequest>,
    ) -> Result<Response<watcher::ListResponse>, Status> {
        Ok(Response::new(watcher::ListResponse::default()))
    }

    async fn status(
        &self,
        _: Request<watcher::StatusRequest>,
    ) -> Result<Response<watcher::StatusResponse>, Status> {
        Ok(Response::new(watcher::StatusResponse {
            ready: false,
            reason: BROKEN.into(),
            epoch: "e".into(),
            revision: 7,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_why_svc_watcher_is_not_serving() {
    let mut cluster = Cluster::start(true).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    cluster.watcher = format!("http://{}", listener.local_addr().expect("addr"));
    let (_not_ready, readiness) = tokio::sync::watch::channel(Readiness::NotReady(BROKEN.into()));
    tokio::spawn(weft_common::readiness::serve_tcp(
        GrpcServer::new().add_service(WatcherServer::new(BrokenWatcher)),
        listener,
        "weft.watcher.v1.Watcher",
        readiness,
        cluster.token.clone(),
    ));
    let out = cluster.weftctl(&["status"]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("svc-watcher") && l.ends_with("NOT_SERVING")),
        "{text}"
    );
    assert!(
        text.contains(&format!("  - svc-watcher is NOT_SERVING: {BROKEN}\n")),
        "{text}"
    );
    let out = cluster.weftctl(&["status", "-o", "json"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let watcher = json["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == "svc-watcher")
        .cloned()
        .expect("svc-watcher");
    assert_eq!(watcher["status"], "NOT_SERVING");
    assert_eq!(watcher["reason"], BROKEN);
}

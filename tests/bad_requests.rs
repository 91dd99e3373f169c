//! Bad input gets a clear error, never a crash: every gRPC request type of
//! every service, with arbitrary field values (and arbitrary bytes in place
//! of the message), against the real services. Each answer must be OK or a
//! deliberate refusal (InvalidArgument naming the field, NotFound, ...),
//! never a crash or an internal error other than "could not decode", and
//! what was stored before the barrage is intact after it.
//!
//! svc-watcher, ipam-svc and identity-svc run in-process, chained as in a
//! cluster (the allocators follow the watcher); datapath-svc runs as a
//! process in a lab, since it needs eBPF and a network namespace.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Buf as _, BufMut as _};
use clap::Parser as _;
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use weft_e2e::TestLab;
use weft_proto::{
    datapath::v1::{
        self as dp, CniAttachment, CniGcRequest, CniRequest, FlowsRequest, PortMapping,
        cni_client::CniClient, datapath_client::DatapathClient,
    },
    identity::v1::{self as id, identity_client::IdentityClient},
    ipam::v1::{self as ipam, ipam_client::IpamClient},
    watcher::v1::{self as w, watcher_client::WatcherClient},
};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends and receives raw message bytes, so a method can be handed
/// anything, not only what its message type can express.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls `path` with `body` as the message; for streaming methods, reads
/// the first message too.
async fn raw_call(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
    streaming: bool,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    let request = tonic::Request::new(body);
    if streaming {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
            Ok(r) => r.map(drop),
            Err(_) => Ok(()), // open and quiet: fine
        }
    } else {
        grpc.unary(request, path, RawCodec).await.map(drop)
    }
}

/// What one method answered, tallied per method and code.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<String, BTreeMap<String, u64>>>>);

impl Tally {
    fn add(&self, method: &str, outcome: &Result<(), Status>) {
        let code = match outcome {
            Ok(()) => "Ok".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(method.to_string())
            .or_default()
            .entry(code)
            .or_default() += 1;
    }

    fn print(&self, title: &str) {
        println!("{title}:");
        for (method, codes) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let total: u64 = codes.values().sum();
            println!("  {method:<34} {total:>4} requests: {codes:?}");
        }
    }
}

/// An answer is acceptable when it is OK, or a deliberate refusal whose
/// message says what was wrong. `fields` are the words an InvalidArgument
/// message must contain one of.
/// The fields a node-API error may name for a bad CNI request: the
/// CNI_* variable as the shim sent it, or the request field.
const CNI_FIELDS: &[&str] = &[
    "CNI_CONTAINERID",
    "CNI_IFNAME",
    "CNI_NETNS",
    "container_id",
    "ifname",
    "netns",
];

fn judge(
    outcome: &Result<(), Status>,
    fields: &[&str],
    also: &[Code],
) -> Result<(), TestCaseError> {
    let Err(status) = outcome else {
        return Ok(());
    };
    let msg = status.message();
    match status.code() {
        Code::InvalidArgument => {
            prop_assert!(
                fields.iter().any(|f| msg.contains(f)),
                "InvalidArgument should name one of {fields:?}: {msg:?}"
            );
        }
        // tonic's own answer to bytes that are not the message.
        Code::Internal if msg.contains("decode") => {}
        code if also.contains(&code) => {}
        code => prop_assert!(false, "unexpected {code:?}: {msg:?}"),
    }
    Ok(())
}

fn block_on<T>(rt: &tokio::runtime::Runtime, f: impl Future<Output = T>) -> T {
    rt.block_on(f)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

/// Arbitrary text: printable, unicode, control characters, long.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!(".{{0,{max}}}")).expect("regex"),
        proptest::string::string_regex(&format!("[a-z0-9:./_-]{{0,{max}}}")).expect("regex"),
        proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect()),
        Just(String::new()),
    ]
}

/// A message body: random bytes (mostly undecodable), or a well-formed
/// protobuf encoding of random fields (known and unknown numbers, either
/// wire type), which decodes into odd values and unknown fields.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let field = (
        1u64..16,
        prop_oneof![
            any::<u64>().prop_map(Err),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(Ok)
        ],
    );
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max),
        proptest::collection::vec(field, 0..6).prop_map(|fields| {
            let mut out = Vec::new();
            for (number, value) in fields {
                match value {
                    Err(v) => {
                        varint(number << 3, &mut out);
                        varint(v, &mut out);
                    }
                    Ok(b) => {
                        varint((number << 3) | 2, &mut out);
                        varint(b.len() as u64, &mut out);
                        out.extend_from_slice(&b);
                    }
                }
            }
            out
        }),
    ]
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
status:
  addresses:
    - type: InternalIP
      address: 172.31.0.11
"#;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 8080
"#;

struct ControlPlane {
    watcher: Channel,
    ipam: Channel,
    identity: Channel,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn control_plane() -> ControlPlane {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("node.yaml"), NODE).expect("write");
    std::fs::write(manifests.join("service.yaml"), SERVICE).expect("write");
    let shutdown = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let watcher_addr = listener.local_addr().expect("addr");
    let args = svc_watcher::Args::try_parse_from([
        "svc-watcher",
        "--manifests-dir",
        &manifests.display().to_string(),
    ])
    .expect("args");
    let config = args.validate().expect("config");
    let metrics = svc_watcher::metrics::Metrics::new();
    let token = shutdown.clone();
    tokio::spawn(async move { svc_watcher::serve(&config, listener, metrics, token).await });

    let watcher_url = format!("http://{watcher_addr}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ipam_addr = listener.local_addr().expect("addr");
    let args = ipam_svc::Args::try_parse_from([
        "ipam-svc",
        "--state-dir",
        &dir.path().join("ipam").display().to_string(),
        "--watcher",
        &watcher_url,
    ])
    .expect("args");
    let config = ipam_svc::Config::from_args(&args).expect("config");
    tokio::spawn(ipam_svc::serve(config, listener, shutdown.clone()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let identity_addr = listener.local_addr().expect("addr");
    let args = identity_svc::Args::try_parse_from([
        "identity-svc",
        "--state-dir",
        &dir.path().join("identity").display().to_string(),
        "--watcher",
        &watcher_url,
    ])
    .expect("args");
    let config = identity_svc::Config::from_args(&args).expect("config");
    tokio::spawn(identity_svc::serve(config, listener, shutdown.clone()));

    let channel = |addr: SocketAddr| {
        weft_common::client::lazy_channel(&format!("http://{addr}")).expect("channel")
    };
    ControlPlane {
        watcher: channel(watcher_addr),
        ipam: channel(ipam_addr),
        identity: channel(identity_addr),
        shutdown,
        _dir: dir,
    }
}

/// What the control plane holds that no bad request may change.
#[derive(Debug, PartialEq)]
struct Stored {
    objects: Vec<String>,
    allocations: BTreeMap<String, String>,
    kept: id::SecurityIdentity,
}

const KEPT_OWNER: &str = "test:kept-across-the-barrage";

async fn stored(cp: &ControlPlane, kept_id: u32) -> anyhow::Result<Stored> {
    let mut objects: Vec<String> = WatcherClient::new(cp.watcher.clone())
        .list(w::ListRequest { kinds: vec![] })
        .await?
        .into_inner()
        .resources
        .iter()
        .filter_map(|r| weft_common::watch::ObjKey::of(r).map(|k| k.to_string()))
        .collect();
    objects.sort();
    let allocations = IpamClient::new(cp.ipam.clone())
        .list(ipam::ListRequest {})
        .await?
        .into_inner()
        .allocations
        .into_iter()
        .map(|a| (a.node, a.cidr))
        .collect();
    let kept = IdentityClient::new(cp.identity.clone())
        .get(id::GetRequest { id: kept_id })
        .await?
        .into_inner();
    Ok(Stored {
        objects,
        allocations,
        kept,
    })
}

async fn healthy(channel: Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    matches!(
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

async fn first_message<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> Result<(), Status> {
    let mut stream = r?.into_inner();
    match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
        Ok(m) => m.map(drop),
        Err(_) => Err(Status::deadline_exceeded("no first message within 2 s")),
    }
}

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        proptest::collection::btree_map(text(24), text(24), 0..5),
        proptest::collection::btree_map(
            "(k8s|reserved|[a-z]{1,4}|K8S):[a-z.]{0,6}".prop_map(String::from),
            "[a-z;=]{0,6}".prop_map(String::from),
            1..4
        ),
        proptest::collection::btree_map("k8s:x".prop_map(String::from), text(80), 1..2),
    ]
}

#[test]
fn control_plane_services_refuse_bad_requests_and_keep_their_state() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cp = block_on(&rt, control_plane());
    // Something stored in each, before the barrage.
    let kept_id = block_on(&rt, async {
        let mut ipam = IpamClient::new(cp.ipam.clone());
        weft_e2e::eventually(Duration::from_secs(20), "node-a has a CIDR", || {
            let mut ipam = ipam.clone();
            async move {
                Ok(ipam
                    .get_node_cidr(ipam::GetNodeCidrRequest {
                        node: "node-a".into(),
                    })
                    .await?
                    .into_inner())
            }
        })
        .await;
        let _ = &mut ipam;
        IdentityClient::new(cp.identity.clone())
            .allocate(id::AllocateRequest {
                labels: BTreeMap::from([
                    ("k8s:app".to_string(), "kept".to_string()),
                    (
                        "k8s:io.kubernetes.pod.namespace".to_string(),
                        "default".to_string(),
                    ),
                ]),
                owner: KEPT_OWNER.into(),
            })
            .await
            .expect("allocate")
            .into_inner()
            .id
    });
    let before = block_on(&rt, stored(&cp, kept_id)).expect("stored state");
    println!(
        "stored before: {} objects, allocations {:?}, identity {} {:?}",
        before.objects.len(),
        before.allocations,
        before.kept.id,
        before.kept.labels
    );
    let tally = Tally::default();
    let cases = 48;

    // svc-watcher
    let watcher = WatcherClient::new(cp.watcher.clone());
    runner(cases)
        .run(
            &(
                proptest::collection::vec(prop_oneof![0i32..8, any::<i32>()], 0..4),
                text(40),
                any::<u64>(),
                text(64),
            ),
            |(kinds, epoch, since_revision, subscriber)| {
                let mut c = watcher.clone();
                let r = block_on(&rt, async {
                    first_message(
                        c.subscribe(w::SubscribeRequest {
                            kinds: kinds.clone(),
                            epoch,
                            since_revision,
                            subscriber,
                        })
                        .await,
                    )
                    .await
                });
                tally.add("Watcher/Subscribe", &r);
                judge(&r, &["kinds"], &[])?;
                let r = block_on(&rt, async {
                    c.list(w::ListRequest { kinds }).await.map(drop)
                });
                tally.add("Watcher/List", &r);
                judge(&r, &["kinds"], &[])
            },
        )
        .expect("svc-watcher");

    // ipam-svc
    let ipam = IpamClient::new(cp.ipam.clone());
    runner(cases)
        .run(&text(300), |node| {
            let mut c = ipam.clone();
            let r = block_on(&rt, async {
                c.get_node_cidr(ipam::GetNodeCidrRequest { node })
                    .await
                    .map(drop)
            });
            tally.add("Ipam/GetNodeCidr", &r);
            judge(&r, &["node"], &[Code::NotFound])
        })
        .expect("ipam-svc GetNodeCidr");

    // identity-svc
    let identity = IdentityClient::new(cp.identity.clone());
    runner(cases)
        .run(
            &(labels_strategy(), text(600), text(600), any::<u32>()),
            |(labels, owner, release, number)| {
                let mut c = identity.clone();
                let r = block_on(&rt, async {
                    c.allocate(id::AllocateRequest { labels, owner })
                        .await
                        .map(drop)
                });
                tally.add("Identity/Allocate", &r);
                judge(&r, &["labels", "owner"], &[])?;
                prop_assume!(release != KEPT_OWNER);
                let r = block_on(&rt, async {
                    c.release(id::ReleaseRequest { owner: release })
                        .await
                        .map(drop)
                });
                tally.add("Identity/Release", &r);
                judge(&r, &["owner"], &[])?;
                let r = block_on(&rt, async {
                    c.get(id::GetRequest { id: number }).await.map(drop)
                });
                tally.add("Identity/Get", &r);
                judge(&r, &["id"], &[Code::NotFound])
            },
        )
        .expect("identity-svc");

    // Arbitrary bytes as every method's message, including the ones whose
    // message has no fields.
    let methods: [(&str, &'static str, bool, &Channel); 10] = [
        (
            "Watcher/Subscribe",
            "/weft.watcher.v1.Watcher/Subscribe",
            true,
            &cp.watcher,
        ),
        (
            "Watcher/List",
            "/weft.watcher.v1.Watcher/List",
            false,
            &cp.watcher,
        ),
        (
            "Ipam/GetNodeCidr",
            "/weft.ipam.v1.Ipam/GetNodeCidr",
            false,
            &cp.ipam,
        ),
        ("Ipam/List", "/weft.ipam.v1.Ipam/List", false, &cp.ipam),
        ("Ipam/Watch", "/weft.ipam.v1.Ipam/Watch", true, &cp.ipam),
        (
            "Identity/Allocate",
            "/weft.identity.v1.Identity/Allocate",
            false,
            &cp.identity,
        ),
        (
            "Identity/Release",
            "/weft.identity.v1.Identity/Release",
            false,
            &cp.identity,
        ),
        (
            "Identity/Get",
            "/weft.identity.v1.Identity/Get",
            false,
            &cp.identity,
        ),
        (
            "Identity/List",
            "/weft.identity.v1.Identity/List",
            false,
            &cp.identity,
        ),
        (
            "Identity/Watch",
            "/weft.identity.v1.Identity/Watch",
            true,
            &cp.identity,
        ),
    ];
    for (name, path, streaming, channel) in methods {
        runner(cases / 2)
            .run(&bytes(96), |body| {
                let r = block_on(&rt, raw_call(channel.clone(), path, body, streaming));
                tally.add(&format!("{name} (raw bytes)"), &r);
                judge(
                    &r,
                    &["kinds", "node", "labels", "owner", "id"],
                    &[Code::NotFound],
                )
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    tally.print("control plane answers");
    for (name, channel) in [
        ("svc-watcher", &cp.watcher),
        ("ipam-svc", &cp.ipam),
        ("identity-svc", &cp.identity),
    ] {
        assert!(
            block_on(&rt, healthy(channel.clone())),
            "{name} still serving"
        );
    }
    let after = block_on(&rt, stored(&cp, kept_id)).expect("stored state");
    assert_eq!(after, before, "nothing stored was lost or changed");
    println!("stored after: unchanged");
    cp.shutdown.cancel();
}

fn cni_request() -> impl Strategy<Value = CniRequest> {
    (
        prop_oneof![text(40), "[a-z0-9]{1,12}".prop_map(String::from)],
        prop_oneof![text(20), Just("eth0".to_string())],
        prop_oneof![
            text(40),
            // Never /proc/self/ns/net: that is the datapath's own namespace.
            Just("/tmp".to_string()),
            Just("/run/netns/does-not-exist".to_string())
        ],
        text(20),
        text(20),
        any::<u32>(),
        proptest::collection::vec(
            (any::<u32>(), any::<u32>(), text(6), text(16)).prop_map(|(h, c, p, ip)| PortMapping {
                host_port: h,
                container_port: c,
                protocol: p,
                host_ip: ip,
            }),
            0..3,
        ),
    )
        .prop_map(
            |(container_id, ifname, netns, pod_namespace, pod_name, mtu, port_mappings)| {
                CniRequest {
                    container_id,
                    ifname,
                    netns,
                    pod_namespace,
                    pod_name,
                    mtu,
                    port_mappings,
                    ..Default::default()
                }
            },
        )
}

/// Runs one CNI request kind against the datapath and checks the answer.
async fn cni_call(channel: Channel, kind: &str, req: CniRequest) -> Result<(), Status> {
    let mut c = CniClient::new(channel);
    let call = async {
        match kind {
            "Add" => c.add(req).await.map(drop),
            "Del" => c.del(req).await.map(drop),
            _ => c.check(req).await.map(drop),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_datapath_refuses_bad_requests_and_keeps_its_state() {
    let lab = TestLab::up("bad_requests_datapath", 1).await;
    let node = lab.node_names()[0].clone();
    lab.manifests
        .apply_yaml(
            "pod-keep.yaml",
            &weft_e2e::pod_manifest("default", "keep", &[("app", "keep")], Some(&node), None),
        )
        .expect("apply");
    lab.wait_pod_ready("default", "keep", Duration::from_secs(60))
        .await
        .expect("ready");
    let api = lab
        .channel(&format!("datapath-svc/{node}"))
        .expect("channel");
    let cni =
        weft_common::client::lazy_channel(&format!("unix://{}", lab.cni_socket(&node).display()))
            .expect("channel");
    let endpoints = |api: Channel| async move {
        let mut eps: Vec<(String, String, String)> = DatapathClient::new(api)
            .list_endpoints(dp::ListEndpointsRequest {})
            .await
            .expect("endpoints")
            .into_inner()
            .endpoints
            .into_iter()
            .map(|e| (e.container_id, e.ip, e.host_ifname))
            .collect();
        eps.sort();
        eps
    };
    let before = endpoints(api.clone()).await;
    assert_eq!(before.len(), 1, "the pod's endpoint: {before:?}");
    let keep = CniAttachment {
        container_id: before[0].0.clone(),
        ifname: "eth0".into(),
    };
    println!("stored before: endpoints {before:?}");

    // A sandbox path that exists but is no network namespace.
    let r = cni_call(
        cni.clone(),
        "Add",
        CniRequest {
            container_id: "not-a-netns".into(),
            ifname: "eth0".into(),
            netns: "/tmp".into(),
            ..Default::default()
        },
    )
    .await;
    println!("ADD with CNI_NETNS=/tmp: {r:?}");
    assert!(
        matches!(&r, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("CNI_NETNS")),
        "refused as invalid, naming CNI_NETNS: {r:?}"
    );

    // The proptest runner is synchronous: drive the calls from a thread of
    // its own with a runtime of its own.
    let tally = Tally::default();
    let cases: u32 = 24;
    let (t, cni2, api2, keep2) = (tally.clone(), cni.clone(), api.clone(), keep.clone());
    let failures = Arc::new(AtomicU64::new(0));
    let f2 = failures.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for kind in ["Add", "Del", "Check"] {
            runner(cases)
                .run(&cni_request(), |req| {
                    // Deleting the kept pod is a valid request, not bad input.
                    prop_assume!(req.container_id != keep2.container_id);
                    let r = rt.block_on(cni_call(cni2.clone(), kind, req));
                    t.add(&format!("Cni/{kind}"), &r);
                    judge(&r, CNI_FIELDS, &[Code::NotFound])
                })
                .unwrap_or_else(|e| {
                    f2.fetch_add(1, Ordering::Relaxed);
                    eprintln!("Cni/{kind}: {e}");
                });
        }
        // GC releases whatever is not listed: the kept pod is always listed.
        runner(cases)
            .run(
                &proptest::collection::vec(
                    (text(40), text(20)).prop_map(|(container_id, ifname)| CniAttachment {
                        container_id,
                        ifname,
                    }),
                    0..4,
                ),
                |mut valid| {
                    valid.push(keep2.clone());
                    let mut c = CniClient::new(cni2.clone());
                    let r = rt.block_on(async {
                        c.gc(CniGcRequest {
                            valid_attachments: valid,
                        })
                        .await
                        .map(drop)
                    });
                    t.add("Cni/Gc", &r);
                    judge(&r, &["container_id", "ifname"], &[])
                },
            )
            .unwrap_or_else(|e| {
                f2.fetch_add(1, Ordering::Relaxed);
                eprintln!("Cni/Gc: {e}");
            });
        runner(cases)
            .run(
                &(any::<u32>(), text(40), text(20), text(12), any::<u32>()),
                |(last, pod, namespace, verdict, identity)| {
                    let mut c = DatapathClient::new(api2.clone());
                    let r = rt.block_on(async {
                        first_message(
                            c.flows(FlowsRequest {
                                follow: false,
                                last,
                                pod,
                                namespace,
                                verdict,
                                identity,
                            })
                            .await,
                        )
                        .await
                        .or_else(|s| {
                            if s.code() == Code::DeadlineExceeded {
                                Ok(()) // no flow matched: a quiet stream
                            } else {
                                Err(s)
                            }
                        })
                    });
                    t.add("Datapath/Flows", &r);
                    judge(&r, &["verdict", "pod", "namespace"], &[])
                },
            )
            .unwrap_or_else(|e| {
                f2.fetch_add(1, Ordering::Relaxed);
                eprintln!("Datapath/Flows: {e}");
            });
        let methods: [(&str, &'static str, bool, &Channel); 10] = [
            ("Cni/Add", "/weft.datapath.v1.Cni/Add", false, &cni2),
            ("Cni/Del", "/weft.datapath.v1.Cni/Del", false, &cni2),
            ("Cni/Check", "/weft.datapath.v1.Cni/Check", false, &cni2),
            ("Cni/Status", "/weft.datapath.v1.Cni/Status", false, &cni2),
            ("Cni/Gc", "/weft.datapath.v1.Cni/Gc", false, &cni2),
            (
                "Datapath/Status",
                "/weft.datapath.v1.Datapath/Status",
                false,
                &api2,
            ),
            (
                "Datapath/ListServices",
                "/weft.datapath.v1.Datapath/ListServices",
                false,
                &api2,
            ),
            (
                "Datapath/ListEndpoints",
                "/weft.datapath.v1.Datapath/ListEndpoints",
                false,
                &api2,
            ),
            (
                "Datapath/DumpLbMaps",
                "/weft.datapath.v1.Datapath/DumpLbMaps",
                false,
                &api2,
            ),
            (
                "Datapath/Flows",
                "/weft.datapath.v1.Datapath/Flows",
                true,
                &api2,
            ),
        ];
        for (name, path, streaming, channel) in methods {
            runner(cases / 2)
                .run(&bytes(64), |mut body| {
                    if name == "Cni/Gc" {
                        // GC releases whatever is not listed: every body
                        // starts by listing the kept pod.
                        let mut listed = CniGcRequest {
                            valid_attachments: vec![keep2.clone()],
                        }
                        .encode_to_vec();
                        listed.append(&mut body);
                        body = listed;
                    }
                    let r = rt.block_on(raw_call(channel.clone(), path, body, streaming));
                    t.add(&format!("{name} (raw bytes)"), &r);
                    judge(&r, &[CNI_FIELDS, &["verdict"]].concat(), &[Code::NotFound])
                })
                .unwrap_or_else(|e| {
                    f2.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{name}: {e}");
                });
        }
    })
    .await
    .expect("the barrage ran");
    tally.print("datapath-svc answers");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "see the failures above"
    );
    assert!(
        weft_lab::client::is_serving(api.clone()).await,
        "datapath-svc still serving"
    );
    let after = endpoints(api.clone()).await;
    println!("stored after: endpoints {after:?}");
    assert_eq!(after, before, "the endpoint survived");
    lab.down().await;
}

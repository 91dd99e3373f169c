//! Runs the built `weft-cni` binary the way a container runtime does (CNI
//! environment, config on stdin) against an in-process fake datapath-svc
//! serving the real `Cni` gRPC service on a temporary unix socket.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt as _, net::UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status, metadata::MetadataValue, transport::Server};
use weft_cni::del_queue;
use weft_proto::datapath::v1::{
    CniAttachment, CniCheckResponse, CniDelResponse, CniGcRequest, CniGcResponse, CniInterface,
    CniIp, CniRequest, CniResult, CniRoute, CniStatusRequest, CniStatusResponse,
    cni_server::{Cni, CniServer},
};

/// What the fake answers every call with.
#[derive(Clone)]
enum Behaviour {
    Ok,
    Fail {
        code: Code,
        message: &'static str,
        cni_code: Option<&'static str>,
    },
    Stall,
}

#[derive(Debug, Clone)]
struct Call {
    method: &'static str,
    request: Option<CniRequest>,
    gc: Option<CniGcRequest>,
    traceparent: Option<String>,
}

#[derive(Clone)]
struct FakeDatapath {
    behaviour: Behaviour,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeDatapath {
    async fn answer<T>(
        &self,
        method: &'static str,
        meta: &tonic::metadata::MetadataMap,
        request: Option<CniRequest>,
        gc: Option<CniGcRequest>,
        ok: T,
    ) -> Result<Response<T>, Status> {
        self.calls.lock().expect("lock").push(Call {
            method,
            request,
            gc,
            traceparent: meta
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        });
        match &self.behaviour {
            Behaviour::Ok => Ok(Response::new(ok)),
            Behaviour::Fail {
                code,
                message,
                cni_code,
            } => {
                let mut status = Status::new(*code, *message);
                if let Some(c) = cni_code {
                    status
                        .metadata_mut()
                        .insert("cni-code", MetadataValue::from_static(c));
                }
                Err(status)
            }
            Behaviour::Stall => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Response::new(ok))
            }
        }
    }
}

fn sample_result(netns: &str) -> CniResult {
    CniResult {
        interfaces: vec![
            CniInterface {
                name: "lxcabc".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: String::new(),
                mtu: 1500,
            },
            CniInterface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:02".into(),
                sandbox: netns.into(),
                mtu: 1500,
            },
        ],
        ips: vec![CniIp {
            address: "10.244.1.7/32".into(),
            gateway: "10.244.1.1".into(),
            interface: Some(1),
        }],
        routes: vec![CniRoute {
            dst: "0.0.0.0/0".into(),
            gw: "10.244.1.1".into(),
        }],
    }
}

#[tonic::async_trait]
impl Cni for FakeDatapath {
    async fn add(&self, request: Request<CniRequest>) -> Result<Response<CniResult>, Status> {
        let result = sample_result(&request.get_ref().netns);
        self.answer(
            "add",
            request.metadata(),
            Some(request.get_ref().clone()),
            None,
            result,
        )
        .await
    }

    async fn del(&self, request: Request<CniRequest>) -> Result<Response<CniDelResponse>, Status> {
        self.answer(
            "del",
            request.metadata(),
            Some(request.get_ref().clone()),
            None,
            CniDelResponse {},
        )
        .await
    }

    async fn check(
        &self,
        request: Request<CniRequest>,
    ) -> Result<Response<CniCheckResponse>, Status> {
        self.answer(
            "check",
            request.metadata(),
            Some(request.get_ref().clone()),
            None,
            CniCheckResponse {},
        )
        .await
    }

    async fn status(
        &self,
        request: Request<CniStatusRequest>,
    ) -> Result<Response<CniStatusResponse>, Status> {
        self.answer(
            "status",
            request.metadata(),
            None,
            None,
            CniStatusResponse {},
        )
        .await
    }

    async fn gc(&self, request: Request<CniGcRequest>) -> Result<Response<CniGcResponse>, Status> {
        let released = vec![CniAttachment {
            container_id: "stale".into(),
            ifname: "eth0".into(),
        }];
        self.answer(
            "gc",
            request.metadata(),
            None,
            Some(request.get_ref().clone()),
            CniGcResponse { released },
        )
        .await
    }
}

/// A temp directory with a fake datapath-svc listening on `cni.sock`.
struct Harness {
    dir: tempfile::TempDir,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Harness {
    async fn start(behaviour: Behaviour) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("cni.sock")).expect("bind");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fake = FakeDatapath {
            behaviour,
            calls: calls.clone(),
        };
        tokio::spawn(
            Server::builder()
                .add_service(CniServer::new(fake))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        Self { dir, calls }
    }

    /// A directory with no server at all.
    fn without_server() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            calls: Arc::default(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("del-queue")
    }

    fn config(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft-cni",
            "socketPath": self.socket(),
            "delQueueDir": self.queue_dir(),
            "logFile": self.dir.path().join("cni.log"),
            "logLevel": "debug",
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }
}

struct PluginRun {
    exit_code: i32,
    stdout: String,
    elapsed: Duration,
}

impl PluginRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    fn error_code(&self) -> u64 {
        assert_ne!(
            self.exit_code, 0,
            "expected a failure, got {:?}",
            self.stdout
        );
        self.json()["code"].as_u64().expect("code")
    }
}

const NETNS: &str = "/var/run/netns/pod-1";

fn attachment_env(command: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123abcd"),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn without(
    mut vars: Vec<(&'static str, &'static str)>,
    name: &str,
) -> Vec<(&'static str, &'static str)> {
    vars.retain(|(k, _)| *k != name);
    vars
}

async fn run_plugin(vars: &[(&str, &str)], stdin: &str) -> PluginRun {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn weft-cni");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("weft-cni finished")
        .expect("weft-cni output");
    PluginRun {
        exit_code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        elapsed: started.elapsed(),
    }
}

#[tokio::test]
async fn add_prints_a_1_0_0_result_and_forwards_everything() {
    let h = Harness::start(Behaviour::Ok).await;
    let mut conf = h.config("1.0.0");
    conf["mtu"] = json!(1400);
    conf["runtimeConfig"] = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]});
    let mut vars = attachment_env("ADD");
    vars.push(("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=uid-1;K8S_POD_INFRA_CONTAINER_ID=0123abcd"));
    vars.push((
        "TRACEPARENT",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));

    let run = run_plugin(&vars, &conf.to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert_eq!(
        run.json(),
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "lxcabc", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": NETNS}
            ],
            "ips": [{"address": "10.244.1.7/32", "gateway": "10.244.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {}
        })
    );

    let calls = h.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "add");
    let req = calls[0].request.clone().expect("request");
    assert_eq!(req.container_id, "0123abcd");
    assert_eq!(req.netns, NETNS);
    assert_eq!(req.ifname, "eth0");
    assert_eq!(req.network, "weft");
    assert_eq!(req.pod_namespace, "default");
    assert_eq!(req.pod_name, "web-0");
    assert_eq!(req.pod_uid, "uid-1");
    assert_eq!(req.mtu, 1400);
    assert_eq!(req.port_mappings.len(), 1);
    assert_eq!(req.port_mappings[0].host_port, 8080);
    assert_eq!(req.port_mappings[0].host_ip, "127.0.0.1");
    assert_eq!(
        calls[0].traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    let log = std::fs::read_to_string(h.dir.path().join("cni.log")).expect("log file written");
    assert!(log.contains("CNI call"), "{log}");
}

#[tokio::test]
async fn add_prints_a_0_4_0_result_with_ip_versions() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(&attachment_env("ADD"), &h.config("0.4.0").to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    let out = run.json();
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(out["ips"][0]["version"], "4");
    assert_eq!(out["ips"][0]["address"], "10.244.1.7/32");
    assert_eq!(out["interfaces"][1]["sandbox"], NETNS);
}

#[tokio::test]
async fn malformed_json_is_code_6() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(&attachment_env("ADD"), "{\"cniVersion\": \"1.0.0\", ").await;
    assert_eq!(run.exit_code, 1);
    assert_eq!(run.error_code(), 6);
    assert!(h.calls().is_empty());
}

#[tokio::test]
async fn unknown_version_is_code_1() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(&attachment_env("ADD"), &h.config("9.9.9").to_string()).await;
    assert_eq!(run.error_code(), 1);
    assert!(
        run.json()["details"]
            .as_str()
            .expect("details")
            .contains("9.9.9")
    );
    assert!(h.calls().is_empty());
}

#[tokio::test]
async fn add_without_netns_is_code_4() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(
        &without(attachment_env("ADD"), "CNI_NETNS"),
        &h.config("1.0.0").to_string(),
    )
    .await;
    assert_eq!(run.error_code(), 4);
    assert!(
        run.json()["msg"]
            .as_str()
            .expect("msg")
            .contains("CNI_NETNS")
    );
    assert!(h.calls().is_empty());
}

#[tokio::test]
async fn unknown_cni_args_key_is_code_4() {
    let h = Harness::start(Behaviour::Ok).await;
    let mut vars = attachment_env("ADD");
    vars.push(("CNI_ARGS", "K8S_POD_NAME=web-0;SOMETHING=else"));
    let run = run_plugin(&vars, &h.config("1.0.0").to_string()).await;
    assert_eq!(run.error_code(), 4);
}

#[tokio::test]
async fn add_without_datapath_fails_fast_with_code_11() {
    let h = Harness::without_server();
    let run = run_plugin(&attachment_env("ADD"), &h.config("1.1.0").to_string()).await;
    assert_eq!(run.error_code(), 11);
    assert!(
        run.elapsed < Duration::from_secs(3),
        "took {:?}",
        run.elapsed
    );
    let out = run.json();
    assert_eq!(out["cniVersion"], "1.1.0");
    assert!(
        out["details"]
            .as_str()
            .expect("details")
            .contains("cni.sock"),
        "{out}"
    );
}

#[tokio::test]
async fn del_without_datapath_is_queued_and_succeeds() {
    let h = Harness::without_server();
    let mut vars = without(attachment_env("DEL"), "CNI_NETNS");
    vars.push(("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"));
    let run = run_plugin(&vars, &h.config("1.0.0").to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let drained = del_queue::drain_dir(&h.queue_dir()).expect("drain");
    assert!(drained.malformed.is_empty());
    assert_eq!(drained.pending.len(), 1);
    let queued = &drained.pending[0];
    assert_eq!(queued.del.container_id, "0123abcd");
    assert_eq!(queued.del.ifname, "eth0");
    assert_eq!(queued.del.pod_name, "web-0");
    assert_eq!(queued.del.network, "weft");
    assert_eq!(queued.path, h.queue_dir().join("0123abcd@eth0.json"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&queued.path)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn del_of_unknown_attachment_succeeds() {
    let h = Harness::start(Behaviour::Fail {
        code: Code::NotFound,
        message: "no such attachment",
        cni_code: None,
    })
    .await;
    let run = run_plugin(&attachment_env("DEL"), &h.config("1.0.0").to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert_eq!(h.calls().len(), 1);
    assert!(
        !h.queue_dir().exists(),
        "nothing queued when datapath-svc answered"
    );
}

#[tokio::test]
async fn del_reaches_the_datapath() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(
        &without(attachment_env("DEL"), "CNI_NETNS"),
        &h.config("0.3.1").to_string(),
    )
    .await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    let calls = h.calls();
    assert_eq!(calls[0].method, "del");
    assert_eq!(calls[0].request.as_ref().expect("req").netns, "");
}

#[tokio::test]
async fn version_answers_without_a_config() {
    let run = run_plugin(&[("CNI_COMMAND", "VERSION")], "").await;
    assert_eq!(run.exit_code, 0);
    assert_eq!(
        run.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[tokio::test]
async fn invalid_argument_is_code_7() {
    let h = Harness::start(Behaviour::Fail {
        code: Code::InvalidArgument,
        message: "mtu 9999999 is out of range",
        cni_code: None,
    })
    .await;
    let run = run_plugin(&attachment_env("ADD"), &h.config("1.0.0").to_string()).await;
    assert_eq!(run.error_code(), 7);
    assert_eq!(run.json()["msg"], "mtu 9999999 is out of range");
}

#[tokio::test]
async fn invalid_argument_about_the_netns_is_code_4() {
    let h = Harness::start(Behaviour::Fail {
        code: Code::InvalidArgument,
        message: "netns /var/run/netns/pod-1 does not exist",
        cni_code: None,
    })
    .await;
    let run = run_plugin(&attachment_env("ADD"), &h.config("1.0.0").to_string()).await;
    assert_eq!(run.error_code(), 4);
}

#[tokio::test]
async fn resource_exhausted_and_explicit_codes() {
    let h = Harness::start(Behaviour::Fail {
        code: Code::ResourceExhausted,
        message: "no pod IPs left",
        cni_code: None,
    })
    .await;
    let run = run_plugin(&attachment_env("ADD"), &h.config("1.0.0").to_string()).await;
    assert_eq!(run.error_code(), 101);

    let h = Harness::start(Behaviour::Fail {
        code: Code::Internal,
        message: "pods may be cut off",
        cni_code: Some("51"),
    })
    .await;
    let run = run_plugin(&[("CNI_COMMAND", "STATUS")], &h.config("1.1.0").to_string()).await;
    assert_eq!(run.error_code(), 51);
    assert_eq!(run.json()["msg"], "pods may be cut off");
}

#[tokio::test]
async fn stalled_datapath_times_out_with_code_11() {
    let h = Harness::start(Behaviour::Stall).await;
    let mut conf = h.config("1.0.0");
    conf["timeoutSeconds"] = json!(1);
    let run = run_plugin(&attachment_env("ADD"), &conf.to_string()).await;
    assert_eq!(run.error_code(), 11);
    assert!(
        run.elapsed >= Duration::from_millis(900),
        "gave up early: {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed < Duration::from_secs(3),
        "took {:?}",
        run.elapsed
    );
    assert_eq!(
        h.calls().len(),
        1,
        "the call reached the server before the timeout"
    );
}

#[tokio::test]
async fn stalled_datapath_on_del_is_queued() {
    let h = Harness::start(Behaviour::Stall).await;
    let mut conf = h.config("1.0.0");
    conf["timeoutSeconds"] = json!(0.5);
    let run = run_plugin(&attachment_env("DEL"), &conf.to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert_eq!(
        del_queue::drain_dir(&h.queue_dir())
            .expect("drain")
            .pending
            .len(),
        1
    );
}

#[tokio::test]
async fn check_forwards_prev_result_and_maps_not_found_to_3() {
    let h = Harness::start(Behaviour::Ok).await;
    let mut conf = h.config("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": NETNS}],
        "ips": [{"address": "10.244.1.7/32", "interface": 0}]
    });
    let run = run_plugin(&attachment_env("CHECK"), &conf.to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert!(run.stdout.is_empty());
    let req = h.calls()[0].request.clone().expect("request");
    let prev = req.prev_result.expect("prev_result forwarded");
    assert_eq!(prev.ips[0].address, "10.244.1.7/32");
    assert_eq!(prev.interfaces[0].name, "eth0");

    let h2 = Harness::start(Behaviour::Fail {
        code: Code::NotFound,
        message: "unknown container",
        cni_code: None,
    })
    .await;
    let mut conf2 = h2.config("1.0.0");
    conf2["prevResult"] = conf["prevResult"].clone();
    let run = run_plugin(&attachment_env("CHECK"), &conf2.to_string()).await;
    assert_eq!(run.error_code(), 3);
}

#[tokio::test]
async fn status_and_gc() {
    let h = Harness::start(Behaviour::Ok).await;
    let run = run_plugin(&[("CNI_COMMAND", "STATUS")], &h.config("1.1.0").to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);

    let mut conf = h.config("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([
        {"containerID": "keep-1", "ifname": "eth0"},
        {"containerID": "keep-2", "ifname": "net1"}
    ]);
    let run = run_plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf.to_string(),
    )
    .await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    let calls = h.calls();
    assert_eq!(
        calls.iter().map(|c| c.method).collect::<Vec<_>>(),
        ["status", "gc"]
    );
    let gc = calls[1].gc.clone().expect("gc request");
    let valid: Vec<_> = gc
        .valid_attachments
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    assert_eq!(valid, [("keep-1", "eth0"), ("keep-2", "net1")]);
}

#[tokio::test]
async fn status_without_datapath_is_code_50() {
    let h = Harness::without_server();
    let run = run_plugin(&[("CNI_COMMAND", "STATUS")], &h.config("1.1.0").to_string()).await;
    assert_eq!(run.error_code(), 50);
}

#[tokio::test]
async fn stale_socket_file_is_unreachable_not_a_hang() {
    let h = Harness::without_server();
    // A socket file nobody listens on, as left behind by a killed daemon.
    let listener = std::os::unix::net::UnixListener::bind(h.socket()).expect("bind");
    drop(listener);
    assert!(Path::new(&h.socket()).exists());
    let run = run_plugin(&attachment_env("ADD"), &h.config("1.0.0").to_string()).await;
    assert_eq!(run.error_code(), 11);
    assert!(
        run.elapsed < Duration::from_secs(3),
        "took {:?}",
        run.elapsed
    );
}

/// An OTLP/gRPC collector that keeps what it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        Status,
    > {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(Response::new(Default::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn with_an_otlp_endpoint_the_plugin_exports_its_span_and_is_the_parent() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let h = Harness::start(Behaviour::Ok).await;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut conf = h.config("1.1.0");
    conf["otlpEndpoint"] = json!(endpoint);
    let mut vars = attachment_env("ADD");
    vars.push((
        "CNI_ARGS",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1",
    ));
    vars.push((
        "TRACEPARENT",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));

    let run = run_plugin(&vars, &conf.to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    // Exported before the process exited: no waiting here.
    let spans = collector.spans.lock().expect("lock").clone();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span.name, "CNI ADD");
    assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert!(span.attributes.iter().any(|a| a.key == "k8s.pod.name"));
    let calls = h.calls();
    assert_eq!(
        calls[0].traceparent.as_deref(),
        Some(
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&span.span_id)
            )
            .as_str()
        ),
        "datapath-svc's parent is the plugin's span"
    );
}

#[tokio::test]
async fn an_unreachable_collector_does_not_fail_the_call() {
    let h = Harness::start(Behaviour::Ok).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut conf = h.config("1.1.0");
    conf["otlpEndpoint"] = json!(format!("http://{addr}"));
    let run = run_plugin(&attachment_env("ADD"), &conf.to_string()).await;
    assert_eq!(run.exit_code, 0, "{}", run.stdout);
    assert!(run.elapsed < Duration::from_secs(3), "{:?}", run.elapsed);
    // A new trace was started and handed on.
    let calls = h.calls();
    assert!(
        calls[0]
            .traceparent
            .as_deref()
            .is_some_and(|t| t.starts_with("00-") && t.ends_with("-01")),
        "{:?}",
        calls[0].traceparent
    );
}

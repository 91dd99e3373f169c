//! One plugin invocation: environment and config in, stdout text and exit
//! code out.
//!
//! The order of checks follows the reference plugins' `skel`, so a runtime
//! sees the same code for the same mistake: the environment (4), then the
//! config (6, 7, 1), then whether the config's version has the command
//! (CHECK needs 0.4.0, STATUS and GC 1.1.0), then datapath-svc.
//!
//! How datapath-svc's gRPC answers become CNI codes (see [`crate::error`]):
//!
//! | gRPC status | CNI code |
//! | --- | --- |
//! | any, with `cni-code` metadata | that code |
//! | InvalidArgument naming an env-derived field (container_id, netns, ifname, pod_*) | 4 |
//! | InvalidArgument, OutOfRange | 7 |
//! | NotFound | 3 (DEL: success) |
//! | Unavailable, DeadlineExceeded, FailedPrecondition, Aborted, Cancelled, unreachable, timeout | 11 (STATUS: 50; DEL: queued, success) |
//! | ResourceExhausted | 101 |
//! | AlreadyExists | 102 |
//! | PermissionDenied, Unauthenticated | 103 |
//! | Unimplemented | 104 |
//! | Internal, Unknown, DataLoss | 100 |

use std::{io, time::Instant};

use tonic::Code;
use weft_proto::datapath::v1::{self as pb, CniAttachment, CniRequest};

use crate::{
    client::{CallError, DatapathClient},
    config::{self, NetConf, SpecVersion},
    del_queue::{self, QueuedDel},
    env::{CniEnv, Command},
    error::{CniError, code},
    logging,
    result::{parse_prev_result, render_error, render_result, render_version},
    trace::{self, InvocationSpan},
};

/// What the process prints on stdout and exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: u8,
}

impl Outcome {
    fn success(stdout: String) -> Self {
        Self {
            stdout,
            exit_code: 0,
        }
    }

    fn failure(version: SpecVersion, err: &CniError) -> Self {
        Self {
            stdout: render_error(version, err),
            // The reference plugins exit 1 for every error; the code is in the JSON.
            exit_code: 1,
        }
    }
}

/// Runs one invocation. `lookup` reads an environment variable;
/// `read_stdin` is called only for commands that take a config (not for
/// VERSION, and not when `CNI_COMMAND` is missing, so a person running the
/// binary by hand gets an answer instead of a blocked terminal).
pub async fn run(
    lookup: impl Fn(&str) -> Option<String>,
    read_stdin: impl FnOnce() -> io::Result<Vec<u8>>,
) -> Outcome {
    let command = lookup("CNI_COMMAND").filter(|c| !c.is_empty());
    let stdin = match command.as_deref() {
        None | Some("VERSION") => Vec::new(),
        Some(_) => match read_stdin() {
            Ok(bytes) => bytes,
            Err(e) => {
                let err = CniError::new(code::IO_FAILURE, "error reading from stdin")
                    .with_details(e.to_string());
                return Outcome::failure(SpecVersion::LATEST, &err);
            }
        },
    };
    let error_version = config::version_for_errors(&stdin);

    let env = match CniEnv::from_lookup(&lookup) {
        Ok(env) => env,
        Err(err) => return Outcome::failure(error_version, &err),
    };
    if env.command == Command::Version {
        return Outcome::success(render_version());
    }

    let conf = match config::parse(&stdin) {
        Ok(conf) => conf,
        Err(err) => return Outcome::failure(error_version, &err),
    };
    logging::init(&conf);

    let minimum = SpecVersion::minimum_for(env.command);
    if conf.cni_version < minimum {
        let err = CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version does not allow {}", env.command),
        )
        .with_details(format!(
            "{} needs cniVersion {minimum} or later; the config is {}",
            env.command, conf.cni_version
        ));
        return Outcome::failure(conf.cni_version, &err);
    }

    let started = Instant::now();
    tracing::info!(
        command = %env.command,
        container_id = %env.container_id,
        ifname = %env.ifname,
        netns = %env.netns,
        pod_namespace = env.args.pod_namespace.as_deref().unwrap_or(""),
        pod_name = env.args.pod_name.as_deref().unwrap_or(""),
        network = %conf.name,
        "CNI call"
    );
    // With an OTLP endpoint the plugin's own span is the parent
    // datapath-svc continues; without one the runtime's context (if any)
    // is passed on untouched.
    let span = conf.otlp_endpoint.as_ref().map(|_| {
        let mut span = InvocationSpan::start(env.command.as_str(), env.traceparent.as_deref());
        span.set("container.id", env.container_id.as_str());
        span.set("cni.ifname", env.ifname.as_str());
        span.set("cni.network", conf.name.as_str());
        span.set(
            "k8s.namespace.name",
            env.args.pod_namespace.as_deref().unwrap_or(""),
        );
        span.set("k8s.pod.name", env.args.pod_name.as_deref().unwrap_or(""));
        span
    });
    let traceparent = match &span {
        Some(span) => Some(span.context.to_header()),
        None => env.traceparent.clone(),
    };
    let (outcome, error) = match dispatch(&env, &conf, traceparent.as_deref()).await {
        Ok(stdout) => (Outcome::success(stdout), None),
        Err(err) => {
            tracing::warn!(command = %env.command, container_id = %env.container_id, code = err.code, msg = %err.msg, details = %err.details, "CNI call failed");
            (Outcome::failure(conf.cni_version, &err), Some(err.msg))
        }
    };
    if let (Some(span), Some(endpoint)) = (span, &conf.otlp_endpoint)
        && span.context.sampled
        && let Err(e) =
            trace::export(endpoint, span.finish(outcome.exit_code, error.as_deref())).await
    {
        tracing::warn!(error = %e, "span not exported");
    }
    tracing::info!(
        command = %env.command,
        container_id = %env.container_id,
        exit_code = outcome.exit_code,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "CNI call done"
    );
    outcome
}

async fn dispatch(
    env: &CniEnv,
    conf: &NetConf,
    traceparent: Option<&str>,
) -> Result<String, CniError> {
    let client = DatapathClient::new(
        &conf.socket_path,
        conf.timeout_for(env.command),
        traceparent,
    );
    match env.command {
        Command::Add => {
            let result = client
                .add(attachment_request(env, conf))
                .await
                .map_err(|e| map_call_error(Command::Add, e))?;
            render_result(conf.cni_version, &result, conf.dns.as_ref())
        }
        Command::Del => del(&client, attachment_request(env, conf), conf).await,
        Command::Check => {
            let Some(prev) = &conf.prev_result else {
                return Err(CniError::config("CHECK needs prevResult in the config"));
            };
            let mut req = attachment_request(env, conf);
            req.prev_result = Some(parse_prev_result(prev)?);
            client
                .check(req)
                .await
                .map_err(|e| map_call_error(Command::Check, e))?;
            Ok(String::new())
        }
        Command::Status => {
            client
                .status()
                .await
                .map_err(|e| map_call_error(Command::Status, e))?;
            Ok(String::new())
        }
        Command::Gc => {
            let valid = conf
                .valid_attachments
                .iter()
                .flatten()
                .map(|a| CniAttachment {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                })
                .collect();
            let released = client
                .gc(valid)
                .await
                .map_err(|e| map_call_error(Command::Gc, e))?;
            for a in released {
                tracing::info!(container_id = %a.container_id, ifname = %a.ifname, "GC released attachment");
            }
            Ok(String::new())
        }
        Command::Version => Ok(render_version()),
    }
}

/// DEL succeeds when the attachment is unknown, and is queued on disk for
/// datapath-svc to replay when datapath-svc is not there to take it.
async fn del(client: &DatapathClient, req: CniRequest, conf: &NetConf) -> Result<String, CniError> {
    let err = match client.del(req.clone()).await {
        Ok(()) => return Ok(String::new()),
        Err(CallError::Status(s)) if s.code() == Code::NotFound => {
            tracing::info!(container_id = %req.container_id, "DEL of an unknown attachment: nothing to do");
            return Ok(String::new());
        }
        Err(err) if err.is_unavailable() => err,
        Err(err) => return Err(map_call_error(Command::Del, err)),
    };
    let queued = QueuedDel::from_request(&req, err.to_string());
    match del_queue::enqueue(&conf.del_queue_dir, &queued) {
        Ok(path) => {
            tracing::warn!(container_id = %req.container_id, path = %path.display(), reason = %err, "datapath-svc unavailable; DEL queued for replay");
            Ok(String::new())
        }
        Err(qerr) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "datapath-svc is unavailable and the DEL could not be queued",
        )
        .with_details(format!("{err}; {qerr}"))),
    }
}

fn attachment_request(env: &CniEnv, conf: &NetConf) -> CniRequest {
    CniRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        network: conf.name.clone(),
        pod_namespace: env.args.pod_namespace.clone().unwrap_or_default(),
        pod_name: env.args.pod_name.clone().unwrap_or_default(),
        pod_uid: env.args.pod_uid.clone().unwrap_or_default(),
        mtu: conf.mtu.unwrap_or(0),
        port_mappings: conf
            .port_mappings
            .iter()
            .map(|m| pb::PortMapping {
                host_port: u32::from(m.host_port),
                container_port: u32::from(m.container_port),
                protocol: m.protocol.clone(),
                host_ip: m.host_ip.clone(),
            })
            .collect(),
        prev_result: None,
    }
}

/// The request fields that come from the CNI environment rather than the
/// config: an InvalidArgument naming one is the runtime's mistake (4).
const ENV_FIELDS: &[&str] = &[
    "container_id",
    "netns",
    "ifname",
    "pod_namespace",
    "pod_name",
    "pod_uid",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
];

fn names_env_field(message: &str) -> bool {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| ENV_FIELDS.contains(&word))
}

/// Turns a failed call into the CNI error for `command` (table in the
/// module docs).
pub fn map_call_error(command: Command, err: CallError) -> CniError {
    let unavailable_code = if command == Command::Status {
        code::PLUGIN_NOT_AVAILABLE
    } else {
        code::TRY_AGAIN_LATER
    };
    let status = match err {
        CallError::Unreachable { .. } => {
            return CniError::new(
                unavailable_code,
                "datapath-svc is not reachable; is it running on this node?",
            )
            .with_details(err.to_string());
        }
        CallError::Timeout { .. } => {
            return CniError::new(unavailable_code, "datapath-svc did not answer in time")
                .with_details(err.to_string());
        }
        CallError::Status(status) => status,
    };

    let explicit = status
        .metadata()
        .get(weft_cni_contract::CODE_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let mut details = format!("gRPC status {:?} from datapath-svc", status.code());
    let message = if explicit.is_none()
        && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)
    {
        // The server enforcing our deadline says only "Timeout expired".
        details = format!("{details}: {}", status.message());
        "datapath-svc did not answer in time".to_string()
    } else if status.message().is_empty() {
        format!("datapath-svc answered {}", status.code())
    } else {
        status.message().to_string()
    };
    let cni_code = explicit.unwrap_or_else(|| match status.code() {
        Code::InvalidArgument if names_env_field(status.message()) => code::INVALID_ENV,
        Code::InvalidArgument | Code::OutOfRange => code::INVALID_CONFIG,
        Code::NotFound => code::UNKNOWN_CONTAINER,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Cancelled => unavailable_code,
        Code::ResourceExhausted => code::RESOURCE_EXHAUSTED,
        Code::AlreadyExists => code::ALREADY_EXISTS,
        Code::PermissionDenied | Code::Unauthenticated => code::PERMISSION_DENIED,
        Code::Unimplemented => code::UNIMPLEMENTED,
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Ok => code::DATAPATH_INTERNAL,
    });
    CniError::new(cni_code, message).with_details(details)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::PathBuf, time::Duration};

    use tonic::{Status, metadata::MetadataValue};

    use super::*;

    fn status_code(command: Command, status: Status) -> u32 {
        map_call_error(command, CallError::Status(status)).code
    }

    #[test]
    fn grpc_codes_map_to_cni_codes() {
        let cases = [
            (
                Status::invalid_argument("mtu 10 is too small"),
                code::INVALID_CONFIG,
            ),
            (Status::invalid_argument("ifname: bad"), code::INVALID_ENV),
            (
                Status::invalid_argument("netns /x does not exist"),
                code::INVALID_ENV,
            ),
            (
                Status::invalid_argument("port_mappings[0].protocol"),
                code::INVALID_CONFIG,
            ),
            (
                Status::not_found("no such attachment"),
                code::UNKNOWN_CONTAINER,
            ),
            (
                Status::resource_exhausted("no IPs left"),
                code::RESOURCE_EXHAUSTED,
            ),
            (Status::already_exists("x"), code::ALREADY_EXISTS),
            (Status::unavailable("starting"), code::TRY_AGAIN_LATER),
            (
                Status::failed_precondition("no pod CIDR yet"),
                code::TRY_AGAIN_LATER,
            ),
            (Status::permission_denied("x"), code::PERMISSION_DENIED),
            (Status::unimplemented("x"), code::UNIMPLEMENTED),
            (Status::internal("boom"), code::DATAPATH_INTERNAL),
            (Status::unknown("boom"), code::DATAPATH_INTERNAL),
        ];
        for (status, expected) in cases {
            let shown = format!("{status:?}");
            assert_eq!(status_code(Command::Add, status), expected, "{shown}");
        }
        assert_eq!(
            status_code(Command::Status, Status::unavailable("x")),
            code::PLUGIN_NOT_AVAILABLE
        );
    }

    #[test]
    fn env_field_detection_is_by_whole_word() {
        assert!(names_env_field("container_id must be set"));
        assert!(names_env_field("bad CNI_IFNAME"));
        assert!(!names_env_field("network name is bad"));
        assert!(!names_env_field("host_ifname_x"));
    }

    #[test]
    fn explicit_cni_code_wins() {
        let mut status = Status::internal("limited");
        status
            .metadata_mut()
            .insert("cni-code", MetadataValue::from_static("51"));
        let err = map_call_error(Command::Status, CallError::Status(status));
        assert_eq!(err.code, code::LIMITED_CONNECTIVITY);
        assert_eq!(err.msg, "limited");
        let mut status = Status::internal("x");
        status
            .metadata_mut()
            .insert("cni-code", MetadataValue::from_static("nonsense"));
        assert_eq!(status_code(Command::Add, status), code::DATAPATH_INTERNAL);
    }

    #[test]
    fn transport_failures_are_try_again_or_not_available() {
        let unreachable = || CallError::Unreachable {
            path: PathBuf::from("/x"),
            reason: "gone".into(),
        };
        assert_eq!(
            map_call_error(Command::Add, unreachable()).code,
            code::TRY_AGAIN_LATER
        );
        assert_eq!(
            map_call_error(Command::Status, unreachable()).code,
            code::PLUGIN_NOT_AVAILABLE
        );
        let timeout = CallError::Timeout {
            path: PathBuf::from("/x"),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            map_call_error(Command::Gc, timeout).code,
            code::TRY_AGAIN_LATER
        );
    }

    async fn invoke(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let stdin = stdin.as_bytes().to_vec();
        run(|k| map.get(k).cloned(), move || Ok(stdin)).await
    }

    fn parsed(outcome: &Outcome) -> serde_json::Value {
        serde_json::from_str(&outcome.stdout).expect("stdout is JSON")
    }

    #[tokio::test]
    async fn version_needs_no_stdin() {
        let outcome = run(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_string()),
            || panic!("VERSION must not read stdin"),
        )
        .await;
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(parsed(&outcome)["cniVersion"], "1.1.0");
    }

    #[tokio::test]
    async fn env_error_reports_in_the_config_version() {
        let outcome = invoke(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"0.4.0","name":"n"}"#,
        )
        .await;
        assert_eq!(outcome.exit_code, 1);
        let out = parsed(&outcome);
        assert_eq!(out["code"], 4);
        assert_eq!(out["cniVersion"], "0.4.0");
    }

    #[tokio::test]
    async fn stdin_failure_is_io_failure() {
        let outcome = run(
            |k| (k == "CNI_COMMAND").then(|| "ADD".to_string()),
            || Err(io::Error::other("broken pipe")),
        )
        .await;
        assert_eq!(parsed(&outcome)["code"], 5);
    }

    #[tokio::test]
    async fn check_and_gc_need_new_enough_versions() {
        let attach = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/1/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ];
        let mut vars = vec![("CNI_COMMAND", "CHECK")];
        vars.extend_from_slice(&attach);
        let outcome = invoke(&vars, r#"{"cniVersion":"0.3.1","name":"n"}"#).await;
        assert_eq!(parsed(&outcome)["code"], 1);
        let outcome = invoke(
            &[("CNI_COMMAND", "GC")],
            r#"{"cniVersion":"1.0.0","name":"n"}"#,
        )
        .await;
        assert_eq!(parsed(&outcome)["code"], 1);
        let outcome = invoke(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"1.0.0","name":"n"}"#,
        )
        .await;
        assert_eq!(parsed(&outcome)["code"], 1);
    }

    #[tokio::test]
    async fn check_without_prev_result_is_invalid_config() {
        let vars = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/1/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ];
        let outcome = invoke(
            &vars,
            r#"{"cniVersion":"1.0.0","name":"n","socketPath":"/nonexistent/x.sock"}"#,
        )
        .await;
        assert_eq!(parsed(&outcome)["code"], 7);
    }

    #[tokio::test]
    async fn status_without_datapath_is_not_available() {
        let outcome = invoke(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"1.1.0","name":"n","socketPath":"/nonexistent/x.sock"}"#,
        )
        .await;
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(parsed(&outcome)["code"], 50);
    }

    #[tokio::test]
    async fn del_with_unwritable_queue_asks_to_retry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let blocker = tmp.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "n",
            "socketPath": tmp.path().join("none.sock"),
            "delQueueDir": blocker.join("queue"),
        });
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let outcome = invoke(&vars, &conf.to_string()).await;
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(parsed(&outcome)["code"], 11);
    }
}

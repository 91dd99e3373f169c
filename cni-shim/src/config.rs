//! The network configuration on stdin.
//!
//! Parsing is two steps so that the error code says what is wrong: bytes
//! that are not a JSON object are a decode failure (6); a `cniVersion` this
//! plugin does not speak is an incompatible version (1); a well-formed
//! object with a missing, mistyped or out-of-range field is an invalid
//! config (7). A key that is neither the spec's nor one of weft's
//! ([`KNOWN_KEYS`]) is refused as an unsupported field (2), naming it and
//! the key it was probably meant to be: a misspelt `socketPath` would
//! otherwise send every call to the default socket and fail with "try again
//! later" for ever. (The spec lets a plugin refuse fields it does not know.)

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use serde_json::{Map, Value};

use crate::{
    env::{Command, is_valid_name},
    error::{CniError, code},
};

/// Where datapath-svc serves the `Cni` service unless the config says.
pub const DEFAULT_SOCKET_PATH: &str = "/run/weft/cni.sock";
/// Where DELs wait while datapath-svc is unreachable, unless the config says.
pub const DEFAULT_DEL_QUEUE_DIR: &str = "/var/run/weft/cni-del-queue";
/// How long ADD, CHECK and GC wait for datapath-svc by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most DEL and STATUS wait: kubelet retries a DEL anyway, and a DEL
/// that cannot reach datapath-svc is queued, so waiting long buys nothing.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The upper bound on `timeoutSeconds`: a CNI call that hangs for minutes
/// holds up the pod sandbox and the runtime's lock.
pub const MAX_TIMEOUT_SECONDS: f64 = 300.0;

/// The keys of weft-cni's own section of a network config list, and what
/// each is for. Also documented, with defaults, in the README.
pub const WEFT_KEYS: &[&str] = &[
    "socketPath",
    "delQueueDir",
    "timeoutSeconds",
    "logFile",
    "logLevel",
    "otlpEndpoint",
    "mtu",
];

/// The keys the spec defines for a plugin's config, or that runtimes
/// (libcni) add to it: the list's name and version, the ADD result for
/// CHECK and DEL, capabilities and their runtime values, GC's attachments.
/// Any `cni.dev/` key is the spec's too.
const SPEC_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "capabilities",
    "runtimeConfig",
    "args",
    "prevResult",
    "ipMasq",
    "ipam",
    "dns",
];

/// Every key the plugin accepts.
pub fn is_known_key(key: &str) -> bool {
    key.starts_with("cni.dev/") || SPEC_KEYS.contains(&key) || WEFT_KEYS.contains(&key)
}

/// Refuses the first key this plugin does not know, with its value and
/// the known key it most resembles.
fn refuse_unknown_keys(obj: &Map<String, Value>) -> Result<(), CniError> {
    let Some((key, value)) = obj.iter().find(|(k, _)| !is_known_key(k)) else {
        return Ok(());
    };
    let near = WEFT_KEYS
        .iter()
        .chain(SPEC_KEYS)
        .map(|k| {
            (
                strsim::levenshtein(&key.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .min()
        .filter(|(d, _)| *d <= 3)
        .map(|(_, k)| format!("; did you mean {k:?}?"))
        .unwrap_or_default();
    let mut shown = value.to_string();
    if shown.len() > 80 {
        shown = format!("{}…", shown.chars().take(80).collect::<String>());
    }
    Err(CniError::new(
        code::UNSUPPORTED_FIELD,
        format!("unknown key {key:?} in weft-cni's config (value {shown}){near}"),
    )
    .with_details(format!("weft-cni's own keys are {}", WEFT_KEYS.join(", "))))
}

/// A CNI spec version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl SpecVersion {
    pub const ALL: [SpecVersion; 5] = [
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];
    pub const LATEST: SpecVersion = Self::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// The result format: 1.0.0 dropped `version` from `ips`.
    pub fn is_v1(self) -> bool {
        self >= Self::V1_0_0
    }

    /// The oldest version a command exists in.
    pub fn minimum_for(command: Command) -> SpecVersion {
        match command {
            Command::Check => Self::V0_4_0,
            Command::Status | Command::Gc => Self::V1_1_0,
            Command::Add | Command::Del | Command::Version => Self::V0_3_0,
        }
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SpecVersion {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or(())
    }
}

/// How much the plugin logs to `logFile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl FromStr for LogLevel {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => Self::Error,
            "warn" | "warning" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return Err(()),
        })
    }
}

/// One `runtimeConfig.portMappings` entry (the portmap convention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp` or `udp`, lower case.
    pub protocol: String,
    /// Empty for every host address.
    pub host_ip: String,
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The parts of the network configuration weft uses.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: SpecVersion,
    pub name: String,
    pub socket_path: PathBuf,
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
    /// `timeoutSeconds`; `None` for the defaults.
    pub timeout: Option<Duration>,
    pub del_queue_dir: PathBuf,
    pub port_mappings: Vec<PortMapping>,
    /// The runtime's stored ADD result (CHECK, and chained DEL).
    pub prev_result: Option<Value>,
    /// GC's list of attachments still in use; `None` when absent.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The network's DNS settings, echoed into ADD's result.
    pub dns: Option<Value>,
    /// OTLP/gRPC collector (`http://host:4317`) the plugin sends its span
    /// to; `None` sends nothing.
    pub otlp_endpoint: Option<String>,
}

impl NetConf {
    /// The bound on one call to datapath-svc, connection included.
    pub fn timeout_for(&self, command: Command) -> Duration {
        let configured = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        match command {
            Command::Del | Command::Status => configured.min(SHORT_TIMEOUT),
            _ => configured,
        }
    }
}

/// Parses the config. See the module docs for which failure gets which code.
pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(code::DECODE_FAILURE, "error decoding network config")
            .with_details(e.to_string())
    })?;
    let Value::Object(obj) = value else {
        return Err(
            CniError::new(code::DECODE_FAILURE, "error decoding network config")
                .with_details("the config must be a JSON object"),
        );
    };

    let raw_version = match obj.get("cniVersion") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(
                CniError::new(code::DECODE_FAILURE, "error decoding network config")
                    .with_details(format!("cniVersion must be a string, got {other}")),
            );
        }
    };

    let name = match obj.get("name") {
        None | Some(Value::Null) => return Err(CniError::config("missing network name")),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(CniError::config("missing network name"));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(CniError::config("name must be a string")),
    };
    if !is_valid_name(&name) {
        return Err(CniError::config("invalid characters found in network name").with_details(name));
    }

    let cni_version = parse_version(raw_version.as_deref())?;
    refuse_unknown_keys(&obj)?;

    let socket_path =
        optional_path(&obj, "socketPath")?.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
    let del_queue_dir =
        optional_path(&obj, "delQueueDir")?.unwrap_or_else(|| PathBuf::from(DEFAULT_DEL_QUEUE_DIR));
    let log_file = optional_path(&obj, "logFile")?;
    let log_level = match optional_str(&obj, "logLevel")? {
        None => LogLevel::Info,
        Some(s) => s.parse().map_err(|()| {
            CniError::config("invalid logLevel")
                .with_details(format!("{s:?}; use error, warn, info, debug or trace"))
        })?,
    };

    let otlp_endpoint = match optional_str(&obj, "otlpEndpoint")? {
        None => None,
        Some(s) if s.starts_with("http://") || s.starts_with("https://") => Some(s.to_string()),
        Some(s) => {
            return Err(CniError::config("invalid otlpEndpoint")
                .with_details(format!("{s:?} is not a URL such as http://127.0.0.1:4317")));
        }
    };

    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            _ => {
                return Err(CniError::config("invalid mtu")
                    .with_details(format!("{v} is not an integer from 68 to 65535")));
            }
        },
    };

    let timeout =
        match obj.get("timeoutSeconds") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(s) if s > 0.0 && s <= MAX_TIMEOUT_SECONDS => Some(Duration::from_secs_f64(s)),
                _ => {
                    return Err(CniError::config("invalid timeoutSeconds").with_details(format!(
                    "{v} is not a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS}"
                )));
                }
            },
        };

    if let Some(args) = obj.get("args")
        && !args.is_object()
        && !args.is_null()
    {
        return Err(CniError::config("args must be an object"));
    }

    let port_mappings = match obj.get("runtimeConfig") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(rc)) => match rc.get("portMappings") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, m)| parse_port_mapping(i, m))
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(CniError::config(
                    "runtimeConfig.portMappings must be a list",
                ));
            }
        },
        Some(_) => return Err(CniError::config("runtimeConfig must be an object")),
    };

    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(CniError::config("prevResult must be an object")),
    };

    let dns = match obj.get("dns") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(CniError::config("dns must be an object")),
    };

    // libcni sends both names: the spec's text and its example disagreed.
    let valid_attachments = match obj
        .get("cni.dev/valid-attachments")
        .or_else(|| obj.get("cni.dev/attachments"))
    {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(
            list.iter()
                .enumerate()
                .map(|(i, a)| parse_attachment(i, a))
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(CniError::config("cni.dev/valid-attachments must be a list")),
    };

    Ok(NetConf {
        cni_version,
        name,
        socket_path,
        mtu,
        log_file,
        log_level,
        timeout,
        del_queue_dir,
        port_mappings,
        prev_result,
        valid_attachments,
        dns,
        otlp_endpoint,
    })
}

/// The version to answer errors in: the config's, when it is one this
/// plugin speaks, else the newest.
pub fn version_for_errors(bytes: &[u8]) -> SpecVersion {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse().ok())
        .unwrap_or(SpecVersion::LATEST)
}

fn parse_version(raw: Option<&str>) -> Result<SpecVersion, CniError> {
    // An unset version means 0.1.0, which predates what this plugin speaks.
    let shown = raw.filter(|s| !s.is_empty()).unwrap_or("0.1.0");
    shown.parse().map_err(|()| {
        let supported: Vec<_> = SpecVersion::ALL.iter().map(|v| v.as_str()).collect();
        CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
            format!("config is {shown:?}, plugin supports {supported:?}"),
        )
    })
}

fn optional_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(CniError::config(format!("{key} must be a string"))),
    }
}

fn optional_path(obj: &Map<String, Value>, key: &str) -> Result<Option<PathBuf>, CniError> {
    match optional_str(obj, key)? {
        None => Ok(None),
        Some(s) if s.starts_with('/') && !s.contains('\0') => Ok(Some(PathBuf::from(s))),
        Some(s) => {
            Err(CniError::config(format!("{key} must be an absolute path"))
                .with_details(s.to_string()))
        }
    }
}

/// A field of a runtime-supplied object, its name matched regardless of
/// case, as Go's encoding/json (and so every Go plugin) matches it:
/// containerd 1.6 and 1.7 send portMappings as `HostPort`, `ContainerPort`,
/// `Protocol` and `HostIP` (go-cni's struct has no JSON tags).
fn field_ci<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn parse_port_mapping(index: usize, value: &Value) -> Result<PortMapping, CniError> {
    let field = |name: &str| format!("runtimeConfig.portMappings[{index}].{name}");
    let Value::Object(m) = value else {
        return Err(CniError::config(format!(
            "runtimeConfig.portMappings[{index}] must be an object"
        )));
    };
    let port = |name: &str| -> Result<u16, CniError> {
        field_ci(m, name)
            .and_then(Value::as_u64)
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| {
                CniError::config(format!("{} must be a port from 1 to 65535", field(name)))
            })
    };
    let host_port = port("hostPort")?;
    let container_port = port("containerPort")?;
    let protocol = match field_ci(m, "protocol") {
        None | Some(Value::Null) => "tcp".to_string(),
        Some(Value::String(p)) if p.is_empty() => "tcp".to_string(),
        Some(Value::String(p)) => match p.to_ascii_lowercase().as_str() {
            proto @ ("tcp" | "udp") => proto.to_string(),
            _ => {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!(
                        "{} {p:?} is not supported; use tcp or udp",
                        field("protocol")
                    ),
                ));
            }
        },
        Some(_) => {
            return Err(CniError::config(format!(
                "{} must be a string",
                field("protocol")
            )));
        }
    };
    let host_ip = match field_ci(m, "hostIP") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(ip)) if ip.is_empty() => String::new(),
        Some(Value::String(ip)) => {
            ip.parse::<std::net::IpAddr>().map_err(|_| {
                CniError::config(format!("{} {ip:?} is not an IP address", field("hostIP")))
            })?;
            ip.clone()
        }
        Some(_) => {
            return Err(CniError::config(format!(
                "{} must be a string",
                field("hostIP")
            )));
        }
    };
    Ok(PortMapping {
        host_port,
        container_port,
        protocol,
        host_ip,
    })
}

fn parse_attachment(index: usize, value: &Value) -> Result<Attachment, CniError> {
    let get = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match (get("containerID"), get("ifname")) {
        (Some(container_id), Some(ifname)) => Ok(Attachment {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        }),
        _ => Err(CniError::config(format!(
            "cni.dev/valid-attachments[{index}] needs string containerID and ifname"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn parse_json(v: Value) -> Result<NetConf, CniError> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let conf = parse_json(json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni"}))
            .expect("valid");
        assert_eq!(conf.cni_version, SpecVersion::V1_0_0);
        assert_eq!(conf.name, "weft");
        assert_eq!(conf.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(conf.del_queue_dir, PathBuf::from(DEFAULT_DEL_QUEUE_DIR));
        assert_eq!(conf.mtu, None);
        assert_eq!(conf.log_level, LogLevel::Info);
        assert_eq!(conf.otlp_endpoint, None);
        assert!(conf.port_mappings.is_empty());
        assert_eq!(conf.timeout_for(Command::Add), DEFAULT_TIMEOUT);
        assert_eq!(conf.timeout_for(Command::Del), SHORT_TIMEOUT);
    }

    /// The form containerd 1.6 and 1.7 send (go-cni's untagged struct):
    /// found on the real cluster, where every hostPort pod failed its ADD.
    #[test]
    fn port_mappings_with_go_field_names_are_read() {
        let conf = parse_json(json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "runtimeConfig": {"portMappings": [
                {"HostPort": 54323, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "127.0.0.1"}
            ]}
        }))
        .expect("valid");
        let m = &conf.port_mappings[0];
        assert_eq!((m.host_port, m.container_port), (54323, 8080));
        assert_eq!(
            (m.protocol.as_str(), m.host_ip.as_str()),
            ("tcp", "127.0.0.1")
        );
    }

    #[test]
    fn every_weft_field_is_read() {
        let conf = parse_json(json!({
            "cniVersion": "1.1.0",
            "name": "weft-net",
            "type": "weft-cni",
            "socketPath": "/tmp/x/cni.sock",
            "delQueueDir": "/tmp/x/q",
            "mtu": 1450,
            "logFile": "/var/log/weft-cni.log",
            "logLevel": "DEBUG",
            "otlpEndpoint": "http://127.0.0.1:4317",
            "timeoutSeconds": 2.5,
            "args": {"labels": {"a": "b"}},
            "dns": {"nameservers": ["10.96.0.10"]},
            "runtimeConfig": {"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
            ]},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]
        }))
        .expect("valid");
        assert_eq!(conf.socket_path, PathBuf::from("/tmp/x/cni.sock"));
        assert_eq!(conf.del_queue_dir, PathBuf::from("/tmp/x/q"));
        assert_eq!(conf.mtu, Some(1450));
        assert_eq!(conf.log_level, LogLevel::Debug);
        assert_eq!(conf.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(conf.timeout_for(Command::Add), Duration::from_millis(2500));
        assert_eq!(conf.timeout_for(Command::Del), Duration::from_millis(2500));
        assert_eq!(
            conf.port_mappings,
            vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new()
                },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: "udp".into(),
                    host_ip: "127.0.0.1".into()
                },
            ]
        );
        assert_eq!(
            conf.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
        assert!(conf.dns.is_some());
    }

    #[test]
    fn long_timeout_is_capped_for_del_and_status() {
        let conf = parse_json(json!({"cniVersion": "1.1.0", "name": "n", "timeoutSeconds": 60}))
            .expect("valid");
        assert_eq!(conf.timeout_for(Command::Add), Duration::from_secs(60));
        assert_eq!(conf.timeout_for(Command::Gc), Duration::from_secs(60));
        assert_eq!(conf.timeout_for(Command::Del), SHORT_TIMEOUT);
        assert_eq!(conf.timeout_for(Command::Status), SHORT_TIMEOUT);
    }

    #[test]
    fn legacy_attachments_key_is_accepted() {
        let conf = parse_json(json!({"cniVersion": "1.1.0", "name": "n",
            "cni.dev/attachments": [{"containerID": "c", "ifname": "eth0"}]}))
        .expect("valid");
        assert_eq!(conf.valid_attachments.map(|a| a.len()), Some(1));
    }

    #[test]
    fn malformed_json_is_a_decode_failure() {
        for bad in [
            &b"{"[..],
            b"",
            b"not json",
            b"[1,2]",
            b"\"str\"",
            b"{\"cniVersion\": 1, \"name\": \"x\"}",
        ] {
            assert_eq!(
                parse(bad).expect_err("must be refused").code,
                code::DECODE_FAILURE,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn unknown_or_missing_version_is_incompatible() {
        for conf in [
            json!({"cniVersion": "9.9.9", "name": "n"}),
            json!({"cniVersion": "0.2.0", "name": "n"}),
            json!({"cniVersion": "1.0", "name": "n"}),
            json!({"name": "n"}),
        ] {
            let err = parse_json(conf.clone()).expect_err("must be refused");
            assert_eq!(err.code, code::INCOMPATIBLE_VERSION, "{conf}");
            assert!(err.details.contains("1.1.0"), "{}", err.details);
        }
    }

    /// A misspelt key of weft's is refused naming it, its value and the
    /// key meant, with code 2, instead of quietly using the default.
    #[test]
    fn unknown_keys_are_refused_with_a_suggestion() {
        let err = parse_json(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "weft-cni",
            "socketpath": "/run/other/cni.sock",
        }))
        .expect_err("misspelt key");
        assert_eq!(err.code, code::UNSUPPORTED_FIELD);
        assert!(err.msg.contains("\"socketpath\""), "{}", err.msg);
        assert!(err.msg.contains("/run/other/cni.sock"), "{}", err.msg);
        assert!(
            err.msg.contains("did you mean \"socketPath\""),
            "{}",
            err.msg
        );
        let err = parse_json(json!({"cniVersion": "1.0.0", "name": "n", "colour": "blue"}))
            .expect_err("unrelated key");
        assert_eq!(err.code, code::UNSUPPORTED_FIELD);
        assert!(!err.msg.contains("did you mean"), "{}", err.msg);
    }

    /// What libcni and the spec put into a plugin's config is accepted,
    /// with every key of weft's own.
    #[test]
    fn spec_and_runtime_keys_are_accepted() {
        parse_json(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "weft-cni",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": []},
            "args": {}, "prevResult": {}, "dns": {}, "ipMasq": false, "ipam": {},
            "cni.dev/valid-attachments": [], "cni.dev/attachments": [],
            "cni.dev/some-future-key": 1,
            "socketPath": "/run/weft/cni.sock", "delQueueDir": "/run/weft/q",
            "timeoutSeconds": 5, "logFile": "/var/log/weft-cni.log", "logLevel": "debug",
            "otlpEndpoint": "http://127.0.0.1:4317", "mtu": 1450,
        }))
        .expect("every known key");
    }

    #[test]
    fn every_supported_version_parses() {
        for v in SpecVersion::ALL {
            let conf =
                parse_json(json!({"cniVersion": v.as_str(), "name": "n"})).expect("supported");
            assert_eq!(conf.cni_version, v);
        }
    }

    #[test]
    fn invalid_fields_are_invalid_config() {
        let base = json!({"cniVersion": "1.0.0", "name": "n"});
        let cases = [
            json!({"name": null}),
            json!({"name": ""}),
            json!({"name": 5}),
            json!({"name": "-bad"}),
            json!({"socketPath": "relative.sock"}),
            json!({"socketPath": 3}),
            json!({"delQueueDir": "q"}),
            json!({"logFile": "log"}),
            json!({"logLevel": "loud"}),
            json!({"otlpEndpoint": "collector:4317"}),
            json!({"otlpEndpoint": 4317}),
            json!({"mtu": 0}),
            json!({"mtu": 70000}),
            json!({"mtu": "1500"}),
            json!({"timeoutSeconds": 0}),
            json!({"timeoutSeconds": -1}),
            json!({"timeoutSeconds": 301}),
            json!({"timeoutSeconds": "10"}),
            json!({"args": 1}),
            json!({"runtimeConfig": []}),
            json!({"runtimeConfig": {"portMappings": {}}}),
            json!({"runtimeConfig": {"portMappings": [1]}}),
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}),
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 80}]}}),
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 70000}]}}),
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]}}),
            json!({"prevResult": []}),
            json!({"dns": "x"}),
            json!({"cni.dev/valid-attachments": {}}),
            json!({"cni.dev/valid-attachments": [{"containerID": "c"}]}),
        ];
        for case in cases {
            let mut conf = base.clone();
            for (k, v) in case.as_object().expect("object") {
                conf[k] = v.clone();
            }
            let err = parse_json(conf.clone()).expect_err("must be refused");
            assert_eq!(err.code, code::INVALID_CONFIG, "{conf}: {err:?}");
        }
    }

    #[test]
    fn sctp_port_mapping_is_unsupported() {
        let err = parse_json(json!({"cniVersion": "1.0.0", "name": "n",
            "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]}}))
        .expect_err("must be refused");
        assert_eq!(err.code, code::UNSUPPORTED_FIELD);
    }

    #[test]
    fn error_version_follows_the_config_when_it_can() {
        assert_eq!(
            version_for_errors(br#"{"cniVersion":"0.4.0"}"#),
            SpecVersion::V0_4_0
        );
        assert_eq!(
            version_for_errors(br#"{"cniVersion":"9.9.9"}"#),
            SpecVersion::LATEST
        );
        assert_eq!(version_for_errors(b"garbage"), SpecVersion::LATEST);
    }

    #[test]
    fn command_minimum_versions() {
        assert_eq!(
            SpecVersion::minimum_for(Command::Check),
            SpecVersion::V0_4_0
        );
        assert_eq!(SpecVersion::minimum_for(Command::Gc), SpecVersion::V1_1_0);
        assert!(SpecVersion::V0_3_1 < SpecVersion::V0_4_0);
        assert!(SpecVersion::V1_0_0.is_v1() && !SpecVersion::V0_4_0.is_v1());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = parse(&bytes) {
                prop_assert!([code::DECODE_FAILURE, code::INVALID_CONFIG, code::INCOMPATIBLE_VERSION].contains(&e.code), "{e:?}");
            }
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            version in prop_oneof![Just(json!("1.0.0")), Just(json!("0.4.0")), Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), ".{0,6}".prop_map(|s| json!(s))],
            name in prop_oneof![Just(json!("weft")), ".{0,6}".prop_map(|s| json!(s)), any::<bool>().prop_map(|b| json!(b))],
            mtu in prop_oneof![Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), any::<f64>().prop_map(|n| json!(n))],
            timeout in prop_oneof![Just(json!(null)), any::<f64>().prop_map(|n| json!(n)), any::<i64>().prop_map(|n| json!(n))],
            host_port in any::<i64>(),
            proto in ".{0,4}",
        ) {
            let conf = json!({
                "cniVersion": version, "name": name, "mtu": mtu, "timeoutSeconds": timeout,
                "runtimeConfig": {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": proto}]},
            });
            if let Err(e) = parse_json(conf) {
                prop_assert!([code::DECODE_FAILURE, code::INVALID_CONFIG, code::INCOMPATIBLE_VERSION, code::UNSUPPORTED_FIELD].contains(&e.code), "{e:?}");
            }
        }
    }
}

//! The CNI environment: `CNI_COMMAND` and the variables that go with it.
//!
//! Which variables a command needs follows the spec (and what the reference
//! plugins' `skel` enforces): ADD and CHECK need the container id, the
//! network namespace and the interface name; DEL tolerates a missing
//! namespace, since the runtime may call it after the namespace is gone;
//! VERSION, STATUS and GC need none of them. A runtime that sets a variable
//! to the empty string has not set it.
//!
//! `CNI_PATH` is accepted but never required: weft delegates to no other
//! plugin, so it has nothing to look up there.

use std::{fmt, str::FromStr};

use crate::error::CniError;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A CNI verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// Whether the command acts on one attachment (container + interface).
    fn is_attachment(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => return Err(CniError::env(format!("unknown CNI_COMMAND: {other:?}"))),
        })
    }
}

/// The Kubernetes pod identity and flags carried in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    /// `IgnoreUnknown=1`: the runtime passes keys meant for other plugins.
    pub ignore_unknown: bool,
}

/// Parses `CNI_ARGS` (`K=V;K=V`) the way the reference plugins do: every
/// pair needs a non-empty key and an `=`; a key this plugin does not know is
/// an error unless `IgnoreUnknown` is true anywhere in the string; a later
/// duplicate wins. Two leniencies: empty segments (`A=B;;C=D`, a trailing
/// `;`) are skipped, and a value may itself contain `=`.
pub fn parse_args(raw: &str) -> Result<CniArgs, CniError> {
    let mut pairs = Vec::new();
    for segment in raw.split(';') {
        if segment.is_empty() {
            continue;
        }
        let Some((key, value)) = segment.split_once('=') else {
            return Err(CniError::env("CNI_ARGS: invalid pair")
                .with_details(format!("{segment:?} has no '='")));
        };
        if key.is_empty() {
            return Err(CniError::env("CNI_ARGS: invalid pair")
                .with_details(format!("{segment:?} has an empty key")));
        }
        pairs.push((key, value));
    }

    let mut args = CniArgs::default();
    for (key, value) in &pairs {
        if *key == "IgnoreUnknown" {
            args.ignore_unknown = parse_bool(value).ok_or_else(|| {
                CniError::env("CNI_ARGS: invalid IgnoreUnknown value")
                    .with_details(format!("{value:?} is not a boolean"))
            })?;
        }
    }
    let mut unknown = Vec::new();
    for (key, value) in pairs {
        let slot = match key {
            "IgnoreUnknown" => continue,
            "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
            "K8S_POD_NAME" => &mut args.pod_name,
            "K8S_POD_UID" => &mut args.pod_uid,
            "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
            other => {
                unknown.push(other);
                continue;
            }
        };
        *slot = (!value.is_empty()).then(|| value.to_string());
    }
    if !unknown.is_empty() && !args.ignore_unknown {
        return Err(
            CniError::env("CNI_ARGS: unknown args").with_details(format!(
                "unknown keys {unknown:?}; set IgnoreUnknown=1 to allow them"
            )),
        );
    }
    Ok(args)
}

/// The boolean spellings the reference plugins accept for `IgnoreUnknown`.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Everything the runtime said through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Empty for STATUS, GC and VERSION.
    pub container_id: String,
    /// Empty when not given (DEL after the namespace is gone, STATUS, GC).
    pub netns: String,
    /// Empty for STATUS, GC and VERSION.
    pub ifname: String,
    pub args: CniArgs,
    pub path: String,
    /// A W3C trace context to hand on to datapath-svc, from `TRACEPARENT`.
    pub traceparent: Option<String>,
}

impl CniEnv {
    /// Reads and validates the environment through `lookup` (so tests need
    /// not touch the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let Some(raw_command) = get("CNI_COMMAND") else {
            return Err(CniError::env(
                "required env variables [CNI_COMMAND] missing",
            ));
        };
        let command: Command = raw_command.parse()?;

        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        let netns = get("CNI_NETNS").unwrap_or_default();
        let ifname = get("CNI_IFNAME").unwrap_or_default();

        let mut missing = Vec::new();
        if command.is_attachment() {
            if container_id.is_empty() {
                missing.push("CNI_CONTAINERID");
            }
            if netns.is_empty() && command != Command::Del {
                missing.push("CNI_NETNS");
            }
            if ifname.is_empty() {
                missing.push("CNI_IFNAME");
            }
        }
        if !missing.is_empty() {
            return Err(CniError::env(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }

        if command.is_attachment() {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
            if !netns.is_empty() && !netns.starts_with('/') {
                return Err(CniError::env("CNI_NETNS must be an absolute path")
                    .with_details(format!("got {netns:?}")));
            }
        }

        let args = match get("CNI_ARGS") {
            Some(raw) => parse_args(&raw)?,
            None => CniArgs::default(),
        };

        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path: get("CNI_PATH").unwrap_or_default(),
            traceparent: get("TRACEPARENT"),
        })
    }
}

/// A container id starts with a letter or digit and continues with
/// letters, digits, `_`, `.` or `-` (the reference plugins' rule).
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_valid_name(id) {
        Ok(())
    } else {
        Err(CniError::env("invalid characters in containerID").with_details(id.to_string()))
    }
}

/// The shared rule for container ids and network names.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The kernel's rules for an interface name: 1 to 15 bytes, not `.` or
/// `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::env("interface name is empty"));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(
            CniError::env("interface name is too long").with_details(format!(
                "{name:?} is {} bytes; the limit is {MAX_IFNAME_LEN}",
                name.len()
            )),
        );
    }
    if name == "." || name == ".." {
        return Err(CniError::env("interface name is . or .."));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(
            CniError::env("interface name contains / or : or whitespace characters")
                .with_details(format!("{name:?}")),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::error::code;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, &'static str)> {
        let mut vars: Vec<_> = base
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        vars.extend_from_slice(extra);
        vars
    }

    #[test]
    fn add_with_everything_parses() {
        let parsed = env(&with(
            ADD,
            &[
                ("CNI_ARGS", "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=default"),
                ("TRACEPARENT", "00-abc-def-01"),
            ],
        ))
        .expect("valid");
        assert_eq!(parsed.command, Command::Add);
        assert_eq!(parsed.container_id, "abc123");
        assert_eq!(parsed.netns, "/var/run/netns/pod");
        assert_eq!(parsed.ifname, "eth0");
        assert_eq!(parsed.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(parsed.args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(parsed.traceparent.as_deref(), Some("00-abc-def-01"));
    }

    #[test]
    fn missing_command_is_an_env_error() {
        let err = env(&[]).expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("CNI_COMMAND"));
    }

    #[test]
    fn unknown_command_is_an_env_error() {
        let err = env(&[("CNI_COMMAND", "FROB")]).expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("FROB"));
    }

    #[test]
    fn add_without_netns_names_the_variable() {
        let vars: Vec<_> = ADD
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .copied()
            .collect();
        let err = env(&vars).expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
        assert_eq!(err.msg, "required env variables [CNI_NETNS] missing");
    }

    #[test]
    fn empty_value_counts_as_missing() {
        let err = env(&with(ADD, &[("CNI_IFNAME", ""), ("CNI_CONTAINERID", "")]))
            .expect_err("must be refused");
        assert_eq!(
            err.msg,
            "required env variables [CNI_CONTAINERID,CNI_IFNAME] missing"
        );
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let vars: Vec<_> = with(ADD, &[("CNI_COMMAND", "DEL")])
            .into_iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        let parsed = env(&vars).expect("DEL without netns is fine");
        assert_eq!(parsed.command, Command::Del);
        assert!(parsed.netns.is_empty());
    }

    #[test]
    fn check_needs_netns() {
        let vars: Vec<_> = with(ADD, &[("CNI_COMMAND", "CHECK")])
            .into_iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(
            env(&vars).expect_err("must be refused").code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn status_gc_and_version_need_nothing_else() {
        for cmd in ["STATUS", "GC", "VERSION"] {
            let parsed = env(&[("CNI_COMMAND", cmd)]).expect(cmd);
            assert_eq!(parsed.command.as_str(), cmd);
        }
    }

    #[test]
    fn relative_netns_is_refused() {
        let err = env(&with(ADD, &[("CNI_NETNS", "netns/pod")])).expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
    }

    #[test]
    fn container_id_rules() {
        for good in ["a", "0abc", "abc-def_ghi.jkl", "Z9"] {
            assert!(validate_container_id(good).is_ok(), "{good}");
        }
        for bad in ["", "-abc", ".x", "_x", "a/b", "a b", "a:b", "ä"] {
            assert_eq!(
                validate_container_id(bad)
                    .expect_err("must be refused")
                    .code,
                code::INVALID_ENV,
                "{bad}"
            );
        }
        let err = env(&with(ADD, &[("CNI_CONTAINERID", "../etc")])).expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
    }

    #[test]
    fn ifname_rules() {
        for good in ["eth0", "a", "net1", "123456789012345"] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "1234567890123456",
        ] {
            assert_eq!(
                validate_ifname(bad).expect_err("must be refused").code,
                code::INVALID_ENV,
                "{bad}"
            );
        }
    }

    #[test]
    fn args_pick_up_the_pod_identity() {
        let args = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=abc;FOO=bar",
        )
        .expect("valid");
        assert_eq!(
            args,
            CniArgs {
                pod_namespace: Some("kube-system".into()),
                pod_name: Some("coredns-1".into()),
                pod_uid: Some("u-1".into()),
                infra_container_id: Some("abc".into()),
                ignore_unknown: true,
            }
        );
    }

    #[test]
    fn ignore_unknown_applies_wherever_it_appears() {
        let args = parse_args("FOO=bar;IgnoreUnknown=true").expect("IgnoreUnknown after the key");
        assert!(args.ignore_unknown);
    }

    #[test]
    fn unknown_key_without_ignore_unknown_is_refused() {
        let err = parse_args("K8S_POD_NAME=x;FOO=bar").expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.details.contains("FOO"));
        let err = parse_args("IgnoreUnknown=0;FOO=bar").expect_err("must be refused");
        assert_eq!(err.code, code::INVALID_ENV);
    }

    #[test]
    fn malformed_pairs_are_refused() {
        for bad in ["K8S_POD_NAME", "=x", "IgnoreUnknown=maybe"] {
            assert_eq!(
                parse_args(bad).expect_err("must be refused").code,
                code::INVALID_ENV,
                "{bad}"
            );
        }
    }

    #[test]
    fn lenient_about_empty_segments_and_equals_in_values() {
        let args = parse_args(";K8S_POD_NAME=a=b;;").expect("lenient");
        assert_eq!(args.pod_name.as_deref(), Some("a=b"));
        assert_eq!(parse_args("").expect("empty"), CniArgs::default());
    }

    #[test]
    fn later_duplicate_wins_and_empty_value_clears() {
        let args =
            parse_args("K8S_POD_NAME=a;K8S_POD_NAME=b;K8S_POD_UID=x;K8S_POD_UID=").expect("valid");
        assert_eq!(args.pod_name.as_deref(), Some("b"));
        assert_eq!(args.pod_uid, None);
    }

    proptest! {
        #[test]
        fn arbitrary_args_never_panic(raw in ".*") {
            match parse_args(&raw) {
                Ok(_) => {}
                Err(e) => prop_assert_eq!(e.code, code::INVALID_ENV),
            }
        }

        #[test]
        fn arbitrary_pairs_never_panic(raw in "([A-Za-z_=;]{0,8}=?[a-z0-9=]{0,6};?){0,6}") {
            if let Err(e) = parse_args(&raw) {
                prop_assert_eq!(e.code, code::INVALID_ENV);
            }
        }

        #[test]
        fn arbitrary_env_never_panics(
            cmd in "(ADD|DEL|CHECK|STATUS|GC|VERSION|.{0,5})",
            id in ".{0,20}",
            netns in ".{0,20}",
            ifname in ".{0,20}",
            args in ".{0,40}",
        ) {
            let vars = [
                ("CNI_COMMAND", cmd.as_str()),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", ifname.as_str()),
                ("CNI_ARGS", args.as_str()),
            ];
            if let Err(e) = env(&vars) {
                prop_assert_eq!(e.code, code::INVALID_ENV);
            }
        }
    }
}

//! What the plugin prints: the ADD result in the config's spec version, the
//! error object, and the VERSION answer; and the reverse, reading CHECK's
//! `prevResult` back into the gRPC message.
//!
//! The two result formats differ in small ways that runtimes check:
//! 0.3.x and 0.4.0 put `"version": "4"|"6"` on every IP; 1.0.0 dropped it;
//! 1.1.0 added `mtu` (among others) to interfaces.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;
use weft_proto::datapath::v1::{CniInterface, CniIp, CniResult, CniRoute};

use crate::{
    config::SpecVersion,
    error::{CniError, code},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultOut<'a> {
    cni_version: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<InterfaceOut<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<IpOut<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<RouteOut<'a>>,
    dns: Value,
}

#[derive(Serialize)]
struct InterfaceOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    mac: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(skip_serializing_if = "str::is_empty")]
    sandbox: &'a str,
}

#[derive(Serialize)]
struct IpOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    gateway: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<u32>,
}

#[derive(Serialize)]
struct RouteOut<'a> {
    dst: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    gw: &'a str,
}

/// Renders ADD's result in `version`'s format. A result from datapath-svc
/// that no runtime could use (a bad address, an interface index out of
/// range) is refused here rather than passed on.
pub fn render_result(
    version: SpecVersion,
    result: &CniResult,
    dns: Option<&Value>,
) -> Result<String, CniError> {
    let invalid = |what: String| {
        CniError::new(
            code::DATAPATH_INTERNAL,
            "datapath-svc returned an invalid result",
        )
        .with_details(what)
    };
    let interfaces = result
        .interfaces
        .iter()
        .map(|i| {
            if i.name.is_empty() {
                return Err(invalid("an interface has no name".into()));
            }
            Ok(InterfaceOut {
                name: &i.name,
                mac: &i.mac,
                mtu: (version >= SpecVersion::V1_1_0 && i.mtu != 0).then_some(i.mtu),
                sandbox: &i.sandbox,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ips = result
        .ips
        .iter()
        .map(|ip| {
            let family = cidr_family(&ip.address).ok_or_else(|| {
                invalid(format!("address {:?} is not in CIDR notation", ip.address))
            })?;
            if !ip.gateway.is_empty() && ip.gateway.parse::<IpAddr>().is_err() {
                return Err(invalid(format!(
                    "gateway {:?} is not an IP address",
                    ip.gateway
                )));
            }
            if let Some(index) = ip.interface
                && index as usize >= interfaces.len()
            {
                return Err(invalid(format!(
                    "address {} names interface {index} of {}",
                    ip.address,
                    interfaces.len()
                )));
            }
            Ok(IpOut {
                version: (!version.is_v1()).then_some(family),
                address: &ip.address,
                gateway: &ip.gateway,
                interface: ip.interface,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let routes = result
        .routes
        .iter()
        .map(|r| {
            if cidr_family(&r.dst).is_none() {
                return Err(invalid(format!(
                    "route destination {:?} is not in CIDR notation",
                    r.dst
                )));
            }
            if !r.gw.is_empty() && r.gw.parse::<IpAddr>().is_err() {
                return Err(invalid(format!(
                    "route gateway {:?} is not an IP address",
                    r.gw
                )));
            }
            Ok(RouteOut {
                dst: &r.dst,
                gw: &r.gw,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = ResultOut {
        cni_version: version.as_str(),
        interfaces,
        ips,
        routes,
        dns: dns
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default())),
    };
    Ok(to_json(&out))
}

/// `"4"` or `"6"` for an address in CIDR notation, `None` if it is not one.
fn cidr_family(cidr: &str) -> Option<&'static str> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    match addr {
        IpAddr::V4(_) if prefix <= 32 => Some("4"),
        IpAddr::V6(_) if prefix <= 128 => Some("6"),
        _ => None,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorOut<'a> {
    cni_version: &'static str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

/// Renders the spec's error object.
pub fn render_error(version: SpecVersion, err: &CniError) -> String {
    to_json(&ErrorOut {
        cni_version: version.as_str(),
        code: err.code,
        msg: &err.msg,
        details: &err.details,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionOut {
    cni_version: &'static str,
    supported_versions: Vec<&'static str>,
}

/// The VERSION answer.
pub fn render_version() -> String {
    to_json(&VersionOut {
        cni_version: SpecVersion::LATEST.as_str(),
        supported_versions: SpecVersion::ALL.iter().map(|v| v.as_str()).collect(),
    })
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_else(|_| String::from("{}"))
}

/// Reads CHECK's `prevResult` (any supported version's format) into the
/// gRPC message, so datapath-svc can compare it with what it has.
pub fn parse_prev_result(value: &Value) -> Result<CniResult, CniError> {
    let bad = |what: String| CniError::config(format!("invalid prevResult: {what}"));
    let list = |key: &str| -> Result<&[Value], CniError> {
        match value.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items.as_slice()),
            Some(_) => Err(bad(format!("{key} must be a list"))),
        }
    };
    let string = |item: &Value, key: &str, path: &str| -> Result<String, CniError> {
        match item.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(format!("{path}.{key} must be a string"))),
        }
    };

    let mut result = CniResult::default();
    for (i, item) in list("interfaces")?.iter().enumerate() {
        let path = format!("interfaces[{i}]");
        let name = string(item, "name", &path)?;
        if name.is_empty() {
            return Err(bad(format!("{path}.name is missing")));
        }
        let mtu = match item.get("mtu") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .ok_or_else(|| bad(format!("{path}.mtu must be a number")))?,
        };
        result.interfaces.push(CniInterface {
            name,
            mac: string(item, "mac", &path)?,
            sandbox: string(item, "sandbox", &path)?,
            mtu,
        });
    }
    for (i, item) in list("ips")?.iter().enumerate() {
        let path = format!("ips[{i}]");
        let address = string(item, "address", &path)?;
        if cidr_family(&address).is_none() {
            return Err(bad(format!(
                "{path}.address {address:?} is not in CIDR notation"
            )));
        }
        let interface = match item.get("interface") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(format!("{path}.interface must be an index")))?,
            ),
        };
        result.ips.push(CniIp {
            address,
            gateway: string(item, "gateway", &path)?,
            interface,
        });
    }
    for (i, item) in list("routes")?.iter().enumerate() {
        let path = format!("routes[{i}]");
        result.routes.push(CniRoute {
            dst: string(item, "dst", &path)?,
            gw: string(item, "gw", &path)?,
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                CniInterface {
                    name: "lxc1234".into(),
                    mac: "aa:bb:cc:00:11:22".into(),
                    sandbox: String::new(),
                    mtu: 1500,
                },
                CniInterface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:00:11:33".into(),
                    sandbox: "/var/run/netns/p".into(),
                    mtu: 1450,
                },
            ],
            ips: vec![
                CniIp {
                    address: "10.244.1.7/32".into(),
                    gateway: "10.244.1.1".into(),
                    interface: Some(1),
                },
                CniIp {
                    address: "fd00::7/128".into(),
                    gateway: String::new(),
                    interface: Some(1),
                },
            ],
            routes: vec![CniRoute {
                dst: "0.0.0.0/0".into(),
                gw: "10.244.1.1".into(),
            }],
        }
    }

    fn render(version: SpecVersion) -> Value {
        let text = render_result(version, &sample(), None).expect("valid");
        serde_json::from_str(&text).expect("json")
    }

    #[test]
    fn v1_result_has_no_ip_version() {
        let out = render(SpecVersion::V1_0_0);
        assert_eq!(
            out,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "lxc1234", "mac": "aa:bb:cc:00:11:22"},
                    {"name": "eth0", "mac": "aa:bb:cc:00:11:33", "sandbox": "/var/run/netns/p"}
                ],
                "ips": [
                    {"address": "10.244.1.7/32", "gateway": "10.244.1.1", "interface": 1},
                    {"address": "fd00::7/128", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn v1_1_result_carries_interface_mtu() {
        let out = render(SpecVersion::V1_1_0);
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["interfaces"][1]["mtu"], 1450);
        assert!(out["ips"][0].get("version").is_none());
    }

    #[test]
    fn legacy_results_have_ip_version() {
        for v in [
            SpecVersion::V0_3_0,
            SpecVersion::V0_3_1,
            SpecVersion::V0_4_0,
        ] {
            let out = render(v);
            assert_eq!(out["cniVersion"], v.as_str());
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][1]["version"], "6");
            assert!(out["interfaces"][1].get("mtu").is_none());
        }
    }

    #[test]
    fn dns_from_the_config_is_echoed() {
        let dns = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
        let text = render_result(SpecVersion::V1_0_0, &sample(), Some(&dns)).expect("valid");
        let out: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(out["dns"], dns);
    }

    #[test]
    fn invalid_results_are_refused() {
        let mut bad_addr = sample();
        bad_addr.ips[0].address = "10.244.1.7".into();
        let mut bad_index = sample();
        bad_index.ips[0].interface = Some(2);
        let mut bad_gw = sample();
        bad_gw.ips[0].gateway = "gw".into();
        let mut bad_route = sample();
        bad_route.routes[0].dst = "default".into();
        let mut no_name = sample();
        no_name.interfaces[0].name.clear();
        for r in [bad_addr, bad_index, bad_gw, bad_route, no_name] {
            let err = render_result(SpecVersion::V1_0_0, &r, None).expect_err("must be refused");
            assert_eq!(err.code, code::DATAPATH_INTERNAL);
        }
    }

    #[test]
    fn error_object_matches_the_spec() {
        let err = CniError::new(7, "Invalid Configuration").with_details("too small");
        let out: Value =
            serde_json::from_str(&render_error(SpecVersion::V1_1_0, &err)).expect("json");
        assert_eq!(
            out,
            json!({"cniVersion": "1.1.0", "code": 7, "msg": "Invalid Configuration", "details": "too small"})
        );
        let out: Value = serde_json::from_str(&render_error(
            SpecVersion::V0_4_0,
            &CniError::new(11, "later"),
        ))
        .expect("json");
        assert_eq!(
            out,
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "later"})
        );
    }

    #[test]
    fn version_answer_lists_everything() {
        let out: Value = serde_json::from_str(&render_version()).expect("json");
        assert_eq!(
            out,
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[test]
    fn prev_result_round_trips_in_both_formats() {
        for v in [SpecVersion::V0_4_0, SpecVersion::V1_1_0] {
            let text = render_result(v, &sample(), None).expect("valid");
            let parsed =
                parse_prev_result(&serde_json::from_str(&text).expect("json")).expect("valid");
            let mut expected = sample();
            if v < SpecVersion::V1_1_0 {
                for i in &mut expected.interfaces {
                    i.mtu = 0;
                }
            }
            assert_eq!(parsed, expected, "{v}");
        }
    }

    #[test]
    fn bad_prev_results_are_invalid_config() {
        for bad in [
            json!({"ips": {}}),
            json!({"ips": [{"address": "nope"}]}),
            json!({"ips": [{"address": "10.0.0.1/32", "interface": -1}]}),
            json!({"interfaces": [{"mac": "x"}]}),
            json!({"interfaces": [{"name": 3}]}),
            json!({"routes": [{"dst": 1}]}),
        ] {
            assert_eq!(
                parse_prev_result(&bad).expect_err("must be refused").code,
                code::INVALID_CONFIG,
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn rendering_arbitrary_results_never_panics(
            addrs in proptest::collection::vec(".{0,20}", 0..4),
            index in proptest::option::of(0u32..4),
        ) {
            let result = CniResult {
                interfaces: vec![CniInterface { name: "eth0".into(), ..Default::default() }],
                ips: addrs.iter().map(|a| CniIp { address: a.clone(), gateway: String::new(), interface: index }).collect(),
                routes: vec![],
            };
            for v in SpecVersion::ALL {
                match render_result(v, &result, None) {
                    Ok(text) => { serde_json::from_str::<Value>(&text).map_err(|e| TestCaseError::fail(e.to_string()))?; }
                    Err(e) => prop_assert_eq!(e.code, code::DATAPATH_INTERNAL),
                }
            }
        }
    }
}

//! Kubernetes objects (k8s-openapi types) → weft's proto types.
//!
//! Every subscriber relies on what comes out of here being valid: an IP is an
//! IP, a port fits in 16 bits, a CIDR parses. So conversion validates, and
//! applies the defaults the API server would have applied, so that the lab's
//! hand-written manifests and objects read from a real cluster look the same
//! downstream. An object that fails validation is refused whole with a
//! [`ConvertError`] naming the offending field.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};
use weft_common::watch::FORWARDED_ANNOTATIONS;
use weft_proto::watcher::v1::{
    self as pb, Protocol, ServiceType, SessionAffinity, TrafficPolicy, resource,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// Kubernetes' upper bound for the ClientIP affinity timeout (one day).
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// Why an object was refused, as a short stable word for the
/// `weft_watcher_invalid_objects_total{reason}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The document is not an object of the kind it claims (wrong field types).
    Decode,
    /// A required field is missing or empty.
    Missing,
    /// A port number is out of range.
    Port,
    /// An IP address does not parse.
    Ip,
    /// A CIDR does not parse.
    Cidr,
    /// A value outside the set Kubernetes allows (service type, protocol, ...).
    Value,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Decode => "decode",
            Reason::Missing => "missing_field",
            Reason::Port => "invalid_port",
            Reason::Ip => "invalid_ip",
            Reason::Cidr => "invalid_cidr",
            Reason::Value => "invalid_value",
        }
    }
}

/// An object Kubernetes would not have accepted, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    /// The JSON path of the field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
    pub reason: Reason,
}

impl ConvertError {
    pub fn new(field: impl Into<String>, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            reason,
        }
    }

    fn missing(field: impl Into<String>) -> Self {
        Self::new(field, Reason::Missing, "is required")
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

/// Whether an object of this kind lives in a namespace; decides whether a
/// missing `metadata.namespace` means `default` or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Namespaced,
    Cluster,
}

fn object_meta(m: &meta::ObjectMeta, scope: Scope) -> Result<pb::ObjectMeta> {
    let name = m.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ConvertError::missing("metadata.name"));
    }
    let namespace = match scope {
        Scope::Namespaced => match m.namespace.as_deref() {
            None | Some("") => "default".to_string(),
            Some(ns) => ns.to_string(),
        },
        // The API server ignores a namespace on a cluster-scoped object.
        Scope::Cluster => String::new(),
    };
    Ok(pb::ObjectMeta {
        namespace,
        name,
        uid: m.uid.clone().unwrap_or_default(),
        labels: to_map(m.labels.as_ref()),
        annotations: forwarded(m.annotations.as_ref()),
        resource_version: m.resource_version.clone().unwrap_or_default(),
        deleting: m.deletion_timestamp.is_some(),
    })
}

/// The annotations subscribers read ([`FORWARDED_ANNOTATIONS`]); the rest
/// stay behind.
fn forwarded(m: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    m.map(|m| {
        m.iter()
            .filter(|(k, _)| FORWARDED_ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

fn to_map(m: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    m.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn ip(field: impl Into<String>, value: &str) -> Result<String> {
    value.parse::<IpAddr>().map(|a| a.to_string()).map_err(|_| {
        ConvertError::new(field, Reason::Ip, format!("{value:?} is not an IP address"))
    })
}

fn cidr(field: impl Into<String>, value: &str) -> Result<String> {
    value
        .parse::<IpNet>()
        .map(|n| n.to_string())
        .map_err(|_| ConvertError::new(field, Reason::Cidr, format!("{value:?} is not a CIDR")))
}

/// A port that must be set: 1..=65535.
fn port(field: impl Into<String>, value: i32) -> Result<u32> {
    if (1..=65535).contains(&value) {
        Ok(value as u32)
    } else {
        Err(ConvertError::new(
            field,
            Reason::Port,
            format!("{value} is out of range"),
        ))
    }
}

/// A port that may be absent (0): 0..=65535.
fn optional_port(field: impl Into<String>, value: Option<i32>) -> Result<u32> {
    match value {
        None | Some(0) => Ok(0),
        Some(v) => port(field, v),
    }
}

fn protocol(field: impl Into<String>, value: Option<&str>) -> Result<Protocol> {
    match value {
        None | Some("") | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(ConvertError::new(
            field,
            Reason::Value,
            format!("{other:?} is not one of TCP, UDP, SCTP"),
        )),
    }
}

fn traffic_policy(field: &str, value: Option<&str>) -> Result<TrafficPolicy> {
    match value {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(ConvertError::new(
            field,
            Reason::Value,
            format!("{other:?} is not one of Cluster, Local"),
        )),
    }
}

/// The Kubernetes kind name of a proto kind, for logs and metric labels.
pub fn kind_name(kind: pb::Kind) -> &'static str {
    match kind {
        pb::Kind::Unspecified => "Unknown",
        pb::Kind::Service => "Service",
        pb::Kind::EndpointSlice => "EndpointSlice",
        pb::Kind::Pod => "Pod",
        pb::Kind::Node => "Node",
        pb::Kind::Namespace => "Namespace",
        pb::Kind::NetworkPolicy => "NetworkPolicy",
    }
}

fn wrap(kind: resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

/// A v1 Service.
pub fn service(svc: &core::Service) -> Result<pb::Resource> {
    let meta = object_meta(&svc.metadata, Scope::Namespaced)?;
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let type_ = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(ConvertError::new(
                "spec.type",
                Reason::Value,
                format!("{other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"),
            ));
        }
    };

    // spec.clusterIPs is authoritative when set (dual stack); clusterIP is
    // its first element on older objects. "None" marks a headless service.
    let mut cluster_ips = Vec::new();
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            for (i, a) in ips.iter().enumerate() {
                if a == "None" {
                    cluster_ips.clear();
                    break;
                }
                cluster_ips.push(ip(format!("spec.clusterIPs[{i}]"), a)?);
            }
        }
        _ => match spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => {}
            Some(a) => cluster_ips.push(ip("spec.clusterIP", a)?),
        },
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let number = port(format!("spec.ports[{i}].port"), p.port)?;
        let target_port = match &p.target_port {
            None | Some(IntOrString::Int(0)) => number.to_string(),
            Some(IntOrString::String(s)) if s.is_empty() => number.to_string(),
            Some(IntOrString::Int(n)) => {
                port(format!("spec.ports[{i}].targetPort"), *n)?.to_string()
            }
            Some(IntOrString::String(s)) => s.clone(),
        };
        ports.push(pb::ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())? as i32,
            port: number,
            target_port,
            node_port: optional_port(format!("spec.ports[{i}].nodePort"), p.node_port)?,
        });
    }

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, a)| ip(format!("spec.externalIPs[{i}]"), a))
        .collect::<Result<Vec<_>>>()?;

    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // An ingress may be a hostname only; those are of no use to a datapath.
        if let Some(a) = ing.ip.as_deref().filter(|a| !a.is_empty()) {
            load_balancer_ips.push(ip(format!("status.loadBalancer.ingress[{i}].ip"), a)?);
        }
    }

    let (session_affinity, session_affinity_timeout_seconds) =
        match spec.session_affinity.as_deref() {
            None | Some("") | Some("None") => (SessionAffinity::None, 0),
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                let timeout = match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t) => t as u32,
                    Some(t) => {
                        return Err(ConvertError::new(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            Reason::Value,
                            format!("{t} is out of range (1..={MAX_AFFINITY_TIMEOUT_SECONDS})"),
                        ));
                    }
                };
                (SessionAffinity::ClientIp, timeout)
            }
            Some(other) => {
                return Err(ConvertError::new(
                    "spec.sessionAffinity",
                    Reason::Value,
                    format!("{other:?} is not one of None, ClientIP"),
                ));
            }
        };

    Ok(wrap(resource::Kind::Service(pb::Service {
        meta: Some(meta),
        r#type: type_ as i32,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        session_affinity: session_affinity as i32,
        session_affinity_timeout_seconds,
        external_traffic_policy: traffic_policy(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )? as i32,
        internal_traffic_policy: traffic_policy(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )? as i32,
        selector: to_map(spec.selector.as_ref()),
        health_check_node_port: optional_port(
            "spec.healthCheckNodePort".to_string(),
            spec.health_check_node_port,
        )?,
    })))
}

/// A discovery.k8s.io/v1 EndpointSlice.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<pb::Resource> {
    let meta = object_meta(&slice.metadata, Scope::Namespaced)?;
    let service_name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .filter(|s| !s.is_empty())
        .cloned()
        .ok_or_else(|| ConvertError::missing(format!("metadata.labels[{SERVICE_NAME_LABEL:?}]")))?;

    // Addresses are checked against the family the slice declares; FQDN
    // slices carry names, which a datapath ignores.
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        "FQDN" => None,
        "" => return Err(ConvertError::missing("addressType")),
        other => {
            return Err(ConvertError::new(
                "addressType",
                Reason::Value,
                format!("{other:?} is not one of IPv4, IPv6, FQDN"),
            ));
        }
    };

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::with_capacity(ep.addresses.len());
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match family {
                None => addresses.push(a.clone()),
                Some(v6) => {
                    let parsed = a.parse::<IpAddr>().ok().filter(|p| p.is_ipv6() == v6);
                    let Some(parsed) = parsed else {
                        return Err(ConvertError::new(
                            field,
                            Reason::Ip,
                            format!("{a:?} is not an {} address", slice.address_type),
                        ));
                    };
                    addresses.push(parsed.to_string());
                }
            }
        }
        if addresses.is_empty() {
            return Err(ConvertError::missing(format!("endpoints[{i}].addresses")));
        }
        // Kubernetes' reading of unset conditions: ready unknown → ready,
        // serving unknown → same as ready, terminating unknown → not.
        let conditions = ep.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        let target_pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let name = r.name.as_deref().filter(|n| !n.is_empty())?;
                let ns = r
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(&meta.namespace);
                Some(format!("{ns}/{name}"))
            })
            .unwrap_or_default();
        endpoints.push(pb::Endpoint {
            addresses,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone().unwrap_or_default(),
            zone: ep.zone.clone().unwrap_or_default(),
            target_pod,
        });
    }

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        ports.push(pb::EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())? as i32,
            // Unset means "all ports" and travels as 0.
            port: optional_port(format!("ports[{i}].port"), p.port)?,
        });
    }

    Ok(wrap(resource::Kind::EndpointSlice(pb::EndpointSlice {
        meta: Some(meta),
        service_name,
        address_type: slice.address_type.clone(),
        endpoints,
        ports,
    })))
}

/// A v1 Pod.
pub fn pod(pod: &core::Pod) -> Result<pb::Resource> {
    let meta = object_meta(&pod.metadata, Scope::Namespaced)?;
    let default_spec = core::PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&default_spec);
    let status = pod.status.as_ref();

    let mut pod_ips = Vec::new();
    match status.and_then(|s| s.pod_ips.as_deref()) {
        Some(ips) if !ips.is_empty() => {
            for (i, a) in ips.iter().enumerate() {
                pod_ips.push(ip(format!("status.podIPs[{i}].ip"), &a.ip)?);
            }
        }
        _ => {
            if let Some(a) = status
                .and_then(|s| s.pod_ip.as_deref())
                .filter(|a| !a.is_empty())
            {
                pod_ips.push(ip("status.podIP", a)?);
            }
        }
    }

    let mut container_ports = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.containers[{c}].ports[{i}].{f}");
            let host_ip = match p.host_ip.as_deref() {
                None | Some("") => String::new(),
                Some(a) => ip(field("hostIP"), a)?,
            };
            container_ports.push(pb::ContainerPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(field("protocol"), p.protocol.as_deref())? as i32,
                container_port: port(field("containerPort"), p.container_port)?,
                host_port: optional_port(field("hostPort"), p.host_port)?,
                host_ip,
            });
        }
    }

    Ok(wrap(resource::Kind::Pod(pb::Pod {
        meta: Some(meta),
        node_name: spec.node_name.clone().unwrap_or_default(),
        pod_ips,
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        container_ports,
    })))
}

/// A v1 Node.
pub fn node(node: &core::Node) -> Result<pb::Resource> {
    let meta = object_meta(&node.metadata, Scope::Cluster)?;
    let spec = node.spec.as_ref();
    let mut pod_cidrs = Vec::new();
    match spec.and_then(|s| s.pod_cidrs.as_deref()) {
        Some(cidrs) if !cidrs.is_empty() => {
            for (i, c) in cidrs.iter().enumerate() {
                pod_cidrs.push(cidr(format!("spec.podCIDRs[{i}]"), c)?);
            }
        }
        _ => {
            if let Some(c) = spec
                .and_then(|s| s.pod_cidr.as_deref())
                .filter(|c| !c.is_empty())
            {
                pod_cidrs.push(cidr("spec.podCIDR", c)?);
            }
        }
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| pb::NodeAddress {
            r#type: a.type_.clone(),
            address: a.address.clone(),
        })
        .collect();
    Ok(wrap(resource::Kind::Node(pb::Node {
        meta: Some(meta),
        pod_cidrs,
        addresses,
    })))
}

/// A v1 Namespace.
pub fn namespace(ns: &core::Namespace) -> Result<pb::Resource> {
    Ok(wrap(resource::Kind::Namespace(pb::Namespace {
        meta: Some(object_meta(&ns.metadata, Scope::Cluster)?),
    })))
}

fn label_selector(field: &str, s: &meta::LabelSelector) -> Result<pb::LabelSelector> {
    let mut match_expressions = Vec::new();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let values = e.values.clone().unwrap_or_default();
        let field = format!("{field}.matchExpressions[{i}]");
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(ConvertError::new(
                    format!("{field}.values"),
                    Reason::Missing,
                    format!("must be non-empty for operator {}", e.operator),
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(ConvertError::new(
                    format!("{field}.values"),
                    Reason::Value,
                    format!("must be empty for operator {}", e.operator),
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(ConvertError::new(
                    format!("{field}.operator"),
                    Reason::Value,
                    format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                ));
            }
        }
        if e.key.is_empty() {
            return Err(ConvertError::missing(format!("{field}.key")));
        }
        match_expressions.push(pb::LabelSelectorRequirement {
            key: e.key.clone(),
            operator: e.operator.clone(),
            values,
        });
    }
    Ok(pb::LabelSelector {
        match_labels: to_map(s.match_labels.as_ref()),
        match_expressions,
    })
}

fn policy_peer(field: &str, p: &networking::NetworkPolicyPeer) -> Result<pb::NetworkPolicyPeer> {
    let pod_selector = p
        .pod_selector
        .as_ref()
        .map(|s| label_selector(&format!("{field}.podSelector"), s))
        .transpose()?;
    let namespace_selector = p
        .namespace_selector
        .as_ref()
        .map(|s| label_selector(&format!("{field}.namespaceSelector"), s))
        .transpose()?;
    let ip_block = match &p.ip_block {
        None => None,
        Some(b) => {
            if pod_selector.is_some() || namespace_selector.is_some() {
                return Err(ConvertError::new(
                    field,
                    Reason::Value,
                    "ipBlock may not be combined with podSelector or namespaceSelector",
                ));
            }
            let base = cidr(format!("{field}.ipBlock.cidr"), &b.cidr)?;
            let except = b
                .except
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| cidr(format!("{field}.ipBlock.except[{i}]"), c))
                .collect::<Result<Vec<_>>>()?;
            Some(pb::IpBlock { cidr: base, except })
        }
    };
    if pod_selector.is_none() && namespace_selector.is_none() && ip_block.is_none() {
        return Err(ConvertError::new(
            field,
            Reason::Missing,
            "must set one of podSelector, namespaceSelector, ipBlock",
        ));
    }
    Ok(pb::NetworkPolicyPeer {
        pod_selector,
        namespace_selector,
        ip_block,
    })
}

fn policy_port(field: &str, p: &networking::NetworkPolicyPort) -> Result<pb::NetworkPolicyPort> {
    let protocol = protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
    let (port_text, number) = match &p.port {
        None => (String::new(), None),
        Some(IntOrString::Int(n)) => {
            let n = port(format!("{field}.port"), *n)?;
            (n.to_string(), Some(n))
        }
        Some(IntOrString::String(s)) => (s.clone(), None),
    };
    let end_port = match p.end_port {
        None => 0,
        Some(end) => {
            let Some(start) = number else {
                return Err(ConvertError::new(
                    format!("{field}.endPort"),
                    Reason::Value,
                    "may only be set with a numeric port",
                ));
            };
            let end = port(format!("{field}.endPort"), end)?;
            if end < start {
                return Err(ConvertError::new(
                    format!("{field}.endPort"),
                    Reason::Port,
                    format!("{end} is below port {start}"),
                ));
            }
            end
        }
    };
    Ok(pb::NetworkPolicyPort {
        protocol: protocol as i32,
        port: port_text,
        end_port,
    })
}

fn policy_rule(
    field: &str,
    peers_name: &str,
    peers: Option<&Vec<networking::NetworkPolicyPeer>>,
    ports: Option<&Vec<networking::NetworkPolicyPort>>,
) -> Result<pb::NetworkPolicyRule> {
    Ok(pb::NetworkPolicyRule {
        peers: peers
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| policy_peer(&format!("{field}.{peers_name}[{i}]"), p))
            .collect::<Result<_>>()?,
        ports: ports
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| policy_port(&format!("{field}.ports[{i}]"), p))
            .collect::<Result<_>>()?,
    })
}

/// A networking.k8s.io/v1 NetworkPolicy.
pub fn network_policy(np: &networking::NetworkPolicy) -> Result<pb::Resource> {
    let meta = object_meta(&np.metadata, Scope::Namespaced)?;
    let default_spec = networking::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    // A missing podSelector is the empty selector: every pod of the namespace.
    let pod_selector = label_selector(
        "spec.podSelector",
        spec.pod_selector
            .as_ref()
            .unwrap_or(&meta::LabelSelector::default()),
    )?;

    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            policy_rule(
                &format!("spec.ingress[{i}]"),
                "from",
                r.from.as_ref(),
                r.ports.as_ref(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            policy_rule(
                &format!("spec.egress[{i}]"),
                "to",
                r.to.as_ref(),
                r.ports.as_ref(),
            )
        })
        .collect::<Result<Vec<_>>>()?;

    // Kubernetes' default: the policy always governs ingress, and egress
    // only when it has egress rules.
    let policy_types = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    return Err(ConvertError::new(
                        format!("spec.policyTypes[{i}]"),
                        Reason::Value,
                        format!("{t:?} is not one of Ingress, Egress"),
                    ));
                }
            }
            types.to_vec()
        }
        _ => {
            let mut types = vec!["Ingress".to_string()];
            if !egress.is_empty() {
                types.push("Egress".to_string());
            }
            types
        }
    };

    Ok(wrap(resource::Kind::NetworkPolicy(pb::NetworkPolicy {
        meta: Some(meta),
        pod_selector: Some(pod_selector),
        policy_types,
        ingress,
        egress,
    })))
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;

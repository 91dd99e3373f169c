//! What the load-balancer maps should hold, computed from Services and
//! EndpointSlices the way kube-proxy reads them.
//!
//! Pure functions: no maps, no I/O. `sync` turns the result into map writes.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr};

use weft_proto::watcher::v1::{
    EndpointSlice, Pod, Protocol, Service, ServiceType, SessionAffinity, TrafficPolicy,
};

use crate::maps::{IPPROTO_TCP, IPPROTO_UDP, algorithm, scope, svc_flags};

/// The Service annotation that picks the backend selection algorithm; one
/// of the annotations svc-watcher forwards.
pub const ALGORITHM_ANNOTATION: &str = weft_common::watch::LB_ALGORITHM_ANNOTATION;

/// Service labels that hand a Service to another proxy, or to none: a
/// Service with either is not weft's to serve, as kube-proxy leaves it
/// (it watches only Services without them).
pub const NOT_PROXIED_LABELS: &[&str] = &[
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// How a frontend picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Algorithm {
    #[default]
    Random,
    /// Consistent hashing of the connection's tuple: every node picks the
    /// same backend for the same flow, and few flows move when backends do.
    Maglev,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Algorithm::Random),
            "maglev" => Some(Algorithm::Maglev),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Algorithm::Random => algorithm::RANDOM,
            Algorithm::Maglev => algorithm::MAGLEV,
        }
    }

    pub fn from_number(n: u8) -> Self {
        if n == algorithm::MAGLEV {
            Algorithm::Maglev
        } else {
            Algorithm::Random
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
}

/// What the frontends depend on about the node computing them.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    /// The node's own addresses: NodePort and HostPort frontends listen on
    /// each of them.
    pub addrs: Vec<Ipv4Addr>,
    pub default_algorithm: Algorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn from_proto(p: Protocol) -> Option<Self> {
        match p {
            Protocol::Tcp | Protocol::Unspecified => Some(Proto::Tcp),
            Protocol::Udp => Some(Proto::Udp),
            // The datapath handles TCP and UDP only.
            Protocol::Sctp => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// Which clients a frontend's entry serves. Every frontend has an
/// external one, the only one traffic from outside the cluster sees. The
/// external frontends of a Service with `externalTrafficPolicy: Local`
/// whose endpoints are not all on this node also get an internal one, with
/// every endpoint, for clients inside the cluster: kube-proxy (since 1.24)
/// applies the Local policy to external traffic only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Scope {
    #[default]
    External,
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::External => scope::EXTERNAL,
            Scope::Internal => scope::INTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            scope::EXTERNAL => Some(Scope::External),
            scope::INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }
}

/// What clients dial: an address, a port and a protocol; and which of the
/// frontend's entries this is (the external one sorts first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl Frontend {
    /// The address as clients dial it, whatever the scope.
    pub fn dialled(&self) -> String {
        format!("{}:{}/{}", self.addr, self.port, self.proto)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dialled())?;
        if self.scope == Scope::Internal {
            f.write_str(" (internal)")?;
        }
        Ok(())
    }
}

/// Where traffic goes: a pod address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
    HostPort,
}

impl FrontendKind {
    pub fn flags(self) -> u8 {
        match self {
            FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
            FrontendKind::NodePort => svc_flags::NODE_PORT,
            FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
            FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
            FrontendKind::HostPort => svc_flags::HOST_PORT,
        }
    }

    pub fn from_flags(flags: u8) -> Self {
        if flags & svc_flags::NODE_PORT != 0 {
            FrontendKind::NodePort
        } else if flags & svc_flags::EXTERNAL_IP != 0 {
            FrontendKind::ExternalIp
        } else if flags & svc_flags::LOAD_BALANCER != 0 {
            FrontendKind::LoadBalancer
        } else if flags & svc_flags::HOST_PORT != 0 {
            FrontendKind::HostPort
        } else {
            FrontendKind::ClusterIp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::HostPort => "HostPort",
        }
    }

    /// Whether the frontend serves traffic from outside the cluster, and so
    /// follows externalTrafficPolicy rather than internalTrafficPolicy.
    pub fn external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// One backend of a frontend and whether it may take new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub backend: Backend,
    /// Terminating backends keep their existing connections but get no new
    /// ones (unless nothing else is left, as kube-proxy does).
    pub terminating: bool,
    /// The backend runs on this node: traffic from outside needs no SNAT.
    pub local: bool,
}

/// Everything the maps hold for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name` of the Service.
    pub service: String,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<BackendSpec>,
    pub algorithm: Algorithm,
    /// ClientIP session affinity: how long a client sticks to its backend.
    pub affinity_timeout: Option<u32>,
    /// Internal clients have an entry of their own, at `Scope::Internal`
    /// (set on the external entry).
    pub internal_scope: bool,
    /// A Local traffic policy leaves this frontend none of the endpoints
    /// the Service has on other nodes: its packets are dropped, as
    /// kube-proxy drops them, rather than rejected as for a Service with
    /// no endpoints at all.
    pub endpoints_elsewhere: bool,
}

impl FrontendSpec {
    /// Whether new connections go to terminating backends, there being
    /// no ready one.
    pub fn terminating_only(&self) -> bool {
        !self.backends.is_empty() && self.backends.iter().all(|b| b.terminating)
    }

    /// The backends new connections choose from: the active ones, or when
    /// there are none, the terminating ones that still serve.
    pub fn selectable(&self) -> impl Iterator<Item = &Backend> {
        let any_active = self.backends.iter().any(|b| !b.terminating);
        self.backends
            .iter()
            .filter(move |b| b.terminating != any_active)
            .map(|b| &b.backend)
    }
}

/// The frontends of one Service on the node `node`, given the
/// EndpointSlices that belong to it.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: &NodeView,
) -> Vec<(Frontend, FrontendSpec)> {
    let Some(meta) = svc.meta.as_ref() else {
        return Vec::new();
    };
    if svc.r#type() == ServiceType::ExternalName {
        return Vec::new();
    }
    if NOT_PROXIED_LABELS
        .iter()
        .any(|l| meta.labels.contains_key(*l))
    {
        return Vec::new();
    }
    let name = format!("{}/{}", meta.namespace, meta.name);
    let algorithm = meta
        .annotations
        .get(ALGORITHM_ANNOTATION)
        .and_then(|a| Algorithm::parse(a))
        .unwrap_or(node.default_algorithm);
    // Kubernetes' default ClientIP timeout is three hours.
    let timeout = match svc.session_affinity_timeout_seconds {
        0 => 10800,
        t => t,
    };
    let affinity_timeout = (svc.session_affinity() == SessionAffinity::ClientIp).then_some(timeout);
    let addresses = frontend_addresses(svc);
    let mut out = Vec::new();
    for port in &svc.ports {
        let Some(proto) = Proto::from_proto(port.protocol()) else {
            continue;
        };
        let all = port_backends(&port.name, proto, slices.clone(), &node.name);
        let local_only: Vec<BackendSpec> = all.iter().filter(|b| b.local).copied().collect();
        let mut push = |addr: Ipv4Addr, number: u32, kind: FrontendKind| {
            let Ok(number) = u16::try_from(number) else {
                return;
            };
            if number == 0 {
                return;
            }
            let policy = if kind.external() {
                svc.external_traffic_policy()
            } else {
                svc.internal_traffic_policy()
            };
            let local = policy == TrafficPolicy::Local;
            let backends = if local {
                local_only.clone()
            } else {
                all.clone()
            };
            // Traffic from inside the cluster to an external frontend of
            // an eTP=Local Service goes to every endpoint, as kube-proxy
            // sends it to the Service's cluster chain; only where that
            // differs does it need an entry of its own.
            let internal = (local && kind.external() && backends != all).then(|| all.clone());
            let frontend = Frontend {
                addr,
                port: number,
                proto,
                scope: Scope::External,
            };
            let spec = FrontendSpec {
                service: name.clone(),
                kind,
                endpoints_elsewhere: local && backends.is_empty() && !all.is_empty(),
                backends,
                algorithm,
                affinity_timeout,
                internal_scope: internal.is_some(),
            };
            let internal_spec = internal.map(|all| FrontendSpec {
                backends: all,
                internal_scope: false,
                endpoints_elsewhere: false,
                ..spec.clone()
            });
            out.push((frontend, spec));
            if let Some(internal_spec) = internal_spec {
                let internal = Frontend {
                    scope: Scope::Internal,
                    ..frontend
                };
                out.push((internal, internal_spec));
            }
        };
        for (addr, kind) in &addresses {
            push(*addr, port.port, *kind);
        }
        let has_node_ports = matches!(
            svc.r#type(),
            ServiceType::NodePort | ServiceType::LoadBalancer
        );
        if has_node_ports && port.node_port != 0 {
            for addr in &node.addrs {
                push(*addr, port.node_port, FrontendKind::NodePort);
            }
        }
    }
    out
}

/// The health check a node serves for a Service: LoadBalancer Services
/// with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, with
/// the count of this node's ready endpoints (distinct addresses; serving
/// but terminating ones do not count, so the node is drained).
pub fn health_check<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeView,
) -> Option<crate::health::HealthCheck> {
    let meta = svc.meta.as_ref()?;
    let port = u16::try_from(svc.health_check_node_port)
        .ok()
        .filter(|p| *p != 0)?;
    if svc.r#type() != ServiceType::LoadBalancer
        || svc.external_traffic_policy() != TrafficPolicy::Local
        || NOT_PROXIED_LABELS
            .iter()
            .any(|l| meta.labels.contains_key(*l))
    {
        return None;
    }
    let local: BTreeSet<&str> = slices
        .into_iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|ep| ep.ready && ep.node_name == node.name)
        .flat_map(|ep| ep.addresses.iter().map(String::as_str))
        .collect();
    Some(crate::health::HealthCheck {
        port,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        local_endpoints: local.len(),
    })
}

/// The HostPort frontends of a pod on this node: each container port with a
/// hostPort, on the given host address or every node address. `extra` adds
/// the runtime's portMappings (from CNI).
pub fn hostport_frontends(
    pod_name: &str,
    pod_ip: Ipv4Addr,
    ports: impl IntoIterator<Item = (Proto, u16, u16, Option<Ipv4Addr>)>,
    node: &NodeView,
) -> Vec<(Frontend, FrontendSpec)> {
    let mut out = Vec::new();
    for (proto, host_port, container_port, host_ip) in ports {
        if host_port == 0 || container_port == 0 {
            continue;
        }
        let backends = vec![BackendSpec {
            backend: Backend {
                addr: pod_ip,
                port: container_port,
                proto,
            },
            terminating: false,
            local: true,
        }];
        let addrs: Vec<Ipv4Addr> = match host_ip {
            Some(ip) if !ip.is_unspecified() => vec![ip],
            _ => node.addrs.clone(),
        };
        for addr in addrs {
            out.push((
                Frontend {
                    addr,
                    port: host_port,
                    proto,
                    scope: Scope::External,
                },
                FrontendSpec {
                    service: format!("hostport:{pod_name}"),
                    kind: FrontendKind::HostPort,
                    backends: backends.clone(),
                    algorithm: Algorithm::Random,
                    affinity_timeout: None,
                    internal_scope: false,
                    endpoints_elsewhere: false,
                },
            ));
        }
    }
    out.sort_by_key(|(f, _)| *f);
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The host ports a Pod object declares: (protocol, host port, container
/// port, host IP).
pub fn pod_host_ports(pod: &Pod) -> Vec<(Proto, u16, u16, Option<Ipv4Addr>)> {
    pod.container_ports
        .iter()
        .filter_map(|p| {
            Some((
                Proto::from_proto(p.protocol())?,
                u16::try_from(p.host_port).ok()?,
                u16::try_from(p.container_port).ok()?,
                p.host_ip.parse().ok(),
            ))
        })
        .collect()
}

fn frontend_addresses(svc: &Service) -> Vec<(Ipv4Addr, FrontendKind)> {
    let parse = |s: &String| s.parse::<Ipv4Addr>().ok();
    let mut out: Vec<(Ipv4Addr, FrontendKind)> = Vec::new();
    out.extend(
        svc.cluster_ips
            .iter()
            .filter_map(parse)
            .map(|a| (a, FrontendKind::ClusterIp)),
    );
    out.extend(
        svc.external_ips
            .iter()
            .filter_map(parse)
            .map(|a| (a, FrontendKind::ExternalIp)),
    );
    if svc.r#type() == ServiceType::LoadBalancer {
        out.extend(
            svc.load_balancer_ips
                .iter()
                .filter_map(parse)
                .map(|a| (a, FrontendKind::LoadBalancer)),
        );
    }
    // One frontend per address, the first kind wins.
    let mut seen = BTreeSet::new();
    out.retain(|(a, _)| seen.insert(*a));
    out
}

/// The backends of the service port named `port_name`: every IPv4 address of
/// every serving endpoint, with the slice's port of the same name.
fn port_backends<'a>(
    port_name: &str,
    proto: Proto,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node_name: &str,
) -> Vec<BackendSpec> {
    let mut out = BTreeSet::new();
    for slice in slices {
        if !slice.address_type.is_empty() && slice.address_type != "IPv4" {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && Proto::from_proto(p.protocol()) == Some(proto))
        else {
            continue;
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        if number == 0 {
            continue;
        }
        for ep in &slice.endpoints {
            let terminating = if ep.ready {
                false
            } else if ep.serving && ep.terminating {
                true
            } else {
                continue;
            };
            let local = !ep.node_name.is_empty() && ep.node_name == node_name;
            for addr in ep
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
            {
                out.insert(BackendSpec {
                    backend: Backend {
                        addr,
                        port: number,
                        proto,
                    },
                    terminating,
                    local,
                });
            }
        }
    }
    // An address listed both ready and terminating counts as ready.
    let ready: BTreeSet<Backend> = out
        .iter()
        .filter(|b| !b.terminating)
        .map(|b| b.backend)
        .collect();
    out.into_iter()
        .filter(|b| !b.terminating || !ready.contains(&b.backend))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::watcher::v1::{ContainerPort, Endpoint, EndpointPort, ObjectMeta, ServicePort};

    fn node() -> NodeView {
        NodeView {
            name: "n1".into(),
            addrs: vec![Ipv4Addr::new(172, 31, 0, 11)],
            default_algorithm: Algorithm::Random,
        }
    }

    fn svc(ips: &[&str], ports: &[(&str, Protocol, u32)]) -> Service {
        Service {
            meta: Some(ObjectMeta {
                namespace: "default".into(),
                name: "web".into(),
                ..Default::default()
            }),
            r#type: ServiceType::ClusterIp as i32,
            cluster_ips: ips.iter().map(|s| s.to_string()).collect(),
            ports: ports
                .iter()
                .map(|(n, p, port)| ServicePort {
                    name: n.to_string(),
                    protocol: *p as i32,
                    port: *port,
                    target_port: port.to_string(),
                    node_port: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Endpoints as (address, ready, serving, terminating, node).
    fn slice(
        eps: &[(&str, bool, bool, bool, &str)],
        ports: &[(&str, Protocol, u32)],
    ) -> EndpointSlice {
        EndpointSlice {
            service_name: "web".into(),
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(a, ready, serving, terminating, node)| Endpoint {
                    addresses: vec![a.to_string()],
                    ready: *ready,
                    serving: *serving,
                    terminating: *terminating,
                    node_name: node.to_string(),
                    ..Default::default()
                })
                .collect(),
            ports: ports
                .iter()
                .map(|(n, p, port)| EndpointPort {
                    name: n.to_string(),
                    protocol: *p as i32,
                    port: *port,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_port_gets_its_named_slice_port() {
        let s = svc(
            &["10.96.0.10"],
            &[("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)],
        );
        let sl = slice(
            &[
                ("10.244.0.5", true, true, false, "n1"),
                ("10.244.0.6", true, true, false, "n2"),
            ],
            &[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)],
        );
        let fe = service_frontends(&s, [&sl], &node());
        assert_eq!(fe.len(), 2);
        let (f, spec) = &fe[0];
        assert_eq!(f.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(spec.service, "default/web");
        assert_eq!(spec.backends.len(), 2);
        assert!(spec.backends.iter().all(|b| b.backend.port == 8080));
        assert_eq!(
            spec.backends.iter().filter(|b| b.local).count(),
            1,
            "locality comes from nodeName"
        );
        assert!(
            fe[1]
                .1
                .backends
                .iter()
                .all(|b| b.backend.port == 5353 && b.backend.proto == Proto::Udp)
        );
    }

    #[test]
    fn terminating_endpoints_take_new_connections_only_when_nothing_else_is_left() {
        let s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        let sl = slice(
            &[
                ("10.244.0.5", true, true, false, "n1"),
                ("10.244.0.6", false, true, true, "n1"),
                ("10.244.0.7", false, false, false, "n1"),
            ],
            &[("", Protocol::Tcp, 8080)],
        );
        let (_, spec) = &service_frontends(&s, [&sl], &node())[0];
        assert_eq!(
            spec.backends.len(),
            2,
            "not-ready, not-serving endpoints are left out"
        );
        let sel: Vec<_> = spec.selectable().map(|b| b.addr.to_string()).collect();
        assert_eq!(sel, vec!["10.244.0.5"]);

        let only_terminating = slice(
            &[("10.244.0.6", false, true, true, "n1")],
            &[("", Protocol::Tcp, 8080)],
        );
        let (_, spec) = &service_frontends(&s, [&only_terminating], &node())[0];
        assert_eq!(spec.selectable().count(), 1);
        // The datapath must know: it refuses terminating backends unless
        // the frontend says they are all it has (found by the e2e suite's
        // "fallback to local terminating endpoints" spec).
        assert!(spec.terminating_only());
        let (_, mixed) = &service_frontends(&s, [&sl], &node())[0];
        assert!(!mixed.terminating_only());
    }

    /// kube-proxy leaves Services with these labels alone (the e2e
    /// suite's "should implement service.kubernetes.io/headless" and
    /// "service-proxy-name" specs).
    #[test]
    fn services_labelled_for_another_proxy_or_none_get_no_frontend() {
        let sl = slice(
            &[("10.244.0.5", true, true, false, "n1")],
            &[("", Protocol::Tcp, 8080)],
        );
        for label in NOT_PROXIED_LABELS {
            let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
            if let Some(m) = s.meta.as_mut() {
                m.labels.insert(label.to_string(), "other".into());
            }
            assert!(service_frontends(&s, [&sl], &node()).is_empty(), "{label}");
        }
        let s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        assert_eq!(service_frontends(&s, [&sl], &node()).len(), 1);
    }

    #[test]
    fn headless_and_sctp_get_no_frontend() {
        let headless = svc(&[], &[("", Protocol::Tcp, 80)]);
        assert!(service_frontends(&headless, [], &node()).is_empty());
        let sctp = svc(&["10.96.0.10"], &[("", Protocol::Sctp, 80)]);
        assert!(service_frontends(&sctp, [], &node()).is_empty());
    }

    #[test]
    fn every_address_of_a_load_balancer_service_is_a_frontend() {
        let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        s.external_ips = vec!["192.0.2.10".into()];
        s.load_balancer_ips = vec!["198.51.100.7".into()];
        s.r#type = ServiceType::LoadBalancer as i32;
        s.ports[0].node_port = 30080;
        let kinds: Vec<_> = service_frontends(&s, [], &node())
            .into_iter()
            .map(|(f, s)| (f.to_string(), s.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.10:80/TCP".into(), FrontendKind::ClusterIp),
                ("192.0.2.10:80/TCP".into(), FrontendKind::ExternalIp),
                ("198.51.100.7:80/TCP".into(), FrontendKind::LoadBalancer),
                ("172.31.0.11:30080/TCP".into(), FrontendKind::NodePort),
            ]
        );
    }

    #[test]
    fn local_traffic_policies_keep_only_this_nodes_backends() {
        let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        s.r#type = ServiceType::NodePort as i32;
        s.ports[0].node_port = 30080;
        s.external_traffic_policy = TrafficPolicy::Local as i32;
        let sl = slice(
            &[
                ("10.244.0.5", true, true, false, "n1"),
                ("10.244.1.5", true, true, false, "n2"),
            ],
            &[("", Protocol::Tcp, 80)],
        );
        let fe = service_frontends(&s, [&sl], &node());
        let find = |fe: &[(Frontend, FrontendSpec)], kind, scope| {
            fe.iter()
                .find(|(f, s)| s.kind == kind && f.scope == scope)
                .map(|(_, s)| s.clone())
        };
        let cluster_ip = find(&fe, FrontendKind::ClusterIp, Scope::External).expect("ClusterIP");
        let node_port = find(&fe, FrontendKind::NodePort, Scope::External).expect("NodePort");
        assert_eq!(
            cluster_ip.backends.len(),
            2,
            "internal traffic policy is Cluster"
        );
        assert_eq!(
            node_port.backends.len(),
            1,
            "external traffic policy is Local"
        );
        assert!(node_port.backends[0].local);

        s.internal_traffic_policy = TrafficPolicy::Local as i32;
        let fe = service_frontends(&s, [&sl], &node());
        assert!(
            fe.iter()
                .filter(|(f, _)| f.scope == Scope::External)
                .all(|(_, spec)| spec.backends.len() == 1)
        );
        // The NodePort's internal entry follows neither policy.
        let internal = find(&fe, FrontendKind::NodePort, Scope::Internal).expect("internal");
        assert_eq!(internal.backends.len(), 2);

        // A node with none of the endpoints drops what the policies keep
        // from it, as kube-proxy does, rather than rejecting it.
        let elsewhere = slice(
            &[("10.244.1.5", true, true, false, "n2")],
            &[("", Protocol::Tcp, 80)],
        );
        let fe = service_frontends(&s, [&elsewhere], &node());
        let cluster_ip = find(&fe, FrontendKind::ClusterIp, Scope::External).expect("ClusterIP");
        assert!(cluster_ip.backends.is_empty() && cluster_ip.endpoints_elsewhere);
    }

    /// kube-proxy (since 1.24) applies externalTrafficPolicy: Local to
    /// traffic from outside the cluster only: pods and nodes reaching a
    /// NodePort, ExternalIP or LoadBalancer address get every endpoint.
    #[test]
    fn a_local_external_policy_leaves_internal_clients_every_endpoint() {
        let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        s.r#type = ServiceType::LoadBalancer as i32;
        s.ports[0].node_port = 30080;
        s.external_ips = vec!["192.0.2.10".into()];
        s.load_balancer_ips = vec!["198.51.100.7".into()];
        s.external_traffic_policy = TrafficPolicy::Local as i32;
        let elsewhere = slice(
            &[("10.244.1.5", true, true, false, "n2")],
            &[("", Protocol::Tcp, 80)],
        );
        let fe = service_frontends(&s, [&elsewhere], &node());
        let entries: Vec<String> = fe
            .iter()
            .map(|(f, spec)| {
                format!(
                    "{f} {} backends{}{}",
                    spec.backends.len(),
                    if spec.internal_scope {
                        ", two scopes"
                    } else {
                        ""
                    },
                    if spec.endpoints_elsewhere {
                        ", endpoints elsewhere"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                "10.96.0.10:80/TCP 1 backends",
                "192.0.2.10:80/TCP 0 backends, two scopes, endpoints elsewhere",
                "192.0.2.10:80/TCP (internal) 1 backends",
                "198.51.100.7:80/TCP 0 backends, two scopes, endpoints elsewhere",
                "198.51.100.7:80/TCP (internal) 1 backends",
                "172.31.0.11:30080/TCP 0 backends, two scopes, endpoints elsewhere",
                "172.31.0.11:30080/TCP (internal) 1 backends",
            ]
        );

        // Every endpoint on this node: one entry serves everyone.
        let here = slice(
            &[("10.244.0.5", true, true, false, "n1")],
            &[("", Protocol::Tcp, 80)],
        );
        let fe = service_frontends(&s, [&here], &node());
        assert!(fe.iter().all(|(f, spec)| f.scope == Scope::External
            && !spec.internal_scope
            && spec.backends.len() == 1));

        // No endpoint anywhere: nothing is elsewhere, so it is rejected.
        let fe = service_frontends(&s, [], &node());
        assert!(fe.iter().all(|(f, spec)| f.scope == Scope::External
            && !spec.internal_scope
            && !spec.endpoints_elsewhere));
    }

    #[test]
    fn algorithm_and_affinity_follow_the_service() {
        let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        let (_, spec) = &service_frontends(&s, [], &node())[0];
        assert_eq!(
            (spec.algorithm, spec.affinity_timeout),
            (Algorithm::Random, None)
        );
        if let Some(m) = s.meta.as_mut() {
            m.annotations
                .insert(ALGORITHM_ANNOTATION.into(), "maglev".into());
        }
        s.session_affinity = SessionAffinity::ClientIp as i32;
        let (_, spec) = &service_frontends(&s, [], &node())[0];
        assert_eq!(
            (spec.algorithm, spec.affinity_timeout),
            (Algorithm::Maglev, Some(10800))
        );
        s.session_affinity_timeout_seconds = 30;
        let (_, spec) = &service_frontends(&s, [], &node())[0];
        assert_eq!(spec.affinity_timeout, Some(30));
    }

    #[test]
    fn host_ports_listen_on_every_node_address_unless_one_is_named() {
        let pod = Pod {
            container_ports: vec![
                ContainerPort {
                    name: "web".into(),
                    protocol: Protocol::Tcp as i32,
                    container_port: 8080,
                    host_port: 8081,
                    host_ip: String::new(),
                },
                ContainerPort {
                    name: "none".into(),
                    protocol: Protocol::Tcp as i32,
                    container_port: 9090,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            ..Default::default()
        };
        let fe = hostport_frontends(
            "default/p",
            Ipv4Addr::new(10, 244, 0, 9),
            pod_host_ports(&pod),
            &node(),
        );
        assert_eq!(fe.len(), 1);
        assert_eq!(fe[0].0.to_string(), "172.31.0.11:8081/TCP");
        assert_eq!(
            fe[0].1.backends[0].backend.to_string(),
            "10.244.0.9:8080/TCP"
        );
        assert_eq!(fe[0].1.kind, FrontendKind::HostPort);
    }
}

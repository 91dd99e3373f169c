//! What the load-balancer maps should hold, computed from Services and
//! EndpointSlices the way kube-proxy reads them.
//!
//! Pure functions: no maps, no I/O. `sync` turns the result into map writes.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr};

use weft_proto::watcher::v1::{EndpointSlice, Protocol, Service, ServiceType};

use crate::maps::{IPPROTO_TCP, IPPROTO_UDP, svc_flags};

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

/// What clients dial: an address, a port and a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
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
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub fn flags(self) -> u8 {
        match self {
            FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
            FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
            FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
        }
    }

    pub fn from_flags(flags: u8) -> Self {
        if flags & svc_flags::EXTERNAL_IP != 0 {
            FrontendKind::ExternalIp
        } else if flags & svc_flags::LOAD_BALANCER != 0 {
            FrontendKind::LoadBalancer
        } else {
            FrontendKind::ClusterIp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// One backend of a frontend and whether it may take new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub backend: Backend,
    /// Terminating backends keep their existing connections but get no new
    /// ones (unless nothing else is left, as kube-proxy does).
    pub terminating: bool,
}

/// Everything the maps hold for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name` of the Service.
    pub service: String,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<BackendSpec>,
}

impl FrontendSpec {
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

/// The frontends of one Service, given the EndpointSlices that belong to it.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
) -> Vec<(Frontend, FrontendSpec)> {
    let Some(meta) = svc.meta.as_ref() else {
        return Vec::new();
    };
    if svc.r#type() == ServiceType::ExternalName {
        return Vec::new();
    }
    let name = format!("{}/{}", meta.namespace, meta.name);
    let addresses = frontend_addresses(svc);
    let mut out = Vec::new();
    for port in &svc.ports {
        let Some(proto) = Proto::from_proto(port.protocol()) else {
            continue;
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        if number == 0 {
            continue;
        }
        let backends = port_backends(&port.name, proto, slices.clone());
        for (addr, kind) in &addresses {
            out.push((
                Frontend {
                    addr: *addr,
                    port: number,
                    proto,
                },
                FrontendSpec {
                    service: name.clone(),
                    kind: *kind,
                    backends: backends.clone(),
                },
            ));
        }
    }
    out
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
    use weft_proto::watcher::v1::{Endpoint, EndpointPort, ObjectMeta, ServicePort};

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

    fn slice(eps: &[(&str, bool, bool, bool)], ports: &[(&str, Protocol, u32)]) -> EndpointSlice {
        EndpointSlice {
            service_name: "web".into(),
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(a, ready, serving, terminating)| Endpoint {
                    addresses: vec![a.to_string()],
                    ready: *ready,
                    serving: *serving,
                    terminating: *terminating,
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
                ("10.244.0.5", true, true, false),
                ("10.244.0.6", true, true, false),
            ],
            &[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)],
        );
        let fe = service_frontends(&s, [&sl]);
        assert_eq!(fe.len(), 2);
        let (f, spec) = &fe[0];
        assert_eq!(f.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(spec.service, "default/web");
        assert_eq!(spec.backends.len(), 2);
        assert!(spec.backends.iter().all(|b| b.backend.port == 8080));
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
                ("10.244.0.5", true, true, false),
                ("10.244.0.6", false, true, true),
                ("10.244.0.7", false, false, false),
            ],
            &[("", Protocol::Tcp, 8080)],
        );
        let (_, spec) = &service_frontends(&s, [&sl])[0];
        assert_eq!(
            spec.backends.len(),
            2,
            "not-ready, not-serving endpoints are left out"
        );
        let sel: Vec<_> = spec.selectable().map(|b| b.addr.to_string()).collect();
        assert_eq!(sel, vec!["10.244.0.5"]);

        let only_terminating = slice(
            &[("10.244.0.6", false, true, true)],
            &[("", Protocol::Tcp, 8080)],
        );
        let (_, spec) = &service_frontends(&s, [&only_terminating])[0];
        assert_eq!(spec.selectable().count(), 1);
    }

    #[test]
    fn headless_and_sctp_get_no_frontend() {
        let headless = svc(&[], &[("", Protocol::Tcp, 80)]);
        assert!(service_frontends(&headless, []).is_empty());
        let sctp = svc(&["10.96.0.10"], &[("", Protocol::Sctp, 80)]);
        assert!(service_frontends(&sctp, []).is_empty());
    }

    #[test]
    fn external_and_load_balancer_addresses_are_frontends_too() {
        let mut s = svc(&["10.96.0.10"], &[("", Protocol::Tcp, 80)]);
        s.external_ips = vec!["192.0.2.10".into()];
        s.load_balancer_ips = vec!["198.51.100.7".into()];
        s.r#type = ServiceType::LoadBalancer as i32;
        let kinds: Vec<_> = service_frontends(&s, [])
            .into_iter()
            .map(|(f, s)| (f.addr.to_string(), s.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.10".into(), FrontendKind::ClusterIp),
                ("192.0.2.10".into(), FrontendKind::ExternalIp),
                ("198.51.100.7".into(), FrontendKind::LoadBalancer),
            ]
        );
    }
}

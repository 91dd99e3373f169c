//! What the lab does in place of Kubernetes' control loops: it schedules
//! pods to nodes, allocates cluster IPs, and keeps EndpointSlices equal to
//! the ready pods behind each Service. Pure functions over the manifests;
//! `lab.rs` writes the results back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "weft-lab";

pub fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

pub fn name_of(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// The next free cluster IP in `cidr`, skipping the first ten addresses as
/// Kubernetes reserves the low range for well-known services.
pub fn next_cluster_ip(cidr: ipnet::Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    cidr.hosts().skip(9).find(|ip| !used.contains(ip))
}

/// Whether a pod is running and ready by its status, as kubelet reports it.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a Service's target port names, for one pod.
fn resolve_target_port(
    target: Option<&IntOrString>,
    port: i32,
    protocol: &str,
    pod: &Pod,
) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            Ok(n) => Some(n),
            Err(_) => pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find_map(|p| {
                    let proto = p.protocol.as_deref().unwrap_or("TCP");
                    (p.name.as_deref() == Some(name.as_str()) && proto == protocol)
                        .then_some(p.container_port)
                }),
        },
    }
}

/// The EndpointSlice the lab keeps for `svc`, from the pods that exist.
/// None when the Service selects nothing by selector (headless of
/// selector-less Services are managed by hand).
pub fn endpoint_slice(svc: &Service, pods: &[&Pod]) -> Option<EndpointSlice> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() {
        return None;
    }
    let ns = ns_of(&svc.metadata);
    let svc_name = name_of(&svc.metadata);
    let selected: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| ns_of(&p.metadata) == ns && selects(&selector, p) && pod_ip(p).is_some())
        .collect();
    let ports: Vec<EndpointPort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let target = selected
                .iter()
                .find_map(|pod| resolve_target_port(p.target_port.as_ref(), p.port, &protocol, pod))
                .or(match &p.target_port {
                    None => Some(p.port),
                    Some(IntOrString::Int(n)) => Some(*n),
                    Some(IntOrString::String(_)) => None,
                })?;
            Some(EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(target),
                protocol: Some(protocol),
                app_protocol: None,
            })
        })
        .collect();
    let mut endpoints: Vec<Endpoint> = selected
        .iter()
        .filter_map(|pod| {
            let ip = pod_ip(pod)?;
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let ready = pod_ready(pod) && !terminating;
            Some(Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(pod_ready(pod)),
                    terminating: Some(terminating),
                }),
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(ns.clone()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc_name}-lab")),
            namespace: Some(ns),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), svc_name),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus, ServicePort, ServiceSpec};

    fn pod(name: &str, labels: &[(&str, &str)], ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn svc() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".into(), "web".into())])),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::Int(8080)),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn slices_list_the_selected_pods_with_addresses() {
        let a = pod("a", &[("app", "web")], Some("10.244.0.5"), true);
        let b = pod("b", &[("app", "web")], None, false);
        let c = pod("c", &[("app", "db")], Some("10.244.0.7"), true);
        let d = pod("d", &[("app", "web")], Some("10.244.0.8"), false);
        let slice = endpoint_slice(&svc(), &[&a, &b, &c, &d]).expect("slice");
        let addrs: Vec<_> = slice
            .endpoints
            .iter()
            .map(|e| e.addresses[0].clone())
            .collect();
        assert_eq!(addrs, vec!["10.244.0.5", "10.244.0.8"]);
        assert_eq!(
            slice.endpoints[1].conditions.as_ref().and_then(|c| c.ready),
            Some(false)
        );
        assert_eq!(slice.ports.as_ref().map(|p| p[0].port), Some(Some(8080)));
        assert_eq!(
            slice
                .metadata
                .labels
                .as_ref()
                .map(|l| l[SERVICE_NAME_LABEL].clone()),
            Some("web".into())
        );
    }

    #[test]
    fn cluster_ips_skip_the_low_range_and_used_ones() {
        let cidr: ipnet::Ipv4Net = "10.96.0.0/16".parse().expect("cidr");
        let used = BTreeSet::from([Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            next_cluster_ip(cidr, &used),
            Some(Ipv4Addr::new(10, 96, 0, 11))
        );
    }
}

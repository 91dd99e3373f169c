//! The synthetic Services a benchmark installs, and their Kubernetes
//! manifests (Service + EndpointSlice, as svc-watcher reads them).

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// The namespace every benchmark Service lives in.
pub const NAMESPACE: &str = "bench";
/// The Service port and the port the backends listen on.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const PORT_NAME: &str = "http";

/// One ClusterIP Service with its backends (TCP only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

impl BenchService {
    /// `ns/name:port`, kube-proxy's ServicePortName.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }
}

/// The cluster IP of benchmark Service `i`: 10.100.0.1 and up, outside the
/// lab's own service range so nothing else ever collides with it.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    Ipv4Addr::from(base + i as u32)
}

/// Service `i` with the given backends.
pub fn service(i: usize, backends: Vec<(Ipv4Addr, u16)>) -> BenchService {
    BenchService {
        name: format!("svc-{i}"),
        cluster_ip: cluster_ip(i),
        port: SERVICE_PORT,
        backends,
    }
}

/// `n` distinct made-up backend addresses for Service `i` with `per`
/// backends each: 10.128.0.0/9, far from every pod CIDR, never dialled.
pub fn unique_backends(i: usize, per: usize) -> Vec<(Ipv4Addr, u16)> {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    (0..per)
        .map(|j| (Ipv4Addr::from(base + (i * per + j) as u32), TARGET_PORT))
        .collect()
}

fn service_json(s: &BenchService) -> Value {
    let target = s.backends.first().map(|b| b.1).unwrap_or(TARGET_PORT);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.cluster_ip.to_string(),
            "clusterIPs": [s.cluster_ip.to_string()],
            "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": s.port, "targetPort": target}],
        },
    })
}

fn slice_json(s: &BenchService) -> Value {
    let endpoints: Vec<Value> = s
        .backends
        .iter()
        .map(|(ip, _)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })
        })
        .collect();
    let port = s.backends.first().map(|b| b.1).unwrap_or(TARGET_PORT);
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-bench", s.name),
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": s.name,
                "endpointslice.kubernetes.io/managed-by": "weft-bench",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": port}],
        "endpoints": endpoints,
    })
}

/// A `kind: List` JSON manifest holding each Service and its EndpointSlice.
pub fn manifest(services: &[BenchService]) -> String {
    let items: Vec<Value> = services
        .iter()
        .flat_map(|s| [service_json(s), slice_json(s)])
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The Namespace the Services live in.
pub fn namespace_manifest() -> String {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}).to_string()
}

/// A bare Pod object (no server runs for it), scheduled to `node`, for the
/// CNI and memory benchmarks: the datapath and identity-svc see its labels.
pub fn pod_manifest(name: &str, node: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "bench/none"}]},
    })
}

/// Many objects as one `kind: List` JSON manifest.
pub fn list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_in_range() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(cluster_ip(49_999), Ipv4Addr::new(10, 100, 195, 80));
        let b = unique_backends(9_999, 10);
        assert_eq!(b.len(), 10);
        assert_eq!(b[9].0, Ipv4Addr::new(10, 129, 134, 159));
        assert_ne!(unique_backends(1, 10)[0], unique_backends(0, 10)[9]);
    }

    #[test]
    fn manifest_pairs_each_service_with_its_slice() {
        let s = service(3, vec![(Ipv4Addr::new(10, 244, 0, 2), 8080)]);
        let v: Value = serde_json::from_str(&manifest(&[s])).expect("json");
        let items = v["items"].as_array().expect("items");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["kind"], "Service");
        assert_eq!(items[0]["spec"]["clusterIP"], "10.100.0.4");
        assert_eq!(items[1]["kind"], "EndpointSlice");
        assert_eq!(
            items[1]["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-3"
        );
        assert_eq!(items[1]["endpoints"][0]["addresses"][0], "10.244.0.2");
        assert_eq!(items[1]["ports"][0]["port"], 8080);
    }
}

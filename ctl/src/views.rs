//! What each command shows: plain structs built from the gRPC answers,
//! serialised as-is for `-o json` (prost types have no serde) and drawn as
//! tables for people.

use std::collections::BTreeMap;

use serde::Serialize;
use weft_proto::{datapath::v1 as dp, identity::v1 as id, ipam::v1 as ipam};

use crate::table::Table;

/// Something that can be shown as a table or as JSON.
pub trait View: Serialize {
    fn table(&self) -> String;
}

// ---------------------------------------------------------------- services

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub frontend: String,
    #[serde(rename = "type")]
    pub service_type: String,
    /// namespace/name of the Kubernetes Service.
    pub service: String,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceList {
    pub services: Vec<ServiceView>,
}

impl From<dp::ListServicesResponse> for ServiceList {
    fn from(resp: dp::ListServicesResponse) -> Self {
        let mut services: Vec<ServiceView> = resp
            .services
            .into_iter()
            .map(|s| ServiceView {
                id: s.id,
                frontend: s.frontend,
                service_type: s.r#type,
                service: s.service,
                backends: s
                    .backends
                    .into_iter()
                    .map(|b| BackendView {
                        id: b.id,
                        address: b.address,
                        state: b.state,
                    })
                    .collect(),
            })
            .collect();
        services.sort_by(|a, b| (a.id, &a.frontend).cmp(&(b.id, &b.frontend)));
        Self { services }
    }
}

impl View for ServiceList {
    /// Laid out like `cilium service list`: one backend per line, numbered,
    /// with the frontend's protocol.
    fn table(&self) -> String {
        let mut t = Table::new(["ID", "Frontend", "Service Type", "Service", "Backend"]);
        for s in &self.services {
            let protocol = s.frontend.rsplit_once('/').map(|(_, p)| p).unwrap_or("");
            let backends: Vec<String> = s
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let address = if b.address.contains('/') || protocol.is_empty() {
                        b.address.clone()
                    } else {
                        format!("{}/{protocol}", b.address)
                    };
                    let state = if b.state.is_empty() {
                        "active"
                    } else {
                        &b.state
                    };
                    format!("{} => {address} ({state})", i + 1)
                })
                .collect();
            t.row([
                s.id.to_string(),
                s.frontend.clone(),
                s.service_type.clone(),
                s.service.clone(),
                backends.join("\n"),
            ]);
        }
        t.render()
    }
}

// --------------------------------------------------------------- endpoints

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointView {
    pub container_id: String,
    pub pod: String,
    pub ip: String,
    pub interface: String,
    pub identity: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointList {
    pub endpoints: Vec<EndpointView>,
}

impl From<dp::ListEndpointsResponse> for EndpointList {
    fn from(resp: dp::ListEndpointsResponse) -> Self {
        let mut endpoints: Vec<EndpointView> = resp
            .endpoints
            .into_iter()
            .map(|e| EndpointView {
                container_id: e.container_id,
                pod: e.pod,
                ip: e.ip,
                interface: e.host_ifname,
                identity: e.identity,
                labels: e.labels.into_iter().collect(),
            })
            .collect();
        endpoints.sort_by(|a, b| (&a.pod, &a.container_id).cmp(&(&b.pod, &b.container_id)));
        Self { endpoints }
    }
}

/// Container ids are 64 hex digits; 12 tell them apart, as `docker ps` shows.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl View for EndpointList {
    fn table(&self) -> String {
        let mut t = Table::new(["Container", "Pod", "IP", "Interface", "Identity"]);
        for e in &self.endpoints {
            t.row([
                short_id(&e.container_id).to_string(),
                e.pod.clone(),
                e.ip.clone(),
                e.interface.clone(),
                e.identity.to_string(),
            ]);
        }
        t.render()
    }
}

// -------------------------------------------------------------- identities

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityView {
    pub id: u32,
    pub labels: BTreeMap<String, String>,
    pub reserved: bool,
    pub references: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityList {
    pub identities: Vec<IdentityView>,
}

impl From<id::ListResponse> for IdentityList {
    fn from(resp: id::ListResponse) -> Self {
        let mut identities: Vec<IdentityView> = resp
            .identities
            .into_iter()
            .map(|i| IdentityView {
                id: i.id,
                labels: i.labels.into_iter().collect(),
                reserved: i.reserved,
                references: i.references,
            })
            .collect();
        identities.sort_by_key(|i| i.id);
        Self { identities }
    }
}

impl View for IdentityList {
    fn table(&self) -> String {
        let mut t = Table::new(["ID", "Labels", "References"]);
        for i in &self.identities {
            let labels: Vec<String> = i
                .labels
                .iter()
                .map(|(k, v)| {
                    if v.is_empty() {
                        k.clone()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            let references = if i.reserved {
                "reserved".to_string()
            } else {
                i.references.to_string()
            };
            t.row([i.id.to_string(), labels.join("\n"), references]);
        }
        t.render()
    }
}

// -------------------------------------------------------------------- ipam

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllocationView {
    pub node: String,
    pub cidr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolView {
    pub cidr: String,
    pub mask_size: u32,
    pub used: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IpamList {
    pub mode: String,
    pub allocations: Vec<AllocationView>,
    pub pools: Vec<PoolView>,
}

impl From<ipam::ListResponse> for IpamList {
    fn from(resp: ipam::ListResponse) -> Self {
        let mut allocations: Vec<AllocationView> = resp
            .allocations
            .into_iter()
            .map(|a| AllocationView {
                node: a.node,
                cidr: a.cidr,
            })
            .collect();
        allocations.sort_by(|a, b| a.node.cmp(&b.node));
        Self {
            mode: resp.mode,
            allocations,
            pools: resp
                .pools
                .into_iter()
                .map(|p| PoolView {
                    cidr: p.cidr,
                    mask_size: p.mask_size,
                    used: p.used,
                    total: p.total,
                })
                .collect(),
        }
    }
}

impl View for IpamList {
    fn table(&self) -> String {
        let mut nodes = Table::new(["Node", "CIDR"]);
        for a in &self.allocations {
            nodes.row([a.node.clone(), a.cidr.clone()]);
        }
        let mut pools = Table::new(["Pool", "Mask", "Used/Total"]);
        for p in &self.pools {
            pools.row([
                p.cidr.clone(),
                format!("/{}", p.mask_size),
                format!("{}/{}", p.used, p.total),
            ]);
        }
        let mode = if self.mode.is_empty() {
            "-"
        } else {
            &self.mode
        };
        format!("Mode: {mode}\n\n{}\n{}", nodes.render(), pools.render())
    }
}

// ----------------------------------------------------------------- bpf lb

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbServiceRowView {
    pub frontend: String,
    pub slot: u32,
    pub backend_id: u32,
    pub count: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbBackendRowView {
    pub id: u32,
    pub address: String,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbRevNatRowView {
    pub id: u32,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbMaps {
    pub services: Vec<LbServiceRowView>,
    pub backends: Vec<LbBackendRowView>,
    pub rev_nat: Vec<LbRevNatRowView>,
}

impl From<dp::DumpLbMapsResponse> for LbMaps {
    fn from(resp: dp::DumpLbMapsResponse) -> Self {
        Self {
            services: resp
                .services
                .into_iter()
                .map(|r| LbServiceRowView {
                    frontend: r.frontend,
                    slot: r.slot,
                    backend_id: r.backend_id,
                    count: r.count,
                    rev_nat_id: r.rev_nat_id,
                    flags: r.flags,
                })
                .collect(),
            backends: resp
                .backends
                .into_iter()
                .map(|r| LbBackendRowView {
                    id: r.id,
                    address: r.address,
                    flags: r.flags,
                })
                .collect(),
            rev_nat: resp
                .rev_nat
                .into_iter()
                .map(|r| LbRevNatRowView {
                    id: r.id,
                    address: r.address,
                })
                .collect(),
        }
    }
}

impl View for LbMaps {
    /// The rows as they sit in the maps: slot 0 of a frontend is its master
    /// entry (backend count), slots 1.. point at backends.
    fn table(&self) -> String {
        let mut services = Table::new([
            "Frontend",
            "Slot",
            "Backend ID",
            "Count",
            "RevNAT ID",
            "Flags",
        ]);
        for r in &self.services {
            services.row([
                r.frontend.clone(),
                r.slot.to_string(),
                r.backend_id.to_string(),
                r.count.to_string(),
                r.rev_nat_id.to_string(),
                format!("{:#x}", r.flags),
            ]);
        }
        let mut backends = Table::new(["Backend ID", "Address", "Flags"]);
        for r in &self.backends {
            backends.row([
                r.id.to_string(),
                r.address.clone(),
                format!("{:#x}", r.flags),
            ]);
        }
        let mut rev_nat = Table::new(["RevNAT ID", "Address"]);
        for r in &self.rev_nat {
            rev_nat.row([r.id.to_string(), r.address.clone()]);
        }
        format!(
            "Services:\n{}\nBackends:\n{}\nReverse NAT:\n{}",
            services.render(),
            backends.render(),
            rev_nat.render()
        )
    }
}

// ------------------------------------------------------------------ status

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthView {
    pub name: String,
    pub address: String,
    /// SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN, or UNREACHABLE.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the service says it is not serving, when it says (svc-watcher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl HealthView {
    pub fn is_healthy(&self) -> bool {
        self.status == "SERVING"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentView {
    pub name: String,
    pub connected: bool,
    pub detail: String,
    pub last_error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapView {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
    /// Percent full; absent when the size is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_percent: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatapathStatusView {
    pub node: String,
    pub pod_cidr: String,
    pub pod_ips_used: u64,
    pub pod_ips_total: u64,
    pub components: Vec<ComponentView>,
    pub maps: Vec<MapView>,
    pub features: Vec<String>,
    /// Pods isolated by NetworkPolicy, allow entries, addresses with an identity.
    pub policy: PolicyView,
    /// Packets by datapath outcome.
    pub packets: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicyView {
    pub isolated_endpoints: u32,
    pub entries: u32,
    pub ipcache_entries: u32,
}

impl From<dp::StatusResponse> for DatapathStatusView {
    fn from(s: dp::StatusResponse) -> Self {
        Self {
            node: s.node,
            pod_cidr: s.pod_cidr,
            pod_ips_used: s.pod_ips_used,
            pod_ips_total: s.pod_ips_total,
            components: s
                .components
                .into_iter()
                .map(|c| ComponentView {
                    name: c.name,
                    connected: c.connected,
                    detail: c.detail,
                    last_error: c.last_error,
                })
                .collect(),
            maps: s
                .maps
                .into_iter()
                .map(|m| MapView {
                    fill_percent: (m.max_entries > 0)
                        .then(|| (m.entries as f64 * 1000.0 / m.max_entries as f64).round() / 10.0),
                    name: m.name,
                    entries: m.entries,
                    max_entries: m.max_entries,
                })
                .collect(),
            features: s.features,
            policy: s
                .policy
                .map(|p| PolicyView {
                    isolated_endpoints: p.isolated_endpoints,
                    entries: p.entries,
                    ipcache_entries: p.ipcache_entries,
                })
                .unwrap_or_default(),
            packets: s.packets.into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    pub healthy: bool,
    /// What is wrong, one line each; empty when healthy.
    pub problems: Vec<String>,
    pub services: Vec<HealthView>,
    pub datapath: Option<DatapathStatusView>,
    /// Pod CIDRs per node and pool use, from ipam-svc.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamList>,
}

impl StatusReport {
    /// Works out `healthy` and `problems` from the parts: every service
    /// SERVING, the datapath status readable, every datapath component
    /// connected.
    pub fn new(services: Vec<HealthView>, datapath: Result<DatapathStatusView, String>) -> Self {
        let mut problems: Vec<String> = services
            .iter()
            .filter(|h| !h.is_healthy())
            .map(|h| match (&h.error, &h.reason) {
                (Some(e), _) => e.clone(),
                (None, Some(why)) => format!("{} is {}: {why}", h.name, h.status),
                (None, None) => format!("{} is {}", h.name, h.status),
            })
            .collect();
        let datapath = match datapath {
            Ok(d) => {
                for c in d.components.iter().filter(|c| !c.connected) {
                    let why = if c.last_error.is_empty() {
                        &c.detail
                    } else {
                        &c.last_error
                    };
                    problems.push(format!("datapath component {} disconnected: {why}", c.name));
                }
                Some(d)
            }
            Err(e) => {
                // Usually the same failure its health check already shows.
                if !problems.contains(&e) {
                    problems.push(format!("datapath status: {e}"));
                }
                None
            }
        };
        Self {
            healthy: problems.is_empty(),
            problems,
            services,
            datapath,
            ipam: None,
        }
    }
}

impl View for StatusReport {
    fn table(&self) -> String {
        let mut out = String::new();
        let mut health = Table::new(["Service", "Address", "Health"]);
        for h in &self.services {
            health.row([h.name.clone(), h.address.clone(), h.status.clone()]);
        }
        out.push_str(&health.render());

        if let Some(d) = &self.datapath {
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            out.push('\n');
            let mut facts = Table::new(["Node:", &or_dash(&d.node)]);
            facts.row(["Pod CIDR:".to_string(), or_dash(&d.pod_cidr)]);
            facts.row([
                "Pod IPs:".to_string(),
                format!("{}/{} used", d.pod_ips_used, d.pod_ips_total),
            ]);
            facts.row(["Features:".to_string(), or_dash(&d.features.join(", "))]);
            facts.row([
                "Policy:".to_string(),
                format!(
                    "{} pods isolated, {} allow entries, {} addresses with an identity",
                    d.policy.isolated_endpoints, d.policy.entries, d.policy.ipcache_entries
                ),
            ]);
            if !d.packets.is_empty() {
                let packets: Vec<String> = d
                    .packets
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                facts.row(["Packets:".to_string(), or_dash(&packets.join(", "))]);
            }
            out.push_str(&facts.render());

            if !d.components.is_empty() {
                out.push('\n');
                let mut components = Table::new(["Component", "Connected", "Detail", "Last Error"]);
                for c in &d.components {
                    components.row([
                        c.name.clone(),
                        if c.connected { "yes" } else { "NO" }.to_string(),
                        c.detail.clone(),
                        c.last_error.clone(),
                    ]);
                }
                out.push_str(&components.render());
            }
            if !d.maps.is_empty() {
                out.push('\n');
                let mut maps = Table::new(["Map", "Entries", "Max", "Fill"]);
                for m in &d.maps {
                    maps.row([
                        m.name.clone(),
                        m.entries.to_string(),
                        m.max_entries.to_string(),
                        m.fill_percent
                            .map(|p| format!("{p:.1}%"))
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                out.push_str(&maps.render());
            }
        }

        if let Some(ipam) = &self.ipam {
            out.push('\n');
            out.push_str(&ipam.table());
        }

        out.push('\n');
        if self.healthy {
            out.push_str("Overall: healthy\n");
        } else {
            out.push_str("Overall: UNHEALTHY\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> ServiceList {
        dp::ListServicesResponse {
            services: vec![
                dp::ServiceEntry {
                    id: 2,
                    frontend: "10.96.0.10:53/UDP".into(),
                    r#type: "ClusterIP".into(),
                    service: "kube-system/kube-dns".into(),
                    backends: vec![
                        dp::BackendEntry {
                            id: 7,
                            address: "10.244.0.5:53".into(),
                            state: "active".into(),
                        },
                        dp::BackendEntry {
                            id: 8,
                            address: "10.244.1.9:53".into(),
                            state: "terminating".into(),
                        },
                    ],
                },
                dp::ServiceEntry {
                    id: 1,
                    frontend: "10.96.0.1:443/TCP".into(),
                    r#type: "ClusterIP".into(),
                    service: "default/kubernetes".into(),
                    backends: vec![dp::BackendEntry {
                        id: 1,
                        address: "172.18.0.3:6443".into(),
                        state: String::new(),
                    }],
                },
                dp::ServiceEntry {
                    id: 3,
                    frontend: "0.0.0.0:30080/TCP".into(),
                    r#type: "NodePort".into(),
                    service: "default/web".into(),
                    backends: vec![],
                },
            ],
        }
        .into()
    }

    #[test]
    fn service_list_table_looks_like_cilium() {
        assert_eq!(
            services().table(),
            "\
ID   Frontend            Service Type   Service                Backend
1    10.96.0.1:443/TCP   ClusterIP      default/kubernetes     1 => 172.18.0.3:6443/TCP (active)
2    10.96.0.10:53/UDP   ClusterIP      kube-system/kube-dns   1 => 10.244.0.5:53/UDP (active)
                                                               2 => 10.244.1.9:53/UDP (terminating)
3    0.0.0.0:30080/TCP   NodePort       default/web
"
        );
    }

    #[test]
    fn service_list_json_keeps_every_field() {
        let json = serde_json::to_value(services()).expect("json");
        assert_eq!(json["services"][0]["id"], 1);
        assert_eq!(json["services"][0]["type"], "ClusterIP");
        assert_eq!(json["services"][1]["backends"][1]["state"], "terminating");
        assert_eq!(json["services"][2]["backends"], serde_json::json!([]));
    }

    #[test]
    fn endpoint_list_shortens_container_ids() {
        let list: EndpointList = dp::ListEndpointsResponse {
            endpoints: vec![dp::EndpointEntry {
                container_id: "0123456789abcdef0123".into(),
                pod: "default/web-0".into(),
                ip: "10.244.1.7".into(),
                host_ifname: "lxc0123".into(),
                identity: 12345,
                labels: [("k8s:app".to_string(), "web".to_string())].into(),
            }],
        }
        .into();
        assert_eq!(
            list.table(),
            "Container      Pod             IP           Interface   Identity\n\
             0123456789ab   default/web-0   10.244.1.7   lxc0123     12345\n"
        );
        assert_eq!(
            serde_json::to_value(&list).expect("json")["endpoints"][0]["labels"]["k8s:app"],
            "web"
        );
    }

    #[test]
    fn identity_list_puts_one_label_per_line() {
        let list: IdentityList = id::ListResponse {
            identities: vec![
                id::SecurityIdentity {
                    id: 256,
                    labels: [
                        ("k8s:app".to_string(), "web".to_string()),
                        (
                            "k8s:io.kubernetes.pod.namespace".to_string(),
                            "default".to_string(),
                        ),
                    ]
                    .into(),
                    reserved: false,
                    references: 3,
                },
                id::SecurityIdentity {
                    id: 1,
                    labels: [("reserved:host".to_string(), String::new())].into(),
                    reserved: true,
                    references: 0,
                },
            ],
        }
        .into();
        assert_eq!(
            list.table(),
            "ID    Labels                                    References\n\
             1     reserved:host                             reserved\n\
             256   k8s:app=web                               3\n\
             \x20     k8s:io.kubernetes.pod.namespace=default\n"
        );
    }

    #[test]
    fn ipam_list_shows_nodes_and_pool_use() {
        let list: IpamList = ipam::ListResponse {
            allocations: vec![
                ipam::NodeAllocation {
                    node: "node-b".into(),
                    cidr: "10.244.1.0/24".into(),
                },
                ipam::NodeAllocation {
                    node: "node-a".into(),
                    cidr: "10.244.0.0/24".into(),
                },
            ],
            pools: vec![ipam::PoolStatus {
                cidr: "10.244.0.0/16".into(),
                mask_size: 24,
                total: 256,
                used: 2,
            }],
            mode: "cluster-pool".into(),
        }
        .into();
        assert_eq!(
            list.table(),
            "Mode: cluster-pool\n\n\
             Node     CIDR\n\
             node-a   10.244.0.0/24\n\
             node-b   10.244.1.0/24\n\n\
             Pool            Mask   Used/Total\n\
             10.244.0.0/16   /24    2/256\n"
        );
    }

    #[test]
    fn lb_maps_table_has_all_three_maps() {
        let maps: LbMaps = dp::DumpLbMapsResponse {
            services: vec![dp::LbServiceRow {
                frontend: "10.96.0.1:443/TCP".into(),
                slot: 0,
                backend_id: 0,
                count: 1,
                rev_nat_id: 1,
                flags: 0,
            }],
            backends: vec![dp::LbBackendRow {
                id: 1,
                address: "172.18.0.3:6443".into(),
                flags: 2,
            }],
            rev_nat: vec![dp::LbRevNatRow {
                id: 1,
                address: "10.96.0.1:443".into(),
            }],
        }
        .into();
        let text = maps.table();
        assert!(
            text.contains("10.96.0.1:443/TCP   0      0            1       1           0x0"),
            "{text}"
        );
        assert!(
            text.contains("1            172.18.0.3:6443   0x2"),
            "{text}"
        );
        assert!(
            text.contains("Reverse NAT:\nRevNAT ID   Address\n1           10.96.0.1:443\n"),
            "{text}"
        );
    }

    fn datapath(connected: bool) -> DatapathStatusView {
        dp::StatusResponse {
            node: "node-a".into(),
            pod_cidr: "10.244.0.0/24".into(),
            pod_ips_used: 3,
            pod_ips_total: 254,
            components: vec![dp::ComponentStatus {
                name: "svc-watcher".into(),
                connected,
                detail: "revision 42".into(),
                last_error: if connected {
                    String::new()
                } else {
                    "connection refused".into()
                },
            }],
            maps: vec![
                dp::MapStatus {
                    name: "weft_lb_svc".into(),
                    entries: 12,
                    max_entries: 65536,
                },
                dp::MapStatus {
                    name: "weft_ct".into(),
                    entries: 1,
                    max_entries: 0,
                },
            ],
            features: vec!["ClusterIP".into(), "NodePort".into()],
            ..Default::default()
        }
        .into()
    }

    fn serving(name: &str) -> HealthView {
        HealthView {
            name: name.into(),
            address: format!("http://{name}"),
            status: "SERVING".into(),
            error: None,
            reason: None,
        }
    }

    #[test]
    fn status_healthy_when_everything_serves() {
        let report = StatusReport::new(
            vec![serving("ipam-svc"), serving("datapath-svc")],
            Ok(datapath(true)),
        );
        assert!(report.healthy);
        let text = report.table();
        assert!(text.contains("Pod IPs:    3/254 used"), "{text}");
        assert!(
            text.contains("weft_lb_svc   12        65536   0.0%"),
            "{text}"
        );
        assert!(text.contains("weft_ct       1         0       -"), "{text}");
        assert!(text.ends_with("Overall: healthy\n"), "{text}");
    }

    #[test]
    fn status_lists_problems() {
        let down = HealthView {
            name: "ipam-svc".into(),
            address: "http://127.0.0.1:1".into(),
            status: "UNREACHABLE".into(),
            error: Some("connection refused".into()),
            reason: None,
        };
        let report = StatusReport::new(vec![serving("datapath-svc"), down], Ok(datapath(false)));
        assert!(!report.healthy);
        assert_eq!(
            report.problems,
            [
                "connection refused",
                "datapath component svc-watcher disconnected: connection refused"
            ]
        );
        let report = StatusReport::new(vec![serving("datapath-svc")], Err("cannot reach".into()));
        assert!(!report.healthy);
        assert!(report.datapath.is_none());
        assert!(
            report
                .table()
                .contains("Overall: UNHEALTHY\n  - datapath status: cannot reach\n")
        );
    }
}

// ------------------------------------------------------------------- flows

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowView {
    pub time_unix_nanos: u64,
    pub node: String,
    pub verdict: String,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub direction: String,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub original_destination: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_pod: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_pod: String,
    pub source_identity: u32,
    pub destination_identity: u32,
}

impl From<dp::Flow> for FlowView {
    fn from(f: dp::Flow) -> Self {
        Self {
            time_unix_nanos: f.time_unix_nanos,
            node: f.node,
            verdict: f.verdict,
            reason: f.reason,
            direction: f.direction,
            protocol: f.protocol,
            source: f.source,
            destination: f.destination,
            original_destination: f.original_destination,
            source_pod: f.source_pod,
            destination_pod: f.destination_pod,
            source_identity: f.source_identity,
            destination_identity: f.destination_identity,
        }
    }
}

impl FlowView {
    /// One line, in the spirit of `hubble observe`:
    /// `12:00:01.123 DROPPED (policy_denied) ingress team-b/client 10.244.0.5:4711 (identity 301) -> default/web 10.244.0.7:8080 (identity 300) TCP`.
    pub fn line(&self) -> String {
        let secs = self.time_unix_nanos / 1_000_000_000;
        let millis = (self.time_unix_nanos / 1_000_000) % 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let end = |pod: &str, addr: &str, id: u32| {
            let pod = if pod.is_empty() {
                String::new()
            } else {
                format!("{pod} ")
            };
            format!("{pod}{addr} (identity {id})")
        };
        let via = if self.original_destination.is_empty() {
            String::new()
        } else {
            format!(" via {}", self.original_destination)
        };
        let dir = if self.direction.is_empty() {
            String::new()
        } else {
            format!(" {}", self.direction)
        };
        format!(
            "{h:02}:{m:02}:{s:02}.{millis:03} {} ({}){dir} {} -> {}{via} {}\n",
            self.verdict.to_uppercase(),
            self.reason,
            end(&self.source_pod, &self.source, self.source_identity),
            end(
                &self.destination_pod,
                &self.destination,
                self.destination_identity
            ),
            self.protocol,
        )
    }
}

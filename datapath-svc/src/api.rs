//! The `Datapath` gRPC service: what this node has programmed, for weftctl
//! and grpcurl.

use std::sync::Arc;

use futures::StreamExt as _;
use tonic::{Request, Response, Status};
use weft_proto::datapath::v1::{
    BackendEntry, ComponentStatus, DumpLbMapsRequest, DumpLbMapsResponse, EndpointEntry, Flow,
    FlowsRequest, LbBackendRow, LbRevNatRow, LbServiceRow, ListEndpointsRequest,
    ListEndpointsResponse, ListServicesRequest, ListServicesResponse, MapStatus, PolicyStatus,
    ServiceEntry, StatusRequest, StatusResponse, datapath_server::Datapath,
};

use crate::{
    agent::Agent,
    lb::Scope,
    maps::{addr_from_be, port_from_be, scope},
    sync::LbMaps as _,
};

pub struct DatapathService {
    agent: Arc<Agent>,
}

impl DatapathService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

type FlowStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Datapath for DatapathService {
    type FlowsStream = FlowStream;

    async fn flows(
        &self,
        request: Request<FlowsRequest>,
    ) -> Result<Response<Self::FlowsStream>, Status> {
        let filter = request.into_inner();
        if !filter.verdict.is_empty()
            && !["forwarded", "dropped", "translated"].contains(&filter.verdict.as_str())
        {
            return Err(Status::invalid_argument(format!(
                "verdict: {:?} is not one of forwarded, dropped, translated",
                filter.verdict
            )));
        }
        if !filter.pod.is_empty() && !filter.pod.contains('/') {
            return Err(Status::invalid_argument(format!(
                "pod: {:?} is not namespace/name",
                filter.pod
            )));
        }
        // Subscribe before reading the recent ones, so nothing falls between.
        let live = filter.follow.then(|| self.agent.flows.subscribe());
        let recent = self.agent.flows.recent(&filter);
        let head = futures::stream::iter(recent.into_iter().map(Ok));
        let Some(live) = live else {
            return Ok(Response::new(Box::pin(head)));
        };
        let tail = tokio_stream::wrappers::BroadcastStream::new(live).filter_map(move |f| {
            let f = match f {
                Ok(f) if crate::flows::matches(&filter, &f) => Some(Ok(f)),
                Ok(_) => None,
                // A slow reader skips what it missed rather than stalling the feed.
                Err(_) => None,
            };
            std::future::ready(f)
        });
        Ok(Response::new(Box::pin(head.chain(tail))))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let a = &self.agent;
        let last_error = a
            .peers
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let peer = |name: &str, up: bool| ComponentStatus {
            name: name.into(),
            connected: up,
            detail: String::new(),
            last_error: String::new(),
        };
        let (frontends, maps) = {
            let lb = a.lb.lock().unwrap_or_else(|p| p.into_inner());
            let maps = lb
                .maps()
                .fill()
                .into_iter()
                .map(|(name, entries, max)| MapStatus {
                    name: name.into(),
                    entries,
                    max_entries: max,
                })
                .collect::<Vec<_>>();
            (lb.programmed().len(), maps)
        };
        let endpoints = a.endpoints.all().map_err(internal)?.len();
        let components = vec![
            peer("svc-watcher", *a.peers.watcher.borrow()),
            peer("ipam-svc", *a.peers.ipam.borrow()),
            peer("identity-svc", *a.peers.identity.borrow()),
            ComponentStatus {
                name: "bpf".into(),
                connected: true,
                detail: format!(
                    "{frontends} frontends, {endpoints} endpoints, pinned at {}",
                    a.pin_dir.display()
                ),
                last_error,
            },
        ];
        Ok(Response::new(StatusResponse {
            node: a.node.clone(),
            pod_cidr: a.ipam.cidr().map(|c| c.to_string()).unwrap_or_default(),
            pod_ips_used: a.ipam.used(),
            pod_ips_total: a.ipam.capacity(),
            components,
            maps,
            features: a.features.clone(),
            policy: Some({
                let p = a.policy.lock().unwrap_or_else(|p| p.into_inner());
                PolicyStatus {
                    isolated_endpoints: p.isolated_endpoints() as u32,
                    entries: p.entries() as u32,
                    ipcache_entries: p.ipcache_len() as u32,
                }
            }),
            packets: a
                .counters
                .read()
                .into_iter()
                .map(|(r, v)| (r.label().to_string(), v.packets))
                .collect(),
        }))
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let lb = self.agent.lb.lock().unwrap_or_else(|p| p.into_inner());
        let services = lb
            .programmed()
            .iter()
            .map(|(f, p)| {
                let mut backends: Vec<BackendEntry> = p
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let (id, terminating) = lb.backend(b)?;
                        Some(BackendEntry {
                            id,
                            address: format!("{}:{}", b.addr, b.port),
                            state: if terminating { "terminating" } else { "active" }.into(),
                        })
                    })
                    .collect();
                backends.sort_by_key(|b| b.id);
                // The address clients dial; which of its entries this is
                // goes with the type, so the protocol stays last.
                let r#type = match f.scope {
                    Scope::External => p.kind.name().to_string(),
                    Scope::Internal => format!("{} (internal)", p.kind.name()),
                };
                ServiceEntry {
                    id: u32::from(p.rev_nat),
                    frontend: f.dialled(),
                    r#type,
                    service: p.service.clone(),
                    backends,
                }
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let endpoints = self
            .agent
            .endpoints
            .all()
            .map_err(internal)?
            .into_iter()
            .map(|r| {
                let (identity, labels) = self.agent.identity_of(&r.pod_namespace, &r.pod_name);
                EndpointEntry {
                    container_id: r.container_id.clone(),
                    pod: r.pod(),
                    ip: r.ip.clone(),
                    host_ifname: r.host_ifname.clone(),
                    identity,
                    labels: labels.into_iter().collect(),
                }
            })
            .collect();
        Ok(Response::new(ListEndpointsResponse { endpoints }))
    }

    async fn dump_lb_maps(
        &self,
        _: Request<DumpLbMapsRequest>,
    ) -> Result<Response<DumpLbMapsResponse>, Status> {
        let lb = self.agent.lb.lock().unwrap_or_else(|p| p.into_inner());
        let maps = lb.maps();
        let mut services: Vec<LbServiceRow> = maps
            .services()
            .map_err(internal)?
            .into_iter()
            .map(|(k, v)| LbServiceRow {
                frontend: format!(
                    "{}:{}/{}{}",
                    addr_from_be(k.address),
                    port_from_be(k.dport),
                    crate::lb::Proto::from_number(k.proto)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| k.proto.to_string()),
                    if k.scope == scope::INTERNAL {
                        " (internal)"
                    } else {
                        ""
                    }
                ),
                slot: u32::from(k.backend_slot),
                backend_id: v.backend_id,
                count: u32::from(v.count),
                rev_nat_id: u32::from(v.rev_nat_index),
                flags: u32::from(v.flags),
            })
            .collect();
        services.sort_by(|a, b| (&a.frontend, a.slot).cmp(&(&b.frontend, b.slot)));
        let mut backends: Vec<LbBackendRow> = maps
            .backends()
            .map_err(internal)?
            .into_iter()
            .map(|(id, b)| LbBackendRow {
                id,
                address: format!("{}:{}", addr_from_be(b.address), port_from_be(b.port)),
                flags: u32::from(b.flags),
            })
            .collect();
        backends.sort_by_key(|b| b.id);
        let mut rev_nat: Vec<LbRevNatRow> = maps
            .rev_nats()
            .map_err(internal)?
            .into_iter()
            .map(|(id, r)| LbRevNatRow {
                id: u32::from(id),
                address: format!("{}:{}", addr_from_be(r.address), port_from_be(r.port)),
            })
            .collect();
        rev_nat.sort_by_key(|r| r.id);
        Ok(Response::new(DumpLbMapsResponse {
            services,
            backends,
            rev_nat,
        }))
    }
}

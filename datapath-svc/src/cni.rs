//! The `Cni` gRPC service on the node-local unix socket: the CNI plugin's
//! requests, answered by the agent. A failure carries the CNI error code in
//! the `cni-code` metadata entry so the plugin prints exactly that code.

use std::sync::Arc;

use tonic::{Request, Response, Status, metadata::MetadataValue};
use weft_proto::datapath::v1::{
    CniCheckResponse, CniDelResponse, CniGcRequest, CniGcResponse, CniRequest, CniResult,
    CniStatusRequest, CniStatusResponse, cni_server::Cni,
};

use crate::agent::{Agent, CniFailure};

pub struct CniService {
    agent: Arc<Agent>,
}

impl CniService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn status(f: CniFailure) -> Status {
    let mut s = Status::new(f.grpc, f.message);
    s.metadata_mut().insert(
        weft_cni_contract::CODE_METADATA_KEY,
        MetadataValue::from(f.cni_code),
    );
    s
}

#[tonic::async_trait]
impl Cni for CniService {
    #[tracing::instrument(skip_all, fields(container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn add(&self, request: Request<CniRequest>) -> Result<Response<CniResult>, Status> {
        let req = request.into_inner();
        self.agent.add(&req).await.map(Response::new).map_err(|e| {
            tracing::warn!(error = %e, "CNI ADD failed");
            status(e)
        })
    }

    #[tracing::instrument(skip_all, fields(container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn del(&self, request: Request<CniRequest>) -> Result<Response<CniDelResponse>, Status> {
        let req = request.into_inner();
        self.agent
            .del(&req)
            .await
            .map(|()| Response::new(CniDelResponse {}))
            .map_err(|e| {
                tracing::warn!(error = %e, "CNI DEL failed");
                status(e)
            })
    }

    async fn check(
        &self,
        request: Request<CniRequest>,
    ) -> Result<Response<CniCheckResponse>, Status> {
        let req = request.into_inner();
        self.agent
            .check(&req)
            .await
            .map(|()| Response::new(CniCheckResponse {}))
            .map_err(status)
    }

    async fn status(
        &self,
        _: Request<CniStatusRequest>,
    ) -> Result<Response<CniStatusResponse>, Status> {
        self.agent
            .ready()
            .map(|()| Response::new(CniStatusResponse {}))
            .map_err(status)
    }

    async fn gc(&self, request: Request<CniGcRequest>) -> Result<Response<CniGcResponse>, Status> {
        let req = request.into_inner();
        self.agent
            .gc(&req.valid_attachments)
            .await
            .map(|released| Response::new(CniGcResponse { released }))
            .map_err(status)
    }
}

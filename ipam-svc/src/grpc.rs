//! The `weft.ipam.v1.Ipam` gRPC service.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _, stream};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_proto::ipam::v1::{
    AllocationEvent, GetNodeCidrRequest, ListRequest, ListResponse, NodeAllocation, Synced,
    WatchRequest, allocation_event::Event, ipam_server,
};

use crate::{state::Ipam, store::CidrStore};

pub struct IpamService<S> {
    ipam: Arc<Ipam<S>>,
    /// Ends open `Watch` streams, which would otherwise hold up a graceful
    /// shutdown forever.
    shutdown: CancellationToken,
}

impl<S: CidrStore> IpamService<S> {
    pub fn new(ipam: Arc<Ipam<S>>, shutdown: CancellationToken) -> Self {
        Self { ipam, shutdown }
    }

    pub fn server(self) -> ipam_server::IpamServer<Self> {
        ipam_server::IpamServer::new(self)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<AllocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: CidrStore> ipam_server::Ipam for IpamService<S> {
    async fn get_node_cidr(
        &self,
        request: Request<GetNodeCidrRequest>,
    ) -> Result<Response<NodeAllocation>, Status> {
        let node = request.into_inner().node;
        if node.is_empty() {
            return Err(Status::invalid_argument("node: must not be empty"));
        }
        match self.ipam.get(&node) {
            Some(cidr) => Ok(Response::new(NodeAllocation {
                node,
                cidr: cidr.to_string(),
            })),
            None => Err(Status::not_found(format!(
                "node {node:?} has no pod CIDR (unknown node, or still pending)"
            ))),
        }
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(self.ipam.list()))
    }

    type WatchStream = EventStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let (snapshot, feed) = self.ipam.watch();
        let initial = snapshot
            .into_iter()
            .map(Event::Allocated)
            .chain(std::iter::once(Event::Synced(Synced {})))
            .map(|e| Ok(AllocationEvent { event: Some(e) }));
        let live = BroadcastStream::new(feed).map(|r| match r {
            Ok(event) => Ok(event),
            Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::aborted(format!(
                "watch fell {n} events behind; subscribe again"
            ))),
        });
        let stream = stream::iter(initial)
            .chain(live)
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}

//! The `weft.identity.v1.Identity` gRPC service.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _, stream};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_proto::identity::v1::{
    AllocateRequest, GetRequest, IdentityEvent, ListRequest, ListResponse, ReleaseRequest,
    ReleaseResponse, SecurityIdentity, Synced, WatchRequest, identity_event::Event,
    identity_server,
};

use crate::{
    state::{Identities, IdentityError},
    store::IdentityStore,
    validate,
};

pub struct IdentityService<S> {
    ids: Arc<Identities<S>>,
    /// Ends open `Watch` streams, which would otherwise hold up a graceful
    /// shutdown forever.
    shutdown: CancellationToken,
}

impl<S: IdentityStore> IdentityService<S> {
    pub fn new(ids: Arc<Identities<S>>, shutdown: CancellationToken) -> Self {
        Self { ids, shutdown }
    }

    pub fn server(self) -> identity_server::IdentityServer<Self> {
        identity_server::IdentityServer::new(self)
    }
}

fn status(e: IdentityError) -> Status {
    match e {
        IdentityError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        IdentityError::Failed => Status::unavailable(e.to_string()),
        IdentityError::Contended => Status::aborted(e.to_string()),
        IdentityError::Store(e) => Status::internal(e.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<IdentityEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: IdentityStore> identity_server::Identity for IdentityService<S> {
    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<SecurityIdentity>, Status> {
        let AllocateRequest { labels, owner } = request.into_inner();
        validate::owner(&owner, false).map_err(Status::invalid_argument)?;
        let labels = validate::labels(labels).map_err(Status::invalid_argument)?;
        let owner = (!owner.is_empty()).then_some(owner.as_str());
        let identity = self.ids.allocate(labels, owner).await.map_err(status)?;
        Ok(Response::new(identity))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let owner = request.into_inner().owner;
        validate::owner(&owner, true).map_err(Status::invalid_argument)?;
        let unreferenced = self.ids.release(&owner).await.map_err(status)?;
        Ok(Response::new(ReleaseResponse { unreferenced }))
    }

    async fn get(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<SecurityIdentity>, Status> {
        let id = request.into_inner().id;
        match self.ids.get(id).await.map_err(status)? {
            Some(identity) => Ok(Response::new(identity)),
            None => Err(Status::not_found(format!("identity {id} does not exist"))),
        }
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let identities = self.ids.list().await.map_err(status)?;
        Ok(Response::new(ListResponse { identities }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let (snapshot, feed) = self.ids.watch().await.map_err(status)?;
        let initial = snapshot
            .into_iter()
            .map(Event::Upsert)
            .chain(std::iter::once(Event::Synced(Synced {})))
            .map(|e| Ok(IdentityEvent { event: Some(e) }));
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

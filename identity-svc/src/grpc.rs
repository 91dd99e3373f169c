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
    store::{IdentityStore, StoreError},
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
        IdentityError::Contended => Status::aborted(e.to_string()),
        IdentityError::Vanished => Status::internal(e.to_string()),
        // The store did not answer (in time): worth trying again later.
        IdentityError::Store(e @ StoreError::Api(_)) => Status::unavailable(e.to_string()),
        IdentityError::Store(e) => Status::internal(e.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<IdentityEvent, Status>> + Send>>;

/// Runs a write to its end even when the caller stops waiting. A client's
/// deadline drops the request's future; dropped between the store commit
/// and the publish, a new identity would be in the table and the store but
/// reach no subscriber, and a later call finds it already there. Found on
/// the real cluster: CNI ADD allocates with a one-second deadline, and under
/// load a pod's identity never reached any datapath.
async fn to_completion<T: Send + 'static>(
    write: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(write)
        .await
        .map_err(|e| Status::internal(format!("the write task failed: {e}")))
}

#[tonic::async_trait]
impl<S: IdentityStore> identity_server::Identity for IdentityService<S> {
    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<SecurityIdentity>, Status> {
        let AllocateRequest { labels, owner } = request.into_inner();
        validate::owner(&owner, false).map_err(Status::invalid_argument)?;
        let labels = validate::labels(labels).map_err(Status::invalid_argument)?;
        let ids = self.ids.clone();
        let identity = to_completion(async move {
            let owner = (!owner.is_empty()).then_some(owner.as_str());
            ids.allocate(labels, owner).await
        })
        .await?
        .map_err(status)?;
        Ok(Response::new(identity))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let owner = request.into_inner().owner;
        validate::owner(&owner, true).map_err(Status::invalid_argument)?;
        let ids = self.ids.clone();
        let unreferenced = to_completion(async move { ids.release(&owner).await })
            .await?
            .map_err(status)?;
        Ok(Response::new(ReleaseResponse { unreferenced }))
    }

    async fn get(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<SecurityIdentity>, Status> {
        let id = request.into_inner().id;
        match self.ids.get(id) {
            Some(identity) => Ok(Response::new(identity)),
            None => Err(Status::not_found(format!("identity {id} does not exist"))),
        }
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let identities = self.ids.list();
        Ok(Response::new(ListResponse { identities }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let (snapshot, feed) = self.ids.watch();
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

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use tokio_util::sync::CancellationToken;
    use weft_proto::identity::v1::{
        AllocateRequest, identity_event::Event, identity_server::Identity as _,
    };

    use super::IdentityService;
    use crate::{
        metrics::Metrics,
        state::Identities,
        store::{Committed, IdentityStore, Op, SledIdentityStore, StoreError, Stored},
    };

    /// The sled store, with commits as slow as API calls under load.
    struct Slow(SledIdentityStore);

    impl IdentityStore for Slow {
        async fn load(&self) -> Result<Stored, StoreError> {
            self.0.load().await
        }

        async fn commit(&self, ops: &[Op]) -> Result<Committed, StoreError> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.0.commit(ops).await
        }
    }

    /// A caller whose deadline passes mid-commit (CNI ADD allocates with a
    /// one-second deadline) must not leave the identity unpublished: the
    /// real cluster's netpol specs found a pod whose identity no datapath
    /// ever learned.
    #[tokio::test]
    async fn an_allocation_its_caller_gave_up_on_still_reaches_watchers() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Slow(SledIdentityStore::open(dir.path()).expect("store"));
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let ids = Arc::new(
            Identities::open(store, metrics, Duration::from_secs(60))
                .await
                .expect("identities"),
        );
        let (_, mut events) = ids.watch();
        let service = IdentityService::new(ids.clone(), CancellationToken::new());
        let request = tonic::Request::new(AllocateRequest {
            labels: [("k8s:app".to_string(), "web".to_string())].into(),
            owner: "pod:default/web".into(),
        });
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), service.allocate(request)).await;
        assert!(
            gave_up.is_err(),
            "the commit outlasts the caller's deadline"
        );
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event within the commit's time")
            .expect("event");
        let Some(Event::Upsert(identity)) = event.event else {
            panic!("not an upsert: {event:?}");
        };
        assert_eq!(
            identity.labels.get("k8s:app").map(String::as_str),
            Some("web")
        );
        let allocated = ids.list().into_iter().filter(|i| !i.reserved).count();
        assert_eq!(allocated, 1);
    }
}

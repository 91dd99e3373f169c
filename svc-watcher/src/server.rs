//! The gRPC `weft.watcher.v1.Watcher` service over a [`StateStore`].

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_common::{readiness::Readiness, watch::Packed};
use weft_proto::watcher::v1::{
    ListRequest, ListResponse, StatusRequest, StatusResponse, SubscribeRequest, WatchEvent,
    watcher_server::{Watcher, WatcherServer},
};

use crate::{
    health::WatchHealth,
    metrics::Metrics,
    state::{KindSet, StateStore},
    subscription::{Start, Subscription},
};

/// Serves Subscribe and List from the store. Streams end when `shutdown`
/// fires, so a graceful server stop is not held up by open subscriptions.
#[derive(Debug, Clone)]
pub struct WatcherService {
    store: Arc<StateStore>,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// True once the store holds the complete state; Subscribe and List
    /// wait for it, so a first snapshot is always the whole cluster.
    listed: watch::Receiver<bool>,
    /// What `Status` reports, with the bound of `--watch-unready-after`.
    health: Option<(WatchHealth, Duration)>,
}

impl WatcherService {
    /// A service over a store that holds the complete state already.
    pub fn new(store: Arc<StateStore>, metrics: Metrics, shutdown: CancellationToken) -> Self {
        Self {
            store,
            metrics,
            shutdown,
            listed: watch::channel(true).1,
            health: None,
        }
    }

    /// Serves before the store is complete: Subscribe and List wait until
    /// `listed` turns true (the health service answers meanwhile).
    pub fn until_listed(mut self, listed: watch::Receiver<bool>) -> Self {
        self.listed = listed;
        self
    }

    /// `Status` reports `health` (broken beyond `bound` is not ready).
    pub fn with_health(mut self, health: WatchHealth, bound: Duration) -> Self {
        self.health = Some((health, bound));
        self
    }

    async fn wait_listed(&self) -> Result<(), Status> {
        let mut listed = self.listed.clone();
        tokio::select! {
            r = listed.wait_for(|l| *l) => r.map(|_| ()).map_err(|_| {
                Status::unavailable("the cluster state source stopped before reading the state")
            }),
            _ = self.shutdown.cancelled() => Err(Status::unavailable("shutting down")),
        }
    }

    /// The tonic service, ready for `GrpcServer::add_service`. Snapshots of
    /// a large cluster are many small messages, so the default limits hold.
    pub fn into_server(self) -> WatcherServer<Self> {
        WatcherServer::new(self)
    }
}

/// Keeps `weft_watcher_subscribers` right however a stream ends.
struct SubscriberGuard {
    metrics: Metrics,
    subscriber: String,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics.subscriber_removed();
        tracing::info!(subscriber = %self.subscriber, "subscriber left");
    }
}

fn kinds(raw: &[i32]) -> Result<KindSet, Status> {
    KindSet::from_request(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Watcher for WatcherService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        let kinds = kinds(&req.kinds)?;
        self.wait_listed().await?;
        let subscriber = if req.subscriber.is_empty() {
            "unnamed".to_string()
        } else {
            req.subscriber
        };
        let sub = Subscription::start(self.store.clone(), kinds, &req.epoch, req.since_revision);
        tracing::info!(
            subscriber = %subscriber,
            resumed = sub.started() == Start::Resumed,
            since_revision = req.since_revision,
            revision = sub.position(),
            "subscriber joined"
        );
        self.metrics.subscriber_added();
        let guard = SubscriberGuard {
            metrics: self.metrics.clone(),
            subscriber,
        };
        let shutdown = self.shutdown.clone();
        let stream = futures::stream::unfold(
            (sub, guard, shutdown),
            |(mut sub, guard, shutdown)| async move {
                let event = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => None,
                    event = sub.next() => event,
                };
                event.map(|e| (Ok(e), (sub, guard, shutdown)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let kinds = kinds(&request.into_inner().kinds)?;
        self.wait_listed().await?;
        let snapshot = self.store.snapshot(kinds);
        Ok(Response::new(ListResponse {
            epoch: self.store.epoch().to_string(),
            revision: snapshot.revision,
            resources: snapshot.objects.iter().map(Packed::unpack).collect(),
        }))
    }

    /// Answers at once, before the first complete list too.
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let readiness = match &self.health {
            Some((health, bound)) => health.current(*bound),
            None if *self.listed.borrow() => Readiness::Ready,
            None => Readiness::NotReady(crate::health::WAITING.to_string()),
        };
        Ok(Response::new(StatusResponse {
            ready: readiness.is_ready(),
            reason: readiness.reason().to_string(),
            epoch: self.store.epoch().to_string(),
            revision: self.store.revision(),
        }))
    }
}

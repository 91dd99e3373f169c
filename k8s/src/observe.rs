//! What every request of a client met, seen from its HTTP layer.
//!
//! kube-runtime's watcher says nothing when it resumes a watch: after an
//! outage the new watch request is answered, but no event follows until an
//! object changes. An [`Observer`] on the client hears that answer (and
//! every other one, and every failure to get one), so a service can tell
//! the moment the API is back without waiting for a change.

use std::{future::Future, pin::Pin, sync::Arc};

use http::{Method, Request, Response, StatusCode, Uri};
use tower::{BoxError, Layer, Service};

/// What one request met.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The server answered (the status line; for a watch, its start).
    Answered(StatusCode),
    /// No answer: refused, reset, timed out.
    Failed(&'a (dyn std::error::Error + Send + Sync)),
}

type Callback = dyn Fn(&Method, &Uri, Outcome<'_>) + Send + Sync;

/// Called with the outcome of every request a client sends.
#[derive(Clone)]
pub struct Observer(Arc<Callback>);

impl Observer {
    pub fn new(f: impl Fn(&Method, &Uri, Outcome<'_>) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    fn observe(&self, method: &Method, uri: &Uri, outcome: Outcome<'_>) {
        (self.0)(method, uri, outcome);
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// The tower layer that puts an [`Observer`] on a client's stack.
#[derive(Debug, Clone)]
pub(crate) struct ObserveLayer(pub(crate) Observer);

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    observer: Observer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = BoxError>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<RB>, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let observer = self.observer.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            match &result {
                Ok(response) => {
                    observer.observe(&method, &uri, Outcome::Answered(response.status()))
                }
                Err(e) => observer.observe(&method, &uri, Outcome::Failed(e.as_ref())),
            }
            result
        })
    }
}

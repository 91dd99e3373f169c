//! gRPC to datapath-svc's `Cni` service over the node-local unix socket.
//!
//! Every call is bounded: connecting and the call together must finish
//! within the timeout, and the deadline is also sent as `grpc-timeout` so
//! datapath-svc can give up on work nobody waits for. A plugin that hangs
//! holds up the pod sandbox and the runtime's per-pod lock, so failing fast
//! with "try again later" is the better answer.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tonic::{
    Code, Request, Response, Status,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint, Uri},
};
use weft_proto::datapath::v1::{
    CniAttachment, CniGcRequest, CniRequest, CniResult, CniStatusRequest, cni_client::CniClient,
};

/// Why a call to datapath-svc produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing accepted the connection: the socket is missing, stale, or
    /// not ours to open.
    #[error("datapath-svc is unreachable at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
    /// No answer within the bound.
    #[error("datapath-svc at {path} did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    /// datapath-svc answered with an error.
    #[error("datapath-svc answered {}: {}", .0.code(), .0.message())]
    Status(Status),
}

impl CallError {
    /// Whether datapath-svc was not there to do the work (as opposed to
    /// having refused it): the cases where retrying later can succeed.
    /// Cancelled counts: the plugin never cancels, so it means the server
    /// enforced the `grpc-timeout` this client sent.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Status(s) => matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ),
        }
    }
}

/// A client for one plugin invocation.
#[derive(Debug, Clone)]
pub struct DatapathClient {
    socket: PathBuf,
    timeout: Duration,
    traceparent: Option<AsciiMetadataValue>,
}

impl DatapathClient {
    /// `traceparent` is a W3C trace context passed on as gRPC metadata; one
    /// that is not valid ASCII metadata is dropped.
    pub fn new(socket: &Path, timeout: Duration, traceparent: Option<&str>) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout,
            traceparent: traceparent.and_then(|t| t.parse().ok()),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn add(&self, req: CniRequest) -> Result<CniResult, CallError> {
        self.call(req, |mut c, r| async move { c.add(r).await })
            .await
    }

    pub async fn del(&self, req: CniRequest) -> Result<(), CallError> {
        self.call(req, |mut c, r| async move { c.del(r).await })
            .await
            .map(drop)
    }

    pub async fn check(&self, req: CniRequest) -> Result<(), CallError> {
        self.call(req, |mut c, r| async move { c.check(r).await })
            .await
            .map(drop)
    }

    pub async fn status(&self) -> Result<(), CallError> {
        self.call(
            CniStatusRequest {},
            |mut c, r| async move { c.status(r).await },
        )
        .await
        .map(drop)
    }

    /// Returns the attachments datapath-svc released.
    pub async fn gc(&self, valid: Vec<CniAttachment>) -> Result<Vec<CniAttachment>, CallError> {
        let req = CniGcRequest {
            valid_attachments: valid,
        };
        self.call(req, |mut c, r| async move { c.gc(r).await })
            .await
            .map(|r| r.released)
    }

    async fn call<Req, Resp, F, Fut>(&self, message: Req, f: F) -> Result<Resp, CallError>
    where
        F: FnOnce(CniClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let work = async {
            let channel = self.connect().await?;
            let mut request = Request::new(message);
            request.set_timeout(self.timeout);
            if let Some(tp) = &self.traceparent {
                request.metadata_mut().insert("traceparent", tp.clone());
            }
            f(CniClient::new(channel), request)
                .await
                .map(Response::into_inner)
                .map_err(CallError::Status)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout {
                path: self.socket.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn connect(&self) -> Result<Channel, CallError> {
        let path = self.socket.clone();
        // The URI is required by the API but unused: the connector dials the socket.
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|e| CallError::Unreachable {
                path: self.socket.clone(),
                reason: error_chain(&e),
            })
    }
}

/// The error and its causes on one line: tonic's own message ("transport
/// error") says nothing without the source.
fn error_chain(err: &dyn std::error::Error) -> String {
    let (mut text, mut source) = match err.source() {
        Some(cause) if err.to_string() == "transport error" => (cause.to_string(), cause.source()),
        _ => (err.to_string(), err.source()),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_is_unreachable_and_fast() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client =
            DatapathClient::new(&dir.path().join("none.sock"), Duration::from_secs(5), None);
        let started = std::time::Instant::now();
        let err = client.status().await.expect_err("must be refused");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.is_unavailable());
        let text = err.to_string();
        assert!(text.contains("none.sock"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn invalid_traceparent_is_dropped() {
        let client =
            DatapathClient::new(Path::new("/x"), Duration::from_secs(1), Some("bad\nvalue"));
        assert!(client.traceparent.is_none());
        let client = DatapathClient::new(
            Path::new("/x"),
            Duration::from_secs(1),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert!(client.traceparent.is_some());
    }

    #[test]
    fn refused_requests_are_not_unavailable() {
        assert!(!CallError::Status(Status::invalid_argument("x")).is_unavailable());
        assert!(CallError::Status(Status::unavailable("x")).is_unavailable());
    }
}

//! Whether a service can do its job right now, and the gRPC health service
//! saying so.
//!
//! A service that depends on something outside itself (svc-watcher on its
//! watch of the Kubernetes API, ipam-svc and identity-svc on their store in
//! it) keeps a [`Readiness`] up to date; [`serve_tcp`] serves it through the
//! standard health service as the service's own status and the server's
//! overall one (`""`), so `grpcurl`, `weftctl status` and a Kubernetes
//! readiness probe all see the same truth. Reads a service answers from
//! memory keep working while it is not ready: readiness says whether its
//! view and its writes are current, not whether the process is alive.

use std::fmt;

use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::grpc::GrpcServer;

/// Ready, or not and why (for people: logs and `weftctl status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }

    /// Why not ready; empty when ready.
    pub fn reason(&self) -> &str {
        match self {
            Readiness::Ready => "",
            Readiness::NotReady(why) => why,
        }
    }

    fn status(&self) -> ServingStatus {
        match self {
            Readiness::Ready => ServingStatus::Serving,
            Readiness::NotReady(_) => ServingStatus::NotServing,
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Ready => f.write_str("ready"),
            Readiness::NotReady(why) => write!(f, "not ready: {why}"),
        }
    }
}

/// A service that is ready from the start, with nothing outside it to
/// wait for (the sled stores).
pub fn always_ready() -> watch::Receiver<Readiness> {
    watch::channel(Readiness::Ready).1
}

/// Serves `server` on `listener` until `shutdown`, with the health of
/// `service` (its gRPC name) and of `""` following `readiness`.
///
/// [`GrpcServer::serve_tcp`] marks every service SERVING as it starts, on
/// its first poll, before it reads any connection; the readiness is applied
/// right after that poll, so a check that arrives early sees the truth and
/// not that blanket SERVING. After shutdown nothing is applied any more:
/// the server's own NOT_SERVING stands.
pub async fn serve_tcp(
    server: GrpcServer,
    listener: TcpListener,
    service: &'static str,
    mut readiness: watch::Receiver<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let health = server.health();
    let serve = server.serve_tcp(listener, shutdown.clone());
    let mut serve = std::pin::pin!(serve);
    if let std::task::Poll::Ready(r) = futures::poll!(serve.as_mut()) {
        return r;
    }
    let mut applied = None;
    loop {
        let now = readiness.borrow_and_update().clone();
        if applied.as_ref() != Some(&now) && !shutdown.is_cancelled() {
            apply(&health, service, &now, applied.as_ref()).await;
            applied = Some(now);
        }
        tokio::select! {
            r = serve.as_mut() => return r,
            changed = readiness.changed(), if !shutdown.is_cancelled() => {
                if changed.is_err() {
                    // Nobody updates it any more: what was last said stands.
                    return serve.await;
                }
            }
        }
    }
}

async fn apply(
    health: &HealthReporter,
    service: &'static str,
    now: &Readiness,
    before: Option<&Readiness>,
) {
    match (before, now) {
        (Some(_), Readiness::Ready) => tracing::info!(service, "ready again: SERVING"),
        (_, Readiness::NotReady(why)) => {
            tracing::warn!(service, reason = %why, "not ready: NOT_SERVING");
        }
        (None, Readiness::Ready) => {}
    }
    health.set_service_status("", now.status()).await;
    health.set_service_status(service, now.status()).await;
}

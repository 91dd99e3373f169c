//! The health endpoints load balancers and monitoring expect of a
//! kube-proxy, served the way kube-proxy serves them.
//!
//! - Per Service: a LoadBalancer Service with `externalTrafficPolicy:
//!   Local` has a `healthCheckNodePort`; on it every node answers any path
//!   with 200 and `{"service": {...}, "localEndpoints": N}` when it has N > 0
//!   ready endpoints of the Service, 503 otherwise, so the cloud load
//!   balancer sends traffic only to nodes that can serve it locally.
//!   Terminating endpoints do not count: the node should be drained.
//! - Per node (`--healthz-listen`, kube-proxy's `:10256`): `/healthz` and
//!   `/livez` answer 200 while the datapath is programmed and recent: the
//!   cluster state has been applied, and no change has waited longer than a
//!   minute to be.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio_util::sync::CancellationToken;

/// A Service's health check on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

struct Served {
    port: u16,
    namespace: String,
    name: String,
    local: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// The health-check listeners of every Service that has one, by
/// `namespace/name`.
pub struct HealthChecks {
    served: Mutex<BTreeMap<String, Served>>,
    shutdown: CancellationToken,
}

impl HealthChecks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            served: Mutex::new(BTreeMap::new()),
            shutdown,
        }
    }

    /// Sets the health check of Service `key` (`namespace/name`): listens
    /// on a new port, follows a changed count, stops listening for `None`.
    pub fn set(&self, key: &str, check: Option<HealthCheck>) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        match (served.get(key), check) {
            (Some(s), Some(c)) if s.port == c.port => {
                s.local.store(c.local_endpoints, Ordering::Relaxed);
            }
            (_, Some(c)) => {
                if let Some(old) = served.remove(key) {
                    old.stop.cancel();
                }
                if let Some(s) = self.listen(c) {
                    served.insert(key.to_string(), s);
                }
            }
            (Some(_), None) => {
                if let Some(old) = served.remove(key) {
                    old.stop.cancel();
                }
            }
            (None, None) => {}
        }
    }

    /// Stops the health checks of Services `keep` does not name.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.retain(|k, s| {
            let kept = keep(k);
            if !kept {
                s.stop.cancel();
            }
            kept
        });
    }

    /// The ports served, for status and tests.
    pub fn ports(&self) -> Vec<u16> {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.values().map(|s| s.port).collect()
    }

    fn listen(&self, c: HealthCheck) -> Option<Served> {
        let addr = SocketAddr::from(([0, 0, 0, 0], c.port));
        let listener = match std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(service = %format!("{}/{}", c.namespace, c.name), port = c.port, error = %e, "cannot serve the health check node port");
                return None;
            }
        };
        let served = Served {
            port: c.port,
            namespace: c.namespace,
            name: c.name,
            local: Arc::new(AtomicUsize::new(c.local_endpoints)),
            stop: self.shutdown.child_token(),
        };
        let state = ServiceState {
            namespace: served.namespace.clone(),
            name: served.name.clone(),
            local: served.local.clone(),
        };
        let app = Router::new()
            .fallback(service_health)
            .with_state(Arc::new(state));
        let stop = served.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        tracing::info!(service = %format!("{}/{}", served.namespace, served.name), port = served.port, "serving the health check node port");
        Some(served)
    }
}

struct ServiceState {
    namespace: String,
    name: String,
    local: Arc<AtomicUsize>,
}

async fn service_health(State(s): State<Arc<ServiceState>>) -> Response {
    let local = s.local.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "service": {"namespace": s.namespace, "name": s.name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    });
    let code = if local > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (code, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(weight) = HeaderValue::from_str(&local.to_string()) {
        headers.insert("X-Load-Balancing-Endpoint-Weight", weight);
    }
    response
}

/// How long a change may wait to be applied before the node is unhealthy.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Whether the node's datapath is programmed and recent.
#[derive(Default)]
pub struct NodeHealth {
    state: Mutex<NodeState>,
}

#[derive(Default)]
struct NodeState {
    /// When the maps last matched the cluster state.
    last_updated: Option<SystemTime>,
    /// Since when a change has waited to be applied.
    queued: Option<Instant>,
}

impl NodeHealth {
    /// A change arrived and is about to be applied.
    pub fn queued(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.queued.get_or_insert_with(Instant::now);
    }

    /// The maps match the cluster state again.
    pub fn updated(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.last_updated = Some(SystemTime::now());
        s.queued = None;
    }

    fn report(&self) -> (bool, serde_json::Value) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let healthy =
            s.last_updated.is_some() && s.queued.is_none_or(|q| q.elapsed() < STALE_AFTER);
        let rfc3339 = |t: SystemTime| {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let body = serde_json::json!({
            "lastUpdated": s.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(SystemTime::now()),
            "nodeEligible": true,
        });
        (healthy, body)
    }

    /// Serves `/healthz` and `/livez` on `addr` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--healthz-listen {addr}: {e}"))?;
        let app = Router::new()
            .route("/healthz", axum::routing::get(node_health))
            .route("/livez", axum::routing::get(node_health))
            .with_state(self);
        tracing::info!(%addr, "serving node health (/healthz, /livez)");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        Ok(())
    }
}

async fn node_health(State(h): State<Arc<NodeHealth>>) -> Response {
    let (healthy, body) = h.report();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (code, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

//! The Prometheus `/metrics` endpoint.
//!
//! Each service builds its metric families into a `prometheus_client`
//! registry at start-up and hands the registry to [`serve`].

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio_util::sync::CancellationToken;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` (and `GET /healthz`) until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    serve_on(listener, registry, shutdown).await
}

/// Like [`serve`], on a listener the caller already bound.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { render(&registry) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

fn render(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Starts the metrics server in the background when an address is set.
pub fn spawn(
    addr: Option<SocketAddr>,
    registry: Registry,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = addr?;
    let registry = Arc::new(registry);
    Some(tokio::spawn(async move {
        if let Err(e) = serve(addr, registry, shutdown).await {
            tracing::error!(%addr, error = %e, "metrics server failed");
        }
    }))
}

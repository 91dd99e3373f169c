//! gRPC server set-up shared by every service: the standard health service,
//! reflection (v1 and v1alpha, so both current grpcurl and grpcurl 1.8
//! work), a span per request that continues the caller's trace
//! ([`crate::trace::server_span`]), graceful shutdown on TCP or on a unix
//! socket, and mutual TLS on TCP when configured ([`crate::tls`]).

use std::{convert::Infallible, net::SocketAddr, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::Context as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::Server,
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::tls::TlsConfig;

/// The standard health service's name, served by every listener.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The set of gRPC services one listener serves, plus health and reflection.
pub struct GrpcServer {
    routes: RoutesBuilder,
    health: HealthReporter,
    names: Vec<&'static str>,
    tls: Option<TlsConfig>,
}

impl GrpcServer {
    pub fn new() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            routes,
            health,
            names: Vec::new(),
            tls: None,
        }
    }

    /// Serves TCP over mutual TLS (`Some`): clients must present a
    /// certificate from the CA, and plaintext is refused. A unix socket is
    /// served without TLS either way.
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Adds a service; it reports SERVING through the health service once the
    /// server listens.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health reporter, for services that go NOT_SERVING on their own.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    async fn mark(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        for name in &self.names {
            self.health.set_service_status(*name, status).await;
        }
    }

    /// The routes with reflection added, describing exactly the services
    /// this listener serves (and health), not every weft API: a client
    /// that lists services here can call each of them.
    fn into_parts(mut self) -> (Routes, HealthReporter, Vec<&'static str>) {
        let names = || {
            self.names
                .iter()
                .copied()
                .chain([HEALTH_SERVICE, "grpc.reflection.v1.ServerReflection"])
        };
        let configure = || {
            names().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(name),
            )
        };
        let reflection_v1 = configure()
            .build_v1()
            .expect("the descriptor sets are compiled in and valid");
        let reflection_v1alpha = configure()
            .build_v1alpha()
            .expect("the descriptor sets are compiled in and valid");
        self.routes.add_service(reflection_v1);
        self.routes.add_service(reflection_v1alpha);
        (self.routes.routes(), self.health, self.names)
    }

    fn tcp_builder(&self) -> anyhow::Result<Server> {
        let builder = Server::builder();
        match &self.tls {
            Some(tls) => builder
                .tls_config(tls.server())
                .context("TLS configuration (--tls-cert, --tls-key, --tls-ca)"),
            None => Ok(builder),
        }
    }

    /// Serves on a TCP listener the caller bound, until `shutdown` fires.
    pub async fn serve_tcp(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let builder = self.tcp_builder()?;
        self.mark(ServingStatus::Serving).await;
        tracing::info!(%addr, services = ?self.names, tls = self.tls.is_some(), "gRPC listening");
        let (routes, health, names) = self.into_parts();
        let result = builder
            .trace_fn(crate::trace::server_span)
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
                let health = health.clone();
                async move {
                    shutdown.cancelled().await;
                    mark_all(&health, &names, ServingStatus::NotServing).await;
                }
            })
            .await;
        result.with_context(|| format!("gRPC server on {addr}"))
    }

    /// Binds `addr` and serves on it until `shutdown` fires.
    pub async fn serve_addr(
        self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gRPC address {addr}"))?;
        self.serve_tcp(listener, shutdown).await
    }

    /// Serves on a unix socket at `path` that only root (the owner) can
    /// connect to; a stale socket file from an earlier run is replaced.
    pub async fn serve_unix(self, path: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
        let listener = bind_private_unix(path)?;
        self.mark(ServingStatus::Serving).await;
        tracing::info!(path = %path.display(), services = ?self.names, "gRPC listening on unix socket");
        let (routes, health, names) = self.into_parts();
        let result = Server::builder()
            .trace_fn(crate::trace::server_span)
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), {
                let health = health.clone();
                async move {
                    shutdown.cancelled().await;
                    mark_all(&health, &names, ServingStatus::NotServing).await;
                }
            })
            .await;
        let _ = std::fs::remove_file(path);
        result.with_context(|| format!("gRPC server on {}", path.display()))
    }
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

async fn mark_all(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// Binds a unix socket readable and writable by its owner only. The
/// directory is created 0700 when missing, so there is no window in which
/// another user could connect.
pub fn bind_private_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    // Restrict the mode at creation: bind honours the umask.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

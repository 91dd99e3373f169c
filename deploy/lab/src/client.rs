//! Reaching the lab from outside it: gRPC channels and sockets opened inside
//! a lab namespace, from a process (the test, the CLI) that lives in another.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use weft_common::netns;

/// A TCP connection made from inside the namespace at `ns`.
pub async fn connect_in(
    ns: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let ns = ns.to_path_buf();
    let std_stream = tokio::task::spawn_blocking(move || {
        netns::run_in(&ns, move || {
            let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    tokio::net::TcpStream::from_std(std_stream)
}

/// A gRPC channel to `addr` as seen from inside namespace `ns`.
pub fn channel_in(ns: PathBuf, addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .context("endpoint")?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let ns = ns.clone();
            async move {
                connect_in(&ns, addr, Duration::from_secs(2))
                    .await
                    .map(TokioIo::new)
            }
        })),
    )
}

/// Whether the gRPC server behind `channel` reports SERVING.
pub async fn is_serving(channel: Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    matches!(
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

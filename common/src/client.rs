//! gRPC client channels to other weft services, over TCP or a unix socket.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::tls::TlsConfig;

/// How long a connection attempt may take before the call fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel that connects on first use and reconnects after failures, so a
/// service can start before the services it talks to.
///
/// `target` is `http://host:port`, `host:port`, or `unix:///path/to.sock`.
pub fn lazy_channel(target: &str) -> anyhow::Result<Channel> {
    lazy_channel_tls(target, None)
}

/// [`lazy_channel`], over mutual TLS when `tls` is given (TCP targets only:
/// a unix socket is protected by its file mode). `http://` targets are
/// dialled as `https://` then.
pub fn lazy_channel_tls(target: &str, tls: Option<&TlsConfig>) -> anyhow::Result<Channel> {
    if let Some(path) = target.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://[::1]:50051").connect_timeout(CONNECT_TIMEOUT);
        return Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            })),
        );
    }
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"));
    let uri = match (rest, tls) {
        (Some(rest), Some(_)) => format!("https://{rest}"),
        (Some(_), None) => target.to_string(),
        (None, _) if target.contains("://") => target.to_string(),
        (None, Some(_)) => format!("https://{target}"),
        (None, None) => format!("http://{target}"),
    };
    let mut endpoint =
        Endpoint::from_shared(uri).with_context(|| format!("{target:?} is not a gRPC endpoint"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .with_context(|| format!("TLS for {target:?}"))?;
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

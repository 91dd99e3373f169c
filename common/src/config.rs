//! Flags every long-running service takes, each with an environment fallback.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::tls::{TlsConfig, TlsError};

/// Flags shared by every service; flatten into the service's own `Args`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address of the Prometheus `/metrics` endpoint; empty disables it.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "")]
    pub metrics_listen: String,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log filter in `tracing` syntax, e.g. `info` or `info,datapath_svc=debug`.
    #[arg(long, env = "WEFT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// OTLP/gRPC endpoint to export traces to, e.g. `http://collector:4317`;
    /// empty disables tracing export.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT", default_value = "")]
    pub otlp_endpoint: String,

    /// PEM certificate (chain) this service presents, to its callers and to
    /// the services it calls. With --tls-key and --tls-ca it turns on mutual
    /// TLS for every gRPC listener and client over TCP.
    #[arg(long, env = "WEFT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: peers (clients and servers alike) must present a
    /// certificate from it.
    #[arg(long, env = "WEFT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The name expected in servers' certificates, when it is not the host
    /// dialled (services reached by address, certificates with DNS names).
    #[arg(long, env = "WEFT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Validate the flags and exit without starting.
    #[arg(long)]
    pub check_config: bool,
}

impl CommonArgs {
    /// The metrics address, if one is configured.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        parse_optional_addr("--metrics-listen", &self.metrics_listen)
    }

    /// The mTLS material, read from the files the flags name; `None` when
    /// no TLS flag is set (plaintext).
    pub fn tls(&self) -> Result<Option<TlsConfig>, TlsError> {
        Ok(TlsConfig::load(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
        )?
        .map(|t| t.with_server_name(self.tls_server_name.clone())))
    }
}

/// Parses an optional `host:port`, naming the flag in the error.
pub fn parse_optional_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| {
        anyhow::anyhow!("{flag}: {value:?} is not an address of the form ip:port: {e}")
    })
}

/// Parses `900`, `900s`, `15m`, `1h30m`, `1h 30m`, `250ms`, `1d`: a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("{s:?} is not a duration such as 90, 90s, 15m, 1h30m or 500ms");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(n.checked_mul(86400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        total = total.checked_add(unit).ok_or_else(bad)?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("900", 900_000),
            ("90s", 90_000),
            ("15m", 900_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("250ms", 250),
            ("1d", 86_400_000),
            ("0", 0),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for s in ["", "m", "15x", "1.5h", "-3s", "s15"] {
            assert!(parse_duration(s).is_err(), "{s} accepted");
        }
    }
}

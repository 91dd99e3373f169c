//! Connections to weft's services, with errors that name the service and
//! the address, because "transport error" alone tells an operator nothing.

use std::time::Duration;

use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{service} address {address:?} is not a valid URL: {reason}")]
    BadAddress {
        service: &'static str,
        address: String,
        reason: String,
    },
    #[error("cannot reach {service} at {address}: {reason}")]
    Unreachable {
        service: &'static str,
        address: String,
        reason: String,
    },
    #[error("{service} at {address} answered {}: {}", .status.code(), .status.message())]
    Call {
        service: &'static str,
        address: String,
        status: Status,
    },
}

/// One service's address and the bound on each call to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub service: &'static str,
    pub address: String,
    pub timeout: Duration,
    /// Mutual TLS, when the services require it.
    pub tls: Option<weft_common::tls::TlsConfig>,
}

impl Target {
    pub fn new(service: &'static str, address: &str, timeout: Duration) -> Self {
        Self {
            service,
            address: address.to_string(),
            timeout,
            tls: None,
        }
    }

    /// Connects over mutual TLS with `tls` (`http://` addresses are then
    /// dialled as `https://`).
    pub fn with_tls(mut self, tls: Option<weft_common::tls::TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Connects now (not lazily), so an unreachable service is reported as
    /// such rather than as a failed call.
    pub async fn connect(&self) -> Result<Channel, CtlError> {
        let rest = self.address.split_once("://").map(|(_, rest)| rest);
        let uri = match (rest, &self.tls) {
            (Some(rest), Some(_)) => format!("https://{rest}"),
            (Some(_), None) => self.address.clone(),
            (None, Some(_)) => format!("https://{}", self.address),
            (None, None) => format!("http://{}", self.address),
        };
        let bad = |reason: String| CtlError::BadAddress {
            service: self.service,
            address: self.address.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client())
                .map_err(|e| bad(error_chain(&e)))?;
        }
        let endpoint = endpoint.connect_timeout(self.timeout).timeout(self.timeout);
        match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(self.unreachable(error_chain(&e))),
            Err(_) => Err(self.unreachable(format!("no connection within {:?}", self.timeout))),
        }
    }

    /// Wraps a call's result, bounding it by the timeout.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CtlError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CtlError::Call {
                service: self.service,
                address: self.address.clone(),
                status,
            }),
            Err(_) => Err(self.unreachable(format!("no answer within {:?}", self.timeout))),
        }
    }

    fn unreachable(&self, reason: String) -> CtlError {
        CtlError::Unreachable {
            service: self.service,
            address: self.address.clone(),
            reason,
        }
    }
}

/// The error and its causes on one line, without repeats.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    // tonic's top-level "transport error" adds nothing to its cause.
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

/// Parses `--timeout`: `5s`, `500ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, scale) = if let Some(n) = raw.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = raw.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = raw.strip_suffix('m') {
        (n, 60.0)
    } else {
        (raw, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 5s, 500ms or 2m"))?;
    let seconds = value * scale;
    if !(seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!("{raw:?} must be above 0 and at most an hour"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "0", "-1s", "abc", "5h", "7200"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn unreachable_names_service_and_address() {
        // Bind and drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let address = format!("http://127.0.0.1:{port}");
        let target = Target::new("ipam-svc", &address, Duration::from_secs(2));
        let err = target.connect().await.expect_err("nothing listens");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot reach ipam-svc at {address}")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[tokio::test]
    async fn bad_address_is_reported() {
        let target = Target::new("datapath-svc", "http://[bad", Duration::from_secs(1));
        assert!(matches!(
            target.connect().await,
            Err(CtlError::BadAddress { .. })
        ));
    }
}

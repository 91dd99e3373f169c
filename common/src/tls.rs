//! Mutual TLS for the gRPC between weft's services (rustls, ring).
//!
//! One set of files serves both ends: every service presents its
//! certificate (`--tls-cert`, `--tls-key`) to the services it calls and to
//! its own callers, and trusts exactly one CA (`--tls-ca`) for both: a
//! server refuses a client without a certificate from that CA, and a
//! client refuses a server without one. The helm chart mounts a
//! `kubernetes.io/tls` Secret with a `ca.crt` (cert-manager's shape) at
//! `/etc/weft/tls` and points the three flags at it.
//!
//! Only TCP listeners and TCP clients use it: the node-local CNI socket is
//! protected by its file mode (root only) instead.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why the TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag}: reading {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag}: {path} holds no PEM {what}")]
    NotPem {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error(
        "--tls-cert, --tls-key and --tls-ca go together: {missing} is missing (set all three for mTLS, or none)"
    )]
    Incomplete { missing: &'static str },
}

/// Loaded TLS material: this service's certificate and key, and the CA
/// that every peer's certificate must chain to.
#[derive(Clone)]
pub struct TlsConfig {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TlsError::NotPem {
            flag,
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(bytes)
}

impl TlsConfig {
    /// TLS from PEM bytes: a certificate chain, its private key, and the CA
    /// bundle peers are verified against.
    pub fn from_pem(
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
        ca: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            server_name: None,
        }
    }

    /// Reads the three files; all or none must be given (an empty path
    /// counts as not given). `None` means plaintext.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        fn given(p: Option<&Path>) -> Option<&Path> {
            p.filter(|p| !p.as_os_str().is_empty())
        }
        match (given(cert), given(key), given(ca)) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self::from_pem(
                read("--tls-cert", cert, "certificate")?,
                read("--tls-key", key, "private key")?,
                read("--tls-ca", ca, "CA certificate")?,
            ))),
            (None, _, _) => Err(TlsError::Incomplete {
                missing: "--tls-cert",
            }),
            (_, None, _) => Err(TlsError::Incomplete {
                missing: "--tls-key",
            }),
            (_, _, None) => Err(TlsError::Incomplete {
                missing: "--tls-ca",
            }),
        }
    }

    /// The name clients expect in servers' certificates, instead of the
    /// host they dial (for clusters that reach services by address while
    /// the certificates carry DNS names).
    pub fn with_server_name(mut self, name: Option<String>) -> Self {
        self.server_name = name.filter(|n| !n.is_empty());
        self
    }

    /// A server that presents our certificate and requires a client
    /// certificate from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// A client that presents our certificate and accepts only servers
    /// with a certificate from the CA.
    pub fn client(&self) -> ClientTlsConfig {
        let c = ClientTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .ca_certificate(Certificate::from_pem(&self.ca));
        match &self.server_name {
            Some(name) => c.domain_name(name.clone()),
            None => c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_files_or_none() {
        assert!(matches!(TlsConfig::load(None, None, None), Ok(None)));
        let empty = Path::new("");
        assert!(matches!(
            TlsConfig::load(Some(empty), Some(empty), None),
            Ok(None)
        ));
        let e = TlsConfig::load(Some(Path::new("/c")), None, Some(Path::new("/a")))
            .expect_err("key missing");
        assert!(e.to_string().contains("--tls-key is missing"), "{e}");
        let e = TlsConfig::load(
            Some(Path::new("/nonexistent/c")),
            Some(Path::new("/k")),
            Some(Path::new("/a")),
        )
        .expect_err("unreadable");
        assert!(e.to_string().starts_with("--tls-cert: reading"), "{e}");
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a certificate").expect("write");
        let e = TlsConfig::load(Some(&junk), Some(&junk), Some(&junk)).expect_err("not PEM");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}

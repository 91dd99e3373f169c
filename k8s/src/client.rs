//! Connecting to the API server: an explicit kubeconfig, or whatever
//! `kube::Config::infer` finds (`$KUBECONFIG`, `~/.kube/config`, then the
//! in-cluster service account).
//!
//! The client has no retry layer of its own: kube's default one retries
//! 429, 503 and 504 up to fifteen times with a back-off growing towards
//! minutes, under any deadline weft sets. Found in an outage test: one
//! identity allocation stayed 95 s inside the client. Retries are
//! [`crate::retry`]'s, within a budget, and watches back off as
//! [`crate::retry::backed_off`] says.

use std::path::Path;

use kube::{
    Client, Config,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::observe::{ObserveLayer, Observer};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration found (no kubeconfig, not in a cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster of `kubeconfig` (its current context), or of
/// the inferred configuration when `None`; `observer` hears the outcome of
/// every request.
pub async fn connect(
    kubeconfig: Option<&Path>,
    observer: Option<Observer>,
) -> Result<Client, ConnectError> {
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| ConnectError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(wrap)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => Config::infer().await?,
    };
    Ok(client(config, observer)?)
}

/// A client for `config`, without kube's retry layer (see the module doc).
pub fn client(mut config: Config, observer: Option<Observer>) -> Result<Client, kube::Error> {
    config.default_retry = false;
    tracing::info!(server = %config.cluster_url, "Kubernetes API configured");
    let builder = ClientBuilder::try_from(config)?;
    Ok(match observer {
        Some(o) => builder.with_layer(&ObserveLayer(o)).build(),
        None => builder.build(),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::{Api, api::ListParams};
    use weft_fake_apiserver::FakeApiServer;

    use super::*;

    /// kube's own retry layer would send this list fifteen times over
    /// minutes; weft's client sends it once and has the answer at once.
    #[tokio::test]
    async fn a_503_comes_back_at_once_without_retries() {
        let server = FakeApiServer::start().await.expect("fake API server");
        let config = Config::new(server.url().parse().expect("url"));
        let api: Api<Namespace> = Api::all(client(config, None).expect("client"));
        server.set_unavailable(true);
        let started = tokio::time::Instant::now();
        let err = api
            .list(&ListParams::default())
            .await
            .expect_err("503 is an error");
        assert_eq!(crate::api::status_code(&err), Some(503), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(server.stats().unavailable, 1, "sent once");
    }
}

//! Connecting to the API server: an explicit kubeconfig, or whatever
//! `kube::Config::infer` finds (`$KUBECONFIG`, `~/.kube/config`, then the
//! in-cluster service account).

use std::path::Path;

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

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
/// the inferred configuration when `None`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, ConnectError> {
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
    tracing::info!(server = %config.cluster_url, "Kubernetes API configured");
    Ok(Client::try_from(config)?)
}

//! Where the cluster state comes from.
//!
//! A [`Source`] feeds the [`StateStore`], which is the same whatever the
//! source: the manifest directory of the local lab or the Kubernetes API
//! (kube-rs list/watch). A source signals once the store holds its
//! complete current state, so that the first snapshot a subscriber gets is
//! the whole cluster and not whatever had been read so far.

use std::{future::Future, path::PathBuf, sync::Arc};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::state::{StateError, StateStore};

pub mod documents;
pub mod kubernetes;
pub mod manifests;

/// A producer of cluster state.
pub trait Source: Send + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// Writes the complete current state into `store`, fires `synced`, then
    /// follows changes until `shutdown`. Returns an error only for failures
    /// it cannot ride out (before `synced`: the state cannot be read at
    /// all); passing trouble is logged and retried, keeping what is stored.
    fn run(
        self,
        store: Arc<StateStore>,
        synced: oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("source task failed: {0}")]
    Task(String),
}

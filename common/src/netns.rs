//! Running code inside another network namespace.
//!
//! `setns` switches only the calling thread, so the work runs on a fresh
//! thread that enters the namespace and then exits: the caller's threads and
//! the tokio workers never change namespace. Sockets and netlink connections
//! opened there stay in that namespace after the thread is gone.

use std::{fs::File, path::Path};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};

/// Runs `f` on a new thread inside the network namespace at `path`
/// (`/run/netns/NAME` or `/proc/PID/ns/net`) and returns its result.
pub fn run_in<T, F>(path: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let ns = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    let display = path.display().to_string();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {display}"))?;
            f()
        })
        .context("spawning a thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in network namespace panicked"))?
}

/// Like [`run_in`] for async work: the future runs on a current-thread
/// runtime of its own inside the namespace.
pub fn block_on_in<T, F, Fut>(path: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    run_in(path, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a runtime")?;
        rt.block_on(f())
    })
}

/// Async wrapper around [`block_on_in`] that keeps the caller's runtime free.
pub async fn spawn_in<T, F, Fut>(path: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || block_on_in(&path, f))
        .await
        .context("namespace task panicked")?
}

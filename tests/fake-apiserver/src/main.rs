//! The fake API server as a process: `weft-fake-apiserver --listen
//! 127.0.0.1:0 [--crds deploy/crds]` prints `listening on http://ADDR` on
//! stdout once it serves, then runs until killed or SIGTERM.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use weft_fake_apiserver::{FakeApiServer, Options};

#[derive(Debug, clap::Parser)]
#[command(
    name = "weft-fake-apiserver",
    about = "An in-memory Kubernetes API server for tests"
)]
struct Args {
    /// Where to listen (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CustomResourceDefinition YAML files, or directories of them, to
    /// install at start.
    #[arg(long)]
    crds: Vec<PathBuf>,
    /// How many writes the event log keeps before watches get 410.
    #[arg(long, default_value_t = 10_000)]
    log_limit: usize,
    /// Bookmark interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    bookmark_ms: u64,
    /// Also write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

fn crd_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            entries.sort();
            out.extend(entries);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let server = FakeApiServer::start_with(
        args.listen,
        Options {
            log_limit: args.log_limit,
            bookmark_interval: Duration::from_millis(args.bookmark_ms.max(1)),
        },
    )
    .await
    .with_context(|| format!("binding {}", args.listen))?;
    for file in crd_files(&args.crds)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let crd: serde_json::Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            if crd.is_null() {
                continue;
            }
            server
                .create(crd)
                .with_context(|| format!("installing {}", file.display()))?;
        }
    }
    if let Some(path) = &args.kubeconfig {
        server
            .write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("listening on {}", server.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.stop();
    Ok(())
}

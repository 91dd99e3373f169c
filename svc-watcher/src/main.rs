use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    weft_common::memory::tune_allocator();
    let args = svc_watcher::Args::parse();
    match svc_watcher::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svc-watcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

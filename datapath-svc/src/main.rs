use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_common::memory::tune_allocator();
    let args = datapath_svc::Args::parse();
    let _telemetry = weft_common::telemetry::init(&args.common, "datapath-svc")?;
    datapath_svc::run(args)
        .await
        .inspect_err(|e| tracing::error!(error = format!("{e:#}"), "datapath-svc failed"))
}

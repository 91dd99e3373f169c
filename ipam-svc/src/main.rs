use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ipam_svc::run(ipam_svc::Args::parse()).await
}

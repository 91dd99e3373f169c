use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    identity_svc::run(identity_svc::Args::parse()).await
}

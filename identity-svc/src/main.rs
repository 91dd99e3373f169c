use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_common::memory::tune_allocator();
    identity_svc::run(identity_svc::Args::parse()).await
}

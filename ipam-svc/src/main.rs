use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_common::memory::tune_allocator();
    ipam_svc::run(ipam_svc::Args::parse()).await
}

//! `weftctl`, the operator's command line.
//!
//! It talks gRPC to weft's services: the standard health service on each,
//! the datapath's `Datapath` service, identity-svc's `Identity` and
//! ipam-svc's `Ipam`. Every command prints a table for people or, with
//! `-o json`, the same data as JSON for scripts.

pub mod connect;
pub mod table;
pub mod views;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use futures::future::join_all;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weft_proto::{
    datapath::v1::{
        DumpLbMapsRequest, FlowsRequest, ListEndpointsRequest, ListServicesRequest, StatusRequest,
        datapath_client::DatapathClient,
    },
    identity::v1::{ListRequest as IdentityListRequest, identity_client::IdentityClient},
    ipam::v1::{ListRequest as IpamListRequest, ipam_client::IpamClient},
    watcher::v1::{StatusRequest as WatcherStatusRequest, watcher_client::WatcherClient},
};

pub use connect::CtlError;
use connect::Target;
use views::{
    DatapathStatusView, EndpointList, FlowView, HealthView, IdentityList, IpamList, LbMaps,
    ServiceList, StatusReport, View,
};

#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about = "Inspect a weft node and cluster")]
pub struct Cli {
    /// datapath-svc's gRPC address.
    #[arg(
        long,
        global = true,
        env = "WEFT_DATAPATH",
        default_value = "http://127.0.0.1:9403"
    )]
    pub datapath: String,

    /// svc-watcher's gRPC address.
    #[arg(
        long,
        global = true,
        env = "WEFT_WATCHER",
        default_value = "http://127.0.0.1:9400"
    )]
    pub watcher: String,

    /// ipam-svc's gRPC address.
    #[arg(
        long,
        global = true,
        env = "WEFT_IPAM",
        default_value = "http://127.0.0.1:9401"
    )]
    pub ipam: String,

    /// identity-svc's gRPC address.
    #[arg(
        long,
        global = true,
        env = "WEFT_IDENTITY",
        default_value = "http://127.0.0.1:9402"
    )]
    pub identity: String,

    /// Output format.
    #[arg(short = 'o', long, global = true, env = "WEFT_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Bound on connecting to and calling each service (5s, 500ms, 1m).
    #[arg(long, global = true, env = "WEFT_TIMEOUT", default_value = "5s", value_parser = connect::parse_duration)]
    pub timeout: Duration,

    /// Mutual TLS to the services (--tls-cert, --tls-key, --tls-ca,
    /// --tls-server-name), as they are configured.
    #[arg(skip)]
    pub tls: Option<weft_common::tls::TlsConfig>,

    #[command(flatten)]
    pub tls_files: TlsArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// The TLS files, for clusters whose services require mTLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM client certificate, from the CA the services trust.
    #[arg(long, global = true, env = "WEFT_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "WEFT_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA bundle the services' certificates must chain to.
    #[arg(long, global = true, env = "WEFT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name expected in the services' certificates, if not the host dialled.
    #[arg(long, global = true, env = "WEFT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The TLS configuration the flags name; `None` for plaintext.
    pub fn load(&self) -> Result<Option<weft_common::tls::TlsConfig>, weft_common::tls::TlsError> {
        Ok(weft_common::tls::TlsConfig::load(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
        )?
        .map(|t| t.with_server_name(self.tls_server_name.clone())))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Health of every service and the datapath's state; exits non-zero if
    /// anything is unhealthy.
    Status,
    /// Load-balanced services as the datapath programmed them.
    #[command(subcommand)]
    Service(ListOnly),
    /// The pods on this node.
    #[command(subcommand)]
    Endpoint(ListOnly),
    /// Security identities.
    #[command(subcommand)]
    Identity(ListOnly),
    /// Pod CIDRs per node and pool use.
    #[command(subcommand)]
    Ipam(ListOnly),
    /// Raw eBPF map contents.
    #[command(subcommand)]
    Bpf(Bpf),
    /// Flow events from the datapath: connections forwarded or translated,
    /// packets dropped and why.
    Flows(FlowsArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct FlowsArgs {
    /// Keep printing new events as they happen.
    #[arg(short, long)]
    pub follow: bool,
    /// How many recent events to print first (0: all kept).
    #[arg(long, default_value_t = 0)]
    pub last: u32,
    /// Only events to or from this pod (namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only events to or from pods in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this verdict.
    #[arg(long, value_parser = ["forwarded", "dropped", "translated"])]
    pub verdict: Option<String>,
    /// Only events to or from this security identity (a number; `--identity`
    /// is identity-svc's address).
    #[arg(long = "security-identity")]
    pub security_identity: Option<u32>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ListOnly {
    /// List them.
    List,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Bpf {
    /// The load-balancer maps.
    #[command(subcommand)]
    Lb(ListOnly),
}

/// What a command produced: the text to print and whether all was well
/// (the exit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub text: String,
    pub ok: bool,
}

/// Runs the command. Failing to reach the one service a list command needs
/// is an error; `status` reports every failure in its output instead.
pub async fn run(cli: &Cli) -> Result<Report, CtlError> {
    let target = |service: &'static str, address: &str| {
        Target::new(service, address, cli.timeout).with_tls(cli.tls.clone())
    };
    let datapath = target("datapath-svc", &cli.datapath);
    match cli.command {
        Command::Status => {
            let report = status(cli).await;
            let ok = report.healthy;
            Ok(Report {
                text: render(&report, cli.output),
                ok,
            })
        }
        Command::Service(ListOnly::List) => {
            let mut client = DatapathClient::new(datapath.connect().await?);
            let resp = datapath
                .call(client.list_services(ListServicesRequest {}))
                .await?;
            Ok(ok_report(&ServiceList::from(resp), cli.output))
        }
        Command::Endpoint(ListOnly::List) => {
            let mut client = DatapathClient::new(datapath.connect().await?);
            let resp = datapath
                .call(client.list_endpoints(ListEndpointsRequest {}))
                .await?;
            Ok(ok_report(&EndpointList::from(resp), cli.output))
        }
        Command::Bpf(Bpf::Lb(ListOnly::List)) => {
            let mut client = DatapathClient::new(datapath.connect().await?);
            let resp = datapath
                .call(client.dump_lb_maps(DumpLbMapsRequest {}))
                .await?;
            Ok(ok_report(&LbMaps::from(resp), cli.output))
        }
        Command::Identity(ListOnly::List) => {
            let identity = target("identity-svc", &cli.identity);
            let mut client = IdentityClient::new(identity.connect().await?);
            let resp = identity.call(client.list(IdentityListRequest {})).await?;
            Ok(ok_report(&IdentityList::from(resp), cli.output))
        }
        Command::Flows(ref args) => {
            let mut text = String::new();
            flows(cli, args, |line| text.push_str(line)).await?;
            Ok(Report { text, ok: true })
        }
        Command::Ipam(ListOnly::List) => {
            let ipam = target("ipam-svc", &cli.ipam);
            let mut client = IpamClient::new(ipam.connect().await?);
            let resp = ipam.call(client.list(IpamListRequest {})).await?;
            Ok(ok_report(&IpamList::from(resp), cli.output))
        }
    }
}

fn ok_report(view: &impl View, output: Output) -> Report {
    Report {
        text: render(view, output),
        ok: true,
    }
}

fn render(view: &impl View, output: Output) -> String {
    match output {
        Output::Table => view.table(),
        Output::Json => {
            // The views are plain data: serialising them cannot fail.
            let mut text = serde_json::to_string_pretty(view).unwrap_or_default();
            text.push('\n');
            text
        }
    }
}

/// Streams flow events, each rendered for `cli.output`, to `emit`; with
/// `--follow` until the datapath goes away.
pub async fn flows(
    cli: &Cli,
    args: &FlowsArgs,
    mut emit: impl FnMut(&str),
) -> Result<(), CtlError> {
    let datapath =
        Target::new("datapath-svc", &cli.datapath, cli.timeout).with_tls(cli.tls.clone());
    let mut client = DatapathClient::new(datapath.connect().await?);
    let request = FlowsRequest {
        follow: args.follow,
        last: args.last,
        pod: args.pod.clone().unwrap_or_default(),
        namespace: args.namespace.clone().unwrap_or_default(),
        verdict: args.verdict.clone().unwrap_or_default(),
        identity: args.security_identity.unwrap_or_default(),
    };
    // The call itself is bounded; a followed stream is not.
    let mut stream = datapath.call(client.flows(request)).await?;
    loop {
        let next = if args.follow {
            stream.message().await
        } else {
            match tokio::time::timeout(cli.timeout, stream.message()).await {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        match next {
            Ok(Some(flow)) => {
                let view = FlowView::from(flow);
                match cli.output {
                    Output::Table => emit(&view.line()),
                    Output::Json => {
                        let mut line = serde_json::to_string(&view).unwrap_or_default();
                        line.push('\n');
                        emit(&line);
                    }
                }
            }
            Ok(None) => break,
            Err(status) => {
                return Err(CtlError::Call {
                    service: "datapath-svc",
                    address: cli.datapath.clone(),
                    status,
                });
            }
        }
    }
    Ok(())
}

/// Health of every service, checked at once, and the datapath's status.
async fn status(cli: &Cli) -> StatusReport {
    let services = [
        ("svc-watcher", &cli.watcher),
        ("ipam-svc", &cli.ipam),
        ("identity-svc", &cli.identity),
        ("datapath-svc", &cli.datapath),
    ];
    let checks = services.iter().map(|(name, address)| {
        health(Target::new(name, address, cli.timeout).with_tls(cli.tls.clone()))
    });
    let datapath =
        Target::new("datapath-svc", &cli.datapath, cli.timeout).with_tls(cli.tls.clone());
    let ipam = Target::new("ipam-svc", &cli.ipam, cli.timeout).with_tls(cli.tls.clone());
    let watcher = Target::new("svc-watcher", &cli.watcher, cli.timeout).with_tls(cli.tls.clone());
    let (mut health, datapath, ipam, watcher) = tokio::join!(
        join_all(checks),
        datapath_status(&datapath),
        ipam_list(&ipam),
        watcher_reason(&watcher)
    );
    if let Some(reason) = watcher
        && let Some(h) = health
            .iter_mut()
            .find(|h| h.name == "svc-watcher" && !h.is_healthy())
    {
        h.reason = Some(reason);
    }
    let mut report = StatusReport::new(health, datapath);
    report.ipam = ipam.ok();
    report
}

async fn health(target: Target) -> HealthView {
    let result = async {
        let mut client = HealthClient::new(target.connect().await?);
        target
            .call(client.check(HealthCheckRequest {
                service: String::new(),
            }))
            .await
    }
    .await;
    let (status, error) = match result {
        Ok(resp) => {
            let status = ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown);
            (status.as_str_name().to_string(), None)
        }
        Err(e @ (CtlError::Unreachable { .. } | CtlError::BadAddress { .. })) => {
            ("UNREACHABLE".to_string(), Some(e.to_string()))
        }
        Err(e) => ("ERROR".to_string(), Some(e.to_string())),
    };
    HealthView {
        name: target.service.to_string(),
        address: target.address,
        status,
        error,
        reason: None,
    }
}

/// Why svc-watcher is not ready, from its `Status` (nothing when it is
/// ready, unreachable, or too old to answer `Status`).
async fn watcher_reason(target: &Target) -> Option<String> {
    let mut client = WatcherClient::new(target.connect().await.ok()?);
    let status = target
        .call(client.status(WatcherStatusRequest {}))
        .await
        .ok()?;
    (!status.ready && !status.reason.is_empty()).then_some(status.reason)
}

async fn ipam_list(target: &Target) -> Result<IpamList, CtlError> {
    let mut client = IpamClient::new(target.connect().await?);
    target
        .call(client.list(IpamListRequest {}))
        .await
        .map(Into::into)
}

async fn datapath_status(target: &Target) -> Result<DatapathStatusView, String> {
    let result = async {
        let mut client = DatapathClient::new(target.connect().await?);
        target.call(client.status(StatusRequest {})).await
    }
    .await;
    result.map(Into::into).map_err(|e| e.to_string())
}

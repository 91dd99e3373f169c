//! Structured logs through `tracing`, and OpenTelemetry traces over OTLP when
//! an endpoint is configured.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::config::CommonArgs;

/// Keeps the trace exporter alive; flushes pending spans when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber: logs to stderr in the configured format,
/// filtered by `--log-level`, plus an OTLP layer when `--otlp-endpoint` is set.
pub fn init(args: &CommonArgs, service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level: {:?} is not a valid filter", args.log_level))?;
    let fmt = match args.log_format.as_str() {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colours only for a person at a terminal: in a log file or
        // `kubectl logs` the escape codes are noise.
        _ => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let provider = if args.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&args.otlp_endpoint)
            .build()
            .context("building the OTLP span exporter")?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    };
    // Spans are exported at info and above whatever `--log-level` says:
    // quieting the logs must not break the traces other services continue.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
}

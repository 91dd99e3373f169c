//! W3C trace context across the gRPC calls between weft services, so that
//! one trace follows a pod's set-up from the CNI plugin through
//! datapath-svc to identity-svc.
//!
//! The server side is built into [`crate::grpc::GrpcServer`]: every request
//! gets a span named after its method, whose parent is the caller's span
//! when the request carries a `traceparent` header. The client side is an
//! interceptor that writes the current span's context into the request's
//! metadata:
//!
//! ```text
//! let client = IdentityClient::new(weft_common::trace::traced(channel));
//! // or, for one call:
//! let mut request = tonic::Request::new(message);
//! weft_common::trace::inject_into(&mut request);
//! ```
//!
//! Without an OTLP endpoint there is no OpenTelemetry layer, the spans have
//! no trace context and nothing is injected: the cost is a header lookup.

use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::TraceContextExt as _,
};
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A channel whose requests carry the caller's trace context.
pub type TracedChannel = InterceptedService<Channel, Inject>;

/// Wraps a channel (e.g. from [`crate::client::lazy_channel`]) so that every
/// call made through it carries the current span's trace context.
pub fn traced(channel: Channel) -> TracedChannel {
    InterceptedService::new(channel, Inject)
}

/// The interceptor behind [`traced`]; usable with a generated client's
/// `with_interceptor(channel, Inject)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inject;

impl Interceptor for Inject {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        inject(request)
    }
}

/// Interceptor function: `FooClient::with_interceptor(channel, inject)`.
pub fn inject(mut request: Request<()>) -> Result<Request<()>, Status> {
    inject_into(&mut request);
    Ok(request)
}

/// Writes the current span's trace context (`traceparent`, and `tracestate`
/// when there is one) into a request's metadata.
pub fn inject_into<T>(request: &mut Request<T>) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
    });
}

/// The span a server opens for one request: `<package.Service>/<Method>`,
/// child of the caller's span when the request carries a valid
/// `traceparent`. Health checks and reflection get none: kubelet probes
/// every few seconds and those spans would drown the ones that matter.
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    if is_plumbing(path) {
        return tracing::Span::none();
    }
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc request",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: then there
        // is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

fn is_plumbing(path: &str) -> bool {
    path.starts_with("grpc.health.") || path.starts_with("grpc.reflection.")
}

/// Reads trace context from HTTP/2 request headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes trace context into gRPC metadata; a key or value that is not
/// valid ASCII metadata is skipped rather than failing the call.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Runs `f` under an OpenTelemetry layer; returns what it returned and
    /// the spans that ended (read before the provider is dropped: shutting
    /// it down empties the in-memory exporter).
    fn with_otel<R>(f: impl FnOnce() -> R) -> (R, Vec<opentelemetry_sdk::trace::SpanData>) {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let out = tracing::subscriber::with_default(subscriber, f);
        let _ = provider.force_flush();
        (out, exporter.get_finished_spans().expect("spans"))
    }

    fn request(path: &str, traceparent: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(format!("http://x{path}"));
        if let Some(tp) = traceparent {
            builder = builder.header("traceparent", tp);
        }
        builder.body(()).expect("valid request")
    }

    #[test]
    fn server_span_continues_the_callers_trace_and_client_injects_it() {
        let (injected, spans) = with_otel(|| {
            let span = server_span(&request(
                "/weft.identity.v1.Identity/Allocate",
                Some(PARENT),
            ));
            let _entered = span.enter();
            let own = span.context().span().span_context().clone();
            assert_eq!(
                own.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            let mut out = Request::new(());
            inject_into(&mut out);
            let header = out
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (header, own.span_id().to_string())
        });
        let (header, own_span) = injected;
        // The outgoing call names this server's span as its parent.
        assert_eq!(
            header.as_deref(),
            Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{own_span}-01").as_str())
        );
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "weft.identity.v1.Identity/Allocate");
        assert_eq!(spans[0].span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(spans[0].parent_span_id.to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn requests_without_context_start_a_new_trace() {
        let (_, spans) = with_otel(|| {
            let span = server_span(&request("/weft.ipam.v1.Ipam/GetNodeCidr", Some("garbage")));
            let _entered = span.enter();
        });
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].parent_span_id,
            opentelemetry::trace::SpanId::INVALID
        );
    }

    #[test]
    fn health_checks_and_reflection_get_no_span() {
        let (_, spans) = with_otel(|| {
            for path in [
                "/grpc.health.v1.Health/Check",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            ] {
                let span = server_span(&request(path, Some(PARENT)));
                assert!(span.is_none(), "{path}");
            }
        });
        assert!(spans.is_empty());
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut out = Request::new(());
        inject_into(&mut out);
        assert!(out.metadata().get("traceparent").is_none());
        let out = inject(Request::new(())).expect("never fails");
        assert!(out.metadata().is_empty());
    }
}

//! One span per plugin invocation, so a pod's set-up is one trace that
//! starts in the plugin and continues in datapath-svc (and from there in
//! identity-svc).
//!
//! The plugin lives for a few milliseconds, so it does not run an
//! OpenTelemetry SDK with a background exporter: it measures its one span
//! itself, hands its context to datapath-svc as `traceparent`, and sends the
//! finished span to the config's `otlpEndpoint` (OTLP/gRPC) before it exits,
//! within [`EXPORT_TIMEOUT`]. A collector that is down or slow costs at
//! most that and is otherwise ignored: tracing must not fail a CNI call.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use tonic::transport::Endpoint;

/// The longest the plugin waits for the collector before exiting.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// The `service.name` the plugin's spans carry.
pub const SERVICE_NAME: &str = "weft-cni";

/// A W3C trace context (`traceparent`): version 00 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let flags: [u8; 1] = hex(flags)?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    pub fn to_header(self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// The plugin's span for one command, from start to export.
#[derive(Debug, Clone)]
pub struct InvocationSpan {
    /// This span's own context: what datapath-svc receives as its parent.
    pub context: TraceParent,
    parent_span_id: Option<[u8; 8]>,
    name: String,
    start: SystemTime,
    attributes: Vec<(&'static str, String)>,
}

impl InvocationSpan {
    /// Starts a span for `command`, continuing the runtime's trace when it
    /// passed a valid `TRACEPARENT`, else starting a new, sampled one.
    pub fn start(command: &str, incoming: Option<&str>) -> Self {
        let parent = incoming.and_then(TraceParent::parse);
        let context = TraceParent {
            trace_id: parent.map_or_else(random_id, |p| p.trace_id),
            span_id: random_id(),
            sampled: parent.is_none_or(|p| p.sampled),
        };
        Self {
            context,
            parent_span_id: parent.map(|p| p.span_id),
            name: format!("CNI {command}"),
            start: SystemTime::now(),
            attributes: vec![("cni.command", command.to_string())],
        }
    }

    /// Records an attribute; empty values are left out.
    pub fn set(&mut self, key: &'static str, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() {
            self.attributes.push((key, value));
        }
    }

    /// The finished span as an OTLP export request; `error` is the CNI
    /// error message when the command failed.
    pub fn finish(&self, exit_code: u8, error: Option<&str>) -> ExportTraceServiceRequest {
        let string = |key: &str, value: &str| KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_string())),
            }),
            ..Default::default()
        };
        let mut attributes: Vec<KeyValue> =
            self.attributes.iter().map(|(k, v)| string(k, v)).collect();
        attributes.push(KeyValue {
            key: "process.exit.code".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i64::from(exit_code))),
            }),
            ..Default::default()
        });
        let status = match error {
            Some(message) => Status {
                code: StatusCode::Error as i32,
                message: message.to_string(),
            },
            None => Status {
                code: StatusCode::Ok as i32,
                message: String::new(),
            },
        };
        let span = Span {
            trace_id: self.context.trace_id.to_vec(),
            span_id: self.context.span_id.to_vec(),
            parent_span_id: self.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(self.context.sampled),
            name: self.name.clone(),
            // The plugin is the client of datapath-svc's Cni service.
            kind: SpanKind::Client as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            status: Some(status),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", SERVICE_NAME)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SERVICE_NAME.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: vec![span],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

/// Sends a finished span to an OTLP/gRPC collector, bounded by
/// [`EXPORT_TIMEOUT`]. Returns why it failed, for the log.
pub async fn export(endpoint: &str, request: ExportTraceServiceRequest) -> Result<(), String> {
    let send = async {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("otlpEndpoint {endpoint:?}: {e}"))?
            .connect_timeout(EXPORT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(EXPORT_TIMEOUT);
        TraceServiceClient::new(channel)
            .export(request)
            .await
            .map(drop)
            .map_err(|s| format!("{endpoint} refused the span: {}", s.message()))
    };
    tokio::time::timeout(EXPORT_TIMEOUT, send)
        .await
        .map_err(|_| format!("{endpoint} did not take the span within {EXPORT_TIMEOUT:?}"))?
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id != [0; N] {
            return id;
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let tp = TraceParent::parse(PARENT).expect("valid");
        assert!(tp.sampled);
        assert_eq!(tp.to_header(), PARENT);
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn span_continues_the_runtimes_trace() {
        let span = InvocationSpan::start("ADD", Some(PARENT));
        let parent = TraceParent::parse(PARENT).expect("valid");
        assert_eq!(span.context.trace_id, parent.trace_id);
        assert_ne!(span.context.span_id, parent.span_id);
        let req = span.finish(0, None);
        let exported = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(exported.parent_span_id, parent.span_id.to_vec());
        assert_eq!(exported.span_id, span.context.span_id.to_vec());
        assert_eq!(exported.name, "CNI ADD");
        assert!(exported.end_time_unix_nano >= exported.start_time_unix_nano);
    }

    #[test]
    fn without_a_parent_a_new_sampled_trace_starts() {
        let mut span = InvocationSpan::start("DEL", Some("not a traceparent"));
        span.set("k8s.pod.name", "web-1");
        span.set("k8s.namespace.name", "");
        assert!(span.context.sampled);
        let req = span.finish(1, Some("datapath-svc is not reachable"));
        let exported = &req.resource_spans[0].scope_spans[0].spans[0];
        assert!(exported.parent_span_id.is_empty());
        let status = exported.status.as_ref().expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        let keys: Vec<_> = exported.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            ["cni.command", "k8s.pod.name", "process.exit.code"],
            "empty values are left out"
        );
    }

    #[tokio::test]
    async fn an_absent_collector_costs_at_most_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let started = std::time::Instant::now();
        let span = InvocationSpan::start("ADD", None);
        let err = export(&format!("http://{addr}"), span.finish(0, None))
            .await
            .expect_err("nothing listens");
        assert!(started.elapsed() <= EXPORT_TIMEOUT + Duration::from_millis(200));
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}

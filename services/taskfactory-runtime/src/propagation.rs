//! Trace context across process boundaries: W3C `traceparent` and `tracestate`.
//!
//! - NATS: [`crate::messaging::publish`] writes the context of its producer span into the
//!   message headers, and [`crate::messaging::consume`] starts each handler's span as a child of
//!   the context it reads (so an event published inside a user's trace continues that trace).
//! - HTTP: outgoing requests (context sources, the `http` task type) carry [`inject_http`];
//!   webhooks read [`extract_http`].
//! - gRPC: the admin API reads the caller's context from metadata ([`grpc_server_span`]); Rust
//!   callers add theirs with [`GrpcClientTrace`].
//! - Stored: a fire or a waiting run keeps its context as a `traceparent` string
//!   ([`current_traceparent`]) so the work resumed later from Postgres continues the same trace.
//!
//! With trace export off no span has a context, so nothing is written and reading is harmless.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C trace context header names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct NatsHeadersRef<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeadersRef<'_> {
    /// Exact name first (what every W3C implementation writes), then any case: NATS header
    /// names are case-sensitive, publishers are not always careful.
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str()).or_else(|| {
            self.0
                .iter()
                .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
                .and_then(|(_, values)| values.first())
                .map(|value| value.as_str())
        })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

struct HttpHeaders<'a>(&'a mut http::HeaderMap);

impl Injector for HttpHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HttpHeadersRef<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeadersRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The context of `span` (the current span when none is given), if it has a valid one.
fn span_context(span: &tracing::Span) -> Option<Context> {
    let context = span.context();
    context.span().span_context().is_valid().then_some(context)
}

/// Writes `span`'s trace context into NATS headers — the current span's when `span` is not traced
/// (filtered out), nothing when neither is.
pub fn inject_nats(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    if let Some(context) = span_context(span).or_else(|| span_context(&tracing::Span::current())) {
        propagator().inject_context(&context, &mut NatsHeaders(headers));
    }
}

/// Writes the current span's trace context into HTTP headers.
pub fn inject_http(headers: &mut http::HeaderMap) {
    if let Some(context) = span_context(&tracing::Span::current()) {
        propagator().inject_context(&context, &mut HttpHeaders(headers));
    }
}

/// The trace context in NATS headers, if they carry a valid one.
pub fn extract_nats(headers: Option<&async_nats::HeaderMap>) -> Option<Context> {
    let context = propagator().extract(&NatsHeadersRef(headers?));
    context.span().span_context().is_valid().then_some(context)
}

/// The trace context in HTTP headers, if they carry a valid one.
pub fn extract_http(headers: &http::HeaderMap) -> Option<Context> {
    let context = propagator().extract(&HttpHeadersRef(headers));
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` a child of `parent` (when there is one). Call it before the span is entered.
pub fn set_parent(span: &tracing::Span, parent: Option<Context>) {
    if let Some(parent) = parent {
        // Fails only when the span was already started or is disabled: it then keeps its parent.
        let _ = span.set_parent(parent);
    }
}

/// The current span's context as a `traceparent` value, for work resumed later from storage.
pub fn current_traceparent() -> Option<String> {
    let context = span_context(&tracing::Span::current())?;
    let mut carrier = HashMap::new();
    propagator().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The context a stored `traceparent` names, if it is well formed.
pub fn parse_traceparent(traceparent: &str) -> Option<Context> {
    if traceparent.is_empty() {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = propagator().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The current trace's id (32 hex digits), if the current span is traced and sampled (an id whose
/// spans are not exported would lead nowhere).
pub fn current_trace_id() -> Option<String> {
    let context = span_context(&tracing::Span::current())?;
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_sampled()
        .then(|| span_context.trace_id().to_string())
}

/// The gRPC services the trigger serves.
const KNOWN_GRPC_SERVICES: [&str; 4] = [
    "taskfactory.v1.AdminService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The server span of one admin API call (tonic's `trace_fn`): a child of the caller's context
/// when its metadata carries one, named `package.Service/Method` as the RPC conventions say.
pub fn grpc_server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    // A path nobody serves is named as one, not after what the caller made up.
    let known = KNOWN_GRPC_SERVICES.contains(&service)
        && !method.is_empty()
        && method.len() <= 64
        && method.chars().all(|c| c.is_ascii_alphanumeric());
    let (path, service, method) = if known {
        (path, service, method)
    } else {
        ("unknown gRPC method", "unknown", "unknown")
    };
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    set_parent(&span, extract_http(request.headers()));
    span
}

/// Records an admin API call's gRPC status on its server span: a response mapper for
/// `Server::builder().layer(tower::util::MapResponseLayer::new(record_grpc_status))`, which runs
/// inside the span [`grpc_server_span`] made. A failed call answers with its status in the
/// headers (a trailers-only response); a successful unary call has none there (`OK`, 0). As the RPC
/// conventions say, only failures on the server's side make the span an error, not a caller's
/// invalid argument or a missing object.
pub fn record_grpc_status<B>(response: http::Response<B>) -> http::Response<B> {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok())
        .unwrap_or(0);
    let span = tracing::Span::current();
    span.record("rpc.grpc.status_code", code);
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// A tonic client interceptor that sends the current trace context in the call's metadata:
/// `AdminServiceClient::with_interceptor(channel, GrpcClientTrace)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcClientTrace;

impl tonic::service::Interceptor for GrpcClientTrace {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let mut headers = http::HeaderMap::new();
        inject_http(&mut headers);
        for (name, value) in &headers {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                value.to_str().map(tonic::metadata::MetadataValue::try_from),
            ) && let Ok(value) = value
            {
                request.metadata_mut().insert(key, value);
            }
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_traceparent_from_nats_headers_in_any_case() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for name in ["traceparent", "Traceparent", "TRACEPARENT"] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(name, traceparent);
            let context = extract_nats(Some(&headers)).expect("a context");
            let span = context.span();
            let span_context = span.span_context();
            assert_eq!(
                span_context.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(span_context.span_id().to_string(), "00f067aa0ba902b7");
            assert!(span_context.is_remote());
        }
    }

    #[test]
    fn ignores_missing_and_malformed_context() {
        assert!(extract_nats(None).is_none());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(TRACEPARENT, bad);
            assert!(extract_nats(Some(&headers)).is_none(), "{bad:?}");
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    /// Runs `body` with spans traced by an in-memory SDK tracer (sampled, exported nowhere).
    fn traced(body: impl FnOnce()) {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, body);
    }

    #[test]
    fn context_goes_out_in_nats_headers_grpc_metadata_and_storage() {
        traced(|| {
            let span = tracing::info_span!("caller");
            let _entered = span.enter();
            let trace_id = current_trace_id().expect("a traced span");
            let span_id = span.context().span().span_context().span_id().to_string();
            let expected = format!("00-{trace_id}-{span_id}-01");

            let mut headers = async_nats::HeaderMap::new();
            inject_nats(&span, &mut headers);
            assert_eq!(
                headers.get(TRACEPARENT).map(|v| v.as_str()),
                Some(expected.as_str())
            );

            let mut interceptor = GrpcClientTrace;
            let request =
                tonic::service::Interceptor::call(&mut interceptor, tonic::Request::new(()))
                    .expect("the interceptor never refuses");
            assert_eq!(
                request
                    .metadata()
                    .get(TRACEPARENT)
                    .and_then(|v| v.to_str().ok()),
                Some(expected.as_str())
            );

            let mut http_headers = http::HeaderMap::new();
            inject_http(&mut http_headers);
            assert_eq!(
                http_headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
                Some(expected.as_str())
            );

            assert_eq!(current_traceparent().as_deref(), Some(expected.as_str()));
        });
    }

    #[test]
    fn a_span_continues_the_context_it_is_given() {
        traced(|| {
            let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("consumer");
            set_parent(&span, parse_traceparent(remote));
            let _entered = span.enter();
            assert_eq!(
                current_trace_id().as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let child = tracing::info_span!("child");
            let _child = child.enter();
            let traceparent = current_traceparent().expect("a context");
            assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert!(!traceparent.contains("00f067aa0ba902b7"), "a new span id");
        });
    }

    #[test]
    fn without_a_traced_span_nothing_is_written() {
        let mut headers = async_nats::HeaderMap::new();
        inject_nats(&tracing::Span::current(), &mut headers);
        assert!(headers.is_empty());
        assert!(current_traceparent().is_none());
        assert!(current_trace_id().is_none());
    }
}

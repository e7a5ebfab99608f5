//! Logs and traces.
//!
//! - Logs: readable in development, JSON in production (`TASKFACTORY_LOG_FORMAT=json`), filtered
//!   by `RUST_LOG` (default `info`). Ids are fields (`run.id`, `task.id`), never baked into
//!   messages; in JSON each line also carries the fields of the spans it happened in.
//! - Traces: OpenTelemetry over OTLP/gRPC, on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`. The
//!   standard variables configure it (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`). Spans are `tracing` spans
//!   of our crates at `info` and above (`TASKFACTORY_TRACE_FILTER` changes that), exported in
//!   batches from a thread of their own: a slow or absent collector never blocks a service, and a
//!   failed export is logged (target `opentelemetry`). [`Telemetry::shutdown`] flushes what is
//!   buffered. How context crosses NATS, HTTP and gRPC is in [`crate::propagation`].

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long = "log-format", env = "TASKFACTORY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub format: LogFormat,
}

/// Which spans go to the trace exporter unless `TASKFACTORY_TRACE_FILTER` says otherwise: ours at
/// `info` (fires, runs, tasks, attempts, messages), everything else only when it warns.
const DEFAULT_TRACE_FILTER: &str = "warn,taskfactory_runtime=info,taskfactory_trigger=info,taskfactory_orchestrator=info,taskfactory_executor=info";

/// The process's telemetry; keep it until the service has stopped, then [`Telemetry::shutdown`].
#[must_use = "traces buffered at exit are lost unless `shutdown` is called"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter (the SDK waits at most 5 s for it).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks while it flushes; the exporter's connection needs the runtime meanwhile.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "could not flush traces at shutdown"),
            Err(error) => tracing::warn!(error = %error, "could not flush traces at shutdown"),
        }
    }
}

/// Installs logging and, when configured, trace export for `service` (the default
/// `service.name`; `OTEL_SERVICE_NAME` wins). Call it inside the tokio runtime. A second call in
/// one process (tests running several services in-process) installs nothing and exports nothing.
pub fn init(args: &LogArgs, service: &'static str) -> Telemetry {
    install(Settings {
        service,
        format: args.format,
        default_log_filter: "info",
        logs_to_stderr: false,
        traces: trace_export_configured(),
        otlp_endpoint: None,
    })
}

/// How [`install`] sets things up; [`init`] is what the services use.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The default `service.name` of exported spans.
    pub service: &'static str,
    pub format: LogFormat,
    /// Which logs are written unless `RUST_LOG` says otherwise.
    pub default_log_filter: &'static str,
    /// Logs to stderr rather than stdout (tools whose stdout is their output).
    pub logs_to_stderr: bool,
    /// Export traces.
    pub traces: bool,
    /// Where to (else the `OTEL_EXPORTER_OTLP_*` variables, else the OTLP default).
    pub otlp_endpoint: Option<String>,
}

/// Installs logging and trace export as `settings` say (see [`init`]).
pub fn install(settings: Settings) -> Telemetry {
    let provider = settings
        .traces
        .then(|| tracer_provider(settings.service, settings.otlp_endpoint.clone()));
    let provider = match provider {
        Some(Ok(provider)) => Some(provider),
        Some(Err(error)) => {
            eprintln!("taskfactory: traces are off: cannot set up the OTLP exporter: {error}");
            None
        }
        None => None,
    };
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.default_log_filter));
    let logs = if settings.logs_to_stderr {
        let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
        log_layer(settings.format, std::io::stderr, colours)
    } else {
        let colours = std::io::IsTerminal::is_terminal(&std::io::stdout());
        log_layer(settings.format, std::io::stdout, colours)
    }
    .with_filter(log_filter);
    let traces = provider.as_ref().map(|provider| {
        let filter = std::env::var("TASKFACTORY_TRACE_FILTER")
            .ok()
            .and_then(|directives| EnvFilter::try_new(trace_directives(&directives)).ok())
            .unwrap_or_else(|| EnvFilter::new(DEFAULT_TRACE_FILTER));
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(settings.service))
            .with_tracked_inactivity(false)
            .with_filter(filter)
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if !installed {
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Telemetry { provider: None };
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::info!(service = settings.service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// The log lines: compact text, or one JSON object per line with the event's fields at the top
/// level, the innermost span's fields under `span` and every enclosing span under `spans` (so a
/// line logged while publishing a task still names its run and activity). Text is coloured only
/// for a terminal.
fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    colours: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .fmt_fields(ReadableFields)
            .with_ansi(colours)
            .with_writer(writer)
            .boxed(),
    }
}

/// Text log fields without the tracing attributes (`messaging.*`, `otel.*`): the message spans
/// carry a dozen of them for the trace, which would bury every line a service logs while handling
/// a message. The span names stay (`process:run:`), and JSON logs keep every field.
struct ReadableFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for ReadableFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        use tracing_subscriber::field::VisitOutput as _;
        let mut visitor = Readable(tracing_subscriber::fmt::format::DefaultVisitor::new(
            writer, true,
        ));
        fields.record(&mut visitor);
        visitor.0.finish()
    }

    /// Fields recorded on a span later: a separating space only when something is written.
    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut added = String::new();
        self.format_fields(
            tracing_subscriber::fmt::format::Writer::new(&mut added),
            fields,
        )?;
        if !added.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&added);
        }
        Ok(())
    }
}

/// The default field formatting (escaping, error sources, `log.*` left out), minus the tracing
/// attributes.
struct Readable<V>(V);

fn is_trace_attribute(field: &tracing::field::Field) -> bool {
    field.name().starts_with("messaging.") || field.name().starts_with("otel.")
}

impl<V: tracing::field::Visit> tracing::field::Visit for Readable<V> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if !is_trace_attribute(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        if !is_trace_attribute(field) {
            self.0.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if !is_trace_attribute(field) {
            self.0.record_debug(field, value);
        }
    }
}

/// A trace filter as given, plus the message spans unless it names them: the publish and consume
/// spans carry the context from service to service, so without them every hop is a new trace.
fn trace_directives(directives: &str) -> String {
    if directives.contains("taskfactory_runtime") {
        directives.to_owned()
    } else {
        format!("{directives},taskfactory_runtime=info")
    }
}

/// Whether the environment asks for trace export.
fn trace_export_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(
    service: &'static str,
    endpoint: Option<String>,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build()?;
    // Defaults only: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win.
    let given = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let given = |key: &str| {
        given
            .split(',')
            .any(|pair| pair.split('=').next().map(str::trim) == Some(key))
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() && !given("service.name") {
        resource = resource.with_service_name(service);
    }
    if !given("service.version") {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// An error and its sources on one line (`outer: inner: root`), for log fields. Errors keep their
/// source out of their own message, so this is where the chain is spelled out.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut no_responders = is_no_stream(error);
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        no_responders |= is_no_stream(inner);
        source = inner.source();
    }
    if no_responders {
        // async-nats reports a publish nobody answered as "no stream found"; during a failover
        // that reads as if the stream were gone.
        text.push_str(
            " (no JetStream server answered: the stream is missing, or has no leader right now, \
             as during a server restart or failover)",
        );
    }
    text
}

fn is_no_stream(error: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    error
        .downcast_ref::<PublishError>()
        .is_some_and(|e| e.kind() == PublishErrorKind::StreamNotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log output captured in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("captured logs")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_ids_of_the_event_and_its_spans() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(log_layer(
            LogFormat::Json,
            captured.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!("run", run.id = "r-1", activity.name = "billing");
            let _run = run.enter();
            let publish = tracing::info_span!("publish", messaging.destination.name = "tasks.log");
            let _publish = publish.enter();
            tracing::warn!(task.id = "t-1", "task published");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "task published");
        assert_eq!(line["task.id"], "t-1");
        assert_eq!(line["span"]["messaging.destination.name"], "tasks.log");
        assert_eq!(line["spans"][0]["run.id"], "r-1");
        assert_eq!(line["spans"][0]["activity.name"], "billing");
    }

    #[test]
    fn a_trace_filter_always_keeps_the_message_spans() {
        assert_eq!(
            trace_directives("taskfactory_orchestrator=info"),
            "taskfactory_orchestrator=info,taskfactory_runtime=info"
        );
        assert_eq!(
            trace_directives("info,taskfactory_runtime=debug"),
            "info,taskfactory_runtime=debug"
        );
    }

    #[test]
    fn a_publish_nobody_answered_says_what_that_can_mean() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let text = error_chain(&PublishError::new(PublishErrorKind::StreamNotFound));
        assert!(
            text.starts_with("no stream found for given subject"),
            "{text}"
        );
        assert!(text.contains("has no leader right now"), "{text}");
        let wrapped = anyhow::Error::new(PublishError::new(PublishErrorKind::StreamNotFound))
            .context("publish task");
        assert!(error_chain(wrapped.as_ref()).contains("failover"));
        let other = error_chain(&PublishError::new(PublishErrorKind::TimedOut));
        assert!(!other.contains("failover"), "{other}");
    }

    #[test]
    fn pretty_lines_are_text() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(log_layer(
            LogFormat::Pretty,
            captured.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "process",
                otel.name = "process tasks.log",
                messaging.destination.name = "tasks.log",
                otel.status_code = tracing::field::Empty,
                task.id = "t-1",
                task.status = tracing::field::Empty,
            );
            // Recorded later: a left-out attribute adds nothing, a kept field one space.
            span.record("otel.status_code", "ERROR");
            span.record("task.status", "DEAD");
            let _entered = span.enter();
            tracing::info!(run.id = "r-1", "run started");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("process: "), "the span is named: {text}");
        assert!(text.contains("run started run.id=\"r-1\""), "{text}");
        assert!(
            text.contains("process{task.id=\"t-1\" task.status=\"DEAD\"}")
                || text.contains("task.id=\"t-1\" task.status=\"DEAD\""),
            "{text}"
        );
        let after_level = text.split(" INFO ").nth(1).unwrap_or_default();
        assert!(!after_level.contains("  "), "no double spaces: {text:?}");
        assert!(!text.contains("messaging."), "{text}");
        assert!(!text.contains("otel."), "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(text.trim()).is_err());
    }
}

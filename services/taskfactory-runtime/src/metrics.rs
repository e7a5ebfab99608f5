//! Prometheus metrics: one recorder per process (the `metrics` facade), rendered on `/metrics`.
//!
//! Services count with `metrics::counter!` and friends wherever the thing happens; labels carry
//! bounded values only (a decision, a task type), never an id. [`serve`] answers `/metrics` and
//! `/healthz` on the address given with `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Occurrences of schedules by decision (`FIRED`, `COALESCED`, `SKIPPED_OVERLAP`, …).
pub const OCCURRENCES: &str = "taskfactory_schedule_occurrences_total";

/// Events taken in, per activity they matched, by outcome (`fired`, `deduped`, `filtered`,
/// `filter_error`, `dedupe_key_error`), and events `rejected` before matching.
pub const EVENTS: &str = "taskfactory_events_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder (installed on first use; services sharing a process share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only ours");
        }
        metrics::describe_counter!(
            OCCURRENCES,
            "Schedule occurrences by the decision taken about them"
        );
        metrics::describe_counter!(EVENTS, "Events taken in, by outcome per matching activity");
        handle
    })
}

/// Counts occurrences decided one way.
pub fn count_occurrences(decision: &'static str, n: u64) {
    handle();
    metrics::counter!(OCCURRENCES, "decision" => decision).increment(n);
}

/// Counts an event outcome.
pub fn count_events(outcome: &'static str) {
    handle();
    metrics::counter!(EVENTS, "outcome" => outcome).increment(1);
}

/// Counts a consumer re-subscribed after it failed, went silent or disappeared. Consumer names
/// are a bounded set.
pub fn count_consumer_recreated(consumer: &str) {
    handle();
    metrics::counter!("taskfactory_consumer_recreations_total", "consumer" => consumer.to_owned())
        .increment(1);
}

/// Serves `/metrics` (Prometheus text) and `/healthz` until shutdown.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handle = handle();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { handle.render() }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    tracing::info!(%addr, "metrics on /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("metrics endpoint")
}

/// Serves the endpoint in the background when an address is configured; a failure to bind is
/// logged, never fatal (metrics are not worth an outage).
pub fn spawn_endpoint(
    tracker: &tokio_util::task::TaskTracker,
    addr: Option<SocketAddr>,
    shutdown: CancellationToken,
) {
    if let Some(addr) = addr {
        tracker.spawn(async move {
            if let Err(error) = serve(addr, shutdown).await {
                tracing::error!(error = %crate::telemetry::error_chain(error.as_ref()), "metrics endpoint failed");
            }
        });
    }
}

//! Prometheus metrics: one recorder per process (the `metrics` facade), rendered on `/metrics`.
//!
//! Services count with `metrics::counter!` and friends wherever the thing happens; labels carry
//! bounded values only (a decision, a task type), never an id. [`serve`] answers `/metrics`,
//! `/healthz` and `/readyz` on the address given with `--metrics-addr`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

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

/// What `/readyz` asks: `Ok(details)` when the service can do its work, `Err(why not)`.
pub type Readiness =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Readiness of a service that needs NATS (and Postgres, when it has a pool): connected to NATS,
/// and Postgres answering within a second. `extra` adds the service's own state (e.g. the
/// trigger's scheduling role).
pub fn readiness(
    nats: async_nats::Client,
    pool: Option<sqlx::PgPool>,
    extra: Option<Arc<dyn Fn() -> Result<String, String> + Send + Sync>>,
) -> Readiness {
    Arc::new(move || {
        let (nats, pool, extra) = (nats.clone(), pool.clone(), extra.clone());
        Box::pin(async move {
            let mut problems = Vec::new();
            let mut details = Vec::new();
            match nats.connection_state() {
                async_nats::connection::State::Connected => {
                    details.push("nats: connected".to_owned())
                }
                other => problems.push(format!("nats: {other}")),
            }
            if let Some(pool) = pool {
                let ping = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    sqlx::query("SELECT 1").execute(&pool),
                )
                .await;
                match ping {
                    Ok(Ok(_)) => details.push("postgres: ok".to_owned()),
                    Ok(Err(error)) => problems.push(format!(
                        "postgres: {}",
                        crate::telemetry::error_chain(&error)
                    )),
                    Err(_) => problems.push("postgres: no answer within 1s".to_owned()),
                }
            }
            if let Some(extra) = extra {
                match extra() {
                    Ok(detail) => details.push(detail),
                    Err(problem) => problems.push(problem),
                }
            }
            if problems.is_empty() {
                Ok(details.join("\n"))
            } else {
                Err(problems.join("\n"))
            }
        })
    })
}

/// Serves `/metrics` (Prometheus text), `/healthz` (alive) and `/readyz` (able to work; 503 with
/// the reasons when not) until shutdown.
pub async fn serve(
    addr: SocketAddr,
    readiness: Option<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handle = handle();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { handle.render() }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let readiness = readiness.clone();
                async move {
                    let Some(readiness) = readiness else {
                        return (axum::http::StatusCode::OK, "ready\n".to_owned());
                    };
                    match readiness().await {
                        Ok(details) => (axum::http::StatusCode::OK, format!("ready\n{details}\n")),
                        Err(problems) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready\n{problems}\n"),
                        ),
                    }
                }
            }),
        );
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
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    if let Some(addr) = addr {
        tracker.spawn(async move {
            if let Err(error) = serve(addr, Some(readiness), shutdown).await {
                tracing::error!(error = %crate::telemetry::error_chain(error.as_ref()), "metrics endpoint failed");
            }
        });
    }
}

//! The gateway's connections: HTTP/1.1 spoken by hyper, with the bounds a server that faces the
//! internet needs. `axum::serve` sets none of them (no timer, so no header timeout; no cap), so
//! the gateway accepts and serves connections itself, with hyper's own knobs.
//!
//! - **At most `--http-max-connections` at once.** At the cap the gateway stops accepting: new
//!   connections wait in the kernel's accept queue and are taken as others close (what nginx,
//!   HAProxy and Go's `LimitListener` do; the queue is 128 deep, tokio's default, and beyond it
//!   the kernel drops connection attempts, which clients retry). A burst is slowed down rather
//!   than refused, a sender that cannot wait times out and retries, and file descriptors and
//!   memory stay bounded.
//!   Reaching the cap is logged, and the open connections are the gauge
//!   [`WEBHOOK_CONNECTIONS`](taskfactory_runtime::metrics::WEBHOOK_CONNECTIONS).
//! - **A request's head within `--http-header-timeout`,** counted from when the connection opens,
//!   or on a kept-alive connection from the previous answer: hyper measures both with one timer,
//!   so it is also how long an idle connection is kept. A sender that trickles its headers, or
//!   opens a connection and sends nothing, is closed.
//! - **A head of at most [`MAX_HEAD_BYTES`]** (hyper's read buffer; its default is 400 KiB a
//!   connection), so that the cap bounds memory too.
//! - The body's deadline and the bytes of bodies held at once are the handler's
//!   (`--http-body-timeout`, `--http-body-bytes-in-flight`).
//!
//! At shutdown the gateway stops accepting, asks every connection to finish the request in hand
//! and close, and waits for them up to the drain timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use taskfactory_runtime::config::parse_duration;
use taskfactory_runtime::metrics;
use taskfactory_runtime::telemetry::error_chain;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The largest request head (request line and headers) taken; a larger one is answered 431.
/// Webhook senders send a few KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long to wait before accepting again after `accept` failed (out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);
/// Reaching the cap is logged at most this often.
const CAP_WARNING_GAP: Duration = Duration::from_secs(60);

/// The bounds on the webhook gateway's connections and requests.
#[derive(Clone, Debug, clap::Args)]
pub struct HttpLimits {
    /// Connections the webhook gateway serves at once; more wait in the accept queue until one
    /// closes.
    #[arg(
        long = "http-max-connections",
        env = "TASKFACTORY_HTTP_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,
    /// How long a webhook connection may take to send a request's headers, from when it opens
    /// or from the previous answer (so also how long an idle connection is kept).
    #[arg(long = "http-header-timeout", env = "TASKFACTORY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// How long a webhook request may take to send its body (and to wait for room for it).
    #[arg(long = "http-body-timeout", env = "TASKFACTORY_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Bytes of webhook bodies held at once; a request waits (within its body timeout) for room,
    /// else it is answered 503. At least --max-event-bytes.
    #[arg(long = "http-body-bytes-in-flight", env = "TASKFACTORY_HTTP_BODY_BYTES_IN_FLIGHT", default_value_t = 64 * 1024 * 1024)]
    pub body_bytes_in_flight: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_bytes_in_flight: 64 * 1024 * 1024,
        }
    }
}

impl HttpLimits {
    /// What is wrong with these limits, if anything.
    pub fn check(&self, max_event_bytes: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_connections >= 1,
            "--http-max-connections must be at least 1"
        );
        anyhow::ensure!(
            !self.header_timeout.is_zero() && !self.body_timeout.is_zero(),
            "--http-header-timeout and --http-body-timeout must be longer than zero"
        );
        anyhow::ensure!(
            self.body_bytes_in_flight >= max_event_bytes,
            "--http-body-bytes-in-flight ({}) must be at least --max-event-bytes ({max_event_bytes}), \
             or a body at the limit could never be taken in",
            self.body_bytes_in_flight
        );
        Ok(())
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`, then lets the connections finish
/// what they hold for up to `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let graceful = GracefulShutdown::new();
    let mut warned_at: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned_at.is_none_or(|at| at.elapsed() >= CAP_WARNING_GAP) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "webhook gateway at its connection cap; new connections wait in the accept queue"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                }
            }
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was taken: wait a
                    // little rather than spin.
                    tracing::warn!(error = %error_chain(&error), "webhook gateway cannot accept a connection");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        let connection = graceful.watch(
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())),
        );
        metrics::count_webhook_connection(1.0);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Timeouts, resets and malformed requests: the sender's doing, not ours.
                tracing::debug!(error = %error_chain(&error), "webhook connection ended with an error");
            }
            metrics::count_webhook_connection(-1.0);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = limits
                .max_connections
                .saturating_sub(slots.available_permits()),
            "webhook connections still open after the drain timeout; leaving them to their own timeouts"
        );
    }
}

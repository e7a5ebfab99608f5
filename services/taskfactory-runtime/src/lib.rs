//! Runtime pieces every taskfactory service shares: configuration, connections to NATS and
//! Postgres, stream declaration, migrations, the publish and consume helpers, shutdown and logs.
//!
//! # Layout
//!
//! - [`batch`]: group commit: items that wait together are written together, each caller
//!   hearing its own outcome.
//! - [`clock`]: the scheduler's notion of time (system, or driven by tests).
//! - [`config`]: flags with environment fallbacks common to the services.
//! - [`nats`]: connecting, and declaring the streams (idempotently, at every start).
//! - [`egress`]: outbound HTTP guarded by the egress policy (tasks and context sources).
//! - [`finished_tasks`]: the finished-tasks bucket: raising a task's entry, an executor's check.
//! - [`complete`]: whether a bucket refilled from Postgres is complete, as executors watch it.
//! - [`db`]: creating the database if absent, the pool, and the embedded migrations.
//! - [`messaging`]: the one publish helper and the one consume loop (acks, concurrency, DLQ).
//! - [`metrics`]: the Prometheus recorder and the `/metrics` endpoint.
//! - `pull`: a consume loop's pull requests, each read until what the server owes it has come.
//! - [`propagation`]: W3C trace context in NATS headers, HTTP headers and gRPC metadata.
//! - [`secrets`]: named secrets resolved where a request is sent (env, files), bound to hosts.
//! - [`shutdown`]: SIGTERM/SIGINT → a `CancellationToken`; a second signal exits at once.
//! - [`telemetry`]: structured logs (pretty for development, JSON for production) and OTLP traces.

pub mod batch;
pub mod clock;
pub mod complete;
pub mod config;
pub mod db;
pub mod egress;
pub mod finished_tasks;
pub mod messaging;
pub mod metrics;
pub mod nats;
pub mod propagation;
mod pull;
pub mod secrets;
pub mod shutdown;
pub mod telemetry;

/// The services' tokio runtime: multi-threaded, with roomy thread stacks (defence in depth for
/// deeply recursive parsing of user templates; the expression engine also refuses such input).
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(16 * 1024 * 1024)
        .build()
}

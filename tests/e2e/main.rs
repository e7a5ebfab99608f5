//! End-to-end tests: the three services against a real `nats-server` and Postgres.
//! One binary; each test gets its own NATS server and database.

mod access;
mod apply;
mod authentication;
mod cluster;
mod context;
mod depth;
mod event_limits;
mod events;
mod examples;
mod execution;
mod external_executor;
mod hostile;
mod leadership;
mod lifecycle;
mod misfire;
mod nats_permissions;
mod nats_tls;
mod observability;
mod overlap;
mod poison;
mod preview;
mod resilience;
mod run_limits;
mod schedules;
mod secrets;
mod sources;
mod spec_limits;
mod sql_parameters;
mod sql_sources;
mod ssrf;
mod support;
mod tracing;
mod validation;
mod webhook_limits;
mod webhooks;

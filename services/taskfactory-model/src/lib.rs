//! Pure logic of taskfactory, shared by every service. No I/O: nothing here touches the network,
//! the clock or a database, so all of it is unit-tested directly.
//!
//! # Layout
//!
//! - [`ids`]: typed ids; run, fire and task ids are derived (UUIDv5) from what identifies them.
//! - [`access`]: roles, grants scoped to activities, and the role each admin RPC needs.
//! - [`attempt`]: what an executor makes of a task attempt: status, retry or dead letter, backoff.
//! - [`spec`]: loading activity specs (YAML / proto3 JSON), defaults, validation with field paths.
//! - [`schedule`]: the cron engine — POSIX cron on local wall time, mapped to UTC under DST policies.
//! - [`misfire`]: what a schedule does about occurrences it missed (policy, window, cap).
//! - [`overlap`]: what a new run does while others of its activity are unfinished; which waiting
//!   run starts next.
//! - [`flow`]: what a fire of an activity with `flow.concurrency` carries (key, limit, priority).
//! - [`secrets`]: secret names, the hosts each may be sent to, what a sensitive source leaves.
//! - [`plan`]: evaluating task templates into tasks, with a per-template evaluation.
//! - [`expr`]: the sandboxed expression and template engine (`forEach`, `when`, `params`, filters).
//! - [`redact`]: what callers below admin do not see (values shaped or named like credentials).
//! - [`status`]: run and task states, their database spelling and their transitions.
//! - [`results`]: what one result does to its task (refused, history only, or a move forward).
//! - [`complete`]: when a bucket refilled from Postgres is complete (its complete key's value).
//! - [`egress`]: which hosts and addresses outbound HTTP may reach.
//! - [`sources`]: what `request` and `kv` context sources may reach (never the control plane).
//! - [`sizes`]: how large a spec may be, and all live specs together.
//! - [`sql_params`]: the type each `sql` source parameter is bound as; the statement text that
//!   keeps prepared statements apart by those types.
//! - [`sql_query`]: the shape of a `sql` source's query: one statement that reads, closed on
//!   itself (it runs inside a statement that bounds it).
//! - [`sql_role`]: whether a database role is fit for `sql` sources; what must not outlive a query.
//! - [`subjects`]: stream, subject, consumer and header names.
//! - [`values`]: protobuf `Value`/`Struct` ↔ JSON.

pub mod access;
pub mod attempt;
pub mod complete;
pub mod egress;
pub mod expr;
mod expr_strict;
pub mod flow;
pub mod ids;
pub mod misfire;
pub mod overlap;
pub mod plan;
pub mod redact;
pub mod results;
pub mod schedule;
pub mod secrets;
pub mod sizes;
pub mod sources;
pub mod spec;
pub mod sql_params;
pub mod sql_query;
pub mod sql_role;
pub mod status;
pub mod subjects;
pub mod values;

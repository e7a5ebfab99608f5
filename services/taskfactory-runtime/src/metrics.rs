//! Prometheus metrics: one recorder per process (the `metrics` facade), rendered on `/metrics`.
//!
//! Every metric name is a constant here, described once in [`handle`], and recorded through one
//! small function here, so a service counts in one line wherever the thing happens. Labels carry
//! bounded values only (a decision, an outcome, an activity or task type named by a definition, a
//! durable consumer), never an id. [`serve`] answers `/metrics`, `/healthz` and `/readyz` on the
//! address given with `--metrics-addr`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use taskfactory_model::subjects;
use tokio_util::sync::CancellationToken;

/// Trigger: occurrences of schedules by activity and decision (`FIRED`, `COALESCED`,
/// `SKIPPED_OVERLAP`, …; the orchestrator counts `BUFFERED` and `SKIPPED_OVERLAP`).
pub const OCCURRENCES: &str = "taskfactory_schedule_occurrences_total";

/// Trigger: events taken in by outcome (`fired`, `deduped`, `filtered`, `filter_error`,
/// `dedupe_key_error` per activity they matched; `rejected` before matching).
pub const EVENTS: &str = "taskfactory_events_total";

/// Trigger: the event-decision ledger's decisions as they are written, by activity and decision
/// (`fired`, `deduped`, `filtered`, `filter_error`, `key_error`, `paused`, `rejected`): one per
/// event and activity it reached, however often the event is delivered.
pub const EVENT_DECISIONS: &str = "taskfactory_event_decisions_total";

/// Trigger: every fire decision by activity, source (`schedule`, `event`, `manual`, …) and
/// decision (`fired`, `duplicate`).
pub const FIRES: &str = "taskfactory_fires_total";

/// Trigger: schedules the scheduling leader has in hand (0 on a replica that is not the leader).
pub const SCHEDULES_ACTIVE: &str = "taskfactory_schedules_active";

/// Trigger: decisions of schedule writers that waited for a turn (more schedules had something to
/// decide at once than `--schedule-decisions-at-once`, mostly right after a restart).
pub const SCHEDULE_DECISIONS_QUEUED: &str = "taskfactory_schedule_decisions_queued_total";

/// Trigger: how long after its scheduled time a scheduled occurrence fired, by activity.
pub const FIRE_LATENESS: &str = "taskfactory_fire_lateness_seconds";

/// Trigger: webhook deliveries by outcome (`accepted`, `unauthorized`, `stale`, `replayed`,
/// `too_large`, `bad_request`, `unknown_hook`, `unavailable`).
pub const WEBHOOK_DELIVERIES: &str = "taskfactory_webhook_deliveries_total";

/// Trigger: connections the webhook gateway has open (at most `--http-max-connections`).
pub const WEBHOOK_CONNECTIONS: &str = "taskfactory_webhook_connections";

/// Orchestrator: runs that reached their final state, by activity and outcome (`succeeded`,
/// `failed`, `cancelled`, `skipped`).
pub const RUNS: &str = "taskfactory_runs_total";

/// Orchestrator: tasks that reached their final state, by type and outcome (`succeeded`, `dead`,
/// `cancelled`).
pub const TASKS: &str = "taskfactory_tasks_total";

/// Executor: task attempts by type and outcome (`succeeded`, `failed` with another attempt to
/// follow, `dead`, `cancelled`).
pub const TASK_ATTEMPTS: &str = "taskfactory_task_attempts_total";

/// Executor: how long each attempt ran, by type and outcome.
pub const TASK_DURATION: &str = "taskfactory_task_duration_seconds";

/// Orchestrator: messages in the dead-letter stream, by `subject_kind` (`tasks`, `events`,
/// `triggers`, `results`, `other`).
pub const DLQ_MESSAGES: &str = "taskfactory_dlq_messages";

/// Every consumer loop: messages not yet delivered to the durable consumer.
pub const CONSUMER_PENDING: &str = "taskfactory_consumer_pending";

/// Every consumer loop: messages delivered and not yet acknowledged.
pub const CONSUMER_ACK_PENDING: &str = "taskfactory_consumer_ack_pending";

/// Every consumer loop: messages the server is redelivering (as it reports them).
pub const CONSUMER_REDELIVERED: &str = "taskfactory_consumer_redelivered";

/// Every consumer loop: messages handed to a handler that had been delivered before.
pub const REDELIVERIES: &str = "taskfactory_redeliveries_total";

/// Every consumer loop: consumers re-subscribed after they failed, went silent or disappeared.
pub const CONSUMER_RECREATIONS: &str = "taskfactory_consumer_recreations_total";

/// Orchestrator: how long resolving a context source took, by kind (`sql`, `http`, `kv`,
/// `request`, `static`) and outcome (`ok`, `error`, `timeout`).
pub const CONTEXT_SOURCE_DURATION: &str = "taskfactory_context_source_duration_seconds";

/// Orchestrator: context sources that failed, by activity, source name and kind.
pub const CONTEXT_SOURCE_ERRORS: &str = "taskfactory_context_source_errors_total";

/// Orchestrator: how many results each transaction recorded (the results of one run that were
/// waiting together).
pub const RESULT_BATCH_SIZE: &str = "taskfactory_result_batch_size";

/// Trigger: admin API calls refused before reaching their handler, by RPC and reason
/// (`missing`, `not_bearer`, `unknown_token`, `expired`, `jwt`, `permission_denied`).
pub const ADMIN_REFUSALS: &str = "taskfactory_admin_refusals_total";

/// Trigger: audit rows the database did not take (the call itself was carried out).
pub const AUDIT_WRITE_FAILURES: &str = "taskfactory_audit_write_failures_total";
/// Orchestrator: messages refused as forgeries or out of place (dead-lettered once, never carried
/// out), by `kind` (`trigger`, `result`) and `reason` (a bounded set, see the README).
pub const REFUSED_MESSAGES: &str = "taskfactory_refused_messages_total";

/// Orchestrator: task executions started again (another execution of the same attempt had
/// started, or the task had ended), by task `type`.
pub const REPEATED_EXECUTIONS: &str = "taskfactory_repeated_executions_total";

/// Every consumer: messages it dead-lettered (refused, undecodable, or given up on after the
/// delivery limit), by `kind` (`trigger`, `result`, `event`, `task`, `dead_task`).
pub const DEAD_LETTERED: &str = "taskfactory_dead_lettered_total";

/// Trigger: reloads of the live definitions by outcome (`changed`, `unchanged`, `failed`).
pub const DEFINITION_RELOADS: &str = "taskfactory_definition_reloads_total";

/// Trigger: `taskfactory.internal.definitions-changed` signals received (far more than reloads
/// means someone is flooding the subject).
pub const DEFINITIONS_SIGNALS: &str = "taskfactory_definitions_signals_total";

/// Trigger: the definitions generation this replica has loaded (compare replicas, or with
/// Postgres, to see one lagging behind).
pub const DEFINITIONS_GENERATION: &str = "taskfactory_definitions_generation";

/// Trigger: activities read by definition reloads (a reload reads only what changed since the
/// one before; this growing with every reload by the number of activities means it does not).
pub const DEFINITIONS_READ: &str = "taskfactory_definitions_read_total";

/// Executor: whether a bucket refilled from Postgres (`bucket`: finished tasks, cancelled runs)
/// is known to be complete; while it is 0 no task message is taken.
pub const BUCKET_COMPLETE: &str = "taskfactory_bucket_complete";

/// Executor: 1 while a bucket's complete key is watched, 0 while it is read every second instead
/// (the watch cannot be opened: see the log).
pub const BUCKET_WATCHED: &str = "taskfactory_bucket_watched";

/// Buckets of the result batch sizes.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Histogram buckets of every duration in seconds: 5 ms to 10 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// How often gauges read from the server (consumer state, dead letters) are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// How often the samples histograms took are folded into their buckets. The exporter keeps
/// every sample until then: without it they piled up until `/metrics` was read (8 bytes a fire
/// or a task, for ever if nothing scrapes).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder (installed on first use; services sharing a process share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        // Without buckets the exporter renders histograms as summaries.
        for histogram in [FIRE_LATENESS, TASK_DURATION, CONTEXT_SOURCE_DURATION] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(histogram.to_owned()), SECONDS_BUCKETS)
                .expect("the buckets are not empty");
        }
        builder = builder
            .set_buckets_for_metric(Matcher::Full(RESULT_BATCH_SIZE.to_owned()), BATCH_BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only ours");
        }
        describe();
        let upkept = handle.clone();
        let upkeep = std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkept.run_upkeep();
                }
            });
        if let Err(error) = upkeep {
            tracing::warn!(%error, "cannot start the metrics upkeep; histogram samples are kept until /metrics is read");
        }
        handle
    })
}

/// The help text of every metric.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        OCCURRENCES,
        "Schedule occurrences by activity and the decision taken about them"
    );
    describe_counter!(EVENTS, "Events taken in, by outcome per matching activity");
    describe_counter!(
        EVENT_DECISIONS,
        "Event decisions written to the ledger, by activity and decision"
    );
    describe_counter!(
        FIRES,
        "Fire decisions by activity, source and decision (fired or duplicate)"
    );
    describe_histogram!(
        FIRE_LATENESS,
        "Seconds from a scheduled occurrence's time to its fire, by activity and source (schedule, catchup)"
    );
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook deliveries by outcome");
    describe_gauge!(
        WEBHOOK_CONNECTIONS,
        "Connections the webhook gateway has open"
    );
    describe_counter!(
        RUNS,
        "Runs that reached their final state, by activity and outcome"
    );
    describe_counter!(
        TASKS,
        "Tasks that reached their final state, by type and outcome"
    );
    describe_counter!(TASK_ATTEMPTS, "Task attempts by type and outcome");
    describe_histogram!(
        TASK_DURATION,
        "Seconds each task attempt ran, by type and outcome"
    );
    describe_gauge!(
        SCHEDULES_ACTIVE,
        "Schedules the scheduling leader has in hand (0 on a replica that is not the leader)"
    );
    describe_counter!(
        SCHEDULE_DECISIONS_QUEUED,
        "Schedule decisions that waited for a turn (more schedules had something to decide at once than allowed)"
    );
    describe_gauge!(
        DLQ_MESSAGES,
        "Messages in the dead-letter stream, by kind of subject"
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "Messages not yet delivered to the durable consumer"
    );
    describe_gauge!(
        CONSUMER_ACK_PENDING,
        "Messages delivered to the durable consumer and not yet acknowledged"
    );
    describe_gauge!(
        CONSUMER_REDELIVERED,
        "Messages the server is redelivering to the durable consumer"
    );
    describe_counter!(
        REDELIVERIES,
        "Messages handed to a handler that had been delivered before"
    );
    describe_counter!(
        CONSUMER_RECREATIONS,
        "Consumers re-subscribed after they failed, went silent or disappeared"
    );
    describe_histogram!(
        CONTEXT_SOURCE_DURATION,
        "Seconds resolving a context source took, by kind and outcome"
    );
    describe_counter!(
        CONTEXT_SOURCE_ERRORS,
        "Context sources that failed, by activity, source name and kind"
    );
    describe_histogram!(
        RESULT_BATCH_SIZE,
        "Results recorded per transaction (one run's results waiting together)"
    );
    describe_counter!(
        ADMIN_REFUSALS,
        "Admin API calls refused before their handler, by RPC and reason"
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        "Audit rows the database did not take (the call itself was carried out)"
    );
    describe_counter!(
        REFUSED_MESSAGES,
        "Messages refused (dead-lettered, not carried out), by kind and reason"
    );
    describe_counter!(
        REPEATED_EXECUTIONS,
        "Task executions started again: another execution of the same attempt had started, or the task had ended"
    );
    describe_counter!(
        DEAD_LETTERED,
        "Messages a consumer dead-lettered (refused, undecodable, or past the delivery limit), by kind"
    );
    describe_counter!(
        DEFINITION_RELOADS,
        "Reloads of the live definitions, by outcome (changed, unchanged, failed; shared: answered by a load that began after it was asked for)"
    );
    describe_counter!(
        DEFINITIONS_SIGNALS,
        "Definitions-changed signals received (each coalesced into at most one reload)"
    );
    describe_gauge!(
        DEFINITIONS_GENERATION,
        "The definitions generation this replica has loaded"
    );
    describe_gauge!(
        BUCKET_COMPLETE,
        "Whether a bucket refilled from Postgres is known to be complete (no task is taken while 0)"
    );
    describe_gauge!(
        BUCKET_WATCHED,
        "1 while a bucket's complete key is watched, 0 while it is read every second instead"
    );
    describe_counter!(
        DEFINITIONS_READ,
        "Activities read by definition reloads (only those changed since the reload before)"
    );
}

/// Counts an admin call refused before its handler: not authenticated, or no role for the RPC.
pub fn record_admin_refusal(rpc: &'static str, reason: &'static str) {
    handle();
    metrics::counter!(ADMIN_REFUSALS, "rpc" => rpc, "reason" => reason).increment(1);
}

/// Counts an audit row that could not be written.
pub fn count_audit_write_failure() {
    handle();
    metrics::counter!(AUDIT_WRITE_FAILURES).increment(1);
}

/// Counts a message refused as a forgery or out of place: `kind` `trigger` or `result`, `reason`
/// from a bounded set.
pub fn record_refused(kind: &'static str, reason: &'static str) {
    handle();
    metrics::counter!(REFUSED_MESSAGES, "kind" => kind, "reason" => reason).increment(1);
}

/// Counts an execution of a task started again.
pub fn count_repeated_execution(task_type: &str) {
    handle();
    metrics::counter!(REPEATED_EXECUTIONS, "type" => task_type.to_owned()).increment(1);
}

/// Counts a message a consumer dead-lettered.
pub fn count_dead_lettered(kind: &'static str) {
    handle();
    metrics::counter!(DEAD_LETTERED, "kind" => kind).increment(1);
}

/// Counts `n` definitions-changed signals received.
pub fn record_definitions_signals(n: u64) {
    handle();
    metrics::counter!(DEFINITIONS_SIGNALS).increment(n);
}

/// How many schedules the scheduler has in hand.
pub fn set_active_schedules(count: usize) {
    handle();
    metrics::gauge!(SCHEDULES_ACTIVE).set(count as f64);
}

/// Counts a reload of the live definitions by outcome; a reload that loaded `generation` sets it.
pub fn record_definitions_reload(outcome: &'static str, generation: Option<i64>) {
    handle();
    metrics::counter!(DEFINITION_RELOADS, "outcome" => outcome).increment(1);
    if let Some(generation) = generation {
        metrics::gauge!(DEFINITIONS_GENERATION).set(generation as f64);
    }
}

/// Counts a schedule decision that waited for a turn.
pub fn count_schedule_decision_queued() {
    handle();
    metrics::counter!(SCHEDULE_DECISIONS_QUEUED).increment(1);
}

/// Counts activities a definitions reload read.
pub fn count_definitions_read(n: usize) {
    handle();
    metrics::counter!(DEFINITIONS_READ).increment(n as u64);
}

/// Notes how many results one transaction recorded.
pub fn record_result_batch(size: usize) {
    handle();
    metrics::histogram!(RESULT_BATCH_SIZE).record(size as f64);
}

/// Counts schedule occurrences of `activity` decided one way.
pub fn count_occurrences(activity: &str, decision: &'static str, n: u64) {
    handle();
    metrics::counter!(OCCURRENCES, "activity" => activity.to_owned(), "decision" => decision)
        .increment(n);
}

/// Counts an event outcome.
pub fn count_events(outcome: &'static str) {
    handle();
    metrics::counter!(EVENTS, "outcome" => outcome).increment(1);
}

/// Counts an event decision written to the ledger.
pub fn count_event_decision(activity: &str, decision: &'static str) {
    handle();
    metrics::counter!(EVENT_DECISIONS, "activity" => activity.to_owned(), "decision" => decision)
        .increment(1);
}

/// Counts a fire decision (`fired` or `duplicate`) of `activity` from `source`.
pub fn record_fire(activity: &str, source: &'static str, decision: &'static str) {
    handle();
    metrics::counter!(FIRES, "activity" => activity.to_owned(), "source" => source, "decision" => decision)
        .increment(1);
}

/// Records how late a scheduled occurrence fired (early counts as on time).
pub fn record_fire_lateness(activity: &str, source: &'static str, lateness: chrono::TimeDelta) {
    handle();
    let seconds = lateness.to_std().unwrap_or_default().as_secs_f64();
    metrics::histogram!(FIRE_LATENESS, "activity" => activity.to_owned(), "source" => source)
        .record(seconds);
}

/// Counts a webhook delivery by outcome.
pub fn record_webhook_delivery(outcome: &'static str) {
    handle();
    metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
}

/// A webhook connection opened (`1.0`) or closed (`-1.0`).
pub fn count_webhook_connection(change: f64) {
    handle();
    metrics::gauge!(WEBHOOK_CONNECTIONS).increment(change);
}

/// Counts `n` runs of `activity` that reached their final state `outcome`.
pub fn record_runs_finished(activity: &str, outcome: &'static str, n: u64) {
    handle();
    metrics::counter!(RUNS, "activity" => activity.to_owned(), "outcome" => outcome).increment(n);
}

/// Counts `n` tasks of `task_type` that reached their final state `outcome`.
pub fn record_tasks_finished(task_type: &str, outcome: &'static str, n: u64) {
    handle();
    metrics::counter!(TASKS, "type" => task_type.to_owned(), "outcome" => outcome).increment(n);
}

/// Counts one task attempt and records how long it ran.
pub fn record_attempt(task_type: &str, outcome: &'static str, duration: Duration) {
    handle();
    metrics::counter!(TASK_ATTEMPTS, "type" => task_type.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(TASK_DURATION, "type" => task_type.to_owned(), "outcome" => outcome)
        .record(duration.as_secs_f64());
}

/// Sets the dead letters of one kind of subject.
pub fn set_dlq_messages(subject_kind: &'static str, messages: u64) {
    handle();
    metrics::gauge!(DLQ_MESSAGES, "subject_kind" => subject_kind).set(messages as f64);
}

/// Sets what an executor knows of a refilled bucket: complete or not, and whether its complete key
/// is watched or read.
pub fn set_bucket_state(bucket: &'static str, complete: bool, watched: bool) {
    handle();
    metrics::gauge!(BUCKET_COMPLETE, "bucket" => bucket).set(f64::from(u8::from(complete)));
    metrics::gauge!(BUCKET_WATCHED, "bucket" => bucket).set(f64::from(u8::from(watched)));
}

/// Sets a durable consumer's sampled state.
pub fn set_consumer_state(consumer: &str, pending: u64, ack_pending: usize, redelivered: usize) {
    handle();
    let consumer = consumer.to_owned();
    metrics::gauge!(CONSUMER_PENDING, "consumer" => consumer.clone()).set(pending as f64);
    metrics::gauge!(CONSUMER_ACK_PENDING, "consumer" => consumer.clone()).set(ack_pending as f64);
    metrics::gauge!(CONSUMER_REDELIVERED, "consumer" => consumer).set(redelivered as f64);
}

/// Counts a message handed to a handler of `consumer` as a redelivery when it was delivered
/// before (`delivered` is the server's delivery count, 1 the first time).
pub fn record_delivery(consumer: &str, delivered: i64) {
    if delivered > 1 {
        handle();
        metrics::counter!(REDELIVERIES, "consumer" => consumer.to_owned()).increment(1);
    }
}

/// Counts a consumer re-subscribed after it failed, went silent or disappeared. Consumer names
/// are a bounded set.
pub fn count_consumer_recreated(consumer: &str) {
    handle();
    metrics::counter!(CONSUMER_RECREATIONS, "consumer" => consumer.to_owned()).increment(1);
}

/// Records how long resolving a context source of `kind` took and how it ended.
pub fn record_context_source(kind: &'static str, outcome: &'static str, duration: Duration) {
    handle();
    metrics::histogram!(CONTEXT_SOURCE_DURATION, "kind" => kind, "outcome" => outcome)
        .record(duration.as_secs_f64());
}

/// Counts a context source of `activity` that failed.
pub fn record_context_source_error(activity: &str, source: &str, kind: &'static str) {
    handle();
    metrics::counter!(CONTEXT_SOURCE_ERRORS, "activity" => activity.to_owned(), "source" => source.to_owned(), "kind" => kind)
        .increment(1);
}

/// Samples the messages in the dead-letter stream into [`DLQ_MESSAGES`] every [`SAMPLE_EVERY`]
/// until shutdown. A failed read is logged at debug and skipped: the gauge keeps its last value.
pub async fn run_dlq_sampler(js: async_nats::jetstream::Context, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match dlq_counts(&js).await {
            Ok(counts) => {
                for (kind, messages) in counts {
                    set_dlq_messages(kind, messages);
                }
            }
            Err(error) => {
                tracing::debug!(error = %crate::telemetry::error_chain(&*error), "cannot read the dead-letter stream")
            }
        }
    }
}

/// Dead letters per kind of subject, every kind included (a drained kind reads 0). The stream
/// reports counts per subject; there are few subjects (one per task type, plus three).
async fn dlq_counts(
    js: &async_nats::jetstream::Context,
) -> Result<Vec<(&'static str, u64)>, async_nats::Error> {
    let mut counts: Vec<(&'static str, u64)> =
        subjects::DLQ_KINDS.iter().map(|kind| (*kind, 0)).collect();
    let stream = js.get_stream_no_info(subjects::DLQ_STREAM).await?;
    let mut per_subject = stream.info_with_subjects(subjects::DLQ_SUBJECTS).await?;
    while let Some((subject, messages)) = per_subject.try_next().await? {
        let kind = subjects::dlq_kind(&subject);
        if let Some(entry) = counts.iter_mut().find(|(k, _)| *k == kind) {
            entry.1 += messages as u64;
        }
    }
    Ok(counts)
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
    kept: Arc<crate::nats::Kept>,
) -> Probes {
    let liveness = kept.clone();
    let ready: Readiness = Arc::new(move || {
        let (nats, pool, extra, kept) = (nats.clone(), pool.clone(), extra.clone(), kept.clone());
        Box::pin(async move {
            let mut problems = Vec::new();
            let mut details = Vec::new();
            for problem in kept.problems() {
                problems.push(format!("jetstream: {problem}"));
            }
            match nats.connection_state() {
                async_nats::connection::State::Connected => {
                    details.push("nats: connected".to_owned());
                    // Only a stream the server says it does not have makes the service unready;
                    // a lookup that fails otherwise (a leader election, a slow server) is noted.
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        check_streams(&nats),
                    )
                    .await
                    {
                        Ok(check) if !check.missing.is_empty() => problems.push(format!(
                            "streams: {} missing (being declared again)",
                            check.missing.join(", ")
                        )),
                        Ok(check) if !check.unusable.is_empty() => problems.push(format!(
                            "streams: {} (an operator must repair them)",
                            check.unusable.join("; ")
                        )),
                        Ok(check) if check.unknown.is_empty() => {
                            details.push("streams: declared".to_owned())
                        }
                        Ok(check) => details.push(format!(
                            "streams: could not check {}",
                            check.unknown.join(", ")
                        )),
                        Err(_) => details.push("streams: no answer within 1s".to_owned()),
                    }
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
    });
    Probes {
        ready,
        kept: liveness,
    }
}

/// A service's probes: `/readyz` asks `ready`; `/healthz` fails once the service has been unable
/// to put its JetStream state back for [`UNRECOVERABLE_AFTER`](crate::nats::UNRECOVERABLE_AFTER),
/// so that the platform restarts it.
#[derive(Clone)]
pub struct Probes {
    pub ready: Readiness,
    pub kept: Arc<crate::nats::Kept>,
}

/// What the server says of the streams the services work with (looked up concurrently).
#[derive(Debug, Default)]
struct StreamCheck {
    /// Streams the server does not have.
    missing: Vec<String>,
    /// Streams it could not say anything about (a timeout, a leader election, permissions).
    unknown: Vec<String>,
    /// Streams that take no messages as configured, and why (sealed, a tiny message size).
    unusable: Vec<String>,
}

async fn check_streams(nats: &async_nats::Client) -> StreamCheck {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let js = async_nats::jetstream::new(nats.clone());
    let names: Vec<String> = crate::nats::stream_configs(1)
        .into_iter()
        .map(|config| config.name)
        .collect();
    let lookups = names.iter().map(|name| {
        let js = js.clone();
        async move { (name, js.get_stream(name).await) }
    });
    let mut check = StreamCheck::default();
    for (name, found) in futures::future::join_all(lookups).await {
        if let Ok(stream) = &found
            && let Some(problem) = crate::nats::unusable(&stream.cached_info().config)
        {
            check.unusable.push(format!("{name} {problem}"));
        }
        if let Err(error) = found {
            match error.kind() {
                GetStreamErrorKind::JetStream(error)
                    if error.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    check.missing.push(name.clone())
                }
                _ => check.unknown.push(name.clone()),
            }
        }
    }
    check
}

/// What one HTTP endpoint serves.
#[derive(Clone)]
pub struct Routes {
    /// `/metrics` (Prometheus text).
    pub metrics: bool,
    /// `/healthz` (alive) and `/readyz` (able to work; 503 with the reasons when not).
    pub probes: Option<Probes>,
}

/// Serves `routes` on `addr` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    routes: Routes,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut app = axum::Router::new();
    if routes.metrics {
        let handle = handle();
        app = app.route(
            "/metrics",
            axum::routing::get(move || async move { handle.render() }),
        );
    }
    if let Some(probes) = routes.probes.clone() {
        let (readiness, kept) = (probes.ready, probes.kept);
        app = app
            .route(
                "/healthz",
                axum::routing::get(move || {
                    let kept = kept.clone();
                    async move {
                        match kept.unrecoverable(crate::nats::UNRECOVERABLE_AFTER) {
                            None => (axum::http::StatusCode::OK, "ok\n".to_owned()),
                            Some(reason) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                format!("cannot recover\n{reason}\n"),
                            ),
                        }
                    }
                }),
            )
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let readiness = readiness.clone();
                    async move {
                        match readiness().await {
                            Ok(details) => {
                                (axum::http::StatusCode::OK, format!("ready\n{details}\n"))
                            }
                            Err(problems) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready\n{problems}\n"),
                            ),
                        }
                    }
                }),
            );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    tracing::info!(%addr, metrics = routes.metrics, probes = routes.probes.is_some(), "metrics and probes endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("metrics endpoint")
}

/// Serves `/metrics` and the probes in the background, where the lifecycle flags say: both on
/// `--metrics-addr`, or the probes on `--probe-addr` when that is set (so a network policy can
/// open one and not the other). A failure to bind is logged, never fatal (metrics are not worth an
/// outage).
pub fn spawn_endpoint(
    tracker: &tokio_util::task::TaskTracker,
    lifecycle: &crate::config::LifecycleArgs,
    readiness: Probes,
    shutdown: CancellationToken,
) {
    let mut endpoints = Vec::new();
    match (lifecycle.metrics_addr, lifecycle.probe_addr) {
        (Some(metrics), Some(probes)) if metrics == probes => endpoints.push((
            metrics,
            Routes {
                metrics: true,
                probes: Some(readiness),
            },
        )),
        (metrics, Some(probes)) => {
            if let Some(metrics) = metrics {
                endpoints.push((
                    metrics,
                    Routes {
                        metrics: true,
                        probes: None,
                    },
                ));
            }
            endpoints.push((
                probes,
                Routes {
                    metrics: false,
                    probes: Some(readiness),
                },
            ));
        }
        (Some(metrics), None) => endpoints.push((
            metrics,
            Routes {
                metrics: true,
                probes: Some(readiness),
            },
        )),
        (None, None) => {}
    }
    for (addr, routes) in endpoints {
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(error) = serve(addr, routes, shutdown).await {
                tracing::error!(error = %crate::telemetry::error_chain(error.as_ref()), "metrics endpoint failed");
            }
        });
    }
}

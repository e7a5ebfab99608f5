//! Running one task message: decode, run with a timeout while heartbeating, report, settle.
//!
//! Each attempt publishes one TaskResult (`results.<activity>.<run>`) before the task message is
//! settled, so an outcome is never lost: a crash in between means the task runs again (at least
//! once), and the orchestrator keeps only the first terminal result.
//!
//! The status and what becomes of the message come from `taskfactory_model::attempt`:
//!
//! - success → `SUCCEEDED`, ack; the run was cancelled → `CANCELLED`, ack;
//! - a retryable failure with attempts left → `FAILED`, delayed NAK (exponential backoff with
//!   jitter, capped);
//! - otherwise → `DEAD`, a copy to `dlq.tasks.<type>` with the error and attempt count,
//!   terminated;
//! - a message that is not a TaskInstance, or whose result could go nowhere (its activity name or
//!   run id is not one subject token) → `dlq.tasks.<type>` at once, not run, terminated;
//! - the result could not be reported (NATS) → delivered again after a backoff; after
//!   `retry.maxAttempts` + `--max-deliveries` deliveries, dead-lettered.
//!
//! The orchestrator marks every dead-lettered task `DEAD` (`dead_tasks`), so a task whose result
//! could never be reported still ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use async_nats::jetstream::Message;
use chrono::Utc;
use prost::Message as _;
use taskfactory_model::attempt::{self, AttemptEnd, Disposition, Verdict};
use taskfactory_model::results::{
    CancelledCheck, FinishedCheck, REDELIVERY_ALLOWANCE, check_cancelled,
};
use taskfactory_model::spec::{chrono_to_timestamp, effective_retry, std_duration};
use taskfactory_model::status::{task_is_terminal, task_outcome};
use taskfactory_model::{subjects, values};
use taskfactory_proto::v1::{TaskInstance, TaskResult, TaskStatus};
use taskfactory_runtime::complete::CompleteWatch;
use taskfactory_runtime::messaging::{self, Handler, Then, Unfinished};
use taskfactory_runtime::{finished_tasks, metrics};

use crate::builtins::{Builtins, TaskFailure};

pub struct Executor {
    pub builtins: Builtins,
    pub name: String,
    pub ack_wait: Duration,
    pub cancellations: Arc<Cancellations>,
    /// Deliveries a task may have beyond its own attempts while its result cannot be reported.
    pub max_deliveries: u32,
    /// Finished tasks: read before each attempt (a finished task never runs again), written once
    /// the stream has a final result of ours.
    pub finished_tasks: async_nats::jetstream::kv::Store,
    /// Whether that bucket is complete (watched, not read per attempt). No message is taken
    /// while it or the cancelled-runs bucket is not ([`Handler::ready`]), and one in hand waits
    /// for them.
    pub complete: CompleteWatch,
    /// Stops a wait for the bucket to be complete.
    pub shutdown: CancellationToken,
}

/// Cancelled runs: checked before each attempt, and watched to stop attempts in flight. A missing
/// run proves it not cancelled only while the bucket is complete (`complete`: refilled from
/// Postgres after it was recreated).
pub struct Cancellations {
    kv: async_nats::jetstream::kv::Store,
    pub complete: CompleteWatch,
    in_flight: std::sync::Mutex<HashMap<String, Vec<(u64, CancellationToken)>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Cancellations {
    pub fn new(kv: async_nats::jetstream::kv::Store) -> Self {
        Self {
            kv,
            complete: CompleteWatch::new(
                subjects::CANCELLED_RUNS_BUCKET,
                subjects::CANCELLED_RUNS_COMPLETE_KEY,
            ),
            in_flight: std::sync::Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The bucket whose completeness `complete` keeps.
    pub fn bucket(&self) -> async_nats::jetstream::kv::Store {
        self.kv.clone()
    }

    /// Registers an attempt of a task of `run`; the token is cancelled if the run is.
    fn register(self: &Arc<Self>, run: &str) -> InFlight {
        let token = CancellationToken::new();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .expect("cancellations lock")
            .entry(run.to_owned())
            .or_default()
            .push((id, token.clone()));
        InFlight {
            cancellations: self.clone(),
            run: run.to_owned(),
            id,
            token,
        }
    }

    /// Whether the run was cancelled (and why), as far as the bucket can tell: one read, and the
    /// bucket's completeness looked at after it.
    async fn check(&self, run: &str) -> Result<CancelledCheck, String> {
        let held = self.kv.get(run).await.map_err(|error| error.to_string())?;
        Ok(check_cancelled(
            held.map(|reason| String::from_utf8_lossy(&reason).into_owned()),
            self.complete.is_complete(),
        ))
    }

    /// Cancels the attempts in flight of runs as they are cancelled, until shutdown. Watched
    /// again, from what the bucket holds, whenever the bucket is found complete anew (refilled
    /// after it was replaced: a watch does not follow a recreated bucket).
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut found_complete = self.complete.changes();
        loop {
            let mut updates = match self.kv.watch_with_history(">").await {
                Ok(updates) => updates,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot watch cancelled runs; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = updates.next() => entry,
                    changed = found_complete.changed() => {
                        if changed.is_err() || *found_complete.borrow_and_update() {
                            break;
                        }
                        continue;
                    }
                };
                match entry {
                    Some(Ok(entry))
                        if entry.operation == async_nats::jetstream::kv::Operation::Put =>
                    {
                        let tokens = self
                            .in_flight
                            .lock()
                            .expect("cancellations lock")
                            .remove(&entry.key);
                        for (_, token) in tokens.into_iter().flatten() {
                            token.cancel();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::warn!(error = %error_chain(&error), "watching cancelled runs failed; rewatching");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}

/// One attempt in flight; unregisters itself when dropped.
struct InFlight {
    cancellations: Arc<Cancellations>,
    run: String,
    id: u64,
    token: CancellationToken,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = self
            .cancellations
            .in_flight
            .lock()
            .expect("cancellations lock");
        if let Some(tokens) = in_flight.get_mut(&self.run) {
            tokens.retain(|(id, _)| *id != self.id);
            if tokens.is_empty() {
                in_flight.remove(&self.run);
            }
        }
    }
}

/// Why a task message was not done with.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Not a task that can be run: dead-lettered without running.
    #[error("{0}")]
    Unrunnable(String),
    /// The attempt failed and the task has attempts left: delivered again after its backoff.
    #[error("{error}")]
    Retry { delay: Duration, error: String },
    /// Out of attempts: reported `DEAD`, then dead-lettered.
    #[error("{error}")]
    Dead { error: String, attempt: u32 },
    /// NATS (the result, the cancelled-runs bucket): delivered again.
    #[error("{0}")]
    Transient(String),
    /// Transient failures until the task's deliveries ran out.
    #[error("gave up after {deliveries} deliveries: {error}")]
    GaveUp { deliveries: u32, error: String },
}

impl Unfinished for TaskError {
    fn then(&self) -> Then {
        match self {
            TaskError::Unrunnable(_) | TaskError::Dead { .. } | TaskError::GaveUp { .. } => {
                Then::DeadLetter { refused: None }
            }
            TaskError::Retry { delay, .. } => Then::RetryAfter(*delay),
            TaskError::Transient(_) => Then::Backoff,
        }
    }

    fn dead_letter_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            TaskError::Dead { attempt, .. } => {
                vec![(subjects::HEADER_ATTEMPTS, attempt.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

impl Handler for Executor {
    type Error = TaskError;

    async fn handle(&self, message: &Message) -> Result<(), TaskError> {
        self.process(message).await
    }

    /// No task message is taken while the finished-tasks or the cancelled-runs bucket is being
    /// refilled: it could only be handed back, and every delivery is an attempt of the task.
    fn ready(&self) -> impl std::future::Future<Output = ()> + Send {
        self.buckets_complete()
    }
}

impl Executor {
    /// Waits until both buckets are known complete.
    async fn buckets_complete(&self) {
        tokio::join!(
            self.complete.wait_complete(),
            self.cancellations.complete.wait_complete()
        );
    }

    async fn process(&self, message: &Message) -> Result<(), TaskError> {
        let task = match TaskInstance::decode(message.payload.as_ref()) {
            Ok(task) if !task.task_id.is_empty() => task,
            Ok(_) => {
                return Err(TaskError::Unrunnable(
                    "task message has no task_id".to_owned(),
                ));
            }
            Err(error) => {
                return Err(TaskError::Unrunnable(format!(
                    "not a TaskInstance: {error}"
                )));
            }
        };
        if let Some(problem) = subjects::result_subject_error(&task.activity_name, &task.run_id) {
            return Err(TaskError::Unrunnable(format!(
                "task {} not run: {problem}, so its result could never be reported",
                task.task_id
            )));
        }
        let task_type = message
            .subject
            .as_str()
            .strip_prefix("tasks.")
            .unwrap_or(message.subject.as_str())
            .to_owned();
        // The attempt within this series (RetryTask starts a new one), and overall.
        let series_attempt = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        let attempt = task.attempt_base.saturating_add(series_attempt);
        let span = tracing::info_span!(
            "attempt",
            otel.name = %format_args!("execute {}", task.r#type),
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            task.id = %task.task_id,
            task.type = %task.r#type,
            task.template = %task.template,
            task.attempt = attempt,
            task.status = tracing::field::Empty,
            run.id = %task.run_id,
            activity.name = %task.activity_name,
            executor.name = %self.name,
        );
        // Deliveries past the task's attempts: at most the limit, and never more than the attempt
        // numbers the orchestrator accepts past them (a later result would be refused).
        let max_attempts = effective_retry(task.retry.as_ref()).max_attempts;
        let deliveries = attempt::gives_up_at(max_attempts, self.max_deliveries);
        if !attempt::may_run(series_attempt, max_attempts) {
            return Err(TaskError::Unrunnable(format!(
                "task {} not run: delivered {series_attempt} times, past its {max_attempts} attempts and the {REDELIVERY_ALLOWANCE} deliveries allowed beyond them (earlier deliveries crashed or could not report)",
                task.task_id
            )));
        }
        match self
            .attempt(message, task_type, task, attempt, series_attempt)
            .instrument(span)
            .await
        {
            Err(TaskError::Transient(error)) if series_attempt >= deliveries => {
                Err(TaskError::GaveUp {
                    deliveries: series_attempt,
                    error,
                })
            }
            outcome => outcome,
        }
    }

    /// One attempt of a decoded task, in its span: run it (unless its run was cancelled), report
    /// the result, dead-letter it when it is out of attempts.
    async fn attempt(
        &self,
        message: &Message,
        task_type: String,
        task: TaskInstance,
        attempt: u32,
        series_attempt: u32,
    ) -> Result<(), TaskError> {
        let retry = effective_retry(task.retry.as_ref());
        let timeout = task
            .timeout
            .as_ref()
            .and_then(std_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let params = task
            .params
            .as_ref()
            .map(values::struct_to_json)
            .unwrap_or_else(|| serde_json::json!({}));

        // Registered before the check, so a cancel landing in between is still seen.
        let in_flight = self.cancellations.register(&task.run_id);
        let finished_key = subjects::finished_task_key(&task.task_id, &task_type);
        // Alive from here: a wait for the bucket, and the start report's ack, may take a while.
        let heartbeat = messaging::heartbeat(message, self.ack_wait / 3);
        let cancelled = loop {
            // A bucket was recreated and the orchestrator has not refilled it from Postgres
            // yet: the task may be finished, or its run cancelled. Kept in hand (a hand-back
            // would be one more delivery, an attempt lost) until the refill is done.
            tokio::select! {
                _ = self.buckets_complete() => {}
                _ = self.shutdown.cancelled() => {
                    return Err(TaskError::Transient(format!(
                        "task {} not run: shutting down while a bucket is refilled",
                        task.task_id
                    )));
                }
            }
            let (cancelled, finished) = tokio::join!(
                self.cancellations.check(&task.run_id),
                finished_tasks::check(
                    &self.finished_tasks,
                    &self.complete,
                    &finished_key,
                    task.attempt_base
                )
            );
            // Read while a bucket was being deleted: wait for the one declared again.
            let replaced =
                !self.complete.is_complete() || !self.cancellations.complete.is_complete();
            let cancelled = match cancelled {
                Err(_) if replaced => continue,
                cancelled => cancelled.map_err(|error| {
                    TaskError::Transient(format!(
                        "cannot check whether the run of task {} was cancelled: {error}",
                        task.task_id
                    ))
                })?,
            };
            let finished = match finished {
                Err(_) if replaced => continue,
                finished => finished.map_err(|error| {
                    TaskError::Transient(format!(
                        "cannot check whether task {} is finished: {error}",
                        task.task_id
                    ))
                })?,
            };
            match finished {
                FinishedCheck::Finished(by) => {
                    // Its message came back after the task ended (a consumer recreated over
                    // messages a server failed to remove, a copy published again): never run
                    // it again.
                    tracing::warn!(task.id = %task.task_id, finished_by = by, attempt, "task already finished; not run again");
                    metrics::record_attempt(&task_type, "already_finished", Duration::ZERO);
                    return Ok(());
                }
                FinishedCheck::Unproven => {
                    tracing::info!(task.id = %task.task_id, "the finished-tasks bucket is being refilled; the task waits for it");
                    continue;
                }
                FinishedCheck::ToRun => {}
            }
            match cancelled {
                CancelledCheck::Cancelled(reason) => break Some(reason),
                CancelledCheck::NotCancelled => break None,
                CancelledCheck::Unproven => {
                    tracing::info!(task.id = %task.task_id, "the cancelled-runs bucket is being refilled; the task waits for it");
                }
            }
        };
        let started_at = Utc::now();
        if cancelled.is_none() {
            // Every start is on record before anything runs: a start whose result a crash loses
            // still shows in the attempt history, and a task whose report can go nowhere never runs.
            self.report_started(&task, attempt, started_at)
                .await
                .map_err(|error| {
                    TaskError::Transient(format!(
                        "cannot report task {} started (it is not run until that is recorded): {}",
                        task.task_id,
                        error_chain(&error)
                    ))
                })?;
        }
        let outcome = match cancelled {
            Some(reason) => Err(Stopped::Cancelled(reason)),
            None => {
                let outcome = tokio::select! {
                    outcome = tokio::time::timeout(
                        timeout,
                        self.builtins.run(&task.r#type, &task.task_id, &params, &task.secret_headers),
                    ) => match outcome {
                        Ok(outcome) => outcome.map_err(Stopped::Failed),
                        Err(_) => Err(Stopped::Failed(TaskFailure::retryable(format!(
                            "timed out after {timeout:?}"
                        )))),
                    },
                    _ = in_flight.token.cancelled() => Err(Stopped::Cancelled(
                        "the run was cancelled while the task ran".to_owned(),
                    )),
                };
                outcome
            }
        };
        drop(heartbeat);
        drop(in_flight);

        let end = match &outcome {
            Ok(_) => AttemptEnd::Succeeded,
            Err(Stopped::Cancelled(_)) => AttemptEnd::Cancelled,
            Err(Stopped::Failed(failure)) => AttemptEnd::Failed {
                retryable: failure.retryable,
                retry_after: failure.retry_after,
            },
        };
        let Verdict {
            status,
            disposition,
        } = attempt::verdict(end, series_attempt, &retry, &task.task_id);
        let (error, output) = match outcome {
            Ok(output) => (String::new(), Some(output)),
            Err(Stopped::Cancelled(reason)) => (reason, None),
            Err(Stopped::Failed(failure)) => (failure.message, None),
        };
        match disposition {
            Disposition::Ack if status == TaskStatus::Cancelled => {
                tracing::info!(task.id = %task.task_id, run.id = %task.run_id, "task of a cancelled run not run");
            }
            Disposition::Ack => {}
            Disposition::RetryAfter(delay) => {
                tracing::warn!(task.id = %task.task_id, task.type = %task.r#type, attempt, error = %error, retry_in = ?delay, "task attempt failed");
            }
            Disposition::DeadLetter => {
                tracing::warn!(task.id = %task.task_id, task.type = %task.r#type, attempt, error = %error, "task dead");
            }
        }
        let span = tracing::Span::current();
        span.record("task.status", status.as_str_name());
        if matches!(status, TaskStatus::Failed | TaskStatus::Dead) {
            span.record("otel.status_code", "ERROR");
            span.record(
                "otel.status_description",
                messaging::one_line(&error).as_str(),
            );
        }
        let ran = (Utc::now() - started_at).to_std().unwrap_or_default();
        metrics::record_attempt(&task_type, task_outcome(status), ran);
        let result = TaskResult {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            activity_id: task.activity_id.clone(),
            attempt,
            status: status as i32,
            error: error.clone(),
            output: output.as_ref().map(values::json_to_value),
            finished_at: Some(chrono_to_timestamp(Utc::now())),
            executor: self.name.clone(),
            started_at: Some(chrono_to_timestamp(started_at)),
            r#type: task.r#type.clone(),
            retryable: status == TaskStatus::Failed,
            result_token: task.result_token.clone(),
            // Its start report names the execution; the outcome is the attempt's.
            execution: String::new(),
        };
        if let Err(e) = messaging::publish_confirmed(
            &self.builtins.js,
            subjects::result_subject(&task.activity_name, &task.run_id),
            &subjects::result_msg_id(&task.task_id, attempt, status.as_str_name()),
            None,
            result.encode_to_vec().into(),
        )
        .await
        {
            return Err(TaskError::Transient(format!(
                "cannot report the result of task {} (it will run again): {}",
                task.task_id,
                error_chain(&e)
            )));
        }
        if task_is_terminal(status) {
            // The stream has the final result: tell every executor before the message is
            // settled, so a copy of it that comes back is never run again, even before the
            // orchestrator records the result. If this fails, the orchestrator writes it when it
            // records the result; not worth running the task again for.
            if let Err(error) =
                finished_tasks::raise(&self.finished_tasks, &finished_key, attempt, true).await
            {
                tracing::warn!(task.id = %task.task_id, attempt, %error, "task finished but not marked finished yet (the orchestrator will)");
            }
        }
        match disposition {
            Disposition::Ack => Ok(()),
            Disposition::RetryAfter(delay) => Err(TaskError::Retry { delay, error }),
            Disposition::DeadLetter => Err(TaskError::Dead { error, attempt }),
        }
    }

    /// Reports this execution of the attempt started (`RUNNING`, with an id of its own), and
    /// waits until the results stream has it.
    async fn report_started(
        &self,
        task: &TaskInstance,
        attempt: u32,
        started_at: chrono::DateTime<Utc>,
    ) -> Result<(), async_nats::jetstream::context::PublishError> {
        let execution = uuid::Uuid::new_v4().to_string();
        let report = TaskResult {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            activity_id: task.activity_id.clone(),
            attempt,
            status: TaskStatus::Running as i32,
            executor: self.name.clone(),
            started_at: Some(chrono_to_timestamp(started_at)),
            r#type: task.r#type.clone(),
            result_token: task.result_token.clone(),
            execution: execution.clone(),
            ..TaskResult::default()
        };
        let msg_id = format!(
            "{}:{execution}",
            subjects::result_msg_id(&task.task_id, attempt, TaskStatus::Running.as_str_name())
        );
        messaging::publish_confirmed(
            &self.builtins.js,
            subjects::result_subject(&task.activity_name, &task.run_id),
            &msg_id,
            None,
            report.encode_to_vec().into(),
        )
        .await
        .map(drop)
    }
}

/// Why an attempt did not succeed.
enum Stopped {
    Failed(TaskFailure),
    Cancelled(String),
}

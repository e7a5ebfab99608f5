//! Consuming `dlq.tasks.>`: a task an executor dead-lettered ends `DEAD` with the dead letter's
//! error, whatever happened to its result.
//!
//! An executor dead-letters a task when it is out of attempts (after reporting it `DEAD`: such a
//! letter carries `Taskfactory-Attempts` and is left to that result), when its message cannot be
//! run at all, and when it gave up after the delivery limit because its result could not be
//! reported (a result subject nothing stores, NATS refusing it). In the last two cases no result
//! reaches `results.>`, and without this the task, and its run, would wait forever. The dead letter carries the `TaskInstance` it was handed, so the `DEAD` recorded here
//! is judged like any executor's result (`model::results::judge`): it needs the task's result
//! token, names the task's type, run and activity, and changes nothing about a task already final.
//! A dead letter that is not a task, or that its task refuses, is only logged and counted: it is a
//! dead letter already. One whose `DEAD` the database refuses for its data ends the task `DEAD`
//! all the same, with an error naming the refusal ([`ResultSink::process`]).

use async_nats::jetstream::Message;
use prost::Message as _;
use std::sync::Arc;
use taskfactory_model::results::REDELIVERY_ALLOWANCE;
use taskfactory_model::spec::{MAX_ATTEMPTS_LIMIT, chrono_to_timestamp, effective_retry};
use taskfactory_model::subjects;
use taskfactory_proto::v1::{TaskInstance, TaskResult, TaskStatus};
use taskfactory_runtime::messaging::{Handler, Then, Unfinished};

use crate::results::{ResultError, ResultSink};

pub struct DeadTasks {
    pub sink: Arc<ResultSink>,
}

/// Why a dead-lettered task was not recorded `DEAD` yet: only the database or NATS, retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeadTaskError(String);

impl Unfinished for DeadTaskError {
    fn then(&self) -> Then {
        Then::Backoff
    }
}

impl Handler for DeadTasks {
    type Error = DeadTaskError;

    async fn handle(&self, message: &Message) -> Result<(), DeadTaskError> {
        // A letter with an attempt count follows a DEAD result its executor reported (and the
        // results stream acknowledged) first: that result decides the task, with its own error.
        let reported = message
            .headers
            .as_ref()
            .is_some_and(|headers| headers.get(subjects::HEADER_ATTEMPTS).is_some());
        if reported {
            return Ok(());
        }
        let Some((result, series_base)) = dead_result(message) else {
            tracing::warn!(subject = %message.subject, "a dead letter on dlq.tasks that is not a task; left as it is");
            taskfactory_runtime::metrics::record_refused("dead_task", "not_a_task");
            return Ok(());
        };
        // A letter of an earlier series (the task was redriven by RetryTask since) decides
        // nothing about the series running now.
        let Ok(task_id) = result.task_id.parse::<uuid::Uuid>() else {
            tracing::warn!(task.id = %result.task_id, "a dead letter naming no task id; left as it is");
            taskfactory_runtime::metrics::record_refused("dead_task", "not_a_task");
            return Ok(());
        };
        let current_base: Option<i32> =
            sqlx::query_scalar("SELECT attempt_base FROM tasks WHERE id = $1")
                .bind(task_id)
                .fetch_optional(&self.sink.pool)
                .await
                .map_err(|error| DeadTaskError(format!("cannot read the task: {error}")))?;
        if current_base.is_some_and(|base| i64::from(base) > i64::from(series_base)) {
            tracing::info!(task.id = %result.task_id, "a dead letter of an earlier attempt series; the task was redriven since");
            return Ok(());
        }
        match self.sink.process(result).await {
            Ok(()) => Ok(()),
            Err(ResultError::Transient(error)) => Err(DeadTaskError(error)),
            Err(ResultError::Refused { task, refusal }) => {
                tracing::error!(task.id = %task, %refusal, "a dead-lettered task its task refuses; not recorded");
                taskfactory_runtime::metrics::record_refused("dead_task", refusal.reason());
                Ok(())
            }
            // The task took the attempt with the reason in its place, unless that was refused too
            // (the error says which): the letter stays on the dead-letter stream as it is.
            Err(ResultError::Unstorable(error)) => {
                tracing::error!(%error, "a dead-lettered task whose DEAD result the database refuses");
                taskfactory_runtime::metrics::record_refused("dead_task", "unstorable");
                Ok(())
            }
            Err(ResultError::UnknownTask(task)) => {
                tracing::warn!(task.id = %task, "a dead-lettered task that does not exist; not recorded");
                taskfactory_runtime::metrics::record_refused("dead_task", "unknown_task");
                Ok(())
            }
            Err(ResultError::Undecodable(error)) => {
                tracing::warn!(%error, "a dead-lettered task that names no task; not recorded");
                taskfactory_runtime::metrics::record_refused("dead_task", "not_a_task");
                Ok(())
            }
        }
    }
}

/// The `DEAD` result a dead-lettered task stands for, and the `attempt_base` of its series, if
/// the dead letter holds a task.
fn dead_result(message: &Message) -> Option<(TaskResult, u32)> {
    let task = TaskInstance::decode(message.payload.as_ref()).ok()?;
    if task.task_id.is_empty() {
        return None;
    }
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
    };
    let error = header(subjects::HEADER_ERROR)
        .filter(|error| !error.is_empty())
        .unwrap_or_else(|| "dead-lettered by its executor".to_owned());
    // The attempt the executor counted, else the delivery it was dead-lettered on, kept within
    // the numbers the series handed out.
    let series = header(subjects::HEADER_ATTEMPTS)
        .and_then(|attempts| attempts.parse::<u32>().ok())
        .map(|attempts| attempts.saturating_sub(task.attempt_base))
        .or_else(|| header(subjects::HEADER_DELIVERIES).and_then(|d| d.parse::<u32>().ok()))
        .unwrap_or(1)
        .clamp(1, MAX_ATTEMPTS_LIMIT + REDELIVERY_ALLOWANCE);
    let max_attempts = effective_retry(task.retry.as_ref())
        .max_attempts
        .min(MAX_ATTEMPTS_LIMIT);
    let attempt = task
        .attempt_base
        .saturating_add(series.min(max_attempts + REDELIVERY_ALLOWANCE));
    let now = chrono_to_timestamp(chrono::Utc::now());
    let series_base = task.attempt_base;
    let result = TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        activity_id: task.activity_id,
        attempt,
        status: TaskStatus::Dead as i32,
        error: format!("dead-lettered: {error}"),
        executor: "dead letter".to_owned(),
        started_at: Some(now),
        finished_at: Some(now),
        r#type: task.r#type,
        result_token: task.result_token,
        ..TaskResult::default()
    };
    Some((result, series_base))
}

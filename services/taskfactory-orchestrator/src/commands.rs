//! Commands from the admin API, which the orchestrator carries out because it owns runs and tasks:
//! `CancelRun`, `CompleteTask` (human tasks) and `RetryTask` (redrive a dead task). They arrive as
//! requests on `taskfactory.internal.commands` (one orchestrator of the queue group answers), as
//! JSON: `{"op": "cancel", "run": id, "reason": …}`, `{"op": "complete", "task": id, "failed":
//! bool, "output": any, "error": …}`, `{"op": "retry", "task": id}`. The answer is `{"ok": true}`
//! or `{"error": …, "code": "not_found" | "failed_precondition" | "internal"}`.
//!
//! A cancel is answered only after the run is recorded as cancelled *and* its id is in the
//! cancelled-runs KV bucket, which executors read before every attempt: once the caller has the
//! answer, none of the run's tasks starts.

use std::sync::Arc;

use prost::Message as _;
use serde_json::json;
use taskfactory_model::ids::{RunId, TaskId};
use taskfactory_model::subjects;
use taskfactory_proto::v1::{TaskInstance, TaskStatus};
use taskfactory_runtime::telemetry::error_chain;
use taskfactory_runtime::{finished_tasks, messaging};
use tokio_util::sync::CancellationToken;

use crate::spawn::Spawner;
use crate::store::{self, Cancelled, Recorded, ResultRecord};

/// What answering needs.
pub struct Commands {
    pub spawner: Arc<Spawner>,
    pub cancelled_runs: async_nats::jetstream::kv::Store,
    pub finished_tasks: async_nats::jetstream::kv::Store,
}

/// A command that could not be carried out, with the gRPC-ish code the admin API maps it to.
struct Refusal {
    code: &'static str,
    message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(error: sqlx::Error) -> Self {
        refuse("internal", format!("database: {}", error_chain(&error)))
    }
}

/// Commands carried out at once, at most: each is a few statements on one connection, and the
/// admin API asks for one per call.
const COMMANDS_AT_ONCE: usize = 32;

/// Answers commands until shutdown.
pub async fn serve(nats: async_nats::Client, commands: Arc<Commands>, shutdown: CancellationToken) {
    messaging::answer_requests(
        nats,
        subjects::RUN_COMMANDS,
        subjects::PREVIEW_QUEUE,
        "CancelRun, CompleteTask and RetryTask",
        messaging::AtOnce {
            requests: COMMANDS_AT_ONCE,
            busy: json!({
                "error": format!("this orchestrator is carrying out {COMMANDS_AT_ONCE} commands at once already; retry in a moment"),
                "code": "unavailable",
            }),
        },
        shutdown,
        move |headers, payload| {
            let commands = commands.clone();
            async move {
                if let Err(refusal) = crate::admin_requests::admit(
                    &commands.spawner.pool,
                    "command",
                    headers.as_ref(),
                    &payload,
                )
                .await
                {
                    return json!({"error": refusal.message, "code": "permission_denied"});
                }
                match commands.carry_out(&payload).await {
                    Ok(()) => json!({"ok": true}),
                    Err(refusal) => json!({"error": refusal.message, "code": refusal.code}),
                }
            }
        },
    )
    .await;
}

impl Commands {
    async fn carry_out(&self, body: &[u8]) -> Result<(), Refusal> {
        let command: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| refuse("internal", format!("command is not JSON: {e}")))?;
        let text = |name: &str| command[name].as_str().unwrap_or_default().to_owned();
        match command["op"].as_str() {
            Some("cancel") => {
                let run: RunId = text("run")
                    .parse()
                    .map_err(|_| refuse("not_found", "no such run"))?;
                self.cancel(run, &text("reason")).await
            }
            Some("complete") => {
                let task: TaskId = text("task")
                    .parse()
                    .map_err(|_| refuse("not_found", "no such task"))?;
                let failed = command["failed"].as_bool().unwrap_or(false);
                let output = command.get("output").cloned().filter(|o| !o.is_null());
                self.complete(task, failed, output, &text("error")).await
            }
            Some("retry") => {
                let task: TaskId = text("task")
                    .parse()
                    .map_err(|_| refuse("not_found", "no such task"))?;
                self.retry(task).await
            }
            other => Err(refuse("internal", format!("unknown command {other:?}"))),
        }
    }

    async fn cancel(&self, run: RunId, reason: &str) -> Result<(), Refusal> {
        let mut reason = if reason.trim().is_empty() {
            "cancelled through the admin API".to_owned()
        } else {
            format!("cancelled: {reason}")
        };
        taskfactory_model::values::make_storable_text(&mut reason);
        // Postgres first (the record, and what a late result is checked against), then the
        // executors: once the caller has the answer, none of the run's tasks starts.
        match store::cancel_run(&self.spawner.pool, run, &reason).await? {
            Cancelled::NotFound => Err(refuse("not_found", format!("run {run} not found"))),
            Cancelled::AlreadyFinished(status) => Err(refuse(
                "failed_precondition",
                format!("run {run} already finished ({})", status.as_str_name()),
            )),
            Cancelled::Now(activity) => {
                self.cancelled_runs
                    .put(run.to_string(), reason.clone().into())
                    .await
                    .map_err(|e| {
                        refuse(
                            "internal",
                            format!("the run is cancelled, but telling the executors failed ({e}); cancel again to retry"),
                        )
                    })?;
                tracing::info!(run.id = %run, %reason, "run cancelled");
                // Its tasks' places under their concurrency keys are free: a task in flight is
                // stopped by its executor as soon as it hears of the cancel.
                match store::run_task_keys(&self.spawner.pool, run).await {
                    Ok(keys) => self.spawner.task_gate.ask_all(keys),
                    Err(error) => {
                        tracing::warn!(run.id = %run, error = %error_chain(&error), "cannot ask the cancelled run's concurrency keys; the sweep will");
                    }
                }
                if let Err(error) = self.spawner.run_may_have_finished(run, activity).await {
                    tracing::warn!(run.id = %run, error = %error_chain(&error), "cancelled run not announced yet; the sweeper will");
                }
                Ok(())
            }
        }
    }

    async fn complete(
        &self,
        task: TaskId,
        failed: bool,
        output: Option<serde_json::Value>,
        error: &str,
    ) -> Result<(), Refusal> {
        let state = store::task_state(&self.spawner.pool, task)
            .await?
            .ok_or_else(|| refuse("not_found", format!("task {task} not found")))?;
        if state.status != TaskStatus::Waiting {
            return Err(refuse(
                "failed_precondition",
                format!(
                    "task {task} is {} (a {} task); only a human task that is WAITING can be completed",
                    state.status.as_str_name(),
                    state.task_type
                ),
            ));
        }
        let record = ResultRecord {
            execution: String::new(),
            task_id: task,
            attempt: state.attempts + 1,
            status: if failed {
                TaskStatus::Dead
            } else {
                TaskStatus::Succeeded
            },
            error: if failed && error.is_empty() {
                "marked failed through the admin API".to_owned()
            } else {
                error.to_owned()
            },
            output,
            executor: "admin-api".to_owned(),
            started_at: None,
            finished_at: Some(chrono::Utc::now()),
            claim: None,
        };
        self.record(record).await
    }

    /// Records a result the way the results consumer does, and announces a finished run.
    async fn record(&self, mut record: ResultRecord) -> Result<(), Refusal> {
        record.make_storable();
        match store::record_result(&self.spawner.pool, &record).await? {
            Recorded::UnknownTask => Err(refuse("not_found", "no such task")),
            // The orchestrator's own results name no task of their own: only a status that is
            // no result status is refused, and none is sent.
            Recorded::Refused(refusal) => Err(refuse("internal", refusal.to_string())),
            Recorded::AlreadyFinal => {
                Err(refuse("failed_precondition", "the task finished meanwhile"))
            }
            Recorded::Applied(completed, freed) => {
                if let Some(key) = freed {
                    self.spawner.task_gate.ask(key);
                }
                if let Some(run) = completed
                    && let Err(error) = self.spawner.run_finished(&run).await
                {
                    tracing::warn!(run.id = %run.id, error = %error_chain(&error), "finished run not announced yet; the sweeper will");
                }
                Ok(())
            }
        }
    }

    async fn retry(&self, task: TaskId) -> Result<(), Refusal> {
        let state = store::task_state(&self.spawner.pool, task)
            .await?
            .ok_or_else(|| refuse("not_found", format!("task {task} not found")))?;
        // A DEAD task gets a new series. A redriven task whose series never started gets its
        // series published again: that redrive's publish failed after it committed (an error
        // answered, or the orchestrator died in between), and nothing else would publish it.
        let redriven = match state.status {
            TaskStatus::Dead => match store::redrive_task(&self.spawner.pool, task).await {
                Ok(redriven) => redriven,
                Err(store::RedriveError::Database(error)) => return Err(error.into()),
                Err(no_room) => {
                    return Err(refuse(
                        "failed_precondition",
                        format!("task {task} cannot be retried now: {no_room}"),
                    ));
                }
            },
            TaskStatus::Pending => store::unstarted_redrive(&self.spawner.pool, task).await?,
            status => {
                return Err(refuse(
                    "failed_precondition",
                    format!(
                        "task {task} is {}; only a DEAD task can be retried",
                        status.as_str_name()
                    ),
                ));
            }
        };
        // The numbers come from the redrive itself: two retries racing each get their own.
        let Some(redriven) = redriven else {
            return Err(refuse(
                "failed_precondition",
                format!(
                    "task {task} cannot be retried: it is no longer dead (or its retried series \
                     started), or its run was cancelled"
                ),
            ));
        };
        // A new attempt series: attempts continue from where the last one ended.
        let mut instance = TaskInstance::decode(state.instance.as_slice())
            .map_err(|e| refuse("internal", format!("stored task does not decode: {e}")))?;
        instance.attempt_base = redriven.attempts;
        // A task stored before result tokens gets its token now (the redrive requires it).
        instance.result_token =
            taskfactory_model::results::result_token(&self.spawner.result_key, task.0);
        // Executors skip a task whose entry is above the series' base: one above every attempt
        // handed out (forged) must not keep the new series from running.
        let key = subjects::finished_task_key(&task.to_string(), &state.task_type);
        finished_tasks::lower_to(&self.finished_tasks, &key, redriven.attempts)
            .await
            .map_err(|e| {
                refuse(
                    "internal",
                    format!("preparing the retry: {e}; the task waits, PENDING: retry it again"),
                )
            })?;
        let series = redriven.series;
        messaging::publish_confirmed(
            &self.spawner.js,
            subjects::task_subject(&state.task_type),
            &store::series_message_id(task, series),
            None,
            instance.encode_to_vec().into(),
        )
        .await
        .map_err(|e| {
            refuse(
                "internal",
                format!("publishing the task again: {e}; the task waits, PENDING: retry it again"),
            )
        })?;
        tracing::info!(task.id = %task, run.id = %state.run, activity.id = %state.activity, series, "dead task redriven");
        Ok(())
    }

    /// Human tasks whose deadline passed die ("deadline passed").
    pub async fn expire_human_tasks(&self) {
        let expired = match store::expired_human_tasks(&self.spawner.pool, chrono::Utc::now()).await
        {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot look for expired human tasks");
                return;
            }
        };
        for (task, attempts) in expired {
            let record = ResultRecord {
                execution: String::new(),
                task_id: task,
                attempt: attempts + 1,
                status: TaskStatus::Dead,
                error: "deadline passed before the task was completed".to_owned(),
                output: None,
                executor: "orchestrator".to_owned(),
                started_at: None,
                finished_at: Some(chrono::Utc::now()),
                claim: None,
            };
            if let Err(refusal) = self.record(record).await {
                tracing::debug!(task.id = %task, error = %refusal.message, "expired human task not recorded");
            }
        }
    }
}

/// Every `every`, lets human tasks past their deadline die, until shutdown.
pub async fn run_deadline_sweeper(
    commands: Arc<Commands>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => commands.expire_human_tasks().await,
        }
    }
}

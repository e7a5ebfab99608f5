//! Consuming `results.>`: each TaskResult moves its task forward (the first terminal result wins;
//! later ones are kept as attempts), counts toward its run, and finishes and announces the run
//! when its last task is done.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use async_nats::jetstream::Message;
use prost::Message as _;
use sqlx::PgPool;
use taskfactory_model::ids::TaskId;
use taskfactory_model::spec::timestamp_to_chrono;
use taskfactory_model::{subjects, values};
use taskfactory_proto::v1::{TaskResult, TaskStatus};
use taskfactory_runtime::messaging::{self, Disposition};
use taskfactory_runtime::telemetry::error_chain;

use crate::completion;
use crate::store::{self, Recorded, ResultRecord};

pub struct ResultSink {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    /// Starts the next buffered run of an activity when one of its runs finishes.
    pub spawner: Arc<crate::spawn::Spawner>,
}

impl ResultSink {
    pub async fn handle(self: Arc<Self>, message: Message) {
        let disposition = self.process(&message).await;
        messaging::settle(&message, disposition).await;
    }

    async fn process(&self, message: &Message) -> Disposition {
        let result = match TaskResult::decode(message.payload.as_ref()) {
            Ok(result) => result,
            Err(error) => {
                return self
                    .reject(message, &format!("not a TaskResult: {error}"))
                    .await;
            }
        };
        let Ok(task_id) = result.task_id.parse::<TaskId>() else {
            return self
                .reject(
                    message,
                    &format!("task_id {:?} is not a task id", result.task_id),
                )
                .await;
        };
        let status = result.status();
        if status == TaskStatus::Unspecified || status == TaskStatus::Pending {
            return self
                .reject(
                    message,
                    &format!("status {} is not a result status", status.as_str_name()),
                )
                .await;
        }
        let span = tracing::info_span!(
            "record result",
            otel.name = %format_args!("record result {}", result.r#type),
            otel.status_code = tracing::field::Empty,
            task.id = %task_id,
            task.type = %result.r#type,
            task.attempt = result.attempt,
            task.status = status.as_str_name(),
            run.id = %result.run_id,
            executor.name = %result.executor,
        );
        let disposition = self
            .record(result, task_id, status)
            .instrument(span.clone())
            .await;
        if disposition != Disposition::Ack {
            span.record("otel.status_code", "ERROR");
        }
        disposition
    }

    /// Records a decoded result; announces the run when it was the last.
    async fn record(&self, result: TaskResult, task_id: TaskId, status: TaskStatus) -> Disposition {
        let mut record = ResultRecord {
            task_id,
            attempt: result.attempt,
            status,
            error: result.error.clone(),
            output: result.output.as_ref().map(values::value_to_json),
            executor: result.executor.clone(),
            started_at: result.started_at.as_ref().and_then(timestamp_to_chrono),
            finished_at: result.finished_at.as_ref().and_then(timestamp_to_chrono),
        };
        record.make_storable();
        let recorded = if status == TaskStatus::Running {
            store::record_running(&self.pool, &record).await
        } else {
            store::record_result(&self.pool, &record).await
        };
        match recorded {
            Ok(Recorded::UnknownTask) => {
                tracing::warn!(task.id = %task_id, "result for an unknown task ignored");
                Disposition::Ack
            }
            Ok(Recorded::AlreadyFinal) => {
                tracing::debug!(task.id = %task_id, attempt = result.attempt, "late result kept as an attempt");
                // A redelivery after the run finished but before it was announced lands here.
                self.retry_announcement(&result).await
            }
            Ok(Recorded::Applied(completed)) => {
                if let Some(run) = completed {
                    if let Err(error) = completion::announce(&self.pool, &self.js, &run).await {
                        tracing::warn!(run.id = %run.id, error = %error_chain(&error), "run finished but not announced; will retry");
                        // The result is recorded; the redelivery finds the run unannounced.
                        return self.retry_announcement(&result).await;
                    }
                    if let Err(error) = self.spawner.start_next(run.activity_id).await {
                        // The overlap sweeper starts it if this did not.
                        tracing::warn!(activity.id = %run.activity_id, error = %error_chain(&error), "cannot start the next buffered run yet");
                    }
                }
                Disposition::Ack
            }
            Err(error) => {
                tracing::warn!(task.id = %task_id, error = %error_chain(&error), "cannot record result; will retry");
                Disposition::Retry(Duration::from_secs(1))
            }
        }
    }

    async fn retry_announcement(&self, result: &TaskResult) -> Disposition {
        match result.run_id.parse() {
            Ok(run) => match completion::announce_if_finished(&self.pool, &self.js, run).await {
                Ok(()) => {
                    // The run that finished may have buffered runs behind it.
                    if let Ok(activity) = result.activity_id.parse()
                        && let Err(error) = self.spawner.start_next(activity).await
                    {
                        tracing::warn!(error = %error_chain(&error), "cannot start the next buffered run yet");
                    }
                    Disposition::Ack
                }
                Err(_) => Disposition::Retry(Duration::from_secs(2)),
            },
            Err(_) => Disposition::Ack,
        }
    }

    async fn reject(&self, message: &Message, error: &str) -> Disposition {
        tracing::error!(subject = %message.subject, %error, "undecodable result; dead-lettered");
        match messaging::dead_letter(
            &self.js,
            subjects::RESULTS_DLQ_SUBJECT.to_owned(),
            message,
            error,
        )
        .await
        {
            Ok(()) => Disposition::Term,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not dead-letter result; it will be redelivered");
                Disposition::Retry(Duration::from_secs(5))
            }
        }
    }
}

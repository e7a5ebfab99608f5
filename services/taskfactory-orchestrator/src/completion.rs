//! Announcing finished runs on `events.taskfactory.run.completed` (activities can chain on it).
//!
//! A run is announced exactly once in effect: the announcement is published with
//! `Nats-Msg-Id = run-completed:<run id>` and then marked in Postgres; a crash in between is
//! repaired by the next delivery of any message about the run, or else by [`run_sweeper`]
//! (deduplicated by JetStream either way).

use taskfactory_model::ids::RunId;
use taskfactory_model::subjects;
use taskfactory_runtime::messaging;

use crate::store::{self, CompletedRun, RunMarks};

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Mark(#[from] store::MarkError),
    #[error("failed to publish run completion")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
}

/// The JSON body of a run-completed event.
pub fn completion_event(run: &CompletedRun) -> serde_json::Value {
    serde_json::json!({
        "runId": run.id.to_string(),
        "activityId": run.activity_id.to_string(),
        "activityName": run.activity_name,
        "status": run.status.as_str_name(),
        "tasksSpawned": run.tasks_spawned,
        "tasksSucceeded": run.tasks_succeeded,
        "tasksFailed": run.tasks_failed,
        "finishedAt": run.finished_at.map(|t| t.to_rfc3339()),
    })
}

pub async fn announce(
    marks: &RunMarks,
    js: &async_nats::jetstream::Context,
    run: &CompletedRun,
) -> Result<(), AnnounceError> {
    let body = serde_json::to_vec(&completion_event(run)).expect("a JSON value serializes");
    messaging::publish_confirmed(
        js,
        subjects::RUN_COMPLETED_EVENT.to_owned(),
        &format!("run-completed:{}", run.id),
        None,
        body.into(),
    )
    .await?;
    marks.announced(run.id).await?;
    tracing::info!(run.id = %run.id, activity.name = %run.activity_name, status = run.status.as_str_name(), "run finished");
    Ok(())
}

/// Announces the run if it is finished and not announced yet.
pub async fn announce_if_finished(
    marks: &RunMarks,
    js: &async_nats::jetstream::Context,
    run: RunId,
) -> Result<(), AnnounceError> {
    if let Some(completed) = store::unannounced_completion(marks.pool(), run).await? {
        announce(marks, js, &completed).await?;
    }
    Ok(())
}

/// Announces finished runs that were missed, every `every`, until shutdown.
pub async fn run_sweeper(
    marks: RunMarks,
    js: async_nats::jetstream::Context,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = chrono::Utc::now() - chrono::Duration::from_std(every).unwrap_or_default();
        let runs = match store::unannounced_runs(marks.pool(), before, 500).await {
            Ok(runs) => runs,
            Err(error) => {
                tracing::warn!(error = %taskfactory_runtime::telemetry::error_chain(&error), "cannot look for unannounced runs");
                continue;
            }
        };
        for run in runs {
            if shutdown.is_cancelled() {
                return;
            }
            if let Err(error) = announce_if_finished(&marks, &js, run).await {
                tracing::warn!(run.id = %run, error = %taskfactory_runtime::telemetry::error_chain(&error), "cannot announce a finished run; will retry");
                break;
            }
        }
    }
}

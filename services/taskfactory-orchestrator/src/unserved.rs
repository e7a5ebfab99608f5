//! Tasks of a type nobody serves: after a grace period with no consumer on `tasks.<type>`, they
//! die with a clear error ("no executor serves task type X") instead of waiting forever, and their
//! messages are purged from the work queue (nobody would take them). An executor that appears
//! later serves the types' new tasks; `RetryTask` redrives the dead ones.

use std::collections::HashSet;
use std::time::Duration;

use futures::TryStreamExt as _;
use taskfactory_model::ids::TaskId;
use taskfactory_model::subjects;
use taskfactory_proto::v1::TaskStatus;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{self, Recorded, ResultRecord};

/// Every `every`, fails the tasks of unserved types that waited longer than `grace`.
pub async fn run_sweeper(
    spawner: std::sync::Arc<crate::spawn::Spawner>,
    grace: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sweep(&spawner, grace).await {
            tracing::warn!(error = %error_chain(error.as_ref()), "cannot look for tasks nobody serves");
        }
    }
}

async fn sweep(spawner: &crate::spawn::Spawner, grace: Duration) -> anyhow::Result<()> {
    let (pool, js) = (&spawner.pool, &spawner.js);
    let before = chrono::Utc::now() - chrono::Duration::from_std(grace)?;
    let types: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT type FROM tasks WHERE status = 'PENDING' AND created_at < $1 AND type <> 'human'",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    if types.is_empty() {
        return Ok(());
    }
    let stream = js.get_stream(subjects::TASKS_STREAM).await?;
    let filters: HashSet<String> = stream
        .consumers()
        .map_ok(|info| {
            // One filter, several, or none (`""`: the whole stream).
            if info.config.filter_subjects.is_empty() {
                vec![info.config.filter_subject.clone()]
            } else {
                info.config.filter_subjects.clone()
            }
        })
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    for (task_type,) in types {
        let subject = subjects::task_subject(&task_type);
        if is_served(&filters, &subject) {
            continue;
        }
        let stale: Vec<(Uuid, i32)> = sqlx::query_as(
            "SELECT id, attempts FROM tasks WHERE status = 'PENDING' AND type = $1 AND created_at < $2 LIMIT 1000",
        )
        .bind(&task_type)
        .bind(before)
        .fetch_all(pool)
        .await?;
        tracing::warn!(task.type = %task_type, tasks = stale.len(), "no executor serves this task type; its waiting tasks die");
        for (id, attempts) in stale {
            let record = ResultRecord {
                execution: String::new(),
                task_id: TaskId(id),
                attempt: u32::try_from(attempts).unwrap_or(0) + 1,
                status: TaskStatus::Dead,
                error: format!(
                    "no executor serves task type {task_type:?} (nothing consumed {subject} for {}s); start one, then RetryTask",
                    grace.as_secs()
                ),
                output: None,
                executor: "orchestrator".to_owned(),
                started_at: None,
                finished_at: Some(chrono::Utc::now()),
                claim: None,
            };
            if let Recorded::Applied(completed, freed) = store::record_result(pool, &record).await?
            {
                if let Some(key) = freed {
                    spawner.task_gate.ask(key);
                }
                if let Some(run) = completed
                    && let Err(error) = spawner.run_finished(&run).await
                {
                    tracing::warn!(run.id = %run.id, error = %error_chain(&error), "finished run not announced yet; the sweeper will");
                }
            }
        }
        // Nobody would take them: do not let them pile up in the work queue.
        if let Err(error) = stream.purge().filter(subject.clone()).await {
            tracing::warn!(%subject, error = %error, "cannot purge unserved tasks");
        }
    }
    Ok(())
}

/// Whether a consumer with one of these filters takes messages on `subject`: an exact filter, a
/// wildcard one (`tasks.*`, `tasks.image.>`), or none at all (the whole stream).
fn is_served(filters: &HashSet<String>, subject: &str) -> bool {
    filters
        .iter()
        .any(|filter| filter.is_empty() || subjects::subject_matches(filter, subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(list: &[&str]) -> HashSet<String> {
        list.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn a_type_is_served_by_any_consumer_whose_filter_covers_it() {
        let subject = subjects::task_subject("image.resize");
        assert!(is_served(&filters(&["tasks.image.resize"]), &subject));
        assert!(is_served(&filters(&["tasks.image.*"]), &subject));
        assert!(is_served(&filters(&["tasks.>"]), &subject));
        assert!(is_served(&filters(&["tasks.*.resize"]), &subject));
        assert!(
            is_served(&filters(&["", "tasks.log"]), &subject),
            "no filter: the whole stream"
        );
        assert!(
            !is_served(&filters(&["tasks.*"]), &subject),
            "one token only"
        );
        assert!(!is_served(&filters(&["tasks.image"]), &subject));
        assert!(!is_served(&filters(&["tasks.image.resize.big"]), &subject));
        assert!(!is_served(&filters(&["tasks.log", "tasks.http"]), &subject));
        assert!(!is_served(&filters(&[]), &subject));
    }
}

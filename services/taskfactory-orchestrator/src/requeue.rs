//! Tasks whose messages were lost with `FACTORY_TASKS`: when the stream is deleted and declared
//! again (by any service's keeper, see `runtime::nats::keep_declared`), the tasks still to be run
//! are published into the new one.
//!
//! The stream's creation time is its epoch: each look compares it with the one recorded in
//! Postgres (`task_stream_epochs`), and a newer one means a new stream, whose queue starts empty.
//! The tasks of `RUNNING` runs that are `PENDING` (never started) or `FAILED` (waiting for their
//! next attempt) are then published again, page by page across runs, before the new epoch is
//! recorded.
//!
//! Once, between replicas and across crashes: each page is read, published and its last task id
//! stored as the cursor (`requeue_of`, `requeue_after`) in one transaction holding the epoch's
//! row lock. A replica that finds the row locked leaves the page to its holder; one that takes
//! over after a crash goes on after the cursor, from page one only for a stream newer than the
//! cursor's. Only the page a crash interrupted goes out again: a `PENDING` task under the same
//! message id (within JetStream's two-minute duplicate window, a copy dropped), and executors
//! skip finished tasks (`taskfactory_finished_tasks`).
//!
//! Only into the stream the look began with: under the row lock, each page reads the stream's
//! creation time again, and a look that finds the stream replaced since (while it waited for the
//! results, say) stops there, leaving the newer stream to the next look. So the epoch recorded is
//! always the creation time of a stream there while its row was locked, and never goes back to an
//! older stream's once another replica has recorded a newer one.
//!
//! What the tasks show must be up to date: before its first page, a look waits until the
//! orchestrators have recorded every result published so far (the results consumer's ack floor),
//! so a task whose executor reported its start (or its end) before then no longer reads as
//! `PENDING` or `FAILED`. And a task is left out when it was changed after the new stream was
//! created, since whoever changed it then published it into the new stream: created or redriven
//! since (its spawn or its `RetryTask` publishes it), or with an attempt started since (the
//! stream's own message holds its next attempt; requeued again, it would get a second series).
//! Times are compared across clocks (NATS, Postgres, executors): they are assumed to agree far
//! better than the seconds between a stream's deletion and its declaration again.
//!
//! Each message is built from the task's row, never republished as stored (the stored instance
//! is the one its spawn made: a `RetryTask` redrive publishes a patched copy and stores none),
//! and carries the task's result token as every publisher's does:
//! - a `PENDING` task goes out as its current series: numbered after `attempt_base` (0, or the
//!   attempts before its last redrive), under the message id its publisher used
//!   (`store::series_message_id`), so a copy its spawn or redrive publishes at the same time is
//!   dropped as a duplicate. Sent with the spawn's `attempt_base` 0, a redriven task's message
//!   was taken by executors for finished by its earlier series, and never ran.
//! - a `FAILED` task continues its attempt numbering: its message starts a series after its
//!   attempts so far (`attempt_base`), with the attempts it has left as its `maxAttempts`, so it
//!   gets no more attempts in all than its policy allows.
//!
//! Not republished by the requeue: `RUNNING` tasks (an executor has it in hand and reports its
//! result), the same for an executor holding a message of the old stream whose start or end is
//! recorded only after the new stream was created, and tasks of runs that are not `RUNNING`. One
//! of those whose attempt then fails (its next attempt's message went to the deleted stream) is
//! published by a later look, once ([`publish_stragglers`], `tasks.requeued_for`). One whose
//! executor dies with it stays `RUNNING`: nothing tells it from a long attempt.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message as _;
use sqlx::{PgConnection, PgPool};
use taskfactory_model::ids::TaskId;
use taskfactory_model::subjects;
use taskfactory_proto::v1::{RetryPolicy, TaskInstance};
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Tasks read and published at a time.
const PAGE: i64 = 500;

/// How long a look waits for the results published before it to be recorded; past it, the look
/// fails and the next one waits again.
const RESULTS_PATIENCE: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The results published before a requeue are not all recorded yet.
#[derive(Debug, thiserror::Error)]
#[error(
    "results up to sequence {last} of FACTORY_RESULTS are not all recorded (the orchestrators' consumer acked up to {acked}); tasks are published again once they are"
)]
pub struct ResultsNotRecorded {
    last: u64,
    acked: u64,
}

/// Every `every`, looks at `FACTORY_TASKS`'s creation time and publishes the tasks still to be
/// run again when it is a new stream, until shutdown. `result_key` makes their result tokens;
/// `publish_window` publishes are in flight at once (`--publish-window`, as for a spawn).
pub async fn run(
    pool: PgPool,
    js: async_nats::jetstream::Context,
    result_key: Arc<[u8]>,
    publish_window: usize,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let looked = tokio::select! {
            _ = shutdown.cancelled() => return,
            looked = look(&pool, &js, &result_key, publish_window) => looked,
        };
        if let Err(error) = looked {
            tracing::warn!(error = %error_chain(error.as_ref()), "cannot publish the tasks still to be run into a replaced FACTORY_TASKS");
        }
    }
}

/// One look: republishes when the stream is newer than the epoch recorded.
async fn look(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    result_key: &[u8],
    publish_window: usize,
) -> Result<(), BoxError> {
    // Missing (being declared again) or not answering: the next look sees the new one.
    let Some(created) = stream_created(js).await else {
        return Ok(());
    };
    let recorded: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT created FROM task_stream_epochs WHERE stream = $1")
            .bind(subjects::TASKS_STREAM)
            .fetch_optional(pool)
            .await?;
    match recorded {
        // The first look ever: the stream holds its tasks.
        None => {
            sqlx::query(
                "INSERT INTO task_stream_epochs (stream, created) VALUES ($1, $2) \
                 ON CONFLICT (stream) DO NOTHING",
            )
            .bind(subjects::TASKS_STREAM)
            .bind(created)
            .execute(pool)
            .await?;
            return Ok(());
        }
        // Equal, not older: a stream declared again on a server whose clock is behind is new too.
        Some((recorded,)) if recorded == created => {
            return publish_stragglers(pool, js, result_key, publish_window, created).await;
        }
        Some(_) => {}
    }
    results_recorded(js).await?;
    let mut published = 0;
    loop {
        match publish_page(pool, js, result_key, publish_window, created).await? {
            Page::Published(count) => published += count,
            Page::Last(count) => {
                tracing::warn!(
                    published = published + count,
                    %created,
                    "FACTORY_TASKS was deleted and declared again: tasks still to be run published into the new one"
                );
                return Ok(());
            }
            Page::NotMine => return Ok(()),
        }
    }
}

/// A stream's creation time (nanoseconds since the epoch) as Postgres keeps it (microseconds).
fn epoch(created_nanos: i128) -> DateTime<Utc> {
    let micros = i64::try_from(created_nanos / 1000).unwrap_or(i64::MAX);
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// Waits until the orchestrators have recorded every result published so far: the results
/// consumer acked everything up to the stream's last message.
async fn results_recorded(js: &async_nats::jetstream::Context) -> Result<(), BoxError> {
    let mut stream = js.get_stream(subjects::RESULTS_STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let deadline = tokio::time::Instant::now() + RESULTS_PATIENCE;
    loop {
        let consumer = stream
            .consumer_info(subjects::ORCHESTRATOR_RESULTS_CONSUMER)
            .await?;
        let acked = consumer.ack_floor.stream_sequence;
        if acked >= last || (consumer.num_pending == 0 && consumer.num_ack_pending == 0) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ResultsNotRecorded { last, acked }.into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one step of a requeue did.
#[derive(Debug, PartialEq, Eq)]
enum Page {
    /// Published a page (this many tasks); more may follow.
    Published(usize),
    /// Published the last page (this many tasks) and recorded the epoch.
    Last(usize),
    /// Another replica is publishing a page, or the requeue is done: nothing to do for this
    /// look.
    NotMine,
}

/// `(created, requeue_of, requeue_after)` of `task_stream_epochs`.
type EpochRow = (DateTime<Utc>, Option<DateTime<Utc>>, Option<Uuid>);

/// Claims the requeue into the stream created at `created` (the epoch row's lock), if that stream
/// is still there, publishes the page after its cursor, and moves the cursor on (or records the
/// epoch after the last page), in one transaction: a crash before its commit leaves the cursor
/// where it was.
async fn publish_page(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    result_key: &[u8],
    publish_window: usize,
    created: DateTime<Utc>,
) -> Result<Page, BoxError> {
    let mut tx = pool.begin().await?;
    let claimed = claim_epoch(&mut tx).await?;
    let Some((recorded, requeue_of, requeue_after)) = claimed else {
        return Ok(Page::NotMine);
    };
    if recorded == created {
        return Ok(Page::NotMine);
    }
    // Missing (being declared again) or not answering: the next look sees the new one.
    let Some(now) = stream_created(js).await else {
        return Ok(Page::NotMine);
    };
    if now != created {
        tracing::warn!(%created, %now, "FACTORY_TASKS was replaced again during the look; the next look publishes into the new one");
        return Ok(Page::NotMine);
    }
    // A cursor of another stream's requeue counts for nothing: this one starts from page one.
    let after = match (requeue_of, requeue_after) {
        (Some(of), Some(after)) if of == created => after,
        _ => {
            tracing::warn!(%recorded, %created, "FACTORY_TASKS was deleted and declared again; publishing the tasks still to be run into the new one");
            Uuid::nil()
        }
    };
    let page = tasks_to_run(&mut tx, after, created, PAGE, Which::PendingOrFailed).await?;
    publish(&mut tx, js, result_key, publish_window, &page, created).await?;
    let full = page.len() >= usize::try_from(PAGE).unwrap_or(usize::MAX);
    let step = match page.last() {
        Some(last) if full => {
            sqlx::query(
                "UPDATE task_stream_epochs SET requeue_of = $2, requeue_after = $3 \
                 WHERE stream = $1",
            )
            .bind(subjects::TASKS_STREAM)
            .bind(created)
            .bind(last.id.0)
            .execute(&mut *tx)
            .await?;
            Page::Published(page.len())
        }
        _ => {
            sqlx::query(
                "UPDATE task_stream_epochs \
                 SET created = $2, requeue_of = NULL, requeue_after = NULL WHERE stream = $1",
            )
            .bind(subjects::TASKS_STREAM)
            .bind(created)
            .execute(&mut *tx)
            .await?;
            Page::Last(page.len())
        }
    };
    tx.commit().await?;
    Ok(step)
}

/// Publishes the tasks the requeue into the stream created at `created` left behind: those an
/// executor had in hand when the stream was replaced (`RUNNING`, so not requeued) whose attempt
/// failed afterwards; their next attempt's message went to the deleted stream. Each is published
/// into the stream once (`tasks.requeued_for`), under the epoch row's lock, once the requeue
/// itself is done.
async fn publish_stragglers(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    result_key: &[u8],
    publish_window: usize,
    created: DateTime<Utc>,
) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    let claimed = claim_epoch(&mut tx).await?;
    if !matches!(claimed, Some((recorded, _, _)) if recorded == created) {
        return Ok(());
    }
    // Still the stream the look began with (as for a page of the requeue).
    if stream_created(js).await != Some(created) {
        return Ok(());
    }
    let page = tasks_to_run(&mut tx, Uuid::nil(), created, PAGE, Which::Failed).await?;
    if page.is_empty() {
        return Ok(());
    }
    publish(&mut tx, js, result_key, publish_window, &page, created).await?;
    tx.commit().await?;
    tracing::warn!(
        published = page.len(),
        %created,
        "tasks whose attempt failed after FACTORY_TASKS was replaced published into the new one"
    );
    Ok(())
}

/// The epoch row, locked for the rest of the transaction; `None` while another replica holds it.
async fn claim_epoch(tx: &mut PgConnection) -> Result<Option<EpochRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT created, requeue_of, requeue_after FROM task_stream_epochs \
         WHERE stream = $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(subjects::TASKS_STREAM)
    .fetch_optional(tx)
    .await
}

/// `FACTORY_TASKS`'s creation time; `None` while it is missing or not answering.
async fn stream_created(js: &async_nats::jetstream::Context) -> Option<DateTime<Utc>> {
    let stream = js.get_stream(subjects::TASKS_STREAM).await.ok()?;
    Some(epoch(stream.cached_info().created.unix_timestamp_nanos()))
}

/// Publishes `page` into the stream created at `created` (each task built from its row) and
/// records that it was, in `tx`.
async fn publish(
    tx: &mut PgConnection,
    js: &async_nats::jetstream::Context,
    result_key: &[u8],
    publish_window: usize,
    page: &[ToRun],
    created: DateTime<Utc>,
) -> Result<(), BoxError> {
    let messages = page
        .iter()
        .map(|task| Ok((task.id, task.message(result_key)?, task.task_type.as_str())))
        .collect::<Result<Vec<_>, prost::DecodeError>>()?;
    crate::spawn::publish_task_messages(
        js,
        publish_window,
        messages
            .iter()
            .map(|(id, (msg_id, instance), task_type)| (*id, msg_id.clone(), *task_type, instance)),
    )
    .await?;
    mark_requeued(tx, page, created).await?;
    Ok(())
}

/// Records that these tasks were published into the stream created at `created`.
async fn mark_requeued(
    tx: &mut PgConnection,
    page: &[ToRun],
    created: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = page.iter().map(|task| task.id.0).collect();
    sqlx::query("UPDATE tasks SET requeued_for = $2 WHERE id = ANY($1)")
        .bind(&ids)
        .bind(created)
        .execute(tx)
        .await?;
    Ok(())
}

/// Which tasks a requeue reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// The requeue itself: every task still to be run.
    PendingOrFailed,
    /// After it: the tasks that failed since (see [`publish_stragglers`]).
    Failed,
}

/// A task still to be run, as stored.
struct ToRun {
    id: TaskId,
    task_type: String,
    instance: Vec<u8>,
    failed: bool,
    attempts: i32,
    attempt_base: i32,
    /// Its `RetryTask` redrives: the number of its current series.
    redrives: i32,
}

impl ToRun {
    /// Its message id and TaskInstance: for a `PENDING` task, its current series as its publisher
    /// sent it; for a `FAILED` one, a series after its attempts so far with the attempts it has
    /// left. Either with the task's result token.
    fn message(&self, result_key: &[u8]) -> Result<(String, Vec<u8>), prost::DecodeError> {
        let mut instance = TaskInstance::decode(self.instance.as_slice())?;
        instance.result_token = taskfactory_model::results::result_token(result_key, self.id.0);
        if !self.failed {
            instance.attempt_base = u32::try_from(self.attempt_base).unwrap_or(0);
            let series = u32::try_from(self.redrives).unwrap_or(0);
            return Ok((
                crate::store::series_message_id(self.id, series),
                instance.encode_to_vec(),
            ));
        }
        let attempts = u32::try_from(self.attempts).unwrap_or(0);
        let used = u32::try_from(self.attempts.saturating_sub(self.attempt_base)).unwrap_or(0);
        let retry = taskfactory_model::spec::effective_retry(instance.retry.as_ref());
        instance.retry = Some(RetryPolicy {
            max_attempts: retry.max_attempts.saturating_sub(used).max(1),
            ..retry
        });
        instance.attempt_base = attempts;
        Ok((
            format!("{}:requeued:{attempts}", self.id),
            instance.encode_to_vec(),
        ))
    }
}

/// `(id, type, instance, status, attempts, attempt_base, redrives)`.
type TaskRow = (Uuid, String, Vec<u8>, String, i32, i32, i32);

/// Tasks of `RUNNING` runs that are `PENDING` or `FAILED`, in id order after `after`, leaving
/// out those changed since `created` (see the module docs).
async fn tasks_to_run(
    conn: &mut PgConnection,
    after: Uuid,
    created: DateTime<Utc>,
    limit: i64,
    which: Which,
) -> Result<Vec<ToRun>, sqlx::Error> {
    let statuses = match which {
        Which::PendingOrFailed => "t.status IN ('PENDING', 'FAILED')",
        Which::Failed => "t.status = 'FAILED'",
    };
    let rows: Vec<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT t.id, t.type, t.instance, t.status, t.attempts, t.attempt_base, t.redrives \
         FROM tasks t JOIN runs r ON r.id = t.run_id \
         WHERE {statuses} AND NOT t.held AND r.status = 'RUNNING' AND t.id > $1 \
           AND t.requeued_for IS DISTINCT FROM $3 \
           AND t.created_at < $3 AND (t.redriven_at IS NULL OR t.redriven_at < $3) \
           AND NOT EXISTS (SELECT 1 FROM task_attempts a \
                           WHERE a.task_id = t.id AND a.started_at >= $3) \
         ORDER BY t.id LIMIT $2"
    )))
    .bind(after)
    .bind(limit)
    .bind(created)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, task_type, instance, status, attempts, attempt_base, redrives)| ToRun {
                id: TaskId(id),
                task_type,
                instance,
                failed: status == "FAILED",
                attempts,
                attempt_base,
                redrives,
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(max_attempts: u32) -> Vec<u8> {
        TaskInstance {
            retry: Some(RetryPolicy {
                max_attempts,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    const KEY: &[u8] = b"the installation's key";

    fn message_of(task: &ToRun) -> (String, TaskInstance) {
        let (msg_id, bytes) = task.message(KEY).unwrap();
        (msg_id, TaskInstance::decode(bytes.as_slice()).unwrap())
    }

    #[test]
    fn a_pending_task_goes_out_as_spawned_with_its_token() {
        // Stored without a token (before tokens existed): it gets its own.
        let task = ToRun {
            id: TaskId(Uuid::from_u128(7)),
            task_type: "noop".to_owned(),
            instance: instance(3),
            failed: false,
            attempts: 0,
            attempt_base: 0,
            redrives: 0,
        };
        let (msg_id, sent) = message_of(&task);
        assert_eq!(msg_id, task.id.to_string());
        assert_eq!(sent.attempt_base, 0);
        assert_eq!(sent.retry.unwrap().max_attempts, 3);
        assert!(taskfactory_model::results::verify_result_token(
            KEY,
            task.id.0,
            &sent.result_token
        ));
    }

    #[test]
    fn a_redriven_pending_task_goes_out_as_its_redrive_did() {
        // Died after 4 attempts, redriven twice: its series starts after them, whatever the
        // stored instance (its spawn's) says.
        let task = ToRun {
            id: TaskId(Uuid::from_u128(7)),
            task_type: "http".to_owned(),
            instance: instance(5),
            failed: false,
            attempts: 4,
            attempt_base: 4,
            redrives: 2,
        };
        let (msg_id, sent) = message_of(&task);
        assert_eq!(msg_id, crate::store::series_message_id(task.id, 2));
        assert_eq!(msg_id, format!("{}:redrive:2", task.id));
        assert_eq!(sent.attempt_base, 4);
        assert_eq!(sent.retry.unwrap().max_attempts, 5);
        assert!(taskfactory_model::results::verify_result_token(
            KEY,
            task.id.0,
            &sent.result_token
        ));
    }

    #[test]
    fn a_failed_task_continues_with_the_attempts_it_has_left() {
        // A RetryTask series that began after 4 attempts, 5 allowed, 2 of them used.
        let task = ToRun {
            id: TaskId(Uuid::from_u128(7)),
            task_type: "http".to_owned(),
            instance: instance(5),
            failed: true,
            attempts: 6,
            attempt_base: 4,
            redrives: 1,
        };
        let (msg_id, sent) = message_of(&task);
        assert_eq!(msg_id, format!("{}:requeued:6", task.id));
        assert_eq!(sent.attempt_base, 6);
        assert_eq!(sent.retry.unwrap().max_attempts, 3);
        assert!(taskfactory_model::results::verify_result_token(
            KEY,
            task.id.0,
            &sent.result_token
        ));
        // Never fewer than one: the task is not final, so it has one more coming.
        let spent = ToRun {
            attempts: 9,
            ..task
        };
        let (_, sent) = message_of(&spent);
        assert_eq!(sent.retry.unwrap().max_attempts, 1);
    }

    #[test]
    fn an_epoch_is_kept_to_the_microsecond() {
        let nanos = 1_765_000_000_123_456_789_i128;
        assert_eq!(
            epoch(nanos).timestamp_nanos_opt(),
            Some(1_765_000_000_123_456_000)
        );
    }
}

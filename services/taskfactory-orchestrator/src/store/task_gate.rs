//! Task concurrency (`tasks[].concurrency`), its state and rules: a task under a concurrency key
//! is recorded `held` (PENDING, not published), and a key lets its held tasks through, under the
//! key's advisory lock, while fewer of its tasks are handed over and unfinished than the limit.
//!
//! Every way into the count (a task let through here, a dead task retried) is taken under the
//! key's lock, and the count is read by a statement that starts after the lock is held, so it
//! sees every task let through before. A task leaves the count when it ends (a result, a cancel,
//! a dead letter), without the lock: the count only ever overstates what runs, so the limit holds;
//! whoever ends a task then asks the key to let the next through ([`let_through`]), and the
//! sweeper's [`stalled_keys`] finds a key nobody asked.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::{RunId, TaskId};
use uuid::Uuid;

/// The statuses of a task handed over and not ended: what a key's limit counts (the
/// `tasks_key_busy` index's). A task waiting to retry (`FAILED`) keeps its place: its executor
/// runs it again without asking.
const BUSY: &str = "('PENDING', 'RUNNING', 'FAILED')";

/// A held task a key let through, to publish.
#[derive(Debug)]
pub struct LetThrough {
    pub task: TaskId,
    pub task_type: String,
    /// The encoded TaskInstance.
    pub instance: Vec<u8>,
    /// Its message id ([`crate::store::series_message_id`]).
    pub message_id: String,
    /// Its run's trace context, to publish it in.
    pub traceparent: String,
    /// How long it was held.
    pub held_for: Duration,
}

/// A task to publish as read: id, type, instance, redrives, created, its run's traceparent.
type TaskRow = (Uuid, String, Vec<u8>, i32, DateTime<Utc>, Option<String>);

/// A [`TaskRow`] let through, with how many the call chose.
type ChosenRow = (
    Uuid,
    String,
    Vec<u8>,
    i32,
    DateTime<Utc>,
    Option<String>,
    i64,
);

fn to_publish(rows: Vec<TaskRow>) -> Vec<LetThrough> {
    let now = Utc::now();
    rows.into_iter()
        .map(
            |(id, task_type, instance, redrives, created_at, traceparent)| LetThrough {
                task: TaskId(id),
                task_type,
                instance,
                message_id: crate::store::series_message_id(
                    TaskId(id),
                    u32::try_from(redrives).unwrap_or(0),
                ),
                traceparent: traceparent.unwrap_or_default(),
                held_for: (now - created_at).to_std().unwrap_or_default(),
            },
        )
        .collect()
}

/// Takes the advisory locks of `keys` (sorted, so two callers never wait on each other in a
/// cycle). Every way into a key's count takes its lock.
pub(crate) async fn lock_task_keys(
    tx: &mut sqlx::PgConnection,
    keys: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(hashtextextended('taskfactory-task-key:' || k, 0))) \
         FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS k ORDER BY 1) sorted",
    )
    .persistent(false)
    .bind(keys)
    .execute(tx)
    .await?;
    Ok(())
}

/// Tasks let through by one call, at most: what the gate holds in memory at once is this many
/// task messages.
pub const LET_THROUGH_AT_ONCE: usize = 256;

/// Lets through, for each of `keys`, as many of its held tasks as it has room for (the limit of
/// the task next in line, less its tasks handed over and not ended), in the order their runs made
/// them, [`LET_THROUGH_AT_ONCE`] at most in all; marks them due to be published. Returns them,
/// and whether that many were chosen (some keys may have room left: ask them again).
pub async fn let_through(
    pool: &PgPool,
    keys: &[String],
) -> Result<(Vec<LetThrough>, bool), sqlx::Error> {
    if keys.is_empty() {
        return Ok((Vec::new(), false));
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut tx = pool.begin().await?;
    lock_task_keys(&mut tx, &keys).await?;
    // A statement of its own, after the locks: its snapshot holds every task let through before.
    // Per key, the tasks next in line, as many as the limit of the first leaves room for, each
    // let through only if the key's tasks with executors, it included, stay within its own limit
    // (and none after one that does not). A held task a cancel holds locked is passed over (it
    // is being cancelled; waiting for it could deadlock against the cancel's row order).
    let rows: Vec<ChosenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH keys AS (SELECT DISTINCT k AS key FROM unnest($1::text[]) AS k), \
         heads AS ( \
             SELECT k.key, h.concurrency_limit AS lim, \
                 (SELECT count(*) FROM tasks b WHERE b.concurrency_key = k.key \
                     AND NOT b.held AND b.status IN {BUSY}) AS busy \
             FROM keys k CROSS JOIN LATERAL ( \
                 SELECT t.concurrency_limit FROM tasks t \
                 WHERE t.concurrency_key = k.key AND t.held AND t.status = 'PENDING' \
                 ORDER BY t.created_at, t.run_id, t.template, t.item_index LIMIT 1) h \
         ), candidates AS ( \
             SELECT h.key, c.id, c.place, \
                 bool_and(h.busy + c.place <= c.concurrency_limit) \
                     OVER (PARTITION BY h.key ORDER BY c.place) AS fits \
             FROM heads h CROSS JOIN LATERAL ( \
                 SELECT t.id, t.concurrency_limit, \
                     row_number() OVER (ORDER BY t.created_at, t.run_id, t.template, \
                         t.item_index) AS place \
                 FROM tasks t \
                 WHERE t.concurrency_key = h.key AND t.held AND t.status = 'PENDING' \
                 ORDER BY t.created_at, t.run_id, t.template, t.item_index \
                 LIMIT LEAST(GREATEST(h.lim - h.busy, 0), {LET_THROUGH_AT_ONCE})) c \
         ), chosen AS ( \
             SELECT id FROM candidates WHERE fits ORDER BY key, place LIMIT {LET_THROUGH_AT_ONCE} \
         ), locked AS ( \
             SELECT t.id FROM tasks t \
             WHERE t.id IN (SELECT id FROM chosen) AND t.held AND t.status = 'PENDING' \
             ORDER BY t.id FOR UPDATE SKIP LOCKED \
         ) \
         UPDATE tasks t SET held = false, publish_due = clock_timestamp() \
         FROM locked l WHERE t.id = l.id \
         RETURNING t.id, t.type, t.instance, t.redrives, t.created_at, \
             (SELECT r.traceparent FROM runs r WHERE r.id = t.run_id), \
             (SELECT count(*) FROM chosen) AS chosen"
    )))
    .persistent(false)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let full = rows
        .first()
        .is_some_and(|row| row.6 >= i64::try_from(LET_THROUGH_AT_ONCE).unwrap_or(i64::MAX));
    let rows = rows
        .into_iter()
        .map(|(id, task_type, instance, redrives, created, parent, _)| {
            (id, task_type, instance, redrives, created, parent)
        })
        .collect();
    Ok((to_publish(rows), full))
}

/// Notes that the tasks let through are in the stream.
pub async fn mark_published(pool: &PgPool, tasks: &[TaskId]) -> Result<(), sqlx::Error> {
    if tasks.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.0).collect();
    sqlx::query(
        "UPDATE tasks SET publish_due = NULL WHERE id = ANY($1) AND publish_due IS NOT NULL",
    )
    .persistent(false)
    .bind(&ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Tasks let through more than `older_than` ago and not noted published (their orchestrator
/// stopped in between), at most `limit`; each is published again under its message id, which
/// the stream drops if it has it. Tasks that started meanwhile are only noted.
pub async fn unpublished(
    pool: &PgPool,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<LetThrough>, sqlx::Error> {
    let older_than = older_than.as_secs_f64();
    // On the database's clock, which set `publish_due`.
    sqlx::query(
        "UPDATE tasks SET publish_due = NULL \
         WHERE publish_due < clock_timestamp() - make_interval(secs => $1::float8) \
           AND status <> 'PENDING'",
    )
    .bind(older_than)
    .execute(pool)
    .await?;
    let rows: Vec<TaskRow> = sqlx::query_as(
        "SELECT t.id, t.type, t.instance, t.redrives, t.created_at, \
             (SELECT r.traceparent FROM runs r WHERE r.id = t.run_id) \
         FROM tasks t \
         WHERE t.publish_due < clock_timestamp() - make_interval(secs => $1::float8) \
           AND t.status = 'PENDING' \
         ORDER BY t.publish_due LIMIT $2",
    )
    .bind(older_than)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(to_publish(rows))
}

/// Keys that hold tasks back (the one next in line for longer than `older_than`) and have room
/// for it: nobody asked them to let it through (an orchestrator stopped, or its task ended by a
/// way that does not ask). Looks at `limit` keys that hold tasks, in key order after `after`
/// (from the first when `None`), one index probe each however many tasks they hold; returns
/// those stalled, and the last key looked at (`None` when the look reached the end).
pub async fn stalled_keys(
    pool: &PgPool,
    older_than: Duration,
    after: Option<&str>,
    limit: i64,
) -> Result<(Vec<String>, Option<String>), sqlx::Error> {
    let older_than = older_than.as_secs_f64();
    let rows: Vec<(String, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE holding(key, n) AS ( \
             (SELECT concurrency_key, 1 FROM tasks \
              WHERE held AND status = 'PENDING' AND ($1::text IS NULL OR concurrency_key > $1) \
              ORDER BY concurrency_key LIMIT 1) \
             UNION ALL \
             SELECT (SELECT t.concurrency_key FROM tasks t \
                     WHERE t.held AND t.status = 'PENDING' AND t.concurrency_key > h.key \
                     ORDER BY t.concurrency_key LIMIT 1), h.n + 1 \
             FROM holding h WHERE h.key IS NOT NULL AND h.n < $2 \
         ) \
         SELECT h.key, \
             head.created_at < clock_timestamp() - make_interval(secs => $3::float8) \
             AND (SELECT count(*) FROM tasks b WHERE b.concurrency_key = h.key \
                  AND NOT b.held AND b.status IN {BUSY}) < head.concurrency_limit \
         FROM holding h CROSS JOIN LATERAL ( \
             SELECT t.concurrency_limit, t.created_at FROM tasks t \
             WHERE t.concurrency_key = h.key AND t.held AND t.status = 'PENDING' \
             ORDER BY t.created_at, t.run_id, t.template, t.item_index LIMIT 1) head \
         WHERE h.key IS NOT NULL \
         ORDER BY h.key"
    )))
    .persistent(false)
    .bind(after)
    .bind(limit)
    .bind(older_than)
    .fetch_all(pool)
    .await?;
    let last = if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit {
        rows.last().map(|(key, _)| key.clone())
    } else {
        None
    };
    Ok((
        rows.into_iter()
            .filter(|(_, stalled)| *stalled)
            .map(|(key, _)| key)
            .collect(),
        last,
    ))
}

/// The concurrency keys of a run's tasks that are held back (to ask them when its spawn is
/// resumed) or not (to ask them when it is cancelled).
pub async fn run_task_keys(pool: &PgPool, run: RunId) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT concurrency_key FROM tasks \
         WHERE run_id = $1 AND concurrency_key IS NOT NULL",
    )
    .bind(run.0)
    .fetch_all(pool)
    .await
}

/// Whether a dead task retried under `key` (in the caller's transaction, which takes the key's
/// lock) has room: fewer than `limit` of the key's tasks handed over and not ended.
pub(crate) async fn key_has_room(
    tx: &mut sqlx::PgConnection,
    key: &str,
    limit: i32,
) -> Result<bool, sqlx::Error> {
    lock_task_keys(&mut *tx, &[key]).await?;
    let busy: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM tasks WHERE concurrency_key = $1 AND NOT held AND status IN {BUSY}"
    )))
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    Ok(busy < i64::from(limit))
}

//! What refills the finished-tasks and the cancelled-runs buckets: the tasks that are final, the
//! runs that were cancelled.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A page of final tasks (`SUCCEEDED`, `DEAD`, `CANCELLED`) with an attempt of their current
/// series, finished at or after `since` (all of them when `None`), in id order after `after`:
/// each with its type and highest attempt number. Keyset paging by the primary key: the whole refill is
/// one pass over the tasks, with no index of its own.
pub async fn final_tasks_page(
    pool: &PgPool,
    after: Option<Uuid>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<(Uuid, String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, type, attempts FROM tasks \
         WHERE ($1::uuid IS NULL OR id > $1) \
           AND status IN ('SUCCEEDED', 'DEAD', 'CANCELLED') \
           AND attempts > attempt_base \
           AND ($2::timestamptz IS NULL OR COALESCE(finished_at, created_at) >= $2) \
         ORDER BY id LIMIT $3",
    )
    .bind(after)
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A page of cancelled runs, cancelled at or after `since` (all of them when `None`), in id order
/// after `after`: each with why it was cancelled. Keyset paging by the primary key, as above.
pub async fn cancelled_runs_page(
    pool: &PgPool,
    after: Option<Uuid>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, error FROM runs \
         WHERE ($1::uuid IS NULL OR id > $1) \
           AND status = 'CANCELLED' \
           AND ($2::timestamptz IS NULL OR COALESCE(finished_at, created_at) >= $2) \
         ORDER BY id LIMIT $3",
    )
    .bind(after)
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await
}

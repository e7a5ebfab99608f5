//! Read-only views of runs and tasks for the admin API. The tables belong to the orchestrator; this
//! module only reads them and turns rows into contract messages.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::plan::TaskKey;
use taskfactory_model::spec::chrono_to_timestamp;
use taskfactory_model::status;
use taskfactory_model::values;
use taskfactory_proto::v1::{Run, RunStatus, Task, TaskAttempt, TaskStatus, TemplateEvaluation};
use uuid::Uuid;

/// A page position: `(created_at, id)` of the last row shown, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_at.timestamp_micros(), self.id)
    }

    pub fn decode(token: &str) -> Option<Self> {
        let (micros, id) = token.split_once('_')?;
        Some(Self {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

const RUN_COLUMNS: &str = "id, activity_id, activity_name, activity_version, event_id, source, \
    dedupe_key, scheduled_for, fired_at, subject, payload, status, context, evaluation, error, \
    tasks_spawned, tasks_succeeded, tasks_failed, trace_id, created_at, finished_at, flow_key, \
    priority, waiting, throttle_key, throttled";

fn run_from_row(row: &sqlx::postgres::PgRow, with_details: bool) -> Result<Run, sqlx::Error> {
    let status_text: String = row.try_get("status")?;
    let source_text: String = row.try_get("source")?;
    let context: Option<serde_json::Value> = row.try_get("context")?;
    let evaluation: Option<serde_json::Value> = row.try_get("evaluation")?;
    let payload: Option<serde_json::Value> = row.try_get("payload")?;
    let evaluation = match (with_details, evaluation) {
        (true, Some(serde_json::Value::Array(items))) => items
            .iter()
            .filter_map(|item| taskfactory_proto::from_json::<TemplateEvaluation>(item).ok())
            .collect(),
        _ => Vec::new(),
    };
    let count = |name: &str| -> Result<u32, sqlx::Error> {
        Ok(u32::try_from(row.try_get::<i32, _>(name)?).unwrap_or(0))
    };
    Ok(Run {
        id: row.try_get::<Uuid, _>("id")?.to_string(),
        activity_id: row.try_get::<Uuid, _>("activity_id")?.to_string(),
        activity_version: count("activity_version")?,
        source: status::source_from_name(&source_text) as i32,
        dedupe_key: row.try_get("dedupe_key")?,
        scheduled_for: row
            .try_get::<Option<DateTime<Utc>>, _>("scheduled_for")?
            .map(chrono_to_timestamp),
        fired_at: Some(chrono_to_timestamp(row.try_get("fired_at")?)),
        status: status::run_status_from_db(&status_text) as i32,
        context: match (with_details, context) {
            (true, Some(c)) => Some(values::json_to_struct(&c)),
            _ => None,
        },
        evaluation,
        tasks_spawned: count("tasks_spawned")?,
        trace_id: row.try_get("trace_id")?,
        finished_at: row
            .try_get::<Option<DateTime<Utc>>, _>("finished_at")?
            .map(chrono_to_timestamp),
        error: row.try_get("error")?,
        tasks_succeeded: count("tasks_succeeded")?,
        tasks_failed: count("tasks_failed")?,
        event_id: row.try_get::<Uuid, _>("event_id")?.to_string(),
        payload: match (with_details, payload) {
            (true, Some(p)) => Some(values::json_to_value(&p)),
            _ => None,
        },
        activity_name: row.try_get("activity_name")?,
        subject: row.try_get("subject")?,
        concurrency_key: row
            .try_get::<Option<String>, _>("flow_key")?
            .unwrap_or_default(),
        priority: row.try_get("priority")?,
        waiting: row.try_get::<bool, _>("waiting")? && status_text == "PENDING",
        throttle_key: row
            .try_get::<Option<String>, _>("throttle_key")?
            .unwrap_or_default(),
        throttled: row.try_get::<bool, _>("throttled")? && status_text == "PENDING",
    })
}

pub async fn get_run(pool: &PgPool, id: Uuid) -> Result<Option<Run>, sqlx::Error> {
    let query = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(|r| run_from_row(r, true)).transpose()
}

/// Runs, newest first; filtered by activity and status when given.
pub async fn list_runs(
    pool: &PgPool,
    activity_id: Option<Uuid>,
    status: Option<RunStatus>,
    after: Option<Cursor>,
    limit: i64,
    only: Option<&[Uuid]>,
) -> Result<(Vec<Run>, Option<Cursor>), sqlx::Error> {
    let query = format!(
        "SELECT {RUN_COLUMNS} FROM runs \
         WHERE ($1::uuid IS NULL OR activity_id = $1) \
           AND ($2::text IS NULL OR status = $2) \
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4)) \
           AND ($6::uuid[] IS NULL OR activity_id = ANY($6)) \
         ORDER BY created_at DESC, id DESC LIMIT $5"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(activity_id)
        .bind(status.map(status::run_status_db))
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id))
        .bind(limit + 1)
        .bind(only)
        .fetch_all(pool)
        .await?;
    page(rows, limit, |r| run_from_row(r, false))
}

/// Keeps `limit` rows and returns the cursor of the last one when more follow.
fn page<T>(
    rows: Vec<sqlx::postgres::PgRow>,
    limit: i64,
    convert: impl Fn(&sqlx::postgres::PgRow) -> Result<T, sqlx::Error>,
) -> Result<(Vec<T>, Option<Cursor>), sqlx::Error> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(rows.len().min(limit));
    let mut cursor = None;
    for row in rows.iter().take(limit) {
        items.push(convert(row)?);
        cursor = Some(Cursor {
            created_at: row.try_get("created_at")?,
            id: row.try_get("id")?,
        });
    }
    Ok((items, if more { cursor } else { None }))
}

const TASK_COLUMNS: &str = "id, run_id, activity_id, activity_name, template, item_index, type, \
    params, status, attempts, last_error, output, created_at, finished_at, concurrency_key, held";

fn task_from_row(row: &sqlx::postgres::PgRow) -> Result<Task, sqlx::Error> {
    let status_text: String = row.try_get("status")?;
    let params: serde_json::Value = row.try_get("params")?;
    let output: Option<serde_json::Value> = row.try_get("output")?;
    Ok(Task {
        id: row.try_get::<Uuid, _>("id")?.to_string(),
        run_id: row.try_get::<Uuid, _>("run_id")?.to_string(),
        activity_id: row.try_get::<Uuid, _>("activity_id")?.to_string(),
        template: row.try_get("template")?,
        r#type: row.try_get("type")?,
        params: Some(values::json_to_struct(&params)),
        status: status::task_status_from_db(&status_text) as i32,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        last_error: row.try_get("last_error")?,
        output: output.as_ref().map(values::json_to_value),
        created_at: Some(chrono_to_timestamp(row.try_get("created_at")?)),
        finished_at: row
            .try_get::<Option<DateTime<Utc>>, _>("finished_at")?
            .map(chrono_to_timestamp),
        item_index: u32::try_from(row.try_get::<i32, _>("item_index")?).unwrap_or(0),
        activity_name: row.try_get("activity_name")?,
        attempt_history: Vec::new(),
        concurrency_key: row
            .try_get::<Option<String>, _>("concurrency_key")?
            .map(|key| TaskKey::shown(&key).to_owned())
            .unwrap_or_default(),
        waiting: row.try_get::<bool, _>("held")? && status_text == "PENDING",
    })
}

/// A task with its attempt history (the most recent [`MAX_ATTEMPTS_SHOWN`] results).
pub async fn get_task(pool: &PgPool, id: Uuid) -> Result<Option<Task>, sqlx::Error> {
    // One snapshot for the task and its history, so they never disagree.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let query = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(mut task) = row.as_ref().map(task_from_row).transpose()? else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT * FROM ( \
             SELECT attempt, status, error, executor, started_at, finished_at, recorded_at, output, \
                 execution \
             FROM task_attempts WHERE task_id = $1 \
             ORDER BY attempt DESC, recorded_at DESC LIMIT $2) AS latest \
         ORDER BY attempt, status = 'RUNNING' DESC, recorded_at",
    )
    .bind(id)
    .bind(MAX_ATTEMPTS_SHOWN)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    task.attempt_history = rows
        .iter()
        .map(attempt_from_row)
        .collect::<Result<_, _>>()?;
    Ok(Some(task))
}

/// Attempts `GetTask` shows at most (the newest ones).
const MAX_ATTEMPTS_SHOWN: i64 = 1000;

fn attempt_from_row(row: &sqlx::postgres::PgRow) -> Result<TaskAttempt, sqlx::Error> {
    let status_text: String = row.try_get("status")?;
    let output: Option<serde_json::Value> = row.try_get("output")?;
    let time = |column: &str| -> Result<_, sqlx::Error> {
        Ok(row
            .try_get::<Option<DateTime<Utc>>, _>(column)?
            .map(chrono_to_timestamp))
    };
    Ok(TaskAttempt {
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0),
        status: status::task_status_from_db(&status_text) as i32,
        error: row.try_get("error")?,
        executor: row.try_get("executor")?,
        started_at: time("started_at")?,
        finished_at: time("finished_at")?,
        recorded_at: time("recorded_at")?,
        output: output.as_ref().map(values::json_to_value),
        execution: row.try_get("execution")?,
    })
}

/// Tasks of a run in template and item order, or of an activity (or all) newest first.
pub async fn list_tasks(
    pool: &PgPool,
    run_id: Option<Uuid>,
    activity_id: Option<Uuid>,
    status: Option<TaskStatus>,
    page_token: Option<&str>,
    limit: i64,
    only: Option<&[Uuid]>,
) -> Result<(Vec<Task>, Option<String>), sqlx::Error> {
    let status = status.map(status::task_status_db);
    if let Some(run_id) = run_id {
        // Within a run: stable order by (template, item), paged by offset.
        let offset: i64 = page_token.and_then(|t| t.parse().ok()).unwrap_or(0);
        let query = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE run_id = $1 AND ($2::text IS NULL OR status = $2) \
             ORDER BY template, item_index OFFSET $3 LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(run_id)
            .bind(status)
            .bind(offset)
            .bind(limit + 1)
            .fetch_all(pool)
            .await?;
        let more = rows.len() as i64 > limit;
        let tasks = rows
            .iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(task_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = more.then(|| (offset + limit).to_string());
        return Ok((tasks, next));
    }
    let after = page_token.and_then(Cursor::decode);
    let query = format!(
        "SELECT {TASK_COLUMNS} FROM tasks \
         WHERE ($1::uuid IS NULL OR activity_id = $1) AND ($2::text IS NULL OR status = $2) \
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4)) \
           AND ($6::uuid[] IS NULL OR activity_id = ANY($6)) \
         ORDER BY created_at DESC, id DESC LIMIT $5"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(activity_id)
        .bind(status)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id))
        .bind(limit + 1)
        .bind(only)
        .fetch_all(pool)
        .await?;
    let (tasks, cursor) = page(rows, limit, task_from_row)?;
    Ok((tasks, cursor.map(|c| c.encode())))
}

/// What access scopes are checked against: an activity's name and the labels of its current
/// version (deleted activities included: their runs stay readable).
#[derive(Clone, Debug, Default)]
pub struct ActivityLabels {
    pub name: String,
    pub labels: std::collections::HashMap<String, String>,
}

fn labels_from_row(row: &sqlx::postgres::PgRow) -> Result<(Uuid, ActivityLabels), sqlx::Error> {
    let labels: Option<serde_json::Value> = row.try_get("labels")?;
    let labels = labels
        .and_then(|l| serde_json::from_value(l).ok())
        .unwrap_or_default();
    Ok((
        row.try_get("id")?,
        ActivityLabels {
            name: row.try_get("name")?,
            labels,
        },
    ))
}

const LABELS_QUERY: &str = "SELECT a.id, a.name, v.spec -> 'labels' AS labels FROM activities a \
     JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version";

/// The name and labels of every activity, live or deleted (for a scoped caller's list filters).
pub async fn all_activity_labels(
    pool: &PgPool,
) -> Result<Vec<(Uuid, ActivityLabels)>, sqlx::Error> {
    let rows = sqlx::query(LABELS_QUERY).fetch_all(pool).await?;
    rows.iter().map(labels_from_row).collect()
}

/// The activity of a run or a task, with its name and labels, if the run or task exists (one
/// round trip).
pub async fn owner_of(
    pool: &PgPool,
    table: RunOrTask,
    id: Uuid,
) -> Result<Option<(Uuid, ActivityLabels)>, sqlx::Error> {
    let table = match table {
        RunOrTask::Run => "runs",
        RunOrTask::Task => "tasks",
    };
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{LABELS_QUERY} JOIN {table} x ON x.activity_id = a.id WHERE x.id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(labels_from_row).transpose()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOrTask {
    Run,
    Task,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_780_000_000_123_456).unwrap(),
            id: Uuid::from_u128(42),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("garbage"), None);
    }
}

//! Recording results: the attempt history, the task's state and the run's counters. What each
//! result does is decided by [`taskfactory_model::results::judge`], the one rule; this module
//! only reads the tasks, asks, and writes what the answers say, in one code path
//! ([`record_results`]) for a batch of any runs' results and running reports, a single one being
//! a batch of one.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::ids::{ActivityId, RunId, TaskId};
use taskfactory_model::results::{self, Claim, Refusal, Report, TaskFacts, TaskState, Verdict};
use taskfactory_model::status;
use taskfactory_model::values;
use taskfactory_proto::v1::{RunStatus, TaskStatus};
use taskfactory_runtime::metrics;
use uuid::Uuid;

use super::{CompletedRun, completed_from_row, record_run_finished};

/// One result to record.
pub struct ResultRecord {
    pub task_id: TaskId,
    pub attempt: u32,
    pub status: TaskStatus,
    pub error: String,
    pub output: Option<serde_json::Value>,
    pub executor: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// A `RUNNING` start report's execution id (empty otherwise, and from older executors).
    pub execution: String,
    /// From an executor: what its result says about the task (checked against it). `None`: the
    /// orchestrator's own (CompleteTask, a deadline, a type nobody serves).
    pub claim: Option<Claim>,
}

impl ResultRecord {
    /// Replaces the NUL characters an executor or an admin may send (Postgres stores none), so
    /// the result is recorded instead of refused on every redelivery.
    pub fn make_storable(&mut self) {
        values::make_storable_text(&mut self.error);
        values::make_storable_text(&mut self.executor);
        values::make_storable_text(&mut self.execution);
        if let Some(output) = self.output.as_mut() {
            values::make_storable_json(output);
        }
    }

    /// The execution its attempt row names: a start's own; outcomes name none.
    fn row_execution(&self) -> &str {
        if self.status == TaskStatus::Running {
            &self.execution
        } else {
            ""
        }
    }

    fn report(&self) -> Report<'_> {
        Report {
            status: self.status,
            attempt: self.attempt,
            execution: &self.execution,
            claim: self.claim.as_ref(),
        }
    }
}

/// What recording a result did.
#[derive(Debug)]
pub enum Recorded {
    /// No such task (a result for something this system did not make).
    UnknownTask,
    /// Refused: nothing was recorded (see [`results::judge`]).
    Refused(Refusal),
    /// The task was already terminal: the result is kept as an extra attempt only.
    AlreadyFinal,
    /// Recorded (the task moved, or the result only joined its history); when its run is
    /// finished and not yet announced, that run; when it ended a task under a concurrency key,
    /// that key (to let the next task through).
    Applied(Option<CompletedRun>, Option<String>),
}

/// A task as results see it, read under its row lock.
#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    run_id: Uuid,
    activity_id: Uuid,
    #[sqlx(rename = "type")]
    task_type: String,
    status: String,
    attempts: i32,
    attempt_base: i32,
    max_attempts: Option<i32>,
    result_token_required: bool,
    concurrency_key: Option<String>,
}

/// The columns of a [`TaskRow`].
const TASK_ROW: &str = "id, run_id, activity_id, type, status, attempts, attempt_base, max_attempts, result_token_required, concurrency_key";

impl TaskRow {
    fn facts(&self) -> TaskFacts<'_> {
        TaskFacts {
            token_required: self.result_token_required,
            task_type: &self.task_type,
            run: RunId(self.run_id),
            activity: ActivityId(self.activity_id),
            attempt_base: count(self.attempt_base),
            max_attempts: self.max_attempts.map(count),
        }
    }

    /// Whether the attempt history may hold anything that makes a start a repetition
    /// ([`results::repeated_start`]): an attempt of the current series on record (every one
    /// raised `attempts` past `attempt_base` when it was recorded), or an end. A task's first
    /// start, the common case, needs no read of its history.
    fn may_have_started(&self) -> bool {
        self.attempts > self.attempt_base || status::task_is_terminal(self.state().status)
    }

    fn state(&self) -> TaskState {
        TaskState {
            status: status::task_status_from_db(&self.status),
            attempts: count(self.attempts),
        }
    }
}

fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The attempt history of `tasks` that tells repeated starts ([`results::repeated_start`]).
async fn attempt_history(
    tx: &mut sqlx::PgConnection,
    tasks: &[Uuid],
) -> Result<Vec<(Uuid, results::Seen)>, sqlx::Error> {
    let rows: Vec<(Uuid, i32, String, String)> = sqlx::query_as(
        "SELECT task_id, attempt, status, execution FROM task_attempts WHERE task_id = ANY($1)",
    )
    .persistent(false)
    .bind(tasks)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(task, attempt, status, execution)| {
            let seen = results::Seen {
                attempt: count(attempt),
                status: status::task_status_from_db(&status),
                execution,
            };
            (task, seen)
        })
        .collect())
}

fn count_repeated(result: &ResultRecord, task_type: &str) {
    tracing::warn!(task.id = %result.task_id, attempt = result.attempt, execution = %result.execution, "a task was started again: another execution of this attempt started before, or the task had ended");
    metrics::count_repeated_execution(task_type);
}

/// Records one result or running report: [`record_results`] with a batch of one (one
/// implementation of the rules for every way in).
pub async fn record_result(pool: &PgPool, result: &ResultRecord) -> Result<Recorded, sqlx::Error> {
    let mut recorded = record_results(pool, std::slice::from_ref(result)).await?;
    Ok(recorded.pop().unwrap_or(Recorded::UnknownTask))
}

/// A task as a batch of results found it, and what the batch makes of it.
struct TaskInBatch {
    row: TaskRow,
    state: TaskState,
    /// Set when a result changed the task.
    changed: bool,
    /// The error the task shows, when a result replaced it.
    last_error: Option<String>,
    /// The newest output a result brought (the task keeps its own otherwise).
    output: Option<serde_json::Value>,
    finished_at: Option<DateTime<Utc>>,
}

/// Records results and running reports of any runs, in order, in one transaction, with the same
/// outcome as recording them one by one: the same [`results::judge`] applied to each in turn, in memory. One
/// lock of each run (taken in id order, before its tasks, as everywhere), one statement writes
/// the attempts, the tasks and the runs ([`write_batch`]), however many results: a fan-out's
/// results cost one commit, not one each. Returns what happened to each result, in order; a run finished by
/// the batch is reported with its last terminal result.
pub async fn record_results(
    pool: &PgPool,
    results: &[ResultRecord],
) -> Result<Vec<Recorded>, sqlx::Error> {
    if results.is_empty() {
        return Ok(Vec::new());
    }
    let mut task_ids: Vec<Uuid> = results.iter().map(|r| r.task_id.0).collect();
    task_ids.sort_unstable();
    task_ids.dedup();
    let mut tx = pool.begin().await?;
    // Lock order, everywhere: the run, then its tasks (a cancel takes them in that order too);
    // several runs in id order.
    // The statements over arrays are planned on each use (`persistent(false)`): a plan cached
    // while the tables were nearly empty scans them whole once they are not (measured: a
    // sequential scan of `tasks` per batch). Two index lookups here, not one join.
    // The runs and activities of the tasks, and the activities' overlap locks, shared (results
    // never wait on one another for them), taken before any run's: an admission or a promotion
    // (which holds one exclusively) either committed before this batch, or waits for it and then
    // sees its runs finished. So when a run finishes here, whether runs wait behind it is known
    // exactly (`write_batch`), without a locked look per run. (The locks are an
    // uncorrelated subquery: taken once, in activity order, before the rows are returned.)
    let owners: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
        "WITH owners AS (SELECT DISTINCT run_id, activity_id FROM tasks WHERE id = ANY($1)) \
         SELECT run_id, activity_id, \
             (SELECT count(pg_advisory_xact_lock_shared( \
                  hashtextextended('taskfactory-overlap:' || a::text, 0))) \
              FROM (SELECT DISTINCT activity_id AS a FROM owners ORDER BY 1) sorted) AS locked \
         FROM owners",
    )
    .persistent(false)
    .bind(&task_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut run_ids: Vec<Uuid> = owners.iter().map(|(run, _, _)| *run).collect();
    run_ids.sort_unstable();
    run_ids.dedup();
    sqlx::query("SELECT 1 FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .persistent(false)
        .bind(&run_ids)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_ROW} FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    )))
    .persistent(false)
    .bind(&task_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut tasks: std::collections::HashMap<Uuid, TaskInBatch> = rows
        .into_iter()
        .map(|row| {
            let task = TaskInBatch {
                state: row.state(),
                row,
                changed: false,
                last_error: None,
                output: None,
                finished_at: None,
            };
            (task.row.id, task)
        })
        .collect();

    // What tells repeated starts, for the tasks this batch starts.
    let mut started: Vec<Uuid> = results
        .iter()
        .filter(|r| r.status == TaskStatus::Running && !r.execution.is_empty())
        .map(|r| r.task_id.0)
        .collect();
    started.sort_unstable();
    started.dedup();
    let mut histories: std::collections::HashMap<Uuid, Vec<results::Seen>> =
        started.iter().map(|task| (*task, Vec::new())).collect();
    let read: Vec<Uuid> = started
        .iter()
        .copied()
        .filter(|id| tasks.get(id).is_some_and(|t| t.row.may_have_started()))
        .collect();
    if !read.is_empty() {
        for (task, seen) in attempt_history(&mut tx, &read).await? {
            histories.entry(task).or_default().push(seen);
        }
    }
    let mut repeated: Vec<(&ResultRecord, String)> = Vec::new();

    // The same rule as one result at a time, applied in order in memory.
    let now = Utc::now();
    let mut recorded = Vec::with_capacity(results.len());
    let mut attempts: Vec<&ResultRecord> = Vec::with_capacity(results.len());
    // Per run: (succeeded, failed, index of its last terminal result).
    let mut runs: std::collections::BTreeMap<Uuid, (i32, i32, usize)> = Default::default();
    let mut finished_tasks: Vec<(String, TaskStatus)> = Vec::new();
    for (index, result) in results.iter().enumerate() {
        let Some(task) = tasks.get_mut(&result.task_id.0) else {
            recorded.push(Recorded::UnknownTask);
            continue;
        };
        let verdict = results::judge(&task.row.facts(), task.state, &result.report());
        if !matches!(verdict, Verdict::Refused(_))
            && let Some(history) = histories.get_mut(&result.task_id.0)
        {
            let running = result.status == TaskStatus::Running;
            let execution = result.row_execution();
            let new_row = !history.iter().any(|row| {
                row.attempt == result.attempt
                    && row.status == result.status
                    && row.execution == execution
            });
            if running
                && new_row
                && results::repeated_start(
                    history,
                    result.attempt,
                    execution,
                    count(task.row.attempt_base),
                    task.state.status,
                )
            {
                repeated.push((result, task.row.task_type.clone()));
            }
            history.push(results::Seen {
                attempt: result.attempt,
                status: result.status,
                execution: execution.to_owned(),
            });
        }
        let change = match verdict {
            Verdict::Refused(refusal) => {
                recorded.push(Recorded::Refused(refusal));
                continue;
            }
            // A running report never finishes anything, whatever the task's state.
            Verdict::TaskFinal if result.status == TaskStatus::Running => {
                attempts.push(result);
                recorded.push(Recorded::Applied(None, None));
                continue;
            }
            Verdict::TaskFinal => {
                attempts.push(result);
                recorded.push(Recorded::AlreadyFinal);
                continue;
            }
            Verdict::Recorded(None) => {
                attempts.push(result);
                recorded.push(Recorded::Applied(None, None));
                continue;
            }
            Verdict::Recorded(Some(change)) => change,
        };
        attempts.push(result);
        task.state = change.state();
        task.changed = true;
        if change.takes_result {
            task.last_error = Some(result.error.clone());
            if result.output.is_some() {
                task.output.clone_from(&result.output);
            }
        }
        if change.finishes {
            task.finished_at = Some(result.finished_at.unwrap_or(now));
            let run = runs.entry(task.row.run_id).or_default();
            if change.status == TaskStatus::Succeeded {
                run.0 += 1;
            } else {
                run.1 += 1;
            }
            run.2 = index;
            finished_tasks.push((task.row.task_type.clone(), change.status));
            recorded.push(Recorded::Applied(None, task.row.concurrency_key.clone()));
            continue;
        }
        recorded.push(Recorded::Applied(None, None));
    }

    let changed: Vec<&TaskInBatch> = tasks.values().filter(|t| t.changed).collect();
    let mut runs_finished = Vec::new();
    let mut completed = Vec::new();
    for row in write_batch(&mut tx, &attempts, &changed, &runs).await? {
        let id: Uuid = row.try_get("id")?;
        let Some(&(_, _, last)) = runs.get(&id) else {
            continue;
        };
        if let Some(mut run) = completed_from_row(&row)? {
            run.waiting_behind = row.try_get("waiting_behind")?;
            completed.push((last, run));
        }
        if let Some(finished) = run_finished_now(&row)? {
            runs_finished.push(finished);
        }
    }
    for (last, run) in completed {
        if let Recorded::Applied(completed, _) = &mut recorded[last] {
            *completed = Some(run);
        }
    }
    tx.commit().await?;
    for (result, task_type) in repeated {
        count_repeated(result, &task_type);
    }
    for (task_type, outcome) in finished_tasks {
        metrics::record_tasks_finished(&task_type, status::task_outcome(outcome), 1);
    }
    for (activity, status) in runs_finished {
        record_run_finished(&activity, status);
    }
    Ok(recorded)
}

/// Writes what a batch decided, in one statement (one round trip): the attempt rows, the tasks
/// it changed, and the finished tasks counted toward their runs (`runs`: succeeded, failed, by
/// run), each run none is left of finished. Returns the runs as updated, each with
/// `status_before` (the status this statement found), for [`completed_from_row`] and
/// [`run_finished_now`], and `waiting_behind`: whether runs of its activity wait behind another
/// (read under the activities' shared overlap locks, taken by the batch first).
///
/// The three parts are data-modifying parts of one statement: each reads the snapshot the
/// statement began with, and none reads what another writes (the runs' counters come from
/// `runs`, computed here; the tasks and runs are locked by this transaction already).
async fn write_batch(
    tx: &mut sqlx::PgConnection,
    attempts: &[&ResultRecord],
    changed: &[&TaskInBatch],
    runs: &std::collections::BTreeMap<Uuid, (i32, i32, usize)>,
) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
    if attempts.is_empty() && changed.is_empty() && runs.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&ResultRecord) -> Option<String>| -> Vec<Option<String>> {
        attempts.iter().map(|r| f(r)).collect()
    };
    sqlx::query(
        "WITH attempts AS ( \
             INSERT INTO task_attempts (task_id, attempt, status, error, output, executor, \
                 started_at, finished_at, execution) \
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::jsonb[], \
                 $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[]) \
             ON CONFLICT DO NOTHING \
         ), changed AS ( \
             UPDATE tasks t SET status = u.status, \
                 last_error = COALESCE(u.last_error, t.last_error), \
                 attempts = u.attempts, output = COALESCE(u.output, t.output), \
                 finished_at = COALESCE(u.finished_at, t.finished_at) \
             FROM unnest($10::uuid[], $11::text[], $12::text[], $13::int[], $14::jsonb[], \
                 $15::timestamptz[]) AS u(id, status, last_error, attempts, output, finished_at) \
             WHERE t.id = u.id AND t.id = ANY($10) \
         ) \
         UPDATE runs r SET \
             tasks_succeeded = r.tasks_succeeded + u.succeeded, \
             tasks_failed = r.tasks_failed + u.failed, \
             status = CASE WHEN r.status = 'RUNNING' \
                 AND r.tasks_succeeded + u.succeeded + r.tasks_failed + u.failed >= r.tasks_spawned \
                 THEN CASE WHEN r.tasks_failed + u.failed > 0 THEN 'FAILED' ELSE 'SUCCEEDED' END \
                 ELSE r.status END, \
             finished_at = CASE WHEN r.status = 'RUNNING' \
                 AND r.tasks_succeeded + u.succeeded + r.tasks_failed + u.failed >= r.tasks_spawned \
                 THEN now() ELSE r.finished_at END \
         FROM unnest($16::uuid[], $17::int4[], $18::int4[]) AS u(id, succeeded, failed) \
         JOIN runs before ON before.id = u.id \
         WHERE r.id = u.id \
         RETURNING r.id, r.activity_id, r.activity_name, r.status, r.tasks_spawned, \
             r.tasks_succeeded, r.tasks_failed, r.finished_at, r.announced_at, \
             before.status AS status_before, r.flow_key, r.flow_limit, \
             CASE WHEN r.flow_key IS NOT NULL \
                 THEN EXISTS (SELECT 1 FROM runs w WHERE w.activity_id = r.activity_id \
                     AND w.flow_key = r.flow_key AND w.waiting AND NOT w.throttled \
                     AND w.status = 'PENDING') \
                 WHEN r.throttle_key IS NULL \
                 THEN EXISTS (SELECT 1 FROM runs w WHERE w.activity_id = r.activity_id \
                     AND w.flow_key IS NULL AND w.throttle_key IS NULL AND w.waiting \
                     AND NOT w.throttled AND w.status = 'PENDING') \
                 ELSE false \
             END AS waiting_behind",
    )
    .persistent(false)
    // The attempts.
    .bind(attempts.iter().map(|r| r.task_id.0).collect::<Vec<_>>())
    .bind(attempts.iter().map(|r| int(r.attempt)).collect::<Vec<_>>())
    .bind(column(|r| {
        Some(status::task_status_db(r.status).to_owned())
    }))
    .bind(column(|r| Some(r.error.clone())))
    .bind(
        attempts
            .iter()
            .map(|r| r.output.clone())
            .collect::<Vec<_>>(),
    )
    .bind(column(|r| Some(r.executor.clone())))
    .bind(attempts.iter().map(|r| r.started_at).collect::<Vec<_>>())
    .bind(attempts.iter().map(|r| r.finished_at).collect::<Vec<_>>())
    .bind(column(|r| Some(r.row_execution().to_owned())))
    // The tasks.
    .bind(changed.iter().map(|t| t.row.id).collect::<Vec<_>>())
    .bind(
        changed
            .iter()
            .map(|t| status::task_status_db(t.state.status))
            .collect::<Vec<_>>(),
    )
    .bind(
        changed
            .iter()
            .map(|t| t.last_error.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        changed
            .iter()
            .map(|t| int(t.state.attempts))
            .collect::<Vec<_>>(),
    )
    .bind(changed.iter().map(|t| t.output.clone()).collect::<Vec<_>>())
    .bind(changed.iter().map(|t| t.finished_at).collect::<Vec<_>>())
    // The runs.
    .bind(runs.keys().copied().collect::<Vec<_>>())
    .bind(runs.values().map(|(s, _, _)| *s).collect::<Vec<_>>())
    .bind(runs.values().map(|(_, f, _)| *f).collect::<Vec<_>>())
    .fetch_all(tx)
    .await
}

/// The run's activity and final state when the update that returned `row` (with `status_before`)
/// is the one that finished it.
fn run_finished_now(
    row: &sqlx::postgres::PgRow,
) -> Result<Option<(String, RunStatus)>, sqlx::Error> {
    let before = status::run_status_from_db(&row.try_get::<String, _>("status_before")?);
    let after = status::run_status_from_db(&row.try_get::<String, _>("status")?);
    if status::run_is_terminal(before) || !status::run_is_terminal(after) {
        return Ok(None);
    }
    Ok(Some((row.try_get("activity_name")?, after)))
}

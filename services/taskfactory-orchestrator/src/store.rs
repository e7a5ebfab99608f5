//! Postgres access of the orchestrator: runs, tasks and task attempts (owned), and the pinned
//! activity versions (read; owned by the trigger service).

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::ids::{ActivityId, RunId, TaskId};
use taskfactory_model::{overlap, status};
use taskfactory_proto::v1::{FlowAdmission, OverlapPolicy, RunStatus, TaskStatus};
use taskfactory_runtime::metrics;
use uuid::Uuid;

mod finished_tasks;
mod results;
mod task_gate;
mod throttle;

pub use finished_tasks::{cancelled_runs_page, final_tasks_page};
pub use results::{Recorded, ResultRecord, record_result, record_results};
pub use task_gate::{
    LET_THROUGH_AT_ONCE, LetThrough, let_through, mark_published, run_task_keys, stalled_keys,
    unpublished,
};
use taskfactory_runtime::batch::GroupCommit;
pub use throttle::{
    Released, admit_throttled_run, due_throttles, next_throttle_due, prune_throttles,
    release_throttled, repair_throttles,
};

/// What the orchestrator knows of a run it may have seen before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunState {
    pub status: RunStatus,
    pub spawn_complete: bool,
    pub announced: bool,
    /// Buffered by its overlap policy: starts when the run before it finishes.
    pub waiting: bool,
}

/// The installation's key of result tokens (made once by the migrations).
pub async fn result_token_key(pool: &PgPool) -> Result<std::sync::Arc<[u8]>, sqlx::Error> {
    let key: Vec<u8> = sqlx::query_scalar("SELECT key FROM result_token_key WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(key.into())
}

pub async fn run_state(pool: &PgPool, run: RunId) -> Result<Option<RunState>, sqlx::Error> {
    let row: Option<(String, bool, Option<DateTime<Utc>>, bool)> = sqlx::query_as(
        "SELECT status, spawn_complete, announced_at, waiting FROM runs WHERE id = $1",
    )
    .bind(run.0)
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(status, spawn_complete, announced, waiting)| RunState {
            status: status::run_status_from_db(&status),
            spawn_complete,
            announced: announced.is_some(),
            waiting,
        }),
    )
}

/// What the fire ledger (`fires`, written by the trigger service before it publishes a fire)
/// says about a trigger message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ledger {
    /// The message is, byte for byte, a fire the ledger holds (first publish or a republish).
    Recorded,
    /// The ledger holds a fire of this activity and dedupe key, but not this message.
    Differs,
    /// The ledger holds no fire of this activity and dedupe key.
    Missing,
}

/// A trigger message to look up in the fire ledger: the fire it claims to be, and the run it
/// names.
pub struct TriggerKey {
    pub activity: ActivityId,
    pub dedupe_key: String,
    pub run: RunId,
    pub message: bytes::Bytes,
}

/// What the ledger says of a trigger message, and the state of the run it names.
pub type TriggerState = (Ledger, Option<RunState>);

/// A trigger's place in its batch; whether it is the ledger's fire (NULL: no fire), and the run's
/// state columns (NULL: no run).
type TriggerStateRow = (
    i64,
    Option<bool>,
    Option<String>,
    Option<bool>,
    Option<DateTime<Utc>>,
    Option<bool>,
);

/// Looks trigger messages up in the fire ledger, with the state of the run each names: one round
/// trip for all of them, on the ledger's unique key and the run's primary key. A message is
/// compared whole (the trigger publishes exactly the bytes it recorded), so an id, version,
/// payload or overlap policy of someone else's is as refused as an unknown key.
pub async fn trigger_states(
    pool: &PgPool,
    keys: &[TriggerKey],
) -> Result<Vec<TriggerState>, sqlx::Error> {
    let activities: Vec<Uuid> = keys.iter().map(|k| k.activity.0).collect();
    let dedupe_keys: Vec<&str> = keys.iter().map(|k| k.dedupe_key.as_str()).collect();
    let messages: Vec<&[u8]> = keys.iter().map(|k| k.message.as_ref()).collect();
    let runs: Vec<Uuid> = keys.iter().map(|k| k.run.0).collect();
    let rows: Vec<TriggerStateRow> = sqlx::query_as(
        "SELECT k.i, f.event = k.message, r.status, r.spawn_complete, r.announced_at, \
                 r.waiting \
             FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::uuid[]) WITH ORDINALITY \
                 AS k(activity_id, dedupe_key, message, run_id, i) \
             LEFT JOIN fires f ON f.activity_id = k.activity_id AND f.dedupe_key = k.dedupe_key \
             LEFT JOIN runs r ON r.id = k.run_id",
    )
    // Planned on each use: a generic plan made while the tables were small (the start of a
    // burst) can join by scanning them, which grows with the ledger.
    .persistent(false)
    .bind(&activities)
    .bind(&dedupe_keys)
    .bind(&messages)
    .bind(&runs)
    .fetch_all(pool)
    .await?;
    let mut states: Vec<Option<TriggerState>> = keys.iter().map(|_| None).collect();
    for (i, same, status, spawn_complete, announced, waiting) in rows {
        let ledger = match same {
            Some(true) => Ledger::Recorded,
            Some(false) => Ledger::Differs,
            None => Ledger::Missing,
        };
        let run = status.map(|status| RunState {
            status: status::run_status_from_db(&status),
            spawn_complete: spawn_complete.unwrap_or(false),
            announced: announced.is_some(),
            waiting: waiting.unwrap_or(false),
        });
        let slot = usize::try_from(i - 1)
            .ok()
            .and_then(|i| states.get_mut(i))
            .ok_or_else(|| sqlx::Error::Protocol(format!("trigger lookup returned row {i}")))?;
        *slot = Some((ledger, run));
    }
    states
        .into_iter()
        .enumerate()
        .map(|(i, state)| {
            state.ok_or_else(|| {
                sqlx::Error::Protocol(format!("trigger lookup returned no row {}", i + 1))
            })
        })
        .collect()
}

/// Looks trigger messages up ([`trigger_states`]) in group commit: the triggers whose lookups
/// wait together are read by one statement. As every group commit
/// ([`taskfactory_runtime::db::batch_failed`]): a statement the database refused for some key's
/// data is tried key by key, so only that key fails; any other failure (the database down, a pool
/// timeout) is every caller's at once.
#[derive(Clone)]
pub struct TriggerLookups(GroupCommit<TriggerKey, Result<TriggerState, sqlx::Error>>);

/// Trigger messages looked up by one statement, at most.
const LOOKUPS_AT_ONCE: usize = 256;

impl TriggerLookups {
    /// Starts the reader; `statements` bounds its statements at once.
    pub fn start(pool: PgPool, statements: usize) -> Self {
        Self(GroupCommit::start(
            LOOKUPS_AT_ONCE,
            statements,
            move |keys: Vec<TriggerKey>| {
                let pool = pool.clone();
                async move {
                    match trigger_states(&pool, &keys).await {
                        Ok(states) => states.into_iter().map(Ok).collect(),
                        Err(error) if keys.len() == 1 => vec![Err(error)],
                        Err(error)
                            if let Some(each) =
                                taskfactory_runtime::db::batch_failed(&error, keys.len()) =>
                        {
                            each.into_iter().map(Err).collect()
                        }
                        Err(_) => {
                            let mut each = Vec::with_capacity(keys.len());
                            for key in keys {
                                each.push(
                                    trigger_states(&pool, std::slice::from_ref(&key))
                                        .await
                                        .and_then(|mut one| {
                                            one.pop().ok_or_else(|| {
                                                sqlx::Error::Protocol(
                                                    "trigger lookup returned no row".to_owned(),
                                                )
                                            })
                                        }),
                                );
                            }
                            each
                        }
                    }
                }
            },
        ))
    }

    /// What the ledger says of one trigger message, and its run's state.
    pub async fn get(&self, key: TriggerKey) -> Result<TriggerState, sqlx::Error> {
        self.0
            .submit(key)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// The spec of an activity at a version, in its proto3 JSON form.
pub async fn activity_spec(
    pool: &PgPool,
    activity: ActivityId,
    version: u32,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let row: Option<(serde_json::Value,)> = sqlx::query_as(
        "SELECT spec FROM activity_versions WHERE activity_id = $1 AND version = $2",
    )
    .bind(activity.0)
    .bind(i32::try_from(version).unwrap_or(i32::MAX))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(spec,)| spec))
}

/// A run to record.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub id: RunId,
    pub activity_id: ActivityId,
    pub activity_name: String,
    pub activity_version: u32,
    pub event_id: Uuid,
    pub source: String,
    pub dedupe_key: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub fired_at: DateTime<Utc>,
    pub subject: String,
    pub payload: Option<serde_json::Value>,
    pub status: RunStatus,
    pub context: serde_json::Value,
    pub evaluation: serde_json::Value,
    pub error: String,
    pub trace_id: String,
    /// The run's trace context, so a buffered run started later continues its fire's trace.
    pub traceparent: String,
}

/// A task to record with its run.
pub struct NewTask {
    pub id: TaskId,
    pub template: String,
    pub item_index: u32,
    pub task_type: String,
    pub params: serde_json::Value,
    /// The encoded TaskInstance.
    pub instance: Vec<u8>,
    pub created_at: DateTime<Utc>,
    /// `PENDING`, or `WAITING` for a human task (not published: completed through the API).
    pub status: TaskStatus,
    /// A human task's deadline.
    pub deadline: Option<DateTime<Utc>>,
    /// The effective `retry.maxAttempts`: results claiming attempts past it (and the redelivery
    /// allowance) are refused.
    pub max_attempts: u32,
    /// Under its template's `concurrency`: its scoped key and limit. Such a task is recorded
    /// held, and published when its key lets it through ([`task_gate`]).
    pub concurrency: Option<(String, u32)>,
}

impl NewTask {
    /// Recorded held back by its concurrency key, not published with its run.
    pub fn held(&self) -> bool {
        self.concurrency.is_some() && self.status == TaskStatus::Pending
    }
}

/// How a run row is written besides its `NewRun` fields.
#[derive(Clone, Copy, Debug, Default)]
struct RowExtras<'a> {
    waiting: bool,
    trigger_event: Option<&'a [u8]>,
    overlap: &'a str,
    started: bool,
    /// Not announced on `run.completed` (skipped runs).
    quiet: bool,
}

/// A run row to write: the run, how many tasks it spawned, and how it is written besides.
type RunRow<'a> = (&'a NewRun, usize, RowExtras<'a>);

/// Inserts run rows, many per statement, in run id order (the order every writer of several runs
/// takes them in, so two batches holding the same new runs never wait on each other); returns
/// the ids inserted. A run whose id or dedupe key is already taken is not written; a row is never
/// given twice (the callers keep the first of an id).
async fn insert_run_rows(
    tx: &mut sqlx::PgConnection,
    rows: &[RunRow<'_>],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let mut inserted = std::collections::HashSet::with_capacity(rows.len());
    if rows.is_empty() {
        return Ok(inserted);
    }
    let ids: Vec<Uuid> = rows.iter().map(|(r, _, _)| r.id.0).collect();
    let activities: Vec<Uuid> = rows.iter().map(|(r, _, _)| r.activity_id.0).collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|(r, _, _)| r.activity_name.as_str())
        .collect();
    let versions: Vec<i32> = rows
        .iter()
        .map(|(r, _, _)| i32::try_from(r.activity_version).unwrap_or(i32::MAX))
        .collect();
    let events: Vec<Uuid> = rows.iter().map(|(r, _, _)| r.event_id).collect();
    let sources: Vec<&str> = rows.iter().map(|(r, _, _)| r.source.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|(r, _, _)| r.dedupe_key.as_str()).collect();
    let scheduled: Vec<Option<DateTime<Utc>>> =
        rows.iter().map(|(r, _, _)| r.scheduled_for).collect();
    let fired: Vec<DateTime<Utc>> = rows.iter().map(|(r, _, _)| r.fired_at).collect();
    let subjects: Vec<&str> = rows.iter().map(|(r, _, _)| r.subject.as_str()).collect();
    let payloads: Vec<Option<&serde_json::Value>> =
        rows.iter().map(|(r, _, _)| r.payload.as_ref()).collect();
    let statuses: Vec<&str> = rows
        .iter()
        .map(|(r, _, _)| status::run_status_db(r.status))
        .collect();
    let contexts: Vec<&serde_json::Value> = rows.iter().map(|(r, _, _)| &r.context).collect();
    let evaluations: Vec<&serde_json::Value> = rows.iter().map(|(r, _, _)| &r.evaluation).collect();
    let errors: Vec<&str> = rows.iter().map(|(r, _, _)| r.error.as_str()).collect();
    let spawned: Vec<i32> = rows
        .iter()
        .map(|(_, n, _)| i32::try_from(*n).unwrap_or(i32::MAX))
        .collect();
    let terminal: Vec<bool> = rows
        .iter()
        .map(|(r, _, _)| status::run_is_terminal(r.status))
        .collect();
    let traces: Vec<&str> = rows.iter().map(|(r, _, _)| r.trace_id.as_str()).collect();
    let waiting: Vec<bool> = rows.iter().map(|(_, _, x)| x.waiting).collect();
    let trigger_events: Vec<Option<&[u8]>> = rows.iter().map(|(_, _, x)| x.trigger_event).collect();
    let overlaps: Vec<&str> = rows.iter().map(|(_, _, x)| x.overlap).collect();
    let started: Vec<bool> = rows.iter().map(|(_, _, x)| x.started).collect();
    let quiet: Vec<bool> = rows.iter().map(|(_, _, x)| x.quiet).collect();
    let parents: Vec<&str> = rows
        .iter()
        .map(|(r, _, _)| r.traceparent.as_str())
        .collect();
    let ids_inserted: Vec<(Uuid,)> = sqlx::query_as(
        "INSERT INTO runs (id, activity_id, activity_name, activity_version, event_id, source, \
             dedupe_key, scheduled_for, fired_at, subject, payload, status, context, evaluation, \
             error, tasks_spawned, spawn_complete, trace_id, finished_at, waiting, trigger_event, \
             overlap, started_at, announced_at, traceparent) \
         SELECT u.id, u.activity_id, u.activity_name, u.activity_version, u.event_id, u.source, \
             u.dedupe_key, u.scheduled_for, u.fired_at, u.subject, u.payload, u.status, \
             u.context, u.evaluation, u.error, u.tasks_spawned, u.terminal, u.trace_id, \
             CASE WHEN u.terminal THEN now() END, u.waiting, u.trigger_event, u.overlap, \
             CASE WHEN u.started THEN now() END, CASE WHEN u.quiet THEN now() END, \
             u.traceparent \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::uuid[], $6::text[], \
             $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::jsonb[], \
             $12::text[], $13::jsonb[], $14::jsonb[], $15::text[], $16::int4[], $17::bool[], \
             $18::text[], $19::bool[], $20::bytea[], $21::text[], $22::bool[], $23::bool[], \
             $24::text[]) \
             AS u(id, activity_id, activity_name, activity_version, event_id, source, dedupe_key, \
                 scheduled_for, fired_at, subject, payload, status, context, evaluation, error, \
                 tasks_spawned, terminal, trace_id, waiting, trigger_event, overlap, started, \
                 quiet, traceparent) \
         ORDER BY u.id \
         ON CONFLICT DO NOTHING \
         RETURNING id",
    )
    .bind(&ids)
    .bind(&activities)
    .bind(&names)
    .bind(&versions)
    .bind(&events)
    .bind(&sources)
    .bind(&keys)
    .bind(&scheduled)
    .bind(&fired)
    .bind(&subjects)
    .bind(&payloads)
    .bind(&statuses)
    .bind(&contexts)
    .bind(&evaluations)
    .bind(&errors)
    .bind(&spawned)
    .bind(&terminal)
    .bind(&traces)
    .bind(&waiting)
    .bind(&trigger_events)
    .bind(&overlaps)
    .bind(&started)
    .bind(&quiet)
    .bind(&parents)
    .fetch_all(&mut *tx)
    .await?;
    inserted.extend(ids_inserted.into_iter().map(|(id,)| id));
    Ok(inserted)
}

/// Inserts the tasks of runs, many runs' tasks per statement.
async fn insert_tasks(
    tx: &mut sqlx::PgConnection,
    runs: &[(&NewRun, &[NewTask])],
) -> Result<(), sqlx::Error> {
    let rows: Vec<(&NewRun, &NewTask)> = runs
        .iter()
        .flat_map(|(run, tasks)| tasks.iter().map(move |task| (*run, task)))
        .collect();
    // In chunks, so one statement's parameters stay small.
    for chunk in rows.chunks(1000) {
        let run_ids: Vec<Uuid> = chunk.iter().map(|(r, _)| r.id.0).collect();
        let activities: Vec<Uuid> = chunk.iter().map(|(r, _)| r.activity_id.0).collect();
        let names: Vec<&str> = chunk
            .iter()
            .map(|(r, _)| r.activity_name.as_str())
            .collect();
        let ids: Vec<Uuid> = chunk.iter().map(|(_, t)| t.id.0).collect();
        let templates: Vec<&str> = chunk.iter().map(|(_, t)| t.template.as_str()).collect();
        let indexes: Vec<i32> = chunk
            .iter()
            .map(|(_, t)| i32::try_from(t.item_index).unwrap_or(i32::MAX))
            .collect();
        let types: Vec<&str> = chunk.iter().map(|(_, t)| t.task_type.as_str()).collect();
        let params: Vec<&serde_json::Value> = chunk.iter().map(|(_, t)| &t.params).collect();
        let instances: Vec<&[u8]> = chunk.iter().map(|(_, t)| t.instance.as_slice()).collect();
        let created: Vec<DateTime<Utc>> = chunk.iter().map(|(_, t)| t.created_at).collect();
        let statuses: Vec<&str> = chunk
            .iter()
            .map(|(_, t)| status::task_status_db(t.status))
            .collect();
        let deadlines: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|(_, t)| t.deadline).collect();
        let max_attempts: Vec<i32> = chunk
            .iter()
            .map(|(_, t)| i32::try_from(t.max_attempts).unwrap_or(i32::MAX))
            .collect();
        let keys: Vec<Option<&str>> = chunk
            .iter()
            .map(|(_, t)| t.concurrency.as_ref().map(|(key, _)| key.as_str()))
            .collect();
        let limits: Vec<Option<i32>> = chunk
            .iter()
            .map(|(_, t)| {
                t.concurrency
                    .as_ref()
                    .map(|(_, limit)| i32::try_from(*limit).unwrap_or(i32::MAX))
            })
            .collect();
        let held: Vec<bool> = chunk.iter().map(|(_, t)| t.held()).collect();
        sqlx::query(
            "INSERT INTO tasks (id, run_id, activity_id, activity_name, template, item_index, type, \
                 params, instance, status, created_at, deadline, max_attempts, result_token_required, \
                 concurrency_key, concurrency_limit, held) \
             SELECT u.id, u.run_id, u.activity_id, u.activity_name, u.template, u.item_index, \
                 u.type, u.params, u.instance, u.status, u.created_at, u.deadline, \
                 u.max_attempts, true, u.concurrency_key, u.concurrency_limit, u.held \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::int4[], \
                 $7::text[], $8::jsonb[], $9::bytea[], $10::timestamptz[], $11::text[], \
                 $12::timestamptz[], $13::int4[], $14::text[], $15::int4[], $16::bool[]) \
                 AS u(run_id, activity_id, activity_name, id, template, item_index, type, params, \
                     instance, created_at, status, deadline, max_attempts, concurrency_key, \
                     concurrency_limit, held) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&run_ids)
        .bind(&activities)
        .bind(&names)
        .bind(&ids)
        .bind(&templates)
        .bind(&indexes)
        .bind(&types)
        .bind(&params)
        .bind(&instances)
        .bind(&created)
        .bind(&statuses)
        .bind(&deadlines)
        .bind(&max_attempts)
        .bind(&keys)
        .bind(&limits)
        .bind(&held)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Records runs and all their tasks in one transaction, in order; per run, false when it already
/// existed (another delivery of the same trigger got there first, or an earlier run of this
/// batch): then nothing of it is written. An error of the transaction writes nothing (a caller
/// with several runs can record them one by one).
pub async fn insert_runs(
    pool: &PgPool,
    runs: &[(&NewRun, &[NewTask])],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // The first run of each id (a later one of this batch is a trigger delivered twice).
    let mut ids = std::collections::HashSet::with_capacity(runs.len());
    let rows: Vec<RunRow<'_>> = runs
        .iter()
        .filter(|(run, _)| ids.insert(run.id.0))
        .map(|(run, tasks)| (*run, tasks.len(), RowExtras::default()))
        .collect();
    let mut new = insert_run_rows(&mut tx, &rows).await?;
    // Each id is inserted for the first run that has it, and only that one.
    let inserted: Vec<bool> = runs.iter().map(|(run, _)| new.remove(&run.id.0)).collect();
    let mut written: Vec<(&NewRun, &[NewTask])> = runs
        .iter()
        .zip(&inserted)
        .filter(|(_, new)| **new)
        .map(|(run, _)| *run)
        .collect();
    // In run id order, as every writer of several runs.
    written.sort_by_key(|(run, _)| run.id.0);
    insert_tasks(&mut tx, &written).await?;
    tx.commit().await?;
    for (run, _) in written {
        record_run_finished(&run.activity_name, run.status);
    }
    Ok(inserted)
}

/// What [`RunWriter`] says of a run: whether it was new, and its tasks handed back.
type RunWritten = Result<(bool, Vec<NewTask>), sqlx::Error>;

/// Records new runs (with all their tasks) in group commit: the runs that wait together are
/// written in one transaction ([`insert_runs`]); a batch the database refuses is written run by
/// run, so one bad run holds back no other.
#[derive(Clone)]
pub struct RunWriter(GroupCommit<(NewRun, Vec<NewTask>), RunWritten>);

/// Runs in one transaction, at most.
const RUNS_AT_ONCE: usize = 256;

impl RunWriter {
    /// Starts the writer; `transactions` bounds its transactions at once.
    pub fn start(pool: PgPool, transactions: usize) -> Self {
        Self(GroupCommit::start(
            RUNS_AT_ONCE,
            transactions,
            move |batch: Vec<(NewRun, Vec<NewTask>)>| {
                let pool = pool.clone();
                async move {
                    let outcomes = write_runs(&pool, &batch).await;
                    outcomes
                        .into_iter()
                        .zip(batch)
                        .map(|(outcome, (_, tasks))| outcome.map(|new| (new, tasks)))
                        .collect()
                }
            },
        ))
    }

    /// Records a run and all its tasks (false: the run already existed, and nothing was
    /// written); the tasks come back.
    pub async fn insert(&self, run: NewRun, tasks: Vec<NewTask>) -> RunWritten {
        self.0
            .submit((run, tasks))
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn write_runs(
    pool: &PgPool,
    batch: &[(NewRun, Vec<NewTask>)],
) -> Vec<Result<bool, sqlx::Error>> {
    let runs: Vec<(&NewRun, &[NewTask])> = batch.iter().map(|(r, t)| (r, t.as_slice())).collect();
    match insert_runs(pool, &runs).await {
        Ok(inserted) => return inserted.into_iter().map(Ok).collect(),
        Err(error) if runs.len() == 1 => return vec![Err(error)],
        Err(error)
            if let Some(each) = taskfactory_runtime::db::batch_failed(&error, runs.len()) =>
        {
            return each.into_iter().map(Err).collect();
        }
        Err(error) => {
            tracing::debug!(runs = runs.len(), error = %taskfactory_runtime::telemetry::error_chain(&error), "a batch of runs was not recorded; recording them one by one");
        }
    }
    let mut outcomes = Vec::with_capacity(runs.len());
    for run in runs {
        outcomes.push(
            insert_runs(pool, std::slice::from_ref(&run))
                .await
                .map(|mut inserted| inserted.pop().unwrap_or(false)),
        );
    }
    outcomes
}

/// What the overlap policy decided about a new run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Recorded as admitted: evaluate and spawn it now.
    Start,
    /// Recorded as waiting behind the activity's running run.
    Buffered { behind: RunId },
    /// Recorded as skipped, with the reason.
    Skipped { reason: String },
    /// The run was recorded before (a redelivered trigger).
    AlreadyRecorded,
}

/// Serializes overlap decisions about one activity across orchestrators (transaction-scoped).
async fn lock_activity(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("taskfactory-overlap:{}", activity.0))
        .execute(tx)
        .await?;
    Ok(())
}

/// Serializes the admissions and promotions of one concurrency key across orchestrators
/// (transaction-scoped). Taken where an activity's overlap lock would be (before runs and tasks);
/// never together with it, and one key at a time.
async fn lock_flow_key(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("taskfactory-flow:{}:{key}", activity.0))
        .execute(tx)
        .await?;
    Ok(())
}

/// A flow-controlled run's place among the waiting (`$5`: its admission's `arrival_ns`; a fire
/// from a trigger without it: its fire time).
const ARRIVAL: &str =
    "COALESCE(NULLIF($5::int8, 0), (extract(epoch FROM fired_at) * 1000000)::int8 * 1000)";

/// Records a new run waiting under flow control (`overlap`: which), with its flow columns: its
/// concurrency key and limit (when the admission has one), priority, place among the waiting,
/// and the throttle key that holds it (`throttle`). False when the run was recorded before.
pub(crate) async fn insert_waiting_run(
    tx: &mut sqlx::PgConnection,
    run: &NewRun,
    overlap: &str,
    trigger_event: &[u8],
    flow: &FlowAdmission,
    throttle: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let row = NewRun {
        status: RunStatus::RunPending,
        ..run.clone()
    };
    let extras = RowExtras {
        overlap,
        trigger_event: Some(trigger_event),
        waiting: true,
        ..RowExtras::default()
    };
    if !insert_run_rows(&mut *tx, &[(&row, 0, extras)])
        .await?
        .contains(&row.id.0)
    {
        return Ok(false);
    }
    let concurrency = (flow.concurrency_limit > 0).then_some(&flow.concurrency_key);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE runs SET flow_key = $2, flow_limit = $3, priority = $4, arrival_ns = {ARRIVAL}, \
             throttle_key = $6, throttled = $6 IS NOT NULL \
         WHERE id = $1"
    )))
    .persistent(false)
    .bind(row.id.0)
    .bind(concurrency)
    .bind(concurrency.map(|_| i32::try_from(flow.concurrency_limit).unwrap_or(i32::MAX)))
    .bind(flow.priority)
    .bind(flow.arrival_ns)
    .bind(throttle)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

/// Records a new run of an activity with `flow.concurrency` as waiting for room under its key,
/// then starts as many of the key's waiting runs as there is room for ([`promote_flow`]'s
/// rule), all in one transaction under the key's lock. Returns the runs to start now (this one
/// among them, or not), or `None` when the run was recorded before (a redelivered trigger).
pub async fn admit_flow_run(
    pool: &PgPool,
    run: &NewRun,
    flow: &FlowAdmission,
    trigger_event: &[u8],
) -> Result<Option<Vec<RunId>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_flow_key(&mut tx, run.activity_id, &flow.concurrency_key).await?;
    if !insert_waiting_run(&mut tx, run, "CONCURRENCY", trigger_event, flow, None).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    let started = promote_flow_locked(
        &mut tx,
        run.activity_id,
        &flow.concurrency_key,
        flow.concurrency_limit,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(started))
}

/// Starts as many of the key's waiting runs as there is room for under `limit` (and under each
/// one's own limit, that of the version it fired under): the highest priority first, then the
/// earliest fire. Returns them, to be evaluated and spawned.
pub async fn promote_flow(
    pool: &PgPool,
    activity: ActivityId,
    key: &str,
    limit: u32,
) -> Result<Vec<RunId>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_flow_key(&mut tx, activity, key).await?;
    let started = promote_flow_locked(&mut tx, activity, key, limit).await?;
    tx.commit().await?;
    Ok(started)
}

async fn promote_flow_locked(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
    key: &str,
    limit: u32,
) -> Result<Vec<RunId>, sqlx::Error> {
    // The admitted runs are locked, not only counted: a run ending meanwhile (its results
    // batch holds its row) is waited for, and then seen ended, so this never leaves a run waiting
    // that the batch did not see (the batch, in turn, reads the waiting runs only once its rows
    // are locked: after this transaction, if it came second).
    let admitted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM runs WHERE activity_id = $1 AND flow_key = $2 \
           AND NOT waiting AND status IN ('PENDING', 'RUNNING') FOR UPDATE) admitted",
    )
    // Planned on each use: a plan made while `runs` was nearly empty would scan it whole.
    .persistent(false)
    .bind(activity.0)
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    let room = i64::from(limit) - admitted;
    if room <= 0 {
        return Ok(Vec::new());
    }
    let waiting: Vec<(Uuid, Option<i32>)> = sqlx::query_as(
        "SELECT id, flow_limit FROM runs WHERE activity_id = $1 AND flow_key = $2 \
           AND waiting AND NOT throttled AND status = 'PENDING' \
         ORDER BY priority DESC, arrival_ns, id LIMIT $3",
    )
    .persistent(false)
    .bind(activity.0)
    .bind(key)
    .bind(room)
    .fetch_all(&mut *tx)
    .await?;
    // In order, each while the runs admitted before it leave room under its own limit.
    let started: Vec<Uuid> = (admitted..)
        .zip(waiting)
        .take_while(|(before, (_, own_limit))| *before < i64::from(own_limit.unwrap_or(i32::MAX)))
        .map(|(_, (id, _))| id)
        .collect();
    if started.is_empty() {
        return Ok(Vec::new());
    }
    // The instant it is admitted, not the transaction's start (which may come before the commit
    // that freed the room, and the end of the run before it). A run cancelled since it was
    // chosen (a cancel takes no key lock) stays as it is, and is not started.
    let started: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE runs SET waiting = false, started_at = clock_timestamp() \
         WHERE id = ANY($1) AND waiting AND NOT throttled AND status = 'PENDING' RETURNING id",
    )
    .persistent(false)
    .bind(&started)
    .fetch_all(&mut *tx)
    .await?;
    Ok(started.into_iter().map(RunId).collect())
}

/// The activity's unfinished runs, oldest first.
async fn active_runs(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
) -> Result<Vec<overlap::Unfinished>, sqlx::Error> {
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, waiting FROM runs WHERE activity_id = $1 AND status IN ('PENDING', 'RUNNING') \
             AND flow_key IS NULL AND throttle_key IS NULL \
         ORDER BY COALESCE(scheduled_for, fired_at), created_at, id",
    )
    .bind(activity.0)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, waiting)| overlap::Unfinished {
            id: RunId(id),
            waiting,
        })
        .collect())
}

/// Applies `policy` to a new run against the activity's unfinished runs ([`overlap::admit`]) and
/// records the outcome (with the TriggerEvent, for whoever starts it). `CANCEL_OTHER` cancels
/// those runs first; they are returned so their end can be announced.
pub async fn admit_run(
    pool: &PgPool,
    run: &NewRun,
    policy: OverlapPolicy,
    trigger_event: &[u8],
) -> Result<(Admission, Vec<RunId>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_activity(&mut tx, run.activity_id).await?;
    let exists: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM runs WHERE id = $1")
        .bind(run.id.0)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_some() {
        tx.rollback().await?;
        return Ok((Admission::AlreadyRecorded, Vec::new()));
    }
    let active = active_runs(&mut tx, run.activity_id).await?;
    let mut cancelled = Vec::new();
    let mut finished = Finished::default();
    let admission = match overlap::admit(policy, run.id, &active) {
        overlap::Admission::Start { cancel } => {
            finished = cancel_runs(&mut tx, &cancel, &overlap::cancelled_by(run.id)).await?;
            cancelled = cancel;
            Admission::Start
        }
        overlap::Admission::Buffered { behind } => Admission::Buffered { behind },
        overlap::Admission::Skipped { reason } => Admission::Skipped { reason },
    };
    let policy_name = policy.as_str_name();
    let mut row = NewRun {
        status: RunStatus::RunPending,
        ..run.clone()
    };
    let mut extras = RowExtras {
        overlap: policy_name,
        trigger_event: Some(trigger_event),
        ..RowExtras::default()
    };
    match &admission {
        Admission::Start => extras.started = true,
        Admission::Buffered { .. } => extras.waiting = true,
        Admission::Skipped { reason } => {
            row.status = RunStatus::RunSkipped;
            row.error = reason.clone();
            extras.trigger_event = None;
            extras.quiet = true;
        }
        Admission::AlreadyRecorded => {}
    }
    if !insert_run_rows(&mut tx, &[(&row, 0, extras)])
        .await?
        .contains(&row.id.0)
    {
        // Its dedupe key belongs to another run (it has not this id): nothing is cancelled or
        // recorded for a trigger that is not this run's.
        tx.rollback().await?;
        return Ok((Admission::AlreadyRecorded, Vec::new()));
    }
    tx.commit().await?;
    finished.record();
    record_run_finished(&row.activity_name, row.status);
    Ok((admission, cancelled))
}

/// Cancels runs and their unfinished tasks (`CANCELLED`, counted as not succeeded). Returns what
/// it finished, to [`Finished::record`] once the transaction is committed.
async fn cancel_runs(
    tx: &mut sqlx::PgConnection,
    runs: &[RunId],
    reason: &str,
) -> Result<Finished, sqlx::Error> {
    if runs.is_empty() {
        return Ok(Finished::default());
    }
    let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
    // Runs before tasks, the order every writer locks them in (see `record_result`).
    sqlx::query("SELECT id FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    // Exact: every writer of these tasks waits for the run locks taken above.
    let tasks: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, count(*) FROM tasks \
         WHERE run_id = ANY($1) AND status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED') GROUP BY type",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let runs: Vec<(String,)> = sqlx::query_as(
        "WITH cancelled AS ( \
             UPDATE tasks SET status = 'CANCELLED', finished_at = now(), last_error = $2 \
             WHERE run_id = ANY($1) AND status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED') \
             RETURNING run_id), \
         counts AS (SELECT run_id, count(*) AS n FROM cancelled GROUP BY run_id) \
         UPDATE runs r SET status = 'CANCELLED', waiting = false, finished_at = now(), \
             error = $2, tasks_failed = r.tasks_failed + COALESCE(c.n, 0), trigger_event = NULL \
         FROM (SELECT unnest($1::uuid[]) AS id) AS target \
         LEFT JOIN counts c ON c.run_id = target.id \
         WHERE r.id = target.id AND r.status IN ('PENDING', 'RUNNING') \
         RETURNING r.activity_name",
    )
    .bind(&ids)
    .bind(reason)
    .fetch_all(&mut *tx)
    .await?;
    Ok(Finished {
        runs: runs.into_iter().map(|(activity,)| activity).collect(),
        tasks,
    })
}

/// Runs and tasks a cancellation moved to `CANCELLED`, counted once its transaction committed.
#[derive(Debug, Default)]
struct Finished {
    /// The activity of each run cancelled.
    runs: Vec<String>,
    /// Tasks cancelled, per type.
    tasks: Vec<(String, i64)>,
}

impl Finished {
    fn record(&self) {
        for activity in &self.runs {
            record_run_finished(activity, RunStatus::RunCancelled);
        }
        for (task_type, count) in &self.tasks {
            let count = u64::try_from(*count).unwrap_or(0);
            metrics::record_tasks_finished(task_type, "cancelled", count);
        }
    }
}

/// Counts a run that reached its final state: called once, after the commit of the write that
/// moved it there (a write guarded so that a repeat changes nothing and is not counted).
pub(crate) fn record_run_finished(activity: &str, status: RunStatus) {
    if status::run_is_terminal(status) {
        metrics::record_runs_finished(activity, status::run_outcome(status), 1);
    }
}

/// The TriggerEvent of a run admitted to start but not started yet (status PENDING, not waiting),
/// and the run's trace context.
pub async fn admitted_trigger_event(
    pool: &PgPool,
    run: RunId,
) -> Result<Option<AdmittedRun>, sqlx::Error> {
    let row: Option<(Option<Vec<u8>>, String, i64)> = sqlx::query_as(
        "SELECT trigger_event, traceparent, \
             (extract(epoch FROM clock_timestamp() - created_at) * 1000)::int8 \
         FROM runs WHERE id = $1 AND status = 'PENDING' AND NOT waiting",
    )
    .bind(run.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(event, traceparent, waited_ms)| {
        event.map(|event| AdmittedRun {
            event,
            traceparent,
            waited_ms,
        })
    }))
}

/// A run admitted and not started: its encoded TriggerEvent, its trace context, and how long it
/// has been recorded (ms).
pub struct AdmittedRun {
    pub event: Vec<u8>,
    pub traceparent: String,
    pub waited_ms: i64,
}

/// Fills an admitted run with its evaluation and tasks (status leaves PENDING). False when it is
/// no longer an admitted run (someone else started it, or it was cancelled).
pub async fn fill_run(pool: &PgPool, run: &NewRun, tasks: &[NewTask]) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let terminal = status::run_is_terminal(run.status);
    let filled = sqlx::query(
        "UPDATE runs SET status = $2, context = $3, evaluation = $4, error = $5, \
             tasks_spawned = $6, spawn_complete = $7, finished_at = CASE WHEN $7 THEN now() END, \
             trigger_event = NULL \
         WHERE id = $1 AND status = 'PENDING' AND NOT waiting",
    )
    .bind(run.id.0)
    .bind(status::run_status_db(run.status))
    .bind(&run.context)
    .bind(&run.evaluation)
    .bind(&run.error)
    .bind(i32::try_from(tasks.len()).unwrap_or(i32::MAX))
    .bind(terminal)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !filled {
        tx.rollback().await?;
        return Ok(false);
    }
    insert_tasks(&mut tx, &[(run, tasks)]).await?;
    tx.commit().await?;
    record_run_finished(&run.activity_name, run.status);
    Ok(true)
}

/// When none of the activity's runs is running, admits its oldest waiting run
/// ([`overlap::next_to_start`]): the run to start.
pub async fn promote_next(
    pool: &PgPool,
    activity: ActivityId,
) -> Result<Option<RunId>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_activity(&mut tx, activity).await?;
    let active = active_runs(&mut tx, activity).await?;
    let Some(next) = overlap::next_to_start(&active) else {
        tx.rollback().await?;
        return Ok(None);
    };
    sqlx::query("UPDATE runs SET waiting = false, started_at = now() WHERE id = $1")
        .bind(next.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(next))
}

/// Overlap work left undone by an orchestrator that stopped mid-way, older than `before`:
/// activities whose waiting runs have nothing running ahead of them, and admitted runs that were
/// not started or not fully spawned.
pub async fn stalled_overlap_work(
    pool: &PgPool,
    before: DateTime<Utc>,
) -> Result<(Vec<ActivityId>, Vec<RunId>), sqlx::Error> {
    let activities: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT DISTINCT w.activity_id FROM runs w \
         WHERE w.status = 'PENDING' AND w.waiting AND NOT w.throttled AND w.created_at < $1 \
           AND w.flow_key IS NULL AND w.throttle_key IS NULL \
           AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.activity_id = w.activity_id \
               AND r.status IN ('PENDING', 'RUNNING') AND NOT r.waiting AND r.flow_key IS NULL \
               AND r.throttle_key IS NULL)",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    let runs: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM runs WHERE started_at < $1 AND NOT waiting \
           AND (status = 'PENDING' OR (status = 'RUNNING' AND NOT spawn_complete)) \
         LIMIT 500",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    Ok((
        activities.into_iter().map(|(id,)| ActivityId(id)).collect(),
        runs.into_iter().map(|(id,)| RunId(id)).collect(),
    ))
}

/// A run's concurrency key and limit, when it has one.
pub async fn run_flow(pool: &PgPool, run: RunId) -> Result<Option<(String, u32)>, sqlx::Error> {
    let row = sqlx::query("SELECT flow_key, flow_limit FROM runs WHERE id = $1")
        .bind(run.0)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(row) => flow_of(&row),
        None => Ok(None),
    }
}

/// Concurrency keys with runs waiting since before `before` and room to start one (the
/// orchestrator that should have started it stopped mid-way): `(activity, key, limit)`.
pub async fn stalled_flow_keys(
    pool: &PgPool,
    before: DateTime<Utc>,
) -> Result<Vec<(ActivityId, String, u32)>, sqlx::Error> {
    let keys: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT w.activity_id, w.flow_key, max(w.flow_limit) FROM runs w \
         WHERE w.status = 'PENDING' AND w.waiting AND NOT w.throttled AND w.flow_key IS NOT NULL \
           AND w.created_at < $1 \
         GROUP BY w.activity_id, w.flow_key \
         HAVING (SELECT count(*) FROM runs r WHERE r.activity_id = w.activity_id \
             AND r.flow_key = w.flow_key AND NOT r.waiting \
             AND r.status IN ('PENDING', 'RUNNING')) < max(w.flow_limit) \
         LIMIT 500",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    Ok(keys
        .into_iter()
        .map(|(activity, key, limit)| {
            (ActivityId(activity), key, u32::try_from(limit).unwrap_or(1))
        })
        .collect())
}

/// A task to publish, `(id, type, TaskInstance bytes)`, and where it stands in its run
/// (`(template, item_index)`: the key to read on from).
pub type PendingInstance = ((TaskId, String, Vec<u8>), (String, i32));

/// Tasks of a run not yet reported on, to publish (again) when a spawn is resumed: at most
/// `limit`, in order, after the task at `after` (from the first when `None`).
pub async fn pending_instances(
    pool: &PgPool,
    run: RunId,
    after: Option<(String, i32)>,
    limit: usize,
) -> Result<Vec<PendingInstance>, sqlx::Error> {
    // Before every task: item indexes start at 0.
    let (template, index) = after.unwrap_or((String::new(), -1));
    let rows: Vec<(Uuid, String, Vec<u8>, String, i32)> = sqlx::query_as(
        "SELECT id, type, instance, template, item_index FROM tasks \
         WHERE run_id = $1 AND status = 'PENDING' AND NOT held \
           AND (template, item_index) > ($2, $3) \
         ORDER BY template, item_index LIMIT $4",
    )
    .bind(run.0)
    .bind(template)
    .bind(index)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, t, instance, template, index)| ((TaskId(id), t, instance), (template, index)))
        .collect())
}

/// The two marks of a run's bookkeeping, each written in group commit: every mark waiting when
/// the previous statement ends is written by the next one (one statement, one commit, however
/// many runs), and each caller hears of its own once it is committed. `spawn_complete` says the
/// run's tasks are all published; `announced_at`, that its completion was published.
#[derive(Clone)]
pub struct RunMarks {
    pool: PgPool,
    spawned: GroupCommit<Uuid, Result<(), String>>,
    announced: GroupCommit<Uuid, Result<(), String>>,
}

/// A mark that could not be written (the database; the caller retries).
#[derive(Debug, thiserror::Error)]
#[error("cannot mark run {run} {what}: {error}")]
pub struct MarkError {
    run: RunId,
    what: &'static str,
    error: String,
}

/// Marks in one statement, at most.
const MARKS_AT_ONCE: usize = 1024;

impl RunMarks {
    /// Starts the two mark writers; each ends once every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        // The runs are locked in id order before they are updated, the order every writer of
        // runs takes several in, so a mark never deadlocks with a batch of results.
        let spawned = marks_writer(
            pool.clone(),
            "UPDATE runs SET spawn_complete = true \
             FROM (SELECT id FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE) locked \
             WHERE runs.id = locked.id",
        );
        let announced = marks_writer(
            pool.clone(),
            "UPDATE runs SET announced_at = now() \
             FROM (SELECT id FROM runs WHERE id = ANY($1) AND announced_at IS NULL \
                 ORDER BY id FOR UPDATE) locked \
             WHERE runs.id = locked.id",
        );
        Self {
            pool,
            spawned,
            announced,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Marks the run's tasks all published.
    pub async fn spawn_complete(&self, run: RunId) -> Result<(), MarkError> {
        Self::mark(&self.spawned, run, "spawned").await
    }

    /// Marks the run's completion published.
    pub async fn announced(&self, run: RunId) -> Result<(), MarkError> {
        Self::mark(&self.announced, run, "announced").await
    }

    async fn mark(
        writer: &GroupCommit<Uuid, Result<(), String>>,
        run: RunId,
        what: &'static str,
    ) -> Result<(), MarkError> {
        let outcome = match writer.submit(run.0).await {
            Ok(outcome) => outcome,
            Err(stopped) => Err(stopped.to_string()),
        };
        outcome.map_err(|error| MarkError { run, what, error })
    }
}

/// Writes the marks that wait, many runs per statement (one at a time).
fn marks_writer(pool: PgPool, statement: &'static str) -> GroupCommit<Uuid, Result<(), String>> {
    // A few statements at once: one mark held up by a run's lock does not hold back the others.
    GroupCommit::start(MARKS_AT_ONCE, 4, move |marks: Vec<Uuid>| {
        let pool = pool.clone();
        async move {
            let mut runs = marks.clone();
            runs.sort_unstable();
            runs.dedup();
            let outcome = sqlx::query(statement)
                .persistent(false)
                .bind(&runs)
                .execute(&pool)
                .await
                .map(drop)
                .map_err(|error| taskfactory_runtime::telemetry::error_chain(&error));
            vec![outcome; marks.len()]
        }
    })
}

/// A finished run that has not been announced yet.
#[derive(Clone, Debug)]
pub struct CompletedRun {
    pub id: RunId,
    pub activity_id: ActivityId,
    pub activity_name: String,
    pub status: RunStatus,
    pub tasks_spawned: u32,
    pub tasks_succeeded: u32,
    pub tasks_failed: u32,
    pub finished_at: Option<DateTime<Utc>>,
    /// Whether runs of its activity wait behind another, as the transaction that found it
    /// finished saw under the activity's overlap lock (true when not known): only then is there
    /// a next run to start. (Under `flow.concurrency`: runs of its key.)
    pub waiting_behind: bool,
    /// Under `flow.concurrency`: its key and limit, whose room it frees.
    pub flow: Option<(String, u32)>,
}

/// Runs that finished before `before` and were never announced (the announcing orchestrator died
/// in between).
pub async fn unannounced_runs(
    pool: &PgPool,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<RunId>, sqlx::Error> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM runs WHERE announced_at IS NULL AND finished_at IS NOT NULL \
           AND finished_at < $1 ORDER BY finished_at LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| RunId(id)).collect())
}

/// A run that is finished and not yet announced, if this one is.
pub async fn unannounced_completion(
    pool: &PgPool,
    run: RunId,
) -> Result<Option<CompletedRun>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, activity_id, activity_name, status, tasks_spawned, tasks_succeeded, \
             tasks_failed, finished_at, announced_at, flow_key, flow_limit FROM runs WHERE id = $1",
    )
    .bind(run.0)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => completed_from_row(&row),
        None => Ok(None),
    }
}

pub(crate) fn completed_from_row(
    row: &sqlx::postgres::PgRow,
) -> Result<Option<CompletedRun>, sqlx::Error> {
    let status = status::run_status_from_db(&row.try_get::<String, _>("status")?);
    let announced: Option<DateTime<Utc>> = row.try_get("announced_at")?;
    if !status::run_is_terminal(status) || announced.is_some() {
        return Ok(None);
    }
    let count = |name: &str| -> Result<u32, sqlx::Error> {
        Ok(u32::try_from(row.try_get::<i32, _>(name)?).unwrap_or(0))
    };
    Ok(Some(CompletedRun {
        id: RunId(row.try_get("id")?),
        activity_id: ActivityId(row.try_get("activity_id")?),
        activity_name: row.try_get("activity_name")?,
        status,
        tasks_spawned: count("tasks_spawned")?,
        tasks_succeeded: count("tasks_succeeded")?,
        tasks_failed: count("tasks_failed")?,
        finished_at: row.try_get("finished_at")?,
        waiting_behind: true,
        flow: flow_of(row)?,
    }))
}

/// A run row's `flow_key` and `flow_limit`, when it has them.
pub(crate) fn flow_of(row: &sqlx::postgres::PgRow) -> Result<Option<(String, u32)>, sqlx::Error> {
    let key: Option<String> = row.try_get("flow_key")?;
    let limit: Option<i32> = row.try_get("flow_limit")?;
    Ok(key.map(|key| (key, limit.and_then(|l| u32::try_from(l).ok()).unwrap_or(1))))
}

/// What cancelling a run found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    NotFound,
    /// Already finished: nothing to cancel.
    AlreadyFinished(RunStatus),
    /// Cancelled now (its unfinished tasks too); its activity, to start what waits behind it.
    Now(ActivityId),
}

/// Cancels a run and its unfinished tasks (under the activity's overlap lock).
pub async fn cancel_run(pool: &PgPool, run: RunId, reason: &str) -> Result<Cancelled, sqlx::Error> {
    let found: Option<(Uuid, String)> =
        sqlx::query_as("SELECT activity_id, status FROM runs WHERE id = $1")
            .bind(run.0)
            .fetch_optional(pool)
            .await?;
    let Some((activity, _)) = found else {
        return Ok(Cancelled::NotFound);
    };
    let activity = ActivityId(activity);
    let mut tx = pool.begin().await?;
    lock_activity(&mut tx, activity).await?;
    let (status,): (String,) = sqlx::query_as("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
        .bind(run.0)
        .fetch_one(&mut *tx)
        .await?;
    let status = status::run_status_from_db(&status);
    if status::run_is_terminal(status) {
        tx.rollback().await?;
        return Ok(Cancelled::AlreadyFinished(status));
    }
    let finished = cancel_runs(&mut tx, &[run], reason).await?;
    tx.commit().await?;
    finished.record();
    Ok(Cancelled::Now(activity))
}

/// A task as the commands see it.
#[derive(Debug)]
pub struct TaskState {
    pub run: RunId,
    pub activity: ActivityId,
    pub status: TaskStatus,
    pub attempts: u32,
    pub task_type: String,
    pub instance: Vec<u8>,
    pub redrives: u32,
}

pub async fn task_state(pool: &PgPool, task: TaskId) -> Result<Option<TaskState>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT run_id, activity_id, status, attempts, type, instance, redrives FROM tasks WHERE id = $1",
    )
    .bind(task.0)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(TaskState {
        run: RunId(row.try_get("run_id")?),
        activity: ActivityId(row.try_get("activity_id")?),
        status: status::task_status_from_db(&row.try_get::<String, _>("status")?),
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        task_type: row.try_get("type")?,
        instance: row.try_get("instance")?,
        redrives: u32::try_from(row.try_get::<i32, _>("redrives")?).unwrap_or(0),
    }))
}

/// Why a task could not be retried.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// Its run is finished, and its concurrency key has no room for it to run again.
    #[error(
        "its run would run again, and its concurrency key {key:?} has {limit} runs running (its \
         limit): retry it once one of them ends"
    )]
    NoRoom { key: String, limit: i32 },
    /// Its concurrency key (its template's `concurrency`) has no room for it.
    #[error(
        "its concurrency key {key:?} has {limit} tasks given to executors (its limit): retry it \
         once one of them ends"
    )]
    NoTaskRoom { key: String, limit: i32 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A dead task put back for a new attempt series: the attempts before it (its `attempt_base`) and
/// the series number, as of the redrive itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redriven {
    pub attempts: u32,
    pub series: u32,
}

/// The message id of a task's attempt series as its publisher gives it: the task id for the
/// series its spawn publishes, `{task}:redrive:{series}` for a `RetryTask` redrive's. Whoever
/// publishes the same series again (`requeue`) uses it too, so JetStream keeps one copy.
pub fn series_message_id(task: TaskId, series: u32) -> String {
    if series == 0 {
        task.to_string()
    } else {
        format!("{task}:redrive:{series}")
    }
}

/// A redriven task whose new series never started: `PENDING` after a `RetryTask`, its run
/// `RUNNING`, no attempt past its base. Its redrive's publish may have failed after the redrive
/// committed (or the orchestrator died in between), so `RetryTask` publishes it again. Returns the
/// series' base and number.
pub async fn unstarted_redrive(
    pool: &PgPool,
    task: TaskId,
) -> Result<Option<Redriven>, sqlx::Error> {
    let row: Option<(i32, i32)> = sqlx::query_as(
        "SELECT t.attempt_base, t.redrives FROM tasks t JOIN runs r ON r.id = t.run_id \
         WHERE t.id = $1 AND t.status = 'PENDING' AND t.redrives > 0 AND r.status = 'RUNNING' \
           AND NOT EXISTS (SELECT 1 FROM task_attempts a \
                           WHERE a.task_id = t.id AND a.attempt > t.attempt_base)",
    )
    .bind(task.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(base, series)| Redriven {
        attempts: u32::try_from(base).unwrap_or(0),
        series: u32::try_from(series).unwrap_or(0),
    }))
}

/// Puts a dead task back to `PENDING` for a new attempt series, and reopens its run if the task's
/// death had finished it. `None` when the task is not dead (or its run was cancelled).
pub async fn redrive_task(pool: &PgPool, task: TaskId) -> Result<Option<Redriven>, RedriveError> {
    let mut tx = pool.begin().await?;
    // The run, then the task: the order every writer takes them in (a join locking both takes the
    // task first, and deadlocks against a late result of the task).
    type Owner = (
        Uuid,
        Uuid,
        Option<String>,
        Option<i32>,
        Option<String>,
        Option<i32>,
    );
    let run: Option<Owner> = sqlx::query_as(
        "SELECT t.run_id, r.activity_id, r.flow_key, r.flow_limit, t.concurrency_key, \
             t.concurrency_limit \
         FROM tasks t JOIN runs r ON r.id = t.run_id WHERE t.id = $1",
    )
    .bind(task.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((run, activity, flow_key, flow_limit, task_key, task_limit)) = run else {
        tx.rollback().await?;
        return Ok(None);
    };
    // Under a task concurrency key, the task runs again only if the key has room (its lock
    // first, as every way into its count takes it).
    if let Some(key) = &task_key {
        let limit = task_limit.unwrap_or(1);
        if !task_gate::key_has_room(&mut tx, key, limit).await? {
            tx.rollback().await?;
            return Err(RedriveError::NoTaskRoom {
                key: taskfactory_model::plan::TaskKey::shown(key).to_owned(),
                limit,
            });
        }
    }
    // Under flow.concurrency a finished run that runs again takes room under its key: only if
    // there is some (the key's lock first, as every admission takes it, then the runs).
    if let Some(key) = &flow_key {
        lock_flow_key(&mut tx, ActivityId(activity), key).await?;
        let limit = flow_limit.unwrap_or(1);
        let (admitted, finished): (i64, bool) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM runs WHERE activity_id = $1 \
                 AND flow_key = $2 AND id <> $3 AND NOT waiting \
                 AND status IN ('PENDING', 'RUNNING') FOR UPDATE) admitted), \
                 (SELECT status NOT IN ('PENDING', 'RUNNING') FROM runs WHERE id = $3)",
        )
        .bind(activity)
        .bind(key)
        .bind(run)
        .fetch_one(&mut *tx)
        .await?;
        if finished && admitted >= i64::from(limit) {
            tx.rollback().await?;
            return Err(RedriveError::NoRoom {
                key: key.clone(),
                limit,
            });
        }
    }
    let (run_status,): (String,) =
        sqlx::query_as("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
            .bind(run)
            .fetch_one(&mut *tx)
            .await?;
    let dead: Option<(Uuid,)> =
        sqlx::query_as("SELECT id FROM tasks WHERE id = $1 AND status = 'DEAD' FOR UPDATE")
            .bind(task.0)
            .fetch_optional(&mut *tx)
            .await?;
    if dead.is_none() {
        tx.rollback().await?;
        return Ok(None);
    }
    if run_status == "CANCELLED" || run_status == "SKIPPED" {
        tx.rollback().await?;
        return Ok(None);
    }
    // The new series starts past every attempt number already used: the task's own count, and
    // any in its history (an execution that started or ended after the task died adds a number
    // the task's count never took). Reusing one would merge the new series' rows into the old.
    let (attempts, series): (i32, i32) = sqlx::query_as(
        "UPDATE tasks SET status = 'PENDING', redrives = redrives + 1, finished_at = NULL, \
             redriven_at = now(), held = false, publish_due = NULL, \
             attempts = GREATEST(attempts, (SELECT COALESCE(max(attempt), 0) \
                                            FROM task_attempts WHERE task_id = $1)), \
             attempt_base = GREATEST(attempts, (SELECT COALESCE(max(attempt), 0) \
                                                FROM task_attempts WHERE task_id = $1)), \
             result_token_required = true \
         WHERE id = $1 RETURNING attempt_base, redrives",
    )
    .bind(task.0)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE runs SET tasks_failed = GREATEST(tasks_failed - 1, 0), status = 'RUNNING', \
             finished_at = NULL, announced_at = NULL \
         WHERE id = $1",
    )
    .bind(run)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Redriven {
        attempts: u32::try_from(attempts).unwrap_or(0),
        series: u32::try_from(series).unwrap_or(0),
    }))
}

/// Human tasks whose deadline passed.
pub async fn expired_human_tasks(
    pool: &PgPool,
    now: DateTime<Utc>,
) -> Result<Vec<(TaskId, u32)>, sqlx::Error> {
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT id, attempts FROM tasks WHERE status = 'WAITING' AND deadline < $1 LIMIT 500",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, n)| (TaskId(id), u32::try_from(n).unwrap_or(0)))
        .collect())
}

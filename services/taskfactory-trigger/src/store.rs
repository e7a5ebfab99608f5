//! Postgres access of the trigger service: definitions and versions (owned), the fire ledger and
//! schedule watermarks (owned), rejected events (owned), and read-only views of runs and tasks
//! (owned by the orchestrator) for the admin API.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::ids::{ActivityId, FireId, RunId};
use taskfactory_model::sizes::{self, SizeError};
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_runtime::clock::ClockHandle;
use uuid::Uuid;

use crate::{event_ledger, flow};

/// A stored activity at one version.
#[derive(Clone, Debug)]
pub struct ActivityRecord {
    pub id: ActivityId,
    pub name: String,
    /// The version the record's `spec` is (the current one unless a version was asked for).
    pub version: u32,
    pub current_version: u32,
    pub enabled: bool,
    pub paused: bool,
    pub pause_note: String,
    pub paused_at: Option<DateTime<Utc>>,
    pub resumed_at: Option<DateTime<Utc>>,
    pub activated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: serde_json::Value,
    /// Who made this version (the principal of the admin call).
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an activity named {name:?} already exists")]
    NameTaken { name: String },
    #[error("the activity was deleted meanwhile")]
    Gone,
    #[error("the activity changed meanwhile: it is at version {now}, not {expected}")]
    Moved { expected: u32, now: u32 },
    #[error("this replica is no longer the scheduling leader (its term {term} was superseded)")]
    Deposed { term: Term },
    /// A scheduled fire that would be written after its misfire threshold: nothing was written;
    /// the occurrence goes to the misfire policy.
    #[error(
        "the occurrence at {scheduled_for} would be written after its misfire threshold ({late_after})"
    )]
    Late {
        scheduled_for: DateTime<Utc>,
        late_after: DateTime<Utc>,
    },
    /// An event over its activity's rate limit: not fired, recorded `RATE_LIMITED`.
    #[error("{reason}")]
    RateLimited { reason: String },
    #[error(transparent)]
    TooLarge(#[from] SizeError),
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

/// The one place sqlx errors become store errors, by SQLSTATE.
fn classify(error: sqlx::Error, name: &str) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.code().as_deref() == Some("23505")
        && db.constraint() == Some("activities_live_name")
    {
        return StoreError::NameTaken {
            name: name.to_owned(),
        };
    }
    StoreError::Database(error)
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Database(error)
    }
}

fn activity_from_row(row: &sqlx::postgres::PgRow) -> Result<ActivityRecord, sqlx::Error> {
    Ok(ActivityRecord {
        id: ActivityId(row.try_get("id")?),
        name: row.try_get("name")?,
        version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
        current_version: u32::try_from(row.try_get::<i32, _>("current_version")?).unwrap_or(0),
        enabled: row.try_get("enabled")?,
        paused: row.try_get("paused")?,
        pause_note: row.try_get("pause_note")?,
        paused_at: row.try_get("paused_at")?,
        resumed_at: row.try_get("resumed_at")?,
        activated_at: row.try_get("activated_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        spec: row.try_get("spec")?,
        created_by: row.try_get("created_by")?,
    })
}

const ACTIVITY_COLUMNS: &str = "a.id, a.name, v.version, a.current_version, a.enabled, a.paused, \
     a.pause_note, a.paused_at, a.resumed_at, a.activated_at, a.created_at, a.updated_at, v.spec, \
     v.created_by";

/// A version to store: its spec (canonical JSON) and its size, what the activity row keeps of it,
/// and who made it; and the limit on the live specs' total it must stay within.
pub struct NewVersion<'a> {
    pub spec: &'a serde_json::Value,
    /// [`sizes::json_bytes`] of `spec`.
    pub spec_bytes: u64,
    /// `--max-activities` and `--max-definitions-bytes`.
    pub limits: sizes::TotalLimits,
    pub enabled: bool,
    pub trigger_kind: &'a str,
    pub created_by: &'a str,
}

/// Creates an activity at version 1. An enabled schedule starts deciding its occurrences from
/// `now` (its watermark is written with it, so none between creation and the scheduler noticing it
/// goes without a decision).
pub async fn create_activity(
    pool: &PgPool,
    id: ActivityId,
    name: &str,
    version: NewVersion<'_>,
    now: DateTime<Utc>,
) -> Result<ActivityRecord, StoreError> {
    let NewVersion {
        spec,
        spec_bytes,
        limits,
        enabled,
        trigger_kind,
        created_by,
    } = version;
    let mut tx = pool.begin().await?;
    admit_to_total(&mut tx, None, spec_bytes, limits).await?;
    sqlx::query(
        "INSERT INTO activities (id, name, current_version, enabled, trigger_kind, activated_at) \
         VALUES ($1, $2, 1, $3, $4, $5)",
    )
    .bind(id.0)
    .bind(name)
    .bind(enabled)
    .bind(trigger_kind)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(|e| classify(e, name))?;
    sqlx::query(
        "INSERT INTO activity_versions (activity_id, version, spec, spec_bytes, created_by) \
         VALUES ($1, 1, $2, $3, $4)",
    )
    .bind(id.0)
    .bind(spec)
    .bind(i64::try_from(spec_bytes).unwrap_or(i64::MAX))
    .bind(created_by)
    .execute(&mut *tx)
    .await?;
    if enabled && trigger_kind == "schedule" {
        advance_watermark(&mut tx, id, now, false).await?;
    }
    sqlx::query("SELECT nextval('definitions_generation')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(get_activity(pool, id, None)
        .await?
        .expect("the activity was just created"))
}

/// Stores a new version when the spec differs from the current one, if the current version is
/// still `expected` (what the caller's checks were made against); returns the record and
/// whether a version was added. Enabling a disabled activity marks it activated at `now`.
pub async fn update_activity(
    pool: &PgPool,
    id: ActivityId,
    expected: u32,
    version: NewVersion<'_>,
    now: DateTime<Utc>,
) -> Result<(ActivityRecord, bool), StoreError> {
    let NewVersion {
        spec,
        spec_bytes,
        limits,
        enabled,
        trigger_kind,
        created_by,
    } = version;
    let mut tx = pool.begin().await?;
    // Before the row: every change that adds to the total takes the two locks in this order.
    lock_definitions_total(&mut tx).await?;
    let current: (i32, serde_json::Value, i64) = sqlx::query_as(
        "SELECT a.current_version, v.spec, v.spec_bytes FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version \
         WHERE a.id = $1 AND a.deleted_at IS NULL FOR UPDATE OF a",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::Gone)?;
    let now_at = u32::try_from(current.0).unwrap_or(0);
    if now_at != expected {
        return Err(StoreError::Moved {
            expected,
            now: now_at,
        });
    }
    let changed = &current.1 != spec;
    if changed {
        let before = u64::try_from(current.2).unwrap_or(0);
        admit_to_total(&mut tx, Some(before), spec_bytes, limits).await?;
        let version = current.0 + 1;
        sqlx::query(
            "INSERT INTO activity_versions (activity_id, version, spec, spec_bytes, created_by) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.0)
        .bind(version)
        .bind(spec)
        .bind(i64::try_from(spec_bytes).unwrap_or(i64::MAX))
        .bind(created_by)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE activities SET current_version = $2, enabled = $3, trigger_kind = $4, \
                 activated_at = CASE WHEN $3 AND NOT enabled THEN $5 ELSE activated_at END, \
                 updated_at = now() WHERE id = $1",
        )
        .bind(id.0)
        .bind(version)
        .bind(enabled)
        .bind(trigger_kind)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT nextval('definitions_generation')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let record = get_activity(pool, id, None)
        .await?
        .ok_or(StoreError::Gone)?;
    Ok((record, changed))
}

/// Serializes the changes that add to the live specs' total (creates and updates) until the end
/// of the transaction, so that two at once cannot both pass `--max-definitions-bytes`. Deletes
/// only lower the total and do not wait.
async fn lock_definitions_total(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('taskfactory-definitions-total', 0))",
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Whether an activity may go from a spec of `before` bytes (none: a new one) to `after`, the
/// other live activities counted as they are now (`model::sizes`). Takes the totals' lock first
/// (a no-op when it is held).
async fn admit_to_total(
    tx: &mut sqlx::PgConnection,
    before: Option<u64>,
    after: u64,
    limits: sizes::TotalLimits,
) -> Result<(), StoreError> {
    lock_definitions_total(tx).await?;
    let (activities, bytes): (i64, i64) =
        sqlx::query_as("SELECT activities, bytes FROM definitions_totals")
            .fetch_one(&mut *tx)
            .await?;
    let (activities, bytes) = (
        u64::try_from(activities).unwrap_or(0),
        u64::try_from(bytes).unwrap_or(0),
    );
    let others = match before {
        Some(before) => sizes::Others {
            activities: activities.saturating_sub(1),
            bytes: bytes.saturating_sub(before),
        },
        None => sizes::Others { activities, bytes },
    };
    // The change itself moves the totals (database triggers on the tables it writes).
    sizes::admit_definitions(others, before, after, limits)?;
    Ok(())
}

/// Finds a live activity by id or by name.
pub async fn find_activity_id(
    pool: &PgPool,
    id_or_name: &str,
) -> Result<Option<ActivityId>, StoreError> {
    if id_or_name.contains('\0') {
        return Ok(None); // no name has one (Postgres could not even compare it)
    }
    let row: Option<(Uuid,)> = if let Ok(id) = Uuid::parse_str(id_or_name) {
        sqlx::query_as("SELECT id FROM activities WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .fetch_optional(pool)
            .await?
    } else {
        sqlx::query_as("SELECT id FROM activities WHERE name = $1 AND deleted_at IS NULL")
            .bind(id_or_name)
            .fetch_optional(pool)
            .await?
    };
    Ok(row.map(|(id,)| ActivityId(id)))
}

/// A live activity at its current version, or at `version`.
pub async fn get_activity(
    pool: &PgPool,
    id: ActivityId,
    version: Option<u32>,
) -> Result<Option<ActivityRecord>, StoreError> {
    let query = format!(
        "SELECT {ACTIVITY_COLUMNS} FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id \
              AND v.version = COALESCE($2, a.current_version) \
         WHERE a.id = $1 AND a.deleted_at IS NULL"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(id.0)
        .bind(version.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(activity_from_row).transpose()?)
}

/// Live activities by name, after `after_name` (only those of `only` when given): at most
/// `limit`, and specs of no more than `budget` bytes together, but at least one — a page of large
/// specs is shorter. With the name to list after for the next page, if more follow.
pub async fn list_activities(
    pool: &PgPool,
    after_name: Option<&str>,
    limit: usize,
    budget: u64,
    only: Option<&[Uuid]>,
) -> Result<(Vec<ActivityRecord>, Option<String>), StoreError> {
    // Sizes first, so that no spec is loaded that the page has no room for.
    let candidates: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT a.id, a.name, v.spec_bytes FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version \
         WHERE a.deleted_at IS NULL AND ($1::text IS NULL OR a.name > $1) \
           AND ($3::uuid[] IS NULL OR a.id = ANY($3)) \
         ORDER BY a.name LIMIT $2",
    )
    .bind(after_name)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1))
    .bind(only)
    .fetch_all(pool)
    .await?;
    let sizes: Vec<u64> = candidates
        .iter()
        .map(|(_, _, bytes)| u64::try_from(*bytes).unwrap_or(0))
        .collect();
    let taken = sizes::page_within(&sizes, limit, budget);
    let next_after = (candidates.len() > taken)
        .then(|| candidates[..taken].last().map(|(_, name, _)| name.clone()))
        .flatten();
    let ids: Vec<Uuid> = candidates[..taken].iter().map(|(id, _, _)| *id).collect();
    let query = format!(
        "SELECT {ACTIVITY_COLUMNS} FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version \
         WHERE a.deleted_at IS NULL AND a.id = ANY($1) ORDER BY a.name"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(query))
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    let records = rows
        .iter()
        .map(activity_from_row)
        .collect::<Result<_, _>>()?;
    Ok((records, next_after))
}

/// Live activities' heads (no spec) changed since a reload's horizon, and the activities deleted
/// since: what a reload needs to bring its snapshot up to date.
#[derive(Debug)]
pub struct Heads {
    /// What these were read at: the next reload reads the changes this read could not see.
    pub horizon: Horizon,
    pub heads: Vec<ActivityRecord>,
    /// Activities deleted since `since` (empty for a full read).
    pub gone: Vec<ActivityId>,
}

/// The snapshot a reload read at: the changes it could not see are those of transactions from
/// `xmax` on and of the ones still `running` then. (Not "from the oldest running one on": one
/// long transaction anywhere on the server would make every reload read again everything
/// changed since it began.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Horizon {
    pub xmax: i64,
    pub running: Vec<i64>,
}

/// Reads [`Heads`]: every live activity when `since` is `None`, else only those changed by
/// transactions the snapshot of `since` could not see, in one snapshot.
pub async fn activity_heads_since(
    pool: &PgPool,
    since: Option<&Horizon>,
) -> Result<Heads, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (xmax, running): (i64, Vec<i64>) = sqlx::query_as(
        "SELECT pg_snapshot_xmax(s)::text::bigint, \
                ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) x) \
         FROM (SELECT pg_current_snapshot() AS s) q",
    )
    .fetch_one(&mut *tx)
    .await?;
    let heads = live_activities(&mut tx, "'null'::jsonb AS spec,", None, since).await?;
    let gone: Vec<(Uuid,)> = match since {
        None => Vec::new(),
        Some(since) => {
            sqlx::query_as(
                "SELECT id FROM activities \
                 WHERE deleted_at IS NOT NULL \
                   AND (changed_xid >= $1::bigint::text::xid8 \
                        OR changed_xid = ANY($2::bigint[]::text[]::xid8[]))",
            )
            .persistent(false)
            .bind(since.xmax)
            .bind(&since.running)
            .fetch_all(&mut *tx)
            .await?
        }
    };
    let horizon = Horizon { xmax, running };
    tx.commit().await?;
    Ok(Heads {
        horizon,
        heads,
        gone: gone.into_iter().map(|(id,)| ActivityId(id)).collect(),
    })
}

/// These live activities at their current version, for the registry: the spec without what the
/// scheduler and the event matcher never read (tasks, context, description, labels), so that
/// what the registry loads and keeps is their triggers, however large their tasks.
pub async fn load_live_activities(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<Vec<ActivityRecord>, StoreError> {
    live_activities(
        &mut *pool.acquire().await?,
        "v.spec - ARRAY['tasks', 'context', 'description', 'labels'] AS spec,",
        Some(ids),
        None,
    )
    .await
}

/// Live activities at their current version with `spec_column` for their spec: only those of
/// `only`, and only those changed by transactions the snapshot of `since` could not see, when
/// given.
async fn live_activities(
    connection: &mut sqlx::PgConnection,
    spec_column: &str,
    only: Option<&[Uuid]>,
    since: Option<&Horizon>,
) -> Result<Vec<ActivityRecord>, StoreError> {
    let columns = ACTIVITY_COLUMNS.replacen("v.spec,", spec_column, 1);
    let query = format!(
        "SELECT {columns} FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version \
         WHERE a.deleted_at IS NULL AND ($1::uuid[] IS NULL OR a.id = ANY($1)) \
           AND ($2::bigint IS NULL OR a.changed_xid >= $2::bigint::text::xid8 \
                OR a.changed_xid = ANY($3::bigint[]::text[]::xid8[]))"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(query))
        .persistent(false)
        .bind(only)
        .bind(since.map(|h| h.xmax))
        .bind(since.map(|h| h.running.clone()))
        .fetch_all(connection)
        .await?;
    Ok(rows
        .iter()
        .map(activity_from_row)
        .collect::<Result<_, _>>()?)
}

/// Soft-deletes; history (versions, fires, runs) stays.
pub async fn delete_activity(pool: &PgPool, id: ActivityId) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    // The totals move with it (a database trigger).
    let deleted = sqlx::query(
        "UPDATE activities SET deleted_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id.0)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    sqlx::query("SELECT nextval('definitions_generation')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(deleted)
}

/// The generation counter trigger replicas poll to notice definition changes.
pub async fn definitions_generation(pool: &PgPool) -> Result<i64, StoreError> {
    let (value, called): (i64, bool) =
        sqlx::query_as("SELECT last_value, is_called FROM definitions_generation")
            .fetch_one(pool)
            .await?;
    Ok(if called { value } else { 0 })
}

/// A fire to record and publish.
#[derive(Clone, Debug)]
pub struct NewFire {
    pub id: FireId,
    pub activity_id: ActivityId,
    pub activity_name: String,
    pub activity_version: u32,
    pub source: &'static str,
    pub dedupe_key: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub fired_at: DateTime<Utc>,
    pub subject: String,
    pub payload: Option<std::sync::Arc<serde_json::Value>>,
    /// The encoded TriggerEvent.
    pub event: Vec<u8>,
    /// Schedules: the DST note of the occurrence.
    pub dst_note: Option<String>,
    /// The fire's trace context (empty when traces are off), for the reconciler's republish.
    pub traceparent: String,
    /// Events: the event, whose decision (`FIRED` or `DEDUPED`) is written with the fire.
    pub origin: Option<std::sync::Arc<crate::event_ledger::EventOrigin>>,
    /// Events of an activity with a rate limit: the limit and this event's key.
    pub rate_limit: Option<flow::RateLimit>,
}

/// A scheduling leadership term: the lease bucket's creation time (a recreated bucket is a newer
/// epoch) and the KV revision at which the lease was taken. Terms are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Term {
    pub epoch: DateTime<Utc>,
    pub revision: i64,
}

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.revision, self.epoch.timestamp_millis())
    }
}

/// The scheduler's side of a scheduled fire: the fencing token it writes under, the watermark
/// the fire advances, and the decisions about the occurrences before it.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleWrite<'a> {
    pub term: Term,
    pub watermark: DateTime<Utc>,
    pub decisions: &'a [DecisionRow],
    /// An on-time fire: the instant after which it is late (its time plus the misfire threshold
    /// and its jitter), and the scheduler's clock to judge it by. Judged once the fire's rows are
    /// written, just before the commit: a fire that waited for the database past it is not
    /// written ([`StoreError::Late`]). `None` for catch-up fires, late by design.
    pub late_after: Option<(DateTime<Utc>, &'a ClockHandle)>,
}

/// One row of the decision ledger (see the `occurrences` table).
#[derive(Clone, Debug)]
pub struct DecisionRow {
    pub activity_id: ActivityId,
    pub activity_version: u32,
    pub scheduled_for: DateTime<Utc>,
    pub range_after: DateTime<Utc>,
    pub occurrences: Option<u64>,
    /// `OccurrenceDecision` name, e.g. `COALESCED`.
    pub decision: &'static str,
    pub reason: String,
    pub run_id: Option<Uuid>,
    pub dst_note: Option<String>,
    pub decided_at: DateTime<Utc>,
}

/// Records a fire once per `(activity, dedupe key)`: [`record_fires`] with one.
pub async fn record_fire(
    pool: &PgPool,
    fire: &NewFire,
    schedule: Option<ScheduleWrite<'_>>,
) -> Result<bool, StoreError> {
    record_fires(pool, &[FireWrite { fire, schedule }])
        .await?
        .pop()
        .unwrap_or(Ok(false))
}

/// One fire to record, with the scheduler's side of it for a scheduled fire.
#[derive(Clone, Copy, Debug)]
pub struct FireWrite<'a> {
    pub fire: &'a NewFire,
    pub schedule: Option<ScheduleWrite<'a>>,
}

/// Records fires in one transaction, each once per `(activity, dedupe key)`. The conflict clause
/// names no index: the id is derived from the key, and two recordings of one key at once can meet
/// on either. For scheduled fires the fence of each term is checked once, and each one's
/// watermark and the decisions before it are written with it; a repeated scheduled fire is
/// recorded as `DEDUPED`, and a new on-time one judged late just before the commit is not
/// written ([`StoreError::Late`]). Returns, per fire in order, whether it was new (false: recorded
/// before), or why it was not written. An error of the whole transaction comes back as `Err`:
/// nothing was written (a caller with several fires can try them one by one).
pub async fn record_fires(
    pool: &PgPool,
    writes: &[FireWrite<'_>],
) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
    let mut tx = pool.begin().await?;
    let (recorded, decided) = record_fires_in(&mut tx, writes).await?;
    tx.commit().await?;
    decided.count();
    Ok(recorded)
}

/// Event decisions written in a transaction, to count once it is committed.
#[must_use]
pub(crate) struct Decided(Vec<event_ledger::DecisionRow>, Vec<bool>);

impl Decided {
    pub(crate) fn count(&self) {
        event_ledger::count(&self.0, &self.1);
    }
}

/// [`record_fires`] in `tx`, the caller's transaction (which it commits, then counts the
/// decisions written).
pub(crate) async fn record_fires_in(
    tx: &mut sqlx::PgConnection,
    writes: &[FireWrite<'_>],
) -> Result<(Vec<Result<bool, StoreError>>, Decided), StoreError> {
    let mut terms: Vec<Term> = writes
        .iter()
        .filter_map(|w| w.schedule.map(|s| s.term))
        .collect();
    terms.sort();
    terms.dedup();
    for term in terms {
        check_fence(&mut *tx, term).await?;
    }
    // Over their rate limit: judged before any fire is written, and not written.
    let limited = rate_limited(&mut *tx, writes).await?;
    let inserted = insert_fires(
        &mut *tx,
        writes
            .iter()
            .zip(&limited)
            .filter(|(_, limited)| limited.is_none())
            .map(|(w, _)| w.fire),
    )
    .await?;
    // Per write, whether it is the one that recorded its fire: of two writes of one key in this
    // batch (two events with one dedupe key), the first; the other is a duplicate.
    let mut claimed = std::collections::HashSet::new();
    let new: Vec<bool> = writes
        .iter()
        .zip(&limited)
        .map(|(w, limited)| {
            limited.is_none() && inserted.contains(&w.fire.id.0) && claimed.insert(w.fire.id.0)
        })
        .collect();
    // Judged once the fence is held and the rows are written, just before the commit: the wait
    // for the pool, the connection and the fence (a deposed leader's fire in progress) counts. A
    // late new fire is taken out again (nobody else has seen it); one recorded before is a
    // duplicate, whenever it comes.
    let late: Vec<Option<StoreError>> = writes
        .iter()
        .zip(&new)
        .map(|(w, &new)| {
            let write = w.schedule?;
            let (late_after, clock) = write.late_after?;
            (new && clock.now() > late_after).then(|| StoreError::Late {
                scheduled_for: w.fire.scheduled_for.unwrap_or(write.watermark),
                late_after,
            })
        })
        .collect();
    let late: Vec<Option<StoreError>> = late
        .into_iter()
        .zip(limited)
        .map(|(late, limited)| late.or(limited))
        .collect();
    let taken_out: Vec<Uuid> = writes
        .iter()
        .zip(&late)
        .filter(|(_, late)| matches!(late, Some(StoreError::Late { .. })))
        .map(|(w, _)| w.fire.id.0)
        .collect();
    if !taken_out.is_empty() {
        sqlx::query("DELETE FROM fires WHERE id = ANY($1)")
            .bind(&taken_out)
            .execute(&mut *tx)
            .await?;
    }
    let written: Vec<(&FireWrite<'_>, bool)> = writes
        .iter()
        .zip(&new)
        .zip(&late)
        .filter(|(_, late)| late.is_none())
        .map(|((w, &new), _)| (w, new))
        .collect();
    let mut watermarks = Vec::new();
    for &(write, new) in &written {
        let Some(schedule) = write.schedule else {
            continue;
        };
        let fire = write.fire;
        insert_decisions(&mut *tx, schedule.decisions).await?;
        if !new && let Some(at) = fire.scheduled_for {
            let (source,): (String,) = sqlx::query_as(
                "SELECT source FROM fires WHERE activity_id = $1 AND dedupe_key = $2",
            )
            .bind(fire.activity_id.0)
            .bind(&fire.dedupe_key)
            .fetch_one(&mut *tx)
            .await?;
            let dedupe = DecisionRow {
                activity_id: fire.activity_id,
                activity_version: fire.activity_version,
                scheduled_for: at,
                range_after: at - chrono::Duration::nanoseconds(1),
                occurrences: Some(1),
                decision: "DEDUPED",
                reason: format!("already fired (by {source}); the schedule did not fire it again"),
                run_id: None,
                dst_note: fire.dst_note.clone(),
                decided_at: fire.fired_at,
            };
            insert_decisions(&mut *tx, std::slice::from_ref(&dedupe)).await?;
        }
        watermarks.push((fire.activity_id, schedule.watermark, new));
    }
    advance_watermarks(&mut *tx, &watermarks).await?;
    // An event's decision at this activity: the fire's, or the earlier fire of its key. An
    // event delivered again after its fire was recorded finds its decision made.
    let mut decisions: Vec<event_ledger::DecisionRow> = written
        .iter()
        .filter_map(|&(write, new)| event_decision(write.fire, new))
        .collect();
    decisions.extend(
        writes
            .iter()
            .zip(&late)
            .filter_map(|(write, refused)| match refused {
                Some(StoreError::RateLimited { reason }) => {
                    rate_limited_decision(write.fire, reason)
                }
                _ => None,
            }),
    );
    let decided = event_ledger::insert(&mut *tx, &decisions).await?;
    let recorded = new
        .into_iter()
        .zip(late)
        .map(|(new, late)| match late {
            Some(late) => Err(late),
            None => Ok(new),
        })
        .collect();
    Ok((recorded, Decided(decisions, decided)))
}

/// The decision about the event behind `fire`, if an event is behind it: fired (`new`), or
/// the earlier fire of its key.
fn event_decision(fire: &NewFire, new: bool) -> Option<event_ledger::DecisionRow> {
    let run = RunId::derive(fire.activity_id, &fire.dedupe_key);
    if new {
        return fire_decision(fire, Decision::Fired, String::new(), Some(run), None);
    }
    let reason = format!("its key {:?} fired before, as run {run}", fire.dedupe_key);
    fire_decision(fire, Decision::Deduped, reason, Some(run), None)
}

/// The decision about the event behind `fire`, dropped over its rate limit.
fn rate_limited_decision(fire: &NewFire, reason: &str) -> Option<event_ledger::DecisionRow> {
    let flow_key = fire.rate_limit.as_ref().map(|limit| limit.key.clone());
    fire_decision(
        fire,
        Decision::RateLimited,
        reason.to_owned(),
        None,
        flow_key,
    )
}

fn fire_decision(
    fire: &NewFire,
    decision: Decision,
    reason: String,
    run_id: Option<RunId>,
    flow_key: Option<String>,
) -> Option<event_ledger::DecisionRow> {
    Some(event_ledger::DecisionRow {
        activity_id: fire.activity_id,
        activity_name: fire.activity_name.clone(),
        activity_version: fire.activity_version,
        origin: fire.origin.clone()?,
        key: fire.dedupe_key.clone(),
        decision,
        reason,
        run_id,
        decided_at: fire.fired_at,
        flow_key,
    })
}

/// Per write, whether its fire is dropped over its activity's rate limit (`flow`): an event
/// decided before (delivered again) as it was decided, without taking a share again; a fire whose
/// key fired before is a duplicate and takes none; each other one is judged against its key's
/// state, which is written in this transaction.
async fn rate_limited(
    tx: &mut sqlx::PgConnection,
    writes: &[FireWrite<'_>],
) -> Result<Vec<Option<StoreError>>, StoreError> {
    let over = |limit: &flow::RateLimit| StoreError::RateLimited {
        reason: limit.reason(),
    };
    let mut out: Vec<Option<StoreError>> = writes.iter().map(|_| None).collect();
    let candidates: Vec<(usize, &event_ledger::EventOrigin, &flow::RateLimit)> = writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| Some((i, w.fire.origin.as_deref()?, w.fire.rate_limit.as_ref()?)))
        .collect();
    if candidates.is_empty() {
        return Ok(out);
    }
    // The keys' state is locked first: what is read after it (decisions, fires) is then what
    // any other judge of these keys left, and none judges them meanwhile (one event handled by
    // two replicas at once takes one share).
    let locked = flow::lock(
        &mut *tx,
        candidates
            .iter()
            .map(|&(i, _, limit)| (writes[i].fire.activity_id, limit.key.as_str())),
    )
    .await?;
    let activities: Vec<Uuid> = candidates
        .iter()
        .map(|&(i, _, _)| writes[i].fire.activity_id.0)
        .collect();
    let sequences: Vec<i64> = candidates
        .iter()
        .map(|(_, origin, _)| i64::try_from(origin.sequence).unwrap_or(i64::MAX))
        .collect();
    let published: Vec<i64> = candidates.iter().map(|(_, o, _)| o.published_ns).collect();
    let decided: Vec<(Uuid, i64, i64, String)> = sqlx::query_as(
        "SELECT activity_id, stream_sequence, stream_published, decision FROM event_decisions \
         WHERE (activity_id, stream_sequence, stream_published) IN \
             (SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[]))",
    )
    .bind(&activities)
    .bind(&sequences)
    .bind(&published)
    .fetch_all(&mut *tx)
    .await?;
    let decided: std::collections::HashMap<(Uuid, i64, i64), String> = decided
        .into_iter()
        .map(|(a, s, p, d)| ((a, s, p), d))
        .collect();
    let ids: Vec<Uuid> = candidates
        .iter()
        .map(|&(i, _, _)| writes[i].fire.id.0)
        .collect();
    let fired: std::collections::HashSet<Uuid> =
        sqlx::query_scalar("SELECT id FROM fires WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut judged = Vec::new();
    let mut judged_at = Vec::new();
    for (n, &(i, _, limit)) in candidates.iter().enumerate() {
        let fire = writes[i].fire;
        // An event decided before stays as decided: over the limit, or fired (the fire is
        // there: a duplicate, as below). (Events decided otherwise do not reach here.)
        if decided
            .get(&(activities[n], sequences[n], published[n]))
            .is_some_and(|decision| decision == "RATE_LIMITED")
        {
            out[i] = Some(over(limit));
            continue;
        }
        if fired.contains(&fire.id.0) {
            continue;
        }
        judged.push(flow::Judged {
            activity: fire.activity_id,
            limit,
            at: fire.fired_at,
            fire: fire.id.0,
        });
        judged_at.push((i, limit));
    }
    let fits = flow::judge(tx, locked, &judged).await?;
    for ((i, limit), fit) in judged_at.into_iter().zip(fits) {
        if !fit {
            out[i] = Some(over(limit));
        }
    }
    Ok(out)
}

/// Inserts fires in one statement, skipping those recorded before; returns the ids inserted.
async fn insert_fires<'a>(
    tx: &mut sqlx::PgConnection,
    fires: impl Iterator<Item = &'a NewFire>,
) -> Result<std::collections::HashSet<Uuid>, StoreError> {
    let fires: Vec<&NewFire> = fires.collect();
    if fires.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let column = |f: fn(&NewFire) -> String| fires.iter().map(|fire| f(fire)).collect::<Vec<_>>();
    let ids: Vec<Uuid> = fires.iter().map(|f| f.id.0).collect();
    let activities: Vec<Uuid> = fires.iter().map(|f| f.activity_id.0).collect();
    let versions: Vec<i32> = fires
        .iter()
        .map(|f| i32::try_from(f.activity_version).unwrap_or(i32::MAX))
        .collect();
    let scheduled: Vec<Option<DateTime<Utc>>> = fires.iter().map(|f| f.scheduled_for).collect();
    let fired: Vec<DateTime<Utc>> = fires.iter().map(|f| f.fired_at).collect();
    let payloads: Vec<Option<sqlx::types::Json<&serde_json::Value>>> = fires
        .iter()
        .map(|f| f.payload.as_deref().map(sqlx::types::Json))
        .collect();
    let events: Vec<&[u8]> = fires.iter().map(|f| f.event.as_slice()).collect();
    let notes: Vec<Option<&str>> = fires.iter().map(|f| f.dst_note.as_deref()).collect();
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "INSERT INTO fires (id, activity_id, activity_name, activity_version, source, dedupe_key, \
             scheduled_for, fired_at, subject, payload, event, dst_note, traceparent) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], \
             $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::jsonb[], \
             $11::bytea[], $12::text[], $13::text[]) \
         ON CONFLICT DO NOTHING \
         RETURNING id",
    )
    .bind(&ids)
    .bind(&activities)
    .bind(column(|f| f.activity_name.clone()))
    .bind(&versions)
    .bind(column(|f| f.source.to_owned()))
    .bind(column(|f| f.dedupe_key.clone()))
    .bind(&scheduled)
    .bind(&fired)
    .bind(column(|f| f.subject.clone()))
    .bind(&payloads)
    .bind(&events)
    .bind(&notes)
    .bind(column(|f| f.traceparent.clone()))
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Records decisions that come with no fire, and moves the watermark past them.
pub async fn record_decisions(
    pool: &PgPool,
    activity_id: ActivityId,
    term: Term,
    decisions: &[DecisionRow],
    watermark: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, term).await?;
    insert_decisions(&mut tx, decisions).await?;
    advance_watermark(&mut tx, activity_id, watermark, false).await?;
    tx.commit().await?;
    Ok(())
}

async fn insert_decisions(
    tx: &mut sqlx::PgConnection,
    decisions: &[DecisionRow],
) -> Result<(), StoreError> {
    for row in decisions {
        sqlx::query(
            "INSERT INTO occurrences (activity_id, scheduled_for, decision, range_after, occurrences, \
                 reason, run_id, activity_version, dst_note, decided_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (activity_id, scheduled_for, decision) DO NOTHING",
        )
        .bind(row.activity_id.0)
        .bind(row.scheduled_for)
        .bind(row.decision)
        .bind(row.range_after)
        .bind(row.occurrences.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
        .bind(&row.reason)
        .bind(row.run_id)
        .bind(i32::try_from(row.activity_version).unwrap_or(i32::MAX))
        .bind(&row.dst_note)
        .bind(row.decided_at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Takes back a scheduled fire recorded ahead of its time ([`crate::fire::fire_ahead`]) and not
/// published: its schedule changed or ended before it was due. The fire is deleted and the
/// schedule's watermark moved back to just before the occurrence, so whoever schedules next
/// decides it again (a new version fires it; a resumed schedule's misfire policy decides it).
/// Under the leader's fence. False when there was nothing to take back (the fire was published,
/// or this replica no longer leads: then the fire stands and is published).
pub async fn withdraw_fire(
    pool: &PgPool,
    term: Term,
    activity: ActivityId,
    fire: FireId,
    scheduled_for: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    match check_fence(&mut tx, term).await {
        Err(StoreError::Deposed { .. }) => return Ok(false),
        checked => checked?,
    }
    let deleted = sqlx::query(
        "DELETE FROM fires WHERE id = $1 AND activity_id = $2 AND published_at IS NULL",
    )
    .bind(fire.0)
    .bind(activity.0)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if deleted == 0 {
        return Ok(false);
    }
    // The fire was the last thing decided; anything else (which nothing should write) and the
    // fire stands.
    let moved = sqlx::query(
        "UPDATE schedule_state SET watermark = $2, fires = GREATEST(fires - 1, 0), \
             updated_at = now() \
         WHERE activity_id = $1 AND watermark = $3",
    )
    .bind(activity.0)
    .bind(scheduled_for - chrono::Duration::microseconds(1))
    .bind(scheduled_for)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Holds the fence for the rest of the transaction (shared: scheduled fires of many schedules go
/// on concurrently) and fails if another leader has taken it since `term`.
async fn check_fence(tx: &mut sqlx::PgConnection, term: Term) -> Result<(), StoreError> {
    let current: Option<(DateTime<Utc>, i64)> =
        sqlx::query_as("SELECT epoch, term FROM scheduler_fence WHERE singleton FOR SHARE")
            .fetch_optional(tx)
            .await?;
    match current {
        Some((epoch, revision)) if (Term { epoch, revision }) == term => Ok(()),
        _ => Err(StoreError::Deposed { term }),
    }
}

/// Takes the fence for a new leadership term. False when a newer term already holds it (then
/// this lease is stale and will not renew). Waits at most two seconds for a deposed leader's fire
/// in progress (its connection is cut by `idle_in_transaction_session_timeout` if it froze).
pub async fn take_fence(
    pool: &PgPool,
    term: Term,
    holder: &str,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let taken = sqlx::query(
        "INSERT INTO scheduler_fence (singleton, epoch, term, holder, acquired_at) \
         VALUES (true, $1, $2, $3, $4) \
         ON CONFLICT (singleton) DO UPDATE SET epoch = EXCLUDED.epoch, term = EXCLUDED.term, \
             holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at \
         WHERE (scheduler_fence.epoch, scheduler_fence.term) < (EXCLUDED.epoch, EXCLUDED.term)",
    )
    .bind(term.epoch)
    .bind(term.revision)
    .bind(holder)
    .bind(at)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    tx.commit().await?;
    Ok(taken)
}

async fn advance_watermark(
    tx: &mut sqlx::PgConnection,
    activity_id: ActivityId,
    watermark: DateTime<Utc>,
    counted: bool,
) -> Result<(), StoreError> {
    advance_watermarks(tx, &[(activity_id, watermark, counted)]).await
}

/// Moves each schedule's watermark forward (never back), counting a fire where `counted`.
async fn advance_watermarks(
    tx: &mut sqlx::PgConnection,
    moves: &[(ActivityId, DateTime<Utc>, bool)],
) -> Result<(), StoreError> {
    if moves.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = moves.iter().map(|(a, _, _)| a.0).collect();
    let watermarks: Vec<DateTime<Utc>> = moves.iter().map(|(_, w, _)| *w).collect();
    let counted: Vec<i64> = moves.iter().map(|(_, _, c)| i64::from(*c)).collect();
    sqlx::query(
        "INSERT INTO schedule_state (activity_id, watermark, fires) \
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::int8[]) \
         ON CONFLICT (activity_id) DO UPDATE SET \
             watermark = GREATEST(schedule_state.watermark, EXCLUDED.watermark), \
             fires = schedule_state.fires + EXCLUDED.fires, updated_at = now()",
    )
    .bind(&ids)
    .bind(&watermarks)
    .bind(&counted)
    .execute(tx)
    .await?;
    Ok(())
}

/// The schedule progress of these activities (those that have any): each one's newest decided
/// occurrence and how many times it fired.
pub async fn schedule_states_of(
    pool: &PgPool,
    activities: &[ActivityId],
) -> Result<Vec<(ActivityId, DateTime<Utc>, u64)>, StoreError> {
    let ids: Vec<Uuid> = activities.iter().map(|a| a.0).collect();
    let rows: Vec<(Uuid, DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT activity_id, watermark, fires FROM schedule_state WHERE activity_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, w, n)| (ActivityId(id), w, u64::try_from(n).unwrap_or(0)))
        .collect())
}

/// Marks fires published, in one statement: each with the instant its publish was acknowledged.
pub async fn mark_all_published(
    pool: &PgPool,
    fires: &[(FireId, DateTime<Utc>)],
) -> Result<(), StoreError> {
    if fires.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = fires.iter().map(|(f, _)| f.0).collect();
    let at: Vec<DateTime<Utc>> = fires.iter().map(|(_, at)| *at).collect();
    sqlx::query(
        "UPDATE fires SET published_at = p.at FROM UNNEST($1::uuid[], $2::timestamptz[]) AS p (id, at) \
         WHERE fires.id = p.id AND fires.published_at IS NULL",
    )
    .bind(&ids)
    .bind(&at)
    .execute(pool)
    .await?;
    Ok(())
}

/// A recorded fire that still has to reach JetStream.
pub struct PendingFire {
    pub id: FireId,
    pub activity_id: ActivityId,
    pub activity_name: String,
    pub dedupe_key: String,
    pub event: Vec<u8>,
    /// The trace the fire belongs to (empty when traces were off).
    pub traceparent: String,
}

/// How often a published fire without a run is republished before it is given up (about five
/// hours of doubling waits); the orchestrator dead-letters fires it cannot use, with the reason.
pub const MAX_REPUBLISHES: i32 = 10;

/// Fires recorded but not published, older than `older_than` (scheduled ones also when their
/// instant is at or before `scheduled_due_by`, and never before their instant by the scheduler's
/// clock, `scheduler_now`), plus published fires for which no
/// run appeared (their message may have been lost): first a minute after publishing, then with
/// doubling waits up to an hour, so a stopped orchestrator is not flooded. Fires whose run exists
/// are confirmed first and never examined again, so each pass only looks at recent fires.
pub async fn fires_to_republish(
    pool: &PgPool,
    older_than: DateTime<Utc>,
    now: DateTime<Utc>,
    scheduler_now: DateTime<Utc>,
    scheduled_due_by: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<PendingFire>, StoreError> {
    // Planned on each use: a plan cached while `runs` was small hashes the whole table on every
    // pass (seen with auto_explain during a burst); a fresh one looks up the few fires' runs.
    sqlx::query(
        "UPDATE fires f SET confirmed_at = now() FROM runs r \
         WHERE f.confirmed_at IS NULL AND f.published_at IS NOT NULL \
           AND r.activity_id = f.activity_id AND r.dedupe_key = f.dedupe_key",
    )
    .persistent(false)
    .execute(pool)
    .await?;
    let rows = sqlx::query(
        "(SELECT f.id, f.activity_id, f.activity_name, f.dedupe_key, f.event, f.traceparent FROM fires f \
           WHERE f.published_at IS NULL \
             AND (f.fired_at < $1 OR (f.source = 'schedule' AND f.fired_at <= $6)) \
             AND NOT (f.source = 'schedule' AND f.fired_at > $5) \
           ORDER BY f.fired_at LIMIT $3) \
         UNION ALL \
         (SELECT f.id, f.activity_id, f.activity_name, f.dedupe_key, f.event, f.traceparent FROM fires f \
           WHERE f.confirmed_at IS NULL AND f.published_at IS NOT NULL \
             AND f.republish_count < $4 \
             AND f.published_at < $2 - make_interval(secs => LEAST(3600, 60 * power(2, LEAST(f.republish_count, 12)))) \
           ORDER BY f.published_at LIMIT $3)",
    )
    .bind(older_than)
    .bind(now)
    .bind(limit)
    .bind(MAX_REPUBLISHES)
    .bind(scheduler_now)
    .bind(scheduled_due_by)
    .fetch_all(pool)
    .await?;
    let mut fires = Vec::with_capacity(rows.len());
    for row in rows {
        fires.push(PendingFire {
            id: FireId(row.try_get("id")?),
            activity_id: ActivityId(row.try_get("activity_id")?),
            activity_name: row.try_get("activity_name")?,
            dedupe_key: row.try_get("dedupe_key")?,
            event: row.try_get("event")?,
            traceparent: row.try_get("traceparent")?,
        });
    }
    Ok(fires)
}

/// Records a republish: `published_at` moves forward and the backoff grows.
pub async fn mark_republished(pool: &PgPool, fire: FireId) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE fires SET republish_count = republish_count + CASE WHEN published_at IS NULL THEN 0 ELSE 1 END, \
             published_at = now() WHERE id = $1",
    )
        .bind(fire.0)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records an event that could not be taken in.
pub async fn record_rejected_event(
    pool: &PgPool,
    subject: &str,
    stream_sequence: u64,
    msg_id: Option<&str>,
    error: &str,
    body: &[u8],
) -> Result<(), StoreError> {
    const EXCERPT: usize = 4096;
    sqlx::query(
        "INSERT INTO rejected_events (subject, stream_sequence, msg_id, error, size_bytes, body_excerpt) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(subject)
    .bind(i64::try_from(stream_sequence).unwrap_or(i64::MAX))
    .bind(msg_id)
    .bind(error)
    .bind(i32::try_from(body.len()).unwrap_or(i32::MAX))
    .bind(&body[..body.len().min(EXCERPT)])
    .execute(pool)
    .await?;
    Ok(())
}

/// Pauses (`paused: true`) or resumes an activity with a note. Pausing a paused activity only
/// replaces its note; resuming a running one changes nothing. Returns whether the activity was
/// found.
pub async fn set_paused(
    pool: &PgPool,
    id: ActivityId,
    paused: bool,
    note: &str,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let query = if paused {
        "UPDATE activities SET pause_note = $2, \
             paused_at = CASE WHEN paused THEN paused_at ELSE $3 END, \
             paused = true, updated_at = now() \
         WHERE id = $1 AND deleted_at IS NULL"
    } else {
        "UPDATE activities SET resume_note = $2, \
             resumed_at = CASE WHEN paused THEN $3 ELSE resumed_at END, \
             activated_at = CASE WHEN paused THEN $3 ELSE activated_at END, \
             paused = false, updated_at = now() \
         WHERE id = $1 AND deleted_at IS NULL"
    };
    let found = sqlx::query(query)
        .bind(id.0)
        .bind(note)
        .bind(at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    sqlx::query("SELECT nextval('definitions_generation')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(found)
}

/// One schedule's newest decided occurrence and how many times it fired.
pub async fn schedule_state(
    pool: &PgPool,
    activity: ActivityId,
) -> Result<Option<(DateTime<Utc>, u64)>, StoreError> {
    let row: Option<(DateTime<Utc>, i64)> =
        sqlx::query_as("SELECT watermark, fires FROM schedule_state WHERE activity_id = $1")
            .bind(activity.0)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(w, n)| (w, u64::try_from(n).unwrap_or(0))))
}

/// Every version of an activity, newest first: `(version, created_at, created_by)`.
pub async fn activity_versions(
    pool: &PgPool,
    id: ActivityId,
) -> Result<Vec<(u32, DateTime<Utc>, String)>, StoreError> {
    let rows: Vec<(i32, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT version, created_at, created_by FROM activity_versions WHERE activity_id = $1 \
         ORDER BY version DESC",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(v, at, by)| (u32::try_from(v).unwrap_or(0), at, by))
        .collect())
}

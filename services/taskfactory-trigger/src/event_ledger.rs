//! The event-decision ledger: "why did this event (not) make a run?" (`ListEventDecisions`).
//!
//! Every event that reaches an activity (its subject matches the activity's event trigger) gets
//! exactly one decision for it, with a reason: `FIRED` (with the run), `DEDUPED` (with the run
//! its key made before), `FILTERED`, `FILTER_ERROR`, `KEY_ERROR`, `PAUSED`, `RATE_LIMITED` or
//! `REJECTED`.
//!
//! - A fire's decision (`FIRED` or `DEDUPED`) is written in the transaction that records the fire
//!   (`store::record_fires`), so there is never a fire without its decision or the reverse.
//! - Every other decision is written by the [`DecisionWriter`] (group commit) before the event is
//!   acked.
//! - An event is its stream sequence and publish instant: a redelivered event finds its
//!   decisions made and adds none (`ON CONFLICT DO NOTHING`), and the per-decision metric
//!   (`taskfactory_event_decisions_total`) counts only the rows written.
//! - `QUEUED` is not stored: it is a `FIRED` event whose run waits behind another (its overlap
//!   policy), read from the run as it is now.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::spec::chrono_to_timestamp;
use taskfactory_model::{status, values};
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{EventDecision, RunStatus};
use taskfactory_runtime::batch::GroupCommit;
use taskfactory_runtime::db;
use taskfactory_runtime::metrics;
use taskfactory_runtime::telemetry::error_chain;
use uuid::Uuid;

/// An event as the stream holds it: what names it in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOrigin {
    pub sequence: u64,
    /// Nanoseconds since the epoch at which the stream took it (a stream declared again starts
    /// its sequence over).
    pub published_ns: i64,
    pub msg_id: Option<String>,
    pub subject: String,
}

impl EventOrigin {
    /// How users name the event: its `Nats-Msg-Id`, else `seq:<stream sequence>`.
    pub fn event_id(&self) -> String {
        match &self.msg_id {
            Some(id) => id.clone(),
            None => format!("seq:{}", self.sequence),
        }
    }
}

/// One decision about one event at one activity.
#[derive(Clone, Debug)]
pub struct DecisionRow {
    pub activity_id: ActivityId,
    /// For the metric only.
    pub activity_name: String,
    pub activity_version: u32,
    pub origin: Arc<EventOrigin>,
    /// The key that names the event's fire where it could be computed, else the event's id.
    pub key: String,
    pub decision: Decision,
    pub reason: String,
    pub run_id: Option<RunId>,
    pub decided_at: DateTime<Utc>,
    /// `RATE_LIMITED`: the value of the rate limit's key.
    pub flow_key: Option<String>,
}

impl DecisionRow {
    /// Made storable as the fire's own columns are: no NUL character, a long key digested.
    pub fn storable(mut self) -> Self {
        values::make_storable_key(&mut self.key);
        values::make_storable_text(&mut self.reason);
        if let Some(key) = self.flow_key.as_mut() {
            values::make_storable_key(key);
        }
        self
    }
}

/// The ledger's spelling of a decision (and the metric's label, lowercased).
pub fn decision_db(decision: Decision) -> &'static str {
    match decision {
        Decision::Unspecified => "UNSPECIFIED",
        Decision::Fired => "FIRED",
        Decision::Filtered => "FILTERED",
        Decision::FilterError => "FILTER_ERROR",
        Decision::KeyError => "KEY_ERROR",
        Decision::Deduped => "DEDUPED",
        Decision::Queued => "QUEUED",
        Decision::Paused => "PAUSED",
        Decision::Rejected => "REJECTED",
        Decision::RateLimited => "RATE_LIMITED",
        Decision::Debounced => "DEBOUNCED",
        Decision::Batched => "BATCHED",
    }
}

fn decision_from_db(text: &str) -> Decision {
    Decision::from_str_name(text).unwrap_or(Decision::Unspecified)
}

fn metric_label(decision: Decision) -> &'static str {
    match decision {
        Decision::Unspecified => "unspecified",
        Decision::Fired => "fired",
        Decision::Filtered => "filtered",
        Decision::FilterError => "filter_error",
        Decision::KeyError => "key_error",
        Decision::Deduped => "deduped",
        Decision::Queued => "queued",
        Decision::Paused => "paused",
        Decision::Rejected => "rejected",
        Decision::RateLimited => "rate_limited",
        Decision::Debounced => "debounced",
        Decision::Batched => "batched",
    }
}

/// Inserts decisions in one statement, each once per event and activity; returns, per row in
/// order, whether it was written now (false: the event's decision was made before).
pub(crate) async fn insert(
    conn: &mut sqlx::PgConnection,
    rows: &[DecisionRow],
) -> Result<Vec<bool>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&DecisionRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let activities: Vec<Uuid> = rows.iter().map(|r| r.activity_id.0).collect();
    let versions: Vec<i32> = rows
        .iter()
        .map(|r| i32::try_from(r.activity_version).unwrap_or(i32::MAX))
        .collect();
    let sequences: Vec<i64> = rows
        .iter()
        .map(|r| i64::try_from(r.origin.sequence).unwrap_or(i64::MAX))
        .collect();
    let published: Vec<i64> = rows.iter().map(|r| r.origin.published_ns).collect();
    let msg_ids: Vec<Option<String>> = rows
        .iter()
        .map(|r| {
            r.origin.msg_id.clone().map(|mut id| {
                values::make_storable_text(&mut id);
                id
            })
        })
        .collect();
    let subjects = column(|r| {
        let mut subject = r.origin.subject.clone();
        values::make_storable_text(&mut subject);
        subject
    });
    let decisions: Vec<&str> = rows.iter().map(|r| decision_db(r.decision)).collect();
    let runs: Vec<Option<Uuid>> = rows.iter().map(|r| r.run_id.map(|id| id.0)).collect();
    let decided: Vec<DateTime<Utc>> = rows.iter().map(|r| r.decided_at).collect();
    let flow_keys: Vec<Option<&str>> = rows.iter().map(|r| r.flow_key.as_deref()).collect();
    let written: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "INSERT INTO event_decisions (activity_id, activity_version, stream_sequence, \
             stream_published, msg_id, subject, event_key, decision, reason, run_id, decided_at, \
             flow_key) \
         SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::int8[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::uuid[], $11::timestamptz[], \
             $12::text[]) \
         ON CONFLICT DO NOTHING \
         RETURNING activity_id, stream_sequence, stream_published",
    )
    .bind(&activities)
    .bind(&versions)
    .bind(&sequences)
    .bind(&published)
    .bind(&msg_ids)
    .bind(&subjects)
    .bind(column(|r| r.key.clone()))
    .bind(&decisions)
    .bind(column(|r| r.reason.clone()))
    .bind(&runs)
    .bind(&decided)
    .bind(&flow_keys)
    .fetch_all(conn)
    .await?;
    let mut written: HashSet<(Uuid, i64, i64)> = written.into_iter().collect();
    Ok(activities
        .iter()
        .zip(sequences.iter().zip(&published))
        .map(|(&activity, (&sequence, &published))| {
            written.remove(&(activity, sequence, published))
        })
        .collect())
}

/// Of `activities`, those that have a decision about the event already (it is delivered
/// again): the first decision stands, whatever would be decided now (the activity paused or
/// resumed, its spec changed meanwhile).
pub async fn decided(
    pool: &PgPool,
    activities: &[ActivityId],
    origin: &EventOrigin,
) -> Result<HashSet<ActivityId>, sqlx::Error> {
    let ids: Vec<Uuid> = activities.iter().map(|a| a.0).collect();
    let decided: Vec<Uuid> = sqlx::query_scalar(
        "SELECT activity_id FROM event_decisions \
         WHERE activity_id = ANY($1) AND stream_published = $2 AND stream_sequence = $3",
    )
    .bind(&ids)
    .bind(origin.published_ns)
    .bind(i64::try_from(origin.sequence).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    Ok(decided.into_iter().map(ActivityId).collect())
}

/// Counts the decisions written (after their commit).
pub(crate) fn count(rows: &[DecisionRow], written: &[bool]) {
    for (row, _) in rows.iter().zip(written).filter(|(_, written)| **written) {
        metrics::count_event_decision(&row.activity_name, metric_label(row.decision));
    }
}

/// Decisions written per transaction at most.
const BATCH: usize = 512;

/// Writes the decisions of events that made no fire, those that wait together in one
/// transaction (group commit). A decision the database refuses for its data (it would every
/// time) is logged and dropped rather than holding its event forever.
#[derive(Clone)]
pub struct DecisionWriter(GroupCommit<DecisionRow, Result<(), String>>);

impl DecisionWriter {
    pub fn start(pool: PgPool) -> Self {
        Self(GroupCommit::start(
            BATCH,
            2,
            move |rows: Vec<DecisionRow>| {
                let pool = pool.clone();
                async move { write_batch(&pool, rows).await }
            },
        ))
    }

    /// Records the decision; `Err` says why it could not be (the database: try again).
    pub async fn record(&self, row: DecisionRow) -> Result<(), String> {
        self.0
            .submit(row.storable())
            .await
            .map_err(|stopped| stopped.to_string())?
    }
}

async fn write_batch(pool: &PgPool, rows: Vec<DecisionRow>) -> Vec<Result<(), String>> {
    match write(pool, &rows).await {
        Ok(()) => return rows.iter().map(|_| Ok(())).collect(),
        Err(error) if rows.len() > 1 && db::batch_failed(&error, rows.len()).is_none() => {}
        Err(error) => return vec![refused_or_failed(&rows[0], &error)],
    }
    // Refused for some row's data: each alone, so only that one is refused.
    let mut outcomes = Vec::with_capacity(rows.len());
    for row in &rows {
        outcomes.push(match write(pool, std::slice::from_ref(row)).await {
            Ok(()) => Ok(()),
            Err(error) => refused_or_failed(row, &error),
        });
    }
    outcomes
}

async fn write(pool: &PgPool, rows: &[DecisionRow]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let written = insert(&mut tx, rows).await?;
    tx.commit().await?;
    count(rows, &written);
    Ok(())
}

fn refused_or_failed(row: &DecisionRow, error: &sqlx::Error) -> Result<(), String> {
    if let Some(refusal) = db::input_refused_by_database(error) {
        tracing::warn!(activity.name = %row.activity_name, event = %row.origin.event_id(), decision = decision_db(row.decision), code = %refusal.code, error = %error_chain(error), "the database refused an event decision for its data; not recorded");
        return Ok(());
    }
    Err(format!(
        "cannot record the decision about the event: {}",
        error_chain(error)
    ))
}

/// What `ListEventDecisions` asks for.
#[derive(Debug, Default)]
pub struct Query {
    pub activity_id: Option<Uuid>,
    pub key: Option<String>,
    pub event_id: Option<String>,
    /// Only these decisions (empty: all). `QUEUED` is a `FIRED` whose run waits.
    pub decisions: Vec<Decision>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    /// Only these activities (a caller who may view some): `None` for all.
    pub only: Option<Vec<Uuid>>,
    pub after: Option<Cursor>,
    pub limit: i64,
}

/// A page position: the last row shown (newest event first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub published: i64,
    pub sequence: i64,
    pub activity_id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}_{}_{}", self.published, self.sequence, self.activity_id)
    }

    pub fn decode(token: &str) -> Option<Self> {
        let mut parts = token.split('_');
        let cursor = Self {
            published: parts.next()?.parse().ok()?,
            sequence: parts.next()?.parse().ok()?,
            activity_id: Uuid::parse_str(parts.next()?).ok()?,
        };
        parts.next().is_none().then_some(cursor)
    }
}

/// The decisions `query` asks for, newest first, and the cursor of the next page.
pub async fn list(
    pool: &PgPool,
    query: &Query,
) -> Result<(Vec<EventDecision>, Option<Cursor>), sqlx::Error> {
    // QUEUED is stored as FIRED: asked for, it reads FIRED rows whose run waits.
    let mut stored: Vec<&str> = query
        .decisions
        .iter()
        .map(|&d| {
            if d == Decision::Queued {
                "FIRED"
            } else {
                decision_db(d)
            }
        })
        .collect();
    stored.sort_unstable();
    stored.dedup();
    let wants_fired = query.decisions.is_empty() || query.decisions.contains(&Decision::Fired);
    let wants_queued = query.decisions.is_empty() || query.decisions.contains(&Decision::Queued);
    let nanos = |at: DateTime<Utc>| at.timestamp_nanos_opt().unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT d.activity_id, coalesce(a.name, '') AS activity_name, d.activity_version, \
             d.stream_sequence, d.stream_published, d.msg_id, d.subject, d.event_key, \
             d.decision, d.reason, d.run_id, d.decided_at, d.flow_key, r.status AS run_status, \
             coalesce(r.waiting AND r.status = 'PENDING', false) AS run_waits, \
             r.throttled AS run_throttled, r.throttle_key AS run_throttle_key, \
             r.flow_key AS run_flow_key \
         FROM event_decisions d \
         LEFT JOIN activities a ON a.id = d.activity_id \
         LEFT JOIN runs r ON r.id = d.run_id \
         WHERE ($1::uuid IS NULL OR d.activity_id = $1) \
           AND ($2::text IS NULL OR d.event_key = $2) \
           AND ($3::text IS NULL OR d.msg_id = $3 OR ('seq:' || d.stream_sequence) = $3) \
           AND (cardinality($4::text[]) = 0 OR d.decision = ANY($4)) \
           AND ($5::int8 IS NULL OR d.stream_published >= $5) \
           AND ($6::int8 IS NULL OR d.stream_published < $6) \
           AND ($7::uuid[] IS NULL OR d.activity_id = ANY($7)) \
           AND ($8::int8 IS NULL OR (d.stream_published, d.stream_sequence, d.activity_id) \
                < ($8, $9, $10)) \
           AND ($11 OR d.decision <> 'FIRED' OR coalesce(r.waiting AND r.status = 'PENDING', false)) \
           AND ($12 OR d.decision <> 'FIRED' OR NOT coalesce(r.waiting AND r.status = 'PENDING', false)) \
         ORDER BY d.stream_published DESC, d.stream_sequence DESC, d.activity_id DESC \
         LIMIT $13",
    )
    .bind(query.activity_id)
    .bind(query.key.as_deref())
    .bind(query.event_id.as_deref())
    .bind(&stored)
    .bind(query.start.map(nanos))
    .bind(query.end.map(nanos))
    .bind(query.only.as_deref())
    .bind(query.after.map(|c| c.published))
    .bind(query.after.map(|c| c.sequence))
    .bind(query.after.map(|c| c.activity_id))
    .bind(wants_fired)
    .bind(wants_queued)
    .bind(query.limit + 1)
    .fetch_all(pool)
    .await?;
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    let mut decisions = Vec::with_capacity(rows.len().min(limit));
    let mut cursor = None;
    for row in rows.iter().take(limit) {
        let (decision, next) = from_row(row)?;
        decisions.push(decision);
        cursor = Some(next);
    }
    Ok((decisions, if more { cursor } else { None }))
}

fn from_row(row: &sqlx::postgres::PgRow) -> Result<(EventDecision, Cursor), sqlx::Error> {
    let activity_id: Uuid = row.try_get("activity_id")?;
    let sequence: i64 = row.try_get("stream_sequence")?;
    let published: i64 = row.try_get("stream_published")?;
    let decided_at: DateTime<Utc> = row.try_get("decided_at")?;
    let msg_id: Option<String> = row.try_get("msg_id")?;
    let run_id: Option<Uuid> = row.try_get("run_id")?;
    let run_status: Option<String> = row.try_get("run_status")?;
    let mut decision = decision_from_db(row.try_get::<&str, _>("decision")?);
    let mut reason: String = row.try_get("reason")?;
    let mut flow_key: Option<String> = row.try_get("flow_key")?;
    let gathered = matches!(decision, Decision::Debounced | Decision::Batched);
    if (decision == Decision::Fired || gathered) && row.try_get::<bool, _>("run_waits")? {
        let throttle_key: Option<String> = row.try_get("run_throttle_key")?;
        let concurrency_key: Option<String> = row.try_get("run_flow_key")?;
        let (wait, key) = match (
            row.try_get::<Option<bool>, _>("run_throttled")?,
            throttle_key,
            concurrency_key,
        ) {
            (Some(true), Some(key), _) => (
                format!("its run waits for flow.throttle to let it through (key {key:?})"),
                Some(key),
            ),
            (_, _, Some(key)) => (
                format!("its run waits for room under flow.concurrency (key {key:?})"),
                Some(key),
            ),
            _ => (
                "its run waits for the activity's runs before it to finish (overlap policy)"
                    .to_owned(),
                None,
            ),
        };
        if gathered {
            // Its decision stands (the event is in that run); the wait is said beside it.
            reason = format!("{reason}; {wait}");
        } else {
            decision = Decision::Queued;
            reason = wait;
            flow_key = key.or(flow_key);
        }
    }
    let sequence_u64 = u64::try_from(sequence).unwrap_or(0);
    Ok((
        EventDecision {
            activity_id: activity_id.to_string(),
            activity_name: row.try_get("activity_name")?,
            activity_version: u32::try_from(row.try_get::<i32, _>("activity_version")?)
                .unwrap_or(0),
            event_id: msg_id.unwrap_or_else(|| format!("seq:{sequence_u64}")),
            stream_sequence: sequence_u64,
            subject: row.try_get("subject")?,
            key: row.try_get("event_key")?,
            flow_key: flow_key.unwrap_or_default(),
            decision: decision as i32,
            reason,
            run_id: run_id.map(|id| id.to_string()).unwrap_or_default(),
            run_status: run_status
                .as_deref()
                .map_or(RunStatus::Unspecified, status::run_status_from_db)
                as i32,
            decided_at: Some(chrono_to_timestamp(decided_at)),
            received_at: Some(chrono_to_timestamp(DateTime::from_timestamp_nanos(
                published,
            ))),
        },
        Cursor {
            published,
            sequence,
            activity_id,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_nothing_else_does() {
        let cursor = Cursor {
            published: 1_765_000_000_123_456_789,
            sequence: 42,
            activity_id: Uuid::from_u128(7),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        for bad in [
            "",
            "1_2",
            "x_1_00000000-0000-0000-0000-000000000007",
            "1_2_nope",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
        assert_eq!(Cursor::decode(&format!("{}_9", cursor.encode())), None);
    }

    #[test]
    fn every_decision_has_a_spelling_the_contract_reads_back() {
        for value in 0..=9 {
            let decision = Decision::try_from(value).unwrap();
            assert_eq!(decision_from_db(decision_db(decision)), decision);
        }
    }
}

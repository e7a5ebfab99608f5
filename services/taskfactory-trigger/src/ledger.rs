//! The decision ledger, read side: "why didn't it run at 09:00?" (`ListOccurrences`), and the
//! preview of what a schedule will do (`ListScheduleTimes`).
//!
//! Fired occurrences are the schedule's fires (sources `schedule`, `catchup`, `backfill`); every
//! other decision is a row of `occurrences`, possibly standing for a range of consecutive
//! occurrences, which is expanded here by recomputing the schedule of the version that decided
//! it.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::schedule::Schedule;
use taskfactory_model::spec::{self, chrono_to_timestamp};
use taskfactory_proto::v1::{
    ActivitySpec, Occurrence, OccurrenceDecision, ScheduleTime, ScheduleTrigger, trigger,
};

use crate::store::StoreError;

/// Occurrences returned by one `ListOccurrences` call at most.
pub const MAX_OCCURRENCES: usize = 10_000;
/// Schedule times previewed by one `ListScheduleTimes` call at most.
pub const MAX_SCHEDULE_TIMES: u32 = 1000;

/// The decisions about an activity's occurrences in `[start, end]`, oldest first (at most
/// [`MAX_OCCURRENCES`]; a later `start` shows more).
pub async fn list_occurrences(
    pool: &PgPool,
    activity: ActivityId,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<Occurrence>, StoreError> {
    let limit = i64::try_from(MAX_OCCURRENCES + 1).unwrap_or(i64::MAX);
    let mut out = Vec::new();

    // A fire's run may say more: its overlap policy skipped it, or it waits behind another run.
    let fires = sqlx::query(
        "SELECT f.scheduled_for, f.source, f.dedupe_key, f.fired_at, f.dst_note, \
             r.status AS run_status, r.waiting, r.error AS run_error, r.overlap \
         FROM fires f LEFT JOIN runs r \
             ON r.activity_id = f.activity_id AND r.dedupe_key = f.dedupe_key \
         WHERE f.activity_id = $1 AND f.scheduled_for BETWEEN $2 AND $3 \
           AND f.source IN ('schedule', 'catchup', 'backfill') \
         ORDER BY f.scheduled_for LIMIT $4",
    )
    .bind(activity.0)
    .bind(start)
    .bind(end)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    for row in fires {
        let at: DateTime<Utc> = row.try_get("scheduled_for")?;
        let fired_at: DateTime<Utc> = row.try_get("fired_at")?;
        let source: String = row.try_get("source")?;
        let dedupe_key: String = row.try_get("dedupe_key")?;
        let late = (fired_at - at).to_std().unwrap_or_default();
        let reason = match source.as_str() {
            "schedule" => format!("fired on time ({} after the scheduled time)", humane(late)),
            "catchup" => format!(
                "caught up by the misfire policy, {} after the scheduled time",
                humane(late)
            ),
            _ => "fired by a backfill".to_owned(),
        };
        let run_status: Option<String> = row.try_get("run_status")?;
        let waiting: Option<bool> = row.try_get("waiting")?;
        let (decision, reason) = match (run_status.as_deref(), waiting) {
            (Some("SKIPPED"), _) => (
                OccurrenceDecision::SkippedOverlap,
                format!("{reason}; {}", row.try_get::<String, _>("run_error")?),
            ),
            (Some("PENDING"), Some(true)) => (
                OccurrenceDecision::Buffered,
                format!(
                    "{reason}; overlap {} holds the run until the one before it finishes",
                    row.try_get::<String, _>("overlap")?
                ),
            ),
            _ => (OccurrenceDecision::Fired, reason),
        };
        out.push(Occurrence {
            activity_id: activity.to_string(),
            scheduled_for: Some(chrono_to_timestamp(at)),
            decision: decision as i32,
            reason,
            run_id: RunId::derive(activity, &dedupe_key).to_string(),
            dst_note: row
                .try_get::<Option<String>, _>("dst_note")?
                .unwrap_or_default(),
        });
    }

    let rows = sqlx::query(
        "SELECT scheduled_for, decision, range_after, occurrences, reason, run_id, \
             activity_version, dst_note FROM occurrences \
         WHERE activity_id = $1 AND scheduled_for >= $2 AND range_after < $3 \
         ORDER BY scheduled_for LIMIT $4",
    )
    .bind(activity.0)
    .bind(start)
    .bind(end)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut schedules: HashMap<i32, Option<Arc<Schedule>>> = HashMap::new();
    for row in rows {
        let through: DateTime<Utc> = row.try_get("scheduled_for")?;
        let after: DateTime<Utc> = row.try_get("range_after")?;
        let count: Option<i64> = row.try_get("occurrences")?;
        let decision_name: String = row.try_get("decision")?;
        let decision = OccurrenceDecision::from_str_name(&decision_name)
            .unwrap_or(OccurrenceDecision::Unspecified);
        let reason: String = row.try_get("reason")?;
        let run_id = row
            .try_get::<Option<uuid::Uuid>, _>("run_id")?
            .map(|id| id.to_string())
            .unwrap_or_default();
        let dst_note = row
            .try_get::<Option<String>, _>("dst_note")?
            .unwrap_or_default();
        let make = |at: DateTime<Utc>, dst_note: String| Occurrence {
            activity_id: activity.to_string(),
            scheduled_for: Some(chrono_to_timestamp(at)),
            decision: decision as i32,
            reason: reason.clone(),
            run_id: run_id.clone(),
            dst_note,
        };
        if count == Some(1) {
            if through >= start && through <= end {
                out.push(make(through, dst_note));
            }
            continue;
        }
        // A range: recompute its occurrences with the schedule of the version that decided it.
        let version: i32 = row.try_get("activity_version")?;
        let schedule = match schedules.get(&version) {
            Some(schedule) => schedule.clone(),
            None => {
                let built = version_schedule(pool, activity, version).await?;
                schedules.insert(version, built.clone());
                built
            }
        };
        let Some(schedule) = schedule else {
            continue;
        };
        let excluded = decision == OccurrenceDecision::Excluded;
        let from = after.max(start - chrono::Duration::nanoseconds(1));
        for occurrence in schedule.occurrences_after(from).including_excluded() {
            if occurrence.at > through || occurrence.at > end || out.len() > MAX_OCCURRENCES * 2 {
                break;
            }
            if occurrence.excluded == excluded {
                out.push(make(occurrence.at, occurrence.dst_note.unwrap_or_default()));
            }
        }
    }
    out.sort_by(|a, b| {
        let key = |o: &Occurrence| {
            o.scheduled_for
                .as_ref()
                .map(|t| (t.seconds, t.nanos))
                .unwrap_or_default()
        };
        key(a).cmp(&key(b)).then(a.decision.cmp(&b.decision))
    });
    out.truncate(MAX_OCCURRENCES);
    Ok(out)
}

/// The schedule of one stored version (None if that version is not a schedule).
async fn version_schedule(
    pool: &PgPool,
    activity: ActivityId,
    version: i32,
) -> Result<Option<Arc<Schedule>>, StoreError> {
    let spec: Option<(serde_json::Value,)> = sqlx::query_as(
        "SELECT spec FROM activity_versions WHERE activity_id = $1 AND version = $2",
    )
    .bind(activity.0)
    .bind(version)
    .fetch_optional(pool)
    .await?;
    let Some((spec,)) = spec else {
        return Ok(None);
    };
    let Ok(spec) = taskfactory_proto::from_json::<ActivitySpec>(&spec) else {
        return Ok(None);
    };
    Ok(schedule_trigger(&spec)
        .and_then(|t| spec::build_schedule(t).ok())
        .map(Arc::new))
}

pub fn schedule_trigger(spec: &ActivitySpec) -> Option<&ScheduleTrigger> {
    match spec.trigger.as_ref()?.kind.as_ref()? {
        trigger::Kind::Schedule(schedule) => Some(schedule),
        _ => None,
    }
}

/// The next `count` occurrences after `after`, excluded ones included and marked, with local
/// time, DST notes and the jitter delay.
pub fn schedule_times(
    activity_key: &str,
    trigger: &ScheduleTrigger,
    schedule: &Schedule,
    after: DateTime<Utc>,
    count: u32,
) -> Vec<ScheduleTime> {
    let jitter = trigger
        .jitter
        .as_ref()
        .and_then(spec::std_duration)
        .unwrap_or_default();
    let occurrences: Vec<_> = schedule
        .occurrences_after(after)
        .including_excluded()
        .take(count as usize + 1)
        .collect();
    let tz = schedule.timezone();
    occurrences
        .iter()
        .enumerate()
        .take(count as usize)
        .map(|(i, occurrence)| {
            let mut notes = Vec::new();
            if occurrence.excluded {
                let date = occurrence.wall.date();
                notes.push(format!("does not fire: {date} is in excludeDates"));
            }
            if let Some(note) = &occurrence.dst_note {
                notes.push(note.clone());
            }
            if !jitter.is_zero() && !occurrence.excluded {
                let following = occurrences[i + 1..]
                    .iter()
                    .find(|o| !o.excluded)
                    .map(|o| o.at);
                let delay = taskfactory_model::schedule::jitter_delay(
                    activity_key,
                    occurrence.at,
                    jitter,
                    following,
                );
                notes.push(format!("jitter: fires {} later", humane(delay)));
            }
            ScheduleTime {
                at: Some(chrono_to_timestamp(occurrence.at)),
                local_time: occurrence.local_time(tz),
                note: notes.join("; "),
            }
        })
        .collect()
}

/// A duration for people: `0.012s`, `3.5s`, `2m 5s`.
fn humane(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(60) {
        format!("{:.3}s", d.as_secs_f64())
    } else {
        humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
    }
}

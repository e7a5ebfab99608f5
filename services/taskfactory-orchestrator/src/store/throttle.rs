//! Flow control's throttle (`flow.throttle`): runs of one key start at most `limit` per
//! `period`, `burst` at once; the others wait, delayed and never dropped.
//!
//! Each key's budget is a generic cell rate whose state is one row of `throttles` (its
//! theoretical arrival time, TAT, and when its next held run is due, `due_at`). An admission
//! records its run held and marks the key due; the throttle timer of any orchestrator lets
//! through what is due, under the key's row lock. So the rate holds across orchestrator replicas
//! and restarts, and a run held when an orchestrator stops starts when it is due, from whichever
//! is running.
//!
//! The runs a throttle holds (`throttled`) go through in priority order, then in the order their
//! events reached the stream (`arrival_ns`), whatever the order in which they were admitted. One let through without a concurrency
//! key starts at once; one with a key then waits for room under it ([`super::promote_flow`]),
//! in a transaction of its own: the two locks are never held together.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_proto::v1::{FlowAdmission, ThrottleAdmission};
use uuid::Uuid;

use super::{NewRun, insert_waiting_run};

/// Runs let through per key in one transaction (the rest on the timer's next turn, at once).
const RELEASE_BATCH: usize = 1_000;

/// A run the throttle let through: started (`concurrency` is `None`: to evaluate and spawn), or
/// now waiting for room under its concurrency key `(key, limit)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub run: RunId,
    pub concurrency: Option<(String, u32)>,
}

/// A key's rate: one start each `interval`, `burst` at once after a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub interval: TimeDelta,
    pub burst: u32,
}

impl Rate {
    pub fn of(throttle: &ThrottleAdmission) -> Self {
        let period = throttle
            .period
            .as_ref()
            .and_then(taskfactory_model::spec::std_duration)
            .unwrap_or_default();
        let nanos = period.as_nanos() / u128::from(throttle.limit.max(1));
        Self {
            interval: TimeDelta::nanoseconds(i64::try_from(nanos).unwrap_or(i64::MAX).max(1)),
            burst: throttle.burst.max(1),
        }
    }

    /// How long before its TAT a start may come: the burst beyond the first.
    fn tolerance(self) -> TimeDelta {
        self.interval * i32::try_from(self.burst - 1).unwrap_or(i32::MAX)
    }

    /// The TAT after a start at `now` of a run that could start from `eligible` (its order
    /// window passed). A start the timer makes a little late (it woke after the run's time, by
    /// at most a tenth of an interval) takes its share from when it should have come, so that
    /// such lateness does not pile up, and two starts are never closer than nine tenths of an
    /// interval; a later one (runs held while no orchestrator ran, a key idle for long) takes it
    /// from `now`, and runs do not start at once to catch up.
    fn after_start(
        self,
        tat: DateTime<Utc>,
        eligible: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let due = (tat - self.tolerance()).max(eligible);
        let from = if now - due <= self.interval / 10 {
            due
        } else {
            now
        };
        tat.max(from) + self.interval
    }

    /// Whether a run may start at `now` under `tat`.
    fn allows(self, tat: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        tat - self.tolerance() <= now
    }

    /// Of runs that could start from `eligibles` (in the order they go, none after `now`), how
    /// many may start at `now`, and the TAT after them.
    pub fn release(
        self,
        mut tat: DateTime<Utc>,
        now: DateTime<Utc>,
        eligibles: impl IntoIterator<Item = DateTime<Utc>>,
    ) -> (usize, DateTime<Utc>) {
        let mut n = 0;
        for eligible in eligibles {
            if !self.allows(tat, now) {
                break;
            }
            tat = self.after_start(tat, eligible, now);
            n += 1;
        }
        (n, tat)
    }

    /// At most how many runs may start at `now` (of at most `most`), whenever they could: each
    /// start takes at least one interval.
    fn most(self, mut tat: DateTime<Utc>, now: DateTime<Utc>, most: usize) -> usize {
        let mut n = 0;
        while n < most && self.allows(tat, now) {
            tat += self.interval;
            n += 1;
        }
        n
    }

    /// When the next run may start after `tat`.
    pub fn next_start(self, tat: DateTime<Utc>) -> DateTime<Utc> {
        tat - self.tolerance()
    }
}

/// A key's state, locked.
struct Locked {
    tat: DateTime<Utc>,
    rate: Rate,
    now: DateTime<Utc>,
    /// The order window: a run is let through once its event is this old.
    window: TimeDelta,
}

/// Records a new run of an activity with `flow.throttle` as held by its key's throttle, and marks
/// the key due unless it is (the throttle timer lets it through: [`release_throttled`]). Returns
/// false when the run was recorded before (a redelivered trigger).
///
/// Admissions of one key do not wait for each other: each holds the key's row in `KEY SHARE`
/// mode, which the timer's `FOR UPDATE` waits for. So the timer, deciding whether runs are still
/// held, sees every run whose admission saw the key due (and so did not mark it).
pub async fn admit_throttled_run(
    pool: &PgPool,
    run: &NewRun,
    (flow, throttle): (&FlowAdmission, &ThrottleAdmission),
    window: std::time::Duration,
    trigger_event: &[u8],
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rate = Rate::of(throttle);
    if !insert_waiting_run(
        &mut tx,
        run,
        "THROTTLE",
        trigger_event,
        flow,
        Some(&throttle.key),
    )
    .await?
    {
        tx.rollback().await?;
        return Ok(false);
    }
    let interval = rate.interval.num_nanoseconds().unwrap_or(i64::MAX);
    let burst = i32::try_from(rate.burst).unwrap_or(i32::MAX);
    // When the timer should look at the key for this run: once its order window has passed
    // (from when its event came, by the database's clock if the stream's runs ahead).
    let ready: DateTime<Utc> = sqlx::query_scalar(
        "SELECT LEAST(to_timestamp(arrival_ns / 1e9), clock_timestamp()) + $2::interval \
         FROM runs WHERE id = $1",
    )
    .persistent(false)
    .bind(run.id.0)
    .bind(TimeDelta::from_std(window).unwrap_or(TimeDelta::MAX))
    .fetch_one(&mut *tx)
    .await?;
    // The key's row, held in KEY SHARE until the commit: the timer's FOR UPDATE then waits for
    // this run, and the pruner (which skips locked rows) cannot delete the row under it. A new
    // key's row starts with a whole budget, due when this run is ready; a row the pruner deleted
    // between the insert and the lock is made again.
    let mut attempts = 0;
    loop {
        sqlx::query(
            "INSERT INTO throttles (activity_id, key, tat, interval_ns, burst, due_at) \
             VALUES ($1, $2, 'epoch', $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(run.activity_id.0)
        .bind(&throttle.key)
        .bind(interval)
        .bind(burst)
        .bind(ready)
        .execute(&mut *tx)
        .await?;
        let locked: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM throttles WHERE activity_id = $1 AND key = $2 FOR KEY SHARE",
        )
        .bind(run.activity_id.0)
        .bind(&throttle.key)
        .fetch_optional(&mut *tx)
        .await?;
        attempts += 1;
        if locked.is_some() {
            break;
        }
        if attempts >= 10 {
            return Err(sqlx::Error::Protocol(format!(
                "the throttle state of key {:?} was deleted under each of {attempts} admissions",
                throttle.key
            )));
        }
    }
    // The key is due when this run is ready, unless it is due sooner, or its budget holds it
    // until later anyway (then the row is left unlocked for the other admissions). A new rate
    // applies from this run on: the debt left under the old one is cut to the new one's burst.
    sqlx::query(
        "UPDATE throttles SET \
             due_at = LEAST(COALESCE(due_at, 'infinity'), \
                 GREATEST($5, tat - make_interval(secs => (burst - 1) * interval_ns / 1e9))), \
             tat = CASE WHEN interval_ns <> $3 OR burst <> $4 \
                 THEN LEAST(tat, clock_timestamp() + make_interval(secs => $4 * $3 / 1e9)) \
                 ELSE tat END, \
             interval_ns = $3, burst = $4 \
         WHERE activity_id = $1 AND key = $2 \
           AND (due_at IS NULL \
                OR due_at > GREATEST($5, tat - make_interval(secs => (burst - 1) * interval_ns / 1e9)) \
                OR interval_ns <> $3 OR burst <> $4)",
    )
    .bind(run.activity_id.0)
    .bind(&throttle.key)
    .bind(interval)
    .bind(burst)
    .bind(ready)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Lets through the runs of a key its budget allows now (the throttle timer, when the key is
/// due).
pub async fn release_throttled(
    pool: &PgPool,
    activity: ActivityId,
    key: &str,
    window: std::time::Duration,
) -> Result<Vec<Released>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(DateTime<Utc>, i64, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT tat, interval_ns, burst, clock_timestamp() FROM throttles \
         WHERE activity_id = $1 AND key = $2 FOR UPDATE",
    )
    .bind(activity.0)
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((tat, interval, burst, now)) = row else {
        return Ok(Vec::new());
    };
    let rate = Rate {
        interval: TimeDelta::nanoseconds(interval.max(1)),
        burst: u32::try_from(burst).unwrap_or(1).max(1),
    };
    let window = TimeDelta::from_std(window).unwrap_or(TimeDelta::MAX);
    let locked = Locked {
        tat,
        rate,
        now,
        window,
    };
    let released = release_locked(&mut tx, activity, key, locked).await?;
    tx.commit().await?;
    Ok(released)
}

/// Under the key's locked row: lets through as many of its held runs as its budget allows (in
/// priority order, then the order they fired), takes their share, and sets when the next held
/// run is due (none held: none due).
async fn release_locked(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
    key: &str,
    locked: Locked,
) -> Result<Vec<Released>, sqlx::Error> {
    let Locked {
        mut tat,
        rate,
        now,
        window,
    } = locked;
    let most = rate.most(tat, now, RELEASE_BATCH);
    let mut released = Vec::new();
    // The first held run whose order window has not passed, and when it will have.
    let mut not_ready = None;
    if most > 0 {
        // Locked, so that a cancel (which locks the run) either comes first and is seen, or
        // waits and finds the run let through.
        // When each came: its event's arrival, or its admission if the stream's clock is ahead.
        let next: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, LEAST(to_timestamp(arrival_ns / 1e9), created_at) FROM runs \
             WHERE activity_id = $1 AND throttle_key = $2 AND throttled AND status = 'PENDING' \
             ORDER BY priority DESC, arrival_ns, id LIMIT $3 FOR UPDATE",
        )
        .persistent(false)
        .bind(activity.0)
        .bind(key)
        .bind(i64::try_from(most).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        // When each could start: once its event is as old as the order window.
        let eligibles: Vec<DateTime<Utc>> = next.iter().map(|(_, came)| *came + window).collect();
        let ready = eligibles
            .iter()
            .position(|eligible| *eligible > now)
            .unwrap_or(eligibles.len());
        not_ready = eligibles.get(ready).copied();
        let (n, after) = rate.release(tat, now, eligibles[..ready].iter().copied());
        if n < ready {
            not_ready = None; // the budget, not the window, holds the next one
        }
        tat = after;
        let ids: Vec<Uuid> = next.iter().take(n).map(|(id, _)| *id).collect();
        // Started at one instant, a microsecond apart in the order they go, so that their record
        // keeps it.
        let rows: Vec<(Uuid, Option<String>, Option<i32>)> = sqlx::query_as(
            "WITH t AS (SELECT clock_timestamp() AS at) \
             UPDATE runs r SET throttled = false, waiting = (r.flow_key IS NOT NULL), \
                 started_at = CASE WHEN r.flow_key IS NULL \
                     THEN t.at + u.ord * interval '1 microsecond' END \
             FROM t, unnest($1::uuid[]) WITH ORDINALITY AS u (id, ord) \
             WHERE r.id = u.id RETURNING r.id, r.flow_key, r.flow_limit",
        )
        .persistent(false)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        // In the order they go (RETURNING keeps none).
        let mut rows = rows;
        rows.sort_by_key(|(id, _, _)| ids.iter().position(|i| i == id));
        released = rows
            .into_iter()
            .map(|(id, flow_key, flow_limit)| Released {
                run: RunId(id),
                concurrency: flow_key
                    .map(|key| (key, u32::try_from(flow_limit.unwrap_or(1)).unwrap_or(1))),
            })
            .collect();
    }
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM runs WHERE activity_id = $1 AND throttle_key = $2 \
             AND throttled AND status = 'PENDING')",
    )
    .persistent(false)
    .bind(activity.0)
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    let due = held.then(|| rate.next_start(tat).max(not_ready.unwrap_or(now)).max(now));
    sqlx::query("UPDATE throttles SET tat = $3, due_at = $4 WHERE activity_id = $1 AND key = $2")
        .bind(activity.0)
        .bind(key)
        .bind(tat)
        .bind(due)
        .execute(&mut *tx)
        .await?;
    Ok(released)
}

/// Throttled keys whose next held run is due: `(activity, key)`, the earliest first.
pub async fn due_throttles(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<(ActivityId, String)>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT activity_id, key FROM throttles WHERE due_at <= clock_timestamp() \
         ORDER BY due_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(activity, key)| (ActivityId(activity), key))
        .collect())
}

/// How long until the next throttled key is due (by the database's clock), if one is.
pub async fn next_throttle_due(pool: &PgPool) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let row: (Option<DateTime<Utc>>, DateTime<Utc>) = sqlx::query_as(
        "SELECT (SELECT min(due_at) FROM throttles WHERE due_at IS NOT NULL), clock_timestamp()",
    )
    .fetch_one(pool)
    .await?;
    Ok(row.0.map(|due| (due - row.1).to_std().unwrap_or_default()))
}

/// Rows deleted per statement by the pruner.
const PRUNE_BATCH: i64 = 10_000;

/// Marks due the keys that hold runs but are not due (none should be; a safety net, run with
/// the pruner). Returns how many.
pub async fn repair_throttles(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE throttles t SET due_at = clock_timestamp() \
         WHERE t.due_at IS NULL AND EXISTS (SELECT 1 FROM runs r \
             WHERE r.activity_id = t.activity_id AND r.throttle_key = t.key \
               AND r.throttled AND r.status = 'PENDING' \
               AND r.created_at < clock_timestamp() - interval '10 seconds')",
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes the state of idle keys: nothing held, and the TAT passed (a whole budget, as without
/// a row). Returns how many.
pub async fn prune_throttles(pool: &PgPool) -> Result<u64, sqlx::Error> {
    // Rows an admission or the timer holds are skipped: they are not idle.
    taskfactory_runtime::db::delete_in_batches(
        pool,
        "DELETE FROM throttles WHERE (activity_id, key) IN \
             (SELECT activity_id, key FROM throttles WHERE due_at IS NULL AND tat < now() \
              LIMIT $1 FOR UPDATE SKIP LOCKED)",
        PRUNE_BATCH,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_765_000_000_000 + ms).unwrap()
    }

    fn rate(limit: u32, period_ms: u64, burst: u32) -> Rate {
        Rate::of(&ThrottleAdmission {
            key: String::new(),
            limit,
            period: Some(prost_types::Duration {
                seconds: i64::try_from(period_ms / 1000).unwrap(),
                nanos: i32::try_from((period_ms % 1000) * 1_000_000).unwrap(),
            }),
            burst,
        })
    }

    /// The start times of `n` runs all held at 0, each let through as soon as allowed, the
    /// timer waking `lag` ms late each time.
    fn schedule(rate: Rate, n: usize, lag: i64) -> Vec<i64> {
        let mut tat = DateTime::<Utc>::UNIX_EPOCH;
        let mut now = at(0);
        let mut starts = Vec::new();
        while starts.len() < n {
            let (k, after) = rate.release(tat, now, vec![at(0); n - starts.len()]);
            tat = after;
            starts.extend(std::iter::repeat_n((now - at(0)).num_milliseconds(), k));
            now = rate.next_start(tat).max(now) + TimeDelta::milliseconds(lag);
        }
        starts
    }

    #[test]
    fn ten_a_second_spreads_two_hundred_runs_over_twenty_seconds() {
        let starts = schedule(rate(10, 1_000, 1), 200, 0);
        assert_eq!(starts[0], 0);
        assert_eq!(starts[1], 100);
        assert_eq!(starts[199], 19_900);
        // A timer that wakes late each time does not stretch them.
        let late = schedule(rate(10, 1_000, 1), 200, 8);
        assert!((19_900..=19_908).contains(&late[199]), "{}", late[199]);
        // Later than a tenth of an interval: starts are never closer than nine tenths of one.
        let later = schedule(rate(10, 1_000, 1), 20, 30);
        assert!(later.windows(2).all(|w| w[1] - w[0] >= 90), "{later:?}");
    }

    #[test]
    fn a_burst_starts_at_once_then_the_steady_rate() {
        let starts = schedule(rate(10, 60_000, 2), 5, 0);
        assert_eq!(starts, [0, 0, 6_000, 12_000, 18_000]);
        // The full limit as burst: the whole budget at once.
        let starts = schedule(rate(3, 1_000, 3), 6, 0);
        assert_eq!(starts, [0, 0, 0, 333, 666, 999]);
    }

    #[test]
    fn a_pause_gives_back_the_burst_and_no_more() {
        let r = rate(1, 1_000, 2);
        let idle = DateTime::<Utc>::UNIX_EPOCH;
        let fresh = |now: i64| vec![at(now); 10];
        // Long idle: two at once, not more.
        assert_eq!(r.release(idle, at(0), fresh(0)).0, 2);
        // One second after a start at 0: one came back.
        let (_, tat) = r.release(idle, at(0), fresh(0).into_iter().take(1));
        assert_eq!(tat, at(1_000));
        assert_eq!(r.release(tat, at(1_000), fresh(1_000)).0, 2);
        assert_eq!(r.release(tat, at(500), fresh(500)).0, 1);
        let (_, tat) = r.release(tat, at(0), fresh(0).into_iter().take(1));
        assert_eq!(r.release(tat, at(500), fresh(500)).0, 0);
        assert_eq!(r.next_start(tat), at(1_000));
    }

    #[test]
    fn runs_held_through_an_outage_do_not_all_start_at_once() {
        // Held since 0, nobody let them through until 60 s: the burst, not 60.
        let r = rate(1, 1_000, 1);
        let tat = at(1_000);
        assert_eq!(r.release(tat, at(60_000), vec![at(0); 100]).0, 1);
        let r = rate(10, 1_000, 3);
        assert_eq!(r.release(tat, at(60_000), vec![at(0); 100]).0, 3);
        // A key idle for long, its runs ready a little while ago: the burst too.
        assert_eq!(r.release(tat, at(60_000), vec![at(59_990); 100]).0, 3);
    }
}

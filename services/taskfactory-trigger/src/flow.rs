//! Flow control in the trigger: the rate limit (`flow.rateLimit`).
//!
//! A rate limit lets `limit` events of one key fire per `period`, as a generic cell rate (GCRA):
//! `limit` may come at once, then one every `period / limit` as the budget comes back. So over
//! a long time at most `limit` fire per `period`; one window of a period may hold the burst and
//! what came back during it (at most `2 × limit − 1`), as with a token bucket of `limit` tokens. Its state is one row per
//! activity and key in Postgres (`rate_limits`: the theoretical arrival time, TAT), read under a
//! row lock and written in the transaction that records the fires it lets through
//! (`store::record_fires`), so that:
//!
//! - the limit holds across trigger replicas and restarts;
//! - an event over the limit is dropped and recorded `RATE_LIMITED` in that same transaction,
//!   and one let through is recorded with its fire: an event delivered again finds its decision
//!   made and takes no second share of the budget;
//! - an event whose key already fired (a duplicate) takes none either.
//!
//! A key whose TAT has passed has its whole budget, exactly as a key without a row: the pruner
//! deletes such rows, so the table, and nothing in memory, grows with the keys ever seen.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An event fire under its activity's rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// The key's value for this event (storable: no NUL, a long one digested).
    pub key: String,
    pub limit: u32,
    pub period: Duration,
}

impl RateLimit {
    /// The time between two events at the steady rate: `period / limit`.
    fn interval(&self) -> chrono::TimeDelta {
        let nanos = self.period.as_nanos() / u128::from(self.limit.max(1));
        chrono::TimeDelta::nanoseconds(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    /// Why an event was dropped.
    pub fn reason(&self) -> String {
        format!(
            "over the rate limit of {} per {} for key {:?}",
            self.limit,
            humantime::format_duration(self.period),
            self.key
        )
    }
}

/// One step of the generic cell rate algorithm: whether an event arriving `now` fits the key
/// whose theoretical arrival time is `tat` (`None`: a key without state, its whole budget), and
/// the TAT after it. An event that does not fit leaves the TAT as it was.
pub fn gcra(
    limit: &RateLimit,
    tat: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (bool, Option<DateTime<Utc>>) {
    let interval = limit.interval();
    let tolerance =
        chrono::TimeDelta::from_std(limit.period).unwrap_or(chrono::TimeDelta::MAX) - interval;
    let start = tat.map_or(now, |tat| tat.max(now));
    if start - now > tolerance {
        return (false, tat);
    }
    (true, Some(start + interval))
}

/// A fire to judge: its activity, its limit, when it came, and the fire it would record (of two
/// in one batch, the second is a duplicate if the first fits, and takes no share).
pub(crate) struct Judged<'a> {
    pub activity: ActivityId,
    pub limit: &'a RateLimit,
    pub at: DateTime<Utc>,
    pub fire: Uuid,
}

/// The rate limits' state of some keys, locked in a transaction ([`lock`]).
pub(crate) struct Locked(HashMap<(Uuid, String), DateTime<Utc>>);

/// Locks the state rows of `keys` in `conn`'s transaction, creating those that are missing (at
/// the epoch: a whole budget), in one statement and in one order for every transaction: two
/// transactions judging one key take turns, and the pruner, which skips locked rows, never
/// deletes a row in between.
pub(crate) async fn lock(
    conn: &mut sqlx::PgConnection,
    keys: impl Iterator<Item = (ActivityId, &str)>,
) -> Result<Locked, sqlx::Error> {
    let mut keys: Vec<(Uuid, &str)> = keys.map(|(activity, key)| (activity.0, key)).collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(Locked(HashMap::new()));
    }
    let activities: Vec<Uuid> = keys.iter().map(|(a, _)| *a).collect();
    let names: Vec<&str> = keys.iter().map(|(_, k)| *k).collect();
    let rows: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO rate_limits (activity_id, key, tat) \
         SELECT activity_id, key, 'epoch' \
         FROM UNNEST($1::uuid[], $2::text[]) AS k (activity_id, key) \
         ON CONFLICT (activity_id, key) DO UPDATE SET tat = rate_limits.tat \
         RETURNING activity_id, key, tat",
    )
    .bind(&activities)
    .bind(&names)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Locked(
        rows.into_iter()
            .map(|(activity, key, tat)| ((activity, key), tat))
            .collect(),
    ))
}

/// Judges `fires` (in the order they came) against their keys' state, [`lock`]ed before, and
/// writes the state they leave. Returns, per fire, whether it fits.
pub(crate) async fn judge(
    conn: &mut sqlx::PgConnection,
    locked: Locked,
    fires: &[Judged<'_>],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut state = locked.0;
    let mut order: Vec<usize> = (0..fires.len()).collect();
    order.sort_by_key(|&i| (fires[i].at, i));
    let mut fits = vec![false; fires.len()];
    let mut fitted = std::collections::HashSet::new();
    let mut changed = std::collections::HashSet::new();
    for i in order {
        let fire = &fires[i];
        if fitted.contains(&fire.fire) {
            // A duplicate of a fire that fits: recorded as such, taking nothing.
            fits[i] = true;
            continue;
        }
        let key = (fire.activity.0, fire.limit.key.clone());
        let tat = state.get(&key).copied();
        let (fit, next) = gcra(fire.limit, tat, fire.at);
        fits[i] = fit;
        if fit {
            fitted.insert(fire.fire);
            if let Some(next) = next {
                state.insert(key.clone(), next);
                changed.insert(key);
            }
        }
    }
    // The state they leave, on the rows locked.
    let written: Vec<(Uuid, String, DateTime<Utc>)> = changed
        .into_iter()
        .filter_map(|key| state.get(&key).map(|tat| (key.0, key.1.clone(), *tat)))
        .collect();
    if written.is_empty() {
        return Ok(fits);
    }
    let activities: Vec<Uuid> = written.iter().map(|w| w.0).collect();
    let names: Vec<&str> = written.iter().map(|w| w.1.as_str()).collect();
    let tats: Vec<DateTime<Utc>> = written.iter().map(|w| w.2).collect();
    sqlx::query(
        "UPDATE rate_limits l SET tat = v.tat \
         FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS v (activity_id, key, tat) \
         WHERE l.activity_id = v.activity_id AND l.key = v.key",
    )
    .bind(&activities)
    .bind(&names)
    .bind(&tats)
    .execute(&mut *conn)
    .await?;
    Ok(fits)
}

/// Rows deleted per statement by the pruner.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes the state of keys whose TAT has passed (they have their whole budget, as without a
/// row); returns how many.
pub async fn prune_rate_limits(pool: &PgPool) -> Result<u64, sqlx::Error> {
    // Rows a recording transaction holds are skipped (it is judging them: they are not idle), so
    // the pruner never waits on one, nor one on it.
    taskfactory_runtime::db::delete_in_batches(
        pool,
        "DELETE FROM rate_limits WHERE (activity_id, key) IN \
             (SELECT activity_id, key FROM rate_limits WHERE tat < now() \
              LIMIT $1 FOR UPDATE SKIP LOCKED)",
        PRUNE_BATCH,
    )
    .await
}

/// Prunes the rate limits' idle keys every `every`, until `shutdown`.
pub async fn run_pruner(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match prune_rate_limits(&pool).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "idle rate-limit keys pruned"),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot prune idle rate-limit keys")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(limit: u32, period_ms: u64) -> RateLimit {
        RateLimit {
            key: "k".to_owned(),
            limit,
            period: Duration::from_millis(period_ms),
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_765_000_000_000 + ms).unwrap()
    }

    /// Which of the events arriving at `times` (ms) fit.
    fn run(limit: &RateLimit, times: &[i64]) -> Vec<bool> {
        let mut tat = None;
        times
            .iter()
            .map(|&ms| {
                let (fit, next) = gcra(limit, tat, at(ms));
                tat = next;
                fit
            })
            .collect()
    }

    #[test]
    fn one_per_ten_seconds() {
        let one = limit(1, 10_000);
        assert_eq!(
            run(&one, &[0, 1, 5_000, 9_999, 10_000, 10_001, 19_999, 20_000]),
            [true, false, false, false, true, false, false, true]
        );
    }

    #[test]
    fn a_burst_of_the_limit_then_the_steady_rate() {
        let five = limit(5, 1_000);
        // Five at once, then one every 200 ms.
        assert_eq!(
            run(&five, &[0, 0, 0, 0, 0, 0, 100, 200, 250, 400]),
            [
                true, true, true, true, true, false, false, true, false, true
            ]
        );
    }

    #[test]
    fn the_budget_is_the_limit_at_once_then_the_steady_rate() {
        // Events every 37 ms for 20 s against 7 per second.
        let seven = limit(7, 1_000);
        let times: Vec<i64> = (0..540).map(|i| i * 37).collect();
        let fits = run(&seven, &times);
        let fitted: Vec<i64> = times
            .iter()
            .zip(&fits)
            .filter(|(_, fit)| **fit)
            .map(|(t, _)| *t)
            .collect();
        // Any second: at most the burst of 7 and what came back during it.
        for (i, &start) in fitted.iter().enumerate() {
            let within = fitted[i..]
                .iter()
                .take_while(|&&t| t < start + 1_000)
                .count();
            assert!(within < 2 * 7, "{within} within a second from {start}");
        }
        // Any ten seconds: the rate, and the burst once.
        for (i, &start) in fitted.iter().enumerate() {
            let within = fitted[i..]
                .iter()
                .take_while(|&&t| t < start + 10_000)
                .count();
            assert!(within <= 70 + 7, "{within} within ten seconds from {start}");
        }
        // And the rate is used: 7 per second over 20 s, plus the burst.
        assert!((140..=147).contains(&fitted.len()), "{}", fitted.len());
    }

    #[test]
    fn an_event_over_the_limit_takes_nothing() {
        let one = limit(1, 1_000);
        let (fit, tat) = gcra(&one, None, at(0));
        assert!(fit);
        let (fit, after) = gcra(&one, tat, at(500));
        assert!(!fit);
        assert_eq!(after, tat);
    }
}

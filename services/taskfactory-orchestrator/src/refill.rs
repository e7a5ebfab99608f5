//! Keeping the finished-tasks bucket complete: when it was deleted and declared again (empty),
//! it is refilled from Postgres, the record of which tasks are final.
//!
//! # How executors stay safe while it is refilled
//!
//! A bucket is *complete* while it holds the key
//! [`FINISHED_TASKS_COMPLETE_KEY`](taskfactory_model::subjects::FINISHED_TASKS_COMPLETE_KEY),
//! which only this refill writes, when it is done (its value: the creation time of the bucket it
//! refilled). A bucket recreated empty — by whichever service's keeper saw it missing — has no
//! such key from its first moment, so there is no window in which an executor could take it for
//! complete: an executor that finds no entry for a task in a bucket that is not complete cannot
//! prove the task unfinished, and does not run it ([`taskfactory_model::results::check_finished`]):
//! it pulls no task message until the bucket is complete, and one in hand waits for it. The other way round (a "refill in
//! progress" key) would leave the moments between the recreation and the orchestrator noticing
//! it unguarded. The price: one more read per attempt (in parallel with the others), and while a
//! bucket is not complete, no task runs unless its entry finishes it; executors of an older
//! release, which do not read the key, are not protected during a refill.
//!
//! # When
//!
//! Every `every` (the keeper's `TASKFACTORY_DECLARE_EVERY`), one read of the key. Absent → refill:
//! note the bucket's creation time (its stream's `created`), write the entry of every final task
//! finished within the bucket's `max_age` (paged, a few writes at once, each only raising an
//! entry), then, if the bucket's creation time is still the one noted (it was not recreated
//! again meanwhile), write the key. Replicas may refill at once; the writes are idempotent. The
//! key is rewritten daily so the bucket's `max_age` never expires it.
//!
//! A fresh deployment (or the first start of this release) refills once: an empty or a
//! quick pass.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use sqlx::PgPool;
use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};
use taskfactory_runtime::finished_tasks;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;

/// Final tasks read from Postgres at a time.
const PAGE: i64 = 1000;
/// Entries written at once.
const WRITES_AT_ONCE: usize = 64;
/// How old the complete key may get before it is written again (the bucket expires entries
/// after its `max_age`, days).
const REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Tasks finished this much before the bucket's `max_age` are refilled too (an executor's clock
/// stamps `finished_at`).
const CLOCK_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Keeps the bucket complete until shutdown.
pub async fn keep_complete(
    pool: PgPool,
    js: jetstream::Context,
    kv: kv::Store,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checked = tokio::select! {
            _ = shutdown.cancelled() => return,
            checked = check(&pool, &js, &kv) => checked,
        };
        if let Err(error) = checked {
            tracing::warn!(bucket = FINISHED_TASKS_BUCKET, %error, "cannot make the finished-tasks bucket complete yet; executors take no tasks until it is");
        }
    }
}

/// One look: refills the bucket if it is not complete.
pub async fn check(pool: &PgPool, js: &jetstream::Context, kv: &kv::Store) -> Result<(), String> {
    match kv.entry(FINISHED_TASKS_COMPLETE_KEY).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            let age = chrono::Utc::now().timestamp() - entry.created.unix_timestamp();
            if u64::try_from(age).unwrap_or(0) > REFRESH_AFTER.as_secs() {
                // Whoever refreshed it meanwhile wins: a conflict is fine.
                let _ = kv
                    .update(FINISHED_TASKS_COMPLETE_KEY, entry.value, entry.revision)
                    .await;
            }
            return Ok(());
        }
        Ok(_) => {}
        Err(error) => return Err(format!("cannot read the complete key: {error}")),
    }
    let (created, max_age) = bucket_stream(js).await?;
    tracing::warn!(bucket = FINISHED_TASKS_BUCKET, %created, "the finished-tasks bucket is not complete (recreated); refilling it from Postgres");
    let since = (!max_age.is_zero())
        .then(|| chrono::Utc::now() - (max_age + CLOCK_MARGIN))
        .filter(|since| *since > chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let mut after = None;
    let mut written = 0usize;
    loop {
        let page = crate::store::final_tasks_page(pool, after, since, PAGE)
            .await
            .map_err(|error| format!("cannot read final tasks: {}", error_chain(&error)))?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(*last);
        let full = page.len() as i64 == PAGE;
        let mut writes = futures::stream::iter(page)
            .map(|(task, attempts)| async move {
                let attempt = u32::try_from(attempts).unwrap_or(0);
                finished_tasks::raise(kv, &task.to_string(), attempt, true).await
            })
            .buffer_unordered(WRITES_AT_ONCE);
        while let Some(outcome) = writes.next().await {
            outcome?;
            written += 1;
        }
        if !full {
            break;
        }
    }
    let (now_created, _) = bucket_stream(js).await?;
    if now_created != created {
        return Err("the bucket was recreated again while it was refilled; refilling anew".into());
    }
    match kv
        .create(FINISHED_TASKS_COMPLETE_KEY, created.to_rfc3339().into())
        .await
    {
        Ok(_) => {}
        // Another replica finished first.
        Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("cannot write the complete key: {error}")),
    }
    tracing::info!(
        bucket = FINISHED_TASKS_BUCKET,
        tasks = written,
        "finished-tasks bucket refilled"
    );
    Ok(())
}

/// The bucket's creation time (which identifies it: a recreated bucket has another) and its
/// `max_age`.
async fn bucket_stream(
    js: &jetstream::Context,
) -> Result<(chrono::DateTime<chrono::Utc>, Duration), String> {
    let mut stream = js
        .get_stream(format!("KV_{FINISHED_TASKS_BUCKET}"))
        .await
        .map_err(|error| format!("cannot find the bucket: {error}"))?;
    let info = stream
        .info()
        .await
        .map_err(|error| format!("cannot read the bucket's stream: {error}"))?;
    let created = i64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
    Ok((
        chrono::DateTime::from_timestamp_nanos(created),
        info.config.max_age,
    ))
}

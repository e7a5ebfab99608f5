//! Keeping the buckets executors trust complete: the finished-tasks bucket and the cancelled-runs
//! bucket, when deleted and declared again (empty), are refilled from Postgres, the record of
//! which tasks are final and which runs were cancelled.
//!
//! # How executors stay safe while one is refilled
//!
//! A bucket is *complete* while it holds its complete key (`complete`, which no task or run id
//! looks like) and the key's value is the bucket's own creation time (its stream's `created`;
//! [`taskfactory_model::complete`]). Only this refill writes it, when it is done. A bucket
//! recreated empty — by whichever service's keeper saw it missing — has no such key from its
//! first moment, so there is no window in which an executor could take it for complete: an
//! executor that finds no entry for a task (or its run) in a bucket that is not complete cannot
//! prove the task unfinished (or its run not cancelled), and does not run it
//! ([`taskfactory_model::results::check_finished`]): it pulls no task message until both buckets
//! are complete, and one in hand waits for them. The other way round (a "refill in progress" key)
//! would leave the moments between the recreation and the orchestrator noticing it unguarded.
//! Executors watch the key ([`taskfactory_runtime::complete::CompleteWatch`]), so each attempt
//! still costs one read per bucket; executors of an older release, which do not compare the
//! key's value, are not protected from a key that names another bucket (below).
//!
//! # When
//!
//! Every `every` (the keeper's `TASKFACTORY_DECLARE_EVERY`), one look at the bucket's creation
//! time and its key. A key that is missing, or names another bucket → refill: write the entry of
//! every final task finished (every run cancelled) within the bucket's `max_age`, paged in id
//! order, a few writes at once, each only raising an entry (a cancelled run's: created if
//! absent); then, if the bucket's creation time is still the one the refill began with, write the
//! key with it. Between that look and the write the bucket can still be replaced (or another
//! replica be refilling it too: the writes are idempotent): the key then names the bucket it was
//! meant for, proves nothing about the new one, and the next look refills the new one and
//! replaces the key. The key is rewritten daily so the bucket's `max_age` never expires it.
//!
//! A refill that stops half-way (the start's patience ran out, an error) resumes from the last
//! page it finished, as long as the bucket is the same one ([`Refill`] keeps that cursor).
//!
//! A fresh deployment (or the first start of this release) refills once: an empty or a quick
//! pass.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use sqlx::PgPool;
use taskfactory_model::complete::{complete_value, proves_complete};
use taskfactory_model::subjects::{
    CANCELLED_RUNS_BUCKET, CANCELLED_RUNS_COMPLETE_KEY, FINISHED_TASKS_BUCKET,
    FINISHED_TASKS_COMPLETE_KEY, finished_task_key,
};
use taskfactory_runtime::complete::bucket_created;
use taskfactory_runtime::finished_tasks;
use taskfactory_runtime::nats;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Rows read from Postgres at a time.
const PAGE: i64 = 1000;
/// Entries written at once.
const WRITES_AT_ONCE: usize = 64;
/// How old the complete key may get before it is written again (the bucket expires entries
/// after its `max_age`, days).
const REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Rows finished this much before the bucket's `max_age` are refilled too (an executor's clock
/// stamps `finished_at`).
const CLOCK_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Which bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refilled {
    /// Key: task id; value: the highest attempt with a final result.
    FinishedTasks,
    /// Key: run id; value: why it was cancelled.
    CancelledRuns,
}

impl Refilled {
    pub fn bucket(self) -> &'static str {
        match self {
            Refilled::FinishedTasks => FINISHED_TASKS_BUCKET,
            Refilled::CancelledRuns => CANCELLED_RUNS_BUCKET,
        }
    }

    fn complete_key(self) -> &'static str {
        match self {
            Refilled::FinishedTasks => FINISHED_TASKS_COMPLETE_KEY,
            Refilled::CancelledRuns => CANCELLED_RUNS_COMPLETE_KEY,
        }
    }

    /// How long the bucket keeps an entry, as the services declare it.
    fn max_age(self) -> Duration {
        match self {
            Refilled::FinishedTasks => nats::finished_tasks_config(1).max_age,
            Refilled::CancelledRuns => nats::cancelled_runs_config(1).max_age,
        }
    }

    /// A page of what the bucket must hold, in id order after `after`: each entry's id (the
    /// page's cursor), key and value.
    async fn page(
        self,
        pool: &PgPool,
        after: Option<Uuid>,
        since: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<(Uuid, String, String)>, sqlx::Error> {
        match self {
            Refilled::FinishedTasks => {
                let page = crate::store::final_tasks_page(pool, after, since, limit).await?;
                Ok(page
                    .into_iter()
                    .map(|(task, task_type, attempts)| {
                        let key = finished_task_key(&task.to_string(), &task_type);
                        (task, key, attempts.max(0).to_string())
                    })
                    .collect())
            }
            Refilled::CancelledRuns => {
                let page = crate::store::cancelled_runs_page(pool, after, since, limit).await?;
                Ok(page
                    .into_iter()
                    .map(|(run, reason)| (run, run.to_string(), reason))
                    .collect())
            }
        }
    }

    /// Writes one entry: a finished task's only raised, a cancelled run's only created.
    async fn write(self, kv: &kv::Store, key: String, value: String) -> Result<(), String> {
        match self {
            Refilled::FinishedTasks => {
                let attempt = value.parse().unwrap_or(0);
                finished_tasks::raise(kv, &key, attempt, true).await
            }
            Refilled::CancelledRuns => match kv.create(key, value.into()).await {
                Ok(_) => Ok(()),
                // Cancelled meanwhile: the cancel wrote it.
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                Err(error) => Err(format!("cannot write {CANCELLED_RUNS_BUCKET}: {error}")),
            },
        }
    }
}

/// The refill of one bucket, and where an unfinished one got.
pub struct Refill {
    pub which: Refilled,
    kv: kv::Store,
    /// Rows read from Postgres at a time.
    page: i64,
    cursor: Mutex<Option<Cursor>>,
}

/// An unfinished refill: of the bucket created at `bucket`, every row up to `after` written.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    bucket: DateTime<Utc>,
    after: Uuid,
    written: usize,
}

/// What one look did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looked {
    /// The bucket was complete.
    Complete,
    /// Refilled: `resumed` entries written by an earlier pass that stopped, `written` by this one.
    Refilled { resumed: usize, written: usize },
}

impl Refill {
    pub fn new(which: Refilled, kv: kv::Store) -> Self {
        Self::with_page(which, kv, PAGE)
    }

    /// With `page` rows read at a time.
    pub fn with_page(which: Refilled, kv: kv::Store, page: i64) -> Self {
        Self {
            which,
            kv,
            page: page.max(1),
            cursor: Mutex::new(None),
        }
    }

    /// Entries written by a refill that has not finished (it resumes after them).
    pub fn unfinished(&self) -> usize {
        self.cursor
            .lock()
            .expect("refill cursor")
            .map_or(0, |cursor| cursor.written)
    }

    /// Keeps the bucket complete until shutdown.
    pub async fn keep_complete(
        self: Arc<Self>,
        pool: PgPool,
        js: jetstream::Context,
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
            let looked = tokio::select! {
                _ = shutdown.cancelled() => return,
                looked = self.check(&pool, &js) => looked,
            };
            if let Err(error) = looked {
                tracing::warn!(bucket = self.which.bucket(), %error, "cannot make the bucket complete yet; executors take no tasks until it is");
            }
        }
    }

    /// One look: refills the bucket if it is not complete.
    pub async fn check(&self, pool: &PgPool, js: &jetstream::Context) -> Result<Looked, String> {
        let (bucket, key) = (self.which.bucket(), self.which.complete_key());
        let created = bucket_created(js, bucket).await?;
        match self.kv.entry(key).await {
            Ok(Some(entry))
                if entry.operation == kv::Operation::Put
                    && proves_complete(&entry.value, created) =>
            {
                let age = Utc::now().timestamp() - entry.created.unix_timestamp();
                if u64::try_from(age).unwrap_or(0) > REFRESH_AFTER.as_secs() {
                    // Whoever refreshed it meanwhile wins: a conflict is fine.
                    let _ = self.kv.update(key, entry.value, entry.revision).await;
                }
                return Ok(Looked::Complete);
            }
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                tracing::warn!(bucket, %created, key = %String::from_utf8_lossy(&entry.value), "the bucket's complete key names another bucket (it was replaced as it was refilled); refilling it from Postgres");
            }
            Ok(_) => {
                tracing::warn!(bucket, %created, "the bucket is not complete (recreated); refilling it from Postgres");
            }
            Err(error) => return Err(format!("cannot read the complete key of {bucket}: {error}")),
        }
        let since = (!self.which.max_age().is_zero())
            .then(|| Utc::now() - (self.which.max_age() + CLOCK_MARGIN))
            .filter(|since| *since > DateTime::<Utc>::MIN_UTC);
        // Resumed where an earlier pass over this same bucket stopped.
        let resume =
            (*self.cursor.lock().expect("refill cursor")).filter(|cursor| cursor.bucket == created);
        let resumed = resume.map_or(0, |cursor| cursor.written);
        let mut after = resume.map(|cursor| cursor.after);
        let mut written = 0usize;
        loop {
            let page = self
                .which
                .page(pool, after, since, self.page)
                .await
                .map_err(|error| {
                    format!("cannot read what {bucket} holds: {}", error_chain(&error))
                })?;
            let Some((last, _, _)) = page.last() else {
                break;
            };
            let last = *last;
            let full = page.len() as i64 == self.page;
            let which = self.which;
            let mut writes = futures::stream::iter(page)
                .map(|(_, key, value)| which.write(&self.kv, key, value))
                .buffer_unordered(WRITES_AT_ONCE);
            while let Some(outcome) = writes.next().await {
                outcome?;
                written += 1;
            }
            after = Some(last);
            *self.cursor.lock().expect("refill cursor") = Some(Cursor {
                bucket: created,
                after: last,
                written: resumed + written,
            });
            if !full {
                break;
            }
        }
        if bucket_created(js, bucket).await? != created {
            return Err(format!(
                "{bucket} was recreated again while it was refilled; refilling anew"
            ));
        }
        self.write_complete(created).await?;
        *self.cursor.lock().expect("refill cursor") = None;
        tracing::info!(
            bucket,
            entries = resumed + written,
            resumed,
            "bucket refilled"
        );
        Ok(Looked::Refilled { resumed, written })
    }

    /// Writes the complete key naming the bucket created at `created`, over a key naming another
    /// (by compare-and-set: a replica that wrote meanwhile wins, and the next look judges it).
    async fn write_complete(&self, created: DateTime<Utc>) -> Result<(), String> {
        let key = self.which.complete_key();
        let value = || bytes::Bytes::from(complete_value(created));
        let written = match self.kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                if proves_complete(&entry.value, created) {
                    return Ok(());
                }
                self.kv
                    .update(key, value(), entry.revision)
                    .await
                    .map(drop)
                    .map_err(|error| error.to_string())
            }
            // Absent, or deleted (`create` writes over a delete marker).
            Ok(_) => self
                .kv
                .create(key, value())
                .await
                .map(drop)
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        written.map_err(|error| {
            format!(
                "cannot write the complete key of {}: {error}",
                self.which.bucket()
            )
        })
    }
}

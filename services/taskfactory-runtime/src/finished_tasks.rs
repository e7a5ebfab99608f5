//! The finished-tasks bucket ([`FINISHED_TASKS_BUCKET`]), as executors and the orchestrator use
//! it: raising a task's entry, and reading what an executor checks before each attempt.
//!
//! Who writes an entry, and when:
//! - an executor, once the results stream acked a final result of its own (`SUCCEEDED`, `DEAD`,
//!   `CANCELLED`) and before it settles the task message: the task's message, should it come
//!   back, is then never run again, even while the orchestrator is down or behind;
//! - the orchestrator, before it acks a final result it recorded (also one recorded before: a
//!   redelivery), as the repair of an executor that crashed in between or does not write it
//!   (an external one); usually the entry is there and this costs one read;
//! - the orchestrator, refilling a recreated bucket from Postgres, after which it writes
//!   [`FINISHED_TASKS_COMPLETE_KEY`].
//!
//! The value is the attempt number as decimal text and only ever grows
//! ([`taskfactory_model::results::raises_marker`]), by compare-and-set on the entry's revision.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use taskfactory_model::results::{FinishedCheck, check_finished, finished_marker, raises_marker};
use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};
use tokio_util::sync::CancellationToken;

/// Compare-and-set conflicts (another writer in between) tried again, at most.
const CONFLICTS: usize = 5;

/// Raises the entry `key` (a task's [`finished_task_key`](taskfactory_model::subjects::finished_task_key))
/// to `attempt` (creates it if absent; never lowers it). `likely_new`
/// tries the create first (an executor: most tasks finish once), else reads first (the
/// orchestrator: an executor usually wrote it already, and then nothing is written).
pub async fn raise(
    kv: &kv::Store,
    key: &str,
    attempt: u32,
    likely_new: bool,
) -> Result<(), String> {
    let value = || bytes::Bytes::from(attempt.to_string());
    if likely_new {
        match kv.create(key, value()).await {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => return Err(format!("cannot write {FINISHED_TASKS_BUCKET}: {error}")),
        }
    }
    let mut last = String::new();
    for _ in 0..CONFLICTS {
        let written = match kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                if !raises_marker(finished_marker(&entry.value), attempt) {
                    return Ok(());
                }
                kv.update(key, value(), entry.revision)
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            }
            // Absent, or deleted (`create` writes over a delete marker).
            Ok(_) => kv.create(key, value()).await.map(drop).map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
            Err(error) => return Err(format!("cannot read {FINISHED_TASKS_BUCKET}: {error}")),
        };
        match written {
            Ok(()) => return Ok(()),
            Err((true, conflict)) => last = conflict,
            Err((false, error)) => {
                return Err(format!("cannot write {FINISHED_TASKS_BUCKET}: {error}"));
            }
        }
    }
    Err(format!(
        "cannot write {FINISHED_TASKS_BUCKET}: {CONFLICTS} conflicting writes in a row: {last}"
    ))
}

/// Lowers the entry `key` to `attempt` when it is above it, for a task redriven (`RetryTask`)
/// into a new attempt series after `attempt`: an entry above the attempts ever handed out was not
/// written by a final result of this system (a forged one, by credentials that may write the
/// entries of the task's type) and would otherwise keep the new series from ever running.
pub async fn lower_to(kv: &kv::Store, key: &str, attempt: u32) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..CONFLICTS {
        let entry = match kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return Ok(()),
            Err(error) => return Err(format!("cannot read {FINISHED_TASKS_BUCKET}: {error}")),
        };
        if finished_marker(&entry.value).is_some_and(|held| held <= attempt) {
            return Ok(());
        }
        match kv
            .update(key, bytes::Bytes::from(attempt.to_string()), entry.revision)
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                last = error.to_string();
            }
            Err(error) => return Err(format!("cannot write {FINISHED_TASKS_BUCKET}: {error}")),
        }
    }
    Err(format!(
        "cannot write {FINISHED_TASKS_BUCKET}: {CONFLICTS} conflicting writes in a row: {last}"
    ))
}

/// What an executor checks before an attempt: whether the task is finished, and, when its entry
/// is missing, whether the bucket is complete enough to trust that. With `complete` known from a
/// [`CompleteWatch`], one read; otherwise the complete key is read beside the entry.
pub async fn check(
    kv: &kv::Store,
    complete: &CompleteWatch,
    key: &str,
    attempt_base: u32,
) -> Result<FinishedCheck, String> {
    if complete.is_complete() {
        let held = kv.get(key).await.map_err(|e| e.to_string())?;
        return Ok(check_finished(
            held.as_deref().and_then(finished_marker),
            true,
            attempt_base,
        ));
    }
    let (held, complete) = tokio::join!(kv.get(key), kv.get(FINISHED_TASKS_COMPLETE_KEY));
    let held = held.map_err(|e| e.to_string())?;
    let complete = complete.map_err(|e| e.to_string())?.is_some();
    Ok(check_finished(
        held.as_deref().and_then(finished_marker),
        complete,
        attempt_base,
    ))
}

/// Whether the bucket is known to be complete, kept by watching its complete key, so that an
/// executor does not read that key before every attempt. Known only while the watch is healthy,
/// the key's last entry is a put, and the bucket is still the one the watch began on (its
/// stream's creation time, looked at every `every`): a bucket deleted and declared again is not
/// complete until the orchestrator has refilled it, whatever a watch of the old one saw. When not
/// known, [`check`] reads the key itself.
#[derive(Clone, Default)]
pub struct CompleteWatch(Arc<AtomicBool>);

impl CompleteWatch {
    pub fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Watches until shutdown.
    pub async fn run(
        self,
        js: jetstream::Context,
        kv: kv::Store,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let every = every.max(Duration::from_millis(100));
        let bucket_created = || async {
            js.get_stream(format!("KV_{FINISHED_TASKS_BUCKET}"))
                .await
                .ok()
                .map(|stream| stream.cached_info().created)
        };
        loop {
            self.0.store(false, Ordering::Release);
            let began = bucket_created().await;
            let watched = match began {
                Some(_) => kv
                    .watch_with_history(FINISHED_TASKS_COMPLETE_KEY)
                    .await
                    .ok(),
                None => None,
            };
            let Some(mut entries) = watched else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => continue,
                }
            };
            let mut look = tokio::time::interval(every);
            look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => match entry {
                        Some(Ok(entry)) => self
                            .0
                            .store(entry.operation == kv::Operation::Put, Ordering::Release),
                        _ => break,
                    },
                    _ = look.tick() => {
                        if bucket_created().await != began {
                            break;
                        }
                    }
                }
            }
        }
    }
}

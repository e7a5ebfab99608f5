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
//!   [`FINISHED_TASKS_COMPLETE_KEY`], whose value is the creation time of the bucket it refilled
//!   ([`crate::complete`]): until then, and whenever the key names another bucket, a missing
//!   entry proves nothing and executors take no task message.
//!
//! The value is the attempt number as decimal text and only ever grows
//! ([`taskfactory_model::results::raises_marker`]), by compare-and-set on the entry's revision.

use async_nats::jetstream::kv;
use taskfactory_model::results::{FinishedCheck, check_finished, finished_marker, raises_marker};
use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};

pub use crate::complete::CompleteWatch;

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
/// is missing, whether the bucket is complete enough to trust that ([`CompleteWatch`], looked at
/// after the read). One read.
pub async fn check(
    kv: &kv::Store,
    complete: &CompleteWatch,
    key: &str,
    attempt_base: u32,
) -> Result<FinishedCheck, String> {
    let held = kv.get(key).await.map_err(|e| e.to_string())?;
    Ok(check_finished(
        held.as_deref().and_then(finished_marker),
        complete.is_complete(),
        attempt_base,
    ))
}

/// The watch of this bucket's complete key.
pub fn complete_watch() -> CompleteWatch {
    CompleteWatch::new(FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY)
}

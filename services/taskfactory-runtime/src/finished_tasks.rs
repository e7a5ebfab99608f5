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
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use taskfactory_model::results::{FinishedCheck, check_finished, finished_marker, raises_marker};
use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Compare-and-set conflicts (another writer in between) tried again, at most.
const CONFLICTS: usize = 5;

/// Raises the entry of `task_id` to `attempt` (creates it if absent; never lowers it). `likely_new`
/// tries the create first (an executor: most tasks finish once), else reads first (the
/// orchestrator: an executor usually wrote it already, and then nothing is written).
pub async fn raise(
    kv: &kv::Store,
    task_id: &str,
    attempt: u32,
    likely_new: bool,
) -> Result<(), String> {
    let value = || bytes::Bytes::from(attempt.to_string());
    if likely_new {
        match kv.create(task_id, value()).await {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => return Err(format!("cannot write {FINISHED_TASKS_BUCKET}: {error}")),
        }
    }
    let mut last = String::new();
    for _ in 0..CONFLICTS {
        let written = match kv.entry(task_id).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                if !raises_marker(finished_marker(&entry.value), attempt) {
                    return Ok(());
                }
                kv.update(task_id, value(), entry.revision)
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
            Ok(_) => kv.create(task_id, value()).await.map(drop).map_err(|e| {
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

/// What an executor checks before an attempt: whether the task is finished, and, when its entry
/// is missing, whether the bucket is complete enough to trust that ([`CompleteWatch`], looked at
/// after the read). One read.
pub async fn check(
    kv: &kv::Store,
    complete: &CompleteWatch,
    task_id: &str,
    attempt_base: u32,
) -> Result<FinishedCheck, String> {
    let held = kv.get(task_id).await.map_err(|e| e.to_string())?;
    Ok(check_finished(
        held.as_deref().and_then(finished_marker),
        complete.is_complete(),
        attempt_base,
    ))
}

/// Whether the bucket is known to be complete, kept by watching its complete key, so that an
/// executor does not read that key before every attempt, and can wait for it
/// ([`CompleteWatch::wait_complete`]) rather than take tasks it could only hand back. Known only
/// while the watch is healthy, the key's last entry is a put, and the bucket is still the one the
/// watch began on (its stream's creation time, looked at every `every`): a bucket deleted and
/// declared again is not complete until the orchestrator has refilled it, whatever a watch of the
/// old one saw. When the key cannot be watched (a NATS user without the permission), it is read
/// every [`POLL_EVERY`] instead.
#[derive(Clone)]
pub struct CompleteWatch(Arc<watch::Sender<bool>>);

/// How often the complete key is read when it cannot be watched.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

impl Default for CompleteWatch {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl CompleteWatch {
    pub fn is_complete(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the bucket is known to be complete.
    pub async fn wait_complete(&self) {
        let mut known = self.0.subscribe();
        // The sender lives as long as `self`.
        let _ = known.wait_for(|complete| *complete).await;
    }

    fn set(&self, complete: bool) {
        self.0
            .send_if_modified(|held| std::mem::replace(held, complete) != complete);
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
            self.set(false);
            let began = bucket_created().await;
            let watched = match began {
                Some(_) => kv
                    .watch_with_history(FINISHED_TASKS_COMPLETE_KEY)
                    .await
                    .map_err(|error| error.to_string()),
                None => Err("the bucket is missing".to_owned()),
            };
            let mut entries = match watched {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(bucket = FINISHED_TASKS_BUCKET, %error, "cannot watch the complete key; reading it every second instead");
                    self.poll(&kv, every, &shutdown).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    continue;
                }
            };
            let mut look = tokio::time::interval(every);
            look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => match entry {
                        Some(Ok(entry)) => self.set(entry.operation == kv::Operation::Put),
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

    /// Reads the key every [`POLL_EVERY`] for `every` (or until shutdown).
    async fn poll(&self, kv: &kv::Store, every: Duration, shutdown: &CancellationToken) {
        let until = tokio::time::Instant::now() + every.max(POLL_EVERY);
        while tokio::time::Instant::now() < until {
            let complete = matches!(
                kv.entry(FINISHED_TASKS_COMPLETE_KEY).await,
                Ok(Some(entry)) if entry.operation == kv::Operation::Put
            );
            self.set(complete);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    }
}

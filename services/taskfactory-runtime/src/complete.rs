//! Buckets refilled from Postgres when they are recreated (the finished-tasks and the
//! cancelled-runs buckets): a missing entry proves something only while the bucket is
//! *complete*, that is, while it holds its complete key and the key names the bucket itself (its
//! value is the creation time of the bucket's stream: [`taskfactory_model::complete`]). The
//! orchestrator's refill writes it; executors watch it ([`CompleteWatch`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use taskfactory_model::complete::proves_complete;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a complete key is read when it cannot be watched, and a missing bucket looked for.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// The creation time of `bucket`'s stream, which identifies it: a bucket deleted and declared
/// again has another.
pub async fn bucket_created(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<DateTime<Utc>, String> {
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|error| format!("cannot read the stream of the bucket {bucket}: {error}"))?;
    let created = stream.cached_info().created;
    let nanos = i64::try_from(created.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    Ok(DateTime::from_timestamp_nanos(nanos))
}

/// Whether a bucket is known to be complete, kept by watching its complete key, so that an
/// executor does not read that key before every attempt, and can wait for it
/// ([`CompleteWatch::wait_complete`]) rather than take tasks it could only hand back.
///
/// Known only while the watch is healthy, the key's last entry is a put, and its value names the
/// bucket the watch began on. A bucket deleted and declared again is not complete until the
/// orchestrator has refilled it, whatever a watch of the old one saw: the server's advisory of a
/// deleted or created bucket stream ends the watch at once (a watch resumes on a recreated stream
/// without a word), and the bucket's creation time is looked at every `every` besides (an
/// advisory missed while disconnected). When the key cannot be watched (a NATS user without the
/// permission), it is read every [`POLL_EVERY`] instead, with the bucket's creation time.
#[derive(Clone)]
pub struct CompleteWatch {
    bucket: &'static str,
    key: &'static str,
    known: Arc<watch::Sender<bool>>,
}

impl CompleteWatch {
    /// Not known complete until [`CompleteWatch::run`] sees it.
    pub fn new(bucket: &'static str, key: &'static str) -> Self {
        Self {
            bucket,
            key,
            known: Arc::new(watch::channel(false).0),
        }
    }

    pub fn is_complete(&self) -> bool {
        *self.known.borrow()
    }

    /// What is known, as it changes.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.known.subscribe()
    }

    /// Waits until the bucket is known to be complete.
    pub async fn wait_complete(&self) {
        let mut known = self.known.subscribe();
        // The sender lives as long as `self`.
        let _ = known.wait_for(|complete| *complete).await;
    }

    fn set(&self, complete: bool, watched: bool) {
        self.known
            .send_if_modified(|held| std::mem::replace(held, complete) != complete);
        crate::metrics::set_bucket_state(self.bucket, complete, watched);
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
        let advisories = format!("$JS.EVENT.ADVISORY.STREAM.*.KV_{}", self.bucket);
        loop {
            self.set(false, true);
            let began = match bucket_created(&js, self.bucket).await {
                Ok(began) => began,
                Err(_) => {
                    // Missing (the keeper declares it again) or unreachable.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(POLL_EVERY) => continue,
                    }
                }
            };
            // Before the watch: a bucket replaced from here on is heard of.
            let mut replaced = match js.client().subscribe(advisories.clone()).await {
                Ok(subscription) => Some(subscription),
                Err(error) => {
                    tracing::warn!(bucket = self.bucket, %error, "cannot hear of the bucket's replacement; looking at it every TASKFACTORY_DECLARE_EVERY only");
                    None
                }
            };
            let mut entries = match kv.watch_with_history(self.key).await {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(bucket = self.bucket, %error, "cannot watch the complete key; reading it every second instead");
                    self.poll(&js, &kv, every, &shutdown).await;
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
                        Some(Ok(entry)) => self.set(
                            entry.operation == kv::Operation::Put
                                && proves_complete(&entry.value, began),
                            true,
                        ),
                        _ => break,
                    },
                    advisory = next_advisory(&mut replaced) => {
                        let subject = advisory.map(|a| a.subject.to_string()).unwrap_or_default();
                        if subject.contains(".DELETED.") || subject.contains(".CREATED.") || subject.is_empty() {
                            break;
                        }
                    }
                    _ = look.tick() => {
                        if bucket_created(&js, self.bucket).await != Ok(began) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Reads the key (and the bucket's creation time) every [`POLL_EVERY`] for `every`, or until
    /// shutdown.
    async fn poll(
        &self,
        js: &jetstream::Context,
        kv: &kv::Store,
        every: Duration,
        shutdown: &CancellationToken,
    ) {
        let until = tokio::time::Instant::now() + every.max(POLL_EVERY);
        while tokio::time::Instant::now() < until {
            let (created, entry) =
                tokio::join!(bucket_created(js, self.bucket), kv.entry(self.key));
            let complete = match (created, entry) {
                (Ok(created), Ok(Some(entry))) => {
                    entry.operation == kv::Operation::Put && proves_complete(&entry.value, created)
                }
                _ => false,
            };
            self.set(complete, false);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    }
}

/// The next advisory, if advisories are heard at all (never otherwise); `None` when the
/// subscription ended.
async fn next_advisory(
    subscription: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match subscription {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

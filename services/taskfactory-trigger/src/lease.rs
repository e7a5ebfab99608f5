//! Scheduling leadership: of all trigger replicas, one fires schedules.
//!
//! The lease is one key in a NATS KV bucket whose entries expire after the lease TTL (the
//! bucket's `max_age`, enforced by the server, so no replica's clock is trusted):
//!
//! - A standby tries to `create` the key every renewal interval; that succeeds only when the key
//!   is absent — never taken, expired because its holder stopped renewing, or deleted by a holder
//!   that shut down cleanly (then hand-over is immediate).
//! - The leader renews with `update(key, revision)`, a compare-and-set on the revision it holds; a
//!   failed compare means someone else holds the lease now, and it stops at once. It also stops
//!   when it could not renew for a whole TTL (minus a margin), before anyone else can take over.
//! - The revision at which the lease was taken, with the bucket's creation time, is the *term*:
//!   the fencing token. The new leader writes it to Postgres first, and every scheduled fire
//!   checks it in its own transaction ([`crate::store::ScheduleWrite`]), so a deposed leader that
//!   has not noticed yet cannot record a fire. What remains (a fire published twice around a
//!   hand-over) is absorbed by the fire ledger's unique key and `Nats-Msg-Id`.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_runtime::telemetry::error_chain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Term};

/// The key holding the scheduling lease.
pub const LEASE_KEY: &str = "scheduler";
/// The shortest lease lifetime that leaves room for renewals.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// How leadership is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The KV bucket (created if absent).
    pub bucket: String,
    /// How long a lease lives without renewal: the longest a crashed leader leaves schedules
    /// unattended.
    pub ttl: Duration,
    /// This replica's name in the lease (logs, `scheduler_fence.holder`).
    pub holder: String,
    /// Replicas of the bucket's stream (3 on a production cluster).
    pub replicas: usize,
}

/// This replica's part in scheduling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not yet connected to the lease.
    Starting,
    /// Another replica leads; this one takes over if it goes.
    Standby,
    Leader(Term),
}

struct Lease {
    kv: kv::Store,
    config: LeaseConfig,
    epoch: DateTime<Utc>,
    /// The bucket's entry lifetime: the lease's real TTL.
    ttl: Duration,
}

impl Lease {
    async fn open(
        js: &async_nats::jetstream::Context,
        config: LeaseConfig,
    ) -> anyhow::Result<Self> {
        let kv = match js.get_key_value(&config.bucket).await {
            Ok(kv) => {
                taskfactory_runtime::nats::ensure_bucket_replicas(
                    js,
                    &config.bucket,
                    config.replicas,
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                kv
            }
            Err(_) => {
                js.create_key_value(kv::Config {
                    bucket: config.bucket.clone(),
                    description: "taskfactory: the trigger service's scheduling lease".to_owned(),
                    history: 1,
                    max_age: config.ttl,
                    num_replicas: config.replicas.max(1),
                    ..Default::default()
                })
                .await?
            }
        };
        let status = kv.status().await?;
        let ttl = status.info.config.max_age;
        anyhow::ensure!(
            ttl >= MIN_TTL,
            "the lease bucket {:?} keeps entries for {ttl:?}; a lease needs them to expire (at least {MIN_TTL:?}): delete the bucket, taskfactory recreates it",
            config.bucket
        );
        if ttl != config.ttl {
            tracing::warn!(bucket = %config.bucket, bucket_ttl = ?ttl, configured_ttl = ?config.ttl, "the lease bucket's entry lifetime differs from the configured lease TTL; the bucket's is used");
        }
        // Microseconds: what Postgres keeps of a timestamp, so the fence compares equal.
        let created_us = status.info.created.unix_timestamp_nanos() / 1000;
        let epoch = DateTime::from_timestamp_micros(i64::try_from(created_us).unwrap_or(0))
            .unwrap_or_default();
        Ok(Self {
            kv,
            config,
            epoch,
            ttl,
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn value(&self) -> bytes::Bytes {
        serde_json::json!({ "holder": self.config.holder, "renewedAt": Utc::now() })
            .to_string()
            .into()
    }

    /// Takes the lease if nobody holds it: the new revision.
    async fn try_take(&self) -> anyhow::Result<Option<u64>> {
        match self.kv.create(LEASE_KEY, self.value()).await {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Renews the lease held at `revision`: the new revision, or `None` if it was lost.
    async fn renew(&self, revision: u64) -> anyhow::Result<Option<u64>> {
        match self.kv.update(LEASE_KEY, self.value(), revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Gives the lease up (after scheduling stopped), so a standby takes over at once.
    async fn release(&self, revision: u64) {
        if let Err(error) = self
            .kv
            .delete_expect_revision(LEASE_KEY, Some(revision))
            .await
        {
            tracing::debug!(error = %error_chain(&error), "could not release the scheduling lease; it expires on its own");
        }
    }
}

/// Holds or waits for the lease until `shutdown`; while this replica leads, `lead(term, stop)`
/// runs, and it is stopped (and awaited) before the lease is given up or lost. `roles` reports
/// this replica's role.
pub async fn run<F, Fut>(
    js: async_nats::jetstream::Context,
    pool: PgPool,
    config: LeaseConfig,
    roles: watch::Sender<Role>,
    shutdown: CancellationToken,
    mut lead: F,
) where
    F: FnMut(Term, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(mut lease) = open(&js, &config, &shutdown).await else {
        return;
    };
    roles.send_replace(Role::Standby);

    let mut held: Option<Held> = None;
    loop {
        let renew_every = (lease.ttl() / 5).max(Duration::from_millis(100));
        // Stop leading this long before the lease could expire on the server.
        let margin = (lease.ttl() / 5).max(Duration::from_millis(100));
        match held.as_mut() {
            None => {
                let sent = Instant::now();
                match lease.try_take().await {
                    Ok(Some(revision)) => {
                        let taken_at = sent;
                        let term = Term {
                            epoch: lease.epoch,
                            revision: i64::try_from(revision).unwrap_or(i64::MAX),
                        };
                        let left =
                            (taken_at + lease.ttl()).saturating_duration_since(Instant::now());
                        let fenced = tokio::time::timeout(
                            left.saturating_sub(margin),
                            store::take_fence(&pool, term, &config.holder, Utc::now()),
                        )
                        .await;
                        match fenced {
                            Ok(Ok(true)) => {
                                tracing::info!(holder = %config.holder, term = %term, "took the scheduling lease; this replica schedules");
                                roles.send_replace(Role::Leader(term));
                                let stop = shutdown.child_token();
                                let task = tokio::spawn(lead(term, stop.clone()));
                                held = Some(Held {
                                    revision,
                                    valid_until: taken_at + lease.ttl() - margin,
                                    stop,
                                    task,
                                });
                            }
                            Ok(Ok(false)) => {
                                tracing::error!(term = %term, "a newer scheduling term is already recorded in Postgres; giving the lease back (and rereading the bucket, in case it was recreated)");
                                lease.release(revision).await;
                                match open(&js, &config, &shutdown).await {
                                    Some(reopened) => lease = reopened,
                                    None => break,
                                }
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(error = %error_chain(&error), "took the lease but cannot record the term in Postgres; giving it back");
                                lease.release(revision).await;
                            }
                            Err(_elapsed) => {
                                tracing::warn!(
                                    "took the lease but could not record the term in Postgres in time (a deposed leader's write still holds the fence?); giving it back"
                                );
                                lease.release(revision).await;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(error = %error_chain(error.as_ref()), "cannot reach the scheduling lease");
                        if let Some(reopened) = replaced(&js, &config, &lease).await {
                            lease = reopened;
                        }
                    }
                }
            }
            Some(current) => {
                let sent = Instant::now();
                let left = current.valid_until.saturating_duration_since(sent);
                let mut reopened = None;
                let renewed = match tokio::time::timeout(left, lease.renew(current.revision)).await
                {
                    Ok(Ok(Some(revision))) => {
                        current.revision = revision;
                        current.valid_until = sent + lease.ttl() - margin;
                        true
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(holder = %config.holder, "the scheduling lease was taken over; this replica stops scheduling");
                        false
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error_chain(error.as_ref()), "cannot renew the scheduling lease");
                        // Within the lease's life: a leader never leads past it.
                        let left = current
                            .valid_until
                            .saturating_duration_since(Instant::now());
                        reopened = tokio::time::timeout(left, replaced(&js, &config, &lease))
                            .await
                            .ok()
                            .flatten();
                        // A lease in a bucket that is gone is over.
                        reopened.is_none() && Instant::now() < current.valid_until
                    }
                    Err(_elapsed) => {
                        tracing::warn!("could not renew the scheduling lease in time");
                        false
                    }
                };
                if !renewed && let Some(lost) = held.take() {
                    lost.stop().await;
                    roles.send_replace(Role::Standby);
                }
                if let Some(reopened) = reopened {
                    lease = reopened;
                }
            }
        }
        let wake = match &held {
            // Wake in time to stop before the lease could lapse, whatever renewal does.
            Some(current) => renew_every.min(
                current
                    .valid_until
                    .saturating_duration_since(Instant::now()),
            ),
            None => renew_every,
        };
        let lead_ended = async {
            match held.as_mut() {
                Some(current) => (&mut current.task).await.err(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wake) => {}
            failure = lead_ended => {
                // The task is finished (its handle must not be awaited again): give the lease up.
                let ended = held.take();
                if let Some(ended) = &ended {
                    lease.release(ended.revision).await;
                }
                if shutdown.is_cancelled() {
                    tracing::info!(holder = %config.holder, "gave up the scheduling lease");
                    break; // it stopped because we are stopping
                }
                // Scheduling must not stop silently while this replica keeps the lease.
                tracing::error!(error = ?failure, "the scheduler stopped while leading; gave the lease up so another replica schedules");
                roles.send_replace(Role::Standby);
                continue;
            }
        }
        if let Some(current) = &held
            && Instant::now() >= current.valid_until
        {
            tracing::warn!(
                "the scheduling lease could not be renewed within its lifetime; this replica stops scheduling"
            );
            if let Some(lost) = held.take() {
                lost.stop().await;
                roles.send_replace(Role::Standby);
            }
        }
    }
    if let Some(current) = held.take() {
        let revision = current.revision;
        current.stop().await;
        lease.release(revision).await;
        tracing::info!(holder = %config.holder, "gave up the scheduling lease");
    }
    roles.send_replace(Role::Starting);
}

/// After a lease call failed: the bucket opened again if it is gone (declared again, so
/// scheduling does not stop for good) or was recreated meanwhile. Either way it is a newer epoch:
/// a lease held in the old bucket is over, and terms taken in the new one fence it.
async fn replaced(
    js: &async_nats::jetstream::Context,
    config: &LeaseConfig,
    lease: &Lease,
) -> Option<Lease> {
    match Lease::open(js, config.clone()).await {
        Ok(reopened) if reopened.epoch != lease.epoch => {
            tracing::warn!(bucket = %config.bucket, "the scheduling lease bucket was deleted or recreated: declared again; leadership starts over in a new epoch");
            Some(reopened)
        }
        Ok(_) => None,
        Err(error) => {
            tracing::debug!(bucket = %config.bucket, error = %error_chain(error.as_ref()), "cannot open the scheduling lease bucket");
            None
        }
    }
}

/// Opens the lease bucket, retrying until it works or shutdown.
async fn open(
    js: &async_nats::jetstream::Context,
    config: &LeaseConfig,
    shutdown: &CancellationToken,
) -> Option<Lease> {
    loop {
        match Lease::open(js, config.clone()).await {
            Ok(lease) => return Some(lease),
            Err(error) => {
                tracing::warn!(bucket = %config.bucket, error = %error_chain(error.as_ref()), "cannot open the scheduling lease bucket; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

struct Held {
    revision: u64,
    /// Past this instant the lease may have expired on the server: stop leading.
    valid_until: Instant,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Held {
    async fn stop(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(error = %error, "the scheduler task failed");
        }
    }
}

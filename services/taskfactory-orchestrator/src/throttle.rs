//! The orchestrator's side of flow control's throttle (`flow.throttle`, state and rules in
//! [`crate::store`]'s throttle module): a throttled run is recorded held by its key's throttle
//! and let through as the key's budget comes back, by its own admission or by the throttle timer
//! ([`run_timer`]), which wakes when the next held run of any key is due.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_proto::v1::{FlowAdmission, ThrottleAdmission, TriggerEvent};
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;

use crate::spawn::{SpawnError, Spawner, run_header};
use crate::store::{self, Released};

/// The longest the timer sleeps without looking: another orchestrator's held runs (it wakes only
/// its own timer) are let through by this one within it, should that one stop.
const LONGEST_SLEEP: Duration = Duration::from_secs(1);

/// Keys let through per look, and at once.
const DUE_BATCH: i64 = 500;
const AT_ONCE: usize = 16;

/// Keys whose released runs are being started at once, at most.
const STARTING_AT_ONCE: usize = 64;

/// How often idle keys' state is deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

impl Spawner {
    /// Records a run of an activity with `flow.throttle` as held by its key's throttle, and wakes
    /// the throttle timer, which lets it through when the key's budget allows (at once, unless
    /// runs of a higher priority or an earlier event are held before it, or the budget is spent).
    pub(crate) async fn admit_throttled(
        &self,
        event: &TriggerEvent,
        (activity_id, run_id): (ActivityId, RunId),
        flow: &FlowAdmission,
        throttle: &ThrottleAdmission,
        encoded_event: &[u8],
    ) -> Result<(), SpawnError> {
        let header = run_header(event, activity_id, run_id);
        let admitted = store::admit_throttled_run(
            &self.pool,
            &header,
            (flow, throttle),
            self.throttle_window,
            encoded_event,
        )
        .await?;
        if !admitted {
            return self.admitted_before(event, activity_id, run_id).await;
        }
        tracing::Span::current().record("run.admission", "throttled");
        crate::spawn::count_queued(event);
        tracing::debug!(run.id = %run_id, activity.name = %event.activity_name, throttle.key = %throttle.key, throttle.limit = throttle.limit, priority = flow.priority, "run held by its throttle until its key's budget lets it through");
        self.throttle_due.notify_one();
        Ok(())
    }

    /// Starts the runs a throttle let through: one without a concurrency key at once, the others
    /// as far as their keys have room. One that cannot start now is left to the overlap sweeper.
    async fn start_released(&self, activity: ActivityId, released: Vec<Released>) {
        let mut keys = BTreeSet::new();
        for run in released {
            match run.concurrency {
                None => {
                    tracing::info!(run.id = %run.run, activity.id = %activity, "starting a run its throttle let through");
                    if let Err(error) = Box::pin(self.start_admitted(run.run)).await {
                        tracing::warn!(run.id = %run.run, error = %error_chain(&error), "cannot start a run its throttle let through yet; the overlap sweeper will");
                    }
                }
                Some(key) => {
                    keys.insert(key);
                }
            }
        }
        for (key, limit) in keys {
            if let Err(error) = Box::pin(self.start_next_flow(activity, &key, limit)).await {
                tracing::warn!(activity.id = %activity, concurrency.key = %key, error = %error_chain(&error), "cannot start a run its throttle let through yet; the overlap sweeper will");
            }
        }
    }
}

/// The throttle timer: lets through the held runs of every key that is due, then sleeps until the
/// next one is (by the database's clock), a run is held here, or [`LONGEST_SLEEP`] passed; and
/// deletes idle keys' state every [`PRUNE_EVERY`]. Every orchestrator runs one: a key's row lock
/// lets one of them through at a time, and a run let through is started once.
pub async fn run_timer(spawner: Arc<Spawner>, shutdown: CancellationToken) {
    let mut pruned = Instant::now();
    // Runs let through are started off the timer, a key's in the order they go, so that one
    // key's starts never hold up another key being let through.
    let starting = Arc::new(tokio::sync::Semaphore::new(STARTING_AT_ONCE));
    loop {
        let due = match store::due_throttles(&spawner.pool, DUE_BATCH).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot read the throttled keys that are due; will retry");
                Vec::new()
            }
        };
        let full = i64::try_from(due.len()).unwrap_or(i64::MAX) >= DUE_BATCH;
        futures::stream::iter(due)
            .for_each_concurrent(AT_ONCE, |(activity, key)| {
                let (spawner, starting) = (&spawner, &starting);
                async move {
                    let released = match store::release_throttled(
                        &spawner.pool,
                        activity,
                        &key,
                        spawner.throttle_window,
                    )
                    .await
                    {
                        Ok(released) => released,
                        Err(error) => {
                            tracing::warn!(activity.id = %activity, throttle.key = %key, error = %error_chain(&error), "cannot let a throttled run through yet; will retry");
                            return;
                        }
                    };
                    if released.is_empty() {
                        return;
                    }
                    let Ok(permit) = starting.clone().acquire_owned().await else {
                        return;
                    };
                    let spawner = spawner.clone();
                    tokio::spawn(async move {
                        spawner.start_released(activity, released).await;
                        drop(permit);
                    });
                }
            })
            .await;
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            match store::repair_throttles(&spawner.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    keys = n,
                    "throttled keys holding runs were not due; marked due"
                ),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot check the throttled keys")
                }
            }
            match store::prune_throttles(&spawner.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(pruned = n, "idle throttle keys pruned"),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot prune idle throttle keys")
                }
            }
        }
        if full {
            continue;
        }
        let wait = match store::next_throttle_due(&spawner.pool).await {
            Ok(Some(due)) => due.min(LONGEST_SLEEP),
            Ok(None) => LONGEST_SLEEP,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot read when the next throttled run is due; will retry");
                LONGEST_SLEEP
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = spawner.throttle_due.notified() => {}
        }
    }
}

//! The scheduler: holds every active schedule's next occurrence and fires it on time.
//!
//! - On (re)load of a schedule, the occurrences it missed since its persisted watermark (the
//!   service was down, the activity paused or disabled) go through the misfire policy
//!   ([`taskfactory_model::misfire`]); then it waits for the next occurrence after now.
//! - An occurrence fires at `scheduled_for` plus its deterministic jitter. Each fire is recorded
//!   with the watermark in one transaction (see [`crate::fire`]), in its own task, retried until it
//!   is recorded or the service stops, so a slow database delays no other schedule.
//! - Definition changes arrive as registry snapshots; a schedule whose version changed is
//!   recomputed from its last decided occurrence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use taskfactory_runtime::telemetry::error_chain;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::misfire;
use taskfactory_model::schedule::{Occurrence, jitter_delay};
use taskfactory_model::spec::std_duration;
use taskfactory_proto::v1::TriggerSource;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fire::{self, FireRequest};
use crate::registry::{LiveActivity, Registry};
use crate::store;

struct Entry {
    activity: Arc<LiveActivity>,
    /// The next occurrence and when to fire it (its instant plus jitter).
    next: Option<(Occurrence, DateTime<Utc>)>,
    /// The newest occurrence decided (fired or not).
    last_decided: Option<DateTime<Utc>>,
    fires: u64,
}

pub struct Scheduler {
    pool: PgPool,
    js: async_nats::jetstream::Context,
    registry: Registry,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    entries: HashMap<ActivityId, Entry>,
}

impl Scheduler {
    pub fn new(
        pool: PgPool,
        js: async_nats::jetstream::Context,
        registry: Registry,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pool,
            js,
            registry,
            tracker: TaskTracker::new(),
            shutdown,
            entries: HashMap::new(),
        }
    }

    /// Runs until shutdown, then waits for fires in flight.
    pub async fn run(mut self) {
        let mut snapshots = self.registry.subscribe();
        let initial = snapshots.borrow_and_update().clone();
        self.sync(&initial.activities).await;
        loop {
            let due = self
                .entries
                .values()
                .filter_map(|e| e.next.as_ref().map(|(_, due)| *due))
                .min();
            let sleep = match due {
                Some(due) => (due - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                changed = snapshots.changed() => {
                    if changed.is_err() { break; }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.sync(&snapshot.activities).await;
                    continue;
                }
                _ = tokio::time::sleep(sleep) => {}
            }
            self.fire_due(Utc::now());
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Brings the entries in line with the registry.
    async fn sync(&mut self, activities: &HashMap<ActivityId, Arc<LiveActivity>>) {
        // What this process decided may be ahead of the stored watermark (fires in flight); a
        // schedule restarted by a version change continues from the newer of the two.
        let mut decided_here: HashMap<ActivityId, (DateTime<Utc>, u64)> = HashMap::new();
        self.entries.retain(|id, entry| {
            let keep = activities.get(id).is_some_and(|a| {
                a.is_active() && a.schedule.is_some() && Arc::ptr_eq(a, &entry.activity)
            });
            if !keep && let Some(last) = entry.last_decided {
                decided_here.insert(*id, (last, entry.fires));
            }
            keep
        });
        let now = Utc::now();
        let mut loaded: Option<HashMap<ActivityId, (DateTime<Utc>, u64)>> = None;
        for activity in activities.values() {
            if !activity.is_active()
                || activity.schedule.is_none()
                || self.entries.contains_key(&activity.id)
            {
                continue;
            }
            if loaded.is_none() {
                loaded = Some(self.load_state().await);
            }
            let stored = loaded.as_ref().and_then(|l| l.get(&activity.id)).copied();
            let state = match (stored, decided_here.get(&activity.id).copied()) {
                (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
                (a, b) => a.or(b),
            };
            let entry = self.start_entry(activity.clone(), state, now).await;
            self.entries.insert(activity.id, entry);
        }
    }

    async fn load_state(&self) -> HashMap<ActivityId, (DateTime<Utc>, u64)> {
        loop {
            match store::schedule_states(&self.pool).await {
                Ok(states) => return states.into_iter().map(|(id, w, n)| (id, (w, n))).collect(),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot read schedule watermarks; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return HashMap::new(),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Applies the misfire policy to what was missed since the watermark, then schedules the next
    /// occurrence after now.
    async fn start_entry(
        &self,
        activity: Arc<LiveActivity>,
        state: Option<(DateTime<Utc>, u64)>,
        now: DateTime<Utc>,
    ) -> Entry {
        let schedule = activity
            .schedule
            .clone()
            .expect("only schedules get entries");
        let trigger = activity.schedule_trigger().cloned().unwrap_or_default();
        let mut fires = state.map_or(0, |(_, n)| n);
        let mut last_decided = state.map(|(w, _)| w);
        if let Some((watermark, _)) = state {
            let plan = misfire::plan(&schedule, &trigger, watermark, now);
            if plan.missed > 0 || !plan.fire.is_empty() {
                tracing::info!(activity.name = %activity.name, missed = plan.missed, catching_up = plan.fire.len(), policy = ?trigger.misfire(), "schedule missed occurrences");
            }
            for occurrence in plan.fire {
                if self.max_runs_reached(&trigger, fires) {
                    break;
                }
                fires += 1;
                self.spawn_fire(&activity, occurrence.at, TriggerSource::Catchup);
            }
            if let Some(watermark) = plan.watermark {
                last_decided = Some(watermark);
                let pool = self.pool.clone();
                let id = activity.id;
                self.tracker.spawn(async move {
                    if let Err(error) = store::set_watermark(&pool, id, watermark).await {
                        tracing::warn!(activity.id = %id, error = %error_chain(&error), "cannot advance watermark");
                    }
                });
            }
        }
        let after = last_decided.map_or(now, |w| w.max(now));
        let mut entry = Entry {
            activity,
            next: None,
            last_decided,
            fires,
        };
        self.schedule_next(&mut entry, after);
        entry
    }

    fn max_runs_reached(
        &self,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
        fires: u64,
    ) -> bool {
        trigger.max_runs > 0 && fires >= trigger.max_runs
    }

    fn schedule_next(&self, entry: &mut Entry, after: DateTime<Utc>) {
        let trigger = entry
            .activity
            .schedule_trigger()
            .cloned()
            .unwrap_or_default();
        if self.max_runs_reached(&trigger, entry.fires) {
            entry.next = None;
            return;
        }
        let schedule = entry
            .activity
            .schedule
            .as_ref()
            .expect("only schedules get entries");
        let mut upcoming = schedule.occurrences_after(after);
        entry.next = upcoming.next().map(|occurrence| {
            let jitter = trigger
                .jitter
                .as_ref()
                .and_then(std_duration)
                .unwrap_or_default();
            let delay = if jitter.is_zero() {
                Duration::ZERO
            } else {
                let following = upcoming.next().map(|o| o.at);
                jitter_delay(
                    &entry.activity.id.to_string(),
                    occurrence.at,
                    jitter,
                    following,
                )
            };
            let due = occurrence.at + chrono::Duration::from_std(delay).unwrap_or_default();
            (occurrence, due)
        });
    }

    fn fire_due(&mut self, now: DateTime<Utc>) {
        let due: Vec<ActivityId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.next.as_ref().is_some_and(|(_, due)| *due <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut entry) = self.entries.remove(&id) else {
                continue;
            };
            if let Some((occurrence, _)) = entry.next.take() {
                if let Some(note) = &occurrence.dst_note {
                    tracing::info!(activity.name = %entry.activity.name, scheduled_for = %occurrence.at, note = %note, "dst adjusted occurrence");
                }
                self.spawn_fire(&entry.activity, occurrence.at, TriggerSource::Schedule);
                entry.fires += 1;
                entry.last_decided = Some(occurrence.at);
                self.schedule_next(&mut entry, occurrence.at);
            }
            self.entries.insert(id, entry);
        }
    }

    /// Records and publishes one scheduled fire in its own task, retrying until it is recorded or
    /// the service stops (then the watermark has not moved, and the next start catches it up).
    fn spawn_fire(&self, activity: &LiveActivity, at: DateTime<Utc>, source: TriggerSource) {
        let request = FireRequest {
            activity_id: activity.id,
            activity_name: activity.name.clone(),
            activity_version: activity.version,
            source,
            dedupe_key: schedule_dedupe_key(at),
            scheduled_for: Some(at),
            payload: None,
            subject: String::new(),
            watermark: Some(at),
        };
        let pool = self.pool.clone();
        let js = self.js.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match fire::fire(&pool, &js, request.clone()).await {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::warn!(activity.name = %request.activity_name, scheduled_for = %at, error = %error_chain(&error), "cannot record fire; retrying");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }
}

/// The dedupe key of a scheduled occurrence: its instant in RFC 3339 UTC.
pub fn schedule_dedupe_key(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

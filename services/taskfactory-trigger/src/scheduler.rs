//! The scheduler: fires every active schedule on time, and decides what was missed.
//!
//! Two parts:
//!
//! - **The timer** (one loop for all schedules) knows each schedule's next occurrence. When an
//!   occurrence's time plus its deterministic jitter comes, it tells that schedule's writer
//!   "everything through this occurrence is due".
//! - **The writer** (one task per schedule) is the only one that records the schedule's fires,
//!   strictly in order, starting from the watermark persisted in Postgres. For each signal it
//!   decides every occurrence between the watermark and the signalled one: an occurrence less than
//!   [`MISFIRE_THRESHOLD`] late fires; a later one goes through the misfire policy
//!   ([`taskfactory_model::misfire`]). A fire that cannot be recorded (database down) is retried;
//!   as time passes its occurrence becomes late and falls under the misfire policy, so an outage
//!   never releases a flood, and a restart, a pause or a disabled spell is handled the same way.
//!
//! The watermark moves only with a recorded fire (same transaction) or after a recorded decision,
//! in order, so whenever the service stops the next start resumes exactly where it left off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::misfire;
use taskfactory_model::schedule::jitter_delay;
use taskfactory_model::spec::std_duration;
use taskfactory_proto::v1::TriggerSource;
use taskfactory_runtime::telemetry::error_chain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fire::{self, FireRequest};
use crate::registry::{LiveActivity, Registry};
use crate::store;

/// An occurrence fired later than this after its time counts as missed: the misfire policy
/// decides about it.
pub const MISFIRE_THRESHOLD: Duration = Duration::from_secs(10);

struct Entry {
    activity: Arc<LiveActivity>,
    /// The next occurrence and when it is due (its instant plus jitter).
    next: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Tells the writer: every occurrence up to and including this instant is due.
    due: watch::Sender<Option<DateTime<Utc>>>,
    /// Stops the writer (even mid-retry) when the entry goes: the schedule changed or ended.
    _retire: tokio_util::sync::DropGuard,
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

    /// Runs until shutdown, then waits for the writers to finish the fire in hand.
    pub async fn run(mut self) {
        let mut snapshots = self.registry.subscribe();
        let initial = snapshots.borrow_and_update().clone();
        self.sync(&initial.activities).await;
        loop {
            let due = self
                .entries
                .values()
                .filter_map(|e| e.next.map(|(_, due)| due))
                .min();
            let sleep = match due {
                Some(due) => (due - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.sync(&snapshot.activities).await;
                    continue;
                }
                _ = tokio::time::sleep(sleep) => {}
            }
            self.signal_due(Utc::now());
        }
        // Each writer finishes the fire in hand, then stops.
        self.entries.clear();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Brings the entries in line with the registry: new or changed schedules get a writer.
    async fn sync(&mut self, activities: &HashMap<ActivityId, Arc<LiveActivity>>) {
        // Schedules replaced by a new version while staying active were running here a moment ago:
        // their new writer treats recent occurrences as on time, not as missed.
        let mut replaced = std::collections::HashSet::new();
        self.entries.retain(|id, entry| {
            let keep = activities.get(id).is_some_and(|a| {
                a.is_active() && a.schedule.is_some() && Arc::ptr_eq(a, &entry.activity)
            });
            if !keep && activities.get(id).is_some_and(|a| a.is_active()) {
                replaced.insert(*id);
            }
            keep
        });
        let now = Utc::now();
        let mut stored: Option<HashMap<ActivityId, (DateTime<Utc>, u64)>> = None;
        for activity in activities.values() {
            if !activity.is_active()
                || activity.schedule.is_none()
                || self.entries.contains_key(&activity.id)
            {
                continue;
            }
            if stored.is_none() {
                stored = Some(self.load_state().await);
            }
            let state = stored.as_ref().and_then(|s| s.get(&activity.id)).copied();
            let (due, signal) = watch::channel(None);
            let retire = self.shutdown.child_token();
            let writer = Writer {
                pool: self.pool.clone(),
                js: self.js.clone(),
                activity: activity.clone(),
                shutdown: retire.clone(),
                watermark: state.map(|(w, _)| w),
                fires: state.map_or(0, |(_, n)| n),
            };
            self.tracker
                .spawn(writer.run(signal, replaced.contains(&activity.id)));
            let mut entry = Entry {
                activity: activity.clone(),
                next: None,
                due,
                _retire: retire.drop_guard(),
            };
            schedule_next(&mut entry, now);
            self.entries.insert(activity.id, entry);
        }
    }

    async fn load_state(&self) -> HashMap<ActivityId, (DateTime<Utc>, u64)> {
        loop {
            match store::schedule_states(&self.pool).await {
                Ok(states) => {
                    return states.into_iter().map(|(id, w, n)| (id, (w, n))).collect();
                }
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

    /// Signals every schedule whose next occurrence is due, and moves it to the following one.
    fn signal_due(&mut self, now: DateTime<Utc>) {
        for entry in self.entries.values_mut() {
            let Some((occurrence, due)) = entry.next else {
                continue;
            };
            if due > now {
                continue;
            }
            entry.due.send_replace(Some(occurrence));
            // Occurrences already far behind need no signal of their own: the writer decides
            // them with the next one.
            let late_limit =
                now - chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default();
            schedule_next(entry, occurrence.max(late_limit));
        }
    }
}

/// Sets the entry's next occurrence after `after`, with its jitter.
fn schedule_next(entry: &mut Entry, after: DateTime<Utc>) {
    let schedule = entry
        .activity
        .schedule
        .as_ref()
        .expect("only schedules get entries");
    let jitter = entry
        .activity
        .schedule_trigger()
        .and_then(|t| t.jitter.as_ref())
        .and_then(std_duration)
        .unwrap_or_default();
    let mut upcoming = schedule.occurrences_after(after);
    entry.next = upcoming.next().map(|occurrence| {
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
        (
            occurrence.at,
            occurrence.at + chrono::Duration::from_std(delay).unwrap_or_default(),
        )
    });
}

/// The single writer of one schedule's fires.
struct Writer {
    pool: PgPool,
    js: async_nats::jetstream::Context,
    activity: Arc<LiveActivity>,
    /// Cancelled at shutdown, or when the schedule changes or ends.
    shutdown: CancellationToken,
    /// The newest occurrence decided (fired or not), as recorded.
    watermark: Option<DateTime<Utc>>,
    /// Fires so far (for `maxRuns`).
    fires: u64,
}

impl Writer {
    async fn run(mut self, mut due: watch::Receiver<Option<DateTime<Utc>>>, replaced: bool) {
        // A schedule with a watermark first decides what it missed while it was not running (the
        // service was down, the activity paused or disabled): all of it goes to the misfire policy.
        // After a new version replaced a running one, only what is truly late is missed. A new
        // schedule starts now.
        let started = Utc::now();
        let late_before = if replaced {
            started - chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default()
        } else {
            started
        };
        match self.watermark {
            Some(_) => self.decide_through(started, late_before).await,
            None => self.watermark = Some(started),
        }
        let mut through = None;
        loop {
            if let Some(through) = through.take() {
                let late_before =
                    Utc::now() - chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default();
                self.decide_through(through, late_before).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = due.changed() => {
                    if changed.is_err() {
                        return; // the schedule changed or went away
                    }
                    through = *due.borrow_and_update();
                }
            }
        }
    }

    /// Decides every occurrence in `(watermark, through]` — those before `late_before` by the
    /// misfire policy, the rest by firing them — retrying until it is all recorded or the writer
    /// stops. A retry moves `late_before` along, so an outage turns into misfires, not a flood.
    async fn decide_through(&mut self, through: DateTime<Utc>, late_before: DateTime<Utc>) {
        let mut backoff = Duration::from_millis(200);
        let mut late_before = late_before;
        while let Err(error) = self.try_decide_through(through, late_before).await {
            tracing::warn!(activity.name = %self.activity.name, error = %error_chain(&error), "cannot record scheduled fires; retrying");
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            late_before = late_before.max(
                Utc::now() - chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default(),
            );
        }
    }

    async fn try_decide_through(
        &mut self,
        through: DateTime<Utc>,
        late_before: DateTime<Utc>,
    ) -> Result<(), store::StoreError> {
        let schedule = self
            .activity
            .schedule
            .clone()
            .expect("only schedules get writers");
        let trigger = self
            .activity
            .schedule_trigger()
            .cloned()
            .unwrap_or_default();
        let Some(watermark) = self.watermark else {
            return Ok(());
        };

        // Late occurrences: the misfire policy.
        let late_until = through.min(late_before);
        if late_until > watermark {
            let plan = misfire::plan(&schedule, &trigger, watermark, late_until);
            if plan.missed > 0 || !plan.fire.is_empty() {
                tracing::info!(activity.name = %self.activity.name, missed = plan.missed, catching_up = plan.fire.len(), policy = trigger.misfire().as_str_name(), "schedule missed occurrences");
            }
            for occurrence in &plan.fire {
                if !self
                    .fire(occurrence.at, TriggerSource::Catchup, &trigger)
                    .await?
                {
                    return Ok(());
                }
            }
            if let Some(newest) = plan.watermark
                && self.watermark.is_some_and(|w| w < newest)
            {
                store::set_watermark(&self.pool, self.activity.id, newest).await?;
                self.watermark = Some(newest);
            }
        }

        // On time: fire each, in order.
        let after = self.watermark.unwrap_or(watermark);
        let on_time: Vec<_> = schedule
            .occurrences_after(after)
            .take_while(|o| o.at <= through)
            .collect();
        for occurrence in on_time {
            if let Some(note) = &occurrence.dst_note {
                tracing::info!(activity.name = %self.activity.name, scheduled_for = %occurrence.at, note = %note, "daylight saving time adjusted this occurrence");
            }
            if !self
                .fire(occurrence.at, TriggerSource::Schedule, &trigger)
                .await?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Records and publishes one fire, advancing the watermark with it. `Ok(false)` once
    /// `maxRuns` is reached: nothing more fires.
    async fn fire(
        &mut self,
        at: DateTime<Utc>,
        source: TriggerSource,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
    ) -> Result<bool, store::StoreError> {
        if trigger.max_runs > 0 && self.fires >= trigger.max_runs {
            return Ok(false);
        }
        let request = FireRequest {
            activity_id: self.activity.id,
            activity_name: self.activity.name.clone(),
            activity_version: self.activity.version,
            source,
            dedupe_key: schedule_dedupe_key(at),
            scheduled_for: Some(at),
            payload: None,
            subject: String::new(),
            watermark: Some(at),
        };
        let fired = fire::fire(&self.pool, &self.js, request).await?;
        if !fired.duplicate {
            self.fires += 1;
        }
        self.watermark = Some(at);
        Ok(true)
    }
}

/// The dedupe key of a scheduled occurrence: its instant in RFC 3339 UTC.
pub fn schedule_dedupe_key(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

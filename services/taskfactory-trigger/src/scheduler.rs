//! The scheduler: fires every active schedule on time, and decides what was missed.
//!
//! Two parts:
//!
//! - **The timer** (one loop for all schedules) knows each schedule's next occurrence. Shortly
//!   before an occurrence's time plus its deterministic jitter comes ([`LEAD`]), it tells that
//!   schedule's writer "everything through this occurrence is due, this one at that instant".
//! - **The writer** (one task per schedule) is the only one that records the schedule's fires,
//!   strictly in order, starting from the watermark persisted in Postgres. For each signal it
//!   decides every occurrence between the watermark and the signalled one: an occurrence less than
//!   [`MISFIRE_THRESHOLD`] late fires; a later one goes through the misfire policy
//!   ([`taskfactory_model::misfire`]). A fire that cannot be recorded (database down) is retried;
//!   as time passes its occurrence becomes late and falls under the misfire policy, so an outage
//!   never releases a flood, and a restart, a pause or a disabled spell is handled the same way.
//!
//! **Recorded ahead, published on time.** An on-time fire is recorded [`LEAD`] (at least
//! [`LEAD`] − [`TICK`]) before it is due, and held by its writer until its instant, when it is
//! published: a fire's lateness is the timer's and the publish's, not the database's (a commit
//! that stalls for less than the lead delays nothing). The wakes of the timer come at most every
//! [`TICK`] while fires come due, so the fires of that span are recorded together. If the
//! schedule changes or ends before the instant (paused, disabled, a new version, deleted), the
//! writer takes the fire back ([`store::withdraw_fire`]): deleted, with the watermark moved back
//! before it, so what comes next decides that occurrence as it would have without the lead. A
//! fire held when the scheduler stops (shutdown, leadership lost) is published at its instant
//! all the same; one held by a leader that dies is published by its successor's reconciler as
//! soon as the new term starts.
//!
//! Every occurrence gets a decision ([`taskfactory_model::misfire`]): fired, or recorded in the
//! `occurrences` ledger with why not. The watermark moves only in the transaction that records a
//! fire or a decision, in order, so whenever the service stops the next start resumes exactly
//! where it left off. Every write is fenced by the leadership term ([`crate::lease`]): a replica
//! that lost the lease cannot record anything more.
//!
//! Time comes from a [`Clock`], so tests can drive it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::misfire;
use taskfactory_model::schedule::jitter_delay;
use taskfactory_model::spec::std_duration;
use taskfactory_proto::v1::TriggerSource;
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_runtime::metrics;
use taskfactory_runtime::telemetry::error_chain;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fire::{self, FireRequest};
use crate::registry::{LiveActivity, Registry};
use crate::store::{self, DecisionRow, ScheduleWrite, StoreError, Term};

/// An occurrence fired later than this after its time counts as missed: the misfire policy
/// decides about it.
pub const MISFIRE_THRESHOLD: Duration = Duration::from_secs(10);

/// How long before it is due an on-time fire is recorded, at most (see the module docs).
pub const LEAD: Duration = Duration::from_millis(250);

/// The timer wakes at most this often while fires come due (fires due within a tick of each
/// other are recorded together); so a fire is recorded at least `LEAD - TICK` before its instant.
pub const TICK: Duration = Duration::from_millis(100);

struct Entry {
    activity: Arc<LiveActivity>,
    /// The next occurrence and when it is due (its instant plus jitter).
    next: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Tells the writer: every occurrence up to and including this instant is due (or will be
    /// within [`LEAD`]; the writer knows each one's instant, its time plus jitter).
    due: watch::Sender<Option<DateTime<Utc>>>,
    /// Stops the writer (even mid-retry) when the entry goes: the schedule changed or ended.
    retire: tokio_util::sync::DropGuard,
    /// The writer, awaited before a successor starts (one writer per schedule, ever).
    writer: tokio::task::JoinHandle<()>,
}

/// Why a writer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartMode {
    /// Scheduling (re)started here: a restart, a new leader.
    Restarted,
    /// A new version replaced the running schedule.
    Replaced,
    /// The activity became active: created, resumed, enabled.
    Activated,
}

pub struct Scheduler {
    pool: PgPool,
    registry: Registry,
    clock: ClockHandle,
    term: Term,
    tracker: TaskTracker,
    /// Writes the writers' fires together ([`fire::FireBatcher`]).
    batcher: fire::FireBatcher,
    shutdown: CancellationToken,
    /// Turns to decide: at most this many writers hold a decision's state at once.
    deciding: Arc<Semaphore>,
    entries: HashMap<ActivityId, Entry>,
    /// Every entry's next due time, in order: the timer's next wake is its first, and a wake
    /// looks only at the entries due (never at every schedule).
    timeline: BTreeSet<(DateTime<Utc>, ActivityId)>,
    /// After the first sync, a new entry means an activity became active (created, resumed,
    /// enabled); in the first, it means scheduling (re)started here.
    synced_once: bool,
}

impl Scheduler {
    pub fn new(
        pool: PgPool,
        js: async_nats::jetstream::Context,
        registry: Registry,
        clock: ClockHandle,
        term: Term,
        shutdown: CancellationToken,
        decisions_at_once: usize,
    ) -> Self {
        let tracker = TaskTracker::new();
        let batcher = fire::FireBatcher::start(pool.clone(), js.clone(), clock.clone(), &tracker);
        Self {
            pool,
            registry,
            clock,
            term,
            tracker,
            batcher,
            shutdown,
            deciding: Arc::new(Semaphore::new(decisions_at_once.max(1))),
            entries: HashMap::new(),
            timeline: BTreeSet::new(),
            synced_once: false,
        }
    }

    /// Runs until shutdown, then waits for the writers to finish the fire in hand.
    pub async fn run(mut self) {
        let mut snapshots = self.registry.subscribe();
        let initial = snapshots.borrow_and_update().clone();
        self.sync(&initial.activities, None).await;
        let mut synced = initial.serial;
        loop {
            // The first fire's lead before it is due, but no sooner than a tick from now (the
            // fires of one tick are recorded together) unless its lead would fall below
            // `LEAD - TICK` by then (a schedule just added, due soon).
            let now = self.clock.now();
            let until = match self.timeline.first().map(|(due, _)| *due) {
                Some(due) => (due - lead()).max((now + tick()).min(due - lead() + tick())),
                None => now + chrono::Duration::hours(1),
            };
            // A definition change first: a schedule paused a moment before its time comes does
            // not fire.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    // Only what changed since the snapshot synced last, when that is known.
                    let only = self.registry.changes(synced, snapshot.serial);
                    self.sync(&snapshot.activities, only.as_deref()).await;
                    synced = snapshot.serial;
                    continue;
                }
                _ = self.clock.sleep_until(until) => {}
            }
            let now = self.clock.now();
            self.signal_due(now, now + lead());
        }
        // Each writer finishes the fire in hand, then stops; the batcher, once the last writer
        // is gone, after the fires in hand.
        let Self {
            entries,
            tracker,
            batcher,
            ..
        } = self;
        drop(entries);
        drop(batcher);
        metrics::set_active_schedules(0);
        tracker.close();
        tracker.wait().await;
    }

    /// Brings the entries in line with the registry: new or changed schedules get a writer.
    /// `only`: the activities that changed since the last sync (the others are left as they are);
    /// `None`: look at every one.
    async fn sync(
        &mut self,
        activities: &crate::registry::Activities,
        only: Option<&[ActivityId]>,
    ) {
        // Schedules replaced by a new version while staying active were running here a moment ago:
        // their new writer treats recent occurrences as on time, not as missed.
        let mut replaced = HashMap::new();
        let stays = |id: &ActivityId, entry: &Entry| {
            activities.get(id).is_some_and(|a| {
                a.is_active() && a.schedule.is_some() && Arc::ptr_eq(a, &entry.activity)
            })
        };
        let retired: Vec<ActivityId> = match only {
            Some(ids) => ids
                .iter()
                .filter(|id| self.entries.get(id).is_some_and(|e| !stays(id, e)))
                .copied()
                .collect(),
            None => self
                .entries
                .iter()
                .filter(|(id, entry)| !stays(id, entry))
                .map(|(id, _)| *id)
                .collect(),
        };
        let mut stopping = Vec::new();
        for id in retired {
            if let Some(entry) = self.entries.remove(&id) {
                if let Some((_, due)) = entry.next {
                    self.timeline.remove(&(due, id));
                }
                replaced.insert(id, entry.activity.activated_at);
                drop(entry.retire); // cancels the writer
                stopping.push(entry.writer);
            }
        }
        // A retired writer finishes the fire in hand before anyone reads the watermark it moves.
        for writer in stopping {
            let _ = writer.await;
        }
        let now = self.clock.now();
        let starts = |activity: &&Arc<LiveActivity>| {
            activity.is_active()
                && activity.schedule.is_some()
                && !self.entries.contains_key(&activity.id)
        };
        let starting: Vec<&Arc<LiveActivity>> = match only {
            Some(ids) => ids
                .iter()
                .filter_map(|id| activities.get(id))
                .filter(starts)
                .collect(),
            None => activities.values().filter(starts).collect(),
        };
        // The progress of these schedules only: a change costs the same however many there are.
        let stored = if starting.is_empty() {
            HashMap::new()
        } else {
            let ids: Vec<ActivityId> = starting.iter().map(|activity| activity.id).collect();
            self.load_state(&ids).await
        };
        for activity in starting {
            let state = stored.get(&activity.id).copied();
            let (due, signal) = watch::channel(None);
            let retire = self.shutdown.child_token();
            let writer = Writer {
                pool: self.pool.clone(),
                batcher: self.batcher.clone(),
                deciding: self.deciding.clone(),
                clock: self.clock.clone(),
                term: self.term,
                activity: activity.clone(),
                shutdown: retire.clone(),
                stopping: self.shutdown.clone(),
                held: None,
                watermark: state.map(|(w, _)| w),
                fires: state.map_or(0, |(_, n)| n),
            };
            let mode = start_mode(self.synced_once, replaced.get(&activity.id), activity);
            let writer = self.tracker.spawn(writer.run(signal, mode));
            let mut entry = Entry {
                activity: activity.clone(),
                next: None,
                due,
                retire: retire.drop_guard(),
                writer,
            };
            schedule_next(&mut entry, now);
            if let Some((_, due)) = entry.next {
                self.timeline.insert((due, activity.id));
            }
            self.entries.insert(activity.id, entry);
        }
        self.synced_once = true;
        metrics::set_active_schedules(self.entries.len());
    }

    async fn load_state(&self, ids: &[ActivityId]) -> HashMap<ActivityId, (DateTime<Utc>, u64)> {
        loop {
            match store::schedule_states_of(&self.pool, ids).await {
                Ok(states) => {
                    return states.into_iter().map(|(id, w, n)| (id, (w, n))).collect();
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot read schedule watermarks; retrying");
                    // Real time: a retry pause, not a schedule.
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return HashMap::new(),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Signals every schedule whose next occurrence is due by `horizon`, and moves it to the
    /// following one: the entries due only, taken off the front of the timeline.
    fn signal_due(&mut self, now: DateTime<Utc>, horizon: DateTime<Utc>) {
        // Occurrences already far behind need no signal of their own: the writer decides them
        // with the next one.
        let late_limit = now - chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default();
        while let Some(&(due, id)) = self.timeline.first() {
            if due > horizon {
                break;
            }
            self.timeline.pop_first();
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            let Some((occurrence, _)) = entry.next else {
                continue;
            };
            entry.due.send_replace(Some(occurrence));
            schedule_next(entry, occurrence.max(late_limit));
            if let Some((_, due)) = entry.next {
                self.timeline.insert((due, id));
            }
        }
    }
}

/// Why a schedule's writer starts. `previous_activation` is the activation of the version whose
/// writer this one replaces, if one ran here a moment ago.
///
/// A schedule only counts as replaced when it stayed active throughout: a pause and resume (or a
/// disable and enable) can both land between two looks at the registry, and then the new
/// activation, not the writer still running, says the schedule was off — what it missed in
/// between goes to the misfire policy, as for any resume.
fn start_mode(
    synced_once: bool,
    previous_activation: Option<&Option<DateTime<Utc>>>,
    activity: &LiveActivity,
) -> StartMode {
    if !synced_once {
        return StartMode::Restarted;
    }
    match previous_activation {
        Some(activated_at) if *activated_at == activity.activated_at => StartMode::Replaced,
        _ => StartMode::Activated,
    }
}

/// Sets the entry's next occurrence after `after`, with its jitter.
fn schedule_next(entry: &mut Entry, after: DateTime<Utc>) {
    let schedule = entry
        .activity
        .schedule
        .as_ref()
        .expect("only schedules get entries");
    let mut upcoming = schedule.occurrences_after(after);
    entry.next = upcoming.next().map(|occurrence| {
        let due = due_instant(&entry.activity, occurrence.at, || {
            upcoming.next().map(|o| o.at)
        });
        (occurrence.at, due)
    });
}

/// When the occurrence at `at` is due: its time plus the schedule's deterministic jitter (which
/// depends on the occurrence after it, `following`, asked for only when there is jitter).
fn due_instant(
    activity: &LiveActivity,
    at: DateTime<Utc>,
    following: impl FnOnce() -> Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let jitter = activity
        .schedule_trigger()
        .and_then(|t| t.jitter.as_ref())
        .and_then(std_duration)
        .unwrap_or_default();
    if jitter.is_zero() {
        return at;
    }
    let delay = jitter_delay(&activity.id.to_string(), at, jitter, following());
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(at)
}

/// A fire recorded ahead of its instant ([`LEAD`]).
struct HeldFire {
    fire: fire::Held,
    occurrence: DateTime<Utc>,
    due: DateTime<Utc>,
}

fn lead() -> chrono::Duration {
    chrono::Duration::from_std(LEAD).unwrap_or_default()
}

fn tick() -> chrono::Duration {
    chrono::Duration::from_std(TICK).unwrap_or_default()
}

/// The single writer of one schedule's fires and decisions.
struct Writer {
    pool: PgPool,
    batcher: fire::FireBatcher,
    /// The scheduler's turns to decide (see [`Writer::turn`]).
    deciding: Arc<Semaphore>,
    clock: ClockHandle,
    term: Term,
    activity: Arc<LiveActivity>,
    /// Cancelled at shutdown, when leadership is lost, or when the schedule changes or ends.
    shutdown: CancellationToken,
    /// The scheduler's own: cancelled at shutdown and when leadership is lost (not when the
    /// schedule changes or ends).
    stopping: CancellationToken,
    /// A fire recorded ahead of its instant, not published yet (boxed: the writer waits small).
    held: Option<Box<HeldFire>>,
    /// The newest occurrence decided (fired or not), as recorded.
    watermark: Option<DateTime<Utc>>,
    /// Fires so far (for `maxRuns`).
    fires: u64,
}

/// Whether the writer goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// `maxRuns` reached, or leadership lost: nothing more from this writer.
    Stop,
}

fn threshold() -> chrono::Duration {
    chrono::Duration::from_std(MISFIRE_THRESHOLD).unwrap_or_default()
}

impl Writer {
    async fn run(mut self, mut due: watch::Receiver<Option<DateTime<Utc>>>, mode: StartMode) {
        // A schedule with a watermark first decides what it missed while it was not running:
        //
        // - Restarted (a restart, a new leader): occurrences less than the misfire threshold late
        //   still fire, so a quick restart or hand-over loses nothing whatever the policy; older
        //   ones go to the misfire policy.
        // - Replaced (a new version of a running schedule): the new version starts from now; its
        //   cron never applied before, so nothing before it counts as missed.
        // - Activated (created, resumed, enabled): what the activity missed while it was off goes
        //   to the policy (everything before it became active again); after that, as on a
        //   restart.
        //
        // A new schedule starts from its creation (recorded with it).
        if let Some(max_runs) = self.activity.schedule_trigger().map(|t| t.max_runs)
            && max_runs > 0
            && self.fires >= max_runs
        {
            return; // it has fired all its runs: the schedule is over
        }
        let started = self.clock.now();
        let mut late_before = self.late_limit(started);
        if let Some(activated) = self.activity.activated_at.filter(|a| *a <= started) {
            late_before = late_before.max(activated);
        }
        let flow = match self.watermark {
            Some(watermark) if mode == StartMode::Replaced && watermark < late_before => {
                Box::pin(self.start_fresh(late_before)).await
            }
            Some(_) => Box::pin(self.decide_through(started, late_before)).await,
            None => Box::pin(self.start_fresh(started)).await,
        };
        // A fire it recorded ahead (an occurrence just passed whose jittered instant is near).
        if self.release_held().await == Flow::Stop {
            return;
        }
        if flow == Flow::Stop {
            return;
        }
        let mut through = None;
        loop {
            if let Some(through) = through.take() {
                let late_before = self.late_limit(self.clock.now());
                // Boxed, like every write above: the writer spends its life waiting for its next
                // signal, and its future is only as large as what it holds while it waits, not
                // as large as the writes' futures (one writer per schedule: 100,000 of them).
                let flow = Box::pin(self.decide_through(through, late_before)).await;
                // Its turn given back: the fire recorded ahead waits for its instant.
                if self.release_held().await == Flow::Stop {
                    return;
                }
                if flow == Flow::Stop {
                    return;
                }
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

    /// [`Writer::release`] of the fire held, if there is one (boxed, like every write: the
    /// writer's future stays small).
    async fn release_held(&mut self) -> Flow {
        match self.held.take() {
            Some(held) => Box::pin(self.release(held)).await,
            None => Flow::Continue,
        }
    }

    /// Publishes the fire recorded ahead when its instant comes, or takes it back if the schedule
    /// changes or ends first. `Stop`: the writer is done (retired or stopping).
    async fn release(&mut self, held: Box<HeldFire>) -> Flow {
        let HeldFire {
            fire,
            occurrence,
            due,
        } = *held;
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {}
            _ = self.clock.sleep_until(due) => {
                self.publish(fire, occurrence);
                return Flow::Continue;
            }
        }
        // Retired: the schedule changed or ended. Before the fire's instant, the fire is taken
        // back; from its instant on, it stands. The scheduler stopping (shutdown, leadership
        // lost) publishes it at its instant all the same.
        if !self.stopping.is_cancelled() && self.clock.now() < due {
            let id = fire.id();
            match store::withdraw_fire(&self.pool, self.term, self.activity.id, id, occurrence)
                .await
            {
                Ok(true) => {
                    tracing::info!(activity.name = %self.activity.name, fire.id = %id, scheduled_for = %occurrence, "the schedule changed before its fire was due; the fire recorded ahead is taken back");
                    metrics::count_occurrences(&self.activity.name, "WITHDRAWN", 1);
                    return Flow::Stop;
                }
                Ok(false) => {}
                Err(error) => {
                    // It may have been taken back all the same (a commit whose answer was
                    // lost): never published here, so a fire taken back is never published. If
                    // it still stands, the reconciler publishes it after its instant.
                    tracing::warn!(activity.name = %self.activity.name, fire.id = %id, error = %error_chain(&error), "cannot take back a fire recorded ahead; if it stands, the reconciler publishes it");
                    return Flow::Stop;
                }
            }
        }
        // Its instant is at most `LEAD` away; real time bounds the wait too, so a stop never
        // waits on a clock that is not moving (a driven one).
        let _ = tokio::time::timeout(LEAD, self.clock.sleep_until(due)).await;
        self.publish(fire, occurrence);
        Flow::Stop
    }

    /// Publishes a fire recorded ahead, observing its lateness as it goes (for an on-time fire,
    /// from its time: the jitter and the wake).
    fn publish(&self, fire: fire::Held, occurrence: DateTime<Utc>) {
        metrics::record_fire_lateness(
            &self.activity.name,
            taskfactory_model::status::source_name(TriggerSource::Schedule),
            self.clock.now() - occurrence,
        );
        fire.publish();
    }

    /// Occurrences before this are late (missed): more than the misfire threshold behind, not
    /// counting the schedule's jitter (a jittered fire is due up to `jitter` after its time).
    fn late_limit(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let jitter = self
            .activity
            .schedule_trigger()
            .and_then(|t| t.jitter.as_ref())
            .and_then(std_duration)
            .and_then(|j| chrono::Duration::from_std(j).ok())
            .unwrap_or_default();
        now.checked_sub_signed(threshold() + jitter).unwrap_or(now)
    }

    /// Starts deciding from `started` on, recorded.
    async fn start_fresh(&mut self, started: DateTime<Utc>) -> Flow {
        self.retrying(|writer| {
            Box::pin(async move {
                store::record_decisions(
                    &writer.pool,
                    writer.activity.id,
                    writer.term,
                    &[],
                    started,
                )
                .await?;
                writer.watermark = Some(started);
                Ok(Flow::Continue)
            })
        })
        .await
    }

    /// Decides every occurrence in `(watermark, through]` — those before `late_before` by the
    /// misfire policy, the rest by firing them — retrying until it is all recorded or the writer
    /// stops. A retry moves `late_before` along, so an outage turns into misfires, not a flood.
    async fn decide_through(&mut self, through: DateTime<Utc>, late_before: DateTime<Utc>) -> Flow {
        let mut late_before = late_before;
        self.retrying(move |writer| {
            late_before = late_before.max(writer.late_limit(writer.clock.now()));
            Box::pin(writer.try_decide_through(through, late_before))
        })
        .await
    }

    /// A turn to decide, in the order asked for; `None` once the writer stops. An attempt holds
    /// about 15 KiB (the occurrences, the rows, the fire and its writes) until it is recorded,
    /// and after a restart every schedule may have something to decide at once.
    async fn turn(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(turn) = self.deciding.clone().try_acquire_owned() {
            return Some(turn);
        }
        metrics::count_schedule_decision_queued();
        tokio::select! {
            turn = self.deciding.clone().acquire_owned() => turn.ok(), // never closed
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Runs `attempt` until it succeeds, the writer stops, or leadership is lost. Each attempt
    /// waits for a turn ([`Writer::turn`]) and gives it back before a retry's pause.
    async fn retrying<F>(&mut self, mut attempt: F) -> Flow
    where
        F: for<'a> FnMut(
            &'a mut Writer,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Flow, StoreError>> + Send + 'a>,
        >,
    {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Some(turn) = self.turn().await else {
                return Flow::Stop;
            };
            let attempted = attempt(self).await;
            drop(turn);
            match attempted {
                Ok(flow) => return flow,
                Err(StoreError::Deposed { term }) => {
                    tracing::warn!(activity.name = %self.activity.name, term = %term, "leadership lost; this replica stops scheduling");
                    return Flow::Stop;
                }
                // Nothing was written: decide again at once, when the occurrence is late and
                // goes to the misfire policy.
                Err(error @ StoreError::Late { .. }) => {
                    tracing::info!(activity.name = %self.activity.name, %error, "scheduled fire too late to count as on time");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(activity.name = %self.activity.name, error = %error_chain(&error), "cannot record scheduled fires; retrying");
                }
            }
            // Real time: a retry pause, not a schedule.
            tokio::select! {
                _ = self.shutdown.cancelled() => return Flow::Stop,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            // A commit whose answer was lost may have happened: continue from what is recorded.
            match store::schedule_state(&self.pool, self.activity.id).await {
                Ok(Some((watermark, fires))) => {
                    self.watermark = self.watermark.max(Some(watermark));
                    self.fires = self.fires.max(fires);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(error = %error_chain(&error), "cannot reread the watermark");
                }
            }
        }
    }

    async fn try_decide_through(
        &mut self,
        through: DateTime<Utc>,
        late_before: DateTime<Utc>,
    ) -> Result<Flow, StoreError> {
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

        // Late occurrences: the misfire policy (in chunks if there are very many).
        let late_until = through.min(late_before);
        while let Some(watermark) = self.watermark
            && late_until > watermark
        {
            let decisions = misfire::plan(&schedule, &trigger, watermark, late_until);
            let fires = decisions.fires().count();
            let missed: u64 = decisions
                .steps
                .iter()
                .filter_map(|s| match s {
                    misfire::Step::Decided(r) => Some(r.count.unwrap_or(1)),
                    misfire::Step::Fire(_) => None,
                })
                .sum();
            if fires > 0 || missed > 0 {
                tracing::info!(activity.name = %self.activity.name, missed, catching_up = fires, policy = trigger.misfire().as_str_name(), "schedule missed occurrences");
            }
            let complete = decisions.complete;
            if self
                .apply(decisions, TriggerSource::Catchup, &trigger)
                .await?
                == Flow::Stop
            {
                return Ok(Flow::Stop);
            }
            if complete {
                break;
            }
        }

        // On time: fire each, in order.
        while let Some(watermark) = self.watermark
            && through > watermark
        {
            let decisions = misfire::on_time(&schedule, watermark, through);
            let complete = decisions.complete;
            if self
                .apply(decisions, TriggerSource::Schedule, &trigger)
                .await?
                == Flow::Stop
            {
                return Ok(Flow::Stop);
            }
            if complete {
                break;
            }
        }
        Ok(Flow::Continue)
    }

    /// Records the decisions in order: each fire in its own transaction together with the
    /// decisions before it; decisions after the last fire on their own.
    async fn apply(
        &mut self,
        decisions: misfire::Decisions,
        source: TriggerSource,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
    ) -> Result<Flow, StoreError> {
        let now = self.clock.now();
        let mut pending: Vec<misfire::DecidedRange> = Vec::new();
        for step in decisions.steps {
            match step {
                misfire::Step::Decided(range) => pending.push(range),
                misfire::Step::Fire(occurrence) => {
                    if self.shutdown.is_cancelled() {
                        // Stopping (shutdown, lost lease, a new version): what is recorded stands;
                        // the successor continues from the watermark.
                        return Ok(Flow::Stop);
                    }
                    if trigger.max_runs > 0 && self.fires >= trigger.max_runs {
                        self.record_pending(&pending, None, trigger, now).await?;
                        tracing::info!(activity.name = %self.activity.name, max_runs = trigger.max_runs, "schedule reached maxRuns; it fires no more");
                        return Ok(Flow::Stop);
                    }
                    // A fire still held (two instants of this schedule within the lead, with
                    // jitter) is published at its instant before the next is recorded, so fires
                    // go out in order; if the schedule changed meanwhile, it was taken back and
                    // nothing after it is decided.
                    if self.release_held().await == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                    let rows = self.rows(&pending, Some(&occurrence), trigger, now);
                    self.fire(&occurrence, source, &rows).await?;
                    pending.clear();
                }
            }
        }
        if !pending.is_empty() {
            self.record_pending(&pending, decisions.watermark, trigger, now)
                .await?;
        } else if decisions.watermark > self.watermark {
            // No occurrence since the last one decided: nothing to record. The stored watermark
            // stays at that decision, and a restart decides the same empty range again. (Written,
            // this was one transaction per schedule at every start: 100,000 at once.)
            self.watermark = decisions.watermark;
        }
        Ok(Flow::Continue)
    }

    async fn record_pending(
        &mut self,
        pending: &[misfire::DecidedRange],
        watermark: Option<DateTime<Utc>>,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Some(watermark) = pending
            .last()
            .map(|r| r.through)
            .max(watermark)
            .max(self.watermark)
        else {
            return Ok(());
        };
        let rows = self.rows(pending, None, trigger, now);
        store::record_decisions(&self.pool, self.activity.id, self.term, &rows, watermark).await?;
        count_decisions(&self.activity.name, &rows);
        self.watermark = Some(watermark);
        Ok(())
    }

    /// The ledger rows of decided ranges; `next_fire` is the fire they come before (the one
    /// coalesced occurrences went into).
    fn rows(
        &self,
        ranges: &[misfire::DecidedRange],
        next_fire: Option<&taskfactory_model::schedule::Occurrence>,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
        now: DateTime<Utc>,
    ) -> Vec<DecisionRow> {
        ranges
            .iter()
            .map(|range| {
                let (decision, reason) = self.explain(range, next_fire, trigger, now);
                DecisionRow {
                    activity_id: self.activity.id,
                    activity_version: self.activity.version,
                    scheduled_for: range.through,
                    range_after: range.after,
                    occurrences: range.count,
                    decision,
                    reason,
                    run_id: (range.why == misfire::Missed::Coalesced)
                        .then(|| next_fire.map(|o| self.run_id(o.at)))
                        .flatten(),
                    dst_note: range.dst_note.clone(),
                    decided_at: now,
                }
            })
            .collect()
    }

    fn run_id(&self, at: DateTime<Utc>) -> uuid::Uuid {
        taskfactory_model::ids::RunId::derive(self.activity.id, &schedule_dedupe_key(at)).0
    }

    /// The decision and its reason, in words an operator can act on.
    fn explain(
        &self,
        range: &misfire::DecidedRange,
        next_fire: Option<&taskfactory_model::schedule::Occurrence>,
        trigger: &taskfactory_proto::v1::ScheduleTrigger,
        now: DateTime<Utc>,
    ) -> (&'static str, String) {
        use misfire::Missed;
        let schedule = self
            .activity
            .schedule
            .as_ref()
            .expect("only schedules get writers");
        if range.why == Missed::Excluded {
            let date = range
                .through
                .with_timezone(&schedule.timezone())
                .date_naive();
            return ("EXCLUDED", format!("{date} is in excludeDates"));
        }
        // Missed while paused? Only when the whole range lies inside the last pause.
        let first = schedule.next_after(range.after).map(|o| o.at);
        let paused = match (self.activity.paused_at, self.activity.resumed_at) {
            (Some(paused_at), Some(resumed_at)) => {
                first.is_some_and(|f| f >= paused_at) && range.through <= resumed_at
            }
            _ => false,
        };
        let why = if paused {
            let note = &self.activity.pause_note;
            format!(
                "the activity was paused{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!(" ({note})")
                }
            )
        } else {
            "the schedule was not running (trigger service down or without a leader, activity disabled, or fires could not be recorded)".to_owned()
        };
        let window = humantime::format_duration(misfire::catchup_window(trigger));
        let missed = if paused {
            "SKIPPED_PAUSED"
        } else {
            "MISSED_CATCHUP_WINDOW"
        };
        match range.why {
            Missed::BeforeWindow => (
                missed,
                format!(
                    "{why}; older than the catch-up window ({window}) when scheduling resumed at {now}"
                ),
            ),
            Missed::Coalesced => (
                "COALESCED",
                format!(
                    "{why}; misfire policy MISFIRE_LATEST fired only the newest missed time{}",
                    next_fire
                        .map(|o| format!(" ({})", o.at))
                        .unwrap_or_default()
                ),
            ),
            Missed::OverCap => (
                missed,
                format!(
                    "{why}; misfire policy MISFIRE_ALL caught up only the newest {} (maxCatchup)",
                    misfire::max_catchup(trigger)
                ),
            ),
            Missed::PolicySkip => (missed, format!("{why}; misfire policy MISFIRE_SKIP")),
            Missed::Excluded => unreachable!("handled above"),
        }
    }

    /// Records and publishes one fire with the decisions before it, advancing the watermark.
    async fn fire(
        &mut self,
        occurrence: &taskfactory_model::schedule::Occurrence,
        source: TriggerSource,
        decisions: &[DecisionRow],
    ) -> Result<(), StoreError> {
        if let Some(note) = &occurrence.dst_note {
            tracing::info!(activity.name = %self.activity.name, scheduled_for = %occurrence.at, note = %note, "daylight saving time adjusted this occurrence");
        }
        // An on-time occurrence signalled ahead of its instant is recorded now and published then.
        let now = self.clock.now();
        let ahead = if source == TriggerSource::Schedule {
            let schedule = self.activity.schedule.as_ref();
            let due = due_instant(&self.activity, occurrence.at, || {
                schedule
                    .and_then(|s| s.occurrences_after(occurrence.at).next())
                    .map(|o| o.at)
            });
            // Only within the lead: an older occurrence decided at a start (a restart, a new
            // version) is fired at once, as always, whatever its jitter.
            (due > now && due - now <= lead()).then_some(due)
        } else {
            None
        };
        let request = FireRequest {
            activity_id: self.activity.id,
            activity_name: self.activity.name.clone(),
            activity_version: self.activity.version,
            source,
            dedupe_key: schedule_dedupe_key(occurrence.at),
            scheduled_for: Some(occurrence.at),
            payload: None,
            subject: String::new(),
            fired_at: ahead.unwrap_or(now),
            dst_note: occurrence.dst_note.clone(),
            overlap: taskfactory_proto::v1::OverlapPolicy::OverlapUnspecified,
            origin: None,
            rate_limit: None,
            flow: schedule_admission(&self.activity.spec),
        };
        let late_after = (source == TriggerSource::Schedule).then(|| {
            let margin = occurrence.at - self.late_limit(occurrence.at);
            (occurrence.at + margin, &self.clock)
        });
        let write = ScheduleWrite {
            term: self.term,
            watermark: occurrence.at,
            decisions,
            late_after,
        };
        let fired = match ahead {
            Some(due) => {
                let (fired, held) = fire::fire_ahead(&self.batcher, request, write).await?;
                self.held = held.map(|fire| {
                    Box::new(HeldFire {
                        fire,
                        occurrence: occurrence.at,
                        due,
                    })
                });
                fired
            }
            None => fire::fire_batched(&self.batcher, request, Some(write)).await?,
        };
        count_decisions(&self.activity.name, decisions);
        if fired.duplicate {
            metrics::count_occurrences(&self.activity.name, "DEDUPED", 1);
        } else {
            metrics::count_occurrences(&self.activity.name, "FIRED", 1);
            self.fires += 1;
        }
        self.watermark = Some(occurrence.at);
        Ok(())
    }
}

/// Counts recorded decisions of `activity` in the occurrences metric.
fn count_decisions(activity: &str, rows: &[DecisionRow]) {
    for row in rows {
        metrics::count_occurrences(activity, row.decision, row.occurrences.unwrap_or(1));
    }
}

/// The dedupe key of a scheduled occurrence: its instant in RFC 3339 UTC.
pub fn schedule_dedupe_key(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The admission of a scheduled fire of an activity with `flow.concurrency`: the limit over the
/// whole activity (a schedule's concurrency has no key and its fires no priority: validation
/// sees to it).
pub(crate) fn schedule_admission(
    spec: &taskfactory_proto::v1::ActivitySpec,
) -> Option<taskfactory_proto::v1::FlowAdmission> {
    let no_event = || taskfactory_model::expr::ExprError {
        message: "a schedule's fire has no event to read".to_owned(),
    };
    taskfactory_model::flow::admission(spec, |_| Err(no_event()), |_| Err(no_event())).unwrap_or_else(|error| {
        tracing::warn!(%error, "a schedule's concurrency reads its event; its fires are admitted without a key");
        spec.flow
            .as_ref()
            .and_then(|f| f.concurrency.as_ref())
            .map(|c| taskfactory_proto::v1::FlowAdmission {
                concurrency_key: String::new(),
                concurrency_limit: c.limit,
                priority: 0,
                throttle: None,
                arrival_ns: 0,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async function returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_waiting_schedule_writer_is_small() {
        // One per schedule, alive as long as it is: 100,000 schedules in one trigger.
        let size = future_size(Writer::run);
        assert!(size <= 1024, "a writer's future takes {size} bytes");
    }

    fn activity(activated_at: &str) -> LiveActivity {
        LiveActivity {
            id: ActivityId(uuid::Uuid::nil()),
            name: "a".to_owned(),
            version: 2,
            enabled: true,
            paused: false,
            pause_note: String::new(),
            paused_at: None,
            resumed_at: None,
            activated_at: Some(activated_at.parse().unwrap()),
            spec: Default::default(),
            schedule: None,
        }
    }

    #[test]
    fn a_schedule_counts_as_replaced_only_when_it_stayed_active() {
        let now = activity("2026-07-01T08:03:30Z");
        let before: Option<DateTime<Utc>> = Some("2026-07-01T08:00:30Z".parse().unwrap());
        // First sync after a start: whatever was there before, scheduling restarted here.
        assert_eq!(start_mode(false, None, &now), StartMode::Restarted);
        assert_eq!(start_mode(false, Some(&before), &now), StartMode::Restarted);
        // A new version of a schedule that ran here and never went off.
        assert_eq!(
            start_mode(true, Some(&now.activated_at), &now),
            StartMode::Replaced
        );
        // Paused and resumed (or disabled and enabled) between two looks at the registry: the
        // writer still ran, but the schedule was off in between.
        assert_eq!(start_mode(true, Some(&before), &now), StartMode::Activated);
        // Created, resumed or enabled while no writer ran here.
        assert_eq!(start_mode(true, None, &now), StartMode::Activated);
    }
}

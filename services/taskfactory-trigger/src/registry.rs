//! The in-memory view of live activities that the scheduler and the event matcher work from: of
//! each, its state and its trigger (never its tasks or context, which only orchestrators read).
//!
//! A snapshot is immutable and replaced whole on reload. Reloads happen when this replica's admin
//! API changes a definition (at once), when another replica announces a change on
//! `taskfactory.internal.definitions-changed`, and every reload interval (polled, so a lost
//! announcement only delays a change, never drops it). A reload reads only the activities changed
//! since the one before (by transactions not finished at its snapshot), so its cost does not grow
//! with the number of activities. The snapshot's maps are persistent (`imbl`): a new snapshot
//! shares everything unchanged with the one before, so a change costs O(log n), not a copy of
//! every activity. Subscribers that missed snapshots (a burst of changes) ask
//! [`Registry::changes`] what changed in between, so they too never look at every activity.
//!
//! Anyone who can publish on NATS can send the announcement, so it is cheap by construction: the
//! signals waiting are answered by one reload, at most one reload runs at a time with at most one
//! more pending, and signalled reloads are at least [`SIGNALLED_RELOAD_GAP`] apart. A flood of
//! signals costs a few reloads a second, and a reload that finds nothing changed wakes nobody.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use taskfactory_runtime::telemetry::error_chain;

use futures::{FutureExt as _, StreamExt as _};
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::schedule::Schedule;
use taskfactory_model::spec;
use taskfactory_model::subjects;
use taskfactory_proto::v1::{ActivitySpec, trigger};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{self, ActivityRecord};

/// The least time between two reloads asked for by signals (announcements of other replicas):
/// however many signals come, they cost at most one reload per gap. Local changes and polling are
/// not held back by it.
pub const SIGNALLED_RELOAD_GAP: Duration = Duration::from_millis(250);

/// Signals taken off the subscription at once before the loop looks at its other work.
const SIGNALS_AT_ONCE: u64 = 4096;

/// Snapshots whose changes are kept for subscribers that fell behind ([`Registry::changes`]),
/// and the ids they may name in all, at most (a subscriber further behind compares everything).
const CHANGES_KEPT: usize = 1024;
const CHANGED_IDS_KEPT: usize = 100_000;

/// Activities whose specs one query reads, at most.
const LOAD_CHUNK: usize = 2000;

/// Chunks of this many specs or more are parsed on a blocking thread while the next is read;
/// smaller ones (a reload after a change) at once.
const PARSE_APART_FROM: usize = 64;

/// The registry's reads look activities up by the transaction that changed them
/// (`activities_changed`), which the planner chooses only if its statistics of `activities` are
/// current. Autovacuum keeps them so, unless it is off or behind a bulk load (10,000 creates in a
/// minute); then a reload scans every activity, and each create costs in proportion to how many
/// exist. So the registry has the table analyzed itself whenever the live activities have
/// doubled since it last did (from this many on).
const ANALYZE_FROM: usize = 1000;

/// The activities each recent snapshot changed, by serial, oldest first.
type RecentChanges = VecDeque<(u64, Arc<[ActivityId]>)>;

/// Live activities by id, shared between snapshots.
pub type Activities = imbl::HashMap<ActivityId, Arc<LiveActivity>>;

/// One live activity at its current version.
#[derive(Debug)]
pub struct LiveActivity {
    pub id: ActivityId,
    pub name: String,
    pub version: u32,
    pub enabled: bool,
    pub paused: bool,
    /// The current pause's note (or the last one's).
    pub pause_note: String,
    /// When the current (or last) pause began and ended: decisions about occurrences missed in
    /// between say "paused".
    pub paused_at: Option<chrono::DateTime<chrono::Utc>>,
    pub resumed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it last became active (created, resumed, enabled).
    pub activated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// In the registry, the spec without its tasks, context, description and labels (see
    /// `store::load_live_activities`); whole when built from a whole record.
    pub spec: ActivitySpec,
    /// Built once per version for schedule triggers.
    pub schedule: Option<Arc<Schedule>>,
}

impl LiveActivity {
    /// Whether automatic fires (schedules, events) may happen.
    pub fn is_active(&self) -> bool {
        self.enabled && !self.paused
    }

    pub fn event_trigger(&self) -> Option<&taskfactory_proto::v1::EventTrigger> {
        match self.spec.trigger.as_ref()?.kind.as_ref()? {
            trigger::Kind::Event(event) => Some(event),
            _ => None,
        }
    }

    pub fn schedule_trigger(&self) -> Option<&taskfactory_proto::v1::ScheduleTrigger> {
        match self.spec.trigger.as_ref()?.kind.as_ref()? {
            trigger::Kind::Schedule(schedule) => Some(schedule),
            _ => None,
        }
    }

    /// Builds the live view of a stored record. A stored spec that no longer parses (it passed
    /// validation when stored) is reported and left out rather than stopping the service.
    pub fn from_record(record: &ActivityRecord) -> Option<Self> {
        let spec: ActivitySpec = match taskfactory_proto::from_json(&record.spec) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(activity.id = %record.id, activity.name = %record.name, error = %error_chain(&error), "stored spec does not parse; activity ignored");
                return None;
            }
        };
        let schedule = match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(trigger::Kind::Schedule(schedule)) => match spec::build_schedule(schedule) {
                Ok(built) => Some(Arc::new(built)),
                Err(errors) => {
                    tracing::error!(activity.id = %record.id, errors = ?errors, "stored schedule does not parse; activity ignored");
                    return None;
                }
            },
            _ => None,
        };
        Some(Self {
            id: record.id,
            name: record.name.clone(),
            version: record.current_version,
            enabled: record.enabled,
            paused: record.paused,
            pause_note: record.pause_note.clone(),
            paused_at: record.paused_at,
            resumed_at: record.resumed_at,
            activated_at: record.activated_at,
            spec,
            schedule,
        })
    }
}

/// All live activities, as of one generation.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: i64,
    /// Counts the snapshots this registry published.
    pub serial: u64,
    /// The activities that differ from snapshot `serial - 1` (added, changed or gone); `None`:
    /// not known (a full load), compare everything.
    pub changed: Option<Vec<ActivityId>>,
    pub activities: Activities,
    /// Those of `activities` with an event trigger (active or not): the event matcher looks at
    /// these only.
    pub listeners: Activities,
}

/// A snapshot's maps while a load builds them: `listeners` always holds those of `activities`
/// with an event trigger.
#[derive(Default)]
struct LiveMaps {
    activities: Activities,
    listeners: Activities,
}

impl LiveMaps {
    fn put(&mut self, live: Arc<LiveActivity>) {
        if live.event_trigger().is_some() {
            self.listeners.insert(live.id, live.clone());
        } else {
            self.listeners.remove(&live.id);
        }
        self.activities.insert(live.id, live);
    }

    /// Whether it was there.
    fn remove(&mut self, id: &ActivityId) -> bool {
        self.listeners.remove(id);
        self.activities.remove(id).is_some()
    }
}

/// What the loads so far leave to the next one.
#[derive(Default)]
struct Loaded {
    /// Where the next load reads changes from (`store::Heads::horizon`; `None`: read all).
    horizon: Option<store::Horizon>,
    /// Every reload request with a ticket up to this was taken before a load that has finished
    /// began: what changed before it is in the snapshot.
    answered: u64,
}

/// Holds the current snapshot and tells subscribers when it changes.
#[derive(Clone)]
pub struct Registry {
    sender: Arc<watch::Sender<Arc<Snapshot>>>,
    changed: Arc<Notify>,
    /// Where the next load reads changes from, and which reload requests are answered; held by
    /// the load in progress: loads build on the snapshot before them, one at a time.
    loaded: Arc<tokio::sync::Mutex<Loaded>>,
    /// Reload requests so far: each [`Registry::reload`] takes the next number as its ticket.
    requested: Arc<std::sync::atomic::AtomicU64>,
    /// Loads run so far (a reload answered by another's load runs none).
    loads: Arc<std::sync::atomic::AtomicU64>,
    /// The changes of the last [`CHANGES_KEPT`] snapshots, by serial (a full load breaks it).
    recent: Arc<std::sync::Mutex<RecentChanges>>,
    /// Live activities when the registry last had `activities` analyzed (see [`ANALYZE_FROM`]);
    /// `usize::MAX` once the database refused (no right to).
    analyzed_at: Arc<std::sync::atomic::AtomicUsize>,
}

impl Registry {
    pub fn new() -> Self {
        let (sender, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            sender: Arc::new(sender),
            changed: Arc::new(Notify::new()),
            loaded: Arc::new(tokio::sync::Mutex::new(Loaded::default())),
            requested: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            loads: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            recent: Arc::new(std::sync::Mutex::new(VecDeque::new())),
            analyzed_at: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// Has `activities` analyzed, in the background, when the live activities have doubled
    /// since the last time (see [`ANALYZE_FROM`]).
    fn analyze_if_grown(&self, pool: &PgPool, live: usize) {
        use std::sync::atomic::Ordering;
        let last = self.analyzed_at.load(Ordering::Relaxed);
        if live < ANALYZE_FROM || live < last.saturating_mul(2) {
            return;
        }
        if self
            .analyzed_at
            .compare_exchange(last, live, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another load is on it
        }
        let (pool, analyzed_at) = (pool.clone(), self.analyzed_at.clone());
        tokio::spawn(async move {
            match sqlx::query("ANALYZE activities").execute(&pool).await {
                Ok(_) => {
                    tracing::debug!(
                        activities = live,
                        "analyzed activities for the registry's reads"
                    )
                }
                Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42501") => {
                    tracing::info!(
                        "no right to analyze activities (not its owner); the registry relies on autovacuum for its statistics"
                    );
                    analyzed_at.store(usize::MAX, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "could not analyze activities; will try again");
                    analyzed_at.store(last, Ordering::Relaxed);
                }
            }
        });
    }

    /// The activities that differ between snapshot `after` and snapshot `upto` (added, changed
    /// or gone), if every snapshot in between is still known; `None`: compare everything.
    pub fn changes(&self, after: u64, upto: u64) -> Option<Vec<ActivityId>> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let wanted = upto.checked_sub(after)?;
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        let mut found = 0;
        for (serial, changed) in recent.iter() {
            if *serial > after && *serial <= upto {
                found += 1;
                ids.extend(changed.iter().filter(|id| seen.insert(**id)));
            }
        }
        (found == wanted).then_some(ids)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.sender.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    /// Asks the reload loop to reload now (after a local change).
    pub fn request_reload(&self) {
        self.changed.notify_one();
    }

    /// Brings the snapshot up to date with what Postgres has now, and publishes it (subscribers
    /// are woken only when something changed). Returns how many activities it read (those
    /// changed since the load before, or all of them the first time).
    ///
    /// Reloads asked for at once share loads: a request is answered by any load that begins after
    /// it was made (so after the change that asked for it committed). While one load runs, the
    /// requests that come meanwhile wait for it and are then answered together by one more, so
    /// 32 creates at once cost two loads, not 32. A request answered by another's load reads
    /// nothing and returns 0.
    pub async fn reload(&self, pool: &PgPool) -> Result<usize, store::StoreError> {
        use std::sync::atomic::Ordering;
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut loaded = self.loaded.lock().await;
        if loaded.answered >= ticket {
            taskfactory_runtime::metrics::record_definitions_reload("shared", None);
            return Ok(0);
        }
        // Every request up to here was made before this load reads anything.
        let answers = self.requested.load(Ordering::SeqCst);
        self.loads.fetch_add(1, Ordering::Relaxed);
        let reloaded = self.load(pool, &mut loaded).await;
        match &reloaded {
            Ok((generation, changed, _)) => {
                loaded.answered = answers;
                taskfactory_runtime::metrics::record_definitions_reload(
                    if *changed { "changed" } else { "unchanged" },
                    Some(*generation),
                )
            }
            Err(_) => taskfactory_runtime::metrics::record_definitions_reload("failed", None),
        }
        reloaded.map(|(_, _, read)| read)
    }

    /// Loads run so far: a reload answered by another's load runs none.
    pub fn loads(&self) -> u64 {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads the snapshot; returns its generation, whether it differs from the one before, and
    /// how many activities it read.
    /// Only what changed since the last load is read (the activities changed by transactions not
    /// finished at its snapshot, see `store::activity_heads_since`), and specs only of the
    /// activities that are new or changed: a change costs the same however many activities there
    /// are. Loads run one at a time: the caller holds `loaded`.
    async fn load(
        &self,
        pool: &PgPool,
        loaded: &mut Loaded,
    ) -> Result<(i64, bool, usize), store::StoreError> {
        let horizon = &mut loaded.horizon;
        let previous = self.current();
        let generation = store::definitions_generation(pool).await?;
        let mut read = store::activity_heads_since(pool, horizon.as_ref()).await?;
        let mut full = horizon.is_none();
        if horizon
            .as_ref()
            .is_some_and(|horizon| read.horizon.xmax < horizon.xmax)
        {
            // Transaction ids went back (another database?): read everything again.
            read = store::activity_heads_since(pool, None).await?;
            full = true;
        }
        let count = read.heads.len() + read.gone.len();
        taskfactory_runtime::metrics::count_definitions_read(count);
        if !full && read.heads.is_empty() && read.gone.is_empty() {
            // Nothing changed (a poll, mostly).
            *horizon = Some(read.horizon);
            return Ok((previous.generation, false, count));
        }
        let mut live = if full {
            LiveMaps::default()
        } else {
            LiveMaps {
                activities: previous.activities.clone(),
                listeners: previous.listeners.clone(),
            }
        };
        // What differs from the snapshot before (in an incremental load).
        let mut touched = Vec::new();
        for id in &read.gone {
            if live.remove(id) {
                touched.push(*id);
            }
        }
        let mut to_load = Vec::new();
        for head in &read.heads {
            // Keep the built schedule when nothing the scheduler reads changed. A pause and resume
            // that both happened since the last reload leave `paused` as it was but move the
            // activation: the scheduler must see that the schedule was off in between.
            if let Some(old) = previous.activities.get(&head.id)
                && old.version == head.current_version
                && old.enabled == head.enabled
                && old.paused == head.paused
                && old.activated_at == head.activated_at
                && old.paused_at == head.paused_at
                && old.resumed_at == head.resumed_at
                && old.pause_note == head.pause_note
            {
                live.put(old.clone());
            } else {
                // Gone until its new version is built (a spec that no longer builds stays out).
                live.remove(&head.id);
                touched.push(head.id);
                to_load.push(head.id.0);
            }
        }
        // In chunks: a full load of 100,000 activities never holds all their stored specs at once.
        // Parsing the specs is most of a full load's time (at start), so a large chunk is parsed
        // on a blocking thread while the next one is read.
        let mut chunks = to_load.chunks(LOAD_CHUNK);
        let mut parsing: Option<tokio::task::JoinHandle<Vec<LiveActivity>>> = None;
        loop {
            let read = match chunks.next() {
                Some(chunk) => Some(store::load_live_activities(pool, chunk).await?),
                None => None,
            };
            if let Some(parsing) = parsing.take() {
                let built = match parsing.await {
                    Ok(built) => built,
                    Err(error) => match error.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        // Only at the runtime's shutdown.
                        Err(_) => return Err(sqlx::Error::WorkerCrashed.into()),
                    },
                };
                for activity in built {
                    live.put(Arc::new(activity));
                }
            }
            let Some(records) = read else { break };
            let small = records.len() < PARSE_APART_FROM;
            let parse = move || -> Vec<LiveActivity> {
                records
                    .iter()
                    .filter_map(LiveActivity::from_record)
                    .collect()
            };
            if small {
                for built in parse() {
                    live.put(Arc::new(built));
                }
                continue;
            }
            let span = tracing::Span::current();
            parsing = Some(tokio::task::spawn_blocking(move || span.in_scope(parse)));
        }
        let LiveMaps {
            activities,
            listeners,
        } = live;
        // Unchanged entries are the very same `Arc`s as before.
        let changed = generation != previous.generation
            || if full {
                activities.len() != previous.activities.len()
                    || activities.iter().any(|(id, live)| {
                        !previous
                            .activities
                            .get(id)
                            .is_some_and(|old| Arc::ptr_eq(old, live))
                    })
            } else {
                !touched.is_empty()
            };
        self.analyze_if_grown(pool, activities.len());
        if changed {
            let serial = previous.serial + 1;
            {
                // Kept before the snapshot is seen, so a subscriber that sees it finds its changes.
                let mut recent = self
                    .recent
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if full {
                    recent.clear();
                } else {
                    recent.push_back((serial, Arc::from(touched.as_slice())));
                    let mut ids: usize = recent.iter().map(|(_, ids)| ids.len()).sum();
                    while recent.len() > CHANGES_KEPT || ids > CHANGED_IDS_KEPT {
                        let Some((_, dropped)) = recent.pop_front() else {
                            break;
                        };
                        ids -= dropped.len();
                    }
                }
            }
            self.sender.send_replace(Arc::new(Snapshot {
                generation,
                serial,
                changed: (!full).then_some(touched),
                activities,
                listeners,
            }));
        }
        *horizon = Some(read.horizon);
        Ok((generation, changed, count))
    }

    /// Keeps the snapshot current until shutdown: reloads on a local request (at once), on
    /// announcements from other replicas (coalesced, at most one reload per
    /// [`SIGNALLED_RELOAD_GAP`]), and every `poll_every`. Reloads run one at a
    /// time, in this loop: signals that come meanwhile wait as one pending reload.
    pub async fn run_reloader(
        self,
        pool: PgPool,
        nats: async_nats::Client,
        poll_every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut announcements = match nats.subscribe(subjects::DEFINITIONS_CHANGED).await {
            Ok(subscription) => {
                // The server has the subscription before the first reload below reads anything:
                // a change committed after that read is announced to this replica. (Without the
                // flush, an announcement could reach the server before the subscription did, and
                // its change wait for the next poll.)
                if let Err(error) = nats.flush().await {
                    tracing::warn!(error = %error_chain(&error), "cannot confirm the subscription to definition announcements; the next poll covers a miss");
                }
                Some(subscription)
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot subscribe to definition announcements; relying on polling");
                None
            }
        };
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A signal came that no reload started since has answered.
        let mut signalled = false;
        let mut last_reload: Option<tokio::time::Instant> = None;
        loop {
            let signalled_reload_at = last_reload.map_or_else(tokio::time::Instant::now, |last| {
                last + SIGNALLED_RELOAD_GAP
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => {}
                Some(_) = async {
                    match announcements.as_mut() {
                        Some(s) => s.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The signals waiting now are all answered by the same reload.
                    let mut received = 1;
                    if let Some(subscription) = announcements.as_mut() {
                        while received < SIGNALS_AT_ONCE
                            && let Some(Some(_)) = subscription.next().now_or_never()
                        {
                            received += 1;
                        }
                    }
                    taskfactory_runtime::metrics::record_definitions_signals(received);
                    signalled = true;
                    continue;
                }
                _ = tokio::time::sleep_until(signalled_reload_at), if signalled => {}
                _ = poll.tick() => {}
            }
            // A poll reloads too: it reads only what changed (nothing, mostly), and it finds a
            // change whose generation moved before its transaction committed (the sequence is
            // not transactional), which comparing generations alone would miss.
            // Whatever the cause, a reload that starts now answers every signal before it.
            signalled = false;
            last_reload = Some(tokio::time::Instant::now());
            if let Err(error) = self.reload(&pool).await {
                tracing::warn!(error = %error_chain(&error), "cannot reload definitions; will retry");
            }
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Tells every trigger replica that definitions changed (best effort: polling catches a miss).
pub async fn announce_change(nats: &async_nats::Client) {
    if let Err(error) = nats
        .publish(subjects::DEFINITIONS_CHANGED, bytes::Bytes::new())
        .await
    {
        tracing::debug!(error = %error_chain(&error), "could not announce definition change");
    }
}

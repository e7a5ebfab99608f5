//! Handling one TriggerEvent: record the run once, evaluate, spawn its tasks, then ack.
//!
//! The run id and task ids are derived from the fire, so whatever happens in between — a crash
//! mid-spawn, a redelivery, two orchestrators racing — the same trigger always means the same run
//! and the same tasks:
//!
//! 1. Run already recorded with every task published → ack (a duplicate delivery).
//! 2. Run recorded but spawning was interrupted → publish its tasks still `PENDING` again (JetStream
//!    drops the ones that made it inside the duplicate window) → mark spawned → ack.
//! 3. New run → load the pinned version → resolve context → evaluate templates → record the run,
//!    its context snapshot, its evaluation and all its tasks in one transaction → publish the tasks
//!    (`Nats-Msg-Id` = task id) → mark spawned → ack.
//!
//! Evaluation problems (bad data, a template that runs away) fail the run with the reason
//! recorded; they are not retried. Infrastructure problems (database, NATS) retry the trigger.
//!
//! Before any of that, the trigger must be a fire of the ledger: the trigger service records
//! every fire in `fires` before it publishes it (and the reconciler republishes only what is
//! recorded), so a message on `triggers.>` that is not, byte for byte, a recorded fire did not
//! come from it. Such a trigger is refused: dead-lettered once with the reason, counted
//! (`taskfactory_refused_messages_total{kind="trigger"}`), never a run, never retried. There is
//! no legitimate way for a trigger to arrive before its fire is committed, so a missing fire is
//! refused at once rather than waited for.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use chrono::Utc;
use futures::future::join_all;
use prost::Message as _;
use sqlx::PgPool;
use taskfactory_model::ids::{ActivityId, RunId, TaskId};
use taskfactory_model::plan::{self, PlanLimits, Scope};
use taskfactory_model::spec::{
    chrono_to_timestamp, proto_duration, std_duration, timestamp_to_chrono,
};
use taskfactory_model::status::source_name;
use taskfactory_model::{sizes, subjects, values};
use taskfactory_proto::v1::{
    ActivitySpec, FlowAdmission, OverlapPolicy, RunStatus, TaskInstance, TaskStatus, TriggerEvent,
    trigger,
};
use taskfactory_runtime::messaging::{self, Handler, Then, Unfinished};
use taskfactory_runtime::telemetry::error_chain;
use taskfactory_runtime::{metrics, propagation};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::completion;
use crate::store::{self, Admission, Ledger, NewRun, NewTask, RunState};

pub struct Spawner {
    pub pool: PgPool,
    /// Runs' bookkeeping marks (spawned, announced), written in group commit.
    pub marks: store::RunMarks,
    /// New runs and their tasks, written in group commit.
    pub runs: store::RunWriter,
    /// Trigger messages looked up in the fire ledger, many per statement.
    pub lookups: store::TriggerLookups,
    pub js: async_nats::jetstream::Context,
    pub limits: PlanLimits,
    pub ack_wait: Duration,
    /// Task publishes in flight at once.
    pub publish_window: usize,
    pub specs: crate::SpecCache,
    /// Resolves context sources.
    pub sources: Arc<crate::context::Sources>,
    /// Runs cancelled (by CANCEL_OTHER here): executors skip their tasks.
    pub cancelled_runs: async_nats::jetstream::kv::Store,
    /// The installation's key of result tokens (`model::results::result_token`).
    pub result_key: Arc<[u8]>,
    /// Bytes of task params the runs being spawned may hold together
    /// (`--evaluation-bytes-in-flight`): one permit per byte.
    pub evaluation_room: Arc<tokio::sync::Semaphore>,
    /// Its size in bytes.
    pub evaluation_bytes: usize,
    /// Bytes of trigger messages in hand at once (`--trigger-bytes-in-flight`): a trigger waits
    /// for room for its bytes before it is decoded, so large events queue instead of each
    /// holding its trees at once.
    pub trigger_room: messaging::ByteBudget,
    /// Bytes the context sources being resolved may hold together (`--source-bytes-in-flight`):
    /// a run (or a preview) takes room for what its sources may hold before it resolves them.
    /// Taken before the evaluation room, never while holding it, so the two cannot wait on each
    /// other.
    pub source_room: messaging::ByteBudget,
    /// Wakes the throttle timer ([`crate::throttle::run_timer`]) when a run is held by its
    /// throttle here.
    pub throttle_due: Arc<tokio::sync::Notify>,
    /// `--throttle-order-window`: how long a throttled run waits at least after its event came.
    pub throttle_window: Duration,
    /// Lets tasks held by their concurrency keys through ([`crate::task_gate`]).
    pub task_gate: crate::task_gate::TaskGate,
}

/// A run as evaluated: its row, its tasks, and (for a real run) its room in the evaluation budget.
type Evaluated = (
    NewRun,
    Vec<NewTask>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// Holds a run's room for just `bytes` (at least one), giving back the rest; never takes more.
fn keep_room(room: &mut tokio::sync::OwnedSemaphorePermit, bytes: usize) {
    let keep = bytes.max(1);
    if room.num_permits() > keep {
        drop(room.split(room.num_permits() - keep));
    }
}

/// Why handling a trigger did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("trigger message is not a TriggerEvent")]
    Decode(#[source] prost::DecodeError),
    #[error("trigger message is missing {0}")]
    Missing(&'static str),
    #[error("{0}")]
    UnknownActivity(String),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "trigger refused: the fire ledger has no fire of activity {activity} with dedupe key {dedupe_key:?}, so the trigger service did not publish it"
    )]
    NotInLedger {
        activity: ActivityId,
        dedupe_key: String,
    },
    #[error(
        "trigger refused: it is not the fire of activity {activity} with dedupe key {dedupe_key:?} that the fire ledger holds"
    )]
    DiffersFromLedger {
        activity: ActivityId,
        dedupe_key: String,
    },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Mark(#[from] store::MarkError),
    #[error("failed to announce the finished run")]
    Announce(#[from] completion::AnnounceError),
    #[error("failed to publish task {task_id}")]
    Publish {
        task_id: TaskId,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

impl Unfinished for SpawnError {
    /// The one place a spawn error picks what becomes of its trigger.
    fn then(&self) -> Then {
        match self {
            SpawnError::Decode(_)
            | SpawnError::Missing(_)
            | SpawnError::UnknownActivity(_)
            | SpawnError::Conflict(_) => Then::DeadLetter { refused: None },
            SpawnError::NotInLedger { .. } => Then::DeadLetter {
                refused: Some("not_in_ledger"),
            },
            SpawnError::DiffersFromLedger { .. } => Then::DeadLetter {
                refused: Some("differs_from_ledger"),
            },
            SpawnError::Database(_)
            | SpawnError::Mark(_)
            | SpawnError::Announce(_)
            | SpawnError::Publish { .. } => Then::Backoff,
        }
    }
}

impl Handler for Spawner {
    type Error = SpawnError;

    async fn handle(&self, message: &Message) -> Result<(), SpawnError> {
        // Long spawns keep the message alive so it is not redelivered while in hand.
        let _heartbeat = messaging::heartbeat(message, self.ack_wait / 3);
        let _room = self.trigger_room.room_for(message.payload.len()).await;
        self.process(message).await
    }
}

impl Spawner {
    /// Waits for room for the largest run the limits allow (`max_run_bytes`) and the `context`
    /// bytes its resolved sources hold, or the whole room when that is smaller: taken at once, so
    /// that no run holds part of its room while it waits for the rest.
    async fn room_for_a_run(&self, context: usize) -> tokio::sync::OwnedSemaphorePermit {
        let want = self.limits.max_run_bytes.saturating_add(context);
        let want = u32::try_from(want.clamp(1, self.evaluation_bytes)).unwrap_or(u32::MAX);
        self.evaluation_room
            .clone()
            .acquire_many_owned(want)
            .await
            .expect("the evaluation room is never closed")
    }

    async fn process(&self, message: &Message) -> Result<(), SpawnError> {
        let event = decode_trigger(message.payload.as_ref()).map_err(SpawnError::Decode)?;
        let activity_id: ActivityId = event
            .activity_id
            .parse()
            .map_err(|_| SpawnError::Missing("a valid activity_id"))?;
        if event.dedupe_key.is_empty() {
            return Err(SpawnError::Missing("a dedupe_key"));
        }
        // Its tasks' results go to `results.<activity name>.<run>`: without a name that is one
        // token, no result could ever be recorded and the run would never end.
        if event.activity_name.is_empty() {
            return Err(SpawnError::Missing("an activity_name"));
        }
        if let Some(problem) = subjects::result_subject_error(&event.activity_name, "run") {
            return Err(SpawnError::UnknownActivity(format!(
                "trigger refused: {problem}"
            )));
        }
        // Postgres text holds no NUL and the trigger scrubs every key it records, so no fire of
        // the ledger has such a key: refused without asking the database.
        if event.dedupe_key.contains('\0') {
            return Err(SpawnError::NotInLedger {
                activity: activity_id,
                dedupe_key: event.dedupe_key,
            });
        }
        let run_id = RunId::derive(activity_id, &event.dedupe_key);
        let (ledger, state) = self
            .lookups
            .get(store::TriggerKey {
                activity: activity_id,
                dedupe_key: event.dedupe_key.clone(),
                run: run_id,
                message: message.payload.clone(),
            })
            .await?;
        match ledger {
            Ledger::Recorded => {}
            Ledger::Missing => {
                return Err(SpawnError::NotInLedger {
                    activity: activity_id,
                    dedupe_key: event.dedupe_key,
                });
            }
            Ledger::Differs => {
                return Err(SpawnError::DiffersFromLedger {
                    activity: activity_id,
                    dedupe_key: event.dedupe_key,
                });
            }
        }
        let span = run_span(&event, run_id);
        let processed = self
            .process_run(message, &event, activity_id, run_id, state)
            .instrument(span.clone())
            .await;
        if processed.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        processed
    }

    /// The run of one trigger (of the ledger), in the run's span; `state` is its run as recorded.
    async fn process_run(
        &self,
        message: &Message,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        state: Option<RunState>,
    ) -> Result<(), SpawnError> {
        if let Some(state) = state {
            if state.status == RunStatus::RunPending {
                // Admitted by its overlap policy but not started (a crash in between): start it
                // now. A waiting run is started when the run before it finishes.
                if !state.waiting {
                    self.start_admitted_here(run_id).await?;
                }
                return Ok(());
            }
            if !state.spawn_complete {
                self.publish_pending(run_id).await?;
                self.marks.spawn_complete(run_id).await?;
                tracing::info!(run.id = %run_id, "resumed interrupted spawn");
            }
            if !state.announced {
                completion::announce_if_finished(&self.marks, &self.js, run_id).await?;
            }
            return Ok(());
        }

        if let Some(flow) = &event.flow
            && event.overlap() == OverlapPolicy::OverlapUnspecified
        {
            if let Some(throttle) = &flow.throttle {
                return self
                    .admit_throttled(
                        event,
                        (activity_id, run_id),
                        flow,
                        throttle,
                        message.payload.as_ref(),
                    )
                    .await;
            }
            if flow.concurrency_limit > 0 {
                return self
                    .admit_flow(event, activity_id, run_id, flow, message.payload.as_ref())
                    .await;
            }
        }
        let policy = self.overlap_policy(event, activity_id).await?;
        if !matches!(
            policy,
            OverlapPolicy::AllowAll | OverlapPolicy::OverlapUnspecified
        ) {
            return self
                .admit(event, activity_id, run_id, policy, message.payload.as_ref())
                .await;
        }

        // `room`: for what its tasks carry and its context, until they are recorded and published
        // (taken in the evaluation, before the context sources are resolved).
        let (new_run, tasks, room) = self.evaluate(event, activity_id, run_id).await?;
        let status = new_run.status;
        let activity_name = new_run.activity_name.clone();
        record_run_outcome(&new_run, tasks.len());
        let (inserted, tasks) = self.runs.insert(new_run, tasks).await?;
        if !inserted {
            // Another delivery recorded it first; continue from what it recorded (once: a run that
            // still is not there means the key belongs to some other run).
            let Some(state) = store::run_state(&self.pool, run_id).await? else {
                return Err(SpawnError::Conflict(format!(
                    "activity {activity_id} already has a run for dedupe key {:?}, and it is not run {run_id}",
                    event.dedupe_key
                )));
            };
            drop((room, tasks));
            return Box::pin(self.process_run(message, event, activity_id, run_id, Some(state)))
                .await;
        }
        tracing::info!(run.id = %run_id, activity.name = %activity_name, tasks = tasks.len(), status = ?status, "run recorded");
        if status == RunStatus::RunRunning {
            self.hand_over(tasks).await?;
            self.marks.spawn_complete(run_id).await?;
        } else {
            completion::announce_if_finished(&self.marks, &self.js, run_id).await?;
        }
        Ok(())
    }

    /// The overlap policy for this fire: the fire's override, else the activity's schedule's,
    /// else runs overlap freely.
    async fn overlap_policy(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
    ) -> Result<OverlapPolicy, SpawnError> {
        if event.overlap() != OverlapPolicy::OverlapUnspecified {
            return Ok(event.overlap());
        }
        let spec = match self
            .specs
            .get(&self.pool, activity_id, event.activity_version)
            .await?
        {
            Ok(spec) => spec,
            Err(reason) => return Err(SpawnError::UnknownActivity(reason)),
        };
        Ok(match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(trigger::Kind::Schedule(schedule)) => schedule.overlap(),
            _ => OverlapPolicy::AllowAll,
        })
    }

    /// Records the run as the overlap policy decides — start, wait or skip — and starts it when
    /// admitted. Runs cancelled by `CANCEL_OTHER` are announced as finished.
    async fn admit(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        policy: OverlapPolicy,
        encoded_event: &[u8],
    ) -> Result<(), SpawnError> {
        let header = run_header(event, activity_id, run_id);
        let (admission, cancelled) =
            store::admit_run(&self.pool, &header, policy, encoded_event).await?;
        for run in cancelled {
            tracing::info!(run.id = %run, by = %run_id, "run cancelled by overlap CANCEL_OTHER");
            // Its queued tasks are skipped and its attempts in flight stopped by the executors.
            if let Err(error) = self
                .cancelled_runs
                .put(
                    run.to_string(),
                    taskfactory_model::overlap::cancelled_by(run_id).into(),
                )
                .await
            {
                tracing::warn!(run.id = %run, error = %error, "cannot tell executors about the cancelled run; its queued tasks may still run");
            }
            completion::announce_if_finished(&self.marks, &self.js, run).await?;
        }
        match admission {
            Admission::Start => self.start_admitted_here(run_id).await,
            Admission::Buffered { behind } => {
                tracing::Span::current().record("run.admission", "buffered");
                taskfactory_runtime::metrics::count_occurrences(
                    &event.activity_name,
                    "BUFFERED",
                    1,
                );
                tracing::info!(run.id = %run_id, activity.name = %event.activity_name, behind = %behind, policy = policy.as_str_name(), "run buffered until the run before it finishes");
                Ok(())
            }
            Admission::Skipped { reason } => {
                tracing::Span::current().record("run.admission", "skipped");
                taskfactory_runtime::metrics::count_occurrences(
                    &event.activity_name,
                    "SKIPPED_OVERLAP",
                    1,
                );
                tracing::info!(run.id = %run_id, activity.name = %event.activity_name, %reason, "run skipped");
                Ok(())
            }
            Admission::AlreadyRecorded => self.admitted_before(event, activity_id, run_id).await,
        }
    }

    /// A run another delivery of its trigger admitted first: continues from what it recorded
    /// (starts it if it was admitted and not started). A run that is not there means the dedupe
    /// key belongs to some other run.
    pub(crate) async fn admitted_before(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
    ) -> Result<(), SpawnError> {
        if store::admitted_trigger_event(&self.pool, run_id)
            .await?
            .is_some()
        {
            self.start_admitted_here(run_id).await?;
        } else if store::run_state(&self.pool, run_id).await?.is_none() {
            return Err(SpawnError::Conflict(format!(
                "activity {activity_id} already has a run for dedupe key {:?}, and it is not run {run_id}",
                event.dedupe_key
            )));
        }
        Ok(())
    }

    /// Records a run of an activity with `flow.concurrency` as waiting under its key, and starts
    /// whatever there is room for now (this run, unless runs of a higher priority or an earlier
    /// fire wait before it). One that waits starts when a run of its key ends.
    async fn admit_flow(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        flow: &FlowAdmission,
        encoded_event: &[u8],
    ) -> Result<(), SpawnError> {
        let header = run_header(event, activity_id, run_id);
        let Some(started) = store::admit_flow_run(&self.pool, &header, flow, encoded_event).await?
        else {
            return self.admitted_before(event, activity_id, run_id).await;
        };
        if !started.contains(&run_id) {
            tracing::Span::current().record("run.admission", "queued");
            count_queued(event);
            tracing::info!(run.id = %run_id, activity.name = %event.activity_name, concurrency.key = %flow.concurrency_key, concurrency.limit = flow.concurrency_limit, priority = flow.priority, "run waits for room under its concurrency key");
        }
        for id in started {
            if id == run_id {
                self.start_admitted_here(id).await?;
            } else if let Err(error) = Box::pin(self.start_admitted(id)).await {
                // Admitted and recorded so: the sweeper starts it.
                tracing::warn!(run.id = %id, error = %error_chain(&error), "cannot start a run admitted under its concurrency key yet; the overlap sweeper will");
            }
        }
        Ok(())
    }

    /// Starts a run its overlap policy admitted: evaluates it as of now, records its tasks and
    /// publishes them. A run that ends at once (no tasks, evaluation failed) lets the next waiting
    /// run start.
    pub async fn start_admitted(&self, run_id: RunId) -> Result<(), SpawnError> {
        let Some(admitted) = store::admitted_trigger_event(&self.pool, run_id).await? else {
            return Ok(()); // started elsewhere meanwhile, or cancelled
        };
        let event = decode_trigger(admitted.event.as_slice()).map_err(SpawnError::Decode)?;
        // The run continues the trace of its fire, whoever starts it and whenever: the trace
        // shows the wait between the run's admission and this start, and says how long it was.
        let span = run_span(&event, run_id);
        span.record("run.admission", "started");
        span.record("run.waited_ms", admitted.waited_ms);
        propagation::set_parent(&span, propagation::parse_traceparent(&admitted.traceparent));
        self.start_admitted_event(run_id, event)
            .instrument(span)
            .await
    }

    /// [`Self::start_admitted`] from inside the run's own span (the trigger being processed).
    async fn start_admitted_here(&self, run_id: RunId) -> Result<(), SpawnError> {
        let Some(admitted) = store::admitted_trigger_event(&self.pool, run_id).await? else {
            return Ok(());
        };
        let event = decode_trigger(admitted.event.as_slice()).map_err(SpawnError::Decode)?;
        tracing::Span::current().record("run.admission", "started");
        self.start_admitted_event(run_id, event).await
    }

    async fn start_admitted_event(
        &self,
        run_id: RunId,
        event: TriggerEvent,
    ) -> Result<(), SpawnError> {
        let activity_id: ActivityId = event
            .activity_id
            .parse()
            .map_err(|_| SpawnError::Missing("a valid activity_id"))?;
        let (run, tasks, room) = match self.evaluate(&event, activity_id, run_id).await {
            Ok(evaluated) => evaluated,
            Err(SpawnError::UnknownActivity(reason)) => {
                let mut run = run_header(&event, activity_id, run_id);
                run.status = RunStatus::RunFailed;
                run.error = reason;
                (run, Vec::new(), None)
            }
            Err(other) => return Err(other),
        };
        if !store::fill_run(&self.pool, &run, &tasks).await? {
            return Ok(());
        }
        record_run_outcome(&run, tasks.len());
        tracing::info!(run.id = %run_id, activity.name = %run.activity_name, tasks = tasks.len(), status = ?run.status, "run started");
        // CANCEL_OTHER may have cancelled it in the moment since: then its tasks stay unpublished.
        let cancelled = store::run_state(&self.pool, run_id)
            .await?
            .is_some_and(|state| state.status == RunStatus::RunCancelled);
        if run.status == RunStatus::RunRunning && !cancelled {
            self.hand_over(tasks).await?;
            self.marks.spawn_complete(run_id).await?;
        } else {
            // The next run needs room of its own: never wait for it while holding this one's.
            drop(room);
            completion::announce_if_finished(&self.marks, &self.js, run_id).await?;
            // Admitted under its key only when no overlap override took it another way.
            let flow = event
                .flow
                .as_ref()
                .filter(|f| {
                    event.overlap() == OverlapPolicy::OverlapUnspecified && f.concurrency_limit > 0
                })
                .map(|f| (f.concurrency_key.clone(), f.concurrency_limit));
            Box::pin(self.start_next_for(activity_id, flow.as_ref())).await?;
        }
        Ok(())
    }

    /// A run finished: announce it, then start its activity's next buffered run. The one rule
    /// for every place a run ends (a result, a command, a deadline, a type nobody serves, a
    /// cancel). A next run that cannot start yet is left to the overlap sweeper; an
    /// announcement that fails is returned (the caller's redelivery or the completion sweeper
    /// announces it).
    pub async fn run_finished(&self, run: &store::CompletedRun) -> Result<(), SpawnError> {
        let announced = completion::announce(&self.marks, &self.js, run).await;
        // Whatever became of the announcement: not every caller is delivered again.
        if run.waiting_behind {
            self.start_next_or_leave(run.activity_id, run.flow.as_ref())
                .await;
        }
        Ok(announced?)
    }

    /// [`Spawner::run_finished`] for a run that may have finished: announced if it is finished
    /// and not announced yet; the activity's next buffered run started either way.
    pub async fn run_may_have_finished(
        &self,
        run: RunId,
        activity: ActivityId,
    ) -> Result<(), SpawnError> {
        let announced = completion::announce_if_finished(&self.marks, &self.js, run).await;
        let flow = match store::run_flow(&self.pool, run).await {
            Ok(flow) => flow,
            Err(error) => {
                tracing::warn!(run.id = %run, error = %error_chain(&error), "cannot read the run's concurrency key; the overlap sweeper will start what waits");
                None
            }
        };
        self.start_next_or_leave(activity, flow.as_ref()).await;
        Ok(announced?)
    }

    /// Starts the activity's next buffered run (under `flow.concurrency`: what its key has room
    /// for), or leaves it to the overlap sweeper.
    async fn start_next_or_leave(&self, activity: ActivityId, flow: Option<&(String, u32)>) {
        if let Err(error) = Box::pin(self.start_next_for(activity, flow)).await {
            tracing::warn!(activity.id = %activity, error = %error_chain(&error), "cannot start the next buffered run yet; the overlap sweeper will");
        }
    }

    /// [`Self::start_next`], or under `flow.concurrency` ([`Self::start_next_flow`]).
    async fn start_next_for(
        &self,
        activity: ActivityId,
        flow: Option<&(String, u32)>,
    ) -> Result<(), SpawnError> {
        match flow {
            Some((key, limit)) => self.start_next_flow(activity, key, *limit).await,
            None => self.start_next(activity).await,
        }
    }

    /// After a run of the key ended: starts what waits under it, as far as there is room.
    pub async fn start_next_flow(
        &self,
        activity: ActivityId,
        key: &str,
        limit: u32,
    ) -> Result<(), SpawnError> {
        for next in store::promote_flow(&self.pool, activity, key, limit).await? {
            tracing::info!(run.id = %next, activity.id = %activity, concurrency.key = %key, "starting a run that waited under its concurrency key");
            Box::pin(self.start_admitted(next)).await?;
        }
        Ok(())
    }

    /// After one of the activity's runs finished: starts its oldest waiting run, if nothing else
    /// of it is running.
    pub async fn start_next(&self, activity_id: ActivityId) -> Result<(), SpawnError> {
        while let Some(next) = store::promote_next(&self.pool, activity_id).await? {
            tracing::info!(run.id = %next, activity.id = %activity_id, "starting a buffered run");
            Box::pin(self.start_admitted(next)).await?;
        }
        Ok(())
    }

    /// Finishes overlap work an orchestrator left undone when it stopped mid-way.
    pub async fn resume_stalled(&self, older_than: Duration) -> Result<(), SpawnError> {
        let before = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
        let (activities, runs) = store::stalled_overlap_work(&self.pool, before).await?;
        // One stuck item must not hold up the others: log and go on.
        for run in runs {
            let resumed = async {
                match store::run_state(&self.pool, run).await? {
                    Some(state) if state.status == RunStatus::RunPending => {
                        self.start_admitted(run).await
                    }
                    Some(state)
                        if state.status == RunStatus::RunRunning && !state.spawn_complete =>
                    {
                        self.publish_pending(run).await?;
                        self.marks.spawn_complete(run).await?;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            };
            if let Err(error) = resumed.await {
                tracing::warn!(run.id = %run, error = %error_chain(&error), "cannot resume a run's start yet");
            }
        }
        for activity in activities {
            if let Err(error) = self.start_next(activity).await {
                tracing::warn!(activity.id = %activity, error = %error_chain(&error), "cannot start a buffered run yet");
            }
        }
        for (activity, key, limit) in store::stalled_flow_keys(&self.pool, before).await? {
            if let Err(error) = self.start_next_flow(activity, &key, limit).await {
                tracing::warn!(activity.id = %activity, concurrency.key = %key, error = %error_chain(&error), "cannot start a run waiting under its concurrency key yet");
            }
        }
        Ok(())
    }

    /// Loads the pinned spec, resolves context and evaluates the templates.
    async fn evaluate(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
    ) -> Result<
        (
            NewRun,
            Vec<NewTask>,
            Option<tokio::sync::OwnedSemaphorePermit>,
        ),
        SpawnError,
    > {
        let spec = match self
            .specs
            .get(&self.pool, activity_id, event.activity_version)
            .await?
        {
            Ok(spec) => spec,
            // The fire names a definition this database does not have (NATS and Postgres were
            // reset separately): there is nothing to record a run against.
            Err(reason) => return Err(SpawnError::UnknownActivity(reason)),
        };
        Ok(self
            .evaluate_sized(&spec, event, activity_id, run_id, Purpose::Run)
            .await)
    }

    /// Resolves the context and evaluates the templates of `spec` for `event` — the one path both
    /// real runs and previews take.
    pub async fn evaluate_spec(
        &self,
        spec: &ActivitySpec,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        purpose: Purpose,
    ) -> (NewRun, Vec<NewTask>) {
        let (run, tasks, _) = self
            .evaluate_sized(spec, event, activity_id, run_id, purpose)
            .await;
        (run, tasks)
    }

    /// [`Spawner::evaluate_spec`]; for a run, also its room in the evaluation budget, held for
    /// the bytes of params its tasks carry.
    async fn evaluate_sized(
        &self,
        spec: &ActivitySpec,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        purpose: Purpose,
    ) -> Evaluated {
        let (mut run, tasks, room) = self
            .evaluate_raw(spec, event, activity_id, run_id, purpose)
            .await;
        // What came from outside (an event's payload, a source's error) is stored too.
        if let Some(payload) = run.payload.as_mut() {
            values::make_storable_json(payload);
        }
        values::make_storable_json(&mut run.evaluation);
        values::make_storable_text(&mut run.error);
        values::make_storable_key(&mut run.dedupe_key);
        values::make_storable_text(&mut run.subject);
        (run, tasks, room)
    }

    async fn evaluate_raw(
        &self,
        spec: &ActivitySpec,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
        purpose: Purpose,
    ) -> Evaluated {
        let payload = event.payload.as_ref().map(values::value_to_json);
        let mut run = run_header(event, activity_id, run_id);
        let mut scope = Scope {
            trigger: trigger_scope(event),
            event: payload.unwrap_or_else(|| serde_json::json!({})),
            context: serde_json::json!({}),
            activity: serde_json::json!({
                "id": activity_id.to_string(),
                "name": event.activity_name,
                "version": event.activity_version,
            }),
        };
        let sources_scope = serde_json::json!({
            "event": scope.event,
            "trigger": scope.trigger,
            "activity": scope.activity,
        });
        // Room for what the sources may hold while they are resolved, taken before anything is
        // fetched (a slow source holds it while it answers: `timeout` bounds that), by runs and
        // previews alike; then, for a run, room for the largest run and the context while it is
        // evaluated; then only for what the run really holds. Runs queue rather than
        // overcommit, and runs with sources still resolve them side by side while others are
        // evaluated. (A preview gives up waiting at its deadline, `preview`.)
        let sources_room = self
            .source_room
            .room_for(self.sources.bytes_to_resolve(spec))
            .await;
        let resolved = self
            .sources
            .resolve(
                spec,
                &sources_scope,
                purpose == Purpose::Run,
                sources_room.num_permits(),
            )
            .await;
        // Templates see the context as it is stored, sensitive values included; the run keeps
        // only markers for those.
        let mut context = serde_json::Value::Object(resolved.context);
        values::make_storable_json(&mut context);
        let stored_context = crate::context::stored_form(&context, &resolved.sensitive);
        // Held from here on: the context twice while the templates are evaluated (theirs and the
        // stored form), the stored form until the run is recorded.
        let context_bytes = usize::try_from(sizes::json_bytes(&context)).unwrap_or(usize::MAX);
        let mut room = match purpose {
            Purpose::Run => Some(self.room_for_a_run(context_bytes.saturating_mul(2)).await),
            Purpose::Preview => None,
        };
        // The context is counted in the evaluation room from here on (a run's).
        drop(sources_room);
        let source_notes: Vec<serde_json::Value> = resolved
            .notes
            .iter()
            .map(taskfactory_proto::to_json)
            .collect();
        if let Some(error) = resolved.error {
            run.status = RunStatus::RunFailed;
            run.error = error;
            run.context = stored_context;
            run.evaluation = serde_json::Value::Array(source_notes);
            return (run, Vec::new(), None);
        }
        scope.context = context;
        // CPU work bounded by fuel and a deadline, off the async workers.
        let (owned_spec, limits) = (spec.clone(), self.limits);
        let evaluation = tracing::info_span!(
            "evaluate templates",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            evaluation.templates = spec.tasks.len(),
            evaluation.items = tracing::field::Empty,
            evaluation.tasks = tracing::field::Empty,
        );
        let in_evaluation = evaluation.clone();
        let plan = tokio::task::spawn_blocking(move || {
            in_evaluation.in_scope(|| plan::plan_tasks(&owned_spec, &scope, &limits))
        })
        .await
        .unwrap_or_else(|panic| plan::Plan {
            error: Some(format!("template evaluation failed: {panic}")),
            ..plan::Plan::default()
        });
        evaluation.record("evaluation.tasks", plan.tasks.len());
        evaluation.record(
            "evaluation.items",
            plan.evaluation
                .iter()
                .map(|e| u64::from(e.items))
                .sum::<u64>(),
        );
        if let Some(error) = &plan.error {
            evaluation.record("otel.status_code", "ERROR");
            evaluation.record("otel.status_description", error.as_str());
        }
        drop(evaluation);
        run.context = stored_context;
        run.evaluation = serde_json::Value::Array(
            source_notes
                .into_iter()
                .chain(plan.evaluation.iter().map(taskfactory_proto::to_json))
                .collect(),
        );
        if let Some(error) = plan.error {
            run.status = RunStatus::RunFailed;
            run.error = error;
            return (run, Vec::new(), None);
        }
        if plan.tasks.is_empty() {
            run.status = RunStatus::RunSucceeded;
        }
        if let Some(room) = room.as_mut() {
            keep_room(room, plan.bytes.saturating_add(context_bytes));
        }
        let created_at = Utc::now();
        let mut tasks = Vec::with_capacity(plan.tasks.len());
        for mut planned in plan.tasks {
            // Published as stored.
            values::make_storable_json(&mut planned.params);
            let id = TaskId::derive(run_id, &planned.template, planned.item_index);
            let instance = TaskInstance {
                task_id: id.to_string(),
                run_id: run_id.to_string(),
                activity_id: activity_id.to_string(),
                activity_version: event.activity_version,
                template: planned.template.clone(),
                r#type: planned.task_type.clone(),
                params: Some(values::json_to_struct(&planned.params)),
                retry: Some(planned.retry),
                timeout: Some(proto_duration(planned.timeout)),
                created_at: Some(chrono_to_timestamp(created_at)),
                activity_name: event.activity_name.clone(),
                item_index: planned.item_index,
                attempt_base: 0,
                result_token: taskfactory_model::results::result_token(&self.result_key, id.0),
                // As written in the spec, never rendered: the executor resolves them.
                secret_headers: spec
                    .tasks
                    .iter()
                    .find(|t| t.name == planned.template)
                    .map(|t| t.secret_headers.clone())
                    .unwrap_or_default(),
            };
            // Human tasks wait for CompleteTask; an explicit `timeout` is their deadline.
            let human = planned.task_type == HUMAN_TASK_TYPE;
            let deadline = human
                .then(|| {
                    spec.tasks
                        .iter()
                        .find(|t| t.name == planned.template)
                        .and_then(|t| t.timeout.as_ref())
                        .and_then(std_duration)
                        .and_then(|d| chrono::Duration::from_std(d).ok())
                        .map(|d| created_at + d)
                })
                .flatten();
            tasks.push(NewTask {
                id,
                template: planned.template,
                item_index: planned.item_index,
                task_type: planned.task_type,
                params: planned.params,
                instance: instance.encode_to_vec(),
                created_at,
                status: if human {
                    TaskStatus::Waiting
                } else {
                    TaskStatus::Pending
                },
                deadline,
                max_attempts: planned.retry.max_attempts,
                concurrency: planned
                    .concurrency
                    .map(|key| (key.scoped(&event.activity_id), key.limit)),
            });
        }
        (run, tasks, room)
    }

    /// Publishes the run's tasks still `PENDING` (a spawn interrupted), a page at a time: a run
    /// of any size is resumed in bounded memory; then asks the concurrency keys of its tasks to
    /// let through what they hold.
    async fn publish_pending(&self, run_id: RunId) -> Result<(), SpawnError> {
        let mut after = None;
        loop {
            let page = store::pending_instances(&self.pool, run_id, after, PENDING_PAGE).await?;
            let Some((_, last)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            let full = page.len() >= PENDING_PAGE;
            let page: Vec<_> = page.into_iter().map(|(task, _)| task).collect();
            self.publish_tasks(&page).await?;
            if !full {
                break;
            }
        }
        self.task_gate
            .ask_all(store::run_task_keys(&self.pool, run_id).await?);
        Ok(())
    }

    /// Hands a recorded run's tasks to executors: publishes those that go at once (all but
    /// human tasks and those held by a concurrency key; what they carry is moved, not copied),
    /// then asks the keys of the held ones to let them through.
    async fn hand_over(&self, tasks: Vec<NewTask>) -> Result<(), SpawnError> {
        let mut keys = std::collections::BTreeSet::new();
        let mut now = Vec::with_capacity(tasks.len());
        for task in tasks {
            if task.held() {
                if let Some((key, _)) = task.concurrency {
                    keys.insert(key);
                }
            } else if task.status == TaskStatus::Pending {
                now.push((task.id, task.task_type, task.instance));
            }
        }
        self.publish_tasks(&now).await?;
        self.task_gate.ask_all(keys);
        Ok(())
    }

    /// Publishes tasks concurrently (in bounded windows) and waits for every ack.
    async fn publish_tasks(&self, tasks: &[(TaskId, String, Vec<u8>)]) -> Result<(), SpawnError> {
        publish_task_messages(
            &self.js,
            self.publish_window,
            tasks.iter().map(|(id, task_type, instance)| {
                (*id, id.to_string(), task_type.as_str(), instance)
            }),
        )
        .await
    }
}

/// Publishes task messages, `(task, message id, type, TaskInstance bytes)`, `window` at a time
/// concurrently, and waits for every ack: a spawn's tasks, and tasks published again into a
/// `FACTORY_TASKS` declared again ([`crate::requeue`]).
pub async fn publish_task_messages<'a>(
    js: &async_nats::jetstream::Context,
    window: usize,
    tasks: impl IntoIterator<Item = (TaskId, String, &'a str, &'a Vec<u8>)>,
) -> Result<(), SpawnError> {
    let tasks: Vec<_> = tasks.into_iter().collect();
    for window in tasks.chunks(window.max(1)) {
        let mut acks = Vec::with_capacity(window.len());
        for (task_id, msg_id, task_type, instance) in window {
            let span = tracing::info_span!(
                "spawn task",
                otel.name = %format_args!("spawn {task_type}"),
                task.id = %task_id,
                task.type = %task_type,
            );
            let ack = messaging::publish(
                js,
                subjects::task_subject(task_type),
                msg_id,
                None,
                (*instance).clone().into(),
            )
            .instrument(span)
            .await
            .map_err(|source| SpawnError::Publish {
                task_id: *task_id,
                source,
            })?;
            acks.push((*task_id, ack));
        }
        let results = join_all(
            acks.into_iter()
                .map(|(id, ack)| async move { (id, ack.await) }),
        )
        .await;
        for (task_id, result) in results {
            result.map_err(|source| SpawnError::Publish { task_id, source })?;
        }
    }
    Ok(())
}

/// Why a spec is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A real run: recorded, published, counted in the metrics.
    Run,
    /// `PreviewRun`: nothing is written, published or counted.
    Preview,
}

pub use taskfactory_model::results::HUMAN_TASK_TYPE;

/// Tasks of an interrupted spawn read from the database at once, at most.
const PENDING_PAGE: usize = 500;

/// A trigger as the orchestrator works with it: decoded, and with NUL characters replaced in
/// whatever it stores (a forged trigger may carry them; the trigger service never does), before
/// any id is derived from its dedupe key or the key is looked up in the ledger (Postgres takes no
/// NUL in a parameter either).
fn decode_trigger(bytes: &[u8]) -> Result<TriggerEvent, prost::DecodeError> {
    let mut event = TriggerEvent::decode(bytes)?;
    make_storable_trigger(&mut event);
    Ok(event)
}

pub fn make_storable_trigger(event: &mut TriggerEvent) {
    values::make_storable_key(&mut event.dedupe_key);
    values::make_storable_text(&mut event.subject);
    values::make_storable_text(&mut event.activity_name);
    if let Some(payload) = event.payload.as_mut() {
        values::make_storable_value(payload);
    }
}

/// The run a fire makes, before evaluation (status RUNNING, nothing resolved yet).
pub(crate) fn run_header(event: &TriggerEvent, activity_id: ActivityId, run_id: RunId) -> NewRun {
    NewRun {
        id: run_id,
        activity_id,
        activity_name: event.activity_name.clone(),
        activity_version: event.activity_version,
        event_id: Uuid::parse_str(&event.event_id).unwrap_or(Uuid::nil()),
        source: source_name(event.source()).to_owned(),
        dedupe_key: event.dedupe_key.clone(),
        scheduled_for: event.scheduled_for.as_ref().and_then(timestamp_to_chrono),
        fired_at: event
            .fired_at
            .as_ref()
            .and_then(timestamp_to_chrono)
            .unwrap_or_else(Utc::now),
        subject: event.subject.clone(),
        payload: event.payload.as_ref().map(values::value_to_json),
        status: RunStatus::RunRunning,
        context: serde_json::json!({}),
        evaluation: serde_json::json!([]),
        error: String::new(),
        trace_id: propagation::current_trace_id().unwrap_or_default(),
        traceparent: propagation::current_traceparent().unwrap_or_default(),
    }
}

/// Counts an event's `QUEUED` decision (`taskfactory_event_decisions_total{decision="queued"}`):
/// its run waits under flow control. (The event was counted `fired` by the trigger.)
pub(crate) fn count_queued(event: &TriggerEvent) {
    if matches!(
        event.source(),
        taskfactory_proto::v1::TriggerSource::Event | taskfactory_proto::v1::TriggerSource::Webhook
    ) {
        metrics::count_event_decision(&event.activity_name, "queued");
    }
}

/// The span of one run: `run <activity>`, a child of its fire's span.
fn run_span(event: &TriggerEvent, run_id: RunId) -> tracing::Span {
    tracing::info_span!(
        "run",
        otel.name = %format_args!("run {}", event.activity_name),
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        run.id = %run_id,
        run.status = tracing::field::Empty,
        run.tasks = tracing::field::Empty,
        run.admission = tracing::field::Empty,
        run.waited_ms = tracing::field::Empty,
        activity.name = %event.activity_name,
        activity.id = %event.activity_id,
        activity.version = event.activity_version,
        fire.source = source_name(event.source()),
        fire.dedupe_key = %event.dedupe_key,
    )
}

/// What the run's evaluation decided, on the current (run) span.
fn record_run_outcome(run: &NewRun, tasks: usize) {
    let span = tracing::Span::current();
    span.record("run.status", run.status.as_str_name());
    span.record("run.tasks", tasks);
    if run.status == RunStatus::RunFailed {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", run.error.as_str());
    }
}

/// `trigger` as templates see it (snake_case, times in RFC 3339).
fn trigger_scope(event: &TriggerEvent) -> serde_json::Value {
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(timestamp_to_chrono)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    };
    serde_json::json!({
        "event_id": event.event_id,
        "activity_id": event.activity_id,
        "activity_name": event.activity_name,
        "activity_version": event.activity_version,
        "source": source_name(event.source()),
        "scheduled_for": time(&event.scheduled_for),
        "fired_at": time(&event.fired_at),
        "dedupe_key": event.dedupe_key,
        "subject": event.subject,
    })
}

/// Every `every`, finishes overlap work left undone (a run admitted but not started, a buffered run
/// whose predecessor finished while its orchestrator was stopping), until shutdown.
pub async fn run_overlap_sweeper(
    spawner: Arc<Spawner>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = spawner.resume_stalled(every * 2).await {
            tracing::warn!(error = %error_chain(&error), "cannot resume stalled overlap work; will retry");
        }
    }
}

//! Firing an activity: the outbox pattern.
//!
//! 1. The fire is written to Postgres, unique per `(activity, dedupe key)`; for schedules the
//!    watermark advances in the same transaction.
//! 2. The TriggerEvent is published to `triggers.<activity>` with
//!    `Nats-Msg-Id = <activity id>:<dedupe key>` and the fire is marked published.
//! 3. A fire that was recorded but not published (NATS down, crash in between), or published but
//!    never turned into a run, is republished by [`run_reconciler`].
//!
//! A repeated fire (same dedupe key) is recognised at step 1 and reported as a duplicate; the
//! run id is derived from the same key, so callers can name the run either way.
//!
//! Each fire is a span, `fire <activity>`: the root of the run's trace for schedules, a child of
//! the event's or the admin call's span otherwise. Its context travels with the TriggerEvent and
//! is stored with the fire, so a republished fire stays in the same trace.

use std::sync::Arc;
use std::time::Duration;
use taskfactory_runtime::telemetry::error_chain;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use prost::Message;
use sqlx::PgPool;
use taskfactory_model::ids::{ActivityId, FireId, RunId};
use taskfactory_model::spec::chrono_to_timestamp;
use taskfactory_model::status::source_name;
use taskfactory_model::{subjects, values};
use taskfactory_proto::v1::{OverlapPolicy, TriggerEvent, TriggerSource};
use taskfactory_runtime::{messaging, metrics};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::event_ledger::EventOrigin;
use crate::store::{self, NewFire, ScheduleWrite, StoreError};
use taskfactory_runtime::clock::ClockHandle;

/// What to fire.
#[derive(Clone, Debug)]
pub struct FireRequest {
    pub activity_id: ActivityId,
    pub activity_name: String,
    pub activity_version: u32,
    pub source: TriggerSource,
    pub dedupe_key: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Shared, not copied, by the fires of one event.
    pub payload: Option<Arc<serde_json::Value>>,
    /// For events: the subject the event arrived on.
    pub subject: String,
    /// When it fires (the scheduler's clock; the system clock elsewhere).
    pub fired_at: DateTime<Utc>,
    /// Schedules: the DST note of the occurrence.
    pub dst_note: Option<String>,
    /// An overlap policy overriding the activity's (manual fires, backfills).
    pub overlap: OverlapPolicy,
    /// Events: the event, whose decision is recorded with the fire.
    pub origin: Option<Arc<EventOrigin>>,
    /// Events of an activity with a rate limit: the limit and this event's key.
    pub rate_limit: Option<crate::flow::RateLimit>,
    /// An activity with `flow.concurrency`: how its run is admitted.
    pub flow: Option<taskfactory_proto::v1::FlowAdmission>,
}

/// What happened.
#[derive(Clone, Copy, Debug)]
pub struct Fired {
    pub fire_id: FireId,
    pub run_id: RunId,
    /// The dedupe key was seen before: nothing new was recorded.
    pub duplicate: bool,
}

/// Records and publishes one fire (for schedules: under the leader's fence, with the watermark and
/// the decisions before it). Once the fire is recorded the call succeeds even if publishing
/// fails: the reconciler publishes it later.
pub async fn fire(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    request: FireRequest,
    schedule: Option<ScheduleWrite<'_>>,
) -> Result<Fired, StoreError> {
    fire_via(Via::Alone { pool, js }, request, schedule, &mut None).await
}

/// [`fire`], recorded and published together with the other fires `batcher` has in hand.
pub async fn fire_batched(
    batcher: &FireBatcher,
    request: FireRequest,
    schedule: Option<ScheduleWrite<'_>>,
) -> Result<Fired, StoreError> {
    let mut held = None;
    fire_via(Via::Batched(batcher, false), request, schedule, &mut held).await
}

/// [`fire_batched`] for a fire recorded ahead of its time: the call returns once it is recorded,
/// with the fire in hand ([`Held`], for a new fire), to be published when it is due
/// ([`Held::publish`]) or taken back before that ([`store::withdraw_fire`]).
pub async fn fire_ahead(
    batcher: &FireBatcher,
    request: FireRequest,
    schedule: ScheduleWrite<'_>,
) -> Result<(Fired, Option<Held>), StoreError> {
    let mut held = None;
    let fired = fire_via(
        Via::Batched(batcher, true),
        request,
        Some(schedule),
        &mut held,
    )
    .await?;
    Ok((fired, held))
}

/// A fire recorded and not published yet ([`fire_ahead`]).
pub struct Held {
    job: Job,
    released: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl Held {
    pub fn id(&self) -> FireId {
        self.job.fire.id
    }

    /// Publishes the fire (with the other fires released meanwhile) and marks it published; the
    /// batcher does it, so this returns at once. A fire whose publish fails is left to the
    /// reconciler, like any other.
    pub fn publish(self) {
        if let Err(unsent) = self.released.send(self.job) {
            // The batcher is gone (the process is stopping): the reconciler publishes it.
            let fire = &unsent.0.fire;
            tracing::warn!(fire.id = %fire.id, activity.name = %fire.activity_name, "the trigger is stopping: a fire recorded ahead is left to the reconciler");
        }
    }
}

/// How a fire is recorded and published: alone, or in a batch (held after recording when
/// `true`).
#[derive(Clone, Copy)]
enum Via<'a> {
    Alone {
        pool: &'a PgPool,
        js: &'a async_nats::jetstream::Context,
    },
    Batched(&'a FireBatcher, bool),
}

async fn fire_via(
    via: Via<'_>,
    request: FireRequest,
    schedule: Option<ScheduleWrite<'_>>,
    held: &mut Option<Held>,
) -> Result<Fired, StoreError> {
    // Stored as it is published: Postgres takes no NUL character, and a unique key has a length
    // limit (the key is scrubbed, and a long one digested, before any id is derived from it, so a
    // repeat still dedupes).
    let mut request = request;
    values::make_storable_key(&mut request.dedupe_key);
    values::make_storable_text(&mut request.subject);
    if let Some(payload) = request.payload.as_mut()
        && !values::is_storable_json(payload)
    {
        values::make_storable_json(Arc::make_mut(payload));
    }
    let span = tracing::info_span!(
        "fire",
        otel.name = %format_args!("fire {}", request.activity_name),
        otel.status_code = tracing::field::Empty,
        activity.name = %request.activity_name,
        activity.id = %request.activity_id,
        activity.version = request.activity_version,
        fire.source = source_name(request.source),
        fire.dedupe_key = %request.dedupe_key,
        fire.duplicate = tracing::field::Empty,
        run.id = tracing::field::Empty,
    );
    if let Some(scheduled_for) = request.scheduled_for {
        let lateness = (request.fired_at - scheduled_for).num_milliseconds();
        span.set_attribute(
            "fire.scheduled_for",
            scheduled_for.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        span.set_attribute("fire.lateness_ms", lateness);
    }
    if let Some(note) = &request.dst_note {
        span.set_attribute("fire.dst_note", note.clone());
    }
    let fired = fire_in_span(via, request, schedule, &span, held)
        .instrument(span.clone())
        .await;
    match &fired {
        Ok(fired) => {
            span.record("fire.duplicate", fired.duplicate);
            span.record("run.id", tracing::field::display(fired.run_id));
        }
        Err(_) => {
            span.record("otel.status_code", "ERROR");
        }
    }
    fired
}

/// When a fire's event reached its stream, else when it was scheduled, else fired (ns since the
/// epoch): the order in which its run waits under flow control.
fn arrival_ns(request: &FireRequest, fired_at: DateTime<Utc>) -> i64 {
    match &request.origin {
        Some(origin) => origin.published_ns,
        None => request
            .scheduled_for
            .unwrap_or(fired_at)
            .timestamp_nanos_opt()
            .unwrap_or(i64::MAX),
    }
}

/// The fire `request` asks for, as it is recorded, its TriggerEvent encoded (its payload, origin
/// and rate limit are taken out of `request`).
pub(crate) fn prepare(request: &mut FireRequest) -> NewFire {
    let fire_id = FireId::derive(request.activity_id, &request.dedupe_key);
    let fired_at = request.fired_at;
    // Encoded at once: its `Struct` copy of the payload lives no longer than that.
    let encoded = TriggerEvent {
        event_id: fire_id.to_string(),
        activity_id: request.activity_id.to_string(),
        activity_version: request.activity_version,
        source: request.source as i32,
        scheduled_for: request.scheduled_for.map(chrono_to_timestamp),
        fired_at: Some(chrono_to_timestamp(fired_at)),
        dedupe_key: request.dedupe_key.clone(),
        payload: request.payload.as_deref().map(values::json_to_value),
        subject: request.subject.clone(),
        activity_name: request.activity_name.clone(),
        overlap: request.overlap as i32,
        // A gathered run's place was set when its first event came.
        flow: request.flow.clone().map(|mut flow| {
            if flow.arrival_ns == 0 {
                flow.arrival_ns = arrival_ns(request, fired_at);
            }
            flow
        }),
    }
    .encode_to_vec();
    NewFire {
        id: fire_id,
        activity_id: request.activity_id,
        activity_name: request.activity_name.clone(),
        activity_version: request.activity_version,
        source: source_name(request.source),
        dedupe_key: request.dedupe_key.clone(),
        scheduled_for: request.scheduled_for,
        fired_at,
        subject: request.subject.clone(),
        payload: request.payload.take(),
        event: encoded,
        dst_note: request.dst_note.clone(),
        traceparent: taskfactory_runtime::propagation::current_traceparent().unwrap_or_default(),
        origin: request.origin.take(),
        rate_limit: request.rate_limit.take(),
    }
}

/// Publishes fires recorded elsewhere (a batch or a burst, `buffers`), and marks those that made
/// it; the reconciler publishes the others.
pub(crate) async fn publish_recorded(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    fires: &[NewFire],
) {
    let mut published = Vec::with_capacity(fires.len());
    for fire in fires {
        match publish_fire(
            js,
            &fire.activity_name,
            fire.activity_id,
            &fire.dedupe_key,
            fire.event.clone(),
        )
        .await
        {
            Ok(()) => published.push((fire.id, Utc::now())),
            Err(error) => not_published(fire, &error),
        }
    }
    if !published.is_empty() {
        mark_published(pool, &published).await;
    }
}

async fn fire_in_span(
    via: Via<'_>,
    mut request: FireRequest,
    schedule: Option<ScheduleWrite<'_>>,
    span: &tracing::Span,
    held: &mut Option<Held>,
) -> Result<Fired, StoreError> {
    let fire_id = FireId::derive(request.activity_id, &request.dedupe_key);
    let run_id = RunId::derive(request.activity_id, &request.dedupe_key);
    let fired_at = request.fired_at;
    let new_fire = prepare(&mut request);
    let encoded = new_fire.event.clone();
    let inserted = match via {
        Via::Alone { pool, js } => {
            let inserted = store::record_fire(pool, &new_fire, schedule).await?;
            if inserted {
                let published = publish_fire(
                    js,
                    &request.activity_name,
                    request.activity_id,
                    &request.dedupe_key,
                    encoded,
                )
                .await;
                match published {
                    Ok(()) => mark_published(pool, &[(fire_id, Utc::now())]).await,
                    Err(error) => not_published(&new_fire, &error),
                }
            }
            inserted
        }
        Via::Batched(batcher, hold) => {
            let (inserted, kept) = batcher
                .record(new_fire, schedule.map(Scheduled::of), span.clone(), hold)
                .await?;
            *held = kept;
            inserted
        }
    };
    if !inserted {
        tracing::debug!(activity.id = %request.activity_id, dedupe_key = %request.dedupe_key, "duplicate fire");
        metrics::record_fire(
            &request.activity_name,
            source_name(request.source),
            "duplicate",
        );
        return Ok(Fired {
            fire_id,
            run_id,
            duplicate: true,
        });
    }
    tracing::info!(activity.name = %request.activity_name, fire.id = %fire_id, run.id = %run_id, source = source_name(request.source), scheduled_for = ?request.scheduled_for, "fired");
    metrics::record_fire(&request.activity_name, source_name(request.source), "fired");
    // Catch-up fires are the late ones an alert wants to see; backfills are late by request. A
    // fire held for its instant is observed when it is released (`scheduler::Writer::release`).
    if let (TriggerSource::Schedule | TriggerSource::Catchup, Some(scheduled_for), None) =
        (request.source, request.scheduled_for, held.as_ref())
    {
        metrics::record_fire_lateness(
            &request.activity_name,
            source_name(request.source),
            fired_at - scheduled_for,
        );
    }
    Ok(Fired {
        fire_id,
        run_id,
        duplicate: false,
    })
}

async fn mark_published(pool: &PgPool, fires: &[(FireId, DateTime<Utc>)]) {
    if let Err(error) = store::mark_all_published(pool, fires).await {
        tracing::warn!(fires = fires.len(), error = %error_chain(&error), "fires published but not marked; the reconciler will republish them (deduplicated)");
    }
}

fn not_published(fire: &NewFire, error: &(dyn std::error::Error + 'static)) {
    tracing::warn!(fire.id = %fire.id, activity.name = %fire.activity_name, error = %error_chain(error), "fire recorded but not published; the reconciler will publish it");
}

/// Fires in one batch at most.
const BATCH: usize = 512;

/// A scheduled fire's side of the write, owned (it waits in the batcher's queue).
struct Scheduled {
    term: store::Term,
    watermark: DateTime<Utc>,
    decisions: Vec<store::DecisionRow>,
    late_after: Option<DateTime<Utc>>,
}

impl Scheduled {
    fn of(write: ScheduleWrite<'_>) -> Self {
        Self {
            term: write.term,
            watermark: write.watermark,
            decisions: write.decisions.to_vec(),
            late_after: write.late_after.map(|(at, _)| at),
        }
    }
}

struct Job {
    fire: NewFire,
    schedule: Option<Scheduled>,
    /// The fire's span: its publish belongs to the fire's trace.
    span: tracing::Span,
    reply: Reply,
}

/// Who hears of a fire's outcome, and when.
enum Reply {
    /// Once it is recorded, published and marked.
    Published(tokio::sync::oneshot::Sender<Result<bool, StoreError>>),
    /// Once it is recorded, with the fire in hand when it is new ([`fire_ahead`]).
    Recorded(tokio::sync::oneshot::Sender<(Result<bool, StoreError>, Option<Held>)>),
    /// Nobody: a held fire released ([`Held::publish`]).
    Nobody,
}

/// Group commit of fires: whatever fires wait when a batch begins (at most [`BATCH`]) are
/// recorded in one transaction ([`store::record_fires`]), then published together, then marked
/// published in one statement; each caller hears of its own fire once that is done. The steps
/// are stages that overlap: while one batch is published, the next is recorded, and acks are
/// awaited while earlier batches are marked (a slow mark delays publishing only once
/// [`MARKING`] batches wait for it). One fire's
/// failure never holds back the others: a batch whose transaction fails is recorded again one
/// fire at a time, so each gets its own outcome. Stops when every handle is dropped, after the
/// fires in hand.
#[derive(Clone)]
pub struct FireBatcher {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl FireBatcher {
    /// Starts the batch writer; lateness is judged on `clock`.
    pub fn start(
        pool: PgPool,
        js: async_nats::jetstream::Context,
        clock: ClockHandle,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (jobs, queue) = tokio::sync::mpsc::unbounded_channel();
        let (released, due) = tokio::sync::mpsc::unbounded_channel();
        tracker.spawn(write_batches(pool, js, clock, queue, due, released));
        Self { jobs }
    }

    /// Records the fire; then, unless `hold`, publishes and marks it. Returns whether it was new,
    /// and when held, the new fire in hand.
    async fn record(
        &self,
        fire: NewFire,
        schedule: Option<Scheduled>,
        span: tracing::Span,
        hold: bool,
    ) -> Result<(bool, Option<Held>), StoreError> {
        let closed = || StoreError::Database(sqlx::Error::PoolClosed);
        let mut job = Job {
            fire,
            schedule,
            span,
            reply: Reply::Nobody,
        };
        if hold {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            job.reply = Reply::Recorded(reply);
            self.jobs.send(job).map_err(|_| closed())?;
            let (inserted, held) = outcome.await.map_err(|_| closed())?;
            return Ok((inserted?, held));
        }
        let (reply, outcome) = tokio::sync::oneshot::channel();
        job.reply = Reply::Published(reply);
        self.jobs.send(job).map_err(|_| closed())?;
        Ok((outcome.await.unwrap_or_else(|_| Err(closed()))?, None))
    }
}

async fn write_batches(
    pool: PgPool,
    js: async_nats::jetstream::Context,
    clock: ClockHandle,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Job>,
    mut due: tokio::sync::mpsc::UnboundedReceiver<Job>,
    released: tokio::sync::mpsc::UnboundedSender<Job>,
) {
    // Four stages that overlap, so a fire that comes due while a batch is on its way waits for
    // the recording stage only, not for the whole cycle: batch k+1 is recorded while batch k is
    // published, batch k-1's acks are awaited, and the batches before it are marked.
    let (to_publish, mut recorded) = tokio::sync::mpsc::channel::<Batch>(STAGED);
    let (to_confirm, mut sent) = tokio::sync::mpsc::channel::<Sent>(STAGED);
    let record = {
        let pool = pool.clone();
        async move {
            // Up to RECORDING batches are recorded at once, each in its own transaction, and
            // handed on in the order they were taken. One schedule never has two fires in
            // flight (its writer waits for each), and each batch writes in key order, so two
            // batches never wait on each other in a cycle. Each recording is a task of its own:
            // it goes on to its commit while this loop waits to hand a batch on (an open
            // transaction left waiting would hold its locks and its connection meanwhile).
            let mut recording = futures::stream::FuturesOrdered::new();
            let mut open = true;
            while open || !recording.is_empty() {
                tokio::select! {
                    biased;
                    Some(recorded) = recording.next(), if !recording.is_empty() => {
                        // A recording that panicked dropped its callers' replies: they hear
                        // of a failure and try again.
                        let Ok(mut batch): Result<Batch, _> = recorded else { continue };
                        // Held fires are answered now and published when released.
                        batch.answer_held(&released);
                        if batch.jobs.is_empty() {
                            continue;
                        }
                        if to_publish.send(batch).await.is_err() {
                            return;
                        }
                    }
                    taken = take_batch(&mut queue), if open && recording.len() < RECORDING => {
                        let Some(mut jobs) = taken else {
                            open = false;
                            continue;
                        };
                        jobs.sort_by(|a, b| {
                            (a.fire.activity_id.0, &a.fire.dedupe_key)
                                .cmp(&(b.fire.activity_id.0, &b.fire.dedupe_key))
                        });
                        let (pool, clock) = (pool.clone(), clock.clone());
                        recording.push_back(tokio::spawn(async move {
                            let began = std::time::Instant::now();
                            let outcomes = record_batch(&pool, &clock, &jobs).await;
                            tracing::debug!(fires = jobs.len(), took = ?began.elapsed(), "fire batch recorded");
                            Batch { jobs, outcomes }
                        }));
                    }
                }
            }
        }
    };
    // The record stage's own handle on `released` goes with it, so the publish stage ends once
    // the batcher and every held fire are gone.
    let publish = async move {
        let (mut recorded_open, mut due_open) = (true, true);
        let mut came_due = Vec::new();
        while recorded_open || due_open {
            // Fires coming due first: they were recorded ahead to be on time, and a flood of
            // new batches (a restart's catch-up) must not hold them back.
            let batch = tokio::select! {
                biased;
                taken = due.recv_many(&mut came_due, BATCH), if due_open => {
                    if taken == 0 {
                        due_open = false;
                        continue;
                    }
                    let jobs: Vec<Job> = std::mem::take(&mut came_due);
                    let outcomes = jobs.iter().map(|_| Ok(true)).collect();
                    Batch { jobs, outcomes }
                }
                batch = recorded.recv(), if recorded_open => match batch {
                    Some(batch) => batch,
                    None => {
                        recorded_open = false;
                        continue;
                    }
                },
            };
            // Every publish is sent, then the next stage awaits the acks.
            let mut acks = Vec::new();
            for (index, (job, outcome)) in batch.jobs.iter().zip(&batch.outcomes).enumerate() {
                if !matches!(outcome, Ok(true)) {
                    continue;
                }
                let fire = &job.fire;
                let sent = messaging::publish(
                    &js,
                    subjects::trigger_subject(&fire.activity_name),
                    &subjects::trigger_msg_id(&fire.activity_id.to_string(), &fire.dedupe_key),
                    None,
                    fire.event.clone().into(),
                )
                .instrument(job.span.clone())
                .await;
                match sent {
                    Ok(ack) => acks.push((index, ack)),
                    Err(error) => not_published(fire, &error),
                }
            }
            if to_confirm.send(Sent { batch, acks }).await.is_err() {
                break;
            }
        }
    };
    // Acks are awaited as they come, each fire stamped with the instant its ack came, and handed
    // to the marking stage at once: marking (an UPDATE and a commit, slower as `fires` grows)
    // holds back the publishes behind it only once it lags by MARKING batches (up to MARKING
    // more are in its hands). Fires acked but not marked yet are safe: the reconciler would
    // publish them again (deduplicated by their message id) only after `--reconcile-interval`.
    let (to_mark, mut acked) = tokio::sync::mpsc::channel::<Acked>(MARKING);
    let confirm = async move {
        while let Some(Sent { batch, acks }) = sent.recv().await {
            let began = std::time::Instant::now();
            let mut published = Vec::with_capacity(acks.len());
            for (index, ack) in acks {
                let fire = &batch.jobs[index].fire;
                match ack.await {
                    Ok(_) => published.push((fire.id, Utc::now())),
                    Err(error) => not_published(fire, &error),
                }
            }
            tracing::debug!(fires = published.len(), took = ?began.elapsed(), "fire batch acked");
            if to_mark.send(Acked { batch, published }).await.is_err() {
                break;
            }
        }
    };
    let mark = async move {
        let mut waiting = Vec::new();
        // Every batch acked by now is marked published in one statement (each fire with the
        // instant its ack came), then its callers are answered.
        while acked.recv_many(&mut waiting, MARKING).await > 0 {
            let published: Vec<(FireId, DateTime<Utc>)> = waiting
                .iter()
                .flat_map(|acked| acked.published.iter().copied())
                .collect();
            let began = std::time::Instant::now();
            mark_published(&pool, &published).await;
            tracing::debug!(fires = published.len(), batches = waiting.len(), took = ?began.elapsed(), "fires marked published");
            for Acked { batch, .. } in waiting.drain(..) {
                for (job, outcome) in batch.jobs.into_iter().zip(batch.outcomes) {
                    if let Reply::Published(reply) = job.reply {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    };
    tokio::join!(record, publish, confirm, mark);
}

/// Batches between two stages of [`write_batches`], at most.
const STAGED: usize = 2;

/// Batches recorded at once (each in a transaction of its own).
const RECORDING: usize = 2;

/// Batches acked and waiting to be marked published, at most (the marking stage holds up to as
/// many more, marked together in one statement).
const MARKING: usize = 64;

/// The fires waiting, at most [`BATCH`]; `None` once every handle is gone and none wait.
async fn take_batch(queue: &mut tokio::sync::mpsc::UnboundedReceiver<Job>) -> Option<Vec<Job>> {
    // Grown as jobs come (a batch of one is the usual case at a low rate).
    let mut jobs = Vec::new();
    (queue.recv_many(&mut jobs, BATCH).await > 0).then_some(jobs)
}

/// A batch recorded: each job's outcome.
struct Batch {
    jobs: Vec<Job>,
    outcomes: Vec<Result<bool, StoreError>>,
}

impl Batch {
    /// Answers the held fires and takes them out of the batch: each new one goes back to its
    /// caller in hand, to be released into `released` when it is due.
    fn answer_held(&mut self, released: &tokio::sync::mpsc::UnboundedSender<Job>) {
        if !self
            .jobs
            .iter()
            .any(|job| matches!(job.reply, Reply::Recorded(_)))
        {
            return;
        }
        let jobs = std::mem::take(&mut self.jobs);
        let outcomes = std::mem::take(&mut self.outcomes);
        for (mut job, outcome) in jobs.into_iter().zip(outcomes) {
            if !matches!(job.reply, Reply::Recorded(_)) {
                self.jobs.push(job);
                self.outcomes.push(outcome);
                continue;
            }
            let Reply::Recorded(reply) = std::mem::replace(&mut job.reply, Reply::Nobody) else {
                unreachable!("matched above");
            };
            let held = matches!(outcome, Ok(true)).then(|| Held {
                job,
                released: released.clone(),
            });
            let _ = reply.send((outcome, held));
        }
    }
}

/// A batch whose acks came: the fires published, each with the instant its ack came.
struct Acked {
    batch: Batch,
    published: Vec<(FireId, DateTime<Utc>)>,
}

/// A batch whose publishes are sent: the acks to await, by job.
struct Sent {
    batch: Batch,
    acks: Vec<(usize, async_nats::jetstream::context::PublishAckFuture)>,
}

/// Records a batch in one transaction, or, when that fails, each fire on its own.
async fn record_batch(
    pool: &PgPool,
    clock: &ClockHandle,
    jobs: &[Job],
) -> Vec<Result<bool, StoreError>> {
    let writes: Vec<store::FireWrite<'_>> = jobs
        .iter()
        .map(|job| store::FireWrite {
            fire: &job.fire,
            schedule: job.schedule.as_ref().map(|s| ScheduleWrite {
                term: s.term,
                watermark: s.watermark,
                decisions: &s.decisions,
                late_after: s.late_after.map(|at| (at, clock)),
            }),
        })
        .collect();
    match store::record_fires(pool, &writes).await {
        Ok(outcomes) => return outcomes,
        Err(error) if jobs.len() == 1 => return vec![Err(error)],
        Err(StoreError::Deposed { term }) => {
            return jobs
                .iter()
                .map(|_| Err(StoreError::Deposed { term }))
                .collect();
        }
        Err(StoreError::Database(error))
            if let Some(each) = taskfactory_runtime::db::batch_failed(&error, jobs.len()) =>
        {
            return each
                .into_iter()
                .map(|error| Err(StoreError::Database(error)))
                .collect();
        }
        Err(error) => {
            tracing::warn!(fires = jobs.len(), error = %error_chain(&error), "a batch of fires was refused for some fire's data; recording them one at a time");
        }
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    for write in writes {
        outcomes.push(match store::record_fires(pool, &[write]).await {
            Ok(mut outcome) => outcome.pop().unwrap_or(Ok(false)),
            Err(error) => Err(error),
        });
    }
    outcomes
}

async fn publish_fire(
    js: &async_nats::jetstream::Context,
    activity_name: &str,
    activity_id: ActivityId,
    dedupe_key: &str,
    encoded: Vec<u8>,
) -> Result<(), async_nats::jetstream::context::PublishError> {
    messaging::publish_confirmed(
        js,
        subjects::trigger_subject(activity_name),
        &subjects::trigger_msg_id(&activity_id.to_string(), dedupe_key),
        None,
        encoded.into(),
    )
    .await
    .map(|_duplicate| ())
}

/// Republishes fires that did not make it (see the module docs) until shutdown.
pub async fn run_reconciler(
    pool: PgPool,
    js: async_nats::jetstream::Context,
    clock: ClockHandle,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first pass of a leadership term (the reconciler runs with the scheduler) publishes at
    // once the scheduled fires whose instant has passed: a leader that died left the fires it
    // had recorded ahead, and its successor comes at least a lease later, past their instants.
    let mut taking_over = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Utc::now();
        let older_than = now - chrono::Duration::from_std(every).unwrap_or_default();
        // A scheduled fire recorded ahead of its instant is never published before it, whatever
        // the two clocks say (the scheduler's may be driven).
        let scheduler_now = clock.now();
        let due_by = std::mem::take(&mut taking_over).then_some(scheduler_now);
        let pending =
            match store::fires_to_republish(&pool, older_than, now, scheduler_now, due_by, 500)
                .await
            {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "reconciler cannot read fires");
                    continue;
                }
            };
        for fire in pending {
            if shutdown.is_cancelled() {
                return;
            }
            let span = tracing::info_span!(
                "republish fire",
                otel.name = %format_args!("republish fire {}", fire.activity_name),
                activity.name = %fire.activity_name,
                fire.id = %fire.id,
            );
            taskfactory_runtime::propagation::set_parent(
                &span,
                taskfactory_runtime::propagation::parse_traceparent(&fire.traceparent),
            );
            let published = publish_fire(
                &js,
                &fire.activity_name,
                fire.activity_id,
                &fire.dedupe_key,
                fire.event,
            )
            .instrument(span)
            .await;
            match published {
                Ok(()) => {
                    tracing::info!(fire.id = %fire.id, activity.name = %fire.activity_name, "republished fire");
                    if let Err(error) = store::mark_republished(&pool, fire.id).await {
                        tracing::warn!(fire.id = %fire.id, error = %error_chain(&error), "could not mark republished fire");
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "reconciler cannot publish; will retry");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewFire;

    fn job(key: &str, reply: Reply) -> Job {
        let activity_id = ActivityId(uuid::Uuid::nil());
        Job {
            fire: NewFire {
                id: FireId::derive(activity_id, key),
                activity_id,
                activity_name: "a".to_owned(),
                activity_version: 1,
                source: "schedule",
                dedupe_key: key.to_owned(),
                scheduled_for: None,
                fired_at: Utc::now(),
                subject: String::new(),
                payload: None,
                event: Vec::new(),
                dst_note: None,
                traceparent: String::new(),
                origin: None,
                rate_limit: None,
            },
            schedule: None,
            span: tracing::Span::none(),
            reply,
        }
    }

    #[test]
    fn held_fires_are_answered_at_once_and_the_others_stay_in_the_batch_with_their_callers() {
        let (released, mut came_due) = tokio::sync::mpsc::unbounded_channel();
        let (published, mut published_outcome) = tokio::sync::oneshot::channel();
        let (held_new, mut held_new_outcome) = tokio::sync::oneshot::channel();
        let (held_old, mut held_old_outcome) = tokio::sync::oneshot::channel();
        let mut batch = Batch {
            jobs: vec![
                job("published", Reply::Published(published)),
                job("held new", Reply::Recorded(held_new)),
                job("held duplicate", Reply::Recorded(held_old)),
            ],
            outcomes: vec![Ok(true), Ok(true), Ok(false)],
        };
        batch.answer_held(&released);

        // The fire published with its batch keeps its caller, who hears once it is marked.
        assert_eq!(batch.jobs.len(), 1);
        assert_eq!(batch.jobs[0].fire.dedupe_key, "published");
        assert!(matches!(batch.jobs[0].reply, Reply::Published(_)));
        assert!(matches!(batch.outcomes[..], [Ok(true)]));
        assert!(matches!(
            published_outcome.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ));

        // A new held fire comes back in hand, and goes to the publish stage when released.
        let (inserted, held) = held_new_outcome.try_recv().expect("answered at once");
        assert!(matches!(inserted, Ok(true)));
        let held = held.expect("a new fire is held");
        assert_eq!(
            held.id(),
            FireId::derive(ActivityId(uuid::Uuid::nil()), "held new")
        );
        held.publish();
        let released = came_due.try_recv().expect("released");
        assert_eq!(released.fire.dedupe_key, "held new");
        assert!(matches!(released.reply, Reply::Nobody));

        // A fire recorded before is a duplicate: nothing to hold.
        let (inserted, held) = held_old_outcome.try_recv().expect("answered at once");
        assert!(matches!(inserted, Ok(false)));
        assert!(held.is_none());
    }
}

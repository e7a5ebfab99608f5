//! Consuming `results.>`: each TaskResult moves its task forward (the first terminal result wins;
//! later ones are kept as attempts), counts toward its run, and finishes and announces the run
//! when its last task is done.
//!
//! Anyone who can publish on `results.>` can send a result, so each is checked against its task
//! ([`taskfactory_model::results::judge`]): a result for a human task (only `CompleteTask`
//! completes one), one naming another task type, run or activity, or an attempt its series never
//! handed out is refused — dead-lettered once to `dlq.results` with the reason, logged, counted
//! (`taskfactory_refused_messages_total{kind="result"}`), and nothing about the task changes. So
//! is a result for a task that does not exist (`unknown_task`).
//!
//! A result the database refuses for its data is dead-lettered as it was sent, and its task takes
//! the attempt all the same, with an error naming the refusal
//! ([`taskfactory_model::results::unstorable_status`]): a final one ends the task and its run.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use async_nats::jetstream::Message;
use prost::Message as _;
use sqlx::PgPool;
use taskfactory_model::ids::TaskId;
use taskfactory_model::results::{self, Claim, Refusal, is_result_status};
use taskfactory_model::spec::timestamp_to_chrono;
use taskfactory_model::{subjects, values};
use taskfactory_proto::v1::{TaskResult, TaskStatus};
use taskfactory_runtime::db;
use taskfactory_runtime::finished_tasks;
use taskfactory_runtime::messaging::{Handler, Then, Unfinished};
use taskfactory_runtime::telemetry::error_chain;

use crate::store::{self, Recorded, ResultRecord};

pub struct ResultSink {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    /// Starts the next buffered run of an activity when one of its runs finishes.
    pub spawner: Arc<crate::spawn::Spawner>,
    /// Records results in batches per run.
    pub batcher: Batcher,
    /// Finished tasks, for executors: written before a final result is acked.
    pub finished_tasks: async_nats::jetstream::kv::Store,
}

/// One result waiting to be recorded, and who waits for the outcome.
struct Queued {
    /// The run the result names (the batch transaction finds the real one; this only groups).
    run: String,
    record: ResultRecord,
    reply: oneshot::Sender<Result<Recorded, sqlx::Error>>,
}

/// Records results (and running reports: an executor's start record) in batches, across runs:
/// whatever results are waiting when a transaction is free are recorded together in one
/// transaction ([`store::record_results`]), so a burst of runs' starts and results takes one
/// commit, not one each. Nothing waits to fill a batch: a lone result is recorded at once;
/// batches form while earlier ones commit. The one exception is a start report, which nobody
/// waits on (the executor waits for the stream's ack, not for this record), unless another start
/// report of its run already waits: it waits about [`START_LINGER`] (the timer counts whole
/// milliseconds) for its run's next report, so that a short task's start and end share one
/// transaction instead of the end waiting behind the start's; any batch taken meanwhile takes it
/// along. The results of a run whose batch is being recorded wait for it and go in the next one
/// (no two transactions of this orchestrator queue on one run's lock, and a run's results are
/// recorded in the order they came).
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Queued>,
}

/// Results in one batch, at most (a run's results that waited for its previous batch may add a
/// few).
const MAX_BATCH: usize = 512;

/// How long a start report waits for its run's next result before it is recorded alone.
pub const START_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

impl Batcher {
    /// Starts the batching task; `transactions` bounds the batch transactions at once. The task
    /// ends once every `Batcher` is dropped and what was queued is recorded.
    pub fn start(pool: PgPool, transactions: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(MAX_BATCH);
        let task = tokio::spawn(run_batches(pool, receiver, transactions.max(1)));
        (Self { queue }, task)
    }

    /// Records one result as part of the next batch.
    pub async fn record(&self, run: String, record: ResultRecord) -> Result<Recorded, sqlx::Error> {
        let (reply, outcome) = oneshot::channel();
        let gone = || sqlx::Error::PoolClosed;
        self.queue
            .send(Queued { run, record, reply })
            .await
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

/// What is waiting to be recorded: results ready for the next batch, in the order they came;
/// start reports lingering (of runs with no batch being recorded), in the order they came, each
/// until its deadline; and the results of runs with a batch being recorded, which wait for it.
/// A run has one start report lingering at most, and it came after all of its run's ready
/// results (anything of the run that arrives after it makes it ready first).
#[derive(Default)]
struct Waiting {
    ready: Vec<Queued>,
    lingering: std::collections::VecDeque<(Instant, Queued)>,
    /// Runs with a batch being recorded, and their results that came meanwhile.
    busy: HashMap<String, Vec<Queued>>,
}

impl Waiting {
    fn arrive(&mut self, queued: Queued, now: Instant) {
        if let Some(waiting) = self.busy.get_mut(&queued.run) {
            waiting.push(queued);
            return;
        }
        // At most one start report of a run lingers.
        let lingering = self.lingering.iter().position(|(_, q)| q.run == queued.run);
        // A start report waits for company unless one of its run already waits: a second start
        // (a fan-out) would only make the first batch of its run begin later.
        if queued.record.status == TaskStatus::Running && lingering.is_none() {
            self.lingering.push_back((now + START_LINGER, queued));
            return;
        }
        // The run's start report that lingers came first: it goes first.
        if let Some((_, start)) = lingering.and_then(|at| self.lingering.remove(at)) {
            self.ready.push(start);
        }
        self.ready.push(queued);
    }

    /// Start reports whose wait is over are ready.
    fn linger_over(&mut self, now: Instant) {
        while self.lingering.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, queued)) = self.lingering.pop_front() {
                self.ready.push(queued);
            }
        }
    }

    /// When the first lingering start report's wait is over.
    fn next_due(&self) -> Option<Instant> {
        self.lingering.front().map(|(due, _)| *due)
    }

    /// Everything waiting but the busy runs' results.
    fn held(&self) -> usize {
        self.ready.len() + self.lingering.len()
    }

    /// A run's batch is over: its results that waited are ready.
    fn finished(&mut self, run: &str) {
        if let Some(waiting) = self.busy.remove(run) {
            self.ready.extend(waiting);
        }
    }

    /// Takes what is ready as the next batch, with the start reports that linger (the same one
    /// transaction either way; they came after their runs' ready results); its runs are busy
    /// until [`Waiting::finished`].
    fn take_batch(&mut self) -> (Vec<Queued>, Vec<String>) {
        let mut batch = std::mem::take(&mut self.ready);
        batch.extend(self.lingering.drain(..).map(|(_, queued)| queued));
        let mut runs: Vec<String> = batch.iter().map(|q| q.run.clone()).collect();
        runs.sort_unstable();
        runs.dedup();
        for run in &runs {
            self.busy.insert(run.clone(), Vec::new());
        }
        (batch, runs)
    }

    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.lingering.is_empty() && self.busy.is_empty()
    }
}

/// Takes results as they come and records what is ready whenever a transaction is free.
async fn run_batches(pool: PgPool, mut receiver: mpsc::Receiver<Queued>, transactions: usize) {
    let permits = Arc::new(Semaphore::new(transactions));
    let batches = TaskTracker::new();
    let (done, mut finished) = mpsc::unbounded_channel::<Vec<String>>();
    let mut waiting = Waiting::default();
    let mut open = true;
    while open || !waiting.is_empty() {
        let due = waiting.next_due();
        tokio::select! {
            biased;
            Some(runs) = finished.recv() => {
                for run in &runs {
                    waiting.finished(run);
                }
            }
            next = receiver.recv(), if open && waiting.held() < MAX_BATCH => {
                let Some(first) = next else {
                    open = false;
                    // Nothing more is coming for them.
                    waiting.linger_over(Instant::now() + START_LINGER);
                    continue;
                };
                waiting.arrive(first, Instant::now());
                while waiting.held() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(next) => waiting.arrive(next, Instant::now()),
                        Err(_) => break,
                    }
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                waiting.linger_over(Instant::now());
            }
            // Also when the start reports that linger fill a batch: nothing more is taken in
            // until they are recorded.
            permit = permits.clone().acquire_owned(),
                if !waiting.ready.is_empty() || waiting.held() >= MAX_BATCH => {
                let Ok(permit) = permit else {
                    return;
                };
                let (batch, runs) = waiting.take_batch();
                // Said when the batch is over however it ends, so its runs' next results never
                // wait for a batch that is gone.
                let finished = Finished(Some((runs, done.clone())));
                batches.spawn(record_batch(pool.clone(), batch, permit, finished));
            }
        }
    }
    batches.close();
    batches.wait().await;
}

/// Tells the batcher, when dropped, that a batch of these runs is over.
struct Finished(Option<(Vec<String>, mpsc::UnboundedSender<Vec<String>>)>);

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some((runs, done)) = self.0.take() {
            let _ = done.send(runs);
        }
    }
}

/// Records one batch in one transaction. If that fails, each result is recorded on its own, so
/// one result the database refuses cannot hold back the others.
async fn record_batch(
    pool: PgPool,
    batch: Vec<Queued>,
    _permit: OwnedSemaphorePermit,
    _finished: Finished,
) {
    let (records, replies): (Vec<ResultRecord>, Vec<_>) =
        batch.into_iter().map(|q| (q.record, q.reply)).unzip();
    taskfactory_runtime::metrics::record_result_batch(records.len());
    let outcomes: Vec<Result<Recorded, sqlx::Error>> = match store::record_results(&pool, &records)
        .await
    {
        Ok(recorded) => recorded.into_iter().map(Ok).collect(),
        Err(error) if records.len() == 1 => vec![Err(error)],
        Err(error) if let Some(each) = db::batch_failed(&error, records.len()) => {
            each.into_iter().map(Err).collect()
        }
        Err(error) => {
            tracing::debug!(results = records.len(), error = %error_chain(&error), "batch refused for some result's data; recording its results one by one");
            let mut one_by_one = Vec::with_capacity(records.len());
            for record in &records {
                one_by_one.push(store::record_result(&pool, record).await);
            }
            one_by_one
        }
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

/// Why a result was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// Not a result at all: dead-lettered.
    #[error("{0}")]
    Undecodable(String),
    /// No such task (nothing this system made, or made and since deleted): dead-lettered once
    /// and counted, like a refusal.
    #[error("result for task {0} refused: no such task")]
    UnknownTask(TaskId),
    /// Refused by its task ([`taskfactory_model::results::judge`]): dead-lettered and counted.
    #[error("result for task {task} refused: {refusal}")]
    Refused { task: TaskId, refusal: Refusal },
    /// The database refuses its data, and would every time: dead-lettered (its task took the
    /// attempt in its place, with the reason: [`ResultSink::record_unstorable`]).
    #[error("{0}")]
    Unstorable(String),
    /// The database or NATS: delivered again.
    #[error("{0}")]
    Transient(String),
}

impl Unfinished for ResultError {
    fn then(&self) -> Then {
        match self {
            ResultError::Undecodable(_) => Then::DeadLetter { refused: None },
            ResultError::Refused { refusal, .. } => Then::DeadLetter {
                refused: Some(refusal.reason()),
            },
            ResultError::UnknownTask(_) => Then::DeadLetter {
                refused: Some("unknown_task"),
            },
            ResultError::Unstorable(_) => Then::DeadLetter {
                refused: Some("unstorable"),
            },
            ResultError::Transient(_) => Then::Backoff,
        }
    }
}

impl Handler for ResultSink {
    type Error = ResultError;

    async fn handle(&self, message: &Message) -> Result<(), ResultError> {
        let result = TaskResult::decode(message.payload.as_ref())
            .map_err(|error| ResultError::Undecodable(format!("not a TaskResult: {error}")))?;
        self.process(result).await
    }
}

impl ResultSink {
    /// Records a decoded result (from `results.>`, or made of a dead-lettered task).
    pub(crate) async fn process(&self, result: TaskResult) -> Result<(), ResultError> {
        let Ok(task_id) = result.task_id.parse::<TaskId>() else {
            return Err(ResultError::Undecodable(format!(
                "task_id {:?} is not a task id",
                result.task_id
            )));
        };
        let status = result.status();
        if !is_result_status(status) {
            return Err(ResultError::Undecodable(format!(
                "status {} is not a result status",
                status.as_str_name()
            )));
        }
        let span = tracing::info_span!(
            "record result",
            otel.name = %format_args!("record result {}", result.r#type),
            otel.status_code = tracing::field::Empty,
            task.id = %task_id,
            task.type = %result.r#type,
            task.attempt = result.attempt,
            task.status = status.as_str_name(),
            run.id = %result.run_id,
            executor.name = %result.executor,
        );
        let recorded = self
            .record(result, task_id, status)
            .instrument(span.clone())
            .await;
        if recorded.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        recorded
    }

    /// Records a decoded result; announces the run when it was the last.
    async fn record(
        &self,
        result: TaskResult,
        task_id: TaskId,
        status: TaskStatus,
    ) -> Result<(), ResultError> {
        let mut record = self.record_of(&result, task_id);
        record.make_storable();
        match self.batcher.record(result.run_id.clone(), record).await {
            Ok(recorded) => self.settle(&result, task_id, status, recorded).await,
            Err(error) => self.record_unstorable(&result, task_id, error).await,
        }
    }

    /// What is recorded of a result.
    fn record_of(&self, result: &TaskResult, task_id: TaskId) -> ResultRecord {
        ResultRecord {
            execution: result.execution.clone(),
            task_id,
            attempt: result.attempt,
            status: result.status(),
            error: result.error.clone(),
            output: result.output.as_ref().map(values::value_to_json),
            executor: result.executor.clone(),
            started_at: result.started_at.as_ref().and_then(timestamp_to_chrono),
            finished_at: result.finished_at.as_ref().and_then(timestamp_to_chrono),
            claim: Some(Claim {
                token_valid: taskfactory_model::results::verify_result_token(
                    &self.spawner.result_key,
                    task_id.0,
                    &result.result_token,
                ),
                task_type: result.r#type.clone(),
                run_id: result.run_id.clone(),
                activity_id: result.activity_id.clone(),
            }),
        }
    }

    /// Carries out what recording a result (recorded as `status`) did: executors told a final
    /// task is finished, the run announced when it was the last, the next buffered run started.
    async fn settle(
        &self,
        result: &TaskResult,
        task_id: TaskId,
        status: TaskStatus,
        recorded: Recorded,
    ) -> Result<(), ResultError> {
        match recorded {
            Recorded::UnknownTask => Err(ResultError::UnknownTask(task_id)),
            Recorded::Refused(refusal) => Err(ResultError::Refused {
                task: task_id,
                refusal,
            }),
            Recorded::AlreadyFinal => {
                tracing::debug!(task.id = %task_id, attempt = result.attempt, "late result kept as an attempt");
                // Possibly the redelivery of the result that decided the task, whose entry was not
                // written the first time.
                self.remember_finished(task_id, &result.r#type, status, result.attempt)
                    .await?;
                // A redelivery after the run finished but before it was announced lands here.
                self.retry_announcement(result).await
            }
            Recorded::Applied(completed, freed) => {
                if let Some(key) = freed {
                    self.spawner.task_gate.ask(key);
                }
                // Neither waits for the other (the announcement is on the path of every run's
                // completion, the entry a round trip to NATS): both are done before the ack,
                // and a redelivery repairs whichever failed (it is `AlreadyFinal` then).
                let announce = async {
                    match &completed {
                        Some(run) => self.spawner.run_finished(run).await,
                        None => Ok(()),
                    }
                };
                let (remembered, announced) = tokio::join!(
                    self.remember_finished(task_id, &result.r#type, status, result.attempt),
                    announce
                );
                remembered?;
                if let (Some(run), Err(error)) = (&completed, announced) {
                    tracing::warn!(run.id = %run.id, error = %error_chain(&error), "run finished but not announced; will retry");
                    // The result is recorded; the redelivery finds the run unannounced.
                    return self.retry_announcement(result).await;
                }
                Ok(())
            }
        }
    }

    /// A result that could not be recorded. It was recorded on its own (a batch that fails is
    /// recorded one by one), so a refusal of its data ([`db::input_refused_by_database`]) meets
    /// it every time: in its place, the task takes the attempt as
    /// [`results::unstorable_status`] says, with an error naming the refusal, and the result is
    /// dead-lettered as it was sent. Without that, a final result's task would wait for ever: its
    /// executor marked it finished, so it never runs again. Anything else is retried.
    async fn record_unstorable(
        &self,
        result: &TaskResult,
        task_id: TaskId,
        error: sqlx::Error,
    ) -> Result<(), ResultError> {
        let why = format!(
            "cannot record the result of task {task_id}: {}",
            error_chain(&error)
        );
        let Some(refused) = db::input_refused_by_database(&error) else {
            return Err(ResultError::Transient(why));
        };
        let why = format!(
            "{why} (SQLSTATE {}: refused for this result's data)",
            refused.code
        );
        let status = result.status();
        let Some(instead) = results::unstorable_status(status) else {
            return Err(ResultError::Unstorable(why));
        };
        let mut record = ResultRecord {
            status: instead,
            error: results::unstorable_error(
                status,
                result.attempt,
                &refused.code,
                &refused.message,
            ),
            output: None,
            executor: results::unstorable_executor(&result.executor),
            ..self.record_of(result, task_id)
        };
        record.make_storable();
        match self.batcher.record(result.run_id.clone(), record).await {
            Ok(recorded) => {
                self.settle(result, task_id, instead, recorded).await?;
                Err(ResultError::Unstorable(format!(
                    "{why}; the task took attempt {} as {} with the reason",
                    result.attempt,
                    instead.as_str_name()
                )))
            }
            Err(error) => match db::input_refused_by_database(&error) {
                Some(again) => {
                    tracing::error!(task.id = %task_id, error = %error_chain(&error), "the reason a result could not be stored cannot be stored either; the task does not change");
                    Err(ResultError::Unstorable(format!(
                        "{why}; nor its reason (SQLSTATE {}): the task does not change",
                        again.code
                    )))
                }
                None => Err(ResultError::Transient(format!(
                    "cannot record the reason the result of task {task_id} could not be stored: {}",
                    error_chain(&error)
                ))),
            },
        }
    }

    /// Tells executors the task is finished (the finished-tasks bucket): a message of the task
    /// that comes back is then never run again. Awaited before the result is acked, so neither
    /// a crash nor a NATS failure loses it: the result is delivered again (it is then
    /// [`Recorded::AlreadyFinal`], which writes it too). The value only ever grows.
    ///
    /// The executor that reported the result wrote the entry already, before settling its task
    /// message ([`taskfactory_runtime::finished_tasks`]), so this usually reads it and writes
    /// nothing. It stays as the repair: an executor that crashed between its result and the
    /// entry, an external executor that does not write it, a dead letter made into a result.
    ///
    /// `task_type` is the result's, which [`results::judge`] held to the task's own.
    async fn remember_finished(
        &self,
        task_id: TaskId,
        task_type: &str,
        status: TaskStatus,
        attempt: u32,
    ) -> Result<(), ResultError> {
        if !taskfactory_model::status::task_is_terminal(status) {
            return Ok(());
        }
        let key = subjects::finished_task_key(&task_id.to_string(), task_type);
        finished_tasks::raise(&self.finished_tasks, &key, attempt, false)
            .await
            .map_err(|error| {
                ResultError::Transient(format!(
                    "task {task_id} is recorded finished but executors cannot be told yet: {error}"
                ))
            })
    }

    async fn retry_announcement(&self, result: &TaskResult) -> Result<(), ResultError> {
        let (Ok(run), Ok(activity)) = (result.run_id.parse(), result.activity_id.parse()) else {
            return Ok(());
        };
        // The run that finished may have buffered runs behind it.
        self.spawner
            .run_may_have_finished(run, activity)
            .await
            .map_err(|error| {
                ResultError::Transient(format!(
                    "cannot announce the finished run {run}: {}",
                    error_chain(&error)
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(run: &str, status: TaskStatus, label: &str) -> Queued {
        let (reply, _) = oneshot::channel();
        Queued {
            run: run.to_owned(),
            record: ResultRecord {
                task_id: TaskId(uuid::Uuid::new_v4()),
                attempt: 1,
                status,
                error: label.to_owned(),
                output: None,
                executor: String::new(),
                started_at: None,
                finished_at: None,
                execution: String::new(),
                claim: None,
            },
            reply,
        }
    }

    fn labels(batch: &[Queued]) -> Vec<&str> {
        batch.iter().map(|q| q.record.error.as_str()).collect()
    }

    #[test]
    fn a_start_report_waits_for_its_runs_next_result_and_goes_first() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.arrive(queued("a", TaskStatus::Running, "a start"), now);
        waiting.arrive(queued("b", TaskStatus::Running, "b start"), now);
        assert!(waiting.ready.is_empty(), "start reports wait");
        assert_eq!(waiting.next_due(), Some(now + START_LINGER));
        waiting.arrive(queued("a", TaskStatus::Succeeded, "a end"), now);
        assert_eq!(labels(&waiting.ready), ["a start", "a end"]);
        assert_eq!(waiting.lingering.len(), 1, "b's start still waits");
        assert_eq!(waiting.held(), 3);
    }

    #[test]
    fn a_second_start_report_of_a_run_ends_the_wait_of_the_first() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.arrive(queued("a", TaskStatus::Running, "a first start"), now);
        waiting.arrive(queued("b", TaskStatus::Running, "b start"), now);
        waiting.arrive(queued("a", TaskStatus::Running, "a second start"), now);
        assert_eq!(labels(&waiting.ready), ["a first start", "a second start"]);
        assert_eq!(waiting.lingering.len(), 1, "b's start still waits");
    }

    #[test]
    fn a_start_after_its_runs_ready_results_waits_and_goes_after_them() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.arrive(queued("a", TaskStatus::Running, "a start"), now);
        waiting.arrive(queued("a", TaskStatus::Succeeded, "a end"), now);
        waiting.arrive(queued("a", TaskStatus::Running, "a next start"), now);
        assert_eq!(labels(&waiting.ready), ["a start", "a end"]);
        let (batch, _) = waiting.take_batch();
        assert_eq!(labels(&batch), ["a start", "a end", "a next start"]);
    }

    #[test]
    fn a_start_report_is_ready_once_its_wait_is_over() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.arrive(queued("a", TaskStatus::Running, "a start"), now);
        waiting.linger_over(now + START_LINGER / 2);
        assert!(waiting.ready.is_empty());
        waiting.arrive(
            queued("b", TaskStatus::Running, "b start"),
            now + START_LINGER / 2,
        );
        waiting.linger_over(now + START_LINGER);
        assert_eq!(labels(&waiting.ready), ["a start"]);
        assert_eq!(waiting.next_due(), Some(now + START_LINGER * 3 / 2));
    }

    #[test]
    fn a_batch_takes_the_lingering_start_reports_along_after_what_was_ready() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.arrive(queued("a", TaskStatus::Running, "a start"), now);
        waiting.arrive(queued("b", TaskStatus::Succeeded, "b end"), now);
        waiting.arrive(queued("c", TaskStatus::Running, "c start"), now);
        let (batch, runs) = waiting.take_batch();
        assert_eq!(labels(&batch), ["b end", "a start", "c start"]);
        assert_eq!(runs, ["a", "b", "c"]);
        assert!(waiting.lingering.is_empty());
        // While a's batch is recorded, its start reports wait with its results, in order.
        waiting.arrive(queued("a", TaskStatus::Running, "a third start"), now);
        waiting.arrive(queued("a", TaskStatus::Succeeded, "a end"), now);
        assert!(waiting.ready.is_empty() && waiting.lingering.is_empty());
        waiting.finished("a");
        assert_eq!(labels(&waiting.ready), ["a third start", "a end"]);
        assert!(!waiting.is_empty());
    }
}

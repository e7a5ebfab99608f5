//! Task concurrency (`tasks[].concurrency`), the orchestrator's side: tasks under a concurrency
//! key are recorded held (state and rules in [`crate::store`]'s task gate module) and handed to
//! executors here, as their key has room. Whoever may have made room asks the gate
//! ([`TaskGate::ask`]): a spawn that recorded held tasks, a result that ended a task, a cancel.
//! The gate lets the keys' next tasks through in one transaction for all the keys asked
//! meanwhile, publishes them in their runs' traces, and notes them published. Its sweep, every
//! [`SWEEP_EVERY`], lets through what a key with room still holds (nobody asked: an orchestrator
//! stopped, or a task ended another way), and publishes again what was let through and not
//! noted published (an orchestrator stopped in between; the stream drops a copy it has).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use taskfactory_model::ids::TaskId;
use taskfactory_model::subjects;
use taskfactory_runtime::telemetry::error_chain;
use taskfactory_runtime::{messaging, propagation};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::spawn::Spawner;
use crate::store::{self, LetThrough};

/// Keys asked and not yet looked at, at most: one asked beyond it is found by the sweep.
const ASKED_AT_MOST: usize = 10_000;

/// Keys let through in one transaction, at most.
const KEYS_AT_ONCE: usize = 500;

/// Tasks published at once.
const PUBLISHING_AT_ONCE: usize = 64;

/// How often the sweep looks for keys nobody asked and tasks not noted published.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// How long a key holds tasks, or a task let through waits to be noted published, before the
/// sweep takes it: long enough that it is not the work of an orchestrator still at it.
const SWEEP_AFTER: Duration = Duration::from_secs(5);

/// Keys holding tasks the sweep looks at each time (the next look goes on from the last).
const SWEEP_BATCH: i64 = 1000;

/// Where keys that may have room are asked to let their next tasks through.
#[derive(Clone)]
pub struct TaskGate {
    asks: mpsc::Sender<String>,
}

impl TaskGate {
    /// The gate and what its loop ([`run`]) reads.
    pub fn new() -> (Self, mpsc::Receiver<String>) {
        let (asks, asked) = mpsc::channel(ASKED_AT_MOST);
        (Self { asks }, asked)
    }

    /// Asks `key` to let its next tasks through. Never waits: when the gate has too much asked
    /// already, the sweep finds the key.
    pub fn ask(&self, key: String) {
        let _ = self.asks.try_send(key);
    }

    /// Asks every key of `keys`.
    pub fn ask_all(&self, keys: impl IntoIterator<Item = String>) {
        for key in keys {
            self.ask(key);
        }
    }
}

/// The gate's loop: lets through what the keys asked have room for, and sweeps every
/// [`SWEEP_EVERY`]. Every orchestrator runs one; a key's lock lets one through at a time.
pub async fn run(
    spawner: Arc<Spawner>,
    mut asked: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut swept = Instant::now();
    // Where the sweep's look over the keys holding tasks goes on from.
    let mut cursor: Option<String> = None;
    loop {
        let mut keys = BTreeSet::new();
        let wait = SWEEP_EVERY.saturating_sub(swept.elapsed());
        tokio::select! {
            () = shutdown.cancelled() => return,
            key = asked.recv() => match key {
                Some(key) => {
                    keys.insert(key);
                }
                None => return,
            },
            () = tokio::time::sleep(wait) => {}
        }
        while keys.len() < KEYS_AT_ONCE {
            match asked.try_recv() {
                Ok(key) => {
                    keys.insert(key);
                }
                Err(_) => break,
            }
        }
        if swept.elapsed() >= SWEEP_EVERY {
            swept = Instant::now();
            sweep(&spawner, &mut keys, &mut cursor).await;
        }
        let keys: Vec<String> = keys.into_iter().collect();
        for chunk in keys.chunks(KEYS_AT_ONCE) {
            match store::let_through(&spawner.pool, chunk).await {
                Ok((tasks, full)) => {
                    // As many as one call lets through: some keys may have room left.
                    if full {
                        spawner.task_gate.ask_all(chunk.iter().cloned());
                    }
                    publish(&spawner, tasks).await;
                }
                Err(error) => {
                    tracing::warn!(keys = chunk.len(), error = %error_chain(&error), "cannot let tasks through their concurrency keys yet; the sweep will");
                }
            }
        }
    }
}

/// Adds the keys nobody asked to `keys`, and publishes again the tasks let through and not noted
/// published.
async fn sweep(spawner: &Spawner, keys: &mut BTreeSet<String>, cursor: &mut Option<String>) {
    match store::stalled_keys(&spawner.pool, SWEEP_AFTER, cursor.as_deref(), SWEEP_BATCH).await {
        Ok((stalled, last)) => {
            *cursor = last;
            if !stalled.is_empty() {
                tracing::debug!(
                    keys = stalled.len(),
                    "concurrency keys with room that nobody asked; letting their tasks through"
                );
            }
            keys.extend(stalled);
        }
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "cannot look for concurrency keys holding tasks; will retry");
        }
    }
    let at_once = i64::try_from(store::LET_THROUGH_AT_ONCE).unwrap_or(i64::MAX);
    match store::unpublished(&spawner.pool, SWEEP_AFTER, at_once).await {
        Ok(tasks) if tasks.is_empty() => {}
        Ok(tasks) => {
            tracing::warn!(
                tasks = tasks.len(),
                "tasks let through by their concurrency keys were not noted published; publishing them again"
            );
            publish(spawner, tasks).await;
        }
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "cannot look for tasks let through and not published; will retry");
        }
    }
}

/// Publishes the tasks let through, each in its run's trace, and notes those the stream took.
/// One that fails stays due, and the sweep publishes it again.
async fn publish(spawner: &Spawner, tasks: Vec<LetThrough>) {
    if tasks.is_empty() {
        return;
    }
    let published: Vec<TaskId> = futures::stream::iter(tasks)
        .map(|task| async move {
            let span = tracing::info_span!(
                "hand over task",
                otel.name = %format_args!("hand over {}", task.task_type),
                task.id = %task.task,
                task.type = %task.task_type,
                task.held_ms = u64::try_from(task.held_for.as_millis()).unwrap_or(u64::MAX),
            );
            propagation::set_parent(&span, propagation::parse_traceparent(&task.traceparent));
            let sent = messaging::publish_confirmed(
                &spawner.js,
                subjects::task_subject(&task.task_type),
                &task.message_id,
                None,
                task.instance.into(),
            )
            .instrument(span)
            .await;
            match sent {
                Ok(_) => Some(task.task),
                Err(error) => {
                    tracing::warn!(task.id = %task.task, error = %error_chain(&error), "cannot publish a task its concurrency key let through; will retry");
                    None
                }
            }
        })
        .buffer_unordered(PUBLISHING_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    if let Err(error) = store::mark_published(&spawner.pool, &published).await {
        tracing::warn!(error = %error_chain(&error), "cannot note tasks published; the sweep publishes them again (the stream drops the copies)");
    }
}

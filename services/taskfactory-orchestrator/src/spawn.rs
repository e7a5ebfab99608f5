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

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use chrono::Utc;
use futures::future::join_all;
use prost::Message as _;
use sqlx::PgPool;
use taskfactory_model::ids::{ActivityId, RunId, TaskId};
use taskfactory_model::plan::{self, PlanLimits, Scope};
use taskfactory_model::spec::{chrono_to_timestamp, proto_duration, timestamp_to_chrono};
use taskfactory_model::status::source_name;
use taskfactory_model::{subjects, values};
use taskfactory_proto::v1::{ActivitySpec, RunStatus, TaskInstance, TriggerEvent, context_source};
use taskfactory_runtime::messaging::{self, Disposition};
use taskfactory_runtime::telemetry::error_chain;
use uuid::Uuid;

use crate::completion;
use crate::store::{self, NewRun, NewTask};

pub struct Spawner {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub limits: PlanLimits,
    pub ack_wait: Duration,
    /// Task publishes in flight at once.
    pub publish_window: usize,
    pub specs: crate::SpecCache,
}

/// Why handling a trigger did not finish.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    #[error("trigger message is not a TriggerEvent")]
    Decode(#[source] prost::DecodeError),
    #[error("trigger message is missing {0}")]
    Missing(&'static str),
    #[error("{0}")]
    UnknownActivity(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("failed to announce the finished run")]
    Announce(#[from] completion::AnnounceError),
    #[error("failed to publish task {task_id}")]
    Publish {
        task_id: TaskId,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

impl SpawnError {
    /// The one place a spawn error picks its ack.
    fn disposition(&self) -> Disposition {
        match self {
            SpawnError::Decode(_) | SpawnError::Missing(_) | SpawnError::UnknownActivity(_) => {
                Disposition::Term
            }
            SpawnError::Database(_) | SpawnError::Announce(_) | SpawnError::Publish { .. } => {
                Disposition::Retry(Duration::from_secs(2))
            }
        }
    }
}

impl Spawner {
    pub async fn handle(self: Arc<Self>, message: Message) {
        // Long spawns keep the message alive so it is not redelivered while in hand.
        let heartbeat = messaging::heartbeat(&message, self.ack_wait / 3);
        let outcome = self.process(&message).await;
        drop(heartbeat);
        let disposition = match outcome {
            Ok(()) => Disposition::Ack,
            Err(error) => {
                let disposition = error.disposition();
                if disposition == Disposition::Term {
                    tracing::error!(subject = %message.subject, error = %error_chain(&error), "trigger cannot be processed; dead-lettered");
                    if let Err(e) = messaging::dead_letter(
                        &self.js,
                        subjects::TRIGGERS_DLQ_SUBJECT.to_owned(),
                        &message,
                        &error.to_string(),
                    )
                    .await
                    {
                        tracing::warn!(error = %error_chain(&e), "could not dead-letter trigger; it will be redelivered");
                        messaging::settle(&message, Disposition::Retry(Duration::from_secs(5)))
                            .await;
                        return;
                    }
                } else {
                    tracing::warn!(subject = %message.subject, error = %error_chain(&error), "trigger not processed; will retry");
                }
                disposition
            }
        };
        messaging::settle(&message, disposition).await;
    }

    async fn process(&self, message: &Message) -> Result<(), SpawnError> {
        let event = TriggerEvent::decode(message.payload.as_ref()).map_err(SpawnError::Decode)?;
        let activity_id: ActivityId = event
            .activity_id
            .parse()
            .map_err(|_| SpawnError::Missing("a valid activity_id"))?;
        if event.dedupe_key.is_empty() {
            return Err(SpawnError::Missing("a dedupe_key"));
        }
        let run_id = RunId::derive(activity_id, &event.dedupe_key);

        if let Some(state) = store::run_state(&self.pool, run_id).await? {
            if !state.spawn_complete {
                self.publish_pending(run_id).await?;
                store::mark_spawn_complete(&self.pool, run_id).await?;
                tracing::info!(run.id = %run_id, "resumed interrupted spawn");
            }
            if !state.announced {
                completion::announce_if_finished(&self.pool, &self.js, run_id).await?;
            }
            return Ok(());
        }

        let (new_run, tasks) = self.evaluate(&event, activity_id, run_id).await?;
        let status = new_run.status;
        let instances: Vec<(TaskId, String, Vec<u8>)> = tasks
            .iter()
            .map(|t| (t.id, t.task_type.clone(), t.instance.clone()))
            .collect();
        if !store::insert_run(&self.pool, &new_run, &tasks).await? {
            // Another delivery recorded it first; continue from what it recorded.
            return Box::pin(self.process(message)).await;
        }
        tracing::info!(run.id = %run_id, activity.name = %new_run.activity_name, tasks = tasks.len(), status = ?status, "run recorded");
        if status == RunStatus::RunRunning {
            self.publish_tasks(&instances).await?;
            store::mark_spawn_complete(&self.pool, run_id).await?;
        } else {
            completion::announce_if_finished(&self.pool, &self.js, run_id).await?;
        }
        Ok(())
    }

    /// Loads the pinned spec, resolves context and evaluates the templates.
    async fn evaluate(
        &self,
        event: &TriggerEvent,
        activity_id: ActivityId,
        run_id: RunId,
    ) -> Result<(NewRun, Vec<NewTask>), SpawnError> {
        let payload = event.payload.as_ref().map(values::value_to_json);
        let fired_at = event
            .fired_at
            .as_ref()
            .and_then(timestamp_to_chrono)
            .unwrap_or_else(Utc::now);
        let mut run = NewRun {
            id: run_id,
            activity_id,
            activity_name: event.activity_name.clone(),
            activity_version: event.activity_version,
            event_id: Uuid::parse_str(&event.event_id).unwrap_or(Uuid::nil()),
            source: source_name(event.source()).to_owned(),
            dedupe_key: event.dedupe_key.clone(),
            scheduled_for: event.scheduled_for.as_ref().and_then(timestamp_to_chrono),
            fired_at,
            subject: event.subject.clone(),
            payload: payload.clone(),
            status: RunStatus::RunRunning,
            context: serde_json::json!({}),
            evaluation: serde_json::json!([]),
            error: String::new(),
            trace_id: String::new(),
        };
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
        let context = match resolve_context(&spec) {
            Ok(context) => context,
            Err(reason) => {
                run.status = RunStatus::RunFailed;
                run.error = reason;
                return Ok((run, Vec::new()));
            }
        };
        let scope = Scope {
            trigger: trigger_scope(event),
            event: payload.unwrap_or_else(|| serde_json::json!({})),
            context: context.clone(),
            activity: serde_json::json!({
                "id": activity_id.to_string(),
                "name": event.activity_name,
                "version": event.activity_version,
            }),
        };
        let plan = plan::plan_tasks(&spec, &scope, &self.limits);
        run.context = context;
        run.evaluation = serde_json::Value::Array(
            plan.evaluation
                .iter()
                .map(taskfactory_proto::to_json)
                .collect(),
        );
        if let Some(error) = plan.error {
            run.status = RunStatus::RunFailed;
            run.error = error;
            return Ok((run, Vec::new()));
        }
        if plan.tasks.is_empty() {
            run.status = RunStatus::RunSucceeded;
        }
        let created_at = Utc::now();
        let mut tasks = Vec::with_capacity(plan.tasks.len());
        for planned in plan.tasks {
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
            };
            tasks.push(NewTask {
                id,
                template: planned.template,
                item_index: planned.item_index,
                task_type: planned.task_type,
                params: planned.params,
                instance: instance.encode_to_vec(),
                created_at,
            });
        }
        Ok((run, tasks))
    }

    async fn publish_pending(&self, run_id: RunId) -> Result<(), SpawnError> {
        let pending = store::pending_instances(&self.pool, run_id).await?;
        self.publish_tasks(&pending).await
    }

    /// Publishes tasks concurrently (in bounded windows) and waits for every ack.
    async fn publish_tasks(&self, tasks: &[(TaskId, String, Vec<u8>)]) -> Result<(), SpawnError> {
        for window in tasks.chunks(self.publish_window) {
            let mut acks = Vec::with_capacity(window.len());
            for (task_id, task_type, instance) in window {
                let ack = messaging::publish(
                    &self.js,
                    subjects::task_subject(task_type),
                    &task_id.to_string(),
                    None,
                    instance.clone().into(),
                )
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
}

/// Static context sources, by name. (Other kinds are refused at the API until they are supported.)
fn resolve_context(spec: &ActivitySpec) -> Result<serde_json::Value, String> {
    let mut context = serde_json::Map::new();
    for source in &spec.context {
        match &source.kind {
            Some(context_source::Kind::Static(value)) => {
                context.insert(source.name.clone(), values::value_to_json(value));
            }
            _ => {
                return Err(format!(
                    "context source {:?}: this kind is not supported by this orchestrator",
                    source.name
                ));
            }
        }
    }
    Ok(serde_json::Value::Object(context))
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

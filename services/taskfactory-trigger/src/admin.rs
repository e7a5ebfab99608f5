//! The admin gRPC API (`taskfactory.v1.AdminService`).
//!
//! Every error becomes a gRPC status in one place ([`AdminError`] → `tonic::Status`), with a
//! message that says what to fix. RPCs whose issue has not landed yet answer `UNIMPLEMENTED`
//! (generated default stubs).

use chrono::Utc;
use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::{self, SpecErrors, chrono_to_timestamp};
use taskfactory_model::values;
use taskfactory_proto::v1::admin_service_server::AdminService;
use taskfactory_proto::v1::{
    self, Activity, ActivitySpec, BackfillRequest, BackfillResponse, CancelRunRequest,
    CompleteTaskRequest, CreateActivityRequest, DeleteActivityRequest, DeleteActivityResponse,
    GetActivityRequest, GetRunRequest, GetTaskRequest, ListActivitiesRequest,
    ListActivitiesResponse, ListActivityVersionsRequest, ListActivityVersionsResponse,
    ListOccurrencesRequest, ListOccurrencesResponse, ListRunsRequest, ListRunsResponse,
    ListScheduleTimesRequest, ListScheduleTimesResponse, ListTasksRequest, ListTasksResponse,
    PauseActivityRequest, PreviewRunRequest, PreviewRunResponse, ResumeActivityRequest,
    RetryTaskRequest, Run, RunStatus, Task, TaskStatus, TriggerActivityRequest,
    TriggerActivityResponse, TriggerSource, UpdateActivityRequest, trigger,
};
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_runtime::telemetry::error_chain;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::fire::{self, FireRequest};
use crate::registry::{self, LiveActivity, Registry};
use crate::store::{self, ActivityRecord, StoreError};
use crate::{ledger, views};

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;
/// How long a command (cancel, complete, retry) waits for an orchestrator.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long `PreviewRun` waits for an orchestrator (sources have their own timeouts).
const PREVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Fire times one `Backfill` call may cover.
const MAX_BACKFILL: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidSpec(SpecErrors),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error(
        "an activity named {name:?} already exists; change it with UpdateActivity or pick another name"
    )]
    AlreadyExists { name: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("internal error; see the trigger service's log")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NameTaken { name } => AdminError::AlreadyExists { name },
            StoreError::Gone => AdminError::NotFound {
                what: "activity",
                id: "(deleted while being changed)".to_owned(),
            },
            other => AdminError::Internal(other.into()),
        }
    }
}

impl From<sqlx::Error> for AdminError {
    fn from(error: sqlx::Error) -> Self {
        AdminError::Internal(error.into())
    }
}

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match &error {
            AdminError::InvalidSpec(_) | AdminError::InvalidArgument { .. } => {
                Status::invalid_argument(error.to_string())
            }
            AdminError::NotFound { .. } => Status::not_found(error.to_string()),
            AdminError::AlreadyExists { .. } => Status::already_exists(error.to_string()),
            AdminError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            AdminError::Internal(source) => {
                tracing::error!(error = ?source, "admin request failed");
                Status::internal(error.to_string())
            }
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> AdminError {
    AdminError::InvalidArgument {
        field: field.to_owned(),
        message: message.into(),
    }
}

pub struct Admin {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    pub registry: Registry,
    /// The scheduler's clock (pauses, previews and occurrence queries default to its "now").
    pub clock: ClockHandle,
}

impl Admin {
    /// Makes a change visible before the call returns: this replica reloads at once (an event
    /// published right after CreateActivity fires it), the others on the announcement.
    async fn definitions_changed(&self) {
        if let Err(error) = self.registry.reload(&self.pool).await {
            tracing::warn!(error = %error_chain(&error), "cannot reload definitions after a change; the reloader retries");
            self.registry.request_reload();
        }
        registry::announce_change(&self.nats).await;
    }

    async fn set_paused(
        &self,
        id_or_name: &str,
        paused: bool,
        note: &str,
    ) -> Result<Response<Activity>, Status> {
        let id = self.resolve(id_or_name).await?;
        let mut note = note.to_owned();
        values::make_storable_text(&mut note);
        let found = store::set_paused(&self.pool, id, paused, &note, self.clock.now())
            .await
            .map_err(AdminError::from)?;
        if !found {
            return Err(AdminError::NotFound {
                what: "activity",
                id: id_or_name.to_owned(),
            }
            .into());
        }
        tracing::info!(activity.id = %id, note, "{}", if paused { "activity paused" } else { "activity resumed" });
        self.definitions_changed().await;
        let record = self.load(id, None).await?;
        Ok(Response::new(self.activity_view(&record).await?))
    }

    /// A stored record as the contract's `Activity`, with its schedule's progress.
    /// The change (if any) is already committed: a failed read of the schedule's progress only
    /// leaves `nextFireAt` as the schedule alone says.
    async fn activity_view(&self, record: &ActivityRecord) -> Result<Activity, Status> {
        let schedule = match store::schedule_state(&self.pool, record.id).await {
            Ok(schedule) => schedule,
            Err(error) => {
                tracing::warn!(activity.id = %record.id, error = %taskfactory_runtime::telemetry::error_chain(&error), "cannot read the schedule's progress");
                None
            }
        };
        Ok(activity_message_with(record, self.clock.now(), schedule)?)
    }

    /// Asks an orchestrator to carry out a command on runs or tasks (it owns them).
    async fn command(&self, body: serde_json::Value) -> Result<(), Status> {
        let reply = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.nats.send_request(
                taskfactory_model::subjects::RUN_COMMANDS,
                async_nats::Request::new()
                    .headers(taskfactory_runtime::messaging::request_headers())
                    .payload(serde_json::to_vec(&body).unwrap_or_default().into())
                    .timeout(Some(COMMAND_TIMEOUT)),
            ),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("no orchestrator answered in time; retry"))?
        .map_err(|e| {
            Status::unavailable(format!(
                "no orchestrator is available to carry this out ({e}); start one and retry"
            ))
        })?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("command answer: {e}")))?;
        if answer["ok"].as_bool() == Some(true) {
            return Ok(());
        }
        let message = answer["error"].as_str().unwrap_or("failed").to_owned();
        Err(match answer["code"].as_str() {
            Some("not_found") => Status::not_found(message),
            Some("failed_precondition") => Status::failed_precondition(message),
            _ => AdminError::Internal(anyhow::anyhow!(message)).into(),
        })
    }

    async fn task(&self, uuid: Uuid, id: String) -> Result<Response<Task>, Status> {
        let task = views::get_task(&self.pool, uuid)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::NotFound { what: "task", id })?;
        Ok(Response::new(task))
    }

    async fn resolve(&self, id_or_name: &str) -> Result<ActivityId, AdminError> {
        if id_or_name.trim().is_empty() {
            return Err(invalid("id", "is required: an activity id or name"));
        }
        store::find_activity_id(&self.pool, id_or_name)
            .await?
            .ok_or_else(|| AdminError::NotFound {
                what: "activity",
                id: id_or_name.to_owned(),
            })
    }

    async fn load(
        &self,
        id: ActivityId,
        version: Option<u32>,
    ) -> Result<ActivityRecord, AdminError> {
        store::get_activity(&self.pool, id, version)
            .await?
            .ok_or_else(|| AdminError::NotFound {
                what: if version.is_some() {
                    "activity version"
                } else {
                    "activity"
                },
                id: match version {
                    Some(v) => format!("{id}@{v}"),
                    None => id.to_string(),
                },
            })
    }
}

fn validated_spec(
    spec: Option<ActivitySpec>,
) -> Result<(ActivitySpec, serde_json::Value), AdminError> {
    let spec = spec.ok_or_else(|| invalid("spec", "is required"))?;
    spec::validate(&spec, Utc::now()).map_err(AdminError::InvalidSpec)?;
    let json = taskfactory_proto::try_to_json(&spec)
        .map_err(|e| invalid("spec", format!("has a value out of range: {e}")))?;
    Ok((spec, json))
}

fn trigger_kind(spec: &ActivitySpec) -> &'static str {
    match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(trigger::Kind::Schedule(_)) => "schedule",
        Some(trigger::Kind::Event(_)) => "event",
        _ => "manual",
    }
}

/// The spec of a stored record (it passed validation when stored).
fn stored_spec(record: &ActivityRecord) -> Result<ActivitySpec, AdminError> {
    taskfactory_proto::from_json(&record.spec)
        .map_err(|e| AdminError::Internal(anyhow::anyhow!("stored spec does not parse: {e}")))
}

/// The contract's `Activity`; `schedule` is the schedule's progress (`watermark`, fires so far)
/// when known: a schedule that has used up its `maxRuns` has no next fire, and one whose
/// watermark is ahead of `now` fires next after it.
fn activity_message_with(
    record: &ActivityRecord,
    now: chrono::DateTime<Utc>,
    schedule: Option<(chrono::DateTime<Utc>, u64)>,
) -> Result<Activity, AdminError> {
    let spec = stored_spec(record)?;
    let max_runs = match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(trigger::Kind::Schedule(schedule)) => schedule.max_runs,
        _ => 0,
    };
    let (watermark, fires) = schedule.map_or((None, 0), |(w, n)| (Some(w), n));
    let exhausted = max_runs > 0 && fires >= max_runs;
    let after = watermark.map_or(now, |w| w.max(now));
    let next_fire_at = if record.enabled
        && !record.paused
        && !exhausted
        && record.version == record.current_version
    {
        LiveActivity::from_record(record)
            .and_then(|live| live.schedule.as_ref()?.next_after(after))
            .map(|o| chrono_to_timestamp(o.at))
    } else {
        None
    };
    Ok(Activity {
        id: record.id.to_string(),
        version: record.version,
        spec: Some(spec),
        paused: record.paused,
        pause_note: if record.paused {
            record.pause_note.clone()
        } else {
            String::new()
        },
        created_at: Some(chrono_to_timestamp(record.created_at)),
        updated_at: Some(chrono_to_timestamp(record.updated_at)),
        next_fire_at,
    })
}

fn page_size(requested: u32) -> i64 {
    i64::from(if requested == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        requested.min(MAX_PAGE_SIZE)
    })
}

fn timestamp(
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<Utc>>, AdminError> {
    value
        .map(|t| {
            spec::timestamp_to_chrono(t)
                .ok_or_else(|| invalid(field, "is not a valid timestamp (or lies before 4700 BC)"))
        })
        .transpose()
}

fn overlap_override(value: i32) -> Result<v1::OverlapPolicy, AdminError> {
    v1::OverlapPolicy::try_from(value).map_err(|_| {
        invalid(
            "overlap",
            format!(
                "{value} is not an overlap policy (ALLOW_ALL, SKIP, BUFFER_ONE, BUFFER_ALL, CANCEL_OTHER)"
            ),
        )
    })
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, AdminError> {
    Uuid::parse_str(text).map_err(|_| invalid(field, format!("{text:?} is not a UUID")))
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_activity(
        &self,
        request: Request<CreateActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let (spec, json) = validated_spec(request.into_inner().spec)?;
        let record = store::create_activity(
            &self.pool,
            ActivityId::new_random(),
            &spec.name,
            spec::is_enabled(&spec),
            trigger_kind(&spec),
            &json,
            self.clock.now(),
        )
        .await
        .map_err(AdminError::from)?;
        tracing::info!(activity.id = %record.id, activity.name = %record.name, "activity created");
        self.definitions_changed().await;
        Ok(Response::new(self.activity_view(&record).await?))
    }

    async fn update_activity(
        &self,
        request: Request<UpdateActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let request = request.into_inner();
        let id = self.resolve(&request.id).await?;
        let current = self.load(id, None).await?;
        let mut spec = request.spec;
        if let Some(spec) = spec.as_mut()
            && spec.name.is_empty()
        {
            spec.name = current.name.clone();
        }
        let (spec, json) = validated_spec(spec)?;
        if spec.name != current.name {
            return Err(invalid(
                "spec.name",
                format!(
                    "an activity cannot be renamed ({:?} → {:?}); create a new activity instead",
                    current.name, spec.name
                ),
            )
            .into());
        }
        let (record, changed) = store::update_activity(
            &self.pool,
            id,
            spec::is_enabled(&spec),
            trigger_kind(&spec),
            &json,
            self.clock.now(),
        )
        .await
        .map_err(AdminError::from)?;
        if changed {
            tracing::info!(activity.id = %record.id, activity.name = %record.name, version = record.version, "activity updated");
            self.definitions_changed().await;
        }
        Ok(Response::new(self.activity_view(&record).await?))
    }

    async fn get_activity(
        &self,
        request: Request<GetActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let request = request.into_inner();
        let id = self.resolve(&request.id).await?;
        let version = (request.version != 0).then_some(request.version);
        let record = self.load(id, version).await?;
        Ok(Response::new(self.activity_view(&record).await?))
    }

    async fn list_activity_versions(
        &self,
        request: Request<ListActivityVersionsRequest>,
    ) -> Result<Response<ListActivityVersionsResponse>, Status> {
        let id = self.resolve(&request.into_inner().id).await?;
        let current = self.load(id, None).await?.current_version;
        let versions = store::activity_versions(&self.pool, id)
            .await
            .map_err(AdminError::from)?
            .into_iter()
            .map(|(version, created_at)| v1::ActivityVersion {
                version,
                created_at: Some(chrono_to_timestamp(created_at)),
                current: version == current,
            })
            .collect();
        Ok(Response::new(ListActivityVersionsResponse { versions }))
    }

    async fn list_activities(
        &self,
        request: Request<ListActivitiesRequest>,
    ) -> Result<Response<ListActivitiesResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size);
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let mut records = store::list_activities(&self.pool, after, limit + 1)
            .await
            .map_err(AdminError::from)?;
        let more = records.len() as i64 > limit;
        records.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = if more {
            records.last().map(|r| r.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let states: std::collections::HashMap<ActivityId, (chrono::DateTime<Utc>, u64)> =
            store::schedule_states_of(
                &self.pool,
                &records.iter().map(|r| r.id).collect::<Vec<_>>(),
            )
            .await
            .map_err(AdminError::from)?
            .into_iter()
            .map(|(id, watermark, fires)| (id, (watermark, fires)))
            .collect();
        let now = self.clock.now();
        let activities = records
            .iter()
            .map(|record| activity_message_with(record, now, states.get(&record.id).copied()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(ListActivitiesResponse {
            activities,
            next_page_token,
        }))
    }

    async fn delete_activity(
        &self,
        request: Request<DeleteActivityRequest>,
    ) -> Result<Response<DeleteActivityResponse>, Status> {
        let id = self.resolve(&request.into_inner().id).await?;
        store::delete_activity(&self.pool, id)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(activity.id = %id, "activity deleted");
        self.definitions_changed().await;
        Ok(Response::new(DeleteActivityResponse {}))
    }

    async fn trigger_activity(
        &self,
        request: Request<TriggerActivityRequest>,
    ) -> Result<Response<TriggerActivityResponse>, Status> {
        let request = request.into_inner();
        let id = self.resolve(&request.id).await?;
        let record = self.load(id, None).await?;
        if !record.enabled {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} is disabled; enable it (UpdateActivity with enabled: true) before triggering it",
                record.name
            ))
            .into());
        }
        let overlap = overlap_override(request.overlap)?;
        let dedupe_key = if request.idempotency_key.is_empty() {
            format!("manual:{}", Uuid::new_v4())
        } else {
            format!("manual:{}", request.idempotency_key)
        };
        let fired = fire::fire(
            &self.pool,
            &self.js,
            FireRequest {
                activity_id: id,
                activity_name: record.name.clone(),
                activity_version: record.current_version,
                source: TriggerSource::Manual,
                dedupe_key,
                scheduled_for: None,
                payload: request.payload.as_ref().map(values::value_to_json),
                subject: String::new(),
                fired_at: Utc::now(),
                dst_note: None,
                overlap,
            },
            None,
        )
        .await
        .map_err(AdminError::from)?;
        Ok(Response::new(TriggerActivityResponse {
            run_id: fired.run_id.to_string(),
            event_id: fired.fire_id.to_string(),
            duplicate: fired.duplicate,
        }))
    }

    async fn pause_activity(
        &self,
        request: Request<PauseActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let request = request.into_inner();
        self.set_paused(&request.id, true, &request.note).await
    }

    async fn resume_activity(
        &self,
        request: Request<ResumeActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let request = request.into_inner();
        self.set_paused(&request.id, false, &request.note).await
    }

    async fn backfill(
        &self,
        request: Request<BackfillRequest>,
    ) -> Result<Response<BackfillResponse>, Status> {
        let request = request.into_inner();
        let overlap = overlap_override(request.overlap)?;
        let id = self.resolve(&request.id).await?;
        let record = self.load(id, None).await?;
        if !record.enabled {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} is disabled; enable it before backfilling",
                record.name
            ))
            .into());
        }
        let start = timestamp("start", request.start.as_ref())?
            .ok_or_else(|| invalid("start", "is required"))?;
        let end =
            timestamp("end", request.end.as_ref())?.ok_or_else(|| invalid("end", "is required"))?;
        if start > end {
            return Err(invalid("start", "must not be after end").into());
        }
        let now = self.clock.now();
        if end > now {
            return Err(invalid(
                "end",
                format!("{end} is in the future; a backfill covers past times (the schedule fires the future ones)"),
            )
            .into());
        }
        let live = LiveActivity::from_record(&record).ok_or_else(|| {
            AdminError::Internal(anyhow::anyhow!(
                "stored spec of {} does not load",
                record.name
            ))
        })?;
        let Some(schedule) = live.schedule.clone() else {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} has no schedule trigger; only schedules can be backfilled (use TriggerActivity)",
                record.name
            ))
            .into());
        };
        let times: Vec<_> = schedule
            .occurrences_after(start - chrono::Duration::nanoseconds(1))
            .take_while(|o| o.at <= end)
            .take(MAX_BACKFILL + 1)
            .collect();
        if times.len() > MAX_BACKFILL {
            return Err(invalid(
                "end",
                format!("the range holds more than {MAX_BACKFILL} fire times; backfill it in smaller ranges"),
            )
            .into());
        }
        let mut response = BackfillResponse::default();
        for occurrence in times {
            let fired = fire::fire(
                &self.pool,
                &self.js,
                FireRequest {
                    activity_id: id,
                    activity_name: record.name.clone(),
                    activity_version: record.current_version,
                    source: TriggerSource::Backfill,
                    dedupe_key: crate::scheduler::schedule_dedupe_key(occurrence.at),
                    scheduled_for: Some(occurrence.at),
                    payload: None,
                    subject: String::new(),
                    fired_at: now,
                    dst_note: occurrence.dst_note.clone(),
                    overlap,
                },
                None,
            )
            .await
            .map_err(AdminError::from)?;
            if fired.duplicate {
                response.duplicates += 1;
            } else {
                response.fires += 1;
            }
        }
        tracing::info!(activity.name = %record.name, %start, %end, fires = response.fires, duplicates = response.duplicates, "backfill");
        Ok(Response::new(response))
    }

    async fn preview_run(
        &self,
        request: Request<PreviewRunRequest>,
    ) -> Result<Response<PreviewRunResponse>, Status> {
        let request = request.into_inner();
        let (id, version, spec) = match (request.id.is_empty(), request.spec) {
            (false, None) => {
                let id = self.resolve(&request.id).await?;
                let record = self.load(id, None).await?;
                let spec = stored_spec(&record)?;
                (id, record.current_version, spec)
            }
            (true, Some(spec)) => {
                let (spec, _) = validated_spec(Some(spec))?;
                // An unsaved spec for an existing activity previews as that activity would run.
                let id = match store::find_activity_id(&self.pool, &spec.name)
                    .await
                    .map_err(AdminError::from)?
                {
                    Some(id) => id,
                    None => ActivityId(Uuid::new_v5(
                        &Uuid::NAMESPACE_URL,
                        format!("taskfactory:preview:{}", spec.name).as_bytes(),
                    )),
                };
                (id, 0, spec)
            }
            (false, Some(_)) => {
                return Err(invalid("spec", "give either id or spec, not both").into());
            }
            (true, None) => {
                return Err(invalid(
                    "id",
                    "is required: an activity id or name, or an unsaved spec in `spec`",
                )
                .into());
            }
        };
        let scheduled_for = timestamp("scheduledFor", request.scheduled_for.as_ref())?;
        let now = self.clock.now();
        // The same keys a real fire would carry, so the same run and task ids come out.
        let (source, dedupe_key) = match scheduled_for {
            Some(at) => (
                TriggerSource::Schedule,
                crate::scheduler::schedule_dedupe_key(at),
            ),
            None => (TriggerSource::Manual, "manual:preview".to_owned()),
        };
        let event = v1::TriggerEvent {
            event_id: taskfactory_model::ids::FireId::derive(id, &dedupe_key).to_string(),
            activity_id: id.to_string(),
            activity_version: version,
            source: source as i32,
            scheduled_for: scheduled_for.map(chrono_to_timestamp),
            fired_at: Some(chrono_to_timestamp(now)),
            dedupe_key,
            payload: request.payload,
            subject: String::new(),
            activity_name: spec.name.clone(),
            overlap: 0,
        };
        let body = serde_json::json!({
            "spec": taskfactory_proto::to_json(&spec),
            "event": taskfactory_proto::to_json(&event),
        });
        let reply = tokio::time::timeout(
            PREVIEW_TIMEOUT,
            self.nats.send_request(
                taskfactory_model::subjects::PREVIEW_REQUESTS,
                async_nats::Request::new()
                    .headers(taskfactory_runtime::messaging::request_headers())
                    .payload(serde_json::to_vec(&body).unwrap_or_default().into())
                    .timeout(Some(PREVIEW_TIMEOUT)),
            ),
        )
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no orchestrator answered the preview within {}s",
                PREVIEW_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            Status::unavailable(format!(
                "no orchestrator is available to resolve the context ({e}); start one and retry"
            ))
        })?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("preview answer: {e}")))?;
        if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
            return Err(AdminError::Internal(anyhow::anyhow!("preview failed: {error}")).into());
        }
        let response: PreviewRunResponse = taskfactory_proto::from_json(&answer)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("preview answer: {e}")))?;
        Ok(Response::new(response))
    }

    async fn list_schedule_times(
        &self,
        request: Request<ListScheduleTimesRequest>,
    ) -> Result<Response<ListScheduleTimesResponse>, Status> {
        let request = request.into_inner();
        let (key, trigger) = match (request.id.is_empty(), request.schedule) {
            (false, None) => {
                let id = self.resolve(&request.id).await?;
                let record = self.load(id, None).await?;
                let spec = stored_spec(&record)?;
                let trigger = ledger::schedule_trigger(&spec).cloned().ok_or_else(|| {
                    AdminError::FailedPrecondition(format!(
                        "activity {:?} has no schedule trigger; only schedules have fire times",
                        record.name
                    ))
                })?;
                (id.to_string(), trigger)
            }
            (true, Some(schedule)) => (String::new(), schedule),
            (false, Some(_)) => {
                return Err(invalid("schedule", "give either id or schedule, not both").into());
            }
            (true, None) => {
                return Err(invalid(
                    "id",
                    "is required: an activity id or name, or an ad-hoc schedule in `schedule`",
                )
                .into());
            }
        };
        let schedule = spec::build_schedule(&trigger).map_err(|errors| {
            AdminError::InvalidSpec(SpecErrors(
                errors
                    .into_iter()
                    .map(|mut e| {
                        e.field = e.field.replacen("trigger.schedule", "schedule", 1);
                        e
                    })
                    .collect(),
            ))
        })?;
        let after = timestamp("after", request.after.as_ref())?.unwrap_or_else(|| self.clock.now());
        if request.count > ledger::MAX_SCHEDULE_TIMES {
            return Err(invalid(
                "count",
                format!(
                    "at most {} times per call; page on with `after`",
                    ledger::MAX_SCHEDULE_TIMES
                ),
            )
            .into());
        }
        let count = if request.count == 0 {
            10
        } else {
            request.count
        };
        let times = ledger::schedule_times(&key, &trigger, &schedule, after, count);
        Ok(Response::new(ListScheduleTimesResponse { times }))
    }

    async fn list_occurrences(
        &self,
        request: Request<ListOccurrencesRequest>,
    ) -> Result<Response<ListOccurrencesResponse>, Status> {
        let request = request.into_inner();
        let id = self.resolve(&request.id).await?;
        let end = timestamp("end", request.end.as_ref())?.unwrap_or_else(|| self.clock.now());
        let start =
            timestamp("start", request.start.as_ref())?.unwrap_or(end - chrono::Duration::days(1));
        if start > end {
            return Err(invalid("start", "must not be after end").into());
        }
        let occurrences = ledger::list_occurrences(&self.pool, id, start, end)
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(ListOccurrencesResponse { occurrences }))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let request = request.into_inner();
        let activity = if request.activity_id.is_empty() {
            None
        } else {
            Some(self.resolve(&request.activity_id).await?.0)
        };
        let status = match RunStatus::try_from(request.status) {
            Ok(RunStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                return Err(
                    invalid("status", format!("{} is not a run status", request.status)).into(),
                );
            }
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(
                views::Cursor::decode(&request.page_token)
                    .ok_or_else(|| invalid("pageToken", "is not a token this API returned"))?,
            )
        };
        let (runs, next) = views::list_runs(
            &self.pool,
            activity,
            status,
            after,
            page_size(request.page_size),
        )
        .await
        .map_err(AdminError::from)?;
        Ok(Response::new(ListRunsResponse {
            runs,
            next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let id = request.into_inner().id;
        let uuid = parse_uuid("id", &id)?;
        let run = views::get_run(&self.pool, uuid)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::NotFound { what: "run", id })?;
        Ok(Response::new(run))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let request = request.into_inner();
        let uuid = parse_uuid("id", &request.id)?;
        self.command(
            serde_json::json!({"op": "cancel", "run": uuid.to_string(), "reason": request.reason}),
        )
        .await?;
        let run = views::get_run(&self.pool, uuid)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::NotFound {
                what: "run",
                id: request.id,
            })?;
        Ok(Response::new(run))
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let request = request.into_inner();
        let uuid = parse_uuid("id", &request.id)?;
        self.command(serde_json::json!({
            "op": "complete",
            "task": uuid.to_string(),
            "failed": request.failed,
            "error": request.error,
            "output": request.output.as_ref().map(values::value_to_json),
        }))
        .await?;
        self.task(uuid, request.id).await
    }

    async fn retry_task(
        &self,
        request: Request<RetryTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let request = request.into_inner();
        let uuid = parse_uuid("id", &request.id)?;
        self.command(serde_json::json!({"op": "retry", "task": uuid.to_string()}))
            .await?;
        self.task(uuid, request.id).await
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let request = request.into_inner();
        let run = if request.run_id.is_empty() {
            None
        } else {
            Some(parse_uuid("runId", &request.run_id)?)
        };
        let activity = if request.activity_id.is_empty() {
            None
        } else {
            Some(self.resolve(&request.activity_id).await?.0)
        };
        let status = match TaskStatus::try_from(request.status) {
            Ok(TaskStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                return Err(
                    invalid("status", format!("{} is not a task status", request.status)).into(),
                );
            }
        };
        let token = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let (tasks, next) = views::list_tasks(
            &self.pool,
            run,
            activity,
            status,
            token,
            page_size(request.page_size),
        )
        .await
        .map_err(AdminError::from)?;
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let id = request.into_inner().id;
        let uuid = parse_uuid("id", &id)?;
        let task = views::get_task(&self.pool, uuid)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::NotFound { what: "task", id })?;
        Ok(Response::new(task))
    }
}

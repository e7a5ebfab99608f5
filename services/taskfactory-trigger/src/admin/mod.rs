//! The admin gRPC API (`taskfactory.v1.AdminService`).
//!
//! Every call has passed the auth layer (`crate::auth::layer`): its caller is known and its roles
//! reach the RPC somewhere. Each RPC here then checks the caller against what the call is about
//! ([`guard`]), redacts what a caller below `admin` reads, and records every call that changes
//! something in the audit log (`crate::audit`), whatever its outcome.
//!
//! Every error becomes a gRPC status in one place ([`AdminError`] → `tonic::Status`), with a
//! message that says what to fix.
//!
//! # Layout
//!
//! - this file: the service itself (one short method per RPC: caller, audit, handler), errors;
//! - [`guard`]: scope checks against activities, runs and tasks; what is redacted for whom;
//! - [`definitions`]: create, update, read, list, delete, pause, resume;
//! - [`fires`]: TriggerActivity, Backfill, PreviewRun, ListScheduleTimes, ListOccurrences,
//!   ListEventDecisions;
//! - [`runs`]: runs, tasks, the commands on them, and the audit log;
//! - [`spec_calls`]: how many calls that carry a spec are handled at once.

mod definitions;
mod fires;
mod guard;
mod runs;
mod spec_calls;

use spec_calls::SpecCallSlot;
pub use spec_calls::SpecCallsLayer;

use std::future::Future;

use sqlx::PgPool;
use taskfactory_model::access::Principal;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::{self, SpecErrors};
use taskfactory_proto::v1::admin_service_server::AdminService;
use taskfactory_proto::v1::{
    self, Activity, BackfillRequest, BackfillResponse, CancelRunRequest, CompleteTaskRequest,
    CreateActivityRequest, DeleteActivityRequest, DeleteActivityResponse, GetActivityRequest,
    GetRunRequest, GetTaskRequest, ListActivitiesRequest, ListActivitiesResponse,
    ListActivityVersionsRequest, ListActivityVersionsResponse, ListAuditEventsRequest,
    ListAuditEventsResponse, ListEventDecisionsRequest, ListEventDecisionsResponse,
    ListOccurrencesRequest, ListOccurrencesResponse, ListRunsRequest, ListRunsResponse,
    ListScheduleTimesRequest, ListScheduleTimesResponse, ListTasksRequest, ListTasksResponse,
    PauseActivityRequest, PreviewRunRequest, PreviewRunResponse, ResumeActivityRequest,
    RetryTaskRequest, Run, Task, TriggerActivityRequest, TriggerActivityResponse,
    UpdateActivityRequest,
};
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_runtime::telemetry::error_chain;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use self::guard::{audited_caller, caller};
use crate::audit::{self, AuditEntry};
use crate::registry::{self, Registry};
use crate::store::{self, ActivityRecord, StoreError};

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;
/// The admin API takes gRPC messages of at least tonic's default size.
const MIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How much users may store (`model::sizes`), and so how much memory definitions take: the
/// trigger keeps of each live activity its state and trigger (measured: about 9 KB an activity,
/// plus up to about nine times the bytes of its trigger, for schedules with long `excludeDates`);
/// one call with a spec takes up to about a hundred times the spec's size, for a spec of many
/// small tasks. The defaults keep both within a few hundred MB.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct SpecLimits {
    /// Largest spec the admin API takes (create, update, preview), as compact canonical JSON.
    #[arg(
        long = "max-spec-bytes",
        env = "TASKFACTORY_MAX_SPEC_BYTES",
        default_value_t = 1024 * 1024
    )]
    pub max_spec_bytes: u64,
    /// Most live activities; a create past it is refused.
    #[arg(
        long = "max-activities",
        env = "TASKFACTORY_MAX_ACTIVITIES",
        default_value_t = 10_000
    )]
    pub max_activities: u64,
    /// Largest total of the live activities' specs; a create or update that would pass it is
    /// refused.
    #[arg(
        long = "max-definitions-bytes",
        env = "TASKFACTORY_MAX_DEFINITIONS_BYTES",
        default_value_t = 32 * 1024 * 1024
    )]
    pub max_definitions_bytes: u64,
    /// Calls that carry or read whole specs (CreateActivity, UpdateActivity, PreviewRun,
    /// GetActivity, ListActivities) handled at once; more wait before their message is decoded.
    #[arg(
        long = "spec-calls-at-once",
        env = "TASKFACTORY_SPEC_CALLS_AT_ONCE",
        default_value_t = 2
    )]
    pub spec_calls_at_once: usize,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            max_spec_bytes: 1024 * 1024,
            max_activities: 10_000,
            max_definitions_bytes: 32 * 1024 * 1024,
            spec_calls_at_once: 2,
        }
    }
}

impl SpecLimits {
    pub fn totals(&self) -> taskfactory_model::sizes::TotalLimits {
        taskfactory_model::sizes::TotalLimits {
            max_activities: self.max_activities,
            max_bytes: self.max_definitions_bytes,
        }
    }

    /// The largest gRPC message the admin API decodes: room for any spec within the limit (a
    /// spec's protobuf form is most often smaller than its JSON, but a list of small numbers
    /// takes up to 5½ times more), and at least tonic's default (4 MiB). A larger message is
    /// refused before it is decoded (OUT_OF_RANGE, naming its size and this limit).
    pub fn max_message_bytes(&self) -> usize {
        usize::try_from(self.max_spec_bytes.saturating_mul(6))
            .unwrap_or(usize::MAX)
            .max(MIN_MESSAGE_BYTES)
    }
}

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
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}; read it again and retry")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A status decided where it arose (no orchestrator answered, …).
    #[error("{}", .0.message())]
    Status(Status),
    #[error("internal error; see the trigger service's log")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NameTaken { name } => AdminError::AlreadyExists { name },
            StoreError::Moved { .. } => AdminError::Aborted(error.to_string()),
            StoreError::TooLarge(_) => AdminError::ResourceExhausted(error.to_string()),
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
            AdminError::PermissionDenied(_) => Status::permission_denied(error.to_string()),
            AdminError::Aborted(_) => Status::aborted(error.to_string()),
            AdminError::ResourceExhausted(_) => Status::resource_exhausted(error.to_string()),
            AdminError::Status(status) => status.clone(),
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

/// Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct Admin {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    pub registry: Registry,
    /// The scheduler's clock (pauses, previews and occurrence queries default to its "now").
    pub clock: ClockHandle,
    /// The service's tasks: a change in flight, and its audit row, are waited for at shutdown.
    pub tracker: tokio_util::task::TaskTracker,
    pub limits: SpecLimits,
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
) -> Result<Option<chrono::DateTime<chrono::Utc>>, AdminError> {
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

impl Admin {
    /// Carries out a call that changes something, then records its audit row with the outcome,
    /// and answers. Both run in a task of their own: a caller that goes away (a `grpc-timeout`,
    /// a reset stream) stops neither the change nor its record, so no change goes unrecorded.
    async fn audited<T, F, Fut>(
        &self,
        caller: Principal,
        audit: AuditEntry,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(Admin, Principal, AuditEntry) -> Fut + Send + 'static,
        Fut: Future<Output = (AuditEntry, Result<T, AdminError>)> + Send + 'static,
    {
        use futures::FutureExt as _;
        let admin = self.clone();
        let pool = self.pool.clone();
        // What is known before the call, recorded should the call panic midway.
        let started = audit.clone();
        let call = async move {
            let done = std::panic::AssertUnwindSafe(work(admin, caller, audit))
                .catch_unwind()
                .await;
            let (mut audit, result) = match done {
                Ok((audit, result)) => (audit, result.map_err(Status::from)),
                Err(_) => (
                    started,
                    Err(Status::internal(
                        "internal error; see the trigger service's log",
                    )),
                ),
            };
            audit.outcome(&result);
            audit::record(pool, audit).await;
            result
        };
        self.tracker
            .spawn(call.instrument(tracing::Span::current()))
            .await
            .map_err(|error| {
                tracing::error!(%error, "an admin call's task failed");
                Status::internal("internal error; see the trigger service's log")
            })?
            .map(Response::new)
    }
}

fn answer<T>(result: Result<T, AdminError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_activity(
        &self,
        request: Request<CreateActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let slot = SpecCallSlot::of(&request);
        let (caller, audit, request) = audited_caller(request, "CreateActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .create_activity_for(&caller, request, &mut audit, slot)
                .await;
            (audit, result)
        })
        .await
    }

    async fn update_activity(
        &self,
        request: Request<UpdateActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let slot = SpecCallSlot::of(&request);
        let (caller, audit, request) = audited_caller(request, "UpdateActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .update_activity_for(&caller, request, &mut audit, slot)
                .await;
            (audit, result)
        })
        .await
    }

    async fn get_activity(
        &self,
        request: Request<GetActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.get_activity_for(&caller, request).await)
    }

    async fn list_activity_versions(
        &self,
        request: Request<ListActivityVersionsRequest>,
    ) -> Result<Response<ListActivityVersionsResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_activity_versions_for(&caller, request).await)
    }

    async fn list_activities(
        &self,
        request: Request<ListActivitiesRequest>,
    ) -> Result<Response<ListActivitiesResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_activities_for(&caller, request).await)
    }

    async fn delete_activity(
        &self,
        request: Request<DeleteActivityRequest>,
    ) -> Result<Response<DeleteActivityResponse>, Status> {
        let (caller, audit, request) = audited_caller(request, "DeleteActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .delete_activity_for(&caller, request, &mut audit)
                .await;
            (audit, result)
        })
        .await
    }

    async fn trigger_activity(
        &self,
        request: Request<TriggerActivityRequest>,
    ) -> Result<Response<TriggerActivityResponse>, Status> {
        let (caller, audit, request) = audited_caller(request, "TriggerActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .trigger_activity_for(&caller, request, &mut audit)
                .await;
            (audit, result)
        })
        .await
    }

    async fn pause_activity(
        &self,
        request: Request<PauseActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let (caller, audit, request) = audited_caller(request, "PauseActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .set_paused_for(&caller, &request.id, true, &request.note, &mut audit)
                .await;
            (audit, result)
        })
        .await
    }

    async fn resume_activity(
        &self,
        request: Request<ResumeActivityRequest>,
    ) -> Result<Response<Activity>, Status> {
        let (caller, audit, request) = audited_caller(request, "ResumeActivity")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin
                .set_paused_for(&caller, &request.id, false, &request.note, &mut audit)
                .await;
            (audit, result)
        })
        .await
    }

    async fn backfill(
        &self,
        request: Request<BackfillRequest>,
    ) -> Result<Response<BackfillResponse>, Status> {
        let (caller, audit, request) = audited_caller(request, "Backfill")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin.backfill_for(&caller, request, &mut audit).await;
            (audit, result)
        })
        .await
    }

    async fn preview_run(
        &self,
        request: Request<PreviewRunRequest>,
    ) -> Result<Response<PreviewRunResponse>, Status> {
        let slot = SpecCallSlot::of(&request);
        let (caller, audit, request) = audited_caller(request, "PreviewRun")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let _slot = slot;
            let result = admin.preview_run_for(&caller, request, &mut audit).await;
            (audit, result)
        })
        .await
    }

    async fn list_schedule_times(
        &self,
        request: Request<ListScheduleTimesRequest>,
    ) -> Result<Response<ListScheduleTimesResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_schedule_times_for(&caller, request).await)
    }

    async fn list_occurrences(
        &self,
        request: Request<ListOccurrencesRequest>,
    ) -> Result<Response<ListOccurrencesResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_occurrences_for(&caller, request).await)
    }

    async fn list_event_decisions(
        &self,
        request: Request<ListEventDecisionsRequest>,
    ) -> Result<Response<ListEventDecisionsResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_event_decisions_for(&caller, request).await)
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_runs_for(&caller, request).await)
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.get_run_for(&caller, request).await)
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let (caller, audit, request) = audited_caller(request, "CancelRun")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin.cancel_run_for(&caller, request, &mut audit).await;
            (audit, result)
        })
        .await
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let (caller, audit, request) = audited_caller(request, "CompleteTask")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin.complete_task_for(&caller, request, &mut audit).await;
            (audit, result)
        })
        .await
    }

    async fn retry_task(
        &self,
        request: Request<RetryTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let (caller, audit, request) = audited_caller(request, "RetryTask")?;
        self.audited(caller, audit, move |admin, caller, mut audit| async move {
            let result = admin.retry_task_for(&caller, request, &mut audit).await;
            (audit, result)
        })
        .await
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_tasks_for(&caller, request).await)
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.get_task_for(&caller, request).await)
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let (caller, request) = caller(request)?;
        answer(self.list_audit_events_for(&caller, request).await)
    }
}

//! Runs and tasks: reading them, and the commands an orchestrator carries out on them (cancel,
//! complete, retry). Also the audit log's reading.

use taskfactory_model::access::{Principal, Role};
use taskfactory_model::{redact, values};
use taskfactory_proto::v1::{
    CancelRunRequest, CompleteTaskRequest, GetRunRequest, GetTaskRequest, ListAuditEventsRequest,
    ListAuditEventsResponse, ListRunsRequest, ListRunsResponse, ListTasksRequest,
    ListTasksResponse, RetryTaskRequest, Run, RunStatus, Task, TaskStatus,
};
use uuid::Uuid;

use super::{Admin, AdminError, invalid, page_size, parse_uuid, timestamp};
use crate::audit::{self, AuditEntry, AuditQuery};
use crate::views::{self, RunOrTask};

/// How long a command (cancel, complete, retry) waits for an orchestrator.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the caller is told when an orchestrator request did not get through.
pub(super) fn internal_error(error: crate::internal::RequestError) -> AdminError {
    use crate::internal::RequestError as E;
    match error {
        E::Record(source) => AdminError::Internal(anyhow::Error::new(source)),
        E::Timeout(_) => {
            AdminError::Status(tonic::Status::deadline_exceeded(format!("{error}; retry")))
        }
        E::Unavailable(_) => AdminError::Status(tonic::Status::unavailable(format!(
            "{error}; start one and retry"
        ))),
    }
}

/// An orchestrator's `{"error", "code"}` answer (to a command or a preview) as the caller's
/// status; an error without a code the caller can act on is internal, prefixed with `what`.
pub(super) fn orchestrator_refusal(answer: &serde_json::Value, what: &str) -> AdminError {
    let message = answer["error"].as_str().unwrap_or("failed").to_owned();
    match answer["code"].as_str() {
        Some("not_found") => AdminError::Status(tonic::Status::not_found(message)),
        Some("failed_precondition") => AdminError::FailedPrecondition(message),
        Some("permission_denied") => AdminError::PermissionDenied(message),
        Some("unavailable") => AdminError::Status(tonic::Status::unavailable(message)),
        Some("deadline_exceeded") => AdminError::Status(tonic::Status::deadline_exceeded(message)),
        _ => AdminError::Internal(anyhow::anyhow!("{what}: {message}")),
    }
}

impl Admin {
    /// Asks an orchestrator to carry out a command on runs or tasks (it owns them).
    async fn command(&self, caller: &Principal, body: serde_json::Value) -> Result<(), AdminError> {
        let op = body["op"].as_str().unwrap_or_default().to_owned();
        let reply = crate::internal::send(
            &self.pool,
            &self.nats,
            taskfactory_model::subjects::RUN_COMMANDS,
            &op,
            &caller.subject,
            serde_json::to_vec(&body).unwrap_or_default(),
            COMMAND_TIMEOUT,
        )
        .await
        .map_err(internal_error)?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("command answer: {e}")))?;
        if answer["ok"].as_bool() == Some(true) {
            return Ok(());
        }
        Err(orchestrator_refusal(&answer, "failed"))
    }

    async fn run_view(&self, id: Uuid, shown: &str, redacted: bool) -> Result<Run, AdminError> {
        let mut run =
            views::get_run(&self.pool, id)
                .await?
                .ok_or_else(|| AdminError::NotFound {
                    what: "run",
                    id: shown.to_owned(),
                })?;
        if redacted {
            redact::redact_run(&mut run);
        }
        Ok(run)
    }

    async fn task_view(&self, id: Uuid, shown: &str, redacted: bool) -> Result<Task, AdminError> {
        let mut task =
            views::get_task(&self.pool, id)
                .await?
                .ok_or_else(|| AdminError::NotFound {
                    what: "task",
                    id: shown.to_owned(),
                })?;
        if redacted {
            redact::redact_task(&mut task);
        }
        Ok(task)
    }

    /// Checks `caller` against the run's or task's activity and names both in the audit row.
    async fn audited_target(
        &self,
        caller: &Principal,
        kind: RunOrTask,
        id: Uuid,
        audit: &mut AuditEntry,
    ) -> Result<bool, AdminError> {
        audit.target(
            match kind {
                RunOrTask::Run => "run",
                RunOrTask::Task => "task",
            },
            &id.to_string(),
        );
        let owner = views::owner_of(&self.pool, kind, id).await?;
        if let Some((activity, labels)) = &owner {
            audit.activity_id = Some(taskfactory_model::ids::ActivityId(*activity));
            audit.activity_name = labels.name.clone();
        }
        super::guard::check_owner(
            caller,
            Role::Operator,
            kind,
            id,
            owner.as_ref().map(|(_, labels)| labels),
        )
    }

    pub(super) async fn list_runs_for(
        &self,
        caller: &Principal,
        request: ListRunsRequest,
    ) -> Result<ListRunsResponse, AdminError> {
        let activity = if request.activity_id.is_empty() {
            None
        } else {
            Some(
                self.activity_for(caller, &request.activity_id, None, Role::Viewer)
                    .await?
                    .id
                    .0,
            )
        };
        let status = match RunStatus::try_from(request.status) {
            Ok(RunStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                return Err(invalid(
                    "status",
                    format!("{} is not a run status", request.status),
                ));
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
        let visible = self.visible_activities(caller).await?;
        let (mut runs, next) = views::list_runs(
            &self.pool,
            activity,
            status,
            after,
            page_size(request.page_size),
            visible.as_deref(),
        )
        .await?;
        let redaction = self.redaction(caller).await?;
        for run in &mut runs {
            if redaction.applies_to(&run.activity_id) {
                redact::redact_run(run);
            }
        }
        Ok(ListRunsResponse {
            runs,
            next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
        })
    }

    pub(super) async fn get_run_for(
        &self,
        caller: &Principal,
        request: GetRunRequest,
    ) -> Result<Run, AdminError> {
        let id = parse_uuid("id", &request.id)?;
        let redacted = self
            .check_run_or_task(caller, Role::Viewer, RunOrTask::Run, id)
            .await?;
        self.run_view(id, &request.id, redacted).await
    }

    pub(super) async fn cancel_run_for(
        &self,
        caller: &Principal,
        request: CancelRunRequest,
        audit: &mut AuditEntry,
    ) -> Result<Run, AdminError> {
        let id = parse_uuid("id", &request.id)?;
        let redacted = self
            .audited_target(caller, RunOrTask::Run, id, audit)
            .await?;
        audit.detail("reason", request.reason.as_str());
        self.command(
            caller,
            serde_json::json!({"op": "cancel", "run": id.to_string(), "reason": request.reason}),
        )
        .await?;
        self.run_view(id, &request.id, redacted).await
    }

    pub(super) async fn complete_task_for(
        &self,
        caller: &Principal,
        request: CompleteTaskRequest,
        audit: &mut AuditEntry,
    ) -> Result<Task, AdminError> {
        let id = parse_uuid("id", &request.id)?;
        let redacted = self
            .audited_target(caller, RunOrTask::Task, id, audit)
            .await?;
        audit.detail("failed", request.failed);
        if request.failed {
            audit.detail("error", request.error.as_str());
        }
        self.command(
            caller,
            serde_json::json!({
                "op": "complete",
                "task": id.to_string(),
                "failed": request.failed,
                "error": request.error,
                "output": request.output.as_ref().map(values::value_to_json),
            }),
        )
        .await?;
        self.task_view(id, &request.id, redacted).await
    }

    pub(super) async fn retry_task_for(
        &self,
        caller: &Principal,
        request: RetryTaskRequest,
        audit: &mut AuditEntry,
    ) -> Result<Task, AdminError> {
        let id = parse_uuid("id", &request.id)?;
        let redacted = self
            .audited_target(caller, RunOrTask::Task, id, audit)
            .await?;
        self.command(
            caller,
            serde_json::json!({"op": "retry", "task": id.to_string()}),
        )
        .await?;
        self.task_view(id, &request.id, redacted).await
    }

    pub(super) async fn list_tasks_for(
        &self,
        caller: &Principal,
        request: ListTasksRequest,
    ) -> Result<ListTasksResponse, AdminError> {
        let run = if request.run_id.is_empty() {
            None
        } else {
            let run = parse_uuid("runId", &request.run_id)?;
            self.check_run_or_task(caller, Role::Viewer, RunOrTask::Run, run)
                .await?;
            Some(run)
        };
        let activity = if request.activity_id.is_empty() {
            None
        } else {
            Some(
                self.activity_for(caller, &request.activity_id, None, Role::Viewer)
                    .await?
                    .id
                    .0,
            )
        };
        let status = match TaskStatus::try_from(request.status) {
            Ok(TaskStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                return Err(invalid(
                    "status",
                    format!("{} is not a task status", request.status),
                ));
            }
        };
        let token = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let visible = self.visible_activities(caller).await?;
        let (mut tasks, next) = views::list_tasks(
            &self.pool,
            run,
            activity,
            status,
            token,
            page_size(request.page_size),
            visible.as_deref(),
        )
        .await?;
        let redaction = self.redaction(caller).await?;
        for task in &mut tasks {
            if redaction.applies_to(&task.activity_id) {
                redact::redact_task(task);
            }
        }
        Ok(ListTasksResponse {
            tasks,
            next_page_token: next.unwrap_or_default(),
        })
    }

    pub(super) async fn get_task_for(
        &self,
        caller: &Principal,
        request: GetTaskRequest,
    ) -> Result<Task, AdminError> {
        let id = parse_uuid("id", &request.id)?;
        let redacted = self
            .check_run_or_task(caller, Role::Viewer, RunOrTask::Task, id)
            .await?;
        self.task_view(id, &request.id, redacted).await
    }

    pub(super) async fn list_audit_events_for(
        &self,
        caller: &Principal,
        request: ListAuditEventsRequest,
    ) -> Result<ListAuditEventsResponse, AdminError> {
        let activity_id = if request.activity.is_empty() {
            None
        } else {
            // A deleted activity's rows stay readable by its id.
            match Uuid::parse_str(&request.activity) {
                Ok(id) => Some(taskfactory_model::ids::ActivityId(id)),
                Err(_) => Some(
                    self.activity_for(caller, &request.activity, None, Role::Admin)
                        .await?
                        .id,
                ),
            }
        };
        let before_id = if request.page_token.is_empty() {
            None
        } else {
            Some(
                request
                    .page_token
                    .parse::<i64>()
                    .map_err(|_| invalid("pageToken", "is not a token this API returned"))?,
            )
        };
        // A scoped admin reads the rows about its activities only.
        let activities = match self.redaction(caller).await? {
            super::guard::Redaction::Nothing => None,
            super::guard::Redaction::Everything => Some(Vec::new()),
            super::guard::Redaction::Except(ids) => Some(ids.into_iter().collect()),
        };
        let query = AuditQuery {
            principal: (!request.principal.is_empty()).then(|| request.principal.clone()),
            rpc: (!request.rpc.is_empty()).then(|| request.rpc.clone()),
            activity_id,
            start: timestamp("start", request.start.as_ref())?,
            end: timestamp("end", request.end.as_ref())?,
            before_id,
            activities,
            limit: page_size(request.page_size),
        };
        let (events, next) = audit::list(&self.pool, &query).await?;
        Ok(ListAuditEventsResponse {
            events,
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        })
    }
}

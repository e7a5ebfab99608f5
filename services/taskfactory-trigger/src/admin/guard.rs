//! The admin API's checks of a caller against what a call is about.
//!
//! The auth layer already refused callers whose roles cannot reach the RPC anywhere; here a
//! scoped caller is checked against the activity itself (by its name and the labels of its current
//! version): an activity it may not even view is `NOT_FOUND` (its existence is not told), one it
//! may view but not act on is `PERMISSION_DENIED`. Runs and tasks are checked through their
//! activity. Whatever a caller below `admin` reads is redacted (`model::redact`).

use std::collections::{HashMap, HashSet};

use taskfactory_model::access::{ActivityRef, Coverage, Principal, Role};
use tonic::{Request, Status};
use uuid::Uuid;

use super::{Admin, AdminError};
use crate::audit::AuditEntry;
use crate::store::ActivityRecord;
use crate::views::{self, ActivityLabels, RunOrTask};

fn principal_of<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            tracing::error!("an admin call reached its handler without a principal");
            Status::internal("internal error; see the trigger service's log")
        })
}

/// The caller the auth layer found, and the request.
pub(super) fn caller<T>(request: Request<T>) -> Result<(Principal, T), Status> {
    let principal = principal_of(&request)?;
    Ok((principal, request.into_inner()))
}

/// The caller, its audit row in the making (with the caller's trace), and the request.
pub(super) fn audited_caller<T>(
    request: Request<T>,
    rpc: &'static str,
) -> Result<(Principal, AuditEntry, T), Status> {
    let principal = principal_of(&request)?;
    let mut audit = AuditEntry::new(&principal, rpc);
    audit.caller_trace(
        request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    Ok((principal, audit, request.into_inner()))
}

/// Whose values a caller sees unredacted.
pub(super) enum Redaction {
    /// Admin over everything: nothing redacted.
    Nothing,
    /// Admin over nothing: everything redacted.
    Everything,
    /// Admin over these activities only.
    Except(HashSet<Uuid>),
}

impl Redaction {
    pub(super) fn applies_to(&self, activity_id: &str) -> bool {
        match self {
            Redaction::Nothing => false,
            Redaction::Everything => true,
            Redaction::Except(ids) => Uuid::parse_str(activity_id)
                .map(|id| !ids.contains(&id))
                .unwrap_or(true),
        }
    }
}

fn reference(labels: &ActivityLabels) -> ActivityRef<'_> {
    ActivityRef {
        name: &labels.name,
        labels: &labels.labels,
    }
}

/// `Ok` if `caller` holds `role` over the activity; otherwise `not_found` when it may not even
/// view it, `PERMISSION_DENIED` when it may.
fn check(
    caller: &Principal,
    role: Role,
    activity: &ActivityRef<'_>,
    not_found: impl FnOnce() -> AdminError,
) -> Result<(), AdminError> {
    if caller.may(role, activity) {
        return Ok(());
    }
    if !caller.may(Role::Viewer, activity) {
        return Err(not_found());
    }
    Err(AdminError::PermissionDenied(format!(
        "{} may not do this to activity {:?}: it needs the role {role} over it",
        caller.subject, activity.name
    )))
}

/// [`Admin::check_run_or_task`] once the run's or task's activity (`owner`) is known.
pub(super) fn check_owner(
    caller: &Principal,
    role: Role,
    kind: RunOrTask,
    id: Uuid,
    owner: Option<&ActivityLabels>,
) -> Result<bool, AdminError> {
    if caller.may_everywhere(Role::Admin) {
        return Ok(false);
    }
    let not_found = || AdminError::NotFound {
        what: match kind {
            RunOrTask::Run => "run",
            RunOrTask::Task => "task",
        },
        id: id.to_string(),
    };
    let activity = reference(owner.ok_or_else(not_found)?);
    check(caller, role, &activity, not_found)?;
    Ok(!caller.may(Role::Admin, &activity))
}

impl Admin {
    /// The live activity `id_or_name` (at `version`, else current), if `caller` holds `role` over
    /// it.
    pub(super) async fn activity_for(
        &self,
        caller: &Principal,
        id_or_name: &str,
        version: Option<u32>,
        role: Role,
    ) -> Result<ActivityRecord, AdminError> {
        self.checked_activity(caller, id_or_name, version, role, None)
            .await
    }

    /// [`Admin::activity_for`] for a call that changes it: the audit row names the activity and
    /// its current version before the check, so a refusal says what it refused.
    pub(super) async fn audited_activity(
        &self,
        caller: &Principal,
        id_or_name: &str,
        role: Role,
        audit: &mut AuditEntry,
    ) -> Result<ActivityRecord, AdminError> {
        self.checked_activity(caller, id_or_name, None, role, Some(audit))
            .await
    }

    async fn checked_activity(
        &self,
        caller: &Principal,
        id_or_name: &str,
        version: Option<u32>,
        role: Role,
        audit: Option<&mut AuditEntry>,
    ) -> Result<ActivityRecord, AdminError> {
        let id = self.resolve(id_or_name).await?;
        let current = self.load(id, None).await?;
        if let Some(audit) = audit {
            audit.activity(current.id, &current.name);
            audit.version_before = Some(current.current_version);
        }
        // Only the labels are needed: read them, rather than the whole spec, from its JSON.
        let labels: HashMap<String, String> = current
            .spec
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        let activity = ActivityRef {
            name: &current.name,
            labels: &labels,
        };
        check(caller, role, &activity, || AdminError::NotFound {
            what: "activity",
            id: id_or_name.to_owned(),
        })?;
        match version {
            None => Ok(current),
            Some(_) => self.load(id, version).await,
        }
    }

    /// Checks `caller` against the activity of a run or task (`NOT_FOUND` for one that does not
    /// exist or that it may not view); returns whether what it reads of it must be redacted.
    pub(super) async fn check_run_or_task(
        &self,
        caller: &Principal,
        role: Role,
        kind: RunOrTask,
        id: Uuid,
    ) -> Result<bool, AdminError> {
        if caller.may_everywhere(Role::Admin) {
            return Ok(false);
        }
        let owner = views::owner_of(&self.pool, kind, id).await?;
        check_owner(
            caller,
            role,
            kind,
            id,
            owner.as_ref().map(|(_, labels)| labels),
        )
    }

    /// The activities `caller` may view, for list filters: `None` when it may view them all.
    pub(super) async fn visible_activities(
        &self,
        caller: &Principal,
    ) -> Result<Option<Vec<Uuid>>, AdminError> {
        self.activities_under(caller, Role::Viewer)
            .await
            .map(|ids| ids.map(|ids| ids.into_iter().collect()))
    }

    /// What `caller` reads redacted, for lists.
    pub(super) async fn redaction(&self, caller: &Principal) -> Result<Redaction, AdminError> {
        if !caller.may_somewhere(Role::Admin) {
            return Ok(Redaction::Everything);
        }
        Ok(match self.activities_under(caller, Role::Admin).await? {
            None => Redaction::Nothing,
            Some(ids) => Redaction::Except(ids),
        })
    }

    async fn activities_under(
        &self,
        caller: &Principal,
        role: Role,
    ) -> Result<Option<HashSet<Uuid>>, AdminError> {
        let coverage = caller.coverage(role);
        if coverage == Coverage::Everything {
            return Ok(None);
        }
        let all = views::all_activity_labels(&self.pool).await?;
        Ok(Some(
            all.iter()
                .filter(|(_, labels)| coverage.covers(&reference(labels)))
                .map(|(id, _)| *id)
                .collect(),
        ))
    }
}

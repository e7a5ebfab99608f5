//! Activity definitions: create, update, read, list, delete, pause and resume.

use chrono::Utc;
use taskfactory_model::access::{ActivityRef, Principal, Role};
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::{self, chrono_to_timestamp};
use taskfactory_model::{redact, sizes, values};
use taskfactory_proto::v1::{
    self, Activity, ActivitySpec, CreateActivityRequest, DeleteActivityRequest,
    DeleteActivityResponse, GetActivityRequest, ListActivitiesRequest, ListActivitiesResponse,
    ListActivityVersionsRequest, ListActivityVersionsResponse, UpdateActivityRequest, trigger,
};

use super::spec_calls::SpecCallSlot;
use super::{Admin, AdminError, SpecLimits, invalid, page_size};
use crate::audit::AuditEntry;
use crate::store::{self, ActivityRecord};

/// A spec that entered through the API (create, update, preview), checked: valid, and within
/// `--max-spec-bytes`. With its canonical JSON and that JSON's size.
pub(super) fn validated_spec(
    spec: Option<ActivitySpec>,
    limits: &SpecLimits,
) -> Result<ValidSpec, AdminError> {
    let spec = spec.ok_or_else(|| invalid("spec", "is required"))?;
    spec::validate(&spec, Utc::now()).map_err(AdminError::InvalidSpec)?;
    let json = taskfactory_proto::try_to_json(&spec)
        .map_err(|e| invalid("spec", format!("has a value out of range: {e}")))?;
    let bytes = sizes::json_bytes(&json);
    sizes::admit_spec(bytes, limits.max_spec_bytes)
        .map_err(|error| invalid("spec", error.to_string()))?;
    Ok(ValidSpec { spec, json, bytes })
}

pub(super) struct ValidSpec {
    pub spec: ActivitySpec,
    pub json: serde_json::Value,
    pub bytes: u64,
}

/// What a create or an update stores as the new version.
fn new_version<'a>(
    valid: &'a ValidSpec,
    caller: &'a Principal,
    limits: &SpecLimits,
) -> store::NewVersion<'a> {
    let spec = &valid.spec;
    store::NewVersion {
        spec: &valid.json,
        spec_bytes: valid.bytes,
        limits: limits.totals(),
        enabled: spec::is_enabled(spec),
        trigger_kind: trigger_kind(spec),
        created_by: &caller.subject,
    }
}

fn trigger_kind(spec: &ActivitySpec) -> &'static str {
    match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(trigger::Kind::Schedule(_)) => "schedule",
        Some(trigger::Kind::Event(_)) => "event",
        _ => "manual",
    }
}

/// The spec of a stored record (it passed validation when stored).
pub(super) fn stored_spec(record: &ActivityRecord) -> Result<ActivitySpec, AdminError> {
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
    let schedule_trigger = match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(trigger::Kind::Schedule(schedule)) => Some(schedule),
        _ => None,
    };
    let max_runs = schedule_trigger.map_or(0, |schedule| schedule.max_runs);
    let (watermark, fires) = schedule.map_or((None, 0), |(w, n)| (Some(w), n));
    let exhausted = max_runs > 0 && fires >= max_runs;
    let after = watermark.map_or(now, |w| w.max(now));
    let next_fire_at = if record.enabled
        && !record.paused
        && !exhausted
        && record.version == record.current_version
    {
        // From the spec already parsed (the stored one passed validation).
        schedule_trigger
            .and_then(|trigger| spec::build_schedule(trigger).ok())
            .and_then(|schedule| schedule.next_after(after))
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
        created_by: record.created_by.clone(),
    })
}

impl Admin {
    /// A stored record as the contract's `Activity`, with its schedule's progress, as `caller`
    /// may see it. The change (if any) is already committed: a failed read of the schedule's
    /// progress only leaves `nextFireAt` as the schedule alone says.
    pub(super) async fn activity_view(
        &self,
        caller: &Principal,
        record: &ActivityRecord,
    ) -> Result<Activity, AdminError> {
        let schedule = match store::schedule_state(&self.pool, record.id).await {
            Ok(schedule) => schedule,
            Err(error) => {
                tracing::warn!(activity.id = %record.id, error = %taskfactory_runtime::telemetry::error_chain(&error), "cannot read the schedule's progress");
                None
            }
        };
        let mut activity = activity_message_with(record, self.clock.now(), schedule)?;
        redact_activity_for(caller, &mut activity);
        Ok(activity)
    }

    pub(super) async fn create_activity_for(
        &self,
        caller: &Principal,
        request: CreateActivityRequest,
        audit: &mut AuditEntry,
        slot: Option<SpecCallSlot>,
    ) -> Result<Activity, AdminError> {
        let valid = validated_spec(request.spec, &self.limits)?;
        let spec = &valid.spec;
        audit.activity_name = spec.name.clone();
        Self::check_spec(caller, Role::Editor, spec, "create")?;
        Self::check_labels(caller, spec, None)?;
        let record = store::create_activity(
            &self.pool,
            ActivityId::new_random(),
            &spec.name,
            new_version(&valid, caller, &self.limits),
            self.clock.now(),
        )
        .await?;
        audit.activity(record.id, &record.name);
        audit.version_after = Some(record.version);
        tracing::info!(activity.id = %record.id, activity.name = %record.name, principal = %caller.subject, "activity created");
        let view = self.activity_view(caller, &record).await;
        // The spec trees are gone: the slot is free for the next call while this one waits for
        // the registry (reloads asked for at once share loads).
        drop((valid, record, slot));
        self.definitions_changed().await;
        view
    }

    pub(super) async fn update_activity_for(
        &self,
        caller: &Principal,
        request: UpdateActivityRequest,
        audit: &mut AuditEntry,
        slot: Option<SpecCallSlot>,
    ) -> Result<Activity, AdminError> {
        let current = self
            .audited_activity(caller, &request.id, Role::Editor, audit)
            .await?;
        let mut spec = request.spec;
        if let Some(spec) = spec.as_mut()
            && spec.name.is_empty()
        {
            spec.name = current.name.clone();
        }
        let valid = validated_spec(spec, &self.limits)?;
        let spec = &valid.spec;
        if spec.name != current.name {
            return Err(invalid(
                "spec.name",
                format!(
                    "an activity cannot be renamed ({:?} → {:?}); create a new activity instead",
                    current.name, spec.name
                ),
            ));
        }
        // The new labels must stay within the caller's reach: no moving an activity into
        // another team's scope, or out of one's own.
        Self::check_spec(caller, Role::Editor, spec, "update")?;
        Self::check_labels(caller, spec, Some(&stored_spec(&current)?))?;
        let (record, changed) = store::update_activity(
            &self.pool,
            current.id,
            current.current_version,
            new_version(&valid, caller, &self.limits),
            self.clock.now(),
        )
        .await?;
        audit.version_after = Some(record.version);
        audit.detail("changed", changed);
        if changed {
            tracing::info!(activity.id = %record.id, activity.name = %record.name, version = record.version, principal = %caller.subject, "activity updated");
        }
        let view = self.activity_view(caller, &record).await;
        // As for a create: the slot is free before the registry is brought up to date.
        drop((valid, current, record, slot));
        if changed {
            self.definitions_changed().await;
        }
        view
    }

    pub(super) async fn get_activity_for(
        &self,
        caller: &Principal,
        request: GetActivityRequest,
    ) -> Result<Activity, AdminError> {
        let version = (request.version != 0).then_some(request.version);
        let record = self
            .activity_for(caller, &request.id, version, Role::Viewer)
            .await?;
        self.activity_view(caller, &record).await
    }

    pub(super) async fn list_activity_versions_for(
        &self,
        caller: &Principal,
        request: ListActivityVersionsRequest,
    ) -> Result<ListActivityVersionsResponse, AdminError> {
        let record = self
            .activity_for(caller, &request.id, None, Role::Viewer)
            .await?;
        let versions = store::activity_versions(&self.pool, record.id)
            .await?
            .into_iter()
            .map(|(version, created_at, created_by)| v1::ActivityVersion {
                version,
                created_at: Some(chrono_to_timestamp(created_at)),
                current: version == record.current_version,
                created_by,
            })
            .collect();
        Ok(ListActivityVersionsResponse { versions })
    }

    pub(super) async fn list_activities_for(
        &self,
        caller: &Principal,
        request: ListActivitiesRequest,
    ) -> Result<ListActivitiesResponse, AdminError> {
        let limit = page_size(request.page_size);
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let visible = self.visible_activities(caller).await?;
        // A page of large specs is shorter: it costs no more than about one spec call.
        let (records, next_after) = store::list_activities(
            &self.pool,
            after,
            usize::try_from(limit).unwrap_or(usize::MAX),
            self.limits.max_spec_bytes,
            visible.as_deref(),
        )
        .await?;
        let next_page_token = next_after.unwrap_or_default();
        let states: std::collections::HashMap<ActivityId, (chrono::DateTime<Utc>, u64)> =
            store::schedule_states_of(
                &self.pool,
                &records.iter().map(|r| r.id).collect::<Vec<_>>(),
            )
            .await?
            .into_iter()
            .map(|(id, watermark, fires)| (id, (watermark, fires)))
            .collect();
        let now = self.clock.now();
        let mut activities = Vec::with_capacity(records.len());
        for record in &records {
            let mut activity = activity_message_with(record, now, states.get(&record.id).copied())?;
            redact_activity_for(caller, &mut activity);
            activities.push(activity);
        }
        Ok(ListActivitiesResponse {
            activities,
            next_page_token,
        })
    }

    pub(super) async fn delete_activity_for(
        &self,
        caller: &Principal,
        request: DeleteActivityRequest,
        audit: &mut AuditEntry,
    ) -> Result<DeleteActivityResponse, AdminError> {
        let record = self
            .audited_activity(caller, &request.id, Role::Editor, audit)
            .await?;
        store::delete_activity(&self.pool, record.id).await?;
        tracing::info!(activity.id = %record.id, principal = %caller.subject, "activity deleted");
        self.definitions_changed().await;
        Ok(DeleteActivityResponse {})
    }

    /// Pauses or resumes with a note.
    pub(super) async fn set_paused_for(
        &self,
        caller: &Principal,
        id_or_name: &str,
        paused: bool,
        note: &str,
        audit: &mut AuditEntry,
    ) -> Result<Activity, AdminError> {
        let record = self
            .audited_activity(caller, id_or_name, Role::Operator, audit)
            .await?;
        audit.detail("note", note);
        let mut note = note.to_owned();
        values::make_storable_text(&mut note);
        let found =
            store::set_paused(&self.pool, record.id, paused, &note, self.clock.now()).await?;
        if !found {
            return Err(AdminError::NotFound {
                what: "activity",
                id: id_or_name.to_owned(),
            });
        }
        tracing::info!(activity.id = %record.id, note, principal = %caller.subject, "{}", if paused { "activity paused" } else { "activity resumed" });
        self.definitions_changed().await;
        let record = self.load(record.id, None).await?;
        self.activity_view(caller, &record).await
    }

    /// Whether `caller` may give the spec the labels it adds or changes (over `current`): only
    /// with an editor grant over everything or over that label, and never so that the change
    /// gives the caller a role over an existing activity it does not hold now (say, admin, and
    /// with it the activity's past runs unredacted).
    pub(super) fn check_labels(
        caller: &Principal,
        spec: &ActivitySpec,
        current: Option<&ActivitySpec>,
    ) -> Result<(), AdminError> {
        let mut labels: Vec<_> = spec.labels.iter().collect();
        labels.sort();
        for (key, value) in labels {
            let unchanged = current.is_some_and(|c| c.labels.get(key) == Some(value));
            if !unchanged && !caller.may_label(Role::Editor, key, value) {
                return Err(AdminError::PermissionDenied(format!(
                    "{} may not label an activity {key}={value}: that takes the role editor over everything or over {key}={value}",
                    caller.subject
                )));
            }
        }
        let Some(current) = current else {
            return Ok(());
        };
        let before = ActivityRef {
            name: &current.name,
            labels: &current.labels,
        };
        let after = ActivityRef {
            name: &spec.name,
            labels: &spec.labels,
        };
        for role in Role::ALL {
            if caller.may(role, &after) && !caller.may(role, &before) {
                return Err(AdminError::PermissionDenied(format!(
                    "{} may not relabel activity {:?} so: it would give itself the role {role} over it",
                    caller.subject, spec.name
                )));
            }
        }
        // Removing a label takes the same: it takes the activity out of that label's scope.
        let mut removed: Vec<_> = current
            .labels
            .iter()
            .filter(|(key, value)| spec.labels.get(*key) != Some(*value))
            .collect();
        removed.sort();
        for (key, value) in removed {
            if !caller.may_label(Role::Editor, key, value) {
                return Err(AdminError::PermissionDenied(format!(
                    "{} may not remove the label {key}={value}: that takes the role editor over everything or over {key}={value}",
                    caller.subject
                )));
            }
        }
        Ok(())
    }

    /// Whether `caller` holds `role` over an activity with this spec's name and labels.
    pub(super) fn check_spec(
        caller: &Principal,
        role: Role,
        spec: &ActivitySpec,
        verb: &str,
    ) -> Result<(), AdminError> {
        let activity = ActivityRef {
            name: &spec.name,
            labels: &spec.labels,
        };
        if caller.may(role, &activity) {
            return Ok(());
        }
        Err(AdminError::PermissionDenied(format!(
            "{} may not {verb} an activity named {:?}{}: it needs the role {role} over it",
            caller.subject,
            spec.name,
            if spec.labels.is_empty() {
                String::new()
            } else {
                let mut labels: Vec<_> = spec
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                labels.sort();
                format!(" with labels {}", labels.join(", "))
            }
        )))
    }
}

/// Redacts an activity unless `caller` is admin over it.
fn redact_activity_for(caller: &Principal, activity: &mut Activity) {
    let Some(spec) = activity.spec.as_ref() else {
        return;
    };
    let reference = ActivityRef {
        name: &spec.name,
        labels: &spec.labels,
    };
    if !caller.may(Role::Admin, &reference) {
        redact::redact_activity(activity);
    }
}

//! Fires by hand (TriggerActivity, Backfill), previews, what schedules will do and did, and what
//! became of each event (ListEventDecisions).

use chrono::Utc;
use taskfactory_model::access::{ActivityRef, Principal, Role};
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::{self, SpecErrors, chrono_to_timestamp};
use taskfactory_model::{redact, values};
use taskfactory_proto::v1::{
    self, BackfillRequest, BackfillResponse, ListEventDecisionsRequest, ListEventDecisionsResponse,
    ListOccurrencesRequest, ListOccurrencesResponse, ListScheduleTimesRequest,
    ListScheduleTimesResponse, PreviewRunRequest, PreviewRunResponse, TriggerActivityRequest,
    TriggerActivityResponse, TriggerSource,
};
use uuid::Uuid;

use super::definitions::{stored_spec, validated_spec};
use super::{Admin, AdminError, invalid, overlap_override, page_size, timestamp};
use crate::audit::AuditEntry;
use crate::event_ledger;
use crate::fire::{self, FireRequest};
use crate::ledger;
use crate::registry::LiveActivity;

/// The admission of a manual fire of an activity with `flow.concurrency` or `flow.throttle`: its
/// keys and priority over the fire's payload (`event`). One that cannot be computed refuses the
/// call, naming the field.
fn manual_admission(
    spec: &v1::ActivitySpec,
    payload: Option<&serde_json::Value>,
) -> Result<Option<v1::FlowAdmission>, AdminError> {
    use taskfactory_model::expr::{Engine, Limits, event_scope};
    if admitted_by_flow(spec).is_none() {
        return Ok(None);
    }
    let engine = Engine::new(Limits::default());
    let scope = event_scope(payload.unwrap_or(&serde_json::Value::Null), "");
    taskfactory_model::flow::admission(
        spec,
        |source| engine.expression(source)?.eval_key(&scope),
        |source| engine.expression(source)?.eval_priority(&scope),
    )
    .map_err(|error| match error.split_once(": ") {
        Some((field, message)) => invalid(field, format!("on this payload: {message}")),
        None => invalid("flow", error),
    })
}

/// The flow control that admits the activity's runs, if any (an overlap override does not apply).
fn admitted_by_flow(spec: &v1::ActivitySpec) -> Option<&'static str> {
    let flow = spec.flow.as_ref()?;
    if flow.concurrency.is_some() {
        Some("flow.concurrency")
    } else if flow.throttle.is_some() {
        Some("flow.throttle")
    } else {
        None
    }
}

/// Refuses an overlap override for an activity whose runs its flow control admits.
fn refuse_overlap_under_flow(
    overlap: v1::OverlapPolicy,
    spec: &v1::ActivitySpec,
) -> Result<(), AdminError> {
    match admitted_by_flow(spec) {
        Some(by) if overlap != v1::OverlapPolicy::OverlapUnspecified => Err(invalid(
            "overlap",
            format!(
                "this activity's runs are admitted by its {by}; an overlap override does not apply"
            ),
        )),
        _ => Ok(()),
    }
}

/// Fire times one `Backfill` call may cover.
const MAX_BACKFILL: usize = 10_000;

impl Admin {
    pub(super) async fn trigger_activity_for(
        &self,
        caller: &Principal,
        request: TriggerActivityRequest,
        audit: &mut AuditEntry,
    ) -> Result<TriggerActivityResponse, AdminError> {
        let record = self
            .audited_activity(caller, &request.id, Role::Operator, audit)
            .await?;
        audit.idempotency_key = request.idempotency_key.clone();
        if !record.enabled {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} is disabled; enable it (UpdateActivity with enabled: true) before triggering it",
                record.name
            )));
        }
        let overlap = overlap_override(request.overlap)?;
        let spec: v1::ActivitySpec =
            taskfactory_proto::from_json(&record.spec).map_err(|error| {
                AdminError::Internal(anyhow::anyhow!(
                    "stored spec of {} does not load: {error}",
                    record.name
                ))
            })?;
        refuse_overlap_under_flow(overlap, &spec)?;
        let dedupe_key = if request.idempotency_key.is_empty() {
            format!("manual:{}", Uuid::new_v4())
        } else {
            format!("manual:{}", request.idempotency_key)
        };
        let payload = request.payload.as_ref().map(values::value_to_json);
        if let Some(payload) = &payload {
            audit.detail("payloadBytes", payload.to_string().len());
        }
        let flow = manual_admission(&spec, payload.as_ref())?;
        let fired = fire::fire(
            &self.pool,
            &self.js,
            FireRequest {
                activity_id: record.id,
                activity_name: record.name.clone(),
                activity_version: record.current_version,
                source: TriggerSource::Manual,
                dedupe_key,
                scheduled_for: None,
                payload: payload.map(std::sync::Arc::new),
                subject: String::new(),
                fired_at: Utc::now(),
                dst_note: None,
                overlap,
                origin: None,
                rate_limit: None,
                flow,
            },
            None,
        )
        .await?;
        audit.detail("runId", fired.run_id.to_string());
        audit.detail("duplicate", fired.duplicate);
        Ok(TriggerActivityResponse {
            run_id: fired.run_id.to_string(),
            event_id: fired.fire_id.to_string(),
            duplicate: fired.duplicate,
        })
    }

    pub(super) async fn backfill_for(
        &self,
        caller: &Principal,
        request: BackfillRequest,
        audit: &mut AuditEntry,
    ) -> Result<BackfillResponse, AdminError> {
        let overlap = overlap_override(request.overlap)?;
        let record = self
            .audited_activity(caller, &request.id, Role::Operator, audit)
            .await?;
        if !record.enabled {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} is disabled; enable it before backfilling",
                record.name
            )));
        }
        let start = timestamp("start", request.start.as_ref())?
            .ok_or_else(|| invalid("start", "is required"))?;
        let end =
            timestamp("end", request.end.as_ref())?.ok_or_else(|| invalid("end", "is required"))?;
        audit.detail("start", start.to_rfc3339());
        audit.detail("end", end.to_rfc3339());
        if start > end {
            return Err(invalid("start", "must not be after end"));
        }
        let now = self.clock.now();
        if end > now {
            return Err(invalid(
                "end",
                format!(
                    "{end} is in the future; a backfill covers past times (the schedule fires the future ones)"
                ),
            ));
        }
        let live = LiveActivity::from_record(&record).ok_or_else(|| {
            AdminError::Internal(anyhow::anyhow!(
                "stored spec of {} does not load",
                record.name
            ))
        })?;
        refuse_overlap_under_flow(overlap, &live.spec)?;
        let Some(schedule) = live.schedule.clone() else {
            return Err(AdminError::FailedPrecondition(format!(
                "activity {:?} has no schedule trigger; only schedules can be backfilled (use TriggerActivity)",
                record.name
            )));
        };
        let times: Vec<_> = schedule
            .occurrences_after(start - chrono::Duration::nanoseconds(1))
            .take_while(|o| o.at <= end)
            .take(MAX_BACKFILL + 1)
            .collect();
        if times.len() > MAX_BACKFILL {
            return Err(invalid(
                "end",
                format!(
                    "the range holds more than {MAX_BACKFILL} fire times; backfill it in smaller ranges"
                ),
            ));
        }
        let mut response = BackfillResponse::default();
        for occurrence in times {
            let fired = fire::fire(
                &self.pool,
                &self.js,
                FireRequest {
                    activity_id: record.id,
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
                    origin: None,
                    rate_limit: None,
                    flow: crate::scheduler::schedule_admission(&live.spec),
                },
                None,
            )
            .await?;
            if fired.duplicate {
                response.duplicates += 1;
            } else {
                response.fires += 1;
            }
        }
        audit.detail("fires", response.fires);
        audit.detail("duplicates", response.duplicates);
        tracing::info!(activity.name = %record.name, %start, %end, fires = response.fires, duplicates = response.duplicates, principal = %caller.subject, "backfill");
        Ok(response)
    }

    /// A preview runs the activity's context sources, so it needs what editing needs, and is
    /// audited like a change.
    pub(super) async fn preview_run_for(
        &self,
        caller: &Principal,
        request: PreviewRunRequest,
        audit: &mut AuditEntry,
    ) -> Result<PreviewRunResponse, AdminError> {
        let (id, version, spec) = match (request.id.is_empty(), request.spec) {
            (false, None) => {
                let record = self
                    .audited_activity(caller, &request.id, Role::Editor, audit)
                    .await?;
                let spec = stored_spec(&record)?;
                (record.id, record.current_version, spec)
            }
            (true, Some(spec)) => {
                let spec = validated_spec(Some(spec), &self.limits)?.spec;
                audit.activity_name = spec.name.clone();
                audit.detail("unsavedSpec", true);
                Self::check_spec(caller, Role::Editor, &spec, "preview")?;
                // An unsaved spec for an existing activity previews as that activity would run,
                // so the caller must be its editor too.
                // Its labels decide what the caller reads unredacted: only labels it may give.
                let id = match crate::store::find_activity_id(&self.pool, &spec.name).await? {
                    Some(_) => {
                        let record = self
                            .audited_activity(caller, &spec.name, Role::Editor, audit)
                            .await?;
                        Self::check_labels(caller, &spec, Some(&stored_spec(&record)?))?;
                        record.id
                    }
                    None => {
                        Self::check_labels(caller, &spec, None)?;
                        ActivityId(Uuid::new_v5(
                            &Uuid::NAMESPACE_URL,
                            format!("taskfactory:preview:{}", spec.name).as_bytes(),
                        ))
                    }
                };
                (id, 0, spec)
            }
            (false, Some(_)) => {
                return Err(invalid("spec", "give either id or spec, not both"));
            }
            (true, None) => {
                return Err(invalid(
                    "id",
                    "is required: an activity id or name, or an unsaved spec in `spec`",
                ));
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
            flow: None,
        };
        let body = serde_json::json!({
            "spec": taskfactory_proto::to_json(&spec),
            "event": taskfactory_proto::to_json(&event),
        });
        let mut response = self.ask_preview(caller, &body).await?;
        let admin = caller.may(
            Role::Admin,
            &ActivityRef {
                name: &spec.name,
                labels: &spec.labels,
            },
        );
        if !admin {
            redact::redact_preview(&mut response);
        }
        audit.detail("tasks", response.tasks.len());
        Ok(response)
    }

    async fn ask_preview(
        &self,
        caller: &Principal,
        body: &serde_json::Value,
    ) -> Result<PreviewRunResponse, AdminError> {
        let reply = crate::internal::send(
            &self.pool,
            &self.nats,
            taskfactory_model::subjects::PREVIEW_REQUESTS,
            "preview",
            &caller.subject,
            serde_json::to_vec(body).unwrap_or_default(),
            taskfactory_model::subjects::PREVIEW_TIMEOUT,
        )
        .await
        .map_err(super::runs::internal_error)?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("preview answer: {e}")))?;
        if answer.get("error").is_some() {
            return Err(super::runs::orchestrator_refusal(&answer, "preview failed"));
        }
        taskfactory_proto::from_json(&answer)
            .map_err(|e| AdminError::Internal(anyhow::anyhow!("preview answer: {e}")))
    }

    pub(super) async fn list_schedule_times_for(
        &self,
        caller: &Principal,
        request: ListScheduleTimesRequest,
    ) -> Result<ListScheduleTimesResponse, AdminError> {
        let (key, trigger) = match (request.id.is_empty(), request.schedule) {
            (false, None) => {
                let record = self
                    .activity_for(caller, &request.id, None, Role::Viewer)
                    .await?;
                let spec = stored_spec(&record)?;
                let trigger = ledger::schedule_trigger(&spec).cloned().ok_or_else(|| {
                    AdminError::FailedPrecondition(format!(
                        "activity {:?} has no schedule trigger; only schedules have fire times",
                        record.name
                    ))
                })?;
                (record.id.to_string(), trigger)
            }
            (true, Some(schedule)) => (String::new(), schedule),
            (false, Some(_)) => {
                return Err(invalid("schedule", "give either id or schedule, not both"));
            }
            (true, None) => {
                return Err(invalid(
                    "id",
                    "is required: an activity id or name, or an ad-hoc schedule in `schedule`",
                ));
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
            ));
        }
        let count = if request.count == 0 {
            10
        } else {
            request.count
        };
        let times = ledger::schedule_times(&key, &trigger, &schedule, after, count);
        Ok(ListScheduleTimesResponse { times })
    }

    pub(super) async fn list_occurrences_for(
        &self,
        caller: &Principal,
        request: ListOccurrencesRequest,
    ) -> Result<ListOccurrencesResponse, AdminError> {
        let record = self
            .activity_for(caller, &request.id, None, Role::Viewer)
            .await?;
        let end = timestamp("end", request.end.as_ref())?.unwrap_or_else(|| self.clock.now());
        let start =
            timestamp("start", request.start.as_ref())?.unwrap_or(end - chrono::Duration::days(1));
        if start > end {
            return Err(invalid("start", "must not be after end"));
        }
        let occurrences = ledger::list_occurrences(&self.pool, record.id, start, end).await?;
        Ok(ListOccurrencesResponse { occurrences })
    }

    pub(super) async fn list_event_decisions_for(
        &self,
        caller: &Principal,
        request: ListEventDecisionsRequest,
    ) -> Result<ListEventDecisionsResponse, AdminError> {
        use v1::event_decision::Decision;
        // A deleted activity's decisions stay readable by its id.
        let activity_id = if request.activity.is_empty() {
            None
        } else if let Ok(id) = Uuid::parse_str(&request.activity) {
            Some(id)
        } else {
            Some(
                self.activity_for(caller, &request.activity, None, Role::Viewer)
                    .await?
                    .id
                    .0,
            )
        };
        let mut decisions = Vec::with_capacity(request.decisions.len());
        for &value in &request.decisions {
            match Decision::try_from(value) {
                Ok(Decision::Unspecified) | Err(_) => {
                    return Err(invalid(
                        "decisions",
                        format!("{value} is not an event decision"),
                    ));
                }
                Ok(decision) => decisions.push(decision),
            }
        }
        let start = timestamp("start", request.start.as_ref())?;
        let end = timestamp("end", request.end.as_ref())?;
        if let (Some(start), Some(end)) = (start, end)
            && start > end
        {
            return Err(invalid("start", "must not be after end"));
        }
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(
                event_ledger::Cursor::decode(&request.page_token)
                    .ok_or_else(|| invalid("pageToken", "is not a token this API returned"))?,
            )
        };
        let query = event_ledger::Query {
            activity_id,
            key: (!request.key.is_empty()).then(|| request.key.clone()),
            event_id: (!request.event_id.is_empty()).then(|| request.event_id.clone()),
            decisions,
            start,
            end,
            only: self.visible_activities(caller).await?,
            after,
            limit: page_size(request.page_size),
        };
        let (mut decisions, next) = event_ledger::list(&self.pool, &query).await?;
        // Keys and reasons are the events' data: credential-shaped values are hidden from
        // callers below admin, as in runs.
        let redaction = self.redaction(caller).await?;
        for decision in &mut decisions {
            if redaction.applies_to(&decision.activity_id) {
                redact::redact_text(&mut decision.key);
                redact::redact_text(&mut decision.flow_key);
                redact::redact_text(&mut decision.reason);
            }
        }
        Ok(ListEventDecisionsResponse {
            decisions,
            next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
        })
    }
}

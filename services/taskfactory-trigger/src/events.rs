//! Event ingress: consumes `events.>` and fires every active activity whose event trigger matches.
//!
//! For each event:
//! - a body over the size limit, not JSON, or not UTF-8 is *rejected*: recorded in Postgres
//!   (`rejected_events`) with its error, copied to `dlq.events`, and terminated — it never blocks
//!   the consumer and the next event is handled as usual;
//! - otherwise each matching activity's `filter` decides, its `dedupeKey` (else the
//!   `Nats-Msg-Id` header, else the stream sequence) names the fire, and the fire is recorded and
//!   published ([`crate::fire`]), together with the fires of the other events in hand
//!   ([`FireBatcher`]: one transaction, one publish round, one published mark). A filter or key that fails on this event skips that activity
//!   with a warning; it does not reject the event for the others.
//! - The event is acked once every fire is recorded; a database failure retries the whole event
//!   (fires already recorded are recognised as duplicates). A fire the database refuses for its
//!   data (it would every time) is that activity's alone: the others fire, and the event is then
//!   rejected once, naming each activity refused.
//!
//! # Memory
//!
//! An event's JSON tree takes up to tens of times its bytes (a body of many small values), so:
//! - an event is handled only with room for its bytes among those in hand
//!   (`--event-bytes-in-flight`; the wait says "in progress" to JetStream, so the message is not
//!   redelivered meanwhile);
//! - an event no activity listens to is checked without building its tree;
//! - the tree the expressions read (a second copy) is built only for a filter or a `dedupeKey`
//!   template, and dropped before anything is fired; the fires of one event share its payload.

use std::sync::Arc;
use std::time::Duration;
use taskfactory_runtime::db;
use taskfactory_runtime::metrics;
use taskfactory_runtime::telemetry::error_chain;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;
use sqlx::PgPool;
use taskfactory_model::expr::{self, Engine, Limits};
use taskfactory_model::subjects;
use taskfactory_proto::v1::TriggerSource;
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_runtime::messaging::{ByteBudget, Handler, Then, Unfinished};
use tokio::sync::OwnedSemaphorePermit;

use crate::buffers::{self, Buffers, Gather};
use crate::event_ledger::{self, DecisionRow, DecisionWriter, EventOrigin};
use crate::fire::{self, FireBatcher, FireRequest};
use crate::flow::RateLimit;
use crate::registry::{LiveActivity, Registry};
use crate::store::{self, StoreError};
use crate::webhook;

/// How often a message waiting for room is reported in progress (well within its ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub struct EventIngress {
    pub pool: PgPool,
    /// Records and publishes the fires of the events in hand together (group commit).
    fires: FireBatcher,
    /// Records the decisions of the events in hand that made no fire (group commit).
    decisions: DecisionWriter,
    /// Debounce and batch buffers.
    buffers: Arc<Buffers>,
    pub registry: Registry,
    pub max_event_bytes: usize,
    /// Bytes of events in hand at most (`--event-bytes-in-flight`).
    in_flight: ByteBudget,
}

/// Why an event was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Recorded in `rejected_events`; dead-lettered.
    #[error("{0}")]
    Rejected(String),
    /// The database: the whole event is retried.
    #[error("{0}")]
    Transient(String),
}

impl Unfinished for EventError {
    fn then(&self) -> Then {
        match self {
            EventError::Rejected(_) => Then::DeadLetter { refused: None },
            EventError::Transient(_) => Then::Backoff,
        }
    }
}

impl Handler for EventIngress {
    type Error = EventError;

    async fn handle(&self, message: &Message) -> Result<(), EventError> {
        self.process(message).await
    }
}

impl EventIngress {
    pub fn new(
        pool: PgPool,
        fires: FireBatcher,
        buffers: Arc<Buffers>,
        registry: Registry,
        max_event_bytes: usize,
        bytes_in_flight: usize,
    ) -> Self {
        Self {
            decisions: DecisionWriter::start(pool.clone()),
            pool,
            fires,
            buffers,
            registry,
            max_event_bytes,
            in_flight: ByteBudget::new(bytes_in_flight),
        }
    }

    async fn process(&self, message: &Message) -> Result<(), EventError> {
        let _room = self.room_for(message).await;
        let subject = message.subject.as_str();
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::HEADER_MSG_ID))
            .map(|v| v.as_str().to_owned())
            .filter(|v| !v.is_empty());
        let (sequence, published, delivered) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.published.unix_timestamp_nanos(),
                info.delivered,
            ),
            Err(_) => (0, 0, 1),
        };
        let origin = Arc::new(EventOrigin {
            sequence,
            published_ns: i64::try_from(published).unwrap_or(i64::MAX),
            msg_id: msg_id.clone(),
            subject: subject.to_owned(),
        });
        let snapshot = self.registry.current();
        // Paused activities are reached too: their decision says so.
        let mut reached: Vec<&LiveActivity> = snapshot
            .listeners
            .values()
            .map(Arc::as_ref)
            .filter(|activity| {
                activity.enabled
                    && activity
                        .event_trigger()
                        .is_some_and(|trigger| subjects::subject_matches(&trigger.subject, subject))
            })
            .collect();
        if delivered > 1 && !reached.is_empty() {
            // Delivered again: an activity decided about it keeps that decision (a fire
            // recorded is published by the reconciler).
            let ids: Vec<_> = reached.iter().map(|a| a.id).collect();
            let decided = event_ledger::decided(&self.pool, &ids, &origin)
                .await
                .map_err(|e| {
                    EventError::Transient(format!(
                        "cannot read the event's decisions: {}",
                        error_chain(&e)
                    ))
                })?;
            reached.retain(|activity| !decided.contains(&activity.id));
        }
        let default_key = || match &msg_id {
            Some(id) => id.clone(),
            None => format!("seq:{sequence}:{published}"),
        };
        if reached.is_empty() {
            // Nothing to fire: checked as it would be parsed, without building it.
            return match check_event(&message.payload, self.max_event_bytes) {
                Ok(()) => Ok(()),
                Err(error) => self.reject(message, &origin, &[], &error).await,
            };
        }
        let payload = match parse_event(&message.payload, self.max_event_bytes) {
            Ok(payload) => payload,
            Err(error) => {
                let key = default_key();
                let rejected: Vec<DecisionRow> = reached
                    .iter()
                    .map(|activity| {
                        decision_row(activity, &origin, key.clone(), Decision::Rejected, &error)
                    })
                    .collect();
                return self.reject(message, &origin, &rejected, &error).await;
            }
        };
        let verdicts = decide(&reached, subject, &payload, default_key);
        let payload = Arc::new(payload);
        let mut decisions = Vec::new();
        let mut fires = Vec::new();
        let mut gathered = Vec::new();
        for verdict in verdicts {
            match verdict {
                Verdict::Fire {
                    activity,
                    dedupe_key,
                    rate_limit,
                    flow,
                } => fires.push((activity, dedupe_key, rate_limit, flow)),
                Verdict::Gather {
                    activity,
                    gather,
                    key,
                    flow,
                    event_key,
                } => gathered.push((activity, gather, key, flow, event_key)),
                Verdict::Not {
                    activity,
                    key,
                    decision,
                    reason,
                } => decisions.push(decision_row(activity, &origin, key, decision, &reason)),
            }
        }
        let tried = fires.len() + gathered.len();
        let mut refused = Vec::new();
        for (activity, gather, key, flow, event_key) in gathered {
            let taken = self
                .buffers
                .take(buffers::Event {
                    activity,
                    gather,
                    key: &key,
                    flow,
                    event_key: event_key.clone(),
                    origin: &origin,
                    payload: &payload,
                })
                .await;
            match taken {
                Ok(_) => metrics::count_events("gathered"),
                Err(error) => {
                    let why = format!(
                        "cannot take the event into a buffer of activity {}: {}",
                        activity.name,
                        error_chain(&error)
                    );
                    let Some(refusal) = db::input_refused_by_database(&error) else {
                        // Events taken before this one keep their decision when it returns.
                        return Err(EventError::Transient(why));
                    };
                    let why = format!(
                        "{why} (SQLSTATE {}: refused for this event's data; not taken)",
                        refusal.code
                    );
                    decisions.push(decision_row(
                        activity,
                        &origin,
                        event_key,
                        Decision::Rejected,
                        &why,
                    ));
                    refused.push(why);
                }
            }
        }
        // Fires the database refuses for their data (an activity's dedupe key), which it would
        // refuse every time: each is that activity's, and the others still fire. They are
        // recorded once every fire is decided, so an event retried for a transient failure
        // records none twice.
        for (activity, dedupe_key, rate_limit, flow) in fires {
            let request = FireRequest {
                activity_id: activity.id,
                activity_name: activity.name.clone(),
                activity_version: activity.version,
                source: event_source(message.headers.as_ref()),
                dedupe_key: dedupe_key.clone(),
                scheduled_for: None,
                payload: Some(payload.clone()),
                subject: subject.to_owned(),
                fired_at: chrono::Utc::now(),
                dst_note: None,
                overlap: taskfactory_proto::v1::OverlapPolicy::OverlapUnspecified,
                origin: Some(origin.clone()),
                rate_limit,
                flow,
            };
            match fire::fire_batched(&self.fires, request, None).await {
                Ok(fired) => {
                    metrics::count_events(if fired.duplicate { "deduped" } else { "fired" })
                }
                // Dropped, and recorded so with the other fires.
                Err(StoreError::RateLimited { .. }) => metrics::count_events("rate_limited"),
                Err(error) => {
                    let why = format!(
                        "cannot record the fire of activity {}: {}",
                        activity.name,
                        error_chain(&error)
                    );
                    let Some(refusal) = db::input_refused_by_database(&error) else {
                        // Fires recorded before this one are duplicates when the event returns.
                        return Err(EventError::Transient(why));
                    };
                    let why = format!(
                        "{why} (SQLSTATE {}: refused for this event's data; not fired)",
                        refusal.code
                    );
                    decisions.push(decision_row(
                        activity,
                        &origin,
                        dedupe_key,
                        Decision::Rejected,
                        &why,
                    ));
                    refused.push(why);
                }
            }
        }
        if refused.is_empty() {
            return self.record(decisions).await;
        }
        let why = format!(
            "{} ({} of the {tried} activities it matched fired)",
            refused.join("; "),
            tried - refused.len()
        );
        self.reject(message, &origin, &decisions, &why).await
    }

    /// Records the decisions about an event that made no fire at their activities.
    async fn record(&self, decisions: Vec<DecisionRow>) -> Result<(), EventError> {
        let recorded =
            futures::future::join_all(decisions.into_iter().map(|row| self.decisions.record(row)))
                .await;
        match recorded.into_iter().find_map(Result::err) {
            None => Ok(()),
            Some(error) => Err(EventError::Transient(error)),
        }
    }

    /// Waits for room for the message's bytes among the events in hand (all of the budget for
    /// one larger than it), reporting the message in progress meanwhile.
    async fn room_for(&self, message: &Message) -> OwnedSemaphorePermit {
        let room = self.in_flight.room_for(message.payload.len());
        tokio::pin!(room);
        loop {
            tokio::select! {
                room = &mut room => return room,
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    if let Err(error) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %error_chain(&*error), "cannot report an event in progress");
                    }
                }
            }
        }
    }

    /// Rejects the event: its `decisions` (at the activities it reached) and the event itself
    /// are recorded, and it is dead-lettered.
    async fn reject(
        &self,
        message: &Message,
        origin: &EventOrigin,
        decisions: &[DecisionRow],
        error: &str,
    ) -> Result<(), EventError> {
        tracing::warn!(subject = %message.subject, stream.sequence = origin.sequence, %error, "rejected event");
        metrics::count_events("rejected");
        self.record(decisions.to_vec()).await?;
        if let Err(e) = store::record_rejected_event(
            &self.pool,
            &message.subject,
            origin.sequence,
            origin.msg_id.as_deref(),
            error,
            &message.payload,
        )
        .await
        {
            return Err(EventError::Transient(format!(
                "cannot record the rejected event: {}",
                error_chain(&e)
            )));
        }
        Err(EventError::Rejected(error.to_owned()))
    }
}

/// The decision about an event at an activity that did not fire.
fn decision_row(
    activity: &LiveActivity,
    origin: &Arc<EventOrigin>,
    key: String,
    decision: Decision,
    reason: &str,
) -> DecisionRow {
    DecisionRow {
        activity_id: activity.id,
        activity_name: activity.name.clone(),
        activity_version: activity.version,
        origin: origin.clone(),
        key,
        decision,
        reason: reason.to_owned(),
        run_id: None,
        decided_at: chrono::Utc::now(),
        flow_key: None,
    }
}

/// What an event does at one activity it reached.
enum Verdict<'a> {
    /// It fires, under this key (and its rate limit, if the activity has one).
    Fire {
        activity: &'a LiveActivity,
        dedupe_key: String,
        rate_limit: Option<RateLimit>,
        flow: Option<taskfactory_proto::v1::FlowAdmission>,
    },
    /// It is gathered (`flow.debounce`, `flow.batch`) into its key's buffer.
    Gather {
        activity: &'a LiveActivity,
        gather: Gather,
        key: String,
        /// How its run is admitted, if the activity has flow.concurrency or flow.throttle.
        flow: Option<taskfactory_proto::v1::FlowAdmission>,
        event_key: String,
    },
    /// It does not: why, and the key its fire would have had (where it could be rendered).
    Not {
        activity: &'a LiveActivity,
        key: String,
        decision: Decision,
        reason: String,
    },
}

/// What the event does at each activity it `reached`: fire (with its dedupe key) or why not.
/// The expressions' copy of the event is built only if a filter or a key template needs it, and
/// is gone when this returns.
fn decide<'a>(
    reached: &[&'a LiveActivity],
    subject: &str,
    payload: &serde_json::Value,
    default_key: impl Fn() -> String,
) -> Vec<Verdict<'a>> {
    // Built only for an activity with a filter or a key template (it registers the strict
    // comparisons: a few microseconds an event otherwise).
    let engine = std::cell::OnceCell::new();
    let engine = || engine.get_or_init(|| Engine::new(Limits::default()));
    let scope = std::cell::OnceCell::new();
    let scope = || scope.get_or_init(|| expr::event_scope(payload, subject));
    let mut verdicts = Vec::new();
    for &activity in reached {
        let Some(trigger) = activity.event_trigger() else {
            continue;
        };
        if is_own_completion(subject, payload, &activity.id.to_string()) {
            // An activity never fires on the completion of its own runs: that would loop.
            continue;
        }
        let key = || -> Result<String, String> {
            if trigger.dedupe_key.is_empty() {
                return Ok(default_key());
            }
            match engine()
                .template(&trigger.dedupe_key)
                .and_then(|t| t.render_string(scope()))
            {
                Ok(key) if !key.is_empty() => Ok(key),
                Ok(_) => Err("dedupeKey rendered empty on this event".to_owned()),
                Err(error) => Err(format!("dedupeKey: {}", error_chain(&error))),
            }
        };
        let not = |key: Result<String, String>, decision, reason: String| Verdict::Not {
            activity,
            key: key.unwrap_or_else(|_| default_key()),
            decision,
            reason,
        };
        if activity.paused {
            verdicts.push(not(
                key(),
                Decision::Paused,
                "the activity was paused".to_owned(),
            ));
            continue;
        }
        if !trigger.filter.trim().is_empty() {
            let passes = engine()
                .expression(&trigger.filter)
                .and_then(|f| f.eval_bool(scope()));
            match passes {
                Ok(true) => {}
                Ok(false) => {
                    metrics::count_events("filtered");
                    let reason = format!("the filter `{}` was false", trigger.filter.trim());
                    verdicts.push(not(key(), Decision::Filtered, reason));
                    continue;
                }
                Err(error) => {
                    metrics::count_events("filter_error");
                    let error = error_chain(&error);
                    tracing::warn!(activity.name = %activity.name, %subject, %error, "event filter failed on this event; activity not fired");
                    let reason = format!(
                        "the filter `{}` failed on this event: {error}",
                        trigger.filter.trim()
                    );
                    verdicts.push(not(key(), Decision::FilterError, reason));
                    continue;
                }
            }
        }
        let dedupe_key = match key() {
            Ok(dedupe_key) => dedupe_key,
            Err(reason) => {
                metrics::count_events("dedupe_key_error");
                tracing::warn!(activity.name = %activity.name, %subject, error = %reason, "dedupeKey failed on this event; activity not fired");
                verdicts.push(not(Err(reason.clone()), Decision::KeyError, reason));
                continue;
            }
        };
        if let Some((gather, source)) = Gather::of(activity.spec.flow.as_ref()) {
            let key = if source.trim().is_empty() {
                Ok(String::new())
            } else {
                engine()
                    .expression(source)
                    .and_then(|key| key.eval_key(scope()))
                    .map_err(|e| format!("{}.key: {e}", gather_field(gather)))
            };
            // How the gathered run is admitted (flow.concurrency, flow.throttle, flow.priority):
            // computed on each event, whose buffer is that of its keys.
            let key = key.and_then(|key| {
                let flow = taskfactory_model::flow::admission(
                    &activity.spec,
                    |source| engine().expression(source)?.eval_key(scope()),
                    |source| engine().expression(source)?.eval_priority(scope()),
                )?;
                Ok((key, flow))
            });
            match key {
                Ok((mut key, flow)) => {
                    taskfactory_model::values::make_storable_key(&mut key);
                    verdicts.push(Verdict::Gather {
                        activity,
                        gather,
                        key,
                        flow,
                        event_key: dedupe_key,
                    });
                }
                Err(reason) => {
                    metrics::count_events("dedupe_key_error");
                    tracing::warn!(activity.name = %activity.name, %subject, error = %reason, "a flow key failed on this event; activity not fired");
                    verdicts.push(not(Ok(dedupe_key), Decision::KeyError, reason));
                }
            }
            continue;
        }
        let rate_limit = match rate_limit_of(activity, |source| {
            engine()
                .expression(source)
                .and_then(|key| key.eval_key(scope()))
        }) {
            Ok(limit) => limit,
            Err(reason) => {
                metrics::count_events("dedupe_key_error");
                tracing::warn!(activity.name = %activity.name, %subject, error = %reason, "flow.rateLimit.key failed on this event; activity not fired");
                verdicts.push(not(Ok(dedupe_key), Decision::KeyError, reason));
                continue;
            }
        };
        let flow = taskfactory_model::flow::admission(
            &activity.spec,
            |source| engine().expression(source)?.eval_key(scope()),
            |source| engine().expression(source)?.eval_priority(scope()),
        );
        let flow = match flow {
            Ok(flow) => flow,
            Err(reason) => {
                metrics::count_events("dedupe_key_error");
                tracing::warn!(activity.name = %activity.name, %subject, error = %reason, "a flow key failed on this event; activity not fired");
                verdicts.push(not(Ok(dedupe_key), Decision::KeyError, reason));
                continue;
            }
        };
        verdicts.push(Verdict::Fire {
            activity,
            dedupe_key,
            rate_limit,
            flow,
        });
    }
    verdicts
}

/// The spec field of a way of gathering events.
fn gather_field(gather: Gather) -> &'static str {
    match gather {
        Gather::Debounce { .. } => "flow.debounce",
        Gather::Batch { .. } => "flow.batch",
    }
}

/// The activity's rate limit with this event's key (`eval_key` computes a key expression), if
/// it has one; `Err` says why the key could not be computed.
fn rate_limit_of(
    activity: &LiveActivity,
    eval_key: impl FnOnce(&str) -> Result<String, expr::ExprError>,
) -> Result<Option<RateLimit>, String> {
    let Some(limit) = activity
        .spec
        .flow
        .as_ref()
        .and_then(|f| f.rate_limit.as_ref())
    else {
        return Ok(None);
    };
    let period = limit
        .period
        .as_ref()
        .and_then(taskfactory_model::spec::std_duration)
        .unwrap_or_default();
    let mut key = if limit.key.trim().is_empty() {
        String::new()
    } else {
        eval_key(&limit.key)
            .map_err(|error| format!("flow.rateLimit.key: {}", error_chain(&error)))?
    };
    taskfactory_model::values::make_storable_key(&mut key);
    Ok(Some(RateLimit {
        key,
        limit: limit.limit,
        period,
    }))
}

/// Whether the event announces the completion of a run of `activity_id` itself.
fn is_own_completion(subject: &str, payload: &serde_json::Value, activity_id: &str) -> bool {
    subject == subjects::RUN_COMPLETED_EVENT
        && payload.get("activityId").and_then(|v| v.as_str()) == Some(activity_id)
}

/// `WEBHOOK` for events the webhook gateway published, `EVENT` for every other.
fn event_source(headers: Option<&async_nats::HeaderMap>) -> TriggerSource {
    let from_webhook = headers
        .and_then(|h| h.get(webhook::HEADER_SOURCE))
        .is_some_and(|v| v.as_str() == webhook::SOURCE_WEBHOOK);
    if from_webhook {
        TriggerSource::Webhook
    } else {
        TriggerSource::Event
    }
}

/// Checks an event body: within the size limit, UTF-8, JSON.
pub fn parse_event(body: &[u8], max_bytes: usize) -> Result<serde_json::Value, String> {
    check_size(body, max_bytes)?;
    serde_json::from_slice(body).map_err(not_json)
}

/// What [`parse_event`] would say of a body, without building its JSON tree (which for many small
/// values takes tens of times the body's bytes): every value is read as `parse_event` reads it
/// (numbers in range, strings UTF-8, the same nesting limit), and dropped.
pub fn check_event(body: &[u8], max_bytes: usize) -> Result<(), String> {
    check_size(body, max_bytes)?;
    serde_json::from_slice::<Checked>(body)
        .map(|_| ())
        .map_err(not_json)
}

fn check_size(body: &[u8], max_bytes: usize) -> Result<(), String> {
    if body.len() > max_bytes {
        return Err(format!(
            "event body is {} bytes, over the limit of {max_bytes} bytes",
            body.len()
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("event body is empty; events are JSON documents".to_owned());
    }
    Ok(())
}

fn not_json(error: serde_json::Error) -> String {
    format!("event body is not valid JSON: {error}")
}

/// Any JSON value, read in full and kept as nothing.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Checked, A::Error> {
        while items.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Checked, A::Error> {
        while entries.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activity_ignores_its_own_completions() {
        let payload = serde_json::json!({"activityId": "a1", "status": "RUN_SUCCEEDED"});
        assert!(is_own_completion(
            subjects::RUN_COMPLETED_EVENT,
            &payload,
            "a1"
        ));
        assert!(!is_own_completion(
            subjects::RUN_COMPLETED_EVENT,
            &payload,
            "a2"
        ));
        assert!(!is_own_completion("events.other", &payload, "a1"));
    }

    #[test]
    fn events_from_the_webhook_gateway_fire_as_webhook() {
        let mut headers = async_nats::HeaderMap::new();
        assert_eq!(event_source(None), TriggerSource::Event);
        assert_eq!(event_source(Some(&headers)), TriggerSource::Event);
        headers.insert(webhook::HEADER_SOURCE, "somewhere");
        assert_eq!(event_source(Some(&headers)), TriggerSource::Event);
        headers.insert(webhook::HEADER_SOURCE, webhook::SOURCE_WEBHOOK);
        assert_eq!(event_source(Some(&headers)), TriggerSource::Webhook);
    }

    #[test]
    fn checking_a_body_says_what_parsing_it_says() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
        let bodies: Vec<Vec<u8>> = vec![
            br#"{"a": [1, -2, 3.5, "x\u00e9", null, true, {"b": {}}]}"#.to_vec(),
            br#"{"a": 1e400}"#.to_vec(),
            br#"{"a": -1e400}"#.to_vec(),
            br#"{"a": 18446744073709551616}"#.to_vec(),
            br#"{"a": "\ud800"}"#.to_vec(),
            br#"{"a": "\uZZZZ"}"#.to_vec(),
            b"{\"a\": \"\xff\xfe\"}".to_vec(),
            b"{\"a\": \"tab\there\"}".to_vec(),
            br#"{"a": 1,}"#.to_vec(),
            br#"{"a": 1} x"#.to_vec(),
            br#"{"a" 1}"#.to_vec(),
            br#"{1: 1}"#.to_vec(),
            b"  ".to_vec(),
            b"".to_vec(),
            b"01".to_vec(),
            b"nul".to_vec(),
            deep(100),
            deep(200),
            vec![b' '; 200],
        ];
        for body in bodies {
            let parsed = parse_event(&body, 100).map(|_| ());
            assert_eq!(
                check_event(&body, 100),
                parsed,
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn event_bodies_are_checked() {
        assert!(parse_event(br#"{"a":1}"#, 100).is_ok());
        assert!(parse_event(b"[1,2]", 100).is_ok());
        assert!(
            parse_event(b"not json", 100)
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(parse_event(b"", 100).unwrap_err().contains("empty"));
        assert!(
            parse_event(&[b' '; 200], 100)
                .unwrap_err()
                .contains("over the limit")
        );
        assert!(
            parse_event(&[0xff, 0xfe], 100)
                .unwrap_err()
                .contains("not valid JSON")
        );
    }
}

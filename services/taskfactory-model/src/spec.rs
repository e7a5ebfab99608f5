//! The activity spec: loading (YAML or proto3 JSON), defaults, and validation.
//!
//! Validation runs at the API, before anything is stored: every problem is reported at once, each
//! naming its field the way the user wrote it (`tasks[0].forEach`, `trigger.schedule.timezone`).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use taskfactory_proto::v1::{
    self, ActivitySpec, ContextSource, DstPolicy, EventTrigger, RetryPolicy, ScheduleTrigger,
    TaskTemplate, context_source, dst_policy, trigger,
};

use crate::expr::{Engine, Limits};
use crate::schedule::{GapPolicy, RepeatPolicy, Schedule};
use crate::{secrets, sources, subjects};

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as written in the spec (`tasks[0].forEach`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<FieldError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "invalid activity spec: {}", parts.join("; "))
    }
}

/// A spec file could not be read as a spec at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not an activity spec: {0}")]
    Shape(String),
}

/// Parses a spec from YAML (JSON is YAML too), through the proto3 JSON mapping.
pub fn spec_from_yaml(text: &str) -> Result<ActivitySpec, LoadError> {
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| LoadError::Yaml(e.to_string()))?;
    taskfactory_proto::from_json(&value).map_err(|e| LoadError::Shape(e.to_string()))
}

/// Parses a spec from proto3 JSON text.
pub fn spec_from_json(text: &str) -> Result<ActivitySpec, LoadError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| LoadError::Json(e.to_string()))?;
    taskfactory_proto::from_json(&value).map_err(|e| LoadError::Shape(e.to_string()))
}

/// Whether the spec is enabled: a spec that does not say is.
pub fn is_enabled(spec: &ActivitySpec) -> bool {
    spec.enabled.unwrap_or(true)
}

/// Defaults for what a template leaves unset.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
pub const DEFAULT_BACKOFF_MULTIPLIER: f64 = 2.0;
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Context sources one spec may have. A run's sources are resolved at once and each may hold up
/// to the orchestrator's `--max-source-bytes` while it does, so their number bounds what one run
/// asks of the evaluation budget (`--evaluation-bytes-in-flight`) before it is evaluated.
pub const MAX_CONTEXT_SOURCES: usize = 32;

/// The retry policy with defaults filled in.
pub fn effective_retry(retry: Option<&RetryPolicy>) -> RetryPolicy {
    let given = retry.cloned().unwrap_or_default();
    RetryPolicy {
        max_attempts: if given.max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            given.max_attempts
        },
        initial_backoff: Some(
            given
                .initial_backoff
                .unwrap_or_else(|| proto_duration(DEFAULT_INITIAL_BACKOFF)),
        ),
        max_backoff: Some(
            given
                .max_backoff
                .unwrap_or_else(|| proto_duration(DEFAULT_MAX_BACKOFF)),
        ),
        multiplier: if given.multiplier == 0.0 {
            DEFAULT_BACKOFF_MULTIPLIER
        } else {
            given.multiplier
        },
    }
}

/// The task timeout with the default filled in.
/// The longest a task's attempts may take from its first delivery to its last answer: what
/// [`longest_task_life`] may reach. Half the tasks stream's 14-day age, so a task that waited in
/// the queue before its first delivery still ends before the stream drops its message.
pub const MAX_TASK_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest a task of `template` may take from its first delivery to its last answer: every
/// attempt running to its timeout, and every backoff at its longest (the executors' jitter adds
/// up to 20%, within `maxBackoff`). `None` if a duration in it is not valid.
pub fn longest_task_life(template: &TaskTemplate) -> Option<Duration> {
    let retry = effective_retry(template.retry.as_ref());
    let timeout = std_duration(&effective_timeout(template))?;
    let initial = std_duration(retry.initial_backoff.as_ref()?)?.as_secs_f64();
    let max = std_duration(retry.max_backoff.as_ref()?)?.as_secs_f64();
    let attempts = retry.max_attempts.min(MAX_ATTEMPTS_LIMIT);
    let mut total = timeout.as_secs_f64() * f64::from(attempts);
    let mut backoff = initial;
    for _ in 1..attempts {
        total += (backoff * 1.2).min(max);
        backoff *= retry.multiplier;
    }
    Some(Duration::from_secs_f64(total.min(1e15)))
}

pub fn effective_timeout(template: &TaskTemplate) -> prost_types::Duration {
    template
        .timeout
        .unwrap_or_else(|| proto_duration(DEFAULT_TASK_TIMEOUT))
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `google.protobuf.Duration` → std, `None` when negative or out of range.
pub fn std_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A protobuf timestamp as a time we can compute with and store: `None` when it is not a valid
/// timestamp or lies before what Postgres stores (4713 BC; we stop at 4700 BC), so such a value
/// from outside is treated as absent instead of failing every write that carries it.
pub fn timestamp_to_chrono(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    const EARLIEST_SECONDS: i64 = -210_470_000_000; // about 4700 BC
    if t.seconds < EARLIEST_SECONDS {
        return None;
    }
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

pub fn chrono_to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Builds the schedule engine's view of a schedule trigger.
pub fn build_schedule(trigger: &ScheduleTrigger) -> Result<Schedule, Vec<FieldError>> {
    let dst = trigger.dst.unwrap_or_default();
    let gap = match dst_policy::Gap::try_from(dst.gap) {
        Ok(dst_policy::Gap::Skip) => GapPolicy::Skip,
        _ => GapPolicy::ShiftForward,
    };
    let repeat = match dst_policy::Repeat::try_from(dst.repeat) {
        Ok(dst_policy::Repeat::Last) => RepeatPolicy::Last,
        Ok(dst_policy::Repeat::Both) => RepeatPolicy::Both,
        _ => RepeatPolicy::First,
    };
    let schedule =
        Schedule::new(&trigger.cron, &trigger.timezone, gap, repeat).map_err(|errs| {
            errs.into_iter()
                .map(|(field, e)| FieldError {
                    field: format!("trigger.schedule.{field}"),
                    message: e.message,
                })
                .collect::<Vec<_>>()
        })?;
    let mut errors = Vec::new();
    let mut dates = Vec::new();
    for (i, text) in trigger.exclude_dates.iter().enumerate() {
        match NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            Ok(date) => dates.push(date),
            Err(_) => errors.push(FieldError {
                field: format!("trigger.schedule.excludeDates[{i}]"),
                message: format!("{text:?} is not a date in YYYY-MM-DD form"),
            }),
        }
    }
    let mut bound = |name: &str, at: Option<&prost_types::Timestamp>| {
        let at = at?;
        let converted = timestamp_to_chrono(at);
        if converted.is_none() {
            errors.push(FieldError {
                field: format!("trigger.schedule.{name}"),
                message: "is not a valid timestamp (or lies before 4700 BC)".to_owned(),
            });
        }
        converted
    };
    let start = bound("startAt", trigger.start_at.as_ref());
    let end = bound("endAt", trigger.end_at.as_ref());
    if let (Some(s), Some(e)) = (start, end)
        && e <= s
    {
        errors.push(FieldError {
            field: "trigger.schedule.endAt".to_owned(),
            message: format!("{e} is not after startAt {s}"),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(schedule.with_bounds(start, end).with_exclude_dates(dates))
}

/// What a task template's type may be: dot-separated tokens of letters, digits, `_` and `-`.
fn task_type_error(task_type: &str) -> Option<String> {
    if task_type.is_empty() {
        return Some("is required (e.g. log, http, publish, or your own type)".to_owned());
    }
    let ok = task_type.split('.').all(|token| {
        !token.is_empty()
            && token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    (!ok).then(|| {
        format!("{task_type:?} is not a valid task type: use letters, digits, '_', '-' and '.' between tokens")
    })
}

/// `[a-z0-9][a-z0-9._-]{0,127}`.
pub fn name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is required".to_owned());
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || name.len() > 128 {
        return Some(format!(
            "{name:?} is not a valid name: 1–128 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ));
    }
    if name.contains("..") || name.ends_with('.') {
        return Some(format!(
            "{name:?} is not a valid name: dots must separate non-empty parts"
        ));
    }
    None
}

fn identifier_error(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    (!ok).then(|| {
        format!("{name:?} is not a valid name: letters, digits and '_', not starting with a digit (it is used as context.<name>)")
    })
}

/// Validates a spec completely. `now` bounds the check that a schedule fires at all.
pub fn validate(spec: &ActivitySpec, now: DateTime<Utc>) -> Result<(), SpecErrors> {
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(FieldError { field, message });
    if let Some(message) = name_error(&spec.name) {
        err("name".to_owned(), message);
    }
    let mut labels: Vec<_> = spec.labels.iter().collect();
    labels.sort();
    for (key, value) in labels {
        if let Some(message) = crate::access::label_error(key, value) {
            err(format!("labels.{key}"), message);
        }
    }
    let engine = Engine::new(Limits::default());

    match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        None => err(
            "trigger".to_owned(),
            "is required: one of schedule, event or manual".to_owned(),
        ),
        Some(trigger::Kind::Schedule(schedule)) => {
            for e in validate_schedule(schedule, now) {
                err(e.field, e.message);
            }
        }
        Some(trigger::Kind::Event(event)) => {
            for e in validate_event(event, &engine) {
                err(e.field, e.message);
            }
        }
        Some(trigger::Kind::Manual(_)) => {}
    }

    if let Some(flow) = &spec.flow {
        let is_event = matches!(
            spec.trigger.as_ref().and_then(|t| t.kind.as_ref()),
            Some(trigger::Kind::Event(_))
        );
        let schedule = match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(trigger::Kind::Schedule(schedule)) => Some(schedule),
            _ => None,
        };
        for e in validate_flow(flow, is_event, schedule, &engine) {
            err(e.field, e.message);
        }
        let event = match spec.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(trigger::Kind::Event(event)) => Some(event),
            _ => None,
        };
        for e in validate_buffers(flow, event, &engine) {
            err(e.field, e.message);
        }
    }

    if spec.context.len() > MAX_CONTEXT_SOURCES {
        err(
            "context".to_owned(),
            format!(
                "{} sources, over the limit of {MAX_CONTEXT_SOURCES}",
                spec.context.len()
            ),
        );
    }
    let mut context_names = HashSet::new();
    for (i, source) in spec.context.iter().enumerate() {
        for e in validate_context_source(source, i, &engine) {
            err(e.field, e.message);
        }
        if !source.name.is_empty() && !context_names.insert(source.name.as_str()) {
            err(
                format!("context[{i}].name"),
                format!("{:?} is used by an earlier source", source.name),
            );
        }
    }

    if spec.tasks.is_empty() {
        err(
            "tasks".to_owned(),
            "at least one task template is required".to_owned(),
        );
    }
    let mut task_names = HashSet::new();
    for (i, template) in spec.tasks.iter().enumerate() {
        for e in validate_template(template, i, &engine) {
            err(e.field, e.message);
        }
        if !template.name.is_empty() && !task_names.insert(template.name.as_str()) {
            err(
                format!("tasks[{i}].name"),
                format!("{:?} is used by an earlier template", template.name),
            );
        }
    }

    // Postgres stores no NUL character: say where it is rather than fail to store the spec.
    let mut nul_fields = Vec::new();
    nul_paths(
        &taskfactory_proto::to_json(spec),
        String::new(),
        &mut nul_fields,
    );
    for path in nul_fields {
        err(
            path,
            "contains a NUL character (\\u0000), which cannot be stored".to_owned(),
        );
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecErrors(errors))
    }
}

/// Where a JSON document holds NUL characters (in a string or a key), as `a.b[2].c` paths; at most
/// a few, the first in document order.
fn nul_paths(value: &serde_json::Value, path: String, found: &mut Vec<String>) {
    const MAX: usize = 5;
    if found.len() >= MAX {
        return;
    }
    match value {
        serde_json::Value::String(s) if s.contains('\0') => found.push(path),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                nul_paths(item, format!("{path}[{i}]"), found);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                let inner = if path.is_empty() {
                    key.replace('\0', "\\u0000")
                } else {
                    format!("{path}.{}", key.replace('\0', "\\u0000"))
                };
                if key.contains('\0') && found.len() < MAX {
                    found.push(inner.clone());
                }
                nul_paths(item, inner, found);
            }
        }
        _ => {}
    }
}

fn field(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn validate_schedule(schedule: &ScheduleTrigger, now: DateTime<Utc>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let prefix = "trigger.schedule";
    let dst = schedule.dst.unwrap_or(DstPolicy { gap: 0, repeat: 0 });
    if dst_policy::Gap::try_from(dst.gap).is_err() {
        errors.push(field(
            format!("{prefix}.dst.gap"),
            format!("{} is not a gap policy (SHIFT_FORWARD or SKIP)", dst.gap),
        ));
    }
    if dst_policy::Repeat::try_from(dst.repeat).is_err() {
        errors.push(field(
            format!("{prefix}.dst.repeat"),
            format!(
                "{} is not a repeat policy (FIRST, LAST or BOTH)",
                dst.repeat
            ),
        ));
    }
    if v1::MisfirePolicy::try_from(schedule.misfire).is_err() {
        errors.push(field(
            format!("{prefix}.misfire"),
            format!("{} is not a misfire policy", schedule.misfire),
        ));
    }
    if v1::OverlapPolicy::try_from(schedule.overlap).is_err() {
        errors.push(field(
            format!("{prefix}.overlap"),
            format!("{} is not an overlap policy", schedule.overlap),
        ));
    }
    for (name, d, max, max_text) in [
        ("jitter", schedule.jitter.as_ref(), 86_400, "one day"),
        (
            "catchupWindow",
            schedule.catchup_window.as_ref(),
            366 * 86_400,
            "366 days",
        ),
    ] {
        match d.map(std_duration) {
            Some(None) => errors.push(field(
                format!("{prefix}.{name}"),
                "must be a non-negative duration",
            )),
            Some(Some(d)) if d.as_secs() > max => errors.push(field(
                format!("{prefix}.{name}"),
                format!("must be at most {max_text}"),
            )),
            _ => {}
        }
    }
    match build_schedule(schedule) {
        Err(errs) => errors.extend(errs),
        Ok(built) => {
            if schedule.end_at.is_none() && built.next_after(now).is_none() {
                errors.push(field(
                    format!("{prefix}.cron"),
                    "never matches a date that exists (for example 30 February)",
                ));
            }
        }
    }
    errors
}

fn validate_event(event: &EventTrigger, engine: &Engine<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let prefix = "trigger.event";
    if event.subject.is_empty() {
        errors.push(field(
            format!("{prefix}.subject"),
            "is required: a NATS subject filter under events., such as events.orders.created or events.orders.>",
        ));
    } else if let Some(message) = subjects::subject_error(&event.subject, true) {
        errors.push(field(format!("{prefix}.subject"), message));
    } else if !(event.subject.starts_with("events.") || event.subject == "events.>") {
        errors.push(field(
            format!("{prefix}.subject"),
            format!(
                "{:?} is outside events.>: event triggers listen to subjects under events.",
                event.subject
            ),
        ));
    }
    if !event.filter.trim().is_empty()
        && let Err(e) = engine.expression(&event.filter)
    {
        errors.push(field(format!("{prefix}.filter"), e.message));
    }
    if !event.dedupe_key.is_empty()
        && let Err(e) = engine.template(&event.dedupe_key)
    {
        errors.push(field(format!("{prefix}.dedupeKey"), e.message));
    }
    errors
}

/// The longest a rate limit's period may be.
const MAX_RATE_PERIOD: Duration = Duration::from_secs(7 * 86_400);

fn validate_flow(
    flow: &v1::Flow,
    is_event: bool,
    schedule: Option<&ScheduleTrigger>,
    engine: &Engine<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(concurrency) = &flow.concurrency {
        let prefix = "flow.concurrency";
        if concurrency.limit == 0 {
            errors.push(field(
                format!("{prefix}.limit"),
                "is required: at least 1 run at once",
            ));
        }
        if !concurrency.key.trim().is_empty() {
            if schedule.is_some() {
                errors.push(field(
                    format!("{prefix}.key"),
                    "must be empty for a schedule (its fires carry no event to key on): the limit \
                     is then over the whole activity",
                ));
            } else if let Err(e) = engine.expression(&concurrency.key) {
                errors.push(field(format!("{prefix}.key"), e.message));
            }
        }
        if let Some(schedule) = schedule
            && !matches!(
                v1::OverlapPolicy::try_from(schedule.overlap),
                Ok(v1::OverlapPolicy::OverlapUnspecified | v1::OverlapPolicy::AllowAll)
            )
        {
            errors.push(field(
                prefix,
                "cannot be combined with trigger.schedule.overlap: both decide when a run may \
                 start; use one of them",
            ));
        }
    }
    if !flow.priority.trim().is_empty() {
        if flow.concurrency.is_none() && flow.throttle.is_none() {
            errors.push(field(
                "flow.priority",
                "orders the runs waiting under flow.concurrency or flow.throttle: set one of them",
            ));
        } else if schedule.is_some() {
            errors.push(field(
                "flow.priority",
                "must be empty for a schedule (its fires carry no event to rank)",
            ));
        } else if let Err(e) = engine.expression(&flow.priority) {
            errors.push(field("flow.priority", e.message));
        }
    }
    if let Some(limit) = &flow.rate_limit {
        let prefix = "flow.rateLimit";
        if !is_event {
            errors.push(field(
                prefix,
                "applies to events only: this activity's trigger is not an event trigger",
            ));
        }
        errors.extend(validate_rate(
            prefix,
            &limit.key,
            limit.limit,
            limit.period.as_ref(),
            "event",
            engine,
        ));
    }
    if let Some(throttle) = &flow.throttle {
        let prefix = "flow.throttle";
        if schedule.is_some() {
            errors.push(field(
                prefix,
                "does not apply to a schedule, whose fires come at the times it says: use \
                 flow.concurrency or trigger.schedule.overlap to hold its runs back",
            ));
        }
        errors.extend(validate_rate(
            prefix,
            &throttle.key,
            throttle.limit,
            throttle.period.as_ref(),
            "run",
            engine,
        ));
        if throttle.burst > throttle.limit.max(1) {
            errors.push(field(
                format!("{prefix}.burst"),
                format!(
                    "must be at most the limit ({}): the runs that may start at once after a pause",
                    throttle.limit
                ),
            ));
        }
    }
    errors
}

/// Most events one batch may hold (`flow.batch.maxSize`).
pub const MAX_BATCH_SIZE: u32 = 10_000;

/// `flow.debounce` and `flow.batch`: for event triggers, one of them, each with a key that
/// compiles and times in range, and (in this version) without the controls that act on one event's
/// fire (a rate limit, a dedupeKey). Those that act on the run (concurrency, throttle, priority)
/// admit the gathered run.
fn validate_buffers(
    flow: &v1::Flow,
    event: Option<&v1::EventTrigger>,
    engine: &Engine<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut buffered = None;
    if let Some(debounce) = &flow.debounce {
        let prefix = "flow.debounce";
        buffered = Some(prefix);
        if !debounce.key.trim().is_empty()
            && let Err(e) = engine.expression(&debounce.key)
        {
            errors.push(field(format!("{prefix}.key"), e.message));
        }
        let period = debounce.period.as_ref().and_then(std_duration);
        errors.extend(check_window(
            &format!("{prefix}.period"),
            debounce.period.as_ref(),
            true,
        ));
        errors.extend(check_window(
            &format!("{prefix}.timeout"),
            debounce.timeout.as_ref(),
            false,
        ));
        if let (Some(period), Some(timeout)) =
            (period, debounce.timeout.as_ref().and_then(std_duration))
            && timeout < period
        {
            errors.push(field(
                format!("{prefix}.timeout"),
                "must be at least the period: it bounds how long a burst puts its run off",
            ));
        }
        if v1::debounce::Keep::try_from(debounce.keep).is_err() {
            errors.push(field(format!("{prefix}.keep"), "must be LAST or ALL"));
        }
    }
    if let Some(batch) = &flow.batch {
        let prefix = "flow.batch";
        if buffered.is_some() {
            errors.push(field(
                prefix,
                "cannot be combined with flow.debounce: both gather a key's events into one run; use one",
            ));
        }
        buffered = Some(prefix);
        if !batch.key.trim().is_empty()
            && let Err(e) = engine.expression(&batch.key)
        {
            errors.push(field(format!("{prefix}.key"), e.message));
        }
        if batch.max_size == 0 || batch.max_size > MAX_BATCH_SIZE {
            errors.push(field(
                format!("{prefix}.maxSize"),
                format!("must be 1 to {MAX_BATCH_SIZE} events"),
            ));
        }
        errors.extend(check_window(
            &format!("{prefix}.timeout"),
            batch.timeout.as_ref(),
            true,
        ));
    }
    let Some(prefix) = buffered else {
        return errors;
    };
    let Some(event) = event else {
        errors.push(field(
            prefix,
            "applies to events only: this activity's trigger is not an event trigger",
        ));
        return errors;
    };
    if !event.dedupe_key.trim().is_empty() {
        errors.push(field(
            prefix,
            "cannot be combined with trigger.event.dedupeKey: the run is keyed by its first event \
             (an event delivered again is still counted once)",
        ));
    }
    if flow.rate_limit.is_some() {
        errors.push(field(
            prefix,
            "cannot be combined with flow.rateLimit (not supported yet): gather first, then \
             bound the runs with flow.throttle",
        ));
    }
    errors
}

/// A duration of 1 ms to 7 days at `path` (`required`, or absent).
fn check_window(
    path: &str,
    duration: Option<&prost_types::Duration>,
    required: bool,
) -> Option<FieldError> {
    match duration.map(std_duration) {
        None if required => Some(field(path, "is required: a duration such as 5s or 1m")),
        None => None,
        Some(None) => Some(field(path, "must be a non-negative duration")),
        Some(Some(d)) if d < Duration::from_millis(1) => Some(field(path, "must be at least 1ms")),
        Some(Some(d)) if d > MAX_RATE_PERIOD => Some(field(path, "must be at most 7 days")),
        Some(Some(_)) => None,
    }
}

/// The key, limit and period of a rate (`flow.rateLimit`, `flow.throttle`) at `prefix`: the key
/// compiles, at least one `unit` per period, and a period of 1 ms to 7 days.
fn validate_rate(
    prefix: &str,
    key: &str,
    limit: u32,
    period: Option<&prost_types::Duration>,
    unit: &str,
    engine: &Engine<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if !key.trim().is_empty()
        && let Err(e) = engine.expression(key)
    {
        errors.push(field(format!("{prefix}.key"), e.message));
    }
    if limit == 0 {
        errors.push(field(
            format!("{prefix}.limit"),
            format!("is required: at least 1 {unit} per period"),
        ));
    }
    errors.extend(check_window(&format!("{prefix}.period"), period, true));
    errors
}

fn validate_context_source(
    source: &ContextSource,
    i: usize,
    engine: &Engine<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let prefix = format!("context[{i}]");
    if source.name.is_empty() {
        errors.push(field(format!("{prefix}.name"), "is required"));
    } else if let Some(message) = identifier_error(&source.name) {
        errors.push(field(format!("{prefix}.name"), message));
    }
    let mut template = |path: String, text: &str| {
        if let Err(e) = engine.template(text) {
            errors.push(field(path, e.message));
        }
    };
    match &source.kind {
        None | Some(context_source::Kind::Static(_)) => {}
        Some(context_source::Kind::Sql(sql)) => {
            for (j, param) in sql.params.iter().enumerate() {
                template(format!("{prefix}.sql.params[{j}]"), param);
            }
        }
        Some(context_source::Kind::Http(http)) => {
            template(format!("{prefix}.http.url"), &http.url);
            for (name, value) in &http.headers {
                template(format!("{prefix}.http.headers.{name}"), value);
            }
        }
        Some(context_source::Kind::Kv(kv)) => {
            template(format!("{prefix}.kv.bucket"), &kv.bucket);
            template(format!("{prefix}.kv.key"), &kv.key);
        }
        Some(context_source::Kind::Request(request)) => {
            template(format!("{prefix}.request.subject"), &request.subject);
        }
    }
    match &source.kind {
        None => {
            errors.push(field(
                prefix.clone(),
                "needs a kind: static, sql, http, kv or request",
            ));
        }
        Some(context_source::Kind::Static(_)) => {}
        Some(context_source::Kind::Sql(sql)) => {
            if sql.database.is_empty() {
                errors.push(field(
                    format!("{prefix}.sql.database"),
                    "is required: the name of a database configured on the orchestrator (TASKFACTORY_SQL_<NAME>)",
                ));
            } else if !sql
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                errors.push(field(
                    format!("{prefix}.sql.database"),
                    format!(
                        "{:?} is not a database name (letters, digits, _); DSNs belong in the orchestrator's configuration, never in a spec",
                        sql.database
                    ),
                ));
            }
            if sql.query.trim().is_empty() {
                errors.push(field(format!("{prefix}.sql.query"), "is required"));
            } else if let Err(problem) = crate::sql_query::check(&sql.query) {
                errors.push(field(format!("{prefix}.sql.query"), problem.to_string()));
            }
        }
        Some(context_source::Kind::Http(http)) => {
            if !matches!(
                http.method.to_ascii_uppercase().as_str(),
                "" | "GET" | "POST"
            ) {
                errors.push(field(
                    format!("{prefix}.http.method"),
                    format!("{:?} is not GET or POST", http.method),
                ));
            }
            let plain: Vec<&str> = http.headers.keys().map(String::as_str).collect();
            for (path, message) in secrets::secret_headers_problems(&http.secret_headers, &plain) {
                errors.push(field(
                    format!("{prefix}.http.secretHeaders.{path}"),
                    message,
                ));
            }
            if http.url.trim().is_empty() {
                errors.push(field(format!("{prefix}.http.url"), "is required"));
            } else if !http.secret_headers.is_empty()
                && let Some(problem) = secrets::literal_origin_problem(&http.url)
            {
                errors.push(field(format!("{prefix}.http.url"), problem));
            } else if !http.url.contains("{{") && !http.url.contains("{%") {
                match url_scheme(&http.url) {
                    Some("http" | "https") => {}
                    _ => errors.push(field(
                        format!("{prefix}.http.url"),
                        format!("{:?} is not an http or https URL", http.url),
                    )),
                }
            }
        }
        Some(context_source::Kind::Kv(kv)) => {
            if kv.bucket.is_empty() {
                errors.push(field(format!("{prefix}.kv.bucket"), "is required"));
            } else if let Some(refused) = sources::literal_bucket_problem(&kv.bucket) {
                errors.push(field(format!("{prefix}.kv.bucket"), refused.to_string()));
            }
            if kv.key.is_empty() {
                errors.push(field(format!("{prefix}.kv.key"), "is required"));
            } else if let Some(refused) = sources::literal_key_problem(&kv.key) {
                errors.push(field(format!("{prefix}.kv.key"), refused.to_string()));
            }
        }
        Some(context_source::Kind::Request(request)) => {
            if request.subject.is_empty() {
                errors.push(field(format!("{prefix}.request.subject"), "is required"));
            } else if let Some(refused) = sources::literal_subject_problem(&request.subject) {
                errors.push(field(
                    format!("{prefix}.request.subject"),
                    refused.to_string(),
                ));
            }
        }
    }
    if let Some(timeout) = &source.timeout
        && std_duration(timeout).is_some_and(|d| d > std::time::Duration::from_secs(300))
    {
        errors.push(field(
            format!("{prefix}.timeout"),
            "must be at most 5 minutes",
        ));
    }
    if let Some(timeout) = &source.timeout
        && std_duration(timeout).is_none_or(|d| d.is_zero())
    {
        errors.push(field(
            format!("{prefix}.timeout"),
            "must be a positive duration",
        ));
    }
    if v1::OnError::try_from(source.on_error).is_err() {
        errors.push(field(
            format!("{prefix}.onError"),
            format!("{} is not FAIL, USE_DEFAULT or OMIT", source.on_error),
        ));
    }
    errors
}

/// The scheme of a URL-looking string (`https` of `https://…`).
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, rest) = text.split_once("://")?;
    (!rest.is_empty()).then_some(scheme)
}

fn validate_template(template: &TaskTemplate, i: usize, engine: &Engine<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let prefix = format!("tasks[{i}]");
    if let Some(message) = name_error(&template.name) {
        errors.push(field(format!("{prefix}.name"), message));
    }
    if let Some(message) = task_type_error(&template.r#type) {
        errors.push(field(format!("{prefix}.type"), message));
    }
    if !template.for_each.trim().is_empty()
        && let Err(e) = engine.expression(&template.for_each)
    {
        errors.push(field(format!("{prefix}.forEach"), e.message));
    }
    if !template.when.trim().is_empty()
        && let Err(e) = engine.expression(&template.when)
    {
        errors.push(field(format!("{prefix}.when"), e.message));
    }
    if let Some(params) = &template.params {
        let json = crate::values::struct_to_json(params);
        if let Err((path, e)) = engine.params(&json) {
            errors.push(field(format!("{prefix}.params.{path}"), e.message));
        }
    }
    errors.extend(validate_task_secrets(template, &prefix));
    if let Some(concurrency) = &template.concurrency {
        errors.extend(validate_task_concurrency(
            template,
            concurrency,
            &prefix,
            engine,
        ));
    }
    if template.r#type == "publish"
        && let Some(subject) = template
            .params
            .as_ref()
            .and_then(|p| p.fields.get("subject"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(text)) => Some(text.as_str()),
                _ => None,
            })
        && let Some(problem) = crate::sources::literal_publish_subject_problem(subject)
    {
        errors.push(field(
            format!("{prefix}.params.subject"),
            format!("{subject:?}: {problem}"),
        ));
    }
    if let Some(retry) = &template.retry {
        if retry.max_attempts > MAX_ATTEMPTS_LIMIT {
            errors.push(field(
                format!("{prefix}.retry.maxAttempts"),
                format!(
                    "{} is over the limit of {MAX_ATTEMPTS_LIMIT}",
                    retry.max_attempts
                ),
            ));
        }
        let initial = retry.initial_backoff.as_ref().map(std_duration);
        let max = retry.max_backoff.as_ref().map(std_duration);
        if initial == Some(None) {
            errors.push(field(
                format!("{prefix}.retry.initialBackoff"),
                "must be a non-negative duration",
            ));
        }
        if max == Some(None) {
            errors.push(field(
                format!("{prefix}.retry.maxBackoff"),
                "must be a non-negative duration",
            ));
        }
        if let (Some(Some(initial)), Some(Some(max))) = (initial, max)
            && initial > max
        {
            errors.push(field(
                format!("{prefix}.retry.maxBackoff"),
                "must not be less than initialBackoff",
            ));
        }
        if retry.multiplier != 0.0 && !(1.0..=100.0).contains(&retry.multiplier) {
            errors.push(field(
                format!("{prefix}.retry.multiplier"),
                format!("{} is not between 1 and 100", retry.multiplier),
            ));
        }
    }
    if let Some(timeout) = &template.timeout
        && std_duration(timeout).is_none_or(|d| d.is_zero())
    {
        errors.push(field(
            format!("{prefix}.timeout"),
            "must be a positive duration",
        ));
    }
    if errors.is_empty()
        && template.r#type != crate::results::HUMAN_TASK_TYPE
        && let Some(needed) = longest_task_life(template)
        && needed > MAX_TASK_LIFE
    {
        errors.push(field(
            format!("{prefix}.retry"),
            format!(
                "with its attempts, backoffs and timeout a task may need {} in the tasks stream, over the limit of {} (the stream drops messages older than 14 days; a task past that would never be delivered again)",
                humantime::format_duration(needed),
                humantime::format_duration(MAX_TASK_LIFE)
            ),
        ));
    }
    errors
}

/// The most tasks of one key given to executors at once (`tasks[].concurrency.limit`).
pub const MAX_TASK_CONCURRENCY: u32 = 10_000;

/// A template's `concurrency`: a limit in range, a key that compiles, a type an executor runs,
/// a scope that exists.
fn validate_task_concurrency(
    template: &TaskTemplate,
    concurrency: &v1::TaskConcurrency,
    prefix: &str,
    engine: &Engine<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let prefix = format!("{prefix}.concurrency");
    if template.r#type == crate::results::HUMAN_TASK_TYPE {
        errors.push(field(
            prefix.clone(),
            "does not apply to human tasks: no executor runs them (they wait for CompleteTask)",
        ));
    }
    if concurrency.limit == 0 {
        errors.push(field(
            format!("{prefix}.limit"),
            "is required: at least 1 task at once",
        ));
    } else if concurrency.limit > MAX_TASK_CONCURRENCY {
        errors.push(field(
            format!("{prefix}.limit"),
            format!(
                "{} is over the limit of {MAX_TASK_CONCURRENCY}",
                concurrency.limit
            ),
        ));
    }
    if v1::task_concurrency::Scope::try_from(concurrency.scope).is_err() {
        errors.push(field(
            format!("{prefix}.scope"),
            format!("{} is not a scope: ACTIVITY or GLOBAL", concurrency.scope),
        ));
    }
    if !concurrency.key.trim().is_empty()
        && let Err(e) = engine.expression(&concurrency.key)
    {
        errors.push(field(format!("{prefix}.key"), e.message));
    }
    errors
}

/// Built-in task types that send no request, so have no header to put a secret in.
const TYPES_WITHOUT_HEADERS: [&str; 4] = ["log", "noop", "publish", "human"];

/// A template's `secretHeaders`: well-formed, on a type that sends them, and for `http` a
/// `params.url` that spells its origin literally.
fn validate_task_secrets(template: &TaskTemplate, prefix: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if template.secret_headers.is_empty() {
        return errors;
    }
    let params = template
        .params
        .as_ref()
        .map(crate::values::struct_to_json)
        .unwrap_or_default();
    let plain: Vec<&str> = params
        .get("headers")
        .and_then(|h| h.as_object())
        .map(|h| h.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for (path, message) in secrets::secret_headers_problems(&template.secret_headers, &plain) {
        errors.push(field(format!("{prefix}.secretHeaders.{path}"), message));
    }
    if TYPES_WITHOUT_HEADERS.contains(&template.r#type.as_str()) {
        errors.push(field(
            format!("{prefix}.secretHeaders"),
            format!(
                "task type {:?} sends no request: secretHeaders are for http tasks (or an external executor's type)",
                template.r#type
            ),
        ));
    }
    if template.r#type == "http" {
        match params.get("url").and_then(|u| u.as_str()) {
            None => errors.push(field(
                format!("{prefix}.params.url"),
                "is required (a string) when the task has secretHeaders",
            )),
            Some(url) => {
                if let Some(problem) = secrets::literal_origin_problem(url) {
                    errors.push(field(format!("{prefix}.params.url"), problem));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn errors_of(yaml: &str) -> Vec<FieldError> {
        let spec = spec_from_yaml(yaml).unwrap();
        validate(&spec, now())
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    }

    const GOOD: &str = r#"
name: invoice-reminders
trigger:
  schedule:
    cron: ["0 9 * * MON-FRI"]
    timezone: Europe/Berlin
    jitter: 30s
context:
  - name: limits
    static: {max: 3}
tasks:
  - name: remind
    type: http
    forEach: "event.items"
    when: "item.amount > 0"
    params:
      url: "https://mailer.internal/send"
      body: {to: "{{ item.email }}", amount: "{{ item.amount }}"}
    retry: {maxAttempts: 5, initialBackoff: 1s, maxBackoff: 5m}
    timeout: 30s
"#;

    #[test]
    fn a_rate_limit_that_makes_no_sense_is_refused_naming_the_field() {
        let event = |flow: &str| {
            format!(
                "name: limited\ntrigger: {{event: {{subject: events.x}}}}\nflow: {flow}\ntasks: [{{name: t, type: noop}}]\n"
            )
        };
        assert!(
            errors_of(&event(
                "{rateLimit: {key: event.account, limit: 1, period: 10s}}"
            ))
            .is_empty()
        );
        assert!(errors_of(&event("{rateLimit: {limit: 5, period: 7d}}")).is_empty());
        for (flow, field, says) in [
            (
                "{rateLimit: {key: 'event.account ==', limit: 1, period: 10s}}",
                "flow.rateLimit.key",
                "",
            ),
            (
                "{rateLimit: {key: event.a, period: 10s}}",
                "flow.rateLimit.limit",
                "at least 1",
            ),
            (
                "{rateLimit: {key: event.a, limit: 1}}",
                "flow.rateLimit.period",
                "is required",
            ),
            (
                "{rateLimit: {key: event.a, limit: 1, period: 0s}}",
                "flow.rateLimit.period",
                "at least 1ms",
            ),
            (
                "{rateLimit: {key: event.a, limit: 1, period: 8d}}",
                "flow.rateLimit.period",
                "at most 7 days",
            ),
        ] {
            let errors = errors_of(&event(flow));
            assert_eq!(errors.len(), 1, "{flow}: {errors:?}");
            assert_eq!(errors[0].field, field, "{flow}");
            assert!(errors[0].message.contains(says), "{flow}: {errors:?}");
        }
        let errors = errors_of(
            "name: limited\ntrigger: {schedule: {cron: ['* * * * *'], timezone: UTC}}\nflow: {rateLimit: {limit: 1, period: 1s}}\ntasks: [{name: t, type: noop}]\n",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "flow.rateLimit");
        assert!(errors[0].message.contains("events only"), "{errors:?}");
    }

    #[test]
    fn a_throttle_that_makes_no_sense_is_refused_naming_the_field() {
        let with = |trigger: &str, flow: &str| {
            format!(
                "name: throttled\ntrigger: {trigger}\nflow: {flow}\ntasks: [{{name: t, type: noop}}]\n"
            )
        };
        let event = |flow: &str| with("{event: {subject: events.x}}", flow);
        for good in [
            event("{throttle: {key: event.customer, limit: 10, period: 1m, burst: 2}}"),
            event("{throttle: {limit: 1, period: 1s}, priority: event.rank}"),
            event(
                "{throttle: {key: event.c, limit: 10, period: 1s}, concurrency: {key: event.c, limit: 2}}",
            ),
            with(
                "{manual: {}}",
                "{throttle: {key: event.user, limit: 5, period: 1s}}",
            ),
        ] {
            assert!(
                errors_of(&good).is_empty(),
                "{good}: {:?}",
                errors_of(&good)
            );
        }
        for (spec, field, says) in [
            (
                event("{throttle: {key: 'event.c ==', limit: 1, period: 1s}}"),
                "flow.throttle.key",
                "",
            ),
            (
                event("{throttle: {key: event.c, period: 1s}}"),
                "flow.throttle.limit",
                "at least 1 run per period",
            ),
            (
                event("{throttle: {key: event.c, limit: 1}}"),
                "flow.throttle.period",
                "is required",
            ),
            (
                event("{throttle: {limit: 1, period: 0.0001s}}"),
                "flow.throttle.period",
                "at least 1ms",
            ),
            (
                event("{throttle: {limit: 1, period: 8d}}"),
                "flow.throttle.period",
                "at most 7 days",
            ),
            (
                event("{throttle: {limit: 2, period: 1s, burst: 3}}"),
                "flow.throttle.burst",
                "at most the limit (2)",
            ),
            (
                with(
                    "{schedule: {cron: ['* * * * *'], timezone: UTC}}",
                    "{throttle: {limit: 1, period: 1s}}",
                ),
                "flow.throttle",
                "does not apply to a schedule",
            ),
        ] {
            let errors = errors_of(&spec);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert_eq!(errors[0].field, field, "{spec}");
            assert!(errors[0].message.contains(says), "{spec}: {errors:?}");
        }
    }

    #[test]
    fn a_debounce_or_batch_that_makes_no_sense_is_refused_naming_the_field() {
        let with = |trigger: &str, flow: &str| {
            format!(
                "name: gathered\ntrigger: {trigger}\nflow: {flow}\ntasks: [{{name: t, type: noop}}]\n"
            )
        };
        let event = |flow: &str| with("{event: {subject: events.x}}", flow);
        for good in [
            event("{debounce: {key: event.user, period: 5s, timeout: 1m, keep: ALL}}"),
            event("{debounce: {period: 5s}}"),
            event("{batch: {key: event.table, maxSize: 100, timeout: 2s}}"),
            event("{batch: {maxSize: 10000, timeout: 7d}}"),
            event("{debounce: {period: 1s}, concurrency: {key: event.k, limit: 1}}"),
            event(
                "{batch: {key: event.t, maxSize: 5, timeout: 1s}, throttle: {limit: 1, period: 1s}, concurrency: {limit: 2}, priority: event.p}",
            ),
        ] {
            assert!(
                errors_of(&good).is_empty(),
                "{good}: {:?}",
                errors_of(&good)
            );
        }
        for (spec, field, says) in [
            (
                event("{debounce: {key: 'event.user ==', period: 5s}}"),
                "flow.debounce.key",
                "",
            ),
            (
                event("{debounce: {key: event.u}}"),
                "flow.debounce.period",
                "is required",
            ),
            (
                event("{debounce: {period: 5s, timeout: 2s}}"),
                "flow.debounce.timeout",
                "at least the period",
            ),
            (
                event("{debounce: {period: 5s, timeout: 8d}}"),
                "flow.debounce.timeout",
                "at most 7 days",
            ),
            (
                event("{batch: {timeout: 2s}}"),
                "flow.batch.maxSize",
                "1 to 10000",
            ),
            (
                event("{batch: {maxSize: 10001, timeout: 2s}}"),
                "flow.batch.maxSize",
                "1 to 10000",
            ),
            (
                event("{batch: {maxSize: 5}}"),
                "flow.batch.timeout",
                "is required",
            ),
            (
                event("{batch: {maxSize: 5, timeout: 1s}, debounce: {period: 1s}}"),
                "flow.batch",
                "flow.debounce",
            ),
            (
                event("{batch: {maxSize: 5, timeout: 1s}, rateLimit: {limit: 1, period: 1s}}"),
                "flow.batch",
                "flow.rateLimit",
            ),
            (
                with(
                    "{event: {subject: events.x, dedupeKey: '{{ event.id }}'}}",
                    "{batch: {maxSize: 5, timeout: 1s}}",
                ),
                "flow.batch",
                "dedupeKey",
            ),
            (
                with("{manual: {}}", "{debounce: {period: 1s}}"),
                "flow.debounce",
                "events only",
            ),
        ] {
            let errors = errors_of(&spec);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert_eq!(errors[0].field, field, "{spec}");
            assert!(errors[0].message.contains(says), "{spec}: {errors:?}");
        }
    }

    #[test]
    fn concurrency_and_priority_that_make_no_sense_are_refused_naming_the_field() {
        let event = |flow: &str| {
            format!(
                "name: limited\ntrigger: {{event: {{subject: events.x}}}}\nflow: {flow}\ntasks: [{{name: t, type: noop}}]\n"
            )
        };
        let schedule = |overlap: &str, flow: &str| {
            format!(
                "name: limited\ntrigger: {{schedule: {{cron: ['* * * * *'], timezone: UTC{overlap}}}}}\nflow: {flow}\ntasks: [{{name: t, type: noop}}]\n"
            )
        };
        for good in [
            event("{concurrency: {key: event.customer, limit: 2}}"),
            event("{concurrency: {limit: 1}, priority: \"100 if event.tier == 'gold' else 0\"}"),
            schedule("", "{concurrency: {limit: 3}}"),
            schedule(", overlap: ALLOW_ALL", "{concurrency: {limit: 3}}"),
            "name: m\ntrigger: {manual: {}}\nflow: {concurrency: {key: event.user, limit: 1}, priority: event.rank}\ntasks: [{name: t, type: noop}]\n".to_owned(),
        ] {
            assert!(errors_of(&good).is_empty(), "{good}: {:?}", errors_of(&good));
        }
        for (spec, field, says) in [
            (
                event("{concurrency: {key: event.customer}}"),
                "flow.concurrency.limit",
                "at least 1",
            ),
            (
                event("{concurrency: {key: 'event.customer ==', limit: 1}}"),
                "flow.concurrency.key",
                "",
            ),
            (
                event("{priority: event.rank}"),
                "flow.priority",
                "flow.concurrency or flow.throttle",
            ),
            (
                event("{concurrency: {limit: 1}, priority: 'event.rank +'}"),
                "flow.priority",
                "",
            ),
            (
                schedule("", "{concurrency: {key: event.x, limit: 1}}"),
                "flow.concurrency.key",
                "must be empty for a schedule",
            ),
            (
                schedule(", overlap: SKIP", "{concurrency: {limit: 1}}"),
                "flow.concurrency",
                "trigger.schedule.overlap",
            ),
            (
                schedule("", "{concurrency: {limit: 1}, priority: '1'}"),
                "flow.priority",
                "must be empty for a schedule",
            ),
        ] {
            let errors = errors_of(&spec);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert_eq!(errors[0].field, field, "{spec}");
            assert!(errors[0].message.contains(says), "{spec}: {errors:?}");
        }
    }

    #[test]
    fn retries_that_could_outlive_the_tasks_stream_are_refused_naming_the_field() {
        let with = |task: &str| {
            format!(
                "name: long\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: http, params: {{url: 'https://x.example'}}, {task}}}]\n"
            )
        };
        // 20-day backoffs: the message would be gone before the second attempt.
        let errors = errors_of(&with(
            "retry: {maxAttempts: 2, initialBackoff: 20d, maxBackoff: 20d}",
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "tasks[0].retry");
        assert!(
            errors[0].message.contains("over the limit of 7days"),
            "{}",
            errors[0].message
        );
        // 100 attempts of a 3-hour timeout: 12.5 days.
        let errors = errors_of(&with("retry: {maxAttempts: 100}, timeout: 3h"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        // A day of backoffs over 8 attempts, or the defaults: taken.
        assert!(
            errors_of(&with(
                "retry: {maxAttempts: 8, initialBackoff: 1h, maxBackoff: 1d}"
            ))
            .is_empty()
        );
        assert!(errors_of(&with("timeout: 1h")).is_empty());
        // A human task's timeout is its deadline, kept by the orchestrator, not the stream.
        assert!(
            errors_of(
                "name: ok\ntrigger: {manual: {}}\ntasks: [{name: t, type: human, timeout: 30d}]\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn a_good_spec_validates() {
        assert_eq!(errors_of(GOOD), vec![]);
    }

    #[test]
    fn labels_are_validated_naming_the_key() {
        let yaml = "name: l\nlabels: {team: billing, Bad: x, tier: \"a b\"}\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n";
        let fields: Vec<String> = errors_of(yaml).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["labels.Bad", "labels.tier"]);
    }

    #[test]
    fn schedule_bounds_before_what_can_be_stored_are_refused() {
        let mut spec = spec_from_yaml(GOOD).unwrap();
        if let Some(trigger::Kind::Schedule(schedule)) =
            spec.trigger.as_mut().and_then(|t| t.kind.as_mut())
        {
            schedule.end_at = Some(prost_types::Timestamp {
                seconds: -1_000_000_000_000,
                nanos: 0,
            });
        }
        let errors = validate(&spec, now()).unwrap_err().0;
        assert_eq!(errors[0].field, "trigger.schedule.endAt", "{errors:?}");
    }

    #[test]
    fn timestamps_postgres_cannot_store_are_absent() {
        let at = |seconds| timestamp_to_chrono(&prost_types::Timestamp { seconds, nanos: 0 });
        assert!(at(0).is_some());
        assert!(at(-62_135_596_800).is_some(), "year 1");
        assert!(at(-1_000_000_000_000).is_none(), "about 29,700 BC");
        assert!(at(i64::MIN).is_none());
        assert!(
            timestamp_to_chrono(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_none()
        );
    }

    #[test]
    fn nul_characters_are_named_where_they_are() {
        let yaml = "name: nul\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, params: {text: \"a\\0b\", \"k\\0\": 1}}]\n";
        let fields: Vec<String> = errors_of(yaml).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["tasks[0].params.k\\u0000", "tasks[0].params.text"]);
        let errors = errors_of(yaml);
        assert!(
            errors[0].message.contains("NUL character"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn each_problem_names_its_field() {
        let yaml = r#"
name: Bad Name
trigger:
  schedule:
    cron: ["0 25 * * *", "* * *"]
    timezone: Mars/Base
context:
  - name: a
    static: 1
  - name: a
    static: 2
tasks:
  - name: t
    type: "tasks.*"
    forEach: "event.items |"
    when: "item >"
    params: {x: "{{ item.x "}
    retry: {initialBackoff: 10s, maxBackoff: 1s}
"#;
        let fields: Vec<String> = errors_of(yaml).into_iter().map(|e| e.field).collect();
        for expected in [
            "name",
            "trigger.schedule.cron[0]",
            "trigger.schedule.cron[1]",
            "trigger.schedule.timezone",
            "context[1].name",
            "tasks[0].type",
            "tasks[0].forEach",
            "tasks[0].when",
            "tasks[0].params.x",
            "tasks[0].retry.maxBackoff",
        ] {
            assert!(
                fields.contains(&expected.to_owned()),
                "missing {expected} in {fields:?}"
            );
        }
    }

    #[test]
    fn missing_trigger_and_tasks_are_reported() {
        let fields: Vec<String> = errors_of("name: a").into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["trigger", "tasks"]);
    }

    #[test]
    fn event_trigger_subject_must_be_under_events() {
        let yaml =
            "name: a\ntrigger: {event: {subject: orders.created}}\ntasks: [{name: t, type: log}]";
        let errors = errors_of(yaml);
        assert_eq!(errors[0].field, "trigger.event.subject");
        assert!(errors[0].message.contains("events."));
    }

    #[test]
    fn never_matching_cron_is_rejected() {
        let yaml = "name: a\ntrigger: {schedule: {cron: ['0 0 30 2 *'], timezone: UTC}}\ntasks: [{name: t, type: log}]";
        let errors = errors_of(yaml);
        assert_eq!(errors[0].field, "trigger.schedule.cron");
    }

    #[test]
    fn context_sources_are_checked_and_name_the_field() {
        let good = "name: a\ntrigger: {manual: {}}\ncontext:\n  - {name: rows, sql: {database: billing, query: 'select * from t where id = $1', params: ['{{ event.id }}']}}\n  - {name: price, http: {url: 'https://api.example.com/p/{{ event.sku }}'}, onError: USE_DEFAULT, default: 0}\n  - {name: flags, kv: {bucket: config, key: flags}, onError: OMIT}\n  - {name: stock, request: {subject: inventory.query, payload: {sku: '{{ event.sku }}'}}, timeout: 2s}\ntasks: [{name: t, type: log}]";
        assert!(validate(&spec_from_yaml(good).unwrap(), Utc::now()).is_ok());
        let cases = [
            (
                "{name: x, sql: {database: 'postgres://u@h/db', query: 'select 1'}}",
                "context[0].sql.database",
            ),
            (
                "{name: x, sql: {database: billing, query: ''}}",
                "context[0].sql.query",
            ),
            (
                "{name: x, sql: {database: billing, query: 'select 1) as q, (select * from t'}}",
                "context[0].sql.query",
            ),
            (
                "{name: x, sql: {database: billing, query: 'select 1; delete from t'}}",
                "context[0].sql.query",
            ),
            (
                "{name: x, sql: {database: billing, query: 'select 1', params: ['{{ event.id']}}",
                "context[0].sql.params[0]",
            ),
            ("{name: x, http: {url: 'ftp://x/y'}}", "context[0].http.url"),
            (
                "{name: x, http: {url: 'https://x', method: DELETE}}",
                "context[0].http.method",
            ),
            ("{name: x, kv: {bucket: b, key: ''}}", "context[0].kv.key"),
            (
                "{name: x, request: {subject: 'a..b'}}",
                "context[0].request.subject",
            ),
            (
                "{name: x, request: {subject: a.b}, timeout: 10m}",
                "context[0].timeout",
            ),
            ("{name: x}", "context[0]"),
        ];
        for (source, field) in cases {
            let yaml = format!(
                "name: a\ntrigger: {{manual: {{}}}}\ncontext: [{source}]\ntasks: [{{name: t, type: log}}]"
            );
            let errors = errors_of(&yaml);
            assert!(
                errors.iter().any(|e| e.field == field),
                "{source}: {errors:?}"
            );
        }
    }

    #[test]
    fn more_context_sources_than_the_limit_are_refused_naming_the_count() {
        let spec_with = |n: usize| {
            let sources: Vec<String> = (0..n)
                .map(|i| format!("{{name: s{i}, static: {i}}}"))
                .collect();
            format!(
                "name: a\ntrigger: {{manual: {{}}}}\ncontext: [{}]\ntasks: [{{name: t, type: log}}]",
                sources.join(", ")
            )
        };
        assert_eq!(errors_of(&spec_with(MAX_CONTEXT_SOURCES)), vec![]);
        let over = MAX_CONTEXT_SOURCES + 8;
        assert_eq!(
            errors_of(&spec_with(over)),
            vec![field(
                "context",
                format!("{over} sources, over the limit of {MAX_CONTEXT_SOURCES}")
            )]
        );
    }

    #[test]
    fn secret_references_are_checked_and_name_the_field() {
        let good = "name: a\ntrigger: {manual: {}}\ncontext:\n  - {name: price, sensitive: true, http: {url: 'https://api.example.com/p/{{ event.sku }}', secretHeaders: {Authorization: {secret: PRICING_KEY, prefix: 'Bearer '}}}}\ntasks:\n  - {name: t, type: http, params: {url: 'https://api.example.com/charge/{{ event.id }}', body: {}}, secretHeaders: {X-Api-Key: {secret: PAYMENTS_KEY}}}\n  - {name: u, type: my.external, secretHeaders: {X-Key: {secret: OTHER}}}";
        assert!(validate(&spec_from_yaml(good).unwrap(), Utc::now()).is_ok());
        let cases = [
            (
                "context: [{name: p, http: {url: 'https://x/y', secretHeaders: {A: {secret: lower}}}}]\ntasks: [{name: t, type: log}]",
                "context[0].http.secretHeaders.A.secret",
            ),
            (
                "context: [{name: p, http: {url: '{{ event.url }}', secretHeaders: {A: {secret: K}}}}]\ntasks: [{name: t, type: log}]",
                "context[0].http.url",
            ),
            (
                "context: [{name: p, http: {url: 'https://x/', headers: {a: b}, secretHeaders: {A: {secret: K}}}}]\ntasks: [{name: t, type: log}]",
                "context[0].http.secretHeaders.A",
            ),
            (
                "tasks: [{name: t, type: http, params: {url: 'https://{{ event.host }}/x'}, secretHeaders: {A: {secret: K}}}]",
                "tasks[0].params.url",
            ),
            (
                "tasks: [{name: t, type: http, secretHeaders: {A: {secret: K}}}]",
                "tasks[0].params.url",
            ),
            (
                "tasks: [{name: t, type: log, secretHeaders: {A: {secret: K}}}]",
                "tasks[0].secretHeaders",
            ),
            (
                "tasks: [{name: t, type: http, params: {url: 'https://x/'}, secretHeaders: {A: {secret: '{{ event.name }}'}}}]",
                "tasks[0].secretHeaders.A.secret",
            ),
        ];
        for (body, field) in cases {
            let yaml = format!("name: a\ntrigger: {{manual: {{}}}}\n{body}");
            let errors = errors_of(&yaml);
            assert!(
                errors.iter().any(|e| e.field == field),
                "{body}: {errors:?}"
            );
        }
    }

    #[test]
    fn enabled_defaults_to_true() {
        let spec = spec_from_yaml(GOOD).unwrap();
        assert!(is_enabled(&spec));
        let spec = spec_from_yaml(&format!("{GOOD}\nenabled: false")).unwrap();
        assert!(!is_enabled(&spec));
    }

    #[test]
    fn a_tasks_concurrency_is_checked_naming_its_field() {
        let errors = |tasks: &str| -> Vec<String> {
            let yaml = format!("name: a\ntrigger: {{manual: {{}}}}\ntasks: [{tasks}]\n");
            match validate(&spec_from_yaml(&yaml).unwrap(), Utc::now()) {
                Ok(()) => Vec::new(),
                Err(e) => {
                    e.0.iter()
                        .map(|f| format!("{}: {}", f.field, f.message))
                        .collect()
                }
            }
        };
        assert_eq!(
            errors(
                "{name: t, type: http, params: {url: 'https://x.example'}, concurrency: {key: params.url, limit: 5}}"
            ),
            Vec::<String>::new()
        );
        let found = errors("{name: t, type: noop, concurrency: {key: 'params.(', limit: 0}}");
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("tasks[0].concurrency.limit: is required")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("tasks[0].concurrency.key: ")),
            "{found:?}"
        );
        let found = errors("{name: t, type: noop, concurrency: {limit: 10001}}");
        assert!(
            found
                .iter()
                .any(|e| e.contains("10001 is over the limit of 10000")),
            "{found:?}"
        );
        let found = errors("{name: t, type: human, concurrency: {limit: 1}}");
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("tasks[0].concurrency: does not apply to human tasks")),
            "{found:?}"
        );
    }
}

//! Stream, subject, consumer and header names: the one place they are spelled.

/// Users (and the webhook gateway) publish JSON here; the trigger consumes it.
pub const EVENTS_STREAM: &str = "FACTORY_EVENTS";
pub const EVENTS_SUBJECTS: &str = "events.>";
/// TriggerEvents, `triggers.<activity name>`; the orchestrator consumes them.
pub const TRIGGERS_STREAM: &str = "FACTORY_TRIGGERS";
pub const TRIGGERS_SUBJECTS: &str = "triggers.>";
/// TaskInstances, `tasks.<type>`, work-queue retention; executors consume them.
pub const TASKS_STREAM: &str = "FACTORY_TASKS";
pub const TASKS_SUBJECTS: &str = "tasks.>";
/// TaskResults, `results.<activity name>.<run id>`; the orchestrator consumes them.
pub const RESULTS_STREAM: &str = "FACTORY_RESULTS";
pub const RESULTS_SUBJECTS: &str = "results.>";
/// Dead letters: `dlq.tasks.<type>` (tasks that exhausted their attempts) and `dlq.events`
/// (events that could not be taken in), kept for operators.
pub const DLQ_STREAM: &str = "FACTORY_DLQ";
pub const DLQ_SUBJECTS: &str = "dlq.>";

/// Published (core NATS) whenever a definition changes, so every trigger replica reloads at once.
pub const DEFINITIONS_CHANGED: &str = "taskfactory.internal.definitions-changed";
/// Request/reply: the trigger asks an orchestrator to preview a run (`PreviewRun`).
pub const PREVIEW_REQUESTS: &str = "taskfactory.internal.preview";
/// How long the trigger waits for the answer to a request on [`PREVIEW_REQUESTS`]. An
/// orchestrator gives a preview up a little before (its sources and its wait for their room
/// with it), so it answers while someone still waits and holds nothing for a preview nobody does.
pub const PREVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Request/reply: the trigger's admin API asks an orchestrator to cancel a run, complete a human
/// task or redrive a dead one (the orchestrator owns runs and tasks).
pub const RUN_COMMANDS: &str = "taskfactory.internal.commands";
/// The KV bucket of cancelled runs (key = run id): executors check it before each attempt and watch
/// it to stop attempts in flight.
pub const CANCELLED_RUNS_BUCKET: &str = "taskfactory_cancelled_runs";
/// The key of [`CANCELLED_RUNS_BUCKET`] that says the bucket is complete: every run cancelled
/// when the bucket was created is in it. Written like [`FINISHED_TASKS_COMPLETE_KEY`] (its value:
/// the bucket's creation time, [`crate::complete`]) once the orchestrator refilled the bucket
/// from Postgres; a bucket without it (recreated empty) proves no run not cancelled. No run id
/// looks like it.
pub const CANCELLED_RUNS_COMPLETE_KEY: &str = "complete";
/// Tasks that reached a final state: key [`finished_task_key`] (`<task id>.<task type>`), value
/// the highest attempt number whose final result is known (decimal text, never lowered but by a
/// `RetryTask`). Executors write it once the results stream has a final result of theirs, the
/// orchestrator when it records one (and refills the bucket from Postgres when it was
/// recreated); executors read it before each attempt and never run a finished task.
pub const FINISHED_TASKS_BUCKET: &str = "taskfactory_finished_tasks";
/// The key of [`FINISHED_TASKS_BUCKET`] that says the bucket is complete: every task that was
/// final when the bucket was created is in it, under its [`finished_task_key`]. The orchestrator
/// writes it (its value: the bucket's creation time, [`crate::complete`]) once its refill from
/// Postgres is done; a bucket without it (recreated empty), or whose key names another bucket,
/// proves no task unfinished. No task's key looks like it (it has no dot). Named anew when the
/// keys changed (they were the task id alone, under the key `complete`), so that a bucket of the
/// old keys is refilled once.
pub const FINISHED_TASKS_COMPLETE_KEY: &str = "complete_by_type";

/// A task's key in [`FINISHED_TASKS_BUCKET`]: its id, then its type, so that NATS permissions can
/// let an executor write the entries of its own types only (`$KV.taskfactory_finished_tasks.*.<type>`)
/// and no other: an executor's credentials cannot mark another type's tasks finished.
pub fn finished_task_key(task_id: &str, task_type: &str) -> String {
    format!("{task_id}.{task_type}")
}
/// The queue group orchestrators answer previews in (one answers each).
pub const PREVIEW_QUEUE: &str = "taskfactory-orchestrator";
/// Published by the orchestrator when a run reaches a terminal state; activities can chain on it.
pub const RUN_COMPLETED_EVENT: &str = "events.taskfactory.run.completed";

/// Durable consumer names.
pub const TRIGGER_EVENTS_CONSUMER: &str = "taskfactory-trigger-events";
pub const ORCHESTRATOR_TRIGGERS_CONSUMER: &str = "taskfactory-orchestrator-triggers";
pub const ORCHESTRATOR_RESULTS_CONSUMER: &str = "taskfactory-orchestrator-results";

/// Headers.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
pub const HEADER_ERROR: &str = "Taskfactory-Error";
pub const HEADER_ORIGINAL_SUBJECT: &str = "Taskfactory-Original-Subject";
pub const HEADER_ORIGINAL_SEQUENCE: &str = "Taskfactory-Original-Sequence";
pub const HEADER_ORIGINAL_STREAM: &str = "Taskfactory-Original-Stream";
/// On dead letters: how many times the message had been delivered.
pub const HEADER_DELIVERIES: &str = "Taskfactory-Deliveries";
pub const HEADER_ATTEMPTS: &str = "Taskfactory-Attempts";
/// On requests the admin API sends an orchestrator: the id of their row in `admin_requests`.
pub const HEADER_ADMIN_REQUEST: &str = "Taskfactory-Admin-Request";

pub fn trigger_subject(activity_name: &str) -> String {
    format!("triggers.{activity_name}")
}

pub fn task_subject(task_type: &str) -> String {
    format!("tasks.{task_type}")
}

pub fn result_subject(activity_name: &str, run_id: &str) -> String {
    format!("results.{activity_name}.{run_id}")
}

/// Why a task's result subject ([`result_subject`]) would not be a subject the results stream
/// takes: the activity name must be tokens (names may hold dots: `billing.daily`), the run id one
/// token, and neither may be empty or hold wildcards or whitespace.
pub fn result_subject_error(activity_name: &str, run_id: &str) -> Option<String> {
    let bad_char = |c: char| c == '*' || c == '>' || c.is_whitespace() || c.is_control();
    let tokens_ok = |value: &str| {
        !value
            .split('.')
            .any(|t| t.is_empty() || t.chars().any(bad_char))
    };
    if !tokens_ok(activity_name) {
        return Some(format!(
            "its activity name {activity_name:?} cannot be part of a result subject"
        ));
    }
    if run_id.contains('.') || !tokens_ok(run_id) {
        return Some(format!(
            "its run id {run_id:?} cannot be one token of a result subject"
        ));
    }
    None
}

#[cfg(test)]
mod result_subject_tests {
    use super::result_subject_error;

    #[test]
    fn a_result_subject_needs_a_name_of_tokens_and_a_run_of_one() {
        assert_eq!(result_subject_error("daily", "run"), None);
        assert_eq!(result_subject_error("billing.daily", "run"), None);
        for name in ["", ".", "a..b", "a.", ".a", "a*", "a.>", "a b"] {
            assert!(result_subject_error(name, "run").is_some(), "{name:?}");
        }
        for run in ["", "a.b", "*", "r n"] {
            assert!(result_subject_error("daily", run).is_some(), "{run:?}");
        }
    }
}

/// The dead-letter subject of a task message, from its subject (`tasks.<type>`).
pub fn task_dlq_subject_of(subject: &str) -> String {
    task_dlq_subject(subject.strip_prefix("tasks.").unwrap_or(subject))
}

pub fn task_dlq_subject(task_type: &str) -> String {
    format!("dlq.tasks.{task_type}")
}

pub const EVENTS_DLQ_SUBJECT: &str = "dlq.events";
/// Trigger and result messages that cannot be decoded (only ever from a foreign publisher).
pub const TRIGGERS_DLQ_SUBJECT: &str = "dlq.triggers";
pub const RESULTS_DLQ_SUBJECT: &str = "dlq.results";
/// Every task's dead letters: the orchestrator marks their tasks `DEAD`.
pub const TASKS_DLQ_SUBJECTS: &str = "dlq.tasks.>";
/// The orchestrator's consumer of dead-lettered tasks.
pub const ORCHESTRATOR_DEAD_TASKS_CONSUMER: &str = "taskfactory-orchestrator-dead-tasks";

/// The kinds of dead letter, by the token after `dlq.` (`other` for anything else on the stream).
pub const DLQ_KINDS: [&str; 5] = ["tasks", "events", "triggers", "results", "other"];

/// The kind of a dead-letter subject (one of [`DLQ_KINDS`]): a bounded metric label.
pub fn dlq_kind(subject: &str) -> &'static str {
    let kind = subject
        .strip_prefix("dlq.")
        .and_then(|rest| rest.split('.').next())
        .unwrap_or_default();
    DLQ_KINDS
        .iter()
        .find(|known| **known == kind)
        .copied()
        .unwrap_or("other")
}

/// The durable consumer an executor uses for one task type; replicas share it (competing consumers).
pub fn executor_consumer(task_type: &str) -> String {
    format!("taskfactory-executor-{task_type}")
}

/// A message id as a NATS header can carry it: a header value holds no CR or LF, so those (and
/// the backslash that escapes them) are written `\r`, `\n`, `\\`. One-to-one, so ids that
/// differ stay apart, and the same id is always written the same (a republish is dropped as a
/// duplicate). An id without any of the three passes unchanged.
pub fn header_safe_msg_id(msg_id: &str) -> std::borrow::Cow<'_, str> {
    if !msg_id.contains(['\r', '\n', '\\']) {
        return std::borrow::Cow::Borrowed(msg_id);
    }
    let mut safe = String::with_capacity(msg_id.len() + 8);
    for c in msg_id.chars() {
        match c {
            '\\' => safe.push_str("\\\\"),
            '\r' => safe.push_str("\\r"),
            '\n' => safe.push_str("\\n"),
            c => safe.push(c),
        }
    }
    std::borrow::Cow::Owned(safe)
}

/// `Nats-Msg-Id` of a TriggerEvent: `<activity id>:<dedupe key>`.
pub fn trigger_msg_id(activity_id: &str, dedupe_key: &str) -> String {
    format!("{activity_id}:{dedupe_key}")
}

/// `Nats-Msg-Id` of a TaskResult: one per task attempt and outcome.
pub fn result_msg_id(task_id: &str, attempt: u32, status: &str) -> String {
    format!("{task_id}:{attempt}:{status}")
}

/// Whether `subject` matches the NATS subject `filter` (`*` one token, `>` one or more at the end).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (filter_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Why a subject (or filter, when `wildcards` is set) is not valid.
pub fn subject_error(subject: &str, wildcards: bool) -> Option<String> {
    if subject.is_empty() {
        return Some("is empty".to_owned());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Some(format!("{subject:?} has an empty token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Some(format!("{subject:?} contains whitespace"));
        }
        let is_wildcard = *token == "*" || *token == ">";
        if is_wildcard && !wildcards {
            return Some(format!("{subject:?} may not contain wildcards"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Some(format!("{subject:?}: '>' must be the last token"));
        }
        if !is_wildcard && (token.contains('*') || token.contains('>')) {
            return Some(format!(
                "{subject:?}: wildcards must be whole tokens, as in 'events.*.created'"
            ));
        }
    }
    None
}

/// A subject as span names show it (`publish <template>`): bounded, as the OpenTelemetry messaging
/// conventions ask. Task, trigger and dead-letter subjects are bounded by definitions and stay as
/// they are; a result subject loses its run id (`results.<activity>.{run_id}`); user event subjects
/// (which may hold ids) become `events`; any other subject its first token. The subject itself is
/// always in the span's `messaging.destination.name`.
pub fn destination_template(subject: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let first = subject.split('.').next().unwrap_or(subject);
    match first {
        "tasks" | "triggers" | "dlq" => Cow::Borrowed(subject),
        "results" => match subject.split('.').nth(1) {
            Some(activity) => Cow::Owned(format!("results.{activity}.{{run_id}}")),
            None => Cow::Borrowed(subject),
        },
        "events" if subject == RUN_COMPLETED_EVENT => Cow::Borrowed(subject),
        _ => Cow::Borrowed(first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_filters_match_like_nats() {
        assert!(subject_matches(
            "events.orders.created",
            "events.orders.created"
        ));
        assert!(subject_matches("events.*.created", "events.orders.created"));
        assert!(subject_matches("events.>", "events.orders.created"));
        assert!(!subject_matches("events.>", "events"));
        assert!(!subject_matches("events.*", "events.orders.created"));
        assert!(!subject_matches("events.orders", "events.orders.created"));
        assert!(!subject_matches("events.orders.created", "events.orders"));
    }

    #[test]
    fn dead_letters_are_grouped_by_the_kind_of_what_died() {
        assert_eq!(dlq_kind(&task_dlq_subject("http")), "tasks");
        assert_eq!(dlq_kind(EVENTS_DLQ_SUBJECT), "events");
        assert_eq!(dlq_kind(TRIGGERS_DLQ_SUBJECT), "triggers");
        assert_eq!(dlq_kind(RESULTS_DLQ_SUBJECT), "results");
        assert_eq!(dlq_kind("dlq.someone-else.x"), "other");
        assert_eq!(dlq_kind("dlq"), "other");
        assert_eq!(dlq_kind("dlq.other"), "other");
    }

    #[test]
    fn subject_validation_names_the_problem() {
        assert!(subject_error("events.a.b", false).is_none());
        assert!(subject_error("events.*.b", true).is_none());
        assert!(subject_error("events.>", true).is_none());
        assert!(
            subject_error("events..b", true)
                .unwrap()
                .contains("empty token")
        );
        assert!(
            subject_error("events.>.b", true)
                .unwrap()
                .contains("last token")
        );
        assert!(
            subject_error("events.a*", true)
                .unwrap()
                .contains("whole tokens")
        );
        assert!(
            subject_error("events.*", false)
                .unwrap()
                .contains("wildcards")
        );
    }

    #[test]
    fn span_destinations_are_bounded() {
        for (subject, template) in [
            ("tasks.http", "tasks.http"),
            ("triggers.billing", "triggers.billing"),
            ("dlq.tasks.http", "dlq.tasks.http"),
            (
                "results.billing.8ad6c2bd-68cd-5266-a087-4d2b9eeda36d",
                "results.billing.{run_id}",
            ),
            ("events.orders.o-1234", "events"),
            ("events", "events"),
            (RUN_COMPLETED_EVENT, RUN_COMPLETED_EVENT),
            ("audit.orders.o-1234", "audit"),
        ] {
            assert_eq!(destination_template(subject), template, "{subject}");
        }
    }

    #[test]
    fn a_message_id_with_line_breaks_is_escaped_one_to_one() {
        assert_eq!(header_safe_msg_id("a:b c"), "a:b c");
        assert_eq!(header_safe_msg_id("a\r\nb"), "a\\r\\nb");
        // Distinct ids stay distinct: a backslash is always escaped.
        assert_ne!(header_safe_msg_id("x\\n\n"), header_safe_msg_id("x\n\\n"));
        assert_ne!(header_safe_msg_id("a\\r"), header_safe_msg_id("a\r"));
        assert_eq!(header_safe_msg_id("a\\b"), "a\\\\b");
        assert!(!header_safe_msg_id("\n\r").contains(['\r', '\n']));
    }
}

//! What one result does to its task: the rule the orchestrator carries out for every result, one
//! at a time or in a batch (the same function for both, so they cannot drift).
//!
//! A result comes from an executor, over `results.>` (where anyone who can publish can send one),
//! or from the orchestrator itself: `CompleteTask`, a human task's deadline, a type nobody serves.
//! [`judge`] decides, in this order:
//!
//! 1. **Refused** — nothing is recorded and the task does not change: a status no result has
//!    (`PENDING`, `WAITING`, unspecified); and, from an executor, a result for a human task (only
//!    `CompleteTask` completes one), a result naming another task type, run or activity than the
//!    task's, or an attempt number the task's current series never handed out.
//! 2. **The task is final** → the result joins the attempt history only (the first final result
//!    won).
//! 3. **An attempt of an earlier series** (before the last `RetryTask`) → history only.
//! 4. Otherwise the result joins the history and moves the task forward: a final result
//!    (`SUCCEEDED`, `DEAD`, `CANCELLED`) decides it; `FAILED` is shown unless a later attempt
//!    already is; `RUNNING` moves only a `PENDING`, `RUNNING` or `FAILED` task that shows an
//!    older attempt.
//!
//! Attempts are numbered by series: the first series hands out 1, 2, …; `RetryTask` starts a new
//! one after the attempts so far (`attempt_base`). Executors number an attempt
//! `attempt_base + deliveries`, and JetStream also counts deliveries that ran nothing (an executor
//! that crashed, or handed a message back at shutdown), so a series may go
//! [`REDELIVERY_ALLOWANCE`] past its `retry.maxAttempts`; beyond that, no number was handed out.

use taskfactory_proto::v1::TaskStatus;
use uuid::Uuid;

use crate::ids::{ActivityId, RunId};
use crate::status::task_is_terminal;

/// The task type served by people through `CompleteTask`, never by executors.
pub const HUMAN_TASK_TYPE: &str = "human";

/// Whether a task message of the series after `attempt_base` was already decided by the attempt
/// `finished_by` (from the finished-tasks bucket): it was if that attempt is of this series or a
/// later one. A `RetryTask` redrive starts a series after every attempt so far, so its message
/// runs.
pub fn already_finished(finished_by: u32, attempt_base: u32) -> bool {
    finished_by > attempt_base
}

/// A finished-tasks value: the attempt number as decimal text (surrounding whitespace ignored).
/// Anything else finishes nothing.
pub fn finished_marker(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// What an executor does with a task message, from the finished-tasks bucket: the task's entry
/// (`held`, [`finished_marker`]) and whether the bucket is complete (its
/// [`FINISHED_TASKS_COMPLETE_KEY`](crate::subjects::FINISHED_TASKS_COMPLETE_KEY) is there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishedCheck {
    /// Finished by this attempt: ack, never run.
    Finished(u32),
    /// No entry, but the bucket is not complete (recreated empty, its refill from Postgres not
    /// done): the task may be finished all the same. Delivered again later, not run.
    Unproven,
    /// Not finished: run it.
    ToRun,
}

pub fn check_finished(held: Option<u32>, complete: bool, attempt_base: u32) -> FinishedCheck {
    match held {
        Some(by) if already_finished(by, attempt_base) => FinishedCheck::Finished(by),
        _ if !complete => FinishedCheck::Unproven,
        _ => FinishedCheck::ToRun,
    }
}

/// What an executor does with a task message, from the cancelled-runs bucket: the run's entry
/// (`held`, the reason it was cancelled) and whether the bucket is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelledCheck {
    /// The run was cancelled, for this reason: report the task `CANCELLED`, never run it.
    Cancelled(String),
    /// No entry, but the bucket is not complete (recreated empty, its refill from Postgres not
    /// done): the run may be cancelled all the same. Not run yet.
    Unproven,
    /// Not cancelled.
    NotCancelled,
}

pub fn check_cancelled(held: Option<String>, complete: bool) -> CancelledCheck {
    match held {
        Some(reason) => CancelledCheck::Cancelled(reason),
        None if !complete => CancelledCheck::Unproven,
        None => CancelledCheck::NotCancelled,
    }
}

/// Whether a finished-tasks entry holding `held` is raised by writing `attempt`: values only
/// ever grow, so a late result of an earlier series never lowers it.
pub fn raises_marker(held: Option<u32>, attempt: u32) -> bool {
    held.is_none_or(|held| held < attempt)
}

/// Attempt numbers a series may use past its `retry.maxAttempts`: deliveries that were no attempt
/// of their own (a crash, a hand-back at shutdown) still count. Generous, because refusing a real
/// result would strand its task; what it bounds is a forged number of millions.
pub const REDELIVERY_ALLOWANCE: u32 = 20;

/// What a task is, as far as results are concerned; none of it changes with a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskFacts<'a> {
    /// Whether results must prove they were handed the task (its `result_token`): every task
    /// but those stored before tokens existed.
    pub token_required: bool,
    pub task_type: &'a str,
    pub run: RunId,
    pub activity: ActivityId,
    /// Attempts before the current series: 0, or the attempts at the last `RetryTask`.
    pub attempt_base: u32,
    /// The task's effective `retry.maxAttempts`; `None` for a task recorded before it was kept
    /// (its attempt numbers are not bounded).
    pub max_attempts: Option<u32>,
}

/// What a task shows: its state, and the highest attempt number it has taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskState {
    pub status: TaskStatus,
    pub attempts: u32,
}

/// What an executor's result says about the task it ran (copied from the `TaskInstance`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// Whether the result carried the task's token ([`verify_result_token`]).
    pub token_valid: bool,
    pub task_type: String,
    pub run_id: String,
    pub activity_id: String,
}

/// One result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report<'a> {
    pub status: TaskStatus,
    pub attempt: u32,
    /// A start report's execution id (empty for outcomes).
    pub execution: &'a str,
    /// From an executor: what it claims. `None`: the orchestrator's own.
    pub claim: Option<&'a Claim>,
}

/// Why a result is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("status {} is not a result status", .0.as_str_name())]
    NotAResultStatus(TaskStatus),
    #[error(
        "the task is a human task: only CompleteTask completes it, an executor's result for it is refused"
    )]
    HumanTask,
    #[error(
        "it does not carry the task's result token: only whoever was handed the task (its TaskInstance) reports on it"
    )]
    WrongToken,
    #[error("it names task type {claimed:?}, but the task is of type {actual:?}")]
    WrongType { claimed: String, actual: String },
    #[error("it names run {claimed:?}, but the task belongs to run {actual}")]
    WrongRun { claimed: String, actual: RunId },
    #[error("it names activity {claimed:?}, but the task belongs to activity {actual}")]
    WrongActivity { claimed: String, actual: ActivityId },
    #[error(
        "attempt {attempt} was never handed out: the task's current series numbers its attempts {first} to {last}"
    )]
    AttemptNotHandedOut { attempt: u32, first: u32, last: u32 },
    #[error("attempt 0 was never handed out: attempts are numbered from 1")]
    AttemptZero,
    #[error(
        "its execution id is {bytes} bytes, over the limit of {MAX_EXECUTION_BYTES} (a UUID is 36)"
    )]
    ExecutionTooLong { bytes: usize },
}

/// The longest execution id a start report may carry: a UUID's text is 36 bytes. It is part of
/// the attempt history's key, and an index row has room for about 2.7 KB: a longer id would fail
/// every insert, and the report would come back for ever.
pub const MAX_EXECUTION_BYTES: usize = 128;

impl Refusal {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAResultStatus(_) => "not_a_result_status",
            Refusal::HumanTask => "human_task",
            Refusal::WrongToken => "wrong_token",
            Refusal::WrongType { .. }
            | Refusal::WrongRun { .. }
            | Refusal::WrongActivity { .. } => "wrong_task",
            Refusal::AttemptNotHandedOut { .. } | Refusal::AttemptZero => "attempt_not_handed_out",
            Refusal::ExecutionTooLong { .. } => "execution_too_long",
        }
    }
}

/// What a result does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not recorded at all; the task does not change.
    Refused(Refusal),
    /// The task is final: the result joins its attempt history only.
    TaskFinal,
    /// The result joins the attempt history, and changes the task as said (`None`: not at all —
    /// an older attempt, or an attempt of an earlier series).
    Recorded(Option<Change>),
}

/// How a recorded result changes its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub status: TaskStatus,
    pub attempts: u32,
    /// The task takes the result's error (and its output, when it has one).
    pub takes_result: bool,
    /// The task ends with this result (its time is the task's end): count it toward its run.
    pub finishes: bool,
}

impl Change {
    /// The task as it is after the change.
    pub fn state(&self) -> TaskState {
        TaskState {
            status: self.status,
            attempts: self.attempts,
        }
    }
}

/// Whether an executor may report this status.
/// How long a result token is (hex digits of HMAC-SHA256: 128 bits).
const TOKEN_HEX_LEN: usize = 32;

/// The result token of a task: an HMAC of its id under the installation's key, so only whoever
/// received the TaskInstance (or holds the key) can report on the task. Deterministic: the same
/// task always gets the same token, whoever spawns or redrives it.
pub fn result_token(key: &[u8], task: Uuid) -> String {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(task.as_bytes());
    let full = hex::encode(mac.finalize().into_bytes());
    full[..TOKEN_HEX_LEN].to_owned()
}

/// Whether `token` is the task's result token (compared in constant time).
pub fn verify_result_token(key: &[u8], task: Uuid, token: &str) -> bool {
    use hmac::Mac as _;
    let Ok(claimed) = hex::decode(token) else {
        return false;
    };
    if claimed.len() * 2 != TOKEN_HEX_LEN {
        return false;
    }
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(task.as_bytes());
    mac.verify_truncated_left(&claimed).is_ok()
}

pub fn is_result_status(status: TaskStatus) -> bool {
    matches!(
        status,
        TaskStatus::Running
            | TaskStatus::Failed
            | TaskStatus::Succeeded
            | TaskStatus::Dead
            | TaskStatus::Cancelled
    )
}

/// What `report` does to a task that is `facts` and shows `now` (see the module docs).
pub fn judge(facts: &TaskFacts<'_>, now: TaskState, report: &Report<'_>) -> Verdict {
    if !is_result_status(report.status) {
        return Verdict::Refused(Refusal::NotAResultStatus(report.status));
    }
    if report.execution.len() > MAX_EXECUTION_BYTES {
        return Verdict::Refused(Refusal::ExecutionTooLong {
            bytes: report.execution.len(),
        });
    }
    if let Some(claim) = report.claim
        && let Err(refusal) = check_claim(facts, claim, report.attempt)
    {
        return Verdict::Refused(refusal);
    }
    if task_is_terminal(now.status) {
        return Verdict::TaskFinal;
    }
    if report.attempt <= facts.attempt_base {
        return Verdict::Recorded(None);
    }
    let attempts = now.attempts.max(report.attempt);
    let change = match report.status {
        status if task_is_terminal(status) => Some(Change {
            status,
            attempts,
            takes_result: true,
            finishes: true,
        }),
        TaskStatus::Failed if report.attempt >= now.attempts => Some(Change {
            status: TaskStatus::Failed,
            attempts,
            takes_result: true,
            finishes: false,
        }),
        TaskStatus::Running
            if report.attempt > now.attempts
                && matches!(
                    now.status,
                    TaskStatus::Pending | TaskStatus::Running | TaskStatus::Failed
                ) =>
        {
            Some(Change {
                status: TaskStatus::Running,
                attempts,
                takes_result: false,
                finishes: false,
            })
        }
        _ => None,
    };
    Verdict::Recorded(change)
}

/// What a result the database refuses for its data is recorded as, in its place (the same
/// attempt, with [`unstorable_error`] and nothing else it carried), so its task does not wait for
/// a result no executor sends again: a `FAILED` attempt stays `FAILED` (its executor retries it);
/// a success ends the task `DEAD` (what it produced is lost, and its executor marked the task
/// finished: no attempt follows); `DEAD` and `CANCELLED` stay. A start report (`RUNNING`) has
/// none: it changes nothing final, and its attempt's outcome follows.
pub fn unstorable_status(status: TaskStatus) -> Option<TaskStatus> {
    match status {
        TaskStatus::Succeeded => Some(TaskStatus::Dead),
        TaskStatus::Failed | TaskStatus::Dead | TaskStatus::Cancelled => Some(status),
        _ => None,
    }
}

/// The longest error [`unstorable_error`] makes.
pub const MAX_UNSTORABLE_ERROR_BYTES: usize = 1024;

/// The error recorded in place of a result the database refused (`code`, `message`: its SQLSTATE
/// and message, never the refused data): one line of at most [`MAX_UNSTORABLE_ERROR_BYTES`], with
/// no NUL, so it is stored where the result was not.
pub fn unstorable_error(status: TaskStatus, attempt: u32, code: &str, message: &str) -> String {
    let mut error = format!(
        "the {} result of attempt {attempt} could not be stored: SQLSTATE {code}: {message} \
         (the result as sent is on the dead-letter stream)",
        status.as_str_name()
    );
    error = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::values::truncate_text(&mut error, MAX_UNSTORABLE_ERROR_BYTES);
    error
}

/// The executor name recorded with an [`unstorable_error`]: the result's, cut to at most
/// [`MAX_UNSTORABLE_EXECUTOR_BYTES`], with no NUL.
pub fn unstorable_executor(executor: &str) -> String {
    let mut executor = executor.replace('\0', "\u{fffd}");
    crate::values::truncate_text(&mut executor, MAX_UNSTORABLE_EXECUTOR_BYTES);
    executor
}

/// The longest executor name [`unstorable_executor`] keeps (names are short; this one's
/// result was refused, and its name may be why).
pub const MAX_UNSTORABLE_EXECUTOR_BYTES: usize = 256;

/// One row of a task's attempt history, as far as repeated starts are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub attempt: u32,
    pub status: TaskStatus,
    /// The execution a start report named (empty for outcomes, and starts of older executors).
    pub execution: String,
}

/// Whether the start of `execution` for `attempt` repeats a run of the task, given its history
/// (`seen`, before this start), its series (`attempt_base`) and what it shows (`now`). It does
/// when another execution started this attempt before (a consumer recreated counts from 1 again;
/// two deliveries at once), or started an earlier attempt of the series whose outcome never came
/// (a crash lost it: the task ran, and runs again), or the task had ended (with no outcome of
/// this attempt that could be its own, arrived first; a cancel is no repetition). A start of an
/// older executor (no execution id) never counts. An outcome still on its way when the next
/// attempt starts is counted too: rare, since a retry waits its backoff.
pub fn repeated_start(
    seen: &[Seen],
    attempt: u32,
    execution: &str,
    attempt_base: u32,
    now: TaskStatus,
) -> bool {
    if execution.is_empty() {
        return false;
    }
    let has_outcome = |attempt: u32| {
        seen.iter()
            .any(|row| row.attempt == attempt && row.status != TaskStatus::Running)
    };
    let another_start = seen.iter().any(|row| {
        row.status == TaskStatus::Running
            && !row.execution.is_empty()
            && row.execution != execution
            && row.attempt > attempt_base
            && row.attempt <= attempt
            && (row.attempt == attempt || !has_outcome(row.attempt))
    });
    another_start
        || (task_is_terminal(now) && now != TaskStatus::Cancelled && !has_outcome(attempt))
}

/// An executor's result must be for an executor's task, name the task it is for, and carry an
/// attempt number that was handed out.
fn check_claim(facts: &TaskFacts<'_>, claim: &Claim, attempt: u32) -> Result<(), Refusal> {
    if facts.task_type == HUMAN_TASK_TYPE {
        return Err(Refusal::HumanTask);
    }
    if facts.token_required && !claim.token_valid {
        return Err(Refusal::WrongToken);
    }
    if claim.task_type != facts.task_type {
        return Err(Refusal::WrongType {
            claimed: claim.task_type.clone(),
            actual: facts.task_type.to_owned(),
        });
    }
    if Uuid::parse_str(&claim.run_id).ok() != Some(facts.run.0) {
        return Err(Refusal::WrongRun {
            claimed: claim.run_id.clone(),
            actual: facts.run,
        });
    }
    if Uuid::parse_str(&claim.activity_id).ok() != Some(facts.activity.0) {
        return Err(Refusal::WrongActivity {
            claimed: claim.activity_id.clone(),
            actual: facts.activity,
        });
    }
    if attempt == 0 {
        return Err(Refusal::AttemptZero);
    }
    if let Some(max_attempts) = facts.max_attempts {
        let first = facts.attempt_base.saturating_add(1);
        let last = facts
            .attempt_base
            .saturating_add(max_attempts)
            .saturating_add(REDELIVERY_ALLOWANCE);
        if attempt > last {
            return Err(Refusal::AttemptNotHandedOut {
                attempt,
                first,
                last,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cancelled_run_proves_nothing_in_an_incomplete_bucket() {
        assert_eq!(
            check_cancelled(Some("why".into()), false),
            CancelledCheck::Cancelled("why".into())
        );
        assert_eq!(check_cancelled(None, false), CancelledCheck::Unproven);
        assert_eq!(check_cancelled(None, true), CancelledCheck::NotCancelled);
    }

    #[test]
    fn a_task_runs_only_when_the_complete_bucket_has_no_entry_finishing_its_series() {
        use FinishedCheck::{Finished, ToRun, Unproven};
        assert_eq!(check_finished(Some(2), true, 0), Finished(2));
        assert_eq!(
            check_finished(Some(2), false, 0),
            Finished(2),
            "an entry proves it"
        );
        assert_eq!(check_finished(None, true, 0), ToRun);
        assert_eq!(check_finished(None, false, 0), Unproven, "being refilled");
        assert_eq!(check_finished(Some(3), true, 3), ToRun, "a redrive");
        assert_eq!(check_finished(Some(3), false, 3), Unproven);
        assert_eq!(finished_marker(b" 7\n"), Some(7));
        for bad in [&b""[..], b"x", b"-1", b"1.5", b"\xff"] {
            assert_eq!(finished_marker(bad), None, "{bad:?}");
        }
        assert!(raises_marker(None, 1));
        assert!(raises_marker(Some(1), 2));
        assert!(!raises_marker(Some(2), 2));
        assert!(!raises_marker(Some(3), 2), "never lowered");
    }

    #[test]
    fn a_finished_task_is_finished_for_its_series_not_for_a_redrive() {
        assert!(already_finished(1, 0));
        assert!(already_finished(3, 0));
        assert!(!already_finished(3, 3), "RetryTask after attempt 3");
        assert!(already_finished(4, 3));
        assert!(!already_finished(0, 0));
    }

    #[test]
    fn a_start_repeats_a_run_when_another_ran_without_an_outcome_or_the_task_had_ended() {
        let seen = |attempt, status, execution: &str| Seen {
            attempt,
            status,
            execution: execution.to_owned(),
        };
        use TaskStatus::{Cancelled, Failed, Pending, Running, Succeeded};
        let started = [seen(1, Running, "a")];
        assert!(!repeated_start(&[], 1, "a", 0, Pending), "the first start");
        assert!(
            !repeated_start(&started, 1, "a", 0, Running),
            "its redelivery"
        );
        assert!(
            repeated_start(&started, 1, "b", 0, Running),
            "a second execution of one attempt"
        );
        assert!(
            repeated_start(&started, 2, "b", 0, Running),
            "attempt 1's outcome was lost"
        );
        let failed = [seen(1, Running, "a"), seen(1, Failed, "")];
        assert!(!repeated_start(&failed, 2, "b", 0, Failed), "a retry");
        assert!(
            repeated_start(&failed, 1, "b", 0, Failed),
            "attempt 1 again"
        );
        assert!(
            !repeated_start(&started, 2, "b", 1, Running),
            "a start of an earlier series"
        );
        assert!(
            !repeated_start(&started, 1, "", 0, Running),
            "an older executor's start"
        );
        let ended = [seen(1, Running, "a"), seen(1, Succeeded, "")];
        assert!(
            repeated_start(&ended, 2, "b", 0, Succeeded),
            "after the end"
        );
        assert!(
            !repeated_start(&ended, 2, "b", 0, Cancelled),
            "a cancel is no repetition"
        );
        let outcome_first = [seen(1, Succeeded, "")];
        assert!(
            !repeated_start(&outcome_first, 1, "a", 0, Succeeded),
            "its own outcome arrived before its start"
        );
    }

    use proptest::prelude::*;

    const RUN: RunId = RunId(Uuid::from_u128(1));
    const ACTIVITY: ActivityId = ActivityId(Uuid::from_u128(2));

    fn facts(task_type: &str, attempt_base: u32) -> TaskFacts<'_> {
        TaskFacts {
            token_required: true,
            task_type,
            run: RUN,
            activity: ACTIVITY,
            attempt_base,
            max_attempts: Some(3),
        }
    }

    fn claim(task_type: &str) -> Claim {
        Claim {
            token_valid: true,
            task_type: task_type.to_owned(),
            run_id: RUN.to_string(),
            activity_id: ACTIVITY.to_string(),
        }
    }

    fn state(status: TaskStatus, attempts: u32) -> TaskState {
        TaskState { status, attempts }
    }

    fn from_executor(claim: &Claim, attempt: u32, status: TaskStatus) -> Report<'_> {
        Report {
            status,
            attempt,
            execution: "",
            claim: Some(claim),
        }
    }

    fn shown(verdict: &Verdict) -> Option<(TaskStatus, u32)> {
        match verdict {
            Verdict::Recorded(Some(change)) => Some((change.status, change.attempts)),
            _ => None,
        }
    }

    #[test]
    fn an_executors_result_for_a_human_task_is_refused_and_complete_task_is_taken() {
        let human = facts(HUMAN_TASK_TYPE, 0);
        let waiting = state(TaskStatus::Waiting, 0);
        let claimed = claim(HUMAN_TASK_TYPE);
        for status in [TaskStatus::Succeeded, TaskStatus::Running, TaskStatus::Dead] {
            assert_eq!(
                judge(&human, waiting, &from_executor(&claimed, 1, status)),
                Verdict::Refused(Refusal::HumanTask)
            );
        }
        let completed = Report {
            status: TaskStatus::Succeeded,
            attempt: 1,
            execution: "",
            claim: None,
        };
        assert_eq!(
            shown(&judge(&human, waiting, &completed)),
            Some((TaskStatus::Succeeded, 1))
        );
    }

    #[test]
    fn a_start_with_an_execution_id_too_long_to_store_is_refused() {
        let task = facts("http", 0);
        let pending = state(TaskStatus::Pending, 0);
        let claimed = claim("http");
        let uuid = "0b7c6c1e-5d6a-4d55-9a43-1b8f1f2f0a11";
        let long = "x".repeat(MAX_EXECUTION_BYTES + 1);
        let start = |execution| Report {
            execution,
            ..from_executor(&claimed, 1, TaskStatus::Running)
        };
        assert_eq!(
            shown(&judge(&task, pending, &start(uuid))),
            Some((TaskStatus::Running, 1))
        );
        assert_eq!(
            judge(&task, pending, &start(&long)),
            Verdict::Refused(Refusal::ExecutionTooLong {
                bytes: MAX_EXECUTION_BYTES + 1
            })
        );
    }

    #[test]
    fn a_result_naming_another_type_run_or_activity_is_refused() {
        let task = facts("http", 0);
        let pending = state(TaskStatus::Pending, 0);
        let mut other_type = claim("publish");
        let mut no_type = claim("");
        let mut other_run = claim("http");
        other_run.run_id = Uuid::from_u128(9).to_string();
        let mut garbage_run = claim("http");
        garbage_run.run_id = "not a uuid".to_owned();
        let mut other_activity = claim("http");
        other_activity.activity_id = String::new();
        for (claimed, reason) in [
            (&mut other_type, "wrong_task"),
            (&mut no_type, "wrong_task"),
            (&mut other_run, "wrong_task"),
            (&mut garbage_run, "wrong_task"),
            (&mut other_activity, "wrong_task"),
        ] {
            match judge(
                &task,
                pending,
                &from_executor(claimed, 1, TaskStatus::Succeeded),
            ) {
                Verdict::Refused(refusal) => assert_eq!(refusal.reason(), reason),
                other => panic!("{claimed:?}: {other:?}"),
            }
        }
        // The same run id in capitals is the same run.
        let mut upper = claim("http");
        upper.run_id = RUN.to_string().to_uppercase();
        assert_eq!(
            shown(&judge(
                &task,
                pending,
                &from_executor(&upper, 1, TaskStatus::Succeeded)
            )),
            Some((TaskStatus::Succeeded, 1))
        );
    }

    #[test]
    fn attempts_are_taken_only_within_the_current_series() {
        let claimed = claim("http");
        // First series: 1 to 3 attempts, plus the redelivery allowance.
        let first = facts("http", 0);
        let pending = state(TaskStatus::Pending, 0);
        let last = 3 + REDELIVERY_ALLOWANCE;
        assert_eq!(
            judge(
                &first,
                pending,
                &from_executor(&claimed, 0, TaskStatus::Failed)
            ),
            Verdict::Refused(Refusal::AttemptZero)
        );
        assert_eq!(
            shown(&judge(
                &first,
                pending,
                &from_executor(&claimed, last, TaskStatus::Running)
            )),
            Some((TaskStatus::Running, last))
        );
        assert_eq!(
            judge(
                &first,
                pending,
                &from_executor(&claimed, last + 1, TaskStatus::Running)
            ),
            Verdict::Refused(Refusal::AttemptNotHandedOut {
                attempt: last + 1,
                first: 1,
                last
            })
        );
        assert!(matches!(
            judge(
                &first,
                pending,
                &from_executor(&claimed, u32::MAX, TaskStatus::Dead)
            ),
            Verdict::Refused(Refusal::AttemptNotHandedOut { .. })
        ));
        // After RetryTask at attempt 2: the old series' results only join the history, even a
        // final one; the new series is 3 to 5 (+ allowance).
        let second = facts("http", 2);
        let redriven = state(TaskStatus::Pending, 2);
        assert_eq!(
            judge(
                &second,
                redriven,
                &from_executor(&claimed, 2, TaskStatus::Succeeded)
            ),
            Verdict::Recorded(None)
        );
        assert_eq!(
            shown(&judge(
                &second,
                redriven,
                &from_executor(&claimed, 3, TaskStatus::Succeeded)
            )),
            Some((TaskStatus::Succeeded, 3))
        );
        assert!(matches!(
            judge(
                &second,
                redriven,
                &from_executor(&claimed, 2 + last + 1, TaskStatus::Running)
            ),
            Verdict::Refused(Refusal::AttemptNotHandedOut { first: 3, .. })
        ));
        // A task recorded before `maxAttempts` was kept: no upper bound.
        let legacy = TaskFacts {
            max_attempts: None,
            ..first
        };
        assert_eq!(
            shown(&judge(
                &legacy,
                pending,
                &from_executor(&claimed, 1000, TaskStatus::Running)
            )),
            Some((TaskStatus::Running, 1000))
        );
    }

    #[test]
    fn late_and_out_of_order_results_never_move_a_task_backwards() {
        let task = facts("http", 0);
        let claimed = claim("http");
        let at = |status, attempts| state(status, attempts);
        let report = |attempt, status| from_executor(&claimed, attempt, status);
        // A late failure of attempt 1 while attempt 2 runs: history only.
        assert_eq!(
            judge(
                &task,
                at(TaskStatus::Running, 2),
                &report(1, TaskStatus::Failed)
            ),
            Verdict::Recorded(None)
        );
        // A failure of the attempt shown replaces its running report.
        assert_eq!(
            shown(&judge(
                &task,
                at(TaskStatus::Running, 2),
                &report(2, TaskStatus::Failed)
            )),
            Some((TaskStatus::Failed, 2))
        );
        // A running report after its own attempt's failure: history only.
        assert_eq!(
            judge(
                &task,
                at(TaskStatus::Failed, 1),
                &report(1, TaskStatus::Running)
            ),
            Verdict::Recorded(None)
        );
        // A final result of an older attempt still decides (the first final result wins).
        let decided = judge(
            &task,
            at(TaskStatus::Running, 3),
            &report(2, TaskStatus::Dead),
        );
        assert_eq!(shown(&decided), Some((TaskStatus::Dead, 3)));
        // Nothing changes a final task.
        for status in [
            TaskStatus::Succeeded,
            TaskStatus::Running,
            TaskStatus::Cancelled,
        ] {
            assert_eq!(
                judge(&task, at(TaskStatus::Dead, 3), &report(3, status)),
                Verdict::TaskFinal
            );
        }
        // Statuses no result has.
        for status in [
            TaskStatus::Pending,
            TaskStatus::Waiting,
            TaskStatus::Unspecified,
        ] {
            assert_eq!(
                judge(&task, at(TaskStatus::Pending, 0), &report(1, status)),
                Verdict::Refused(Refusal::NotAResultStatus(status))
            );
        }
    }

    fn any_status() -> impl Strategy<Value = TaskStatus> {
        prop_oneof![
            Just(TaskStatus::Running),
            Just(TaskStatus::Failed),
            Just(TaskStatus::Succeeded),
            Just(TaskStatus::Dead),
            Just(TaskStatus::Cancelled),
            Just(TaskStatus::Pending),
            Just(TaskStatus::Waiting),
        ]
    }

    proptest! {
        /// Whatever executors send, in whatever order: a final task stays as it is, the attempts
        /// shown never go down nor past what the series handed out, and a refused or unchanging
        /// result leaves the task exactly as it was.
        #[test]
        fn no_sequence_of_results_moves_a_task_backwards_or_past_its_series(
            base in 0u32..10,
            reports in proptest::collection::vec((0u32..60, any_status(), any::<bool>()), 0..40),
        ) {
            let task = facts("http", base);
            let good = claim("http");
            let bad = claim("log");
            let mut now = state(TaskStatus::Pending, base);
            for (attempt, status, honest) in reports {
                let claimed = if honest { &good } else { &bad };
                let before = now;
                let verdict = judge(&task, now, &from_executor(claimed, attempt, status));
                if let Verdict::Recorded(Some(change)) = &verdict {
                    now = change.state();
                }
                if task_is_terminal(before.status) {
                    prop_assert_eq!(now, before);
                }
                prop_assert!(now.attempts >= before.attempts);
                prop_assert!(now.attempts <= base + 3 + REDELIVERY_ALLOWANCE);
                if !matches!(verdict, Verdict::Recorded(Some(_))) {
                    prop_assert_eq!(now, before);
                }
                if !honest {
                    prop_assert!(matches!(verdict, Verdict::Refused(_)));
                }
            }
        }
    }

    #[test]
    fn a_result_without_the_tasks_token_is_refused() {
        let key = b"an installation key of any length";
        let task = Uuid::from_u128(7);
        let token = result_token(key, task);
        assert_eq!(token.len(), 32);
        assert_eq!(token, result_token(key, task), "deterministic");
        assert!(verify_result_token(key, task, &token));
        assert!(!verify_result_token(key, Uuid::from_u128(8), &token));
        assert!(!verify_result_token(b"another key", task, &token));
        assert!(!verify_result_token(key, task, ""));
        assert!(!verify_result_token(key, task, &token[..30]));
        assert!(!verify_result_token(
            key,
            task,
            "not hex at all, but 32 chars...."
        ));

        let forged = Claim {
            token_valid: false,
            ..claim("http")
        };
        assert_eq!(
            judge(
                &facts("http", 0),
                state(TaskStatus::Pending, 0),
                &from_executor(&forged, 1, TaskStatus::Succeeded)
            ),
            Verdict::Refused(Refusal::WrongToken)
        );
        // Tasks stored before tokens existed take results without one.
        let legacy = TaskFacts {
            token_required: false,
            ..facts("http", 0)
        };
        assert!(matches!(
            judge(
                &legacy,
                state(TaskStatus::Pending, 0),
                &from_executor(&forged, 1, TaskStatus::Succeeded)
            ),
            Verdict::Recorded(Some(_))
        ));
    }

    #[test]
    fn a_refused_result_is_recorded_as_a_failure_that_ends_the_task_when_it_was_final() {
        assert_eq!(
            unstorable_status(TaskStatus::Failed),
            Some(TaskStatus::Failed)
        );
        assert_eq!(
            unstorable_status(TaskStatus::Succeeded),
            Some(TaskStatus::Dead)
        );
        assert_eq!(unstorable_status(TaskStatus::Dead), Some(TaskStatus::Dead));
        assert_eq!(
            unstorable_status(TaskStatus::Cancelled),
            Some(TaskStatus::Cancelled)
        );
        assert_eq!(unstorable_status(TaskStatus::Running), None);
        for status in [TaskStatus::Failed, TaskStatus::Succeeded, TaskStatus::Dead] {
            let recorded = unstorable_status(status).expect("a result status");
            // The same finality: a final result still ends the task, a failed attempt does not.
            assert_eq!(task_is_terminal(recorded), task_is_terminal(status));
        }
    }

    #[test]
    fn the_error_of_a_refused_result_is_bounded_one_line_and_storable() {
        let error = unstorable_error(TaskStatus::Succeeded, 2, "22P05", "bad \0 value\nhere");
        assert!(error.starts_with(
            "the SUCCEEDED result of attempt 2 could not be stored: SQLSTATE 22P05: bad"
        ));
        assert!(!error.contains('\0') && !error.contains('\n'), "{error}");
        let long = unstorable_error(TaskStatus::Dead, 1, "54000", &"é".repeat(5000));
        assert!(long.len() <= MAX_UNSTORABLE_ERROR_BYTES && long.len() > 1000);
        assert_eq!(unstorable_executor("pod-1\0"), "pod-1\u{fffd}");
        assert_eq!(
            unstorable_executor(&"é".repeat(200)).len(),
            MAX_UNSTORABLE_EXECUTOR_BYTES
        );
    }
}

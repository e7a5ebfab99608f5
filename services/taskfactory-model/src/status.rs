//! Run and task states: their spelling in Postgres (the proto enum names, without the `RUN_`
//! prefix for runs) and the rule that they only move forward.
//!
//! Task: `PENDING` → `RUNNING` ⇄ `FAILED` (an attempt failed, another follows) → `SUCCEEDED` |
//! `DEAD` (attempts exhausted, or a permanent error) | `CANCELLED`; human tasks wait in `WAITING`.
//! The first terminal state wins; later results are recorded as attempts, never a second completion.
//!
//! Run: `PENDING` (recorded, tasks being made) → `RUNNING` (tasks spawned) → `SUCCEEDED` (every
//! task succeeded, or none was needed) | `FAILED` (evaluation failed, or a task died) | `SKIPPED` |
//! `CANCELLED`.

use taskfactory_proto::v1::{RunStatus, TaskStatus, TriggerSource};

/// How a trigger source is spelled in Postgres, logs and templates (`trigger.source`).
pub fn source_name(source: TriggerSource) -> &'static str {
    match source {
        TriggerSource::Schedule => "schedule",
        TriggerSource::Event => "event",
        TriggerSource::Webhook => "webhook",
        TriggerSource::Manual => "manual",
        TriggerSource::Backfill => "backfill",
        TriggerSource::Catchup => "catchup",
        TriggerSource::Unspecified => "unspecified",
    }
}

pub fn source_from_name(name: &str) -> TriggerSource {
    match name {
        "schedule" => TriggerSource::Schedule,
        "event" => TriggerSource::Event,
        "webhook" => TriggerSource::Webhook,
        "manual" => TriggerSource::Manual,
        "backfill" => TriggerSource::Backfill,
        "catchup" => TriggerSource::Catchup,
        _ => TriggerSource::Unspecified,
    }
}

pub fn task_status_db(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Unspecified | TaskStatus::Pending => "PENDING",
        TaskStatus::Running => "RUNNING",
        TaskStatus::Succeeded => "SUCCEEDED",
        TaskStatus::Failed => "FAILED",
        TaskStatus::Dead => "DEAD",
        TaskStatus::Cancelled => "CANCELLED",
        TaskStatus::Waiting => "WAITING",
    }
}

pub fn task_status_from_db(text: &str) -> TaskStatus {
    TaskStatus::from_str_name(text).unwrap_or(TaskStatus::Unspecified)
}

/// Whether no later result may change a task in this state.
pub fn task_is_terminal(status: TaskStatus) -> bool {
    matches!(
        status,
        TaskStatus::Succeeded | TaskStatus::Dead | TaskStatus::Cancelled
    )
}

pub fn run_status_db(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Unspecified | RunStatus::RunPending => "PENDING",
        RunStatus::RunRunning => "RUNNING",
        RunStatus::RunSucceeded => "SUCCEEDED",
        RunStatus::RunFailed => "FAILED",
        RunStatus::RunSkipped => "SKIPPED",
        RunStatus::RunCancelled => "CANCELLED",
    }
}

pub fn run_status_from_db(text: &str) -> RunStatus {
    RunStatus::from_str_name(&format!("RUN_{text}")).unwrap_or(RunStatus::Unspecified)
}

pub fn run_is_terminal(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::RunSucceeded
            | RunStatus::RunFailed
            | RunStatus::RunSkipped
            | RunStatus::RunCancelled
    )
}

/// A task state as metric labels spell it: lowercase (`succeeded`, `dead`, …).
pub fn task_outcome(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Unspecified | TaskStatus::Pending => "pending",
        TaskStatus::Running => "running",
        TaskStatus::Succeeded => "succeeded",
        TaskStatus::Failed => "failed",
        TaskStatus::Dead => "dead",
        TaskStatus::Cancelled => "cancelled",
        TaskStatus::Waiting => "waiting",
    }
}

/// A run state as metric labels spell it: lowercase (`succeeded`, `skipped`, …).
pub fn run_outcome(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Unspecified | RunStatus::RunPending => "pending",
        RunStatus::RunRunning => "running",
        RunStatus::RunSucceeded => "succeeded",
        RunStatus::RunFailed => "failed",
        RunStatus::RunSkipped => "skipped",
        RunStatus::RunCancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_round_trip() {
        for source in [
            TriggerSource::Schedule,
            TriggerSource::Event,
            TriggerSource::Webhook,
            TriggerSource::Manual,
            TriggerSource::Backfill,
            TriggerSource::Catchup,
        ] {
            assert_eq!(source_from_name(source_name(source)), source);
        }
    }

    #[test]
    fn database_spelling_round_trips() {
        for status in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Succeeded,
            TaskStatus::Failed,
            TaskStatus::Dead,
            TaskStatus::Cancelled,
            TaskStatus::Waiting,
        ] {
            assert_eq!(task_status_from_db(task_status_db(status)), status);
        }
        for status in [
            RunStatus::RunPending,
            RunStatus::RunRunning,
            RunStatus::RunSucceeded,
            RunStatus::RunFailed,
            RunStatus::RunSkipped,
            RunStatus::RunCancelled,
        ] {
            assert_eq!(run_status_from_db(run_status_db(status)), status);
        }
    }

    #[test]
    fn outcomes_are_the_database_spelling_in_lowercase() {
        for status in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Succeeded,
            TaskStatus::Failed,
            TaskStatus::Dead,
            TaskStatus::Cancelled,
            TaskStatus::Waiting,
        ] {
            assert_eq!(task_outcome(status), task_status_db(status).to_lowercase());
        }
        for status in [
            RunStatus::RunPending,
            RunStatus::RunRunning,
            RunStatus::RunSucceeded,
            RunStatus::RunFailed,
            RunStatus::RunSkipped,
            RunStatus::RunCancelled,
        ] {
            assert_eq!(run_outcome(status), run_status_db(status).to_lowercase());
        }
    }
}

//! What an executor makes of one attempt of a task: whether a delivery may run at all, the status
//! it reports, and what becomes of the task message. The executor does what these functions say;
//! they are the only statement of the rules.
//!
//! - success → `SUCCEEDED`, acked;
//! - the run was cancelled → `CANCELLED`, acked;
//! - a retryable failure with attempts left → `FAILED`, handed back after [`backoff`] (or the
//!   other side's `Retry-After`, when longer);
//! - otherwise → `DEAD`, dead-lettered.

use std::time::Duration;

use taskfactory_proto::v1::{RetryPolicy, TaskStatus};

use crate::results::REDELIVERY_ALLOWANCE;
use crate::spec::std_duration;

/// How an attempt ended, before the rules are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    Succeeded,
    /// The run was cancelled before or while the attempt ran.
    Cancelled,
    Failed {
        /// Whether another attempt may succeed.
        retryable: bool,
        /// The other side asked to wait this long (HTTP `Retry-After`, already capped).
        retry_after: Option<Duration>,
    },
}

/// What becomes of the task message once the attempt's result is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done with: acknowledged.
    Ack,
    /// Delivered again after this delay: the next attempt.
    RetryAfter(Duration),
    /// Out of attempts or not retryable: a copy to the dead-letter stream, then terminated.
    DeadLetter,
}

/// The status an attempt reports and what becomes of its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: TaskStatus,
    pub disposition: Disposition,
}

/// The verdict on attempt `series_attempt` (1-based, within its series: `RetryTask` starts a new
/// one) of a task with the effective `retry` policy.
pub fn verdict(
    end: AttemptEnd,
    series_attempt: u32,
    retry: &RetryPolicy,
    task_id: &str,
) -> Verdict {
    let (status, disposition) = match end {
        AttemptEnd::Succeeded => (TaskStatus::Succeeded, Disposition::Ack),
        AttemptEnd::Cancelled => (TaskStatus::Cancelled, Disposition::Ack),
        AttemptEnd::Failed {
            retryable: true,
            retry_after,
        } if series_attempt < retry.max_attempts => {
            let delay =
                backoff(retry, series_attempt, task_id).max(retry_after.unwrap_or_default());
            (TaskStatus::Failed, Disposition::RetryAfter(delay))
        }
        AttemptEnd::Failed { .. } => (TaskStatus::Dead, Disposition::DeadLetter),
    };
    Verdict {
        status,
        disposition,
    }
}

/// Whether delivery `series_attempt` of a task with `max_attempts` may run. Past its attempts the
/// task may be delivered [`REDELIVERY_ALLOWANCE`] more times (earlier deliveries crashed or could
/// not report); beyond that a result would be refused, so it is dead-lettered unrun.
pub fn may_run(series_attempt: u32, max_attempts: u32) -> bool {
    series_attempt <= max_attempts.saturating_add(REDELIVERY_ALLOWANCE)
}

/// From which delivery on a task whose result cannot be reported is given up (dead-lettered):
/// its attempts plus `max_deliveries`, never more than the allowance past them.
pub fn gives_up_at(max_attempts: u32, max_deliveries: u32) -> u32 {
    max_attempts.saturating_add(max_deliveries.min(REDELIVERY_ALLOWANCE))
}

/// Exponential backoff from the policy, with ±20 % jitter derived from the task and attempt (so
/// the same attempt always waits alike), never above `max_backoff`.
pub fn backoff(retry: &RetryPolicy, attempt: u32, task_id: &str) -> Duration {
    let initial = retry
        .initial_backoff
        .as_ref()
        .and_then(std_duration)
        .unwrap_or(Duration::from_secs(1));
    let max = retry
        .max_backoff
        .as_ref()
        .and_then(std_duration)
        .unwrap_or(Duration::from_secs(60));
    let multiplier = if retry.multiplier >= 1.0 {
        retry.multiplier
    } else {
        2.0
    };
    // Grows until the cap, however slowly (an exponent cut short would stop it below the cap);
    // past f64's range the step is the cap (`min` takes it over infinity).
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = if initial.is_zero() {
        0.0
    } else {
        initial.as_secs_f64() * multiplier.powi(exponent)
    };
    let capped = base.min(max.as_secs_f64());
    let hash = task_id
        .bytes()
        .chain(attempt.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let jitter = 0.8 + 0.4 * ((hash % 10_000) as f64 / 10_000.0);
    Duration::from_secs_f64((capped * jitter).min(max.as_secs_f64()).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::effective_retry;
    use crate::status::task_is_terminal;
    use proptest::prelude::*;

    fn policy(max_attempts: u32, initial: i64, max: i64, multiplier: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Some(prost_types::Duration {
                seconds: initial,
                nanos: 0,
            }),
            max_backoff: Some(prost_types::Duration {
                seconds: max,
                nanos: 0,
            }),
            multiplier,
        }
    }

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter_and_a_cap() {
        let p = policy(5, 1, 10, 2.0);
        let first = backoff(&p, 1, "t").as_secs_f64();
        let third = backoff(&p, 3, "t").as_secs_f64();
        assert!((0.8..=1.2).contains(&first), "{first}");
        assert!((3.2..=4.8).contains(&third), "{third}");
        assert!(backoff(&p, 30, "t") <= Duration::from_secs(10));
        assert_eq!(backoff(&p, 2, "t"), backoff(&p, 2, "t"));
        assert!(backoff(&p, u32::MAX, "t") >= Duration::from_secs(8));
        assert_eq!(
            backoff(&policy(5, 0, 10, 100.0), 1_000, "t"),
            Duration::ZERO
        );
    }

    /// A multiplier close to 1 still reaches the cap: the step is not frozen after 64 attempts.
    #[test]
    fn a_slow_backoff_keeps_growing_past_64_attempts() {
        let p = policy(100, 1, 2, 1.008);
        // 1.008^96 ≈ 2.15, so attempt 97 is at the 2 s cap: at least 80 % of it.
        assert!(
            backoff(&p, 97, "-x") >= Duration::from_millis(1_600),
            "{:?}",
            backoff(&p, 97, "-x")
        );
    }

    #[test]
    fn each_end_has_its_status_and_disposition() {
        let p = policy(3, 1, 10, 2.0);
        let failed = |retryable| AttemptEnd::Failed {
            retryable,
            retry_after: None,
        };
        assert_eq!(
            verdict(AttemptEnd::Succeeded, 1, &p, "t"),
            Verdict {
                status: TaskStatus::Succeeded,
                disposition: Disposition::Ack
            }
        );
        assert_eq!(
            verdict(AttemptEnd::Cancelled, 3, &p, "t"),
            Verdict {
                status: TaskStatus::Cancelled,
                disposition: Disposition::Ack
            }
        );
        assert_eq!(
            verdict(failed(true), 2, &p, "t"),
            Verdict {
                status: TaskStatus::Failed,
                disposition: Disposition::RetryAfter(backoff(&p, 2, "t"))
            }
        );
        let dead = Verdict {
            status: TaskStatus::Dead,
            disposition: Disposition::DeadLetter,
        };
        assert_eq!(verdict(failed(true), 3, &p, "t"), dead, "out of attempts");
        assert_eq!(verdict(failed(false), 1, &p, "t"), dead, "not retryable");
    }

    #[test]
    fn a_longer_retry_after_wins_over_the_backoff() {
        let p = policy(3, 1, 10, 2.0);
        let end = |seconds| AttemptEnd::Failed {
            retryable: true,
            retry_after: Some(Duration::from_secs(seconds)),
        };
        assert_eq!(
            verdict(end(120), 1, &p, "t").disposition,
            Disposition::RetryAfter(Duration::from_secs(120))
        );
        assert_eq!(
            verdict(end(0), 1, &p, "t").disposition,
            Disposition::RetryAfter(backoff(&p, 1, "t"))
        );
    }

    #[test]
    fn deliveries_past_the_attempts_are_bounded_by_the_allowance() {
        assert!(may_run(3 + REDELIVERY_ALLOWANCE, 3));
        assert!(!may_run(4 + REDELIVERY_ALLOWANCE, 3));
        assert!(may_run(u32::MAX, u32::MAX));
        assert_eq!(gives_up_at(3, 5), 8);
        assert_eq!(gives_up_at(3, 1_000), 3 + REDELIVERY_ALLOWANCE);
        assert_eq!(gives_up_at(u32::MAX, 5), u32::MAX);
    }

    fn end() -> impl Strategy<Value = AttemptEnd> {
        prop_oneof![
            Just(AttemptEnd::Succeeded),
            Just(AttemptEnd::Cancelled),
            (any::<bool>(), proptest::option::of(0u64..7_200)).prop_map(|(retryable, after)| {
                AttemptEnd::Failed {
                    retryable,
                    retry_after: after.map(Duration::from_secs),
                }
            }),
        ]
    }

    fn retry_policy() -> impl Strategy<Value = RetryPolicy> {
        (0u32..=100, 0i64..100, 0i64..4_000, 0.0f64..10.0).prop_map(
            |(attempts, initial, max, multiplier)| {
                effective_retry(Some(&policy(attempts, initial, max, multiplier)))
            },
        )
    }

    proptest! {
        /// A status is terminal exactly when the message is not handed back; only a FAILED
        /// attempt is retried, and a DEAD one is always dead-lettered.
        #[test]
        fn status_and_disposition_agree(
            end in end(),
            series_attempt in 1u32..200,
            retry in retry_policy(),
            task in "[a-z0-9-]{0,12}",
        ) {
            let Verdict { status, disposition } = verdict(end, series_attempt, &retry, &task);
            prop_assert_eq!(task_is_terminal(status), !matches!(disposition, Disposition::RetryAfter(_)));
            match status {
                TaskStatus::Failed => prop_assert!(matches!(disposition, Disposition::RetryAfter(_))),
                TaskStatus::Dead => prop_assert_eq!(disposition, Disposition::DeadLetter),
                TaskStatus::Succeeded | TaskStatus::Cancelled => prop_assert_eq!(disposition, Disposition::Ack),
                other => prop_assert!(false, "an attempt never ends {:?}", other),
            }
            if let Disposition::RetryAfter(delay) = disposition {
                prop_assert!(series_attempt < retry.max_attempts, "retried at or past its last attempt");
                let AttemptEnd::Failed { retryable, retry_after } = end else {
                    return Err(TestCaseError::fail("only a failure is retried"));
                };
                prop_assert!(retryable);
                let max = retry.max_backoff.as_ref().and_then(std_duration).unwrap_or_default();
                prop_assert!(delay >= retry_after.unwrap_or_default());
                prop_assert!(delay <= max.max(retry_after.unwrap_or_default()));
            }
        }

        /// A task that fails retryably every time runs exactly its `maxAttempts` attempts and
        /// ends DEAD; one that fails for good ends DEAD at once.
        #[test]
        fn a_task_runs_at_most_its_attempts(retry in retry_policy(), retryable in any::<bool>()) {
            let end = AttemptEnd::Failed { retryable, retry_after: None };
            let mut attempts = 1;
            while let Disposition::RetryAfter(_) = verdict(end, attempts, &retry, "t").disposition {
                attempts += 1;
                prop_assert!(attempts <= retry.max_attempts);
            }
            prop_assert_eq!(attempts, if retryable { retry.max_attempts } else { 1 });
            prop_assert_eq!(verdict(end, attempts, &retry, "t").status, TaskStatus::Dead);
        }

        /// The same attempt of the same task always waits the same, within ±20 % of the
        /// exponential step and never past the cap.
        #[test]
        fn backoff_is_deterministic_jittered_and_capped(
            retry in retry_policy(),
            attempt in 1u32..200,
            task in "[a-z0-9-]{0,12}",
        ) {
            let delay = backoff(&retry, attempt, &task);
            prop_assert_eq!(delay, backoff(&retry, attempt, &task));
            let initial = retry.initial_backoff.as_ref().and_then(std_duration).unwrap().as_secs_f64();
            let max = retry.max_backoff.as_ref().and_then(std_duration).unwrap().as_secs_f64();
            let multiplier = if retry.multiplier >= 1.0 { retry.multiplier } else { 2.0 };
            let step = (initial * multiplier.powi(attempt as i32 - 1)).min(max);
            let d = delay.as_secs_f64();
            prop_assert!(d <= max + 1e-9);
            prop_assert!(d >= step * 0.8 - 1e-6, "{} below 80% of {}", d, step);
            prop_assert!(d <= step * 1.2 + 1e-6, "{} above 120% of {}", d, step);
        }
    }
}

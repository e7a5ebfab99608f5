//! Overlap policies: what a new run of an activity does while its other runs are unfinished, and
//! which waiting run starts once nothing runs ahead of it.
//!
//! The orchestrator reads an activity's unfinished runs under a lock on the activity, asks
//! [`admit`] or [`next_to_start`], and records the answer in the same transaction; these two
//! functions are the only statement of the rules.

use taskfactory_proto::v1::OverlapPolicy;

use crate::ids::RunId;

/// One unfinished run (`PENDING` or `RUNNING`) of the activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unfinished {
    pub id: RunId,
    /// Waiting behind another run (buffered), not started.
    pub waiting: bool,
}

/// What the policy decided about a new run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start it now, after cancelling these runs (`CANCEL_OTHER`; empty otherwise).
    Start { cancel: Vec<RunId> },
    /// Record it as waiting; it starts when nothing runs ahead of it ([`next_to_start`]).
    Buffered { behind: RunId },
    /// Record it as skipped, with the reason.
    Skipped { reason: String },
}

/// Applies `policy` to run `new_run` against the activity's unfinished runs, oldest first (the
/// order of their occurrence, or of their fire when they have none).
///
/// - `ALLOW_ALL` (and unspecified): start.
/// - `SKIP`: skipped while any run is unfinished.
/// - `BUFFER_ONE`: waits behind the running run; skipped when a run already waits.
/// - `BUFFER_ALL`: waits behind the newest unfinished run.
/// - `CANCEL_OTHER`: every unfinished run, running or waiting, is cancelled; then it starts.
pub fn admit(policy: OverlapPolicy, new_run: RunId, unfinished: &[Unfinished]) -> Admission {
    let running = unfinished.iter().find(|run| !run.waiting).map(|run| run.id);
    let waiting = unfinished.iter().find(|run| run.waiting).map(|run| run.id);
    let start = Admission::Start { cancel: Vec::new() };
    match policy {
        OverlapPolicy::Skip => match running.or(waiting) {
            Some(other) => Admission::Skipped {
                reason: format!("overlap SKIP: run {other} of this activity was still running"),
            },
            None => start,
        },
        OverlapPolicy::BufferOne => match (running, waiting) {
            (_, Some(buffered)) => Admission::Skipped {
                reason: format!(
                    "overlap BUFFER_ONE: run {buffered} is already waiting for the running run"
                ),
            },
            (Some(other), None) => Admission::Buffered { behind: other },
            (None, None) => start,
        },
        OverlapPolicy::BufferAll => match unfinished.last() {
            Some(other) => Admission::Buffered { behind: other.id },
            None => start,
        },
        OverlapPolicy::CancelOther => Admission::Start {
            cancel: unfinished
                .iter()
                .map(|run| run.id)
                .filter(|id| *id != new_run)
                .collect(),
        },
        OverlapPolicy::AllowAll | OverlapPolicy::OverlapUnspecified => start,
    }
}

/// The reason recorded on the runs a `CANCEL_OTHER` run cancelled.
pub fn cancelled_by(new_run: RunId) -> String {
    format!("cancelled by overlap CANCEL_OTHER: run {new_run} started")
}

/// The waiting run to start now, given the activity's unfinished runs oldest first: the oldest
/// waiting one, once none is running.
pub fn next_to_start(unfinished: &[Unfinished]) -> Option<RunId> {
    if unfinished.iter().any(|run| !run.waiting) {
        return None;
    }
    unfinished.first().map(|run| run.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ActivityId;
    use proptest::prelude::*;

    const POLICIES: [OverlapPolicy; 6] = [
        OverlapPolicy::OverlapUnspecified,
        OverlapPolicy::AllowAll,
        OverlapPolicy::Skip,
        OverlapPolicy::BufferOne,
        OverlapPolicy::BufferAll,
        OverlapPolicy::CancelOther,
    ];

    fn run(n: u32) -> RunId {
        RunId::derive(ActivityId(uuid::Uuid::nil()), &n.to_string())
    }

    fn running(n: u32) -> Unfinished {
        Unfinished {
            id: run(n),
            waiting: false,
        }
    }

    fn waiting(n: u32) -> Unfinished {
        Unfinished {
            id: run(n),
            waiting: true,
        }
    }

    #[test]
    fn with_nothing_unfinished_every_policy_starts() {
        for policy in POLICIES {
            assert_eq!(
                admit(policy, run(9), &[]),
                Admission::Start { cancel: vec![] },
                "{policy:?}"
            );
        }
    }

    #[test]
    fn each_policy_against_a_running_and_a_waiting_run() {
        let one = [running(1)];
        let two = [running(1), waiting(2)];
        assert_eq!(
            admit(OverlapPolicy::AllowAll, run(9), &two),
            Admission::Start { cancel: vec![] }
        );
        assert_eq!(
            admit(OverlapPolicy::Skip, run(9), &one),
            Admission::Skipped {
                reason: format!(
                    "overlap SKIP: run {} of this activity was still running",
                    run(1)
                )
            }
        );
        assert_eq!(
            admit(OverlapPolicy::BufferOne, run(9), &one),
            Admission::Buffered { behind: run(1) }
        );
        assert_eq!(
            admit(OverlapPolicy::BufferOne, run(9), &two),
            Admission::Skipped {
                reason: format!(
                    "overlap BUFFER_ONE: run {} is already waiting for the running run",
                    run(2)
                )
            }
        );
        assert_eq!(
            admit(OverlapPolicy::BufferAll, run(9), &two),
            Admission::Buffered { behind: run(2) }
        );
        assert_eq!(
            admit(OverlapPolicy::CancelOther, run(9), &two),
            Admission::Start {
                cancel: vec![run(1), run(2)]
            }
        );
    }

    #[test]
    fn a_waiting_run_starts_only_once_nothing_runs() {
        assert_eq!(next_to_start(&[running(1), waiting(2)]), None);
        assert_eq!(next_to_start(&[waiting(2), waiting(3)]), Some(run(2)));
        assert_eq!(next_to_start(&[]), None);
    }

    /// One step of an activity's life: a fire under a policy, or the end of a started run.
    #[derive(Clone, Debug)]
    enum Step {
        Fire(OverlapPolicy),
        /// Ends the started run at this index (modulo how many run).
        End(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..POLICIES.len()).prop_map(|i| Step::Fire(POLICIES[i])),
            any::<usize>().prop_map(Step::End),
        ]
    }

    /// The orchestrator's side, simulated: admissions recorded as decided, and after every end
    /// the next waiting run started (`promote_next`) until none may.
    #[derive(Default)]
    struct Activity {
        unfinished: Vec<Unfinished>,
        next: u32,
        started: Vec<RunId>,
        skipped: Vec<RunId>,
        cancelled: Vec<RunId>,
        ended: Vec<RunId>,
        buffered_in_order: Vec<RunId>,
    }

    impl Activity {
        fn promote(&mut self) {
            while let Some(next) = next_to_start(&self.unfinished) {
                let at = self.unfinished.iter().position(|r| r.id == next).unwrap();
                assert!(
                    self.unfinished[at].waiting,
                    "only a waiting run is promoted"
                );
                self.unfinished[at].waiting = false;
                self.started.push(next);
            }
        }

        fn apply(&mut self, step: &Step) -> Result<(), TestCaseError> {
            match step {
                Step::Fire(policy) => {
                    self.next += 1;
                    let id = run(self.next);
                    let before = self.unfinished.clone();
                    match admit(*policy, id, &self.unfinished) {
                        Admission::Start { cancel } => {
                            if *policy == OverlapPolicy::CancelOther {
                                prop_assert_eq!(
                                    &cancel,
                                    &before.iter().map(|r| r.id).collect::<Vec<_>>()
                                );
                            } else {
                                prop_assert!(cancel.is_empty());
                            }
                            if !matches!(
                                policy,
                                OverlapPolicy::AllowAll | OverlapPolicy::OverlapUnspecified
                            ) {
                                // It runs alone: whatever was unfinished is cancelled or none was.
                                prop_assert_eq!(cancel.len(), before.len());
                            }
                            self.unfinished.retain(|r| !cancel.contains(&r.id));
                            self.cancelled.extend(cancel);
                            self.unfinished.push(Unfinished { id, waiting: false });
                            self.started.push(id);
                        }
                        Admission::Buffered { behind } => {
                            prop_assert!(matches!(
                                policy,
                                OverlapPolicy::BufferOne | OverlapPolicy::BufferAll
                            ));
                            prop_assert!(before.iter().any(|r| r.id == behind));
                            if *policy == OverlapPolicy::BufferOne {
                                prop_assert!(before.iter().all(|r| !r.waiting));
                            } else {
                                prop_assert_eq!(Some(behind), before.last().map(|r| r.id));
                            }
                            self.unfinished.push(Unfinished { id, waiting: true });
                            self.buffered_in_order.push(id);
                        }
                        Admission::Skipped { reason } => {
                            prop_assert!(matches!(
                                policy,
                                OverlapPolicy::Skip | OverlapPolicy::BufferOne
                            ));
                            prop_assert!(!before.is_empty());
                            prop_assert!(reason.contains(policy.as_str_name()));
                            self.skipped.push(id);
                        }
                    }
                }
                Step::End(pick) => {
                    let started: Vec<usize> = (0..self.unfinished.len())
                        .filter(|&i| !self.unfinished[i].waiting)
                        .collect();
                    if let Some(&at) = started.get(pick % started.len().max(1)) {
                        self.ended.push(self.unfinished.remove(at).id);
                    }
                }
            }
            self.promote();
            Ok(())
        }
    }

    proptest! {
        /// Over any sequence of fires (under any mix of policies, as per-fire overrides allow)
        /// and ends: no run is lost, none starts twice, a run never waits with nothing ahead of
        /// it, buffered runs start in the order they were admitted, and a run admitted under a
        /// policy other than ALLOW_ALL never starts beside another.
        #[test]
        fn overlap_keeps_its_promises(steps in proptest::collection::vec(step(), 0..60)) {
            let mut activity = Activity::default();
            for step in &steps {
                activity.apply(step)?;
                let any_running = activity.unfinished.iter().any(|r| !r.waiting);
                let any_waiting = activity.unfinished.iter().any(|r| r.waiting);
                prop_assert!(!any_waiting || any_running, "a run waits with nothing ahead of it");
            }
            // Drain: end every started run until nothing is unfinished.
            while !activity.unfinished.is_empty() {
                activity.apply(&Step::End(0))?;
            }
            let fired = activity.next as usize;
            let mut started = activity.started.clone();
            started.sort();
            started.dedup();
            prop_assert_eq!(started.len(), activity.started.len(), "a run started twice");
            let cancelled_waiting = activity
                .cancelled
                .iter()
                .filter(|id| !activity.started.contains(id))
                .count();
            prop_assert_eq!(
                activity.started.len() + activity.skipped.len() + cancelled_waiting,
                fired,
                "every fired run started, was skipped, or was cancelled while it waited"
            );
            prop_assert_eq!(
                activity.ended.len() + activity.cancelled.len() - cancelled_waiting,
                activity.started.len(),
                "every started run ended or was cancelled"
            );
            // Buffered runs started in admission order (unless cancelled while waiting).
            let promoted: Vec<RunId> = activity
                .started
                .iter()
                .copied()
                .filter(|id| activity.buffered_in_order.contains(id))
                .collect();
            let expected: Vec<RunId> = activity
                .buffered_in_order
                .iter()
                .copied()
                .filter(|id| promoted.contains(id))
                .collect();
            prop_assert_eq!(promoted, expected);
        }

        /// A run admitted under SKIP, BUFFER_ONE, BUFFER_ALL or CANCEL_OTHER starts only when
        /// nothing else of the activity is unfinished once its cancellations are done.
        #[test]
        fn an_exclusive_run_starts_alone(
            states in proptest::collection::vec(any::<bool>(), 0..8),
            p in 2..POLICIES.len(),
        ) {
            let unfinished: Vec<Unfinished> = states
                .iter()
                .enumerate()
                .map(|(i, &w)| Unfinished { id: run(i as u32), waiting: w })
                .collect();
            if let Admission::Start { cancel } = admit(POLICIES[p], run(100), &unfinished) {
                prop_assert_eq!(cancel.len(), unfinished.len());
            }
        }
    }
}

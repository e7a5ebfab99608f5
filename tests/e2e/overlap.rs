//! Overlap policies with runs that take longer than the interval, backfills, and schedule
//! previews.

use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_model::spec::{chrono_to_timestamp, spec_from_yaml, timestamp_to_chrono};
use taskfactory_proto::v1::{
    BackfillRequest, ListOccurrencesRequest, ListScheduleTimesRequest, OccurrenceDecision,
    OverlapPolicy, PauseActivityRequest, Run, RunStatus, TriggerActivityRequest, TriggerSource,
    trigger,
};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::support::{Admin, Call, RecordingServer, create, runs};

/// How long each run's one task takes.
const TASK_TIME: Duration = Duration::from_millis(2000);

fn slow_manual(url: &str) -> String {
    format!(
        r#"
name: slow
trigger:
  manual: {{}}
tasks:
  - name: work
    type: http
    params:
      url: "{url}"
      body: {{n: "{{{{ event.n }}}}"}}
"#
    )
}

fn slow_every_second(url: &str, overlap: &str) -> String {
    format!(
        r#"
name: slow-schedule
trigger:
  schedule:
    cron: ["* * * * * *"]
    timezone: UTC
    overlap: {overlap}
tasks:
  - name: work
    type: http
    params:
      url: "{url}"
      body: {{at: "{{{{ trigger.scheduled_for }}}}"}}
"#
    )
}

fn is_finished(run: &Run) -> bool {
    matches!(
        run.status(),
        RunStatus::RunSucceeded
            | RunStatus::RunFailed
            | RunStatus::RunSkipped
            | RunStatus::RunCancelled
    )
}

/// Waits until `count` runs of the activity exist and all are finished; returns them in the
/// order they were fired.
async fn all_finished(admin: &Admin, activity: &str, count: usize) -> anyhow::Result<Vec<Run>> {
    wait_for(
        &format!("{count} finished runs of {activity}"),
        Duration::from_secs(60),
        || {
            let mut admin = admin.clone();
            let activity = activity.to_owned();
            async move {
                let mut all = runs(&mut admin, &activity).await?;
                if all.len() < count || !all.iter().all(is_finished) {
                    return Ok(None);
                }
                all.sort_by_key(|r| {
                    let t = r.scheduled_for.as_ref().or(r.fired_at.as_ref()).unwrap();
                    (t.seconds, t.nanos)
                });
                Ok(Some(all))
            }
        },
    )
    .await
}

/// The calls sorted by when they started; asserts no two overlapped.
fn one_at_a_time(calls: &[Call]) -> Vec<Call> {
    let mut calls = calls.to_vec();
    calls.sort_by_key(|c| c.started);
    for pair in calls.windows(2) {
        assert!(
            pair[1].started >= pair[0].finished,
            "runs overlapped: {:?} started before {:?} finished",
            pair[1].body,
            pair[0].body
        );
    }
    calls
}

/// Four manual fires 300 ms apart, each run taking 2 s, under the given override.
async fn four_quick_fires(policy: OverlapPolicy) -> anyhow::Result<(Vec<Run>, Vec<Call>)> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let server = RecordingServer::start(TASK_TIME).await?;
    let mut admin = env.admin().await?;
    create(&mut admin, &slow_manual(&server.url)).await?;
    for n in 1..=4 {
        admin
            .trigger_activity(TriggerActivityRequest {
                id: "slow".to_owned(),
                payload: Some(taskfactory_model::values::json_to_value(
                    &serde_json::json!({ "n": n }),
                )),
                idempotency_key: format!("fire-{n}"),
                overlap: policy as i32,
            })
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let runs = all_finished(&admin, "slow", 4).await?;
    // Let any straggling task of a cancelled run report, then take the calls.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((runs, server.timed_calls()))
}

fn statuses(runs: &[Run]) -> Vec<RunStatus> {
    runs.iter().map(Run::status).collect()
}

fn numbers(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| c.body["n"].to_string().trim_matches('"').to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_allow_all_runs_everything_at_once() -> anyhow::Result<()> {
    let (runs, calls) = four_quick_fires(OverlapPolicy::AllowAll).await?;
    assert_eq!(statuses(&runs), [RunStatus::RunSucceeded; 4]);
    assert_eq!(calls.len(), 4);
    let mut calls = calls;
    calls.sort_by_key(|c| c.started);
    assert!(
        calls[1].started < calls[0].finished,
        "runs overlapped freely"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_skip_drops_fires_while_a_run_is_running() -> anyhow::Result<()> {
    let (runs, calls) = four_quick_fires(OverlapPolicy::Skip).await?;
    assert_eq!(
        statuses(&runs),
        [
            RunStatus::RunSucceeded,
            RunStatus::RunSkipped,
            RunStatus::RunSkipped,
            RunStatus::RunSkipped
        ]
    );
    for skipped in &runs[1..] {
        assert!(
            skipped.error.contains("overlap SKIP") && skipped.error.contains(&runs[0].id),
            "the reason names the running run: {}",
            skipped.error
        );
        assert_eq!(skipped.tasks_spawned, 0);
    }
    assert_eq!(numbers(&calls), ["1"]);
    // Counted (each test is its own process, so the counter is this test's).
    let page = taskfactory_runtime::metrics::handle().render();
    assert!(
        page.contains(
            "taskfactory_schedule_occurrences_total{activity=\"slow\",decision=\"SKIPPED_OVERLAP\"} 3"
        ),
        "{page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_buffer_one_keeps_one_waiting_run() -> anyhow::Result<()> {
    let (runs, calls) = four_quick_fires(OverlapPolicy::BufferOne).await?;
    assert_eq!(
        statuses(&runs),
        [
            RunStatus::RunSucceeded,
            RunStatus::RunSucceeded,
            RunStatus::RunSkipped,
            RunStatus::RunSkipped
        ]
    );
    assert!(runs[2].error.contains("BUFFER_ONE"), "{}", runs[2].error);
    let calls = one_at_a_time(&calls);
    assert_eq!(numbers(&calls), ["1", "2"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_buffer_all_runs_every_fire_in_order_one_at_a_time() -> anyhow::Result<()> {
    let (runs, calls) = four_quick_fires(OverlapPolicy::BufferAll).await?;
    assert_eq!(statuses(&runs), [RunStatus::RunSucceeded; 4]);
    let calls = one_at_a_time(&calls);
    assert_eq!(numbers(&calls), ["1", "2", "3", "4"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_cancel_other_cancels_the_running_run_for_the_new_one() -> anyhow::Result<()> {
    let (runs, _calls) = four_quick_fires(OverlapPolicy::CancelOther).await?;
    assert_eq!(
        statuses(&runs),
        [
            RunStatus::RunCancelled,
            RunStatus::RunCancelled,
            RunStatus::RunCancelled,
            RunStatus::RunSucceeded
        ]
    );
    for (cancelled, by) in runs.iter().zip(&runs[1..]) {
        assert!(
            cancelled.error.contains("CANCEL_OTHER") && cancelled.error.contains(&by.id),
            "the reason names the run that replaced it: {}",
            cancelled.error
        );
        assert!(cancelled.finished_at.is_some());
    }
    Ok(())
}

fn at(ts: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    timestamp_to_chrono(ts.as_ref().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_every_second_schedule_under_skip_and_buffer_all() -> anyhow::Result<()> {
    for policy in ["SKIP", "BUFFER_ALL"] {
        let env = TestEnv::new(EnvOptions::default()).await?;
        let _services = env.start_all().await?;
        let server = RecordingServer::start(Duration::from_millis(2500)).await?;
        let mut admin = env.admin().await?;
        create(&mut admin, &slow_every_second(&server.url, policy)).await?;
        // Let it fire about six times, then pause it.
        wait_for("six fires", Duration::from_secs(30), || {
            let mut admin = admin.clone();
            async move { Ok((runs(&mut admin, "slow-schedule").await?.len() >= 6).then_some(())) }
        })
        .await?;
        admin
            .pause_activity(PauseActivityRequest {
                id: "slow-schedule".to_owned(),
                note: "test over".to_owned(),
            })
            .await?;
        // A fire already on its way becomes a run too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let fired = runs(&mut admin, "slow-schedule").await?;
        if policy == "BUFFER_ALL" {
            // Runs wait while an earlier one runs, and the ledger says so.
            let ledger = admin
                .list_occurrences(ListOccurrencesRequest {
                    id: "slow-schedule".to_owned(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .occurrences;
            assert!(
                ledger
                    .iter()
                    .any(|o| o.decision() == OccurrenceDecision::Buffered),
                "some occurrence is buffered: {ledger:?}"
            );
        }
        let finished = all_finished(&admin, "slow-schedule", fired.len()).await?;
        let calls = one_at_a_time(&server.timed_calls());
        let succeeded: Vec<&Run> = finished
            .iter()
            .filter(|r| r.status() == RunStatus::RunSucceeded)
            .collect();
        assert_eq!(calls.len(), succeeded.len(), "{policy}: one call per run");
        let ledger = admin
            .list_occurrences(ListOccurrencesRequest {
                id: "slow-schedule".to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .occurrences;
        match policy {
            "SKIP" => {
                let skipped = finished
                    .iter()
                    .filter(|r| r.status() == RunStatus::RunSkipped)
                    .count();
                assert!(skipped >= 2, "SKIP: runs were skipped ({skipped})");
                assert_eq!(skipped + succeeded.len(), finished.len());
                let overlap_skips = ledger
                    .iter()
                    .filter(|o| o.decision() == OccurrenceDecision::SkippedOverlap)
                    .count();
                assert_eq!(overlap_skips, skipped, "the ledger explains each skip");
            }
            _ => {
                assert_eq!(
                    succeeded.len(),
                    finished.len(),
                    "BUFFER_ALL: every fire ran"
                );
                // In the order they were scheduled.
                let order: Vec<String> = calls
                    .iter()
                    .map(|c| c.body["at"].as_str().unwrap_or_default().to_owned())
                    .collect();
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(order, sorted, "BUFFER_ALL runs in scheduled order");
                assert!(
                    ledger
                        .iter()
                        .all(|o| o.decision() == OccurrenceDecision::Fired)
                );
            }
        }
        // Every second from the first fire to the last has exactly one decision.
        let times: Vec<DateTime<Utc>> = ledger.iter().map(|o| at(&o.scheduled_for)).collect();
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], chrono::Duration::seconds(1), "{policy}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_fires_every_time_in_the_range_once() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        r#"
name: hourly
trigger:
  schedule:
    cron: ["0 * * * *"]
    timezone: Europe/Dublin
    excludeDates: ["2026-11-01"]
tasks:
  - name: note
    type: log
    params: {at: "{{ trigger.scheduled_for }}"}
"#,
    )
    .await?;
    // Paused: only backfills fire it during the test.
    admin
        .pause_activity(PauseActivityRequest {
            id: "hourly".to_owned(),
            note: String::new(),
        })
        .await?;
    let hour = |h: u32| -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-02T{h:02}:00:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    };
    let backfill = |start: DateTime<Utc>, end: DateTime<Utc>| BackfillRequest {
        id: "hourly".to_owned(),
        start: Some(chrono_to_timestamp(start)),
        end: Some(chrono_to_timestamp(end)),
        overlap: 0,
    };
    // 05:00 through 09:00 inclusive: five fire times.
    let first = admin
        .backfill(backfill(hour(5), hour(9)))
        .await?
        .into_inner();
    assert_eq!((first.fires, first.duplicates), (5, 0));
    let again = admin
        .backfill(backfill(hour(5), hour(9)))
        .await?
        .into_inner();
    assert_eq!(
        (again.fires, again.duplicates),
        (0, 5),
        "the same backfill creates nothing"
    );
    let wider = admin
        .backfill(backfill(hour(3), hour(7) + chrono::Duration::minutes(30)))
        .await?
        .into_inner();
    assert_eq!((wider.fires, wider.duplicates), (2, 3));
    // An excluded date is not backfilled.
    let excluded = admin
        .backfill(backfill(
            hour(0) - chrono::Duration::hours(3),
            hour(0) - chrono::Duration::minutes(1),
        ))
        .await?
        .into_inner();
    assert_eq!((excluded.fires, excluded.duplicates), (0, 0));

    let done = wait_for("7 runs", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let all = runs(&mut admin, "hourly").await?;
            Ok((all.len() == 7 && all.iter().all(is_finished)).then_some(all))
        }
    })
    .await?;
    let mut times: Vec<DateTime<Utc>> = done.iter().map(|r| at(&r.scheduled_for)).collect();
    times.sort();
    assert_eq!(times, (3..=9).map(hour).collect::<Vec<_>>());
    assert!(done.iter().all(|r| r.source() == TriggerSource::Backfill));
    let ledger = admin
        .list_occurrences(ListOccurrencesRequest {
            id: "hourly".to_owned(),
            start: Some(chrono_to_timestamp(hour(0))),
            end: Some(chrono_to_timestamp(hour(12))),
        })
        .await?
        .into_inner()
        .occurrences;
    assert_eq!(ledger.len(), 7);
    assert!(ledger.iter().all(|o| o.reason.contains("backfill")));

    // Mistakes are named.
    let future = Utc::now() + chrono::Duration::hours(2);
    let status = admin.backfill(backfill(hour(5), future)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("end:"), "{}", status.message());
    let status = admin
        .backfill(backfill(hour(9), hour(5)))
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("start:"),
        "{}",
        status.message()
    );
    create(
        &mut admin,
        "name: by-hand\ntrigger: {manual: {}}\ntasks: [{name: a, type: log}]\n",
    )
    .await?;
    let status = admin
        .backfill(BackfillRequest {
            id: "by-hand".to_owned(),
            ..backfill(hour(5), hour(9))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedule_times_preview_dst_exclusions_and_jitter() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let after = |s: &str| {
        Some(chrono_to_timestamp(
            DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc),
        ))
    };

    // An ad-hoc schedule across New York's spring-forward night.
    let spec = spec_from_yaml(
        "name: x\ntrigger: {schedule: {cron: ['30 2 * * *'], timezone: America/New_York}}\ntasks: [{name: a, type: log}]\n",
    )?;
    let Some(trigger::Kind::Schedule(schedule)) = spec.trigger.and_then(|t| t.kind) else {
        unreachable!()
    };
    let times = admin
        .list_schedule_times(ListScheduleTimesRequest {
            schedule: Some(schedule.clone()),
            after: after("2026-03-07T12:00:00Z"),
            count: 2,
            ..Default::default()
        })
        .await?
        .into_inner()
        .times;
    let shown: Vec<(&str, bool)> = times
        .iter()
        .map(|t| (t.local_time.as_str(), t.note.contains("does not exist")))
        .collect();
    assert_eq!(
        shown,
        [
            ("2026-03-08 03:00:00 EDT", true),
            ("2026-03-09 02:30:00 EDT", false)
        ]
    );

    // A stored activity: exclusions and jitter are shown.
    create(
        &mut admin,
        r#"
name: nightly
trigger:
  schedule:
    cron: ["0 3 * * *"]
    timezone: Europe/London
    jitter: 10m
    excludeDates: ["2027-01-02"]
tasks:
  - name: a
    type: log
"#,
    )
    .await?;
    let times = admin
        .list_schedule_times(ListScheduleTimesRequest {
            id: "nightly".to_owned(),
            after: after("2027-01-01T00:00:00Z"),
            count: 3,
            ..Default::default()
        })
        .await?
        .into_inner()
        .times;
    assert_eq!(times.len(), 3);
    assert!(
        times[0].note.starts_with("jitter: fires "),
        "{}",
        times[0].note
    );
    assert!(
        times[1]
            .note
            .contains("does not fire: 2027-01-02 is in excludeDates"),
        "{}",
        times[1].note
    );
    assert_eq!(times[2].local_time, "2027-01-03 03:00:00 GMT");

    // Mistakes are named.
    let bad = taskfactory_proto::v1::ScheduleTrigger {
        cron: vec!["61 * * * *".to_owned()],
        timezone: "UTC".to_owned(),
        ..Default::default()
    };
    let status = admin
        .list_schedule_times(ListScheduleTimesRequest {
            schedule: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("schedule.cron[0]"),
        "{}",
        status.message()
    );
    let status = admin
        .list_schedule_times(ListScheduleTimesRequest::default())
        .await
        .unwrap_err();
    assert!(status.message().starts_with("id:"), "{}", status.message());
    let status = admin
        .list_schedule_times(ListScheduleTimesRequest {
            schedule: Some(schedule),
            count: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("count:"),
        "{}",
        status.message()
    );
    Ok(())
}

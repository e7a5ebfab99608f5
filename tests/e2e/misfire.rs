//! Schedules under a driven clock: downtime under each misfire policy, pause and resume, and the
//! decision ledger that explains every occurrence.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::{chrono_to_timestamp, timestamp_to_chrono};
use taskfactory_proto::v1::{
    DeleteActivityRequest, ListOccurrencesRequest, Occurrence, OccurrenceDecision,
    PauseActivityRequest, ResumeActivityRequest,
};
use taskfactory_runtime::clock::{Clock as _, ClockHandle, ManualClock};
use taskfactory_tests::{EnvOptions, Running, Service, TestEnv, wait_for};

use crate::support::{Admin, create, runs};

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A fresh environment whose trigger runs on a clock the test drives, starting at `start`.
async fn driven(start: &str) -> anyhow::Result<(ManualClock, TestEnv, sqlx::PgPool)> {
    let clock = ManualClock::new(utc(start));
    let env = TestEnv::new(EnvOptions {
        clock: ClockHandle::manual(&clock),
        ..EnvOptions::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    Ok((clock, env, pool))
}

/// [`driven`], with the trigger started and its admin API ready.
async fn driven_trigger(
    start: &str,
) -> anyhow::Result<(ManualClock, TestEnv, sqlx::PgPool, Running, Admin)> {
    let (clock, env, pool) = driven(start).await?;
    let trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let admin = env.admin().await?;
    Ok((clock, env, pool, trigger, admin))
}

fn minutely(name: &str, misfire: &str) -> String {
    format!(
        r#"
name: {name}
trigger:
  schedule:
    cron: ["* * * * *"]
    timezone: UTC
    misfire: {misfire}
    catchupWindow: 4h
    maxCatchup: 100
tasks:
  - name: note
    type: log
    params: {{at: "{{{{ trigger.scheduled_for }}}}"}}
"#
    )
}

/// The start of the minute after `t`.
fn next_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_second(0).unwrap().with_nanosecond(0).unwrap() + chrono::Duration::minutes(1)
}

/// The start of the minute `t` is in.
fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_second(0).unwrap().with_nanosecond(0).unwrap()
}

async fn watermark(pool: &sqlx::PgPool, activity: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let id = uuid::Uuid::parse_str(activity)?;
    let row: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT watermark FROM schedule_state WHERE activity_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(w,)| w))
}

/// Waits until the schedule has recorded its start (its watermark): from then on it decides
/// from "now".
async fn started(pool: &sqlx::PgPool, activity: &str) -> anyhow::Result<()> {
    wait_for("the schedule to start", Duration::from_secs(30), || async {
        watermark(pool, activity).await
    })
    .await
    .map(|_| ())
}

/// Creates the activity and waits until its schedule has started ([`started`]).
async fn create_started(
    admin: &mut Admin,
    pool: &sqlx::PgPool,
    yaml: &str,
) -> anyhow::Result<taskfactory_proto::v1::Activity> {
    let activity = create(admin, yaml).await?;
    started(pool, &activity.id).await?;
    Ok(activity)
}

/// Waits until the schedule has decided everything up to `at`.
async fn decided_through(
    pool: &sqlx::PgPool,
    activity: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    wait_for(
        &format!("the schedule to decide through {at}"),
        Duration::from_secs(30),
        || async { Ok(watermark(pool, activity).await?.filter(|w| *w >= at)) },
    )
    .await
    .map(|_| ())
}

async fn occurrences(
    admin: &mut Admin,
    activity: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<Occurrence>> {
    Ok(admin
        .list_occurrences(ListOccurrencesRequest {
            id: activity.to_owned(),
            start: Some(chrono_to_timestamp(start)),
            end: Some(chrono_to_timestamp(end)),
        })
        .await?
        .into_inner()
        .occurrences)
}

fn at(o: &Occurrence) -> DateTime<Utc> {
    timestamp_to_chrono(o.scheduled_for.as_ref().unwrap()).unwrap()
}

fn by_decision(list: &[Occurrence]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for o in list {
        *counts
            .entry(o.decision().as_str_name().to_owned())
            .or_default() += 1;
    }
    counts
}

/// What one downtime should produce: occurrences fired by the catch-up, and how many of the rest
/// got which decision.
struct Expected {
    downtime: chrono::Duration,
    fired: usize,
    others: &'static [(&'static str, usize)],
}

/// For each downtime: three on-time fires, the trigger service stops, the clock jumps, it starts
/// again, and then the schedule carries on. Checks every occurrence's decision from the ledger,
/// and the runs.
async fn downtime_under(misfire: &str, cases: &[Expected]) -> anyhow::Result<()> {
    let (clock, env, pool) = driven("2026-01-05T10:00:30Z").await?;
    let _orchestrator = env.start(Service::Orchestrator);

    for (i, case) in cases.iter().enumerate() {
        let name = format!("minutely-{}-{i}", misfire.to_lowercase().replace('_', "-"));
        let trigger = env.start(Service::Trigger);
        env.wait_ready(&[Service::Trigger]).await?;
        let mut admin = env.admin().await?;
        // The schedule starts from "now" once it has recorded its start.
        let activity = create_started(&mut admin, &pool, &minutely(&name, misfire)).await?;

        let created = clock.now();
        let mut on_time = Vec::new();
        for _ in 0..3 {
            let minute = next_minute(clock.now());
            clock.set(minute);
            decided_through(&pool, &activity.id, minute).await?;
            on_time.push(minute);
        }
        clock.set(on_time[2] + chrono::Duration::seconds(50));
        trigger.stop().await?;

        clock.advance(case.downtime);
        let restarted = clock.now();
        let trigger = env.start(Service::Trigger);
        env.wait_ready(&[Service::Trigger]).await?;
        let mut admin = env.admin().await?;
        let newest_missed = minute_of(restarted);
        decided_through(&pool, &activity.id, newest_missed).await?;
        // And on time again afterwards.
        let after = next_minute(restarted);
        clock.set(after);
        decided_through(&pool, &activity.id, after).await?;

        let ledger = occurrences(&mut admin, &name, created, after).await?;
        let label = format!("{misfire} after {}", case.downtime);
        // Every minute from the first on-time fire to `after` has exactly one decision.
        let minutes: Vec<DateTime<Utc>> = ledger.iter().map(at).collect();
        let expected_minutes: Vec<DateTime<Utc>> = (0..)
            .map(|k| on_time[0] + chrono::Duration::minutes(k))
            .take_while(|m| *m <= after)
            .collect();
        assert_eq!(
            minutes, expected_minutes,
            "{label}: one decision per occurrence"
        );

        let missed: Vec<&Occurrence> = ledger
            .iter()
            .filter(|o| at(o) > on_time[2] && at(o) <= newest_missed)
            .collect();
        let fired: Vec<&&Occurrence> = missed
            .iter()
            .filter(|o| o.decision() == OccurrenceDecision::Fired)
            .collect();
        assert_eq!(fired.len(), case.fired, "{label}: caught-up fires");
        // The catch-up fires are the newest missed times, in a row.
        for (k, o) in fired.iter().rev().enumerate() {
            assert_eq!(
                at(o),
                newest_missed - chrono::Duration::minutes(k as i64),
                "{label}: the newest are caught up"
            );
            assert!(o.reason.contains("caught up"), "{label}: {}", o.reason);
        }
        let others: Vec<Occurrence> = missed
            .iter()
            .filter(|o| o.decision() != OccurrenceDecision::Fired)
            .map(|o| (*o).clone())
            .collect();
        let expected_others: BTreeMap<String, usize> = case
            .others
            .iter()
            .map(|(d, n)| ((*d).to_owned(), *n))
            .collect();
        assert_eq!(by_decision(&others), expected_others, "{label}: the rest");
        for o in &others {
            assert!(
                o.reason.contains("not running"),
                "{label}: the reason says why: {}",
                o.reason
            );
            if o.decision() == OccurrenceDecision::Coalesced {
                let into = fired.last().expect("coalesced into the newest fire");
                assert_eq!(o.run_id, into.run_id, "{label}: coalesced into which run");
            }
        }
        // Before and after the downtime: on time.
        for o in ledger
            .iter()
            .filter(|o| at(o) <= on_time[2] || at(o) == after)
        {
            assert_eq!(o.decision(), OccurrenceDecision::Fired, "{label}");
            assert!(o.reason.contains("on time"), "{label}: {}", o.reason);
        }

        // Each fire made one run.
        let expected_runs = 3 + case.fired + 1;
        let activity_id = activity.id.clone();
        wait_for(
            &format!("{expected_runs} runs"),
            Duration::from_secs(30),
            || {
                let mut admin = admin.clone();
                let activity_id = activity_id.clone();
                let label = label.clone();
                async move {
                    let n = runs(&mut admin, &activity_id).await?.len();
                    anyhow::ensure!(n <= expected_runs, "{label}: {n} runs, more than expected");
                    Ok((n == expected_runs).then_some(()))
                }
            },
        )
        .await?;
        admin
            .delete_activity(DeleteActivityRequest { id: name.clone() })
            .await?;
        trigger.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downtime_with_misfire_skip_fires_nothing_missed() -> anyhow::Result<()> {
    downtime_under(
        "MISFIRE_SKIP",
        &[
            Expected {
                downtime: chrono::Duration::seconds(30),
                fired: 0,
                others: &[("MISSED_CATCHUP_WINDOW", 1)],
            },
            Expected {
                downtime: chrono::Duration::minutes(10),
                fired: 0,
                others: &[("MISSED_CATCHUP_WINDOW", 10)],
            },
            Expected {
                downtime: chrono::Duration::hours(3),
                fired: 0,
                others: &[("MISSED_CATCHUP_WINDOW", 180)],
            },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downtime_with_misfire_latest_fires_the_newest_once() -> anyhow::Result<()> {
    downtime_under(
        "MISFIRE_LATEST",
        &[
            Expected {
                downtime: chrono::Duration::seconds(30),
                fired: 1,
                others: &[],
            },
            Expected {
                downtime: chrono::Duration::minutes(10),
                fired: 1,
                others: &[("COALESCED", 9)],
            },
            Expected {
                downtime: chrono::Duration::hours(3),
                fired: 1,
                others: &[("COALESCED", 179)],
            },
        ],
    )
    .await
}

/// This test process's own metrics, served on a free port (each test runs in its own process,
/// so the counters are the test's alone); cancel the token to stop serving.
fn serve_metrics() -> anyhow::Result<(std::net::SocketAddr, tokio_util::sync::CancellationToken)> {
    let addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", taskfactory_tests::free_port()).parse()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(taskfactory_runtime::metrics::serve(
        addr,
        taskfactory_runtime::metrics::Routes {
            metrics: true,
            probes: None,
        },
        stop.clone(),
    ));
    Ok((addr, stop))
}

/// The metrics page, once the endpoint answers, and its samples.
async fn metrics_page(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(String, crate::support::Scrape)> {
    let page = wait_for("the metrics endpoint", Duration::from_secs(10), || async {
        Ok(crate::support::http_get(addr, "/metrics")
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, page)| page))
    })
    .await?;
    let scrape = crate::support::Scrape::parse(&page)?;
    Ok((page, scrape))
}

/// Occurrences decided `decision`, over every activity.
fn decided(page: &crate::support::Scrape, decision: &str) -> f64 {
    page.matching(
        taskfactory_runtime::metrics::OCCURRENCES,
        &[("decision", decision)],
    )
    .iter()
    .map(|sample| sample.value)
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downtime_with_misfire_all_catches_up_at_most_max_catchup() -> anyhow::Result<()> {
    let (addr, stop) = serve_metrics()?;
    downtime_under(
        "MISFIRE_ALL",
        &[
            Expected {
                downtime: chrono::Duration::seconds(30),
                fired: 1,
                others: &[],
            },
            Expected {
                downtime: chrono::Duration::minutes(10),
                fired: 10,
                others: &[],
            },
            Expected {
                downtime: chrono::Duration::hours(3),
                fired: 100,
                others: &[("MISSED_CATCHUP_WINDOW", 80)],
            },
        ],
    )
    .await?;
    // Every decision is counted: 3 on time + the catch-up + 1 on time again, per downtime.
    let (page, scrape) = metrics_page(addr).await?;
    assert_eq!(decided(&scrape, "FIRED"), (5 + 14 + 104) as f64, "{page}");
    assert_eq!(decided(&scrape, "MISSED_CATCHUP_WINDOW"), 80.0, "{page}");
    stop.cancel();
    Ok(())
}

/// After a restart every schedule may have missed occurrences to decide at once; each decision
/// holds about 15 KiB until it is recorded, so 100,000 schedules took 1.5 GB at once and the
/// trigger's memory never came down. Only `--schedule-decisions-at-once` decide at a time; the
/// others wait for a turn, and every occurrence is still decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_restart_schedules_decide_a_few_at_a_time_and_all_catch_up() -> anyhow::Result<()> {
    let (addr, stop) = serve_metrics()?;
    let clock = ManualClock::new(utc("2026-01-05T10:00:30Z"));
    let env = TestEnv::new(EnvOptions {
        clock: ClockHandle::manual(&clock),
        schedule_decisions_at_once: 2,
        ..EnvOptions::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    let trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let schedules = 12;
    let mut ids = Vec::new();
    for i in 0..schedules {
        ids.push(
            create(&mut admin, &minutely(&format!("turn-{i}"), "MISFIRE_ALL"))
                .await?
                .id,
        );
    }
    for id in &ids {
        started(&pool, id).await?;
    }
    trigger.stop().await?;

    // Down for five minutes: every schedule has five occurrences to catch up at once.
    clock.advance(chrono::Duration::minutes(5));
    let newest_missed = minute_of(clock.now());
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let _orchestrator = env.start(Service::Orchestrator);
    for id in &ids {
        decided_through(&pool, id, newest_missed).await?;
    }
    let fired: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT (activity_id, scheduled_for)) FROM fires WHERE scheduled_for <= $1",
    )
    .bind(newest_missed)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        fired,
        5 * schedules as i64,
        "every missed occurrence caught up once"
    );

    let (page, scrape) = metrics_page(addr).await?;
    let queued: f64 = scrape
        .matching(taskfactory_runtime::metrics::SCHEDULE_DECISIONS_QUEUED, &[])
        .iter()
        .map(|sample| sample.value)
        .sum();
    assert!(
        queued >= (schedules - 2) as f64,
        "{schedules} schedules with 2 turns: at least {} waited, {queued} counted\n{page}",
        schedules - 2
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_schedule_records_why_it_did_not_fire_and_resumes() -> anyhow::Result<()> {
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-03-02T08:00:30Z").await?;
    let activity = create_started(&mut admin, &pool, &minutely("paused", "MISFIRE_SKIP")).await?;
    let first = next_minute(clock.now());
    clock.set(first);
    decided_through(&pool, &activity.id, first).await?;

    let paused = admin
        .pause_activity(PauseActivityRequest {
            id: "paused".to_owned(),
            note: "supplier maintenance".to_owned(),
        })
        .await?
        .into_inner();
    assert!(paused.paused);
    assert_eq!(paused.pause_note, "supplier maintenance");
    assert!(
        paused.next_fire_at.is_none(),
        "a paused schedule has no next fire"
    );
    // Pausing again only replaces the note.
    let again = admin
        .pause_activity(PauseActivityRequest {
            id: activity.id.clone(),
            note: "supplier maintenance, extended".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(again.pause_note, "supplier maintenance, extended");

    // Five minutes pass while paused: nothing is decided yet, nothing fires.
    clock.advance(chrono::Duration::minutes(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(watermark(&pool, &activity.id).await?, Some(first));

    let resumed = admin
        .resume_activity(ResumeActivityRequest {
            id: "paused".to_owned(),
            note: "back".to_owned(),
        })
        .await?
        .into_inner();
    assert!(!resumed.paused);
    let resumed_at = clock.now();
    assert_eq!(
        resumed
            .next_fire_at
            .as_ref()
            .and_then(taskfactory_model::spec::timestamp_to_chrono),
        Some(next_minute(resumed_at)),
        "the next fire by the scheduler's clock"
    );
    decided_through(&pool, &activity.id, minute_of(resumed_at)).await?;
    let next = next_minute(resumed_at);
    clock.set(next);
    decided_through(&pool, &activity.id, next).await?;

    let ledger = occurrences(&mut admin, "paused", first, next).await?;
    let decisions: Vec<(String, &str)> = ledger
        .iter()
        .map(|o| {
            (
                at(o).format("%H:%M").to_string(),
                o.decision().as_str_name(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("08:01".to_owned(), "FIRED"),
            ("08:02".to_owned(), "SKIPPED_PAUSED"),
            ("08:03".to_owned(), "SKIPPED_PAUSED"),
            ("08:04".to_owned(), "SKIPPED_PAUSED"),
            ("08:05".to_owned(), "SKIPPED_PAUSED"),
            ("08:06".to_owned(), "SKIPPED_PAUSED"),
            ("08:07".to_owned(), "FIRED"),
        ]
    );
    for o in ledger
        .iter()
        .filter(|o| o.decision() == OccurrenceDecision::SkippedPaused)
    {
        assert!(
            o.reason.contains("paused (supplier maintenance, extended)"),
            "{}",
            o.reason
        );
    }
    // A second activity id check: the ledger is per activity.
    let other = ActivityId::new_random().to_string();
    let status = admin
        .list_occurrences(ListOccurrencesRequest {
            id: other,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jittered_fires_are_on_time_and_a_new_version_invents_no_catch_up() -> anyhow::Result<()> {
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-05-04T09:59:30Z").await?;
    let spec = |cron: &str| {
        format!(
            "name: jittery\ntrigger: {{schedule: {{cron: ['{cron}'], timezone: UTC, jitter: 40s, misfire: MISFIRE_SKIP}}}}\ntasks: [{{name: a, type: log}}]\n"
        )
    };
    let activity = create(&mut admin, &spec("0,1,2 10 * * *")).await?;
    // Each minute fires somewhere in its first 40 seconds; 45 seconds in, it has fired, on time.
    for minute in ["10:00", "10:01", "10:02"] {
        let at = utc(&format!("2026-05-04T{minute}:00Z"));
        clock.set(at + chrono::Duration::seconds(45));
        decided_through(&pool, &activity.id, at).await?;
    }
    // Every five minutes from 10:32:45 on: the new cron's earlier times (10:05 … 10:30) were never
    // in force, so they are neither fired nor missed.
    clock.set(utc("2026-05-04T10:32:45Z"));
    admin
        .update_activity(taskfactory_proto::v1::UpdateActivityRequest {
            id: "jittery".to_owned(),
            spec: Some(taskfactory_model::spec::spec_from_yaml(&spec(
                "*/5 * * * *",
            ))?),
        })
        .await?;
    let next = utc("2026-05-04T10:35:00Z");
    clock.set(next + chrono::Duration::seconds(45));
    decided_through(&pool, &activity.id, next).await?;

    let ledger = occurrences(
        &mut admin,
        "jittery",
        utc("2026-05-04T09:00:00Z"),
        clock.now(),
    )
    .await?;
    let decisions: Vec<(String, &str, bool)> = ledger
        .iter()
        .map(|o| {
            (
                at(o).format("%H:%M").to_string(),
                o.decision().as_str_name(),
                o.reason.contains("on time"),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("10:00".to_owned(), "FIRED", true),
            ("10:01".to_owned(), "FIRED", true),
            ("10:02".to_owned(), "FIRED", true),
            ("10:35".to_owned(), "FIRED", true),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_runs_start_at_and_end_at_bound_a_schedule_across_restarts() -> anyhow::Result<()> {
    let (clock, env, pool, trigger, mut admin) = driven_trigger("2026-06-01T12:00:30Z").await?;
    let twice = create(
        &mut admin,
        "name: twice\ntrigger: {schedule: {cron: ['* * * * *'], timezone: UTC, maxRuns: 2, misfire: MISFIRE_ALL}}\ntasks: [{name: a, type: log}]\n",
    )
    .await?;
    let window = create(
        &mut admin,
        "name: window\ntrigger: {schedule: {cron: ['* * * * *'], timezone: UTC, startAt: '2026-06-01T12:03:00Z', endAt: '2026-06-01T12:04:00Z', misfire: MISFIRE_ALL}}\ntasks: [{name: a, type: log}]\n",
    )
    .await?;
    for minute in 1..=3 {
        let at = utc(&format!("2026-06-01T12:0{minute}:00Z"));
        clock.set(at);
        // Before startAt the window schedule has no occurrences at all.
        let bounded = if minute <= 2 { &twice.id } else { &window.id };
        decided_through(&pool, bounded, at).await?;
    }
    // A restart does not reset maxRuns; the window closes at endAt.
    trigger.stop().await?;
    clock.set(utc("2026-06-01T12:04:00Z"));
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    decided_through(&pool, &window.id, utc("2026-06-01T12:04:00Z")).await?;
    clock.set(utc("2026-06-01T12:06:00Z"));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fired = |list: &[Occurrence]| -> Vec<String> {
        list.iter()
            .map(|o| format!("{} {}", at(o).format("%H:%M"), o.decision().as_str_name()))
            .collect()
    };
    let start = utc("2026-06-01T12:00:00Z");
    let end = utc("2026-06-01T12:10:00Z");
    assert_eq!(
        fired(&occurrences(&mut admin, "twice", start, end).await?),
        ["12:01 FIRED", "12:02 FIRED"],
        "maxRuns: 2"
    );
    assert_eq!(
        fired(&occurrences(&mut admin, "window", start, end).await?),
        ["12:03 FIRED", "12:04 FIRED"],
        "from startAt through endAt"
    );
    assert_eq!(
        watermark(&pool, &twice.id).await?,
        Some(utc("2026-06-01T12:02:00Z")),
        "nothing is decided after the last run"
    );
    // The API agrees: a schedule that used up its runs, or is past endAt, fires no more.
    let get = |name: &str| taskfactory_proto::v1::GetActivityRequest {
        id: name.to_owned(),
        version: 0,
    };
    let twice = admin.get_activity(get("twice")).await?.into_inner();
    assert_eq!(twice.next_fire_at, None, "maxRuns used up");
    let listed = admin
        .list_activities(taskfactory_proto::v1::ListActivitiesRequest::default())
        .await?
        .into_inner();
    let listed_twice = listed.activities.iter().find(|a| a.id == twice.id).unwrap();
    assert_eq!(listed_twice.next_fire_at, None, "ListActivities too");
    let window = admin.get_activity(get("window")).await?.into_inner();
    assert_eq!(window.next_fire_at, None, "past endAt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_time_already_backfilled_is_deduped_when_the_schedule_reaches_it() -> anyhow::Result<()> {
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-07-01T08:00:30Z").await?;
    let activity = create(
        &mut admin,
        "name: deduped\ntrigger: {schedule: {cron: ['* * * * *'], timezone: UTC, misfire: MISFIRE_ALL}}\ntasks: [{name: a, type: log}]\n",
    )
    .await?;
    admin
        .pause_activity(PauseActivityRequest {
            id: "deduped".to_owned(),
            note: "backfilling".to_owned(),
        })
        .await?;
    clock.set(utc("2026-07-01T08:03:30Z"));
    let backfill = admin
        .backfill(taskfactory_proto::v1::BackfillRequest {
            id: "deduped".to_owned(),
            start: Some(chrono_to_timestamp(utc("2026-07-01T08:01:00Z"))),
            end: Some(chrono_to_timestamp(utc("2026-07-01T08:02:00Z"))),
            overlap: 0,
        })
        .await?
        .into_inner();
    assert_eq!(backfill.fires, 2);
    // Resumed: MISFIRE_ALL catches up 08:01 … 08:03; two of them were already fired.
    admin
        .resume_activity(ResumeActivityRequest {
            id: "deduped".to_owned(),
            note: String::new(),
        })
        .await?;
    decided_through(&pool, &activity.id, utc("2026-07-01T08:03:00Z")).await?;
    let ledger = occurrences(
        &mut admin,
        "deduped",
        utc("2026-07-01T08:00:00Z"),
        clock.now(),
    )
    .await?;
    let decisions: Vec<String> = ledger
        .iter()
        .map(|o| format!("{} {}", at(o).format("%H:%M"), o.decision().as_str_name()))
        .collect();
    assert_eq!(
        decisions,
        [
            "08:01 FIRED",
            "08:01 DEDUPED",
            "08:02 FIRED",
            "08:02 DEDUPED",
            "08:03 FIRED"
        ]
    );
    let deduped = ledger
        .iter()
        .find(|o| o.decision() == OccurrenceDecision::Deduped)
        .unwrap();
    assert!(
        deduped.reason.contains("already fired (by backfill)"),
        "{}",
        deduped.reason
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_and_resume_between_two_reloads_reach_the_scheduler_as_a_reactivation()
-> anyhow::Result<()> {
    // A replica that reloads definitions after both a pause and a resume happened sees an active
    // schedule either way: only the moved activation tells its scheduler the schedule was off
    // (else it would take the change for a new version and skip what was missed, unrecorded).
    use taskfactory_trigger::{registry::Registry, store};
    let db = taskfactory_tests::TestDb::create().await?;
    let pool = db.migrated_pool().await?;
    let spec = taskfactory_model::spec::spec_from_yaml(&minutely("coalesced", "MISFIRE_ALL"))?;
    let id = taskfactory_model::ids::ActivityId(uuid::Uuid::new_v4());
    let json = taskfactory_proto::to_json(&spec);
    store::create_activity(
        &pool,
        id,
        "coalesced",
        store::NewVersion {
            spec: &json,
            spec_bytes: taskfactory_model::sizes::json_bytes(&json),
            limits: taskfactory_trigger::admin::SpecLimits::default().totals(),
            enabled: true,
            trigger_kind: "schedule",
            created_by: "test",
        },
        utc("2026-07-01T08:00:00Z"),
    )
    .await?;
    let registry = Registry::new();
    registry.reload(&pool).await?;
    let before = registry.current().activities[&id].clone();
    assert!(registry.reload(&pool).await.is_ok());
    assert!(
        std::sync::Arc::ptr_eq(&before, &registry.current().activities[&id]),
        "nothing changed: the built schedule is kept"
    );

    store::set_paused(&pool, id, true, "maintenance", utc("2026-07-01T08:01:00Z")).await?;
    store::set_paused(&pool, id, false, "", utc("2026-07-01T08:05:00Z")).await?;
    registry.reload(&pool).await?;
    let after = registry.current().activities[&id].clone();
    assert!(!std::sync::Arc::ptr_eq(&before, &after), "rebuilt");
    assert!(after.is_active());
    assert_eq!(after.activated_at, Some(utc("2026-07-01T08:05:00Z")));
    assert_eq!(after.paused_at, Some(utc("2026-07-01T08:01:00Z")));
    assert_eq!(after.pause_note, "maintenance");
    assert_ne!(before.activated_at, after.activated_at);
    Ok(())
}

/// A fire that is due on time but waits for the database past the misfire threshold is judged
/// by the misfire policy when it is written, not recorded as on time: the cut-off was computed
/// before the fire waited (a loaded trigger recorded fires 20 s late as on time). Here the
/// fire's write waits on the scheduling fence, which the test holds, while the clock passes the
/// threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fire_written_after_the_misfire_threshold_goes_to_the_misfire_policy()
-> anyhow::Result<()> {
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-03-02T08:00:30Z").await?;
    let activity =
        create_started(&mut admin, &pool, &minutely("slow-write", "MISFIRE_SKIP")).await?;
    // 08:01 fires on time.
    let first = next_minute(clock.now());
    clock.set(first);
    decided_through(&pool, &activity.id, first).await?;

    // 08:02 is due, but its write waits for the fence...
    let mut holder = pool.begin().await?;
    sqlx::query("SELECT 1 FROM scheduler_fence FOR UPDATE")
        .execute(&mut *holder)
        .await?;
    let second = next_minute(first);
    clock.set(second);
    wait_for(
        "the fire to wait for the fence",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'tuple' OR (NOT granted)",
            )
            .fetch_one(&pool)
            .await?;
            Ok((waiting > 0).then_some(()))
        },
    )
    .await?;
    // ... past the threshold (10 s).
    clock.set(second + chrono::Duration::seconds(15));
    holder.commit().await?;
    decided_through(&pool, &activity.id, second).await?;

    let ledger = occurrences(&mut admin, "slow-write", first, second).await?;
    let decisions: Vec<(String, &str)> = ledger
        .iter()
        .map(|o| {
            (
                at(o).format("%H:%M").to_string(),
                o.decision().as_str_name(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("08:01".to_owned(), "FIRED"),
            ("08:02".to_owned(), "MISSED_CATCHUP_WINDOW"),
        ]
    );
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
        .fetch_one(&pool)
        .await?;
    assert_eq!(fires, 1, "only 08:01 fired");
    Ok(())
}

/// A schedule's fire of `at`, as recorded: (activity version, fired_at, published_at).
async fn fire_of(
    pool: &sqlx::PgPool,
    activity: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<Option<(i32, DateTime<Utc>, Option<DateTime<Utc>>)>> {
    Ok(sqlx::query_as(
        "SELECT activity_version, fired_at, published_at FROM fires \
         WHERE activity_id = $1 AND scheduled_for = $2",
    )
    .bind(uuid::Uuid::parse_str(activity)?)
    .bind(at)
    .fetch_optional(pool)
    .await?)
}

/// Waits until the fire of `at`, recorded ahead, is taken back (gone from the ledger).
async fn taken_back(pool: &sqlx::PgPool, activity: &str, at: DateTime<Utc>) -> anyhow::Result<()> {
    wait_for(
        "the fire to be taken back",
        Duration::from_secs(30),
        || async { Ok(fire_of(pool, activity, at).await?.is_none().then_some(())) },
    )
    .await
}

/// Sets the clock a moment before `at` (within the scheduler's lead) and waits until the fire of
/// `at` is recorded: not published, due at `at`.
async fn recorded_ahead(
    clock: &ManualClock,
    pool: &sqlx::PgPool,
    activity: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    clock.set(at - chrono::Duration::milliseconds(200));
    let (_, fired_at, published_at) = wait_for(
        "the fire to be recorded ahead of its time",
        Duration::from_secs(30),
        || async { fire_of(pool, activity, at).await },
    )
    .await?;
    assert_eq!(fired_at, at, "it fires at its instant");
    assert_eq!(published_at, None, "it is not published before its instant");
    // Nor later, while the clock stands before its instant: not by the reconciler either (every
    // 2 s in tests, on the system clock, which is months past the driven one).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fire_of(pool, activity, at).await?.and_then(|f| f.2), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_is_recorded_ahead_of_its_time_and_published_at_it() -> anyhow::Result<()> {
    let (addr, stop) = serve_metrics()?;
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-03-02T08:00:30Z").await?;
    let activity = create_started(&mut admin, &pool, &minutely("ahead", "MISFIRE_SKIP")).await?;
    let first = next_minute(clock.now());
    recorded_ahead(&clock, &pool, &activity.id, first).await?;
    assert_eq!(watermark(&pool, &activity.id).await?, Some(first));

    // The clock comes 3 s past the instant (a slow scheduler, say): the fire goes out then, and
    // its lateness is observed as it goes, not when it was recorded.
    clock.set(first + chrono::Duration::seconds(3));
    wait_for(
        "the fire to be published",
        Duration::from_secs(30),
        || async { Ok(fire_of(&pool, &activity.id, first).await?.and_then(|f| f.2)) },
    )
    .await?;
    let ledger = occurrences(&mut admin, "ahead", first, first).await?;
    assert_eq!(by_decision(&ledger), BTreeMap::from([("FIRED".into(), 1)]));
    let (page, scrape) = metrics_page(addr).await?;
    let lateness = |suffix: &str| -> f64 {
        scrape
            .matching(
                &format!("{}_{suffix}", taskfactory_runtime::metrics::FIRE_LATENESS),
                &[("activity", "ahead"), ("source", "schedule")],
            )
            .iter()
            .map(|sample| sample.value)
            .sum()
    };
    assert_eq!(lateness("count"), 1.0, "{page}");
    assert!((3.0..3.5).contains(&lateness("sum")), "{page}");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_paused_after_its_fire_was_recorded_ahead_takes_the_fire_back()
-> anyhow::Result<()> {
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-03-02T08:00:30Z").await?;
    let activity =
        create_started(&mut admin, &pool, &minutely("taken-back", "MISFIRE_SKIP")).await?;
    let first = next_minute(clock.now());
    recorded_ahead(&clock, &pool, &activity.id, first).await?;

    admin
        .pause_activity(PauseActivityRequest {
            id: "taken-back".to_owned(),
            note: "paused just before".to_owned(),
        })
        .await?;
    taken_back(&pool, &activity.id, first).await?;
    assert_eq!(
        watermark(&pool, &activity.id).await?,
        Some(first - chrono::Duration::microseconds(1)),
        "the occurrence is undecided again"
    );
    // Its instant passes while paused: it never fires.
    clock.set(first + chrono::Duration::seconds(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fire_of(&pool, &activity.id, first).await?.is_none());

    admin
        .resume_activity(ResumeActivityRequest {
            id: "taken-back".to_owned(),
            note: String::new(),
        })
        .await?;
    let next = next_minute(clock.now());
    clock.set(next);
    decided_through(&pool, &activity.id, next).await?;
    let ledger = occurrences(&mut admin, "taken-back", first, next).await?;
    let decisions: Vec<&str> = ledger.iter().map(|o| o.decision().as_str_name()).collect();
    assert_eq!(decisions, ["SKIPPED_PAUSED", "FIRED"], "{ledger:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_after_a_fire_was_recorded_ahead_fires_that_time_itself() -> anyhow::Result<()>
{
    let (clock, _env, pool, _trigger, mut admin) = driven_trigger("2026-03-02T08:00:30Z").await?;
    let activity = create_started(&mut admin, &pool, &minutely("replaced", "MISFIRE_SKIP")).await?;
    let first = next_minute(clock.now());
    recorded_ahead(&clock, &pool, &activity.id, first).await?;

    let mut spec = taskfactory_model::spec::spec_from_yaml(&minutely("replaced", "MISFIRE_SKIP"))?;
    spec.description = "version 2".to_owned();
    admin
        .update_activity(taskfactory_proto::v1::UpdateActivityRequest {
            id: "replaced".to_owned(),
            spec: Some(spec),
        })
        .await?;
    taken_back(&pool, &activity.id, first).await?;
    clock.set(first);
    let (version, _, _) = wait_for(
        "the new version to fire the time",
        Duration::from_secs(30),
        || async {
            Ok(fire_of(&pool, &activity.id, first)
                .await?
                .filter(|f| f.2.is_some()))
        },
    )
    .await?;
    assert_eq!(version, 2, "the time is fired by the version current at it");
    let ledger = occurrences(&mut admin, "replaced", first, first).await?;
    assert_eq!(by_decision(&ledger), BTreeMap::from([("FIRED".into(), 1)]));
    Ok(())
}

/// Daily at 10:00 UTC, jittered by up to 40 s.
const DAILY_JITTERED: &str = "name: daily\ntrigger: {schedule: {cron: ['0 10 * * *'], timezone: UTC, jitter: 40s, misfire: MISFIRE_SKIP}}\ntasks: [{name: a, type: log}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_recorded_ahead_at_a_restart_is_published_at_its_instant() -> anyhow::Result<()> {
    // The reconciler slowed to once an hour: only the scheduler can publish the fire in time.
    let clock = ManualClock::new(utc("2026-05-04T09:59:30Z"));
    let env = TestEnv::new(EnvOptions {
        clock: ClockHandle::manual(&clock),
        reconcile_interval: Duration::from_secs(3600),
        ..EnvOptions::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    let trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let activity = create_started(&mut admin, &pool, DAILY_JITTERED).await?;
    // The occurrence's instant, with its jitter (tomorrow's occurrence bounds it).
    let occurrence = utc("2026-05-04T10:00:00Z");
    let delay = taskfactory_model::schedule::jitter_delay(
        &activity.id,
        occurrence,
        Duration::from_secs(40),
        Some(occurrence + chrono::Duration::days(1)),
    );
    let due = occurrence + chrono::Duration::from_std(delay)?;

    // The trigger restarts after the occurrence, a moment before its instant: the restart
    // decides it on time and records it ahead.
    trigger.stop().await?;
    clock.set((due - chrono::Duration::milliseconds(100)).max(occurrence));
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let (_, fired_at, published_at) = wait_for(
        "the fire to be recorded",
        Duration::from_secs(30),
        || async { fire_of(&pool, &activity.id, occurrence).await },
    )
    .await?;
    // Stored to the microsecond.
    assert!(
        (fired_at - due)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .abs()
            <= 1,
        "it fires at its instant: {fired_at} against {due}"
    );
    assert_eq!(published_at, None, "not before it");

    clock.set(due);
    wait_for(
        "the fire to be published at its instant",
        Duration::from_secs(10),
        || async {
            Ok(fire_of(&pool, &activity.id, occurrence)
                .await?
                .and_then(|f| f.2))
        },
    )
    .await?;
    Ok(())
}

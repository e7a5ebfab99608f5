//! Flow control's throttle (`flow.throttle`): runs of a key start at the rate it sets, delayed
//! and never dropped, in order; with a concurrency key too; across a killed orchestrator.

use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{GetRunRequest, ListEventDecisionsRequest};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::event_decisions::{decisions, of_activity};
use crate::flow_control::{most_at_once, per_key};
use crate::support::{RecordingServer, create, publish_burst, publish_event, wait_succeeded};

/// The runs of `activity` of one throttle key: `(event n, started_at)`, in the order they started.
async fn starts(
    pool: &sqlx::PgPool,
    activity: &str,
    key: &str,
) -> anyhow::Result<Vec<(i64, DateTime<Utc>)>> {
    let rows: Vec<(serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT payload, started_at FROM runs WHERE activity_name = $1 AND throttle_key = $2 \
         ORDER BY started_at, fired_at",
    )
    .bind(activity)
    .bind(key)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(payload, at)| (payload["n"].as_i64().unwrap_or(-1), at))
        .collect())
}

/// Every event's run started once, in the order the events came.
fn assert_in_order(started: &[(i64, DateTime<Utc>)]) {
    let order: Vec<i64> = started.iter().map(|(n, _)| *n).collect();
    let n = i64::try_from(order.len()).unwrap();
    assert_eq!(
        order,
        (0..n).collect::<Vec<_>>(),
        "each event's run once, in order"
    );
}

/// The most starts within any window of `window` (a rate's check).
fn most_within(starts: &[DateTime<Utc>], window: chrono::TimeDelta) -> usize {
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|at| **at - starts[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttle_spreads_a_burst_over_its_rate_in_order_and_drops_none() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        executor_concurrency: 64,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::from_millis(5)).await?;
    create(
        &mut admin,
        &format!(
            "name: paced\ntrigger: {{event: {{subject: 'events.pay.*'}}}}\nflow: {{throttle: {{key: event.customer, limit: 10, period: 1s}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{customer: '{{{{ event.customer }}}}', n: '{{{{ event.n }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    const EVENTS: i64 = 200;
    let burst = (0..EVENTS)
        .map(|n| {
            let body = serde_json::json!({"customer": "busy", "n": n});
            (body.to_string().into_bytes(), format!("b{n}"))
        })
        .collect();
    publish_burst(&js, "events.pay.x", burst).await?;
    let pool = env.db.pool().await?;
    // While the burst is held: its events are QUEUED, naming the throttle, and a held run says so.
    let queued = wait_for("events queued", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let queued = decisions(
                &mut admin,
                ListEventDecisionsRequest {
                    decisions: vec![Decision::Queued as i32],
                    ..of_activity("paced")
                },
            )
            .await?;
            Ok((queued.len() >= 100).then_some(queued))
        }
    })
    .await?;
    assert!(
        queued
            .iter()
            .all(|d| d.reason.contains("flow.throttle") && d.flow_key == "busy"),
        "{:#?}",
        &queued[..2]
    );
    let held = admin
        .get_run(GetRunRequest {
            id: queued[0].run_id.clone(),
        })
        .await?
        .into_inner();
    assert!(held.waiting && held.throttled, "{held:#?}");
    assert_eq!(held.throttle_key, "busy");
    // Another key is not held behind this one.
    for n in 0..3 {
        let body = serde_json::json!({"customer": "quiet", "n": 1000 + n});
        publish_event(
            &js,
            "events.pay.x",
            serde_json::to_vec(&body)?,
            Some(&format!("q{n}")),
        )
        .await?;
    }
    wait_succeeded(&pool, "paced", EVENTS + 3, Duration::from_secs(90)).await?;

    let busy = starts(&pool, "paced", "busy").await?;
    assert_eq!(busy.len(), usize::try_from(EVENTS)?, "none dropped");
    assert_in_order(&busy);
    let gaps: Vec<i64> = busy
        .windows(2)
        .map(|w| (w[1].1 - w[0].1).num_milliseconds())
        .collect();
    let span = busy[busy.len() - 1].1 - busy[0].1;
    // 200 at 10 a second: the first at once, the last 19.9 s later (±10 %).
    assert!(
        (17_900..=21_900).contains(&span.num_milliseconds()),
        "200 runs started over {span}, ms apart: {gaps:?}"
    );
    let times: Vec<DateTime<Utc>> = busy.iter().map(|(_, at)| *at).collect();
    let most = most_within(&times, chrono::TimeDelta::seconds(1));
    assert!(
        most <= 11,
        "{most} starts within a second, ms apart: {gaps:?}"
    );
    let quiet = starts(&pool, "paced", "quiet").await?;
    assert_eq!(quiet.len(), 3);
    let quiet_fired: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT fired_at FROM runs WHERE activity_name = 'paced' AND throttle_key = 'quiet'",
    )
    .fetch_all(&pool)
    .await?;
    let first_quiet = quiet_fired.iter().min().unwrap();
    assert!(
        quiet[2].1 - *first_quiet < chrono::TimeDelta::seconds(2),
        "a quiet key waited behind a busy one: {quiet:?} after {first_quiet}"
    );
    // Each event's task ran once; every event is FIRED now.
    let mut called: Vec<i64> = server
        .calls()
        .iter()
        .map(|(_, body)| body["n"].as_i64().unwrap())
        .collect();
    called.sort_unstable();
    assert_eq!(called.len(), usize::try_from(EVENTS)? + 3);
    called.dedup();
    assert_eq!(called.len(), usize::try_from(EVENTS)? + 3, "each once");
    let made = decisions(&mut admin, of_activity("paced")).await?;
    assert_eq!(made.len(), usize::try_from(EVENTS)? + 3);
    assert!(made.iter().all(|d| d.decision() == Decision::Fired));
    // Nothing held: no key is due, and idle state goes.
    let due: i64 = sqlx::query_scalar("SELECT count(*) FROM throttles WHERE due_at IS NOT NULL")
        .fetch_one(&pool)
        .await?;
    assert_eq!(due, 0);
    Ok(())
}

/// A throttle and a concurrency key together: runs start no faster than the throttle and no more
/// than the limit run at once; a manual fire is throttled like an event, and priority goes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttle_and_a_concurrency_key_hold_together() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        executor_concurrency: 64,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::from_millis(300)).await?;
    create(
        &mut admin,
        &format!(
            "name: both\ntrigger: {{event: {{subject: 'events.both.*'}}}}\nflow: {{throttle: {{key: event.k, limit: 5, period: 1s, burst: 5}}, concurrency: {{key: event.k, limit: 2}}, priority: event.rank}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{k: '{{{{ event.k }}}}', n: '{{{{ event.n }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    const EVENTS: i64 = 30;
    for n in 0..EVENTS {
        let body = serde_json::json!({"k": "a", "n": n, "rank": 0});
        publish_event(
            &js,
            "events.both.x",
            serde_json::to_vec(&body)?,
            Some(&format!("e{n}")),
        )
        .await?;
    }
    // A manual fire with a higher rank, while most are still held, goes before them.
    admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "both".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"k": "a", "n": 99, "rank": 10}),
            )),
            idempotency_key: "urgent".to_owned(),
            ..Default::default()
        })
        .await?;
    let refused = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "both".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"n": 100, "rank": 0}),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("flow.concurrency.key")
            || refused.message().contains("flow.throttle.key"),
        "{refused:?}"
    );
    let pool = env.db.pool().await?;
    wait_succeeded(&pool, "both", EVENTS + 1, Duration::from_secs(90)).await?;
    let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT flow_key, started_at, finished_at FROM runs WHERE activity_name = 'both'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(rows.len(), usize::try_from(EVENTS)? + 1);
    for (key, runs) in &per_key(rows.clone()) {
        let most = most_at_once(runs);
        assert!(most <= 2, "key {key}: {most} at once");
    }
    // Let through by the throttle no faster than 5 a second (after the burst of 5).
    let released: Vec<DateTime<Utc>> = {
        let mut at: Vec<DateTime<Utc>> = rows.iter().map(|(_, started, _)| *started).collect();
        at.sort_unstable();
        at
    };
    let span = released[released.len() - 1] - released[0];
    assert!(
        span >= chrono::TimeDelta::milliseconds(4_500),
        "31 runs started within {span}"
    );
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT dedupe_key FROM runs WHERE activity_name = 'both' ORDER BY started_at",
    )
    .fetch_all(&pool)
    .await?;
    let urgent = order.iter().position(|k| k == "manual:urgent").unwrap();
    assert!(urgent < 10, "the urgent fire started {urgent}th: {order:?}");
    Ok(())
}

/// SIGKILL the orchestrator while a throttle holds runs: when it is back, the held runs start at
/// the rate (the budget is not given back twice), once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttled_runs_survive_a_killed_orchestrator() -> anyhow::Result<()> {
    use taskfactory_tests::Service;
    let env = TestEnv::new(EnvOptions {
        orchestrator_ack_wait: Duration::from_secs(5),
        ..EnvOptions::default()
    })
    .await?;
    let server = RecordingServer::start(Duration::from_millis(10)).await?;
    let all = [Service::Trigger, Service::Orchestrator, Service::Executor];
    let mut running = Vec::new();
    for service in all {
        running.push(Some(env.spawn_process(service, &[])?));
    }
    env.wait_ready(&all).await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        &format!(
            "name: slow\ntrigger: {{event: {{subject: 'events.slow.*'}}}}\nflow: {{throttle: {{limit: 5, period: 1s}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{n: '{{{{ event.n }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    let js = env.js().await?;
    const EVENTS: i64 = 40;
    for n in 0..EVENTS {
        let body = serde_json::json!({"n": n});
        publish_event(
            &js,
            "events.slow.x",
            serde_json::to_vec(&body)?,
            Some(&format!("s{n}")),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    wait_for("some runs started", Duration::from_secs(30), || async {
        let started: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE activity_name = 'slow' AND NOT throttled",
        )
        .fetch_one(&pool)
        .await?;
        Ok((started >= 8).then_some(()))
    })
    .await?;
    if let Some(process) = running[1].take() {
        process.kill();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    running[1] = Some(env.spawn_process(Service::Orchestrator, &[])?);
    env.wait_ready(&[Service::Orchestrator]).await?;
    wait_succeeded(&pool, "slow", EVENTS, Duration::from_secs(90)).await?;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE activity_name = 'slow'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(runs, EVENTS, "no run doubled");
    let slow = starts(&pool, "slow", "").await?;
    assert_in_order(&slow);
    let times: Vec<DateTime<Utc>> = slow.iter().map(|(_, at)| *at).collect();
    let most = most_within(&times, chrono::TimeDelta::seconds(1));
    assert!(
        most <= 6,
        "{most} starts within a second across the restart: {slow:?}"
    );
    let mut called: Vec<i64> = server
        .calls()
        .iter()
        .map(|(_, body)| body["n"].as_i64().unwrap())
        .collect();
    called.sort_unstable();
    called.dedup();
    assert_eq!(called, (0..EVENTS).collect::<Vec<_>>(), "every event ran");
    Ok(())
}

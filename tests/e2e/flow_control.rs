//! Flow control: the rate limit (`flow.rateLimit`), each decision recorded.

use std::time::Duration;

use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{ListEventDecisionsRequest, PauseActivityRequest};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};
use taskfactory_trigger::flow::{RateLimit, prune_rate_limits};
use taskfactory_trigger::store::{StoreError, record_fire};

use crate::event_decisions::{decisions, of_activity};
use crate::schedules::wait_for_triggers_drained;
use crate::support::{RecordingServer, create, event_fire, publish_event, runs};

fn count(rows: &[taskfactory_proto::v1::EventDecision], decision: Decision, key: &str) -> usize {
    rows.iter()
        .filter(|d| d.decision() == decision && d.flow_key == key)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_drops_the_events_over_it_per_key_and_records_each() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: per-account\ntrigger: {event: {subject: 'events.calls.*'}}\nflow: {rateLimit: {key: event.account, limit: 1, period: 10s}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: three-a-minute\ntrigger: {event: {subject: 'events.calls.*'}}\nflow: {rateLimit: {limit: 3, period: 1m}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    let mut published = 0;
    for (account, n) in [("a", 20), ("b", 10)] {
        for i in 0..n {
            let body = serde_json::json!({"account": account, "i": i});
            publish_event(
                &js,
                "events.calls.made",
                serde_json::to_vec(&body)?,
                Some(&format!("{account}{i}")),
            )
            .await?;
            published += 1;
        }
    }
    publish_event(
        &js,
        "events.calls.made",
        br#"{"i": 99}"#.to_vec(),
        Some("nobody"),
    )
    .await?;
    published += 1;
    wait_for("every decision", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let made = decisions(&mut admin, of_activity("")).await?;
            Ok((made.len() >= 2 * published).then_some(made))
        }
    })
    .await?;
    wait_for_triggers_drained(&js).await?;

    let per_account = decisions(&mut admin, of_activity("per-account")).await?;
    assert_eq!(per_account.len(), published);
    assert_eq!(count(&per_account, Decision::Fired, ""), 2, "one per key");
    assert_eq!(count(&per_account, Decision::RateLimited, "a"), 19);
    assert_eq!(count(&per_account, Decision::RateLimited, "b"), 9);
    let limited = per_account
        .iter()
        .find(|d| d.decision() == Decision::RateLimited)
        .unwrap();
    assert!(
        limited.reason.contains("rate limit of 1 per 10s"),
        "{limited:?}"
    );
    let missing = per_account.iter().find(|d| d.event_id == "nobody").unwrap();
    assert_eq!(missing.decision(), Decision::KeyError);
    assert!(
        missing.reason.contains("flow.rateLimit.key")
            && missing.reason.contains("event.account is undefined"),
        "{missing:?}"
    );
    let three = decisions(&mut admin, of_activity("three-a-minute")).await?;
    assert_eq!(count(&three, Decision::Fired, ""), 3);
    assert_eq!(count(&three, Decision::RateLimited, ""), published - 3);
    assert_eq!(runs(&mut admin, "per-account").await?.len(), 2);
    assert_eq!(runs(&mut admin, "three-a-minute").await?.len(), 3);
    let page = taskfactory_runtime::metrics::handle().render();
    for (activity, decision, n) in [
        ("per-account", "fired", 2),
        ("per-account", "rate_limited", 28),
        ("per-account", "key_error", 1),
        ("three-a-minute", "fired", 3),
        ("three-a-minute", "rate_limited", published - 3),
    ] {
        let line = format!(
            "taskfactory_event_decisions_total{{activity=\"{activity}\",decision=\"{decision}\"}} {n}"
        );
        assert!(page.contains(&line), "{line} in {page}");
    }

    // A period after its fire, a key has its budget again; an idle key's state is pruned.
    let last_fire = per_account
        .iter()
        .filter(|d| d.decision() == Decision::Fired)
        .filter_map(|d| d.decided_at)
        .map(|t| std::time::SystemTime::try_from(t).unwrap())
        .max()
        .unwrap();
    let reopens = last_fire + Duration::from_millis(10_300);
    if let Ok(wait) = reopens.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    publish_event(
        &js,
        "events.calls.made",
        br#"{"account": "a", "i": 100}"#.to_vec(),
        Some("a-again"),
    )
    .await?;
    let again = wait_for("the next event of a", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            let made = decisions(
                &mut admin,
                ListEventDecisionsRequest {
                    event_id: "a-again".to_owned(),
                    ..of_activity("per-account")
                },
            )
            .await?;
            Ok(made.into_iter().next())
        }
    })
    .await?;
    assert_eq!(again.decision(), Decision::Fired, "{again:?}");
    let pool = env.db.pool().await?;
    prune_rate_limits(&pool).await?;
    let mut kept: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.name, l.key FROM rate_limits l JOIN activities a ON a.id = l.activity_id",
    )
    .fetch_all(&pool)
    .await?;
    kept.sort();
    assert_eq!(
        kept,
        [
            ("per-account".to_owned(), "a".to_owned()),
            ("three-a-minute".to_owned(), String::new())
        ],
        "b's period has passed: its state is gone"
    );
    Ok(())
}

/// An event delivered again is decided as it was, taking no second share of the budget; an event
/// whose key fired before is a duplicate, not rate limited, and takes none either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_event_delivered_again_takes_no_second_share() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(taskfactory_tests::Service::Trigger);
    env.wait_ready(&[taskfactory_tests::Service::Trigger])
        .await?;
    let mut admin = env.admin().await?;
    let activity = create(
        &mut admin,
        "name: hourly\ntrigger: {event: {subject: 'events.h.*'}}\nflow: {rateLimit: {limit: 1, period: 1h}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let fire = |sequence: u64, key: &str| {
        let limit = RateLimit {
            key: String::new(),
            limit: 1,
            period: Duration::from_secs(3600),
        };
        event_fire(
            &activity,
            sequence,
            &format!("e{sequence}"),
            key,
            Some(limit),
        )
    };
    let pool = env.db.pool().await?;
    let tat = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT tat FROM rate_limits")
            .fetch_one(&pool)
            .await
    };
    assert!(record_fire(&pool, &fire(1, "k1")?, None).await?);
    let first = tat().await?;
    assert!(!record_fire(&pool, &fire(1, "k1")?, None).await?);
    for _ in 0..2 {
        match record_fire(&pool, &fire(2, "k2")?, None).await {
            Err(StoreError::RateLimited { reason }) => {
                assert!(reason.contains("1 per 1h"), "{reason}")
            }
            other => anyhow::bail!("not rate limited: {other:?}"),
        }
    }
    assert!(
        !record_fire(&pool, &fire(3, "k1")?, None).await?,
        "a duplicate"
    );
    assert_eq!(tat().await?, first, "only the first took a share");
    let made = decisions(&mut admin, of_activity("hourly")).await?;
    let made: Vec<(String, Decision)> = made
        .iter()
        .map(|d| (d.event_id.clone(), d.decision()))
        .collect();
    assert_eq!(
        made,
        [
            ("e3".to_owned(), Decision::Deduped),
            ("e2".to_owned(), Decision::RateLimited),
            ("e1".to_owned(), Decision::Fired),
        ]
    );
    let page = taskfactory_runtime::metrics::handle().render();
    let line = "taskfactory_event_decisions_total{activity=\"hourly\",decision=\"rate_limited\"} 1";
    assert!(page.contains(line), "{line} in {page}");
    Ok(())
}

/// `(key, start, end)` rows grouped by key.
pub(crate) fn per_key<T>(
    rows: Vec<(String, T, T)>,
) -> std::collections::BTreeMap<String, Vec<(T, T)>> {
    let mut by_key: std::collections::BTreeMap<String, Vec<(T, T)>> = Default::default();
    for (key, start, end) in rows {
        by_key.entry(key).or_default().push((start, end));
    }
    by_key
}

/// The limits held at `activity`: its server's calls never more than `calls` at once, and its
/// runs never more than `runs` at once per concurrency key (from their start and finish).
pub(crate) async fn assert_limits_held(
    pool: &sqlx::PgPool,
    activity: &str,
    server: &RecordingServer,
    calls: usize,
    runs: usize,
) -> anyhow::Result<()> {
    let timed: Vec<(std::time::Instant, std::time::Instant)> = server
        .timed_calls()
        .iter()
        .map(|c| (c.started, c.finished))
        .collect();
    assert!(
        most_at_once(&timed) <= calls,
        "{activity}: the task key's limit of {calls} held"
    );
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT flow_key, started_at, finished_at FROM runs WHERE activity_name = $1",
    )
    .bind(activity)
    .fetch_all(pool)
    .await?;
    for (key, spans) in per_key(rows) {
        assert!(
            most_at_once(&spans) <= runs,
            "{activity}: run key {key}: more than {runs} at once"
        );
    }
    Ok(())
}

/// How many of `intervals` (start, end) overlap at most at one instant.
pub(crate) fn most_at_once<T: Ord + Copy>(intervals: &[(T, T)]) -> usize {
    let mut edges: Vec<(T, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // At one instant, an end before a start: touching intervals do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_per_key_holds_for_a_thousand_events_over_fifty_keys() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        executor_concurrency: 128,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::from_millis(200)).await?;
    create(
        &mut admin,
        &format!(
            "name: per-customer\ntrigger: {{event: {{subject: 'events.orders.*'}}}}\nflow: {{concurrency: {{key: event.customer, limit: 2}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{customer: '{{{{ event.customer }}}}', n: '{{{{ event.n }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    const EVENTS: usize = 1000;
    for n in 0..EVENTS {
        let body = serde_json::json!({"customer": format!("c{}", n % 50), "n": n});
        publish_event(
            &js,
            "events.orders.placed",
            serde_json::to_vec(&body)?,
            Some(&format!("o{n}")),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    wait_for("every run finished", Duration::from_secs(180), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status = 'SUCCEEDED' AND activity_name = 'per-customer'",
        )
        .fetch_one(&pool)
        .await?;
        Ok((usize::try_from(done)? == EVENTS).then_some(()))
    })
    .await?;

    // Every event ran once.
    let calls = server.timed_calls();
    let mut ran: Vec<i64> = calls
        .iter()
        .map(|c| c.body["n"].as_i64().unwrap())
        .collect();
    ran.sort_unstable();
    assert_eq!(
        ran,
        (0..EVENTS as i64).collect::<Vec<_>>(),
        "each event once"
    );
    // No key ever had more than 2 running, from the runs' own record...
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT flow_key, started_at, finished_at FROM runs WHERE activity_name = 'per-customer'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(rows.len(), EVENTS);
    let by_key = per_key(rows);
    assert_eq!(by_key.len(), 50);
    let mut busiest = 0;
    for (key, runs) in &by_key {
        let most = most_at_once(runs);
        assert!(most <= 2, "key {key}: {most} runs at once");
        busiest = busiest.max(most);
    }
    assert_eq!(busiest, 2, "the limit was reached, not just respected");
    // ...and from the calls the server saw.
    let calls_by_key = per_key(
        calls
            .iter()
            .map(|c| {
                (
                    c.body["customer"].as_str().unwrap().to_owned(),
                    c.started,
                    c.finished,
                )
            })
            .collect(),
    );
    for (key, calls) in &calls_by_key {
        let most = most_at_once(calls);
        assert!(most <= 2, "key {key}: {most} calls at once");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_runs_start_in_priority_order_and_their_events_are_queued() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::from_millis(1500)).await?;
    create(
        &mut admin,
        &format!(
            "name: ranked\ntrigger: {{event: {{subject: 'events.jobs.*'}}}}\nflow: {{concurrency: {{limit: 1}}, priority: event.rank}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{id: '{{{{ event.id }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    publish_event(
        &js,
        "events.jobs.new",
        br#"{"id": "first", "rank": 0}"#.to_vec(),
        Some("first"),
    )
    .await?;
    let pool = env.db.pool().await?;
    wait_for(
        "the first run admitted",
        Duration::from_secs(20),
        || async {
            let started: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE activity_name = 'ranked' AND started_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await?;
            Ok((started == 1).then_some(()))
        },
    )
    .await?;
    for (id, rank) in [("r1", 5), ("r2", 50), ("r3", 10), ("r4", 50), ("r5", 1)] {
        let body = serde_json::json!({"id": id, "rank": rank});
        publish_event(&js, "events.jobs.new", serde_json::to_vec(&body)?, Some(id)).await?;
    }
    // Queued, each event, while the first runs.
    let queued = wait_for("five events queued", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            let queued = decisions(
                &mut admin,
                ListEventDecisionsRequest {
                    decisions: vec![Decision::Queued as i32],
                    ..of_activity("ranked")
                },
            )
            .await?;
            Ok((queued.len() == 5).then_some(queued))
        }
    })
    .await?;
    assert!(
        queued.iter().all(|d| d.reason.contains("waits")),
        "{queued:#?}"
    );
    // Counted as they were queued (a manual fire, which has no event, is not).
    let page = taskfactory_runtime::metrics::handle().render();
    let line = "taskfactory_event_decisions_total{activity=\"ranked\",decision=\"queued\"} 5";
    assert!(page.contains(line), "{line} in {page}");
    // A manual fire with a higher priority goes before them; one without a rank is refused.
    admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "ranked".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"id": "manual", "rank": 99}),
            )),
            idempotency_key: "m".to_owned(),
            ..Default::default()
        })
        .await?;
    let overridden = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "ranked".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"id": "overridden", "rank": 1}),
            )),
            overlap: taskfactory_proto::v1::OverlapPolicy::AllowAll as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(overridden.code(), tonic::Code::InvalidArgument);
    assert!(overridden.message().contains("overlap"), "{overridden:?}");
    let refused = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "ranked".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"id": "unranked"}),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("flow.priority")
            && refused.message().contains("event.rank is undefined"),
        "{refused:?}"
    );
    wait_for("every run finished", Duration::from_secs(60), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE activity_name = 'ranked' AND status = 'SUCCEEDED'",
        )
        .fetch_one(&pool)
        .await?;
        Ok((done == 7).then_some(()))
    })
    .await?;
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT dedupe_key FROM runs WHERE activity_name = 'ranked' ORDER BY started_at",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        order,
        ["first", "manual:m", "r2", "r4", "r3", "r1", "r5"],
        "priority first, then the earlier fire"
    );
    let intervals: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT started_at, finished_at FROM runs WHERE activity_name = 'ranked'")
            .fetch_all(&pool)
            .await?;
    assert_eq!(most_at_once(&intervals), 1);
    let fired = decisions(&mut admin, of_activity("ranked")).await?;
    assert!(
        fired.iter().all(|d| d.decision() == Decision::Fired),
        "queued until they ran: {fired:#?}"
    );
    Ok(())
}

/// SIGKILL the trigger and then the orchestrator while runs wait under their keys: every event
/// is decided once, every run runs once, and no key ever has more than its limit running. (A
/// run the killed orchestrator finished without starting the next of its key is followed by
/// the redelivery of its result, or the sweeper.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_runs_survive_a_killed_trigger_and_orchestrator() -> anyhow::Result<()> {
    use taskfactory_tests::Service;
    // What the killed orchestrator held comes back within 5 s (its runs are short).
    let env = TestEnv::new(EnvOptions {
        orchestrator_ack_wait: Duration::from_secs(5),
        ..EnvOptions::default()
    })
    .await?;
    let server = RecordingServer::start(Duration::from_millis(40)).await?;
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
            "name: keyed\ntrigger: {{event: {{subject: 'events.k.*'}}}}\nflow: {{concurrency: {{key: event.k, limit: 1}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{n: '{{{{ event.n }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    let js = env.js().await?;
    const EVENTS: i64 = 300;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                let body = serde_json::json!({"k": n % 5, "n": n});
                publish_event(
                    &js,
                    "events.k.x",
                    serde_json::to_vec(&body)?,
                    Some(&format!("n{n}")),
                )
                .await?;
                if n % 30 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    let pool = env.db.pool().await?;
    for (index, service, sql, at) in [
        (
            0,
            Service::Trigger,
            "SELECT count(*) FROM fires",
            EVENTS / 6,
        ),
        (
            1,
            Service::Orchestrator,
            "SELECT count(*) FROM runs WHERE waiting",
            10,
        ),
    ] {
        wait_for(&format!("{sql} ≥ {at}"), Duration::from_secs(120), || {
            let pool = pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await?;
                Ok((n >= at).then_some(()))
            }
        })
        .await?;
        if let Some(process) = running[index].take() {
            process.kill();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        running[index] = Some(env.spawn_process(service, &[])?);
        env.wait_ready(&[service]).await?;
    }
    publisher.await??;
    wait_for("every run finished", Duration::from_secs(240), || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'SUCCEEDED'")
            .fetch_one(&pool)
            .await?;
        Ok((done == EVENTS).then_some(()))
    })
    .await?;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await?;
    assert_eq!(runs, EVENTS, "no run doubled");
    let made = decisions(&mut admin, of_activity("keyed")).await?;
    let mut events: Vec<&str> = made.iter().map(|d| d.event_id.as_str()).collect();
    events.sort_unstable();
    events.dedup();
    assert_eq!(made.len(), events.len(), "one decision per event");
    assert_eq!(made.len(), usize::try_from(EVENTS)?);
    assert!(made.iter().all(|d| d.decision() == Decision::Fired));
    let mut called: Vec<i64> = server
        .calls()
        .iter()
        .map(|(_, body)| body["n"].as_i64().unwrap())
        .collect();
    called.sort_unstable();
    called.dedup();
    assert_eq!(
        called,
        (0..EVENTS).collect::<Vec<_>>(),
        "every event's task ran"
    );
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as("SELECT flow_key, started_at, finished_at FROM runs")
        .fetch_all(&pool)
        .await?;
    let by_key = per_key(rows);
    for (key, runs) in &by_key {
        assert_eq!(most_at_once(runs), 1, "key {key}");
    }
    Ok(())
}

/// Two events with one key in one batch of fires, both under a rate limit: the second is judged
/// when the first is refused (not taken for its duplicate), and takes no share when the first
/// fits; the one that fits is the fire, published as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_events_of_one_key_in_one_batch_are_judged_each_once() -> anyhow::Result<()> {
    use taskfactory_trigger::store::{FireWrite, record_fires};
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(taskfactory_tests::Service::Trigger);
    env.wait_ready(&[taskfactory_tests::Service::Trigger])
        .await?;
    let mut admin = env.admin().await?;
    let activity = create(
        &mut admin,
        "name: twice\ntrigger: {event: {subject: 'events.t.*'}}\nflow: {rateLimit: {key: event.k, limit: 1, period: 1h}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let fire = |sequence: u64, dedupe: &str, key: &str| {
        let limit = RateLimit {
            key: key.to_owned(),
            limit: 1,
            period: Duration::from_secs(3600),
        };
        event_fire(
            &activity,
            sequence,
            &format!("e{sequence}"),
            dedupe,
            Some(limit),
        )
    };
    let pool = env.db.pool().await?;
    let outcome = |r: &Result<bool, StoreError>| match r {
        Ok(true) => "fired",
        Ok(false) => "duplicate",
        Err(StoreError::RateLimited { .. }) => "rate limited",
        Err(_) => "error",
    };
    // Key "a" spent first; then its two events of one dedupe key, together: both refused.
    assert!(record_fire(&pool, &fire(1, "d1", "a")?, None).await?);
    let (two, three) = (fire(2, "d2", "a")?, fire(3, "d2", "a")?);
    let both = record_fires(
        &pool,
        &[
            FireWrite {
                fire: &two,
                schedule: None,
            },
            FireWrite {
                fire: &three,
                schedule: None,
            },
        ],
    )
    .await?;
    assert_eq!(
        both.iter().map(outcome).collect::<Vec<_>>(),
        ["rate limited", "rate limited"]
    );
    // Key "b" has its budget: the first fires, the second is its duplicate, and "b" is spent
    // once (a third event of "b" is refused, not a fourth of another key).
    let (four, five) = (fire(4, "d4", "b")?, fire(5, "d4", "b")?);
    let both = record_fires(
        &pool,
        &[
            FireWrite {
                fire: &four,
                schedule: None,
            },
            FireWrite {
                fire: &five,
                schedule: None,
            },
        ],
    )
    .await?;
    assert_eq!(
        both.iter().map(outcome).collect::<Vec<_>>(),
        ["fired", "duplicate"]
    );
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
        .fetch_one(&pool)
        .await?;
    assert_eq!(fires, 2, "d1 and d4");
    let made: Vec<(String, Decision)> = decisions(&mut admin, of_activity("twice"))
        .await?
        .iter()
        .map(|d| (d.event_id.clone(), d.decision()))
        .collect();
    assert_eq!(
        made,
        [
            ("e5".to_owned(), Decision::Deduped),
            ("e4".to_owned(), Decision::Fired),
            ("e3".to_owned(), Decision::RateLimited),
            ("e2".to_owned(), Decision::RateLimited),
            ("e1".to_owned(), Decision::Fired),
        ]
    );
    Ok(())
}

/// A dead task of a finished run under `flow.concurrency` runs again only if its key has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retrying_a_task_takes_room_under_its_concurrency_key() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let slow = RecordingServer::start(Duration::from_secs(3)).await?;
    // A refused connection: the task dies on its one attempt.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dead_url = format!("http://{}/nothing", closed.local_addr()?);
    drop(closed);
    create(
        &mut admin,
        "name: one-by-one\ntrigger: {event: {subject: 'events.one.*'}}\nflow: {concurrency: {limit: 1}}\ntasks: [{name: call, type: http, retry: {maxAttempts: 1}, params: {url: '{{ event.url }}'}}]",
    )
    .await?;
    let body = serde_json::json!({"url": dead_url});
    publish_event(
        &js,
        "events.one.x",
        serde_json::to_vec(&body)?,
        Some("dies"),
    )
    .await?;
    let pool = env.db.pool().await?;
    let dead: uuid::Uuid = wait_for("the dead task", Duration::from_secs(30), || async {
        Ok(
            sqlx::query_scalar("SELECT id FROM tasks WHERE status = 'DEAD'")
                .fetch_optional(&pool)
                .await?,
        )
    })
    .await?;
    let body = serde_json::json!({"url": slow.url});
    publish_event(
        &js,
        "events.one.x",
        serde_json::to_vec(&body)?,
        Some("slow"),
    )
    .await?;
    wait_for("the slow run admitted", Duration::from_secs(30), || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE dedupe_key = 'slow' AND started_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await?;
        Ok((running == 1).then_some(()))
    })
    .await?;
    let refused = admin
        .retry_task(taskfactory_proto::v1::RetryTaskRequest {
            id: dead.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("concurrency key"), "{refused:?}");
    wait_for("the slow run finished", Duration::from_secs(30), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE dedupe_key = 'slow' AND status = 'SUCCEEDED'",
        )
        .fetch_one(&pool)
        .await?;
        Ok((done == 1).then_some(()))
    })
    .await?;
    admin
        .retry_task(taskfactory_proto::v1::RetryTaskRequest {
            id: dead.to_string(),
        })
        .await?;
    Ok(())
}

/// A schedule under `flow.concurrency` without a key: its runs never overlap beyond the limit,
/// and none is skipped (every fire waits its turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_under_concurrency_runs_every_fire_one_at_a_time() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let slow = RecordingServer::start(Duration::from_millis(1500)).await?;
    create(
        &mut admin,
        &format!(
            "name: ticking\ntrigger: {{schedule: {{cron: ['* * * * * *'], timezone: UTC}}}}\nflow: {{concurrency: {{limit: 1}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{at: '{{{{ trigger.scheduled_for }}}}'}}}}}}]",
            slow.url
        ),
    )
    .await?;
    let pool = env.db.pool().await?;
    // Fires come every second and each run takes 1.5 s: runs wait.
    wait_for("runs waiting", Duration::from_secs(30), || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE waiting AND status = 'PENDING'")
                .fetch_one(&pool)
                .await?;
        Ok((waiting >= 2).then_some(()))
    })
    .await?;
    admin
        .pause_activity(PauseActivityRequest {
            id: "ticking".to_owned(),
            note: "enough".to_owned(),
        })
        .await?;
    wait_for("every run finished", Duration::from_secs(60), || async {
        let unfinished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('PENDING', 'RUNNING')")
                .fetch_one(&pool)
                .await?;
        Ok((unfinished == 0).then_some(()))
    })
    .await?;
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as("SELECT status, started_at, finished_at FROM runs")
        .fetch_all(&pool)
        .await?;
    assert!(rows.len() >= 3, "{rows:?}");
    assert!(
        rows.iter().all(|(status, _, _)| status == "SUCCEEDED"),
        "none skipped: {rows:?}"
    );
    let intervals: Vec<_> = rows.iter().map(|(_, s, f)| (*s, *f)).collect();
    assert_eq!(most_at_once(&intervals), 1);
    assert_eq!(slow.calls().len(), rows.len());
    Ok(())
}

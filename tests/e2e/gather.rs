//! Flow control's debounce and batch (`flow.debounce`, `flow.batch`): a key's events make one
//! run, each event recorded once with that run; under a driven clock, with real services, and
//! across a killed trigger.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_runtime::clock::{ClockHandle, ManualClock};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::event_decisions::{decisions, of_activity, one_decision_each};
use crate::flow_control::{assert_limits_held, most_at_once, per_key};
use crate::support::{
    RecordingServer, create, publish_burst, publish_event, wait_count, wait_succeeded,
};

/// The fires of `activity`: `(dedupe key, payload)`, in the order they were recorded.
async fn fires(
    pool: &sqlx::PgPool,
    activity: &str,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    Ok(sqlx::query_as(
        "SELECT dedupe_key, payload FROM fires WHERE activity_name = $1 ORDER BY fired_at, id",
    )
    .bind(activity)
    .fetch_all(pool)
    .await?)
}

/// The `n` of each event of a gathered payload (`{batch: [...]}`), in its order.
fn ns(payload: &serde_json::Value) -> Vec<i64> {
    payload["batch"]
        .as_array()
        .map(|batch| batch.iter().map(|e| e["n"].as_i64().unwrap()).collect())
        .unwrap_or_default()
}

/// Waits until `activity` has `n` decisions of `decision`.
async fn wait_decided(
    pool: &sqlx::PgPool,
    activity: &str,
    decision: &str,
    n: i64,
) -> anyhow::Result<()> {
    wait_count(
        pool,
        &format!("{n} {decision} decisions at {activity}"),
        "SELECT count(*) FROM event_decisions d JOIN activities a ON a.id = d.activity_id \
         WHERE a.name = $1 AND d.decision = $2",
        &[activity, decision],
        n,
        Duration::from_secs(30),
    )
    .await
}

/// Waits until `activity` has `n` fires; then gives the flusher a moment and checks no more came.
async fn wait_fires(
    pool: &sqlx::PgPool,
    activity: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    wait_for(
        &format!("{n} fires of {activity}"),
        Duration::from_secs(30),
        || async {
            let made = fires(pool, activity).await?;
            Ok((made.len() >= n).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let made = fires(pool, activity).await?;
    assert_eq!(made.len(), n, "{activity}: {made:#?}");
    Ok(made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debounce_on_a_driven_clock_fires_once_per_burst_and_at_its_timeout() -> anyhow::Result<()>
{
    let clock =
        ManualClock::new(DateTime::parse_from_rfc3339("2026-03-02T09:00:00Z")?.with_timezone(&Utc));
    let env = TestEnv::new(EnvOptions {
        clock: ClockHandle::manual(&clock),
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let pool = env.db.pool().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: every\ntrigger: {event: {subject: 'events.profile.*'}}\nflow: {debounce: {key: event.user, period: 5s, timeout: 30s, keep: ALL}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: last\ntrigger: {event: {subject: 'events.profile.*'}}\nflow: {debounce: {key: event.user, period: 5s}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    let n = std::cell::Cell::new(0_i64);
    // Publishes one event of `user` and waits until both activities took it.
    let event = async |user: &str| -> anyhow::Result<()> {
        let at = n.get();
        let body = serde_json::json!({"user": user, "n": at});
        publish_event(
            &js,
            "events.profile.updated",
            body.to_string().into_bytes(),
            Some(&format!("p{at}")),
        )
        .await?;
        n.set(at + 1);
        wait_decided(&pool, "every", "DEBOUNCED", at + 1).await?;
        wait_decided(&pool, "last", "DEBOUNCED", at + 1).await
    };
    let seconds = |s: i64| chrono::TimeDelta::seconds(s);

    // A burst: three events at once, a fourth 4 s later, quiet after it.
    for _ in 0..3 {
        event("ann").await?;
    }
    clock.advance(seconds(4));
    event("ann").await?;
    clock.advance(seconds(4)); // 4 s after the last: not quiet for 5 s yet
    let made = wait_fires(&pool, "every", 0).await?;
    assert!(made.is_empty());
    clock.advance(seconds(2));
    let made = wait_fires(&pool, "every", 1).await?;
    assert_eq!(ns(&made[0].1), [0, 1, 2, 3], "every event, in order");
    assert_eq!(made[0].1["key"], "ann");
    assert_eq!(made[0].1["size"], 4);
    let last = wait_fires(&pool, "last", 1).await?;
    assert_eq!(last[0].1["n"], 3, "the burst's last event");

    // Another user's burst meanwhile is its own; a second burst of ann is its own run.
    clock.advance(seconds(10));
    event("bob").await?;
    event("ann").await?;
    clock.advance(seconds(6));
    let made = wait_fires(&pool, "every", 3).await?;
    let mut bursts: Vec<Vec<i64>> = made[1..].iter().map(|(_, p)| ns(p)).collect();
    bursts.sort();
    assert_eq!(bursts, [vec![4], vec![5]]);

    // An endless burst (an event every 4 s): the timeout fires it 30 s after its first event.
    let first = n.get();
    for _ in 0..8 {
        event("cy").await?;
        clock.advance(seconds(4));
    }
    // 32 s after the first: fired at 30 s with the eight events before it.
    let made = wait_fires(&pool, "every", 4).await?;
    assert_eq!(ns(&made[3].1), (first..first + 8).collect::<Vec<_>>());
    event("cy").await?; // the burst goes on: a new run
    clock.advance(seconds(5));
    let made = wait_fires(&pool, "every", 5).await?;
    assert_eq!(ns(&made[4].1), [first + 8]);

    // A burst open under keep LAST when the spec changes to keep ALL fires as it was kept (its
    // last event), when the next event comes; that event opens a burst of the new kind.
    clock.advance(seconds(10));
    event("dee").await?;
    let before = fires(&pool, "last").await?.len();
    admin
        .update_activity(taskfactory_proto::v1::UpdateActivityRequest {
            id: "last".to_owned(),
            spec: Some(taskfactory_model::spec::spec_from_yaml(
                "name: last\ntrigger: {event: {subject: 'events.profile.*'}}\nflow: {debounce: {key: event.user, period: 5s, keep: ALL}}\ntasks: [{name: t, type: noop}]",
            )?),
        })
        .await?;
    wait_for(
        "the trigger sees keep ALL",
        Duration::from_secs(10),
        || async {
            let version: i32 = sqlx::query_scalar(
                "SELECT current_version FROM activities WHERE name = 'last' AND deleted_at IS NULL",
            )
            .fetch_one(&pool)
            .await?;
            Ok((version == 2).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    event("dee").await?;
    let changed = wait_fires(&pool, "last", before + 1).await?;
    assert_eq!(
        changed[before].1["user"], "dee",
        "the old burst's last event"
    );
    clock.advance(seconds(6));
    let changed = wait_fires(&pool, "last", before + 2).await?;
    assert_eq!(
        ns(&changed[before + 1].1),
        [n.get() - 1],
        "the new burst, kept whole"
    );

    // Every event decided once at each activity, with the run its burst made.
    let every = decisions(&mut admin, of_activity("every")).await?;
    assert_eq!(every.len(), usize::try_from(n.get())?);
    assert!(every.iter().all(|d| d.decision() == Decision::Debounced));
    let runs: std::collections::BTreeSet<&str> = every.iter().map(|d| d.run_id.as_str()).collect();
    assert_eq!(runs.len(), 6, "one run per burst");
    assert!(
        every[0].reason.contains("quiet for 5s") && every[0].reason.contains("30s"),
        "{}",
        every[0].reason
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_a_hundred_makes_eleven_runs_of_1050_events() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let pool = env.db.pool().await?;
    create(
        &mut admin,
        "name: rows\ntrigger: {event: {subject: 'events.rows.*'}}\nflow: {batch: {key: event.table, maxSize: 100, timeout: 2s}}\ntasks: [{name: load, type: noop, params: {rows: '{{ event.size }}'}}]",
    )
    .await?;
    const EVENTS: i64 = 1050;
    let burst = (0..EVENTS)
        .map(|n| {
            let body = serde_json::json!({"table": "orders", "n": n});
            (body.to_string().into_bytes(), format!("r{n}"))
        })
        .collect();
    publish_burst(&js, "events.rows.changed", burst).await?;
    wait_for("11 runs succeeded", Duration::from_secs(60), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE activity_name = 'rows' AND status = 'SUCCEEDED'",
        )
        .fetch_one(&pool)
        .await?;
        Ok((done >= 11).then_some(()))
    })
    .await?;
    let runs: Vec<(serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT payload, fired_at FROM runs WHERE activity_name = 'rows' ORDER BY fired_at",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(runs.len(), 11);
    let mut seen: Vec<i64> = Vec::new();
    let mut sizes = Vec::new();
    for (payload, _) in &runs {
        let batch = ns(payload);
        assert!(batch.windows(2).all(|w| w[0] < w[1]), "in order: {batch:?}");
        assert_eq!(payload["size"].as_i64(), Some(i64::try_from(batch.len())?));
        sizes.push(batch.len());
        seen.extend(batch);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "every event once");
    sizes.sort_unstable();
    assert_eq!(sizes[0], 50);
    assert!(sizes[1..].iter().all(|s| *s == 100), "{sizes:?}");
    // The partial batch fired at its timeout, two seconds after its first event came.
    let partial = runs.iter().find(|(p, _)| ns(p).len() == 50).unwrap();
    let first = ns(&partial.0)[0];
    let came: DateTime<Utc> =
        sqlx::query_scalar("SELECT decided_at FROM event_decisions WHERE msg_id = $1")
            .bind(format!("r{first}"))
            .fetch_one(&pool)
            .await?;
    let waited = partial.1 - came;
    assert!(
        waited >= chrono::TimeDelta::milliseconds(1_900)
            && waited < chrono::TimeDelta::milliseconds(8_000),
        "the partial batch fired {waited} after its first event"
    );
    // Each event BATCHED once, with the run its batch made.
    let made = decisions(&mut admin, of_activity("rows")).await?;
    assert_eq!(made.len(), usize::try_from(EVENTS)?);
    let mut per_run: BTreeMap<String, usize> = BTreeMap::new();
    for d in &made {
        assert_eq!(d.decision(), Decision::Batched, "{d:?}");
        assert_eq!(d.flow_key, "orders");
        *per_run.entry(d.run_id.clone()).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_run.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, sizes, "each event names the run its batch made");
    Ok(())
}

/// Keys with line breaks (a `dedupeKey`, a batch's key: event data, in the message id of the
/// run's trigger, which a NATS header cannot carry as is) fire like any other, each once, and
/// keys that differ only in how a line break is written stay apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_with_line_breaks_fire_once_each() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let pool = env.db.pool().await?;
    create(
        &mut admin,
        "name: keyed\ntrigger: {event: {subject: 'events.lines.*', dedupeKey: '{{ event.id }}'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: batched\ntrigger: {event: {subject: 'events.lines.*'}}\nflow: {batch: {key: event.id, maxSize: 1, timeout: 1s}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    for (n, id) in ["a\r\nb", "a\\r\\nb", "c\n"].into_iter().enumerate() {
        let body = serde_json::json!({"id": id});
        publish_event(
            &js,
            "events.lines.x",
            body.to_string().into_bytes(),
            Some(&format!("m{n}")),
        )
        .await?;
    }
    for activity in ["keyed", "batched"] {
        wait_succeeded(&pool, activity, 3, Duration::from_secs(30)).await?;
    }
    // And the services go on: another event fires.
    publish_event(
        &js,
        "events.lines.x",
        br#"{"id": "plain"}"#.to_vec(),
        Some("m9"),
    )
    .await?;
    wait_succeeded(&pool, "keyed", 4, Duration::from_secs(30)).await?;
    Ok(())
}

/// A batch under a concurrency key and a throttle: events whose runs would go under other keys are
/// gathered apart, each batch's run is admitted under its events' keys (one at a time per
/// customer) and at the throttle's rate, and an event whose concurrency key fails is a KEY_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_gathered_per_concurrency_key_and_run_under_it() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let pool = env.db.pool().await?;
    let server = RecordingServer::start(Duration::from_millis(1000)).await?;
    create(
        &mut admin,
        &format!(
            "name: loads\ntrigger: {{event: {{subject: 'events.rows.*'}}}}\nflow: {{batch: {{key: event.table, maxSize: 10, timeout: 1s}}, concurrency: {{key: event.customer, limit: 1}}, throttle: {{limit: 100, period: 1s}}, priority: event.rank}}\ntasks: [{{name: load, type: http, params: {{url: '{}', body: {{size: '{{{{ event.size }}}}'}}}}}}]",
            server.url
        ),
    )
    .await?;
    const EVENTS: i64 = 60;
    let mut burst: Vec<(Vec<u8>, String)> = (0..EVENTS)
        .map(|n| {
            let customer = if n % 2 == 0 { "x" } else { "y" };
            let body =
                serde_json::json!({"table": "orders", "customer": customer, "n": n, "rank": 1});
            (body.to_string().into_bytes(), format!("r{n}"))
        })
        .collect();
    burst.push((
        br#"{"table": "orders", "n": 99, "rank": 1}"#.to_vec(),
        "nokey".to_owned(),
    ));
    publish_burst(&js, "events.rows.changed", burst).await?;
    // While a customer's next batch waits for its first to finish, its events say so.
    wait_for(
        "a batched event whose run waits",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let made = decisions(&mut admin, of_activity("loads")).await?;
                Ok(made.into_iter().find(|d| {
                    d.decision() == Decision::Batched
                        && d.reason
                            .contains("its run waits for room under flow.concurrency")
                }))
            }
        },
    )
    .await?;
    wait_succeeded(&pool, "loads", 6, Duration::from_secs(60)).await?;
    type RunRow = (
        serde_json::Value,
        Option<String>,
        DateTime<Utc>,
        DateTime<Utc>,
    );
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT payload, flow_key, started_at, finished_at FROM runs WHERE activity_name = 'loads'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(runs.len(), 6, "three batches of ten per customer");
    let mut seen = Vec::new();
    let mut spans = Vec::new();
    for (payload, flow_key, started, finished) in &runs {
        let batch = ns(payload);
        assert_eq!(batch.len(), 10, "{payload}");
        assert_eq!(payload["key"], "orders", "the run shows the batch's key");
        let customer = flow_key.clone().unwrap_or_default();
        let of_customer = if customer == "x" { 0 } else { 1 };
        assert!(
            batch.iter().all(|n| n % 2 == of_customer),
            "a batch holds one customer's events: {customer} {batch:?}"
        );
        seen.extend(batch);
        spans.push((customer, *started, *finished));
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "every event once");
    for (customer, runs) in per_key(spans) {
        assert_eq!(
            most_at_once(&runs),
            1,
            "customer {customer}: one run at a time"
        );
    }
    let made = decisions(&mut admin, of_activity("loads")).await?;
    assert_eq!(made.len(), usize::try_from(EVENTS)? + 1);
    let failed: Vec<_> = made
        .iter()
        .filter(|d| d.decision() == Decision::KeyError)
        .collect();
    assert_eq!(failed.len(), 1, "{made:#?}");
    assert!(
        failed[0].reason.contains("flow.concurrency.key")
            && failed[0].reason.contains("event.customer is undefined"),
        "{}",
        failed[0].reason
    );
    assert!(
        made.iter()
            .filter(|d| d.decision() == Decision::Batched)
            .all(|d| d.flow_key == "orders")
    );
    Ok(())
}

/// SIGKILL the trigger and the orchestrator at once while a batch is half full, a burst is open,
/// runs wait under their concurrency keys and tasks are held by theirs, and while more events
/// come: every event is decided once at each activity, lands in exactly one run, no run is
/// doubled, every queued event's task ran once, and no key ever ran more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_state_survives_killing_the_trigger_and_the_orchestrator_at_once() -> anyhow::Result<()>
{
    // What the killed orchestrator held comes back within 5 s.
    let env = TestEnv::new(EnvOptions {
        orchestrator_ack_wait: Duration::from_secs(5),
        ..EnvOptions::default()
    })
    .await?;
    let server = RecordingServer::start(Duration::from_millis(30)).await?;
    let all = [Service::Trigger, Service::Orchestrator, Service::Executor];
    let mut running = Vec::new();
    for service in all {
        running.push(Some(env.spawn_process(service, &[])?));
    }
    env.wait_ready(&all).await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let pool = env.db.pool().await?;
    create(
        &mut admin,
        "name: batched\ntrigger: {event: {subject: 'events.k.*'}}\nflow: {batch: {key: event.k, maxSize: 40, timeout: 3s}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: debounced\ntrigger: {event: {subject: 'events.k.*'}}\nflow: {debounce: {key: event.k, period: 1s, timeout: 4s, keep: ALL}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    // One run per key at once (three keys), and two of their calls at once across them.
    create(
        &mut admin,
        &format!(
            "name: queued\ntrigger: {{event: {{subject: 'events.k.*'}}}}\nflow: {{concurrency: {{key: event.k, limit: 1}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{n: '{{{{ event.n }}}}'}}}}, concurrency: {{limit: 2}}}}]",
            server.url
        ),
    )
    .await?;
    const EVENTS: i64 = 300;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                let body = serde_json::json!({"k": n % 3, "n": n});
                publish_event(
                    &js,
                    "events.k.x",
                    body.to_string().into_bytes(),
                    Some(&format!("e{n}")),
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            anyhow::Ok(())
        })
    };
    wait_for(
        "a half-full batch, waiting runs and held tasks",
        Duration::from_secs(30),
        || async {
            let (open, waiting, held): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM event_buffer_items), \
                     (SELECT count(*) FROM runs WHERE waiting), \
                     (SELECT count(*) FROM tasks WHERE held)",
            )
            .fetch_one(&pool)
            .await?;
            Ok((open >= 30 && waiting >= 3 && held >= 1).then_some(()))
        },
    )
    .await?;
    for process in running.iter_mut().take(2) {
        if let Some(process) = process.take() {
            process.kill();
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running[0] = Some(env.spawn_process(Service::Trigger, &[])?);
    running[1] = Some(env.spawn_process(Service::Orchestrator, &[])?);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    publisher.await??;
    for (activity, decision) in [("batched", "BATCHED"), ("debounced", "DEBOUNCED")] {
        wait_decided(&pool, activity, decision, EVENTS).await?;
        wait_for(
            &format!("every event of {activity} in a finished run"),
            Duration::from_secs(60),
            || async {
                let open: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM event_buffers b JOIN activities a ON a.id = b.activity_id WHERE a.name = $1")
                        .bind(activity)
                        .fetch_one(&pool)
                        .await?;
                let pending: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM runs WHERE activity_name = $1 AND status <> 'SUCCEEDED'",
                )
                .bind(activity)
                .fetch_one(&pool)
                .await?;
                let fired: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM fires WHERE activity_name = $1",
                )
                .bind(activity)
                .fetch_one(&pool)
                .await?;
                let ran: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM runs WHERE activity_name = $1",
                )
                .bind(activity)
                .fetch_one(&pool)
                .await?;
                Ok((open == 0 && pending == 0 && fired == ran).then_some(()))
            },
        )
        .await?;
        let made = one_decision_each(&mut admin, activity, EVENTS).await?;
        let payloads: Vec<(String, serde_json::Value)> =
            sqlx::query_as("SELECT id::text, payload FROM runs WHERE activity_name = $1")
                .bind(activity)
                .fetch_all(&pool)
                .await?;
        let mut seen: Vec<i64> = payloads.iter().flat_map(|(_, p)| ns(p)).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..EVENTS).collect::<Vec<_>>(),
            "{activity}: every event in exactly one run"
        );
        // Each event names the run that holds it.
        let holds: BTreeMap<String, Vec<i64>> =
            payloads.iter().map(|(id, p)| (id.clone(), ns(p))).collect();
        for d in &made {
            assert_eq!(d.decision() == Decision::Batched, activity == "batched");
            let n: i64 = d.event_id.trim_start_matches('e').parse()?;
            assert!(
                holds.get(&d.run_id).is_some_and(|batch| batch.contains(&n)),
                "{activity}: event {n} names run {} that does not hold it",
                d.run_id
            );
        }
    }
    wait_succeeded(&pool, "queued", EVENTS, Duration::from_secs(180)).await?;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE activity_name = 'queued'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(runs, EVENTS, "queued: no run doubled");
    let made = one_decision_each(&mut admin, "queued", EVENTS).await?;
    assert!(made.iter().all(|d| d.decision() == Decision::Fired));
    // Every task called once (by task id), for every event.
    let counts = server.counts();
    assert_eq!(
        counts.len(),
        usize::try_from(EVENTS)?,
        "every event's task ran"
    );
    assert!(
        counts.values().all(|n| *n == 1),
        "a task ran twice: {counts:?}"
    );
    assert_limits_held(&pool, "queued", &server, 2, 1).await?;
    Ok(())
}

//! Group commit (issue 13): fires, runs, results and marks of many messages are written together,
//! and that changes none of the guarantees. A bad item in a batch is that item's alone (the
//! good ones commit, each bad one is dead-lettered once); a finished run of an activity that
//! buffers nothing takes no lock and no transaction of its own; a service killed in the middle
//! of a burst loses nothing and runs nothing twice.

use std::time::Duration;

use sqlx::Connection as _;

use futures::future::join_all;
use prost::Message as _;
use serde_json::json;
use taskfactory_model::subjects;
use taskfactory_model::values::json_to_value;
use taskfactory_proto::v1::{TaskResult, TaskStatus, TriggerEvent, TriggerSource};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::poison::{redelivered, refuse};
use crate::support::{create, dead_letters, publish, publish_event, settled};

/// Runs of the database by status.
async fn runs_by_status(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT status, count(*) FROM runs GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?,
    )
}

/// Good events, events whose fire the database refuses, forged triggers and results for tasks
/// that do not exist, all published at once so that each batch of each stage mixes them: every
/// good one makes its run, and each bad one is dead-lettered once and delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_mixing_good_and_bad_messages_commits_the_good_and_dead_letters_each_bad_one_once()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 2,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: mixed\ntrigger: {event: {subject: 'events.mixed.*', dedupeKey: '{{ event.key }}'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    refuse(&env, "fires", "dedupe_key NOT LIKE 'refused-%'").await?;
    let good = 80;
    let bad = 4;
    let mut sends = Vec::new();
    for n in 0..good {
        let events = js.clone();
        sends.push(tokio::spawn(async move {
            let js = events;
            let body = serde_json::to_vec(&json!({ "key": format!("good-{n}") }))?;
            publish_event(&js, "events.mixed.x", body, Some(&format!("good-{n}"))).await?;
            anyhow::Ok(())
        }));
        if n % (good / bad) != 0 {
            continue;
        }
        let k = n / (good / bad);
        let js = js.clone();
        sends.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({ "key": format!("refused-{k}") }))?;
            publish_event(&js, "events.mixed.x", body, Some(&format!("refused-{k}"))).await?;
            let forged = TriggerEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                activity_id: uuid::Uuid::new_v4().to_string(),
                activity_version: 1,
                source: TriggerSource::Manual as i32,
                dedupe_key: format!("forged-{k}"),
                payload: Some(json_to_value(&json!({}))),
                activity_name: "ghost".to_owned(),
                ..Default::default()
            };
            publish(
                &js,
                "triggers.ghost".to_owned(),
                &format!("forged-{k}"),
                forged.encode_to_vec(),
            )
            .await?;
            let result = TaskResult {
                task_id: uuid::Uuid::new_v4().to_string(),
                run_id: uuid::Uuid::new_v4().to_string(),
                activity_id: uuid::Uuid::new_v4().to_string(),
                r#type: "noop".to_owned(),
                attempt: 1,
                status: TaskStatus::Succeeded as i32,
                executor: "nobody".to_owned(),
                ..Default::default()
            };
            publish(
                &js,
                format!("results.mixed.{}", result.run_id),
                &format!("unknown-{k}"),
                result.encode_to_vec(),
            )
            .await?;
            anyhow::Ok(())
        }));
    }
    for sent in join_all(sends).await {
        sent??;
    }
    let pool = env.db.pool().await?;
    wait_for("every good run", Duration::from_secs(60), || async {
        let runs = runs_by_status(&pool).await?;
        Ok((runs == [("SUCCEEDED".to_owned(), good as i64)]).then_some(()))
    })
    .await?;
    for (subject, stream, durable) in [
        (
            subjects::EVENTS_DLQ_SUBJECT,
            subjects::EVENTS_STREAM,
            subjects::TRIGGER_EVENTS_CONSUMER,
        ),
        (
            subjects::TRIGGERS_DLQ_SUBJECT,
            subjects::TRIGGERS_STREAM,
            subjects::ORCHESTRATOR_TRIGGERS_CONSUMER,
        ),
        (
            subjects::RESULTS_DLQ_SUBJECT,
            subjects::RESULTS_STREAM,
            subjects::ORCHESTRATOR_RESULTS_CONSUMER,
        ),
    ] {
        settled(&js, stream, durable).await?;
        let letters = wait_for(subject, Duration::from_secs(20), || async {
            let letters = dead_letters(&js, subject).await?;
            Ok((letters.len() >= bad).then_some(letters))
        })
        .await?;
        assert_eq!(letters.len(), bad, "each dead-lettered once: {letters:?}");
        assert_eq!(
            redelivered(&js, stream, durable).await?,
            0,
            "nothing on {stream} was delivered again"
        );
    }
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
        .fetch_one(&pool)
        .await?;
    assert_eq!(fires, good as i64, "the good events fired, and only they");
    let unknown = dead_letters(&js, subjects::RESULTS_DLQ_SUBJECT).await?;
    assert!(
        unknown.iter().all(|l| l.error.contains("no such task")),
        "{unknown:?}"
    );
    Ok(())
}

/// Each finished run looked, in a transaction of its own under its activity's lock, for a
/// buffered run to start, and rolled it back when there was none: one rollback per run, and every
/// run of an activity queued on one lock. Now the transaction that finishes a run knows whether
/// any wait behind it; a run of an activity that buffers nothing ends without either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_nothing_waiting_behind_it_finishes_without_a_transaction_of_its_own()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: plain\ntrigger: {event: {subject: 'events.plain.*'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let runs = 30;
    for n in 0..runs {
        publish_event(
            &js,
            "events.plain.x",
            b"{}".to_vec(),
            Some(&format!("e-{n}")),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    wait_for("the runs", Duration::from_secs(60), || async {
        let finished = runs_by_status(&pool).await?;
        Ok((finished == [("SUCCEEDED".to_owned(), runs)]).then_some(()))
    })
    .await?;
    pool.close().await;
    // The services' connections report their statistics when they close.
    for service in services {
        service.stop().await?;
    }
    let mut connection = sqlx::PgConnection::connect(&env.db.url()).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let rollbacks = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut connection)
            .await?;
        let (rollbacks, others): (i64, i64) = sqlx::query_as(
            "SELECT xact_rollback, (SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()) \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut connection)
        .await?;
        if others == 0 {
            break rollbacks;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the services' connections did not close"
        );
    };
    assert!(
        rollbacks < runs / 3,
        "{rollbacks} transactions rolled back for {runs} runs"
    );
    Ok(())
}

/// The trigger, the orchestrator and the executor, each killed (SIGKILL) once in the middle of
/// a burst and started again: every event makes exactly one run, every task ends `SUCCEEDED`, and
/// no task has two final attempts, counted in Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_killed_mid_burst_loses_no_run_and_runs_no_task_twice() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let all = [Service::Trigger, Service::Orchestrator, Service::Executor];
    let mut running = Vec::new();
    for service in all {
        running.push(Some(env.spawn_process(service, &[])?));
    }
    env.wait_ready(&all).await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: burst\ntrigger: {event: {subject: 'events.burst.*'}}\ntasks: [{name: t, type: noop, forEach: 'range(3)', params: {i: '{{ item }}'}}]\n",
    )
    .await?;
    drop(admin);
    let js = env.js().await?;
    let events: i64 = 600;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for n in 0..events {
                publish_event(
                    &js,
                    "events.burst.x",
                    b"{}".to_vec(),
                    Some(&format!("b-{n}")),
                )
                .await?;
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    let pool = env.db.pool().await?;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { anyhow::Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await?) }
    };
    // Each service in turn, once the burst has reached it.
    for (index, (service, sql, at)) in [
        (Service::Trigger, "SELECT count(*) FROM fires", events / 6),
        (
            Service::Orchestrator,
            "SELECT count(*) FROM runs",
            events / 3,
        ),
        (
            Service::Executor,
            "SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'",
            events,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        wait_for(&format!("{sql} ≥ {at}"), Duration::from_secs(120), || {
            let count = count(sql);
            async move { Ok((count.await? >= at).then_some(())) }
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
    wait_for("every run finished", Duration::from_secs(180), || async {
        let runs = runs_by_status(&pool).await?;
        Ok((runs == [("SUCCEEDED".to_owned(), events)]).then_some(()))
    })
    .await?;
    assert_eq!(count("SELECT count(*) FROM fires").await?, events);
    assert_eq!(
        count("SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'").await?,
        events * 3
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM (SELECT task_id FROM task_attempts WHERE status <> 'RUNNING' \
             GROUP BY task_id HAVING count(*) > 1) twice"
        )
        .await?,
        0,
        "a task ended twice"
    );
    Ok(())
}

/// Counts what a handler has in hand: the most bytes at once while several messages were, the
/// most messages at once, and each message it took.
struct Holding {
    now: std::sync::Mutex<(usize, usize)>,
    most_of_several: std::sync::atomic::AtomicUsize,
    most_messages: std::sync::atomic::AtomicUsize,
    taken: std::sync::Mutex<Vec<String>>,
    /// Deliveries after the first.
    redelivered: std::sync::atomic::AtomicUsize,
}

/// Never returned.
#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl taskfactory_runtime::messaging::Unfinished for Never {
    fn then(&self) -> taskfactory_runtime::messaging::Then {
        taskfactory_runtime::messaging::Then::Backoff
    }
}

impl taskfactory_runtime::messaging::Handler for Holding {
    type Error = Never;

    async fn handle(&self, message: &async_nats::jetstream::Message) -> Result<(), Never> {
        use std::sync::atomic::Ordering;
        let bytes = message.payload.len();
        if message.info().map_or(1, |info| info.delivered) > 1 {
            self.redelivered.fetch_add(1, Ordering::SeqCst);
        }
        {
            let mut now = self.now.lock().unwrap();
            now.0 += bytes;
            now.1 += 1;
            if now.1 > 1 {
                self.most_of_several.fetch_max(now.0, Ordering::SeqCst);
            }
            self.most_messages.fetch_max(now.1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        {
            let mut now = self.now.lock().unwrap();
            now.0 -= bytes;
            now.1 -= 1;
        }
        self.taken.lock().unwrap().push(message.subject.to_string());
        Ok(())
    }
}

/// With many handler slots (so that many small messages are in hand together, and their writes
/// batch), a consumer still holds no more message bytes than its bound: each pull asks for the
/// room left. One message larger than the bound is taken alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_holds_no_more_message_bytes_than_its_bound_however_many_slots_it_has()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    hold_within_the_bound(&env, 1, Some(15)).await
}

/// On a stream replicated on three servers, the server delivers a pull's messages only once
/// their delivery is replicated, but says at once that the pull is over when its bytes are used
/// up: a consumer that stopped listening then lost those messages until `ack_wait` ran out
/// (here 60 s), and the services could not bound their pulls by bytes. Every message is taken
/// at once, and once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_byte_bounded_consumer_takes_every_message_of_a_replicated_stream_at_once()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        nats_servers: 3,
        stream_replicas: 3,
        ..EnvOptions::default()
    })
    .await?;
    hold_within_the_bound(&env, 3, None).await
}

/// Publishes 30 messages of 100 KiB (one of 600 KiB at `large`) to a stream of `replicas`, and
/// consumes them with 64 slots and a bound of 300 KiB, an `ack_wait` of 60 s: each is taken once,
/// with no redelivery, within 30 s, and never more than the bound is in hand.
async fn hold_within_the_bound(
    env: &TestEnv,
    replicas: usize,
    large: Option<usize>,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use taskfactory_runtime::messaging::{self, ConsumerSpec};
    let js = env.nats_client().await.map(async_nats::jetstream::new)?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HOLDING".to_owned(),
        subjects: vec!["holding.>".to_owned()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let small = 100 * 1024;
    let bound = 300 * 1024;
    let mut sent = Vec::new();
    for n in 0..30 {
        let size = if Some(n) == large { 600 * 1024 } else { small };
        let subject = format!("holding.{n}");
        js.publish(subject.clone(), vec![b'x'; size].into())
            .await?
            .await?;
        sent.push(subject);
    }
    let holding = Arc::new(Holding {
        now: Default::default(),
        most_of_several: Default::default(),
        most_messages: Default::default(),
        taken: Default::default(),
        redelivered: Default::default(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let consuming = tokio::spawn(messaging::consume(
        js.clone(),
        ConsumerSpec {
            stream: "HOLDING",
            durable: "holding".to_owned(),
            filter_subject: "holding.>".to_owned(),
            concurrency: 64,
            bytes_in_hand: bound,
            ack_wait: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
            max_deliveries: 5,
            dead_letters: |_| "holding.dlq".to_owned(),
            kind: "test",
        },
        shutdown.clone(),
        holding.clone(),
    ));
    wait_for("every message", Duration::from_secs(30), || async {
        Ok((holding.taken.lock().unwrap().len() >= sent.len()).then_some(()))
    })
    .await?;
    shutdown.cancel();
    consuming.await?;
    let mut taken = holding.taken.lock().unwrap().clone();
    taken.sort();
    sent.sort();
    assert_eq!(taken, sent, "each message taken once");
    let redelivered = holding
        .redelivered
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(redelivered, 0, "messages delivered more than once");
    let most = holding
        .most_of_several
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most <= bound,
        "{most} bytes of several messages in hand at once, over the bound of {bound}"
    );
    let together = holding
        .most_messages
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        together >= 2,
        "small messages were in hand together ({together} at most)"
    );
    Ok(())
}

/// The admin API has connections of its own: with the scheduler's pool exhausted (its one
/// connection waiting on a lock held here), definitions are still read and created at once. It
/// used to share that pool, so every admin call waited behind the scheduler until the pool gave
/// up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_calls_do_not_wait_behind_the_schedulers_connections() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger =
        env.spawn_process(Service::Trigger, &[("TASKFACTORY_DATABASE_POOL_SIZE", "1")])?;
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: every-second\ntrigger: {schedule: {cron: ['* * * * * *'], timezone: UTC}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let pool = env.db.pool().await?;
    wait_for("the schedule fires", Duration::from_secs(20), || async {
        let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
            .fetch_one(&pool)
            .await?;
        Ok((fires > 0).then_some(()))
    })
    .await?;
    // The scheduler's next fire waits for this lock on the fence, holding the pool's only
    // connection.
    let mut holder = sqlx::PgConnection::connect(&env.db.url()).await?;
    let mut held = holder.begin().await?;
    sqlx::query("SELECT term FROM scheduler_fence FOR UPDATE")
        .execute(&mut *held)
        .await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%scheduler_fence%'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(waiting >= 1, "the scheduler is not waiting on the fence");

    let calls = async {
        admin
            .list_activities(taskfactory_proto::v1::ListActivitiesRequest::default())
            .await?;
        create(
            &mut admin,
            "name: made-meanwhile\ntrigger: {manual: {}}\ntasks: [{name: t, type: noop}]\n",
        )
        .await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), calls)
        .await
        .map_err(|_| anyhow::anyhow!("admin calls waited behind the scheduler"))??;
    held.rollback().await?;
    Ok(())
}

/// The orchestrator's batched statements answer each item of a batch for itself, in order:
/// runs written together (a trigger delivered twice in one batch, a run already recorded, a
/// dedupe key another run holds) and trigger messages looked up together (the ledger's fire,
/// someone else's bytes under its key, a key the ledger does not hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_written_and_triggers_looked_up_together_each_get_their_own_answer()
-> anyhow::Result<()> {
    use taskfactory_model::ids::{ActivityId, RunId};
    use taskfactory_orchestrator::store::{self, Ledger, NewRun, TriggerKey};
    use taskfactory_proto::v1::RunStatus;
    let db = taskfactory_tests::TestDb::create().await?;
    let pool = db.migrated_pool().await?;
    let activity = ActivityId(uuid::Uuid::new_v4());
    sqlx::query(
        "INSERT INTO activities (id, name, current_version, enabled, trigger_kind, activated_at) \
         VALUES ($1, 'together', 1, true, 'event', now())",
    )
    .bind(activity.0)
    .execute(&pool)
    .await?;
    let run = |key: &str, id: RunId| NewRun {
        id,
        activity_id: activity,
        activity_name: "together".to_owned(),
        activity_version: 1,
        event_id: uuid::Uuid::new_v4(),
        source: "event".to_owned(),
        dedupe_key: key.to_owned(),
        scheduled_for: None,
        fired_at: chrono::Utc::now(),
        subject: format!("events.together.{key}"),
        payload: Some(json!({"key": key})),
        status: RunStatus::RunRunning,
        context: json!({}),
        evaluation: json!({}),
        error: String::new(),
        trace_id: String::new(),
        traceparent: String::new(),
    };
    let derived = |key: &str| RunId::derive(activity, key);
    let earlier = run("earlier", derived("earlier"));
    assert_eq!(store::insert_runs(&pool, &[(&earlier, &[])]).await?, [true]);

    let a = run("a", derived("a"));
    let b = run("b", derived("b"));
    let twice = run("a", derived("a"));
    // Another id under b's dedupe key: the key is taken, so it is not written.
    let foreign = run("b", RunId(uuid::Uuid::new_v4()));
    let again = run("earlier", derived("earlier"));
    let written =
        store::insert_runs(&pool, &[(&b, &[]), (&a, &[]), (&twice, &[]), (&again, &[])]).await?;
    assert_eq!(written, [true, true, false, false]);
    assert_eq!(
        store::insert_runs(&pool, &[(&foreign, &[])]).await?,
        [false]
    );
    let keys: Vec<(String, uuid::Uuid)> =
        sqlx::query_as("SELECT dedupe_key, id FROM runs ORDER BY dedupe_key")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        keys,
        [
            ("a".to_owned(), derived("a").0),
            ("b".to_owned(), derived("b").0),
            ("earlier".to_owned(), derived("earlier").0),
        ]
    );

    // The ledger holds fires for a and for c (which has no run yet).
    for key in ["a", "c"] {
        sqlx::query(
            "INSERT INTO fires (id, activity_id, activity_name, activity_version, source, \
                 dedupe_key, fired_at, event) \
             VALUES ($1, $2, 'together', 1, 'event', $3, now(), $4)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(activity.0)
        .bind(key)
        .bind(format!("fire {key}").into_bytes())
        .execute(&pool)
        .await?;
    }
    let key = |key: &str, message: &str| TriggerKey {
        activity,
        dedupe_key: key.to_owned(),
        run: derived(key),
        message: bytes::Bytes::from(message.to_owned()),
    };
    let looked_up = store::trigger_states(
        &pool,
        &[
            key("c", "fire c"),
            key("a", "fire a"),
            key("a", "someone else's"),
            key("b", "fire b"),
            key("a", "fire a"),
        ],
    )
    .await?;
    let seen: Vec<(Ledger, Option<RunStatus>)> = looked_up
        .iter()
        .map(|(ledger, run)| (*ledger, run.as_ref().map(|r| r.status)))
        .collect();
    assert_eq!(
        seen,
        [
            (Ledger::Recorded, None),
            (Ledger::Recorded, Some(RunStatus::RunRunning)),
            (Ledger::Differs, Some(RunStatus::RunRunning)),
            (Ledger::Missing, Some(RunStatus::RunRunning)),
            (Ledger::Recorded, Some(RunStatus::RunRunning)),
        ]
    );

    // Through the group-commit reader, at once: each caller hears of its own.
    let lookups = store::TriggerLookups::start(pool.clone(), 2);
    let answers = join_all((0..64).map(|i| {
        let lookups = lookups.clone();
        let (k, message) = match i % 3 {
            0 => ("a", "fire a"),
            1 => ("a", "forged"),
            _ => ("c", "fire c"),
        };
        let k = key(k, message);
        async move {
            lookups
                .get(k)
                .await
                .map(|(ledger, run)| (ledger, run.is_some()))
        }
    }))
    .await;
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = match i % 3 {
            0 => (Ledger::Recorded, true),
            1 => (Ledger::Differs, true),
            _ => (Ledger::Recorded, false),
        };
        assert_eq!(answer?, expected, "lookup {i}");
    }
    Ok(())
}

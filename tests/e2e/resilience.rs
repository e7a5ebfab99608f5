//! Crashes, signals and restarts: nothing lost, nothing done twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_model::spec::timestamp_to_chrono;
use taskfactory_proto::v1::{RunStatus, TaskStatus, TriggerActivityRequest};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{RecordingServer, create, finished_run, runs, settled, tasks, wait_bucket};

fn fan_out_spec(name: &str, url: &str, count: u32) -> String {
    format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ntasks: [{{name: work, type: http, forEach: 'range({count})', params: {{url: '{url}', body: {{n: '{{{{ item }}}}'}}}}}}]"
    )
}

async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orchestrator_killed_mid_spawn_loses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        orchestrator_ack_wait: Duration::from_secs(2),
        ..Default::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    // One publish at a time makes the spawn long enough to be killed in the middle of it.
    let slow_spawn = [("TASKFACTORY_PUBLISH_WINDOW", "1")];
    let orchestrator = env.spawn_process(Service::Orchestrator, &slow_spawn)?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    let url = server.url.clone();
    // More tasks than the resumed spawn reads at once (500): it goes on page after page.
    const TASKS: u32 = 1200;
    create(&mut admin, &fan_out_spec("fan-out", &url, TASKS)).await?;

    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "fan-out".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // No executor yet: the task stream shows how far the spawn got. Poll tightly and kill as
    // soon as the spawn is under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stream_messages(&js, "FACTORY_TASKS").await? < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the spawn never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    orchestrator.kill();
    let published_before_kill = stream_messages(&js, "FACTORY_TASKS").await?;
    assert!(
        (10..700).contains(&published_before_kill),
        "the kill landed mid-spawn ({published_before_kill} of {TASKS} published)"
    );

    let _orchestrator = env.spawn_process(Service::Orchestrator, &slow_spawn)?;
    let _executor = env.start(Service::Executor);
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(90)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.tasks_spawned, TASKS);
    assert_eq!(run.tasks_succeeded, TASKS);

    let run_tasks = tasks(&mut admin, &run.id).await?;
    assert_eq!(run_tasks.len(), TASKS as usize);
    assert!(
        run_tasks
            .iter()
            .all(|t| t.status() == TaskStatus::Succeeded && t.attempts == 1)
    );
    let calls = server.counts();
    assert_eq!(calls.len(), TASKS as usize, "every task ran");
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "tasks ran more than once: {twice:?}");
    for task in &run_tasks {
        assert_eq!(calls.get(&task.id), Some(&1));
    }
    assert_eq!(runs(&mut admin, "fan-out").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_stop_cleanly_on_sigterm_and_lose_nothing_across_a_restart() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let start = |env: &TestEnv| -> anyhow::Result<Vec<taskfactory_tests::Running>> {
        Ok(vec![
            env.spawn_process(Service::Trigger, &[])?,
            env.spawn_process(Service::Orchestrator, &[])?,
            env.spawn_process(Service::Executor, &[])?,
        ])
    };
    let services = start(&env)?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let server = RecordingServer::start(Duration::from_millis(100)).await?;
    let url = server.url.clone();
    create(&mut admin, &fan_out_spec("slow-work", &url, 120)).await?;
    create(
        &mut admin,
        "name: ticker\ntrigger: {schedule: {cron: ['* * * * * *'], timezone: UTC, misfire: MISFIRE_ALL}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "slow-work".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    wait_for("work in flight", Duration::from_secs(30), || {
        let done = server.counts().len();
        async move { Ok((done >= 10).then_some(())) }
    })
    .await?;

    // SIGTERM everything at once, with work in flight: each exits 0.
    for stopped in futures::future::join_all(services.into_iter().map(|s| s.stop())).await {
        stopped?;
    }
    let done_before_restart = server.counts().len();
    assert!(
        done_before_restart < 120,
        "work was still in flight at the signal"
    );

    let _services = start(&env)?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(90)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let run_tasks = tasks(&mut admin, &run.id).await?;
    assert_eq!(run_tasks.len(), 120);
    assert!(
        run_tasks
            .iter()
            .all(|t| t.status() == TaskStatus::Succeeded)
    );
    let calls = server.counts();
    assert_eq!(calls.len(), 120, "every task ran");
    assert!(
        calls.values().all(|n| *n == 1),
        "no task ran twice: {calls:?}"
    );

    // The schedule caught up: no second is missing between the first and the newest run.
    let ticks = wait_for("ticks after the restart", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let ticks = runs(&mut admin, "ticker").await?;
            let newest = ticks
                .iter()
                .filter_map(|r| r.scheduled_for.as_ref().and_then(timestamp_to_chrono))
                .max();
            Ok(newest
                .filter(|n| *n > Utc::now() - chrono::Duration::seconds(2))
                .map(|_| ticks))
        }
    })
    .await?;
    let mut seconds: Vec<DateTime<Utc>> = ticks
        .iter()
        .filter_map(|r| r.scheduled_for.as_ref().and_then(timestamp_to_chrono))
        .collect();
    seconds.sort();
    for pair in seconds.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "no missed second: {seconds:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fire_recorded_while_nats_is_down_is_published_when_it_returns() -> anyhow::Result<()> {
    let mut env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: outbox\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]",
    )
    .await?;

    env.nats.kill();
    // The admin API still answers: the fire is recorded in Postgres, not yet published.
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "outbox".to_owned(),
            idempotency_key: "while-down".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!fired.duplicate);
    env.nats.restart()?;

    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(runs(&mut admin, "outbox").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_and_buckets_deleted_at_runtime_are_declared_again_and_nothing_acked_is_lost()
-> anyhow::Result<()> {
    use crate::support::publish_event;
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: orders\ntrigger: {event: {subject: 'events.orders.*'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    publish_event(&js, "events.orders.before", b"{}".to_vec(), Some("before")).await?;
    wait_for("the first run", Duration::from_secs(30), || async {
        let done = runs(&mut env.admin().await?, "orders").await?;
        Ok((done.len() == 1 && done[0].status() == RunStatus::RunSucceeded).then_some(()))
    })
    .await?;

    // An operator (or an accident) deletes the event and task streams and the cancelled-runs
    // bucket while everything runs.
    for stream in [
        subjects::EVENTS_STREAM,
        subjects::TASKS_STREAM,
        &format!("KV_{}", subjects::CANCELLED_RUNS_BUCKET),
    ] {
        assert!(js.delete_stream(stream).await?.success, "{stream} deleted");
    }
    // Declared again within seconds, by the services themselves.
    for stream in [
        subjects::EVENTS_STREAM.to_owned(),
        subjects::TASKS_STREAM.to_owned(),
        format!("KV_{}", subjects::CANCELLED_RUNS_BUCKET),
    ] {
        wait_for(
            &format!("{stream} declared again"),
            Duration::from_secs(20),
            || {
                let (js, stream) = (js.clone(), stream.clone());
                async move { Ok(js.get_stream(&stream).await.ok().map(drop)) }
            },
        )
        .await?;
    }
    // A publisher retries until its event is acked; every acked event makes its run.
    let events = 20;
    for n in 0..events {
        let id = format!("after-{n}");
        wait_for("an acked publish", Duration::from_secs(20), || {
            let (js, id) = (js.clone(), id.clone());
            async move {
                Ok(
                    publish_event(&js, "events.orders.after", b"{}".to_vec(), Some(&id))
                        .await
                        .ok()
                        .map(drop),
                )
            }
        })
        .await?;
    }
    wait_for(
        "a run of every acked event",
        Duration::from_secs(60),
        || async {
            let done = runs(&mut env.admin().await?, "orders").await?;
            let succeeded = done
                .iter()
                .filter(|run| run.status() == RunStatus::RunSucceeded)
                .count();
            Ok((succeeded == events + 1).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_tasks_message_that_comes_back_is_never_run_again() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(
        &mut admin,
        &format!(
            "name: once\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, forEach: 'range(5)', params: {{url: '{}'}}}}]\n",
            server.url
        ),
    )
    .await?;
    // A copy of every task message as it is published.
    let mut copies = env.nats_client().await?.subscribe("tasks.http").await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "once".to_owned(),
            idempotency_key: "k".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(server.calls().len(), 5);
    let mut messages = Vec::new();
    while messages.len() < 5 {
        let message = tokio::time::timeout(Duration::from_secs(5), copies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no copy"))?;
        messages.push(message.payload);
    }
    let pool = env.db.pool().await?;
    let history = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM task_attempts")
            .fetch_one(&pool)
            .await
    };
    let attempts_before = history().await?;

    // The messages of the finished tasks come back into the work queue (as a server that lost
    // its record of their removal brings them back), and the executor's consumer is recreated.
    let stream = js.get_stream(subjects::TASKS_STREAM).await?;
    stream
        .delete_consumer(&subjects::executor_consumer("http"))
        .await?;
    for (n, payload) in messages.into_iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("back-{n}").as_str());
        js.publish_with_headers("tasks.http", headers, payload)
            .await?
            .await?;
    }
    settled(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(server.calls().len(), 5, "a finished task ran again");
    assert_eq!(history().await?, attempts_before, "no attempt was made");
    let listed = tasks(&mut admin, &run_id).await?;
    assert!(listed.iter().all(|t| t.status() == TaskStatus::Succeeded));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_execution_whose_result_a_sigkill_lost_is_in_the_attempt_history() -> anyhow::Result<()>
{
    use taskfactory_proto::v1::GetTaskRequest;

    let env = TestEnv::new(EnvOptions {
        executor_ack_wait: Duration::from_secs(3),
        orchestrator_ack_wait: Duration::from_secs(3),
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    let executor = env.spawn_process(Service::Executor, &[])?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let server = RecordingServer::start(Duration::from_secs(2)).await?;
    create(&mut admin, &fan_out_spec("slow", &server.url, 1)).await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "slow".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    // The first execution has started (its start is on record) when the executor is killed.
    let task_id = wait_for("the first start", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move {
            let listed = tasks(&mut admin, &run_id).await?;
            Ok(listed
                .first()
                .filter(|task| task.status() == TaskStatus::Running)
                .map(|task| task.id.clone()))
        }
    })
    .await?;
    executor.kill();
    let _executor = env.start(Service::Executor);
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);

    let task = admin
        .get_task(GetTaskRequest { id: task_id })
        .await?
        .into_inner();
    let starts: Vec<_> = task
        .attempt_history
        .iter()
        .filter(|a| a.status() == TaskStatus::Running)
        .collect();
    assert_eq!(starts.len(), 2, "both executions are on record: {task:?}");
    assert_ne!(starts[0].execution, starts[1].execution);
    let outcomes: Vec<_> = task
        .attempt_history
        .iter()
        .filter(|a| a.status() != TaskStatus::Running)
        .map(|a| (a.attempt, a.status()))
        .collect();
    assert_eq!(
        outcomes,
        [(starts[1].attempt, TaskStatus::Succeeded)],
        "the first execution's outcome was lost with it"
    );
    let metrics = crate::support::Scrape::parse(&taskfactory_runtime::metrics::handle().render())?;
    assert_eq!(
        metrics.count(
            taskfactory_runtime::metrics::REPEATED_EXECUTIONS,
            &[("type", "http")]
        ),
        1.0,
        "the second execution is counted as a repetition"
    );
    Ok(())
}

/// Issue 12, "Executors never run a finished task" and "a KV bucket deleted at runtime: the
/// services recover". The finished-tasks bucket, deleted, is declared again empty; the
/// orchestrator refills it from Postgres, and until it has, executors run no task they cannot
/// prove unfinished: finished tasks' messages that come back never run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_task_never_runs_again_after_the_finished_tasks_bucket_is_recreated()
-> anyhow::Result<()> {
    use futures::StreamExt as _;
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(
        &mut admin,
        &format!(
            "name: once\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, forEach: 'range(3)', params: {{url: '{}'}}}}]\n",
            server.url
        ),
    )
    .await?;
    let mut copies = env.nats_client().await?.subscribe("tasks.http").await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "once".to_owned(),
            idempotency_key: "k".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(server.calls().len(), 3);
    let mut messages = Vec::new();
    while messages.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(5), copies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no copy"))?;
        messages.push(message.payload);
    }
    // Every task is marked finished (by its executor, and by the orchestrator before it acked).
    let kv = js.get_key_value(subjects::FINISHED_TASKS_BUCKET).await?;
    let listed = tasks(&mut admin, &run_id).await?;
    wait_for("finished markers", Duration::from_secs(10), || {
        let (kv, listed) = (kv.clone(), listed.clone());
        async move {
            for task in &listed {
                let key = subjects::finished_task_key(&task.id, &task.r#type);
                if kv.get(&key).await?.is_none() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;

    // The finished-tasks bucket is deleted at runtime (the fault the issue lists) and declared
    // again by the services' keeper.
    assert!(
        js.delete_stream(format!("KV_{}", subjects::FINISHED_TASKS_BUCKET))
            .await?
            .success
    );
    wait_for("bucket declared again", Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            Ok(js
                .get_stream(format!("KV_{}", subjects::FINISHED_TASKS_BUCKET))
                .await
                .ok()
                .map(drop))
        }
    })
    .await?;

    // Then the finished tasks' messages come back, as in
    // `a_finished_tasks_message_that_comes_back_is_never_run_again`.
    let stream = js.get_stream(subjects::TASKS_STREAM).await?;
    stream
        .delete_consumer(&subjects::executor_consumer("http"))
        .await?;
    for (n, payload) in messages.into_iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("back-{n}").as_str());
        js.publish_with_headers("tasks.http", headers, payload)
            .await?
            .await?;
    }
    settled(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(
        server.calls().len(),
        3,
        "a finished task ran again after the finished-tasks bucket was declared again"
    );
    Ok(())
}

/// Issue 12, "Executors never run a finished task", while the orchestrator is down or behind (as
/// after the very outage that brings acked messages back): the executor marks a task finished
/// once the results stream has its final result, before it acks the task's message, so a copy
/// of a task that SUCCEEDED never runs again even before the orchestrator records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_task_never_runs_again_while_its_result_waits_for_the_orchestrator()
-> anyhow::Result<()> {
    use futures::StreamExt as _;
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.start(Service::Orchestrator);
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::from_secs(2)).await?;
    create(
        &mut admin,
        &format!(
            "name: lag\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, forEach: 'range(3)', params: {{url: '{}'}}}}]\n",
            server.url
        ),
    )
    .await?;
    let mut copies = env.nats_client().await?.subscribe("tasks.http").await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "lag".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let mut messages = Vec::new();
    while messages.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), copies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no copy"))?;
        messages.push(message.payload);
    }
    // The orchestrator stops while the tasks run; their SUCCEEDED results wait in the stream.
    orchestrator.kill();
    wait_for("the three calls", Duration::from_secs(20), || async {
        Ok((server.calls().len() == 3).then_some(()))
    })
    .await?;
    wait_for("the work queue empty", Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(subjects::TASKS_STREAM).await?;
            Ok((stream.info().await?.state.messages == 0).then_some(()))
        }
    })
    .await?;
    // The finished tasks' messages come back (as in the project's own test of this).
    for (n, payload) in messages.into_iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("back-{n}").as_str());
        js.publish_with_headers("tasks.http", headers, payload)
            .await?
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _orchestrator = env.start(Service::Orchestrator);
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(
        server.calls().len(),
        3,
        "tasks that had already SUCCEEDED ran again (run {:?})",
        run.status()
    );
    Ok(())
}

/// A durable consumer or a KV bucket changed under the services (an operator's script, a stale
/// tool) is put back by its owners' keeper, as streams are: here a server-side delivery limit of
/// 1 on an executor's consumer (a task NAKed for a retry would never be delivered again, nor
/// dead-lettered) and a finished-tasks bucket that forgets its entries after a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_consumer_and_a_changed_bucket_are_put_back_within_seconds() -> anyhow::Result<()>
{
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let js = env.js().await?;
    let tasks_stream = js.get_stream(subjects::TASKS_STREAM).await?;
    let durable = subjects::executor_consumer("noop");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = tasks_stream
        .get_consumer(&durable)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = consumer.info().await?.config.clone();
    tasks_stream
        .update_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: config.durable_name.clone(),
            filter_subject: config.filter_subject.clone(),
            ack_policy: config.ack_policy,
            ack_wait: config.ack_wait,
            max_deliver: 1,
            max_ack_pending: config.max_ack_pending,
            deliver_policy: config.deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(consumer.info().await?.config.max_deliver, 1);
    let kv_stream = format!("KV_{}", subjects::FINISHED_TASKS_BUCKET);
    let mut kv = js.get_stream(&kv_stream).await?;
    let mut kv_config = kv.info().await?.config.clone();
    let original = kv_config.clone();
    kv_config.max_age = Duration::from_secs(1);
    kv_config.duplicate_window = Duration::from_secs(1);
    js.update_stream(kv_config).await?;

    // TASKFACTORY_DECLARE_EVERY is 1 s in the tests.
    wait_for(
        "the consumer and the bucket put back",
        Duration::from_secs(15),
        || {
            let (mut consumer, mut kv) = (consumer.clone(), kv.clone());
            async move {
                let deliver = consumer.info().await?.config.max_deliver;
                let age = kv.info().await?.config.max_age;
                Ok((deliver == -1 && age > Duration::from_secs(3600)).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        kv.info().await?.config,
        original,
        "the bucket is as the services declared it"
    );
    Ok(())
}

/// `FACTORY_TASKS` recreated by someone else with `limits` retention (say `nats stream add` with
/// its defaults) cannot be updated back to a work queue: acked tasks would stay in it and every
/// consumer created again would replay them. The services do not keep it silently: `/readyz`
/// names it and says what to do (and `/healthz` fails if it stays so, see `nats::Kept`); once
/// the operator deletes it, they declare it again as a work queue and work goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tasks_stream_recreated_with_limits_retention_makes_the_services_unready_until_replaced()
-> anyhow::Result<()> {
    use crate::support::http_get;
    use async_nats::jetstream::stream;
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    let probes: std::net::SocketAddr =
        format!("127.0.0.1:{}", taskfactory_tests::free_port()).parse()?;
    let _executor = env.spawn_process(
        Service::Executor,
        &[("TASKFACTORY_METRICS_ADDR", &probes.to_string())],
    )?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let readyz = |status: u16| async move {
        Ok(http_get(probes, "/readyz")
            .await
            .ok()
            .filter(|(answered, _)| *answered == status)
            .map(|(_, body)| body))
    };
    wait_for("the executor ready", Duration::from_secs(30), || {
        readyz(200)
    })
    .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    js.create_stream(stream::Config {
        name: subjects::TASKS_STREAM.to_owned(),
        subjects: vec![subjects::TASKS_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    })
    .await?;

    let body = wait_for("the executor unready", Duration::from_secs(15), || {
        readyz(503)
    })
    .await?;
    assert!(
        body.contains("FACTORY_TASKS was created with retention Limits")
            && body.contains("nats stream rm FACTORY_TASKS"),
        "names the stream and what to do: {body}"
    );
    assert_eq!(
        http_get(probes, "/healthz").await?.0,
        200,
        "alive within the grace"
    );

    // The operator does what it says.
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    wait_for("the executor ready again", Duration::from_secs(30), || {
        readyz(200)
    })
    .await?;
    let mut tasks_stream = js.get_stream(subjects::TASKS_STREAM).await?;
    assert_eq!(
        tasks_stream.info().await?.config.retention,
        stream::RetentionPolicy::WorkQueue
    );
    create(
        &mut admin,
        "name: after\ntrigger: {manual: {}}\ntasks: [{name: t, type: noop, forEach: 'range(3)'}]\n",
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "after".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    wait_for("the work queue empty", Duration::from_secs(10), || {
        let js = js.clone();
        async move { Ok((stream_messages(&js, subjects::TASKS_STREAM).await? == 0).then_some(())) }
    })
    .await?;
    Ok(())
}

/// Tasks queued in `FACTORY_TASKS` when it is deleted go with it; once it is declared again, the
/// orchestrator publishes the tasks still to be run into the new stream (it sees the stream's
/// creation time change), so their run ends without anyone's `RetryTask`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_queued_in_a_deleted_tasks_stream_are_published_again_and_their_run_ends()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    let executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: queued\ntrigger: {manual: {}}\ntasks: [{name: t, type: noop, forEach: 'range(3)'}]\n",
    )
    .await?;
    // The executor is down for a moment (a rollout); its durable consumer stays.
    executor.kill();
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "queued".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    wait_for("the tasks queued", Duration::from_secs(30), || {
        let js = js.clone();
        async move { Ok((stream_messages(&js, subjects::TASKS_STREAM).await? == 3).then_some(())) }
    })
    .await?;
    // FACTORY_TASKS is deleted while running, and declared again by the services.
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    wait_for(
        "FACTORY_TASKS declared again",
        Duration::from_secs(20),
        || {
            let js = js.clone();
            async move { Ok(js.get_stream(subjects::TASKS_STREAM).await.ok().map(drop)) }
        },
    )
    .await?;
    let _executor = env.start(Service::Executor);
    let outcome = finished_run(&admin, &run_id, Duration::from_secs(60)).await;
    let listed = tasks(&mut admin, &run_id).await?;
    let states: Vec<_> = listed.iter().map(|t| t.status()).collect();
    assert!(
        outcome.is_ok(),
        "the run never ended; its tasks: {states:?}"
    );
    assert_eq!(outcome?.status(), RunStatus::RunSucceeded, "{states:?}");
    assert_eq!(states, [TaskStatus::Succeeded; 3]);
    Ok(())
}

/// A task waiting in the deleted `FACTORY_TASKS` for its next attempt (its message held back by
/// its backoff) gets it from the stream declared again, numbered after the attempts it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_waiting_for_its_next_attempt_in_a_deleted_tasks_stream_gets_it()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;
    use taskfactory_proto::v1::GetTaskRequest;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: later\ntrigger: {manual: {}}\ntasks: [{name: c, type: http, params: {url: 'http://127.0.0.1:1/x'}, retry: {maxAttempts: 3, initialBackoff: 600s, maxBackoff: 600s}}]\n",
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "later".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    // Its first attempt failed; the next one is ten minutes away.
    let attempts = |admin: &crate::support::Admin, run_id: String| {
        let mut admin = admin.clone();
        async move {
            let listed = tasks(&mut admin, &run_id).await?;
            let Some(task) = listed.into_iter().next() else {
                return Ok(Vec::new());
            };
            let task = admin
                .get_task(GetTaskRequest { id: task.id })
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(
                task.attempt_history
                    .iter()
                    .filter(|a| a.status() == TaskStatus::Failed)
                    .map(|a| a.attempt)
                    .collect::<Vec<_>>(),
            )
        }
    };
    wait_for("the first attempt failed", Duration::from_secs(30), || {
        let run_id = run_id.clone();
        let attempts = attempts(&admin, run_id);
        async move { Ok((attempts.await? == [1]).then_some(())) }
    })
    .await?;
    assert_eq!(stream_messages(&js, subjects::TASKS_STREAM).await?, 1);

    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    wait_for(
        "the second attempt, from the new stream",
        Duration::from_secs(30),
        || {
            let run_id = run_id.clone();
            let attempts = attempts(&admin, run_id);
            async move { Ok((attempts.await? == [1, 2]).then_some(())) }
        },
    )
    .await?;
    Ok(())
}

/// Executors watch the finished-tasks bucket's `complete` key instead of reading it before every
/// attempt. The watch must never outlive its bucket, nor trust a key that names another: deleted
/// and declared again (empty, not yet refilled), the bucket is not complete at once (not when the
/// watch looks again, here an hour later), and a key whose value is not the bucket's creation
/// time proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watched_complete_key_proves_only_its_own_bucket_complete() -> anyhow::Result<()> {
    use taskfactory_model::complete::complete_value;
    use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};
    use taskfactory_runtime::complete::bucket_created;
    use taskfactory_runtime::nats;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let js = env.js().await?;
    let declare = || async {
        nats::ensure_bucket(&js, nats::finished_tasks_config(1))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let created = || async {
        bucket_created(&js, FINISHED_TASKS_BUCKET)
            .await
            .map_err(anyhow::Error::msg)
    };
    let kv = declare().await?;
    let watch = taskfactory_runtime::finished_tasks::complete_watch();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(watch.clone().run(
        js.clone(),
        kv.clone(),
        Duration::from_secs(3600),
        shutdown.clone(),
    ));
    let becomes = |want: bool, what: &'static str| {
        let watch = watch.clone();
        wait_for(what, Duration::from_secs(10), move || {
            let watch = watch.clone();
            async move { Ok((watch.is_complete() == want).then_some(())) }
        })
    };
    becomes(false, "an incomplete bucket, seen so").await?;
    let first = created().await?;
    kv.create(FINISHED_TASKS_COMPLETE_KEY, complete_value(first).into())
        .await?;
    becomes(true, "the complete key, seen").await?;
    let other = first + chrono::Duration::nanoseconds(1);
    kv.put(FINISHED_TASKS_COMPLETE_KEY, complete_value(other).into())
        .await?;
    becomes(false, "a key naming another bucket, distrusted").await?;
    kv.put(FINISHED_TASKS_COMPLETE_KEY, complete_value(first).into())
        .await?;
    becomes(true, "the key naming the bucket again").await?;

    // Deleted and declared again at once, empty: not complete, long before the watch looks.
    js.delete_key_value(FINISHED_TASKS_BUCKET).await?;
    let kv = declare().await?;
    becomes(false, "the recreated bucket, seen as not complete").await?;
    // Refilled: complete again, through a watch of the new bucket.
    kv.create(
        FINISHED_TASKS_COMPLETE_KEY,
        complete_value(created().await?).into(),
    )
    .await?;
    becomes(true, "the new bucket's complete key, seen").await?;
    // A deleted key is not complete either.
    kv.delete(FINISHED_TASKS_COMPLETE_KEY).await?;
    becomes(false, "the deleted key, seen").await?;
    shutdown.cancel();
    Ok(())
}

/// A dead task put back by `RetryTask` while no executor runs (its redrive message waits in
/// `FACTORY_TASKS`) and then lost with the stream is published again as its new series: numbered
/// after the attempts it had, with its result token (this one was stored before tokens existed),
/// so an executor runs it instead of taking it for finished by its first series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_task_lost_with_a_deleted_tasks_stream_runs_its_new_series() -> anyhow::Result<()>
{
    use taskfactory_model::subjects;
    use taskfactory_proto::v1::{GetTaskRequest, RetryTaskRequest};

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    let executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: once\ntrigger: {manual: {}}\ntasks: [{name: c, type: http, params: {url: 'http://127.0.0.1:1/x'}, retry: {maxAttempts: 1}}]\n",
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "once".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let dead = tasks(&mut admin, &run_id).await?.remove(0);
    assert_eq!((dead.status(), dead.attempts), (TaskStatus::Dead, 1));

    // Stored before result tokens existed: only its redrive gives it one.
    let pool = env.db.pool().await?;
    let task_id = uuid::Uuid::parse_str(&dead.id)?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT instance FROM tasks WHERE id = $1")
        .bind(task_id)
        .fetch_one(&pool)
        .await?;
    let mut legacy =
        <taskfactory_proto::v1::TaskInstance as prost::Message>::decode(stored.as_slice())?;
    legacy.result_token.clear();
    sqlx::query("UPDATE tasks SET instance = $2, result_token_required = false WHERE id = $1")
        .bind(task_id)
        .bind(prost::Message::encode_to_vec(&legacy))
        .execute(&pool)
        .await?;

    // Redriven while the executors are down; the stream with its redrive message is then lost.
    executor.kill();
    admin
        .retry_task(RetryTaskRequest {
            id: dead.id.clone(),
        })
        .await?;
    assert_eq!(stream_messages(&js, subjects::TASKS_STREAM).await?, 1);
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    wait_for(
        "the task published into the stream declared again",
        Duration::from_secs(30),
        || {
            let js = js.clone();
            async move {
                Ok((stream_messages(&js, subjects::TASKS_STREAM)
                    .await
                    .unwrap_or(0)
                    == 1)
                    .then_some(()))
            }
        },
    )
    .await?;

    // Its second series runs (and fails like the first): attempt 2, recorded, and the run ends.
    let _executor = env.start(Service::Executor);
    let outcome = finished_run(&admin, &run_id, Duration::from_secs(30)).await;
    let task = admin
        .get_task(GetTaskRequest {
            id: dead.id.clone(),
        })
        .await?
        .into_inner();
    let history: Vec<_> = task
        .attempt_history
        .iter()
        .map(|a| (a.attempt, a.status()))
        .collect();
    assert!(
        outcome.is_ok(),
        "the run never ended: the task is {:?} with history {history:?}",
        task.status()
    );
    assert_eq!(
        (task.status(), task.attempts),
        (TaskStatus::Dead, 2),
        "{history:?}"
    );
    assert!(
        history.contains(&(2, TaskStatus::Dead)),
        "the new series ran: {history:?}"
    );
    Ok(())
}

/// Every task message published on `tasks.>` from now on, per task id: a core subscriber sees
/// each publish, those JetStream then drops as duplicates included.
#[derive(Clone, Default)]
struct Published(Arc<Mutex<HashMap<uuid::Uuid, u32>>>);

impl Published {
    async fn watch(client: async_nats::Client) -> anyhow::Result<Self> {
        use futures::StreamExt as _;
        let published = Self::default();
        let mut subscriber = client.subscribe("tasks.>").await?;
        client.flush().await?;
        let counts = published.0.clone();
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let instance = <taskfactory_proto::v1::TaskInstance as prost::Message>::decode(
                    message.payload.as_ref(),
                )
                .expect("a task message");
                let id = uuid::Uuid::parse_str(&instance.task_id).expect("a task id");
                *counts.lock().unwrap().entry(id).or_default() += 1;
            }
        });
        Ok(published)
    }

    /// Waits until each of `tasks` tasks was published (the subscriber may trail the acks).
    async fn every_task(&self, tasks: u32) -> anyhow::Result<()> {
        wait_for("every task published", Duration::from_secs(10), || {
            let published = self.0.lock().unwrap().len();
            async move { Ok((published == tasks as usize).then_some(())) }
        })
        .await
    }

    fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }

    fn counts(&self) -> HashMap<uuid::Uuid, u32> {
        self.0.lock().unwrap().clone()
    }
}

/// `tasks` tasks of one run waiting in `FACTORY_TASKS` (no executor runs), the stream then
/// deleted and declared again by the trigger's keeper while no orchestrator runs: the run's id.
async fn tasks_lost_with_their_stream(
    env: &TestEnv,
    url: &str,
    tasks: u32,
) -> anyhow::Result<String> {
    use taskfactory_model::subjects;

    let orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(&mut admin, &fan_out_spec("requeued", url, tasks)).await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "requeued".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    wait_for("the tasks queued", Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            Ok(
                (stream_messages(&js, subjects::TASKS_STREAM).await? == u64::from(tasks))
                    .then_some(()),
            )
        }
    })
    .await?;
    orchestrator.stop().await?;
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    wait_for(
        "FACTORY_TASKS declared again",
        Duration::from_secs(20),
        || {
            let js = js.clone();
            async move { Ok(js.get_stream(subjects::TASKS_STREAM).await.ok().map(drop)) }
        },
    )
    .await?;
    Ok(run_id)
}

/// Waits until the requeue into the current `FACTORY_TASKS` is done: its creation time is the
/// epoch recorded.
async fn requeue_done(env: &TestEnv) -> anyhow::Result<()> {
    use taskfactory_model::subjects;

    let js = env.js().await?;
    let pool = env.db.pool().await?;
    let stream = js.get_stream(subjects::TASKS_STREAM).await?;
    let created = stream.cached_info().created.unix_timestamp_nanos() / 1000;
    wait_for("the requeue done", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let recorded: Option<DateTime<Utc>> =
                sqlx::query_scalar("SELECT created FROM task_stream_epochs WHERE stream = $1")
                    .bind(subjects::TASKS_STREAM)
                    .fetch_optional(&pool)
                    .await?;
            Ok(recorded
                .is_some_and(|r| i128::from(r.timestamp_micros()) == created)
                .then_some(()))
        }
    })
    .await
}

/// Two orchestrators that come up at once after `FACTORY_TASKS` was replaced (each with one
/// publish in flight at a time, so their requeues overlap) publish each task once between them,
/// and each task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_orchestrators_requeue_a_replaced_tasks_stream_once_between_them() -> anyhow::Result<()>
{
    const TASKS: u32 = 1100;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let server = RecordingServer::start(Duration::ZERO).await?;
    let run_id = tasks_lost_with_their_stream(&env, &server.url, TASKS).await?;

    let published = Published::watch(env.nats_client().await?).await?;
    let slow = [("TASKFACTORY_PUBLISH_WINDOW", "1")];
    let _first = env.spawn_process(Service::Orchestrator, &slow)?;
    let _second = env.spawn_process(Service::Orchestrator, &slow)?;
    requeue_done(&env).await?;
    published.every_task(TASKS).await?;
    let _executor = env.start(Service::Executor);
    let admin = env.admin().await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(120)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);

    let counts = published.counts();
    let twice: Vec<_> = counts.values().filter(|n| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{} tasks published more than once ({} publishes in all)",
        twice.len(),
        published.total()
    );
    let calls = server.counts();
    assert_eq!(calls.len(), TASKS as usize, "every task ran");
    let twice: Vec<_> = calls.values().filter(|n| **n != 1).collect();
    assert!(twice.is_empty(), "{} tasks ran more than once", twice.len());
    Ok(())
}

/// An orchestrator killed in the middle of a requeue leaves it where it stopped: the next one
/// goes on from there, and publishes no page the first finished (only the one it was in the
/// middle of may go out twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_requeue_interrupted_midway_goes_on_where_it_stopped() -> anyhow::Result<()> {
    const TASKS: u32 = 1200;
    const PAGE: usize = 500;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let server = RecordingServer::start(Duration::ZERO).await?;
    let run_id = tasks_lost_with_their_stream(&env, &server.url, TASKS).await?;

    let published = Published::watch(env.nats_client().await?).await?;
    // One publish at a time: killed once its first page is out and its second under way.
    let slow = [("TASKFACTORY_PUBLISH_WINDOW", "1")];
    let first = env.spawn_process(Service::Orchestrator, &slow)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while published.total() <= PAGE as u32 + 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the requeue never got past its first page"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill();
    let at_kill = published.total();
    assert!(
        at_kill < TASKS,
        "the kill landed midway ({at_kill} of {TASKS} published)"
    );

    let _second = env.start(Service::Orchestrator);
    requeue_done(&env).await?;
    published.every_task(TASKS).await?;
    let counts = published.counts();
    let mut ids: Vec<_> = counts.keys().copied().collect();
    ids.sort();
    let first_page: Vec<_> = ids[..PAGE].iter().filter(|id| counts[id] != 1).collect();
    assert!(
        first_page.is_empty(),
        "{} tasks of the first page published again ({} publishes in all, {at_kill} before the kill)",
        first_page.len(),
        published.total()
    );
    let twice = counts.values().filter(|n| **n != 1).count();
    assert!(twice <= PAGE, "{twice} tasks published twice");

    let _executor = env.start(Service::Executor);
    let admin = env.admin().await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(120)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    Ok(())
}

/// A requeue look reads `FACTORY_TASKS`'s creation time first and publishes later (after the
/// results published before it are recorded: up to 30 s). Should the stream be replaced again
/// meanwhile and another replica requeue into the newer one, the look leaves it be. Before, it
/// published every task again and recorded the older stream's epoch: the epoch moved backwards,
/// and the next look requeued everything once more. The look is held, just after it read the
/// creation time, by a lock on `task_stream_epochs`; the other replica's requeue is the newer
/// epoch the test records under that lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_requeue_look_overtaken_by_a_newer_tasks_stream_leaves_its_epoch_alone()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let js = env.js().await?;
    let pool = env.db.pool().await?;
    let stream_created = || async {
        let stream = js.get_stream(subjects::TASKS_STREAM).await?;
        let micros = stream.cached_info().created.unix_timestamp_nanos() / 1000;
        anyhow::Ok(
            DateTime::<Utc>::from_timestamp_micros(i64::try_from(micros)?).unwrap_or_default(),
        )
    };
    let first = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Orchestrator]).await?;
    requeue_done(&env).await?;
    first.stop().await?;
    let older = stream_created().await?;

    let mut hold = pool.begin().await?;
    sqlx::query("LOCK TABLE task_stream_epochs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await?;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("orchestrator.log");
    let _orchestrator =
        env.spawn_process_logged(Service::Orchestrator, &[("RUST_LOG", "warn")], &log)?;
    wait_for(
        "a look waiting for the epoch, the stream's creation time read",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock' \
                       AND query LIKE 'SELECT created FROM task_stream_epochs WHERE%'",
                )
                .fetch_one(&pool)
                .await?;
                Ok((waiting > 0).then_some(()))
            }
        },
    )
    .await?;
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    let newer = wait_for(
        "FACTORY_TASKS declared again",
        Duration::from_secs(20),
        || async {
            Ok(match stream_created().await {
                Ok(created) if created != older => Some(created),
                _ => None,
            })
        },
    )
    .await?;
    sqlx::query("UPDATE task_stream_epochs SET created = $2 WHERE stream = $1")
        .bind(subjects::TASKS_STREAM)
        .bind(newer)
        .execute(&mut *hold)
        .await?;
    hold.commit().await?;

    // The epoch an older look records is soon put right by the next look: its log is what lasts.
    let requeued_older = format!("created={older}");
    let left_alone = wait_for(
        "the look given up on the older stream",
        Duration::from_secs(60),
        || {
            let (log, requeued_older) = (log.clone(), requeued_older.clone());
            async move {
                let logged = std::fs::read_to_string(&log)?;
                if logged.contains("FACTORY_TASKS was replaced again during the look") {
                    return Ok(Some(true));
                }
                Ok(logged
                    .lines()
                    .any(|line| {
                        line.contains("published into the new one")
                            && line.contains(&requeued_older)
                    })
                    .then_some(false))
            }
        },
    )
    .await?;
    assert!(
        left_alone,
        "the look requeued into the older stream ({older}) and recorded its epoch over the newer one's ({newer})"
    );
    let recorded: DateTime<Utc> =
        sqlx::query_scalar("SELECT created FROM task_stream_epochs WHERE stream = $1")
            .bind(subjects::TASKS_STREAM)
            .fetch_one(&pool)
            .await?;
    assert_eq!(recorded, newer);
    Ok(())
}

/// While the finished-tasks bucket is refilled (recreated empty, the orchestrator that refills it
/// not running yet), executors take no task message: a delivery handed back meanwhile would count
/// as an attempt (the delivery count is the attempt number), so a long refill would cost tasks
/// their retries or dead-letter them. Once the refill is done, every queued task runs as its
/// first attempt and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_queued_while_the_finished_tasks_bucket_is_refilled_lose_no_attempts()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(&mut admin, &fan_out_spec("queued", &server.url, 4)).await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "queued".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    wait_for("the tasks queued", Duration::from_secs(30), || async {
        Ok((stream_messages(&js, subjects::TASKS_STREAM).await? == 4).then_some(()))
    })
    .await?;
    // The orchestrator stops, the bucket is deleted, and an executor starts: it declares the
    // bucket again, empty and not complete, and nobody refills it for a while.
    orchestrator.stop().await?;
    js.delete_key_value(subjects::FINISHED_TASKS_BUCKET).await?;
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Executor]).await?;
    wait_bucket(&js, subjects::FINISHED_TASKS_BUCKET).await?;
    // The refill held back: long enough for several deliveries at the transient backoff.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(server.calls().is_empty(), "a task ran before the refill");

    let _orchestrator = env.start(Service::Orchestrator);
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(server.calls().len(), 4);
    let attempts: Vec<u32> = tasks(&mut admin, &run_id)
        .await?
        .iter()
        .map(|task| task.attempts)
        .collect();
    assert_eq!(
        attempts,
        [1, 1, 1, 1],
        "attempts were spent while the bucket was refilled"
    );
    assert_eq!(
        stream_messages(&js, subjects::DLQ_STREAM).await?,
        0,
        "nothing is dead-lettered"
    );
    Ok(())
}

/// The finished-tasks bucket replaced under running services, with the keepers' look an hour
/// away: executors must not go on trusting a watch of the old bucket (a watch resumes on a
/// recreated stream without a word), nor a `complete` key that names another bucket (what a
/// refill leaves when the bucket it refilled is replaced just before it writes the key). The
/// finished tasks' messages that come back wait for the refill, and never run again.
async fn finished_tasks_are_not_run_again_in_a_replaced_bucket(
    stale_key: bool,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};

    let env = TestEnv::new(EnvOptions {
        declare_every: Duration::from_secs(3600),
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.start(Service::Orchestrator);
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(&mut admin, &fan_out_spec("replaced", &server.url, 2)).await?;
    let mut copies = env.nats_client().await?.subscribe("tasks.http").await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "replaced".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let mut messages = Vec::new();
    while messages.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(5), copies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no copy"))?;
        messages.push(message.payload);
    }
    let old_key = js
        .get_key_value(FINISHED_TASKS_BUCKET)
        .await?
        .get(FINISHED_TASKS_COMPLETE_KEY)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the bucket is not complete"))?;

    // The orchestrator stops; the bucket is deleted and declared again, empty.
    orchestrator.stop().await?;
    js.delete_key_value(FINISHED_TASKS_BUCKET).await?;
    let kv = taskfactory_runtime::nats::ensure_bucket(
        &js,
        taskfactory_runtime::nats::finished_tasks_config(1),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if stale_key {
        // The old bucket's key, written into the new one.
        kv.create(FINISHED_TASKS_COMPLETE_KEY, old_key).await?;
    }
    // The finished tasks' messages come back.
    for (n, payload) in messages.into_iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("back-{n}").as_str());
        js.publish_with_headers("tasks.http", headers, payload)
            .await?
            .await?;
    }
    // The refill, at the orchestrator's start.
    let _orchestrator = env.start(Service::Orchestrator);
    settled(
        &js,
        taskfactory_model::subjects::TASKS_STREAM,
        &taskfactory_model::subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(
        server.calls().len(),
        2,
        "a finished task ran again in the replaced bucket"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_are_not_run_again_in_a_bucket_replaced_under_a_watch() -> anyhow::Result<()>
{
    finished_tasks_are_not_run_again_in_a_replaced_bucket(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_complete_key_naming_another_bucket_proves_nothing() -> anyhow::Result<()> {
    finished_tasks_are_not_run_again_in_a_replaced_bucket(true).await
}

/// The cancelled-runs bucket deleted and declared again (empty) while tasks of a cancelled run
/// are still queued: the orchestrator refills it from Postgres, and until it has, executors take
/// no task, so the cancelled run's tasks never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_tasks_of_a_cancelled_run_do_not_run_after_the_cancelled_runs_bucket_is_recreated()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;
    use taskfactory_proto::v1::CancelRunRequest;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(&mut admin, &fan_out_spec("called-off", &server.url, 3)).await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "called-off".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    wait_for("the tasks queued", Duration::from_secs(30), || async {
        Ok((stream_messages(&js, subjects::TASKS_STREAM).await? == 3).then_some(()))
    })
    .await?;
    admin
        .cancel_run(CancelRunRequest {
            id: run_id.clone(),
            reason: "not today".to_owned(),
        })
        .await?;
    // Deleted, and declared again (empty) by the orchestrator's keeper.
    let bucket_stream = format!("KV_{}", subjects::CANCELLED_RUNS_BUCKET);
    let before = js.get_stream(&bucket_stream).await?.cached_info().created;
    js.delete_key_value(subjects::CANCELLED_RUNS_BUCKET).await?;
    wait_for("the bucket declared again", Duration::from_secs(20), || {
        let (js, bucket_stream) = (js.clone(), bucket_stream.clone());
        async move {
            Ok(js
                .get_stream(&bucket_stream)
                .await
                .ok()
                .filter(|stream| stream.cached_info().created != before)
                .map(drop))
        }
    })
    .await?;
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Executor]).await?;
    settled(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert!(
        server.calls().is_empty(),
        "a task of the cancelled run ran: {:?}",
        server.calls()
    );
    let listed = tasks(&mut admin, &run_id).await?;
    assert!(
        listed.iter().all(|t| t.status() == TaskStatus::Cancelled),
        "{listed:?}"
    );
    Ok(())
}

/// A refill cut short (the orchestrator's patience at start ran out) resumes from the last page it
/// wrote, rather than from the first: here a refill one task per page, stopped after a few pages,
/// then looked at again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_cut_short_resumes_where_it_got() -> anyhow::Result<()> {
    use taskfactory_model::complete::proves_complete;
    use taskfactory_model::subjects::{FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY};
    use taskfactory_orchestrator::refill::{Looked, Refill, Refilled};

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.start(Service::Orchestrator);
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: many\ntrigger: {manual: {}}\ntasks: [{name: t, type: noop, forEach: 'range(40)'}]\n",
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "many".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    orchestrator.stop().await?;
    js.delete_key_value(FINISHED_TASKS_BUCKET).await?;
    let kv = taskfactory_runtime::nats::ensure_bucket(
        &js,
        taskfactory_runtime::nats::finished_tasks_config(1),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let pool = env.db.pool().await?;
    let refill = Refill::with_page(Refilled::FinishedTasks, kv.clone(), 1);
    tokio::select! {
        looked = refill.check(&pool, &js) => {
            anyhow::bail!("the refill ended before it was cut short: {looked:?}")
        }
        _ = async {
            while refill.unfinished() < 5 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } => {}
    }
    let looked = refill.check(&pool, &js).await.map_err(anyhow::Error::msg)?;
    let Looked::Refilled { resumed, written } = looked else {
        anyhow::bail!("not refilled: {looked:?}");
    };
    assert!(resumed >= 5, "started over: {looked:?}");
    assert_eq!(resumed + written, 40, "{looked:?}");
    let created = taskfactory_runtime::complete::bucket_created(&js, FINISHED_TASKS_BUCKET)
        .await
        .map_err(anyhow::Error::msg)?;
    let key = kv
        .get(FINISHED_TASKS_COMPLETE_KEY)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no complete key"))?;
    assert!(proves_complete(&key, created));
    for task in tasks(&mut admin, &run_id).await? {
        let key = taskfactory_model::subjects::finished_task_key(&task.id, &task.r#type);
        assert!(
            kv.get(&key).await?.is_some(),
            "task {} not refilled",
            task.id
        );
    }
    Ok(())
}

/// A task whose attempt is in flight when `FACTORY_TASKS` is deleted is not requeued (it is
/// RUNNING); when that attempt then fails with attempts left, its NAK goes to the deleted stream.
/// It stayed FAILED and its run RUNNING for ever (RetryTask takes no FAILED task); now a later
/// requeue look publishes it into the new stream, once, and it gets its next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_failing_in_flight_across_a_deleted_tasks_stream_gets_its_next_attempt()
-> anyhow::Result<()> {
    use taskfactory_model::subjects;
    use taskfactory_proto::v1::{GetTaskRequest, RetryTaskRequest};

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    // Answers after 60 s; the task gives up after 4 s (retryable), its next attempt 1 s later.
    let server = RecordingServer::start(Duration::from_secs(60)).await?;
    create(
        &mut admin,
        &format!(
            "name: inflight\ntrigger: {{manual: {{}}}}\ntasks: [{{name: c, type: http, timeout: 4s, params: {{url: '{}', body: {{}}}}, retry: {{maxAttempts: 3, initialBackoff: 1s, maxBackoff: 1s}}}}]\n",
            server.url
        ),
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "inflight".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    wait_for("attempt 1 running", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move {
            let listed = tasks(&mut admin, &run_id).await?;
            Ok(listed
                .first()
                .is_some_and(|t| t.status() == TaskStatus::Running)
                .then_some(()))
        }
    })
    .await?;
    assert!(js.delete_stream(subjects::TASKS_STREAM).await?.success);
    let task_id = tasks(&mut admin, &run_id).await?.remove(0).id;
    let failed = |admin: &crate::support::Admin| {
        let mut admin = admin.clone();
        let id = task_id.clone();
        async move {
            let task = admin.get_task(GetTaskRequest { id }).await?.into_inner();
            Ok::<_, anyhow::Error>(
                task.attempt_history
                    .iter()
                    .filter(|a| a.status() == TaskStatus::Failed)
                    .map(|a| a.attempt)
                    .collect::<Vec<_>>(),
            )
        }
    };
    wait_for("attempt 1 failed", Duration::from_secs(30), || {
        let f = failed(&admin);
        async move { Ok((f.await? == [1]).then_some(())) }
    })
    .await?;
    let outcome = wait_for("attempt 2 failed too", Duration::from_secs(30), || {
        let f = failed(&admin);
        async move { Ok((f.await?.len() >= 2).then_some(())) }
    })
    .await;
    if outcome.is_err() {
        let task = tasks(&mut admin, &run_id).await?.remove(0);
        let retried = admin
            .retry_task(RetryTaskRequest {
                id: task.id.clone(),
            })
            .await;
        anyhow::bail!(
            "stranded: task {:?} attempts {}, stream holds {} messages, RetryTask: {:?}",
            task.status(),
            task.attempts,
            stream_messages(&js, subjects::TASKS_STREAM).await?,
            retried.map(|_| ()).map_err(|s| s.message().to_owned())
        );
    }
    Ok(())
}

/// RetryTask commits the redrive (task PENDING, run RUNNING) before it lowers the finished-tasks
/// entry and publishes the task. Either failing (here the bucket is missing for a moment), or a
/// crash in between, left the task PENDING with no message anywhere, and a second RetryTask was
/// refused (only DEAD tasks): the run never ended. Now a RetryTask of a redriven task whose
/// series never started publishes that series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_whose_publish_fails_after_its_redrive_can_be_retried_again() -> anyhow::Result<()>
{
    use taskfactory_model::subjects;
    use taskfactory_proto::v1::RetryTaskRequest;

    // The keepers look every 4 s: the bucket stays gone for the first RetryTask.
    let env = TestEnv::new(EnvOptions {
        declare_every: Duration::from_secs(4),
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: once\ntrigger: {manual: {}}\ntasks: [{name: c, type: http, params: {url: 'http://127.0.0.1:1/x'}, retry: {maxAttempts: 1}}]\n",
    )
    .await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "once".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let dead = tasks(&mut admin, &run_id).await?.remove(0);
    js.delete_key_value(subjects::FINISHED_TASKS_BUCKET).await?;
    let first = admin
        .retry_task(RetryTaskRequest {
            id: dead.id.clone(),
        })
        .await;
    // (The admin API answers an internal error; its log says to retry again.)
    first.expect_err("the bucket is gone: the retry cannot be prepared");
    wait_bucket(&js, subjects::FINISHED_TASKS_BUCKET).await?;
    wait_for("the retry taken again", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        let id = dead.id.clone();
        async move {
            Ok(admin
                .retry_task(RetryTaskRequest { id })
                .await
                .ok()
                .map(drop))
        }
    })
    .await?;
    let ended = wait_for("the task ran again", Duration::from_secs(40), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move {
            let task = tasks(&mut admin, &run_id).await?.remove(0);
            Ok((task.attempts >= 2).then_some(()))
        }
    })
    .await;
    if ended.is_err() {
        let task = tasks(&mut admin, &run_id).await?.remove(0);
        let second = admin
            .retry_task(RetryTaskRequest {
                id: task.id.clone(),
            })
            .await;
        anyhow::bail!(
            "stranded: task {:?} attempts {}, stream holds {} messages, second RetryTask: {:?}",
            task.status(),
            task.attempts,
            stream_messages(&js, subjects::TASKS_STREAM).await?,
            second.map(|_| ()).map_err(|s| s.message().to_owned())
        );
    }
    Ok(())
}

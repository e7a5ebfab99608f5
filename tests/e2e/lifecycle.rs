//! Run and task lifecycle: CancelRun, human tasks with CompleteTask (and chaining on their run's
//! completion), deadlines, and RetryTask.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use taskfactory_model::values::{json_to_value, struct_to_json};
use taskfactory_proto::v1::{
    CancelRunRequest, CompleteTaskRequest, GetTaskRequest, RetryTaskRequest, RunStatus, TaskStatus,
    TriggerActivityRequest,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::context::fire;
use crate::support::{create, finished_run, runs, tasks};

/// A local endpoint that counts calls and answers 500 while `failing`.
async fn switchable() -> anyhow::Result<(String, Arc<AtomicUsize>, Arc<AtomicBool>)> {
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let (c, f) = (calls.clone(), failing.clone());
    let app = axum::Router::new().route(
        "/work",
        axum::routing::post(move || {
            let (c, f) = (c.clone(), f.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
                } else {
                    (axum::http::StatusCode::OK, "{\"done\": true}")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/work", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, calls, failing))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_run_with_a_thousand_pending_tasks_executes_none() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    // No executor yet: every task waits in the stream.
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let (url, calls, _) = switchable().await?;
    create(
        &mut admin,
        &format!(
            "name: bulk\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, forEach: 'range(1000)', params: {{url: '{url}', body: {{n: '{{{{ item }}}}'}}}}}}]\n"
        ),
    )
    .await?;
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "bulk".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let js = env.js().await?;
    wait_for("1000 tasks queued", Duration::from_secs(30), || async {
        let stream = js.get_stream("FACTORY_TASKS").await?;
        Ok((stream.cached_info().state.messages == 1000).then_some(()))
    })
    .await?;

    let cancelled = admin
        .cancel_run(CancelRunRequest {
            id: fired.run_id.clone(),
            reason: "wrong batch".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.status(), RunStatus::RunCancelled);
    assert!(
        cancelled.error.contains("wrong batch"),
        "{}",
        cancelled.error
    );
    assert_eq!(
        cancelled.tasks_failed, 1000,
        "its unfinished tasks count as not succeeded"
    );

    // Now an executor comes: it takes every task and runs none of them.
    let _executor = env.start(Service::Executor);
    wait_for("the queue to drain", Duration::from_secs(60), || async {
        let stream = js.get_stream("FACTORY_TASKS").await?;
        Ok((stream.cached_info().state.messages == 0).then_some(()))
    })
    .await?;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no task of the cancelled run ran"
    );
    let all = tasks(&mut admin, &fired.run_id).await?;
    assert_eq!(all.len(), 1000);
    assert!(all.iter().all(|t| t.status() == TaskStatus::Cancelled));

    // Cancelling again is refused: it is finished.
    let status = admin
        .cancel_run(CancelRunRequest {
            id: fired.run_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = admin
        .cancel_run(CancelRunRequest {
            id: uuid::Uuid::new_v4().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_human_task_completed_through_the_api_completes_its_run_and_chains() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: approval\ntrigger: {manual: {}}\ntasks:\n  - {name: approve, type: human, timeout: 1h, params: {question: 'ship {{ event.order }}?'}}\n",
    )
    .await?;
    create(
        &mut admin,
        "name: after-approval\ntrigger: {event: {subject: events.taskfactory.run.completed, filter: \"event.activityName == 'approval' and event.status == 'RUN_SUCCEEDED'\"}}\ntasks: [{name: ship, type: log, params: {run: '{{ event.runId }}'}}]\n",
    )
    .await?;
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "approval".to_owned(),
            payload: Some(json_to_value(&serde_json::json!({"order": "o-7"}))),
            ..Default::default()
        })
        .await?
        .into_inner();
    let waiting = wait_for("the human task", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run = fired.run_id.clone();
        async move { Ok(tasks(&mut admin, &run).await?.into_iter().next()) }
    })
    .await?;
    assert_eq!(waiting.status(), TaskStatus::Waiting);
    assert_eq!(
        struct_to_json(waiting.params.as_ref().unwrap())["question"],
        "ship o-7?"
    );
    // It waits: nothing completes it on its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = admin
        .get_task(GetTaskRequest {
            id: waiting.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(still.status(), TaskStatus::Waiting);

    let done = admin
        .complete_task(CompleteTaskRequest {
            id: waiting.id.clone(),
            output: Some(json_to_value(
                &serde_json::json!({"approved": true, "by": "ada"}),
            )),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(done.status(), TaskStatus::Succeeded);
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    // The completion chains into the next activity.
    let chained = wait_for("the chained run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "after-approval").await?.into_iter().next()) }
    })
    .await?;
    let chained = finished_run(&admin, &chained.id, Duration::from_secs(20)).await?;
    assert_eq!(chained.status(), RunStatus::RunSucceeded);
    // A finished task cannot be completed again; a non-human one never.
    let status = admin
        .complete_task(CompleteTaskRequest {
            id: waiting.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    // A human task past its deadline dies, and fails its run.
    create(
        &mut admin,
        "name: quick-approval\ntrigger: {manual: {}}\ntasks: [{name: approve, type: human, timeout: 1s}]\n",
    )
    .await?;
    let run = fire(&mut admin, "quick-approval", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let expired = tasks(&mut admin, &run.id).await?;
    assert_eq!(expired[0].status(), TaskStatus::Dead);
    assert!(
        expired[0].last_error.contains("deadline"),
        "{}",
        expired[0].last_error
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_task_redrives_a_dead_task_and_its_run_finishes_again() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let (url, calls, failing) = switchable().await?;
    failing.store(true, Ordering::SeqCst);
    create(
        &mut admin,
        &format!(
            "name: fragile\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{url}'}}, retry: {{maxAttempts: 2, initialBackoff: 0.1s}}}}]\n"
        ),
    )
    .await?;
    let run = fire(&mut admin, "fragile", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let dead = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!(dead.status(), TaskStatus::Dead);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Make it a task stored before result tokens existed: the redrive gives it its token.
    let pool = env.db.pool().await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT instance FROM tasks WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&dead.id)?)
        .fetch_one(&pool)
        .await?;
    let mut legacy =
        <taskfactory_proto::v1::TaskInstance as prost::Message>::decode(stored.as_slice())?;
    legacy.result_token.clear();
    sqlx::query("UPDATE tasks SET instance = $2, result_token_required = false WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&dead.id)?)
        .bind(prost::Message::encode_to_vec(&legacy))
        .execute(&pool)
        .await?;

    // The endpoint is fixed; the dead task gets a new series of attempts.
    failing.store(false, Ordering::SeqCst);
    let redriven = admin
        .retry_task(RetryTaskRequest {
            id: dead.id.clone(),
        })
        .await?
        .into_inner();
    // Put back to PENDING; an executor may already have started it by the time it is read.
    assert!(
        matches!(
            redriven.status(),
            TaskStatus::Pending | TaskStatus::Running | TaskStatus::Succeeded
        ),
        "{:?}",
        redriven.status()
    );
    let task = wait_for(
        "the redriven task to succeed",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            let id = dead.id.clone();
            async move {
                let task = admin.get_task(GetTaskRequest { id }).await?.into_inner();
                Ok((task.status() == TaskStatus::Succeeded).then_some(task))
            }
        },
    )
    .await?;
    assert_eq!(task.attempts, 3, "attempts continue across the redrive");
    let required: bool =
        sqlx::query_scalar("SELECT result_token_required FROM tasks WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&dead.id)?)
            .fetch_one(&pool)
            .await?;
    assert!(required, "a redriven task requires its token from then on");
    let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!((run.tasks_succeeded, run.tasks_failed), (1, 0));
    // Only a dead task can be retried.
    let status = admin
        .retry_task(RetryTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_series_starts_past_every_attempt_in_the_history() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let (url, _calls, failing) = switchable().await?;
    failing.store(true, Ordering::SeqCst);
    create(
        &mut admin,
        &format!(
            "name: fragile\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{url}'}}, retry: {{maxAttempts: 2, initialBackoff: 0.1s}}}}]\n"
        ),
    )
    .await?;
    let run = fire(&mut admin, "fragile", serde_json::json!({})).await?;
    let dead = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!((dead.status(), dead.attempts), (TaskStatus::Dead, 2));

    // A third execution (a redelivery whose first copy was still running) ended after the task
    // had died: the history holds attempt 3, the task's count stays at 2.
    let pool = env.db.pool().await?;
    let task_id = uuid::Uuid::parse_str(&dead.id)?;
    sqlx::query(
        "INSERT INTO task_attempts (task_id, attempt, status, executor, execution) \
         VALUES ($1, 3, 'SUCCEEDED', 'a late duplicate', '')",
    )
    .bind(task_id)
    .execute(&pool)
    .await?;

    failing.store(false, Ordering::SeqCst);
    admin
        .retry_task(RetryTaskRequest {
            id: dead.id.clone(),
        })
        .await?;
    let task = wait_for(
        "the redriven task to succeed",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            let id = dead.id.clone();
            async move {
                let task = admin.get_task(GetTaskRequest { id }).await?.into_inner();
                Ok((task.status() == TaskStatus::Succeeded).then_some(task))
            }
        },
    )
    .await?;
    // The new series is attempt 4: its start and its end are rows of their own, beside the late
    // one (with the series at 3, its success merged into the late row and the history showed one
    // success where two executions succeeded).
    assert_eq!(task.attempts, 4);
    let rows: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT attempt, status, executor FROM task_attempts \
         WHERE task_id = $1 AND attempt >= 3 ORDER BY attempt, status",
    )
    .bind(task_id)
    .fetch_all(&pool)
    .await?;
    let shape: Vec<(i32, &str)> = rows.iter().map(|(a, s, _)| (*a, s.as_str())).collect();
    assert_eq!(
        shape,
        [(3, "SUCCEEDED"), (4, "RUNNING"), (4, "SUCCEEDED")],
        "{rows:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_a_type_nobody_serves_die_after_the_grace_period() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        unserved_grace: Duration::from_secs(2),
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    // Two executors that are not pulling right now: one consumer with a wildcard filter (it serves
    // `vision.ocr`), one with several filters (it serves neither `translate` nor `vision.ocr`).
    let js = env.js().await?;
    let tasks_stream = js.get_stream("FACTORY_TASKS").await?;
    for (durable, filters) in [
        ("vision-executor", vec!["tasks.vision.*".to_owned()]),
        (
            "greek-executor",
            vec!["tasks.alpha".to_owned(), "tasks.beta".to_owned()],
        ),
    ] {
        tasks_stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subjects: filters,
                ..Default::default()
            })
            .await?;
    }
    create(
        &mut admin,
        "name: ocr\ntrigger: {manual: {}}\ntasks: [{name: t, type: vision.ocr}]\n",
    )
    .await?;
    let waiting = admin
        .trigger_activity(TriggerActivityRequest {
            id: "ocr".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    create(
        &mut admin,
        "name: orphan\ntrigger: {manual: {}}\ntasks: [{name: t, type: translate, forEach: 'range(3)'}]\n",
    )
    .await?;
    let run = fire(&mut admin, "orphan", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let dead = tasks(&mut admin, &run.id).await?;
    assert_eq!(dead.len(), 3);
    for task in &dead {
        assert_eq!(task.status(), TaskStatus::Dead);
        assert!(
            task.last_error
                .contains("no executor serves task type \"translate\""),
            "{}",
            task.last_error
        );
    }
    // And they left the queue; the task a consumer covers waits in it for its executor.
    let mut stream = js.get_stream("FACTORY_TASKS").await?;
    assert_eq!(stream.info().await?.state.messages, 1);
    let waiting = tasks(&mut admin, &waiting.run_id).await?;
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].status(), TaskStatus::Pending, "{:?}", waiting[0]);
    assert!(
        stream
            .get_last_raw_message_by_subject("tasks.vision.ocr")
            .await
            .is_ok()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_run_stops_its_running_attempts() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let pool = env.db.pool().await?;
    let mut admin = env.admin().await?;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let app = axum::Router::new().route(
        "/long",
        axum::routing::post(move || {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(20)).await;
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/long", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    create(
        &mut admin,
        &format!("name: long\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: http, forEach: 'range(3)', timeout: 60s, params: {{url: '{url}'}}}}]\n"),
    )
    .await?;
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "long".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    wait_for(
        "the three calls to be running",
        Duration::from_secs(20),
        || async { Ok((started.load(Ordering::SeqCst) == 3).then_some(())) },
    )
    .await?;
    let cancelled_at = std::time::Instant::now();
    admin
        .cancel_run(CancelRunRequest {
            id: fired.run_id.clone(),
            reason: "too slow".to_owned(),
        })
        .await?;
    // Each running attempt stops and reports CANCELLED long before its call would have ended.
    wait_for(
        "the attempts to report",
        Duration::from_secs(10),
        || async {
            let (reported,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
             WHERE t.run_id::text = $1 AND a.status = 'CANCELLED'",
            )
            .bind(&fired.run_id)
            .fetch_one(&pool)
            .await?;
            Ok((reported == 3).then_some(()))
        },
    )
    .await?;
    assert!(cancelled_at.elapsed() < Duration::from_secs(10));
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(5)).await?;
    assert_eq!(run.status(), RunStatus::RunCancelled);
    Ok(())
}

/// A finished entry above every attempt ever handed out (forged by credentials that may write
/// the entries of the task's type) would make executors skip every later series of the task:
/// `RetryTask` lowers it to the new series' base, and the task runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_finished_entry_does_not_keep_a_redriven_task_from_running() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let (url, calls, failing) = switchable().await?;
    failing.store(true, Ordering::SeqCst);
    create(
        &mut admin,
        &format!(
            "name: forged\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{url}'}}, retry: {{maxAttempts: 1}}}}]\n"
        ),
    )
    .await?;
    let run = fire(&mut admin, "forged", serde_json::json!({})).await?;
    let dead = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!((dead.status(), dead.attempts), (TaskStatus::Dead, 1));
    let js = env.js().await?;
    let kv = js
        .get_key_value(taskfactory_model::subjects::FINISHED_TASKS_BUCKET)
        .await?;
    let key = taskfactory_model::subjects::finished_task_key(&dead.id, "http");
    kv.put(&key, u32::MAX.to_string().into()).await?;
    let before = calls.load(Ordering::SeqCst);

    failing.store(false, Ordering::SeqCst);
    admin
        .retry_task(RetryTaskRequest {
            id: dead.id.clone(),
        })
        .await?;
    let task = wait_for(
        "the redriven task to succeed",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            let id = dead.id.clone();
            async move {
                let task = admin.get_task(GetTaskRequest { id }).await?.into_inner();
                Ok((task.status() == TaskStatus::Succeeded).then_some(task))
            }
        },
    )
    .await?;
    assert_eq!(task.attempts, 2);
    assert_eq!(calls.load(Ordering::SeqCst), before + 1, "it ran once more");
    assert_eq!(
        kv.get(&key).await?.as_deref(),
        Some(&b"2"[..]),
        "lowered to the new series' base, then raised by its result"
    );
    Ok(())
}

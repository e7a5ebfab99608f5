//! Task execution: retries with backoff, dead letters, undecodable task messages, heartbeats that
//! outlive `ack_wait`, and an executor killed with work in flight.
//!
//! Each test talks to its own loopback HTTP server ([`ScriptedServer`]) whose answers are scripted
//! per call number and `Idempotency-Key` (the task id), and which records when each call arrived
//! and whether it finished, so what the executor did is observed from the outside.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use axum::http::StatusCode;
use futures::StreamExt;
use prost::Message as _;
use taskfactory_model::subjects;
use taskfactory_proto::v1::{
    GetTaskRequest, RetryPolicy, RunStatus, TaskInstance, TaskStatus, TriggerActivityRequest,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::context::fire as fire_and_finish;
use crate::support::{Admin, create, finished_run, played_result, tasks};

// ---------------------------------------------------------------------------------------------
// A scripted loopback HTTP endpoint.

/// Decides the answer to a call: `(call number for this key, 1-based; the JSON body)` →
/// `(status, how long to take)`.
type Script = Arc<dyn Fn(u32, &serde_json::Value) -> (StatusCode, Duration) + Send + Sync>;

#[derive(Default)]
struct Seen {
    /// When each call arrived, per `Idempotency-Key`, in arrival order.
    arrivals: HashMap<String, Vec<Instant>>,
    /// Calls that ran to the end of the handler (answered), per key.
    finished: HashMap<String, u32>,
}

/// `POST <url>` answers as its script says, recording every call per `Idempotency-Key`.
struct ScriptedServer {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

impl ScriptedServer {
    async fn start(script: Script) -> anyhow::Result<Self> {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let state = seen.clone();
        let app = axum::Router::new().route(
            "/work",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = state.clone();
                    let script = script.clone();
                    async move {
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        let call = {
                            let mut seen = state.lock().unwrap();
                            let arrivals = seen.arrivals.entry(key.clone()).or_default();
                            arrivals.push(Instant::now());
                            u32::try_from(arrivals.len()).unwrap_or(u32::MAX)
                        };
                        let (status, delay) = script(call, &body);
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        *state.lock().unwrap().finished.entry(key).or_default() += 1;
                        let answer = if status.is_success() {
                            serde_json::json!({"call": call})
                        } else {
                            serde_json::json!({"error": format!("scripted failure of call {call}")})
                        };
                        (status, axum::Json(answer))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/work", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, seen })
    }

    /// Arrival times per key.
    fn arrivals(&self) -> HashMap<String, Vec<Instant>> {
        self.seen.lock().unwrap().arrivals.clone()
    }

    /// Calls per key (arrived, finished or not).
    fn calls(&self) -> HashMap<String, usize> {
        self.seen
            .lock()
            .unwrap()
            .arrivals
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect()
    }

    /// `(calls arrived, calls finished)` over all keys.
    fn totals(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        (
            seen.arrivals.values().map(Vec::len).sum(),
            seen.finished.values().map(|n| *n as usize).sum(),
        )
    }

    /// Keys with a call that arrived and has not finished.
    fn in_flight(&self) -> HashSet<String> {
        let seen = self.seen.lock().unwrap();
        seen.arrivals
            .iter()
            .filter(|(key, arrivals)| {
                arrivals.len() > seen.finished.get(*key).copied().unwrap_or(0) as usize
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Keys with at least one finished call.
    fn finished_keys(&self) -> HashSet<String> {
        self.seen.lock().unwrap().finished.keys().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Steps.

/// A manually fired activity with one `http` template fanned out over `range(count)`; `extra` is
/// spliced into the template (retry, timeout).
fn http_fan_out(name: &str, url: &str, count: u32, extra: &str) -> String {
    format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ntasks:\n  - name: call\n    type: http\n    forEach: 'range({count})'\n    params: {{url: '{url}', body: {{n: '{{{{ item }}}}'}}}}\n{extra}"
    )
}

async fn fire(admin: &mut Admin, activity: &str) -> anyhow::Result<String> {
    Ok(admin
        .trigger_activity(TriggerActivityRequest {
            id: activity.to_owned(),
            ..Default::default()
        })
        .await
        .context("TriggerActivity")?
        .into_inner()
        .run_id)
}

async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<jetstream::consumer::Info> {
    let mut consumer: PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer(consumer)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {consumer} on {stream}: {e}"))?;
    Ok(consumer.info().await?.clone())
}

/// Waits until the executor's consumer for `task_type` and the orchestrator's results consumer
/// have nothing pending or unacknowledged: every task settled, every result recorded.
async fn wait_settled(js: &jetstream::Context, task_type: &str) -> anyhow::Result<()> {
    wait_for(
        "tasks and results to settle",
        Duration::from_secs(30),
        || async {
            let tasks = consumer_info(
                js,
                subjects::TASKS_STREAM,
                &subjects::executor_consumer(task_type),
            )
            .await?;
            let results = consumer_info(
                js,
                subjects::RESULTS_STREAM,
                subjects::ORCHESTRATOR_RESULTS_CONSUMER,
            )
            .await?;
            let idle = |i: &jetstream::consumer::Info| i.num_pending == 0 && i.num_ack_pending == 0;
            Ok((idle(&tasks) && idle(&results)).then_some(()))
        },
    )
    .await
}

/// Messages stored on the stream under exactly `subject`.
async fn subject_count(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<usize> {
    let stream = js.get_stream(stream).await?;
    let mut info = stream.info_with_subjects(subject).await?;
    let mut count = 0;
    while let Some(entry) = info.next().await {
        let (name, n) = entry?;
        if name == subject {
            count += n;
        }
    }
    Ok(count)
}

/// Every message stored under `subject`, read with an ephemeral consumer.
async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await?
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: subject.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::None,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = Vec::new();
    loop {
        let mut batch = consumer.fetch().max_messages(1000).messages().await?;
        while let Some(message) = batch.next().await {
            messages.push(message.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        let mut consumer = consumer.clone();
        if consumer.info().await?.num_pending == 0 {
            return Ok(messages);
        }
    }
}

/// `task_attempts` rows of a run's tasks: task id → `(attempt, status)`, ordered; results only
/// (a long attempt's `RUNNING` report is left out).
async fn attempt_rows(
    pool: &sqlx::PgPool,
    run_id: &str,
) -> anyhow::Result<BTreeMap<String, Vec<(i32, String)>>> {
    let rows: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT a.task_id::text, a.attempt, a.status FROM task_attempts a \
         JOIN tasks t ON t.id = a.task_id WHERE t.run_id::text = $1 AND a.status <> 'RUNNING' \
         ORDER BY a.task_id, a.attempt, a.status",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let mut by_task: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    for (task, attempt, status) in rows {
        by_task.entry(task).or_default().push((attempt, status));
    }
    Ok(by_task)
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// 1. Retries until success.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_that_fail_twice_succeed_on_the_third_attempt() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = ScriptedServer::start(Arc::new(|call, _| {
        let status = if call <= 2 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        (status, Duration::ZERO)
    }))
    .await?;
    create(
        &mut admin,
        &http_fan_out(
            "flaky",
            &server.url,
            100,
            "    retry: {maxAttempts: 5, initialBackoff: 0.1s, maxBackoff: 0.5s}\n",
        ),
    )
    .await?;
    let run_id = fire(&mut admin, "flaky").await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    assert_eq!(
        (run.tasks_spawned, run.tasks_succeeded, run.tasks_failed),
        (100, 100, 0)
    );
    wait_settled(&js, "http").await?;

    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed.len(), 100);
    let ids: HashSet<String> = listed.iter().map(|t| t.id.clone()).collect();
    assert_eq!(ids.len(), 100);
    for task in &listed {
        assert_eq!(task.status(), TaskStatus::Succeeded, "ListTasks: {task:?}");
        assert_eq!(task.attempts, 3, "ListTasks: {task:?}");
        let got = admin
            .get_task(GetTaskRequest {
                id: task.id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(got.status(), TaskStatus::Succeeded, "GetTask: {got:?}");
        assert_eq!(got.attempts, 3, "GetTask: {got:?}");
        // Why it took three: each attempt as its executor reported it.
        assert!(task.attempt_history.is_empty(), "ListTasks leaves it out");
        // (An attempt slowed past a second by the load also has a RUNNING report.)
        let history: Vec<(u32, TaskStatus)> = got
            .attempt_history
            .iter()
            .filter(|a| a.status() != TaskStatus::Running)
            .map(|a| (a.attempt, a.status()))
            .collect();
        assert_eq!(
            history,
            vec![
                (1, TaskStatus::Failed),
                (2, TaskStatus::Failed),
                (3, TaskStatus::Succeeded)
            ],
            "GetTask: {got:?}"
        );
        for attempt in &got.attempt_history {
            assert!(!attempt.executor.is_empty(), "{attempt:?}");
            if attempt.status() == TaskStatus::Running {
                continue;
            }
            let (started, finished) = (
                attempt.started_at.as_ref().expect("started"),
                attempt.finished_at.as_ref().expect("finished"),
            );
            assert!(
                (started.seconds, started.nanos) <= (finished.seconds, finished.nanos),
                "{attempt:?}"
            );
            if attempt.status() == TaskStatus::Failed {
                assert!(attempt.error.contains("500"), "{attempt:?}");
                assert!(attempt.output.is_none());
            } else {
                assert!(attempt.error.is_empty() && attempt.output.is_some());
            }
        }
        assert_eq!(
            taskfactory_model::values::value_to_json(got.output.as_ref().unwrap()),
            serde_json::json!({"call": 3}),
            "the output is the third call's answer"
        );
    }

    let calls = server.calls();
    assert_eq!(
        calls.keys().cloned().collect::<HashSet<_>>(),
        ids,
        "one key per task"
    );
    let wrong: Vec<_> = calls.iter().filter(|(_, n)| **n != 3).collect();
    assert!(
        wrong.is_empty(),
        "keys not called exactly 3 times: {wrong:?}"
    );

    let pool = env.db.pool().await?;
    let attempts = attempt_rows(&pool, &run_id).await?;
    assert_eq!(attempts.len(), 100);
    let expected = vec![
        (1, "FAILED".to_owned()),
        (2, "FAILED".to_owned()),
        (3, "SUCCEEDED".to_owned()),
    ];
    for (task, rows) in &attempts {
        assert_eq!(rows, &expected, "task_attempts of {task}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Retries exhausted: dead, dead-lettered, on the configured backoff.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_failing_tasks_die_after_five_attempts_on_the_backoff_and_are_dead_lettered()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = ScriptedServer::start(Arc::new(|_, _| {
        (StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO)
    }))
    .await?;
    create(
        &mut admin,
        &http_fan_out(
            "doomed",
            &server.url,
            100,
            "    retry: {maxAttempts: 5, initialBackoff: 0.2s, maxBackoff: 1s, multiplier: 2}\n",
        ),
    )
    .await?;
    let run_id = fire(&mut admin, "doomed").await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed, "{run:?}");
    assert_eq!(
        (run.tasks_spawned, run.tasks_succeeded, run.tasks_failed),
        (100, 0, 100)
    );
    wait_settled(&js, "http").await?;

    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed.len(), 100);
    let by_id: HashMap<String, _> = listed.iter().map(|t| (t.id.clone(), t)).collect();
    for task in &listed {
        assert_eq!(task.status(), TaskStatus::Dead, "{task:?}");
        assert_eq!(task.attempts, 5, "{task:?}");
        assert!(
            task.last_error.contains("500"),
            "the last error is the HTTP failure: {task:?}"
        );
    }

    // Five calls per task, spaced by the backoff: 0.2, 0.4, 0.8 and 1.0 (capped) seconds, each
    // ±20% jitter (never above the cap), plus scheduling slack.
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        max_backoff: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        multiplier: 2.0,
    };
    let nominal = [0.2, 0.4, 0.8, 1.0];
    let arrivals = server.arrivals();
    assert_eq!(arrivals.len(), 100);
    let mut problems = Vec::new();
    for (key, times) in &arrivals {
        assert!(by_id.contains_key(key), "a call for an unknown task {key}");
        assert_eq!(times.len(), 5, "calls for {key}");
        for (i, pair) in times.windows(2).enumerate() {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            let expected = nominal[i];
            // The delay the executor asked for on this attempt: the redelivery cannot come sooner.
            let asked =
                taskfactory_model::attempt::backoff(&policy, i as u32 + 1, key).as_secs_f64();
            if gap < 0.75 * expected || gap > expected * 1.25 + 1.5 || gap < asked - 0.02 {
                problems.push(format!(
                    "{key}: gap {} after attempt {} is {gap:.3}s (nominal {expected}s, asked {asked:.3}s)",
                    i + 1,
                    i + 1
                ));
            }
        }
    }
    assert!(problems.is_empty(), "backoff not honoured: {problems:#?}");

    let pool = env.db.pool().await?;
    let attempts = attempt_rows(&pool, &run_id).await?;
    assert_eq!(attempts.len(), 100);
    let expected: Vec<(i32, String)> = (1..=4)
        .map(|a| (a, "FAILED".to_owned()))
        .chain([(5, "DEAD".to_owned())])
        .collect();
    for (task, rows) in &attempts {
        assert_eq!(rows, &expected, "task_attempts of {task}");
    }

    // Exactly one dead letter per task, carrying the task, its last error and the attempt count.
    let dlq_subject = subjects::task_dlq_subject("http");
    wait_for("100 dead letters", Duration::from_secs(20), || async {
        let n = subject_count(&js, subjects::DLQ_STREAM, &dlq_subject).await?;
        Ok((n >= 100).then_some(()))
    })
    .await?;
    let letters = read_all(&js, subjects::DLQ_STREAM, &dlq_subject).await?;
    assert_eq!(letters.len(), 100, "dead letters on {dlq_subject}");
    let mut lettered = HashSet::new();
    for letter in &letters {
        assert_eq!(letter.subject.as_str(), dlq_subject);
        let task = TaskInstance::decode(letter.payload.as_ref())
            .context("a dead letter's body is the TaskInstance")?;
        let listed = by_id
            .get(&task.task_id)
            .with_context(|| format!("dead letter for an unknown task {}", task.task_id))?;
        assert_eq!(task.run_id, run_id);
        assert_eq!(
            header(letter, subjects::HEADER_ATTEMPTS),
            Some("5"),
            "attempt count of {}",
            task.task_id
        );
        assert_eq!(
            header(letter, subjects::HEADER_ERROR),
            Some(listed.last_error.as_str()),
            "the dead letter carries the last error of {}",
            task.task_id
        );
        assert!(
            header(letter, subjects::HEADER_MSG_ID)
                .is_some_and(|id| id.starts_with("dlq:FACTORY_TASKS:")),
            "deduplicated by the task message's stream, sequence and time"
        );
        assert_eq!(
            header(letter, subjects::HEADER_ORIGINAL_SUBJECT),
            Some("tasks.http")
        );
        assert!(
            lettered.insert(task.task_id.clone()),
            "twice: {}",
            task.task_id
        );
    }
    assert_eq!(lettered.len(), 100);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. An undecodable task message.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_task_is_dead_lettered_after_one_delivery_and_the_next_task_runs()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;

    // 0xff 0xfe …: a field tag with wire type 7, which protobuf does not have.
    let garbage = b"\xff\xfe\x20garbage, not a TaskInstance\x00\x01".to_vec();
    assert!(TaskInstance::decode(garbage.as_slice()).is_err());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::HEADER_MSG_ID, "garbage-1");
    let ack = js
        .publish_with_headers(
            subjects::task_subject("log"),
            headers,
            garbage.clone().into(),
        )
        .await?
        .await?;
    assert_eq!(ack.stream, subjects::TASKS_STREAM);

    create(
        &mut admin,
        "name: after-garbage\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, params: {after: garbage}}]",
    )
    .await?;
    let run_id = fire(&mut admin, "after-garbage").await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    let task = tasks(&mut admin, &run_id).await?.remove(0);
    assert_eq!(task.status(), TaskStatus::Succeeded);
    assert_eq!(task.attempts, 1);

    let dlq_subject = subjects::task_dlq_subject("log");
    let letter = wait_for("the dead letter", Duration::from_secs(20), || async {
        let dlq = js.get_stream(subjects::DLQ_STREAM).await?;
        Ok(dlq.get_last_raw_message_by_subject(&dlq_subject).await.ok())
    })
    .await?;
    assert_eq!(
        letter.payload.as_ref(),
        garbage.as_slice(),
        "the bytes as sent"
    );
    let headers = &letter.headers;
    let error = headers
        .get(subjects::HEADER_ERROR)
        .map(|v| v.as_str())
        .unwrap_or_default();
    assert!(error.contains("not a TaskInstance"), "{error}");
    assert_eq!(
        headers
            .get(subjects::HEADER_ORIGINAL_SUBJECT)
            .map(|v| v.as_str()),
        Some("tasks.log")
    );
    assert_eq!(
        headers
            .get(subjects::HEADER_ORIGINAL_SEQUENCE)
            .map(|v| v.as_str()),
        Some(ack.sequence.to_string().as_str())
    );

    // One delivery each: the garbage (terminated) and the log task (acked), nothing redelivered.
    let info = wait_for(
        "the log consumer to settle",
        Duration::from_secs(20),
        || async {
            let info = consumer_info(
                &js,
                subjects::TASKS_STREAM,
                &subjects::executor_consumer("log"),
            )
            .await?;
            Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(info))
        },
    )
    .await?;
    assert_eq!(
        info.delivered.consumer_sequence, 2,
        "two deliveries in all, the garbage once: {info:?}"
    );
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert_eq!(
        subject_count(&js, subjects::DLQ_STREAM, &dlq_subject).await?,
        1,
        "one dead letter"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Heartbeats keep long tasks in hand.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_running_three_times_ack_wait_are_kept_alive_and_run_once() -> anyhow::Result<()> {
    let ack_wait = Duration::from_secs(1);
    let env = TestEnv::new(EnvOptions {
        executor_ack_wait: ack_wait,
        ..Default::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server =
        ScriptedServer::start(Arc::new(move |_, _| (StatusCode::OK, ack_wait * 3))).await?;
    create(
        &mut admin,
        &http_fan_out("slow", &server.url, 50, "    timeout: 10s\n"),
    )
    .await?;
    let info = consumer_info(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(
        info.config.ack_wait, ack_wait,
        "the short ack_wait is in force"
    );

    let run_id = fire(&mut admin, "slow").await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    assert_eq!((run.tasks_spawned, run.tasks_succeeded), (50, 50));
    wait_settled(&js, "http").await?;

    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed.len(), 50);
    for task in &listed {
        assert_eq!(task.status(), TaskStatus::Succeeded, "{task:?}");
        assert_eq!(task.attempts, 1, "{task:?}");
    }
    let calls = server.calls();
    assert_eq!(calls.len(), 50);
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "redelivered and run again: {repeated:?}"
    );
    let info = consumer_info(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(
        info.delivered.consumer_sequence, 50,
        "one delivery per task: {info:?}"
    );
    let attempts = attempt_rows(&env.db.pool().await?, &run_id).await?;
    for (task, rows) in &attempts {
        assert_eq!(
            rows,
            &[(1, "SUCCEEDED".to_owned())],
            "task_attempts of {task}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. SIGKILL with work in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executor_killed_with_tasks_in_flight_finishes_each_task_once_after_a_restart()
-> anyhow::Result<()> {
    const TASKS: usize = 200;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;

    // Every publish of a run's completion, duplicates included (a core subscription sees even
    // those JetStream would drop).
    let client = env.nats_client().await?;
    let mut completions_sub = client.subscribe(subjects::RUN_COMPLETED_EVENT).await?;
    client.flush().await?;
    let completions: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = completions.clone();
    tokio::spawn(async move {
        while let Some(message) = completions_sub.next().await {
            let event = serde_json::from_slice(&message.payload).unwrap_or_default();
            sink.lock().unwrap().push(event);
        }
    });

    // 0.5–1 s per call, varied by item.
    let server = ScriptedServer::start(Arc::new(|_, body| {
        let n = body.get("n").and_then(|n| n.as_u64()).unwrap_or(0);
        (StatusCode::OK, Duration::from_millis(500 + (n * 37) % 500))
    }))
    .await?;
    create(
        &mut admin,
        &http_fan_out("crashy", &server.url, TASKS as u32, "    timeout: 10s\n"),
    )
    .await?;
    let executor_env = [
        ("TASKFACTORY_ACK_WAIT", "2s"),
        ("TASKFACTORY_TASK_CONCURRENCY", "50"),
    ];
    let executor = env.spawn_process(Service::Executor, &executor_env)?;
    env.wait_ready(&[Service::Executor]).await?;

    let run_id = fire(&mut admin, "crashy").await?;
    wait_for("many tasks in flight", Duration::from_secs(60), || async {
        let (arrived, finished) = server.totals();
        Ok((finished >= 20 && arrived - finished >= 10).then_some(()))
    })
    .await?;
    let killed_at = chrono::Utc::now();
    executor.kill();
    let in_flight_at_kill = server.in_flight();
    let finished_at_kill = server.finished_keys().len();
    assert!(
        !in_flight_at_kill.is_empty(),
        "some tasks had started and not finished at the kill"
    );
    assert!(finished_at_kill < TASKS, "work was left at the kill");

    let _executor = env.spawn_process(Service::Executor, &executor_env)?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(90)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    assert_eq!(
        (run.tasks_spawned, run.tasks_succeeded, run.tasks_failed),
        (TASKS as u32, TASKS as u32, 0),
        "each task counted once"
    );
    wait_settled(&js, "http").await?;

    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed.len(), TASKS);
    let ids: HashSet<String> = listed.iter().map(|t| t.id.clone()).collect();
    assert_eq!(ids.len(), TASKS);
    for task in &listed {
        assert_eq!(task.status(), TaskStatus::Succeeded, "{task:?}");
        if in_flight_at_kill.contains(&task.id) {
            assert!(
                task.attempts >= 2,
                "interrupted at the kill, so delivered again: {task:?}"
            );
        }
    }
    let answered = server.finished_keys();
    assert!(
        ids.iter().all(|id| answered.contains(id)),
        "every task's call was answered at least once"
    );

    let pool = env.db.pool().await?;
    let by_status: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM tasks WHERE run_id::text = $1 GROUP BY status",
    )
    .bind(&run_id)
    .fetch_all(&pool)
    .await?;
    assert_eq!(by_status, [("SUCCEEDED".to_owned(), TASKS as i64)]);
    let attempts = attempt_rows(&pool, &run_id).await?;
    assert_eq!(
        attempts.len(),
        TASKS,
        "every task has its attempts recorded"
    );
    // The run was announced once: once on the stream, and published once.
    wait_for(
        "the run's announcement",
        Duration::from_secs(20),
        || async {
            let announced: Option<(bool,)> =
                sqlx::query_as("SELECT announced_at IS NOT NULL FROM runs WHERE id::text = $1")
                    .bind(&run_id)
                    .fetch_optional(&pool)
                    .await?;
            let seen = completions
                .lock()
                .unwrap()
                .iter()
                .any(|e| e["runId"] == run_id.as_str());
            Ok((announced == Some((true,)) && seen).then_some(()))
        },
    )
    .await?;
    wait_settled(&js, "http").await?;
    assert_eq!(
        subject_count(&js, subjects::EVENTS_STREAM, subjects::RUN_COMPLETED_EVENT).await?,
        1,
        "one run, one stored completion"
    );
    let published: Vec<serde_json::Value> = completions.lock().unwrap().clone();
    assert_eq!(published.len(), 1, "published once: {published:?}");
    assert_eq!(published[0]["runId"], run_id.as_str());
    assert_eq!(published[0]["status"], "RUN_SUCCEEDED");
    assert_eq!(published[0]["tasksSucceeded"], TASKS);

    // Executions are at least once: a SIGKILL after an attempt's result was published but before
    // its task message was acked means the task is delivered again and runs again (the outside
    // world sees the same Idempotency-Key twice). The task still completes once (checked above);
    // a second SUCCEEDED attempt is allowed only for a task whose first success finished right at
    // the kill.
    let mut unexplained = Vec::new();
    for (task, rows) in &attempts {
        let successes = rows.iter().filter(|(_, s)| s == "SUCCEEDED").count();
        if successes == 1 {
            continue;
        }
        let first_success: Option<(Option<chrono::DateTime<chrono::Utc>>,)> = sqlx::query_as(
            "SELECT finished_at FROM task_attempts \
             WHERE task_id::text = $1 AND status = 'SUCCEEDED' ORDER BY attempt LIMIT 1",
        )
        .bind(task)
        .fetch_optional(&pool)
        .await?;
        let at_the_kill = first_success
            .and_then(|(finished,)| finished)
            .map(|f| (f - killed_at).num_milliseconds())
            .is_some_and(|ms| (-2000..=1000).contains(&ms));
        if successes == 0 || !at_the_kill {
            unexplained.push(format!("{task}: {rows:?}"));
        }
    }
    assert!(
        unexplained.is_empty(),
        "tasks whose attempts the kill does not explain: {unexplained:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_type_limit_bounds_how_many_tasks_of_that_type_run_at_once() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut config = taskfactory_executor::Config::local(&env.nats.url());
    config.nats = env.nats_args("executor");
    config.egress_allow = "127.0.0.1".to_owned();
    config.type_concurrency = vec![("http".to_owned(), 2)];
    let stop = tokio_util::sync::CancellationToken::new();
    let executor = tokio::spawn(taskfactory_executor::run(config, stop.clone()));

    // An endpoint that remembers the most calls it had at once.
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), most.clone());
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::post(move || {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let current = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(current, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/slow", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut admin = env.admin().await?;
    create(
        &mut admin,
        &format!("name: limited\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: http, forEach: 'range(10)', params: {{url: '{url}'}}}}]\n"),
    )
    .await?;
    let run = fire_and_finish(&mut admin, "limited", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most two http tasks at once, and two did run together"
    );
    stop.cancel();
    executor.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_with_retry_after_is_retried_no_sooner_than_asked() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/busy",
        axum::routing::post(move || {
            let seen = seen.clone();
            async move {
                let first = {
                    let mut calls = seen.lock().unwrap();
                    calls.push(Instant::now());
                    calls.len() == 1
                };
                if first {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("Retry-After", "2")],
                        "slow down",
                    )
                } else {
                    (StatusCode::OK, [("Retry-After", "0")], "{}")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/busy", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        &format!("name: polite\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: http, params: {{url: '{url}'}}, retry: {{maxAttempts: 3, initialBackoff: 0.1s}}}}]\n"),
    )
    .await?;
    let run = fire_and_finish(&mut admin, "polite", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let gap = calls[1] - calls[0];
    assert!(
        gap >= Duration::from_secs(2),
        "Retry-After: 2 honoured, not the 0.1 s backoff: {gap:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_deleted_under_a_running_executor_is_recreated() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let js = env.js().await?;
    // What a server restart can do: the executor's consumer is gone.
    js.get_stream("FACTORY_TASKS")
        .await?
        .delete_consumer("taskfactory-executor-log")
        .await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: after-loss\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await?;
    let run = fire_and_finish(&mut admin, "after-loss", serde_json::json!({})).await?;
    assert_eq!(
        run.status(),
        RunStatus::RunSucceeded,
        "the executor consumes again"
    );
    let page = taskfactory_runtime::metrics::handle().render();
    assert!(
        page.contains(
            "taskfactory_consumer_recreations_total{consumer=\"taskfactory-executor-log\"}"
        ),
        "counted: {page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attempt_records_its_start_and_a_long_one_shows_running() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let slow =
        ScriptedServer::start(Arc::new(|_, _| (StatusCode::OK, Duration::from_secs(3)))).await?;
    let quick = ScriptedServer::start(Arc::new(|_, _| (StatusCode::OK, Duration::ZERO))).await?;
    create(&mut admin, &http_fan_out("slow", &slow.url, 1, "")).await?;
    let run_id = fire(&mut admin, "slow").await?;
    let task_id = wait_for("the task", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move {
            Ok(tasks(&mut admin, &run_id)
                .await?
                .first()
                .map(|t| t.id.clone()))
        }
    })
    .await?;
    let get = |admin: &mut Admin| {
        let mut admin = admin.clone();
        let id = task_id.clone();
        async move { anyhow::Ok(admin.get_task(GetTaskRequest { id }).await?.into_inner()) }
    };
    // While it runs (its start was reported before it ran), the task says so, and who runs it.
    let running = wait_for("the task to show RUNNING", Duration::from_secs(10), || {
        let fetch = get(&mut admin);
        async move {
            let task = fetch.await?;
            Ok((task.status() == TaskStatus::Running).then_some(task))
        }
    })
    .await?;
    assert_eq!(running.attempts, 1);
    assert_eq!(running.attempt_history.len(), 1, "{running:?}");
    let report = &running.attempt_history[0];
    assert_eq!((report.attempt, report.status()), (1, TaskStatus::Running));
    assert!(!report.executor.is_empty() && report.started_at.is_some());

    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let done = get(&mut admin).await?;
    assert_eq!(done.status(), TaskStatus::Succeeded);
    let history: Vec<(u32, TaskStatus)> = done
        .attempt_history
        .iter()
        .map(|a| (a.attempt, a.status()))
        .collect();
    assert_eq!(
        history,
        vec![(1, TaskStatus::Running), (1, TaskStatus::Succeeded)]
    );

    // A quick task's start is on record too, before it ran, with the id of its execution.
    create(&mut admin, &http_fan_out("quick", &quick.url, 1, "")).await?;
    let run_id = fire(&mut admin, "quick").await?;
    finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    let quick = tasks(&mut admin, &run_id).await?;
    let quick = admin
        .get_task(GetTaskRequest {
            id: quick[0].id.clone(),
        })
        .await?
        .into_inner();
    let history: Vec<TaskStatus> = quick.attempt_history.iter().map(|a| a.status()).collect();
    assert_eq!(history, vec![TaskStatus::Running, TaskStatus::Succeeded]);
    assert!(!quick.attempt_history[0].execution.is_empty());
    Ok(())
}

/// Publishes a result the way executors do (to its run's subject, with its message id).
async fn publish_result(
    js: &jetstream::Context,
    result: taskfactory_proto::v1::TaskResult,
) -> anyhow::Result<()> {
    let subject = subjects::result_subject("played", &result.run_id);
    let msg_id = subjects::result_msg_id(
        &result.task_id,
        result.attempt,
        result.status().as_str_name(),
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id.as_str());
    js.publish_with_headers(subject, headers, result.encode_to_vec().into())
        .await?
        .await?;
    Ok(())
}

/// The trigger and the orchestrator, no executor (the test plays it), and one run of an activity
/// `played` with tasks of type `played`.
struct Played {
    // Fields drop in order: the services stop before their NATS and database go.
    _services: [taskfactory_tests::Running; 2],
    _env: TestEnv,
    admin: Admin,
    js: jetstream::Context,
    run_id: String,
    tasks: Vec<taskfactory_proto::v1::Task>,
    /// The result-token key, to report as an executor that was handed the tasks.
    key: Vec<u8>,
}

async fn played_run(count: usize) -> anyhow::Result<Played> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let services = [
        env.start(Service::Trigger),
        env.start(Service::Orchestrator),
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        &format!("name: played\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: played, forEach: 'range({count})'}}]\n"),
    )
    .await?;
    let run_id = fire(&mut admin, "played").await?;
    let listed = wait_for("the tasks", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move { Ok(Some(tasks(&mut admin, &run_id).await?).filter(|t| t.len() == count)) }
    })
    .await?;
    let key = crate::support::result_key(&env).await?;
    Ok(Played {
        key,
        _services: services,
        _env: env,
        admin,
        js,
        run_id,
        tasks: listed,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_carrying_what_postgres_cannot_store_are_recorded_not_stuck() -> anyhow::Result<()>
{
    let Played {
        mut admin,
        js,
        run_id,
        tasks: listed,
        _services,
        _env,
        key,
    } = played_run(2).await?;
    // NUL characters: Postgres text and jsonb refuse them, an executor may well send them.
    let mut failed = played_result(&key, &listed[0], 1, TaskStatus::Dead);
    failed.error = "bad\0byte".to_owned();
    failed.executor = "nul\0executor".to_owned();
    // And a time before anything Postgres can store: kept as unknown.
    failed.started_at = Some(prost_types::Timestamp {
        seconds: -1_000_000_000_000,
        nanos: 0,
    });
    publish_result(&js, failed).await?;
    let mut succeeded = played_result(&key, &listed[1], 1, TaskStatus::Succeeded);
    succeeded.output = Some(taskfactory_model::values::json_to_value(
        &serde_json::json!({"te\u{0}xt": "a\u{0}b", "list": ["\u{0}"]}),
    ));
    publish_result(&js, succeeded).await?;

    let run = finished_run(&admin, &run_id, Duration::from_secs(20)).await?;
    assert_eq!((run.tasks_succeeded, run.tasks_failed), (1, 1));
    let dead = admin
        .get_task(GetTaskRequest {
            id: listed[0].id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(dead.status(), TaskStatus::Dead);
    assert_eq!(dead.last_error, "bad\u{fffd}byte");
    assert_eq!(dead.attempt_history[0].executor, "nul\u{fffd}executor");
    let done = admin
        .get_task(GetTaskRequest {
            id: listed[1].id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(done.status(), TaskStatus::Succeeded);
    assert_eq!(
        done.output
            .as_ref()
            .map(taskfactory_model::values::value_to_json),
        Some(serde_json::json!({"te\u{fffd}xt": "a\u{fffd}b", "list": ["\u{fffd}"]}))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_and_out_of_order_reports_never_move_a_task_backwards() -> anyhow::Result<()> {
    // The test plays the executor, sending reports in the orders concurrency can produce.
    let Played {
        admin,
        js,
        run_id,
        tasks: listed,
        _services,
        _env,
        key,
    } = played_run(2).await?;
    let report = |task: usize, attempt: u32, status: TaskStatus| {
        let result = played_result(&key, &listed[task], attempt, status);
        publish_result(&js, result)
    };
    let state = |task: usize| {
        let mut admin = admin.clone();
        let id = listed[task].id.clone();
        async move {
            let task = admin.get_task(GetTaskRequest { id }).await?.into_inner();
            anyhow::Ok((task.status(), task.attempts, task.attempt_history.len()))
        }
    };
    let settle = |task: usize, history: usize| {
        wait_for(
            "the report to be recorded",
            Duration::from_secs(10),
            move || {
                let state = state(task);
                async move { Ok(Some(state.await?).filter(|s| s.2 == history)) }
            },
        )
    };

    // Task 0: attempt 2 is running when attempt 1's failure arrives late; it stays running.
    report(0, 2, TaskStatus::Running).await?;
    assert_eq!(settle(0, 1).await?, (TaskStatus::Running, 2, 1));
    report(0, 1, TaskStatus::Failed).await?;
    assert_eq!(
        settle(0, 2).await?,
        (TaskStatus::Running, 2, 2),
        "late failure kept in history only"
    );
    // Attempt 2's executor died; attempt 3 runs: the task shows the newer one.
    report(0, 3, TaskStatus::Running).await?;
    assert_eq!(settle(0, 3).await?, (TaskStatus::Running, 3, 3));
    report(0, 3, TaskStatus::Succeeded).await?;
    assert_eq!(settle(0, 4).await?, (TaskStatus::Succeeded, 3, 4));
    // After the end, a running report changes nothing but the history.
    report(0, 4, TaskStatus::Running).await?;
    assert_eq!(settle(0, 5).await?, (TaskStatus::Succeeded, 3, 5));

    // Task 1: attempt 1 failed before its own running report was handled: it stays failed.
    report(1, 1, TaskStatus::Failed).await?;
    assert_eq!(settle(1, 1).await?, (TaskStatus::Failed, 1, 1));
    report(1, 1, TaskStatus::Running).await?;
    assert_eq!(settle(1, 2).await?, (TaskStatus::Failed, 1, 2));
    report(1, 2, TaskStatus::Dead).await?;
    assert_eq!(settle(1, 3).await?, (TaskStatus::Dead, 2, 3));

    let run = finished_run(&admin, &run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    assert_eq!((run.tasks_succeeded, run.tasks_failed), (1, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_results_ends_as_recording_them_one_by_one_would() -> anyhow::Result<()> {
    use taskfactory_orchestrator::store::{self, Recorded, ResultRecord};
    let Played {
        mut admin,
        tasks: batched,
        _services,
        _env,
        ..
    } = played_run(4).await?;
    let pool = _env.db.pool().await?;
    // A second run of the same activity: its results are recorded one at a time.
    let run_id = fire(&mut admin, "played").await?;
    let single = wait_for("the second run's tasks", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move { Ok(Some(tasks(&mut admin, &run_id).await?).filter(|t| t.len() == 4)) }
    })
    .await?;
    let result =
        |task: &taskfactory_proto::v1::Task, attempt: u32, status: TaskStatus| ResultRecord {
            execution: String::new(),
            task_id: task.id.parse().unwrap(),
            attempt,
            status,
            error: format!("attempt {attempt} {}", status.as_str_name()),
            output: (status == TaskStatus::Succeeded)
                .then(|| serde_json::json!({"attempt": attempt})),
            executor: "played-by-the-test".to_owned(),
            started_at: None,
            finished_at: None,
            claim: Some(taskfactory_model::results::Claim {
                token_valid: true,
                task_type: task.r#type.clone(),
                run_id: task.run_id.clone(),
                activity_id: task.activity_id.clone(),
            }),
        };
    // An execution's start report.
    let start = |task: &taskfactory_proto::v1::Task, attempt: u32, execution: &str| {
        let mut start = result(task, attempt, TaskStatus::Running);
        start.execution = execution.to_owned();
        start.error = String::new();
        start
    };
    // What concurrency and redelivery can produce, in one batch: a repeat, a late older failure,
    // a result after the task's end, a task nobody made; and a result claiming another type.
    // Starts among them: a retry's (no repetition), a second execution of one attempt and a start
    // after the task's end (repetitions, counted once each), a start redelivered (not again).
    let first = |t: &[taskfactory_proto::v1::Task]| {
        let mut unknown = result(&t[0], 1, TaskStatus::Dead);
        unknown.task_id = taskfactory_model::ids::TaskId(uuid::Uuid::new_v4());
        let mut other_type = result(&t[3], 1, TaskStatus::Succeeded);
        if let Some(claim) = other_type.claim.as_mut() {
            claim.task_type = "http".to_owned();
        }
        vec![
            start(&t[0], 1, "a"),
            result(&t[0], 1, TaskStatus::Failed),
            result(&t[0], 1, TaskStatus::Failed),
            start(&t[0], 2, "b"),
            start(&t[0], 2, "c"),
            start(&t[0], 2, "c"),
            result(&t[1], 2, TaskStatus::Failed),
            result(&t[1], 1, TaskStatus::Failed),
            result(&t[0], 2, TaskStatus::Succeeded),
            result(&t[0], 3, TaskStatus::Dead),
            unknown,
            other_type,
            result(&t[2], 1, TaskStatus::Dead),
            start(&t[2], 2, "d"),
        ]
    };
    // The run's last two tasks end in one batch.
    let second = |t: &[taskfactory_proto::v1::Task]| {
        vec![
            result(&t[1], 3, TaskStatus::Succeeded),
            result(&t[2], 2, TaskStatus::Succeeded),
            result(&t[3], 1, TaskStatus::Succeeded),
        ]
    };
    let kind = |r: &Recorded| match r {
        Recorded::UnknownTask => "unknown".to_owned(),
        Recorded::Refused(refusal) => format!("refused: {}", refusal.reason()),
        Recorded::AlreadyFinal => "already final".to_owned(),
        Recorded::Applied(None, _) => "applied".to_owned(),
        Recorded::Applied(Some(run), _) => format!("applied, run {}", run.status.as_str_name()),
    };
    let repeated = || {
        let scrape =
            crate::support::Scrape::parse(&taskfactory_runtime::metrics::handle().render())
                .unwrap();
        scrape.count(
            taskfactory_runtime::metrics::REPEATED_EXECUTIONS,
            &[("type", batched[0].r#type.as_str())],
        )
    };
    let mut outcomes = Vec::new();
    let mut repetitions = Vec::new();
    type Step<'a> = &'a dyn Fn(&[taskfactory_proto::v1::Task]) -> Vec<ResultRecord>;
    let steps: [Step<'_>; 2] = [&first, &second];
    for step in steps {
        let before = repeated();
        let batch: Vec<String> = store::record_results(&pool, &step(&batched))
            .await?
            .iter()
            .map(kind)
            .collect();
        let after_batch = repeated();
        let mut one_by_one = Vec::new();
        for record in step(&single) {
            one_by_one.push(kind(&store::record_result(&pool, &record).await?));
        }
        assert_eq!(batch, one_by_one);
        outcomes.push(batch);
        repetitions.push((after_batch - before, repeated() - after_batch));
    }
    assert_eq!(
        repetitions,
        [(2.0, 2.0), (0.0, 0.0)],
        "the same starts count as repetitions both ways"
    );
    assert_eq!(
        outcomes,
        [
            vec![
                "applied",
                "applied",
                "applied",
                "applied",
                "applied",
                "applied",
                "applied",
                "applied",
                "applied",
                "already final",
                "unknown",
                "refused: wrong_task",
                "applied",
                "applied"
            ],
            vec!["applied", "already final", "applied, run RUN_FAILED"],
        ]
    );

    // Tasks, attempt histories and runs are the same both ways.
    type TaskRow = (i32, String, i32, String, Option<serde_json::Value>, bool);
    type AttemptRow = (i32, i32, String, String, Option<serde_json::Value>, String);
    let state = |run: String| {
        let pool = pool.clone();
        async move {
            let run = uuid::Uuid::parse_str(&run)?;
            let tasks: Vec<TaskRow> = sqlx::query_as(
                "SELECT item_index, status, attempts, last_error, output, finished_at IS NOT NULL \
                 FROM tasks WHERE run_id = $1 ORDER BY item_index",
            )
            .bind(run)
            .fetch_all(&pool)
            .await?;
            let attempts: Vec<AttemptRow> = sqlx::query_as(
                "SELECT t.item_index, a.attempt, a.status, a.error, a.output, a.execution \
                 FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = $1 \
                 ORDER BY t.item_index, a.attempt, a.status, a.execution",
            )
            .bind(run)
            .fetch_all(&pool)
            .await?;
            let counters: (String, i32, i32, bool) = sqlx::query_as(
                "SELECT status, tasks_succeeded, tasks_failed, finished_at IS NOT NULL FROM runs WHERE id = $1",
            )
            .bind(run)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok((tasks, attempts, counters))
        }
    };
    let (tasks_batched, attempts_batched, run_batched) = state(batched[0].run_id.clone()).await?;
    assert_eq!(
        (
            tasks_batched.clone(),
            attempts_batched.len(),
            run_batched.clone()
        ),
        {
            let (t, a, r) = state(run_id.clone()).await?;
            (t, a.len(), r)
        }
    );
    assert_eq!(attempts_batched, state(run_id).await?.1);
    assert_eq!(run_batched, ("FAILED".to_owned(), 3, 1, true));
    let shown: Vec<(String, i32, String)> = tasks_batched
        .iter()
        .map(|t| (t.1.clone(), t.2, t.3.clone()))
        .collect();
    assert_eq!(
        shown,
        [
            ("SUCCEEDED".to_owned(), 2, "attempt 2 SUCCEEDED".to_owned()),
            ("SUCCEEDED".to_owned(), 3, "attempt 3 SUCCEEDED".to_owned()),
            ("DEAD".to_owned(), 1, "attempt 1 DEAD".to_owned()),
            ("SUCCEEDED".to_owned(), 1, "attempt 1 SUCCEEDED".to_owned()),
        ]
    );
    Ok(())
}

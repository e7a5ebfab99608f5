//! An executor in another language: the Python example (`examples/python-executor/executor.py`)
//! serves the task type `uppercase` next to the three services, through nothing but the contract
//! (the FACTORY_TASKS stream, TaskInstance and TaskResult, `dlq.tasks.<type>`, the cancelled-runs
//! and finished-tasks buckets). It needs `scripts/tools.sh python` (nats-py and protobuf in
//! `.tools/python`).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt as _;
use prost::Message as _;
use taskfactory_model::values::{json_to_value, value_to_json};
use taskfactory_proto::v1::{
    CancelRunRequest, GetTaskRequest, RunStatus, Task, TaskInstance, TaskStatus,
    TriggerActivityRequest,
};
use taskfactory_tests::{EnvOptions, TestEnv, signal, wait_for, workspace_root};

use crate::support::{Admin, create, finished_run, settled, tasks};

const SCRIPT: &str = "examples/python-executor/executor.py";
const CONSUMER: &str = "python-executor-uppercase";

/// `forEach` over the payload's items; `fail` and `sleep` turn on the executor's demo knobs.
const SHOUT: &str = r#"
name: shout
trigger: {manual: {}}
tasks:
  - name: upper
    type: uppercase
    forEach: event.items
    params:
      text: "{{ item.text | default(none) }}"
      failAttempts: "{{ item.fail | default(0) }}"
      sleepSeconds: "{{ item.sleep | default(0) }}"
    retry: {maxAttempts: 3, initialBackoff: 0.2s, maxBackoff: 1s}
    timeout: 90s
"#;

/// `.tools/python`, or a failure that says how to get it.
fn python_tools() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join(".tools/python");
    if !dir.join("nats").is_dir() || !dir.join("google/protobuf").is_dir() {
        bail!(
            "{} lacks nats-py and protobuf: run `scripts/tools.sh python` (just test does)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The Python executor as a child process; killed on drop, its output kept in a file.
struct PythonExecutor {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PythonExecutor {
    /// Connects as the `admin` NATS user when the server has users: the shipped permissions have
    /// no user for the example's task type (their external executor template is for `vision`).
    fn start(test_env: &TestEnv, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let tools = python_tools()?;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("python-executor.log");
        let output = std::fs::File::create(&log)?;
        let child = Command::new("python3")
            .arg(workspace_root().join(SCRIPT))
            .env("PYTHONPATH", &tools)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("NATS_URL", test_env.nats.url())
            .envs(test_env.nats_env("admin"))
            .env_remove("TASKFACTORY_EXECUTOR_NAME")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(output.try_clone()?))
            .stderr(Stdio::from(output))
            .spawn()
            .with_context(|| format!("starting python3 {SCRIPT}"))?;
        Ok(Self {
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.as_mut().expect("running").try_wait()?)
    }

    /// Waits until its durable consumer exists (it binds at start).
    async fn wait_ready(&mut self, js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.exited()? {
                bail!("the Python executor exited at start with {status}");
            }
            if let Ok(stream) = js.get_stream("FACTORY_TASKS").await
                && stream
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(CONSUMER)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the Python executor did not create consumer {CONSUMER} within 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then its exit status (within `within`).
    async fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        signal(self.child.as_ref().expect("running"), "TERM")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "the Python executor did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PythonExecutor {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_executor_serves_its_own_task_type_end_to_end() -> anyhow::Result<()> {
    python_tools()?; // fail early and clearly, before any infrastructure starts
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    // A short ack_wait: a task that outlives it without heartbeats would be delivered twice.
    let mut python = PythonExecutor::start(&env, &[("PYTHON_EXECUTOR_ACK_WAIT", "1")])?;
    let outcome = scenario(&env, &mut python).await;
    outcome.map_err(|error| {
        anyhow::anyhow!(
            "{error:#}\n--- Python executor output ---\n{}",
            python.log()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_executor_works_over_mutual_tls() -> anyhow::Result<()> {
    python_tools()?;
    let env = TestEnv::new(EnvOptions {
        nats_tls: true,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let tls = env.tls.as_ref().expect("a TLS environment");
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let mut python = PythonExecutor::start(
        &env,
        &[("NATS_CA", &ca), ("NATS_CERT", &cert), ("NATS_KEY", &key)],
    )?;
    let outcome = async {
        python.wait_ready(&env.js().await?).await?;
        let mut admin = env.admin().await?;
        create(&mut admin, SHOUT).await?;
        let run_id = fire(
            &mut admin,
            serde_json::json!({"items": [{"text": "over tls"}]}),
        )
        .await?;
        let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
        ensure!(run.status() == RunStatus::RunSucceeded, "{run:?}");
        Ok(())
    }
    .await;
    outcome.map_err(|error: anyhow::Error| {
        anyhow::anyhow!(
            "{error:#}\n--- Python executor output ---\n{}",
            python.log()
        )
    })
}

async fn scenario(env: &TestEnv, python: &mut PythonExecutor) -> anyhow::Result<()> {
    let started = Instant::now();
    let js = env.js().await?;
    python.wait_ready(&js).await?;
    let mut admin = env.admin().await?;
    let pool = env.db.pool().await?;
    create(&mut admin, SHOUT).await?;
    // A copy of every task message as it is published (one is published again below).
    let watcher = env.nats_client().await?;
    let mut copies = watcher.subscribe("tasks.uppercase").await?;
    watcher.flush().await?;

    // Three good items (one fails its first attempt, one outlives ack_wait) and one without text.
    let run_id = fire(
        &mut admin,
        serde_json::json!({"items": [
            {"text": "alpha"},
            {"text": "beta", "fail": 1},
            {"text": "gamma", "sleep": 2.5},
            {"note": "no text"},
        ]}),
    )
    .await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    ensure!(
        run.status() == RunStatus::RunFailed,
        "one task died, so the run failed: {run:?}"
    );
    ensure!(
        (run.tasks_spawned, run.tasks_succeeded, run.tasks_failed) == (4, 3, 1),
        "spawned/succeeded/failed: {run:?}"
    );

    let listed = tasks(&mut admin, &run_id).await?;
    ensure!(listed.len() == 4, "{listed:?}");
    let mut by_item = Vec::new();
    for task in &listed {
        by_item.push(get_task(&mut admin, &task.id).await?);
    }
    by_item.sort_by_key(|t| t.item_index);
    for (task, text, attempts) in [
        (&by_item[0], "ALPHA", 1),
        (&by_item[1], "BETA", 2),
        (&by_item[2], "GAMMA", 1),
    ] {
        ensure!(
            task.status() == TaskStatus::Succeeded,
            "item {}: {task:?}",
            task.item_index
        );
        let output = task.output.as_ref().map(value_to_json);
        ensure!(
            output == Some(serde_json::json!({"text": text})),
            "item {}: output {output:?}",
            task.item_index
        );
        ensure!(
            task.attempts == attempts,
            "item {}: {} attempts, expected {attempts}",
            task.item_index,
            task.attempts
        );
    }
    let dead = &by_item[3];
    ensure!(dead.status() == TaskStatus::Dead, "{dead:?}");
    ensure!(
        dead.last_error.contains("params.text is required") && dead.attempts == 1,
        "a permanent failure dies at once with the executor's error: {dead:?}"
    );

    // Every attempt, as the orchestrator recorded it, names the Python executor; every start was
    // reported (RUNNING) before its attempt ran, however quick.
    let expected: [&[(i32, &str)]; 4] = [
        &[(1, "RUNNING"), (1, "SUCCEEDED")],
        &[
            (1, "RUNNING"),
            (1, "FAILED"),
            (2, "RUNNING"),
            (2, "SUCCEEDED"),
        ],
        // One attempt: heartbeats kept the 2.5 s task past the 1 s ack_wait.
        &[(1, "RUNNING"), (1, "SUCCEEDED")],
        &[(1, "RUNNING"), (1, "DEAD")],
    ];
    for (task, expected) in by_item.iter().zip(expected) {
        let rows = attempts(&pool, &task.id).await?;
        let seen: Vec<(i32, &str)> = rows.iter().map(|r| (r.0, r.1.as_str())).collect();
        ensure!(
            seen == expected,
            "item {}: attempts {rows:?}",
            task.item_index
        );
        for (_, _, _, executor) in &rows {
            ensure!(
                executor.starts_with("python-executor@"),
                "item {}: executor {executor:?}",
                task.item_index
            );
        }
    }
    let beta = attempts(&pool, &by_item[1].id).await?;
    ensure!(
        beta[1]
            .2
            .contains("simulated transient failure on attempt 1"),
        "{beta:?}"
    );
    // Each start names an execution of its own.
    let executions: Vec<String> = sqlx::query_scalar(
        "SELECT a.execution FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE t.run_id::text = $1 AND a.status = 'RUNNING'",
    )
    .bind(&run_id)
    .fetch_all(&pool)
    .await?;
    let distinct: std::collections::BTreeSet<&String> = executions.iter().collect();
    ensure!(
        executions.len() == 5 && distinct.len() == 5 && !distinct.contains(&String::new()),
        "executions of the starts: {executions:?}"
    );

    // The dead task went to dlq.tasks.uppercase, as the task message it was, with the error.
    let dlq = js.get_stream("FACTORY_DLQ").await?;
    let letter = dlq
        .get_last_raw_message_by_subject("dlq.tasks.uppercase")
        .await
        .context("the dead task's copy on dlq.tasks.uppercase")?;
    let instance = TaskInstance::decode(letter.payload.as_ref())?;
    ensure!(instance.task_id == dead.id, "{instance:?}");
    let header = |name: &str| {
        letter
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    ensure!(
        header("Taskfactory-Error").contains("params.text is required"),
        "{:?}",
        letter.headers
    );
    ensure!(
        header("Taskfactory-Attempts") == "1",
        "{:?}",
        letter.headers
    );
    let first_run_done = started.elapsed();

    // A message that is not a TaskInstance is dead-lettered with its origin, and terminated.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "garbage-1");
    js.publish_with_headers("tasks.uppercase", headers, "not protobuf".into())
        .await?
        .await?;
    let letter = wait_for(
        "the undecodable message on dlq.tasks.uppercase",
        Duration::from_secs(20),
        || {
            let dlq = dlq.clone();
            async move {
                let letter = dlq
                    .get_last_raw_message_by_subject("dlq.tasks.uppercase")
                    .await?;
                let error = letter
                    .headers
                    .get("Taskfactory-Error")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok(error.contains("not a TaskInstance").then_some(letter))
            }
        },
    )
    .await?;
    ensure!(letter.payload.as_ref() == b"not protobuf");
    ensure!(
        letter
            .headers
            .get("Taskfactory-Original-Subject")
            .map(|v| v.as_str())
            == Some("tasks.uppercase"),
        "{:?}",
        letter.headers
    );

    // A finished task's message that comes back (as a copy published again) is acked without
    // running: no start, no result, and the task stays as it was.
    let alpha = &by_item[0];
    let mut alpha_message = None;
    while alpha_message.is_none() {
        let copy = tokio::time::timeout(Duration::from_secs(5), copies.next())
            .await
            .context("the copy of the first task's message")?
            .context("the copies ended")?;
        if TaskInstance::decode(copy.payload.as_ref())?.task_id == alpha.id {
            alpha_message = Some(copy.payload);
        }
    }
    let results = js.get_stream("FACTORY_RESULTS").await?;
    let results_before = results.get_info().await?.state.last_sequence;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "alpha-again");
    js.publish_with_headers(
        "tasks.uppercase",
        headers,
        alpha_message.expect("found above"),
    )
    .await?
    .await?;
    settled(&js, "FACTORY_TASKS", CONSUMER).await?;
    let results_after = results.get_info().await?.state.last_sequence;
    ensure!(
        results_after == results_before,
        "the finished task was reported again: FACTORY_RESULTS went from {results_before} to {results_after}"
    );
    ensure!(
        python
            .log()
            .contains(&format!("task {} already finished", alpha.id)),
        "the Python executor did not skip the finished task"
    );
    let rows = attempts(&pool, &alpha.id).await?;
    ensure!(
        rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>() == ["RUNNING", "SUCCEEDED"],
        "{rows:?}"
    );
    let alpha_now = get_task(&mut admin, &alpha.id).await?;
    ensure!(
        alpha_now.status() == TaskStatus::Succeeded && alpha_now.attempts == 1,
        "{alpha_now:?}"
    );

    // SIGTERM: it stops pulling, finishes what it holds (nothing now) and exits 0.
    let status = python.terminate(Duration::from_secs(15)).await?;
    ensure!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!(
        "python executor: the run done in {first_run_done:?}, all in {:?}",
        started.elapsed()
    );
    Ok(())
}

/// CancelRun while the Python executor holds a task: it sees the put in the cancelled-runs bucket,
/// stops the attempt and reports it `CANCELLED`, as the built-in executor does.
///
/// Ignored until the orchestrator handles that report racing CancelRun itself: the bucket is
/// written before the run is cancelled in Postgres, so the executor's `CANCELLED` result arrives
/// while `cancel_run` runs. `cancel_run` locks the run row then the task rows, `record_result` the
/// task row then the run row: a deadlock (CancelRun answers INTERNAL), or the result wins and
/// finishes the run `RUN_FAILED` (CancelRun answers FAILED_PRECONDITION): 5 runs in 10 failed so.
/// `cargo nextest run -p taskfactory-tests --run-ignored all external_executor` reproduces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_executor_stops_an_attempt_when_its_run_is_cancelled() -> anyhow::Result<()> {
    python_tools()?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut python = PythonExecutor::start(&env, &[])?;
    let outcome = cancel_scenario(&env, &mut python).await;
    outcome.map_err(|error| {
        anyhow::anyhow!(
            "{error:#}\n--- Python executor output ---\n{}",
            python.log()
        )
    })
}

async fn cancel_scenario(env: &TestEnv, python: &mut PythonExecutor) -> anyhow::Result<()> {
    let js = env.js().await?;
    python.wait_ready(&js).await?;
    let mut admin = env.admin().await?;
    let pool = env.db.pool().await?;
    create(&mut admin, SHOUT).await?;
    // CancelRun stops an attempt in flight: the executor watches the cancelled-runs bucket.
    let slow = fire(
        &mut admin,
        serde_json::json!({"items": [{"text": "slow", "sleep": 60}]}),
    )
    .await?;
    wait_for(
        "the Python executor to hold the slow task",
        Duration::from_secs(30),
        || {
            let js = js.clone();
            async move { Ok((consumer_ack_pending(&js).await? == 1).then_some(())) }
        },
    )
    .await?;
    // The task shows RUNNING (its start is reported before it runs), with the executor running it.
    let slow_task = tasks(&mut admin, &slow).await?.remove(0);
    let running = wait_for("the task to show RUNNING", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let id = slow_task.id.clone();
        async move {
            let task = get_task(&mut admin, &id).await?;
            Ok((task.status() == TaskStatus::Running).then_some(task))
        }
    })
    .await?;
    ensure!(
        running.attempts == 1
            && running.attempt_history.len() == 1
            && running.attempt_history[0]
                .executor
                .starts_with("python-executor@"),
        "{running:?}"
    );
    let cancelled_at = Instant::now();
    let cancelled = admin
        .cancel_run(CancelRunRequest {
            id: slow.clone(),
            reason: "enough".to_owned(),
        })
        .await
        .context("CancelRun")?
        .into_inner();
    ensure!(
        cancelled.status() == RunStatus::RunCancelled,
        "{cancelled:?}"
    );
    let slow_task = tasks(&mut admin, &slow).await?.remove(0);
    ensure!(slow_task.status() == TaskStatus::Cancelled, "{slow_task:?}");
    let rows = wait_for(
        "the executor's CANCELLED attempt",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            let id = slow_task.id.clone();
            async move {
                let rows = attempts(&pool, &id).await?;
                Ok((rows.len() == 2).then_some(rows))
            }
        },
    )
    .await?;
    ensure!(
        rows[0].1 == "RUNNING"
            && rows[1].1 == "CANCELLED"
            && rows[1].2.contains("cancelled while the task ran")
            && rows.iter().all(|r| r.3.starts_with("python-executor@")),
        "{rows:?}"
    );
    let stopped_after = cancelled_at.elapsed();
    ensure!(
        stopped_after < Duration::from_secs(10),
        "stopped {stopped_after:?} after the cancel"
    );
    wait_for("the slow task to be acked", Duration::from_secs(10), || {
        let js = js.clone();
        async move { Ok((consumer_ack_pending(&js).await? == 0).then_some(())) }
    })
    .await?;

    Ok(())
}

async fn fire(admin: &mut Admin, payload: serde_json::Value) -> anyhow::Result<String> {
    Ok(admin
        .trigger_activity(TriggerActivityRequest {
            id: "shout".to_owned(),
            payload: Some(json_to_value(&payload)),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

async fn get_task(admin: &mut Admin, id: &str) -> anyhow::Result<Task> {
    Ok(admin
        .get_task(GetTaskRequest { id: id.to_owned() })
        .await?
        .into_inner())
}

/// `(attempt, status, error, executor)` of every attempt of a task, in order: by attempt, a start
/// (`RUNNING`) before its outcome (both may be recorded in one batch, at one `recorded_at`).
async fn attempts(
    pool: &sqlx::PgPool,
    task_id: &str,
) -> anyhow::Result<Vec<(i32, String, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT attempt, status, error, executor FROM task_attempts WHERE task_id = $1 \
         ORDER BY attempt, status <> 'RUNNING', recorded_at",
    )
    .bind(uuid::Uuid::parse_str(task_id)?)
    .fetch_all(pool)
    .await?)
}

async fn consumer_ack_pending(js: &async_nats::jetstream::Context) -> anyhow::Result<usize> {
    let mut consumer = js
        .get_stream("FACTORY_TASKS")
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {CONSUMER}: {e}"))?;
    Ok(consumer.info().await?.num_ack_pending)
}

/// The example's own unit tests (contract table against the .proto, values, one attempt against
/// fakes), so that `cargo nextest run external_executor` covers all of it.
#[test]
fn python_executor_unit_tests() -> anyhow::Result<()> {
    let tools = python_tools()?;
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(workspace_root().join("examples/python-executor"))
        .env("PYTHONPATH", tools)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .context("running python3 -m unittest")?;
    ensure!(
        output.status.success(),
        "the Python executor's unit tests failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

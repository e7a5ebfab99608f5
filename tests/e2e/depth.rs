//! Defence in depth behind NATS: what someone who can publish where they should not (on
//! `triggers.>`, `results.>`, `taskfactory.internal.definitions-changed`) can no longer do. Each
//! forgery is refused once (dead-lettered with its reason, counted), never carried out, never
//! retried; what the services do themselves goes on working.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use prost::Message as _;
use serde_json::json;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::subjects;
use taskfactory_model::values::{json_to_value, value_to_json};
use taskfactory_proto::v1::{
    CompleteTaskRequest, GetActivityRequest, GetRunRequest, GetTaskRequest, OverlapPolicy,
    RetryTaskRequest, RunStatus, Task, TaskResult, TaskStatus, TriggerActivityRequest,
    TriggerEvent, TriggerSource,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port, wait_for};

use crate::support::{
    Admin, Scrape, create, dead_letter, dead_letters, finished_run, fire, played_result, publish,
    runs, scrape, settled, tasks,
};

async fn activity_id(admin: &mut Admin, name: &str) -> anyhow::Result<String> {
    Ok(admin
        .get_activity(GetActivityRequest {
            id: name.to_owned(),
            version: 0,
        })
        .await?
        .into_inner()
        .id)
}

/// This process's metrics (the services run in it).
fn local_metrics() -> anyhow::Result<Scrape> {
    Scrape::parse(&taskfactory_runtime::metrics::handle().render())
}

// ---------------------------------------------------------------------------------------------
// Forged triggers.

fn forged_trigger(
    activity_id: &str,
    name: &str,
    key: &str,
    overlap: OverlapPolicy,
) -> TriggerEvent {
    TriggerEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        activity_id: activity_id.to_owned(),
        activity_version: 1,
        source: TriggerSource::Schedule as i32,
        dedupe_key: key.to_owned(),
        payload: Some(json_to_value(&json!({"by": "mallory"}))),
        activity_name: name.to_owned(),
        overlap: overlap as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_trigger_makes_no_run_and_is_dead_lettered_once() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    // Fires once a year, on 1 January at 03:00: nothing in this test fires it.
    create(
        &mut admin,
        "name: yearly\ntrigger: {schedule: {cron: ['0 3 1 1 *'], timezone: UTC}}\ntasks: [{name: t, type: log, params: {by: '{{ event.by }}'}}]\n",
    )
    .await?;
    create(
        &mut admin,
        "name: by-hand\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await?;
    let yearly = activity_id(&mut admin, "yearly").await?;
    let by_hand = activity_id(&mut admin, "by-hand").await?;
    // A real fire: the ledger has it, its run is made.
    let real_run = fire(&mut admin, "by-hand", "real").await?;
    assert_eq!(
        finished_run(&admin, &real_run, Duration::from_secs(30))
            .await?
            .status(),
        RunStatus::RunSucceeded
    );

    // Forgeries: a key of the attacker's on the plain path and on the admission path (an overlap
    // policy), and the key of the real fire with a payload of the attacker's.
    let forged = [
        forged_trigger(
            &yearly,
            "yearly",
            "mallory",
            OverlapPolicy::OverlapUnspecified,
        ),
        forged_trigger(
            &yearly,
            "yearly",
            "mallory-queued",
            OverlapPolicy::BufferAll,
        ),
        forged_trigger(
            &by_hand,
            "by-hand",
            "manual:real",
            OverlapPolicy::OverlapUnspecified,
        ),
        // A key Postgres cannot store (NUL): refused as no fire of the ledger, once, and without
        // failing the lookup of the triggers looked up with it.
        forged_trigger(
            &by_hand,
            "by-hand",
            "mallory\0nul",
            OverlapPolicy::OverlapUnspecified,
        ),
    ];
    let mut sequences = Vec::new();
    for (n, trigger) in forged.iter().enumerate() {
        sequences.push(
            publish(
                &js,
                subjects::trigger_subject(&trigger.activity_name),
                &format!("forged-{n}"),
                trigger.encode_to_vec(),
            )
            .await?,
        );
    }
    for sequence in &sequences {
        let error = dead_letter(
            &js,
            subjects::TRIGGERS_DLQ_SUBJECT,
            subjects::TRIGGERS_STREAM,
            *sequence,
        )
        .await?;
        assert!(error.contains("fire ledger"), "{error}");
    }
    // Each delivered once, settled once.
    let (deliveries, messages) = settled(
        &js,
        subjects::TRIGGERS_STREAM,
        subjects::ORCHESTRATOR_TRIGGERS_CONSUMER,
    )
    .await?;
    assert_eq!(
        deliveries, messages,
        "a refused trigger was delivered again"
    );
    assert_eq!(
        dead_letters(&js, subjects::TRIGGERS_DLQ_SUBJECT)
            .await?
            .len(),
        4
    );
    // No run: not of the schedule-only activity, not a second one of the real fire.
    assert_eq!(runs(&mut admin, "yearly").await?.len(), 0);
    let by_hand_runs = runs(&mut admin, "by-hand").await?;
    assert_eq!(by_hand_runs.len(), 1);
    assert_eq!(by_hand_runs[0].payload, None);
    let metrics = local_metrics()?;
    assert_eq!(
        metrics.count(
            taskfactory_runtime::metrics::REFUSED_MESSAGES,
            &[("kind", "trigger"), ("reason", "not_in_ledger")]
        ),
        3.0
    );
    assert_eq!(
        metrics.count(
            taskfactory_runtime::metrics::REFUSED_MESSAGES,
            &[("kind", "trigger"), ("reason", "differs_from_ledger")]
        ),
        1.0
    );
    // And the services go on: another real fire runs.
    let again = fire(&mut admin, "by-hand", "again").await?;
    assert_eq!(
        finished_run(&admin, &again, Duration::from_secs(30))
            .await?
            .status(),
        RunStatus::RunSucceeded
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Forged results.

/// Creates an activity from `yaml`, fires it by hand with `key`, and waits for its run's first
/// task: the run's id and that task.
async fn first_task(
    admin: &mut Admin,
    yaml: &str,
    activity: &str,
    key: &str,
) -> anyhow::Result<(String, Task)> {
    create(admin, yaml).await?;
    let run_id = fire(admin, activity, key).await?;
    let task = wait_for("the run's first task", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run_id = run_id.clone();
        async move { Ok(tasks(&mut admin, &run_id).await?.into_iter().next()) }
    })
    .await?;
    Ok((run_id, task))
}

/// Publishes a result as executors do; returns its stream sequence.
async fn report(
    js: &jetstream::Context,
    activity: &str,
    result: &TaskResult,
) -> anyhow::Result<u64> {
    publish(
        js,
        subjects::result_subject(activity, &result.run_id),
        &subjects::result_msg_id(
            &result.task_id,
            result.attempt,
            result.status().as_str_name(),
        ),
        result.encode_to_vec(),
    )
    .await
}

async fn get_task(admin: &mut Admin, id: &str) -> anyhow::Result<Task> {
    Ok(admin
        .get_task(GetTaskRequest { id: id.to_owned() })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_result_cannot_complete_a_human_task() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    // Even with the task's token (say, from the approval screen's executor): refused.
    let key = crate::support::result_key(&env).await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let (run_id, task) = first_task(
        &mut admin,
        "name: approval\ntrigger: {manual: {}}\ntasks: [{name: approve, type: human}]\n",
        "approval",
        "order-1",
    )
    .await?;
    assert_eq!(task.status(), TaskStatus::Waiting);

    let mut approved = played_result(&key, &task, 1, TaskStatus::Succeeded);
    approved.output = Some(json_to_value(&json!({"approved": true, "by": "mallory"})));
    let running = played_result(&key, &task, 1, TaskStatus::Running);
    for forged in [approved, running] {
        let sequence = report(&js, "approval", &forged).await?;
        let error = dead_letter(
            &js,
            subjects::RESULTS_DLQ_SUBJECT,
            subjects::RESULTS_STREAM,
            sequence,
        )
        .await?;
        assert!(error.contains("human task"), "{error}");
        assert!(error.contains("CompleteTask"), "{error}");
    }
    let (deliveries, messages) = settled(
        &js,
        subjects::RESULTS_STREAM,
        subjects::ORCHESTRATOR_RESULTS_CONSUMER,
    )
    .await?;
    assert_eq!(deliveries, messages, "a refused result was delivered again");
    let still = get_task(&mut admin, &task.id).await?;
    assert_eq!(still.status(), TaskStatus::Waiting);
    assert_eq!(still.output, None);
    assert!(
        still.attempt_history.is_empty(),
        "{:?}",
        still.attempt_history
    );
    assert_eq!(
        local_metrics()?.count(
            taskfactory_runtime::metrics::REFUSED_MESSAGES,
            &[("kind", "result"), ("reason", "human_task")]
        ),
        2.0
    );

    // CompleteTask still completes it.
    admin
        .complete_task(CompleteTaskRequest {
            id: task.id.clone(),
            output: Some(json_to_value(&json!({"approved": true, "by": "alice"}))),
            ..Default::default()
        })
        .await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let done = get_task(&mut admin, &task.id).await?;
    assert_eq!(
        done.output.as_ref().map(value_to_json),
        Some(json!({"approved": true, "by": "alice"}))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_taken_only_for_the_tasks_type_run_and_attempts_handed_out()
-> anyhow::Result<()> {
    // No executor: the test plays it, for tasks of type `played` (three attempts a series).
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = [
        env.start(Service::Trigger),
        env.start(Service::Orchestrator),
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let key = crate::support::result_key(&env).await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let (run_id, task) = first_task(&mut admin, "name: played\ntrigger: {manual: {}}\ntasks: [{name: t, type: played, retry: {maxAttempts: 3}}]\n", "played", "one").await?;

    // Refused: another type (or none), another run or activity, attempts never handed out.
    let mut other_type = played_result(&key, &task, 1, TaskStatus::Succeeded);
    other_type.r#type = "http".to_owned();
    let mut no_type = played_result(&key, &task, 1, TaskStatus::Succeeded);
    no_type.r#type = String::new();
    let mut other_run = played_result(&key, &task, 1, TaskStatus::Succeeded);
    other_run.run_id = uuid::Uuid::new_v4().to_string();
    let mut other_activity = played_result(&key, &task, 1, TaskStatus::Succeeded);
    other_activity.activity_id = uuid::Uuid::new_v4().to_string();
    // Right in every field but without the token the task's executor was handed: what another
    // executor (of another type, say) could make up from a derived task id.
    let mut tokenless = played_result(&key, &task, 1, TaskStatus::Succeeded);
    tokenless.result_token = String::new();
    let mut guessed = played_result(&key, &task, 1, TaskStatus::Succeeded);
    guessed.result_token = "0".repeat(32);
    let mut borrowed = played_result(&key, &task, 1, TaskStatus::Succeeded);
    borrowed.result_token = taskfactory_model::results::result_token(&key, uuid::Uuid::new_v4());
    let refused = [
        (tokenless, "result token"),
        (guessed, "result token"),
        (borrowed, "result token"),
        (other_type, "type"),
        (no_type, "type"),
        (other_run, "run"),
        (other_activity, "activity"),
        (
            played_result(&key, &task, 0, TaskStatus::Failed),
            "attempt 0",
        ),
        (
            played_result(&key, &task, 1000, TaskStatus::Running),
            "attempt 1000",
        ),
        (
            played_result(&key, &task, u32::MAX, TaskStatus::Dead),
            "attempt 4294967295",
        ),
    ];
    // Each with a message id of its own (a forger picks any), so none is deduplicated.
    for (n, (result, says)) in refused.iter().enumerate() {
        let sequence = publish(
            &js,
            subjects::result_subject("played", &result.run_id),
            &format!("forged-{n}"),
            result.encode_to_vec(),
        )
        .await?;
        let error = dead_letter(
            &js,
            subjects::RESULTS_DLQ_SUBJECT,
            subjects::RESULTS_STREAM,
            sequence,
        )
        .await?;
        assert!(error.contains(says), "{says}: {error}");
    }
    let untouched = get_task(&mut admin, &task.id).await?;
    assert_eq!(
        (untouched.status(), untouched.attempts),
        (TaskStatus::Pending, 0)
    );
    assert!(untouched.attempt_history.is_empty());

    // What the executor really reports is taken: two failures, the second final.
    let watcher = admin.clone();
    let state =
        |want: usize| {
            let admin = watcher.clone();
            let id = task.id.clone();
            wait_for(
                "the report to be recorded",
                Duration::from_secs(10),
                move || {
                    let mut admin = admin.clone();
                    let id = id.clone();
                    async move {
                        let task = get_task(&mut admin, &id).await?;
                        Ok((task.attempt_history.len() == want)
                            .then(|| (task.status(), task.attempts)))
                    }
                },
            )
        };
    report(
        &js,
        "played",
        &played_result(&key, &task, 1, TaskStatus::Failed),
    )
    .await?;
    assert_eq!(state(1).await?, (TaskStatus::Failed, 1));
    report(
        &js,
        "played",
        &played_result(&key, &task, 2, TaskStatus::Dead),
    )
    .await?;
    assert_eq!(state(2).await?, (TaskStatus::Dead, 2));
    assert_eq!(
        finished_run(&admin, &run_id, Duration::from_secs(10))
            .await?
            .status(),
        RunStatus::RunFailed
    );

    // RetryTask starts a new series (attempts 3 to 5, and as many more as redeliveries may add):
    // a late result of the first series only
    // joins the history, even a final one; the new series' attempts are taken.
    admin
        .retry_task(RetryTaskRequest {
            id: task.id.clone(),
        })
        .await?;
    report(
        &js,
        "played",
        &played_result(&key, &task, 2, TaskStatus::Succeeded),
    )
    .await?;
    assert_eq!(state(3).await?, (TaskStatus::Pending, 2));
    let beyond = 2 + 3 + taskfactory_model::results::REDELIVERY_ALLOWANCE + 1;
    let sequence = report(
        &js,
        "played",
        &played_result(&key, &task, beyond, TaskStatus::Running),
    )
    .await?;
    let error = dead_letter(
        &js,
        subjects::RESULTS_DLQ_SUBJECT,
        subjects::RESULTS_STREAM,
        sequence,
    )
    .await?;
    assert!(
        error.contains(&format!("attempt {beyond} was never handed out")),
        "{error}"
    );
    assert!(
        error.contains(&format!("attempts 3 to {}", beyond - 1)),
        "{error}"
    );
    report(
        &js,
        "played",
        &played_result(&key, &task, 3, TaskStatus::Running),
    )
    .await?;
    assert_eq!(state(4).await?, (TaskStatus::Running, 3));
    report(
        &js,
        "played",
        &played_result(&key, &task, 3, TaskStatus::Succeeded),
    )
    .await?;
    assert_eq!(state(5).await?, (TaskStatus::Succeeded, 3));
    let run = finished_run(&admin, &run_id, Duration::from_secs(10)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);

    let (deliveries, messages) = settled(
        &js,
        subjects::RESULTS_STREAM,
        subjects::ORCHESTRATOR_RESULTS_CONSUMER,
    )
    .await?;
    assert_eq!(deliveries, messages, "a refused result was delivered again");
    let metrics = local_metrics()?;
    let refused_count = |reason: &str| {
        metrics.count(
            taskfactory_runtime::metrics::REFUSED_MESSAGES,
            &[("kind", "result"), ("reason", reason)],
        )
    };
    assert_eq!(
        [
            refused_count("wrong_token"),
            refused_count("wrong_task"),
            refused_count("attempt_not_handed_out")
        ],
        [3.0, 4.0, 4.0]
    );
    // The run id the result named is not the task's: nothing about that run was touched.
    let other = RunId::derive(ActivityId(uuid::Uuid::new_v4()), "x").to_string();
    assert!(admin.get_run(GetRunRequest { id: other }).await.is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A flood of definitions-changed signals.

/// CPU time a process has used (user and system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces: the fields after it start past the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    Ok(Duration::from_millis(ticks * 10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_definitions_changed_signals_costs_a_few_reloads() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    // The replica under the flood runs as its own process (its CPU time and metrics are its
    // own), and polls too rarely to matter: a change reaches it through the signal.
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let flooded = env.spawn_process(
        Service::Trigger,
        &[
            ("TASKFACTORY_METRICS_ADDR", &metrics_addr.to_string()),
            (
                "TASKFACTORY_GRPC_ADDR",
                &format!("127.0.0.1:{}", free_port()),
            ),
            ("TASKFACTORY_RELOAD_INTERVAL", "1h"),
        ],
    )?;
    let pid = flooded.pid().expect("a process");
    // The replica that changes definitions (and announces each change).
    let _changer = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    // Enough definitions that reloading them is work.
    for n in 0..40 {
        create(
            &mut admin,
            &format!("name: a{n}\ntrigger: {{schedule: {{cron: ['0 3 1 1 *'], timezone: UTC}}}}\ntasks: [{{name: t, type: log, params: {{n: {n}}}}}]\n"),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    let generation = || async {
        let (generation,): (i64,) = sqlx::query_as("SELECT last_value FROM definitions_generation")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(generation as f64)
    };
    let flooded_metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        anyhow::Ok(scrape(metrics_addr).await?.count(name, labels))
    };
    let loaded = || flooded_metric(taskfactory_runtime::metrics::DEFINITIONS_GENERATION, &[]);
    let reloads = || async {
        let mut all = 0.0;
        for outcome in [&[("outcome", "changed")], &[("outcome", "unchanged")]] {
            all +=
                flooded_metric(taskfactory_runtime::metrics::DEFINITION_RELOADS, outcome).await?;
        }
        anyhow::Ok(all)
    };
    let signals = || flooded_metric(taskfactory_runtime::metrics::DEFINITIONS_SIGNALS, &[]);
    let current = generation().await?;
    wait_for(
        "the flooded replica to load every definition",
        Duration::from_secs(20),
        || async { Ok((loaded().await.ok() == Some(current)).then_some(())) },
    )
    .await?;

    let nats = env.nats_client().await?;
    let reloads_before = reloads().await?;
    let signals_before = signals().await?;
    let cpu_before = cpu_time(pid)?;
    let flood_started = Instant::now();
    const SIGNALS: usize = 5000;
    for _ in 0..SIGNALS {
        nats.publish(subjects::DEFINITIONS_CHANGED, bytes::Bytes::new())
            .await?;
    }
    nats.flush().await?;
    let flood_took = flood_started.elapsed();
    // A real change after the flood, announced by the other replica, is picked up promptly.
    let changed_at = Instant::now();
    create(
        &mut admin,
        "name: after-the-flood\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await?;
    let changed = generation().await?;
    wait_for(
        "the change to be picked up",
        Duration::from_secs(5),
        || async { Ok((loaded().await? == changed).then_some(())) },
    )
    .await?;
    let picked_up = changed_at.elapsed();
    // Every signal handled, the change's own included: the flood is over.
    let all_signals = signals_before + SIGNALS as f64 + 1.0;
    wait_for(
        "every signal to be handled",
        Duration::from_secs(120),
        || async { Ok((signals().await? >= all_signals).then_some(())) },
    )
    .await?;
    let flood_over = flood_started.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let all = reloads().await? - reloads_before;
    eprintln!(
        "{SIGNALS} signals published in {flood_took:?}, handled within {flood_over:?}: {all} reloads, {cpu:?} of CPU; a change picked up after {picked_up:?}"
    );
    // At most one reload per quarter second while signals come, and the change's own.
    let bound = 2.0 + 4.0 * flood_over.as_secs_f64().ceil();
    assert!(
        all <= bound,
        "{all} reloads for {SIGNALS} signals (bound {bound})"
    );
    assert!(
        cpu < Duration::from_secs(2),
        "{SIGNALS} signals cost {cpu:?} of CPU"
    );
    drop(flooded);
    Ok(())
}

/// Sends a request on an internal subject as any NATS client could, and returns the answer.
async fn internal_request(
    nats: &async_nats::Client,
    subject: &'static str,
    headers: async_nats::HeaderMap,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let answer = nats
        .send_request(
            subject,
            async_nats::Request::new()
                .headers(headers)
                .payload(serde_json::to_vec(&body)?.into())
                .timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    Ok(serde_json::from_slice(&answer.payload)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_and_previews_on_internal_subjects_are_carried_out_only_for_the_admin_api()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let nats = env.nats_client().await?;
    let (_, task) = first_task(
        &mut admin,
        "name: approval\ntrigger: {manual: {}}\ntasks: [{name: approve, type: human}]\n",
        "approval",
        "order-1",
    )
    .await?;

    // A forged CompleteTask, without and with a made-up request id; a forged preview.
    let complete =
        json!({"op": "complete", "task": task.id, "output": {"approved": true, "by": "mallory"}});
    let mut made_up = async_nats::HeaderMap::new();
    made_up.insert(
        subjects::HEADER_ADMIN_REQUEST,
        uuid::Uuid::new_v4().to_string().as_str(),
    );
    for headers in [async_nats::HeaderMap::new(), made_up] {
        let answer =
            internal_request(&nats, subjects::RUN_COMMANDS, headers, complete.clone()).await?;
        assert_eq!(answer["code"], "permission_denied", "{answer}");
    }
    let preview = json!({"spec": {"name": "x"}, "event": {}});
    let answer = internal_request(
        &nats,
        subjects::PREVIEW_REQUESTS,
        async_nats::HeaderMap::new(),
        preview,
    )
    .await?;
    assert_eq!(answer["code"], "permission_denied", "{answer}");
    assert_eq!(
        get_task(&mut admin, &task.id).await?.status(),
        TaskStatus::Waiting
    );

    // A real command, overheard and sent again, is not carried out twice.
    let mut overheard = nats.subscribe(subjects::RUN_COMMANDS).await?;
    nats.flush().await?;
    admin
        .complete_task(CompleteTaskRequest {
            id: task.id.clone(),
            failed: true,
            error: "rejected".to_owned(),
            ..Default::default()
        })
        .await?;
    let heard = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut overheard),
    )
    .await?
    .expect("the command");
    let answer = internal_request(
        &nats,
        subjects::RUN_COMMANDS,
        heard.headers.clone().expect("headers"),
        serde_json::from_slice(&heard.payload)?,
    )
    .await?;
    assert_eq!(answer["code"], "permission_denied", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already carried out"),
        "{answer}"
    );
    assert_eq!(
        get_task(&mut admin, &task.id).await?.status(),
        TaskStatus::Dead
    );
    let metrics = local_metrics()?;
    for (kind, reason, count) in [
        ("command", "not_recorded", 2.0),
        ("preview", "not_recorded", 1.0),
        ("command", "replayed", 1.0),
    ] {
        assert_eq!(
            metrics.count(
                taskfactory_runtime::metrics::REFUSED_MESSAGES,
                &[("kind", kind), ("reason", reason)]
            ),
            count,
            "{kind} {reason}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_task_cannot_reach_the_jetstream_api_or_our_subjects() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;

    // Spelled out in the spec: refused at validation, naming the field.
    let refused = create(
        &mut admin,
        "name: sealer\ntrigger: {manual: {}}\ntasks: [{name: seal, type: publish, params: {subject: '$JS.API.STREAM.UPDATE.FACTORY_EVENTS', payload: {}}}]\n",
    )
    .await
    .unwrap_err();
    assert!(
        format!("{refused:#}").contains("tasks[0].params.subject"),
        "{refused:#}"
    );

    // Rendered from the event: the task dies, the stream is untouched.
    create(
        &mut admin,
        "name: relay\ntrigger: {manual: {}}\ntasks: [{name: relay, type: publish, retry: {maxAttempts: 1}, params: {subject: '{{ event.subject }}', payload: '{{ event.payload }}'}}]\n",
    )
    .await?;
    let before = js
        .get_stream("FACTORY_EVENTS")
        .await?
        .info()
        .await?
        .config
        .clone();
    let sealing = json!({
        "name": "FACTORY_EVENTS", "subjects": ["events.>"], "retention": "limits",
        "storage": "file", "num_replicas": 1, "sealed": true, "max_msg_size": 1,
    });
    for subject in [
        "$JS.API.STREAM.UPDATE.FACTORY_EVENTS",
        "$JS.API.STREAM.PURGE.FACTORY_DLQ",
        "tasks.http",
        "events.taskfactory.run.completed",
    ] {
        let run_id = admin
            .trigger_activity(TriggerActivityRequest {
                id: "relay".to_owned(),
                payload: Some(json_to_value(
                    &json!({"subject": subject, "payload": sealing}),
                )),
                ..Default::default()
            })
            .await?
            .into_inner()
            .run_id;
        let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
        assert_eq!(run.status(), RunStatus::RunFailed, "{subject}");
        let task = tasks(&mut admin, &run_id).await?.remove(0);
        assert!(
            task.last_error.contains("never published by a task")
                || task.last_error.contains("never publishes there"),
            "{subject}: {}",
            task.last_error
        );
    }
    let after = js
        .get_stream("FACTORY_EVENTS")
        .await?
        .info()
        .await?
        .config
        .clone();
    assert!(!after.sealed);
    assert_eq!(after.max_message_size, before.max_message_size);
    // Events still flow.
    js.publish("events.still.open", "{}".into()).await?.await?;
    Ok(())
}

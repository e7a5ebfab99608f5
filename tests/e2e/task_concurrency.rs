//! Task concurrency (`tasks[].concurrency`): at most `limit` tasks of a key are with executors at
//! once, across every executor process, counted by a real HTTP server; scope GLOBAL counts the
//! tasks of every activity naming the key; held tasks survive a killed orchestrator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskfactory_proto::v1::{GetTaskRequest, RunStatus, TriggerActivityRequest};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{create, finished_run, tasks};

/// An HTTP server that counts the requests it is serving at once, per `?host=`: each call takes
/// `delay`. It also counts calls per `Idempotency-Key` (the executor sends the task id).
#[derive(Clone)]
struct CountingServer {
    base: String,
    state: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    /// Per host: (serving now, most at once).
    hosts: HashMap<String, (usize, usize)>,
    /// Serving now across hosts, and the most at once.
    all: (usize, usize),
    calls: HashMap<String, u32>,
}

impl CountingServer {
    async fn start(delay: Duration) -> anyhow::Result<Self> {
        let state: Arc<Mutex<Counts>> = Arc::default();
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/call",
            axum::routing::post(
                move |axum::extract::Query(query): axum::extract::Query<
                    HashMap<String, String>,
                >,
                      headers: axum::http::HeaderMap| {
                    let state = shared.clone();
                    async move {
                        let host = query.get("host").cloned().unwrap_or_default();
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        {
                            let mut counts = state.lock().unwrap();
                            let (now, most) = counts.hosts.entry(host.clone()).or_default();
                            *now += 1;
                            *most = (*most).max(*now);
                            counts.all.0 += 1;
                            counts.all.1 = counts.all.1.max(counts.all.0);
                            *counts.calls.entry(key).or_default() += 1;
                        }
                        tokio::time::sleep(delay).await;
                        {
                            let mut counts = state.lock().unwrap();
                            counts.hosts.get_mut(&host).unwrap().0 -= 1;
                            counts.all.0 -= 1;
                        }
                        axum::Json(serde_json::json!({"ok": true}))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}/call", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { base, state })
    }

    /// The most requests for `host` served at once.
    fn most(&self, host: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hosts
            .get(host)
            .map_or(0, |(_, most)| *most)
    }

    fn most_overall(&self) -> usize {
        self.state.lock().unwrap().all.1
    }

    fn calls(&self) -> HashMap<String, u32> {
        self.state.lock().unwrap().calls.clone()
    }
}

/// An activity fired by hand whose `call` tasks (one per `event.items` entry) call the server at
/// `?host=<item.host>`, under `concurrency`.
fn calling(name: &str, server: &CountingServer, concurrency: &str) -> String {
    format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ntasks:\n  - name: call\n    type: http\n    forEach: event.items\n    params: {{url: '{}?host={{{{ item.host }}}}', body: {{n: '{{{{ item.n }}}}'}}}}\n    concurrency: {concurrency}\n",
        server.base
    )
}

/// A manual fire whose payload holds `per_host` items for each of `hosts`.
async fn fire_items(
    admin: &mut crate::support::Admin,
    activity: &str,
    key: &str,
    hosts: &[&str],
    per_host: usize,
) -> anyhow::Result<String> {
    let items: Vec<serde_json::Value> = (0..per_host)
        .flat_map(|n| {
            hosts
                .iter()
                .map(move |h| serde_json::json!({"host": h, "n": n}))
        })
        .collect();
    let payload = taskfactory_model::values::json_to_value(&serde_json::json!({"items": items}));
    Ok(admin
        .trigger_activity(TriggerActivityRequest {
            id: activity.to_owned(),
            idempotency_key: key.to_owned(),
            payload: Some(payload),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_concurrency_per_host_holds_across_two_executor_processes() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    // Two executor processes with room for 32 tasks each: without the key, far more than 5
    // calls of a host would be made at once.
    let executor_env = [("TASKFACTORY_TASK_CONCURRENCY", "32")];
    let _executors = [
        env.spawn_process(Service::Executor, &executor_env)?,
        env.spawn_process(Service::Executor, &executor_env)?,
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let server = CountingServer::start(Duration::from_millis(150)).await?;
    create(
        &mut admin,
        &calling("per-host", &server, "{key: params.url, limit: 5}"),
    )
    .await?;
    // Two runs at once, each with 30 calls to each of two hosts: their tasks count together.
    let hosts = ["a", "b"];
    let first = fire_items(&mut admin, "per-host", "first", &hosts, 30).await?;
    let second = fire_items(&mut admin, "per-host", "second", &hosts, 30).await?;

    // While they run, held tasks are shown waiting under their key.
    let held = wait_for("a task held by its key", Duration::from_secs(30), || {
        let (mut admin, second) = (admin.clone(), second.clone());
        async move {
            Ok(tasks(&mut admin, &second)
                .await?
                .into_iter()
                .find(|t| t.waiting))
        }
    })
    .await?;
    assert!(
        held.concurrency_key.ends_with("/call?host=a")
            || held.concurrency_key.ends_with("/call?host=b"),
        "{held:?}"
    );

    for run in [&first, &second] {
        let run = finished_run(&admin, run, Duration::from_secs(120)).await?;
        assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
        assert_eq!(run.tasks_spawned, 60);
    }
    for host in hosts {
        assert_eq!(server.most(host), 5, "host {host}: the most calls at once");
    }
    let calls = server.calls();
    assert_eq!(calls.len(), 120, "every task called once");
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");
    // Both executors ran tasks.
    let pool = env.db.pool().await?;
    let executors: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT executor) FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE t.activity_name = 'per-host'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(executors, 2);
    let task = admin
        .get_task(GetTaskRequest {
            id: held.id.clone(),
        })
        .await?
        .into_inner();
    assert!(!task.waiting && task.concurrency_key == held.concurrency_key);
    Ok(())
}

/// A GLOBAL key counts the tasks of every activity naming it; an orchestrator killed while
/// tasks are held loses none, and the limit holds across its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_key_counts_every_activity_and_held_tasks_survive_a_killed_orchestrator()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        executor_concurrency: 32,
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let _executor = env.start(Service::Executor);
    let mut orchestrator = Some(env.spawn_process(Service::Orchestrator, &[])?);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let server = CountingServer::start(Duration::from_millis(200)).await?;
    let shared = "{key: \"'vendor'\", limit: 3, scope: GLOBAL}";
    create(&mut admin, &calling("one", &server, shared)).await?;
    create(&mut admin, &calling("two", &server, shared)).await?;
    let one = fire_items(&mut admin, "one", "k", &["x"], 20).await?;
    let two = fire_items(&mut admin, "two", "k", &["y"], 20).await?;

    // Kill the orchestrator while tasks are held, then start another.
    let pool = env.db.pool().await?;
    wait_for("some calls made", Duration::from_secs(30), || async {
        Ok((server.calls().len() >= 6).then_some(()))
    })
    .await?;
    orchestrator.take();
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE held")
        .fetch_one(&pool)
        .await?;
    assert!(held > 0, "tasks still held when the orchestrator died");
    let _orchestrator = env.spawn_process(Service::Orchestrator, &[])?;

    for run in [&one, &two] {
        let run = finished_run(&admin, run, Duration::from_secs(120)).await?;
        assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    }
    assert_eq!(
        server.most_overall(),
        3,
        "the most calls at once, both activities"
    );
    let calls = server.calls();
    assert_eq!(calls.len(), 40);
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");
    let key: String = sqlx::query_scalar("SELECT DISTINCT concurrency_key FROM tasks")
        .fetch_one(&pool)
        .await?;
    assert_eq!(key, "global:vendor");
    Ok(())
}

/// A task that died while its key held it (its type unserved) and is retried takes a place
/// under its key like any other: a second retry finds no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_task_takes_its_place_under_its_key_even_if_it_died_held() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        unserved_grace: Duration::from_secs(2),
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: orphan\ntrigger: {manual: {}}\ntasks: [{name: t, type: translate, forEach: 'range(3)', concurrency: {limit: 1}}]\n",
    )
    .await?;
    let run = admin
        .trigger_activity(TriggerActivityRequest {
            id: "orphan".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    // Nobody serves `translate`: the task let through and the two held die.
    let run = finished_run(&admin, &run, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let mut dead = tasks(&mut admin, &run.id).await?;
    assert_eq!(dead.len(), 3);
    // The first retried is one that died held.
    let pool = env.db.pool().await?;
    let died_held: String =
        sqlx::query_scalar("SELECT id::text FROM tasks WHERE held AND status = 'DEAD' LIMIT 1")
            .fetch_one(&pool)
            .await?;
    let at = dead.iter().position(|t| t.id == died_held).unwrap();
    dead.swap(0, at);
    // Now something serves it (a consumer that does not pull): a retried task stays with it.
    env.js()
        .await?
        .get_stream("FACTORY_TASKS")
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("translator".to_owned()),
            filter_subject: "tasks.translate".to_owned(),
            ..Default::default()
        })
        .await?;
    admin
        .retry_task(taskfactory_proto::v1::RetryTaskRequest {
            id: dead[0].id.clone(),
        })
        .await?;
    for task in &dead[1..] {
        let refused = admin
            .retry_task(taskfactory_proto::v1::RetryTaskRequest {
                id: task.id.clone(),
            })
            .await
            .expect_err("no room under the key");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("concurrency key") && refused.message().contains("limit"),
            "{}",
            refused.message()
        );
    }
    let (held, status): (bool, String) =
        sqlx::query_as("SELECT held, status FROM tasks WHERE id = $1::uuid")
            .bind(&dead[0].id)
            .fetch_one(&pool)
            .await?;
    assert_eq!((held, status.as_str()), (false, "PENDING"));
    Ok(())
}

/// Two triggers and two orchestrators at once: every event is decided once at each activity, no
/// run is doubled, and the limits hold across the replicas (one run per key, three calls in all,
/// every gathered event in exactly one run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_hold_across_two_triggers_and_two_orchestrators() -> anyhow::Result<()> {
    use crate::event_decisions::one_decision_each;
    use crate::flow_control::assert_limits_held;
    use crate::support::{RecordingServer, publish_event, wait_count, wait_succeeded};

    let env = TestEnv::new(EnvOptions {
        executor_concurrency: 64,
        ..EnvOptions::default()
    })
    .await?;
    let second_admin = format!("127.0.0.1:{}", taskfactory_tests::free_port());
    let _replicas = [
        env.spawn_process(
            Service::Trigger,
            &[
                ("TASKFACTORY_INSTANCE_ID", "trigger-a"),
                ("TASKFACTORY_RELOAD_INTERVAL", "300ms"),
            ],
        )?,
        env.spawn_process(
            Service::Trigger,
            &[
                ("TASKFACTORY_INSTANCE_ID", "trigger-b"),
                ("TASKFACTORY_GRPC_ADDR", second_admin.as_str()),
                ("TASKFACTORY_RELOAD_INTERVAL", "300ms"),
            ],
        )?,
        env.spawn_process(Service::Orchestrator, &[])?,
        env.spawn_process(Service::Orchestrator, &[])?,
    ];
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let server = RecordingServer::start(Duration::from_millis(50)).await?;
    create(
        &mut admin,
        &format!(
            "name: keyed\ntrigger: {{event: {{subject: 'events.k.*'}}}}\nflow: {{concurrency: {{key: event.k, limit: 1}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{n: '{{{{ event.n }}}}'}}}}, concurrency: {{limit: 3}}}}]",
            server.url
        ),
    )
    .await?;
    create(
        &mut admin,
        "name: batched\ntrigger: {event: {subject: 'events.k.*'}}\nflow: {batch: {key: event.k, maxSize: 10, timeout: 1s}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    // The replica whose admin API did not create them knows the activities within moments
    // (the definitions-changed signal, at the latest its poll): events it takes before do not
    // reach them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let js = env.js().await?;
    const EVENTS: i64 = 200;
    for n in 0..EVENTS {
        let body = serde_json::json!({"k": n % 5, "n": n});
        publish_event(
            &js,
            "events.k.x",
            body.to_string().into_bytes(),
            Some(&format!("e{n}")),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    wait_succeeded(&pool, "keyed", EVENTS, Duration::from_secs(120)).await?;
    wait_count(
        &pool,
        "every batched event in a finished run",
        "SELECT coalesce(sum((payload->>'size')::int), 0)::int8 FROM runs \
         WHERE activity_name = $1 AND status = 'SUCCEEDED'",
        &["batched"],
        EVENTS,
        Duration::from_secs(60),
    )
    .await?;
    for activity in ["keyed", "batched"] {
        one_decision_each(&mut admin, activity, EVENTS).await?;
    }
    let (runs, fires): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM runs WHERE activity_name = 'keyed'), \
             (SELECT count(*) FROM fires WHERE activity_name = 'keyed')",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((runs, fires), (EVENTS, EVENTS), "no run doubled");
    let batched: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM runs WHERE activity_name = 'batched'")
            .fetch_all(&pool)
            .await?;
    let mut seen: Vec<i64> = batched
        .iter()
        .flat_map(|p| {
            p["batch"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e["n"].as_i64().unwrap_or(-1))
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..EVENTS).collect::<Vec<_>>(),
        "every event in one batch"
    );
    let counts = server.counts();
    assert_eq!(counts.len(), usize::try_from(EVENTS)?);
    assert!(counts.values().all(|n| *n == 1), "a task ran twice");
    assert_limits_held(&pool, "keyed", &server, 3, 1).await?;
    Ok(())
}

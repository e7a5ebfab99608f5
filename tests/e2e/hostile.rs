//! Hostile templates through the real services: each run fails within seconds with its error
//! recorded, and the services go on working (see also
//! `services/taskfactory-model/tests/hostile_templates.rs`, which holds the full list).

use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use taskfactory_proto::v1::{
    GetRunRequest, ListActivitiesRequest, RunStatus, TaskStatus, TriggerActivityRequest,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{Admin, create, finished_run, publish_event, runs, tasks};

/// How long a hostile run may take to be failed, from its fire.
const FAIL_WITHIN: Duration = Duration::from_secs(10);

/// A manually fired activity with one task template (`name` and `type` are added).
fn manual(name: &str, template: Json) -> String {
    activity(name, json!({"manual": {}}), template)
}

fn activity(name: &str, trigger: Json, mut template: Json) -> String {
    template["name"] = json!("t");
    template["type"] = json!("log");
    // JSON is YAML: `create` takes either.
    json!({"name": name, "trigger": trigger, "tasks": [template]}).to_string()
}

/// Fires a manual activity; returns its run id.
async fn fire(admin: &mut Admin, name: &str) -> anyhow::Result<String> {
    Ok(admin
        .trigger_activity(TriggerActivityRequest {
            id: name.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

/// Waits for the run to end and checks it failed with `says` in its error and its evaluation.
async fn assert_failed_with(
    admin: &Admin,
    name: &str,
    run_id: &str,
    fired: Instant,
    says: &str,
) -> anyhow::Result<()> {
    let run = finished_run(admin, run_id, FAIL_WITHIN).await?;
    let took = fired.elapsed();
    assert_eq!(run.status(), RunStatus::RunFailed, "{name}: {run:?}");
    assert!(
        run.error.contains(says),
        "{name}: the run's error should say {says:?}: {}",
        run.error
    );
    assert!(
        run.error.len() < 1000,
        "{name}: a {}-byte error",
        run.error.len()
    );
    assert!(
        run.evaluation.iter().any(|e| e.error.contains(says)),
        "{name}: the evaluation should record the error: {:?}",
        run.evaluation
    );
    assert_eq!(run.tasks_spawned, 0, "{name}: a failed plan makes no tasks");
    assert!(took < FAIL_WITHIN, "{name}: failed after {took:?}");
    eprintln!("{name}: failed {took:?} after its fire: {}", run.error);
    Ok(())
}

/// A normal activity still runs to success: three tasks, all done.
async fn assert_normal_run_succeeds(admin: &mut Admin, name: &str) -> anyhow::Result<()> {
    let run_id = fire(admin, name).await?;
    let run = finished_run(admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    assert_eq!(run.tasks_spawned, 3);
    let done = tasks(admin, &run_id).await?;
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|t| t.status() == TaskStatus::Succeeded));
    Ok(())
}

fn normal(name: &str) -> String {
    manual(
        name,
        json!({"forEach": "range(3)", "params": {"n": "{{ item }}", "label": "task {{ index }} of {{ activity.name }}"}}),
    )
}

/// The nastiest templates the engine stops (huge ranges, fuel-bound loops, doubling strings,
/// unbounded recursion, fan-out past maxTasks, output past its limit, a giant list, and a giant
/// string built from the event), then a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_templates_fail_their_runs_and_leave_the_services_working() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;

    let hostile: [(&str, Json, &str); 7] = [
        (
            "huge-range",
            json!({"forEach": "range(10**9)"}),
            "range has too many elements",
        ),
        (
            "nested-loops",
            json!({"params": {"p": "{% for a in range(1000) %}{% for b in range(1000) %}x{% endfor %}{% endfor %}"}}),
            "ran out of fuel",
        ),
        (
            "string-doubling",
            json!({"params": {"p": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"}}),
            "ran out of fuel",
        ),
        (
            "endless-recursion",
            json!({"params": {"p": "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}"}}),
            "recursion limit exceeded",
        ),
        (
            "fan-out",
            json!({"forEach": "range(100000)", "maxTasks": 100, "params": {"n": "{{ item }}"}}),
            "more than 100 tasks",
        ),
        (
            "over-output",
            // 3-byte characters, 2 bytes over the 1 MiB a task's params may render to.
            json!({"params": {"p": "{{ '\u{20AC}' * 349526 }}"}}),
            "output limit",
        ),
        (
            "list-bomb",
            json!({"forEach": "[1] * 10**9"}),
            "repeated sequence is too large",
        ),
    ];
    for (name, template, _) in &hostile {
        create(&mut admin, &manual(name, template.clone())).await?;
    }
    create(
        &mut admin,
        &activity(
            "event-string",
            json!({"event": {"subject": "events.hostile.string"}}),
            json!({"params": {"p": "{{ event.s * 10**7 }}"}}),
        ),
    )
    .await?;
    create(&mut admin, &normal("normal")).await?;

    let mut fired = Vec::new();
    for (name, _, says) in &hostile {
        fired.push((*name, fire(&mut admin, name).await?, Instant::now(), *says));
    }
    let event_fired = Instant::now();
    publish_event(
        &js,
        "events.hostile.string",
        serde_json::to_vec(&json!({"s": "0123456789"}))?,
        None,
    )
    .await?;
    for (name, run_id, at, says) in &fired {
        assert_failed_with(&admin, name, run_id, *at, says).await?;
    }
    let event_run = wait_for("the event's run", FAIL_WITHIN, || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "event-string").await?.into_iter().next()) }
    })
    .await?;
    assert_failed_with(
        &admin,
        "event-string",
        &event_run.id,
        event_fired,
        "ran out of fuel",
    )
    .await?;

    assert_normal_run_succeeds(&mut admin, "normal").await?;
    Ok(())
}

/// A template nested a few thousand levels deep (`not not … true`, `a + a + …`, `x|f|f|…`) is
/// small, and must be refused (or fail its run) with a clear error; the services stay up.
/// The trigger, which validates specs, runs as a process here so that its dying fails this test
/// instead of aborting the test binary.
///
/// FINDING (services/taskfactory-model/src/expr.rs, `Engine::expression`/`Engine::template`):
/// minijinja's parser guards parentheses and brackets, but not chains of unary operators, binary
/// operators, filters, attribute lookups or ternaries: compiling ~1 200 (`+`, `~`, `.a`, `|f`) to
/// ~2 400 (`not`) repetitions overflows a 2 MiB stack in a debug build, which aborts the process.
/// `validate` compiles every template when an activity is created, so a 13 KB spec sent to
/// CreateActivity kills the trigger (and an already stored one would kill the orchestrator).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_template_nested_thousands_deep_does_not_crash_the_services() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    // The in-process orchestrator builds an HTTP client at start, which needs a crypto provider
    // that only the executor installs (and may not have yet).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _services = [
        env.spawn_process(Service::Trigger, &[])?,
        env.start(Service::Orchestrator),
        env.start(Service::Executor),
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    create(&mut admin, &normal("normal")).await?;

    let deep = format!("{}true", "not ".repeat(100_000));
    let created = create(&mut admin, &manual("deep", json!({"when": deep}))).await;
    let mut admin = wait_for(
        "the admin API to answer after CreateActivity of a deeply nested template",
        Duration::from_secs(5),
        || async {
            let Ok(mut admin) = env.admin().await else {
                return Ok(None);
            };
            Ok(admin
                .list_activities(ListActivitiesRequest::default())
                .await
                .ok()
                .map(|_| admin))
        },
    )
    .await?;
    match created {
        Err(refused) => {
            let refused = format!("{refused:#}");
            assert!(
                refused.contains("tasks[0].when"),
                "the refusal names the field: {refused}"
            );
            assert!(refused.len() < 2000, "a {}-byte refusal", refused.len());
        }
        Ok(_) => {
            let run_id = fire(&mut admin, "deep").await?;
            let run = finished_run(&admin, &run_id, FAIL_WITHIN).await?;
            assert_eq!(run.status(), RunStatus::RunFailed);
            assert!(run.error.len() < 1000, "a {}-byte error", run.error.len());
        }
    }
    assert_normal_run_succeeds(&mut admin, "normal").await
}

/// A `when` that stays within its fuel for each item, over ten thousand items, makes no task and
/// so is bounded by neither fuel (per evaluation) nor maxTasks (per kept item): the run must
/// still fail within seconds, and the orchestrator must keep serving other activities. The
/// orchestrator runs as a process with two workers, so the test can end while it is still busy.
///
/// FINDING (services/taskfactory-model/src/plan.rs, `plan_template`): fuel is per evaluation, and
/// nothing bounds a run's evaluation as a whole: items × fuel (~80 s in a debug build here, for
/// this one run), spent synchronously on the orchestrator's async workers
/// (services/taskfactory-orchestrator/src/spawn.rs calls `plan_tasks` inline), so two such fires
/// stall a two-core orchestrator. The same holds for params over ten thousand tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_work_is_multiplied_by_its_items_fails_within_seconds() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _executor = env.start(Service::Executor);
    let _orchestrator =
        env.spawn_process(Service::Orchestrator, &[("TOKIO_WORKER_THREADS", "2")])?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    for name in ["per-item-a", "per-item-b"] {
        create(
            &mut admin,
            &manual(
                name,
                json!({"forEach": "range(10000)", "when": "range(90000)|sum < 0"}),
            ),
        )
        .await?;
    }
    create(&mut admin, &normal("normal")).await?;

    let mut fired = Vec::new();
    for name in ["per-item-a", "per-item-b"] {
        fired.push((name, fire(&mut admin, name).await?, Instant::now()));
    }
    let normal_run = fire(&mut admin, "normal").await?;
    let mut problems = Vec::new();
    for (name, run_id, at) in &fired {
        match finished_run(&admin, run_id, FAIL_WITHIN).await {
            Ok(run) if run.status() == RunStatus::RunFailed => {
                eprintln!("{name}: failed after {:?}: {}", at.elapsed(), run.error);
            }
            Ok(run) => problems.push(format!("{name}: ended {:?}", run.status())),
            Err(e) => problems.push(format!("{name}: {e:#}")),
        }
    }
    match finished_run(&admin, &normal_run, Duration::from_secs(20)).await {
        Ok(run) if run.status() == RunStatus::RunSucceeded => {}
        Ok(run) => problems.push(format!("normal: ended {:?}", run.status())),
        Err(e) => {
            let status = admin
                .get_run(GetRunRequest { id: normal_run })
                .await
                .map(|r| format!("{:?}", r.into_inner().status()))
                .unwrap_or_else(|s| s.message().to_owned());
            problems.push(format!(
                "normal: not finished while the others evaluate ({status}): {e:#}"
            ));
        }
    }
    assert_eq!(problems, Vec::<String>::new());
    Ok(())
}

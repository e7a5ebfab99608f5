//! Health and readiness endpoints, for Kubernetes probes; the metrics each service exposes.

use std::net::SocketAddr;
use std::time::Duration;

use taskfactory_proto::v1::{RunStatus, TriggerActivityRequest};
use taskfactory_runtime::metrics as m;
use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port, wait_for};

use crate::support::{Scrape, create, finished_run, http_get, publish_event, runs, scrape};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_nats_and_says_whether_the_trigger_leads() -> anyhow::Result<()> {
    let mut env = TestEnv::new(EnvOptions::default()).await?;
    let executor_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let trigger_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let _executor = env.spawn_process(
        Service::Executor,
        &[("TASKFACTORY_METRICS_ADDR", &executor_addr.to_string())],
    )?;
    let _trigger = env.spawn_process(
        Service::Trigger,
        &[("TASKFACTORY_METRICS_ADDR", &trigger_addr.to_string())],
    )?;
    // The `/readyz` body when it answers `status`.
    let readyz = |addr, status: u16| async move {
        Ok(http_get(addr, "/readyz")
            .await
            .ok()
            .filter(|(answered, _)| *answered == status)
            .map(|(_, body)| body))
    };
    let ready = |addr| readyz(addr, 200);
    let body = wait_for("the executor to be ready", Duration::from_secs(30), || {
        ready(executor_addr)
    })
    .await?;
    assert!(body.contains("nats: connected"), "{body}");
    assert!(body.contains("streams: declared"), "{body}");

    // A stream deleted under the services: not ready, naming it; declared again: ready.
    let js = env.js().await?;
    js.delete_stream("FACTORY_DLQ").await?;
    let body = wait_for(
        "the executor to notice the missing stream",
        Duration::from_secs(30),
        || readyz(executor_addr, 503),
    )
    .await?;
    assert!(body.contains("streams: FACTORY_DLQ missing"), "{body}");
    taskfactory_runtime::nats::declare_streams(&js, 1).await?;
    wait_for(
        "the executor to be ready again",
        Duration::from_secs(30),
        || ready(executor_addr),
    )
    .await?;

    let body = wait_for("the trigger to lead", Duration::from_secs(30), || async {
        Ok(ready(trigger_addr)
            .await?
            .filter(|body| body.contains("scheduling: leader")))
    })
    .await?;
    assert!(body.contains("postgres: ok"), "{body}");

    // NATS goes away: not ready (but alive); it comes back: ready again.
    env.nats.kill();
    let body = wait_for(
        "the executor to turn unready",
        Duration::from_secs(30),
        || readyz(executor_addr, 503),
    )
    .await?;
    assert!(body.contains("nats:"), "says why: {body}");
    assert_eq!(
        http_get(executor_addr, "/healthz").await?.0,
        200,
        "still alive"
    );
    env.nats.restart()?;
    wait_for(
        "the executor to be ready again",
        Duration::from_secs(60),
        || ready(executor_addr),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_can_be_served_apart_from_the_metrics() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let probes: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let _executor = env.spawn_process(
        Service::Executor,
        &[
            ("TASKFACTORY_METRICS_ADDR", &metrics.to_string()),
            ("TASKFACTORY_PROBE_ADDR", &probes.to_string()),
        ],
    )?;
    wait_for("the probes", Duration::from_secs(30), || async {
        Ok(http_get(probes, "/readyz")
            .await
            .ok()
            .filter(|(status, _)| *status == 200))
    })
    .await?;
    assert_eq!(http_get(probes, "/healthz").await?.0, 200);
    assert_eq!(http_get(probes, "/metrics").await?.0, 404);
    assert_eq!(http_get(metrics, "/metrics").await?.0, 200);
    assert_eq!(http_get(metrics, "/readyz").await?.0, 404);
    assert_eq!(http_get(metrics, "/healthz").await?.0, 404);
    Ok(())
}

/// A local HTTP server that answers 500 to everything: tasks against it fail (retryably), and
/// context sources reading it fail.
async fn broken_server() -> anyhow::Result<String> {
    let app = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// Scrapes `addr` until `ready` holds on the scrape (gauges are sampled every few seconds).
async fn scrape_when(
    what: &str,
    addr: SocketAddr,
    ready: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    wait_for(what, Duration::from_secs(20), || async {
        let scrape = scrape(addr).await?;
        Ok(ready(&scrape).then_some(scrape))
    })
    .await
}

fn assert_described(scrape: &Scrape, names: &[&str]) {
    for name in names {
        assert!(
            scrape.help.contains(*name),
            "{name} has no # HELP: {:?}",
            scrape.help
        );
    }
}

/// A histogram's `_count`, `_sum` and `+Inf` bucket for exactly these labels.
fn histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> (f64, f64, f64) {
    let mut with_le = labels.to_vec();
    with_le.push(("le", "+Inf"));
    (
        scrape.count(&format!("{name}_count"), labels),
        scrape.count(&format!("{name}_sum"), labels),
        scrape.count(&format!("{name}_bucket"), &with_le),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_expose_fires_runs_tasks_attempts_dead_letters_consumers_and_sources()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let addr =
        || -> anyhow::Result<SocketAddr> { Ok(format!("127.0.0.1:{}", free_port()).parse()?) };
    let (trigger_addr, orchestrator_addr, executor_addr) = (addr()?, addr()?, addr()?);
    let mut services = Vec::new();
    for (service, addr) in [
        (Service::Trigger, trigger_addr),
        (Service::Orchestrator, orchestrator_addr),
        (Service::Executor, executor_addr),
    ] {
        services
            .push(env.spawn_process(service, &[("TASKFACTORY_METRICS_ADDR", &addr.to_string())])?);
    }
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let broken = broken_server().await?;

    // Event-triggered, three tasks, fired twice.
    create(
        &mut admin,
        "name: fanout\ntrigger: {event: {subject: events.metrics.ping}}\n\
         tasks: [{name: a, type: noop}, {name: b, type: noop}, {name: c, type: log}]\n",
    )
    .await?;
    // One task that always fails: two attempts, then dead and dead-lettered.
    create(
        &mut admin,
        &format!(
            "name: doomed\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: http, \
             params: {{url: '{broken}/task'}}, retry: {{maxAttempts: 2, initialBackoff: 0.1s, maxBackoff: 0.2s}}}}]\n"
        ),
    )
    .await?;
    // A context source that fails (its default is used) beside one that cannot.
    create(
        &mut admin,
        &format!(
            "name: sourced\ntrigger: {{manual: {{}}}}\ncontext: [\
             {{name: price, http: {{url: '{broken}/price'}}, onError: USE_DEFAULT, default: 0}}, \
             {{name: settings, static: {{greeting: hello}}}}]\ntasks: [{{name: t, type: log}}]\n"
        ),
    )
    .await?;
    // Scheduled every second.
    create(
        &mut admin,
        "name: tick\ntrigger: {schedule: {cron: ['* * * * * *'], timezone: UTC}}\n\
         tasks: [{name: t, type: log}]\n",
    )
    .await?;

    for n in 0..2 {
        publish_event(
            &js,
            "events.metrics.ping",
            format!("{{\"n\": {n}}}").into_bytes(),
            None,
        )
        .await?;
    }
    let manual = |id: &str, key: &str| TriggerActivityRequest {
        id: id.to_owned(),
        idempotency_key: key.to_owned(),
        ..Default::default()
    };
    let doomed = admin
        .trigger_activity(manual("doomed", "once"))
        .await?
        .into_inner();
    let again = admin
        .trigger_activity(manual("doomed", "once"))
        .await?
        .into_inner();
    assert!(again.duplicate);
    let sourced = admin
        .trigger_activity(manual("sourced", ""))
        .await?
        .into_inner();

    let run = finished_run(&admin, &doomed.run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed, "{run:?}");
    let run = finished_run(&admin, &sourced.run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
    for activity in ["fanout", "tick"] {
        let wanted = if activity == "fanout" { 2 } else { 1 };
        wait_for(
            &format!("{wanted} succeeded runs of {activity}"),
            Duration::from_secs(20),
            || {
                let mut admin = admin.clone();
                async move {
                    let done = runs(&mut admin, activity)
                        .await?
                        .iter()
                        .filter(|r| r.status() == RunStatus::RunSucceeded)
                        .count();
                    Ok((done >= wanted).then_some(()))
                }
            },
        )
        .await?;
    }

    // Trigger: fires, lateness, occurrences, events, its consumer.
    let trigger = scrape_when("the trigger's consumer gauges", trigger_addr, |s| {
        s.get(
            m::CONSUMER_PENDING,
            &[("consumer", "taskfactory-trigger-events")],
        )
        .is_some()
    })
    .await?;
    let fires = |activity: &str, source: &str, decision: &str| {
        trigger.count(
            m::FIRES,
            &[
                ("activity", activity),
                ("source", source),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(fires("fanout", "event", "fired"), 2.0);
    assert_eq!(fires("doomed", "manual", "fired"), 1.0);
    assert_eq!(fires("doomed", "manual", "duplicate"), 1.0);
    assert_eq!(fires("sourced", "manual", "fired"), 1.0);
    assert!(fires("tick", "schedule", "fired") >= 1.0);
    let (count, sum, infinite) = histogram(
        &trigger,
        m::FIRE_LATENESS,
        &[("activity", "tick"), ("source", "schedule")],
    );
    assert!(count >= 1.0, "a lateness per scheduled fire");
    assert_eq!(infinite, count, "rendered as a histogram with buckets");
    assert!(
        (0.0..5.0 * count).contains(&sum),
        "scheduled fires are on time: {sum}s over {count}"
    );
    assert!(
        trigger.count(
            m::OCCURRENCES,
            &[("activity", "tick"), ("decision", "FIRED")]
        ) >= 1.0
    );
    assert!(trigger.count(m::EVENTS, &[("outcome", "fired")]) >= 2.0);
    assert_described(
        &trigger,
        &[
            m::FIRES,
            m::FIRE_LATENESS,
            m::OCCURRENCES,
            m::EVENTS,
            m::CONSUMER_PENDING,
        ],
    );

    // Orchestrator: runs, tasks, dead letters, its consumers, context sources.
    let orchestrator = scrape_when(
        "the dead letter and the orchestrator's consumer gauges",
        orchestrator_addr,
        |s| {
            s.count(m::DLQ_MESSAGES, &[("subject_kind", "tasks")]) >= 1.0
                && s.get(
                    m::CONSUMER_PENDING,
                    &[("consumer", "taskfactory-orchestrator-triggers")],
                )
                .is_some()
                && s.get(
                    m::CONSUMER_PENDING,
                    &[("consumer", "taskfactory-orchestrator-results")],
                )
                .is_some()
        },
    )
    .await?;
    let finished_runs = |activity: &str, outcome: &str| {
        orchestrator.count(m::RUNS, &[("activity", activity), ("outcome", outcome)])
    };
    assert_eq!(finished_runs("fanout", "succeeded"), 2.0);
    assert_eq!(finished_runs("doomed", "failed"), 1.0);
    assert_eq!(finished_runs("sourced", "succeeded"), 1.0);
    assert!(finished_runs("tick", "succeeded") >= 1.0);
    assert_eq!(
        orchestrator
            .matching(m::RUNS, &[("activity", "fanout")])
            .len(),
        1,
        "no other outcome"
    );
    let finished_tasks = |task_type: &str, outcome: &str| {
        orchestrator.count(m::TASKS, &[("type", task_type), ("outcome", outcome)])
    };
    assert_eq!(finished_tasks("noop", "succeeded"), 4.0);
    assert_eq!(finished_tasks("http", "dead"), 1.0);
    assert!(finished_tasks("log", "succeeded") >= 4.0);
    assert_eq!(
        orchestrator.count(m::DLQ_MESSAGES, &[("subject_kind", "events")]),
        0.0
    );
    assert_eq!(
        orchestrator.count(
            m::CONTEXT_SOURCE_ERRORS,
            &[
                ("activity", "sourced"),
                ("source", "price"),
                ("kind", "http")
            ]
        ),
        1.0
    );
    let (count, _, infinite) = histogram(
        &orchestrator,
        m::CONTEXT_SOURCE_DURATION,
        &[("kind", "http"), ("outcome", "error")],
    );
    assert_eq!((count, infinite), (1.0, 1.0));
    let (count, _, _) = histogram(
        &orchestrator,
        m::CONTEXT_SOURCE_DURATION,
        &[("kind", "static"), ("outcome", "ok")],
    );
    assert!(count >= 1.0);
    // Every result went through a batch: at least as many results as tasks finished.
    let (batches, results, in_buckets) = histogram(&orchestrator, m::RESULT_BATCH_SIZE, &[]);
    assert!(
        batches >= 1.0 && in_buckets == batches,
        "{batches} {in_buckets}"
    );
    assert!(
        results >= 9.0 && results >= batches,
        "{results} results in {batches} batches"
    );
    assert_described(
        &orchestrator,
        &[
            m::RESULT_BATCH_SIZE,
            m::RUNS,
            m::TASKS,
            m::DLQ_MESSAGES,
            m::CONSUMER_PENDING,
            m::CONSUMER_ACK_PENDING,
            m::CONSUMER_REDELIVERED,
            m::CONTEXT_SOURCE_DURATION,
            m::CONTEXT_SOURCE_ERRORS,
        ],
    );

    // Executor: attempts and their durations, redeliveries, its consumers.
    let executor = scrape_when("the executor's consumer gauges", executor_addr, |s| {
        ["noop", "http", "log"].iter().all(|t| {
            s.get(
                m::CONSUMER_PENDING,
                &[("consumer", &format!("taskfactory-executor-{t}"))],
            )
            .is_some()
        })
    })
    .await?;
    let attempts = |task_type: &str, outcome: &str| {
        executor.count(
            m::TASK_ATTEMPTS,
            &[("type", task_type), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("noop", "succeeded"), 4.0);
    assert_eq!(
        (attempts("http", "failed"), attempts("http", "dead")),
        (1.0, 1.0),
        "a failed attempt, retried, then the last one"
    );
    for task_type in ["noop", "http"] {
        for sample in executor.matching(m::TASK_ATTEMPTS, &[("type", task_type)]) {
            let labels: Vec<(&str, &str)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let (count, sum, infinite) = histogram(&executor, m::TASK_DURATION, &labels);
            assert_eq!(
                (count, infinite),
                (sample.value, sample.value),
                "{labels:?}"
            );
            assert!((0.0..30.0 * count).contains(&sum), "{labels:?}: {sum}s");
        }
    }
    assert!(
        executor.count(
            m::REDELIVERIES,
            &[("consumer", "taskfactory-executor-http")]
        ) >= 1.0,
        "the retried attempt came as a redelivery"
    );
    assert!(
        executor
            .get(
                m::CONSUMER_ACK_PENDING,
                &[("consumer", "taskfactory-executor-http")]
            )
            .is_some()
    );
    assert_described(
        &executor,
        &[
            m::TASK_ATTEMPTS,
            m::TASK_DURATION,
            m::REDELIVERIES,
            m::CONSUMER_PENDING,
        ],
    );
    // Bounded labels: nothing anywhere carries an id.
    for scrape in [&trigger, &orchestrator, &executor] {
        for sample in &scrape.samples {
            for value in sample.labels.values() {
                assert!(uuid::Uuid::parse_str(value).is_err(), "{sample:?}");
            }
        }
    }
    for service in services {
        service.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_stream_is_repaired_at_start_and_a_sealed_one_makes_the_service_unready()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let js = env.js().await?; // the operator's user
    taskfactory_runtime::nats::declare_streams(&js, 1).await?;
    let mut tampered = js
        .get_stream("FACTORY_EVENTS")
        .await?
        .info()
        .await?
        .config
        .clone();
    tampered.max_message_size = 1;
    tampered.max_messages = 5;
    tampered.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    tampered.allow_rollup = true;
    js.update_stream(tampered).await?;

    // What every service does at start.
    taskfactory_runtime::nats::declare_streams(&js, 1).await?;
    let repaired = js
        .get_stream("FACTORY_EVENTS")
        .await?
        .info()
        .await?
        .config
        .clone();
    assert!(
        repaired.max_message_size <= 0 || repaired.max_message_size >= 1024 * 1024,
        "{repaired:?}"
    );
    assert!(!repaired.allow_rollup, "{repaired:?}");
    assert!(repaired.max_messages <= 0, "{repaired:?}");
    assert_eq!(
        repaired.discard,
        async_nats::jetstream::stream::DiscardPolicy::Old
    );
    js.publish("events.after.repair", "{}".into())
        .await?
        .await?;

    // A sealed stream cannot be repaired: the service says so instead of looking ready.
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let _executor = env.spawn_process(
        Service::Executor,
        &[("TASKFACTORY_METRICS_ADDR", &metrics.to_string())],
    )?;
    wait_for(
        "the executor to be ready",
        Duration::from_secs(30),
        || async {
            Ok(http_get(metrics, "/readyz")
                .await
                .ok()
                .filter(|(status, _)| *status == 200))
        },
    )
    .await?;
    let mut sealed = js
        .get_stream("FACTORY_DLQ")
        .await?
        .info()
        .await?
        .config
        .clone();
    sealed.sealed = true;
    js.update_stream(sealed).await?;
    let body = wait_for(
        "the executor to turn unready",
        Duration::from_secs(30),
        || async {
            Ok(http_get(metrics, "/readyz")
                .await
                .ok()
                .filter(|(status, _)| *status == 503)
                .map(|(_, body)| body))
        },
    )
    .await?;
    assert!(body.contains("FACTORY_DLQ is sealed"), "{body}");
    Ok(())
}

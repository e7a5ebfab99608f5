//! NATS least privilege, as shipped: nats-server runs with `k8s/config/nats-permissions.conf`
//! (the harness copies it unchanged and only supplies the passwords), each service connects as
//! its own user. The whole flow works under those permissions, and what a service, an external
//! executor or a context source must not do is refused by the server itself — and leaves the
//! streams, consumers and buckets as they were.

use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use taskfactory_model::subjects;
use taskfactory_proto::v1::{
    CancelRunRequest, GetTaskRequest, PreviewRunRequest, RunStatus, TaskStatus,
    TriggerActivityRequest,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};
use tokio::sync::mpsc;

use crate::support::{create, finished_run, publish_event, runs, tasks};

/// A client of one NATS user that hears what the server refuses it.
struct UserClient {
    user: &'static str,
    nats: async_nats::Client,
    refusals: mpsc::UnboundedReceiver<String>,
}

async fn connect_as(env: &TestEnv, user: &'static str) -> anyhow::Result<UserClient> {
    let users = env
        .nats_users
        .as_ref()
        .context("NATS runs with the shipped users")?;
    let (sender, refusals) = mpsc::unbounded_channel();
    let options = users
        .connect_options(user, async_nats::ConnectOptions::new())
        .event_callback(move |event| {
            let sender = sender.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = sender.send(error.to_string());
                }
            }
        });
    let nats = options
        .connect(taskfactory_runtime::nats::server_urls(&env.nats_urls()))
        .await
        .with_context(|| format!("connecting as {user}"))?;
    Ok(UserClient {
        user,
        nats,
        refusals,
    })
}

impl UserClient {
    /// Waits for the server's "Permissions Violation for <action> to <subject>".
    async fn refused(&mut self, action: &str, subject: &str) -> anyhow::Result<()> {
        let wanted = format!("permissions violation for {action} to \"{subject}\"").to_lowercase();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.refusals.recv()).await {
                Ok(Some(error)) if error.to_lowercase().contains(&wanted) => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!(
                    "the server did not refuse {} the {action} to {subject}",
                    self.user
                ),
            }
        }
    }

    /// Publishes to `subject` (as a request would: with a reply subject) and waits for the
    /// server to refuse it.
    async fn publish_refused(&mut self, subject: &str) -> anyhow::Result<()> {
        let reply = self.nats.new_inbox();
        self.nats
            .publish_with_reply(subject.to_owned(), reply, Bytes::from_static(b"{}"))
            .await?;
        self.nats.flush().await?;
        self.refused("publish", subject).await
    }

    /// Subscribes to `subject` and waits for the server to refuse it; the subscription is
    /// returned to show that nothing arrives on it.
    async fn subscribe_refused(&mut self, subject: &str) -> anyhow::Result<async_nats::Subscriber> {
        let subscription = self.nats.subscribe(subject.to_owned()).await?;
        self.nats.flush().await?;
        self.refused("subscription", subject).await?;
        Ok(subscription)
    }

    /// Makes sure everything the server had routed to this connection before now has arrived:
    /// `admin` publishes a marker on this user's own inbox, after whatever else it sent, until
    /// one arrives (a client's flush is no round trip, so the first may precede the
    /// subscription).
    async fn barrier(&self, admin: &async_nats::Client) -> anyhow::Result<()> {
        let subject = format!("{}.barrier", self.nats.new_inbox());
        let mut marker = self.nats.subscribe(subject.clone()).await?;
        self.nats.flush().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            admin
                .publish(subject.clone(), Bytes::from_static(b"marker"))
                .await?;
            admin.flush().await?;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), marker.next()).await
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no barrier marker reached {} within 10s", self.user);
            }
        }
    }
}

async fn last_sequence(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .last_sequence)
}

async fn consumer_names(js: &jetstream::Context, stream: &str) -> anyhow::Result<Vec<String>> {
    let stream = js.get_stream(stream).await?;
    let mut names: Vec<String> = stream
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_flow_works_with_each_service_as_its_own_nats_user() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    assert!(
        env.nats_users.is_some(),
        "the harness runs NATS with the shipped users by default"
    );
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;

    // An event from the `publisher` user → a run → log, noop and publish tasks → results →
    // RUN_SUCCEEDED; the published event starts the next activity.
    create(
        &mut admin,
        "name: perm-first\ntrigger: {event: {subject: events.perm.start}}\ntasks:\n  \
         - {name: a, type: log, params: {message: hi}}\n  - {name: b, type: noop}\n  \
         - {name: c, type: publish, params: {subject: events.perm.chained, payload: {from: first}}}\n",
    )
    .await?;
    create(
        &mut admin,
        "name: perm-second\ntrigger: {event: {subject: events.perm.chained}}\n\
         tasks: [{name: a, type: log, params: {from: '{{ event.from }}'}}]\n",
    )
    .await?;
    let publisher = env.nats_client_as("publisher").await?;
    publish_event(
        &jetstream::new(publisher),
        "events.perm.start",
        br#"{"n": 1}"#.to_vec(),
        Some("perm-1"),
    )
    .await?;
    for activity in ["perm-first", "perm-second"] {
        let run = wait_for(
            &format!("a run of {activity}"),
            Duration::from_secs(30),
            || {
                let mut admin = admin.clone();
                async move { Ok(runs(&mut admin, activity).await?.into_iter().next()) }
            },
        )
        .await?;
        let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
        assert_eq!(
            run.status(),
            RunStatus::RunSucceeded,
            "{activity}: {}",
            run.error
        );
    }

    // A schedule fires: the trigger holds the scheduling lease in its KV bucket.
    create(
        &mut admin,
        "name: perm-pulse\ntrigger: {schedule: {cron: ['* * * * * *'], timezone: UTC}}\n\
         tasks: [{name: t, type: log}]\n",
    )
    .await?;
    let scheduled = wait_for("a scheduled run", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "perm-pulse").await?.into_iter().last()) }
    })
    .await?;
    let scheduled = finished_run(&admin, &scheduled.id, Duration::from_secs(30)).await?;
    assert_eq!(
        scheduled.status(),
        RunStatus::RunSucceeded,
        "{}",
        scheduled.error
    );

    // PreviewRun and CancelRun: the trigger asks, an orchestrator answers on the trigger's inbox.
    create(
        &mut admin,
        "name: perm-approval\ntrigger: {manual: {}}\n\
         tasks: [{name: approve, type: human, timeout: 1h}, {name: note, type: log}]\n",
    )
    .await?;
    let preview = admin
        .preview_run(PreviewRunRequest {
            id: "perm-approval".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(preview.tasks.len(), 2);
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: "perm-approval".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let human = wait_for("the human task", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run_id = fired.run_id.clone();
        async move {
            let tasks = tasks(&mut admin, &run_id).await?;
            Ok(tasks
                .into_iter()
                .find(|task| task.template == "approve" && task.status() == TaskStatus::Waiting))
        }
    })
    .await?;
    let cancelled = admin
        .cancel_run(CancelRunRequest {
            id: fired.run_id.clone(),
            reason: "not needed".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.status(), RunStatus::RunCancelled);
    let human = admin
        .get_task(GetTaskRequest { id: human.id })
        .await?
        .into_inner();
    assert_eq!(human.status(), TaskStatus::Cancelled);
    // The orchestrator told the executors through the cancelled-runs bucket.
    let bucket = env
        .js()
        .await?
        .get_key_value("taskfactory_cancelled_runs")
        .await?;
    assert!(bucket.get(&fired.run_id).await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_a_user_may_not_do_is_refused_by_the_server_and_changes_nothing() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    // The executor declares its consumers, then stops: the tasks queued below stay queued.
    let executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    executor.stop().await?;
    let admin = env.nats_client().await?;
    let js = jetstream::new(admin.clone());

    // An http task waits in the queue, for the built-in executor's consumer only.
    js.publish("tasks.http", Bytes::from_static(b"queued"))
        .await?
        .await?;
    let http_consumer = "taskfactory-executor-http";
    let tasks_stream = js.get_stream("FACTORY_TASKS").await?;
    let consumers_before = consumer_names(&js, "FACTORY_TASKS").await?;

    // Forged fires, tasks and results.
    let mut executor = connect_as(&env, "executor").await?;
    let mut sources = connect_as(&env, "sources").await?;
    let mut publisher = connect_as(&env, "publisher").await?;
    let mut trigger = connect_as(&env, "trigger").await?;
    let mut orchestrator = connect_as(&env, "orchestrator").await?;
    let triggers_before = last_sequence(&js, "FACTORY_TRIGGERS").await?;
    let tasks_before = last_sequence(&js, "FACTORY_TASKS").await?;
    let results_before = last_sequence(&js, "FACTORY_RESULTS").await?;
    let events_before = last_sequence(&js, "FACTORY_EVENTS").await?;
    executor.publish_refused("triggers.x").await?;
    orchestrator.publish_refused("triggers.x").await?;
    executor.publish_refused("tasks.http").await?;
    trigger.publish_refused("tasks.http").await?;
    for user in [
        &mut sources,
        &mut publisher,
        &mut trigger,
        &mut orchestrator,
    ] {
        user.publish_refused("results.a.b").await?;
    }
    // Only the orchestrator announces finished runs; sources publish no events at all.
    for user in [&mut executor, &mut publisher, &mut trigger] {
        user.publish_refused("events.taskfactory.run.completed")
            .await?;
    }
    sources.publish_refused("events.orders.created").await?;
    // Executors write their tasks' finished entries, never the key that says the bucket is
    // complete (only the orchestrator's refill does); nobody else writes there at all.
    let complete = format!(
        "$KV.{}.{}",
        subjects::FINISHED_TASKS_BUCKET,
        subjects::FINISHED_TASKS_COMPLETE_KEY
    );
    executor.publish_refused(&complete).await?;
    // ... and only the entries of their own types: the built-in executor cannot mark a `vision`
    // task finished (nor the external `vision` executor an `http` one), which would keep it from
    // ever running.
    let entry = |task_type: &str| {
        format!(
            "$KV.{}.{}",
            subjects::FINISHED_TASKS_BUCKET,
            subjects::finished_task_key("some-task", task_type)
        )
    };
    executor.publish_refused(&entry("vision")).await?;
    executor
        .publish_refused("$KV.taskfactory_finished_tasks.some-task")
        .await?;
    for user in [&mut sources, &mut publisher, &mut trigger] {
        user.publish_refused(&format!(
            "$KV.{}.some-task",
            subjects::FINISHED_TASKS_BUCKET
        ))
        .await?;
    }
    assert_eq!(
        last_sequence(&js, "FACTORY_TRIGGERS").await?,
        triggers_before
    );
    assert_eq!(last_sequence(&js, "FACTORY_TASKS").await?, tasks_before);
    assert_eq!(last_sequence(&js, "FACTORY_RESULTS").await?, results_before);
    assert_eq!(last_sequence(&js, "FACTORY_EVENTS").await?, events_before);

    // An external executor of type vision reaches for tasks.http: no core subscription, no
    // consumer of its own with that filter, no other consumer, no pulling from the built-in one.
    let mut vision = connect_as(&env, "executor-vision").await?;
    let mut peek = vision.subscribe_refused("tasks.http").await?;
    for subject in [
        "$JS.API.CONSUMER.CREATE.FACTORY_TASKS.python-executor-vision.tasks.http",
        "$JS.API.CONSUMER.CREATE.FACTORY_TASKS.python-executor-vision.tasks.>",
        "$JS.API.CONSUMER.CREATE.FACTORY_TASKS.python-executor-vision",
        "$JS.API.CONSUMER.CREATE.FACTORY_TASKS.sneaky.tasks.http",
        "$JS.API.CONSUMER.CREATE.FACTORY_TASKS",
        "$JS.API.CONSUMER.DURABLE.CREATE.FACTORY_TASKS.sneaky",
        "$JS.API.CONSUMER.MSG.NEXT.FACTORY_TASKS.taskfactory-executor-http",
    ] {
        vision.publish_refused(subject).await?;
    }
    vision.publish_refused(&complete).await?;
    vision.publish_refused(&entry("http")).await?;
    vision.publish_refused(&entry("vision.v2")).await?;
    js.publish("tasks.http", Bytes::from_static(b"queued too"))
        .await?
        .await?;
    vision.barrier(&admin).await?;
    assert!(
        peek.next().now_or_never().is_none(),
        "nothing on tasks.http reached the vision executor"
    );
    let waiting = tasks_stream.consumer_info(http_consumer).await?;
    assert_eq!(
        (waiting.num_pending, waiting.delivered.stream_sequence),
        (2, 0),
        "both http tasks still wait, never delivered"
    );
    assert_eq!(
        consumer_names(&js, "FACTORY_TASKS").await?,
        consumers_before
    );
    vision_does_its_own_work(&env, &js).await?;

    // What the attacker did through a request source, now under the sources user: delete the
    // events stream, purge the dead letters, delete an executor's consumer, read the lease,
    // flood the definitions signal.
    js.publish("dlq.other", Bytes::from_static(b"kept"))
        .await?
        .await?;
    let dead_letters = js
        .get_stream("FACTORY_DLQ")
        .await?
        .info()
        .await?
        .state
        .messages;
    assert!(dead_letters >= 1);
    let mut lease_watch = js
        .get_key_value("taskfactory_leases")
        .await?
        .watch_all()
        .await?;
    let mut lease_peek = sources
        .subscribe_refused("$KV.taskfactory_leases.>")
        .await?;
    let mut signal = admin
        .subscribe("taskfactory.internal.definitions-changed")
        .await?;
    admin.flush().await?;
    for subject in [
        "$JS.API.STREAM.DELETE.FACTORY_EVENTS",
        "$JS.API.STREAM.PURGE.FACTORY_DLQ",
        "$JS.API.CONSUMER.DELETE.FACTORY_TASKS.taskfactory-executor-http",
        "$JS.API.STREAM.INFO.KV_taskfactory_leases",
        "$JS.API.DIRECT.GET.KV_taskfactory_leases.$KV.taskfactory_leases.scheduler",
        "$JS.API.STREAM.MSG.GET.KV_taskfactory_leases",
        "taskfactory.internal.definitions-changed",
        "taskfactory.internal.preview",
    ] {
        sources.publish_refused(subject).await?;
    }
    sources.subscribe_refused("_INBOX.>").await?;
    executor.subscribe_refused("_INBOX_trigger.>").await?;
    // The orchestrator may purge only the tasks of unserved types, and delete nothing.
    for subject in [
        "$JS.API.STREAM.DELETE.FACTORY_EVENTS",
        "$JS.API.STREAM.DELETE.FACTORY_TASKS",
        "$JS.API.STREAM.PURGE.FACTORY_DLQ",
        "$JS.API.CONSUMER.DELETE.FACTORY_TASKS.taskfactory-executor-http",
        "$KV.taskfactory_leases.scheduler",
    ] {
        orchestrator.publish_refused(subject).await?;
    }

    js.get_stream("FACTORY_EVENTS")
        .await
        .context("FACTORY_EVENTS is still there")?;
    assert_eq!(
        js.get_stream("FACTORY_DLQ")
            .await?
            .info()
            .await?
            .state
            .messages,
        dead_letters,
        "no dead letter was purged"
    );
    tasks_stream
        .consumer_info(http_consumer)
        .await
        .context("the executor's consumer is still there")?;
    // The lease is renewed (admin sees it), and none of it reached the sources user.
    tokio::time::timeout(Duration::from_secs(10), lease_watch.next())
        .await
        .context("no lease renewal seen")?;
    sources.barrier(&admin).await?;
    assert!(
        lease_peek.next().now_or_never().is_none(),
        "the sources user read nothing of the lease"
    );
    // The signal the sources user sent never went out: the first one anybody gets is ours.
    admin
        .publish(
            "taskfactory.internal.definitions-changed",
            Bytes::from_static(b"marker"),
        )
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(10), signal.next())
        .await?
        .context("the signal subscription ended")?;
    assert_eq!(first.payload.as_ref(), b"marker");
    Ok(())
}

/// The vision executor's own work is allowed: its consumer of tasks.vision, pulling and acking a
/// task, a result, and reading the cancelled-runs and finished-tasks buckets.
async fn vision_does_its_own_work(env: &TestEnv, admin: &jetstream::Context) -> anyhow::Result<()> {
    let vision = jetstream::new(env.nats_client_as("executor-vision").await?);
    let stream = vision.get_stream("FACTORY_TASKS").await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("python-executor-vision".to_owned()),
            filter_subject: "tasks.vision".to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    admin
        .publish("tasks.vision", Bytes::from_static(b"look"))
        .await?
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let task = batch
        .next()
        .await
        .context("the vision task was not delivered")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(task.payload.as_ref(), b"look");
    vision
        .publish("results.vision-activity.run-1", Bytes::from_static(b"seen"))
        .await?
        .await?;
    task.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let bucket = vision.get_key_value("taskfactory_cancelled_runs").await?;
    assert!(bucket.get("no-such-run").await?.is_none());
    let finished = vision.get_key_value("taskfactory_finished_tasks").await?;
    assert!(finished.get("no-such-task").await?.is_none());
    // It marks its finished tasks (create, then raise by compare-and-set), as the contract
    // recommends.
    let key = subjects::finished_task_key("vision-task", "vision");
    let revision = finished.create(&key, "1".into()).await?;
    finished.update(&key, "2".into(), revision).await?;
    assert_eq!(finished.get(&key).await?.as_deref(), Some(&b"2"[..]));
    wait_for("the vision task acked", Duration::from_secs(10), || {
        let stream = stream.clone();
        async move {
            let info = stream.consumer_info("python-executor-vision").await?;
            Ok((info.num_ack_pending == 0 && info.num_pending == 0).then_some(()))
        }
    })
    .await
}

/// The executor, as the `executor` user, watches both refilled buckets' `complete` keys (rather
/// than reading them every second) and hears of their replacement: the watches exist on the
/// server, the executor reports each bucket complete through its watch
/// (`taskfactory_bucket_watched` 1 and `taskfactory_bucket_complete` 1: reading the key instead
/// would report 0 watched), and a bucket deleted and declared again is seen as not complete at
/// once (the stream advisory), with the keepers' next look an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_executor_watches_the_complete_keys_as_its_own_nats_user() -> anyhow::Result<()> {
    use taskfactory_runtime::metrics::{BUCKET_COMPLETE, BUCKET_WATCHED};

    let env = TestEnv::new(EnvOptions {
        declare_every: Duration::from_secs(3600),
        ..EnvOptions::default()
    })
    .await?;
    let _orchestrator = env.start(Service::Orchestrator);
    let _executor = env.start(Service::Executor);
    env.wait_ready(&[Service::Orchestrator, Service::Executor])
        .await?;
    let admin = env.js().await?;
    let state = |bucket: &'static str| async move {
        let metrics =
            crate::support::Scrape::parse(&taskfactory_runtime::metrics::handle().render())?;
        Ok::<_, anyhow::Error>((
            metrics.get(BUCKET_WATCHED, &[("bucket", bucket)]),
            metrics.get(BUCKET_COMPLETE, &[("bucket", bucket)]),
        ))
    };
    for bucket in [
        subjects::FINISHED_TASKS_BUCKET,
        subjects::CANCELLED_RUNS_BUCKET,
    ] {
        wait_for(
            &format!("{bucket} complete, through a watch"),
            Duration::from_secs(20),
            || async { Ok((state(bucket).await? == (Some(1.0), Some(1.0))).then_some(())) },
        )
        .await?;
        let watches = consumer_names(&admin, &format!("KV_{bucket}")).await?;
        assert!(!watches.is_empty(), "no watch of {bucket} on the server");
    }
    admin
        .delete_key_value(subjects::CANCELLED_RUNS_BUCKET)
        .await?;
    taskfactory_runtime::nats::ensure_bucket(
        &admin,
        taskfactory_runtime::nats::cancelled_runs_config(1),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    wait_for(
        "the replaced bucket seen as not complete",
        Duration::from_secs(5),
        || async {
            let (_, complete) = state(subjects::CANCELLED_RUNS_BUCKET).await?;
            Ok((complete == Some(0.0)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

//! Schedules, manual fires, definition changes and the admin surface.

use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_model::spec::{spec_from_yaml, timestamp_to_chrono};
use taskfactory_proto::v1::{
    DeleteActivityRequest, GetRunRequest, RunStatus, TaskStatus, TriggerActivityRequest,
    TriggerSource, UpdateActivityRequest,
};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::support::{self, create, finished_run, runs, tasks};

const EVERY_SECOND: &str = r#"
name: every-second
trigger:
  schedule:
    cron: ["* * * * * *"]
    timezone: UTC
context:
  - name: settings
    static: {greeting: hello}
tasks:
  - name: say
    type: log
    params: {message: "{{ context.settings.greeting }} at {{ trigger.scheduled_for }}"}
  - name: count
    type: log
    forEach: "[1, 2]"
    params: {n: "{{ item }}"}
"#;

fn at(ts: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    timestamp_to_chrono(ts.as_ref().expect("timestamp set")).expect("valid timestamp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_second_schedule_fires_consecutive_seconds_with_tasks_succeeded() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let activity = create(&mut admin, EVERY_SECOND).await?;
    assert_eq!(activity.version, 1);
    assert!(activity.next_fire_at.is_some());

    let finished = wait_for("4 finished runs", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let mut done: Vec<_> = runs(&mut admin, "every-second")
                .await?
                .into_iter()
                .filter(|r| r.status() == RunStatus::RunSucceeded)
                .collect();
            Ok((done.len() >= 4).then(|| {
                done.sort_by_key(|r| at(&r.scheduled_for));
                done
            }))
        }
    })
    .await?;

    let all = runs(&mut admin, "every-second").await?;
    let mut scheduled: Vec<DateTime<Utc>> = all.iter().map(|r| at(&r.scheduled_for)).collect();
    scheduled.sort();
    for pair in scheduled.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "runs are consecutive seconds: {scheduled:?}"
        );
    }
    for run in &all {
        assert_eq!(run.source(), TriggerSource::Schedule);
        assert_eq!(at(&run.scheduled_for).timestamp_subsec_nanos(), 0);
        let late = at(&run.fired_at) - at(&run.scheduled_for);
        assert!(
            late >= chrono::Duration::zero() && late < chrono::Duration::seconds(3),
            "fired on time: {late}"
        );
    }
    for run in finished.iter().take(4) {
        let detail = admin
            .get_run(GetRunRequest { id: run.id.clone() })
            .await?
            .into_inner();
        let context = serde_json::to_string(&taskfactory_model::values::struct_to_json(
            detail.context.as_ref().unwrap(),
        ))?;
        assert_eq!(context, r#"{"settings":{"greeting":"hello"}}"#);
        assert_eq!(detail.evaluation.len(), 2);
        assert_eq!(detail.evaluation[1].items, 2);
        assert_eq!(detail.tasks_spawned, 3);
        assert_eq!(detail.tasks_succeeded, 3);
        let run_tasks = tasks(&mut admin, &run.id).await?;
        assert_eq!(run_tasks.len(), 3);
        assert!(
            run_tasks
                .iter()
                .all(|t| t.status() == TaskStatus::Succeeded && t.attempts == 1)
        );
        let say = run_tasks
            .iter()
            .find(|t| t.template == "say")
            .expect("the say task");
        let message = taskfactory_model::values::struct_to_json(say.params.as_ref().unwrap());
        let expected = format!(
            "hello at {}",
            at(&run.scheduled_for).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        assert_eq!(message["message"], expected);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_trigger_fires_once_per_idempotency_key() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: by-hand\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, params: {who: '{{ event.who }}'}}]",
    )
    .await?;
    let request = |key: &str| TriggerActivityRequest {
        id: "by-hand".to_owned(),
        payload: Some(taskfactory_model::values::json_to_value(
            &serde_json::json!({"who": "ops"}),
        )),
        idempotency_key: key.to_owned(),
        ..Default::default()
    };
    let first = admin.trigger_activity(request("k1")).await?.into_inner();
    let again = admin.trigger_activity(request("k1")).await?.into_inner();
    let other = admin.trigger_activity(request("k2")).await?.into_inner();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.run_id, again.run_id);
    assert!(!other.duplicate);
    assert_ne!(first.run_id, other.run_id);

    let run = finished_run(&admin, &first.run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.source(), TriggerSource::Manual);
    finished_run(&admin, &other.run_id, Duration::from_secs(20)).await?;
    assert_eq!(runs(&mut admin, "by-hand").await?.len(), 2);
    let run_tasks = tasks(&mut admin, &first.run_id).await?;
    assert_eq!(
        taskfactory_model::values::struct_to_json(run_tasks[0].params.as_ref().unwrap())["who"],
        "ops"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn definition_changes_take_effect_without_a_restart() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let yaml = |subject: &str, enabled: bool| {
        format!(
            "name: watcher\nenabled: {enabled}\ntrigger: {{event: {{subject: {subject}}}}}\ntasks: [{{name: t, type: log}}]"
        )
    };
    create(&mut admin, &yaml("events.a", true)).await?;
    support::publish_event(&js, "events.a", b"{}".to_vec(), Some("1")).await?;
    wait_for("a run of version 1", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            Ok(runs(&mut admin, "watcher")
                .await?
                .into_iter()
                .find(|r| r.activity_version == 1))
        }
    })
    .await?;

    // Change the subject: the new version listens to events.b only.
    let updated = admin
        .update_activity(UpdateActivityRequest {
            id: "watcher".to_owned(),
            spec: Some(spec_from_yaml(&yaml("events.b", true))?),
        })
        .await?
        .into_inner();
    assert_eq!(updated.version, 2);
    let unchanged = admin
        .update_activity(UpdateActivityRequest {
            id: "watcher".to_owned(),
            spec: Some(spec_from_yaml(&yaml("events.b", true))?),
        })
        .await?
        .into_inner();
    assert_eq!(
        unchanged.version, 2,
        "an identical spec makes no new version"
    );
    // The registry reloads at once on a local change; give its reload a moment by polling for it.
    wait_for("a run of version 2", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let js = js.clone();
        async move {
            support::publish_event(&js, "events.b", b"{}".to_vec(), None).await?;
            Ok(runs(&mut admin, "watcher")
                .await?
                .into_iter()
                .find(|r| r.activity_version == 2))
        }
    })
    .await?;
    support::publish_event(&js, "events.a", b"{}".to_vec(), Some("2")).await?;

    // Disable, then delete: events no longer fire it.
    admin
        .update_activity(UpdateActivityRequest {
            id: "watcher".to_owned(),
            spec: Some(spec_from_yaml(&yaml("events.b", false))?),
        })
        .await?;
    create(
        &mut admin,
        "name: sentinel\ntrigger: {event: {subject: events.b}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    let before = runs(&mut admin, "watcher").await?.len();
    wait_for("the sentinel to fire", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let js = js.clone();
        async move {
            support::publish_event(&js, "events.b", b"{}".to_vec(), None).await?;
            Ok((!runs(&mut admin, "sentinel").await?.is_empty()).then_some(()))
        }
    })
    .await?;
    wait_for_triggers_drained(&js).await?;
    let watcher_runs = runs(&mut admin, "watcher").await?;
    assert_eq!(
        watcher_runs.len(),
        before,
        "a disabled activity does not fire"
    );
    assert!(
        watcher_runs
            .iter()
            .all(|r| r.subject != "events.a" || r.activity_version == 1)
    );

    admin
        .delete_activity(DeleteActivityRequest {
            id: "watcher".to_owned(),
        })
        .await?;
    let status = admin
        .trigger_activity(TriggerActivityRequest {
            id: "watcher".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // Its name is free again.
    create(&mut admin, &yaml("events.c", true)).await?;
    Ok(())
}

/// Waits until the orchestrator has taken in every trigger published so far.
pub async fn wait_for_triggers_drained(js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
    wait_for(
        "the trigger stream to drain",
        Duration::from_secs(20),
        || async {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_stream("FACTORY_TRIGGERS")
                .await?
                .get_consumer("taskfactory-orchestrator-triggers")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let info = consumer.info().await?;
            Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_serves_reflection_and_health() -> anyhow::Result<()> {
    use futures::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(taskfactory_tests::Service::Trigger);
    env.wait_ready(&[taskfactory_tests::Service::Trigger])
        .await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", env.grpc_addr))?
        .connect()
        .await?;
    let mut client = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.next().await.expect("a response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"taskfactory.v1.AdminService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    assert!(responses.next().await.expect("a v1alpha response").is_ok());

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "taskfactory.v1.AdminService".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabling_a_schedule_stops_it_and_enabling_catches_up_once() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let yaml = |enabled: bool| {
        format!(
            "name: pulse\nenabled: {enabled}\ntrigger: {{schedule: {{cron: ['* * * * * *'], timezone: UTC}}}}\ntasks: [{{name: t, type: log}}]"
        )
    };
    create(&mut admin, &yaml(true)).await?;
    wait_for("a few runs", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok((runs(&mut admin, "pulse").await?.len() >= 2).then_some(())) }
    })
    .await?;

    let update = |enabled: bool| UpdateActivityRequest {
        id: "pulse".to_owned(),
        spec: Some(spec_from_yaml(&yaml(enabled)).expect("valid spec")),
    };
    let disabled = admin.update_activity(update(false)).await?.into_inner();
    assert!(disabled.next_fire_at.is_none());
    let disabled_at = Utc::now();
    // Watch for a while: nothing scheduled after the change may fire.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = runs(&mut admin, "pulse").await?;
    let late: Vec<_> = during
        .iter()
        .filter(|r| at(&r.scheduled_for) > disabled_at + chrono::Duration::seconds(1))
        .collect();
    assert!(late.is_empty(), "a disabled schedule fired: {late:?}");

    // Enabled again: the missed seconds are decided by the default misfire policy (LATEST): one
    // catch-up run, then every second again.
    admin.update_activity(update(true)).await?;
    let resumed = wait_for("runs after enabling", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let before = during.len();
        async move {
            let now = runs(&mut admin, "pulse").await?;
            Ok((now.len() >= before + 3).then_some(now))
        }
    })
    .await?;
    let catch_ups: Vec<_> = resumed
        .iter()
        .filter(|r| r.source() == TriggerSource::Catchup)
        .collect();
    assert_eq!(
        catch_ups.len(),
        1,
        "one catch-up run for the missed seconds"
    );
    assert!(at(&catch_ups[0].scheduled_for) > disabled_at);

    admin
        .delete_activity(DeleteActivityRequest {
            id: "pulse".to_owned(),
        })
        .await?;
    let deleted_at = Utc::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pool = env.db.pool().await?;
    let (after_delete,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM runs WHERE activity_name = 'pulse' AND scheduled_for > $1",
    )
    .bind(deleted_at + chrono::Duration::seconds(1))
    .fetch_one(&pool)
    .await?;
    assert_eq!(after_delete, 0, "a deleted schedule fired");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updating_a_running_schedule_neither_misses_nor_doubles_a_second() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let yaml = |label: &str| {
        format!(
            "name: steady\ntrigger: {{schedule: {{cron: ['* * * * * *'], timezone: UTC, misfire: MISFIRE_SKIP}}}}\ntasks: [{{name: t, type: log, params: {{label: {label}}}}}]"
        )
    };
    create(&mut admin, &yaml("one")).await?;
    wait_for("runs of version 1", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok((runs(&mut admin, "steady").await?.len() >= 2).then_some(())) }
    })
    .await?;
    for (version, label) in [(2, "two"), (3, "three")] {
        admin
            .update_activity(UpdateActivityRequest {
                id: "steady".to_owned(),
                spec: Some(spec_from_yaml(&yaml(label))?),
            })
            .await?;
        wait_for(
            &format!("runs of version {version}"),
            Duration::from_secs(20),
            || {
                let mut admin = admin.clone();
                async move {
                    let n = runs(&mut admin, "steady")
                        .await?
                        .iter()
                        .filter(|r| r.activity_version == version)
                        .count();
                    Ok((n >= 2).then_some(()))
                }
            },
        )
        .await?;
    }
    let all = runs(&mut admin, "steady").await?;
    let mut seconds: Vec<DateTime<Utc>> = all.iter().map(|r| at(&r.scheduled_for)).collect();
    seconds.sort();
    for pair in seconds.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "no second missed or doubled across updates: {seconds:?}"
        );
    }
    assert!(
        all.iter().all(|r| r.source() == TriggerSource::Schedule),
        "an update is not downtime"
    );
    Ok(())
}

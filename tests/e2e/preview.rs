//! `PreviewRun` (the would-be tasks, nothing written) and versions (a run keeps the version it
//! fired with).

use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfactory_model::spec::{chrono_to_timestamp, spec_from_yaml};
use taskfactory_model::values::{json_to_value, struct_to_json};
use taskfactory_proto::v1::{
    BackfillRequest, GetActivityRequest, ListActivityVersionsRequest, PauseActivityRequest,
    PreviewRunRequest, RunStatus, Task, TaskInstance, TriggerActivityRequest,
    UpdateActivityRequest,
};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::context::{fire, json_api};
use crate::support::{RecordingServer, create, finished_run, runs, tasks};

fn quote(base: &str, trigger: &str) -> String {
    format!(
        r#"
name: quote
trigger: {trigger}
context:
  - name: warehouse
    static: {{id: berlin-1}}
  - name: price
    http: {{url: "{base}/price/{{{{ event.sku }}}}"}}
tasks:
  - name: line
    type: log
    forEach: event.lines
    when: "item.qty > 0"
    params: {{sku: "{{{{ event.sku }}}}", qty: "{{{{ item.qty }}}}", each: "{{{{ context.price.price }}}}", from: "{{{{ context.warehouse.id }}}}"}}
  - name: notify
    type: publish
    params: {{subject: events.quotes.made, payload: {{sku: "{{{{ event.sku }}}}"}}}}
"#
    )
}

/// `(template, item index, type, params)` of would-be and real tasks alike.
type Shape = (String, u32, String, serde_json::Value);

fn shape_of_instance(t: &TaskInstance) -> Shape {
    (
        t.template.clone(),
        t.item_index,
        t.r#type.clone(),
        struct_to_json(t.params.as_ref().unwrap()),
    )
}

fn shape_of_task(t: &Task) -> Shape {
    (
        t.template.clone(),
        t.item_index,
        t.r#type.clone(),
        struct_to_json(t.params.as_ref().unwrap()),
    )
}

async fn counts(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM activities), (SELECT count(*) FROM fires), \
                (SELECT count(*) FROM runs), (SELECT count(*) FROM tasks)",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preview_returns_exactly_the_tasks_a_real_fire_makes_and_writes_nothing()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let pool = env.db.pool().await?;
    let mut admin = env.admin().await?;
    let base = json_api().await?;
    let payload = serde_json::json!({"sku": "A-1", "lines": [{"qty": 2}, {"qty": 0}, {"qty": 5}]});

    // A stored manual activity: preview, then fire with the same payload.
    create(&mut admin, &quote(&base, "{manual: {}}")).await?;
    let before = counts(&pool).await?;
    let preview = admin
        .preview_run(PreviewRunRequest {
            id: "quote".to_owned(),
            payload: Some(json_to_value(&payload)),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(counts(&pool).await?, before, "a preview writes nothing");
    let stream = env.js().await?.get_stream("FACTORY_TASKS").await?;
    assert_eq!(
        stream.cached_info().state.messages,
        0,
        "and publishes nothing"
    );
    assert_eq!(preview.tasks.len(), 3);
    let context = struct_to_json(preview.context.as_ref().unwrap());
    assert_eq!(context["price"]["price"], 42);
    assert_eq!(preview.evaluation[0].items, 3);
    assert_eq!(preview.evaluation[0].tasks, 2);

    let run = fire(&mut admin, "quote", payload.clone()).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{}", run.error);
    let real: Vec<Shape> = tasks(&mut admin, &run.id)
        .await?
        .iter()
        .map(shape_of_task)
        .collect();
    let manual_shapes: Vec<Shape> = preview.tasks.iter().map(shape_of_instance).collect();
    assert_eq!(
        manual_shapes, real,
        "the preview made exactly the real tasks"
    );

    // A schedule previewed for a time, then backfilled at that time: the same tasks, ids and
    // all.
    create(
        &mut admin,
        &format!(
            r#"
name: morning-quote
trigger: {{schedule: {{cron: ['0 6 * * *'], timezone: Europe/Paris}}}}
context: [{{name: price, http: {{url: "{base}/price/daily"}}}}]
tasks:
  - name: line
    type: log
    forEach: "[1, 2, 3]"
    params: {{n: "{{{{ item }}}}", each: "{{{{ context.price.price }}}}", at: "{{{{ trigger.scheduled_for }}}}"}}
"#
        ),
    )
    .await?;
    admin
        .pause_activity(PauseActivityRequest {
            id: "morning-quote".to_owned(),
            note: String::new(),
        })
        .await?;
    let at: DateTime<Utc> = "2026-11-02T05:00:00Z".parse()?;
    let preview = admin
        .preview_run(PreviewRunRequest {
            id: "morning-quote".to_owned(),
            scheduled_for: Some(chrono_to_timestamp(at)),
            ..Default::default()
        })
        .await?
        .into_inner();
    admin
        .backfill(BackfillRequest {
            id: "morning-quote".to_owned(),
            start: Some(chrono_to_timestamp(at)),
            end: Some(chrono_to_timestamp(at)),
            overlap: 0,
        })
        .await?;
    let backfilled = wait_for("the backfilled run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "morning-quote").await?.into_iter().next()) }
    })
    .await?;
    let backfilled = finished_run(&admin, &backfilled.id, Duration::from_secs(20)).await?;
    assert_eq!(
        backfilled.status(),
        RunStatus::RunSucceeded,
        "{}",
        backfilled.error
    );
    let real: Vec<(String, Shape)> = tasks(&mut admin, &backfilled.id)
        .await?
        .iter()
        .map(|t| (t.id.clone(), shape_of_task(t)))
        .collect();
    let would: Vec<(String, Shape)> = preview
        .tasks
        .iter()
        .map(|t| (t.task_id.clone(), shape_of_instance(t)))
        .collect();
    assert_eq!(would.len(), 3);
    assert_eq!(would, real, "the same tasks, ids included");

    // An unsaved spec: previewed, not stored.
    let unsaved =
        spec_from_yaml(&quote(&base, "{manual: {}}").replace("name: quote", "name: draft-quote"))?;
    let before = counts(&pool).await?;
    let draft = admin
        .preview_run(PreviewRunRequest {
            spec: Some(unsaved),
            payload: Some(json_to_value(&payload)),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        draft
            .tasks
            .iter()
            .map(shape_of_instance)
            .collect::<Vec<_>>(),
        manual_shapes,
        "an unsaved spec previews the same"
    );
    assert_eq!(counts(&pool).await?, before);

    // Mistakes are named.
    let mut broken = spec_from_yaml(&quote(&base, "{manual: {}}"))?;
    broken.tasks[0].for_each = "event.lines |".to_owned();
    let status = admin
        .preview_run(PreviewRunRequest {
            spec: Some(broken),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("tasks[0].forEach"),
        "{}",
        status.message()
    );
    let status = admin
        .preview_run(PreviewRunRequest::default())
        .await
        .unwrap_err();
    assert!(status.message().starts_with("id:"), "{}", status.message());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_in_flight_finish_on_their_version_and_new_fires_use_the_new_one() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let server = RecordingServer::start(Duration::from_millis(1500)).await?;
    let spec = |version: u32| {
        format!(
            "name: versioned\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}', body: {{made_by: v{version}}}}}}}]\n",
            server.url
        )
    };
    create(&mut admin, &spec(1)).await?;
    let old = admin
        .trigger_activity(TriggerActivityRequest {
            id: "versioned".to_owned(),
            idempotency_key: "old".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // While the old run's task is in flight, a new version.
    wait_for(
        "the old run's call to start",
        Duration::from_secs(20),
        || async {
            let runs = runs(&mut admin.clone(), "versioned").await?;
            Ok(runs
                .first()
                .filter(|r| r.status() == RunStatus::RunRunning)
                .map(|_| ()))
        },
    )
    .await?;
    let updated = admin
        .update_activity(UpdateActivityRequest {
            id: "versioned".to_owned(),
            spec: Some(spec_from_yaml(&spec(2))?),
        })
        .await?
        .into_inner();
    assert_eq!(updated.version, 2);
    let new = admin
        .trigger_activity(TriggerActivityRequest {
            id: "versioned".to_owned(),
            idempotency_key: "new".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let old = finished_run(&admin, &old.run_id, Duration::from_secs(30)).await?;
    let new = finished_run(&admin, &new.run_id, Duration::from_secs(30)).await?;
    assert_eq!((old.activity_version, new.activity_version), (1, 2));
    assert_eq!(old.status(), RunStatus::RunSucceeded);
    assert_eq!(new.status(), RunStatus::RunSucceeded);
    let bodies: Vec<serde_json::Value> = server.calls().into_iter().map(|(_, b)| b).collect();
    assert!(
        bodies.contains(&serde_json::json!({"made_by": "v1"})),
        "{bodies:?}"
    );
    assert!(
        bodies.contains(&serde_json::json!({"made_by": "v2"})),
        "{bodies:?}"
    );
    // Both versions stay readable, and are listed.
    let listed = admin
        .list_activity_versions(ListActivityVersionsRequest {
            id: "versioned".to_owned(),
        })
        .await?
        .into_inner()
        .versions;
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.version, v.current))
            .collect::<Vec<_>>(),
        [(2, true), (1, false)]
    );
    for version in [1, 2] {
        let activity = admin
            .get_activity(GetActivityRequest {
                id: "versioned".to_owned(),
                version,
            })
            .await?
            .into_inner();
        assert_eq!(activity.version, version);
    }
    Ok(())
}

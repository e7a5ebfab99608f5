//! Event triggers: fan-out, dedupe, malformed events, and the built-in task types.

use std::time::Duration;

use taskfactory_model::values::struct_to_json;
use taskfactory_proto::v1::{RunStatus, TaskStatus, TriggerSource};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::schedules::wait_for_triggers_drained;
use crate::support::{RecordingServer, create, finished_run, publish_event, runs, tasks};

const FAN_OUT: &str = r#"
name: order-lines
trigger:
  event:
    subject: "events.orders.*"
tasks:
  - name: line
    type: log
    forEach: event.lines
    when: "not item.cancelled"
    params:
      order: "{{ event.order_id }}"
      sku: "{{ item.sku }}"
      quantity: "{{ item.qty }}"
      label: "line {{ index }}: {{ item.sku }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_for_each_with_when_makes_twenty_tasks_with_rendered_params() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(&mut admin, FAN_OUT).await?;
    let lines: Vec<serde_json::Value> = (0..25)
        .map(|i| serde_json::json!({"sku": format!("sku-{i}"), "qty": i + 1, "cancelled": i % 5 == 4}))
        .collect();
    let body = serde_json::json!({"order_id": "o-17", "lines": lines});
    publish_event(
        &js,
        "events.orders.created",
        serde_json::to_vec(&body)?,
        None,
    )
    .await?;

    let run = wait_for("the run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "order-lines").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.source(), TriggerSource::Event);
    assert_eq!(run.subject, "events.orders.created");
    assert_eq!(run.tasks_spawned, 20);
    assert_eq!(run.evaluation[0].items, 25);
    assert_eq!(run.evaluation[0].tasks, 20);
    assert!(
        run.evaluation[0].notes[0].contains("5 of 25 items excluded"),
        "{:?}",
        run.evaluation[0].notes
    );

    let run_tasks = tasks(&mut admin, &run.id).await?;
    assert_eq!(run_tasks.len(), 20);
    let mut ids: Vec<&str> = run_tasks.iter().map(|t| t.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "task ids are unique");
    for task in &run_tasks {
        assert_eq!(task.status(), TaskStatus::Succeeded);
        let params = struct_to_json(task.params.as_ref().unwrap());
        let i = task.item_index as i64;
        assert_ne!(i % 5, 4, "cancelled lines make no task");
        assert_eq!(params["order"], "o-17");
        assert_eq!(params["sku"], format!("sku-{i}"));
        assert_eq!(
            params["quantity"],
            i + 1,
            "a single expression keeps its number type"
        );
        assert_eq!(params["label"], format!("line {i}: sku-{i}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_msg_id_gives_one_run_and_different_ids_give_two() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: dedupe\ntrigger: {event: {subject: events.pay.>}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    create(&mut admin, "name: keyed\ntrigger: {event: {subject: events.pay.>, dedupeKey: '{{ event.payment }}'}}\ntasks: [{name: t, type: log}]").await?;
    create(&mut admin, "name: p2-only\ntrigger: {event: {subject: events.pay.>, filter: 'event.payment == \"p2\"'}}\ntasks: [{name: t, type: log}]").await?;

    let first = publish_event(
        &js,
        "events.pay.done",
        br#"{"payment": "p1"}"#.to_vec(),
        Some("evt-1"),
    )
    .await?;
    let second = publish_event(
        &js,
        "events.pay.done",
        br#"{"payment": "p1"}"#.to_vec(),
        Some("evt-1"),
    )
    .await?;
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "JetStream drops the repeat inside the duplicate window"
    );
    publish_event(
        &js,
        "events.pay.done",
        br#"{"payment": "p2"}"#.to_vec(),
        Some("evt-2"),
    )
    .await?;
    // Without a header, every message is its own event; the keyed activity dedupes by payload.
    publish_event(
        &js,
        "events.pay.done",
        br#"{"payment": "p2"}"#.to_vec(),
        None,
    )
    .await?;

    wait_for("runs of both activities", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            let a = runs(&mut admin, "dedupe").await?.len();
            let b = runs(&mut admin, "keyed").await?.len();
            Ok((a >= 3 && b >= 2).then_some(()))
        }
    })
    .await?;
    wait_for_triggers_drained(&js).await?;
    let by_msg_id = runs(&mut admin, "dedupe").await?;
    let mut keys: Vec<String> = by_msg_id.iter().map(|r| r.dedupe_key.clone()).collect();
    keys.sort();
    assert_eq!(by_msg_id.len(), 3, "{keys:?}");
    assert_eq!(&keys[..2], ["evt-1", "evt-2"]);
    assert!(keys[2].starts_with("seq:"), "{keys:?}");
    let mut by_payload: Vec<String> = runs(&mut admin, "keyed")
        .await?
        .into_iter()
        .map(|r| r.dedupe_key)
        .collect();
    by_payload.sort();
    assert_eq!(by_payload, ["p1", "p2"]);
    // The filter let both p2 events through and held back the p1 one, and counted it.
    assert_eq!(runs(&mut admin, "p2-only").await?.len(), 2);
    let page = taskfactory_runtime::metrics::handle().render();
    assert!(
        page.contains("taskfactory_events_total{outcome=\"filtered\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("taskfactory_events_total{outcome=\"deduped\"} 1"),
        "the keyed activity's second p2: {page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_events_are_recorded_and_the_next_good_event_fires() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: robust\ntrigger: {event: {subject: events.in}}\ntasks: [{name: t, type: log}]",
    )
    .await?;

    publish_event(
        &js,
        "events.in",
        b"this is not json".to_vec(),
        Some("bad-1"),
    )
    .await?;
    let mut huge = br#"{"blob": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    huge.extend(br#""}"#);
    publish_event(&js, "events.in", huge, Some("bad-2")).await?;
    publish_event(
        &js,
        "events.in",
        br#"{"ok": true}"#.to_vec(),
        Some("good-1"),
    )
    .await?;

    let run = wait_for("the good event's run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            Ok(runs(&mut admin, "robust")
                .await?
                .into_iter()
                .find(|r| r.dedupe_key == "good-1"))
        }
    })
    .await?;
    assert_eq!(
        finished_run(&admin, &run.id, Duration::from_secs(20))
            .await?
            .status(),
        RunStatus::RunSucceeded
    );
    assert_eq!(runs(&mut admin, "robust").await?.len(), 1);

    // Both bad events are recorded with their error, and copied to the dead-letter stream.
    let pool = env.db.pool().await?;
    let rejected: Vec<(String, String, i32)> =
        wait_for("two rejected events", Duration::from_secs(10), || {
            let pool = pool.clone();
            async move {
                let rows: Vec<(String, String, i32)> = sqlx::query_as(
                    "SELECT msg_id, error, size_bytes FROM rejected_events ORDER BY msg_id",
                )
                .fetch_all(&pool)
                .await?;
                Ok((rows.len() == 2).then_some(rows))
            }
        })
        .await?;
    assert_eq!(rejected[0].0, "bad-1");
    assert!(
        rejected[0].1.contains("not valid JSON"),
        "{}",
        rejected[0].1
    );
    assert_eq!(rejected[1].0, "bad-2");
    assert!(
        rejected[1].1.contains("over the limit"),
        "{}",
        rejected[1].1
    );
    assert!(rejected[1].2 > 2 * 1024 * 1024);
    let dlq = js.get_stream("FACTORY_DLQ").await?;
    let message = dlq.get_last_raw_message_by_subject("dlq.events").await?;
    let headers = message.headers;
    assert!(headers.get("Taskfactory-Error").is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_tasks_send_the_task_id_and_publish_tasks_chain_activities() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    let url = server.url.clone();
    create(
        &mut admin,
        "name: first\ntrigger: {event: {subject: events.start}}\ntasks: [{name: next, type: publish, params: {subject: events.chained, payload: {value: '{{ event.value }}'}}}]",
    )
    .await?;
    create(
        &mut admin,
        &format!("name: second\ntrigger: {{event: {{subject: events.chained}}}}\ntasks: [{{name: call, type: http, params: {{url: '{url}', body: {{value: '{{{{ event.value }}}}'}}}}}}]"),
    )
    .await?;
    publish_event(&js, "events.start", br#"{"value": 7}"#.to_vec(), None).await?;

    let run = wait_for("the chained run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "second").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    let task = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!(task.status(), TaskStatus::Succeeded);
    assert_eq!(
        taskfactory_model::values::value_to_json(task.output.as_ref().unwrap()),
        serde_json::json!({"accepted": true})
    );
    let seen = server.calls();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, task.id, "the task id is the Idempotency-Key");
    assert_eq!(seen[0].1, serde_json::json!({"value": 7}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_tasks_to_private_addresses_are_refused_by_default() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        egress_allow: String::new(),
        ..Default::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    let url = server.url.clone();
    create(
        &mut admin,
        &format!("name: egress\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{url}'}}, retry: {{maxAttempts: 1}}}}]"),
    )
    .await?;
    let fired = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "egress".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let task = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!(task.status(), TaskStatus::Dead);
    assert!(task.last_error.contains("loopback"), "{}", task.last_error);
    assert!(server.calls().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_completions_chain_activities_but_never_their_own() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: job\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    create(
        &mut admin,
        "name: watch\ntrigger: {event: {subject: events.taskfactory.run.completed}}\ntasks: [{name: t, type: log, params: {saw: '{{ event.activityName }} {{ event.status }}'}}]",
    )
    .await?;
    let fired = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "job".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    finished_run(&admin, &fired.run_id, Duration::from_secs(20)).await?;
    let watch = wait_for("the watcher's run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "watch").await?.into_iter().next()) }
    })
    .await?;
    let watch = finished_run(&admin, &watch.id, Duration::from_secs(20)).await?;
    let task = tasks(&mut admin, &watch.id).await?.remove(0);
    assert_eq!(
        struct_to_json(task.params.as_ref().unwrap())["saw"],
        "job RUN_SUCCEEDED"
    );
    // The watcher's own completion is announced too, and must not fire it again.
    wait_for_triggers_drained(&js).await?;
    let events = js.get_stream("FACTORY_EVENTS").await?;
    wait_for(
        "both completions announced",
        Duration::from_secs(20),
        || {
            let events = events.clone();
            async move {
                let mut events = events;
                Ok((events.info().await?.state.messages >= 2).then_some(()))
            }
        },
    )
    .await?;
    wait_for_triggers_drained(&js).await?;
    assert_eq!(runs(&mut admin, "watch").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nul_characters_from_outside_are_stored_as_replacement_characters() -> anyhow::Result<()> {
    // Postgres stores no NUL (`\u0000`) in text or jsonb; events, payloads and sources may carry
    // them. Each path fires and finishes, with U+FFFD in their place.
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let app = axum::Router::new().route(
        "/nul",
        axum::routing::get(|| async {
            (
                [("content-type", "application/json")],
                r#"{"name": "nul\u0000source"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/nul", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    create(
        &mut admin,
        &format!(
            r#"
name: nul-event
trigger: {{event: {{subject: "events.nul.*"}}}}
context: [{{name: remote, http: {{url: "{url}"}}}}]
tasks:
  - {{name: t, type: log, params: {{text: "{{{{ event.text }}}}", remote: "{{{{ context.remote.name }}}}"}}}}
"#
        ),
    )
    .await?;
    create(
        &mut admin,
        "name: nul-manual\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, params: {text: '{{ event.text }}'}}]\n",
    )
    .await?;
    publish_event(
        &js,
        "events.nul.created",
        br#"{"text": "a\u0000b", "k\u0000ey": 1}"#.to_vec(),
        None,
    )
    .await?;
    let fired = admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: "nul-manual".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"text": "c\u{0}d"}),
            )),
            idempotency_key: "key\u{0}with a nul".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();

    // A forged trigger on `triggers.>` with NULs in its key, subject and payload, on the plain
    // path and on the overlap (admission) path: refused (it is no fire of the ledger), once,
    // with its reason, rather than failing on every redelivery; no run.
    let manual_id = admin
        .get_activity(taskfactory_proto::v1::GetActivityRequest {
            id: "nul-manual".to_owned(),
            version: 0,
        })
        .await?
        .into_inner()
        .id;
    let mut forged = Vec::new();
    for (key, overlap) in [
        (
            "forged\u{0}plain",
            taskfactory_proto::v1::OverlapPolicy::OverlapUnspecified,
        ),
        (
            "forged\u{0}admitted",
            taskfactory_proto::v1::OverlapPolicy::BufferAll,
        ),
    ] {
        let trigger = taskfactory_proto::v1::TriggerEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            activity_id: manual_id.clone(),
            activity_version: 1,
            source: taskfactory_proto::v1::TriggerSource::Manual as i32,
            dedupe_key: key.to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"text": "e\u{0}f"}),
            )),
            subject: "nul\u{0}subject".to_owned(),
            activity_name: "nul-manual".to_owned(),
            overlap: overlap as i32,
            ..Default::default()
        };
        let ack = js
            .publish(
                "triggers.nul-manual",
                prost::Message::encode_to_vec(&trigger).into(),
            )
            .await?
            .await?;
        let stored_key = key.replace('\0', "\u{fffd}");
        forged.push((
            ack.sequence,
            taskfactory_model::ids::RunId::derive(manual_id.parse()?, &stored_key).to_string(),
        ));
    }
    for (sequence, run_id) in &forged {
        let error = crate::support::dead_letter(
            &js,
            taskfactory_model::subjects::TRIGGERS_DLQ_SUBJECT,
            taskfactory_model::subjects::TRIGGERS_STREAM,
            *sequence,
        )
        .await?;
        assert!(error.contains("fire ledger"), "{error}");
        let missing = admin
            .get_run(taskfactory_proto::v1::GetRunRequest { id: run_id.clone() })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    }

    let event_run = wait_for("the event's run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "nul-event").await?.into_iter().next()) }
    })
    .await?;
    for (run_id, expected) in [
        (
            event_run.id.clone(),
            serde_json::json!({"text": "a\u{fffd}b", "remote": "nul\u{fffd}source"}),
        ),
        (
            fired.run_id.clone(),
            serde_json::json!({"text": "c\u{fffd}d"}),
        ),
    ] {
        let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
        assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
        let run_tasks = tasks(&mut admin, &run.id).await?;
        assert_eq!(
            struct_to_json(run_tasks[0].params.as_ref().unwrap()),
            expected
        );
    }
    // Admin calls with a NUL: a note is stored with U+FFFD, a name with one is simply not found.
    let paused = admin
        .pause_activity(taskfactory_proto::v1::PauseActivityRequest {
            id: "nul-manual".to_owned(),
            note: "maintenance\u{0}window".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(paused.pause_note, "maintenance\u{fffd}window");
    let missing = admin
        .get_activity(taskfactory_proto::v1::GetActivityRequest {
            id: "nul\u{0}manual".to_owned(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let event_run = finished_run(&admin, &event_run.id, Duration::from_secs(5)).await?;
    assert_eq!(
        event_run
            .payload
            .as_ref()
            .map(taskfactory_model::values::value_to_json),
        Some(serde_json::json!({"text": "a\u{fffd}b", "k\u{fffd}ey": 1}))
    );
    Ok(())
}

/// A filter comparing values of different types fails instead of passing (`"abc" > 100` was
/// true: Jinja orders strings after numbers), as does one reading a missing field; neither fires.
/// A filter whose comparisons cannot be checked is refused when the activity is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filter_comparing_different_types_fails_and_does_not_fire() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: big-orders\ntrigger: {event: {subject: events.orders.>, filter: 'event.amount > 100'}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    let mut nested = "event.amount".to_owned();
    for _ in 0..30 {
        nested = format!("0 < ({nested}) < 1");
    }
    let refused = create(
        &mut admin,
        &format!(
            "name: nested\ntrigger: {{event: {{subject: events.orders.>, filter: '{nested}'}}}}\ntasks: [{{name: t, type: log}}]"
        ),
    )
    .await
    .expect_err("refused");
    let refused = refused
        .downcast_ref::<tonic::Status>()
        .expect("a status")
        .clone();
    assert!(
        refused.message().contains("nest too deeply"),
        "{}",
        refused.message()
    );
    for (id, body) in [
        ("o-abc", r#"{"amount": "abc"}"#),
        ("o-150", r#"{"amount": 150}"#),
        ("o-50", r#"{"amount": 50}"#),
        ("o-none", r#"{"total": 1000}"#),
    ] {
        publish_event(
            &js,
            "events.orders.placed",
            body.as_bytes().to_vec(),
            Some(id),
        )
        .await?;
    }
    wait_for("the big order's run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok((!runs(&mut admin, "big-orders").await?.is_empty()).then_some(())) }
    })
    .await?;
    wait_for_triggers_drained(&js).await?;
    let keys: Vec<String> = runs(&mut admin, "big-orders")
        .await?
        .into_iter()
        .map(|run| run.dedupe_key)
        .collect();
    assert_eq!(keys, ["o-150"]);
    let page = taskfactory_runtime::metrics::handle().render();
    assert!(
        page.contains("taskfactory_events_total{outcome=\"filter_error\"} 2"),
        "the string and the missing amount: {page}"
    );
    assert!(
        page.contains("taskfactory_events_total{outcome=\"filtered\"} 1"),
        "{page}"
    );
    Ok(())
}

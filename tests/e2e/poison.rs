//! Poison messages: nothing is delivered forever. A message its handler refuses is dead-lettered
//! once; one its handler keeps failing on is dead-lettered after the delivery limit; and whatever
//! it belonged to ends in a state a user sees (a task `DEAD` with the reason, its run finished).

use std::time::Duration;

use async_nats::jetstream;
use prost::Message as _;
use serde_json::json;
use taskfactory_model::subjects;
use taskfactory_model::values::json_to_value;
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{
    ListEventDecisionsRequest, RunStatus, TaskInstance, TaskStatus, TriggerEvent, TriggerSource,
};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};

use crate::support::{
    RecordingServer, create, dead_letter, dead_letters, finished_run, fire, publish, publish_event,
    settled, tasks,
};

async fn run_count(env: &TestEnv) -> anyhow::Result<i64> {
    let pool = env.db.pool().await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trigger_naming_no_activity_or_an_unknown_one_is_dead_lettered_once() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let js = env.js().await?;
    let trigger = |activity_id: String, name: &str| TriggerEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        activity_id,
        activity_version: 1,
        source: TriggerSource::Manual as i32,
        dedupe_key: "k".to_owned(),
        payload: Some(json_to_value(&json!({}))),
        activity_name: name.to_owned(),
        ..Default::default()
    };
    let unknown = uuid::Uuid::new_v4().to_string();
    let cases = [
        // No activity at all: its results could go nowhere.
        (trigger(unknown.clone(), ""), "activity_name"),
        // A name that cannot be part of a subject.
        (
            trigger(unknown.clone(), "a..b"),
            "cannot be part of a result subject",
        ),
        // An activity nobody created.
        (trigger(unknown, "ghost"), "fire ledger"),
    ];
    let mut sequences = Vec::new();
    for (n, (trigger, _)) in cases.iter().enumerate() {
        sequences.push(
            publish(
                &js,
                "triggers.forged".to_owned(),
                &format!("forged-{n}"),
                trigger.encode_to_vec(),
            )
            .await?,
        );
    }
    for ((_, expected), sequence) in cases.iter().zip(&sequences) {
        let error = dead_letter(
            &js,
            subjects::TRIGGERS_DLQ_SUBJECT,
            subjects::TRIGGERS_STREAM,
            *sequence,
        )
        .await?;
        assert!(error.contains(expected), "{expected:?} in {error:?}");
    }
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
        3,
        "each dead-lettered once"
    );
    assert_eq!(run_count(&env).await?, 0, "no run was made");
    Ok(())
}

/// The message of the one task queued on `subject`.
async fn queued_task(js: &jetstream::Context, subject: &str) -> anyhow::Result<TaskInstance> {
    let stream = js.get_stream(subjects::TASKS_STREAM).await?;
    let message = wait_for("the queued task", Duration::from_secs(20), || async {
        Ok(stream.get_last_raw_message_by_subject(subject).await.ok())
    })
    .await?;
    Ok(TaskInstance::decode(message.payload.as_ref())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_result_could_go_nowhere_is_not_run_and_ends_dead() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    // Its task waits on `tasks.vision`, which no executor here serves.
    create(
        &mut admin,
        "name: seen\ntrigger: {manual: {}}\ntasks: [{name: look, type: vision}]\n",
    )
    .await?;
    let run_id = fire(&mut admin, "seen", "once").await?;
    let mut task = queued_task(&js, "tasks.vision").await?;
    // The same task, handed to the noop executor with no activity name: its result subject
    // would be `results..<run>`, which no stream stores.
    task.activity_name = String::new();
    let sequence = publish(
        &js,
        "tasks.noop".to_owned(),
        "nameless",
        task.encode_to_vec(),
    )
    .await?;

    let error = dead_letter(
        &js,
        &subjects::task_dlq_subject("noop"),
        subjects::TASKS_STREAM,
        sequence,
    )
    .await?;
    assert!(error.contains("could never be reported"), "{error}");
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status(), TaskStatus::Dead);
    assert!(
        listed[0].last_error.contains("could never be reported"),
        "the task says why: {}",
        listed[0].last_error
    );
    // Delivered once, never run: no attempt but the dead letter's.
    let (deliveries, _) = settled(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("noop"),
    )
    .await?;
    assert_eq!(deliveries, 1);
    let pool = env.db.pool().await?;
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM task_attempts WHERE task_id = $1::uuid ORDER BY recorded_at",
    )
    .bind(&listed[0].id)
    .fetch_all(&pool)
    .await?;
    assert_eq!(statuses, ["DEAD"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_result_cannot_be_stored_ends_dead_after_the_delivery_limit()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 3,
        // The stream tampered with below stays so for the test (else it is repaired at once).
        declare_every: Duration::from_secs(3600),
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    let server = RecordingServer::start(Duration::ZERO).await?;
    create(
        &mut admin,
        &format!(
            "name: unheard\ntrigger: {{manual: {{}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}'}}, retry: {{maxAttempts: 1}}}}]\n",
            server.url
        ),
    )
    .await?;
    // The results stream no longer takes this activity's results: every report fails.
    let mut config = js
        .get_stream(subjects::RESULTS_STREAM)
        .await?
        .info()
        .await?
        .config
        .clone();
    config.subjects = vec!["results.someone-else.>".to_owned()];
    js.update_stream(config).await?;

    let run_id = fire(&mut admin, "unheard", "once").await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed[0].status(), TaskStatus::Dead);
    assert!(
        listed[0].last_error.contains("gave up after 4 deliveries")
            && listed[0].last_error.contains("cannot report task"),
        "the task says why: {}",
        listed[0].last_error
    );
    // Its one attempt, then the limit's three more deliveries: bounded, and never again.
    let (deliveries, _) = settled(
        &js,
        subjects::TASKS_STREAM,
        &subjects::executor_consumer("http"),
    )
    .await?;
    assert_eq!(deliveries, 4);
    // Its start could not be recorded, so it never ran.
    assert_eq!(server.calls().len(), 0);
    let letters = dead_letters(&js, &subjects::task_dlq_subject("http")).await?;
    assert_eq!(letters.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_event_published_with_an_expected_stream_is_dead_lettered_once()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let js = env.js().await?;
    // A publisher that says which stream it expects (nats.py `stream=`, Go `ExpectStream`): the
    // dead letter must not carry that expectation to the DLQ stream, or it is refused forever.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "not-json");
    headers.insert("Nats-Expected-Stream", subjects::EVENTS_STREAM);
    let sequence = js
        .publish_with_headers("events.orders.bad", headers, "not json".into())
        .await?
        .await?
        .sequence;
    let error = dead_letter(
        &js,
        subjects::EVENTS_DLQ_SUBJECT,
        subjects::EVENTS_STREAM,
        sequence,
    )
    .await?;
    assert!(!error.is_empty());
    let (deliveries, messages) = settled(
        &js,
        subjects::EVENTS_STREAM,
        subjects::TRIGGER_EVENTS_CONSUMER,
    )
    .await?;
    assert_eq!(deliveries, messages, "delivered once");
    Ok(())
}

/// How many deliveries the durable consumer (whose filter takes the whole stream) made beyond
/// one per message it has delivered.
pub(crate) async fn redelivered(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> anyhow::Result<u64> {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer(durable)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {durable}: {e}"))?;
    let delivered = consumer.info().await?.delivered;
    Ok(delivered
        .consumer_sequence
        .saturating_sub(delivered.stream_sequence))
}

/// Dedupe keys come from outside (a `dedupeKey` template over the payload, a `Nats-Msg-Id`) and
/// are unique keys in Postgres, whose index rows hold about 2.7 KB: a key of a few KiB failed the
/// fire's insert on every delivery, and the events consumer (no delivery limit: it fails only on
/// the database) took it again for ever. A long key is stored as its digest: the event fires once,
/// and dedupes as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_whose_dedupe_key_is_too_long_to_index_fires_once_and_dedupes()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 2,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: keyed\ntrigger: {event: {subject: 'events.keyed.*', dedupeKey: '{{ event.id }}'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    create(
        &mut admin,
        "name: by-id\ntrigger: {event: {subject: 'events.by-id.*'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let long = |tail: &str| format!("{}{tail}", "0123456789abcdef".repeat(1024));
    // The same 16 KiB key twice (under two message ids), then another.
    for (msg_id, id) in [("a", long("x")), ("b", long("x")), ("c", long("y"))] {
        publish_event(
            &js,
            "events.keyed.x",
            serde_json::to_vec(&json!({ "id": id }))?,
            Some(msg_id),
        )
        .await?;
    }
    // A 16 KiB Nats-Msg-Id, the default dedupe key.
    publish_event(&js, "events.by-id.x", b"{}".to_vec(), Some(&long("z"))).await?;
    settled(
        &js,
        subjects::EVENTS_STREAM,
        subjects::TRIGGER_EVENTS_CONSUMER,
    )
    .await?;
    // (Counted as redeliveries: the runs' completion events land in the same stream meanwhile.)
    assert_eq!(
        redelivered(
            &js,
            subjects::EVENTS_STREAM,
            subjects::TRIGGER_EVENTS_CONSUMER
        )
        .await?,
        0,
        "an event was delivered again"
    );
    assert!(
        dead_letters(&js, subjects::EVENTS_DLQ_SUBJECT)
            .await?
            .is_empty()
    );
    let pool = env.db.pool().await?;
    let keys: Vec<(String, String)> = wait_for("the runs", Duration::from_secs(30), || async {
        let keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.name, r.dedupe_key FROM runs r JOIN activities a ON a.id = r.activity_id \
             ORDER BY a.name, r.dedupe_key",
        )
        .fetch_all(&pool)
        .await?;
        Ok((keys.len() >= 3).then_some(keys))
    })
    .await?;
    assert_eq!(keys.len(), 3, "{keys:?}");
    for (activity, key) in &keys {
        assert!(
            key.starts_with("sha256:") && key.len() == 71,
            "{activity}: {key}"
        );
    }
    assert_ne!(keys[1].1, keys[2].1, "two keys, two digests");
    Ok(())
}

/// A start report's execution id is part of the attempt history's key: one of a few KiB failed the
/// insert on every delivery, and the results consumer (no delivery limit) took it again for ever.
/// It is refused and dead-lettered once, naming why; the task goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_report_with_an_execution_id_too_long_to_store_is_dead_lettered_once()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 2,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let key = crate::support::result_key(&env).await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    // `external`: nobody serves it, so the task waits for the reports played below.
    create(
        &mut admin,
        "name: ext\ntrigger: {manual: {}}\ntasks: [{name: t, type: external}]\n",
    )
    .await?;
    let run_id = fire(&mut admin, "ext", "once").await?;
    let task = wait_for("the task", Duration::from_secs(30), || {
        let (mut admin, run_id) = (admin.clone(), run_id.clone());
        async move { Ok(tasks(&mut admin, &run_id).await?.into_iter().next()) }
    })
    .await?;
    let mut running = crate::support::played_result(&key, &task, 1, TaskStatus::Running);
    running.execution = "e".repeat(8192);
    publish(
        &js,
        subjects::result_subject("ext", &run_id),
        "long-execution",
        running.encode_to_vec(),
    )
    .await?;
    settled(
        &js,
        subjects::RESULTS_STREAM,
        subjects::ORCHESTRATOR_RESULTS_CONSUMER,
    )
    .await?;
    assert_eq!(
        redelivered(
            &js,
            subjects::RESULTS_STREAM,
            subjects::ORCHESTRATOR_RESULTS_CONSUMER
        )
        .await?,
        0,
        "the report was delivered again"
    );
    let letters = dead_letters(&js, subjects::RESULTS_DLQ_SUBJECT).await?;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].error.contains("execution id is 8192 bytes"),
        "{}",
        letters[0].error
    );
    // The task goes on: a start with a proper id is recorded.
    let mut proper = crate::support::played_result(&key, &task, 1, TaskStatus::Running);
    proper.execution = uuid::Uuid::new_v4().to_string();
    publish(
        &js,
        subjects::result_subject("ext", &run_id),
        "proper-execution",
        proper.encode_to_vec(),
    )
    .await?;
    wait_for(
        "the task to show its start",
        Duration::from_secs(20),
        || {
            let (mut admin, run_id) = (admin.clone(), run_id.clone());
            async move {
                let task = tasks(&mut admin, &run_id).await?.remove(0);
                Ok((task.status() == TaskStatus::Running).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// Deliveries with the same dedupe key recorded at the same moment (event messages whose
/// `dedupeKey` renders the same, or two trigger replicas): the fire's id is derived from the key,
/// so when two inserts passed the conflict check together, the second met the first on the
/// primary key, which the insert's conflict clause did not name, and failed with a unique
/// violation; the event was taken again (a CI run saw it). Now it is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fire_recorded_twice_at_once_is_a_duplicate_not_an_error() -> anyhow::Result<()> {
    use taskfactory_model::ids::{ActivityId, FireId};
    use taskfactory_trigger::store::{NewFire, record_fire};

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(taskfactory_tests::Service::Trigger);
    env.wait_ready(&[taskfactory_tests::Service::Trigger])
        .await?;
    let mut admin = env.admin().await?;
    let activity = create(
        &mut admin,
        "name: twice\ntrigger: {event: {subject: 'events.twice.*'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let activity_id = ActivityId(activity.id.parse()?);
    let fire = |key: &str| NewFire {
        id: FireId::derive(activity_id, key),
        activity_id,
        activity_name: "twice".to_owned(),
        activity_version: 1,
        source: "event",
        dedupe_key: key.to_owned(),
        scheduled_for: None,
        fired_at: chrono::Utc::now(),
        subject: "events.twice.x".to_owned(),
        payload: None,
        event: Vec::new(),
        dst_note: None,
        traceparent: String::new(),
        origin: None,
        rate_limit: None,
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .connect(&env.db.url())
        .await?;
    // Many recordings of each key at once: some pass the conflict check together.
    let mut recordings = tokio::task::JoinSet::new();
    for key in 0..400 {
        for _ in 0..8 {
            let pool = pool.clone();
            let again = fire(&format!("k{key}"));
            recordings.spawn(async move { record_fire(&pool, &again, None).await });
        }
    }
    let mut recorded = 0;
    while let Some(outcome) = recordings.join_next().await {
        match outcome? {
            Ok(true) => recorded += 1,
            Ok(false) => {}
            Err(error) => anyhow::bail!("a recording failed: {error}"),
        }
    }
    assert_eq!(recorded, 400, "each key recorded once");
    Ok(())
}

/// Makes the test's database refuse what it would otherwise store: a CHECK constraint on
/// `table` (real Postgres refusing real data, SQLSTATE 23514). Every value from outside is made
/// storable before it is written (NUL characters replaced, long keys digested), so no input
/// known today makes Postgres refuse a result or a fire; this stands in for the next one (a
/// limit, a new column) and proves what happens then.
pub(crate) async fn refuse(env: &TestEnv, table: &str, check: &str) -> anyhow::Result<()> {
    let pool = env.db.pool().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {table} ADD CONSTRAINT refused_by_the_test CHECK ({check})"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

/// The one task of `run_id`, once it is there.
async fn the_task(
    admin: &crate::support::Admin,
    run_id: &str,
) -> anyhow::Result<taskfactory_proto::v1::Task> {
    wait_for("the task", Duration::from_secs(30), || {
        let (mut admin, run_id) = (admin.clone(), run_id.to_owned());
        async move { Ok(tasks(&mut admin, &run_id).await?.into_iter().next()) }
    })
    .await
}

/// A result the database refuses for its data was dead-lettered once, but its task stayed as it
/// was: its executor had marked it finished (so it never ran again) and its run never ended. The
/// task now takes the attempt with an error naming the refusal: a failed attempt shows `FAILED`
/// (its executor retries), a final one ends the task `DEAD` and the run with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_the_database_refuses_still_moves_its_task_and_a_final_one_ends_the_run()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 2,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let key = crate::support::result_key(&env).await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    // `external`: nobody serves it, so the task waits for the results played below.
    create(
        &mut admin,
        "name: ext\ntrigger: {manual: {}}\ntasks: [{name: t, type: external, retry: {maxAttempts: 2}}]\n",
    )
    .await?;
    refuse(
        &env,
        "task_attempts",
        "octet_length(error) <= 4096 AND octet_length(coalesce(output::text, '')) <= 4096",
    )
    .await?;
    let run_id = fire(&mut admin, "ext", "once").await?;
    let task = the_task(&admin, &run_id).await?;

    // Attempt 1 fails with an error too long to store: the task shows the attempt failed.
    let mut failed = crate::support::played_result(&key, &task, 1, TaskStatus::Failed);
    failed.error = "e".repeat(8192);
    publish(
        &js,
        subjects::result_subject("ext", &run_id),
        "failed-1",
        failed.encode_to_vec(),
    )
    .await?;
    let shown = wait_for("the failed attempt", Duration::from_secs(20), || {
        let (mut admin, run_id) = (admin.clone(), run_id.clone());
        async move {
            let task = tasks(&mut admin, &run_id).await?.remove(0);
            Ok((task.status() == TaskStatus::Failed).then_some(task))
        }
    })
    .await?;
    assert!(
        shown
            .last_error
            .contains("the FAILED result of attempt 1 could not be stored")
            && shown.last_error.contains("23514"),
        "the task says why: {}",
        shown.last_error
    );

    // Attempt 2 succeeds with an output too long to store: the task ends DEAD, its run FAILED.
    let mut succeeded = crate::support::played_result(&key, &task, 2, TaskStatus::Succeeded);
    succeeded.output = Some(json_to_value(&json!({ "report": "o".repeat(8192) })));
    publish(
        &js,
        subjects::result_subject("ext", &run_id),
        "succeeded-2",
        succeeded.encode_to_vec(),
    )
    .await?;
    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed[0].status(), TaskStatus::Dead);
    assert!(
        listed[0]
            .last_error
            .contains("the SUCCEEDED result of attempt 2 could not be stored")
            && listed[0].last_error.contains("refused_by_the_test")
            && listed[0].last_error.len() <= 1024,
        "the task says why: {}",
        listed[0].last_error
    );

    // Each result dead-lettered once, as it was sent; none delivered again.
    settled(
        &js,
        subjects::RESULTS_STREAM,
        subjects::ORCHESTRATOR_RESULTS_CONSUMER,
    )
    .await?;
    assert_eq!(
        redelivered(
            &js,
            subjects::RESULTS_STREAM,
            subjects::ORCHESTRATOR_RESULTS_CONSUMER
        )
        .await?,
        0,
        "a result was delivered again"
    );
    let letters = dead_letters(&js, subjects::RESULTS_DLQ_SUBJECT).await?;
    assert_eq!(letters.len(), 2);
    for letter in &letters {
        assert!(letter.error.contains("SQLSTATE 23514"), "{}", letter.error);
    }
    let pool = env.db.pool().await?;
    let history: Vec<(i32, String)> = sqlx::query_as(
        "SELECT attempt, status FROM task_attempts WHERE task_id = $1::uuid ORDER BY attempt",
    )
    .bind(&task.id)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        history,
        [(1, "FAILED".to_owned()), (2, "DEAD".to_owned())],
        "each attempt in the history, as recorded"
    );
    Ok(())
}

/// A task an executor dead-lettered, whose `DEAD` the database refuses (here: the letter's
/// error too long), was only logged: the task and its run waited for ever. It ends `DEAD` with
/// an error naming the refusal, and its run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_the_database_refuses_still_ends_its_task_and_run() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: lettered\ntrigger: {manual: {}}\ntasks: [{name: t, type: external}]\n",
    )
    .await?;
    refuse(&env, "task_attempts", "octet_length(error) <= 4096").await?;
    let run_id = fire(&mut admin, "lettered", "once").await?;
    let task = queued_task(&js, "tasks.external").await?;
    // As an executor dead-letters a task it cannot run (no attempt count: no result before it).
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::HEADER_ERROR, "x".repeat(8192).as_str());
    js.publish_with_headers(
        subjects::task_dlq_subject("external"),
        headers,
        task.encode_to_vec().into(),
    )
    .await?
    .await?;

    let run = finished_run(&admin, &run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    let listed = tasks(&mut admin, &run_id).await?;
    assert_eq!(listed[0].status(), TaskStatus::Dead);
    assert!(
        listed[0]
            .last_error
            .contains("the DEAD result of attempt 1 could not be stored")
            && listed[0].last_error.contains("23514"),
        "the task says why: {}",
        listed[0].last_error
    );
    Ok(())
}

/// One event, several activities: a fire the database refused for one activity rejected the
/// whole event, and the activities after it in the loop never fired. The refusal is that
/// activity's: recorded once (a rejected event and a dead letter naming it), and every other
/// activity fires, once. Two events, each refused for another of two activities, so whichever
/// order the activities are tried in, one event has its refused activity first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fire_the_database_refuses_for_one_activity_does_not_stop_the_others()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        max_deliveries: 2,
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    for name in ["first", "second"] {
        create(
            &mut admin,
            &format!(
                "name: {name}\ntrigger: {{event: {{subject: 'events.both.*', dedupeKey: '{{{{ event.{name} }}}}'}}}}\ntasks: [{{name: t, type: noop}}]\n"
            ),
        )
        .await?;
    }
    refuse(&env, "fires", "dedupe_key NOT LIKE 'refused-%'").await?;
    let mut sequences = Vec::new();
    for (msg_id, body) in [
        ("one", json!({"first": "refused-1", "second": "fires-1"})),
        ("two", json!({"first": "fires-2", "second": "refused-2"})),
    ] {
        let ack = publish_event(
            &js,
            "events.both.x",
            serde_json::to_vec(&body)?,
            Some(msg_id),
        )
        .await?;
        sequences.push(ack.sequence);
    }
    for (sequence, refused) in sequences.iter().zip(["first", "second"]) {
        let error = dead_letter(
            &js,
            subjects::EVENTS_DLQ_SUBJECT,
            subjects::EVENTS_STREAM,
            *sequence,
        )
        .await?;
        assert!(
            error.contains(&format!("activity {refused}")) && error.contains("SQLSTATE 23514"),
            "{error}"
        );
    }
    let pool = env.db.pool().await?;
    let fired: Vec<(String, String)> = wait_for("the runs", Duration::from_secs(30), || async {
        let fired: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.name, r.dedupe_key FROM runs r JOIN activities a ON a.id = r.activity_id \
             ORDER BY a.name",
        )
        .fetch_all(&pool)
        .await?;
        Ok((fired.len() >= 2).then_some(fired))
    })
    .await?;
    settled(
        &js,
        subjects::EVENTS_STREAM,
        subjects::TRIGGER_EVENTS_CONSUMER,
    )
    .await?;
    // (Counted as redeliveries: the runs' completion events land in the same stream meanwhile.)
    assert_eq!(
        redelivered(
            &js,
            subjects::EVENTS_STREAM,
            subjects::TRIGGER_EVENTS_CONSUMER
        )
        .await?,
        0,
        "an event was delivered again"
    );
    assert_eq!(
        fired,
        [
            ("first".to_owned(), "fires-2".to_owned()),
            ("second".to_owned(), "fires-1".to_owned())
        ],
        "each other activity fired once"
    );
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
        .fetch_one(&pool)
        .await?;
    assert_eq!(fires, 2);
    let rejected: Vec<(i64, String)> = sqlx::query_as(
        "SELECT stream_sequence, error FROM rejected_events ORDER BY stream_sequence",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rejected.len(),
        2,
        "each refusal recorded once: {rejected:?}"
    );
    for ((sequence, error), (expected, refused)) in rejected
        .iter()
        .zip(sequences.iter().zip(["first", "second"]))
    {
        assert_eq!(u64::try_from(*sequence)?, *expected);
        assert!(error.contains(&format!("activity {refused}")), "{error}");
    }
    assert_eq!(
        dead_letters(&js, subjects::EVENTS_DLQ_SUBJECT).await?.len(),
        2,
        "each event dead-lettered once"
    );
    // Each event's decision at each activity: the refusal at the one, the fire at the other.
    let mut decided: Vec<(String, String, Decision, String)> = crate::event_decisions::decisions(
        &mut admin,
        ListEventDecisionsRequest {
            page_size: 100,
            ..Default::default()
        },
    )
    .await?
    .into_iter()
    .map(|d| {
        (
            d.event_id.clone(),
            d.activity_name.clone(),
            d.decision(),
            d.reason,
        )
    })
    .collect();
    decided.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let outcome: Vec<(&str, &str, Decision)> = decided
        .iter()
        .map(|(event, activity, decision, _)| (event.as_str(), activity.as_str(), *decision))
        .collect();
    assert_eq!(
        outcome,
        [
            ("one", "first", Decision::Rejected),
            ("one", "second", Decision::Fired),
            ("two", "first", Decision::Fired),
            ("two", "second", Decision::Rejected),
        ]
    );
    assert!(decided[0].3.contains("SQLSTATE 23514"), "{:?}", decided[0]);
    Ok(())
}

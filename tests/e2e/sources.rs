//! Context sources cannot reach the control plane: `request` and `kv` sources never touch
//! JetStream's API, our KV buckets, system or inbox subjects, or our own streams' subjects —
//! through a preview or a real run, literally or through a template — and use only what the
//! operator allow-listed.


use taskfactory_model::spec::spec_from_yaml;
use taskfactory_model::values::{json_to_value, struct_to_json};
use taskfactory_proto::v1::{PreviewRunRequest, PreviewRunResponse, RunStatus};
use taskfactory_tests::{EnvOptions, TestEnv};

use crate::context::fire;
use crate::support::{Admin, create};

/// A manual activity with one source (given as YAML flow) and a log task.
fn with_source(name: &str, source: &str) -> String {
    format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ncontext: [{source}]\ntasks: [{{name: t, type: log}}]\n"
    )
}

/// Previews an unsaved spec with `payload`; the answer, or the gRPC error.
async fn preview(
    admin: &mut Admin,
    yaml: &str,
    payload: serde_json::Value,
) -> Result<PreviewRunResponse, tonic::Status> {
    let spec = spec_from_yaml(yaml).expect("the test's YAML parses");
    admin
        .preview_run(PreviewRunRequest {
            spec: Some(spec),
            payload: Some(json_to_value(&payload)),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The error the preview reports for source `name` (empty when it resolved).
fn source_error(preview: &PreviewRunResponse, name: &str) -> String {
    preview
        .evaluation
        .iter()
        .find(|e| e.template == format!("context.{name}"))
        .map(|e| e.error.clone())
        .unwrap_or_default()
}

/// What must still be there after every attack: the streams, the DLQ's message, the executor's
/// consumer, the lease bucket.
async fn assert_control_plane_intact(env: &TestEnv) -> anyhow::Result<()> {
    let js = env.js().await?;
    for stream in [
        "FACTORY_EVENTS",
        "FACTORY_TRIGGERS",
        "FACTORY_TASKS",
        "FACTORY_RESULTS",
        "FACTORY_DLQ",
    ] {
        js.get_stream(stream)
            .await
            .map_err(|e| anyhow::anyhow!("stream {stream} is gone: {e}"))?;
    }
    let mut dlq = js.get_stream("FACTORY_DLQ").await?;
    assert_eq!(dlq.info().await?.state.messages, 1, "FACTORY_DLQ was purged");
    js.get_stream("FACTORY_TASKS")
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("taskfactory-executor-log")
        .await
        .map_err(|e| anyhow::anyhow!("the executor's consumer is gone: {e}"))?;
    js.get_key_value("taskfactory_leases")
        .await
        .map_err(|e| anyhow::anyhow!("the lease bucket is gone: {e}"))?;
    Ok(())
}

/// Subjects an attacker aims a `request` source at, and what the refusal must say.
const ATTACKS: &[(&str, &str)] = &[
    ("$JS.API.STREAM.DELETE.FACTORY_EVENTS", "$"),
    ("$JS.API.STREAM.PURGE.FACTORY_DLQ", "$"),
    ("$JS.API.STREAM.INFO.FACTORY_TASKS", "$"),
    (
        "$JS.API.CONSUMER.DELETE.FACTORY_TASKS.taskfactory-executor-log",
        "$",
    ),
    ("$JS.API.STREAM.MSG.GET.KV_taskfactory_leases", "$"),
    ("$KV.taskfactory_leases.scheduler", "$"),
    ("$js.api.stream.info.FACTORY_TASKS", "$"),
    ("$SYS.REQ.SERVER.PING", "$"),
    ("_INBOX.stolen", "_INBOX"),
    ("_inbox.stolen", "_INBOX"),
    ("taskfactory.internal.commands", "taskfactory"),
    ("taskfactory.internal.preview", "taskfactory"),
    ("triggers.some-activity", "triggers"),
    ("tasks.http", "tasks"),
    ("results.some-activity.run", "results"),
    ("dlq.events", "dlq"),
    ("TASKS.http", "tasks"),
    ("$JS.API.>", "wildcard"),
    ("$JS.API.STREAM.INFO.*", "wildcard"),
    (".$JS.API.STREAM.LIST", "empty token"),
    ("inventory.query.", "empty token"),
    ("inventory query", "whitespace"),
    ("inventory.\u{0}query", "character"),
    ("inventory.\u{1}query", "control"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_and_kv_sources_cannot_reach_the_control_plane() -> anyhow::Result<()> {
    // An operator who allows everything still allows none of the control plane.
    let env = TestEnv::new(EnvOptions {
        sources_allow_subjects: ">".to_owned(),
        sources_allow_buckets: "*".to_owned(),
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    js.publish("dlq.events", "a dead letter an operator still needs".into())
        .await?
        .await?;
    // The trigger made its lease bucket; an attacker reads it through a `kv` source.
    crate::support::wait_bucket(&js, "taskfactory_leases").await?;

    // Through a template (so validation cannot see it): refused when the source resolves.
    let templated = with_source(
        "evil",
        "{name: evil, request: {subject: '{{ event.subject }}', payload: {}}}",
    );
    for (subject, reason) in ATTACKS {
        let answer = preview(&mut admin, &templated, serde_json::json!({"subject": subject}))
            .await
            .map_err(|status| anyhow::anyhow!("{subject}: {status}"))?;
        let error = source_error(&answer, "evil");
        assert!(
            error.contains("refused") && error.contains(reason),
            "{subject}: the source must be refused naming {reason:?}; got {error:?}"
        );
        assert!(
            struct_to_json(answer.context.as_ref().unwrap())
                .get("evil")
                .is_none(),
            "{subject}: no answer reached the context"
        );
    }
    assert_control_plane_intact(&env).await?;

    // Literally in the spec: validation refuses it, naming the field.
    for (subject, _) in &ATTACKS[..6] {
        let literal = with_source(
            "evil-literal",
            &format!("{{name: evil, request: {{subject: '{subject}'}}}}"),
        );
        let status = preview(&mut admin, &literal, serde_json::json!({}))
            .await
            .expect_err(subject);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{subject}");
        assert!(
            status.message().contains("context[0].request.subject"),
            "{subject}: {}",
            status.message()
        );
    }
    assert_control_plane_intact(&env).await?;

    // Our KV buckets, by template and literally.
    let kv = with_source(
        "evil-kv",
        "{name: lease, kv: {bucket: '{{ event.bucket }}', key: '{{ event.key }}'}}",
    );
    for (bucket, key) in [
        ("taskfactory_leases", "scheduler"),
        ("taskfactory_cancelled_runs", "x"),
        ("TASKFACTORY_LEASES", "scheduler"),
        ("config", "a.*"),
        ("config", "a..b"),
        ("config", ">"),
        ("con.fig", "a"),
        ("config", ".a"),
    ] {
        let answer = preview(
            &mut admin,
            &kv,
            serde_json::json!({"bucket": bucket, "key": key}),
        )
        .await?;
        let error = source_error(&answer, "lease");
        assert!(
            error.contains("refused"),
            "{bucket}/{key}: the source must be refused; got {error:?}"
        );
    }
    let status = preview(
        &mut admin,
        &with_source(
            "evil-kv-literal",
            "{name: lease, kv: {bucket: taskfactory_leases, key: scheduler}}",
        ),
        serde_json::json!({}),
    )
    .await
    .expect_err("a literal taskfactory bucket is refused");
    assert!(
        status.message().contains("context[0].kv.bucket"),
        "{}",
        status.message()
    );

    // A real run: fails, naming the source and why; nothing was touched.
    create(
        &mut admin,
        &with_source(
            "evil-run",
            "{name: evil, request: {subject: '{{ event.subject }}'}}",
        ),
    )
    .await?;
    let run = fire(
        &mut admin,
        "evil-run",
        serde_json::json!({"subject": "$JS.API.STREAM.DELETE.FACTORY_EVENTS"}),
    )
    .await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    assert!(
        run.error.starts_with("context source \"evil\"") && run.error.contains("refused"),
        "{}",
        run.error
    );
    assert_control_plane_intact(&env).await?;
    Ok(())
}

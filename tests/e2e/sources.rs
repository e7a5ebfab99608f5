//! Context sources cannot reach the control plane: `request` and `kv` sources never touch
//! JetStream's API, our KV buckets, system or inbox subjects, or our own streams' subjects —
//! through a preview or a real run, literally or through a template — and use only what the
//! operator allow-listed.

use std::time::Duration;

use taskfactory_model::values::struct_to_json;
use taskfactory_proto::v1::RunStatus;
use taskfactory_tests::{EnvOptions, TestEnv};

use crate::context::fire;
use crate::support::{create, preview, source_error, with_source};

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
    assert_eq!(
        dlq.info().await?.state.messages,
        1,
        "FACTORY_DLQ was purged"
    );
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
        let answer = preview(
            &mut admin,
            &templated,
            serde_json::json!({"subject": subject}),
        )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_install_refuses_request_and_kv_sources_naming_the_flag() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let answer = preview(
        &mut admin,
        &with_source(
            "stock",
            "{name: stock, request: {subject: inventory.query}}",
        ),
        serde_json::json!({}),
    )
    .await?;
    let error = source_error(&answer, "stock");
    assert!(
        error.contains("not on the operator's allow-list")
            && error.contains("--sources-allow-subjects")
            && error.contains("TASKFACTORY_SOURCES_ALLOW_SUBJECTS"),
        "{error}"
    );
    let answer = preview(
        &mut admin,
        &with_source("flags", "{name: flags, kv: {bucket: config, key: flags}}"),
        serde_json::json!({}),
    )
    .await?;
    let error = source_error(&answer, "flags");
    assert!(error.contains("--sources-allow-buckets"), "{error}");
    Ok(())
}

/// Users of a server where only `sources` may publish on `inventory.query`.
const TWO_IDENTITIES: &str = r#"
authorization {
  users = [
    {user: service, password: service-pw, permissions: {publish: {deny: ["inventory.>"]}}},
    {user: sources, password: sources-pw, permissions: {
      publish: {allow: ["inventory.query"]},
      subscribe: {allow: ["_INBOX_sources.>"]}
    }},
    {user: responder, password: responder-pw}
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_sources_use_their_own_nats_identity_when_given() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    taskfactory_tests::init_logs();
    let nats = taskfactory_tests::NatsServer::start_with_config(TWO_IDENTITIES)?;
    let db = taskfactory_tests::TestDb::create().await?;
    let grpc: std::net::SocketAddr =
        format!("127.0.0.1:{}", taskfactory_tests::free_port()).parse()?;
    let as_service = |args: &mut taskfactory_runtime::config::NatsArgs| {
        args.user = Some("service".to_owned());
        args.password = Some("service-pw".to_owned());
    };
    let mut trigger = taskfactory_trigger::Config::local(&nats.url(), &db.url(), grpc);
    as_service(&mut trigger.nats);
    let mut orchestrator = taskfactory_orchestrator::Config::local(&nats.url(), &db.url());
    as_service(&mut orchestrator.nats);
    orchestrator.sources_allow_subjects = "inventory.>".to_owned();
    orchestrator.sources_nats.user = Some("sources".to_owned());
    orchestrator.sources_nats.password = Some("sources-pw".to_owned());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _trigger = tokio::spawn(taskfactory_trigger::run(trigger, shutdown.child_token()));
    let _orchestrator = tokio::spawn(taskfactory_orchestrator::run(
        orchestrator,
        shutdown.child_token(),
    ));
    let _stop = shutdown.drop_guard();

    let responder = async_nats::ConnectOptions::with_user_and_password(
        "responder".to_owned(),
        "responder-pw".to_owned(),
    )
    .connect(nats.url())
    .await?;
    let mut asked = responder.subscribe("inventory.query").await?;
    let replies = responder.clone();
    tokio::spawn(async move {
        while let Some(message) = asked.next().await {
            if let Some(reply) = message.reply {
                let _ = replies.publish(reply, r#"{"stock": 7}"#.into()).await;
            }
        }
    });
    responder.flush().await?;

    let admin =
        taskfactory_tests::wait_for("the admin API", Duration::from_secs(30), || async move {
            // This trigger has no auth file: on loopback every caller is admin.
            let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{grpc}"))?
                .connect()
                .await
            else {
                return Ok(None);
            };
            Ok(Some(
                taskfactory_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
                    channel,
                    taskfactory_trigger::auth::client::Credentials::none(),
                ),
            ))
        })
        .await?;
    // The orchestrator's own user may not publish there: only the sources' connection can.
    let spec = with_source(
        "stock",
        "{name: stock, request: {subject: inventory.query}, timeout: 3s}",
    );
    let answer = taskfactory_tests::wait_for(
        "an orchestrator to answer the preview",
        Duration::from_secs(30),
        || {
            let (mut admin, spec) = (admin.clone(), spec.clone());
            async move { Ok(preview(&mut admin, &spec, serde_json::json!({})).await.ok()) }
        },
    )
    .await?;
    assert_eq!(source_error(&answer, "stock"), "");
    assert_eq!(
        struct_to_json(answer.context.as_ref().unwrap())["stock"],
        serde_json::json!({"stock": 7})
    );
    Ok(())
}

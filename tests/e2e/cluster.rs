//! The production topology: a 3-node NATS cluster, streams and KV buckets replicated three times,
//! services given every server in `NATS_URL`. A server dies mid-burst: nothing is lost, nothing
//! runs twice.

use std::collections::HashSet;
use std::time::Duration;

use taskfactory_model::subjects;
use taskfactory_proto::v1::RunStatus;
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{create, runs};

/// Publishes an event, retrying the same `Nats-Msg-Id` until the cluster acknowledges it (a
/// publish in flight when a server dies may time out; its retry is deduplicated).
async fn publish_until_acked(
    js: &async_nats::jetstream::Context,
    subject: &str,
    id: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    wait_for(
        &format!("the ack of event {id}"),
        Duration::from_secs(30),
        || async {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            let published = js
                .publish_with_headers(
                    subject.to_owned(),
                    headers,
                    serde_json::to_vec(body)?.into(),
                )
                .await;
            let acked = match published {
                Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            Ok(acked.map(|_| ()))
        },
    )
    .await
}

async fn replicas(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<usize> {
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.config.num_replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_complete_exactly_once_while_a_nats_server_of_three_dies() -> anyhow::Result<()> {
    let mut env = TestEnv::new(EnvOptions {
        nats_servers: 3,
        stream_replicas: 3,
        ..EnvOptions::default()
    })
    .await?;
    assert_eq!(env.nats_urls().split(',').count(), 3);
    let js = env.js().await?;
    // A bucket made before the deployment was replicated: the services bring it to three.
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: subjects::CANCELLED_RUNS_BUCKET.to_owned(),
        history: 1,
        max_age: Duration::from_secs(14 * 24 * 3600),
        num_replicas: 1,
        ..Default::default()
    })
    .await?;
    let _services = [
        env.spawn_process(Service::Trigger, &[])?,
        env.spawn_process(Service::Orchestrator, &[])?,
        env.spawn_process(Service::Executor, &[])?,
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    for stream in [
        subjects::EVENTS_STREAM,
        subjects::TRIGGERS_STREAM,
        subjects::TASKS_STREAM,
        subjects::RESULTS_STREAM,
        subjects::DLQ_STREAM,
    ] {
        assert_eq!(replicas(&js, stream).await?, 3, "{stream}");
    }
    let bucket = format!("KV_{}", subjects::CANCELLED_RUNS_BUCKET);
    assert_eq!(replicas(&js, &bucket).await?, 3, "raised from 1");
    wait_for("the lease bucket", Duration::from_secs(30), || async {
        Ok(replicas(&js, "KV_taskfactory_leases")
            .await
            .ok()
            .filter(|r| *r == 3))
    })
    .await?;

    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: replicated\ntrigger: {event: {subject: \"events.replicated.*\"}}\n\
         tasks: [{name: part, type: noop, forEach: event.parts}]\n",
    )
    .await?;
    let body = serde_json::json!({"parts": (0..10).collect::<Vec<_>>()});
    for i in 0..20 {
        publish_until_acked(&js, "events.replicated.made", &format!("e-{i}"), &body).await?;
    }
    // One server dies with work in flight; the rest keep quorum.
    env.nats_peers[0].kill();
    for i in 20..40 {
        publish_until_acked(&js, "events.replicated.made", &format!("e-{i}"), &body).await?;
    }

    let finished = wait_for("all 40 runs to finish", Duration::from_secs(90), || {
        let mut admin = admin.clone();
        async move {
            let all = runs(&mut admin, "replicated").await?;
            let done = all.len() >= 40
                && all.iter().all(|run| {
                    matches!(run.status(), RunStatus::RunSucceeded | RunStatus::RunFailed)
                });
            Ok(done.then_some(all))
        }
    })
    .await?;
    assert_eq!(finished.len(), 40, "one run per event, none twice");
    let keys: HashSet<&str> = finished.iter().map(|run| run.dedupe_key.as_str()).collect();
    assert_eq!(keys.len(), 40);
    for run in &finished {
        assert_eq!(run.status(), RunStatus::RunSucceeded, "{run:?}");
        assert_eq!(
            (run.tasks_spawned, run.tasks_succeeded, run.tasks_failed),
            (10, 10, 0),
            "{run:?}"
        );
    }
    env.nats_peers[0].restart()?;
    Ok(())
}

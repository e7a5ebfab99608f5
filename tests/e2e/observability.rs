//! Health and readiness endpoints, for Kubernetes probes.

use std::time::Duration;

use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port, wait_for};

use crate::support::http_get;

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
    let ready = |addr| async move {
        Ok(http_get(addr, "/readyz")
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body))
    };
    let body = wait_for("the executor to be ready", Duration::from_secs(30), || {
        ready(executor_addr)
    })
    .await?;
    assert!(body.contains("nats: connected"), "{body}");
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
        || async {
            Ok(http_get(executor_addr, "/readyz")
                .await
                .ok()
                .filter(|(status, _)| *status == 503)
                .map(|(_, body)| body))
        },
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

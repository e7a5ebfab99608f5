//! NATS over TLS with client certificates (`NATS_CA`, `NATS_CERT`, `NATS_KEY`): the services work
//! against a server that speaks only TLS and verifies clients; a service without what it needs
//! says so and stops.

use std::process::Command;
use std::time::Duration;

use taskfactory_proto::v1::RunStatus;
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for, workspace_root};

use crate::support::{create, finished_run, publish_event, runs};

fn tls_env() -> EnvOptions {
    EnvOptions {
        nats_tls: true,
        ..EnvOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_services_work_against_a_tls_only_server_that_verifies_clients() -> anyhow::Result<()> {
    let env = TestEnv::new(tls_env()).await?;
    assert!(env.nats.url().starts_with("tls://"));
    // As processes: the certificates come from the environment, as in production.
    let _services = [
        env.spawn_process(Service::Trigger, &[])?,
        env.spawn_process(Service::Orchestrator, &[])?,
        env.spawn_process(Service::Executor, &[])?,
    ];
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: over-tls\ntrigger: {event: {subject: events.tls.ping}}\n\
         tasks: [{name: a, type: log, params: {message: hello}}, {name: b, type: noop}]\n",
    )
    .await?;
    publish_event(&env.js().await?, "events.tls.ping", b"{}".to_vec(), None).await?;
    let run = wait_for("the run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "over-tls").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.tasks_succeeded, 2);

    // A client without the CA and a certificate is turned away: the server really requires them.
    let plain = format!("nats://127.0.0.1:{}", env.nats.port);
    let refused = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(plain.as_str());
    let refused = tokio::time::timeout(Duration::from_secs(10), refused).await?;
    assert!(refused.is_err(), "a client without TLS must not get in");
    Ok(())
}

/// Runs the executor binary with `env` on top of the TLS server's URL, expecting it to stop on
/// its own; returns its exit success and what it printed.
fn run_executor(env: &TestEnv, vars: &[(&str, String)]) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new(workspace_root().join("target/debug/taskfactory-executor"));
    command
        .env("NATS_URL", env.nats.url())
        .env("TASKFACTORY_STARTUP_PATIENCE", "2s")
        .env("RUST_LOG", "warn")
        .env("TASKFACTORY_LOG_FORMAT", "pretty");
    for (key, value) in vars {
        command.env(key, value);
    }
    let output = command.output()?;
    Ok((
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_without_what_tls_needs_says_what_is_missing() -> anyhow::Result<()> {
    let env = TestEnv::new(tls_env()).await?;
    let tls = env.tls.as_ref().expect("a TLS environment");
    let ca = tls.ca.display().to_string();
    let cert = tls.client_cert.display().to_string();
    let key = tls.client_key.display().to_string();

    // Half a key pair: refused before connecting, naming the missing half.
    let (ok, out) = run_executor(
        &env,
        &[("NATS_CA", ca.clone()), ("NATS_CERT", cert.clone())],
    )?;
    assert!(!ok, "{out}");
    assert!(
        out.contains("NATS_CERT is set but NATS_KEY is not"),
        "{out}"
    );

    // A path that is not there: named.
    let (ok, out) = run_executor(
        &env,
        &[
            ("NATS_CA", "/nonexistent/ca.pem".to_owned()),
            ("NATS_CERT", cert.clone()),
            ("NATS_KEY", key.clone()),
        ],
    )?;
    assert!(!ok, "{out}");
    assert!(out.contains("NATS_CA /nonexistent/ca.pem"), "{out}");

    // No client certificate: the server refuses the handshake; the service gives up after its
    // patience and says it could not connect.
    let (ok, out) = run_executor(&env, &[("NATS_CA", ca.clone())])?;
    assert!(!ok, "{out}");
    assert!(out.contains("could not connect to NATS"), "{out}");

    // Everything given: it connects (and is then stopped by the test).
    let mut executor = Command::new(workspace_root().join("target/debug/taskfactory-executor"))
        .env("NATS_URL", env.nats.url())
        .env("NATS_CA", &ca)
        .env("NATS_CERT", &cert)
        .env("NATS_KEY", &key)
        .envs(env.nats_env("executor"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let connected = env.wait_ready(&[Service::Executor]).await;
    let _ = executor.kill();
    let _ = executor.wait();
    connected
}

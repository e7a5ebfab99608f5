//! `taskfactory-trigger apply`: specs from files through the admin API, like `kubectl apply`; with
//! traces on, each file's calls are one trace that continues into the admin API's spans.

use std::process::Command;
use std::time::Duration;

use taskfactory_tests::otlp::OtlpReceiver;
use taskfactory_tests::{EnvOptions, Service, TestEnv, workspace_root};

/// Runs `apply` on `paths`, exporting its traces to `otlp`; returns (success, stdout, stderr).
fn apply(env: &TestEnv, otlp: &str, paths: &[&std::path::Path]) -> (bool, String, String) {
    let output = Command::new(workspace_root().join("target/debug/taskfactory-trigger"))
        .arg("apply")
        .arg("--admin-url")
        .arg(format!("http://{}", env.grpc_addr))
        .args(paths)
        .env(
            "TASKFACTORY_TOKEN",
            env.tokens.as_ref().map(|t| t.editor.as_str()).unwrap_or(""),
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_SERVICE_NAME", "taskfactory-apply")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the trigger binary runs (cargo build --bins)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_creates_then_keeps_then_updates_and_names_what_it_refused() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.spawn_process(
        Service::Trigger,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )?;
    env.wait_ready(&[Service::Trigger]).await?;
    let dir = tempfile::tempdir()?;
    let first = dir.path().join("first.yaml");
    let second = dir.path().join("second.json");
    std::fs::write(
        &first,
        "name: applied-one\ntrigger: {manual: {}}\ntasks: [{name: a, type: noop}]\n",
    )?;
    std::fs::write(
        &second,
        r#"{"name": "applied-two", "trigger": {"manual": {}}, "tasks": [{"name": "b", "type": "log"}]}"#,
    )?;

    let (ok, out, err) = apply(&env, &receiver.endpoint(), &[dir.path()]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("applied-one: created"), "{out}");
    assert!(out.contains("applied-two: created"), "{out}");

    // The same files again: nothing changes.
    let (ok, out, err) = apply(&env, &receiver.endpoint(), &[dir.path()]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("applied-one: unchanged (version 1)"), "{out}");
    assert!(out.contains("applied-two: unchanged (version 1)"), "{out}");

    // One changed, one broken: the good one is applied, the broken one named, the exit fails.
    std::fs::write(
        &first,
        "name: applied-one\ntrigger: {manual: {}}\ntasks: [{name: a, type: noop}, {name: c, type: noop}]\n",
    )?;
    let broken = dir.path().join("third.yaml");
    std::fs::write(
        &broken,
        "name: applied-three\ntrigger: {manual: {}}\ntasks: [{name: x}]\n",
    )?;
    let (ok, out, err) = apply(&env, &receiver.endpoint(), &[dir.path()]);
    assert!(!ok, "a refused spec fails the apply: {out}\n{err}");
    assert!(out.contains("applied-one: updated to version 2"), "{out}");
    assert!(err.contains("third.yaml"), "{err}");
    assert!(err.contains("tasks[0].type"), "names the field: {err}");
    assert!(err.contains("1 of 3 specs were not applied"), "{err}");

    // Traces: each file is a span of the CLI, and the admin API's spans are its children.
    let spans = receiver
        .wait_until("the apply's spans", Duration::from_secs(20), |spans| {
            spans
                .iter()
                .filter(|s| s.service == "taskfactory-apply" && s.name == "apply")
                .count()
                >= 7
        })
        .await?;
    let apply_span = spans
        .iter()
        .find(|s| {
            s.service == "taskfactory-apply"
                && s.name == "apply"
                && s.attribute("file")
                    .is_some_and(|f| f.ends_with("second.json"))
        })
        .expect("waited for them");
    assert!(apply_span.parent_span_id.is_empty(), "a root span");
    let calls: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == apply_span.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        calls.contains(&"taskfactory.v1.AdminService/GetActivity"),
        "the admin API continued the CLI's trace: {calls:?}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.parent_span_id == apply_span.span_id)
            .all(|s| s.trace_id == apply_span.trace_id && s.service == "taskfactory-trigger")
    );

    // A spec over the admin API's size limit is named, with its size and the limit.
    let big = tempfile::tempdir()?;
    std::fs::write(
        big.path().join("big.yaml"),
        format!(
            "name: applied-big\ntrigger: {{manual: {{}}}}\ntasks: [{{name: a, type: log, params: {{pad: {}}}}}]\n",
            "a".repeat(1_100_000)
        ),
    )?;
    let (ok, out, err) = apply(&env, &receiver.endpoint(), &[big.path()]);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("big.yaml")
            && err.contains("over the limit of 1048576 bytes (--max-spec-bytes)"),
        "{err}"
    );
    Ok(())
}

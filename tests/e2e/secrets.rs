//! Secrets are used and never kept: a canary secret in an `http` source's header (resolved by the
//! orchestrator from its environment) and another in an `http` task's header (resolved by the
//! executor from a secrets directory) reach the server that needs them, and appear in no log line,
//! no span, no metric and no row of the database; a sensitive source's value neither.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskfactory_model::values::struct_to_json;
use taskfactory_proto::v1::{GetRunRequest, RunStatus};
use taskfactory_tests::otlp::OtlpReceiver;
use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port};

use crate::context::fire;
use crate::support::{create, http_get, preview};

/// A loopback API that needs the secrets: `GET /account` wants `X-Api-Key: <source key>` and
/// answers the account (holding the sensitive canary); `POST /charge` wants `Authorization:
/// Bearer <task key>`. It records what each saw and never echoes a header.
async fn guarded_api(
    source_key: String,
    task_key: String,
    sensitive: String,
) -> anyhow::Result<(String, Arc<Mutex<Vec<&'static str>>>)> {
    use axum::routing::{get, post};
    let seen: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let (account_seen, charge_seen) = (seen.clone(), seen.clone());
    let app = axum::Router::new()
        .route(
            "/account",
            get(move |headers: axum::http::HeaderMap| async move {
                let ok = headers.get("x-api-key").and_then(|v| v.to_str().ok())
                    == Some(source_key.as_str());
                account_seen.lock().unwrap().push(if ok {
                    "account: key ok"
                } else {
                    "account: no key"
                });
                if !ok {
                    return Err(axum::http::StatusCode::UNAUTHORIZED);
                }
                Ok(axum::Json(
                    serde_json::json!({"tier": "gold", "note": sensitive}),
                ))
            }),
        )
        .route(
            "/charge",
            post(move |headers: axum::http::HeaderMap| async move {
                let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(format!("Bearer {task_key}").as_str());
                charge_seen.lock().unwrap().push(if ok {
                    "charge: key ok"
                } else {
                    "charge: no key"
                });
                if !ok {
                    return Err(axum::http::StatusCode::UNAUTHORIZED);
                }
                Ok(axum::Json(serde_json::json!({"charged": true})))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, seen))
}

/// Every text of every row of every table in `pool`'s database that holds `needle` (as text, or
/// hex-encoded as `bytea` prints): `(table, count)`.
async fn rows_holding(pool: &sqlx::PgPool, needle: &str) -> anyhow::Result<Vec<(String, i64)>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(
        tables.len() > 5,
        "the product's tables are there: {tables:?}"
    );
    let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
    let mut found = Vec::new();
    for table in tables {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} AS r WHERE strpos(r::text, $1) > 0 OR strpos(r::text, $2) > 0"
        )))
        .bind(needle)
        .bind(&hex)
        .fetch_one(pool)
        .await?;
        if count > 0 {
            found.push((table, count));
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canary_secrets_reach_their_server_and_appear_in_no_log_span_metric_or_row()
-> anyhow::Result<()> {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let source_key = format!("canary-source-{unique}");
    let task_key = format!("canary-task-{unique}");
    let sensitive = format!("canary-sensitive-{unique}");
    let (base, seen) = guarded_api(source_key.clone(), task_key.clone(), sensitive.clone()).await?;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let receiver = OtlpReceiver::start().await?;
    let logs = tempfile::tempdir()?;
    let secrets_dir = tempfile::tempdir()?;
    std::fs::write(secrets_dir.path().join("TASK_KEY"), format!("{task_key}\n"))?;
    let orchestrator_metrics: std::net::SocketAddr =
        format!("127.0.0.1:{}", free_port()).parse()?;
    let executor_metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let endpoint = receiver.endpoint();
    let common = [
        ("TASKFACTORY_LOG_FORMAT", "json"),
        ("RUST_LOG", "debug"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let orchestrator_addr = orchestrator_metrics.to_string();
    let executor_addr = executor_metrics.to_string();
    let secrets_path = secrets_dir.path().display().to_string();
    // The orchestrator has the source's key (a variable); only the executor has the task's (a
    // file): the orchestrator never sees it.
    let per_service: [(Service, Vec<(&str, &str)>); 3] = [
        (Service::Trigger, vec![]),
        (
            Service::Orchestrator,
            vec![
                ("TASKFACTORY_SECRET_SOURCE_KEY", source_key.as_str()),
                ("TASKFACTORY_SECRETS_HOSTS", "SOURCE_KEY=http://127.0.0.1"),
                ("TASKFACTORY_METRICS_ADDR", orchestrator_addr.as_str()),
            ],
        ),
        (
            Service::Executor,
            vec![
                ("TASKFACTORY_SECRETS_DIR", secrets_path.as_str()),
                ("TASKFACTORY_SECRETS_HOSTS", "TASK_KEY=http://127.0.0.1"),
                ("TASKFACTORY_METRICS_ADDR", executor_addr.as_str()),
            ],
        ),
    ];
    let mut running = Vec::new();
    for (service, vars) in &per_service {
        let vars: Vec<(&str, &str)> = common.iter().chain(vars).copied().collect();
        let log = logs.path().join(format!("{}.log", service.binary_name()));
        running.push(env.spawn_process_logged(*service, &vars, &log)?);
    }
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    let mut admin = env.admin().await?;

    let spec = format!(
        r#"
name: charge
trigger: {{manual: {{}}}}
context:
  - name: account
    sensitive: true
    http:
      url: "{base}/account"
      secretHeaders: {{X-Api-Key: {{secret: SOURCE_KEY}}}}
tasks:
  - name: charge
    type: http
    when: "context.account.tier == 'gold' and context.account.note is defined"
    params: {{url: "{base}/charge", body: {{amount: 5}}}}
    secretHeaders: {{Authorization: {{secret: TASK_KEY, prefix: "Bearer "}}}}
"#
    );
    let answer = preview(&mut admin, &spec, serde_json::json!({})).await?;
    assert_eq!(
        struct_to_json(answer.context.as_ref().unwrap())["account"],
        serde_json::json!({"redacted": true}),
        "a preview shows a sensitive source redacted"
    );
    assert_eq!(answer.tasks.len(), 1, "the templates saw the real value");
    create(&mut admin, &spec).await?;
    let run = fire(&mut admin, "charge", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{}", run.error);
    let run = admin
        .get_run(GetRunRequest { id: run.id.clone() })
        .await?
        .into_inner();
    assert_eq!(
        struct_to_json(run.context.as_ref().unwrap())["account"],
        serde_json::json!({"redacted": true})
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["account: key ok", "account: key ok", "charge: key ok"],
        "the server got the right headers"
    );

    // Metrics, before the services stop.
    let mut metrics = String::new();
    for addr in [orchestrator_metrics, executor_metrics] {
        let (status, body) = http_get(addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        metrics.push_str(&body);
    }
    // Stopping flushes the logs and the traces.
    for service in running {
        service.stop().await?;
    }
    let trace_id = run.trace_id.clone();
    let spans = receiver
        .wait_until(
            "the run's spans from the orchestrator and the executor",
            Duration::from_secs(30),
            |spans| {
                let of = |service: &str| {
                    spans
                        .iter()
                        .any(|s| s.trace_id == trace_id && s.service.ends_with(service))
                };
                of("orchestrator") && of("executor")
            },
        )
        .await?;
    let pool = env.db.pool().await?;

    for canary in [&source_key, &task_key, &sensitive] {
        let mut logged = 0;
        for entry in std::fs::read_dir(logs.path())? {
            let text = std::fs::read_to_string(entry?.path())?;
            assert!(text.lines().count() > 5, "the services logged");
            logged += text
                .lines()
                .filter(|line| line.contains(canary.as_str()))
                .count();
        }
        assert_eq!(logged, 0, "{canary} appears in {logged} log lines");
        let traced: Vec<&str> = spans
            .iter()
            .filter(|span| {
                span.name.contains(canary.as_str())
                    || span.status_message.contains(canary.as_str())
                    || span
                        .attributes
                        .iter()
                        .chain(span.event_attributes.iter().flatten())
                        .any(|(k, v)| k.contains(canary.as_str()) || v.contains(canary.as_str()))
                    || span.events.iter().any(|e| e.contains(canary.as_str()))
            })
            .map(|span| span.name.as_str())
            .collect();
        assert!(traced.is_empty(), "{canary} appears in spans {traced:?}");
        assert!(
            !metrics.contains(canary.as_str()),
            "{canary} appears in /metrics"
        );
        let rows = rows_holding(&pool, canary).await?;
        assert!(rows.is_empty(), "{canary} appears in {rows:?}");
    }
    // The search can see: the run's own values are there.
    assert!(!rows_holding(&pool, &run.id).await?.is_empty());
    assert!(spans.iter().any(|s| s.name == "context account"));
    Ok(())
}

//! Context sources against the real thing: a Postgres table, a local HTTP server, a NATS KV
//! bucket, a NATS responder; each `onError` mode; slow sources hit their timeouts.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use taskfactory_model::values::{json_to_value, struct_to_json};
use taskfactory_proto::v1::{Run, RunStatus, TriggerActivityRequest};
use taskfactory_tests::{EnvOptions, TestEnv};

use crate::support::{Admin, SourceRole, create, finished_run, tasks};

/// Fires a manual activity with `payload` and waits for its run to finish.
pub async fn fire(
    admin: &mut Admin,
    activity: &str,
    payload: serde_json::Value,
) -> anyhow::Result<Run> {
    let fired = admin
        .trigger_activity(TriggerActivityRequest {
            id: activity.to_owned(),
            payload: Some(json_to_value(&payload)),
            ..Default::default()
        })
        .await?
        .into_inner();
    finished_run(admin, &fired.run_id, Duration::from_secs(30)).await
}

fn context(run: &Run) -> serde_json::Value {
    run.context
        .as_ref()
        .map(struct_to_json)
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_sources_read_bound_parameters_and_refuse_to_write() -> anyhow::Result<()> {
    let crm = taskfactory_tests::TestDb::create().await?;
    let pool = crm.pool().await?;
    sqlx::query(
        "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, tier text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO customers VALUES (1, 'Ada', 'gold'), (2, 'Grace', 'silver'), (3, 'Edsger', 'gold')",
    )
    .execute(&pool)
    .await?;
    sqlx::query("CREATE SEQUENCE tickets")
        .execute(&pool)
        .await?;
    // The role the README recommends: SELECT on what the activities read, nothing else.
    let role = SourceRole::create(&crm, &["customers"]).await?;
    // More than it needs, to show the read-only transaction still holds: nextval is refused.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT USAGE ON SEQUENCE tickets TO {}",
        role.name
    )))
    .execute(&pool)
    .await?;
    let env = TestEnv::new(EnvOptions {
        sql_databases: vec![("crm".to_owned(), role.dsn())],
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let activity = |name: &str, query: &str, extra: &str| {
        format!(
            r#"
name: {name}
trigger: {{manual: {{}}}}
context:
  - name: customers
    sql:
      database: crm
      query: "{query}"
      params: ["{{{{ event.tier }}}}"]
    {extra}
tasks:
  - name: greet
    type: log
    forEach: context.customers
    params: {{id: "{{{{ item.id }}}}", name: "{{{{ item.name }}}}"}}
"#
        )
    };
    create(
        &mut admin,
        &activity(
            "by-tier",
            "SELECT id, name FROM customers WHERE tier = $1 ORDER BY id",
            "",
        ),
    )
    .await?;
    let run = fire(&mut admin, "by-tier", serde_json::json!({"tier": "gold"})).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{}", run.error);
    assert_eq!(
        context(&run)["customers"],
        serde_json::json!([{"id": 1, "name": "Ada"}, {"id": 3, "name": "Edsger"}])
    );
    let made = tasks(&mut admin, &run.id).await?;
    let names: Vec<serde_json::Value> = made
        .iter()
        .map(|t| struct_to_json(t.params.as_ref().unwrap())["name"].clone())
        .collect();
    assert_eq!(names, ["Ada", "Edsger"]);

    // Injection payloads are parameters: they match nothing and change nothing.
    for evil in [
        "gold' OR '1'='1",
        "gold'; DROP TABLE customers; --",
        "x'); DELETE FROM customers; --",
        "' UNION SELECT 1, current_user --",
    ] {
        let run = fire(&mut admin, "by-tier", serde_json::json!({"tier": evil})).await?;
        assert_eq!(
            run.status(),
            RunStatus::RunSucceeded,
            "{evil}: {}",
            run.error
        );
        assert_eq!(context(&run)["customers"], serde_json::json!([]), "{evil}");
    }

    // Writing is refused, however it is dressed up: by validation where the text says so...
    for (name, query, refusal) in [
        (
            "insert",
            "INSERT INTO customers VALUES (9, 'Eve', $1)",
            "is not a query that reads",
        ),
        (
            "stacked",
            "SELECT 1 AS one WHERE $1 = $1; DELETE FROM customers",
            "is more than one statement",
        ),
    ] {
        let status = create(&mut admin, &activity(name, query, ""))
            .await
            .expect_err(name)
            .downcast::<tonic::Status>()?;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(
            status.message().contains("context[0].sql.query") && status.message().contains(refusal),
            "{name}: {}",
            status.message()
        );
    }
    // ... and by the database where it is not.
    for (name, query, refusal) in [
        (
            "cte-delete",
            "WITH gone AS (DELETE FROM customers WHERE tier = $1 RETURNING id) SELECT * FROM gone",
            "",
        ),
        (
            "nextval",
            "SELECT nextval('tickets') AS n, $1::text AS t",
            "read-only transaction",
        ),
    ] {
        create(&mut admin, &activity(name, query, "")).await?;
        let run = fire(&mut admin, name, serde_json::json!({"tier": "gold"})).await?;
        assert_eq!(run.status(), RunStatus::RunFailed, "{name} must fail");
        assert!(
            run.error.contains("context source \"customers\"") && run.error.contains(refusal),
            "{name}: {}",
            run.error
        );
    }
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM customers")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 3, "nothing was written");
    let (tickets,): (bool,) = sqlx::query_as("SELECT is_called FROM tickets")
        .fetch_one(&pool)
        .await?;
    assert!(!tickets, "the sequence did not move");

    // A slow query hits the source's timeout; a row cap is enforced.
    create(
        &mut admin,
        &activity(
            "slow-sql",
            "SELECT 1 AS id, 'x' AS name, $1::text AS t FROM pg_sleep(5)",
            "timeout: 500ms",
        ),
    )
    .await?;
    let started = Instant::now();
    let run = fire(&mut admin, "slow-sql", serde_json::json!({"tier": "gold"})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    assert!(
        run.error.contains("timed out") || run.error.contains("statement timeout"),
        "{}",
        run.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout held"
    );
    create(
        &mut admin,
        &activity(
            "capped",
            "SELECT g AS id, 'n' AS name FROM generate_series(1, 50) g WHERE $1 <> ''",
            "",
        )
        .replacen("params:", "maxRows: 10\n      params:", 1),
    )
    .await?;
    let run = fire(&mut admin, "capped", serde_json::json!({"tier": "gold"})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    assert!(run.error.contains("more than 10 rows"), "{}", run.error);

    // A database the orchestrator does not know is named.
    create(
        &mut admin,
        &activity("unknown-db", "SELECT 1 AS id, $1 AS name", "")
            .replace("database: crm", "database: billing"),
    )
    .await?;
    let run = fire(
        &mut admin,
        "unknown-db",
        serde_json::json!({"tier": "gold"}),
    )
    .await?;
    assert!(
        run.error.contains("TASKFACTORY_SQL_BILLING"),
        "{}",
        run.error
    );
    Ok(())
}

/// A local JSON API: `/price/<sku>` → `{"sku", "price"}`, `/echo` (POST) → the body, `/slow` after
/// 2 s, `/broken` → 500.
pub async fn json_api() -> anyhow::Result<String> {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/price/{sku}",
            get(
                |axum::extract::Path(sku): axum::extract::Path<String>| async move {
                    axum::Json(serde_json::json!({"sku": sku, "price": 42}))
                },
            ),
        )
        .route(
            "/echo",
            post(
                |axum::Json(body): axum::Json<serde_json::Value>| async move {
                    axum::Json(serde_json::json!({"got": body}))
                },
            ),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                axum::Json(serde_json::json!({"late": true}))
            }),
        )
        .route(
            "/broken",
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// NATS without users: `kv` and `request` sources run on the orchestrator's own connection, which
/// the shipped permissions keep off user subjects and buckets (sources get their own user).
fn sources_on_the_orchestrators_connection() -> EnvOptions {
    EnvOptions {
        nats_users: false,
        ..EnvOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_kv_and_request_sources_resolve_concurrently() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        sources_allow_subjects: "inventory.>".to_owned(),
        sources_allow_buckets: "config".to_owned(),
        ..sources_on_the_orchestrators_connection()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let base = json_api().await?;

    let js = env.js().await?;
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "config".to_owned(),
            ..Default::default()
        })
        .await?;
    kv.put(
        "flags",
        serde_json::to_vec(&serde_json::json!({"beta": true}))?.into(),
    )
    .await?;
    kv.put("motd", "plain text".into()).await?;

    let nats = env.nats_client().await?;
    let mut responder = nats.subscribe("inventory.query").await?;
    let replies = nats.clone();
    tokio::spawn(async move {
        while let Some(message) = responder.next().await {
            let asked: serde_json::Value =
                serde_json::from_slice(&message.payload).unwrap_or_default();
            let answer = serde_json::json!({"sku": asked["sku"], "stock": 7});
            if let Some(reply) = message.reply {
                let _ = replies
                    .publish(reply, serde_json::to_vec(&answer).unwrap().into())
                    .await;
            }
        }
    });

    create(
        &mut admin,
        &format!(
            r#"
name: situation
trigger: {{manual: {{}}}}
context:
  - name: price
    http: {{url: "{base}/price/{{{{ event.sku }}}}"}}
  - name: echo
    http: {{method: POST, url: "{base}/echo", body: {{sku: "{{{{ event.sku }}}}", qty: "{{{{ event.qty }}}}"}}}}
  - name: flags
    kv: {{bucket: config, key: flags}}
  - name: motd
    kv: {{bucket: config, key: motd}}
  - name: stock
    request: {{subject: inventory.query, payload: {{sku: "{{{{ event.sku }}}}"}}}}
  - name: warehouse
    static: {{id: berlin-1}}
tasks:
  - name: reserve
    type: log
    when: context.flags.beta
    params: {{sku: "{{{{ event.sku }}}}", price: "{{{{ context.price.price }}}}", stock: "{{{{ context.stock.stock }}}}"}}
"#
        ),
    )
    .await?;
    let run = fire(
        &mut admin,
        "situation",
        serde_json::json!({"sku": "A-1", "qty": 2}),
    )
    .await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{}", run.error);
    let context = context(&run);
    assert_eq!(
        context["price"],
        serde_json::json!({"sku": "A-1", "price": 42})
    );
    assert_eq!(
        context["echo"],
        serde_json::json!({"got": {"sku": "A-1", "qty": 2}})
    );
    assert_eq!(context["flags"], serde_json::json!({"beta": true}));
    assert_eq!(context["motd"], serde_json::json!("plain text"));
    assert_eq!(
        context["stock"],
        serde_json::json!({"sku": "A-1", "stock": 7})
    );
    assert_eq!(context["warehouse"], serde_json::json!({"id": "berlin-1"}));
    let made = tasks(&mut admin, &run.id).await?;
    assert_eq!(
        struct_to_json(made[0].params.as_ref().unwrap()),
        serde_json::json!({"sku": "A-1", "price": 42, "stock": 7})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_sources_fail_use_the_default_or_are_omitted_and_slow_ones_time_out()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        sources_allow_subjects: "nobody.>".to_owned(),
        sources_allow_buckets: "config".to_owned(),
        ..sources_on_the_orchestrators_connection()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let base = json_api().await?;
    let js = env.js().await?;
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "config".to_owned(),
        ..Default::default()
    })
    .await?;

    create(
        &mut admin,
        &format!(
            r#"
name: forgiving
trigger: {{manual: {{}}}}
context:
  - name: price
    http: {{url: "{base}/broken"}}
    onError: USE_DEFAULT
    default: {{price: 0}}
  - name: flags
    kv: {{bucket: config, key: missing}}
    onError: OMIT
  - name: stock
    request: {{subject: nobody.listens}}
    timeout: 500ms
    onError: USE_DEFAULT
  - name: late
    http: {{url: "{base}/slow"}}
    timeout: 300ms
    onError: OMIT
tasks:
  - name: t
    type: log
    params: {{price: "{{{{ context.price.price }}}}", has_flags: "{{{{ context.flags is defined }}}}", stock: "{{{{ context.stock }}}}"}}
"#
        ),
    )
    .await?;
    let started = Instant::now();
    let run = fire(&mut admin, "forgiving", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded, "{}", run.error);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "sources resolve concurrently, each bounded by its timeout"
    );
    let context = context(&run);
    assert_eq!(context["price"], serde_json::json!({"price": 0}));
    assert!(context.get("flags").is_none(), "omitted: {context}");
    assert!(context.get("late").is_none(), "omitted: {context}");
    assert_eq!(context["stock"], serde_json::Value::Null);
    let made = tasks(&mut admin, &run.id).await?;
    assert_eq!(
        struct_to_json(made[0].params.as_ref().unwrap()),
        serde_json::json!({"price": 0, "has_flags": false, "stock": null})
    );
    // Every failure is explained in the evaluation.
    let notes: Vec<(String, String)> = run
        .evaluation
        .iter()
        .filter(|e| e.template.starts_with("context."))
        .map(|e| (e.template.clone(), e.error.clone()))
        .collect();
    assert_eq!(notes.len(), 4, "{notes:?}");
    let error_of = |name: &str| {
        notes
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    };
    assert!(error_of("context.price").contains("500"), "{notes:?}");
    assert!(
        error_of("context.flags").contains("no such key"),
        "{notes:?}"
    );
    assert!(error_of("context.late").contains("timed out"), "{notes:?}");

    // FAIL (the default): the run fails with the source's error, and makes no tasks.
    create(
        &mut admin,
        &format!(
            "name: strict\ntrigger: {{manual: {{}}}}\ncontext: [{{name: price, http: {{url: '{base}/broken'}}}}]\ntasks: [{{name: t, type: log}}]\n"
        ),
    )
    .await?;
    let run = fire(&mut admin, "strict", serde_json::json!({})).await?;
    assert_eq!(run.status(), RunStatus::RunFailed);
    assert!(
        run.error.starts_with("context source \"price\"") && run.error.contains("500"),
        "{}",
        run.error
    );
    assert_eq!(run.tasks_spawned, 0);
    Ok(())
}

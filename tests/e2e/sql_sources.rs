//! `sql` sources and the database's control plane: a privileged role stops the orchestrator
//! (unless allowed, then `/readyz` warns); the recommended role reads no server file, no
//! `pg_authid`, signals none of the product's connections; nothing a query does outlives it.

use std::time::Duration;

use taskfactory_tests::{EnvOptions, TestDb, TestEnv, free_port, wait_for};

use crate::support::{SourceRole, http_get, preview, source_error, with_source};

/// Starts an orchestrator in this process with `crm` = `dsn`; returns how its start ended if it
/// ended within 30 s (`None`: it is running).
async fn start_orchestrator(
    env: &TestEnv,
    dsn: &str,
    allow_privileged: bool,
    metrics: Option<std::net::SocketAddr>,
) -> (tokio_util::sync::DropGuard, Option<anyhow::Result<()>>) {
    let mut config = taskfactory_orchestrator::Config::local(&env.nats_urls(), &env.db.url());
    config.nats = env.nats_args("orchestrator");
    config.sql_databases = vec![("crm".to_owned(), dsn.to_owned())];
    if allow_privileged {
        config.sql_allow_privileged = vec!["crm".to_owned()];
    }
    config.lifecycle.metrics_addr = metrics;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut task = tokio::spawn(taskfactory_orchestrator::run(
        config,
        shutdown.child_token(),
    ));
    let ended = match tokio::time::timeout(
        Duration::from_secs(if metrics.is_some() { 3 } else { 30 }),
        &mut task,
    )
    .await
    {
        Ok(joined) => Some(joined.expect("the orchestrator does not panic")),
        Err(_) => None,
    };
    (shutdown.drop_guard(), ended)
}

/// Runs `statements` as the server's superuser in `db`.
async fn as_superuser(db: &TestDb, statements: &[String]) -> anyhow::Result<()> {
    let pool = db.pool().await?;
    for statement in statements {
        sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_privileged_sql_source_role_stops_the_orchestrator_unless_allowed() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let crm = TestDb::create().await?;
    as_superuser(&crm, &["CREATE TABLE customers (id int)".to_owned()]).await?;

    // The server's superuser — also the role the orchestrator itself uses.
    let (_running, ended) = start_orchestrator(&env, &crm.url(), false, None).await;
    let error = format!("{:#}", ended.expect("it refuses to start").unwrap_err());
    for expected in [
        "sql database \"crm\"",
        "role \"postgres\" is a superuser",
        "the role taskfactory's own DATABASE_URL uses",
        "--sql-allow-privileged-role",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }

    // Roles that are no superuser but hold one dangerous privilege each.
    for (grant, named) in [
        (
            "GRANT pg_signal_backend TO {role}",
            "is a member of pg_signal_backend",
        ),
        (
            "GRANT pg_read_server_files TO {role}",
            "is a member of pg_read_server_files",
        ),
        (
            "GRANT pg_read_all_data TO {role}",
            "is a member of pg_read_all_data",
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_read_file(text) TO {role}",
            "may execute pg_read_file(text)",
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_reload_conf() TO {role}",
            "may execute pg_reload_conf()",
        ),
        (
            "ALTER ROLE {role} CREATEROLE",
            "may create roles (CREATEROLE)",
        ),
        ("ALTER ROLE {role} BYPASSRLS", "bypasses row-level security"),
        (
            "GRANT postgres TO {role}",
            "the role taskfactory's own DATABASE_URL uses",
        ),
    ] {
        let role = SourceRole::create(&crm, &["customers"]).await?;
        as_superuser(&crm, &[grant.replace("{role}", &role.name)]).await?;
        let (_running, ended) = start_orchestrator(&env, &role.dsn(), false, None).await;
        let error = format!("{:#}", ended.expect(grant).unwrap_err());
        assert!(
            error.contains(&format!("role \"{}\"", role.name)) && error.contains(named),
            "{grant}: {error}"
        );
    }

    // A source on taskfactory's own database that may read its result-token key.
    env.db.migrated_pool().await?.close().await;
    let reader = SourceRole::create(&env.db, &["result_token_key"]).await?;
    let (_running, ended) = start_orchestrator(&env, &reader.dsn(), false, None).await;
    let error = format!("{:#}", ended.expect("refused").unwrap_err());
    assert!(
        error.contains("may read taskfactory's own tables"),
        "a reader of the key: {error}"
    );

    // No superuser itself, but a (NOINHERIT) member of one: one SET ROLE away.
    let role = SourceRole::create(&crm, &["customers"]).await?;
    let dba = SourceRole::create(&crm, &[]).await?;
    as_superuser(
        &crm,
        &[
            format!("ALTER ROLE {} SUPERUSER", dba.name),
            format!("ALTER ROLE {} NOINHERIT", role.name),
            format!("GRANT {} TO {}", dba.name, role.name),
        ],
    )
    .await?;
    let (_running, ended) = start_orchestrator(&env, &role.dsn(), false, None).await;
    let error = format!("{:#}", ended.expect("refused").unwrap_err());
    assert!(
        error.contains("may become one with SET ROLE"),
        "a member of a superuser role: {error}"
    );

    // Allowed by the operator: it starts, says so loudly, and `/readyz` shows it.
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (_running, ended) = start_orchestrator(&env, &crm.url(), true, Some(metrics)).await;
    assert!(ended.is_none(), "it starts: {ended:?}");
    let body = wait_for("/readyz", Duration::from_secs(30), || async move {
        Ok(http_get(metrics, "/readyz")
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body))
    })
    .await?;
    assert!(
        body.contains("warning: sql database \"crm\" uses role \"postgres\", which is a superuser")
            && body.contains("--sql-allow-privileged-role"),
        "{body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_recommended_sql_role_reads_no_files_signals_no_backend_and_keeps_no_lock()
-> anyhow::Result<()> {
    let crm = TestDb::create().await?;
    as_superuser(
        &crm,
        &[
            "CREATE TABLE customers (id int, name text)".to_owned(),
            "INSERT INTO customers VALUES (1, 'Ada')".to_owned(),
        ],
    )
    .await?;
    let role = SourceRole::create(&crm, &["customers"]).await?;
    let env = TestEnv::new(EnvOptions {
        sql_databases: vec![("crm".to_owned(), role.dsn())],
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let sql = |name: &str, query: &str, extra: &str| {
        with_source(
            name,
            &format!(
                "{{name: q, sql: {{database: crm, query: \"{query}\", params: ['{{{{ event.db }}}}']}}{extra}}}"
            ),
        )
    };
    let event = serde_json::json!({"db": env.db.name});

    // What the product's own connections are, to see they survive.
    let product = env.db.pool().await?;
    let backends = || async {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND usename = 'postgres' AND pid <> pg_backend_pid() ORDER BY pid",
        )
        .fetch_all(&product)
        .await?;
        anyhow::Ok(pids)
    };
    let before = backends().await?;
    assert!(!before.is_empty());

    for (name, query, refusal) in [
        (
            "read-file",
            "SELECT pg_read_file('/etc/hostname') AS f, $1::text AS d",
            "permission denied for function pg_read_file",
        ),
        (
            "authid",
            "SELECT rolname, rolpassword FROM pg_authid WHERE $1::text IS NOT NULL",
            "permission denied for table pg_authid",
        ),
        (
            "terminate",
            "SELECT pg_terminate_backend(pid) AS t FROM pg_stat_activity WHERE datname = $1",
            "terminate",
        ),
        (
            "reload",
            "SELECT pg_reload_conf() AS r, $1::text AS d",
            "permission denied for function pg_reload_conf",
        ),
        (
            "lo-import",
            "SELECT lo_import('/etc/hostname') AS o, $1::text AS d",
            "permission denied for function lo_import",
        ),
    ] {
        let answer = preview(&mut admin, &sql(name, query, ""), event.clone()).await?;
        let error = source_error(&answer, "q");
        assert!(error.contains(refusal), "{name}: {error}");
    }
    let after = backends().await?;
    assert!(
        before.iter().all(|pid| after.contains(pid)),
        "the product's connections survive: {before:?} → {after:?}"
    );

    // A session-level advisory lock: the source fails, and no lock is left (its connection was
    // closed, not reused) — also when the query is cut off by the source's timeout.
    let crm_pool = crm.pool().await?;
    for (key, query, extra) in [
        (
            424_242_i64,
            "SELECT pg_advisory_lock(424242) AS l, $1::text AS d",
            "",
        ),
        (
            424_243,
            "SELECT pg_advisory_lock(424243) AS l, pg_sleep(3) AS s, $1::text AS d",
            ", timeout: 500ms",
        ),
        (
            424_244,
            "SELECT pg_advisory_lock_shared(424244) AS l, $1::text AS d",
            "",
        ),
    ] {
        let answer = preview(&mut admin, &sql("lock", query, extra), event.clone()).await?;
        let error = source_error(&answer, "q");
        assert!(
            error.contains("advisory lock")
                || error.contains("timed out")
                || error.contains("timeout"),
            "{key}: {error}"
        );
        wait_for(
            &format!("advisory lock {key} to be released"),
            Duration::from_secs(10),
            || {
                let crm_pool = crm_pool.clone();
                async move {
                    let held: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
                    )
                    .bind(key as i32)
                    .fetch_one(&crm_pool)
                    .await?;
                    Ok((held == 0).then_some(()))
                }
            },
        )
        .await?;
    }
    let answer = preview(
        &mut admin,
        &sql(
            "lock",
            "SELECT pg_advisory_lock(424242) AS l, $1::text AS d",
            "",
        ),
        event.clone(),
    )
    .await?;
    assert!(
        source_error(&answer, "q").contains("session-level advisory lock"),
        "{}",
        source_error(&answer, "q")
    );

    // And the pool still serves: an honest query reads.
    let answer = preview(
        &mut admin,
        &sql(
            "honest",
            "SELECT id, name FROM customers WHERE $1::text IS NOT NULL",
            "",
        ),
        event,
    )
    .await?;
    assert_eq!(source_error(&answer, "q"), "");
    Ok(())
}

/// `--max-source-bytes` bounds what a `sql` source holds of its result, not only what it keeps:
/// a single 100 MB value (one message from Postgres) and rows that pass the limit together both
/// fail the source naming the limit, and the orchestrator's memory hardly moves. (It read every
/// row whole before checking: three sources of one 100 MB value took it to 720 MiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sql_source_holds_no_more_than_max_source_bytes_of_its_rows() -> anyhow::Result<()> {
    use taskfactory_proto::v1::TriggerActivityRequest;
    use taskfactory_tests::Service;

    use crate::support::{create, finished_run, proc_status_kib};

    let crm = TestDb::create().await?;
    let role = SourceRole::create(&crm, &[]).await?;
    let env = TestEnv::new(EnvOptions {
        sql_databases: vec![("crm".to_owned(), role.dsn())],
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let _executor = env.start(Service::Executor);
    // Its own process, so its memory is its own; the defaults: 1 MiB a source, 128 MiB budget.
    let orchestrator = env.spawn_process(Service::Orchestrator, &[])?;
    let pid = orchestrator
        .pid()
        .ok_or_else(|| anyhow::anyhow!("a process"))?;
    env.wait_ready(&[Service::Trigger, Service::Executor, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let mut sources: Vec<String> = (0..3)
        .map(|i| {
            format!("{{name: huge{i}, onError: OMIT, sql: {{database: crm, query: \"SELECT repeat('x', 100000000) AS v\"}}}}")
        })
        .collect();
    // 999 rows of 5 KB: within the rows allowed, 5 MB together.
    sources.push("{name: many, onError: OMIT, sql: {database: crm, query: \"SELECT n, repeat('y', 5000) AS v FROM generate_series(1, 999) AS n\"}}".to_owned());
    // Within the limit: read as before.
    sources.push("{name: fits, sql: {database: crm, query: \"SELECT n, repeat('z', 1000) AS v FROM generate_series(1, 500) AS n ORDER BY n\"}}".to_owned());
    create(
        &mut admin,
        &format!(
            "name: big\ntrigger: {{manual: {{}}}}\ncontext: [{}]\ntasks: [{{name: t, type: log}}]\n",
            sources.join(", ")
        ),
    )
    .await?;
    let before = proc_status_kib(pid, "VmRSS");
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "big".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(120)).await?;
    let peak = proc_status_kib(pid, "VmHWM");
    let grew_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "orchestrator: {} MiB before the run, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(
        grew_mib < 64,
        "with --max-source-bytes 1 MiB (and 128 MiB of evaluation budget), one run's sources took the \
         orchestrator from {} MiB to a peak of {} MiB (+{grew_mib} MiB); run {:?}: {}",
        before / 1024,
        peak / 1024,
        run.status(),
        run.error
    );
    for name in ["huge0", "huge1", "huge2", "many"] {
        let note = run
            .evaluation
            .iter()
            .find(|e| e.template == format!("context.{name}"))
            .ok_or_else(|| anyhow::anyhow!("no note for {name}: {:?}", run.evaluation))?;
        assert!(
            note.error
                .contains("more than the 1048576 bytes a source may have (--max-source-bytes)"),
            "{name}: {}",
            note.error
        );
    }
    let context =
        taskfactory_model::values::struct_to_json(&run.context.clone().unwrap_or_default());
    assert_eq!(
        context["fits"].as_array().map(Vec::len),
        Some(500),
        "{}",
        run.error
    );
    assert_eq!(context["fits"][499]["n"], 500);
    assert!(context.get("many").is_none());
    Ok(())
}

/// A query that closes the parentheses of the statement bounding it: the rest of its text
/// becomes a branch of that statement of its own, outside the row limit and the byte bound, here
/// one row of a 100 MB value.
const ESCAPING_QUERY: &str = "SELECT 1) AS q) AS t) AS r) AS s UNION ALL SELECT repeat('x', 100000000), 0 FROM (SELECT 1 AS total, 1 AS len FROM (SELECT 1 FROM (SELECT 1 FROM (SELECT 1";

/// Validation refuses, naming the field and what is wrong, a query that is not one statement
/// closed on itself; parentheses and semicolons inside strings, quoted names, dollar quotes and
/// comments are text, not structure. (Escaping queries were accepted, then ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sql_query_that_is_not_one_closed_statement_is_refused_at_the_api() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let spec = |query: &str| {
        with_source(
            "q",
            &format!("{{name: q, sql: {{database: crm, query: {query:?}}}}}"),
        )
    };
    for (query, named) in [
        (ESCAPING_QUERY, "closes a parenthesis it did not open"),
        (
            "SELECT 1 AS x) AS q, (SELECT * FROM pg_class -- ",
            "closes a parenthesis it did not open",
        ),
        ("SELECT 1; SELECT 2", "more than one statement"),
        ("SELECT 1; -- and then", "more than one statement"),
        ("SELECT (1", "leaves 1 parenthesis open"),
        ("SELECT 1 /* never closed", "a comment that is never closed"),
        ("SELECT 'never closed", "a string that is never closed"),
        (
            "SELECT $a$ never closed",
            "a dollar-quoted string that is never closed",
        ),
        ("DELETE FROM t", "is not a query that reads"),
    ] {
        let status = preview(&mut admin, &spec(query), serde_json::json!({}))
            .await
            .expect_err(query);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{query}");
        assert!(
            status.message().contains("context[0].sql.query") && status.message().contains(named),
            "{query}: {}",
            status.message()
        );
    }
    for query in [
        "SELECT ')' AS \"a;)\", $x$ ; ( $x$ AS b, E'\\');' AS c -- ; )\n",
        "/* (; */ (SELECT 1 AS a);;",
        "WITH t AS (VALUES (1), (2)) SELECT * FROM t /* a /* nested ) */ comment */",
    ] {
        preview(&mut admin, &spec(query), serde_json::json!({}))
            .await
            .map_err(|status| anyhow::anyhow!("{query}: {status}"))?;
    }
    Ok(())
}

/// Whatever a query's text, the statement that bounds it keeps its shape: the query must be one
/// statement as the database itself reads it (the same transaction prepares it alone first), so
/// no text brings back rows or bytes past the bounds. Here the database reads strings the old way
/// (`standard_conforming_strings = off`), so validation, which reads them the standard way, sees
/// a query of two strings where the database sees the escape. (It ran: three such sources took
/// the orchestrator's memory past 300 MB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sql_source_keeps_its_bounds_whatever_its_query_text() -> anyhow::Result<()> {
    use taskfactory_proto::v1::TriggerActivityRequest;
    use taskfactory_tests::Service;

    use crate::support::{create, finished_run, proc_status_kib};

    let crm = TestDb::create().await?;
    as_superuser(
        &crm,
        &[format!(
            "ALTER DATABASE \"{}\" SET standard_conforming_strings = off",
            crm.name
        )],
    )
    .await?;
    let role = SourceRole::create(&crm, &[]).await?;
    let env = TestEnv::new(EnvOptions {
        sql_databases: vec![("crm".to_owned(), role.dsn())],
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let _executor = env.start(Service::Executor);
    let orchestrator = env.spawn_process(Service::Orchestrator, &[])?;
    let pid = orchestrator
        .pid()
        .ok_or_else(|| anyhow::anyhow!("a process"))?;
    env.wait_ready(&[Service::Trigger, Service::Executor, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    // The standard way: two strings. The old way: `'a\', '` is one string, and then the escape.
    let escaping = "SELECT 'a\\', ') AS q) AS t) AS r) AS s UNION ALL SELECT repeat($$x$$, 100000000), 0 FROM (SELECT 1 AS total, 1 AS len FROM (SELECT 1 FROM (SELECT 1 FROM (SELECT 1 --'";
    let mut sources: Vec<String> = (0..3)
        .map(|i| {
            format!("{{name: huge{i}, onError: OMIT, sql: {{database: crm, query: {escaping:?}}}}}")
        })
        .collect();
    // The pool still serves an honest query.
    sources.push("{name: fits, sql: {database: crm, query: \"SELECT n FROM generate_series(1, 3) AS n ORDER BY n\"}}".to_owned());
    create(
        &mut admin,
        &format!(
            "name: escape\ntrigger: {{manual: {{}}}}\ncontext: [{}]\ntasks: [{{name: t, type: log}}]\n",
            sources.join(", ")
        ),
    )
    .await?;
    let before = proc_status_kib(pid, "VmRSS");
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "escape".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = finished_run(&admin, &run_id, Duration::from_secs(120)).await?;
    let peak = proc_status_kib(pid, "VmHWM");
    let grew_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "orchestrator: {} MiB before the run, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(
        grew_mib < 64,
        "three sources whose text escapes the bounding statement took the orchestrator from {} MiB \
         to a peak of {} MiB (+{grew_mib} MiB); run {:?}: {}",
        before / 1024,
        peak / 1024,
        run.status(),
        run.error
    );
    for name in ["huge0", "huge1", "huge2"] {
        let note = run
            .evaluation
            .iter()
            .find(|e| e.template == format!("context.{name}"))
            .ok_or_else(|| anyhow::anyhow!("no note for {name}: {:?}", run.evaluation))?;
        assert!(
            note.error.contains("query on database \"crm\"") && note.error.contains("syntax error"),
            "{name}: {}",
            note.error
        );
    }
    let context =
        taskfactory_model::values::struct_to_json(&run.context.clone().unwrap_or_default());
    assert_eq!(
        context["fits"],
        serde_json::json!([{"n": 1}, {"n": 2}, {"n": 3}]),
        "{}",
        run.error
    );
    Ok(())
}

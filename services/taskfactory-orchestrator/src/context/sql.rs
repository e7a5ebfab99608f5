//! `sql` sources: named databases, their roles checked before first use, one read-only query per
//! resolution, and connections that come back clean or not at all.
//!
//! - **The role.** Before a database serves its first query (at start when it answers then, else
//!   at first use) the orchestrator reads its role's privileges
//!   ([`taskfactory_model::sql_role`]): a superuser, a role with CREATEROLE, REPLICATION,
//!   BYPASSRLS or CREATEDB, a member of a predefined role that reads files, signals backends or
//!   reads everything, a role that may execute `pg_read_file`-class functions, or the role the
//!   orchestrator itself uses is refused: the orchestrator does not start, naming the database and
//!   the privilege. `--sql-allow-privileged-role NAME` accepts such a role for database `NAME`,
//!   with a loud warning at start and on `/readyz`.
//! - **The query** runs in a `READ ONLY` transaction with `statement_timeout` and `lock_timeout`,
//!   parameters bound (never interpolated), as a subquery (so only a query that reads fits), with
//!   a row cap; the rows become a list of objects. Its text must be one statement closed on
//!   itself ([`taskfactory_model::sql_query`]), and the same transaction has the database
//!   prepare it alone before it runs inside the bounding statement ([`read_only_query`]): no text
//!   changes the shape of the statement that bounds it.
//! - **Its size.** The server stops sending rows once their text passes about twice
//!   `--max-source-bytes` (a single huge value too: it never leaves the server), and the rows are
//!   read one at a time, the source failing as soon as their compact JSON passes the limit
//!   ([`bounded_query`]): a source never holds much more than the limit of its result.
//! - **The parameters** are each bound with a type chosen from the JSON value alone, and the
//!   statement is prepared under a text naming those types, so a connection that cached it for
//!   other types never reuses it ([`taskfactory_model::sql_params`]): the same value gets the
//!   same answer on every connection.
//! - **The session.** After each query, success or failure, the connection is checked for what
//!   outlives a transaction (session advisory locks, temporary relations, LISTEN channels); a
//!   connection holding any is closed, never reused, and the source fails. The same check runs
//!   when a connection returns to the pool in any other way (a source that timed out mid-query).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgTypeInfo, Postgres,
};
use taskfactory_model::sizes;
use taskfactory_model::sql_params::{self, SqlParam};
use taskfactory_model::sql_query;
use taskfactory_model::sql_role::{self, RoleFacts, SessionState};
use taskfactory_proto::v1::SqlSource;
use taskfactory_runtime::telemetry::error_chain;

use super::Sources;

/// The flag that accepts a privileged role, as messages name it.
pub const ALLOW_PRIVILEGED_FLAG: &str =
    "--sql-allow-privileged-role (TASKFACTORY_SQL_ALLOW_PRIVILEGED_ROLE)";

/// The configured databases, by lowercase name.
pub struct Databases {
    by_name: HashMap<String, Arc<Database>>,
    /// The role the orchestrator's own `DATABASE_URL` uses.
    own_role: String,
    /// Warnings about privileged roles the operator allowed (shown on `/readyz`).
    warnings: Arc<Mutex<Vec<String>>>,
}

struct Database {
    name: String,
    pool: PgPool,
    allow_privileged: bool,
    /// The role check's verdict, once made (a database that did not answer is checked again).
    verdict: tokio::sync::OnceCell<Result<(), String>>,
}

impl Databases {
    /// Pools connect lazily; nothing is checked yet ([`Databases::verify_all`]).
    pub fn new(
        configured: Vec<(String, String)>,
        allow_privileged: &[String],
        own_role: String,
    ) -> anyhow::Result<Self> {
        let mut by_name = HashMap::new();
        for name in allow_privileged {
            let name = name.to_ascii_lowercase();
            if !configured
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(&name))
            {
                anyhow::bail!(
                    "{ALLOW_PRIVILEGED_FLAG} names {name:?}, which is not a configured sql database"
                );
            }
        }
        for (name, dsn) in configured {
            let name = name.to_ascii_lowercase();
            // Never the DSN in the message: it may hold a password.
            let options: PgConnectOptions = dsn.parse().map_err(|_| {
                anyhow::anyhow!(
                    "the DSN of sql database {name:?} is not a postgres:// URL or key=value string"
                )
            })?;
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .after_release(|conn, _| Box::pin(async move { release_if_clean(conn).await }))
                .connect_lazy_with(options.application_name("taskfactory-context"));
            let allow = allow_privileged
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&name));
            by_name.insert(
                name.clone(),
                Arc::new(Database {
                    name,
                    pool,
                    allow_privileged: allow,
                    verdict: tokio::sync::OnceCell::new(),
                }),
            );
        }
        Ok(Self {
            by_name,
            own_role,
            warnings: Arc::default(),
        })
    }

    /// At start: checks every database's role, concurrently, each for at most `patience`. A
    /// refused role is an error (the orchestrator does not start); a database that does not
    /// answer is logged and checked before its first query instead.
    pub async fn verify_all(&self, patience: Duration) -> anyhow::Result<()> {
        let checks = self.by_name.values().map(|database| async move {
            let verdict = tokio::time::timeout(patience, self.verdict(database)).await;
            (database, verdict)
        });
        let mut refusals = Vec::new();
        for (database, verdict) in futures::future::join_all(checks).await {
            match verdict {
                Ok(Ok(())) => {}
                Ok(Err(error)) if database.verdict.initialized() => refusals.push(error),
                Ok(Err(error)) => {
                    tracing::warn!(database = %database.name, %error, "cannot check the sql source role at start; it is checked before its first query")
                }
                Err(_) => {
                    tracing::warn!(database = %database.name, "sql source database did not answer at start; its role is checked before its first query")
                }
            }
        }
        if refusals.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", refusals.join("; "))
        }
    }

    /// What `/readyz` shows: one warning per privileged role allowed.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().expect("warnings lock").clone()
    }

    /// The role check's verdict for `database`: made once, unless the database could not be
    /// reached (then `Err` now, and checked again next time).
    async fn verdict(&self, database: &Database) -> Result<(), String> {
        database
            .verdict
            .get_or_try_init(|| async {
                let facts = role_facts(&database.pool, &self.own_role)
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot check the role of sql database {:?}: {}",
                            database.name,
                            error_chain(&e)
                        )
                    })?;
                Ok::<_, String>(self.judge(database, &facts))
            })
            .await
            .and_then(|verdict| verdict.clone())
    }

    /// The decision on a role's privileges, carried out: refused, or allowed with a warning.
    fn judge(&self, database: &Database, facts: &RoleFacts) -> Result<(), String> {
        let problems = sql_role::role_problems(facts);
        if problems.is_empty() {
            tracing::info!(database = %database.name, role = %facts.role, "sql source role checked: it holds no dangerous privilege");
            return Ok(());
        }
        let described = sql_role::describe(&problems);
        if database.allow_privileged {
            let warning = format!(
                "warning: sql database {:?} uses role {:?}, which {described}; allowed by {ALLOW_PRIVILEGED_FLAG}",
                database.name, facts.role
            );
            tracing::error!(database = %database.name, role = %facts.role, privileges = %described, "SQL SOURCES RUN WITH A PRIVILEGED ROLE: any activity author can use these privileges; allowed by --sql-allow-privileged-role");
            self.warnings.lock().expect("warnings lock").push(warning);
            return Ok(());
        }
        Err(format!(
            "sql database {:?}: role {:?} {described}; give sql sources a role that may only SELECT what activities need (README: Context sources and the control plane), or accept it with {ALLOW_PRIVILEGED_FLAG} {}",
            database.name, facts.role, database.name
        ))
    }
}

/// Reads what [`sql_role::role_problems`] judges about the current role.
async fn role_facts(pool: &PgPool, own_role: &str) -> Result<RoleFacts, sqlx::Error> {
    let roles: Vec<String> = sql_role::DANGEROUS_ROLES
        .iter()
        .map(|r| (*r).to_owned())
        .collect();
    let functions: Vec<String> = sql_role::DANGEROUS_FUNCTIONS
        .iter()
        .map(|f| (*f).to_owned())
        .collect();
    let row: (String, bool, bool, bool, bool, bool, Vec<String>, Vec<String>, bool) =
        sqlx::query_as(
            // Every role the source role may SET ROLE to counts as its own (a NOINHERIT member of
            // a superuser role is one `set_config('role', …)` away from being superuser).
            "SELECT current_user::text, bool_or(x.rolsuper), bool_or(x.rolcreaterole), \
                bool_or(x.rolcreatedb), bool_or(x.rolreplication), bool_or(x.rolbypassrls), \
                ARRAY(SELECT p.rolname::text FROM pg_roles p \
                      WHERE p.rolname = ANY($1) AND pg_has_role(current_user, p.oid, 'MEMBER') ORDER BY 1), \
                ARRAY(SELECT f FROM unnest($2::text[]) AS f \
                      WHERE to_regprocedure(f) IS NOT NULL \
                        AND EXISTS (SELECT 1 FROM pg_roles y \
                                    WHERE pg_has_role(current_user, y.oid, 'MEMBER') \
                                      AND has_function_privilege(y.oid, to_regprocedure(f), 'EXECUTE'))), \
                EXISTS (SELECT 1 FROM pg_roles o \
                        WHERE o.rolname = $3 AND pg_has_role(current_user, o.oid, 'MEMBER')) \
                OR (to_regclass('result_token_key') IS NOT NULL \
                    AND EXISTS (SELECT 1 FROM pg_roles k \
                                WHERE pg_has_role(current_user, k.oid, 'MEMBER') \
                                  AND has_table_privilege(k.oid, 'result_token_key', 'SELECT'))) \
             FROM pg_roles x WHERE pg_has_role(current_user, x.oid, 'MEMBER')",
        )
        .bind(&roles)
        .bind(&functions)
        .bind(own_role)
        .fetch_one(pool)
        .await?;
    Ok(RoleFacts {
        role: row.0,
        superuser: row.1,
        create_role: row.2,
        create_db: row.3,
        replication: row.4,
        bypass_rls: row.5,
        member_of: row.6,
        executable: row.7,
        is_product_role: row.8,
    })
}

/// The role `pool` logs in as.
pub async fn current_role(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await
}

/// What a connection holds that outlives a transaction.
async fn session_state(conn: &mut PgConnection) -> Result<SessionState, sqlx::Error> {
    let (advisory_locks, temp_relations, listening_channels): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
                (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
                (SELECT count(*) FROM pg_listening_channels())",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(SessionState {
        advisory_locks,
        temp_relations,
        listening_channels,
    })
}

/// The pool's `after_release` check: a connection goes back only if nothing outlived its
/// transaction (else it is closed, which releases it all). A check that fails closes it too —
/// gracefully (`Ok(false)`: the server is told to end the session), because a connection given
/// back mid-query (a source that timed out) answers the check with the query's own error, and
/// sqlx's hard close on `Err` can leave the session, and its locks, alive.
async fn release_if_clean(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let problem = match session_state(conn).await {
        Ok(state) => sql_role::leftover_problem(&state),
        Err(error) => Some(format!(
            "cannot check the connection ({}); it was closed",
            error_chain(&error)
        )),
    };
    match problem {
        None => Ok(true),
        Some(problem) => {
            tracing::warn!(%problem, "sql source connection closed instead of reused");
            Ok(false)
        }
    }
}

impl Sources {
    pub(super) async fn sql(
        &self,
        sql: &SqlSource,
        scope: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let name = sql.database.to_ascii_lowercase();
        let database = self.databases.by_name.get(&name).ok_or_else(|| {
            format!(
                "database {:?} is not configured on this orchestrator (set TASKFACTORY_SQL_{})",
                sql.database,
                name.to_ascii_uppercase()
            )
        })?;
        self.databases.verdict(database).await?;
        let mut values = Vec::with_capacity(sql.params.len());
        for (i, param) in sql.params.iter().enumerate() {
            let value = serde_json::Value::String(param.clone());
            values.push(self.render_json(&format!("params[{i}]"), &value, scope)?);
        }
        let params = values
            .iter()
            .enumerate()
            .map(|(i, value)| SqlParam::from_json(value).map_err(|e| format!("params[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let max_rows = if sql.max_rows == 0 {
            self.max_rows
        } else {
            sql.max_rows.min(self.max_rows)
        };
        // Validation checked it too, but a version stored before that check runs here as well.
        let query =
            sql_query::check(&sql.query).map_err(|problem| format!("the query {problem}"))?;
        let bounds = RowBounds {
            max_rows,
            max_bytes: self.max_bytes,
        };
        let mut conn = database.pool.acquire().await.map_err(|e| {
            format!(
                "connecting to database {:?}: {}",
                sql.database,
                error_chain(&e)
            )
        })?;
        let rows = read_only_query(&mut conn, query, &params, timeout, bounds).await;
        // Whatever the query did, nothing of it may stay on the connection.
        match session_state(&mut conn).await {
            Ok(state) => {
                if let Some(problem) = sql_role::leftover_problem(&state) {
                    tracing::warn!(database = %sql.database, %problem, "sql source left session state; connection closed");
                    let _ = conn.close().await;
                    return Err(format!("database {:?}: {problem}", sql.database));
                }
            }
            Err(error) => {
                let _ = conn.close().await;
                return Err(format!(
                    "database {:?}: cannot check the connection after the query: {}",
                    sql.database,
                    error_chain(&error)
                ));
            }
        }
        drop(conn);
        let rows = rows.map_err(|e| match e {
            QueryError::Setup(e) => format!("database {:?}: {}", sql.database, error_chain(&e)),
            QueryError::Query(e) => {
                format!(
                    "query on database {:?}: {}",
                    sql.database,
                    db_error(&e, &params)
                )
            }
            QueryError::NoColumns => format!(
                "the query on database {:?} returns no columns: a source's value is its rows, each an object of its columns",
                sql.database
            ),
            QueryError::TooManyRows => format!(
                "the query returned more than {max_rows} rows; narrow it (or raise maxRows)"
            ),
            QueryError::TooLarge => format!(
                "the rows take more than the {} bytes a source may have (--max-source-bytes); narrow the query",
                self.max_bytes
            ),
            QueryError::Decode(e) => {
                format!("query on database {:?}: a row is not JSON: {e}", sql.database)
            }
        })?;
        Ok(serde_json::Value::Array(rows))
    }
}

/// The most a `sql` source holds at once while it reads its rows, with `max_bytes` of
/// `--max-source-bytes`: the rows kept (at most `max_bytes` as compact JSON), one row's text as
/// the server sends it (at most [`RowBounds::wire_bytes`]) and that row parsed (about as much).
pub(super) fn most_held(max_bytes: usize) -> usize {
    let wire = usize::try_from(wire_bytes(max_bytes)).unwrap_or(usize::MAX);
    max_bytes.saturating_add(wire.saturating_mul(2))
}

/// How much of a query's result a source may hold: its rows, and their bytes as compact JSON
/// (`--max-source-bytes`).
#[derive(Clone, Copy, Debug)]
struct RowBounds {
    max_rows: u32,
    max_bytes: usize,
}

impl RowBounds {
    /// What the server may send of the rows' text, in bytes: twice the limit. Postgres writes
    /// jsonb with a space after each `:` and `,`, so its text of rows whose compact JSON fits
    /// is at most about 1.5 times as long; the exact limit is checked on the compact form.
    fn wire_bytes(self) -> u64 {
        wire_bytes(self.max_bytes)
    }
}

/// [`RowBounds::wire_bytes`] for `max_bytes`.
fn wire_bytes(max_bytes: usize) -> u64 {
    (max_bytes as u64).saturating_mul(2)
}

/// The user's query, bounded where its rows are made, so that this process never receives more
/// than the bounds allow.
///
/// - The user's query is a subquery: only a SELECT (or VALUES, or a read-only WITH) fits there,
///   and only because it is one statement closed on itself (no `)` of its own closes ours: the
///   database prepared it alone first, [`read_only_query`]) is it that subquery and no more,
///   and each row becomes one JSON object's text (`to_jsonb(q)::text`), at most `max_rows + 1`
///   of them (one more than allowed says "too many").
/// - The server counts those texts' bytes as it goes (a running sum) and sends a row's text only
///   while the running total is within [`RowBounds::wire_bytes`]: the row that passes it comes as
///   NULL, and none after it. Postgres sends each row as one message (a 100 MB value is one
///   100 MB `DataRow`, read whole by the client before anyone could look at it), so counting in
///   this process after the fact would be too late; here the server keeps it (it spills to disk
///   past `work_mem`, and `statement_timeout` bounds the time).
fn bounded_query(query: &str, bounds: RowBounds) -> String {
    let wire = bounds.wire_bytes();
    format!(
        "SELECT CASE WHEN s.total <= {wire} THEN s.j END, s.total \
         FROM (SELECT r.j, r.len, sum(r.len) OVER (ROWS UNBOUNDED PRECEDING) AS total \
               FROM (SELECT t.j, octet_length(t.j) AS len \
                     FROM (SELECT to_jsonb(q)::text AS j FROM ({query}\n) AS q LIMIT {limit}) AS t \
                    ) AS r \
              ) AS s \
         WHERE s.total - s.len <= {wire}",
        limit = u64::from(bounds.max_rows) + 1
    )
}

enum QueryError {
    /// Beginning the transaction or setting it up.
    Setup(sqlx::Error),
    /// The user's query (prepared alone, or run bounded).
    Query(sqlx::Error),
    /// The query, prepared alone, returns no columns (it is no query, or one of no columns).
    NoColumns,
    /// More rows than `max_rows`.
    TooManyRows,
    /// The rows passed `max_bytes` (as compact JSON) or the server stopped sending them.
    TooLarge,
    /// A row's text was not JSON (never, from `to_jsonb`).
    Decode(serde_json::Error),
}

/// Runs `query` bounded ([`bounded_query`]) with `params` bound in a read-only transaction,
/// rolled back either way, reading its rows one at a time as they arrive and stopping at the
/// first that passes `bounds`: what this holds is the rows within the bounds, and one row's text
/// of at most [`RowBounds::wire_bytes`].
///
/// First the database prepares `query` alone, with the same parameter types: it must be one
/// statement (the extended protocol refuses more) that returns columns. Only a text that parses
/// whole on its own, its parentheses paired and nothing after it, goes into the bounding
/// statement, where it can then be nothing but the subquery; the database decides, as it reads
/// the text (whatever its `standard_conforming_strings`), not a lexer of ours.
///
/// Both statements are prepared (and cached by sqlx, per connection) under
/// [`sql_params::statement_text`], which names the types the same `params` are bound with.
async fn read_only_query(
    conn: &mut PgConnection,
    query: &str,
    params: &[SqlParam<'_>],
    timeout: Duration,
    bounds: RowBounds,
) -> Result<Vec<serde_json::Value>, QueryError> {
    use futures::TryStreamExt as _;

    let timeout_ms = timeout.as_millis();
    let mut tx = conn.begin().await.map_err(QueryError::Setup)?;
    for setting in [
        "SET TRANSACTION READ ONLY".to_owned(),
        format!("SET LOCAL statement_timeout = {timeout_ms}"),
        format!("SET LOCAL lock_timeout = {timeout_ms}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(setting))
            .execute(&mut *tx)
            .await
            .map_err(QueryError::Setup)?;
    }
    let types: Vec<PgTypeInfo> = params.iter().map(pg_type).collect();
    let alone = sqlx::Executor::prepare_with(
        &mut *tx,
        sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql_params::statement_text(
            query, params,
        ))),
        &types,
    )
    .await
    .map_err(QueryError::Query)?;
    if sqlx::Statement::columns(&alone).is_empty() {
        return Err(QueryError::NoColumns);
    }
    let wrapped = bounded_query(query, bounds);
    let mut query = sqlx::query_as::<_, (Option<String>, i64)>(sqlx::AssertSqlSafe(
        sql_params::statement_text(&wrapped, params),
    ));
    for param in params {
        query = query.bind(Bound(param));
    }
    let rows = async {
        let mut rows = Vec::new();
        // `[` and `]`, then each row and the comma before it.
        let mut bytes = 2usize;
        let mut stream = query.fetch(&mut *tx);
        while let Some((text, _total)) = stream.try_next().await.map_err(QueryError::Query)? {
            if rows.len() >= bounds.max_rows as usize {
                return Err(QueryError::TooManyRows);
            }
            let Some(text) = text else {
                return Err(QueryError::TooLarge);
            };
            let row: serde_json::Value = serde_json::from_str(&text).map_err(QueryError::Decode)?;
            drop(text);
            bytes = bytes
                .saturating_add(usize::try_from(sizes::json_bytes(&row)).unwrap_or(usize::MAX))
                .saturating_add(usize::from(!rows.is_empty()));
            if bytes > bounds.max_bytes {
                return Err(QueryError::TooLarge);
            }
            rows.push(row);
        }
        Ok(rows)
    }
    .await;
    // Read-only either way: end the transaction now (what the server still sends of a query
    // left early is read and dropped first: at most `max_rows` short rows).
    let _ = tx.rollback().await;
    rows
}

/// A database error as the server said it (its message names the problem: a read-only
/// transaction, a syntax error, a timeout, a permission), and, when it may come from a
/// parameter's type, what each parameter was bound as.
fn db_error(error: &sqlx::Error, params: &[SqlParam<'_>]) -> String {
    match error {
        sqlx::Error::Database(db) => {
            let type_error = db
                .code()
                .is_some_and(|code| sql_params::is_type_error(&code));
            if type_error && !params.is_empty() {
                format!("{} ({})", db.message(), sql_params::describe(params))
            } else {
                db.message().to_owned()
            }
        }
        other => error_chain(other).to_string(),
    }
}

/// The type a parameter is declared as ([`SqlParam::sql_type`]).
fn pg_type(param: &SqlParam<'_>) -> PgTypeInfo {
    /// `numeric`'s OID (sqlx names it only with a decimal crate's feature).
    const NUMERIC: Oid = Oid(1700);
    match param {
        SqlParam::Text(_) | SqlParam::Null => <&str as sqlx::Type<Postgres>>::type_info(),
        SqlParam::Int8(_) => <i64 as sqlx::Type<Postgres>>::type_info(),
        SqlParam::Numeric(_) => PgTypeInfo::with_oid(NUMERIC),
        SqlParam::Bool(_) => <bool as sqlx::Type<Postgres>>::type_info(),
        SqlParam::Jsonb(_) => {
            <sqlx::types::Json<&serde_json::Value> as sqlx::Type<Postgres>>::type_info()
        }
    }
}

/// One parameter as sqlx binds it: declared at prepare time with the type [`SqlParam`] chose
/// (`produces`), encoded for exactly that type.
struct Bound<'p, 'v>(&'p SqlParam<'v>);

impl sqlx::Type<Postgres> for Bound<'_, '_> {
    /// Never asked: `produces` always answers.
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }
}

impl sqlx::Encode<'_, Postgres> for Bound<'_, '_> {
    fn produces(&self) -> Option<PgTypeInfo> {
        Some(pg_type(self.0))
    }

    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match self.0 {
            SqlParam::Text(s) => <&str as sqlx::Encode<Postgres>>::encode_by_ref(s, buf),
            SqlParam::Int8(i) => i.encode_by_ref(buf),
            SqlParam::Numeric(n) => {
                buf.extend_from_slice(&n.to_binary());
                Ok(sqlx::encode::IsNull::No)
            }
            SqlParam::Bool(b) => b.encode_by_ref(buf),
            SqlParam::Jsonb(v) => sqlx::types::Json(*v).encode_by_ref(buf),
            SqlParam::Null => Ok(sqlx::encode::IsNull::Yes),
        }
    }
}

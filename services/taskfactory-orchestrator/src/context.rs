//! Resolving an activity's context: the current situation the templates look at.
//!
//! Every source of a spec is resolved concurrently, each under its own timeout; its parameters are
//! templates over `event`, `trigger` and `activity` (never over other sources). Kinds:
//!
//! - `static`: the value as written.
//! - `sql`: a query against a database *named* in the orchestrator's configuration, in a
//!   `READ ONLY` transaction with `statement_timeout` and `lock_timeout`, parameters bound (never
//!   interpolated), a row cap; the rows become a list of objects.
//! - `http`: GET or POST JSON through the guarded client (egress policy on the resolved addresses
//!   and every redirect), with a timeout and a response size cap; the JSON answer is the value.
//! - `kv`: one NATS KV entry (JSON, or the text when it is not JSON).
//! - `request`: a NATS request/reply (JSON payload and answer).
//!
//! A source that fails does what its `onError` says: `FAIL` (the default) fails the run with the
//! error, `USE_DEFAULT` uses `default` (null if none), `OMIT` leaves the name out. Every failure is
//! reported in the run's evaluation either way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use taskfactory_model::egress::EgressPolicy;
use taskfactory_model::expr::{self, Engine, Limits};
use taskfactory_model::spec::std_duration;
use taskfactory_model::values;
use taskfactory_proto::v1::{
    ActivitySpec, ContextSource, HttpSource, KvSource, OnError, RequestSource, SqlSource,
    TemplateEvaluation, context_source,
};
use taskfactory_runtime::telemetry::error_chain;
use taskfactory_runtime::{egress, metrics};

/// What resolving the sources needs, built once per orchestrator.
pub struct Sources {
    databases: HashMap<String, PgPool>,
    http: reqwest::Client,
    egress: Arc<EgressPolicy>,
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    default_timeout: Duration,
    max_rows: u32,
    max_bytes: usize,
    limits: Limits,
}

/// The resolved context, and a note per source that did not resolve.
#[derive(Debug, Default)]
pub struct Resolved {
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Set when a `FAIL` source failed: the run fails with this.
    pub error: Option<String>,
    /// One entry per failed source (`template` = `context.<name>`), for the run's evaluation.
    pub notes: Vec<TemplateEvaluation>,
}

/// How a source settings struct is configured.
pub struct SourcesConfig {
    pub databases: Vec<(String, String)>,
    pub egress_allow: String,
    pub default_timeout: Duration,
    pub max_rows: u32,
    pub max_bytes: usize,
    pub limits: Limits,
}

impl Sources {
    /// Connections to the named databases are made lazily, on first use.
    pub fn new(
        config: SourcesConfig,
        nats: async_nats::Client,
        js: async_nats::jetstream::Context,
    ) -> anyhow::Result<Self> {
        let egress = Arc::new(
            EgressPolicy::parse(&config.egress_allow)
                .map_err(|e| anyhow::anyhow!("TASKFACTORY_EGRESS_ALLOW: {e}"))?,
        );
        let http = egress::guarded_client(
            egress.clone(),
            concat!("taskfactory-orchestrator/", env!("CARGO_PKG_VERSION")),
        )?;
        let mut databases = HashMap::new();
        for (name, dsn) in config.databases {
            let options: PgConnectOptions = dsn
                .parse()
                .map_err(|e| anyhow::anyhow!("the DSN of SQL database {name:?}: {e}"))?;
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options.application_name("taskfactory-context"));
            databases.insert(name.to_ascii_lowercase(), pool);
        }
        Ok(Self {
            databases,
            http,
            egress,
            nats,
            js,
            default_timeout: config.default_timeout,
            max_rows: config.max_rows,
            max_bytes: config.max_bytes,
            limits: config.limits,
        })
    }

    /// Resolves every source of `spec` concurrently. `scope` holds `event`, `trigger` and
    /// `activity`. Only real runs are `counted` in the metrics (a preview's draft names would be
    /// label values nobody bounds, and its dry runs no production latency).
    pub async fn resolve(
        &self,
        spec: &ActivitySpec,
        scope: &serde_json::Value,
        counted: bool,
    ) -> Resolved {
        let outcomes = join_all(spec.context.iter().map(|source| async move {
            let timeout = source
                .timeout
                .as_ref()
                .and_then(std_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(self.default_timeout);
            let span = source_span(source);
            let started = std::time::Instant::now();
            let value =
                match tokio::time::timeout(timeout, self.resolve_one(source, scope, timeout))
                    .instrument(span.clone())
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(format!("timed out after {}", humane(timeout))),
                };
            if let Err(error) = &value {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", error.as_str());
            }
            let took = started.elapsed();
            if counted {
                metrics::record_context_source(
                    source_kind(source),
                    source_outcome(&value, took >= timeout),
                    took,
                );
            }
            (source, value)
        }))
        .await;
        let mut resolved = Resolved::default();
        for (source, value) in outcomes {
            match value {
                Ok(value) => {
                    resolved.context.insert(source.name.clone(), value);
                }
                Err(error) => {
                    if counted {
                        metrics::record_context_source_error(
                            &spec.name,
                            &source.name,
                            source_kind(source),
                        );
                    }
                    let on_error = OnError::try_from(source.on_error).unwrap_or(OnError::Fail);
                    let (note, value) = match on_error {
                        OnError::UseDefault => (
                            "onError USE_DEFAULT: the default was used".to_owned(),
                            Some(
                                source
                                    .default
                                    .as_ref()
                                    .map(values::value_to_json)
                                    .unwrap_or(serde_json::Value::Null),
                            ),
                        ),
                        OnError::Omit => ("onError OMIT: left out of the context".to_owned(), None),
                        OnError::Fail | OnError::Unspecified => {
                            let message = format!("context source {:?}: {error}", source.name);
                            resolved.error.get_or_insert(message);
                            ("onError FAIL: the run fails".to_owned(), None)
                        }
                    };
                    tracing::info!(source = %source.name, %error, "context source failed; {note}");
                    if let Some(value) = value {
                        resolved.context.insert(source.name.clone(), value);
                    }
                    resolved.notes.push(TemplateEvaluation {
                        template: format!("context.{}", source.name),
                        items: 0,
                        tasks: 0,
                        notes: vec![note],
                        error,
                    });
                }
            }
        }
        resolved
    }

    async fn resolve_one(
        &self,
        source: &ContextSource,
        scope: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        match &source.kind {
            Some(context_source::Kind::Static(value)) => Ok(values::value_to_json(value)),
            Some(context_source::Kind::Sql(sql)) => self.sql(sql, scope, timeout).await,
            Some(context_source::Kind::Http(http)) => self.http(http, scope).await,
            Some(context_source::Kind::Kv(kv)) => self.kv(kv, scope).await,
            Some(context_source::Kind::Request(request)) => self.request(request, scope).await,
            None => Err("the source has no kind".to_owned()),
        }
    }

    /// Renders one template string against the scope (a literal stays as it is).
    fn render(&self, what: &str, text: &str, scope: &serde_json::Value) -> Result<String, String> {
        let engine = Engine::new(self.limits);
        let template = engine.template(text).map_err(|e| format!("{what}: {e}"))?;
        template
            .render_string(&expr::to_value(scope))
            .map_err(|e| format!("{what}: {e}"))
    }

    /// Renders a JSON tree whose strings are templates (typed single expressions keep their type).
    fn render_json(
        &self,
        what: &str,
        value: &serde_json::Value,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let engine = Engine::new(self.limits);
        let compiled = engine
            .params(value)
            .map_err(|(path, e)| format!("{what}.{path}: {e}"))?;
        compiled
            .render(&expr::to_value(scope), self.max_bytes)
            .map_err(|e| format!("{what}: {e}"))
    }

    async fn sql(
        &self,
        sql: &SqlSource,
        scope: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let name = sql.database.to_ascii_lowercase();
        let pool = self.databases.get(&name).ok_or_else(|| {
            format!(
                "database {:?} is not configured on this orchestrator (set TASKFACTORY_SQL_{})",
                sql.database,
                name.to_ascii_uppercase()
            )
        })?;
        let mut params = Vec::with_capacity(sql.params.len());
        for (i, param) in sql.params.iter().enumerate() {
            let value = serde_json::Value::String(param.clone());
            params.push(self.render_json(&format!("params[{i}]"), &value, scope)?);
        }
        let max_rows = if sql.max_rows == 0 {
            self.max_rows
        } else {
            sql.max_rows.min(self.max_rows)
        };
        let query = sql.query.trim().trim_end_matches(';').trim_end();
        let first_word = query
            .split(|c: char| !c.is_ascii_alphabetic())
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if !matches!(first_word.as_str(), "SELECT" | "WITH" | "VALUES" | "TABLE") {
            return Err(format!(
                "only queries that read are allowed (SELECT, WITH, VALUES, TABLE), not {first_word}: sql sources run in a read-only transaction"
            ));
        }
        // The user's query as a subquery: only a SELECT (or VALUES, or a read-only WITH) fits
        // there, and each row comes back as one JSON object.
        let wrapped = format!(
            "SELECT to_jsonb(q) FROM ({query}\n) AS q LIMIT {}",
            u64::from(max_rows) + 1
        );
        let timeout_ms = timeout.as_millis();
        let mut tx = pool.begin().await.map_err(|e| {
            format!(
                "connecting to database {:?}: {}",
                sql.database,
                error_chain(&e)
            )
        })?;
        for setting in [
            "SET TRANSACTION READ ONLY".to_owned(),
            format!("SET LOCAL statement_timeout = {timeout_ms}"),
            format!("SET LOCAL lock_timeout = {timeout_ms}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(setting))
                .execute(&mut *tx)
                .await
                .map_err(|e| format!("database {:?}: {}", sql.database, error_chain(&e)))?;
        }
        let mut query = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(
            sqlx::AssertSqlSafe(wrapped),
        );
        for param in &params {
            query = match param {
                serde_json::Value::Null => query.bind(None::<String>),
                serde_json::Value::Bool(b) => query.bind(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => query.bind(i),
                    None => query.bind(n.as_f64().unwrap_or(f64::NAN)),
                },
                serde_json::Value::String(s) => query.bind(s.clone()),
                other => query.bind(sqlx::types::Json(other.clone())),
            };
        }
        let rows = query.fetch_all(&mut *tx).await;
        // Read-only either way: end the transaction now, so the connection goes back clean.
        let _ = tx.rollback().await;
        let rows =
            rows.map_err(|e| format!("query on database {:?}: {}", sql.database, db_error(&e)))?;
        if rows.len() > max_rows as usize {
            return Err(format!(
                "the query returned more than {max_rows} rows; narrow it (or raise maxRows)"
            ));
        }
        let rows: Vec<serde_json::Value> = rows.into_iter().map(|row| row.0).collect();
        let size = serde_json::to_vec(&rows)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if size > self.max_bytes {
            return Err(format!(
                "the rows take {size} bytes, more than the {} allowed",
                self.max_bytes
            ));
        }
        Ok(serde_json::Value::Array(rows))
    }

    async fn http(
        &self,
        http: &HttpSource,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let url = self.render("url", &http.url, scope)?;
        let url = reqwest::Url::parse(&url).map_err(|e| format!("url {url:?}: {e}"))?;
        egress::check_url(&self.egress, &url).map_err(|e| format!("url: {e}"))?;
        let body = http
            .body
            .as_ref()
            .map(|b| self.render_json("body", &values::value_to_json(b), scope))
            .transpose()?;
        let method = match http.method.to_ascii_uppercase().as_str() {
            "" if body.is_some() => reqwest::Method::POST,
            "" | "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            other => return Err(format!("method {other:?} is not GET or POST")),
        };
        // The run's trace continues at the source (`traceparent`); the source's own headers win.
        let mut trace_headers = reqwest::header::HeaderMap::new();
        taskfactory_runtime::propagation::inject_http(&mut trace_headers);
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in &http.headers {
            trace_headers.remove(name.to_ascii_lowercase().as_str());
            request = request.header(
                name.as_str(),
                self.render(&format!("headers.{name}"), value, scope)?,
            );
        }
        request = request.headers(trace_headers);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let bytes = egress::read_capped(response, self.max_bytes)
            .await
            .map_err(|e| format!("{method} {url}: {}", error_chain(&e)))?;
        if !status.is_success() {
            let snippet: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
            return Err(format!("{method} {url} answered {status}: {snippet}"));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{method} {url} did not answer JSON: {e}"))
    }

    async fn kv(
        &self,
        kv: &KvSource,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let bucket = self.render("bucket", &kv.bucket, scope)?;
        let key = self.render("key", &kv.key, scope)?;
        let store = self
            .js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("KV bucket {bucket:?}: {e}"))?;
        let entry = store
            .get(&key)
            .await
            .map_err(|e| format!("KV {bucket}/{key}: {e}"))?
            .ok_or_else(|| format!("KV {bucket}/{key}: no such key"))?;
        self.decode(&entry, &format!("KV {bucket}/{key}"))
    }

    async fn request(
        &self,
        request: &RequestSource,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let subject = self.render("subject", &request.subject, scope)?;
        if let Some(problem) = taskfactory_model::subjects::subject_error(&subject, false) {
            return Err(format!("subject {subject:?} {problem}"));
        }
        let payload = request
            .payload
            .as_ref()
            .map(|p| self.render_json("payload", &values::value_to_json(p), scope))
            .transpose()?
            .unwrap_or(serde_json::Value::Null);
        let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        taskfactory_runtime::propagation::inject_nats(&tracing::Span::current(), &mut headers);
        let reply = self
            .nats
            .request_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| format!("request to {subject}: {e}"))?;
        self.decode(&reply.payload, &format!("the reply from {subject}"))
    }

    /// A JSON value from bytes; text that is not JSON becomes a string.
    fn decode(&self, bytes: &[u8], what: &str) -> Result<serde_json::Value, String> {
        if bytes.len() > self.max_bytes {
            return Err(format!(
                "{what} has {} bytes, more than the {} allowed",
                bytes.len(),
                self.max_bytes
            ));
        }
        Ok(serde_json::from_slice(bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
        }))
    }
}

/// The kind of a source as specs spell it (metric labels, span attributes).
fn source_kind(source: &ContextSource) -> &'static str {
    match &source.kind {
        Some(context_source::Kind::Static(_)) => "static",
        Some(context_source::Kind::Sql(_)) => "sql",
        Some(context_source::Kind::Http(_)) => "http",
        Some(context_source::Kind::Kv(_)) => "kv",
        Some(context_source::Kind::Request(_)) => "request",
        None => "none",
    }
}

/// How resolving a source ended: `ok`, `error`, or `timeout` when it failed having used up its
/// time (our timeout, or the database's `statement_timeout` set to the same).
fn source_outcome(value: &Result<serde_json::Value, String>, out_of_time: bool) -> &'static str {
    match value {
        Ok(_) => "ok",
        Err(_) if out_of_time => "timeout",
        Err(_) => "error",
    }
}

/// A database error as the server said it (its message names the problem: a read-only
/// transaction, a syntax error, a timeout).
fn db_error(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => error_chain(other).to_string(),
    }
}

fn humane(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// The span of one source's resolution: `context <name>`, with its kind.
fn source_span(source: &ContextSource) -> tracing::Span {
    let kind = source_kind(source);
    tracing::info_span!(
        "context source",
        otel.name = %format_args!("context {}", source.name),
        otel.kind = if kind == "static" { "internal" } else { "client" },
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        context.source = %source.name,
        context.kind = kind,
    )
}

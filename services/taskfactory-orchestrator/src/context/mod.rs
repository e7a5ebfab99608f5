//! Resolving an activity's context: the current situation the templates look at.
//!
//! Every source of a spec is resolved concurrently, each under its own timeout; its parameters are
//! templates over `event`, `trigger` and `activity` (never over other sources). A spec has at
//! most `model::spec::MAX_CONTEXT_SOURCES` of them.
//!
//! **Room.** Before a run (or a preview) resolves them it takes room in
//! `--source-bytes-in-flight` for what they may hold together ([`Sources::bytes_to_resolve`]:
//! each source's [`Sources::most_held`], the most it holds at once while it is resolved), in one
//! acquisition, at most the whole budget.
//! What the sources hold never passes what the run took: a source starts only while the most that
//! those in flight may hold, and the values of those resolved, fit in the run's room
//! ([`Sources::resolve`]). With room for all, all start at once; with less (a run whose sources
//! may hold more than the whole budget), they resolve a few at a time; one that cannot fit even
//! alone fails, naming the budget. Kinds:
//!
//! - `static`: the value as written.
//! - `sql` ([`sql`]): a read-only query against a database *named* in the orchestrator's
//!   configuration, whose role is checked for dangerous privileges before first use, on a
//!   connection that must come back clean.
//! - `http` ([`http`]): GET or POST JSON through the guarded client; `secretHeaders` resolved at
//!   send time.
//! - `kv` and `request` ([`nats`]): one NATS KV entry, or a NATS request/reply — never to the
//!   control plane, only to what the operator allow-listed, optionally under their own identity.
//!
//! A source that fails does what its `onError` says: `FAIL` (the default) fails the run with the
//! error, `USE_DEFAULT` uses `default` (null if none), `OMIT` leaves the name out. Every failure is
//! reported in the run's evaluation either way. A `sensitive` source's value is seen by the
//! templates and stored only as a marker ([`stored_form`]).

mod http;
pub mod nats;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use taskfactory_model::egress::EgressPolicy;
use taskfactory_model::expr::{self, Engine, Limits};
use taskfactory_model::sizes;
use taskfactory_model::sources::{BucketAllowList, SubjectAllowList};
use taskfactory_model::spec::std_duration;
use taskfactory_model::values;
use taskfactory_proto::v1::{
    ActivitySpec, ContextSource, OnError, TemplateEvaluation, context_source,
};
use taskfactory_runtime::secrets::{SecretArgs, Secrets};
use taskfactory_runtime::{egress, metrics};

/// What resolving the sources needs, built once per orchestrator.
pub struct Sources {
    databases: sql::Databases,
    http: reqwest::Client,
    /// For requests that carry secrets: follows no redirect to another origin.
    http_with_secrets: reqwest::Client,
    egress: Arc<EgressPolicy>,
    secrets: Secrets,
    nats: nats::NatsSources,
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
    /// Names of the `sensitive` sources in `context`: stored only as a marker.
    pub sensitive: Vec<String>,
}

/// How a source settings struct is configured.
pub struct SourcesConfig {
    pub databases: Vec<(String, String)>,
    /// Databases whose privileged role the operator accepts (`--sql-allow-privileged-role`).
    pub allow_privileged: Vec<String>,
    /// The role the orchestrator's own `DATABASE_URL` uses (a source may not use it).
    pub own_role: String,
    pub egress_allow: String,
    /// `--sources-allow-subjects`: what `request` sources may ask.
    pub allow_subjects: String,
    /// `--sources-allow-buckets`: what `kv` sources may read.
    pub allow_buckets: String,
    pub secrets: SecretArgs,
    pub default_timeout: Duration,
    pub max_rows: u32,
    pub max_bytes: usize,
    pub limits: Limits,
}

impl Sources {
    /// Connections to the named databases are made lazily; their roles are checked by
    /// [`Sources::verify_databases`] (at start) or before first use. `nats` is the connection
    /// `kv` and `request` sources use (their own, when one is configured).
    pub fn new(
        config: SourcesConfig,
        nats: async_nats::Client,
        js: async_nats::jetstream::Context,
    ) -> anyhow::Result<Self> {
        let egress = Arc::new(
            EgressPolicy::parse(&config.egress_allow)
                .map_err(|e| anyhow::anyhow!("TASKFACTORY_EGRESS_ALLOW: {e}"))?,
        );
        let user_agent = concat!("taskfactory-orchestrator/", env!("CARGO_PKG_VERSION"));
        let http = egress::guarded_client(egress.clone(), user_agent)?;
        let http_with_secrets = egress::guarded_client_for_secrets(egress.clone(), user_agent)?;
        Ok(Self {
            databases: sql::Databases::new(
                config.databases,
                &config.allow_privileged,
                config.own_role,
            )?,
            http,
            http_with_secrets,
            egress,
            secrets: Secrets::new(&config.secrets).map_err(anyhow::Error::msg)?,
            nats: nats::NatsSources {
                client: nats,
                js,
                subjects: SubjectAllowList::parse(&config.allow_subjects)
                    .map_err(anyhow::Error::msg)?,
                buckets: BucketAllowList::parse(&config.allow_buckets)
                    .map_err(anyhow::Error::msg)?,
            },
            default_timeout: config.default_timeout,
            max_rows: config.max_rows,
            max_bytes: config.max_bytes,
            limits: config.limits,
        })
    }

    /// At start: refuses a source database whose role is privileged (unless allowed); see
    /// [`sql`].
    pub async fn verify_databases(&self, patience: Duration) -> anyhow::Result<()> {
        self.databases.verify_all(patience).await
    }

    /// Warnings for `/readyz` (privileged roles the operator allowed).
    pub fn warnings(&self) -> Vec<String> {
        self.databases.warnings()
    }

    /// Bytes that resolving `spec`'s sources may hold at once, at most: what a run takes of
    /// `--source-bytes-in-flight` before they are resolved (at most all of it), so that runs with
    /// sources queue rather than overcommit.
    pub fn bytes_to_resolve(&self, spec: &ActivitySpec) -> usize {
        let mut bytes = 0usize;
        for source in &spec.context {
            bytes = bytes.saturating_add(self.most_held(source));
        }
        bytes
    }

    /// The most resolving `source` holds at once, in bytes of its answer:
    ///
    /// - `sql`: the rows kept (`--max-source-bytes`), and one row's text as the server sends it
    ///   (the server stops at twice that, [`sql::most_held`]) with that row parsed;
    /// - `http`: the body (read with a cap of `--max-source-bytes`) and its parse;
    /// - `kv` and `request`: the NATS message, received whole before its size can be judged (up
    ///   to the server's largest, `max_payload`; a `kv` entry only by direct get, which sends the
    ///   entry as it is), and its parse (only if it is within `--max-source-bytes`);
    /// - `static`: nothing; its value is in the spec already.
    pub fn most_held(&self, source: &ContextSource) -> usize {
        match &source.kind {
            Some(context_source::Kind::Sql(_)) => sql::most_held(self.max_bytes),
            Some(context_source::Kind::Http(_)) => self.max_bytes.saturating_mul(2),
            Some(context_source::Kind::Kv(_) | context_source::Kind::Request(_)) => {
                let message = self.nats.client.server_info().max_payload;
                message.saturating_add(message.min(self.max_bytes))
            }
            Some(context_source::Kind::Static(_)) | None => 0,
        }
    }

    /// Resolves the sources of `spec`. `scope` holds `event`, `trigger` and `activity`. A run
    /// or a preview passes the `room` it took for them ([`Sources::bytes_to_resolve`], or less:
    /// at most the whole budget): a source starts only while the [`Sources::most_held`] of those
    /// in flight, the values of those resolved (as compact JSON) and its own fit in it, so they
    /// never hold more; a source that cannot fit with nothing else in flight fails. Only real
    /// runs are `counted` in the metrics (a preview's draft names would be label values nobody
    /// bounds, and its dry runs no production latency).
    pub async fn resolve(
        &self,
        spec: &ActivitySpec,
        scope: &serde_json::Value,
        counted: bool,
        room: usize,
    ) -> Resolved {
        let outcomes = self.resolve_within(spec, scope, counted, room).await;
        let mut resolved = Resolved::default();
        for (source, value) in spec.context.iter().zip(outcomes) {
            match value {
                Ok(value) => {
                    if source.sensitive {
                        resolved.sensitive.push(source.name.clone());
                    }
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

    /// The sources of `spec` resolved, in their order, holding at most `room` bytes together
    /// (see [`Sources::resolve`]).
    async fn resolve_within(
        &self,
        spec: &ActivitySpec,
        scope: &serde_json::Value,
        counted: bool,
        room: usize,
    ) -> Vec<Result<serde_json::Value, String>> {
        let mut outcomes: Vec<Option<Result<serde_json::Value, String>>> =
            vec![None; spec.context.len()];
        let mut waiting: Vec<usize> = (0..spec.context.len()).collect();
        let mut in_flight = FuturesUnordered::new();
        // The most the sources in flight may hold, and what the resolved ones keep.
        let mut held = 0usize;
        loop {
            let mut still_waiting = Vec::with_capacity(waiting.len());
            for index in waiting {
                let source = &spec.context[index];
                let most = self.most_held(source);
                if held.saturating_add(most) <= room {
                    held += most;
                    in_flight.push(async move {
                        (
                            index,
                            most,
                            self.resolve_timed(source, scope, counted).await,
                        )
                    });
                } else {
                    still_waiting.push(index);
                }
            }
            waiting = still_waiting;
            let Some((index, most, value)) = in_flight.next().await else {
                // Nothing in flight, and none of those left fits beside what the others keep.
                for index in waiting {
                    let most = self.most_held(&spec.context[index]);
                    outcomes[index] = Some(Err(no_room(most, room, held)));
                }
                break;
            };
            held -= most;
            if let Ok(value) = &value
                && !matches!(
                    spec.context[index].kind,
                    Some(context_source::Kind::Static(_))
                )
            {
                held = held.saturating_add(
                    usize::try_from(sizes::json_bytes(value)).unwrap_or(usize::MAX),
                );
            }
            outcomes[index] = Some(value);
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Err("not resolved".to_owned())))
            .collect()
    }

    /// One source, under its timeout, in its span, counted in the metrics if `counted`.
    async fn resolve_timed(
        &self,
        source: &ContextSource,
        scope: &serde_json::Value,
        counted: bool,
    ) -> Result<serde_json::Value, String> {
        let timeout = source
            .timeout
            .as_ref()
            .and_then(std_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(self.default_timeout);
        let span = source_span(source);
        let started = std::time::Instant::now();
        let value = match tokio::time::timeout(timeout, self.resolve_one(source, scope, timeout))
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
        value
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
            Some(context_source::Kind::Http(http)) => {
                self.http(http, scope, source.sensitive).await
            }
            Some(context_source::Kind::Kv(kv)) => self.kv(kv, scope).await,
            Some(context_source::Kind::Request(request)) => self.request(request, scope).await,
            None => Err("the source has no kind".to_owned()),
        }
    }

    /// Renders one template string against the scope (a literal stays as it is).
    pub(crate) fn render(
        &self,
        what: &str,
        text: &str,
        scope: &serde_json::Value,
    ) -> Result<String, String> {
        let engine = Engine::new(self.limits);
        let template = engine.template(text).map_err(|e| format!("{what}: {e}"))?;
        template
            .render_string(&expr::to_value(scope))
            .map_err(|e| format!("{what}: {e}"))
    }

    /// Renders a JSON tree whose strings are templates (typed single expressions keep their type).
    pub(crate) fn render_json(
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

    /// A JSON value from bytes; text that is not JSON becomes a string.
    pub(crate) fn decode(&self, bytes: &[u8], what: &str) -> Result<serde_json::Value, String> {
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

/// Why a source that may hold `most` bytes did not start: with nothing else in flight, it does
/// not fit in the run's `room` beside the `kept` bytes of the values already resolved.
fn no_room(most: usize, room: usize, kept: usize) -> String {
    const FLAG: &str = "--source-bytes-in-flight (TASKFACTORY_SOURCE_BYTES_IN_FLIGHT)";
    if kept == 0 {
        format!(
            "resolving it may hold {most} bytes at once, more than the {room} bytes a run's sources may have of {FLAG}; raise it, or lower --max-source-bytes (or the NATS server's max_payload, for kv and request sources)"
        )
    } else {
        format!(
            "resolving it may hold {most} bytes at once, more than is left of the {room} bytes a run's sources may have of {FLAG} beside the {kept} bytes of the sources resolved before it; raise it, or give the run fewer sources"
        )
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

/// The context as the run stores it: each sensitive source's value replaced by the marker
/// (templates saw the real value; nothing of it is kept).
pub fn stored_form(context: &serde_json::Value, sensitive: &[String]) -> serde_json::Value {
    let mut stored = context.clone();
    if let serde_json::Value::Object(map) = &mut stored {
        for name in sensitive {
            if let Some(value) = map.get_mut(name) {
                *value = taskfactory_model::secrets::redacted();
            }
        }
    }
    stored
}

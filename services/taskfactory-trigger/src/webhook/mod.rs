//! The webhook gateway: `POST /hooks/{name}` turns a signed HTTP delivery into an event on
//! `events.>`.
//!
//! # What a sender does
//!
//! Each hook has a name, a subject under `events.` and a secret shared with the sender. A delivery
//! is the JSON body with three headers:
//!
//! - `Taskfactory-Delivery`: the sender's id of this delivery (1 to 128 of `A-Za-z0-9._:-`),
//!   accepted once per hook;
//! - `Taskfactory-Timestamp`: when it was signed, in unix seconds;
//! - `Taskfactory-Signature: v1=<hex>`: HMAC-SHA256 keyed with the secret over
//!   `"{timestamp}.{delivery}." + raw body`. The delivery id is signed too, so a replay cannot
//!   pass as new by changing it. Several `v1=` values, comma-separated, are accepted (a sender
//!   rotating its secret signs with both), and a hook may have several secrets (the receiver
//!   rotating): any pair that matches will do.
//!
//! # What the gateway checks, in order
//!
//! 1. the hook exists (else 404);
//! 2. the three headers are present and well-formed (else 401), and the timestamp is within
//!    [`TIMESTAMP_TOLERANCE`] of our clock, either way (else 401);
//! 3. the body fits the hook's cap: a declared `Content-Length` over it is refused before anything
//!    is read, and reading stops at the cap (413); there is room for it among the bodies the
//!    gateway holds at once (`--http-body-bytes-in-flight`: the declared length, else the cap, is
//!    set aside before reading; no room within the body timeout is 503), and it arrives within
//!    the body timeout (400);
//! 4. the signature (401, the same answer whatever was wrong with it; compared in constant time);
//! 5. the body is JSON (400) — only now, so an unauthenticated caller learns nothing; checked
//!    without building it (a tree of small JSON values takes tens of times the body's bytes);
//! 6. the delivery id is new for this hook (401 "replayed"), then the event is published (a body
//!    that with its headers is over the NATS server's `max_payload` is 413, not 503: a retry
//!    could never succeed).
//!
//! The replay check comes after the signature so that nobody without the secret can use up
//! delivery ids. Every rejection answers `{"error": "..."}`, is logged and is counted in
//! [`WEBHOOK_DELIVERIES`](taskfactory_runtime::metrics::WEBHOOK_DELIVERIES) by outcome.
//!
//! # Providers
//!
//! A hook may instead take deliveries signed by GitHub, Stripe, Slack or a Standard Webhooks
//! sender ([`providers`]): the same checks in the same order, with the provider's headers, signed
//! bytes, key and delivery id (Stripe's and Slack's are in the body, read after the signature).
//! A delivery taken before is answered 200 "duplicate" (providers resend with the same id when
//! they missed our answer), GitHub's event name is appended to the hook's subject, a GitHub
//! delivery is also taken once by its body (GitHub signs neither id nor event), and Slack's
//! `url_verification` is answered with its challenge and not published.
//!
//! # Exactly once in effect
//!
//! In one Postgres transaction the delivery is inserted into `webhook_deliveries` (primary key
//! `(hook, delivery_id)`: a second request with the same id waits for the first and then finds it,
//! or takes its place if the first rolled back), the event is published to the hook's subject with
//! `Nats-Msg-Id = webhook:<hook>:<delivery>` and the stream's ack is awaited, and only then the
//! transaction commits and the sender gets 202. If publishing fails the transaction rolls back and
//! the sender gets 503: the same delivery may be sent again. If the commit fails after the publish,
//! the sender's retry publishes the same `Nats-Msg-Id`, which JetStream drops inside its duplicate
//! window and event ingress dedupes by after it (the id is the default dedupe key of the fire).
//! Rows are pruned at their expiry, set when taken in: [`DELIVERY_RETENTION`] for taskfactory's
//! own senders and Slack (by then the signed timestamp rejects the delivery), longer for senders
//! that send a delivery again for days ([`Provider::delivery_retention`]).
//!
//! # Bounds
//!
//! Connections, their timeouts and the size of a request's head are [`connections`]'; with the
//! bytes of bodies in flight they bound what the gateway can be made to hold by anyone who can
//! reach it, before any signature is checked.

mod connections;
mod providers;

pub use connections::{HttpLimits, MAX_HEAD_BYTES};
pub use providers::{Claim, Identified, Provider};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use anyhow::Context as _;
use async_nats::jetstream::context::PublishErrorKind;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sqlx::PgPool;
use taskfactory_model::subjects;
use taskfactory_runtime::messaging;
use taskfactory_runtime::telemetry::error_chain;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Request headers.
pub const HEADER_DELIVERY: &str = "Taskfactory-Delivery";
pub const HEADER_TIMESTAMP: &str = "Taskfactory-Timestamp";
pub const HEADER_SIGNATURE: &str = "Taskfactory-Signature";
/// Headers of the published event: where it came from, and through which hook.
pub const HEADER_SOURCE: &str = "Taskfactory-Source";
pub const HEADER_HOOK: &str = "Taskfactory-Hook";
/// The value of [`HEADER_SOURCE`] on events published by the gateway.
pub const SOURCE_WEBHOOK: &str = "webhook";

/// How far a delivery's timestamp may be from our clock, into the past or the future.
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// How long a delivery id is remembered: longer than a timestamp stays acceptable (either way),
/// with a margin for skew between our clock and Postgres's.
pub const DELIVERY_RETENTION: Duration = Duration::from_secs(15 * 60);
/// The shortest secret taken.
pub const MIN_SECRET_BYTES: usize = 16;
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How long to wait for the stream's ack before answering 503 (senders time out too).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the work one request can ask for.
const MAX_SIGNATURES: usize = 8;
const MAX_DELIVERY_ID_CHARS: usize = 128;
const MAX_HOOK_NAME_CHARS: usize = 64;
/// Events announced by taskfactory itself; a hook may not publish there.
const RESERVED_SUBJECTS: &str = "events.taskfactory.";

/// A webhook secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self(secret.into())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One configured webhook.
#[derive(Clone, Debug)]
pub struct Hook {
    /// The `{name}` of `POST /hooks/{name}`: a-z, 0-9, `-`, `_`.
    pub name: String,
    /// Where its events are published: a subject under `events.`, without wildcards.
    pub subject: String,
    /// Any of them verifies a delivery (more than one while a secret is being rotated).
    pub secrets: Vec<Secret>,
    /// The largest body taken; `None`: `--max-event-bytes`.
    pub max_body_bytes: Option<usize>,
    /// Whose signature scheme its deliveries carry.
    pub provider: Provider,
}

impl Hook {
    pub fn new(name: &str, subject: &str, secret: &str) -> Self {
        Self {
            name: name.to_owned(),
            subject: subject.to_owned(),
            secrets: vec![Secret::new(secret)],
            max_body_bytes: None,
            provider: Provider::Taskfactory,
        }
    }

    /// A hook whose deliveries come signed by `provider`.
    pub fn from_provider(name: &str, subject: &str, secret: &str, provider: Provider) -> Self {
        Self {
            provider,
            ..Self::new(name, subject, secret)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The webhooks file: `hooks: [{name, subject, secretEnv | secret, maxBodyBytes}]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HooksFile {
    #[serde(default)]
    hooks: Vec<HookEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HookEntry {
    name: String,
    subject: String,
    /// Names of environment variables holding the secret (one, or a list while rotating).
    #[serde(default)]
    secret_env: OneOrMany,
    /// The secret itself (for development; one, or a list).
    #[serde(default)]
    secret: OneOrMany,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    /// `taskfactory` (the default), `github`, `stripe`, `slack` or `standard-webhooks`.
    #[serde(default)]
    provider: Provider,
}

#[derive(serde::Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// The hooks of the webhooks file (if any) and those given in code, checked. An error names the
/// entry and what is wrong with it.
pub fn load_hooks(
    file: Option<&FsPath>,
    direct: &[Hook],
    max_event_bytes: usize,
) -> anyhow::Result<Vec<Hook>> {
    let mut hooks = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the webhooks file {}", path.display()))?;
        let from_file = parse_hooks_file(&text, &|name| std::env::var(name).ok(), max_event_bytes)
            .map_err(|problem| anyhow::anyhow!("webhooks file {}: {problem}", path.display()))?;
        hooks.extend(from_file);
    }
    for hook in direct {
        check_hook(hook, max_event_bytes)
            .map_err(|problem| anyhow::anyhow!("webhook {:?}: {problem}", hook.name))?;
        hooks.push(hook.clone());
    }
    let mut names = HashSet::new();
    for hook in &hooks {
        anyhow::ensure!(
            names.insert(hook.name.as_str()),
            "webhook {:?} is configured twice",
            hook.name
        );
    }
    Ok(hooks)
}

/// Parses a webhooks file (YAML, or JSON), taking secrets named by `secretEnv` from `env`.
fn parse_hooks_file(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    max_event_bytes: usize,
) -> Result<Vec<Hook>, String> {
    let file: HooksFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut hooks = Vec::new();
    for (i, entry) in file.hooks.into_iter().enumerate() {
        let label = format!("hooks[{i}] ({:?})", entry.name);
        let mut secrets = Vec::new();
        for variable in entry.secret_env.into_vec() {
            match env(&variable) {
                Some(value) if !value.is_empty() => secrets.push(Secret::new(value)),
                Some(_) => return Err(format!("{label}: secretEnv {variable} is empty")),
                None => return Err(format!("{label}: secretEnv {variable} is not set")),
            }
        }
        for value in entry.secret.into_vec() {
            secrets.push(Secret::new(value));
        }
        let hook = Hook {
            name: entry.name,
            subject: entry.subject,
            secrets,
            max_body_bytes: entry.max_body_bytes,
            provider: entry.provider,
        };
        check_hook(&hook, max_event_bytes).map_err(|problem| format!("{label}: {problem}"))?;
        hooks.push(hook);
    }
    Ok(hooks)
}

/// What is wrong with a hook, if anything.
fn check_hook(hook: &Hook, max_event_bytes: usize) -> Result<(), String> {
    let name_ok = !hook.name.is_empty()
        && hook.name.len() <= MAX_HOOK_NAME_CHARS
        && hook
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !name_ok {
        return Err(format!(
            "name must be 1 to {MAX_HOOK_NAME_CHARS} of a-z, 0-9, '-', '_'"
        ));
    }
    if let Some(problem) = subjects::subject_error(&hook.subject, false) {
        return Err(format!("subject {problem}"));
    }
    if !hook.subject.starts_with("events.") {
        return Err(format!(
            "subject {:?} must be under events. (the stream the trigger consumes)",
            hook.subject
        ));
    }
    // A GitHub hook's subject is a prefix: its events go to `<subject>.<event>`.
    let published = match hook.provider {
        Provider::Github => format!("{}.", hook.subject),
        _ => hook.subject.clone(),
    };
    if published.starts_with(RESERVED_SUBJECTS) {
        return Err(format!(
            "subject {:?} is under {RESERVED_SUBJECTS}, which taskfactory announces on",
            hook.subject
        ));
    }
    if hook.secrets.is_empty() {
        return Err("no secret: set secretEnv (or secret, for development)".to_owned());
    }
    for secret in &hook.secrets {
        if let Some(problem) = hook.provider.secret_error(secret) {
            return Err(problem);
        }
    }
    if let Some(limit) = hook.max_body_bytes
        && (limit == 0 || limit > max_event_bytes)
    {
        return Err(format!(
            "maxBodyBytes {limit} must be between 1 and --max-event-bytes ({max_event_bytes}), \
             or event ingress would reject what the hook takes in"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Signatures (pure)

/// The hex HMAC-SHA256 a taskfactory sender puts after `v1=`.
pub fn sign(secret: &[u8], timestamp: &str, delivery: &str, body: &[u8]) -> String {
    let signed = providers::sign(
        Provider::Taskfactory,
        &Secret::new(secret),
        &taskfactory_claim(timestamp, delivery, Vec::new()),
        body,
    );
    signed.trim_start_matches("v1=").to_owned()
}

fn taskfactory_claim(timestamp: &str, delivery: &str, signatures: Vec<Vec<u8>>) -> Claim {
    Claim {
        delivery: Some(delivery.to_owned()),
        timestamp: Some((timestamp.to_owned(), 0)),
        signatures,
        event: None,
    }
}

/// Whether any of `signatures` is the HMAC of a taskfactory delivery under any of `secrets`.
/// Each comparison takes the same time wherever the bytes differ.
pub fn verify(
    secrets: &[Secret],
    timestamp: &str,
    delivery: &str,
    body: &[u8],
    signatures: &[Vec<u8>],
) -> bool {
    providers::verify(
        Provider::Taskfactory,
        secrets,
        &taskfactory_claim(timestamp, delivery, signatures.to_vec()),
        body,
    )
}

/// The `v1=` values of a `Taskfactory-Signature` header, decoded; values of other schemes are
/// ignored (room for a `v2`).
pub fn parse_signatures(header: &str) -> Result<Vec<Vec<u8>>, &'static str> {
    let parts: Vec<&str> = header.split(',').map(str::trim).collect();
    if parts.len() > MAX_SIGNATURES {
        return Err("more than 8 signatures");
    }
    let mut signatures = Vec::new();
    for part in parts {
        if let Some(value) = part.strip_prefix("v1=") {
            signatures.push(providers::hex_mac(value).ok_or("a v1= signature is 64 hex digits")?);
        }
    }
    if signatures.is_empty() {
        return Err("no v1= signature");
    }
    Ok(signatures)
}

/// Checks a delivery id: 1 to 128 of `A-Za-z0-9._:-`.
pub fn check_delivery_id(id: &str) -> Result<(), &'static str> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DELIVERY_ID_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err("1 to 128 of A-Za-z0-9._:-")
    }
}

/// Parses a timestamp header: unix seconds, digits only.
pub fn parse_timestamp(text: &str) -> Result<i64, &'static str> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("unix seconds, digits only");
    }
    text.parse().map_err(|_| "unix seconds, digits only")
}

/// Whether a timestamp is within [`TIMESTAMP_TOLERANCE`] of `now` (both in unix seconds).
pub fn within_window(timestamp: i64, now: i64) -> bool {
    (now - timestamp).unsigned_abs() <= TIMESTAMP_TOLERANCE.as_secs()
}

// ---------------------------------------------------------------------------------------------
// Serving

/// The gateway, bound to its address and ready to serve.
pub struct Gateway {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    hooks: Vec<Hook>,
    default_max_body: usize,
    limits: HttpLimits,
    drain_timeout: Duration,
}

impl Gateway {
    /// Loads and checks the hooks of `config` and binds `--http-addr`; `None` when no hook is
    /// configured (then nothing listens, so replicas and tests without hooks need no port).
    pub async fn bind(config: &crate::Config) -> anyhow::Result<Option<Self>> {
        config.http_limits.check(config.max_event_bytes)?;
        let hooks = load_hooks(
            config.webhooks.as_deref(),
            &config.hooks,
            config.max_event_bytes,
        )?;
        if hooks.is_empty() {
            return Ok(None);
        }
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the webhook gateway to {}", config.http_addr))?;
        Ok(Some(Self {
            listener,
            addr: config.http_addr,
            hooks,
            default_max_body: config.max_event_bytes,
            limits: config.http_limits.clone(),
            drain_timeout: config.lifecycle.drain_timeout,
        }))
    }

    /// Serves until `shutdown` (then answers the requests in hand), and prunes old delivery ids.
    pub fn spawn(
        self,
        tracker: &TaskTracker,
        pool: PgPool,
        js: async_nats::jetstream::Context,
        shutdown: CancellationToken,
    ) {
        let names: Vec<&str> = self.hooks.iter().map(|h| h.name.as_str()).collect();

        tracing::info!(addr = %self.addr, hooks = ?names, "webhook gateway listening on /hooks/{{name}}");
        let state = Arc::new(Receiver {
            hooks: self
                .hooks
                .into_iter()
                .map(|hook| (hook.name.clone(), hook))
                .collect(),
            default_max_body: self.default_max_body,
            body_timeout: self.limits.body_timeout,
            bodies: Arc::new(Semaphore::new(
                self.limits.body_bytes_in_flight.min(Semaphore::MAX_PERMITS),
            )),
            pool: pool.clone(),
            js,
        });
        let app = axum::Router::new()
            .route("/hooks/{name}", axum::routing::post(receive))
            .with_state(state);
        tracker.spawn(connections::serve(
            self.listener,
            app,
            self.limits,
            shutdown.clone(),
            self.drain_timeout,
        ));
        tracker.spawn(prune_deliveries(pool, shutdown));
    }
}

/// What a request handler needs.
struct Receiver {
    hooks: HashMap<String, Hook>,
    default_max_body: usize,
    /// From the end of the head to the last byte of the body, waiting for room included.
    body_timeout: Duration,
    /// Bytes of bodies held at once (`--http-body-bytes-in-flight`).
    bodies: Arc<Semaphore>,
    pool: PgPool,
    js: async_nats::jetstream::Context,
}

/// Why a delivery is refused. The message is what the sender reads: it says what is wrong, never
/// how close a signature came.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("no webhook named {0:?}")]
    UnknownHook(String),
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("malformed {header} header: {why}")]
    MalformedHeader {
        header: &'static str,
        why: &'static str,
    },
    #[error("{HEADER_TIMESTAMP} is more than 5 minutes away from the receiver's clock")]
    Stale,
    #[error("body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body and headers are over the {max_payload} bytes the NATS server takes")]
    OverMaxPayload { max_payload: usize },
    #[error("could not read the request body")]
    Unreadable,
    #[error("the body did not arrive within {0:?}")]
    SlowBody(Duration),
    #[error("the gateway holds as many bodies as it may; send the same delivery again later")]
    Busy,
    #[error("signature does not match")]
    BadSignature,
    #[error("{0}")]
    NotJson(String),
    #[error("delivery {0:?} was already received")]
    Replayed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the event could not be stored; send the same delivery again later")]
    Unavailable(#[source] anyhow::Error),
}

impl Rejection {
    fn status(&self) -> StatusCode {
        match self {
            Rejection::UnknownHook(_) => StatusCode::NOT_FOUND,
            Rejection::MissingHeader(_)
            | Rejection::MalformedHeader { .. }
            | Rejection::Stale
            | Rejection::BadSignature
            | Rejection::Replayed(_) => StatusCode::UNAUTHORIZED,
            Rejection::TooLarge { .. } | Rejection::OverMaxPayload { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Rejection::Unreadable
            | Rejection::SlowBody(_)
            | Rejection::NotJson(_)
            | Rejection::Invalid(_) => StatusCode::BAD_REQUEST,
            Rejection::Unavailable(_) | Rejection::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The metric label.
    fn outcome(&self) -> &'static str {
        match self {
            Rejection::UnknownHook(_) => "unknown_hook",
            Rejection::MissingHeader(_)
            | Rejection::MalformedHeader { .. }
            | Rejection::BadSignature => "unauthorized",
            Rejection::Stale => "stale",
            Rejection::Replayed(_) => "replayed",
            Rejection::TooLarge { .. } | Rejection::OverMaxPayload { .. } => "too_large",
            Rejection::Unreadable
            | Rejection::SlowBody(_)
            | Rejection::NotJson(_)
            | Rejection::Invalid(_) => "bad_request",
            Rejection::Unavailable(_) => "unavailable",
            Rejection::Busy => "busy",
        }
    }
}

/// A published delivery, or one received before (`repeated`: nothing published again).
struct Accepted {
    delivery: String,
    subject: String,
    sequence: u64,
    duplicate: bool,
    repeated: bool,
}

/// How a delivery was taken.
enum Taken {
    Accepted(Accepted),
    /// Slack's `url_verification`: its challenge, answered back.
    Challenge(String),
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A delivery sent inside the sender's trace continues it (W3C `traceparent`).
    let span = tracing::info_span!(
        "webhook",
        otel.name = "POST /hooks/{name}",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/hooks/{name}",
        http.response.status_code = tracing::field::Empty,
        webhook.name = %name,
        webhook.outcome = tracing::field::Empty,
    );
    taskfactory_runtime::propagation::set_parent(
        &span,
        taskfactory_runtime::propagation::extract_http(&headers),
    );
    let result = receiver
        .accept(&name, &headers, body)
        .instrument(span.clone())
        .await;
    let outcome = match &result {
        Ok(Taken::Accepted(accepted)) if accepted.repeated => "duplicate",
        Ok(Taken::Accepted(_)) => "accepted",
        Ok(Taken::Challenge(_)) => "challenge",
        Err(rejection) => rejection.outcome(),
    };
    span.record("webhook.outcome", outcome);
    match &result {
        Ok(Taken::Accepted(accepted)) if !accepted.repeated => {
            span.record("http.response.status_code", StatusCode::ACCEPTED.as_u16())
        }
        Ok(_) => span.record("http.response.status_code", StatusCode::OK.as_u16()),
        Err(rejection) => {
            // HTTP server conventions: a refusal of the sender's request (4xx) is not our error.
            if rejection.status().is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
            span.record("http.response.status_code", rejection.status().as_u16())
        }
    };
    let _entered = span.enter();
    taskfactory_runtime::metrics::record_webhook_delivery(outcome);
    match result {
        Ok(Taken::Accepted(accepted)) if accepted.repeated => {
            tracing::info!(webhook.name = %name, webhook.delivery = %accepted.delivery, "webhook delivery received again; already taken");
            let body = serde_json::json!({
                "deliveryId": accepted.delivery,
                "duplicate": true,
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(Taken::Accepted(accepted)) => {
            tracing::info!(webhook.name = %name, webhook.delivery = %accepted.delivery, subject = %accepted.subject, stream.sequence = accepted.sequence, duplicate = accepted.duplicate, "webhook delivery accepted");
            let body = serde_json::json!({
                "deliveryId": accepted.delivery,
                "subject": accepted.subject,
                "sequence": accepted.sequence,
            });
            (StatusCode::ACCEPTED, axum::Json(body)).into_response()
        }
        Ok(Taken::Challenge(challenge)) => {
            tracing::info!(webhook.name = %name, "webhook url_verification answered");
            let body = serde_json::json!({ "challenge": challenge });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(rejection) => {
            let id_header = receiver
                .hooks
                .get(&name)
                .map_or(Some(HEADER_DELIVERY), |hook| {
                    hook.provider.delivery_header()
                });
            let delivery = id_header
                .and_then(|id| headers.get(id))
                .and_then(|v| v.to_str().ok())
                .filter(|id| check_delivery_id(id).is_ok())
                .unwrap_or_default();
            let body = axum::Json(serde_json::json!({ "error": rejection.to_string() }));
            let status = rejection.status();
            if let Rejection::Unavailable(source) = &rejection {
                tracing::warn!(webhook.name = ?name, webhook.delivery = %delivery, error = %error_chain(source.as_ref()), "webhook delivery not stored; the sender may retry");
                return (status, [(header::RETRY_AFTER, "5")], body).into_response();
            }
            if let Rejection::Busy = &rejection {
                tracing::warn!(webhook.name = ?name, webhook.delivery = %delivery, "webhook delivery turned away: no room for its body in time");
                return (status, [(header::RETRY_AFTER, "5")], body).into_response();
            }
            tracing::warn!(webhook.name = ?name, webhook.delivery = %delivery, outcome, reason = %rejection, "webhook delivery rejected");
            (status, body).into_response()
        }
    }
}

impl Receiver {
    async fn accept(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Taken, Rejection> {
        let hook = self
            .hooks
            .get(name)
            .ok_or_else(|| Rejection::UnknownHook(name.to_owned()))?;
        let claim = providers::claim(hook.provider, headers)?;
        if let Some((_, timestamp)) = claim.timestamp
            && !within_window(timestamp, chrono::Utc::now().timestamp())
        {
            return Err(Rejection::Stale);
        }

        let limit = hook.max_body_bytes.unwrap_or(self.default_max_body);
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(Rejection::TooLarge { limit });
        }
        // Held until the body is published and dropped.
        let (body, _room) = self.read_body(body, declared, limit).await?;

        if !providers::verify(hook.provider, &hook.secrets, &claim, &body) {
            return Err(Rejection::BadSignature);
        }
        let signed = body.clone();
        let body = match hook.provider {
            Provider::Github => {
                providers::github_form_payload(headers, &body).unwrap_or(Ok(body))?
            }
            _ => body,
        };
        crate::events::check_event(&body, limit).map_err(Rejection::NotJson)?;
        match providers::identify(hook.provider, &hook.subject, &claim, &body)? {
            Identified::Challenge(challenge) => Ok(Taken::Challenge(challenge)),
            Identified::Event { delivery, subject } => {
                let keys = providers::delivery_keys(hook.provider, &delivery, &signed);
                drop(signed);
                self.record_and_publish(hook, &delivery, &keys, &subject, body)
                    .await
                    .map(Taken::Accepted)
            }
        }
    }

    /// Records the delivery id and publishes the event in one transaction (see the module doc).
    async fn record_and_publish(
        &self,
        hook: &Hook,
        delivery: &str,
        keys: &[String],
        subject: &str,
        body: Bytes,
    ) -> Result<Accepted, Rejection> {
        let unavailable = |e: anyhow::Error| Rejection::Unavailable(e);
        let mut tx =
            self.pool.begin().await.map_err(|e| {
                unavailable(anyhow::Error::new(e).context("starting a transaction"))
            })?;
        // Every key new, or the delivery was taken before (the transaction, dropped, rolls back).
        let inserted = sqlx::query(
            "INSERT INTO webhook_deliveries (hook, delivery_id, expires_at) \
             SELECT $1, key, now() + make_interval(secs => $3) FROM unnest($2::text[]) AS key \
             ON CONFLICT DO NOTHING",
        )
        .bind(&hook.name)
        .bind(keys)
        .bind(hook.provider.delivery_retention().as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable(anyhow::Error::new(e).context("recording the delivery")))?
        .rows_affected();
        if inserted < keys.len() as u64 {
            if hook.provider.answers_duplicates() {
                return Ok(Accepted {
                    delivery: delivery.to_owned(),
                    subject: subject.to_owned(),
                    sequence: 0,
                    duplicate: true,
                    repeated: true,
                });
            }
            return Err(Rejection::Replayed(delivery.to_owned()));
        }

        let mut nats_headers = async_nats::HeaderMap::new();
        nats_headers.insert(HEADER_SOURCE, SOURCE_WEBHOOK);
        nats_headers.insert(HEADER_HOOK, hook.name.as_str());
        let msg_id = format!("webhook:{}:{delivery}", hook.name);
        let publish = async {
            messaging::publish(
                &self.js,
                subject.to_owned(),
                &msg_id,
                Some(nats_headers),
                body,
            )
            .await?
            .await
        };
        let ack = match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(ack)) => ack,
            // Permanent: a retry would fail the same way, so not a 503.
            Ok(Err(error)) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
                return Err(Rejection::OverMaxPayload {
                    max_payload: self.js.client().server_info().max_payload,
                });
            }
            Ok(Err(error)) => {
                return Err(unavailable(
                    anyhow::Error::new(error).context("publishing the event"),
                ));
            }
            Err(_) => {
                return Err(unavailable(anyhow::anyhow!(
                    "no ack from the stream within {PUBLISH_TIMEOUT:?}"
                )));
            }
        };
        // A failed commit after the publish is safe to answer with 503: the retry's publish
        // carries the same Nats-Msg-Id (see the module doc).
        tx.commit()
            .await
            .map_err(|e| unavailable(anyhow::Error::new(e).context("committing the delivery")))?;
        Ok(Accepted {
            delivery: delivery.to_owned(),
            subject: subject.to_owned(),
            sequence: ack.sequence,
            duplicate: ack.duplicate,
            repeated: false,
        })
    }
}

fn required_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Rejection> {
    let value = headers.get(name).ok_or(Rejection::MissingHeader(name))?;
    value.to_str().map_err(|_| Rejection::MalformedHeader {
        header: name,
        why: "not visible ASCII",
    })
}

impl Receiver {
    /// Sets aside room for the body among those held at once (`declared` bytes, else `limit`)
    /// and reads it, refusing it as soon as it grows over `limit`; both within the body timeout.
    /// The room is given back when the returned permit is dropped.
    async fn read_body(
        &self,
        body: Body,
        declared: Option<u64>,
        limit: usize,
    ) -> Result<(Bytes, OwnedSemaphorePermit), Rejection> {
        let deadline = tokio::time::Instant::now() + self.body_timeout;
        let room = declared.map_or(limit, |length| usize::try_from(length).unwrap_or(limit));
        let permits = u32::try_from(room.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let permit =
            tokio::time::timeout_at(deadline, self.bodies.clone().acquire_many_owned(permits))
                .await
                .map_err(|_| Rejection::Busy)?
                .expect("the semaphore is never closed");
        let mut chunks = body.into_data_stream();
        // Never more than was set aside: no doubling past it.
        let mut buffer = Vec::with_capacity(if declared.is_some() { room } else { 0 });
        let read = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|_| Rejection::Unreadable)?;
                let needed = buffer.len() + chunk.len();
                if needed > limit {
                    return Err(Rejection::TooLarge { limit });
                }
                if needed > buffer.capacity() {
                    let target = needed.max(buffer.capacity() * 2).min(room.max(needed));
                    buffer.reserve_exact(target - buffer.len());
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(())
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(())) => Ok((Bytes::from(buffer), permit)),
            Ok(Err(rejection)) => Err(rejection),
            Err(_) => Err(Rejection::SlowBody(self.body_timeout)),
        }
    }
}

/// Forgets the delivery ids past their expiry (set when each was taken in, by its hook's
/// provider), every minute, until `shutdown`. Every replica does it; the deletes are idempotent.
async fn prune_deliveries(pool: PgPool, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
        match prune_expired(&pool).await {
            Ok(0) => {}
            Ok(rows) => tracing::debug!(rows, "pruned expired webhook delivery ids"),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot prune webhook delivery ids; will try again");
            }
        }
    }
}

/// Deletes the delivery ids past their expiry; how many.
pub async fn prune_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM webhook_deliveries WHERE expires_at < now()")
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn signed(secret: &str, timestamp: &str, delivery: &str, body: &[u8]) -> Vec<Vec<u8>> {
        parse_signatures(&format!(
            "v1={}",
            sign(secret.as_bytes(), timestamp, delivery, body)
        ))
        .unwrap()
    }

    #[test]
    fn signature_matches_an_independent_hmac() {
        // printf '%s' '1700000000.d-1.{"a":1}' | openssl dgst -sha256 -hmac "$SECRET"
        assert_eq!(
            sign(SECRET.as_bytes(), "1700000000", "d-1", br#"{"a":1}"#),
            "6ffd3876b1f01ed78be7d2e9e39bdd6128eb5183133e7274802fc0be4a029d2d"
        );
    }

    #[test]
    fn only_the_exact_delivery_verifies() {
        let secrets = [Secret::new(SECRET)];
        let body = br#"{"order": 1}"#;
        let good = signed(SECRET, "1700000000", "d-1", body);
        assert!(verify(&secrets, "1700000000", "d-1", body, &good));

        let wrong_secret = signed("another secret, long enough", "1700000000", "d-1", body);
        assert!(!verify(&secrets, "1700000000", "d-1", body, &wrong_secret));
        let mut flipped = body.to_vec();
        flipped[3] ^= 0x01;
        assert!(!verify(&secrets, "1700000000", "d-1", &flipped, &good));
        assert!(
            !verify(&secrets, "1700000000", "d-2", body, &good),
            "the delivery id is signed"
        );
        assert!(
            !verify(&secrets, "1700000001", "d-1", body, &good),
            "the timestamp is signed"
        );
        let mut tampered = good.clone();
        tampered[0][31] ^= 0x80;
        assert!(!verify(&secrets, "1700000000", "d-1", body, &tampered));
    }

    #[test]
    fn rotation_accepts_any_listed_signature_under_any_configured_secret() {
        let old = "the old secret, 16+ bytes";
        let body = b"{}";
        let header = format!(
            "v1={}, v1={}",
            sign(b"unrelated secret value", "1", "d", body),
            sign(old.as_bytes(), "1", "d", body)
        );
        let signatures = parse_signatures(&header).unwrap();
        assert_eq!(signatures.len(), 2);
        assert!(verify(
            &[Secret::new(SECRET), Secret::new(old)],
            "1",
            "d",
            body,
            &signatures
        ));
        assert!(!verify(&[Secret::new(SECRET)], "1", "d", body, &signatures));
    }

    #[test]
    fn signature_headers_are_parsed_strictly() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_signatures(&format!("v1={hex}")).unwrap().len(), 1);
        assert_eq!(
            parse_signatures(&format!("v0=whatever,v1={}", hex.to_uppercase()))
                .unwrap()
                .len(),
            1,
            "other schemes are ignored; hex in either case"
        );
        assert_eq!(parse_signatures("v0=abc").unwrap_err(), "no v1= signature");
        assert_eq!(parse_signatures("").unwrap_err(), "no v1= signature");
        assert!(parse_signatures("v1=abc").is_err());
        assert!(parse_signatures(&format!("v1={}", "zz".repeat(32))).is_err());
        let many = vec![format!("v1={hex}"); 9].join(",");
        assert!(parse_signatures(&many).is_err());
    }

    #[test]
    fn delivery_ids_and_timestamps_are_checked() {
        assert!(check_delivery_id("gh-123:abc_DEF.4").is_ok());
        assert!(check_delivery_id(&"a".repeat(128)).is_ok());
        assert!(check_delivery_id(&"a".repeat(129)).is_err());
        assert!(check_delivery_id("").is_err());
        assert!(check_delivery_id("a b").is_err());
        assert!(check_delivery_id("a/b").is_err());
        assert_eq!(parse_timestamp("1700000000"), Ok(1_700_000_000));
        assert!(parse_timestamp("-5").is_err());
        assert!(parse_timestamp("+5").is_err());
        assert!(parse_timestamp(" 5").is_err());
        assert!(parse_timestamp("1.5").is_err());
        assert!(parse_timestamp("9999999999999").is_err());
        assert!(within_window(1000, 1300));
        assert!(within_window(1300, 1000));
        assert!(!within_window(1000, 1301));
        assert!(!within_window(1301, 1000));
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "GOOD" => Some(SECRET.to_owned()),
            "OLD" => Some("the previous secret value".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Vec<Hook>, String> {
        parse_hooks_file(text, &env, 1024 * 1024)
    }

    #[test]
    fn hooks_files_load_in_yaml_and_json() {
        let hooks = parse(
            "hooks:\n  - {name: github, subject: events.github.push, secretEnv: GOOD}\n  - name: dev\n    subject: events.dev\n    secret: a development secret\n    maxBodyBytes: 4096\n  - {name: rotating, subject: events.r, secretEnv: [GOOD, OLD]}\n",
        )
        .unwrap();
        assert_eq!(hooks.len(), 3);
        assert_eq!(hooks[0].secrets[0].bytes(), SECRET.as_bytes());
        assert_eq!(hooks[1].max_body_bytes, Some(4096));
        assert_eq!(hooks[2].secrets.len(), 2);
        let json =
            parse(r#"{"hooks": [{"name": "a", "subject": "events.a", "secretEnv": "GOOD"}]}"#)
                .unwrap();
        assert_eq!(json[0].subject, "events.a");
        assert!(parse("hooks: []").unwrap().is_empty());
    }

    #[test]
    fn bad_hooks_are_named_with_what_is_wrong() {
        let problem = |entry: &str| {
            parse(&format!(
                "hooks:\n  - {{name: ok, subject: events.ok, secretEnv: GOOD}}\n  - {entry}\n"
            ))
            .unwrap_err()
        };
        let error = problem("{name: Bad Name, subject: events.x, secretEnv: GOOD}");
        assert!(
            error.starts_with(r#"hooks[1] ("Bad Name"): name must be"#),
            "{error}"
        );
        let error = problem("{name: x, subject: 'events.*', secretEnv: GOOD}");
        assert!(
            error.contains("hooks[1]") && error.contains("wildcards"),
            "{error}"
        );
        let error = problem("{name: x, subject: orders.created, secretEnv: GOOD}");
        assert!(error.contains("must be under events."), "{error}");
        let error =
            problem("{name: x, subject: events.taskfactory.run.completed, secretEnv: GOOD}");
        assert!(error.contains("announces"), "{error}");
        let error = problem("{name: x, subject: events.x, secretEnv: NOPE}");
        assert!(error.contains("secretEnv NOPE is not set"), "{error}");
        let error = problem("{name: x, subject: events.x, secretEnv: EMPTY}");
        assert!(error.contains("secretEnv EMPTY is empty"), "{error}");
        let error = problem("{name: x, subject: events.x, secret: short}");
        assert!(error.contains("at least 16"), "{error}");
        let error = problem("{name: x, subject: events.x}");
        assert!(error.contains("no secret"), "{error}");
        let error = problem("{name: x, subject: events.x, secretEnv: GOOD, maxBodyBytes: 2000000}");
        assert!(error.contains("maxBodyBytes 2000000"), "{error}");
        let error = problem("{name: x, subject: events.x, secretEnv: GOOD, secrt: y}");
        assert!(
            error.contains("hooks[1]") && error.contains("secrt"),
            "{error}"
        );
    }

    #[test]
    fn hook_names_are_unique_and_secrets_never_printed() {
        let hook = Hook::new("a", "events.a", SECRET);
        let error = load_hooks(None, &[hook.clone(), hook.clone()], 1024).unwrap_err();
        assert!(error.to_string().contains("configured twice"), "{error}");
        assert!(!format!("{hook:?}").contains(SECRET));
        let error = load_hooks(None, &[Hook::new("a", "events.a", "short")], 1024).unwrap_err();
        assert!(error.to_string().starts_with(r#"webhook "a": "#), "{error}");
    }
}

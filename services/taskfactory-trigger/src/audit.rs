//! The audit log (`audit_events`, append-only): one row per admin call that changes something or
//! could (`PreviewRun` runs context sources), carried out or refused, with who, what, the
//! versions before and after, the idempotency key, the outcome and the trace.
//!
//! A handler fills an [`AuditEntry`] as it learns about its target and records it once the
//! outcome is known ([`record`]); the auth layer records the calls it refuses. A row that cannot be
//! written is logged as an error with everything it held and counted
//! (`taskfactory_audit_write_failures_total`): the call's own effect is already committed by then.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use taskfactory_model::access::Principal;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::spec::chrono_to_timestamp;
use taskfactory_model::values;
use taskfactory_proto::v1::AuditEvent;

/// One audit row in the making.
#[derive(Clone, Debug, Default)]
pub struct AuditEntry {
    pub principal: String,
    pub auth_method: &'static str,
    pub grants: Vec<String>,
    pub rpc: &'static str,
    pub target_kind: &'static str,
    pub target_id: String,
    pub activity_id: Option<ActivityId>,
    pub activity_name: String,
    pub version_before: Option<u32>,
    pub version_after: Option<u32>,
    pub idempotency_key: String,
    /// `OK`, or the gRPC code the call ended with.
    pub outcome: String,
    pub error: String,
    /// The trace the call belongs to: the exported one, else the caller's own (`traceparent`).
    pub trace_id: String,
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl AuditEntry {
    pub fn new(principal: &Principal, rpc: &'static str) -> Self {
        Self {
            principal: principal.subject.clone(),
            auth_method: principal.method.name(),
            grants: principal.grant_names(),
            rpc,
            trace_id: taskfactory_runtime::propagation::current_trace_id().unwrap_or_default(),
            ..Self::default()
        }
    }

    /// Takes the caller's trace id from its `traceparent` when no exported trace has one.
    pub fn caller_trace(&mut self, traceparent: Option<&str>) {
        if !self.trace_id.is_empty() {
            return;
        }
        let Some(traceparent) = traceparent else {
            return;
        };
        // version-traceid-spanid-flags; only a well-formed, non-zero id is kept.
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        if let [_, trace, _, _] = parts.as_slice()
            && trace.len() == 32
            && trace
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && trace.chars().any(|c| c != '0')
        {
            self.trace_id = (*trace).to_owned();
        }
    }

    /// The activity the call is about.
    pub fn activity(&mut self, id: ActivityId, name: &str) {
        self.target_kind = "activity";
        self.target_id = id.to_string();
        self.activity_id = Some(id);
        self.activity_name = name.to_owned();
    }

    /// A run or task the call is about, and its activity when known.
    pub fn target(&mut self, kind: &'static str, id: &str) {
        self.target_kind = kind;
        self.target_id = id.to_owned();
    }

    pub fn detail(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.details.insert(key.to_owned(), value.into());
    }

    /// Sets the outcome from the call's result.
    pub fn outcome<T>(&mut self, result: &Result<T, tonic::Status>) {
        match result {
            Ok(_) => self.outcome = "OK".to_owned(),
            Err(status) => {
                self.outcome = code_name(status.code()).to_owned();
                self.error = status.message().to_owned();
            }
        }
    }
}

/// The spelling of a gRPC code in the audit log (as in the gRPC specification).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn storable(mut text: String) -> String {
    values::make_storable_text(&mut text);
    text
}

/// Writes the row (retrying a failed write a few times: the call is already carried out). Owns
/// its arguments so that it can run in a task of its own.
pub async fn record(pool: PgPool, entry: AuditEntry) {
    let mut details = serde_json::Value::Object(entry.details.clone());
    values::make_storable_json(&mut details);
    let mut delay = std::time::Duration::from_millis(50);
    for attempt in 1..=4 {
        let written = sqlx::query(
            "INSERT INTO audit_events (principal, auth_method, grants, rpc, target_kind, target_id, \
                 activity_id, activity_name, version_before, version_after, idempotency_key, \
                 outcome, error, trace_id, details) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(storable(entry.principal.clone()))
        .bind(entry.auth_method)
        .bind(&entry.grants)
        .bind(entry.rpc)
        .bind(entry.target_kind)
        .bind(storable(entry.target_id.clone()))
        .bind(entry.activity_id.map(|id| id.0))
        .bind(&entry.activity_name)
        .bind(entry.version_before.and_then(|v| i32::try_from(v).ok()))
        .bind(entry.version_after.and_then(|v| i32::try_from(v).ok()))
        .bind(storable(entry.idempotency_key.clone()))
        .bind(&entry.outcome)
        .bind(storable(entry.error.clone()))
        .bind(&entry.trace_id)
        .bind(&details)
        .execute(&pool)
        .await;
        match written {
            Ok(_) => return,
            Err(error) if attempt < 4 => {
                tracing::warn!(error = %error, attempt, "cannot write an audit row yet; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(error) => {
                taskfactory_runtime::metrics::count_audit_write_failure();
                tracing::error!(
                    error = %error,
                    audit.principal = %entry.principal,
                    audit.rpc = entry.rpc,
                    audit.target = %entry.target_id,
                    audit.activity = %entry.activity_name,
                    audit.outcome = %entry.outcome,
                    audit.version_before = ?entry.version_before,
                    audit.version_after = ?entry.version_after,
                    "audit row lost: the database did not take it"
                );
            }
        }
    }
}

/// What `ListAuditEvents` asks for.
#[derive(Debug, Default)]
pub struct AuditQuery {
    pub principal: Option<String>,
    pub rpc: Option<String>,
    pub activity_id: Option<ActivityId>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    /// Rows older than this id (the page token).
    pub before_id: Option<i64>,
    /// Only rows about these activities (a scoped admin); `None` = all rows.
    pub activities: Option<Vec<uuid::Uuid>>,
    pub limit: i64,
}

/// Audit rows, newest first, and the id to continue before when more follow.
pub async fn list(
    pool: &PgPool,
    query: &AuditQuery,
) -> Result<(Vec<AuditEvent>, Option<i64>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at, principal, auth_method, grants, rpc, target_kind, target_id, activity_id, \
             activity_name, version_before, version_after, idempotency_key, outcome, error, \
             trace_id, details \
         FROM audit_events \
         WHERE ($1::text IS NULL OR principal = $1) \
           AND ($2::text IS NULL OR rpc = $2) \
           AND ($3::uuid IS NULL OR activity_id = $3) \
           AND ($4::timestamptz IS NULL OR at >= $4) \
           AND ($5::timestamptz IS NULL OR at < $5) \
           AND ($6::bigint IS NULL OR id < $6) \
           AND ($7::uuid[] IS NULL OR activity_id = ANY($7)) \
         ORDER BY id DESC LIMIT $8",
    )
    .persistent(false)
    .bind(&query.principal)
    .bind(&query.rpc)
    .bind(query.activity_id.map(|id| id.0))
    .bind(query.start)
    .bind(query.end)
    .bind(query.before_id)
    .bind(&query.activities)
    .bind(query.limit + 1)
    .fetch_all(pool)
    .await?;
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    let mut events = Vec::with_capacity(rows.len().min(limit));
    for row in rows.iter().take(limit) {
        let details: serde_json::Value = row.try_get("details")?;
        let version = |column: &str| -> Result<u32, sqlx::Error> {
            Ok(row
                .try_get::<Option<i32>, _>(column)?
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0))
        };
        events.push(AuditEvent {
            id: row.try_get("id")?,
            at: Some(chrono_to_timestamp(row.try_get("at")?)),
            principal: row.try_get("principal")?,
            auth_method: row.try_get("auth_method")?,
            grants: row.try_get("grants")?,
            rpc: row.try_get("rpc")?,
            target_kind: row.try_get("target_kind")?,
            target_id: row.try_get("target_id")?,
            activity_id: row
                .try_get::<Option<uuid::Uuid>, _>("activity_id")?
                .map(|id| id.to_string())
                .unwrap_or_default(),
            activity_name: row.try_get("activity_name")?,
            version_before: version("version_before")?,
            version_after: version("version_after")?,
            idempotency_key: row.try_get("idempotency_key")?,
            outcome: row.try_get("outcome")?,
            error: row.try_get("error")?,
            trace_id: row.try_get("trace_id")?,
            details: Some(values::json_to_struct(&details)),
        });
    }
    let next = if more {
        events.last().map(|e| e.id)
    } else {
        None
    };
    Ok((events, next))
}

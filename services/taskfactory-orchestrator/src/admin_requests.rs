//! Only the admin API's requests are carried out. The trigger records each request it sends on
//! `taskfactory.internal.commands` and `taskfactory.internal.preview` in `admin_requests` (id,
//! SHA-256 of the body, who asked) and names the id in the `Taskfactory-Admin-Request` header;
//! here a request is carried out only if that row exists, its hash is the body's, it is at most
//! [`FRESH`] old, and it was not carried out before (`admin_requests_used`, ours). Anything else
//! on those subjects — a forged `complete` of a human task, a preview that would run context
//! sources — is refused, logged and counted, however wide the deployment's NATS permissions are.

use async_nats::HeaderMap;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use taskfactory_model::subjects;
use uuid::Uuid;

/// How old a recorded request may be when it arrives (the admin API waits at most a minute).
const FRESH: &str = "5 minutes";
/// How long the ids carried out are remembered: longer than a request stays fresh.
const KEEP_USED: &str = "1 hour";

/// Why a request was not carried out: a bounded label, and what the log and the caller are told.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

fn refused(reason: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        reason,
        message: message.into(),
    }
}

/// Checks a request before it is carried out, and marks it carried out.
pub async fn admit(
    pool: &PgPool,
    kind: &'static str,
    headers: Option<&HeaderMap>,
    body: &[u8],
) -> Result<(), Refused> {
    let outcome = check(pool, headers, body).await;
    if let Err(refusal) = &outcome {
        taskfactory_runtime::metrics::record_refused(kind, refusal.reason);
        tracing::warn!(
            request.kind = kind,
            reason = refusal.reason,
            "request on an internal subject refused: {}",
            refusal.message
        );
    }
    outcome
}

async fn check(pool: &PgPool, headers: Option<&HeaderMap>, body: &[u8]) -> Result<(), Refused> {
    let Some(id) = headers
        .and_then(|h| h.get(subjects::HEADER_ADMIN_REQUEST))
        .map(|v| v.as_str().to_owned())
    else {
        return Err(refused(
            "not_recorded",
            "not a request of the admin API (no Taskfactory-Admin-Request header)",
        ));
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return Err(refused("not_recorded", "the request id is not a UUID"));
    };
    let hash = Sha256::digest(body).to_vec();
    let (recorded, first_use): (bool, bool) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH expired AS (DELETE FROM admin_requests_used WHERE used_at < now() - interval '{KEEP_USED}'), \
              request AS (SELECT id FROM admin_requests \
                          WHERE id = $1 AND body_sha256 = $2 AND created_at > now() - interval '{FRESH}'), \
              used AS (INSERT INTO admin_requests_used (id) SELECT id FROM request \
                       ON CONFLICT DO NOTHING RETURNING id) \
         SELECT EXISTS (SELECT 1 FROM request), EXISTS (SELECT 1 FROM used)"
    )))
    .bind(id)
    .bind(&hash)
    .fetch_one(pool)
    .await
    .map_err(|e| {
        refused(
            "unverified",
            format!(
                "cannot check the request in the database: {}",
                taskfactory_runtime::telemetry::error_chain(&e)
            ),
        )
    })?;
    match (recorded, first_use) {
        (false, _) => Err(refused(
            "not_recorded",
            format!(
                "request {id} is not one the admin API recorded (or its body differs, or it is older than {FRESH})"
            ),
        )),
        (true, false) => Err(refused(
            "replayed",
            format!("request {id} was already carried out"),
        )),
        (true, true) => Ok(()),
    }
}

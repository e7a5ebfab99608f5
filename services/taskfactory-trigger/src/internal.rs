//! Requests the admin API sends an orchestrator (commands on runs and tasks, previews), over NATS
//! request/reply on `taskfactory.internal.*`. Each is first recorded in `admin_requests` (its id,
//! what it is, the SHA-256 of its body, who asked) and carries its id in the
//! `Taskfactory-Admin-Request` header; the orchestrator carries out only what is recorded there,
//! once, and fresh. So a message on those subjects from anyone but the admin API does nothing,
//! however wide the NATS permissions of the deployment are.

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use taskfactory_model::subjects;
use uuid::Uuid;

/// How long records are kept: far longer than an orchestrator may take to answer, which is as long
/// as it will take them.
const KEEP: &str = "1 hour";

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot record the request")]
    Record(#[source] sqlx::Error),
    #[error("no orchestrator answered within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("no orchestrator is available ({0})")]
    Unavailable(String),
}

/// Records the request, then sends it and waits for the answer.
pub async fn send(
    pool: &PgPool,
    nats: &async_nats::Client,
    subject: &'static str,
    op: &str,
    principal: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<async_nats::Message, RequestError> {
    let id = Uuid::new_v4();
    let hash = Sha256::digest(&body).to_vec();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH expired AS (DELETE FROM admin_requests WHERE created_at < now() - interval '{KEEP}') \
         INSERT INTO admin_requests (id, op, body_sha256, principal) VALUES ($1, $2, $3, $4)"
    )))
    .bind(id)
    .bind(op)
    .bind(&hash)
    .bind(principal)
    .execute(pool)
    .await
    .map_err(RequestError::Record)?;
    let mut headers = taskfactory_runtime::messaging::request_headers();
    headers.insert(subjects::HEADER_ADMIN_REQUEST, id.to_string().as_str());
    tokio::time::timeout(
        timeout,
        nats.send_request(
            subject,
            async_nats::Request::new()
                .headers(headers)
                .payload(body.into())
                .timeout(Some(timeout)),
        ),
    )
    .await
    .map_err(|_| RequestError::Timeout(timeout))?
    .map_err(|e| RequestError::Unavailable(e.to_string()))
}

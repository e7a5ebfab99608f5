//! The built-in task types.
//!
//! - `log` {anything}: logs the params; output `null`.
//! - `noop` {anything}: does nothing; output `null` (benchmarks, placeholder tasks).
//! - `http` {`url`, `method` (default POST), `headers`, `body` (JSON)}: sends the task id as
//!   `Idempotency-Key`; 2xx succeeds with the response JSON (or text) as output; 5xx, 429 and
//!   connection failures are retryable, other statuses are permanent. Egress follows the policy
//!   ([`taskfactory_model::egress`]), checked on resolved addresses and on every redirect. The
//!   task's `secretHeaders` are resolved here, from this executor's own secrets
//!   ([`taskfactory_runtime::secrets`]), only for the hosts each is bound to, over a client that
//!   follows no redirect to another origin; the orchestrator never sees their values.
//! - `publish` {`subject`, `payload`}: publishes the payload as JSON — through JetStream with
//!   `Nats-Msg-Id` = task id when a stream covers the subject (so a retried task does not publish
//!   twice), else as a core NATS message. This is how activities chain.

use std::collections::HashMap;
use std::sync::Arc;

use taskfactory_model::egress::EgressPolicy;
use taskfactory_model::subjects;
use taskfactory_proto::v1::SecretRef;
use taskfactory_runtime::secrets::Secrets;
use taskfactory_runtime::telemetry::error_chain;
use taskfactory_runtime::{egress, messaging};

/// The outcome of one attempt that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The other side asked to wait this long before trying again (HTTP `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

impl TaskFailure {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }
}

/// The longest `Retry-After` honoured (a longer one is capped: the task still tries again).
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Parses an HTTP `Retry-After`: delay seconds, or an HTTP date (relative to `now`).
pub fn parse_retry_after(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => std::time::Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

pub const BUILTIN_TYPES: [&str; 4] = ["log", "http", "publish", "noop"];

/// What the built-ins need.
pub struct Builtins {
    pub http: reqwest::Client,
    /// For requests that carry secrets: follows no redirect to another origin.
    pub http_with_secrets: reqwest::Client,
    pub secrets: Secrets,
    pub egress: Arc<EgressPolicy>,
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    pub max_response_bytes: usize,
}

impl Builtins {
    pub fn new(
        egress: EgressPolicy,
        secrets: Secrets,
        js: async_nats::jetstream::Context,
        nats: async_nats::Client,
    ) -> Result<Self, reqwest::Error> {
        let egress = Arc::new(egress);
        let user_agent = concat!("taskfactory-executor/", env!("CARGO_PKG_VERSION"));
        let http = egress::guarded_client(egress.clone(), user_agent)?;
        let http_with_secrets = egress::guarded_client_for_secrets(egress.clone(), user_agent)?;
        Ok(Self {
            http,
            http_with_secrets,
            secrets,
            egress,
            js,
            nats,
            max_response_bytes: 1024 * 1024,
        })
    }

    /// Runs one built-in task (`secret_headers` are the task's, for `http`). The caller enforces
    /// the timeout.
    pub async fn run(
        &self,
        task_type: &str,
        task_id: &str,
        params: &serde_json::Value,
        secret_headers: &HashMap<String, SecretRef>,
    ) -> Result<serde_json::Value, TaskFailure> {
        match task_type {
            "log" => {
                tracing::info!(task.id = %task_id, params = %params, "log task");
                Ok(serde_json::Value::Null)
            }
            // Does nothing: for benchmarks, and for activities that only need a run.
            "noop" => Ok(serde_json::Value::Null),
            "http" => self.http(task_id, params, secret_headers).await,
            "publish" => self.publish(task_id, params).await,
            other => Err(TaskFailure::permanent(format!(
                "task type {other:?} is not a built-in type of this executor"
            ))),
        }
    }

    async fn http(
        &self,
        task_id: &str,
        params: &serde_json::Value,
        secret_headers: &HashMap<String, SecretRef>,
    ) -> Result<serde_json::Value, TaskFailure> {
        let url = params
            .get("url")
            .and_then(|u| u.as_str())
            .ok_or_else(|| TaskFailure::permanent("params.url is required (a string)"))?;
        let url = reqwest::Url::parse(url)
            .map_err(|e| TaskFailure::permanent(format!("params.url {url:?} is not a URL: {e}")))?;
        egress::check_url(&self.egress, &url)
            .map_err(|reason| TaskFailure::permanent(format!("params.url: {reason}")))?;
        let method = params
            .get("method")
            .and_then(|m| m.as_str())
            .unwrap_or("POST");
        let method =
            reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                TaskFailure::permanent(format!("params.method {method:?} is not an HTTP method"))
            })?;
        // A secret that is unknown or not bound to this host will not be by the next attempt.
        let secret_headers = self
            .secrets
            .headers(secret_headers, &url)
            .map_err(|e| TaskFailure::permanent(e.to_string()))?;
        let client = if secret_headers.is_empty() {
            &self.http
        } else {
            &self.http_with_secrets
        };
        let mut request = client
            .request(method.clone(), url.clone())
            .header("Idempotency-Key", task_id);
        // The attempt's trace continues at the receiver (`traceparent`); a task's own headers win.
        let mut trace_headers = reqwest::header::HeaderMap::new();
        taskfactory_runtime::propagation::inject_http(&mut trace_headers);
        if let Some(headers) = params.get("headers") {
            let headers = headers.as_object().ok_or_else(|| {
                TaskFailure::permanent("params.headers must be an object of strings")
            })?;
            for (name, value) in headers {
                let value = value.as_str().ok_or_else(|| {
                    TaskFailure::permanent(format!("params.headers.{name} must be a string"))
                })?;
                trace_headers.remove(name.to_ascii_lowercase().as_str());
                request = request.header(name.as_str(), value);
            }
        }
        for name in secret_headers.keys() {
            trace_headers.remove(name);
        }
        request = request.headers(trace_headers).headers(secret_headers);
        if let Some(body) = params.get("body") {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            let message = format!("{method} {url}: {}", error_chain(&e));
            if e.is_builder() || e.is_redirect() || message.contains("refused:") {
                TaskFailure::permanent(message)
            } else {
                TaskFailure::retryable(message)
            }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = egress::read_capped(response, self.max_response_bytes)
            .await
            .map_err(|e| match e {
                egress::ReadError::TooLarge { .. } => TaskFailure::permanent(e.to_string()),
                egress::ReadError::Transport(_) => {
                    TaskFailure::retryable(format!("{method} {url}: {}", error_chain(&e)))
                }
            })?;
        let output = serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        });
        if status.is_success() {
            return Ok(output);
        }
        let snippet: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        let mut message = format!("{method} {url} answered {status}: {snippet}");
        if let Some(retry_after) = &retry_after {
            message.push_str(&format!(" (Retry-After: {retry_after})"));
        }
        if status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
        {
            let mut failure = TaskFailure::retryable(message);
            failure.retry_after = retry_after
                .as_deref()
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
            Err(failure)
        } else {
            Err(TaskFailure::permanent(message))
        }
    }

    async fn publish(
        &self,
        task_id: &str,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, TaskFailure> {
        let subject = params
            .get("subject")
            .and_then(|s| s.as_str())
            .ok_or_else(|| TaskFailure::permanent("params.subject is required (a string)"))?;
        if let Some(problem) = subjects::subject_error(subject, false) {
            return Err(TaskFailure::permanent(format!("params.subject {problem}")));
        }
        // Whatever the spec or the event made of it: never JetStream's API, an inbox, or our own
        // streams and internal subjects (a task is not the control plane).
        if let Some(problem) = taskfactory_model::sources::publish_subject_refusal(subject) {
            return Err(TaskFailure::permanent(format!(
                "params.subject {subject:?}: {problem}"
            )));
        }
        let payload = params
            .get("payload")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let body = serde_json::to_vec(&payload).expect("JSON serializes");
        match messaging::publish_confirmed(
            &self.js,
            subject.to_owned(),
            task_id,
            None,
            body.clone().into(),
        )
        .await
        {
            Ok(duplicate) => {
                Ok(serde_json::json!({"subject": subject, "stream": true, "duplicate": duplicate}))
            }
            Err(e)
                if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound =>
            {
                self.nats
                    .publish_with_headers(
                        subject.to_owned(),
                        messaging::request_headers(),
                        body.into(),
                    )
                    .await
                    .map_err(|e| TaskFailure::retryable(format!("publish to {subject}: {e}")))?;
                self.nats
                    .flush()
                    .await
                    .map_err(|e| TaskFailure::retryable(format!("publish to {subject}: {e}")))?;
                Ok(serde_json::json!({"subject": subject, "stream": false}))
            }
            Err(e) => Err(TaskFailure::retryable(format!("publish to {subject}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 30 Nov 2026 12:00:30 GMT", now),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Mon, 30 Nov 2026 11:00:00 GMT", now),
            Some(std::time::Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

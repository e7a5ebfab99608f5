//! The tower layer in front of the admin API. For each call to `taskfactory.v1.AdminService`:
//!
//! 1. the RPC's rule (`access::rule_of_path`); an RPC without one is refused (`UNIMPLEMENTED`);
//! 2. the caller ([`Authenticator::authenticate`]): `UNAUTHENTICATED` if it cannot be told;
//! 3. whether its roles reach the RPC anywhere: `PERMISSION_DENIED` if not (recorded in the
//!    audit log when the RPC changes something);
//! 4. the [`Principal`] goes on to the handler in the request's extensions, where the handler
//!    checks it against the activity the call is about.
//!
//! Other services (health, reflection) pass untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use rustls::pki_types::CertificateDer;
use taskfactory_model::access::{self, Principal};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::Authenticator;
use crate::audit::{self, AuditEntry};

#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<State>,
}

struct State {
    authenticator: Arc<Authenticator>,
    pool: sqlx::PgPool,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>, pool: sqlx::PgPool) -> Self {
        Self {
            state: Arc::new(State {
                authenticator,
                pool,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<State>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            match state.admit(&mut request).await {
                Ok(()) => inner.call(request).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

impl State {
    async fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let rule = match access::rule_of_path(request.uri().path()) {
            Ok(Some(rule)) => rule,
            Ok(None) => return Ok(()),
            Err(method) => {
                return Err(Status::unimplemented(format!(
                    "{method} is not an RPC of this admin API"
                )));
            }
        };
        let certs = peer_certs(request);
        let principal = match self
            .authenticator
            .authenticate(request.headers(), certs.as_deref().map(Vec::as_slice))
            .await
        {
            Ok(principal) => principal,
            Err(error) => {
                taskfactory_runtime::metrics::record_admin_refusal(rule.method, error.reason());
                tracing::warn!(rpc = rule.method, reason = error.reason(), error = %error, "admin call refused: not authenticated");
                return Err(Status::unauthenticated(error.to_string()));
            }
        };
        if !principal.may_somewhere(rule.role) {
            let message = denied_message(&principal, rule);
            taskfactory_runtime::metrics::record_admin_refusal(rule.method, "permission_denied");
            tracing::warn!(rpc = rule.method, principal = %principal.subject, "admin call refused: {message}");
            if rule.mutating {
                let mut entry = AuditEntry::new(&principal, rule.method);
                entry.caller_trace(
                    request
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok()),
                );
                entry.outcome = "PERMISSION_DENIED".to_owned();
                entry.error = message.clone();
                // In a task of its own: a caller that goes away does not keep it unrecorded.
                let _ = tokio::spawn(audit::record(self.pool.clone(), entry)).await;
            }
            return Err(Status::permission_denied(message));
        }
        request.extensions_mut().insert(principal);
        Ok(())
    }
}

/// What a caller is told when its roles do not reach an RPC.
pub fn denied_message(principal: &Principal, rule: &access::RpcRule) -> String {
    let grants = principal.grant_names();
    format!(
        "{} ({}) may not call {}: it needs the role {} or above",
        principal.subject,
        if grants.is_empty() {
            "no roles".to_owned()
        } else {
            grants.join(", ")
        },
        rule.method,
        rule.role
    )
}

fn peer_certs<B>(request: &http::Request<B>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
}

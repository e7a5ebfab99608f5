//! Who is calling the admin API, and may they call this RPC at all.
//!
//! - [`file`]: the auth file (hashed bearer tokens, client certificate names, their roles).
//! - [`jwt`]: OIDC / JWT bearer tokens verified against a JWKS.
//! - [`layer`]: the tower layer in front of the admin service: it authenticates every call,
//!   refuses a caller whose roles cannot reach the RPC (the table in
//!   `taskfactory_model::access`), and hands the [`Principal`] to the handlers, which check it
//!   against the activity the call is about.
//! - [`client`]: what clients (`apply`, tests) send: a bearer token, and the trace context.
//!
//! With no authentication configured, every caller is an anonymous admin, which is only allowed
//! on a loopback address (or with `--insecure-no-auth`, loudly). The gRPC health and reflection
//! services are always open.

pub mod client;
pub mod file;
pub mod jwt;
pub mod layer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use rustls::pki_types::CertificateDer;
use taskfactory_model::access::{AuthMethod, Principal};
use taskfactory_runtime::config::parse_duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::file::AuthFile;
use self::jwt::{JwksSource, OidcSettings, Verifier};

/// How the admin API authenticates its callers.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthArgs {
    /// The auth file: bearer tokens (as SHA-256 hashes) and client certificate names, with their
    /// roles (README, "Security"). Read again when it changes.
    #[arg(long = "auth-file", env = "TASKFACTORY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// OIDC: the issuer (`iss`) tokens must carry.
    #[arg(long = "oidc-issuer", env = "TASKFACTORY_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// OIDC: the audience (`aud`) tokens must include.
    #[arg(long = "oidc-audience", env = "TASKFACTORY_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// OIDC: the signing keys, a JWKS file or an https:// URL (the provider's `jwks_uri`).
    #[arg(long = "oidc-jwks", env = "TASKFACTORY_OIDC_JWKS")]
    pub oidc_jwks: Option<String>,
    /// OIDC: the claim holding the caller's roles (a dotted path such as `realm_access.roles`
    /// reaches into objects).
    #[arg(
        long = "oidc-roles-claim",
        env = "TASKFACTORY_OIDC_ROLES_CLAIM",
        default_value = "roles"
    )]
    pub oidc_roles_claim: String,
    /// OIDC: only role values starting with this count (it is removed): with `taskfactory:`,
    /// `taskfactory:editor` grants editor.
    #[arg(
        long = "oidc-role-prefix",
        env = "TASKFACTORY_OIDC_ROLE_PREFIX",
        default_value = ""
    )]
    pub oidc_role_prefix: String,
    /// OIDC: the claim that names the caller.
    #[arg(
        long = "oidc-subject-claim",
        env = "TASKFACTORY_OIDC_SUBJECT_CLAIM",
        default_value = "sub"
    )]
    pub oidc_subject_claim: String,
    /// OIDC: how far clocks may disagree when checking `exp` and `nbf`.
    #[arg(long = "oidc-clock-skew", env = "TASKFACTORY_OIDC_CLOCK_SKEW", default_value = "60s", value_parser = parse_duration)]
    pub oidc_clock_skew: Duration,
    /// OIDC: how often keys from a URL are fetched again.
    #[arg(long = "oidc-jwks-refresh", env = "TASKFACTORY_OIDC_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub oidc_jwks_refresh: Duration,
    /// OIDC: the soonest a token naming an unknown key makes the keys be fetched again (tests
    /// shorten it).
    #[arg(skip = Duration::from_secs(30))]
    pub oidc_unknown_key_refetch: Duration,
    /// TLS for the admin API: the server's certificate chain (PEM).
    #[arg(long = "grpc-tls-cert", env = "TASKFACTORY_GRPC_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS for the admin API: the server's private key (PEM).
    #[arg(long = "grpc-tls-key", env = "TASKFACTORY_GRPC_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA(s) that sign client certificates (PEM). A client certificate it
    /// verifies identifies its caller (by the auth file's `certificates`).
    #[arg(long = "grpc-client-ca", env = "TASKFACTORY_GRPC_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Serve the admin API without authentication on a non-loopback address: every caller is
    /// admin. Only for a network you trust entirely.
    #[arg(long = "insecure-no-auth", env = "TASKFACTORY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

impl Default for AuthArgs {
    /// No authentication (loopback only), with the command line's defaults.
    fn default() -> Self {
        Self {
            auth_file: None,
            oidc_issuer: None,
            oidc_audience: None,
            oidc_jwks: None,
            oidc_roles_claim: "roles".to_owned(),
            oidc_role_prefix: String::new(),
            oidc_subject_claim: "sub".to_owned(),
            oidc_clock_skew: Duration::from_secs(60),
            oidc_jwks_refresh: Duration::from_secs(300),
            oidc_unknown_key_refetch: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            insecure_no_auth: false,
        }
    }
}

impl AuthArgs {
    fn oidc_settings(&self) -> anyhow::Result<Option<OidcSettings>> {
        let (issuer, audience, jwks) = match (
            &self.oidc_issuer,
            &self.oidc_audience,
            &self.oidc_jwks,
        ) {
            (None, None, None) => return Ok(None),
            (Some(issuer), Some(audience), Some(jwks)) => (issuer, audience, jwks),
            _ => bail!(
                "OIDC needs all three of --oidc-issuer, --oidc-audience and --oidc-jwks (TASKFACTORY_OIDC_*)"
            ),
        };
        if self.oidc_roles_claim.is_empty() || self.oidc_subject_claim.is_empty() {
            bail!("--oidc-roles-claim and --oidc-subject-claim must not be empty");
        }
        Ok(Some(OidcSettings {
            issuer: issuer.clone(),
            audience: audience.clone(),
            jwks: JwksSource::parse(jwks).map_err(|e| anyhow::anyhow!("--oidc-jwks {e}"))?,
            roles_claim: self.oidc_roles_claim.clone(),
            role_prefix: self.oidc_role_prefix.clone(),
            subject_claim: self.oidc_subject_claim.clone(),
            clock_skew: self.oidc_clock_skew,
            refresh: self.oidc_jwks_refresh.max(Duration::from_secs(30)),
            unknown_key_refetch: self.oidc_unknown_key_refetch,
        }))
    }

    /// Whether any way of authenticating is configured.
    pub fn configured(&self) -> bool {
        self.auth_file.is_some() || self.oidc_jwks.is_some() || self.client_ca.is_some()
    }

    /// The TLS configuration of the admin API, if it serves TLS.
    pub fn server_tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    bail!(
                        "--grpc-client-ca needs the admin API to serve TLS: set --grpc-tls-cert and --grpc-tls-key"
                    );
                }
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert, key),
            _ => bail!("--grpc-tls-cert and --grpc-tls-key go together"),
        };
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(
            read(cert, "admin API certificate")?,
            read(key, "admin API key")?,
        );
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            tls = tls
                .client_ca_root(tonic::transport::Certificate::from_pem(read(
                    ca,
                    "client CA",
                )?))
                // Token holders connect over TLS without a certificate of their own.
                .client_auth_optional(true);
        }
        Ok(Some(tls))
    }
}

/// The address rule, checked before anything else starts: without authentication the admin API
/// listens only on loopback, unless `--insecure-no-auth` says otherwise.
pub fn check_exposure(args: &AuthArgs, addr: SocketAddr) -> anyhow::Result<()> {
    if args.configured() || addr.ip().is_loopback() || args.insecure_no_auth {
        return Ok(());
    }
    bail!(
        "the admin API would listen on {addr} without authentication: configure --auth-file, --oidc-issuer/--oidc-audience/--oidc-jwks or --grpc-client-ca (TASKFACTORY_AUTH_FILE, …), bind it to loopback, or pass --insecure-no-auth"
    )
}

/// Why a caller is not authenticated (its message goes back in `UNAUTHENTICATED`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credentials: send the header `authorization: Bearer <token>`, or a client certificate"
    )]
    Missing,
    #[error("the authorization header must be `Bearer <token>`")]
    NotBearer,
    #[error("the bearer token is not recognised")]
    UnknownToken,
    #[error("the bearer token of {subject:?} expired at {at}")]
    Expired {
        subject: String,
        at: chrono::DateTime<Utc>,
    },
    #[error("{0}")]
    Jwt(#[from] jwt::JwtError),
}

impl AuthError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::NotBearer => "not_bearer",
            AuthError::UnknownToken => "unknown_token",
            AuthError::Expired { .. } => "expired",
            AuthError::Jwt(_) => "jwt",
        }
    }
}

/// Authenticates callers. Cheap to share.
pub struct Authenticator {
    open: bool,
    file: Option<AuthFileWatch>,
    oidc: Option<Arc<Verifier>>,
}

struct AuthFileWatch {
    path: PathBuf,
    current: RwLock<(Arc<AuthFile>, [u8; 32])>,
}

impl AuthFileWatch {
    fn load(path: PathBuf) -> anyhow::Result<Self> {
        let text = std::fs::read(&path)
            .with_context(|| format!("reading the auth file {}", path.display()))?;
        let file = AuthFile::parse(&String::from_utf8_lossy(&text))
            .map_err(|e| anyhow::anyhow!("the auth file {}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), tokens = file.token_count(), certificates = file.certificate_count(), "auth file loaded");
        Ok(Self {
            path,
            current: RwLock::new((Arc::new(file), digest(&text))),
        })
    }

    fn get(&self) -> Arc<AuthFile> {
        match self.current.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Reads the file again if its content changed; a bad new version is logged and ignored.
    fn reload_if_changed(&self) {
        let Ok(text) = std::fs::read(&self.path) else {
            tracing::warn!(path = %self.path.display(), "cannot read the auth file; the previous one stays in force");
            return;
        };
        let hash = digest(&text);
        let unchanged = self.current.read().map(|g| g.1 == hash).unwrap_or(false);
        if unchanged {
            return;
        }
        match AuthFile::parse(&String::from_utf8_lossy(&text)) {
            Ok(file) => {
                tracing::info!(path = %self.path.display(), tokens = file.token_count(), certificates = file.certificate_count(), "auth file reloaded");
                if let Ok(mut guard) = self.current.write() {
                    *guard = (Arc::new(file), hash);
                }
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "the changed auth file does not parse; the previous one stays in force");
                if let Ok(mut guard) = self.current.write() {
                    // Do not log the same bad version every interval.
                    guard.1 = hash;
                }
            }
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// How often the auth file is checked for changes.
const AUTH_FILE_POLL: Duration = Duration::from_secs(2);

impl Authenticator {
    /// Everyone is an anonymous admin (no authentication configured).
    pub fn open() -> Self {
        Self {
            open: true,
            file: None,
            oidc: None,
        }
    }

    /// Builds the authenticator and checks the address rule: without authentication, loopback
    /// only, unless `--insecure-no-auth`. Keys and the auth file are loaded before it returns
    /// (a JWKS URL that does not answer yet is retried in the background).
    pub async fn start(
        args: &AuthArgs,
        addr: SocketAddr,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        check_exposure(args, addr)?;
        if !args.configured() {
            if addr.ip().is_loopback() {
                tracing::info!(%addr, "admin API without authentication: loopback only, every caller is admin");
            } else {
                tracing::warn!(%addr, "admin API WITHOUT AUTHENTICATION on a non-loopback address (--insecure-no-auth): anyone who reaches it is admin");
            }
            return Ok(Arc::new(Self::open()));
        }
        if args.insecure_no_auth {
            tracing::warn!(
                "--insecure-no-auth is ignored: authentication is configured and required"
            );
        }
        if args.tls_cert.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the admin API serves plain HTTP/2: bearer tokens cross the network in clear unless a proxy or mesh adds TLS (--grpc-tls-cert)");
        }
        let file = match &args.auth_file {
            Some(path) => Some(AuthFileWatch::load(path.clone())?),
            None => None,
        };
        let oidc = match args.oidc_settings()? {
            Some(settings) => {
                let verifier = Arc::new(Verifier::new(settings).map_err(anyhow::Error::msg)?);
                match (verifier.refresh().await, &verifier.settings().jwks) {
                    (Ok(()), _) => {}
                    // A file is ours to get right: refuse to start.
                    (Err(error), JwksSource::File(_)) => bail!("--oidc-jwks: {error}"),
                    (Err(error), JwksSource::Url(_)) => {
                        tracing::warn!(%error, "cannot load the OIDC signing keys yet; retrying in the background (JWT callers are refused meanwhile)");
                    }
                }
                if verifier.settings().role_prefix.is_empty() {
                    tracing::warn!(
                        "OIDC without --oidc-role-prefix: any value viewer, operator, editor or admin in the tokens' roles claim grants that role here, whichever application the identity provider meant it for; prefer a prefix such as taskfactory:"
                    );
                }
                tracker.spawn(jwt::run_refresher(verifier.clone(), shutdown.clone()));
                Some(verifier)
            }
            None => None,
        };
        let authenticator = Arc::new(Self {
            open: false,
            file,
            oidc,
        });
        if authenticator.file.is_some() {
            let watcher = authenticator.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(AUTH_FILE_POLL);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Some(file) = &watcher.file {
                        file.reload_if_changed();
                    }
                }
            });
        }
        Ok(authenticator)
    }

    /// Whether every caller is let in as admin.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Who the caller is: by bearer token (the auth file, then OIDC), else by client certificate.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Principal, AuthError> {
        if self.open {
            return Ok(Principal::anonymous());
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = bearer(value).ok_or(AuthError::NotBearer)?;
            return self.by_token(token).await;
        }
        if let Some(certificate) = peer_certs.and_then(|certs| certs.first()) {
            return Ok(self.by_certificate(certificate));
        }
        Err(AuthError::Missing)
    }

    async fn by_token(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(file) = &self.file {
            let file = file.get();
            if let Some(identity) = file.token(token) {
                if let Some(at) = identity.expires_at
                    && at <= Utc::now()
                {
                    return Err(AuthError::Expired {
                        subject: identity.subject.clone(),
                        at,
                    });
                }
                return Ok(Principal {
                    subject: identity.subject.clone(),
                    method: AuthMethod::Token,
                    grants: identity.grants.clone(),
                });
            }
        }
        if let Some(oidc) = &self.oidc
            && token.matches('.').count() == 2
        {
            let identity = oidc.verify(token).await?;
            return Ok(Principal {
                subject: identity.subject,
                method: AuthMethod::Jwt,
                grants: identity.grants,
            });
        }
        Err(AuthError::UnknownToken)
    }

    /// A certificate the TLS layer verified against the client CA. Its names are looked up in
    /// the auth file; one without an entry is authenticated but may do nothing.
    fn by_certificate(&self, certificate: &CertificateDer<'_>) -> Principal {
        let names = certificate_names(certificate);
        let identity = self
            .file
            .as_ref()
            .map(AuthFileWatch::get)
            .and_then(|file| file.certificate(names.iter().map(String::as_str)).cloned());
        match identity {
            Some(identity) => Principal {
                subject: identity.subject,
                method: AuthMethod::Certificate,
                grants: identity.grants,
            },
            None => Principal {
                subject: names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "(a certificate without names)".to_owned()),
                method: AuthMethod::Certificate,
                grants: Vec::new(),
            },
        }
    }
}

fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A certificate's common names, then its DNS, URI and email alternative names.
pub fn certificate_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, parsed)) = X509Certificate::from_der(certificate.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => {
                    names.push((*n).to_owned());
                }
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_tokens_are_read() {
        let value = |text: &str| http::HeaderValue::from_str(text).unwrap();
        assert_eq!(bearer(&value("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&value("bearer   abc ")), Some("abc"));
        assert_eq!(bearer(&value("Basic abc")), None);
        assert_eq!(bearer(&value("Bearer ")), None);
        assert_eq!(bearer(&value("abc")), None);
    }

    #[tokio::test]
    async fn an_open_authenticator_lets_everyone_in_as_admin() {
        let open = Authenticator::open();
        let principal = open
            .authenticate(&http::HeaderMap::new(), None)
            .await
            .unwrap();
        assert_eq!(principal, Principal::anonymous());
    }

    #[tokio::test]
    async fn without_authentication_only_loopback_is_served() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let args = AuthArgs::default();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let anywhere: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(
            Authenticator::start(&args, loopback, &tracker, shutdown.clone())
                .await
                .unwrap()
                .is_open()
        );
        let refused = Authenticator::start(&args, anywhere, &tracker, shutdown.clone())
            .await
            .err()
            .expect("refused");
        assert!(
            refused.to_string().contains("--insecure-no-auth"),
            "{refused}"
        );
        let insecure = AuthArgs {
            insecure_no_auth: true,
            ..AuthArgs::default()
        };
        assert!(
            Authenticator::start(&insecure, anywhere, &tracker, shutdown)
                .await
                .unwrap()
                .is_open()
        );
    }
}

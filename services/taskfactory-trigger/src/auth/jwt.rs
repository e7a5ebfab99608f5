//! OIDC / JWT bearer tokens, verified against a JWKS (a file, or an `https://` URL such as an
//! identity provider's `jwks_uri`).
//!
//! A token is taken when its signature verifies with a key of the set (by `kid`, or the only key
//! of its family when the token names none), with an asymmetric algorithm (RS*, PS*, ES*,
//! EdDSA: never `none`, never HS*, whatever the token's header says), and its `iss`, `aud`,
//! `exp` (required) and `nbf` hold within the allowed clock skew. The subject is the `sub` claim
//! (or another); the roles are the grants found in the roles claim (a list or a space-separated
//! string; with a role prefix, only values carrying it count, prefix removed). Values that are
//! not grants are ignored: identity providers put many other roles there.
//!
//! A JWKS file is read again when it changes; a URL is fetched at start, every
//! `refresh`, and at once (at most every 30 s) when a token names a key the set lacks, which is
//! how providers rotate keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use taskfactory_model::access::Grant;
use tokio::sync::{Mutex, RwLock};

/// Where the keys come from.
#[derive(Clone, Debug)]
pub enum JwksSource {
    File(PathBuf),
    Url(reqwest::Url),
}

impl JwksSource {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("https://") || text.starts_with("http://") {
            let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
            // Keys fetched in clear could be anyone's: plain HTTP only from this machine.
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(name)) => name == "localhost",
                None => false,
            };
            if url.scheme() == "http" && !loopback {
                return Err(format!(
                    "{text:?}: signing keys must be fetched over https (plain http only from loopback)"
                ));
            }
            Ok(JwksSource::Url(url))
        } else {
            Ok(JwksSource::File(PathBuf::from(text)))
        }
    }
}

/// What the verifier checks.
#[derive(Clone, Debug)]
pub struct OidcSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub roles_claim: String,
    pub role_prefix: String,
    pub subject_claim: String,
    pub clock_skew: Duration,
    pub refresh: Duration,
    /// The soonest a token naming a key the set lacks makes us fetch the keys again.
    pub unknown_key_refetch: Duration,
}

/// Why a JWT was not taken (shown to the caller: it says what to fix, nothing secret).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error(
        "the token's algorithm {0} is not accepted (only asymmetric signatures: RS*, PS*, ES*, EdDSA)"
    )]
    Algorithm(String),
    #[error("no key of the JWKS matches the token (kid {0:?})")]
    UnknownKey(String),
    #[error("the signing keys are not loaded yet; retry shortly")]
    NoKeys,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not {0:?}")]
    Issuer(String),
    #[error("the token's audience does not include {0:?}")]
    Audience(String),
    #[error("the token lacks the claim {0:?}")]
    MissingClaim(String),
    #[error("the token was refused: {0}")]
    Other(String),
}

/// A verified token's caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtIdentity {
    pub subject: String,
    pub grants: Vec<Grant>,
}

struct KeySet {
    keys: Vec<(Jwk, DecodingKey)>,
    loaded_at: Instant,
    /// The file's modification time and length, to see it change.
    file_stamp: Option<(std::time::SystemTime, u64)>,
}

pub struct Verifier {
    settings: OidcSettings,
    keys: RwLock<Option<KeySet>>,
    refreshing: Mutex<()>,
    http: reqwest::Client,
}

const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Parses a JWKS document, keeping the keys we can verify with (asymmetric ones).
pub fn parse_jwks(text: &[u8]) -> Result<Vec<(Jwk, DecodingKey)>, String> {
    let document: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(keys) = document.get("keys").and_then(|k| k.as_array()) else {
        return Err("not a JWKS: no \"keys\" list".to_owned());
    };
    let mut usable = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(key.clone()) {
            Ok(jwk) => jwk,
            Err(error) => {
                tracing::debug!(key = i, %error, "jwks key skipped: not understood");
                continue;
            }
        };
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            tracing::debug!(
                key = i,
                "jwks key skipped: symmetric keys are never accepted"
            );
            continue;
        }
        match DecodingKey::from_jwk(&jwk) {
            Ok(decoding) => usable.push((jwk, decoding)),
            Err(error) => tracing::debug!(key = i, %error, "jwks key skipped"),
        }
    }
    if usable.is_empty() {
        return Err("the JWKS holds no usable public key".to_owned());
    }
    Ok(usable)
}

fn family_of(jwk: &Jwk) -> Option<AlgorithmFamily> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    match &jwk.algorithm {
        P::RSA(_) => Some(AlgorithmFamily::Rsa),
        P::EllipticCurve(_) => Some(AlgorithmFamily::Ec),
        P::OctetKeyPair(_) => Some(AlgorithmFamily::Ed),
        _ => None,
    }
}

fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if family_of(jwk) != Some(alg.family()) {
        return false;
    }
    match jwk.common.key_algorithm {
        None => true,
        Some(declared) => key_algorithm_name(declared) == Some(alg),
    }
}

fn key_algorithm_name(declared: KeyAlgorithm) -> Option<Algorithm> {
    format!("{declared:?}").parse().ok()
}

impl Verifier {
    pub fn new(settings: OidcSettings) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            settings,
            keys: RwLock::new(None),
            refreshing: Mutex::new(()),
            http,
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    /// Loads the keys (at start, and whenever they may have changed).
    pub async fn refresh(&self) -> Result<(), String> {
        let _single = self.refreshing.lock().await;
        let (keys, file_stamp) = match &self.settings.jwks {
            JwksSource::File(path) => {
                let stamp = file_stamp(path);
                let text = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                (parse_jwks(&text)?, stamp)
            }
            JwksSource::Url(url) => {
                let response = self
                    .http
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(|e| format!("fetching {url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("fetching {url}: status {}", response.status()));
                }
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("reading {url}: {e}"))?;
                (parse_jwks(&body)?, None)
            }
        };
        *self.keys.write().await = Some(KeySet {
            keys,
            loaded_at: Instant::now(),
            file_stamp,
        });
        Ok(())
    }

    /// Whether the keys are due for a reload: a file that changed, a URL past its refresh time.
    pub async fn stale(&self) -> bool {
        let keys = self.keys.read().await;
        let Some(set) = keys.as_ref() else {
            return true;
        };
        match &self.settings.jwks {
            JwksSource::File(path) => file_stamp(path) != set.file_stamp,
            JwksSource::Url(_) => set.loaded_at.elapsed() >= self.settings.refresh,
        }
    }

    /// Verifies a token and says who it is.
    pub async fn verify(&self, token: &str) -> Result<JwtIdentity, JwtError> {
        // Say plainly when the algorithm is the problem (`none`, HS256, …): the library only
        // reports a header it cannot read.
        if let Some(alg) = header_alg(token)
            && !ACCEPTED.iter().any(|a| format!("{a:?}") == alg)
        {
            return Err(JwtError::Algorithm(alg));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let key = match self.find_key(&kid, header.alg).await? {
            Some(key) => key,
            None => {
                self.refetch_for_unknown_key().await;
                self.find_key(&kid, header.alg)
                    .await?
                    .ok_or(JwtError::UnknownKey(kid))?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| self.classify(e))?;
        let claims = data.claims;
        let subject = claim(&claims, &self.settings.subject_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| JwtError::MissingClaim(self.settings.subject_claim.clone()))?
            .chars()
            .filter(|c| !c.is_control())
            .take(256)
            .collect();
        Ok(JwtIdentity {
            subject,
            grants: self.grants(&claims),
        })
    }

    async fn find_key(&self, kid: &str, alg: Algorithm) -> Result<Option<DecodingKey>, JwtError> {
        let keys = self.keys.read().await;
        let Some(set) = keys.as_ref() else {
            return Err(JwtError::NoKeys);
        };
        let fitting: Vec<&(Jwk, DecodingKey)> = set
            .keys
            .iter()
            .filter(|(jwk, _)| key_fits(jwk, alg))
            .collect();
        if kid.is_empty() {
            // Without a kid, only an unambiguous key will do.
            return Ok(match fitting.as_slice() {
                [(_, key)] => Some(key.clone()),
                _ => None,
            });
        }
        Ok(fitting
            .into_iter()
            .find(|(jwk, _)| jwk.common.key_id.as_deref() == Some(kid))
            .map(|(_, key)| key.clone()))
    }

    async fn refetch_for_unknown_key(&self) {
        if !matches!(self.settings.jwks, JwksSource::Url(_)) {
            return;
        }
        let recent = self
            .keys
            .read()
            .await
            .as_ref()
            .is_some_and(|set| set.loaded_at.elapsed() < self.settings.unknown_key_refetch);
        if recent {
            return;
        }
        if let Err(error) = self.refresh().await {
            tracing::warn!(%error, "cannot refresh the OIDC signing keys");
        }
    }

    fn classify(&self, error: jsonwebtoken::errors::Error) -> JwtError {
        use jsonwebtoken::errors::ErrorKind as K;
        match error.kind() {
            K::InvalidSignature => JwtError::Signature,
            K::ExpiredSignature => JwtError::Expired,
            K::ImmatureSignature => JwtError::NotYetValid,
            K::InvalidIssuer => JwtError::Issuer(self.settings.issuer.clone()),
            K::InvalidAudience => JwtError::Audience(self.settings.audience.clone()),
            K::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim.clone()),
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => JwtError::Malformed,
            K::InvalidAlgorithm => JwtError::Algorithm("(not the key's)".to_owned()),
            other => JwtError::Other(format!("{other:?}")),
        }
    }

    fn grants(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Vec<Grant> {
        let values: Vec<&str> = match claim(claims, &self.settings.roles_claim) {
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|v| v.as_str()).collect()
            }
            Some(serde_json::Value::String(text)) => text.split_whitespace().collect(),
            _ => Vec::new(),
        };
        values
            .into_iter()
            .filter_map(|value| value.strip_prefix(self.settings.role_prefix.as_str()))
            .filter_map(|value| value.parse().ok())
            .collect()
    }
}

/// A claim by dotted path (`realm_access.roles`); a claim whose name has dots is found too.
fn claim<'a>(
    claims: &'a serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<&'a serde_json::Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    Some(value)
}

/// The `alg` a token's header names, read without trusting it (for the error message).
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value
        .get("alg")?
        .as_str()
        .map(|a| a.chars().take(20).collect())
}

fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Keeps the keys fresh: a file when it changes, a URL every `refresh` (and retried every 10 s
/// while it fails).
pub async fn run_refresher(verifier: Arc<Verifier>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_failure: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !verifier.stale().await {
            continue;
        }
        if last_failure.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            continue;
        }
        match verifier.refresh().await {
            Ok(()) => {
                last_failure = None;
                tracing::info!("oidc signing keys loaded");
            }
            Err(error) => {
                last_failure = Some(Instant::now());
                tracing::warn!(%error, "cannot load the OIDC signing keys; the previous ones stay in force");
            }
        }
    }
}

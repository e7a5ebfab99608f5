//! The auth file: bearer tokens (stored only as SHA-256 hashes) and client certificate names,
//! each with a subject and roles.
//!
//! ```yaml
//! tokens:
//!   - subject: ci-deployer
//!     sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!     roles: ["editor:billing-*"]
//!     expiresAt: 2027-06-30T00:00:00Z      # optional
//! certificates:
//!   - subject: ops-cli                     # a client certificate's common name, or a DNS/URI/email SAN
//!     roles: [operator]
//! ```
//!
//! Tokens are long random strings (`taskfactory-trigger token new` makes one), so one SHA-256 is
//! the right hash: nothing to brute-force, and it is checked on every call. The file is read
//! again when it changes; a file that no longer parses keeps the previous one in force (logged).

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use taskfactory_model::access::Grant;

/// One entry of the file that can be a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub grants: Vec<Grant>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A parsed auth file.
#[derive(Clone, Debug, Default)]
pub struct AuthFile {
    tokens: HashMap<[u8; 32], Identity>,
    certificates: HashMap<String, Identity>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDoc {
    #[serde(default)]
    tokens: Vec<TokenDoc>,
    #[serde(default)]
    certificates: Vec<CertificateDoc>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenDoc {
    subject: String,
    sha256: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateDoc {
    subject: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// The SHA-256 of a token, as the file holds it (lowercase hex).
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn grants(entry: &str, roles: &[String]) -> Result<Vec<Grant>, String> {
    let mut grants = Vec::with_capacity(roles.len());
    for role in roles {
        grants.push(role.parse().map_err(|e| format!("{entry}: roles: {e}"))?);
    }
    Ok(grants)
}

fn subject_error(entry: &str, subject: &str) -> Option<String> {
    if subject.trim().is_empty() {
        return Some(format!("{entry}: subject is required"));
    }
    if subject.len() > 256 || subject.chars().any(char::is_control) {
        return Some(format!(
            "{entry}: subject must be at most 256 characters, without control characters"
        ));
    }
    None
}

impl AuthFile {
    /// Parses the file's text (YAML or JSON). Errors name the entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut file = AuthFile::default();
        for (i, token) in doc.tokens.into_iter().enumerate() {
            let entry = format!("tokens[{i}] ({:?})", token.subject);
            if let Some(error) = subject_error(&entry, &token.subject) {
                return Err(error);
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(token.sha256.trim().to_ascii_lowercase(), &mut hash).map_err(
                |_| {
                    format!(
                        "{entry}: sha256 must be 64 hex digits, the SHA-256 of the token (printf %s \"$TOKEN\" | sha256sum)"
                    )
                },
            )?;
            let identity = Identity {
                grants: grants(&entry, &token.roles)?,
                subject: token.subject,
                expires_at: token.expires_at,
            };
            if file.tokens.insert(hash, identity).is_some() {
                return Err(format!("{entry}: the same token hash appears twice"));
            }
        }
        for (i, certificate) in doc.certificates.into_iter().enumerate() {
            let entry = format!("certificates[{i}] ({:?})", certificate.subject);
            if let Some(error) = subject_error(&entry, &certificate.subject) {
                return Err(error);
            }
            let identity = Identity {
                grants: grants(&entry, &certificate.roles)?,
                subject: certificate.subject.clone(),
                expires_at: None,
            };
            if file
                .certificates
                .insert(certificate.subject, identity)
                .is_some()
            {
                return Err(format!("{entry}: this subject appears twice"));
            }
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        Self::parse(&text)
    }

    /// The identity a bearer token belongs to.
    pub fn token(&self, token: &str) -> Option<&Identity> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.tokens.get(&hash)
    }

    /// The identity of the first certificate name that has an entry.
    pub fn certificate<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&Identity> {
        names.into_iter().find_map(|n| self.certificates.get(n))
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn certificate_count(&self) -> usize {
        self.certificates.len()
    }
}

/// A new random token (`tf_` and 64 hex digits, from two UUIDv4s: 244 random bits) and its hash.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let token = format!("tf_{}", hex::encode(bytes));
    let hash = token_hash_hex(&token);
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfactory_model::access::Role;

    #[test]
    fn tokens_and_certificates_are_found_by_what_the_caller_presents() {
        let hash = token_hash_hex("s3cret-token-value");
        let file = AuthFile::parse(&format!(
            "tokens:\n  - subject: ci\n    sha256: {}\n    roles: [\"editor:billing-*\", viewer]\ncertificates:\n  - {{subject: ops-cli, roles: [operator]}}\n",
            hash.to_uppercase()
        ))
        .unwrap();
        let ci = file.token("s3cret-token-value").unwrap();
        assert_eq!(ci.subject, "ci");
        assert_eq!(ci.grants.len(), 2);
        assert_eq!(ci.grants[1], Grant::everywhere(Role::Viewer));
        assert!(file.token("s3cret-token-valuE").is_none());
        assert!(file.token("").is_none());
        assert_eq!(
            file.certificate(["nope", "ops-cli"]).unwrap().subject,
            "ops-cli"
        );
        assert!(file.certificate(["nope"]).is_none());
    }

    #[test]
    fn bad_files_name_the_entry() {
        let error = |text: &str| AuthFile::parse(text).unwrap_err();
        assert!(
            error("tokens: [{subject: a, sha256: xyz}]").contains("tokens[0] (\"a\"): sha256"),
            "{}",
            error("tokens: [{subject: a, sha256: xyz}]")
        );
        let hash = token_hash_hex("t");
        assert!(
            error(&format!(
                "tokens: [{{subject: a, sha256: {hash}, roles: [root]}}]"
            ))
            .contains("tokens[0] (\"a\"): roles: \"root\" is not a role")
        );
        assert!(
            error(&format!(
                "tokens: [{{subject: a, sha256: {hash}}}, {{subject: b, sha256: {hash}}}]"
            ))
            .contains("tokens[1] (\"b\"): the same token hash appears twice")
        );
        assert!(
            error(&format!("tokens: [{{subject: '', sha256: {hash}}}]"))
                .contains("subject is required")
        );
        assert!(
            error("tokens: [{subject: a, sha256: x, role: [admin]}]").contains("unknown field")
        );
        assert!(error("certificates: [{subject: a}, {subject: a}]").contains("appears twice"));
        assert!(error("users: []").contains("unknown field"));
    }

    #[test]
    fn an_empty_file_has_nobody() {
        let file = AuthFile::parse("{}").unwrap();
        assert_eq!(file.token_count() + file.certificate_count(), 0);
    }

    #[test]
    fn new_tokens_are_long_and_distinct() {
        let (a, hash) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("tf_") && a.len() == 67);
        assert_eq!(hash, token_hash_hex(&a));
    }
}

//! Resolving named secrets where a request is sent (the orchestrator for `http` sources, the
//! executor for `http` tasks), from this process's own environment and files; never stored,
//! logged, traced or counted.
//!
//! A secret `NAME` is the variable `TASKFACTORY_SECRET_<NAME>`, else the file `<NAME>` in
//! `TASKFACTORY_SECRETS_DIR` (read at each use, so a rotated file is picked up; one trailing
//! newline is dropped). It goes only into the header its reference names, only to the hosts
//! `TASKFACTORY_SECRETS_HOSTS` binds it to ([`taskfactory_model::secrets::SecretBindings`]), as a
//! header value marked sensitive, over a client that follows no redirect to another origin.
//! Errors name the secret, never its value.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret as _, SecretString};
use taskfactory_model::secrets::{self, SecretBindings};
use taskfactory_proto::v1::SecretRef;

/// The prefix of the variables that hold secrets.
pub const ENV_PREFIX: &str = "TASKFACTORY_SECRET_";

/// The largest secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where secrets come from, and where they may go.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SecretArgs {
    /// A directory of secret files, one per secret, named as the secret (e.g. a mounted
    /// Kubernetes Secret); a `TASKFACTORY_SECRET_<NAME>` variable wins over a file.
    #[arg(
        id = "secrets_dir",
        long = "secrets-dir",
        env = "TASKFACTORY_SECRETS_DIR"
    )]
    pub dir: Option<PathBuf>,
    /// The hosts each secret may be sent to: `NAME=host[,host…]`, entries separated by `;`
    /// (hosts as in the egress allow-list: `api.example.com`, `*.example.com`, `host:port`). A
    /// secret bound to no host is sent nowhere.
    #[arg(
        id = "secrets_hosts",
        long = "secrets-hosts",
        env = "TASKFACTORY_SECRETS_HOSTS",
        default_value = ""
    )]
    pub hosts: String,
}

/// Why a secret was not used. Never holds the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret {name:?} is not set: give it as {ENV_PREFIX}{name} or as the file {name} in TASKFACTORY_SECRETS_DIR"
    )]
    Unknown { name: String },
    #[error("secret {name:?}: cannot read {path}")]
    Unreadable {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {name:?}: its file {path} is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { name: String, path: PathBuf },
    #[error(
        "secret {name:?} is not a valid header value (it holds a line break or a control character)"
    )]
    NotAHeaderValue { name: String },
    #[error("{0}")]
    NotBound(String),
    #[error("secret reference for header {header:?}: {problem}")]
    BadReference { header: String, problem: String },
}

/// Resolves secrets for one service.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    dir: Option<PathBuf>,
    bindings: SecretBindings,
}

impl Secrets {
    /// Checks the settings (a malformed binding is an error naming it).
    pub fn new(args: &SecretArgs) -> Result<Self, String> {
        Ok(Self {
            dir: args.dir.clone(),
            bindings: SecretBindings::parse(&args.hosts)?,
        })
    }

    /// The value of secret `name` (checked as a name first: it is also a file name).
    fn value(&self, name: &str) -> Result<SecretString, SecretError> {
        if let Some(problem) = secrets::name_error(name) {
            return Err(SecretError::BadReference {
                header: String::new(),
                problem,
            });
        }
        if let Ok(value) = std::env::var(format!("{ENV_PREFIX}{name}")) {
            return Ok(SecretString::from(value));
        }
        let Some(dir) = &self.dir else {
            return Err(SecretError::Unknown {
                name: name.to_owned(),
            });
        };
        read_file(name, &dir.join(name))
    }

    /// The headers of `references` for a request to `url`: each secret resolved, checked
    /// against its hosts, prefixed, and marked sensitive (so no `Debug` shows it).
    pub fn headers<'a>(
        &self,
        references: impl IntoIterator<Item = (&'a String, &'a SecretRef)>,
        url: &reqwest::Url,
    ) -> Result<reqwest::header::HeaderMap, SecretError> {
        let mut headers = reqwest::header::HeaderMap::new();
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(0);
        for (header, reference) in references {
            let bad = |problem: String| SecretError::BadReference {
                header: header.clone(),
                problem,
            };
            let name = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| bad("not an HTTP header name".to_owned()))?;
            if let Some(problem) = secrets::name_error(&reference.secret) {
                return Err(bad(problem));
            }
            self.bindings
                .check(&reference.secret, url.scheme(), host, port)
                .map_err(SecretError::NotBound)?;
            let value = self.value(&reference.secret)?;
            let mut text = String::with_capacity(reference.prefix.len() + 64);
            text.push_str(&reference.prefix);
            text.push_str(value.expose_secret());
            let mut value = reqwest::header::HeaderValue::from_str(&text).map_err(|_| {
                SecretError::NotAHeaderValue {
                    name: reference.secret.clone(),
                }
            })?;
            // Scrub our copy; the header value is what is sent.
            drop(SecretString::from(text));
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(headers)
    }
}

fn read_file(name: &str, path: &Path) -> Result<SecretString, SecretError> {
    let unreadable = |source| SecretError::Unreadable {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(SecretError::Unknown {
                name: name.to_owned(),
            });
        }
        Err(error) => return Err(unreadable(error)),
    };
    if metadata.len() > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    let mut text = std::fs::read_to_string(path).map_err(unreadable)?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(secret: &str, prefix: &str) -> (String, SecretRef) {
        (
            "Authorization".to_owned(),
            SecretRef {
                secret: secret.to_owned(),
                prefix: prefix.to_owned(),
            },
        )
    }

    #[test]
    fn secrets_come_from_files_go_to_their_hosts_and_never_show() {
        let dir = std::env::temp_dir().join(format!("tf-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("API_KEY"), "s3cr3t-value\n").unwrap();
        std::fs::write(dir.join("BROKEN"), "a\nb").unwrap();
        let secrets = Secrets::new(&SecretArgs {
            dir: Some(dir.clone()),
            hosts: "API_KEY=api.example.com;BROKEN=api.example.com;MISSING=api.example.com"
                .to_owned(),
        })
        .unwrap();
        let url = reqwest::Url::parse("https://api.example.com/v1").unwrap();
        let (header, r) = reference("API_KEY", "Bearer ");
        let headers = secrets.headers([(&header, &r)], &url).unwrap();
        let value = &headers["authorization"];
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t-value");
        assert!(value.is_sensitive());
        assert!(!format!("{headers:?}").contains("s3cr3t"));

        let elsewhere = reqwest::Url::parse("https://evil.example.net/").unwrap();
        let error = secrets.headers([(&header, &r)], &elsewhere).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("may not be sent to evil.example.net")
        );
        let (header, r) = reference("MISSING", "");
        let error = secrets.headers([(&header, &r)], &url).unwrap_err();
        assert!(
            error.to_string().contains("\"MISSING\" is not set"),
            "{error}"
        );
        let (header, r) = reference("BROKEN", "");
        let error = secrets.headers([(&header, &r)], &url).unwrap_err();
        assert!(
            error.to_string().contains("not a valid header value"),
            "{error}"
        );
        assert!(!error.to_string().contains("a\nb"));
        let (header, r) = reference("../API_KEY", "");
        assert!(secrets.headers([(&header, &r)], &url).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! What a client of the admin API sends: a bearer token (if it has one) and the current trace
//! context. `apply` and the tests use it; so can any Rust client:
//! `AdminServiceClient::with_interceptor(channel, Credentials::bearer(token)?)`.

use tonic::metadata::{Ascii, MetadataValue};

/// A tonic interceptor adding `authorization: Bearer <token>` and `traceparent`.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// No token (a loopback API without authentication, or a client certificate).
    pub fn none() -> Self {
        Self::default()
    }

    /// A bearer token; refused if it cannot be a header value.
    pub fn bearer(token: &str) -> Result<Self, String> {
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
        Ok(Self {
            authorization: Some(value),
        })
    }

    /// From an optional token (empty = none).
    pub fn from_token(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            Some(token) => Self::bearer(token),
            None => Ok(Self::none()),
        }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = taskfactory_runtime::propagation::GrpcClientTrace.call(request)?;
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How a client reaches the admin API: its URL, a token, and TLS (the server's CA, and a client
/// certificate for mutual TLS).
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The admin API (`https://…` when it serves TLS).
    #[arg(
        long = "admin-url",
        env = "TASKFACTORY_ADMIN_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub admin_url: String,
    /// A bearer token (from the auth file's owner, or an OIDC access token).
    #[arg(long = "token", env = "TASKFACTORY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS: the CA that signed the admin API's certificate (PEM); else the public web's roots.
    #[arg(long = "admin-ca", env = "TASKFACTORY_ADMIN_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's certificate (PEM).
    #[arg(long = "admin-cert", env = "TASKFACTORY_ADMIN_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's private key (PEM).
    #[arg(long = "admin-key", env = "TASKFACTORY_ADMIN_KEY")]
    pub key: Option<std::path::PathBuf>,
}

/// An admin API client with credentials and trace context.
pub type AdminClient = taskfactory_proto::v1::admin_service_client::AdminServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>,
>;

impl ClientArgs {
    pub async fn connect(&self) -> anyhow::Result<AdminClient> {
        use anyhow::Context as _;
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.admin_url.clone())
            .with_context(|| format!("admin URL {:?}", self.admin_url))?;
        if self.admin_url.starts_with("https://") || self.ca.is_some() || self.cert.is_some() {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            match &self.ca {
                Some(ca) => {
                    let pem =
                        std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                    tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                }
                None => tls = tls.with_webpki_roots(),
            }
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => {
                    let cert = std::fs::read(cert)
                        .with_context(|| format!("reading {}", cert.display()))?;
                    let key =
                        std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                    tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => anyhow::bail!("--admin-cert and --admin-key go together"),
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("the admin API's TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the admin API at {}", self.admin_url))?;
        let credentials =
            Credentials::from_token(self.token.as_deref()).map_err(anyhow::Error::msg)?;
        Ok(
            taskfactory_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
                channel,
                credentials,
            ),
        )
    }
}

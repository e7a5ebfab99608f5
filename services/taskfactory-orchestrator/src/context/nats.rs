//! `kv` and `request` sources: NATS, kept away from the control plane.
//!
//! A `kv` entry is read by direct get only (the entry as it is stored, one message: what
//! `Sources::most_held` counts on); a bucket that does not allow it is refused.
//!
//! The rendered subject, bucket and key are judged by [`taskfactory_model::sources`] before
//! anything is sent: never JetStream's API, our KV buckets, system or inbox subjects or our own
//! streams' subjects; only what the operator allow-listed. Sources can also run under a NATS
//! identity of their own ([`SourcesNatsArgs`]), so the server's permissions bound them too: when
//! one is configured, `kv` and `request` sources use that connection and no other.

use std::path::PathBuf;

use taskfactory_model::sources::{self, BucketAllowList, SubjectAllowList};
use taskfactory_model::values;
use taskfactory_proto::v1::{KvSource, RequestSource};
use taskfactory_runtime::config::NatsArgs;

use super::Sources;

/// NATS settings of the connection `kv` and `request` sources use. With none of them set,
/// sources share the orchestrator's connection; with any, they get their own.
#[derive(Clone, Debug, clap::Args)]
pub struct SourcesNatsArgs {
    /// NATS server(s) for sources (default: NATS_URL) — setting any `--sources-nats-*` flag gives
    /// `kv` and `request` sources a connection of their own, under their own identity.
    #[arg(
        id = "sources_nats_url",
        long = "sources-nats-url",
        env = "TASKFACTORY_SOURCES_NATS_URL"
    )]
    pub url: Option<String>,
    /// The sources' NATS credentials file (JWT + NKey).
    #[arg(
        id = "sources_nats_creds",
        long = "sources-nats-creds",
        env = "TASKFACTORY_SOURCES_NATS_CREDS"
    )]
    pub creds: Option<PathBuf>,
    /// The sources' NATS user (with --sources-nats-password).
    #[arg(
        id = "sources_nats_user",
        long = "sources-nats-user",
        env = "TASKFACTORY_SOURCES_NATS_USER"
    )]
    pub user: Option<String>,
    /// The sources' NATS password.
    #[arg(
        id = "sources_nats_password",
        long = "sources-nats-password",
        env = "TASKFACTORY_SOURCES_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// The sources' NATS token.
    #[arg(
        id = "sources_nats_token",
        long = "sources-nats-token",
        env = "TASKFACTORY_SOURCES_NATS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// TLS: the CA(s) of the sources' server (default: NATS_CA).
    #[arg(
        id = "sources_nats_ca",
        long = "sources-nats-ca",
        env = "TASKFACTORY_SOURCES_NATS_CA"
    )]
    pub ca: Option<PathBuf>,
    /// TLS: the sources' client certificate (never the orchestrator's own: that is its identity).
    #[arg(
        id = "sources_nats_cert",
        long = "sources-nats-cert",
        env = "TASKFACTORY_SOURCES_NATS_CERT"
    )]
    pub cert: Option<PathBuf>,
    /// TLS: the sources' client certificate key.
    #[arg(
        id = "sources_nats_key",
        long = "sources-nats-key",
        env = "TASKFACTORY_SOURCES_NATS_KEY"
    )]
    pub key: Option<PathBuf>,
    /// The prefix of the sources' reply subjects (the shipped permissions let the `sources` user
    /// read replies under `_INBOX_sources` only).
    #[arg(
        id = "sources_nats_inbox_prefix",
        long = "sources-nats-inbox-prefix",
        env = "TASKFACTORY_SOURCES_NATS_INBOX_PREFIX",
        default_value = "_INBOX_sources"
    )]
    pub inbox_prefix: String,
}

impl Default for SourcesNatsArgs {
    /// None set: sources share the orchestrator's connection.
    fn default() -> Self {
        Self {
            url: None,
            creds: None,
            user: None,
            password: None,
            token: None,
            ca: None,
            cert: None,
            key: None,
            inbox_prefix: "_INBOX_sources".to_owned(),
        }
    }
}

impl SourcesNatsArgs {
    /// The sources' own connection settings, or `None` when none are configured. The server
    /// URL, the CA and "TLS required" default to the orchestrator's; credentials and the client
    /// certificate never do.
    pub fn nats_args(&self, main: &NatsArgs) -> Option<NatsArgs> {
        let configured = self.url.is_some()
            || self.creds.is_some()
            || self.user.is_some()
            || self.password.is_some()
            || self.token.is_some()
            || self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some();
        configured.then(|| NatsArgs {
            url: self.url.clone().unwrap_or_else(|| main.url.clone()),
            creds: self.creds.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            ca: self.ca.clone().or_else(|| main.ca.clone()),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls: main.tls,
            stream_replicas: main.stream_replicas,
            max_deliveries: main.max_deliveries,
            declare_every: main.declare_every,
            inbox_prefix: self.inbox_prefix.clone(),
        })
    }
}

/// The NATS side of the sources: the connection and the allow-lists.
pub struct NatsSources {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub subjects: SubjectAllowList,
    pub buckets: BucketAllowList,
}

impl Sources {
    pub(super) async fn kv(
        &self,
        kv: &KvSource,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let bucket = self.render("bucket", &kv.bucket, scope)?;
        let key = self.render("key", &kv.key, scope)?;
        sources::check_kv(&bucket, &key, &self.nats.buckets).map_err(|e| e.to_string())?;
        let store = self
            .nats
            .js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("KV bucket {bucket:?}: {e}"))?;
        // Without direct get an entry comes base64-encoded in a JSON answer, and is decoded
        // beside it: several times the bytes `Sources::most_held` takes room for.
        if !store.stream.cached_info().config.allow_direct {
            return Err(format!(
                "KV bucket {bucket:?} does not allow direct get (its stream KV_{bucket} has allow_direct off); kv sources read only buckets that do (buckets made since NATS 2.9 do; `nats stream edit KV_{bucket} --allow-direct` turns it on)"
            ));
        }
        let entry = store
            .get(&key)
            .await
            .map_err(|e| format!("KV {bucket}/{key}: {e}"))?
            .ok_or_else(|| format!("KV {bucket}/{key}: no such key"))?;
        self.decode(&entry, &format!("KV {bucket}/{key}"))
    }

    pub(super) async fn request(
        &self,
        request: &RequestSource,
        scope: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let subject = self.render("subject", &request.subject, scope)?;
        sources::check_request_subject(&subject, &self.nats.subjects).map_err(|e| e.to_string())?;
        let payload = request
            .payload
            .as_ref()
            .map(|p| self.render_json("payload", &values::value_to_json(p), scope))
            .transpose()?
            .unwrap_or(serde_json::Value::Null);
        let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        taskfactory_runtime::propagation::inject_nats(&tracing::Span::current(), &mut headers);
        let reply = self
            .nats
            .client
            .request_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| format!("request to {subject}: {e}"))?;
        self.decode(&reply.payload, &format!("the reply from {subject}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_get_their_own_connection_only_when_configured_and_never_the_orchestrators_identity()
    {
        let mut main = NatsArgs::local("nats://a:4222");
        main.user = Some("orchestrator".to_owned());
        main.password = Some("p".to_owned());
        main.ca = Some("/ca.pem".into());
        main.cert = Some("/orchestrator.pem".into());
        main.key = Some("/orchestrator.key".into());
        assert!(SourcesNatsArgs::default().nats_args(&main).is_none());
        let own = SourcesNatsArgs {
            user: Some("sources".to_owned()),
            password: Some("q".to_owned()),
            ..SourcesNatsArgs::default()
        }
        .nats_args(&main)
        .unwrap();
        assert_eq!(own.url, "nats://a:4222");
        assert_eq!(own.user.as_deref(), Some("sources"));
        assert_eq!(own.ca, main.ca, "the server is the same: so is its CA");
        assert_eq!(
            own.cert, None,
            "the orchestrator's certificate is its identity"
        );
        assert_eq!(own.key, None);
    }
}

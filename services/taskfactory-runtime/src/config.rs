//! Flags shared by the services. Every flag has an environment variable and a default that works
//! on a developer machine.

use std::time::Duration;

#[derive(Clone, Debug, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        id = "nats_url",
        long = "nats-url",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// A NATS credentials file (JWT + NKey).
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub creds: Option<std::path::PathBuf>,
    /// NATS user (with --nats-password).
    #[arg(long = "nats-user", env = "NATS_USER")]
    pub user: Option<String>,
    /// NATS password.
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// NATS token.
    #[arg(long = "nats-token", env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The first token of this connection's reply subjects (`<prefix>.<id>`). Give each NATS
    /// user its own (`_INBOX_trigger`) and allow it to subscribe to that alone, so that no user
    /// can read another's replies through `_INBOX.>`.
    #[arg(
        long = "nats-inbox-prefix",
        env = "NATS_INBOX_PREFIX",
        default_value = "_INBOX"
    )]
    pub inbox_prefix: String,
    /// TLS: a PEM file of the CA(s) that signed the server's certificate (else the system's web
    /// roots). `tls://` URLs and servers that require TLS use TLS; this also turns it on.
    #[arg(long = "nats-ca", env = "NATS_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// TLS: this service's client certificate (PEM), for servers that verify clients.
    #[arg(long = "nats-cert", env = "NATS_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// TLS: the client certificate's private key (PEM, PKCS#8).
    #[arg(long = "nats-key", env = "NATS_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// Refuse to talk to NATS without TLS.
    #[arg(long = "nats-tls", env = "NATS_TLS", default_value_t = false)]
    pub tls: bool,
    /// Replicas of each stream this service declares (3 on a production cluster).
    #[arg(
        long = "stream-replicas",
        env = "TASKFACTORY_STREAM_REPLICAS",
        default_value_t = 1
    )]
    pub stream_replicas: usize,

    /// Deliveries of one message a consumer allows before it gives up on it: a message whose
    /// handler keeps failing (or crashing) is then dead-lettered with its last error, never
    /// redelivered again. Transient failures back off between deliveries (1 s doubling to 30 s),
    /// so the default rides out about 8 minutes of a database or NATS outage. Executors allow a
    /// task's own attempts plus this many, at most 20 (the attempt numbers the orchestrator
    /// accepts past a task's attempts). Results and events are never given up on.
    #[arg(
        long = "max-deliveries",
        env = "TASKFACTORY_MAX_DELIVERIES",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(2..)
    )]
    pub max_deliveries: u32,

    /// How often each service looks at the streams and KV buckets it needs and declares again
    /// any that were deleted or changed.
    #[arg(long = "declare-every", env = "TASKFACTORY_DECLARE_EVERY", default_value = "5s", value_parser = parse_duration)]
    pub declare_every: Duration,
}

impl NatsArgs {
    pub fn local(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            creds: None,
            user: None,
            password: None,
            token: None,
            inbox_prefix: "_INBOX".to_owned(),
            ca: None,
            cert: None,
            key: None,
            tls: false,
            stream_replicas: 1,
            max_deliveries: 20,
            declare_every: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL; the database is created if it does not exist.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/taskfactory"
    )]
    pub url: String,
    /// Connections in the pool.
    #[arg(
        long = "database-pool-size",
        env = "TASKFACTORY_DATABASE_POOL_SIZE",
        default_value_t = 10
    )]
    pub pool_size: u32,
}

impl DatabaseArgs {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 10,
        }
    }
}

/// How a service starts and stops.
#[derive(Clone, Debug, clap::Args)]
pub struct LifecycleArgs {
    /// How long to wait for NATS (and Postgres) at start.
    #[arg(long = "startup-patience", env = "TASKFACTORY_STARTUP_PATIENCE", default_value = "60s", value_parser = parse_duration)]
    pub startup_patience: Duration,
    /// At shutdown, how long work in hand may take to finish before it is left for redelivery.
    #[arg(long = "drain-timeout", env = "TASKFACTORY_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Where to serve `/metrics` (Prometheus), and `/healthz` and `/readyz` unless
    /// `--probe-addr` is set, e.g. `0.0.0.0:9464`; off if unset.
    #[arg(long = "metrics-addr", env = "TASKFACTORY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to serve `/healthz` and `/readyz` apart from the metrics, e.g. `0.0.0.0:9465`.
    #[arg(long = "probe-addr", env = "TASKFACTORY_PROBE_ADDR")]
    pub probe_addr: Option<std::net::SocketAddr>,
}

impl Default for LifecycleArgs {
    fn default() -> Self {
        Self {
            startup_patience: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            metrics_addr: None,
            probe_addr: None,
        }
    }
}

/// Parses a humane duration flag: `30s`, `250ms`, `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len()),
    );
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 250ms or 5m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}

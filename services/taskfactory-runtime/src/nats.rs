//! NATS: connecting, and declaring the streams every service relies on.
//!
//! Each service declares all streams at start, idempotently (create, or update to this config), so
//! a fresh NATS just works whichever service starts first.

use crate::telemetry::error_chain;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use taskfactory_model::subjects;

use crate::config::NatsArgs;

/// How long the server remembers a `Nats-Msg-Id` to drop a repeated publish. Postgres uniqueness
/// catches what falls outside it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("could not connect to NATS at {url} within {waited:?}")]
    Connect {
        url: String,
        waited: Duration,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("could not read NATS credentials file")]
    Credentials(#[source] std::io::Error),
    #[error("NATS TLS: {0}")]
    Tls(String),
    #[error("could not declare stream {0}: JetStream did not answer for a minute")]
    StreamUnavailable(String),
    #[error("could not declare stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
}

/// Connects, retrying for up to `patience` while the server is not reachable yet.
pub async fn connect(
    args: &NatsArgs,
    client_name: &str,
    patience: Duration,
) -> Result<async_nats::Client, NatsError> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut options = match &args.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(NatsError::Credentials)?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&args.user, &args.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &args.token {
            options = options.token(token.clone());
        }
        options = tls_options(args, options)?;
        options = options
            .name(client_name)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)));
        match options.connect(server_urls(&args.url)).await {
            Ok(client) => return Ok(client),
            Err(source) => {
                let waited = started.elapsed();
                if waited >= patience {
                    return Err(NatsError::Connect {
                        url: args.url.clone(),
                        waited,
                        source,
                    });
                }
                tracing::warn!(url = %args.url, error = %error_chain(&source), "nats not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The servers of a `NATS_URL`: one URL, or several separated by commas (the client connects to
/// one and fails over to the others, and to those the cluster announces).
pub fn server_urls(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The TLS settings, checked before the first attempt so that a wrong path or half a key pair is
/// an error that names it, not a connection failure retried until patience runs out.
fn tls_options(
    args: &NatsArgs,
    mut options: async_nats::ConnectOptions,
) -> Result<async_nats::ConnectOptions, NatsError> {
    let readable = |flag: &str, path: &std::path::Path| {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| NatsError::Tls(format!("{flag} {}: {e}", path.display())))
    };
    if let Some(ca) = &args.ca {
        readable("NATS_CA", ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            readable("NATS_CERT", cert)?;
            readable("NATS_KEY", key)?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        (Some(_), None) => {
            return Err(NatsError::Tls(
                "NATS_CERT is set but NATS_KEY is not: a client certificate needs its key".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(NatsError::Tls(
                "NATS_KEY is set but NATS_CERT is not: a key needs its client certificate".into(),
            ));
        }
        (None, None) => {}
    }
    if args.tls {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// Connects and declares every stream: what each service does first.
pub async fn connect_and_declare(
    args: &NatsArgs,
    client_name: &str,
    patience: Duration,
) -> Result<(async_nats::Client, jetstream::Context), NatsError> {
    let client = connect(args, client_name, patience).await?;
    let js = jetstream::new(client.clone());
    declare_streams(&js, args.stream_replicas).await?;
    Ok((client, js))
}

/// The configuration of each stream.
pub fn stream_configs(replicas: usize) -> Vec<stream::Config> {
    let day = Duration::from_secs(24 * 3600);
    let base = |name: &str, subject: &str, max_age: Duration| stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        duplicate_window: DUPLICATE_WINDOW,
        max_age,
        ..Default::default()
    };
    vec![
        stream::Config {
            description: Some("events users publish (JSON); the trigger service consumes them".to_owned()),
            ..base(subjects::EVENTS_STREAM, subjects::EVENTS_SUBJECTS, 7 * day)
        },
        stream::Config {
            description: Some("TriggerEvents: one per fire; orchestrators consume them".to_owned()),
            ..base(subjects::TRIGGERS_STREAM, subjects::TRIGGERS_SUBJECTS, 7 * day)
        },
        stream::Config {
            description: Some("TaskInstances by type; executors consume them".to_owned()),
            retention: stream::RetentionPolicy::WorkQueue,
            ..base(subjects::TASKS_STREAM, subjects::TASKS_SUBJECTS, 14 * day)
        },
        stream::Config {
            description: Some("TaskResults, one per attempt; orchestrators consume them".to_owned()),
            ..base(subjects::RESULTS_STREAM, subjects::RESULTS_SUBJECTS, 7 * day)
        },
        stream::Config {
            description: Some("dead letters: tasks that exhausted their attempts, events that could not be taken in".to_owned()),
            ..base(subjects::DLQ_STREAM, subjects::DLQ_SUBJECTS, 30 * day)
        },
    ]
}

/// Declares every stream: creates it, or updates it to this configuration. A stream whose
/// existing configuration cannot be changed that way (an operator's choice) is kept as it is.
///
/// Several services (and replicas) declare the same streams at once, and a clustered JetStream
/// may answer slowly while it places a replicated stream or elects its leader: a stream that
/// already has our configuration is left alone (no update, no Raft proposal), and a declaration
/// that times out or finds JetStream briefly unavailable is retried for up to a minute.
pub async fn declare_streams(js: &jetstream::Context, replicas: usize) -> Result<(), NatsError> {
    for config in stream_configs(replicas) {
        declare_stream(js, config).await?;
    }
    Ok(())
}

async fn declare_stream(js: &jetstream::Context, config: stream::Config) -> Result<(), NatsError> {
    use jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
    let name = config.name.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(200);
    loop {
        let transient = match js.get_stream(&name).await {
            Ok(mut stream) => {
                let current = match stream.info().await {
                    Ok(info) => info.config.clone(),
                    Err(error) => {
                        tracing::debug!(stream = %name, error = %error, "stream info failed; retrying");
                        continue_after(&mut delay, deadline, &name).await?;
                        continue;
                    }
                };
                if same_settings(&current, &config) {
                    return Ok(());
                }
                match js.update_stream(config.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(error) if is_transient(error.kind()) => error,
                    Err(error) => {
                        tracing::warn!(stream = %name, error = %error_chain(&error), "stream exists with a configuration that cannot be updated; keeping it");
                        return Ok(());
                    }
                }
            }
            Err(error)
                if matches!(error.kind(), GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                match js.create_stream(config.clone()).await {
                    Ok(_) => return Ok(()),
                    // Another service created it meanwhile: compare with what it made.
                    Err(error)
                        if matches!(error.kind(), CreateStreamErrorKind::JetStream(e)
                            if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
                    {
                        continue_after(&mut delay, deadline, &name).await?;
                        continue;
                    }
                    Err(error) if is_transient(error.kind()) => error,
                    Err(source) => {
                        return Err(NatsError::Stream {
                            stream: name,
                            source,
                        });
                    }
                }
            }
            Err(error) => {
                tracing::debug!(stream = %name, error = %error, "stream lookup failed; retrying");
                continue_after(&mut delay, deadline, &name).await?;
                continue;
            }
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(NatsError::Stream {
                stream: name,
                source: transient,
            });
        }
        tracing::warn!(stream = %name, error = %error_chain(&transient), "declaring the stream failed for now; retrying");
        continue_after(&mut delay, deadline, &name).await?;
    }
}

/// Waits before the next try, or gives up at the deadline.
async fn continue_after(
    delay: &mut Duration,
    deadline: tokio::time::Instant,
    stream: &str,
) -> Result<(), NatsError> {
    if tokio::time::Instant::now() >= deadline {
        return Err(NatsError::StreamUnavailable(stream.to_owned()));
    }
    tokio::time::sleep(*delay).await;
    *delay = (*delay * 2).min(Duration::from_secs(3));
    Ok(())
}

/// Failures worth another try: the cluster was busy or electing, not a refusal.
fn is_transient(kind: jetstream::context::CreateStreamErrorKind) -> bool {
    use jetstream::context::CreateStreamErrorKind;
    match kind {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
        CreateStreamErrorKind::JetStream(error) => {
            error.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
        }
        _ => false,
    }
}

/// Whether an existing stream already has every setting we declare (the server fills in the
/// others).
fn same_settings(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects == wanted.subjects
        && current.retention == wanted.retention
        && current.storage == wanted.storage
        && current.num_replicas == wanted.num_replicas
        && current.duplicate_window == wanted.duplicate_window
        && current.max_age == wanted.max_age
        && current.description == wanted.description
}

/// Brings an existing KV bucket to `replicas`: a deployment that grew from one NATS server to a
/// cluster, or whose `TASKFACTORY_STREAM_REPLICAS` changed, gets its buckets replicated like its
/// streams (a bucket is the stream `KV_<bucket>`; the server moves it).
pub async fn ensure_bucket_replicas(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<(), async_nats::Error> {
    let replicas = replicas.max(1);
    let mut stream = js.get_stream(format!("KV_{bucket}")).await?;
    let config = stream.info().await?.config.clone();
    if config.num_replicas != replicas {
        let from = config.num_replicas;
        js.update_stream(stream::Config {
            num_replicas: replicas,
            ..config
        })
        .await
        .map_err(|e| {
            format!("changing the replicas of KV bucket {bucket} from {from} to {replicas}: {e}")
        })?;
        tracing::info!(bucket, from, to = replicas, "KV bucket replicas changed");
    }
    Ok(())
}

/// The KV bucket of cancelled runs (created if absent): the orchestrator writes a run's id there
/// before it acknowledges a cancel; executors read it before each attempt and watch it.
pub async fn cancelled_runs(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, async_nats::Error> {
    let bucket = taskfactory_model::subjects::CANCELLED_RUNS_BUCKET;
    match js.get_key_value(bucket).await {
        Ok(store) => {
            ensure_bucket_replicas(js, bucket, replicas).await?;
            Ok(store)
        }
        Err(_) => Ok(js
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.to_owned(),
                description: "taskfactory: cancelled runs (executors skip their tasks)".to_owned(),
                history: 1,
                // Long enough for any task message still queued to be skipped.
                max_age: std::time::Duration::from_secs(14 * 24 * 3600),
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_may_list_several_servers() {
        assert_eq!(server_urls("nats://a:4222"), vec!["nats://a:4222"]);
        assert_eq!(
            server_urls("nats://a:4222, tls://b:4223,,c"),
            vec!["nats://a:4222", "tls://b:4223", "c"]
        );
    }
}

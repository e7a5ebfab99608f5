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
    #[error("NATS_INBOX_PREFIX {0}")]
    InboxPrefix(String),
    #[error("could not declare stream {stream} within a minute: {reason}")]
    StreamUnavailable { stream: String, reason: String },
    #[error("cannot use stream {stream}: {reason}")]
    Unusable { stream: String, reason: String },
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
    if let Some(problem) = inbox_prefix_error(&args.inbox_prefix) {
        return Err(NatsError::InboxPrefix(problem));
    }
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
            .custom_inbox_prefix(args.inbox_prefix.as_str())
            .event_callback(log_server_error)
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

/// Logs what the server refuses: without it a denied publish or subscribe is silent, and a denied
/// request only times out. "permissions violation for publish to …" names what the user lacks.
async fn log_server_error(event: async_nats::Event) {
    if let async_nats::Event::ServerError(error) = event {
        tracing::warn!(%error, "the nats server refused something");
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

/// Why `prefix` cannot start reply subjects: it must be a subject without wildcards (the client
/// adds `.<id>` to it).
fn inbox_prefix_error(prefix: &str) -> Option<String> {
    if let Some(problem) = taskfactory_model::subjects::subject_error(prefix, false) {
        return Some(format!("{prefix:?}: {problem}"));
    }
    // Replies under `_…` are out of every task's and source's reach (they never publish there).
    (!prefix.starts_with('_'))
        .then(|| format!("{prefix:?}: an inbox prefix starts with '_' (as _INBOX_trigger does)"))
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
/// existing configuration cannot be changed that way (its retention, storage or mirror differ
/// from ours, or the server refuses the update) is an error that says what an operator must do
/// ([`unusable`]): at start the service exits with it, while running the keeper reports it.
///
/// Several services (and replicas) declare the same streams at once, and a clustered JetStream
/// may answer slowly while it places a replicated stream or elects its leader: a stream that
/// already has our configuration is left alone (no update, no Raft proposal), and a declaration
/// that times out or finds JetStream briefly unavailable is retried for up to a minute.
pub async fn declare_streams(js: &jetstream::Context, replicas: usize) -> Result<(), NatsError> {
    for config in stream_configs(replicas) {
        declare_stream(js, config, false).await?;
    }
    Ok(())
}

/// [`declare_streams`] while running: the same, except that a stream's replicas are only ever
/// raised (replicas of a rolling upgrade that disagree on `TASKFACTORY_STREAM_REPLICAS` would
/// otherwise move the streams back and forth; a lower setting takes effect at start), and that a
/// stream that cannot be declared does not keep the others from being declared: every failure is
/// returned.
pub async fn redeclare_streams(js: &jetstream::Context, replicas: usize) -> Vec<NatsError> {
    let mut failures = Vec::new();
    for config in stream_configs(replicas) {
        if let Err(error) = declare_stream(js, config, true).await {
            failures.push(error);
        }
    }
    failures
}

async fn declare_stream(
    js: &jetstream::Context,
    config: stream::Config,
    only_raise_replicas: bool,
) -> Result<(), NatsError> {
    use jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
    let name = config.name.clone();
    let mut retry = Retry::new(&name);
    loop {
        let stream = match js.get_stream(&name).await {
            Ok(stream) => Some(stream),
            Err(error) => match error.kind() {
                GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    None
                }
                GetStreamErrorKind::JetStream(e) if !transient_code(e.error_code()) => {
                    return Err(NatsError::Unusable {
                        stream: name,
                        reason: error.to_string(),
                    });
                }
                _ => {
                    retry.wait(error.to_string()).await?;
                    continue;
                }
            },
        };
        let Some(mut stream) = stream else {
            match js.create_stream(config.clone()).await {
                Ok(_) => return Ok(()),
                // Another service created it meanwhile: compare with what it made.
                Err(error)
                    if matches!(error.kind(), CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
                {
                    retry.wait(error.to_string()).await?;
                }
                Err(error) if is_transient(error.kind()) => retry.wait(error_chain(&error)).await?,
                Err(source) => {
                    return Err(NatsError::Stream {
                        stream: name,
                        source,
                    });
                }
            }
            continue;
        };
        let current = match stream.info().await {
            Ok(info) => info.config.clone(),
            Err(error) => {
                retry.wait(error.to_string()).await?;
                continue;
            }
        };
        // Settings no update changes: an operator must recreate the stream.
        if let Some(reason) = fixed_difference(&current, &config) {
            return Err(NatsError::Unusable {
                stream: name,
                reason,
            });
        }
        // Our settings over whatever else the stream has (an operator's `max_bytes`, placement
        // or compression stay), including every setting that would make it refuse or lose our
        // messages: a stream tampered with is repaired by the next start (but a sealed one
        // cannot be unsealed: `/readyz` says so).
        let wanted = stream::Config {
            subjects: config.subjects.clone(),
            retention: config.retention,
            storage: config.storage,
            num_replicas: if only_raise_replicas {
                config.num_replicas.max(current.num_replicas)
            } else {
                config.num_replicas
            },
            duplicate_window: config.duplicate_window,
            max_age: config.max_age,
            description: config.description.clone(),
            max_message_size: if (1..MIN_MESSAGE_SIZE).contains(&current.max_message_size) {
                MIN_MESSAGE_SIZE
            } else {
                current.max_message_size
            },
            // A message-count limit drops (or, with discard new, refuses) work not yet done.
            max_messages: current.max_messages.min(0),
            max_messages_per_subject: current.max_messages_per_subject.min(0),
            discard: config.discard,
            discard_new_per_subject: config.discard_new_per_subject,
            no_ack: config.no_ack,
            republish: config.republish.clone(),
            subject_transform: config.subject_transform.clone(),
            // Nothing but our publishers feeds our streams, rolls them up, expires or schedules
            // their messages, or caps their consumers.
            sources: None,
            allow_rollup: false,
            allow_message_ttl: false,
            allow_message_schedules: false,
            allow_message_counter: false,
            max_consumers: current.max_consumers.min(0),
            consumer_limits: current
                .consumer_limits
                .clone()
                .filter(|limits| *limits == stream::ConsumerLimits::default()),
            ..current.clone()
        };
        if wanted == current {
            return Ok(());
        }
        match js.update_stream(wanted).await {
            Ok(_) => return Ok(()),
            // Deleted in between: declare it again.
            Err(error) if matches!(error.kind(), CreateStreamErrorKind::NotFound) => {
                retry.wait(error.to_string()).await?
            }
            Err(error) if is_transient(error.kind()) => retry.wait(error_chain(&error)).await?,
            // Kept as it is, but not silently: `/readyz` names it, and `/healthz` fails if it
            // stays so.
            Err(error) => {
                return Err(NatsError::Unusable {
                    stream: name.clone(),
                    reason: format!(
                        "cannot be updated to our settings ({}); {}",
                        error_chain(&error),
                        recreate_advice(&name)
                    ),
                });
            }
        }
    }
}

/// How a stream of ours that differs from us in a setting no update changes differs, if it does:
/// its retention (`FACTORY_TASKS` must be a work queue, or acked tasks stay in it and every
/// consumer created again replays them), its storage, or a mirror in place of its subjects.
fn fixed_difference(current: &stream::Config, ours: &stream::Config) -> Option<String> {
    let mut differences = Vec::new();
    if current.retention != ours.retention {
        differences.push(format!(
            "retention {:?} (ours: {:?})",
            current.retention, ours.retention
        ));
    }
    if current.storage != ours.storage {
        differences.push(format!(
            "storage {:?} (ours: {:?})",
            current.storage, ours.storage
        ));
    }
    if current.mirror.is_some() {
        differences.push("a mirror (ours takes its own subjects)".to_owned());
    }
    if differences.is_empty() {
        return None;
    }
    Some(format!(
        "was created with {}, which no update changes; {}",
        differences.join(" and "),
        recreate_advice(&current.name)
    ))
}

/// What an operator does about a stream of ours that cannot be repaired in place.
fn recreate_advice(stream: &str) -> String {
    let held = if stream == subjects::TASKS_STREAM {
        "the orchestrator publishes the tasks still to be run again from Postgres"
    } else {
        "the messages it holds are lost with it"
    };
    format!(
        "delete it (nats stream rm {stream}) and the services declare it again within TASKFACTORY_DECLARE_EVERY ({held})"
    )
}

/// The smallest per-message limit an operator may set on our streams (a smaller one is lifted).
const MIN_MESSAGE_SIZE: i32 = 1024 * 1024;

/// Why a stream of ours takes no messages as configured, or cannot be declared as ours, if so.
pub fn unusable(config: &stream::Config) -> Option<String> {
    let ours = stream_configs(1)
        .into_iter()
        .find(|ours| ours.name == config.name);
    if let Some(difference) = ours.and_then(|ours| fixed_difference(config, &ours)) {
        return Some(difference);
    }
    if config.sealed {
        return Some(
            "is sealed: it takes no message and cannot be unsealed; recreate it".to_owned(),
        );
    }
    if (1..i64::from(MIN_MESSAGE_SIZE)).contains(&config.max_bytes) {
        return Some(format!("holds at most {} bytes", config.max_bytes));
    }
    if (1..MIN_MESSAGE_SIZE).contains(&config.max_message_size) {
        return Some(format!(
            "takes messages of at most {} bytes",
            config.max_message_size
        ));
    }
    None
}

/// Waits between tries of a declaration with a growing delay, up to a minute in all; then fails
/// with the last reason.
struct Retry<'a> {
    what: &'a str,
    deadline: tokio::time::Instant,
    delay: Duration,
}

impl<'a> Retry<'a> {
    fn new(what: &'a str) -> Self {
        Self {
            what,
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
            delay: Duration::from_millis(200),
        }
    }

    async fn wait(&mut self, reason: String) -> Result<(), NatsError> {
        if tokio::time::Instant::now() >= self.deadline {
            return Err(NatsError::StreamUnavailable {
                stream: self.what.to_owned(),
                reason,
            });
        }
        tracing::warn!(stream = %self.what, %reason, retry_in = ?self.delay, "JetStream cannot declare this yet; retrying");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(3));
        Ok(())
    }
}

/// Failures worth another try: the cluster was busy, electing, or missing a peer for the
/// replicas (a node restarting), not a refusal.
fn is_transient(kind: jetstream::context::CreateStreamErrorKind) -> bool {
    use jetstream::context::CreateStreamErrorKind;
    match kind {
        CreateStreamErrorKind::TimedOut
        | CreateStreamErrorKind::JetStreamUnavailable
        | CreateStreamErrorKind::Response => true,
        CreateStreamErrorKind::JetStream(error) => transient_code(error.error_code()),
        _ => false,
    }
}

fn transient_code(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode;
    [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::CLUSTER_NOT_LEADER,
    ]
    .contains(&code)
}

/// Brings an existing KV bucket to `replicas`: a deployment that grew from one NATS server to a
/// cluster, or whose `TASKFACTORY_STREAM_REPLICAS` changed, gets its buckets replicated like its
/// streams (a bucket is the stream `KV_<bucket>`; the server moves it). A busy cluster is retried
/// as stream declarations are.
pub async fn ensure_bucket_replicas(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<(), async_nats::Error> {
    let replicas = replicas.max(1);
    let name = format!("KV_{bucket}");
    let mut retry = Retry::new(&name);
    loop {
        let mut stream = js.get_stream(&name).await?;
        let config = stream.info().await?.config.clone();
        if config.num_replicas == replicas {
            return Ok(());
        }
        let from = config.num_replicas;
        match js
            .update_stream(stream::Config {
                num_replicas: replicas,
                ..config
            })
            .await
        {
            Ok(_) => {
                tracing::info!(bucket, from, to = replicas, "KV bucket replicas changed");
                return Ok(());
            }
            Err(error) if is_transient(error.kind()) => retry.wait(error_chain(&error)).await?,
            Err(error) => {
                return Err(format!(
                    "changing the replicas of KV bucket {bucket} from {from} to {replicas}: {}",
                    error_chain(&error)
                )
                .into());
            }
        }
    }
}

/// The KV bucket of cancelled runs: the orchestrator writes a run's id there before it
/// acknowledges a cancel; executors read it before each attempt and watch it.
pub fn cancelled_runs_config(replicas: usize) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: taskfactory_model::subjects::CANCELLED_RUNS_BUCKET.to_owned(),
        description: "taskfactory: cancelled runs (executors skip their tasks)".to_owned(),
        history: 1,
        // Long enough for any task message still queued to be skipped.
        max_age: std::time::Duration::from_secs(14 * 24 * 3600),
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// The KV bucket of finished tasks
/// ([`FINISHED_TASKS_BUCKET`](taskfactory_model::subjects::FINISHED_TASKS_BUCKET)): kept as long as
/// a task message may stay queued.
pub fn finished_tasks_config(replicas: usize) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: taskfactory_model::subjects::FINISHED_TASKS_BUCKET.to_owned(),
        description: "taskfactory: finished tasks (executors never run them again)".to_owned(),
        history: 1,
        max_age: std::time::Duration::from_secs(14 * 24 * 3600),
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// The KV bucket of cancelled runs, created if absent ([`cancelled_runs_config`]).
pub async fn cancelled_runs(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, async_nats::Error> {
    ensure_bucket(js, cancelled_runs_config(replicas)).await
}

/// A KV bucket with this configuration: created if absent, its replicas brought to the
/// configuration's if present.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
) -> Result<jetstream::kv::Store, async_nats::Error> {
    match js.get_key_value(&config.bucket).await {
        Ok(store) => {
            ensure_bucket_replicas(js, &config.bucket, config.num_replicas).await?;
            Ok(store)
        }
        Err(_) => Ok(js.create_key_value(config).await?),
    }
}

/// Keeps the JetStream state a service needs in place while it runs: every
/// [`KEEP_EVERY`] (or `every`), each stream is declared again ([`redeclare_streams`]: created if it
/// was deleted, its settings repaired if they were changed), each of `buckets` is created if it
/// was deleted and its settings put back if they were changed ([`keep_bucket`]), and so is each
/// durable consumer the service consumes from ([`Kept::keep_consumer`],
/// [`crate::messaging::put_back_consumer`]). What it finds is in [`Kept`]: `/readyz` is unready
/// while something is missing or cannot be put back, and `/healthz` fails once the service has
/// been unable to put it back for [`UNRECOVERABLE_AFTER`] while NATS answered, so the platform
/// restarts it.
pub async fn keep_declared(
    js: jetstream::Context,
    replicas: usize,
    buckets: Vec<jetstream::kv::Config>,
    every: Duration,
    kept: std::sync::Arc<Kept>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let problems = tokio::select! {
            _ = shutdown.cancelled() => return,
            problems = keep_once(&js, replicas, &buckets, &kept) => problems,
        };
        // A server that does not answer is the connection's problem (`/readyz` says so), not
        // one a restart of this service would solve.
        let connected = js.client().connection_state() == async_nats::connection::State::Connected;
        kept.record(problems, connected);
    }
}

/// One look of [`keep_declared`]: streams first (buckets and consumers live in them), then
/// buckets, then consumers. Returns what could not be put back.
async fn keep_once(
    js: &jetstream::Context,
    replicas: usize,
    buckets: &[jetstream::kv::Config],
    kept: &Kept,
) -> Vec<String> {
    let mut problems = Vec::new();
    for error in redeclare_streams(js, replicas).await {
        problems.push(error_chain(&error));
    }
    for config in buckets {
        if let Err(problem) = keep_bucket(js, config).await {
            problems.push(problem);
        }
    }
    for (stream, config) in kept.consumers() {
        if let Err(problem) = crate::messaging::put_back_consumer(js, stream, &config).await {
            problems.push(problem);
        }
    }
    problems
}

/// Puts a KV bucket back as `config` declares it: created if it was deleted; its stream's settings
/// that `config` sets (and those that would make it refuse or lose entries) put back if they
/// were changed, its replicas only ever raised.
async fn keep_bucket(
    js: &jetstream::Context,
    config: &jetstream::kv::Config,
) -> Result<(), String> {
    use jetstream::context::GetStreamErrorKind;
    let bucket = &config.bucket;
    let name = format!("KV_{bucket}");
    let stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(error.kind(), GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return match js.create_key_value(config.clone()).await {
                Ok(_) => {
                    tracing::warn!(%bucket, "KV bucket was missing; declared it again");
                    Ok(())
                }
                Err(error) => Err(format!(
                    "KV bucket {bucket} is missing and cannot be declared: {}",
                    error_chain(&error)
                )),
            };
        }
        // Not answered now (an election, a slow server): the next look tries again.
        Err(error) => {
            tracing::debug!(%bucket, error = %error_chain(&error), "cannot look at the KV bucket");
            return Ok(());
        }
    };
    let current = stream.cached_info().config.clone();
    let wanted = bucket_settings(&current, config);
    if wanted == current {
        return Ok(());
    }
    match js.update_stream(wanted).await {
        Ok(_) => {
            tracing::warn!(%bucket, "KV bucket settings were changed; put them back");
            Ok(())
        }
        Err(error) if is_transient(error.kind()) => Ok(()),
        Err(error) => Err(format!(
            "KV bucket {bucket} was changed and cannot be put back ({}); delete it (nats stream rm KV_{bucket}) and the services declare it again within TASKFACTORY_DECLARE_EVERY",
            error_chain(&error)
        )),
    }
}

/// The settings of a bucket's stream `current` once put back to `config`: what
/// `create_key_value` sets from it (history, age, the KV flags), over whatever else it has (an
/// operator's `max_bytes`, placement, compression stay), and nothing that would refuse, drop or
/// copy entries elsewhere.
fn bucket_settings(current: &stream::Config, config: &jetstream::kv::Config) -> stream::Config {
    stream::Config {
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        description: Some(config.description.clone()),
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        // What the server chooses for a bucket created without one.
        duplicate_window: if config.max_age.is_zero() {
            DUPLICATE_WINDOW
        } else {
            config.max_age.min(DUPLICATE_WINDOW)
        },
        num_replicas: config.num_replicas.max(1).max(current.num_replicas),
        max_message_size: if (1..MIN_MESSAGE_SIZE).contains(&current.max_message_size) {
            MIN_MESSAGE_SIZE
        } else {
            current.max_message_size
        },
        max_messages: current.max_messages.min(0),
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        no_ack: false,
        republish: None,
        subject_transform: None,
        sources: None,
        ..current.clone()
    }
}

/// How often [`keep_declared`] looks by default.
pub const KEEP_EVERY: Duration = Duration::from_secs(5);

/// How long [`keep_declared`] may fail to put JetStream state back before `/healthz` fails.
pub const UNRECOVERABLE_AFTER: Duration = Duration::from_secs(120);

/// What [`keep_declared`] found on its last look.
#[derive(Default)]
pub struct Kept {
    state: std::sync::Mutex<KeptState>,
}

#[derive(Default)]
struct KeptState {
    problems: Vec<String>,
    failing_since: Option<std::time::Instant>,
    /// The durable consumers the service consumes from: (stream, our configuration).
    consumers: Vec<(&'static str, jetstream::consumer::pull::Config)>,
}

impl Kept {
    /// Has [`keep_declared`] put this consumer back too when it is deleted or changed; returns
    /// the spec, for [`crate::messaging::consume`] (pass every consumer the service consumes
    /// from through it).
    pub fn keep_consumer(
        &self,
        spec: crate::messaging::ConsumerSpec,
    ) -> crate::messaging::ConsumerSpec {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.consumers.push((spec.stream, spec.config()));
        spec
    }

    fn consumers(&self) -> Vec<(&'static str, jetstream::consumer::pull::Config)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .consumers
            .clone()
    }

    fn record(&self, problems: Vec<String>, connected: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if problems.is_empty() || !connected {
            state.failing_since = None;
        } else {
            for problem in &problems {
                tracing::error!(%problem, "cannot put JetStream state back");
            }
            state
                .failing_since
                .get_or_insert_with(std::time::Instant::now);
        }
        state.problems = problems;
    }

    /// What is wrong right now, if anything.
    pub fn problems(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .problems
            .clone()
    }

    /// Why the service cannot recover by itself, once it has failed for `after`.
    pub fn unrecoverable(&self, after: Duration) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = state.failing_since?;
        (since.elapsed() >= after).then(|| {
            format!(
                "JetStream state could not be put back for {}s: {}",
                since.elapsed().as_secs(),
                state.problems.join("; ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbox_prefix_must_be_a_plain_subject() {
        assert_eq!(inbox_prefix_error("_INBOX"), None);
        assert_eq!(inbox_prefix_error("_INBOX_trigger"), None);
        assert_eq!(inbox_prefix_error("_INBOX.trigger"), None);
        assert!(inbox_prefix_error("replies.trigger").is_some());
        for bad in ["", "_INBOX.>", "_INBOX.*", "_INBOX.", "in box"] {
            assert!(inbox_prefix_error(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_service_is_unrecoverable_only_after_failing_for_the_whole_period() {
        let kept = Kept::default();
        assert_eq!(kept.unrecoverable(Duration::ZERO), None);
        kept.record(vec!["FACTORY_TASKS: refused".to_owned()], true);
        assert_eq!(kept.problems(), ["FACTORY_TASKS: refused"]);
        assert!(
            kept.unrecoverable(Duration::ZERO)
                .is_some_and(|why| why.contains("FACTORY_TASKS: refused"))
        );
        assert_eq!(kept.unrecoverable(Duration::from_secs(3600)), None);
        // A later failure keeps the first one's start; a success clears it.
        kept.record(vec!["again".to_owned()], true);
        assert!(kept.unrecoverable(Duration::ZERO).is_some());
        kept.record(vec!["nats down".to_owned()], false);
        assert_eq!(
            kept.unrecoverable(Duration::ZERO),
            None,
            "not while disconnected"
        );
        kept.record(Vec::new(), true);
        assert_eq!(kept.unrecoverable(Duration::ZERO), None);
        assert!(kept.problems().is_empty());
    }

    #[test]
    fn a_stream_of_ours_with_another_retention_or_storage_is_unusable_and_says_what_to_do() {
        let ours = stream_configs(1);
        for config in &ours {
            assert_eq!(unusable(config), None, "{}", config.name);
        }
        let tasks = ours
            .iter()
            .find(|c| c.name == subjects::TASKS_STREAM)
            .cloned()
            .unwrap();
        let limits = stream::Config {
            retention: stream::RetentionPolicy::Limits,
            ..tasks.clone()
        };
        let why = unusable(&limits).unwrap();
        assert!(why.contains("retention Limits (ours: WorkQueue)"), "{why}");
        assert!(why.contains("nats stream rm FACTORY_TASKS"), "{why}");
        let memory = stream::Config {
            storage: stream::StorageType::Memory,
            ..tasks
        };
        assert!(unusable(&memory).unwrap().contains("storage Memory"));
        // Not ours: nothing to compare with.
        let other = stream::Config {
            name: "SOMEONE_ELSES".to_owned(),
            retention: stream::RetentionPolicy::Interest,
            ..Default::default()
        };
        assert_eq!(unusable(&other), None);
    }

    #[test]
    fn a_bucket_put_back_gets_our_settings_and_keeps_the_operators_others() {
        let config = finished_tasks_config(1);
        let changed = stream::Config {
            name: format!("KV_{}", config.bucket),
            subjects: vec![format!("$KV.{}.>", config.bucket)],
            max_age: Duration::from_secs(1),
            duplicate_window: Duration::from_secs(1),
            max_messages_per_subject: 5,
            max_bytes: 1 << 30,
            num_replicas: 3,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let wanted = bucket_settings(&changed, &config);
        assert_eq!(wanted.max_age, config.max_age);
        assert_eq!(wanted.duplicate_window, DUPLICATE_WINDOW);
        assert_eq!(wanted.max_messages_per_subject, 1);
        assert_eq!(wanted.discard, stream::DiscardPolicy::New);
        assert_eq!(wanted.max_bytes, 1 << 30, "the operator's");
        assert_eq!(wanted.num_replicas, 3, "replicas are only raised");
        assert_eq!(bucket_settings(&wanted, &config), wanted, "stable");
    }

    #[test]
    fn nats_url_may_list_several_servers() {
        assert_eq!(server_urls("nats://a:4222"), vec!["nats://a:4222"]);
        assert_eq!(
            server_urls("nats://a:4222, tls://b:4223,,c"),
            vec!["nats://a:4222", "tls://b:4223", "c"]
        );
    }
}

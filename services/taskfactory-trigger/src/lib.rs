//! The trigger service: the control plane and ingress of taskfactory.
//!
//! Consumes `events.>` (user events) and the admin API; takes webhook deliveries over HTTP and
//! publishes them to `events.>`; owns activity definitions, the fire ledger, schedule watermarks
//! and webhook delivery ids in Postgres; produces TriggerEvents on `triggers.<activity>`.
//!
//! # Layout
//!
//! - [`admin`]: the gRPC `AdminService` (definitions, manual fires, runs and tasks).
//! - [`auth`]: who calls the admin API (tokens, OIDC, client certificates) and whether its roles
//!   reach the RPC; [`audit`]: the audit log of every call that changes something.
//! - [`registry`]: the in-memory snapshot of live activities, reloaded on change.
//! - [`lease`]: scheduling leadership (one replica schedules; NATS KV lease, Postgres fence).
//! - [`scheduler`]: fires schedules on time; misfire policy after downtime; the decision ledger.
//! - [`events`]: event ingress — matching, filters, dedupe keys, rejecting malformed events;
//!   [`event_ledger`]: the decision about every event at every activity it reached.
//! - [`webhook`]: the HTTP webhook gateway — signed deliveries become events on `events.>`.
//! - [`internal`]: requests to an orchestrator (commands, previews), recorded before they are sent.
//! - [`fire`]: recording and publishing a fire (outbox), and the reconciler.
//! - [`flow`]: flow control in the trigger (the rate limit).
//! - [`store`] / [`views`]: Postgres access.
//! - [`apply`]: the `apply` command (create or update activities from YAML/JSON files).

pub mod admin;
pub mod apply;
pub mod audit;
pub mod auth;
pub mod buffers;
pub mod event_ledger;
pub mod events;
pub mod fire;
pub mod flow;
pub mod internal;
pub mod lease;
pub mod ledger;
pub mod registry;
pub mod scheduler;
pub mod store;
pub mod views;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use taskfactory_model::subjects;
use taskfactory_proto::v1::admin_service_server::AdminServiceServer;
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_runtime::config::{DatabaseArgs, LifecycleArgs, NatsArgs, parse_duration};
use taskfactory_runtime::messaging::{self, ConsumerSpec};
use taskfactory_runtime::{db, nats};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Configuration of the trigger service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Connections of the admin API's own pool: its calls never wait for a connection behind
    /// the scheduler's and the events' writes, which use the main pool
    /// (`TASKFACTORY_DATABASE_POOL_SIZE`).
    #[arg(
        long = "admin-database-pool-size",
        env = "TASKFACTORY_ADMIN_DATABASE_POOL_SIZE",
        default_value_t = 4
    )]
    pub admin_pool_size: u32,
    /// Address of the admin gRPC API. Without authentication (`--auth-file`, OIDC or a client
    /// CA) only a loopback address is allowed, unless `--insecure-no-auth`.
    #[arg(
        long = "grpc-addr",
        env = "TASKFACTORY_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,
    #[command(flatten)]
    pub auth: auth::AuthArgs,
    #[command(flatten)]
    pub spec_limits: admin::SpecLimits,
    /// Largest event body taken in; larger events are rejected (recorded, dead-lettered).
    #[arg(long = "max-event-bytes", env = "TASKFACTORY_MAX_EVENT_BYTES", default_value_t = 1024 * 1024)]
    pub max_event_bytes: usize,
    /// Largest sum of event bytes one debounce (keep ALL) or batch holds: an event that would
    /// pass it fires the buffer first (the run gets fewer events) and opens the next.
    #[arg(long = "max-batch-bytes", env = "TASKFACTORY_MAX_BATCH_BYTES", default_value_t = 512 * 1024)]
    pub max_batch_bytes: usize,
    /// Events handled at once.
    #[arg(
        long = "event-concurrency",
        env = "TASKFACTORY_EVENT_CONCURRENCY",
        default_value_t = 256
    )]
    pub event_concurrency: usize,
    /// Bytes of events handled at once (an event's JSON tree takes up to tens of times its
    /// bytes); an event waits for room, one larger than this for all of it.
    #[arg(
        long = "event-bytes-in-flight",
        env = "TASKFACTORY_EVENT_BYTES_IN_FLIGHT",
        default_value_t = 4 * 1024 * 1024
    )]
    pub event_bytes_in_flight: usize,
    /// Schedules deciding their occurrences at once, at most; the others wait for a turn. Each
    /// holds about 15 KiB while it decides, and after a restart every schedule may have missed
    /// occurrences to decide: 100,000 at once would take 1.5 GB.
    #[arg(
        long = "schedule-decisions-at-once",
        env = "TASKFACTORY_SCHEDULE_DECISIONS_AT_ONCE",
        default_value_t = 2048,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub schedule_decisions_at_once: u32,
    /// How often to republish fires that did not reach JetStream.
    #[arg(long = "reconcile-interval", env = "TASKFACTORY_RECONCILE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How often to poll for definition changes made elsewhere.
    #[arg(long = "reload-interval", env = "TASKFACTORY_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// How long the scheduling lease lives without renewal: after a leader crashes, another
    /// replica takes over within about this long.
    #[arg(long = "lease-ttl", env = "TASKFACTORY_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// The NATS KV bucket of the scheduling lease.
    #[arg(
        long = "lease-bucket",
        env = "TASKFACTORY_LEASE_BUCKET",
        default_value = "taskfactory_leases"
    )]
    pub lease_bucket: String,
    /// This replica's name in the lease (default: host name and process id).
    #[arg(long = "instance-id", env = "TASKFACTORY_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Address of the webhook gateway (`POST /hooks/{name}`); it listens only when at least one
    /// hook is configured.
    #[arg(
        long = "http-addr",
        env = "TASKFACTORY_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// A YAML or JSON file of webhooks: `hooks: [{name, subject, secretEnv}]` (see the README).
    #[arg(long = "webhooks", env = "TASKFACTORY_WEBHOOKS")]
    pub webhooks: Option<PathBuf>,
    /// The webhook gateway's bounds on connections and requests.
    #[command(flatten)]
    pub http_limits: webhook::HttpLimits,
    /// Webhooks given in code (tests), in addition to the file's.
    #[arg(skip)]
    pub hooks: Vec<webhook::Hook>,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    /// The scheduler's clock (tests drive it; always the system clock from the command line).
    #[arg(skip)]
    pub clock: ClockHandle,
}

impl Config {
    /// A configuration for a local setup (tests, examples).
    pub fn local(nats_url: &str, database_url: &str, grpc_addr: SocketAddr) -> Self {
        Self {
            nats: NatsArgs::local(nats_url),
            database: DatabaseArgs::new(database_url),
            admin_pool_size: 4,
            grpc_addr,
            auth: auth::AuthArgs::default(),
            spec_limits: admin::SpecLimits::default(),
            max_event_bytes: 1024 * 1024,
            max_batch_bytes: 512 * 1024,
            event_concurrency: 256,
            event_bytes_in_flight: 4 * 1024 * 1024,
            schedule_decisions_at_once: 2048,
            reconcile_interval: Duration::from_secs(5),
            reload_interval: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            lease_bucket: "taskfactory_leases".to_owned(),
            instance_id: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            webhooks: None,
            http_limits: webhook::HttpLimits::default(),
            hooks: Vec::new(),
            lifecycle: LifecycleArgs::default(),
            clock: ClockHandle::system(),
        }
    }
}

/// Runs the trigger service until `shutdown`, then stops taking work, finishes what it holds and
/// returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.lease_ttl >= lease::MIN_TTL,
        "--lease-ttl {:?} is too short: at least {:?}",
        config.lease_ttl,
        lease::MIN_TTL
    );
    // Hooks and the admin API's TLS are checked, and the hooks' port taken, before anything
    // else: a bad file fails at once.
    let webhooks = webhook::Gateway::bind(&config).await.context("webhooks")?;
    let server_tls = config.auth.server_tls().context("admin API")?;
    auth::check_exposure(&config.auth, config.grpc_addr)?;
    let pool = db::connect_and_migrate(&config.database, config.lifecycle.startup_patience)
        .await
        .context("postgres")?;
    // The admin API's own connections (see `Config::admin_pool_size`).
    let admin_pool = db::another_pool(&config.database, config.admin_pool_size)
        .context("postgres (admin API pool)")?;
    let (client, js) = nats::connect_and_declare(
        &config.nats,
        "taskfactory-trigger",
        config.lifecycle.startup_patience,
    )
    .await
    .context("nats")?;

    let registry = registry::Registry::new();
    registry
        .reload(&pool)
        .await
        .context("loading definitions")?;

    let tracker = TaskTracker::new();
    // Background work stops on `work_shutdown`; the gRPC server keeps answering until it is done.
    let work_shutdown = shutdown.child_token();
    let authenticator = auth::Authenticator::start(
        &config.auth,
        config.grpc_addr,
        &tracker,
        work_shutdown.clone(),
    )
    .await
    .context("admin API authentication")?;
    let (roles, _) = tokio::sync::watch::channel(lease::Role::Starting);
    let role = roles.subscribe();
    // The lease bucket is not among them: the lease keeps its own (a lease call that fails on a
    // bucket deleted or recreated declares it again and starts leadership over in a new epoch,
    // the bucket's creation time; see `lease`).
    let kept = Arc::new(nats::Kept::default());
    tracker.spawn(nats::keep_declared(
        js.clone(),
        config.nats.stream_replicas,
        Vec::new(),
        config.nats.declare_every,
        kept.clone(),
        work_shutdown.clone(),
    ));
    taskfactory_runtime::metrics::spawn_endpoint(
        &tracker,
        &config.lifecycle,
        taskfactory_runtime::metrics::readiness(
            client.clone(),
            Some(pool.clone()),
            Some(Arc::new(move || match *role.borrow() {
                lease::Role::Leader(term) => Ok(format!("scheduling: leader (term {term})")),
                lease::Role::Standby => Ok("scheduling: standby".to_owned()),
                lease::Role::Starting => {
                    Err("scheduling: not connected to the lease yet".to_owned())
                }
            })),
            kept.clone(),
        ),
        work_shutdown.clone(),
    );

    // On the admin API's pool: a change made there reloads under the same lock as the reloader
    // (loads run one at a time), so the reloader must not wait behind the scheduler either.
    tracker.spawn(registry.clone().run_reloader(
        admin_pool.clone(),
        client.clone(),
        config.reload_interval,
        work_shutdown.clone(),
    ));
    let lead = {
        let (pool, js, registry, clock) = (
            pool.clone(),
            js.clone(),
            registry.clone(),
            config.clock.clone(),
        );
        let reconcile_interval = config.reconcile_interval;
        let decisions_at_once = config.schedule_decisions_at_once as usize;
        move |term, stop: CancellationToken| {
            let scheduler = scheduler::Scheduler::new(
                pool.clone(),
                js.clone(),
                registry.clone(),
                clock.clone(),
                term,
                stop.clone(),
                decisions_at_once,
            );
            let reconciler = fire::run_reconciler(
                pool.clone(),
                js.clone(),
                clock.clone(),
                reconcile_interval,
                stop,
            );
            async move {
                tokio::join!(scheduler.run(), reconciler);
            }
        }
    };
    tracker.spawn(lease::run(
        js.clone(),
        pool.clone(),
        lease::LeaseConfig {
            bucket: config.lease_bucket.clone(),
            ttl: config.lease_ttl,
            holder: config
                .instance_id
                .clone()
                .unwrap_or_else(default_instance_id),
            replicas: config.nats.stream_replicas,
        },
        roles.clone(),
        work_shutdown.clone(),
        lead,
    ));
    // Events' fires have a batcher of their own: a scheduled fire's fence refused (a deposed
    // leader) must never take an event's fire with it.
    // Not on the service's tracker: it ends when the last event handler lets go of it, and a
    // handler the drain gave up on must not hold the shutdown.
    let event_fires = fire::FireBatcher::start(
        pool.clone(),
        js.clone(),
        taskfactory_runtime::clock::ClockHandle::system(),
        &tokio_util::task::TaskTracker::new(),
    );
    // Debounce and batch buffers: taken in by the events' handler, fired when full there, or when
    // due by the flusher (every replica runs one).
    let buffers = Arc::new(buffers::Buffers {
        pool: pool.clone(),
        js: js.clone(),
        clock: config.clock.clone(),
        max_bytes: config.max_batch_bytes.max(1),
        opened: tokio::sync::Notify::new(),
    });
    tracker.spawn(buffers::run_flusher(buffers.clone(), work_shutdown.clone()));
    let ingress = Arc::new(events::EventIngress::new(
        pool.clone(),
        event_fires,
        buffers,
        registry.clone(),
        config.max_event_bytes,
        config.event_bytes_in_flight,
    ));
    tracker.spawn(messaging::consume(
        js.clone(),
        kept.keep_consumer(ConsumerSpec {
            stream: subjects::EVENTS_STREAM,
            durable: subjects::TRIGGER_EVENTS_CONSUMER.to_owned(),
            filter_subject: subjects::EVENTS_SUBJECTS.to_owned(),
            concurrency: config.event_concurrency,
            bytes_in_hand: config.event_bytes_in_flight,
            ack_wait: Duration::from_secs(30),
            drain_timeout: config.lifecycle.drain_timeout,
            // An event dead-lettered would be lost (nothing sends it again), and its handler
            // fails only on the database: retried (every 30 s at most) for as long as that lasts.
            max_deliveries: u32::MAX,
            dead_letters: |_| subjects::EVENTS_DLQ_SUBJECT.to_owned(),
            kind: "event",
        }),
        work_shutdown.clone(),
        ingress,
    ));
    // Rate limits: the state of keys idle for a whole period is deleted (any replica may do it).
    tracker.spawn(flow::run_pruner(
        pool.clone(),
        Duration::from_secs(30),
        work_shutdown.clone(),
    ));
    if let Some(webhooks) = webhooks {
        webhooks.spawn(&tracker, pool.clone(), js.clone(), work_shutdown.clone());
    }

    let admin = Arc::new(admin::Admin {
        pool: admin_pool.clone(),
        js: js.clone(),
        nats: client.clone(),
        registry: registry.clone(),
        clock: config.clock.clone(),
        tracker: tracker.clone(),
        limits: config.spec_limits,
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AdminServiceServer<admin::Admin>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(taskfactory_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(taskfactory_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding the admin API to {}", config.grpc_addr))?;
    tracing::info!(addr = %config.grpc_addr, tls = server_tls.is_some(), authentication = !authenticator.is_open(), "admin gRPC API listening");
    let server_shutdown = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("admin API TLS")?;
    }
    let server = builder
        .trace_fn(taskfactory_runtime::propagation::grpc_server_span)
        .layer(tower::util::MapResponseLayer::new(
            taskfactory_runtime::propagation::record_grpc_status,
        ))
        .layer(auth::layer::AuthLayer::new(
            authenticator,
            admin_pool.clone(),
        ))
        .layer(admin::SpecCallsLayer::new(
            config.spec_limits.spec_calls_at_once,
        ))
        .add_service(
            AdminServiceServer::from_arc(admin)
                .max_decoding_message_size(config.spec_limits.max_message_bytes()),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move { server_shutdown.cancelled().await },
        );
    let served = server.await;
    work_shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    // Bounded: a server that is already gone must not hold up the exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    served.context("admin gRPC server")?;
    tracing::info!("trigger stopped");
    Ok(())
}

/// The host name (a pod's name on Kubernetes) and the process id.
fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "trigger".to_owned());
    format!("{host}-{}", std::process::id())
}

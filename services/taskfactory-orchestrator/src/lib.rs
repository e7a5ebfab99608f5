//! The orchestrator service: turns fires into runs and tasks, and completes runs.
//!
//! Consumes `triggers.>` (TriggerEvents) and `results.>` (TaskResults); owns runs, tasks and task
//! attempts in Postgres; produces TaskInstances on `tasks.<type>` and run completions on
//! `events.taskfactory.run.completed`. Replicas are competing consumers: add more to scale.
//!
//! # Layout
//!
//! - [`spawn`]: one TriggerEvent (a fire of the ledger; anything else is refused) → one run
//!   (recorded once) → its tasks published.
//! - [`context`]: resolving context sources (static, sql, http, kv, request).
//! - [`preview`]: answering `PreviewRun` (the same evaluation, nothing recorded).
//! - [`results`]: one TaskResult (checked against its task; refused when it does not fit) → task
//!   state, run counters, run completion.
//! - [`completion`]: announcing finished runs exactly once in effect.
//! - [`commands`]: CancelRun, CompleteTask (human tasks) and RetryTask, for the admin API.
//! - [`admin_requests`]: commands and previews are carried out only when the admin API recorded
//!   them (once, fresh).
//! - [`unserved`]: tasks of a type no executor serves die after a grace period.
//! - [`refill`]: the finished-tasks and cancelled-runs buckets, refilled from Postgres when they
//!   were recreated.
//! - [`requeue`]: tasks still to be run are published again into a `FACTORY_TASKS` that was
//!   deleted and declared again.
//! - [`spec_cache`]: the activity versions runs use, parsed once, bounded in bytes.
//! - [`store`]: Postgres access.

pub mod admin_requests;
pub mod commands;
pub mod completion;
pub mod context;
pub mod dead_tasks;
pub mod preview;
pub mod refill;
pub mod requeue;
pub mod results;
pub mod spawn;
pub mod spec_cache;
pub mod store;
pub mod task_gate;
pub mod throttle;
pub mod unserved;

pub use spec_cache::SpecCache;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use taskfactory_model::expr::Limits;
use taskfactory_model::plan::PlanLimits;
use taskfactory_model::subjects;
use taskfactory_runtime::config::{DatabaseArgs, LifecycleArgs, NatsArgs, parse_duration};
use taskfactory_runtime::messaging::{self, ConsumerSpec};
use taskfactory_runtime::{db, nats};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Configuration of the orchestrator service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Triggers handled at once.
    #[arg(
        long = "trigger-concurrency",
        env = "TASKFACTORY_TRIGGER_CONCURRENCY",
        default_value_t = 256
    )]
    pub trigger_concurrency: usize,
    /// Results handled at once.
    #[arg(
        long = "result-concurrency",
        env = "TASKFACTORY_RESULT_CONCURRENCY",
        default_value_t = 256
    )]
    pub result_concurrency: usize,
    /// Bytes of result messages in hand at once (their outputs mostly): the results consumer
    /// pulls no more than the room left (one larger than this alone).
    #[arg(
        long = "result-bytes-in-flight",
        env = "TASKFACTORY_RESULT_BYTES_IN_FLIGHT",
        default_value_t = 16 * 1024 * 1024
    )]
    pub result_bytes_in_flight: usize,
    /// Transactions recording results at once (each records the results waiting, of any runs),
    /// new runs at once, and trigger lookups in the fire ledger at once.
    #[arg(
        long = "result-transactions",
        env = "TASKFACTORY_RESULT_TRANSACTIONS",
        default_value_t = 4
    )]
    pub result_transactions: usize,
    /// How long a trigger may be in hand without a progress ack before it is redelivered.
    #[arg(long = "ack-wait", env = "TASKFACTORY_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Task publishes in flight at once while spawning a run.
    #[arg(
        long = "publish-window",
        env = "TASKFACTORY_PUBLISH_WINDOW",
        default_value_t = 256
    )]
    pub publish_window: usize,
    /// Tasks one run may make, across its templates.
    #[arg(
        long = "max-tasks-per-run",
        env = "TASKFACTORY_MAX_TASKS_PER_RUN",
        default_value_t = 10_000
    )]
    pub max_tasks_per_run: usize,
    /// Bytes of rendered task params one run may carry (a run over it fails, naming it).
    #[arg(
        long = "max-run-bytes",
        env = "TASKFACTORY_MAX_RUN_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub max_run_bytes: usize,
    /// Bytes all runs being evaluated may hold at once: once its context sources are resolved
    /// (in `--source-bytes-in-flight`) a run waits for room for the largest run
    /// (`--max-run-bytes`) and twice its context, then keeps room for its context and what its
    /// tasks really carry until they are recorded and published. Runs queue rather than
    /// overcommit; memory peaks at a few times this (JSON trees, messages, statements).
    #[arg(
        long = "evaluation-bytes-in-flight",
        env = "TASKFACTORY_EVALUATION_BYTES_IN_FLIGHT",
        default_value_t = 128 * 1024 * 1024
    )]
    pub evaluation_bytes_in_flight: usize,
    /// Bytes of trigger messages (most of it their events' payloads) in hand at once: a trigger
    /// waits for room before it is decoded (one larger than this takes all of it). An event's
    /// JSON tree, its copies for expressions and the run's record take tens of times its bytes.
    #[arg(
        long = "trigger-bytes-in-flight",
        env = "TASKFACTORY_TRIGGER_BYTES_IN_FLIGHT",
        default_value_t = 4 * 1024 * 1024
    )]
    pub trigger_bytes_in_flight: usize,
    /// Bytes the context sources of the runs being spawned (and of previews) may hold together
    /// while they are resolved: a run waits for room for the most its sources may hold (`http` twice
    /// `--max-source-bytes`, `sql` five times, `kv` and `request` the NATS server's largest
    /// message and what is kept of it), at most all of it, before it resolves them (a few at a
    /// time if they may hold more), then moves their context into the evaluation room.
    #[arg(
        long = "source-bytes-in-flight",
        env = "TASKFACTORY_SOURCE_BYTES_IN_FLIGHT",
        default_value_t = 64 * 1024 * 1024
    )]
    pub source_bytes_in_flight: usize,
    /// Bytes of activity versions kept parsed for the runs that use them (as compact JSON; the
    /// parsed form takes a few times that): past it, the versions loaded longest ago are dropped
    /// and read again when needed.
    #[arg(
        long = "spec-cache-bytes",
        env = "TASKFACTORY_SPEC_CACHE_BYTES",
        default_value_t = 32 * 1024 * 1024
    )]
    pub spec_cache_bytes: usize,
    /// Instruction fuel per expression or template evaluation.
    #[arg(
        long = "template-fuel",
        env = "TASKFACTORY_TEMPLATE_FUEL",
        default_value_t = 50_000
    )]
    pub template_fuel: u64,
    /// How long tasks of a type no executor consumes may wait before they die.
    #[arg(long = "unserved-grace", env = "TASKFACTORY_UNSERVED_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub unserved_grace: Duration,
    /// How long a run held by `flow.throttle` waits at least after its event reached the stream,
    /// so that the runs of events that came together start in the order the events came (they
    /// reach the orchestrator in any order). 0 starts each as soon as the budget allows.
    #[arg(long = "throttle-order-window", env = "TASKFACTORY_THROTTLE_ORDER_WINDOW", default_value = "500ms", value_parser = parse_duration)]
    pub throttle_order_window: Duration,
    /// Wall-clock time one run's template evaluation may take (a run that needs more fails).
    #[arg(long = "evaluation-timeout", env = "TASKFACTORY_EVALUATION_TIMEOUT", default_value = "800ms", value_parser = parse_duration)]
    pub evaluation_timeout: Duration,
    /// Databases `sql` context sources may query, by name: `NAME=DSN`, repeatable; also every
    /// `TASKFACTORY_SQL_<NAME>` environment variable, and `TASKFACTORY_SQL_<NAME>_FILE` (a file
    /// holding the DSN). Use a role that may only SELECT: a privileged one is refused at start.
    #[arg(long = "sql-database", value_parser = parse_named_database)]
    pub sql_databases: Vec<(String, String)>,
    /// Accept a privileged role (superuser, file access, signalling backends…) for these `sql`
    /// source databases anyway, with a warning at start and on `/readyz`.
    #[arg(
        long = "sql-allow-privileged-role",
        env = "TASKFACTORY_SQL_ALLOW_PRIVILEGED_ROLE",
        value_delimiter = ','
    )]
    pub sql_allow_privileged: Vec<String>,
    /// Subjects `request` sources may ask (NATS filters, comma-separated, e.g.
    /// `inventory.>`); none by default. Control-plane subjects are refused whatever this says.
    #[arg(
        long = "sources-allow-subjects",
        env = "TASKFACTORY_SOURCES_ALLOW_SUBJECTS",
        default_value = ""
    )]
    pub sources_allow_subjects: String,
    /// KV buckets `kv` sources may read (names or `prefix*`, comma-separated); none by default.
    /// Buckets named `taskfactory…` are refused whatever this says.
    #[arg(
        long = "sources-allow-buckets",
        env = "TASKFACTORY_SOURCES_ALLOW_BUCKETS",
        default_value = ""
    )]
    pub sources_allow_buckets: String,
    #[command(flatten)]
    pub sources_nats: context::nats::SourcesNatsArgs,
    #[command(flatten)]
    pub secrets: taskfactory_runtime::secrets::SecretArgs,
    /// Hosts `http` context sources may reach besides public addresses (hosts, `*.suffix`,
    /// `host:port`, IPs, CIDRs).
    #[arg(
        long = "egress-allow",
        env = "TASKFACTORY_EGRESS_ALLOW",
        default_value = ""
    )]
    pub egress_allow: String,
    /// A context source's timeout unless its spec sets one.
    #[arg(long = "source-timeout", env = "TASKFACTORY_SOURCE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub source_timeout: Duration,
    /// Rows a `sql` source returns at most unless its spec sets fewer.
    #[arg(
        long = "sql-max-rows",
        env = "TASKFACTORY_SQL_MAX_ROWS",
        default_value_t = 1000
    )]
    pub sql_max_rows: u32,
    /// Bytes a context source's value may have at most (an `http` body, all rows of a query as
    /// compact JSON); what a source may hold while it is resolved, too, and what each source of a
    /// run takes of `--evaluation-bytes-in-flight` meanwhile.
    #[arg(
        long = "max-source-bytes",
        env = "TASKFACTORY_MAX_SOURCE_BYTES",
        default_value_t = 1024 * 1024
    )]
    pub max_source_bytes: usize,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

/// Parses `NAME=DSN`.
fn parse_named_database(text: &str) -> Result<(String, String), String> {
    let (name, dsn) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=DSN"))?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "database name {name:?} must be letters, digits and _"
        ));
    }
    Ok((name, dsn.trim().to_owned()))
}

/// `TASKFACTORY_SQL_*` variables that are settings, not databases.
const SQL_SETTINGS: [&str; 2] = ["MAX_ROWS", "ALLOW_PRIVILEGED_ROLE"];

impl Config {
    /// The named databases from the flags, from `TASKFACTORY_SQL_<NAME>` variables and from the
    /// files `TASKFACTORY_SQL_<NAME>_FILE` names (names are case-insensitive; a flag wins over a
    /// variable, a variable over a file). A file that cannot be read is an error naming it.
    pub fn named_databases(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.named_databases_from(std::env::vars(), |path| std::fs::read_to_string(path))
    }

    fn named_databases_from(
        &self,
        vars: impl Iterator<Item = (String, String)>,
        read: impl Fn(&str) -> std::io::Result<String>,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut named: Vec<(String, String)> = self.sql_databases.clone();
        let mut files = Vec::new();
        for (key, value) in vars {
            let Some(name) = key.strip_prefix("TASKFACTORY_SQL_") else {
                continue;
            };
            if SQL_SETTINGS.contains(&name) {
                continue;
            }
            match name.strip_suffix("_FILE") {
                Some(name) => files.push((name.to_ascii_lowercase(), value)),
                None => {
                    let name = name.to_ascii_lowercase();
                    if !named.iter().any(|(n, _)| *n == name) {
                        named.push((name, value));
                    }
                }
            }
        }
        for (name, path) in files {
            if named.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let dsn = read(&path).with_context(|| {
                format!(
                    "reading the DSN of sql database {name:?} from {path} (TASKFACTORY_SQL_{}_FILE)",
                    name.to_ascii_uppercase()
                )
            })?;
            named.push((name, dsn.trim().to_owned()));
        }
        Ok(named)
    }

    pub fn local(nats_url: &str, database_url: &str) -> Self {
        Self {
            nats: NatsArgs::local(nats_url),
            database: DatabaseArgs::new(database_url),
            trigger_concurrency: 256,
            result_concurrency: 256,
            result_bytes_in_flight: 16 * 1024 * 1024,
            result_transactions: 4,
            ack_wait: Duration::from_secs(30),
            publish_window: 256,
            max_tasks_per_run: 10_000,
            max_run_bytes: 64 * 1024 * 1024,
            evaluation_bytes_in_flight: 128 * 1024 * 1024,
            trigger_bytes_in_flight: 4 * 1024 * 1024,
            source_bytes_in_flight: 64 * 1024 * 1024,
            spec_cache_bytes: 32 * 1024 * 1024,
            template_fuel: 50_000,
            evaluation_timeout: Duration::from_millis(800),
            unserved_grace: Duration::from_secs(600),
            throttle_order_window: Duration::from_millis(500),
            sql_databases: Vec::new(),
            sql_allow_privileged: Vec::new(),
            sources_allow_subjects: String::new(),
            sources_allow_buckets: String::new(),
            sources_nats: context::nats::SourcesNatsArgs::default(),
            secrets: taskfactory_runtime::secrets::SecretArgs::default(),
            egress_allow: String::new(),
            source_timeout: Duration::from_secs(10),
            sql_max_rows: 1000,
            max_source_bytes: 1024 * 1024,
            lifecycle: LifecycleArgs::default(),
        }
    }
}

/// The context sources: their own NATS connection when one is configured, the allow-lists,
/// secrets, and the SQL databases with their roles checked (a privileged one stops the start).
async fn context_sources(
    config: &Config,
    pool: &PgPool,
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<context::Sources> {
    let (sources_client, sources_js) = match config.sources_nats.nats_args(&config.nats) {
        Some(args) => {
            let own = nats::connect(
                &args,
                "taskfactory-orchestrator-sources",
                config.lifecycle.startup_patience,
            )
            .await
            .context("the context sources' NATS connection (--sources-nats-*)")?;
            tracing::info!("kv and request sources use their own NATS connection");
            let own_js = async_nats::jetstream::new(own.clone());
            (own, own_js)
        }
        None => (client.clone(), js.clone()),
    };
    let own_role = context::sql::current_role(pool)
        .await
        .context("reading the orchestrator's own database role")?;
    let sources = context::Sources::new(
        context::SourcesConfig {
            databases: config.named_databases()?,
            allow_privileged: config.sql_allow_privileged.clone(),
            own_role,
            egress_allow: config.egress_allow.clone(),
            allow_subjects: config.sources_allow_subjects.clone(),
            allow_buckets: config.sources_allow_buckets.clone(),
            secrets: config.secrets.clone(),
            default_timeout: config.source_timeout,
            max_rows: config.sql_max_rows,
            max_bytes: config.max_source_bytes,
            limits: Limits {
                fuel: config.template_fuel,
                ..Limits::default()
            },
        },
        sources_client,
        sources_js,
    )
    .context("context sources")?;
    sources
        .verify_databases(
            config
                .lifecycle
                .startup_patience
                .min(Duration::from_secs(10)),
        )
        .await
        .context("context sources")?;
    Ok(sources)
}

/// Runs the orchestrator until `shutdown`, then stops pulling and finishes what it holds.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = db::connect_and_migrate(&config.database, config.lifecycle.startup_patience)
        .await
        .context("postgres")?;
    let (client, js) = nats::connect_and_declare(
        &config.nats,
        "taskfactory-orchestrator",
        config.lifecycle.startup_patience,
    )
    .await
    .context("nats")?;

    let cancelled_runs = nats::cancelled_runs(&js, config.nats.stream_replicas)
        .await
        .map_err(|e| anyhow::anyhow!("the cancelled-runs bucket: {e}"))?;
    let sources = Arc::new(context_sources(&config, &pool, &client, &js).await?);
    let result_key = store::result_token_key(&pool)
        .await
        .context("reading the result token key")?;
    let evaluation_bytes = config
        .evaluation_bytes_in_flight
        .clamp(1, u32::MAX as usize);
    let (task_gate, asked) = task_gate::TaskGate::new();
    let spawner = Arc::new(spawn::Spawner {
        task_gate,
        evaluation_room: Arc::new(tokio::sync::Semaphore::new(evaluation_bytes)),
        evaluation_bytes,
        trigger_room: messaging::ByteBudget::new(config.trigger_bytes_in_flight),
        source_room: messaging::ByteBudget::new(config.source_bytes_in_flight),
        result_key,
        cancelled_runs: cancelled_runs.clone(),
        pool: pool.clone(),
        marks: store::RunMarks::start(pool.clone()),
        runs: store::RunWriter::start(pool.clone(), config.result_transactions),
        lookups: store::TriggerLookups::start(pool.clone(), config.result_transactions),
        js: js.clone(),
        limits: PlanLimits {
            expr: Limits {
                fuel: config.template_fuel,
                ..Limits::default()
            },
            max_tasks_per_run: config.max_tasks_per_run,
            max_duration: config.evaluation_timeout,
            max_run_bytes: config.max_run_bytes.max(1),
        },
        ack_wait: config.ack_wait,
        publish_window: config.publish_window.max(1),
        specs: SpecCache::new(config.spec_cache_bytes),
        sources: sources.clone(),
        throttle_due: Arc::new(tokio::sync::Notify::new()),
        throttle_window: config.throttle_order_window,
    });
    let requeue_key = spawner.result_key.clone();
    let marks = spawner.marks.clone();
    let unserved_spawner = spawner.clone();
    let tracker = TaskTracker::new();
    let (batcher, batches) = results::Batcher::start(pool.clone(), config.result_transactions);
    let finished_tasks = nats::ensure_bucket(
        &js,
        nats::finished_tasks_config(config.nats.stream_replicas),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the finished-tasks bucket: {e}"))?;
    // Buckets found incomplete at start (a new installation, or deleted while this was down)
    // are made complete before any trigger is taken in, so that executors do not wait on the
    // first tasks; a long refill goes on in the background, from where it got.
    let refills = [
        Arc::new(refill::Refill::new(
            refill::Refilled::FinishedTasks,
            finished_tasks.clone(),
        )),
        Arc::new(refill::Refill::new(
            refill::Refilled::CancelledRuns,
            cancelled_runs.clone(),
        )),
    ];
    let at_start = futures::future::join_all(
        refills
            .iter()
            .map(|refill| async { (refill.which.bucket(), refill.check(&pool, &js).await) }),
    );
    match tokio::time::timeout(Duration::from_secs(60), at_start).await {
        Ok(looked) => {
            for (bucket, looked) in looked {
                if let Err(error) = looked {
                    tracing::warn!(bucket, %error, "cannot make the bucket complete yet; will try again");
                }
            }
        }
        Err(_) => tracing::warn!(
            "the buckets are still being refilled after 60 s; going on in the background, from where they got"
        ),
    }
    for refill in refills {
        tracker.spawn(refill.keep_complete(
            pool.clone(),
            js.clone(),
            config.nats.declare_every,
            shutdown.clone(),
        ));
    }
    let sink = Arc::new(results::ResultSink {
        finished_tasks: finished_tasks.clone(),
        pool: pool.clone(),
        js: js.clone(),
        spawner: spawner.clone(),
        batcher,
    });
    let overlap_spawner = spawner.clone();
    let preview_spawner = spawner.clone();
    let commands = Arc::new(commands::Commands {
        spawner: spawner.clone(),
        cancelled_runs: cancelled_runs.clone(),
        finished_tasks,
    });
    let kept = Arc::new(nats::Kept::default());
    tracker.spawn(nats::keep_declared(
        js.clone(),
        config.nats.stream_replicas,
        vec![
            nats::cancelled_runs_config(config.nats.stream_replicas),
            nats::finished_tasks_config(config.nats.stream_replicas),
        ],
        config.nats.declare_every,
        kept.clone(),
        shutdown.clone(),
    ));
    taskfactory_runtime::metrics::spawn_endpoint(
        &tracker,
        &config.lifecycle,
        taskfactory_runtime::metrics::readiness(
            client.clone(),
            Some(pool.clone()),
            Some(Arc::new(move || {
                let warnings = sources.warnings();
                Ok(if warnings.is_empty() {
                    "context sources: ok".to_owned()
                } else {
                    warnings.join("\n")
                })
            })),
            kept.clone(),
        ),
        shutdown.clone(),
    );
    tracker.spawn(messaging::consume(
        js.clone(),
        kept.keep_consumer(ConsumerSpec {
            stream: subjects::TRIGGERS_STREAM,
            durable: subjects::ORCHESTRATOR_TRIGGERS_CONSUMER.to_owned(),
            filter_subject: subjects::TRIGGERS_SUBJECTS.to_owned(),
            concurrency: config.trigger_concurrency,
            bytes_in_hand: config.trigger_bytes_in_flight,
            ack_wait: config.ack_wait,
            drain_timeout: config.lifecycle.drain_timeout,
            max_deliveries: config.nats.max_deliveries,
            dead_letters: |_| subjects::TRIGGERS_DLQ_SUBJECT.to_owned(),
            kind: "trigger",
        }),
        shutdown.clone(),
        spawner,
    ));
    tracker.spawn(messaging::consume(
        js.clone(),
        kept.keep_consumer(ConsumerSpec {
            stream: subjects::RESULTS_STREAM,
            durable: subjects::ORCHESTRATOR_RESULTS_CONSUMER.to_owned(),
            filter_subject: subjects::RESULTS_SUBJECTS.to_owned(),
            concurrency: config.result_concurrency,
            bytes_in_hand: config.result_bytes_in_flight,
            ack_wait: Duration::from_secs(30),
            drain_timeout: config.lifecycle.drain_timeout,
            // A result dead-lettered would be lost (its task message is acked), and its handler
            // fails only on the database: retried (every 30 s at most) for as long as that lasts.
            max_deliveries: u32::MAX,
            dead_letters: |_| subjects::RESULTS_DLQ_SUBJECT.to_owned(),
            kind: "result",
        }),
        shutdown.clone(),
        sink.clone(),
    ));
    tracker.spawn(messaging::consume(
        js.clone(),
        kept.keep_consumer(ConsumerSpec {
            stream: subjects::DLQ_STREAM,
            durable: subjects::ORCHESTRATOR_DEAD_TASKS_CONSUMER.to_owned(),
            filter_subject: subjects::TASKS_DLQ_SUBJECTS.to_owned(),
            concurrency: 4,
            bytes_in_hand: 0,
            ack_wait: Duration::from_secs(30),
            drain_timeout: config.lifecycle.drain_timeout,
            // Already a dead letter, and its handler fails only on the database: it is retried
            // (every 30 s at most) until its task is recorded, never dead-lettered again.
            max_deliveries: u32::MAX,
            dead_letters: |subject| subject.to_owned(),
            kind: "dead_task",
        }),
        shutdown.clone(),
        Arc::new(dead_tasks::DeadTasks { sink }),
    ));
    tracker.spawn(requeue::run(
        pool.clone(),
        js.clone(),
        requeue_key,
        config.publish_window.max(1),
        config.nats.declare_every,
        shutdown.clone(),
    ));
    tracker.spawn(completion::run_sweeper(
        marks,
        js.clone(),
        Duration::from_secs(30),
        shutdown.clone(),
    ));
    tracker.spawn(preview::serve(
        client.clone(),
        preview_spawner,
        shutdown.clone(),
    ));
    tracker.spawn(commands::serve(
        client.clone(),
        commands.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(commands::run_deadline_sweeper(
        commands,
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    tracker.spawn(unserved::run_sweeper(
        unserved_spawner,
        config.unserved_grace,
        (config.unserved_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        shutdown.clone(),
    ));
    tracker.spawn(taskfactory_runtime::metrics::run_dlq_sampler(
        js.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(throttle::run_timer(
        overlap_spawner.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(task_gate::run(
        overlap_spawner.clone(),
        asked,
        shutdown.clone(),
    ));
    tracker.spawn(spawn::run_overlap_sweeper(
        overlap_spawner,
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    tracing::info!("orchestrator running");
    tracker.close();
    tracker.wait().await;
    // Results still queued get a few more seconds (the consumer already waited its drain time;
    // handlers it stopped waiting for hold the queue open). Leaving them is safe: a result is
    // acked only after it is committed, so what is left is delivered again.
    if tokio::time::timeout(Duration::from_secs(5), batches)
        .await
        .is_err()
    {
        tracing::warn!(
            "results still being recorded at exit; their messages will be delivered again"
        );
    }
    // Bounded: a server that is already gone must not hold up the exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    tracing::info!("orchestrator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_databases_come_from_flags_and_variables_but_not_from_settings() {
        let mut config = Config::local("nats://x", "postgres://x");
        config.sql_databases = vec![("crm".to_owned(), "postgres://flag/crm".to_owned())];
        let vars = [
            ("TASKFACTORY_SQL_CRM", "postgres://env/crm"),
            ("TASKFACTORY_SQL_BILLING", "postgres://env/billing"),
            ("TASKFACTORY_SQL_MAX_ROWS", "50"),
            ("TASKFACTORY_SOURCE_TIMEOUT", "5s"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let no_files = |path: &str| -> std::io::Result<String> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                path.to_owned(),
            ))
        };
        let named = config
            .named_databases_from(vars.clone().into_iter(), no_files)
            .unwrap();
        assert_eq!(
            named,
            vec![
                ("crm".to_owned(), "postgres://flag/crm".to_owned()),
                ("billing".to_owned(), "postgres://env/billing".to_owned()),
            ]
        );
        // A DSN in a file (its password then lives in no variable); a missing file is named.
        let with_file = vars.into_iter().chain([
            (
                "TASKFACTORY_SQL_WAREHOUSE_FILE".to_owned(),
                "/run/dsn".to_owned(),
            ),
            (
                "TASKFACTORY_SQL_ALLOW_PRIVILEGED_ROLE".to_owned(),
                "crm".to_owned(),
            ),
        ]);
        let named = config
            .named_databases_from(with_file.clone(), |_| Ok("postgres://file/w\n".to_owned()))
            .unwrap();
        assert_eq!(
            named[2],
            ("warehouse".to_owned(), "postgres://file/w".to_owned())
        );
        assert_eq!(named.len(), 3);
        let error = config
            .named_databases_from(with_file, no_files)
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("TASKFACTORY_SQL_WAREHOUSE_FILE"),
            "{error:#}"
        );
    }
}

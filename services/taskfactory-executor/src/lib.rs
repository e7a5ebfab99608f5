//! The executor service: runs tasks of the built-in types and reports their results.
//!
//! Consumes `tasks.<type>` for the types it serves (competing consumers per type: add replicas to
//! scale); produces TaskResults on `results.<activity>.<run>` and dead letters on
//! `dlq.tasks.<type>`. It needs no database: its outcomes are messages, which is also what makes an
//! executor written in any other language a first-class citizen.
//!
//! # Layout
//!
//! - [`execute`]: one task message → one attempt → one TaskResult → ack, retry or dead-letter.
//! - [`builtins`]: the `log`, `http` and `publish` task types.

pub mod builtins;
pub mod execute;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use taskfactory_model::egress::EgressPolicy;
use taskfactory_model::subjects;
use taskfactory_runtime::config::{LifecycleArgs, NatsArgs, parse_duration};
use taskfactory_runtime::messaging::{self, ConsumerSpec};
use taskfactory_runtime::nats;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Configuration of the executor service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Task types to serve (comma-separated), from the built-in types.
    #[arg(
        long = "task-types",
        env = "TASKFACTORY_TASK_TYPES",
        default_value = "log,http,publish,noop",
        value_delimiter = ','
    )]
    pub task_types: Vec<String>,
    /// Tasks of one type run at once.
    #[arg(
        long = "concurrency",
        env = "TASKFACTORY_TASK_CONCURRENCY",
        default_value_t = 16
    )]
    pub concurrency: usize,
    /// Per-type limits overriding `--concurrency`: `TYPE=N`, comma-separated (e.g. `http=4`).
    #[arg(
        long = "type-concurrency",
        env = "TASKFACTORY_TYPE_CONCURRENCY",
        value_delimiter = ',',
        value_parser = parse_type_limit
    )]
    pub type_concurrency: Vec<(String, usize)>,
    /// How long a task may run without a heartbeat before it is redelivered.
    #[arg(long = "ack-wait", env = "TASKFACTORY_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Hosts, host:port, IPs and CIDRs outbound HTTP may reach besides public addresses.
    #[arg(
        long = "egress-allow",
        env = "TASKFACTORY_EGRESS_ALLOW",
        default_value = ""
    )]
    pub egress_allow: String,
    #[command(flatten)]
    pub secrets: taskfactory_runtime::secrets::SecretArgs,
    /// This executor's name in results (default: host name and process id).
    #[arg(long = "executor-name", env = "TASKFACTORY_EXECUTOR_NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

/// Parses `TYPE=N`.
fn parse_type_limit(text: &str) -> Result<(String, usize), String> {
    let (task_type, limit) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not TYPE=N"))?;
    let limit: usize = limit
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: the limit must be a positive number"))?;
    Ok((task_type.trim().to_owned(), limit))
}

impl Config {
    /// Tasks of `task_type` run at once.
    pub fn concurrency_of(&self, task_type: &str) -> usize {
        self.type_concurrency
            .iter()
            .rev()
            .find(|(t, _)| t == task_type)
            .map_or(self.concurrency, |(_, n)| *n)
            .max(1)
    }

    pub fn local(nats_url: &str) -> Self {
        Self {
            nats: NatsArgs::local(nats_url),
            task_types: builtins::BUILTIN_TYPES
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
            concurrency: 16,
            type_concurrency: Vec::new(),
            ack_wait: Duration::from_secs(30),
            egress_allow: String::new(),
            secrets: taskfactory_runtime::secrets::SecretArgs::default(),
            name: None,
            lifecycle: LifecycleArgs::default(),
        }
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "executor".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Runs the executor until `shutdown`, then stops fetching and finishes the tasks in hand.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let egress = EgressPolicy::parse(&config.egress_allow)
        .map_err(anyhow::Error::msg)
        .context("TASKFACTORY_EGRESS_ALLOW")?;
    let secrets =
        taskfactory_runtime::secrets::Secrets::new(&config.secrets).map_err(anyhow::Error::msg)?;
    for task_type in &config.task_types {
        if !builtins::BUILTIN_TYPES.contains(&task_type.as_str()) {
            anyhow::bail!(
                "task type {task_type:?} is not built in (built-in: {}); an external executor serves other types",
                builtins::BUILTIN_TYPES.join(", ")
            );
        }
    }
    let (client, js) = nats::connect_and_declare(
        &config.nats,
        "taskfactory-executor",
        config.lifecycle.startup_patience,
    )
    .await
    .context("nats")?;
    let cancellations = Arc::new(execute::Cancellations::new(
        nats::cancelled_runs(&js, config.nats.stream_replicas)
            .await
            .map_err(|e| anyhow::anyhow!("the cancelled-runs bucket: {e}"))?,
    ));
    let finished_tasks = nats::ensure_bucket(
        &js,
        nats::finished_tasks_config(config.nats.stream_replicas),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the finished-tasks bucket: {e}"))?;
    let complete = taskfactory_runtime::finished_tasks::complete_watch();
    let executor = Arc::new(execute::Executor {
        builtins: builtins::Builtins::new(egress, secrets, js.clone(), client.clone())
            .context("http client")?,
        name: config.name.clone().unwrap_or_else(default_name),
        ack_wait: config.ack_wait,
        cancellations: cancellations.clone(),
        max_deliveries: config.nats.max_deliveries,
        finished_tasks: finished_tasks.clone(),
        complete: complete.clone(),
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    tracker.spawn(cancellations.complete.clone().run(
        js.clone(),
        cancellations.bucket(),
        config.nats.declare_every,
        shutdown.clone(),
    ));
    tracker.spawn(cancellations.watch(shutdown.clone()));
    tracker.spawn(complete.run(
        js.clone(),
        finished_tasks,
        config.nats.declare_every,
        shutdown.clone(),
    ));
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
        taskfactory_runtime::metrics::readiness(client.clone(), None, None, kept.clone()),
        shutdown.clone(),
    );
    for task_type in &config.task_types {
        tracker.spawn(messaging::consume(
            js.clone(),
            kept.keep_consumer(ConsumerSpec {
                stream: subjects::TASKS_STREAM,
                durable: subjects::executor_consumer(task_type),
                filter_subject: subjects::task_subject(task_type),
                concurrency: config.concurrency_of(task_type),
                bytes_in_hand: 0,
                ack_wait: config.ack_wait,
                drain_timeout: config.lifecycle.drain_timeout,
                // A task's own attempts, then the deliveries the orchestrator still accepts results
                // of (the executor gives up on each task sooner: its own attempts and the limit).
                max_deliveries: taskfactory_model::spec::MAX_ATTEMPTS_LIMIT
                    .saturating_add(taskfactory_model::results::REDELIVERY_ALLOWANCE)
                    .saturating_add(1),
                dead_letters: subjects::task_dlq_subject_of,
                kind: "task",
            }),
            shutdown.clone(),
            executor.clone(),
        ));
    }
    tracing::info!(types = ?config.task_types, "executor running");
    tracker.close();
    tracker.wait().await;
    // Bounded: a server that is already gone must not hold up the exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    tracing::info!("executor stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_type_limits_override_the_default() {
        let mut config = Config::local("nats://127.0.0.1:4222");
        config.type_concurrency = vec![parse_type_limit("http=4").unwrap()];
        assert_eq!(config.concurrency_of("http"), 4);
        assert_eq!(config.concurrency_of("log"), 16);
        assert!(parse_type_limit("http").is_err());
        assert!(parse_type_limit("http=0").is_err());
        assert!(parse_type_limit("http=many").is_err());
    }
}

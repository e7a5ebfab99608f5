//! `taskfactory-bench`: how fast taskfactory turns events into finished fan-outs, beside what
//! JetStream alone does on the same machine and the same `nats-server`, in one run.
//!
//! ```text
//! just bench                       # = cargo run --release -p taskfactory-tests --bin taskfactory-bench --
//! just bench --events 1000 --fan-out 40 --json
//! just bench --processes --events 3000 --fan-out 1   # the services as deployed
//! ```
//!
//! Two phases share one fresh `nats-server` (and one fresh database) from the test harness:
//!
//! 1. **baseline** — raw JetStream, no database: E messages with `Nats-Msg-Id` into `BENCH_IN`;
//!    a pull consumer (the runtime's consume loop, at the orchestrator's trigger concurrency)
//!    publishes N messages per input to `BENCH_OUT` with `Nats-Msg-Id`, awaits their acks, and acks
//!    the input; a second pull consumer acks and counts the outputs. An input is done when its N-th
//!    output is acked.
//! 2. **taskfactory** — the three services in this process, or with `--processes` as processes of
//!    their own from the release binaries, as deployed (the headline figures); one activity with an event trigger on
//!    `events.bench.*` and one `noop` template with `forEach: range(N)`. E events with distinct
//!    `Nats-Msg-Id`s; an event is done when this process receives the run's
//!    `events.taskfactory.run.completed`. Postgres is then read to check the counts and to split
//!    each run's latency into stages.
//!
//! Each phase first runs a warm-up, one event at a time (its latencies are reported as "unloaded"),
//! then publishes the E events as fast as JetStream acks them (a bounded window of publishes in
//! flight) and waits for all to finish. Latency is from the publish of an event to its completion,
//! on this process's monotonic clock; with a burst, it includes the wait behind earlier events.
//! Timings are reported, never asserted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use sqlx::Row as _;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_model::subjects;
use taskfactory_proto::v1::CreateActivityRequest;
use taskfactory_runtime::messaging::{self, ConsumerSpec, Handler, Then, Unfinished};
use taskfactory_tests::{EnvOptions, Service, TestEnv};
use tokio_util::sync::CancellationToken;

/// Measures events/s, tasks/s and publish → completion latency of taskfactory beside a raw
/// JetStream baseline.
#[derive(Parser, Debug, Clone)]
#[command(name = "taskfactory-bench")]
struct Args {
    /// Events published in the measured burst (per phase). The default keeps taskfactory busy for
    /// about a minute on a 2-core machine; far fewer make the baseline's burst too short to time.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// Tasks per event (taskfactory) / output messages per input (baseline).
    #[arg(long = "fan-out", default_value_t = 10)]
    fan_out: usize,
    /// Warm-up events, one at a time, before the burst (per phase).
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Event publishes awaiting their JetStream ack at once during the burst.
    #[arg(long = "publish-window", default_value_t = 64)]
    publish_window: usize,
    /// Pace the burst at this many events/s (0: as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Baseline: input messages in hand at once (as many as taskfactory's triggers at most).
    #[arg(long = "baseline-in-concurrency", default_value_t = 256)]
    baseline_in_concurrency: usize,
    /// Baseline: output messages in hand at once (as many as taskfactory's results at most).
    #[arg(long = "baseline-out-concurrency", default_value_t = 256)]
    baseline_out_concurrency: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long = "timeout-secs", default_value_t = 600)]
    timeout_secs: u64,
    /// Run only the taskfactory phase.
    #[arg(long = "skip-baseline")]
    skip_baseline: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Export every span over OTLP/gRPC to an in-process receiver (what tracing costs; the
    /// report counts the spans received).
    #[arg(long)]
    traces: bool,
    /// Service logs at `info` in this format on stderr, as in production (what logging costs;
    /// send stderr to /dev/null). Without it only warnings are logged.
    #[arg(long, value_enum)]
    logs: Option<taskfactory_runtime::telemetry::LogFormat>,
    /// Run the three services as processes of their own (the release binaries in `--binaries`),
    /// as they are deployed: the headline figures. Reports each one's CPU and peak RSS.
    #[arg(long)]
    processes: bool,
    /// With `--processes`: where the service binaries are (relative to the workspace root).
    #[arg(long, default_value = "target/release")]
    binaries: String,
    /// With `--processes`: SIGKILL each service once during the burst and start it again (the
    /// trigger once a sixth of the fires are recorded, the orchestrator once a third of the runs,
    /// the executor once half of the tasks have succeeded), then count in Postgres the runs lost
    /// and the tasks that ended twice. The services' CPU is not reported (their processes change).
    #[arg(long, requires = "processes")]
    kill: bool,
    /// Flow control: the activity has `flow.concurrency` keyed on the event's `k`, and event `i`
    /// has `k = i mod this` (0: no flow control).
    #[arg(long = "concurrency-keys", default_value_t = 0)]
    concurrency_keys: usize,
    /// With `--concurrency-keys`: runs of one key at once.
    #[arg(long = "concurrency-limit", default_value_t = 1)]
    concurrency_limit: u32,
    /// Flow control: the activity has `flow.throttle` keyed on the event's `k`, and event `i` has
    /// `k = i mod this` (0: no throttle). Not with `--concurrency-keys`.
    #[arg(
        long = "throttle-keys",
        default_value_t = 0,
        conflicts_with = "concurrency_keys"
    )]
    throttle_keys: usize,
    /// With `--throttle-keys`: runs of one key started per second (and at once after a pause).
    #[arg(long = "throttle-limit", default_value_t = 10)]
    throttle_limit: u32,
    /// Task concurrency: the activity's tasks have `concurrency` keyed on the event's `k`, and
    /// event `i` has `k = i mod this` (0: none).
    #[arg(long = "task-keys", default_value_t = 0)]
    task_keys: usize,
    /// With `--task-keys`: tasks of one key with executors at once.
    #[arg(long = "task-limit", default_value_t = 1)]
    task_limit: u32,
}

/// The flow control the bench's activity has.
#[derive(Clone, Copy, Debug)]
enum BenchFlow {
    Concurrency(u32),
    Throttle(u32),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.events == 0 || args.fan_out == 0 {
        bail!("--events and --fan-out must be at least 1");
    }
    // Service logs: warnings and errors only, to stderr, so stdout is the report alone. Installed
    // before the harness's, which then stays out of the way. With --traces, every span goes to a
    // receiver in this process, as a collector would take them.
    let receiver = if args.traces {
        Some(taskfactory_tests::otlp::OtlpReceiver::start_counting().await?)
    } else {
        None
    };
    let telemetry =
        taskfactory_runtime::telemetry::install(taskfactory_runtime::telemetry::Settings {
            service: "taskfactory-bench",
            format: args.logs.unwrap_or_default(),
            default_log_filter: if args.logs.is_some() { "info" } else { "warn" },
            logs_to_stderr: true,
            traces: receiver.is_some(),
            otlp_endpoint: receiver.as_ref().map(|r| r.endpoint()),
        });

    let machine = Machine::read();
    progress(&format!(
        "taskfactory-bench: {} events × fan-out {} (+{} warm-up), {} CPUs",
        args.events, args.fan_out, args.warmup, machine.cpus
    ));
    let env = TestEnv::new(EnvOptions {
        binaries: taskfactory_tests::workspace_root().join(&args.binaries),
        ..EnvOptions::default()
    })
    .await?;
    let baseline = if args.skip_baseline {
        None
    } else {
        progress("baseline: raw JetStream …");
        Some(
            baseline_phase(&env, &args)
                .await
                .context("baseline phase")?,
        )
    };
    progress(if args.processes {
        "taskfactory: NATS + Postgres + the three services as processes …"
    } else {
        "taskfactory: NATS + Postgres + the three services in-process …"
    });
    let taskfactory = taskfactory_phase(&env, &args)
        .await
        .context("taskfactory phase")?;

    let report = Report {
        args: args.clone(),
        machine,
        baseline,
        taskfactory,
    };
    telemetry.shutdown().await;
    if let Some(receiver) = &receiver {
        progress(&format!(
            "traces: {} spans received over OTLP",
            receiver.received()
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.table());
    }
    let tf = &report.taskfactory.phase;
    if tf.completed < args.events || report.taskfactory.check.problems() > 0 {
        bail!("the taskfactory phase did not finish cleanly (see the report)");
    }
    Ok(())
}

fn progress(line: &str) {
    eprintln!("{line}");
}

// ---------------------------------------------------------------------------------------------
// Completion tracking and publishing, shared by both phases.

/// When each event (slot) finished, as this process saw it.
struct Tracker {
    done: Mutex<Vec<Option<(Instant, SystemTime)>>>,
    count: AtomicUsize,
}

impl Tracker {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            done: Mutex::new(vec![None; slots]),
            count: AtomicUsize::new(0),
        })
    }

    /// Marks a slot finished now (the first time only).
    fn complete(&self, slot: usize) {
        let now = (Instant::now(), SystemTime::now());
        let mut done = self.done.lock().expect("tracker lock");
        if let Some(entry) = done.get_mut(slot)
            && entry.is_none()
        {
            *entry = Some(now);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done_in(&self, range: Range<usize>) -> usize {
        let done = self.done.lock().expect("tracker lock");
        done[range].iter().filter(|d| d.is_some()).count()
    }

    fn get(&self, slot: usize) -> Option<(Instant, SystemTime)> {
        self.done.lock().expect("tracker lock")[slot]
    }

    /// Waits until every slot of `range` is done, or `deadline`; returns whether all are.
    async fn wait(&self, range: Range<usize>, deadline: Instant) -> bool {
        let want = range.len();
        loop {
            if self.done_in(range.clone()) >= want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What to publish for slot `i`: subject, `Nats-Msg-Id`, payload.
type MakeMessage<'a> = &'a (dyn Fn(usize) -> (String, String, Bytes) + Sync);

/// Publishes one message and waits for the stream's ack; returns when the publish started.
async fn publish_one(
    js: &jetstream::Context,
    make: MakeMessage<'_>,
    slot: usize,
) -> anyhow::Result<(Instant, SystemTime)> {
    let (subject, msg_id, payload) = make(slot);
    let started = (Instant::now(), SystemTime::now());
    let ack = messaging::publish(js, subject, &msg_id, None, payload)
        .await?
        .await?;
    if ack.duplicate {
        bail!("{msg_id} was dropped as a duplicate");
    }
    Ok(started)
}

/// Warm-up: one slot at a time, each waited for before the next is published. Returns each
/// slot's publish instant.
async fn warm_up(
    js: &jetstream::Context,
    make: MakeMessage<'_>,
    tracker: &Tracker,
    slots: Range<usize>,
    timeout: Duration,
) -> anyhow::Result<Vec<(Instant, SystemTime)>> {
    let mut started = Vec::with_capacity(slots.len());
    for slot in slots {
        started.push(publish_one(js, make, slot).await?);
        if !tracker.wait(slot..slot + 1, Instant::now() + timeout).await {
            bail!("warm-up event {slot} did not finish within {timeout:?}");
        }
    }
    Ok(started)
}

/// Publish → done of `slots` (index 0 = `slots.start`), sorted; slots not done are left out.
fn latencies(
    tracker: &Tracker,
    slots: Range<usize>,
    started: &[(Instant, SystemTime)],
) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = slots
        .zip(started)
        .filter_map(|(slot, (start, _))| tracker.get(slot).map(|(done, _)| done - *start))
        .collect();
    latencies.sort();
    latencies
}

/// The burst: every slot published as fast as acks come back (or at `rate` per second, if
/// positive), `window` publishes in flight. Returns each slot's publish instant (index 0 =
/// `slots.start`) and when the last ack came.
async fn burst(
    js: &jetstream::Context,
    make: MakeMessage<'_>,
    slots: Range<usize>,
    window: usize,
    rate: f64,
) -> anyhow::Result<(Vec<(Instant, SystemTime)>, Instant)> {
    let mut started = Vec::with_capacity(slots.len());
    let begin = tokio::time::Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let settle = |result: Result<jetstream::publish::PublishAck, _>| -> anyhow::Result<()> {
        let ack: jetstream::publish::PublishAck = result?;
        if ack.duplicate {
            bail!("an event was dropped as a duplicate");
        }
        Ok(())
    };
    for (k, slot) in slots.enumerate() {
        if rate > 0.0 {
            tokio::time::sleep_until(begin + Duration::from_secs_f64(k as f64 / rate)).await;
        }
        while in_flight.len() >= window.max(1) {
            let result = in_flight.next().await.expect("not empty");
            settle(result)?;
        }
        let (subject, msg_id, payload) = make(slot);
        started.push((Instant::now(), SystemTime::now()));
        let ack = messaging::publish(js, subject, &msg_id, None, payload).await?;
        in_flight.push(ack.into_future());
    }
    while let Some(result) = in_flight.next().await {
        settle(result)?;
    }
    Ok((started, Instant::now()))
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// One phase's figures.
struct Phase {
    events: usize,
    fan_out: usize,
    completed: usize,
    /// First publish → last publish ack of the burst.
    publish: Duration,
    /// First publish → last completion of the burst.
    wall: Duration,
    /// Burst: publish → completion, sorted.
    latencies: Vec<Duration>,
    /// Warm-up: publish → completion, one at a time, sorted.
    unloaded: Vec<Duration>,
    cpu: CpuUse,
}

impl Phase {
    fn events_per_sec(&self) -> f64 {
        self.completed as f64 / self.wall.as_secs_f64()
    }

    fn tasks_per_sec(&self) -> f64 {
        (self.completed * self.fan_out) as f64 / self.wall.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "events": self.events,
            "fan_out": self.fan_out,
            "completed": self.completed,
            "publish_secs": self.publish.as_secs_f64(),
            "wall_secs": self.wall.as_secs_f64(),
            "events_per_sec": self.events_per_sec(),
            "tasks_per_sec": self.tasks_per_sec(),
            "latency_ms": quantiles_json(&self.latencies),
            "unloaded_latency_ms": quantiles_json(&self.unloaded),
            "cpu_secs": self.cpu.json(),
        })
    }
}

/// The value at quantile `q` (nearest rank) of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn quantiles_json(sorted: &[Duration]) -> serde_json::Value {
    let q = |p| quantile(sorted, p).map(ms);
    serde_json::json!({
        "count": sorted.len(),
        "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0),
    })
}

/// CPU time (user + system) spent during the burst, by process group.
#[derive(Default, Clone)]
struct CpuUse {
    /// This process: the bench client and, in the taskfactory phase, the three services.
    this_process: f64,
    nats_server: f64,
    /// Backends of the benchmark's database (taskfactory phase only).
    postgres: Option<f64>,
    /// With `--processes`: each service process, and its peak RSS in KiB at the end.
    services: Vec<ServiceUse>,
}

/// One service process's share of a phase.
#[derive(Clone)]
struct ServiceUse {
    name: &'static str,
    cpu: f64,
    peak_rss_kib: u64,
}

impl CpuUse {
    fn total(&self) -> f64 {
        self.this_process
            + self.nats_server
            + self.postgres.unwrap_or(0.0)
            + self.services.iter().map(|s| s.cpu).sum::<f64>()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "this_process": self.this_process,
            "nats_server": self.nats_server,
            "postgres_backends": self.postgres,
            "services": self.services.iter().map(|s| serde_json::json!({
                "service": s.name,
                "cpu_secs": s.cpu,
                "peak_rss_mib": s.peak_rss_kib as f64 / 1024.0,
            })).collect::<Vec<_>>(),
            "total": self.total(),
        })
    }
}

/// A process's peak resident set so far, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds a process has used so far (`/proc/<pid>/stat` utime + stime).
fn cpu_secs(pid: u32, ticks_per_sec: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec)
}

/// Our `nats-server`: the child of this process with that name.
fn nats_server_pid() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
            let ppid = stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?;
            (name == "nats-server" && ppid == me).then_some(pid)
        })
}

/// CPU seconds of a set of processes, by pid.
fn cpu_by_pid(pids: &[u32], ticks: f64) -> HashMap<u32, f64> {
    pids.iter()
        .filter_map(|&pid| cpu_secs(pid, ticks).map(|s| (pid, s)))
        .collect()
}

/// A snapshot to take CPU deltas from.
struct CpuMark {
    this_process: f64,
    nats_server: f64,
    postgres: HashMap<u32, f64>,
    services: HashMap<u32, f64>,
}

struct CpuProbe {
    ticks: f64,
    nats_pid: Option<u32>,
    /// With `--processes`: the services' processes.
    services: Vec<(&'static str, u32)>,
}

impl CpuProbe {
    fn new() -> Self {
        let ticks = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0);
        Self {
            ticks,
            nats_pid: nats_server_pid(),
            services: Vec::new(),
        }
    }

    fn with_services(mut self, services: Vec<(&'static str, u32)>) -> Self {
        self.services = services;
        self
    }

    fn mark(&self, postgres_pids: &[u32]) -> CpuMark {
        CpuMark {
            this_process: cpu_secs(std::process::id(), self.ticks).unwrap_or(0.0),
            nats_server: self
                .nats_pid
                .and_then(|pid| cpu_secs(pid, self.ticks))
                .unwrap_or(0.0),
            postgres: cpu_by_pid(postgres_pids, self.ticks),
            services: cpu_by_pid(
                &self
                    .services
                    .iter()
                    .map(|(_, pid)| *pid)
                    .collect::<Vec<_>>(),
                self.ticks,
            ),
        }
    }

    fn since(&self, start: &CpuMark, postgres_pids: Option<&[u32]>) -> CpuUse {
        let end = self.mark(postgres_pids.unwrap_or(&[]));
        let postgres = postgres_pids.map(|_| {
            // A backend that appeared during the burst counts whole.
            end.postgres
                .iter()
                .map(|(pid, secs)| secs - start.postgres.get(pid).copied().unwrap_or(0.0))
                .sum()
        });
        let services = self
            .services
            .iter()
            .map(|(name, pid)| ServiceUse {
                name,
                cpu: end.services.get(pid).copied().unwrap_or(0.0)
                    - start.services.get(pid).copied().unwrap_or(0.0),
                peak_rss_kib: peak_rss_kib(*pid),
            })
            .collect();
        CpuUse {
            this_process: end.this_process - start.this_process,
            nats_server: end.nats_server - start.nats_server,
            postgres,
            services,
        }
    }
}

async fn postgres_pids(pool: &sqlx::PgPool) -> anyhow::Result<Vec<u32>> {
    let rows: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(p,)| u32::try_from(p).ok())
        .collect())
}

/// The bench database's committed and rolled back transactions so far (`pg_stat_database`;
/// the statistics are flushed by each backend about once a second, so the reading waits a moment).
async fn database_transactions(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await;
    Ok(sqlx::query_as(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// Where the machine's Postgres was: the transaction id counter and the WAL position.
async fn postgres_counters(pool: &sqlx::PgPool) -> anyhow::Result<(i64, String)> {
    Ok(
        sqlx::query_as("SELECT txid_current()::int8, pg_current_wal_lsn()::text")
            .fetch_one(pool)
            .await?,
    )
}

// ---------------------------------------------------------------------------------------------
// Phase 1: raw JetStream.

/// Input slot from a subject `<prefix><slot>`.
fn slot_of(subject: &str, prefix: &str) -> Option<usize> {
    subject.strip_prefix(prefix)?.parse().ok()
}

async fn baseline_phase(env: &TestEnv, args: &Args) -> anyhow::Result<Phase> {
    let warm = 0..args.warmup;
    let measured = args.warmup..args.warmup + args.events;
    let slots = measured.end;
    let fan_out = args.fan_out;
    let timeout = Duration::from_secs(args.timeout_secs);

    // Streams configured like taskfactory's own (file storage, limits, same duplicate window).
    let setup = env.js().await?;
    let template = taskfactory_runtime::nats::stream_configs(1)
        .into_iter()
        .find(|c| c.name == subjects::EVENTS_STREAM)
        .context("the events stream's configuration")?;
    for (name, subject) in [("BENCH_IN", "bench.in.>"), ("BENCH_OUT", "bench.out.>")] {
        setup
            .create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.to_owned()],
                description: Some("taskfactory-bench baseline".to_owned()),
                ..template.clone()
            })
            .await
            .with_context(|| format!("creating stream {name}"))?;
    }

    let tracker = Tracker::new(slots);
    let shutdown = CancellationToken::new();
    // Like the orchestrator: a connection of its own, take an input, publish N with Nats-Msg-Id,
    // await every ack, then ack the input.
    let relay_js = env.js().await?;
    let out_payload = Bytes::from(vec![b'x'; 256]);
    let relay = tokio::spawn(messaging::consume(
        relay_js.clone(),
        ConsumerSpec {
            stream: "BENCH_IN",
            durable: "bench-relay".to_owned(),
            filter_subject: "bench.in.>".to_owned(),
            concurrency: args.baseline_in_concurrency,
            bytes_in_hand: 0,
            ack_wait: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            max_deliveries: 20,
            dead_letters: |_| "bench.dlq".to_owned(),
            kind: "bench",
        },
        shutdown.clone(),
        Arc::new(Relay {
            js: relay_js,
            payload: out_payload,
            fan_out,
        }),
    ));
    // Like the result consumer: a connection of its own, ack and count per input.
    let sink = tokio::spawn(messaging::consume(
        env.js().await?,
        ConsumerSpec {
            stream: "BENCH_OUT",
            durable: "bench-sink".to_owned(),
            filter_subject: "bench.out.>".to_owned(),
            concurrency: args.baseline_out_concurrency,
            bytes_in_hand: 0,
            ack_wait: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            max_deliveries: 20,
            dead_letters: |_| "bench.dlq".to_owned(),
            kind: "bench",
        },
        shutdown.clone(),
        Arc::new(Sink {
            tracker: tracker.clone(),
            counts: Mutex::new(vec![0; slots]),
            fan_out,
        }),
    ));

    let js = env.js().await?;
    let make = |slot: usize| {
        (
            format!("bench.in.{slot}"),
            format!("in-{slot}"),
            Bytes::from(format!("{{\"i\":{slot}}}")),
        )
    };
    let warm_started = warm_up(&js, &make, &tracker, warm.clone(), timeout).await?;

    let probe = CpuProbe::new();
    let cpu_start = probe.mark(&[]);
    let (started, last_ack) =
        burst(&js, &make, measured.clone(), args.publish_window, args.rate).await?;
    let all = tracker
        .wait(measured.clone(), Instant::now() + timeout)
        .await;
    let cpu = probe.since(&cpu_start, None);
    if !all {
        eprintln!(
            "baseline: only {} of {} inputs finished within {timeout:?}",
            tracker.done_in(measured.clone()),
            args.events
        );
    }
    shutdown.cancel();
    let _ = relay.await;
    let _ = sink.await;
    Ok(phase_from(
        args,
        &tracker,
        (warm, &warm_started),
        (measured, &started),
        last_ack,
        cpu,
    ))
}

async fn relay_one(
    js: &jetstream::Context,
    message: &Message,
    fan_out: usize,
    payload: Bytes,
) -> anyhow::Result<()> {
    let slot = slot_of(message.subject.as_str(), "bench.in.").context("input subject")?;
    let mut acks = Vec::with_capacity(fan_out);
    for k in 0..fan_out {
        let ack = messaging::publish(
            js,
            format!("bench.out.{slot}"),
            &format!("out-{slot}-{k}"),
            None,
            payload.clone(),
        )
        .await?;
        acks.push(ack.into_future());
    }
    for result in futures::future::join_all(acks).await {
        result?;
    }
    Ok(())
}

/// The figures of a phase from the tracker.
fn phase_from(
    args: &Args,
    tracker: &Tracker,
    (warm, warm_started): (Range<usize>, &[(Instant, SystemTime)]),
    (measured, started): (Range<usize>, &[(Instant, SystemTime)]),
    last_ack: Instant,
    cpu: CpuUse,
) -> Phase {
    let first = started.first().map(|s| s.0).unwrap_or_else(Instant::now);
    let last_done = measured
        .clone()
        .filter_map(|slot| tracker.get(slot).map(|(done, _)| done))
        .max()
        .unwrap_or(first);
    let burst = latencies(tracker, measured, started);
    let unloaded = latencies(tracker, warm, warm_started);
    Phase {
        events: args.events,
        fan_out: args.fan_out,
        completed: burst.len(),
        publish: last_ack - first,
        wall: last_done - first,
        latencies: burst,
        unloaded,
        cpu,
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: taskfactory.

struct TaskfactoryResult {
    phase: Phase,
    check: PgCheck,
    stages: Vec<Stage>,
    /// Write transactions (xids) and WAL bytes on the machine's Postgres during the burst.
    xids: i64,
    /// Every transaction's end in the bench's database during the burst (reads too; the
    /// statistics collector's view, a few queries of this process included).
    commits: i64,
    rollbacks: i64,
    wal_bytes: f64,
    /// Completion events that reported a status other than RUN_SUCCEEDED.
    not_succeeded: usize,
}

/// What Postgres holds about the burst's runs.
#[derive(Default)]
struct PgCheck {
    fires: i64,
    runs: i64,
    runs_succeeded: i64,
    tasks: i64,
    tasks_succeeded: i64,
    attempts: i64,
    expected_runs: i64,
    expected_tasks: i64,
    /// Tasks with more than one final attempt row: run twice.
    tasks_ended_twice: i64,
    /// Tasks with more than one start on record (an execution a kill cut short, run again).
    tasks_started_again: i64,
    /// With `--kill`: each service killed, in turn.
    kills: Vec<Kill>,
}

/// A service killed during the burst (`--kill`) and started again.
#[derive(Debug)]
struct Kill {
    service: &'static str,
    /// Since the burst's first publish.
    at: Duration,
    /// What the database held when it was killed (fires, runs or tasks succeeded).
    reached: String,
}

impl PgCheck {
    fn problems(&self) -> usize {
        [
            self.fires != self.expected_runs,
            self.runs != self.expected_runs,
            self.runs_succeeded != self.expected_runs,
            self.tasks != self.expected_tasks,
            self.tasks_succeeded != self.expected_tasks,
            self.tasks_ended_twice != 0,
        ]
        .iter()
        .filter(|p| **p)
        .count()
    }
}

/// One stage of a run's life, per run, sorted; negative spans (clock granularity) clamp to zero.
struct Stage {
    name: &'static str,
    /// Warm-up runs (one at a time).
    unloaded: Vec<Duration>,
    /// The burst's runs.
    burst: Vec<Duration>,
}

const STAGES: [&str; 7] = [
    "publish → trigger takes the event",
    "fire recorded and published (trigger)",
    "→ orchestrator begins the run's transaction",
    "→ first task starts (executor)",
    "first task starts → last task ends",
    "last task ends → run finished (result recorded)",
    "run finished → completion event received",
];

fn activity_yaml(fan_out: usize, flow: Option<BenchFlow>, task_limit: Option<u32>) -> String {
    let task_concurrency = task_limit.map_or(String::new(), |limit| {
        format!("    concurrency: {{key: event.k, limit: {limit}}}\n")
    });
    let flow = match flow {
        None => String::new(),
        Some(BenchFlow::Concurrency(limit)) => {
            format!("flow: {{concurrency: {{key: event.k, limit: {limit}}}}}\n")
        }
        Some(BenchFlow::Throttle(limit)) => format!(
            "flow: {{throttle: {{key: event.k, limit: {limit}, period: 1s, burst: {limit}}}}}\n"
        ),
    };
    format!(
        r#"
name: bench-fanout
description: taskfactory-bench — {fan_out} noop tasks per event
trigger:
  event:
    subject: "events.bench.*"
{flow}tasks:
  - name: noop
    type: noop
    forEach: "range({fan_out})"
    maxTasks: {fan_out}
{task_concurrency}    params:
      i: "{{{{ item }}}}"
"#
    )
}

async fn taskfactory_phase(env: &TestEnv, args: &Args) -> anyhow::Result<TaskfactoryResult> {
    let warm = 0..args.warmup;
    let measured = args.warmup..args.warmup + args.events;
    let slots = measured.end;
    let timeout = Duration::from_secs(args.timeout_secs);

    let all = [Service::Trigger, Service::Orchestrator, Service::Executor];
    let mut services = if args.processes {
        let mut running = Vec::new();
        for service in all {
            running.push(env.spawn_process(service, &[])?);
        }
        env.wait_ready(&all).await?;
        running
    } else {
        env.start_all().await?
    };
    // Killed services are new processes afterwards: their CPU is not followed.
    let service_pids: Vec<(&'static str, u32)> = all
        .iter()
        .zip(&services)
        .filter(|_| !args.kill)
        .filter_map(|(service, running)| Some((service.binary_name(), running.pid()?)))
        .collect();
    let mut admin = env.admin().await?;
    let activity = admin
        .create_activity(CreateActivityRequest {
            spec: Some(spec_from_yaml(&activity_yaml(
                args.fan_out,
                if args.concurrency_keys > 0 {
                    Some(BenchFlow::Concurrency(args.concurrency_limit))
                } else if args.throttle_keys > 0 {
                    Some(BenchFlow::Throttle(args.throttle_limit))
                } else {
                    None
                },
                (args.task_keys > 0).then_some(args.task_limit),
            ))?),
        })
        .await
        .context("CreateActivity")?
        .into_inner();
    let activity_id: ActivityId = activity.id.parse().context("activity id")?;

    let msg_id = |slot: usize| {
        if slot < args.warmup {
            format!("warmup-{slot}")
        } else {
            format!("bench-{}", slot - args.warmup)
        }
    };
    // The run id is derived from (activity, dedupe key = Nats-Msg-Id).
    let by_run: HashMap<String, usize> = (0..slots)
        .map(|slot| (RunId::derive(activity_id, &msg_id(slot)).to_string(), slot))
        .collect();
    let tracker = Tracker::new(slots);
    let not_succeeded = Arc::new(AtomicUsize::new(0));
    // Core NATS sees every JetStream publish; a connection of its own, kept for the phase.
    let listener_client = env.nats_client().await?;
    let mut completions = listener_client
        .subscribe(subjects::RUN_COMPLETED_EVENT)
        .await?;
    let listener = {
        let tracker = tracker.clone();
        let not_succeeded = not_succeeded.clone();
        tokio::spawn(async move {
            while let Some(message) = completions.next().await {
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
                    continue;
                };
                let Some(&slot) = body["runId"].as_str().and_then(|id| by_run.get(id)) else {
                    continue;
                };
                if body["status"] != "RUN_SUCCEEDED" && tracker.get(slot).is_none() {
                    not_succeeded.fetch_add(1, Ordering::Relaxed);
                }
                tracker.complete(slot);
            }
        })
    };

    let js = env.js().await?;
    let make = |slot: usize| {
        (
            "events.bench.created".to_owned(),
            msg_id(slot),
            Bytes::from(format!(
                "{{\"i\":{slot},\"k\":{}}}",
                slot % args
                    .concurrency_keys
                    .max(args.throttle_keys)
                    .max(args.task_keys)
                    .max(1)
            )),
        )
    };
    let warm_started = warm_up(&js, &make, &tracker, warm.clone(), timeout).await?;

    let pool = env.db.pool().await?;
    let pids_before = postgres_pids(&pool).await?;
    let probe = CpuProbe::new().with_services(service_pids);
    let cpu_start = probe.mark(&pids_before);
    let (xid_start, lsn_start) = postgres_counters(&pool).await?;
    let xacts_start = database_transactions(&pool).await?;
    let burst_started = Instant::now();
    let load = async {
        let (started, last_ack) =
            burst(&js, &make, measured.clone(), args.publish_window, args.rate).await?;
        let all = tracker
            .wait(measured.clone(), Instant::now() + timeout)
            .await;
        anyhow::Ok((started, last_ack, all))
    };
    let ((started, last_ack, all), kills) = if args.kill {
        tokio::try_join!(
            load,
            kill_each_once(env, &mut services, &pool, args, burst_started)
        )?
    } else {
        (load.await?, Vec::new())
    };
    let (xid_end, lsn_end) = postgres_counters(&pool).await?;
    let xacts_end = database_transactions(&pool).await?;
    let pids_after = postgres_pids(&pool).await?;
    let cpu = probe.since(&cpu_start, Some(&pids_after));
    if !all {
        eprintln!(
            "taskfactory: only {} of {} runs finished within {timeout:?}",
            tracker.done_in(measured.clone()),
            args.events
        );
    }
    listener.abort();
    drop(listener_client);
    let (wal_bytes,): (f64,) =
        sqlx::query_as("SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::float8")
            .bind(&lsn_end)
            .bind(&lsn_start)
            .fetch_one(&pool)
            .await?;

    let published: Vec<SystemTime> = warm_started
        .iter()
        .chain(&started)
        .map(|(_, wall)| *wall)
        .collect();
    let (mut check, stages) = postgres_view(&pool, activity_id, args, &tracker, &published).await?;
    check.kills = kills;
    pool.close().await;
    for service in services {
        service.stop().await?;
    }
    let phase = phase_from(
        args,
        &tracker,
        (warm, &warm_started),
        (measured, &started),
        last_ack,
        cpu,
    );
    Ok(TaskfactoryResult {
        phase,
        check,
        stages,
        // txid_current() takes an id itself: one of the two calls is ours.
        xids: xid_end - xid_start - 1,
        commits: xacts_end.0 - xacts_start.0,
        rollbacks: xacts_end.1 - xacts_start.1,
        wal_bytes,
        not_succeeded: not_succeeded.load(Ordering::Relaxed),
    })
}

/// `--kill`: SIGKILLs each service once, in turn, when the burst has reached it in the database,
/// and starts it again at once.
async fn kill_each_once(
    env: &TestEnv,
    services: &mut [taskfactory_tests::Running],
    pool: &sqlx::PgPool,
    args: &Args,
    burst_started: Instant,
) -> anyhow::Result<Vec<Kill>> {
    let events = i64::try_from(args.events)?;
    let tasks = i64::try_from(args.events * args.fan_out)?;
    // The burst's only (the warm-up's are there already), and at least one of each.
    let plan = [
        (
            Service::Trigger,
            "fires",
            "SELECT count(*) FROM fires WHERE dedupe_key LIKE 'bench-%'",
            (events / 6).max(1),
        ),
        (
            Service::Orchestrator,
            "runs",
            "SELECT count(*) FROM runs WHERE dedupe_key LIKE 'bench-%'",
            (events / 3).max(1),
        ),
        (
            Service::Executor,
            "tasks succeeded",
            "SELECT count(*) FROM tasks t JOIN runs r ON r.id = t.run_id \
             WHERE t.status = 'SUCCEEDED' AND r.dedupe_key LIKE 'bench-%'",
            (tasks / 2).max(1),
        ),
    ];
    let mut kills = Vec::new();
    for (index, (service, what, sql, at)) in plan.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        let reached = loop {
            let now: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
            if now >= at {
                break now;
            }
            if Instant::now() > deadline {
                bail!("--kill: {what} never reached {at} (at {now})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let killed_at = Instant::now();
        let Some(running) = services.get_mut(index) else {
            bail!("--kill: no {} running", service.binary_name());
        };
        // Killed before the new process starts (dropping the old one afterwards reaps it).
        let pid = running
            .pid()
            .context("--kill: the service is not a process")?;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?;
        if !killed.success() {
            bail!("--kill: kill -KILL {pid} failed");
        }
        let replacement = env.spawn_process(service, &[])?;
        let new_pid = replacement.pid().context("--kill: no process started")?;
        std::mem::replace(running, replacement).kill();
        // Still there a moment later: it started (its consumers already exist, so readiness as
        // the harness checks it says nothing of a process that was just started again).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let state = std::fs::read_to_string(format!("/proc/{new_pid}/stat")).unwrap_or_default();
        if state.is_empty() || state.split_whitespace().nth(2) == Some("Z") {
            bail!("--kill: {} did not start again", service.binary_name());
        }
        kills.push(Kill {
            service: service.binary_name(),
            at: killed_at - burst_started,
            reached: format!("{reached} {what}"),
        });
    }
    Ok(kills)
}

/// Counts of the burst and per-run stage timestamps of every run (warm-up and burst), from
/// Postgres. `published`: each slot's publish time.
async fn postgres_view(
    pool: &sqlx::PgPool,
    activity: ActivityId,
    args: &Args,
    tracker: &Tracker,
    published: &[SystemTime],
) -> anyhow::Result<(PgCheck, Vec<Stage>)> {
    let fires: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM fires WHERE activity_id = $1 AND dedupe_key LIKE 'bench-%'",
    )
    .bind(activity.0)
    .fetch_one(pool)
    .await?;
    let rows = sqlx::query(
        "SELECT r.dedupe_key, r.status, f.fired_at, f.published_at, r.created_at, r.finished_at, \
             count(DISTINCT t.id) AS tasks, \
             count(DISTINCT t.id) FILTER (WHERE t.status = 'SUCCEEDED') AS tasks_succeeded, \
             count(a.task_id) FILTER (WHERE a.status <> 'RUNNING') AS attempts, \
             min(a.started_at) AS first_started, max(a.finished_at) AS last_finished \
         FROM runs r \
         JOIN fires f ON f.activity_id = r.activity_id AND f.dedupe_key = r.dedupe_key \
         LEFT JOIN tasks t ON t.run_id = r.id \
         LEFT JOIN task_attempts a ON a.task_id = t.id \
         WHERE r.activity_id = $1 \
         GROUP BY r.id, f.id",
    )
    .bind(activity.0)
    .fetch_all(pool)
    .await?;

    let (tasks_ended_twice, tasks_started_again): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE ended > 1), count(*) FILTER (WHERE started > 1) \
         FROM (SELECT t.id, \
                 count(a.task_id) FILTER (WHERE a.status <> 'RUNNING') AS ended, \
                 count(a.task_id) FILTER (WHERE a.status = 'RUNNING') AS started \
             FROM runs r JOIN tasks t ON t.run_id = r.id \
             LEFT JOIN task_attempts a ON a.task_id = t.id \
             WHERE r.activity_id = $1 AND r.dedupe_key LIKE 'bench-%' \
             GROUP BY t.id) per_task",
    )
    .bind(activity.0)
    .fetch_one(pool)
    .await?;
    let mut check = PgCheck {
        fires: fires.0,
        tasks_ended_twice,
        tasks_started_again,
        expected_runs: args.events as i64,
        expected_tasks: (args.events * args.fan_out) as i64,
        ..Default::default()
    };
    // Per stage: (warm-up spans, burst spans).
    let mut spans: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); STAGES.len()];
    let span = |from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| {
        Some((to? - from?).to_std().unwrap_or(Duration::ZERO))
    };
    for row in rows {
        let key: String = row.try_get("dedupe_key")?;
        let (in_burst, slot) = if let Some(k) = key.strip_prefix("bench-") {
            (true, k.parse::<usize>().ok().map(|k| args.warmup + k))
        } else {
            (
                false,
                key.strip_prefix("warmup-").and_then(|k| k.parse().ok()),
            )
        };
        if in_burst {
            check.runs += 1;
            let status: String = row.try_get("status")?;
            if status == "SUCCEEDED" {
                check.runs_succeeded += 1;
            }
            check.tasks += row.try_get::<i64, _>("tasks")?;
            check.tasks_succeeded += row.try_get::<i64, _>("tasks_succeeded")?;
            check.attempts += row.try_get::<i64, _>("attempts")?;
        }
        let Some(slot) = slot.filter(|slot| *slot < published.len()) else {
            continue;
        };
        let published: DateTime<Utc> = published[slot].into();
        let received: Option<DateTime<Utc>> = tracker.get(slot).map(|(_, wall)| wall.into());
        let fired_at: Option<DateTime<Utc>> = row.try_get("fired_at")?;
        let fire_published: Option<DateTime<Utc>> = row.try_get("published_at")?;
        let run_created: Option<DateTime<Utc>> = row.try_get("created_at")?;
        let first_started: Option<DateTime<Utc>> = row.try_get("first_started")?;
        let last_finished: Option<DateTime<Utc>> = row.try_get("last_finished")?;
        let run_finished: Option<DateTime<Utc>> = row.try_get("finished_at")?;
        let points = [
            Some(published),
            fired_at,
            fire_published,
            run_created,
            first_started,
            last_finished,
            run_finished,
            received,
        ];
        for (i, pair) in points.windows(2).enumerate() {
            if let Some(d) = span(pair[0], pair[1]) {
                if in_burst {
                    spans[i].1.push(d);
                } else {
                    spans[i].0.push(d);
                }
            }
        }
    }
    let stages = STAGES
        .iter()
        .zip(spans)
        .map(|(name, (mut unloaded, mut burst))| {
            unloaded.sort();
            burst.sort();
            Stage {
                name,
                unloaded,
                burst,
            }
        })
        .collect();
    Ok((check, stages))
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Machine {
    cpus: usize,
    kernel: String,
    load: String,
}

impl Machine {
    fn read() -> Self {
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            load: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }
}

struct Report {
    args: Args,
    machine: Machine,
    baseline: Option<Phase>,
    taskfactory: TaskfactoryResult,
}

fn fmt_ms(d: Option<Duration>) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if d >= Duration::from_secs(10) => format!("{:.2} s", d.as_secs_f64()),
        Some(d) => format!("{:.1} ms", ms(d)),
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.3}", a / b)
    } else {
        "-".to_owned()
    }
}

impl Report {
    fn table(&self) -> String {
        let tf = &self.taskfactory.phase;
        let base = self.baseline.as_ref();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ntaskfactory-bench: {} events × fan-out {} = {} tasks per phase (+{} warm-up events, one at a time)",
            self.args.events,
            self.args.fan_out,
            self.args.events * self.args.fan_out,
            self.args.warmup
        );
        let _ = writeln!(
            out,
            "machine: {} CPUs, kernel {}, load average at start {}; burst {}, publish window {}; baseline consumers {}/{}",
            self.machine.cpus,
            self.machine.kernel,
            self.machine.load,
            if self.args.rate > 0.0 {
                format!("paced at {} events/s", self.args.rate)
            } else {
                "as fast as acks allow".to_owned()
            },
            self.args.publish_window,
            self.args.baseline_in_concurrency,
            self.args.baseline_out_concurrency
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<34} {:>16} {:>16} {:>12}",
            "", "JetStream only", "taskfactory", "tf / base"
        );
        let mut row = |name: &str, b: String, t: String, r: String| {
            let _ = writeln!(out, "{name:<34} {b:>16} {t:>16} {r:>12}");
        };
        let dash = || "-".to_owned();
        row(
            "completed",
            base.map_or_else(dash, |b| format!("{}/{}", b.completed, b.events)),
            format!("{}/{}", tf.completed, tf.events),
            String::new(),
        );
        row(
            "burst published (acked) in",
            base.map_or_else(dash, |b| fmt_ms(Some(b.publish))),
            fmt_ms(Some(tf.publish)),
            String::new(),
        );
        row(
            "wall: first publish → last done",
            base.map_or_else(dash, |b| fmt_ms(Some(b.wall))),
            fmt_ms(Some(tf.wall)),
            base.map_or_else(dash, |b| ratio(tf.wall.as_secs_f64(), b.wall.as_secs_f64())),
        );
        row(
            "events/s",
            base.map_or_else(dash, |b| format!("{:.1}", b.events_per_sec())),
            format!("{:.1}", tf.events_per_sec()),
            base.map_or_else(dash, |b| ratio(tf.events_per_sec(), b.events_per_sec())),
        );
        row(
            "tasks/s (end to end)",
            base.map_or_else(dash, |b| format!("{:.1}", b.tasks_per_sec())),
            format!("{:.1}", tf.tasks_per_sec()),
            base.map_or_else(dash, |b| ratio(tf.tasks_per_sec(), b.tasks_per_sec())),
        );
        for (label, q) in [
            ("latency p50 (burst)", 0.5),
            ("latency p90 (burst)", 0.9),
            ("latency p99 (burst)", 0.99),
            ("latency max (burst)", 1.0),
            ("unloaded latency p50 (warm-up)", 0.5),
            // Over `--warmup` events (50 by default: raise it for a p99 that means something).
            ("unloaded latency p99 (warm-up)", 0.99),
            ("unloaded latency max (warm-up)", 1.0),
        ] {
            let pick = |p: &Phase| {
                if label.starts_with("unloaded") {
                    quantile(&p.unloaded, q)
                } else {
                    quantile(&p.latencies, q)
                }
            };
            let t = pick(tf);
            let b = base.and_then(pick);
            let r = match (t, b) {
                (Some(t), Some(b)) => ratio(t.as_secs_f64(), b.as_secs_f64()),
                _ => "-".to_owned(),
            };
            row(label, fmt_ms(b), fmt_ms(t), r);
        }
        let cores = |p: &Phase| p.cpu.total() / p.wall.as_secs_f64();
        row(
            "CPU s: this process",
            base.map_or_else(dash, |b| format!("{:.2}", b.cpu.this_process)),
            format!("{:.2}", tf.cpu.this_process),
            String::new(),
        );
        row(
            "CPU s: nats-server",
            base.map_or_else(dash, |b| format!("{:.2}", b.cpu.nats_server)),
            format!("{:.2}", tf.cpu.nats_server),
            String::new(),
        );
        for service in &tf.cpu.services {
            row(
                &format!("CPU s: {}", service.name),
                dash(),
                format!("{:.2}", service.cpu),
                String::new(),
            );
        }
        for service in &tf.cpu.services {
            row(
                &format!("peak RSS MiB: {}", service.name),
                dash(),
                format!("{:.1}", service.peak_rss_kib as f64 / 1024.0),
                String::new(),
            );
        }
        row(
            "CPU s: Postgres backends",
            dash(),
            tf.cpu.postgres.map_or_else(dash, |p| format!("{p:.2}")),
            String::new(),
        );
        row(
            "CPU cores busy (avg over wall)",
            base.map_or_else(dash, |b| format!("{:.2}", cores(b))),
            format!("{:.2}", cores(tf)),
            String::new(),
        );

        let t = &self.taskfactory;
        let per_run = |x: f64| x / tf.events.max(1) as f64;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Postgres during the taskfactory burst: {} write transactions ({:.1} per event, {:.2} per task), {:.0} KiB WAL ({:.1} KiB per event)",
            t.xids,
            per_run(t.xids as f64),
            t.xids as f64 / (tf.events * tf.fan_out).max(1) as f64,
            t.wal_bytes / 1024.0,
            per_run(t.wal_bytes) / 1024.0
        );
        let _ = writeln!(
            out,
            "Postgres transactions ended in the bench database: {} commits ({:.1} per event), {} rollbacks ({:.2} per event)",
            t.commits,
            per_run(t.commits as f64),
            t.rollbacks,
            per_run(t.rollbacks as f64)
        );
        let c = &t.check;
        let _ = writeln!(
            out,
            "check: fires {}/{}, runs {}/{} ({} SUCCEEDED), tasks {}/{} ({} SUCCEEDED), task attempts {}; completion events not RUN_SUCCEEDED: {}{}",
            c.fires,
            c.expected_runs,
            c.runs,
            c.expected_runs,
            c.runs_succeeded,
            c.tasks,
            c.expected_tasks,
            c.tasks_succeeded,
            c.attempts,
            t.not_succeeded,
            if c.problems() == 0 {
                ""
            } else {
                "  <-- MISMATCH"
            }
        );
        let _ = writeln!(
            out,
            "runs lost: {}; tasks that ended twice: {}; tasks started more than once: {}",
            c.expected_runs - c.runs,
            c.tasks_ended_twice,
            c.tasks_started_again
        );
        for kill in &c.kills {
            let _ = writeln!(
                out,
                "killed {} (SIGKILL) {:.2} s into the burst, at {}, and started again at once{}",
                kill.service,
                kill.at.as_secs_f64(),
                kill.reached,
                if kill.at >= tf.wall {
                    "  <-- after the burst was over"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Where a taskfactory run's time goes (per run, from Postgres timestamps and this process's clock):"
        );
        let _ = writeln!(
            out,
            "{:<48} {:>14} {:>12} {:>12}",
            "stage", "unloaded p50", "burst p50", "burst p99"
        );
        for stage in &t.stages {
            let _ = writeln!(
                out,
                "{:<48} {:>14} {:>12} {:>12}",
                stage.name,
                fmt_ms(quantile(&stage.unloaded, 0.5)),
                fmt_ms(quantile(&stage.burst, 0.5)),
                fmt_ms(quantile(&stage.burst, 0.99))
            );
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let tf = &self.taskfactory.phase;
        let ratios = self.baseline.as_ref().map(|b| {
            let r = |t: Option<Duration>, b: Option<Duration>| match (t, b) {
                (Some(t), Some(b)) if !b.is_zero() => Some(t.as_secs_f64() / b.as_secs_f64()),
                _ => None,
            };
            serde_json::json!({
                "events_per_sec": tf.events_per_sec() / b.events_per_sec(),
                "tasks_per_sec": tf.tasks_per_sec() / b.tasks_per_sec(),
                "latency_p50": r(quantile(&tf.latencies, 0.5), quantile(&b.latencies, 0.5)),
                "latency_p99": r(quantile(&tf.latencies, 0.99), quantile(&b.latencies, 0.99)),
                "unloaded_latency_p50": r(quantile(&tf.unloaded, 0.5), quantile(&b.unloaded, 0.5)),
            })
        });
        let t = &self.taskfactory;
        let c = &t.check;
        serde_json::json!({
            "args": {
                "events": self.args.events,
                "fan_out": self.args.fan_out,
                "warmup": self.args.warmup,
                "publish_window": self.args.publish_window,
                "rate": self.args.rate,
                "baseline_in_concurrency": self.args.baseline_in_concurrency,
                "baseline_out_concurrency": self.args.baseline_out_concurrency,
                "processes": self.args.processes,
                "kill": self.args.kill,
            },
            "machine": {
                "cpus": self.machine.cpus,
                "kernel": self.machine.kernel,
                "load_average_at_start": self.machine.load,
            },
            "baseline": self.baseline.as_ref().map(Phase::json),
            "taskfactory": tf.json(),
            "ratio_taskfactory_to_baseline": ratios,
            "postgres": {
                "write_transactions": t.xids,
                "write_transactions_per_event": t.xids as f64 / tf.events.max(1) as f64,
                "wal_bytes": t.wal_bytes,
                "wal_bytes_per_event": t.wal_bytes / tf.events.max(1) as f64,
                "commits": t.commits,
                "commits_per_event": t.commits as f64 / tf.events.max(1) as f64,
                "rollbacks": t.rollbacks,
                "rollbacks_per_event": t.rollbacks as f64 / tf.events.max(1) as f64,
            },
            "check": {
                "fires": c.fires,
                "runs": c.runs,
                "runs_succeeded": c.runs_succeeded,
                "tasks": c.tasks,
                "tasks_succeeded": c.tasks_succeeded,
                "task_attempts": c.attempts,
                "expected_runs": c.expected_runs,
                "expected_tasks": c.expected_tasks,
                "completions_not_succeeded": t.not_succeeded,
                "runs_lost": c.expected_runs - c.runs,
                "tasks_ended_twice": c.tasks_ended_twice,
                "tasks_started_again": c.tasks_started_again,
                "kills": c.kills.iter().map(|k| serde_json::json!({
                    "service": k.service,
                    "at_secs": k.at.as_secs_f64(),
                    "reached": k.reached,
                })).collect::<Vec<_>>(),
                "ok": c.problems() == 0,
            },
            "stages_ms": t.stages.iter().map(|s| serde_json::json!({
                "stage": s.name,
                "unloaded_p50": quantile(&s.unloaded, 0.5).map(ms),
                "burst_p50": quantile(&s.burst, 0.5).map(ms),
                "burst_p99": quantile(&s.burst, 0.99).map(ms),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The baseline's relay: takes an input, publishes `fan_out` outputs, awaits their acks.
struct Relay {
    js: jetstream::Context,
    payload: Bytes,
    fan_out: usize,
}

/// A relay that could not publish: the input is delivered again.
#[derive(Debug)]
struct Again(String);

impl std::fmt::Display for Again {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Unfinished for Again {
    fn then(&self) -> Then {
        Then::RetryAfter(Duration::from_millis(100))
    }
}

impl Handler for Relay {
    type Error = Again;

    async fn handle(&self, message: &Message) -> Result<(), Again> {
        relay_one(&self.js, message, self.fan_out, self.payload.clone())
            .await
            .map_err(|error| {
                eprintln!("baseline relay: {error:#}; retrying");
                Again(format!("{error:#}"))
            })
    }
}

/// The baseline's sink: counts outputs per input.
struct Sink {
    tracker: Arc<Tracker>,
    counts: Mutex<Vec<usize>>,
    fan_out: usize,
}

impl Handler for Sink {
    type Error = Again;

    async fn handle(&self, message: &Message) -> Result<(), Again> {
        let Some(slot) = slot_of(message.subject.as_str(), "bench.out.") else {
            return Ok(());
        };
        let reached = {
            let mut counts = self.counts.lock().expect("counts lock");
            match counts.get_mut(slot) {
                Some(count) => {
                    *count += 1;
                    *count == self.fan_out
                }
                None => false,
            }
        };
        if reached {
            self.tracker.complete(slot);
        }
        Ok(())
    }
}
